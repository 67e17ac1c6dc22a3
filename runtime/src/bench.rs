//! Timing a loaded model the way it serves: `outpost-runtime bench`.
//!
//! One timed call is one [`Model::run`], exactly what a `/predict` worker
//! does for a request: input conversion, the tract plan (the one specialised
//! to the batch, once warm), output conversion. Inputs are seeded random
//! values of the model's own input shapes and types, so two runs on the same
//! board time the same work. A model whose batch is fixed at 1 in the file
//! runs a batch of N as N runs inside each timed call, as it serves.
//!
//! tract runs each call on one core (the runtime builds its plans without a
//! thread pool), so `threads` means what `serve --threads` means: that many
//! workers calling the model at once, each on its own state. The latency
//! reported is per call under that contention; with one thread it is the
//! single-core figure to set beside LiteRT's `benchmark_model
//! --num_threads=1`.

use std::fmt;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::model::{Model, Profile, RunError};
use crate::tensor::{ElementType, ModelSignature, TensorData, TensorValues};

/// More workers than any device has cores for is a typo.
pub const MAX_THREADS: usize = 1024;
/// Timed calls over all threads: every sample is kept to sort them (16
/// bytes each), so this bounds that memory at 16 MB.
pub const MAX_TIMED_CALLS: u64 = 1_000_000;
/// Most elements one input of a benchmark batch may hold (as many as one
/// sample may declare, see [`crate::model::MAX_SAMPLE_ELEMENTS`]).
pub const MAX_INPUT_ELEMENTS: usize = crate::model::MAX_SAMPLE_ELEMENTS;

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Rows per call.
    pub batch: usize,
    /// Workers calling the model at once.
    pub threads: usize,
    /// Timed calls per worker.
    pub iterations: u64,
    /// Untimed calls per worker first (plan specialisation, caches, state).
    pub warmup: u64,
    /// Seed of the random inputs.
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { batch: 1, threads: 1, iterations: 100, warmup: 10, seed: 0 }
    }
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{threads} threads is more than {MAX_THREADS}")]
    TooManyThreads { threads: usize },
    #[error("{iterations} iterations on {threads} threads is more than {MAX_TIMED_CALLS} timed calls")]
    TooManyCalls { iterations: u64, threads: usize },
    #[error("input {name:?} has shape {shape}: its first dimension is fixed, so the batch must be 1 (got {batch})")]
    FixedBatch { name: String, shape: String, batch: usize },
    #[error("input {name:?} at batch {batch} would hold more than {MAX_INPUT_ELEMENTS} elements")]
    TooLarge { name: String, batch: usize },
    #[error("the model fails on the benchmark inputs: {0}")]
    Run(#[from] RunError),
    #[error("a benchmark thread panicked")]
    ThreadPanicked,
}

/// Per-call latency over every timed call.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
}

/// What `bench --json` prints: one object, numbers as numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The file name of a plain model, `name@version` of a bundle.
    pub model: String,
    pub batch: usize,
    pub threads: usize,
    pub iterations: u64,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
}

impl Report {
    pub fn new(model: String, options: &BenchOptions, summary: Summary) -> Report {
        Report {
            model,
            batch: options.batch,
            threads: options.threads,
            iterations: options.iterations,
            min_us: summary.min_us,
            median_us: summary.median_us,
            p99_us: summary.p99_us,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: batch {}, {} thread{}, {} timed call{} per thread",
            self.model,
            self.batch,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.iterations,
            if self.iterations == 1 { "" } else { "s" },
        )?;
        write!(
            f,
            "per call: min {:.1} µs, median {:.1} µs, p99 {:.1} µs",
            self.min_us, self.median_us, self.p99_us
        )
    }
}

impl BenchOptions {
    /// Refuses options that cannot make a meaningful run, before any work.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.batch == 0 {
            return Err(BenchError::Zero("batch"));
        }
        if self.threads == 0 {
            return Err(BenchError::Zero("threads"));
        }
        if self.iterations == 0 {
            return Err(BenchError::Zero("iterations"));
        }
        if self.threads > MAX_THREADS {
            return Err(BenchError::TooManyThreads { threads: self.threads });
        }
        if self.iterations.saturating_mul(self.threads as u64) > MAX_TIMED_CALLS {
            return Err(BenchError::TooManyCalls { iterations: self.iterations, threads: self.threads });
        }
        Ok(())
    }
}

