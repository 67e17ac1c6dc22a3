//! The fleet-wide views built from [`Observations`]: the drift view of a
//! version (`GET /v1/drift/{name}/{version}`, `outpost-fleet drift`), the
//! device list with each device's latest drift verdict, and the summary
//! dashboards read on MQTT.
//!
//! # The drift view
//!
//! Every device on a version counts its inputs and outputs over the bins of
//! the version's reference sketch (from the signed manifest). Sketches are
//! sums, so the fleet adds them ([`DeviceSketch::merge`]) and judges the
//! fleet-wide sketch with the same code a device judges its window with
//! ([`DriftReport::evaluate`]): the same PSI, JS, KS interval, thresholds,
//! and verdict. By default the last hour is judged (`scope=recent`: what the
//! fleet sees now); `?scope=lifetime` judges everything since the server
//! started. `devices_drifting` lists the devices whose own latest verdict
//! (from their telemetry) says drift — one drifting device among a thousand
//! is diluted in the merge but named here.

use std::collections::BTreeMap;

use outpost_runtime::drift::{ColumnReport, DeviceSketch, DriftReport, TestStatistic, Thresholds};
use serde_json::{json, Value};

use crate::observations::{Observations, Scope};
use crate::server::Fleet;

/// Device ids listed in the MQTT summary at most.
pub const SUMMARY_MAX_IDS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("no published version {0}")]
    UnknownVersion(String),
    #[error("{0}")]
    Internal(String),
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn column_json(c: &ColumnReport) -> Value {
    let mut v = json!({
        "name": c.name,
        "kind": c.kind,
        "drift": c.drift,
        "samples": c.samples,
        "reference_samples": c.reference_samples,
        "psi": c.psi.map(|x| round(x, 6)),
        "js": c.js_distance.map(|x| round(x, 6)),
        "score": c.test.as_ref().map(|t| round(t.score, 4)),
        "threshold": c.test.as_ref().map(|t| round(t.threshold, 6)),
        "mean": c.mean,
        "reference_mean": c.reference_mean,
        "mean_shift_sd": c.mean_shift_sd.map(|x| round(x, 4)),
        "out_of_range": c.out_of_range,
        "nan_count": c.nan_count,
    });
    if let Some(t) = &c.test {
        let key = match t.statistic {
            TestStatistic::Ks => "ks",
            TestStatistic::Tv => "tv",
        };
        v[key] = json!([round(t.lower, 6), round(t.upper, 6)]);
    }
    v
}

/// The drift view of `model@version` (module docs).
pub fn drift_view(obs: &Observations, model: &str, version: &str, scope: Scope) -> Result<Value, ViewError> {
    let target = format!("{model}@{version}");
    let reference = obs.reference(model, version).ok_or_else(|| ViewError::UnknownVersion(target.clone()))?;
    let fingerprint = reference.fingerprint();
    let merged = obs.merged_sketch(model, version, fingerprint, scope);
    let (sketch, devices, latency) = match merged {
        Some(m) => (m.sketch, m.devices, Some(m.latency)),
        None => (DeviceSketch::empty(&reference), Vec::new(), None),
    };
    let report = DriftReport::evaluate(&reference, &sketch, &Thresholds::default())
        .map_err(|e| ViewError::Internal(format!("judging the merged sketch of {target}: {e}")))?;
    // Devices that sent sketches over another reference (another bundle
    // published under this name earlier, say) are not in the merge.
    let other_references = obs.fingerprints(model, version).into_iter().filter(|f| *f != fingerprint).count();
    let q = |p: f64| latency.as_ref().and_then(|l| l.quantile_us(p)).map(|us| us as f64 / 1000.0);
    Ok(json!({
        "model": model,
        "version": version,
        "scope": scope,
        "devices": devices.len(),
        "device_ids": devices,
        "samples": report.window.samples,
        "reference_samples": report.window.reference_samples,
        "window": {"start_unix_ms": report.window.start_unix_ms, "end_unix_ms": report.window.end_unix_ms},
        "drift": report.drift,
        "score": round(report.score, 4),
        "flagged": report.flagged(),
        "thresholds": report.thresholds,
        "features": report.features.iter().map(column_json).collect::<Vec<_>>(),
        "outputs": report.outputs.iter().map(column_json).collect::<Vec<_>>(),
        "devices_drifting": obs.drifting_devices(Some((model, version))),
        "other_references": other_references,
        "latency_p50_ms": q(0.5),
        "latency_p99_ms": q(0.99),
    }))
}

/// The registry's devices, each with its presence hint (`online`) and its
/// latest drift verdict (`drift`: null before any telemetry).
pub fn devices_json(fleet: &Fleet) -> Result<Value, ViewError> {
    let devices = fleet.registry.devices().map_err(|e| ViewError::Internal(e.to_string()))?;
    let list: Vec<Value> = devices
        .iter()
        .map(|d| {
            let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("online".into(), json!(fleet.inbox.online(&d.id)));
                o.insert("drift".into(), json!(fleet.observations.device_drift(&d.id)));
            }
            v
        })
        .collect();
    Ok(json!({ "devices": list }))
}

/// The fleet summary published (retained) on `outpost/v1/fleet/summary`.
pub fn summary(fleet: &Fleet) -> Result<Value, ViewError> {
    let devices = fleet.registry.devices().map_err(|e| ViewError::Internal(e.to_string()))?;
    let (mut online, mut offline, mut unknown) = (0, 0, 0);
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for d in &devices {
        match fleet.inbox.online(&d.id) {
            Some(true) => online += 1,
            Some(false) => offline += 1,
            None => unknown += 1,
        }
        if let (Some(m), Some(v)) = (&d.model, &d.version) {
            *versions.entry(format!("{m}@{v}")).or_default() += 1;
        }
        *statuses.entry(d.status.clone().unwrap_or_else(|| "unknown".into())).or_default() += 1;
    }
    let (telemetry, sketches, _) = fleet.observations.counts();
    // Bounded: the summary must stay far below the MQTT packet limit
    // whatever the fleet's size (the count is exact, the list a sample).
    let mut drifting = fleet.observations.drifting_devices(None);
    let drifting_count = drifting.len();
    drifting.truncate(SUMMARY_MAX_IDS);
    Ok(json!({
        "at_unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "devices": devices.len(),
        "online": online,
        "offline": offline,
        "unknown": unknown,
        "versions": versions,
        "statuses": statuses,
        "drifting": drifting,
        "drifting_count": drifting_count,
        "telemetry_recorded": telemetry,
        "sketches_recorded": sketches,
    }))
}
