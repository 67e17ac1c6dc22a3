//! Execution plans, one per batch size the model is run at.
//!
//! A model with a free batch dimension is loaded with that dimension as a
//! symbol (`N`), so one plan serves every batch. But tract optimizes a graph
//! best when every shape is known: with `N` symbolic it keeps the scaler's
//! `Sub` and `Mul` apart, and picks matrix-multiplication kernels and
//! packing that cannot depend on the batch. Measured on `bc_mlp.onnx` at
//! batch 32, the plan specialised to `N = 32` runs in half the time of the
//! symbolic one.
//!
//! So [`BatchPlans`] keeps the decluttered graph and, the first time a batch
//! size is seen, binds `N` to it and optimizes a plan for it. The number of
//! specialised plans is bounded ([`super::LoadOptions::batch_plans`]):
//! each costs one optimization pass (milliseconds for the fixtures) and its
//! own copy of the packed weights. Batch sizes seen after the bound is
//! reached run the symbolic plan, which stays correct for any batch.
//! Plans are kept for the life of the model: no eviction, so a workload that
//! alternates between many sizes cannot make it recompile again and again.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use super::{Plan, State};

/// One runnable plan and the tract states reused across its calls.
pub(super) struct PlanSlot {
    pub plan: Arc<Plan>,
    /// Allocating a state per call costs more than a small model's
    /// inference. The lock is held only to pop or push.
    states: Mutex<Vec<State>>,
}

impl PlanSlot {
    fn new(plan: Arc<Plan>) -> Arc<PlanSlot> {
        Arc::new(PlanSlot {
            plan,
            states: Mutex::new(Vec::new()),
        })
    }

    /// A state to run the plan with: a pooled one, or a new one.
    pub fn take_state(&self) -> TractResult<State> {
        match self.states.lock().ok().and_then(|mut s| s.pop()) {
            Some(state) => Ok(state),
            None => self.plan.spawn(),
        }
    }

    /// Returns a state after a successful run.
    pub fn give_back(&self, state: State) {
        if let Ok(mut states) = self.states.lock() {
            states.push(state);
        }
    }
}

/// The graph a specialised plan is made from, and the symbol to bind.
struct Specializer {
    decluttered: TypedModel,
    batch: Symbol,
    capacity: usize,
    plans: Mutex<Vec<(usize, Arc<PlanSlot>)>>,
}

/// The symbolic plan, plus plans specialised per batch size.
pub(super) struct BatchPlans {
    generic: Arc<PlanSlot>,
    specializer: Option<Specializer>,
}

impl BatchPlans {
    /// `decluttered` is the graph before optimization, when the model has a
    /// batch symbol and specialisation is wanted (`capacity > 0`).
    pub fn new(generic: Arc<Plan>, decluttered: Option<TypedModel>, capacity: usize) -> BatchPlans {
        let specializer = decluttered.filter(|_| capacity > 0).and_then(|model| {
            let batch = batch_symbol(&model)?;
            Some(Specializer {
                decluttered: model,
                batch,
                capacity,
                plans: Mutex::new(Vec::new()),
            })
        });
        BatchPlans {
            generic: PlanSlot::new(generic),
            specializer,
        }
    }

    /// The symbolic plan, valid for any batch.
    pub fn generic(&self) -> &Arc<PlanSlot> {
        &self.generic
    }

    /// The plan to run a batch of `batch` rows with.
    pub fn for_batch(&self, batch: usize) -> Arc<PlanSlot> {
        let Some(spec) = &self.specializer else {
            return self.generic.clone();
        };
        {
            let Ok(plans) = spec.plans.lock() else {
                return self.generic.clone();
            };
            if let Some((_, slot)) = plans.iter().find(|(b, _)| *b == batch) {
                return slot.clone();
            }
            if plans.len() >= spec.capacity {
                return self.generic.clone();
            }
        }
        // Optimize outside the lock: other batch sizes keep running. Two
        // threads may both build a plan for the same new size; the first
        // one stored wins.
        let slot = match spec.build(batch) {
            Ok(plan) => PlanSlot::new(plan),
            Err(reason) => {
                // Remembered as the generic plan, so it is not retried.
                log::warn!(
                    "no plan specialised to batch {batch}, running the generic one: {reason}"
                );
                self.generic.clone()
            }
        };
        let Ok(mut plans) = spec.plans.lock() else {
            return slot;
        };
        if let Some((_, existing)) = plans.iter().find(|(b, _)| *b == batch) {
            return existing.clone();
        }
        if plans.len() < spec.capacity {
            plans.push((batch, slot.clone()));
        }
        slot
    }

    /// Batch sizes that have a plan of their own (for tests and metrics).
    pub fn specialised(&self) -> Vec<usize> {
        let Some(spec) = &self.specializer else {
            return vec![];
        };
        let Ok(plans) = spec.plans.lock() else {
            return vec![];
        };
        plans
            .iter()
            .filter(|(_, slot)| !Arc::ptr_eq(slot, &self.generic))
            .map(|(b, _)| *b)
            .collect()
    }
}

impl Specializer {
    fn build(&self, batch: usize) -> Result<Arc<Plan>, String> {
        let subs = HashMap::from([(self.batch.clone(), (batch as i64).to_dim())]);
        // The graph already loaded and optimized once with the symbol; a
        // panic here (tract meeting a case it did not foresee) only costs
        // the specialisation.
        catch_unwind(AssertUnwindSafe(|| {
            super::optimize(self.decluttered.set_symbols(&subs)?)?.into_runnable()
        }))
        .map_err(|_| "tract panicked while specialising the plan".to_string())?
        .map_err(|e| format!("{e:#}"))
    }
}

/// The symbol every input has as its first dimension, if there is one.
pub(super) fn batch_symbol(model: &TypedModel) -> Option<Symbol> {
    let mut found: Option<Symbol> = None;
    for outlet in &model.inputs {
        let fact = model.outlet_fact(*outlet).ok()?;
        let TDim::Sym(s) = fact.shape.iter().next()?.clone() else {
            return None;
        };
        match &found {
            Some(f) if f != &s => return None,
            _ => found = Some(s),
        }
    }
    found
}
