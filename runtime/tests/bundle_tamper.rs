//! Nothing tampered gets through: every single-byte change to the manifest,
//! its signature and the certificates, a sample of changes to the model,
//! every truncation, replays, uncertified and expired keys — each refused,
//! and refused for the right reason.

mod bundle_common;

use bundle_common::*;
use outpost_runtime::bundle::{
    issue_certificate, signing_message, verify_bundle_bytes, write_bundle, write_container, Clock, Freshness,
    Limits, Manifest, SecretKey, Signed, SignedPayload, Signer, StreamVerifier, VerifyError, VerifyOptions,
};

const MODEL_LEN: usize = 300 * 1024 + 17;

fn good_bundle() -> Vec<u8> {
    bundle_with(7, &fake_model(MODEL_LEN))
}

fn verify(bytes: &[u8]) -> Result<(), VerifyError> {
    verify_bundle_bytes(bytes, &trust(), &options()).map(|_| ())
}

fn flipped(bundle: &[u8], pos: usize, mask: u8) -> Vec<u8> {
    let mut b = bundle.to_vec();
    b[pos] ^= mask;
    b
}

#[test]
fn the_untampered_bundle_verifies() {
    let bundle = good_bundle();
    let verified = verify_bundle_bytes(&bundle, &trust(), &options()).expect("verifies");
    assert_eq!(verified.model, fake_model(MODEL_LEN));
    assert_eq!(verified.header.value.sequence, 7);
    assert_eq!(verified.header.signer, online_key().key_id());
    assert_eq!(verified.header.certificate.serial, 1);
}

#[test]
fn every_byte_of_the_signed_manifest_is_protected() {
    let bundle = good_bundle();
    let l = layout(&bundle);
    // The section is varint(len) ‖ payload ‖ key id (8) ‖ signature (64).
    let sig_start = l.manifest.end - 64;
    let key_id_start = sig_start - 8;
    // The payload length is a varint of 1 or 2 bytes for this size.
    let varint_len = if l.manifest.len() - 72 - 1 < 128 { 1 } else { 2 };
    let payload_start = l.manifest.start + varint_len;
    let mut checked = 0;
    for pos in l.manifest.clone() {
        for mask in [0x01, 0x80, 0xff] {
            let err = verify(&flipped(&bundle, pos, mask)).expect_err(&format!("flip {mask:#x} at {pos} accepted"));
            if pos >= sig_start {
                assert!(matches!(err, VerifyError::BadSignature { kind: "manifest", .. }), "signature byte {pos}: {err}");
            } else if pos >= key_id_start {
                assert!(matches!(err, VerifyError::UnknownSigningKey { .. }), "key id byte {pos}: {err}");
            } else if pos >= payload_start {
                // Payload bytes: the signature no longer matches.
                assert!(matches!(err, VerifyError::BadSignature { .. }), "payload byte {pos}: {err}");
            }
            checked += 1;
        }
    }
    // A manifest with its reference sketch and a self-test vector.
    assert!(checked > 3 * 250, "manifest section is only {checked} flips");
}

#[test]
fn every_byte_of_the_certificates_is_protected() {
    let bundle = good_bundle();
    let l = layout(&bundle);
    for pos in l.certificates.clone() {
        for mask in [0x01, 0x80, 0xff] {
            let err = verify(&flipped(&bundle, pos, mask)).expect_err(&format!("flip {mask:#x} at {pos} accepted"));
            assert!(
                matches!(
                    err,
                    VerifyError::CertificateNotTrusted { .. }
                        | VerifyError::UnknownSigningKey { .. }
                        | VerifyError::Malformed { .. }
                        | VerifyError::Truncated { .. }
                        | VerifyError::LimitExceeded { .. }
                ),
                "certificate byte {pos}: unexpected {err}"
            );
        }
    }
}

#[test]
fn every_byte_of_the_framing_is_protected() {
    let bundle = good_bundle();
    let l = layout(&bundle);
    let framing: Vec<usize> =
        (0..16).chain(l.manifest.end..l.certificates.start).chain(l.certificates.end..l.model.start).collect();
    for pos in framing {
        for mask in [0x01, 0x80, 0xff] {
            let err = verify(&flipped(&bundle, pos, mask)).expect_err(&format!("flip {mask:#x} at {pos} accepted"));
            match pos {
                0..=7 => assert!(matches!(err, VerifyError::NotABundle), "magic byte {pos}: {err}"),
                8..=11 => assert!(matches!(err, VerifyError::UnknownContainerFormat { .. }), "{err}"),
                _ => {}
            }
        }
    }
}

