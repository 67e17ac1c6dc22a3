//! Fuzzing model loading: the TFLite rewriter
//! (runtime/src/model/tflite_rewrite.rs) and ONNX loading
//! (runtime/src/model/onnx.rs, then tract) on mutated bytes of the fixture
//! models (issue 17).
//!
//! Property: `Model::from_bytes` returns `Ok` or a `LoadError`; it never
//! aborts. tract is third-party: `from_bytes` catches a panic inside it and
//! refuses the model, and such panics are tolerated here (counted; e.g. a
//! graph output no node produces, runtime/tests/model_fixtures.rs). A panic
//! in Outpost's own code (`runtime/src/`) fails the test: that is our bug.
//! A model that loads runs on zeros (the warm-up does it).
//!
//! Loading takes milliseconds, so few cases run under `cargo test`;
//! `OUTPOST_FUZZ_CASES=N` runs N/100 per format (docs/fuzzing.md).

mod fuzz_support;

use std::path::PathBuf;
use std::sync::{Mutex, Once};

use fuzz_support::{mutated, slow_cases};
use outpost_runtime::model::{LoadOptions, Model, ModelFormat};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// Where panics happened: (file, line, message).
static PANICS: Mutex<Vec<(String, u32, String)>> = Mutex::new(Vec::new());

fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let (file, line) = info.location().map(|l| (l.file().to_string(), l.line())).unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if let Ok(mut p) = PANICS.lock() {
                p.push((file, line, msg));
            }
        }));
    });
}

fn ours(file: &str) -> bool {
    file.starts_with("runtime/src") || file.contains("/runtime/src/")
}

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Fast options (no optimizer, no batch plans) but with the warm-up run, so
/// a model that loads is also run once.
fn fast() -> LoadOptions {
    LoadOptions { optimize: false, warm_up: true, batch_plans: 0, ..LoadOptions::default() }
}

/// Models that loaded (the rest were refused), for the summary line.
static LOADED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn load(bytes: &[u8], format: ModelFormat, options: &LoadOptions) -> Result<(), TestCaseError> {
    let before = PANICS.lock().map(|p| p.len()).unwrap_or(0);
    let result = Model::from_bytes(bytes, format, options);
    if let Ok(m) = &result {
        LOADED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        prop_assert!(!m.signature().inputs.is_empty() || m.signature().outputs.is_empty());
    }
    let p = PANICS.lock().map(|p| p[before.min(p.len())..].to_vec()).unwrap_or_default();
    if let Some((file, line, msg)) = p.iter().find(|(f, _, _)| ours(f)) {
        return Err(TestCaseError::fail(format!("panic in Outpost's code at {file}:{line}: {msg}")));
    }
    Ok(())
}

fn fuzz(names: &[&str], format: ModelFormat, default_cases: u32) {
    record_panics();
    let seeds: Vec<Vec<u8>> = names.iter().map(|n| fixture(n)).collect();
    let runner_cases = slow_cases(default_cases);
    let mut runner = TestRunner::new(fuzz_support::config(runner_cases));
    let strategy = (prop::sample::select(seeds).prop_flat_map(|s| mutated(s, 3)), 0..8u8);
    runner
        .run(&strategy, |(bytes, opt)| {
            // One case in eight goes through the optimizer and batch plans.
            let options = if opt == 0 { LoadOptions::default() } else { fast() };
            load(&bytes, format, &options)
        })
        .unwrap();
    let p = PANICS.lock().map(|p| p.clone()).unwrap_or_default();
    let tolerated: Vec<String> = p.iter().map(|(f, l, _)| format!("{f}:{l}")).collect();
    eprintln!(
        "{format:?}: {} cases, {} models loaded in this binary so far; {} panics inside third-party code, caught and refused: {tolerated:?}",
        runner_cases,
        LOADED.load(std::sync::atomic::Ordering::Relaxed),
        p.len()
    );
}

#[test]
fn fixtures_load() {
    for (name, format) in [("bc_mlp_prelu.tflite", ModelFormat::Tflite), ("bc_logreg.onnx", ModelFormat::Onnx)] {
        assert!(Model::from_bytes(&fixture(name), format, &fast()).is_ok(), "{name}");
    }
}

#[test]
fn fuzz_tflite_rewriter() {
    fuzz(&["bc_mlp_prelu.tflite", "digits_cnn_int8.tflite", "digits_cnn_fp16.tflite"], ModelFormat::Tflite, 150);
}

