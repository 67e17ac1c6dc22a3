//! What the fleet has observed of its devices: telemetry windows and
//! drift/latency sketches, kept per (device, model, version), summed for
//! rollout gates, compared for canary analysis, merged for the fleet's
//! drift view.
//!
//! # What is kept, and the memory bound
//!
//! Devices send one telemetry message (JSON counters, latency quantiles, the
//! window's drift verdict) and one sketch message (postcard: drift counts
//! and a log2 latency histogram) per window, both naming the window's model
//! version and its `[start, end)` in unix ms. The fleet keeps:
//!
//! 1. **Per device**: its latest telemetry (status, version, drift verdict,
//!    when received), and per model version it served recently a
//!    **ring of windows** ([`MAX_WINDOWS`] entries, none older than
//!    [`RETENTION_MS`] by the server's clock). A telemetry message and the
//!    sketch of the same window share one entry: counters, latency buckets,
//!    and the *output* columns of the drift sketch (prediction distribution,
//!    for canary analysis). Input columns are not kept per device (31
//!    columns × 35 bins is ~10 KiB; ten thousand devices × a ring would be
//!    gigabytes). When a ring is full, the two adjacent entries spanning the
//!    least time are merged, so entries stay roughly even (a ring of an hour
//!    of 10 s windows holds entries of ~4 minutes; the newest is always one
//!    window). An entry counts for `since` if it *ends* after it, so a gate
//!    may see up to one entry's span of data from before its start — on the
//!    same version only, since entries never mix versions.
//!    At most [`MAX_VERSIONS_PER_DEVICE`] versions per device are kept (the
//!    least recently reported goes first). A window never mixes versions:
//!    entries are keyed by the version the device named.
//! 2. **Per model version**: the full drift sketch (inputs and outputs)
//!    merged across every device, in [`FLEET_BUCKETS`] time buckets of
//!    [`FLEET_BUCKET_MS`] (the recent view) plus a lifetime merge, per
//!    reference fingerprint (a device can only send counts against the
//!    reference it has; the drift view uses the manifest's).
//!
//! Measured (`tests/observations.rs`, `memory_is_bounded`, counting
//! allocator): 10,000 devices with full rings on one version — telemetry,
//! latency buckets and a classifier's output histogram in every window —
//! hold **64.6 MiB** (6.8 KB per device). The worst case, every device with
//! [`MAX_VERSIONS_PER_DEVICE`] versions in the last hour, is three times
//! that (~195 MiB); a rollout leaves a device with two (old and new).

//! # Clocks
//!
//! [`Observations::device_window`]'s `since_unix_ms` is compared with the
//! window ends the *device* reported (the contract: "windows that end at or
//! after"), so a stage's gate sees exactly the windows closed after the
//! stage started, give or take the device's clock. Retention, the fleet
//! buckets and `last_report_unix_ms` use the server's clock, so a device
//! with a wrong clock cannot keep data alive or look fresh.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_runtime::drift::{DeviceSketch, ReferenceSketch};
use outpost_runtime::protocol::{DriftSummary, LatencySketch, SketchMessage, Status, Telemetry};

use crate::canary;
use crate::contribution::{self, Contribution};

/// Windows older than this (server clock, when received) are forgotten.
pub const RETENTION_MS: u64 = 60 * 60 * 1000;
/// Entries in one (device, model, version) ring.
pub const MAX_WINDOWS: usize = 16;
/// Versions remembered per device.
pub const MAX_VERSIONS_PER_DEVICE: usize = 3;
/// Width of a fleet-wide drift bucket.
pub const FLEET_BUCKET_MS: u64 = 5 * 60 * 1000;
/// Fleet-wide buckets kept per version (with the width: the last hour).
pub const FLEET_BUCKETS: usize = 12;
/// Reference fingerprints kept per version (one is normal; more means some
/// devices hold another bundle under the same name).
const MAX_FINGERPRINTS: usize = 4;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A device's drift verdict turned true (published on `outpost/v1/fleet/alerts`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DriftAlert {
    pub kind: &'static str,
    pub device: String,
    pub model: String,
    pub version: String,
    pub flagged: Vec<String>,
    pub score: f64,
    pub samples: u64,
    pub at_unix_ms: u64,
}

