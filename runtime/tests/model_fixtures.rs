//! Every fixture model loads and reproduces the reference outputs that
//! onnxruntime / LiteRT computed for it (`fixtures/*.expected.json`, written by
//! `scripts/make_fixtures.py`), batch 1 agrees with batch N, and models the
//! runtime cannot load are refused with a reason that names what failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_runtime::model::{LoadError, LoadOptions, Model, ModelFormat};
use outpost_runtime::tensor::{TensorData, TensorValues};
use serde::Deserialize;

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
        let values = match self.dtype.as_str() {
            "float32" => TensorValues::F32(self.data.iter().map(|x| *x as f32).collect()),
            "int64" => TensorValues::I64(self.data.iter().map(|x| *x as i64).collect()),
            "int32" => TensorValues::I32(self.data.iter().map(|x| *x as i32).collect()),
            "int8" => TensorValues::I8(self.data.iter().map(|x| *x as i8).collect()),
            "uint8" => TensorValues::U8(self.data.iter().map(|x| *x as u8).collect()),
            other => panic!("fixture dtype {other} not handled by the test"),
        };
        TensorData::new(self.shape.clone(), values).expect("fixture tensor is consistent")
    }
}

/// Tolerance on float outputs, as `|got - want| <= abs + rel * |want|`, and
/// the share of label outputs allowed to differ.
struct Tolerance {
    abs: f64,
    rel: f64,
    label_mismatches: usize,
}

/// Per-fixture tolerances, and why.
fn tolerance(model: &str) -> Tolerance {
    match model {
        // Same float32 arithmetic, different summation order and kernels
        // (tract's fused matmul vs MLAS): differences are a few ULPs of the
        // intermediate sums, well below 1e-4.
        "bc_mlp.onnx" | "digits_cnn.onnx" => Tolerance { abs: 1e-4, rel: 1e-4, label_mismatches: 0 },
        // Trees compare features against thresholds: identical decisions,
        // then a float sum of 50 leaf values and a sigmoid.
        "bc_gb.onnx" | "bc_rf.onnx" => Tolerance { abs: 1e-5, rel: 1e-4, label_mismatches: 0 },
        // A dot product of 30 features and a logistic: float reordering only.
        "bc_logreg.onnx" => Tolerance { abs: 1e-5, rel: 1e-4, label_mismatches: 0 },
        // Dynamic quantization: activations are quantized per call with a
        // scale of (max - min) / 255. tract and onnxruntime can round a value
        // that lies on a half step differently, moving one activation by one
        // step. Measured on x86: 7.5e-5; the bound leaves room for other
        // kernels (aarch64) to round a tie the other way.
        "bc_mlp_int8.onnx" => Tolerance { abs: 2e-3, rel: 0.0, label_mismatches: 0 },
        // Static QDQ: fixed scales, int8 arithmetic with int32 accumulation;
        // requantization rounding may differ by one step of the output scale.
        // Measured on x86: 4.8e-7 (tract evaluates the QDQ MatMuls exactly as
        // written); same margin for rounding ties as above.
        "bc_mlp_qdq.onnx" => Tolerance { abs: 1e-3, rel: 0.0, label_mismatches: 0 },
        // Static QDQ CNN: the reference runs the QDQ graph as written
        // (onnxruntime without graph fusions). We keep the float softmax
        // where the graph rounds it to steps of 1/255 (see model::onnx),
        // so a probability may differ by half a step, plus int8 rounding
        // ties upstream: one step of 1/255 at most.
        "digits_cnn_int8.onnx" => Tolerance { abs: 4e-3, rel: 0.0, label_mismatches: 0 },
        other => panic!("no tolerance stated for fixture {other}"),
    }
}

