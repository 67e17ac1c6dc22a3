//! Fuzzing the MQTT protocol decoders (runtime/src/protocol): sealed
//! directives (`verify_directive`), device-signed envelopes
//! (`DeviceSigned::from_bytes`, `open`, `parse_state_payload`) of every
//! message kind, and chunk replies (`ChunkReply::from_bytes`) (issue 17).
//!
//! Property: never a panic or an abort, a typed `ProtocolError` for what is
//! not the message as signed; an `Ok` is consistent: a verified directive or
//! opened envelope is exactly what was signed, and a decoded envelope or
//! chunk reply survives re-encoding unchanged.
//!
//! Cases: bounded under `cargo test`; `OUTPOST_FUZZ_CASES=100000` runs that
//! many per strategy (docs/fuzzing.md).

mod fuzz_support;

use std::sync::OnceLock;

use fuzz_support::{cases, mutated};
use outpost_runtime::bundle::{issue_certificate, unix_now, Digest, SecretKey, Signer, TrustRoot};
use outpost_runtime::protocol::{
    parse_state_payload, verify_directive, ChunkReply, ChunkRequest, DeviceMessage, DeviceSigned, DeviceState,
    DeviceWill, Directive, Limits, LatencySketch, ModelRef, SketchMessage, StatePayload, Status, Telemetry,
    SKETCH_FORMAT, TELEMETRY_FORMAT,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const DEVICE: &str = "pi-7";

fn root() -> SecretKey {
    SecretKey::from_seed([0x11; 32])
}

fn device_key() -> SecretKey {
    SecretKey::from_seed([0x33; 32])
}

fn trust() -> TrustRoot {
    TrustRoot::new(root().public_key())
}

fn directive() -> Directive {
    Directive::new(DEVICE, 9, "bc-mlp", "1.2.0", Digest([7; 32]), 123_456, Digest([8; 32]))
}

/// A directive sealed by an online key whose certificate is valid now.
fn sealed_directive() -> &'static (Vec<u8>, Directive) {
    static S: OnceLock<(Vec<u8>, Directive)> = OnceLock::new();
    S.get_or_init(|| {
        let online = SecretKey::from_seed([0x22; 32]);
        let cert = issue_certificate(&root(), &online.public_key(), 3, unix_now() - 60, 30 * 24 * 3600).expect("cert");
        let bytes = Signer::new(online, cert).expect("signer").seal(&directive()).expect("seal");
        let v = verify_directive(&bytes, &trust(), DEVICE, None, 0, &Limits::default()).expect("seed verifies");
        (bytes, v.value)
    })
}

fn signed<T: DeviceMessage>(value: &T) -> Vec<u8> {
    DeviceSigned::sign(DEVICE, 41, value, &device_key()).expect("sign").to_bytes()
}

fn model_ref() -> ModelRef {
    ModelRef { name: "bc-mlp".into(), version: "1.2.0".into() }
}

fn telemetry() -> Telemetry {
    Telemetry {
        format: TELEMETRY_FORMAT,
        model: Some(model_ref()),
        status: Status::Serving,
        committed: true,
        window_start_unix_ms: 1,
        window_end_unix_ms: 60_001,
        requests: 100,
        input_errors: 3,
        failures: 1,
        rows: 120,
        error_rate: 0.0099,
        latency_p50_ms: Some(0.5),
        latency_p99_ms: None,
        drift: None,
        memory_rss_bytes: Some(9 << 20),
        dropped_while_offline: 0,
        uptime_secs: 77,
    }
}

fn sketch() -> SketchMessage {
    SketchMessage {
        format: SKETCH_FORMAT,
        model: model_ref(),
        window_start_unix_ms: 5,
        window_end_unix_ms: 10,
        drift: None,
        latency: LatencySketch { buckets_log2_us: vec![0, 3, 9, 1] },
    }
}

/// `from_bytes`, then `open` with the device's key: an opened message is the
/// one signed; a decoded envelope re-encodes to one that decodes the same.
fn check_envelope<T: DeviceMessage + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    original: &T,
) -> Result<(), TestCaseError> {
    let limits = Limits::default();
    let Ok(env) = DeviceSigned::<T>::from_bytes(bytes, &limits) else { return Ok(()) };
    let again = DeviceSigned::<T>::from_bytes(&env.to_bytes(), &limits)
        .map_err(|e| TestCaseError::fail(format!("re-encoded envelope refused: {e}")))?;
    prop_assert_eq!(again.device_id(), env.device_id());
    prop_assert_eq!(again.counter(), env.counter());
    let _ = env.decode_unverified(&limits);
    if let Ok(value) = env.open(DEVICE, &device_key().public_key(), Some(40), &limits) {
        prop_assert_eq!(&value, original);
        prop_assert_eq!(env.counter(), 41);
    }
    Ok(())
}

/// One state for the whole run (`new` stamps the time).
fn state() -> DeviceState {
    static S: OnceLock<DeviceState> = OnceLock::new();
    S.get_or_init(|| DeviceState::new(Status::Serving)).clone()
}

fn envelope_seeds() -> Vec<Vec<u8>> {
    vec![
        signed(&state()),
        signed(&DeviceWill::offline()),
        signed(&telemetry()),
        signed(&sketch()),
        signed(&ChunkRequest::new(Digest([4; 32]), 65_536, 32_768)),
    ]
}

