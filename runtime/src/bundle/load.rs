//! From a verified bundle to a model that is safe to serve: verify, load with
//! the runtime, check the model reads as the manifest says, run the
//! self-test. What `outpost-runtime serve --model X.outpost --trust root.pub`
//! and the agent's activation step both need.

use std::path::Path;

use super::selftest::SelfTestError;
use super::verify::{verify_bundle_file, TrustRoot, VerifiedBundle, VerifiedHeader, VerifyError, VerifyOptions};
use crate::model::{LoadError, LoadOptions, Model};
use crate::tensor::ModelSignature;

/// Why a bundle could not be turned into a servable model.
///
/// Messages include their cause, so no variant reports it again as
/// `source()` (an `anyhow` chain would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bundle refused: {0}")]
    Verify(VerifyError),
    #[error("the bundle's model does not load: {0}")]
    Load(LoadError),
    #[error("the model reads as {found:?}, but its manifest says {expected:?}")]
    SignatureMismatch { expected: Box<ModelSignature>, found: Box<ModelSignature> },
    #[error("self-test failed: {0}")]
    SelfTest(SelfTestError),
}

impl From<VerifyError> for OpenError {
    fn from(e: VerifyError) -> Self {
        OpenError::Verify(e)
    }
}

impl From<LoadError> for OpenError {
    fn from(e: LoadError) -> Self {
        OpenError::Load(e)
    }
}

impl From<SelfTestError> for OpenError {
    fn from(e: SelfTestError) -> Self {
        OpenError::SelfTest(e)
    }
}

/// A model from a bundle whose checks all passed.
pub struct VerifiedModel {
    pub model: Model,
    pub header: VerifiedHeader,
}

impl std::fmt::Debug for VerifiedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedModel").field("manifest", &self.header.value.id()).finish_non_exhaustive()
    }
}

/// Verifies the bundle at `path`, then [`load_verified`].
pub fn open_verified(
    path: impl AsRef<Path>,
    trust: &TrustRoot,
    options: &VerifyOptions,
    load: &LoadOptions,
) -> Result<VerifiedModel, OpenError> {
    let bundle = verify_bundle_file(path, trust, options)?;
    load_verified(bundle, load)
}

/// Loads a verified bundle's model, checks that its input/output signature
/// is the one the manifest recorded (another runtime version could read the
/// file differently), and runs the manifest's self-test vectors.
pub fn load_verified(bundle: VerifiedBundle, load: &LoadOptions) -> Result<VerifiedModel, OpenError> {
    let VerifiedBundle { header, model } = bundle;
    let manifest = &header.value;
    let model = Model::from_bytes(&model, manifest.model_format.into(), load)?;
    if model.signature() != &manifest.io {
        return Err(OpenError::SignatureMismatch {
            expected: Box::new(manifest.io.clone()),
            found: Box::new(model.signature().clone()),
        });
    }
    manifest.self_test.run(|inputs| model.run(inputs))?;
    Ok(VerifiedModel { model, header })
}