/// Called once per turn of a device's drift verdict to true.
pub type AlertSink = Box<dyn Fn(&DriftAlert) + Send + Sync>;
/// Finds the reference sketch of a published model@version.
pub type ReferenceSource = Box<dyn Fn(&str, &str) -> Option<Arc<ReferenceSketch>> + Send + Sync>;

/// The output columns of a drift sketch (inputs dropped), as a
/// [`DeviceSketch`] with no features so it merges with the runtime's code.
#[derive(Clone, Debug)]
struct Outputs(DeviceSketch);

/// One telemetry window (and/or its sketch), or several merged.
#[derive(Clone, Debug)]
struct Entry {
    start_ms: u64,
    end_ms: u64,
    received_ms: u64,
    /// Telemetry windows summed into this entry.
    telemetry_windows: u32,
    requests: u64,
    input_errors: u64,
    failures: u64,
    /// Largest telemetry p99 (ms) of the merged windows.
    telemetry_p99_ms: Option<f64>,
    drift_score: Option<f64>,
    committed: bool,
    latency: LatencySketch,
    /// Boxed: most of an entry's size, and absent without a drift monitor.
    outputs: Option<Box<Outputs>>,
}

impl Entry {
    fn empty(start_ms: u64, end_ms: u64, received_ms: u64) -> Entry {
        Entry {
            start_ms,
            end_ms,
            received_ms,
            telemetry_windows: 0,
            requests: 0,
            input_errors: 0,
            failures: 0,
            telemetry_p99_ms: None,
            drift_score: None,
            committed: false,
            latency: LatencySketch::default(),
            outputs: None,
        }
    }

