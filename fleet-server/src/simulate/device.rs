//! One simulated device: the agent's update state machine without the
//! model server.
//!
//! Each transition mirrors `outpost_agent::agent` (read that module for the
//! why of each step); what differs is only what a simulator cannot or need
//! not do:
//!
//! - **No inference.** Activation does not load the model or run its
//!   self-test, and probation is the directive's (or the configured)
//!   duration with nothing to judge, so every verified version commits.
//! - **No A/B slot files.** The download is the agent's [`Download`]: the
//!   bundle is written to a `.part` file, streamed through the bundle
//!   verifier (signature chain, manifest the directive named, model digest)
//!   and the whole-file sha256; once it verifies, the file is deleted and
//!   only its identity is kept in a two-slot record, so 10,000 devices do not
//!   need 10,000 copies of the model on disk. A directive naming the bundle
//!   the other slot holds is a swap back without a download, as on a device.
//! - **Counters in memory.** The agent persists its message counter; a
//!   simulated device starts from the current time in microseconds, which
//!   is above anything an earlier run of the simulator used.
//!
//! Everything on the wire is real: the agent's MQTT options (client id,
//! last will, packet limit), its subscriptions, directive verification
//! ([`verify_directive`]), signed chunk requests, signed state, telemetry
//! and sketch messages ([`DeviceSigned`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_agent::download::{Download, DownloadError, Progress};
use outpost_agent::link::LinkEvent;
use outpost_agent::telemetry::OfflineBuffer;
use outpost_agent::AgentConfig;
use outpost_runtime::bundle::{Digest, Freshness, VerifyError, VerifyOptions};
use outpost_runtime::protocol::{
    topics, verify_directive, ChunkReply, DeviceMessage, DeviceSigned, DeviceState, Directive, LatencySketch, Limits,
    ModelRef, SketchMessage, Status, Telemetry, SKETCH_FORMAT, TELEMETRY_FORMAT,
};
use rumqttc::{AsyncClient, QoS};

use super::stats::Stats;

/// Wait before asking again for a bundle the fleet could not serve (the agent's value).
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(5);
/// Digest mismatches retried from scratch (the agent's value).
const MAX_DOWNLOAD_ATTEMPTS: u32 = 3;

/// What a slot holds: the identity of a verified bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotRecord {
    model: String,
    version: String,
    bundle_sha256: Digest,
}

impl SlotRecord {
    fn of(d: &Directive) -> SlotRecord {
        SlotRecord { model: d.model.clone(), version: d.version.clone(), bundle_sha256: d.bundle_sha256 }
    }

    fn model_ref(&self) -> ModelRef {
        ModelRef { name: self.model.clone(), version: self.version.clone() }
    }
}

