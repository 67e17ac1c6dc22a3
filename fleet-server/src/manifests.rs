//! The reference sketches of published versions, read from their stored
//! bundles' manifests and cached.
//!
//! The drift view judges a version's merged device sketches against the
//! reference its manifest carries, and canary analysis needs both versions'
//! output bins. The fleet wrote and signed these bundles itself; the
//! manifest read back is accepted only if its sha256 is the one the
//! registry recorded at publish (what directives name), so a damaged or
//! swapped bundle file is refused rather than judged against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outpost_runtime::bundle::{read_bundle_unverified, Limits, Manifest};
use outpost_runtime::drift::ReferenceSketch;

use crate::bundles::BundleStore;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("bundle store: {0}")]
    Store(#[from] crate::bundles::StoreError),
    #[error("reading the bundle of {target}: {reason}")]
    Read { target: String, reason: String },
    #[error("the stored bundle of {target} has manifest sha256 {found}, the registry recorded {recorded}")]
    Mismatch { target: String, found: String, recorded: String },
}

/// A version's manifest and its reference sketch (shared, not cloned per use).
type Cached = (Arc<Manifest>, Arc<ReferenceSketch>);

/// Manifests of published versions (reference sketches), cached by version.
pub struct Manifests {
    registry: Arc<Registry>,
    store: BundleStore,
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl Manifests {
    pub fn new(registry: Arc<Registry>, store: BundleStore) -> Manifests {
        Manifests { registry, store, cache: Mutex::new(HashMap::new()) }
    }

    /// The manifest of `model@version`, `None` if no such version is published.
    pub fn get(&self, model: &str, version: &str) -> Result<Option<Arc<Manifest>>, ManifestError> {
        let key = (model.to_string(), version.to_string());
        if let Some((m, _)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Some(m.clone()));
        }
        let Some(record) = self.registry.version(model, version)? else { return Ok(None) };
        let target = format!("{model}@{version}");
        let path = self.store.path_of(&record.bundle_sha256)?;
        let read = |reason: String| ManifestError::Read { target: target.clone(), reason };
        let file = std::fs::File::open(&path).map_err(|e| read(e.to_string()))?;
        let limits = Limits::default();
        let bundle = read_bundle_unverified(std::io::BufReader::new(file), &limits).map_err(|e| read(e.to_string()))?;
        let found = bundle.manifest.payload_digest().to_hex();
        if found != record.manifest_sha256 {
            return Err(ManifestError::Mismatch { target, found, recorded: record.manifest_sha256 });
        }
        // Its digest is the one recorded when this server signed it.
        let manifest = Arc::new(bundle.manifest.decode_unverified(&limits).map_err(|e| read(e.to_string()))?);
        let reference = Arc::new(manifest.reference.clone());
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (manifest.clone(), reference));
        Ok(Some(manifest))
    }

    /// The reference sketch of `model@version`, logging why when unavailable.
    pub fn reference(&self, model: &str, version: &str) -> Option<Arc<ReferenceSketch>> {
        let key = (model.to_string(), version.to_string());
        if let Some((_, r)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Some(r.clone());
        }
        match self.get(model, version) {
            Ok(m) => m.map(|_| {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.get(&key).map(|(_, r)| r.clone())
            })?,
            Err(e) => {
                log::warn!("manifests: {e}");
                None
            }
        }
    }
}
