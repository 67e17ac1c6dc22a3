//! Op-by-op timing of a model's plan, for `outpost-runtime bench --profile`.
//!
//! tract-core has no profiler of its own outside `tract-libcli` (which this
//! runtime does not link), but its plan state runs a caller's closure for
//! every node (`run_plan_with_eval`). Wrapping tract's own `eval` in a timer
//! measures each node of exactly the plan a call to [`Model::run`] uses, at
//! the cost of one clock read per node.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

use super::{convert, panic_reason, Model, RunError};
use crate::tensor::TensorData;

/// Time spent in one node of the plan over all profiled calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTime {
    /// The node's id in the optimized plan.
    pub node: usize,
    /// The node's name (from the model file, or given by tract's rewrites).
    pub name: String,
    /// The operator tract runs for it (after optimization: the kernel op).
    pub op: String,
    /// Sum over the profiled calls.
    pub total: Duration,
    /// Profiled calls that ran the node.
    pub calls: u64,
}

/// What [`Model::profile`] measured.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Nodes in plan order, constants left out (they are not run per call).
    pub nodes: Vec<NodeTime>,
    /// Rows each profiled call ran: a model whose batch is fixed at 1 in the
    /// file is profiled on one row (a larger batch runs it row by row).
    pub rows_per_call: usize,
    /// Calls profiled.
    pub calls: u64,
}

impl Model {
    /// Runs the plan `calls` times on `inputs`, timing every node. Inputs
    /// are checked as [`Model::run`] checks them.
    pub fn profile(&self, inputs: Vec<TensorData>, calls: u64) -> Result<Profile, RunError> {
        self.check_inputs(&inputs)?;
        let batch = inputs.first().map(TensorData::batch_len).unwrap_or(1);
        // A fixed-batch model given N rows runs one row N times: profile one.
        let inputs: Vec<TensorData> = if !self.native_batch && batch > 1 {
            inputs.iter().map(|t| convert::slice_rows(t, 0, 1)).collect()
        } else {
            inputs
        };
        let rows_per_call = inputs.first().map(TensorData::batch_len).unwrap_or(1);
        let inference = |e: TractError| RunError::Inference(format!("{e:#}"));
        let (slot, tract_inputs) = self.prepare_call(&inputs)?;
        let graph = slot.plan.model();
        let mut totals = vec![(Duration::ZERO, 0u64); graph.nodes.len()];
        // A fresh state, not a pooled one: a failed profile must not hand a
        // half-written state back to the pool the server runs from.
        let mut state = slot.plan.spawn().map_err(inference)?;
        // Call 0 is untimed: a new state allocates its buffers on its first run.
        for call in 0..=calls {
            let run = catch_unwind(AssertUnwindSafe(|| {
                state.run_plan_with_eval(tract_inputs.clone(), |ctx, op_state, node, node_inputs| {
                    let started = Instant::now();
                    let out = eval(ctx, op_state, node, node_inputs);
                    if call > 0 {
                        if let Some(t) = totals.get_mut(node.id) {
                            t.0 += started.elapsed();
                            t.1 += 1;
                        }
                    }
                    out
                })
            }))
            .unwrap_or_else(|panic| Err(anyhow::anyhow!("{}", panic_reason(panic))));
            run.map_err(inference)?;
        }
        let nodes = slot
            .plan
            .order_without_consts()
            .iter()
            .filter_map(|&id| {
                let node = graph.nodes.get(id)?;
                let (total, calls) = totals[id];
                Some(NodeTime { node: id, name: node.name.clone(), op: node.op().name().to_string(), total, calls })
            })
            .collect();
        Ok(Profile { nodes, rows_per_call, calls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{fixture_path, LoadOptions};

    #[test]
    fn every_run_node_is_timed_and_the_plan_still_answers() {
        let model = Model::load(fixture_path("bc_mlp.onnx"), &LoadOptions::default()).expect("fixture loads");
        let inputs = model.zero_inputs(4);
        let profile = model.profile(inputs.clone(), 3).expect("profiles");
        assert_eq!(profile.calls, 3);
        assert_eq!(profile.rows_per_call, 4);
        assert!(!profile.nodes.is_empty());
        assert!(profile.nodes.iter().all(|n| n.calls == 3), "{:?}", profile.nodes);
        assert!(profile.nodes.iter().any(|n| n.total > Duration::ZERO));
        // Profiling left the pooled states alone: the model still runs.
        model.run(inputs).expect("runs after profiling");
        // Bad inputs are refused as run refuses them.
        assert!(matches!(model.profile(vec![], 1), Err(RunError::InputCount { .. })));
    }
}
