//! The fleet's own MQTT client: it subscribes to what every device
//! publishes, believes only what the device's key signed, and answers
//! chunk requests.
//!
//! # What the fleet believes
//!
//! A message on `devices/{X}/…` is accepted only if it is a
//! [`DeviceSigned`] envelope that claims device X, is signed by X's key (the
//! public key stored at provisioning), and has a counter above the last one
//! accepted from X for that kind. Anything else is counted as `rejected`
//! in `outpost_fleet_mqtt_messages_total` and changes nothing — whatever
//! broker is in between and whichever credentials the sender used.
//!
//! - **state** counters are kept in the registry (`last_counter`, checked
//!   again inside the `UPDATE`), so a replay stays refused across restarts.
//! - **telemetry, sketch, chunk request** counters are kept in memory:
//!   after a restart an old one could be accepted once, which costs a
//!   re-sent chunk or a duplicated telemetry window, nothing more; writing
//!   every chunk request to disk would cost far more.
//! - The **last will** (`{"status":"offline"}`) is unsigned by nature (the
//!   broker sends it). It only sets an in-memory presence hint shown as
//!   `online: false`; the registry keeps the last signed state.
//!
//! # Threads
//!
//! One thread runs the rumqttc event loop and hands messages to bounded
//! queues, one per worker, chosen by device (so each device's messages are
//! verified in the order it sent them); the workers verify and act on them.
//! When a queue is full, telemetry and sketches are dropped at once (counted
//! as `dropped`) rather than stalling the event loop — a stalled loop misses
//! keep-alives and drops the link for everyone; they come again at the next
//! interval. A state or a chunk request waits up to [`PATIENCE`] for room
//! first: a device publishes its state once per change, and a lost chunk
//! request costs it its chunk timeout.
//!
//! # Chunk replies: bounded memory under a download storm
//!
//! Thousands of devices downloading at once ask for far more bytes than the
//! broker takes per second. Queued without bound, the replies (32 KiB each)
//! pile up in the MQTT client's request queue — 517 MiB of fleet memory at
//! 10,000 devices in `bench/fleet` — and are sent so late that the devices
//! have already timed out and asked again, so the same bytes go out twice.
//! So a worker never publishes a chunk reply itself: it hands it to one
//! **chunk sender** through a bounded queue ([`CHUNK_REPLIES_QUEUED`]) and
//! moves on (a full queue drops the reply, counted as
//! `chunk_requests_refused{reason="busy"}`; the device asks again after its
//! chunk timeout). The sender keeps at most [`CHUNK_REPLIES_UNWRITTEN`]
//! replies inside the client that the event loop has not yet written to
//! the socket. Replies go out at QoS 0: a chunk is idempotent and the
//! device re-asks what it misses, and it lets the event loop count written
//! replies apart from the fleet's QoS 1 messages (a QoS 0 publish is the
//! only one with packet id 0). A chunk request that waited in a worker
//! queue longer than [`STALE_CHUNK_REQUEST`] is dropped unanswered
//! (`reason="stale"`): its device is about to ask again. Fleet memory for
//! chunks is thus at most (queued + unwritten) × chunk size, about 16 MiB
//! with the defaults, whatever the number of devices.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::bundle::PublicKey;
use outpost_runtime::protocol::topics::{self, Kind};
use outpost_runtime::protocol::{
    parse_state_payload, ChunkRequest, DeviceMessage, DeviceSigned, Limits, SketchMessage, StatePayload, Telemetry,
};
use rumqttc::{Client, Event, MqttOptions, Outgoing as SentPacket, Packet, QoS};

use crate::artifacts::Artifacts;
use crate::broker::FLEET_CLIENT_ID;
use crate::metrics::Metrics;
use crate::observations::Observations;
use crate::registry::{DeviceStateUpdate, Registry};

