//! The publish gate: a model becomes a version the fleet can deploy only
//! through here.
//!
//! [`Publisher::publish`] runs, refusing at the first problem:
//!
//! 1. the version must not exist yet (checked first: it is the cheapest
//!    refusal, and checked again inside the registry transaction);
//! 2. the next sequence for the model is assigned (one above every sequence
//!    it ever had, so no device sees one twice);
//! 3. [`bundle_cmd::make_bundle`] — the same code as the offline
//!    `outpost-fleet bundle` — loads the model with the device runtime,
//!    checks the CSVs' width against the model input, builds the reference
//!    drift sketch from the training data and the self-test vectors,
//!    measures accuracy on the test data and refuses below the minimum,
//!    signs with the online key, and re-verifies the written bundle;
//! 4. the bundle is moved into the content-addressed [`BundleStore`];
//! 5. the version is recorded in the registry.
//!
//! Nothing is half-stored after a refusal: steps 1–3 write only to a
//! scratch directory that is removed either way, and if step 5 fails the
//! bundle stored in step 4 is removed again. Publishes run one at a time
//! (a mutex), so two publishes of one model cannot take the same sequence.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outpost_runtime::bundle::Tolerance;

use crate::bundle_cmd::{self, Accuracy, BundleError, BundleSpec, DEFAULT_SELF_TEST_ROWS};
use crate::bundles::{unique, BundleStore, StoreError};
use crate::registry::{Registry, RegistryError, VersionRecord};

/// Why a publish was refused. The messages are what the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{model}@{version} already exists; publish a new version")]
    VersionExists { model: String, version: String },
    #[error("{0}")]
    Refused(String),
    /// The server's own trouble (keys, disk), not the upload's.
    #[error("the server could not make the bundle: {0}")]
    Server(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(RegistryError),
}

impl PublishError {
    /// Refusals caused by what was uploaded (HTTP 422/409), as opposed to
    /// the server's own trouble (500).
    pub fn is_refusal(&self) -> bool {
        matches!(self, PublishError::VersionExists { .. } | PublishError::Refused(_))
    }
}

/// What to publish. Files are local to the server (uploads).
#[derive(Clone, Debug)]
pub struct PublishRequest {
    pub name: String,
    pub version: String,
    /// The model file; its extension (`.onnx`, `.tflite`) gives the format.
    pub model: PathBuf,
    /// Training data: the reference drift sketch and self-test rows.
    pub train_data: PathBuf,
    /// Labelled test data (label in the last column): the accuracy gate.
    pub test_data: PathBuf,
    pub min_accuracy: f64,
}

/// A published version.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PublishReport {
    pub name: String,
    pub version: String,
    pub sequence: u64,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    pub manifest_sha256: String,
    pub model_sha256: String,
    pub model_size: u64,
    pub accuracy: Option<Accuracy>,
    pub min_accuracy: f64,
    pub reference_rows: usize,
    pub self_test_vectors: usize,
    /// Server-side time of the gate: load, sketch, accuracy, sign, store.
    pub seconds: f64,
}

pub struct Publisher {
    registry: Arc<Registry>,
    store: BundleStore,
    keys_dir: PathBuf,
    scratch_dir: PathBuf,
    lock: Mutex<()>,
}

impl Publisher {
    pub fn new(registry: Arc<Registry>, store: BundleStore, keys_dir: PathBuf, scratch_dir: PathBuf) -> Publisher {
        Publisher { registry, store, keys_dir, scratch_dir, lock: Mutex::new(()) }
    }

    pub fn store(&self) -> &BundleStore {
        &self.store
    }

