//! Model loading and inference.
//!
//! A [`Model`] is loaded, optimized and warmed up once, then run many times
//! from any number of threads. Loading goes past what tract reads on its own
//! where users need it:
//!
//! - ONNX exported by skl2onnx: the `ai.onnx.ml` operators tract lacks
//!   (`Scaler`, `ZipMap`, `Imputer`, `Binarizer`) are registered through
//!   tract-onnx's public op register, see [`onnx_ml`].
//! - TFLite as the converter publishes it: float16 constants, quantize and
//!   dequantize ops at the edges, and `PRELU` are rewritten before tract sees
//!   the flatbuffer, see [`tflite`].
//!
//! Input facts come from the model itself, unless [`LoadOptions`] fixes an
//! input to a constant or gives its dimensions (see [`fixed`]). A dimension
//! the model leaves free becomes a symbol, so one loaded model serves batch
//! 1 and batch N; an ONNX model that cannot load that way is loaded with its
//! batch fixed at 1 instead ([`BatchMode::FixedFallback`]). A model
//! whose batch is fixed at 1 (common in TFLite) is run row by row when given
//! a larger batch, so callers never need to know the difference.

mod convert;
pub mod fixed;
pub mod onnx;
pub mod onnx_ml;
mod plans;
mod profile;
mod quant_fusion;
pub mod tflite;
mod tflite_rewrite;
pub mod tree_ensemble;

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use tract_onnx::prelude::*;

use crate::tensor::{ElementType, ModelSignature, TensorData, TensorSpec, TensorValues};

pub use convert::{EdgeQuantization, InputAdapter, OutputAdapter};
pub use fixed::{FixedInput, FixedValues, InputShape};
pub use profile::{NodeTime, Profile};

/// Largest model file accepted, in bytes, whatever the format. Outpost
/// targets devices with a few hundred MB of RAM; while loading, the file,
/// the parsed graph and tract's copy of every constant coexist. Checked
/// before the file is read.
pub const MAX_MODEL_BYTES: u64 = tflite_rewrite::MAX_MODEL_BYTES as u64;

/// Most elements one sample of one input may declare (2^28: 1 GiB of f32).
/// The warm-up and the self-test allocate a sample of every input, so a
/// model declaring more — `[N, 2^40]` — is refused at load time instead of
/// aborting the process on that allocation (found by fuzzing,
/// runtime/tests/fuzz_models.rs).
pub const MAX_SAMPLE_ELEMENTS: usize = 1 << 28;

type Plan = TypedSimplePlan;
type State = TypedSimpleState;

/// Model file formats Outpost loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ModelFormat {
    Onnx,
    Tflite,
}

impl ModelFormat {
    /// The format a file name's extension says (`.onnx`, `.tflite`).
    pub fn from_path(path: &Path) -> Option<ModelFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "onnx" => Some(ModelFormat::Onnx),
            "tflite" => Some(ModelFormat::Tflite),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Tflite => "tflite",
        }
    }
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Run tract's optimizer (declutter + kernel selection). Only worth
    /// turning off to debug tract itself.
    pub optimize: bool,
    /// Run one inference on zeros after loading so the first real request
    /// does not pay for lazy initialisation (and so a model that loads but
    /// cannot run is refused at start, not at the first request).
    pub warm_up: bool,
    /// How many batch sizes get a plan optimized for that exact size (see
    /// [`plans`]); other sizes run the plan with a symbolic batch. 0 keeps
    /// the symbolic plan only. Ignored when `optimize` is off or the model
    /// has no free batch dimension.
    pub batch_plans: usize,
    /// Inputs replaced by constants before the graph is typed and optimized
    /// (so control flow on them folds); they leave the model's signature.
    /// See [`fixed`].
    pub fixed_inputs: Vec<FixedInput>,
    /// Inputs whose dimensions are given instead of the model's own (a
    /// detector exported with free height and width, run at 320×320).
    pub input_shapes: Vec<InputShape>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { optimize: true, warm_up: true, batch_plans: 8, fixed_inputs: vec![], input_shapes: vec![] }
    }
}

