//! The agent against a real mosquitto, with the test playing the fleet.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outpost_runtime::protocol::Status;

const T: Duration = Duration::from_secs(60);

struct World {
    broker: Broker,
    keys: Keys,
    fleet: Fleet,
    dir: tempfile::TempDir,
    v1: Bundle,
    v2: Bundle,
}

fn world(device: &str) -> World {
    world_on(Broker::start(), device)
}

fn world_on(broker: Broker, device: &str) -> World {
    let keys = Keys::new();
    let fleet = Fleet::start(broker.port, device, keys.device.public_key());
    let v1 = make_bundle(&keys, "bc_mlp.onnx", "bc", "1.0.0", 1);
    let v2 = make_bundle(&keys, "bc_gb.onnx", "bc", "2.0.0", 2);
    fleet.add(&v1);
    fleet.add(&v2);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    World { broker, keys, fleet, dir, v1, v2 }
}

impl World {
    fn setup(&self, device: &str) -> AgentSetup {
        AgentSetup::new(device, &self.broker, &self.keys, &self.dir.path().join("state"))
    }

    /// Brings a fresh agent to v1 committed.
    fn install_v1(&self, agent: &AgentProc, device: &str) {
        self.fleet.publish(&self.keys.signer, &directive(device, 1, &self.v1, 1));
        agent.wait_version("1.0.0", T);
        self.fleet.wait_state(device, "v1 committed", T, |s| s.committed && s.version.as_deref() == Some("1.0.0"));
    }
}

