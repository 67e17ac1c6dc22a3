//! The swappable model holder.
//!
//! A [`ModelSlot`] holds at most one [`Deployed`] model: the model plus what
//! the server says about it (name, version, digest, signer) and how its
//! outputs map onto the seed-style answer. Every request takes an
//! `Arc<Deployed>` from the slot once, when it is parsed, and keeps it until it
//! is answered. Swapping is therefore atomic and never fails a request:
//!
//! - a request that started before [`ModelSlot::swap`] finishes on the old
//!   model (its `Arc` keeps it alive);
//! - a request that starts after it sees the new model;
//! - the old model is freed when its last in-flight request is answered.
//!
//! The slot costs one uncontended read-lock and one atomic increment per
//! request. Load, self-test and warm up the new model *before* swapping it in
//! (loading takes milliseconds to seconds; the swap itself takes nanoseconds):
//!
//! ```no_run
//! use std::sync::Arc;
//! use outpost_runtime::server::{Deployed, ModelSlot};
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let slot = Arc::new(ModelSlot::empty());            // /ready answers 503
//! let v1 = Deployed::load_file("models/a.onnx", &Default::default())?;
//! slot.swap(v1);                                      // /ready answers 200
//! let v2 = Deployed::load_file("models/b.onnx", &Default::default())?;
//! let old = slot.swap(v2);                            // in-flight requests finish on `old`
//! # let _ = old; Ok(()) }
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::drift::{ColumnKind, DriftMonitor};
use crate::model::{LoadError, LoadOptions, Model, ModelFormat};
use crate::tensor::{ElementType, TensorData, TensorSpec, TensorValues};

/// What the server reports about the model it serves (`GET /v1/model`,
/// `/v2/models/{name}`, the `outpost_model_info` metric).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    /// Model name: a bundle's manifest name, or a plain file's stem.
    pub name: String,
    /// Version: a bundle's semver, or `"unversioned"` for a plain file.
    pub version: String,
    /// Lowercase hex sha256 of the model file's bytes.
    pub sha256: String,
    pub format: ModelFormat,
    /// Size of the model file in bytes.
    pub size_bytes: u64,
    /// Who signed it (the signing key's id), `None` for a plain model file.
    pub signer: Option<String>,
}

impl ModelInfo {
    /// Info for a plain model file: name from the file stem, version
    /// `"unversioned"`, no signer.
    pub fn for_plain_file(path: &Path, bytes: &[u8], format: ModelFormat) -> ModelInfo {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("model")
            .to_string();
        ModelInfo {
            name,
            version: "unversioned".to_string(),
            sha256: sha256_hex(bytes),
            format,
            size_bytes: bytes.len() as u64,
            signer: None,
        }
    }
}

/// Lowercase hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
        s.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
    }
    s
}

/// Why a model could not be made ready to serve.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("cannot read model file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cannot tell the model format of {0}: expected a .onnx or .tflite file (a signed .outpost bundle needs --trust)")]
    UnknownFormat(String),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// A loaded, warmed-up model and what the server says about it.
pub struct Deployed {
    model: Model,
    info: ModelInfo,
    layout: Layout,
    stats: ServingStats,
    loaded_at: SystemTime,
    drift: Option<DriftTap>,
}

/// A drift monitor and how the model's tensors map onto its columns.
struct DriftTap {
    monitor: Arc<DriftMonitor>,
    /// Per reference output column, in its order: where its value comes from.
    outputs: Vec<OutputTap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputTap {
    /// An output with one value per sample (a label, a regressor's value).
    Value(usize),
    /// The predicted class of a score output `[N, C]`.
    Argmax(usize),
}

/// Why a drift monitor does not fit a model.
#[derive(Debug, thiserror::Error)]
pub enum DriftWiringError {
    #[error("drift monitoring needs a model with one input whose samples have a fixed size; this one has {0} inputs")]
    Inputs(usize),
    #[error("the drift reference has {reference} features but one sample of input {input:?} has {model} values")]
    Features { reference: usize, input: String, model: usize },
    #[error("the drift reference's output column {0:?} matches no model output with one value per sample")]
    Output(String),
}

impl std::fmt::Debug for Deployed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployed").field("info", &self.info).finish()
    }
}

