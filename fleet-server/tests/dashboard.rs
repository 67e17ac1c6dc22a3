//! The dashboard in a real browser: headless Chromium opens the page of a
//! running fleet server (token in the URL fragment), runs its JavaScript,
//! and the dumped DOM must show the devices and the rollout's stages.
//!
//! Needs `chromium` (Debian's package of that name) or `chromium-browser`;
//! without one the test says so and passes vacuously — CI installs it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use outpost_runtime::bundle::{read_bundle_unverified, Limits};
use outpost_runtime::drift::DeviceSketch;
use outpost_runtime::protocol::{topics, DeviceSigned, DeviceState, LatencySketch, ModelRef, SketchMessage, Status, SKETCH_FORMAT};
use serde_json::json;

/// `creds` reports serving bc@`version` (signed state) and sends one sketch
/// of the breast-cancer test rows, so the version is "in service" with
/// drift data.
fn serve_with_sketch(fleet: &Fleet, creds: &DeviceCreds, version: &str) {
    let models = fleet.api().get("/v1/models").expect("models");
    let sha = models["versions"][0]["bundle_sha256"].as_str().expect("sha").to_string();
    let file = std::fs::File::open(fleet.data().join("bundles").join(format!("{sha}.outpost"))).expect("bundle");
    let limits = Limits::default();
    let reference = read_bundle_unverified(file, &limits).expect("bundle").manifest.decode_unverified(&limits).expect("manifest").reference;
    let mut sketch = DeviceSketch::empty(&reference);
    let text = std::fs::read_to_string(fixtures().join("data/bc_test.csv")).expect("csv");
    for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
        let mut v: Vec<f32> = line.split(',').map(|x| x.trim().parse().expect("number")).collect();
        let label = v.pop().expect("label");
        sketch.push(&reference, &v, &vec![label; reference.outputs.len()]).expect("push");
    }
    let mut state = DeviceState::new(Status::Serving);
    state.model = Some("bc".into());
    state.version = Some(version.into());
    state.committed = true;
    let message = SketchMessage {
        format: SKETCH_FORMAT,
        model: ModelRef { name: "bc".into(), version: version.into() },
        window_start_unix_ms: 1,
        window_end_unix_ms: 2,
        drift: Some(sketch),
        latency: LatencySketch::default(),
    };
    let (client, mut conn) = mqtt(fleet.broker_port, &creds.id, &creds.id, &creds.password);
    wait_connack(&mut conn).expect("connect");
    let qos = rumqttc::QoS::AtLeastOnce;
    client.publish(topics::state(&creds.id), qos, true, DeviceSigned::sign(&creds.id, 1, &state, &creds.key).expect("sign").to_bytes()).expect("state");
    client.publish(topics::sketch(&creds.id), qos, false, DeviceSigned::sign(&creds.id, 1, &message, &creds.key).expect("sign").to_bytes()).expect("sketch");
    let mut acks = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while acks < 2 && std::time::Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) = conn.recv_timeout(std::time::Duration::from_millis(200)) {
            acks += 1;
        }
    }
    assert_eq!(acks, 2);
    assert!(eventually(|| fleet.api().get("/v1/drift/bc/1.0.0").map(|v| v["devices"] == 1).unwrap_or(false)), "sketch merged");
    assert!(eventually(|| device(fleet, &creds.id)["version"] == version), "state recorded");
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].into_iter().find_map(|name| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
    })
}

/// The DOM after the page's scripts ran (5 s of virtual time: the first
/// refresh and a couple of auto-refreshes).
fn dump_dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(browser)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_devices_and_rollout_stages() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED dashboard_shows_devices_and_rollout_stages: no chromium or chromium-browser on PATH (apt-get install chromium)");
        return;
    };
    let fleet = Fleet::start();
    fleet.publish_bc("1.0.0");
    let ids = ["dash-alpha", "dash-beta", "dash-gamma"];
    let creds: Vec<DeviceCreds> = ids.iter().map(|id| fleet.provision(id)).collect();
    serve_with_sketch(&fleet, &creds[0], "1.0.0");

    // The page itself needs no token and holds no data.
    let (status, page) = http_get(fleet.api_port, "/dashboard").expect("page");
    assert_eq!(status, 200);
    assert!(page.contains("<title>Outpost fleet</title>") && !page.contains("dash-alpha"));
    assert_eq!(http_get(fleet.api_port, "/").expect("root").0, 200);

    // A rollout through the API, when this server has the endpoint.
    let started = fleet.api().post_json(
        "/v1/rollouts",
        &json!({"target": "bc@1.0.0", "stages": [50, 100], "bake": "1h", "on_failure": "halt"}),
    );
    let rollout = match started {
        Ok(v) => Some(v),
        Err(outpost_fleet::client::ClientError::Api { status: 404, .. }) => {
            eprintln!("NOTE: POST /v1/rollouts is 404 on this server; checking devices only");
            None
        }
        Err(e) => panic!("starting a rollout: {e}"),
    };

    let url = format!("http://127.0.0.1:{}/dashboard#token={TOKEN}", fleet.api_port);
    let dom = dump_dom(&browser, &url);
    for id in ids {
        assert!(dom.contains(&format!("data-device=\"{id}\"")), "device {id} on the page:\n{dom}");
    }
    assert!(dom.contains("bc") && dom.contains("1.0.0"), "the version table:\n{dom}");
    // Drift per feature of the version in service.
    assert!(dom.contains("data-drift=\"bc@1.0.0\"") && dom.contains("<td>mean radius</td>"), "drift table:\n{dom}");
    // (The script's own text holds the messages: look in the status line.)
    assert!(dom.contains("<span class=\"muted\">updated "), "the status line says it refreshed:\n{dom}");
    if let Some(r) = rollout {
        let id = r["id"].as_str().expect("rollout id");
        assert!(dom.contains(&format!("data-rollout=\"{id}\"")), "rollout {id} on the page:\n{dom}");
        assert!(dom.contains("data-stage=\"1\"") && dom.contains("data-stage=\"2\""), "both stages:\n{dom}");
        assert!(dom.contains("stage 1: 50%") && dom.contains("stage 2: 100%"), "stage percents:\n{dom}");
    }

    // A wrong token shows as such, with no data.
    let dom = dump_dom(&browser, &format!("http://127.0.0.1:{}/dashboard#token=wrong", fleet.api_port));
    assert!(dom.contains("<span class=\"note\">the API refused the token") && !dom.contains("data-device="), "{dom}");
}
