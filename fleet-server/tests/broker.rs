//! The embedded broker and the fleet's MQTT side: who may connect, what the
//! fleet believes, and chunked downloads.

mod common;

use std::time::Duration;

use common::*;
use outpost_runtime::bundle::Digest;
use outpost_runtime::protocol::{topics, ChunkReply, ChunkRequest, DeviceSigned, DeviceState, Limits, Status};
use rumqttc::QoS;
use sha2::Digest as _;

#[test]
fn broker_refuses_wrong_credentials() {
    let fleet = Fleet::start();
    let dev = fleet.provision("pi-1");
    let cases = [
        ("pi-1", "pi-1", "wrong-password"),
        ("pi-2", "pi-2", dev.password.as_str()),          // unknown device
        ("pi-1", "pi-2", dev.password.as_str()),          // client id ≠ username
        ("outpost-fleet", "outpost-fleet", "guess"),      // the fleet's own user
    ];
    for (id, user, pass) in cases {
        let (_c, mut conn) = mqtt(fleet.broker_port, id, user, pass);
        let r = wait_connack(&mut conn);
        assert!(r.is_err(), "{id}/{user} must be refused, got {r:?}");
    }
    let (_c, mut conn) = mqtt(fleet.broker_port, "pi-1", "pi-1", &dev.password);
    wait_connack(&mut conn).expect("the right credentials connect");
}

fn state(status: Status) -> DeviceState {
    let mut s = DeviceState::new(status);
    s.model = Some("bc".into());
    s.version = Some("6.6.6".into());
    s
}

/// Publishes and drives the connection until the publish is acknowledged.
fn publish(client: &rumqttc::Client, conn: &mut rumqttc::Connection, topic: String, bytes: Vec<u8>) {
    client.publish(topic, QoS::AtLeastOnce, false, bytes).expect("publish");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) = conn.recv_timeout(Duration::from_millis(100)) {
            return;
        }
    }
    panic!("no PUBACK");
}

