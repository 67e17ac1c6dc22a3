//! Certificates: the offline root's statement "this online key may sign
//! manifests and directives until this time".
//!
//! A certificate is a [`Signed<Certificate>`] whose signer is the root key.
//! It is the only thing the root ever signs, so the root can stay offline:
//! it is needed once per online key (at `keygen` and at each `keygen
//! --rotate`), never per model.
//!
//! The file `online.cert` holds exactly the postcard bytes of the
//! `Signed<Certificate>`, the same bytes that bundles and envelopes carry.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::keys::{KeyError, KeyId, PublicKey, SecretKey};
use super::signed::{SignError, Signed, SignedPayload};
use super::verify::VerifyError;
use super::Limits;

/// The certificate format this build writes and reads.
pub const CERTIFICATE_FORMAT: u32 = 1;

/// What a certified key may sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// The fleet's online key: manifests and deployment directives.
    Online,
}

/// The body the root signs. Field order is the encoding order: do not reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// Always [`CERTIFICATE_FORMAT`]; first, so it is the first encoded byte.
    pub format: u32,
    pub role: KeyRole,
    /// Rises with each rotation (`outpost-fleet keygen` uses the issue time
    /// in unix seconds). A device that remembers the highest serial it has
    /// seen refuses older certificates, which revokes a rotated-out key
    /// before it expires.
    pub serial: u64,
    /// Id of `public_key`; checked, so the id shown in errors can be trusted.
    pub key_id: KeyId,
    pub public_key: PublicKey,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the certificate is refused from this second on.
    pub expires_at: u64,
}

impl SignedPayload for Certificate {
    const KIND: &'static str = "certificate";
    const FORMAT: u32 = CERTIFICATE_FORMAT;

    fn validate(&self, _limits: &Limits) -> Result<(), String> {
        if self.key_id != self.public_key.key_id() {
            return Err(format!(
                "key id {} does not match the certified key (its id is {})",
                self.key_id,
                self.public_key.key_id()
            ));
        }
        if self.expires_at <= self.issued_at {
            return Err("expires before it is issued".into());
        }
        Ok(())
    }
}

/// The root certifies `online` for the online role from `issued_at` (unix
/// seconds) for `valid_for_secs`.
pub fn issue_certificate(
    root: &SecretKey,
    online: &PublicKey,
    serial: u64,
    issued_at: u64,
    valid_for_secs: u64,
) -> Result<Signed<Certificate>, SignError> {
    let cert = Certificate {
        format: CERTIFICATE_FORMAT,
        role: KeyRole::Online,
        serial,
        key_id: online.key_id(),
        public_key: *online,
        issued_at,
        expires_at: issued_at.saturating_add(valid_for_secs),
    };
    Signed::sign(&cert, root)
}

/// Reads an `online.cert` file (bounded by [`Limits::key_file_bytes`]).
/// Only parses the envelope; verification happens on the device.
pub fn read_certificate_file(path: impl AsRef<Path>) -> Result<Signed<Certificate>, VerifyError> {
    let path = path.as_ref();
    let limit = Limits::default().key_file_bytes as u64;
    let bytes = super::container::read_file_limited(path, limit)?;
    Signed::from_bytes(&bytes, limit)
}

/// Writes an `online.cert` file atomically (mode 0644: it is public).
pub fn write_certificate_file(path: impl AsRef<Path>, cert: &Signed<Certificate>) -> Result<(), KeyError> {
    super::keys::write_atomically(path.as_ref(), &cert.to_bytes(), 0o644)
}