fn compare(model: &str, name: &str, got: &TensorData, want: &JsonTensor, tol: &Tolerance) {
    assert_eq!(got.shape, want.shape, "{model}: output {name} shape");
    let got = got.values.to_f64_vec();
    if want.dtype.starts_with("int") {
        let mismatches = got.iter().zip(&want.data).filter(|(g, w)| g != w).count();
        assert!(
            mismatches <= tol.label_mismatches,
            "{model}: output {name}: {mismatches} labels differ: got {got:?}, want {:?}",
            want.data
        );
        return;
    }
    let mut worst = 0.0f64;
    for (ix, (g, w)) in got.iter().zip(&want.data).enumerate() {
        let err = (g - w).abs();
        worst = worst.max(err);
        assert!(
            err <= tol.abs + tol.rel * w.abs(),
            "{model}: output {name}[{ix}] = {g}, reference {w} (error {err})"
        );
    }
    eprintln!("{model}: output {name}: max abs error {worst:.3e}");
    // Probability outputs: the class each row picks must agree unless the
    // reference itself hesitates between two classes within the tolerance.
    if want.shape.len() == 2 && want.shape[1] > 1 {
        let classes = want.shape[1];
        let mut flipped = 0;
        for (g_row, w_row) in got.chunks(classes).zip(want.data.chunks(classes)) {
            let argmax = |r: &[f64]| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b });
            let (g, w) = (argmax(g_row), argmax(w_row));
            if g != w && (w_row[w] - w_row[g]).abs() > 2.0 * tol.abs {
                flipped += 1;
            }
        }
        assert!(flipped <= tol.label_mismatches, "{model}: output {name}: {flipped} rows pick another class");
    }
}

fn expected_path(model: &Path) -> PathBuf {
    let mut name = model.as_os_str().to_owned();
    name.push(".expected.json");
    PathBuf::from(name)
}

fn onnx_fixtures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".onnx"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "expected the ONNX fixtures, found {names:?}");
    names
}

fn run_named(model: &Model, inputs: &BTreeMap<String, JsonTensor>) -> BTreeMap<String, TensorData> {
    let ordered: Vec<TensorData> = model
        .signature()
        .inputs
        .iter()
        .map(|spec| inputs.get(&spec.name).unwrap_or_else(|| panic!("fixture lacks input {}", spec.name)).to_tensor())
        .collect();
    let outputs = model.run(ordered).expect("fixture runs");
    model.signature().outputs.iter().map(|s| s.name.clone()).zip(outputs).collect()
}

