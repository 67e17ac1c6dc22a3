//! Rewrites a TFLite flatbuffer, as TensorFlow's converter publishes it, into
//! one tract-tflite 0.23 loads, before tract sees it.
//!
//! tract-tflite reads a fixed set of builtin operators (see
//! [`TRACT_BUILTINS`]) and refuses the rest deep inside its reader, with a
//! dump of the flatbuffer operator. Published models use a few operators
//! outside that set in ways that do not need them at all:
//!
//! - **float16 weights** (`Optimize.DEFAULT` + `supported_types=[float16]`):
//!   every weight is a FLOAT16 constant followed by a `DEQUANTIZE` to
//!   float32. The rewrite computes the float32 constant once
//!   ([`Graph::fold_constant_dequantize`]); the same applies to a
//!   `DEQUANTIZE` of an int8/uint8/int16/int32 quantized constant.
//! - **full-integer models with a float interface**: the graph input is
//!   float32 and goes through `QUANTIZE`, the graph output comes out of a
//!   `DEQUANTIZE`. The rewrite drops both and hands the scale and zero point
//!   to the runtime, which quantizes inputs and dequantizes outputs itself
//!   ([`InputAdapter::Quantize`], [`OutputAdapter::Dequantize`]). The graph
//!   edges keep the names the caller knows.
//! - **`PRELU`** (float32) becomes `max(x, 0) + alpha * min(x, 0)` in
//!   `MAXIMUM`, `MINIMUM`, `MUL` and `ADD`.
//! - a quantized `FULLY_CONNECTED` with per-channel weights (current
//!   converters' Dense layers) becomes a 1x1 `CONV_2D` between two
//!   `RESHAPE`s: tract-tflite's fully-connected takes one weight scale.
//! - negative reduction axes are counted from the start.
//! - a `FULLY_CONNECTED` / `CONV_2D` / `DEPTHWISE_CONV_2D` without bias
//!   (input index -1, Keras `use_bias=False`) gets a zero bias: tract indexes
//!   the tensor list with -1 and panics otherwise.
//!
//! Any other operator tract lacks is refused up front, naming the operator,
//! its index and its output tensor ([`LoadError::UnsupportedOperator`]).
//! A model that needs none of this is handed to tract byte for byte (the fast
//! path): the checks only read the flatbuffer.
//!
//! The rewritten model keeps the first subgraph only (tract reads no other),
//! the tensors and buffers that subgraph still uses, the operator codes, the
//! model version and description. It drops the metadata and signature
//! definitions: tract reads neither, and signature definitions point at
//! tensor indices the rewrite renumbers.

use std::borrow::Cow;
use std::collections::HashSet;

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use tract_tflite::prelude::f16;
use tract_tflite::tflite::{self as fb, BuiltinOperator, BuiltinOptions, TensorType};

use super::{EdgeQuantization, InputAdapter, LoadError, OutputAdapter};
use crate::tensor::ElementType;

/// Largest `.tflite` file accepted, in bytes. Outpost targets ARM devices
/// with a few hundred MB of RAM; while loading, the original bytes, the
/// rewritten ones and tract's own copy of every constant coexist.
pub const MAX_MODEL_BYTES: usize = 256 * 1024 * 1024;
/// Largest rewritten model. Widening float16 or int8 constants to float32
/// grows the file (by 2x or 4x for the constants concerned); flatbuffers
/// cannot address more than 2 GiB and its builder panics past that.
pub const MAX_REWRITTEN_BYTES: usize = 1024 * 1024 * 1024;
/// Most tensors in the main subgraph.
pub const MAX_TENSORS: usize = 100_000;
/// Most operators in the main subgraph.
pub const MAX_OPERATORS: usize = 100_000;
/// Most buffers in the model.
pub const MAX_BUFFERS: usize = 100_000;
/// Most entries in the operator code table.
pub const MAX_OPERATOR_CODES: usize = 4096;
/// Highest tensor rank accepted (TFLite kernels stop at 6).
pub const MAX_RANK: usize = 8;

/// Builtin operators tract-tflite 0.23.9 has a reader for: every
/// `reg.reg_to_tract(BuiltinOperator::…)` in its `src/ops/*.rs`. Checked up
/// front so that an unsupported operator is named clearly instead of failing
/// deep inside tract with a dump of the flatbuffer.
pub const TRACT_BUILTINS: &[BuiltinOperator] = &[
    // ops/mod.rs
    BuiltinOperator::SELECT,
    BuiltinOperator::SELECT_V2,
    // ops/array.rs
    BuiltinOperator::BROADCAST_TO,
    BuiltinOperator::CONCATENATION,
    BuiltinOperator::EXPAND_DIMS,
    BuiltinOperator::PAD,
    BuiltinOperator::PADV2,
    BuiltinOperator::RESHAPE,
    BuiltinOperator::SHAPE,
    BuiltinOperator::SLICE,
    BuiltinOperator::SQUEEZE,
    BuiltinOperator::STRIDED_SLICE,
    BuiltinOperator::TRANSPOSE,
    // ops/cnn.rs
    BuiltinOperator::AVERAGE_POOL_2D,
    BuiltinOperator::MAX_POOL_2D,
    BuiltinOperator::CONV_2D,
    BuiltinOperator::DEPTHWISE_CONV_2D,
    // ops/element_wise.rs
    BuiltinOperator::ABS,
    BuiltinOperator::CEIL,
    BuiltinOperator::COS,
    BuiltinOperator::EXP,
    BuiltinOperator::FLOOR,
    BuiltinOperator::HARD_SWISH,
    BuiltinOperator::LEAKY_RELU,
    BuiltinOperator::LOG,
    BuiltinOperator::LOGICAL_NOT,
    BuiltinOperator::SIN,
    BuiltinOperator::LOGISTIC,
    BuiltinOperator::SQRT,
    BuiltinOperator::SQUARE,
    BuiltinOperator::RSQRT,
    BuiltinOperator::TANH,
    // ops/math.rs
    BuiltinOperator::ADD,
    BuiltinOperator::SUB,
    BuiltinOperator::MUL,
    BuiltinOperator::DIV,
    BuiltinOperator::MAXIMUM,
    BuiltinOperator::MINIMUM,
    BuiltinOperator::EQUAL,
    BuiltinOperator::NOT_EQUAL,
    BuiltinOperator::LESS,
    BuiltinOperator::LESS_EQUAL,
    BuiltinOperator::GREATER,
    BuiltinOperator::GREATER_EQUAL,
    BuiltinOperator::LOGICAL_OR,
    BuiltinOperator::LOGICAL_AND,
    // ops/nn.rs
    BuiltinOperator::BATCH_MATMUL,
    BuiltinOperator::FULLY_CONNECTED,
    BuiltinOperator::MEAN,
    BuiltinOperator::SOFTMAX,
    BuiltinOperator::RESIZE_BILINEAR,
    BuiltinOperator::RESIZE_NEAREST_NEIGHBOR,
    BuiltinOperator::RELU,
    BuiltinOperator::RELU6,
    BuiltinOperator::REDUCE_MAX,
    BuiltinOperator::REDUCE_MIN,
    BuiltinOperator::SUM,
    BuiltinOperator::REDUCE_PROD,
];

/// Operators the rewrite removes or replaces, when used as described in the
/// module documentation.
pub const REWRITTEN_BUILTINS: &[BuiltinOperator] =
    &[BuiltinOperator::QUANTIZE, BuiltinOperator::DEQUANTIZE, BuiltinOperator::PRELU];

/// A model ready for tract-tflite, and what the runtime does at its edges.
pub(crate) struct Prepared<'a> {
    /// The original bytes when nothing needed rewriting.
    pub bytes: Cow<'a, [u8]>,
    /// One per graph input, in the model's order.
    pub inputs: Vec<InputAdapter>,
    /// One per graph output, in the model's order.
    pub outputs: Vec<OutputAdapter>,
    /// What the rewrite did, for the load log. Empty on the fast path.
    pub changes: Vec<String>,
    /// Names of the graph outputs, in order: tract names an output after its
    /// last node, which may carry a suffix (`name.relu` for a fused
    /// activation), so the loader labels the outputs with these.
    pub output_names: Vec<String>,
    /// Quantized `SOFTMAX` operators, by output tensor name (the name of the
    /// tract node), with the quantization of their output. tract-tflite
    /// 0.23.9 gives a quantized softmax the quantization of its *input* and
    /// tract's kernel ignores the output zero point; the loader patches the
    /// node with these (see `tflite::fix_quantized_softmax`).
    pub quantized_softmax: Vec<(String, EdgeQuantization)>,
}

/// Checks `bytes` and rewrites the model if tract-tflite needs it to.
pub(crate) fn prepare(bytes: &[u8]) -> Result<Prepared<'_>, LoadError> {
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(malformed(format!(
            "the model is {} bytes, above the {} bytes Outpost accepts",
            bytes.len(),
            MAX_MODEL_BYTES
        )));
    }
    let model = fb::root_as_model(bytes).map_err(|e| malformed(format!("{e}")))?;
    let mut graph = Graph::read(&model)?;
    let mut inputs = vec![InputAdapter::Direct; graph.inputs.len()];
    let mut outputs = vec![OutputAdapter::Direct; graph.outputs.len()];
    graph.fold_constant_dequantize()?;
    graph.widen_float16_constants()?;
    graph.move_edge_quantize(&mut inputs)?;
    graph.move_edge_dequantize(&mut outputs)?;
    graph.decompose_prelu();
    graph.fill_missing_bias()?;
    graph.per_channel_fully_connected_as_conv();
    graph.normalize_reduction_axes()?;
    graph.check_for_tract()?;
    let output_names = graph.outputs.iter().map(|t| graph.tensors[*t].name.to_string()).collect();
    let quantized_softmax = graph.quantized_softmax()?;
    if graph.changes.is_empty() {
        return Ok(Prepared {
            bytes: Cow::Borrowed(bytes),
            inputs,
            outputs,
            changes: vec![],
            output_names,
            quantized_softmax,
        });
    }
    graph.drop_unused();
    let rewritten = graph.write()?;
    Ok(Prepared {
        bytes: Cow::Owned(rewritten),
        inputs,
        outputs,
        changes: graph.changes,
        output_names,
        quantized_softmax,
    })
}

fn malformed(reason: impl Into<String>) -> LoadError {
    LoadError::Parse { format: "TFLite", reason: reason.into() }
}

fn refused(reason: impl Into<String>) -> LoadError {
    LoadError::Prepare { reason: reason.into() }
}

/// One entry of the operator code table, resolved to a single code.
#[derive(Clone, Debug)]
struct OpCode<'a> {
    code: BuiltinOperator,
    custom: Option<&'a str>,
    version: i32,
}

impl OpCode<'_> {
    fn name(&self) -> String {
        if self.code == BuiltinOperator::CUSTOM {
            format!("CUSTOM({})", self.custom.unwrap_or("?"))
        } else {
            op_name(self.code)
        }
    }
}

fn op_name(code: BuiltinOperator) -> String {
    code.variant_name().map(str::to_string).unwrap_or_else(|| format!("BUILTIN_{}", code.0))
}

#[derive(Clone, Debug, PartialEq)]
struct Quant {
    scale: Option<Vec<f32>>,
    zero_point: Option<Vec<i64>>,
    min: Option<Vec<f32>>,
    max: Option<Vec<f32>>,
    quantized_dimension: i32,
}