/// Messages waiting for the workers (all queues together): 10,000 devices
/// reconnecting at once each flush a state and buffered telemetry.
const QUEUE: usize = 32_768;
/// How long the event loop waits for room in a full queue for a state or a
/// chunk request before dropping it.
const PATIENCE: Duration = Duration::from_millis(500);
/// Worker threads verifying messages (ed25519 verification is ~50 µs).
const WORKERS: usize = 4;
/// Chunk replies waiting for the chunk sender (module docs).
const CHUNK_REPLIES_QUEUED: usize = 256;
/// Chunk replies handed to the MQTT client and not yet written by its event
/// loop (module docs).
const CHUNK_REPLIES_UNWRITTEN: usize = 256;
/// A chunk request older than this when a worker gets to it is dropped: the
/// agent's default chunk timeout is 10 s, so by the time an answer arrived
/// the device would be about to ask again.
const STALE_CHUNK_REQUEST: Duration = Duration::from_secs(5);
/// A telemetry message refreshes `last_seen` in the registry at most this
/// often per device (seconds): the registry fsyncs every write.
const SEEN_EVERY_SECS: i64 = 60;

/// How to reach the broker.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
}

impl LinkOptions {
    pub fn new(host: &str, port: u16) -> LinkOptions {
        LinkOptions { host: host.into(), port, username: None, password: None, client_id: FLEET_CLIENT_ID.into() }
    }
}

/// What the fleet knows about devices in memory.
#[derive(Default)]
pub struct Presence {
    keys: HashMap<String, PublicKey>,
    counters: HashMap<(String, &'static str), u64>,
    /// `false` after a last will, `true` after any verified message.
    online: HashMap<String, bool>,
    seen_written: HashMap<String, i64>,
}

/// Verifies device messages and acts on them (module docs).
pub struct Inbox {
    registry: Arc<Registry>,
    artifacts: Arc<Artifacts>,
    metrics: Arc<Metrics>,
    /// Where verified telemetry and sketches are recorded.
    observations: Arc<Observations>,
    limits: Limits,
    presence: Mutex<Presence>,
}

/// What a worker should send back, if anything.
pub type Outgoing = Option<(String, Vec<u8>)>;

impl Inbox {
    pub fn new(
        registry: Arc<Registry>,
        artifacts: Arc<Artifacts>,
        metrics: Arc<Metrics>,
        observations: Arc<Observations>,
    ) -> Inbox {
        Inbox {
            registry,
            artifacts,
            metrics,
            observations,
            limits: Limits::default(),
            presence: Mutex::new(Presence::default()),
        }
    }

    /// The device's presence hint: `Some(false)` after its last will,
    /// `Some(true)` after a verified message, `None` if not heard of since start.
    pub fn online(&self, device: &str) -> Option<bool> {
        self.presence.lock().ok().and_then(|p| p.online.get(device).copied())
    }

    fn key(&self, device: &str) -> Option<PublicKey> {
        if let Some(k) = self.presence.lock().ok().and_then(|p| p.keys.get(device).cloned()) {
            return Some(k);
        }
        let record = self.registry.device(device).ok()??;
        let bytes: [u8; 32] = record.public_key.as_slice().try_into().ok()?;
        let key = PublicKey::from_bytes(&bytes).ok()?;
        if let Ok(mut p) = self.presence.lock() {
            p.keys.insert(device.to_string(), key.clone());
        }
        Some(key)
    }

    fn mark_online(&self, device: &str, online: bool) {
        if let Ok(mut p) = self.presence.lock() {
            p.online.insert(device.to_string(), online);
        }
    }

    /// Opens a signed message with the in-memory counter of its kind.
    fn open_counted<T: DeviceMessage>(&self, device: &str, payload: &[u8]) -> Result<T, String> {
        let msg = DeviceSigned::<T>::from_bytes(payload, &self.limits).map_err(|e| e.to_string())?;
        let key = self.key(device).ok_or_else(|| format!("unknown device {device}"))?;
        let last = self.presence.lock().ok().and_then(|p| p.counters.get(&(device.to_string(), T::KIND)).copied());
        let value = msg.open(device, &key, last, &self.limits).map_err(|e| e.to_string())?;
        if let Ok(mut p) = self.presence.lock() {
            let slot = p.counters.entry((device.to_string(), T::KIND)).or_insert(0);
            if msg.counter() <= *slot {
                // Another worker accepted a newer one meanwhile.
                return Err(format!("{} counter {} is not above {}", T::KIND, msg.counter(), slot));
            }
            *slot = msg.counter();
        }
        Ok(value)
    }

