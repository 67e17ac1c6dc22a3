//! JSON for dashboards on MQTT (Node-RED, MQTT Explorer, Grafana's MQTT
//! source): what subscribers of `outpost/v1/fleet/…` receive.
//!
//! | topic | retained | payload |
//! |---|---|---|
//! | `outpost/v1/fleet/summary` | yes | every [`SUMMARY_EVERY`]: devices online/offline, devices per version and status, drifting devices ([`crate::fleet_view::summary`]) |
//! | `outpost/v1/fleet/alerts` | no | `{"kind":"drift","device","model","version","flagged":[…],"score",…}` once each time a device's drift verdict turns true; the rollout driver publishes `{"kind":"rollout_halted",…}` here too |
//!
//! The summary is retained so a dashboard that connects shows the fleet at
//! once; alerts are not (a dashboard connecting tomorrow must not page
//! anyone about yesterday). Publishing uses `try_publish`: a full client
//! queue drops a summary (the next one follows) rather than blocking the
//! MQTT workers that record telemetry.
//!
//! With mosquitto, give dashboards a read-only user for these topics, e.g.
//! `user dashboard` / `topic read outpost/v1/fleet/#` in the ACL file.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Client, QoS};

use crate::manifests::Manifests;
use crate::server::Fleet;

pub const SUMMARY_TOPIC: &str = "outpost/v1/fleet/summary";
pub const ALERTS_TOPIC: &str = "outpost/v1/fleet/alerts";
/// How often the summary is published.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(3);

/// Publishes one alert (JSON, not retained) on [`ALERTS_TOPIC`].
pub fn publish_alert<T: serde::Serialize>(client: &Client, alert: &T) {
    match serde_json::to_vec(alert) {
        Ok(bytes) => {
            if let Err(e) = client.try_publish(ALERTS_TOPIC, QoS::AtLeastOnce, false, bytes) {
                log::warn!("mqtt: publishing an alert: {e}");
            }
        }
        Err(e) => log::warn!("encoding an alert: {e}"),
    }
}

/// Wires observations to the rest of the fleet (drift alerts out on MQTT,
/// reference sketches from the stored manifests) and starts the summary
/// publisher thread.
pub fn start(fleet: &Arc<Fleet>) {
    let client = fleet.link.client.clone();
    fleet.observations.set_alert_sink(Box::new(move |alert| publish_alert(&client, alert)));
    let manifests = Manifests::new(fleet.registry.clone(), fleet.publisher.store().clone());
    fleet.observations.set_reference_source(Box::new(move |m, v| manifests.reference(m, v)));

    let fleet = fleet.clone();
    let spawned = std::thread::Builder::new().name("fleet-summary".into()).spawn(move || loop {
        if fleet.link.connected.load(Ordering::SeqCst) {
            match crate::fleet_view::summary(&fleet).map(|v| serde_json::to_vec(&v)) {
                Ok(Ok(bytes)) => {
                    if let Err(e) = fleet.link.client.try_publish(SUMMARY_TOPIC, QoS::AtLeastOnce, true, bytes) {
                        log::debug!("mqtt: publishing the fleet summary: {e}");
                    }
                }
                Ok(Err(e)) => log::warn!("encoding the fleet summary: {e}"),
                Err(e) => log::warn!("fleet summary: {e}"),
            }
        }
        std::thread::sleep(SUMMARY_EVERY);
    });
    if let Err(e) = spawned {
        log::error!("starting the fleet summary publisher: {e}");
    }
}