impl Quant {
    /// Scale and zero point, when both are there (tract ignores the
    /// parameters otherwise).
    fn params(&self) -> Option<(&[f32], &[i64])> {
        match (&self.scale, &self.zero_point) {
            (Some(s), Some(z)) => Some((s, z)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Tensor<'a> {
    name: Cow<'a, str>,
    shape: Vec<i32>,
    shape_signature: Option<Vec<i32>>,
    dtype: TensorType,
    buffer: usize,
    quant: Option<Quant>,
    is_variable: bool,
    has_rank: bool,
}

impl Tensor<'_> {
    /// Per-tensor scale and zero point, if the tensor has exactly those.
    fn per_tensor_params(&self) -> Option<(f32, i64)> {
        let (s, z) = self.quant.as_ref()?.params()?;
        match (s, z) {
            ([s], [z]) => Some((*s, *z)),
            _ => None,
        }
    }

    fn is_quantized(&self) -> bool {
        self.quant.as_ref().and_then(Quant::params).is_some()
    }
}

/// Options of an operator in the rewritten model.
#[derive(Clone, Debug)]
enum Options {
    /// Copied from the source operator.
    Source,
    /// Made by the rewrite, fused activation NONE.
    Add,
    Mul,
    MaximumMinimum,
    /// Reshape to this shape (also given as a constant second input).
    Reshape(Vec<i32>),
    /// 1x1 convolution, stride 1, VALID padding.
    Conv2D(fb::ActivationFunctionType),
}

#[derive(Clone, Debug)]
struct Operator<'a> {
    /// Index into the operator code table.
    opcode: usize,
    /// `None` is TFLite's -1: an omitted optional input.
    inputs: Vec<Option<usize>>,
    outputs: Vec<usize>,
    options: Options,
    source: Option<fb::Operator<'a>>,
    /// Index of the operator in the source model (for a decomposed operator,
    /// the one it replaces): error messages point there.
    origin: usize,
}

/// The main subgraph of a model, as plain data the passes can edit.
struct Graph<'a> {
    version: u32,
    description: Option<&'a str>,
    subgraph_name: Option<&'a str>,
    opcodes: Vec<OpCode<'a>>,
    /// Index 0 is TFLite's empty sentinel. `None` = no data (not a constant).
    buffers: Vec<Option<Cow<'a, [u8]>>>,
    tensors: Vec<Tensor<'a>>,
    ops: Vec<Operator<'a>>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// What the passes changed. Empty means the original bytes are fine.
    changes: Vec<String>,
}

fn element_count(shape: &[i32]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, d| usize::try_from(*d).ok().and_then(|d| acc.checked_mul(d)))
}

fn tensor_index(ix: i32, count: usize, what: &str) -> Result<usize, LoadError> {
    usize::try_from(ix)
        .ok()
        .filter(|ix| *ix < count)
        .ok_or_else(|| malformed(format!("{what} refers to tensor {ix}, the subgraph has {count}")))
}

/// Types tract-tflite turns into tensors (`tensors.rs`): it maps STRING,
/// RESOURCE and VARIANT too, then panics on their constants.
fn tract_reads_type(t: TensorType) -> bool {
    matches!(
        t,
        TensorType::FLOAT32
            | TensorType::FLOAT16
            | TensorType::FLOAT64
            | TensorType::INT8
            | TensorType::INT16
            | TensorType::INT32
            | TensorType::INT64
            | TensorType::UINT8
            | TensorType::UINT16
            | TensorType::UINT32
            | TensorType::UINT64
            | TensorType::BOOL
    )
}

fn type_name(t: TensorType) -> String {
    t.variant_name().map(str::to_string).unwrap_or_else(|| format!("type {}", t.0))
}

impl<'a> Graph<'a> {
    fn read(model: &fb::Model<'a>) -> Result<Graph<'a>, LoadError> {
        let subgraphs = model.subgraphs().ok_or_else(|| malformed("the model has no subgraph"))?;
        if subgraphs.is_empty() {
            return Err(malformed("the model has no subgraph"));
        }
        let main = subgraphs.get(0);

        let codes = model.operator_codes().map(|v| v.iter().collect::<Vec<_>>()).unwrap_or_default();
        if codes.len() > MAX_OPERATOR_CODES {
            return Err(malformed(format!(
                "{} operator codes, above the limit of {MAX_OPERATOR_CODES}",
                codes.len()
            )));
        }
        let mut opcodes = Vec::with_capacity(codes.len());
        for (ix, oc) in codes.iter().enumerate() {
            // The schema moved builtin codes past 127 into `builtin_code`,
            // leaving 127 as a placeholder in the old i8 field; old files only
            // have the i8. tract reads them this way: refuse files where the
            // two disagree rather than guess which one tract would honour.
            let deprecated = i32::from(oc.deprecated_builtin_code());
            let builtin = oc.builtin_code().0;
            let code = if deprecated == BuiltinOperator::PLACEHOLDER_FOR_GREATER_OP_CODES.0 {
                builtin
            } else if deprecated < 0 || (builtin != 0 && builtin != deprecated) {
                return Err(malformed(format!(
                    "operator code {ix} is inconsistent (builtin_code {builtin}, deprecated_builtin_code {deprecated})"
                )));
            } else {
                deprecated
            };
            opcodes.push(OpCode {
                code: BuiltinOperator(code),
                custom: oc.custom_code(),
                version: oc.version(),
            });
        }

        let flat_buffers = model.buffers().map(|v| v.iter().collect::<Vec<_>>()).unwrap_or_default();
        if flat_buffers.len() > MAX_BUFFERS {
            return Err(malformed(format!(
                "{} buffers, above the limit of {MAX_BUFFERS}",
                flat_buffers.len()
            )));
        }
        let mut buffers: Vec<Option<Cow<'a, [u8]>>> =
            flat_buffers.iter().map(|b| b.data().map(|d| Cow::Borrowed(d.bytes()))).collect();

        let flat_tensors = main.tensors().ok_or_else(|| malformed("the main subgraph has no tensor list"))?;
        if flat_tensors.len() > MAX_TENSORS {
            return Err(malformed(format!(
                "{} tensors, above the limit of {MAX_TENSORS}",
                flat_tensors.len()
            )));
        }
        let tensor_count = flat_tensors.len();
        let mut changes = vec![];
        let mut shapeless = vec![];
        let mut tensors = Vec::with_capacity(tensor_count);
        for (ix, t) in flat_tensors.iter().enumerate() {
            let buffer = t.buffer() as usize;
            if buffer != 0 && buffer >= buffers.len() {
                return Err(malformed(format!(
                    "tensor {ix} refers to buffer {buffer}, the model has {}",
                    buffers.len()
                )));
            }
            if t.sparsity().is_some() {
                return Err(refused(format!(
                    "tensor {ix} ({:?}) is sparse, which tract does not read",
                    t.name().unwrap_or("")
                )));
            }
            let quant = match t.quantization() {
                Some(q) if q.details_type() != fb::QuantizationDetails::NONE => {
                    return Err(refused(format!(
                        "tensor {ix} ({:?}) uses custom quantization, which tract does not read",
                        t.name().unwrap_or("")
                    )))
                }
                Some(q) => Some(Quant {
                    scale: q.scale().map(|v| v.iter().collect()),
                    zero_point: q.zero_point().map(|v| v.iter().collect()),
                    min: q.min().map(|v| v.iter().collect()),
                    max: q.max().map(|v| v.iter().collect()),
                    quantized_dimension: q.quantized_dimension(),
                }),
                None => None,
            };
            let shape: Option<Vec<i32>> = t.shape().map(|v| v.iter().collect());
            if shape.as_ref().is_some_and(|s| s.len() > MAX_RANK) {
                return Err(refused(format!(
                    "tensor {ix} ({:?}) has rank above {MAX_RANK}",
                    t.name().unwrap_or("")
                )));
            }
            tensors.push(Tensor {
                name: match t.name() {
                    Some(name) => Cow::Borrowed(name),
                    // tract unwraps the name; give one rather than panic.
                    None => Cow::Owned(format!("tensor_{ix}")),
                },
                // Normalised below for the tensors in use.
                shape: shape.clone().unwrap_or_default(),
                shape_signature: t.shape_signature().map(|v| v.iter().collect()),
                dtype: t.type_(),
                buffer,
                quant,
                is_variable: t.is_variable(),
                has_rank: t.has_rank(),
            });
            if t.name().is_none() || shape.is_none() {
                // Marked as a change only if the tensor is used, see below.
                changes.push(ix);
            }
            if shape.is_none() {
                shapeless.push(ix);
            }
        }

        let flat_ops = main.operators().map(|v| v.iter().collect::<Vec<_>>()).unwrap_or_default();
        if flat_ops.len() > MAX_OPERATORS {
            return Err(malformed(format!(
                "{} operators, above the limit of {MAX_OPERATORS}",
                flat_ops.len()
            )));
        }
        let mut ops = Vec::with_capacity(flat_ops.len());
        for (ix, op) in flat_ops.iter().enumerate() {
            let opcode = op.opcode_index() as usize;
            if opcode >= opcodes.len() {
                return Err(malformed(format!(
                    "operator {ix} uses operator code {opcode}, the model has {}",
                    opcodes.len()
                )));
            }
            let what = format!("operator {ix}");
            let inputs = op
                .inputs()
                .map(|v| v.iter().collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|t| if t == -1 { Ok(None) } else { tensor_index(t, tensor_count, &what).map(Some) })
                .collect::<Result<Vec<_>, _>>()?;
            let outputs = op
                .outputs()
                .map(|v| v.iter().collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|t| tensor_index(t, tensor_count, &what))
                .collect::<Result<Vec<_>, _>>()?;
            ops.push(Operator {
                opcode,
                inputs,
                outputs,
                options: Options::Source,
                source: Some(*op),
                origin: ix,
            });
        }

        let inputs = main
            .inputs()
            .ok_or_else(|| malformed("the main subgraph has no input list"))?
            .iter()
            .map(|t| tensor_index(t, tensor_count, "a graph input"))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = main
            .outputs()
            .ok_or_else(|| malformed("the main subgraph has no output list"))?
            .iter()
            .map(|t| tensor_index(t, tensor_count, "a graph output"))
            .collect::<Result<Vec<_>, _>>()?;

        let mut graph = Graph {
            version: model.version(),
            description: model.description(),
            subgraph_name: main.name(),
            opcodes,
            buffers: std::mem::take(&mut buffers),
            tensors,
            ops,
            inputs,
            outputs,
            changes: vec![],
        };
        // A scalar shape is harmless on an operator's output (tract computes
        // its own), not on an input the caller must feed.
        if let Some(t) = graph.inputs.iter().find(|t| shapeless.contains(t)) {
            return Err(refused(format!("graph input {} has no shape", graph.tensor_label(*t))));
        }
        let used = graph.used_tensors();
        if changes.iter().any(|ix| used[*ix]) {
            graph.changes.push("named unnamed tensors and gave shapeless tensors a scalar shape".into());
        }
        graph.normalize_used_tensors(&used)?;
        Ok(graph)
    }

    /// Tensors an operator or the graph interface refers to.
    fn used_tensors(&self) -> Vec<bool> {
        let mut used = vec![false; self.tensors.len()];
        let op_tensors = self.ops.iter().flat_map(|op| op.inputs.iter().flatten().chain(&op.outputs));
        for &t in op_tensors.chain(&self.inputs).chain(&self.outputs) {
            if let Some(u) = used.get_mut(t) {
                *u = true;
            }
        }
        used
    }

    /// Fixes or refuses what tract-tflite would panic on, for the tensors
    /// tract will read.
    fn normalize_used_tensors(&mut self, used: &[bool]) -> Result<(), LoadError> {
        let mut stripped = 0;
        let mut emptied = 0;
        for (ix, t) in self.tensors.iter_mut().enumerate() {
            if !used.get(ix).copied().unwrap_or(false) {
                continue;
            }
            if !tract_reads_type(t.dtype) {
                return Err(refused(format!(
                    "tensor {ix} ({:?}) has element type {}, which tract does not read",
                    t.name,
                    type_name(t.dtype)
                )));
            }
            if let Some(q) = &t.quant {
                if let Some((scale, zp)) = q.params() {
                    let is_float =
                        matches!(t.dtype, TensorType::FLOAT32 | TensorType::FLOAT16 | TensorType::FLOAT64);
                    if scale.is_empty() || zp.is_empty() || is_float {
                        // tract reads element 0 of both vectors and
                        // quantizes the element type with them: empty
                        // vectors and float tensors with parameters make it
                        // panic, and neither carries meaning.
                        t.quant = None;
                        stripped += 1;
                    } else if !matches!(t.dtype, TensorType::INT8 | TensorType::UINT8 | TensorType::INT32) {
                        return Err(refused(format!(
                            "tensor {ix} ({:?}) is quantized {}, tract only reads quantized int8, uint8 and int32",
                            t.name,
                            type_name(t.dtype)
                        )));
                    } else if scale.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                        return Err(malformed(format!(
                            "tensor {ix} ({:?}) has a quantization scale that is not a positive number",
                            t.name
                        )));
                    }
                }
            }
            // A buffer with an empty data vector means "no data" to TFLite,
            // but tract builds a constant of it and fails on the size.
            if t.buffer != 0
                && self.buffers.get(t.buffer).is_some_and(|b| b.as_ref().is_some_and(|d| d.is_empty()))
                && element_count(&t.shape) != Some(0)
            {
                t.buffer = 0;
                emptied += 1;
            }
        }
        if stripped > 0 {
            self.changes.push(format!("dropped meaningless quantization parameters of {stripped} tensor(s)"));
        }
        if emptied > 0 {
            self.changes.push(format!("detached {emptied} tensor(s) from empty buffers"));
        }
        Ok(())
    }

