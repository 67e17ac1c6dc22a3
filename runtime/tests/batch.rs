//! Batch mode: good rows predicted in input order exactly as `Model::run`
//! predicts them, bad rows in the errors file with their line numbers, the
//! formats, the fatal errors, the command line, and a signed bundle as the
//! model.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_runtime::batch::{run_files, BatchError, BatchOptions, InputFormat, OutputFormat, ProgressMode};
use outpost_runtime::model::{LoadOptions, Model};
use outpost_runtime::tensor::{TensorData, TensorValues};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join(name)
}

/// A scratch directory, removed when the test ends.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("outpost-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

fn bc_mlp() -> Model {
    Model::load(fixture("bc_mlp.onnx"), &LoadOptions::default()).expect("fixture loads")
}

/// Header and data lines of the breast-cancer test set (30 features + label).
fn bc_lines() -> (String, Vec<String>) {
    let text = std::fs::read_to_string(fixture("data/bc_test.csv")).expect("csv");
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string);
    let header = lines.next().expect("header");
    (header, lines.collect())
}

fn numbers(line: &str) -> Vec<f32> {
    line.split(',').map(|v| v.trim().parse().expect("number")).collect()
}

/// What `Model::run` says for each row, one run per row: (label, max probability).
fn expected(model: &Model, rows: &[Vec<f32>]) -> Vec<(i64, f32)> {
    rows.iter()
        .map(|row| {
            let out = model.run(vec![TensorData::f32(vec![1, row.len()], row.clone()).unwrap()]).expect("run");
            let TensorValues::I64(label) = &out[0].values else { panic!("label output is i64") };
            let TensorValues::F32(p) = &out[1].values else { panic!("probabilities are f32") };
            (label[0], p.iter().cloned().fold(f32::MIN, f32::max))
        })
        .collect()
}

fn options(input: InputFormat, output: OutputFormat) -> BatchOptions {
    BatchOptions {
        input_format: input,
        output_format: output,
        // Small chunks and several threads, so rows come back out of order
        // from the workers and the writer has to restore it.
        batch_size: 7,
        threads: 3,
        progress: ProgressMode::Hidden,
        ..BatchOptions::default()
    }
}

struct Mixed {
    text: String,
    /// (line number, features, label) of every good row, in order.
    good: Vec<(u64, Vec<f32>, f32)>,
    /// (line number, a piece of the reason) of every bad row.
    bad: Vec<(u64, &'static str)>,
}

/// The test set with bad rows and blank lines mixed in.
fn mixed_csv() -> Mixed {
    let (header, lines) = bc_lines();
    let mut text = format!("{header}\n");
    let mut line_no = 1u64;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut push = |text: &mut String, line: &str| {
        text.push_str(line);
        text.push('\n');
        line_no += 1;
        line_no
    };
    for (i, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        match i % 10 {
            3 => {
                let n = push(&mut text, &fields[..20].join(","));
                bad.push((n, "20 columns, expected 31"));
            }
            5 => {
                let mut f = fields.clone();
                f[4] = "abc";
                let n = push(&mut text, &f.join(","));
                bad.push((n, "column 5 (\"mean smoothness\"): \"abc\" is not a number"));
            }
            7 => {
                let mut f = fields.clone();
                f[0] = "NaN";
                let n = push(&mut text, &f.join(","));
                bad.push((n, "NaN is not a finite number"));
            }
            8 => {
                let mut f = fields.clone();
                f[2] = "";
                let n = push(&mut text, &f.join(","));
                bad.push((n, "empty field"));
            }
            9 => {
                let mut f = fields.clone();
                f[1] = "1e39"; // beyond f32
                let n = push(&mut text, &f.join(","));
                bad.push((n, "inf is not a finite number"));
            }
            _ => {
                // Some good rows quoted and padded, as spreadsheets write them.
                let written = if i % 10 == 1 { format!("\"{}\", {}", fields[0], fields[1..].join(",")) } else { line.clone() };
                let n = push(&mut text, &written);
                let mut values = numbers(line);
                let label = values.pop().expect("label");
                good.push((n, values, label));
            }
        }
        if i % 25 == 0 {
            push(&mut text, "   "); // blank: skipped, but counted in line numbers
        }
    }
    Mixed { text, good, bad }
}

#[test]
fn bad_rows_go_to_the_errors_file_and_good_rows_match_model_run_in_order() {
    let dir = temp_dir("mixed");
    let mixed = mixed_csv();
    let input = dir.join("in.csv");
    std::fs::write(&input, &mixed.text).unwrap();
    let output = dir.join("out.csv");
    let model = bc_mlp();

    let summary = run_files(
        &model,
        &input,
        &output,
        None,
        &BatchOptions { label_column: true, ..options(InputFormat::Csv, OutputFormat::Csv) },
    )
    .expect("batch runs");

    assert_eq!(summary.rows_ok, mixed.good.len() as u64);
    assert_eq!(summary.rows_bad, mixed.bad.len() as u64);
    assert!(summary.had_header);

    let rows: Vec<Vec<f32>> = mixed.good.iter().map(|(_, r, _)| r.clone()).collect();
    let want = expected(&model, &rows);
    let out = std::fs::read_to_string(&output).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("line,prediction,probability"));
    let got: Vec<&str> = lines.collect();
    assert_eq!(got.len(), mixed.good.len());
    let mut correct = 0;
    for ((line, fields), ((n, _, label), (want_label, want_p))) in
        got.iter().map(|l| (*l, l.split(',').collect::<Vec<_>>())).zip(mixed.good.iter().zip(&want))
    {
        assert_eq!(fields[0].parse::<u64>().unwrap(), *n, "input order: {line}");
        assert_eq!(fields[1].parse::<i64>().unwrap(), *want_label, "prediction of line {n}");
        let p: f32 = fields[2].parse().unwrap();
        assert!((p - want_p).abs() < 1e-5, "probability of line {n}: {p} vs {want_p}");
        correct += u32::from(*want_label as f32 == *label);
    }
    let accuracy = summary.accuracy.expect("labels give an accuracy");
    assert!((accuracy - correct as f64 / mixed.good.len() as f64).abs() < 1e-12);

