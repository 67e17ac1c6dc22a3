//! Per-device rate limits on what devices publish, applied by the fleet's
//! MQTT event loop before a message is queued for verification: a device
//! (stolen, or buggy) that floods cannot fill the worker queues other
//! devices share, nor keep the workers verifying its signatures.
//!
//! One token bucket per (device, kind). A message over its bucket is
//! dropped and counted (`outpost_fleet_mqtt_messages_total{result="rate_limited"}`);
//! nothing ever waits. The rates are well above what a real agent sends
//! (see [`DeviceRates::default`]), so a healthy device never meets them.
//!
//! Memory is bounded: buckets exist only for devices the fleet knows
//! (provisioned, key loaded). Messages on topics of any other id share one
//! bucket per kind, so a flood of made-up ids costs one entry, not one each.
//! Entries of devices that are no longer known are pruned now and then.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outpost_runtime::protocol::topics::Kind;

/// Sustained rate (messages per second) and burst of one bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The limits per kind of device message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceRates {
    pub state: Rate,
    pub telemetry: Rate,
    pub sketch: Rate,
    pub chunk_request: Rate,
    /// All ids the fleet does not know, together, per kind.
    pub unknown: Rate,
}

impl Default for DeviceRates {
    /// What an agent sends, and the margin:
    ///
    /// - **state**: once per change (a download's progress, an install, a
    ///   probation verdict) and on every reconnection: 2/s, burst 32.
    /// - **telemetry** and **sketch**: one each per `telemetry_interval`
    ///   (10 s by default), plus the offline buffer flushed at once on
    ///   reconnection: 1/s, burst 128 (10× the interval's need, and a
    ///   reconnect flush of the agent's buffer).
    /// - **chunk requests**: up to `chunks_in_flight` (8 by default) at a
    ///   time, each answered by a 32 KiB chunk: 256/s (8 MiB/s) and burst
    ///   512. The artifact server's own per-device limit (`[artifacts]`)
    ///   applies after verification and is lower; this one only stops a
    ///   flood before it costs signature checks (`server` raises it to twice
    ///   `[artifacts]` when that is higher).
    /// - **unknown ids**: 50/s and burst 100, shared.
    fn default() -> DeviceRates {
        DeviceRates {
            state: Rate { per_second: 2.0, burst: 32.0 },
            telemetry: Rate { per_second: 1.0, burst: 128.0 },
            sketch: Rate { per_second: 1.0, burst: 128.0 },
            chunk_request: Rate { per_second: 256.0, burst: 512.0 },
            unknown: Rate { per_second: 50.0, burst: 100.0 },
        }
    }
}

impl DeviceRates {
    /// The rate of `kind`; `None` for topics devices do not publish on.
    fn of(&self, kind: Kind) -> Option<Rate> {
        match kind {
            Kind::State => Some(self.state),
            Kind::Telemetry => Some(self.telemetry),
            Kind::Sketch => Some(self.sketch),
            Kind::ChunkRequest => Some(self.chunk_request),
            Kind::Desired | Kind::ChunkData => None,
        }
    }
}

/// One token bucket (also the artifact server's per-device chunk limit).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket { tokens: rate.burst, at: now }
    }

    /// Refills for the time since the last call, then takes one token if
    /// there is one.
    pub(crate) fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Kinds a device publishes, as bucket indexes.
const KINDS: usize = 4;

fn index(kind: Kind) -> Option<usize> {
    match kind {
        Kind::State => Some(0),
        Kind::Telemetry => Some(1),
        Kind::Sketch => Some(2),
        Kind::ChunkRequest => Some(3),
        Kind::Desired | Kind::ChunkData => None,
    }
}

/// How often entries of devices no longer known are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The buckets (module docs). Owned by the one thread that calls
/// [`Limiter::admit`]: no lock.
pub struct Limiter {
    rates: DeviceRates,
    devices: HashMap<String, [Option<Bucket>; KINDS]>,
    unknown: [Option<Bucket>; KINDS],
    pruned: Instant,
}

impl Limiter {
    pub fn new(rates: DeviceRates) -> Limiter {
        Limiter { rates, devices: HashMap::new(), unknown: [None; KINDS], pruned: Instant::now() }
    }

    /// Whether a message of `kind` from `device` may go on; `known` says
    /// whether the fleet knows the device (asked only for a device without
    /// buckets yet, and when pruning).
    pub fn admit(&mut self, device: &str, kind: Kind, now: Instant, known: impl Fn(&str) -> bool) -> bool {
        let (Some(rate), Some(ix)) = (self.rates.of(kind), index(kind)) else { return true };
        if now.saturating_duration_since(self.pruned) >= PRUNE_EVERY {
            self.pruned = now;
            self.devices.retain(|d, _| known(d));
        }
        let slots = match self.devices.get_mut(device) {
            Some(s) => s,
            None if known(device) => self.devices.entry(device.to_string()).or_insert([None; KINDS]),
            None => {
                let shared = self.rates.unknown;
                return self.unknown[ix].get_or_insert_with(|| Bucket::full(shared, now)).take(shared, now);
            }
        };
        slots[ix].get_or_insert_with(|| Bucket::full(rate, now)).take(rate, now)
    }

    /// Forgets a device's buckets (decommissioned).
    pub fn forget(&mut self, device: &str) {
        self.devices.remove(device);
    }

    /// Devices with buckets (for tests).
    pub fn tracked(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut l = Limiter::new(DeviceRates::default());
        let t0 = Instant::now();
        let known = |_: &str| true;
        let admitted = (0..200).filter(|_| l.admit("d1", Kind::Telemetry, t0, known)).count();
        assert_eq!(admitted, 128, "the burst");
        // Other kinds and other devices have their own buckets.
        assert!(l.admit("d1", Kind::State, t0, known));
        assert!(l.admit("d2", Kind::Telemetry, t0, known));
        // Ten seconds later: ten more telemetry messages, not eleven.
        let t1 = t0 + Duration::from_secs(10);
        let admitted = (0..20).filter(|_| l.admit("d1", Kind::Telemetry, t1, known)).count();
        assert_eq!(admitted, 10);
        // An agent's pace (one per 10 s) is never limited.
        let mut l = Limiter::new(DeviceRates::default());
        for i in 0..1000u64 {
            assert!(l.admit("d1", Kind::Telemetry, t0 + Duration::from_secs(10 * i), known));
        }
    }

    #[test]
    fn unknown_ids_share_one_bucket_and_hold_no_memory() {
        let mut l = Limiter::new(DeviceRates::default());
        let t0 = Instant::now();
        let admitted = (0..10_000).filter(|i| l.admit(&format!("made-up-{i}"), Kind::State, t0, |_| false)).count();
        assert_eq!(admitted, 100, "the shared burst");
        assert_eq!(l.tracked(), 0);
        // A known device is not held back by the flood of unknown ones.
        assert!(l.admit("real", Kind::State, t0, |d| d == "real"));
        assert_eq!(l.tracked(), 1);
        // Pruned once it is no longer known (decommissioned).
        assert!(l.admit("other", Kind::State, t0 + PRUNE_EVERY, |d| d == "other"));
        assert_eq!(l.tracked(), 1, "'real' pruned, 'other' tracked");
        l.forget("other");
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn fleet_topics_are_not_limited() {
        let mut l = Limiter::new(DeviceRates::default());
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| l.admit("d", Kind::Desired, t0, |_| true)));
    }
}
