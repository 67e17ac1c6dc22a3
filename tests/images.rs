//! What ships beside the binaries, checked as far as this machine can:
//! - `images/device/install.sh` into a temporary root: files, modes, the
//!   enable link, keeping a device's config, refusing bad input;
//! - the systemd unit: restart policy, watchdog, hardening, agreement with the
//!   example config; `systemd-analyze verify` and its offline security score
//!   where systemd-analyze exists;
//! - `images/device/agent.toml` has the keys DESIGN.md fixes;
//! - `images/k8s/*.yaml` parse, and every workload names its probes
//!   (`/health` liveness, `/ready` readiness), resources and update strategy;
//! - `images/containers/*.Dockerfile`: multi-stage, minimal final stage,
//!   non-root; the cross-build configuration files parse and leave host
//!   builds alone; the shell scripts parse.
//! Docker builds and a real device are outside what a test here can reach.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost_e2e::repo_root;
use yaml_rust2::{Yaml, YamlLoader};

const UNIT: &str = "images/device/outpost-agent.service";
const INSTALL: &str = "images/device/install.sh";

// ---------------------------------------------------------------- helpers

/// A fresh, empty directory under cargo's per-target temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("images-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stand-in for the agent binary: install.sh only checks the ELF magic.
fn fake_agent(dir: &Path) -> PathBuf {
    let path = dir.join("outpost-agent");
    fs::write(&path, b"\x7fELF\x02\x01\x01 stand-in for the agent binary").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn run_install(args: &[&Path]) -> Output {
    Command::new("bash").arg(repo_root().join(INSTALL)).args(args).output().expect("bash runs")
}

fn install_ok(args: &[&Path]) -> String {
    let out = run_install(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "install.sh {args:?} failed: {stderr}");
    format!("{}{stderr}", String::from_utf8_lossy(&out.stdout))
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

/// `[Section]` → list of (key, value), in file order (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("unit line without '=': {line}"));
        assert!(!current.is_empty(), "unit key {k} outside any section");
        sections.entry(current.clone()).or_default().push((k.trim().to_string(), v.trim().to_string()));
    }
    sections
}

fn unit_values<'a>(unit: &'a BTreeMap<String, Vec<(String, String)>>, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .map(|kv| kv.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect())
        .unwrap_or_default()
}

fn unit_value<'a>(unit: &'a BTreeMap<String, Vec<(String, String)>>, section: &str, key: &str) -> &'a str {
    let values = unit_values(unit, section, key);
    assert_eq!(values.len(), 1, "[{section}] {key}= expected once, found {values:?}");
    values[0]
}

fn read_unit() -> BTreeMap<String, Vec<(String, String)>> {
    parse_unit(&fs::read_to_string(repo_root().join(UNIT)).unwrap())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------- install.sh

#[test]
fn install_puts_binary_unit_and_config_into_a_root_with_the_right_modes() {
    let work = temp_dir("install");
    let root = work.join("root");
    fs::create_dir(&root).unwrap();
    let bin = fake_agent(&work);
    let config = work.join("device.toml");
    fs::write(&config, "device_id = \"pi-7\"\n").unwrap();
    let trust = work.join("root.pub");
    fs::write(&trust, "root public key\n").unwrap();

    install_ok(&[Path::new("--binary"), &bin, Path::new("--config"), &config, Path::new("--trust-root"), &trust, &root]);

    let installed_bin = root.join("usr/local/bin/outpost-agent");
    assert_eq!(fs::read(&installed_bin).unwrap(), fs::read(&bin).unwrap());
    assert_eq!(mode(&installed_bin), 0o755);
    assert!(!root.join("usr/local/bin/.outpost-agent.new").exists(), "temporary copy left behind");

    let unit = root.join("etc/systemd/system/outpost-agent.service");
    assert_eq!(fs::read_to_string(&unit).unwrap(), fs::read_to_string(repo_root().join(UNIT)).unwrap());
    assert_eq!(mode(&unit), 0o644);

    // The config holds the broker password: owner-only.
    let agent_toml = root.join("etc/outpost/agent.toml");
    assert_eq!(fs::read_to_string(&agent_toml).unwrap(), "device_id = \"pi-7\"\n");
    assert_eq!(mode(&agent_toml), 0o600);
    assert_eq!(mode(&root.join("etc/outpost")), 0o755);
    assert_eq!(fs::read_to_string(root.join("etc/outpost/root.pub")).unwrap(), "root public key\n");
    assert_eq!(mode(&root.join("etc/outpost/root.pub")), 0o644);

    // Enabled the way `systemctl enable` would, with a link that resolves
    // inside the device's filesystem, not the build host's.
    let link = root.join("etc/systemd/system/multi-user.target.wants/outpost-agent.service");
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("/etc/systemd/system/outpost-agent.service"));

    // Reinstalling a new binary without --config keeps the device's config.
    let out = install_ok(&[Path::new("--binary"), &bin, &root]);
    assert_eq!(fs::read_to_string(&agent_toml).unwrap(), "device_id = \"pi-7\"\n");
    assert!(out.contains("keeping"), "no word about the kept config: {out}");

    // --no-enable takes the agent out of the boot.
    install_ok(&[Path::new("--binary"), &bin, Path::new("--no-enable"), &root]);
    assert!(fs::symlink_metadata(&link).is_err(), "still enabled after --no-enable");
    assert!(installed_bin.exists());
}

