//! A device: provisioned with `outpost-fleet provision` as whoever images
//! devices would, then a real `outpost-agent run --config agent.toml` with
//! its own state directory, predict port and log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::fleet::Fleet;
use super::http::{self, Answer};
use super::procs::{bin, free_port, tail, wait_for, Proc};

/// Agent tuning for tests: short probation and telemetry, quick reconnects
/// and re-asks, so a rollout stage takes seconds instead of minutes. Every
/// key is one a real device can set in its agent.toml.
///
/// The latency ratio is wider than the default 5×: the fixture answers in
/// well under a millisecond, so on a loaded 2-core machine running two
/// fleets one scheduling hiccup is already 5× (seen: 4 ms against 0.5 ms).
/// The slow model is ~100× slower and still trips it.
pub const TEST_TUNING: &str = "\
probation_secs = 2
probation_min_requests = 10
probation_max_latency_ratio = 25
telemetry_interval_secs = 1
keep_alive_secs = 5
reconnect_min_ms = 200
reconnect_max_ms = 1000
chunk_timeout_secs = 1
";

pub struct Device {
    pub id: String,
    pub tag: String,
    pub dir: PathBuf,
    pub port: u16,
    /// The device's broker password (mosquitto needs it in its own file).
    pub password: String,
    proc: Option<Proc>,
}

impl Device {
    /// Registers the device with the CLI; writes `dir/agent.toml` with
    /// [`TEST_TUNING`] appended. Does not start it.
    pub fn provision(fleet: &Fleet, root: &Path, id: &str, tag: &str) -> Device {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).expect("device dir");
        let port = free_port();
        let config = dir.join("agent.toml");
        let state = dir.join("state");
        let listen = format!("127.0.0.1:{port}");
        let answer = fleet.cli_json(&[
            "provision",
            "--force",
            id,
            "--tag",
            tag,
            "--out",
            &config.to_string_lossy(),
            "--state-dir",
            &state.to_string_lossy(),
            "--listen",
            &listen,
        ]);
        assert_eq!(answer["device_id"], id, "{answer}");
        let mut text = std::fs::read_to_string(&config).expect("agent.toml written by provision");
        let parsed: toml::Table = text.parse().expect("agent.toml is TOML");
        let password = parsed.get("password").and_then(|p| p.as_str()).expect("agent.toml has a password").to_string();
        text.push_str(TEST_TUNING);
        std::fs::write(&config, text).expect("agent.toml");
        Device { id: id.into(), tag: tag.into(), dir, port, password, proc: None }
    }

    /// Starts the agent; `env` adds `OUTPOST_<KEY>` overrides (a device
    /// re-imaged with other tuning, e.g. smaller chunks).
    pub fn start(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(bin("outpost-agent"));
        cmd.arg("run").arg("--config").arg(self.dir.join("agent.toml")).env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.proc = Some(Proc::spawn(cmd, &self.dir.join("agent.log"), &format!("outpost-agent {}", self.id)));
        wait_for(
            &format!("{}'s predict API", self.id),
            Duration::from_secs(30),
            || http::get(self.port, "/health").ok().filter(|a| a.status == 200),
            || self.log_tail(),
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.proc.as_mut() {
            Some(p) => p.check_alive(),
            None => Err(format!("{} is not running", self.id)),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        format!("--- {} ---\n{}", self.id, tail(&self.dir.join("agent.log"), 30))
    }

    /// `GET /v1/model` when a model serves.
    pub fn model(&self) -> Option<Value> {
        http::get(self.port, "/v1/model").ok().filter(|a| a.status == 200).map(|a| a.json())
    }

    /// The version `/v1/model` names.
    pub fn version(&self) -> Option<String> {
        self.model().and_then(|m| find_str(&m, "version"))
    }

    pub fn predict(&self, features: &[f32]) -> std::io::Result<Answer> {
        http::post(self.port, "/predict", &json!({ "features": features }))
    }

    pub fn drift(&self) -> Value {
        http::get(self.port, "/v1/drift").map(|a| a.json()).unwrap_or(Value::Null)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Whether any file in the state directory is the bundle with this
    /// sha256 (a slot holding it, or a finished download).
    pub fn holds_bundle(&self, sha256_hex: &str) -> bool {
        files(&self.state_dir()).iter().any(|f| {
            std::fs::read(f).map(|b| hex(&Sha256::digest(&b)) == sha256_hex.to_ascii_lowercase()).unwrap_or(false)
        })
    }

    /// The size of the partial download (`*.part`) now, if one exists.
    pub fn partial_download(&self) -> Option<u64> {
        files(&self.state_dir())
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "part"))
            .filter_map(|f| std::fs::metadata(f).ok().map(|m| m.len()))
            .max()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `"version"` wherever it sits in /v1/model's answer (top level or under
/// `model`).
fn find_str(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .or_else(|| v.get("model").and_then(|m| m.get(key)).and_then(|x| x.as_str()).map(str::to_string))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The rows of a CSV of the fixtures without their label column.
pub fn feature_rows(csv: &str) -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(outpost_e2e::repo_root().join("fixtures/data").join(csv)).expect("fixture csv");
    text.lines()
        .filter_map(|l| {
            let cells: Vec<f32> = l.split(',').map(|c| c.trim().parse::<f32>()).collect::<Result<_, _>>().ok()?;
            Some(cells[..cells.len() - 1].to_vec())
        })
        .collect()
}
