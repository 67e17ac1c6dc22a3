//! Verdicts: from a reference and a device sketch to a [`DriftReport`].

use serde::{Deserialize, Serialize};

use super::reference::{Bins, ColumnKind, ColumnReference, ReferenceSketch};
use super::sketch::{ColumnSketch, DeviceSketch, SketchError};
use super::stats;

/// The knobs of the per-window verdict. See the [module docs](super) for
/// why each default is what it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Family-wise false-alarm probability per window: the chance that a
    /// window drawn from the reference distribution flags *any* column.
    /// Split evenly over the columns (Bonferroni).
    pub alpha: f64,
    /// Effect-size floor for continuous columns: the KS distance's lower
    /// end must reach it (0.1 = at some threshold value, 10 percentage points
    /// more or fewer samples fall below it than in the reference).
    pub ks_floor: f64,
    /// Effect-size floor for class columns, on the total variation distance
    /// (0.1 = 10 percentage points of predictions changed class).
    pub tv_floor: f64,
    /// Below this many samples a column gets statistics but no verdict.
    pub min_samples: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { alpha: 0.01, ks_floor: 0.1, tv_floor: 0.1, min_samples: 50 }
    }
}

/// Which distance a column's test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestStatistic {
    /// Two-sample Kolmogorov–Smirnov D, known from bins only as an interval.
    Ks,
    /// Total variation distance over classes (exact).
    Tv,
}

/// The significance-plus-effect-size test of one column in one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub statistic: TestStatistic,
    /// The exact statistic lies in `[lower, upper]` (equal for `tv`).
    pub lower: f64,
    pub upper: f64,
    /// Value the statistic must exceed to be significant at `alpha` for
    /// this window's and the reference's sample sizes.
    pub critical: f64,
    /// Effect-size floor (from [`Thresholds`]).
    pub floor: f64,
    /// `max(critical, floor)`: `lower` must reach it to flag.
    pub threshold: f64,
    /// Per-column significance level (family `alpha` / columns).
    pub alpha: f64,
    pub significant: bool,
    pub relevant: bool,
    /// `lower / threshold`: ≥ 1 means drift; comparable across columns
    /// and window sizes.
    pub score: f64,
}

/// Page–Hinkley state of one column over successive windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialStatus {
    /// `m_t − min m`: how far the cumulative excess of the window statistic
    /// over its running mean (minus `delta`) has risen from its minimum.
    pub statistic: f64,
    /// Alarm level λ.
    pub threshold: f64,
    pub alarm: bool,
    /// Windows fed so far.
    pub windows: u64,
}

/// Statistics and verdict for one input feature or model output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnReport {
    pub name: String,
    pub kind: ColumnKind,
    /// Window verdict, or a Page–Hinkley alarm.
    pub drift: bool,
    /// Samples in the window (NaN included) and in the reference.
    pub samples: u64,
    pub reference_samples: u64,
    pub nan_count: u64,
    pub reference_nan_count: u64,
    /// Samples outside the reference range (under/overflow, unseen class).
    pub out_of_range: u64,
    pub min: Option<f32>,
    pub max: Option<f32>,
    pub mean: Option<f64>,
    pub std: Option<f64>,
    pub reference_mean: Option<f64>,
    pub reference_std: Option<f64>,
    /// `(mean − reference_mean) / reference_std`.
    pub mean_shift_sd: Option<f64>,
    pub psi: Option<f64>,
    pub js_distance: Option<f64>,
    /// `None` below `min_samples`.
    pub test: Option<TestResult>,
    /// `None` outside a [`super::DriftMonitor`] (no window history).
    pub sequential: Option<SequentialStatus>,
}

/// How long a monitor's window is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowLength {
    /// Close after this many samples.
    Samples(u64),
    /// Close after this many seconds, once it holds `min_samples`.
    Seconds(u64),
}

/// Which data a report describes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowInfo {
    /// Sequence number of the window in its monitor (0-based), if any.
    pub index: Option<u64>,
    /// Whether the window had closed (a partial window is still filling).
    pub complete: bool,
    pub samples: u64,
    pub start_unix_ms: Option<u64>,
    pub end_unix_ms: Option<u64>,
    pub length: Option<WindowLength>,
    pub reference_samples: u64,
    /// Samples in the monitor's open window when the report was made.
    pub open_window_samples: Option<u64>,
    /// Samples the monitor has seen in its lifetime.
    pub lifetime_samples: Option<u64>,
}

/// The drift report served at `GET /v1/drift` (JSON) and derived on the
/// fleet from merged sketches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    pub window: WindowInfo,
    /// Any column flagged.
    pub drift: bool,
    /// Largest column score (≥ 1 means drift); the rollout gate's
    /// "drift score". 0 when no column has enough samples.
    pub score: f64,
    pub thresholds: Thresholds,
    pub features: Vec<ColumnReport>,
    pub outputs: Vec<ColumnReport>,
}

impl DriftReport {
    /// Compare `sketch` against `reference` — a window, a lifetime, or a
    /// fleet-wide merge. No sequential state: `sequential` is `None`.
    pub fn evaluate(
        reference: &ReferenceSketch,
        sketch: &DeviceSketch,
        thresholds: &Thresholds,
    ) -> Result<DriftReport, SketchError> {
        sketch.check_against(reference)?;
        Ok(Self::evaluate_unchecked(reference, sketch, thresholds))
    }

