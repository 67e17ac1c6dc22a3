//! The fleet server through its real HTTP API: auth, the publish gate's
//! refusals, provisioning, restart.

mod common;

use common::*;
use outpost_fleet::client::ClientError;
use serde_json::json;

#[test]
fn operator_endpoints_need_the_token() {
    let fleet = Fleet::start();
    assert_eq!(http_get(fleet.api_port, "/health").expect("health"), (200, r#"{"status":"healthy"}"#.into()));
    assert_eq!(http_get(fleet.api_port, "/ready").expect("ready").0, 200);
    assert_eq!(http_get(fleet.api_port, "/metrics").expect("metrics").0, 200);
    for auth in [None, Some("Bearer wrong-token-0123456789abcd"), Some(TOKEN), Some("Basic abc")] {
        for (method, path) in [("GET", "/v1/devices"), ("POST", "/v1/devices"), ("GET", "/v1/models"), ("POST", "/v1/deploy")] {
            let (status, body) = http(fleet.api_port, method, path, auth, "{}").expect("request");
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
            assert_eq!(v["error"]["code"], "unauthorized");
            assert!(v["error"]["message"].as_str().expect("message").contains("Bearer"), "{body}");
        }
    }
    let (status, body) = http(fleet.api_port, "GET", "/v1/devices", Some(&format!("Bearer {TOKEN}")), "").expect("ok");
    assert_eq!(status, 200, "{body}");
    // Same error style for everything else.
    let (status, body) = http(fleet.api_port, "POST", "/v1/devices", Some(&format!("Bearer {TOKEN}")), "{nope").expect("bad");
    assert_eq!(status, 400);
    assert!(body.contains(r#""code":"bad_request""#), "{body}");
}

/// Models, bundle files and audit refusals after each refused publish.
fn snapshot(fleet: &Fleet) -> (serde_json::Value, usize) {
    (fleet.api().get("/v1/models").expect("models")["versions"].clone(), fleet.bundle_files())
}

fn refusal(r: Result<serde_json::Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message, .. }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn publish_refusals_say_why_and_store_nothing() {
    let fleet = Fleet::start();
    let f = fixtures();
    let (model, train, test) = (f.join("bc_mlp.onnx"), f.join("data/bc_train.csv"), f.join("data/bc_test.csv"));
    let ok = fleet.publish_bc("1.0.0");
    assert_eq!(ok["sequence"], 1);
    let before = snapshot(&fleet);
    assert_eq!(before.1, 1);

    // Accuracy below the minimum: the measured figure is in the message.
    let (status, msg) = refusal(fleet.publish(&model, "1.1.0", &train, &test, 0.99));
    assert_eq!(status, 422);
    assert!(msg.contains("accuracy 0.9580") && msg.contains("0.99"), "{msg}");
    assert_eq!(snapshot(&fleet), before);

    // A CSV whose width does not match the model input.
    let (status, msg) = refusal(fleet.publish(&model, "1.1.0", &train, &f.join("data/digits_test.csv"), 0.5));
    assert_eq!(status, 422);
    assert!(msg.contains("65 columns") && msg.contains("30 values per sample"), "{msg}");
    assert_eq!(snapshot(&fleet), before);

    // A model that does not load.
    for bad in ["truncated.onnx", "not_a_model.onnx"] {
        let (status, msg) = refusal(fleet.publish(&f.join("bad").join(bad), "1.1.0", &train, &test, 0.5));
        assert_eq!(status, 422);
        assert!(msg.contains("cannot load this model") && msg.contains(bad), "{msg}");
        assert_eq!(snapshot(&fleet), before);
    }

    // A version that already exists.
    let (status, msg) = refusal(fleet.publish(&model, "1.0.0", &train, &test, 0.5));
    assert_eq!(status, 409);
    assert!(msg.contains("bc@1.0.0 already exists"), "{msg}");
    assert_eq!(snapshot(&fleet), before);

    // The next good publish takes the next sequence: refusals used none.
    assert_eq!(fleet.publish_bc("1.1.0")["sequence"], 2);
    assert_eq!(std::fs::read_dir(fleet.data().join("uploads")).expect("uploads").count(), 0, "uploads are single-use");

    // Every attempt is in the audit log with its result.
    let audit = fleet.api().get("/v1/audit?limit=100").expect("audit")["audit"].clone();
    let publishes: Vec<&str> = audit
        .as_array()
        .expect("list")
        .iter()
        .filter(|e| e["action"] == "publish")
        .map(|e| e["result"].as_str().expect("result"))
        .collect();
    assert_eq!(publishes.len(), 7, "{audit}");
    assert_eq!(publishes.iter().filter(|r| r.starts_with("refused")).count(), 5);
}

#[test]
fn publish_provision_deploy_round_trip_survives_restart() {
    let mut fleet = Fleet::start();
    let report = fleet.publish_bc("1.0.0");
    assert!(report["accuracy"]["accuracy"].as_f64().expect("accuracy") > 0.95);
    assert_eq!(report["self_test_vectors"], 4);

    let creds = fleet.provision("pi-1");
    assert_eq!(creds.id, "pi-1");
    assert!(creds.config_text.contains(&format!("broker = \"mqtt://127.0.0.1:{}\"", fleet.broker_port)));
    let root = outpost_fleet::keys::load_trust_root(&fleet.dir.path().join("keys")).expect("root");
    assert_eq!(&creds.root, root.key(), "the config pins the fleet's root key");
    // A second provision of the same id is refused.
    let again = fleet.api().post_json("/v1/devices", &json!({"device_id": "pi-1"}));
    assert!(matches!(again, Err(ClientError::Api { status: 409, .. })), "{again:?}");
    let bad = fleet.api().post_json("/v1/devices", &json!({"device_id": "a/b"}));
    assert!(matches!(bad, Err(ClientError::Api { status: 422, .. })), "{bad:?}");

    let deployed = fleet.api().post_json("/v1/deploy", &json!({"target": "bc@1.0.0", "devices": ["pi-1"]})).expect("deploy");
    assert_eq!(deployed["deployed"][0]["sequence"], 1);
    let unknown = fleet.api().post_json("/v1/deploy", &json!({"target": "bc@9.9.9", "devices": ["pi-1"]}));
    assert!(matches!(unknown, Err(ClientError::Api { status: 422, .. })), "{unknown:?}");

    fleet.restart();
    let devices = fleet.api().get("/v1/devices").expect("devices");
    assert_eq!(devices["devices"][0]["id"], "pi-1");
    assert_eq!(fleet.api().get("/v1/models").expect("models")["versions"][0]["version"], "1.0.0");
    let d = fleet.api().get("/v1/devices/pi-1").expect("device");
    assert_eq!(d["directive"]["sequence"], 1);
    // Credentials still work, and the retained directive is back on the
    // (in-memory) embedded broker after the restart.
    let (client, mut conn) = mqtt(fleet.broker_port, "pi-1", "pi-1", &creds.password);
    wait_connack(&mut conn).expect("device connects after restart");
    client.subscribe(outpost_runtime::protocol::topics::desired("pi-1"), rumqttc::QoS::AtLeastOnce).expect("sub");
    let p = wait_publish(&mut conn, std::time::Duration::from_secs(10), |p| p.topic.ends_with("/desired")).expect("directive");
    let trust = outpost_runtime::bundle::TrustRoot::new(creds.root.clone());
    let v = outpost_runtime::protocol::verify_directive(&p.payload, &trust, "pi-1", None, 0, &Default::default())
        .expect("the directive verifies against the pinned root");
    assert_eq!((v.value.model.as_str(), v.value.version.as_str(), v.value.sequence), ("bc", "1.0.0", 1));
    // A new publish after the restart continues the sequence.
    assert_eq!(fleet.publish_bc("1.0.1")["sequence"], 2);
}

#[test]
fn cli_round_trip() {
    let fleet = Fleet::start();
    let bin = env!("CARGO_BIN_EXE_outpost-fleet");
    let f = fixtures();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("OUTPOST_SERVER", format!("http://127.0.0.1:{}", fleet.api_port))
            .env("OUTPOST_TOKEN", TOKEN)
            .output()
            .expect("run");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let p = |p: &std::path::Path| p.display().to_string();
    let (code, out, err) = run(&[
        "publish", &p(&f.join("bc_gb.onnx")), "--name", "gb", "--version", "1.0.0", "--train-data",
        &p(&f.join("data/bc_train.csv")), "--test-data", &p(&f.join("data/bc_test.csv")), "--min-accuracy", "0.9", "--json",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["name"], "gb");
    let (code, _, err) = run(&[
        "publish", &p(&f.join("bc_gb.onnx")), "--name", "gb", "--version", "1.0.1", "--train-data",
        &p(&f.join("data/bc_train.csv")), "--test-data", &p(&f.join("data/bc_test.csv")), "--min-accuracy", "0.999",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is below the minimum accuracy 0.999"), "{err}");
    assert_eq!(err.trim().lines().last().map(|l| l.starts_with("outpost-fleet: accuracy")), Some(true), "{err}");

    let out_path = fleet.dir.path().join("dev.toml");
    let (code, out, err) = run(&["provision", "dev-9", "--tag", "pi4", "--tag", "lab", "--force", "--out", &p(&out_path)]);
    assert_eq!(code, Some(0), "{out}{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&out_path).expect("written").permissions().mode() & 0o777, 0o600);
    }
    let (code, _, err) = run(&["provision", "dev-10", "--out", &p(&out_path)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists"), "{err}");
    let (code, out, _) = run(&["devices"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("DEVICE") && out.contains("dev-9") && out.contains("pi4,lab"), "{out}");
    assert!(!out.contains("dev-10"), "a refused provision registers nothing");
    let (code, out, _) = run(&["devices", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("json")["devices"][0]["id"], "dev-9");
    let (code, out, err) = run(&["deploy", "gb@1.0.0", "--devices", "dev-9"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("dev-9") && out.contains("gb@1.0.0"), "{out}");
    let (code, _, err) = run(&["devices", "--token", "nope-nope-nope-nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Bearer"), "{err}");
}

#[test]
fn serve_stops_on_a_config_mistake_naming_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        ("api_token = \"0123456789abcdef0\"\nkeys_dir = \"k\"\n", "data_dir: missing"),
        ("data_dir = \"d\"\napi_token = \"0123456789abcdef0\"\nkeys_dir = \"k\"\n[broker]\nurl = \"tcp://x\"\n", "broker.url:"),
        ("data_dir = \"d\"\napi_token = \"0123456789abcdef0\"\nkeys_dir = \"nokeys\"\n[broker]\nlisten = \"127.0.0.1:0\"\n", "keys_dir"),
    ];
    for (text, want) in cases {
        let config = dir.path().join("fleet.toml");
        std::fs::write(&config, text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-fleet"))
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err:?} should name {want:?}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
