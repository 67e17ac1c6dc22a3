//! THE rollout state machine — pure: a rollout record, what the fleet
//! observes, and the clock in; the next record and the actions to take out.
//! No I/O here: the driver ([`super`]) gathers observations, persists each
//! new record (with its actions, as an outbox) *before* acting, then acts.
//!
//! ```text
//!                 start (stage 1 sent)
//!                        │
//!                        ▼        pause            resume
//!   ┌──────────────▶ running ─────────────▶ paused ────────┐
//!   │ next stage       │  │ ◀────────────────────────────────┘
//!   │ sent             │  │                   │  │
//!   └── stage passed ◀─┘  │ gate failed       │  │ gate failed (gates still
//!       (bake over,       │ (or too many      │  │ run while paused; only
//!        all devices      │  failed devices)  │  │ the next stage waits)
//!        resolved,        ▼                   │  ▼
//!        gates pass)    halted ◀──────────────┘ halted
//!          │
//!          │ last stage passed            abort (from running or paused)
//!          ▼                                       ▼
//!      completed                                aborted
//! ```
//!
//! `halted`, `completed` and `aborted` are final; one model has at most one
//! rollout that is `running` or `paused`.
//!
//! # A stage
//!
//! 1. **Start**: every device of the stage's cohort still `pending` becomes
//!    `sent`, remembering the version of the model it reported (where a
//!    rollback would send it); the action [`Action::Send`] carries them.
//! 2. **Devices resolve**, judged only on state reports about *this*
//!    rollout's directive (the device's accepted directive sequence is at
//!    least the one sent): `committed` once it serves the version committed
//!    (past its probation); `failed` if it rolled back by itself or could
//!    not carry the directive out; `failed` too when the silence deadline
//!    (counted from when it was sent) passes before it committed — "silent"
//!    if nothing verified came from it since, "not committed" otherwise.
//! 3. **More failed devices than `--max-failed`** halts at once.
//! 4. **End of the stage**: once the bake time since the stage started has
//!    passed *and* every device of the cohort is resolved, the gates run
//!    ([`super::gates`]); one failing halts, else the stage has passed and
//!    the next one starts (or, after the last, the rollout completes).
//!
//! **Halt / abort**: with `on_failure = rollback`, every device of the
//! reached cohort that was sent the version and had a previous one gets
//! [`Action::Rollback`] to it (a new directive, higher sequence, older
//! model); those that succeeded become `rolled_back`. Devices of later
//! stages were never sent anything and never are. An [`Action::Alert`]
//! goes out either way.
//!
//! **Restarts**: everything the machine needs is in the record — stage
//! start times, who was sent what, the sequences of the directives — so a
//! restarted server continues the same stage with the same bake clock and
//! sends nothing twice.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::cohort::{self, Candidate};
use super::gates::{self, Analysis, GateResult, Limits, Window};

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Halted,
    Completed,
    Aborted,
}

impl State {
    pub const ALL: [State; 5] = [State::Running, State::Paused, State::Halted, State::Completed, State::Aborted];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Halted => "halted",
            State::Completed => "completed",
            State::Aborted => "aborted",
        }
    }

    /// Running or paused: the model's one live rollout.
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

/// Where a device is in this rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not reached yet (a later stage, or never if the rollout stops first).
    Pending,
    /// The directive for the new version went out; waiting for the device.
    Sent,
    /// The device serves the new version, committed.
    Committed,
    /// Rolled back by itself, refused, silent, or not committed in time.
    Failed,
    /// Sent back to its previous version by the fleet after a halt.
    RolledBack,
}

impl DeviceState {
    pub const ALL: [DeviceState; 5] =
        [DeviceState::Pending, DeviceState::Sent, DeviceState::Committed, DeviceState::Failed, DeviceState::RolledBack];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Sent => "sent",
            DeviceState::Committed => "committed",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
        }
    }
}

/// What a failed gate does to the canaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop; devices keep what they have.
    Halt,
    /// Stop and send every canary back to the version it had.
    Rollback,
}

/// How a rollout proceeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Percent of the targeted devices per stage, increasing, each 1..=100.
    pub stages: Vec<u32>,
    /// Minimum time a stage runs before its gates are judged.
    pub bake_ms: u64,
    /// A device sent the version that has not committed it this long after
    /// counts as failed.
    pub silence_deadline_ms: u64,
    pub limits: Limits,
    pub on_failure: OnFailure,
}

impl Policy {
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.stages.is_empty() {
            return Err(PlanError::Stages("no stages given (e.g. --stages 1,10,50,100)".into()));
        }
        for w in self.stages.windows(2) {
            if w[1] <= w[0] {
                return Err(PlanError::Stages(format!("stages must increase: {} then {}", w[0], w[1])));
            }
        }
        if let Some(bad) = self.stages.iter().find(|p| **p == 0 || **p > 100) {
            return Err(PlanError::Stages(format!("stage {bad}% is not in 1..=100")));
        }
        if self.silence_deadline_ms == 0 {
            return Err(PlanError::Limits("silence_deadline must be above zero".into()));
        }
        self.limits.validate().map_err(PlanError::Limits)
    }
}

/// One targeted device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub tags: Vec<String>,
    /// Index of the first stage that reaches it (`stages.len()`: none).
    pub stage: usize,
    pub state: DeviceState,
    /// The version of the model it reported when it was sent the new one;
    /// where a rollback sends it (`None`: nothing to go back to).
    pub previous: Option<String>,
    /// Sequence of the directive it was sent (known once published).
    pub sequence: Option<u64>,
    pub sent_at_ms: Option<u64>,
    /// Why it failed, or what happened to it.
    pub note: Option<String>,
}

