//! TFLite loading: every `.tflite` fixture loads through `Model::load` (after
//! the rewrite tract-tflite needs: float16 constants, edge quantize /
//! dequantize, PRELU) and reproduces the outputs of `tf.lite.Interpreter`
//! (`fixtures/<model>.expected.json`); batch 1 agrees with batch N row by
//! row; models with operators tract lacks are refused naming the operator
//! and its node; broken flatbuffers are refused without panicking.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flatbuffers::FlatBufferBuilder;
use outpost_runtime::model::{LoadError, LoadOptions, Model, ModelFormat};
use outpost_runtime::tensor::{ElementType, TensorData, TensorValues};
use serde::Deserialize;
use tract_tflite::tflite::{self as fb, BuiltinOperator, BuiltinOptions, TensorType};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

#[derive(Deserialize)]
struct Expected {
    inputs: BTreeMap<String, JsonTensor>,
    outputs: BTreeMap<String, JsonTensor>,
}

#[derive(Deserialize)]
struct JsonTensor {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl JsonTensor {
    fn to_tensor(&self) -> TensorData {
        assert_eq!(self.dtype, "float32", "TFLite fixtures exchange float32");
        let values = TensorValues::F32(self.data.iter().map(|x| *x as f32).collect());
        TensorData::new(self.shape.clone(), values).expect("fixture tensor is consistent")
    }
}

fn expected(model: &str) -> Expected {
    let path = fixtures().join(format!("{model}.expected.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(model: &str) -> Model {
    Model::load(fixtures().join(model), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model} does not load: {e}"))
}

fn f32s(t: &TensorData) -> &[f32] {
    match &t.values {
        TensorValues::F32(v) => v,
        other => panic!("expected f32 output, got {:?}", other.len()),
    }
}

/// Inputs in the model's order, taken by name from the fixture.
fn ordered_inputs(model: &Model, inputs: &BTreeMap<String, JsonTensor>) -> Vec<TensorData> {
    model
        .signature()
        .inputs
        .iter()
        .map(|spec| {
            inputs
                .get(&spec.name)
                .unwrap_or_else(|| {
                    panic!("fixture lacks input {:?}; model takes {:?}", spec.name, model.signature())
                })
                .to_tensor()
        })
        .collect()
}

/// Scale of the int8 tensor feeding the `DEQUANTIZE` that makes the graph
/// output, read from the flatbuffer itself (the tolerance is stated in
/// steps of it).
fn output_scale(model: &str) -> f32 {
    let bytes = std::fs::read(fixtures().join(model)).expect("fixture readable");
    let root = fb::root_as_model(&bytes).expect("valid flatbuffer");
    let graph = root.subgraphs().expect("subgraphs").get(0);
    let tensors = graph.tensors().expect("tensors");
    let output = graph.outputs().expect("outputs").get(0);
    let codes = root.operator_codes().expect("operator codes");
    for op in graph.operators().expect("operators") {
        let code = codes.get(op.opcode_index() as usize);
        let outputs = op.outputs().expect("op outputs");
        if code.deprecated_builtin_code() == BuiltinOperator::DEQUANTIZE.0 as i8 && outputs.get(0) == output {
            let input = tensors.get(op.inputs().expect("op inputs").get(0) as usize);
            return input.quantization().and_then(|q| q.scale()).expect("quantized").get(0);
        }
    }
    panic!("{model}: no DEQUANTIZE makes the graph output")
}

/// How close the runtime must come to `tf.lite.Interpreter`, as
/// `|got - want| <= abs + rel * |want|`, and why.
fn tolerance(model: &str) -> (f64, f64) {
    match model {
        // Same float32 arithmetic; tract and TFLite's builtin kernels sum in
        // different orders, which moves results by a few ULPs.
        "digits_cnn.tflite" | "bc_mlp_prelu.tflite" => (1e-5, 1e-4),
        // The weights are float16 values in both runtimes: the rewrite turns
        // each into the float32 of the same value, exactly what TFLite's
        // DEQUANTIZE does at its first invocation; all arithmetic is float32.
        // So the float tolerance applies unchanged.
        "digits_cnn_fp16.tflite" => (1e-5, 1e-4),
        // Full int8: the runtime quantizes the input as TFLite's QUANTIZE
        // does, then every layer requantizes its int32 accumulator to int8.
        // tract and TFLite round those requantizations differently (tract
        // rounds the real multiplier, TFLite uses a fixed-point multiplier
        // with its own rounding), so an activation may land one step off; a
        // step at an early layer can move the int8 output by one more. Two
        // steps of the output scale (softmax: 1/256) bound it.
        "digits_cnn_int8.tflite" => (2.0 * f64::from(output_scale(model)) + 1e-6, 0.0),
        other => panic!("no tolerance stated for {other}"),
    }
}

const TFLITE_FIXTURES: &[&str] =
    &["digits_cnn.tflite", "digits_cnn_fp16.tflite", "digits_cnn_int8.tflite", "bc_mlp_prelu.tflite"];

#[test]
fn every_tflite_fixture_is_listed_here() {
    let mut found: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".tflite"))
        .collect();
    found.sort();
    let mut listed: Vec<String> = TFLITE_FIXTURES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "a TFLite fixture has no test (and tolerance) here");
}

