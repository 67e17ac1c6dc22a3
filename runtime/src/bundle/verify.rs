//! Verification: the numbered steps of the [module docs](super), the trust
//! root, the options a caller must choose, and one error variant per way a
//! bundle or a signed message can be refused.
//!
//! Entry points:
//! - [`verify_bundle_file`] / [`verify_bundle_bytes`]: a whole `.outpost` file.
//! - [`verify_bundle_reader`]: a bundle from any `Read`, model bytes streamed
//!   to a `Write` (never held in memory).
//! - [`StreamVerifier`]: chunk by chunk, as the agent
//!   receives them over MQTT.
//! - [`verify_signed`]: a signed [`Envelope`] (a deployment
//!   directive) with the same certificate and freshness checks.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::certificate::{Certificate, KeyRole};
use super::container::StreamVerifier;
use super::keys::{KeyError, KeyId, PublicKey};
use super::manifest::{Digest, Manifest};
use super::signed::{decode_exact, Envelope, Signed, SignedPayload};
use super::Limits;

/// Why a bundle, certificate or signed message was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    // Step 1: the container.
    #[error("not an Outpost bundle (bad magic bytes)")]
    NotABundle,
    #[error("bundle container format {found} is not supported by this runtime (it reads format {supported}); update the runtime")]
    UnknownContainerFormat { found: u32, supported: u32 },

    // Step 2: sizes.
    #[error("truncated: the data ends at byte {offset}, inside the {section}")]
    Truncated { section: &'static str, offset: u64 },
    #[error("unexpected data after the end of the bundle (at byte {offset})")]
    TrailingData { offset: u64 },
    #[error("{what} is {found} bytes or items, over the limit of {limit}")]
    LimitExceeded { what: &'static str, limit: u64, found: u64 },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },

    // Step 3: the certificate.
    #[error("the {kind} is signed by key {key_id}, for which no certificate is present")]
    UnknownSigningKey { kind: &'static str, key_id: KeyId },
    #[error("the certificate for key {key_id} is not signed by the trusted root {root}")]
    CertificateNotTrusted { key_id: KeyId, root: KeyId },
    #[error("the certificate for key {key_id} expired at {expired_at} (unix seconds); it is now {now}")]
    CertificateExpired { key_id: KeyId, expired_at: u64, now: u64 },
    #[error("the certificate for key {key_id} has serial {serial}, below {min_serial}: the key was rotated out")]
    CertificateSuperseded { key_id: KeyId, serial: u64, min_serial: u64 },
    #[error("key {key_id} is certified as {role:?}, which may not sign a {kind}")]
    WrongRole { key_id: KeyId, role: KeyRole, kind: &'static str },

    // Step 4: the signature.
    #[error("bad {kind} signature (claimed signer {key_id})")]
    BadSignature { kind: &'static str, key_id: KeyId },

    // Step 5: format and content.
    #[error("{kind} format {found:?} is not supported by this runtime (it reads format {supported}); update the runtime")]
    UnknownFormat { kind: &'static str, found: Option<u32>, supported: u32 },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },

    // Step 6: freshness.
    #[error("{kind} sequence {sequence} is not above the last accepted {last_accepted} (replay or downgrade)")]
    Replay { kind: &'static str, sequence: u64, last_accepted: u64 },
    #[error("the {kind} is not the one the directive named (expected sha256 {expected}, got {found})")]
    NotTheNamedManifest { kind: &'static str, expected: Digest, found: Digest },

    // Steps 7 and 8: the model.
    #[error("model size mismatch: the manifest says {expected} bytes, the bundle has {found}")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("model digest mismatch: the manifest says sha256 {expected}, the model hashes to {found}")]
    DigestMismatch { expected: Digest, found: Digest },

    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("reading the bundle: {0}")]
    Read(std::io::Error),
    #[error("writing the model: {0}")]
    Write(std::io::Error),
    #[error("this verifier already refused the bundle; start a new one")]
    AlreadyFailed,
}

/// The pinned root public key: the only key a device trusts on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustRoot {
    key: PublicKey,
}

impl TrustRoot {
    pub fn new(key: PublicKey) -> TrustRoot {
        TrustRoot { key }
    }

    /// Reads a `root.pub` file.
    pub fn read_file(path: impl AsRef<Path>) -> Result<TrustRoot, KeyError> {
        PublicKey::read_file(path).map(TrustRoot::new)
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    pub fn key_id(&self) -> KeyId {
        self.key.key_id()
    }
}

/// The time certificate expiry is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The system clock, read when the check runs. The default.
    System,
    /// A given time, in unix seconds (tests; a time from a trusted source).
    At(u64),
    /// **Unsafe**: skip the expiry check, so a leaked key whose certificate
    /// expired is trusted again. Only for re-checking a model that was
    /// already accepted while its certificate was valid (e.g. at boot, with a
    /// clock that may be wrong), never for accepting something new.
    UnsafeIgnoreExpiry,
}

impl Clock {
    /// The time to check against, `None` when expiry is not checked.
    pub fn now(self) -> Option<u64> {
        match self {
            Clock::System => Some(super::unix_now()),
            Clock::At(t) => Some(t),
            Clock::UnsafeIgnoreExpiry => None,
        }
    }
}

/// What the sequence of a manifest or directive must satisfy. There is no
/// default: the caller must say what it accepted last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// The sequence must be above this one, the last accepted (replay and
    /// downgrade protection).
    Above(u64),
    /// Nothing was ever accepted, so any sequence is fresh: a device's first
    /// install, or a tool that only checks signatures (`outpost-runtime
    /// verify` without `--last-sequence`). A device that has accepted
    /// anything must not use this.
    NothingAcceptedYet,
    /// Accept exactly the signed payload with this sha256
    /// ([`Signed::payload_digest`]), whatever its sequence: a fresher signed
    /// directive (itself checked with `Above`, against the certificate
    /// serial floor and expiry) names the manifest by digest — every install
    /// on a device, a rollback to an older manifest included. The directive
    /// vouches for the named payload, so that payload's certificate is
    /// checked for trust and role but not against the serial floor or its
    /// expiry: a version signed before a key rotation stays installable
    /// (module docs, *Key rotation*).
    NamedBy(Digest),
}

/// Everything a verification needs besides the data and the trust root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyOptions {
    pub clock: Clock,
    pub freshness: Freshness,
    /// Certificates with a lower serial are refused (rotated-out keys).
    /// Pass the highest serial this device has seen; 0 refuses none.
    pub min_certificate_serial: u64,
    pub limits: Limits,
}

impl VerifyOptions {
    /// The safe defaults (system clock, default limits) with the caller's
    /// freshness requirement.
    pub fn new(freshness: Freshness) -> VerifyOptions {
        VerifyOptions { clock: Clock::System, freshness, min_certificate_serial: 0, limits: Limits::default() }
    }
}

/// A value whose signature, certificate and freshness checked out.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified<T> {
    pub value: T,
    /// The online key that signed it.
    pub signer: KeyId,
    /// The certificate that vouched for the signer.
    pub certificate: Certificate,
    /// sha256 of the signed payload bytes: how a directive names it.
    pub payload_digest: Digest,
}

/// A verified bundle header: the manifest and who vouched for it.
pub type VerifiedHeader = Verified<Manifest>;

/// A fully verified bundle, model bytes included.
#[derive(Clone, Debug)]
pub struct VerifiedBundle {
    pub header: VerifiedHeader,
    pub model: Vec<u8>,
}

impl VerifiedBundle {
    pub fn manifest(&self) -> &Manifest {
        &self.header.value
    }
}

/// Steps 3–6 for any signed value and the certificates carried with it.
pub(crate) fn verify_with_certificates<T: SignedPayload>(
    signed: &Signed<T>,
    certificates: &[Signed<Certificate>],
    trust: &TrustRoot,
    options: &VerifyOptions,
) -> Result<Verified<T>, VerifyError> {
    let limits = &options.limits;
    if certificates.len() as u64 > limits.certificates as u64 {
        return Err(VerifyError::LimitExceeded {
            what: "certificate list",
            limit: limits.certificates as u64,
            found: certificates.len() as u64,
        });
    }

    // Step 3: the certificate for the signing key, signed by the root. Each
    // certificate's root signature is checked *before* its body is decoded;
    // one that fails is only decoded (unverified) to give a precise error.
    let root = trust.key();
    let mut certificate = None;
    let mut untrusted_for_signer = false;
    let mut first_error = None;
    for c in certificates {
        if c.signer() == root.key_id() && c.signature_valid(root) {
            match c.decode_after_verification(limits) {
                Ok(cert) if cert.key_id == signed.signer() => {
                    certificate = Some(cert);
                    break;
                }
                Ok(_) => {}
                // A certificate in a newer format may sit beside one this
                // build reads; only report it if nothing else fits.
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        } else if c.decode_unverified(limits).is_ok_and(|cert| cert.key_id == signed.signer()) {
            untrusted_for_signer = true;
        }
    }
    let certificate = match certificate {
        Some(cert) => cert,
        None if untrusted_for_signer => {
            return Err(VerifyError::CertificateNotTrusted { key_id: signed.signer(), root: root.key_id() })
        }
        None => {
            return Err(first_error.unwrap_or(VerifyError::UnknownSigningKey { kind: T::KIND, key_id: signed.signer() }))
        }
    };
    if certificate.role != KeyRole::Online {
        return Err(VerifyError::WrongRole { key_id: certificate.key_id, role: certificate.role, kind: T::KIND });
    }
    // A payload that a verified directive named by digest is vouched for by
    // that directive, whose own certificate passed the serial and expiry
    // checks: the floor and the expiry apply to the directive, not to the
    // named bundle. Otherwise every bundle signed before `keygen --rotate`
    // (or before its certificate ran out) could never be installed or
    // rolled back to again. The root signature, the role and the payload
    // signature are still checked, and step 6 refuses anything but the
    // exact bytes the directive named — so a leaked rotated-out key can sign
    // a manifest, but no device installs it without a fresh directive.
    let vouched_by_directive = matches!(options.freshness, Freshness::NamedBy(_));
    if !vouched_by_directive && certificate.serial < options.min_certificate_serial {
        return Err(VerifyError::CertificateSuperseded {
            key_id: certificate.key_id,
            serial: certificate.serial,
            min_serial: options.min_certificate_serial,
        });
    }
    if let Some(now) = options.clock.now().filter(|_| !vouched_by_directive) {
        if now >= certificate.expires_at {
            return Err(VerifyError::CertificateExpired {
                key_id: certificate.key_id,
                expired_at: certificate.expires_at,
                now,
            });
        }
    }

    // Step 4: the payload's signature by the certified key.
    if !signed.signature_valid(&certificate.public_key) {
        return Err(VerifyError::BadSignature { kind: T::KIND, key_id: signed.signer() });
    }

    // Step 5: format number, strict decoding, content checks.
    let value = signed.decode_after_verification(limits)?;

    // Step 6: freshness.
    let payload_digest = signed.payload_digest();
    match (options.freshness, value.sequence()) {
        (Freshness::Above(last_accepted), Some(sequence)) if sequence <= last_accepted => {
            return Err(VerifyError::Replay { kind: T::KIND, sequence, last_accepted });
        }
        (Freshness::NamedBy(expected), _) if expected != payload_digest => {
            return Err(VerifyError::NotTheNamedManifest { kind: T::KIND, expected, found: payload_digest });
        }
        _ => {}
    }

    Ok(Verified { value, signer: signed.signer(), certificate, payload_digest })
}

/// Verifies a signed [`Envelope`] (postcard bytes, e.g. a deployment
/// directive from MQTT): size within [`Limits::envelope_bytes`], then steps
/// 3–6 against the pinned root.
///
/// ```no_run
/// # use outpost_runtime::bundle::*;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Directive { format: u32, sequence: u64 }
/// # impl SignedPayload for Directive { const KIND: &'static str = "directive"; const FORMAT: u32 = 1;
/// #   fn sequence(&self) -> Option<u64> { Some(self.sequence) } }
/// # fn demo(bytes: &[u8], trust: &TrustRoot, last: u64) -> Result<(), VerifyError> {
/// let directive = verify_signed::<Directive>(bytes, trust, &VerifyOptions::new(Freshness::Above(last)))?;
/// // ... act on directive.value, then persist directive.value.sequence as the last accepted
/// # Ok(()) }
/// ```
pub fn verify_signed<T: SignedPayload>(
    bytes: &[u8],
    trust: &TrustRoot,
    options: &VerifyOptions,
) -> Result<Verified<T>, VerifyError> {
    let limit = options.limits.envelope_bytes as u64;
    if bytes.len() as u64 > limit {
        return Err(VerifyError::LimitExceeded { what: "signed envelope", limit, found: bytes.len() as u64 });
    }
    let envelope: Envelope<T> = decode_exact(bytes, "signed envelope")?;
    verify_with_certificates(&envelope.signed, &envelope.certificates, trust, options)
}

/// Verifies a bundle from `reader`, writing the model bytes to `model_sink`
/// as they arrive. The sink's content is **not trusted** unless this returns
/// `Ok` — write to a scratch file and rename it afterwards.
pub fn verify_bundle_reader<R: Read, W: Write>(
    mut reader: R,
    mut model_sink: W,
    trust: &TrustRoot,
    options: &VerifyOptions,
) -> Result<VerifiedHeader, VerifyError> {
    let mut verifier = StreamVerifier::new(trust.clone(), *options);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VerifyError::Read(e)),
        };
        let model_bytes = verifier.feed(&buf[..n])?;
        model_sink.write_all(model_bytes).map_err(VerifyError::Write)?;
    }
    verifier.finish()
}

/// Verifies a whole bundle held in memory.
pub fn verify_bundle_bytes(
    bytes: &[u8],
    trust: &TrustRoot,
    options: &VerifyOptions,
) -> Result<VerifiedBundle, VerifyError> {
    let mut verifier = StreamVerifier::new(trust.clone(), *options);
    let model = verifier.feed(bytes)?.to_vec();
    let header = verifier.finish()?;
    Ok(VerifiedBundle { header, model })
}

/// Verifies a `.outpost` file, returning the manifest and the model bytes.
/// The model is read into memory (it is about to be loaded anyway); its size
/// was checked against the signed manifest and the limits first.
pub fn verify_bundle_file(
    path: impl AsRef<Path>,
    trust: &TrustRoot,
    options: &VerifyOptions,
) -> Result<VerifiedBundle, VerifyError> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|error| VerifyError::Io { path: path.into(), error })?;
    let mut model = Vec::new();
    let header = verify_bundle_reader(std::io::BufReader::new(file), &mut model, trust, options)?;
    Ok(VerifiedBundle { header, model })
}
