//! One table of topic-ACL cases, run against both brokers a fleet can use:
//! the embedded rumqttd (started through the crate's API, with a registry
//! holding two provisioned devices) and a real mosquitto with the shipped
//! `fleet-server/mosquitto/acl`. The policy is in `src/acl.rs`.
//!
//! Everything is observed by delivery: what the fleet's own client (or the
//! device) receives within a bounded wait. The brokers deal with an
//! offender differently (the embedded one closes its connection, mosquitto
//! drops the packet or refuses the subscription), and neither may deliver.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::free_port;
use outpost_fleet::broker::{self, EmbeddedSettings};
use outpost_fleet::registry::Registry;
use outpost_runtime::protocol::topics;
use rumqttc::{Client, Connection, Event, LastWill, MqttOptions, Packet, QoS};

const A: &str = "pi-a";
const B: &str = "pi-b";
const A_PASSWORD: &str = "password-of-pi-a-0123";
const B_PASSWORD: &str = "password-of-pi-b-0123";
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(700);

/// Who publishes a probe in a subscribe case.
#[derive(Clone, Copy, Debug)]
enum By {
    Fleet,
    B,
}

#[derive(Clone, Debug)]
enum Action {
    /// A publishes (retained or not); does the fleet's `#` subscriber get it?
    Publish { topic: String, retain: bool },
    /// A connects with this will and drops; does the fleet get the will?
    Will { topic: String },
    /// A subscribes to `filter`, then `by` publishes on `probe`; does A get it?
    Subscribe { filter: String, by: By, probe: String },
}

struct Case {
    action: Action,
    delivered: bool,
}

fn publish(topic: String, retain: bool, delivered: bool) -> Case {
    Case { action: Action::Publish { topic, retain }, delivered }
}

fn subscribe(filter: &str, by: By, probe: String, delivered: bool) -> Case {
    Case { action: Action::Subscribe { filter: filter.into(), by, probe }, delivered }
}

/// THE table: device A's attempts, and whether anything may come of them.
fn cases() -> Vec<Case> {
    vec![
        // A writes on others' topics: nothing reaches the fleet.
        publish(topics::desired(B), true, false),
        publish(topics::state(B), true, false),
        publish(topics::telemetry(B), false, false),
        publish(topics::chunk_request(B), false, false),
        publish(topics::chunk_data(B), false, false),
        publish("outpost/v1/fleet/alerts".into(), false, false),
        publish("outpost/v1/fleet/summary".into(), true, false),
        // …nor on its own downlink (only the fleet writes directives and chunks).
        publish(topics::desired(A), true, false),
        publish(topics::chunk_data(A), false, false),
        // A's own uplink arrives.
        publish(topics::state(A), true, true),
        publish(topics::telemetry(A), false, true),
        publish(topics::sketch(A), false, true),
        publish(topics::chunk_request(A), false, true),
        // A will on B's state never fires; on its own, it does.
        Case { action: Action::Will { topic: topics::state(B) }, delivered: false },
        Case { action: Action::Will { topic: topics::state(A) }, delivered: true },
        // A's wildcards reach none of B's directive, state or chunks, nor the fleet's topics.
        subscribe("outpost/v1/#", By::Fleet, topics::desired(B), false),
        subscribe("outpost/v1/#", By::B, topics::state(B), false),
        subscribe("outpost/v1/#", By::Fleet, topics::chunk_data(B), false),
        subscribe("#", By::Fleet, topics::chunk_data(B), false),
        subscribe("outpost/v1/devices/+/desired", By::Fleet, topics::desired(B), false),
        subscribe("outpost/v1/devices/+/state", By::B, topics::state(B), false),
        subscribe(&topics::desired(B), By::Fleet, topics::desired(B), false),
        subscribe(&topics::chunk_data(B), By::Fleet, topics::chunk_data(B), false),
        subscribe("outpost/v1/fleet/#", By::Fleet, "outpost/v1/fleet/alerts".into(), false),
        subscribe("#", By::Fleet, "outpost/v1/fleet/alerts".into(), false),
        // A wildcard under its own id does not let it read its uplink (the
        // embedded broker refuses the filter outright, exact topics only;
        // mosquitto grants it and checks each message against `read`).
        subscribe(&format!("outpost/v1/devices/{A}/#"), By::Fleet, topics::state(A), false),
        // A receives its own directive and chunk replies.
        subscribe(&topics::desired(A), By::Fleet, topics::desired(A), true),
        subscribe(&topics::chunk_data(A), By::Fleet, topics::chunk_data(A), true),
    ]
}

