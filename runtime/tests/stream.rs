//! Streaming round trips through a real mosquitto broker: MQTT 5
//! correlation data and the `id` fallback, response topics, malformed
//! messages answered with an error while the stream goes on, and a model
//! swap taking effect on the next message.
#![cfg(feature = "mqtt")]

mod stream_support;

use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::model::{LoadOptions, Model};
use outpost_runtime::server::{Deployed, ModelSlot};
use outpost_runtime::stream::mqtt::{MqttConfig, MqttStream};
use outpost_runtime::stream::StreamConfig;
use outpost_runtime::tensor::{TensorData, TensorValues};
use serde_json::json;
use stream_support::*;

const WAIT: Duration = Duration::from_secs(10);

fn label_of(model: &Model, row: &[f32]) -> i64 {
    let out = model.run(vec![TensorData::f32(vec![1, row.len()], row.to_vec()).unwrap()]).unwrap();
    match &out[0].values {
        TensorValues::I64(v) => v[0],
        other => panic!("label output: {other:?}"),
    }
}

#[test]
fn round_trip_with_correlation_ids_and_malformed_messages() {
    let Some(broker) = Broker::start() else { return };
    let slot = Arc::new(ModelSlot::with(
        Deployed::load_file(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap(),
    ));
    let config = MqttConfig::new(broker.url(), vec!["sensors/+/reading".into()]);
    let stream = MqttStream::start(config, slot.clone(), StreamConfig::default()).expect("stream starts");
    assert!(stream.wait_subscribed(WAIT), "the stream subscribed");

    let app = TestClient::connect(&broker, "test-app");
    app.subscribe("sensors/+/reading/prediction");
    app.subscribe("replies/app-1");
    let model = Model::load(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap();
    let rows = bc_rows();

    // 1. MQTT 5 correlation data, no id field.
    app.publish("sensors/a/reading", json!({"features": rows[0]}).to_string(), Some(b"corr-1"), None);
    let reply = app.next(WAIT).expect("a reply");
    assert_eq!(topic_of(&reply), "sensors/a/reading/prediction");
    assert_eq!(correlation_of(&reply).as_deref(), Some(&b"corr-1"[..]));
    let body = json_of(&reply);
    assert_eq!(body["id"], serde_json::Value::Null);
    assert_eq!(body["prediction"], label_of(&model, &rows[0]), "{body}");
    assert!(body["probability"].as_f64().unwrap() > 0.5);
    assert_eq!(body["model"]["name"], "bc_mlp");

    // 2. The id field when there is no correlation data.
    app.publish("sensors/b/reading", json!({"id": "abc", "features": rows[1]}).to_string(), None, None);
    let reply = app.next(WAIT).expect("a reply");
    assert_eq!(topic_of(&reply), "sensors/b/reading/prediction");
    assert_eq!(correlation_of(&reply), None);
    let body = json_of(&reply);
    assert_eq!(body["id"], "abc");
    assert_eq!(body["prediction"], label_of(&model, &rows[1]));

    // 3. Malformed messages: each gets an error reply, paired by its id or
    //    its correlation data; none stops the stream.
    let bad: [(&str, Option<&[u8]>, &str, serde_json::Value); 4] = [
        (r#"{"id": 7, "features": [1, 2]}"#, None, "invalid_shape", json!(7)),
        ("not json", Some(b"corr-bad"), "malformed_json", serde_json::Value::Null),
        (r#"{"id": "nan", "features": [NaN]}"#, None, "non_finite", json!("nan")),
        (r#"{"id": [1], "wrong": true}"#, None, "invalid_field", json!([1])),
    ];
    for (payload, corr, code, id) in &bad {
        app.publish("sensors/c/reading", *payload, *corr, None);
        let reply = app.next(WAIT).unwrap_or_else(|| panic!("an error reply to {payload}"));
        let body = json_of(&reply);
        assert_eq!(body["error"]["code"], *code, "{payload} → {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert_eq!(body["id"], *id, "{body}");
        assert_eq!(correlation_of(&reply).as_deref(), *corr);
        assert!(body.get("prediction").is_none());
    }

    // 4. The stream goes on after them.
    app.publish("sensors/d/reading", json!({"id": 99, "features": rows[2]}).to_string(), Some(b"corr-2"), None);
    let body = json_of(&app.next(WAIT).expect("the stream still answers"));
    assert_eq!(body["id"], 99);
    assert_eq!(body["prediction"], label_of(&model, &rows[2]));

    // 5. An MQTT 5 response topic wins over the configured output topic.
    app.publish("sensors/e/reading", json!({"features": rows[3]}).to_string(), Some(b"corr-3"), Some("replies/app-1"));
    let reply = app.next(WAIT).expect("a reply");
    assert_eq!(topic_of(&reply), "replies/app-1");
    assert_eq!(correlation_of(&reply).as_deref(), Some(&b"corr-3"[..]));

    // 6. Named inputs work as on POST /predict.
    app.publish("sensors/f/reading", json!({"id": "named", "inputs": {"features": [rows[4]]}}).to_string(), None, None);
    let body = json_of(&app.next(WAIT).expect("a reply"));
    assert_eq!(body["id"], "named");
    assert!(body["outputs"]["output_label"].is_array(), "{body}");

    // 7. A model swap takes effect on the next message.
    slot.swap(Deployed::load_file(fixture("bc_gb.onnx"), &LoadOptions::default()).unwrap());
    app.publish("sensors/g/reading", json!({"id": "swapped", "features": rows[0]}).to_string(), None, None);
    let body = json_of(&app.next(WAIT).expect("a reply"));
    assert_eq!(body["model"]["name"], "bc_gb", "{body}");

    // Nothing else arrived: one reply per message, no reply to a reply.
    assert!(app.next(Duration::from_millis(300)).is_none());
    let stats = stream.stats().snapshot();
    assert_eq!(stats.received, 10, "{stats:?}");
    assert_eq!(stats.predicted, 6, "{stats:?}");
    assert_eq!(stats.input_errors, 4, "{stats:?}");
    assert_eq!(stats.dropped, 0, "{stats:?}");
    assert_eq!(stats.published, 10, "{stats:?}");
    let served = slot.current().unwrap();
    assert_eq!(served.stats().snapshot().requests, 1, "the swapped-in model counted its one prediction");
    stream.shutdown();
}

#[test]
fn a_wide_filter_does_not_feed_replies_back_and_reconnects_after_a_broker_restart() {
    let Some(broker) = Broker::start() else { return };
    let slot = Arc::new(ModelSlot::with(
        Deployed::load_file(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap(),
    ));
    // `sensors/#` also matches `sensors/x/prediction`, the reply topic.
    let config = MqttConfig::new(broker.url(), vec!["sensors/#".into()]);
    let stream = MqttStream::start(config, slot, StreamConfig::default()).unwrap();
    assert!(stream.wait_subscribed(WAIT));
    let app = TestClient::connect(&broker, "wide-app");
    app.subscribe("sensors/#");
    let rows = bc_rows();
    app.publish("sensors/x", json!({"id": 1, "features": rows[0]}).to_string(), None, None);
    let mut seen = Vec::new();
    while let Some(p) = app.next(Duration::from_millis(800)) {
        seen.push(topic_of(&p));
    }
    // The app sees its own message and one reply; the stream saw its own
    // reply neither as input nor twice.
    assert_eq!(seen, vec!["sensors/x".to_string(), "sensors/x/prediction".to_string()]);
    let stats = stream.stats().snapshot();
    assert_eq!((stats.received, stats.predicted), (1, 1), "{stats:?}");
    // A third party's reply is not an input either.
    app.publish("sensors/y/prediction", "{}", None, None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stream.stats().snapshot().ignored, 1);

    // Broker restart on the same port: the stream reconnects and resubscribes.
    let port = broker.port;
    drop(app);
    drop(broker);
    // The stream notices the loss first (else its old "subscribed" would
    // pass the wait below before it resubscribed).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stream.is_connected() {
        assert!(std::time::Instant::now() < deadline, "the stream noticed the broker went away");
        std::thread::sleep(Duration::from_millis(20));
    }
    let broker = restart_on(port);
    assert!(stream.wait_subscribed(Duration::from_secs(30)), "resubscribed after the restart");
    let app = TestClient::connect(&broker, "wide-app-2");
    app.subscribe("sensors/+/prediction");
    app.publish("sensors/z", json!({"id": 2, "features": rows[1]}).to_string(), None, None);
    let body = json_of(&app.next(WAIT).expect("answers after the restart"));
    assert_eq!(body["id"], 2);
    stream.shutdown();
}

/// A broker on a given port (after the previous one there was killed).
fn restart_on(port: u16) -> Broker {
    for _ in 0..100 {
        if let Some(b) = Broker::start_on(port) {
            return b;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("could not restart mosquitto on port {port}");
}

/// `outpost-runtime serve --mqtt …`: the binary predicts on MQTT messages
/// from the model it serves over HTTP, and the stream's counters show on
/// the same `/metrics`.
#[test]
fn serve_with_mqtt_flag_predicts_over_both_transports() {
    use std::io::{Read, Write};
    let Some(broker) = Broker::start() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-runtime"))
        .args(["serve", "--model"])
        .arg(fixture("bc_mlp.onnx"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--mqtt", &broker.url(), "--mqtt-in", "sensors/+/reading"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn outpost-runtime");
    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !get("/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(std::time::Instant::now() < deadline, "serve --mqtt never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let model = Model::load(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap();
    let rows = bc_rows();
    let app = TestClient::connect(&broker, "serve-flag-app");
    app.subscribe("sensors/+/reading/prediction");
    // The stream subscribes once connected; retry the first message until
    // an answer comes back.
    let mut reply = None;
    for _ in 0..20 {
        app.publish("sensors/7/reading", json!({"id": "r1", "features": rows[0]}).to_string(), None, None);
        if let Some(p) = app.next(Duration::from_millis(500)) {
            reply = Some(p);
            break;
        }
    }
    let reply = reply.expect("a prediction over MQTT");
    assert_eq!(topic_of(&reply), "sensors/7/reading/prediction");
    let body = json_of(&reply);
    assert_eq!(body["id"], "r1", "{body}");
    assert_eq!(body["prediction"], json!(label_of(&model, &rows[0])), "{body}");
    let metrics = get("/metrics").expect("metrics");
    let predicted = metrics
        .lines()
        .find(|l| l.starts_with("outpost_stream_predictions_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(predicted.is_some_and(|n| n >= 1.0), "stream counters on /metrics: {predicted:?}");
    let _ = child.kill();
    let _ = child.wait();
}
