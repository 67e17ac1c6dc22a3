//! The deployment directive: "device X, run this bundle", signed by the
//! fleet's online key and published retained on `devices/{id}/desired`.
//!
//! # On the fleet
//!
//! ```no_run
//! use outpost_runtime::bundle::{Digest, Signer};
//! use outpost_runtime::protocol::{topics, Directive, Probation};
//! # fn demo(signer: &Signer, bundle_file: &[u8], manifest_sha256: Digest, seq: u64) -> Result<(), Box<dyn std::error::Error>> {
//! let directive = Directive::new("pi-7", seq, "bc-mlp", "1.2.0", Digest::of(bundle_file), bundle_file.len() as u64, manifest_sha256);
//! let payload = signer.seal(&directive)?;        // publish retained, QoS 1, on:
//! let topic = topics::desired("pi-7");
//! # let _ = (payload, topic); Ok(()) }
//! ```
//!
//! # On the device
//!
//! [`verify_directive`]: certificate chain to the pinned root, signature,
//! strict decoding, the device id, and the sequence above the last accepted
//! one. Only then does the agent persist the new sequence and start the
//! download.

use serde::{Deserialize, Serialize};

use super::{ProtocolError, Limits as ProtocolLimits};
use crate::bundle::manifest::{validate_name, validate_version};
use crate::bundle::{
    verify_signed, Digest, Freshness, Limits, SignedPayload, TrustRoot, Verified, VerifyOptions,
};

/// The directive format this build writes and reads.
pub const DIRECTIVE_FORMAT: u32 = 1;

/// Probation parameters: how long the device keeps a new version on trial,
/// and what makes it roll back by itself. Field order is the encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probation {
    /// Seconds the new version is on trial before it is committed.
    pub duration_secs: u32,
    /// Roll back if the new version's failure rate (5xx over answered
    /// prediction requests) exceeds this…
    pub max_error_rate: f32,
    /// …or its latency p99 exceeds this many times the previous version's
    /// (measured over the same probation window; ignored when the previous
    /// version has no latency figures).
    pub max_latency_ratio: f32,
    /// Requests the new version must have answered before the error rate and
    /// latency rules apply (too few requests prove nothing).
    pub min_requests: u32,
    /// Restarts during probation (a boot counter in the state file) after
    /// which the device gives up on the new version.
    pub max_boots: u32,
}

impl Default for Probation {
    /// 60 s; more than 5 % failures or a p99 above 5× the previous version's
    /// after at least 20 requests; the 3rd restart during probation.
    fn default() -> Probation {
        Probation { duration_secs: 60, max_error_rate: 0.05, max_latency_ratio: 5.0, min_requests: 20, max_boots: 3 }
    }
}

impl Probation {
    pub fn validate(&self) -> Result<(), String> {
        let finite_nonneg = |x: f32| x.is_finite() && x >= 0.0;
        if !finite_nonneg(self.max_error_rate) || self.max_error_rate > 1.0 {
            return Err(format!("max_error_rate {} must be in [0, 1]", self.max_error_rate));
        }
        if !finite_nonneg(self.max_latency_ratio) || self.max_latency_ratio < 1.0 {
            return Err(format!("max_latency_ratio {} must be finite and at least 1", self.max_latency_ratio));
        }
        if self.max_boots == 0 {
            return Err("max_boots must be at least 1".into());
        }
        Ok(())
    }
}

