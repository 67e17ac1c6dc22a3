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
//! # Who may publish and subscribe where
//!
//! Every PUBLISH, every SUBSCRIBE filter and the will of every CONNECT goes
//! through [`crate::acl::allowed`] (the policy table is there), through
//! the authorization hook Outpost adds to rumqttd (`vendor/rumqttd`,
//! `PATCHES.md`). A client that tries anything the ACL refuses loses its
//! connection, and the refused packet and everything after it that it sent
//! is dropped before rumqttd routes it. The fleet still never relies on
//! topics for identity: every device message is signed by the device's key
//! (see [`crate::fleet_link`]); the ACL is the wall in front of that.
//!
//! A read-only dashboard identity, `dashboard`, exists when `fleet.toml`
//! sets `[broker] dashboard_password`: it may subscribe under
//! `outpost/v1/fleet/` and nothing else (a device id `dashboard` cannot log
//! in then).
//!
//! # Decommissioned devices
//!
//! [`Authenticator::revoke`] drops a device's cached credential and marks
//! it revoked: its CONNECTs are refused, and the hook, asked for every
//! packet a client sends (pings included), refuses the revoked device's
//! next one, which closes its session. So a connected device is dropped at
//! its next packet, at the latest at its next keep-alive ping (the agent
//! pings every 30 s; rumqttd drops a client silent for 1.5 × its keep-alive
//! anyway). Until then it may still *receive* on its own downlink topics.
//! [`Authenticator::forget`] (re-provisioning) clears the mark.
//!
//! # Refused CONNECTs
//!
//! A refusal is remembered for a few seconds by (client id, username,
//! password) hash, so a reconnect storm of bad credentials does not reach
//! the registry on every attempt; the memory is bounded ([`MAX_REFUSALS`]).
//! Refusal and ACL log lines are rate-limited: at most one line per client
//! id per minute and [`LOG_LINES_PER_MINUTE`] in all; each line that is
//! written says how many were suppressed before it.
//!
//! # TLS
//!
//! `[broker] tls_cert` / `tls_key` (PEM) make the embedded broker serve
//! MQTT over TLS (rumqttd's rustls listener: rustls 0.22 with ring, no
//! aws-lc). Without them it serves plaintext and [`start_embedded`] warns
//! when that is on a non-loopback address.
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
//! | `connections.connection_timeout_ms` | 10,000 | a socket that sends no CONNECT (or, with TLS, does not finish its handshake) within 10 s is dropped (idle-socket DoS) |
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

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::acl::{self, Client};
use crate::registry::{Registry, StoredCredential};

/// The client id and username of the fleet server's own MQTT client.
pub const FLEET_CLIENT_ID: &str = "outpost-fleet";
/// The client id and username of the read-only dashboard identity.
pub const DASHBOARD_CLIENT_ID: &str = "dashboard";
/// How long a refused CONNECT is remembered.
pub const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// At most this many refused CONNECTs remembered (32 bytes + a time each).
pub const MAX_REFUSALS: usize = 4096;
/// Refusal and ACL log lines per minute, all clients together.
pub const LOG_LINES_PER_MINUTE: u32 = 60;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker.listen: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("broker.listen: the embedded broker did not start listening on {0} within 10 s (see the log above)")]
    NotListening(SocketAddr),
    #[error("broker.{key}: {path}: {message}")]
    Tls { key: &'static str, path: PathBuf, message: String },
    #[error("the OS random source failed: {0}")]
    Random(String),
    #[error("starting the broker thread: {0}")]
    Thread(std::io::Error),
}

/// The embedded broker's TLS certificate chain and private key, PEM files.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
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
    /// Serve MQTT over TLS with these; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// The password of the read-only `dashboard` identity; `None`: no such identity.
    pub dashboard_password: Option<String>,
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

