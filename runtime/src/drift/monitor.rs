//! The on-device monitor: counts every request into a sketch, closes
//! windows, keeps verdicts and Page–Hinkley state, hands sketches to the
//! agent for shipping.
//!
//! # Concurrency: why per-thread shards behind uncontended mutexes
//!
//! An update touches ~6 words per column (bin count, NaN count, count, two
//! sums, min, max). Doing each with an atomic read-modify-write would cost
//! ~180 atomic operations per 30-feature request, the float sums and min/max
//! as compare-and-swap loops. Instead the monitor holds `shards` copies of
//! the sketch (default: twice the CPU count), each behind its own
//! `Mutex` and on its own cache lines. A thread is assigned a shard on first
//! use (round robin) and keeps it, so with no more request threads than
//! shards nobody ever waits: each request pays one uncontended lock and
//! unlock (one atomic swap each way) and then plain integer and float adds.
//! With more threads than shards, a thread that finds its shard busy takes
//! the next free one (`try_lock`) before it would wait. No lock is shared by
//! all requests; the only shared write is one relaxed `fetch_add` on the
//! window's sample counter, which decides when the window is full.
//!
//! Closing a window, reporting and shipping *drain* the shards: per shard,
//! flip which of its two buffers requests write to, then lock the buffer
//! they left (held by at most one in-flight update), add it into the state
//! and zero it. No request waits for a drain, and a drain never waits for
//! more than one update per shard (see `Shard`).
//!
//! # Windows and shipping
//!
//! Two intervals, deliberately independent:
//!
//! - The **window** (`WindowLength`: samples or seconds) is what verdicts and
//!   Page–Hinkley run on. A sample-count window closes on the request that
//!   fills it (a few samples that race in may join it); a time window
//!   closes at its deadline once it holds `min_samples` — a quiet device
//!   keeps its window open rather than judging a handful of samples. The
//!   deadline is checked every 16 requests and on every report/snapshot,
//!   so the request path does not read the clock per request. Closing on
//!   the request path only sets the window aside (a few µs); its verdicts
//!   and Page–Hinkley step (~50 µs of logarithms for 31 columns) are
//!   computed by the next reader — `report`, `gauges`, `snapshot_and_roll`,
//!   `tick` — in window order, so no request pays for them unless nobody
//!   has read for 8 windows.
//! - The **shipping interval** is whatever the agent chooses:
//!   [`DriftMonitor::snapshot_and_roll`] returns every sample counted since
//!   its previous call, whatever the windows did. Because sketches merge by
//!   addition, the fleet's total equals the device's lifetime exactly, with
//!   nothing counted twice or lost.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::reference::{class_bin, upper_bound, Bins, ReferenceSketch, COUNTED_EDGES};
use super::report::{DriftReport, SequentialStatus, Thresholds, WindowLength};
use super::sequential::{PageHinkley, SequentialConfig};
use super::sketch::{DeviceSketch, Moments, SketchError, TimeSpan};

/// Everything a [`DriftMonitor`] can be told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub window: WindowLength,
    pub thresholds: Thresholds,
    pub sequential: SequentialConfig,
    /// Sketch shards; 0 picks twice the available parallelism (at least 2).
    pub shards: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            // 500 samples: on the breast-cancer reference a +0.5 sd shift in
            // any single feature is flagged in ≥ 95% of 300-sample windows,
            // so one window of 500 settles it, while a busy device still
            // closes windows every few seconds (tests/drift_calibration.rs).
            window: WindowLength::Samples(500),
            thresholds: Thresholds::default(),
            sequential: SequentialConfig::default(),
            shards: 0,
        }
    }
}

/// Why a monitor could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MonitorError {
    #[error("window length must be at least 1 sample or 1 second")]
    EmptyWindow,
    #[error("alpha must be in (0, 1), got {0}")]
    Alpha(f64),
    #[error("thresholds and Page–Hinkley parameters must be finite and non-negative")]
    Parameters,
}

