//! ed25519 keys, key ids, signatures, and the key file format.
//!
//! # Key ids
//!
//! A [`KeyId`] is the first 8 bytes of the sha256 of the 32-byte public key.
//! It only *names* a key (in certificates, error messages, `inspect`); nothing
//! is trusted because of an id — the signature is always checked against the
//! full public key, so a truncated id is enough.
//!
//! # Key files
//!
//! Text, one key per file, so they survive copy-paste and `cat`:
//!
//! ```text
//! # outpost root public key
//! # key id 6b8e1f4c2a9d0e37
//! outpost-ed25519-public-v1 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29
//! ```
//!
//! - Lines starting with `#` and blank lines are comments.
//! - Exactly one key line: a tag, one space, 64 hex digits. The tag says what
//!   the file holds: `outpost-ed25519-public-v1` (a 32-byte public key) or
//!   `outpost-ed25519-secret-v1` (the 32-byte secret seed). Reading a secret
//!   file where a public one is expected is an error, not a silent success.
//! - Secret key files are created with mode 0600 (owner read/write only), and
//!   reading one that group or others may read is refused, as `ssh` does.
//! - At most [`Limits::key_file_bytes`](super::Limits::key_file_bytes) bytes.
//!
//! Secret keys never appear in `Debug` output, errors or logs: [`SecretKey`]
//! prints as its key id only, and the seed is zeroed when the key is dropped.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use super::Limits;

/// Bytes in a [`KeyId`].
pub const KEY_ID_LEN: usize = 8;

const PUBLIC_TAG: &str = "outpost-ed25519-public-v1";
const SECRET_TAG: &str = "outpost-ed25519-secret-v1";

/// Errors reading, writing or making keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: key file is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u32 },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: holds a {found} key where a {expected} key was expected")]
    WrongKind { path: PathBuf, found: &'static str, expected: &'static str },
    #[error("{path}: secret key file is readable by group or others (mode {mode:o}); run `chmod 600` on it")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("not a valid ed25519 public key")]
    InvalidPublicKey,
    #[error("the system random number generator failed: {0}")]
    Random(String),
    #[error("certificate names key {certified}, but the signing key is {actual}")]
    CertificateMismatch { certified: KeyId, actual: KeyId },
}

/// Short name of a public key: the first 8 bytes of its sha256.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The id of a 32-byte public key.
    pub fn of_bytes(public_key: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(public_key);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }

    pub fn to_hex(&self) -> String {
        super::to_hex(&self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::hexbytes::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyId, D::Error> {
        super::hexbytes::deserialize(d).map(KeyId)
    }
}

/// An ed25519 signature (64 bytes), encoded without a length prefix.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureBytes(pub [u8; 64]);

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignatureBytes({})", super::to_hex(&self.0))
    }
}

impl Serialize for SignatureBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::hexbytes::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SignatureBytes, D::Error> {
        super::hexbytes::deserialize(d).map(SignatureBytes)
    }
}

/// An ed25519 public key, known to be a valid curve point.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Refuses bytes that are not a point on the curve.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, KeyError> {
        VerifyingKey::from_bytes(bytes).map(PublicKey).map_err(|_| KeyError::InvalidPublicKey)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of_bytes(&self.0.to_bytes())
    }

    /// Checks `signature` over `message` with ed25519's strict rules (no
    /// malleable signatures, no small-order keys), so that one message has
    /// exactly one valid signature encoding.
    pub fn verify(&self, message: &[u8], signature: &SignatureBytes) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(message, &sig).is_ok()
    }

    /// The key line plus comments, as written to a `.pub` file.
    pub fn to_file_text(&self, comment: &str) -> String {
        key_file_text(comment, &self.key_id(), PUBLIC_TAG, &self.to_bytes())
    }

    /// Parses the text of a `.pub` file (see the module docs for the format).
    pub fn from_file_text(text: &str, path: &Path) -> Result<PublicKey, KeyError> {
        let bytes = parse_key_text(text, path, PUBLIC_TAG)?;
        PublicKey::from_bytes(&bytes).map_err(|_| KeyError::Format {
            path: path.to_path_buf(),
            reason: "not a valid ed25519 public key".into(),
        })
    }

    pub fn read_file(path: impl AsRef<Path>) -> Result<PublicKey, KeyError> {
        let path = path.as_ref();
        let text = read_key_file(path)?;
        PublicKey::from_file_text(&text, path)
    }

    /// Writes a `.pub` file (mode 0644), replacing it atomically.
    pub fn write_file(&self, path: impl AsRef<Path>, comment: &str) -> Result<(), KeyError> {
        write_atomically(path.as_ref(), self.to_file_text(comment).as_bytes(), 0o644)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", super::to_hex(&self.to_bytes()))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::hexbytes::serialize(&self.to_bytes(), s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let bytes: [u8; 32] = super::hexbytes::deserialize(d)?;
        PublicKey::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 secret key. Prints as its key id only; zeroed on drop.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let key = SecretKey::from_seed(seed);
        // The seed now lives inside the key (which zeroes it on drop); don't
        // leave a second copy on the stack.
        seed.fill(0);
        Ok(key)
    }

    /// The key for a given 32-byte seed. Deterministic: meant for tests and
    /// golden vectors. Real keys come from [`SecretKey::generate`].
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }

    /// Signs `message` as is. Prefer [`Signed::sign`](super::Signed::sign),
    /// which adds domain separation; this is the primitive underneath.
    pub fn sign_message(&self, message: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(message).to_bytes())
    }

    /// Parses the text of a secret key file.
    pub fn from_file_text(text: &str, path: &Path) -> Result<SecretKey, KeyError> {
        let seed = parse_key_text(text, path, SECRET_TAG)?;
        Ok(SecretKey::from_seed(seed))
    }

    /// Reads a secret key file, refusing one that group or others may read.
    pub fn read_file(path: impl AsRef<Path>) -> Result<SecretKey, KeyError> {
        let path = path.as_ref();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|error| KeyError::Io { path: path.into(), error })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::InsecurePermissions { path: path.into(), mode });
            }
        }
        let text = read_key_file(path)?;
        SecretKey::from_file_text(&text, path)
    }

    /// Writes a secret key file with mode 0600, replacing it atomically. The
    /// file is created with that mode, so the secret is never readable by
    /// others, not even for an instant.
    pub fn write_file(&self, path: impl AsRef<Path>, comment: &str) -> Result<(), KeyError> {
        let text = key_file_text(comment, &self.key_id(), SECRET_TAG, &self.0.to_bytes());
        write_atomically(path.as_ref(), text.as_bytes(), 0o600)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(key id {}, secret redacted)", self.key_id())
    }
}

