//! A thin MQTT 5 adapter (rumqttc) around [`StreamCore`], for devices that
//! run `outpost-runtime serve --mqtt …` without the agent.
//!
//! Two threads: the **event loop** drives the connection (reconnecting with
//! backoff, resubscribing on every connect since sessions are clean) and
//! hands each incoming publish to the core without ever blocking; the
//! **publisher** takes the core's replies and publishes them with the
//! request's correlation data.
//!
//! [`MqttArgs`] are the `--mqtt …` flags for a command that serves a model;
//! [`in_message`] and [`publish_reply`] are the two conversions an agent
//! needs to drive [`StreamCore`] from its own MQTT 5 connection instead.
//!
//! Subscriptions set MQTT 5 *no local*, so the broker never sends this
//! client its own replies even when an input filter (`sensors/#`) covers the
//! reply topics; the core's reply-topic guard covers brokers that ignore it.
//! TCP_NODELAY is set: a message and its reply are small packets, and with
//! Nagle's algorithm each would wait for the broker's delayed ACK (~40 ms
//! a hop). The broker should set it too (mosquitto: `set_tcp_nodelay true`).
//! The client announces a maximum packet size of
//! [`StreamConfig::max_payload_bytes`] plus headroom, so an MQTT 5 broker
//! discards larger messages instead of cutting the connection.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use outpost_runtime::server::{Deployed, ModelSlot};
//! use outpost_runtime::stream::mqtt::{MqttConfig, MqttStream};
//! use outpost_runtime::stream::StreamConfig;
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let slot = Arc::new(ModelSlot::with(Deployed::load_file("fixtures/bc_mlp.onnx", &Default::default())?));
//! let mqtt = MqttConfig::new("mqtt://127.0.0.1:1883", vec!["sensors/+/reading".into()]);
//! let stream = MqttStream::start(mqtt, slot, StreamConfig::default())?;
//! stream.wait_subscribed(Duration::from_secs(5));
//! // … predictions flow until:
//! stream.shutdown();
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::{self, QoS};
use rumqttc::v5::{Client, ClientError, Connection, Event, MqttOptions};

use super::core::{InMessage, OutMessage, StreamConfig, StreamCore, StreamError, Submitter};
use super::stats::StreamStats;
use crate::server::ModelSlot;

/// Where to connect and what to subscribe to.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// `mqtt://[user[:password]@]host[:port]` (port 1883) or `mqtts://…`
    /// (TLS with the system's roots, port 8883). User and password are taken
    /// as written (no percent-decoding).
    pub url: String,
    /// Default: `outpost-runtime-<pid>-<nanos>`, unique per process.
    pub client_id: Option<String>,
    /// Topic filters to predict on, wildcards allowed (`sensors/+/reading`).
    pub input_topics: Vec<String>,
    /// QoS of the subscriptions and of the replies (0, 1 or 2).
    pub qos: u8,
    pub keep_alive: Duration,
}

impl MqttConfig {
    /// QoS 1 (a reply is worth retrying), keep-alive 30 s.
    pub fn new(url: impl Into<String>, input_topics: Vec<String>) -> MqttConfig {
        MqttConfig { url: url.into(), client_id: None, input_topics, qos: 1, keep_alive: Duration::from_secs(30) }
    }
}

/// A broker URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Parses `mqtt://`, `tcp://`, `mqtts://`, `ssl://` URLs, or a bare `host[:port]`.
pub fn parse_broker_url(url: &str) -> Result<BrokerAddress, StreamError> {
    let bad = |reason: &str| StreamError::Broker { url: url.to_string(), reason: reason.to_string() };
    let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url));
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        _ => return Err(bad("unknown scheme: expected mqtt:// or mqtts://")),
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (Some(user.to_string()), Some(pass.to_string())),
            None => (Some(u.to_string()), None),
        },
        None => (None, None),
    };
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in the host"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, p.parse().map_err(|_| bad("the port is not a number"))?),
            None if after.is_empty() => (host, default_port),
            None => return Err(bad("unexpected text after the host")),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad("the port is not a number"))?),
            None => (hostport, default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(BrokerAddress { tls, host: host.to_string(), port, username, password })
}