#[test]
fn tflite_fixtures_match_tflite_interpreter() {
    for model_name in TFLITE_FIXTURES {
        let model = load(model_name);
        assert_eq!(model.format(), ModelFormat::Tflite);
        let expected = expected(model_name);
        let inputs = ordered_inputs(&model, &expected.inputs);
        let outputs = model.run(inputs).unwrap_or_else(|e| panic!("{model_name} runs: {e}"));
        let (abs, rel) = tolerance(model_name);
        for (spec, got) in model.signature().outputs.iter().zip(&outputs) {
            let want = expected
                .outputs
                .get(&spec.name)
                .unwrap_or_else(|| panic!("{model_name}: fixture lacks output {:?}", spec.name));
            assert_eq!(spec.element_type, ElementType::F32, "{model_name}: float interface");
            assert_eq!(got.shape, want.shape, "{model_name}: output {} shape", spec.name);
            let mut worst = 0.0f64;
            for (ix, (g, w)) in f32s(got).iter().zip(&want.data).enumerate() {
                let err = (f64::from(*g) - w).abs();
                worst = worst.max(err);
                assert!(
                    err <= abs + rel * w.abs(),
                    "{model_name}: output {}[{ix}] = {g}, reference {w} (error {err:.3e}, tolerance {abs:.1e} + {rel:.1e}·|ref|)",
                    spec.name
                );
            }
            // Classifiers: the predicted class of every row must agree too.
            if want.shape.len() == 2 && want.shape[1] > 1 {
                let classes = want.shape[1];
                let argmax = |v: &[f64]| {
                    v.iter().enumerate().fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
                };
                let got64: Vec<f64> = f32s(got).iter().map(|x| f64::from(*x)).collect();
                for (row, (g, w)) in got64.chunks(classes).zip(want.data.chunks(classes)).enumerate() {
                    let margin = {
                        let mut sorted = w.to_vec();
                        sorted.sort_by(|a, b| b.total_cmp(a));
                        sorted[0] - sorted[1]
                    };
                    // A tie within the tolerance may flip; anything clearer may not.
                    if margin > 2.0 * abs {
                        assert_eq!(argmax(g), argmax(w), "{model_name}: predicted class of row {row}");
                    }
                }
            }
            eprintln!(
                "{model_name}: output {}: max abs error {worst:.3e} (tolerance {abs:.1e} + {rel:.1e}·|ref|)",
                spec.name
            );
            if model_name.contains("int8") {
                // The int8 graph agrees with TFLite's almost everywhere: the
                // few differences come from the softmax kernels (see the
                // tolerance), not from drifting layers.
                let step = abs / 2.0;
                let exact = f32s(got)
                    .iter()
                    .zip(&want.data)
                    .filter(|(g, w)| (f64::from(**g) - **w).abs() < step / 2.0)
                    .count();
                eprintln!("{model_name}: {exact} of {} values exact", want.data.len());
                assert!(exact * 10 >= want.data.len() * 9, "{model_name}: only {exact} exact values");
            }
        }
    }
}

fn row_of(t: &TensorData, row: usize) -> TensorData {
    let row_len: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = 1;
    let values = TensorValues::F32(f32s(t)[row * row_len..(row + 1) * row_len].to_vec());
    TensorData::new(shape, values).expect("consistent row")
}