/// One value for the Prometheus exposition; the HTTP layer maps these into
/// gauges (same `name` = one metric family, `labels` distinguish series).
#[derive(Clone, Debug, PartialEq)]
pub struct GaugeValue {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Block width of `count_blocked`: 8 f32, one AVX or two SSE/NEON registers
/// where the compiler vectorises the in-block count, few enough comparisons
/// where it does not (opt-level "z").
const LANES: usize = 8;

/// Edges `<= x` among NaN-padded sorted `edges` (length a multiple of
/// [`LANES`]) in two levels: count the block starts `<= x` to find x's
/// block, then count inside that block. 12 comparisons for 33 edges, all
/// branch-free. Measured per 31-column request (x86, fastest of 200 runs of
/// 5,000): counting all 40 edges ~305 ns at opt-level 3 (vectorised) but
/// ~1,050 ns at "z" (what devices are built with: no vectorisation); this
/// ~320 ns and ~400 ns; std's binary search about 4× slower (LLVM compiles
/// its select into a jump that mispredicts ~2–3 times per value). A
/// per-column guide table on order-preserving float keys (4 comparisons
/// after one table load) and structure-of-arrays moments were tried and
/// measured no faster, so the simpler code stays.
#[inline(always)]
fn count_blocked(edges: &[f32], x: f32) -> usize {
    let blocks = edges.len() / LANES;
    let mut block = 0usize;
    for b in 1..blocks {
        block += usize::from(edges[b * LANES] <= x);
    }
    let start = block * LANES;
    // A plain loop, not `Iterator::sum`: at opt-level "z" the latter stays
    // a function call.
    let mut inside = 0usize;
    for e in &edges[start..start + LANES] {
        inside += usize::from(*e <= x);
    }
    start + inside
}

/// One column of [`Hot`].
#[derive(Clone, Copy, Debug)]
struct HotColumn {
    classes: bool,
    /// Edges NaN-padded to whole [`LANES`] blocks (see `count_blocked`).
    padded: bool,
    /// The column's edges (or labels) are `Hot::edges[lo..hi]` (`labels`).
    lo: usize,
    hi: usize,
    /// Its bin counts start here in `ShardData::counts`.
    counts_at: usize,
    n_bins: usize,
    shift: f64,
}

/// The reference's bins flattened for the request path: all edges in one
/// array and all counts of a shard in another, so an update walks two
/// small contiguous blocks (≈4 KiB of edges, ≈9 KiB of counts for 30
/// features) that stay in L1/L2, instead of two heap objects per column.
struct Hot {
    columns: Vec<HotColumn>,
    edges: Vec<f32>,
    labels: Vec<i64>,
    n_counts: usize,
}

impl Hot {
    fn new(reference: &ReferenceSketch) -> Hot {
        let mut hot = Hot { columns: Vec::new(), edges: Vec::new(), labels: Vec::new(), n_counts: 0 };
        for r in reference.columns() {
            let mut padded = false;
            let (classes, lo, hi) = match r.bins() {
                Bins::Quantile { edges } => {
                    let lo = hot.edges.len();
                    hot.edges.extend_from_slice(edges);
                    let padded_len = edges.len().div_ceil(LANES) * LANES;
                    if padded_len <= COUNTED_EDGES {
                        // Pad to whole blocks with NaN, which is never <= x,
                        // for `count_blocked`. Only up to COUNTED_EDGES:
                        // longer columns use a binary search, which must not
                        // see NaN.
                        hot.edges.resize(lo + padded_len, f32::NAN);
                        padded = true;
                    }
                    (false, lo, hot.edges.len())
                }
                Bins::Classes { labels } => {
                    let lo = hot.labels.len();
                    hot.labels.extend_from_slice(labels);
                    (true, lo, hot.labels.len())
                }
            };
            let n_bins = r.bins().len();
            hot.columns.push(HotColumn { classes, padded, lo, hi, counts_at: hot.n_counts, n_bins, shift: r.shift() });
            hot.n_counts += n_bins;
        }
        hot
    }

