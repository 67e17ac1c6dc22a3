//! Staged canary rollouts, their gates, automatic halt, and remote rollback.
//!
//! - [`machine`]: the state machine, pure (the one place transitions are
//!   decided; its module docs draw it);
//! - [`cohort`]: which devices each stage reaches (deterministic, spread
//!   over tags);
//! - [`gates`]: what a stage must pass;
//! - [`store`]: the records in SQLite;
//! - this module: the [`Rollouts`] service the API calls, and the driver
//!   thread that advances every live rollout every [`TICK`].
//!
//! # A tick of the driver
//!
//! For each running or paused rollout: finish any actions a crash left in
//! its outbox; gather what the fleet observes (each targeted device's last
//! signed state from the registry; the telemetry of the stage's devices for
//! the new version since the stage started, from [`Observations`]; the
//! canary analysis when asked for); run [`machine::step`]; if the record
//! changed, **persist it with the new actions as its outbox**, publish its
//! summary (retained) on `outpost/v1/fleet/rollouts/{id}`, then carry the
//! actions out — directives, rollbacks, alerts on `outpost/v1/fleet/alerts`
//! — and persist again with the outbox emptied and the directive sequences
//! recorded. Carrying out an outbox twice is harmless: a device whose
//! recorded directive already names what it should be sent is skipped.
//!
//! Operator commands (start, pause, resume, abort, rollback) take the same
//! lock as the driver, so a command and a tick never interleave.
//!
//! [`Observations`]: crate::observations::Observations

pub mod cohort;
pub mod gates;
pub mod machine;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::QoS;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::directives::{parse_target, DeployError, Deployed};
use crate::registry::{DeviceRecord, Registry, RegistryError};
use crate::server::Fleet;
use machine::{Action, Command, DeviceState, OnFailure, Policy, Report, Rollout, State};
use store::{Store, StoreError};

/// How often the driver looks at every live rollout.
pub const TICK: Duration = Duration::from_millis(500);
/// Alerts (not retained): `{"kind":"rollout_halted",…}`.
pub const ALERTS_TOPIC: &str = "outpost/v1/fleet/alerts";
/// The registry counter rollout ids come from.
const ROLLOUT_COUNTER: &str = "rollout";
/// Extra time a device gets over the bake time by default before it counts
/// as silent (download, self-test, probation).
pub const DEFAULT_DEADLINE_MARGIN_MS: u64 = 60_000;

/// Retained JSON summary of a rollout (same shape as `rollout status --json`).
pub fn summary_topic(id: &str) -> String {
    format!("outpost/v1/fleet/rollouts/{id}")
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown model version {0}; publish it first (`outpost-fleet publish`)")]
    UnknownVersion(String),
    #[error("no rollout {0}")]
    NotFound(String),
    #[error("model {model} already has rollout {id} ({state}); one rollout per model at a time: wait for it to end, or `outpost-fleet rollout abort {id}`")]
    Busy { id: String, model: String, state: String },
    #[error(transparent)]
    Command(#[from] machine::CommandError),
    #[error(transparent)]
    Plan(#[from] machine::PlanError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("rollout lock poisoned by a panicked thread")]
    Poisoned,
}

impl From<StoreError> for RolloutError {
    fn from(e: StoreError) -> RolloutError {
        match e {
            StoreError::Busy { id, model, state } => RolloutError::Busy { id, model, state },
            other => RolloutError::Store(other),
        }
    }
}

impl RolloutError {
    /// HTTP status and error code, in the API's style.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            RolloutError::Invalid(_) | RolloutError::UnknownVersion(_) | RolloutError::Plan(_) => (422, "invalid"),
            RolloutError::NotFound(_) => (404, "not_found"),
            RolloutError::Busy { .. } | RolloutError::Command(_) => (409, "conflict"),
            RolloutError::Deploy(e) if e.is_client_error() => (422, "invalid"),
            _ => (500, "internal"),
        }
    }
}

/// A duration: `500ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 5m, 1h)"))?;
    let factor = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    let secs = n * factor;
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration in a JSON body: `"10s"` or a number of seconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum DurationField {
    Seconds(f64),
    Text(String),
}