#[test]
fn install_without_a_config_puts_the_example_and_says_so() {
    let work = temp_dir("install-example");
    let root = work.join("root");
    fs::create_dir(&root).unwrap();
    let bin = fake_agent(&work);
    let out = install_ok(&[Path::new("--binary"), &bin, &root]);
    assert!(out.contains("EXAMPLE"), "the example config went in silently: {out}");
    assert_eq!(
        fs::read_to_string(root.join("etc/outpost/agent.toml")).unwrap(),
        fs::read_to_string(repo_root().join("images/device/agent.toml")).unwrap()
    );
    assert_eq!(mode(&root.join("etc/outpost/agent.toml")), 0o600);
}

#[test]
fn install_refuses_bad_arguments_with_a_one_line_cause() {
    let work = temp_dir("install-bad");
    let root = work.join("root");
    fs::create_dir(&root).unwrap();
    let bin = fake_agent(&work);
    let text = work.join("not-elf");
    fs::write(&text, "#!/bin/sh\necho hello\n").unwrap();
    let (missing_dir, missing_bin) = (work.join("missing"), work.join("nope"));

    let cases: Vec<(Vec<&Path>, &str)> = vec![
        (vec![Path::new("--binary"), &bin], "no ROOT"),
        (vec![Path::new("--binary"), &bin, &missing_dir], "not a directory"),
        (vec![Path::new("--binary"), &text, &root], "not an ELF"),
        (vec![Path::new("--binary"), &missing_bin, &root], "not found"),
        (vec![Path::new("--binary"), &bin, &root, &root], "more than one ROOT"),
        (vec![Path::new("--binary"), &bin, Path::new("--frobnicate"), &root], "unknown option"),
    ];
    for (args, cause) in cases {
        let out = run_install(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "install.sh {args:?} succeeded");
        assert!(stderr.contains(cause), "install.sh {args:?}: stderr {stderr:?} does not say {cause:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "more than one line: {stderr}");
    }
    // Nothing was installed by any of the refused runs.
    assert!(fs::read_dir(&root).unwrap().next().is_none(), "a refused run wrote into ROOT");
}

// ---------------------------------------------------------------- the unit

#[test]
fn unit_restarts_pings_a_watchdog_and_is_hardened() {
    let unit = read_unit();
    // The agent reports readiness and pings from its main loop (sd_notify).
    assert_eq!(unit_value(&unit, "Service", "Type"), "notify");
    assert_eq!(unit_value(&unit, "Service", "NotifyAccess"), "main");
    let watchdog = unit_value(&unit, "Service", "WatchdogSec");
    assert!(watchdog.trim_end_matches('s').parse::<u32>().is_ok_and(|s| s > 0), "WatchdogSec={watchdog}");
    assert_eq!(unit_value(&unit, "Service", "Restart"), "on-failure");
    // A device must keep trying: no start rate limit.
    assert_eq!(unit_value(&unit, "Unit", "StartLimitIntervalSec"), "0");
    assert!(unit_value(&unit, "Unit", "After").contains("network-online.target"));
    assert!(unit_value(&unit, "Unit", "Wants").contains("network-online.target"));

    let exec = unit_value(&unit, "Service", "ExecStart");
    assert!(exec.starts_with("/usr/local/bin/outpost-agent run --config "), "ExecStart={exec}");
    // The config reaches the service as a credential: root-only on disk.
    assert_eq!(unit_value(&unit, "Service", "LoadCredential"), "agent.toml:/etc/outpost/agent.toml");
    assert!(exec.ends_with("--config %d/agent.toml"), "ExecStart={exec}");

    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("StateDirectory", "outpost-agent"),
    ] {
        assert_eq!(unit_value(&unit, "Service", key), want, "[Service] {key}=");
    }
    assert_eq!(unit_value(&unit, "Install", "WantedBy"), "multi-user.target");
}

