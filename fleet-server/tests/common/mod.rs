//! Test harness: a fleet server process on free ports with fresh keys, and
//! helpers to act as a device.
#![allow(dead_code)]

pub mod mosquitto;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_fleet::client::{ApiClient, ClientError};
use outpost_runtime::bundle::{PublicKey, SecretKey};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token-0123456789abcdef";
/// The embedded broker's read-only `dashboard` identity (`[broker]
/// dashboard_password`): it may read `outpost/v1/fleet/#`, nothing else.
pub const DASHBOARD_PASSWORD: &str = "test-dashboard-password-0123";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A fleet server child process; killed on drop.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub broker_port: u16,
    child: Option<Child>,
    extra_config: String,
}

impl Fleet {
    /// Fresh keys and data, embedded broker.
    pub fn start() -> Fleet {
        Self::start_with("")
    }

    /// Fresh keys and data; `extra` is appended to fleet.toml (e.g. a
    /// `[broker]` table for an external broker).
    pub fn start_with(extra: &str) -> Fleet {
        let dir = tempfile::tempdir().expect("tmp");
        outpost_fleet::keys::keygen(&dir.path().join("keys"), 30).expect("keygen");
        let mut fleet =
            Fleet { dir, api_port: free_port(), broker_port: free_port(), child: None, extra_config: extra.to_string() };
        fleet.spawn();
        fleet
    }

    fn config_text(&self) -> String {
        let broker = if self.extra_config.contains("[broker]") {
            String::new()
        } else {
            format!("[broker]\nlisten = \"127.0.0.1:{}\"\ndashboard_password = \"{DASHBOARD_PASSWORD}\"\n", self.broker_port)
        };
        format!(
            "data_dir = \"data\"\napi_listen = \"127.0.0.1:{}\"\napi_token = \"{TOKEN}\"\nkeys_dir = \"keys\"\n{}\n{broker}",
            self.api_port, self.extra_config
        )
    }

    fn spawn(&mut self) {
        let config = self.dir.path().join("fleet.toml");
        std::fs::write(&config, self.config_text()).expect("config");
        let log = std::fs::File::create(self.dir.path().join("serve.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_outpost-fleet"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost-fleet");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("outpost-fleet exited with {status}: {}", self.log());
                }
            }
            if http_get(self.api_port, "/ready").map(|(s, _)| s == 200).unwrap_or(false) {
                return;
            }
            assert!(Instant::now() < deadline, "fleet server not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Stops the server with SIGTERM (a clean stop), waits for it to exit
    /// (at most 10 s), and starts it again. Returns the stopped server's log.
    pub fn restart_cleanly(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill");
            assert!(status.success());
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().expect("wait").is_none() {
                assert!(Instant::now() < deadline, "no exit on SIGTERM: {}", self.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let log = self.log();
        self.spawn();
        log
    }

    /// The sum of the `/metrics` samples of `name` whose labels contain
    /// every one of `labels` (e.g. `kind="state"`).
    pub fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        let (_, text) = http_get(self.api_port, "/metrics").expect("metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(&format!("http://127.0.0.1:{}", self.api_port), TOKEN).expect("client")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn bundle_files(&self) -> usize {
        std::fs::read_dir(self.data().join("bundles")).map(|d| d.count()).unwrap_or(0)
    }

    /// Uploads three files and publishes; the server's answer or error.
    pub fn publish(&self, model: &Path, version: &str, train: &Path, test: &Path, min: f64) -> Result<Value, ClientError> {
        let api = self.api();
        let mut ids = Vec::new();
        for f in [model, train, test] {
            ids.push(api.upload(f, |_| {})?["upload"].as_str().expect("id").to_string());
        }
        api.post_json(
            "/v1/publish",
            &json!({"name": "bc", "version": version, "model": ids[0], "train_data": ids[1], "test_data": ids[2], "min_accuracy": min}),
        )
    }

    pub fn publish_bc(&self, version: &str) -> Value {
        let f = fixtures();
        self.publish(&f.join("bc_mlp.onnx"), version, &f.join("data/bc_train.csv"), &f.join("data/bc_test.csv"), 0.9)
            .expect("publish")
    }

    /// Provisions a device; returns its parsed agent config.
    pub fn provision(&self, id: &str) -> DeviceCreds {
        let r = self.api().post_json("/v1/devices", &json!({"device_id": id, "tags": ["test"]})).expect("provision");
        DeviceCreds::from_config(r["agent_config"].as_str().expect("config"))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A device's credentials, from its agent config.
pub struct DeviceCreds {
    pub id: String,
    pub password: String,
    pub key: SecretKey,
    pub root: PublicKey,
    pub config_text: String,
}

impl DeviceCreds {
    pub fn from_config(text: &str) -> DeviceCreds {
        let v: toml::Value = toml::from_str(text).expect("toml");
        DeviceCreds {
            id: v["device_id"].as_str().expect("id").into(),
            password: v["password"].as_str().expect("password").into(),
            key: SecretKey::from_file_text(v["device_key"].as_str().expect("key"), Path::new("agent.toml")).expect("key"),
            root: PublicKey::from_file_text(v["trust_root"].as_str().expect("root"), Path::new("agent.toml")).expect("root"),
            config_text: text.to_string(),
        }
    }
}

/// A plain GET without a token: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http(port, "GET", path, None, "")
}

/// A raw request; `auth` is the whole Authorization header value.
pub fn http(port: u16, method: &str, path: &str, auth: Option<&str>, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// An MQTT client for a device: (client, connection), with a clean session.
pub fn mqtt(port: u16, id: &str, user: &str, password: &str) -> (rumqttc::Client, rumqttc::Connection) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(2 << 20, 2 << 20);
    rumqttc::Client::new(o, 100)
}

/// Waits for the first ConnAck; Err with the failure if the connection fails first.
pub fn wait_connack(conn: &mut rumqttc::Connection) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)))) => {
                return if ack.code == rumqttc::ConnectReturnCode::Success { Ok(()) } else { Err(format!("{:?}", ack.code)) };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {}
        }
    }
    Err("timed out".into())
}

/// Drives the connection until `pred` matches an incoming publish or the
/// time runs out.
pub fn wait_publish(
    conn: &mut rumqttc::Connection,
    timeout: Duration,
    mut pred: impl FnMut(&rumqttc::Publish) -> bool,
) -> Option<rumqttc::Publish> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) = conn.recv_timeout(Duration::from_millis(100)) {
            if pred(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// Polls `f` until it is true or 10 s pass.
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A device's entry in `GET /v1/devices/{id}`.
pub fn device(fleet: &Fleet, id: &str) -> Value {
    fleet.api().get(&format!("/v1/devices/{id}")).expect("device")["device"].clone()
}
