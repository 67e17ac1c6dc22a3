//! Cost of verifying a bundle: container parsing, two ed25519 signature
//! checks (root → certificate, online key → manifest) and the sha256 of the
//! model, reported by criterion as throughput (convert to time per MiB as
//! 1 / (MiB/s)).
//!
//! Groups:
//! - `verify_fixture`: each model in `fixtures/` (a few KiB each, so the two
//!   signature checks dominate: this is the fixed cost per bundle).
//! - `verify_size`: synthetic models of 1, 4 and 16 MiB: the marginal cost
//!   per MiB (sha256 bound).
//!
//! Run: `cargo bench -p outpost-runtime --bench bundle`.
//!
//! Measured on the 2-core x86-64 development machine (shared, so ±15 %):
//! - fixture bundles (5–29 KiB): 180–350 µs each, i.e. the fixed cost of
//!   the two signature checks, decoding and the canonical-form check;
//! - 1 / 4 / 16 MiB models: 1.28 / 1.17 / 1.14 ms per MiB, so the marginal
//!   cost is ≈1.1 ms per MiB (sha256 at ≈900 MiB/s) on top of ≈0.25 ms.

#[path = "../tests/bundle_common/mod.rs"]
mod bundle_common;

use std::path::Path;

use bundle_common::{bundle_with, fake_model, options, trust};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use outpost_runtime::bundle::{verify_bundle_bytes, verify_bundle_reader};

fn fixture_models() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut models: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("onnx" | "tflite")))
                .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), std::fs::read(&p).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    models.sort();
    models
}

fn verify_fixtures(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify_fixture");
    for (name, model) in fixture_models() {
        let bundle = bundle_with(1, &model);
        group.throughput(Throughput::Bytes(bundle.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(&name), &bundle, |b, bundle| {
            b.iter(|| verify_bundle_bytes(bundle, &trust(), &options()).expect("verifies"))
        });
    }
    group.finish();
}

fn verify_sizes(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify_size");
    group.sample_size(20);
    for mib in [1usize, 4, 16] {
        let bundle = bundle_with(1, &fake_model(mib << 20));
        group.throughput(Throughput::Bytes(bundle.len() as u64));
        group.bench_with_input(BenchmarkId::new("streamed", format!("{mib}MiB")), &bundle, |b, bundle| {
            // The streaming path the agent uses: model bytes go to a sink,
            // never held whole.
            b.iter(|| verify_bundle_reader(&bundle[..], std::io::sink(), &trust(), &options()).expect("verifies"))
        });
    }
    group.finish();
}

criterion_group!(benches, verify_fixtures, verify_sizes);
criterion_main!(benches);