#[test]
fn unit_and_example_config_agree_on_the_state_directory() {
    let unit = read_unit();
    let state_dir = format!("/var/lib/{}", unit_value(&unit, "Service", "StateDirectory"));
    let env = unit_values(&unit, "Service", "Environment");
    assert!(env.contains(&format!("OUTPOST_STATE_DIR={state_dir}").as_str()), "Environment={env:?}");
    let config: toml::Table = fs::read_to_string(repo_root().join("images/device/agent.toml")).unwrap().parse().unwrap();
    assert_eq!(config["state_dir"].as_str(), Some(state_dir.as_str()));
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: unit verification skipped");
        return;
    };
    // verify checks that ExecStart's program exists and is executable, so the
    // unit under test points at an installed stand-in.
    let work = temp_dir("verify");
    let root = work.join("root");
    fs::create_dir(&root).unwrap();
    let bin = fake_agent(&work);
    install_ok(&[Path::new("--binary"), &bin, &root]);
    let unit_text = fs::read_to_string(root.join("etc/systemd/system/outpost-agent.service")).unwrap();
    let installed = root.join("usr/local/bin/outpost-agent");
    let units = work.join("units");
    fs::create_dir(&units).unwrap();
    let unit_path = units.join("outpost-agent.service");
    fs::write(&unit_path, unit_text.replace("/usr/local/bin/outpost-agent", installed.to_str().unwrap())).unwrap();

    let out = Command::new(&analyze).args(["verify", "--man=no"]).arg(&unit_path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    // Unknown keys and bad values are only warnings: any output is a finding.
    let findings: Vec<&str> = stderr.lines().filter(|l| l.contains("outpost-agent.service")).collect();
    assert!(findings.is_empty(), "systemd-analyze verify: {findings:#?}");

    // The exposure score keeps the hardening from eroding unnoticed
    // (0 = fully locked down, 10 = none; this unit scores 1.4 with systemd 252).
    let out = Command::new(&analyze).args(["security", "--offline=yes", "--no-pager"]).arg(&unit_path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(score) = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for outpost-agent.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
    else {
        eprintln!("systemd-analyze security --offline not supported here: {}", String::from_utf8_lossy(&out.stderr));
        return;
    };
    assert!(score <= 2.0, "exposure level {score} > 2.0:\n{stdout}");
}

// ---------------------------------------------------------------- agent.toml

#[test]
fn example_agent_config_has_the_keys_design_fixes() {
    let text = fs::read_to_string(repo_root().join("images/device/agent.toml")).unwrap();
    let config: toml::Table = text.parse().expect("agent.toml parses");
    for key in ["device_id", "broker", "username", "password", "trust_root", "device_key", "state_dir", "listen"] {
        assert!(config.get(key).and_then(|v| v.as_str()).is_some_and(|s| !s.is_empty()), "{key} missing or not a string");
    }
    assert!(config["tags"].as_array().is_some_and(|t| t.iter().all(|v| v.is_str())), "tags is not a list of strings");
    let broker = config["broker"].as_str().unwrap();
    assert!(broker.starts_with("mqtt://") || broker.starts_with("mqtts://"), "broker {broker}");
    assert!(config["listen"].as_str().unwrap().parse::<std::net::SocketAddr>().is_ok());
}

// ---------------------------------------------------------------- fleet.toml

/// `outpost-fleet` from the shared target directory (`cargo test
/// --workspace` builds it first).
fn fleet_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("outpost-fleet");
    assert!(bin.is_file(), "{} is not built: cargo build -p outpost-fleet", bin.display());
    bin
}

