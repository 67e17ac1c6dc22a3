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
//! Closing a window, reporting and shipping take each shard's lock briefly
//! (about a microsecond: add its counts into the state, zero them) — one
//! shard at a time, so at most one request thread pauses, once per window.
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
//!   so the request path does not read the clock per request.
//! - The **shipping interval** is whatever the agent chooses:
//!   [`DriftMonitor::snapshot_and_roll`] returns every sample counted since
//!   its previous call, whatever the windows did. Because sketches merge by
//!   addition, the fleet's total equals the device's lifetime exactly, with
//!   nothing counted twice or lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::reference::ReferenceSketch;
use super::report::{DriftReport, SequentialStatus, Thresholds, WindowLength};
use super::sequential::{PageHinkley, SequentialConfig};
use super::sketch::{DeviceSketch, SketchError, TimeSpan};

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
            // 1,000 samples: the KS threshold is then limited mostly by the
            // reference size, and a busy device closes a window in seconds.
            window: WindowLength::Samples(1000),
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

/// A shard on its own cache lines, so two threads' counters never share one
/// (128 bytes covers the adjacent-line prefetcher on x86 and Apple/ARM big
/// cores).
#[repr(align(128))]
struct Shard(Mutex<DeviceSketch>);

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
    last: Option<DriftReport>,
}

/// Drift monitoring of one loaded model. `Send + Sync`; share it by `Arc`.
pub struct DriftMonitor {
    reference: Arc<ReferenceSketch>,
    /// Per column (features then outputs): the reference mean sums centre on.
    shifts: Vec<f64>,
    config: MonitorConfig,
    shards: Box<[Shard]>,
    /// Samples counted since the window opened (a trigger, not the count the
    /// verdict uses — that comes from the sketch itself).
    window_count: AtomicU64,
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
        let shards = (0..n_shards).map(|_| Shard(Mutex::new(empty.clone()))).collect();
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
            last: None,
        };
        Ok(DriftMonitor {
            shifts: reference.columns().map(|c| c.shift()).collect(),
            reference,
            config,
            shards,
            window_count: AtomicU64::new(0),
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
        let rows = if nf > 0 { features.len() / nf } else { outputs.len() / no.max(1) };
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
            let (f_shifts, o_shifts) = self.shifts.split_at(nf);
            for r in 0..rows {
                let frow = &features[r * nf..(r + 1) * nf];
                for (((col, reference), shift), x) in
                    shard.features.iter_mut().zip(&self.reference.features).zip(f_shifts).zip(frow)
                {
                    col.push(reference, *shift, *x);
                }
                let orow = &outputs[r * no..(r + 1) * no];
                for (((col, reference), shift), x) in
                    shard.outputs.iter_mut().zip(&self.reference.outputs).zip(o_shifts).zip(orow)
                {
                    col.push(reference, *shift, *x);
                }
            }
        }
        self.after_samples(rows as u64);
        Ok(())
    }

    /// This thread's shard, locked.
    fn shard(&self) -> MutexGuard<'_, DeviceSketch> {
        let slot = THREAD_SLOT.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed));
            }
            s.get()
        });
        let n = self.shards.len();
        for k in 0..n {
            let shard = &self.shards[(slot + k) % n].0;
            match shard.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        lock(&self.shards[slot % n].0)
    }

    fn after_samples(&self, rows: u64) {
        let prev = self.window_count.fetch_add(rows, Ordering::Relaxed);
        let check = match self.config.window {
            WindowLength::Samples(limit) => prev + rows >= limit,
            // Read the clock only when the counter passes a multiple of 16.
            WindowLength::Seconds(_) => (prev + rows) / 16 != prev / 16,
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
            WindowLength::Samples(limit) => self.window_count.load(Ordering::Relaxed) >= limit,
            WindowLength::Seconds(secs) => {
                st.window_start.elapsed() >= Duration::from_secs(secs)
                    && st.window.samples() + self.window_count.load(Ordering::Relaxed) >= self.config.thresholds.min_samples
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
        let mut delta = DeviceSketch::empty(&self.reference);
        for shard in self.shards.iter() {
            let mut g = lock(&shard.0);
            // Same reference by construction; merge cannot fail.
            let _ = delta.merge(&g);
            g.clear();
        }
        let now = now_ms();
        if delta.samples() > 0 {
            delta.span = Some(TimeSpan { start_unix_ms: st.last_drain_ms.min(now), end_unix_ms: now });
            let _ = st.window.merge(&delta);
            let _ = st.unshipped.merge(&delta);
            let _ = st.lifetime.merge(&delta);
        }
        st.last_drain_ms = now;
    }

    fn close_window(&self, st: &mut State) {
        // Reset the trigger first: samples that race in after this point
        // count toward the next window in the counter and, mostly, in data.
        self.window_count.store(0, Ordering::Relaxed);
        self.drain(st);
        let now = now_ms();
        // The window is built on this reference: no compatibility check.
        let mut report = DriftReport::evaluate_unchecked(&self.reference, &st.window, &self.config.thresholds);
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
        report.window.index = Some(st.window_index);
        report.window.complete = true;
        report.window.length = Some(self.config.window);
        report.window.start_unix_ms = Some(st.window_start_ms);
        report.window.end_unix_ms = Some(now);
        st.last = Some(report);
        st.window.clear();
        st.window_index += 1;
        st.window_start = Instant::now();
        st.window_start_ms = now;
    }

    /// The report of the last closed window (with Page–Hinkley status); if
    /// no window has closed yet, the open window so far (`complete: false`).
    /// Closes the window first if it is due.
    pub fn report(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.close_if_due(&mut st);
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
        self.close_if_due(&mut st);
        self.drain(&mut st);
        let mut report = self.open_report(&st);
        self.annotate(&mut st, &mut report);
        report
    }

    /// Everything the monitor has seen against the reference.
    pub fn lifetime_report(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.close_if_due(&mut st);
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

    /// Samples counted in the shards but not drained yet (approximate while
    /// requests run).
    fn pending(&self) -> u64 {
        // The trigger counts since the window opened; what was drained into
        // the state window already is subtracted by the caller's view. Cheap
        // and good enough for a gauge: read the shards instead of guessing.
        self.shards.iter().map(|s| lock(&s.0).samples()).sum()
    }

    /// Force the open window closed now (e.g. on model activation, or from a
    /// test), whatever its length.
    pub fn close_window_now(&self) -> DriftReport {
        let mut st = lock(&self.state);
        self.close_window(&mut st);
        st.last.clone().unwrap_or_else(|| self.open_report(&st))
    }

    /// The agent's shipping call: the sketch of every sample counted since
    /// the previous call (or since start), to encode with
    /// [`DeviceSketch::to_postcard`] and publish on `devices/{id}/sketch`.
    /// Starts a new shipping interval; the verdict windows are unaffected.
    /// Closes the window first if it is due.
    pub fn snapshot_and_roll(&self) -> DeviceSketch {
        let mut st = lock(&self.state);
        self.close_if_due(&mut st);
        self.drain(&mut st);
        let empty = DeviceSketch::empty(&self.reference);
        std::mem::replace(&mut st.unshipped, empty)
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
        self.close_if_due(&mut st);
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
