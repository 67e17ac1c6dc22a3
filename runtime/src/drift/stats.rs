//! Drift statistics computed from bin counts alone.
//!
//! Every function takes two count vectors over the same bins — the
//! reference's and the device's — so they work the same on a window, a
//! lifetime, or a fleet-wide merge. All return `None` when a side is empty.

/// PSI replaces an empty bin's probability by this (without renormalising),
/// the common convention (e.g. Evidently's). Without it one empty bin makes
/// PSI infinite. `scripts/drift_reference.py` uses the same constant.
pub const PSI_EPSILON: f64 = 1e-4;

fn total(c: &[u64]) -> u64 {
    c.iter().sum()
}

/// Population Stability Index `Σ (q − p) · ln(q / p)` with `p` the reference
/// and `q` the device bin probabilities, empty bins floored at
/// [`PSI_EPSILON`]. Conventional reading: below 0.1 stable, 0.1–0.25
/// moderate, above 0.25 major shift. PSI is reported, not used in the
/// verdict: it has no sampling distribution that accounts for the window
/// size, and with 32 bins it is noisy on small windows (the 143 held-out
/// breast-cancer rows score PSI > 1 on some features with no shift at all,
/// because a few bins come out empty).
pub fn psi(reference: &[u64], device: &[u64]) -> Option<f64> {
    let (n1, n2) = (total(reference), total(device));
    if n1 == 0 || n2 == 0 || reference.len() != device.len() {
        return None;
    }
    let prob = |c: u64, n: u64| if c == 0 { PSI_EPSILON } else { c as f64 / n as f64 };
    Some(
        reference
            .iter()
            .zip(device)
            .map(|(&a, &b)| {
                let (p, q) = (prob(a, n1), prob(b, n2));
                (q - p) * (q / p).ln()
            })
            .sum(),
    )
}

/// Jensen–Shannon distance in base 2: `sqrt(JSD)`, with
/// `JSD = ½ KL(p‖m) + ½ KL(q‖m)` in bits and `m = (p + q)/2`. Bounded in
/// [0, 1] (1 for disjoint supports), needs no smoothing, symmetric; equals
/// `scipy.spatial.distance.jensenshannon(p, q, base=2)`.
pub fn js_distance(reference: &[u64], device: &[u64]) -> Option<f64> {
    let (n1, n2) = (total(reference), total(device));
    if n1 == 0 || n2 == 0 || reference.len() != device.len() {
        return None;
    }
    let mut jsd = 0.0;
    for (&a, &b) in reference.iter().zip(device) {
        let (p, q) = (a as f64 / n1 as f64, b as f64 / n2 as f64);
        let m = 0.5 * (p + q);
        if p > 0.0 {
            jsd += 0.5 * p * (p / m).log2();
        }
        if q > 0.0 {
            jsd += 0.5 * q * (q / m).log2();
        }
    }
    Some(jsd.clamp(0.0, 1.0).sqrt())
}

/// Total variation distance `½ Σ |p − q|` (the largest difference in the
/// probability of any set of bins). For class columns, where every bin is a
/// single value, this is exact.
pub fn tv_distance(reference: &[u64], device: &[u64]) -> Option<f64> {
    let (n1, n2) = (total(reference), total(device));
    if n1 == 0 || n2 == 0 || reference.len() != device.len() {
        return None;
    }
    let s: f64 = reference.iter().zip(device).map(|(&a, &b)| (a as f64 / n1 as f64 - b as f64 / n2 as f64).abs()).sum();
    Some(0.5 * s)
}

