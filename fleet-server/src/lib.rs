//! # outpost-fleet
//!
//! The fleet side of Outpost as a library; the `outpost-fleet` binary is a
//! thin command-line layer over these modules, one concept each:
//!
//! - [`keys`]: the keys directory — root and online keys, certificates,
//!   rotation, and the [`Signer`](outpost_runtime::bundle::Signer) the
//!   server signs manifests and directives with.
//! - [`bundle_cmd`]: making signed `.outpost` bundles from model files.
//! - [`config`]: `fleet.toml`.
//! - [`registry`]: the SQLite registry (models, versions, devices, audit).
//! - [`bundles`]: content-addressed bundle files under `data_dir/bundles/`.
//! - [`publish`]: the publish gate (accuracy, data width, signing, storing).
//! - [`provisioning`]: registering devices and writing their agent config.
//! - [`broker`]: the embedded MQTT broker and who may connect to it.
//! - [`fleet_link`]: the fleet's MQTT client — verifying device messages.
//! - [`artifacts`]: serving bundle chunks over MQTT.
//! - [`directives`]: signed deployment directives (`deploy`).
//! - [`metrics`]: Prometheus metrics.
//! - [`api`]: the HTTP API; [`client`]: the CLI's HTTP client.
//! - [`server`]: `serve`, wiring it all; [`cli`]: the operator subcommands.

pub mod api;
pub mod artifacts;
pub mod broker;
pub mod bundle_cmd;
pub mod bundles;
pub mod cli;
pub mod client;
pub mod config;
pub mod directives;
pub mod fleet_link;
pub mod keys;
pub mod metrics;
pub mod provisioning;
pub mod publish;
pub mod registry;
pub mod server;
