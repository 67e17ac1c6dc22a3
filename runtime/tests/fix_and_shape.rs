//! Fixed inputs (`--fix NAME=VALUE`) and fixed shapes (`--shape NAME=D0,…`):
//! models that only load once an input or a dimension is known, built here
//! in code, loaded through the library's `LoadOptions` and through the real
//! `serve` binary; and every refusal.

mod server_support;

use server_support::{node, value_info, Dim};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_runtime::model::{BatchMode, FixedInput, InputShape, LoadError, LoadOptions, Model, ModelFormat};
use outpost_runtime::tensor::{TensorData, TensorValues};
use prost::Message;
use serde_json::{json, Value};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
};

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: values.to_vec(), ..Default::default() }
}

fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn model_bytes(graph: GraphProto) -> Vec<u8> {
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        producer_name: "outpost-fix-and-shape-tests".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The audio model's pattern, reduced: a scalar `sample_rate` (INT64 `[]`)
/// decides, through an `If`, the shape `x` (FP32 `[1, 4]`) is broadcast to:
/// `[2, 4]` at 16000 Hz, `[3, 1, 4]` otherwise. Until the condition is
/// known the two branches' outputs (of 2 and 3 elements) do not unify, and
/// tract refuses the `If`.
fn if_on_scalar_model() -> Vec<u8> {
    let branch = |name: &str, target: &[i64]| GraphProto {
        name: name.into(),
        node: vec![NodeProto {
            output: vec![format!("{name}_shape")],
            name: format!("{name}_const"),
            op_type: "Constant".into(),
            attribute: vec![AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(int64_tensor("", &[target.len() as i64], target)),
                ..Default::default()
            }],
            ..Default::default()
        }],
        output: vec![value_info(&format!("{name}_shape"), DataType::Int64, &[Dim::Fixed(target.len() as i64)])],
        ..Default::default()
    };
    let graph = |attr: &str, g: GraphProto| AttributeProto {
        name: attr.into(),
        r#type: AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    };
    model_bytes(GraphProto {
        name: "if_on_scalar".into(),
        node: vec![
            node("Equal", &["sample_rate", "sixteen_k"], "is_16k", vec![]),
            node(
                "If",
                &["is_16k"],
                "target_shape",
                vec![graph("then_branch", branch("then", &[2, 4])), graph("else_branch", branch("else", &[3, 1, 4]))],
            ),
            node("Expand", &["x", "target_shape"], "y", vec![]),
        ],
        initializer: vec![int64_tensor("sixteen_k", &[], &[16000])],
        input: vec![
            value_info("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(4)]),
            value_info("sample_rate", DataType::Int64, &[]),
        ],
        output: vec![ValueInfoProto {
            name: "y".into(),
            r#type: Some(TypeProto {
                denotation: String::new(),
                // Its rank depends on the branch taken: no shape declared.
                value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: DataType::Float as i32, shape: None })),
            }),
            doc_string: String::new(),
        }],
        ..Default::default()
    })
}

/// The detector's pattern, reduced: `x` FP32 `[1, 1, H, W]`, max-pooled 2×2
/// with stride 2, upsampled ×2 by `Resize` and concatenated to `x` along
/// the channels. With `H` and `W` free, tract cannot prove
/// `2 * (H / 2) == H`; at 4×4 it can.
fn free_height_width_model() -> Vec<u8> {
    let scales = TensorProto {
        name: "scales".into(),
        dims: vec![4],
        data_type: DataType::Float as i32,
        float_data: vec![1.0, 1.0, 2.0, 2.0],
        ..Default::default()
    };
    let mode = AttributeProto {
        name: "mode".into(),
        r#type: AttributeType::String as i32,
        s: b"nearest".to_vec(),
        ..Default::default()
    };
    model_bytes(GraphProto {
        name: "free_hw".into(),
        node: vec![
            node("MaxPool", &["x"], "pooled", vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])]),
            node("Resize", &["pooled", "", "scales"], "up", vec![mode]),
            node("Concat", &["x", "up"], "y", vec![AttributeProto { name: "axis".into(), r#type: AttributeType::Int as i32, i: 1, ..Default::default() }]),
        ],
        initializer: vec![scales],
        input: vec![value_info("x", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(1), Dim::Named("H"), Dim::Named("W")])],
        output: vec![value_info("y", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(2), Dim::Named("H"), Dim::Named("W")])],
        ..Default::default()
    })
}

