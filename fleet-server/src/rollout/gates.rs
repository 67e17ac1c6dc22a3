//! Gates: the checks a stage must pass before the rollout goes on.
//!
//! Each gate turns the stage's telemetry into one number and compares it
//! with the operator's limit. They read the version-tagged telemetry of the
//! stage's whole cohort (every device on the new version, earlier stages
//! included) over the windows that ended since the stage started.
//!
//! | gate | value | passes when | flag |
//! |---|---|---|---|
//! | `error_rate` | (input errors + failures) / every request, summed over the cohort | value ≤ limit | `--max-error-rate` |
//! | `p99_ms` | p99 latency of the merged latency sketches, ms (log2-bucket upper bound) | value ≤ limit | `--max-p99-ms` |
//! | `drift` | the largest drift score a device reported (≥ 1 means drift) | value ≤ limit | `--max-drift` |
//! | `reporting` | share of the cohort that sent telemetry for the new version | value ≥ limit | `--min-reporting` |
//! | `failed` | devices failed: rolled back by themselves, refused, silent or not committed by the deadline | value ≤ limit | `--max-failed` |
//! | `canary_analysis` | metrics significantly worse on the canaries than on the baseline | value = 0 | `--compare-to-baseline` |
//!
//! The pooled gates (`error_rate`, `p99_ms`) and the canary analysis weigh
//! each device at most [`WEIGHT_CAP`](crate::contribution::WEIGHT_CAP) ×
//! the cohort's median device, and every window's counts are capped to what
//! one device can serve ([`crate::contribution`]): a lying canary's volume
//! cannot make a gate pass or fail for the others. It can fail itself — one
//! failed device, which `--max-failed` counts like any other.
//!
//! Client errors count in the error rate on purpose: a version that rejects
//! requests its predecessor served (an input schema change) is exactly what
//! a canary must catch, and the device's own probation, which counts only
//! 5xx, lets it through.
//!
//! A gate with no data (no requests yet, no latency figures) has no value
//! and passes: the `reporting` gate is the one that catches silence.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::contribution::{self, Contribution};

/// The limits of a rollout (the `--max-*` / `--min-*` flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<f64>,
    pub max_drift: Option<f64>,
    /// Share of the stage's devices that must report, 0..=1.
    pub min_reporting: f64,
    pub max_failed: u32,
    pub compare_to_baseline: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_error_rate: None,
            max_p99_ms: None,
            max_drift: None,
            min_reporting: 1.0,
            max_failed: 0,
            compare_to_baseline: false,
        }
    }
}

impl Limits {
    /// Refuses limits that cannot mean anything.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: Option<f64>, max: Option<f64>| -> Result<(), String> {
            match v {
                Some(x) if !x.is_finite() || x < 0.0 || max.is_some_and(|m| x > m) => Err(format!(
                    "{name} {x} must be a number{}",
                    max.map(|m| format!(" in [0, {m}]")).unwrap_or_else(|| " ≥ 0".into())
                )),
                _ => Ok(()),
            }
        };
        check("max_error_rate", self.max_error_rate, Some(1.0))?;
        check("max_p99_ms", self.max_p99_ms, None)?;
        check("max_drift", self.max_drift, None)?;
        check("min_reporting", Some(self.min_reporting), Some(1.0))?;
        Ok(())
    }
}

/// One device's telemetry over the stage, for the new version: the
/// observations' per-device sum, as it is (`windows` = 0: did not report).
pub use crate::observations::DeviceWindow as Window;

/// The verdict of the canary analysis (the observations' `CanaryReport`).
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    /// Metrics significantly worse on the canaries.
    pub worse_metrics: Vec<String>,
    /// The whole report, kept in the stage record for `rollout status`.
    pub report: serde_json::Value,
}

/// One gate's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// `None`: no data (passes; see module docs).
    pub value: Option<f64>,
    pub limit: f64,
    pub pass: bool,
}

impl GateResult {
    fn at_most(value: Option<f64>, limit: f64) -> GateResult {
        GateResult { value, limit, pass: value.is_none_or(|v| v <= limit) }
    }
}

