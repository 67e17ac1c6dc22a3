//! A device's life as the fleet sees it, against a real server and its
//! embedded broker: decommissioning and provisioning again, replays after
//! a restart, the signed will, directives re-sent to a device behind, and
//! per-device rate limits.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outpost_runtime::bundle::SecretKey;
use outpost_runtime::protocol::{
    topics, DeviceSigned, DeviceState, DeviceWill, ModelRef, Status, Telemetry, TELEMETRY_FORMAT,
};
use rumqttc::QoS;

fn state(status: Status, directive_sequence: u64) -> DeviceState {
    let mut s = DeviceState::new(status);
    s.model = Some("bc".into());
    s.version = Some("1.0.0".into());
    s.directive_sequence = directive_sequence;
    s
}

fn signed_state(id: &str, counter: u64, key: &SecretKey, status: Status) -> Vec<u8> {
    DeviceSigned::sign(id, counter, &state(status, 0), key).expect("sign").to_bytes()
}

fn telemetry() -> Telemetry {
    let now = outpost_runtime::bundle::unix_now() * 1000;
    Telemetry {
        format: TELEMETRY_FORMAT,
        model: Some(ModelRef { name: "bc".into(), version: "1.0.0".into() }),
        status: Status::Serving,
        committed: true,
        window_start_unix_ms: now - 10_000,
        window_end_unix_ms: now,
        requests: 10,
        input_errors: 0,
        failures: 0,
        rows: 10,
        error_rate: 0.0,
        latency_p50_ms: Some(1.0),
        latency_p99_ms: Some(2.0),
        drift: None,
        memory_rss_bytes: None,
        dropped_while_offline: 0,
        uptime_secs: 1,
    }
}

