//! The fleet server against the real agent: a provisioned agent connects to
//! the embedded broker, receives a deploy, downloads the bundle in chunks,
//! serves the model, and the fleet's registry shows what it reports.
//!
//! Needs the `outpost-agent` binary (`cargo build -p outpost-agent`), found
//! next to this test's binary in the shared target directory, or at
//! `OUTPOST_AGENT_BIN`; skipped with a message when it is not there.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn agent_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("OUTPOST_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/debug/deps/agent_e2e-… → target/debug/outpost-agent
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("outpost-agent");
    p.is_file().then_some(p)
}

#[test]
fn provisioned_agent_receives_a_deploy_and_serves_it() {
    let Some(agent) = agent_bin() else {
        eprintln!("outpost-agent not built; skipping (cargo build -p outpost-agent)");
        return;
    };
    let fleet = Fleet::start();
    let published = fleet.publish_bc("1.0.0");
    let listen = format!("127.0.0.1:{}", free_port());
    let state_dir = fleet.dir.path().join("device-state");
    let r = fleet
        .api()
        .post_json("/v1/devices", &json!({"device_id": "pi-e2e", "tags": ["pi4"], "state_dir": state_dir, "listen": listen}))
        .expect("provision");
    let config = fleet.dir.path().join("agent.toml");
    // Short probation so the test sees the commit.
    let text = format!("{}probation_secs = 2\ntelemetry_interval_secs = 1\n", r["agent_config"].as_str().expect("config"));
    std::fs::write(&config, text).expect("write");
    let log = std::fs::File::create(fleet.dir.path().join("agent.log")).expect("log");
    let mut child = Command::new(agent)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn agent");
    let agent_log = || std::fs::read_to_string(fleet.dir.path().join("agent.log")).unwrap_or_default();
    let port: u16 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");

    // The agent reports itself (signed state) before any deploy.
    assert!(eventually(|| !device(&fleet, "pi-e2e")["status"].is_null()), "no state from the agent: {}\n--- fleet ---\n{}", agent_log(), fleet.log());

    fleet.api().post_json("/v1/deploy", &json!({"target": "bc@1.0.0", "devices": ["pi-e2e"]})).expect("deploy");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(port, "/ready").map(|(s, _)| s != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "agent never became ready: {}\n--- fleet ---\n{}", agent_log(), fleet.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let features: Vec<f32> = std::fs::read_to_string(fixtures().join("data/bc_test.csv"))
        .expect("csv")
        .lines()
        .nth(1)
        .expect("row")
        .split(',')
        .take(30)
        .map(|x| x.parse().expect("number"))
        .collect();
    let (status, body) = http(port, "POST", "/predict", None, &json!({"features": features}).to_string()).expect("predict");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"version\":\"1.0.0\""), "{body}");

    // The fleet sees the device serving the version, committed after probation.
    let ok = eventually_long(|| {
        let d = device(&fleet, "pi-e2e");
        d["version"] == "1.0.0" && d["status"] == "serving"
    });
    assert!(ok, "fleet view: {}\n{}", device(&fleet, "pi-e2e"), agent_log());
    let (_, metrics) = http_get(fleet.api_port, "/metrics").expect("metrics");
    let served = metrics.lines().find(|l| l.starts_with("outpost_fleet_chunk_bytes_total")).unwrap_or_default().to_string();
    let bytes: u64 = served.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(bytes >= published["bundle_size"].as_u64().expect("size"), "{served}");
    let _ = child.kill();
    let _ = child.wait();
}

fn eventually_long(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}