/// The jax2tf classifier's pattern, reduced: `x` FP32 `[N, 4]` broadcast to
/// its own shape, read through `Shape` and a float round trip. With `N` a
/// symbol the shape's values are unknown and tract refuses the `Expand`;
/// with `N = 1` the shape folds to a constant.
fn shape_round_trip_model() -> Vec<u8> {
    let cast = |to: DataType| AttributeProto {
        name: "to".into(),
        r#type: AttributeType::Int as i32,
        i: to as i64,
        ..Default::default()
    };
    model_bytes(GraphProto {
        name: "shape_round_trip".into(),
        node: vec![
            node("Shape", &["x"], "shape", vec![]),
            node("Cast", &["shape"], "shape_f", vec![cast(DataType::Float)]),
            node("Cast", &["shape_f"], "shape_i", vec![cast(DataType::Int64)]),
            node("Expand", &["x", "shape_i"], "y", vec![]),
        ],
        input: vec![value_info("x", DataType::Float, &[Dim::Named("N"), Dim::Fixed(4)])],
        output: vec![value_info("y", DataType::Float, &[Dim::Named("N"), Dim::Fixed(4)])],
        ..Default::default()
    })
}

fn options(fix: &[&str], shape: &[&str]) -> LoadOptions {
    LoadOptions {
        fixed_inputs: fix.iter().map(|t| t.parse::<FixedInput>().expect("fix parses")).collect(),
        input_shapes: shape.iter().map(|t| t.parse::<InputShape>().expect("shape parses")).collect(),
        ..LoadOptions::default()
    }
}

fn load(bytes: &[u8], fix: &[&str], shape: &[&str]) -> Result<Model, LoadError> {
    Model::from_bytes(bytes, ModelFormat::Onnx, &options(fix, shape))
}

fn f32s(t: &TensorData) -> Vec<f32> {
    match &t.values {
        TensorValues::F32(v) => v.clone(),
        other => panic!("expected f32 output, got {other:?}"),
    }
}

#[test]
fn an_if_on_a_scalar_input_loads_once_the_input_is_fixed() {
    let bytes = if_on_scalar_model();
    let err = load(&bytes, &[], &[]).expect_err("the If on a free sample rate cannot be typed");
    assert!(matches!(err, LoadError::Prepare { .. }), "{err}");

    for (rate, shape) in [("16000", vec![2usize, 4]), ("8000", vec![3, 1, 4])] {
        let model = load(&bytes, &[&format!("sample_rate={rate}")], &[]).expect("loads with the rate fixed");
        let sig = model.signature();
        assert_eq!(sig.inputs.len(), 1, "the fixed input leaves the signature: {sig:?}");
        assert_eq!(sig.inputs[0].name, "x");
        let x = TensorData { shape: vec![1, 4], values: TensorValues::F32(vec![1.0, 2.0, 3.0, 4.0]) };
        let out = model.run(vec![x]).expect("runs");
        assert_eq!(out[0].shape, shape, "sample rate {rate}");
        assert_eq!(f32s(&out[0]), [1.0, 2.0, 3.0, 4.0].repeat(shape[0]));
    }
}

#[test]
fn free_height_and_width_load_once_the_shape_is_given() {
    let bytes = free_height_width_model();
    let err = load(&bytes, &[], &[]).expect_err("symbolic H and W do not unify through the Resize");
    assert!(matches!(err, LoadError::Prepare { .. }), "{err}");

    let model = load(&bytes, &[], &["x=1,1,4,4"]).expect("loads at 4x4");
    assert_eq!(model.signature().inputs[0].shape, vec![Some(1), Some(1), Some(4), Some(4)]);
    let x: Vec<f32> = (1..=16).map(|v| v as f32).collect();
    let out = model.run(vec![TensorData { shape: vec![1, 1, 4, 4], values: TensorValues::F32(x.clone()) }]).expect("runs");
    // Channel 0: the input; channel 1: each 2x2 block's maximum, in every
    // cell of the block.
    let block_max = [6.0, 6.0, 8.0, 8.0, 6.0, 6.0, 8.0, 8.0, 14.0, 14.0, 16.0, 16.0, 14.0, 14.0, 16.0, 16.0];
    let want: Vec<f32> = x.iter().copied().chain(block_max).collect();
    assert_eq!(out[0].shape, vec![1, 2, 4, 4]);
    assert_eq!(f32s(&out[0]), want);
    // Another size is refused as a shape error, not run.
    let wrong = TensorData { shape: vec![1, 1, 8, 8], values: TensorValues::F32(vec![0.0; 64]) };
    assert!(model.run(vec![wrong]).is_err_and(|e| e.is_input_error()));
}

