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
//! - **telemetry, sketch, chunk request** counters are kept in memory, per
//!   kind. Across a restart a device's messages share one floor: the
//!   highest counter the fleet accepted from it in *any* message (an agent
//!   takes every counter from one monotonic sequence). The link keeps that
//!   high-water mark per device and writes the ones that changed to the
//!   registry (`counter_floor`) in one transaction every [`FLUSH_EVERY`],
//!   and at a clean stop ([`Inbox::flush_counters`], called on SIGTERM);
//!   at start every kind's counter begins at the stored floor. What is left
//!   open: a message accepted after the last flush before a `kill -9` or a
//!   power cut can be replayed once after the restart (at most
//!   [`FLUSH_EVERY`] of a device's traffic, one telemetry window or a few
//!   chunk requests); a state never, its counter is in the registry.
//! - The **last will** is a signed `DeviceWill`, made by the agent when
//!   it connects and sent by the broker when the connection drops. It is
//!   verified like any device message, with its own counter kind (`will`,
//!   above the last will accepted), and only then marks the device
//!   offline. An unsigned `{"status":"offline"}` (the old will, or anyone
//!   imitating it) is rejected and changes nothing. The will's counter has
//!   no floor across restarts (it was signed when the device connected,
//!   below everything it sent since): after a restart one old will could
//!   be believed, showing the device offline until its next message.
//! - A **decommissioned** device has no key: everything it signs is
//!   rejected ([`Inbox::forget`] drops what the link cached about it).
//!
//! # Limits and lagging devices
//!
//! The event loop admits each device message through a per-device,
//! per-kind token bucket ([`crate::rate_limit`]) before queueing it: a
//! flood is dropped and counted (`result="rate_limited"`), never waited
//! for. A verified state whose `directive_sequence` is below the directive
//! recorded for the device (it refused a forged one, or missed it offline)
//! gets the recorded directive re-sent, retained, at most once per
//! [`RESEND_EVERY`] per device.
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use outpost_runtime::bundle::PublicKey;
use outpost_runtime::protocol::topics::{self, Kind};
use outpost_runtime::protocol::{
    parse_state_payload, ChunkRequest, DeviceMessage, DeviceSigned, DeviceState, DeviceWill, Limits, SketchMessage,
    StatePayload, Telemetry,
};
use rumqttc::{Client, Event, MqttOptions, Outgoing as SentPacket, Packet, QoS};

use crate::artifacts::Artifacts;
use crate::broker::FLEET_CLIENT_ID;
use crate::metrics::Metrics;
use crate::observations::Observations;
use crate::rate_limit::{DeviceRates, Limiter};
use crate::registry::{DeviceStateUpdate, Registry};
use crate::supervisor::Supervisor;

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
/// How often the devices' counter high-water marks are written to the
/// registry (module docs: the replay window after a crash).
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Every kind of device message whose counter the link keeps.
const COUNTED_KINDS: [&str; 5] =
    [DeviceState::KIND, Telemetry::KIND, SketchMessage::KIND, ChunkRequest::KIND, DeviceWill::KIND];
/// A device's recorded directive is re-sent at most this often.
pub const RESEND_EVERY: Duration = Duration::from_secs(30);

/// How to reach the broker.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    /// Per-device limits on what devices publish.
    pub rates: DeviceRates,
}

impl LinkOptions {
    pub fn new(host: &str, port: u16) -> LinkOptions {
        LinkOptions {
            host: host.into(),
            port,
            username: None,
            password: None,
            client_id: FLEET_CLIENT_ID.into(),
            rates: DeviceRates::default(),
        }
    }
}

/// What the fleet knows about devices in memory. Entries exist only for
/// devices in the registry (keys loaded) and go with [`Inbox::forget`].
#[derive(Default)]
pub struct Presence {
    keys: HashMap<String, PublicKey>,
    counters: HashMap<(String, &'static str), u64>,
    /// The replay floor of every kind but the will, from the registry at start.
    floors: HashMap<String, u64>,
    /// Highest counter accepted since the last flush, per device.
    high_water: HashMap<String, u64>,
    /// `false` after a verified will, `true` after any other verified message.
    online: HashMap<String, bool>,
    seen_written: HashMap<String, i64>,
    /// When the device's directive was last re-sent.
    resent: HashMap<String, Instant>,
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
    /// The link's client, for re-sending directives (set by [`start`]).
    mqtt: OnceLock<Client>,
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
        let inbox = Inbox {
            registry,
            artifacts,
            metrics,
            observations,
            limits: Limits::default(),
            presence: Mutex::new(Presence::default()),
            mqtt: OnceLock::new(),
        };
        inbox.load();
        inbox
    }

