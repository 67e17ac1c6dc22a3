//! Probation: a new version is on trial until it has served well for the
//! configured time. It fails the trial — and the agent rolls back by itself
//! — when, on the new version:
//!
//! - the manifest's self-test vectors (run again every
//!   [`SELF_TEST_EVERY`]) give other outputs — the model computes something
//!   else than it did at bundle time, on this hardware, now;
//! - after `min_requests` answered requests, the failure rate (5xx) is above
//!   `max_error_rate`;
//! - after `min_requests`, its latency p99 is above `max_latency_ratio`
//!   times the previous version's (when the previous version had figures)
//!   *and* at least [`LATENCY_FLOOR`] above it — a ratio alone would roll
//!   back a sub-millisecond model for one request delayed by the scheduler
//!   on a busy device (seen in the end-to-end tests: 4 ms vs 0.5 ms, the
//!   same model);
//! - the device restarted `max_boots` times during the trial (counted in the
//!   state file by `slots`, checked at start by `agent`).

use std::time::{Duration, Instant};

use outpost_runtime::bundle::SelfTest;
use outpost_runtime::protocol::Probation;
use outpost_runtime::server::{Deployed, ServingStats, StatsSnapshot};

/// A p99 increase smaller than this never fails a trial, whatever the ratio.
pub const LATENCY_FLOOR: Duration = Duration::from_millis(10);

/// How often the self-test runs again during a trial.
pub const SELF_TEST_EVERY: Duration = Duration::from_secs(10);

/// The outcome of one check.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Continue,
    Pass,
    Fail(String),
}

/// One running trial.
pub struct Trial {
    params: Probation,
    started: Instant,
    self_test: SelfTest,
    last_self_test: Instant,
    /// The new model's counters when the trial began.
    baseline: StatsSnapshot,
    /// The previous version's latency p99 (its lifetime), if it had any.
    previous_p99: Option<Duration>,
}

impl Trial {
    pub fn new(params: Probation, self_test: SelfTest, new: &Deployed, previous: Option<&Deployed>) -> Trial {
        Trial {
            params,
            started: Instant::now(),
            self_test,
            last_self_test: Instant::now(),
            baseline: new.stats().snapshot(),
            previous_p99: previous.and_then(|p| p.stats().snapshot().latency_quantile(0.99)),
        }
    }

    /// A trial resumed after a restart: no baseline of the previous version.
    pub fn resumed(params: Probation, self_test: SelfTest) -> Trial {
        Trial {
            params,
            started: Instant::now(),
            self_test,
            last_self_test: Instant::now(),
            baseline: ServingStats::default().snapshot(),
            previous_p99: None,
        }
    }

