//! The agent's state machine: one main loop owns everything and reacts to
//! MQTT events and to time.
//!
//! ```text
//!            directive (verified, fresh)
//!  serving ───────────────────────────▶ downloading ──▶ verifying ──▶ activating ──▶ probation ──▶ serving (committed)
//!     ▲  ▲                                   │ refused       │ refused      │ self-test        │ failed
//!     │  └──────── failed (reason) ◀─────────┴───────────────┴──────────────┘                  ▼
//!     └──────────────────────────────────────────────────────────────────────────────────── rolled_back
//! ```
//!
//! Whatever happens to an update, the model that served keeps serving until
//! a better one has passed every check; the retained `state` message says
//! where the device is and why.
//!
//! **Directives.** The retained `desired` message arrives on every connect.
//! The same bytes as last accepted are no news; anything else must verify
//! ([`verify_directive`]: signature chain to the pinned root, this device,
//! sequence above the last accepted). The sequence is persisted before the
//! device acts, so after a restart the agent resumes the accepted directive
//! from the state file, not from the network. A directive whose bundle one
//! of the slots already holds needs no download (a remote rollback to the
//! previous version is a swap back). A directive that arrives during a
//! trial ends the trial by rolling back first, so the slot being written is
//! never the one to fall back to.
//!
//! **Downloads that do not verify.** Chunk replies are unsigned, so bytes
//! that fail the checks end an attempt, not the update: the partial file is
//! dropped and the bundle fetched again with backoff; `failed` is reported
//! only after several fresh attempts failed ([`crate::retry`]). A device
//! that gave up (or was stopped) with the accepted directive's bundle in
//! neither slot tries it again after a restart, when the retained directive
//! arrives again — instead of sitting without the version.
//!
//! **Last will.** Before every connection the agent reserves a fresh
//! counter and signs the will the broker will publish for that session
//! (see [`crate::link`]).
//!
//! **A disk that refuses writes at boot** (full, read-only) does not stop
//! the agent: it serves its verified model, and tries to save its state
//! again with backoff, logging each distinct error once (see
//! [`crate::slots`]).

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_runtime::bundle::{Digest, VerifyOptions};
use outpost_runtime::protocol::{
    topics, verify_directive, ChunkReply, DeviceMessage, DeviceSigned, DeviceState, Directive, Limits, ModelRef,
    Status,
};
use outpost_runtime::server::{BuildInfo, Deployed, ModelSlot, RunningServer, Server, ServerConfig};
use outpost_runtime::stream::StreamCore;

use crate::activation::{load_slot, switch_traffic};
use crate::config::AgentConfig;
use crate::download::{Download, DownloadError, Progress};
use crate::fetch::{Fetch, FetchEvent};
use crate::link::{Link, LinkEvent};
use crate::notify::Notifier;
use crate::probation::{Trial, Verdict};
use crate::retry::{Attempts, Next};
use crate::slots::{SlotError, SlotName, SlotRecord, Slots};
use crate::telemetry::{OfflineBuffer, Window};

/// How often the main loop wakes up without events (watchdog, timeouts).
const TICK: Duration = Duration::from_millis(200);
/// First and longest wait between tries to save a state the disk refused.
const SAVE_RETRY_MIN: Duration = Duration::from_millis(500);
const SAVE_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the main loop receives.
#[derive(Debug)]
pub enum Input {
    Link(LinkEvent),
    /// Bytes (or a failure) from an HTTP(S) bundle fetch.
    Fetch(crate::fetch::FetchEvent),
    /// Stop (SIGTERM handler, tests).
    Stop,
}

