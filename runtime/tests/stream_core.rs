//! The broker-independent streaming core: backpressure (a full queue drops
//! and counts, never blocks the caller), replies for every accepted
//! message, no model → error reply, shutdown answering what was queued.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_runtime::model::LoadOptions;
use outpost_runtime::server::{Deployed, ModelSlot};
use outpost_runtime::stream::{InMessage, OutputTopic, StreamConfig, StreamCore, SubmitOutcome};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join(name)
}

fn features_msg(id: usize) -> InMessage {
    let text = std::fs::read_to_string(fixture("data/bc_test.csv")).unwrap();
    let line = text.lines().nth(1 + id % 100).unwrap();
    let mut v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
    v.pop();
    InMessage::new("sensors/1/reading", serde_json::json!({"id": id, "features": v}).to_string())
}

fn slot() -> Arc<ModelSlot> {
    Arc::new(ModelSlot::with(Deployed::load_file(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap()))
}

#[test]
fn a_full_queue_drops_and_counts_without_blocking() {
    // One worker, two queued, one reply slot: at most 1 reply waiting + 1
    // in the worker's hand + 2 queued are accepted while nobody reads.
    let config = StreamConfig { workers: 1, queue_capacity: 2, reply_capacity: 1, ..StreamConfig::default() };
    let (core, replies) = StreamCore::start(slot(), config).unwrap();
    let submitter = core.submitter();
    let started = Instant::now();
    let outcomes: Vec<SubmitOutcome> = (0..10).map(|i| submitter.submit(features_msg(i))).collect();
    assert!(started.elapsed() < Duration::from_secs(1), "submitting never waits for the workers");
    let dropped = outcomes.iter().filter(|o| **o == SubmitOutcome::Dropped).count();
    let queued = outcomes.iter().filter(|o| **o == SubmitOutcome::Queued).count();
    assert!(dropped >= 6, "{outcomes:?}");
    assert_eq!(dropped + queued, 10);

    let mut ids = Vec::new();
    for _ in 0..queued {
        let reply = replies.recv_timeout(Duration::from_secs(10)).expect("every queued message is answered");
        assert!(!reply.is_error, "{}", String::from_utf8_lossy(&reply.payload));
        assert_eq!(reply.topic, "sensors/1/reading/prediction");
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        ids.push(body["id"].as_u64().unwrap() as usize);
    }
    let accepted: Vec<usize> = outcomes.iter().enumerate().filter(|(_, o)| **o == SubmitOutcome::Queued).map(|(i, _)| i).collect();
    assert_eq!(ids, accepted, "one worker answers in arrival order");
    let stats = core.stats().snapshot();
    assert_eq!((stats.received, stats.dropped, stats.predicted), (10, dropped as u64, queued as u64), "{stats:?}");
    assert_eq!(stats.queue_depth, 0);
    assert_eq!(stats.queue_capacity, 2);

    // Room again: accepted.
    assert_eq!(submitter.submit(features_msg(11)), SubmitOutcome::Queued);
    assert!(replies.recv_timeout(Duration::from_secs(10)).is_ok());
    core.shutdown();
    assert_eq!(submitter.submit(features_msg(12)), SubmitOutcome::Closed);
}

#[test]
fn no_model_oversized_and_fixed_output_topics() {
    let config = StreamConfig {
        max_payload_bytes: 64,
        output: OutputTopic::parse("apps/predictions").unwrap(),
        ..StreamConfig::default()
    };
    let empty = Arc::new(ModelSlot::empty());
    let (core, replies) = StreamCore::start(empty.clone(), config).unwrap();
    core.submit(InMessage::new("in/1", r#"{"id":"x","features":[1]}"#));
    let reply = replies.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(reply.is_error);
    assert_eq!(reply.topic, "apps/predictions");
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["error"]["code"], "model_not_ready");
    assert_eq!(body["id"], "x");

    let mut big = features_msg(0);
    big.correlation_data = Some(b"c".to_vec());
    core.submit(big);
    let reply = replies.recv_timeout(Duration::from_secs(10)).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(reply.correlation_data.as_deref(), Some(&b"c"[..]));

    // The reply topic itself is never taken as input.
    assert_eq!(core.submit(InMessage::new("apps/predictions", "{}")), SubmitOutcome::Ignored);
    let stats = core.stats().snapshot();
    assert_eq!((stats.failures, stats.input_errors, stats.ignored), (1, 1, 1), "{stats:?}");
    core.shutdown();
}

#[test]
fn shutdown_answers_what_was_queued() {
    let config = StreamConfig { workers: 2, queue_capacity: 100, reply_capacity: 100, ..StreamConfig::default() };
    let (core, replies) = StreamCore::start(slot(), config).unwrap();
    for i in 0..50 {
        assert_eq!(core.submit(features_msg(i)), SubmitOutcome::Queued);
    }
    core.shutdown();
    let answered: Vec<_> = replies.iter().collect();
    assert_eq!(answered.len(), 50, "the reply channel closes after the last reply");
    let mut ids: Vec<u64> = answered
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (0..50).collect::<Vec<u64>>());
}
