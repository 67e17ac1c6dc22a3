//! The embedded MQTT broker (rumqttd 0.20), the default when `fleet.toml`
//! has no `[broker] url`.
//!
//! # Who may connect
//!
//! rumqttd calls an auth handler with (client id, username, password) for
//! every CONNECT. Ours admits:
//!
//! - a provisioned device, when client id = username = device id and the
//!   password matches the hash in the registry;
//! - the fleet server's own client, `outpost-fleet`, with a random password
//!   made at each start and never written anywhere.
//!
//! Anything else gets its connection closed before it can publish or
//! subscribe. (rumqttd closes the socket rather than sending a CONNACK with
//! "bad user name or password"; an MQTT client sees the connection end.)
//!
//! Stored credentials are cached in memory after the first lookup: the
//! handler runs on the broker's accept thread, and 10,000 devices
//! reconnecting after an outage should not queue behind registry writes.
//! The cache holds only salted hashes, as the registry does.
//!
//! # What it does not do: topic ACLs
//!
//! rumqttd has no per-topic access control, so a device *can* publish to
//! another device's topics. The fleet never relies on topics for identity:
//! every device message is signed by the device's key and carries a
//! counter, and the fleet believes a message about device X only if X's key
//! signed it and the counter is newer (see [`crate::fleet_link`]). For a
//! second wall, run mosquitto with the ACL in `fleet-server/mosquitto/`.
//!
//! # Limits, tuned for many small devices
//!
//! | setting | value | why |
//! |---|---|---|
//! | `router.max_connections` | `broker.max_connections` (12,000) | 10,000 devices plus a margin; rumqttd preallocates its connection slabs to this size |
//! | `router.max_segment_size` / `max_segment_count` | 128 KiB × 1 | per subscription filter; must hold a device's whole chunk window (the agent asks for up to 8 × 32 KiB at once, and rumqttd appends up to 500 messages before delivering any — a smaller segment drops replies not yet read); the log is never emptied, so each device keeps up to this much of its last download in memory |
//! | fleet wildcard filters (custom segment) | 8 MiB × 4 | the fleet's own `devices/+/…` subscriptions absorb bursts from every device |
//! | `router.max_outgoing_packet_count` | 200 | packets per connection per scheduling round (rumqttd default) |
//! | `connections.max_payload_size` | the protocol's largest message (~1 MiB) | a 1 MiB sketch or chunk reply plus framing; larger packets close the connection (buffers grow to it only when used) |
//! | `connections.max_inflight_count` | 100 | QoS 1 messages in flight per connection |
//! | `connections.connection_timeout_ms` | 10,000 | a socket that sends no CONNECT within 10 s is dropped (idle-socket DoS) |
//! | `next_connection_delay_ms` | 0 | rumqttd sleeps this long after each accept; any delay caps reconnect storms at 1,000 devices/s |
//!
//! Fixed by rumqttd, not configurable: per connection about 2 × 10 KiB
//! network buffers and two 200-slot packet queues. The network buffers grow
//! to a connection's largest burst and never shrink.
//!
//! # Where it stops being the right default
//!
//! Measured with `bench/fleet/run.sh` (figures in `bench/fleet/results.md`):
//! after a rollout the process holds about 3 × the bundle per device (the
//! chunk log above plus the grown write buffer), so 2,000 devices and a
//! 100 KiB model peak at 782–857 MiB; at 10,000 devices the single router thread
//! does not keep up with connects and telemetry. Up to a few hundred
//! devices it is the simple choice; above that, use mosquitto.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::registry::{Registry, StoredCredential};

/// The client id and username of the fleet server's own MQTT client.
pub const FLEET_CLIENT_ID: &str = "outpost-fleet";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker.listen: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("broker.listen: the embedded broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
    #[error("the OS random source failed: {0}")]
    Random(String),
    #[error("starting the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Settings of the embedded broker.
#[derive(Clone, Debug)]
pub struct EmbeddedSettings {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Largest MQTT packet payload accepted.
    pub max_payload_size: usize,
    /// Subscription filters of the fleet's own client (bigger logs).
    pub fleet_filters: Vec<String>,
}

/// The fleet's own credential on the embedded broker.
#[derive(Clone)]
pub struct FleetCredential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for FleetCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetCredential({})", self.username)
    }
}

