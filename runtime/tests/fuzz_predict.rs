//! Fuzzing the device's request decoders: `POST /predict` (`features` and
//! `inputs`), `POST /predict/batch`, and the Open Inference Protocol's
//! `POST /v2/models/{name}/infer`, JSON and binary (issue 17).
//!
//! Property: whatever the bytes, a decoder returns either inputs consistent
//! with the model (one per input, its element type, a shape the model takes,
//! as many values as the shape holds, finite floats) or a 4xx error naming
//! what is wrong. It never panics, never answers 5xx, and never allocates
//! from what a body claims (the process would abort, which no test harness
//! survives). A few cases also go through a real server, which must keep
//! answering.
//!
//! Cases: bounded under `cargo test`; `OUTPOST_FUZZ_CASES=100000` runs that
//! many per decoder (docs/fuzzing.md).

mod fuzz_support;
mod server_support;

use std::sync::{Arc, OnceLock};

use fuzz_support::{cases, mutated};
use outpost_runtime::server::{decode, ApiError, Deployed, ModelSlot};
use outpost_runtime::tensor::{TensorData, TensorValues};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use server_support::*;

fn bc() -> &'static Deployed {
    static D: OnceLock<Deployed> = OnceLock::new();
    D.get_or_init(|| deployed("bc_mlp.onnx"))
}

fn cnn() -> &'static Deployed {
    static D: OnceLock<Deployed> = OnceLock::new();
    D.get_or_init(|| deployed("digits_cnn.onnx"))
}

fn multi() -> &'static Deployed {
    static D: OnceLock<Deployed> = OnceLock::new();
    D.get_or_init(multi_input_model)
}

fn models() -> [&'static Deployed; 3] {
    [bc(), cnn(), multi()]
}

// ----------------------------------------------------------------- property