/// One stage's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub percent: u32,
    /// Devices of the cohort (cumulative).
    pub size: usize,
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    /// The gates as last judged (at the end of the stage, or at a halt).
    pub gates: BTreeMap<String, GateResult>,
    /// The canary analysis report, when one ran.
    pub analysis: Option<serde_json::Value>,
    pub passed: bool,
}

/// Something the driver must do, in order, after persisting the record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Directives for the new version to these devices.
    Send { devices: Vec<String> },
    /// A directive back to `to` for one device.
    Rollback { device: String, to: String },
    /// A JSON alert on `outpost/v1/fleet/alerts` (`kind`: `rollout_halted`,
    /// `rollout_aborted`).
    Alert { kind: String, reason: String },
}

/// A rollout: the whole persisted record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub model: String,
    pub version: String,
    /// Targeted tags (empty: every device).
    pub tags: Vec<String>,
    pub policy: Policy,
    pub state: State,
    /// Index of the current (or last reached) stage.
    pub stage: usize,
    /// Why it halted or was aborted.
    pub reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// In rollout order (see [`cohort`]).
    pub devices: Vec<Device>,
    pub stages: Vec<Stage>,
    /// Actions decided by the last transition and not yet confirmed done.
    #[serde(default)]
    pub outbox: Vec<Action>,
}

impl Rollout {
    /// Devices the current stage reaches.
    pub fn cohort(&self) -> impl Iterator<Item = &Device> {
        let k = self.stage;
        self.devices.iter().filter(move |d| d.stage <= k)
    }

    pub fn count(&self, state: DeviceState) -> usize {
        self.devices.iter().filter(|d| d.state == state).count()
    }
}

/// What a device last said about itself (its signed state, via the registry).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub model: Option<String>,
    pub version: Option<String>,
    pub status: Option<String>,
    pub committed: bool,
    /// The last directive sequence it accepted.
    pub directive_sequence: u64,
    /// When anything verified last came from it (unix ms).
    pub last_heard_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// Everything the machine looks at besides the record and the clock.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// By device id; a device missing here never reported.
    pub reports: HashMap<String, Report>,
    /// Telemetry for the new version since the current stage started, by
    /// device; a device missing here sent none.
    pub windows: HashMap<String, Window>,
    /// The canary analysis for the current stage, when asked for and a
    /// baseline exists.
    pub analysis: Option<Analysis>,
}

/// The outcome of a step.
#[derive(Clone, Debug)]
pub struct Step {
    pub rollout: Rollout,
    pub actions: Vec<Action>,
    /// What happened, for the log (empty when nothing did).
    pub events: Vec<String>,
}

