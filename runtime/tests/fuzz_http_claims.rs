//! Requests whose arrays and shapes *claim* far more elements than their body
//! holds, sent to a real server (issue 17, attack 5).
//!
//! Before the fix, `POST /predict` with a 1.2 MB body of nested arrays whose
//! first elements claim 200 000 × 200 000 × 200 000 = 8e15 values made the
//! decoder reserve room for all of them up front: the allocation failed and
//! the process aborted (`catch_unwind` cannot catch an abort), taking the
//! agent, its MQTT link and every prediction with it. Each test here sends
//! such a body on one route and then checks that the same server still
//! answers a good request.

mod server_support;

use std::net::SocketAddr;
use std::sync::Arc;

use outpost_runtime::server::ModelSlot;
use serde_json::{json, Value};
use server_support::*;

/// `depth` nested arrays, each `len` long, whose first element is the next
/// array and whose other elements are `0`: about `2 * len * depth` bytes that
/// claim `len^depth` elements when read along the first elements.
fn claiming(len: usize, depth: usize) -> String {
    let mut s = String::with_capacity(2 * len * depth + 2 * depth);
    for _ in 0..depth {
        s.push('[');
    }
    for level in 0..depth {
        // The innermost array has `len` zeros; the others close the array
        // they hold and add `len - 1` zeros beside it.
        let zeros = if level == 0 { len } else { len - 1 };
        for i in 0..zeros {
            if i > 0 || level > 0 {
                s.push(',');
            }
            s.push('0');
        }
        s.push(']');
    }
    s
}

/// 200 000^3 = 8e15 claimed elements in about 1.2 MB.
fn attack_array() -> String {
    claiming(200_000, 3)
}

fn assert_refused(r: &Resp, route: &str) {
    assert!((400..500).contains(&r.status), "{route}: expected a 4xx, got {} {}", r.status, r.text());
}

fn assert_still_serves(addr: SocketAddr) {
    let (rows, _) = bc_test_rows();
    let r = post_json(addr, "/predict", &features_body(&rows[0]));
    assert_eq!(r.status, 200, "the server no longer answers: {}", r.text());
}

#[test]
fn the_attack_body_is_what_the_issue_describes() {
    let a = attack_array();
    assert!((1_100_000..1_300_000).contains(&a.len()), "{} bytes", a.len());
    let v: Value = serde_json::from_str(&a).expect("valid JSON");
    let (mut claimed, mut cur) = (1u128, &v);
    while let Value::Array(items) = cur {
        claimed *= items.len() as u128;
        cur = &items[0];
    }
    assert_eq!(claimed, 8_000_000_000_000_000);
}

#[test]
fn predict_features_claiming_8e15_elements_is_a_422() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let body = format!("{{\"features\":{}}}", attack_array());
    let r = Client::connect(addr).post("/predict", &body);
    assert_refused(&r, "/predict features");
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "features", "{}", r.text());
    assert_still_serves(addr);
}

#[test]
fn predict_named_inputs_claiming_8e15_elements_is_a_422() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    // Rank 3 for a rank-2 input, and rank 2 (one sample) with a huge row.
    for array in [attack_array(), claiming(300_000, 2)] {
        let body = format!("{{\"inputs\":{{\"features\":{array}}}}}");
        let r = Client::connect(addr).post("/predict", &body);
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(r.json()["error"]["field"], "inputs.features", "{}", r.text());
    }
    // A free dimension takes any size, but not more than the body can hold.
    let server2 = start(Arc::new(ModelSlot::with(multi_input_model())), config());
    let body = format!(
        "{{\"inputs\":{{\"x\":{},\"k\":[[1,2]],\"m\":[[3]]}}}}",
        claiming(400_000, 2).replacen('[', "[[0,0],", 1)
    );
    let r = Client::connect(server2.local_addr()).post("/predict", &body);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_still_serves(addr);
}

#[test]
fn predict_batch_claiming_8e15_elements_is_a_422() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let body = format!("{{\"instances\":[{}]}}", attack_array());
    let r = Client::connect(addr).post("/predict/batch", &body);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "instances[0]", "{}", r.text());
    // The instances list itself as the claim.
    let body = format!("{{\"instances\":{}}}", attack_array());
    let r = Client::connect(addr).post("/predict/batch", &body);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_still_serves(addr);
}

