//! ONNX loading: tract-onnx plus the `ai.onnx.ml` operators scikit-learn
//! exports need (see [`super::onnx_ml`]) and Outpost's own tree ensembles
//! (see [`super::tree_ensemble`]).

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{GenericFactoid, InferenceModel};
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

use super::{LoadError, PreparedModel};

/// The ONNX framework with Outpost's extra operators registered.
pub fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx()
        // skl2onnx declares ZipMap's output as a sequence of maps, which tract
        // has no fact for; the ZipMap we register outputs a plain tensor, and
        // tract infers every output type from the graph anyway.
        .with_ignore_output_types(true)
        .with_ignore_output_shapes(true);
    super::onnx_ml::register(&mut onnx.op_register);
    // After tract's defaults: replaces tract-onnx's tree ensembles.
    super::tree_ensemble::register(&mut onnx.op_register);
    onnx
}

pub(crate) fn load(
    bytes: &[u8],
    fixed: &[super::FixedInput],
    shapes: &[super::InputShape],
    fixed_batch: bool,
) -> Result<PreparedModel, LoadError> {
    let parse_err = |e: TractError| LoadError::Parse { format: "ONNX", reason: format!("{e:#}") };
    let framework = framework();
    let mut reader = bytes;
    let mut proto = framework.proto_model_for_read(&mut reader).map_err(parse_err)?;
    drop_requantization_after_softmax(&mut proto);
    integer_matmuls_as_float(&mut proto);
    let mut model = framework.model_for_proto_model(&proto).map_err(parse_err)?;
    refuse_unimplemented(&model)?;
    // Before symbols: a given dimension must not first become one.
    super::fixed::apply_to_onnx(&mut model, fixed, shapes)?;
    let batch_fixed = symbolize_free_dims(&mut model, fixed_batch)
        .map_err(|e| LoadError::Prepare { reason: format!("{e:#}") })?;
    if fixed_batch && !batch_fixed {
        // Nothing to fix: the fallback would fail as the first load did.
        return Err(LoadError::Prepare { reason: "no free batch dimension to fix".into() });
    }
    let typed = model.into_typed().map_err(|e| LoadError::Prepare { reason: format!("{e:#}") })?;
    Ok(PreparedModel { model: typed, inputs: vec![], outputs: vec![] })
}

/// Static QDQ quantizers (onnxruntime's `quantize_static`) end a classifier
/// with `Softmax -> QuantizeLinear -> DequantizeLinear`, rounding each
/// probability to a step of 1/255. tract 0.23 folds that tail into a
/// quantized softmax that saturates: every probability comes out as 1.0.
/// Dropping the pair keeps the float softmax, which differs from what
/// onnxruntime returns by at most half a quantization step (0.002 here).
fn drop_requantization_after_softmax(proto: &mut pb::ModelProto) {
    let Some(graph) = proto.graph.as_mut() else { return };
    let producer_of = |graph: &pb::GraphProto, out: &str| graph.node.iter().position(|n| n.output.iter().any(|o| o == out));
    let consumers_of = |graph: &pb::GraphProto, out: &str| graph.node.iter().filter(|n| n.input.iter().any(|i| i == out)).count();
    let mut ix = 0;
    while ix < graph.node.len() {
        let n = &graph.node[ix];
        if n.op_type != "DequantizeLinear" || n.input.is_empty() {
            ix += 1;
            continue;
        }
        let dq_in = n.input[0].clone();
        let dq_out = n.output.first().cloned().unwrap_or_default();
        let Some(q_ix) = producer_of(graph, &dq_in) else { ix += 1; continue };
        let q = &graph.node[q_ix];
        let q_in = q.input.first().cloned().unwrap_or_default();
        let from_softmax = q.op_type == "QuantizeLinear"
            && consumers_of(graph, &dq_in) == 1
            && producer_of(graph, &q_in).is_some_and(|s| graph.node[s].op_type == "Softmax");
        if !from_softmax {
            ix += 1;
            continue;
        }
        // The softmax now writes straight to the dequantized name; its old
        // output name had the quantizer as only consumer.
        if consumers_of(graph, &q_in) == 1 {
            if let Some(s) = producer_of(graph, &q_in) {
                for o in graph.node[s].output.iter_mut().filter(|o| **o == q_in) {
                    *o = dq_out.clone();
                }
            }
            let (first, second) = if q_ix > ix { (q_ix, ix) } else { (ix, q_ix) };
            graph.node.remove(first);
            graph.node.remove(second);
            ix = 0;
        } else {
            ix += 1;
        }
    }
}

/// Largest inner dimension for which [`integer_matmuls_as_float`] is exact:
/// every product of two 8-bit values less their zero points is at most
/// 255 * 255 in magnitude, and a float32 sum of integers is exact below 2^24.
const EXACT_FLOAT_K: usize = (1 << 24) / (255 * 255);