#[test]
fn update_commit_remote_rollback_and_refusals() {
    let d = "dev-update";
    let w = world(d);
    let agent = w.setup(d).spawn();
    agent.wait_http();
    // No model yet: not ready, predictions 503.
    assert_eq!(http(agent.port, "GET", "/ready", None).unwrap().0, 503);
    w.install_v1(&agent, d);
    assert_eq!(agent.predict().unwrap().0, 200);
    let s = w.fleet.state(d).unwrap();
    assert_eq!(s.status, Status::Serving);
    assert_eq!(s.directive_sequence, 1);

    // Update to v2: downloaded, probation, committed.
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    agent.wait_version("2.0.0", T);
    w.fleet.wait_state(d, "v2 committed", T, |s| s.committed && s.version.as_deref() == Some("2.0.0"));

    // Remote rollback: a new directive (seq 3) naming v1, served from the
    // other slot without downloading again.
    let served_before = w.fleet.stats.requests.load(Ordering::SeqCst);
    w.fleet.publish(&w.keys.signer, &directive(d, 3, &w.v1, 1));
    agent.wait_version("1.0.0", T);
    w.fleet.wait_state(d, "v1 committed again", T, |s| s.committed && s.directive_sequence == 3);
    assert_eq!(w.fleet.stats.requests.load(Ordering::SeqCst), served_before, "no download for a slot it has");

    // Replay: the old directive for v2 (seq 2) is refused; v1 keeps serving.
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    let s = w.fleet.wait_state(d, "replay refused", T, |s| s.last_error.as_deref().is_some_and(|e| e.contains("replay")));
    assert_eq!(s.version.as_deref(), Some("1.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);

    // Tampered directive: one byte flipped in the signed payload.
    let mut bytes = w.keys.signer.seal(&directive(d, 10, &w.v2, 1)).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    w.fleet.publish_raw(d, bytes);
    w.fleet.wait_state(d, "tampered directive refused", T, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("directive refused") && !e.contains("replay"))
    });

    // Directive signed by a key another root certified.
    let stranger = Keys::new();
    w.fleet.publish(&stranger.signer, &directive(d, 11, &w.v2, 1));
    w.fleet.wait_state(d, "foreign directive refused", T, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("not signed by the trusted root"))
    });

    // Directive for another device.
    w.fleet.publish_raw(d, w.keys.signer.seal(&directive("someone-else", 12, &w.v2, 1)).unwrap());
    w.fleet.wait_state(d, "other device's directive refused", T, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("not for this device"))
    });

    // Tampered bundle: the model bytes do not match the signed digest.
    let bad = tampered_bundle(&w.keys, &w.v2);
    w.fleet.add(&bad);
    w.fleet.publish(&w.keys.signer, &directive(d, 13, &bad, 1));
    w.fleet.wait_state(d, "tampered bundle refused", T, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("digest mismatch")) && s.target.is_none()
    });

    // A bundle whose manifest is not the one the directive names.
    let other = make_bundle(&w.keys, "bc_gb.onnx", "bc", "2.0.0", 14);
    w.fleet.add(&other);
    let mut wrong = directive(d, 15, &other, 1);
    wrong.manifest_sha256 = w.v2.manifest_sha256;
    w.fleet.publish(&w.keys.signer, &wrong);
    w.fleet.wait_state(d, "unnamed manifest refused", T, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("not the one the directive named")) && s.directive_sequence == 15
    });

    // A signed bundle whose model does not load.
    let (mut manifest, _) = manifest_for("bc_mlp.onnx", "bc", "3.0.0", 16);
    let junk = vec![0x42u8; 4096];
    manifest.model_sha256 = outpost_runtime::bundle::Digest::of(&junk);
    manifest.model_size = junk.len() as u64;
    let junk_bundle = raw_bundle(&w.keys, &manifest, &junk);
    w.fleet.add(&junk_bundle);
    w.fleet.publish(&w.keys.signer, &directive(d, 17, &junk_bundle, 1));
    w.fleet.wait_state(d, "unloadable model refused", T, |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("activation")) && s.directive_sequence == 17
    });

    // Through all of it, v1 served.
    assert_eq!(agent.model_version().as_deref(), Some("1.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);
    // Telemetry and sketches arrived, signed, version-tagged.
    wait_for("telemetry", T, || w.fleet.telemetry.lock().unwrap().iter().any(|t| t["body"]["model"]["version"] == "1.0.0"));
    assert!(w.fleet.sketches.load(Ordering::SeqCst) > 0);
}

/// Kills the agent (SIGKILL) at `step` of an update from v1 to v2, restarts
/// it, and checks it serves a verified model at once and then finishes the
/// update.
fn crash_at(step: &str) {
    let d = &format!("dev-crash-{step}");
    let w = world(d);
    let setup = w.setup(d).env("OUTPOST_CHUNK_SIZE", "1024").env("OUTPOST_CHUNKS_IN_FLIGHT", "2");
    let mut agent = setup.spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    agent.kill9();

    let mut agent = setup.spawn_with(&[("OUTPOST_TEST_PAUSE_AT", step)]);
    agent.wait_http();
    agent.wait_version("1.0.0", T);
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 2));
    agent.wait_paused(step);
    let mid = agent.model_version();
    agent.kill9();
    let served_at_kill = w.fleet.stats.served.lock().unwrap().len();

    let agent = setup.spawn();
    agent.wait_http();
    // Serves a verified model as soon as it is up: v1, or — once v2 was
    // verified and written to its slot — v2, because the restarted agent
    // resumes the activation of a verified slot at once. Never v2 before
    // its download completed.
    wait_for("a model after restart", T, || agent.model_version().is_some());
    let v = agent.model_version().unwrap();
    let v2_verified_before_kill = matches!(step, "slot-written" | "probation");
    assert!(v == "1.0.0" || (v == "2.0.0" && v2_verified_before_kill), "after {step}: {v} (before kill: {mid:?})");
    assert_eq!(agent.predict().unwrap().0, 200);
    // And finishes the update.
    agent.wait_version("2.0.0", T);
    w.fleet.wait_state(d, "v2 committed after the crash", T, |s| s.committed && s.version.as_deref() == Some("2.0.0"));
    if step == "download" {
        // Resumed, not restarted: the first chunk asked for after the
        // restart is past the start.
        let served = w.fleet.stats.served.lock().unwrap();
        let first_after = served[served_at_kill..].first().map(|(o, _)| *o);
        assert!(first_after.is_some_and(|o| o >= w.v2.bytes.len() as u64 / 2 - 2048), "resumed at {first_after:?}");
    }
}

#[test]
fn crash_mid_download() {
    crash_at("download");
}

#[test]
fn crash_mid_rename() {
    crash_at("rename");
}

#[test]
fn crash_after_slot_write() {
    crash_at("slot-written");
}

#[test]
fn crash_mid_probation() {
    crash_at("probation");
}