    fn refresh_seen(&self, device: &str) {
        let now = outpost_runtime::bundle::unix_now() as i64;
        let due = self
            .presence
            .lock()
            .map(|mut p| {
                let last = p.seen_written.get(device).copied().unwrap_or(0);
                if now - last >= SEEN_EVERY_SECS {
                    p.seen_written.insert(device.to_string(), now);
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if due {
            if let Err(e) = self.registry.touch_device(device, now) {
                log::warn!("registry: last_seen of {device}: {e}");
            }
        }
    }

    /// Handles one message from `topic`; returns a reply to publish, if any.
    pub fn handle(&self, topic: &str, payload: &[u8]) -> Outgoing {
        let Some((device, kind)) = topics::parse(topic) else {
            self.metrics.mqtt("other", false);
            return None;
        };
        let (label, result): (&str, Result<Outgoing, String>) = match kind {
            Kind::State => ("state", self.state(device, payload).map(|()| None)),
            Kind::Telemetry => (
                "telemetry",
                self.open_counted::<Telemetry>(device, payload).map(|t| {
                    self.observations.record_telemetry(device, &t);
                    self.metrics.observed("telemetry", self.observations.counts().2);
                    None
                }),
            ),
            Kind::Sketch => (
                "sketch",
                self.open_counted::<SketchMessage>(device, payload).map(|s| {
                    self.observations.record_sketch(device, &s);
                    self.metrics.observed("sketch", self.observations.counts().2);
                    None
                }),
            ),
            Kind::ChunkRequest => (
                "chunk_request",
                self.open_counted::<ChunkRequest>(device, payload)
                    .map(|req| self.artifacts.serve(device, &req).map(|r| (topics::chunk_data(device), r.to_bytes()))),
            ),
            // Our own publications echo back only if we subscribed to them.
            Kind::Desired | Kind::ChunkData => return None,
        };
        match result {
            Ok(out) => {
                self.metrics.mqtt(label, true);
                if kind != Kind::State {
                    self.mark_online(device, true);
                    self.refresh_seen(device);
                }
                out
            }
            Err(reason) => {
                self.metrics.mqtt(label, false);
                log::warn!("mqtt: rejected {label} on {topic}: {reason}");
                None
            }
        }
    }

    fn state(&self, device: &str, payload: &[u8]) -> Result<(), String> {
        let msg = match parse_state_payload(payload, &self.limits).map_err(|e| e.to_string())? {
            StatePayload::Signed(m) => m,
            StatePayload::Offline => {
                self.mark_online(device, false);
                return Ok(());
            }
            StatePayload::Cleared => return Ok(()),
        };
        let key = self.key(device).ok_or_else(|| format!("unknown device {device}"))?;
        let record = self.registry.device(device).map_err(|e| e.to_string())?.ok_or("unknown device")?;
        // No status yet = no state ever accepted: any counter is fresh.
        let last = record.status.as_ref().map(|_| record.last_counter);
        let state = msg.open(device, &key, last, &self.limits).map_err(|e| e.to_string())?;
        let applied = self
            .registry
            .update_device_state(&DeviceStateUpdate {
                device,
                counter: msg.counter(),
                seen_at: outpost_runtime::bundle::unix_now() as i64,
                model: state.model.as_deref(),
                version: state.version.as_deref(),
                status: state.status.as_str(),
                last_error: state.last_error.as_deref().or(state.rollback_reason.as_deref()),
                directive_sequence: state.directive_sequence,
                committed: state.committed,
            })
            .map_err(|e| e.to_string())?;
        if !applied {
            return Err(format!("state counter {} is not above the stored one", msg.counter()));
        }
        self.mark_online(device, true);
        Ok(())
    }
}

/// The worker that handles `device`'s messages (FNV-1a of the id).
fn shard(device: &str, workers: usize) -> usize {
    let h = device.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (h % workers.max(1) as u64) as usize
}

/// A message from the event loop to a worker.
struct Inbound {
    topic: String,
    payload: Vec<u8>,
    /// The topic is a chunk request's (parsed once, by the event loop).
    chunk_request: bool,
    arrived: Instant,
}

/// Chunk replies inside the MQTT client not yet written to the socket.
#[derive(Default)]
struct Unwritten {
    count: Mutex<usize>,
    room: Condvar,
}

impl Unwritten {
    /// Blocks while [`CHUNK_REPLIES_UNWRITTEN`] replies are waiting in the
    /// client, then counts one more. A count lost with a connection cannot
    /// stall the sender for good: the event loop calls [`reset`](Self::reset)
    /// on every connection error.
    fn wait_for_room(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= CHUNK_REPLIES_UNWRITTEN {
            n = self.room.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
    }

    fn written(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.room.notify_one();
    }

    fn reset(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        self.room.notify_all();
    }
}

/// The running link.
pub struct FleetLink {
    pub client: Client,
    pub connected: Arc<AtomicBool>,
}

/// Connects to the broker and starts the event loop and workers.
/// `on_connect` runs on its own thread after every (re)connection (the
/// fleet republishes retained directives there).
pub fn start(opts: LinkOptions, inbox: Arc<Inbox>, on_connect: Arc<dyn Fn(&Client) + Send + Sync>) -> FleetLink {
    let mut mqtt = MqttOptions::new(opts.client_id.clone(), opts.host.clone(), opts.port);
    mqtt.set_keep_alive(Duration::from_secs(30));
    let max = Limits::default().max_packet_bytes();
    mqtt.set_max_packet_size(max, max);
    mqtt.set_clean_session(true);
    mqtt.set_inflight(200);
    if let (Some(u), Some(p)) = (&opts.username, &opts.password) {
        mqtt.set_credentials(u.clone(), p.clone());
    }
    let (client, mut connection) = Client::new(mqtt, 10_000);
    let connected = Arc::new(AtomicBool::new(false));

    // Chunk replies: workers -> bounded queue -> one sender (module docs).
    let unwritten = Arc::new(Unwritten::default());
    let (chunk_tx, chunk_rx) = sync_channel::<(String, Vec<u8>)>(CHUNK_REPLIES_QUEUED);
    {
        let client = client.clone();
        let unwritten = unwritten.clone();
        let spawned = std::thread::Builder::new().name("mqtt-chunks".into()).spawn(move || {
            while let Ok((topic, bytes)) = chunk_rx.recv() {
                unwritten.wait_for_room();
                if let Err(e) = client.publish(topic.clone(), QoS::AtMostOnce, false, bytes) {
                    unwritten.written();
                    log::warn!("mqtt: sending a chunk on {topic}: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("mqtt: starting the chunk sender: {e}");
        }
    }

    // One queue per worker, and each device's messages always to the same
    // worker: a device's messages are then verified in the order it sent
    // them. With one shared queue, two workers could open a device's chunk
    // requests c and c+1 in the wrong order, refuse c as a replay, and leave
    // the device waiting out its chunk timeout (seen in bench/fleet).
    let mut txs: Vec<SyncSender<Inbound>> = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let (tx, rx): (SyncSender<Inbound>, Receiver<Inbound>) = sync_channel(QUEUE / WORKERS);
        txs.push(tx);
        let inbox = inbox.clone();
        let chunk_tx = chunk_tx.clone();
        let spawned = std::thread::Builder::new().name(format!("mqtt-worker-{i}")).spawn(move || loop {
            let Ok(Inbound { topic, payload, chunk_request, arrived }) = rx.recv() else { return };
            if chunk_request && arrived.elapsed() > STALE_CHUNK_REQUEST {
                inbox.metrics.chunk_refused("stale");
                continue;
            }
            // Only chunk requests are answered.
            if let Some(reply) = inbox.handle(&topic, &payload) {
                match chunk_tx.try_send(reply) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => inbox.metrics.chunk_refused("busy"),
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("mqtt: starting worker {i}: {e}");
        }
    }
    drop(chunk_tx);

    let flag = connected.clone();
    let loop_client = client.clone();
    let metrics = inbox.metrics.clone();
    let spawned = std::thread::Builder::new().name("mqtt-link".into()).spawn(move || {
        let filters: Vec<String> =
            [Kind::State, Kind::Telemetry, Kind::Sketch, Kind::ChunkRequest].into_iter().map(topics::all).collect();
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    log::info!("mqtt: connected to {}:{}", opts.host, opts.port);
                    for f in &filters {
                        if let Err(e) = loop_client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                            log::error!("mqtt: subscribing to {f}: {e}");
                        }
                    }
                    flag.store(true, Ordering::SeqCst);
                    let c = loop_client.clone();
                    let hook = on_connect.clone();
                    // Off the event loop: publishing blocks when the request
                    // queue is full, and only this loop drains it.
                    let _ = std::thread::Builder::new().name("mqtt-on-connect".into()).spawn(move || hook(&c));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let parsed = topics::parse(&p.topic);
                    let worker = parsed.map(|(id, _)| shard(id, WORKERS)).unwrap_or(0);
                    // A state is published once per change, and a lost chunk
                    // request costs the device its chunk timeout: those wait
                    // (bounded, so a worker blocked on publishing back to us
                    // cannot deadlock the loop) before being dropped. Telemetry
                    // comes again at the next interval: dropped at once.
                    let patience = match parsed.map(|(_, k)| k) {
                        Some(Kind::State | Kind::ChunkRequest) => PATIENCE,
                        _ => Duration::ZERO,
                    };
                    let started = Instant::now();
                    let mut item = Inbound {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        chunk_request: matches!(parsed, Some((_, Kind::ChunkRequest))),
                        arrived: started,
                    };
                    loop {
                        match txs[worker].try_send(item) {
                            Ok(()) => break,
                            Err(TrySendError::Full(back)) if started.elapsed() < patience => {
                                item = back;
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Err(TrySendError::Full(_)) => {
                                metrics.mqtt("dropped", false);
                                break;
                            }
                            Err(TrySendError::Disconnected(_)) => return,
                        }
                    }
                }
                // A QoS 0 publish (packet id 0) is a chunk reply leaving
                // the client (module docs).
                Ok(Event::Outgoing(SentPacket::Publish(0))) => unwritten.written(),
                Ok(_) => {}
                Err(e) => {
                    // Replies still queued in the client go out after the
                    // reconnection and count down then; ones lost with the
                    // connection never would, so start counting afresh.
                    unwritten.reset();
                    if flag.swap(false, Ordering::SeqCst) {
                        log::warn!("mqtt: link to {}:{} lost: {e}; reconnecting", opts.host, opts.port);
                    } else {
                        log::debug!("mqtt: connecting to {}:{}: {e}", opts.host, opts.port);
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("mqtt: starting the event loop: {e}");
    }
    FleetLink { client, connected }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sender_waits_for_written_replies() {
        let u = Arc::new(Unwritten::default());
        for _ in 0..CHUNK_REPLIES_UNWRITTEN {
            u.wait_for_room();
        }
        // The next reply must wait until the event loop writes one.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let u = u.clone();
            std::thread::spawn(move || {
                u.wait_for_room();
                tx.send(()).expect("test channel");
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "a full client must hold the sender back");
        u.written();
        rx.recv_timeout(Duration::from_secs(5)).expect("one written reply makes room for one more");
        waiter.join().expect("waiter");
        assert_eq!(*u.count.lock().expect("count"), CHUNK_REPLIES_UNWRITTEN);
        // A lost connection forgets the count instead of stalling for good.
        u.reset();
        assert_eq!(*u.count.lock().expect("count"), 0);
        u.written();
        assert_eq!(*u.count.lock().expect("count"), 0, "never below zero");
    }
}
