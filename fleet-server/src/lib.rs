//! # outpost-fleet
//!
//! The fleet side of Outpost as a library; the `outpost-fleet` binary is a
//! thin command-line layer over these modules, one concept each:
//!
//! - [`keys`]: the keys directory — root and online keys, certificates,
//!   rotation, and the [`Signer`](outpost_runtime::bundle::Signer) the
//!   server signs manifests and directives with.
//! - [`bundle_cmd`]: making signed `.outpost` bundles from model files.
//! - [`config`]: the `fleet.toml` file.
//! - [`registry`]: the SQLite registry (models, versions, devices, audit).
//! - [`bundles`]: content-addressed bundle files under `data_dir/bundles/`.
//! - [`publish`]: the publish gate (accuracy, data width, signing, storing).
//! - [`provisioning`]: registering devices and writing their agent config.
//! - [`broker`]: the embedded MQTT broker and who may connect to it;
//!   [`acl`]: what each client may publish and subscribe to there.
//! - [`drift_cmd`]: `outpost-fleet drift`.
//! - [`fleet_view`]: the drift view, device list and summary from observations;
//!   [`fleet_feed`]: the summary and alerts on MQTT for dashboards.
//! - [`fleet_link`]: the fleet's MQTT client — verifying device messages;
//!   [`rate_limit`]: per-device limits on what devices publish.
//! - [`artifacts`]: serving bundle chunks over MQTT.
//! - [`directives`]: signed deployment directives (`deploy`).
//! - [`manifests`]: reference sketches of published versions, from their manifests.
//! - [`metrics`]: Prometheus metrics.
//! - [`canary`]: the statistics of canary analysis.
//! - [`observations`]: device telemetry and sketches, canary analysis, fleet drift.
//! - [`rollout`]: staged canary rollouts with gates, automatic halt and
//!   remote rollback (the state machine is [`rollout::machine`]).
//! - [`dashboard`]: the web page served at `/`.
//! - [`api`]: the HTTP API; [`client`]: the CLI's HTTP client.
//! - [`server`]: `serve`, wiring it all; [`cli`]: the operator subcommands;
//!   [`supervisor`]: panics caught per unit of work, dead threads named by `/ready`.
//! - [`simulate`]: `simulate --devices N`, a fleet of simulated devices
//!   (the agent's protocol code, one MQTT connection each) for benchmarks.

pub mod acl;
pub mod api;
pub mod artifacts;
pub mod broker;
pub mod bundle_cmd;
pub mod bundles;
pub mod canary;
pub mod cli;
pub mod client;
pub mod config;
pub mod contribution;
pub mod dashboard;
pub mod directives;
pub mod drift_cmd;
pub mod fleet_feed;
pub mod fleet_link;
pub mod fleet_view;
pub mod keys;
pub mod manifests;
pub mod metrics;
pub mod observations;
pub mod provisioning;
pub mod publish;
pub mod rate_limit;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod simulate;
pub mod supervisor;
