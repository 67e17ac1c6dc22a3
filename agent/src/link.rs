//! The MQTT link to the fleet (rumqttc, MQTT 3.1.1, TLS via rustls for
//! `mqtts://`).
//!
//! One thread drives the connection and turns what happens into
//! [`LinkEvent`]s for the agent's main loop. When the broker goes away it
//! waits with **jittered exponential backoff** (from `reconnect_min` doubling
//! up to `reconnect_max`, each wait drawn uniformly from its upper half, so a
//! fleet that lost its broker does not reconnect in lockstep) and connects
//! again. Every connect is a clean session: the main loop subscribes again
//! on [`LinkEvent::Connected`], and the broker then re-sends the retained
//! `desired` message — which is how a device that was away catches up.
//!
//! With the streaming mode on, messages on the stream's input topics never
//! reach the main loop: this thread hands them to the stream's queue at
//! once (never blocking: a full queue drops and counts), and a second thread
//! publishes the stream's replies on the same connection.
//!
//! **The last will** is a signed [`DeviceWill`], retained on the device's
//! state topic. The broker publishes it long after it was registered, so it
//! is signed when it is registered: the main loop reserves a fresh counter
//! and signs a will for the first connection, and again every time the
//! connection drops ([`Link::offer_will`]); the link thread puts the newest
//! into the connection options before it reconnects (rumqttc reads them on
//! every connect). A will registered by a session that reached the broker is
//! spent: the next session must not carry it (the fleet accepts a will only
//! above the last will counter it accepted), so the link thread waits a
//! bounded time for a fresh one if the main loop has not signed it yet.
//!
//! Publishing never blocks the main loop: a full request queue is an error
//! the caller handles (the offline buffer).

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use outpost_runtime::bundle::SecretKey;
use outpost_runtime::protocol::{topics, DeviceWill, Limits, ProtocolError};
use outpost_runtime::stream::{InMessage, OutMessage, StreamStats, SubmitOutcome, Submitter};
use rumqttc::{Client, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

use crate::config::AgentConfig;

/// What the link reports to the main loop.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected (again): subscribe, publish state, flush buffers.
    Connected,
    /// The connection dropped; the link reconnects by itself.
    Disconnected(String),
    Message { topic: String, payload: Vec<u8> },
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("cannot start the MQTT thread: {0}")]
    Spawn(std::io::Error),
}

/// How long the link thread waits, after its backoff, for a fresh will when
/// the one it holds is spent. Past that it reconnects with the spent one
/// (the fleet then refuses it as a replay: no harm, only no "offline").
const FRESH_WILL_WAIT: Duration = Duration::from_secs(5);

/// The signed last will for `device_id` with `counter` (reserved for it),
/// as rumqttc registers it: retained, QoS 1, on the device's state topic.
/// The fleet simulator builds its wills with this too.
pub fn last_will(device_id: &str, counter: u64, key: &SecretKey) -> Result<LastWill, ProtocolError> {
    let bytes = DeviceWill::signed(device_id, counter, key)?.to_bytes();
    Ok(LastWill::new(topics::state(device_id), bytes, QoS::AtLeastOnce, true))
}

/// The will for the next connection, handed from the thread that signs it
/// to the thread that connects. Holds only the newest.
#[derive(Default)]
pub struct NextWill {
    will: Mutex<Option<LastWill>>,
    offered: Condvar,
}

impl NextWill {
    /// Replaces any will not yet taken (the newer counter wins).
    pub fn offer(&self, will: LastWill) {
        *self.will.lock().unwrap_or_else(|p| p.into_inner()) = Some(will);
        self.offered.notify_all();
    }

    /// The newest offered will, waiting up to `wait` for one.
    pub fn take(&self, wait: Duration) -> Option<LastWill> {
        let guard = self.will.lock().unwrap_or_else(|p| p.into_inner());
        let (mut guard, _) =
            self.offered.wait_timeout_while(guard, wait, |w| w.is_none()).unwrap_or_else(|p| p.into_inner());
        guard.take()
    }
}