/// Why a model was refused at load time. Messages carry tract's own reason.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read model file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cannot tell the model format of {0}: expected a .onnx or .tflite file")]
    UnknownFormat(String),
    #[error("not a valid {format} model: {reason}")]
    Parse { format: &'static str, reason: String },
    #[error("operator {op} (node {node:?}) is not supported by this runtime")]
    UnsupportedOperator { op: String, node: String },
    #[error("model cannot be prepared for inference: {reason}")]
    Prepare { reason: String },
    #[error("{what} {name:?} has element type {element_type}, which Outpost does not exchange")]
    UnsupportedType { what: &'static str, name: String, element_type: String },
    #[error("warm-up inference failed: {0}")]
    WarmUp(String),
    #[error("the model is {size} bytes, above the {limit} bytes Outpost accepts")]
    TooLarge { size: u64, limit: u64 },
    #[error("the model has no input named {name:?}; its inputs are {known}")]
    UnknownInput { name: String, known: String },
    #[error("cannot fix input {name:?}: {reason}")]
    FixedInput { name: String, reason: String },
    #[error("cannot give input {name:?} that shape: {reason}")]
    InputShape { name: String, reason: String },
}

impl LoadError {
    /// Whether the model parsed but tract could not type, optimize or run
    /// it: what loading it differently may cure.
    fn is_preparation(&self) -> bool {
        matches!(self, LoadError::Prepare { .. } | LoadError::WarmUp(_))
    }
}

/// Why one inference call failed. Every variant is the caller's input
/// except [`RunError::Inference`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("model takes {expected} input(s), got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("input {name:?}: expected element type {expected}, got {got}")]
    ElementType { name: String, expected: ElementType, got: ElementType },
    #[error("input {name:?}: expected shape {expected}, got {got:?}")]
    Shape { name: String, expected: String, got: Vec<usize> },
    #[error("inference failed: {0}")]
    Inference(String),
}

impl RunError {
    /// Whether the error is the caller's fault (bad input) rather than the model's.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, RunError::Inference(_))
    }

    /// The input the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            RunError::ElementType { name, .. } | RunError::Shape { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// A loaded, optimized model, ready to run from many threads.
pub struct Model {
    plans: plans::BatchPlans,
    signature: ModelSignature,
    inputs: Vec<InputAdapter>,
    outputs: Vec<OutputAdapter>,
    format: ModelFormat,
    /// Whether the model's graph takes a free batch dimension on every input.
    /// If not, batches are run row by row.
    native_batch: bool,
    batch_mode: BatchMode,
}

/// How the model takes a batch: reported in the log and on `/v1/model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchMode {
    /// Every input's first dimension is a symbol: one run takes N rows.
    Symbolic,
    /// The model fixes its inputs' dimensions (or has no common batch):
    /// N rows run row by row.
    Fixed,
    /// The model leaves its batch free, but failed to load with it as a
    /// symbol; it was loaded with the batch fixed at 1 instead.
    FixedFallback,
}

impl BatchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchMode::Symbolic => "symbolic",
            BatchMode::Fixed => "fixed",
            BatchMode::FixedFallback => "fixed_fallback",
        }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("format", &self.format)
            .field("signature", &self.signature)
            .finish()
    }
}