/// Decides who may connect, and what a connected client may do (module
/// docs). Shared by the broker's threads.
pub struct Authenticator {
    registry: Arc<Registry>,
    fleet: FleetCredential,
    dashboard_password: Option<String>,
    cache: RwLock<HashMap<String, StoredCredential>>,
    revoked: RwLock<HashSet<String>>,
    refusals: Mutex<Refusals>,
    log: LogLimiter,
}

impl Authenticator {
    pub fn new(registry: Arc<Registry>, fleet: FleetCredential) -> Authenticator {
        Authenticator {
            registry,
            fleet,
            dashboard_password: None,
            cache: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashSet::new()),
            refusals: Mutex::new(Refusals::default()),
            log: LogLimiter::default(),
        }
    }

    /// Admits the read-only `dashboard` identity with this password.
    pub fn with_dashboard(mut self, password: Option<String>) -> Authenticator {
        self.dashboard_password = password;
        self
    }

    /// Whether this CONNECT may proceed.
    pub fn allow(&self, client_id: &str, username: &str, password: &str) -> bool {
        let key = refusal_key(client_id, username, password);
        let now = Instant::now();
        if self.refusals.lock().is_ok_and(|r| r.contains(&key, now)) {
            self.refused(client_id, "refused again within seconds (remembered)");
            return false;
        }
        let (ok, why) = self.check(client_id, username, password);
        if !ok {
            if let Some(why) = why {
                if let Ok(mut r) = self.refusals.lock() {
                    r.insert(key, now);
                }
                self.refused(client_id, why);
            }
        }
        ok
    }

    /// The CONNECT decision, and why not (`None`: a registry failure, which
    /// is not remembered as a refusal).
    fn check(&self, client_id: &str, username: &str, password: &str) -> (bool, Option<&'static str>) {
        if client_id != username {
            return (false, Some("username differs from the client id"));
        }
        if username == self.fleet.username {
            let ok = constant_time_eq(password.as_bytes(), self.fleet.password.as_bytes());
            return (ok, Some("wrong password for the fleet's own client"));
        }
        if let (DASHBOARD_CLIENT_ID, Some(p)) = (username, &self.dashboard_password) {
            return (constant_time_eq(password.as_bytes(), p.as_bytes()), Some("wrong dashboard password"));
        }
        if self.is_revoked(username) {
            return (false, Some("decommissioned"));
        }
        let cached = self.cache.read().ok().and_then(|c| c.get(username).cloned());
        let credential = match cached {
            Some(c) => c,
            None => match self.registry.credential(username) {
                Ok(Some(c)) => {
                    if let Ok(mut cache) = self.cache.write() {
                        cache.insert(username.to_string(), c.clone());
                    }
                    c
                }
                Ok(None) => return (false, Some("unknown device")),
                Err(e) => {
                    log::error!("broker: registry lookup for {} failed: {e}", shown(username));
                    return (false, None);
                }
            },
        };
        (credential.matches(password), Some("wrong password"))
    }

    /// Who a connected client is: [`allow`](Self::allow) admitted it under this id.
    fn client<'a>(&self, client_id: &'a str) -> Client<'a> {
        if client_id == self.fleet.username {
            Client::Fleet
        } else if client_id == DASHBOARD_CLIENT_ID && self.dashboard_password.is_some() {
            Client::Dashboard
        } else {
            Client::Device(client_id)
        }
    }

    /// The broker's authorization hook: whether a connected client may send
    /// this packet ([`rumqttd::Access::Any`]: any packet but a publish or
    /// subscribe, asked so that a revoked device is dropped at its next
    /// ping). `false` closes the connection.
    pub fn authorize(&self, client_id: &str, access: rumqttd::Access, topic: &str) -> bool {
        let client = self.client(client_id);
        if let Client::Device(id) = client {
            if self.is_revoked(id) {
                self.refused(id, "decommissioned: session closed");
                return false;
            }
        }
        let access = match access {
            rumqttd::Access::Any => return true,
            rumqttd::Access::Publish => acl::Access::Publish,
            rumqttd::Access::Subscribe => acl::Access::Subscribe,
            rumqttd::Access::Will => acl::Access::Will,
        };
        let ok = acl::allowed(client, access, topic);
        if !ok {
            let what = format!("{access:?} on {} is not allowed (ACL): connection closed", shown(topic));
            self.refused(client_id, &what);
        }
        ok
    }

    /// Revokes a decommissioned device: forgets its cached credential,
    /// refuses its CONNECTs, and closes its session at its next packet (at
    /// the latest its next keep-alive ping). Held in memory only: after a
    /// restart the registry no longer has its credential. Undone by
    /// [`forget`](Self::forget) when the id is provisioned again.
    pub fn revoke(&self, device: &str) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(device);
        }
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.insert(device.to_string());
        }
    }

    /// Forgets a device's cached credential, its revocation and every
    /// remembered refusal (after decommissioning, and when an id is
    /// provisioned, again or for the first time).
    pub fn forget(&self, device: &str) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(device);
        }
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.remove(device);
        }
        // Refusals are keyed by a hash: forget them all (rare, and cheap).
        if let Ok(mut r) = self.refusals.lock() {
            r.map.clear();
        }
    }

    /// Whether `device` has been revoked (and not provisioned since).
    pub fn is_revoked(&self, device: &str) -> bool {
        self.revoked.read().is_ok_and(|r| r.contains(device))
    }

    fn refused(&self, client_id: &str, why: &str) {
        if let Some(suppressed) = self.log.admit(client_id, Instant::now()) {
            let note = if suppressed > 0 { format!(" ({suppressed} similar lines suppressed)") } else { String::new() };
            log::warn!("broker: refused client {}: {why}{note}", shown(client_id));
        }
    }
}