/// An incoming MQTT 5 publish as the core takes it (`None` if its topic is
/// not UTF-8). For an agent embedding the core on its own v5 connection.
pub fn in_message(p: &Publish) -> Option<InMessage> {
    let topic = std::str::from_utf8(&p.topic).ok()?;
    let mut m = InMessage::new(topic, p.payload.to_vec());
    if let Some(props) = &p.properties {
        m.correlation_data = props.correlation_data.as_ref().map(|b| b.to_vec());
        m.response_topic = props.response_topic.clone();
    }
    Some(m)
}

/// Publishes one reply with its correlation data (blocks while the
/// client's request channel is full).
pub fn publish_reply(client: &Client, reply: OutMessage, qos: QoS) -> Result<(), Box<ClientError>> {
    let properties = PublishProperties {
        correlation_data: reply.correlation_data.map(Into::into),
        content_type: Some("application/json".into()),
        // 1: the payload is UTF-8 text.
        payload_format_indicator: Some(1),
        ..PublishProperties::default()
    };
    client.publish_with_properties(reply.topic, qos, false, reply.payload, properties).map_err(Box::new)
}

/// The `--mqtt …` flags of a command that serves a model (`serve`), ready to
/// flatten into its arguments with `#[command(flatten)]`; [`MqttArgs::start`]
/// turns them into a running stream on the command's model slot.
#[derive(Clone, Debug, clap::Args)]
pub struct MqttArgs {
    /// Also predict over MQTT: the broker's URL, e.g. mqtt://user:password@host:1883
    /// or mqtts://host (off without it).
    #[arg(long, value_name = "URL", env = "OUTPOST_MQTT")]
    pub mqtt: Option<String>,
    /// Topic filter to predict on, e.g. sensors/+/reading (repeat for several).
    #[arg(long = "mqtt-in", value_name = "FILTER", requires = "mqtt")]
    pub mqtt_in: Vec<String>,
    /// Reply topic when a message names no MQTT 5 response topic; {topic}
    /// stands for the input topic.
    #[arg(long = "mqtt-out", value_name = "TOPIC", default_value = "{topic}/prediction")]
    pub mqtt_out: String,
    /// QoS of the subscriptions and the replies.
    #[arg(long = "mqtt-qos", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub mqtt_qos: u8,
    /// Messages waiting for inference before new ones are dropped (and counted).
    #[arg(long = "mqtt-queue", default_value_t = 64)]
    pub mqtt_queue: usize,
    /// Inference threads for MQTT messages.
    #[arg(long = "mqtt-workers", default_value_t = 1)]
    pub mqtt_workers: usize,
    /// Largest message in bytes; larger ones get a payload_too_large reply.
    #[arg(long = "mqtt-max-payload", default_value_t = 1024 * 1024)]
    pub mqtt_max_payload: usize,
    /// MQTT client id (default: outpost-runtime-PID-NANOS, unique per process).
    #[arg(long = "mqtt-client-id")]
    pub mqtt_client_id: Option<String>,
}

impl MqttArgs {
    /// The stream the flags ask for on `slot` (the model the HTTP server
    /// serves, so a swap reaches both), or `None` without `--mqtt`.
    pub fn start(&self, slot: Arc<ModelSlot>) -> Result<Option<MqttStream>, StreamError> {
        let Some(url) = &self.mqtt else { return Ok(None) };
        if self.mqtt_in.is_empty() {
            return Err(StreamError::Config("--mqtt needs at least one --mqtt-in topic filter".into()));
        }
        let mqtt = MqttConfig {
            client_id: self.mqtt_client_id.clone(),
            qos: self.mqtt_qos,
            ..MqttConfig::new(url.clone(), self.mqtt_in.clone())
        };
        let stream = StreamConfig {
            workers: self.mqtt_workers,
            queue_capacity: self.mqtt_queue,
            max_payload_bytes: self.mqtt_max_payload,
            output: self.mqtt_out.parse()?,
            ..StreamConfig::default()
        };
        MqttStream::start(mqtt, slot, stream).map(Some)
    }
}

/// Connection state the event loop reports, for readiness and tests.
#[derive(Default)]
struct Link {
    state: Mutex<LinkState>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy)]
struct LinkState {
    connected: bool,
    subscribed: bool,
}

impl Link {
    fn set(&self, f: impl FnOnce(&mut LinkState)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        self.changed.notify_all();
    }

