//! Prometheus metrics of the server, encoded by the `prometheus-client` crate.
//!
//! `GET /metrics` answers the classic text format (0.0.4, what `promtool
//! check metrics` and every Prometheus read), or OpenMetrics when the scraper
//! asks for it in `Accept`. Names follow Prometheus conventions: base units,
//! `_seconds`, `_total` on counters.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `outpost_http_requests_total` | counter | `endpoint`, `code` |
//! | `outpost_http_request_duration_seconds` | histogram | `endpoint` |
//! | `outpost_http_requests_in_flight` | gauge | |
//! | `outpost_http_requests_shed_total` | counter | (answered 503 because the queue was full) |
//! | `outpost_http_queue_depth` | gauge | (requests waiting for a worker) |
//! | `outpost_inference_duration_seconds` | histogram | (one model run, whatever its batch) |
//! | `outpost_inference_batch_rows` | histogram | (samples per model run) |
//! | `outpost_inference_batch_requests` | histogram | (requests merged into one run) |
//! | `outpost_model_info` | gauge, always 1 | `name`, `version`, `sha256`, `format`, `signer` |
//! | `outpost_model_ready` | gauge | (1 when a model is loaded) |
//! | `outpost_model_swaps_total` | counter | |
//! | `outpost_drift_windows_closed_total`, `outpost_drift_lifetime_samples_total` | counter | when the model has a drift monitor |
//! | `outpost_drift_*` (the rest) | gauges | per column, when the model has a drift monitor (see [`crate::drift::DriftMonitor::gauges`]) |
//! | `outpost_build_info`, `process_*` | | see [`super::process_metrics`] |
//!
//! Model info is read from the [`ModelSlot`] at scrape time, so a swap shows
//! on the next scrape without the swapper knowing about metrics.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::process_metrics::{BuildInfo, ProcessCollector};
use super::slot::ModelSlot;
use crate::drift::{GaugeValue, MetricKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 50 µs … 6.5 s: a device answers in tens of microseconds when all is well.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily,
    in_flight: Gauge,
    shed: Counter,
    inference_duration: Histogram,
    batch_rows: Histogram,
    batch_requests: Histogram,
}

