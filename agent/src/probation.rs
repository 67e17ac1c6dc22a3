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
//!   times the previous version's (when the previous version had figures);
//! - the device restarted `max_boots` times during the trial (counted in the
//!   state file by `slots`, checked at start by `agent`).

use std::time::{Duration, Instant};

use outpost_runtime::bundle::SelfTest;
use outpost_runtime::protocol::Probation;
use outpost_runtime::server::{Deployed, ServingStats, StatsSnapshot};

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
                if now.as_secs_f64() > prev.as_secs_f64() * self.params.max_latency_ratio as f64 {
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
