//! A model that passes the publish gate but is far too slow on a device: the
//! fixture MLP (`fixtures/bc_mlp.onnx`) with an expensive no-op in front of
//! it, built here from the fixture's bytes (no Python, no extra fixture).
//!
//! The inserted subgraph, on the input `features` [N,30]:
//!
//! ```text
//! t  = Sigmoid(ReduceSum(features)) / 512            [1,1], in (0, 1/512)
//! A  = Expand(t, [512,512])
//! B  = A·A·…·A  (`MATMULS` products of 512×512)      entries stay ≤ 1/512
//! z  = Min(ReduceSum(B), 0)                          exactly 0, since ReduceSum(B) > 0
//! features' = features + z                           = features, bit for bit
//! ```
//!
//! Every original node then reads `features'` instead of `features`, so the
//! predictions (and so the accuracy the gate measures) are the fixture's.
//! The work depends on the input, so no optimizer can fold it away at load
//! time, and it does not grow with the batch, so the publish gate (which
//! runs batches) stays quick while each single request on a device costs a
//! few hundred million multiply-adds. `Min` rather than `Mul(·, 0)`: a
//! multiplication by a constant zero is the kind of thing an optimizer may
//! prove dead; a minimum against a value it cannot bound is not.

use prost::Message;
use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, ModelProto, NodeProto, TensorProto};

/// Side of the square matrices multiplied per request.
const SIDE: i64 = 512;

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: format!("slow_{output}"),
        op_type: op.into(),
        attribute: Vec::<AttributeProto>::new(),
        ..Default::default()
    }
}

fn f32_scalar(name: &str, v: f32) -> TensorProto {
    TensorProto { name: name.into(), data_type: DataType::Float as i32, float_data: vec![v], ..Default::default() }
}

fn i64_vector(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Int64 as i32,
        dims: vec![v.len() as i64],
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

/// `original` (an ONNX model whose graph input is `input`) with `matmuls`
/// products of 512×512 matrices per inference in front of it.
pub fn slow_variant(original: &[u8], input: &str, matmuls: usize) -> Result<Vec<u8>, String> {
    let mut model = ModelProto::decode(original).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = model.graph.as_mut().ok_or("the model has no graph")?;
    if !graph.input.iter().any(|i| i.name == input) {
        return Err(format!("the graph has no input {input:?}"));
    }
    let slowed = format!("{input}_slowed");
    // Re-point every reader of the input at the slowed copy first, so the
    // subgraph added below still reads the real input.
    for n in &mut graph.node {
        for i in &mut n.input {
            if *i == input {
                *i = slowed.clone();
            }
        }
    }
    graph.initializer.push(f32_scalar("slow_scale", 1.0 / SIDE as f32));
    graph.initializer.push(f32_scalar("slow_zero", 0.0));
    graph.initializer.push(i64_vector("slow_shape", &[SIDE, SIDE]));
    let mut nodes = vec![
        node("ReduceSum", &[input], "slow_sum"),
        node("Sigmoid", &["slow_sum"], "slow_sig"),
        node("Mul", &["slow_sig", "slow_scale"], "slow_t"),
        node("Expand", &["slow_t", "slow_shape"], "slow_a"),
    ];
    let mut prev = "slow_a".to_string();
    for k in 0..matmuls {
        let out = format!("slow_b{k}");
        nodes.push(node("MatMul", &[&prev, "slow_a"], &out));
        prev = out;
    }
    nodes.push(node("ReduceSum", &[&prev], "slow_total"));
    nodes.push(node("Min", &["slow_total", "slow_zero"], "slow_z"));
    nodes.push(node("Add", &[input, "slow_z"], &slowed));
    // Topological order: the new nodes before every original one.
    nodes.append(&mut graph.node);
    graph.node = nodes;
    model.producer_name = format!("{} + outpost-e2e slow no-op", model.producer_name);
    Ok(model.encode_to_vec())
}