impl Deployed {
    /// Wraps a model that is already loaded (and, with the default
    /// [`LoadOptions`], optimized and warmed up).
    pub fn new(model: Model, info: ModelInfo) -> Deployed {
        let layout = Layout::of(&model);
        Deployed { model, info, layout, stats: ServingStats::default(), loaded_at: SystemTime::now(), drift: None }
    }

    /// Counts every prediction into `monitor` (`GET /v1/drift`, the drift
    /// gauges in `/metrics`). The monitor's reference must describe this
    /// model: one feature per value of a sample of its single input, and
    /// output columns named after model outputs with one value per sample
    /// (a class column may also take the label or the argmax of the scores,
    /// a value column the regressor's output, whatever their names).
    pub fn with_drift(mut self, monitor: Arc<DriftMonitor>) -> Result<Deployed, DriftWiringError> {
        let sig = self.model.signature();
        let (spec, layout) = match (sig.inputs.as_slice(), self.layout.inputs.as_slice()) {
            ([spec], [layout]) => (spec, layout),
            _ => return Err(DriftWiringError::Inputs(sig.inputs.len())),
        };
        let sample: usize = match &layout.sample_shape {
            Some(s) => s.iter().product(),
            None => return Err(DriftWiringError::Inputs(sig.inputs.len())),
        };
        let reference = monitor.reference();
        if reference.features.len() != sample {
            return Err(DriftWiringError::Features {
                reference: reference.features.len(),
                input: spec.name.clone(),
                model: sample,
            });
        }
        let mut outputs = Vec::with_capacity(reference.outputs.len());
        for column in &reference.outputs {
            let by_name = sig.outputs.iter().position(|o| o.name == column.name() && one_per_row(o));
            let tap = match (by_name, column.kind(), &self.layout.head) {
                (Some(ix), _, _) => OutputTap::Value(ix),
                (None, ColumnKind::Classes, Head::Classifier { label: Some(l), .. }) => OutputTap::Value(*l),
                (None, ColumnKind::Classes, Head::Classifier { label: None, scores: Some(s) }) => OutputTap::Argmax(*s),
                (None, ColumnKind::Quantile, Head::Value(v)) => OutputTap::Value(*v),
                _ => return Err(DriftWiringError::Output(column.name().to_string())),
            };
            outputs.push(tap);
        }
        self.drift = Some(DriftTap { monitor, outputs });
        Ok(self)
    }

    /// The drift monitor this model's predictions are counted into, if any.
    pub fn drift(&self) -> Option<&Arc<DriftMonitor>> {
        self.drift.as_ref().map(|t| &t.monitor)
    }

    /// Counts one successful run into the drift monitor (no-op without one).
    /// `input` is the model's single input, `outputs` what the run gave.
    pub(crate) fn observe_drift(&self, input: &TensorData, outputs: &[TensorData]) {
        let Some(tap) = &self.drift else { return };
        let rows = input.batch_len();
        let features = values_f32(&input.values);
        let mut out = Vec::with_capacity(rows * tap.outputs.len());
        for r in 0..rows {
            for t in &tap.outputs {
                let value = match *t {
                    OutputTap::Value(ix) => outputs.get(ix).and_then(|o| {
                        let per_row = o.values.len() / rows.max(1);
                        value_f32(&o.values, r * per_row)
                    }),
                    OutputTap::Argmax(ix) => outputs.get(ix).and_then(|o| {
                        let c = o.values.len() / rows.max(1);
                        argmax(&o.values, r * c, c).map(|k| k as f32)
                    }),
                };
                out.push(value.unwrap_or(f32::NAN));
            }
        }
        // A shape mismatch cannot happen once `with_drift` accepted the model;
        // if it did, losing one sample from the sketch beats failing a request.
        if let Err(e) = tap.monitor.observe_batch(&features, &out) {
            log::debug!("drift sketch skipped a batch: {e}");
        }
    }

