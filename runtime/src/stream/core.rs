//! The broker-independent streaming core: a bounded queue, worker threads
//! that predict with whatever model the [`ModelSlot`] holds, and a reply
//! channel. See the [module docs](super).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Deserialize;

use super::stats::StreamStats;
use super::topic::OutputTopic;
use crate::server::error::ApiError;
use crate::server::{request, response, Deployed, ModelSlot};

/// One message to predict on.
#[derive(Clone, Debug)]
pub struct InMessage {
    /// The topic it arrived on.
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 correlation data: echoed unchanged on the reply.
    pub correlation_data: Option<Vec<u8>>,
    /// MQTT 5 response topic: where the reply goes instead of the output topic.
    pub response_topic: Option<String>,
    /// When it arrived; the serving statistics count latency from here, so
    /// time spent queued shows.
    pub received_at: Instant,
}

impl InMessage {
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> InMessage {
        InMessage {
            topic: topic.into(),
            payload: payload.into(),
            correlation_data: None,
            response_topic: None,
            received_at: Instant::now(),
        }
    }
}

/// One reply to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMessage {
    pub topic: String,
    /// JSON: see the module docs.
    pub payload: Vec<u8>,
    /// The request's MQTT 5 correlation data, to set on the reply.
    pub correlation_data: Option<Vec<u8>>,
    /// Whether the payload is an error reply.
    pub is_error: bool,
}

/// How the core runs. The defaults suit a small device: one worker (a model
/// run is short; more workers help only with several cores and a busy
/// stream), 64 messages of queue, 1 MiB messages.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub workers: usize,
    /// Messages waiting for a worker before new ones are dropped.
    pub queue_capacity: usize,
    /// Replies waiting for the adapter; when full, workers wait.
    pub reply_capacity: usize,
    /// A larger message gets a `payload_too_large` error reply unread.
    pub max_payload_bytes: usize,
    pub output: OutputTopic,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            workers: 1,
            queue_capacity: 64,
            reply_capacity: 64,
            max_payload_bytes: 1024 * 1024,
            output: OutputTopic::default(),
        }
    }
}

/// Why the stream could not start (or, for the MQTT adapter, connect).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("invalid stream configuration: {0}")]
    Config(String),
    #[error("cannot start a stream thread: {0}")]
    Spawn(std::io::Error),
    #[error("MQTT broker {url}: {reason}")]
    Broker { url: String, reason: String },
}

/// What became of a submitted message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// A worker will answer it.
    Queued,
    /// The queue was full: dropped and counted, no reply.
    Dropped,
    /// It came in on a reply topic: not predicted, no reply.
    Ignored,
    /// The core is shutting down.
    Closed,
}

struct Shared {
    /// `None` once shut down; the lock is only ever contended by shutdown.
    queue: RwLock<Option<SyncSender<InMessage>>>,
    stats: Arc<StreamStats>,
    output: OutputTopic,
}

/// The sending side of the queue, for an adapter's event loop. Never
/// blocks: see "Backpressure" in the module docs.
#[derive(Clone)]
pub struct Submitter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter").finish_non_exhaustive()
    }
}

impl Submitter {
    pub fn submit(&self, msg: InMessage) -> SubmitOutcome {
        let s = &self.shared;
        if s.output.is_reply_topic(&msg.topic) {
            s.stats.ignored.fetch_add(1, Ordering::Relaxed);
            return SubmitOutcome::Ignored;
        }
        let queue = s.queue.read().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = queue.as_ref() else { return SubmitOutcome::Closed };
        s.stats.received.fetch_add(1, Ordering::Relaxed);
        // Count before sending: a worker may take it (and decrement) at once.
        s.stats.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(msg) {
            Ok(()) => SubmitOutcome::Queued,
            Err(e) => {
                s.stats.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        s.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        SubmitOutcome::Dropped
                    }
                    TrySendError::Disconnected(_) => SubmitOutcome::Closed,
                }
            }
        }
    }

    pub fn stats(&self) -> &Arc<StreamStats> {
        &self.shared.stats
    }
}

