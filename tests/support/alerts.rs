//! A dashboard's view of the fleet's alerts: an MQTT subscriber on
//! `outpost/v1/fleet/alerts` that keeps every JSON message it receives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde_json::Value;

pub const ALERTS_TOPIC: &str = "outpost/v1/fleet/alerts";

pub struct Alerts {
    seen: Arc<Mutex<Vec<Value>>>,
    subscribed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    client: rumqttc::Client,
}

impl Alerts {
    /// Connects with these credentials (client id = `client_id`) and
    /// subscribes, re-subscribing after every reconnect.
    pub fn subscribe(port: u16, client_id: &str, user: &str, password: &str) -> Alerts {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut conn) = rumqttc::Client::new(o, 64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, sub, st, c) = (seen.clone(), subscribed.clone(), stop.clone(), client.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match conn.recv_timeout(Duration::from_millis(200)) {
                    Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        let _ = c.try_subscribe(ALERTS_TOPIC, QoS::AtLeastOnce);
                    }
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => sub.store(true, Ordering::SeqCst),
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let v = serde_json::from_slice(&p.payload)
                            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&p.payload).into()));
                        s.lock().expect("alerts").push(v);
                    }
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(300)),
                    _ => {}
                }
            }
        });
        Alerts { seen, subscribed, stop, client }
    }

    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::SeqCst)
    }

    pub fn all(&self) -> Vec<Value> {
        self.seen.lock().expect("alerts").clone()
    }

    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.all().into_iter().find(|v| pred(v))
    }
}

impl Drop for Alerts {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
    }
}