    /// Loads a plain `.onnx` / `.tflite` file: reads it once, hashes it,
    /// loads, optimizes and warms up the model.
    pub fn load_file(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Deployed, DeployError> {
        let path = path.as_ref();
        let format = ModelFormat::from_path(path)
            .ok_or_else(|| DeployError::UnknownFormat(path.display().to_string()))?;
        let bytes = std::fs::read(path)
            .map_err(|source| DeployError::Io { path: path.display().to_string(), source })?;
        let info = ModelInfo::for_plain_file(path, &bytes, format);
        let model = Model::from_bytes(&bytes, format, options)?;
        Ok(Deployed::new(model, info))
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Per-model serving statistics (what the agent's probation reads).
    pub fn stats(&self) -> &ServingStats {
        &self.stats
    }

    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// Whether concurrent requests for this model may be merged into one run.
    pub fn batches_dynamically(&self) -> bool {
        self.layout.batchable
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }
}

fn values_f32(v: &TensorValues) -> Vec<f32> {
    match v {
        TensorValues::F32(x) => x.clone(),
        TensorValues::I8(x) => x.iter().map(|e| *e as f32).collect(),
        TensorValues::U8(x) => x.iter().map(|e| *e as f32).collect(),
        TensorValues::I32(x) => x.iter().map(|e| *e as f32).collect(),
        TensorValues::I64(x) => x.iter().map(|e| *e as f32).collect(),
    }
}

fn value_f32(v: &TensorValues, i: usize) -> Option<f32> {
    Some(match v {
        TensorValues::F32(x) => *x.get(i)?,
        TensorValues::I8(x) => *x.get(i)? as f32,
        TensorValues::U8(x) => *x.get(i)? as f32,
        TensorValues::I32(x) => *x.get(i)? as f32,
        TensorValues::I64(x) => *x.get(i)? as f32,
    })
}

fn argmax(v: &TensorValues, start: usize, len: usize) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for k in 0..len {
        let x = value_f32(v, start + k)?;
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((k, x));
        }
    }
    best.map(|(k, _)| k)
}

/// The holder the server reads on every request and the agent swaps. See the
/// module docs.
#[derive(Default)]
pub struct ModelSlot {
    current: RwLock<Option<Arc<Deployed>>>,
    swaps: AtomicU64,
}

impl std::fmt::Debug for ModelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlot").field("current", &self.current().map(|d| d.info.clone())).finish()
    }
}

impl ModelSlot {
    /// A slot with no model: the server answers `/ready` and predictions with 503.
    pub fn empty() -> ModelSlot {
        ModelSlot::default()
    }

    /// A slot serving `deployed` from the start.
    pub fn with(deployed: Deployed) -> ModelSlot {
        let slot = ModelSlot::empty();
        slot.swap(deployed);
        slot
    }