    fn code(&self, op: &Operator) -> BuiltinOperator {
        self.opcodes.get(op.opcode).map(|c| c.code).unwrap_or(BuiltinOperator(-1))
    }

    /// Whether the tensor is a constant (has data, is not fed by the caller).
    fn constant_data(&self, t: usize) -> Option<&[u8]> {
        let tensor = self.tensors.get(t)?;
        if tensor.buffer == 0 || self.inputs.contains(&t) {
            return None;
        }
        self.buffers.get(tensor.buffer)?.as_deref()
    }

    fn consumers(&self, t: usize) -> Vec<usize> {
        (0..self.ops.len()).filter(|ix| self.ops[*ix].inputs.contains(&Some(t))).collect()
    }

    fn producer(&self, t: usize) -> Option<usize> {
        self.ops.iter().position(|op| op.outputs.contains(&t))
    }

    fn add_buffer(&mut self, data: Vec<u8>) -> usize {
        self.buffers.push(Some(Cow::Owned(data)));
        self.buffers.len() - 1
    }

    /// Makes `t` a float32 constant holding `values`. The tensor gets a
    /// buffer of its own: others may share the old one.
    fn set_f32_constant(&mut self, t: usize, values: &[f32]) {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let buffer = self.add_buffer(data);
        if let Some(tensor) = self.tensors.get_mut(t) {
            tensor.buffer = buffer;
            tensor.dtype = TensorType::FLOAT32;
            tensor.quant = None;
        }
    }

    fn tensor_label(&self, t: usize) -> String {
        self.tensors.get(t).map(|t| format!("{:?}", t.name)).unwrap_or_else(|| format!("#{t}"))
    }

    /// How an error names an operator: its index in the source model and the
    /// tensor it produces (tract names its nodes after that tensor).
    fn node_label(&self, op: &Operator) -> String {
        match op.outputs.first() {
            Some(t) => format!("operator #{} -> {}", op.origin, self.tensor_label(*t)),
            None => format!("operator #{}", op.origin),
        }
    }

    /// `DEQUANTIZE` of a constant: computes the float32 constant once.
    fn fold_constant_dequantize(&mut self) -> Result<(), LoadError> {
        let mut folded = 0;
        let mut keep = Vec::with_capacity(self.ops.len());
        for op in std::mem::take(&mut self.ops) {
            let foldable = match (op.inputs.as_slice(), op.outputs.as_slice()) {
                ([Some(input)], [output])
                    if self.code(&op) == BuiltinOperator::DEQUANTIZE
                        && !self.outputs.contains(output)
                        && self.tensors.get(*output).map(|t| t.dtype) == Some(TensorType::FLOAT32) =>
                {
                    self.constant_data(*input).map(|data| (*input, *output, data))
                }
                _ => None,
            };
            let Some((input, output, data)) = foldable else {
                keep.push(op);
                continue;
            };
            let tensor = &self.tensors[input];
            let values = dequantize_constant(tensor, data).map_err(|reason| {
                refused(format!(
                    "cannot fold DEQUANTIZE ({}) of constant {:?}: {reason}",
                    self.node_label(&op),
                    tensor.name
                ))
            })?;
            self.set_f32_constant(output, &values);
            folded += 1;
        }
        self.ops = keep;
        if folded > 0 {
            self.changes.push(format!("folded {folded} DEQUANTIZE of constants into float32 constants"));
        }
        Ok(())
    }

    /// Float16 constants read directly by an operator tract supports: tract
    /// would compute in mixed precision, or refuse. Widened to float32.
    fn widen_float16_constants(&mut self) -> Result<(), LoadError> {
        let mut targets = vec![];
        for op in &self.ops {
            if !TRACT_BUILTINS.contains(&self.code(op)) {
                continue;
            }
            for t in op.inputs.iter().flatten() {
                if self.tensors[*t].dtype == TensorType::FLOAT16
                    && self.constant_data(*t).is_some()
                    && !targets.contains(t)
                {
                    targets.push(*t);
                }
            }
        }
        for t in &targets {
            let data = self.constant_data(*t).unwrap_or_default();
            let values = dequantize_constant(&self.tensors[*t], data).map_err(|reason| {
                refused(format!("cannot widen float16 constant {}: {reason}", self.tensor_label(*t)))
            })?;
            self.set_f32_constant(*t, &values);
        }
        if !targets.is_empty() {
            self.changes.push(format!("widened {} float16 constant(s) to float32", targets.len()));
        }
        Ok(())
    }

    /// The runtime-side quantization of an int8/uint8 edge tensor, if it is
    /// quantized per tensor.
    fn edge_quantization(&self, t: usize) -> Option<EdgeQuantization> {
        let tensor = self.tensors.get(t)?;
        let (element_type, lo, hi) = match tensor.dtype {
            TensorType::INT8 => (ElementType::I8, -128, 127),
            TensorType::UINT8 => (ElementType::U8, 0, 255),
            _ => return None,
        };
        let (scale, zero_point) = tensor.per_tensor_params()?;
        if !(lo..=hi).contains(&zero_point) || !scale.is_finite() || scale <= 0.0 {
            return None;
        }
        Some(EdgeQuantization { scale, zero_point: zero_point as i32, element_type })
    }

    /// A float32 graph input whose only reader is a `QUANTIZE`: the graph
    /// takes the quantized tensor, the runtime quantizes.
    fn move_edge_quantize(&mut self, adapters: &mut [InputAdapter]) -> Result<(), LoadError> {
        let mut removed = vec![];
        for pos in 0..self.inputs.len() {
            let input = self.inputs[pos];
            if self.tensors[input].dtype != TensorType::FLOAT32 || self.outputs.contains(&input) {
                continue;
            }
            let [reader] = self.consumers(input)[..] else { continue };
            let op = &self.ops[reader];
            if self.code(op) != BuiltinOperator::QUANTIZE || op.inputs.len() != 1 {
                continue;
            }
            let [quantized] = op.outputs[..] else { continue };
            if self.inputs.contains(&quantized) || self.outputs.contains(&quantized) {
                continue;
            }
            let Some(q) = self.edge_quantization(quantized) else { continue };
            // The caller keeps addressing the input by its published name.
            self.tensors[quantized].name = self.tensors[input].name.clone();
            self.inputs[pos] = quantized;
            if let Some(a) = adapters.get_mut(pos) {
                *a = InputAdapter::Quantize(q);
            }
            removed.push(reader);
            self.changes.push(format!(
                "input {}: QUANTIZE moved to the runtime (scale {}, zero point {})",
                self.tensor_label(quantized),
                q.scale,
                q.zero_point
            ));
        }
        self.remove_ops(&removed);
        Ok(())
    }

    /// A graph output made by a `DEQUANTIZE` of an int8/uint8 tensor: the
    /// graph returns the quantized tensor, the runtime dequantizes.
    fn move_edge_dequantize(&mut self, adapters: &mut [OutputAdapter]) -> Result<(), LoadError> {
        let mut removed = vec![];
        for pos in 0..self.outputs.len() {
            let output = self.outputs[pos];
            if self.outputs.iter().filter(|o| **o == output).count() != 1
                || self.tensors[output].dtype != TensorType::FLOAT32
                || !self.consumers(output).is_empty()
            {
                continue;
            }
            let Some(producer) = self.producer(output) else { continue };
            let op = &self.ops[producer];
            if self.code(op) != BuiltinOperator::DEQUANTIZE || op.outputs.len() != 1 {
                continue;
            }
            let [Some(quantized)] = op.inputs[..] else { continue };
            if self.inputs.contains(&quantized)
                || self.outputs.contains(&quantized)
                || self.constant_data(quantized).is_some()
            {
                continue;
            }
            let Some(q) = self.edge_quantization(quantized) else { continue };
            self.tensors[quantized].name = self.tensors[output].name.clone();
            self.outputs[pos] = quantized;
            if let Some(a) = adapters.get_mut(pos) {
                *a = OutputAdapter::Dequantize(q);
            }
            removed.push(producer);
            self.changes.push(format!(
                "output {}: DEQUANTIZE moved to the runtime (scale {}, zero point {})",
                self.tensor_label(quantized),
                q.scale,
                q.zero_point
            ));
        }
        self.remove_ops(&removed);
        Ok(())
    }

    fn remove_ops(&mut self, removed: &[usize]) {
        if removed.is_empty() {
            return;
        }
        let mut ix = 0;
        self.ops.retain(|_| {
            let keep = !removed.contains(&ix);
            ix += 1;
            keep
        });
    }

    fn opcode_for(&mut self, code: BuiltinOperator) -> usize {
        if let Some(ix) = self.opcodes.iter().position(|c| c.code == code && c.custom.is_none()) {
            return ix;
        }
        self.opcodes.push(OpCode { code, custom: None, version: 1 });
        self.opcodes.len() - 1
    }

    fn add_tensor(&mut self, names: &mut HashSet<String>, base: &str, like: usize) -> usize {
        let mut name = base.to_string();
        let mut n = 1;
        while names.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        names.insert(name.clone());
        let (shape, shape_signature) =
            self.tensors.get(like).map(|t| (t.shape.clone(), t.shape_signature.clone())).unwrap_or_default();
        self.tensors.push(Tensor {
            name: Cow::Owned(name),
            shape,
            shape_signature,
            dtype: TensorType::FLOAT32,
            buffer: 0,
            quant: None,
            is_variable: false,
            has_rank: false,
        });
        self.tensors.len() - 1
    }