    fn empty(&self) -> ShardData {
        ShardData {
            counts: vec![0; self.n_counts],
            nan: vec![0; self.columns.len()],
            moments: vec![Moments::default(); self.columns.len()],
            samples: 0,
        }
    }
}

/// A shard's counts in [`Hot`]'s layout.
struct ShardData {
    counts: Vec<u64>,
    nan: Vec<u64>,
    moments: Vec<Moments>,
    samples: u64,
}

impl ShardData {
    /// Count one row: `values[i]` for the columns `cols` (whose indices
    /// start at `first`). This loop is the whole request-path cost. It
    /// works on slices taken once (at opt-level "z", which devices are built
    /// with, `Vec` indexing is not inlined) and `count_blocked`, which needs
    /// no vectorisation to be fast.
    #[inline(always)]
    fn push_row(&mut self, hot: &Hot, first: usize, cols: &[HotColumn], values: &[f32]) {
        let (edges, labels) = (&hot.edges[..], &hot.labels[..]);
        let counts = &mut self.counts[..];
        let nan = &mut self.nan[first..];
        let moments = &mut self.moments[first..];
        for (c, (col, &x)) in cols.iter().zip(values).enumerate() {
            if x.is_nan() {
                nan[c] += 1;
                continue;
            }
            let bin = if col.classes {
                class_bin(&labels[col.lo..col.hi], x)
            } else if col.padded {
                count_blocked(&edges[col.lo..col.hi], x)
            } else {
                upper_bound(&edges[col.lo..col.hi], x)
            };
            counts[col.counts_at + bin] += 1;
            if x.is_finite() {
                moments[c].push(x, col.shift);
            }
        }
    }

    /// Add into `sketch` (same reference) and zero.
    fn add_into(&mut self, hot: &Hot, sketch: &mut DeviceSketch) {
        if self.samples == 0 {
            return;
        }
        for (c, (col, out)) in hot.columns.iter().zip(sketch.columns_mut()).enumerate() {
            for (a, b) in out.counts.iter_mut().zip(&self.counts[col.counts_at..col.counts_at + col.n_bins]) {
                *a += *b;
            }
            out.nan_count += self.nan[c];
            out.moments.merge(&self.moments[c]);
        }
        self.counts.iter_mut().for_each(|x| *x = 0);
        self.nan.iter_mut().for_each(|x| *x = 0);
        self.moments.iter_mut().for_each(|m| *m = Moments::default());
        self.samples = 0;
    }
}

/// A shard on its own cache lines, so two threads' counters never share one
/// (128 bytes covers the adjacent-line prefetcher on x86 and Apple/ARM big
/// cores).
///
/// Two buffers: requests write to `bufs[active]`; a drain flips `active`
/// first and then locks the buffer requests just left. Without the flip a
/// drain must win the lock against a thread that takes it again right
/// after releasing it, and a busy thread can starve the drain for
/// thousands of requests (measured in a tight loop). After the flip only a
/// request that read `active` just before holds the old buffer, for one
/// update. A straggler that writes to the old buffer after it was drained
/// is not lost: it is drained on the next flip back.
#[repr(align(128))]
struct Shard {
    active: AtomicUsize,
    bufs: [Mutex<ShardData>; 2],
}

struct State {
    /// Samples of the open window already drained out of the shards.
    window: DeviceSketch,
    window_index: u64,
    window_start: Instant,
    window_start_ms: u64,
    unshipped: DeviceSketch,
    lifetime: DeviceSketch,
    /// Wall time of the previous drain: the start of the next drained span.
    last_drain_ms: u64,
    detectors: Vec<PageHinkley>,
    /// Closed windows waiting for their verdicts (oldest first).
    unjudged: VecDeque<ClosedWindow>,
    last: Option<DriftReport>,
}

/// A closed window before its verdicts.
struct ClosedWindow {
    sketch: DeviceSketch,
    index: u64,
    start_ms: u64,
    end_ms: u64,
}

/// Closed windows kept unjudged at most (each a few KiB) before the request
/// path judges one itself.
const MAX_UNJUDGED: usize = 8;

/// Drift monitoring of one loaded model. `Send + Sync`; share it by `Arc`.
pub struct DriftMonitor {
    reference: Arc<ReferenceSketch>,
    /// The reference's bins laid out for the request path.
    hot: Hot,
    /// An empty sketch to clone: `DeviceSketch::empty` hashes the reference
    /// (~30 µs), too slow to repeat at every drain.
    empty: DeviceSketch,
    config: MonitorConfig,
    shards: Box<[Shard]>,
    /// Samples counted into shards and not drained yet. Incremented after
    /// the update, decremented by the drain by what it took, so it can dip
    /// below 0 for an instant: signed.
    pending: AtomicI64,
    /// Samples already drained into the open window (written under the
    /// state lock, read by the request-path trigger).
    window_drained: AtomicU64,
    state: Mutex<State>,
}

thread_local! {
    static THREAD_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A poisoned lock only means another thread panicked mid-update; counts
/// are plain integers, so carry on rather than take the server down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DriftMonitor {
    pub fn new(reference: Arc<ReferenceSketch>, config: MonitorConfig) -> Result<DriftMonitor, MonitorError> {
        match config.window {
            WindowLength::Samples(0) | WindowLength::Seconds(0) => return Err(MonitorError::EmptyWindow),
            _ => {}
        }
        let a = config.thresholds.alpha;
        if !(a > 0.0 && a < 1.0) {
            return Err(MonitorError::Alpha(a));
        }
        let t = &config.thresholds;
        let s = &config.sequential;
        if ![t.ks_floor, t.tv_floor, s.delta, s.lambda].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err(MonitorError::Parameters);
        }
        let n_shards = if config.shards > 0 {
            config.shards
        } else {
            2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        }
        .max(1);
        let empty = DeviceSketch::empty(&reference);
        let hot = Hot::new(&reference);
        let shards = (0..n_shards)
            .map(|_| Shard { active: AtomicUsize::new(0), bufs: [Mutex::new(hot.empty()), Mutex::new(hot.empty())] })
            .collect();
        let columns = reference.features.len() + reference.outputs.len();
        let now = now_ms();
        let state = State {
            window: empty.clone(),
            window_index: 0,
            window_start: Instant::now(),
            window_start_ms: now,
            unshipped: empty.clone(),
            lifetime: empty,
            last_drain_ms: now,
            detectors: vec![PageHinkley::default(); columns],
            unjudged: VecDeque::new(),
            last: None,
        };
        Ok(DriftMonitor {
            hot,
            empty: state.window.clone(),
            reference,
            config,
            shards,
            pending: AtomicI64::new(0),
            window_drained: AtomicU64::new(0),
            state: Mutex::new(state),
        })
    }