#[test]
fn tflite_batch_of_one_agrees_with_batch_of_n() {
    for model_name in TFLITE_FIXTURES {
        let model = load(model_name);
        let expected = expected(model_name);
        let inputs = ordered_inputs(&model, &expected.inputs);
        let rows = inputs[0].shape[0];
        assert!(rows > 1, "{model_name}: fixture holds a batch");
        let batched = model.run(inputs.clone()).expect("batch runs");
        for row in 0..rows {
            let single: Vec<TensorData> = inputs.iter().map(|t| row_of(t, row)).collect();
            let alone = model.run(single).expect("row runs");
            for (b, a) in batched.iter().zip(&alone) {
                assert_eq!(a.shape[0], 1);
                assert_eq!(row_of(b, row).values, a.values, "{model_name}: row {row} alone vs in a batch");
            }
        }
    }
}

#[test]
fn tflite_fixture_interfaces_are_float_with_the_published_names() {
    for model_name in TFLITE_FIXTURES {
        let model = load(model_name);
        let expected = expected(model_name);
        let sig = model.signature();
        let ins: Vec<&str> = sig.inputs.iter().map(|s| s.name.as_str()).collect();
        let outs: Vec<&str> = sig.outputs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(ins, expected.inputs.keys().map(String::as_str).collect::<Vec<_>>(), "{model_name}");
        assert_eq!(outs, expected.outputs.keys().map(String::as_str).collect::<Vec<_>>(), "{model_name}");
        for spec in sig.inputs.iter().chain(&sig.outputs) {
            assert_eq!(spec.element_type, ElementType::F32, "{model_name}: {}", spec.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Hand-made models
// ---------------------------------------------------------------------------

struct T<'a> {
    name: &'a str,
    shape: &'a [i32],
    dtype: TensorType,
    data: Option<Vec<u8>>,
    quant: Option<(f32, i64)>,
}

impl<'a> T<'a> {
    fn f32(name: &'a str, shape: &'a [i32]) -> T<'a> {
        T { name, shape, dtype: TensorType::FLOAT32, data: None, quant: None }
    }
    fn f32_const(name: &'a str, shape: &'a [i32], values: &[f32]) -> T<'a> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        T { name, shape, dtype: TensorType::FLOAT32, data: Some(data), quant: None }
    }
    fn i8q(name: &'a str, shape: &'a [i32], scale: f32, zp: i64) -> T<'a> {
        T { name, shape, dtype: TensorType::INT8, data: None, quant: Some((scale, zp)) }
    }
}

struct O<'a> {
    code: BuiltinOperator,
    custom: Option<&'a str>,
    inputs: &'a [i32],
    outputs: &'a [i32],
    options: Opts,
}

/// The option tables the hand-made models need.
#[derive(Clone, Copy, Default)]
enum Opts {
    #[default]
    None,
    Reducer {
        keep_dims: bool,
    },
    FullyConnected,
}

fn op<'a>(code: BuiltinOperator, inputs: &'a [i32], outputs: &'a [i32]) -> O<'a> {
    O { code, custom: None, inputs, outputs, options: Opts::None }
}

