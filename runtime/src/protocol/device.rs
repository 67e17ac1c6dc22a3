//! Device-signed envelopes: how the fleet knows a message about device X
//! came from device X, whatever broker sits in between.
//!
//! # What is signed
//!
//! ```text
//! signing_message("device-" ‖ KIND, device_id ‖ 0x00 ‖ counter (u64 LE) ‖ body bytes)
//! ```
//!
//! (see [`signing_message`]): the body exactly as it travels, bound to the
//! device id, the counter and the message kind, so a signed state can never
//! pass as telemetry, nor as another device's, nor be replayed with a new
//! counter.
//!
//! # Wire formats
//!
//! JSON kinds ([`Encoding::Json`]: state, will, telemetry) stay readable by any
//! dashboard; the body is embedded as is and its exact bytes are what the
//! signature covers:
//!
//! ```json
//! {"format":1,"kind":"state","device_id":"pi-7","counter":42,
//!  "signer":"6b8e1f4c2a9d0e37","signature":"…128 hex…",
//!  "body":{"format":1,"status":"serving", …}}
//! ```
//!
//! Postcard kinds ([`Encoding::Postcard`]: sketch, chunk request) are the
//! same fields in that order, the body as a byte string.
//!
//! # Fleet side
//!
//! ```no_run
//! use outpost_runtime::protocol::{DeviceSigned, DeviceState, Limits};
//! # fn demo(bytes: &[u8], device_key: &outpost_runtime::bundle::PublicKey, last: Option<u64>) -> Result<(), Box<dyn std::error::Error>> {
//! let msg = DeviceSigned::<DeviceState>::from_bytes(bytes, &Limits::default())?;
//! // Look up the key of the device the topic names (and check msg.device_id() matches it), then:
//! let state = msg.open("pi-7", device_key, last, &Limits::default())?;
//! // store msg.counter() as the last accepted counter for ("pi-7", "state")
//! # let _ = state; Ok(()) }
//! ```

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{check_size, Limits, ProtocolError};
use crate::bundle::{signing_message, KeyId, PublicKey, SecretKey, SignatureBytes};

/// The envelope format this build writes and reads.
pub const DEVICE_ENVELOPE_FORMAT: u32 = 1;

/// How a message kind travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Readable by people and dashboards.
    Json,
    /// Compact, for machines.
    Postcard,
}

/// A message body a device signs.
pub trait DeviceMessage: Serialize + DeserializeOwned {
    /// Names the kind in the envelope and in the signature (domain separation).
    const KIND: &'static str;
    const ENCODING: Encoding;
    /// The body's format number (its first field); a reader refuses others.
    const FORMAT: u32;

    /// Largest signed message of this kind.
    fn max_bytes(limits: &Limits) -> u64;

    /// Field checks beyond decoding (text lengths, list sizes).
    fn validate(&self, limits: &Limits) -> Result<(), String> {
        let _ = limits;
        Ok(())
    }
}

/// A message body signed by a device's key, with the device id and a
/// counter. See the module docs.
pub struct DeviceSigned<T> {
    device_id: String,
    counter: u64,
    /// The body exactly as signed (JSON text or postcard bytes).
    body: Vec<u8>,
    signer: KeyId,
    signature: SignatureBytes,
    _kind: PhantomData<fn() -> T>,
}

impl<T> Clone for DeviceSigned<T> {
    fn clone(&self) -> Self {
        DeviceSigned {
            device_id: self.device_id.clone(),
            counter: self.counter,
            body: self.body.clone(),
            signer: self.signer,
            signature: self.signature,
            _kind: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for DeviceSigned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSigned")
            .field("device_id", &self.device_id)
            .field("counter", &self.counter)
            .field("body_len", &self.body.len())
            .field("signer", &self.signer)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct JsonWire<'a> {
    format: u32,
    kind: String,
    device_id: String,
    counter: u64,
    signer: KeyId,
    signature: SignatureBytes,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Serialize, Deserialize)]
struct PostcardWire {
    format: u32,
    kind: String,
    device_id: String,
    counter: u64,
    signer: KeyId,
    signature: SignatureBytes,
    #[serde(with = "super::bytes")]
    body: Vec<u8>,
}

fn message(kind: &str, device_id: &str, counter: u64, body: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(device_id.len() + 9 + body.len());
    signed.extend_from_slice(device_id.as_bytes());
    signed.push(0);
    signed.extend_from_slice(&counter.to_le_bytes());
    signed.extend_from_slice(body);
    signing_message(&format!("device-{kind}"), &signed)
}

impl<T: DeviceMessage> DeviceSigned<T> {
    /// Encodes `value` and signs it as device `device_id` with `counter`
    /// (which must rise with every message the device sends).
    pub fn sign(device_id: &str, counter: u64, value: &T, key: &SecretKey) -> Result<DeviceSigned<T>, ProtocolError> {
        let limits = Limits::default();
        super::validate_device_id(device_id).map_err(|reason| ProtocolError::Invalid { what: T::KIND, reason })?;
        value.validate(&limits).map_err(|reason| ProtocolError::Invalid { what: T::KIND, reason })?;
        let body = match T::ENCODING {
            Encoding::Json => serde_json::to_vec(value).map_err(|e| ProtocolError::Encode { what: T::KIND, reason: e.to_string() })?,
            Encoding::Postcard => {
                postcard::to_stdvec(value).map_err(|e| ProtocolError::Encode { what: T::KIND, reason: e.to_string() })?
            }
        };
        let signature = key.sign_message(&message(T::KIND, device_id, counter, &body));
        Ok(DeviceSigned {
            device_id: device_id.to_string(),
            counter,
            body,
            signer: key.key_id(),
            signature,
            _kind: PhantomData,
        })
    }