/// The interval the exact two-sample Kolmogorov–Smirnov statistic must lie
/// in, given only counts over shared ordered bins.
///
/// `reference` and `device` are counts over bins that partition the line in
/// order (intervals `[a, b)`); `point_tail` optionally appends one more bin
/// that is a single point above them all (NaN in Outpost's ordering).
///
/// Write `A`, `B` for a sample's empirical CDF just below a bin's lower and
/// upper edge. Both CDFs are known exactly at every edge, so
/// `lower = max over edges |A₁ − A₂|` (a left limit of `|F₁ − F₂|`, hence ≤ D).
/// Inside a bin each CDF rises from `A` to at most `B`, so
/// `|F₁(x) − F₂(x)| ≤ max(B₁ − A₂, B₂ − A₁)` there, and `upper` is the maximum
/// of that over bins (≥ D). Where one sample has no mass in a bin the bound
/// is attained, so under/overflow bins (empty in the reference) are exact.
/// The width is at most the larger of the two samples' mass in one bin.
pub fn ks_interval(reference: &[u64], device: &[u64], point_tail: Option<(u64, u64)>) -> Option<(f64, f64)> {
    if reference.len() != device.len() {
        return None;
    }
    let (t1, t2) = point_tail.unwrap_or((0, 0));
    let (n1, n2) = (total(reference) + t1, total(device) + t2);
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (f1, f2) = (n1 as f64, n2 as f64);
    let (mut c1, mut c2) = (0u64, 0u64);
    let (mut lower, mut upper) = (0.0f64, 0.0f64);
    for (&a, &b) in reference.iter().zip(device) {
        let (a1, a2) = (c1 as f64 / f1, c2 as f64 / f2);
        c1 += a;
        c2 += b;
        let (b1, b2) = (c1 as f64 / f1, c2 as f64 / f2);
        lower = lower.max((a1 - a2).abs());
        upper = upper.max(b1 - a2).max(b2 - a1);
    }
    // The edge after the last interval bin: below the point tail (if any),
    // where both CDFs are known exactly again.
    let end = (c1 as f64 / f1 - c2 as f64 / f2).abs();
    lower = lower.max(end);
    upper = upper.max(end);
    // The point tail itself: at the point both CDFs are 1, so it adds nothing.
    Some((lower, upper.max(lower)))
}

/// Critical value of the two-sample KS statistic at level `alpha`:
/// `c(α) · sqrt((n₁ + n₂)/(n₁ n₂))` with `c(α) = sqrt(ln(2/α)/2)` — the
/// first term of Kolmogorov's limiting distribution, `P(√n_eff·D > c) ≈
/// 2e^(−2c²)`, the same bound DKW–Massart proves exactly for one sample.
/// It is conservative for discrete data (ties only lower D).
pub fn ks_critical(alpha: f64, n1: u64, n2: u64) -> f64 {
    let (a, b) = (n1 as f64, n2 as f64);
    ((2.0 / alpha).ln() / 2.0).sqrt() * ((a + b) / (a * b)).sqrt()
}

/// Critical value of the total variation distance between two empirical
/// distributions over `cells` cells at level `alpha`, with no asymptotics:
/// Bretagnolle–Huber–Carol gives `P(TV(p̂, p) ≥ ε) ≤ 2^k e^(−2nε²)` for one
/// sample; splitting ε between the two samples in proportion to `1/√n` and
/// α equally, `ε = (1/√n₁ + 1/√n₂) · sqrt((k ln 2 + ln(2/α))/2)`.
pub fn tv_critical(alpha: f64, cells: usize, n1: u64, n2: u64) -> f64 {
    let s = 1.0 / (n1 as f64).sqrt() + 1.0 / (n2 as f64).sqrt();
    s * ((cells as f64 * std::f64::consts::LN_2 + (2.0 / alpha).ln()) / 2.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_have_zero_distance() {
        let c = [3, 5, 0, 2];
        assert_eq!(psi(&c, &c), Some(0.0));
        assert_eq!(js_distance(&c, &c), Some(0.0));
        // Upper end: the widest bin holds half of both samples.
        assert_eq!(ks_interval(&c, &c, None), Some((0.0, 0.5)));
    }

    #[test]
    fn disjoint_supports_have_js_one() {
        let d = js_distance(&[5, 0], &[0, 7]).unwrap();
        assert!((d - 1.0).abs() < 1e-12);
        assert_eq!(tv_distance(&[5, 0], &[0, 7]), Some(1.0));
        assert_eq!(ks_interval(&[5, 0], &[0, 7], None).map(|x| x.0), Some(1.0));
    }

    #[test]
    fn ks_interval_contains_exact_d() {
        // Reference 0..10, device 5..15, bins [0,5), [5,10), [10,15).
        let (lo, hi) = ks_interval(&[5, 5, 0], &[0, 5, 5], None).unwrap();
        assert!(lo <= 0.5 && 0.5 <= hi, "{lo} {hi}");
    }

    #[test]
    fn critical_values_shrink_with_n() {
        assert!(ks_critical(0.01, 100, 100) > ks_critical(0.01, 1000, 1000));
        let c = ks_critical(0.05, 1_000_000, 1_000_000);
        assert!((c - 1.358 * (2.0f64 / 1e6).sqrt()).abs() < 1e-4);
        assert!(tv_critical(0.01, 3, 100, 100) > tv_critical(0.01, 3, 10_000, 10_000));
    }
}