/// A broker under test: where it listens and the fleet's password on it.
struct Target {
    name: &'static str,
    port: u16,
    fleet_password: String,
}

fn options(port: u16, id: &str, password: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(id, password);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// Polls until `until` says stop, the connection fails, or `timeout`.
/// Returns false when the connection failed (or was refused).
fn drive(conn: &mut Connection, timeout: Duration, mut until: impl FnMut(&Event) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match conn.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(Ok(e)) => {
                if until(&e) {
                    return true;
                }
            }
            // Failed: never poll again, or rumqttc would reconnect.
            Ok(Err(_)) => return false,
            Err(_) => {}
        }
    }
    true
}

fn connected(conn: &mut Connection) -> bool {
    let mut ok = false;
    drive(conn, Duration::from_secs(5), |e| {
        ok = matches!(e, Event::Incoming(Packet::ConnAck(a)) if a.code == rumqttc::ConnectReturnCode::Success);
        matches!(e, Event::Incoming(Packet::ConnAck(_)))
    }) && ok
}

/// `(topic, payload)` of every publish a client received.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A client that records every publish it receives, on its own thread.
struct Observer {
    client: Client,
    seen: Seen,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    fn start(port: u16, id: &str, password: &str, filter: &str) -> Observer {
        let (client, mut conn) = Client::new(options(port, id, password), 1000);
        assert!(connected(&mut conn), "{id} connects");
        client.subscribe(filter, QoS::AtLeastOnce).expect("subscribe");
        assert!(
            drive(&mut conn, Duration::from_secs(5), |e| matches!(e, Event::Incoming(Packet::SubAck(_)))),
            "{id} subscribes to {filter}"
        );
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::SeqCst) {
                match conn.recv_timeout(Duration::from_millis(100)) {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        s.lock().expect("lock").push((p.topic.clone(), p.payload.to_vec()));
                    }
                    // Never poll again after a failure: rumqttc would reconnect.
                    Ok(Err(_)) => break,
                    _ => {}
                }
            }
        });
        Observer { client, seen, stop, thread: Some(thread) }
    }

    fn got(&self, topic: &str, payload: &[u8]) -> bool {
        self.seen.lock().expect("lock").iter().any(|(t, p)| t == topic && p == payload)
    }

    fn wait_for(&self, topic: &str, payload: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.got(topic, payload) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.got(topic, payload)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Publishes with QoS 1 from a short-lived connection and waits for the ack.
fn publish_once(port: u16, id: &str, password: &str, topic: &str, retain: bool, payload: &[u8]) {
    let (client, mut conn) = Client::new(options(port, id, password), 10);
    assert!(connected(&mut conn), "{id} connects");
    client.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).expect("publish");
    assert!(drive(&mut conn, Duration::from_secs(5), |e| matches!(e, Event::Incoming(Packet::PubAck(_)))), "{id} → {topic} acked");
    let _ = client.disconnect();
    drive(&mut conn, Duration::from_secs(1), |_| false);
}