#[test]
fn fuzz_onnx_loading() {
    fuzz(&["bc_logreg.onnx", "bc_mlp_int8.onnx", "bc_mlp_qdq.onnx", "digits_cnn_int8.onnx"], ModelFormat::Onnx, 150);
}

#[test]
fn random_bytes_are_refused() {
    record_panics();
    let mut runner = TestRunner::new(fuzz_support::config(slow_cases(200)));
    runner
        .run(&(proptest::collection::vec(any::<u8>(), 0..300), any::<bool>()), |(b, tfl)| {
            let format = if tfl { ModelFormat::Tflite } else { ModelFormat::Onnx };
            load(&b, format, &fast())
        })
        .unwrap();
}

// ------------------------------------------------------- regression inputs

/// A one-node model `y = Identity(x)` with `x` declared `[N, dims...]`.
fn identity_model(dims: &[i64]) -> Vec<u8> {
    use prost::Message;
    use tract_onnx::pb::{
        tensor_proto::DataType, tensor_shape_proto, type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        TensorShapeProto, TypeProto, ValueInfoProto,
    };
    let value = |name: &str| {
        let mut dim = vec![tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(tensor_shape_proto::dimension::Value::DimParam("N".into())),
        }];
        dim.extend(dims.iter().map(|d| tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(tensor_shape_proto::dimension::Value::DimValue(*d)),
        }));
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                denotation: String::new(),
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto { dim }),
                })),
            }),
            doc_string: String::new(),
        }
    };
    let node = NodeProto {
        input: vec!["x".into()],
        output: vec!["y".into()],
        name: "id".into(),
        op_type: "Identity".into(),
        ..Default::default()
    };
    let graph =
        GraphProto { name: "id".into(), node: vec![node], input: vec![value("x")], output: vec![value("y")], ..Default::default() };
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Inputs declaring samples too large to allocate: the warm-up must not
/// reserve them (4 TiB of zeros; an allocation failure aborts the process,
/// and a product that overflows panics in a debug build).
#[test]
fn regression_input_dims_too_large_to_allocate() {
    assert!(Model::from_bytes(&identity_model(&[3, 4]), ModelFormat::Onnx, &fast()).is_ok());
    for dims in [vec![1i64 << 40], vec![1 << 20, 1 << 20, 1 << 20, 1 << 20], vec![i64::MAX, i64::MAX]] {
        let bytes = identity_model(&dims);
        for options in [fast(), LoadOptions::default()] {
            let err = Model::from_bytes(&bytes, ModelFormat::Onnx, &options).err();
            assert!(err.is_some(), "{dims:?} loaded");
        }
    }
}

/// An 8-bit weight of a `MatMulInteger` whose dims multiply past i64 is
/// refused without a panic. tract's reader refuses such a shape first; the
/// load-time rewrite (runtime/src/model/onnx.rs, `integer_matmuls_as_float`)
/// multiplies them with checked arithmetic anyway.
#[test]
fn int8_weight_dims_that_overflow_are_refused_without_a_panic() {
    use prost::Message;
    record_panics();
    let mut proto = tract_onnx::pb::ModelProto::decode(&fixture("bc_mlp_int8.onnx")[..]).expect("fixture decodes");
    let graph = proto.graph.as_mut().expect("graph");
    let weights: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "MatMulInteger")
        .filter_map(|n| n.input.get(1).cloned())
        .collect();
    assert!(!weights.is_empty(), "the fixture has integer matmuls");
    let mut edited = 0;
    for t in graph.initializer.iter_mut().filter(|t| weights.contains(&t.name)) {
        t.dims = vec![1 << 40, 1 << 40];
        edited += 1;
    }
    assert_eq!(edited, weights.len(), "every weight is an initializer");
    let before = PANICS.lock().map(|p| p.len()).unwrap_or(0);
    let err = Model::from_bytes(&proto.encode_to_vec(), ModelFormat::Onnx, &fast()).expect_err("refused");
    assert!(err.to_string().contains("overflows"), "{err}");
    let p = PANICS.lock().map(|p| p[before..].to_vec()).unwrap_or_default();
    assert!(!p.iter().any(|(f, _, _)| ours(f)), "panicked in Outpost's code: {p:?}");
}