/// onnxruntime's dynamic quantization (`quantize_dynamic`) turns each
/// `MatMul` into `DynamicQuantizeLinear -> MatMulInteger -> Cast(float) ->
/// Mul(scales)`. tract 0.23 expands `MatMulInteger` into about fifteen
/// operators (offsetting u8 to i8, zero-point corrections, an int8 kernel,
/// casts): on `bc_mlp_int8.onnx` the int8 model ran 4 times slower than the
/// float one. When the weights are constant and the result only goes through
/// `Cast(to=float)`, this load-time rewrite computes the same integer
/// product as a float `MatMul`: `(A - a_zero_point)` cast to float, times
/// the constant `(B - b_zero_point)` in float. Each product and every partial
/// sum is an integer below 2^24 when the inner dimension is at most
/// [`EXACT_FLOAT_K`], so the result is bit-identical to the int32 one; larger
/// matrices are left to tract's integer path. Activations are still
/// quantized per call exactly as onnxruntime does (`DynamicQuantizeLinear`
/// stays), so outputs keep onnxruntime parity.
fn integer_matmuls_as_float(proto: &mut pb::ModelProto) {
    use pb::tensor_proto::DataType;
    let Some(graph) = proto.graph.as_mut() else { return };
    // Integer values of a constant 8-bit tensor, and its dims.
    let int8_constant = |graph: &pb::GraphProto, name: &str| -> Option<(Vec<i64>, Vec<f32>)> {
        let t = graph.initializer.iter().find(|t| t.name == name)?;
        let values: Vec<f32> = match (t.data_type, t.raw_data.is_empty()) {
            (dt, false) if dt == DataType::Int8 as i32 => t.raw_data.iter().map(|b| *b as i8 as f32).collect(),
            (dt, false) if dt == DataType::Uint8 as i32 => t.raw_data.iter().map(|b| *b as f32).collect(),
            (dt, true) if dt == DataType::Int8 as i32 || dt == DataType::Uint8 as i32 => {
                t.int32_data.iter().map(|v| *v as f32).collect()
            }
            _ => return None,
        };
        // Checked: the dims come from the file and may overflow.
        let len = t.dims.iter().try_fold(1i64, |acc, d| acc.checked_mul(*d))?;
        (len == values.len() as i64).then(|| (t.dims.clone(), values))
    };
    let mut ix = 0;
    while ix < graph.node.len() {
        let node = &graph.node[ix];
        if node.op_type != "MatMulInteger" || !node.domain.is_empty() || node.output.len() != 1 {
            ix += 1;
            continue;
        }
        let out = node.output[0].clone();
        let only_cast_to_float = graph.node.iter().filter(|n| n.input.contains(&out)).all(|n| {
            n.op_type == "Cast"
                && n.attribute.iter().any(|a| a.name == "to" && a.i == DataType::Float as i64)
        });
        let weights = node.input.get(1).and_then(|b| int8_constant(graph, b));
        let b_zero = match node.input.get(3).filter(|n| !n.is_empty()) {
            None => Some((vec![], vec![0.0])),
            Some(name) => int8_constant(graph, name),
        };
        let (Some((dims, mut b)), Some((zp_dims, zp))) = (weights, b_zero) else {
            ix += 1;
            continue;
        };
        // Weights [K, N]; a zero point per tensor or per output column.
        let per_column = zp.len() > 1;
        let fits = dims.len() == 2
            && (dims[0] as usize) <= EXACT_FLOAT_K
            && (!per_column || (zp_dims.len() == 1 && zp_dims[0] == dims[1]));
        if !only_cast_to_float || !fits {
            ix += 1;
            continue;
        }
        let cols = dims[1] as usize;
        for (k, w) in b.iter_mut().enumerate() {
            *w -= if per_column { zp[k % cols] } else { zp[0] };
        }
        let prefix = format!("{}__outpost_float_matmul", if node.name.is_empty() { &out } else { &node.name });
        let a = node.input[0].clone();
        let a_zero = node.input.get(2).filter(|n| !n.is_empty()).cloned();
        let cast = |input: &str, output: String| pb::NodeProto {
            name: output.clone(),
            op_type: "Cast".into(),
            input: vec![input.to_string()],
            output: vec![output],
            attribute: vec![pb::AttributeProto {
                name: "to".into(),
                i: DataType::Float as i64,
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut replacement = vec![cast(&a, format!("{prefix}.a"))];
        let mut centered = format!("{prefix}.a");
        if let Some(a_zero) = a_zero {
            replacement.push(cast(&a_zero, format!("{prefix}.a_zero_point")));
            replacement.push(pb::NodeProto {
                name: format!("{prefix}.a_centered"),
                op_type: "Sub".into(),
                input: vec![format!("{prefix}.a"), format!("{prefix}.a_zero_point")],
                output: vec![format!("{prefix}.a_centered")],
                ..Default::default()
            });
            centered = format!("{prefix}.a_centered");
        }
        replacement.push(pb::NodeProto {
            name: prefix.clone(),
            op_type: "MatMul".into(),
            input: vec![centered, format!("{prefix}.b")],
            output: vec![out],
            ..Default::default()
        });
        graph.initializer.push(pb::TensorProto {
            name: format!("{prefix}.b"),
            dims,
            data_type: DataType::Float as i32,
            float_data: b,
            ..Default::default()
        });
        let added = replacement.len();
        graph.node.splice(ix..ix + 1, replacement);
        ix += added;
    }
}

/// tract parses unknown operators into placeholders and only fails when it
/// types the graph, with a message about the placeholder. Name the operator
/// and the node up front instead: that is what the user has to act on.
fn refuse_unimplemented(model: &InferenceModel) -> Result<(), LoadError> {
    for node in model.nodes() {
        if node.op_as::<UnimplementedOp>().is_some() {
            let name = node.op.name();
            let op = name
                .strip_prefix("Unimplemented(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or(&name)
                .to_string();
            return Err(LoadError::UnsupportedOperator { op, node: node.name.clone() });
        }
    }
    Ok(())
}

/// Gives every input dimension the model leaves open a symbol: the first one
/// is the batch (`N`), others get fresh names. Dimensions the model names
/// (`dim_param`) already are symbols. With `fixed_batch` (the fallback when
/// the symbolic batch does not load), every input's first dimension that
/// is not a number, open or named, becomes 1 instead. Returns whether a
/// first dimension was so fixed.
fn symbolize_free_dims(model: &mut InferenceModel, fixed_batch: bool) -> TractResult<bool> {
    let batch = model.symbols.sym("N");
    let mut batch_fixed = false;
    for ix in 0..model.inputs.len() {
        let mut fact = model.input_fact(ix)?.clone();
        let dims: Vec<_> = fact.shape.dims().cloned().collect();
        let mut changed = false;
        for (axis, dim) in dims.iter().enumerate() {
            let free = !matches!(dim, GenericFactoid::Only(TDim::Val(_)));
            if fixed_batch && axis == 0 && free {
                fact.shape.set_dim(axis, 1.into());
                changed = true;
                batch_fixed = true;
            } else if let GenericFactoid::Any = dim {
                let sym = if axis == 0 { batch.clone() } else { model.symbols.new_with_prefix("d") };
                fact.shape.set_dim(axis, sym.into());
                changed = true;
            }
        }
        if changed {
            model.set_input_fact(ix, fact)?;
        }
    }
    Ok(batch_fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_proto(name: &str) -> pb::ModelProto {
        let bytes = std::fs::read(crate::model::fixture_path(name)).expect("fixture");
        framework().proto_model_for_read(&mut bytes.as_slice()).expect("fixture parses")
    }

    fn op_count(proto: &pb::ModelProto, op: &str) -> usize {
        proto.graph.as_ref().map_or(0, |g| g.node.iter().filter(|n| n.op_type == op).count())
    }

    #[test]
    fn dynamic_int8_matmuls_become_exact_float_matmuls() {
        let mut proto = fixture_proto("bc_mlp_int8.onnx");
        assert_eq!(op_count(&proto, "MatMulInteger"), 3);
        integer_matmuls_as_float(&mut proto);
        assert_eq!(op_count(&proto, "MatMulInteger"), 0);
        assert_eq!(op_count(&proto, "MatMul"), 3);
        // Activations are still quantized per call, as onnxruntime does.
        assert_eq!(op_count(&proto, "DynamicQuantizeLinear"), 3);
        // The first layer's weights: 30 x 32, minus their zero point.
        let graph = proto.graph.as_ref().expect("graph");
        let b = graph.initializer.iter().find(|t| t.name.ends_with(".b")).expect("float weights");
        assert_eq!(b.dims, vec![30, 32]);
        assert!(b.float_data.iter().all(|w| w.fract() == 0.0 && w.abs() <= 255.0));
    }

    #[test]
    fn integer_matmuls_too_wide_for_exact_float_are_left_alone() {
        let mut proto = fixture_proto("bc_mlp_int8.onnx");
        let graph = proto.graph.as_mut().expect("graph");
        let w = graph.initializer.iter_mut().find(|t| t.name == "coefficient_quantized").expect("weights");
        // Pretend the inner dimension is past the exact bound.
        let k = (EXACT_FLOAT_K + 1) as i64;
        w.dims = vec![k, 1];
        w.raw_data = vec![1; k as usize];
        integer_matmuls_as_float(&mut proto);
        assert_eq!(op_count(&proto, "MatMulInteger"), 1, "the wide one stays integer");
        assert_eq!(op_count(&proto, "MatMul"), 2);
    }
}
