//! `outpost-fleet bundle`: turn a model file into a signed `.outpost` bundle.
//!
//! What it does, in order, refusing at the first problem:
//!
//! 1. Checks the name and the semver version (as devices will).
//! 2. Loads the model **with the runtime devices use** — a model that does
//!    not load here would not load there — and records its input/output
//!    signature.
//! 3. Reads the reference (training) data, runs the model on it, and builds
//!    the drift [`ReferenceSketch`]: one column per input feature, and one
//!    per model output with one value per sample (a class label, a
//!    regressor's value), or else the argmax of a score output.
//! 4. Takes a few reference rows, spread over the file, as self-test
//!    vectors: each row and every output the runtime produced for it.
//! 5. With `--test-data`, measures accuracy (below) and, with
//!    `--min-accuracy X`, refuses to make a bundle below X. The measured
//!    accuracy is reported either way.
//! 6. Signs the manifest with the online key from `--keys`, writes the
//!    bundle atomically, and verifies the written file against `root.pub`.
//!
//! # Accuracy
//!
//! The fraction of test rows whose predicted class equals the label in the
//! CSV's last column. The predicted class is the model's integer label output
//! (one value per sample) if it has one; otherwise the argmax of its first
//! float output with several values per sample (class probabilities or
//! scores); otherwise, for a single probability per sample, `p ≥ 0.5`.

use std::path::{Path, PathBuf};

use outpost_runtime::bundle::{
    unix_now, verify_bundle_file, write_bundle, Digest, Freshness, Limits, Manifest, ModelFileFormat, SelfTest,
    SelfTestVector, Signer, Tolerance, VerifyOptions, MANIFEST_FORMAT,
};
use outpost_runtime::dataset::{read_csv, DatasetError, LabelColumn};
use outpost_runtime::drift::{OutputValues, ReferenceError, ReferenceOptions, ReferenceOutput, ReferenceSketch};
use outpost_runtime::model::{LoadError, LoadOptions, Model, ModelFormat, RunError};
use outpost_runtime::tensor::{ElementType, TensorData, TensorSpec, TensorValues};

use crate::keys::{self, KeysError};

/// Rows per inference call when the model takes batches.
const BATCH: usize = 256;

/// Default number of self-test vectors.
pub const DEFAULT_SELF_TEST_ROWS: usize = 4;

/// Why no bundle was made. Messages include their cause (not repeated as
/// `source()`, so a one-line `anyhow` chain prints it once).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: the model is {size} bytes, over the {limit}-byte limit devices accept")]
    ModelTooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{path}: cannot tell the model format; expected a .onnx or .tflite file")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: the runtime cannot load this model: {error}")]
    ModelLoad { path: PathBuf, error: LoadError },
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error(transparent)]
    Data(#[from] DatasetError),
    #[error("{path}: {reason}")]
    DataShape { path: PathBuf, reason: String },
    #[error("running the model on {path}: {error}")]
    Run { path: PathBuf, error: RunError },
    #[error("building the reference sketch: {0}")]
    Reference(ReferenceError),
    #[error("{0}")]
    NoPrediction(String),
    #[error("accuracy {accuracy:.4} ({correct}/{total} rows of {path}) is below --min-accuracy {min}; no bundle written")]
    AccuracyBelow { path: PathBuf, accuracy: f64, correct: usize, total: usize, min: f64 },
    #[error(transparent)]
    Sign(#[from] outpost_runtime::bundle::SignError),
    #[error("the written bundle does not verify: {0}")]
    SelfCheck(outpost_runtime::bundle::VerifyError),
}

// By hand rather than `#[from]`: the message already includes the cause, and
// `#[from]` would also report it as `source()`, printing it twice in a chain.
impl From<ReferenceError> for BundleError {
    fn from(e: ReferenceError) -> Self {
        BundleError::Reference(e)
    }
}

impl From<outpost_runtime::bundle::VerifyError> for BundleError {
    fn from(e: outpost_runtime::bundle::VerifyError) -> Self {
        BundleError::SelfCheck(e)
    }
}

/// Everything `bundle` needs.
#[derive(Clone, Debug)]
pub struct BundleSpec {
    pub model: PathBuf,
    pub name: String,
    pub version: String,
    pub sequence: u64,
    pub keys_dir: PathBuf,
    pub reference_data: PathBuf,
    pub test_data: Option<PathBuf>,
    pub min_accuracy: Option<f64>,
    pub out: PathBuf,
    pub self_test_rows: usize,
    pub tolerance: Tolerance,
}

/// Measured accuracy on labelled data.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Which output the prediction came from, and how.
    pub prediction: String,
}

