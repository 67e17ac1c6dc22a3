//! A stolen device, a hostile client, a forged chunk: the fleet holds.
//!
//! Real `outpost-fleet` and `outpost-agent` processes and a real broker,
//! attacked the way issue 17 found them open, once on the embedded broker
//! and once on mosquitto with the shipped ACL. Every attack is followed by
//! the same questions: is anything lost, does every device end on the
//! version the operator chose, does every process stay up?
//!
//! **Embedded broker** (`embedded`): `victim` and `mallory` serve 1.0.0;
//! mallory's agent is stopped and its credentials and key are the
//! attacker's (a stolen device).
//!
//! 1. Topic ACL: with mallory's credentials, subscribe to `outpost/v1/#`
//!    and to the victim's topics (nothing arrives); publish a retained junk
//!    directive on the victim's `desired`, an unsigned offline on its
//!    `state`, a forged alert on `outpost/v1/fleet/alerts` (none arrives
//!    anywhere; the victim keeps serving, the fleet keeps it online).
//! 2. An MQTT payload over the broker's limit: refused, nothing breaks.
//! 3. Replay after a fleet restart: state and telemetry signed with
//!    mallory's real key but an old counter are refused.
//! 3b. A lying canary: in a stage with a version far too slow on the
//!    victim, the stolen device signs "committed" and floods fast telemetry
//!    and latency sketches; the p99 gate still halts the rollout.
//! 4. Slow and oversized HTTP clients on the fleet API and on the
//!    victim's predict port; a predict body of nested arrays claiming 8e15
//!    elements: both servers answer `/health` throughout and stay up.
//! 5. `decommission mallory`: its credentials stop working.
//! 6. Key rotation: `keygen --rotate`, fleet restarted; 1.1.0 (signed by
//!    the new key) reaches the victim, a device provisioned after the
//!    rotation installs 1.0.0 (signed by the old key), and `rollback bc
//!    --to 1.0.0` brings the victim back to the version in its slot.
//!
//! **mosquitto** (`mosquitto`), where the test holds the fleet's own broker
//! credentials — what an attacker who got past the ACL would have:
//!
//! 7. Forged chunk replies (zeros at every offset of the bundle) and forged
//!    "unavailable" replies during a rollout: the canary still commits.
//! 8. Replay of an older, genuinely signed directive on the victim's
//!    `desired`: refused; the victim stays on the newer version, and a
//!    restart of the victim does not change that.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_runtime::bundle::{Digest, SecretKey};
use outpost_runtime::protocol::{
    topics, ChunkReply, DeviceSigned, DeviceState, LatencySketch, ModelRef, SketchMessage, Status, Telemetry, SKETCH_FORMAT,
};
use serde_json::{json, Value};
use support::alerts::Alerts;
use support::attacker::{self, mqtt_session};
use support::device::{feature_rows, Device};
use support::fleet::{BrokerConfig, Fleet, DASHBOARD_PASSWORD, DASHBOARD_USER};
use support::mosquitto::{Mosquitto, FLEET_PASSWORD, FLEET_USER};
use support::procs::{free_port, wait_for};

const SETTLE: Duration = Duration::from_secs(45);
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an attacker's session listens for what it should not get.
const LISTEN: Duration = Duration::from_secs(2);

fn fixture(name: &str) -> std::path::PathBuf {
    outpost_e2e::repo_root().join("fixtures").join(name)
}

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("hostile-{name}-")).tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp")
}

/// The fleet's record of one device, from `outpost-fleet devices --json`.
fn fleet_view(fleet: &Fleet, id: &str) -> Value {
    let v = fleet.cli_json(&["devices"]);
    v["devices"].as_array().and_then(|a| a.iter().find(|d| d["id"] == id).cloned()).unwrap_or(Value::Null)
}

/// Waits until the device serves `version` and the fleet has its signed
/// word that it committed it.
fn wait_serves(fleet: &Fleet, d: &Device, version: &str) {
    wait_for(
        &format!("{} to serve {version}", d.id),
        SETTLE,
        || (d.version().as_deref() == Some(version)).then_some(()),
        || format!("{} serves {:?}\n{}\n{}", d.id, d.version(), d.log_tail(), fleet.log_tail()),
    );
    wait_for(
        &format!("the fleet to see {} committed on {version}", d.id),
        SETTLE,
        || {
            let v = fleet_view(fleet, &d.id);
            (v["version"] == version && v["committed"] == true && v["status"] == "serving").then_some(())
        },
        || format!("{}\n{}\n{}", fleet_view(fleet, &d.id), d.log_tail(), fleet.log_tail()),
    );
}

