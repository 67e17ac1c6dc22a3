//! `outpost-runtime bench` as a user runs it: the built binary on the
//! fixtures and on a signed bundle, its one JSON object, and its one-line
//! errors. No timing is asserted (CI machines are shared); only what the
//! numbers must satisfy whatever the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_runtime::tensor::TensorData;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-cli-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `outpost-runtime bench ARGS`, logs at warn so stderr holds only what matters.
fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-runtime"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outpost-runtime")
}

/// The one JSON object on stdout, with the contract's keys and nothing else,
/// its numbers ordered as they must be.
fn report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim_end().lines().count(), 1, "one object on one line: {stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let obj = json.as_object().expect("an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["batch", "iterations", "median_us", "min_us", "model", "p99_us", "threads"]);
    let num = |k: &str| json[k].as_f64().unwrap_or_else(|| panic!("{k} is a number: {json}"));
    assert!(num("min_us") > 0.0, "{json}");
    assert!(num("min_us") <= num("median_us"), "{json}");
    assert!(num("median_us") <= num("p99_us"), "{json}");
    json
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line with the cause: {stderr}");
    stderr
}

#[test]
fn an_onnx_model_with_a_free_batch_on_two_threads() {
    let model = fixture("bc_mlp.onnx");
    let model = model.to_str().expect("utf-8");
    let out = bench(&["--model", model, "--batch", "8", "--threads", "2", "--iterations", "20", "--json"]);
    let json = report(&out);
    assert_eq!(json["model"], "bc_mlp.onnx");
    assert_eq!(json["batch"], 8);
    assert_eq!(json["threads"], 2);
    assert_eq!(json["iterations"], 20);
}

#[test]
fn a_tflite_model_with_its_batch_fixed_at_one_and_its_profile() {
    let model = fixture("digits_cnn_int8.tflite");
    let model = model.to_str().expect("utf-8");
    let out = bench(&["--model", model, "--batch", "2", "--iterations", "20", "--json", "--profile"]);
    let json = report(&out);
    assert_eq!(json["model"], "digits_cnn_int8.tflite");
    assert_eq!(json["batch"], 2);
    assert_eq!(json["threads"], 1);
    assert_eq!(json["iterations"], 20);
    // With --json the profile goes to stderr, so stdout stays one object.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("op-by-op profile: 20 calls of 1 row"), "{stderr}");
    assert!(stderr.contains("by operator:"), "{stderr}");
    // A convolution network spends its time in some node: the table names it.
    assert!(stderr.lines().any(|l| l.contains("OptMatMul") || l.contains("Conv")), "{stderr}");
}