/// A client-chosen string for a log line: quoted, at most 64 characters.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Refused CONNECTs, by a hash of (client id, username, password), each
/// for [`REFUSAL_TTL`]; never more than [`MAX_REFUSALS`].
#[derive(Default)]
struct Refusals {
    map: HashMap<[u8; 32], Instant>,
}

impl Refusals {
    fn contains(&self, key: &[u8; 32], now: Instant) -> bool {
        self.map.get(key).is_some_and(|&at| now.duration_since(at) < REFUSAL_TTL)
    }

    fn insert(&mut self, key: [u8; 32], now: Instant) {
        if self.map.len() >= MAX_REFUSALS {
            self.map.retain(|_, at| now.duration_since(*at) < REFUSAL_TTL);
        }
        // Still full: this one is not remembered (the registry answers it).
        if self.map.len() < MAX_REFUSALS {
            self.map.insert(key, now);
        }
    }
}

fn refusal_key(client_id: &str, username: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [client_id, username, password] {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// At most one line per key per minute and [`LOG_LINES_PER_MINUTE`] in
/// all; counts what it suppressed. Remembers at most [`MAX_LOG_KEYS`] keys
/// (a key past that is limited by the global cap alone).
#[derive(Default)]
struct LogLimiter {
    state: Mutex<LogState>,
}

const MAX_LOG_KEYS: usize = 4096;
const LOG_WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
struct LogState {
    window_start: Option<Instant>,
    lines: u32,
    last: HashMap<String, Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(suppressed since the last line)` when a line about `key` may be written now.
    fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().ok()?;
        if s.window_start.is_none_or(|w| now.duration_since(w) >= LOG_WINDOW) {
            s.window_start = Some(now);
            s.lines = 0;
            s.last.retain(|_, at| now.duration_since(*at) < LOG_WINDOW);
        }
        let key: String = key.chars().take(64).collect();
        let recent = s.last.get(&key).is_some_and(|&at| now.duration_since(at) < LOG_WINDOW);
        if recent || s.lines >= LOG_LINES_PER_MINUTE {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        s.lines += 1;
        if s.last.len() < MAX_LOG_KEYS {
            s.last.insert(key, now);
        }
        Some(std::mem::take(&mut s.suppressed))
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

/// The rumqttd configuration for `settings` (module docs explain the
/// numbers). `fleet_listen`: a second, plaintext listener that admits only
/// the fleet's own client, for when `settings.listen` serves TLS (the
/// fleet's client speaks plain MQTT); on loopback, never on the network.
pub fn rumqttd_config(settings: &EmbeddedSettings, auth: Arc<Authenticator>, fleet_listen: Option<SocketAddr>) -> rumqttd::Config {
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
        external_authz: None,
    };
    let authz = auth.clone();
    connections.set_authz_handler(move |client_id, access, topic| authz.authorize(client_id, access, topic));
    let tls = settings.tls.as_ref().map(|t| rumqttd::TlsConfig::Rustls {
        capath: None,
        certpath: t.cert.to_string_lossy().into_owned(),
        keypath: t.key.to_string_lossy().into_owned(),
    });
    let mut servers = HashMap::new();
    if let Some(listen) = fleet_listen {
        let mut fleet_only = connections.clone();
        let auth = auth.clone();
        fleet_only.set_auth_handler(move |client_id: String, username: String, password: String| {
            let auth = auth.clone();
            async move { client_id == FLEET_CLIENT_ID && auth.allow(&client_id, &username, &password) }
        });
        let name = "outpost-v4-fleet".to_string();
        servers.insert("fleet".to_string(), rumqttd::ServerSettings { name, listen, tls: None, next_connection_delay_ms: 0, connections: fleet_only });
    }
    connections.set_auth_handler(move |client_id: String, username: String, password: String| {
        let auth = auth.clone();
        async move { auth.allow(&client_id, &username, &password) }
    });
    let name = "outpost-v4".to_string();
    servers.insert("1".to_string(), rumqttd::ServerSettings { name, listen: settings.listen, tls, next_connection_delay_ms: 0, connections });
    rumqttd::Config { id: 0, router, v4: Some(servers), ..Default::default() }
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// Where the fleet's own client dials it (loopback when it listens on all interfaces).
    pub listen: SocketAddr,
    pub fleet: FleetCredential,
    pub auth: Arc<Authenticator>,
}

impl EmbeddedBroker {
    /// Revokes a decommissioned device: see [`Authenticator::revoke`].
    pub fn revoke(&self, device: &str) {
        self.auth.revoke(device)
    }
}

/// Checks the TLS files before rumqttd gets them: it reports a bad file
/// only in its log, from its own thread.
fn check_tls(tls: &TlsFiles) -> Result<(), BrokerError> {
    for (key, path, marker) in [("tls_cert", &tls.cert, "CERTIFICATE-----"), ("tls_key", &tls.key, "PRIVATE KEY-----")] {
        let err = |message: String| BrokerError::Tls { key, path: path.clone(), message };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        // A PEM certificate chain or key is a few KiB: do not read a huge file whole.
        if meta.len() > 1 << 20 {
            return Err(err(format!("{} bytes; a PEM file is a few KiB", meta.len())));
        }
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if !String::from_utf8_lossy(&text).contains(marker) {
            return Err(err(format!("no PEM block ending in {marker:?}")));
        }
    }
    Ok(())
}

/// Starts the embedded broker on its own threads and waits until it accepts
/// connections. The broker lives as long as the process.
pub fn start_embedded(settings: EmbeddedSettings, registry: Arc<Registry>) -> Result<EmbeddedBroker, BrokerError> {
    // rumqttd reports a failed bind only in its log, from its own thread:
    // bind here first so a port in use is a clear start-up error.
    drop(TcpListener::bind(settings.listen).map_err(|source| BrokerError::Bind { addr: settings.listen, source })?);
    match &settings.tls {
        Some(tls) => check_tls(tls)?,
        None if !settings.listen.ip().is_loopback() => log::warn!(
            "the embedded MQTT broker serves plaintext on {}, beyond this machine: device passwords and \
             messages cross the network unencrypted; set [broker] tls_cert and tls_key, or listen on 127.0.0.1",
            settings.listen
        ),
        None => {}
    }
    let fleet = FleetCredential { username: FLEET_CLIENT_ID.into(), password: random_secret()? };
    let auth = Arc::new(Authenticator::new(registry, fleet.clone()).with_dashboard(settings.dashboard_password.clone()));
    let loopback: std::net::IpAddr =
        if settings.listen.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() };
    // With TLS, the fleet's own (plain MQTT) client gets a loopback port of
    // its own; the OS picks it (a race with another process binding it in
    // between shows as NotListening below).
    let fleet_listen = match &settings.tls {
        Some(_) => {
            let any = SocketAddr::new(loopback, 0);
            let probe = TcpListener::bind(any).map_err(|source| BrokerError::Bind { addr: any, source })?;
            Some(probe.local_addr().map_err(|source| BrokerError::Bind { addr: any, source })?)
        }
        None => None,
    };
    let config = rumqttd_config(&settings, auth.clone(), fleet_listen);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(BrokerError::Thread)?;
    let public = if settings.listen.ip().is_unspecified() { SocketAddr::new(loopback, settings.listen.port()) } else { settings.listen };
    let dial = fleet_listen.unwrap_or(public);
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in [public, dial] {
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(EmbeddedBroker { listen: dial, fleet, auth })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::Access as A;

    const SECRET: &str = "device-secret-0123456789";

    fn auth() -> (tempfile::TempDir, Arc<Registry>, Authenticator) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Arc::new(Registry::open(&dir.path().join("registry.sqlite")).expect("registry"));
        registry.add_device("pi-a", &[], SECRET, &[1; 32]).expect("add");
        let fleet = FleetCredential { username: FLEET_CLIENT_ID.into(), password: "fleet-secret".into() };
        let auth = Authenticator::new(registry.clone(), fleet).with_dashboard(Some("dashboard-secret-0123".into()));
        (dir, registry, auth)
    }

    #[test]
    fn connects_and_acl_go_through_one_authenticator() {
        let (_dir, _reg, auth) = auth();
        assert!(auth.allow("pi-a", "pi-a", SECRET));
        assert!(auth.allow(FLEET_CLIENT_ID, FLEET_CLIENT_ID, "fleet-secret"));
        assert!(auth.allow(DASHBOARD_CLIENT_ID, DASHBOARD_CLIENT_ID, "dashboard-secret-0123"));
        assert!(!auth.allow("pi-a", "pi-b", SECRET), "client id ≠ username");
        assert!(auth.authorize("pi-a", A::Publish, "outpost/v1/devices/pi-a/state"));
        assert!(!auth.authorize("pi-a", A::Publish, "outpost/v1/devices/pi-b/state"));
        assert!(!auth.authorize("pi-a", A::Subscribe, "outpost/v1/#"));
        assert!(auth.authorize("pi-a", A::Any, ""));
        assert!(auth.authorize(FLEET_CLIENT_ID, A::Subscribe, "outpost/v1/devices/+/state"));
        assert!(auth.authorize(DASHBOARD_CLIENT_ID, A::Subscribe, "outpost/v1/fleet/#"));
        assert!(!auth.authorize(DASHBOARD_CLIENT_ID, A::Publish, "outpost/v1/fleet/alerts"));
    }

    #[test]
    fn without_a_dashboard_password_dashboard_is_just_a_device_id() {
        let (_dir, reg, _) = auth();
        let fleet = FleetCredential { username: FLEET_CLIENT_ID.into(), password: "fleet-secret".into() };
        let auth = Authenticator::new(reg.clone(), fleet);
        assert!(!auth.allow(DASHBOARD_CLIENT_ID, DASHBOARD_CLIENT_ID, "dashboard-secret-0123"));
        assert!(!auth.authorize(DASHBOARD_CLIENT_ID, A::Subscribe, "outpost/v1/fleet/#"));
    }

    #[test]
    fn a_revoked_device_is_refused_and_dropped_until_provisioned_again() {
        let (_dir, _reg, auth) = auth();
        assert!(auth.allow("pi-a", "pi-a", SECRET));
        auth.revoke("pi-a");
        assert!(auth.is_revoked("pi-a"));
        assert!(!auth.allow("pi-a", "pi-a", SECRET), "its CONNECT is refused (the cached credential is gone)");
        assert!(!auth.authorize("pi-a", A::Any, ""), "its next ping closes its session");
        assert!(!auth.authorize("pi-a", A::Publish, "outpost/v1/devices/pi-a/state"));
        auth.forget("pi-a");
        assert!(auth.allow("pi-a", "pi-a", SECRET), "re-provisioned: welcome back");
        assert!(auth.authorize("pi-a", A::Any, ""));
    }

    #[test]
    fn refusals_are_remembered_briefly_and_forgotten_on_provisioning() {
        let (_dir, reg, auth) = auth();
        assert!(!auth.allow("pi-new", "pi-new", SECRET), "not provisioned yet");
        reg.add_device("pi-new", &[], SECRET, &[2; 32]).expect("add");
        // The registry now says yes, but the refusal is remembered: the
        // registry was not asked again.
        assert!(!auth.allow("pi-new", "pi-new", SECRET));
        auth.forget("pi-new");
        assert!(auth.allow("pi-new", "pi-new", SECRET));
        // A remembered refusal expires.
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let k = refusal_key("a", "a", "p");
        r.insert(k, t0);
        assert!(r.contains(&k, t0 + Duration::from_secs(1)));
        assert!(!r.contains(&k, t0 + REFUSAL_TTL));
        assert_ne!(refusal_key("ab", "c", ""), refusal_key("a", "bc", ""), "fields are delimited");
    }

    #[test]
    fn refusal_memory_is_bounded() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        for i in 0..MAX_REFUSALS + 500 {
            r.insert(refusal_key(&i.to_string(), "u", "p"), t0);
        }
        assert_eq!(r.map.len(), MAX_REFUSALS);
        // Once they expire, room is made again.
        r.insert(refusal_key("late", "u", "p"), t0 + REFUSAL_TTL);
        assert_eq!(r.map.len(), 1);
    }

    #[test]
    fn log_lines_are_limited_per_client_and_in_all() {
        let log = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(log.admit("pi-a", t0), Some(0));
        assert_eq!(log.admit("pi-a", t0 + Duration::from_secs(30)), None, "one line per client per minute");
        // Many clients: the global cap holds.
        let admitted = (0..1000).filter(|i| log.admit(&format!("x{i}"), t0 + Duration::from_secs(31)).is_some()).count();
        assert_eq!(admitted, LOG_LINES_PER_MINUTE as usize - 1);
        // The next line, a minute later, says how many were suppressed
        // since the last line written (x0's, which reported pi-a's one).
        let suppressed = 1000 - (LOG_LINES_PER_MINUTE as u64 - 1);
        assert_eq!(log.admit("pi-a", t0 + Duration::from_secs(61)), Some(suppressed));
        // Memory stays bounded whatever ids an attacker invents.
        for w in 0..100u64 {
            for i in 0..100 {
                let id = format!("{}{w}-{i}", "z".repeat(10_000));
                log.admit(&id, t0 + Duration::from_secs(120 + w * 61));
            }
        }
        let s = log.state.lock().expect("lock");
        assert!(s.last.len() <= MAX_LOG_KEYS && s.last.keys().all(|k| k.len() <= 64));
    }

    #[test]
    fn tls_files_are_checked_before_rumqttd_gets_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        std::fs::write(&key, "not a key").expect("write");
        let err = check_tls(&TlsFiles { cert: cert.clone(), key: key.clone() }).expect_err("bad key").to_string();
        assert!(err.starts_with("broker.tls_key: ") && err.contains("PRIVATE KEY"), "{err}");
        let err = check_tls(&TlsFiles { cert: dir.path().join("missing.pem"), key }).expect_err("missing").to_string();
        assert!(err.starts_with("broker.tls_cert: "), "{err}");
    }
}
