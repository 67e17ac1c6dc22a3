//! Signed model bundles: keys, certificates, signed manifests, the `.outpost`
//! container, and the verification a device runs before it trusts any of them.
//!
//! # Which spec this follows, and where it does not
//!
//! The design follows [The Update Framework] (TUF) as implemented by
//! Bottlerocket's `tough`, and Uptane's lessons for devices that update
//! themselves unattended:
//!
//! - **Roles and an offline root.** A device pins one *root* ed25519 public key
//!   when it is flashed. The root stays offline and signs only
//!   [`Certificate`]s: "this online key may sign, until this time". The
//!   *online* key (the fleet server's) signs [`Manifest`]s and deployment
//!   directives. Rotating the online key is a new certificate, never a
//!   reflash (TUF's root → targets delegation, one level deep).
//! - **Signatures before parsing.** The signed payload is kept as the exact
//!   bytes that were signed ([`Signed`]); it is decoded only after its
//!   signature checked out, and decoding is strict (canonical bytes only).
//! - **Expiry** of the delegation is enforced by default (TUF's `expires`).
//! - **Rollback protection**: every manifest and directive carries a
//!   monotonic sequence; a device refuses one that is not above the last it
//!   accepted (TUF's version numbers, Uptane's "no downgrade").
//! - **Endless-data attacks**: every length read from a file or the network is
//!   checked against a documented [`Limits`] value *before* anything is
//!   allocated or read (TUF's length limits on metadata and targets).
//! - **Targets are pinned by hash and length**: the manifest names the sha256
//!   and byte size of the model, and the streaming verifier checks both while
//!   the model arrives.
//!
//! Where it deliberately does not follow TUF:
//!
//! - **Encoding**: postcard (compact binary, serde) instead of canonical JSON.
//!   Every payload starts with its own *format number*, so an older device
//!   refuses a newer format cleanly ([`VerifyError::UnknownFormat`]).
//! - **No root rotation.** The root key is pinned at flash time; TUF's chain of
//!   root versions is not implemented. Losing the root key means reflashing.
//! - **No thresholds**: one signature per role, not *k* of *n*.
//! - **No timestamp/snapshot roles.** Freshness comes from the monotonic
//!   sequence (and from the fleet watching device state), so a *freeze* attack
//!   (withholding updates) is detected by the fleet, not by the device.
//! - **Revocation** of an old online key happens when its certificate expires,
//!   or earlier on each device that has seen a certificate with a higher
//!   [`Certificate::serial`] (the caller passes the highest serial it has seen
//!   as [`VerifyOptions::min_certificate_serial`]). Both apply to what the
//!   old key signs *from then on*: a bundle a fresh directive names by digest
//!   stays installable (*Key rotation* below).
//! - **No not-before check.** Devices without a real-time clock (a Raspberry
//!   Pi) boot with a clock in the past; a clock that is behind only makes the
//!   expiry check lenient, it never refuses a good bundle.
//! - **Domain separation**: a signature covers exactly the payload's postcard
//!   bytes, preceded by a fixed context string naming the payload kind
//!   ([`signing_message`]), so a signed directive can never pass as a signed
//!   manifest even though the same key signs both (TUF gets the same from the
//!   `_type` field inside its signed JSON).
//!
//! # Verification, step by step
//!
//! [`verify_bundle_file`], [`StreamVerifier`] and [`verify_signed`] all run
//! the same numbered steps; each failure has its own [`VerifyError`] variant:
//!
//! 1. **Container**: magic bytes and container format number
//!    ([`VerifyError::NotABundle`], [`VerifyError::UnknownContainerFormat`]).
//! 2. **Sizes**: each length prefix is within [`Limits`] before anything is
//!    allocated ([`VerifyError::LimitExceeded`]); a file that ends early is
//!    [`VerifyError::Truncated`], one that goes on is
//!    [`VerifyError::TrailingData`].
//! 3. **Certificate**: among the carried certificates, the one for the key
//!    that signed the manifest ([`VerifyError::UnknownSigningKey`]) must be
//!    signed by the pinned root ([`VerifyError::CertificateNotTrusted`]), name
//!    its key by the right key id, be for the online role, not be superseded
//!    ([`VerifyError::CertificateSuperseded`]) and not be expired
//!    ([`VerifyError::CertificateExpired`]). The last two are waived for a
//!    manifest a verified directive names by digest ([`Freshness::NamedBy`]):
//!    the directive passed them, and it pins these exact bytes (below).
//! 4. **Signature** of the manifest by that certified key
//!    ([`VerifyError::BadSignature`]).
//! 5. **Format and content**: the manifest's format number is one this build
//!    knows ([`VerifyError::UnknownFormat`]); it decodes strictly
//!    ([`VerifyError::Malformed`]) and its fields make sense
//!    ([`VerifyError::Invalid`]: semver version, safe name, self-test limits).
//! 6. **Freshness**: the sequence is above the last accepted one
//!    ([`VerifyError::Replay`]), or the manifest is exactly the one a fresher
//!    signed directive named ([`VerifyError::NotTheNamedManifest`]).
//! 7. **Model size**: the container's model length equals the manifest's
//!    ([`VerifyError::SizeMismatch`]) and is within limits.
//! 8. **Model digest**: the sha256 of the model bytes, computed while they
//!    stream in, equals the manifest's ([`VerifyError::DigestMismatch`]).
//!
//! Steps 1–7 run as soon as the header has arrived, so a device refuses a bad
//! bundle before it downloads the model. Model bytes handed out by
//! [`StreamVerifier::feed`] are **not trusted** until
//! [`StreamVerifier::finish`] returned `Ok`: write them to a scratch file and
//! rename it only then.
//!
//! # Key rotation
//!
//! `outpost-fleet keygen --rotate` certifies a new online key with a higher
//! serial; a device that has seen it refuses *directives* signed by the old
//! key. Bundles are another matter: a registry holds versions signed over
//! years, by keys long rotated out, and an operator must be able to roll
//! back to any of them. Two designs were weighed:
//!
//! - **Re-sign every stored bundle at rotation.** The bundle's bytes change,
//!   so the sha256 a device holds in its slot no longer matches the one a
//!   rollback directive names: devices download what they already have, and
//!   bundles signed offline (`outpost-fleet bundle`) cannot be re-signed
//!   without the offline key.
//! - **The directive vouches for the bundle** (what this module does, as
//!   TUF's targets metadata vouches for a target by hash). A directive is
//!   checked against the serial floor and expiry; it names the bundle by the
//!   sha256 of its signed manifest, which names the model by sha256. When
//!   a bundle is verified [`Freshness::NamedBy`] a directive, its own
//!   certificate must still be the root's and for the online role, and its
//!   signature must hold, but its serial and expiry are not held against
//!   it. A rotated-out or leaked old key gains nothing: whatever it signs is
//!   not the payload a fresh directive named.
//!
//! # Safety is the default
//!
//! Nothing here has a lenient default. Anything that weakens a check is an
//! explicit enum variant whose name says so: [`Clock::UnsafeIgnoreExpiry`],
//! [`Freshness::NothingAcceptedYet`] (a device's very first install).
//!
//! # Signing, for the fleet server
//!
//! ```no_run
//! use outpost_runtime::bundle::{Signer, SecretKey, Signed, Certificate, write_bundle};
//! # fn demo(manifest: outpost_runtime::bundle::Manifest, model: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! let key = SecretKey::read_file("keys/online.key")?;
//! let cert = outpost_runtime::bundle::read_certificate_file("keys/online.cert")?;
//! let signer = Signer::new(key, cert)?;
//! let signed = signer.sign(&manifest)?;
//! let mut out = std::fs::File::create("model.outpost")?;
//! write_bundle(&mut out, &signed, &[signer.certificate().clone()], model)?;
//! # Ok(()) }
//! ```
//!
//! [The Update Framework]: https://theupdateframework.io/