    /// Adds `later` (the next entry in time) into `self`.
    fn absorb(&mut self, later: &Entry) {
        self.start_ms = self.start_ms.min(later.start_ms);
        self.end_ms = self.end_ms.max(later.end_ms);
        self.received_ms = self.received_ms.max(later.received_ms);
        self.telemetry_windows = self.telemetry_windows.saturating_add(later.telemetry_windows);
        self.requests = self.requests.saturating_add(later.requests);
        self.input_errors = self.input_errors.saturating_add(later.input_errors);
        self.failures = self.failures.saturating_add(later.failures);
        self.telemetry_p99_ms = max_opt(self.telemetry_p99_ms, later.telemetry_p99_ms);
        self.drift_score = max_opt(self.drift_score, later.drift_score);
        if later.telemetry_windows > 0 {
            self.committed = later.committed;
        }
        self.latency.merge(&later.latency);
        merge_outputs(&mut self.outputs, later.outputs.as_deref());
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Merges `add` into `into`; sketches over another reference are left out
/// (the first one seen wins: a device has one bundle per version).
fn merge_outputs(into: &mut Option<Box<Outputs>>, add: Option<&Outputs>) {
    match (into.as_mut(), add) {
        (_, None) => {}
        (None, Some(o)) => *into = Some(Box::new(o.clone())),
        (Some(a), Some(b)) => {
            if let Err(e) = a.0.merge(&b.0) {
                log::debug!("observations: output sketches not merged: {e}");
            }
        }
    }
}

/// A device's windows for one version.
#[derive(Debug)]
struct Series {
    model: String,
    version: String,
    entries: VecDeque<Entry>,
    last_received_ms: u64,
}

impl Series {
    /// The entry holding the window `[start, end)`, created in time order
    /// if new. Room is made *before* inserting (merging older entries), so
    /// the ring never grows past [`MAX_WINDOWS`] — nor does its allocation.
    fn entry(&mut self, start_ms: u64, end_ms: u64, now: u64) -> &mut Entry {
        self.last_received_ms = now;
        // A sketch arriving after its telemetry window was merged joins the
        // entry that holds it.
        if !self.entries.iter().any(|e| e.start_ms <= start_ms && e.end_ms >= end_ms) {
            self.prune(now);
            self.bound(MAX_WINDOWS - 1);
            if self.entries.capacity() == 0 {
                self.entries.reserve_exact(MAX_WINDOWS);
            }
            let at = self.entries.iter().position(|e| e.end_ms > end_ms).unwrap_or(self.entries.len());
            self.entries.insert(at, Entry::empty(start_ms, end_ms, now));
        }
        // Merging keeps spans nested: the window is inside exactly one entry.
        let i = self.entries.iter().position(|e| e.start_ms <= start_ms && e.end_ms >= end_ms).unwrap_or(0);
        &mut self.entries[i]
    }

    /// Keeps at most `max` entries by merging the adjacent pair spanning
    /// the least time (the older pair on ties).
    fn bound(&mut self, max: usize) {
        while self.entries.len() > max.max(1) {
            let mut best = 0;
            let mut best_span = u64::MAX;
            for i in 0..self.entries.len() - 1 {
                let span = self.entries[i + 1].end_ms.saturating_sub(self.entries[i].start_ms);
                if span < best_span {
                    best = i;
                    best_span = span;
                }
            }
            if let Some(later) = self.entries.remove(best + 1) {
                self.entries[best].absorb(&later);
            }
        }
    }

    fn prune(&mut self, now: u64) {
        while self.entries.front().is_some_and(|e| e.received_ms + RETENTION_MS < now) {
            self.entries.pop_front();
        }
    }
}

/// What the fleet knows of one device.
#[derive(Debug, Default)]
struct DeviceObs {
    latest: Option<Latest>,
    series: Vec<Series>,
}

/// The device's latest telemetry.
#[derive(Clone, Debug)]
struct Latest {
    model: Option<(String, String)>,
    status: Status,
    committed: bool,
    drift: Option<DriftSummary>,
    received_ms: u64,
    window_end_ms: u64,
}

/// A device's latest drift verdict, for the device list and the dashboard.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DeviceDrift {
    pub model: Option<String>,
    pub version: Option<String>,
    /// `None`: the device's model has no drift monitor (or no model serves).
    pub drift: Option<bool>,
    pub score: Option<f64>,
    pub flagged: Vec<String>,
    pub samples: u64,
    /// When the fleet received that telemetry (server clock).
    pub received_unix_ms: u64,
    /// The end of its window (device clock).
    pub window_end_unix_ms: u64,
    /// The telemetry's status and committed flag.
    pub status: String,
    pub committed: bool,
}

/// Fleet-wide merged sketches of one reference of one version.
#[derive(Debug)]
struct FleetSketch {
    /// (bucket index = received_ms / FLEET_BUCKET_MS, merged sketch, devices).
    buckets: VecDeque<(u64, DeviceSketch, HashSet<String>)>,
    lifetime: DeviceSketch,
    lifetime_devices: HashSet<String>,
    latency: LatencySketch,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, DeviceObs>,
    /// (model, version) → sketches per reference fingerprint.
    fleet: HashMap<(String, String), Vec<FleetSketch>>,
    /// Devices whose latest verdict says drift (for the gauge and summary).
    drifting: HashSet<String>,
    telemetry_recorded: u64,
    sketches_recorded: u64,
}

/// Which fleet-wide merge the drift view judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The last [`FLEET_BUCKETS`] × [`FLEET_BUCKET_MS`] (an hour).
    Recent,
    /// Everything since the server started.
    Lifetime,
}

/// Sketches of every device on one version, merged, for the drift view.
#[derive(Clone, Debug)]
pub struct MergedSketch {
    pub sketch: DeviceSketch,
    /// Devices whose sketches are in it.
    pub devices: Vec<String>,
    pub latency: LatencySketch,
}

/// The fleet's memory of device telemetry and sketches (module docs).
pub struct Observations {
    state: Mutex<State>,
    alerts: Mutex<Option<AlertSink>>,
    references: Mutex<Option<ReferenceSource>>,
}

impl Default for Observations {
    fn default() -> Self {
        Observations::new()
    }
}

