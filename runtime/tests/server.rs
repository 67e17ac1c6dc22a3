//! The HTTP server over real HTTP: every endpoint, every error code of
//! DESIGN.md, the seed-style answers against the model's own outputs,
//! metrics (checked by promtool), drift, and swapping models.

mod server_support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::server::{ModelSlot, ServerConfig};
use outpost_runtime::tensor::{TensorData, TensorValues};
use serde_json::json;
use server_support::*;

#[test]
fn health_and_readiness_follow_the_slot() {
    let slot = Arc::new(ModelSlot::empty());
    let server = start(slot.clone(), config());
    let addr = server.local_addr();

    let r = get(addr, "/health");
    assert_eq!((r.status, r.json()), (200, json!({"status": "healthy"})));
    assert_eq!(get(addr, "/ready").status, 503);
    assert_eq!(get(addr, "/v2/health/live").status, 200);
    assert_eq!(get(addr, "/v2/health/ready").status, 503);
    let r = post(addr, "/predict", r#"{"features":[1,2,3]}"#);
    assert_eq!((r.status, r.code().as_str()), (503, "model_not_ready"));
    assert_eq!(get(addr, "/v1/model").status, 503);

    slot.swap(deployed("bc_mlp.onnx"));
    let r = get(addr, "/ready");
    assert_eq!((r.status, r.json()), (200, json!({"status": "ready"})));
    assert_eq!(get(addr, "/v2/health/ready").status, 200);
    assert_eq!(get(addr, "/v2/models/bc_mlp/ready").status, 200);
    // HEAD works wherever GET does (probes sometimes use it).
    let mut c = Client::connect(addr);
    c.send("HEAD", "/health", &[], b"");
    assert_eq!(c.read_head().0, 200);
    server.shutdown();
}

#[test]
fn seed_predict_agrees_with_the_models_own_outputs_on_every_test_row() {
    let server = start_with("bc_mlp.onnx");
    let (rows, labels) = bc_test_rows();
    // The model's own answer, in process, one vectorized run.
    let reference = server.slot().current().expect("loaded");
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let outputs = reference
        .model()
        .run(vec![TensorData::f32(vec![rows.len(), 30], flat).expect("shape")])
        .expect("runs");
    let TensorValues::I64(model_labels) = &outputs[0].values else { panic!("label output is i64") };
    let TensorValues::F32(probs) = &outputs[1].values else { panic!("probability output is f32") };

    let mut client = Client::connect(server.local_addr());
    let mut correct = 0;
    for (i, row) in rows.iter().enumerate() {
        let r = client.post_json("/predict", &features_body(row));
        assert_eq!(r.status, 200, "row {i}: {}", r.text());
        let v = r.json();
        assert_eq!(v["prediction"].as_i64(), Some(model_labels[i]), "row {i}");
        let p = v["probability"].as_f64().expect("probability");
        let expected = probs[2 * i].max(probs[2 * i + 1]) as f64;
        assert!((p - expected).abs() < 1e-6, "row {i}: {p} vs {expected}");
        assert_eq!(v["model"], json!({"name": "bc_mlp", "version": "unversioned"}));
        correct += usize::from(model_labels[i] == labels[i]);
    }
    // The fixture's recorded test accuracy is 0.958.
    let accuracy = correct as f64 / rows.len() as f64;
    assert!(accuracy > 0.94, "accuracy {accuracy}");
}

#[test]
fn batch_endpoint_is_one_vectorized_run_matching_single_predictions() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(addr);
    let before = c.get("/metrics").text();
    let r = c.post_json("/predict/batch", &json!({ "instances": rows }));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let predictions = v["predictions"].as_array().expect("predictions");
    let probabilities = v["probabilities"].as_array().expect("probabilities");
    assert_eq!(predictions.len(), rows.len());
    for (i, row) in rows.iter().enumerate().step_by(13) {
        let single = c.post_json("/predict", &features_body(row)).json();
        assert_eq!(predictions[i], single["prediction"], "row {i}");
        // Equal up to float rounding, not bit for bit: tract picks matrix
        // kernels by the number of rows and the CPU (an AVX-512 machine
        // differs in the last bit at row 26 where an AVX2 one does not).
        let (batched, alone) = (probabilities[i].as_f64(), single["probability"].as_f64());
        let (Some(batched), Some(alone)) = (batched, alone) else { panic!("row {i}: probabilities are numbers") };
        assert!((batched - alone).abs() <= 1e-6, "row {i}: batched {batched} vs single {alone}");
    }
    // One model run of all the rows.
    let after = c.get("/metrics").text();
    let runs = |t: &str| metric(t, "outpost_inference_batch_rows_count", &[]);
    let rows_sum = |t: &str| metric(t, "outpost_inference_batch_rows_sum", &[]);
    assert!(runs(&after) - runs(&before) >= 1.0);
    let large = metric(&after, "outpost_inference_batch_rows_bucket", &[("le", "+Inf")])
        - metric(&after, "outpost_inference_batch_rows_bucket", &[("le", "64.0")]);
    assert!(large >= 1.0, "a run of {} rows is in the histogram", rows.len());
    assert!(rows_sum(&after) - rows_sum(&before) >= rows.len() as f64);
}