#[test]
fn onnx_fixtures_match_onnxruntime() {
    for name in onnx_fixtures() {
        let path = fixtures().join(&name);
        let expected: Expected = serde_json::from_slice(
            &std::fs::read(expected_path(&path)).expect("expected outputs exist"),
        )
        .expect("expected outputs parse");
        let model = Model::load(&path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
        let tol = tolerance(&name);
        let got = run_named(&model, &expected.inputs);
        for (out_name, want) in &expected.outputs {
            let got = got.get(out_name).unwrap_or_else(|| panic!("{name}: no output {out_name}"));
            compare(&name, out_name, got, want, &tol);
        }
    }
}

#[test]
fn batch_of_one_agrees_with_batch_of_n() {
    for name in onnx_fixtures() {
        let path = fixtures().join(&name);
        let expected: Expected =
            serde_json::from_slice(&std::fs::read(expected_path(&path)).expect("read"))
                .expect("parse");
        let model = Model::load(&path, &LoadOptions::default()).expect("loads");
        let inputs: Vec<TensorData> = model
            .signature()
            .inputs
            .iter()
            .map(|spec| expected.inputs[&spec.name].to_tensor())
            .collect();
        let batch = inputs[0].batch_len();
        assert!(batch > 1, "{name}: fixture inputs are a batch");
        let all = model.run(inputs.clone()).expect("batch runs");
        for row in 0..batch {
            let row_inputs: Vec<TensorData> = inputs.iter().map(|t| row_of(t, row)).collect();
            let single = model.run(row_inputs).expect("row runs");
            for (b, s) in all.iter().zip(&single) {
                let b_row = row_of(b, row).values.to_f64_vec();
                let s_row = s.values.to_f64_vec();
                assert_eq!(b_row.len(), s_row.len(), "{name}: row {row} output length");
                for (x, y) in b_row.iter().zip(&s_row) {
                    // Dynamic quantization computes its scale over the whole
                    // batch, so int8-dynamic rows legitimately differ a little.
                    let tol = if name == "bc_mlp_int8.onnx" { 5e-2 } else { 1e-5 };
                    assert!((x - y).abs() <= tol, "{name}: row {row}: batch {x} vs single {y}");
                }
            }
        }
    }
}

fn row_of(t: &TensorData, row: usize) -> TensorData {
    let row_len: usize = t.shape.iter().skip(1).product();
    let mut shape = t.shape.clone();
    shape[0] = 1;
    let range = row * row_len..(row + 1) * row_len;
    let values = match &t.values {
        TensorValues::F32(v) => TensorValues::F32(v[range].to_vec()),
        TensorValues::I8(v) => TensorValues::I8(v[range].to_vec()),
        TensorValues::U8(v) => TensorValues::U8(v[range].to_vec()),
        TensorValues::I32(v) => TensorValues::I32(v[range].to_vec()),
        TensorValues::I64(v) => TensorValues::I64(v[range].to_vec()),
    };
    TensorData { shape, values }
}

#[test]
fn unsupported_operator_is_named_with_its_node() {
    let err = Model::load(fixtures().join("bad/unsupported_op.onnx"), &LoadOptions::default())
        .expect_err("model with an unknown operator must be refused");
    match &err {
        LoadError::UnsupportedOperator { op, node } => {
            assert_eq!(op, "Frobnicate");
            assert_eq!(node, "frobnicate_1");
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("Frobnicate") && msg.contains("frobnicate_1"), "{msg}");
}

#[test]
fn truncated_and_garbage_models_are_refused_not_panicking() {
    for bad in ["bad/truncated.onnx", "bad/not_a_model.onnx"] {
        let err = Model::load(fixtures().join(bad), &LoadOptions::default())
            .expect_err("a broken file must be refused");
        assert!(matches!(err, LoadError::Parse { .. } | LoadError::Prepare { .. }), "{bad}: {err}");
    }
    let err = Model::load(fixtures().join("missing.onnx"), &LoadOptions::default()).expect_err("missing");
    assert!(matches!(err, LoadError::Io { .. }), "{err}");
    let err = Model::load(fixtures().join("data/bc_test.csv"), &LoadOptions::default()).expect_err("csv");
    assert!(matches!(err, LoadError::UnknownFormat(_)), "{err}");
}

#[test]
fn wrong_inputs_are_input_errors() {
    let model = Model::load(fixtures().join("bc_mlp.onnx"), &LoadOptions::default()).expect("loads");
    let spec = &model.signature().inputs[0];
    assert_eq!(spec.shape, vec![None, Some(30)], "batch dim is a symbol, features fixed");
    let short = TensorData::f32(vec![1, 29], vec![0.0; 29]).expect("tensor");
    let err = model.run(vec![short]).expect_err("29 features");
    assert!(err.is_input_error(), "{err}");
    assert_eq!(err.field(), Some("features"));
    let ints = TensorData::new(vec![1, 30], TensorValues::I64(vec![0; 30])).expect("tensor");
    assert!(model.run(vec![ints]).expect_err("i64").is_input_error());
    assert!(model.run(vec![]).expect_err("none").is_input_error());
}

#[test]
fn one_model_runs_from_many_threads() {
    let model = std::sync::Arc::new(
        Model::load(fixtures().join("bc_mlp.onnx"), &LoadOptions::default()).expect("loads"),
    );
    let reference = model.run(model.zero_inputs(3)).expect("runs");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let model = model.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let out = model.run(model.zero_inputs(3)).expect("runs");
                    assert_eq!(out, model.run(model.zero_inputs(3)).expect("runs"));
                }
                model.run(model.zero_inputs(3)).expect("runs")
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread"), reference);
    }
}

/// tract-onnx 0.23.9 panics ("no entry found for key", in its graph
/// parser) on a graph output that no node, input or initializer produces.
/// The runtime catches tract's panics: the model is refused, the process
/// lives on.
#[test]
fn a_model_that_makes_tract_panic_is_refused_with_a_load_error() {
    use prost::Message;
    let bytes = std::fs::read(fixtures().join("bc_mlp.onnx")).expect("fixture");
    let mut proto = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).expect("fixture decodes");
    let graph = proto.graph.as_mut().expect("fixture has a graph");
    graph.output[0].name = "produced_by_nothing".into();
    let corrupted = proto.encode_to_vec();
    let err = Model::from_bytes(&corrupted, ModelFormat::Onnx, &LoadOptions::default())
        .expect_err("a dangling output must be refused");
    assert!(matches!(err, LoadError::Prepare { .. }), "{err}");
    assert!(err.to_string().contains("tract panicked"), "{err}");
    // The runtime still loads and runs models afterwards.
    let model = Model::load(fixtures().join("bc_mlp.onnx"), &LoadOptions::default()).expect("loads");
    model.run(model.zero_inputs(2)).expect("runs");
}