/// A connected device: its MQTT client, with the connection driven on a
/// thread of its own (incoming publishes are handed over on a channel).
struct Device {
    client: rumqttc::Client,
    incoming: std::sync::mpsc::Receiver<rumqttc::Publish>,
    /// The broker closed the connection.
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Device {
    fn connect(fleet: &Fleet, id: &str, password: &str) -> Device {
        let (client, mut conn) = mqtt(fleet.broker_port, id, id, password);
        wait_connack(&mut conn).expect("the device connects");
        let (tx, incoming) = std::sync::mpsc::channel();
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = closed.clone();
        std::thread::spawn(move || {
            for event in conn.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        Device { client, incoming, closed }
    }

    fn publish(&self, topic: String, bytes: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, bytes).expect("publish");
    }

    /// The next publish on `topic` within `timeout`.
    fn next_on(&self, topic: &str, timeout: Duration) -> Option<rumqttc::Publish> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.incoming.recv_timeout(left) {
                Ok(p) if p.topic == topic => return Some(p),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

fn online(fleet: &Fleet, id: &str) -> serde_json::Value {
    let all = fleet.api().get("/v1/devices").expect("devices");
    all["devices"].as_array().expect("list").iter().find(|d| d["id"] == id).map(|d| d["online"].clone()).unwrap_or_default()
}

fn cli(fleet: &Fleet, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_outpost-fleet"))
        .args(args)
        .env("OUTPOST_SERVER", format!("http://127.0.0.1:{}", fleet.api_port))
        .env("OUTPOST_TOKEN", TOKEN)
        .output()
        .expect("run outpost-fleet")
}

#[test]
fn decommissioned_devices_are_refused_and_provisioning_again_issues_new_keys() {
    let fleet = Fleet::start();
    let old = fleet.provision("pi-7");
    let dev = Device::connect(&fleet, "pi-7", &old.password);
    dev.publish(topics::state("pi-7"), signed_state("pi-7", 5, &old.key, Status::Serving));
    assert!(eventually(|| device(&fleet, "pi-7")["status"] == "serving"), "{}", fleet.log());

    let out = cli(&fleet, &["decommission", "pi-7", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!((answer["decommissioned"].as_bool(), answer["already"].as_bool()), (Some(true), Some(false)), "{answer}");
    let record = device(&fleet, "pi-7");
    assert!(record["decommissioned_at"].is_i64(), "{record}");
    let listed = fleet.api().get("/v1/devices").expect("devices");
    assert!(listed["devices"].as_array().expect("list").iter().all(|d| d["id"] != "pi-7"), "left the fleet: {listed}");
    let audit = fleet.api().get("/v1/audit?limit=5").expect("audit");
    assert!(
        audit["audit"].as_array().expect("audit").iter().any(|e| e["action"] == "decommission" && e["target"] == "pi-7" && e["result"] == "ok"),
        "{audit}"
    );

    // The session open at that moment is closed by the broker (revoked);
    // what it said meanwhile with the old key changed nothing.
    dev.publish(topics::state("pi-7"), signed_state("pi-7", 6, &old.key, Status::Failed));
    assert!(eventually(|| dev.closed.load(std::sync::atomic::Ordering::SeqCst)), "the revoked session is closed");
    assert_eq!(device(&fleet, "pi-7")["status"], "decommissioned");
    // Its credential no longer connects.
    let (_c, mut conn) = mqtt(fleet.broker_port, "pi-7", "pi-7", &old.password);
    assert!(wait_connack(&mut conn).is_err(), "a decommissioned credential must not connect");
    // Twice is fine; an unknown id is 404.
    let again = cli(&fleet, &["decommission", "pi-7"]);
    assert!(again.status.success() && String::from_utf8_lossy(&again.stdout).contains("already"));
    let unknown = cli(&fleet, &["decommission", "nobody"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown device nobody"), "{unknown:?}");

    // Provisioned again: new credential, new key; the old key stays refused.
    let new = fleet.provision("pi-7");
    assert_ne!(new.password, old.password);
    assert_ne!(new.key.key_id(), old.key.key_id());
    let (_c, mut conn) = mqtt(fleet.broker_port, "pi-7", "pi-7", &old.password);
    assert!(wait_connack(&mut conn).is_err(), "the old credential stays refused");
    let dev = Device::connect(&fleet, "pi-7", &new.password);
    let rejected = fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"state\"", "result=\"rejected\""]);
    dev.publish(topics::state("pi-7"), signed_state("pi-7", 100, &old.key, Status::Failed));
    assert!(eventually(|| fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"state\"", "result=\"rejected\""]) > rejected));
    assert!(device(&fleet, "pi-7")["status"].is_null(), "the old key's message changed nothing");
    // The new key from counter 1 (the new agent starts afresh).
    dev.publish(topics::state("pi-7"), signed_state("pi-7", 1, &new.key, Status::Serving));
    assert!(eventually(|| device(&fleet, "pi-7")["status"] == "serving"), "{}", fleet.log());
}

#[test]
fn recorded_messages_are_refused_after_a_restart() {
    let mut fleet = Fleet::start();
    let creds = fleet.provision("rp-1");
    let telemetry_bytes = |counter| DeviceSigned::sign("rp-1", counter, &telemetry(), &creds.key).expect("sign").to_bytes();
    let accepted = |f: &Fleet| f.metric("outpost_fleet_mqtt_messages_total", &["kind=\"telemetry\"", "result=\"accepted\""]);
    let rejected = |f: &Fleet| f.metric("outpost_fleet_mqtt_messages_total", &["kind=\"telemetry\"", "result=\"rejected\""]);

    // Accepted, then the batch flush (every 5 s), then kill -9.
    let recorded = telemetry_bytes(10);
    let dev = Device::connect(&fleet, "rp-1", &creds.password);
    dev.publish(topics::telemetry("rp-1"), recorded.clone());
    assert!(eventually(|| accepted(&fleet) == 1), "{}", fleet.log());
    std::thread::sleep(Duration::from_millis(5_600));
    fleet.restart();
    let dev = Device::connect(&fleet, "rp-1", &creds.password);
    dev.publish(topics::telemetry("rp-1"), recorded);
    assert!(eventually(|| rejected(&fleet) == 1), "the replay after a restart is refused: {}", fleet.log());
    dev.publish(topics::telemetry("rp-1"), telemetry_bytes(11));
    assert!(eventually(|| accepted(&fleet) == 1), "a fresh message is accepted");

    // A clean stop (SIGTERM) writes the floors at once.
    let recorded = telemetry_bytes(12);
    dev.publish(topics::telemetry("rp-1"), recorded.clone());
    assert!(eventually(|| accepted(&fleet) == 2));
    let log = fleet.restart_cleanly();
    assert!(log.contains("wrote the counter floors of"), "{log}");
    let dev = Device::connect(&fleet, "rp-1", &creds.password);
    dev.publish(topics::telemetry("rp-1"), recorded);
    // A state counter below the floor is refused as well (one floor for every kind).
    dev.publish(topics::state("rp-1"), signed_state("rp-1", 11, &creds.key, Status::Failed));
    assert!(eventually(|| rejected(&fleet) == 1), "{}", fleet.log());
    assert!(eventually(|| fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"state\"", "result=\"rejected\""]) == 1));
    assert!(device(&fleet, "rp-1")["status"].is_null());
}

#[test]
fn only_a_signed_will_marks_a_device_offline() {
    let fleet = Fleet::start();
    let creds = fleet.provision("wl-1");
    let dev = Device::connect(&fleet, "wl-1", &creds.password);
    dev.publish(topics::state("wl-1"), signed_state("wl-1", 20, &creds.key, Status::Serving));
    assert!(eventually(|| online(&fleet, "wl-1") == true), "{}", fleet.log());

    // The old unsigned will, and a will signed by another key: refused.
    dev.publish(topics::state("wl-1"), br#"{"status":"offline"}"#.to_vec());
    let forged = DeviceWill::signed("wl-1", 30, &SecretKey::from_seed([9; 32])).expect("sign").to_bytes();
    dev.publish(topics::state("wl-1"), forged);
    assert!(eventually(|| fleet.metric("outpost_fleet_mqtt_messages_total", &["result=\"rejected\""]) >= 2));
    assert_eq!(fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"will\"", "result=\"rejected\""]), 1);
    assert_eq!(online(&fleet, "wl-1"), true, "nothing unsigned changes what the fleet believes");

    // The device's own will (signed at connect, below its later counters).
    let will = DeviceWill::signed("wl-1", 3, &creds.key).expect("sign").to_bytes();
    dev.publish(topics::state("wl-1"), will.clone());
    assert!(eventually(|| online(&fleet, "wl-1") == false), "{}", fleet.log());
    // Back online with its next message; the same will again is a replay.
    dev.publish(topics::state("wl-1"), signed_state("wl-1", 21, &creds.key, Status::Serving));
    assert!(eventually(|| online(&fleet, "wl-1") == true));
    dev.publish(topics::state("wl-1"), will);
    assert!(eventually(|| fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"will\"", "result=\"rejected\""]) == 2));
    assert_eq!(online(&fleet, "wl-1"), true);
    assert_eq!(fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"will\"", "result=\"accepted\""]), 1);
}