/// The publishing half; events arrive on the receiver from [`Link::start`].
pub struct Link {
    client: Client,
    next_will: Arc<NextWill>,
    /// Set by the connection thread once our DISCONNECT went out.
    goodbye: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Link {
    /// Connects in the background with `will` (see the module docs; `None`
    /// only when no counter could be reserved for one); events (starting
    /// with `Connected`) arrive on `events`.
    pub fn start(
        config: &AgentConfig,
        will: Option<LastWill>,
        events: Sender<crate::agent::Input>,
        stream: Option<Submitter>,
    ) -> Result<Link, LinkError> {
        let options = mqtt_options(config, will)?;
        // Room for a window of chunk requests plus telemetry bursts.
        let (client, mut connection) = Client::new(options, 512);
        let (min, max) = (config.reconnect_min, config.reconnect_max);
        let goodbye = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let said_goodbye = goodbye.clone();
        let next_will = Arc::new(NextWill::default());
        let fresh_wills = next_will.clone();
        std::thread::Builder::new()
            .name("outpost-mqtt".into())
            .spawn(move || {
                let mut backoff = min;
                // Whether the registered will went to the broker with a
                // session that got through (it may have been published).
                let mut will_spent = false;
                loop {
                    let notification = match connection.recv() {
                        Ok(n) => n,
                        // The client side was dropped: the agent is stopping.
                        Err(_) => return,
                    };
                    let input = match notification {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            backoff = min;
                            will_spent = connection.eventloop.mqtt_options.last_will().is_some();
                            log::info!("connected to the broker ({:?})", ack.code);
                            Some(LinkEvent::Connected)
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => match &stream {
                            // Everything outside the fleet's topics is stream input.
                            Some(submitter) if !p.topic.starts_with(topics::ROOT) => {
                                let outcome = submitter.submit(InMessage::new(p.topic, p.payload.to_vec()));
                                if outcome == SubmitOutcome::Dropped {
                                    log::debug!("stream queue full: message dropped");
                                }
                                None
                            }
                            _ => Some(LinkEvent::Message { topic: p.topic, payload: p.payload.to_vec() }),
                        },
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                            let (flag, cv) = &*said_goodbye;
                            *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
                            cv.notify_all();
                            // Stopping: no reconnect after our own goodbye.
                            return;
                        }
                        Ok(_) => None,
                        Err(e) => {
                            let wait = jittered(backoff);
                            log::warn!("broker connection lost ({}: {e}); reconnecting in {wait:?}", { let (h, p) = connection.eventloop.mqtt_options.broker_address(); format!("{h}:{p}") });
                            if events.send(crate::agent::Input::Link(LinkEvent::Disconnected(e.to_string()))).is_err() {
                                return;
                            }
                            // The main loop signs the next will meanwhile.
                            std::thread::sleep(wait);
                            let extra = if will_spent { FRESH_WILL_WAIT } else { Duration::ZERO };
                            match fresh_wills.take(extra) {
                                Some(will) => {
                                    connection.eventloop.mqtt_options.set_last_will(will);
                                    will_spent = false;
                                }
                                None if will_spent => {
                                    log::warn!("no fresh last will signed; reconnecting with the previous one")
                                }
                                None => {}
                            }
                            backoff = (backoff * 2).min(max);
                            None
                        }
                    };
                    if let Some(input) = input {
                        if events.send(crate::agent::Input::Link(input)).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(LinkError::Spawn)?;
        Ok(Link { client, next_will, goodbye })
    }

    /// The will for the next (re)connection, signed with a fresh counter.
    pub fn offer_will(&self, will: LastWill) {
        self.next_will.offer(will);
    }

    /// Subscribes to the device's retained desired topic and its chunk replies.
    /// With `stream_inputs`, also to those filters.
    pub fn subscribe(&self, device_id: &str, stream_inputs: &[String]) -> Result<(), LinkError> {
        self.client.try_subscribe(topics::desired(device_id), QoS::AtLeastOnce)?;
        self.client.try_subscribe(topics::chunk_data(device_id), QoS::AtLeastOnce)?;
        for filter in stream_inputs {
            self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce)?;
        }
        Ok(())
    }

    /// Publishes the stream's replies as they come, until the stream stops.
    /// Replies are app data, not fleet messages: published as they are,
    /// unsigned, at QoS 1, never retained. MQTT 3.1.1 has no correlation
    /// data, so the reply carries the request's `id` field (see
    /// `outpost_runtime::stream`).
    pub fn publish_stream_replies(&self, replies: Receiver<OutMessage>, stats: Arc<StreamStats>) -> Result<(), LinkError> {
        let client = self.client.clone();
        std::thread::Builder::new()
            .name("outpost-stream-out".into())
            .spawn(move || {
                for reply in replies {
                    match client.try_publish(reply.topic, QoS::AtLeastOnce, false, reply.payload) {
                        Ok(()) => stats.record_published(),
                        Err(e) => {
                            stats.record_publish_error();
                            log::debug!("stream reply not published: {e}");
                        }
                    }
                }
            })
            .map_err(LinkError::Spawn)?;
        Ok(())
    }

    /// Queues a publish without blocking.
    pub fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), LinkError> {
        self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
        Ok(())
    }

    /// Says goodbye cleanly. The broker then does *not* publish the last
    /// will, so the device first publishes a signed will itself
    /// (`goodbye`, with its own fresh counter); then waits (up to `wait`)
    /// until the DISCONNECT is on the wire, so that a process exiting right
    /// after loses neither.
    pub fn disconnect(&self, goodbye: Option<LastWill>, wait: Duration) {
        if let Some(will) = goodbye {
            let _ = self.client.try_publish(will.topic, will.qos, will.retain, will.message);
        }
        let _ = self.client.try_disconnect();
        let (flag, cv) = &*self.goodbye;
        let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cv.wait_timeout_while(guard, wait, |sent| !*sent);
    }
}

/// The agent's MQTT connection options: client id = device id, clean
/// session, the protocol's packet limit, the signed last will (from
/// [`last_will`]), credentials and TLS. Public so the fleet simulator
/// (`outpost-fleet simulate`) connects exactly as a device does.
pub fn mqtt_options(config: &AgentConfig, will: Option<LastWill>) -> Result<MqttOptions, LinkError> {
    // The client id is the device id (the embedded broker and the
    // mosquitto ACL pattern key on it).
    let mut options = MqttOptions::new(config.device_id.clone(), config.broker.host.clone(), config.broker.port);
    options.set_keep_alive(config.keep_alive);
    options.set_clean_session(true);
    let max_packet = Limits::default().max_packet_bytes();
    options.set_max_packet_size(max_packet, max_packet);
    if let Some(will) = will {
        options.set_last_will(will);
    }
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    if config.broker.tls {
        // ring is the process's one rustls provider (see the workspace
        // Cargo.toml); installing it twice is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let transport = match (&config.ca_file, &config.client_cert, &config.client_key) {
            (None, None, None) => Transport::tls_with_default_config(),
            (ca, cert, key) => {
                let read = |p: &std::path::PathBuf| {
                    std::fs::read(p).map_err(|source| LinkError::Io { path: p.display().to_string(), source })
                };
                let client_auth = match (cert, key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                };
                match ca {
                    Some(ca) => Transport::tls_with_config(TlsConfiguration::Simple { ca: read(ca)?, alpn: None, client_auth }),
                    // A client certificate with the system's roots: rumqttc's
                    // simple config needs a CA, so use the native roots' PEM
                    // bundle where the distribution keeps it.
                    None => {
                        let ca = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]
                            .iter()
                            .find_map(|p| std::fs::read(p).ok())
                            .unwrap_or_default();
                        Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth })
                    }
                }
            }
        };
        options.set_transport(transport);
    }
    Ok(options)
}

