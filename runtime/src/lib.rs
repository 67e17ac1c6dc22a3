//! # outpost-runtime
//!
//! The device side of Outpost as a library: it loads quantized ONNX and TFLite
//! models with tract, runs them from several threads, serves the local predict
//! API, keeps drift sketches, and verifies signed model bundles.
//!
//! Modules, one concept each:
//! - [`tensor`]: the plain tensor and signature types every part exchanges.
//! - [`model`]: loading (ONNX, TFLite, with the rewrites tract needs) and inference.
//! - [`drift`]: reference and device sketches, drift statistics, verdicts.
//! - [`bundle`]: keys, signed manifests, the `.outpost` bundle and its verification.
//! - [`batch`]: predicting a whole CSV / JSON Lines file in flat memory.
//! - [`bench`]: timing a loaded model on seeded random inputs (`outpost-runtime bench`).
//! - [`stream`]: predicting MQTT messages and publishing the answers.
//! - [`protocol`]: the MQTT topics and messages between the fleet and its devices.

pub mod batch;
pub mod bench;
pub mod bundle;
pub mod dataset;
pub mod drift;
pub mod model;
pub mod protocol;
pub mod server;
pub mod stream;
pub mod tensor;
