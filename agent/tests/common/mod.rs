//! Test harness: a real mosquitto on a free port, a small stand-in for the
//! fleet (keys, bundles, signed directives, chunk serving — with the same
//! protocol and bundle library calls the fleet server uses), and the real
//! `outpost-agent` binary as a child process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::bundle::{
    issue_certificate, write_bundle, write_container, Digest, Manifest, SecretKey, SelfTest, SelfTestVector, Signer,
    Tolerance, MANIFEST_FORMAT,
};
use outpost_runtime::dataset::{read_csv, LabelColumn};
use outpost_runtime::drift::{ReferenceOptions, ReferenceSketch};
use outpost_runtime::model::{LoadOptions, Model, ModelFormat};
use outpost_runtime::protocol::{
    parse_state_payload, topics, ChunkReply, ChunkRequest, DeviceSigned, DeviceState, Directive, Limits, Probation,
    StatePayload,
};
use outpost_runtime::tensor::TensorData;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- broker

/// mosquitto on 127.0.0.1:PORT, anonymous, no persistence. Killed on drop.
pub struct Broker {
    pub port: u16,
    /// A second, TLS listener (`Broker::start_with_tls`): its port and the
    /// CA certificate that signed the broker's certificate.
    pub tls: Option<(u16, PathBuf)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Broker { port: free_port(), tls: None, dir, child: None };
        b.spawn();
        b
    }

    /// Plain listener plus a TLS one, with a CA and a server certificate
    /// for 127.0.0.1 made by `openssl` for this broker alone.
    pub fn start_with_tls() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl must be installed");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=outpost test CA"]);
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
        openssl(&[
            "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "san.ext",
        ]);
        // mosquitto started as root drops to its own user, which must be
        // able to read these (test-only keys).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let ca = dir.path().join("ca.pem");
        let mut b = Broker { port: free_port(), tls: Some((free_port(), ca)), dir, child: None };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let mut text = format!("per_listener_settings false\nallow_anonymous true\npersistence false\nlistener {} 127.0.0.1\n", self.port);
        if let Some((port, _)) = &self.tls {
            let d = self.dir.path();
            text.push_str(&format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
                d.join("ca.pem").display(),
                d.join("server.pem").display(),
                d.join("server.key").display()
            ));
        }
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install mosquitto)");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again on the same port. Retained messages are lost
    /// (no persistence), as with a broker that lost its disk.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- keys and bundles

pub struct Keys {
    pub dir: tempfile::TempDir,
    pub root: SecretKey,
    pub signer: Signer,
    pub device: SecretKey,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let root = SecretKey::generate().unwrap();
        let online = SecretKey::generate().unwrap();
        let now = outpost_runtime::bundle::unix_now();
        let cert = issue_certificate(&root, &online.public_key(), now, now - 60, 86_400).unwrap();
        let signer = Signer::new(online, cert).unwrap();
        let device = SecretKey::generate().unwrap();
        root.public_key().write_file(dir.path().join("root.pub"), "root").unwrap();
        device.write_file(dir.path().join("device.key"), "device").unwrap();
        Keys { dir, root, signer, device }
    }

    pub fn root_pub(&self) -> PathBuf {
        self.dir.path().join("root.pub")
    }

    pub fn device_key(&self) -> PathBuf {
        self.dir.path().join("device.key")
    }
}

/// A bundle file in memory and what a directive names it by.
#[derive(Clone)]
pub struct Bundle {
    pub name: String,
    pub version: String,
    pub bytes: Arc<Vec<u8>>,
    pub sha256: Digest,
    pub manifest_sha256: Digest,
}