/// A one-subgraph model, built with the flatbuffer builder the way TFLite's
/// converter lays it out (buffer 0 empty, one buffer per constant).
fn build(tensors: &[T], ops: &[O], inputs: &[i32], outputs: &[i32]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let mut buffers = vec![fb::Buffer::create(&mut fbb, &fb::BufferArgs { data: None })];
    let mut flat_tensors = vec![];
    for t in tensors {
        let buffer = match &t.data {
            Some(d) => {
                let data = fbb.create_vector(d);
                buffers.push(fb::Buffer::create(&mut fbb, &fb::BufferArgs { data: Some(data) }));
                buffers.len() as u32 - 1
            }
            None => 0,
        };
        let quantization = t.quant.map(|(s, z)| {
            let scale = fbb.create_vector(&[s]);
            let zero_point = fbb.create_vector(&[z]);
            fb::QuantizationParameters::create(
                &mut fbb,
                &fb::QuantizationParametersArgs {
                    scale: Some(scale),
                    zero_point: Some(zero_point),
                    ..Default::default()
                },
            )
        });
        let name = fbb.create_string(t.name);
        let shape = fbb.create_vector(t.shape);
        flat_tensors.push(fb::Tensor::create(
            &mut fbb,
            &fb::TensorArgs {
                shape: Some(shape),
                type_: t.dtype,
                buffer,
                name: Some(name),
                quantization,
                ..Default::default()
            },
        ));
    }
    let mut codes = vec![];
    let mut flat_ops = vec![];
    for (ix, op) in ops.iter().enumerate() {
        let custom_code = op.custom.map(|c| fbb.create_string(c));
        codes.push(fb::OperatorCode::create(
            &mut fbb,
            &fb::OperatorCodeArgs {
                deprecated_builtin_code: op.code.0.min(127) as i8,
                custom_code,
                version: 1,
                builtin_code: op.code,
            },
        ));
        let ins = fbb.create_vector(op.inputs);
        let outs = fbb.create_vector(op.outputs);
        let (builtin_options_type, builtin_options) = match op.options {
            Opts::None => (BuiltinOptions::NONE, None),
            Opts::Reducer { keep_dims } => (
                BuiltinOptions::ReducerOptions,
                Some(
                    fb::ReducerOptions::create(&mut fbb, &fb::ReducerOptionsArgs { keep_dims })
                        .as_union_value(),
                ),
            ),
            Opts::FullyConnected => (
                BuiltinOptions::FullyConnectedOptions,
                Some(
                    fb::FullyConnectedOptions::create(&mut fbb, &fb::FullyConnectedOptionsArgs::default())
                        .as_union_value(),
                ),
            ),
        };
        flat_ops.push(fb::Operator::create(
            &mut fbb,
            &fb::OperatorArgs {
                opcode_index: ix as u32,
                inputs: Some(ins),
                outputs: Some(outs),
                builtin_options_type,
                builtin_options,
                ..Default::default()
            },
        ));
    }
    let tensors = fbb.create_vector(&flat_tensors);
    let ins = fbb.create_vector(inputs);
    let outs = fbb.create_vector(outputs);
    let operators = fbb.create_vector(&flat_ops);
    let subgraph = fb::SubGraph::create(
        &mut fbb,
        &fb::SubGraphArgs {
            tensors: Some(tensors),
            inputs: Some(ins),
            outputs: Some(outs),
            operators: Some(operators),
            name: None,
        },
    );
    let subgraphs = fbb.create_vector(&[subgraph]);
    let operator_codes = fbb.create_vector(&codes);
    let buffers = fbb.create_vector(&buffers);
    let model = fb::Model::create(
        &mut fbb,
        &fb::ModelArgs {
            version: 3,
            operator_codes: Some(operator_codes),
            subgraphs: Some(subgraphs),
            buffers: Some(buffers),
            ..Default::default()
        },
    );
    fb::finish_model_buffer(&mut fbb, model);
    fbb.finished_data().to_vec()
}

fn load_bytes(bytes: &[u8]) -> Result<Model, LoadError> {
    Model::from_bytes(bytes, ModelFormat::Tflite, &LoadOptions::default())
}

fn expect_unsupported(bytes: &[u8], op_part: &str, node_parts: &[&str]) {
    match load_bytes(bytes) {
        Err(LoadError::UnsupportedOperator { op, node }) => {
            assert!(op.contains(op_part), "operator named {op:?}, expected {op_part:?}");
            for part in node_parts {
                assert!(node.contains(part), "node named {node:?}, expected it to contain {part:?}");
            }
            let message = LoadError::UnsupportedOperator { op, node }.to_string();
            assert!(message.contains(op_part), "{message}");
        }
        Err(other) => panic!("expected an unsupported-operator refusal, got: {other}"),
        Ok(_) => panic!("a model with {op_part} loaded"),
    }
}

#[test]
fn builtin_operator_tract_lacks_is_refused_naming_it_and_its_node() {
    // RELU (supported) then LSTM (not): the LSTM is operator #1 and makes
    // tensor "lstm_out".
    let bytes = build(
        &[T::f32("x", &[1, 4]), T::f32("relu_out", &[1, 4]), T::f32("lstm_out", &[1, 4])],
        &[op(BuiltinOperator::RELU, &[0], &[1]), op(BuiltinOperator::LSTM, &[1], &[2])],
        &[0],
        &[2],
    );
    expect_unsupported(&bytes, "LSTM", &["#1", "lstm_out"]);
}

