//! The generic signed envelope: deployment directives (online key, with
//! certificates) and device messages (a device's own key), as the agent and
//! the fleet server will use them.

mod bundle_common;

use bundle_common::*;
use outpost_runtime::bundle::{
    verify_signed, Clock, Envelope, Freshness, Limits, SecretKey, Signed, SignedPayload, VerifyError, VerifyOptions,
};
use serde::{Deserialize, Serialize};

/// Stand-in for the fleet's deployment directive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Directive {
    format: u32,
    sequence: u64,
    model: String,
    manifest_sha256: [u8; 32],
}

impl SignedPayload for Directive {
    const KIND: &'static str = "directive";
    const FORMAT: u32 = 1;
    fn sequence(&self) -> Option<u64> {
        Some(self.sequence)
    }
}

/// Stand-in for a device's signed state report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DeviceState {
    format: u32,
    counter: u64,
    status: String,
}

impl SignedPayload for DeviceState {
    const KIND: &'static str = "device-state";
    const FORMAT: u32 = 1;
    fn sequence(&self) -> Option<u64> {
        Some(self.counter)
    }
}

fn directive(sequence: u64) -> Directive {
    Directive { format: 1, sequence, model: "demo@1.0.0".into(), manifest_sha256: [7; 32] }
}

#[test]
fn a_sealed_directive_verifies_and_replays_are_refused() {
    let bytes = signer().seal(&directive(10)).expect("seal");
    let v = verify_signed::<Directive>(&bytes, &trust(), &options_above(9)).expect("fresh directive");
    assert_eq!(v.value, directive(10));
    assert_eq!(v.signer, online_key().key_id());
    assert!(matches!(
        verify_signed::<Directive>(&bytes, &trust(), &options_above(10)),
        Err(VerifyError::Replay { kind: "directive", sequence: 10, last_accepted: 10 })
    ));
}

#[test]
fn every_byte_of_a_directive_envelope_is_protected() {
    let bytes = signer().seal(&directive(10)).expect("seal");
    for pos in 0..bytes.len() {
        for mask in [0x01, 0x80] {
            let mut b = bytes.clone();
            b[pos] ^= mask;
            assert!(verify_signed::<Directive>(&b, &trust(), &options()).is_err(), "flip at {pos} accepted");
        }
    }
    for cut in 0..bytes.len() {
        assert!(verify_signed::<Directive>(&bytes[..cut], &trust(), &options()).is_err(), "cut at {cut} accepted");
    }
}

#[test]
fn directive_certificate_checks_match_bundles() {
    let bytes = signer().seal(&directive(1)).expect("seal");
    let expired = VerifyOptions { clock: Clock::At(ISSUED_AT + VALID_FOR), ..options() };
    assert!(matches!(
        verify_signed::<Directive>(&bytes, &trust(), &expired),
        Err(VerifyError::CertificateExpired { .. })
    ));
    let other_root = outpost_runtime::bundle::TrustRoot::new(SecretKey::from_seed([0x55; 32]).public_key());
    assert!(matches!(
        verify_signed::<Directive>(&bytes, &other_root, &options()),
        Err(VerifyError::CertificateNotTrusted { .. })
    ));
    let tiny = VerifyOptions { limits: Limits { envelope_bytes: 16, ..Limits::default() }, ..options() };
    assert!(matches!(
        verify_signed::<Directive>(&bytes, &trust(), &tiny),
        Err(VerifyError::LimitExceeded { .. })
    ));
}

#[test]
fn a_manifest_cannot_pass_as_a_directive() {
    // Same online key, same envelope shape: domain separation refuses it.
    let model = fake_model(10);
    let signed = signer().sign(&manifest("demo", "1.0.0", 1, &model)).expect("sign");
    let as_directive: Signed<Directive> =
        Signed::from_parts(signed.payload().to_vec(), signed.signer(), *signed.signature());
    let envelope = Envelope { certificates: vec![certificate()], signed: as_directive };
    let bytes = postcard::to_stdvec(&envelope).expect("encode");
    assert!(matches!(
        verify_signed::<Directive>(&bytes, &trust(), &options()),
        Err(VerifyError::BadSignature { kind: "directive", .. })
    ));
}

#[test]
fn device_messages_verify_with_the_device_key() {
    let device = SecretKey::from_seed([0x44; 32]);
    let state = DeviceState { format: 1, counter: 3, status: "serving".into() };
    let signed = Signed::sign(&state, &device).expect("sign");
    let wire = signed.to_bytes();

    let received: Signed<DeviceState> = Signed::from_bytes(&wire, 4096).expect("parse");
    assert_eq!(received.open(&device.public_key(), &Limits::default()).expect("open"), state);

    // Another device's key, or a changed byte: refused.
    let other = SecretKey::from_seed([0x45; 32]).public_key();
    assert!(matches!(
        received.open(&other, &Limits::default()),
        Err(VerifyError::UnknownSigningKey { .. })
    ));
    for pos in 0..wire.len() {
        let mut b = wire.clone();
        b[pos] ^= 0x01;
        let tampered = Signed::<DeviceState>::from_bytes(&b, 4096).and_then(|s| s.open(&device.public_key(), &Limits::default()));
        assert!(tampered.is_err(), "flip at {pos} accepted");
    }
}

#[test]
fn freshness_has_no_default() {
    // `VerifyOptions::new` takes the freshness requirement: the safe
    // parts (system clock, default limits) are defaults, replay policy is not.
    let o = VerifyOptions::new(Freshness::Above(3));
    assert_eq!(o.clock, Clock::System);
    assert_eq!(o.limits, Limits::default());
    assert_eq!(o.min_certificate_serial, 0);
}
