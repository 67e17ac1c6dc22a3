//! Telemetry (JSON) and sketches (postcard), every `telemetry_interval`,
//! and the bounded buffer that keeps them while the broker is away.
//!
//! Each message covers one window of one model version and names it, so
//! the fleet never adds one version's counters to another's: when the
//! model changes, the window starts again on the new model.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use outpost_runtime::protocol::{DriftSummary, LatencySketch, ModelRef, SketchMessage, Status, Telemetry, SKETCH_FORMAT, TELEMETRY_FORMAT};
use outpost_runtime::server::{Deployed, ServingStats, StatsSnapshot};

/// Messages waiting for the broker: oldest dropped first when full.
#[derive(Debug)]
pub struct OfflineBuffer<T> {
    items: VecDeque<T>,
    capacity: usize,
    dropped: u64,
}

impl<T> OfflineBuffer<T> {
    pub fn new(capacity: usize) -> OfflineBuffer<T> {
        OfflineBuffer { items: VecDeque::new(), capacity: capacity.max(1), dropped: 0 }
    }

    pub fn push(&mut self, item: T) {
        if self.items.len() >= self.capacity {
            self.items.pop_front();
            self.dropped += 1;
        }
        self.items.push_back(item);
    }

    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.items.drain(..)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Messages dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// The open window: which model, from when, its counters at the start.
pub struct Window {
    model: Option<Arc<Deployed>>,
    baseline: StatsSnapshot,
    start_ms: u64,
    started: Instant,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Window {
    pub fn new(model: Option<Arc<Deployed>>) -> Window {
        let baseline = model.as_ref().map(|m| m.stats().snapshot()).unwrap_or_else(|| ServingStats::default().snapshot());
        Window { model, baseline, start_ms: now_ms(), started: Instant::now() }
    }

    /// Closes the window on `current` and opens the next one. Returns the
    /// telemetry and (when a model serves) the sketch message of the window.
    pub fn close(
        &mut self,
        current: Option<Arc<Deployed>>,
        status: Status,
        committed: bool,
        dropped: u64,
        uptime_secs: u64,
    ) -> (Telemetry, Option<SketchMessage>) {
        let same = match (&self.model, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            // The model changed since the window opened: its figures are the
            // new model's from zero (the old one's tail is not mixed in).
            self.model = current.clone();
            self.baseline = ServingStats::default().snapshot();
        }
        let end_ms = now_ms();
        let (snapshot, model_ref, drift, sketch) = match &self.model {
            Some(m) => {
                let now = m.stats().snapshot();
                let window = now.since(&self.baseline);
                self.baseline = now;
                let info = m.info();
                let model_ref = ModelRef { name: info.name.clone(), version: info.version.clone() };
                let (drift, drift_sketch) = match m.drift() {
                    Some(monitor) => {
                        let report = monitor.report();
                        let summary = DriftSummary {
                            drift: report.drift,
                            score: if report.score.is_finite() { report.score } else { 0.0 },
                            flagged: report.flagged().into_iter().map(str::to_string).collect(),
                            samples: report.window.samples,
                        };
                        (Some(summary), Some(monitor.snapshot_and_roll()))
                    }
                    None => (None, None),
                };
                let sketch = SketchMessage {
                    format: SKETCH_FORMAT,
                    model: model_ref.clone(),
                    window_start_unix_ms: self.start_ms,
                    window_end_unix_ms: end_ms,
                    drift: drift_sketch,
                    latency: LatencySketch { buckets_log2_us: window.latency_buckets().to_vec() },
                };
                (window, Some(model_ref), drift, Some(sketch))
            }
            None => (ServingStats::default().snapshot(), None, None, None),
        };
        let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        let telemetry = Telemetry {
            format: TELEMETRY_FORMAT,
            model: model_ref,
            status,
            committed,
            window_start_unix_ms: self.start_ms,
            window_end_unix_ms: end_ms,
            requests: snapshot.requests,
            input_errors: snapshot.input_errors,
            failures: snapshot.failures,
            rows: snapshot.rows,
            error_rate: snapshot.failure_rate(),
            latency_p50_ms: ms(snapshot.latency_quantile(0.5)),
            latency_p99_ms: ms(snapshot.latency_quantile(0.99)),
            drift,
            memory_rss_bytes: rss_bytes(),
            dropped_while_offline: dropped,
            uptime_secs,
        };
        self.start_ms = end_ms;
        self.started = Instant::now();
        (telemetry, sketch)
    }
}

/// Resident memory of this process (Linux `/proc/self/status`, VmRSS).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_drops_oldest_and_counts() {
        let mut b = OfflineBuffer::new(3);
        for i in 0..5 {
            b.push(i);
        }
        assert_eq!(b.dropped(), 2);
        assert_eq!(b.drain().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(b.is_empty());
    }

    #[test]
    fn window_without_model() {
        let mut w = Window::new(None);
        let (t, s) = w.close(None, Status::Idle, false, 0, 1);
        assert!(t.model.is_none() && s.is_none());
        assert_eq!(t.requests, 0);
    }
}