/// Decides who may connect (module docs). Shared by the broker's threads.
pub struct Authenticator {
    registry: Arc<Registry>,
    fleet: FleetCredential,
    cache: RwLock<HashMap<String, StoredCredential>>,
}

impl Authenticator {
    pub fn new(registry: Arc<Registry>, fleet: FleetCredential) -> Authenticator {
        Authenticator { registry, fleet, cache: RwLock::new(HashMap::new()) }
    }

    /// Whether this CONNECT may proceed.
    pub fn allow(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username {
            log::warn!("broker: refused client {client_id:?}: username {username:?} differs from the client id");
            return false;
        }
        if username == self.fleet.username {
            return constant_time_eq(password.as_bytes(), self.fleet.password.as_bytes());
        }
        let cached = self.cache.read().ok().and_then(|c| c.get(username).cloned());
        let credential = match cached {
            Some(c) => Some(c),
            None => match self.registry.credential(username) {
                Ok(Some(c)) => {
                    if let Ok(mut cache) = self.cache.write() {
                        cache.insert(username.to_string(), c.clone());
                    }
                    Some(c)
                }
                Ok(None) => None,
                Err(e) => {
                    log::error!("broker: registry lookup for {username:?} failed: {e}");
                    None
                }
            },
        };
        let ok = credential.is_some_and(|c| c.matches(password));
        if !ok {
            log::warn!("broker: refused client {client_id:?}: unknown device or wrong password");
        }
        ok
    }

    /// Forgets a device's cached credential (after decommissioning).
    pub fn forget(&self, device: &str) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(device);
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_secret() -> Result<String, BrokerError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| BrokerError::Random(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The rumqttd configuration for `settings` (module docs explain the numbers).
pub fn rumqttd_config(settings: &EmbeddedSettings, auth: Arc<Authenticator>) -> rumqttd::Config {
    let mut custom = HashMap::new();
    for f in &settings.fleet_filters {
        custom.insert(f.clone(), rumqttd::SegmentConfig { max_segment_size: 8 << 20, max_segment_count: 4 });
    }
    let router = rumqttd::RouterConfig {
        max_connections: settings.max_connections,
        max_outgoing_packet_count: 200,
        max_segment_size: 128 * 1024,
        max_segment_count: 1,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: settings.max_payload_size,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, username: String, password: String| {
        let auth = auth.clone();
        async move { auth.allow(&client_id, &username, &password) }
    });
    let server = rumqttd::ServerSettings {
        name: "outpost-v4".into(),
        listen: settings.listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    pub listen: SocketAddr,
    pub fleet: FleetCredential,
    pub auth: Arc<Authenticator>,
}

/// Starts the embedded broker on its own threads and waits until it accepts
/// connections. The broker lives as long as the process.
pub fn start_embedded(settings: EmbeddedSettings, registry: Arc<Registry>) -> Result<EmbeddedBroker, BrokerError> {
    // rumqttd reports a failed bind only in its log, from its own thread:
    // bind here first so a port in use is a clear start-up error.
    drop(TcpListener::bind(settings.listen).map_err(|source| BrokerError::Bind { addr: settings.listen, source })?);
    let fleet = FleetCredential { username: FLEET_CLIENT_ID.into(), password: random_secret()? };
    let auth = Arc::new(Authenticator::new(registry, fleet.clone()));
    let config = rumqttd_config(&settings, auth.clone());
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(BrokerError::Thread)?;
    let dial = if settings.listen.ip().is_unspecified() {
        SocketAddr::new(
            if settings.listen.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() },
            settings.listen.port(),
        )
    } else {
        settings.listen
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&dial, Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(BrokerError::NotListening(settings.listen));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(EmbeddedBroker { listen: dial, fleet, auth })
}