/// What the fleet wants one device to run. Field order is the encoding
/// order: do not reorder; any change is a new [`DIRECTIVE_FORMAT`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Directive {
    /// Always [`DIRECTIVE_FORMAT`]; first, so it is the first encoded byte.
    pub format: u32,
    /// The device this is for: a directive for another device is refused,
    /// so one device's retained message cannot be replayed onto another.
    pub device_id: String,
    /// Per-device, monotonic: the device refuses a directive whose sequence
    /// is not above the last one it accepted (replay, downgrade). A rollback
    /// is a new directive with a higher sequence naming the older model.
    pub sequence: u64,
    /// Model name and version, as in the bundle's manifest (checked against
    /// it).
    pub model: String,
    pub version: String,
    /// sha256 and size of the whole `.outpost` file: what the chunks
    /// assemble into and what chunk requests name.
    pub bundle_sha256: Digest,
    pub bundle_size: u64,
    /// sha256 of the bundle's signed manifest bytes
    /// ([`Signed::payload_digest`](crate::bundle::Signed::payload_digest)):
    /// the bundle is verified with `Freshness::NamedBy(manifest_sha256)`.
    pub manifest_sha256: Digest,
    /// An HTTP(S) URL to fetch the bundle from instead of MQTT chunks (large
    /// models). The same checks apply to what it returns.
    pub url: Option<String>,
    /// The rollout this directive belongs to, if any (reported back in state).
    pub rollout_id: Option<String>,
    /// Unix seconds when the fleet signed it.
    pub issued_at: u64,
    /// Probation for this update; `None` = the device's configured default.
    pub probation: Option<Probation>,
}

impl Directive {
    /// A directive with no URL, no rollout, default probation, issued now.
    pub fn new(
        device_id: &str,
        sequence: u64,
        model: &str,
        version: &str,
        bundle_sha256: Digest,
        bundle_size: u64,
        manifest_sha256: Digest,
    ) -> Directive {
        Directive {
            format: DIRECTIVE_FORMAT,
            device_id: device_id.to_string(),
            sequence,
            model: model.to_string(),
            version: version.to_string(),
            bundle_sha256,
            bundle_size,
            manifest_sha256,
            url: None,
            rollout_id: None,
            issued_at: crate::bundle::unix_now(),
            probation: None,
        }
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.model, self.version)
    }

    /// Field checks against the protocol limits (also run when signing).
    pub fn check(&self, limits: &ProtocolLimits, bundle_limits: &Limits) -> Result<(), String> {
        super::validate_device_id(&self.device_id)?;
        validate_name(&self.model)?;
        validate_version(&self.version)?;
        if self.bundle_size == 0 {
            return Err("bundle size is 0".into());
        }
        // A bundle is the model plus at most a manifest and certificates.
        let max_bundle = bundle_limits.model_bytes
            + bundle_limits.manifest_bytes as u64
            + bundle_limits.certificate_section_bytes()
            + 32;
        if self.bundle_size > max_bundle {
            return Err(format!("bundle size {} is over the limit of {max_bundle} bytes", self.bundle_size));
        }
        if let Some(url) = &self.url {
            if url.len() > limits.url_bytes as usize {
                return Err(format!("url is {} bytes, over the limit of {}", url.len(), limits.url_bytes));
            }
            let lower = url.to_ascii_lowercase();
            if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                return Err("url must be http:// or https://".into());
            }
        }
        if let Some(r) = &self.rollout_id {
            super::check_text("rollout id", r, limits)?;
        }
        if let Some(p) = &self.probation {
            p.validate()?;
        }
        Ok(())
    }
}

impl SignedPayload for Directive {
    const KIND: &'static str = "directive";
    const FORMAT: u32 = DIRECTIVE_FORMAT;

    fn sequence(&self) -> Option<u64> {
        Some(self.sequence)
    }

    fn validate(&self, limits: &Limits) -> Result<(), String> {
        self.check(&ProtocolLimits::default(), limits)
    }
}

