//! How much one device may weigh in what the fleet concludes from many.
//!
//! A device signs its own telemetry, so its key proves who sent a number,
//! never that the number is true: a stolen device with valid credentials
//! signs whatever it likes. Rollout gates and canary analysis pool the
//! numbers of a whole cohort, and pooled sums are where one liar could
//! decide for everyone — a billion clean requests dilute the errors of ten
//! honest canaries until a bad version passes its gate. Two walls stop that:
//!
//! 1. **Plausible per window** (when a window is recorded,
//!    [`window_cap`]): a window's request counts and latency samples never
//!    exceed [`MAX_REQUESTS_PER_SEC`] × its span, the span counted as at
//!    least one second and at most [`MAX_WINDOW_SPAN_MS`]. Every sum
//!    saturates instead of overflowing.
//! 2. **Capped weight when pooled** ([`pool`]): in a pooled error rate or
//!    latency histogram, a device counts for at most [`WEIGHT_CAP`] × the
//!    cohort's (lower) median device; beyond that its counts are scaled down
//!    in proportion, so its *rate* and its *distribution* still count, its
//!    volume does not. One device claiming a billion clean requests weighs
//!    as four typical canaries; so does one claiming a billion errors.
//!
//! What a lying device can still do is fail *itself*: refuse the update,
//! report errors or drift. That is one failed device — exactly what an
//! honest broken device looks like, and what `--max-failed` is for. A lone
//! device (a one-device stage) is its own median and is judged on its own
//! numbers.

use outpost_runtime::protocol::LatencySketch;

/// Requests per second one device can plausibly serve. The device server
/// peaks near 60,000 requests/s on two cores (bench/http/results.md); the
/// cap leaves room above that and still bounds a window's claim.
pub const MAX_REQUESTS_PER_SEC: u64 = 100_000;
/// Longest span a window's counts are allowed for (the agent reports every
/// 10 s by default; windows buffered offline keep their own spans).
pub const MAX_WINDOW_SPAN_MS: u64 = 15 * 60 * 1000;
/// A device weighs at most this many times the cohort's median device.
pub const WEIGHT_CAP: u64 = 4;

/// The most requests (or latency samples) a window `[start, end)` may hold.
pub fn window_cap(start_ms: u64, end_ms: u64) -> u64 {
    let span_ms = end_ms.saturating_sub(start_ms).clamp(1000, MAX_WINDOW_SPAN_MS);
    MAX_REQUESTS_PER_SEC.saturating_mul(span_ms) / 1000
}

/// Clamps `(requests, input_errors, failures)` so that their sum stays
/// within `cap`, keeping their proportions.
pub fn clamp_counts(counts: (u64, u64, u64), cap: u64) -> (u64, u64, u64) {
    let (r, i, f) = counts;
    // u128: three u64 claims cannot overflow it, so proportions stay exact.
    let total = r as u128 + i as u128 + f as u128;
    if total <= cap as u128 {
        return counts;
    }
    let scale = |n: u64| (n as u128 * cap as u128 / total) as u64;
    (scale(r), scale(i), scale(f))
}

/// Samples in a sketch, unsaturated (a sum of claims may pass u64::MAX).
fn samples(sketch: &LatencySketch) -> f64 {
    sketch.buckets_log2_us.iter().map(|&n| n as f64).sum()
}

/// A latency sketch holding at most `cap` samples (scaled down in
/// proportion; a non-empty bucket keeps at least one sample).
pub fn clamp_sketch(sketch: &mut LatencySketch, cap: u64) {
    let total = samples(sketch);
    if total > cap as f64 {
        *sketch = sketch.scaled(cap as f64 / total);
    }
}

/// One device's numbers, as they go into a pooled figure.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contribution {
    /// Requests refused or failed.
    pub bad: u64,
    /// Every request: answered, refused and failed.
    pub total: u64,
    pub latency: LatencySketch,
}

/// Several devices' numbers pooled with capped weights (module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pooled {
    pub bad: u64,
    pub total: u64,
    pub latency: LatencySketch,
    /// Devices whose weight was capped.
    pub capped: usize,
}

impl Pooled {
    /// bad / total, `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.bad as f64 / self.total as f64)
    }
}

/// The lower median of the non-zero values, `None` when there are none.
fn lower_median(mut values: Vec<u64>) -> Option<u64> {
    values.retain(|v| *v > 0);
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    Some(values[(values.len() - 1) / 2])
}