    fn get(&self) -> LinkState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The streaming mode on its own MQTT connection. See the module docs.
pub struct MqttStream {
    client: Client,
    core: Option<StreamCore>,
    stop: Arc<AtomicBool>,
    link: Arc<Link>,
    event_loop: Option<JoinHandle<()>>,
    publisher: Option<JoinHandle<()>>,
    stats: Arc<StreamStats>,
}

impl std::fmt::Debug for MqttStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttStream").field("connected", &self.is_connected()).finish_non_exhaustive()
    }
}

impl MqttStream {
    /// Starts the core and the connection. Returns once the threads run;
    /// connecting happens in the background (and again after every loss),
    /// so a broker that is not up yet is not an error — see
    /// [`wait_subscribed`](Self::wait_subscribed).
    pub fn start(config: MqttConfig, slot: Arc<ModelSlot>, stream: StreamConfig) -> Result<MqttStream, StreamError> {
        let bad = |reason: String| StreamError::Config(reason);
        if config.input_topics.is_empty() {
            return Err(bad("no input topic to subscribe to".into()));
        }
        for t in &config.input_topics {
            if !mqttbytes::valid_filter(t) {
                return Err(bad(format!("{t:?} is not a valid MQTT topic filter")));
            }
        }
        let qos = mqttbytes::qos(config.qos).ok_or_else(|| bad(format!("QoS {} is not 0, 1 or 2", config.qos)))?;
        let addr = parse_broker_url(&config.url)?;
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
            format!("outpost-runtime-{}-{nanos}", std::process::id())
        });
        let mut options = MqttOptions::new(client_id, addr.host.clone(), addr.port);
        options.set_keep_alive(config.keep_alive.max(Duration::from_secs(1)));
        options.set_clean_start(true);
        // Headroom over the payload limit for the topic and the properties.
        let max_packet = stream.max_payload_bytes.saturating_add(64 * 1024).min(u32::MAX as usize) as u32;
        options.set_max_packet_size(Some(max_packet));
        if let Some(user) = &addr.username {
            options.set_credentials(user.clone(), addr.password.clone().unwrap_or_default());
        }
        if addr.tls {
            // ring is the process's one rustls provider (see the workspace
            // Cargo.toml); installing it twice is a harmless no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
            options.set_transport(rumqttc::Transport::tls_with_default_config());
        }
        // Small packets both ways (a publish, its ack, the reply): with
        // Nagle's algorithm each waits out the peer's delayed ACK, ~40 ms.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, connection) = Client::new(options, stream.reply_capacity + 16);
        let (core, replies) = StreamCore::start(slot, stream)?;
        let stats = core.stats();
        let stop = Arc::new(AtomicBool::new(false));
        let link = Arc::new(Link::default());
        let filters: Vec<Filter> = config
            .input_topics
            .iter()
            .map(|t| Filter { nolocal: true, ..Filter::new(t.clone(), qos) })
            .collect();

        let event_loop = {
            let (client, submitter, stop, link) = (client.clone(), core.submitter(), stop.clone(), link.clone());
            let url = config.url.clone();
            std::thread::Builder::new()
                .name("outpost-mqtt-events".into())
                .spawn(move || event_loop(connection, client, submitter, filters, stop, link, &url))
                .map_err(StreamError::Spawn)?
        };
        let publisher = {
            let (client, stats) = (client.clone(), stats.clone());
            std::thread::Builder::new()
                .name("outpost-mqtt-publish".into())
                .spawn(move || publish_loop(replies, client, qos, stats))
                .map_err(StreamError::Spawn)?
        };
        Ok(MqttStream { client, core: Some(core), stop, link, event_loop: Some(event_loop), publisher: Some(publisher), stats })
    }

    pub fn stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.link.get().connected
    }

    /// Waits until the broker acknowledged the subscriptions (after the
    /// first connect, or a reconnect); false on timeout.
    pub fn wait_subscribed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.link.state.lock().unwrap_or_else(|p| p.into_inner());
        while !s.subscribed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.link.changed.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Disconnects, answers nothing more, and waits for the threads. Replies
    /// still queued when the connection closes are dropped.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the event loop: it sends DISCONNECT, and sees `stop` next.
        let _ = self.client.try_disconnect();
        if let Some(h) = self.event_loop.take() {
            let _ = h.join();
        }
        if let Some(core) = self.core.take() {
            core.shutdown();
        }
        if let Some(h) = self.publisher.take() {
            let _ = h.join();
        }
    }
}

