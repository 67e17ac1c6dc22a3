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
//! unlock (one atomic swap each way) and then plain integer and float adds
//! (four columns per instruction where there are lanes: see below).
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
//! # The update: features counted across columns, four at a time
//!
//! On x86_64 and aarch64 a request's features are counted four columns at
//! a time, one per SIMD lane (SSE2 and NEON, both baseline: `push4`). Each
//! group of four columns stores its edges transposed (entry k = the k-th
//! edge of each column, NaN-padded), so a row's four bins are one
//! compare-and-subtract per edge (33 for the default 32 bins): no
//! horizontal sums, branches or data-dependent loads. NaN and the moments
//! go lane-wise too (min/max in f32 lanes over the finite values, sums in
//! f64 pairs); only the count increments are scalar, one per column (its
//! bin, its NaN counter, or a dummy slot). Outputs, features the lanes do
//! not bin (class features, more than `COUNTED_EDGES` edges) and targets
//! without baseline SIMD (armv7) take the per-column path (`push_row` with
//! `count_blocked`). The intrinsics are written out rather than left to the
//! autovectoriser because devices are built at opt-level "z", which does
//! not vectorise.
//!
//! Measured with `benches/drift.rs -- summary-only` (x86, 30 breast-cancer
//! features + the predicted class, fastest of many rounds, on a shared
//! 2-core machine): per request, the per-column path ~245 ns and the lanes
//! ~115 ns at opt-level 3 (3.0% → 1.4% of bc_mlp's ~8.4 µs batch-1
//! inference); at opt-level "z" (`CARGO_PROFILE_BENCH_OPT_LEVEL=z`, the
//! dependencies too) 316 ns → ~140 ns (2.4% → 1.1–1.2% of 12–13 µs).
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
/// metric families (same `name` = one family, `labels` distinguish series)
/// of type `kind`.
#[derive(Clone, Debug, PartialEq)]
pub struct GaugeValue {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
    pub kind: MetricKind,
}

/// How a [`GaugeValue`] is exposed. A value that only grows while the
/// monitor lives is a counter (the exposition names it `…_total`), so
/// `rate()` and `increase()` work on it and a restart reads as a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Gauge,
    Counter,
}

/// Block width of `count_blocked`: 8 f32, one AVX or two SSE/NEON registers
/// where the compiler vectorises the in-block count, few enough comparisons
/// where it does not (opt-level "z").
const LANES: usize = 8;

/// Edges `<= x` among NaN-padded sorted `edges` (length a multiple of
/// [`LANES`]) in two levels: count the block starts `<= x` to find x's
/// block, then count inside that block. 12 comparisons for 33 edges, all
/// branch-free. The per-column path's search: outputs, and every column
/// where there are no lanes (see the module docs; the lanes are ~2× faster
/// per request).
///
/// History, measured per 31-column request with every column on this path
/// (x86, fastest of 200 runs of 5,000): counting all 40 edges per column
/// ~305 ns at opt-level 3 (vectorised) but ~1,050 ns at "z" (what devices
/// are built with: no vectorisation); this ~320 ns and ~400 ns; std's
/// binary search about 4× slower (LLVM compiles its select into a jump that
/// mispredicts ~2–3 times per value). A per-column guide table on
/// order-preserving float keys (4 comparisons after one table load) and
/// structure-of-arrays moments in scalar code were tried and measured no
/// faster. What did pay was changing the direction of vectorisation: across
/// columns (`push4`) rather than within one.
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

/// Lane width of the cross-column path: 4 f32, one SSE2 or NEON register.
const W: usize = 4;

