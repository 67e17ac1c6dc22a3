//! `outpost-fleet keygen`, `keygen --rotate` and `bundle` as an operator runs
//! them, checked with the runtime's own verification (what devices run).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_runtime::bundle::{
    cli::{inspect, InspectArgs},
    open_verified, read_certificate_file, verify_bundle_file, Freshness, Limits, TrustRoot, VerifyError,
    VerifyOptions,
};
use outpost_runtime::model::LoadOptions;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-fleet-bundle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn fleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-fleet")).args(args).output().expect("run outpost-fleet")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn bundle(keys: &Path, model: &str, version: &str, sequence: u64, out: &Path, extra: &[&str]) -> Output {
    let model = fixtures().join(model);
    let reference = if model.to_string_lossy().contains("digits") { "data/digits_test.csv" } else { "data/bc_train.csv" };
    let seq = sequence.to_string();
    let mut args = vec!["bundle", s(&model), "--name", "demo", "--version", version, "--sequence", &seq];
    let reference = fixtures().join(reference);
    args.extend(["--keys", s(keys), "--reference-data", s(&reference), "--out", s(out)]);
    args.extend(extra);
    fleet(&args)
}

fn device_options(freshness: Freshness) -> VerifyOptions {
    VerifyOptions::new(freshness)
}

