//! The whole loop, end to end, with nothing stood in for: `outpost-fleet`
//! (keys, registry, publish gate, rollouts, broker) and four real
//! `outpost-agent` processes on two hardware tags, each with its own state
//! directory and predict port, driven through the operator CLI, the
//! devices' HTTP APIs and MQTT — once with the fleet's embedded broker and
//! once with a real mosquitto (password file, the shipped ACL).
//!
//! One story per broker, scenarios in order on one fleet (each leaves the
//! fleet as the next expects it):
//!
//! 1. publish 1.0.0, roll it out (50 %, 100 %): every device serves it;
//! 2. a bad 1.1.0 — the fixture with an expensive no-op, which passes the
//!    publish gate but is ~100× too slow on a device — in stages 25/50/100
//!    with a p99 gate: the rollout halts in its first stage, the canaries
//!    serve 1.0.0 again, and no device outside the first stage ever saw
//!    1.1.0 (its log, its state directory), while the canaries did;
//! 3. a good 1.2.0 completes; `rollback bc --to 1.0.0` reaches every device;
//! 4. the fleet server is killed (SIGKILL) mid-bake of stage 2 and
//!    restarted: the rollout resumes at the same stage with the same bake
//!    clock, sends nothing twice, and completes;
//! 5. the broker goes away mid-download (embedded: the fleet server with
//!    it; mosquitto: the broker process) for a few seconds: every device
//!    keeps answering predictions, then finishes the download and commits;
//! 6. one device gets shifted inputs (features × 3): its `/v1/drift`
//!    turns, `outpost-fleet drift` lists it, and a drift alert arrives on
//!    `outpost/v1/fleet/alerts`.
//!
//! The binaries come from the shared target directory (`cargo test
//! --workspace` builds them first). Run one story with
//! `cargo test -p outpost-e2e --test fleet_e2e -- embedded --nocapture`
//! to see the timings.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::alerts::Alerts;
use support::device::{feature_rows, Device};
use support::fleet::{stage_devices, BrokerConfig, Fleet, DASHBOARD_PASSWORD, DASHBOARD_USER};
use support::mosquitto::{Mosquitto, FLEET_PASSWORD, FLEET_USER};
use support::procs::{free_port, wait_for};
use support::traffic::Traffic;

/// Long enough for a loaded 2-core machine running both stories at once.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(45);
/// The hardware tags, two devices each.
const DEVICES: [(&str, &str); 4] = [("dev-a", "pi4"), ("dev-b", "pi5"), ("dev-c", "pi4"), ("dev-d", "pi5")];
/// Every rollout targets the devices by tag (a union), as an operator with
/// other kinds of clients on the fleet would.
const TAGS: [&str; 4] = ["--tag", "pi4", "--tag", "pi5"];
/// Per-device artifact rate on the fleet: plenty for a normal download (one
/// 32 KiB chunk), slow for a device that asks for 1 KiB chunks one at a
/// time — which is how scenario 5 gets a download long enough to cut.
const ARTIFACTS: &str = "requests_per_second = 2\nburst = 4\n";
/// Multiplications of 512×512 matrices per request in the bad model:
/// ~75 ms on this machine against well under a millisecond for the fixture.
const SLOW_MATMULS: usize = 4;

enum Broker {
    Embedded,
    Mosquitto,
}

struct World {
    name: &'static str,
    mosquitto: Option<Mosquitto>,
    fleet: Fleet,
    devices: Vec<Device>,
    alerts: Alerts,
    traffic: Option<Traffic>,
    started: Instant,
}