    /// [`evaluate`](Self::evaluate) for a sketch known to fit `reference`.
    pub(crate) fn evaluate_unchecked(reference: &ReferenceSketch, sketch: &DeviceSketch, thresholds: &Thresholds) -> DriftReport {
        let columns = reference.features.len() + reference.outputs.len();
        // Bonferroni: each column's test at alpha / columns keeps the chance
        // that any column of a drift-free window flags at or below alpha,
        // whatever the correlation between features.
        let alpha_col = thresholds.alpha / columns.max(1) as f64;
        let features: Vec<ColumnReport> = reference
            .features
            .iter()
            .zip(&sketch.features)
            .map(|(r, s)| column_report(r, s, thresholds, alpha_col))
            .collect();
        let outputs: Vec<ColumnReport> = reference
            .outputs
            .iter()
            .zip(&sketch.outputs)
            .map(|(r, s)| column_report(r, s, thresholds, alpha_col))
            .collect();
        let reference_samples = reference.columns().map(ColumnReference::total).max().unwrap_or(0);
        let mut report = DriftReport {
            window: WindowInfo {
                index: None,
                complete: true,
                samples: sketch.samples(),
                start_unix_ms: sketch.span.map(|s| s.start_unix_ms),
                end_unix_ms: sketch.span.map(|s| s.end_unix_ms),
                length: None,
                reference_samples,
                open_window_samples: None,
                lifetime_samples: None,
            },
            drift: false,
            score: 0.0,
            thresholds: thresholds.clone(),
            features,
            outputs,
        };
        report.refresh_summary();
        report
    }

    /// All column reports, features first.
    pub fn columns(&self) -> impl Iterator<Item = &ColumnReport> {
        self.features.iter().chain(self.outputs.iter())
    }

    pub fn columns_mut(&mut self) -> impl Iterator<Item = &mut ColumnReport> {
        self.features.iter_mut().chain(self.outputs.iter_mut())
    }

    /// Names of the flagged columns.
    pub fn flagged(&self) -> Vec<&str> {
        self.columns().filter(|c| c.drift).map(|c| c.name.as_str()).collect()
    }

    /// Recompute `drift` and `score` from the columns.
    pub(crate) fn refresh_summary(&mut self) {
        let drift = self.columns().any(|c| c.drift);
        let score = self.columns().filter_map(|c| c.test.as_ref().map(|t| t.score)).fold(0.0, f64::max);
        self.drift = drift;
        self.score = score;
    }
}

fn column_report(r: &ColumnReference, s: &ColumnSketch, th: &Thresholds, alpha_col: f64) -> ColumnReport {
    // Counts with NaN as one more cell after the bins: PSI and JS see a
    // change in the missing rate like any other change of distribution.
    let with_nan = |counts: &[u64], nan: u64| -> Vec<u64> { counts.iter().copied().chain(std::iter::once(nan)).collect() };
    let rc = with_nan(r.counts(), r.nan_count());
    let dc = with_nan(&s.counts, s.nan_count);
    let (n_ref, n_dev) = (r.total(), s.total());

    let shift = r.shift();
    let mean = s.moments.mean(shift);
    let std = s.moments.variance().map(f64::sqrt);
    let ref_stats = r.stats();
    let mean_shift_sd = match (mean, ref_stats) {
        (Some(m), Some(rs)) if rs.std > 0.0 => Some((m - rs.mean) / rs.std),
        _ => None,
    };

    let test = if n_dev >= th.min_samples.max(1) {
        let (statistic, interval, critical, floor) = match r.bins() {
            Bins::Quantile { .. } => (
                TestStatistic::Ks,
                // NaN sorts after +inf, so the KS test also sees a change
                // in the missing rate.
                stats::ks_interval(r.counts(), &s.counts, Some((r.nan_count(), s.nan_count))),
                stats::ks_critical(alpha_col, n_ref, n_dev),
                th.ks_floor,
            ),
            Bins::Classes { .. } => {
                let tv = stats::tv_distance(&rc, &dc);
                (TestStatistic::Tv, tv.map(|d| (d, d)), stats::tv_critical(alpha_col, rc.len(), n_ref, n_dev), th.tv_floor)
            }
        };
        interval.map(|(lower, upper)| {
            let threshold = critical.max(floor);
            let significant = lower > critical;
            let relevant = lower >= floor;
            TestResult {
                statistic,
                lower,
                upper,
                critical,
                floor,
                threshold,
                alpha: alpha_col,
                significant,
                relevant,
                score: if threshold > 0.0 { lower / threshold } else { 0.0 },
            }
        })
    } else {
        None
    };

    ColumnReport {
        name: r.name().to_string(),
        kind: r.kind(),
        drift: test.as_ref().is_some_and(|t| t.significant && t.relevant),
        samples: n_dev,
        reference_samples: n_ref,
        nan_count: s.nan_count,
        reference_nan_count: r.nan_count(),
        out_of_range: s.out_of_range(r),
        min: (s.moments.count > 0).then_some(s.moments.min),
        max: (s.moments.count > 0).then_some(s.moments.max),
        mean,
        std,
        reference_mean: ref_stats.map(|x| x.mean),
        reference_std: ref_stats.map(|x| x.std),
        mean_shift_sd,
        psi: stats::psi(&rc, &dc),
        js_distance: stats::js_distance(&rc, &dc),
        test,
        sequential: None,
    }
}