/// The running core: see the module docs.
pub struct StreamCore {
    submitter: Submitter,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for StreamCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCore").field("workers", &self.workers.len()).finish()
    }
}

impl StreamCore {
    /// Starts the workers. Replies arrive on the returned receiver, in the
    /// order they are ready (with several workers, not necessarily the
    /// order the messages came in — the correlation id is what pairs them).
    pub fn start(slot: Arc<ModelSlot>, config: StreamConfig) -> Result<(StreamCore, Receiver<OutMessage>), StreamError> {
        if config.workers == 0 || config.workers > 256 {
            return Err(StreamError::Config(format!("{} workers: expected 1 to 256", config.workers)));
        }
        if config.queue_capacity == 0 || config.reply_capacity == 0 {
            return Err(StreamError::Config("queue and reply capacities must be at least 1".into()));
        }
        if config.max_payload_bytes == 0 {
            return Err(StreamError::Config("the payload limit must be at least 1 byte".into()));
        }
        let (tx, rx) = sync_channel::<InMessage>(config.queue_capacity);
        let (reply_tx, reply_rx) = sync_channel::<OutMessage>(config.reply_capacity);
        let stats = Arc::new(StreamStats::default());
        stats.capacity.store(config.queue_capacity as u64, Ordering::Relaxed);
        let shared =
            Arc::new(Shared { queue: RwLock::new(Some(tx)), stats: Arc::clone(&stats), output: config.output.clone() });
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(config.workers);
        for i in 0..config.workers {
            let worker = Worker {
                slot: Arc::clone(&slot),
                stats: Arc::clone(&stats),
                output: config.output.clone(),
                max_payload: config.max_payload_bytes,
            };
            let (rx, reply_tx) = (Arc::clone(&rx), reply_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("outpost-stream-{i}"))
                .spawn(move || worker.run(&rx, &reply_tx));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    // Close the queue so the workers already started exit.
                    shared.queue.write().unwrap_or_else(|p| p.into_inner()).take();
                    return Err(StreamError::Spawn(e));
                }
            }
        }
        Ok((StreamCore { submitter: Submitter { shared }, workers }, reply_rx))
    }

    /// A handle for an event loop (cheap to clone, never blocks).
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    pub fn submit(&self, msg: InMessage) -> SubmitOutcome {
        self.submitter.submit(msg)
    }

    pub fn stats(&self) -> Arc<StreamStats> {
        Arc::clone(&self.submitter.shared.stats)
    }

    /// Stops taking messages (submitters get [`SubmitOutcome::Closed`]),
    /// answers those already queued, and waits for the workers. The reply
    /// channel closes once the last reply is in it.
    pub fn shutdown(self) {
        self.submitter.shared.queue.write().unwrap_or_else(|p| p.into_inner()).take();
        for w in self.workers {
            let _ = w.join();
        }
    }
}

struct Worker {
    slot: Arc<ModelSlot>,
    stats: Arc<StreamStats>,
    output: OutputTopic,
    max_payload: usize,
}

impl Worker {
    fn run(&self, rx: &Mutex<Receiver<InMessage>>, replies: &SyncSender<OutMessage>) {
        loop {
            let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
            let Ok(msg) = next else { return };
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let reply = self.answer(msg);
            // The adapter is gone: nobody would publish further replies.
            if replies.send(reply).is_err() {
                return;
            }
        }
    }

    fn answer(&self, msg: InMessage) -> OutMessage {
        let topic = match &msg.response_topic {
            Some(t) if !t.is_empty() => t.clone(),
            _ => self.output.topic_for(&msg.topic),
        };
        let too_large = msg.payload.len() > self.max_payload;
        let id = if too_large { None } else { request_id(&msg.payload) };
        let result = if too_large {
            self.stats.input_errors.fetch_add(1, Ordering::Relaxed);
            Err(ApiError {
                status: 413,
                code: "payload_too_large",
                message: format!(
                    "message of {} bytes is over the limit of {} bytes",
                    msg.payload.len(),
                    self.max_payload
                ),
                field: None,
                retry_after: None,
                allow: None,
            })
        } else {
            self.predict(&msg)
        };
        let (payload, is_error) = match result {
            Ok(body) => (with_id(id.as_ref(), &body), false),
            Err(e) => (with_id(id.as_ref(), &e.to_json()), true),
        };
        OutMessage { topic, payload, correlation_data: msg.correlation_data, is_error }
    }

