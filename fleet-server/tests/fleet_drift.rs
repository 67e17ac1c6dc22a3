//! The fleet's drift view over the real server and broker: two devices
//! send signed telemetry and real sketches of the breast-cancer test rows
//! (one of them shifted); the merged view, the device list, the MQTT alert
//! and summary, `/metrics` (checked by promtool) and the CLI must all show it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use outpost_runtime::bundle::{read_bundle_unverified, Limits};
use outpost_runtime::drift::{DeviceSketch, DriftReport, ReferenceSketch, Thresholds};
use outpost_runtime::protocol::{
    topics, DeviceSigned, DriftSummary, LatencySketch, ModelRef, SketchMessage, Status, Telemetry, SKETCH_FORMAT,
    TELEMETRY_FORMAT,
};
use serde_json::Value;

/// The published version's reference sketch, read back from the stored bundle.
fn reference_of(fleet: &Fleet, version: &str) -> ReferenceSketch {
    let models = fleet.api().get("/v1/models").expect("models");
    let sha = models["versions"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["version"] == version))
        .and_then(|v| v["bundle_sha256"].as_str())
        .expect("published")
        .to_string();
    let file = std::fs::File::open(fleet.data().join("bundles").join(format!("{sha}.outpost"))).expect("bundle");
    let limits = Limits::default();
    let bundle = read_bundle_unverified(file, &limits).expect("read bundle");
    bundle.manifest.decode_unverified(&limits).expect("manifest").reference
}

/// bc_test.csv rows: (30 features, label).
fn test_rows() -> Vec<(Vec<f32>, f32)> {
    let text = std::fs::read_to_string(fixtures().join("data/bc_test.csv")).expect("bc_test.csv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: Vec<f32> = l.split(',').map(|x| x.trim().parse().expect("number")).collect();
            let label = v.pop().expect("label");
            (v, label)
        })
        .collect()
}

/// A device's window over the rows, `mean radius` moved by `shift`.
fn window_sketch(reference: &ReferenceSketch, shift: f32, times: usize) -> DeviceSketch {
    let mut s = DeviceSketch::empty(reference);
    for _ in 0..times {
        for (features, label) in test_rows() {
            let mut f = features.clone();
            f[0] += shift;
            let outputs = vec![label; reference.outputs.len()];
            s.push(reference, &f, &outputs).expect("push");
        }
    }
    s
}

fn send(broker: u16, creds: &DeviceCreds, reference: &ReferenceSketch, shift: f32) -> DriftSummary {
    let (client, mut conn) = mqtt(broker, &creds.id, &creds.id, &creds.password);
    wait_connack(&mut conn).expect("device connects");
    let sketch = window_sketch(reference, shift, 2);
    // The device's own verdict, as the agent computes it.
    let report = DriftReport::evaluate(reference, &sketch, &Thresholds::default()).expect("evaluate");
    let summary = DriftSummary {
        drift: report.drift,
        score: report.score,
        flagged: report.flagged().into_iter().map(str::to_string).collect(),
        samples: report.window.samples,
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let model = ModelRef { name: "bc".into(), version: "1.0.0".into() };
    let n = sketch.samples();
    let t = Telemetry {
        format: TELEMETRY_FORMAT,
        model: Some(model.clone()),
        status: Status::Serving,
        committed: true,
        window_start_unix_ms: now - 10_000,
        window_end_unix_ms: now,
        requests: n,
        input_errors: 0,
        failures: 0,
        rows: n,
        error_rate: 0.0,
        latency_p50_ms: Some(0.5),
        latency_p99_ms: Some(1.0),
        drift: Some(summary.clone()),
        memory_rss_bytes: None,
        dropped_while_offline: 0,
        uptime_secs: 10,
    };
    let s = SketchMessage {
        format: SKETCH_FORMAT,
        model,
        window_start_unix_ms: now - 10_000,
        window_end_unix_ms: now,
        drift: Some(sketch),
        latency: LatencySketch { buckets_log2_us: vec![0, 0, 0, 0, 0, 0, 0, 0, 0, n] },
    };
    let qos = rumqttc::QoS::AtLeastOnce;
    client.publish(topics::telemetry(&creds.id), qos, false, DeviceSigned::sign(&creds.id, 1, &t, &creds.key).expect("sign").to_bytes()).expect("publish");
    client.publish(topics::sketch(&creds.id), qos, false, DeviceSigned::sign(&creds.id, 1, &s, &creds.key).expect("sign").to_bytes()).expect("publish");
    // Drive the connection until both are acknowledged.
    let mut acks = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acks < 2 && std::time::Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) = conn.recv_timeout(Duration::from_millis(200)) {
            acks += 1;
        }
    }
    assert_eq!(acks, 2, "broker acknowledged telemetry and sketch");
    let _ = client.disconnect();
    summary
}

