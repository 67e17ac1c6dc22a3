//! The MQTT protocol between the fleet server and its devices: topics,
//! message types, their encodings, their size limits and their signatures.
//! The agent (`outpost-agent`) and the fleet server (`outpost-fleet`) both
//! use this module, so the two sides cannot drift apart.
//!
//! # Topics
//!
//! Everything lives under [`ROOT`] = `outpost/v1`; `{id}` is a device id
//! ([`validate_device_id`]). Builders are in [`topics`].
//!
//! | topic | direction | retained | QoS | payload |
//! |---|---|---|---|---|
//! | `devices/{id}/desired` | fleet → device | yes | 1 | [`Directive`] sealed by the online key (postcard [`Envelope`](crate::bundle::Envelope)) |
//! | `devices/{id}/state` | device → fleet | yes | 1 | [`DeviceSigned`]`<`[`DeviceState`]`>` (JSON); last will [`DeviceSigned`]`<`[`DeviceWill`]`>` (JSON) |
//! | `devices/{id}/telemetry` | device → fleet | no | 0/1 | [`DeviceSigned`]`<`[`Telemetry`]`>` (JSON) |
//! | `devices/{id}/sketch` | device → fleet | no | 1 | [`DeviceSigned`]`<`[`SketchMessage`]`>` (postcard) |
//! | `devices/{id}/chunks/request` | device → fleet | no | 1 | [`DeviceSigned`]`<`[`ChunkRequest`]`>` (postcard) |
//! | `devices/{id}/chunks/data` | fleet → device | no | 1 | [`ChunkReply`] (postcard, unsigned: checked against the signed digests) |
//!
//! Machine messages are postcard; what people read (state, telemetry) is
//! JSON, so MQTT Explorer, Node-RED or Grafana show it as it is.
//!
//! # Who believes what
//!
//! - **Device → fleet.** Everything a device publishes is a
//!   [`DeviceSigned`] envelope: device id, a counter, the body, and an
//!   ed25519 signature by that device's key (made at provisioning). The
//!   fleet believes a message about device X only if X's key signed it and
//!   its counter is above the last one the fleet accepted from X for that
//!   message kind ([`DeviceSigned::open`]). The counter is one
//!   device-wide sequence that never goes back (the agent persists a
//!   high-water mark), so it rises within each kind too; tracking it per kind
//!   keeps messages valid when the broker reorders *across* topics. Broker
//!   topic ACLs are a second wall, never the first.
//!   The last will is signed too ([`DeviceWill`], its own kind `will`):
//!   the broker publishes it when the connection drops, so it is signed at
//!   connect time — before every (re)connection the agent reserves a fresh
//!   counter from its persisted device-wide counter for the will of that
//!   session and registers the signed will with the broker. The fleet
//!   accepts a will only if its counter is above the last *will* counter it
//!   accepted from that device (and the signature is the device's), so an
//!   old will replayed, or one a client made up, changes nothing. Nothing
//!   unsigned on a `state` topic is believed ([`parse_state_payload`]
//!   refuses it).
//! - **Fleet → device.** A [`Directive`] is signed by the fleet's *online*
//!   key and carries that key's certificate, so a device checks it against
//!   the root key it pinned at flash time ([`verify_directive`]). A device
//!   refuses a directive whose sequence is not above the last it accepted:
//!   this blocks replays and downgrades, and a remote rollback is therefore a
//!   *new* directive with a higher sequence that names the older model. The
//!   directive pins the bundle by the sha256 and size of the whole `.outpost`
//!   file and by the sha256 of its signed manifest; the bundle still goes
//!   through every check of [`crate::bundle`] (signature, certificate,
//!   expiry, model digest) with [`Freshness::NamedBy`](crate::bundle::Freshness::NamedBy)
//!   the directive's manifest digest — which is what lets a rollback install
//!   an older manifest whose own sequence is lower.
//! - **Chunks** ([`ChunkReply`]) are not signed: every byte is checked
//!   against the signed digests before anything is activated.
//!
//! # Limits
//!
//! Every size read from the network is compared with a [`Limits`] value
//! before it is parsed or allocated (see [`crate::bundle::Limits`] for why).
//!
//! # Versioning
//!
//! Every message has a `format` number; postcard ones have it as the first
//! field, so a reader refuses a newer format before decoding anything else.
//! Telemetry and sketches also name the model version they describe, so the
//! fleet never adds one version's numbers to another's.

pub mod chunks;
pub mod device;
pub mod directive;
pub mod messages;
pub mod topics;

pub use chunks::{ChunkReply, ChunkRequest, CHUNK_FORMAT};
pub use device::{DeviceMessage, DeviceSigned, Encoding, DEVICE_ENVELOPE_FORMAT};
pub use directive::{verify_directive, Directive, Probation, DIRECTIVE_FORMAT};
pub use messages::{
    parse_state_payload, DeviceState, DeviceWill, DriftSummary, LatencySketch, ModelRef, SketchMessage, StatePayload,
    Status, Telemetry, SKETCH_FORMAT, STATE_FORMAT, TELEMETRY_FORMAT, WILL_FORMAT,
};
pub use topics::ROOT;

use crate::bundle::VerifyError;