/// A version that crashes the device during probation again and again is
/// abandoned: the agent rolls back to the previous slot by itself.
#[test]
fn crash_loop_in_probation_rolls_back() {
    let d = "dev-crashloop";
    let w = world(d);
    let setup = w.setup(d).env("OUTPOST_PROBATION_MAX_BOOTS", "2");
    let mut agent = setup.spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    agent.kill9();
    let mut d2 = directive(d, 2, &w.v2, 30);
    d2.probation = None; // use the agent's configured probation (max_boots 2)
    for i in 0..2 {
        let mut a = setup.spawn_with(&[("OUTPOST_TEST_PAUSE_AT", "probation"), ("OUTPOST_PROBATION_SECS", "30")]);
        if i == 0 {
            a.wait_http();
            w.fleet.publish(&w.keys.signer, &d2);
            a.wait_paused("probation");
        } else {
            // Restarted on probation: crash again "while serving v2".
            a.wait_http();
            a.wait_version("2.0.0", T);
            std::thread::sleep(Duration::from_millis(300));
        }
        a.kill9();
    }
    let agent = setup.spawn_with(&[("OUTPOST_PROBATION_SECS", "30")]);
    agent.wait_http();
    agent.wait_version("1.0.0", T);
    let s = w.fleet.wait_state(d, "rolled back", T, |s| s.status == Status::RolledBack);
    assert!(s.rollback_reason.as_deref().unwrap().contains("crash loop"), "{s:?}");
    assert_eq!(s.rolled_back_from.as_ref().map(|m| m.version.as_str()), Some("2.0.0"));
    assert_eq!(s.version.as_deref(), Some("1.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);
}

/// The broker restarts mid-download: the agent reconnects, re-reads its
/// desired state, and resumes from the last verified chunk.
#[test]
fn broker_restart_mid_download_resumes() {
    let d = "dev-broker";
    let mut w = world(d);
    let setup = w.setup(d).env("OUTPOST_CHUNK_SIZE", "1024").env("OUTPOST_CHUNKS_IN_FLIGHT", "1");
    let agent = setup.spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    w.fleet.chunk_delay_ms.store(40, Ordering::SeqCst);
    let total_chunks = w.v2.bytes.len().div_ceil(1024);
    let v1_chunks = w.fleet.stats.served.lock().unwrap().len();
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    wait_for("a third of the chunks", T, || w.fleet.stats.served.lock().unwrap().len() > v1_chunks + total_chunks / 3);
    let before = w.fleet.stats.served.lock().unwrap().len();
    let last_offset = w.fleet.stats.served.lock().unwrap().last().unwrap().0;
    w.broker.restart(Duration::from_millis(500));
    // The broker lost its retained messages (no persistence), as a real one
    // may: the fleet publishes desired again on reconnect, as the fleet does.
    std::thread::sleep(Duration::from_secs(1));
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    agent.wait_version("2.0.0", T);
    let served = w.fleet.stats.served.lock().unwrap().clone();
    let first_after = served[before..].first().map(|(o, _)| *o).unwrap();
    assert!(first_after > 0 && first_after <= last_offset + 1024, "resumed at {first_after}, last before {last_offset}");
    let v2_served = served.len() - v1_chunks;
    assert!(v2_served < total_chunks + 8, "{v2_served} chunks served for {total_chunks}");
    assert_eq!(agent.predict().unwrap().0, 200);
}

/// 32 client threads hammer /predict while the model is swapped (v1 → v2 →
/// v1): not one request fails. Prints the longest request latency.
#[test]
fn no_request_fails_during_swaps() {
    let d = "dev-load";
    let w = world(d);
    let agent = w.setup(d).spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let max_us = Arc::new(AtomicU64::new(0));
    let body = predict_body();
    let port = agent.port;
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let (stop, ok, failed, max_us, body) = (stop.clone(), ok.clone(), failed.clone(), max_us.clone(), body.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match http(port, "POST", "/predict", Some(&body)) {
                        Ok((200, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            max_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                        }
                        other => {
                            eprintln!("failed request: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before_swap_max = max_us.swap(0, Ordering::Relaxed);
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    agent.wait_version("2.0.0", T);
    std::thread::sleep(Duration::from_millis(500));
    w.fleet.publish(&w.keys.signer, &directive(d, 3, &w.v1, 1));
    agent.wait_version("1.0.0", T);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let swap_max = max_us.load(Ordering::Relaxed);
    eprintln!(
        "FIGURE swap: {} requests ok, {} failed; max latency during swaps {:.1} ms (steady-state max before: {:.1} ms)",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        swap_max as f64 / 1000.0,
        before_swap_max as f64 / 1000.0
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 100);
    if let Some(rss) = agent.rss_bytes() {
        eprintln!("FIGURE rss: agent resident memory with the MLP loaded, after the load test: {:.1} MiB", rss as f64 / (1 << 20) as f64);
    }
}

/// Download throughput over loopback MQTT with a large (8 MiB) bundle, with
/// the default chunk size and window. Its "model" is not a model, so the
/// agent refuses it at activation and keeps serving v1.
#[test]
fn download_throughput_figure() {
    let d = "dev-throughput";
    let w = world(d);
    let agent = w.setup(d).spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    let rss = agent.rss_bytes().unwrap_or(0);
    eprintln!("FIGURE rss: agent resident memory with the MLP loaded (idle): {:.1} MiB", rss as f64 / (1 << 20) as f64);
    let (mut manifest, _) = manifest_for("bc_mlp.onnx", "bc", "9.0.0", 9);
    let mut big = vec![0u8; 8 << 20];
    getrandom::getrandom(&mut big).unwrap();
    manifest.model_sha256 = outpost_runtime::bundle::Digest::of(&big);
    manifest.model_size = big.len() as u64;
    let b = raw_bundle(&w.keys, &manifest, &big);
    w.fleet.add(&b);
    let start = Instant::now();
    let served_before = w.fleet.stats.served.lock().unwrap().len();
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &b, 1));
    w.fleet.wait_state(d, "the big bundle refused at activation", Duration::from_secs(120), |s| {
        s.directive_sequence == 2 && s.last_error.as_deref().is_some_and(|e| e.contains("activation"))
    });
    let served = w.fleet.stats.served.lock().unwrap()[served_before..].to_vec();
    let (first, last) = (served.first().unwrap().1, served.last().unwrap().1);
    let secs = (last - first).as_secs_f64().max(1e-3);
    eprintln!(
        "FIGURE download: {:.1} MiB in {:.2} s over loopback MQTT = {:.1} MiB/s (32 KiB chunks, 8 in flight; {:.2} s from directive to refusal)",
        b.bytes.len() as f64 / (1 << 20) as f64,
        secs,
        b.bytes.len() as f64 / (1 << 20) as f64 / secs,
        start.elapsed().as_secs_f64()
    );
    assert_eq!(agent.model_version().as_deref(), Some("1.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);
}

#[test]
fn config_mistakes_stop_the_start_with_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(["run"])
        .env("OUTPOST_DEVICE_ID", "ok")
        .env("OUTPOST_BROKER", "http://nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`broker`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-agent")).arg("--version").output().unwrap();
    assert!(out.status.success());
}

/// The streaming mode inside the agent: an app publishes a reading on its
/// own topic to the agent's broker and gets the prediction of the model the
/// agent serves — from the same slot as HTTP, so an update reaches the
/// stream too — and the stream's counters show on the agent's `/metrics`.
#[test]
fn streaming_mode_predicts_on_the_agents_connection() {
    let d = "dev-stream";
    let w = world(d);
    let agent = w.setup(d).env("OUTPOST_STREAM_INPUTS", "sensors/+/reading").spawn();
    agent.wait_http();
    w.install_v1(&agent, d);

    let (tx, rx) = std::sync::mpsc::channel();
    let mut options = rumqttc::MqttOptions::new("stream-app", "127.0.0.1", w.broker.port);
    options.set_keep_alive(Duration::from_secs(10));
    let (app, mut connection) = rumqttc::Client::new(options, 16);
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    app.subscribe("sensors/+/reading/prediction", rumqttc::QoS::AtLeastOnce).unwrap();
    let rows = outpost_runtime::dataset::read_csv(workspace().join("fixtures/data/bc_test.csv"), outpost_runtime::dataset::LabelColumn::Last)
        .unwrap()
        .rows;
    let ask = |id: &str, row: &[f32]| -> serde_json::Value {
        // Retried: the agent may still be subscribing after its connect.
        for _ in 0..40 {
            let body = serde_json::json!({"id": id, "features": row}).to_string();
            app.publish("sensors/7/reading", rumqttc::QoS::AtLeastOnce, false, body).unwrap();
            let deadline = Instant::now() + Duration::from_millis(500);
            while let Ok((topic, payload)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                if topic == "sensors/7/reading/prediction" && v["id"] == id {
                    return v;
                }
            }
        }
        panic!("no stream reply for {id}");
    };
    let v1 = ask("r1", &rows[0]);
    assert_eq!(v1["model"]["version"], "1.0.0", "{v1}");
    let (code, body) = agent.predict().unwrap();
    let http_answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200);
    assert_eq!(v1["prediction"], http_answer["prediction"], "stream and HTTP agree: {v1} vs {http_answer}");
    // A malformed reading gets an error reply, not silence or a crash.
    app.publish("sensors/8/reading", rumqttc::QoS::AtLeastOnce, false, "{not json").unwrap();
    // The update reaches the stream.
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    agent.wait_version("2.0.0", T);
    let v2 = ask("r2", &rows[0]);
    assert_eq!(v2["model"]["version"], "2.0.0", "{v2}");
    let (_, metrics) = http(agent.port, "GET", "/metrics", None).unwrap();
    let count = |name: &str| {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()).and_then(|v| v.parse::<f64>().ok())
    };
    assert!(count("outpost_stream_predictions_total").is_some_and(|n| n >= 2.0), "{metrics}");
    assert!(count("outpost_stream_input_errors_total").is_some_and(|n| n >= 1.0), "{metrics}");
    // The agent names itself in build_info and gets the process metrics.
    assert!(metrics.lines().any(|l| l.starts_with("outpost_build_info{") && l.contains("component=\"agent\"")), "{metrics}");
    assert!(count("process_open_fds").is_some_and(|n| n >= 3.0), "{metrics}");
}

/// SIGTERM (systemd's stop): the agent exits 0 and says "offline" itself —
/// a clean disconnect suppresses the broker's last will, so without it the
/// fleet would keep showing a stopped device as serving.
#[test]
fn sigterm_stops_cleanly_and_says_offline() {
    let d = "dev-sigterm";
    let w = world(d);
    let mut agent = w.setup(d).spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    let offline_before = w.fleet.offline_seen.load(Ordering::SeqCst);
    let status = std::process::Command::new("kill").args(["-TERM", &agent.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    wait_for("the offline state", T, || w.fleet.offline_seen.load(Ordering::SeqCst) > offline_before);
}

/// How the test's web server answers a bundle request.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Serve {
    /// Sends the first half, then breaks the connection.
    HalfThenDrop,
    /// Honours `Range: bytes=N-` with a 206.
    Whole,
}

/// A real HTTP server (tiny_http) serving `bytes` at `/bundle`, first as
/// `first` then as `Serve::Whole`; records each request's Range header.
fn web_server(bytes: Arc<Vec<u8>>, first: Serve) -> (String, Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    use std::io::Read;
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/bundle", server.server_addr().to_ip().unwrap().port());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let range = request.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.to_string());
            let n = {
                let mut l = log.lock().unwrap();
                l.push(range.clone());
                l.len()
            };
            let mode = if n == 1 { first } else { Serve::Whole };
            let from = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            let body = bytes[from..].to_vec();
            let len = body.len();
            let mut headers = vec![];
            let status = if from > 0 {
                headers.push(
                    tiny_http::Header::from_bytes("Content-Range", format!("bytes {from}-{}/{}", bytes.len() - 1, bytes.len()))
                        .unwrap(),
                );
                206
            } else {
                200
            };
            let _ = match mode {
                Serve::Whole => {
                    request.respond(tiny_http::Response::new(status.into(), headers, std::io::Cursor::new(body), Some(len), None))
                }
                Serve::HalfThenDrop => {
                    // The declared length is whole; the body breaks midway.
                    let half = std::io::Cursor::new(body[..len / 2].to_vec()).chain(BrokenReader);
                    request.respond(tiny_http::Response::new(status.into(), headers, half, Some(len), None))
                }
            };
        }
    });
    (url, seen)
}

struct BrokenReader;
impl std::io::Read for BrokenReader {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("connection broken by the test"))
    }
}

