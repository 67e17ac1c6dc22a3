//! Canary statistics: is a canary group worse than its baseline, with what
//! uncertainty?
//!
//! [`Observations::compare`](crate::observations::Observations::compare)
//! sums each group's telemetry and sketches over the same window and hands
//! the sums to the functions here. Every metric comes back as a
//! [`CanaryMetric`]: both values, their difference (canary − baseline, so
//! positive is worse for every metric here), and an interval for the
//! difference.
//!
//! # When a difference counts
//!
//! The same philosophy as the device's drift verdicts (issue 5): a metric is
//! `significantly_worse` only when **both**
//!
//! 1. the interval excludes 0 on the bad side (`ci_low > 0`), at a level
//!    strict enough that a handful of metrics checked at every gate tick
//!    does not halt good rollouts by chance (z = 2.576: two-sided 99%,
//!    0.5% one-sided per metric), **and**
//! 2. the difference passes an effect-size floor: at large n every
//!    difference is "significant", and a rollout gate that halts on a
//!    0.01-point error-rate change will be switched off by its operators.
//!
//! | metric | statistic | interval | floor |
//! |---|---|---|---|
//! | `error_rate` | (input errors + failures) / all answered requests | Newcombe's hybrid score interval (Wilson per group) | +0.5 points and ×1.25 |
//! | `latency_p50_ms`, `latency_p99_ms` | quantile of the merged log2 latency sketch (bucket upper bound) | distribution-free order-statistic interval (exact binomial ranks), mapped to bucket edges; the difference takes the widest combination | +1 ms and ×1.25 |
//! | `predictions:{output}` | total variation distance between the two groups' output histograms (same bins) | `[tv − critical, tv]`, critical from Bretagnolle–Huber–Carol at α = 0.01 | 0.1 (the drift monitor's `tv_floor`) |
//! | `prediction_mean:{output}` | mean output (when the two versions bin outputs differently) | Welch normal interval on the mean difference (absolute) | 0.2 pooled sd |
//!
//! The error-rate interval treats requests as independent. They are not
//! quite (a device with a broken sensor fails all of its requests), which
//! makes the interval too narrow when one device dominates; the effect-size
//! floor and the stage's device count are the protection. The latency
//! interval needs no such assumption beyond independence of requests, and
//! is conservative by construction (bucket edges).

use outpost_runtime::drift::{stats, ColumnSketch, Thresholds};
use outpost_runtime::protocol::LatencySketch;

use crate::observations::CanaryMetric;

/// Normal quantile for the intervals (two-sided 99%).
pub const Z: f64 = 2.576;
/// Error rate: the canary must be worse by at least this many (absolute)…
pub const ERROR_RATE_FLOOR: f64 = 0.005;
/// …and by this factor.
pub const RATIO_FLOOR: f64 = 1.25;
/// Latency quantiles: at least this much slower (ms), and by [`RATIO_FLOOR`].
pub const LATENCY_FLOOR_MS: f64 = 1.0;
/// Prediction means: at least this many pooled standard deviations apart.
pub const MEAN_FLOOR_SD: f64 = 0.2;

/// Wilson score interval of a proportion `k / n` (`n > 0`).
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The error-rate metric: `bad` of `total` requests per group.
/// `None` when either group answered nothing.
pub fn error_rate(canary: (u64, u64), baseline: (u64, u64)) -> Option<CanaryMetric> {
    let ((k1, n1), (k2, n2)) = (canary, baseline);
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let (l1, u1) = wilson(k1, n1, Z);
    let (l2, u2) = wilson(k2, n2, Z);
    // Newcombe (1998), method 10: combine the two Wilson intervals.
    let d = p1 - p2;
    let low = d - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt();
    let high = d + ((u1 - p1).powi(2) + (p2 - l2).powi(2)).sqrt();
    let relevant = d >= ERROR_RATE_FLOOR && p1 >= RATIO_FLOOR * p2;
    Some(CanaryMetric {
        name: "error_rate".into(),
        canary: p1,
        baseline: p2,
        difference: d,
        ci_low: low,
        ci_high: high,
        significantly_worse: low > 0.0 && relevant,
    })
}