#[test]
fn a_sample_of_model_bytes_is_protected() {
    let bundle = good_bundle();
    let l = layout(&bundle);
    let len = l.model.len();
    // First and last bytes, every chunk edge, and a spread in between.
    let mut positions: Vec<usize> = vec![0, 1, len - 2, len - 1];
    positions.extend((1..len / 4096).flat_map(|k| [k * 4096 - 1, k * 4096]));
    positions.extend((0..200).map(|i| (i * 7919 * 13) % len));
    for p in positions {
        let err = verify(&flipped(&bundle, l.model.start + p, 0x01)).expect_err(&format!("model byte {p} accepted"));
        assert!(matches!(err, VerifyError::DigestMismatch { .. }), "model byte {p}: {err}");
    }
}

#[test]
fn truncation_at_every_chunk_boundary_is_refused() {
    let bundle = good_bundle();
    let l = layout(&bundle);
    // Every prefix through the header (byte-exact), then every 4 KiB chunk
    // boundary through the model, fed in 4 KiB chunks as the agent would.
    let cuts = (0..l.model.start + 8).chain((l.model.start..bundle.len()).step_by(4096)).chain([bundle.len() - 1]);
    for cut in cuts {
        let mut v = StreamVerifier::new(trust(), options());
        for chunk in bundle[..cut].chunks(4096) {
            v.feed(chunk).unwrap_or_else(|e| panic!("prefix of {cut} bytes refused early: {e}"));
        }
        let err = v.finish().expect_err(&format!("truncated at {cut} accepted"));
        assert!(matches!(err, VerifyError::Truncated { .. }), "cut at {cut}: {err}");
    }
}

#[test]
fn data_after_the_model_is_refused() {
    let mut bundle = good_bundle();
    bundle.push(0);
    assert!(matches!(verify(&bundle), Err(VerifyError::TrailingData { .. })));
}

#[test]
fn a_replayed_older_manifest_is_refused() {
    let model = fake_model(1000);
    let old = bundle_with(5, &model);
    let new = bundle_with(6, &model);
    let accepted = verify_bundle_bytes(&new, &trust(), &options_above(5)).expect("newer one accepted");
    let last = accepted.header.value.sequence;
    for replay in [&old, &new] {
        match verify_bundle_bytes(replay, &trust(), &options_above(last)) {
            Err(VerifyError::Replay { sequence, last_accepted: 6, .. }) => assert!(sequence <= 6),
            other => panic!("replay not refused: {other:?}"),
        }
    }
}

#[test]
fn a_rollback_is_accepted_only_when_a_directive_names_it() {
    let model = fake_model(1000);
    let old = bundle_with(5, &model);
    let named = verify_bundle_bytes(&old, &trust(), &options()).expect("ok").header.payload_digest;
    let by_name = VerifyOptions { freshness: Freshness::NamedBy(named), ..options() };
    verify_bundle_bytes(&old, &trust(), &by_name).expect("named manifest accepted below the last sequence");
    let other = bundle_with(4, &model);
    assert!(matches!(
        verify_bundle_bytes(&other, &trust(), &by_name),
        Err(VerifyError::NotTheNamedManifest { .. })
    ));
}

#[test]
fn a_key_the_root_never_certified_is_refused() {
    let model = fake_model(1000);
    let rogue = SecretKey::from_seed([0x66; 32]);
    let manifest = manifest("demo", "1.0.0", 9, &model);
    let signed = Signed::sign(&manifest, &rogue).expect("sign");

    // 1. Carrying the genuine certificate (for another key).
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &signed, &[certificate()], &model).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::UnknownSigningKey { .. })), "{:?}", verify(&bundle));

    // 2. Carrying a certificate from a root the device does not pin.
    let rogue_root = SecretKey::from_seed([0x67; 32]);
    let rogue_cert = issue_certificate(&rogue_root, &rogue.public_key(), 1, ISSUED_AT, VALID_FOR).expect("cert");
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &signed, std::slice::from_ref(&rogue_cert), &model).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::CertificateNotTrusted { .. })));

    // 3. Both, the genuine one first: still no certificate for this key.
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &signed, &[certificate(), rogue_cert], &model).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::CertificateNotTrusted { .. })));

    // 4. Claiming to be the certified online key: the signature gives it away.
    let forged: Signed<Manifest> =
        Signed::from_parts(signed.payload().to_vec(), online_key().key_id(), *signed.signature());
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &forged, &[certificate()], &model).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::BadSignature { .. })));

    // 5. The root key itself may not sign manifests (it only certifies).
    let by_root = Signed::sign(&manifest, &root_key()).expect("sign");
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &by_root, &[certificate()], &model).expect("write");
    assert!(verify(&bundle).is_err());
}