/// A wait drawn uniformly from `[d/2, d]` (public for the fleet simulator,
/// which reconnects its devices the same way).
pub fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 4];
    let r = if getrandom::getrandom(&mut b).is_ok() { u32::from_le_bytes(b) as f64 / u32::MAX as f64 } else { 1.0 };
    d.mul_f64(0.5 + 0.5 * r)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_the_upper_half() {
        for _ in 0..100 {
            let j = jittered(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(500) && j <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn the_newest_offered_will_is_taken_once() {
        let key = SecretKey::from_seed([3; 32]);
        let next = Arc::new(NextWill::default());
        assert!(next.take(Duration::ZERO).is_none());
        next.offer(last_will("pi-1", 7, &key).unwrap());
        next.offer(last_will("pi-1", 9, &key).unwrap());
        let will = next.take(Duration::ZERO).unwrap();
        let l = Limits::default();
        let Ok(outpost_runtime::protocol::StatePayload::Will(w)) =
            outpost_runtime::protocol::parse_state_payload(&will.message, &l)
        else {
            panic!("a signed will")
        };
        assert_eq!(w.counter(), 9);
        assert_eq!(will.topic, topics::state("pi-1"));
        assert!(will.retain && will.qos == QoS::AtLeastOnce);
        assert!(next.take(Duration::ZERO).is_none(), "taken once");
        // A will offered while the link thread waits wakes it.
        let offering = next.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            offering.offer(last_will("pi-1", 10, &SecretKey::from_seed([3; 32])).unwrap());
        });
        let started = std::time::Instant::now();
        assert!(next.take(Duration::from_secs(10)).is_some());
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
