//! A real model in a real bundle: `outpost-runtime verify` and `inspect` as
//! an operator runs them, and `open_verified` (verify, load, self-test) as
//! `serve` and the agent use it.

mod bundle_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bundle_common::*;
use outpost_runtime::bundle::{
    load_verified, open_verified, verify_bundle_bytes, write_bundle, Digest, Manifest, OpenError, SelfTest,
    SelfTestVector, Tolerance,
};
use outpost_runtime::model::{LoadOptions, Model, ModelFormat};
use outpost_runtime::tensor::{TensorData, TensorValues};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-bundle-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A manifest for `bc_mlp.onnx` with self-test vectors computed by the
/// runtime, the way `outpost-fleet bundle` makes them.
fn bc_mlp_manifest(model_bytes: &[u8]) -> Manifest {
    let model = Model::from_bytes(model_bytes, ModelFormat::Onnx, &LoadOptions::default()).expect("fixture loads");
    let rows: [[f32; 30]; 2] = [
        [
            13.68, 16.33, 87.76, 575.5, 0.09277, 0.07255, 0.01752, 0.0188, 0.1631, 0.06155, 0.2047, 0.4801, 1.373,
            17.25, 0.003828, 0.007228, 0.007078, 0.005077, 0.01054, 0.001697, 15.85, 20.2, 101.6, 773.4, 0.1264,
            0.1564, 0.1206, 0.08704, 0.2806, 0.07782,
        ],
        [
            19.89, 20.26, 130.5, 1214.0, 0.1037, 0.131, 0.1411, 0.09431, 0.1802, 0.06188, 0.5079, 0.8737, 3.654,
            59.7, 0.005089, 0.02303, 0.03052, 0.01178, 0.01057, 0.003391, 23.73, 25.23, 160.5, 1646.0, 0.1417,
            0.3309, 0.4185, 0.1613, 0.2549, 0.09136,
        ],
    ];
    let vectors = rows
        .iter()
        .map(|row| {
            let inputs = vec![TensorData::f32(vec![1, 30], row.to_vec()).expect("tensor")];
            let expected = model.run(inputs.clone()).expect("runs");
            SelfTestVector { inputs, expected }
        })
        .collect();
    let mut m = manifest("bc-mlp", "1.0.0", 1, model_bytes);
    m.io = model.signature().clone();
    m.self_test = SelfTest { tolerance: Tolerance::default(), vectors };
    m
}

fn bc_mlp_bundle(manifest: &Manifest, model_bytes: &[u8]) -> Vec<u8> {
    let signer = signer();
    let mut out = Vec::new();
    write_bundle(&mut out, &signer.sign(manifest).expect("sign"), &[signer.certificate().clone()], model_bytes)
        .expect("write");
    out
}

#[test]
fn a_verified_bundle_loads_and_passes_its_self_test() {
    let model_bytes = std::fs::read(fixture("bc_mlp.onnx")).expect("fixture");
    let manifest = bc_mlp_manifest(&model_bytes);
    let bundle = bc_mlp_bundle(&manifest, &model_bytes);
    let verified = verify_bundle_bytes(&bundle, &trust(), &options()).expect("verifies");
    let loaded = load_verified(verified, &LoadOptions::default()).expect("loads and self-tests");
    assert_eq!(loaded.header.value.name, "bc-mlp");

    // A self-test whose expectations the model does not meet: refused.
    let mut wrong = manifest.clone();
    if let TensorValues::I64(labels) = &mut wrong.self_test.vectors[0].expected[0].values {
        labels[0] = 1 - labels[0];
    }
    let bundle = bc_mlp_bundle(&wrong, &model_bytes);
    let verified = verify_bundle_bytes(&bundle, &trust(), &options()).expect("signature is fine");
    assert!(matches!(load_verified(verified, &LoadOptions::default()), Err(OpenError::SelfTest(_))));

    // A manifest whose input/output signature is not what the model reads as.
    let mut other_io = manifest.clone();
    other_io.io.inputs[0].name = "renamed".into();
    let bundle = bc_mlp_bundle(&other_io, &model_bytes);
    let verified = verify_bundle_bytes(&bundle, &trust(), &options()).expect("signature is fine");
    assert!(matches!(
        load_verified(verified, &LoadOptions::default()),
        Err(OpenError::SignatureMismatch { .. })
    ));
}

#[test]
fn verify_and_inspect_from_the_command_line() {
    let dir = temp_dir("cmd");
    let model_bytes = std::fs::read(fixture("bc_mlp.onnx")).expect("fixture");
    let manifest = bc_mlp_manifest(&model_bytes);
    let bundle_path = dir.join("bc.outpost");
    std::fs::write(&bundle_path, bc_mlp_bundle(&manifest, &model_bytes)).expect("write");
    let root_pub = dir.join("root.pub");
    root_key().public_key().write_file(&root_pub, "test root").expect("root.pub");
    let at = NOW.to_string();
    let bin = env!("CARGO_BIN_EXE_outpost-runtime");

    let ok = Command::new(bin)
        .args(["verify", bundle_path.to_str().expect("utf-8"), "--trust", root_pub.to_str().expect("utf-8")])
        .args(["--at", &at, "--self-test"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.starts_with("OK bc-mlp@1.0.0"), "{stdout}");
    assert!(stdout.contains("2 self-test vectors pass"), "{stdout}");

    // Replay, expiry and tampering: exit code 1, one line naming the cause.
    let mut tampered = std::fs::read(&bundle_path).expect("read");
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let tampered_path = dir.join("tampered.outpost");
    std::fs::write(&tampered_path, tampered).expect("write");
    for (file, extra, cause) in [
        (&bundle_path, vec!["--at", &at, "--last-sequence", "1"], "not above the last accepted"),
        (&bundle_path, vec![], "expired"),
        (&tampered_path, vec!["--at", &at], "digest mismatch"),
    ] {
        let out = Command::new(bin)
            .args(["verify", file.to_str().expect("utf-8"), "--trust", root_pub.to_str().expect("utf-8")])
            .args(&extra)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(cause), "{cause}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }

    let out = Command::new(bin).args(["inspect", bundle_path.to_str().expect("utf-8")]).output().expect("run");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    assert_eq!(json["verified"], false);
    assert_eq!(json["manifest"]["name"], "bc-mlp");
    assert_eq!(json["manifest"]["version"], "1.0.0");
    assert_eq!(json["manifest"]["sequence"], 1);
    assert_eq!(json["manifest"]["model_format"], "onnx");
    assert_eq!(json["manifest"]["model_sha256"], Digest::of(&model_bytes).to_hex());
    assert_eq!(json["manifest"]["io"]["inputs"][0]["name"], "features");
    assert_eq!(json["model"]["matches_manifest"], true);
    assert_eq!(json["certificates"][0]["certificate"]["key_id"], online_key().key_id().to_hex());

    // open_verified straight from the file, as `serve --trust` does.
    open_verified(&bundle_path, &trust(), &options(), &LoadOptions::default()).expect("opens");
    let _ = std::fs::remove_dir_all(&dir);
}