/// What `bundle` made.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BundleReport {
    pub out: PathBuf,
    pub name: String,
    pub version: String,
    pub sequence: u64,
    pub model_format: ModelFileFormat,
    pub model_sha256: Digest,
    pub model_size: u64,
    pub manifest_sha256: Digest,
    pub signer: outpost_runtime::bundle::KeyId,
    pub reference_rows: usize,
    pub reference_columns: usize,
    pub self_test_vectors: usize,
    pub accuracy: Option<Accuracy>,
    pub min_accuracy: Option<f64>,
}

/// Makes, signs, writes and re-verifies a bundle (see the module docs).
pub fn make_bundle(spec: &BundleSpec) -> Result<BundleReport, BundleError> {
    validate_spec(spec)?;
    let signer = keys::load_signer(&spec.keys_dir)?;
    let trust = keys::load_trust_root(&spec.keys_dir)?;

    let (model_bytes, format) = read_model(&spec.model)?;
    let model = Model::from_bytes(&model_bytes, format, &LoadOptions::default())
        .map_err(|error| BundleError::ModelLoad { path: spec.model.clone(), error })?;

    let prepared = prepare_manifest(spec, &model, &model_bytes, format)?;
    let accuracy = match &spec.test_data {
        Some(path) => {
            let acc = measure_accuracy(&model, path)?;
            if let Some(min) = spec.min_accuracy {
                if acc.accuracy < min {
                    return Err(BundleError::AccuracyBelow {
                        path: path.clone(),
                        accuracy: acc.accuracy,
                        correct: acc.correct,
                        total: acc.total,
                        min,
                    });
                }
            }
            Some(acc)
        }
        None => None,
    };

    let manifest_sha256 = write_signed_bundle(&signer, &prepared.manifest, &model_bytes, &spec.out)?;
    // Check the file as a device would (nothing accepted yet, now): a bundle
    // that fails here would fail on every device.
    verify_bundle_file(&spec.out, &trust, &VerifyOptions::new(Freshness::NothingAcceptedYet))?;

    let m = &prepared.manifest;
    Ok(BundleReport {
        out: spec.out.clone(),
        name: m.name.clone(),
        version: m.version.clone(),
        sequence: m.sequence,
        model_format: m.model_format,
        model_sha256: m.model_sha256,
        model_size: m.model_size,
        manifest_sha256,
        signer: signer.key_id(),
        reference_rows: prepared.reference_rows,
        reference_columns: m.reference.features.len() + m.reference.outputs.len(),
        self_test_vectors: m.self_test.vectors.len(),
        accuracy,
        min_accuracy: spec.min_accuracy,
    })
}

fn validate_spec(spec: &BundleSpec) -> Result<(), BundleError> {
    outpost_runtime::bundle::manifest::validate_name(&spec.name).map_err(BundleError::Invalid)?;
    outpost_runtime::bundle::manifest::validate_version(&spec.version).map_err(BundleError::Invalid)?;
    if let Some(min) = spec.min_accuracy {
        if !(0.0..=1.0).contains(&min) {
            return Err(BundleError::Invalid(format!("--min-accuracy {min} must be between 0 and 1")));
        }
        if spec.test_data.is_none() {
            return Err(BundleError::Invalid("--min-accuracy needs --test-data".into()));
        }
    }
    if spec.self_test_rows == 0 {
        return Err(BundleError::Invalid("at least one self-test row is needed".into()));
    }
    Ok(())
}

/// Reads a model file within the device limit; its format from the extension.
pub fn read_model(path: &Path) -> Result<(Vec<u8>, ModelFormat), BundleError> {
    use std::io::Read;
    let format = ModelFormat::from_path(path).ok_or_else(|| BundleError::UnknownFormat { path: path.into() })?;
    let limit = Limits::default().model_bytes;
    let io = |error| BundleError::Io { path: path.into(), error };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(BundleError::ModelTooLarge { path: path.into(), size: bytes.len() as u64, limit });
    }
    Ok((bytes, format))
}

