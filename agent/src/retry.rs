//! When a download is tried again, and when it is given up.
//!
//! Chunk replies are unsigned (the bytes are checked against the signed
//! digests), so anyone who can publish on the device's reply topic can
//! send a bad chunk or a false "unavailable". Neither may decide the fate
//! of an update:
//!
//! - **Bytes that do not verify** (a chunk or an HTTP body: signature,
//!   manifest, digests) end the *attempt*, not the update: the partial file
//!   is dropped and the bundle fetched again from scratch after a backoff.
//!   Only when [`RetryPolicy::attempts`] fresh attempts have failed is the
//!   directive given up and `failed` reported. One forged chunk costs one
//!   attempt; a bundle that really is bad still fails, a bounded time later.
//! - **"Unavailable"** (a chunk reply saying the fleet cannot serve the
//!   bundle, an HTTP fetch that broke off) pauses the download with backoff,
//!   but is believed at most [`RetryPolicy::unavailable_rounds`] times in a
//!   row without verified progress in between; the next one counts as a
//!   failed attempt. So a stream of forged "unavailable" replies ends in a
//!   clean `failed` within a bound, never in a download paused forever.
//!
//! Waits double from [`RetryPolicy::min`] up to [`RetryPolicy::max`], each
//! drawn from its upper half ([`crate::link::jittered`]) so that devices
//! hit by the same fault do not come back in lockstep. With the defaults a
//! download whose bytes never verify is given up after waits of at most
//! 1 + 2 + 4 + 8 = 15 s (plus the downloads themselves), and a source that
//! only ever says "unavailable" after at most 90 s of waiting.

use std::time::Duration;

/// The limits; `download_attempts`, `download_unavailable_rounds`,
/// `download_retry_min_ms` and `download_retry_max_ms` in `agent.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Fresh attempts before the directive is given up (at least 1).
    pub attempts: u32,
    /// "Unavailable" answers believed in a row within one attempt.
    pub unavailable_rounds: u32,
    pub min: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { attempts: 5, unavailable_rounds: 4, min: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

/// What to do after a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again after this wait.
    RetryIn(Duration),
    /// Every attempt failed: give the directive up.
    GiveUp,
}

/// The fault count of one directive's download.
#[derive(Clone, Debug)]
pub struct Attempts {
    policy: RetryPolicy,
    /// Attempts that ended in a fault.
    failed: u32,
    /// "Unavailable" answers since the last verified progress.
    unavailable: u32,
}

impl Attempts {
    pub fn new(policy: RetryPolicy) -> Attempts {
        Attempts { policy, failed: 0, unavailable: 0 }
    }

    /// Attempts failed so far.
    pub fn failed(&self) -> u32 {
        self.failed
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Verified bytes arrived: the source serves, "unavailable" is
    /// believed afresh.
    pub fn progressed(&mut self) {
        self.unavailable = 0;
    }

    /// An attempt ended in a fault (bytes that did not verify, or too many
    /// "unavailable" answers).
    pub fn attempt_failed(&mut self) -> Next {
        self.failed = self.failed.saturating_add(1);
        self.unavailable = 0;
        if self.failed >= self.policy.attempts.max(1) {
            Next::GiveUp
        } else {
            Next::RetryIn(crate::link::jittered(self.backoff(self.failed)))
        }
    }

    /// The source says it cannot serve now.
    pub fn unavailable(&mut self) -> Next {
        self.unavailable = self.unavailable.saturating_add(1);
        if self.unavailable > self.policy.unavailable_rounds {
            self.attempt_failed()
        } else {
            Next::RetryIn(crate::link::jittered(self.backoff(self.unavailable)))
        }
    }

    /// The un-jittered wait after the `n`th fault (n ≥ 1): min · 2^(n−1),
    /// at most max.
    pub fn backoff(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.policy.min.saturating_mul(1u32 << doublings).min(self.policy.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            unavailable_rounds: 3,
            min: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        }
    }

    fn wait(n: Next) -> Duration {
        match n {
            Next::RetryIn(d) => d,
            Next::GiveUp => panic!("gave up too early"),
        }
    }

    #[test]
    fn bad_bytes_are_retried_with_growing_jittered_waits_then_given_up() {
        let mut a = Attempts::new(policy());
        let mut waits = Vec::new();
        for _ in 0..4 {
            waits.push(wait(a.attempt_failed()));
        }
        // 100, 200, 400, 800 ms, each drawn from its upper half.
        for (i, w) in waits.iter().enumerate() {
            let full = Duration::from_millis(100 << i);
            assert!(*w >= full / 2 && *w <= full, "wait {i}: {w:?}");
        }
        assert_eq!(a.attempt_failed(), Next::GiveUp);
        assert_eq!(a.failed(), 5);
    }

    #[test]
    fn waits_are_capped_and_never_overflow() {
        let a = Attempts::new(policy());
        assert_eq!(a.backoff(1), Duration::from_millis(100));
        assert_eq!(a.backoff(4), Duration::from_millis(800));
        assert_eq!(a.backoff(5), Duration::from_millis(1000));
        assert_eq!(a.backoff(u32::MAX), Duration::from_millis(1000));
        let huge = Attempts::new(RetryPolicy { min: Duration::MAX, ..policy() });
        assert_eq!(huge.backoff(40), Duration::from_millis(1000));
    }

    #[test]
    fn unavailable_is_believed_a_bounded_number_of_times() {
        let mut a = Attempts::new(policy());
        let mut faults = 0;
        // A source that only ever says "unavailable" ends in GiveUp after
        // attempts × (rounds + 1) answers, never later.
        let bound = 5 * (3 + 1);
        loop {
            faults += 1;
            assert!(faults <= bound, "still retrying after {faults} answers");
            if a.unavailable() == Next::GiveUp {
                break;
            }
        }
        assert_eq!(faults, bound);
    }

    #[test]
    fn progress_resets_unavailable_but_not_failed_attempts() {
        let mut a = Attempts::new(policy());
        for _ in 0..10 {
            for _ in 0..3 {
                wait(a.unavailable());
            }
            a.progressed();
        }
        assert_eq!(a.failed(), 0, "a source that serves in between never fails an attempt");
        wait(a.attempt_failed());
        a.progressed();
        assert_eq!(a.failed(), 1);
    }

    #[test]
    fn the_defaults_give_up_on_endless_unavailable_within_90_seconds() {
        let mut a = Attempts::new(RetryPolicy::default());
        let mut waited = Duration::ZERO;
        let mut answers = 0;
        loop {
            answers += 1;
            match a.unavailable() {
                // Jittered waits are at most the un-jittered one.
                Next::RetryIn(w) => waited += w,
                Next::GiveUp => break,
            }
        }
        assert_eq!(answers, 25);
        assert!(waited <= Duration::from_secs(90), "{waited:?}");
        assert!(waited >= Duration::from_secs(45), "{waited:?}");
    }

    #[test]
    fn one_attempt_means_give_up_at_the_first_fault() {
        let mut a = Attempts::new(RetryPolicy { attempts: 1, ..policy() });
        assert_eq!(a.attempt_failed(), Next::GiveUp);
        let mut zero = Attempts::new(RetryPolicy { attempts: 0, ..policy() });
        assert_eq!(zero.attempt_failed(), Next::GiveUp);
    }
}
