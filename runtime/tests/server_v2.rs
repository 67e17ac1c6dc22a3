//! The Open Inference Protocol v2 endpoints, with requests shaped exactly as
//! `tritonclient.http` and KServe's REST client send them (JSON data, and the
//! binary tensor data extension tritonclient uses by default).

mod server_support;

use std::sync::Arc;

use outpost_runtime::server::ModelSlot;
use serde_json::{json, Value};
use server_support::*;

fn multi_server() -> outpost_runtime::server::RunningServer {
    start(Arc::new(ModelSlot::with(multi_input_model())), config())
}

/// v2 errors are `{"error": "<message>"}`, the shape tritonclient reads.
fn v2_error(r: &Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    v["error"].as_str().unwrap_or_else(|| panic!("error is a string: {v}")).to_string()
}

#[test]
fn server_and_model_metadata() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let v = get(addr, "/v2").json();
    assert_eq!(v["name"], "outpost-runtime");
    assert!(v["extensions"].as_array().is_some_and(|e| e.contains(&json!("binary_tensor_data"))));
    let v = get(addr, "/v2/models/bc_mlp").json();
    assert_eq!(v["name"], "bc_mlp");
    assert_eq!(v["versions"], json!(["unversioned"]));
    assert_eq!(v["platform"], "tract_onnx");
    assert_eq!(v["inputs"], json!([{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]));
    assert_eq!(v["outputs"][0], json!({"name": "output_label", "datatype": "INT64", "shape": [-1]}));
    assert_eq!(get(addr, "/v2/models/bc_mlp/versions/unversioned").status, 200);
    assert_eq!(get(addr, "/v2/models/bc_mlp/ready").json()["ready"], true);
    let msg = v2_error(&get(addr, "/v2/models/other"), 404);
    assert!(msg.contains("other"), "{msg}");
    v2_error(&get(addr, "/v2/models/bc_mlp/versions/9/ready"), 404);
    v2_error(&get(addr, "/v2/models/bc_mlp/infer"), 405);
}

#[test]
fn infer_with_json_data_matches_the_seed_endpoint() {
    let server = start_with("bc_mlp.onnx");
    let addr = server.local_addr();
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(addr);
    let batch: Vec<f32> = rows[..4].iter().flatten().copied().collect();
    // What tritonclient.http sends for InferInput("features", [4, 30], "FP32")
    // with set_data_from_numpy(..., binary_data=False) and two requested outputs.
    let body = json!({
        "id": "req-7",
        "inputs": [{"name": "features", "shape": [4, 30], "datatype": "FP32", "data": batch}],
        "outputs": [
            {"name": "output_label", "parameters": {"binary_data": false}},
            {"name": "output_probability", "parameters": {"binary_data": false}}
        ]
    });
    let r = c.post_json("/v2/models/bc_mlp/infer", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Inference-Header-Content-Length"), None);
    let v = r.json();
    assert_eq!(v["model_name"], "bc_mlp");
    assert_eq!(v["model_version"], "unversioned");
    assert_eq!(v["id"], "req-7");
    let outputs = v["outputs"].as_array().expect("outputs");
    assert_eq!(outputs[0]["name"], "output_label");
    assert_eq!(outputs[0]["datatype"], "INT64");
    assert_eq!(outputs[0]["shape"], json!([4]));
    assert_eq!(outputs[1]["datatype"], "FP32");
    assert_eq!(outputs[1]["shape"], json!([4, 2]));
    assert_eq!(outputs[1]["data"].as_array().map(Vec::len), Some(8), "data is flat");
    for (i, row) in rows[..4].iter().enumerate() {
        let seed = c.post_json("/predict", &features_body(row)).json();
        assert_eq!(outputs[0]["data"][i], seed["prediction"]);
        let p = outputs[1]["data"][2 * i].as_f64().unwrap().max(outputs[1]["data"][2 * i + 1].as_f64().unwrap());
        assert!((p - seed["probability"].as_f64().unwrap()).abs() < 1e-6);
    }
    // Nested data (KServe's client sends numpy's tolist()) is the same request.
    let nested = json!({"inputs": [{"name": "features", "shape": [4, 30], "datatype": "FP32",
        "data": rows[..4].to_vec()}]});
    let w = c.post_json("/v2/models/bc_mlp/infer", &nested).json();
    assert_eq!(w["outputs"][0]["data"], outputs[0]["data"]);
    assert_eq!(w.get("id"), None, "no id sent, none echoed");
}

#[test]
fn several_inputs_fp32_int64_int32_and_named_outputs() {
    let server = multi_server();
    let mut c = Client::connect(server.local_addr());
    let body = json!({
        "inputs": [
            {"name": "m", "shape": [2, 1], "datatype": "INT32", "data": [3, -4]},
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[0.5, 1.5], [2.0, -1.0]]},
            {"name": "k", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 9007199254740993i64]}
        ],
        "outputs": [{"name": "z"}, {"name": "k2"}, {"name": "y"}],
        "parameters": {"priority": 1}
    });
    let r = c.post_json("/v2/models/multi/infer", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let outs = v["outputs"].as_array().expect("outputs");
    // In the order asked for, each with its own datatype.
    assert_eq!(outs[0], json!({"name": "z", "datatype": "INT32", "shape": [2, 1], "data": [9, 16]}));
    assert_eq!(outs[1]["name"], "k2");
    assert_eq!(outs[1]["datatype"], "INT64");
    // 2^53 + 1 survives: integers are never routed through f64.
    assert_eq!(outs[1]["data"], json!([2, 4, 6, 18014398509481986i64]));
    assert_eq!(outs[2]["name"], "y");
    assert_eq!(outs[2]["datatype"], "FP32");
    assert_eq!(outs[2]["data"].as_array().map(|d| d[..3].to_vec()), Some(vec![json!(1.5), json!(3.5), json!(5.0)]));
    // Only one output asked for: only one returned.
    let one = json!({"inputs": body["inputs"], "outputs": [{"name": "y"}]});
    let v = c.post_json("/v2/models/multi/infer", &one).json();
    assert_eq!(v["outputs"].as_array().map(Vec::len), Some(1));
    // The versioned route works too.
    let r = c.post_json("/v2/models/multi/versions/unversioned/infer", &one);
    assert_eq!(r.status, 200);
}