/// Pools the devices' numbers, each weighing at most [`WEIGHT_CAP`] × the
/// median device — separately for requests and for latency samples, since a
/// device may send one without the other.
pub fn pool<'a>(devices: impl IntoIterator<Item = &'a Contribution>) -> Pooled {
    let devices: Vec<&Contribution> = devices.into_iter().collect();
    let cap = |median: Option<u64>| median.map(|m| m.saturating_mul(WEIGHT_CAP).max(1));
    let request_cap = cap(lower_median(devices.iter().map(|d| d.total).collect()));
    let sample_cap = cap(lower_median(devices.iter().map(|d| d.latency.total()).collect()));
    let mut out = Pooled::default();
    for d in devices {
        let mut was_capped = false;
        let (bad, total) = match request_cap {
            Some(cap) if d.total > cap => {
                was_capped = true;
                (((d.bad.min(d.total) as u128 * cap as u128) / d.total as u128) as u64, cap)
            }
            _ => (d.bad.min(d.total), d.total),
        };
        out.bad = out.bad.saturating_add(bad);
        out.total = out.total.saturating_add(total);
        let n = samples(&d.latency);
        match sample_cap {
            Some(cap) if n > cap as f64 => {
                was_capped = true;
                out.latency.merge(&d.latency.scaled(cap as f64 / n));
            }
            _ => out.latency.merge(&d.latency),
        }
        out.capped += usize::from(was_capped);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(bad: u64, total: u64) -> Contribution {
        Contribution { bad, total, latency: LatencySketch::default() }
    }

    fn latency(fast: u64, slow: u64) -> LatencySketch {
        let mut b = vec![0; 16];
        b[6] = fast; // ~100 µs
        b[14] = slow; // ~30 ms
        LatencySketch { buckets_log2_us: b }
    }

    #[test]
    fn one_device_cannot_dilute_its_peers_errors() {
        // Ten honest canaries, 20% errors each; one liar claims a billion
        // clean requests. Without the cap the pooled rate is ~0.
        let mut all: Vec<Contribution> = (0..10).map(|_| device(20, 100)).collect();
        all.push(device(0, 1_000_000_000));
        let p = pool(&all);
        assert_eq!(p.capped, 1);
        let rate = p.error_rate().expect("rate");
        assert!(rate > 0.14, "pooled error rate {rate} diluted by one device");
    }

    #[test]
    fn one_device_weighs_as_a_few_typical_ones_when_it_claims_errors() {
        let mut all: Vec<Contribution> = (0..10).map(|_| device(0, 100)).collect();
        all.push(device(u64::MAX, u64::MAX));
        let p = pool(&all);
        // 400 bad of 1400: its own rate counts, its volume does not.
        assert_eq!((p.bad, p.total), (400, 1400));
    }

    #[test]
    fn honest_cohorts_pool_as_plain_sums() {
        let all = [device(1, 90), device(2, 110), device(0, 100)];
        let p = pool(&all);
        assert_eq!((p.bad, p.total, p.capped), (3, 300, 0));
        let lone = pool(&[device(5, 1_000_000)]);
        assert_eq!((lone.bad, lone.total), (5, 1_000_000), "a lone device is its own median");
    }

    #[test]
    fn one_device_cannot_hide_its_peers_latency() {
        // Ten canaries whose p99 is slow; a liar sends a huge fast histogram.
        let mut all: Vec<Contribution> =
            (0..10).map(|_| Contribution { latency: latency(90, 10), ..Contribution::default() }).collect();
        all.push(Contribution { latency: latency(u64::MAX, 0), ..Contribution::default() });
        let p = pool(&all);
        assert_eq!(p.latency.quantile_us(0.99), Some(1 << 15), "p99 still in the slow bucket");
    }

    #[test]
    fn windows_and_counts_are_capped() {
        assert_eq!(window_cap(0, 10_000), 1_000_000);
        assert_eq!(window_cap(5, 5), MAX_REQUESTS_PER_SEC, "a zero span counts as one second");
        assert_eq!(window_cap(0, u64::MAX), MAX_REQUESTS_PER_SEC * MAX_WINDOW_SPAN_MS / 1000);
        assert_eq!(clamp_counts((10, 5, 5), 100), (10, 5, 5));
        assert_eq!(clamp_counts((u64::MAX, 0, u64::MAX), 100), (50, 0, 50));
        let mut s = latency(u64::MAX, u64::MAX);
        clamp_sketch(&mut s, 1000);
        assert!(s.total() <= 1000 + 2 && s.buckets_log2_us[6] > 0 && s.buckets_log2_us[14] > 0, "{s:?}");
    }
}