/// The manifest `outpost-fleet bundle` would make (signature, reference
/// sketch of the training features, three self-test rows), unsigned.
pub fn manifest_for(model_file: &str, name: &str, version: &str, sequence: u64) -> (Manifest, Vec<u8>) {
    let path = workspace().join("fixtures").join(model_file);
    let bytes = std::fs::read(&path).unwrap();
    let model = Model::from_bytes(&bytes, ModelFormat::Onnx, &LoadOptions::default()).unwrap();
    let data = read_csv(workspace().join("fixtures/data/bc_train.csv"), LabelColumn::Last).unwrap();
    let reference =
        ReferenceSketch::from_samples(&data.feature_names, &data.rows, &[], &ReferenceOptions::default()).unwrap();
    let n = data.rows.len();
    let vectors = (0..3)
        .map(|i| {
            let row = data.rows[i * n / 3].clone();
            let inputs = vec![TensorData::f32(vec![1, row.len()], row).unwrap()];
            let expected = model.run(inputs.clone()).unwrap();
            SelfTestVector { inputs, expected }
        })
        .collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        version: version.into(),
        sequence,
        model_format: ModelFormat::Onnx.into(),
        model_sha256: Digest::of(&bytes),
        model_size: bytes.len() as u64,
        io: model.signature().clone(),
        reference,
        self_test: SelfTest { tolerance: Tolerance::default(), vectors },
        issued_at: outpost_runtime::bundle::unix_now(),
    };
    (manifest, bytes)
}

pub fn bundle_from(signer: &Signer, manifest: &Manifest, model: &[u8]) -> Bundle {
    let signed = signer.sign(manifest).unwrap();
    let mut out = Vec::new();
    write_bundle(&mut out, &signed, &[signer.certificate().clone()], model).unwrap();
    Bundle {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: Digest::of(&out),
        bytes: Arc::new(out),
        manifest_sha256: signed.payload_digest(),
    }
}

pub fn make_bundle(keys: &Keys, model_file: &str, name: &str, version: &str, sequence: u64) -> Bundle {
    let (manifest, model) = manifest_for(model_file, name, version, sequence);
    bundle_from(&keys.signer, &manifest, &model)
}

/// A bundle whose model bytes differ from what its signed manifest says.
pub fn tampered_bundle(_keys: &Keys, good: &Bundle) -> Bundle {
    let mut bytes = (*good.bytes).clone();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff; // inside the model
    Bundle { bytes: Arc::new(bytes.clone()), sha256: Digest::of(&bytes), ..good.clone() }
}

/// A bundle framed without checks (e.g. a model that is not a model).
pub fn raw_bundle(keys: &Keys, manifest: &Manifest, model: &[u8]) -> Bundle {
    let signed = keys.signer.sign(manifest).unwrap();
    let mut out = Vec::new();
    write_container(&mut out, &signed, &[keys.signer.certificate().clone()], model).unwrap();
    Bundle {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: Digest::of(&out),
        bytes: Arc::new(out),
        manifest_sha256: signed.payload_digest(),
    }
}

pub fn directive(device: &str, seq: u64, b: &Bundle, probation_secs: u32) -> Directive {
    let mut d = Directive::new(device, seq, &b.name, &b.version, b.sha256, b.bytes.len() as u64, b.manifest_sha256);
    d.probation = Some(Probation { duration_secs: probation_secs, ..Probation::default() });
    d
}

// ---------------------------------------------------------------- the fleet's part

#[derive(Default)]
pub struct FleetStats {
    /// (offset, time) of every chunk request served, in order.
    pub served: Mutex<Vec<(u64, Instant)>>,
    pub requests: AtomicUsize,
}

/// Publishes directives and serves chunks, like the fleet server would.
pub struct Fleet {
    client: Client,
    pub bundles: Arc<Mutex<HashMap<Digest, Arc<Vec<u8>>>>>,
    pub stats: Arc<FleetStats>,
    /// Latest verified state per device.
    pub states: Arc<Mutex<HashMap<String, DeviceState>>>,
    pub offline_seen: Arc<AtomicUsize>,
    /// Signed states accepted.
    pub states_seen: Arc<AtomicUsize>,
    /// Counters of the verified wills seen on the state topic, in order
    /// (the broker's and the agent's goodbye).
    pub wills: Arc<Mutex<Vec<u64>>>,
    /// Bad will payloads seen (unsigned, forged, replayed).
    pub wills_refused: Arc<AtomicUsize>,
    pub telemetry: Arc<Mutex<Vec<serde_json::Value>>>,
    pub sketches: Arc<AtomicUsize>,
    /// Delay before each chunk reply (to make downloads slow enough to interrupt).
    pub chunk_delay_ms: Arc<AtomicU64>,
    /// While false, chunk requests are dropped.
    pub serving: Arc<AtomicBool>,
}

