//! The generic signed envelope that manifests, certificates, deployment
//! directives and device messages share.
//!
//! A [`Signed<T>`] keeps the **exact bytes that were signed** (the postcard
//! encoding of a `T`), the id of the key that signed them, and the signature.
//! It is never decoded into a `T` before the signature has been checked, and
//! decoding is strict: the bytes must be the canonical encoding of the value
//! they decode to, with nothing left over.
//!
//! # What a signature covers
//!
//! Exactly the payload bytes, preceded by a fixed context string that names
//! the payload kind ([`signing_message`]):
//!
//! ```text
//! "outpost-signature-v1\0" ‖ KIND ‖ "\0" ‖ payload bytes
//! ```
//!
//! The prefix is constant per kind and never stored; it only makes a
//! signature over a directive useless as a signature over a manifest.
//!
//! # Adding a signed type
//!
//! Implement [`SignedPayload`]: a unique `KIND`, a `FORMAT` number that is the
//! **first field** of the struct (so it is the first thing in the encoding and
//! an older reader can refuse a newer format before decoding anything else),
//! and `sequence()` if the type carries a monotonic counter:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use outpost_runtime::bundle::{SignedPayload, Limits};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Directive { format: u32, sequence: u64, model: String }
//!
//! impl SignedPayload for Directive {
//!     const KIND: &'static str = "directive";
//!     const FORMAT: u32 = 1;
//!     fn sequence(&self) -> Option<u64> { Some(self.sequence) }
//! }
//! ```
//!
//! Then the fleet calls [`Signer::seal`] and a device calls
//! [`verify_signed`](super::verify_signed) on the bytes.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::certificate::Certificate;
use super::keys::{KeyError, KeyId, PublicKey, SecretKey, SignatureBytes};
use super::manifest::Digest;
use super::verify::VerifyError;
use super::Limits;

/// The context string every signed message starts with.
pub const SIGNATURE_CONTEXT: &[u8] = b"outpost-signature-v1\0";

/// A type that can travel inside a [`Signed`] envelope.
pub trait SignedPayload: Serialize + DeserializeOwned {
    /// Names the kind in the signed message (domain separation) and in errors.
    const KIND: &'static str;
    /// The format number this build writes and reads. It must be the value
    /// of the struct's first field, a `u32`.
    const FORMAT: u32;

    /// The monotonic counter, for types that have one (manifests,
    /// directives, device messages); checked against
    /// [`Freshness`](super::Freshness) by `verify_signed`.
    fn sequence(&self) -> Option<u64> {
        None
    }

    /// Checks that go beyond decoding (a valid semver, a safe name, counts
    /// within `limits`). Runs when signing too, so nothing invalid is signed.
    fn validate(&self, limits: &Limits) -> Result<(), String> {
        let _ = limits;
        Ok(())
    }
}

/// The message a signature covers: context, kind, then the payload bytes.
pub fn signing_message(kind: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + kind.len() + 1 + payload.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(kind.as_bytes());
    message.push(0);
    message.extend_from_slice(payload);
    message
}

/// Errors while signing.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("encoding the {kind}: {error}")]
    Encode { kind: &'static str, error: postcard::Error },
    #[error("refusing to sign an invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
    #[error("the {kind} does not start with format number {format}; its first field must be `format`")]
    FormatNotFirst { kind: &'static str, format: u32 },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Signed bytes of a `T`: the payload exactly as signed, the signer's key id,
/// and the signature. Encoded with postcard as
/// `varint(len) ‖ payload ‖ key id (8 bytes) ‖ signature (64 bytes)`.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    #[serde(with = "payload_bytes")]
    payload: Vec<u8>,
    signer: KeyId,
    signature: SignatureBytes,
    #[serde(skip)]
    _kind: PhantomData<fn() -> T>,
}

// Manual impls: derive would demand `T: Clone`/`T: Debug`, which the bytes
// do not need.
impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed { payload: self.payload.clone(), signer: self.signer, signature: self.signature, _kind: PhantomData }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.payload == other.payload && self.signer == other.signer && self.signature == other.signature
    }
}