/// Random byte corruption of every ONNX fixture: each must load and run, or
/// be refused with an error, never panic. Deterministic (xorshift, fixed
/// seed). Some of them make tract itself panic (counted below): the
/// runtime turns those into errors.
#[test]
fn byte_corrupted_onnx_fixtures_never_panic() {
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut refused, mut tract_panics) = (0, 0);
    for name in onnx_fixtures() {
        let original = std::fs::read(fixtures().join(&name)).expect("fixture");
        for _ in 0..100 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let loaded = std::panic::catch_unwind(|| Model::from_bytes(&bytes, ModelFormat::Onnx, &LoadOptions::default()))
                .unwrap_or_else(|_| panic!("{name}: loading a corrupted copy panicked"));
            match loaded {
                Ok(model) => {
                    for batch in [1, 3] {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(model.zero_inputs(batch))))
                            .unwrap_or_else(|_| panic!("{name}: running a corrupted copy panicked"));
                    }
                }
                Err(e) => {
                    refused += 1;
                    tract_panics += usize::from(e.to_string().contains("tract panicked"));
                }
            }
        }
    }
    eprintln!("{refused} corrupted copies refused, {tract_panics} of them after a panic in tract");
    assert!(refused > 0, "some corruptions must be refused");
}

#[test]
fn a_model_file_over_the_limit_is_refused_before_it_is_read() {
    use outpost_runtime::model::MAX_MODEL_BYTES;
    let dir = std::env::temp_dir().join(format!("outpost-too-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("huge.onnx");
    // A sparse file: its size is over the limit, its blocks are not written.
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(MAX_MODEL_BYTES + 1).expect("set_len");
    drop(file);
    let err = Model::load(&path, &LoadOptions::default()).expect_err("over the limit");
    std::fs::remove_dir_all(&dir).expect("clean up");
    match err {
        LoadError::TooLarge { size, limit } => {
            assert_eq!(size, MAX_MODEL_BYTES + 1);
            assert_eq!(limit, MAX_MODEL_BYTES);
        }
        other => panic!("wrong error: {other}"),
    }
}

/// Each batch size gets a plan optimized for it (up to
/// `LoadOptions::batch_plans`), then further sizes run the symbolic plan;
/// every plan gives the same rows.
#[test]
fn batch_sizes_get_their_own_plans_up_to_the_bound() {
    let path = fixtures().join("bc_mlp.onnx");
    let options = LoadOptions { batch_plans: 2, ..LoadOptions::default() };
    let model = Model::load(&path, &options).expect("loads");
    // The warm-up ran batch 1.
    assert_eq!(model.specialised_batches(), vec![1]);
    let expected: Expected =
        serde_json::from_slice(&std::fs::read(expected_path(&path)).expect("read")).expect("parse");
    let rows = expected.inputs["features"].to_tensor();
    let all = model.run(vec![rows.clone()]).expect("runs");
    assert_eq!(model.specialised_batches(), vec![1, rows.batch_len()]);
    // Over the bound: the symbolic plan, same results.
    let three = TensorData::new(vec![3, 30], match &rows.values {
        TensorValues::F32(v) => TensorValues::F32(v[..90].to_vec()),
        _ => panic!("float features"),
    })
    .expect("tensor");
    let out = model.run(vec![three]).expect("runs");
    assert_eq!(model.specialised_batches(), vec![1, rows.batch_len()]);
    let (TensorValues::F32(p3), TensorValues::F32(pall)) = (&out[1].values, &all[1].values) else {
        panic!("float probabilities")
    };
    for (a, b) in p3.iter().zip(pall) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
    let plain = Model::load(&path, &LoadOptions { batch_plans: 0, ..LoadOptions::default() }).expect("loads");
    plain.run(vec![rows]).expect("runs");
    assert!(plain.specialised_batches().is_empty());
}
