//! Dynamic batching: concurrent requests merged into one model run.
//!
//! A model with a free batch dimension runs N samples in one call for much
//! less than N calls cost (one pass over the weights, one dispatch through
//! the graph, wider matrix kernels). With `batch_window > 0`, a worker puts
//! each validated request in a queue of [`Job`]s and then tries to take the
//! *gatherer* role ([`drive`]); there are no threads of its own:
//!
//! 1. The gatherer (one worker at a time; the others go back to taking
//!    requests) takes the first job and keeps taking jobs until the batch
//!    holds `max_batch` samples, or the window (counted from the first job's
//!    arrival) ends, or **no other request is on its way** — no job queued,
//!    no admitted request still being read or parsed, and no other worker
//!    busy (an idle worker would have taken any request that arrived, and
//!    would be busy with it) — and, with the event-driven server, no
//!    request waiting unread in its socket: the gatherer takes such a
//!    request itself (it joins the batch). That last rule is
//!    why a lone request never waits out the window, and since the worker
//!    that parsed it runs it, a lone request costs what it costs without
//!    batching: at low load batching is free.
//! 2. It concatenates the jobs' inputs along the batch dimension, runs the
//!    model once, slices every output back into per-request rows and answers
//!    each request as if it had run alone. Then it looks at the queue again:
//!    a job pushed by a worker that found the gatherer role taken while the
//!    batch was closing is picked up here, so no job is left behind.
//!
//! Only jobs for the same deployed model (a swap in between starts a new
//! batch) whose samples have the same shape are merged. If a merged run
//! fails, each job is re-run on its own, so one request's problem is never
//! another's error.

use std::sync::Arc;
use std::time::Instant;

use super::handler::{finish, run_model, take_ready_request, Reply, Shared};
use super::queue::Timed;
use super::request::{append, empty_values, Render};
use super::slot::Deployed;
use crate::tensor::{TensorData, TensorValues};

/// A validated request waiting for a batch.
pub(crate) struct Job {
    pub deployed: Arc<Deployed>,
    pub inputs: Vec<TensorData>,
    /// Samples in this request (first dimension of every input).
    pub rows: usize,
    pub render: Render,
    pub reply: Reply,
}

impl Job {
    fn joins(&self, other: &Job) -> bool {
        Arc::ptr_eq(&self.deployed, &other.deployed)
            && self.inputs.len() == other.inputs.len()
            && self.inputs.iter().zip(&other.inputs).all(|(a, b)| {
                a.shape.get(1..) == b.shape.get(1..) && a.element_type() == b.element_type()
            })
    }
}

/// Gathers and runs batches while jobs are queued and nobody else gathers;
/// called by a worker right after it queued a job. See the module docs.
pub(crate) fn drive(shared: &Shared) {
    loop {
        let batch = {
            let gathering = match shared.gather.try_lock() {
                Ok(guard) => guard,
                // A panic while gathering left no inconsistent state behind.
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // Another worker gathers; it (or its re-check) takes our job.
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            match gather(shared) {
                Some(batch) => batch,
                None => {
                    // The re-check, after letting go: a worker that queued
                    // a job while we held the lock found it taken and left
                    // its job to us. Without it that job waited for the
                    // next request — forever for a client waiting for this
                    // answer before it sends another (seen in a test once
                    // idle workers poll and pick requests up at once).
                    drop(gathering);
                    if shared.jobs.len() == 0 {
                        return;
                    }
                    continue;
                }
            }
        };
        run_batch(shared, batch);
    }
}

/// No other request can join soon: none admitted and still being parsed,
/// and no other worker busy (an idle worker takes a request from tiny_http
/// the moment it arrives, and is busy from then on).
fn nobody_coming(shared: &Shared) -> bool {
    use std::sync::atomic::Ordering::Acquire;
    shared.pending.load(Acquire) == 0 && shared.busy.load(Acquire) <= 1
}

/// Takes jobs for one batch (none queued: `None`).
fn gather(shared: &Shared) -> Option<Vec<Job>> {
    let window = shared.config.batch_window;
    let max_rows = shared.config.max_batch;
    let first = shared.jobs.try_pop()?;
    let deadline = first.reply_started() + window;
    let mut rows = first.rows;
    let mut batch = vec![first];
    // Workers that finish something wake us to re-check `nobody_coming`.
    let _waiting = Gathering::new(shared);
    while rows < max_rows {
        let next = match shared.jobs.try_pop() {
            Some(job) => job,
            // Nobody else is bringing one; one may be waiting unread in its
            // socket (event-driven server), and the gatherer takes it itself.
            None if nobody_coming(shared) => {
                if take_ready_request(shared) {
                    continue;
                }
                break;
            }
            None => match shared.jobs.pop_or_wake(deadline) {
                Timed::Item(job) => job,
                Timed::Woken => continue,
                Timed::Expired | Timed::Closed => break,
            },
        };
        if batch[0].joins(&next) && rows + next.rows <= max_rows {
            rows += next.rows;
            batch.push(next);
        } else {
            // It starts the next batch.
            shared.jobs.push_front(next);
            break;
        }
    }
    Some(batch)
}

/// Marks that a gatherer waits, while it lives.
struct Gathering<'a>(&'a Shared);