#[test]
fn v2_infer_data_claiming_8e15_elements_is_a_422() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let body = format!(
        "{{\"inputs\":[{{\"name\":\"features\",\"datatype\":\"FP32\",\"shape\":[1,30],\"data\":{}}}]}}",
        attack_array()
    );
    let r = Client::connect(addr).post("/v2/models/bc_mlp/infer", &body);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_still_serves(addr);
}

#[test]
fn v2_infer_shape_claiming_huge_dims_is_a_422_naming_the_shape() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let mut c = Client::connect(addr);
    for shape in [json!([200000, 200000, 200000]), json!([8_000_000_000_000_000u64, 30]), json!([u64::MAX, u64::MAX])] {
        let body = json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": shape, "data": [1.0, 2.0]}]});
        let r = c.post_json("/v2/models/bc_mlp/infer", &body);
        assert_eq!(r.status, 422, "{shape}: {}", r.text());
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains("inputs[0].shape"), "{shape}: {msg}");
    }
    assert_still_serves(addr);
}

#[test]
fn v2_binary_data_claiming_huge_shapes_is_refused() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let mut c = Client::connect(addr);
    let cases: [(Value, u64); 3] = [
        (json!([8_000_000_000_000_000u64, 30]), 960_000_000_000_000_000),
        (json!([4_611_686_018_427_387_904u64, 1]), 0),
        (json!([1, 30]), u64::MAX),
    ];
    for (shape, size) in cases {
        let head = json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": shape,
            "parameters": {"binary_data_size": size}}]})
        .to_string();
        let mut body = head.clone().into_bytes();
        body.extend_from_slice(&[0u8; 120]);
        let len = head.len().to_string();
        let r = c.request("POST", "/v2/models/bc_mlp/infer", &[("Inference-Header-Content-Length", &len)], &body);
        assert_refused(&r, "v2 binary");
    }
    // A header length past the body, and one that is not a number.
    let r = c.request("POST", "/v2/models/bc_mlp/infer", &[("Inference-Header-Content-Length", "18446744073709551615")], b"{}");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = c.request("POST", "/v2/models/bc_mlp/infer", &[("Inference-Header-Content-Length", "-1")], b"{}");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_still_serves(addr);
}

/// serde_json stops at 128 levels of nesting: a deeper body is malformed
/// JSON (400), and never recursion deep enough to overflow a worker's stack.
#[test]
fn nesting_deeper_than_the_parser_allows_is_a_400() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let deep = format!("{{\"features\":{}0{}}}", "[".repeat(500_000), "]".repeat(500_000));
    let r = Client::connect(addr).post("/predict", &deep);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "malformed_json");
    // 127 levels parse, and are a shape error for a rank-2 input.
    let ok_depth = format!("{{\"features\":{}0{}}}", "[".repeat(120), "]".repeat(120));
    let r = Client::connect(addr).post("/predict", &ok_depth);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_still_serves(addr);
}

/// The MQTT streaming mode decodes payloads with the same decoder: the claim
/// (160 000^3 = 4e15 elements, under the 1 MiB payload limit) is an error
/// reply, and the core keeps predicting.
#[test]
fn a_streamed_message_claiming_4e15_elements_is_an_error_reply() {
    use outpost_runtime::stream::{InMessage, StreamConfig, StreamCore, SubmitOutcome};
    use std::time::Duration;
    let slot = Arc::new(ModelSlot::with(deployed("bc_mlp.onnx")));
    let (core, replies) = StreamCore::start(slot, StreamConfig::default()).expect("core starts");
    let submitter = core.submitter();
    let payload = format!("{{\"id\":1,\"features\":{}}}", claiming(160_000, 3));
    assert!(payload.len() < 1024 * 1024, "{} bytes", payload.len());
    assert_eq!(submitter.submit(InMessage::new("sensors/1/reading", payload)), SubmitOutcome::Queued);
    let reply = replies.recv_timeout(Duration::from_secs(20)).expect("answered");
    assert!(reply.is_error, "{}", String::from_utf8_lossy(&reply.payload));
    let (rows, _) = bc_test_rows();
    let good = json!({"id": 2, "features": rows[0]}).to_string();
    assert_eq!(submitter.submit(InMessage::new("sensors/1/reading", good)), SubmitOutcome::Queued);
    let reply = replies.recv_timeout(Duration::from_secs(20)).expect("answered");
    assert!(!reply.is_error, "{}", String::from_utf8_lossy(&reply.payload));
}