impl Observations {
    pub fn new() -> Observations {
        Observations { state: Mutex::new(State::default()), alerts: Mutex::new(None), references: Mutex::new(None) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves at worst one half-recorded
        // window: keep serving rather than poisoning every gate.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where drift alerts go (the fleet publishes them on MQTT).
    pub fn set_alert_sink(&self, sink: AlertSink) {
        *self.alerts.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// How to find a version's reference sketch (the fleet reads manifests).
    /// Without one, canary analysis compares prediction histograms only
    /// between versions with the same reference.
    pub fn set_reference_source(&self, source: ReferenceSource) {
        *self.references.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// The reference sketch of `model@version`, if a source is set and knows it.
    pub fn reference(&self, model: &str, version: &str) -> Option<Arc<ReferenceSketch>> {
        self.references.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|f| f(model, version))
    }

    pub fn record_telemetry(&self, device: &str, t: &Telemetry) {
        self.record_telemetry_at(device, t, now_ms());
    }

    /// [`record_telemetry`](Self::record_telemetry) with the server clock given (tests).
    pub fn record_telemetry_at(&self, device: &str, t: &Telemetry, now: u64) {
        let alert = {
            let mut st = self.state();
            st.telemetry_recorded += 1;
            let obs = st.devices.entry(device.to_string()).or_default();
            let was_drifting = obs.latest.as_ref().and_then(|l| l.drift.as_ref()).is_some_and(|d| d.drift);
            let was_model = obs.latest.as_ref().and_then(|l| l.model.clone());
            let model = t.model.as_ref().map(|m| (m.name.clone(), m.version.clone()));
            obs.latest = Some(Latest {
                model: model.clone(),
                status: t.status,
                committed: t.committed,
                drift: t.drift.clone(),
                received_ms: now,
                window_end_ms: t.window_end_unix_ms,
            });
            if let Some((name, version)) = &model {
                let series = series_mut(obs, name, version, now);
                let e = series.entry(t.window_start_unix_ms, t.window_end_unix_ms, now);
                e.telemetry_windows = e.telemetry_windows.saturating_add(1);
                // Saturating, then capped to what one device can serve in
                // the entry's span (crate::contribution): the same window
                // sent again, or a claim of u64::MAX, adds nothing past it.
                let counts = (
                    e.requests.saturating_add(t.requests),
                    e.input_errors.saturating_add(t.input_errors),
                    e.failures.saturating_add(t.failures),
                );
                (e.requests, e.input_errors, e.failures) =
                    contribution::clamp_counts(counts, contribution::window_cap(e.start_ms, e.end_ms));
                e.telemetry_p99_ms = max_opt(e.telemetry_p99_ms, t.latency_p99_ms.filter(|v| v.is_finite()));
                e.drift_score = max_opt(e.drift_score, t.drift.as_ref().map(|d| d.score).filter(|v| v.is_finite()));
                e.committed = t.committed;
            }
            obs.series.iter_mut().for_each(|s| s.prune(now));
            obs.series.retain(|s| !s.entries.is_empty());
            let drifting = t.drift.as_ref().is_some_and(|d| d.drift);
            if drifting {
                st.drifting.insert(device.to_string());
            } else {
                st.drifting.remove(device);
            }
            // Once per turn: a verdict that stays true (or a device that
            // switches versions while drifting and stays so) is not news.
            let turned = drifting && (!was_drifting || was_model != model);
            match (turned, &model, &t.drift) {
                (true, Some((name, version)), Some(d)) => Some(DriftAlert {
                    kind: "drift",
                    device: device.to_string(),
                    model: name.clone(),
                    version: version.clone(),
                    flagged: d.flagged.clone(),
                    score: if d.score.is_finite() { d.score } else { 0.0 },
                    samples: d.samples,
                    at_unix_ms: now,
                }),
                _ => None,
            }
        };
        if let Some(a) = alert {
            log::warn!("drift: device {} on {}@{}: {} (score {:.2})", a.device, a.model, a.version, a.flagged.join(", "), a.score);
            if let Some(sink) = self.alerts.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                sink(&a);
            }
        }
    }

    pub fn record_sketch(&self, device: &str, s: &SketchMessage) {
        self.record_sketch_at(device, s, now_ms());
    }

    /// [`record_sketch`](Self::record_sketch) with the server clock given (tests).
    pub fn record_sketch_at(&self, device: &str, s: &SketchMessage, now: u64) {
        // With a reference source (the server), drift counts are kept only
        // if they fit the published version's reference: a device cannot
        // make the fleet hold or merge sketches of any other shape or size.
        let has_source = self.references.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let drift = match (&s.drift, has_source) {
            (Some(d), true) => match self.reference(&s.model.name, &s.model.version) {
                Some(r) => match d.check_against(&r) {
                    Ok(()) => Some(d),
                    Err(e) => {
                        log::warn!("observations: {device}'s sketch of {}: {e}; drift counts ignored", s.model);
                        None
                    }
                },
                None => {
                    log::warn!("observations: {device} sent a sketch of {}, which is not published; drift counts ignored", s.model);
                    None
                }
            },
            (d, _) => d.as_ref(),
        };
        let mut st = self.state();
        st.sketches_recorded += 1;
        let (name, version) = (&s.model.name, &s.model.version);
        let obs = st.devices.entry(device.to_string()).or_default();
        let series = series_mut(obs, name, version, now);
        let e = series.entry(s.window_start_unix_ms, s.window_end_unix_ms, now);
        e.latency.merge(&s.latency);
        contribution::clamp_sketch(&mut e.latency, contribution::window_cap(e.start_ms, e.end_ms));
        if let Some(d) = drift {
            let outputs = Outputs(DeviceSketch { reference: d.reference, features: Vec::new(), outputs: d.outputs.clone(), span: d.span });
            merge_outputs(&mut e.outputs, Some(&outputs));
        }
        let Some(d) = drift else { return };
        let groups = st.fleet.entry((name.clone(), version.clone())).or_default();
        let group = match groups.iter().position(|g| g.lifetime.reference == d.reference) {
            Some(i) => &mut groups[i],
            None => {
                if groups.len() >= MAX_FINGERPRINTS {
                    log::warn!("observations: {device} sent a sketch of {name}@{version} over a fifth reference; ignored");
                    return;
                }
                let mut empty = d.clone();
                empty.clear();
                groups.push(FleetSketch {
                    buckets: VecDeque::new(),
                    lifetime: empty,
                    lifetime_devices: HashSet::new(),
                    latency: LatencySketch::default(),
                });
                let last = groups.len() - 1;
                &mut groups[last]
            }
        };
        if let Err(e) = group.lifetime.merge(d) {
            log::warn!("observations: sketch of {device} for {name}@{version} not merged: {e}");
            return;
        }
        group.lifetime_devices.insert(device.to_string());
        group.latency.merge(&s.latency);
        let bucket = now / FLEET_BUCKET_MS;
        if group.buckets.back().map(|b| b.0) != Some(bucket) {
            let mut empty = d.clone();
            empty.clear();
            group.buckets.push_back((bucket, empty, HashSet::new()));
        }
        while group.buckets.front().is_some_and(|b| b.0 + (FLEET_BUCKETS as u64) <= bucket) {
            group.buckets.pop_front();
        }
        if let Some((_, sketch, devices)) = group.buckets.back_mut() {
            // Same reference and layout as the lifetime merge just accepted.
            let _ = sketch.merge(d);
            devices.insert(device.to_string());
        }
    }

    /// Sum of `device`'s telemetry windows for model@version that end at or after `since_unix_ms`.
    ///
    /// `None` when the device sent nothing for that version in that time.
    /// `committed` is the latest window's; `last_report_unix_ms` is when the
    /// fleet received the latest one (server clock).
    pub fn device_window(&self, device: &str, model: &str, version: &str, since_unix_ms: u64) -> Option<DeviceWindow> {
        let st = self.state();
        let series = st.devices.get(device)?.series.iter().find(|s| s.model == model && s.version == version)?;
        window_of(series, since_unix_ms)
    }

    /// Canary analysis: stage devices on `canary_version` vs `baseline` devices on `baseline_version`, same window.
    ///
    /// Metrics (see [`crate::canary`] for the statistics): error rate,
    /// latency p50 and p99 from the merged latency sketches, and the
    /// prediction distribution of each model output. A metric with no data
    /// on either side is left out.
    pub fn compare(
        &self,
        model: &str,
        canaries: &[String],
        canary_version: &str,
        baseline: &[String],
        baseline_version: &str,
        since_unix_ms: u64,
    ) -> CanaryReport {
        let (c, b) = {
            let st = self.state();
            (
                Group::sum(&st, model, canaries, canary_version, since_unix_ms),
                Group::sum(&st, model, baseline, baseline_version, since_unix_ms),
            )
        };
        let mut metrics = Vec::new();
        metrics.extend(canary::error_rate((c.bad, c.total), (b.bad, b.total)));
        metrics.extend(canary::latency("latency_p50_ms", 0.5, &c.latency, &b.latency));
        metrics.extend(canary::latency("latency_p99_ms", 0.99, &c.latency, &b.latency));
        if let (Some(co), Some(bo)) = (&c.outputs, &b.outputs) {
            metrics.extend(self.compare_outputs(model, canary_version, co, baseline_version, bo));
        }
        let worse = metrics.iter().any(|m| m.significantly_worse);
        log::debug!("canary {model}: {} canaries on {canary_version}, {} baseline devices on {baseline_version} reported", c.devices, b.devices);
        CanaryReport { metrics, worse }
    }

    fn compare_outputs(&self, model: &str, cv: &str, c: &DeviceSketch, bv: &str, b: &DeviceSketch) -> Vec<CanaryMetric> {
        let same_reference = c.reference == b.reference;
        let refs = if same_reference { None } else { self.reference(model, cv).zip(self.reference(model, bv)) };
        let n = c.outputs.len().min(b.outputs.len());
        let mut out = Vec::new();
        for i in 0..n {
            let (cc, bc) = (&c.outputs[i], &b.outputs[i]);
            match (&refs, same_reference) {
                (_, true) => out.extend(canary::predictions(&format!("output{i}"), cc, bc, n)),
                (Some((rc, rb)), false) => {
                    let (Some(col_c), Some(col_b)) = (rc.outputs.get(i), rb.outputs.get(i)) else { continue };
                    let name = col_c.name();
                    if col_c.bins() == col_b.bins() && cc.counts.len() == bc.counts.len() {
                        out.extend(canary::predictions(name, cc, bc, n));
                    } else {
                        out.extend(canary::prediction_mean(name, cc, bc, col_c.shift(), col_b.shift()));
                    }
                }
                (None, false) => {}
            }
        }
        // Name outputs by the reference when it is known.
        if same_reference {
            if let Some(r) = self.reference(model, cv) {
                for (m, col) in out.iter_mut().zip(r.outputs.iter()) {
                    m.name = format!("predictions:{}", col.name());
                }
            }
        }
        out
    }

    /// The latest drift verdict of `device`.
    pub fn device_drift(&self, device: &str) -> Option<DeviceDrift> {
        let st = self.state();
        let l = st.devices.get(device)?.latest.as_ref()?;
        Some(DeviceDrift {
            model: l.model.as_ref().map(|m| m.0.clone()),
            version: l.model.as_ref().map(|m| m.1.clone()),
            drift: l.drift.as_ref().map(|d| d.drift),
            score: l.drift.as_ref().map(|d| d.score),
            flagged: l.drift.as_ref().map(|d| d.flagged.clone()).unwrap_or_default(),
            samples: l.drift.as_ref().map(|d| d.samples).unwrap_or(0),
            received_unix_ms: l.received_ms,
            window_end_unix_ms: l.window_end_ms,
            status: l.status.as_str().to_string(),
            committed: l.committed,
        })
    }

    /// Devices whose latest telemetry, for `model@version` when given, says drift.
    pub fn drifting_devices(&self, model_version: Option<(&str, &str)>) -> Vec<String> {
        let st = self.state();
        let mut ids: Vec<String> = st
            .drifting
            .iter()
            .filter(|id| match model_version {
                None => true,
                Some((m, v)) => st
                    .devices
                    .get(id.as_str())
                    .and_then(|d| d.latest.as_ref())
                    .and_then(|l| l.model.as_ref())
                    .is_some_and(|(lm, lv)| lm == m && lv == v),
            })
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// The fleet-wide merged sketch of `model@version` over `fingerprint`.
    pub fn merged_sketch(&self, model: &str, version: &str, fingerprint: [u8; 8], scope: Scope) -> Option<MergedSketch> {
        self.merged_sketch_at(model, version, fingerprint, scope, now_ms())
    }

    /// [`merged_sketch`](Self::merged_sketch) at a given server time (tests).
    pub fn merged_sketch_at(&self, model: &str, version: &str, fingerprint: [u8; 8], scope: Scope, now: u64) -> Option<MergedSketch> {
        let st = self.state();
        let groups = st.fleet.get(&(model.to_string(), version.to_string()))?;
        let g = groups.iter().find(|g| g.lifetime.reference == fingerprint)?;
        let (sketch, devices) = match scope {
            Scope::Lifetime => (g.lifetime.clone(), g.lifetime_devices.clone()),
            Scope::Recent => {
                let current = now / FLEET_BUCKET_MS;
                let mut total = g.lifetime.clone();
                total.clear();
                let mut devices = HashSet::new();
                for (b, s, d) in &g.buckets {
                    if b + (FLEET_BUCKETS as u64) > current {
                        let _ = total.merge(s);
                        devices.extend(d.iter().cloned());
                    }
                }
                (total, devices)
            }
        };
        let mut devices: Vec<String> = devices.into_iter().collect();
        devices.sort();
        Some(MergedSketch { sketch, devices, latency: g.latency.clone() })
    }

    /// Fingerprints of the references devices sent sketches of `model@version` over.
    pub fn fingerprints(&self, model: &str, version: &str) -> Vec<[u8; 8]> {
        let st = self.state();
        st.fleet
            .get(&(model.to_string(), version.to_string()))
            .map(|g| g.iter().map(|g| g.lifetime.reference).collect())
            .unwrap_or_default()
    }

    /// Counts for metrics: (telemetry recorded, sketches recorded, devices drifting).
    pub fn counts(&self) -> (u64, u64, usize) {
        let st = self.state();
        (st.telemetry_recorded, st.sketches_recorded, st.drifting.len())
    }

    /// Devices with anything recorded, and windows held (for the memory test).
    pub fn sizes(&self) -> (usize, usize) {
        let st = self.state();
        let windows = st.devices.values().flat_map(|d| d.series.iter()).map(|s| s.entries.len()).sum();
        (st.devices.len(), windows)
    }

    /// Windows held for (device, model, version): `(start, end)` each, oldest first.
    pub fn window_spans(&self, device: &str, model: &str, version: &str) -> Vec<(u64, u64)> {
        let st = self.state();
        st.devices
            .get(device)
            .and_then(|d| d.series.iter().find(|s| s.model == model && s.version == version))
            .map(|s| s.entries.iter().map(|e| (e.start_ms, e.end_ms)).collect())
            .unwrap_or_default()
    }
}

/// The device's series for `model@version`, made (evicting the least
/// recently reported version past the bound) if new.
fn series_mut<'a>(obs: &'a mut DeviceObs, model: &str, version: &str, now: u64) -> &'a mut Series {
    if let Some(i) = obs.series.iter().position(|s| s.model == model && s.version == version) {
        return &mut obs.series[i];
    }
    if obs.series.len() >= MAX_VERSIONS_PER_DEVICE {
        if let Some(oldest) = obs.series.iter().enumerate().min_by_key(|(_, s)| s.last_received_ms).map(|(i, _)| i) {
            obs.series.remove(oldest);
        }
    }
    obs.series.push(Series { model: model.into(), version: version.into(), entries: VecDeque::new(), last_received_ms: now });
    let last = obs.series.len() - 1;
    &mut obs.series[last]
}

fn window_of(series: &Series, since_unix_ms: u64) -> Option<DeviceWindow> {
    let mut w = DeviceWindow::default();
    let mut any = false;
    let mut latest_telemetry_end = 0;
    for e in series.entries.iter().filter(|e| e.end_ms >= since_unix_ms) {
        any = true;
        w.requests = w.requests.saturating_add(e.requests);
        w.input_errors = w.input_errors.saturating_add(e.input_errors);
        w.failures = w.failures.saturating_add(e.failures);
        w.latency.merge(&e.latency);
        w.latency_p99_ms = max_opt(w.latency_p99_ms, e.telemetry_p99_ms);
        w.drift_score = max_opt(w.drift_score, e.drift_score);
        w.last_report_unix_ms = w.last_report_unix_ms.max(e.received_ms);
        w.windows = w.windows.saturating_add(e.telemetry_windows);
        if e.telemetry_windows > 0 && e.end_ms >= latest_telemetry_end {
            latest_telemetry_end = e.end_ms;
            w.committed = e.committed;
        }
    }
    any.then_some(w)
}

/// One side of a canary comparison: its devices' numbers pooled with
/// capped weights ([`crate::contribution`]), so one device cannot decide
/// the comparison with its volume.
#[derive(Default)]
struct Group {
    bad: u64,
    total: u64,
    latency: LatencySketch,
    outputs: Option<DeviceSketch>,
    devices: usize,
}

impl Group {
    fn sum(st: &State, model: &str, ids: &[String], version: &str, since: u64) -> Group {
        let mut g = Group::default();
        let mut contributions = Vec::new();
        for id in ids {
            let Some(series) =
                st.devices.get(id.as_str()).and_then(|d| d.series.iter().find(|s| s.model == model && s.version == version))
            else {
                continue;
            };
            let Some(w) = window_of(series, since) else { continue };
            contributions.push(w.contribution());
            for e in series.entries.iter().filter(|e| e.end_ms >= since) {
                if let Some(o) = &e.outputs {
                    match &mut g.outputs {
                        None => g.outputs = Some(o.0.clone()),
                        Some(acc) => {
                            let _ = acc.merge(&o.0);
                        }
                    }
                }
            }
            g.devices += 1;
        }
        let pooled = contribution::pool(&contributions);
        (g.bad, g.total, g.latency) = (pooled.bad, pooled.total, pooled.latency);
        g
    }
}

/// One device's telemetry for one version, summed over recent windows.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DeviceWindow {
    pub requests: u64,
    pub input_errors: u64,
    pub failures: u64,
    /// Merged latency histogram of the windows' sketches.
    pub latency: LatencySketch,
    /// Largest p99 the windows' telemetry reported (ms).
    pub latency_p99_ms: Option<f64>,
    /// Largest drift score the windows' telemetry reported.
    pub drift_score: Option<f64>,
    pub last_report_unix_ms: u64,
    pub committed: bool,
    /// Telemetry windows summed.
    pub windows: u32,
}