impl Model {
    /// Loads a `.onnx` or `.tflite` file (format from the extension).
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Model, LoadError> {
        let path = path.as_ref();
        let format = ModelFormat::from_path(path)
            .ok_or_else(|| LoadError::UnknownFormat(path.display().to_string()))?;
        let io = |source| LoadError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size > MAX_MODEL_BYTES {
            return Err(LoadError::TooLarge { size, limit: MAX_MODEL_BYTES });
        }
        // The file may grow between the check and the read: never read more
        // than one byte past the limit.
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(MAX_MODEL_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
        Model::from_bytes(&bytes, format, options)
    }

    /// Loads a model from its file contents.
    pub fn from_bytes(
        bytes: &[u8],
        format: ModelFormat,
        options: &LoadOptions,
    ) -> Result<Model, LoadError> {
        if bytes.len() as u64 > MAX_MODEL_BYTES {
            return Err(LoadError::TooLarge { size: bytes.len() as u64, limit: MAX_MODEL_BYTES });
        }
        // tract checks most of what a malformed model can hold, but not all
        // of it: an assertion or an arithmetic overflow deep in an operator
        // must refuse the model, not take the process down.
        let attempt = |batch: BatchMode| {
            catch_unwind(AssertUnwindSafe(|| Model::from_bytes_unguarded(bytes, format, options, batch)))
                .unwrap_or_else(|panic| Err(LoadError::Prepare { reason: panic_reason(panic) }))
        };
        // Never lose to tract alone: a free batch made a symbol can break
        // shape computations tract folds when every dimension is known (a
        // jax2tf export broadcasting to a computed shape). Then the model is
        // loaded again with its batch fixed at 1, and runs batches row by
        // row. What the model's own graph refuses is refused either way.
        match attempt(BatchMode::Symbolic) {
            Err(symbolic) if format == ModelFormat::Onnx && symbolic.is_preparation() => {
                match attempt(BatchMode::FixedFallback) {
                    Ok(model) => {
                        log::warn!(
                            "the model does not load with a symbolic batch ({symbolic}); loaded with its batch fixed at 1, batches run row by row"
                        );
                        Ok(model)
                    }
                    Err(_) => Err(symbolic),
                }
            }
            result => result,
        }
    }

    fn from_bytes_unguarded(
        bytes: &[u8],
        format: ModelFormat,
        options: &LoadOptions,
        batch: BatchMode,
    ) -> Result<Model, LoadError> {
        let fixed_batch = batch == BatchMode::FixedFallback;
        let prepared = match format {
            ModelFormat::Onnx => onnx::load(bytes, &options.fixed_inputs, &options.input_shapes, fixed_batch)?,
            ModelFormat::Tflite => {
                let mut prepared = tflite::load(bytes)?;
                fixed::apply_to_typed(
                    &mut prepared.model,
                    &mut prepared.inputs,
                    &options.fixed_inputs,
                    &options.input_shapes,
                )?;
                prepared
            }
        };
        let decluttered = prepared.model.into_decluttered().map_err(prepare_err)?;
        let (typed, specializable) = if options.optimize && options.batch_plans > 0 {
            (optimize(decluttered.clone()).map_err(prepare_err)?, Some(decluttered))
        } else if options.optimize {
            (optimize(decluttered).map_err(prepare_err)?, None)
        } else {
            (decluttered, None)
        };
        let mut model = Model::from_typed(typed, specializable, format, prepared.inputs, prepared.outputs, options)?;
        if fixed_batch {
            model.batch_mode = BatchMode::FixedFallback;
        }
        Ok(model)
    }

    fn from_typed(
        typed: TypedModel,
        specializable: Option<TypedModel>,
        format: ModelFormat,
        mut inputs: Vec<InputAdapter>,
        mut outputs: Vec<OutputAdapter>,
        options: &LoadOptions,
    ) -> Result<Model, LoadError> {
        let input_count = typed.inputs.len();
        let output_count = typed.outputs.len();
        inputs.resize(input_count, InputAdapter::Direct);
        outputs.resize(output_count, OutputAdapter::Direct);
        let mut input_specs = Vec::with_capacity(input_count);
        for (ix, outlet) in typed.inputs.iter().enumerate() {
            let fact = typed.outlet_fact(*outlet).map_err(prepare_err)?;
            let name = typed.node(outlet.node).name.clone();
            input_specs.push(convert::spec_for(&name, fact, &inputs[ix], "input")?);
        }
        let mut output_specs = Vec::with_capacity(output_count);
        for (ix, outlet) in typed.outputs.iter().enumerate() {
            let fact = typed.outlet_fact(*outlet).map_err(prepare_err)?;
            let name = typed
                .outlet_label(*outlet)
                .map(str::to_string)
                .unwrap_or_else(|| typed.node(outlet.node).name.clone());
            output_specs.push(convert::spec_for(&name, fact, &outputs[ix], "output")?);
        }
        for spec in &input_specs {
            // Free dimensions count as 1, as in `zero_inputs`.
            let elements = spec
                .shape
                .iter()
                .try_fold(1usize, |acc, d| acc.checked_mul(d.map_or(Some(1), |d| usize::try_from(d).ok())?));
            if elements.is_none_or(|n| n > MAX_SAMPLE_ELEMENTS) {
                return Err(LoadError::Prepare {
                    reason: format!(
                        "input {:?} declares shape {:?}: more than {MAX_SAMPLE_ELEMENTS} elements per sample",
                        spec.name, spec.shape
                    ),
                });
            }
        }
        let native_batch = input_specs.iter().all(TensorSpec::has_batch_dim);
        let plan = typed.into_runnable().map_err(prepare_err)?;
        let specializable = specializable.filter(|_| native_batch);
        let model = Model {
            plans: plans::BatchPlans::new(plan, specializable, options.batch_plans),
            signature: ModelSignature { inputs: input_specs, outputs: output_specs },
            inputs,
            outputs,
            format,
            native_batch,
            batch_mode: if native_batch { BatchMode::Symbolic } else { BatchMode::Fixed },
        };
        if options.warm_up {
            let zeros = model.zero_inputs(1);
            model.run(zeros).map_err(|e| LoadError::WarmUp(e.to_string()))?;
        }
        Ok(model)
    }

    pub fn signature(&self) -> &ModelSignature {
        &self.signature
    }

    pub fn format(&self) -> ModelFormat {
        self.format
    }

    /// Whether a batch of N runs as one vectorized call (free batch dimension)
    /// rather than N calls.
    pub fn runs_batches_natively(&self) -> bool {
        self.native_batch
    }

    /// How the model takes a batch (see [`BatchMode`]).
    pub fn batch_mode(&self) -> BatchMode {
        self.batch_mode
    }

    /// Batch sizes that run a plan optimized for that exact size (see
    /// [`LoadOptions::batch_plans`]).
    pub fn specialised_batches(&self) -> Vec<usize> {
        self.plans.specialised()
    }

    /// Inputs of zeros for `batch` samples: used for warm-up.
    pub fn zero_inputs(&self, batch: usize) -> Vec<TensorData> {
        self.signature
            .inputs
            .iter()
            .map(|spec| {
                let shape: Vec<usize> = spec
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(ix, d)| match d {
                        Some(d) => *d as usize,
                        None if ix == 0 => batch,
                        None => 1,
                    })
                    .collect();
                let len = shape.iter().product();
                let values = match spec.element_type {
                    ElementType::F32 => TensorValues::F32(vec![0.0; len]),
                    ElementType::I8 => TensorValues::I8(vec![0; len]),
                    ElementType::U8 => TensorValues::U8(vec![0; len]),
                    ElementType::I32 => TensorValues::I32(vec![0; len]),
                    ElementType::I64 => TensorValues::I64(vec![0; len]),
                };
                TensorData { shape, values }
            })
            .collect()
    }