/// What the gates read.
pub struct Inputs<'a> {
    /// Telemetry of the cohort's devices that reported.
    pub windows: Vec<&'a Window>,
    /// Devices in the cohort.
    pub cohort: usize,
    /// Of which failed.
    pub failed: usize,
    /// The canary analysis, when asked for and a baseline exists.
    pub analysis: Option<&'a Analysis>,
}

/// Every configured gate's outcome, by name (module docs).
pub fn evaluate(limits: &Limits, input: &Inputs<'_>) -> BTreeMap<String, GateResult> {
    let mut out = BTreeMap::new();
    // One device weighs at most a few typical ones (crate::contribution).
    let contributions: Vec<Contribution> = input.windows.iter().map(|w| w.contribution()).collect();
    let pooled = contribution::pool(&contributions);
    if let Some(limit) = limits.max_error_rate {
        out.insert("error_rate".into(), GateResult::at_most(pooled.error_rate(), limit));
    }
    if let Some(limit) = limits.max_p99_ms {
        let value = pooled
            .latency
            .quantile_us(0.99)
            .map(|us| us as f64 / 1000.0)
            .or_else(|| input.windows.iter().filter_map(|w| w.latency_p99_ms).reduce(f64::max));
        out.insert("p99_ms".into(), GateResult::at_most(value, limit));
    }
    if let Some(limit) = limits.max_drift {
        let value = input.windows.iter().filter_map(|w| w.drift_score).reduce(f64::max);
        out.insert("drift".into(), GateResult::at_most(value, limit));
    }
    let reporting = input.windows.iter().filter(|w| w.windows > 0).count();
    let share = if input.cohort == 0 { 1.0 } else { reporting as f64 / input.cohort as f64 };
    // A tolerance for 9/10 vs 0.9 written as a decimal.
    out.insert(
        "reporting".into(),
        GateResult { value: Some(share), limit: limits.min_reporting, pass: share + 1e-9 >= limits.min_reporting },
    );
    out.insert("failed".into(), GateResult::at_most(Some(input.failed as f64), limits.max_failed as f64));
    if limits.compare_to_baseline {
        let value = input.analysis.map(|a| a.worse_metrics.len() as f64);
        out.insert("canary_analysis".into(), GateResult::at_most(value, 0.0));
    }
    out
}

/// The first failing gate as a sentence for `reason`, e.g.
/// `gate error_rate failed: 0.25 > limit 0.05`.
pub fn failure(gates: &BTreeMap<String, GateResult>, analysis: Option<&Analysis>) -> Option<String> {
    // The order an operator should read them in: the failure count first.
    const ORDER: [&str; 6] = ["failed", "reporting", "error_rate", "p99_ms", "drift", "canary_analysis"];
    for name in ORDER {
        let Some(g) = gates.get(name) else { continue };
        if g.pass {
            continue;
        }
        let value = g.value.map(fmt).unwrap_or_else(|| "-".into());
        let cmp = if name == "reporting" { "<" } else { ">" };
        let mut s = format!("gate {name} failed: {value} {cmp} limit {}", fmt(g.limit));
        if name == "canary_analysis" {
            if let Some(a) = analysis {
                s.push_str(&format!(" (worse on the canaries: {})", a.worse_metrics.join(", ")));
            }
        }
        return Some(s);
    }
    None
}