    let errors = std::fs::read_to_string(dir.join("out.csv.errors")).unwrap();
    let mut lines = errors.lines();
    assert_eq!(lines.next(), Some("line,reason"));
    let errors: Vec<&str> = lines.collect();
    assert_eq!(errors.len(), mixed.bad.len(), "{errors:#?}");
    for (entry, (n, reason)) in errors.iter().zip(&mixed.bad) {
        let (line, text) = entry.split_once(',').unwrap();
        assert_eq!(line.parse::<u64>().unwrap(), *n, "{entry}");
        assert!(text.replace("\"\"", "\"").contains(reason), "line {n}: {entry} should say {reason}");
    }
    assert!(!dir.join("out.csv.partial").exists());
}

#[test]
fn json_lines_in_and_out_with_ids_and_bare_arrays() {
    let dir = temp_dir("jsonl");
    let (_, lines) = bc_lines();
    let model = bc_mlp();
    let rows: Vec<Vec<f32>> = lines.iter().take(20).map(|l| {
        let mut v = numbers(l);
        v.pop();
        v
    }).collect();
    let mut text = String::new();
    for (i, row) in rows.iter().enumerate() {
        match i % 4 {
            0 => text.push_str(&serde_json::json!({"id": format!("r{i}"), "features": row}).to_string()),
            1 => text.push_str(&serde_json::to_string(row).unwrap()),
            2 => text.push_str(&serde_json::json!({"features": row, "id": i}).to_string()),
            _ => text.push_str(&serde_json::json!({"features": row}).to_string()),
        }
        text.push('\n');
        if i == 5 {
            text.push_str("{\"features\": [1, 2, 3], \"id\": \"short\"}\n");
            text.push_str("{\"features\": [1, NaN]}\n");
            text.push_str("not json at all\n");
        }
    }
    let input = dir.join("in.jsonl");
    std::fs::write(&input, text).unwrap();
    let output = dir.join("out.jsonl");
    let errors = dir.join("bad.csv");
    let summary = run_files(&model, &input, &output, Some(&errors), &BatchOptions::for_files(&input, &output)).unwrap();
    assert_eq!((summary.rows_ok, summary.rows_bad), (20, 3));

    let want = expected(&model, &rows);
    let out = std::fs::read_to_string(&output).unwrap();
    let got: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 20);
    for (i, (v, (label, p))) in got.iter().zip(&want).enumerate() {
        assert_eq!(v["prediction"], *label, "{v}");
        assert!((v["probability"].as_f64().unwrap() as f32 - p).abs() < 1e-5);
        let want_line = if i <= 5 { i + 1 } else { i + 4 };
        assert_eq!(v["line"], want_line, "{v}");
        match i % 4 {
            0 => assert_eq!(v["id"], format!("r{i}")),
            2 => assert_eq!(v["id"], i),
            _ => assert!(v.get("id").is_none(), "{v}"),
        }
    }
    let errors = std::fs::read_to_string(&errors).unwrap();
    let errors: Vec<&str> = errors.lines().skip(1).collect();
    assert_eq!(errors.len(), 3);
    assert!(errors[0].starts_with("7,\"3 features, expected 30"), "{errors:?}");
    assert!(errors[1].starts_with("8,"), "{errors:?}");
    assert!(errors[2].starts_with("9,"), "{errors:?}");
}

