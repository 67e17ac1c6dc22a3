//! The manifest: everything a device must know about a model version before
//! it runs it, signed by the fleet's online key.
//!
//! # Encoding
//!
//! postcard, fields in declaration order — **the order is the format**. The
//! first field is the format number ([`MANIFEST_FORMAT`]), so a device that
//! meets a newer format refuses it with
//! [`VerifyError::UnknownFormat`](super::VerifyError::UnknownFormat) before
//! trying to decode fields it does not know. Any change to a field, its type
//! or its order (including in [`ModelSignature`], [`ReferenceSketch`] and
//! [`TensorData`](crate::tensor::TensorData)) is a new format number; the
//! golden-vector test (`runtime/tests/bundle_golden.rs`) fails until the
//! number is bumped and the vector regenerated deliberately.
//!
//! The signature covers exactly these bytes (see
//! [`signing_message`](super::signing_message)).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::selftest::SelfTest;
use super::signed::SignedPayload;
use super::Limits;
use crate::drift::ReferenceSketch;
use crate::tensor::ModelSignature;

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Longest model name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest version string, in bytes.
pub const MAX_VERSION_LEN: usize = 64;

/// A sha256 digest. Hex in JSON, 32 raw bytes in postcard.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// sha256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        super::to_hex(&self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        super::from_hex::<32>(s).map(Digest)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::hexbytes::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        super::hexbytes::deserialize(d).map(Digest)
    }
}

/// The model file's format, as the manifest records it. Kept separate from
/// [`crate::model::ModelFormat`] so that the wire encoding (variant order)
/// only changes when this file does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFileFormat {
    Onnx,
    Tflite,
}

impl From<crate::model::ModelFormat> for ModelFileFormat {
    fn from(f: crate::model::ModelFormat) -> ModelFileFormat {
        match f {
            crate::model::ModelFormat::Onnx => ModelFileFormat::Onnx,
            crate::model::ModelFormat::Tflite => ModelFileFormat::Tflite,
        }
    }
}

impl From<ModelFileFormat> for crate::model::ModelFormat {
    fn from(f: ModelFileFormat) -> crate::model::ModelFormat {
        match f {
            ModelFileFormat::Onnx => crate::model::ModelFormat::Onnx,
            ModelFileFormat::Tflite => crate::model::ModelFormat::Tflite,
        }
    }
}

/// What the fleet vouches for about one model version.
/// Field order is the encoding order: do not reorder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`]; first, so it is the first encoded byte.
    pub format: u32,
    /// Model name: 1–128 bytes of `A-Z a-z 0-9 . _ -`, not starting with a
    /// dot — devices use it in file names, so it must not be able to climb
    /// out of a directory.
    pub name: String,
    /// Semantic version (`1.4.0`, `2.0.0-rc.1`).
    pub version: String,
    /// Monotonic across everything this fleet signs for a device: a device
    /// refuses a manifest whose sequence is not above the last it accepted.
    pub sequence: u64,
    pub model_format: ModelFileFormat,
    /// sha256 of the model file.
    pub model_sha256: Digest,
    /// Size of the model file in bytes.
    pub model_size: u64,
    /// Inputs and outputs, as the runtime read them from the model.
    pub io: ModelSignature,
    /// What the reference (training) data looked like, for drift detection.
    pub reference: ReferenceSketch,
    /// Inputs and the outputs the runtime produced for them at bundle time.
    pub self_test: SelfTest,
    /// Unix seconds when the manifest was signed.
    pub issued_at: u64,
}

impl Manifest {
    /// `name@version`, the way operators write it.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

impl SignedPayload for Manifest {
    const KIND: &'static str = "manifest";
    const FORMAT: u32 = MANIFEST_FORMAT;

    fn sequence(&self) -> Option<u64> {
        Some(self.sequence)
    }

    fn validate(&self, limits: &Limits) -> Result<(), String> {
        validate_name(&self.name)?;
        validate_version(&self.version)?;
        if self.model_size > limits.model_bytes {
            return Err(format!("model size {} is over the limit of {} bytes", self.model_size, limits.model_bytes));
        }
        self.self_test.validate(limits)
    }
}

/// Checks a model name (see [`Manifest::name`]).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("name must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if name.starts_with('.') {
        return Err(format!("name {name:?} must not start with a dot"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Checks a version: a semantic version of at most 64 bytes.
pub fn validate_version(version: &str) -> Result<(), String> {
    if version.len() > MAX_VERSION_LEN {
        return Err(format!("version is longer than {MAX_VERSION_LEN} bytes"));
    }
    semver::Version::parse(version)
        .map(|_| ())
        .map_err(|e| format!("version {version:?} is not a semantic version: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("bc-mlp_v2.onnx").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "caf\u{e9}", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