/// Verifies a sealed directive from `devices/{device_id}/desired`:
/// size, certificate chain to `trust`, expiry, signature, strict decoding,
/// field checks, the device id, and freshness (`last_sequence`: the last
/// accepted directive sequence, `None` on a device that never accepted
/// one). `min_certificate_serial` is the highest certificate serial this
/// device has seen (revokes rotated-out online keys).
///
/// On `Ok`, persist `value.sequence` (and the certificate serial) before
/// acting on it.
pub fn verify_directive(
    bytes: &[u8],
    trust: &TrustRoot,
    device_id: &str,
    last_sequence: Option<u64>,
    min_certificate_serial: u64,
    limits: &ProtocolLimits,
) -> Result<Verified<Directive>, ProtocolError> {
    super::check_size("directive", bytes, limits.directive_bytes as u64)?;
    let freshness = match last_sequence {
        Some(last) => Freshness::Above(last),
        None => Freshness::NothingAcceptedYet,
    };
    let mut options = VerifyOptions::new(freshness);
    options.min_certificate_serial = min_certificate_serial;
    options.limits.envelope_bytes = limits.directive_bytes;
    let verified = verify_signed::<Directive>(bytes, trust, &options)?;
    if verified.value.device_id != device_id {
        return Err(ProtocolError::WrongDevice { expected: device_id.to_string(), found: verified.value.device_id });
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{issue_certificate, SecretKey, Signer, VerifyError};

    fn signer(root: &SecretKey, seed: u8) -> Signer {
        let online = SecretKey::from_seed([seed; 32]);
        let now = crate::bundle::unix_now();
        let cert = issue_certificate(root, &online.public_key(), 1, now - 10, 3600).unwrap();
        Signer::new(online, cert).unwrap()
    }

    fn directive(seq: u64) -> Directive {
        Directive::new("pi-7", seq, "bc-mlp", "1.0.0", Digest([1; 32]), 1000, Digest([2; 32]))
    }

    #[test]
    fn sealed_directive_verifies_and_refuses_replay_and_other_devices() {
        let root = SecretKey::from_seed([1; 32]);
        let trust = TrustRoot::new(root.public_key());
        let s = signer(&root, 2);
        let l = ProtocolLimits::default();
        let bytes = s.seal(&directive(5)).unwrap();
        let v = verify_directive(&bytes, &trust, "pi-7", None, 0, &l).unwrap();
        assert_eq!(v.value, directive(5).clone_with_time(v.value.issued_at));
        assert!(verify_directive(&bytes, &trust, "pi-7", Some(4), 0, &l).is_ok());
        // Replay / downgrade.
        assert!(matches!(
            verify_directive(&bytes, &trust, "pi-7", Some(5), 0, &l),
            Err(ProtocolError::Verify(VerifyError::Replay { sequence: 5, last_accepted: 5, .. }))
        ));
        // Another device's directive.
        assert!(matches!(
            verify_directive(&bytes, &trust, "pi-8", None, 0, &l),
            Err(ProtocolError::WrongDevice { .. })
        ));
        // Rotated-out certificate.
        assert!(matches!(
            verify_directive(&bytes, &trust, "pi-7", None, 2, &l),
            Err(ProtocolError::Verify(VerifyError::CertificateSuperseded { .. }))
        ));
    }

    #[test]
    fn tampered_or_foreign_directives_are_refused() {
        let root = SecretKey::from_seed([1; 32]);
        let trust = TrustRoot::new(root.public_key());
        let l = ProtocolLimits::default();
        let mut bytes = signer(&root, 2).seal(&directive(5)).unwrap();
        // Flip a byte inside the signed payload (the sequence sits early in it).
        let n = bytes.len();
        bytes[n - 80] ^= 0x01;
        assert!(verify_directive(&bytes, &trust, "pi-7", None, 0, &l).is_err());
        // Signed by a key certified by another root.
        let other_root = SecretKey::from_seed([9; 32]);
        let foreign = signer(&other_root, 3).seal(&directive(5)).unwrap();
        assert!(matches!(
            verify_directive(&foreign, &trust, "pi-7", None, 0, &l),
            Err(ProtocolError::Verify(VerifyError::CertificateNotTrusted { .. }))
        ));
        // Over the size limit: refused before parsing.
        let small = ProtocolLimits { directive_bytes: 16, ..l };
        assert!(matches!(
            verify_directive(&bytes, &trust, "pi-7", None, 0, &small),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn invalid_directives_are_not_signed() {
        let root = SecretKey::from_seed([1; 32]);
        let s = signer(&root, 2);
        let mut d = directive(1);
        d.url = Some("ftp://x".into());
        assert!(s.seal(&d).is_err());
        let mut d = directive(1);
        d.device_id = "a/b".into();
        assert!(s.seal(&d).is_err());
        let mut d = directive(1);
        d.probation = Some(Probation { max_error_rate: 2.0, ..Probation::default() });
        assert!(s.seal(&d).is_err());
    }

    impl Directive {
        fn clone_with_time(mut self, t: u64) -> Directive {
            self.issued_at = t;
            self
        }
    }
}