impl World {
    fn start(name: &'static str, broker: Broker, scratch: &Path) -> World {
        let started = Instant::now();
        let (mosquitto, config) = match broker {
            Broker::Embedded => (None, BrokerConfig::Embedded { port: free_port() }),
            Broker::Mosquitto => {
                // Not a skip: the README's test command runs scripts/setup.sh,
                // which installs mosquitto, so its absence is a broken setup.
                let m = Mosquitto::start(&scratch.join("mosquitto"))
                    .expect("mosquitto is not installed: run scripts/setup.sh (the README's test command does)");
                let port = m.port;
                (Some(m), BrokerConfig::External { port, username: FLEET_USER.into(), password: FLEET_PASSWORD.into() })
            }
        };
        let fleet = Fleet::start(&scratch.join("fleet"), config, ARTIFACTS);
        // The dashboard: on mosquitto the fleet's own user may read the
        // fleet topics (the ACL); the embedded broker has a read-only
        // dashboard identity (`[broker] dashboard_password`).
        let alerts = match &mosquitto {
            Some(m) => Alerts::subscribe(m.port, "e2e-dashboard", FLEET_USER, FLEET_PASSWORD),
            None => Alerts::subscribe(fleet.broker.port(), DASHBOARD_USER, DASHBOARD_USER, DASHBOARD_PASSWORD),
        };
        let mut w = World { name, mosquitto, fleet, devices: Vec::new(), alerts, traffic: None, started };
        for (id, tag) in DEVICES {
            let mut d = Device::provision(&w.fleet, scratch, id, tag);
            if let Some(m) = &mut w.mosquitto {
                m.add_user(id, &d.password);
            }
            d.start(&[]);
            w.devices.push(d);
        }
        // Every agent reported its signed state to the fleet.
        wait_for(
            "every device to report to the fleet",
            SETTLE,
            || {
                let v = w.fleet.cli_json(&["devices"]);
                let reported = v["devices"]
                    .as_array()?
                    .iter()
                    .filter(|d| !d["status"].is_null())
                    .count();
                (reported == DEVICES.len()).then_some(())
            },
            || format!("{}\n{}", w.fleet.cli_json(&["devices"]), w.logs()),
        );
        wait_for("the dashboard's subscription", SETTLE, || w.alerts.is_subscribed().then_some(()), || w.logs());
        w.step("fleet, 4 agents and the dashboard up");
        w
    }

    fn step(&self, what: &str) {
        eprintln!("[{} {:>6.1}s] {what}", self.name, self.started.elapsed().as_secs_f64());
    }

    fn device(&self, id: &str) -> &Device {
        self.devices.iter().find(|d| d.id == id).unwrap_or_else(|| panic!("no device {id}"))
    }

    fn logs(&self) -> String {
        let mut s = format!("--- fleet ---\n{}\n", self.fleet.log_tail());
        for d in &self.devices {
            s.push_str(&d.log_tail());
            s.push('\n');
        }
        s
    }

    /// Waits until every device's `/v1/model` names `version` and the
    /// fleet has its signed word that the version is committed (past
    /// probation), so the next step starts from a settled fleet.
    fn wait_all_serve(&self, version: &str) {
        for d in &self.devices {
            wait_for(
                &format!("{} to serve {version}", d.id),
                SETTLE,
                || (d.version().as_deref() == Some(version)).then_some(()),
                || format!("{} serves {:?}\n{}", d.id, d.version(), self.logs()),
            );
        }
        wait_for(
            &format!("the fleet to see every device committed on {version}"),
            SETTLE,
            || {
                let v = self.fleet.cli_json(&["devices"]);
                let list = v["devices"].as_array()?;
                let settled = DEVICES.iter().all(|(id, _)| {
                    list.iter().any(|d| {
                        d["id"] == *id && d["version"] == version && d["committed"] == true && d["status"] == "serving"
                    })
                });
                settled.then_some(())
            },
            || format!("{}\n{}", self.fleet.cli_json(&["devices"]), self.logs()),
        );
    }

    /// Each device answers a prediction with `version` and a class.
    fn assert_predictions(&self, version: &str) {
        let row = &feature_rows("bc_test.csv")[0];
        for d in &self.devices {
            let a = d.predict(row).expect("predict answers");
            assert_eq!(a.status, 200, "{}: {}", d.id, a.body);
            let v = a.json();
            assert_eq!(v["model"]["version"], version, "{}: {v}", d.id);
            assert!(v["prediction"].is_number(), "{}: {v}", d.id);
        }
    }

    fn rollout(&self, target: &str, args: &[&str]) -> String {
        let mut all: Vec<&str> = TAGS.to_vec();
        all.extend_from_slice(args);
        self.fleet.rollout_start(target, &all)
    }

