//! The harness of the fleet end-to-end tests: real `outpost-fleet` and
//! `outpost-agent` processes (and mosquitto), driven the way an operator,
//! the apps on a device and a dashboard would drive them. A module per
//! part:
//!
//! - [`procs`]: the binaries under test, child processes, waiting;
//! - [`http`]: a minimal HTTP client for the device and fleet APIs;
//! - [`fleet`]: keygen, fleet.toml, `serve`, and the operator CLI;
//! - [`device`]: `provision` and `outpost-agent run`, a device's API and files;
//! - [`mosquitto`]: the external broker, stoppable;
//! - [`alerts`]: an MQTT subscriber on the fleet's alerts;
//! - [`attacker`]: a stolen device's MQTT sessions and hostile HTTP clients;
//! - [`traffic`]: the apps' predictions, recorded;
//! - [`slow_model`]: a model that passes the publish gate but is far too
//!   slow on a device.
#![allow(dead_code)]

pub mod alerts;
pub mod attacker;
pub mod device;
pub mod fleet;
pub mod http;
pub mod mosquitto;
pub mod procs;
pub mod slow_model;
pub mod traffic;