impl<T> std::fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("payload_len", &self.payload.len())
            .field("signer", &self.signer)
            .field("signature", &self.signature)
            .finish()
    }
}

impl<T: SignedPayload> Signed<T> {
    /// Encodes `value`, validates it, and signs it with `key`.
    pub fn sign(value: &T, key: &SecretKey) -> Result<Signed<T>, SignError> {
        value
            .validate(&Limits::default())
            .map_err(|reason| SignError::Invalid { kind: T::KIND, reason })?;
        let payload = postcard::to_stdvec(value).map_err(|error| SignError::Encode { kind: T::KIND, error })?;
        // Enforce the "format number first" rule on the writing side too, so a
        // struct that forgets it fails in the fleet's tests, not on devices.
        if read_format(&payload) != Some(T::FORMAT) {
            return Err(SignError::FormatNotFirst { kind: T::KIND, format: T::FORMAT });
        }
        let signature = key.sign_message(&signing_message(T::KIND, &payload));
        Ok(Signed { payload, signer: key.key_id(), signature, _kind: PhantomData })
    }

    /// Assembles a `Signed` from its parts (e.g. ones stored elsewhere).
    /// Nothing is checked until it is verified.
    pub fn from_parts(payload: Vec<u8>, signer: KeyId, signature: SignatureBytes) -> Signed<T> {
        Signed { payload, signer, signature, _kind: PhantomData }
    }

    /// The exact signed bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The key id the signer claims. Unsigned: only a hint for finding the key.
    pub fn signer(&self) -> KeyId {
        self.signer
    }

    pub fn signature(&self) -> &SignatureBytes {
        &self.signature
    }

    /// sha256 of the payload bytes: the identity of this signed value (a
    /// directive names a manifest by it).
    pub fn payload_digest(&self) -> Digest {
        Digest(Sha256::digest(&self.payload).into())
    }

    /// Whether `key` signed these bytes as a `T`.
    pub fn signature_valid(&self, key: &PublicKey) -> bool {
        key.verify(&signing_message(T::KIND, &self.payload), &self.signature)
    }

    /// Verifies with a known key (no certificate involved) and decodes: for
    /// device-signed messages, where the fleet knows each device's key. The
    /// caller checks sequences itself.
    pub fn open(&self, key: &PublicKey, limits: &Limits) -> Result<T, VerifyError> {
        if self.signer != key.key_id() {
            return Err(VerifyError::UnknownSigningKey { kind: T::KIND, key_id: self.signer });
        }
        if !self.signature_valid(key) {
            return Err(VerifyError::BadSignature { kind: T::KIND, key_id: self.signer });
        }
        self.decode_after_verification(limits)
    }

    /// Decodes **without checking the signature**: only for showing what a
    /// file claims (`outpost-runtime inspect`). Never act on the result.
    pub fn decode_unverified(&self, limits: &Limits) -> Result<T, VerifyError> {
        self.decode_after_verification(limits)
    }

    /// Steps 5 (format, strict decoding, validation) for bytes whose
    /// signature has been checked.
    pub(crate) fn decode_after_verification(&self, limits: &Limits) -> Result<T, VerifyError> {
        match read_format(&self.payload) {
            Some(f) if f == T::FORMAT => {}
            found => {
                return Err(VerifyError::UnknownFormat { kind: T::KIND, found, supported: T::FORMAT });
            }
        }
        let value: T = decode_exact(&self.payload, T::KIND)?;
        // Canonical form: re-encoding must give the same bytes, so one value
        // has exactly one signed encoding (no overlong varints, no slack).
        match postcard::to_stdvec(&value) {
            Ok(again) if again == self.payload => {}
            _ => return Err(VerifyError::Malformed { what: T::KIND, reason: "not in canonical form".into() }),
        }
        value.validate(limits).map_err(|reason| VerifyError::Invalid { kind: T::KIND, reason })?;
        Ok(value)
    }