/// Lower and upper edge (µs) of latency bucket `i`: `[2^i, 2^(i+1))`, with
/// bucket 0 also holding everything under 1 µs.
fn bucket_edges_us(i: usize) -> (f64, f64) {
    let low = if i == 0 { 0.0 } else { (2f64).powi(i as i32) };
    (low, (2f64).powi(i as i32 + 1))
}

/// The bucket holding the sample of 1-based rank `rank`.
fn bucket_of_rank(sketch: &LatencySketch, rank: u64) -> Option<usize> {
    let mut seen = 0;
    for (i, n) in sketch.buckets_log2_us.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(i);
        }
    }
    None
}

/// One-sided level of each end of the quantile interval (matches [`Z`]).
const QUANTILE_TAIL: f64 = 0.005;

/// The 1-based ranks `(low, high)` of the order statistics that bracket
/// the `q` quantile of the population with confidence `1 − 2·QUANTILE_TAIL`
/// from `n` samples: `P(X(low) ≤ ξ_q) = P(Bin(n, q) ≥ low)` and
/// `P(X(high) ≥ ξ_q) = P(Bin(n, q) ≤ high − 1)`. `low = 0` means no lower
/// bound (−∞), `high = n + 1` no upper bound (+∞): with 3 samples the p99 is
/// above the largest of them 97% of the time. Exact binomial sums (in log
/// space) while `nq(1−q)` is small, the normal approximation beyond.
fn quantile_ranks(n: u64, q: f64) -> (u64, u64) {
    let nf = n as f64;
    let var = nf * q * (1.0 - q);
    if var >= 25.0 {
        let spread = Z * var.sqrt();
        let low = (nf * q - spread).floor().max(0.0) as u64;
        let high = ((nf * q + spread).ceil() as u64 + 1).min(n + 1);
        return (low, high);
    }
    // pmf of Bin(n, q) by the recurrence pmf(k+1) = pmf(k)·(n−k)/(k+1)·q/(1−q).
    let q = q.clamp(1e-12, 1.0 - 1e-12);
    let mut log_pmf = nf * (1.0 - q).ln();
    let odds = (q / (1.0 - q)).ln();
    let mut pmf = Vec::with_capacity(n as usize + 1);
    for k in 0..=n {
        pmf.push(log_pmf.exp());
        if k < n {
            log_pmf += ((nf - k as f64) / (k as f64 + 1.0)).ln() + odds;
        }
    }
    // low: the largest k with P(B ≥ k) ≥ 1 − tail.
    let mut upper_tail = 0.0; // P(B ≥ k), built from the top
    let mut low = 0;
    for k in (1..=n).rev() {
        upper_tail += pmf[k as usize];
        if upper_tail >= 1.0 - QUANTILE_TAIL {
            low = k;
            break;
        }
    }
    // high: the smallest k with P(B ≤ k − 1) ≥ 1 − tail.
    let mut cdf = 0.0;
    let mut high = n + 1;
    for k in 1..=n {
        cdf += pmf[k as usize - 1];
        if cdf >= 1.0 - QUANTILE_TAIL {
            high = k;
            break;
        }
    }
    (low, high)
}

/// Where the `q` quantile lies, in ms: (estimate = upper edge of its bucket,
/// like the device's telemetry; lowest plausible; highest plausible). The
/// plausible range maps the order-statistic ranks of [`quantile_ranks`] to
/// bucket edges, so it holds both the sampling and the binning uncertainty;
/// an end with no bound is 0 or +∞.
pub fn quantile_interval_ms(sketch: &LatencySketch, q: f64) -> Option<(f64, f64, f64)> {
    let n: u64 = sketch.buckets_log2_us.iter().sum();
    if n == 0 {
        return None;
    }
    let point = bucket_of_rank(sketch, ((n as f64 * q).ceil() as u64).clamp(1, n))?;
    let (low_rank, high_rank) = quantile_ranks(n, q);
    let low = match low_rank {
        0 => 0.0,
        r => bucket_edges_us(bucket_of_rank(sketch, r)?).0,
    };
    let high = if high_rank > n { f64::INFINITY } else { bucket_edges_us(bucket_of_rank(sketch, high_rank)?).1 };
    Some((bucket_edges_us(point).1 / 1000.0, low / 1000.0, high / 1000.0))
}