#[test]
fn headerless_csv_all_outputs_and_label_counting() {
    let dir = temp_dir("headerless");
    let (_, lines) = bc_lines();
    let model = bc_mlp();
    let text: String = lines.iter().take(10).map(|l| format!("{l}\r\n")).collect();
    let input = dir.join("in.csv");
    std::fs::write(&input, text).unwrap();
    let output = dir.join("out.csv");
    let options = BatchOptions { label_column: true, all_outputs: true, ..options(InputFormat::Csv, OutputFormat::Csv) };
    let summary = run_files(&model, &input, &output, None, &options).unwrap();
    assert!(!summary.had_header);
    assert_eq!(summary.rows_ok, 10);
    let out = std::fs::read_to_string(&output).unwrap();
    let mut out_lines = out.lines();
    assert_eq!(out_lines.next(), Some("line,output_label,output_probability_0,output_probability_1"));
    let first: Vec<f32> = out_lines.next().unwrap().split(',').map(|v| v.parse().unwrap()).collect();
    assert_eq!(first.len(), 4);
    assert_eq!(first[0], 1.0);
    assert!((first[2] + first[3] - 1.0).abs() < 1e-5);
}

#[test]
fn a_header_of_the_wrong_width_is_fatal_and_leaves_no_output() {
    let dir = temp_dir("fatal");
    let (header, lines) = bc_lines();
    let input = dir.join("in.csv");
    std::fs::write(&input, format!("{header}\n{}\n", lines[0])).unwrap();
    let output = dir.join("out.csv");
    // The label column is there, but not announced.
    let err = run_files(&bc_mlp(), &input, &output, None, &options(InputFormat::Csv, OutputFormat::Csv)).unwrap_err();
    assert!(matches!(err, BatchError::Columns { line: 1, found: 31, features: 30, .. }), "{err}");
    assert!(err.to_string().contains("--label-column"), "{err}");
    assert!(!output.exists());
    assert!(!dir.join("out.csv.partial").exists());

    // Headerless, every row of the first chunk wrong: the same.
    std::fs::write(&input, "1,2,3\n4,5,6\n").unwrap();
    let err = run_files(&bc_mlp(), &input, &output, None, &options(InputFormat::Csv, OutputFormat::Csv)).unwrap_err();
    assert!(matches!(err, BatchError::Columns { line: 1, found: 3, .. }), "{err}");

    let err = run_files(&bc_mlp(), &dir.join("missing.csv"), &output, None, &BatchOptions::default()).unwrap_err();
    assert!(matches!(err, BatchError::File { .. }), "{err}");
}

#[test]
fn overlong_lines_are_bad_rows_not_memory() {
    let dir = temp_dir("long");
    let (_, lines) = bc_lines();
    let mut text = format!("{}\n", lines[0]);
    text.push_str(&"9".repeat(100_000));
    text.push('\n');
    text.push_str(&lines[1]);
    text.push('\n');
    let input = dir.join("in.csv");
    std::fs::write(&input, text).unwrap();
    let output = dir.join("out.csv");
    let options =
        BatchOptions { label_column: true, max_line_bytes: 4096, ..options(InputFormat::Csv, OutputFormat::Csv) };
    let summary = run_files(&bc_mlp(), &input, &output, None, &options).unwrap();
    assert_eq!((summary.rows_ok, summary.rows_bad), (2, 1));
    let errors = std::fs::read_to_string(dir.join("out.csv.errors")).unwrap();
    assert!(errors.contains("2,\"line longer than 4096 bytes\""), "{errors}");
}

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost-runtime"))
}