impl Fleet {
    pub fn start(broker_port: u16, device_id: &str, device_key: outpost_runtime::bundle::PublicKey) -> Fleet {
        let mut options = MqttOptions::new(format!("test-fleet-{}", free_port()), "127.0.0.1", broker_port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 1024);
        let fleet = Fleet {
            client: client.clone(),
            bundles: Default::default(),
            stats: Default::default(),
            states: Default::default(),
            offline_seen: Default::default(),
            states_seen: Default::default(),
            wills: Default::default(),
            wills_refused: Default::default(),
            telemetry: Default::default(),
            sketches: Default::default(),
            chunk_delay_ms: Default::default(),
            serving: Arc::new(AtomicBool::new(true)),
        };
        let (bundles, stats, states, offline, telemetry, sketches, delay, serving) = (
            fleet.bundles.clone(),
            fleet.stats.clone(),
            fleet.states.clone(),
            fleet.offline_seen.clone(),
            fleet.telemetry.clone(),
            fleet.sketches.clone(),
            fleet.chunk_delay_ms.clone(),
            fleet.serving.clone(),
        );
        let (wills, wills_refused, states_seen) =
            (fleet.wills.clone(), fleet.wills_refused.clone(), fleet.states_seen.clone());
        let device_id = device_id.to_string();
        std::thread::spawn(move || {
            let limits = Limits::default();
            let mut last_counter: HashMap<&'static str, u64> = HashMap::new();
            for event in connection.iter() {
                let p = match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for kind in [topics::Kind::State, topics::Kind::ChunkRequest, topics::Kind::Telemetry, topics::Kind::Sketch] {
                            let _ = client.try_subscribe(topics::all(kind), QoS::AtLeastOnce);
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let Some((id, kind)) = topics::parse(&p.topic) else { continue };
                if id != device_id {
                    continue;
                }
                match kind {
                    topics::Kind::State => match parse_state_payload(&p.payload, &limits) {
                        Ok(StatePayload::Signed(m)) => {
                            let last = last_counter.get("state").copied();
                            if let Ok(s) = m.open(id, &device_key, last, &limits) {
                                last_counter.insert("state", m.counter());
                                states.lock().unwrap().insert(id.to_string(), s);
                                states_seen.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        // Believed only signed, and above the last will counter.
                        Ok(StatePayload::Will(m)) => {
                            let last = last_counter.get("will").copied();
                            if m.open(id, &device_key, last, &limits).is_ok() {
                                last_counter.insert("will", m.counter());
                                wills.lock().unwrap().push(m.counter());
                                offline.fetch_add(1, Ordering::SeqCst);
                            } else {
                                wills_refused.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        _ => {}
                    },
                    topics::Kind::Telemetry => {
                        if let Ok(m) = DeviceSigned::<outpost_runtime::protocol::Telemetry>::from_bytes(&p.payload, &limits) {
                            if m.open(id, &device_key, None, &limits).is_ok() {
                                telemetry.lock().unwrap().push(serde_json::from_slice(&p.payload).unwrap());
                            }
                        }
                    }
                    topics::Kind::Sketch => {
                        if let Ok(m) = DeviceSigned::<outpost_runtime::protocol::SketchMessage>::from_bytes(&p.payload, &limits) {
                            if m.open(id, &device_key, None, &limits).is_ok() {
                                sketches.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    topics::Kind::ChunkRequest => {
                        if !serving.load(Ordering::SeqCst) {
                            continue;
                        }
                        let Ok(m) = DeviceSigned::<ChunkRequest>::from_bytes(&p.payload, &limits) else { continue };
                        let last = last_counter.get("chunk").copied();
                        let Ok(req) = m.open(id, &device_key, last, &limits) else { continue };
                        last_counter.insert("chunk", m.counter());
                        stats.requests.fetch_add(1, Ordering::SeqCst);
                        let d = delay.load(Ordering::SeqCst);
                        if d > 0 {
                            std::thread::sleep(Duration::from_millis(d));
                        }
                        let bundle = bundles.lock().unwrap().get(&req.bundle_sha256).cloned();
                        let reply = match bundle {
                            Some(b) => {
                                let start = (req.offset as usize).min(b.len());
                                let end = (start + req.len as usize).min(b.len());
                                stats.served.lock().unwrap().push((req.offset, Instant::now()));
                                ChunkReply::data(req.bundle_sha256, req.offset, b.len() as u64, b[start..end].to_vec())
                            }
                            None => ChunkReply::unavailable(req.bundle_sha256, req.offset, "unknown bundle"),
                        };
                        let _ = client.publish(topics::chunk_data(id), QoS::AtLeastOnce, false, reply.to_bytes());
                    }
                    _ => {}
                }
            }
        });
        fleet
    }

    pub fn add(&self, b: &Bundle) {
        self.bundles.lock().unwrap().insert(b.sha256, b.bytes.clone());
    }

    /// Seals and publishes `d` retained on the device's desired topic.
    pub fn publish(&self, signer: &Signer, d: &Directive) -> Vec<u8> {
        let bytes = signer.seal(d).unwrap();
        self.publish_raw(&d.device_id, bytes.clone());
        bytes
    }

    pub fn publish_raw(&self, device: &str, bytes: Vec<u8>) {
        self.client.publish(topics::desired(device), QoS::AtLeastOnce, true, bytes).unwrap();
    }

    pub fn state(&self, device: &str) -> Option<DeviceState> {
        self.states.lock().unwrap().get(device).cloned()
    }

    pub fn wait_state(&self, device: &str, what: &str, timeout: Duration, f: impl Fn(&DeviceState) -> bool) -> DeviceState {
        let start = Instant::now();
        loop {
            if let Some(s) = self.state(device) {
                if f(&s) {
                    return s;
                }
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for state: {what}; last state {:#?}", self.state(device));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------- an attacker

/// A client that is not the fleet, answering the device's chunk requests
/// before the fleet does: chunk requests are signed but not secret, and
/// replies are unsigned, so anyone who may publish on the device's reply
/// topic can do this (the broker ACL is another wall, not this one).
/// `answer` sees each request (body decoded, signature not needed) and
/// returns the forged reply to send, if any.
pub struct Forger {
    pub forged: Arc<AtomicUsize>,
    client: Client,
    stop: Arc<AtomicBool>,
}

impl Forger {
    pub fn start(
        broker_port: u16,
        device_id: &str,
        mut answer: impl FnMut(&ChunkRequest) -> Option<ChunkReply> + Send + 'static,
    ) -> Forger {
        let mut options = MqttOptions::new(format!("forger-{}", free_port()), "127.0.0.1", broker_port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 1024);
        let forged = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, publisher, device, stopped) = (forged.clone(), client.clone(), device_id.to_string(), stop.clone());
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let limits = Limits::default();
            for event in connection.iter() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let p = match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = publisher.try_subscribe(topics::chunk_request(&device), QoS::AtLeastOnce);
                        continue;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let Ok(m) = DeviceSigned::<ChunkRequest>::from_bytes(&p.payload, &limits) else { continue };
                let Ok(req) = m.decode_unverified(&limits) else { continue };
                if let Some(reply) = answer(&req) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = publisher.publish(topics::chunk_data(&device), QoS::AtLeastOnce, false, reply.to_bytes());
                }
            }
        });
        subscribed.recv_timeout(Duration::from_secs(10)).expect("the forger subscribed");
        Forger { forged, client, stop }
    }
}

impl Drop for Forger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
    }
}

// ---------------------------------------------------------------- the agent

pub struct AgentProc {
    pub child: Child,
    pub port: u16,
    pub state_dir: PathBuf,
}

pub struct AgentSetup {
    pub device_id: String,
    pub broker_url: String,
    pub root_pub: PathBuf,
    pub device_key: PathBuf,
    pub state_dir: PathBuf,
    pub port: u16,
    pub extra_env: Vec<(String, String)>,
}

impl AgentSetup {
    pub fn new(device_id: &str, broker: &Broker, keys: &Keys, state_dir: &Path) -> AgentSetup {
        AgentSetup {
            device_id: device_id.into(),
            broker_url: broker.url(),
            root_pub: keys.root_pub(),
            device_key: keys.device_key(),
            state_dir: state_dir.to_path_buf(),
            port: free_port(),
            extra_env: vec![],
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> AgentSetup {
        self.extra_env.push((k.into(), v.into()));
        self
    }

    pub fn spawn(&self) -> AgentProc {
        self.spawn_with(&[])
    }

    pub fn spawn_with(&self, env: &[(&str, &str)]) -> AgentProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.parent().unwrap().join(format!("{}-agent.log", self.device_id)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-agent"));
        cmd.arg("run")
            .env("OUTPOST_DEVICE_ID", &self.device_id)
            .env("OUTPOST_BROKER", &self.broker_url)
            .env("OUTPOST_TRUST_ROOT", &self.root_pub)
            .env("OUTPOST_DEVICE_KEY", &self.device_key)
            .env("OUTPOST_STATE_DIR", &self.state_dir)
            .env("OUTPOST_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("OUTPOST_TELEMETRY_INTERVAL_SECS", "1")
            .env("OUTPOST_RECONNECT_MIN_MS", "100")
            .env("OUTPOST_RECONNECT_MAX_MS", "1000")
            .env("OUTPOST_CHUNK_TIMEOUT_SECS", "2")
            // Downloads that do not verify are fetched again after 100 ms to
            // 1 s (the defaults are 1 s to 60 s), so refusal tests stay fast.
            .env("OUTPOST_DOWNLOAD_RETRY_MIN_MS", "200")
            .env("OUTPOST_DOWNLOAD_RETRY_MAX_MS", "1000")
            .env("RUST_LOG", "info")
            .env_remove("OUTPOST_TEST_PAUSE_AT")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        AgentProc { child: cmd.spawn().unwrap(), port: self.port, state_dir: self.state_dir.clone() }
    }
}

impl AgentProc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn wait_http(&self) {
        let port = self.port;
        wait_for("the agent's HTTP server", Duration::from_secs(30), || http(port, "GET", "/health", None).is_ok());
    }

    pub fn model_version(&self) -> Option<String> {
        match http(self.port, "GET", "/v1/model", None) {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).ok()?["version"].as_str().map(String::from),
            _ => None,
        }
    }

    pub fn wait_version(&self, version: &str, timeout: Duration) {
        wait_for(&format!("the agent to serve {version}"), timeout, || self.model_version().as_deref() == Some(version));
    }

    /// POST /predict with a real row; Ok(status, body).
    pub fn predict(&self) -> std::io::Result<(u16, String)> {
        http(self.port, "POST", "/predict", Some(&predict_body()))
    }

    pub fn wait_paused(&self, step: &str) {
        let marker = self.state_dir.join(format!("paused-at-{step}"));
        wait_for(&format!("the agent to pause at {step}"), Duration::from_secs(60), || marker.exists());
        std::fs::remove_file(marker).unwrap();
    }

    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what the agent said.
        if std::thread::panicking() {
            let id = self.state_dir.parent().and_then(|p| std::fs::read_dir(p).ok());
            for entry in id.into_iter().flatten().flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("--- {} (last 60 lines)", entry.path().display());
                    for l in &lines[lines.len().saturating_sub(60)..] {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

pub fn predict_body() -> String {
    let data = read_csv(workspace().join("fixtures/data/bc_test.csv"), LabelColumn::Last).unwrap();
    serde_json::json!({ "features": data.rows[0] }).to_string()
}

/// A minimal HTTP/1.1 client (one request per connection).
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {response:?}")))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