    /// The postcard encoding of the whole envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a Vec, a fixed array and a tuple into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses an envelope (not its payload), refusing more than `max_bytes`
    /// and anything left over.
    pub fn from_bytes(bytes: &[u8], max_bytes: u64) -> Result<Signed<T>, VerifyError> {
        if bytes.len() as u64 > max_bytes {
            return Err(VerifyError::LimitExceeded { what: T::KIND, limit: max_bytes, found: bytes.len() as u64 });
        }
        decode_exact(bytes, T::KIND)
    }
}

/// The first varint of a payload: its format number.
pub(crate) fn read_format(payload: &[u8]) -> Option<u32> {
    postcard::take_from_bytes::<u32>(payload).ok().map(|(f, _)| f)
}

/// postcard-decodes `bytes` as one `T` and nothing more.
pub(crate) fn decode_exact<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, VerifyError> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(VerifyError::Malformed { what, reason: format!("{} unexpected bytes after it", rest.len()) }),
        Err(e) => Err(VerifyError::Malformed { what, reason: e.to_string() }),
    }
}

/// A signed value plus the certificates that vouch for its signer: what a
/// directive on MQTT is (postcard-encoded; see [`Signer::seal`] and
/// [`verify_signed`](super::verify_signed)).
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Envelope<T> {
    pub certificates: Vec<Signed<Certificate>>,
    pub signed: Signed<T>,
}

/// The online key together with the certificate the root gave it: everything
/// the fleet server needs to sign manifests and directives.
pub struct Signer {
    key: SecretKey,
    certificate: Signed<Certificate>,
}

impl Signer {
    /// Pairs a key with its certificate, refusing a certificate that names a
    /// different key (a mix-up that would make every device refuse).
    pub fn new(key: SecretKey, certificate: Signed<Certificate>) -> Result<Signer, SignError> {
        let cert = certificate.decode_unverified(&Limits::default()).map_err(|e| SignError::Invalid {
            kind: Certificate::KIND,
            reason: e.to_string(),
        })?;
        if cert.key_id != key.key_id() || cert.public_key != key.public_key() {
            return Err(KeyError::CertificateMismatch { certified: cert.key_id, actual: key.key_id() }.into());
        }
        Ok(Signer { key, certificate })
    }

    pub fn key_id(&self) -> KeyId {
        self.key.key_id()
    }

    pub fn certificate(&self) -> &Signed<Certificate> {
        &self.certificate
    }

    /// Signs a value (a manifest, for [`write_bundle`](super::write_bundle)).
    pub fn sign<T: SignedPayload>(&self, value: &T) -> Result<Signed<T>, SignError> {
        Signed::sign(value, &self.key)
    }

    /// Signs a value and wraps it with this signer's certificate: the bytes
    /// to publish (e.g. as a retained `devices/{id}/desired` message).
    pub fn seal<T: SignedPayload>(&self, value: &T) -> Result<Vec<u8>, SignError> {
        let envelope = Envelope { certificates: vec![self.certificate.clone()], signed: self.sign(value)? };
        postcard::to_stdvec(&envelope).map_err(|error| SignError::Encode { kind: T::KIND, error })
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("key", &self.key).finish_non_exhaustive()
    }
}

/// Payload bytes: postcard's native byte string (varint length + raw bytes,
/// decoded in one go rather than byte by byte); hex in JSON.
mod payload_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&super::super::to_hex(bytes))
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
            fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
                // ASCII only, so the two-byte slices below are char boundaries.
                if !v.is_ascii() || v.len() % 2 != 0 {
                    return Err(E::custom("expected an even number of hex digits"));
                }
                (0..v.len() / 2)
                    .map(|i| super::super::from_hex::<1>(&v[2 * i..2 * i + 2]).map(|b| b[0]))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| E::custom("not hex"))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_byte_buf(V)
        }
    }
}