#[test]
fn keygen_writes_private_keys_privately_and_never_prints_them() {
    let dir = temp_dir("keygen");
    let keys = dir.join("keys");
    let out = fleet(&["keygen", "--out", s(&keys)]);
    assert!(out.status.success(), "{}", text(&out));
    for f in ["root.key", "root.pub", "online.key", "online.pub", "online.cert"] {
        assert!(keys.join(f).exists(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(keys.join(f)).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode("root.key"), 0o600);
        assert_eq!(mode("online.key"), 0o600);
        assert_eq!(mode("root.pub"), 0o644);
        assert_eq!(std::fs::metadata(&keys).expect("meta").permissions().mode() & 0o777, 0o700);
    }
    for f in ["root.key", "online.key"] {
        let secret = std::fs::read_to_string(keys.join(f)).expect("read");
        let hex = secret.lines().last().and_then(|l| l.split(' ').nth(1)).expect("key line");
        assert!(!text(&out).contains(hex), "{f} printed");
    }
    // Never a second root over the first.
    let again = fleet(&["keygen", "--out", s(&keys)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again).contains("already exists"), "{}", text(&again));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bundle_verify_rotate_and_refusals() {
    let dir = temp_dir("flow");
    let keys = dir.join("keys");
    assert!(fleet(&["keygen", "--out", s(&keys), "--json"]).status.success());
    let trust = TrustRoot::read_file(keys.join("root.pub")).expect("root.pub");

    // A bundle with an accuracy gate it passes: accuracy printed.
    let first = dir.join("v1.outpost");
    let test = fixtures().join("data/bc_test.csv");
    let out = bundle(&keys, "bc_mlp.onnx", "1.0.0", 1, &first, &["--test-data", s(&test), "--min-accuracy", "0.9"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("accuracy 0.9580 (137/143"), "{}", text(&out));

    // Verified and served as a device would: signature, then load + self-test.
    let v = verify_bundle_file(&first, &trust, &device_options(Freshness::NothingAcceptedYet)).expect("verifies");
    let m = &v.header.value;
    assert_eq!((m.name.as_str(), m.version.as_str(), m.sequence), ("demo", "1.0.0", 1));
    assert_eq!(m.reference.features.len(), 30);
    assert_eq!(m.reference.outputs.len(), 1, "the label output is sketched");
    assert_eq!(m.self_test.vectors.len(), 4);
    let opened = open_verified(&first, &trust, &device_options(Freshness::NothingAcceptedYet), &LoadOptions::default())
        .expect("loads and passes its self-test");
    assert_eq!(opened.model.signature(), &m.io);

    // The inspect view of the same file.
    let json: serde_json::Value =
        serde_json::from_str(&inspect(&InspectArgs { file: first.clone() }).expect("inspect")).expect("json");
    assert_eq!(json["manifest"]["name"], "demo");

    // Below the accuracy minimum: refused, accuracy printed, nothing written.
    let refused = dir.join("refused.outpost");
    let out = bundle(&keys, "bc_mlp.onnx", "1.0.1", 2, &refused, &["--test-data", s(&test), "--min-accuracy", "0.99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("accuracy 0.9580") && text(&out).contains("below --min-accuracy 0.99"), "{}", text(&out));
    assert!(!refused.exists());

    // A model the runtime cannot load: refused.
    let out = bundle(&keys, "bad/not_a_model.onnx", "1.0.1", 2, &refused, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cannot load"), "{}", text(&out));
    assert!(!refused.exists());

    // Bad arguments: one-line cause, exit 1.
    for (version, extra) in [("one", vec![]), ("1.0.0", vec!["--min-accuracy", "0.5"])] {
        let out = bundle(&keys, "bc_mlp.onnx", version, 2, &refused, &extra);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end().lines().count(), 1, "{}", text(&out));
    }

    // Rotation with only the root key at hand; devices keep their root.pub.
    let old_serial = cert_serial(&keys);
    let offline = dir.join("offline");
    std::fs::create_dir_all(&offline).expect("dir");
    std::fs::copy(keys.join("root.key"), offline.join("root.key")).expect("copy");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(offline.join("root.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let out = fleet(&["keygen", "--rotate", "--out", s(&offline)]);
    assert!(out.status.success(), "{}", text(&out));
    // The rotated key goes to the server's directory (root.key stays offline).
    for f in ["online.key", "online.pub", "online.cert"] {
        std::fs::copy(offline.join(f), keys.join(f)).expect("install rotated key");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(keys.join("online.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let new_serial = cert_serial(&keys);
    // Serials are issue times; with no certificate beside the root key, a
    // rotation within the same second as keygen repeats the serial.
    assert!(new_serial >= old_serial, "serial {new_serial} after {old_serial}");
    // Where the previous certificate is at hand, the serial strictly rises.
    let out = fleet(&["keygen", "--rotate", "--out", s(&keys)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(cert_serial(&keys) > new_serial);

    let second = dir.join("v2.outpost");
    let out = bundle(&keys, "bc_gb.onnx", "2.0.0", 2, &second, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let v2 = verify_bundle_file(&second, &trust, &device_options(Freshness::Above(1))).expect("same root verifies");
    assert_ne!(v2.header.signer, v.header.signer, "signed by the new online key");

    // Replaying the first bundle after the second: refused.
    assert!(matches!(
        verify_bundle_file(&first, &trust, &device_options(Freshness::Above(2))),
        Err(VerifyError::Replay { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_and_tflite_models_bundle_too() {
    let dir = temp_dir("image");
    let keys = dir.join("keys");
    assert!(fleet(&["keygen", "--out", s(&keys)]).status.success());
    let trust = TrustRoot::read_file(keys.join("root.pub")).expect("root.pub");
    for model in ["digits_cnn.onnx", "digits_cnn.tflite", "bc_mlp_prelu.tflite"] {
        let out_path = dir.join(format!("{model}.outpost"));
        let out = bundle(&keys, model, "1.0.0", 1, &out_path, &["--json"]);
        assert!(out.status.success(), "{model}: {}", text(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(report["self_test_vectors"], 4);
        let opened = open_verified(&out_path, &trust, &device_options(Freshness::NothingAcceptedYet), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(opened.header.value.reference.outputs.len(), 1, "{model}: one output column");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn cert_serial(keys: &Path) -> u64 {
    read_certificate_file(keys.join("online.cert"))
        .expect("cert")
        .decode_unverified(&Limits::default())
        .expect("decode")
        .serial
}