/// Seeded random inputs for `batch` rows: floats uniform in [0, 1), 8-bit
/// integers over their whole range (quantized pixels and activations),
/// wider integers in [0, 10) (ids and indices a gather must find). The
/// first dimension takes the batch when it is free, or fixed at 1 (the
/// model then runs row by row); other free dimensions are 1, as for the
/// warm-up at load time.
pub fn random_inputs(signature: &ModelSignature, batch: usize, seed: u64) -> Result<Vec<TensorData>, BenchError> {
    let mut rng = SplitMix64(seed);
    signature
        .inputs
        .iter()
        .map(|spec| {
            let mut shape = Vec::with_capacity(spec.shape.len());
            for (ix, d) in spec.shape.iter().enumerate() {
                let dim = match (ix, d) {
                    (0, None) | (0, Some(1)) => batch,
                    (_, None) => 1,
                    (_, Some(d)) => usize::try_from(*d).unwrap_or(usize::MAX),
                };
                shape.push(dim);
            }
            if batch > 1 && !matches!(spec.shape.first(), Some(None) | Some(Some(1))) {
                return Err(BenchError::FixedBatch {
                    name: spec.name.clone(),
                    shape: format!("{:?}", spec.shape),
                    batch,
                });
            }
            let len = shape
                .iter()
                .try_fold(1usize, |acc, d| acc.checked_mul(*d))
                .filter(|n| *n <= MAX_INPUT_ELEMENTS)
                .ok_or_else(|| BenchError::TooLarge { name: spec.name.clone(), batch })?;
            let values = match spec.element_type {
                ElementType::F32 => TensorValues::F32((0..len).map(|_| rng.unit_f32()).collect()),
                ElementType::I8 => TensorValues::I8((0..len).map(|_| rng.next() as i8).collect()),
                ElementType::U8 => TensorValues::U8((0..len).map(|_| rng.next() as u8).collect()),
                ElementType::I32 => TensorValues::I32((0..len).map(|_| (rng.next() % 10) as i32).collect()),
                ElementType::I64 => TensorValues::I64((0..len).map(|_| (rng.next() % 10) as i64).collect()),
            };
            // The length is the shape's product by construction.
            Ok(TensorData { shape, values })
        })
        .collect()
}

/// Warms up and times `options.iterations` calls on each of
/// `options.threads` workers.
pub fn run(model: &Model, options: &BenchOptions) -> Result<Summary, BenchError> {
    options.check()?;
    let inputs = random_inputs(model.signature(), options.batch, options.seed)?;
    // One call first on this thread: a model that cannot run these inputs
    // fails here with its own reason, before any worker starts.
    model.run(inputs.clone())?;
    let barrier = Barrier::new(options.threads);
    let per_thread: Vec<Result<Vec<Duration>, BenchError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..options.threads)
            .map(|_| scope.spawn(|| worker(model, &inputs, options, &barrier)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(Err(BenchError::ThreadPanicked))).collect()
    });
    let mut samples = Vec::new();
    for thread in per_thread {
        samples.extend(thread?);
    }
    Ok(summarize(samples))
}

/// One worker: its warm-up (which also gives it a state of its own), then
/// the timed calls, started together with the other workers.
fn worker(
    model: &Model,
    inputs: &[TensorData],
    options: &BenchOptions,
    barrier: &Barrier,
) -> Result<Vec<Duration>, BenchError> {
    let mut warm = Ok(());
    for _ in 0..options.warmup {
        if let Err(e) = model.run(inputs.to_vec()) {
            warm = Err(e);
            break;
        }
    }
    // Every worker reaches the barrier, failed or not, so none waits forever.
    barrier.wait();
    warm?;
    let mut samples = Vec::with_capacity(options.iterations as usize);
    for _ in 0..options.iterations {
        // The copy a request's decoding would make is not the model's time.
        let call = inputs.to_vec();
        let started = Instant::now();
        let outputs = model.run(call);
        samples.push(started.elapsed());
        outputs?;
    }
    Ok(samples)
}

/// Min, median and p99 (nearest rank) of the samples; zeros for none.
pub fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort_unstable();
    let us = |d: Duration| d.as_nanos() as f64 / 1e3;
    let n = samples.len();
    if n == 0 {
        return Summary { min_us: 0.0, median_us: 0.0, p99_us: 0.0 };
    }
    let median = if n % 2 == 1 { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2 };
    let p99_rank = (n * 99).div_ceil(100).max(1);
    Summary { min_us: us(samples[0]), median_us: us(median), p99_us: us(samples[p99_rank - 1]) }
}