#[test]
fn custom_operator_is_refused_naming_it() {
    let bytes = build(
        &[T::f32("x", &[1, 4]), T::f32("frobnicated", &[1, 4])],
        &[O {
            code: BuiltinOperator::CUSTOM,
            custom: Some("Frobnicate"),
            inputs: &[0],
            outputs: &[1],
            options: Opts::None,
        }],
        &[0],
        &[1],
    );
    expect_unsupported(&bytes, "CUSTOM(Frobnicate)", &["#0", "frobnicated"]);
}

#[test]
fn builtin_code_past_127_is_read_from_the_new_field() {
    // GELU (150) only fits in `builtin_code`; tract lacks it.
    let bytes = build(
        &[T::f32("x", &[1, 4]), T::f32("gelu_out", &[1, 4])],
        &[op(BuiltinOperator::GELU, &[0], &[1])],
        &[0],
        &[1],
    );
    expect_unsupported(&bytes, "GELU", &["#0", "gelu_out"]);
}

#[test]
fn quantized_prelu_is_refused_naming_it() {
    let alpha = T {
        name: "alpha",
        shape: &[4],
        dtype: TensorType::INT8,
        data: Some(vec![10, 20, 30, 40]),
        quant: Some((0.01, 0)),
    };
    let bytes = build(
        &[T::i8q("x", &[1, 4], 0.1, 0), alpha, T::i8q("y", &[1, 4], 0.1, 0)],
        &[op(BuiltinOperator::PRELU, &[0, 1], &[2])],
        &[0],
        &[2],
    );
    expect_unsupported(&bytes, "PRELU", &["#0", "\"y\""]);
}

#[test]
fn quantize_in_the_middle_of_a_graph_is_refused_naming_it() {
    // x -> RELU -> QUANTIZE: not at the edge, so not moved to the runtime.
    let bytes = build(
        &[T::f32("x", &[1, 4]), T::f32("r", &[1, 4]), T::i8q("q", &[1, 4], 0.1, 0)],
        &[op(BuiltinOperator::RELU, &[0], &[1]), op(BuiltinOperator::QUANTIZE, &[1], &[2])],
        &[0],
        &[2],
    );
    expect_unsupported(&bytes, "QUANTIZE", &["#1", "\"q\""]);
}

/// PRELU with alpha broadcast over the channels of an NHWC tensor, as Keras
/// writes it for `PReLU(shared_axes=[1, 2])`: checked against the formula.
#[test]
fn float_prelu_is_decomposed_with_broadcast_alpha() {
    let alpha = [0.5f32, -0.25, 2.0];
    let bytes = build(
        &[T::f32("x", &[1, 2, 2, 3]), T::f32_const("alpha", &[1, 1, 3], &alpha), T::f32("y", &[1, 2, 2, 3])],
        &[op(BuiltinOperator::PRELU, &[0, 1], &[2])],
        &[0],
        &[2],
    );
    let model = load_bytes(&bytes).expect("float PRELU loads");
    assert_eq!(model.signature().inputs[0].name, "x");
    assert_eq!(model.signature().outputs[0].name, "y");
    let x: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.75).collect();
    let out = model
        .run(vec![TensorData::new(vec![1, 2, 2, 3], TensorValues::F32(x.clone())).expect("input")])
        .expect("runs");
    let want: Vec<f32> =
        x.iter().enumerate().map(|(i, v)| if *v >= 0.0 { *v } else { alpha[i % 3] * v }).collect();
    assert_eq!(out[0].shape, vec![1, 2, 2, 3]);
    for (g, w) in f32s(&out[0]).iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6, "got {g}, want {w}");
    }
}