impl<'a> Gathering<'a> {
    fn new(shared: &'a Shared) -> Gathering<'a> {
        shared.gathering.store(true, std::sync::atomic::Ordering::Release);
        Gathering(shared)
    }
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        self.0.gathering.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Job {
    fn reply_started(&self) -> Instant {
        self.reply.started()
    }
}

fn run_batch(shared: &Shared, mut batch: Vec<Job>) {
    if batch.len() == 1 {
        if let Some(job) = batch.pop() {
            run_alone(shared, job);
        }
        return;
    }
    let deployed = batch[0].deployed.clone();
    let total: usize = batch.iter().map(|j| j.rows).sum();
    let inputs = concat_inputs(&batch, total);
    let n = batch.len();
    match run_model(shared, &deployed, inputs, n) {
        Ok(outputs) if outputs.iter().all(|t| t.shape.first() == Some(&total)) => {
            let mut start = 0;
            for job in batch {
                let end = start + job.rows;
                let mine: Vec<TensorData> = outputs.iter().map(|t| slice_rows(t, start, end)).collect();
                start = end;
                let Job { deployed, render, rows, reply, .. } = job;
                finish(shared, reply, &deployed, &render, rows, Ok(mine));
            }
        }
        // An output without the batch on its first axis cannot be split, and
        // a failed merged run cannot be blamed on one request: run each alone.
        _ => {
            for job in batch {
                run_alone(shared, job);
            }
        }
    }
}

fn run_alone(shared: &Shared, job: Job) {
    let Job { deployed, inputs, rows, render, reply } = job;
    let result = run_model(shared, &deployed, inputs, 1);
    finish(shared, reply, &deployed, &render, rows, result);
}

fn concat_inputs(batch: &[Job], total: usize) -> Vec<TensorData> {
    (0..batch[0].inputs.len())
        .map(|i| {
            let first = &batch[0].inputs[i];
            let mut shape = first.shape.clone();
            shape[0] = total;
            let len: usize = shape.iter().product();
            let mut values = empty_values(first.element_type(), len);
            for job in batch {
                append(&mut values, job.inputs[i].values.clone());
            }
            TensorData { shape, values }
        })
        .collect()
}

/// Rows `start..end` of a tensor whose first dimension is the batch.
pub(crate) fn slice_rows(t: &TensorData, start: usize, end: usize) -> TensorData {
    let row: usize = t.shape.iter().skip(1).product();
    let (a, b) = (start * row, end * row);
    let values = match &t.values {
        TensorValues::F32(v) => TensorValues::F32(v[a..b].to_vec()),
        TensorValues::I8(v) => TensorValues::I8(v[a..b].to_vec()),
        TensorValues::U8(v) => TensorValues::U8(v[a..b].to_vec()),
        TensorValues::I32(v) => TensorValues::I32(v[a..b].to_vec()),
        TensorValues::I64(v) => TensorValues::I64(v[a..b].to_vec()),
    };
    let mut shape = t.shape.clone();
    shape[0] = end - start;
    TensorData { shape, values }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_rows() {
        let t = TensorData { shape: vec![3, 2], values: TensorValues::I64(vec![1, 2, 3, 4, 5, 6]) };
        let s = slice_rows(&t, 1, 3);
        assert_eq!(s.shape, vec![2, 2]);
        assert_eq!(s.values, TensorValues::I64(vec![3, 4, 5, 6]));
    }
}