/// What every decoder answer must satisfy.
fn check(result: Result<Vec<TensorData>, ApiError>, d: &Deployed, body: &[u8]) -> Result<(), TestCaseError> {
    let show = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match result {
        Err(e) => {
            prop_assert!((400..500).contains(&e.status), "{e} for {}", show());
            prop_assert!(!e.code.is_empty() && !e.message.is_empty());
            if let Some(f) = &e.field {
                prop_assert!(e.message.contains(f.as_str()), "message {:?} does not name {f:?}", e.message);
            }
            let v: Value = serde_json::from_slice(&e.to_json()).map_err(|x| TestCaseError::fail(x.to_string()))?;
            prop_assert_eq!(v["error"]["code"].as_str(), Some(e.code));
            serde_json::from_slice::<Value>(&e.to_v2_json()).map_err(|x| TestCaseError::fail(x.to_string()))?;
        }
        Ok(inputs) => {
            let specs = &d.model().signature().inputs;
            prop_assert_eq!(inputs.len(), specs.len());
            for (t, spec) in inputs.iter().zip(specs) {
                prop_assert_eq!(t.element_type(), spec.element_type, "{}", show());
                let count = t.shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
                prop_assert_eq!(count, Some(t.values.len()), "shape {:?} for {}", t.shape, show());
                prop_assert_eq!(t.shape.len(), spec.shape.len(), "{}", show());
                for (ix, (got, want)) in t.shape.iter().zip(&spec.shape).enumerate() {
                    prop_assert!(*got > 0);
                    if let Some(w) = want {
                        prop_assert!(*got as u64 == *w || (ix == 0 && *w == 1), "dim {ix}: {got} vs {w}");
                    }
                }
                if let TensorValues::F32(v) = &t.values {
                    prop_assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }
    }
    Ok(())
}

fn run_all(body: &[u8]) -> Result<(), TestCaseError> {
    for d in models() {
        check(decode::predict(body, d), d, body)?;
        check(decode::predict_batch(body, d), d, body)?;
        check(decode::v2_infer(body, None, d), d, body)?;
    }
    Ok(())
}

// --------------------------------------------------------------- generators

/// Any JSON value, leaning to what decoders meet: numbers at the edges of
/// every element type, the non-finite spellings, nested arrays.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        6 => (-1000i64..1000).prop_map(Value::from),
        4 => any::<f32>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        1 => prop_oneof![
            Just(json!(i64::MAX)), Just(json!(i64::MIN)), Just(json!(u64::MAX)), Just(json!(1e39)),
            Just(json!(-1e300)), Just(json!(255)), Just(json!(256)), Just(json!(-129)), Just(json!(2.5)),
            Just(json!(4294967296i64)),
        ],
        1 => prop_oneof![Just("NaN"), Just("inf"), Just("-Infinity"), Just("x"), Just("")].prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 256, 10, |inner| {
        prop_oneof![
            6 => proptest::collection::vec(inner.clone(), 0..10).prop_map(Value::Array),
            1 => proptest::collection::btree_map(
                prop_oneof![
                    Just("features".to_string()), Just("inputs".to_string()), Just("instances".to_string()),
                    Just("x".to_string()), Just("k".to_string()), Just("m".to_string()), Just("name".to_string()),
                    Just("shape".to_string()), Just("datatype".to_string()), Just("data".to_string()),
                    Just("input".to_string()), Just("parameters".to_string()), Just("outputs".to_string()),
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A regular nested array of `shape` (each element a small number).
fn regular(shape: &[usize], seed: u32) -> Value {
    match shape.split_first() {
        None => json!((seed % 97) as f32 / 8.0),
        Some((n, rest)) => Value::Array((0..*n).map(|i| regular(rest, seed.wrapping_mul(31).wrapping_add(i as u32))).collect()),
    }
}

/// Nested arrays whose first elements claim `lens` (product up to ~1e12)
/// while the body holds only their sum: the shape of the attack.
fn claiming_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(1usize..120, 1..7).prop_map(|lens| {
        let mut s = String::new();
        for _ in &lens {
            s.push('[');
        }
        for (level, len) in lens.iter().rev().enumerate() {
            let zeros = if level == 0 { *len } else { len - 1 };
            for i in 0..zeros {
                if i > 0 || level > 0 {
                    s.push(',');
                }
                s.push('1');
            }
            s.push(']');
        }
        s
    })
}

/// Valid bodies of every route for the three models, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let row: Vec<f32> = (0..30).map(|i| i as f32 / 3.0).collect();
    let img = regular(&[1, 8, 8], 3);
    let bodies = vec![
        json!({"features": row}),
        json!({"inputs": {"features": [row, row]}}),
        json!({"instances": [row, row, row]}),
        json!({"features": img}),
        json!({"inputs": {"input": regular(&[2, 1, 8, 8], 5)}}),
        json!({"inputs": {"x": [[1.0, 2.0]], "k": [[1, 2]], "m": [[3]]}}),
        json!({"inputs": {"x": [1.0, 2.0], "k": [1, 2], "m": [3]}}),
        json!({"id": "a", "inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32", "data": [row, row]}],
               "outputs": [{"name": "output_label"}]}),
        json!({"inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
            {"name": "k", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
            {"name": "m", "shape": [1, 1], "datatype": "INT32", "data": [3]}],
            "parameters": {"binary_data_output": true}}),
    ];
    let mut out: Vec<Vec<u8>> = bodies.iter().map(|b| b.to_string().into_bytes()).collect();
    out.push(br#"{"features":[1, NaN, Infinity, -Infinity, 1e999]}"#.to_vec());
    out
}

/// A v2 binary request for the multi-input model: JSON header, then the
/// little-endian data of `x` (FP32 [1,2]) and `k` (INT64 [1,2]).
fn v2_binary_seed() -> (Vec<u8>, usize) {
    let head = json!({"inputs": [
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "k", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": 16}},
        {"name": "m", "shape": [1, 1], "datatype": "INT32", "data": [3]}]})
    .to_string();
    let mut body = head.clone().into_bytes();
    for f in [1.5f32, -2.0] {
        body.extend_from_slice(&f.to_le_bytes());
    }
    for k in [7i64, -9] {
        body.extend_from_slice(&k.to_le_bytes());
    }
    (body, head.len())
}

// -------------------------------------------------------------------- fuzz

#[test]
fn seeds_decode_to_what_they_say() {
    // The generators' starting points are valid, so mutations start from
    // the paths a real client takes.
    let s = seeds();
    assert_eq!(decode::predict(&s[0], bc()).unwrap()[0].shape, vec![1, 30]);
    assert_eq!(decode::predict(&s[1], bc()).unwrap()[0].shape, vec![2, 30]);
    assert_eq!(decode::predict_batch(&s[2], bc()).unwrap()[0].shape, vec![3, 30]);
    assert_eq!(decode::predict(&s[5], multi()).unwrap().len(), 3);
    assert_eq!(decode::v2_infer(&s[7], None, bc()).unwrap()[0].shape, vec![2, 30]);
    assert_eq!(decode::v2_infer(&s[8], None, multi()).unwrap().len(), 3);
    let (b, n) = v2_binary_seed();
    let t = decode::v2_infer(&b, Some(n), multi()).unwrap();
    assert_eq!(t[0].values, TensorValues::F32(vec![1.5, -2.0]));
    assert_eq!(t[1].values, TensorValues::I64(vec![7, -9]));
}

#[test]
fn fuzz_random_bytes() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    runner.run(&proptest::collection::vec(any::<u8>(), 0..256), |b| run_all(&b)).unwrap();
}

#[test]
fn fuzz_structured_json() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    let strategy = (json_value(), 0..5u8).prop_map(|(v, wrap)| {
        match wrap {
            0 => json!({"features": v}),
            1 => json!({"inputs": {"features": v, "x": v, "k": [[1, 2]], "m": [[3]], "input": v}}),
            2 => json!({"instances": v}),
            3 => json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": v}]}),
            _ => v,
        }
        .to_string()
        .into_bytes()
    });
    runner.run(&strategy, |b| run_all(&b)).unwrap();
}

#[test]
fn fuzz_claimed_shapes() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    let strategy = (claiming_text(), 0..6u8, proptest::collection::vec(0u64..1 << 20, 1..5)).prop_map(|(a, wrap, dims)| {
        let dims = serde_json::to_string(&dims).unwrap_or_default();
        match wrap {
            0 => format!("{{\"features\":{a}}}"),
            1 => format!("{{\"inputs\":{{\"features\":{a},\"input\":{a},\"x\":{a},\"k\":{a},\"m\":{a}}}}}"),
            2 => format!("{{\"instances\":{a}}}"),
            3 => format!("{{\"instances\":[{a}]}}"),
            4 => format!("{{\"inputs\":[{{\"name\":\"features\",\"datatype\":\"FP32\",\"shape\":{dims},\"data\":{a}}}]}}"),
            _ => format!("{{\"inputs\":[{{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":{dims},\"data\":{a}}}]}}"),
        }
        .into_bytes()
    });
    runner.run(&strategy, |b| run_all(&b)).unwrap();
}

