//! ONNX loading: tract-onnx plus the `ai.onnx.ml` operators scikit-learn
//! exports need (see [`super::onnx_ml`]).

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
    onnx
}

pub(crate) fn load(bytes: &[u8]) -> Result<PreparedModel, LoadError> {
    let parse_err = |e: TractError| LoadError::Parse { format: "ONNX", reason: format!("{e:#}") };
    let framework = framework();
    let mut reader = bytes;
    let mut proto = framework.proto_model_for_read(&mut reader).map_err(parse_err)?;
    fix_binary_tree_ensembles(&mut proto);
    drop_requantization_after_softmax(&mut proto);
    let mut model = framework.model_for_proto_model(&proto).map_err(parse_err)?;
    refuse_unimplemented(&model)?;
    symbolize_free_dims(&mut model)
        .map_err(|e| LoadError::Prepare { reason: format!("{e:#}") })?;
    let typed = model.into_typed().map_err(|e| LoadError::Prepare { reason: format!("{e:#}") })?;
    Ok(PreparedModel { model: typed, inputs: vec![], outputs: vec![] })
}

/// Binary tree-ensemble classifiers as skl2onnx writes them (gradient
/// boosting: one score column, every leaf targets class 0, one `base_values`
/// entry). tract reads this layout but
/// 1. wants one base value per class label: in this layout only column 0 is
///    read, so padding with a 0 for the unused column is exact;
/// 2. picks the label by argmax over the raw score columns, before it turns
///    the one score into `[1 - p, p]`, which inverts every label. The label
///    output is recomputed here the way onnxruntime defines it: the class
///    with the highest probability (ArgMax over the probability output, then
///    a lookup in the class labels).
fn fix_binary_tree_ensembles(proto: &mut pb::ModelProto) {
    let Some(graph) = proto.graph.as_mut() else { return };
    let mut fixed_nodes = Vec::with_capacity(graph.node.len());
    let mut new_initializers = Vec::new();
    for mut node in std::mem::take(&mut graph.node) {
        let attr = |node: &pb::NodeProto, name: &str| node.attribute.iter().position(|a| a.name == name);
        let is_binary_layout = node.op_type == "TreeEnsembleClassifier"
            && node.output.len() == 2
            && attr(&node, "classlabels_int64s").is_some_and(|ix| node.attribute[ix].ints.len() == 2)
            && attr(&node, "class_ids").is_some_and(|ix| node.attribute[ix].ints.iter().all(|c| *c == 0));
        if !is_binary_layout {
            fixed_nodes.push(node);
            continue;
        }
        if let Some(ix) = attr(&node, "base_values") {
            if node.attribute[ix].floats.len() == 1 {
                node.attribute[ix].floats.push(0.0);
            }
        }
        let labels = attr(&node, "classlabels_int64s").map(|ix| node.attribute[ix].ints.clone()).unwrap_or_default();
        let label_out = node.output[0].clone();
        let proba_out = node.output[1].clone();
        let prefix = format!("{}__outpost_binary_label", if node.name.is_empty() { &label_out } else { &node.name });
        node.output[0] = format!("{prefix}.unused");
        let labels_name = format!("{prefix}.classes");
        new_initializers.push(pb::TensorProto {
            name: labels_name.clone(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: labels,
            ..Default::default()
        });
        let argmax = pb::NodeProto {
            name: format!("{prefix}.argmax"),
            op_type: "ArgMax".into(),
            input: vec![proba_out],
            output: vec![format!("{prefix}.index")],
            attribute: vec![
                pb::AttributeProto {
                    name: "axis".into(),
                    i: 1,
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    ..Default::default()
                },
                pb::AttributeProto {
                    name: "keepdims".into(),
                    i: 0,
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let gather = pb::NodeProto {
            name: format!("{prefix}.lookup"),
            op_type: "Gather".into(),
            input: vec![labels_name, format!("{prefix}.index")],
            output: vec![label_out],
            ..Default::default()
        };
        fixed_nodes.extend([node, argmax, gather]);
    }
    graph.node = fixed_nodes;
    graph.initializer.extend(new_initializers);
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
/// (`dim_param`) already are symbols.
fn symbolize_free_dims(model: &mut InferenceModel) -> TractResult<()> {
    let batch = model.symbols.sym("N");
    for ix in 0..model.inputs.len() {
        let mut fact = model.input_fact(ix)?.clone();
        let dims: Vec<_> = fact.shape.dims().cloned().collect();
        let mut changed = false;
        for (axis, dim) in dims.iter().enumerate() {
            if let GenericFactoid::Any = dim {
                let sym = if axis == 0 { batch.clone() } else { model.symbols.new_with_prefix("d") };
                fact.shape.set_dim(axis, sym.into());
                changed = true;
            }
        }
        if changed {
            model.set_input_fact(ix, fact)?;
        }
    }
    Ok(())
}