/// An int8 graph between QUANTIZE and DEQUANTIZE: the runtime takes and
/// returns floats, quantizing with the input tensor's parameters and
/// dequantizing with the output's.
#[test]
fn edge_quantization_moves_into_the_runtime() {
    let bytes = build(
        &[
            T::f32("in", &[1, 4]),
            T::i8q("in_q", &[1, 4], 0.05, -3),
            T::i8q("relu_q", &[1, 4], 0.05, -3),
            T::f32("out", &[1, 4]),
        ],
        &[
            op(BuiltinOperator::QUANTIZE, &[0], &[1]),
            op(BuiltinOperator::RELU, &[1], &[2]),
            op(BuiltinOperator::DEQUANTIZE, &[2], &[3]),
        ],
        &[0],
        &[3],
    );
    let model = load_bytes(&bytes).expect("loads");
    let sig = model.signature();
    assert_eq!((sig.inputs[0].name.as_str(), sig.inputs[0].element_type), ("in", ElementType::F32));
    assert_eq!((sig.outputs[0].name.as_str(), sig.outputs[0].element_type), ("out", ElementType::F32));
    let x = vec![-1.0f32, 0.0, 0.26, 3.0];
    let out =
        model.run(vec![TensorData::new(vec![1, 4], TensorValues::F32(x)).expect("input")]).expect("runs");
    // 0.26 / 0.05 = 5.2 -> 5 steps -> 0.25; 3.0 -> 60 steps -> 3.0.
    let want = [0.0f32, 0.0, 0.25, 3.0];
    for (g, w) in f32s(&out[0]).iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6, "got {g}, want {w}");
    }
}

#[test]
fn fully_connected_without_bias_gets_a_zero_bias() {
    let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let bytes = build(
        &[T::f32("x", &[1, 3]), T::f32_const("w", &[2, 3], &w), T::f32("y", &[1, 2])],
        &[O { options: Opts::FullyConnected, ..op(BuiltinOperator::FULLY_CONNECTED, &[0, 1, -1], &[2]) }],
        &[0],
        &[2],
    );
    let model = load_bytes(&bytes).expect("loads");
    let out = model
        .run(vec![TensorData::new(vec![1, 3], TensorValues::F32(vec![1.0, 1.0, 1.0])).expect("x")])
        .expect("runs");
    assert_eq!(f32s(&out[0]), &[6.0, 15.0]);
}

#[test]
fn broken_flatbuffers_are_refused_without_panicking() {
    assert!(matches!(load_bytes(b"not a flatbuffer at all"), Err(LoadError::Parse { .. })));
    assert!(load_bytes(&[]).is_err());
    let good = std::fs::read(fixtures().join("digits_cnn_int8.tflite")).expect("fixture");
    for cut in [8, 64, good.len() / 2, good.len() - 1] {
        assert!(load_bytes(&good[..cut]).is_err(), "truncated at {cut} loaded");
    }
}

/// Byte flips anywhere in the fixtures: reading, rewriting and optimizing
/// may succeed or fail, but must not panic (a panic here fails the test).
/// The warm-up run is left out: on corrupted constants tract's integer
/// kernels can overflow, which panics in builds with overflow checks (this
/// test profile) and wraps, as in TFLite, in release builds.
#[test]
fn corrupted_fixtures_never_panic() {
    let options = LoadOptions { optimize: true, warm_up: false, ..Default::default() };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // More rounds on demand: OUTPOST_TFLITE_FUZZ=5000 cargo test ...
    let rounds = std::env::var("OUTPOST_TFLITE_FUZZ").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    for model in TFLITE_FIXTURES {
        let good = std::fs::read(fixtures().join(model)).expect("fixture");
        for _ in 0..rounds {
            let mut bytes = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let _ = Model::from_bytes(&bytes, ModelFormat::Tflite, &options);
        }
    }
}

#[test]
fn negative_reduction_axes_are_counted_from_the_start() {
    let axes = T {
        name: "axes",
        shape: &[1],
        dtype: TensorType::INT32,
        data: Some((-1i32).to_le_bytes().to_vec()),
        quant: None,
    };
    let bytes = build(
        &[T::f32("x", &[1, 2, 3]), axes, T::f32("total", &[1, 2])],
        &[O { options: Opts::Reducer { keep_dims: false }, ..op(BuiltinOperator::SUM, &[0, 1], &[2]) }],
        &[0],
        &[2],
    );
    let model = load_bytes(&bytes).expect("loads");
    let x = TensorData::new(vec![1, 2, 3], TensorValues::F32(vec![1., 2., 3., 4., 5., 6.])).expect("x");
    let out = model.run(vec![x]).expect("runs");
    assert_eq!(out[0].shape, vec![1, 2]);
    assert_eq!(f32s(&out[0]), &[6.0, 15.0]);
}