    /// Float32 `PRELU(x, alpha)` as `max(x, 0) + alpha * min(x, 0)`. tract's
    /// binary operators broadcast numpy-style, as `PRELU` does its alpha.
    /// Quantized `PRELU` is left in place, and refused by the final check:
    /// its requantization does not map onto tract's quantized binary ops.
    fn decompose_prelu(&mut self) {
        let is_float_prelu = |g: &Graph, op: &Operator| {
            g.code(op) == BuiltinOperator::PRELU
                && matches!(op.inputs[..], [Some(_), Some(_)])
                && op.outputs.len() == 1
                && op
                    .inputs
                    .iter()
                    .flatten()
                    .chain(&op.outputs)
                    .all(|t| g.tensors[*t].dtype == TensorType::FLOAT32 && !g.tensors[*t].is_quantized())
        };
        if !self.ops.iter().any(|op| is_float_prelu(self, op)) {
            return;
        }
        let mut names: HashSet<String> = self.tensors.iter().map(|t| t.name.to_string()).collect();
        let (max, min, mul, add) = (
            self.opcode_for(BuiltinOperator::MAXIMUM),
            self.opcode_for(BuiltinOperator::MINIMUM),
            self.opcode_for(BuiltinOperator::MUL),
            self.opcode_for(BuiltinOperator::ADD),
        );
        let mut count = 0;
        let mut ops = Vec::with_capacity(self.ops.len() + 3);
        for op in std::mem::take(&mut self.ops) {
            let prelu = match (is_float_prelu(self, &op), &op.inputs[..], &op.outputs[..]) {
                (true, [Some(x), Some(alpha)], [y]) => Some((*x, *alpha, *y)),
                _ => None,
            };
            let Some((x, alpha, y)) = prelu else {
                ops.push(op);
                continue;
            };
            let base = self.tensors[y].name.to_string();
            let zero = self.add_tensor(&mut names, &format!("{base}/prelu_zero"), usize::MAX);
            let zero_buffer = self.add_buffer(0f32.to_le_bytes().to_vec());
            self.tensors[zero].buffer = zero_buffer;
            let positive = self.add_tensor(&mut names, &format!("{base}/prelu_positive"), x);
            let negative = self.add_tensor(&mut names, &format!("{base}/prelu_negative"), x);
            let scaled = self.add_tensor(&mut names, &format!("{base}/prelu_negative_scaled"), y);
            let made = |opcode, inputs: [usize; 2], output, options| Operator {
                opcode,
                inputs: inputs.iter().map(|t| Some(*t)).collect(),
                outputs: vec![output],
                options,
                source: None,
                origin: op.origin,
            };
            ops.push(made(max, [x, zero], positive, Options::MaximumMinimum));
            ops.push(made(min, [x, zero], negative, Options::MaximumMinimum));
            ops.push(made(mul, [negative, alpha], scaled, Options::Mul));
            ops.push(made(add, [positive, scaled], y, Options::Add));
            count += 1;
        }
        self.ops = ops;
        self.changes.push(format!("decomposed {count} PRELU into MAXIMUM, MINIMUM, MUL, ADD"));
    }

    /// Gives a zero bias to the linear operators that omit it.
    fn fill_missing_bias(&mut self) -> Result<(), LoadError> {
        let mut names: Option<HashSet<String>> = None;
        let mut count = 0;
        for ix in 0..self.ops.len() {
            let op = &self.ops[ix];
            let code = self.code(op);
            // Output channels: FULLY_CONNECTED and CONV_2D weights are
            // [out, ...], DEPTHWISE_CONV_2D weights are [1, h, w, out].
            let channel_axis_last = match code {
                BuiltinOperator::FULLY_CONNECTED | BuiltinOperator::CONV_2D => false,
                BuiltinOperator::DEPTHWISE_CONV_2D => true,
                _ => continue,
            };
            let (x, w) = match op.inputs[..] {
                [Some(x), Some(w)] | [Some(x), Some(w), None] => (x, w),
                _ => continue,
            };
            let label = self.node_label(op);
            let weights = &self.tensors[w];
            let channels = if channel_axis_last { weights.shape.last() } else { weights.shape.first() };
            let Some(channels) = channels.and_then(|c| usize::try_from(*c).ok()) else {
                return Err(refused(format!("{} ({label}) has weights without a shape", op_name(code))));
            };
            let input = &self.tensors[x];
            let (dtype, quant) = if input.dtype == TensorType::FLOAT32 {
                (TensorType::FLOAT32, None)
            } else if let (Some((x_scale, _)), Some((w_scales, _))) =
                (input.per_tensor_params(), weights.quant.as_ref().and_then(Quant::params))
            {
                // TFLite's int32 bias scale: input scale x weight scale, per
                // output channel when the weights are per channel.
                let scales: Vec<f32> = w_scales.iter().map(|s| s * x_scale).collect();
                let zps = vec![0i64; scales.len()];
                (
                    TensorType::INT32,
                    Some(Quant {
                        scale: Some(scales),
                        zero_point: Some(zps),
                        min: None,
                        max: None,
                        quantized_dimension: 0,
                    }),
                )
            } else {
                return Err(LoadError::UnsupportedOperator {
                    op: format!("{} without bias on {} input", op_name(code), type_name(input.dtype)),
                    node: label,
                });
            };
            // float32 and int32 both take 4 bytes.
            let bytes = channels.checked_mul(4).ok_or_else(|| refused("bias too large"))?;
            let names =
                names.get_or_insert_with(|| self.tensors.iter().map(|t| t.name.to_string()).collect());
            let out = self.ops[ix].outputs.first().copied().unwrap_or(usize::MAX);
            let base = format!(
                "{}/zero_bias",
                self.tensors.get(out).map(|t| t.name.to_string()).unwrap_or_default()
            );
            let bias = self.add_tensor(names, &base, usize::MAX);
            let buffer = self.add_buffer(vec![0u8; bytes]);
            let tensor = &mut self.tensors[bias];
            tensor.shape = vec![channels as i32];
            tensor.dtype = dtype;
            tensor.quant = quant;
            tensor.buffer = buffer;
            let op = &mut self.ops[ix];
            op.inputs.truncate(2);
            op.inputs.push(Some(bias));
            count += 1;
        }
        if count > 0 {
            self.changes.push(format!("gave {count} linear operator(s) without bias a zero bias"));
        }
        Ok(())
    }