#[test]
fn command_line_summary_and_exit_codes() {
    let dir = temp_dir("cli");
    let mixed = mixed_csv();
    let input = dir.join("in.csv");
    std::fs::write(&input, &mixed.text).unwrap();
    let output = dir.join("preds.csv");
    let run = cli()
        .args(["batch", "--model"])
        .arg(fixture("bc_mlp.onnx"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--label-column", "--batch-size", "16", "--threads", "2", "--json"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON summary");
    assert_eq!(summary["rows_ok"], mixed.good.len());
    assert_eq!(summary["rows_bad"], mixed.bad.len());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("rows predicted"), "{stderr}");
    assert!(!stderr.contains('\r'), "no progress bar when stderr is not a terminal: {stderr}");

    // Fatal: a model that does not load, an input that does not exist.
    let bad_model = cli()
        .args(["batch", "--model"])
        .arg(fixture("bad/not_a_model.onnx"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.join("x.csv"))
        .output()
        .unwrap();
    assert!(!bad_model.status.success());
    let no_input = cli()
        .args(["batch", "--model"])
        .arg(fixture("bc_mlp.onnx"))
        .arg("--input")
        .arg(dir.join("nope.csv"))
        .arg("--output")
        .arg(dir.join("x.csv"))
        .output()
        .unwrap();
    assert!(!no_input.status.success());
    let stderr = String::from_utf8_lossy(&no_input.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line with the cause: {stderr}");
    assert!(stderr.contains("nope.csv"), "{stderr}");
}

/// A signed bundle of bc_mlp, certified now (the fixtures in bundle_common
/// are dated 2023 and would be refused as expired).
fn write_bundle(dir: &Path) -> (PathBuf, PathBuf) {
    use outpost_runtime::bundle::{
        issue_certificate, unix_now, write_bundle, Digest, Manifest, ModelFileFormat, SecretKey, SelfTest,
        SelfTestVector, Signer, Tolerance, MANIFEST_FORMAT,
    };
    use outpost_runtime::drift::{OutputValues, ReferenceOptions, ReferenceOutput, ReferenceSketch};

    let bytes = std::fs::read(fixture("bc_mlp.onnx")).unwrap();
    let model = bc_mlp();
    let (header, lines) = bc_lines();
    let names: Vec<&str> = header.split(',').take(30).collect();
    let rows: Vec<Vec<f32>> = lines.iter().map(|l| {
        let mut v = numbers(l);
        v.pop();
        v
    }).collect();
    let classes = expected(&model, &rows).iter().map(|(c, _)| *c).collect();
    let outputs = [ReferenceOutput { name: "output_label".into(), values: OutputValues::Classes(classes) }];
    let reference = ReferenceSketch::from_samples(&names, &rows, &outputs, &ReferenceOptions::default()).unwrap();
    let probe = TensorData::f32(vec![1, 30], rows[0].clone()).unwrap();
    let probe_out = model.run(vec![probe.clone()]).unwrap();
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
            vectors: vec![SelfTestVector { inputs: vec![probe], expected: probe_out }],
        },
        issued_at: now,
    };
    let root = SecretKey::from_seed([7; 32]);
    let online = SecretKey::from_seed([8; 32]);
    let cert = issue_certificate(&root, &online.public_key(), 1, now - 60, 24 * 3600).unwrap();
    let signer = Signer::new(online, cert).unwrap();
    let signed = signer.sign(&manifest).unwrap();
    let path = dir.join("bc.outpost");
    let mut file = std::fs::File::create(&path).unwrap();
    write_bundle(&mut file, &signed, &[signer.certificate().clone()], &bytes).unwrap();
    let root_pub = dir.join("root.pub");
    root.public_key().write_file(&root_pub, "test root").unwrap();
    (path, root_pub)
}

#[test]
fn a_signed_bundle_works_as_the_model() {
    let dir = temp_dir("bundle");
    let (bundle, root) = write_bundle(&dir);
    let (_, lines) = bc_lines();
    let input = dir.join("in.csv");
    std::fs::write(&input, lines[..10].join("\n")).unwrap();
    let output = dir.join("out.jsonl");
    let run = |trust: Option<&Path>| {
        let mut c = cli();
        c.args(["batch", "--model"]).arg(&bundle).arg("--input").arg(&input).arg("--output").arg(&output);
        c.arg("--label-column");
        if let Some(t) = trust {
            c.arg("--trust").arg(t);
        }
        c.output().unwrap()
    };
    let ok = run(Some(&root));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(std::fs::read_to_string(&output).unwrap().lines().count(), 10);

    // Without the trust root, or with another root, it is refused.
    assert!(!run(None).status.success());
    let other = dir.join("other.pub");
    outpost_runtime::bundle::SecretKey::from_seed([9; 32]).public_key().write_file(&other, "other").unwrap();
    let refused = run(Some(&other));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused"), "{}", String::from_utf8_lossy(&refused.stderr));
}

#[test]
fn a_first_line_mixing_text_and_numbers_is_a_bad_row_not_a_header() {
    let dir = temp_dir("mixedfirst");
    let (_, lines) = bc_lines();
    let first = lines[0].replacen(|c: char| c.is_ascii_digit(), "x", 1);
    let input = dir.join("in.csv");
    std::fs::write(&input, format!("{first}\n{}\n{}\n", lines[1], lines[2])).unwrap();
    let output = dir.join("out.csv");
    let options = BatchOptions { label_column: true, ..options(InputFormat::Csv, OutputFormat::Csv) };
    let summary = run_files(&bc_mlp(), &input, &output, None, &options).unwrap();
    assert!(!summary.had_header);
    assert_eq!((summary.rows_ok, summary.rows_bad), (2, 1));
    let errors = std::fs::read_to_string(dir.join("out.csv.errors")).unwrap();
    assert!(errors.lines().nth(1).unwrap().starts_with("1,\"column 1: "), "{errors}");
}