/// A directive with a `url`: the agent fetches the bundle over HTTP — no
/// chunk goes over MQTT — resumes with a Range request after the server
/// broke off midway, and applies the same checks: a server that sends
/// other bytes gets the bundle refused while the device keeps serving.
#[test]
fn url_download_resumes_and_is_verified_like_chunks() {
    let d = "dev-url";
    let w = world(d);
    let agent = w.setup(d).spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    let chunks_before = w.fleet.stats.served.lock().unwrap().len();

    // Tampered bytes first: one byte flipped near the end (the model).
    let mut bad = w.v2.bytes.as_ref().clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x55;
    let (bad_url, _) = web_server(Arc::new(bad), Serve::Whole);
    let mut tampered = directive(d, 2, &w.v2, 1);
    tampered.url = Some(bad_url);
    w.fleet.publish(&w.keys.signer, &tampered);
    w.fleet.wait_state(d, "tampered download refused", T, |s| {
        s.directive_sequence == 2 && s.last_error.as_deref().is_some_and(|e| e.contains("refused") || e.contains("mismatch"))
    });
    assert_eq!(agent.model_version().as_deref(), Some("1.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);

    // The real bytes, from a server that breaks off halfway the first time.
    let (url, seen) = web_server(w.v2.bytes.clone(), Serve::HalfThenDrop);
    let mut good = directive(d, 3, &w.v2, 1);
    good.url = Some(url);
    w.fleet.publish(&w.keys.signer, &good);
    agent.wait_version("2.0.0", T);
    w.fleet.wait_state(d, "v2 committed", T, |s| s.committed && s.version.as_deref() == Some("2.0.0"));
    let requests = seen.lock().unwrap().clone();
    assert!(requests.len() >= 2, "{requests:?}");
    assert_eq!(requests[0], None, "the first GET starts at 0");
    let resumed_at = requests[1].as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<u64>().ok());
    assert!(resumed_at.is_some_and(|o| o > 0), "the second GET resumes: {requests:?}");
    assert_eq!(w.fleet.stats.served.lock().unwrap().len(), chunks_before, "no chunk went over MQTT");
}

/// `mqtts://` with the broker's CA pinned in `ca_file`: the agent connects
/// over TLS (rustls), receives a signed update and serves it; an agent that
/// does not trust the broker's CA never talks to it.
#[test]
fn mqtts_with_a_pinned_ca() {
    let d = "dev-tls";
    let w = world_on(Broker::start_with_tls(), d);
    let (tls_port, ca) = w.broker.tls.clone().unwrap();
    let tls_url = format!("mqtts://127.0.0.1:{tls_port}");
    let agent = w.setup(d).env("OUTPOST_BROKER", &tls_url).env("OUTPOST_CA_FILE", ca.to_str().unwrap()).spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    assert_eq!(agent.predict().unwrap().0, 200);

    // Same broker, no CA pinned: the system roots do not know the test CA.
    let untrusted = "dev-tls-untrusted";
    let setup = w.setup(untrusted).env("OUTPOST_BROKER", &tls_url);
    let other = setup.spawn();
    other.wait_http();
    let log = setup.state_dir.parent().unwrap().join(format!("{untrusted}-agent.log"));
    wait_for("a certificate error in the log", T, || {
        std::fs::read_to_string(&log).unwrap_or_default().to_ascii_lowercase().contains("certificate")
    });
    assert!(w.fleet.state(untrusted).is_none(), "an agent that does not trust the broker published nothing");
}

/// The agent's log so far.
fn agent_log(w: &World, device: &str) -> String {
    std::fs::read_to_string(w.dir.path().join(format!("{device}-agent.log"))).unwrap_or_default()
}

fn zeros(req: &outpost_runtime::protocol::ChunkRequest, total: u64) -> outpost_runtime::protocol::ChunkReply {
    outpost_runtime::protocol::ChunkReply::data(req.bundle_sha256, req.offset, total, vec![0; req.len as usize])
}

/// Forged chunk replies — zeros at exactly the offset the device asked for,
/// from a client that is not the fleet, read before the fleet's answer —
/// cost download attempts, not the update: the device drops the partial
/// file, fetches again with backoff and ends on the version. One forgery
/// hits the header (refused as it arrives), one the model's last chunk
/// (refused only by the final digests).
#[test]
fn forged_chunks_cost_attempts_not_the_update() {
    let d = "dev-forged-chunk";
    let w = world(d);
    let agent = w.setup(d).env("OUTPOST_CHUNK_SIZE", "4096").spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    // The fleet answers late, so the forgery is what the device reads first.
    w.fleet.chunk_delay_ms.store(100, Ordering::SeqCst);
    let (bundle, total) = (w.v2.sha256, w.v2.bytes.len() as u64);
    let (mut starts, mut forged_end) = (0, false);
    let forger = Forger::start(w.broker.port, d, move |req| {
        if req.bundle_sha256 != bundle {
            return None;
        }
        if req.offset == 0 {
            starts += 1;
            if starts == 1 {
                return Some(zeros(req, total));
            }
        }
        if starts == 2 && !forged_end && req.offset + req.len as u64 == total {
            forged_end = true;
            return Some(zeros(req, total));
        }
        None
    });
    let started = Instant::now();
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    agent.wait_version("2.0.0", T);
    eprintln!("two forged chunks: v2 served {:.1?} after the directive (waits 0.1-1 s)", started.elapsed());
    w.fleet.wait_state(d, "v2 committed", T, |s| s.committed && s.version.as_deref() == Some("2.0.0"));
    assert_eq!(forger.forged.load(Ordering::SeqCst), 2, "both forgeries were sent");
    let log = agent_log(&w, d);
    assert!(log.contains("download attempt 1 of 5 failed"), "{log}");
    assert!(log.contains("download attempt 2 of 5 failed"), "{log}");
    assert!(!log.contains("status: failed"), "{log}");
}

/// Forged "unavailable" replies pause a download only a bounded number of
/// times: a burst of them delays it, a stream of them ends in a clean
/// `failed` within a bound (the served version untouched). And a device
/// restarted after giving up — the accepted directive retained, its bundle
/// in neither slot — fetches it again instead of sitting without it.
#[test]
fn forged_unavailable_is_bounded_and_a_restart_fetches_again() {
    let d = "dev-forged-unavailable";
    let w = world(d);
    let setup = w.setup(d).env("OUTPOST_CHUNK_SIZE", "4096").env("OUTPOST_DOWNLOAD_ATTEMPTS", "3");
    let mut agent = setup.spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    w.fleet.chunk_delay_ms.store(100, Ordering::SeqCst);
    let unavailable =
        |req: &outpost_runtime::protocol::ChunkRequest| outpost_runtime::protocol::ChunkReply::unavailable(req.bundle_sha256, req.offset, "forged");

    // A burst: up to six rounds (each asks from byte 0 again), more than
    // one attempt believes (4); the download still completes (the fleet's
    // late answers to what is still asked for count too, so it may need
    // fewer).
    let v2 = w.v2.sha256;
    let mut left = 6;
    let forger = Forger::start(w.broker.port, d, move |req| {
        (req.bundle_sha256 == v2 && req.offset == 0 && left > 0).then(|| {
            left -= 1;
            unavailable(req)
        })
    });
    w.fleet.publish(&w.keys.signer, &directive(d, 2, &w.v2, 1));
    agent.wait_version("2.0.0", T);
    w.fleet.wait_state(d, "v2 committed", T, |s| s.committed && s.version.as_deref() == Some("2.0.0"));
    assert!(forger.forged.load(Ordering::SeqCst) >= 1);
    assert!(agent_log(&w, d).contains("download paused: the fleet cannot serve the bundle: forged"));
    drop(forger);

    // A stream: every round answered "unavailable", the fleet silent (a
    // fleet that answers, even late, gets its genuine chunks accepted for
    // whatever is still asked for). Given up after 3 attempts × 5 answers,
    // each wait at most 1 s here.
    let v3 = make_bundle(&w.keys, "bc_mlp.onnx", "bc", "3.0.0", 3);
    w.fleet.add(&v3);
    w.fleet.serving.store(false, Ordering::SeqCst);
    let v3_digest = v3.sha256;
    let forger = Forger::start(w.broker.port, d, move |req| (req.bundle_sha256 == v3_digest).then(|| unavailable(req)));
    let started = Instant::now();
    w.fleet.publish(&w.keys.signer, &directive(d, 3, &v3, 1));
    let s = w.fleet.wait_state(d, "v3 given up", T, |s| {
        s.directive_sequence == 3 && s.status == Status::Failed && s.target.is_none()
    });
    let took = started.elapsed();
    eprintln!("a stream of forged \"unavailable\" replies: given up after {took:.1?} (3 attempts, waits 0.1-1 s)");
    assert!(took < Duration::from_secs(40), "gave up after {took:?}");
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("gave up after 3")), "{s:?}");
    assert!(forger.forged.load(Ordering::SeqCst) >= 15);
    assert_eq!(agent.model_version().as_deref(), Some("2.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);
    drop(forger);
    // Given up in this run: the retained directive arriving again on a
    // reconnect is no news (no loop of attempts).
    let requests = w.fleet.stats.requests.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.fleet.stats.requests.load(Ordering::SeqCst), requests);

    // Restarted: the accepted directive 3 arrives retained, v3 is in
    // neither slot, so the device fetches it again and ends on it.
    agent.kill9();
    w.fleet.chunk_delay_ms.store(0, Ordering::SeqCst);
    w.fleet.serving.store(true, Ordering::SeqCst);
    let agent = setup.spawn();
    agent.wait_http();
    agent.wait_version("3.0.0", T);
    w.fleet.wait_state(d, "v3 committed", T, |s| s.committed && s.version.as_deref() == Some("3.0.0"));
}

