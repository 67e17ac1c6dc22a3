//! Prometheus metrics of the fleet server (`GET /metrics`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `outpost_fleet_devices` | gauge | `status`, `model`, `version` — devices by what they last reported (`unknown` before the first report) |
//! | `outpost_fleet_publishes_total` | counter | `result` = `ok`, `refused`, `error` |
//! | `outpost_fleet_mqtt_messages_total` | counter | `kind` (state, telemetry, sketch, chunk_request, will, other), `result` = `accepted`, `rejected` (unsigned, forged, replayed, from an unknown or decommissioned device), `rate_limited` (over the device's limit, see [`crate::rate_limit`]), `dropped` (worker queues full), `panic` (handling it panicked; caught) |
//! | `outpost_fleet_chunks_served_total` | counter | — |
//! | `outpost_fleet_chunk_bytes_total` | counter | — |
//! | `outpost_fleet_chunk_requests_refused_total` | counter | `reason` = `rate`, `size`, `unknown_bundle`, `bad_request` |
//! | `outpost_fleet_directives_total` | counter | — signed directives published |
//! | `outpost_fleet_directives_resent_total` | counter | — recorded directives sent again to a device whose state reported an older one |
//! | `outpost_fleet_panics_total` | counter | — panics caught in a request, a message or a tick (the thread went on; see [`crate::supervisor`]) |
//! | `outpost_fleet_api_requests_total` | counter | `code` — HTTP status of operator API answers |
//! | `outpost_fleet_observations_total` | counter | `kind` = `telemetry`, `sketch` — verified device messages recorded for gates, canary analysis and the drift view |
//! | `outpost_fleet_drifting_devices` | gauge | — devices whose latest telemetry says their inputs drifted |
//! | `outpost_fleet_rollouts` | gauge | `state` — rollouts by state (running, paused, halted, completed, aborted) |
//! | `outpost_fleet_rollout_stage` | gauge | `rollout`, `model`, `version` — the current stage (1-based) of each live rollout |
//! | `outpost_fleet_rollout_devices` | gauge | `rollout`, `state` — devices of each live rollout by state (pending, sent, committed, failed, rolled_back) |
//!
//! | `outpost_build_info` | gauge, always 1 | `version`, `component` = `fleet`, `target` |
//! | `process_*` | | CPU, memory, fds, start time (Linux; see [`outpost_runtime::server::process_metrics`]) |
//!
//! Every value that only grows is a counter (`_total`); gauges go up and
//! down. The device gauge is recomputed from the registry at each scrape (one
//! `GROUP BY` query), so it is never stale and costs nothing between scrapes.

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use outpost_runtime::server::{BuildInfo, ProcessCollector};

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
    pub directives_resent: Counter,
    pub panics: Counter,
    pub api_requests: Family<Labels, Counter>,
    pub observations: Family<Labels, Counter>,
    pub drifting_devices: Gauge,
    /// Set by the rollout driver on every tick.
    pub rollouts: Family<Labels, Gauge>,
    pub rollout_stage: Family<Labels, Gauge>,
    pub rollout_devices: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // Build and process metrics keep their standard names; the fleet's
        // own go in a sub-registry under `outpost_fleet_`.
        let mut root = PromRegistry::default();
        root.register_collector(Box::new(BuildInfo::new("fleet", env!("CARGO_PKG_VERSION"))));
        root.register_collector(Box::new(ProcessCollector));
        let prom = root.sub_registry_with_prefix("outpost_fleet");
        let devices = Family::<Labels, Gauge>::default();
        let publishes = Family::<Labels, Counter>::default();
        let mqtt_messages = Family::<Labels, Counter>::default();
        let chunks_served = Counter::default();
        let chunk_bytes = Counter::default();
        let chunk_refused = Family::<Labels, Counter>::default();
        let directives = Counter::default();
        let directives_resent = Counter::default();
        let panics = Counter::default();
        let api_requests = Family::<Labels, Counter>::default();
        let observations = Family::<Labels, Counter>::default();
        let drifting_devices = Gauge::default();
        let rollouts = Family::<Labels, Gauge>::default();
        let rollout_stage = Family::<Labels, Gauge>::default();
        let rollout_devices = Family::<Labels, Gauge>::default();
        prom.register("devices", "Devices by last reported status, model and version", devices.clone());
        prom.register("publishes", "Publish attempts by result", publishes.clone());
        prom.register("mqtt_messages", "MQTT messages from devices by kind and verdict", mqtt_messages.clone());
        prom.register("chunks_served", "Artifact chunks sent to devices", chunks_served.clone());
        prom.register("chunk_bytes", "Artifact bytes sent to devices", chunk_bytes.clone());
        prom.register("chunk_requests_refused", "Chunk requests refused, by reason", chunk_refused.clone());
        prom.register("directives", "Signed deployment directives published", directives.clone());
        prom.register("directives_resent", "Recorded directives sent again to a device behind them", directives_resent.clone());
        prom.register("panics", "Panics caught in a request, a message or a tick", panics.clone());
        prom.register("api_requests", "Operator API answers by HTTP status", api_requests.clone());
        prom.register("observations", "Verified device telemetry and sketches recorded, by kind", observations.clone());
        prom.register("drifting_devices", "Devices whose latest telemetry says their inputs drifted", drifting_devices.clone());
        prom.register("rollouts", "Rollouts by state", rollouts.clone());
        prom.register("rollout_stage", "Current stage (1-based) of each live rollout", rollout_stage.clone());
        prom.register("rollout_devices", "Devices of each live rollout by state", rollout_devices.clone());
        Metrics {
            prom: root,
            devices,
            publishes,
            mqtt_messages,
            chunks_served,
            chunk_bytes,
            chunk_refused,
            directives,
            directives_resent,
            panics,
            api_requests,
            observations,
            drifting_devices,
            rollouts,
            rollout_stage,
            rollout_devices,
        }
    }

    pub fn publish(&self, result: &str) {
        self.publishes.get_or_create(&vec![("result", result.to_string())]).inc();
    }

    pub fn mqtt(&self, kind: &str, accepted: bool) {
        self.mqtt_result(kind, if accepted { "accepted" } else { "rejected" });
    }

    /// A device message of `kind` and what became of it (module docs).
    pub fn mqtt_result(&self, kind: &str, result: &str) {
        self.mqtt_messages.get_or_create(&vec![("kind", kind.to_string()), ("result", result.to_string())]).inc();
    }

    pub fn chunk_refused(&self, reason: &str) {
        self.chunk_refused.get_or_create(&vec![("reason", reason.to_string())]).inc();
    }

    /// A telemetry or sketch message recorded; `drifting` devices now.
    pub fn observed(&self, kind: &str, drifting: usize) {
        self.observations.get_or_create(&vec![("kind", kind.to_string())]).inc();
        self.drifting_devices.set(drifting as i64);
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
        // The classic text format (0.0.4, the content type the API sends):
        // what Prometheus scrapes and `promtool check metrics` accepts. (The
        // OpenMetrics encoder's counters have HELP without `_total`.)
        if encode(&mut out, &self.prom).is_err() {
            log::warn!("metrics: encoding failed");
        }
        out
    }
}