fn rollout(fleet: &Fleet, target: &str, tag: &str) -> Value {
    let id = fleet.rollout_start(target, &["--tag", tag, "--stages", "100", "--bake", "1s"]);
    fleet.wait_rollout_end(&id, ROLLOUT_TIMEOUT)
}

/// The device's secret key, from the agent.toml `provision` wrote.
fn device_key(d: &Device) -> SecretKey {
    let text = std::fs::read_to_string(d.dir.join("agent.toml")).expect("agent.toml");
    let table: toml::Table = text.parse().expect("toml");
    let line = table.get("device_key").and_then(|k| k.as_str()).expect("device_key");
    SecretKey::from_file_text(line, Path::new("agent.toml")).expect("device key")
}

/// A telemetry message claiming a perfect window with many requests.
fn rosy_telemetry() -> Telemetry {
    serde_json::from_value(json!({
        "format": outpost_runtime::protocol::TELEMETRY_FORMAT,
        "model": {"name": "bc", "version": "6.6.6"},
        "status": "serving",
        "committed": true,
        "window_start_unix_ms": 1,
        "window_end_unix_ms": 2,
        "requests": 1_000_000u64,
        "input_errors": 0,
        "failures": 0,
        "rows": 1_000_000u64,
        "error_rate": 0.0,
        "latency_p50_ms": null,
        "latency_p99_ms": null,
        "drift": null,
        "memory_rss_bytes": null,
        "dropped_while_offline": 0,
        "uptime_secs": 1
    }))
    .expect("telemetry")
}

fn every_process_up(fleet: &mut Fleet, devices: &mut [&mut Device]) {
    fleet.wait_ready(Duration::from_secs(10));
    for d in devices.iter_mut() {
        d.check_alive().unwrap_or_else(|e| panic!("{e}\n{}", d.log_tail()));
    }
}