/// Whether this target counts feature rows across columns (`push4`): SSE2
/// and NEON are part of the x86_64 and aarch64 baselines, so no runtime
/// detection is needed. Elsewhere (armv7 without NEON) every column takes
/// `count_blocked`, because the cross-column count in scalar code compares
/// all edges instead of 12 per column.
const HAS_LANES: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Four consecutive feature columns (lanes) of the cross-column path.
#[derive(Clone, Debug)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
struct LaneGroup {
    /// Transposed edges: `Hot::edges_t[lo..hi]`, entry `k` holding the
    /// k-th edge of each lane's column; NaN (never `<= x`) where a column
    /// has fewer edges, or is not binned by the lanes at all.
    lo: usize,
    hi: usize,
    /// Per lane: the column's first bin count in `ShardData::counts`, or
    /// the dummy slot (the last one, see `Hot::n_slots`) for a column the
    /// lanes do not bin (a class feature, more than [`COUNTED_EDGES`]
    /// edges, a padding lane): its edges are all NaN, so its bin is always
    /// 0 and its count goes to the dummy slot.
    at: [u32; W],
    /// Per lane: the column's NaN counter in `ShardData::counts` (the
    /// dummy slot for a padding lane).
    nan_at: [u32; W],
    /// Per lane: the column's shift, as two f64 pairs.
    shift: [[f64; 2]; 2],
}

/// A shard's moments of the four columns of a [`LaneGroup`], one lane per
/// column: [`Moments`] in structure-of-arrays form.
#[derive(Clone, Copy, Debug)]
struct LaneMoments {
    min: [f32; W],
    max: [f32; W],
    sum: [[f64; 2]; 2],
    sum_sq: [[f64; 2]; 2],
    count: [[u64; 2]; 2],
}

impl Default for LaneMoments {
    fn default() -> Self {
        let m = Moments::default();
        LaneMoments {
            min: [m.min; W],
            max: [m.max; W],
            sum: [[m.sum; 2]; 2],
            sum_sq: [[m.sum_sq; 2]; 2],
            count: [[0; 2]; 2],
        }
    }
}

impl LaneMoments {
    fn get(&self, lane: usize) -> Moments {
        let (h, i) = (lane / 2 % 2, lane % 2);
        Moments {
            count: self.count[h][i],
            min: self.min[lane % W],
            max: self.max[lane % W],
            sum: self.sum[h][i],
            sum_sq: self.sum_sq[h][i],
        }
    }
}