impl Step {
    fn unchanged(r: &Rollout) -> Step {
        Step { rollout: r.clone(), actions: Vec::new(), events: Vec::new() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("stages: {0}")]
    Stages(String),
    #[error("{0}")]
    Limits(String),
    #[error("no devices to roll out to{0}")]
    NoDevices(String),
}

/// An operator command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("rollout {id} is {state}; {what}")]
pub struct CommandError {
    pub id: String,
    pub state: &'static str,
    pub what: &'static str,
}

/// A new rollout over `candidates` (the targeted devices), not started:
/// the first [`step`] starts stage 1.
pub fn plan(
    id: &str,
    model: &str,
    version: &str,
    tags: &[String],
    policy: Policy,
    candidates: &[Candidate],
    now_ms: u64,
) -> Result<Rollout, PlanError> {
    policy.validate()?;
    if candidates.is_empty() {
        let which = if tags.is_empty() { String::new() } else { format!(" with tag {}", tags.join(" or ")) };
        return Err(PlanError::NoDevices(format!("{which}; provision devices first")));
    }
    let ordered = cohort::order(id, candidates, tags);
    let groups = cohort::group_count(candidates, tags);
    let sizes: Vec<usize> = policy.stages.iter().map(|p| cohort::stage_size(*p, ordered.len(), groups)).collect();
    let devices = ordered
        .into_iter()
        .enumerate()
        .map(|(i, c)| Device {
            id: c.id,
            tags: c.tags,
            stage: sizes.iter().position(|n| i < *n).unwrap_or(sizes.len()),
            state: DeviceState::Pending,
            previous: None,
            sequence: None,
            sent_at_ms: None,
            note: None,
        })
        .collect();
    let stages = policy
        .stages
        .iter()
        .zip(&sizes)
        .map(|(p, n)| Stage {
            percent: *p,
            size: *n,
            started_at_ms: None,
            ended_at_ms: None,
            gates: BTreeMap::new(),
            analysis: None,
            passed: false,
        })
        .collect();
    Ok(Rollout {
        id: id.to_string(),
        model: model.to_string(),
        version: version.to_string(),
        tags: tags.to_vec(),
        policy,
        state: State::Running,
        stage: 0,
        reason: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        devices,
        stages,
        outbox: Vec::new(),
    })
}

/// Records the sequences of the directives an [`Action::Send`] published.
pub fn record_sent(r: &mut Rollout, sent: &[(String, u64)]) {
    for (device, sequence) in sent {
        if let Some(d) = r.devices.iter_mut().find(|d| &d.id == device) {
            d.sequence = Some(*sequence);
        }
    }
}

/// One step of the machine (module docs).
pub fn step(r: &Rollout, obs: &Observed, now_ms: u64) -> Step {
    if !r.state.is_active() || r.stages.is_empty() {
        return Step::unchanged(r);
    }
    let mut next = r.clone();
    let mut actions = Vec::new();
    let mut events = Vec::new();
    let k = next.stage;
    if next.stages[k].started_at_ms.is_none() {
        if next.state == State::Running {
            start_stage(&mut next, obs, now_ms, &mut actions, &mut events);
        }
        return finish(r, next, actions, events, now_ms);
    }

    // Devices resolve.
    let deadline = next.policy.silence_deadline_ms;
    let (model, version) = (next.model.clone(), next.version.clone());
    for d in next.devices.iter_mut().filter(|d| d.stage <= k && d.state == DeviceState::Sent) {
        if let Some((state, note)) = judge(d, obs.reports.get(&d.id), &model, &version, deadline, now_ms) {
            events.push(format!("device {} {}{}", d.id, state.as_str(), note.as_ref().map(|n| format!(": {n}")).unwrap_or_default()));
            d.state = state;
            d.note = note;
        }
    }

    // Too many failed devices: halt now, whatever the bake time.
    let failed = next.cohort().filter(|d| d.state == DeviceState::Failed).count();
    if failed > next.policy.limits.max_failed as usize {
        let g = judge_gates(&next, obs);
        let mut reason = gates::failure(&g, obs.analysis.as_ref()).unwrap_or_else(|| "too many failed devices".into());
        let notes: Vec<String> = next
            .cohort()
            .filter(|d| d.state == DeviceState::Failed)
            .take(5)
            .map(|d| format!("{}: {}", d.id, d.note.as_deref().unwrap_or("failed")))
            .collect();
        reason.push_str(&format!(" ({})", notes.join("; ")));
        next.stages[k].gates = g;
        halt(&mut next, State::Halted, reason, now_ms, &mut actions, &mut events);
        return finish(r, next, actions, events, now_ms);
    }

    // End of the stage.
    if !next.stages[k].passed {
        let started = next.stages[k].started_at_ms.unwrap_or(now_ms);
        let baked = now_ms >= started.saturating_add(next.policy.bake_ms);
        let resolved = next.cohort().all(|d| matches!(d.state, DeviceState::Committed | DeviceState::Failed));
        if baked && resolved {
            let g = judge_gates(&next, obs);
            next.stages[k].analysis = obs.analysis.as_ref().map(|a| a.report.clone());
            let failure = gates::failure(&g, obs.analysis.as_ref());
            next.stages[k].gates = g;
            match failure {
                Some(reason) => {
                    halt(&mut next, State::Halted, reason, now_ms, &mut actions, &mut events);
                    return finish(r, next, actions, events, now_ms);
                }
                None => {
                    next.stages[k].passed = true;
                    next.stages[k].ended_at_ms = Some(now_ms);
                    events.push(format!("stage {} ({}%) passed its gates", k + 1, next.stages[k].percent));
                }
            }
        }
    }

    // Next stage (a paused rollout holds here).
    if next.stages[k].passed && next.state == State::Running {
        if k + 1 == next.stages.len() {
            next.state = State::Completed;
            events.push(format!("completed: {} device(s) on {}@{}", next.count(DeviceState::Committed), next.model, next.version));
        } else {
            next.stage = k + 1;
            start_stage(&mut next, obs, now_ms, &mut actions, &mut events);
        }
    }
    finish(r, next, actions, events, now_ms)
}

/// Applies an operator command.
pub fn command(r: &Rollout, cmd: Command, now_ms: u64) -> Result<Step, CommandError> {
    let err = |what| CommandError { id: r.id.clone(), state: r.state.as_str(), what };
    let mut next = r.clone();
    let mut actions = Vec::new();
    let mut events = Vec::new();
    match cmd {
        Command::Pause => {
            if r.state != State::Running {
                return Err(err("only a running rollout can be paused"));
            }
            next.state = State::Paused;
            events.push("paused by the operator".into());
        }
        Command::Resume => {
            if r.state != State::Paused {
                return Err(err("only a paused rollout can be resumed"));
            }
            next.state = State::Running;
            events.push("resumed by the operator".into());
        }
        Command::Abort => {
            if !r.state.is_active() {
                return Err(err("it has already ended"));
            }
            halt(&mut next, State::Aborted, "aborted by the operator".into(), now_ms, &mut actions, &mut events);
        }
    }
    Ok(finish(r, next, actions, events, now_ms))
}

fn finish(before: &Rollout, mut next: Rollout, actions: Vec<Action>, events: Vec<String>, now_ms: u64) -> Step {
    if next != *before {
        next.updated_at_ms = now_ms;
    }
    Step { rollout: next, actions, events }
}

fn start_stage(r: &mut Rollout, obs: &Observed, now_ms: u64, actions: &mut Vec<Action>, events: &mut Vec<String>) {
    let k = r.stage;
    r.stages[k].started_at_ms = Some(now_ms);
    let model = r.model.clone();
    let version = r.version.clone();
    let mut send = Vec::new();
    for d in r.devices.iter_mut().filter(|d| d.stage <= k && d.state == DeviceState::Pending) {
        d.state = DeviceState::Sent;
        d.sent_at_ms = Some(now_ms);
        d.previous = obs
            .reports
            .get(&d.id)
            .filter(|rep| rep.model.as_deref() == Some(model.as_str()))
            .and_then(|rep| rep.version.clone())
            .filter(|v| *v != version);
        send.push(d.id.clone());
    }
    events.push(format!(
        "stage {} ({}%, {} device(s)) started; {} new",
        k + 1,
        r.stages[k].percent,
        r.stages[k].size,
        send.len()
    ));
    if !send.is_empty() {
        actions.push(Action::Send { devices: send });
    }
}

/// A sent device's new state, if it changed (module docs, step 2).
fn judge(
    d: &Device,
    report: Option<&Report>,
    model: &str,
    version: &str,
    deadline_ms: u64,
    now_ms: u64,
) -> Option<(DeviceState, Option<String>)> {
    let sent_at = d.sent_at_ms.unwrap_or(now_ms);
    if let (Some(rep), Some(seq)) = (report, d.sequence) {
        // Only reports about this directive (or a later one) count: a device
        // still showing how an earlier update ended says nothing about ours.
        if rep.directive_sequence >= seq {
            let status = rep.status.as_deref().unwrap_or("");
            if rep.model.as_deref() == Some(model) && rep.version.as_deref() == Some(version) && rep.committed && status == "serving"
            {
                return Some((DeviceState::Committed, None));
            }
            let why = rep.last_error.clone().unwrap_or_else(|| "no reason given".into());
            match status {
                "rolled_back" => return Some((DeviceState::Failed, Some(format!("rolled back by itself: {why}")))),
                "failed" => return Some((DeviceState::Failed, Some(format!("could not apply the version: {why}")))),
                _ => {}
            }
        }
    }
    if now_ms >= sent_at.saturating_add(deadline_ms) {
        let heard = report.and_then(|r| r.last_heard_ms).is_some_and(|t| t >= sent_at);
        let secs = deadline_ms as f64 / 1000.0;
        let note = if heard {
            let status = report.and_then(|r| r.status.clone()).unwrap_or_else(|| "unknown".into());
            format!("not committed within the {}s deadline (status {status})", gates::fmt(secs))
        } else {
            format!("silent for the {}s deadline since it was sent the version", gates::fmt(secs))
        };
        return Some((DeviceState::Failed, Some(note)));
    }
    None
}

fn judge_gates(r: &Rollout, obs: &Observed) -> BTreeMap<String, GateResult> {
    let cohort: Vec<&Device> = r.cohort().collect();
    let windows: Vec<&Window> = cohort.iter().filter_map(|d| obs.windows.get(&d.id)).collect();
    let input = gates::Inputs {
        windows,
        cohort: cohort.len(),
        failed: cohort.iter().filter(|d| d.state == DeviceState::Failed).count(),
        analysis: obs.analysis.as_ref(),
    };
    gates::evaluate(&r.policy.limits, &input)
}

fn halt(r: &mut Rollout, to: State, reason: String, now_ms: u64, actions: &mut Vec<Action>, events: &mut Vec<String>) {
    let k = r.stage;
    r.state = to;
    r.reason = Some(reason.clone());
    if r.stages[k].started_at_ms.is_some() && r.stages[k].ended_at_ms.is_none() {
        r.stages[k].ended_at_ms = Some(now_ms);
    }
    if r.policy.on_failure == OnFailure::Rollback {
        for d in r.devices.iter_mut() {
            if !matches!(d.state, DeviceState::Sent | DeviceState::Committed | DeviceState::Failed) {
                continue;
            }
            let Some(prev) = d.previous.clone() else { continue };
            actions.push(Action::Rollback { device: d.id.clone(), to: prev.clone() });
            // A failed device keeps its state (and note): it failed, and is
            // being told to stay where it went; the others are rolled back.
            if d.state != DeviceState::Failed {
                d.state = DeviceState::RolledBack;
                d.note = Some(format!("sent back to {prev}"));
            }
        }
    }
    let kind = if to == State::Aborted { "rollout_aborted" } else { "rollout_halted" };
    events.push(format!("{}: {reason}", to.as_str()));
    actions.push(Action::Alert { kind: kind.into(), reason });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "bc";
    const NEW: &str = "1.1.0";
    const OLD: &str = "1.0.0";
    const BAKE: u64 = 10_000;
    const DEADLINE: u64 = 30_000;

    fn policy(stages: &[u32]) -> Policy {
        Policy {
            stages: stages.to_vec(),
            bake_ms: BAKE,
            silence_deadline_ms: DEADLINE,
            limits: Limits { max_error_rate: Some(0.05), max_p99_ms: Some(50.0), max_drift: Some(1.0), ..Limits::default() },
            on_failure: OnFailure::Rollback,
        }
    }

    fn candidates(n: usize) -> Vec<Candidate> {
        (0..n).map(|i| Candidate { id: format!("d{i:02}"), tags: vec!["pi4".into()] }).collect()
    }

    /// A small world: devices report, time passes.
    struct World {
        obs: Observed,
        now: u64,
        /// The directive sequence each device was last sent.
        next_seq: u64,
    }

    impl World {
        fn new(devices: &[Candidate]) -> World {
            let mut obs = Observed::default();
            for d in devices {
                obs.reports.insert(
                    d.id.clone(),
                    Report {
                        model: Some(MODEL.into()),
                        version: Some(OLD.into()),
                        status: Some("serving".into()),
                        committed: true,
                        directive_sequence: 1,
                        last_heard_ms: Some(0),
                        last_error: None,
                    },
                );
            }
            World { obs, now: 1_000, next_seq: 100 }
        }

        /// Runs a step and plays the driver: sequences for sent devices.
        fn step(&mut self, r: &Rollout) -> Step {
            let mut s = step(r, &self.obs, self.now);
            self.execute(&mut s);
            s
        }

        fn execute(&mut self, s: &mut Step) {
            for a in &s.actions {
                if let Action::Send { devices } = a {
                    let sent: Vec<(String, u64)> = devices
                        .iter()
                        .map(|d| {
                            self.next_seq += 1;
                            (d.clone(), self.next_seq)
                        })
                        .collect();
                    record_sent(&mut s.rollout, &sent);
                }
            }
        }

        fn seq(r: &Rollout, id: &str) -> u64 {
            r.devices.iter().find(|d| d.id == id).and_then(|d| d.sequence).expect("sent")
        }

        /// Device `id` commits the new version and reports healthy telemetry.
        fn commit(&mut self, r: &Rollout, id: &str) {
            let seq = Self::seq(r, id);
            let now = self.now;
            let rep = self.obs.reports.get_mut(id).expect("device");
            rep.model = Some(MODEL.into());
            rep.version = Some(NEW.into());
            rep.status = Some("serving".into());
            rep.committed = true;
            rep.directive_sequence = seq;
            rep.last_heard_ms = Some(now);
            self.obs.windows.insert(id.into(), Window { requests: 100, windows: 2, ..Window::default() });
        }

        fn commit_all_sent(&mut self, r: &Rollout) {
            let ids: Vec<String> =
                r.devices.iter().filter(|d| d.state == DeviceState::Sent).map(|d| d.id.clone()).collect();
            for id in ids {
                self.commit(r, &id);
            }
        }
    }

    fn state_of(r: &Rollout, id: &str) -> DeviceState {
        r.devices.iter().find(|d| d.id == id).map(|d| d.state).expect("device")
    }

    fn sent_ids(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .flat_map(|a| match a {
                Action::Send { devices } => devices.clone(),
                _ => vec![],
            })
            .collect()
    }

    fn rollbacks(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Rollback { device, to } => Some((device.clone(), to.clone())),
                _ => None,
            })
            .collect()
    }

    /// A rollout over `n` devices, its first stage started.
    fn started(n: usize, stages: &[u32]) -> (World, Rollout) {
        let c = candidates(n);
        let mut w = World::new(&c);
        let r = plan("ro-1", MODEL, NEW, &[], policy(stages), &c, w.now).expect("plan");
        let s = w.step(&r);
        (w, s.rollout)
    }

    /// Runs stage-by-stage, every device committing, to the end.
    fn run_clean(w: &mut World, mut r: Rollout) -> Rollout {
        for _ in 0..20 {
            if r.state != State::Running {
                break;
            }
            w.commit_all_sent(&r);
            w.now += BAKE;
            r = w.step(&r).rollout;
        }
        r
    }

    #[test]
    fn plan_validates_and_nests_cohorts() {
        let c = candidates(20);
        assert!(matches!(plan("r", MODEL, NEW, &[], policy(&[]), &c, 0), Err(PlanError::Stages(_))));
        assert!(matches!(plan("r", MODEL, NEW, &[], policy(&[50, 10]), &c, 0), Err(PlanError::Stages(_))));
        assert!(matches!(plan("r", MODEL, NEW, &[], policy(&[0, 10]), &c, 0), Err(PlanError::Stages(_))));
        assert!(matches!(plan("r", MODEL, NEW, &[], policy(&[10, 101]), &c, 0), Err(PlanError::Stages(_))));
        assert!(matches!(plan("r", MODEL, NEW, &[], policy(&[10]), &[], 0), Err(PlanError::NoDevices(_))));
        let mut bad = policy(&[10]);
        bad.limits.min_reporting = 2.0;
        assert!(matches!(plan("r", MODEL, NEW, &[], bad, &c, 0), Err(PlanError::Limits(_))));
        let r = plan("r", MODEL, NEW, &[], policy(&[1, 10, 50, 100]), &c, 0).expect("plan");
        let sizes: Vec<usize> = r.stages.iter().map(|s| s.size).collect();
        assert_eq!(sizes, vec![1, 2, 10, 20]);
        for (k, size) in sizes.iter().enumerate() {
            assert_eq!(r.devices.iter().filter(|d| d.stage <= k).count(), *size);
        }
        assert!(r.devices.iter().all(|d| d.state == DeviceState::Pending));
        assert_eq!(r.state, State::Running);
    }

    #[test]
    fn start_sends_only_the_first_cohort_and_remembers_previous_versions() {
        let (_w, r) = started(10, &[10, 50, 100]);
        assert_eq!(r.count(DeviceState::Sent), 1);
        assert_eq!(r.count(DeviceState::Pending), 9);
        let first = r.devices.iter().find(|d| d.state == DeviceState::Sent).expect("canary");
        assert_eq!(first.previous.as_deref(), Some(OLD));
        assert!(r.stages[0].started_at_ms.is_some());
    }

    #[test]
    fn a_clean_rollout_goes_through_every_stage_and_completes() {
        let (mut w, r) = started(10, &[10, 50, 100]);
        // Before the bake is over nothing moves, even with everyone committed.
        w.commit_all_sent(&r);
        w.now += BAKE - 1;
        let s = w.step(&r);
        assert_eq!(s.rollout.stage, 0);
        assert!(s.actions.is_empty());
        assert_eq!(state_of(&s.rollout, &r.devices[0].id), DeviceState::Committed);
        let r = s.rollout;
        w.now += 1;
        let s = w.step(&r);
        assert_eq!(s.rollout.stage, 1);
        assert!(s.rollout.stages[0].passed);
        assert_eq!(sent_ids(&s.actions).len(), 4, "stage 2 sends its 4 new devices only");
        let r = run_clean(&mut w, s.rollout);
        assert_eq!(r.state, State::Completed);
        assert_eq!(r.count(DeviceState::Committed), 10);
        assert!(r.stages.iter().all(|s| s.passed && s.ended_at_ms.is_some()));
        assert!(r.stages[2].gates.values().all(|g| g.pass));
        // A final state never moves again.
        w.now += 1_000_000;
        let s = w.step(&r);
        assert_eq!(s.rollout, r);
        assert!(s.actions.is_empty());
    }

    #[test]
    fn a_stage_waits_for_every_device_until_the_deadline() {
        let (mut w, r) = started(4, &[50, 100]);
        let ids: Vec<String> = r.devices.iter().filter(|d| d.state == DeviceState::Sent).map(|d| d.id.clone()).collect();
        assert_eq!(ids.len(), 2);
        w.commit(&r, &ids[0]);
        w.now += BAKE * 2;
        let s = w.step(&r);
        assert_eq!(s.rollout.stage, 0, "one device still working: the stage waits");
        assert_eq!(s.rollout.state, State::Running);
        // It comes back and commits before the deadline: fine.
        w.commit(&s.rollout, &ids[1]);
        let s = w.step(&s.rollout);
        assert_eq!(s.rollout.stage, 1);
    }

    fn assert_halted_with_rollback(s: &Step, gate: &str) {
        assert_eq!(s.rollout.state, State::Halted, "{:?}", s.events);
        let reason = s.rollout.reason.clone().expect("reason");
        assert!(reason.contains(&format!("gate {gate} failed")), "{reason}");
        // Every canary goes back to 1.0.0; nobody outside the stage is touched.
        let cohort: Vec<String> = s.rollout.cohort().map(|d| d.id.clone()).collect();
        let rb = rollbacks(&s.actions);
        assert_eq!(rb.len(), cohort.len());
        assert!(rb.iter().all(|(d, to)| cohort.contains(d) && to == OLD));
        assert!(s.rollout.devices.iter().filter(|d| d.stage > s.rollout.stage).all(|d| d.state == DeviceState::Pending));
        assert!(sent_ids(&s.actions).is_empty());
        assert!(s.actions.iter().any(|a| matches!(a, Action::Alert { kind, .. } if kind == "rollout_halted")));
    }

    /// Commits stage 1 of 10 devices ([20, 100]), then sets `bad` on the
    /// telemetry and ends the bake.
    fn halted_by(bad: impl Fn(&mut Window)) -> Step {
        let (mut w, r) = started(10, &[20, 100]);
        w.commit_all_sent(&r);
        for win in w.obs.windows.values_mut() {
            bad(win);
        }
        w.now += BAKE;
        w.step(&r)
    }

    #[test]
    fn error_rate_gate_halts_and_rolls_back() {
        let s = halted_by(|w| w.input_errors = 50);
        assert_halted_with_rollback(&s, "error_rate");
        assert!(s.rollout.reason.as_deref().is_some_and(|r| r.contains("0.3333 > limit 0.05")), "{:?}", s.rollout.reason);
        assert!(!s.rollout.stages[0].gates["error_rate"].pass);
        assert_eq!(s.rollout.count(DeviceState::RolledBack), 2);
    }

    #[test]
    fn p99_gate_halts() {
        let s = halted_by(|w| {
            w.latency.buckets_log2_us = vec![0; 18];
            w.latency.buckets_log2_us[17] = 10; // ≤ 262 ms
        });
        assert_halted_with_rollback(&s, "p99_ms");
    }

    #[test]
    fn drift_gate_halts() {
        let s = halted_by(|w| w.drift_score = Some(3.5));
        assert_halted_with_rollback(&s, "drift");
    }

    #[test]
    fn reporting_gate_halts_when_committed_devices_send_no_telemetry() {
        let s = halted_by(|w| w.windows = 0);
        assert_halted_with_rollback(&s, "reporting");
    }

    #[test]
    fn canary_analysis_gate_halts() {
        let (mut w, r) = started(10, &[20, 100]);
        let mut r = r;
        r.policy.limits.compare_to_baseline = true;
        w.commit_all_sent(&r);
        w.obs.analysis = Some(Analysis { worse_metrics: vec!["error_rate".into()], report: serde_json::json!({"worse": true}) });
        w.now += BAKE;
        let s = w.step(&r);
        assert_halted_with_rollback(&s, "canary_analysis");
        assert_eq!(s.rollout.stages[0].analysis, Some(serde_json::json!({"worse": true})));
    }

    #[test]
    fn a_silent_device_fails_at_the_deadline_and_halts() {
        let (mut w, r) = started(10, &[20, 100]);
        let ids: Vec<String> = r.devices.iter().filter(|d| d.state == DeviceState::Sent).map(|d| d.id.clone()).collect();
        w.commit(&r, &ids[0]);
        // ids[1] says nothing at all.
        w.now += DEADLINE - 1;
        let s = w.step(&r);
        assert_eq!(s.rollout.state, State::Running);
        w.now += 1;
        let s = w.step(&s.rollout);
        assert_eq!(s.rollout.state, State::Halted);
        assert_eq!(state_of(&s.rollout, &ids[1]), DeviceState::Failed);
        let reason = s.rollout.reason.clone().expect("reason");
        assert!(reason.contains("gate failed failed: 1 > limit 0") && reason.contains("silent"), "{reason}");
        // Both canaries are told to go back (the silent one finds it when it returns).
        assert_eq!(rollbacks(&s.actions).len(), 2);
    }

    #[test]
    fn a_talking_device_that_never_commits_fails_at_the_deadline() {
        let (mut w, r) = started(5, &[20, 100]);
        let id = r.devices[0].id.clone();
        let seq = World::seq(&r, &id);
        w.now += 2_000;
        let rep = w.obs.reports.get_mut(&id).expect("d");
        rep.directive_sequence = seq;
        rep.status = Some("downloading".into());
        rep.committed = false;
        rep.last_heard_ms = Some(w.now);
        w.now = r.devices[0].sent_at_ms.expect("sent") + DEADLINE;
        let s = w.step(&r);
        assert_eq!(s.rollout.state, State::Halted);
        assert!(s.rollout.devices[0].note.as_deref().is_some_and(|n| n.contains("not committed") && n.contains("downloading")));
    }

    #[test]
    fn a_device_rolling_back_by_itself_during_probation_fails_the_stage() {
        let (mut w, r) = started(10, &[20, 100]);
        let ids: Vec<String> = r.devices.iter().filter(|d| d.state == DeviceState::Sent).map(|d| d.id.clone()).collect();
        w.commit(&r, &ids[0]);
        // ids[1]: probation, then back to 1.0.0 by itself.
        let seq = World::seq(&r, &ids[1]);
        let rep = w.obs.reports.get_mut(&ids[1]).expect("d");
        rep.directive_sequence = seq;
        rep.version = Some(NEW.into());
        rep.status = Some("probation".into());
        rep.committed = false;
        let s = w.step(&r);
        assert_eq!(state_of(&s.rollout, &ids[1]), DeviceState::Sent, "probation is not a verdict");
        let rep = w.obs.reports.get_mut(&ids[1]).expect("d");
        rep.version = Some(OLD.into());
        rep.status = Some("rolled_back".into());
        rep.committed = true;
        rep.last_error = Some("error rate 0.4 over 0.05".into());
        w.now += 100;
        let s = w.step(&s.rollout);
        assert_eq!(s.rollout.state, State::Halted, "halted at once, before the bake is over");
        assert_eq!(state_of(&s.rollout, &ids[1]), DeviceState::Failed);
        assert!(s.rollout.reason.as_deref().is_some_and(|r| r.contains("rolled back by itself: error rate 0.4")));
        assert_eq!(state_of(&s.rollout, &ids[0]), DeviceState::RolledBack);
    }

    #[test]
    fn an_old_rollback_report_is_not_a_verdict_on_this_directive() {
        let (mut w, r) = started(5, &[20, 100]);
        let id = r.devices[0].id.clone();
        let rep = w.obs.reports.get_mut(&id).expect("d");
        rep.status = Some("rolled_back".into());
        rep.directive_sequence = 5; // an earlier directive
        rep.last_heard_ms = Some(w.now + 10);
        w.now += 100;
        let s = w.step(&r);
        assert_eq!(state_of(&s.rollout, &id), DeviceState::Sent);
        assert_eq!(s.rollout.state, State::Running);
    }

    #[test]
    fn max_failed_tolerates_that_many() {
        let c = candidates(10);
        let mut w = World::new(&c);
        let mut p = policy(&[20, 100]);
        p.limits.max_failed = 1;
        p.limits.min_reporting = 0.5;
        let r = plan("ro-1", MODEL, NEW, &[], p, &c, w.now).expect("plan");
        let r = w.step(&r).rollout;
        let ids: Vec<String> = r.devices.iter().filter(|d| d.state == DeviceState::Sent).map(|d| d.id.clone()).collect();
        w.commit(&r, &ids[0]);
        w.now += DEADLINE;
        let s = w.step(&r);
        assert_eq!(s.rollout.state, State::Running, "{:?}", s.rollout.reason);
        assert_eq!(s.rollout.stage, 1);
        assert!(s.rollout.stages[0].gates["failed"].pass);
    }

    #[test]
    fn on_failure_halt_sends_nothing_back() {
        let c = candidates(10);
        let mut w = World::new(&c);
        let mut p = policy(&[20, 100]);
        p.on_failure = OnFailure::Halt;
        let r = plan("ro-1", MODEL, NEW, &[], p, &c, w.now).expect("plan");
        let r = w.step(&r).rollout;
        w.commit_all_sent(&r);
        for win in w.obs.windows.values_mut() {
            win.failures = 100;
        }
        w.now += BAKE;
        let s = w.step(&r);
        assert_eq!(s.rollout.state, State::Halted);
        assert!(rollbacks(&s.actions).is_empty());
        assert_eq!(s.rollout.count(DeviceState::Committed), 2);
        assert_eq!(s.actions.len(), 1, "just the alert");
    }

    #[test]
    fn a_device_with_no_previous_version_is_left_alone() {
        let c = candidates(10);
        let mut w = World::new(&c);
        let r = plan("ro-1", MODEL, NEW, &[], policy(&[20, 100]), &c, w.now).expect("plan");
        let first: Vec<String> = r.devices.iter().filter(|d| d.stage == 0).map(|d| d.id.clone()).collect();
        // One canary never ran this model.
        let rep = w.obs.reports.get_mut(&first[0]).expect("d");
        rep.model = None;
        rep.version = None;
        let r = w.step(&r).rollout;
        w.commit_all_sent(&r);
        for win in w.obs.windows.values_mut() {
            win.input_errors = 100;
        }
        w.now += BAKE;
        let s = w.step(&r);
        assert_eq!(s.rollout.state, State::Halted);
        assert_eq!(rollbacks(&s.actions), vec![(first[1].clone(), OLD.to_string())]);
    }

    #[test]
    fn pause_holds_the_next_stage_and_resume_continues() {
        let (mut w, r) = started(10, &[20, 100]);
        let r = command(&r, Command::Pause, w.now).expect("pause").rollout;
        assert_eq!(r.state, State::Paused);
        assert!(command(&r, Command::Pause, w.now).is_err());
        w.commit_all_sent(&r);
        w.now += BAKE;
        let s = w.step(&r);
        assert!(s.rollout.stages[0].passed, "the stage is still judged");
        assert_eq!(s.rollout.stage, 0, "but the next one waits");
        assert!(s.actions.is_empty());
        let r = command(&s.rollout, Command::Resume, w.now).expect("resume").rollout;
        let s = w.step(&r);
        assert_eq!(s.rollout.stage, 1);
        assert_eq!(sent_ids(&s.actions).len(), 8);
    }

    #[test]
    fn a_paused_rollout_still_halts_on_a_failing_gate() {
        let (mut w, r) = started(10, &[20, 100]);
        let r = command(&r, Command::Pause, w.now).expect("pause").rollout;
        w.commit_all_sent(&r);
        for win in w.obs.windows.values_mut() {
            win.input_errors = 100;
        }
        w.now += BAKE;
        let s = w.step(&r);
        assert_eq!(s.rollout.state, State::Halted);
    }

    #[test]
    fn abort_rolls_back_and_is_final() {
        let (mut w, r) = started(10, &[20, 100]);
        w.commit_all_sent(&r);
        let r = w.step(&r).rollout;
        let s = command(&r, Command::Abort, w.now).expect("abort");
        assert_eq!(s.rollout.state, State::Aborted);
        assert_eq!(s.rollout.reason.as_deref(), Some("aborted by the operator"));
        assert_eq!(rollbacks(&s.actions).len(), 2);
        assert!(s.actions.iter().any(|a| matches!(a, Action::Alert { kind, .. } if kind == "rollout_aborted")));
        for cmd in [Command::Pause, Command::Resume, Command::Abort] {
            assert!(command(&s.rollout, cmd, w.now).is_err());
        }
        assert!(command(&s.rollout, Command::Resume, w.now).is_err_and(|e| e.to_string().contains("is aborted")));
    }

    /// The record through JSON, as the store keeps it.
    fn reload(r: &Rollout) -> Rollout {
        serde_json::from_str(&serde_json::to_string(r).expect("encode")).expect("decode")
    }

    #[test]
    fn a_restart_in_every_state_changes_nothing_and_resends_nothing() {
        // Running mid-bake: same stage, same clock, nothing sent again.
        let (mut w, r) = started(10, &[20, 50, 100]);
        w.commit_all_sent(&r);
        w.now += BAKE / 2;
        let before = w.step(&r).rollout;
        let after = reload(&before);
        assert_eq!(after, before);
        let s = w.step(&after);
        assert!(s.actions.is_empty(), "no directive re-sent after a restart");
        assert_eq!(s.rollout.stage, 0);
        // The bake counts from the persisted start: the rest of it, not a new one.
        w.now += BAKE / 2;
        let s = w.step(&after);
        assert_eq!(s.rollout.stage, 1);

        // Paused.
        let paused = command(&s.rollout, Command::Pause, w.now).expect("pause").rollout;
        let s = w.step(&reload(&paused));
        assert_eq!(s.rollout.state, State::Paused);
        assert!(s.actions.is_empty());

        // Each final state.
        let halted = halted_by(|w| w.failures = 10).rollout;
        let completed = run_clean(&mut w, s.rollout.clone());
        let completed = if completed.state == State::Paused {
            let r = command(&completed, Command::Resume, w.now).expect("resume").rollout;
            run_clean(&mut w, r)
        } else {
            completed
        };
        assert_eq!(completed.state, State::Completed);
        let aborted = command(&paused, Command::Abort, w.now).expect("abort").rollout;
        for r in [halted, completed, aborted] {
            let back = reload(&r);
            w.now += 1_000_000;
            assert_eq!(back.state, r.state);
            assert_eq!(back.reason, r.reason);
            let s = w.step(&back);
            assert_eq!(s.rollout, back, "{:?} moved after a restart", r.state);
            assert!(s.actions.is_empty());
        }
    }

    #[test]
    fn a_restart_before_a_stage_started_starts_it_once() {
        let c = candidates(10);
        let mut w = World::new(&c);
        let r = plan("ro-1", MODEL, NEW, &[], policy(&[20, 100]), &c, w.now).expect("plan");
        let r = reload(&r);
        let s = w.step(&r);
        assert_eq!(sent_ids(&s.actions).len(), 2);
        let s2 = w.step(&reload(&s.rollout));
        assert!(sent_ids(&s2.actions).is_empty());
    }
}
