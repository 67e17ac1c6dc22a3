//! The fleet server as an operator runs it: `outpost-fleet keygen`, a
//! fleet.toml, `outpost-fleet serve`, and every operator action through
//! the `outpost-fleet` CLI with `OUTPOST_SERVER` / `OUTPOST_TOKEN`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http;
use super::procs::{bin, free_port, tail, wait_for, Proc};

pub const TOKEN: &str = "e2e-token-0123456789abcdef";
/// The embedded broker's read-only dashboard identity (`[broker]
/// dashboard_password`): it may read `outpost/v1/fleet/#`, nothing else.
pub const DASHBOARD_USER: &str = "dashboard";
pub const DASHBOARD_PASSWORD: &str = "e2e-dashboard-password-0123456789";

/// Which broker the fleet uses.
#[derive(Clone, Debug)]
pub enum BrokerConfig {
    /// The embedded rumqttd on this port.
    Embedded { port: u16 },
    /// An external broker (mosquitto), with the fleet's own credential.
    External { port: u16, username: String, password: String },
}

impl BrokerConfig {
    pub fn port(&self) -> u16 {
        match self {
            BrokerConfig::Embedded { port } | BrokerConfig::External { port, .. } => *port,
        }
    }
}

/// A fleet server process with its keys, data and log in `dir`.
pub struct Fleet {
    pub dir: PathBuf,
    pub api_port: u16,
    pub broker: BrokerConfig,
    proc: Option<Proc>,
}

impl Fleet {
    /// Makes keys with the CLI, writes fleet.toml and starts serving.
    /// `artifacts` is the `[artifacts]` table's body (rate limits).
    pub fn start(dir: &Path, broker: BrokerConfig, artifacts: &str) -> Fleet {
        std::fs::create_dir_all(dir).expect("fleet dir");
        let out = Command::new(bin("outpost-fleet"))
            .arg("keygen")
            .arg("--out")
            .arg(dir.join("keys"))
            .output()
            .expect("keygen");
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        let api_port = free_port();
        let broker_table = match &broker {
            BrokerConfig::Embedded { port } => {
                format!("listen = \"127.0.0.1:{port}\"\ndashboard_password = \"{DASHBOARD_PASSWORD}\"\n")
            }
            BrokerConfig::External { port, username, password } => {
                format!("url = \"mqtt://127.0.0.1:{port}\"\nusername = \"{username}\"\npassword = \"{password}\"\n")
            }
        };
        let config = format!(
            "data_dir = \"data\"\napi_listen = \"127.0.0.1:{api_port}\"\napi_token = \"{TOKEN}\"\nkeys_dir = \"keys\"\n\n[broker]\n{broker_table}\n[artifacts]\n{artifacts}\n"
        );
        std::fs::write(dir.join("fleet.toml"), config).expect("fleet.toml");
        let mut fleet = Fleet { dir: dir.to_path_buf(), api_port, broker, proc: None };
        fleet.serve();
        fleet
    }

    /// Starts `outpost-fleet serve` (again) and waits for `/ready`.
    pub fn serve(&mut self) {
        let mut cmd = Command::new(bin("outpost-fleet"));
        cmd.arg("serve").arg("--config").arg(self.dir.join("fleet.toml"));
        self.proc = Some(Proc::spawn(cmd, &self.dir.join("serve.log"), "outpost-fleet serve"));
        self.wait_ready(Duration::from_secs(30));
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.proc.as_mut() {
                if let Err(e) = p.check_alive() {
                    panic!("{e}");
                }
            }
            if http::get(self.api_port, "/ready").map(|a| a.status == 200).unwrap_or(false) {
                return;
            }
            assert!(Instant::now() < deadline, "the fleet server is not ready:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as a crash or power cut would stop it.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.join("serve.log"), 60)
    }

    pub fn server_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Runs `outpost-fleet ARGS` against this server; stdout, or `Err` with
    /// the exit status and stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(bin("outpost-fleet"))
            .args(args)
            .env("OUTPOST_SERVER", self.server_url())
            .env("OUTPOST_TOKEN", TOKEN)
            .output()
            .map_err(|e| format!("running outpost-fleet: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "outpost-fleet {} → {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `outpost-fleet ARGS --json`, parsed; panics (with the server's log)
    /// when the command fails.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        match self.cli(&all) {
            Ok(out) => {
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("outpost-fleet {all:?}: not JSON ({e}): {out}"))
            }
            Err(e) => panic!("{e}\n--- fleet log ---\n{}", self.log_tail()),
        }
    }

    /// `publish MODEL --name bc --version V` with the fixture's data.
    pub fn publish(&self, model: &Path, version: &str) -> Value {
        let root = outpost_e2e::repo_root();
        let train = root.join("fixtures/data/bc_train.csv");
        let test = root.join("fixtures/data/bc_test.csv");
        self.cli_json(&[
            "publish",
            &model.to_string_lossy(),
            "--name",
            "bc",
            "--version",
            version,
            "--train-data",
            &train.to_string_lossy(),
            "--test-data",
            &test.to_string_lossy(),
            "--min-accuracy",
            "0.9",
        ])
    }

    /// `rollout start TARGET ARGS --json` → the rollout id.
    pub fn rollout_start(&self, target: &str, args: &[&str]) -> String {
        let mut all = vec!["rollout", "start", target];
        all.extend_from_slice(args);
        let v = self.cli_json(&all);
        v["id"]
            .as_str()
            .map(str::to_string)
            .or_else(|| v["id"].as_i64().map(|i| i.to_string()))
            .unwrap_or_else(|| panic!("no id in {v}"))
    }

    /// `rollout status ID --json`; `None` while the server does not answer
    /// (it may be restarting).
    pub fn rollout_status(&self, id: &str) -> Option<Value> {
        let out = self.cli(&["rollout", "status", id, "--json"]).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// Waits until the rollout reaches a final state; returns the status.
    pub fn wait_rollout_end(&self, id: &str, timeout: Duration) -> Value {
        wait_for(
            &format!("rollout {id} to end"),
            timeout,
            || {
                self.rollout_status(id)
                    .filter(|s| ["completed", "halted", "aborted"].contains(&s["state"].as_str().unwrap_or("")))
            },
            || format!("status: {:?}\n--- fleet log ---\n{}", self.rollout_status(id), self.log_tail()),
        )
    }

    /// A counter or gauge from the fleet's `/metrics` (summed over labels).
    pub fn metric(&self, name: &str) -> f64 {
        self.metric_where(name, "")
    }

    /// [`metric`](Self::metric) over the series whose labels contain
    /// `label` (e.g. `result="rejected"`).
    pub fn metric_where(&self, name: &str, label: &str) -> f64 {
        let text = http::get(self.api_port, "/metrics").map(|a| a.body).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The device ids of a rollout stage, from `rollout status --json`.
pub fn stage_devices(status: &Value, stage: usize) -> Vec<String> {
    status["stages"][stage]["devices"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}
