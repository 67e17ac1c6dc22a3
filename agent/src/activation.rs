//! Activation: from a verified slot file to a model serving traffic.
//!
//! [`load_slot`] re-verifies the bundle on disk (signature, certificate,
//! the manifest the directive named, model digest), loads the model with the
//! runtime, checks its input/output signature against the manifest, runs
//! the manifest's self-test vectors and warms it up — all while the old
//! model keeps serving. Only a model that passed all of that reaches
//! [`switch_traffic`], which is one pointer swap in the server's
//! [`ModelSlot`]: requests already running finish on the old model (they
//! hold an `Arc` to it), requests parsed after it see the new one, so no
//! request fails and none waits for the load.

use std::path::Path;
use std::sync::Arc;

use outpost_runtime::bundle::{
    open_verified, Digest, Freshness, Manifest, OpenError, TrustRoot, VerifyOptions,
};
use outpost_runtime::drift::{DriftMonitor, MonitorConfig};
use outpost_runtime::model::LoadOptions;
use outpost_runtime::server::{Deployed, ModelInfo, ModelSlot};

/// A model ready to serve and the manifest it came with.
pub struct Ready {
    pub deployed: Deployed,
    pub manifest: Manifest,
}

/// Verifies, loads and self-tests the bundle at `path`, which must carry the
/// manifest whose signed bytes hash to `manifest_sha256`.
///
/// The same check whether the bundle is new, booted from, or rolled back to:
/// a verified directive named it by digest ([`Freshness::NamedBy`]), so its
/// certificate's serial and expiry are not held against it — a key rotated
/// out since, a certificate expired since, or a device booting with its
/// clock in the past cannot stop it from serving what it verified
/// (`outpost_runtime::bundle`, *Key rotation*).
pub fn load_slot(path: &Path, root: &TrustRoot, manifest_sha256: Digest) -> Result<Ready, OpenError> {
    let options = VerifyOptions::new(Freshness::NamedBy(manifest_sha256));
    let verified = open_verified(path, root, &options, &LoadOptions::default())?;
    let manifest = verified.header.value.clone();
    let info = ModelInfo {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.model_sha256.to_hex(),
        format: manifest.model_format.into(),
        size_bytes: manifest.model_size,
        signer: Some(verified.header.signer.to_hex()),
    };
    let deployed = Deployed::new(verified.model, info);
    // Drift monitoring when the manifest's reference fits the model. If it
    // does not, `with_drift` consumed the model: load it again without.
    let monitor = DriftMonitor::new(Arc::new(manifest.reference.clone()), MonitorConfig::default());
    let deployed = match monitor {
        Ok(monitor) => match deployed.with_drift(Arc::new(monitor)) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("{}: no drift monitoring: {e}", manifest.id());
                let again = open_verified(path, root, &options, &LoadOptions::default())?;
                let info = ModelInfo {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    sha256: manifest.model_sha256.to_hex(),
                    format: manifest.model_format.into(),
                    size_bytes: manifest.model_size,
                    signer: Some(again.header.signer.to_hex()),
                };
                Deployed::new(again.model, info)
            }
        },
        Err(e) => {
            log::warn!("{}: no drift monitoring: {e}", manifest.id());
            deployed
        }
    };
    Ok(Ready { deployed, manifest })
}

/// **The traffic switch**: one atomic swap; returns the model that served
/// until now (still finishing its in-flight requests).
pub fn switch_traffic(slot: &ModelSlot, ready: Deployed) -> Option<Arc<Deployed>> {
    slot.swap(ready)
}
