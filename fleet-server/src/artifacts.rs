//! Serving bundle chunks to devices over MQTT.
//!
//! A device asks for `len` bytes of a bundle at `offset`
//! ([`ChunkRequest`], signed by the device); the fleet answers on
//! `devices/{id}/chunks/data` with a [`ChunkReply`]. Serving is stateless
//! per request, so any number of devices download at once:
//!
//! - only the requested range is read from the stored file
//!   ([`BundleStore::read_range`]) — memory per request is one chunk, never
//!   a model;
//! - `len` is clamped to `artifacts.max_chunk_bytes`;
//! - only bundles of published versions are served (`Unavailable`
//!   otherwise, so the device reports it instead of waiting);
//! - each device has a token bucket (`artifacts.requests_per_second`,
//!   `artifacts.burst`): requests over it are dropped without an answer, and
//!   the device's re-ask timer paces it. Dropping rather than answering keeps
//!   a misbehaving device from costing the fleet more than a lookup.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outpost_runtime::protocol::{ChunkReply, ChunkRequest};

use crate::bundles::{BundleStore, StoreError};
use crate::config::ArtifactLimits;
use crate::metrics::Metrics;
use crate::rate_limit::{Bucket, Rate};
use crate::registry::Registry;

pub struct Artifacts {
    store: BundleStore,
    registry: Arc<Registry>,
    limits: ArtifactLimits,
    metrics: Arc<Metrics>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Bundle digests of published versions (refreshed on a miss).
    published: Mutex<HashSet<String>>,
}

impl Artifacts {
    pub fn new(store: BundleStore, registry: Arc<Registry>, limits: ArtifactLimits, metrics: Arc<Metrics>) -> Artifacts {
        Artifacts {
            store,
            registry,
            limits,
            metrics,
            buckets: Mutex::new(HashMap::new()),
            published: Mutex::new(HashSet::new()),
        }
    }

    /// Takes a token from the device's bucket; false when it is empty.
    fn admit(&self, device: &str) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else { return true };
        let now = Instant::now();
        let rate = Rate { per_second: f64::from(self.limits.requests_per_second), burst: f64::from(self.limits.burst) };
        buckets.entry(device.to_string()).or_insert_with(|| Bucket::full(rate, now)).take(rate, now)
    }

    fn is_published(&self, sha: &str) -> bool {
        if self.published.lock().map(|p| p.contains(sha)).unwrap_or(false) {
            return true;
        }
        let Ok(versions) = self.registry.versions() else { return false };
        let Ok(mut p) = self.published.lock() else { return false };
        p.extend(versions.into_iter().map(|v| v.bundle_sha256));
        p.contains(sha)
    }

    /// The answer to a verified request from `device`; `None` when the
    /// request is dropped (over the rate limit).
    pub fn serve(&self, device: &str, req: &ChunkRequest) -> Option<ChunkReply> {
        if !self.admit(device) {
            self.metrics.chunk_refused("rate");
            return None;
        }
        let sha = req.bundle_sha256.to_hex();
        if !self.is_published(&sha) {
            self.metrics.chunk_refused("unknown_bundle");
            return Some(ChunkReply::unavailable(req.bundle_sha256, req.offset, "no published version has this bundle"));
        }
        let len = req.len.min(self.limits.max_chunk_bytes);
        if len < req.len {
            self.metrics.chunk_refused("size");
        }
        match self.store.read_range(&sha, req.offset, len as usize) {
            Ok((_, total)) if req.offset >= total => {
                self.metrics.chunk_refused("bad_request");
                Some(ChunkReply::unavailable(
                    req.bundle_sha256,
                    req.offset,
                    format!("offset {} is past the end of the bundle ({total} bytes)", req.offset),
                ))
            }
            Ok((bytes, total)) => {
                self.metrics.chunks_served.inc();
                self.metrics.chunk_bytes.inc_by(bytes.len() as u64);
                Some(ChunkReply::data(req.bundle_sha256, req.offset, total, bytes))
            }
            Err(StoreError::Missing(_)) => {
                self.metrics.chunk_refused("unknown_bundle");
                Some(ChunkReply::unavailable(req.bundle_sha256, req.offset, "the bundle file is missing on the fleet server"))
            }
            Err(e) => {
                log::error!("artifacts: reading {sha} for {device}: {e}");
                Some(ChunkReply::unavailable(req.bundle_sha256, req.offset, "the fleet server could not read the bundle"))
            }
        }
    }
}