#[test]
fn an_expired_certificate_is_refused_unless_explicitly_ignored() {
    let bundle = bundle_with(1, &fake_model(1000));
    let expires = ISSUED_AT + VALID_FOR;
    let at = |clock| VerifyOptions { clock, ..options() };
    verify_bundle_bytes(&bundle, &trust(), &at(Clock::At(expires - 1))).expect("valid until the last second");
    match verify_bundle_bytes(&bundle, &trust(), &at(Clock::At(expires))) {
        Err(VerifyError::CertificateExpired { expired_at, .. }) => assert_eq!(expired_at, expires),
        other => panic!("expired certificate accepted: {other:?}"),
    }
    // The system clock (2024 or later) is past this test certificate's expiry.
    assert!(matches!(
        verify_bundle_bytes(&bundle, &trust(), &at(Clock::System)),
        Err(VerifyError::CertificateExpired { .. })
    ));
    verify_bundle_bytes(&bundle, &trust(), &at(Clock::UnsafeIgnoreExpiry)).expect("explicitly unsafe");
}

#[test]
fn a_rotated_out_key_is_refused_once_a_newer_serial_was_seen() {
    let bundle = bundle_with(1, &fake_model(1000));
    let opts = VerifyOptions { min_certificate_serial: 2, ..options() };
    assert!(matches!(
        verify_bundle_bytes(&bundle, &trust(), &opts),
        Err(VerifyError::CertificateSuperseded { serial: 1, min_serial: 2, .. })
    ));
}

#[test]
fn a_bundle_a_directive_names_stays_installable_after_rotation_and_expiry() {
    // Signed under certificate serial 1, which has since been rotated out
    // (serial 2 seen) and has expired: a fresh directive that names this
    // exact manifest vouches for it (bundle module docs, Key rotation).
    let model = fake_model(1000);
    let bundle = bundle_with(3, &model);
    let named = verify_bundle_bytes(&bundle, &trust(), &options()).expect("ok").header.payload_digest;
    let later = Clock::At(ISSUED_AT + VALID_FOR + 1);
    let by_name = VerifyOptions { freshness: Freshness::NamedBy(named), min_certificate_serial: 2, clock: later, ..options() };
    verify_bundle_bytes(&bundle, &trust(), &by_name).expect("named by a directive: installable after rotation");

    // Not named: the same bundle is refused for the rotation and the expiry.
    let above = VerifyOptions { freshness: Freshness::Above(0), ..by_name };
    assert!(matches!(verify_bundle_bytes(&bundle, &trust(), &above), Err(VerifyError::CertificateSuperseded { .. })));
    let above = VerifyOptions { min_certificate_serial: 0, ..above };
    assert!(matches!(verify_bundle_bytes(&bundle, &trust(), &above), Err(VerifyError::CertificateExpired { .. })));

    // Waiving the floor is no opening for the old key: anything else it signs
    // is not the payload the directive named, and a rogue root stays refused.
    let other = bundle_with(4, &model);
    assert!(matches!(verify_bundle_bytes(&other, &trust(), &by_name), Err(VerifyError::NotTheNamedManifest { .. })));
    let rogue_root = SecretKey::from_seed([0x68; 32]);
    let rogue_cert = issue_certificate(&rogue_root, &online_key().public_key(), 9, ISSUED_AT, VALID_FOR).expect("cert");
    let signed = Signed::sign(&manifest("demo", "1.0.0", 3, &model), &online_key()).expect("sign");
    let mut forged = Vec::new();
    write_bundle(&mut forged, &signed, &[rogue_cert], &model).expect("write");
    let digest = signed.payload_digest();
    let by_forged = VerifyOptions { freshness: Freshness::NamedBy(digest), ..by_name };
    assert!(matches!(
        verify_bundle_bytes(&forged, &trust(), &by_forged),
        Err(VerifyError::CertificateNotTrusted { .. })
    ));
}

#[test]
fn model_size_and_digest_mismatches_are_refused() {
    let model = fake_model(1000);
    let signer = signer();
    let cert = [signer.certificate().clone()];

    let mut m = manifest("demo", "1.0.0", 1, &model);
    m.model_size += 1;
    let mut bundle = Vec::new();
    write_container(&mut bundle, &signer.sign(&m).expect("sign"), &cert, &model).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::SizeMismatch { expected: 1001, found: 1000 })));

    let m = manifest("demo", "1.0.0", 1, &fake_model(999));
    let mut other = model.clone();
    other.truncate(999);
    other[0] ^= 1;
    let mut bundle = Vec::new();
    write_container(&mut bundle, &signer.sign(&m).expect("sign"), &cert, &other).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::DigestMismatch { .. })));
}