/// One simulated device, driven by a worker's loop ([`super::worker`]).
pub struct SimDevice {
    config: AgentConfig,
    client: AsyncClient,
    stats: Arc<Stats>,
    limits: Limits,
    connected: bool,
    ever_connected: bool,
    status: Status,
    counter: u64,
    /// Where the next session's signed will goes (see `outpost_agent::link`).
    next_will: Arc<outpost_agent::link::NextWill>,
    last_sequence: Option<u64>,
    min_certificate_serial: u64,
    accepted_envelope: Option<Digest>,
    target: Option<Directive>,
    /// The serving slot and the other one (what a rollback goes back to).
    active: Option<SlotRecord>,
    other: Option<SlotRecord>,
    committed: bool,
    probation_until: Option<Instant>,
    last_error: Option<String>,
    rollback_reason: Option<String>,
    rolled_back_from: Option<ModelRef>,
    download: Option<Download>,
    download_retry_at: Option<Instant>,
    download_attempts: u32,
    /// Bytes of the download already counted in the stats.
    counted_bytes: u64,
    /// The NAME@VERSION this device counts as committed in the stats.
    counted_commit: Option<String>,
    next_telemetry: Instant,
    window_start_ms: u64,
    offline: OfflineBuffer<(String, Vec<u8>)>,
    state_dirty: bool,
    started: Instant,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl SimDevice {
    /// `first_telemetry` spreads the devices' telemetry over the interval,
    /// as devices booted at different times would.
    pub fn new(
        config: AgentConfig,
        client: AsyncClient,
        stats: Arc<Stats>,
        first_telemetry: Duration,
        next_will: Arc<outpost_agent::link::NextWill>,
    ) -> SimDevice {
        let counter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        stats.enter(Status::Idle);
        SimDevice {
            offline: OfflineBuffer::new(config.offline_buffer),
            config,
            client,
            stats,
            limits: Limits::default(),
            connected: false,
            ever_connected: false,
            status: Status::Idle,
            counter,
            next_will,
            last_sequence: None,
            min_certificate_serial: 0,
            accepted_envelope: None,
            target: None,
            active: None,
            other: None,
            committed: false,
            probation_until: None,
            last_error: None,
            rollback_reason: None,
            rolled_back_from: None,
            download: None,
            download_retry_at: None,
            download_attempts: 0,
            counted_bytes: 0,
            counted_commit: None,
            next_telemetry: Instant::now() + first_telemetry,
            window_start_ms: now_ms(),
            state_dirty: true,
            started: Instant::now(),
        }
    }

    pub fn id(&self) -> &str {
        &self.config.device_id
    }

    fn part_path(&self) -> PathBuf {
        self.config.state_dir.join("inactive.part")
    }

    // ----- events (outpost_agent::agent::Agent::on_link) -----

    pub fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                self.connected = true;
                self.stats.connected(true);
                if !self.ever_connected {
                    self.ever_connected = true;
                    self.stats.event(self.id(), "connected", "");
                }
                let id = self.config.device_id.clone();
                for topic in [topics::desired(&id), topics::chunk_data(&id)] {
                    if let Err(e) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
                        log::warn!("{id}: subscribing: {e}");
                    }
                }
                self.state_dirty = true;
                let queued: Vec<_> = self.offline.drain().collect();
                for (topic, payload) in queued {
                    if self.publish(topic.clone(), false, payload.clone()).is_err() {
                        self.offline.push((topic, payload));
                        break;
                    }
                }
                if let Some(d) = &mut self.download {
                    d.reset_in_flight();
                }
            }
            LinkEvent::Disconnected(_) => {
                if self.connected {
                    self.stats.connected(false);
                }
                self.connected = false;
                if let Some(d) = &mut self.download {
                    d.reset_in_flight();
                }
                // The session's will may be spent: sign the next one.
                self.counter += 1;
                match outpost_agent::link::last_will(&self.config.device_id, self.counter, &self.config.device_key) {
                    Ok(will) => self.next_will.offer(will),
                    Err(e) => log::error!("{}: signing the last will: {e}", self.config.device_id),
                }
            }
            LinkEvent::Message { topic, payload } => match topics::parse(&topic) {
                Some((id, topics::Kind::Desired)) if id == self.config.device_id => self.on_desired(&payload),
                Some((id, topics::Kind::ChunkData)) if id == self.config.device_id => self.on_chunk(&payload),
                _ => log::debug!("{}: ignoring a message on {topic}", self.config.device_id),
            },
        }
    }

    fn on_desired(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let envelope = Digest::of(bytes);
        if self.accepted_envelope == Some(envelope) {
            return;
        }
        let verified = match verify_directive(
            bytes,
            &self.config.trust_root,
            &self.config.device_id,
            self.last_sequence,
            self.min_certificate_serial,
            &self.limits,
        ) {
            Ok(v) => v,
            Err(e) => {
                self.stats.directive(false);
                self.fail(format!("directive refused: {e}"));
                return;
            }
        };
        self.stats.directive(true);
        let directive = verified.value;
        self.stats.event(self.id(), "directive", &format!("{}@{} seq {}", directive.model, directive.version, directive.sequence));
        self.last_sequence = Some(directive.sequence);
        self.min_certificate_serial = self.min_certificate_serial.max(verified.certificate.serial);
        self.accepted_envelope = Some(envelope);
        self.target = Some(directive.clone());
        self.last_error = None;
        if let Some(d) = self.download.take() {
            if d.bundle() == &directive.bundle_sha256 {
                self.download = Some(d);
            }
        }
        if self.probation_until.is_some() && self.active.as_ref().is_none_or(|a| a.bundle_sha256 != directive.bundle_sha256) {
            self.roll_back(format!("probation ended early by directive {}", directive.sequence));
        }
        self.download_attempts = 0;
        self.pursue(directive);
    }

    /// Nothing to do, a swap to the other slot, or a download.
    fn pursue(&mut self, directive: Directive) {
        if self.active.as_ref().is_some_and(|a| a.bundle_sha256 == directive.bundle_sha256) {
            self.target = None;
            if self.probation_until.is_none() {
                self.set_status(Status::Serving);
            }
            return;
        }
        if self.other.as_ref().is_some_and(|o| o.bundle_sha256 == directive.bundle_sha256) {
            self.activate(&directive);
            return;
        }
        if self.download.as_ref().is_some_and(|d| d.bundle() == &directive.bundle_sha256) {
            return;
        }
        let options = VerifyOptions::new(Freshness::NamedBy(directive.manifest_sha256));
        match Download::start(
            &directive,
            &self.part_path(),
            &self.config.trust_root,
            options,
            self.config.chunk_size,
            self.config.chunks_in_flight,
            self.config.chunk_timeout,
        ) {
            Ok(d) => {
                self.counted_bytes = d.progress().0;
                self.download = Some(d);
                self.download_retry_at = None;
                self.set_status(Status::Downloading);
            }
            Err(e) => self.fail(format!("cannot start the download: {e}")),
        }
    }

    fn on_chunk(&mut self, bytes: &[u8]) {
        let Some(download) = self.download.as_mut() else { return };
        let reply = match ChunkReply::from_bytes(bytes, &self.limits) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("{}: ignoring a chunk reply: {e}", self.config.device_id);
                return;
            }
        };
        let result = download.on_reply(reply);
        let written = download.progress().0;
        self.stats.chunk_bytes(written.saturating_sub(self.counted_bytes));
        self.counted_bytes = self.counted_bytes.max(written);
        match result {
            Ok(Progress::Ignored) | Ok(Progress::Advanced) => {}
            Ok(Progress::Complete) => self.download_complete(),
            Err(DownloadError::Unavailable(reason)) => {
                if let Some(d) = self.download.as_mut() {
                    d.reset_in_flight();
                }
                self.download_retry_at = Some(Instant::now() + RETRY_UNAVAILABLE);
                self.last_error = Some(truncate(format!("download paused: the fleet cannot serve the bundle: {reason}")));
                self.state_dirty = true;
            }
            Err(e) => {
                if let Some(d) = self.download.take() {
                    d.discard();
                }
                self.refuse_target(e.to_string());
            }
        }
    }

    fn download_complete(&mut self) {
        let Some(download) = self.download.take() else { return };
        self.set_status(Status::Verifying);
        let directive = download.directive().clone();
        match download.finish() {
            Ok(_header) => {
                // Verified: the agent would rename it into the inactive slot;
                // the simulator keeps only its identity (module docs).
                let _ = std::fs::remove_file(self.part_path());
                self.other = Some(SlotRecord::of(&directive));
                self.activate(&directive);
            }
            Err(DownloadError::Mismatch(_)) | Err(DownloadError::Refused(VerifyError::DigestMismatch { .. }))
                if self.download_attempts + 1 < MAX_DOWNLOAD_ATTEMPTS =>
            {
                self.download_attempts += 1;
                let _ = std::fs::remove_file(self.part_path());
                self.pursue(directive);
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.part_path());
                self.refuse_target(e.to_string());
            }
        }
    }

    /// The other slot becomes active; the trial starts. (No model load and
    /// no self-test: inference is what the simulator leaves out.)
    fn activate(&mut self, directive: &Directive) {
        self.set_status(Status::Activating);
        self.publish_state();
        std::mem::swap(&mut self.active, &mut self.other);
        self.committed = false;
        self.target = None;
        let params = directive.probation.unwrap_or(self.config.probation);
        self.probation_until = Some(Instant::now() + Duration::from_secs(u64::from(params.duration_secs)));
        self.set_status(Status::Probation);
        self.publish_state();
    }

    // ----- time (outpost_agent::agent::Agent::tick) -----

    pub fn tick(&mut self, now: Instant) {
        if self.probation_until.is_some_and(|t| now >= t) {
            self.probation_until = None;
            self.committed = true;
            self.set_status(Status::Serving);
            if let Some(a) = &self.active {
                let v = format!("{}@{}", a.model, a.version);
                self.stats.event(self.id(), "committed", &v);
            }
        }
        if self.connected && self.download_retry_at.is_none_or(|t| now >= t) {
            if let Some(d) = self.download.as_mut() {
                self.download_retry_at = None;
                let requests = d.requests();
                for r in requests {
                    self.counter += 1;
                    match DeviceSigned::sign(&self.config.device_id, self.counter, &r, &self.config.device_key) {
                        Ok(msg) => {
                            let topic = topics::chunk_request(&self.config.device_id);
                            if self.publish(topic, false, msg.to_bytes()).is_err() {
                                if let Some(d) = self.download.as_mut() {
                                    d.reset_in_flight();
                                }
                                break;
                            }
                            self.stats.chunk_request();
                        }
                        Err(e) => log::error!("signing a chunk request: {e}"),
                    }
                }
            }
        }
        if now >= self.next_telemetry {
            self.next_telemetry = now + self.config.telemetry_interval;
            self.send_telemetry();
            if self.download.is_some() {
                self.state_dirty = true;
            }
        }
        if self.state_dirty && self.connected {
            self.publish_state();
        }
    }

    fn send_telemetry(&mut self) {
        let end = now_ms();
        let model = self.active.as_ref().map(SlotRecord::model_ref);
        let telemetry = Telemetry {
            format: TELEMETRY_FORMAT,
            model: model.clone(),
            status: self.status,
            committed: self.committed,
            window_start_unix_ms: self.window_start_ms,
            window_end_unix_ms: end,
            requests: 0,
            input_errors: 0,
            failures: 0,
            rows: 0,
            error_rate: 0.0,
            latency_p50_ms: None,
            latency_p99_ms: None,
            drift: None,
            memory_rss_bytes: None,
            dropped_while_offline: self.offline.dropped(),
            uptime_secs: self.started.elapsed().as_secs(),
        };
        self.publish_device(topics::telemetry(&self.config.device_id), &telemetry);
        self.stats.telemetry();
        if let Some(model) = model {
            let sketch = SketchMessage {
                format: SKETCH_FORMAT,
                model,
                window_start_unix_ms: self.window_start_ms,
                window_end_unix_ms: end,
                drift: None,
                latency: LatencySketch::default(),
            };
            self.publish_device(topics::sketch(&self.config.device_id), &sketch);
            self.stats.sketch();
        }
        self.window_start_ms = end;
    }

    fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), rumqttc::ClientError> {
        self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload)
    }

    /// Signs and publishes (or buffers while offline), as the agent does.
    fn publish_device<T: DeviceMessage>(&mut self, topic: String, value: &T) {
        self.counter += 1;
        let bytes = match DeviceSigned::sign(&self.config.device_id, self.counter, value, &self.config.device_key) {
            Ok(m) => m.to_bytes(),
            Err(e) => {
                log::error!("signing {}: {e}", T::KIND);
                return;
            }
        };
        if !self.connected || self.publish(topic.clone(), false, bytes.clone()).is_err() {
            self.offline.push((topic, bytes));
        }
    }

    // ----- outcomes -----

    fn roll_back(&mut self, reason: String) {
        self.probation_until = None;
        let from = self.active.as_ref().map(SlotRecord::model_ref);
        if self.other.is_none() {
            self.fail(format!("{reason} (no previous version to roll back to)"));
            return;
        }
        std::mem::swap(&mut self.active, &mut self.other);
        self.committed = true;
        self.rollback_reason = Some(truncate(reason));
        self.rolled_back_from = from;
        self.stats.event(self.id(), "rolled_back", self.rollback_reason.as_deref().unwrap_or_default());
        self.set_status(Status::RolledBack);
        self.publish_state();
    }

    fn refuse_target(&mut self, reason: String) {
        self.target = None;
        self.fail(reason);
    }

    fn fail(&mut self, reason: String) {
        log::warn!("{}: {reason}", self.config.device_id);
        self.stats.event(self.id(), "failed", &reason);
        self.last_error = Some(truncate(reason));
        if self.probation_until.is_none() && self.download.is_none() {
            self.set_status(Status::Failed);
        }
        self.state_dirty = true;
    }

    fn set_status(&mut self, status: Status) {
        if self.status != status {
            self.stats.leave(self.status);
            self.stats.enter(status);
        }
        self.status = status;
        self.state_dirty = true;
        let committed = self.active.as_ref().filter(|_| self.committed).map(|a| format!("{}@{}", a.model, a.version));
        if committed != self.counted_commit {
            self.stats.commit(self.counted_commit.as_deref(), committed.as_deref());
            self.counted_commit = committed;
        }
    }

    /// The same fields `outpost_agent::agent` reports.
    fn state_message(&self) -> DeviceState {
        let mut m = DeviceState::new(self.status);
        if let Some(a) = &self.active {
            m.model = Some(a.model.clone());
            m.version = Some(a.version.clone());
            m.bundle_sha256 = Some(a.bundle_sha256.to_hex());
        }
        m.committed = self.committed && self.active.is_some();
        m.directive_sequence = self.last_sequence.unwrap_or(0);
        m.target = self.target.as_ref().map(|t| ModelRef { name: t.model.clone(), version: t.version.clone() });
        m.rollout_id = self.target.as_ref().and_then(|t| t.rollout_id.clone());
        m.progress = self.download.as_ref().map(Download::progress);
        m.last_error = self.last_error.clone();
        m.rollback_reason = self.rollback_reason.clone();
        m.rolled_back_from = self.rolled_back_from.clone();
        m.tags = self.config.tags.clone();
        m.agent_version = concat!(env!("CARGO_PKG_VERSION"), " (outpost-fleet simulate)").to_string();
        m
    }

    fn publish_state(&mut self) {
        if !self.connected {
            self.state_dirty = true;
            return;
        }
        let state = self.state_message();
        self.counter += 1;
        match DeviceSigned::sign(&self.config.device_id, self.counter, &state, &self.config.device_key) {
            Ok(msg) => match self.publish(topics::state(&self.config.device_id), true, msg.to_bytes()) {
                Ok(()) => {
                    self.state_dirty = false;
                    self.stats.state();
                }
                Err(e) => log::debug!("{}: state not sent: {e}", self.config.device_id),
            },
            Err(e) => log::error!("signing the state: {e}"),
        }
    }

    /// Says goodbye cleanly at the end of a run.
    pub fn disconnect(&self) {
        let _ = self.client.try_disconnect();
    }
}

/// Free text in protocol messages is bounded, as the agent bounds it.
fn truncate(reason: String) -> String {
    outpost_agent::agent::fit_text(reason, &Limits::default())
}
