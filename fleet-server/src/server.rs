//! `outpost-fleet serve`: wires the parts together.
//!
//! Start-up order, each step failing with a one-line cause:
//!
//! 1. keys: the online signer (certificate checked against `root.pub`, not
//!    expired) and the root public key devices pin;
//! 2. `data_dir`: the registry (migrated), the bundle store, the uploads
//!    directory (stale uploads of an earlier run removed);
//! 3. the broker: the embedded rumqttd (`[broker] listen`), or nothing to
//!    start for an external one (`[broker] url`);
//! 4. the fleet's MQTT link (subscriptions, chunk serving); on every
//!    connection it republishes the recorded directives, retained;
//! 5. the rollout driver (live rollouts resume where their records say);
//! 6. the HTTP API.
//!
//! Every long-lived thread (API workers, MQTT event loop, workers, chunk
//! sender, counter flusher, rollout driver) is started through the
//! [`Supervisor`]: a panic costs one request, message or tick, and a thread
//! that stops anyway makes `/ready` answer 503 with its name.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use outpost_runtime::bundle::PublicKey;

use crate::artifacts::Artifacts;
use crate::broker::{self, EmbeddedSettings};
use crate::bundles::BundleStore;
use crate::config::{BrokerMode, FleetConfig};
use crate::directives::Directives;
use crate::fleet_link::{self, Inbox, LinkOptions};
use crate::keys;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::registry::Registry;
use crate::supervisor::Supervisor;

/// Everything the API handlers need.
pub struct Fleet {
    pub config: FleetConfig,
    pub registry: Arc<Registry>,
    pub publisher: Publisher,
    pub directives: Directives,
    pub metrics: Arc<Metrics>,
    pub inbox: Arc<Inbox>,
    /// The root public key devices pin (written into agent configs).
    pub root: PublicKey,
    pub link: fleet_link::FleetLink,
    /// Telemetry and sketches devices sent (canary gates, drift view).
    pub observations: Arc<crate::observations::Observations>,
    /// Staged rollouts and remote rollback (driven by their own thread).
    pub rollouts: crate::rollout::Rollouts,
    /// The long-lived threads, watched (see [`crate::supervisor`]).
    pub supervisor: Arc<Supervisor>,
    /// Who may connect to the embedded broker (`None` with an external one);
    /// decommissioning drops a device's cached credential there.
    pub broker_auth: Option<Arc<crate::broker::Authenticator>>,
}

impl Fleet {
    /// Why the fleet is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        let dead = self.supervisor.dead();
        if !dead.is_empty() {
            return Some(format!("thread(s) stopped: {}", dead.join(", ")));
        }
        if !self.link.connected.load(Ordering::SeqCst) {
            return Some("not connected to the MQTT broker".into());
        }
        if let Err(e) = self.registry.schema_version() {
            return Some(format!("registry: {e}"));
        }
        None
    }

    /// Records an operator action; a failing audit write is logged loudly
    /// (the action itself already happened).
    pub fn audit(&self, actor: &str, action: &str, target: &str, result: &str) {
        if let Err(e) = self.registry.audit(actor, action, target, result) {
            log::error!("audit log write failed ({actor} {action} {target}: {result}): {e}");
        }
    }
}

/// A started fleet server.
pub struct Running {
    pub fleet: Arc<Fleet>,
    pub api_addr: std::net::SocketAddr,
    pub broker_addr: Option<std::net::SocketAddr>,
}