    /// Runs the model. `inputs` are in the order of `signature().inputs`;
    /// outputs come in the order of `signature().outputs`.
    pub fn run(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>, RunError> {
        self.check_inputs(&inputs)?;
        let batch = inputs.first().map(TensorData::batch_len).unwrap_or(1);
        if self.native_batch || batch <= 1 || !self.all_inputs_batched(&inputs) {
            return self.run_once(&inputs);
        }
        // Fixed batch of 1: run row by row and stack the results.
        let mut per_row = Vec::with_capacity(batch);
        for row in 0..batch {
            let row_inputs: Vec<TensorData> =
                inputs.iter().map(|t| convert::slice_rows(t, row, row + 1)).collect();
            per_row.push(self.run_once(&row_inputs)?);
        }
        convert::stack_rows(per_row).map_err(RunError::Inference)
    }

    fn all_inputs_batched(&self, inputs: &[TensorData]) -> bool {
        // A fixed-batch model given N rows: every input must carry the rows
        // on its first axis, where the model expects 1.
        self.signature.inputs.iter().zip(inputs).all(|(spec, t)| {
            matches!(spec.shape.first(), Some(Some(1))) && t.shape.len() == spec.shape.len()
        })
    }

    fn check_inputs(&self, inputs: &[TensorData]) -> Result<(), RunError> {
        let specs = &self.signature.inputs;
        if specs.len() != inputs.len() {
            return Err(RunError::InputCount { expected: specs.len(), got: inputs.len() });
        }
        for (spec, t) in specs.iter().zip(inputs) {
            if spec.element_type != t.element_type() {
                return Err(RunError::ElementType {
                    name: spec.name.clone(),
                    expected: spec.element_type,
                    got: t.element_type(),
                });
            }
            let rank_ok = spec.shape.len() == t.shape.len();
            let dims_ok = rank_ok
                && spec.shape.iter().zip(&t.shape).enumerate().all(|(ix, (want, got))| match want {
                    None => true,
                    // A fixed batch of 1 accepts any batch: it runs row by row.
                    Some(1) if ix == 0 && !self.native_batch => true,
                    Some(w) => *w as usize == *got,
                });
            if !dims_ok {
                return Err(RunError::Shape {
                    name: spec.name.clone(),
                    expected: convert::shape_display(&spec.shape),
                    got: t.shape.clone(),
                });
            }
            if t.shape.iter().product::<usize>() == 0 {
                return Err(RunError::Shape {
                    name: spec.name.clone(),
                    expected: "no empty dimension".into(),
                    got: t.shape.clone(),
                });
            }
        }
        Ok(())
    }

    /// The plan for these inputs' batch and the inputs converted to what
    /// that plan takes: the first half of every call (and of a profile).
    fn prepare_call(&self, inputs: &[TensorData]) -> Result<(Arc<plans::PlanSlot>, TVec<TValue>), RunError> {
        let slot = match inputs.first() {
            Some(first) if self.native_batch => self.plans.for_batch(first.batch_len()),
            _ => self.plans.generic().clone(),
        };
        let inference = |e: TractError| RunError::Inference(format!("{e:#}"));
        let mut tract_inputs: TVec<TValue> = TVec::with_capacity(inputs.len());
        for (ix, t) in inputs.iter().enumerate() {
            let fact = slot.plan.model().input_fact(ix).map_err(inference)?;
            let tensor = convert::to_tract(t, fact.datum_type, &self.inputs[ix]).map_err(inference)?;
            tract_inputs.push(tensor.into_tvalue());
        }
        Ok((slot, tract_inputs))
    }

    fn run_once(&self, inputs: &[TensorData]) -> Result<Vec<TensorData>, RunError> {
        let (slot, tract_inputs) = self.prepare_call(inputs)?;
        let mut state = slot.take_state().map_err(|e| RunError::Inference(format!("{e:#}")))?;
        // A panic in tract (an operator meeting values its checks did not
        // foresee) fails this call only; the state it left half-written is
        // dropped below like any failed one.
        let result = catch_unwind(AssertUnwindSafe(|| state.run(tract_inputs)))
            .unwrap_or_else(|panic| Err(anyhow::anyhow!("{}", panic_reason(panic))));
        // A state that errored may hold half-written values; drop it rather
        // than reuse it.
        let outputs = match result {
            Ok(outputs) => {
                slot.give_back(state);
                outputs
            }
            Err(e) => return Err(RunError::Inference(format!("{e:#}"))),
        };
        outputs
            .iter()
            .enumerate()
            .map(|(ix, v)| convert::from_tract(v, &self.outputs[ix]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RunError::Inference(format!("{e:#}")))
    }
}

/// A file under `fixtures/`, for unit tests.
#[cfg(test)]
pub(crate) fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

/// tract's optimization, then ours (see [`quant_fusion`]).
fn optimize(decluttered: TypedModel) -> TractResult<TypedModel> {
    Ok(quant_fusion::fuse(decluttered.into_optimized()?))
}

/// The message of a caught panic.
fn panic_reason(panic: Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("tract panicked: {msg}")
}

fn prepare_err(e: TractError) -> LoadError {
    LoadError::Prepare { reason: format!("{e:#}") }
}

/// A model as a format loader hands it over: the typed graph plus what the
/// runtime does at the edges (e.g. quantizing float inputs for an int8 TFLite).
pub(crate) struct PreparedModel {
    pub model: TypedModel,
    pub inputs: Vec<InputAdapter>,
    pub outputs: Vec<OutputAdapter>,
}