    /// Parses, runs and renders exactly as `POST /predict` does, and counts
    /// the outcome on the model (the agent's probation reads those counts)
    /// and on the stream.
    fn predict(&self, msg: &InMessage) -> Result<Vec<u8>, ApiError> {
        let Some(d) = self.slot.current() else {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::not_ready());
        };
        let parsed = match request::parse_predict(&msg.payload, &d) {
            Ok(p) => p,
            Err(e) => return Err(self.input_error(&d, e)),
        };
        let rows = parsed.rows.unwrap_or(1);
        // The drift sketch needs the input after the run has consumed it.
        let tapped = if d.drift().is_some() { parsed.inputs.first().cloned() } else { None };
        match catch_unwind(AssertUnwindSafe(|| d.model().run(parsed.inputs))) {
            Ok(Ok(outputs)) => {
                if let Some(input) = &tapped {
                    d.observe_drift(input, &outputs);
                }
                d.stats().record_ok(rows, msg.received_at.elapsed());
                self.stats.predicted.fetch_add(1, Ordering::Relaxed);
                Ok(response::render(&parsed.render, &d, &outputs))
            }
            Ok(Err(e)) if e.is_input_error() => {
                let field = e.field().map(|f| format!("inputs.{f}")).unwrap_or_else(|| "inputs".into());
                Err(self.input_error(&d, ApiError::invalid_shape(field, e)))
            }
            Ok(Err(e)) => Err(self.failure(&d, msg, ApiError::inference_failed(e))),
            Err(_) => Err(self.failure(&d, msg, ApiError::inference_failed("the model panicked"))),
        }
    }

    fn input_error(&self, d: &Deployed, e: ApiError) -> ApiError {
        d.stats().record_input_error();
        self.stats.input_errors.fetch_add(1, Ordering::Relaxed);
        e
    }

    fn failure(&self, d: &Deployed, msg: &InMessage, e: ApiError) -> ApiError {
        d.stats().record_failure(msg.received_at.elapsed());
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        log::warn!("stream message on {}: {}", msg.topic, e.message);
        e
    }
}

/// The request's `"id"`, read without building the rest of the message.
/// A message JSON cannot read (NaN from Python's `json`, say) is retried
/// through the server's lenient reader, so even its error reply is paired.
fn request_id(payload: &[u8]) -> Option<serde_json::Value> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<IdOnly>(payload) {
        Ok(x) => x.id,
        Err(_) => request::parse_json(payload).ok()?.get("id").cloned(),
    }
}

/// `{"id":…,` + the body without its opening brace.
fn with_id(id: Option<&serde_json::Value>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(b"{\"id\":");
    match id {
        // Serializing a Value into a Vec cannot fail.
        Some(v) => {
            let _ = serde_json::to_writer(&mut out, v);
        }
        None => out.extend_from_slice(b"null"),
    }
    match body.strip_prefix(b"{") {
        Some(rest) if rest != b"}" => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        _ => out.push(b'}'),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_spliced_in() {
        assert_eq!(with_id(Some(&serde_json::json!("a")), b"{\"x\":1}"), b"{\"id\":\"a\",\"x\":1}");
        assert_eq!(with_id(None, b"{}"), b"{\"id\":null}");
        assert_eq!(request_id(br#"{"id": 7, "features": [1, NaN]}"#), Some(serde_json::json!(7)));
        assert_eq!(request_id(br#"{"features": [1]}"#), None);
        assert_eq!(request_id(b"not json"), None);
    }
}