impl DeviceWindow {
    /// What this device brings to a pooled figure ([`crate::contribution`]).
    pub fn contribution(&self) -> Contribution {
        let bad = self.input_errors.saturating_add(self.failures);
        Contribution { bad, total: self.requests.saturating_add(bad), latency: self.latency.clone() }
    }

    /// (input_errors + failures) / (requests + input_errors + failures): client errors count.
    pub fn error_rate(&self) -> f64 {
        let bad = self.input_errors.saturating_add(self.failures);
        let total = self.requests.saturating_add(bad);
        if total == 0 {
            0.0
        } else {
            bad as f64 / total as f64
        }
    }

    /// p99 latency (ms): from the merged sketch when sketches arrived (the
    /// upper edge of the log2 bucket), else the largest telemetry p99.
    pub fn p99_ms(&self) -> Option<f64> {
        self.latency.quantile_us(0.99).map(|us| us as f64 / 1000.0).or(self.latency_p99_ms)
    }
}

/// The canary analysis of a rollout stage.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CanaryReport {
    pub metrics: Vec<CanaryMetric>,
    /// true if any metric is significantly worse on the canaries
    pub worse: bool,
}

/// One metric, canaries vs baseline, with the interval of the difference
/// (canary − baseline; positive is worse). An interval end with no bound
/// is ±∞ (`null` in JSON).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CanaryMetric {
    pub name: String,
    pub canary: f64,
    pub baseline: f64,
    pub difference: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub significantly_worse: bool,
}
