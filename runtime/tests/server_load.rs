//! The server under load: bad input mixed with good never yields a 5xx or
//! stops the server; overload is shed with 503 + Retry-After from a bounded
//! queue; dynamic batching merges concurrent requests without changing any
//! answer and never makes a lone request wait out the window.

mod server_support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::server::{ModelSlot, ServerConfig};
use serde_json::json;
use server_support::*;

/// 8 threads × 500 requests, a third of them bad in every way the error table
/// lists, on keep-alive connections.
#[test]
fn bad_input_mixed_with_good_never_yields_5xx_nor_stops_the_server() {
    let config = ServerConfig { max_body_bytes: 16 * 1024, ..config() };
    let server = start(Arc::new(ModelSlot::with(deployed("bc_mlp.onnx"))), config);
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    // The right answer per row, from the unloaded server.
    let expected: Vec<serde_json::Value> = {
        let mut c = Client::connect(addr);
        rows.iter().map(|r| c.post_json("/predict", &features_body(r)).json()["prediction"].clone()).collect()
    };
    let rows = Arc::new(rows);
    let expected = Arc::new(expected);
    let statuses = Arc::new(Mutex::new(HashMap::<u16, usize>::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (rows, expected, statuses) = (rows.clone(), expected.clone(), statuses.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut wrong = 0;
                for i in 0..500usize {
                    let n = t * 500 + i;
                    let row = &rows[n % rows.len()];
                    let r = match n % 12 {
                        0..=3 => {
                            let r = c.post_json("/predict", &features_body(row));
                            if r.status == 200 && r.json()["prediction"] != expected[n % rows.len()] {
                                wrong += 1;
                            }
                            r
                        }
                        4 => c.post("/predict", r#"{"features": [1, 2, NaN]}"#),
                        5 => c.post("/predict", r#"{"features": [1, 2"#),
                        6 => c.post_json("/predict", &features_body(&row[..17])),
                        7 => c.post_json("/predict/batch", &json!({"instances": [row, row, row]})),
                        8 => c.post_json(
                            "/v2/models/bc_mlp/infer",
                            &json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "INT64", "data": row}]}),
                        ),
                        9 => c.post_json(
                            "/v2/models/bc_mlp/infer",
                            &json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}]}),
                        ),
                        10 => {
                            if (n / 12) % 2 == 0 {
                                c.get("/nope")
                            } else {
                                c.get("/predict/batch")
                            }
                        }
                        _ => {
                            // Over the 16 KiB limit, declared: 413, then the
                            // body is sent and drained, and the connection lives on.
                            let body = vec![b' '; 20 * 1024];
                            c.send("POST", "/predict", &[("Content-Length", &body.len().to_string())], b"");
                            let r = c.read();
                            let _ = c.stream().write_all(&body);
                            r
                        }
                    };
                    *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                }
                wrong
            })
        })
        .collect();
    let wrong: usize = threads.into_iter().map(|h| h.join().expect("client thread")).sum();
    let statuses = statuses.lock().unwrap().clone();
    eprintln!("status counts: {statuses:?}");
    assert_eq!(wrong, 0, "good requests answered wrongly under load");
    assert_eq!(statuses.values().sum::<usize>(), 4000);
    assert!(statuses.keys().all(|s| *s < 500), "a 5xx under bad input: {statuses:?}");
    for s in [200, 400, 404, 405, 413, 422] {
        assert!(statuses.get(&s).copied().unwrap_or(0) > 0, "expected some {s}: {statuses:?}");
    }
    assert_eq!(get(addr, "/ready").status, 200);
    assert_eq!(get(addr, "/health").status, 200);
    let m = get(addr, "/metrics").text();
    for code in ["500", "503"] {
        assert_eq!(metric(&m, "outpost_http_requests_total", &[("code", code)]), 0.0);
    }
}