/// Connects with the device's client id, which makes the broker drop the
/// device's session (and publish its will), then leaves.
fn take_over_session(port: u16, device: &str) {
    let mut options = rumqttc::MqttOptions::new(device, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(options, 10);
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                let _ = client.try_disconnect();
            }
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => panic!("taking over the session: {e}"),
        }
    }
}

/// Every session's last will is signed, with a counter reserved before that
/// session connected: two successive sessions (the broker drops each when
/// another client takes over the device's client id) leave two wills that
/// verify with the device's key, the second's counter above the first's.
#[test]
fn each_session_registers_a_fresh_signed_will() {
    let d = "dev-will";
    let w = world(d);
    let agent = w.setup(d).spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    for session in 1..=2 {
        take_over_session(w.broker.port, d);
        wait_for("the session's will", T, || w.fleet.wills.lock().unwrap().len() >= session);
        // Back: a state signed in the next session.
        let states = w.fleet.states_seen.load(Ordering::SeqCst);
        wait_for("the agent to reconnect", T, || w.fleet.states_seen.load(Ordering::SeqCst) > states);
    }
    let wills = w.fleet.wills.lock().unwrap().clone();
    assert_eq!(wills.len(), 2, "{wills:?}");
    assert!(wills[1] > wills[0], "{wills:?}");
    assert_eq!(w.fleet.wills_refused.load(Ordering::SeqCst), 0);
    assert_eq!(agent.predict().unwrap().0, 200);
}

