//! The fleet's keys directory: making the root and online keys, rotating the
//! online key, and loading the signer the server signs with.
//!
//! # The directory (`--keys DIR`, `keys_dir` in fleet.toml)
//!
//! | file | what | mode |
//! |---|---|---|
//! | `root.key` | root secret key — **move it offline** after `keygen` | 0600 |
//! | `root.pub` | root public key: what devices pin (`trust_root`) | 0644 |
//! | `online.key` | online signing secret key, used by the server | 0600 |
//! | `online.pub` | online public key | 0644 |
//! | `online.cert` | the root's certificate for the online key (postcard) | 0644 |
//!
//! File formats are documented in [`outpost_runtime::bundle::keys`] and
//! [`outpost_runtime::bundle::certificate`]. The directory itself is created
//! with mode 0700.
//!
//! # Rotation
//!
//! `keygen --rotate` needs only `root.key` in the directory (copy it in from
//! offline storage for the occasion): it makes a new online key and has the
//! root certify it. Devices need nothing new — they pin the root, and every
//! bundle and directive carries the certificate for the key that signed it.
//! The new certificate's serial is higher than the old one's; a device that
//! has seen it refuses the old key from then on.
//!
//! Certificate serials are the issue time in unix seconds (or one more than
//! the previous serial found in the directory, should the clock be behind),
//! so they increase without any state kept beside the root key.

use std::path::{Path, PathBuf};

use outpost_runtime::bundle::{
    issue_certificate, read_certificate_file, unix_now, write_certificate_file, Certificate, KeyError, KeyId,
    Limits, PublicKey, SecretKey, SignError, Signer, TrustRoot, VerifyError,
};

pub const ROOT_KEY: &str = "root.key";
pub const ROOT_PUB: &str = "root.pub";
pub const ONLINE_KEY: &str = "online.key";
pub const ONLINE_PUB: &str = "online.pub";
pub const ONLINE_CERT: &str = "online.cert";

/// Default validity of an online key's certificate: 180 days. Short enough
/// that a leaked online key stops working on its own, long enough that
/// rotation (which needs the offline root) is a twice-a-year chore.
pub const DEFAULT_VALID_DAYS: u64 = 180;

/// Why a keys directory could not be made, rotated or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("{path}: {error}")]
    Certificate { path: PathBuf, error: VerifyError },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0} already exists; refusing to overwrite a root key (use --rotate to replace only the online key)")]
    RootExists(PathBuf),
    #[error("{0} not found; rotating the online key needs the root key (copy it in from offline storage)")]
    RootMissing(PathBuf),
    #[error("{path} does not match {pub_path}")]
    RootMismatch { path: PathBuf, pub_path: PathBuf },
    #[error("the online certificate in {path} expired at {expired_at} (unix seconds); run `outpost-fleet keygen --rotate --out {dir}` with the root key")]
    Expired { path: PathBuf, dir: PathBuf, expired_at: u64 },
    #[error("the online certificate in {path} is not signed by {root_path}")]
    NotCertifiedByRoot { path: PathBuf, root_path: PathBuf },
}

/// What `keygen` or `keygen --rotate` made.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeygenReport {
    pub dir: PathBuf,
    pub root_key_id: KeyId,
    pub online_key_id: KeyId,
    pub certificate_serial: u64,
    pub certificate_expires_at: u64,
    pub rotated: bool,
    pub written: Vec<PathBuf>,
}

/// Makes a fresh root key, online key and certificate in `dir` (created if
/// needed). Refuses to touch a directory that already has a root key: a new
/// root would orphan every device that pinned the old one.
pub fn keygen(dir: &Path, valid_days: u64) -> Result<KeygenReport, KeysError> {
    create_private_dir(dir)?;
    let root_path = dir.join(ROOT_KEY);
    if root_path.exists() {
        return Err(KeysError::RootExists(root_path));
    }
    let root = SecretKey::generate()?;
    root.write_file(&root_path, "outpost ROOT secret key: keep it offline; devices trust everything it certifies")?;
    root.public_key().write_file(dir.join(ROOT_PUB), "outpost root public key: pin this on devices (trust_root)")?;
    let mut report = new_online_key(dir, &root, valid_days, false)?;
    report.written.splice(0..0, [root_path, dir.join(ROOT_PUB)]);
    Ok(report)
}

/// Replaces the online key and its certificate; needs `root.key` in `dir`.
pub fn rotate(dir: &Path, valid_days: u64) -> Result<KeygenReport, KeysError> {
    let root_path = dir.join(ROOT_KEY);
    if !root_path.exists() {
        return Err(KeysError::RootMissing(root_path));
    }
    let root = SecretKey::read_file(&root_path)?;
    // If root.pub is there it must be this root's: rotating with the wrong
    // root would produce certificates no device accepts.
    let pub_path = dir.join(ROOT_PUB);
    if pub_path.exists() {
        if PublicKey::read_file(&pub_path)? != root.public_key() {
            return Err(KeysError::RootMismatch { path: root_path, pub_path });
        }
    } else {
        root.public_key().write_file(&pub_path, "outpost root public key: pin this on devices (trust_root)")?;
    }
    new_online_key(dir, &root, valid_days, true)
}

