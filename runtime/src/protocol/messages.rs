//! The bodies devices publish: state (retained JSON), telemetry (JSON) and
//! sketches (postcard). Each travels inside a
//! [`DeviceSigned`](super::DeviceSigned) envelope.

use serde::{Deserialize, Serialize};

use super::device::{DeviceMessage, Encoding};
use super::{check_text, DeviceSigned, Limits, ProtocolError};
use crate::drift::DeviceSketch;

/// The state format this build writes and reads.
pub const STATE_FORMAT: u32 = 1;
/// The telemetry format this build writes and reads.
pub const TELEMETRY_FORMAT: u32 = 1;
/// The sketch message format this build writes and reads.
pub const SKETCH_FORMAT: u32 = 1;

/// The last will a device registers on its `state` topic (retained): the
/// broker publishes it when the connection drops. Unsigned — see the module
/// docs of [`protocol`](super).
pub const OFFLINE_WILL: &[u8] = br#"{"status":"offline"}"#;

/// Where a device is in the update lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Started, no model yet (first boot before any directive).
    Idle,
    /// Fetching a bundle.
    Downloading,
    /// All bytes in, final checks running.
    Verifying,
    /// Writing the slot, loading, self-testing, switching.
    Activating,
    /// Serving the new version on trial.
    Probation,
    /// Serving a committed version, nothing pending.
    Serving,
    /// Gave up on a new version and went back to the previous one by itself
    /// (`rollback_reason` says why).
    RolledBack,
    /// The last directive could not be carried out (`last_error` says why);
    /// the device serves what it had.
    Failed,
    /// Only ever in the last will.
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Idle => "idle",
            Status::Downloading => "downloading",
            Status::Verifying => "verifying",
            Status::Activating => "activating",
            Status::Probation => "probation",
            Status::Serving => "serving",
            Status::RolledBack => "rolled_back",
            Status::Failed => "failed",
            Status::Offline => "offline",
        }
    }
}

/// A model version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// The device's retained state on `devices/{id}/state` (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Always [`STATE_FORMAT`].
    pub format: u32,
    pub status: Status,
    /// The model serving now (name, version), `None` before the first one.
    pub model: Option<String>,
    pub version: Option<String>,
    /// sha256 (hex) of the serving bundle file.
    pub bundle_sha256: Option<String>,
    /// Whether the serving version passed probation. Only a committed
    /// version counts as a success to the fleet.
    pub committed: bool,
    /// The last directive sequence the device accepted.
    pub directive_sequence: u64,
    /// What the device is working towards (the accepted directive), when it
    /// differs from what serves.
    pub target: Option<ModelRef>,
    /// The rollout of the accepted directive.
    pub rollout_id: Option<String>,
    /// Download progress: bytes verified so far and the total.
    pub progress: Option<(u64, u64)>,
    /// Why the last directive or step failed (a refusal, a download error).
    pub last_error: Option<String>,
    /// Why the device rolled back by itself.
    pub rollback_reason: Option<String>,
    /// The version it rolled back from.
    pub rolled_back_from: Option<ModelRef>,
    /// The device's hardware tags (from its config).
    pub tags: Vec<String>,
    /// The agent's own version.
    pub agent_version: String,
    /// Unix seconds.
    pub updated_at: u64,
}

impl DeviceState {
    /// An empty state with `status`.
    pub fn new(status: Status) -> DeviceState {
        DeviceState {
            format: STATE_FORMAT,
            status,
            model: None,
            version: None,
            bundle_sha256: None,
            committed: false,
            directive_sequence: 0,
            target: None,
            rollout_id: None,
            progress: None,
            last_error: None,
            rollback_reason: None,
            rolled_back_from: None,
            tags: Vec::new(),
            agent_version: String::new(),
            updated_at: crate::bundle::unix_now(),
        }
    }
}

impl DeviceMessage for DeviceState {
    const KIND: &'static str = "state";
    const ENCODING: Encoding = Encoding::Json;
    const FORMAT: u32 = STATE_FORMAT;