fn column<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["features"].as_array().and_then(|a| a.iter().find(|c| c["name"] == name)).unwrap_or_else(|| panic!("{name} in {view}"))
}

#[test]
fn fleet_drift_view_merges_real_sketches_and_alerts() {
    let fleet = Fleet::start();
    fleet.publish_bc("1.0.0");
    let reference = reference_of(&fleet, "1.0.0");
    let steady = fleet.provision("steady");
    let shifted = fleet.provision("shifted");
    let _watcher = fleet.provision("watcher");

    // A dashboard's view of the fleet topics, through the broker's read-only
    // `dashboard` identity (a device may not read them). The watcher device
    // only shows in the device list.
    let (wclient, mut wconn) = mqtt(fleet.broker_port, "dashboard", "dashboard", DASHBOARD_PASSWORD);
    wait_connack(&mut wconn).expect("the dashboard connects");
    wclient.subscribe("outpost/v1/fleet/#", rumqttc::QoS::AtLeastOnce).expect("subscribe");
    wait_publish(&mut wconn, Duration::from_millis(500), |_| false);

    // Before any sketch: the view exists, with nothing merged.
    let empty = fleet.api().get("/v1/drift/bc/1.0.0").expect("drift view");
    assert_eq!((empty["devices"].as_u64(), empty["samples"].as_u64(), empty["drift"].as_bool()), (Some(0), Some(0), Some(false)));

    let calm = send(fleet.broker_port, &steady, &reference, 0.0);
    assert!(!calm.drift, "unshifted test rows do not drift: {calm:?}");
    // +2 reference sd (~7) on mean radius.
    let moved = send(fleet.broker_port, &shifted, &reference, 7.0);
    assert!(moved.drift && moved.flagged.contains(&"mean radius".to_string()), "{moved:?}");

    let alert = wait_publish(&mut wconn, Duration::from_secs(10), |p| p.topic == "outpost/v1/fleet/alerts").expect("drift alert");
    assert!(!alert.retain);
    let a: Value = serde_json::from_slice(&alert.payload).expect("alert JSON");
    assert_eq!((a["kind"].as_str(), a["device"].as_str(), a["model"].as_str(), a["version"].as_str()), (Some("drift"), Some("shifted"), Some("bc"), Some("1.0.0")));
    assert!(a["flagged"].as_array().expect("flagged").iter().any(|f| f == "mean radius"));
    assert!(a["score"].as_f64().expect("score") >= 1.0);

    let mut view = Value::Null;
    assert!(
        eventually(|| {
            view = fleet.api().get("/v1/drift/bc/1.0.0").expect("drift view");
            view["devices"] == 2
        }),
        "both devices merged: {view}"
    );
    let rows = test_rows().len() as u64;
    assert_eq!(view["samples"].as_u64(), Some(4 * rows));
    assert_eq!(view["features"].as_array().map(Vec::len), Some(30));
    let radius = column(&view, "mean radius");
    assert_eq!(radius["drift"], true, "half the fleet shifted by 2 sd: {radius}");
    let ks = radius["ks"].as_array().expect("ks interval");
    assert!(ks[0].as_f64() <= ks[1].as_f64() && ks[0].as_f64() > Some(0.2), "{radius}");
    assert!(radius["psi"].as_f64() > Some(0.1) && radius["js"].as_f64() > Some(0.0));
    assert_eq!(column(&view, "mean texture")["drift"], false, "untouched features stay calm");
    assert_eq!(view["devices_drifting"], serde_json::json!(["shifted"]));
    assert!(view["drift"].as_bool() == Some(true) && view["outputs"].is_array());

    // The device list carries each device's latest verdict.
    let devices = fleet.api().get("/v1/devices").expect("devices");
    let verdict = |id: &str| devices["devices"].as_array().and_then(|a| a.iter().find(|d| d["id"] == id)).map(|d| d["drift"]["drift"].clone());
    assert_eq!(verdict("shifted"), Some(Value::Bool(true)));
    assert_eq!(verdict("steady"), Some(Value::Bool(false)));
    assert_eq!(verdict("watcher"), Some(Value::Null));

    // The retained summary names the drifting device.
    let summary = wait_publish(&mut wconn, Duration::from_secs(10), |p| {
        p.topic == "outpost/v1/fleet/summary"
            && serde_json::from_slice::<Value>(&p.payload).map(|v| v["drifting"] == serde_json::json!(["shifted"])).unwrap_or(false)
    })
    .expect("summary with the drifting device");
    let s: Value = serde_json::from_slice(&summary.payload).expect("summary JSON");
    assert_eq!(s["devices"], 3);
    assert!(s["online"].as_u64() >= Some(2), "{s}");

    // Unknown versions and missing tokens.
    let (status, _) = http(fleet.api_port, "GET", "/v1/drift/bc/9.9.9", Some(&format!("Bearer {TOKEN}")), "").expect("http");
    assert_eq!(status, 404);
    let (status, _) = http_get(fleet.api_port, "/v1/drift/bc/1.0.0").expect("http");
    assert_eq!(status, 401);
    let (status, _) = http(fleet.api_port, "GET", "/v1/drift/bc/1.0.0?scope=forever", Some(&format!("Bearer {TOKEN}")), "").expect("http");
    assert_eq!(status, 422);
    let lifetime = fleet.api().get("/v1/drift/bc/1.0.0?scope=lifetime").expect("lifetime");
    assert_eq!(lifetime["samples"], view["samples"]);

    // Metrics: the new series, and promtool accepts the whole exposition.
    let (status, metrics) = http_get(fleet.api_port, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("outpost_fleet_observations_total{kind=\"telemetry\"} 2"), "{metrics}");
    assert!(metrics.contains("outpost_fleet_observations_total{kind=\"sketch\"} 2"));
    assert!(metrics.contains("outpost_fleet_drifting_devices 1"));
    promtool_check(&metrics);

    // The CLI over the same endpoint.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_outpost-fleet"))
            .args(args)
            .args(["--server", &format!("http://127.0.0.1:{}", fleet.api_port), "--token", TOKEN])
            .output()
            .expect("run outpost-fleet");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json: Value = serde_json::from_str(&cli(&["drift", "bc@1.0.0", "--json"])).expect("--json output");
    assert_eq!((json["model"].as_str(), json["version"].as_str(), json["devices"].as_u64()), (Some("bc"), Some("1.0.0"), Some(2)));
    assert_eq!(json["devices_drifting"], serde_json::json!(["shifted"]));
    let table = cli(&["drift", "bc@1.0.0"]);
    assert!(table.contains("mean radius") && table.contains("DRIFT") && table.contains("shifted"), "{table}");
    let list = cli(&["devices"]);
    assert!(list.contains("DRIFT mean radius"), "{list}");
}

/// `promtool check metrics` on the exposition, when promtool is installed.
fn promtool_check(metrics: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED promtool check: promtool is not installed");
        return;
    };
    child.stdin.take().expect("stdin").write_all(metrics.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