/// Reads the model slot and queue depth at scrape time.
struct StateCollector {
    slot: Arc<ModelSlot>,
    queue_depth: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish()
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let current = self.slot.current();
        if let Some(d) = &current {
            let info = d.info();
            let labels = [
                ("name", info.name.clone()),
                ("version", info.version.clone()),
                ("sha256", info.sha256.clone()),
                ("format", info.format.as_str().to_string()),
                ("signer", info.signer.clone().unwrap_or_default()),
            ];
            let mut m = encoder.encode_descriptor(
                "outpost_model_info",
                "The model being served (value is always 1)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        if let Some(monitor) = current.as_ref().and_then(|d| d.drift()) {
            encode_drift_gauges(&mut encoder, &monitor.gauges())?;
        }
        let ready = ConstGauge::new(i64::from(current.is_some()));
        ready.encode(encoder.encode_descriptor(
            "outpost_model_ready",
            "1 when a model is loaded, warm and serving",
            None,
            ready.metric_type(),
        )?)?;
        let swaps = ConstCounter::new(self.slot.swap_count());
        swaps.encode(encoder.encode_descriptor(
            "outpost_model_swaps",
            "Models put in the serving slot since start",
            None,
            swaps.metric_type(),
        )?)?;
        let depth = ConstGauge::new((self.queue_depth)() as i64);
        depth.encode(encoder.encode_descriptor(
            "outpost_http_queue_depth",
            "Requests admitted and waiting for a worker",
            None,
            depth.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The drift monitor's values, one family per name, typed as the monitor
/// says (its counters get `_total` from the encoder). They come ordered by
/// column, and the text format wants each family's samples together.
fn encode_drift_gauges(encoder: &mut DescriptorEncoder, gauges: &[GaugeValue]) -> Result<(), std::fmt::Error> {
    let mut families: Vec<(&'static str, &'static str, MetricKind, Vec<&GaugeValue>)> = Vec::new();
    for g in gauges {
        match families.iter_mut().find(|(name, _, _, _)| *name == g.name) {
            Some((_, _, _, members)) => members.push(g),
            None => families.push((g.name, g.help, g.kind, vec![g])),
        }
    }
    for (name, help, kind, members) in families {
        let metric_type = match kind {
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Counter => MetricType::Counter,
        };
        let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
        for g in members {
            let encoder = if g.labels.is_empty() {
                family.encode_family(&NoLabels)?
            } else {
                family.encode_family(&g.labels)?
            };
            match kind {
                MetricKind::Gauge => ConstGauge::new(g.value).encode(encoder)?,
                // The monitor's counters are counts of samples and windows
                // (whole, never negative): shown as integers.
                MetricKind::Counter => ConstCounter::new(g.value.max(0.0) as u64).encode(encoder)?,
            }
        }
    }
    Ok(())
}

/// An empty label set (a gauge family with one unlabelled series).
struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(&self, _: &mut prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

impl Metrics {
    /// `build` names the program in `outpost_build_info`.
    pub fn new(
        slot: Arc<ModelSlot>,
        queue_depth: Box<dyn Fn() -> usize + Send + Sync>,
        build: BuildInfo,
        extra: Vec<Box<dyn Collector>>,
    ) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("outpost_http_requests", "HTTP requests answered, by endpoint and status code", requests.clone());
        let request_duration: HistogramFamily = Family::new_with_constructor(request_histogram);
        registry.register_with_unit(
            "outpost_http_request_duration",
            "Time from taking a request to its answer being ready to send",
            Unit::Seconds,
            request_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("outpost_http_requests_in_flight", "Requests being handled by a worker", in_flight.clone());
        let shed = Counter::default();
        registry.register(
            "outpost_http_requests_shed",
            "Requests answered 503 at once because the queue was full",
            shed.clone(),
        );
        let inference_duration = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register_with_unit(
            "outpost_inference_duration",
            "Time of one model run, whatever its batch size",
            Unit::Seconds,
            inference_duration.clone(),
        );
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register("outpost_inference_batch_rows", "Samples per model run", batch_rows.clone());
        let batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register(
            "outpost_inference_batch_requests",
            "Requests merged into one model run by dynamic batching (1 when it is off)",
            batch_requests.clone(),
        );
        registry.register_collector(Box::new(StateCollector { slot, queue_depth }));
        registry.register_collector(Box::new(build));
        registry.register_collector(Box::new(ProcessCollector));
        for collector in extra {
            registry.register_collector(collector);
        }
        Metrics {
            registry,
            requests,
            request_duration,
            in_flight,
            shed,
            inference_duration,
            batch_rows,
            batch_requests,
        }
    }

    pub fn record_request(&self, endpoint: &'static str, code: u16, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { endpoint, code }).inc();
        self.request_duration.get_or_create(&EndpointLabels { endpoint }).observe(elapsed.as_secs_f64());
    }

    pub fn record_run(&self, elapsed: Duration, rows: usize, requests: usize) {
        self.inference_duration.observe(elapsed.as_secs_f64());
        self.batch_rows.observe(rows as f64);
        self.batch_requests.observe(requests as f64);
    }

    pub fn record_shed(&self) {
        self.shed.inc();
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The exposition and its content type; OpenMetrics if `accept` asks for it.
    pub fn encode(&self, accept: Option<&str>) -> (String, &'static str) {
        let mut out = String::with_capacity(8 * 1024);
        let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
        // Encoding into a String cannot fail.
        if openmetrics {
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
            (out, "application/openmetrics-text; version=1.0.0; charset=utf-8")
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
            (out, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)
        }
    }
}