/// Runs every case of the table against `target`; returns the cases whose
/// outcome differed from the table, described.
fn run(target: &Target) -> Vec<String> {
    let fleet_pw = target.fleet_password.as_str();
    let port = target.port;
    let observer = Observer::start(port, broker::FLEET_CLIENT_ID, fleet_pw, "#");
    let mut wrong = Vec::new();
    let mut expect = |what: String, want: bool, got: bool| {
        if want != got {
            wrong.push(format!("{}: {what}: expected {}, but it was {}", target.name, verdict(want), verdict(got)));
        }
    };
    let cases = cases();

    // Publishes and wills, each from a fresh connection of A; then one
    // bounded wait for what reached the fleet.
    let mut sent = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let payload = format!("case-{i}").into_bytes();
        match &case.action {
            Action::Publish { topic, retain } => {
                let (client, mut conn) = Client::new(options(port, A, A_PASSWORD), 10);
                assert!(connected(&mut conn), "{}: A connects", target.name);
                client.publish(topic.as_str(), QoS::AtLeastOnce, *retain, payload.clone()).expect("publish");
                // The embedded broker closes the connection, mosquitto acks and drops: either ends this.
                drive(&mut conn, Duration::from_secs(3), |e| matches!(e, Event::Incoming(Packet::PubAck(_))));
                let _ = client.disconnect();
                drive(&mut conn, Duration::from_secs(1), |_| false);
                sent.push((format!("A publishes on {topic} (retain {retain})"), topic.clone(), payload, case.delivered));
            }
            Action::Will { topic } => {
                let mut o = options(port, A, A_PASSWORD);
                o.set_last_will(LastWill::new(topic.as_str(), payload.clone(), QoS::AtLeastOnce, false));
                let (client, mut conn) = Client::new(o, 10);
                let ok = connected(&mut conn);
                // Dropping the connection without DISCONNECT fires the will.
                drop(conn);
                drop(client);
                sent.push((format!("A's will on {topic} (connected: {ok})"), topic.clone(), payload, case.delivered));
            }
            Action::Subscribe { .. } => {}
        }
    }
    for (what, topic, payload, want) in &sent {
        let got = observer.wait_for(topic, payload, if *want { Duration::from_secs(5) } else { Duration::ZERO });
        expect(what.clone(), *want, got);
    }
    std::thread::sleep(QUIET);
    for (what, topic, payload, want) in &sent {
        if !want {
            expect(format!("{what} (after waiting)"), false, observer.got(topic, payload));
        }
    }

    // Nothing A sent was retained where the fleet or B would find it later:
    // a fresh subscriber to B's and the fleet's topics gets only what the
    // fleet itself retained.
    // (One session per client id: the first observer goes before the
    // fleet's id connects again.)
    drop(observer);
    publish_once(port, broker::FLEET_CLIENT_ID, fleet_pw, &topics::desired(B), true, b"fleet-directive");
    let late_fleet = Observer::start(port, broker::FLEET_CLIENT_ID, fleet_pw, "#");
    expect("the fleet's own retained directive for B".into(), true, late_fleet.wait_for(&topics::desired(B), b"fleet-directive", Duration::from_secs(5)));
    std::thread::sleep(QUIET);
    for (i, case) in cases.iter().enumerate() {
        if let (Action::Publish { topic, retain: true }, false) = (&case.action, case.delivered) {
            let junk = format!("case-{i}").into_bytes();
            expect(format!("A's retained junk on {topic}, to a later subscriber"), false, late_fleet.got(topic, &junk));
        }
    }
    drop(late_fleet);

    // Subscriptions: A subscribes, then the fleet (or B) publishes a probe.
    for (i, case) in cases.iter().enumerate() {
        let Action::Subscribe { filter, by, probe } = &case.action else { continue };
        let payload = format!("probe-{i}").into_bytes();
        let (client, mut conn) = Client::new(options(port, A, A_PASSWORD), 100);
        assert!(connected(&mut conn), "{}: A connects", target.name);
        client.subscribe(filter.as_str(), QoS::AtLeastOnce).expect("subscribe");
        let alive = drive(&mut conn, Duration::from_secs(3), |e| matches!(e, Event::Incoming(Packet::SubAck(_))));
        let (id, pw) = match by {
            By::Fleet => (broker::FLEET_CLIENT_ID, fleet_pw),
            By::B => (B, B_PASSWORD),
        };
        // Not retained: A must get it (or not) through its subscription.
        publish_once(port, id, pw, probe, false, &payload);
        let mut got = false;
        if alive {
            drive(&mut conn, if case.delivered { Duration::from_secs(5) } else { QUIET }, |e| {
                got |= matches!(e, Event::Incoming(Packet::Publish(p)) if p.topic == *probe && p.payload[..] == payload[..]);
                got
            });
        }
        expect(format!("A subscribed to {filter:?} receives {by:?}'s message on {probe}"), case.delivered, got);
        let _ = client.disconnect();
        drive(&mut conn, Duration::from_millis(300), |_| false);
    }
    wrong
}