#[test]
fn embedded() {
    let dir = scratch("embedded");
    let root = dir.path();
    let mut fleet = Fleet::start(&root.join("fleet"), BrokerConfig::Embedded { port: free_port() }, "");
    let port = fleet.broker.port();
    let alerts = Alerts::subscribe(port, DASHBOARD_USER, DASHBOARD_USER, DASHBOARD_PASSWORD);
    let mut victim = Device::provision(&fleet, root, "victim", "pi4");
    let mut mallory = Device::provision(&fleet, root, "mallory", "lab");
    // The victim's own probation is lenient about latency, so that in 3b
    // the fleet's p99 gate is the wall that must hold.
    victim.start(&[("OUTPOST_PROBATION_MAX_LATENCY_RATIO", "100000")]);
    mallory.start(&[]);
    fleet.publish(&fixture("bc_mlp.onnx"), "1.0.0");
    for tag in ["pi4", "lab"] {
        let s = rollout(&fleet, "bc@1.0.0", tag);
        assert_eq!(s["state"], "completed", "{s}\n{}", fleet.log_tail());
    }
    wait_serves(&fleet, &victim, "1.0.0");
    wait_serves(&fleet, &mallory, "1.0.0");
    wait_for("the dashboard's subscription", SETTLE, || alerts.is_subscribed().then_some(()), || fleet.log_tail());

    // mallory is stolen: its agent stops, its credentials and key are the attacker's.
    mallory.stop();
    let (m_id, m_pw) = (mallory.id.clone(), mallory.password.clone());
    let stolen = |subscribe: &[&str], publish: &[(String, Vec<u8>, bool)]| {
        mqtt_session(port, &m_id, &m_id, &m_pw, subscribe, publish, LISTEN)
    };

    // ---- 1. the topic ACL
    let s = stolen(&["outpost/v1/#"], &[]);
    assert!(s.connected, "mallory's own credentials still connect");
    assert!(s.received.iter().all(|(t, _)| !t.contains("/victim/") && !t.contains("/fleet/")), "{:?}", s.received);
    for filter in ["outpost/v1/devices/victim/desired", "outpost/v1/devices/+/state", "#", "outpost/v1/fleet/#"] {
        let s = stolen(&[filter], &[]);
        assert!(s.received.is_empty(), "{filter}: {:?}", s.received);
    }
    let junk: Vec<(String, Vec<u8>, bool)> = vec![
        (topics::desired("victim"), b"junk directive".to_vec(), true),
        (topics::state("victim"), br#"{"status":"offline"}"#.to_vec(), true),
        ("outpost/v1/fleet/alerts".into(), br#"{"kind":"forged"}"#.to_vec(), false),
    ];
    for one in &junk {
        stolen(&[], std::slice::from_ref(one));
    }
    // Another device's view of the victim's retained topics is unchanged;
    // the fleet still believes the victim's own signed word.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(victim.version().as_deref(), Some("1.0.0"));
    let v = fleet_view(&fleet, "victim");
    assert_eq!((v["status"].as_str(), v["online"].as_bool()), (Some("serving"), Some(true)), "{v}");
    assert!(v["last_error"].is_null(), "{v}");
    assert!(alerts.find(|a| a["kind"] == "forged").is_none(), "{:?}", alerts.all());
    eprintln!("1. topic ACL held: nothing of the victim's or the fleet's reached the stolen device, nothing it wrote arrived");

    // ---- 2. an oversized MQTT payload on its own topic
    let big = vec![b'x'; 2 << 20];
    let s = stolen(&[], &[(topics::telemetry(&m_id), big, false)]);
    assert!(s.dropped, "a 2 MiB publish is over the broker's limit: the connection is closed");
    every_process_up(&mut fleet, &mut [&mut victim]);
    eprintln!("2. a 2 MiB payload closed only the sender's connection");

    // ---- 3. replay of old counters, signed with the real key, after a restart
    fleet.kill9();
    fleet.serve();
    let key = device_key(&mallory);
    let mut old_state = DeviceState::new(Status::Failed);
    old_state.model = Some("bc".into());
    old_state.version = Some("6.6.6".into());
    let replays = vec![
        (topics::state(&m_id), DeviceSigned::sign(&m_id, 1, &old_state, &key).expect("sign").to_bytes(), true),
        (topics::telemetry(&m_id), DeviceSigned::sign(&m_id, 2, &rosy_telemetry(), &key).expect("sign").to_bytes(), false),
    ];
    let rejected_before = fleet.metric_where("outpost_fleet_mqtt_messages_total", "result=\"rejected\"");
    stolen(&[], &replays);
    wait_for(
        "the fleet to count the replays as rejected",
        Duration::from_secs(10),
        || {
            (fleet.metric_where("outpost_fleet_mqtt_messages_total", "result=\"rejected\"") >= rejected_before + 2.0)
                .then_some(())
        },
        || fleet.log_tail(),
    );
    let v = fleet_view(&fleet, &m_id);
    assert_eq!(v["version"], "1.0.0", "a replayed state changed the fleet's view: {v}");
    assert_ne!(v["status"], "failed", "{v}");
    eprintln!("3. replayed state and telemetry refused after a fleet restart");

    // ---- 3b. a lying canary: a version far too slow on the victim; the
    // stolen device, in the same stage, swears it committed it and serves
    // a flood of fast requests. The p99 gate still sees the victim.
    let slow_path = root.join("bc_mlp_slow.onnx");
    let original = std::fs::read(fixture("bc_mlp.onnx")).expect("fixture");
    let slow = support::slow_model::slow_variant(&original, "features", 4).expect("slow variant");
    std::fs::write(&slow_path, slow).expect("write");
    fleet.publish(&slow_path, "1.0.1");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let liar = {
        let (stop, key, id, pw) = (stop.clone(), device_key(&mallory), m_id.clone(), m_pw.clone());
        std::thread::spawn(move || {
            let mut counter = 2_000_000_000u64;
            let mut next = || {
                counter += 1;
                counter
            };
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                let model = ModelRef { name: "bc".into(), version: "1.0.1".into() };
                let mut state = DeviceState::new(Status::Serving);
                (state.model, state.version, state.committed, state.directive_sequence) =
                    (Some("bc".into()), Some("1.0.1".into()), true, 1_000_000);
                let mut t = rosy_telemetry();
                (t.model, t.window_start_unix_ms, t.window_end_unix_ms, t.requests) =
                    (Some(model.clone()), now - 1000, now, 100_000);
                let mut fast = vec![0u64; 16];
                fast[3] = 100_000;
                let sketch = SketchMessage {
                    format: SKETCH_FORMAT,
                    model,
                    window_start_unix_ms: now - 1000,
                    window_end_unix_ms: now,
                    drift: None,
                    latency: LatencySketch { buckets_log2_us: fast },
                };
                let lies = vec![
                    (topics::state(&id), DeviceSigned::sign(&id, next(), &state, &key).expect("sign").to_bytes(), true),
                    (topics::telemetry(&id), DeviceSigned::sign(&id, next(), &t, &key).expect("sign").to_bytes(), false),
                    (topics::sketch(&id), DeviceSigned::sign(&id, next(), &sketch, &key).expect("sign").to_bytes(), false),
                ];
                mqtt_session(port, &id, &id, &pw, &[], &lies, Duration::from_millis(50));
                rounds += 1;
                std::thread::sleep(Duration::from_millis(600));
            }
            rounds
        })
    };
    let traffic = {
        let (stop, port) = (stop.clone(), victim.port);
        let row = feature_rows("bc_test.csv")[0].clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = support::http::post(port, "/predict", &json!({ "features": row }));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let id = fleet.rollout_start(
        "bc@1.0.1",
        &["--tag", "pi4", "--tag", "lab", "--stages", "100", "--bake", "4s", "--max-p99-ms", "8", "--max-failed", "1"],
    );
    let s = fleet.wait_rollout_end(&id, ROLLOUT_TIMEOUT);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = liar.join().expect("liar");
    let _ = traffic.join();
    assert_eq!(s["state"], "halted", "the liar passed a slow version: {s}\n{}", fleet.log_tail());
    assert!(s["reason"].as_str().is_some_and(|r| r.contains("p99_ms")), "halted for another reason: {s}");
    wait_serves(&fleet, &victim, "1.0.0");
    eprintln!("3b. a lying canary ({rounds} rounds of signed fast telemetry) did not pass a slow version: {}", s["reason"]);

    // ---- 4. hostile HTTP clients on both servers
    for (what, http_port, predict) in [("fleet API", fleet.api_port, "/v1/publish"), ("device", victim.port, "/predict")] {
        let stalled = attacker::stalled_bodies(http_port, predict, 16);
        let slow = attacker::slow_heads(http_port, 8, Duration::from_secs(4));
        let took = attacker::health_within(http_port, Duration::from_secs(3));
        assert!(took.is_some(), "{what}: /health unanswered behind 16 stalled bodies and 8 slow heads");
        let sent = attacker::huge_header(http_port, 64 << 20);
        assert!(sent < 64 << 20, "{what}: a 64 MiB header line was read to the end");
        assert!(attacker::health_within(http_port, Duration::from_secs(3)).is_some(), "{what} after a huge header");
        drop(stalled);
        slow.into_iter().for_each(|t| {
            let _ = t.join();
        });
    }
    // More silent connections than the fleet API admits (256): after a
    // second of silence they make room for a client that speaks.
    let silent: Vec<std::net::TcpStream> =
        (0..300).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", fleet.api_port)).ok()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        attacker::health_within(fleet.api_port, Duration::from_secs(3)).is_some(),
        "fleet API locked out by {} silent connections",
        silent.len()
    );
    drop(silent);
    // Nested arrays whose first elements claim 10^12 × 8000 = 8e15
    // elements, padded to 1.2 MB: a 4xx, never an abort.
    let body = attacker::nested_predict_body(10, 12, 8000, 1_200_000);
    let status = attacker::post_raw(victim.port, "/predict", "application/json", body.as_bytes());
    assert!((400..500).contains(&status), "nested-array bomb answered {status}");
    let row = &feature_rows("bc_test.csv")[0];
    assert_eq!(victim.predict(row).expect("predict").status, 200);
    every_process_up(&mut fleet, &mut [&mut victim]);
    eprintln!("4. slow clients, a 64 MiB header, 300 silent connections and a nested-array bomb: both servers answered throughout");

    // ---- 5. decommission the stolen device
    let d = fleet.cli_json(&["decommission", &m_id]);
    assert!(d.to_string().contains(&m_id), "{d}");
    let s = stolen(&[], &[]);
    assert!(!s.connected, "a decommissioned device's credentials still connect");
    let v = fleet.cli_json(&["audit"]);
    assert!(v.to_string().contains("decommission"), "{v}");
    eprintln!("5. decommissioned: mallory's credentials refused, audit-logged");

    // ---- 6. key rotation keeps every version installable
    let keys = fleet.dir.join("keys");
    let out = std::process::Command::new(support::procs::bin("outpost-fleet"))
        .args(["keygen", "--rotate", "--out"])
        .arg(&keys)
        .output()
        .expect("keygen --rotate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fleet.kill9();
    fleet.serve();
    fleet.publish(&fixture("bc_mlp_int8.onnx"), "1.1.0");
    let s = rollout(&fleet, "bc@1.1.0", "pi4");
    assert_eq!(s["state"], "completed", "{s}\n{}", fleet.log_tail());
    wait_serves(&fleet, &victim, "1.1.0");
    // A device provisioned after the rotation installs the old-signed 1.0.0.
    let mut newbie = Device::provision(&fleet, root, "newbie", "new");
    newbie.start(&[]);
    let s = rollout(&fleet, "bc@1.0.0", "new");
    assert_eq!(s["state"], "completed", "{s}\n{}\n{}", fleet.log_tail(), newbie.log_tail());
    wait_serves(&fleet, &newbie, "1.0.0");
    // And a rollback to 1.0.0 reaches the victim, which holds it in a slot.
    fleet.cli_json(&["rollback", "bc", "--to", "1.0.0", "--tag", "pi4"]);
    wait_serves(&fleet, &victim, "1.0.0");
    every_process_up(&mut fleet, &mut [&mut victim, &mut newbie]);
    eprintln!("6. after keygen --rotate: 1.1.0 rolled out, a new device installed 1.0.0, rollback to 1.0.0 reached the victim");
}

#[test]
fn mosquitto() {
    let dir = scratch("mosquitto");
    let root = dir.path();
    let mut m = Mosquitto::start(&root.join("mosquitto"))
        .expect("mosquitto is not installed: run scripts/setup.sh (the README's test command does)");
    let broker = BrokerConfig::External { port: m.port, username: FLEET_USER.into(), password: FLEET_PASSWORD.into() };
    let mut fleet = Fleet::start(&root.join("fleet"), broker, "");
    let mut victim = Device::provision(&fleet, root, "victim", "pi4");
    m.add_user("victim", &victim.password);
    victim.start(&[]);
    fleet.publish(&fixture("bc_mlp.onnx"), "1.0.0");
    let s = rollout(&fleet, "bc@1.0.0", "pi4");
    assert_eq!(s["state"], "completed", "{s}\n{}", fleet.log_tail());
    wait_serves(&fleet, &victim, "1.0.0");
    // The directive for 1.0.0 as it sits retained on the broker: genuine,
    // signed, and about to be outdated.
    let recorded = mqtt_session(m.port, "e2e-recorder", FLEET_USER, FLEET_PASSWORD, &[&topics::desired("victim")], &[], LISTEN);
    let old_directive = recorded.received.first().map(|(_, p)| p.clone()).expect("the retained directive");

    // ---- 7. forged chunks and forged "unavailable" during a rollout
    let v11 = fleet.publish(&fixture("bc_mlp_int8.onnx"), "1.1.0");
    let sha = v11["bundle_sha256"].as_str().and_then(Digest::from_hex).expect("bundle_sha256");
    let size = v11["bundle_size"].as_u64().expect("bundle_size");
    let forger_port = m.port;
    let forger = std::thread::spawn(move || {
        // For four seconds from the rollout's start: zeros at every 32 KiB
        // offset, and "unavailable" for each, again and again.
        let end = Instant::now() + Duration::from_secs(4);
        let mut rounds = 0;
        while Instant::now() < end {
            let mut forged = Vec::new();
            for offset in (0..size).step_by(32 << 10) {
                let len = (size - offset).min(32 << 10) as usize;
                forged.push((topics::chunk_data("victim"), ChunkReply::data(sha, offset, size, vec![0; len]).to_bytes(), false));
                forged.push((topics::chunk_data("victim"), ChunkReply::unavailable(sha, offset, "busy").to_bytes(), false));
            }
            mqtt_session(forger_port, "e2e-forger", FLEET_USER, FLEET_PASSWORD, &[], &forged, Duration::from_millis(100));
            rounds += 1;
        }
        rounds
    });
    let s = rollout(&fleet, "bc@1.1.0", "pi4");
    let rounds = forger.join().expect("forger");
    assert!(rounds > 0);
    assert_eq!(s["state"], "completed", "forged chunks halted the rollout: {s}\n{}", victim.log_tail());
    wait_serves(&fleet, &victim, "1.1.0");
    eprintln!("7. {rounds} rounds of forged chunk replies: the canary still committed 1.1.0");

    // ---- 8. replay of the older directive
    mqtt_session(
        m.port,
        "e2e-replayer",
        FLEET_USER,
        FLEET_PASSWORD,
        &[],
        &[(topics::desired("victim"), old_directive, true)],
        Duration::from_millis(300),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(victim.version().as_deref(), Some("1.1.0"), "{}", victim.log_tail());
    victim.stop();
    victim.start(&[]);
    // The fleet re-sends the current directive when the device reports an
    // older sequence; either way the device stays on 1.1.0.
    wait_serves(&fleet, &victim, "1.1.0");
    every_process_up(&mut fleet, &mut [&mut victim]);
    eprintln!("8. an older signed directive replayed: refused; the victim stays on 1.1.0 across a restart");
}