fn check_all_envelopes(b: &[u8]) -> Result<(), TestCaseError> {
    check_envelope(b, &state())?;
    check_envelope(b, &DeviceWill::offline())?;
    check_envelope(b, &telemetry())?;
    check_envelope(b, &sketch())?;
    check_envelope(b, &ChunkRequest::new(Digest([4; 32]), 65_536, 32_768))?;
    match parse_state_payload(b, &Limits::default()) {
        Ok(StatePayload::Signed(s)) => prop_assert_eq!(s.device_id(), s.device_id()),
        Ok(StatePayload::Cleared) => prop_assert!(b.is_empty()),
        _ => {}
    }
    Ok(())
}

fn check_directive(b: &[u8]) -> Result<(), TestCaseError> {
    let l = Limits::default();
    if let Ok(v) = verify_directive(b, &trust(), DEVICE, None, 0, &l) {
        prop_assert_eq!(&v.value, &sealed_directive().1);
    }
    // Replay: the seed's own sequence is never accepted again.
    prop_assert!(verify_directive(b, &trust(), DEVICE, Some(9), 0, &l).is_err());
    let _ = verify_directive(b, &trust(), "pi-8", Some(1), 0, &l);
    Ok(())
}

fn check_chunk_reply(b: &[u8]) -> Result<(), TestCaseError> {
    let l = Limits::default();
    if let Ok(r) = ChunkReply::from_bytes(b, &l) {
        let again = ChunkReply::from_bytes(&r.to_bytes(), &l)
            .map_err(|e| TestCaseError::fail(format!("re-encoded reply refused: {e}")))?;
        prop_assert_eq!(again, r);
    }
    Ok(())
}

fn chunk_seeds() -> Vec<Vec<u8>> {
    vec![
        ChunkReply::data(Digest([3; 32]), 10, 20, vec![1, 2, 3]).to_bytes(),
        ChunkReply::data(Digest([3; 32]), 0, 1 << 20, vec![9; 300]).to_bytes(),
        ChunkReply::unavailable(Digest([3; 32]), 0, "unknown bundle").to_bytes(),
    ]
}

#[test]
fn seeds_are_accepted() {
    let (bytes, d) = sealed_directive();
    check_directive(bytes).unwrap();
    assert_eq!(d.sequence, 9);
    for s in envelope_seeds() {
        check_all_envelopes(&s).unwrap();
    }
    assert!(matches!(parse_state_payload(&envelope_seeds()[0], &Limits::default()), Ok(StatePayload::Signed(_))));
    assert!(matches!(parse_state_payload(&envelope_seeds()[1], &Limits::default()), Ok(StatePayload::Will(_))));
    for s in chunk_seeds() {
        assert!(ChunkReply::from_bytes(&s, &Limits::default()).is_ok());
    }
}

#[test]
fn fuzz_directives() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    let strategy = prop_oneof![
        4 => mutated(sealed_directive().0.clone(), 4),
        1 => proptest::collection::vec(any::<u8>(), 0..400),
    ];
    runner.run(&strategy, |b| check_directive(&b)).unwrap();
}

#[test]
fn fuzz_device_envelopes() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(3000)));
    let strategy = prop_oneof![
        6 => prop::sample::select(envelope_seeds()).prop_flat_map(|s| mutated(s, 4)),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => "\\{\"kind\":\"(state|will|x)\"(,\"[a-z_]{1,9}\":(1|\"a\"|\\[\\]|null|\\{\\}))*\\}".prop_map(String::into_bytes),
    ];
    runner.run(&strategy, |b| check_all_envelopes(&b)).unwrap();
}

#[test]
fn fuzz_chunk_replies() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(3000)));
    let strategy = prop_oneof![
        4 => prop::sample::select(chunk_seeds()).prop_flat_map(|s| mutated(s, 4)),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ];
    runner.run(&strategy, |b| check_chunk_reply(&b)).unwrap();
}

/// Mutated directive payloads *signed by the online key*, so they pass the
/// signature and reach strict decoding, canonical form, field checks and the
/// device check. A directive that verifies re-seals to one that verifies the
/// same.
#[test]
fn fuzz_signed_directive_payloads() {
    use outpost_runtime::bundle::{signing_message, Envelope, SignedPayload, Signed};
    let online = SecretKey::from_seed([0x22; 32]);
    let cert = issue_certificate(&root(), &online.public_key(), 3, unix_now() - 60, 30 * 24 * 3600).expect("cert");
    let signer = Signer::new(SecretKey::from_seed([0x22; 32]), cert.clone()).expect("signer");
    let payload = signer.sign(&directive()).expect("sign").payload().to_vec();
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    runner
        .run(&mutated(payload, 3), |p| {
            let signature = online.sign_message(&signing_message(Directive::KIND, &p));
            let signed = Signed::<Directive>::from_parts(p, online.key_id(), signature);
            let envelope = Envelope { certificates: vec![cert.clone()], signed };
            let bytes = postcard::to_stdvec(&envelope).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Ok(v) = verify_directive(&bytes, &trust(), DEVICE, None, 0, &Limits::default()) {
                let again = signer.seal(&v.value).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let w = verify_directive(&again, &trust(), DEVICE, None, 0, &Limits::default())
                    .map_err(|e| TestCaseError::fail(format!("re-sealed directive refused: {e}")))?;
                prop_assert_eq!(w.value, v.value);
            }
            Ok(())
        })
        .unwrap();
}
