//! `fleet.toml`: what `outpost-fleet serve --config fleet.toml` reads.
//!
//! ```toml
//! data_dir   = "/var/lib/outpost-fleet"   # registry.sqlite, bundles/, uploads/
//! api_listen = "127.0.0.1:8700"           # operator HTTP API (default shown)
//! api_token  = "a long random string"     # Bearer token of the operator API (≥ 16 chars)
//! keys_dir   = "/etc/outpost/keys"        # online.key, online.cert, root.pub (`outpost-fleet keygen`)
//!
//! [broker]
//! listen = "127.0.0.1:1883"               # embedded MQTT broker (default: loopback only;
//!                                         # "0.0.0.0:1883" to serve devices on the network)
//! tls_cert = "/etc/outpost/broker.crt"    # embedded broker: serve MQTT over TLS (PEM chain)…
//! tls_key  = "/etc/outpost/broker.key"    # …and its private key (PEM); both or neither
//! dashboard_password = "…"                # embedded broker: user `dashboard` may read outpost/v1/fleet/#
//! # url = "mqtt://mosquitto:1883"         # …or an external broker instead of `listen`
//! # username = "outpost-fleet"           # the fleet's own credential on an external broker
//! # password = "…"
//! public_url = "mqtts://fleet.example.com:1883" # what `provision` writes into agent configs
//! max_connections = 12000                 # embedded broker: devices + a margin
//!
//! [artifacts]
//! max_chunk_bytes = 65536                 # largest chunk a device may ask for
//! requests_per_second = 64                # per device, sustained
//! burst = 128                             # per device, short bursts
//! ```
//!
//! Every mistake is reported on one line naming the key (`broker.url: …`),
//! so a service manager's log says exactly what to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::broker::TlsFiles;

/// Default operator API address: loopback, so a fresh install is not open
/// to the network until someone decides it should be.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8700";
/// Default embedded broker address: loopback, like the API, so a fresh
/// install serves no plaintext MQTT to the network until someone decides
/// it should (and [`crate::broker::start_embedded`] warns when it does).
pub const DEFAULT_BROKER_LISTEN: &str = "127.0.0.1:1883";
/// Shortest accepted API token: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// A config mistake, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: line {line}: {message}")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("{path}: {key}: {message}")]
    Key { path: PathBuf, key: &'static str, message: String },
}

/// Where the fleet's MQTT broker is.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerMode {
    /// The embedded rumqttd, listening here, over TLS with `tls`, with a
    /// read-only `dashboard` identity when `dashboard_password` is set.
    Embedded { listen: SocketAddr, tls: Option<TlsFiles>, dashboard_password: Option<String> },
    /// An external broker (mosquitto, EMQX) the fleet connects to as a client.
    External { url: BrokerUrl, username: Option<String>, password: Option<String> },
}

