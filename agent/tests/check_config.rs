//! `outpost-agent check-config` and the same checks refusing `run` at start:
//! the real binary on a good config, the shipped example, all-zero keys and
//! a `change-me` password. Each refusal must name the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_runtime::bundle::SecretKey;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the agent with only the variables given (none of the caller's
/// OUTPOST_* leak in).
fn agent(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-agent"));
    cmd.args(args).env("RUST_LOG", "error");
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTPOST_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run outpost-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config that works: real (random) keys inline, as `provision` writes them.
fn good_config(dir: &Path) -> String {
    let root = SecretKey::generate().expect("key").public_key();
    let device = SecretKey::generate().expect("key");
    let key_file = dir.join("device.key");
    device.write_file(&key_file, "device").expect("write key");
    let root_line = root.to_file_text("").lines().find(|l| l.starts_with("outpost-")).expect("key line").to_string();
    format!(
        "device_id = \"pi-7\"\ntags = [\"pi4\"]\nbroker = \"mqtts://fleet.lan:8883\"\nusername = \"pi-7\"\n\
         password = \"3f1c9a0b7d2e4f6a8c0e1b3d5f7a9c2e\"\ntrust_root = \"{root_line}\"\ndevice_key = {key_file:?}\n\
         state_dir = {state:?}\nlisten = \"127.0.0.1:8080\"\n",
        state = dir.join("state"),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p.display().to_string()
}

#[test]
fn a_good_config_passes_with_a_summary() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = write(dir.path(), "agent.toml", &good_config(dir.path()));
    let out = agent(&["check-config", "--config", &path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK") && text.contains("pi-7") && text.contains("fleet.lan:8883"), "{text}");
}

#[test]
fn the_shipped_example_is_refused_naming_every_placeholder() {
    let example = workspace().join("images/device/agent.toml");
    let example = example.display().to_string();
    let out = agent(&["check-config", "--config", &example]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for key in ["`broker`", "`password`", "`trust_root`", "`device_key`"] {
        assert!(err.lines().any(|l| l.contains(key)), "no line names {key}: {err}");
    }
    assert!(err.contains("fleet.example.com"), "the broker line names the host: {err}");
    // `run` refuses it at start with the same lines, instead of retrying DNS forever.
    let out = agent(&["run", "--config", &example]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`device_key`"), "{}", stderr(&out));
}

#[test]
fn all_zero_keys_are_refused_inline_and_from_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = good_config(dir.path());
    let zeros = "0".repeat(64);
    // Inline, as the example has them.
    let text: String = good
        .lines()
        .map(|l| {
            if l.starts_with("trust_root") {
                format!("trust_root = \"outpost-ed25519-public-v1 {zeros}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = write(dir.path(), "inline.toml", &text);
    let out = agent(&["check-config", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("`trust_root`") && err.contains("all-zero"), "{err}");
    assert!(!err.contains("`device_key`"), "the device key is fine: {err}");

    // A key file holding the zero seed, named by the environment.
    let zero_key = dir.path().join("zero.key");
    SecretKey::from_seed([0; 32]).write_file(&zero_key, "zero").expect("write");
    let path = write(dir.path(), "agent.toml", &good);
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(["run", "--config", &path])
        .env("OUTPOST_DEVICE_KEY", &zero_key)
        .env("RUST_LOG", "error")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("`device_key`") && err.contains("all-zero"), "{err}");
}

#[test]
fn change_me_passwords_and_undialable_brokers_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = good_config(dir.path());
    let cases = [
        ("password = \"CHANGE-ME\"", "`password`"),
        ("password = \"\"", "`password`"),
        ("broker = \"mqtt://:1883\"", "`broker`"),
        ("broker = \"mqtt://fleet.lan:0\"", "`broker`"),
        ("broker = \"http://fleet.lan:1883\"", "`broker`"),
        ("broker = \"mqtt://0.0.0.0:1883\"", "`broker`"),
    ];
    for (line, key) in cases {
        let name = line.split_whitespace().next().expect("key");
        let text: String =
            good.lines().map(|l| if l.starts_with(name) { line } else { l }).collect::<Vec<_>>().join("\n");
        let path = write(dir.path(), "case.toml", &text);
        let out = agent(&["check-config", "--config", &path]);
        assert_eq!(out.status.code(), Some(1), "{line} passed: {}", String::from_utf8_lossy(&out.stdout));
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "one problem, one line: {err}");
        assert!(err.contains(key), "{line}: {err}");
    }
}
