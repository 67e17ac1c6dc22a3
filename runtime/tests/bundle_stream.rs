//! The streaming verifier: any chunking gives the same result as verifying
//! the whole file, the header is verified before the model arrives, and the
//! reader/file entry points agree with it.

mod bundle_common;

use bundle_common::*;
use outpost_runtime::bundle::{
    read_bundle_unverified, verify_bundle_bytes, verify_bundle_file, verify_bundle_reader, Limits, StreamVerifier,
    VerifyError,
};

#[test]
fn any_chunking_yields_the_same_model_bytes() {
    let model = fake_model(70_000);
    let bundle = bundle_with(3, &model);
    for chunk_size in [1, 2, 3, 7, 64, 1000, 4096, 65536, bundle.len()] {
        let mut v = StreamVerifier::new(trust(), options());
        let mut out = Vec::new();
        for chunk in bundle.chunks(chunk_size) {
            out.extend_from_slice(v.feed(chunk).expect("feed"));
        }
        let header = v.finish().expect("finish");
        assert_eq!(out, model, "chunk size {chunk_size}");
        assert_eq!(header.value.sequence, 3);
    }
}

#[test]
fn the_header_is_verified_before_the_model_arrives() {
    let model = fake_model(50_000);
    let bundle = bundle_with(3, &model);
    let l = layout(&bundle);
    let mut v = StreamVerifier::new(trust(), options());
    assert!(v.header().is_none());
    assert_eq!(v.feed(&bundle[..l.certificates.end]).expect("header").len(), 0);
    let header = v.header().expect("verified header").clone();
    assert_eq!(header.value.model_size, 50_000);
    assert_eq!(v.expected_len(), Some(bundle.len() as u64));
    v.feed(&bundle[l.certificates.end..l.model.start + 10]).expect("model start");
    assert_eq!(v.expected_len(), Some(bundle.len() as u64));
    assert_eq!(v.bytes_seen(), (l.model.start + 10) as u64);

    // A replayed bundle is refused as soon as its header is in, before any
    // model byte: the device need not download the rest.
    let mut v = StreamVerifier::new(trust(), options_above(3));
    assert!(matches!(v.feed(&bundle[..l.certificates.end]), Err(VerifyError::Replay { .. })));
}

#[test]
fn reader_file_and_bytes_agree() {
    let model = fake_model(10_000);
    let bundle = bundle_with(3, &model);
    let mut sink = Vec::new();
    let header = verify_bundle_reader(&bundle[..], &mut sink, &trust(), &options()).expect("reader");
    assert_eq!(sink, model);

    let dir = std::env::temp_dir().join(format!("outpost-bundle-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("demo.outpost");
    std::fs::write(&path, &bundle).expect("write");
    let from_file = verify_bundle_file(&path, &trust(), &options()).expect("file");
    assert_eq!(from_file.header, header);
    assert_eq!(from_file.model, model);
    let from_bytes = verify_bundle_bytes(&bundle, &trust(), &options()).expect("bytes");
    assert_eq!(from_bytes.header, header);

    let missing = verify_bundle_file(dir.join("missing.outpost"), &trust(), &options());
    assert!(matches!(missing, Err(VerifyError::Io { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unverified_reading_shows_claims_without_trusting_them() {
    let model = fake_model(1000);
    let mut bundle = bundle_with(3, &model);
    let last = bundle.len() - 1;
    bundle[last] ^= 1;
    let raw = read_bundle_unverified(&bundle[..], &Limits::default()).expect("framing is fine");
    let claimed = raw.manifest.decode_unverified(&Limits::default()).expect("decodes");
    assert_eq!(raw.model_len, 1000);
    assert_ne!(raw.model_sha256, claimed.model_sha256, "the tampered model hashes differently");
    assert_eq!(raw.certificates.len(), 1);
}

#[test]
fn an_empty_model_is_still_checked() {
    let bundle = bundle_with(3, &[]);
    let v = verify_bundle_bytes(&bundle, &trust(), &options()).expect("empty model verifies");
    assert!(v.model.is_empty());
    let mut extra = bundle.clone();
    extra.push(1);
    assert!(matches!(verify_bundle_bytes(&extra, &trust(), &options()), Err(VerifyError::TrailingData { .. })));
}
