//! Fuzzing the `.outpost` container reader (runtime/src/bundle/container.rs)
//! with random bytes and with valid bundles truncated, bit-flipped, spliced
//! and with their length fields enlarged (issue 17).
//!
//! Property: verification never panics or aborts and returns a typed
//! `VerifyError` for anything but the bundle as signed; any `Ok` is exactly
//! the signed manifest and model. Streaming in random chunk sizes gives the
//! same verdict as verifying the whole file at once.
//!
//! Cases: bounded under `cargo test`; `OUTPOST_FUZZ_CASES=100000` runs that
//! many per strategy (docs/fuzzing.md).

mod bundle_common;
mod fuzz_support;

use std::sync::OnceLock;

use bundle_common::*;
use fuzz_support::{cases, mutate, mutated};
use outpost_runtime::bundle::{
    read_bundle_unverified, verify_bundle_bytes, Limits, StreamVerifier, VerifyError, VerifyOptions, MAGIC,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

struct Seed {
    bytes: Vec<u8>,
    model: Vec<u8>,
}

fn seed() -> &'static Seed {
    static S: OnceLock<Seed> = OnceLock::new();
    S.get_or_init(|| {
        let model = fake_model(700);
        Seed { bytes: bundle_with(5, &model), model }
    })
}

/// Verifies `bytes` whole and in `splits`-sized chunks; checks the verdicts
/// agree and that an `Ok` is the signed bundle.
fn check(bytes: &[u8], splits: &[usize], options: &VerifyOptions) -> Result<(), TestCaseError> {
    let whole = verify_bundle_bytes(bytes, &trust(), options);
    if let Ok(v) = &whole {
        prop_assert_eq!(&v.model, &seed().model);
        prop_assert_eq!(bytes, &seed().bytes[..], "a changed bundle verified");
    }
    let mut streamed = StreamVerifier::new(trust(), *options);
    let mut model = Vec::new();
    let mut rest = bytes;
    let mut failed: Option<VerifyError> = None;
    let mut i = 0;
    while !rest.is_empty() {
        let n = splits.get(i).copied().unwrap_or(usize::MAX).clamp(1, rest.len());
        i += 1;
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        match streamed.feed(chunk) {
            Ok(m) => model.extend_from_slice(m),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let stream_result = match failed {
        Some(e) => Err(e),
        None => streamed.finish(),
    };
    prop_assert_eq!(stream_result.is_ok(), whole.is_ok(), "stream {:?} vs whole {:?}", stream_result.err(), whole.err());
    if whole.is_ok() {
        prop_assert_eq!(&model, &seed().model);
    }
    // The inspect path parses the framing without signatures.
    if let Ok(u) = read_bundle_unverified(bytes, &options.limits) {
        prop_assert!(u.model_len <= bytes.len() as u64);
    }
    Ok(())
}

fn splits() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..600, 0..8)
}

#[test]
fn the_seed_verifies_whole_and_streamed() {
    check(&seed().bytes, &[1, 2, 3, 5, 8, 13, 21], &options()).unwrap();
    assert!(verify_bundle_bytes(&seed().bytes, &trust(), &options()).is_ok());
}

#[test]
fn fuzz_random_bytes() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    let strategy = (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..512), splits());
    runner
        .run(&strategy, |(magic, tail, splits)| {
            let mut b = if magic { MAGIC.to_vec() } else { Vec::new() };
            b.extend_from_slice(&tail);
            check(&b, &splits, &options())
        })
        .unwrap();
}

#[test]
fn fuzz_mutated_bundles() {
    let mut runner = TestRunner::new(fuzz_support::config(cases(4000)));
    let strategy = (mutated(seed().bytes.clone(), 4), splits());
    runner.run(&strategy, |(b, splits)| check(&b, &splits, &options())).unwrap();
}

/// Each length field of the framing set to values up to u64::MAX, with and
/// without the rest of the file, under the default and under tiny limits.
#[test]
fn fuzz_enlarged_length_fields() {
    let l = layout(&seed().bytes);
    let fields = [(12usize, 4usize), (l.manifest.end, 4), (l.certificates.end, 8)];
    let mut runner = TestRunner::new(fuzz_support::config(cases(2000)));
    let strategy = (
        0..fields.len(),
        prop_oneof![Just(u64::MAX), Just(u32::MAX as u64), any::<u64>(), 0u64..100_000],
        any::<usize>(),
        any::<bool>(),
        splits(),
    );
    runner
        .run(&strategy, |(f, value, cut, tiny, splits)| {
            let (at, width) = fields[f];
            let mut b = seed().bytes.clone();
            b[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            b.truncate(cut % (b.len() + 1));
            let mut options = options();
            if tiny {
                options.limits = Limits { manifest_bytes: 64, certificate_bytes: 64, model_bytes: 100, ..options.limits };
            }
            check(&b, &splits, &options)
        })
        .unwrap();
}

#[test]
fn every_truncation_is_refused() {
    let b = &seed().bytes;
    for cut in 0..b.len() {
        assert!(verify_bundle_bytes(&b[..cut], &trust(), &options()).is_err(), "cut at {cut}");
    }
    // And one flipped bit anywhere.
    for i in (0..b.len()).step_by(7) {
        let flipped = mutate(b, &[fuzz_support::Mutation::Flip(i, (i % 8) as u8)]);
        assert!(verify_bundle_bytes(&flipped, &trust(), &options()).is_err(), "bit flip at {i}");
    }
}

// ------------------------------------------- the decoders behind the signature

/// The signed manifest's payload, mutated and decoded as the device does once
/// a signature checked (`decode_unverified` is the same strict decoding,
/// canonical-form and validation step). A manifest that decodes is
/// canonical (re-encodes to the same bytes), and its reference sketch builds
/// a drift monitor that takes a row without panicking.
#[test]
fn fuzz_manifest_payloads() {
    use outpost_runtime::bundle::{Manifest, Signed};
    use outpost_runtime::drift::{DriftMonitor, MonitorConfig};
    use std::sync::Arc;
    let signed = signer().sign(&manifest("demo", "1.0.0", 5, &seed().model)).expect("sign");
    let (key_id, signature) = (signed.signer(), *signed.signature());
    let decoded = std::sync::atomic::AtomicUsize::new(0);
    let n = cases(2000);
    let mut runner = TestRunner::new(fuzz_support::config(n));
    runner
        .run(&mutated(signed.payload().to_vec(), 4), |payload| {
            let s = Signed::<Manifest>::from_parts(payload.clone(), key_id, signature);
            if let Ok(m) = s.decode_unverified(&Limits::default()) {
                decoded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                prop_assert_eq!(Signed::<Manifest>::sign(&m, &online_key()).ok().map(|s| s.payload().to_vec()), Some(payload));
                if let Ok(monitor) = DriftMonitor::new(Arc::new(m.reference.clone()), MonitorConfig::default()) {
                    let features = vec![0.5f32; m.reference.features.len()];
                    let outputs = vec![1.0f32; m.reference.outputs.len()];
                    let _ = monitor.observe(&features, &outputs);
                    let _ = monitor.report();
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("manifest payloads: {n} cases, {} decoded", decoded.into_inner());
}
