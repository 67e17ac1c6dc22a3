//! Size limits against endless-data attacks.
//!
//! Every length that comes from a file or the network — a length prefix in the
//! container, a count inside a manifest — is compared with one of these
//! *before* anything is allocated or read. An attacker who cannot sign can
//! still send bytes; without limits, a length prefix of 2^63 or an endless
//! stream would exhaust a device's memory or disk (TUF calls this the
//! "endless data attack").
//!
//! The defaults fit the devices Outpost targets (a Raspberry Pi with 1 GiB of
//! RAM and up); raise them per call with struct update syntax:
//!
//! ```
//! use outpost_runtime::bundle::Limits;
//! let limits = Limits { model_bytes: 2 << 30, ..Limits::default() };
//! assert_eq!(limits.manifest_bytes, Limits::default().manifest_bytes);
//! ```

/// Upper bounds on everything a bundle, envelope or key file may claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one signed manifest section (payload, key id and signature).
    /// Default 8 MiB: the reference sketch and the self-test vectors dominate;
    /// an image model's self-test input (224×224×3 f32) is ~600 KiB.
    pub manifest_bytes: u32,
    /// Bytes of one signed certificate. Default 1 KiB (a real one is ~130).
    pub certificate_bytes: u32,
    /// Certificates carried by one bundle or envelope. Default 8: one is
    /// normal, a few allow overlap while an online key is being rotated.
    pub certificates: u32,
    /// Bytes of the model file. Default 1 GiB.
    pub model_bytes: u64,
    /// Self-test vectors in one manifest. Default 64.
    pub self_test_vectors: u32,
    /// Tensor values (all inputs and expected outputs of all vectors) in one
    /// manifest's self-test. Default 2^21 (8 MiB of f32).
    pub self_test_values: u64,
    /// Bytes of one signed envelope (a directive or device message, with its
    /// certificates). Default 1 MiB.
    pub envelope_bytes: u32,
    /// Bytes of a key or certificate file on disk. Default 4 KiB.
    pub key_file_bytes: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            manifest_bytes: 8 << 20,
            certificate_bytes: 1 << 10,
            certificates: 8,
            model_bytes: 1 << 30,
            self_test_vectors: 64,
            self_test_values: 1 << 21,
            envelope_bytes: 1 << 20,
            key_file_bytes: 4 << 10,
        }
    }
}

impl Limits {
    /// The most bytes the certificate section may hold.
    pub fn certificate_section_bytes(&self) -> u64 {
        // Each certificate plus a generous varint length prefix per entry.
        (self.certificate_bytes as u64 + 10) * self.certificates as u64 + 10
    }
}