/// Errors that stop the agent at start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state directory: {0}")]
    Slots(#[from] crate::slots::SlotError),
    #[error("HTTP server: {0}")]
    Server(#[from] outpost_runtime::server::ServerError),
    #[error("MQTT: {0}")]
    Link(#[from] crate::link::LinkError),
    #[error("streaming mode: {0}")]
    Stream(#[from] outpost_runtime::stream::StreamError),
}

/// A running agent.
pub struct Agent {
    config: AgentConfig,
    slots: Slots,
    model: Arc<ModelSlot>,
    server: RunningServer,
    /// The streaming mode (`stream_inputs`), when on.
    stream: Option<StreamCore>,
    link: Link,
    inputs: Receiver<Input>,
    connected: bool,
    status: Status,
    download: Option<Download>,
    /// The HTTP(S) fetch feeding `download`, when its directive gives a URL.
    fetch: Option<(Digest, Fetch)>,
    /// To hand to fetch threads.
    events: Sender<Input>,
    download_retry_at: Option<Instant>,
    /// Faults of the current directive's download (see `retry`).
    attempts: Attempts,
    /// The sealed directive this run gave up on: its retained copy is no
    /// news until the next start.
    gave_up: Option<Digest>,
    /// Why the last directive was refused, if it was: reported as
    /// `last_error`, never saved, never a status (see `on_desired`).
    refused_directive: Option<String>,
    /// When to try again to save a state the disk refused, and the wait after.
    save_retry: (Instant, Duration),
    /// The last disk error logged (each distinct one is logged once).
    disk_error: Option<String>,
    trial: Option<Trial>,
    window: Window,
    next_telemetry: Instant,
    offline: OfflineBuffer<(String, Vec<u8>)>,
    state_dirty: bool,
    notifier: Option<Notifier>,
    started: Instant,
    limits: Limits,
}

impl Agent {
    /// Opens the state, starts serving the active slot, starts the MQTT
    /// link. Returns the agent and the sender to stop it with.
    pub fn start(config: AgentConfig) -> Result<(Agent, Sender<Input>), StartError> {
        crate::test_hooks::init(config.state_dir.clone());
        let mut slots = Slots::open(&config.state_dir)?;
        let boots = slots.count_boot()?;
        let model = Arc::new(ModelSlot::empty());
        let mut status = Status::Idle;
        let mut trial = None;

        // A trial the device keeps crashing in is over.
        if let Some(p) = slots.state().probation.filter(|_| slots.state().in_probation()) {
            if boots >= p.max_boots {
                let reason = format!("restarted {boots} times during probation (crash loop)");
                log::warn!("{reason}: rolling back");
                slots.roll_back(&reason)?;
                status = Status::RolledBack;
            }
        }
        // Serve the active slot, re-verified; fall back if it does not verify.
        for _ in 0..2 {
            let Some(active) = slots.state().active else { break };
            let Some(record) = slots.state().record(active).cloned() else {
                slots.forget(active)?;
                continue;
            };
            match load_slot(&slots.slot_path(active), &config.trust_root, record.manifest_sha256) {
                Ok(ready) => {
                    log::info!("serving {} from slot {active:?}", ready.manifest.id());
                    if slots.state().in_probation() {
                        let params = slots.state().probation.unwrap_or(config.probation);
                        trial = Some(Trial::resumed(params, ready.manifest.self_test.clone()));
                        status = Status::Probation;
                    } else if status != Status::RolledBack {
                        status = Status::Serving;
                    }
                    model.swap(ready.deployed);
                    break;
                }
                Err(e) => {
                    let reason = format!("slot {active:?} ({}@{}) no longer verifies: {e}", record.model, record.version);
                    log::error!("{reason}");
                    if slots.state().in_probation() && slots.state().previous.is_some() {
                        slots.roll_back(&reason)?;
                        status = Status::RolledBack;
                    } else {
                        // The other slot (if it holds anything) is older but verified.
                        let other = active.other();
                        slots.forget(active)?;
                        if slots.state().record(other).is_some() {
                            slots.update(|s| {
                                s.active = Some(other);
                                s.committed = true;
                                s.last_error = Some(reason.clone());
                            })?;
                        }
                    }
                }
            }
        }
        if slots.state().last_error.is_some() && status == Status::Serving {
            status = Status::Failed;
        }
        // From here on, a change the disk refuses is undone, not kept.
        slots.booted();

        let server_config = ServerConfig { listen: config.listen.clone(), threads: config.threads, ..ServerConfig::default() };
        // The streaming mode predicts from the same slot as HTTP (a swap
        // reaches both at once) and shows its counters on the same /metrics.
        let (stream, stream_replies) = match &config.stream {
            Some(settings) => {
                let (core, replies) = StreamCore::start(model.clone(), settings.config.clone())?;
                (Some(core), Some(replies))
            }
            None => (None, None),
        };
        let extra_metrics: Vec<Box<dyn prometheus_client::collector::Collector>> = stream
            .iter()
            .map(|s| Box::new(s.stats().collector()) as Box<dyn prometheus_client::collector::Collector>)
            .collect();
        // `outpost_build_info{component="agent"}` and the process metrics
        // come with the server's /metrics.
        let build = BuildInfo::new("agent", env!("CARGO_PKG_VERSION"));
        let server = Server::start_as(build, server_config, model.clone(), extra_metrics)?;
        log::info!("predict API on http://{}", server.local_addr());
        let notifier = Notifier::from_env();
        if let Some(n) = &notifier {
            n.ready();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        // The first session's will, with a counter reserved for it. None
        // when the disk cannot reserve counters (then nothing is signed
        // until it can).
        let will = match slots.next_counter() {
            Ok(counter) => match crate::link::last_will(&config.device_id, counter, &config.device_key) {
                Ok(w) => Some(w),
                Err(e) => {
                    log::error!("signing the last will: {e}");
                    None
                }
            },
            Err(e) => {
                log::error!("no last will for this connection: {e}");
                None
            }
        };
        let link = Link::start(&config, will, tx.clone(), stream.as_ref().map(StreamCore::submitter))?;
        if let (Some(core), Some(replies)) = (&stream, stream_replies) {
            link.publish_stream_replies(replies, core.stats())?;
            if let Some(settings) = &config.stream {
                log::info!("streaming predictions for {}", settings.inputs.join(", "));
            }
        }
        let window = Window::new(model.current());
        let offline = OfflineBuffer::new(config.offline_buffer);
        let retry = config.download_retry;
        let mut agent = Agent {
            next_telemetry: Instant::now() + config.telemetry_interval,
            config,
            slots,
            model,
            server,
            stream,
            link,
            inputs: rx,
            connected: false,
            status,
            download: None,
            fetch: None,
            events: tx.clone(),
            download_retry_at: None,
            attempts: Attempts::new(retry),
            gave_up: None,
            refused_directive: None,
            save_retry: (Instant::now() + SAVE_RETRY_MIN, SAVE_RETRY_MIN),
            disk_error: None,
            trial,
            window,
            offline,
            state_dirty: true,
            notifier,
            started: Instant::now(),
            limits: Limits::default(),
        };
        // An accepted directive not yet carried out: resume it.
        if let Some(target) = agent.slots.state().target.clone() {
            if agent.trial.is_none() {
                agent.pursue(target);
            }
        }
        Ok((agent, tx))
    }

    /// The address the predict API listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// Runs until [`Input::Stop`].
    pub fn run(mut self) {
        loop {
            match self.inputs.recv_timeout(TICK) {
                Ok(Input::Stop) => break,
                Ok(Input::Link(event)) => self.on_link(event),
                Ok(Input::Fetch(event)) => self.on_fetch(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
        }
        if let Some(n) = &self.notifier {
            n.stopping();
        }
        if let Some(stream) = self.stream.take() {
            stream.shutdown();
        }
        // Connected: say "offline" (a signed will with its own counter) and
        // wait for the goodbye to go out. Not connected: the broker already
        // published the session's last will.
        let (goodbye, wait) = if self.connected {
            (self.sign_will(), Duration::from_secs(2))
        } else {
            (None, Duration::ZERO)
        };
        self.link.disconnect(goodbye, wait);
        log::info!("stopped");
    }

    // ----- events -----

    fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                self.connected = true;
                let stream_inputs = self.config.stream.as_ref().map(|s| s.inputs.as_slice()).unwrap_or(&[]);
                if let Err(e) = self.link.subscribe(&self.config.device_id, stream_inputs) {
                    log::warn!("subscribing: {e}");
                }
                self.state_dirty = true;
                let queued: Vec<_> = self.offline.drain().collect();
                for (topic, payload) in queued {
                    if self.link.publish(topic.clone(), false, payload.clone()).is_err() {
                        self.offline.push((topic, payload));
                        break;
                    }
                }
                if let Some(d) = &mut self.download {
                    d.reset_in_flight();
                }
            }
            LinkEvent::Disconnected(_) => {
                self.connected = false;
                if let Some(d) = &mut self.download {
                    d.reset_in_flight();
                }
                // The will just registered may have been published: the
                // next session needs one with a fresh counter.
                if let Some(will) = self.sign_will() {
                    self.link.offer_will(will);
                }
            }
            LinkEvent::Message { topic, payload } => match topics::parse(&topic) {
                Some((id, topics::Kind::Desired)) if id == self.config.device_id => self.on_desired(&payload),
                Some((id, topics::Kind::ChunkData)) if id == self.config.device_id => self.on_chunk(&payload),
                _ => log::debug!("ignoring a message on {topic}"),
            },
        }
    }

    fn on_desired(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let envelope = Digest::of(bytes);
        if self.slots.state().accepted_envelope == Some(envelope) {
            // The retained directive we already accepted: no news, unless
            // an earlier run gave up on (or never got) its bundle.
            self.resume_accepted(bytes, envelope);
            return;
        }
        let state = self.slots.state();
        let verified = match verify_directive(
            bytes,
            &self.config.trust_root,
            &self.config.device_id,
            state.last_sequence,
            state.min_certificate_serial,
            &self.limits,
        ) {
            Ok(v) => v,
            Err(e) => {
                // Noted, not failed: a refused directive changes nothing the
                // device does, so it must not change what it reports either.
                // Anyone who can write to this topic (a broker without the
                // ACL, a replay of an old directive) could otherwise make a
                // healthy canary report `failed` and halt a rollout. The
                // reason still reaches the operator as `last_error`, from
                // memory only: a refusal saved with the slots would count as
                // a failure at the next boot.
                let reason = self.fit_text(format!("directive refused: {e}"));
                log::warn!("{reason}");
                self.refused_directive = Some(reason);
                self.state_dirty = true;
                return;
            }
        };
        let directive = verified.value;
        let serial = verified.certificate.serial;
        self.refused_directive = None;
        log::info!("accepted directive {} for {}", directive.sequence, directive.id());
        // Persist acceptance before acting: a replay of anything older is
        // refused from now on, across restarts.
        if let Err(e) = self.slots.update(|s| {
            s.last_sequence = Some(directive.sequence);
            s.min_certificate_serial = s.min_certificate_serial.max(serial);
            s.accepted_envelope = Some(envelope);
            s.target = Some(directive.clone());
            s.last_error = None;
        }) {
            log::error!("cannot persist the directive: {e}");
            return;
        }
        if let Some(d) = self.download.take() {
            if d.bundle() != &directive.bundle_sha256 {
                log::info!("abandoning the download of {}", d.directive().id());
            } else if d.over_http() == directive.url.as_deref() {
                // Same bundle, same source, newer directive: keep going.
                self.download = Some(d);
            } else {
                // Same bundle from another source: the verified bytes stay
                // in the part file and are resumed from it (see `download`).
                log::info!("fetching {} from its new source", d.directive().id());
                self.fetch = None;
                self.download_retry_at = None;
            }
        }
        if self.trial.is_some() {
            let active_has_it = self.slots.state().active_record().is_some_and(|r| r.bundle_sha256 == directive.bundle_sha256);
            if !active_has_it {
                self.roll_back(format!("probation ended early by directive {}", directive.sequence));
            }
        }
        self.attempts = Attempts::new(self.config.download_retry);
        self.gave_up = None;
        self.pursue(directive);
    }

    /// The directive accepted before, arriving again (every connect): if
    /// nothing carries it out now, this run has not given up on it, and
    /// neither slot holds its bundle (it was not installed, refused at
    /// activation or rolled back from), fetch it again. This is how a
    /// device that gave up on a download — or restarted after — gets the
    /// version after all.
    fn resume_accepted(&mut self, bytes: &[u8], envelope: Digest) {
        let state = self.slots.state();
        if self.gave_up == Some(envelope) || state.target.is_some() || self.download.is_some() || self.trial.is_some() {
            return;
        }
        let Some(sequence) = state.last_sequence else { return };
        // Verified again (signature, certificate, expiry) as the directive
        // with the sequence already accepted.
        let verified = match verify_directive(
            bytes,
            &self.config.trust_root,
            &self.config.device_id,
            sequence.checked_sub(1),
            state.min_certificate_serial,
            &self.limits,
        ) {
            Ok(v) if v.value.sequence == sequence => v.value,
            Ok(_) => return,
            Err(e) => {
                log::info!("the accepted directive no longer verifies: {e}");
                return;
            }
        };
        let held = [SlotName::A, SlotName::B]
            .iter()
            .any(|s| state.record(*s).is_some_and(|r| r.bundle_sha256 == verified.bundle_sha256));
        if held {
            return;
        }
        log::info!("directive {} for {} was not carried out: fetching its bundle again", verified.sequence, verified.id());
        if let Err(e) = self.slots.update(|s| s.target = Some(verified.clone())) {
            self.report_disk_error(&e);
            return;
        }
        self.attempts = Attempts::new(self.config.download_retry);
        self.pursue(verified);
    }

    /// Works towards `directive`: nothing to do, a swap to the other slot,
    /// or a download.
    fn pursue(&mut self, directive: Directive) {
        let state = self.slots.state();
        if state.active_record().is_some_and(|r| r.bundle_sha256 == directive.bundle_sha256) {
            log::info!("{} already serves", directive.id());
            let _ = self.slots.update(|s| s.target = None);
            if self.trial.is_none() {
                self.set_status(Status::Serving);
            }
            return;
        }
        let slot = self.slots.inactive();
        let path = self.slots.slot_path(slot);
        let in_slot = match self.slots.state().record(slot) {
            Some(r) => r.bundle_sha256 == directive.bundle_sha256 && path.is_file(),
            // Renamed into place, but the crash came before its record was
            // written: the file itself says whether it is this bundle.
            None => path.is_file() && file_sha256(&path).is_some_and(|d| d == directive.bundle_sha256),
        };
        if in_slot {
            if self.slots.state().record(slot).is_none() {
                let record = record_for(&directive);
                if let Err(e) = self.slots.update(|s| match slot {
                    SlotName::A => s.slot_a = Some(record),
                    SlotName::B => s.slot_b = Some(record),
                }) {
                    log::error!("{e}");
                    return;
                }
            }
            self.activate(slot, &directive);
            return;
        }
        if self.download.as_ref().is_some_and(|d| d.bundle() == &directive.bundle_sha256) {
            return;
        }
        self.start_download(directive, None);
    }

    /// Starts (or resumes from the part file) downloading `directive`'s
    /// bundle into the inactive slot; with `delay`, no byte is asked for
    /// before it has passed.
    fn start_download(&mut self, directive: Directive, delay: Option<Duration>) {
        let slot = self.slots.inactive();
        // Named by the verified directive: the directive carried the
        // certificate checks (serial floor, expiry) for it.
        let options = VerifyOptions::new(outpost_runtime::bundle::Freshness::NamedBy(directive.manifest_sha256));
        match Download::start(
            &directive,
            &self.slots.part_path(slot),
            &self.config.trust_root,
            options,
            self.config.chunk_size,
            self.config.chunks_in_flight,
            self.config.chunk_timeout,
        ) {
            Ok(d) => {
                if let Some(url) = d.over_http() {
                    log::info!("fetching {} from {url}", directive.id());
                }
                self.download = Some(d);
                self.download_retry_at = delay.map(|d| Instant::now() + d);
                self.set_status(Status::Downloading);
                if delay.is_none() {
                    self.start_fetch();
                }
            }
            Err(e) => self.fail(format!("cannot start the download: {e}")),
        }
    }

    fn on_chunk(&mut self, bytes: &[u8]) {
        let Some(download) = self.download.as_mut() else { return };
        let reply = match ChunkReply::from_bytes(bytes, &self.limits) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("ignoring a chunk reply: {e}");
                return;
            }
        };
        let result = download.on_reply(reply);
        self.after_progress(result);
    }

    /// Starts fetching the current download's URL from its resume point,
    /// unless a fetch for it runs already (or it has no URL).
    fn start_fetch(&mut self) {
        let Some(d) = self.download.as_ref() else { return };
        let Some(url) = d.over_http() else { return };
        if self.fetch.as_ref().is_some_and(|(b, _)| b == d.bundle()) {
            return;
        }
        let (from, size) = d.progress();
        match Fetch::start(url, *d.bundle(), from, size, self.events.clone()) {
            Ok(f) => self.fetch = Some((*d.bundle(), f)),
            Err(e) => log::error!("cannot start the fetch thread: {e}"),
        }
    }

    fn on_fetch(&mut self, event: FetchEvent) {
        match event {
            FetchEvent::Bytes { bundle, offset, bytes } => {
                let Some(download) = self.download.as_mut().filter(|d| d.bundle() == &bundle) else { return };
                let result = download.on_bytes(offset, &bytes);
                let written = download.progress().0;
                if let Some((_, f)) = &self.fetch {
                    f.accepted(written);
                }
                self.after_progress(result);
            }
            FetchEvent::Failed { bundle, reason } => {
                if self.fetch.as_ref().is_some_and(|(b, _)| *b == bundle) {
                    self.fetch = None;
                    self.source_unavailable(format!("download paused: {reason}"));
                }
            }
        }
    }

    /// What a piece of a download (a chunk or fetched bytes) led to.
    fn after_progress(&mut self, result: Result<Progress, DownloadError>) {
        if self.download.is_none() {
            return;
        }
        match result {
            Ok(Progress::Ignored) => {}
            // Progress goes out with the state at the next telemetry tick.
            Ok(Progress::Advanced) => self.attempts.progressed(),
            Ok(Progress::Complete) => {
                self.attempts.progressed();
                self.download_complete();
            }
            Err(DownloadError::Unavailable(reason)) => {
                self.source_unavailable(format!("download paused: the fleet cannot serve the bundle: {reason}"))
            }
            Err(e @ DownloadError::Io { .. }) => {
                if let Some(d) = self.download.take() {
                    d.discard();
                }
                self.refuse_target(format!("{e}"));
            }
            Err(e) => self.attempt_failed(e.to_string()),
        }
    }

    /// The source says it cannot serve now (a chunk reply, a broken HTTP
    /// fetch): pause with backoff, believed a bounded number of times.
    fn source_unavailable(&mut self, reason: String) {
        match self.attempts.unavailable() {
            Next::RetryIn(wait) => {
                log::warn!("{reason}; asking again in {wait:?} from the last verified byte");
                if let Some(d) = self.download.as_mut() {
                    d.reset_in_flight();
                }
                self.download_retry_at = Some(Instant::now() + wait);
                self.slots_error(reason);
            }
            Next::GiveUp => self.give_up_download(format!("{reason} (too often)")),
        }
    }

    /// The download's bytes did not verify: drop them and fetch again from
    /// scratch after a backoff, or give up after the last attempt.
    fn attempt_failed(&mut self, reason: String) {
        let Some(download) = self.download.take() else { return };
        let directive = download.directive().clone();
        download.discard();
        self.retry_from_scratch(directive, reason);
    }

    /// An attempt at `directive`'s bundle failed and its bytes are gone:
    /// start again after a backoff, or give up after the last attempt.
    fn retry_from_scratch(&mut self, directive: Directive, reason: String) {
        self.fetch = None;
        match self.attempts.attempt_failed() {
            Next::RetryIn(wait) => {
                let reason = format!(
                    "download attempt {} of {} failed: {reason}; downloading again in {wait:?}",
                    self.attempts.failed(),
                    self.attempts.policy().attempts
                );
                log::warn!("{reason}");
                self.slots_error(reason);
                self.start_download(directive, Some(wait));
            }
            Next::GiveUp => self.give_up_download(reason),
        }
    }

    /// Every attempt failed: the directive is given up until the next start.
    fn give_up_download(&mut self, reason: String) {
        if let Some(d) = self.download.take() {
            d.discard();
        }
        self.fetch = None;
        self.download_retry_at = None;
        self.gave_up = self.slots.state().accepted_envelope;
        let attempts = self.attempts.failed().max(1);
        self.refuse_target(format!("{reason} (gave up after {attempts} attempt(s))"));
    }

    fn download_complete(&mut self) {
        let Some(download) = self.download.take() else { return };
        self.set_status(Status::Verifying);
        let directive = download.directive().clone();
        let took = download.elapsed();
        let resumed = download.resumed_from();
        match download.finish() {
            Ok(header) => {
                let bytes = directive.bundle_size - resumed;
                log::info!(
                    "downloaded {} ({} bytes in {:.2?}, {:.1} MiB/s)",
                    header.value.id(),
                    bytes,
                    took,
                    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64().max(1e-6)
                );
                let slot = self.slots.inactive();
                self.set_status(Status::Activating);
                if let Err(e) = self.slots.install(slot, record_for(&directive)) {
                    self.fail(format!("cannot write slot {slot:?}: {e}"));
                    return;
                }
                crate::test_hooks::pause_at("slot-written");
                self.activate(slot, &directive);
            }
            Err(e @ DownloadError::Io { .. }) => {
                let _ = std::fs::remove_file(self.slots.part_path(self.slots.inactive()));
                self.refuse_target(e.to_string());
            }
            // A forged chunk, or a part file damaged by a power cut: the
            // whole file hashes wrong. Drop it, fetch again (bounded).
            Err(e) => {
                let _ = std::fs::remove_file(self.slots.part_path(self.slots.inactive()));
                self.retry_from_scratch(directive, e.to_string());
            }
        }
    }

    /// Load, self-test, switch on disk, switch traffic, start the trial.
    fn activate(&mut self, slot: SlotName, directive: &Directive) {
        self.set_status(Status::Activating);
        self.publish_state();
        let ready = match load_slot(&self.slots.slot_path(slot), &self.config.trust_root, directive.manifest_sha256) {
            Ok(r) => r,
            Err(e) => {
                self.refuse_target(format!("activation of {} refused: {e}", directive.id()));
                return;
            }
        };
        let params = directive.probation.unwrap_or(self.config.probation);
        if let Err(e) = self.slots.activate(slot, params) {
            self.fail(format!("cannot switch slots: {e}"));
            return;
        }
        let self_test = ready.manifest.self_test.clone();
        let started = Instant::now();
        let previous = switch_traffic(&self.model, ready.deployed);
        log::info!("switched traffic to {} (slot {slot:?}) in {:?}", directive.id(), started.elapsed());
        if let Some(current) = self.model.current() {
            self.trial = Some(Trial::new(params, self_test, &current, previous.as_deref()));
        }
        self.set_status(Status::Probation);
        self.publish_state();
        crate::test_hooks::pause_at("probation");
    }

    // ----- time -----

    fn tick(&mut self) {
        if let Some(n) = &self.notifier {
            n.watchdog();
        }
        // A state the disk refused at boot: try again, with backoff.
        if self.slots.unsaved() && Instant::now() >= self.save_retry.0 {
            match self.slots.retry_save() {
                Ok(()) => {
                    log::info!("the state is saved again");
                    self.disk_error = None;
                    self.save_retry = (Instant::now(), SAVE_RETRY_MIN);
                    self.state_dirty = true;
                }
                Err(e) => {
                    self.report_disk_error(&e);
                    let wait = (self.save_retry.1 * 2).min(SAVE_RETRY_MAX);
                    self.save_retry = (Instant::now() + crate::link::jittered(wait), wait);
                }
            }
        }
        // Probation.
        if let (Some(trial), Some(current)) = (self.trial.as_mut(), self.model.current()) {
            match trial.check(&current) {
                Verdict::Continue => {}
                Verdict::Pass => {
                    self.trial = None;
                    match self.slots.commit() {
                        Ok(()) => {
                            log::info!("{} passed probation: committed", current.info().name);
                            self.set_status(Status::Serving);
                        }
                        Err(e) => log::error!("cannot commit: {e}"),
                    }
                }
                Verdict::Fail(reason) => self.roll_back(reason),
            }
        }
        // A fetch belongs to the download it was started for.
        if self.fetch.as_ref().is_some_and(|(b, _)| self.download.as_ref().is_none_or(|d| d.bundle() != b)) {
            self.fetch = None;
        }
        let retry_due = self.download_retry_at.is_none_or(|t| Instant::now() >= t);
        // Over HTTP(S): (re)start the fetch; no chunk requests.
        if self.download.as_ref().is_some_and(|d| d.over_http().is_some()) {
            if retry_due && self.fetch.is_none() {
                self.download_retry_at = None;
                self.start_fetch();
            }
        } else if self.connected && retry_due {
            if let Some(d) = self.download.as_mut() {
                self.download_retry_at = None;
                let requests = d.requests();
                for r in requests {
                    let Some(counter) = self.next_counter() else {
                        if let Some(d) = self.download.as_mut() {
                            d.reset_in_flight();
                        }
                        return;
                    };
                    match DeviceSigned::sign(&self.config.device_id, counter, &r, &self.config.device_key) {
                        Ok(msg) => {
                            if let Err(e) = self.link.publish(topics::chunk_request(&self.config.device_id), false, msg.to_bytes()) {
                                log::warn!("chunk request not sent: {e}");
                                if let Some(d) = self.download.as_mut() {
                                    d.reset_in_flight();
                                }
                                break;
                            }
                        }
                        Err(e) => log::error!("signing a chunk request: {e}"),
                    }
                }
            }
        }
        // Telemetry.
        if Instant::now() >= self.next_telemetry {
            self.next_telemetry = Instant::now() + self.config.telemetry_interval;
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
        let committed = self.slots.state().committed;
        let (telemetry, sketch) = self.window.close(
            self.model.current(),
            self.status,
            committed,
            self.offline.dropped(),
            self.started.elapsed().as_secs(),
        );
        self.publish_device(topics::telemetry(&self.config.device_id), &telemetry);
        if let Some(s) = sketch {
            self.publish_device(topics::sketch(&self.config.device_id), &s);
        }
    }

    /// Signs and publishes (or buffers while offline) a telemetry/sketch message.
    fn publish_device<T: DeviceMessage>(&mut self, topic: String, value: &T) {
        let Some(counter) = self.next_counter() else { return };
        let bytes = match DeviceSigned::sign(&self.config.device_id, counter, value, &self.config.device_key) {
            Ok(m) => m.to_bytes(),
            Err(e) => {
                log::error!("signing {}: {e}", T::KIND);
                return;
            }
        };
        if !self.connected || self.link.publish(topic.clone(), false, bytes.clone()).is_err() {
            self.offline.push((topic, bytes));
        }
    }

    // ----- outcomes -----

    fn roll_back(&mut self, reason: String) {
        log::warn!("rolling back: {reason}");
        self.trial = None;
        let from = self.slots.state().active_record().map(SlotRecord::model_ref);
        let had_previous = self.slots.state().previous.is_some();
        let to = match self.slots.roll_back(&reason) {
            Ok(to) => to,
            Err(e) => {
                log::error!("cannot roll back: {e}");
                return;
            }
        };
        if !had_previous {
            // Nothing to go back to: keep serving, say so.
            self.fail(format!("{reason} (no previous version to roll back to)"));
            return;
        }
        let Some(slot) = to else { return };
        let Some(record) = self.slots.state().record(slot).cloned() else { return };
        match load_slot(&self.slots.slot_path(slot), &self.config.trust_root, record.manifest_sha256) {
            Ok(ready) => {
                switch_traffic(&self.model, ready.deployed);
                log::info!("rolled back from {} to {}", from.map(|f| f.to_string()).unwrap_or_default(), record.model_ref());
                self.set_status(Status::RolledBack);
            }
            Err(e) => self.fail(format!("{reason}; and the previous slot does not load: {e}")),
        }
        self.publish_state();
    }

    /// The target directive cannot be carried out: keep serving, say why.
    fn refuse_target(&mut self, reason: String) {
        log::warn!("{reason}");
        let _ = self.slots.update(|s| s.target = None);
        self.fail(reason);
    }

    fn fail(&mut self, reason: String) {
        let reason = self.fit_text(reason);
        let _ = self.slots.update(|s| s.last_error = Some(reason));
        if self.trial.is_none() && self.download.is_none() {
            self.set_status(Status::Failed);
        }
        self.state_dirty = true;
    }

    /// A fresh message counter; `None` (logged once per distinct error)
    /// when the disk cannot reserve one.
    fn next_counter(&mut self) -> Option<u64> {
        match self.slots.next_counter() {
            Ok(c) => Some(c),
            Err(e) => {
                self.report_disk_error(&e);
                None
            }
        }
    }

    /// The signed will for the next session, or the goodbye, with a
    /// counter reserved for it.
    fn sign_will(&mut self) -> Option<rumqttc::LastWill> {
        let counter = self.next_counter()?;
        match crate::link::last_will(&self.config.device_id, counter, &self.config.device_key) {
            Ok(w) => Some(w),
            Err(e) => {
                log::error!("signing the last will: {e}");
                None
            }
        }
    }

    /// Logs a disk error once for as long as it stays the same.
    fn report_disk_error(&mut self, e: &SlotError) {
        let text = e.to_string();
        if self.disk_error.as_deref() != Some(text.as_str()) {
            log::error!("{text} (retrying later)");
            self.disk_error = Some(text);
        }
    }

    fn fit_text(&self, text: String) -> String {
        fit_text(text, &self.limits)
    }

    fn slots_error(&mut self, reason: String) {
        let reason = self.fit_text(reason);
        let _ = self.slots.update(|s| s.last_error = Some(reason));
        self.state_dirty = true;
    }

    fn set_status(&mut self, status: Status) {
        if self.status != status {
            log::info!("status: {}", status.as_str());
            if let Some(n) = &self.notifier {
                n.status(status.as_str());
            }
        }
        self.status = status;
        self.state_dirty = true;
    }

    fn state_message(&self) -> DeviceState {
        let s = self.slots.state();
        let mut m = DeviceState::new(self.status);
        let serving: Option<Arc<Deployed>> = self.model.current();
        if let Some(d) = &serving {
            m.model = Some(d.info().name.clone());
            m.version = Some(d.info().version.clone());
        }
        m.bundle_sha256 = s.active_record().map(|r| r.bundle_sha256.to_hex());
        m.committed = s.committed && serving.is_some();
        m.directive_sequence = s.last_sequence.unwrap_or(0);
        m.target = s.target.as_ref().map(|t| ModelRef { name: t.model.clone(), version: t.version.clone() });
        m.rollout_id = s.target.as_ref().and_then(|t| t.rollout_id.clone());
        m.progress = self.download.as_ref().map(Download::progress);
        m.last_error = s.last_error.clone().or_else(|| self.refused_directive.clone());
        m.rollback_reason = s.rollback_reason.clone();
        m.rolled_back_from = s.rolled_back_from.clone();
        m.tags = self.config.tags.clone();
        m.agent_version = env!("CARGO_PKG_VERSION").to_string();
        m
    }

    fn publish_state(&mut self) {
        if !self.connected {
            self.state_dirty = true;
            return;
        }
        let state = self.state_message();
        let Some(counter) = self.next_counter() else { return };
        match DeviceSigned::sign(&self.config.device_id, counter, &state, &self.config.device_key) {
            Ok(msg) => match self.link.publish(topics::state(&self.config.device_id), true, msg.to_bytes()) {
                Ok(()) => self.state_dirty = false,
                Err(e) => log::warn!("state not sent: {e}"),
            },
            Err(e) => log::error!("signing the state: {e}"),
        }
    }
}

fn record_for(d: &Directive) -> SlotRecord {
    SlotRecord {
        model: d.model.clone(),
        version: d.version.clone(),
        bundle_sha256: d.bundle_sha256,
        manifest_sha256: d.manifest_sha256,
        directive_sequence: d.sequence,
    }
}

fn file_sha256(path: &std::path::Path) -> Option<Digest> {
    use sha2::Digest as _;
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(Digest(h.finalize().into()))
}

/// Free text (an error, a rollback reason) cut to what a state message may
/// carry: [`Limits::text_bytes`] less room for the message's own quoting.
pub fn fit_text(text: String, limits: &Limits) -> String {
    cut_at_char_boundary(text, (limits.text_bytes as usize).saturating_sub(16))
}

/// `text` cut to at most `max` bytes on a character boundary: a reason may
/// quote a URL or a server's words in any script, and `String::truncate`
/// panics inside a character.
fn cut_at_char_boundary(mut text: String, max: usize) -> String {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

#[cfg(test)]
mod tests {
    use super::cut_at_char_boundary;

    #[test]
    fn reasons_are_cut_on_character_boundaries() {
        assert_eq!(cut_at_char_boundary("ab€cd".into(), 3), "ab");
        assert_eq!(cut_at_char_boundary("ab€cd".into(), 5), "ab€");
        assert_eq!(cut_at_char_boundary("short".into(), 100), "short");
        assert_eq!(cut_at_char_boundary("日本語".into(), 0), "");
    }
}