    /// Quantized `FULLY_CONNECTED` with per-channel weights (what current
    /// converters emit for Dense layers): tract-tflite wires it as an einsum
    /// that only takes one weight scale, and fails. The same product is a
    /// 1x1 `CONV_2D`, whose per-channel quantization tract handles:
    /// `x [B, I] -> [B, 1, 1, I]`, weights `[O, I]` read as OHWI
    /// `[O, 1, 1, I]` (same bytes, same buffer), output `[B, 1, 1, O] -> [B, O]`.
    fn per_channel_fully_connected_as_conv(&mut self) {
        let mut names: Option<HashSet<String>> = None;
        let mut count = 0;
        let mut ops = Vec::with_capacity(self.ops.len());
        for op in std::mem::take(&mut self.ops) {
            let Some((x, w, b, y, activation)) = self.per_channel_fully_connected(&op) else {
                ops.push(op);
                continue;
            };
            let names =
                names.get_or_insert_with(|| self.tensors.iter().map(|t| t.name.to_string()).collect());
            let (batch, inner) = (self.tensors[x].shape[0], self.tensors[x].shape[1]);
            let outer = self.tensors[w].shape[0];
            let base = self.tensors[y].name.to_string();
            let reshaped = |g: &mut Graph<'a>,
                            names: &mut HashSet<String>,
                            like: usize,
                            suffix: &str,
                            shape: Vec<i32>| {
                let t = g.add_tensor(names, &format!("{base}/{suffix}"), like);
                let (dtype, quant) = (g.tensors[like].dtype, g.tensors[like].quant.clone());
                let tensor = &mut g.tensors[t];
                tensor.shape = shape;
                tensor.shape_signature = None;
                tensor.dtype = dtype;
                tensor.quant = quant;
                t
            };
            let shape_const =
                |g: &mut Graph<'a>, names: &mut HashSet<String>, suffix: &str, shape: &[i32]| {
                    let t = g.add_tensor(names, &format!("{base}/{suffix}"), usize::MAX);
                    let buffer = g.add_buffer(shape.iter().flat_map(|d| d.to_le_bytes()).collect());
                    let tensor = &mut g.tensors[t];
                    tensor.shape = vec![shape.len() as i32];
                    tensor.dtype = TensorType::INT32;
                    tensor.buffer = buffer;
                    t
                };
            let x4_shape = vec![batch, 1, 1, inner];
            let y4_shape = vec![batch, 1, 1, outer];
            let y2_shape = vec![batch, outer];
            let x4 = reshaped(self, names, x, "input_nhwc", x4_shape.clone());
            let x4_target = shape_const(self, names, "input_nhwc_shape", &x4_shape);
            let w4 = reshaped(self, names, w, "weights_ohwi", vec![outer, 1, 1, inner]);
            self.tensors[w4].buffer = self.tensors[w].buffer;
            let y4 = reshaped(self, names, y, "output_nhwc", y4_shape);
            let y2_target = shape_const(self, names, "output_shape", &y2_shape);
            let (reshape, conv) =
                (self.opcode_for(BuiltinOperator::RESHAPE), self.opcode_for(BuiltinOperator::CONV_2D));
            let made = |opcode, inputs: &[usize], output, options| Operator {
                opcode,
                inputs: inputs.iter().map(|t| Some(*t)).collect(),
                outputs: vec![output],
                options,
                source: None,
                origin: op.origin,
            };
            ops.push(made(reshape, &[x, x4_target], x4, Options::Reshape(x4_shape)));
            ops.push(made(conv, &[x4, w4, b], y4, Options::Conv2D(activation)));
            ops.push(made(reshape, &[y4, y2_target], y, Options::Reshape(y2_shape)));
            count += 1;
        }
        self.ops = ops;
        if count > 0 {
            self.changes
                .push(format!("rewrote {count} per-channel quantized FULLY_CONNECTED as 1x1 CONV_2D"));
        }
    }

    /// The operands of a quantized, per-channel `FULLY_CONNECTED` on a rank-2
    /// input, with its fused activation.
    fn per_channel_fully_connected(
        &self,
        op: &Operator<'a>,
    ) -> Option<(usize, usize, usize, usize, fb::ActivationFunctionType)> {
        if self.code(op) != BuiltinOperator::FULLY_CONNECTED || !matches!(op.options, Options::Source) {
            return None;
        }
        let options = op.source?.builtin_options_as_fully_connected_options()?;
        if options.weights_format() != fb::FullyConnectedOptionsWeightsFormat::DEFAULT
            || options.asymmetric_quantize_inputs()
        {
            return None;
        }
        let (x, w, b) = match op.inputs[..] {
            [Some(x), Some(w), Some(b)] => (x, w, b),
            _ => return None,
        };
        let [y] = op.outputs[..] else { return None };
        let (xt, wt, yt) = (&self.tensors[x], &self.tensors[w], &self.tensors[y]);
        let per_channel = wt.quant.as_ref().and_then(Quant::params).is_some_and(|(s, _)| s.len() > 1);
        let quantized = [xt, wt, yt]
            .iter()
            .all(|t| t.is_quantized() && matches!(t.dtype, TensorType::INT8 | TensorType::UINT8));
        let ranks = xt.shape.len() == 2 && wt.shape.len() == 2 && yt.shape.len() == 2;
        let dims =
            ranks && xt.shape[1] == wt.shape[1] && yt.shape[1] == wt.shape[0] && xt.shape[0] == yt.shape[0];
        let weights_axis_0 = wt.quant.as_ref().is_some_and(|q| q.quantized_dimension == 0);
        (per_channel && quantized && dims && weights_axis_0).then_some((
            x,
            w,
            b,
            y,
            options.fused_activation_function(),
        ))
    }

    /// tract-tflite casts reduction axes to `usize` as they are: TFLite's
    /// negative axes (counted from the end) would become huge indices.
    /// Rewrites the constant with the axes counted from the start.
    fn normalize_reduction_axes(&mut self) -> Result<(), LoadError> {
        let mut count = 0;
        for ix in 0..self.ops.len() {
            let op = &self.ops[ix];
            if !matches!(
                self.code(op),
                BuiltinOperator::MEAN
                    | BuiltinOperator::SUM
                    | BuiltinOperator::REDUCE_MAX
                    | BuiltinOperator::REDUCE_MIN
                    | BuiltinOperator::REDUCE_PROD
            ) {
                continue;
            }
            let (Some(Some(x)), Some(Some(axes))) = (op.inputs.first(), op.inputs.get(1)) else { continue };
            let (x, axes) = (*x, *axes);
            if self.tensors[axes].dtype != TensorType::INT32 {
                continue;
            }
            let Some(data) = self.constant_data(axes) else { continue };
            let values: Vec<i32> =
                data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let rank = self.tensors[x].shape.len() as i32;
            let label = self.node_label(&self.ops[ix]);
            if values.iter().any(|a| *a >= rank || *a < -rank) {
                return Err(malformed(format!("{label}: reduction axes {values:?} out of rank {rank}")));
            }
            if values.iter().all(|a| *a >= 0) {
                continue;
            }
            let fixed = values
                .iter()
                .map(|a| {
                    let axis = if *a < 0 { a + rank } else { *a };
                    if (0..rank).contains(&axis) {
                        Ok(axis)
                    } else {
                        Err(malformed(format!("{label}: reduction axis {a} out of rank {rank}")))
                    }
                })
                .collect::<Result<Vec<i32>, _>>()?;
            // A tensor of its own: the axes constant may be shared.
            let mut tensor = self.tensors[axes].clone();
            tensor.name = Cow::Owned(format!("{}/axes_from_start", tensor.name));
            tensor.buffer = self.add_buffer(fixed.iter().flat_map(|a| a.to_le_bytes()).collect());
            self.tensors.push(tensor);
            let new = self.tensors.len() - 1;
            if let Some(slot) = self.ops[ix].inputs.get_mut(1) {
                *slot = Some(new);
            }
            count += 1;
        }
        if count > 0 {
            self.changes
                .push(format!("counted the negative reduction axes of {count} operator(s) from the start"));
        }
        Ok(())
    }

    /// Everything left must be something tract-tflite reads without
    /// panicking: the operators it registers, used the way it expects.
    fn check_for_tract(&self) -> Result<(), LoadError> {
        for op in &self.ops {
            let code = self.code(op);
            let opcode = self.opcodes.get(op.opcode);
            let name = opcode.map(OpCode::name).unwrap_or_else(|| op_name(code));
            let unsupported =
                |what: String| LoadError::UnsupportedOperator { op: what, node: self.node_label(op) };
            if !TRACT_BUILTINS.contains(&code) {
                let hint = match code {
                    BuiltinOperator::QUANTIZE => {
                        " (only a float32 graph input quantized per tensor to int8/uint8, read by nothing else, is supported)"
                    }
                    BuiltinOperator::DEQUANTIZE => {
                        " (only constants, and int8/uint8 graph outputs dequantized per tensor, are supported)"
                    }
                    BuiltinOperator::PRELU => " (only float32 PRELU is supported)",
                    _ => "",
                };
                return Err(unsupported(format!("{name}{hint}")));
            }
            if op.outputs.len() != 1 {
                return Err(unsupported(format!("{name} with {} outputs", op.outputs.len())));
            }
            if op.inputs.iter().any(Option::is_none) {
                return Err(unsupported(format!("{name} with an omitted optional input")));
            }
            let input = |n: usize| op.inputs.get(n).copied().flatten();
            let Some(options) = op.source.filter(|_| matches!(op.options, Options::Source)) else {
                // Made by the rewrite, with the options tract expects.
                continue;
            };
            let options = Some(options);
            match code {
                // tract unwraps these constants and option fields.
                BuiltinOperator::RESHAPE => {
                    let from_input = input(1).is_some_and(|t| self.constant_data(t).is_some());
                    let from_options = options
                        .and_then(|o| o.builtin_options_as_reshape_options())
                        .is_some_and(|o| o.new_shape().is_some());
                    if input(1).is_some() && !from_input || input(1).is_none() && !from_options {
                        return Err(unsupported(format!("{name} to a shape computed at run time")));
                    }
                }
                BuiltinOperator::SQUEEZE => {
                    let dims = options
                        .and_then(|o| o.builtin_options_as_squeeze_options())
                        .is_some_and(|o| o.squeeze_dims().is_some());
                    if !dims {
                        return Err(unsupported(format!("{name} without squeeze_dims")));
                    }
                }
                BuiltinOperator::MEAN
                | BuiltinOperator::SUM
                | BuiltinOperator::REDUCE_MAX
                | BuiltinOperator::REDUCE_MIN
                | BuiltinOperator::REDUCE_PROD
                    if input(1).is_none_or(|t| self.constant_data(t).is_none()) =>
                {
                    return Err(unsupported(format!("{name} over axes computed at run time")));
                }
                BuiltinOperator::CONV_2D
                | BuiltinOperator::DEPTHWISE_CONV_2D
                | BuiltinOperator::AVERAGE_POOL_2D
                | BuiltinOperator::MAX_POOL_2D => {
                    // (padding, [strides, dilations or filter size]); tract
                    // divides by and iterates over these unchecked.
                    let geometry = options.and_then(|o| {
                        o.builtin_options_as_conv_2_doptions()
                            .map(|c| {
                                (
                                    c.padding(),
                                    [
                                        c.stride_h(),
                                        c.stride_w(),
                                        c.dilation_h_factor(),
                                        c.dilation_w_factor(),
                                    ],
                                )
                            })
                            .or_else(|| {
                                o.builtin_options_as_depthwise_conv_2_doptions().map(|c| {
                                    (
                                        c.padding(),
                                        [
                                            c.stride_h(),
                                            c.stride_w(),
                                            c.dilation_h_factor(),
                                            c.dilation_w_factor(),
                                        ],
                                    )
                                })
                            })
                            .or_else(|| {
                                o.builtin_options_as_pool_2_doptions().map(|p| {
                                    (
                                        p.padding(),
                                        [p.stride_h(), p.stride_w(), p.filter_height(), p.filter_width()],
                                    )
                                })
                            })
                    });
                    let Some((padding, sizes)) = geometry else {
                        return Err(unsupported(format!("{name} without its options")));
                    };
                    if !matches!(padding, fb::Padding::SAME | fb::Padding::VALID) {
                        return Err(unsupported(format!("{name} without SAME or VALID padding")));
                    }
                    if sizes.iter().any(|v| *v < 1) {
                        return Err(unsupported(format!("{name} with a stride, dilation or window below 1")));
                    }
                    let rank = |t: Option<usize>| t.map(|t| self.tensors[t].shape.len());
                    let is_conv =
                        matches!(code, BuiltinOperator::CONV_2D | BuiltinOperator::DEPTHWISE_CONV_2D);
                    if rank(input(0)) != Some(4) || is_conv && rank(input(1)) != Some(4) {
                        return Err(unsupported(format!("{name} on tensors that are not 4-D (NHWC / OHWI)")));
                    }
                }
                BuiltinOperator::SOFTMAX if input(0).is_none_or(|t| self.tensors[t].shape.is_empty()) => {
                    return Err(unsupported(format!("{name} on a scalar")));
                }
                BuiltinOperator::CONCATENATION => {
                    let rank = input(0).map(|t| self.tensors[t].shape.len() as i32).unwrap_or(0);
                    let axis =
                        options.and_then(|o| o.builtin_options_as_concatenation_options()).map(|c| c.axis());
                    if !axis.is_some_and(|a| (-rank..rank).contains(&a)) {
                        return Err(unsupported(format!(
                            "{name} along axis {axis:?} of a rank-{rank} tensor"
                        )));
                    }
                }
                _ => {}
            }
            if matches!(
                code,
                BuiltinOperator::CONV_2D
                    | BuiltinOperator::DEPTHWISE_CONV_2D
                    | BuiltinOperator::FULLY_CONNECTED
            ) {
                // Quantized linear ops: tract unwraps the parameters of the
                // input and of the weights.
                let out_quantized = op.outputs.first().is_some_and(|t| self.tensors[*t].is_quantized());
                let operands_quantized =
                    [input(0), input(1)].iter().all(|t| t.is_some_and(|t| self.tensors[t].is_quantized()));
                if out_quantized && !operands_quantized {
                    return Err(unsupported(format!(
                        "{name} with a quantized output and unquantized operands"
                    )));
                }
            }
        }
        for t in &self.inputs {
            let tensor = &self.tensors[*t];
            // Dimensions come from `shape`, fixed: an empty one makes the
            // model meaningless and some tract kernels divide by it.
            if tensor.shape.iter().any(|d| *d < 1) {
                return Err(refused(format!(
                    "graph input {:?} has shape {:?}: every dimension must be at least 1",
                    tensor.name, tensor.shape
                )));
            }
            if let Some((scale, zp)) = tensor.quant.as_ref().and_then(Quant::params) {
                // tract skips per-axis quantized inputs, which would shift
                // every input after it.
                if scale.len() > 1 || zp.len() > 1 {
                    return Err(refused(format!(
                        "graph input {:?} is quantized per axis, which tract does not take as an input",
                        tensor.name
                    )));
                }
            }
        }
        let produced: HashSet<usize> = self.ops.iter().flat_map(|op| op.outputs.iter().copied()).collect();
        for t in &self.outputs {
            if !produced.contains(t) && !self.inputs.contains(t) {
                return Err(refused(format!(
                    "graph output {} is not computed by any operator",
                    self.tensor_label(*t)
                )));
            }
        }
        Ok(())
    }

    /// Quantized `SOFTMAX` operators and the quantization their output must
    /// have, for the loader to patch tract's reading of them.
    fn quantized_softmax(&self) -> Result<Vec<(String, EdgeQuantization)>, LoadError> {
        let mut found = vec![];
        for op in &self.ops {
            if self.code(op) != BuiltinOperator::SOFTMAX {
                continue;
            }
            let (Some(Some(x)), [y]) = (op.inputs.first(), &op.outputs[..]) else { continue };
            if !self.tensors[*x].is_quantized() {
                continue;
            }
            let q = self.edge_quantization(*y).ok_or_else(|| LoadError::UnsupportedOperator {
                op: "quantized SOFTMAX without per-tensor int8/uint8 output quantization".into(),
                node: self.node_label(op),
            })?;
            found.push((self.tensors[*y].name.to_string(), q));
        }
        Ok(found)
    }

    /// Drops the tensors nothing refers to any more (e.g. the float16
    /// weights folded into float32 ones) and the buffers only they used.
    fn drop_unused(&mut self) {
        let used = self.used_tensors();
        let mut tensor_map = vec![usize::MAX; self.tensors.len()];
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (ix, t) in std::mem::take(&mut self.tensors).into_iter().enumerate() {
            if used[ix] {
                tensor_map[ix] = tensors.len();
                tensors.push(t);
            }
        }
        let mut buffer_map = vec![usize::MAX; self.buffers.len()];
        // Buffer 0 stays the empty sentinel TFLite expects.
        let mut buffers: Vec<Option<Cow<'a, [u8]>>> = vec![None];
        if let Some(first) = buffer_map.first_mut() {
            *first = 0;
        }
        let mut old = std::mem::take(&mut self.buffers);
        for t in &mut tensors {
            if t.buffer == 0 {
                continue;
            }
            if buffer_map[t.buffer] == usize::MAX {
                buffer_map[t.buffer] = buffers.len();
                buffers.push(old.get_mut(t.buffer).and_then(Option::take));
            }
            t.buffer = buffer_map[t.buffer];
        }
        let remap = |t: &mut usize| *t = tensor_map[*t];
        for op in &mut self.ops {
            op.inputs.iter_mut().flatten().for_each(remap);
            op.outputs.iter_mut().for_each(remap);
        }
        self.inputs.iter_mut().for_each(remap);
        self.outputs.iter_mut().for_each(remap);
        self.tensors = tensors;
        self.buffers = buffers;
    }

    fn write(&self) -> Result<Vec<u8>, LoadError> {
        let data_bytes: usize = self.buffers.iter().flatten().map(|b| b.len()).sum();
        // Generous per-table overhead: names, shapes, vtables.
        let estimate = data_bytes + 256 * (self.tensors.len() + self.ops.len() + self.buffers.len());
        if estimate > MAX_REWRITTEN_BYTES {
            return Err(refused(format!(
                "the rewritten model would be about {estimate} bytes, above the limit of {MAX_REWRITTEN_BYTES}"
            )));
        }
        let mut fbb = FlatBufferBuilder::with_capacity(estimate.min(MAX_REWRITTEN_BYTES));

        let mut buffers = Vec::with_capacity(self.buffers.len());
        for b in &self.buffers {
            let data = b.as_ref().map(|d| fbb.create_vector(d));
            buffers.push(fb::Buffer::create(&mut fbb, &fb::BufferArgs { data }));
        }

        let mut tensors = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let name = fbb.create_string(&t.name);
            let shape = fbb.create_vector(&t.shape);
            let shape_signature = t.shape_signature.as_ref().map(|s| fbb.create_vector(s));
            let quantization = t.quant.as_ref().map(|q| {
                let min = q.min.as_ref().map(|v| fbb.create_vector(v));
                let max = q.max.as_ref().map(|v| fbb.create_vector(v));
                let scale = q.scale.as_ref().map(|v| fbb.create_vector(v));
                let zero_point = q.zero_point.as_ref().map(|v| fbb.create_vector(v));
                fb::QuantizationParameters::create(
                    &mut fbb,
                    &fb::QuantizationParametersArgs {
                        min,
                        max,
                        scale,
                        zero_point,
                        details_type: fb::QuantizationDetails::NONE,
                        details: None,
                        quantized_dimension: q.quantized_dimension,
                    },
                )
            });
            tensors.push(fb::Tensor::create(
                &mut fbb,
                &fb::TensorArgs {
                    shape: Some(shape),
                    type_: t.dtype,
                    buffer: t.buffer as u32,
                    name: Some(name),
                    quantization,
                    is_variable: t.is_variable,
                    sparsity: None,
                    shape_signature,
                    has_rank: t.has_rank,
                    variant_tensors: None,
                },
            ));
        }

        let mut ops = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            let inputs: Vec<i32> = op.inputs.iter().map(|t| t.map(|t| t as i32).unwrap_or(-1)).collect();
            let outputs: Vec<i32> = op.outputs.iter().map(|t| *t as i32).collect();
            let inputs = fbb.create_vector(&inputs);
            let outputs = fbb.create_vector(&outputs);
            let none = fb::ActivationFunctionType::NONE;
            let (options_type, options) = match (&op.options, op.source) {
                (Options::Source, Some(src)) => {
                    copy_options(&mut fbb, &src).map_err(|what| LoadError::UnsupportedOperator {
                        op: format!("{} with {what}", self.code_name(op)),
                        node: self.node_label(op),
                    })?
                }
                (Options::Source, None) => (BuiltinOptions::NONE, None),
                (Options::Add, _) => (
                    BuiltinOptions::AddOptions,
                    Some(
                        fb::AddOptions::create(
                            &mut fbb,
                            &fb::AddOptionsArgs { fused_activation_function: none, pot_scale_int16: false },
                        )
                        .as_union_value(),
                    ),
                ),
                (Options::Mul, _) => (
                    BuiltinOptions::MulOptions,
                    Some(
                        fb::MulOptions::create(
                            &mut fbb,
                            &fb::MulOptionsArgs { fused_activation_function: none },
                        )
                        .as_union_value(),
                    ),
                ),
                (Options::MaximumMinimum, _) => (
                    BuiltinOptions::MaximumMinimumOptions,
                    Some(
                        fb::MaximumMinimumOptions::create(&mut fbb, &fb::MaximumMinimumOptionsArgs {})
                            .as_union_value(),
                    ),
                ),
                (Options::Reshape(shape), _) => {
                    let new_shape = Some(fbb.create_vector(shape));
                    let options = fb::ReshapeOptions::create(&mut fbb, &fb::ReshapeOptionsArgs { new_shape });
                    (BuiltinOptions::ReshapeOptions, Some(options.as_union_value()))
                }
                (Options::Conv2D(activation), _) => {
                    let options = fb::Conv2DOptions::create(
                        &mut fbb,
                        &fb::Conv2DOptionsArgs {
                            padding: fb::Padding::VALID,
                            stride_w: 1,
                            stride_h: 1,
                            fused_activation_function: *activation,
                            dilation_w_factor: 1,
                            dilation_h_factor: 1,
                        },
                    );
                    (BuiltinOptions::Conv2DOptions, Some(options.as_union_value()))
                }
            };
            // Custom options travel as they are. `intermediates` and
            // `mutating_variable_inputs` are dropped: they belong to the
            // recurrent and variable operators tract does not read, and
            // intermediates name tensor indices the rewrite renumbers.
            let custom = op.source.and_then(|s| s.custom_options());
            let custom_options = custom.map(|c| fbb.create_vector(c.bytes()));
            let custom_options_format =
                op.source.map(|s| s.custom_options_format()).unwrap_or(fb::CustomOptionsFormat::FLEXBUFFERS);
            ops.push(fb::Operator::create(
                &mut fbb,
                &fb::OperatorArgs {
                    opcode_index: op.opcode as u32,
                    inputs: Some(inputs),
                    outputs: Some(outputs),
                    builtin_options_type: options_type,
                    builtin_options: options,
                    custom_options,
                    custom_options_format,
                    mutating_variable_inputs: None,
                    intermediates: None,
                },
            ));
        }

        let tensors = fbb.create_vector(&tensors);
        let inputs: Vec<i32> = self.inputs.iter().map(|t| *t as i32).collect();
        let outputs: Vec<i32> = self.outputs.iter().map(|t| *t as i32).collect();
        let inputs = fbb.create_vector(&inputs);
        let outputs = fbb.create_vector(&outputs);
        let operators = fbb.create_vector(&ops);
        let name = self.subgraph_name.map(|n| fbb.create_string(n));
        let subgraph = fb::SubGraph::create(
            &mut fbb,
            &fb::SubGraphArgs {
                tensors: Some(tensors),
                inputs: Some(inputs),
                outputs: Some(outputs),
                operators: Some(operators),
                name,
            },
        );

        let mut codes = Vec::with_capacity(self.opcodes.len());
        for c in &self.opcodes {
            let custom_code = c.custom.map(|s| fbb.create_string(s));
            // Both fields, as current converters write them: codes past
            // 127 only fit in `builtin_code`.
            let deprecated = i8::try_from(c.code.0)
                .unwrap_or(BuiltinOperator::PLACEHOLDER_FOR_GREATER_OP_CODES.0 as i8)
                .min(BuiltinOperator::PLACEHOLDER_FOR_GREATER_OP_CODES.0 as i8);
            codes.push(fb::OperatorCode::create(
                &mut fbb,
                &fb::OperatorCodeArgs {
                    deprecated_builtin_code: deprecated,
                    custom_code,
                    version: c.version,
                    builtin_code: c.code,
                },
            ));
        }

        let subgraphs = fbb.create_vector(&[subgraph]);
        let operator_codes = fbb.create_vector(&codes);
        let buffers = fbb.create_vector(&buffers);
        let description = self.description.map(|d| fbb.create_string(d));
        let model = fb::Model::create(
            &mut fbb,
            &fb::ModelArgs {
                version: self.version,
                operator_codes: Some(operator_codes),
                subgraphs: Some(subgraphs),
                description,
                buffers: Some(buffers),
                metadata_buffer: None,
                metadata: None,
                signature_defs: None,
            },
        );
        fb::finish_model_buffer(&mut fbb, model);
        let (mut bytes, head) = fbb.collapse();
        bytes.drain(..head);
        Ok(bytes)
    }

    fn code_name(&self, op: &Operator) -> String {
        self.opcodes.get(op.opcode).map(OpCode::name).unwrap_or_else(|| op_name(self.code(op)))
    }
}