    /// The model serving now (an `Arc`: hold it for the whole request).
    pub fn current(&self) -> Option<Arc<Deployed>> {
        // The lock only guards an `Arc` clone; poisoning cannot corrupt it.
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `deployed` in the slot and returns the model it replaces. Requests
    /// already running on the old model finish on it.
    pub fn swap(&self, deployed: Deployed) -> Option<Arc<Deployed>> {
        self.swap_arc(Arc::new(deployed))
    }

    /// Like [`swap`](Self::swap) for a model that is already shared (e.g. to
    /// swap back to a previous version without reloading it).
    pub fn swap_arc(&self, deployed: Arc<Deployed>) -> Option<Arc<Deployed>> {
        let old = self.current.write().unwrap_or_else(|p| p.into_inner()).replace(deployed);
        self.swaps.fetch_add(1, Ordering::Relaxed);
        old
    }

    /// Empties the slot (the server turns not-ready) and returns what it held.
    pub fn clear(&self) -> Option<Arc<Deployed>> {
        self.current.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether a model is loaded and warm (what `/ready` answers).
    pub fn is_ready(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// How many times a model was put in the slot.
    pub fn swap_count(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }
}

/// How the server maps a model's signature onto its endpoints; computed once
/// per model.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub inputs: Vec<InputLayout>,
    pub head: Head,
    /// Concurrent requests may be merged into one run: the graph takes a free
    /// batch dimension on every input and gives one on every output.
    pub batchable: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct InputLayout {
    /// The first dimension is the batch: free, or fixed at 1 (such a model
    /// runs a batch row by row).
    pub batched: bool,
    /// Shape of one sample (the dimensions after the batch), when all fixed.
    pub sample_shape: Option<Vec<usize>>,
}

/// Which outputs make the seed-style `{"prediction", "probability"}` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Head {
    /// A classifier: an integer label output `[N]` and/or a score output
    /// `[N, C]`. Without a label the prediction is the argmax of the scores.
    Classifier { label: Option<usize>, scores: Option<usize> },
    /// A regressor: one float per sample (`[N]` or `[N, 1]`).
    Value(usize),
    /// Anything else: the prediction is the first output's row, as it is.
    Raw,
}

impl Layout {
    fn of(model: &Model) -> Layout {
        let sig = model.signature();
        let inputs: Vec<InputLayout> = sig
            .inputs
            .iter()
            .map(|spec| {
                let batched = matches!(spec.shape.first(), Some(None) | Some(Some(1)));
                let sample_shape = if batched {
                    spec.shape[1..].iter().map(|d| d.map(|d| d as usize)).collect::<Option<Vec<_>>>()
                } else {
                    None
                };
                InputLayout { batched, sample_shape }
            })
            .collect();
        let head = head_of(&sig.outputs);
        let batchable = model.runs_batches_natively()
            && sig.inputs.iter().all(TensorSpec::has_batch_dim)
            && inputs.iter().all(|i| i.sample_shape.is_some())
            && !sig.outputs.is_empty()
            && sig.outputs.iter().all(TensorSpec::has_batch_dim);
        Layout { inputs, head, batchable }
    }
}

fn is_batch_first(spec: &TensorSpec) -> bool {
    matches!(spec.shape.first(), Some(None) | Some(Some(1)))
}

/// One value per sample: `[N]` or `[N, 1]`.
fn one_per_row(spec: &TensorSpec) -> bool {
    is_batch_first(spec) && (spec.shape.len() == 1 || (spec.shape.len() == 2 && spec.shape[1] == Some(1)))
}

fn head_of(outputs: &[TensorSpec]) -> Head {
    let label = outputs.iter().position(|o| {
        matches!(o.element_type, ElementType::I64 | ElementType::I32) && one_per_row(o)
    });
    let scores = outputs.iter().position(|o| {
        o.element_type == ElementType::F32
            && is_batch_first(o)
            && o.shape.len() == 2
            && !matches!(o.shape[1], Some(0) | Some(1))
    });
    if label.is_some() || scores.is_some() {
        return Head::Classifier { label, scores };
    }
    if let Some(ix) = outputs.iter().position(|o| o.element_type == ElementType::F32 && one_per_row(o)) {
        return Head::Value(ix);
    }
    Head::Raw
}

/// Lock-free counters of what one deployed model served. The agent compares
/// these between the new and the previous version during probation.
#[derive(Debug, Default)]
pub struct ServingStats {
    requests: AtomicU64,
    input_errors: AtomicU64,
    failures: AtomicU64,
    rows: AtomicU64,
    /// Request latency in microseconds, log2 buckets: bucket `i` counts
    /// latencies in `[2^i, 2^(i+1))` µs (bucket 0 also holds < 1 µs).
    latency: [AtomicU64; LATENCY_BUCKETS],
}

const LATENCY_BUCKETS: usize = 32;

impl ServingStats {
    // Public for servers that embed the slot on another transport (and for
    // the agent's probation tests); the HTTP server and the stream call these.
    pub fn record_ok(&self, rows: usize, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.record_latency(latency);
    }

    pub fn record_input_error(&self) {
        self.input_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_failure(&self, latency: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.record_latency(latency);
    }

    fn record_latency(&self, latency: Duration) {
        let us = latency.as_micros().max(1) as u64;
        let ix = (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[ix].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut latency = [0u64; LATENCY_BUCKETS];
        for (dst, src) in latency.iter_mut().zip(&self.latency) {
            *dst = src.load(Ordering::Relaxed);
        }
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            input_errors: self.input_errors.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            latency,
        }
    }
}

/// A copy of [`ServingStats`] at one moment. Subtract two snapshots to get
/// the figures of the interval between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Prediction requests answered with 200.
    pub requests: u64,
    /// Requests refused as bad input (4xx): the caller's fault, not the model's.
    pub input_errors: u64,
    /// Requests on which inference failed (5xx): the model's fault.
    pub failures: u64,
    /// Samples (rows) predicted.
    pub rows: u64,
    latency: [u64; LATENCY_BUCKETS],
}

impl StatsSnapshot {
    /// Failures over answered requests (0 when there were none).
    pub fn failure_rate(&self) -> f64 {
        let total = self.requests + self.failures;
        if total == 0 {
            0.0
        } else {
            self.failures as f64 / total as f64
        }
    }

    /// An upper bound of the `q` quantile of request latency (within a factor
    /// of 2, from log2 buckets), or `None` without requests.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (ix, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(1u64 << (ix + 1)));
            }
        }
        None
    }

    /// Request latency counts in log2 buckets: bucket `i` counts latencies
    /// in `[2^i, 2^(i+1))` µs (bucket 0 also holds < 1 µs). Mergeable by
    /// adding; what the agent ships in its sketch messages.
    pub fn latency_buckets(&self) -> &[u64] {
        &self.latency
    }

    /// The figures of the interval since `earlier`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        let mut latency = [0u64; LATENCY_BUCKETS];
        for (ix, dst) in latency.iter_mut().enumerate() {
            *dst = self.latency[ix].saturating_sub(earlier.latency[ix]);
        }
        StatsSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            input_errors: self.input_errors.saturating_sub(earlier.input_errors),
            failures: self.failures.saturating_sub(earlier.failures),
            rows: self.rows.saturating_sub(earlier.rows),
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, t: ElementType, shape: &[Option<u64>]) -> TensorSpec {
        TensorSpec { name: name.into(), element_type: t, shape: shape.to_vec() }
    }

    #[test]
    fn finds_classifier_outputs() {
        let outs = [
            spec("output_label", ElementType::I64, &[None]),
            spec("output_probability", ElementType::F32, &[None, Some(2)]),
        ];
        assert_eq!(head_of(&outs), Head::Classifier { label: Some(0), scores: Some(1) });
        let logits = [spec("logits", ElementType::F32, &[None, Some(10)])];
        assert_eq!(head_of(&logits), Head::Classifier { label: None, scores: Some(0) });
        let reg = [spec("y", ElementType::F32, &[None, Some(1)])];
        assert_eq!(head_of(&reg), Head::Value(0));
        let raw = [spec("emb", ElementType::F32, &[None, Some(4), Some(4)])];
        assert_eq!(head_of(&raw), Head::Raw);
    }

    #[test]
    fn stats_quantiles_are_upper_bounds() {
        let s = ServingStats::default();
        for _ in 0..99 {
            s.record_ok(1, Duration::from_micros(100));
        }
        s.record_failure(Duration::from_millis(10));
        let snap = s.snapshot();
        assert_eq!(snap.requests, 99);
        assert!((snap.failure_rate() - 0.01).abs() < 1e-9);
        let p50 = snap.latency_quantile(0.5).unwrap();
        assert!(p50 >= Duration::from_micros(100) && p50 <= Duration::from_micros(256));
        assert!(snap.latency_quantile(1.0).unwrap() >= Duration::from_millis(10));
        assert_eq!(snap.since(&snap).requests, 0);
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