    /// The bytes to publish.
    pub fn to_bytes(&self) -> Vec<u8> {
        match T::ENCODING {
            Encoding::Json => {
                // The body came from serde_json, so it is valid JSON text.
                let text = String::from_utf8_lossy(&self.body);
                let Ok(body) = RawValue::from_string(text.into_owned()) else { return Vec::new() };
                let wire = JsonWire {
                    format: DEVICE_ENVELOPE_FORMAT,
                    kind: T::KIND.to_string(),
                    device_id: self.device_id.clone(),
                    counter: self.counter,
                    signer: self.signer,
                    signature: self.signature,
                    body: &body,
                };
                serde_json::to_vec(&wire).unwrap_or_default()
            }
            Encoding::Postcard => {
                let wire = PostcardWire {
                    format: DEVICE_ENVELOPE_FORMAT,
                    kind: T::KIND.to_string(),
                    device_id: self.device_id.clone(),
                    counter: self.counter,
                    signer: self.signer,
                    signature: self.signature,
                    body: self.body.clone(),
                };
                postcard::to_stdvec(&wire).unwrap_or_default()
            }
        }
    }

    /// Parses the envelope (size first, then the framing); nothing is
    /// trusted until [`open`](Self::open).
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<DeviceSigned<T>, ProtocolError> {
        check_size(T::KIND, bytes, T::max_bytes(limits))?;
        let malformed = |reason: String| ProtocolError::Malformed { what: T::KIND, reason };
        let (format, kind, device_id, counter, signer, signature, body) = match T::ENCODING {
            Encoding::Json => {
                let w: JsonWire = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
                (w.format, w.kind, w.device_id, w.counter, w.signer, w.signature, w.body.get().as_bytes().to_vec())
            }
            Encoding::Postcard => {
                let w: PostcardWire = super::decode_postcard(bytes, T::KIND, DEVICE_ENVELOPE_FORMAT)?;
                (w.format, w.kind, w.device_id, w.counter, w.signer, w.signature, w.body)
            }
        };
        if format != DEVICE_ENVELOPE_FORMAT {
            return Err(ProtocolError::UnknownFormat { what: T::KIND, found: format, supported: DEVICE_ENVELOPE_FORMAT });
        }
        if kind != T::KIND {
            return Err(malformed(format!("kind {kind:?}, expected {:?}", T::KIND)));
        }
        Ok(DeviceSigned { device_id, counter, body, signer, signature, _kind: PhantomData })
    }

    /// The device the message claims to come from (unverified until `open`).
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn counter(&self) -> u64 {
        self.counter
    }

    pub fn signer(&self) -> KeyId {
        self.signer
    }

    /// Verifies and decodes: the message must claim `expected_device` (the
    /// device its topic names), be signed by `key` (that device's key), have
    /// a counter above `last_counter` (the last accepted from this device
    /// for this kind; `None` if none), and decode strictly.
    pub fn open(
        &self,
        expected_device: &str,
        key: &PublicKey,
        last_counter: Option<u64>,
        limits: &Limits,
    ) -> Result<T, ProtocolError> {
        if self.device_id != expected_device {
            return Err(ProtocolError::DeviceMismatch {
                kind: T::KIND,
                expected: expected_device.to_string(),
                claimed: self.device_id.clone(),
            });
        }
        if self.signer != key.key_id() {
            return Err(ProtocolError::WrongKey {
                kind: T::KIND,
                device: self.device_id.clone(),
                expected: key.key_id(),
                found: self.signer,
            });
        }
        if !key.verify(&message(T::KIND, &self.device_id, self.counter, &self.body), &self.signature) {
            return Err(ProtocolError::BadSignature { kind: T::KIND, device: self.device_id.clone() });
        }
        if let Some(last) = last_counter {
            if self.counter <= last {
                return Err(ProtocolError::Replay {
                    kind: T::KIND,
                    device: self.device_id.clone(),
                    counter: self.counter,
                    last,
                });
            }
        }
        self.decode_unverified(limits)
    }

