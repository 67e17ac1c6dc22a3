//! The fleet simulator against a real fleet server (its embedded broker):
//! simulated devices provisioned through the API connect, receive a signed
//! deploy, download and verify the bundle over MQTT chunks, and report
//! `serving`, committed — and the server believes them (signed state).

mod common;

use std::time::{Duration, Instant};

use outpost_fleet::simulate::{load_configs, provision, SimOptions, Simulation, Snapshot};
use serde_json::json;

fn wait_for(sim: &Simulation, what: &str, timeout: Duration, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + timeout;
    loop {
        let s = sim.snapshot();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fifty_simulated_devices_receive_a_deploy_and_commit() {
    const N: usize = 50;
    let fleet = common::Fleet::start();
    let published = fleet.publish_bc("1.0.0");
    let bundle_size = published["bundle_size"].as_u64().expect("bundle_size");
    let state = tempfile::tempdir().expect("tmp");
    let opts = SimOptions {
        devices: N,
        prefix: "sim".into(),
        tags: vec!["sim".into()],
        state_dir: state.path().to_path_buf(),
        broker: Some(format!("mqtt://127.0.0.1:{}", fleet.broker_port)),
        telemetry_interval_secs: 1,
        probation_secs: 1,
        workers: 2,
        connect_rate: 0,
        provision_threads: 4,
        events: Some(state.path().join("events.csv")),
    };
    let api = fleet.api();
    let paths = provision(&api, &opts).expect("provision");
    assert_eq!(paths.len(), N);
    // A second run finds the configs and provisions nothing again (the
    // server would refuse an existing id).
    assert_eq!(provision(&api, &opts).expect("reuse"), paths);
    let sim = Simulation::start(load_configs(&paths, &opts).expect("configs"), &opts).expect("start");
    let s = wait_for(&sim, "all connected", Duration::from_secs(30), |s| s.connected == N as i64);
    assert!(s.all_connected_after_secs.is_some());

    let ids: Vec<String> = (0..N).map(|i| opts.device_id(i)).collect();
    api.post_json("/v1/deploy", &json!({"target": "bc@1.0.0", "devices": ids})).expect("deploy");
    let s = wait_for(&sim, "all committed", Duration::from_secs(60), |s| {
        s.committed.get("bc@1.0.0").copied() == Some(N as u64)
    });
    assert_eq!(s.directives_accepted, N as u64);
    assert_eq!(s.directives_refused, 0);
    assert_eq!(s.chunk_bytes_received, N as u64 * bundle_size, "every device downloaded the whole bundle once");
    assert_eq!(s.statuses.get("serving").copied(), Some(N as i64), "{s:?}");
    wait_for(&sim, "telemetry from every device", Duration::from_secs(10), |s| s.telemetry_sent >= N as u64);

    // The server's view, from signed state messages.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let devices = api.get("/v1/devices").expect("devices");
        let list = devices["devices"].as_array().cloned().unwrap_or_default();
        let serving = list
            .iter()
            .filter(|d| d["status"] == "serving" && d["version"] == "1.0.0" && d["model"] == "bc")
            .count();
        if serving == N {
            break;
        }
        assert!(Instant::now() < deadline, "the server sees {serving}/{N} serving bc@1.0.0: {devices}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = common::http_get(fleet.api_port, "/metrics").expect("metrics").1;
    assert!(metrics.contains("outpost_fleet_mqtt_messages_total"), "{metrics}");
    sim.stop();

    // The event log names each device's connect, directive and commit.
    let events = std::fs::read_to_string(state.path().join("events.csv")).expect("events");
    for kind in ["connected", "directive", "committed"] {
        let n = events.lines().filter(|l| l.split(',').nth(2) == Some(kind)).count();
        assert_eq!(n, N, "{kind} events:\n{events}");
    }
    // Verified downloads leave no part files behind.
    let parts = paths.iter().filter(|p| p.with_file_name("inactive.part").exists()).count();
    assert_eq!(parts, 0);
}