    /// Runs the gate (module docs). On `Err` the registry and the bundle
    /// store are as they were.
    pub fn publish(&self, req: &PublishRequest) -> Result<PublishReport, PublishError> {
        let started = Instant::now();
        // A poisoned lock only means an earlier publish panicked; the state
        // it guards (the sequence) lives in the registry, so carry on.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let reg = |e| PublishError::Registry(e);
        if self.registry.version(&req.name, &req.version).map_err(reg)?.is_some() {
            return Err(PublishError::VersionExists { model: req.name.clone(), version: req.version.clone() });
        }
        let sequence = self.registry.next_sequence(&req.name).map_err(reg)?;

        std::fs::create_dir_all(&self.scratch_dir)
            .map_err(|source| StoreError::Io { path: self.scratch_dir.clone(), source })?;
        let scratch = self.scratch_dir.join(format!("publish-{:x}.outpost", unique()));
        let spec = BundleSpec {
            model: req.model.clone(),
            name: req.name.clone(),
            version: req.version.clone(),
            sequence,
            keys_dir: self.keys_dir.clone(),
            reference_data: req.train_data.clone(),
            test_data: Some(req.test_data.clone()),
            min_accuracy: Some(req.min_accuracy),
            out: scratch.clone(),
            self_test_rows: DEFAULT_SELF_TEST_ROWS,
            tolerance: Tolerance::default(),
        };
        let made = bundle_cmd::make_bundle(&spec);
        let report = match made {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&scratch);
                return Err(refusal(e, &spec));
            }
        };
        let stored = self.store.put_file(&scratch);
        let _ = std::fs::remove_file(&scratch);
        let stored = stored?;

        let record = VersionRecord {
            model: req.name.clone(),
            version: req.version.clone(),
            sequence,
            bundle_sha256: stored.sha256.clone(),
            bundle_size: stored.size,
            accuracy: report.accuracy.as_ref().map(|a| a.accuracy),
            published_at: outpost_runtime::bundle::unix_now() as i64,
            manifest_sha256: report.manifest_sha256.to_hex(),
        };
        if let Err(e) = self.registry.insert_version(&record) {
            // Keep "nothing half-stored": the bundle goes with the record.
            let _ = self.store.remove(&stored.sha256);
            return Err(match e {
                RegistryError::VersionExists { model, version } => PublishError::VersionExists { model, version },
                e => PublishError::Registry(e),
            });
        }
        Ok(PublishReport {
            name: record.model,
            version: record.version,
            sequence,
            bundle_sha256: stored.sha256,
            bundle_size: stored.size,
            manifest_sha256: report.manifest_sha256.to_string(),
            model_sha256: report.model_sha256.to_string(),
            model_size: report.model_size,
            accuracy: report.accuracy,
            min_accuracy: req.min_accuracy,
            reference_rows: report.reference_rows,
            self_test_vectors: report.self_test_vectors,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Turns a bundle error into what the operator should read: input problems
/// become refusals, with server-side scratch paths replaced by what the
/// files are (the operator never saw those paths).
fn refusal(e: BundleError, spec: &BundleSpec) -> PublishError {
    let input_problem = matches!(
        e,
        BundleError::Invalid(_)
            | BundleError::ModelTooLarge { .. }
            | BundleError::UnknownFormat { .. }
            | BundleError::ModelLoad { .. }
            | BundleError::Data(_)
            | BundleError::DataShape { .. }
            | BundleError::Run { .. }
            | BundleError::Reference(_)
            | BundleError::NoPrediction(_)
            | BundleError::AccuracyBelow { .. }
    );
    let mut message = e.to_string().replace("--min-accuracy", "the minimum accuracy");
    for (path, what) in [(&spec.model, "model"), (&spec.reference_data, "train data"), (&spec.test_data.clone().unwrap_or_default(), "test data")] {
        message = message.replace(&path.display().to_string(), &describe(path, what));
    }
    if input_problem {
        PublishError::Refused(message)
    } else {
        PublishError::Server(message)
    }
}

fn describe(path: &Path, what: &str) -> String {
    match path.file_name() {
        Some(name) => format!("{what} {}", name.to_string_lossy()),
        None => what.to_string(),
    }
}