/// The profile as a table: every node in plan order with its time per call
/// and share, then the time per operator, largest first.
pub fn format_profile(profile: &Profile) -> String {
    use std::fmt::Write;

    let calls = profile.calls.max(1) as f64;
    let total: Duration = profile.nodes.iter().map(|n| n.total).sum();
    let share = |d: Duration| if total.is_zero() { 0.0 } else { d.as_secs_f64() / total.as_secs_f64() * 100.0 };
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / calls;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "op-by-op profile: {} call{} of {} row{}, {:.1} µs per call in the plan's nodes",
        profile.calls,
        if profile.calls == 1 { "" } else { "s" },
        profile.rows_per_call,
        if profile.rows_per_call == 1 { "" } else { "s" },
        per_call(total)
    );
    let op_width = profile.nodes.iter().map(|n| n.op.len()).max().unwrap_or(2).max(2);
    let _ = writeln!(out, "{:>5}  {:<op_width$}  {:>10}  {:>6}  name", "node", "op", "µs/call", "%");
    for n in &profile.nodes {
        let _ = writeln!(
            out,
            "{:>5}  {:<op_width$}  {:>10.2}  {:>5.1}%  {}",
            n.node,
            n.op,
            per_call(n.total),
            share(n.total),
            n.name
        );
    }
    let mut by_op: Vec<(&str, Duration, usize)> = Vec::new();
    for n in &profile.nodes {
        match by_op.iter_mut().find(|(op, _, _)| *op == n.op) {
            Some(entry) => {
                entry.1 += n.total;
                entry.2 += 1;
            }
            None => by_op.push((&n.op, n.total, 1)),
        }
    }
    by_op.sort_by(|a, b| b.1.cmp(&a.1));
    let _ = writeln!(out, "by operator:");
    for (op, d, count) in by_op {
        let plural = if count == 1 { "" } else { "s" };
        let _ = writeln!(out, "  {op:<op_width$}  {:>10.2}  {:>5.1}%  ({count} node{plural})", per_call(d), share(d));
    }
    out
}

/// A small, seedable generator (splitmix64): deterministic inputs without
/// a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): 24 random bits, all an f32 mantissa holds.
    fn unit_f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorSpec;

    fn spec(name: &str, element_type: ElementType, shape: Vec<Option<u64>>) -> TensorSpec {
        TensorSpec { name: name.into(), element_type, shape }
    }

    #[test]
    fn inputs_are_seeded_in_range_and_take_the_batch() {
        let sig = ModelSignature {
            inputs: vec![
                spec("x", ElementType::F32, vec![None, Some(3)]),
                spec("ids", ElementType::I64, vec![Some(1), Some(2)]),
                spec("pix", ElementType::U8, vec![None, None, Some(2)]),
            ],
            outputs: vec![],
        };
        let a = random_inputs(&sig, 4, 7).expect("inputs");
        assert_eq!(a, random_inputs(&sig, 4, 7).expect("inputs"), "same seed, same inputs");
        assert_ne!(a, random_inputs(&sig, 4, 8).expect("inputs"));
        assert_eq!(a[0].shape, vec![4, 3]);
        assert_eq!(a[1].shape, vec![4, 2], "a batch fixed at 1 takes the rows too (run row by row)");
        assert_eq!(a[2].shape, vec![4, 1, 2], "other free dims are 1");
        let TensorValues::F32(x) = &a[0].values else { panic!("f32") };
        assert!(x.iter().all(|v| (0.0..1.0).contains(v)));
        let TensorValues::I64(ids) = &a[1].values else { panic!("i64") };
        assert!(ids.iter().all(|v| (0..10).contains(v)));
    }

    #[test]
    fn a_first_dimension_fixed_above_one_refuses_a_batch() {
        let sig = ModelSignature { inputs: vec![spec("x", ElementType::F32, vec![Some(3), Some(2)])], outputs: vec![] };
        assert!(random_inputs(&sig, 1, 0).is_ok());
        assert!(matches!(random_inputs(&sig, 2, 0), Err(BenchError::FixedBatch { .. })));
        let huge =
            ModelSignature { inputs: vec![spec("x", ElementType::F32, vec![None, Some(1 << 20)])], outputs: vec![] };
        assert!(matches!(random_inputs(&huge, 1 << 10, 0), Err(BenchError::TooLarge { .. })));
    }

    #[test]
    fn summary_is_min_median_and_nearest_rank_p99() {
        let samples: Vec<Duration> = (1..=200u64).rev().map(Duration::from_micros).collect();
        let s = summarize(samples);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.median_us, 100.5);
        assert_eq!(s.p99_us, 198.0);
        let one = summarize(vec![Duration::from_nanos(1500)]);
        assert_eq!((one.min_us, one.median_us, one.p99_us), (1.5, 1.5, 1.5));
    }

    #[test]
    fn options_out_of_range_are_refused() {
        let ok = BenchOptions::default();
        assert!(ok.check().is_ok());
        assert!(BenchOptions { batch: 0, ..ok.clone() }.check().is_err());
        assert!(BenchOptions { threads: 0, ..ok.clone() }.check().is_err());
        assert!(BenchOptions { iterations: 0, ..ok.clone() }.check().is_err());
        assert!(BenchOptions { threads: MAX_THREADS + 1, ..ok.clone() }.check().is_err());
        assert!(BenchOptions { iterations: MAX_TIMED_CALLS + 1, ..ok.clone() }.check().is_err());
        assert!(BenchOptions { iterations: MAX_TIMED_CALLS / 2, threads: 2, ..ok.clone() }.check().is_ok());
        assert!(BenchOptions { iterations: MAX_TIMED_CALLS / 2, threads: 3, ..ok }.check().is_err());
    }
}