    fn end(&self, id: &str) -> Value {
        self.fleet.wait_rollout_end(id, ROLLOUT_TIMEOUT)
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    outpost_e2e::repo_root().join("fixtures").join(name)
}

/// Every device of every stage in `status` has `state`.
fn assert_all_devices(status: &Value, state: &str) {
    for (i, stage) in status["stages"].as_array().expect("stages").iter().enumerate() {
        for d in stage["devices"].as_array().expect("devices") {
            assert_eq!(d["state"], state, "stage {i}: {d}\n{status}");
        }
    }
}

fn story(name: &'static str, broker: Broker) {
    let scratch = tempfile::Builder::new()
        .prefix(&format!("fleet-e2e-{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tmp");
    let mut w = World::start(name, broker, scratch.path());

    // ---- 1. publish 1.0.0 and roll it out to every device
    let t = Instant::now();
    let v1 = w.fleet.publish(&fixture("bc_mlp.onnx"), "1.0.0");
    assert!(v1["accuracy"]["accuracy"].as_f64().unwrap_or(0.0) >= 0.9, "{v1}");
    let id = w.rollout("bc@1.0.0", &["--stages", "50,100", "--bake", "2s", "--max-error-rate", "0.05"]);
    let s = w.end(&id);
    assert_eq!(s["state"], "completed", "{s}\n{}", w.logs());
    assert_eq!(s["stages"].as_array().map(Vec::len), Some(2), "{s}");
    assert_all_devices(&s, "committed");
    // Stages are cumulative: the canaries, then everyone.
    let (first, last) = (stage_devices(&s, 0), stage_devices(&s, 1));
    assert!(!first.is_empty() && first.len() < DEVICES.len() && first.iter().all(|d| last.contains(d)), "{s}");
    assert_eq!(last.len(), DEVICES.len(), "{s}");
    w.wait_all_serve("1.0.0");
    w.assert_predictions("1.0.0");
    w.step(&format!("1. bc@1.0.0 rolled out to 4 devices in {:.1}s", t.elapsed().as_secs_f64()));

    // The apps start calling their devices.
    let ports: Vec<(String, u16)> = w.devices.iter().map(|d| (d.id.clone(), d.port)).collect();
    w.traffic = Some(Traffic::start(&ports, Duration::from_millis(50)));

    // ---- 2. a bad 1.1.0: passes the publish gate, far too slow on devices
    let t = Instant::now();
    let slow_path = scratch.path().join("bc_mlp_slow.onnx");
    let original = std::fs::read(fixture("bc_mlp.onnx")).expect("fixture");
    let slow = support::slow_model::slow_variant(&original, "features", SLOW_MATMULS).expect("slow variant");
    std::fs::write(&slow_path, slow).expect("write");
    let v11 = w.fleet.publish(&slow_path, "1.1.0");
    assert!(v11["accuracy"]["accuracy"].as_f64().unwrap_or(0.0) >= 0.9, "the publish gate passes it: {v11}");
    let bad_sha = v11["bundle_sha256"].as_str().expect("bundle_sha256").to_string();
    let id = w.rollout(
        "bc@1.1.0",
        &[
            "--stages",
            "25,50,100",
            "--bake",
            "3s",
            "--max-p99-ms",
            "40",
            "--max-failed",
            "0",
            "--on-failure",
            "rollback",
        ],
    );
    let s = w.end(&id);
    assert_eq!(s["state"], "halted", "{s}\n{}", w.logs());
    assert_eq!(s["stage"], 0, "halted in its first stage: {s}");
    assert!(s["reason"].as_str().is_some_and(|r| !r.is_empty()), "a halt says why: {s}");
    let canaries = stage_devices(&s, 0);
    assert!(!canaries.is_empty() && canaries.len() < DEVICES.len(), "{s}");
    for stage in 1..s["stages"].as_array().map(Vec::len).unwrap_or(0) {
        for d in s["stages"][stage]["devices"].as_array().expect("devices") {
            if !canaries.iter().any(|c| d["id"] == c.as_str()) {
                assert_eq!(d["state"], "pending", "later stages are never sent: {s}");
            }
        }
    }
    for c in &canaries {
        let d = w.device(c);
        wait_for(
            &format!("canary {c} back on 1.0.0"),
            SETTLE,
            || (d.version().as_deref() == Some("1.0.0")).then_some(()),
            || format!("{c}: {:?}\n{}", d.version(), w.logs()),
        );
        // The positive control of the check below: the canary did get it.
        assert!(d.log().contains("bc@1.1.0"), "canary {c} never received 1.1.0:\n{}", d.log_tail());
        assert!(d.holds_bundle(&bad_sha), "canary {c} downloaded 1.1.0 into a slot");
    }
    for d in w.devices.iter().filter(|d| !canaries.contains(&d.id)) {
        assert!(!d.log().contains("bc@1.1.0"), "{} (outside the first stage) heard of 1.1.0:\n{}", d.id, d.log_tail());
        assert!(!d.holds_bundle(&bad_sha), "{} (outside the first stage) holds the 1.1.0 bundle", d.id);
        assert_eq!(d.partial_download(), None, "{} has a partial download", d.id);
        assert_eq!(d.version().as_deref(), Some("1.0.0"));
    }
    w.wait_all_serve("1.0.0");
    let halted = wait_for(
        "a rollout_halted alert",
        SETTLE,
        || w.alerts.find(|a| a["kind"] == "rollout_halted" && a.to_string().contains(&id)),
        || format!("alerts: {:?}", w.alerts.all()),
    );
    w.step(&format!(
        "2. bad bc@1.1.0 halted at stage 0 ({} canaries back on 1.0.0) in {:.1}s; alert {halted}",
        canaries.len(),
        t.elapsed().as_secs_f64()
    ));

    // ---- 3. a good 1.2.0 completes; rollback to 1.0.0 reaches every device
    let t = Instant::now();
    w.fleet.publish(&fixture("bc_mlp.onnx"), "1.2.0");
    let id = w.rollout("bc@1.2.0", &["--stages", "50,100", "--bake", "2s", "--max-p99-ms", "40", "--max-failed", "0"]);
    let s = w.end(&id);
    assert_eq!(s["state"], "completed", "{s}\n{}", w.logs());
    assert_all_devices(&s, "committed");
    w.wait_all_serve("1.2.0");
    w.assert_predictions("1.2.0");
    let completed_in = t.elapsed();
    let t = Instant::now();
    w.fleet.cli(&["rollback", "bc", "--to", "1.0.0"]).unwrap_or_else(|e| panic!("{e}\n{}", w.fleet.log_tail()));
    w.wait_all_serve("1.0.0");
    w.assert_predictions("1.0.0");
    w.step(&format!(
        "3. bc@1.2.0 completed in {:.1}s; rollback to 1.0.0 on every device in {:.1}s",
        completed_in.as_secs_f64(),
        t.elapsed().as_secs_f64()
    ));

    // ---- 4. the fleet server dies mid-bake of stage 2 and comes back
    let t = Instant::now();
    w.fleet.publish(&fixture("bc_mlp.onnx"), "1.3.0");
    let id = w.rollout("bc@1.3.0", &["--stages", "50,100", "--bake", "8s"]);
    let before = wait_for(
        "the rollout to reach stage 2",
        ROLLOUT_TIMEOUT,
        || w.fleet.rollout_status(&id).filter(|s| s["stage"] == 1 && s["state"] == "running"),
        || format!("{:?}\n{}", w.fleet.rollout_status(&id), w.logs()),
    );
    std::thread::sleep(Duration::from_secs(1));
    w.fleet.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    w.fleet.serve();
    let down = killed.elapsed();
    let after = w.fleet.rollout_status(&id).expect("status after the restart");
    assert_eq!(after["stage"], 1, "resumed at the same stage: {after}\nbefore: {before}");
    assert!(after["state"] == "running" || after["state"] == "completed", "{after}");
    assert_eq!(
        after["stages"][1]["started_at"], before["stages"][1]["started_at"],
        "the same bake clock: {after}\nbefore: {before}"
    );
    let s = w.end(&id);
    assert_eq!(s["state"], "completed", "{s}\n{}", w.logs());
    assert_all_devices(&s, "committed");
    w.wait_all_serve("1.3.0");
    for d in &w.devices {
        let directives = d.log().lines().filter(|l| l.contains("accepted directive") && l.contains("bc@1.3.0")).count();
        assert_eq!(
            directives,
            1,
            "{} accepted one directive for 1.3.0, not one per fleet start:\n{}",
            d.id,
            d.log_tail()
        );
    }
    w.step(&format!(
        "4. fleet killed mid-bake of stage 2, serving again {:.1}s later, rollout resumed at stage 2 and completed in {:.1}s",
        down.as_secs_f64(),
        t.elapsed().as_secs_f64()
    ));

    // ---- 5. the broker goes away mid-download
    let t = Instant::now();
    let v14 = w.fleet.publish(&fixture("bc_mlp.onnx"), "1.4.0");
    let size = v14["bundle_size"].as_u64().expect("bundle_size");
    // The devices get re-imaged with small chunks, one at a time, so their
    // downloads (paced by the fleet's rate limit) take seconds.
    for d in &mut w.devices {
        d.stop();
        d.start(&[("OUTPOST_CHUNK_SIZE", "1024"), ("OUTPOST_CHUNKS_IN_FLIGHT", "1")]);
    }
    w.wait_all_serve("1.3.0");
    let id = w.rollout("bc@1.4.0", &["--stages", "100", "--bake", "2s"]);
    let downloading = wait_for(
        "a device in the middle of its download",
        SETTLE,
        || w.devices.iter().find(|d| d.partial_download().is_some_and(|n| n > 0 && n < size)).map(|d| d.id.clone()),
        || w.logs(),
    );
    let outage = Instant::now();
    let log_lengths: Vec<usize> = w.devices.iter().map(|d| d.log().len()).collect();
    match &mut w.mosquitto {
        Some(m) => m.kill9(),
        None => w.fleet.kill9(),
    }
    let mid = w.devices.iter().filter(|d| d.partial_download().is_some_and(|n| n < size)).count();
    std::thread::sleep(Duration::from_secs(4));
    // Nothing was lost while the broker was away: every device answered
    // every prediction, still with the version it had.
    let traffic = w.traffic.as_ref().expect("traffic");
    for d in &w.devices {
        let during = traffic.since(&d.id, outage);
        assert!(during.len() >= 10, "{}: only {} predictions during the outage", d.id, during.len());
        assert!(during.iter().all(|s| s.status == 200), "{}: a prediction failed during the outage: {during:?}", d.id);
        assert_eq!(d.version().as_deref(), Some("1.3.0"), "{} finished before the broker came back", d.id);
    }
    match &mut w.mosquitto {
        Some(m) => {
            m.run();
            w.fleet.wait_ready(SETTLE);
        }
        None => w.fleet.serve(),
    }
    let down = outage.elapsed();
    let s = w.end(&id);
    assert_eq!(s["state"], "completed", "{s}\n{}", w.logs());
    w.wait_all_serve("1.4.0");
    w.assert_predictions("1.4.0");
    for (d, from) in w.devices.iter().zip(log_lengths) {
        let after = d.log().get(from..).unwrap_or_default().to_string();
        assert!(after.contains("broker connection lost"), "{} did not notice the outage:\n{}", d.id, d.log_tail());
    }
    w.step(&format!(
        "5. broker down {:.1}s with {mid} device(s) mid-download (first seen: {downloading}); all served through it and committed 1.4.0, {:.1}s in all",
        down.as_secs_f64(),
        t.elapsed().as_secs_f64()
    ));

    // ---- 6. one device sees shifted inputs
    let t = Instant::now();
    let target = w.device("dev-b");
    let traffic = w.traffic.as_ref().expect("traffic");
    traffic.pause(&target.id);
    std::thread::sleep(Duration::from_millis(200));
    let rows = feature_rows("bc_test.csv");
    for i in 0..700 {
        let shifted: Vec<f32> = rows[i % rows.len()].iter().map(|x| x * 3.0).collect();
        let a = target.predict(&shifted).expect("predict");
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let report = wait_for(
        "dev-b's own drift verdict",
        SETTLE,
        || {
            let r = target.drift();
            r["features"].as_array()?.iter().any(|f| f["drift"] == true).then_some(r)
        },
        || format!("{}", target.drift()),
    );
    let drifting = report["features"].as_array().map(|f| f.iter().filter(|f| f["drift"] == true).count()).unwrap_or(0);
    let fleet_view = wait_for(
        "the fleet to list dev-b as drifting",
        SETTLE,
        || {
            let v = w.fleet.cli_json(&["drift", "bc@1.4.0"]);
            let list = v["devices_drifting"].as_array()?;
            list.iter().any(|d| d == "dev-b").then_some(v)
        },
        || format!("{}\n{}", w.fleet.cli(&["drift", "bc@1.4.0", "--json"]).unwrap_or_else(|e| e), w.fleet.log_tail()),
    );
    let listed = fleet_view["devices_drifting"].as_array().cloned().unwrap_or_default();
    assert!(!listed.iter().any(|d| d == "dev-a"), "dev-a saw only unshifted inputs: {fleet_view}");
    let alert = wait_for(
        "a drift alert naming dev-b",
        SETTLE,
        || w.alerts.find(|a| a["kind"] == "drift" && a.to_string().contains("dev-b")),
        || format!("alerts: {:?}\n{}", w.alerts.all(), w.fleet.log_tail()),
    );
    traffic.resume(&target.id);
    w.step(&format!(
        "6. dev-b drifting on {drifting} feature(s), listed by the fleet, alert {alert}, in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    for d in &mut w.devices {
        if let Err(e) = d.check_alive() {
            panic!("an agent died during the story: {e}");
        }
    }
    w.step("story complete");
}

#[test]
fn embedded_broker_story() {
    story("embedded", Broker::Embedded);
}

#[test]
fn mosquitto_story() {
    story("mosquitto", Broker::Mosquitto);
}