    /// Loads every provisioned device's key and replay floor, so that the
    /// rate limiter knows them from the first message (a device it does not
    /// know shares the bucket of unknown ids).
    fn load(&self) {
        let devices = match self.registry.devices() {
            Ok(d) => d,
            Err(e) => {
                log::error!("mqtt: loading device keys: {e}; they load one by one as devices speak");
                Vec::new()
            }
        };
        let floors = match self.registry.counter_floors() {
            Ok(f) => f,
            Err(e) => {
                // Without floors, replays of the last moments before the
                // restart would be believed: say so loudly.
                log::error!("mqtt: loading the devices' counter floors: {e}; replays from before the restart may be accepted once");
                Vec::new()
            }
        };
        let mut p = self.presence();
        for d in devices {
            if let Some(key) = key_of(&d.public_key) {
                p.keys.insert(d.id, key);
            }
        }
        p.floors.extend(floors);
    }

    /// The in-memory state; a panic while it was held (caught by the
    /// supervisor) leaves maps that are each consistent, so it is used on.
    fn presence(&self) -> MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's presence hint: `Some(false)` after its verified will,
    /// `Some(true)` after another verified message, `None` if not heard of since start.
    pub fn online(&self, device: &str) -> Option<bool> {
        self.presence().online.get(device).copied()
    }

    /// Whether the device's key is loaded (it is provisioned and not
    /// decommissioned); for the rate limiter.
    pub fn knows(&self, device: &str) -> bool {
        self.presence().keys.contains_key(device)
    }

    /// Loads a newly provisioned (or re-provisioned) device's key, dropping
    /// anything cached about an earlier device of the same id.
    pub fn learn(&self, device: &str) {
        self.forget(device);
        let _ = self.key(device);
    }

    /// Drops everything cached about a device (decommissioned): its key,
    /// counters, floor and presence. Its messages are rejected from then
    /// on, as from any unknown device.
    pub fn forget(&self, device: &str) {
        let mut p = self.presence();
        p.keys.remove(device);
        // By key, not by scanning every device's counters.
        for kind in COUNTED_KINDS {
            p.counters.remove(&(device.to_string(), kind));
        }
        p.floors.remove(device);
        p.high_water.remove(device);
        p.online.remove(device);
        p.seen_written.remove(device);
        p.resent.remove(device);
    }

    fn key(&self, device: &str) -> Option<PublicKey> {
        if let Some(k) = self.presence().keys.get(device).cloned() {
            return Some(k);
        }
        let record = self.registry.device(device).ok()??;
        if record.decommissioned_at.is_some() {
            return None;
        }
        let key = key_of(&record.public_key)?;
        self.presence().keys.insert(device.to_string(), key);
        Some(key)
    }

    fn mark_online(&self, device: &str, online: bool) {
        self.presence().online.insert(device.to_string(), online);
    }

    /// Records an accepted counter for the next flush.
    fn accepted(&self, device: &str, counter: u64) {
        let mut p = self.presence();
        let hw = p.high_water.entry(device.to_string()).or_insert(0);
        *hw = (*hw).max(counter);
    }

