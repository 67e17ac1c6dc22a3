//! Counters of the streaming mode, readable as a snapshot (the agent's
//! telemetry) or as Prometheus metrics (a device's `/metrics`):
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `outpost_stream_messages_received_total` | counter | messages handed to the stream |
//! | `outpost_stream_messages_dropped_total` | counter | dropped because the queue was full |
//! | `outpost_stream_messages_ignored_total` | counter | on a reply topic (never predicted, see [`OutputTopic::is_reply_topic`](super::OutputTopic::is_reply_topic)) |
//! | `outpost_stream_predictions_total` | counter | answered with a prediction |
//! | `outpost_stream_input_errors_total` | counter | answered with an error: the message's fault |
//! | `outpost_stream_failures_total` | counter | answered with an error: no model, or inference failed |
//! | `outpost_stream_replies_published_total` | counter | replies handed to the broker connection |
//! | `outpost_stream_publish_errors_total` | counter | replies the connection refused |
//! | `outpost_stream_queue_depth` | gauge | messages waiting for a worker |
//! | `outpost_stream_queue_capacity` | gauge | the queue's bound |
//!
//! ```no_run
//! # fn demo(stats: std::sync::Arc<outpost_runtime::stream::StreamStats>) {
//! let mut registry = prometheus_client::registry::Registry::default();
//! registry.register_collector(Box::new(stats.collector()));
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Lock-free counters; see the module docs.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub(crate) received: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) ignored: AtomicU64,
    pub(crate) predicted: AtomicU64,
    pub(crate) input_errors: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) published: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    /// Messages queued minus messages taken by a worker.
    pub(crate) queued: AtomicU64,
    pub(crate) capacity: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamSnapshot {
    pub received: u64,
    pub dropped: u64,
    pub ignored: u64,
    pub predicted: u64,
    pub input_errors: u64,
    pub failures: u64,
    pub published: u64,
    pub publish_errors: u64,
    pub queue_depth: u64,
    pub queue_capacity: u64,
}

impl StreamStats {
    pub fn snapshot(&self) -> StreamSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StreamSnapshot {
            received: get(&self.received),
            dropped: get(&self.dropped),
            ignored: get(&self.ignored),
            predicted: get(&self.predicted),
            input_errors: get(&self.input_errors),
            failures: get(&self.failures),
            published: get(&self.published),
            publish_errors: get(&self.publish_errors),
            queue_depth: get(&self.queued),
            queue_capacity: get(&self.capacity),
        }
    }

    /// An adapter handed a reply to its broker connection.
    pub fn record_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// An adapter's broker connection refused a reply.
    pub fn record_publish_error(&self) {
        self.publish_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A Prometheus collector reading these counters at scrape time.
    pub fn collector(self: &Arc<Self>) -> StreamCollector {
        StreamCollector(Arc::clone(self))
    }
}

/// Encodes [`StreamStats`] for `prometheus-client`; register it with
/// `Registry::register_collector`.
#[derive(Debug)]
pub struct StreamCollector(Arc<StreamStats>);

impl Collector for StreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        // Names without `_total`: the encoder appends it to counters.
        let counters = [
            ("outpost_stream_messages_received", "Messages handed to the streaming mode", s.received),
            ("outpost_stream_messages_dropped", "Messages dropped because the stream queue was full", s.dropped),
            ("outpost_stream_messages_ignored", "Messages on a reply topic, never predicted", s.ignored),
            ("outpost_stream_predictions", "Stream messages answered with a prediction", s.predicted),
            ("outpost_stream_input_errors", "Stream messages answered with an error caused by the message", s.input_errors),
            ("outpost_stream_failures", "Stream messages answered with an error: no model or inference failed", s.failures),
            ("outpost_stream_replies_published", "Stream replies handed to the broker connection", s.published),
            ("outpost_stream_publish_errors", "Stream replies the broker connection refused", s.publish_errors),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges = [
            ("outpost_stream_queue_depth", "Stream messages waiting for a worker", s.queue_depth),
            ("outpost_stream_queue_capacity", "Bound of the stream queue", s.queue_capacity),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names() {
        let stats = Arc::new(StreamStats::default());
        stats.dropped.fetch_add(3, Ordering::Relaxed);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(stats.collector()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("outpost_stream_messages_dropped_total 3"), "{text}");
        assert!(text.contains("# TYPE outpost_stream_queue_depth gauge"), "{text}");
    }
}