    /// Decodes the body **without** checking the signature: for showing a
    /// message (debugging tools). Never act on the result.
    pub fn decode_unverified(&self, limits: &Limits) -> Result<T, ProtocolError> {
        let value: T = match T::ENCODING {
            Encoding::Json => {
                #[derive(Deserialize)]
                struct Format {
                    format: u32,
                }
                let f: Format = serde_json::from_slice(&self.body)
                    .map_err(|e| ProtocolError::Malformed { what: T::KIND, reason: e.to_string() })?;
                if f.format != T::FORMAT {
                    return Err(ProtocolError::UnknownFormat { what: T::KIND, found: f.format, supported: T::FORMAT });
                }
                serde_json::from_slice(&self.body)
                    .map_err(|e| ProtocolError::Malformed { what: T::KIND, reason: e.to_string() })?
            }
            Encoding::Postcard => super::decode_postcard(&self.body, T::KIND, T::FORMAT)?,
        };
        value.validate(limits).map_err(|reason| ProtocolError::Invalid { what: T::KIND, reason })?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ChunkRequest, DeviceState, Status};
    use crate::bundle::Digest;

    #[test]
    fn json_state_round_trip_signature_and_replay() {
        let key = SecretKey::from_seed([4; 32]);
        let mut state = DeviceState::new(Status::Serving);
        state.model = Some("bc-mlp".into());
        let msg = DeviceSigned::sign("pi-7", 10, &state, &key).unwrap();
        let bytes = msg.to_bytes();
        // Readable JSON with the body embedded as an object.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["body"]["status"], "serving");
        assert_eq!(v["device_id"], "pi-7");
        let l = Limits::default();
        let parsed = DeviceSigned::<DeviceState>::from_bytes(&bytes, &l).unwrap();
        assert_eq!(parsed.open("pi-7", &key.public_key(), Some(9), &l).unwrap(), state);
        assert!(matches!(parsed.open("pi-7", &key.public_key(), Some(10), &l), Err(ProtocolError::Replay { .. })));
        assert!(matches!(parsed.open("pi-8", &key.public_key(), None, &l), Err(ProtocolError::DeviceMismatch { .. })));
        let other = SecretKey::from_seed([5; 32]);
        assert!(matches!(parsed.open("pi-7", &other.public_key(), None, &l), Err(ProtocolError::WrongKey { .. })));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = SecretKey::from_seed([4; 32]);
        let state = DeviceState::new(Status::Serving);
        let bytes = DeviceSigned::sign("pi-7", 10, &state, &key).unwrap().to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let l = Limits::default();
        for forged in [
            text.replace("\"serving\"", "\"failed\""),
            text.replace("\"counter\":10", "\"counter\":11"),
            text.replace("\"pi-7\"", "\"pi-8\""),
        ] {
            let parsed = DeviceSigned::<DeviceState>::from_bytes(forged.as_bytes(), &l).unwrap();
            let device = parsed.device_id().to_string();
            assert!(
                matches!(parsed.open(&device, &key.public_key(), None, &l), Err(ProtocolError::BadSignature { .. })),
                "{forged}"
            );
        }
        // A state envelope cannot pass as telemetry.
        assert!(DeviceSigned::<crate::protocol::Telemetry>::from_bytes(text.as_bytes(), &l).is_err());
    }

    #[test]
    fn postcard_chunk_request_round_trip_and_limit() {
        let key = SecretKey::from_seed([4; 32]);
        let req = ChunkRequest::new(Digest([7; 32]), 65536, 32768);
        let bytes = DeviceSigned::sign("pi-7", 1, &req, &key).unwrap().to_bytes();
        let l = Limits::default();
        let parsed = DeviceSigned::<ChunkRequest>::from_bytes(&bytes, &l).unwrap();
        assert_eq!(parsed.open("pi-7", &key.public_key(), None, &l).unwrap(), req);
        let tight = Limits { chunk_request_bytes: 8, ..l };
        assert!(matches!(DeviceSigned::<ChunkRequest>::from_bytes(&bytes, &tight), Err(ProtocolError::TooLarge { .. })));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 70] ^= 1;
        let parsed = DeviceSigned::<ChunkRequest>::from_bytes(&bad, &l);
        assert!(parsed.is_err() || parsed.unwrap().open("pi-7", &key.public_key(), None, &l).is_err());
    }
}
