//! The fleet against a real mosquitto, configured with the ACL shipped in
//! `fleet-server/mosquitto/`: the fleet works through it, and a device
//! publishing about another device is stopped by the broker (second wall)
//! as well as by the fleet (first wall).
//!
//! Skipped (with a message) when `mosquitto` is not installed; CI installs it.

mod common;

use std::time::Duration;

use common::mosquitto::Mosquitto;
use common::*;
use outpost_runtime::protocol::{topics, DeviceSigned, DeviceState, Status};
use rumqttc::QoS;

fn state(status: Status) -> DeviceState {
    let mut s = DeviceState::new(status);
    s.model = Some("bc".into());
    s.version = Some("1.0.0".into());
    s
}

#[test]
fn fleet_works_through_mosquitto_and_its_acl_stops_forgeries() {
    let scratch = tempfile::tempdir().expect("tmp");
    let fleet_password = "fleet-password-for-the-test";
    let Some(mut mosq) = Mosquitto::start(scratch.path(), fleet_password) else { return };
    let fleet = Fleet::start_with(&format!(
        "[broker]\nurl = \"mqtt://127.0.0.1:{}\"\nusername = \"outpost-fleet\"\npassword = \"{fleet_password}\"\n",
        mosq.port
    ));
    let mallory = fleet.provision("mallory");
    let victim = fleet.provision("victim");
    assert!(mallory.config_text.contains(&format!("broker = \"mqtt://127.0.0.1:{}\"", mosq.port)));
    mosq.add_user("mallory", &mallory.password);
    mosq.add_user("victim", &victim.password);
    mosq.reload();

    // Wrong password: mosquitto refuses the connection.
    let (_c, mut bad) = mqtt(mosq.port, "victim", "victim", "wrong");
    assert!(wait_connack(&mut bad).is_err());

    // An observer with the fleet's rights sees what reaches the broker.
    let (observer, mut oconn) = mqtt(mosq.port, "observer", "outpost-fleet", fleet_password);
    wait_connack(&mut oconn).expect("observer");
    observer.subscribe("outpost/v1/devices/+/state", QoS::AtLeastOnce).expect("sub");
    std::thread::sleep(Duration::from_millis(300));

    let (client, mut conn) = mqtt(mosq.port, "mallory", "mallory", &mallory.password);
    wait_connack(&mut conn).expect("mallory connects");
    // Forged, on the victim's topic: the ACL drops it (MQTT 3.1.1 still acks).
    let forged = DeviceSigned::sign("victim", 100, &state(Status::Failed), &mallory.key).expect("sign").to_bytes();
    client.publish(topics::state("victim"), QoS::AtLeastOnce, false, forged).expect("publish");
    // Mallory's own state goes through.
    let own = DeviceSigned::sign("mallory", 1, &state(Status::Serving), &mallory.key).expect("sign").to_bytes();
    client.publish(topics::state("mallory"), QoS::AtLeastOnce, false, own).expect("publish");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let _ = conn.recv_timeout(Duration::from_millis(20));
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) = oconn.recv_timeout(Duration::from_millis(20)) {
            seen.push(p.topic);
        }
    }
    assert_eq!(seen, vec![topics::state("mallory")], "the broker passed on only mallory's own topic");

    // The fleet believed mallory about mallory, and nothing about the victim.
    assert!(eventually(|| device(&fleet, "mallory")["status"] == "serving"), "{}", fleet.log());
    let v = device(&fleet, "victim");
    assert!(v["status"].is_null() && v["last_counter"] == 0, "{v}");

    // The genuine victim, through mosquitto, is believed.
    let (vclient, mut vconn) = mqtt(mosq.port, "victim", "victim", &victim.password);
    wait_connack(&mut vconn).expect("victim connects");
    let genuine = DeviceSigned::sign("victim", 1, &state(Status::Serving), &victim.key).expect("sign").to_bytes();
    vclient.publish(topics::state("victim"), QoS::AtLeastOnce, false, genuine).expect("publish");
    assert!(
        eventually(|| {
            let _ = vconn.recv_timeout(Duration::from_millis(10));
            device(&fleet, "victim")["status"] == "serving"
        }),
        "{}",
        fleet.log()
    );

    // Directives reach devices through mosquitto too (retained).
    fleet.publish_bc("1.0.0");
    fleet.api().post_json("/v1/deploy", &serde_json::json!({"target": "bc@1.0.0", "devices": ["victim"]})).expect("deploy");
    vclient.subscribe(topics::desired("victim"), QoS::AtLeastOnce).expect("sub");
    let p = wait_publish(&mut vconn, Duration::from_secs(10), |p| p.topic == topics::desired("victim")).expect("directive");
    let trust = outpost_runtime::bundle::TrustRoot::new(victim.root.clone());
    outpost_runtime::protocol::verify_directive(&p.payload, &trust, "victim", None, 0, &Default::default()).expect("verifies");
    // Mallory cannot even read the victim's directive topic.
    client.subscribe(topics::desired("victim"), QoS::AtLeastOnce).expect("sub");
    assert!(wait_publish(&mut conn, Duration::from_secs(2), |p| p.topic == topics::desired("victim")).is_none());
}