/// A latency quantile metric, `None` when either group has no latencies.
pub fn latency(name: &str, q: f64, canary: &LatencySketch, baseline: &LatencySketch) -> Option<CanaryMetric> {
    let (c, c_low, c_high) = quantile_interval_ms(canary, q)?;
    let (b, b_low, b_high) = quantile_interval_ms(baseline, q)?;
    let d = c - b;
    let low = c_low - b_high;
    let relevant = d >= LATENCY_FLOOR_MS && c >= RATIO_FLOOR * b;
    Some(CanaryMetric {
        name: name.into(),
        canary: c,
        baseline: b,
        difference: d,
        ci_low: low,
        ci_high: c_high - b_low,
        significantly_worse: low > 0.0 && relevant,
    })
}

/// Counts with NaN as one more cell, as the drift verdicts count them.
fn cells(c: &ColumnSketch) -> Vec<u64> {
    c.counts.iter().copied().chain(std::iter::once(c.nan_count)).collect()
}

/// Prediction distributions over the same bins: total variation distance
/// between the canary's and the baseline's output histograms. "Worse" here
/// means "changed": a new version whose predictions move 10 points of
/// traffic to other bins is exactly what a human should look at first.
/// `columns` is the number of compared outputs (Bonferroni, as on devices).
pub fn predictions(name: &str, canary: &ColumnSketch, baseline: &ColumnSketch, columns: usize) -> Option<CanaryMetric> {
    let (a, b) = (cells(canary), cells(baseline));
    let tv = stats::tv_distance(&b, &a)?;
    let th = Thresholds::default();
    let (n1, n2) = (canary.total(), baseline.total());
    if n1 < th.min_samples || n2 < th.min_samples {
        return None;
    }
    let critical = stats::tv_critical(th.alpha / columns.max(1) as f64, a.len(), n1, n2);
    Some(CanaryMetric {
        name: format!("predictions:{name}"),
        canary: tv,
        baseline: 0.0,
        difference: tv,
        ci_low: tv - critical,
        ci_high: tv,
        significantly_worse: tv > critical && tv >= th.tv_floor,
    })
}

