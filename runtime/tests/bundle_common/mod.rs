//! Shared fixtures for the bundle tests: deterministic keys, a small but
//! complete manifest, and bundles built from them.
#![allow(dead_code)]

use outpost_runtime::bundle::{
    issue_certificate, write_bundle, Certificate, Clock, Digest, Freshness, Manifest, ModelFileFormat, SecretKey,
    SelfTest, SelfTestVector, Signed, Signer, Tolerance, TrustRoot, VerifyOptions, MANIFEST_FORMAT,
};
use outpost_runtime::drift::{OutputValues, ReferenceOptions, ReferenceOutput, ReferenceSketch};
use outpost_runtime::tensor::{ElementType, ModelSignature, TensorData, TensorSpec, TensorValues};

/// When the test certificates are issued (unix seconds, Nov 2023).
pub const ISSUED_AT: u64 = 1_700_000_000;
/// How long they are valid: one year.
pub const VALID_FOR: u64 = 365 * 24 * 3600;
/// "Now" for every verification unless a test says otherwise.
pub const NOW: u64 = ISSUED_AT + 3600;

pub fn root_key() -> SecretKey {
    SecretKey::from_seed([0x01; 32])
}

pub fn online_key() -> SecretKey {
    SecretKey::from_seed([0x02; 32])
}

pub fn trust() -> TrustRoot {
    TrustRoot::new(root_key().public_key())
}

pub fn certificate() -> Signed<Certificate> {
    issue_certificate(&root_key(), &online_key().public_key(), 1, ISSUED_AT, VALID_FOR).expect("certificate")
}

pub fn signer() -> Signer {
    Signer::new(online_key(), certificate()).expect("signer")
}

/// Options a device with nothing accepted yet would use, at [`NOW`].
pub fn options() -> VerifyOptions {
    VerifyOptions { clock: Clock::At(NOW), ..VerifyOptions::new(Freshness::NothingAcceptedYet) }
}

pub fn options_above(last: u64) -> VerifyOptions {
    VerifyOptions { freshness: Freshness::Above(last), ..options() }
}

/// Model bytes: not a real model (verification never loads it), just
/// `len` bytes of a fixed pseudo-random pattern.
pub fn fake_model(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A small reference sketch over two features and a class output.
pub fn reference() -> ReferenceSketch {
    let rows = vec![vec![0.5, 10.0], vec![1.5, 20.0], vec![2.5, 30.0], vec![3.5, 40.0]];
    let outputs = [ReferenceOutput { name: "label".into(), values: OutputValues::Classes(vec![0, 1, 1, 0]) }];
    ReferenceSketch::from_samples(&["a", "b"], &rows, &outputs, &ReferenceOptions { bins: 2 }).expect("sketch")
}

pub fn manifest(name: &str, version: &str, sequence: u64, model: &[u8]) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        version: version.into(),
        sequence,
        model_format: ModelFileFormat::Onnx,
        model_sha256: Digest::of(model),
        model_size: model.len() as u64,
        io: ModelSignature {
            inputs: vec![TensorSpec { name: "x".into(), element_type: ElementType::F32, shape: vec![None, Some(2)] }],
            outputs: vec![TensorSpec { name: "label".into(), element_type: ElementType::I64, shape: vec![None] }],
        },
        reference: reference(),
        self_test: SelfTest {
            tolerance: Tolerance::default(),
            vectors: vec![SelfTestVector {
                inputs: vec![TensorData::f32(vec![1, 2], vec![0.5, 10.0]).expect("tensor")],
                expected: vec![TensorData::new(vec![1], TensorValues::I64(vec![0])).expect("tensor")],
            }],
        },
        issued_at: ISSUED_AT + 600,
    }
}

/// A complete, valid bundle: manifest `demo@1.0.0` with `sequence`.
pub fn bundle_with(sequence: u64, model: &[u8]) -> Vec<u8> {
    let signer = signer();
    let signed = signer.sign(&manifest("demo", "1.0.0", sequence, model)).expect("sign");
    let mut out = Vec::new();
    write_bundle(&mut out, &signed, &[signer.certificate().clone()], model).expect("write");
    out
}

/// Offsets of the container's parts in a bundle (see container.rs).
pub struct Layout {
    pub manifest: std::ops::Range<usize>,
    pub certificates: std::ops::Range<usize>,
    pub model: std::ops::Range<usize>,
}

pub fn layout(bundle: &[u8]) -> Layout {
    let u32_at = |o: usize| u32::from_le_bytes(bundle[o..o + 4].try_into().expect("4 bytes")) as usize;
    let m_start = 16;
    let m_end = m_start + u32_at(12);
    let c_start = m_end + 4;
    let c_end = c_start + u32_at(m_end);
    let model_start = c_end + 8;
    Layout { manifest: m_start..m_end, certificates: c_start..c_end, model: model_start..bundle.len() }
}
