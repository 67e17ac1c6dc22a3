//! Deployment directives: "device X, run NAME@VERSION", signed by the online
//! key and published retained on `outpost/v1/devices/{id}/desired`.
//!
//! [`Directives::deploy`] sets devices' desired version directly; the
//! rollout engine builds on it. For each device it:
//!
//! 1. takes the next value of the fleet-wide `directive` counter as the
//!    directive's sequence — one counter for all devices, so it is above
//!    anything any device ever accepted, and a rollback (an older model
//!    under a new, higher sequence) needs no special case;
//! 2. seals a [`Directive`] naming the bundle by its file sha256 and size
//!    and its manifest sha256 (the device verifies the bundle with
//!    `Freshness::NamedBy(manifest_sha256)`);
//! 3. records it in the registry, then publishes it retained with QoS 1.
//!
//! Recording before publishing means a crash in between loses nothing:
//! [`Directives::republish_all`] runs on every (re)connection to the broker
//! and puts every recorded directive back. The embedded broker keeps
//! retained messages in memory only, so after a fleet restart this is what
//! lets a device that reconnects find its desired state. A device that
//! reports an older directive than the one recorded (it refused a forgery
//! that replaced the retained one, or was away) gets it re-sent by the MQTT
//! link (`fleet_link`, at most once per 30 s per device).

use std::sync::Arc;

use outpost_runtime::bundle::{Digest, SignError, Signer};
use outpost_runtime::protocol::{topics, Directive};
use rumqttc::QoS;

use crate::metrics::Metrics;
use crate::registry::{DirectiveRecord, Registry, RegistryError};

/// The registry counter directive sequences come from.
pub const DIRECTIVE_COUNTER: &str = "directive";

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("unknown model version {0}; publish it first (`outpost-fleet publish`)")]
    UnknownVersion(String),
    #[error("unknown device {0}; provision it first (`outpost-fleet provision`)")]
    UnknownDevice(String),
    #[error("no devices named")]
    NoDevices,
    #[error("{0} is not NAME@VERSION")]
    BadTarget(String),
    #[error("the stored record of {0} is damaged: {1}")]
    Damaged(String, String),
    #[error("signing the directive: {0}")]
    Sign(#[from] SignError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("publishing to the broker: {0}")]
    Mqtt(String),
}

impl DeployError {
    /// Whether the operator asked for something impossible (4xx), rather
    /// than the server failing (5xx).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            DeployError::UnknownVersion(_) | DeployError::UnknownDevice(_) | DeployError::NoDevices | DeployError::BadTarget(_)
        )
    }
}

/// Splits `NAME@VERSION`.
pub fn parse_target(target: &str) -> Result<(&str, &str), DeployError> {
    match target.split_once('@') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n, v)),
        _ => Err(DeployError::BadTarget(target.to_string())),
    }
}

/// One device's new directive, as reported to the operator.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Deployed {
    pub device: String,
    pub model: String,
    pub version: String,
    pub sequence: u64,
}

pub struct Directives {
    registry: Arc<Registry>,
    signer: Signer,
    mqtt: rumqttc::Client,
    metrics: Arc<Metrics>,
}

impl Directives {
    pub fn new(registry: Arc<Registry>, signer: Signer, mqtt: rumqttc::Client, metrics: Arc<Metrics>) -> Directives {
        Directives { registry, signer, mqtt, metrics }
    }

    /// Sets the desired version of `devices` (module docs). Every device and
    /// the version are checked before anything is signed, so a typo in one
    /// id changes no device.
    pub fn deploy(
        &self,
        model: &str,
        version: &str,
        devices: &[String],
        rollout_id: Option<&str>,
    ) -> Result<Vec<Deployed>, DeployError> {
        if devices.is_empty() {
            return Err(DeployError::NoDevices);
        }
        let record = self
            .registry
            .version(model, version)?
            .ok_or_else(|| DeployError::UnknownVersion(format!("{model}@{version}")))?;
        let damaged = |what: &str| DeployError::Damaged(format!("{model}@{version}"), format!("bad {what}"));
        let bundle_sha256 = Digest::from_hex(&record.bundle_sha256).ok_or_else(|| damaged("bundle sha256"))?;
        let manifest_sha256 = Digest::from_hex(&record.manifest_sha256).ok_or_else(|| damaged("manifest sha256"))?;
        for d in devices {
            // A decommissioned device is no longer part of the fleet.
            if self.registry.device(d)?.filter(|r| r.decommissioned_at.is_none()).is_none() {
                return Err(DeployError::UnknownDevice(d.clone()));
            }
        }
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            let sequence = self.registry.next_counter(DIRECTIVE_COUNTER)?;
            let mut directive =
                Directive::new(device, sequence, model, version, bundle_sha256, record.bundle_size, manifest_sha256);
            directive.rollout_id = rollout_id.map(str::to_string);
            let signed = self.signer.seal(&directive)?;
            self.registry.set_directive(&DirectiveRecord {
                device: device.clone(),
                sequence,
                model: model.to_string(),
                version: version.to_string(),
                issued_at: directive.issued_at as i64,
                signed: signed.clone(),
            })?;
            self.publish(device, signed)?;
            out.push(Deployed { device: device.clone(), model: model.to_string(), version: version.to_string(), sequence });
        }
        Ok(out)
    }

    fn publish(&self, device: &str, signed: Vec<u8>) -> Result<(), DeployError> {
        self.mqtt
            .publish(topics::desired(device), QoS::AtLeastOnce, true, signed)
            .map_err(|e| DeployError::Mqtt(e.to_string()))?;
        self.metrics.directives.inc();
        Ok(())
    }

    /// Publishes every recorded directive again (retained). Returns how many.
    pub fn republish_all(&self) -> Result<usize, DeployError> {
        let all = self.registry.directives()?;
        let n = all.len();
        for d in all {
            self.publish(&d.device, d.signed)?;
        }
        Ok(n)
    }
}