/// The float32 values of a constant: float16 converted exactly, integers
/// through their (per-tensor or per-axis) scale and zero point.
fn dequantize_constant(t: &Tensor, data: &[u8]) -> Result<Vec<f32>, String> {
    let n = element_count(&t.shape).ok_or_else(|| format!("invalid shape {:?}", t.shape))?;
    let width = match t.dtype {
        TensorType::FLOAT16 | TensorType::INT16 => 2,
        TensorType::INT8 | TensorType::UINT8 => 1,
        TensorType::INT32 => 4,
        other => return Err(format!("element type {} cannot be dequantized", type_name(other))),
    };
    if Some(data.len()) != n.checked_mul(width) {
        return Err(format!(
            "{} bytes of data for shape {:?} of {}",
            data.len(),
            t.shape,
            type_name(t.dtype)
        ));
    }
    if t.dtype == TensorType::FLOAT16 {
        return Ok(data
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect());
    }
    let quant = t.quant.as_ref().ok_or("no quantization parameters")?;
    let (scale, zp) =
        quant.params().filter(|(s, z)| !s.is_empty() && !z.is_empty()).ok_or("no scale and zero point")?;
    // Per-axis: element i belongs to channel (i / stride) % channels, where
    // stride is the product of the dimensions after the quantized one.
    let (channels, stride) = if scale.len() > 1 {
        let axis = usize::try_from(quant.quantized_dimension)
            .ok()
            .filter(|a| *a < t.shape.len())
            .ok_or_else(|| format!("quantized dimension {} out of the shape", quant.quantized_dimension))?;
        if usize::try_from(t.shape[axis]).ok() != Some(scale.len()) {
            return Err(format!("{} scales for {} channels", scale.len(), t.shape[axis]));
        }
        (scale.len(), element_count(&t.shape[axis + 1..]).unwrap_or(1).max(1))
    } else {
        (1, 1)
    };
    if zp.len() != 1 && zp.len() != channels {
        return Err(format!("{} zero points for {channels} channels", zp.len()));
    }
    let raw: Vec<i64> = match t.dtype {
        TensorType::INT8 => data.iter().map(|b| i64::from(*b as i8)).collect(),
        TensorType::UINT8 => data.iter().map(|b| i64::from(*b)).collect(),
        TensorType::INT16 => {
            data.chunks_exact(2).map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))).collect()
        }
        _ => data.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
    };
    Ok(raw
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let ch = (i / stride) % channels;
            let s = scale.get(ch).copied().unwrap_or(scale[0]);
            let z = zp.get(ch).copied().unwrap_or(zp[0]);
            (q - z) as f32 * s
        })
        .collect())
}