/// Mean output, for outputs the two versions bin differently (a regressor's
/// quantile edges come from each model's own outputs). A shift either way
/// is a change, so the interval is on the absolute difference.
pub fn prediction_mean(name: &str, canary: &ColumnSketch, baseline: &ColumnSketch, canary_shift: f64, baseline_shift: f64) -> Option<CanaryMetric> {
    let (m1, m2) = (canary.moments.mean(canary_shift)?, baseline.moments.mean(baseline_shift)?);
    let (v1, v2) = (canary.moments.variance()?, baseline.moments.variance()?);
    let (n1, n2) = (canary.moments.count as f64, baseline.moments.count as f64);
    let se = (v1 / n1 + v2 / n2).sqrt();
    let d = m1 - m2;
    let pooled_sd = ((v1 * (n1 - 1.0) + v2 * (n2 - 1.0)) / (n1 + n2 - 2.0)).sqrt();
    let (low, high) = (d.abs() - Z * se, d.abs() + Z * se);
    Some(CanaryMetric {
        name: format!("prediction_mean:{name}"),
        canary: m1,
        baseline: m2,
        difference: d,
        ci_low: d - Z * se,
        ci_high: d + Z * se,
        significantly_worse: low > 0.0 && high.is_finite() && d.abs() >= MEAN_FLOOR_SD * pooled_sd && pooled_sd > 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // 10/100 at 95%: Wilson gives [0.0552, 0.1744].
        let (l, u) = wilson(10, 100, 1.959964);
        assert!((l - 0.0552).abs() < 1e-3 && (u - 0.1744).abs() < 1e-3, "{l} {u}");
        let (l, u) = wilson(0, 50, Z);
        assert_eq!(l, 0.0);
        assert!(u > 0.0 && u < 0.15);
    }

    #[test]
    fn error_rate_needs_significance_and_size() {
        // Doubled (5% → 10%) at large n: worse.
        let m = error_rate((1_000, 10_000), (500, 10_000)).unwrap();
        assert!(m.significantly_worse && m.ci_low > 0.0, "{m:?}");
        // The same rates at n = 40 per group: not provable.
        let m = error_rate((4, 40), (2, 40)).unwrap();
        assert!(!m.significantly_worse && m.ci_low < 0.0, "{m:?}");
        // 1.00% vs 1.02% at 10 million: significant, too small to matter.
        let m = error_rate((102_000, 10_000_000), (100_000, 10_000_000)).unwrap();
        assert!(!m.significantly_worse, "{m:?}");
        // Better is never worse.
        let m = error_rate((500, 10_000), (1_000, 10_000)).unwrap();
        assert!(!m.significantly_worse && m.ci_high < 0.0);
        assert!(error_rate((0, 0), (1, 10)).is_none());
    }

    fn column(values: impl Iterator<Item = f32>) -> ColumnSketch {
        let mut c = ColumnSketch { counts: vec![0; 3], nan_count: 0, moments: Default::default() };
        for v in values {
            c.counts[0] += 1;
            c.moments.push(v, 0.0);
        }
        c
    }

    #[test]
    fn prediction_means_need_size_and_significance() {
        // Outputs ~U(0,1) vs shifted by 0.3 (≈ 1 sd), 1,000 each: worse.
        let base = column((0..1000).map(|i| i as f32 / 1000.0));
        let moved = column((0..1000).map(|i| i as f32 / 1000.0 + 0.3));
        let m = prediction_mean("score", &moved, &base, 0.0, 0.0).unwrap();
        assert!(m.significantly_worse && (m.difference - 0.3).abs() < 1e-3, "{m:?}");
        // Shifted by 0.01 (0.03 sd): significant at 100,000, too small to matter.
        let base = column((0..100_000).map(|i| (i % 1000) as f32 / 1000.0));
        let nudged = column((0..100_000).map(|i| (i % 1000) as f32 / 1000.0 + 0.01));
        assert!(!prediction_mean("score", &nudged, &base, 0.0, 0.0).unwrap().significantly_worse);
        // Identical: not worse.
        assert!(!prediction_mean("score", &base, &base, 0.0, 0.0).unwrap().significantly_worse);
    }

    fn sketch_at(bucket: usize, n: u64) -> LatencySketch {
        let mut b = vec![0; bucket + 1];
        b[bucket] = n;
        LatencySketch { buckets_log2_us: b }
    }

    #[test]
    fn quantile_ranks_are_exact_for_small_n() {
        // 3 samples: the p99 is above the maximum 97% of the time (no upper
        // bound), and X(2) ≤ p99 with probability 1 − 0.01³·… ≥ 99.5%.
        assert_eq!(quantile_ranks(3, 0.99), (2, 4));
        // The median of 100: the textbook 99% ranks are 37 and 64.
        let (l, h) = quantile_ranks(100, 0.5);
        assert!((36..=38).contains(&l) && (63..=65).contains(&h), "{l} {h}");
    }

    #[test]
    fn latency_intervals_are_bucket_aligned() {
        // All in bucket 10 ([1024, 2048) µs): the quantile is in that bucket.
        let (p, l, h) = quantile_interval_ms(&sketch_at(10, 1000), 0.99).unwrap();
        assert_eq!((p, l, h), (2.048, 1.024, 2.048));
        // 4 ms vs 1 ms for every request: worse.
        let m = latency("latency_p99_ms", 0.99, &sketch_at(12, 5000), &sketch_at(10, 5000)).unwrap();
        assert!(m.significantly_worse && m.ci_low > 0.0, "{m:?}");
        // Same distribution: not worse.
        let m = latency("latency_p99_ms", 0.99, &sketch_at(10, 5000), &sketch_at(10, 5000)).unwrap();
        assert!(!m.significantly_worse);
        // One slow request among three is no evidence of a slow p99.
        let mut few = sketch_at(12, 1);
        few.buckets_log2_us[10] = 2;
        let m = latency("latency_p99_ms", 0.99, &few, &sketch_at(10, 3)).unwrap();
        assert!(!m.significantly_worse, "{m:?}");
    }
}
