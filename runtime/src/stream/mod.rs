//! Streaming mode: predictions over MQTT, so an app on the device (or next
//! to it) publishes a reading and gets the prediction back without ever
//! speaking HTTP.
//!
//! ```text
//!  broker ──▶ adapter (event loop) ──try_submit──▶ [bounded queue] ──▶ worker(s) ──▶ [replies] ──▶ adapter ──▶ broker
//!                                        │ full: drop + count                │ model from the ModelSlot
//! ```
//!
//! # Two layers
//!
//! - [`StreamCore`] knows nothing about MQTT clients: it takes
//!   [`InMessage`]s through a [`Submitter`] and hands [`OutMessage`]s back
//!   on a channel. The agent feeds it from its own broker connection (one
//!   connection per device) and serves whatever model its [`ModelSlot`]
//!   holds, so a model swap takes effect on the next message.
//! - [`mqtt::MqttStream`] (cargo feature `mqtt`, on by default) is a thin
//!   rumqttc MQTT 5 adapter for devices without the agent
//!   (`outpost-runtime serve --mqtt URL --mqtt-in TOPIC --mqtt-out TOPIC`).
//!
//! # Messages
//!
//! A request is the body `POST /predict` takes — `{"features": [...]}` or
//! `{"inputs": {name: array}}` — plus an optional `"id"` (any JSON value).
//! The reply is what `/predict` answers, with the id first:
//!
//! ```json
//! {"id": "r-17", "prediction": 1, "probability": 0.9993987, "model": {"name": "bc_mlp", "version": "…"}}
//! {"id": "r-18", "error": {"code": "invalid_shape", "message": "features: expected 30 values …", "field": "features"}}
//! ```
//!
//! `"id"` is `null` when the request had none (or was not JSON). Error codes
//! are the HTTP API's ([`crate::server::error`]), plus `payload_too_large`
//! for a message over [`StreamConfig::max_payload_bytes`]. A bad message
//! gets its error reply and the stream goes on.
//!
//! **Correlation.** MQTT 5 request/response is honoured: the reply carries
//! the request's *correlation data* unchanged, and goes to the request's
//! *response topic* when it names one. Otherwise it goes to the configured
//! [`OutputTopic`] (default `{topic}/prediction`: `sensors/7/reading` →
//! `sensors/7/reading/prediction`), and the `"id"` field is the correlation.
//!
//! # Backpressure
//!
//! The queue between the event loop and the workers is bounded
//! ([`StreamConfig::queue_capacity`]). When it is full a new message is
//! dropped at once and counted ([`StreamSnapshot::dropped`]) — the event
//! loop must never block, or the broker connection's keep-alive would
//! starve and every message would be lost, not just the excess. Workers
//! wait when the reply channel is full, which fills the queue: a slow
//! broker link sheds load the same way.
//!
//! # Metrics
//!
//! [`StreamStats`] counts everything above; `/metrics` can export it with
//! [`StreamStats::collector`] (see [`stats`] for the metric names).
//!
//! ```no_run
//! use std::sync::Arc;
//! use outpost_runtime::server::{Deployed, ModelSlot};
//! use outpost_runtime::stream::{InMessage, StreamConfig, StreamCore};
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let slot = Arc::new(ModelSlot::with(Deployed::load_file("fixtures/bc_mlp.onnx", &Default::default())?));
//! let (core, replies) = StreamCore::start(slot, StreamConfig::default())?;
//! core.submit(InMessage::new("sensors/7/reading", r#"{"id": 1, "features": [0.5]}"#));
//! let reply = replies.recv()?; // topic "sensors/7/reading/prediction", an error reply here
//! println!("{} {}", reply.topic, String::from_utf8_lossy(&reply.payload));
//! core.shutdown();
//! # Ok(()) }
//! ```
//!
//! [`ModelSlot`]: crate::server::ModelSlot

mod core;
pub mod stats;
mod topic;

#[cfg(feature = "mqtt")]
pub mod mqtt;

pub use self::core::{InMessage, OutMessage, StreamConfig, StreamCore, StreamError, SubmitOutcome, Submitter};
pub use self::stats::{StreamCollector, StreamSnapshot, StreamStats};
pub use self::topic::OutputTopic;