    pub fn reference(&self) -> &ReferenceSketch {
        &self.reference
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// Count one request: its input features and its outputs, each in the
    /// reference's order. A class output is the predicted label as f32.
    /// Cost: a few tens of ns per column (see `benches/drift.rs`).
    #[inline]
    pub fn observe(&self, features: &[f32], outputs: &[f32]) -> Result<(), SketchError> {
        self.observe_batch(features, outputs)
    }

    /// Count a batch: `features` is row-major `rows × features`, `outputs`
    /// row-major `rows × outputs` (the same number of rows). One shard lock
    /// for the whole batch.
    pub fn observe_batch(&self, features: &[f32], outputs: &[f32]) -> Result<(), SketchError> {
        let (nf, no) = (self.reference.features.len(), self.reference.outputs.len());
        let rows = features.len().checked_div(nf).or_else(|| outputs.len().checked_div(no)).unwrap_or(0);
        if features.len() != rows * nf || outputs.len() != rows * no || (nf == 0 && no == 0) {
            return Err(SketchError::SampleShape {
                features: features.len(),
                outputs: outputs.len(),
                expected_features: nf,
                expected_outputs: no,
            });
        }
        if rows == 0 {
            return Ok(());
        }
        {
            let mut shard = self.shard();
            let (f_cols, o_cols) = self.hot.columns.split_at(nf);
            for r in 0..rows {
                shard.push_row(&self.hot, 0, f_cols, &features[r * nf..(r + 1) * nf]);
                shard.push_row(&self.hot, nf, o_cols, &outputs[r * no..(r + 1) * no]);
            }
            shard.samples += rows as u64;
        }
        self.after_samples(rows as u64);
        Ok(())
    }

    /// This thread's shard, locked.
    fn shard(&self) -> MutexGuard<'_, ShardData> {
        let slot = THREAD_SLOT.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed));
            }
            s.get()
        });
        let n = self.shards.len();
        for k in 0..n {
            let shard = &self.shards[(slot + k) % n];
            match shard.bufs[shard.active.load(Ordering::Acquire) & 1].try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        let shard = &self.shards[slot % n];
        lock(&shard.bufs[shard.active.load(Ordering::Acquire) & 1])
    }

    fn after_samples(&self, rows: u64) {
        let prev = self.pending.fetch_add(rows as i64, Ordering::Relaxed);
        let now = (prev + rows as i64).max(0) as u64;
        let check = match self.config.window {
            WindowLength::Samples(limit) => now + self.window_drained.load(Ordering::Relaxed) >= limit,
            // Read the clock only when the counter passes a multiple of 16.
            WindowLength::Seconds(_) => now / 16 != (prev.max(0) as u64) / 16,
        };
        if check {
            // Whoever holds the state lock is already closing, reporting
            // or shipping; the next request will look again.
            let guard = match self.state.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let mut st = guard;
            self.close_if_due(&mut st);
        }
    }

    fn due(&self, st: &State) -> bool {
        match self.config.window {
            WindowLength::Samples(limit) => st.window.samples() + self.pending() >= limit,
            WindowLength::Seconds(secs) => {
                st.window_start.elapsed() >= Duration::from_secs(secs)
                    && st.window.samples() + self.pending() >= self.config.thresholds.min_samples
            }
        }
    }

    fn close_if_due(&self, st: &mut State) {
        if self.due(st) {
            self.close_window(st);
        }
    }

    /// Move every shard's counts into the state (window, unshipped, lifetime).
    fn drain(&self, st: &mut State) {
        let mut delta = self.empty.clone();
        for shard in self.shards.iter() {
            // Only this function flips, and only under the state lock.
            let old = shard.active.load(Ordering::Acquire) & 1;
            shard.active.store(old ^ 1, Ordering::Release);
            for buf in [old, old ^ 1] {
                // The old buffer first (requests are leaving it); then the
                // new one if it is free, so that a report right after a
                // burst sees everything counted so far.
                let g = if buf == old {
                    Some(lock(&shard.bufs[buf]))
                } else {
                    match shard.bufs[buf].try_lock() {
                        Ok(g) => Some(g),
                        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                        Err(std::sync::TryLockError::WouldBlock) => None,
                    }
                };
                if let Some(mut g) = g {
                    // Same reference by construction; merge cannot fail.
                    g.add_into(&self.hot, &mut delta);
                }
            }
        }
        self.pending.fetch_sub(delta.samples() as i64, Ordering::Relaxed);
        let now = now_ms();
        if delta.samples() > 0 {
            delta.span = Some(TimeSpan { start_unix_ms: st.last_drain_ms.min(now), end_unix_ms: now });
            let _ = st.window.merge(&delta);
            let _ = st.unshipped.merge(&delta);
            let _ = st.lifetime.merge(&delta);
        }
        self.window_drained.store(st.window.samples(), Ordering::Relaxed);
        st.last_drain_ms = now;
    }

    /// Close the open window: drain, set it aside for judging, open the
    /// next. Runs on the request that fills the window, so it does not judge
    /// (31 columns cost ~30–50 µs of logarithms); whoever reads next does
    /// (see `settle`). Only if nobody reads for [`MAX_UNJUDGED`] windows does
    /// the request path judge the oldest, bounding memory.
    fn close_window(&self, st: &mut State) {
        self.drain(st);
        let now = now_ms();
        let sketch = std::mem::replace(&mut st.window, self.empty.clone());
        st.unjudged.push_back(ClosedWindow { sketch, index: st.window_index, start_ms: st.window_start_ms, end_ms: now });
        if st.unjudged.len() > MAX_UNJUDGED {
            if let Some(oldest) = st.unjudged.pop_front() {
                self.judge(st, oldest);
            }
        }
        self.window_drained.store(0, Ordering::Relaxed);
        st.window_index += 1;
        st.window_start = Instant::now();
        st.window_start_ms = now;
    }

    /// Judge every closed window not judged yet, in order.
    fn settle(&self, st: &mut State) {
        while let Some(w) = st.unjudged.pop_front() {
            self.judge(st, w);
        }
    }

    /// Verdicts for one closed window, and its Page–Hinkley step.
    fn judge(&self, st: &mut State, w: ClosedWindow) {
        // The window is built on this reference: no compatibility check.
        let mut report = DriftReport::evaluate_unchecked(&self.reference, &w.sketch, &self.config.thresholds);
        let seq = &self.config.sequential;
        for (col, det) in report.columns_mut().zip(st.detectors.iter_mut()) {
            if let Some(t) = &col.test {
                det.update(t.lower, seq);
            }
            if det.windows() > 0 {
                let alarm = det.alarm(seq);
                col.sequential =
                    Some(SequentialStatus { statistic: det.statistic(), threshold: seq.lambda, alarm, windows: det.windows() });
                col.drift |= alarm;
            }
        }
        report.refresh_summary();
        report.window.index = Some(w.index);
        report.window.complete = true;
        report.window.length = Some(self.config.window);
        report.window.start_unix_ms = Some(w.start_ms);
        report.window.end_unix_ms = Some(w.end_ms);
        st.last = Some(report);
    }

    /// Close the window if due and judge what is waiting: the start of
    /// every reading call.
    fn catch_up(&self, st: &mut State) {
        self.close_if_due(st);
        self.settle(st);
    }

    /// The report of the last closed window (with Page–Hinkley status); if
    /// no window has closed yet, the open window so far (`complete: false`).
    /// Closes the window first if it is due.
    pub fn report(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.catch_up(&mut st);
        let mut report = match &st.last {
            Some(r) => r.clone(),
            None => {
                self.drain(&mut st);
                self.open_report(&st)
            }
        };
        self.annotate(&mut st, &mut report);
        report
    }

    /// The open window so far (no sequential status; `complete: false`).
    pub fn current_report(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.catch_up(&mut st);
        self.drain(&mut st);
        let mut report = self.open_report(&st);
        self.annotate(&mut st, &mut report);
        report
    }

    /// Everything the monitor has seen against the reference.
    pub fn lifetime_report(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.catch_up(&mut st);
        self.drain(&mut st);
        let mut report = DriftReport::evaluate_unchecked(&self.reference, &st.lifetime, &self.config.thresholds);
        self.annotate(&mut st, &mut report);
        report
    }

    fn open_report(&self, st: &State) -> DriftReport {
        let mut r = DriftReport::evaluate_unchecked(&self.reference, &st.window, &self.config.thresholds);
        r.window.index = Some(st.window_index);
        r.window.complete = false;
        r.window.length = Some(self.config.window);
        r.window.start_unix_ms = Some(st.window_start_ms);
        r.window.end_unix_ms = None;
        r
    }

    fn annotate(&self, st: &mut State, report: &mut DriftReport) {
        report.window.lifetime_samples = Some(st.lifetime.samples() + self.pending());
        report.window.open_window_samples = Some(st.window.samples() + self.pending());
    }

    /// Samples counted in the shards but not drained yet.
    fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed).max(0) as u64
    }

    /// Force the open window closed now (e.g. on model activation, or from a
    /// test), whatever its length.
    pub fn close_window_now(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.close_window(&mut st);
        self.settle(&mut st);
        st.last.clone().unwrap_or_else(|| self.open_report(&st))
    }

    /// The agent's shipping call: the sketch of every sample counted since
    /// the previous call (or since start), to encode with
    /// [`DeviceSketch::to_postcard`] and publish on `devices/{id}/sketch`.
    /// Starts a new shipping interval; the verdict windows are unaffected.
    /// Closes the window first if it is due.
    pub fn snapshot_and_roll(&self) -> DeviceSketch {
        let mut st = lock(&self.state);
        self.catch_up(&mut st);
        self.drain(&mut st);
        std::mem::replace(&mut st.unshipped, self.empty.clone())
    }

    /// The lifetime sketch (a copy).
    pub fn lifetime(&self) -> DeviceSketch {
        let mut st = lock(&self.state);
        self.drain(&mut st);
        st.lifetime.clone()
    }

    /// Close a time-based window whose deadline passed while no requests
    /// came (call it from a timer if reports must be timely on idle devices).
    pub fn tick(&self) {
        let mut st = lock(&self.state);
        self.catch_up(&mut st);
    }

    /// Gauge values for `/metrics`, from [`report`](Self::report).
    ///
    /// Families: `outpost_drift_detected` (0/1), `outpost_drift_score`,
    /// `outpost_drift_window_samples`, `outpost_drift_windows_closed`,
    /// `outpost_drift_lifetime_samples`, and per column (labels `column`,
    /// `role` = feature|output): `outpost_drift_column_flag`,
    /// `outpost_drift_column_psi`, `outpost_drift_column_js_distance`,
    /// `outpost_drift_column_statistic_lower`, `…_statistic_upper`,
    /// `…_threshold`, `…_score`, `…_page_hinkley`. A statistic a column
    /// does not have yet (too few samples) is left out, not reported as 0.
    pub fn gauges(&self) -> Vec<GaugeValue> {
        let report = self.report();
        let closed = report.window.index.map(|i| i + u64::from(report.window.complete)).unwrap_or(0);
        let g = |name, help, value: f64| GaugeValue { name, help, labels: Vec::new(), value };
        let mut out = vec![
            g("outpost_drift_detected", "1 if any feature or output drifted in the reported window", f64::from(u8::from(report.drift))),
            g("outpost_drift_score", "Largest per-column drift score (>= 1 means drift)", report.score),
            g("outpost_drift_window_samples", "Samples in the reported drift window", report.window.samples as f64),
            g("outpost_drift_windows_closed", "Drift windows closed since start", closed as f64),
            g(
                "outpost_drift_lifetime_samples",
                "Samples counted into drift sketches since start",
                report.window.lifetime_samples.unwrap_or(0) as f64,
            ),
        ];
        let roles = report.features.iter().map(|c| ("feature", c)).chain(report.outputs.iter().map(|c| ("output", c)));
        for (role, c) in roles {
            let labels = || vec![("column", c.name.clone()), ("role", role.to_string())];
            let mut push = |name, help, value: Option<f64>| {
                if let Some(value) = value {
                    out.push(GaugeValue { name, help, labels: labels(), value });
                }
            };
            push("outpost_drift_column_flag", "1 if this column drifted", Some(f64::from(u8::from(c.drift))));
            push("outpost_drift_column_psi", "Population stability index against the reference", c.psi);
            push("outpost_drift_column_js_distance", "Jensen-Shannon distance (base 2) to the reference", c.js_distance);
            let t = c.test.as_ref();
            push("outpost_drift_column_statistic_lower", "Lower end of the KS (or TV) distance interval", t.map(|t| t.lower));
            push("outpost_drift_column_statistic_upper", "Upper end of the KS (or TV) distance interval", t.map(|t| t.upper));
            push("outpost_drift_column_threshold", "Distance the lower end must reach to flag", t.map(|t| t.threshold));
            push("outpost_drift_column_score", "Lower end over threshold (>= 1 means drift)", t.map(|t| t.score));
            push(
                "outpost_drift_column_page_hinkley",
                "Page-Hinkley statistic over successive windows",
                c.sequential.as_ref().map(|s| s.statistic),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::reference::{next_up, ColumnReference};

    /// The request path's lookup agrees with the reference rule on awkward
    /// edge sets (zero as the minimum, negatives, tiny and huge magnitudes,
    /// ties, a constant column), at every edge, one ulp either side, ±0,
    /// ±inf — with few bins (counted) and many (binary search).
    #[test]
    fn request_path_bins_agree_with_the_reference_rule() {
        let columns: Vec<Vec<f32>> = vec![
            (0..400).map(|i| i as f32 * 0.37).collect(),
            (0..400).map(|i| if i < 60 { 0.0 } else { (i as f32 * 0.01).powi(3) }).collect(),
            (0..400).map(|i| (i as f32 - 200.0) * 1e-3).collect(),
            (0..400).map(|i| (i as f32 * 0.05).exp()).collect(),
            (0..400).map(|i| (i % 5) as f32).collect(),
            (0..400).map(|i| -1e30 + i as f32 * 1e27).collect(),
            vec![7.0; 10],
        ];
        for bins in [1, 4, 32, 63, 100] {
            let cols: Vec<ColumnReference> = columns
                .iter()
                .enumerate()
                .map(|(j, v)| ColumnReference::quantile(&format!("c{j}"), v, bins).expect("builds"))
                .collect();
            let reference = ReferenceSketch { features: cols, outputs: vec![] };
            let hot = Hot::new(&reference);
            let mut shard = hot.empty();
            for (c, (col, r)) in hot.columns.iter().zip(&reference.features).enumerate() {
                let Bins::Quantile { edges } = r.bins() else { unreachable!() };
                assert_eq!(col.padded, edges.len() <= COUNTED_EDGES, "{bins} bins");
                let mut probes = vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 1e-40];
                for e in edges {
                    probes.extend([*e, next_up(*e), -next_up(-*e)]);
                }
                for x in probes {
                    let want = edges.partition_point(|e| *e <= x);
                    shard.counts.iter_mut().for_each(|n| *n = 0);
                    let mut row = vec![0.0f32; hot.columns.len()];
                    row[c] = x;
                    shard.push_row(&hot, 0, &hot.columns[c..=c], &row[c..=c]);
                    let got = shard.counts[col.counts_at..col.counts_at + col.n_bins].iter().position(|n| *n == 1);
                    assert_eq!(got, Some(want), "{} ({bins} bins): x = {x:e}", r.name());
                }
            }
        }
    }
}