    pub fn params(&self) -> &Probation {
        &self.params
    }

    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.params.duration_secs as u64).saturating_sub(self.started.elapsed())
    }

    /// Judges the model serving now.
    pub fn check(&mut self, current: &Deployed) -> Verdict {
        if self.last_self_test.elapsed() >= SELF_TEST_EVERY || self.remaining().is_zero() {
            self.last_self_test = Instant::now();
            if let Err(e) = self.self_test.run(|inputs| current.model().run(inputs)) {
                return Verdict::Fail(format!("self-test failed during probation: {e}"));
            }
        }
        let window = current.stats().snapshot().since(&self.baseline);
        let answered = window.requests + window.failures;
        if answered >= self.params.min_requests as u64 {
            let rate = window.failure_rate();
            if rate > self.params.max_error_rate as f64 {
                return Verdict::Fail(format!(
                    "error rate {:.1}% over {answered} requests, above the limit of {:.1}%",
                    rate * 100.0,
                    self.params.max_error_rate * 100.0
                ));
            }
            if let (Some(prev), Some(now)) = (self.previous_p99, window.latency_quantile(0.99)) {
                if now.as_secs_f64() > prev.as_secs_f64() * self.params.max_latency_ratio as f64
                    && now.saturating_sub(prev) >= LATENCY_FLOOR
                {
                    return Verdict::Fail(format!(
                        "latency p99 {:?} is above {}x the previous version's {:?}",
                        now, self.params.max_latency_ratio, prev
                    ));
                }
            }
        }
        if self.remaining().is_zero() {
            Verdict::Pass
        } else {
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each way a trial ends, on the real fixture model: the serving
    //! counters are fed as the HTTP server feeds them.
    use super::*;
    use outpost_runtime::bundle::{SelfTestVector, Tolerance};
    use outpost_runtime::model::LoadOptions;
    use outpost_runtime::tensor::TensorData;

    fn fixture() -> Deployed {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bc_mlp.onnx");
        Deployed::load_file(path, &LoadOptions::default()).expect("fixture loads")
    }

    /// A self-test recorded from the model itself (passes), or with its
    /// expected outputs shifted (fails).
    fn self_test(model: &Deployed, shift: f32) -> SelfTest {
        let row = TensorData::f32(vec![1, 30], (0..30).map(|i| i as f32 * 0.1).collect()).expect("row");
        let mut expected = model.model().run(vec![row.clone()]).expect("runs");
        for t in &mut expected {
            if let outpost_runtime::tensor::TensorValues::F32(v) = &mut t.values {
                v.iter_mut().for_each(|x| *x += shift);
            }
        }
        SelfTest { tolerance: Tolerance::default(), vectors: vec![SelfTestVector { inputs: vec![row], expected }] }
    }

    fn params(duration_secs: u32) -> Probation {
        Probation { duration_secs, max_error_rate: 0.05, max_latency_ratio: 5.0, min_requests: 20, max_boots: 3 }
    }

    #[test]
    fn a_healthy_version_passes_when_the_time_is_up() {
        let (new, previous) = (fixture(), fixture());
        let mut trial = Trial::new(params(0), self_test(&new, 0.0), &new, Some(&previous));
        for _ in 0..50 {
            new.stats().record_ok(1, Duration::from_micros(100));
        }
        assert_eq!(trial.check(&new), Verdict::Pass);
        let mut trial = Trial::new(params(3600), self_test(&new, 0.0), &new, Some(&previous));
        assert_eq!(trial.check(&new), Verdict::Continue);
    }

    #[test]
    fn a_failing_self_test_fails_the_trial() {
        let new = fixture();
        let mut trial = Trial::new(params(0), self_test(&new, 0.5), &new, None);
        match trial.check(&new) {
            Verdict::Fail(reason) => assert!(reason.contains("self-test"), "{reason}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn an_error_rate_above_the_limit_fails_only_after_min_requests() {
        let new = fixture();
        let mut trial = Trial::new(params(3600), self_test(&new, 0.0), &new, None);
        // 3 failures in 10: 30%, but fewer than min_requests answered.
        for i in 0..10 {
            if i % 3 == 0 {
                new.stats().record_failure(Duration::from_micros(100));
            } else {
                new.stats().record_ok(1, Duration::from_micros(100));
            }
        }
        assert_eq!(trial.check(&new), Verdict::Continue);
        for _ in 0..20 {
            new.stats().record_ok(1, Duration::from_micros(100));
        }
        // 4 in 30 = 13% > 5%.
        match trial.check(&new) {
            Verdict::Fail(reason) => assert!(reason.contains("error rate"), "{reason}"),
            v => panic!("{v:?}"),
        }
        // Bad input (4xx) is the caller's fault: not counted here (the
        // fleet's rollout gate counts it against the version instead).
        let other = fixture();
        let mut trial = Trial::new(params(3600), self_test(&other, 0.0), &other, None);
        for _ in 0..30 {
            other.stats().record_input_error();
            other.stats().record_ok(1, Duration::from_micros(100));
        }
        assert_eq!(trial.check(&other), Verdict::Continue);
    }

    #[test]
    fn latency_far_above_the_previous_versions_fails_the_trial() {
        let (new, previous) = (fixture(), fixture());
        for _ in 0..100 {
            previous.stats().record_ok(1, Duration::from_micros(200));
        }
        let mut trial = Trial::new(params(3600), self_test(&new, 0.0), &new, Some(&previous));
        for _ in 0..30 {
            new.stats().record_ok(1, Duration::from_micros(600));
        }
        // 3x slower: within the 5x ratio.
        assert_eq!(trial.check(&new), Verdict::Continue);
        for _ in 0..30 {
            new.stats().record_ok(1, Duration::from_millis(4));
        }
        // 16x slower but only ~4 ms more: below the floor, scheduling noise.
        assert_eq!(trial.check(&new), Verdict::Continue);
        for _ in 0..30 {
            new.stats().record_ok(1, Duration::from_millis(20));
        }
        match trial.check(&new) {
            Verdict::Fail(reason) => assert!(reason.contains("latency p99"), "{reason}"),
            v => panic!("{v:?}"),
        }
        // Without figures of the previous version there is nothing to compare.
        let lone = fixture();
        let mut trial = Trial::new(params(3600), self_test(&lone, 0.0), &lone, None);
        for _ in 0..30 {
            lone.stats().record_ok(1, Duration::from_millis(20));
        }
        assert_eq!(trial.check(&lone), Verdict::Continue);
    }
}