    fn max_bytes(limits: &Limits) -> u64 {
        limits.state_bytes as u64
    }

    fn validate(&self, limits: &Limits) -> Result<(), String> {
        for (what, text) in [
            ("last error", &self.last_error),
            ("rollback reason", &self.rollback_reason),
            ("rollout id", &self.rollout_id),
        ] {
            if let Some(t) = text {
                check_text(what, t, limits)?;
            }
        }
        if self.tags.len() > limits.list_items as usize {
            return Err(format!("{} tags, over the limit of {}", self.tags.len(), limits.list_items));
        }
        Ok(())
    }
}

/// What arrives on a `state` topic: a signed state, or the broker's
/// unsigned last will.
#[derive(Debug)]
pub enum StatePayload {
    Signed(DeviceSigned<DeviceState>),
    /// The last will: the connection dropped.
    Offline,
    /// An empty retained message (someone cleared the topic).
    Cleared,
}

/// Tells the signed state from the last will.
pub fn parse_state_payload(bytes: &[u8], limits: &Limits) -> Result<StatePayload, ProtocolError> {
    if bytes.is_empty() {
        return Ok(StatePayload::Cleared);
    }
    if bytes == OFFLINE_WILL {
        return Ok(StatePayload::Offline);
    }
    DeviceSigned::from_bytes(bytes, limits).map(StatePayload::Signed)
}

/// Drift verdicts of the window, for telemetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftSummary {
    /// Any column flagged.
    pub drift: bool,
    /// Largest column score (≥ 1 means drift).
    pub score: f64,
    /// Names of the flagged columns.
    pub flagged: Vec<String>,
    /// Samples in the judged window.
    pub samples: u64,
}

/// Periodic telemetry on `devices/{id}/telemetry` (JSON). Counters cover
/// the window `[window_start, window_end)` (unix ms) and one model version,
/// named in the message: a window never mixes two versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Always [`TELEMETRY_FORMAT`].
    pub format: u32,
    /// The model version these figures belong to (`None`: no model served).
    pub model: Option<ModelRef>,
    pub status: Status,
    pub committed: bool,
    pub window_start_unix_ms: u64,
    pub window_end_unix_ms: u64,
    /// Prediction requests answered 200.
    pub requests: u64,
    /// Requests refused as bad input (4xx).
    pub input_errors: u64,
    /// Requests the model failed on (5xx).
    pub failures: u64,
    /// Samples predicted.
    pub rows: u64,
    /// failures / (requests + failures).
    pub error_rate: f64,
    /// Upper bounds (log2 buckets) of request latency quantiles, ms.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub drift: Option<DriftSummary>,
    /// Resident memory of the agent process, bytes (Linux).
    pub memory_rss_bytes: Option<u64>,
    /// Telemetry and sketch messages dropped from the offline buffer since
    /// the agent started (oldest first, when the buffer was full).
    pub dropped_while_offline: u64,
    pub uptime_secs: u64,
}

impl DeviceMessage for Telemetry {
    const KIND: &'static str = "telemetry";
    const ENCODING: Encoding = Encoding::Json;
    const FORMAT: u32 = TELEMETRY_FORMAT;

    fn max_bytes(limits: &Limits) -> u64 {
        limits.telemetry_bytes as u64
    }

    fn validate(&self, limits: &Limits) -> Result<(), String> {
        if let Some(d) = &self.drift {
            if d.flagged.len() > limits.list_items as usize {
                return Err(format!("{} flagged columns, over the limit of {}", d.flagged.len(), limits.list_items));
            }
        }
        Ok(())
    }
}

/// Request latency counts in log2 buckets: bucket `i` counts latencies in
/// `[2^i, 2^(i+1))` µs (bucket 0 also holds < 1 µs). Mergeable by adding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySketch {
    pub buckets_log2_us: Vec<u64>,
}

impl LatencySketch {
    pub fn merge(&mut self, other: &LatencySketch) {
        if self.buckets_log2_us.len() < other.buckets_log2_us.len() {
            self.buckets_log2_us.resize(other.buckets_log2_us.len(), 0);
        }
        for (a, b) in self.buckets_log2_us.iter_mut().zip(&other.buckets_log2_us) {
            *a += *b;
        }
    }

