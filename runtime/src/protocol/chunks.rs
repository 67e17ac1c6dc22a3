//! Artifact chunks over MQTT: a device asks for `len` bytes of a bundle at
//! `offset`; the fleet answers with those bytes.
//!
//! - `devices/{id}/chunks/request` (device → fleet, QoS 1):
//!   [`DeviceSigned`](super::DeviceSigned)`<`[`ChunkRequest`]`>`, postcard.
//!   The fleet serves only devices it knows (the signature) and only bundles
//!   it has; it may clamp `len` to its own maximum.
//! - `devices/{id}/chunks/data` (fleet → device, QoS 1): [`ChunkReply`],
//!   postcard, unsigned — the device feeds every byte through the bundle's
//!   streaming verifier and checks the whole file's sha256 against the
//!   signed directive before anything is activated.
//!
//! The device keeps a bounded number of requests in flight, re-asks after a
//! timeout, and ignores replies it did not ask for (wrong bundle, offset it
//! is not waiting for). Resuming after a disconnect or restart is asking
//! again from the last offset it verified and wrote.

use serde::{Deserialize, Serialize};

use super::device::{DeviceMessage, Encoding};
use super::{check_size, Limits, ProtocolError};
use crate::bundle::Digest;

/// The chunk message format this build writes and reads.
pub const CHUNK_FORMAT: u32 = 1;

/// "Send me `len` bytes of bundle `bundle_sha256` from `offset`."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Always [`CHUNK_FORMAT`]; first.
    pub format: u32,
    /// The whole bundle file's sha256, as the directive names it.
    pub bundle_sha256: Digest,
    pub offset: u64,
    pub len: u32,
}

impl ChunkRequest {
    pub fn new(bundle_sha256: Digest, offset: u64, len: u32) -> ChunkRequest {
        ChunkRequest { format: CHUNK_FORMAT, bundle_sha256, offset, len }
    }
}

impl DeviceMessage for ChunkRequest {
    const KIND: &'static str = "chunk-request";
    const ENCODING: Encoding = Encoding::Postcard;
    const FORMAT: u32 = CHUNK_FORMAT;

    fn max_bytes(limits: &Limits) -> u64 {
        limits.chunk_request_bytes as u64
    }

    fn validate(&self, limits: &Limits) -> Result<(), String> {
        if self.len == 0 || self.len > limits.chunk_data_bytes {
            return Err(format!("chunk length {} must be 1 to {}", self.len, limits.chunk_data_bytes));
        }
        Ok(())
    }
}

/// The fleet's answer to a [`ChunkRequest`]. Variant order is the encoding:
/// do not reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkReply {
    /// Bytes `offset .. offset + bytes.len()` of the bundle, whose size is
    /// `total`. Shorter than asked only at the end of the file.
    Data {
        format: u32,
        bundle_sha256: Digest,
        offset: u64,
        total: u64,
        #[serde(with = "super::bytes")]
        bytes: Vec<u8>,
    },
    /// The fleet cannot serve this bundle (unknown, deleted, not allowed
    /// for this device) or this range; the device reports `reason` and
    /// retries later rather than spinning.
    Unavailable { format: u32, bundle_sha256: Digest, offset: u64, reason: String },
}

impl ChunkReply {
    pub fn data(bundle_sha256: Digest, offset: u64, total: u64, bytes: Vec<u8>) -> ChunkReply {
        ChunkReply::Data { format: CHUNK_FORMAT, bundle_sha256, offset, total, bytes }
    }

    pub fn unavailable(bundle_sha256: Digest, offset: u64, reason: impl Into<String>) -> ChunkReply {
        ChunkReply::Unavailable { format: CHUNK_FORMAT, bundle_sha256, offset, reason: reason.into() }
    }

    pub fn bundle_sha256(&self) -> &Digest {
        match self {
            ChunkReply::Data { bundle_sha256, .. } | ChunkReply::Unavailable { bundle_sha256, .. } => bundle_sha256,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses a reply: size first, then strict decoding, then field checks
    /// (format, chunk size, offsets within the total).
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<ChunkReply, ProtocolError> {
        check_size("chunk reply", bytes, limits.chunk_reply_bytes())?;
        let reply: ChunkReply = match postcard::take_from_bytes::<ChunkReply>(bytes) {
            Ok((r, [])) => r,
            Ok((_, rest)) => {
                return Err(ProtocolError::Malformed {
                    what: "chunk reply",
                    reason: format!("{} unexpected bytes after it", rest.len()),
                })
            }
            Err(e) => return Err(ProtocolError::Malformed { what: "chunk reply", reason: e.to_string() }),
        };
        let invalid = |reason: String| ProtocolError::Invalid { what: "chunk reply", reason };
        match &reply {
            ChunkReply::Data { format, offset, total, bytes, .. } => {
                if *format != CHUNK_FORMAT {
                    return Err(ProtocolError::UnknownFormat { what: "chunk reply", found: *format, supported: CHUNK_FORMAT });
                }
                if bytes.len() as u64 > limits.chunk_data_bytes as u64 {
                    return Err(invalid(format!("{} bytes, over the chunk limit of {}", bytes.len(), limits.chunk_data_bytes)));
                }
                if offset.checked_add(bytes.len() as u64).is_none_or(|end| end > *total) {
                    return Err(invalid(format!("bytes {offset}+{} run past the total {total}", bytes.len())));
                }
            }
            ChunkReply::Unavailable { format, reason, .. } => {
                if *format != CHUNK_FORMAT {
                    return Err(ProtocolError::UnknownFormat { what: "chunk reply", found: *format, supported: CHUNK_FORMAT });
                }
                super::check_text("reason", reason, limits).map_err(invalid)?;
            }
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trip_and_checks() {
        let l = Limits::default();
        let r = ChunkReply::data(Digest([3; 32]), 10, 20, vec![1, 2, 3]);
        assert_eq!(ChunkReply::from_bytes(&r.to_bytes(), &l).unwrap(), r);
        let past = ChunkReply::data(Digest([3; 32]), 19, 20, vec![1, 2, 3]);
        assert!(matches!(ChunkReply::from_bytes(&past.to_bytes(), &l), Err(ProtocolError::Invalid { .. })));
        let overflow = ChunkReply::data(Digest([3; 32]), u64::MAX, u64::MAX, vec![1]);
        assert!(ChunkReply::from_bytes(&overflow.to_bytes(), &l).is_err());
        let big = ChunkReply::data(Digest([3; 32]), 0, 1 << 30, vec![0; 2048]);
        let small = Limits { chunk_data_bytes: 1024, ..l };
        assert!(ChunkReply::from_bytes(&big.to_bytes(), &small).is_err());
        let u = ChunkReply::unavailable(Digest([3; 32]), 0, "unknown bundle");
        assert_eq!(ChunkReply::from_bytes(&u.to_bytes(), &l).unwrap(), u);
        let mut trailing = r.to_bytes();
        trailing.push(0);
        assert!(ChunkReply::from_bytes(&trailing, &l).is_err());
    }

    #[test]
    fn requests_are_bounded() {
        let l = Limits::default();
        assert!(ChunkRequest::new(Digest([0; 32]), 0, 0).validate(&l).is_err());
        assert!(ChunkRequest::new(Digest([0; 32]), 0, l.chunk_data_bytes + 1).validate(&l).is_err());
        assert!(ChunkRequest::new(Digest([0; 32]), 0, 32 << 10).validate(&l).is_ok());
    }
}