/// A short decimal: 0.25, 12.5, 3.
pub fn fmt(x: f64) -> String {
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(requests: u64, errors: u64) -> Window {
        Window { requests, input_errors: errors, windows: 1, ..Window::default() }
    }

    #[test]
    fn error_rate_counts_client_errors() {
        let limits = Limits { max_error_rate: Some(0.05), ..Limits::default() };
        let a = w(90, 10);
        let g = evaluate(&limits, &Inputs { windows: vec![&a], cohort: 1, failed: 0, analysis: None });
        assert_eq!(g["error_rate"].value, Some(0.1));
        assert!(!g["error_rate"].pass);
        assert_eq!(failure(&g, None).as_deref(), Some("gate error_rate failed: 0.1 > limit 0.05"));
    }

    #[test]
    fn no_data_passes_but_reporting_catches_silence() {
        let limits = Limits { max_error_rate: Some(0.0), max_p99_ms: Some(1.0), max_drift: Some(1.0), ..Limits::default() };
        let g = evaluate(&limits, &Inputs { windows: vec![], cohort: 2, failed: 0, analysis: None });
        assert!(g["error_rate"].pass && g["p99_ms"].pass && g["drift"].pass);
        assert!(!g["reporting"].pass);
        assert_eq!(g["reporting"].value, Some(0.0));
    }

    #[test]
    fn p99_merges_sketches() {
        let limits = Limits { max_p99_ms: Some(1.0), ..Limits::default() };
        // 2^11 µs upper bound = 2.048 ms
        let mut a = w(100, 0);
        a.latency.buckets_log2_us = vec![0; 12];
        a.latency.buckets_log2_us[10] = 100;
        let g = evaluate(&limits, &Inputs { windows: vec![&a], cohort: 1, failed: 0, analysis: None });
        assert_eq!(g["p99_ms"].value, Some(2.048));
        assert!(!g["p99_ms"].pass);
    }

    #[test]
    fn reporting_share_and_failed_count() {
        let limits = Limits { min_reporting: 0.9, max_failed: 1, ..Limits::default() };
        let ws: Vec<Window> = (0..9).map(|_| w(1, 0)).collect();
        let g = evaluate(&limits, &Inputs { windows: ws.iter().collect(), cohort: 10, failed: 1, analysis: None });
        assert!(g["reporting"].pass, "9/10 meets 0.9");
        assert!(g["failed"].pass);
        let g = evaluate(&limits, &Inputs { windows: ws.iter().collect(), cohort: 10, failed: 2, analysis: None });
        assert_eq!(failure(&g, None).as_deref(), Some("gate failed failed: 2 > limit 1"));
    }

    #[test]
    fn canary_analysis_gate() {
        let limits = Limits { compare_to_baseline: true, ..Limits::default() };
        let a = Analysis { worse_metrics: vec!["latency_p99_ms".into()], report: serde_json::json!({}) };
        let one = w(1, 0);
        let g = evaluate(&limits, &Inputs { windows: vec![&one], cohort: 1, failed: 0, analysis: Some(&a) });
        assert!(!g["canary_analysis"].pass);
        assert!(failure(&g, Some(&a)).is_some_and(|r| r.contains("latency_p99_ms")));
        let g = evaluate(&limits, &Inputs { windows: vec![&one], cohort: 1, failed: 0, analysis: None });
        assert!(g["canary_analysis"].pass, "no baseline, no verdict");
    }

    #[test]
    fn a_lying_canary_cannot_pass_the_gates_for_the_others() {
        let limits = Limits { max_error_rate: Some(0.05), max_p99_ms: Some(10.0), ..Limits::default() };
        // Five honest canaries: 20% errors, a p99 around 32 ms.
        let slow = |n: u64| {
            let mut b = vec![0; 16];
            b[14] = n;
            outpost_runtime::protocol::LatencySketch { buckets_log2_us: b }
        };
        let honest: Vec<Window> = (0..5).map(|_| Window { latency: slow(100), ..w(80, 20) }).collect();
        // One liar with valid keys: endless clean, fast requests.
        let mut fast = vec![0; 16];
        fast[3] = u64::MAX;
        let liar = Window {
            latency: outpost_runtime::protocol::LatencySketch { buckets_log2_us: fast },
            ..w(u64::MAX, 0)
        };
        let mut windows: Vec<&Window> = honest.iter().collect();
        windows.push(&liar);
        let g = evaluate(&limits, &Inputs { windows, cohort: 6, failed: 0, analysis: None });
        assert!(!g["error_rate"].pass, "{:?}", g["error_rate"]);
        assert!(!g["p99_ms"].pass, "{:?}", g["p99_ms"]);
        // And the same honest cohort without the liar fails both as well.
        let g = evaluate(&limits, &Inputs { windows: honest.iter().collect(), cohort: 5, failed: 0, analysis: None });
        assert!(!g["error_rate"].pass && !g["p99_ms"].pass);
    }

    #[test]
    fn limits_are_validated() {
        assert!(Limits { max_error_rate: Some(1.5), ..Limits::default() }.validate().is_err());
        assert!(Limits { min_reporting: -0.1, ..Limits::default() }.validate().is_err());
        assert!(Limits { max_p99_ms: Some(f64::NAN), ..Limits::default() }.validate().is_err());
        assert!(Limits::default().validate().is_ok());
    }
}