    /// Upper bound of the `q` quantile, in µs.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets_log2_us.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets_log2_us.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(1u64 << (i + 1).min(63));
            }
        }
        None
    }
}

/// Mergeable sketches of one window on `devices/{id}/sketch` (postcard).
/// Field order is the encoding order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SketchMessage {
    /// Always [`SKETCH_FORMAT`]; first.
    pub format: u32,
    /// The version the sketches belong to: the fleet merges only equal ones.
    pub model: ModelRef,
    pub window_start_unix_ms: u64,
    pub window_end_unix_ms: u64,
    /// Drift counts over the manifest's reference bins (`None` when the
    /// model has no drift monitor).
    pub drift: Option<DeviceSketch>,
    pub latency: LatencySketch,
}

impl DeviceMessage for SketchMessage {
    const KIND: &'static str = "sketch";
    const ENCODING: Encoding = Encoding::Postcard;
    const FORMAT: u32 = SKETCH_FORMAT;

    fn max_bytes(limits: &Limits) -> u64 {
        limits.sketch_bytes as u64
    }

    fn validate(&self, _limits: &Limits) -> Result<(), String> {
        if self.latency.buckets_log2_us.len() > 64 {
            return Err("more than 64 latency buckets".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::SecretKey;

    #[test]
    fn state_json_shape_is_readable() {
        let mut s = DeviceState::new(Status::RolledBack);
        s.rollback_reason = Some("self-test failed".into());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["status"], "rolled_back");
        assert_eq!(v["format"], 1);
        assert_eq!(serde_json::from_value::<DeviceState>(v).unwrap(), s);
    }

    #[test]
    fn will_and_signed_state_are_told_apart() {
        let l = Limits::default();
        assert!(matches!(parse_state_payload(OFFLINE_WILL, &l), Ok(StatePayload::Offline)));
        assert!(matches!(parse_state_payload(b"", &l), Ok(StatePayload::Cleared)));
        let key = SecretKey::from_seed([1; 32]);
        let bytes = DeviceSigned::sign("d", 1, &DeviceState::new(Status::Idle), &key).unwrap().to_bytes();
        assert!(matches!(parse_state_payload(&bytes, &l), Ok(StatePayload::Signed(_))));
        assert!(parse_state_payload(b"{\"status\":\"serving\"}", &l).is_err());
    }

    #[test]
    fn long_texts_are_refused() {
        let key = SecretKey::from_seed([1; 32]);
        let mut s = DeviceState::new(Status::Failed);
        s.last_error = Some("x".repeat(5000));
        assert!(DeviceSigned::sign("d", 1, &s, &key).is_err());
    }

    #[test]
    fn sketch_message_round_trip_and_format_check() {
        let key = SecretKey::from_seed([1; 32]);
        let m = SketchMessage {
            format: SKETCH_FORMAT,
            model: ModelRef { name: "m".into(), version: "1.0.0".into() },
            window_start_unix_ms: 1,
            window_end_unix_ms: 2,
            drift: None,
            latency: LatencySketch { buckets_log2_us: vec![0, 3, 1] },
        };
        let l = Limits::default();
        let bytes = DeviceSigned::sign("d", 3, &m, &key).unwrap().to_bytes();
        let back = DeviceSigned::<SketchMessage>::from_bytes(&bytes, &l).unwrap();
        assert_eq!(back.open("d", &key.public_key(), Some(2), &l).unwrap(), m);
        assert_eq!(m.latency.quantile_us(0.5), Some(4));
        let mut future = m.clone();
        future.format = 2;
        let bytes = DeviceSigned::sign("d", 4, &future, &key).unwrap().to_bytes();
        let back = DeviceSigned::<SketchMessage>::from_bytes(&bytes, &l).unwrap();
        assert!(matches!(back.open("d", &key.public_key(), None, &l), Err(ProtocolError::UnknownFormat { .. })));
    }
}
