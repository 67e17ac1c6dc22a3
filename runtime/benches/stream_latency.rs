//! Streaming latency benchmark (`cargo bench -p outpost-runtime --bench
//! stream_latency`, or `bench/stream/run.sh`): message round trips through
//! a loopback mosquitto — app → broker → stream → model → broker → app —
//! one message in flight at a time, then a burst for throughput and drops.
//!
//! Knobs (environment): `OUTPOST_BENCH_MESSAGES` (default 5000),
//! `OUTPOST_BENCH_QOS` (0 or 1, default 1), `OUTPOST_BENCH_BURST` (default 20000),
//! `OUTPOST_BENCH_WORKERS` (default 1), `OUTPOST_BENCH_QUEUE` (default 64).
#[path = "../tests/stream_support/mod.rs"]
mod stream_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_runtime::model::LoadOptions;
use outpost_runtime::server::{Deployed, ModelSlot};
use outpost_runtime::stream::mqtt::{MqttConfig, MqttStream};
use outpost_runtime::stream::StreamConfig;
use rumqttc::v5::mqttbytes::QoS;
use stream_support::*;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let ix = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[ix].as_secs_f64() * 1e6
}

fn main() {
    let messages = env("OUTPOST_BENCH_MESSAGES", 5000);
    let burst = env("OUTPOST_BENCH_BURST", 20000);
    let qos_n = env("OUTPOST_BENCH_QOS", 1) as u8;
    let qos = if qos_n == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
    let Some(broker) = Broker::start() else { return };
    let slot = Arc::new(ModelSlot::with(Deployed::load_file(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap()));
    let mqtt = MqttConfig { qos: qos_n, ..MqttConfig::new(broker.url(), vec!["bench/+/reading".into()]) };
    let config = StreamConfig {
        workers: env("OUTPOST_BENCH_WORKERS", 1),
        queue_capacity: env("OUTPOST_BENCH_QUEUE", 64),
        ..StreamConfig::default()
    };
    let stream = MqttStream::start(mqtt, slot, config).unwrap();
    assert!(stream.wait_subscribed(Duration::from_secs(10)));
    let mut app = TestClient::connect(&broker, "bench-app");
    app.qos = qos;
    app.subscribe("bench/+/reading/prediction");

    let rows = bc_rows();
    let payloads: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| serde_json::json!({"id": i, "features": r}).to_string())
        .collect();

    // Warm-up: connections, allocator, the model's state pool.
    for i in 0..200 {
        app.publish("bench/1/reading", payloads[i % payloads.len()].clone(), Some(&(i as u64).to_be_bytes()), None);
        app.next(Duration::from_secs(10)).expect("warm-up reply");
    }

    let mut rtts = Vec::with_capacity(messages);
    let started = Instant::now();
    for i in 0..messages {
        let corr = (i as u64).to_be_bytes();
        let t = Instant::now();
        app.publish("bench/1/reading", payloads[i % payloads.len()].clone(), Some(&corr), None);
        let reply = app.next(Duration::from_secs(10)).expect("reply");
        rtts.push(t.elapsed());
        assert_eq!(correlation_of(&reply).as_deref(), Some(&corr[..]), "replies pair with requests");
    }
    let sequential_s = started.elapsed().as_secs_f64();
    rtts.sort();

    // Burst: publish as fast as the client can, count what comes back.
    let before = stream.stats().snapshot();
    let started = Instant::now();
    let publisher = app.client.clone();
    let sender = std::thread::spawn(move || {
        for i in 0..burst {
            let payload = payloads[i % payloads.len()].clone();
            publisher.publish("bench/2/reading", qos, false, payload).unwrap();
        }
    });
    let mut receiver = 0usize;
    while app.next(Duration::from_secs(2)).is_some() {
        receiver += 1;
    }
    sender.join().unwrap();
    // The counter stops 2 s after the last reply.
    let burst_s = (started.elapsed().as_secs_f64() - 2.0).max(1e-6);
    let after = stream.stats().snapshot();

    let report = serde_json::json!({
        "bench": "stream_round_trip",
        "broker": "mosquitto (loopback)",
        "qos": qos_n,
        "messages": messages,
        "p50_us": percentile(&rtts, 0.50).round(),
        "p90_us": percentile(&rtts, 0.90).round(),
        "p99_us": percentile(&rtts, 0.99).round(),
        "max_us": percentile(&rtts, 1.0).round(),
        "sequential_msgs_per_sec": (messages as f64 / sequential_s).round(),
        "burst": {
            "sent": burst,
            "replies": receiver,
            "dropped": after.dropped - before.dropped,
            "replies_per_sec": (receiver as f64 / burst_s).round(),
        },
    });
    println!("{report}");
    stream.shutdown();
}