impl DurationField {
    fn millis(&self, field: &str) -> Result<u64, RolloutError> {
        let d = match self {
            DurationField::Seconds(s) => parse_duration(&s.to_string()),
            DurationField::Text(t) => parse_duration(t),
        };
        d.map(|d| d.as_millis() as u64).map_err(|e| RolloutError::Invalid(format!("{field}: {e}")))
    }
}

/// `POST /v1/rollouts`: mirrors the `rollout start` flags.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// `NAME@VERSION`; or `model` and `version`.
    pub target: Option<String>,
    pub model: Option<String>,
    pub version: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub stages: Vec<u32>,
    pub bake: DurationField,
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<f64>,
    pub max_drift: Option<f64>,
    pub min_reporting: Option<f64>,
    pub max_failed: Option<u32>,
    pub silence_deadline: Option<DurationField>,
    #[serde(default)]
    pub compare_to_baseline: bool,
    pub on_failure: Option<OnFailure>,
}

/// `POST /v1/rollback`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub model: String,
    pub to: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub devices: Vec<String>,
}

/// The rollout service (module docs).
pub struct Rollouts {
    store: Store,
    registry: Arc<Registry>,
    lock: Mutex<()>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Rollouts {
    pub fn new(registry: Arc<Registry>) -> Rollouts {
        Rollouts { store: Store::new(registry.clone()), registry, lock: Mutex::new(()) }
    }

    fn guard(&self) -> Result<std::sync::MutexGuard<'_, ()>, RolloutError> {
        // The lock only serializes steps (the records are in the registry);
        // a tick that panicked holding it leaves nothing half-done to fear.
        Ok(self.lock.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Starts a rollout: plans its cohorts, stores it, sends stage 1.
    /// Returns its status view.
    pub fn start(&self, fleet: &Fleet, req: &StartRequest) -> Result<Value, RolloutError> {
        let (model, version) = match (&req.target, &req.model, &req.version) {
            (Some(t), None, None) => {
                let (m, v) = parse_target(t).map_err(|e| RolloutError::Invalid(e.to_string()))?;
                (m.to_string(), v.to_string())
            }
            (None, Some(m), Some(v)) => (m.clone(), v.clone()),
            _ => return Err(RolloutError::Invalid("name the version as \"target\": \"NAME@VERSION\" or as \"model\" and \"version\"".into())),
        };
        if self.registry.version(&model, &version)?.is_none() {
            return Err(RolloutError::UnknownVersion(format!("{model}@{version}")));
        }
        let bake_ms = req.bake.millis("bake")?;
        let silence_deadline_ms = match &req.silence_deadline {
            Some(d) => d.millis("silence_deadline")?,
            None => bake_ms + DEFAULT_DEADLINE_MARGIN_MS,
        };
        let policy = Policy {
            stages: req.stages.clone(),
            bake_ms,
            silence_deadline_ms,
            limits: gates::Limits {
                max_error_rate: req.max_error_rate,
                max_p99_ms: req.max_p99_ms,
                max_drift: req.max_drift,
                min_reporting: req.min_reporting.unwrap_or(1.0),
                max_failed: req.max_failed.unwrap_or(0),
                compare_to_baseline: req.compare_to_baseline,
            },
            on_failure: req.on_failure.unwrap_or(OnFailure::Rollback),
        };
        let candidates: Vec<cohort::Candidate> = self
            .registry
            .devices()?
            .into_iter()
            .filter(|d| req.tags.is_empty() || d.tags.iter().any(|t| req.tags.contains(t)))
            .map(|d| cohort::Candidate { id: d.id, tags: d.tags })
            .collect();
        let _g = self.guard()?;
        // Refuse a second live rollout before spending a rollout id on it
        // (the store checks again, atomically, at insert).
        if let Some(live) = self.store.active_for(&model)? {
            return Err(RolloutError::Busy { id: live.id, model, state: live.state.as_str().into() });
        }
        let id = format!("ro-{}", self.registry.next_counter(ROLLOUT_COUNTER)?);
        let r = machine::plan(&id, &model, &version, &req.tags, policy, &candidates, now_ms())?;
        self.store.insert(&r)?;
        log::info!("rollout {id}: {model}@{version} to {} device(s) in stages {:?}", r.devices.len(), r.policy.stages);
        let r = self.advance(fleet, r)?;
        Ok(self.view(fleet, &r, true))
    }

    /// A rollout's status view (with the current stage's gates as they
    /// stand now, marked `"final": false`).
    pub fn status(&self, fleet: &Fleet, id: &str) -> Result<Value, RolloutError> {
        let r = self.store.get(id)?.ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
        Ok(self.view(fleet, &r, true))
    }

    /// Every rollout, newest first.
    pub fn list(&self, fleet: &Fleet) -> Result<Vec<Value>, RolloutError> {
        Ok(self.store.list(false)?.iter().map(|r| self.view(fleet, r, false)).collect())
    }

    /// Pause, resume or abort.
    pub fn command(&self, fleet: &Fleet, id: &str, cmd: Command) -> Result<Value, RolloutError> {
        let _g = self.guard()?;
        let r = self.store.get(id)?.ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
        let step = machine::command(&r, cmd, now_ms())?;
        let r = self.commit(fleet, &r, step)?;
        Ok(self.view(fleet, &r, true))
    }

    /// Remote rollback: a new directive naming `to` (a higher sequence, an
    /// older model) for each targeted device. Targets: `devices`, or the
    /// devices with one of `tags` that run or were told to run the model,
    /// or, with neither, every device that does. A live rollout of the
    /// model is aborted first (its canaries are covered by this rollback).
    pub fn rollback(&self, fleet: &Fleet, req: &RollbackRequest) -> Result<Value, RolloutError> {
        if !req.tags.is_empty() && !req.devices.is_empty() {
            return Err(RolloutError::Invalid("name devices or tags, not both".into()));
        }
        if self.registry.version(&req.model, &req.to)?.is_none() {
            return Err(RolloutError::UnknownVersion(format!("{}@{}", req.model, req.to)));
        }
        let targets: Vec<String> = if !req.devices.is_empty() {
            req.devices.clone()
        } else {
            let directives: HashMap<String, String> =
                self.registry.directives()?.into_iter().map(|d| (d.device, d.model)).collect();
            self.registry
                .devices()?
                .into_iter()
                .filter(|d| req.tags.is_empty() || d.tags.iter().any(|t| req.tags.contains(t)))
                .filter(|d| {
                    d.model.as_deref() == Some(req.model.as_str())
                        || directives.get(&d.id).is_some_and(|m| *m == req.model)
                })
                .map(|d| d.id)
                .collect()
        };
        if targets.is_empty() {
            let scope = if req.tags.is_empty() { String::new() } else { format!(" with tag {}", req.tags.join(" or ")) };
            return Err(RolloutError::Invalid(format!("no device{scope} runs {}", req.model)));
        }
        let _g = self.guard()?;
        let mut aborted = None;
        if let Some(live) = self.store.active_for(&req.model)? {
            let mut step = machine::command(&live, Command::Abort, now_ms())?;
            // This rollback is what the canaries get, not their own previous versions.
            step.actions.retain(|a| !matches!(a, Action::Rollback { .. }));
            step.rollout.reason = Some(format!("aborted by a remote rollback of {} to {}", req.model, req.to));
            if let Some(Action::Alert { reason, .. }) = step.actions.iter_mut().find(|a| matches!(a, Action::Alert { .. })) {
                *reason = step.rollout.reason.clone().unwrap_or_default();
            }
            self.commit(fleet, &live, step)?;
            aborted = Some(live.id);
        }
        let deployed: Vec<Deployed> = fleet.directives.deploy(&req.model, &req.to, &targets, None)?;
        log::info!("rollback: {} device(s) told to run {}@{}", deployed.len(), req.model, req.to);
        Ok(json!({
            "model": req.model,
            "to": req.to,
            "targeted": deployed.len(),
            "devices": deployed,
            "aborted_rollout": aborted,
        }))
    }

    /// One tick of the driver over every live rollout (module docs).
    pub fn tick(&self, fleet: &Fleet) {
        let Ok(_g) = self.guard() else {
            log::error!("rollouts: lock poisoned; the driver stops advancing rollouts");
            return;
        };
        let active = match self.store.list(true) {
            Ok(a) => a,
            Err(e) => {
                log::error!("rollouts: reading the live rollouts: {e}");
                return;
            }
        };
        for r in active {
            let id = r.id.clone();
            if let Err(e) = self.advance(fleet, r) {
                log::error!("rollout {id}: {e}");
            }
        }
        self.update_metrics(fleet);
    }

    /// Starts the driver thread.
    /// A panic in a tick is caught and the next tick runs (the rollout
    /// records are in the registry, not in the thread); a driver thread that
    /// dies anyway is named by `/ready`.
    pub fn spawn_driver(fleet: Arc<Fleet>) -> std::io::Result<()> {
        let supervisor = fleet.supervisor.clone();
        supervisor.spawn("rollout-driver", move || loop {
            fleet.supervisor.guard("a rollout tick", || fleet.rollouts.tick(&fleet));
            std::thread::sleep(TICK);
        })?;
        Ok(())
    }

    /// Leftover outbox first, then one machine step.
    fn advance(&self, fleet: &Fleet, mut r: Rollout) -> Result<Rollout, RolloutError> {
        if !r.outbox.is_empty() {
            r = self.execute(fleet, r)?;
        }
        let obs = self.observe(fleet, &r)?;
        let step = machine::step(&r, &obs, now_ms());
        self.commit(fleet, &r, step)
    }

    /// Persists a step (record and outbox), publishes the summary, acts.
    fn commit(&self, fleet: &Fleet, before: &Rollout, step: machine::Step) -> Result<Rollout, RolloutError> {
        if step.rollout == *before && step.actions.is_empty() {
            return Ok(step.rollout);
        }
        for e in &step.events {
            log::info!("rollout {}: {e}", before.id);
        }
        let mut next = step.rollout;
        next.outbox = step.actions;
        self.store.save(&next)?;
        if next.state != before.state && !next.state.is_active() {
            let result = next.reason.clone().unwrap_or_else(|| "ok".into());
            fleet.audit("fleet", &format!("rollout_{}", next.state.as_str()), &next.id, &result);
        }
        self.publish_summary(fleet, &next);
        self.execute(fleet, next)
    }

    /// Carries out the outbox; what cannot be done now stays in it.
    fn execute(&self, fleet: &Fleet, mut r: Rollout) -> Result<Rollout, RolloutError> {
        if r.outbox.is_empty() {
            return Ok(r);
        }
        let actions = std::mem::take(&mut r.outbox);
        let mut remaining = Vec::new();
        for action in actions {
            match &action {
                Action::Send { devices } => {
                    let mut left = Vec::new();
                    for id in devices {
                        match self.send_one(fleet, &r, id) {
                            Ok(seq) => machine::record_sent(&mut r, &[(id.clone(), seq)]),
                            Err(e) => {
                                log::error!("rollout {}: directive for {id}: {e}", r.id);
                                left.push(id.clone());
                            }
                        }
                    }
                    if !left.is_empty() {
                        remaining.push(Action::Send { devices: left });
                    }
                }
                Action::Rollback { device, to } => match self.roll_back_one(fleet, &r, device, to) {
                    Ok(()) => {}
                    Err(RolloutError::Deploy(e)) if e.is_client_error() => {
                        // Can never succeed (the old version is not in the
                        // registry): say so on the device, do not retry.
                        log::error!("rollout {}: cannot send {device} back to {to}: {e}", r.id);
                        if let Some(d) = r.devices.iter_mut().find(|d| &d.id == device) {
                            d.note = Some(format!("could not be sent back to {to}: {e}"));
                        }
                    }
                    Err(e) => {
                        log::error!("rollout {}: sending {device} back to {to}: {e}", r.id);
                        remaining.push(action.clone());
                    }
                },
                Action::Alert { kind, reason } => {
                    let alert = json!({
                        "kind": kind,
                        "rollout": r.id,
                        "model": r.model,
                        "version": r.version,
                        "reason": reason,
                        "state": r.state.as_str(),
                        "stage": r.stage,
                        "at": now_ms() / 1000,
                    });
                    log::warn!("rollout {}: {kind}: {reason}", r.id);
                    if let Err(e) = fleet.link.client.publish(ALERTS_TOPIC, QoS::AtLeastOnce, false, alert.to_string()) {
                        log::error!("rollout {}: publishing the alert: {e}", r.id);
                    }
                }
            }
        }
        r.outbox = remaining;
        self.store.save(&r)?;
        Ok(r)
    }

    /// Sends the new version to one device unless its recorded directive
    /// already names it (an outbox carried out twice); the sequence.
    fn send_one(&self, fleet: &Fleet, r: &Rollout, id: &str) -> Result<u64, RolloutError> {
        let sent_at_s = r.devices.iter().find(|d| d.id == id).and_then(|d| d.sent_at_ms).unwrap_or(0) / 1000;
        if let Some(d) = self.registry.directive(id)? {
            if d.model == r.model && d.version == r.version && d.issued_at >= sent_at_s as i64 {
                return Ok(d.sequence);
            }
        }
        let out = fleet.directives.deploy(&r.model, &r.version, &[id.to_string()], Some(&r.id))?;
        out.first().map(|d| d.sequence).ok_or_else(|| RolloutError::Invalid(format!("no directive made for {id}")))
    }

    fn roll_back_one(&self, fleet: &Fleet, r: &Rollout, id: &str, to: &str) -> Result<(), RolloutError> {
        let ours = r.devices.iter().find(|d| d.id == id).and_then(|d| d.sequence).unwrap_or(0);
        if let Some(d) = self.registry.directive(id)? {
            if d.model == r.model && d.version == to && d.sequence > ours {
                return Ok(());
            }
        }
        fleet.directives.deploy(&r.model, to, &[id.to_string()], Some(&r.id))?;
        Ok(())
    }

    /// What the machine looks at (module docs).
    fn observe(&self, fleet: &Fleet, r: &Rollout) -> Result<machine::Observed, RolloutError> {
        let devices: HashMap<String, DeviceRecord> =
            self.registry.devices()?.into_iter().map(|d| (d.id.clone(), d)).collect();
        let since = r.stages.get(r.stage).and_then(|s| s.started_at_ms).unwrap_or_else(now_ms);
        let mut obs = machine::Observed::default();
        for d in &r.devices {
            let window = if d.stage <= r.stage && d.state != DeviceState::Pending {
                fleet.observations.device_window(&d.id, &r.model, &r.version, since)
            } else {
                None
            };
            if let Some(rec) = devices.get(&d.id) {
                let mut report = report_of(rec);
                if let Some(w) = &window {
                    report.last_heard_ms = report.last_heard_ms.max(Some(w.last_report_unix_ms).filter(|t| *t > 0));
                }
                obs.reports.insert(d.id.clone(), report);
            }
            if let Some(w) = window {
                obs.windows.insert(d.id.clone(), w);
            }
        }
        let stage = r.stages.get(r.stage);
        let bake_over = stage.and_then(|s| s.started_at_ms).is_some_and(|t| now_ms() >= t + r.policy.bake_ms);
        if r.policy.limits.compare_to_baseline && bake_over && !stage.is_some_and(|s| s.passed) {
            obs.analysis = self.analysis(fleet, r, &obs, since);
        }
        Ok(obs)
    }

    /// Canary analysis: the cohort against the targeted devices still on
    /// the most common other version of the model.
    fn analysis(&self, fleet: &Fleet, r: &Rollout, obs: &machine::Observed, since: u64) -> Option<gates::Analysis> {
        let canaries: Vec<String> = r.cohort().map(|d| d.id.clone()).collect();
        let mut by_version: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in r.devices.iter().filter(|d| d.stage > r.stage) {
            if let Some(rep) = obs.reports.get(&d.id) {
                if let (Some(m), Some(v)) = (&rep.model, &rep.version) {
                    if *m == r.model && *v != r.version {
                        by_version.entry(v.clone()).or_default().push(d.id.clone());
                    }
                }
            }
        }
        let (baseline_version, baseline) = by_version.into_iter().max_by_key(|(_, ids)| ids.len())?;
        let report = fleet.observations.compare(&r.model, &canaries, &r.version, &baseline, &baseline_version, since);
        let worse_metrics = report.metrics.iter().filter(|m| m.significantly_worse).map(|m| m.name.clone()).collect();
        let mut value = serde_json::to_value(&report).unwrap_or(Value::Null);
        if let Some(o) = value.as_object_mut() {
            o.insert("baseline_version".into(), json!(baseline_version));
            o.insert("baseline_devices".into(), json!(baseline.len()));
            o.insert("canary_devices".into(), json!(canaries.len()));
        }
        Some(gates::Analysis { worse_metrics, report: value })
    }

    fn publish_summary(&self, fleet: &Fleet, r: &Rollout) {
        let mut view = self.view(fleet, r, false);
        // Per-device lists stay in the API: at 10,000 devices they are
        // megabytes, over the MQTT packet limit, and the fleet's link would
        // drop on every publish (seen in bench/fleet).
        if let Some(stages) = view.get_mut("stages").and_then(Value::as_array_mut) {
            for stage in stages {
                if let Some(o) = stage.as_object_mut() {
                    o.remove("devices");
                }
            }
        }
        let body = view.to_string();
        if let Err(e) = fleet.link.client.publish(summary_topic(&r.id), QoS::AtLeastOnce, true, body) {
            log::error!("rollout {}: publishing the summary: {e}", r.id);
        }
    }

    fn update_metrics(&self, fleet: &Fleet) {
        let (counts, live) = match (self.store.counts(), self.store.list(true)) {
            (Ok(c), Ok(l)) => (c, l),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("metrics: rollouts unavailable: {e}");
                return;
            }
        };
        let m = &fleet.metrics;
        m.rollouts.clear();
        m.rollout_stage.clear();
        m.rollout_devices.clear();
        for s in State::ALL {
            let n = counts.iter().find(|(state, _)| state == s.as_str()).map(|(_, n)| *n).unwrap_or(0);
            m.rollouts.get_or_create(&vec![("state", s.as_str().to_string())]).set(n as i64);
        }
        for r in &live {
            let labels = vec![("rollout", r.id.clone()), ("model", r.model.clone()), ("version", r.version.clone())];
            // 1-based: stage 1 of 4 reads as 1.
            m.rollout_stage.get_or_create(&labels).set(r.stage as i64 + 1);
            for s in DeviceState::ALL {
                m.rollout_devices
                    .get_or_create(&vec![("rollout", r.id.clone()), ("state", s.as_str().to_string())])
                    .set(r.count(s) as i64);
            }
        }
    }

    /// The JSON of `rollout status` (and the MQTT summary). With `live`,
    /// the current stage's gates are judged on what is observed now.
    fn view(&self, fleet: &Fleet, r: &Rollout, live: bool) -> Value {
        let reports: HashMap<String, Report> = self
            .registry
            .devices()
            .map(|ds| ds.iter().map(|d| (d.id.clone(), report_of(d))).collect())
            .unwrap_or_default();
        let live_gates = if live && r.state.is_active() {
            r.stages.get(r.stage).filter(|s| s.started_at_ms.is_some() && !s.passed).and_then(|_| {
                let obs = self.observe(fleet, r).ok()?;
                let cohort: Vec<&machine::Device> = r.cohort().collect();
                let input = gates::Inputs {
                    windows: cohort.iter().filter_map(|d| obs.windows.get(&d.id)).collect(),
                    cohort: cohort.len(),
                    failed: cohort.iter().filter(|d| d.state == DeviceState::Failed).count(),
                    analysis: obs.analysis.as_ref(),
                };
                Some(gates::evaluate(&r.policy.limits, &input))
            })
        } else {
            None
        };
        view(r, &reports, live_gates)
    }
}

fn report_of(d: &DeviceRecord) -> Report {
    Report {
        model: d.model.clone(),
        version: d.version.clone(),
        status: d.status.clone(),
        committed: d.committed,
        directive_sequence: d.directive_sequence,
        // last_seen is whole seconds; its start, so that a message from
        // just before a directive never passes for an answer to it.
        last_heard_ms: d.last_seen.map(|s| (s.max(0) as u64) * 1000),
        last_error: d.last_error.clone(),
    }
}

fn secs(ms: Option<u64>) -> Value {
    ms.map(|m| json!(m / 1000)).unwrap_or(Value::Null)
}

/// The status JSON of a rollout (see the API contract in `crate::api`).
pub fn view(r: &Rollout, reports: &HashMap<String, Report>, live_gates: Option<BTreeMap<String, gates::GateResult>>) -> Value {
    let device_json = |d: &machine::Device| {
        let version = reports
            .get(&d.id)
            .filter(|rep| rep.model.as_deref() == Some(r.model.as_str()))
            .and_then(|rep| rep.version.clone());
        json!({
            "id": d.id,
            "state": d.state.as_str(),
            "version": version,
            "tags": d.tags,
            "previous": d.previous,
            "note": d.note,
        })
    };
    let stages: Vec<Value> = r
        .stages
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let state = if s.passed {
                "passed"
            } else if s.started_at_ms.is_none() {
                "pending"
            } else if k == r.stage && r.state.is_active() {
                "baking"
            } else if k == r.stage && !r.state.is_active() {
                "stopped"
            } else {
                "pending"
            };
            let (gates, final_) = match (&live_gates, k == r.stage && !s.passed) {
                (Some(g), true) => (g.clone(), false),
                _ => (s.gates.clone(), true),
            };
            json!({
                "index": k,
                "percent": s.percent,
                "size": s.size,
                "state": state,
                "devices": r.devices.iter().filter(|d| d.stage <= k).map(device_json).collect::<Vec<_>>(),
                "gates": gates,
                "final": final_,
                "analysis": s.analysis,
                "started_at": secs(s.started_at_ms),
                "ended_at": secs(s.ended_at_ms),
                "started_at_ms": s.started_at_ms,
                "ended_at_ms": s.ended_at_ms,
            })
        })
        .collect();
    let counts: serde_json::Map<String, Value> =
        DeviceState::ALL.iter().map(|s| (s.as_str().to_string(), json!(r.count(*s)))).collect();
    json!({
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "target": format!("{}@{}", r.model, r.version),
        "tags": r.tags,
        "state": r.state.as_str(),
        "stage": r.stage,
        "reason": r.reason,
        "on_failure": r.policy.on_failure,
        "policy": {
            "stages": r.policy.stages,
            "bake_secs": r.policy.bake_ms as f64 / 1000.0,
            "silence_deadline_secs": r.policy.silence_deadline_ms as f64 / 1000.0,
            "max_error_rate": r.policy.limits.max_error_rate,
            "max_p99_ms": r.policy.limits.max_p99_ms,
            "max_drift": r.policy.limits.max_drift,
            "min_reporting": r.policy.limits.min_reporting,
            "max_failed": r.policy.limits.max_failed,
            "compare_to_baseline": r.policy.limits.compare_to_baseline,
            "on_failure": r.policy.on_failure,
        },
        "devices": { "total": r.devices.len(), "by_state": counts },
        "created_at": r.created_at_ms / 1000,
        "updated_at": r.updated_at_ms / 1000,
        "stages": stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_view_has_the_contract_fields() {
        let c = vec![cohort::Candidate { id: "d1".into(), tags: vec!["pi4".into()] }];
        let policy = Policy {
            stages: vec![100],
            bake_ms: 1000,
            silence_deadline_ms: 2000,
            limits: gates::Limits::default(),
            on_failure: OnFailure::Halt,
        };
        let r = machine::plan("ro-1", "bc", "1.1.0", &[], policy, &c, 5000).expect("plan");
        let v = view(&r, &HashMap::new(), None);
        for key in ["id", "model", "version", "state", "stage", "reason", "stages"] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert_eq!(v["state"], "running");
        assert_eq!(v["stages"][0]["percent"], 100);
        assert_eq!(v["stages"][0]["devices"][0]["id"], "d1");
        assert_eq!(v["stages"][0]["devices"][0]["state"], "pending");
        assert!(v["stages"][0]["gates"].is_object());
        assert!(v["stages"][0]["started_at"].is_null() && v["stages"][0]["ended_at"].is_null());
        assert!(v["reason"].is_null());
    }
}