fn new_online_key(dir: &Path, root: &SecretKey, valid_days: u64, rotated: bool) -> Result<KeygenReport, KeysError> {
    let now = unix_now();
    let serial = match previous_serial(dir) {
        Some(prev) if prev >= now => prev + 1,
        _ => now,
    };
    let online = SecretKey::generate()?;
    let cert = issue_certificate(root, &online.public_key(), serial, now, valid_days.saturating_mul(86_400))?;
    let body = cert.decode_unverified(&Limits::default()).map_err(|error| KeysError::Certificate {
        path: dir.join(ONLINE_CERT),
        error,
    })?;
    // Key first, then certificate: a crash in between leaves a key without
    // a matching certificate, which `load_signer` reports, rather than a
    // certificate for a key that was never saved.
    online.write_file(dir.join(ONLINE_KEY), "outpost online signing secret key (used by the fleet server)")?;
    online.public_key().write_file(dir.join(ONLINE_PUB), "outpost online signing public key")?;
    write_certificate_file(dir.join(ONLINE_CERT), &cert)?;
    Ok(KeygenReport {
        dir: dir.to_path_buf(),
        root_key_id: root.key_id(),
        online_key_id: online.key_id(),
        certificate_serial: serial,
        certificate_expires_at: body.expires_at,
        rotated,
        written: vec![dir.join(ONLINE_KEY), dir.join(ONLINE_PUB), dir.join(ONLINE_CERT)],
    })
}

fn previous_serial(dir: &Path) -> Option<u64> {
    let cert = read_certificate_file(dir.join(ONLINE_CERT)).ok()?;
    cert.decode_unverified(&Limits::default()).ok().map(|c| c.serial)
}

/// Loads the online key and its certificate as a [`Signer`], checking that
/// the certificate is for this key, signed by `root.pub` if present, and not
/// expired — so the server fails at start rather than shipping bundles
/// every device refuses.
pub fn load_signer(dir: &Path) -> Result<Signer, KeysError> {
    let cert_path = dir.join(ONLINE_CERT);
    let cert = read_certificate_file(&cert_path)
        .map_err(|error| KeysError::Certificate { path: cert_path.clone(), error })?;
    let body: Certificate = cert
        .decode_unverified(&Limits::default())
        .map_err(|error| KeysError::Certificate { path: cert_path.clone(), error })?;
    let root_path = dir.join(ROOT_PUB);
    if root_path.exists() {
        let root = PublicKey::read_file(&root_path)?;
        if cert.signer() != root.key_id() || !cert.signature_valid(&root) {
            return Err(KeysError::NotCertifiedByRoot { path: cert_path, root_path });
        }
    }
    if unix_now() >= body.expires_at {
        return Err(KeysError::Expired { path: cert_path, dir: dir.to_path_buf(), expired_at: body.expires_at });
    }
    let key = SecretKey::read_file(dir.join(ONLINE_KEY))?;
    Ok(Signer::new(key, cert)?)
}

/// The root public key of a keys directory, as devices pin it.
pub fn load_trust_root(dir: &Path) -> Result<TrustRoot, KeysError> {
    Ok(TrustRoot::read_file(dir.join(ROOT_PUB))?)
}

fn create_private_dir(dir: &Path) -> Result<(), KeysError> {
    let io = |error| KeysError::Io { path: dir.to_path_buf(), error };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io)
}

/// Arguments of `outpost-fleet keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The keys directory to create (or, with --rotate, to update).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace only the online key and certificate; needs root.key in --out.
    #[arg(long)]
    pub rotate: bool,
    /// Days the online key's certificate is valid.
    #[arg(long, default_value_t = DEFAULT_VALID_DAYS)]
    pub valid_days: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `keygen`; returns what to print (never a secret).
pub fn keygen_command(args: &KeygenArgs) -> anyhow::Result<String> {
    use anyhow::Context;
    if args.valid_days == 0 {
        anyhow::bail!("--valid-days must be at least 1");
    }
    let report = if args.rotate {
        rotate(&args.out, args.valid_days).with_context(|| format!("rotating the online key in {}", args.out.display()))?
    } else {
        keygen(&args.out, args.valid_days).with_context(|| format!("making keys in {}", args.out.display()))?
    };
    if args.json {
        return Ok(serde_json::to_string_pretty(&report)?);
    }
    let mut out = String::new();
    if report.rotated {
        out.push_str(&format!("rotated the online key in {}\n", report.dir.display()));
    } else {
        out.push_str(&format!("made keys in {}\n", report.dir.display()));
    }
    out.push_str(&format!("  root key id    {}\n", report.root_key_id));
    out.push_str(&format!(
        "  online key id  {} (certificate serial {}, expires {} unix)\n",
        report.online_key_id, report.certificate_serial, report.certificate_expires_at
    ));
    for f in &report.written {
        out.push_str(&format!("  wrote {}\n", f.display()));
    }
    if !report.rotated {
        out.push_str(&format!(
            "pin {} on devices; move {} to offline storage (it is only needed for --rotate)",
            report.dir.join(ROOT_PUB).display(),
            report.dir.join(ROOT_KEY).display()
        ));
    }
    Ok(out.trim_end().to_string())
}