/// A manifest ready to sign, and how much reference data went into it.
#[derive(Clone, Debug)]
pub struct PreparedManifest {
    pub manifest: Manifest,
    pub reference_rows: usize,
}

/// Steps 2–4: signature, reference sketch and self-test vectors for a
/// loaded model. Reusable by `publish`.
pub fn prepare_manifest(
    spec: &BundleSpec,
    model: &Model,
    model_bytes: &[u8],
    format: ModelFormat,
) -> Result<PreparedManifest, BundleError> {
    let input = single_input(model)?;
    let data = read_rows(&spec.reference_data, input, false)?;
    let outputs = run_rows(model, input, &data.rows, &spec.reference_data)?;

    // Reference outputs, named after the model outputs so the device's drift
    // monitor finds them (see the module docs).
    let sig = model.signature();
    let mut reference_outputs = Vec::new();
    for (ix, spec_out) in sig.outputs.iter().enumerate() {
        let per_row = &outputs[ix];
        if per_row.iter().all(|v| v.len() == 1) {
            let values = if is_integer(spec_out.element_type) {
                OutputValues::Classes(per_row.iter().map(|v| v[0] as i64).collect())
            } else {
                OutputValues::Values(per_row.iter().map(|v| v[0] as f32).collect())
            };
            reference_outputs.push(ReferenceOutput { name: spec_out.name.clone(), values });
        }
    }
    if reference_outputs.is_empty() {
        if let Some(ix) = sig.outputs.iter().position(|o| !is_integer(o.element_type)) {
            let classes = outputs[ix].iter().map(|v| argmax(v) as i64).collect();
            reference_outputs
                .push(ReferenceOutput { name: sig.outputs[ix].name.clone(), values: OutputValues::Classes(classes) });
        }
    }
    let reference =
        ReferenceSketch::from_samples(&data.feature_names, &data.rows, &reference_outputs, &ReferenceOptions::default())?;

    // Self-test: rows spread evenly over the reference data, one vector each.
    let n = data.rows.len();
    let k = spec.self_test_rows.min(n);
    let mut vectors = Vec::with_capacity(k);
    for i in 0..k {
        let row = &data.rows[i * n / k];
        let inputs = vec![input_tensor(input, std::slice::from_ref(row))?];
        let expected = model
            .run(inputs.clone())
            .map_err(|error| BundleError::Run { path: spec.reference_data.clone(), error })?;
        vectors.push(SelfTestVector { inputs, expected });
    }

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: spec.name.clone(),
        version: spec.version.clone(),
        sequence: spec.sequence,
        model_format: format.into(),
        model_sha256: Digest::of(model_bytes),
        model_size: model_bytes.len() as u64,
        io: sig.clone(),
        reference,
        self_test: SelfTest { tolerance: spec.tolerance, vectors },
        issued_at: unix_now(),
    };
    Ok(PreparedManifest { manifest, reference_rows: n })
}

/// Accuracy of `model` on a labelled CSV (label in the last column).
pub fn measure_accuracy(model: &Model, path: &Path) -> Result<Accuracy, BundleError> {
    let input = single_input(model)?;
    let data = read_rows(path, input, true)?;
    let labels = data.labels.ok_or_else(|| BundleError::DataShape {
        path: path.into(),
        reason: "no label column".into(),
    })?;
    let outputs = run_rows(model, input, &data.rows, path)?;
    let sig = model.signature();
    let one_per_row = |ix: usize| outputs[ix].iter().all(|v| v.len() == 1);
    let (predicted, how): (Vec<i64>, String) =
        if let Some(ix) = (0..sig.outputs.len()).find(|&ix| is_integer(sig.outputs[ix].element_type) && one_per_row(ix)) {
            (outputs[ix].iter().map(|v| v[0] as i64).collect(), format!("label output {:?}", sig.outputs[ix].name))
        } else if let Some(ix) = (0..sig.outputs.len())
            .find(|&ix| !is_integer(sig.outputs[ix].element_type) && outputs[ix].iter().all(|v| v.len() > 1))
        {
            (outputs[ix].iter().map(|v| argmax(v) as i64).collect(), format!("argmax of {:?}", sig.outputs[ix].name))
        } else if let Some(ix) = (0..sig.outputs.len()).find(|&ix| one_per_row(ix)) {
            (outputs[ix].iter().map(|v| i64::from(v[0] >= 0.5)).collect(), format!("{:?} ≥ 0.5", sig.outputs[ix].name))
        } else {
            return Err(BundleError::NoPrediction(
                "the model has no output a class prediction can be read from (a label, or class scores)".into(),
            ));
        };
    let total = labels.len();
    let correct = labels.iter().zip(&predicted).filter(|(l, p)| l == p).count();
    Ok(Accuracy { correct, total, accuracy: correct as f64 / total.max(1) as f64, prediction: how })
}

