//! The operator CLI as a script uses it: `check-config`, `provision`
//! refusing a broker address only the server's machine can dial, `rollout
//! wait` / `rollout status --watch` exit codes, `devices show`. The real
//! `outpost-fleet` binary against a real server process.
//!
//! Rollouts here reach a provisioned device that never connects: it fails
//! at the silence deadline (1 s), which halts a rollout that tolerates no
//! failure and lets one that tolerates a failure complete. Seconds, no agent.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::{json, Value};

fn fleet_cli(fleet: Option<&Fleet>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-fleet"));
    cmd.args(args).env_remove("OUTPOST_SERVER").env_remove("OUTPOST_TOKEN");
    if let Some(f) = fleet {
        cmd.env("OUTPOST_SERVER", format!("http://127.0.0.1:{}", f.api_port)).env("OUTPOST_TOKEN", TOKEN);
    }
    cmd.output().expect("run outpost-fleet")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn check_config_passes_a_good_fleet_toml_and_names_each_problem() {
    let dir = tempfile::tempdir().expect("tmp");
    outpost_fleet::keys::keygen(&dir.path().join("keys"), 30).expect("keygen");
    // keygen leaves root.key beside the online key; a served keys_dir should not hold it.
    std::fs::rename(dir.path().join("keys/root.key"), dir.path().join("root.key")).expect("move root key offline");
    let base = format!("data_dir = \"data\"\napi_token = \"{TOKEN}\"\nkeys_dir = \"keys\"\n");

    let good = write_config(
        dir.path(),
        "good.toml",
        &format!("{base}[broker]\nlisten = \"127.0.0.1:1883\"\npublic_url = \"mqtts://fleet.lan:8883\"\n"),
    );
    let o = fleet_cli(None, &["check-config", "--config", &good]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("OK") && out(&o).contains("mqtts://fleet.lan:8883"), "{}", out(&o));
    assert!(err(&o).is_empty(), "no warnings: {}", err(&o));
    assert!(!dir.path().join("data").exists(), "check-config creates nothing");

    // Works, but devices would be told localhost: a warning naming public_url, exit 0.
    let wildcard = write_config(dir.path(), "wild.toml", &format!("{base}[broker]\nlisten = \"0.0.0.0:1883\"\n"));
    let o = fleet_cli(None, &["check-config", "--config", &wildcard]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(err(&o).contains("warning") && err(&o).contains("public_url"), "{}", err(&o));

    // A placeholder token: refused by check-config and by serve at start.
    let placeholder = write_config(dir.path(), "token.toml", &base.replace(TOKEN, "change-me-change-me-please"));
    for args in [["check-config", "--config", &placeholder], ["serve", "--config", &placeholder]] {
        let o = fleet_cli(None, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", err(&o));
        assert!(err(&o).contains("api_token") && err(&o).contains("placeholder"), "{}", err(&o));
    }

    // Keys missing and a data_dir that cannot be created: one line each, naming the key.
    std::fs::create_dir(dir.path().join("nokeys")).expect("dir");
    std::fs::write(dir.path().join("afile"), "x").expect("file");
    let broken = write_config(
        dir.path(),
        "broken.toml",
        &format!("data_dir = \"afile/data\"\napi_token = \"{TOKEN}\"\nkeys_dir = \"nokeys\"\n[broker]\nurl = \"mqtt://mosq:1883\"\n"),
    );
    let o = fleet_cli(None, &["check-config", "--config", &broken]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert!(e.lines().any(|l| l.contains("keys_dir:") && l.contains("root")), "{e}");
    assert!(e.lines().any(|l| l.contains("data_dir:") && l.contains("afile")), "{e}");
    assert!(out(&o).is_empty(), "no OK summary: {}", out(&o));

    // A broker URL nobody can dial.
    let port0 = write_config(dir.path(), "port0.toml", &format!("{base}[broker]\nurl = \"mqtt://mosq:0\"\n"));
    let o = fleet_cli(None, &["check-config", "--config", &port0]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("broker.url") && err(&o).contains("port 0"), "{}", err(&o));
}

#[test]
fn provision_refuses_a_loopback_broker_unless_forced() {
    // The test fleet's embedded broker listens on 127.0.0.1 and has no public_url.
    let fleet = Fleet::start();
    let out_path = fleet.dir.path().join("pi-1.toml");
    let o = fleet_cli(Some(&fleet), &["provision", "pi-1", "--out", &out_path.display().to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let e = err(&o);
    assert!(e.contains("127.0.0.1") && e.contains("public_url") && e.contains("--force"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!out_path.exists(), "nothing written");
    let missing = fleet.api().get("/v1/devices/pi-1");
    assert!(matches!(missing, Err(outpost_fleet::client::ClientError::Api { status: 404, .. })), "nothing registered");

    let o = fleet_cli(Some(&fleet), &["provision", "pi-1", "--force", "--out", &out_path.display().to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = std::fs::read_to_string(&out_path).expect("written");
    assert!(text.contains(&format!("mqtt://127.0.0.1:{}", fleet.broker_port)), "{text}");
    // The API alone provisions as before unless asked to check.
    fleet.api().post_json("/v1/devices", &json!({"device_id": "pi-2"})).expect("API provision");
    let refused = fleet.api().post_json("/v1/devices", &json!({"device_id": "pi-3", "check_broker": true}));
    assert!(matches!(refused, Err(outpost_fleet::client::ClientError::Api { status: 422, .. })), "{refused:?}");
}

#[test]
fn provision_writes_the_public_url_without_force() {
    let broker_port = free_port();
    let fleet = Fleet::start_with(&format!(
        "[broker]\nlisten = \"127.0.0.1:{broker_port}\"\npublic_url = \"mqtts://fleet.lan:8883\"\n"
    ));
    let out_path = fleet.dir.path().join("pi-1.toml");
    let o = fleet_cli(Some(&fleet), &["provision", "pi-1", "--out", &out_path.display().to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = std::fs::read_to_string(&out_path).expect("written");
    assert!(text.contains("broker = \"mqtts://fleet.lan:8883\""), "{text}");
}

fn start_rollout(fleet: &Fleet, max_failed: u32, bake: &str) -> String {
    let r = fleet
        .api()
        .post_json(
            "/v1/rollouts",
            &json!({"target": "bc@1.0.0", "stages": [100], "bake": bake, "silence_deadline": "1s",
                    "max_failed": max_failed, "min_reporting": 0.0, "on_failure": "halt"}),
        )
        .expect("start rollout");
    r["id"].as_str().expect("id").to_string()
}

#[test]
fn rollout_wait_and_watch_exit_by_how_the_rollout_ends_and_devices_show() {
    let fleet = Fleet::start();
    fleet.publish_bc("1.0.0");
    // Provisioned, never connected: it fails at the 1 s silence deadline.
    fleet.provision("quiet-1");
    let wait = |id: &str, extra: &[&str]| {
        let mut args = vec!["rollout", "wait", id, "--interval", "200ms", "--timeout", "60s"];
        args.extend_from_slice(extra);
        fleet_cli(Some(&fleet), &args)
    };

    // No failure tolerated: halted, exit 3, the final status on stdout.
    let id = start_rollout(&fleet, 0, "500ms");
    let o = wait(&id, &[]);
    assert_eq!(o.status.code(), Some(3), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("HALTED"), "{}", out(&o));
    assert!(err(&o).contains(&format!("rollout {id} halted")), "{}", err(&o));

    // One failure tolerated: the stage passes and the rollout completes, exit 0; --json prints the status.
    let id = start_rollout(&fleet, 1, "500ms");
    let o = wait(&id, &["--json"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", out(&o), err(&o));
    let status: Value = serde_json::from_str(&out(&o)).expect("json status");
    assert_eq!(status["state"], "completed");

    // Still running when the timeout passes: exit 5.
    let id = start_rollout(&fleet, 1, "1h");
    let o = fleet_cli(Some(&fleet), &["rollout", "wait", &id, "--interval", "200ms", "--timeout", "1s"]);
    assert_eq!(o.status.code(), Some(5), "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("still running"), "{}", err(&o));

    // Aborted: --watch prints the status (one JSON line per change) and exits 4.
    fleet.api().post_json(&format!("/v1/rollouts/{id}/abort"), &json!({})).expect("abort");
    let o = fleet_cli(Some(&fleet), &["rollout", "status", &id, "--watch", "--json", "--interval", "200ms", "--timeout", "60s"]);
    assert_eq!(o.status.code(), Some(4), "{}{}", out(&o), err(&o));
    let last: Value = serde_json::from_str(out(&o).lines().last().expect("a status line")).expect("json line");
    assert_eq!(last["state"], "aborted");
    // Without --watch, status answers once and exits 0 whatever the state.
    let o = fleet_cli(Some(&fleet), &["rollout", "status", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));

    // An unknown rollout is an error (1), not a wait.
    let o = wait("ro-999", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));

    // devices show: one device, as text and JSON; unknown and malformed ids are errors.
    let o = fleet_cli(Some(&fleet), &["devices", "show", "quiet-1"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("quiet-1") && out(&o).contains("test"), "{}", out(&o));
    let o = fleet_cli(Some(&fleet), &["devices", "show", "quiet-1", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let shown: Value = serde_json::from_str(&out(&o)).expect("json");
    assert_eq!(shown["device"]["id"], "quiet-1");
    assert_eq!(fleet_cli(Some(&fleet), &["devices", "show", "nobody"]).status.code(), Some(1));
    assert_eq!(fleet_cli(Some(&fleet), &["devices", "show", "../rollouts"]).status.code(), Some(1));
    // The list still works as before, and filters by tag, status, model.
    fleet.provision("other-1");
    let o = fleet_cli(Some(&fleet), &["devices"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("quiet-1") && out(&o).contains("other-1"), "{}", out(&o));
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["devices", "--json"];
        all.extend_from_slice(args);
        let o = fleet_cli(Some(&fleet), &all);
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let v: Value = serde_json::from_str(&out(&o)).expect("json");
        let mut ids: Vec<String> = v["devices"].as_array().expect("devices").iter().map(|d| d["id"].as_str().expect("id").to_string()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&["--tag", "test"]), ["other-1", "quiet-1"]);
    assert!(ids(&["--tag", "nope"]).is_empty());
    assert_eq!(ids(&["--status", "unknown"]), ["other-1", "quiet-1"], "never heard from");
    assert!(ids(&["--model", "bc@1.0.0"]).is_empty(), "neither runs a model");
}