/// Little-endian bytes of a flat array.
fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn binary_tensor_data_both_ways_as_tritonclient_sends_it() {
    let server = multi_server();
    let mut c = Client::connect(server.local_addr());
    // tritonclient.http default: binary inputs, and (no outputs named)
    // `binary_data_output: true` on the request.
    let x = le_f32(&[0.5, 1.5, 2.0, -1.0]);
    let k: Vec<u8> = [1i64, 2, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let m: Vec<u8> = [3i32, -4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = json!({
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": x.len()}},
            {"name": "k", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": k.len()}},
            {"name": "m", "shape": [2, 1], "datatype": "INT32", "parameters": {"binary_data_size": m.len()}}
        ],
        "parameters": {"binary_data_output": true}
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&x);
    body.extend_from_slice(&k);
    body.extend_from_slice(&m);
    let len = header.len().to_string();
    let r = c.request(
        "POST",
        "/v2/models/multi/infer",
        &[("Inference-Header-Content-Length", &len), ("Content-Type", "application/octet-stream")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let json_len: usize = r.header("Inference-Header-Content-Length").expect("binary answer").parse().unwrap();
    let head: Value = serde_json::from_slice(&r.body[..json_len]).expect("JSON head");
    let mut rest = &r.body[json_len..];
    let mut take = |out: &Value| {
        let n = out["parameters"]["binary_data_size"].as_u64().expect("binary size") as usize;
        assert!(out.get("data").is_none());
        let (mine, tail) = rest.split_at(n);
        rest = tail;
        mine.to_vec()
    };
    let outs = head["outputs"].as_array().expect("outputs");
    assert_eq!(outs.iter().map(|o| o["name"].as_str().unwrap()).collect::<Vec<_>>(), ["y", "z", "k2"]);
    let y: Vec<f32> = take(&outs[0]).chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(y, [1.5, 3.5, 5.0, 3.0]);
    let z: Vec<i32> = take(&outs[1]).chunks(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(z, [9, 16]);
    let k2: Vec<i64> = take(&outs[2]).chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(k2, [2, 4, 6, 8]);
    assert!(rest.is_empty());

    // Per-output choice: one binary, one JSON.
    let header = json!({
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": x.len()}},
            {"name": "k", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
            {"name": "m", "shape": [2, 1], "datatype": "INT32", "data": [3, -4]}
        ],
        "outputs": [{"name": "z", "parameters": {"binary_data": false}}, {"name": "y", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&x);
    let len = header.len().to_string();
    let r = c.request("POST", "/v2/models/multi/infer", &[("Inference-Header-Content-Length", &len)], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let json_len: usize = r.header("Inference-Header-Content-Length").unwrap().parse().unwrap();
    let head: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
    assert_eq!(head["outputs"][0]["data"], json!([9, 16]));
    assert_eq!(head["outputs"][1]["parameters"]["binary_data_size"], 16);
    assert_eq!(r.body.len(), json_len + 16);
}

#[test]
fn v2_refusals_name_the_field_with_the_documented_status() {
    let server = multi_server();
    let addr = server.local_addr();
    let mut c = Client::connect(addr);
    let good = || {
        json!({"inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
            {"name": "k", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
            {"name": "m", "shape": [1, 1], "datatype": "INT32", "data": [3]}
        ]})
    };
    assert_eq!(c.post_json("/v2/models/multi/infer", &good()).status, 200);
    let cases: Vec<(Box<dyn Fn(&mut Value)>, u16, &str)> = vec![
        (Box::new(|b| b["inputs"][1]["datatype"] = json!("INT32")), 422, "inputs[1].datatype"),
        (Box::new(|b| b["inputs"][1]["datatype"] = json!("BOOL")), 422, "inputs[1].datatype"),
        (Box::new(|b| b["inputs"][0]["name"] = json!("nope")), 422, "inputs[0].name"),
        // The shape is checked against the model before the data is read.
        (Box::new(|b| b["inputs"][0]["shape"] = json!([1, 3])), 422, "inputs[0].shape"),
        (Box::new(|b| b["inputs"][0]["shape"] = json!([2, 2])), 422, "inputs[0].data"),
        (Box::new(|b| b["inputs"][0]["shape"] = json!([2, 1])), 422, "inputs[0].shape"),
        (Box::new(|b| b["inputs"][0]["shape"] = json!([1, -2])), 422, "inputs[0].shape[1]"),
        (Box::new(|b| b["inputs"][0]["data"] = json!([1.0, "NaN"])), 422, "inputs[0].data[1]"),
        (Box::new(|b| b["inputs"][1]["data"] = json!([1, 2.5])), 422, "inputs[1].data[1]"),
        (Box::new(|b| b["inputs"][2]["data"] = json!([4294967296i64])), 422, "inputs[2].data[0]"),
        (Box::new(|b| b["inputs"][0]["data"] = json!([[1.0], [2.0, 3.0]])), 422, "inputs[0].data[1]"),
        (Box::new(|b| { b["inputs"].as_array_mut().unwrap().pop(); }), 422, "inputs"),
        (Box::new(|b| { let i = b["inputs"][0].clone(); b["inputs"].as_array_mut().unwrap().push(i); }), 422, "inputs[3].name"),
        (Box::new(|b| b["outputs"] = json!([{"name": "w"}])), 422, "outputs[0].name"),
        (Box::new(|b| b["outputs"] = json!([{"name": "y", "parameters": {"classification": 2}}])), 422, "outputs[0].parameters.classification"),
        (Box::new(|b| b["inputs"] = json!({})), 422, "inputs"),
    ];
    for (edit, status, field) in cases {
        let mut body = good();
        edit(&mut body);
        let msg = v2_error(&c.post_json("/v2/models/multi/infer", &body), status);
        assert!(msg.contains(field), "{field} not named in {msg:?} for {body}");
    }
    v2_error(&c.post("/v2/models/multi/infer", "{\"inputs\": ["), 400);
    v2_error(&c.post_json("/v2/models/other/infer", &good()), 404);
    // Binary data that runs past the body, and a bad header value.
    let header = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}).to_string();
    let len = header.len().to_string();
    let r = c.request("POST", "/v2/models/multi/infer", &[("Inference-Header-Content-Length", &len)], header.as_bytes());
    v2_error(&r, 400);
    let r = c.request("POST", "/v2/models/multi/infer", &[("Inference-Header-Content-Length", "many")], header.as_bytes());
    v2_error(&r, 400);
    // NaN in binary FP32 data is still refused.
    let mut body = json!({"inputs": [
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "k", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
        {"name": "m", "shape": [1, 1], "datatype": "INT32", "data": [3]}]})
    .to_string()
    .into_bytes();
    let len = body.len().to_string();
    body.extend_from_slice(&le_f32(&[1.0, f32::NAN]));
    let r = c.request("POST", "/v2/models/multi/infer", &[("Inference-Header-Content-Length", &len)], &body);
    assert!(v2_error(&r, 422).contains("inputs[0].data[1]"));
    // After all that, still serving.
    assert_eq!(c.post_json("/v2/models/multi/infer", &good()).status, 200);
    assert_eq!(get(addr, "/v2/health/ready").status, 200);
}