#[test]
fn an_unknown_manifest_format_is_refused_cleanly() {
    // A validly signed manifest in a future format 2: its first varint is 2.
    let model = fake_model(100);
    let good = signer().sign(&manifest("demo", "1.0.0", 1, &model)).expect("sign");
    let mut payload = good.payload().to_vec();
    payload[0] = 2;
    let signature = online_key().sign_message(&signing_message(Manifest::KIND, &payload));
    let future: Signed<Manifest> = Signed::from_parts(payload, online_key().key_id(), signature);
    let mut bundle = Vec::new();
    write_container(&mut bundle, &future, &[certificate()], &model).expect("write");
    match verify(&bundle) {
        Err(VerifyError::UnknownFormat { kind: "manifest", found: Some(2), supported: 1 }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_non_canonical_payload_is_refused_even_if_signed() {
    // The same manifest with trailing bytes, signed: decoding must not
    // silently ignore what the signature covered.
    let model = fake_model(100);
    let good = signer().sign(&manifest("demo", "1.0.0", 1, &model)).expect("sign");
    let mut payload = good.payload().to_vec();
    payload.push(0);
    let signature = online_key().sign_message(&signing_message(Manifest::KIND, &payload));
    let padded: Signed<Manifest> = Signed::from_parts(payload, online_key().key_id(), signature);
    let mut bundle = Vec::new();
    write_container(&mut bundle, &padded, &[certificate()], &model).expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::Malformed { .. })));
}

#[test]
fn invalid_manifests_are_neither_signed_nor_accepted() {
    let model = fake_model(100);
    for (name, version) in [("../etc", "1.0.0"), ("demo", "one"), ("", "1.0.0")] {
        let m = manifest(name, version, 1, &model);
        assert!(signer().sign(&m).is_err(), "{name}@{version} signed");
        // Signed anyway by a broken fleet: the device refuses it.
        let payload = postcard::to_stdvec(&m).expect("encode");
        let signature = online_key().sign_message(&signing_message(Manifest::KIND, &payload));
        let signed: Signed<Manifest> = Signed::from_parts(payload, online_key().key_id(), signature);
        let mut bundle = Vec::new();
        write_container(&mut bundle, &signed, &[certificate()], &model).expect("write");
        assert!(matches!(verify(&bundle), Err(VerifyError::Invalid { .. })), "{name}@{version}");
    }
}

#[test]
fn limits_stop_endless_data() {
    let bundle = good_bundle();
    let l = layout(&bundle);
    // A manifest length of 4 GiB: refused from the 4 length bytes alone.
    let mut huge = bundle[..16].to_vec();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut v = StreamVerifier::new(trust(), options());
    assert!(matches!(v.feed(&huge), Err(VerifyError::LimitExceeded { what: "signed manifest", .. })));
    // Once refused, the verifier stays refused.
    assert!(matches!(v.feed(&bundle[16..]), Err(VerifyError::AlreadyFailed)));

    // A model over the device's limit is refused at the manifest, before
    // any model byte is read.
    let small = VerifyOptions { limits: Limits { model_bytes: 1024, ..Limits::default() }, ..options() };
    let mut v = StreamVerifier::new(trust(), small);
    assert!(v.feed(&bundle[..l.model.start]).is_err());

    // Too many certificates.
    let model = fake_model(10);
    let signer = signer();
    let certs = vec![signer.certificate().clone(); 9];
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &signer.sign(&manifest("demo", "1.0.0", 1, &model)).expect("sign"), &certs, &model)
        .expect("write");
    assert!(matches!(verify(&bundle), Err(VerifyError::LimitExceeded { .. })));
}

#[test]
fn a_signer_refuses_a_certificate_for_another_key() {
    let other = SecretKey::from_seed([0x33; 32]);
    assert!(Signer::new(other, certificate()).is_err());
    // Directives and manifests are not interchangeable: domain separation.
    let model = fake_model(10);
    let signed = signer().sign(&manifest("demo", "1.0.0", 1, &model)).expect("sign");
    assert!(!online_key().public_key().verify(&signing_message("directive", signed.payload()), signed.signature()));
    assert_eq!(<Manifest as SignedPayload>::KIND, "manifest");
}