    /// Writes the high-water marks accepted since the last flush to the
    /// registry, in one transaction; returns how many devices. On failure
    /// they are kept for the next flush.
    pub fn flush_counters(&self) -> usize {
        let batch: Vec<(String, u64)> = std::mem::take(&mut self.presence().high_water).into_iter().collect();
        match self.registry.raise_counter_floors(&batch) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("registry: writing {} counter floors: {e}; retrying at the next flush", batch.len());
                let mut p = self.presence();
                for (d, c) in batch {
                    let hw = p.high_water.entry(d).or_insert(0);
                    *hw = (*hw).max(c);
                }
                0
            }
        }
    }

    /// The last accepted counter `msg` must be above: the kind's own, and
    /// (`floored`) the device's floor from before the restart.
    fn last_counter(&self, device: &str, kind: &'static str, floored: bool) -> Option<u64> {
        let p = self.presence();
        let own = p.counters.get(&(device.to_string(), kind)).copied();
        let floor = if floored { p.floors.get(device).copied() } else { None };
        own.max(floor)
    }

    /// Opens a signed message with the in-memory counter of its kind.
    fn open_counted<T: DeviceMessage>(&self, device: &str, payload: &[u8]) -> Result<T, String> {
        let msg = DeviceSigned::<T>::from_bytes(payload, &self.limits).map_err(|e| e.to_string())?;
        self.open_envelope(device, &msg, true)
    }

    /// Verifies an envelope against the device's key and the counters
    /// (`floored`: module docs), and records its counter.
    fn open_envelope<T: DeviceMessage>(&self, device: &str, msg: &DeviceSigned<T>, floored: bool) -> Result<T, String> {
        let key = self.key(device).ok_or_else(|| format!("unknown or decommissioned device {device}"))?;
        let last = self.last_counter(device, T::KIND, floored);
        let value = msg.open(device, &key, last, &self.limits).map_err(|e| e.to_string())?;
        {
            let mut p = self.presence();
            let slot = (device.to_string(), T::KIND);
            if let Some(newer) = p.counters.get(&slot).copied().filter(|c| msg.counter() <= *c) {
                // Another worker accepted a newer one meanwhile.
                return Err(format!("{} counter {} is not above {newer}", T::KIND, msg.counter()));
            }
            p.counters.insert(slot, msg.counter());
        }
        self.accepted(device, msg.counter());
        Ok(value)
    }

    fn refresh_seen(&self, device: &str) {
        let now = outpost_runtime::bundle::unix_now() as i64;
        let due = {
            let mut p = self.presence();
            let last = p.seen_written.get(device).copied().unwrap_or(0);
            if now - last >= SEEN_EVERY_SECS {
                p.seen_written.insert(device.to_string(), now);
                true
            } else {
                false
            }
        };
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
            Kind::State => {
                let (label, result) = self.state_topic(device, payload);
                (label, result.map(|()| None))
            }
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

    /// A message on a `state` topic: a signed state or a signed will (its
    /// metric label, and the verdict). Nothing unsigned is believed.
    fn state_topic(&self, device: &str, payload: &[u8]) -> (&'static str, Result<(), String>) {
        match parse_state_payload(payload, &self.limits) {
            Ok(StatePayload::Signed(m)) => ("state", self.state(device, &m)),
            Ok(StatePayload::Will(w)) => {
                // Its own counter kind, no floor (module docs).
                let result = self.open_envelope(device, &w, false).map(|_| {
                    self.mark_online(device, false);
                    log::info!("mqtt: {device} is offline (its signed will)");
                });
                ("will", result)
            }
            // An empty retained message: it says nothing about the device.
            Ok(StatePayload::Cleared) => ("state", Ok(())),
            Err(e) => ("state", Err(e.to_string())),
        }
    }

    fn state(&self, device: &str, msg: &DeviceSigned<DeviceState>) -> Result<(), String> {
        let key = self.key(device).ok_or_else(|| format!("unknown or decommissioned device {device}"))?;
        let record = self.registry.device(device).map_err(|e| e.to_string())?.ok_or("unknown device")?;
        if record.decommissioned_at.is_some() {
            return Err(format!("device {device} is decommissioned"));
        }
        // No status yet = no state ever accepted: any counter is fresh. The
        // floor covers what other kinds accepted before a restart.
        let stored = record.status.as_ref().map(|_| record.last_counter);
        let last = stored.max(self.last_counter(device, DeviceState::KIND, true));
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
        self.presence().counters.insert((device.to_string(), DeviceState::KIND), msg.counter());
        self.accepted(device, msg.counter());
        self.mark_online(device, true);
        self.catch_up(device, state.directive_sequence);
        Ok(())
    }

    /// Re-sends the device's recorded directive (retained) when its verified
    /// state says it is behind it: it refused a forged one put on its topic,
    /// or was away when it went out. At most once per [`RESEND_EVERY`].
    fn catch_up(&self, device: &str, reported: u64) {
        let record = match self.registry.directive(device) {
            Ok(Some(d)) if d.sequence > reported => d,
            Ok(_) => return,
            Err(e) => {
                log::warn!("registry: the directive of {device}: {e}");
                return;
            }
        };
        let now = Instant::now();
        if self.presence().resent.get(device).is_some_and(|t| now.saturating_duration_since(*t) < RESEND_EVERY) {
            return;
        }
        let Some(client) = self.mqtt.get() else { return };
        // Never blocks a worker: a full request queue leaves it for the
        // device's next state.
        match client.try_publish(topics::desired(device), QoS::AtLeastOnce, true, record.signed) {
            Ok(()) => {
                self.presence().resent.insert(device.to_string(), now);
                self.metrics.directives_resent.inc();
                log::info!(
                    "mqtt: {device} reports directive {reported}, behind {}: sent it again",
                    record.sequence
                );
            }
            Err(e) => log::warn!("mqtt: re-sending the directive of {device}: {e}"),
        }
    }
}