/// A parsed `mqtt://host:port` (TLS, `mqtts://`, is recognised and refused
/// for the fleet's own client until it is supported; devices may use it).
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("{url:?}: port {p:?} is not a number"))?),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("{url:?} has no host"));
        }
        Ok(BrokerUrl { host: host.to_string(), port, tls })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Limits on artifact serving (see [`crate::artifacts`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactLimits {
    pub max_chunk_bytes: u32,
    pub requests_per_second: u32,
    pub burst: u32,
}

impl Default for ArtifactLimits {
    fn default() -> Self {
        // 64 KiB: a few round trips per 100 KiB model, and small enough that
        // one chunk per device in flight across 10,000 devices stays well
        // under a gigabyte in the broker.
        ArtifactLimits { max_chunk_bytes: 64 * 1024, requests_per_second: 64, burst: 128 }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub api_token: String,
    pub keys_dir: PathBuf,
    pub broker: BrokerMode,
    /// The URL written into provisioned agent configs.
    pub public_broker_url: BrokerUrl,
    pub max_connections: usize,
    pub artifacts: ArtifactLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    api_listen: Option<String>,
    api_token: Option<String>,
    keys_dir: Option<PathBuf>,
    broker: Option<RawBroker>,
    artifacts: Option<RawArtifacts>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    listen: Option<String>,
    url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    public_url: Option<String>,
    max_connections: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    dashboard_password: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawArtifacts {
    max_chunk_bytes: Option<u32>,
    requests_per_second: Option<u32>,
    burst: Option<u32>,
}

impl FleetConfig {
    /// Reads and validates `path`. Relative paths inside are relative to the
    /// config file's directory, so a config and its data can move together.
    pub fn load(path: &Path) -> Result<FleetConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<FleetConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1).unwrap_or(0);
            ConfigError::Syntax { path: path.into(), line, message: e.message().trim().replace('\n', " ") }
        })?;
        let key = |key: &'static str, message: String| ConfigError::Key { path: path.into(), key, message };
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let data_dir = anchor(raw.data_dir.ok_or_else(|| key("data_dir", "missing (where the registry and bundles live)".into()))?);
        let keys_dir = anchor(raw.keys_dir.ok_or_else(|| key("keys_dir", "missing (the directory `outpost-fleet keygen --out` made)".into()))?);
        let api_listen_text = raw.api_listen.unwrap_or_else(|| DEFAULT_API_LISTEN.into());
        let api_listen = api_listen_text
            .parse()
            .map_err(|_| key("api_listen", format!("{api_listen_text:?} is not an address like 127.0.0.1:8700")))?;
        let api_token = raw.api_token.ok_or_else(|| key("api_token", "missing (the operator API's bearer token)".into()))?;
        if api_token.trim().len() < MIN_TOKEN_LEN {
            return Err(key("api_token", format!("must be at least {MIN_TOKEN_LEN} characters")));
        }
        if api_token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(key("api_token", "must not contain spaces or control characters".into()));
        }

        let b = raw.broker.unwrap_or_default();
        let broker = match (b.listen, b.url) {
            (Some(_), Some(_)) => {
                return Err(key("broker.url", "set either broker.listen (embedded broker) or broker.url (external), not both".into()))
            }
            (None, Some(url)) => {
                let url = BrokerUrl::parse(&url).map_err(|m| key("broker.url", m))?;
                if url.tls {
                    return Err(key("broker.url", "mqtts:// is not supported for the fleet's own connection yet; use mqtt:// on a private network".into()));
                }
                if b.username.is_some() != b.password.is_some() {
                    return Err(key("broker.password", "broker.username and broker.password go together".into()));
                }
                if b.tls_cert.is_some() || b.tls_key.is_some() {
                    return Err(key("broker.tls_cert", "only for the embedded broker (broker.listen); configure TLS on the external broker itself".into()));
                }
                if b.dashboard_password.is_some() {
                    return Err(key("broker.dashboard_password", "only for the embedded broker; add the dashboard user to the external broker itself".into()));
                }
                BrokerMode::External { url, username: b.username, password: b.password }
            }
            (listen, None) => {
                if b.username.is_some() || b.password.is_some() {
                    return Err(key("broker.username", "only for an external broker (broker.url); the embedded broker makes its own".into()));
                }
                let text = listen.unwrap_or_else(|| DEFAULT_BROKER_LISTEN.into());
                let listen = text
                    .parse()
                    .map_err(|_| key("broker.listen", format!("{text:?} is not an address like 0.0.0.0:1883")))?;
                let tls = match (b.tls_cert, b.tls_key) {
                    (Some(cert), Some(key)) => Some(TlsFiles { cert: anchor(cert), key: anchor(key) }),
                    (None, None) => None,
                    (Some(_), None) => return Err(key("broker.tls_key", "missing: broker.tls_cert and broker.tls_key go together".into())),
                    (None, Some(_)) => return Err(key("broker.tls_cert", "missing: broker.tls_cert and broker.tls_key go together".into())),
                };
                if let Some(p) = &b.dashboard_password {
                    if p.len() < MIN_TOKEN_LEN || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(key(
                            "broker.dashboard_password",
                            format!("must be at least {MIN_TOKEN_LEN} characters, without spaces or control characters"),
                        ));
                    }
                }
                BrokerMode::Embedded { listen, tls, dashboard_password: b.dashboard_password }
            }
        };
        let public_broker_url = match b.public_url {
            Some(u) => BrokerUrl::parse(&u).map_err(|m| key("broker.public_url", m))?,
            None => match &broker {
                BrokerMode::External { url, .. } => url.clone(),
                BrokerMode::Embedded { listen, tls, .. } => {
                    // 0.0.0.0 is no address a device can dial: say so
                    // rather than write an agent config that cannot connect.
                    let host = if listen.ip().is_unspecified() {
                        "localhost".to_string()
                    } else {
                        listen.ip().to_string()
                    };
                    BrokerUrl { host, port: listen.port(), tls: tls.is_some() }
                }
            },
        };
        let max_connections = b.max_connections.unwrap_or(12_000);
        if max_connections == 0 {
            return Err(key("broker.max_connections", "must be at least 1".into()));
        }

        let a = raw.artifacts.unwrap_or_default();
        let defaults = ArtifactLimits::default();
        let artifacts = ArtifactLimits {
            max_chunk_bytes: a.max_chunk_bytes.unwrap_or(defaults.max_chunk_bytes),
            requests_per_second: a.requests_per_second.unwrap_or(defaults.requests_per_second),
            burst: a.burst.unwrap_or(defaults.burst),
        };
        // 1 KiB..=1 MiB: smaller wastes round trips, larger does not fit
        // the broker's payload limit comfortably.
        if !(1024..=1024 * 1024).contains(&artifacts.max_chunk_bytes) {
            return Err(key("artifacts.max_chunk_bytes", "must be between 1024 and 1048576".into()));
        }
        if artifacts.requests_per_second == 0 {
            return Err(key("artifacts.requests_per_second", "must be at least 1".into()));
        }
        if artifacts.burst == 0 {
            return Err(key("artifacts.burst", "must be at least 1".into()));
        }

        Ok(FleetConfig { data_dir, api_listen, api_token, keys_dir, broker, public_broker_url, max_connections, artifacts })
    }

    pub fn registry_path(&self) -> PathBuf {
        self.data_dir.join("registry.sqlite")
    }
    pub fn bundles_dir(&self) -> PathBuf {
        self.data_dir.join("bundles")
    }
    pub fn uploads_dir(&self) -> PathBuf {
        self.data_dir.join("uploads")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "data_dir = \"data\"\napi_token = \"0123456789abcdef\"\nkeys_dir = \"/k\"\n";

    fn parse(text: &str) -> Result<FleetConfig, ConfigError> {
        FleetConfig::parse(text, Path::new("/etc/fleet.toml"))
    }

    #[test]
    fn defaults_to_the_embedded_broker() {
        let c = parse(GOOD).expect("parses");
        assert_eq!(c.data_dir, PathBuf::from("/etc/data"));
        let listen: SocketAddr = DEFAULT_BROKER_LISTEN.parse().expect("addr");
        assert!(listen.ip().is_loopback() && listen.port() == 1883, "loopback, the usual port");
        assert_eq!(c.broker, BrokerMode::Embedded { listen, tls: None, dashboard_password: None });
        assert_eq!(c.public_broker_url.to_string(), "mqtt://127.0.0.1:1883");
        assert_eq!(c.api_listen.to_string(), DEFAULT_API_LISTEN);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("api_token = \"0123456789abcdef\"\nkeys_dir = \"/k\"\n", "data_dir: missing"),
            ("data_dir = \"d\"\napi_token = \"short\"\nkeys_dir = \"/k\"\n", "api_token: must be at least"),
            (&format!("{GOOD}api_listen = \"nope\"\n"), "api_listen: \"nope\""),
            (&format!("{GOOD}[broker]\nurl = \"http://x\"\n"), "broker.url: "),
            (&format!("{GOOD}[broker]\nurl = \"mqtt://x:1\"\nlisten = \"0.0.0.0:1\"\n"), "broker.url: set either"),
            (&format!("{GOOD}[broker]\nlisten = \"x\"\n"), "broker.listen: "),
            (&format!("{GOOD}[broker]\ntls_cert = \"c.pem\"\n"), "broker.tls_key: missing"),
            (&format!("{GOOD}[broker]\ntls_key = \"k.pem\"\n"), "broker.tls_cert: missing"),
            (&format!("{GOOD}[broker]\nurl = \"mqtt://x:1\"\ntls_cert = \"c\"\ntls_key = \"k\"\n"), "broker.tls_cert: only for the embedded"),
            (&format!("{GOOD}[broker]\ndashboard_password = \"short\"\n"), "broker.dashboard_password: must be"),
            (&format!("{GOOD}[broker]\nurl = \"mqtt://x:1\"\ndashboard_password = \"0123456789abcdef\"\n"), "broker.dashboard_password: only"),
            (&format!("{GOOD}[artifacts]\nmax_chunk_bytes = 10\n"), "artifacts.max_chunk_bytes"),
            (&format!("{GOOD}dta_dir = 1\n"), "line 4: unknown field `dta_dir`"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn embedded_broker_with_tls_and_a_dashboard() {
        let c = parse(&format!(
            "{GOOD}[broker]\nlisten = \"0.0.0.0:8883\"\ntls_cert = \"tls/cert.pem\"\ntls_key = \"/k/key.pem\"\ndashboard_password = \"0123456789abcdef\"\n"
        ))
        .expect("parses");
        let tls = TlsFiles { cert: PathBuf::from("/etc/tls/cert.pem"), key: PathBuf::from("/k/key.pem") };
        assert_eq!(
            c.broker,
            BrokerMode::Embedded {
                listen: "0.0.0.0:8883".parse().expect("addr"),
                tls: Some(tls),
                dashboard_password: Some("0123456789abcdef".into())
            }
        );
        assert_eq!(c.public_broker_url.to_string(), "mqtts://localhost:8883", "TLS is what devices are told");
        let c = parse(&format!("{GOOD}[broker]\nlisten = \"10.1.2.3:1883\"\n")).expect("parses");
        assert_eq!(c.public_broker_url.to_string(), "mqtt://10.1.2.3:1883");
    }

    #[test]
    fn external_broker() {
        let c = parse(&format!("{GOOD}[broker]\nurl = \"mqtt://mosq:1884\"\nusername = \"f\"\npassword = \"p\"\n"))
            .expect("parses");
        assert!(matches!(c.broker, BrokerMode::External { ref url, .. } if url.port == 1884 && url.host == "mosq"));
        assert_eq!(c.public_broker_url.to_string(), "mqtt://mosq:1884");
    }
}