#[test]
fn human_readable_by_default() {
    let model = fixture("bc_mlp.onnx");
    let out = bench(&["--model", model.to_str().expect("utf-8"), "--iterations", "5"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("bc_mlp.onnx: batch 1, 1 thread, 5 timed calls per thread"), "{stdout}");
    assert!(stdout.contains("min ") && stdout.contains("median ") && stdout.contains("p99 "), "{stdout}");
}

#[test]
fn bad_arguments_and_missing_models_fail_in_one_line() {
    let missing = bench(&["--model", "no-such-model.onnx", "--iterations", "20", "--json"]);
    assert!(one_line_error(&missing).contains("no-such-model.onnx"));

    let model = fixture("bc_mlp.onnx");
    let model = model.to_str().expect("utf-8");
    let refused = [
        ("--batch", "0"),
        ("--threads", "0"),
        ("--iterations", "0"),
        ("--threads", "100000"),
        ("--iterations", "2000000"),
    ];
    for (flag, value) in refused {
        let out = bench(&["--model", model, flag, value, "--json"]);
        let err = one_line_error(&out);
        assert!(err.contains(flag.trim_start_matches('-')), "{flag} {value}: {err}");
    }
    // A model file that is not a model.
    let dir = temp_dir("garbage");
    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"not a protobuf at all").expect("write");
    one_line_error(&bench(&["--model", garbage.to_str().expect("utf-8"), "--json"]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_signed_bundle_needs_its_trust_root_and_is_named_by_its_manifest() {
    let dir = temp_dir("bundle");
    let (bundle, root) = write_bc_mlp_bundle(&dir);
    let bundle = bundle.to_str().expect("utf-8");
    let out = bench(&["--model", bundle, "--trust", root.to_str().expect("utf-8"), "--iterations", "20", "--json"]);
    let json = report(&out);
    assert_eq!(json["model"], "bc-mlp@1.0.0");
    // As serve: a bundle without --trust is refused, in one line.
    let err = one_line_error(&bench(&["--model", bundle, "--iterations", "20", "--json"]));
    assert!(err.contains("--trust"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A signed bundle of bc_mlp certified now, with a drift reference of its
/// 30 features (serve refuses a bundle whose reference does not fit).
fn write_bc_mlp_bundle(dir: &Path) -> (PathBuf, PathBuf) {
    use outpost_runtime::bundle::{
        issue_certificate, unix_now, write_bundle, Digest, Manifest, ModelFileFormat, SecretKey, SelfTest,
        SelfTestVector, Signer, Tolerance, MANIFEST_FORMAT,
    };
    use outpost_runtime::drift::{OutputValues, ReferenceOptions, ReferenceOutput, ReferenceSketch};
    use outpost_runtime::model::{LoadOptions, Model, ModelFormat};
    use outpost_runtime::tensor::TensorValues;

    let bytes = std::fs::read(fixture("bc_mlp.onnx")).expect("fixture");
    let model = Model::from_bytes(&bytes, ModelFormat::Onnx, &LoadOptions::default()).expect("fixture loads");
    let csv = std::fs::read_to_string(fixture("data/bc_test.csv")).expect("fixture data");
    let mut lines = csv.lines();
    let names: Vec<&str> = lines.next().expect("header").split(',').take(30).collect();
    let rows: Vec<Vec<f32>> = lines
        .take(40)
        .map(|l| l.split(',').take(30).map(|v| v.parse().expect("number")).collect())
        .collect();
    let classes = rows
        .iter()
        .map(|r| {
            let out = model.run(vec![TensorData::f32(vec![1, 30], r.clone()).expect("tensor")]).expect("runs");
            match &out[0].values {
                TensorValues::I64(l) => l[0],
                other => panic!("bc_mlp's label is i64, got {other:?}"),
            }
        })
        .collect();
    let outputs = [ReferenceOutput { name: "output_label".into(), values: OutputValues::Classes(classes) }];
    let reference =
        ReferenceSketch::from_samples(&names, &rows, &outputs, &ReferenceOptions::default()).expect("sketch");
    let probe = TensorData::f32(vec![1, 30], rows[0].clone()).expect("tensor");
    let expected = model.run(vec![probe.clone()]).expect("runs");
    let now = unix_now();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "bc-mlp".into(),
        version: "1.0.0".into(),
        sequence: 1,
        model_format: ModelFileFormat::Onnx,
        model_sha256: Digest::of(&bytes),
        model_size: bytes.len() as u64,
        io: model.signature().clone(),
        reference,
        self_test: SelfTest {
            tolerance: Tolerance::default(),
            vectors: vec![SelfTestVector { inputs: vec![probe], expected }],
        },
        issued_at: now,
    };
    let root = SecretKey::from_seed([11; 32]);
    let online = SecretKey::from_seed([12; 32]);
    let cert = issue_certificate(&root, &online.public_key(), 1, now - 60, 24 * 3600).expect("certificate");
    let signer = Signer::new(online, cert).expect("signer");
    let signed = signer.sign(&manifest).expect("sign");
    let path = dir.join("bc.outpost");
    let mut file = std::fs::File::create(&path).expect("create");
    write_bundle(&mut file, &signed, &[signer.certificate().clone()], &bytes).expect("write bundle");
    let root_pub = dir.join("root.pub");
    root.public_key().write_file(&root_pub, "test root").expect("root.pub");
    (path, root_pub)
}
