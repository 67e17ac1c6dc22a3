//! The `outpost-runtime verify` and `inspect` subcommands: argument types and
//! entry points, so the binary only wires them up.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::container::{read_bundle_unverified, CONTAINER_FORMAT};
use super::load::load_verified;
use super::verify::{verify_bundle_file, Clock, Freshness, TrustRoot, VerifyOptions};
use super::{Certificate, Limits};

/// `outpost-runtime verify FILE --trust root.pub`
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The `.outpost` bundle to check.
    pub file: PathBuf,
    /// The pinned root public key (`root.pub`).
    #[arg(long)]
    pub trust: PathBuf,
    /// Refuse the bundle unless its sequence is above this one (what a
    /// device does with the last sequence it accepted).
    #[arg(long)]
    pub last_sequence: Option<u64>,
    /// Check expiry against this time (unix seconds) instead of now.
    #[arg(long)]
    pub at: Option<u64>,
    /// Also load the model with this runtime and run its self-test vectors.
    #[arg(long)]
    pub self_test: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `verify`; returns what to print. Any refusal is an error (exit ≠ 0).
pub fn verify(args: &VerifyArgs) -> anyhow::Result<String> {
    let trust = TrustRoot::read_file(&args.trust).context("reading the trust root")?;
    let mut options = VerifyOptions::new(match args.last_sequence {
        Some(last) => Freshness::Above(last),
        None => Freshness::NothingAcceptedYet,
    });
    if let Some(at) = args.at {
        options.clock = Clock::At(at);
    }
    let bundle =
        verify_bundle_file(&args.file, &trust, &options).with_context(|| format!("{}", args.file.display()))?;
    let header = bundle.header.clone();
    let self_test = if args.self_test {
        let vectors = header.value.self_test.vectors.len();
        load_verified(bundle, &Default::default()).with_context(|| format!("{}", args.file.display()))?;
        Some(vectors)
    } else {
        None
    };
    let m = &header.value;
    let c = &header.certificate;
    if args.json {
        return Ok(serde_json::to_string_pretty(&json!({
            "verified": true,
            "name": m.name,
            "version": m.version,
            "sequence": m.sequence,
            "model_format": m.model_format,
            "model_sha256": m.model_sha256,
            "model_size": m.model_size,
            "manifest_sha256": header.payload_digest,
            "signer": header.signer,
            "certificate": { "serial": c.serial, "expires_at": c.expires_at },
            "root": trust.key_id(),
            "self_test_vectors_passed": self_test,
        }))?);
    }
    let mut out = format!(
        "OK {} (sequence {}, {} model, {} bytes, sha256 {})\n   signed by online key {} (certificate serial {}, valid until {} unix), certified by root {}",
        m.id(),
        m.sequence,
        serde_json::to_value(m.model_format)?.as_str().unwrap_or("?"),
        m.model_size,
        m.model_sha256,
        header.signer,
        c.serial,
        c.expires_at,
        trust.key_id(),
    );
    if let Some(n) = self_test {
        out.push_str(&format!("\n   model loads; {n} self-test vectors pass"));
    }
    Ok(out)
}

/// `outpost-runtime inspect FILE`
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The `.outpost` bundle to show.
    pub file: PathBuf,
}

/// Runs `inspect`: the manifest and certificates as JSON, **without**
/// verifying anything (there is no trust root here) — `"verified": false`
/// says so. The model's actual digest is shown beside the claimed one.
pub fn inspect(args: &InspectArgs) -> anyhow::Result<String> {
    let limits = Limits::default();
    let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let raw = read_bundle_unverified(std::io::BufReader::new(file), &limits)
        .with_context(|| format!("{}", args.file.display()))?;
    let manifest = raw.manifest.decode_unverified(&limits).context("decoding the manifest")?;
    let certificates: Vec<serde_json::Value> = raw
        .certificates
        .iter()
        .map(|c| match c.decode_unverified(&limits) {
            Ok(cert) => json!({ "signed_by": c.signer(), "certificate": cert_json(&cert) }),
            Err(e) => json!({ "signed_by": c.signer(), "error": e.to_string() }),
        })
        .collect();
    Ok(serde_json::to_string_pretty(&json!({
        "verified": false,
        "container_format": CONTAINER_FORMAT,
        "manifest_sha256": raw.manifest.payload_digest(),
        "manifest_signed_by": raw.manifest.signer(),
        "manifest": manifest,
        "certificates": certificates,
        "model": {
            "bytes": raw.model_len,
            "sha256": raw.model_sha256,
            "matches_manifest": raw.model_sha256 == manifest.model_sha256 && raw.model_len == manifest.model_size,
        },
    }))?)
}

fn cert_json(c: &Certificate) -> serde_json::Value {
    json!({
        "format": c.format,
        "role": c.role,
        "serial": c.serial,
        "key_id": c.key_id,
        "public_key": c.public_key,
        "issued_at": c.issued_at,
        "expires_at": c.expires_at,
    })
}