/// Signs `manifest` and writes the bundle to `out` atomically (temporary
/// file, fsync, rename). Returns the manifest's sha256 (what a directive
/// names).
pub fn write_signed_bundle(signer: &Signer, manifest: &Manifest, model: &[u8], out: &Path) -> Result<Digest, BundleError> {
    let signed = signer.sign(manifest)?;
    let io = |error| BundleError::Io { path: out.into(), error };
    let mut tmp_name = out.file_name().map(|n| n.to_os_string()).ok_or_else(|| {
        BundleError::Invalid(format!("--out {} is not a file path", out.display()))
    })?;
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let result = (|| {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        write_bundle(&mut file, &signed, &[signer.certificate().clone()], model)?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)?;
    Ok(signed.payload_digest())
}

/// Rows of a CSV shaped for the model's input.
struct Rows {
    feature_names: Vec<String>,
    rows: Vec<Vec<f32>>,
    labels: Option<Vec<i64>>,
}

/// Reads a CSV whose feature count must equal one sample of the model's
/// input; a last extra column is the label (required when `need_labels`).
fn read_rows(path: &Path, input: &TensorSpec, need_labels: bool) -> Result<Rows, BundleError> {
    let sample = input.sample_len().ok_or_else(|| BundleError::DataShape {
        path: path.into(),
        reason: format!("the model input {:?} has free dimensions besides the batch", input.name),
    })?;
    let data = read_csv(path, LabelColumn::None)?;
    let width = data.n_features();
    let shape_err = |reason: String| BundleError::DataShape { path: path.into(), reason };
    let has_label = if width == sample + 1 {
        true
    } else if width == sample && !need_labels {
        false
    } else {
        return Err(shape_err(format!(
            "{width} columns, but the model input {:?} takes {sample} values per sample{}",
            input.name,
            if need_labels { " (plus the label in the last column)" } else { " (optionally plus a label)" }
        )));
    };
    let mut feature_names = data.feature_names;
    let mut rows = data.rows;
    let mut labels = need_labels.then(|| Vec::with_capacity(rows.len()));
    if has_label {
        feature_names.truncate(sample);
        for (i, row) in rows.iter_mut().enumerate() {
            let label = row.pop().unwrap_or(f32::NAN);
            if let Some(labels) = labels.as_mut() {
                if !(label.is_finite() && label.fract() == 0.0) {
                    return Err(shape_err(format!("data row {}: label {label} is not a class number", i + 1)));
                }
                labels.push(label as i64);
            }
        }
    }
    Ok(Rows { feature_names, rows, labels })
}

fn single_input(model: &Model) -> Result<&TensorSpec, BundleError> {
    match model.signature().inputs.as_slice() {
        [one] => Ok(one),
        inputs => Err(BundleError::Invalid(format!(
            "bundle takes models with one input (CSV rows feed it); this one has {}",
            inputs.len()
        ))),
    }
}

/// A tensor of `rows` for `input`: shape `[rows, fixed dims…]`, values
/// converted to the input's element type.
fn input_tensor(input: &TensorSpec, rows: &[Vec<f32>]) -> Result<TensorData, BundleError> {
    let mut shape = vec![rows.len()];
    shape.extend(input.shape.iter().skip(1).map(|d| d.unwrap_or(1) as usize));
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let values = match input.element_type {
        ElementType::F32 => TensorValues::F32(flat),
        ElementType::I8 => TensorValues::I8(flat.iter().map(|x| x.round() as i8).collect()),
        ElementType::U8 => TensorValues::U8(flat.iter().map(|x| x.round() as u8).collect()),
        ElementType::I32 => TensorValues::I32(flat.iter().map(|x| x.round() as i32).collect()),
        ElementType::I64 => TensorValues::I64(flat.iter().map(|x| x.round() as i64).collect()),
    };
    TensorData::new(shape, values).map_err(|e| BundleError::Invalid(e.to_string()))
}

/// Runs the model over all rows; per output, per row, the row's values.
fn run_rows(model: &Model, input: &TensorSpec, rows: &[Vec<f32>], path: &Path) -> Result<Vec<Vec<Vec<f64>>>, BundleError> {
    let outputs_n = model.signature().outputs.len();
    let mut per_output: Vec<Vec<Vec<f64>>> = vec![Vec::with_capacity(rows.len()); outputs_n];
    let batch = if model.runs_batches_natively() { BATCH } else { 1 };
    for chunk in rows.chunks(batch) {
        let outputs = model
            .run(vec![input_tensor(input, chunk)?])
            .map_err(|error| BundleError::Run { path: path.into(), error })?;
        for (ix, t) in outputs.iter().enumerate().take(outputs_n) {
            let values = t.values.to_f64_vec();
            let per_row = values.len() / chunk.len();
            if per_row * chunk.len() != values.len() {
                return Err(BundleError::DataShape {
                    path: path.into(),
                    reason: format!("output {ix} has {} values for {} rows", values.len(), chunk.len()),
                });
            }
            per_output[ix].extend(values.chunks(per_row.max(1)).map(<[f64]>::to_vec));
        }
    }
    Ok(per_output)
}

fn is_integer(t: ElementType) -> bool {
    !matches!(t, ElementType::F32)
}

fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, x)| if *x > bv { (i, *x) } else { (bi, bv) })
        .0
}

