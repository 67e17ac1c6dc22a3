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

/// The will format this build writes and reads.
pub const WILL_FORMAT: u32 = 1;

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
    /// Only ever in a [`DeviceWill`].
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

/// The last will a device registers on its `state` topic (retained, QoS 1),
/// signed like everything else it says: before every (re)connection the
/// agent reserves a fresh counter for it and signs it with the device key,
/// so the broker can publish it when the connection drops and the fleet can
/// still tell it from a forgery or a replay (a will is accepted only with a
/// counter above the last will counter accepted). The agent also publishes
/// one itself when it says goodbye cleanly (a clean DISCONNECT suppresses
/// the broker's). Its own kind, so its counter is tracked apart from
/// state's: a will signed at connect time carries a counter below the
/// states the session then published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceWill {
    /// Always [`WILL_FORMAT`].
    pub format: u32,
    /// Always [`Status::Offline`].
    pub status: Status,
}

impl DeviceWill {
    /// The one will there is: "this device's connection is gone". The
    /// agent and the fleet simulator both build theirs with this.
    pub fn offline() -> DeviceWill {
        DeviceWill { format: WILL_FORMAT, status: Status::Offline }
    }

    /// [`offline`](Self::offline), signed by `key` as device `device_id`
    /// with `counter` (reserved for this will from the device's counter).
    pub fn signed(
        device_id: &str,
        counter: u64,
        key: &crate::bundle::SecretKey,
    ) -> Result<DeviceSigned<DeviceWill>, ProtocolError> {
        DeviceSigned::sign(device_id, counter, &DeviceWill::offline(), key)
    }
}

impl DeviceMessage for DeviceWill {
    const KIND: &'static str = "will";
    const ENCODING: Encoding = Encoding::Json;
    const FORMAT: u32 = WILL_FORMAT;

    fn max_bytes(limits: &Limits) -> u64 {
        limits.state_bytes as u64
    }

    fn validate(&self, _limits: &Limits) -> Result<(), String> {
        if self.status != Status::Offline {
            return Err(format!("a will says \"offline\", not {:?}", self.status.as_str()));
        }
        Ok(())
    }
}

/// What arrives on a `state` topic: a signed state, a signed last will, or
/// an empty retained message. Nothing unsigned.
#[derive(Debug)]
pub enum StatePayload {
    Signed(DeviceSigned<DeviceState>),
    /// The signed last will: the connection dropped (or the device said
    /// goodbye). Believe it only once [`DeviceSigned::open`] passed with the
    /// last accepted *will* counter.
    Will(DeviceSigned<DeviceWill>),
    /// An empty retained message (someone cleared the topic).
    Cleared,
}

/// Tells a signed state from a signed will by the envelope's `kind` (size
/// checked first). Anything unsigned — such as the old
/// `{"status":"offline"}` will — is refused.
pub fn parse_state_payload(bytes: &[u8], limits: &Limits) -> Result<StatePayload, ProtocolError> {
    if bytes.is_empty() {
        return Ok(StatePayload::Cleared);
    }
    super::check_size("state", bytes, limits.state_bytes as u64)?;
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let kind = serde_json::from_slice::<Kind>(bytes)
        .map_err(|e| ProtocolError::Malformed { what: "state", reason: e.to_string() })?
        .kind;
    match kind.as_deref() {
        Some(k) if k == DeviceWill::KIND => DeviceSigned::from_bytes(bytes, limits).map(StatePayload::Will),
        Some(k) if k == DeviceState::KIND => DeviceSigned::from_bytes(bytes, limits).map(StatePayload::Signed),
        Some(other) => Err(ProtocolError::Malformed { what: "state", reason: format!("kind {other:?} on a state topic") }),
        None => Err(ProtocolError::Malformed {
            what: "state",
            reason: "not a device-signed envelope (unsigned messages are refused)".into(),
        }),
    }
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
        // Saturating: the counts come from devices, and a device that claims
        // u64::MAX must not overflow the fleet's sum (a panic in a debug
        // build, a wrap to a tiny count in release).
        for (a, b) in self.buckets_log2_us.iter_mut().zip(&other.buckets_log2_us) {
            *a = a.saturating_add(*b);
        }
    }

    /// Every count in the sketch, added (saturating).
    pub fn total(&self) -> u64 {
        self.buckets_log2_us.iter().fold(0u64, |t, n| t.saturating_add(*n))
    }

    /// The same shape with every count scaled by `factor` (0..=1), rounded
    /// down but keeping a non-empty bucket non-empty: how the fleet caps
    /// what one device's sketch weighs in a merge.
    pub fn scaled(&self, factor: f64) -> LatencySketch {
        let factor = if factor.is_finite() { factor.clamp(0.0, 1.0) } else { 0.0 };
        let buckets = self
            .buckets_log2_us
            .iter()
            .map(|&n| if n == 0 { 0 } else { ((n as f64 * factor) as u64).max(1) })
            .collect();
        LatencySketch { buckets_log2_us: buckets }
    }

    /// Upper bound of the `q` quantile, in µs.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, n) in self.buckets_log2_us.iter().enumerate() {
            seen = seen.saturating_add(*n);
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
        assert!(matches!(parse_state_payload(b"", &l), Ok(StatePayload::Cleared)));
        let key = SecretKey::from_seed([1; 32]);
        let bytes = DeviceSigned::sign("d", 1, &DeviceState::new(Status::Idle), &key).unwrap().to_bytes();
        assert!(matches!(parse_state_payload(&bytes, &l), Ok(StatePayload::Signed(_))));
        let will = DeviceWill::signed("d", 2, &key).unwrap().to_bytes();
        let Ok(StatePayload::Will(w)) = parse_state_payload(&will, &l) else { panic!("a signed will") };
        assert_eq!(w.open("d", &key.public_key(), Some(1), &l).unwrap(), DeviceWill::offline());
        // Its own counter sequence: a replayed will is refused.
        assert!(matches!(w.open("d", &key.public_key(), Some(2), &l), Err(ProtocolError::Replay { .. })));
        // Nothing unsigned passes, the old will included.
        for unsigned in [&br#"{"status":"offline"}"#[..], br#"{"status":"serving"}"#, b"offline", br#"{"kind":"telemetry"}"#] {
            assert!(parse_state_payload(unsigned, &l).is_err(), "{}", String::from_utf8_lossy(unsigned));
        }
        // A will that says anything but "offline" cannot even be signed.
        let lying = DeviceSigned::sign("d", 3, &DeviceWill { format: WILL_FORMAT, status: Status::Serving }, &key);
        assert!(lying.is_err());
        // A will cannot pass as a state, nor a state as a will.
        assert!(DeviceSigned::<DeviceState>::from_bytes(&will, &l).is_err());
        assert!(DeviceSigned::<DeviceWill>::from_bytes(&bytes, &l).is_err());
        // Oversized payloads are refused before parsing.
        let tight = Limits { state_bytes: 16, ..l };
        assert!(matches!(parse_state_payload(&will, &tight), Err(ProtocolError::TooLarge { .. })));
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