fn verdict(delivered: bool) -> &'static str {
    if delivered {
        "delivered"
    } else {
        "not delivered"
    }
}

fn registry_with_two_devices(dir: &std::path::Path) -> Arc<Registry> {
    let registry = Arc::new(Registry::open(&dir.join("registry.sqlite")).expect("registry"));
    registry.add_device(A, &[], A_PASSWORD, &[1; 32]).expect("add A");
    registry.add_device(B, &[], B_PASSWORD, &[2; 32]).expect("add B");
    registry
}

/// The embedded broker's settings for these tests: loopback, small limits.
fn embedded_settings(port: u16, tls: Option<broker::TlsFiles>) -> EmbeddedSettings {
    EmbeddedSettings {
        listen: format!("127.0.0.1:{port}").parse().expect("addr"),
        max_connections: 100,
        max_payload_size: 1 << 20,
        fleet_filters: Vec::new(),
        tls,
        dashboard_password: None,
    }
}

#[test]
fn the_embedded_broker_enforces_the_acl_table() {
    let dir = tempfile::tempdir().expect("tmp");
    let settings = embedded_settings(free_port(), None);
    let b = broker::start_embedded(settings, registry_with_two_devices(dir.path())).expect("broker");
    let wrong = run(&Target { name: "embedded", port: b.listen.port(), fleet_password: b.fleet.password.clone() });
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn mosquitto_with_the_shipped_acl_enforces_the_same_table() {
    let dir = tempfile::tempdir().expect("tmp");
    let fleet_password = "fleet-password-0123456789";
    let mut m = Mosquitto::start(dir.path(), fleet_password).expect("mosquitto is installed (scripts/setup.sh installs it)");
    m.add_user(A, A_PASSWORD);
    m.add_user(B, B_PASSWORD);
    m.reload();
    let wrong = run(&Target { name: "mosquitto", port: m.port, fleet_password: fleet_password.into() });
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_revoked_device_loses_its_session_at_its_next_ping() {
    let dir = tempfile::tempdir().expect("tmp");
    let settings = embedded_settings(free_port(), None);
    let b = broker::start_embedded(settings, registry_with_two_devices(dir.path())).expect("broker");
    let port = b.listen.port();
    let mut o = options(port, A, A_PASSWORD);
    o.set_keep_alive(Duration::from_secs(1));
    let (_client, mut conn) = Client::new(o, 10);
    assert!(connected(&mut conn));
    // Pings flow and the session lives while A is provisioned.
    let mut pings = 0;
    assert!(drive(&mut conn, Duration::from_millis(2500), |e| {
        pings += usize::from(matches!(e, Event::Incoming(Packet::PingResp)));
        false
    }));
    assert!(pings >= 1, "A pinged and was answered");
    b.revoke(A);
    let started = Instant::now();
    // The next ping (within 1 s) is refused: the connection ends.
    assert!(!drive(&mut conn, Duration::from_secs(5), |_| false), "the revoked device's session is closed");
    assert!(started.elapsed() < Duration::from_secs(3), "within one keep-alive: {:?}", started.elapsed());
    let (_c, mut again) = Client::new(options(port, A, A_PASSWORD), 10);
    assert!(!connected(&mut again), "and it cannot connect again");
    // Re-provisioning (which calls forget) lets the id in again.
    b.auth.forget(A);
    let (_c, mut again) = Client::new(options(port, A, A_PASSWORD), 10);
    assert!(connected(&mut again), "re-provisioned, it connects");
}

#[test]
fn the_embedded_broker_lets_devices_use_application_topics() {
    // The agent's streaming mode: its inputs and results outside outpost/.
    // (mosquitto needs lines of the operator's own for these: see the acl file.)
    let dir = tempfile::tempdir().expect("tmp");
    let settings = embedded_settings(free_port(), None);
    let b = broker::start_embedded(settings, registry_with_two_devices(dir.path())).expect("broker");
    let port = b.listen.port();
    let a = Observer::start(port, A, A_PASSWORD, "plant/+/sensors");
    publish_once(port, B, B_PASSWORD, "plant/line-1/sensors", false, b"21.5");
    assert!(a.wait_for("plant/line-1/sensors", b"21.5", Duration::from_secs(5)), "A reads an application topic B writes");
    let seen: HashSet<String> = a.seen.lock().expect("lock").iter().map(|(t, _)| t.clone()).collect();
    assert!(seen.iter().all(|t| !t.starts_with("outpost/")), "{seen:?}");
}

/// A test CA and a server certificate for `localhost`/127.0.0.1 it signed
/// (rustls refuses a self-signed CA certificate as a server's), made with
/// the openssl command: (ca.pem, cert.pem, key.pem).
fn test_certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(&[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=outpost-test-ca"]].concat());
    openssl(&[&["req"][..], &ec, &["-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(&[
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem", "-days", "2",
        "-extfile", "leaf.ext",
    ]);
    (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"))
}

#[test]
fn the_embedded_broker_serves_tls_to_devices_and_keeps_the_acl() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca, cert, key) = test_certificates(dir.path());
    let public_port = free_port();
    let settings = embedded_settings(public_port, Some(broker::TlsFiles { cert, key }));
    let b = broker::start_embedded(settings, registry_with_two_devices(dir.path())).expect("broker");
    assert_ne!(b.listen.port(), public_port, "the fleet's own client dials a loopback port of its own");

    // A client that opens a TCP connection and never starts TLS does not
    // hold up anyone else's handshake.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", public_port)).expect("tcp");

    // A device connects exactly as the agent does (its mqtts options, the CA pinned).
    let device_key = dir.path().join("device.key");
    let root = dir.path().join("root.pub");
    outpost_runtime::bundle::SecretKey::from_seed([5; 32]).write_file(&device_key, "test device").expect("key");
    outpost_runtime::bundle::SecretKey::from_seed([6; 32]).public_key().write_file(&root, "test root").expect("root");
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "device_id = \"{A}\"\nbroker = \"mqtts://localhost:{public_port}\"\nusername = \"{A}\"\npassword = \"{A_PASSWORD}\"\n\
             ca_file = {ca:?}\ntrust_root = {root:?}\ndevice_key = {device_key:?}\nstate_dir = {state:?}\n",
            state = dir.path().join("state"),
        ),
    )
    .expect("agent.toml");
    let config = outpost_agent::config::AgentConfig::load(Some(&agent_toml), |_| None).expect("agent config");
    let agent_options = outpost_agent::link::mqtt_options(&config, None).expect("options");
    let (client, mut conn) = Client::new(agent_options, 10);
    assert!(connected(&mut conn), "the device connects over TLS");
    client.subscribe(topics::desired(A), QoS::AtLeastOnce).expect("subscribe");
    assert!(drive(&mut conn, Duration::from_secs(5), |e| matches!(e, Event::Incoming(Packet::SubAck(_)))));
    publish_once(b.listen.port(), broker::FLEET_CLIENT_ID, &b.fleet.password, &topics::desired(A), false, b"directive");
    let mut got = false;
    drive(&mut conn, Duration::from_secs(5), |e| {
        got = matches!(e, Event::Incoming(Packet::Publish(p)) if p.payload[..] == b"directive"[..]);
        got
    });
    assert!(got, "the fleet's directive reaches the device over TLS");
    // The ACL holds over TLS too: a wildcard closes the connection.
    client.subscribe("outpost/v1/#", QoS::AtLeastOnce).expect("subscribe");
    assert!(!drive(&mut conn, Duration::from_secs(5), |_| false), "closed");

    // Plain MQTT on the TLS port gets nowhere; a device on the fleet's own
    // plaintext port is refused.
    let (_c, mut plain) = Client::new(options(public_port, A, A_PASSWORD), 10);
    assert!(!connected(&mut plain), "no plaintext MQTT on the TLS port");
    let (_c, mut side) = Client::new(options(b.listen.port(), A, A_PASSWORD), 10);
    assert!(!connected(&mut side), "the fleet's port admits only the fleet");
}