/// Starts everything (module docs) and returns once the API listens.
pub fn start(config: FleetConfig) -> anyhow::Result<Running> {
    use anyhow::Context;
    let signer = keys::load_signer(&config.keys_dir).with_context(|| format!("keys_dir {}", config.keys_dir.display()))?;
    let root = *keys::load_trust_root(&config.keys_dir)
        .with_context(|| format!("keys_dir {}", config.keys_dir.display()))?
        .key();

    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    let registry = Arc::new(
        Registry::open(&config.registry_path()).with_context(|| format!("data_dir: {}", config.registry_path().display()))?,
    );
    let store = BundleStore::open(&config.bundles_dir()).context("data_dir")?;
    clear_dir(&config.uploads_dir());
    let metrics = Arc::new(Metrics::new());
    let supervisor = Arc::new(Supervisor::with_counter(metrics.panics.clone()));

    let (link_options, broker_addr, broker_auth) = match &config.broker {
        BrokerMode::Embedded { listen, tls, dashboard_password } => {
            let filters = [
                outpost_runtime::protocol::topics::Kind::State,
                outpost_runtime::protocol::topics::Kind::Telemetry,
                outpost_runtime::protocol::topics::Kind::Sketch,
                outpost_runtime::protocol::topics::Kind::ChunkRequest,
            ]
            .into_iter()
            .map(outpost_runtime::protocol::topics::all)
            .collect();
            let settings = EmbeddedSettings {
                listen: *listen,
                max_connections: config.max_connections,
                // The largest message the protocol allows (a 1 MiB sketch or chunk
                // reply plus framing): anything bigger is refused by the broker.
                max_payload_size: outpost_runtime::protocol::Limits::default()
                    .max_packet_bytes()
                    .max(config.artifacts.max_chunk_bytes as usize + (64 << 10)),
                fleet_filters: filters,
                tls: tls.clone(),
                dashboard_password: dashboard_password.clone(),
            };
            let b = broker::start_embedded(settings, registry.clone())?;
            let mut o = LinkOptions::new(&b.listen.ip().to_string(), b.listen.port());
            o.username = Some(b.fleet.username.clone());
            o.password = Some(b.fleet.password.clone());
            log::info!("embedded MQTT broker listening on {listen}{}", if tls.is_some() { " (TLS)" } else { "" });
            (o, Some(b.listen), Some(b.auth.clone()))
        }
        BrokerMode::External { url, username, password } => {
            let mut o = LinkOptions::new(&url.host, url.port);
            o.username = username.clone();
            o.password = password.clone();
            if let Some(u) = username {
                o.client_id = u.clone();
            }
            log::info!("using the external MQTT broker at {url}");
            (o, None, None)
        }
    };

    let mut link_options = link_options;
    // The link's chunk-request limit stops floods before signature checks;
    // never below twice what the artifact server grants a device after them.
    let chunks = &mut link_options.rates.chunk_request;
    chunks.per_second = chunks.per_second.max(2.0 * f64::from(config.artifacts.requests_per_second));
    chunks.burst = chunks.burst.max(2.0 * f64::from(config.artifacts.burst));
    let artifacts = Arc::new(Artifacts::new(store.clone(), registry.clone(), config.artifacts.clone(), metrics.clone()));
    let observations = Arc::new(crate::observations::Observations::new());
    let inbox = Arc::new(Inbox::new(registry.clone(), artifacts, metrics.clone(), observations.clone()));
    // The directive publisher needs the MQTT client, and the on-connect hook
    // needs the publisher: the hook reaches it through this slot.
    let slot: Arc<std::sync::OnceLock<Arc<Fleet>>> = Arc::new(std::sync::OnceLock::new());
    let hook_slot = slot.clone();
    let on_connect = Arc::new(move |_: &rumqttc::Client| {
        // Wait for start() to finish wiring (the first ConnAck can come first).
        for _ in 0..200 {
            if let Some(f) = hook_slot.get() {
                match f.directives.republish_all() {
                    Ok(n) if n > 0 => log::info!("republished {n} directives"),
                    Ok(_) => {}
                    Err(e) => log::error!("republishing directives: {e}"),
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    });
    let link = fleet_link::start(link_options, inbox.clone(), on_connect, supervisor.clone());
    let directives = Directives::new(registry.clone(), signer, link.client.clone(), metrics.clone());
    let publisher = Publisher::new(registry.clone(), store, config.keys_dir.clone(), config.uploads_dir());
    let rollouts = crate::rollout::Rollouts::new(registry.clone());
    let fleet =
        Arc::new(Fleet {
            config,
            registry,
            publisher,
            directives,
            metrics,
            inbox,
            root,
            link,
            observations,
            rollouts,
            supervisor,
            broker_auth,
        });
    let _ = slot.set(fleet.clone());
    crate::fleet_feed::start(&fleet);
    // Live rollouts resume from their persisted records (same stage, same
    // bake clock, nothing re-sent).
    crate::rollout::Rollouts::spawn_driver(fleet.clone()).context("starting the rollout driver")?;
    let api_addr = crate::api::start(fleet.clone()).map_err(anyhow::Error::msg)?;
    log::info!("fleet API listening on http://{api_addr}");
    Ok(Running { fleet, api_addr, broker_addr })
}

/// Empties a scratch directory (uploads of an earlier run are useless:
/// they are single-use and their publish never happened).
fn clear_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = std::fs::create_dir_all(dir) {
        log::warn!("creating {}: {e}", dir.display());
    }
}