/// Arguments of `outpost-fleet bundle`.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// The model file (.onnx or .tflite).
    pub model: PathBuf,
    /// Model name (letters, digits, '.', '_', '-').
    #[arg(long)]
    pub name: String,
    /// Semantic version, e.g. 1.4.0.
    #[arg(long)]
    pub version: String,
    /// Monotonic sequence: above every sequence signed for these devices before.
    #[arg(long)]
    pub sequence: u64,
    /// Keys directory (online.key, online.cert, root.pub) from `keygen`.
    #[arg(long)]
    pub keys: PathBuf,
    /// Reference (training) data, CSV: features, optionally the label last.
    #[arg(long)]
    pub reference_data: PathBuf,
    /// Labelled test data, CSV (label in the last column): accuracy is measured.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Refuse to bundle if accuracy on --test-data is below this (0..1).
    #[arg(long)]
    pub min_accuracy: Option<f64>,
    /// Number of reference rows recorded as self-test vectors.
    #[arg(long, default_value_t = DEFAULT_SELF_TEST_ROWS)]
    pub self_test_rows: usize,
    /// Where to write the .outpost bundle.
    #[arg(long)]
    pub out: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl BundleArgs {
    pub fn spec(&self) -> BundleSpec {
        BundleSpec {
            model: self.model.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            sequence: self.sequence,
            keys_dir: self.keys.clone(),
            reference_data: self.reference_data.clone(),
            test_data: self.test_data.clone(),
            min_accuracy: self.min_accuracy,
            out: self.out.clone(),
            self_test_rows: self.self_test_rows,
            tolerance: Tolerance::default(),
        }
    }
}

/// Runs `bundle`; returns what to print. A refusal (accuracy below the
/// minimum included) is an error whose message carries the measured value.
pub fn bundle_command(args: &BundleArgs) -> anyhow::Result<String> {
    let report = make_bundle(&args.spec())?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&report)?);
    }
    let mut out = format!(
        "wrote {}: {}@{} sequence {}, {} model of {} bytes, sha256 {}\n  manifest sha256 {}, signed by online key {}\n  reference sketch: {} rows, {} columns; {} self-test vectors",
        report.out.display(),
        report.name,
        report.version,
        report.sequence,
        serde_json::to_value(report.model_format)?.as_str().unwrap_or("?"),
        report.model_size,
        report.model_sha256,
        report.manifest_sha256,
        report.signer,
        report.reference_rows,
        report.reference_columns,
        report.self_test_vectors,
    );
    if let Some(acc) = &report.accuracy {
        out.push_str(&format!(
            "\n  accuracy {:.4} ({}/{} rows, prediction from {}){}",
            acc.accuracy,
            acc.correct,
            acc.total,
            acc.prediction,
            report.min_accuracy.map(|m| format!(", minimum {m}: ok")).unwrap_or_default()
        ));
    }
    Ok(out)
}