pub mod certificate;
pub mod cli;
pub mod container;
pub mod keys;
pub mod limits;
pub mod load;
pub mod manifest;
pub mod selftest;
pub mod signed;
pub mod verify;

pub use certificate::{issue_certificate, read_certificate_file, write_certificate_file, Certificate, KeyRole};
pub use container::{
    read_bundle_unverified, write_bundle, write_container, StreamVerifier, UnverifiedBundle, CONTAINER_FORMAT, MAGIC,
};
pub use keys::{KeyError, KeyId, PublicKey, SecretKey, SignatureBytes};
pub use limits::Limits;
pub use load::{load_verified, open_verified, OpenError, VerifiedModel};
pub use manifest::{Digest, Manifest, ModelFileFormat, MANIFEST_FORMAT};
pub use selftest::{SelfTest, SelfTestError, SelfTestVector, Tolerance};
pub use signed::{signing_message, Envelope, SignError, Signed, SignedPayload, Signer};
pub use verify::{
    verify_bundle_bytes, verify_bundle_file, verify_bundle_reader, verify_signed, Clock, Freshness,
    TrustRoot, Verified, VerifiedBundle, VerifiedHeader, VerifyError, VerifyOptions,
};

/// Seconds since the Unix epoch, the time unit of every payload here.
///
/// A clock before 1970 (never seen in practice) reads as 0, which makes the
/// expiry check lenient rather than refusing — see "No not-before check".
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lowercase hex, for key ids and digests in files, errors and JSON.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Parses exactly `N` bytes of hex (either case); `None` for anything else.
pub(crate) fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (nibble(s[2 * i])? << 4) | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// Serde helpers for fixed byte arrays: hex strings in human-readable formats
/// (JSON for `inspect`), a plain fixed-length tuple in postcard (no length
/// prefix, so the size is part of the format rather than a field to check).
pub(crate) mod hexbytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&super::to_hex(bytes))
        } else {
            let mut t = s.serialize_tuple(N)?;
            for b in bytes {
                t.serialize_element(b)?;
            }
            t.end()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        struct V<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for V<N> {
            type Value = [u8; N];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "{N} bytes")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<[u8; N], E> {
                super::from_hex::<N>(v).ok_or_else(|| E::custom(format!("expected {} hex digits", 2 * N)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; N], A::Error> {
                let mut out = [0u8; N];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V::<N>)
        } else {
            d.deserialize_tuple(N, V::<N>)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let bytes = [0x00, 0x7f, 0x80, 0xff, 0x12];
        assert_eq!(to_hex(&bytes), "007f80ff12");
        assert_eq!(from_hex::<5>("007F80ff12"), Some(bytes));
        assert_eq!(from_hex::<5>("007f80ff1"), None);
        assert_eq!(from_hex::<2>("zz00"), None);
    }
}