#[test]
fn example_fleet_config_is_refused_as_shipped_and_checks_out_once_filled_in() {
    let example = repo_root().join("images/fleet/fleet.toml");
    let out = Command::new(fleet_bin()).arg("check-config").arg("--config").arg(&example).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the example's placeholders were accepted");
    assert!(stderr.contains("api_token") && stderr.contains("placeholder"), "{stderr}");

    // Filled in as the comments say: keys from keygen, a TLS pair, a token,
    // the address devices dial.
    let work = temp_dir("fleet-example");
    let keys = work.join("keys");
    let out = Command::new(fleet_bin()).arg("keygen").arg("--out").arg(&keys).output().unwrap();
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=fleet.test", "-keyout"])
        .arg(work.join("broker.key"))
        .arg("-out")
        .arg(work.join("broker.crt"))
        .output()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    let w = work.to_str().unwrap();
    let filled = fs::read_to_string(&example)
        .unwrap()
        .replace("<replace-with-openssl-rand-hex-24>", "0123456789abcdef0123456789abcdef")
        .replace("/var/lib/outpost-fleet", &format!("{w}/data"))
        .replace("/etc/outpost/keys", &format!("{w}/keys"))
        .replace("/etc/outpost/broker", &format!("{w}/broker"))
        .replace("<fleet.example.net>", "fleet.test");
    let config = work.join("fleet.toml");
    fs::write(&config, filled).unwrap();
    let out = Command::new(fleet_bin()).arg("check-config").arg("--config").arg(&config).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("mqtts://fleet.test:8883"), "{stdout}");
}

#[test]
fn fleet_unit_checks_its_config_before_serving() {
    let text = fs::read_to_string(repo_root().join("images/fleet/outpost-fleet.service")).unwrap();
    let unit = parse_unit(&text);
    assert_eq!(
        unit_value(&unit, "Service", "ExecStartPre"),
        "/usr/local/bin/outpost-fleet check-config --config /etc/outpost/fleet.toml"
    );
    assert_eq!(unit_value(&unit, "Service", "ExecStart"), "/usr/local/bin/outpost-fleet serve --config /etc/outpost/fleet.toml");
    assert_eq!(unit_value(&unit, "Service", "Restart"), "on-failure");
}

// ---------------------------------------------------------------- k8s

fn k8s_documents() -> Vec<(String, Yaml)> {
    let dir = repo_root().join("images/k8s");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in images/k8s");
    let mut docs = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let parsed = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        for doc in parsed.into_iter().filter(|d| !d.is_null()) {
            docs.push((name.clone(), doc));
        }
    }
    docs
}

fn str_at<'a>(y: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(y, |y, k| Some(&y[*k])).and_then(Yaml::as_str).filter(|_| !path.is_empty())
}

fn at<'a>(y: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(y, |y, k| &y[*k])
}

fn workload_name(doc: &Yaml) -> String {
    format!("{}/{}", str_at(doc, &["kind"]).unwrap_or("?"), str_at(doc, &["metadata", "name"]).unwrap_or("?"))
}