/// Copies the builtin options of a source operator into `fbb`. Covers the
/// option tables of every operator tract-tflite reads (see
/// [`TRACT_BUILTINS`]), field by field; any other table is refused rather
/// than dropped, since tract would then read the operator with defaults.
fn copy_options<'fb>(
    fbb: &mut FlatBufferBuilder<'fb>,
    src: &fb::Operator,
) -> Result<(BuiltinOptions, Option<WIPOffset<UnionWIPOffset>>), String> {
    let ty = src.builtin_options_type();
    // A table the type names but that is missing: tract reports it as a
    // wrong option type; keep it missing.
    macro_rules! table {
        ($get:ident, $table:ident, $args:ident { $($field:ident),* }) => {{
            let Some(_o) = src.$get() else { return Ok((BuiltinOptions::NONE, None)) };
            fb::$table::create(fbb, &fb::$args { $($field: _o.$field()),* }).as_union_value()
        }};
    }
    macro_rules! vector_table {
        ($get:ident, $table:ident, $args:ident, $field:ident) => {{
            let Some(o) = src.$get() else { return Ok((BuiltinOptions::NONE, None)) };
            let v = o.$field().map(|v| v.iter().collect::<Vec<i32>>());
            let $field = v.map(|v| fbb.create_vector(&v));
            fb::$table::create(fbb, &fb::$args { $field }).as_union_value()
        }};
    }
    let offset = match ty {
        BuiltinOptions::NONE => return Ok((ty, None)),
        BuiltinOptions::Conv2DOptions => table!(
            builtin_options_as_conv_2_doptions,
            Conv2DOptions,
            Conv2DOptionsArgs {
                padding,
                stride_w,
                stride_h,
                fused_activation_function,
                dilation_w_factor,
                dilation_h_factor
            }
        ),
        BuiltinOptions::DepthwiseConv2DOptions => table!(
            builtin_options_as_depthwise_conv_2_doptions,
            DepthwiseConv2DOptions,
            DepthwiseConv2DOptionsArgs {
                padding,
                stride_w,
                stride_h,
                depth_multiplier,
                fused_activation_function,
                dilation_w_factor,
                dilation_h_factor
            }
        ),
        BuiltinOptions::Pool2DOptions => table!(
            builtin_options_as_pool_2_doptions,
            Pool2DOptions,
            Pool2DOptionsArgs {
                padding,
                stride_w,
                stride_h,
                filter_width,
                filter_height,
                fused_activation_function
            }
        ),
        BuiltinOptions::FullyConnectedOptions => table!(
            builtin_options_as_fully_connected_options,
            FullyConnectedOptions,
            FullyConnectedOptionsArgs {
                fused_activation_function,
                weights_format,
                keep_num_dims,
                asymmetric_quantize_inputs
            }
        ),
        BuiltinOptions::SoftmaxOptions => {
            table!(builtin_options_as_softmax_options, SoftmaxOptions, SoftmaxOptionsArgs { beta })
        }
        BuiltinOptions::ConcatenationOptions => table!(
            builtin_options_as_concatenation_options,
            ConcatenationOptions,
            ConcatenationOptionsArgs { axis, fused_activation_function }
        ),
        BuiltinOptions::AddOptions => table!(
            builtin_options_as_add_options,
            AddOptions,
            AddOptionsArgs { fused_activation_function, pot_scale_int16 }
        ),
        BuiltinOptions::SubOptions => table!(
            builtin_options_as_sub_options,
            SubOptions,
            SubOptionsArgs { fused_activation_function, pot_scale_int16 }
        ),
        BuiltinOptions::MulOptions => {
            table!(builtin_options_as_mul_options, MulOptions, MulOptionsArgs { fused_activation_function })
        }
        BuiltinOptions::DivOptions => {
            table!(builtin_options_as_div_options, DivOptions, DivOptionsArgs { fused_activation_function })
        }
        BuiltinOptions::ReshapeOptions => {
            vector_table!(builtin_options_as_reshape_options, ReshapeOptions, ReshapeOptionsArgs, new_shape)
        }
        BuiltinOptions::SqueezeOptions => {
            vector_table!(
                builtin_options_as_squeeze_options,
                SqueezeOptions,
                SqueezeOptionsArgs,
                squeeze_dims
            )
        }
        BuiltinOptions::StridedSliceOptions => table!(
            builtin_options_as_strided_slice_options,
            StridedSliceOptions,
            StridedSliceOptionsArgs { begin_mask, end_mask, ellipsis_mask, new_axis_mask, shrink_axis_mask }
        ),
        BuiltinOptions::ReducerOptions => {
            table!(builtin_options_as_reducer_options, ReducerOptions, ReducerOptionsArgs { keep_dims })
        }
        BuiltinOptions::BatchMatMulOptions => table!(
            builtin_options_as_batch_mat_mul_options,
            BatchMatMulOptions,
            BatchMatMulOptionsArgs { adj_x, adj_y, asymmetric_quantize_inputs }
        ),
        BuiltinOptions::ResizeBilinearOptions => table!(
            builtin_options_as_resize_bilinear_options,
            ResizeBilinearOptions,
            ResizeBilinearOptionsArgs { align_corners, half_pixel_centers }
        ),
        BuiltinOptions::ResizeNearestNeighborOptions => table!(
            builtin_options_as_resize_nearest_neighbor_options,
            ResizeNearestNeighborOptions,
            ResizeNearestNeighborOptionsArgs { align_corners, half_pixel_centers }
        ),
        BuiltinOptions::LeakyReluOptions => {
            table!(builtin_options_as_leaky_relu_options, LeakyReluOptions, LeakyReluOptionsArgs { alpha })
        }
        BuiltinOptions::ShapeOptions => {
            table!(builtin_options_as_shape_options, ShapeOptions, ShapeOptionsArgs { out_type })
        }
        // Option tables without fields.
        BuiltinOptions::TransposeOptions => {
            table!(builtin_options_as_transpose_options, TransposeOptions, TransposeOptionsArgs {})
        }
        BuiltinOptions::ExpandDimsOptions => {
            table!(builtin_options_as_expand_dims_options, ExpandDimsOptions, ExpandDimsOptionsArgs {})
        }
        BuiltinOptions::PadOptions => table!(builtin_options_as_pad_options, PadOptions, PadOptionsArgs {}),
        BuiltinOptions::PadV2Options => {
            table!(builtin_options_as_pad_v2_options, PadV2Options, PadV2OptionsArgs {})
        }
        BuiltinOptions::SliceOptions => {
            table!(builtin_options_as_slice_options, SliceOptions, SliceOptionsArgs {})
        }
        BuiltinOptions::BroadcastToOptions => {
            table!(builtin_options_as_broadcast_to_options, BroadcastToOptions, BroadcastToOptionsArgs {})
        }
        BuiltinOptions::MaximumMinimumOptions => table!(
            builtin_options_as_maximum_minimum_options,
            MaximumMinimumOptions,
            MaximumMinimumOptionsArgs {}
        ),
        BuiltinOptions::EqualOptions => {
            table!(builtin_options_as_equal_options, EqualOptions, EqualOptionsArgs {})
        }
        BuiltinOptions::NotEqualOptions => {
            table!(builtin_options_as_not_equal_options, NotEqualOptions, NotEqualOptionsArgs {})
        }
        BuiltinOptions::LessOptions => {
            table!(builtin_options_as_less_options, LessOptions, LessOptionsArgs {})
        }
        BuiltinOptions::LessEqualOptions => {
            table!(builtin_options_as_less_equal_options, LessEqualOptions, LessEqualOptionsArgs {})
        }
        BuiltinOptions::GreaterOptions => {
            table!(builtin_options_as_greater_options, GreaterOptions, GreaterOptionsArgs {})
        }
        BuiltinOptions::GreaterEqualOptions => {
            table!(builtin_options_as_greater_equal_options, GreaterEqualOptions, GreaterEqualOptionsArgs {})
        }
        BuiltinOptions::LogicalOrOptions => {
            table!(builtin_options_as_logical_or_options, LogicalOrOptions, LogicalOrOptionsArgs {})
        }
        BuiltinOptions::LogicalAndOptions => {
            table!(builtin_options_as_logical_and_options, LogicalAndOptions, LogicalAndOptionsArgs {})
        }
        BuiltinOptions::LogicalNotOptions => {
            table!(builtin_options_as_logical_not_options, LogicalNotOptions, LogicalNotOptionsArgs {})
        }
        BuiltinOptions::SelectOptions => {
            table!(builtin_options_as_select_options, SelectOptions, SelectOptionsArgs {})
        }
        BuiltinOptions::SelectV2Options => {
            table!(builtin_options_as_select_v2_options, SelectV2Options, SelectV2OptionsArgs {})
        }
        BuiltinOptions::AbsOptions => table!(builtin_options_as_abs_options, AbsOptions, AbsOptionsArgs {}),
        BuiltinOptions::CosOptions => table!(builtin_options_as_cos_options, CosOptions, CosOptionsArgs {}),
        BuiltinOptions::ExpOptions => table!(builtin_options_as_exp_options, ExpOptions, ExpOptionsArgs {}),
        BuiltinOptions::HardSwishOptions => {
            table!(builtin_options_as_hard_swish_options, HardSwishOptions, HardSwishOptionsArgs {})
        }
        BuiltinOptions::SquareOptions => {
            table!(builtin_options_as_square_options, SquareOptions, SquareOptionsArgs {})
        }
        other => {
            return Err(format!(
                "options of type {}",
                other.variant_name().map(str::to_string).unwrap_or_else(|| format!("#{}", other.0))
            ))
        }
    };
    Ok((ty, Some(offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = crate::model::fixture_path(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn ops_of(bytes: &[u8]) -> Vec<String> {
        let model = fb::root_as_model(bytes).expect("valid model");
        let graph = Graph::read(&model).expect("readable");
        graph.ops.iter().map(|op| graph.code_name(op)).collect()
    }

    #[test]
    fn float_model_takes_the_fast_path() {
        let bytes = fixture("digits_cnn.tflite");
        let prepared = prepare(&bytes).expect("prepares");
        assert!(matches!(prepared.bytes, Cow::Borrowed(_)), "changes: {:?}", prepared.changes);
        assert_eq!(prepared.inputs, vec![InputAdapter::Direct]);
        assert_eq!(prepared.outputs, vec![OutputAdapter::Direct]);
    }

    #[test]
    fn float16_weights_are_folded_into_float32_constants() {
        let bytes = fixture("digits_cnn_fp16.tflite");
        assert!(ops_of(&bytes).iter().any(|op| op == "DEQUANTIZE"));
        let prepared = prepare(&bytes).expect("prepares");
        let ops = ops_of(&prepared.bytes);
        assert_eq!(ops, ["CONV_2D", "MAX_POOL_2D", "CONV_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"]);
        let model = fb::root_as_model(&prepared.bytes).expect("valid");
        let tensors = model.subgraphs().expect("subgraphs").get(0).tensors().expect("tensors");
        assert!(tensors.iter().all(|t| t.type_() != TensorType::FLOAT16), "no float16 tensor is left");
        // The fast path's output agrees: same interface.
        assert_eq!(prepared.inputs, vec![InputAdapter::Direct]);
    }

    #[test]
    fn int8_edges_move_into_the_runtime() {
        let bytes = fixture("digits_cnn_int8.tflite");
        let prepared = prepare(&bytes).expect("prepares");
        let ops = ops_of(&prepared.bytes);
        assert!(!ops.iter().any(|op| op == "QUANTIZE" || op == "DEQUANTIZE"), "{ops:?}");
        let [InputAdapter::Quantize(qi)] = prepared.inputs[..] else { panic!("{:?}", prepared.inputs) };
        let [OutputAdapter::Dequantize(qo)] = prepared.outputs[..] else { panic!("{:?}", prepared.outputs) };
        assert_eq!(qi.element_type, ElementType::I8);
        // TFLite's int8 softmax output is always scale 1/256, zero point -128.
        assert_eq!((qo.scale, qo.zero_point, qo.element_type), (1.0 / 256.0, -128, ElementType::I8));
        assert_eq!(prepared.output_names, vec!["StatefulPartitionedCall_1:0".to_string()]);
        assert_eq!(prepared.quantized_softmax.len(), 1);
        let model = fb::root_as_model(&prepared.bytes).expect("valid");
        let graph = model.subgraphs().expect("subgraphs").get(0);
        let tensors = graph.tensors().expect("tensors");
        let input = tensors.get(graph.inputs().expect("inputs").get(0) as usize);
        assert_eq!(input.name(), Some("serving_default_image:0"));
        assert_eq!(input.type_(), TensorType::INT8);
    }

    #[test]
    fn prelu_is_decomposed() {
        let bytes = fixture("bc_mlp_prelu.tflite");
        let prepared = prepare(&bytes).expect("prepares");
        let ops = ops_of(&prepared.bytes);
        assert!(!ops.iter().any(|op| op == "PRELU"), "{ops:?}");
        for op in ["MAXIMUM", "MINIMUM", "MUL", "ADD"] {
            assert!(ops.iter().any(|o| o == op), "{op} in {ops:?}");
        }
    }

    #[test]
    fn per_axis_int8_constants_dequantize_per_channel() {
        let t = Tensor {
            name: "w".into(),
            shape: vec![2, 3],
            shape_signature: None,
            dtype: TensorType::INT8,
            buffer: 1,
            quant: Some(Quant {
                scale: Some(vec![0.5, 0.25]),
                zero_point: Some(vec![0, 2]),
                min: None,
                max: None,
                quantized_dimension: 0,
            }),
            is_variable: false,
            has_rank: true,
        };
        let data = [2i8, -4, 6, 2, 6, -2].map(|v| v as u8);
        let values = dequantize_constant(&t, &data).expect("dequantizes");
        assert_eq!(values, vec![1.0, -2.0, 3.0, 0.0, 1.0, -1.0]);
        let mut axis1 = t.clone();
        axis1.shape = vec![3, 2];
        if let Some(q) = &mut axis1.quant {
            q.quantized_dimension = 1;
        }
        let values = dequantize_constant(&axis1, &data).expect("dequantizes");
        // Channel alternates along the last axis.
        assert_eq!(values, vec![1.0, -1.5, 3.0, 0.0, 3.0, -1.0]);
        assert!(dequantize_constant(&axis1, &data[..5]).is_err(), "short data is refused");
    }

    #[test]
    fn float16_constants_convert_exactly() {
        let t = Tensor {
            name: "h".into(),
            shape: vec![4],
            shape_signature: None,
            dtype: TensorType::FLOAT16,
            buffer: 1,
            quant: None,
            is_variable: false,
            has_rank: true,
        };
        let values = [1.0f32, -0.333_251_95, 65504.0, 6.1035156e-5];
        let data: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect();
        assert_eq!(dequantize_constant(&t, &data).expect("converts"), values.to_vec());
    }

    /// Builds a model with one operator per option table (non-default
    /// values), forces a rewrite, and checks every table comes back equal.
    #[test]
    fn option_tables_survive_the_rewrite() {
        use fb::ActivationFunctionType as Act;
        let mut fbb = FlatBufferBuilder::new();
        macro_rules! opt {
            ($ty:ident, $args:ident { $($f:ident : $v:expr),* }) => {
                (BuiltinOptions::$ty, fb::$ty::create(&mut fbb, &fb::$args { $($f: $v),* }).as_union_value())
            };
        }
        let new_shape = fbb.create_vector(&[-1i32, 4]);
        let squeeze_dims = fbb.create_vector(&[0i32, 2]);
        let options = vec![
            (
                BuiltinOperator::CONV_2D,
                opt!(
                    Conv2DOptions,
                    Conv2DOptionsArgs {
                        padding: fb::Padding::VALID,
                        stride_w: 2,
                        stride_h: 3,
                        fused_activation_function: Act::RELU6,
                        dilation_w_factor: 4,
                        dilation_h_factor: 5
                    }
                ),
            ),
            (
                BuiltinOperator::DEPTHWISE_CONV_2D,
                opt!(
                    DepthwiseConv2DOptions,
                    DepthwiseConv2DOptionsArgs {
                        padding: fb::Padding::VALID,
                        stride_w: 2,
                        stride_h: 3,
                        depth_multiplier: 4,
                        fused_activation_function: Act::RELU,
                        dilation_w_factor: 5,
                        dilation_h_factor: 6
                    }
                ),
            ),
            (
                BuiltinOperator::MAX_POOL_2D,
                opt!(
                    Pool2DOptions,
                    Pool2DOptionsArgs {
                        padding: fb::Padding::VALID,
                        stride_w: 2,
                        stride_h: 3,
                        filter_width: 4,
                        filter_height: 5,
                        fused_activation_function: Act::RELU
                    }
                ),
            ),
            (
                BuiltinOperator::FULLY_CONNECTED,
                opt!(
                    FullyConnectedOptions,
                    FullyConnectedOptionsArgs {
                        fused_activation_function: Act::RELU,
                        weights_format: fb::FullyConnectedOptionsWeightsFormat::SHUFFLED4x16INT8,
                        keep_num_dims: true,
                        asymmetric_quantize_inputs: true
                    }
                ),
            ),
            (BuiltinOperator::SOFTMAX, opt!(SoftmaxOptions, SoftmaxOptionsArgs { beta: 0.5 })),
            (
                BuiltinOperator::CONCATENATION,
                opt!(
                    ConcatenationOptions,
                    ConcatenationOptionsArgs { axis: -1, fused_activation_function: Act::RELU }
                ),
            ),
            (
                BuiltinOperator::ADD,
                opt!(
                    AddOptions,
                    AddOptionsArgs { fused_activation_function: Act::RELU6, pot_scale_int16: true }
                ),
            ),
            (
                BuiltinOperator::SUB,
                opt!(
                    SubOptions,
                    SubOptionsArgs { fused_activation_function: Act::RELU, pot_scale_int16: true }
                ),
            ),
            (BuiltinOperator::MUL, opt!(MulOptions, MulOptionsArgs { fused_activation_function: Act::RELU })),
            (BuiltinOperator::DIV, opt!(DivOptions, DivOptionsArgs { fused_activation_function: Act::RELU })),
            (
                BuiltinOperator::RESHAPE,
                opt!(ReshapeOptions, ReshapeOptionsArgs { new_shape: Some(new_shape) }),
            ),
            (
                BuiltinOperator::SQUEEZE,
                opt!(SqueezeOptions, SqueezeOptionsArgs { squeeze_dims: Some(squeeze_dims) }),
            ),
            (
                BuiltinOperator::STRIDED_SLICE,
                opt!(
                    StridedSliceOptions,
                    StridedSliceOptionsArgs {
                        begin_mask: 1,
                        end_mask: 2,
                        ellipsis_mask: 4,
                        new_axis_mask: 8,
                        shrink_axis_mask: 16
                    }
                ),
            ),
            (BuiltinOperator::MEAN, opt!(ReducerOptions, ReducerOptionsArgs { keep_dims: true })),
            (
                BuiltinOperator::BATCH_MATMUL,
                opt!(
                    BatchMatMulOptions,
                    BatchMatMulOptionsArgs { adj_x: true, adj_y: true, asymmetric_quantize_inputs: true }
                ),
            ),
            (
                BuiltinOperator::RESIZE_BILINEAR,
                opt!(
                    ResizeBilinearOptions,
                    ResizeBilinearOptionsArgs { align_corners: true, half_pixel_centers: true }
                ),
            ),
            (
                BuiltinOperator::RESIZE_NEAREST_NEIGHBOR,
                opt!(
                    ResizeNearestNeighborOptions,
                    ResizeNearestNeighborOptionsArgs { align_corners: true, half_pixel_centers: true }
                ),
            ),
            (BuiltinOperator::LEAKY_RELU, opt!(LeakyReluOptions, LeakyReluOptionsArgs { alpha: 0.125 })),
            (BuiltinOperator::SHAPE, opt!(ShapeOptions, ShapeOptionsArgs { out_type: TensorType::INT64 })),
            (BuiltinOperator::TRANSPOSE, opt!(TransposeOptions, TransposeOptionsArgs {})),
            (BuiltinOperator::PADV2, opt!(PadV2Options, PadV2OptionsArgs {})),
            (BuiltinOperator::SELECT_V2, opt!(SelectV2Options, SelectV2OptionsArgs {})),
        ];
        // One tensor per operator output plus a float16 constant behind a
        // DEQUANTIZE, which forces the rewrite.
        let mut tensors = vec![];
        let half = fbb.create_vector(&f16::from_f32(1.5).to_bits().to_le_bytes());
        let sentinel = fb::Buffer::create(&mut fbb, &fb::BufferArgs { data: None });
        let half_buffer = fb::Buffer::create(&mut fbb, &fb::BufferArgs { data: Some(half) });
        for (ix, ty) in [TensorType::FLOAT32, TensorType::FLOAT16, TensorType::FLOAT32].iter().enumerate() {
            let name = fbb.create_string(&format!("t{ix}"));
            let shape = fbb.create_vector(&[1i32]);
            tensors.push(fb::Tensor::create(
                &mut fbb,
                &fb::TensorArgs {
                    shape: Some(shape),
                    type_: *ty,
                    buffer: u32::from(ix == 1),
                    name: Some(name),
                    ..Default::default()
                },
            ));
        }
        let mut codes = vec![fb::OperatorCode::create(
            &mut fbb,
            &fb::OperatorCodeArgs {
                deprecated_builtin_code: BuiltinOperator::DEQUANTIZE.0 as i8,
                builtin_code: BuiltinOperator::DEQUANTIZE,
                ..Default::default()
            },
        )];
        let (ins, outs) = (fbb.create_vector(&[1i32]), fbb.create_vector(&[2i32]));
        let mut ops = vec![fb::Operator::create(
            &mut fbb,
            &fb::OperatorArgs {
                opcode_index: 0,
                inputs: Some(ins),
                outputs: Some(outs),
                ..Default::default()
            },
        )];
        for (code, (ty, table)) in &options {
            let ix = tensors.len() as i32;
            let name = fbb.create_string(&format!("out_{}", op_name(*code)));
            let shape = fbb.create_vector(&[1i32]);
            tensors.push(fb::Tensor::create(
                &mut fbb,
                &fb::TensorArgs { shape: Some(shape), name: Some(name), ..Default::default() },
            ));
            codes.push(fb::OperatorCode::create(
                &mut fbb,
                &fb::OperatorCodeArgs {
                    deprecated_builtin_code: code.0.min(127) as i8,
                    builtin_code: *code,
                    version: 1,
                    ..Default::default()
                },
            ));
            let (ins, outs) = (fbb.create_vector(&[0i32, 2]), fbb.create_vector(&[ix]));
            ops.push(fb::Operator::create(
                &mut fbb,
                &fb::OperatorArgs {
                    opcode_index: codes.len() as u32 - 1,
                    inputs: Some(ins),
                    outputs: Some(outs),
                    builtin_options_type: *ty,
                    builtin_options: Some(*table),
                    ..Default::default()
                },
            ));
        }
        let outputs: Vec<i32> = (3..tensors.len() as i32).collect();
        let (tensors, operators) = (fbb.create_vector(&tensors), fbb.create_vector(&ops));
        let (inputs, outputs) = (fbb.create_vector(&[0i32]), fbb.create_vector(&outputs));
        let subgraph = fb::SubGraph::create(
            &mut fbb,
            &fb::SubGraphArgs {
                tensors: Some(tensors),
                inputs: Some(inputs),
                outputs: Some(outputs),
                operators: Some(operators),
                name: None,
            },
        );
        let (subgraphs, codes) = (fbb.create_vector(&[subgraph]), fbb.create_vector(&codes));
        let buffers = fbb.create_vector(&[sentinel, half_buffer]);
        let model = fb::Model::create(
            &mut fbb,
            &fb::ModelArgs {
                version: 3,
                operator_codes: Some(codes),
                subgraphs: Some(subgraphs),
                buffers: Some(buffers),
                ..Default::default()
            },
        );
        fb::finish_model_buffer(&mut fbb, model);
        let source = fbb.finished_data().to_vec();

        let model = fb::root_as_model(&source).expect("valid");
        let mut graph = Graph::read(&model).expect("reads");
        graph.fold_constant_dequantize().expect("folds");
        assert!(!graph.changes.is_empty());
        graph.drop_unused();
        let rewritten = graph.write().expect("writes");
        let before = model.subgraphs().expect("subgraphs").get(0).operators().expect("ops");
        let after_model = fb::root_as_model(&rewritten).expect("rewritten is valid");
        let after = after_model.subgraphs().expect("subgraphs").get(0).operators().expect("ops");
        assert_eq!(after.len(), options.len());
        for (ix, op) in after.iter().enumerate() {
            let original = before.get(ix + 1);
            assert_eq!(op.builtin_options_type(), original.builtin_options_type());
            let show =
                |o: &fb::Operator| format!("{:?}", o).split("builtin_options:").nth(1).map(str::to_string);
            let (a, b) = (show(&op), show(&original));
            let strip =
                |s: Option<String>| s.and_then(|s| s.split("custom_options").next().map(str::to_string));
            let (a, b) = (strip(a), strip(b));
            assert!(a.as_deref().is_some_and(|a| a.contains("Options")), "{a:?}");
            assert_eq!(a, b, "options of {:?}", op.builtin_options_type());
        }
    }
}