impl Drop for MqttStream {
    fn drop(&mut self) {
        if self.event_loop.is_some() {
            self.stop_threads();
        }
    }
}

fn event_loop(
    mut connection: Connection,
    client: Client,
    submitter: Submitter,
    filters: Vec<Filter>,
    stop: Arc<AtomicBool>,
    link: Arc<Link>,
    url: &str,
) {
    let mut backoff = Duration::from_millis(100);
    let mut quiet = false; // log a lost connection once, not every retry
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let event = match connection.recv() {
            Ok(event) => event,
            // Every client handle is gone: nothing left to drive.
            Err(_) => return,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                log::info!("MQTT connected to {url}");
                backoff = Duration::from_millis(100);
                quiet = false;
                link.set(|s| s.connected = true);
                // From another thread: the request channel this would wait
                // on is drained by this very loop.
                let (client, filters) = (client.clone(), filters.clone());
                std::thread::spawn(move || {
                    if let Err(e) = client.subscribe_many(filters) {
                        log::warn!("MQTT subscribe failed: {e}");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<_> =
                    ack.return_codes.iter().filter(|c| !matches!(c, SubscribeReasonCode::Success(_))).collect();
                if refused.is_empty() {
                    link.set(|s| s.subscribed = true);
                } else {
                    log::error!("MQTT broker refused subscriptions: {refused:?}");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match in_message(&p) {
                Some(m) => {
                    submitter.submit(m);
                }
                None => log::debug!("MQTT message with a non-UTF-8 topic ignored"),
            },
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                log::warn!("MQTT broker disconnected: {:?}", d.reason_code);
                link.set(|s| *s = LinkState::default());
            }
            Ok(_) => {}
            Err(e) => {
                link.set(|s| *s = LinkState::default());
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if quiet {
                    log::debug!("MQTT {url}: {e}; retrying in {backoff:?}");
                } else {
                    log::warn!("MQTT {url}: {e}; retrying");
                    quiet = true;
                }
                // Sleep in slices so shutdown is not held up by the backoff.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn publish_loop(replies: Receiver<OutMessage>, client: Client, qos: QoS, stats: Arc<StreamStats>) {
    for reply in replies {
        match publish_reply(&client, reply, qos) {
            Ok(()) => stats.record_published(),
            Err(e) => {
                stats.record_publish_error();
                log::debug!("MQTT reply not published: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            mqtt: MqttArgs,
        }
        let c = Cmd::try_parse_from(["x", "--mqtt", "mqtt://h", "--mqtt-in", "a/+", "--mqtt-in", "b/#"]).unwrap();
        assert_eq!(c.mqtt.mqtt_in, vec!["a/+", "b/#"]);
        assert_eq!(c.mqtt.mqtt_out, "{topic}/prediction");
        assert!(Cmd::try_parse_from(["x", "--mqtt-in", "a"]).is_err(), "--mqtt-in needs --mqtt");
        assert!(Cmd::try_parse_from(["x", "--mqtt", "h", "--mqtt-qos", "3"]).is_err());
        let none = Cmd::try_parse_from(["x"]).unwrap();
        assert!(none.mqtt.start(Arc::new(ModelSlot::empty())).unwrap().is_none());
        let c = Cmd::try_parse_from(["x", "--mqtt", "mqtt://h"]).unwrap();
        assert!(c.mqtt.start(Arc::new(ModelSlot::empty())).is_err(), "no input topic");
    }

    #[test]
    fn broker_urls() {
        let a = parse_broker_url("mqtt://u:p@broker.local:1884").unwrap();
        assert_eq!(
            a,
            BrokerAddress {
                tls: false,
                host: "broker.local".into(),
                port: 1884,
                username: Some("u".into()),
                password: Some("p".into())
            }
        );
        let b = parse_broker_url("mqtts://[::1]").unwrap();
        assert!(b.tls);
        assert_eq!((b.host.as_str(), b.port), ("::1", 8883));
        assert_eq!(parse_broker_url("localhost").unwrap().port, 1883);
        assert!(parse_broker_url("http://x").is_err());
        assert!(parse_broker_url("mqtt://:1883").is_err());
        assert!(parse_broker_url("mqtt://h:port").is_err());
    }
}
