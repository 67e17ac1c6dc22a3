//! # outpost-agent
//!
//! The one process flashed onto every device: it serves the local predict
//! API in-process (the runtime's HTTP server) and keeps the model current
//! from the fleet over MQTT — signed directives, chunked verified downloads,
//! A/B slots, a zero-downtime swap, probation and rollback by itself.
//!
//! One module per concept:
//!
//! - [`config`]: `agent.toml` and `OUTPOST_<KEY>` variables.
//! - [`link`]: the MQTT connection (last will, backoff, resubscribe).
//! - [`download`]: chunked, resumable, verified-as-it-arrives downloads.
//! - [`fetch`]: the same download from a directive's HTTP(S) URL.
//! - [`retry`]: when a download is tried again, and when it is given up.
//! - [`slots`]: A/B slots and the state file — every disk write, and the
//!   crash-safety argument.
//! - [`activation`]: load + self-test, and the atomic traffic switch.
//! - [`probation`]: when a new version fails its trial.
//! - [`telemetry`]: telemetry, sketches, the offline buffer.
//! - [`agent`]: the state machine tying them together.
//! - [`notify`]: systemd readiness and watchdog.
//! - [`test_hooks`]: fault injection for the crash tests (test-only).
//!
//! The wire protocol is `outpost_runtime::protocol`, shared with the fleet.

pub mod activation;
pub mod agent;
pub mod config;
pub mod download;
pub mod fetch;
pub mod link;
pub mod notify;
pub mod probation;
pub mod retry;
pub mod slots;
pub mod telemetry;
pub mod test_hooks;

pub use agent::{Agent, Input};
pub use config::{AgentConfig, ConfigError};