fn key_file_text(comment: &str, id: &KeyId, tag: &str, bytes: &[u8; 32]) -> String {
    let mut text = String::new();
    for line in comment.lines() {
        text.push_str("# ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&format!("# key id {id}\n{tag} {}\n", super::to_hex(bytes)));
    text
}

fn parse_key_text(text: &str, path: &Path, expected_tag: &'static str) -> Result<[u8; 32], KeyError> {
    let format_err = |reason: &str| KeyError::Format { path: path.into(), reason: reason.into() };
    let mut key_lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = key_lines.next().ok_or_else(|| format_err("no key line"))?;
    if key_lines.next().is_some() {
        return Err(format_err("more than one key line"));
    }
    let (tag, hex) = line.split_once(' ').ok_or_else(|| format_err("expected `<tag> <64 hex digits>`"))?;
    let kind = |t: &str| match t {
        PUBLIC_TAG => Some("public"),
        SECRET_TAG => Some("secret"),
        _ => None,
    };
    if tag != expected_tag {
        return match kind(tag) {
            Some(found) => Err(KeyError::WrongKind {
                path: path.into(),
                found,
                expected: kind(expected_tag).unwrap_or("other"),
            }),
            None => Err(format_err("not an outpost key file (unknown tag)")),
        };
    }
    super::from_hex::<32>(hex.trim()).ok_or_else(|| format_err("key is not 64 hex digits"))
}

fn read_key_file(path: &Path) -> Result<String, KeyError> {
    let limit = Limits::default().key_file_bytes;
    let file = std::fs::File::open(path).map_err(|error| KeyError::Io { path: path.into(), error })?;
    let mut text = String::new();
    // Read one byte past the limit so "exactly at the limit" and "over it"
    // can be told apart without trusting the file's reported length.
    file.take(limit as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|error| KeyError::Io { path: path.into(), error })?;
    if text.len() > limit as usize {
        return Err(KeyError::TooLarge { path: path.into(), limit });
    }
    Ok(text)
}

/// Writes `bytes` to a temporary file beside `path`, created with `mode`,
/// fsyncs it and renames it over `path`: a crash leaves the old file or the
/// new one, never half a key.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let io_err = |error| KeyError::Io { path: path.into(), error };
    let file_name = path.file_name().ok_or_else(|| KeyError::Format {
        path: path.into(),
        reason: "not a file path".into(),
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A stale temporary from a crashed run may exist; create_new below must
    // not fail on it, and it must not be reused with its old permissions.
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trip_and_kinds() {
        let key = SecretKey::from_seed([7; 32]);
        let p = Path::new("k");
        let pub_text = key.public_key().to_file_text("outpost root public key");
        assert_eq!(PublicKey::from_file_text(&pub_text, p).unwrap(), key.public_key());
        let sec_text = key_file_text("x", &key.key_id(), SECRET_TAG, &[7; 32]);
        assert_eq!(SecretKey::from_file_text(&sec_text, p).unwrap().key_id(), key.key_id());
        assert!(matches!(
            PublicKey::from_file_text(&sec_text, p),
            Err(KeyError::WrongKind { found: "secret", expected: "public", .. })
        ));
        assert!(matches!(PublicKey::from_file_text("# nothing\n", p), Err(KeyError::Format { .. })));
        assert!(matches!(
            PublicKey::from_file_text(&format!("{pub_text}{pub_text}"), p),
            Err(KeyError::Format { .. })
        ));
    }

    #[test]
    fn secret_key_debug_is_redacted() {
        let key = SecretKey::from_seed([9; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&super::super::to_hex(&[9; 32])));
        assert!(shown.contains("redacted"));
    }
}