/// Count four feature values (one per lane of `g`) into `m`, and return per
/// lane the slot of `ShardData::counts` to increment: the value's bin, its
/// column's NaN counter, or the dummy slot. Exactly `ColumnSketch::push`
/// per lane: the bin is the number of edges `<= x` (what `upper_bound`
/// counts), NaN gets no bin and no moments, ±inf a bin but no moments,
/// `d = f64(x) − shift` is added to `sum` and `d·d` to `sum_sq` (no fused
/// multiply-add, so bit-identical sums), and min/max are
/// `if x < min { min = x }` (so of −0 and +0 the first seen stays).
///
/// The loop over `edges` (one compare and one subtract of a mask per 4
/// columns and edge) is the whole cost; four accumulators so that the
/// subtracts do not form one long dependency chain.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops: see `push_features`
fn push4(x: &[f32; W], edges: &[[f32; W]], g: &LaneGroup, m: &mut LaneMoments) -> [u32; W] {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline (the compiler itself
    // assumes it), which is all the `#[target_feature]` intrinsics below
    // need. The loads and stores go through references to arrays of exactly
    // the register's size; `loadu`/`storeu` need no alignment.
    unsafe {
        macro_rules! ld {
            ($a:expr) => {
                _mm_loadu_ps($a.as_ptr())
            };
        }
        let xv = ld!(x);
        // Bin: each edge <= x gives an all-ones lane (−1); subtract it.
        macro_rules! le {
            ($e:expr) => {
                _mm_castps_si128(_mm_cmple_ps(ld!($e), xv))
            };
        }
        let (mut a0, mut a1, mut a2, mut a3) =
            (_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128());
        // `split_first_chunk`, not `chunks_exact` (a call per chunk at
        // opt-level "z") nor `as_chunks` (newer than the MSRV).
        let mut rest = edges;
        while let Some((q, tail)) = rest.split_first_chunk::<4>() {
            a0 = _mm_sub_epi32(a0, le!(q[0]));
            a1 = _mm_sub_epi32(a1, le!(q[1]));
            a2 = _mm_sub_epi32(a2, le!(q[2]));
            a3 = _mm_sub_epi32(a3, le!(q[3]));
            rest = tail;
        }
        // The 0–3 edges left over.
        if !rest.is_empty() {
            a0 = _mm_sub_epi32(a0, le!(rest[0]));
        }
        if rest.len() > 1 {
            a1 = _mm_sub_epi32(a1, le!(rest[1]));
        }
        if rest.len() > 2 {
            a2 = _mm_sub_epi32(a2, le!(rest[2]));
        }
        let bin = _mm_add_epi32(_mm_add_epi32(a0, a1), _mm_add_epi32(a2, a3));
        let nan = _mm_castps_si128(_mm_cmpunord_ps(xv, xv));
        let slot = _mm_add_epi32(_mm_loadu_si128(g.at.as_ptr().cast()), bin);
        let slot =
            _mm_or_si128(_mm_andnot_si128(nan, slot), _mm_and_si128(nan, _mm_loadu_si128(g.nan_at.as_ptr().cast())));
        let mut out = [0u32; W];
        _mm_storeu_si128(out.as_mut_ptr().cast(), slot);

        // Moments of the finite lanes: |bits| < bits of +inf.
        let abs = _mm_and_si128(_mm_castps_si128(xv), _mm_set1_epi32(0x7fff_ffff));
        let finite = _mm_cmplt_epi32(abs, _mm_set1_epi32(0x7f80_0000));
        let fin = _mm_castsi128_ps(finite);
        macro_rules! or_else {
            ($y:expr) => {
                _mm_or_ps(_mm_and_ps(fin, xv), _mm_andnot_ps(fin, _mm_set1_ps($y)))
            };
        }
        // `_mm_min_ps(a, b)` is `a < b ? a : b`, the scalar rule; a
        // non-finite lane offers +inf (min) or −inf (max), a no-op.
        let min = _mm_min_ps(or_else!(f32::INFINITY), ld!(m.min));
        _mm_storeu_ps(m.min.as_mut_ptr(), min);
        let max = _mm_max_ps(or_else!(f32::NEG_INFINITY), ld!(m.max));
        _mm_storeu_ps(m.max.as_mut_ptr(), max);
        let halves = [_mm_cvtps_pd(xv), _mm_cvtps_pd(_mm_movehl_ps(xv, xv))];
        // Each 32-bit finite mask widened to 64 bits.
        let masks = [_mm_unpacklo_epi32(finite, finite), _mm_unpackhi_epi32(finite, finite)];
        for h in 0..2 {
            // Non-finite lanes add +0.0: the sums start at +0.0 and
            // are never −0.0, so adding +0.0 changes no bit.
            let d = _mm_and_pd(_mm_sub_pd(halves[h], _mm_loadu_pd(g.shift[h].as_ptr())), _mm_castsi128_pd(masks[h]));
            let sum = _mm_add_pd(_mm_loadu_pd(m.sum[h].as_ptr()), d);
            _mm_storeu_pd(m.sum[h].as_mut_ptr(), sum);
            let sum_sq = _mm_add_pd(_mm_loadu_pd(m.sum_sq[h].as_ptr()), _mm_mul_pd(d, d));
            _mm_storeu_pd(m.sum_sq[h].as_mut_ptr(), sum_sq);
            let count = _mm_sub_epi64(_mm_loadu_si128(m.count[h].as_ptr().cast()), masks[h]);
            _mm_storeu_si128(m.count[h].as_mut_ptr().cast(), count);
        }
        out
    }
}

/// `push4` for aarch64: see the x86_64 version.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops: see `push_features`
fn push4(x: &[f32; W], edges: &[[f32; W]], g: &LaneGroup, m: &mut LaneMoments) -> [u32; W] {
    use std::arch::aarch64::*;
    // SAFETY: NEON is part of the aarch64 baseline, which is all the
    // `#[target_feature]` intrinsics below need. The loads and stores go
    // through references to arrays of exactly the register's size.
    unsafe {
        let xv = vld1q_f32(x.as_ptr());
        // Bin: each edge <= x gives an all-ones lane (−1); subtract it.
        macro_rules! le {
            ($e:expr) => {
                vcleq_f32(vld1q_f32($e.as_ptr()), xv)
            };
        }
        let (mut a0, mut a1, mut a2, mut a3) = (vdupq_n_u32(0), vdupq_n_u32(0), vdupq_n_u32(0), vdupq_n_u32(0));
        // `split_first_chunk`, not `chunks_exact` (a call per chunk at
        // opt-level "z") nor `as_chunks` (newer than the MSRV).
        let mut rest = edges;
        while let Some((q, tail)) = rest.split_first_chunk::<4>() {
            a0 = vsubq_u32(a0, le!(q[0]));
            a1 = vsubq_u32(a1, le!(q[1]));
            a2 = vsubq_u32(a2, le!(q[2]));
            a3 = vsubq_u32(a3, le!(q[3]));
            rest = tail;
        }
        // The 0–3 edges left over.
        if !rest.is_empty() {
            a0 = vsubq_u32(a0, le!(rest[0]));
        }
        if rest.len() > 1 {
            a1 = vsubq_u32(a1, le!(rest[1]));
        }
        if rest.len() > 2 {
            a2 = vsubq_u32(a2, le!(rest[2]));
        }
        let bin = vaddq_u32(vaddq_u32(a0, a1), vaddq_u32(a2, a3));
        let not_nan = vceqq_f32(xv, xv);
        let slot = vbslq_u32(not_nan, vaddq_u32(vld1q_u32(g.at.as_ptr()), bin), vld1q_u32(g.nan_at.as_ptr()));
        let mut out = [0u32; W];
        vst1q_u32(out.as_mut_ptr(), slot);

        // Moments of the finite lanes: |bits| < bits of +inf.
        let abs = vandq_u32(vreinterpretq_u32_f32(xv), vdupq_n_u32(0x7fff_ffff));
        let fin = vcltq_u32(abs, vdupq_n_u32(0x7f80_0000));
        // Compare and select, not `vminq_f32`: NEON's min orders −0 below
        // +0, the scalar rule keeps the first seen.
        let x_min = vbslq_f32(fin, xv, vdupq_n_f32(f32::INFINITY));
        let min = vld1q_f32(m.min.as_ptr());
        vst1q_f32(m.min.as_mut_ptr(), vbslq_f32(vcltq_f32(x_min, min), x_min, min));
        let x_max = vbslq_f32(fin, xv, vdupq_n_f32(f32::NEG_INFINITY));
        let max = vld1q_f32(m.max.as_ptr());
        vst1q_f32(m.max.as_mut_ptr(), vbslq_f32(vcgtq_f32(x_max, max), x_max, max));
        let halves = [vcvt_f64_f32(vget_low_f32(xv)), vcvt_high_f64_f32(xv)];
        // Each 32-bit finite mask sign-extended to 64 bits.
        let fin_s = vreinterpretq_s32_u32(fin);
        let masks =
            [vreinterpretq_u64_s64(vmovl_s32(vget_low_s32(fin_s))), vreinterpretq_u64_s64(vmovl_high_s32(fin_s))];
        for h in 0..2 {
            // Non-finite lanes add +0.0, which changes no bit of a sum
            // (never −0.0). Separate multiply and add: no fused rounding.
            let d = vsubq_f64(halves[h], vld1q_f64(g.shift[h].as_ptr()));
            let d = vreinterpretq_f64_u64(vandq_u64(vreinterpretq_u64_f64(d), masks[h]));
            vst1q_f64(m.sum[h].as_mut_ptr(), vaddq_f64(vld1q_f64(m.sum[h].as_ptr()), d));
            vst1q_f64(m.sum_sq[h].as_mut_ptr(), vaddq_f64(vld1q_f64(m.sum_sq[h].as_ptr()), vmulq_f64(d, d)));
            vst1q_u64(m.count[h].as_mut_ptr(), vsubq_u64(vld1q_u64(m.count[h].as_ptr()), masks[h]));
        }
        out
    }
}

/// Never called: [`HAS_LANES`] is false here, so `Hot` has no lane groups.
/// Here so that `push_features` compiles on every target.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
fn push4(_: &[f32; W], _: &[[f32; W]], g: &LaneGroup, _: &mut LaneMoments) -> [u32; W] {
    g.nan_at
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
/// array (twice, with lanes: also transposed) and all counts of a shard in
/// another, so an update walks small contiguous blocks (≈4 KiB of edges per
/// layout, ≈9 KiB of counts for 30 features) that stay in L1/L2, instead of
/// two heap objects per column.
struct Hot {
    columns: Vec<HotColumn>,
    edges: Vec<f32>,
    labels: Vec<i64>,
    /// Bin counts of all columns: `ShardData::counts[..n_counts]`.
    n_counts: usize,
    /// The cross-column path for feature rows (see `push4`): groups of
    /// [`W`] features, empty where [`HAS_LANES`] is false (feature rows then
    /// take `push_row` like outputs do).
    lanes: Vec<LaneGroup>,
    /// The groups' transposed edges.
    edges_t: Vec<[f32; W]>,
    /// Features the lanes count NaN and moments for but do not bin (class
    /// features, more than [`COUNTED_EDGES`] edges): binned after the lanes.
    lane_fixups: Vec<usize>,
    /// With lanes, `ShardData::counts` has after the bin counts one NaN
    /// counter per feature (`n_counts + feature`) and one dummy slot (the
    /// last) that takes what the lanes do not count; so its length is
    /// `n_counts + features + 1`. Without lanes, `n_counts`.
    n_slots: usize,
}

impl Hot {
    fn new(reference: &ReferenceSketch) -> Hot {
        let mut hot = Hot {
            columns: Vec::new(),
            edges: Vec::new(),
            labels: Vec::new(),
            n_counts: 0,
            lanes: Vec::new(),
            edges_t: Vec::new(),
            lane_fixups: Vec::new(),
            n_slots: 0,
        };
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
        hot.n_slots = hot.n_counts;
        let features = reference.features.len();
        // Slots are u32 in the lanes (an edge index is at most
        // COUNTED_EDGES above its column's first slot).
        let fits = hot.n_counts + features + 1 + COUNTED_EDGES <= u32::MAX as usize;
        if HAS_LANES && features > 0 && fits {
            hot.build_lanes(reference);
        }
        hot
    }

    /// Lay out the features for `push4`, [`W`] columns per group.
    fn build_lanes(&mut self, reference: &ReferenceSketch) {
        let features = reference.features.len();
        let dummy = (self.n_counts + features) as u32;
        for first in (0..features).step_by(W) {
            let mut group =
                LaneGroup { lo: self.edges_t.len(), hi: 0, at: [dummy; W], nan_at: [dummy; W], shift: [[0.0; 2]; 2] };
            let mut lane_edges: [&[f32]; W] = [&[]; W];
            let end = features.min(first + W);
            for (l, (r, col)) in reference.features[first..end].iter().zip(&self.columns[first..end]).enumerate() {
                group.nan_at[l] = (self.n_counts + first + l) as u32;
                group.shift[l / 2][l % 2] = col.shift;
                match r.bins() {
                    Bins::Quantile { edges } if edges.len() <= COUNTED_EDGES => {
                        group.at[l] = col.counts_at as u32;
                        lane_edges[l] = edges;
                    }
                    _ => self.lane_fixups.push(first + l),
                }
            }
            let k_max = lane_edges.iter().map(|e| e.len()).max().unwrap_or(0);
            for k in 0..k_max {
                // NaN, never <= x, where a lane has no k-th edge.
                self.edges_t.push(std::array::from_fn(|l| lane_edges[l].get(k).copied().unwrap_or(f32::NAN)));
            }
            group.hi = self.edges_t.len();
            self.lanes.push(group);
        }
        self.n_slots = self.n_counts + features + 1;
    }

    fn empty(&self) -> ShardData {
        ShardData {
            counts: vec![0; self.n_slots],
            nan: vec![0; self.columns.len()],
            moments: vec![Moments::default(); self.columns.len()],
            lane_moments: vec![LaneMoments::default(); self.lanes.len()],
            samples: 0,
        }
    }
}

/// The bin of non-NaN `x` in `col`, the way `push_row` finds it.
#[inline(always)]
fn bin_of(col: &HotColumn, edges: &[f32], labels: &[i64], x: f32) -> usize {
    if col.classes {
        class_bin(&labels[col.lo..col.hi], x)
    } else if col.padded {
        count_blocked(&edges[col.lo..col.hi], x)
    } else {
        upper_bound(&edges[col.lo..col.hi], x)
    }
}

/// A shard's counts in [`Hot`]'s layout.
struct ShardData {
    /// Bin counts, then (with lanes) the features' NaN counts and the
    /// dummy slot: see `Hot::n_slots`.
    counts: Vec<u64>,
    /// NaN counts and moments of the columns `push_row` counts.
    nan: Vec<u64>,
    moments: Vec<Moments>,
    /// Moments of the features the lanes count, per [`LaneGroup`].
    lane_moments: Vec<LaneMoments>,
    samples: u64,
}

impl ShardData {
    /// Count one row: `values[i]` for the columns `cols` (whose indices
    /// start at `first`), one column at a time: the outputs, and the
    /// features where there are no lanes (`push_features`). It works on
    /// slices taken once (at opt-level "z", which devices are built with,
    /// `Vec` indexing is not inlined) and `count_blocked`, which needs no
    /// vectorisation to be fast.
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
            let bin = bin_of(col, edges, labels, x);
            counts[col.counts_at + bin] += 1;
            if x.is_finite() {
                moments[c].push(x, col.shift);
            }
        }
    }

    /// Count one row of features (all of them, in order) with the lanes:
    /// per group of [`W`] features one `push4`, then the slot increments
    /// it returns; features the lanes do not bin are binned after. Only
    /// called when `hot.lanes` is not empty.
    ///
    /// Loops run over index ranges on purpose: at opt-level "z" the
    /// iterator adapters (`zip`, `chunks_exact`, array `into_iter`) stay
    /// function calls per element (measured: the lanes were then slower
    /// than `push_row`).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn push_features(&mut self, hot: &Hot, values: &[f32]) {
        let (groups, edges_t) = (&hot.lanes[..], &hot.edges_t[..]);
        let counts = &mut self.counts[..];
        let moments = &mut self.lane_moments[..];
        for i in 0..groups.len().min(moments.len()) {
            let g = &groups[i];
            let start = i * W;
            // The four values as one array copy, not `copy_from_slice`: at
            // opt-level "z" that stays a call to libc's memmove, and the
            // vector load after it stalled (measured: 3× slower per
            // request). A last group with fewer than four features is
            // padded with NaN: it lands in the dummy slot and its moments
            // are never read.
            let full = match values.get(start..) {
                Some(rest) => rest.first_chunk::<W>(),
                None => None,
            };
            let x = match full {
                Some(x) => *x,
                None => {
                    let mut tail = [f32::NAN; W];
                    for l in 0..W {
                        if let Some(v) = values.get(start + l) {
                            tail[l] = *v;
                        }
                    }
                    tail
                }
            };
            let slots = push4(&x, &edges_t[g.lo..g.hi], g, &mut moments[i]);
            for l in 0..W {
                // Always in range (`Hot::build_lanes`); `get_mut` keeps
                // even a broken invariant from panicking a request.
                if let Some(n) = counts.get_mut(slots[l] as usize) {
                    *n += 1;
                }
            }
        }
        let (columns, edges, labels) = (&hot.columns[..], &hot.edges[..], &hot.labels[..]);
        for &c in &hot.lane_fixups[..] {
            // The lanes counted this feature's NaN and moments.
            if let (Some(col), Some(&x)) = (columns.get(c), values.get(c)) {
                if !x.is_nan() {
                    counts[col.counts_at + bin_of(col, edges, labels, x)] += 1;
                }
            }
        }
    }

    /// Add into `sketch` (same reference) and zero.
    fn add_into(&mut self, hot: &Hot, sketch: &mut DeviceSketch) {
        if self.samples == 0 {
            return;
        }
        let lanes = !hot.lanes.is_empty();
        let features = sketch.features.len();
        for (c, (col, out)) in hot.columns.iter().zip(sketch.columns_mut()).enumerate() {
            for (a, b) in out.counts.iter_mut().zip(&self.counts[col.counts_at..col.counts_at + col.n_bins]) {
                *a += *b;
            }
            out.nan_count += self.nan[c];
            out.moments.merge(&self.moments[c]);
            if lanes && c < features {
                out.nan_count += self.counts[hot.n_counts + c];
                out.moments.merge(&self.lane_moments[c / W].get(c % W));
            }
        }
        self.counts.iter_mut().for_each(|x| *x = 0);
        self.nan.iter_mut().for_each(|x| *x = 0);
        self.moments.iter_mut().for_each(|m| *m = Moments::default());
        self.lane_moments.iter_mut().for_each(|m| *m = LaneMoments::default());
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
    /// Cost: ~4 ns per column on x86 (see the module docs and
    /// `benches/drift.rs`).
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
            let lanes = !self.hot.lanes.is_empty();
            for r in 0..rows {
                let row = &features[r * nf..(r + 1) * nf];
                if lanes {
                    shard.push_features(&self.hot, row);
                } else {
                    shard.push_row(&self.hot, 0, f_cols, row);
                }
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

    /// Values for `/metrics`, from [`report`](Self::report).
    ///
    /// Counters (exposed as `…_total`): `outpost_drift_windows_closed`,
    /// `outpost_drift_lifetime_samples`. Gauges: `outpost_drift_detected`
    /// (0/1), `outpost_drift_score`, `outpost_drift_window_samples`, and
    /// per column (labels `column`,
    /// `role` = feature|output): `outpost_drift_column_flag`,
    /// `outpost_drift_column_psi`, `outpost_drift_column_js_distance`,
    /// `outpost_drift_column_statistic_lower`, `…_statistic_upper`,
    /// `…_threshold`, `…_score`, `…_page_hinkley`. A statistic a column
    /// does not have yet (too few samples) is left out, not reported as 0.
    pub fn gauges(&self) -> Vec<GaugeValue> {
        let report = self.report();
        let closed = report.window.index.map(|i| i + u64::from(report.window.complete)).unwrap_or(0);
        let g = |name, help, value: f64| GaugeValue { name, help, labels: Vec::new(), value, kind: MetricKind::Gauge };
        let c = |name, help, value: f64| GaugeValue { name, help, labels: Vec::new(), value, kind: MetricKind::Counter };
        let mut out = vec![
            g("outpost_drift_detected", "1 if any feature or output drifted in the reported window", f64::from(u8::from(report.drift))),
            g("outpost_drift_score", "Largest per-column drift score (>= 1 means drift)", report.score),
            g("outpost_drift_window_samples", "Samples in the reported drift window", report.window.samples as f64),
            c("outpost_drift_windows_closed", "Drift windows closed since start", closed as f64),
            c(
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
                    out.push(GaugeValue { name, help, labels: labels(), value, kind: MetricKind::Gauge });
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

    /// The lanes (`push_features`) count exactly what `ColumnSketch::push`
    /// counts, bit for bit: random values mixed with NaN, ±inf, ±0,
    /// subnormals, ±f32::MAX, values on an edge and one ulp either side;
    /// features with different edge counts side by side in a group (2 to 64
    /// edges in the lanes, a 101-edge and a class feature binned after them),
    /// feature counts that leave the last group part empty; one row at a
    /// time and in batches.
    #[test]
    fn lanes_count_exactly_what_column_sketch_push_counts() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let unit = |r: u64| (r >> 40) as f32 / (1u64 << 24) as f32;
        // Column j: reference values of scale 10^(j mod 7 − 3), some
        // negative, binned into `bins[j]` bins; j = 4 is a class feature.
        let bins = [32, 1, 7, 63, 0, 100, 2, 32, 16, 33, 5, 32, 64];
        let pool: Vec<ColumnReference> = bins
            .iter()
            .enumerate()
            .map(|(j, &b)| {
                let scale = 10f32.powi(j as i32 % 7 - 3);
                let values: Vec<f32> = (0..300).map(|_| (unit(next()) - 0.3) * scale).collect();
                if b == 0 {
                    ColumnReference::classes(&format!("c{j}"), &[0, 1, 3]).expect("builds")
                } else {
                    ColumnReference::quantile(&format!("c{j}"), &values, b).expect("builds")
                }
            })
            .collect();
        let label = ColumnReference::classes("label", &[0, 1]).expect("builds");
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            1e-45,
            f32::MAX,
            f32::MIN,
            3.0,
            -1.5,
        ];
        for features in [1, 3, 4, 5, 8, 9, 13] {
            let reference =
                Arc::new(ReferenceSketch { features: pool[..features].to_vec(), outputs: vec![label.clone()] });
            let mut value = |r: &ColumnReference| -> f32 {
                let pick = next();
                let edges = match r.bins() {
                    Bins::Quantile { edges } => &edges[..],
                    Bins::Classes { .. } => &[0.0, 1.0, 2.0, 3.0, 0.5][..],
                };
                match pick % 8 {
                    0 => specials[(pick >> 8) as usize % specials.len()],
                    1 | 2 => {
                        let e = edges[(pick >> 8) as usize % edges.len()];
                        [e, next_up(e), -next_up(-e)][(pick >> 16) as usize % 3]
                    }
                    _ => (unit(next()) - 0.4) * 1.3 * 10f32.powi((pick >> 8) as i32 % 9 - 4),
                }
            };
            let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..150)
                .map(|_| {
                    let x = reference.features.iter().map(&mut value).collect();
                    (x, reference.outputs.iter().map(&mut value).collect())
                })
                .collect();
            assert_same_sketch(&reference, &rows);
            // Which zero a min or max keeps, and what NaN, ±inf and
            // subnormals alone leave: every column the same value per row.
            let sequences: [&[f32]; 7] = [
                &[0.0, -0.0, 1.0],
                &[-0.0, 0.0, 1.0],
                &[0.0, -0.0, -1.0],
                &[-0.0, 0.0, -1.0],
                &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
                &[f32::NAN],
                &[1e-45, -1e-45, -0.0, 0.0],
            ];
            for seq in sequences {
                let rows: Vec<(Vec<f32>, Vec<f32>)> = seq.iter().map(|&v| (vec![v; features], vec![v])).collect();
                assert_same_sketch(&reference, &rows);
            }
        }
    }

    /// Count `rows` with a monitor (alternately one row and batches of
    /// up to 7) and with `DeviceSketch::push`, and require identical
    /// sketches, floats compared bit for bit.
    fn assert_same_sketch(reference: &Arc<ReferenceSketch>, rows: &[(Vec<f32>, Vec<f32>)]) {
        let config =
            MonitorConfig { window: WindowLength::Samples(u64::MAX / 2), shards: 1, ..MonitorConfig::default() };
        let monitor = DriftMonitor::new(reference.clone(), config).expect("valid config");
        assert_eq!(monitor.hot.lanes.is_empty(), !HAS_LANES);
        let mut want = DeviceSketch::empty(reference);
        let mut at = 0;
        for round in 0.. {
            let n = if round % 2 == 0 { 1 } else { 1 + round % 7 }.min(rows.len() - at);
            if n == 0 {
                break;
            }
            let batch = &rows[at..at + n];
            at += n;
            for (x, y) in batch {
                want.push(reference, x, y).expect("shape");
            }
            let xs: Vec<f32> = batch.iter().flat_map(|(x, _)| x.iter().copied()).collect();
            let ys: Vec<f32> = batch.iter().flat_map(|(_, y)| y.iter().copied()).collect();
            monitor.observe_batch(&xs, &ys).expect("shape");
        }
        let got = monitor.snapshot_and_roll();
        for (c, (g, w)) in got.columns().zip(want.columns()).enumerate() {
            let what = format!("{} features, column {c}, first row {:?}", reference.features.len(), rows.first());
            assert_eq!(g.counts, w.counts, "{what}");
            assert_eq!(g.nan_count, w.nan_count, "{what}");
            let (g, w) = (g.moments, w.moments);
            assert_eq!(g.count, w.count, "{what}");
            assert_eq!(g.min.to_bits(), w.min.to_bits(), "{what}: min {} vs {}", g.min, w.min);
            assert_eq!(g.max.to_bits(), w.max.to_bits(), "{what}: max {} vs {}", g.max, w.max);
            assert_eq!(g.sum.to_bits(), w.sum.to_bits(), "{what}: sum {} vs {}", g.sum, w.sum);
            assert_eq!(g.sum_sq.to_bits(), w.sum_sq.to_bits(), "{what}: sum_sq {} vs {}", g.sum_sq, w.sum_sq);
        }
    }
}