#[test]
fn a_device_behind_its_directive_gets_it_again_and_floods_are_dropped() {
    let fleet = Fleet::start();
    fleet.publish_bc("1.0.0");
    let creds = fleet.provision("dr-1");
    let deployed = fleet
        .api()
        .post_json("/v1/deploy", &serde_json::json!({"target": "bc@1.0.0", "devices": ["dr-1"]}))
        .expect("deploy");
    let sequence = deployed["deployed"][0]["sequence"].as_u64().expect("sequence");
    let dev = Device::connect(&fleet, "dr-1", &creds.password);
    dev.client.subscribe(topics::desired("dr-1"), QoS::AtLeastOnce).expect("subscribe");
    let first = dev.next_on(&topics::desired("dr-1"), Duration::from_secs(10)).expect("the retained directive");

    // It refused it (a forgery in its place, say) and says it is still on
    // directive 0: the fleet sends the recorded one again, once.
    let behind = |counter| DeviceSigned::sign("dr-1", counter, &state(Status::Failed, 0), &creds.key).expect("sign").to_bytes();
    dev.publish(topics::state("dr-1"), behind(1));
    let again = dev.next_on(&topics::desired("dr-1"), Duration::from_secs(10)).expect("re-sent");
    assert_eq!(again.payload, first.payload, "the recorded directive, as signed");
    dev.publish(topics::state("dr-1"), behind(2));
    assert!(eventually(|| device(&fleet, "dr-1")["last_counter"] == 2));
    assert!(dev.next_on(&topics::desired("dr-1"), Duration::from_secs(1)).is_none(), "at most once per 30 s");
    assert_eq!(fleet.metric("outpost_fleet_directives_resent_total", &[]), 1);
    // Caught up: nothing to send.
    let current = DeviceSigned::sign("dr-1", 3, &state(Status::Serving, sequence), &creds.key).expect("sign").to_bytes();
    dev.publish(topics::state("dr-1"), current);
    assert!(eventually(|| device(&fleet, "dr-1")["directive_sequence"] == sequence));

    // A flood of states: the first 32 or so are taken, the rest dropped
    // and counted, and another device is not held back.
    for counter in 10..210 {
        dev.client
            .publish(topics::state("dr-1"), QoS::AtMostOnce, false, signed_state("dr-1", counter, &creds.key, Status::Serving))
            .expect("publish");
    }
    let limited = || fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"state\"", "result=\"rate_limited\""]);
    assert!(eventually(|| limited() >= 150), "rate limited: {}", limited());
    let accepted = fleet.metric("outpost_fleet_mqtt_messages_total", &["kind=\"state\"", "result=\"accepted\""]);
    assert!(accepted <= 4 + 40, "accepted {accepted}");
    let other = fleet.provision("dr-2");
    let dev2 = Device::connect(&fleet, "dr-2", &other.password);
    dev2.publish(topics::state("dr-2"), signed_state("dr-2", 1, &other.key, Status::Serving));
    assert!(eventually(|| device(&fleet, "dr-2")["status"] == "serving"));
    assert_eq!(http_get(fleet.api_port, "/ready").expect("ready").0, 200);

    // Decommissioned (DELETE), its retained directive goes: the device
    // provisioned again under the id finds nothing waiting for it.
    let (status, body) = http(fleet.api_port, "DELETE", "/v1/devices/dr-1", Some(&format!("Bearer {TOKEN}")), "").expect("delete");
    assert_eq!(status, 200, "{body}");
    assert!(fleet.api().get("/v1/devices/dr-1").expect("device")["directive"].is_null());
    let renewed = fleet.provision("dr-1");
    let dev = Device::connect(&fleet, "dr-1", &renewed.password);
    dev.client.subscribe(topics::desired("dr-1"), QoS::AtLeastOnce).expect("subscribe");
    let left = dev.next_on(&topics::desired("dr-1"), Duration::from_secs(1));
    assert!(left.as_ref().is_none_or(|p| p.payload.is_empty()), "a directive left for the old device: {left:?}");
}