#[test]
fn every_misfit_is_refused_with_its_own_error() {
    let if_model = if_on_scalar_model();
    let hw_model = free_height_width_model();
    let cases: Vec<(&str, Result<Model, LoadError>, &str)> = vec![
        ("unknown fixed input", load(&if_model, &["rate=16000"], &[]), "no input named \"rate\""),
        ("unknown shaped input", load(&hw_model, &[], &["images=1,1,4,4"]), "no input named \"images\""),
        ("fraction for an integer", load(&if_model, &["sample_rate=16000.5"], &[]), "give integers"),
        ("boolean for an integer", load(&if_model, &["sample_rate=true"], &[]), "not boolean"),
        ("array for a scalar", load(&if_model, &["sample_rate=[16000, 8000]"], &[]), "rank"),
        ("wrong value shape", load(&if_model, &["x=[1, 2, 3]"], &[]), "rank"),
        ("wrong value length", load(&if_model, &["x=[[1, 2, 3]]"], &[]), "dimension 1 is 4"),
        ("wrong rank", load(&hw_model, &[], &["x=1,4,4"]), "rank 4"),
        ("fixed dimension changed", load(&hw_model, &[], &["x=1,3,4,4"]), "dimension 1 is 1"),
        ("fixed twice", load(&if_model, &["sample_rate=1", "sample_rate=2"], &[]), "more than once"),
        ("fixed and shaped", load(&if_model, &["sample_rate=1"], &["sample_rate=1"]), "more than once"),
    ];
    for (what, result, needle) in cases {
        let err = result.expect_err(what);
        assert!(
            matches!(err, LoadError::UnknownInput { .. } | LoadError::FixedInput { .. } | LoadError::InputShape { .. }),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(needle), "{what}: {err}");
    }
    // A value that is not one is refused while parsing, before any model.
    for bad in ["sample_rate", "sample_rate=", "sample_rate=16k", "x=[[1,2],[3]]"] {
        assert!(bad.parse::<FixedInput>().is_err(), "{bad}");
    }
}

/// `[[0, 0, …], …]` of the given shape, as `--fix` text.
fn zeros_json(shape: &[usize]) -> String {
    match shape.split_first() {
        None => "0".into(),
        Some((n, rest)) => format!("[{}]", vec![zeros_json(rest); *n].join(",")),
    }
}

#[test]
fn tflite_inputs_are_fixed_and_shaped_on_the_typed_graph() {
    let tflite = |name: &str| std::fs::read(server_support::fixture(name)).expect("fixture");
    let load = |bytes: &[u8], fix: &[&str], shape: &[&str]| Model::from_bytes(bytes, ModelFormat::Tflite, &options(fix, shape));
    let digits = tflite("digits_cnn.tflite");
    let plain = load(&digits, &[], &[]).expect("loads");
    let spec = plain.signature().inputs[0].clone();
    let dims: Vec<usize> = spec.shape.iter().map(|d| d.expect("TFLite declares every dimension") as usize).collect();
    let text = |dims: &[usize]| dims.iter().map(usize::to_string).collect::<Vec<_>>().join(",");

    // Its own shape: loads the same.
    let shaped = load(&digits, &[], &[&format!("{}={}", spec.name, text(&dims))]).expect("own shape loads");
    assert_eq!(shaped.signature(), plain.signature());
    // Another one is refused: TFLite fixes its dimensions.
    let mut other = dims.clone();
    *other.last_mut().expect("rank > 0") += 1;
    let err = load(&digits, &[], &[&format!("{}={}", spec.name, text(&other))]).expect_err("refused");
    assert!(matches!(err, LoadError::InputShape { .. }), "{err}");

    // Fixed to zeros, the model takes no input and answers as for zeros.
    let fixed = load(&digits, &[&format!("{}={}", spec.name, zeros_json(&dims))], &[]).expect("fixed loads");
    assert!(fixed.signature().inputs.is_empty(), "{:?}", fixed.signature());
    let want = plain.run(plain.zero_inputs(1)).expect("runs");
    let got = fixed.run(vec![]).expect("runs without inputs");
    assert_eq!(got[0].shape, want[0].shape);
    assert_eq!(f32s(&got[0]), f32s(&want[0]));

    // An input the runtime quantizes at the edge is refused by name.
    let int8 = tflite("digits_cnn_int8.tflite");
    let name = load(&int8, &[], &[]).expect("loads").signature().inputs[0].name.clone();
    let err = load(&int8, &[&format!("{name}={}", zeros_json(&dims))], &[]).expect_err("refused");
    assert!(err.to_string().contains("quantizes"), "{err}");
}