/// With one worker held busy and a queue of one, the next request waits in
/// the queue and the one after is shed at once with 503 and Retry-After; the
/// queued one is still answered.
#[test]
fn overload_is_shed_with_503_and_retry_after_from_a_bounded_queue() {
    let config = ServerConfig { threads: 1, queue_capacity: 1, retry_after_secs: 2, ..config() };
    let server = start(Arc::new(ModelSlot::with(deployed("bc_mlp.onnx"))), config);
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    let good = features_body(&rows[0]).to_string();

    // The only worker blocks reading a body that is still on its way (one
    // larger than what the server buffers before handing a request to a
    // worker, 64 KiB: a smaller one would hold no worker while it arrives).
    let mut busy = Client::connect(addr);
    let padded = format!("{good}{}", " ".repeat(70_000));
    let (first, second) = padded.as_bytes().split_at(10);
    busy.send("POST", "/predict", &[("Content-Length", &padded.len().to_string())], first);
    std::thread::sleep(Duration::from_millis(200));
    // Fills the queue.
    let mut queued = Client::connect(addr);
    queued.send("POST", "/predict", &[], good.as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    // Finds it full.
    let started = Instant::now();
    let r = post(addr, "/predict", &good);
    assert_eq!((r.status, r.code().as_str()), (503, "overloaded"), "{}", r.text());
    assert_eq!(r.header("Retry-After"), Some("2"));
    assert!(started.elapsed() < Duration::from_millis(500), "shed at once, not after waiting");
    // Probes are answered even now.
    assert_eq!(get(addr, "/health").status, 200);
    assert_eq!(get(addr, "/ready").status, 200);
    // The worker gets its body; both admitted requests are answered.
    busy.stream().write_all(second).expect("rest of body");
    assert_eq!(busy.read().status, 200);
    assert_eq!(queued.read().status, 200);
    let m = get(addr, "/metrics").text();
    assert_eq!(metric(&m, "outpost_http_requests_shed_total", &[]), 1.0);
}

/// Concurrent requests are merged into shared runs, each still gets its own
/// row's answer, and a lone request does not wait for the window.
#[test]
fn dynamic_batching_merges_concurrent_requests_and_changes_no_answer() {
    let window = Duration::from_millis(200);
    let config = ServerConfig { batch_window: window, max_batch: 16, threads: 4, ..config() };
    let server = start(Arc::new(ModelSlot::with(deployed("bc_mlp.onnx"))), config);
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();

    // Alone: answered long before the window would end.
    let mut c = Client::connect(addr);
    for row in rows.iter().take(5) {
        let t = Instant::now();
        assert_eq!(c.post_json("/predict", &features_body(row)).status, 200);
        assert!(t.elapsed() < window / 2, "a lone request waited {:?}", t.elapsed());
    }
    let expected: Vec<serde_json::Value> =
        rows.iter().map(|r| c.post_json("/predict", &features_body(r)).json()).collect();
    let before = c.get("/metrics").text();

    // Together: 16 clients released at once, several rounds.
    let rows = Arc::new(rows);
    let expected = Arc::new(expected);
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (rows, expected, barrier) = (rows.clone(), expected.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Nothing in here may panic before the last barrier, or the
                // other clients would wait at it forever: collect problems.
                let mut problems = Vec::new();
                let mut c = Client::connect(addr);
                for round in 0..10 {
                    let i = (t * 10 + round) % rows.len();
                    barrier.wait();
                    let r = c.post_json("/predict", &features_body(&rows[i]));
                    if r.status != 200 {
                        problems.push(format!("row {i}: status {}", r.status));
                        continue;
                    }
                    let (got, want) = (r.json(), &expected[i]);
                    // A batched matrix product may round differently in the
                    // last bits; the label must not change.
                    let close = (got["probability"].as_f64().unwrap_or(-1.0)
                        - want["probability"].as_f64().unwrap_or(1.0))
                    .abs()
                        < 1e-5;
                    if got["prediction"] != want["prediction"] || !close || got["model"] != want["model"] {
                        problems.push(format!("row {i}: batched {got} vs alone {want}"));
                    }
                }
                // The batch endpoint takes part too.
                let r = c.post_json("/predict/batch", &json!({"instances": [rows[t], rows[t + 1]]}));
                if r.json()["predictions"][1] != expected[t + 1]["prediction"] {
                    problems.push(format!("batch endpoint: {}", r.text()));
                }
                problems
            })
        })
        .collect();
    let problems: Vec<String> = threads.into_iter().flat_map(|h| h.join().expect("client")).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let after = c.get("/metrics").text();
    let requests = metric(&after, "outpost_inference_batch_requests_sum", &[])
        - metric(&before, "outpost_inference_batch_requests_sum", &[]);
    let runs = metric(&after, "outpost_inference_batch_requests_count", &[])
        - metric(&before, "outpost_inference_batch_requests_count", &[]);
    eprintln!("{requests} requests in {runs} runs");
    assert_eq!(requests, 176.0);
    assert!(runs < requests / 2.0, "merging happened: {requests} requests in {runs} runs");
    assert_eq!(get(addr, "/v1/model").json()["dynamic_batching"], true);
}

/// Keep-alive connections opened in a burst are all served. (Upstream
/// tiny_http 0.12 left part of a burst unread until another connection
/// closed; see vendor/tiny_http/PATCHES.md.)
#[test]
fn a_burst_of_keep_alive_connections_is_served() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let mut kept = Vec::new();
    for round in 0..5 {
        // Opened back to back from one thread: the tightest burst a client makes.
        let mut clients: Vec<Client> = (0..48).map(|_| Client::connect(addr)).collect();
        for c in &mut clients {
            c.stream().set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            c.send("GET", "/health", &[], b"");
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.read().status, 200, "round {round}, connection {i}");
        }
        // Keep them open (as wrk does) while the next burst arrives.
        kept.extend(clients);
    }
}