#[test]
fn fuzz_mutated_valid_bodies() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(4000)));
    let strategy = prop::sample::select(seeds()).prop_flat_map(|s| mutated(s, 4));
    runner.run(&strategy, |b| run_all(&b)).unwrap();
}

#[test]
fn fuzz_v2_binary() {
    let (seed, head_len) = v2_binary_seed();
    let mut runner = TestRunner::new(fuzz_support::config(cases(3000)));
    let strategy = (
        mutated(seed, 3),
        prop_oneof![
            4 => Just(Some(head_len)),
            1 => (0usize..400).prop_map(Some),
            1 => Just(Some(usize::MAX)),
            1 => Just(None),
        ],
    );
    runner
        .run(&strategy, |(body, header)| {
            for d in models() {
                check(decode::v2_infer(&body, header, d), d, &body)?;
            }
            Ok(())
        })
        .unwrap();
}

/// Accepted v2 JSON requests decode to exactly the data sent, whatever
/// shape and nesting the data has.
#[test]
fn fuzz_v2_json_round_trips() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(500)));
    let strategy = (1usize..5, proptest::collection::vec(-1e6f32..1e6, 10), any::<bool>(), any::<bool>());
    runner
        .run(&strategy, |(rows, pool, nested, binary_out)| {
            let x: Vec<f32> = (0..rows * 2).map(|i| pool[i % pool.len()]).collect();
            let k: Vec<i64> = (0..rows * 2).map(|i| i as i64 * 1_000_000_007 - 5).collect();
            let m: Vec<i32> = (0..rows).map(|i| i as i32 - 2).collect();
            let x_data = if nested { json!(x.chunks(2).collect::<Vec<_>>()) } else { json!(x) };
            let body = json!({"inputs": [
                {"name": "m", "shape": [rows, 1], "datatype": "INT32", "data": m},
                {"name": "x", "shape": [rows, 2], "datatype": "FP32", "data": x_data},
                {"name": "k", "shape": [rows, 2], "datatype": "INT64", "data": k}],
                "parameters": {"binary_data_output": binary_out}})
            .to_string();
            let t = decode::v2_infer(body.as_bytes(), None, multi()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&t[0].values, &TensorValues::F32(x));
            prop_assert_eq!(&t[1].values, &TensorValues::I64(k));
            prop_assert_eq!(&t[2].values, &TensorValues::I32(m));
            prop_assert_eq!(&t[0].shape, &vec![rows, 2]);
            Ok(())
        })
        .unwrap();
}

/// The same bodies through a real server: never a 5xx, never a dead server.
#[test]
fn fuzz_through_a_real_server() {
    let bc_server = start_with("bc_mlp.onnx");
    let multi_server = start(Arc::new(ModelSlot::with(multi_input_model())), server_support::config());
    let targets = [(bc_server.local_addr(), "bc_mlp"), (multi_server.local_addr(), "multi")];
    let mut runner = TestRunner::new(fuzz_support::config(cases(200)));
    let strategy = prop_oneof![
        prop::sample::select(seeds()).prop_flat_map(|s| mutated(s, 3)),
        claiming_text().prop_map(|a| format!("{{\"features\":{a}}}").into_bytes()),
        json_value().prop_map(|v| json!({"inputs": {"x": v}}).to_string().into_bytes()),
    ];
    runner
        .run(&strategy, |body| {
            for (addr, name) in targets {
                let mut c = Client::connect(addr);
                for path in ["/predict".to_string(), "/predict/batch".to_string(), format!("/v2/models/{name}/infer")] {
                    let r = c.request("POST", &path, &[], &body);
                    prop_assert!(r.status < 500, "{path}: {} {}", r.status, r.text());
                    // Every answer has the documented error shape.
                    if r.status >= 400 {
                        let v = r.json();
                        prop_assert!(v["error"].is_object() || v["error"].is_string(), "{v}");
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    for (addr, _) in targets {
        assert_eq!(get(addr, "/health").status, 200);
    }
}