#[test]
fn a_model_that_fails_with_a_symbolic_batch_loads_with_it_fixed() {
    let model = load(&shape_round_trip_model(), &[], &[]).expect("loads through the fixed-batch fallback");
    assert_eq!(model.batch_mode(), BatchMode::FixedFallback);
    assert_eq!(model.signature().inputs[0].shape, vec![Some(1), Some(4)]);
    // Three rows still answer, run one by one.
    let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let out = model.run(vec![TensorData { shape: vec![3, 4], values: TensorValues::F32(x.clone()) }]).expect("runs");
    assert_eq!(out[0].shape, vec![3, 4]);
    assert_eq!(f32s(&out[0]), x);
    // A model that loads with its symbolic batch keeps it; one that fixes
    // its own dimensions says so.
    let bc = Model::load(server_support::fixture("bc_mlp.onnx"), &LoadOptions::default()).expect("fixture");
    assert_eq!(bc.batch_mode(), BatchMode::Symbolic);
    let hw = load(&free_height_width_model(), &[], &["x=1,1,4,4"]).expect("loads");
    assert_eq!(hw.batch_mode(), BatchMode::Fixed);
}

// ------------------------------------------------------------ the binary

/// A file under a directory of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("outpost-fix-shape-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write model");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `outpost-runtime serve`, killed when dropped.
struct Serving {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-runtime"));
    cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null());
    cmd
}

/// Starts `serve` and waits (bounded) for the line that says where it listens.
fn serve(model: &Path, extra: &[&str]) -> Serving {
    let model = model.to_str().expect("utf-8 path");
    let mut args = vec!["serve", "--model", model, "--listen", "127.0.0.1:0", "--threads", "1"];
    args.extend_from_slice(extra);
    let mut child = runtime(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawns");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(" on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").trim_end_matches(',').to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("serve says where it listens");
    Serving { child, addr: addr.parse().expect("address") }
}

/// Runs a `serve` that must be refused: exit code ≠ 0 and one stderr line.
/// Bounded: a serve that starts after all is killed and fails the test.
fn refused(args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    let mut child = runtime(&args)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was not refused within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{args:?} succeeded");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr piped"), &mut stderr).expect("stderr");
    let stderr = stderr.trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn serve_fixes_an_input_and_shapes_another_and_refuses_misfits() {
    let scratch = Scratch::new("serve");
    let if_model = scratch.write("audio.onnx", &if_on_scalar_model());
    let hw_model = scratch.write("detector.onnx", &free_height_width_model());

    let running = serve(&if_model, &["--fix", "sample_rate=8000"]);
    let info: Value = server_support::get(running.addr, "/v1/model").json();
    let names: Vec<&str> = info["inputs"].as_array().expect("inputs").iter().filter_map(|i| i["name"].as_str()).collect();
    assert_eq!(names, ["x"], "{info}");
    assert_eq!(info["batch"], "fixed", "{info}");
    let answer = server_support::post_json(running.addr, "/predict", &json!({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]]}}));
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    let y = body["outputs"]["y"].clone();
    // 8000 Hz takes the else branch: [3, 1, 4].
    assert_eq!(y, json!([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0, 3.0, 4.0]]]), "{body}");
    // The fixed input is no longer one a client can give.
    let extra = server_support::post_json(running.addr, "/predict", &json!({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]], "sample_rate": 16000}}));
    assert_eq!(extra.status, 422, "{}", extra.text());
    drop(running);

    let running = serve(&hw_model, &["--shape", "x=1,1,4,4"]);
    let info: Value = server_support::get(running.addr, "/v1/model").json();
    assert_eq!(info["inputs"][0]["shape"], json!([1, 1, 4, 4]), "{info}");
    drop(running);

    let fallback = scratch.write("classifier.onnx", &shape_round_trip_model());
    let running = serve(&fallback, &[]);
    let info: Value = server_support::get(running.addr, "/v1/model").json();
    assert_eq!(info["batch"], "fixed_fallback", "{info}");
    drop(running);

    let m = if_model.to_str().expect("utf-8");
    let h = hw_model.to_str().expect("utf-8");
    let line = refused(&["serve", "--model", m, "--fix", "rate=16000"]);
    assert!(line.contains("no input named \"rate\""), "{line}");
    let line = refused(&["serve", "--model", m, "--fix", "sample_rate=sixteen"]);
    assert!(line.contains("--fix sample_rate=sixteen"), "{line}");
    let line = refused(&["serve", "--model", h, "--shape", "x=4,4"]);
    assert!(line.contains("rank 4"), "{line}");
    let line = refused(&["serve", "--model", h, "--shape", "x=1,1,four,4"]);
    assert!(line.contains("--shape x=1,1,four,4"), "{line}");
    // A signed bundle loads as it was signed: no command-line fixing.
    let bundle = scratch.0.join("audio.outpost");
    let line = refused(&["serve", "--model", bundle.to_str().expect("utf-8"), "--fix", "sample_rate=8000"]);
    assert!(line.contains("loaded as it was signed"), "{line}");
    // Without the fix, the model is refused as tract refuses it.
    let line = refused(&["serve", "--model", m]);
    assert!(line.contains("cannot be prepared"), "{line}");
}