fn rejected(fleet: &Fleet) -> u64 {
    let (_, text) = http_get(fleet.api_port, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("outpost_fleet_mqtt_messages_total") && l.contains("kind=\"state\"") && l.contains("rejected"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn forged_messages_about_another_device_change_nothing() {
    let fleet = Fleet::start();
    let mallory = fleet.provision("mallory");
    let victim = fleet.provision("victim");
    // The broker's ACL stops mallory on the victim's topic: her connection
    // is closed (tests/broker_acl.rs has the whole table).
    let (client, mut conn) = mqtt(fleet.broker_port, "mallory", "mallory", &mallory.password);
    wait_connack(&mut conn).expect("mallory connects with her own credentials");
    let bytes = DeviceSigned::sign("victim", 100, &state(Status::Failed), &mallory.key).expect("sign").to_bytes();
    client.publish(topics::state("victim"), QoS::AtLeastOnce, false, bytes).expect("publish");
    let closed = loop {
        match conn.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break false,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "publishing on another device's topic closes the connection");
    drop((client, conn));

    // What she can send on her own topic, the fleet must still refuse.
    let (client, mut conn) = mqtt(fleet.broker_port, "mallory", "mallory", &mallory.password);
    wait_connack(&mut conn).expect("mallory connects again");
    let forgeries = [
        // signed by mallory's key, claiming to be the victim
        DeviceSigned::sign("victim", 100, &state(Status::Failed), &mallory.key).expect("sign").to_bytes(),
        // claiming to be the victim, signed by an unknown key
        DeviceSigned::sign("victim", 101, &state(Status::Failed), &outpost_runtime::bundle::SecretKey::from_seed([9; 32]))
            .expect("sign")
            .to_bytes(),
        // garbage
        b"{\"status\":\"failed\"}".to_vec(),
    ];
    for bytes in forgeries {
        publish(&client, &mut conn, topics::state("mallory"), bytes);
    }
    assert!(eventually(|| rejected(&fleet) >= 3), "three rejections counted: {}", fleet.log());
    let v = device(&fleet, "victim");
    assert_eq!((v["status"].is_null(), v["last_counter"].as_u64()), (true, Some(0)), "victim unchanged: {v}");

    // The real victim's signed state is believed…
    let (vclient, mut vconn) = mqtt(fleet.broker_port, "victim", "victim", &victim.password);
    wait_connack(&mut vconn).expect("victim connects");
    let genuine = DeviceSigned::sign("victim", 5, &state(Status::Serving), &victim.key).expect("sign").to_bytes();
    publish(&vclient, &mut vconn, topics::state("victim"), genuine.clone());
    assert!(eventually(|| device(&fleet, "victim")["status"] == "serving"), "{}", fleet.log());
    // …and replaying it (by anyone) changes nothing.
    publish(&vclient, &mut vconn, topics::state("victim"), DeviceSigned::sign("victim", 4, &state(Status::Failed), &victim.key).expect("sign").to_bytes());
    publish(&client, &mut conn, topics::state("mallory"), genuine);
    assert!(eventually(|| rejected(&fleet) >= 5));
    let v = device(&fleet, "victim");
    assert_eq!((v["status"].as_str(), v["last_counter"].as_u64()), (Some("serving"), Some(5)), "{v}");
    // Mallory's own record is untouched by all of this too.
    assert!(device(&fleet, "mallory")["status"].is_null());
}

#[test]
fn devices_download_bundles_in_chunks() {
    let fleet = Fleet::start();
    let published = fleet.publish_bc("1.0.0");
    let sha = Digest::from_hex(published["bundle_sha256"].as_str().expect("sha")).expect("digest");
    let size = published["bundle_size"].as_u64().expect("size");
    let mut downloads = Vec::new();
    // Several devices at once, each assembling the bundle from 4 KiB chunks.
    for i in 0..4 {
        let id = format!("dl-{i}");
        let creds = fleet.provision(&id);
        let port = fleet.broker_port;
        downloads.push(std::thread::spawn(move || {
            let (client, mut conn) = mqtt(port, &id, &id, &creds.password);
            wait_connack(&mut conn).expect("connect");
            client.subscribe(topics::chunk_data(&id), QoS::AtLeastOnce).expect("sub");
            std::thread::sleep(Duration::from_millis(200));
            let mut bytes = Vec::new();
            let mut counter = 1;
            while (bytes.len() as u64) < size {
                let req = ChunkRequest::new(sha, bytes.len() as u64, 4096);
                let signed = DeviceSigned::sign(&id, counter, &req, &creds.key).expect("sign").to_bytes();
                counter += 1;
                client.publish(topics::chunk_request(&id), QoS::AtLeastOnce, false, signed).expect("publish");
                let reply = wait_publish(&mut conn, Duration::from_secs(10), |p| p.topic == topics::chunk_data(&id)).expect("a chunk");
                match ChunkReply::from_bytes(&reply.payload, &Limits::default()).expect("valid reply") {
                    ChunkReply::Data { offset, total, bytes: chunk, .. } => {
                        assert_eq!((offset, total), (bytes.len() as u64, size));
                        assert!(chunk.len() <= 4096);
                        bytes.extend_from_slice(&chunk);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            bytes
        }));
    }
    for d in downloads {
        let bytes = d.join().expect("download");
        assert_eq!(Digest(sha2::Sha256::digest(&bytes).into()), sha, "the assembled file is the published bundle");
    }

    // Unknown bundles get an answer saying so, not silence.
    let creds = fleet.provision("dl-x");
    let (client, mut conn) = mqtt(fleet.broker_port, "dl-x", "dl-x", &creds.password);
    wait_connack(&mut conn).expect("connect");
    client.subscribe(topics::chunk_data("dl-x"), QoS::AtLeastOnce).expect("sub");
    std::thread::sleep(Duration::from_millis(200));
    let req = ChunkRequest::new(Digest([7; 32]), 0, 1024);
    client
        .publish(topics::chunk_request("dl-x"), QoS::AtLeastOnce, false, DeviceSigned::sign("dl-x", 1, &req, &creds.key).expect("sign").to_bytes())
        .expect("publish");
    let reply = wait_publish(&mut conn, Duration::from_secs(10), |_| true).expect("reply");
    assert!(matches!(ChunkReply::from_bytes(&reply.payload, &Limits::default()), Ok(ChunkReply::Unavailable { .. })));
    // A chunk request signed by another device's key is not served.
    let (_, mut other) = mqtt(fleet.broker_port, "dl-y", "dl-y", "x");
    assert!(wait_connack(&mut other).is_err());
    let forged = DeviceSigned::sign("dl-x", 2, &ChunkRequest::new(sha, 0, 1024), &outpost_runtime::bundle::SecretKey::from_seed([3; 32]))
        .expect("sign")
        .to_bytes();
    client.publish(topics::chunk_request("dl-x"), QoS::AtLeastOnce, false, forged).expect("publish");
    assert!(wait_publish(&mut conn, Duration::from_secs(2), |p| p.topic == topics::chunk_data("dl-x")).is_none());
}