#[test]
fn k8s_manifests_parse_and_name_their_probes_resources_and_strategy() {
    let docs = k8s_documents();
    let mut deployments = Vec::new();
    for (file, doc) in &docs {
        let kind = str_at(doc, &["kind"]).unwrap_or_else(|| panic!("{file}: a document without kind"));
        assert!(str_at(doc, &["apiVersion"]).is_some(), "{file}: {kind} without apiVersion");
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_else(|| panic!("{file}: {kind} without a name"));
        if kind != "Namespace" {
            assert_eq!(str_at(doc, &["metadata", "namespace"]), Some("outpost"), "{file}: {kind}/{name} namespace");
        }
        if kind == "Deployment" {
            deployments.push(name.to_string());
        }
    }
    for want in ["outpost-fleet", "outpost-model-server"] {
        assert!(deployments.iter().any(|d| d == want), "no Deployment {want} in images/k8s (found {deployments:?})");
    }

    for (file, doc) in &docs {
        let kind = str_at(doc, &["kind"]).unwrap();
        if kind != "Deployment" && kind != "StatefulSet" {
            continue;
        }
        let what = format!("{file}: {}", workload_name(doc));
        let update = if kind == "Deployment" { "strategy" } else { "updateStrategy" };
        assert_eq!(str_at(doc, &["spec", update, "type"]), Some("RollingUpdate"), "{what}: update strategy");

        // The selector must select the pod template, or nothing runs.
        let selector = at(doc, &["spec", "selector", "matchLabels"]).as_hash().unwrap_or_else(|| panic!("{what}: no selector"));
        let labels = at(doc, &["spec", "template", "metadata", "labels"]);
        for (k, v) in selector {
            assert_eq!(&labels[k.as_str().unwrap()], v, "{what}: selector {k:?} does not match the pod labels");
        }

        let pod = at(doc, &["spec", "template", "spec"]);
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true), "{what}: runAsNonRoot");
        let containers = pod["containers"].as_vec().unwrap_or_else(|| panic!("{what}: no containers"));
        for c in containers {
            let cname = c["name"].as_str().unwrap_or("?");
            let port_names: Vec<&str> = c["ports"].as_vec().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
            for probe in ["livenessProbe", "readinessProbe"] {
                let get = &c[probe]["httpGet"];
                assert!(get["path"].as_str().is_some(), "{what}: container {cname} has no HTTP {probe}");
                // A probe on a named port that does not exist never succeeds.
                if let Some(port) = get["port"].as_str() {
                    assert!(port_names.contains(&port), "{what}: {probe} port {port} is not one of {port_names:?}");
                }
            }
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    let v = &c["resources"][bound][resource];
                    assert!(v.as_str().is_some() || v.as_i64().is_some(), "{what}: {cname} resources.{bound}.{resource}");
                }
            }
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false), "{what}: {cname}");
            // Outpost's own servers follow the device HTTP contract.
            if c["image"].as_str().is_some_and(|i| i.contains("outpost")) {
                assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/health"), "{what}: liveness");
                assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/ready"), "{what}: readiness");
                assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true), "{what}: read-only root");
            }
        }
    }
}

#[test]
fn k8s_services_select_existing_pods() {
    let docs = k8s_documents();
    let pod_labels: Vec<&Yaml> = docs
        .iter()
        .filter(|(_, d)| matches!(str_at(d, &["kind"]), Some("Deployment" | "StatefulSet")))
        .map(|(_, d)| at(d, &["spec", "template", "metadata", "labels"]))
        .collect();
    for (file, doc) in docs.iter().filter(|(_, d)| str_at(d, &["kind"]) == Some("Service")) {
        let selector = at(doc, &["spec", "selector"]).as_hash().unwrap_or_else(|| panic!("{file}: Service without selector"));
        let selects = pod_labels.iter().any(|labels| selector.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v));
        assert!(selects, "{file}: {} selects no pod of these manifests", workload_name(doc));
    }
}

// ---------------------------------------------------------------- containers

