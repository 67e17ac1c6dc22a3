//! Prometheus metrics of the fleet server (`GET /metrics`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `outpost_fleet_devices` | gauge | `status`, `model`, `version` — devices by what they last reported (`unknown` before the first report) |
//! | `outpost_fleet_publishes_total` | counter | `result` = `ok`, `refused`, `error` |
//! | `outpost_fleet_mqtt_messages_total` | counter | `kind` (state, telemetry, sketch, chunk_request, other), `result` = `accepted`, `rejected` |
//! | `outpost_fleet_chunks_served_total` | counter | — |
//! | `outpost_fleet_chunk_bytes_total` | counter | — |
//! | `outpost_fleet_chunk_requests_refused_total` | counter | `reason` = `rate`, `size`, `unknown_bundle`, `bad_request` |
//! | `outpost_fleet_directives_total` | counter | — signed directives published |
//! | `outpost_fleet_api_requests_total` | counter | `code` — HTTP status of operator API answers |
//!
//! The device gauge is recomputed from the registry at each scrape (one
//! `GROUP BY` query), so it is never stale and costs nothing between scrapes.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    prom: PromRegistry,
    devices: Family<Labels, Gauge>,
    pub publishes: Family<Labels, Counter>,
    pub mqtt_messages: Family<Labels, Counter>,
    pub chunks_served: Counter,
    pub chunk_bytes: Counter,
    pub chunk_refused: Family<Labels, Counter>,
    pub directives: Counter,
    pub api_requests: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut prom = PromRegistry::with_prefix("outpost_fleet");
        let devices = Family::<Labels, Gauge>::default();
        let publishes = Family::<Labels, Counter>::default();
        let mqtt_messages = Family::<Labels, Counter>::default();
        let chunks_served = Counter::default();
        let chunk_bytes = Counter::default();
        let chunk_refused = Family::<Labels, Counter>::default();
        let directives = Counter::default();
        let api_requests = Family::<Labels, Counter>::default();
        prom.register("devices", "Devices by last reported status, model and version", devices.clone());
        prom.register("publishes", "Publish attempts by result", publishes.clone());
        prom.register("mqtt_messages", "MQTT messages from devices by kind and verdict", mqtt_messages.clone());
        prom.register("chunks_served", "Artifact chunks sent to devices", chunks_served.clone());
        prom.register("chunk_bytes", "Artifact bytes sent to devices", chunk_bytes.clone());
        prom.register("chunk_requests_refused", "Chunk requests refused, by reason", chunk_refused.clone());
        prom.register("directives", "Signed deployment directives published", directives.clone());
        prom.register("api_requests", "Operator API answers by HTTP status", api_requests.clone());
        Metrics { prom, devices, publishes, mqtt_messages, chunks_served, chunk_bytes, chunk_refused, directives, api_requests }
    }

    pub fn publish(&self, result: &str) {
        self.publishes.get_or_create(&vec![("result", result.to_string())]).inc();
    }

    pub fn mqtt(&self, kind: &str, accepted: bool) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.mqtt_messages.get_or_create(&vec![("kind", kind.to_string()), ("result", result.to_string())]).inc();
    }

    pub fn chunk_refused(&self, reason: &str) {
        self.chunk_refused.get_or_create(&vec![("reason", reason.to_string())]).inc();
    }

    pub fn api(&self, code: u16) {
        self.api_requests.get_or_create(&vec![("code", code.to_string())]).inc();
    }

    /// The text exposition, with the device gauge refreshed from `registry`.
    pub fn render(&self, registry: &Registry) -> String {
        match registry.device_counts() {
            Ok(counts) => {
                self.devices.clear();
                for c in counts {
                    self.devices
                        .get_or_create(&vec![("status", c.status), ("model", c.model), ("version", c.version)])
                        .set(c.count as i64);
                }
            }
            Err(e) => log::warn!("metrics: device counts unavailable: {e}"),
        }
        let mut out = String::new();
        if encode(&mut out, &self.prom).is_err() {
            log::warn!("metrics: encoding failed");
        }
        out
    }
}