/// Upper bounds on every size a protocol message may claim. Checked before
/// anything is parsed. Both sides use the defaults unless configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A sealed directive (envelope with certificates). Default 64 KiB; a
    /// real one is ~400 bytes.
    pub directive_bytes: u32,
    /// A signed state message. Default 16 KiB.
    pub state_bytes: u32,
    /// A signed telemetry message. Default 64 KiB.
    pub telemetry_bytes: u32,
    /// A signed sketch message. Default 1 MiB (30 features × 32 bins is
    /// ~3 KiB; an image model's sketch is larger).
    pub sketch_bytes: u32,
    /// A signed chunk request. Default 1 KiB.
    pub chunk_request_bytes: u32,
    /// Model bytes in one chunk (what a device may ask for and a fleet may
    /// send). Default 1 MiB; the agent asks for 32 KiB by default.
    pub chunk_data_bytes: u32,
    /// Free text (error and rollback reasons, rollout ids). Default 1 KiB.
    pub text_bytes: u32,
    /// A download URL. Default 2 KiB.
    pub url_bytes: u32,
    /// Strings in a list (flagged drift columns). Default 1024.
    pub list_items: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            directive_bytes: 64 << 10,
            state_bytes: 16 << 10,
            telemetry_bytes: 64 << 10,
            sketch_bytes: 1 << 20,
            chunk_request_bytes: 1 << 10,
            chunk_data_bytes: 1 << 20,
            text_bytes: 1 << 10,
            url_bytes: 2 << 10,
            list_items: 1024,
        }
    }
}

impl Limits {
    /// Largest chunk-reply message: the data plus generous framing.
    pub fn chunk_reply_bytes(&self) -> u64 {
        self.chunk_data_bytes as u64 + 1024
    }

    /// Largest MQTT packet either side needs to accept (for
    /// `set_max_packet_size`): the biggest message plus topic and headers.
    pub fn max_packet_bytes(&self) -> usize {
        let biggest = [
            self.directive_bytes as u64,
            self.state_bytes as u64,
            self.telemetry_bytes as u64,
            self.sketch_bytes as u64,
            self.chunk_reply_bytes(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        (biggest + 4096) as usize
    }
}

/// Why a protocol message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Signature, certificate, format, freshness: everything the bundle
    /// module checks.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{what} is {found} bytes, over the limit of {limit}")]
    TooLarge { what: &'static str, limit: u64, found: u64 },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} format {found} is not supported (this build reads format {supported}); update the agent")]
    UnknownFormat { what: &'static str, found: u32, supported: u32 },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("the directive is for device {found:?}, not for this device ({expected:?})")]
    WrongDevice { expected: String, found: String },
    #[error("a {kind} message claims device {claimed:?} but arrived for device {expected:?}")]
    DeviceMismatch { kind: &'static str, expected: String, claimed: String },
    #[error("the {kind} message is signed by key {found}, not by device {device:?}'s key {expected}")]
    WrongKey { kind: &'static str, device: String, expected: crate::bundle::KeyId, found: crate::bundle::KeyId },
    #[error("bad signature on a {kind} message from device {device:?}")]
    BadSignature { kind: &'static str, device: String },
    #[error("{kind} message counter {counter} from device {device:?} is not above the last accepted {last} (replay)")]
    Replay { kind: &'static str, device: String, counter: u64, last: u64 },
    #[error("encoding a {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Checks a device id: 1–64 bytes of `A-Z a-z 0-9 . _ -`, not starting with
/// a dot. It appears in MQTT topics (so no `/`, `+`, `#`), in file names and
/// in signed messages (so no NUL).
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!("device id must be 1 to {MAX_DEVICE_ID_LEN} bytes"));
    }
    if id.starts_with('.') {
        return Err(format!("device id {id:?} must not start with a dot"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("device id {id:?} contains {c:?}; use letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Checks a text field against [`Limits::text_bytes`].
pub(crate) fn check_text(what: &str, text: &str, limits: &Limits) -> Result<(), String> {
    if text.len() > limits.text_bytes as usize {
        return Err(format!("{what} is {} bytes, over the limit of {}", text.len(), limits.text_bytes));
    }
    Ok(())
}

/// Byte strings as postcard's native byte string (length + raw bytes, decoded
/// in one go) and as hex in JSON.
pub(crate) mod bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&crate::bundle::to_hex(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// postcard-decodes exactly one `T` from `bytes`, with the format number
/// (first varint) checked first.
pub(crate) fn decode_postcard<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    format: u32,
) -> Result<T, ProtocolError> {
    match postcard::take_from_bytes::<u32>(bytes) {
        Ok((f, _)) if f == format => {}
        Ok((found, _)) => return Err(ProtocolError::UnknownFormat { what, found, supported: format }),
        Err(e) => return Err(ProtocolError::Malformed { what, reason: e.to_string() }),
    }
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(ProtocolError::Malformed { what, reason: format!("{} unexpected bytes after it", rest.len()) }),
        Err(e) => Err(ProtocolError::Malformed { what, reason: e.to_string() }),
    }
}

/// Refuses `bytes` longer than `limit` before anything parses them.
pub(crate) fn check_size(what: &'static str, bytes: &[u8], limit: u64) -> Result<(), ProtocolError> {
    if bytes.len() as u64 > limit {
        return Err(ProtocolError::TooLarge { what, limit, found: bytes.len() as u64 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        for good in ["pi-7", "jetson_01.lab", "A"] {
            assert!(validate_device_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "a/b", "a+b", "a#", "a\0b", "é", &"x".repeat(65)] {
            assert!(validate_device_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn packet_limit_covers_every_message() {
        let l = Limits::default();
        assert!(l.max_packet_bytes() as u64 > l.chunk_reply_bytes());
        assert!(l.max_packet_bytes() as u64 > l.sketch_bytes as u64);
    }
}