/// A disk that refuses writes at boot — here a directory where the state
/// file's temporary copy goes, which no write can replace (root ignores
/// permissions, so this is how a test makes a path unwritable) — does not
/// stop the device: it serves its verified model, logs the error once, and
/// saves its state (and signs messages again) once the disk takes writes.
#[test]
fn a_disk_refusing_writes_at_boot_does_not_stop_serving() {
    let d = "dev-diskfull";
    let w = world(d);
    let setup = w.setup(d);
    let mut agent = setup.spawn();
    agent.wait_http();
    w.install_v1(&agent, d);
    agent.kill9();
    let state_file = w.dir.path().join("state/state.json");
    let reserved = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap()["counter_reserved"].as_u64().unwrap();
    let before = std::fs::read(&state_file).unwrap();
    let obstacle = w.dir.path().join("state/state.tmp");
    std::fs::create_dir(&obstacle).unwrap();

    let agent = setup.spawn();
    agent.wait_http();
    wait_for("/ready", T, || http(agent.port, "GET", "/ready", None).is_ok_and(|(s, _)| s == 200));
    assert_eq!(agent.model_version().as_deref(), Some("1.0.0"));
    assert_eq!(agent.predict().unwrap().0, 200);
    std::thread::sleep(Duration::from_secs(2)); // a few save retries
    assert_eq!(std::fs::read(&state_file).unwrap(), before, "nothing half-written");
    let log = agent_log(&w, d);
    assert_eq!(log.matches("(retrying later)").count(), 1, "one line per distinct error:\n{log}");

    let states = w.fleet.states_seen.load(Ordering::SeqCst);
    std::fs::remove_dir(&obstacle).unwrap();
    wait_for("the state saved again", T, || std::fs::read(&state_file).is_ok_and(|now| now != before));
    assert!(reserved(&std::fs::read(&state_file).unwrap()) > reserved(&before), "a new counter block is reserved");
    wait_for("signed state again", T, || w.fleet.states_seen.load(Ordering::SeqCst) > states);
    assert_eq!(agent.predict().unwrap().0, 200);
}
