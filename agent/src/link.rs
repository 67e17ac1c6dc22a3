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
//! The last will is the retained [`OFFLINE_WILL`] on the device's state
//! topic. Publishing never blocks the main loop: a full request queue is an
//! error the caller handles (the offline buffer).

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::protocol::{topics, Limits, OFFLINE_WILL};
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

/// The publishing half; events arrive on the receiver from [`Link::start`].
pub struct Link {
    client: Client,
    /// Set by the connection thread once our DISCONNECT went out.
    goodbye: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Link {
    /// Connects in the background; events (starting with `Connected`) arrive
    /// on the returned receiver.
    pub fn start(
        config: &AgentConfig,
        events: Sender<crate::agent::Input>,
        stream: Option<Submitter>,
    ) -> Result<Link, LinkError> {
        let options = mqtt_options(config)?;
        // Room for a window of chunk requests plus telemetry bursts.
        let (client, mut connection) = Client::new(options, 512);
        let (min, max) = (config.reconnect_min, config.reconnect_max);
        let goodbye = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let said_goodbye = goodbye.clone();
        std::thread::Builder::new()
            .name("outpost-mqtt".into())
            .spawn(move || {
                let mut backoff = min;
                loop {
                    let notification = match connection.recv() {
                        Ok(n) => n,
                        // The client side was dropped: the agent is stopping.
                        Err(_) => return,
                    };
                    let input = match notification {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            backoff = min;
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
                            log::warn!("broker connection lost ({e}); reconnecting in {wait:?}");
                            if events.send(crate::agent::Input::Link(LinkEvent::Disconnected(e.to_string()))).is_err() {
                                return;
                            }
                            std::thread::sleep(wait);
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
        Ok(Link { client, goodbye })
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
    /// will, so the device first publishes the same retained "offline"
    /// itself; then waits (up to `wait`) until the DISCONNECT is on the wire,
    /// so that a process exiting right after loses neither.
    pub fn disconnect(&self, device_id: &str, wait: Duration) {
        let _ = self.client.try_publish(topics::state(device_id), QoS::AtLeastOnce, true, OFFLINE_WILL);
        let _ = self.client.try_disconnect();
        let (flag, cv) = &*self.goodbye;
        let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cv.wait_timeout_while(guard, wait, |sent| !*sent);
    }
}

/// The agent's MQTT connection options: client id = device id, clean
/// session, the protocol's packet limit, the retained offline last will,
/// credentials and TLS. Public so the fleet simulator
/// (`outpost-fleet simulate`) connects exactly as a device does.
pub fn mqtt_options(config: &AgentConfig) -> Result<MqttOptions, LinkError> {
    // The client id is the device id (the embedded broker and the
    // mosquitto ACL pattern key on it).
    let mut options = MqttOptions::new(config.device_id.clone(), config.broker.host.clone(), config.broker.port);
    options.set_keep_alive(config.keep_alive);
    options.set_clean_session(true);
    let max_packet = Limits::default().max_packet_bytes();
    options.set_max_packet_size(max_packet, max_packet);
    options.set_last_will(LastWill::new(topics::state(&config.device_id), OFFLINE_WILL, QoS::AtLeastOnce, true));
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
}
