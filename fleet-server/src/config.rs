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
        if port == 0 {
            return Err(format!("{url:?}: port 0 cannot be dialled"));
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

/// Why `secret` is somebody's example rather than a secret, if it is: a
/// `change-me`, a `<…>` or `…` left from a template, this file's own
/// example token, or one character repeated. Such a value is refused at
/// start like a missing one: it would guard the fleet with a string
/// anybody can read in the docs.
pub fn placeholder_secret(secret: &str) -> Option<String> {
    let s = secret.trim().to_ascii_lowercase();
    let template = (s.starts_with('<') && s.ends_with('>')) || s.contains('…') || s == "a long random string";
    if template || ["change-me", "changeme", "change_me", "replace-me", "replaceme"].iter().any(|p| s.contains(p)) {
        return Some(format!("{secret:?} is a placeholder; use a long random string (e.g. `openssl rand -hex 32`)"));
    }
    let mut chars = s.chars();
    if let (Some(first), true) = (chars.next(), s.chars().count() > 1) {
        if chars.all(|c| c == first) {
            return Some("one character repeated is not a secret; use a long random string (e.g. `openssl rand -hex 32`)".into());
        }
    }
    None
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
        if let Some(why) = placeholder_secret(&api_token) {
            return Err(key("api_token", why));
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
                if let Some(why) = b.password.as_deref().and_then(placeholder_secret) {
                    return Err(key("broker.password", why));
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
                    if let Some(why) = placeholder_secret(p) {
                        return Err(key("broker.dashboard_password", why));
                    }
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

/// What `outpost-fleet check-config` found: problems (the server would
/// not start, or would start and fail devices), warnings (it works, but
/// probably not as meant), and a one-line summary when there is no problem.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    pub summary: Option<String>,
}

/// Checks `path` as `serve` would read it and then some: the keys load
/// (certificate signed by the root, not expired), `data_dir` is writable,
/// the broker's TLS files are readable, and the broker address written
/// into agent configs is one a device elsewhere can dial. Leaves nothing
/// behind (the write test removes its probe file).
pub fn check_file(path: &Path) -> CheckReport {
    let mut report = CheckReport::default();
    let c = match FleetConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    let name = path.display();
    let mut problem = |key: &str, message: String| report.problems.push(format!("{name}: {key}: {message}"));

    let mut root_id = None;
    if !c.keys_dir.is_dir() {
        problem(
            "keys_dir",
            format!("{} is not a directory (make one with `outpost-fleet keygen --out {}`)", c.keys_dir.display(), c.keys_dir.display()),
        );
    } else {
        match crate::keys::load_trust_root(&c.keys_dir) {
            Ok(root) => root_id = Some(root.key_id().to_string()),
            Err(e) => problem("keys_dir", format!("the root public key: {e}")),
        }
        if let Err(e) = crate::keys::load_signer(&c.keys_dir) {
            problem("keys_dir", format!("the online signing key: {e}"));
        }
    }

    if let Err(e) = writable_dir(&c.data_dir) {
        problem("data_dir", e);
    }

    let broker_text = match &c.broker {
        BrokerMode::Embedded { listen, tls, .. } => {
            if let Some(files) = tls {
                for (key, file) in [("broker.tls_cert", &files.cert), ("broker.tls_key", &files.key)] {
                    if let Err(e) = std::fs::File::open(file) {
                        problem(key, format!("{}: {e}", file.display()));
                    }
                }
            }
            format!("embedded on {listen} ({})", if tls.is_some() { "TLS" } else { "plaintext" })
        }
        BrokerMode::External { url, .. } => format!("external at {url}"),
    };
    if let BrokerMode::Embedded { listen, tls: None, .. } = &c.broker {
        if !listen.ip().is_loopback() {
            report.warnings.push(format!(
                "{name}: broker.listen: {listen} serves plaintext MQTT (device passwords included) to the network; set broker.tls_cert and broker.tls_key"
            ));
        }
    }
    if crate::provisioning::is_local_broker(&c.public_broker_url) {
        report.warnings.push(format!(
            "{name}: broker.public_url: devices would be given {}, which only this machine can dial; `provision` refuses it without --force. \
             Set public_url in [broker] to the address devices dial, e.g. public_url = \"mqtts://fleet.example.com:8883\"",
            c.public_broker_url
        ));
    }
    if c.keys_dir.join(crate::keys::ROOT_KEY).exists() {
        report.warnings.push(format!(
            "{name}: keys_dir: {} holds the root secret key; keep it offline (the server needs {}, {} and {} only)",
            c.keys_dir.display(),
            crate::keys::ROOT_PUB,
            crate::keys::ONLINE_KEY,
            crate::keys::ONLINE_CERT
        ));
    }
    if report.problems.is_empty() {
        report.summary = Some(format!(
            "{name}: OK: data_dir {}, API on {}, keys {} (root key {}), broker {broker_text}, devices are given {}",
            c.data_dir.display(),
            c.api_listen,
            c.keys_dir.display(),
            root_id.unwrap_or_else(|| "-".into()),
            c.public_broker_url,
        ));
    }
    report
}

/// Whether the server could create and write `dir`: the directory itself if
/// it exists, else its nearest existing ancestor (the server creates the
/// rest). Creates a uniquely named file there and removes it at once.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => return Err(format!("{}: no part of the path exists", dir.display())),
        }
    }
    if !at.is_dir() {
        return Err(format!("{} is not a directory", at.display()));
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let probe = at.join(format!(".outpost-check-config-{}-{nanos}", std::process::id()));
    let created = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe);
    if created.is_ok() {
        let _ = std::fs::remove_file(&probe);
    }
    created.map(drop).map_err(|e| {
        if at == dir {
            format!("{} is not writable: {e}", dir.display())
        } else {
            format!("{} cannot be created: {} is not writable: {e}", dir.display(), at.display())
        }
    })
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
            ("data_dir = \"d\"\napi_token = \"CHANGE-ME-0123456789\"\nkeys_dir = \"/k\"\n", "api_token: \"CHANGE-ME-0123456789\" is a placeholder"),
            ("data_dir = \"d\"\napi_token = \"aaaaaaaaaaaaaaaaaaaa\"\nkeys_dir = \"/k\"\n", "api_token: one character repeated"),
            (&format!("{GOOD}[broker]\ndashboard_password = \"<dashboard password>\"\n"), "broker.dashboard_password: \"<dashboard password>\" is a placeholder"),
            (&format!("{GOOD}[broker]\nurl = \"mqtt://x:0\"\n"), "broker.url: \"mqtt://x:0\": port 0"),
            (&format!("{GOOD}[broker]\npublic_url = \"mqtt://x:0\"\n"), "broker.public_url: "),
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