#[test]
fn dockerfiles_are_multi_stage_minimal_and_non_root() {
    let dir = repo_root().join("images/containers");
    for name in ["runtime.Dockerfile", "fleet.Dockerfile"] {
        let text = fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Instructions, with continuation lines joined and comments dropped.
        let mut instructions: Vec<String> = Vec::new();
        let mut pending = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && pending.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(part) => pending.push_str(part),
                None => {
                    pending.push_str(t);
                    instructions.push(std::mem::take(&mut pending));
                }
            }
        }
        let froms: Vec<usize> = (0..instructions.len()).filter(|&i| instructions[i].starts_with("FROM ")).collect();
        assert!(froms.len() >= 2, "{name}: not multi-stage");
        let last = &instructions[*froms.last().unwrap()..];
        let base = last[0].split_whitespace().nth(1).unwrap();
        assert!(base == "scratch" || base.starts_with("gcr.io/distroless/"), "{name}: final stage FROM {base}");
        assert!(last.iter().any(|i| i.starts_with("COPY --from=")), "{name}: final stage copies nothing from a build stage");
        let user = last.iter().rev().find_map(|i| i.strip_prefix("USER ")).unwrap_or_else(|| panic!("{name}: no USER in the final stage"));
        let uid = user.trim().split(':').next().unwrap();
        assert!(uid != "root" && uid != "0", "{name}: runs as {user}");
        assert!(last.iter().any(|i| i.starts_with("ENTRYPOINT [")), "{name}: no exec-form ENTRYPOINT");

        // BuildKit's per-Dockerfile ignore file keeps target/ out of the context.
        let ignore = fs::read_to_string(dir.join(format!("{name}.dockerignore"))).unwrap_or_else(|e| panic!("{name}.dockerignore: {e}"));
        assert!(ignore.lines().any(|l| l.trim().trim_end_matches('/') == "target"), "{name}.dockerignore lets target/ in");
    }
}

// ---------------------------------------------------------------- build config

#[test]
fn cross_build_configuration_covers_both_targets_and_leaves_the_host_alone() {
    let root = repo_root();
    let cargo: toml::Table = fs::read_to_string(root.join(".cargo/config.toml")).unwrap().parse().expect(".cargo/config.toml parses");
    // Host builds and tests must not pick up anything from this file.
    assert!(cargo.get("build").is_none(), ".cargo/config.toml has a [build] section");
    let targets = cargo["target"].as_table().unwrap();
    for (t, _) in targets {
        assert!(!t.starts_with("x86_64") && !t.starts_with("cfg("), "[target.{t}] may apply to the host");
    }
    assert_eq!(targets["aarch64-unknown-linux-musl"]["linker"].as_str(), Some("rust-lld"));
    let armv7 = &targets["armv7-unknown-linux-gnueabihf"];
    assert!(armv7["rustflags"].as_array().unwrap().iter().any(|f| f.as_str() == Some("target-feature=+crt-static")));

    let cross: toml::Table = fs::read_to_string(root.join("cross.toml")).unwrap().parse().expect("cross.toml parses");
    for t in ["aarch64-unknown-linux-musl", "armv7-unknown-linux-gnueabihf"] {
        let image = cross["target"][t]["image"].as_str().unwrap_or_else(|| panic!("cross.toml: no image for {t}"));
        assert!(image.contains(t), "cross.toml: image {image} for {t}");
    }

    // The device profile keeps panics catchable: the server answers 500 for a
    // panicking request instead of dying.
    let manifest: toml::Table = fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let device = &manifest["profile"]["device"];
    assert_eq!(device["panic"].as_str(), Some("unwind"));
    assert_eq!(device["strip"].as_bool(), Some(true));
}

#[test]
fn shell_scripts_parse_and_explain_themselves() {
    for script in [INSTALL, "scripts/build-arm.sh", "bench/arm/qemu-check.sh"] {
        let path = repo_root().join(script);
        assert_eq!(mode(&path) & 0o111, 0o111, "{script} is not executable");
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new("bash").arg(&path).arg("--help").output().unwrap();
        let help = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(help.contains(Path::new(script).file_name().unwrap().to_str().unwrap()), "{script} --help: {help}");
        assert!(!help.contains("set -euo"), "{script} --help prints code: {help}");
    }
}