/// A device's stored public key, if it is one (a decommissioned device's is empty).
fn key_of(bytes: &[u8]) -> Option<PublicKey> {
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    PublicKey::from_bytes(&bytes).ok()
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

/// Connects to the broker and starts the event loop, the workers, the
/// chunk sender and the counter flusher, each watched by `supervisor` and
/// each catching a panic per message (module docs of [`crate::supervisor`]).
/// `on_connect` runs on its own thread after every (re)connection (the
/// fleet republishes retained directives there).
pub fn start(
    opts: LinkOptions,
    inbox: Arc<Inbox>,
    on_connect: Arc<dyn Fn(&Client) + Send + Sync>,
    supervisor: Arc<Supervisor>,
) -> FleetLink {
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
    let _ = inbox.mqtt.set(client.clone());
    let connected = Arc::new(AtomicBool::new(false));

    // Chunk replies: workers -> bounded queue -> one sender (module docs).
    let unwritten = Arc::new(Unwritten::default());
    let (chunk_tx, chunk_rx) = sync_channel::<(String, Vec<u8>)>(CHUNK_REPLIES_QUEUED);
    {
        let client = client.clone();
        let unwritten = unwritten.clone();
        let sup = supervisor.clone();
        let spawned = supervisor.spawn("mqtt-chunks", move || {
            while let Ok((topic, bytes)) = chunk_rx.recv() {
                sup.guard("the chunk sender", || {
                    unwritten.wait_for_room();
                    if let Err(e) = client.publish(topic.clone(), QoS::AtMostOnce, false, bytes) {
                        unwritten.written();
                        log::warn!("mqtt: sending a chunk on {topic}: {e}");
                    }
                });
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
        let sup = supervisor.clone();
        let spawned = supervisor.spawn(&format!("mqtt-worker-{i}"), move || loop {
            let Ok(Inbound { topic, payload, chunk_request, arrived }) = rx.recv() else { return };
            if chunk_request && arrived.elapsed() > STALE_CHUNK_REQUEST {
                inbox.metrics.chunk_refused("stale");
                continue;
            }
            // A panic on one message (a bug a crafted message reaches) costs
            // that message, not the worker.
            let Some(reply) = sup.guard("an MQTT worker", || inbox.handle(&topic, &payload)) else {
                inbox.metrics.mqtt_result("other", "panic");
                continue;
            };
            // Only chunk requests are answered.
            if let Some(reply) = reply {
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

    // Counter high-water marks to the registry in batches (module docs).
    {
        let inbox = inbox.clone();
        let sup = supervisor.clone();
        let spawned = supervisor.spawn("mqtt-counters", move || loop {
            std::thread::sleep(FLUSH_EVERY);
            sup.guard("the counter flusher", || inbox.flush_counters());
        });
        if let Err(e) = spawned {
            log::error!("mqtt: starting the counter flusher: {e}");
        }
    }

    let flag = connected.clone();
    let loop_client = client.clone();
    let metrics = inbox.metrics.clone();
    let sup = supervisor.clone();
    let rates = opts.rates;
    let spawned = supervisor.spawn("mqtt-link", move || {
        let filters: Vec<String> =
            [Kind::State, Kind::Telemetry, Kind::Sketch, Kind::ChunkRequest].into_iter().map(topics::all).collect();
        let mut limiter = Limiter::new(rates);
        for event in connection.iter() {
            // A panic on one event costs that event; the loop goes on.
            sup.guard("the MQTT event loop", || match event {
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
                    let _ = std::thread::Builder::new().name("mqtt-on-connect".into()).spawn(move || {
                        crate::supervisor::guarded("the on-connect hook", || hook(&c));
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let parsed = topics::parse(&p.topic);
                    // Per-device limits before anything is queued (module
                    // docs); a will shares its device's state bucket.
                    if let Some((device, kind)) = parsed {
                        if !limiter.admit(device, kind, Instant::now(), |d| inbox.knows(d)) {
                            metrics.mqtt_result(kind_label(kind), "rate_limited");
                            return;
                        }
                    }
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
                            Ok(()) => return,
                            Err(TrySendError::Full(back)) if started.elapsed() < patience => {
                                item = back;
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Err(TrySendError::Full(_)) => {
                                metrics.mqtt_result(parsed.map(|(_, k)| kind_label(k)).unwrap_or("other"), "dropped");
                                return;
                            }
                            // The worker is gone (its thread died: /ready says so).
                            Err(TrySendError::Disconnected(_)) => {
                                metrics.mqtt_result(parsed.map(|(_, k)| kind_label(k)).unwrap_or("other"), "dropped");
                                return;
                            }
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
            });
        }
    });
    if let Err(e) = spawned {
        log::error!("mqtt: starting the event loop: {e}");
    }
    FleetLink { client, connected }
}

/// The metric label of a topic kind.
fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::State => "state",
        Kind::Telemetry => "telemetry",
        Kind::Sketch => "sketch",
        Kind::ChunkRequest => "chunk_request",
        Kind::Desired | Kind::ChunkData => "other",
    }
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