#[test]
fn named_inputs_return_every_named_output() {
    let server = start_with("bc_mlp.onnx");
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(server.local_addr());
    // One sample (rank 1 for a [N, 30] input): outputs come without the batch dim.
    let v = c.post_json("/predict", &json!({"inputs": {"features": rows[0]}})).json();
    assert!(v["outputs"]["output_label"].is_i64(), "{v}");
    assert_eq!(v["outputs"]["output_probability"].as_array().map(Vec::len), Some(2));
    // A batch: outputs keep it.
    let v = c.post_json("/predict", &json!({"inputs": {"features": [rows[0], rows[1], rows[2]]}})).json();
    assert_eq!(v["outputs"]["output_label"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["outputs"]["output_probability"][2].as_array().map(Vec::len), Some(2));
    assert_eq!(v["model"]["name"], "bc_mlp");

    let r = c.post_json("/predict", &json!({"inputs": {"feature": rows[0]}}));
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_field"));
    assert_eq!(r.json()["error"]["field"], "inputs.feature");
}

#[test]
fn a_cnn_takes_its_sample_flat_or_nested() {
    let server = start_with("digits_cnn.onnx");
    let mut c = Client::connect(server.local_addr());
    let flat: Vec<f32> = (0..64).map(|i| (i % 16) as f32).collect();
    let v = c.post_json("/predict", &json!({"features": flat})).json();
    let class = v["prediction"].as_i64().expect("a class");
    assert!((0..10).contains(&class), "{v}");
    let p = v["probability"].as_f64().expect("probability");
    assert!(p > 0.0 && p <= 1.0, "{v}");
    let nested: Vec<Vec<Vec<f32>>> = vec![(0..8).map(|r| flat[r * 8..r * 8 + 8].to_vec()).collect()];
    let w = c.post_json("/predict", &json!({"features": nested})).json();
    assert_eq!(v["prediction"], w["prediction"]);
    let r = c.post_json("/predict", &json!({"features": flat[..63]}));
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_shape"), "{}", r.text());
}

/// Every error status of DESIGN.md, with the field named.
#[test]
fn bad_input_gets_the_documented_status_and_names_the_field() {
    let config = ServerConfig { max_body_bytes: 64 * 1024, ..config() };
    let server = start(Arc::new(ModelSlot::with(deployed("bc_mlp.onnx"))), config);
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(addr);
    let row = &rows[0];

    let check = |r: Resp, status: u16, code: &str, field: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        if let Some(f) = field {
            assert_eq!(v["error"]["field"], f, "{v}");
            assert!(v["error"]["message"].as_str().unwrap_or("").contains(f), "{v}");
        }
    };

    // 400: not JSON.
    check(c.post("/predict", r#"{"features": [1, 2"#), 400, "malformed_json", None);
    check(c.post("/predict", ""), 400, "malformed_json", None);
    // 422: wrong structure, shape, type, non-finite values.
    check(c.post("/predict", r#"{"feature": []}"#), 422, "invalid_field", Some("features"));
    check(c.post("/predict", "[1,2,3]"), 422, "invalid_field", Some("body"));
    check(c.post("/predict", r#"{"features": {"a": 1}}"#), 422, "invalid_field", Some("features"));
    check(c.post_json("/predict", &features_body(&row[..29])), 422, "invalid_shape", Some("features"));
    let mut bad = serde_json::to_value(row).expect("row");
    bad[3] = json!("x");
    check(c.post_json("/predict", &json!({ "features": bad })), 422, "invalid_field", Some("features[3]"));
    bad[3] = json!(null);
    check(c.post_json("/predict", &json!({ "features": bad })), 422, "invalid_field", Some("features[3]"));
    let text = |x: &str| {
        let mut parts: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        parts[3] = x.to_string();
        format!("{{\"features\": [{}]}}", parts.join(","))
    };
    check(c.post("/predict", &text("NaN")), 422, "non_finite", Some("features[3]"));
    check(c.post("/predict", &text("Infinity")), 422, "non_finite", Some("features[3]"));
    check(c.post("/predict", &text("-Infinity")), 422, "non_finite", Some("features[3]"));
    check(c.post("/predict", &text("1e39")), 422, "non_finite", Some("features[3]"));
    check(c.post("/predict", &text("1e400")), 422, "non_finite", Some("features[3]"));
    check(c.post("/predict", &text("\"NaN\"")), 422, "non_finite", Some("features[3]"));
    check(c.post("/predict/batch", r#"{"instances": []}"#), 422, "invalid_shape", Some("instances"));
    let mut ragged = vec![row.clone(), row.clone()];
    ragged[1].pop();
    check(c.post_json("/predict/batch", &json!({ "instances": ragged })), 422, "invalid_shape", Some("instances[1]"));
    let mut nan_in_batch: Vec<Vec<serde_json::Value>> =
        vec![row.iter().map(|v| json!(v)).collect(), row.iter().map(|v| json!(v)).collect()];
    nan_in_batch[1][7] = json!("-inf");
    check(
        c.post_json("/predict/batch", &json!({ "instances": nan_in_batch })),
        422,
        "non_finite",
        Some("instances[1][7]"),
    );
    // 404 and 405 (with Allow).
    check(c.get("/nope"), 404, "not_found", None);
    let r = c.get("/predict");
    assert_eq!(r.header("Allow"), Some("POST"));
    check(r, 405, "method_not_allowed", None);
    let r = c.post("/health", "");
    assert_eq!(r.header("Allow"), Some("GET, HEAD"));
    check(r, 405, "method_not_allowed", None);
    // 413, declared: answered before the body is sent at all.
    let mut big = Client::connect(addr);
    big.send("POST", "/predict", &[("Content-Length", "1000000")], b"");
    let r = big.read();
    check(r, 413, "body_too_large", None);
    // 413, chunked (no declared length): cut off at the limit.
    let mut chunked = Client::connect(addr);
    chunked.send("POST", "/predict", &[("Transfer-Encoding", "chunked")], b"");
    let chunk = vec![b' '; 70 * 1024];
    let s = chunked.stream();
    let _ = write!(s, "{:x}\r\n", chunk.len());
    let _ = s.write_all(&chunk);
    let _ = s.write_all(b"\r\n0\r\n\r\n");
    check(chunked.read(), 413, "body_too_large", None);
    // The keep-alive connection that saw all of the above still works.
    let r = c.post_json("/predict", &features_body(row));
    assert_eq!(r.status, 200);
    // Nothing above was a 5xx.
    let m = c.get("/metrics").text();
    for code in ["500", "502", "503", "504"] {
        assert_eq!(metric(&m, "outpost_http_requests_total", &[("code", code)]), 0.0, "code {code}");
    }
}

#[test]
fn a_413_does_not_read_or_allocate_the_declared_body() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    // Declares a terabyte and sends nothing: upstream tiny_http 0.12 would
    // allocate that much to drain it (see vendor/tiny_http/PATCHES.md); the
    // server must neither abort nor wait for it.
    let mut c = Client::connect(addr);
    c.send("POST", "/predict", &[("Content-Length", "1000000000000")], b"");
    let (status, _) = c.read_head();
    assert_eq!(status, 413);
    // Just over the limit, body actually sent: answered, drained, and the
    // same connection serves the next request.
    let mut c = Client::connect(addr);
    let body = vec![b'1'; 4 * 1024 * 1024 + 10];
    c.send("POST", "/predict", &[("Content-Length", &body.len().to_string())], b"");
    let r = c.read();
    assert_eq!(r.status, 413);
    let _ = c.stream().write_all(&body);
    let (rows, _) = bc_test_rows();
    let r = c.post_json("/predict", &features_body(&rows[0]));
    assert_eq!(r.status, 200);
    assert_eq!(get(addr, "/ready").status, 200);
}

#[test]
fn a_client_that_hangs_up_mid_body_frees_the_worker() {
    let config = ServerConfig { threads: 1, ..config() };
    let server = start(Arc::new(ModelSlot::with(deployed("bc_mlp.onnx"))), config);
    let addr = server.local_addr();
    let mut gone = Client::connect(addr);
    // Over 1 KiB, so the worker (not tiny_http) reads it; then the client
    // stops sending for good.
    gone.send("POST", "/predict", &[("Content-Length", "5000")], b"{\"features\": [");
    gone.stream().shutdown(std::net::Shutdown::Write).expect("half-close");
    let r = gone.read();
    assert_eq!((r.status, r.code().as_str()), (408, "request_timeout"));
    // The only worker is free again.
    let (rows, _) = bc_test_rows();
    assert_eq!(post_json(addr, "/predict", &features_body(&rows[0])).status, 200);
}

#[test]
fn seed_endpoints_refuse_a_multi_input_model_clearly() {
    let server = start(Arc::new(ModelSlot::with(multi_input_model())), config());
    let addr = server.local_addr();
    let r = post(addr, "/predict", r#"{"features":[1,2]}"#);
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_field"));
    assert!(r.text().contains("3 inputs"), "{}", r.text());
    let r = post_json(addr, "/predict", &json!({"inputs": {"x": [[1.5, 2.0]], "k": [[1, 2]], "m": [[3]]}}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["outputs"]["y"], json!([[2.5, 4.0]]));
    assert_eq!(v["outputs"]["z"], json!([[9]]));
    assert_eq!(v["outputs"]["k2"], json!([[2, 4]]));
    let r = post_json(addr, "/predict", &json!({"inputs": {"x": [[1.5, 2.0]], "k": [[1.5, 2]], "m": [[3]]}}));
    assert_eq!((r.status, r.json()["error"]["field"].as_str()), (422, Some("inputs.k[0][0]")));
    let r = post_json(addr, "/predict", &json!({"inputs": {"x": [[1.5, 2.0]], "k": [[1, 2], [3, 4]], "m": [[3]]}}));
    assert_eq!(r.status, 422, "batch sizes disagree: {}", r.text());
    let r = post_json(addr, "/predict", &json!({"inputs": {"x": [[1.5, 2.0]], "k": [[1, 2]], "m": [[3e10]]}}));
    assert_eq!((r.status, r.json()["error"]["field"].as_str()), (422, Some("inputs.m[0][0]")));
}

#[test]
fn model_endpoint_reports_identity_and_signature() {
    let server = start_with("bc_mlp.onnx");
    let v = get(server.local_addr(), "/v1/model").json();
    let bytes = std::fs::read(fixture("bc_mlp.onnx")).expect("fixture");
    assert_eq!(v["name"], "bc_mlp");
    assert_eq!(v["version"], "unversioned");
    assert_eq!(v["sha256"], outpost_runtime::server::sha256_hex(&bytes));
    assert_eq!(v["signer"], serde_json::Value::Null);
    assert_eq!(v["format"], "onnx");
    assert_eq!(v["inputs"], json!([{"name": "features", "datatype": "FP32", "shape": [null, 30]}]));
    assert_eq!(v["outputs"][0]["name"], "output_label");
    assert_eq!(v["outputs"][1]["shape"], json!([null, 2]));
}

#[test]
fn metrics_pass_promtool_and_count_what_happened() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(addr);
    for row in rows.iter().take(5) {
        assert_eq!(c.post_json("/predict", &features_body(row)).status, 200);
    }
    assert_eq!(c.post("/predict", "{").status, 400);
    assert_eq!(c.get("/nope").status, 404);
    let r = c.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("Content-Type").unwrap_or("").starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    assert_eq!(metric(&text, "outpost_http_requests_total", &[("endpoint", "predict"), ("code", "200")]), 5.0);
    assert_eq!(metric(&text, "outpost_http_requests_total", &[("endpoint", "predict"), ("code", "400")]), 1.0);
    assert_eq!(metric(&text, "outpost_http_requests_total", &[("endpoint", "unknown"), ("code", "404")]), 1.0);
    assert_eq!(metric(&text, "outpost_http_request_duration_seconds_count", &[("endpoint", "predict")]), 6.0);
    assert_eq!(metric(&text, "outpost_inference_duration_seconds_count", &[]), 5.0);
    assert_eq!(metric(&text, "outpost_model_ready", &[]), 1.0);
    let sha = outpost_runtime::server::sha256_hex(&std::fs::read(fixture("bc_mlp.onnx")).expect("fixture"));
    assert_eq!(metric(&text, "outpost_model_info", &[("name", "bc_mlp"), ("sha256", &sha)]), 1.0);
    assert!(text.contains("outpost_http_requests_in_flight"));
    assert!(text.contains("outpost_http_requests_shed_total"));
    assert!(text.contains("outpost_inference_batch_requests_bucket"));

    // OpenMetrics when asked for.
    let om = c.request("GET", "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")], b"");
    assert!(om.header("Content-Type").unwrap_or("").starts_with("application/openmetrics-text"));
    assert!(om.text().ends_with("# EOF\n"));

    match promtool_check(&text) {
        None => eprintln!("NOTICE: promtool not found; skipping `promtool check metrics` (CI installs it)"),
        Some((ok, out)) => assert!(ok, "promtool check metrics failed:\n{out}\n---\n{text}"),
    }
}

/// Runs `promtool check metrics` on `text`; `None` if promtool is absent.
fn promtool_check(text: &str) -> Option<(bool, String)> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(text.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    let msg = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), msg))
}

#[test]
fn drift_report_and_gauges_come_from_the_models_monitor() {
    let (server, _monitor) = start_with_drift();
    let addr = server.local_addr();

    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(addr);
    for row in &rows {
        assert_eq!(c.post_json("/predict", &features_body(row)).status, 200);
    }
    assert_eq!(c.post_json("/predict/batch", &json!({ "instances": rows })).status, 200);
    let r = c.get("/v1/drift");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["features"].as_array().map(Vec::len), Some(30));
    assert_eq!(v["outputs"][0]["name"], "output_label");
    assert!(v["features"][0]["drift"].is_boolean(), "{v}");
    assert_eq!(v["window"]["open_window_samples"].as_u64(), Some(2 * rows.len() as u64), "{}", v["window"]);
    let m = c.get("/metrics").text();
    assert_eq!(metric(&m, "outpost_drift_lifetime_samples_total", &[]), 2.0 * rows.len() as f64);
    assert!(m.contains("outpost_drift_column_flag{column=\"f0\",role=\"feature\"}"), "drift gauges are exported");
    if let Some((ok, out)) = promtool_check(&m) {
        assert!(ok, "promtool: {out}");
    }
    // A model without a reference answers 404 on /v1/drift.
    let plain = start_with("bc_mlp.onnx");
    let r = get(plain.local_addr(), "/v1/drift");
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
}

/// Swapping the model under load fails no request: in-flight requests finish
/// on the model they started with, new ones see the new model.
#[test]
fn swapping_models_under_load_fails_no_request() {
    let slot = Arc::new(ModelSlot::with(deployed("bc_mlp.onnx")));
    let server = start(slot.clone(), ServerConfig { threads: 4, ..config() });
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    let rows = Arc::new(rows);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let seen_gb = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|t| {
            let (rows, stop, failures, seen_gb) = (rows.clone(), stop.clone(), failures.clone(), seen_gb.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut i = t;
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) || sent < 50 {
                    let r = c.post_json("/predict", &features_body(&rows[i % rows.len()]));
                    if r.status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    } else if r.json()["model"]["name"] == "bc_gb" {
                        seen_gb.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 7;
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let (mlp, gb) = (Arc::new(deployed("bc_mlp.onnx")), Arc::new(deployed("bc_gb.onnx")));
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        slot.swap_arc(if i % 2 == 0 { gb.clone() } else { mlp.clone() });
    }
    slot.swap_arc(gb);
    stop.store(true, Ordering::Relaxed);
    let sent: usize = clients.into_iter().map(|h| h.join().expect("client")).sum();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {sent} requests");
    assert!(seen_gb.load(Ordering::Relaxed) > 0);
    assert_eq!(get(addr, "/v1/model").json()["name"], "bc_gb");
    assert_eq!(slot.swap_count(), 22);
}

#[test]
fn per_model_stats_count_answers_and_input_errors() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let d = server.slot().current().expect("loaded");
    let before = d.stats().snapshot();
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(addr);
    for row in rows.iter().take(10) {
        c.post_json("/predict", &features_body(row));
    }
    c.post("/predict", r#"{"features": [1]}"#);
    let s = d.stats().snapshot().since(&before);
    assert_eq!((s.requests, s.input_errors, s.failures, s.rows), (10, 1, 0, 10));
    assert!(s.latency_quantile(0.99).is_some());
}

#[test]
fn shutdown_answers_what_was_admitted_and_stops() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    assert_eq!(get(addr, "/health").status, 200);
    server.shutdown();
    // The listener is gone: a new connection fails or is never answered.
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Err(_) => {}
        Ok(s) => {
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            let mut c = std::io::BufReader::new(s);
            let mut line = String::new();
            let _ = std::io::Write::write_all(c.get_mut(), b"GET /health HTTP/1.1\r\n\r\n");
            let n = std::io::BufRead::read_line(&mut c, &mut line).unwrap_or(0);
            assert!(n == 0 || !line.contains("200"), "answered after shutdown: {line}");
        }
    }
}
