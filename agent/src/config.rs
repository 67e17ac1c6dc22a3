//! `agent.toml`: what one device needs to know, every key also settable as
//! `OUTPOST_<KEY>` in the environment (which wins over the file).
//!
//! ```toml
//! device_id  = "pi-7"                        # required
//! tags       = ["pi4", "lab"]                # env: OUTPOST_TAGS="pi4,lab"
//! broker     = "mqtts://fleet.example:8883"  # required; mqtt:// or mqtts://
//! username   = "pi-7"
//! password   = "…"
//! # client_cert = "/etc/outpost/client.pem"  # mqtts client certificate …
//! # client_key  = "/etc/outpost/client.key"  # … and its key (PEM)
//! # ca_file     = "/etc/outpost/ca.pem"      # broker CA; default: system roots
//! trust_root = "/etc/outpost/root.pub"       # required; a path, or the key line itself
//! device_key = "/etc/outpost/device.key"     # required; a path, or the key line itself
//! state_dir  = "/var/lib/outpost"            # required
//! listen     = "127.0.0.1:8080"
//! # Streaming mode: predict on JSON messages from these topic filters and
//! # publish each answer to `stream_output` ({topic} = the input topic).
//! # stream_inputs = ["sensors/+/reading"]    # env: OUTPOST_STREAM_INPUTS="a/+,b/#"
//! # stream_output = "{topic}/prediction"
//! ```
//!
//! Tuning keys and their defaults: `chunk_size` 32768, `chunks_in_flight`
//! 8, `chunk_timeout_secs` 10, `telemetry_interval_secs` 10,
//! `offline_buffer` 256 (messages kept while the broker is away),
//! `probation_secs` 60, `probation_max_error_rate` 0.05,
//! `probation_max_latency_ratio` 5, `probation_min_requests` 20,
//! `probation_max_boots` 3, `threads` 0 (one HTTP worker per core),
//! `keep_alive_secs` 30, `reconnect_min_ms` 500, `reconnect_max_ms` 30000,
//! `stream_queue` 64 (stream messages waiting for inference; more are
//! dropped and counted in `/metrics`), `download_attempts` 5 (fresh
//! attempts before a download that does not verify is given up),
//! `download_unavailable_rounds` 4, `download_retry_min_ms` 1000,
//! `download_retry_max_ms` 60000 (see `retry`).
//!
//! Every mistake is a [`ConfigError`] naming the key, so the agent stops at
//! start with one line a person can act on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_runtime::bundle::{PublicKey, SecretKey, TrustRoot};
use outpost_runtime::protocol::{validate_device_id, Probation};
use serde::Deserialize;

/// A configuration mistake, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), message: message.into() }
}

/// The broker, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// The agent's settings, checked.
#[derive(Debug)]
pub struct AgentConfig {
    pub device_id: String,
    pub tags: Vec<String>,
    pub broker: BrokerUrl,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM client certificate and key for mqtts.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub trust_root: TrustRoot,
    pub device_key: SecretKey,
    pub state_dir: PathBuf,
    pub listen: String,
    pub chunk_size: u32,
    pub chunks_in_flight: usize,
    pub chunk_timeout: Duration,
    pub telemetry_interval: Duration,
    pub offline_buffer: usize,
    /// Probation used when a directive does not give its own.
    pub probation: Probation,
    pub threads: usize,
    pub keep_alive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The streaming mode, when `stream_inputs` names topics.
    pub stream: Option<StreamSettings>,
    /// When a download is tried again and given up.
    pub download_retry: crate::retry::RetryPolicy,
}

/// Streaming inference on the agent's own broker connection.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// Topic filters to predict on (never under `outpost/`).
    pub inputs: Vec<String>,
    pub config: outpost_runtime::stream::StreamConfig,
}

/// Every key, as in the file. The environment variable is `OUTPOST_` plus
/// the key in upper case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    device_id: Option<String>,
    tags: Option<Vec<String>>,
    broker: Option<String>,
    username: Option<String>,
    password: Option<String>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    trust_root: Option<String>,
    device_key: Option<String>,
    state_dir: Option<PathBuf>,
    listen: Option<String>,
    chunk_size: Option<u32>,
    chunks_in_flight: Option<usize>,
    chunk_timeout_secs: Option<u64>,
    telemetry_interval_secs: Option<u64>,
    offline_buffer: Option<usize>,
    probation_secs: Option<u32>,
    probation_max_error_rate: Option<f32>,
    probation_max_latency_ratio: Option<f32>,
    probation_min_requests: Option<u32>,
    probation_max_boots: Option<u32>,
    threads: Option<usize>,
    keep_alive_secs: Option<u64>,
    reconnect_min_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
    stream_inputs: Option<Vec<String>>,
    stream_output: Option<String>,
    stream_queue: Option<usize>,
    download_attempts: Option<u32>,
    download_unavailable_rounds: Option<u32>,
    download_retry_min_ms: Option<u64>,
    download_retry_max_ms: Option<u64>,
}

/// Keys whose environment value is a number (parsed as TOML), or a list
/// (comma-separated); all others are strings.
const NUMERIC_KEYS: &[&str] = &[
    "chunk_size",
    "chunks_in_flight",
    "chunk_timeout_secs",
    "telemetry_interval_secs",
    "offline_buffer",
    "probation_secs",
    "probation_max_error_rate",
    "probation_max_latency_ratio",
    "probation_min_requests",
    "probation_max_boots",
    "threads",
    "keep_alive_secs",
    "reconnect_min_ms",
    "reconnect_max_ms",
    "stream_queue",
    "download_attempts",
    "download_unavailable_rounds",
    "download_retry_min_ms",
    "download_retry_max_ms",
];
const STRING_KEYS: &[&str] = &[
    "device_id",
    "broker",
    "username",
    "password",
    "client_cert",
    "client_key",
    "ca_file",
    "trust_root",
    "device_key",
    "state_dir",
    "listen",
    "stream_output",
];

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["tags", "stream_inputs"];

impl AgentConfig {
    /// Reads `path` (if given), overlays `OUTPOST_<KEY>` variables from
    /// `env`, and checks everything (including reading the key files).
    /// Stops at the first problem; [`load_all`](Self::load_all) lists them all.
    pub fn load(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<AgentConfig, ConfigError> {
        Self::load_all(path, env).map_err(|mut all| all.remove(0))
    }

    /// The file and the environment merged, each key of the right type.
    fn read_raw(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Raw, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| err("--config", format!("cannot read {}: {e}", p.display())))?;
                text.parse::<toml::Table>().map_err(|e| toml_error(&e.to_string()))?
            }
            None => toml::Table::new(),
        };
        for key in STRING_KEYS.iter().chain(NUMERIC_KEYS).chain(LIST_KEYS) {
            let var = format!("OUTPOST_{}", key.to_ascii_uppercase());
            let Some(value) = env(&var) else { continue };
            let value = if LIST_KEYS.contains(key) {
                toml::Value::Array(
                    value.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| toml::Value::String(t.into())).collect(),
                )
            } else if NUMERIC_KEYS.contains(key) {
                let parsed = value
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .or_else(|_| value.trim().parse::<f64>().map(toml::Value::Float))
                    .map_err(|_| err(key, format!("{var}={value:?} is not a number")))?;
                parsed
            } else {
                toml::Value::String(value)
            };
            table.insert(key.to_string(), value);
        }
        let raw: Raw = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| toml_error(&e.to_string()))?;
        Ok(raw)
    }

    /// Like [`load`](Self::load), but reports every problem it can find
    /// (one [`ConfigError`] each), not only the first: what
    /// `outpost-agent check-config` prints and `run` refuses to start with.
    ///
    /// Beyond the shape of each key, it refuses values that parse but can
    /// never work on a real device: all-zero keys,
    /// placeholder passwords, broker addresses nobody can dial.
    pub fn load_all(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<AgentConfig, Vec<ConfigError>> {
        let raw = Self::read_raw(path, env).map_err(|e| vec![e])?;
        let mut problems = placeholders(&raw);
        match AgentConfig::check(raw) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(problems),
            Err(e) => {
                // The placeholder check may already have named this key.
                if !problems.iter().any(|p| p.key == e.key) {
                    problems.push(e);
                }
                Err(problems)
            }
        }
    }

    fn check(raw: Raw) -> Result<AgentConfig, ConfigError> {
        let device_id = raw.device_id.ok_or_else(|| err("device_id", "missing"))?;
        validate_device_id(&device_id).map_err(|m| err("device_id", m))?;
        let tags = raw.tags.unwrap_or_default();
        let broker = parse_broker(&raw.broker.ok_or_else(|| err("broker", "missing (mqtt://host:port or mqtts://…)"))?)?;
        if raw.client_cert.is_some() != raw.client_key.is_some() {
            return Err(err("client_cert", "client_cert and client_key go together"));
        }
        if !broker.tls && (raw.client_cert.is_some() || raw.ca_file.is_some()) {
            return Err(err("broker", "client_cert / ca_file need an mqtts:// broker"));
        }
        for (key, path) in [("client_cert", &raw.client_cert), ("client_key", &raw.client_key), ("ca_file", &raw.ca_file)] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(err(key, format!("{} is not a readable file", p.display())));
                }
            }
        }
        let trust_root = read_trust_root(&raw.trust_root.ok_or_else(|| err("trust_root", "missing (the pinned root public key)"))?)?;
        let device_key = read_device_key(&raw.device_key.ok_or_else(|| err("device_key", "missing (this device's secret key)"))?)?;
        let state_dir = raw.state_dir.ok_or_else(|| err("state_dir", "missing"))?;
        let listen = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        if !listen.contains(':') {
            return Err(err("listen", format!("{listen:?} is not host:port")));
        }
        let chunk_size = raw.chunk_size.unwrap_or(32 << 10);
        let max_chunk = outpost_runtime::protocol::Limits::default().chunk_data_bytes;
        if chunk_size < 1024 || chunk_size > max_chunk {
            return Err(err("chunk_size", format!("{chunk_size} must be 1024 to {max_chunk} bytes")));
        }
        let chunks_in_flight = raw.chunks_in_flight.unwrap_or(8);
        if !(1..=256).contains(&chunks_in_flight) {
            return Err(err("chunks_in_flight", "must be 1 to 256"));
        }
        let positive = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(err(key, "must be above 0")),
                v => Ok(v),
            }
        };
        let defaults = Probation::default();
        let probation = Probation {
            duration_secs: raw.probation_secs.unwrap_or(defaults.duration_secs),
            max_error_rate: raw.probation_max_error_rate.unwrap_or(defaults.max_error_rate),
            max_latency_ratio: raw.probation_max_latency_ratio.unwrap_or(defaults.max_latency_ratio),
            min_requests: raw.probation_min_requests.unwrap_or(defaults.min_requests),
            max_boots: raw.probation_max_boots.unwrap_or(defaults.max_boots),
        };
        probation.validate().map_err(|m| err("probation_*", m))?;
        let offline_buffer = raw.offline_buffer.unwrap_or(256);
        if offline_buffer == 0 {
            return Err(err("offline_buffer", "must be at least 1"));
        }
        let reconnect_min = Duration::from_millis(positive("reconnect_min_ms", raw.reconnect_min_ms, 500)?);
        let reconnect_max = Duration::from_millis(positive("reconnect_max_ms", raw.reconnect_max_ms, 30_000)?);
        if reconnect_max < reconnect_min {
            return Err(err("reconnect_max_ms", "must not be below reconnect_min_ms"));
        }
        let stream = stream_settings(raw.stream_inputs, raw.stream_output, raw.stream_queue)?;
        let retry_defaults = crate::retry::RetryPolicy::default();
        let download_retry = crate::retry::RetryPolicy {
            attempts: positive("download_attempts", raw.download_attempts.map(u64::from), retry_defaults.attempts as u64)?
                .min(1000) as u32,
            unavailable_rounds: raw.download_unavailable_rounds.unwrap_or(retry_defaults.unavailable_rounds).min(1000),
            min: Duration::from_millis(positive("download_retry_min_ms", raw.download_retry_min_ms, 1000)?),
            max: Duration::from_millis(positive("download_retry_max_ms", raw.download_retry_max_ms, 60_000)?),
        };
        if download_retry.max < download_retry.min {
            return Err(err("download_retry_max_ms", "must not be below download_retry_min_ms"));
        }
        Ok(AgentConfig {
            download_retry,
            stream,
            device_id,
            tags,
            broker,
            username: raw.username,
            password: raw.password,
            client_cert: raw.client_cert,
            client_key: raw.client_key,
            ca_file: raw.ca_file,
            trust_root,
            device_key,
            state_dir,
            listen,
            chunk_size,
            chunks_in_flight,
            chunk_timeout: Duration::from_secs(positive("chunk_timeout_secs", raw.chunk_timeout_secs, 10)?),
            telemetry_interval: Duration::from_secs(positive(
                "telemetry_interval_secs",
                raw.telemetry_interval_secs,
                10,
            )?),
            offline_buffer,
            probation,
            threads: raw.threads.unwrap_or(0),
            keep_alive: Duration::from_secs(positive("keep_alive_secs", raw.keep_alive_secs, 30)?.max(5)),
            reconnect_min,
            reconnect_max,
        })
    }
}

/// `trust_root`: the key line itself, or the path of a `.pub` file.
fn read_trust_root(value: &str) -> Result<TrustRoot, ConfigError> {
    if value.trim_start().starts_with("outpost-ed25519-public-v1") {
        PublicKey::from_file_text(value, Path::new("trust_root")).map(TrustRoot::new)
    } else {
        TrustRoot::read_file(value)
    }
    .map_err(|e| err("trust_root", e.to_string()))
}

/// `device_key`: the key line itself, or the path of a secret key file.
fn read_device_key(value: &str) -> Result<SecretKey, ConfigError> {
    if value.trim_start().starts_with("outpost-ed25519-secret-v1") {
        SecretKey::from_file_text(value, Path::new("device_key"))
    } else {
        SecretKey::read_file(value)
    }
    .map_err(|e| err("device_key", e.to_string()))
}

/// Passwords that are somebody's example, not a credential. Compared
/// ignoring case, after trimming.
const PLACEHOLDER_PASSWORDS: &[&str] =
    &["change-me", "changeme", "change_me", "change me", "password", "secret", "…", "...", "xxx", "todo"];

/// Domains reserved for documentation (RFC 2606, RFC 6761): a host under
/// one is an example somebody forgot to replace, never a broker.
fn placeholder_host(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    ["example.com", "example.net", "example.org", "example", "invalid"]
        .iter()
        .any(|d| h == *d || h.ends_with(&format!(".{d}")))
}

/// Values that parse but cannot work on a device: what the example
/// `agent.toml` ships with (all-zero keys, `password = "change-me"`, a
/// `fleet.example.com` broker) and broker addresses nobody can dial (no
/// host, port 0, the wildcard address). Today such a config would start
/// and retry forever; this names the key instead. One problem per key.
fn placeholders(raw: &Raw) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    if let Some(url) = &raw.broker {
        match parse_broker(url) {
            Err(e) => problems.push(e),
            Ok(b) if placeholder_host(&b.host) => problems.push(err(
                "broker",
                format!("{url:?}: {} is a documentation example, not the fleet's broker (use the broker URL `outpost-fleet provision` wrote)", b.host),
            )),
            Ok(b) if b.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) => problems.push(err(
                "broker",
                format!("{url:?}: {} is the wildcard address a server listens on, not one a device can dial", b.host),
            )),
            Ok(_) => {}
        }
    }
    if let Some(password) = &raw.password {
        let p = password.trim();
        if p.is_empty() {
            problems.push(err("password", "empty (use the password `outpost-fleet provision` wrote)"));
        } else if PLACEHOLDER_PASSWORDS.iter().any(|x| p.eq_ignore_ascii_case(x)) || (p.starts_with('<') && p.ends_with('>')) {
            problems.push(err("password", format!("{p:?} is a placeholder, not this device's broker password (use the one `outpost-fleet provision` wrote)")));
        }
    }
    // The zero seed's public key: a trust_root made from the all-zero
    // secret is as public as the zeros themselves.
    let zero_public = SecretKey::from_seed([0; 32]).public_key();
    if let Some(Ok(root)) = raw.trust_root.as_deref().map(read_trust_root) {
        if root.key().to_bytes() == [0; 32] || *root.key() == zero_public {
            problems.push(err("trust_root", "an all-zero placeholder key, not the fleet's root key (use the trust_root line `outpost-fleet provision` wrote)"));
        }
    }
    if let Some(Ok(key)) = raw.device_key.as_deref().map(read_device_key) {
        if key.public_key() == zero_public {
            problems.push(err("device_key", "an all-zero placeholder key, which anyone can sign with (use the device_key line `outpost-fleet provision` wrote)"));
        }
    }
    problems
}

/// The streaming keys, checked: filters well-formed and outside the fleet's
/// own topics (a device answering `outpost/…` messages would answer the
/// fleet's directives), the output template valid.
fn stream_settings(
    inputs: Option<Vec<String>>,
    output: Option<String>,
    queue: Option<usize>,
) -> Result<Option<StreamSettings>, ConfigError> {
    let inputs = inputs.unwrap_or_default();
    if inputs.is_empty() {
        if output.is_some() || queue.is_some() {
            return Err(err("stream_inputs", "stream_output / stream_queue need stream_inputs (the topics to predict on)"));
        }
        return Ok(None);
    }
    for filter in &inputs {
        let valid = !filter.is_empty()
            && filter.split('/').enumerate().all(|(i, level)| {
                let last = i == filter.split('/').count() - 1;
                (level != "#" || last) && (!level.contains('#') || level == "#") && (!level.contains('+') || level == "+")
            });
        if !valid {
            return Err(err("stream_inputs", format!("{filter:?} is not an MQTT topic filter")));
        }
        if filter.starts_with("outpost/") || filter == "#" || filter.starts_with("+/") || filter == "+" {
            return Err(err("stream_inputs", format!("{filter:?} would cover the fleet's own outpost/… topics")));
        }
    }
    let mut config = outpost_runtime::stream::StreamConfig::default();
    if let Some(template) = output {
        config.output = template.parse().map_err(|e: outpost_runtime::stream::StreamError| err("stream_output", e.to_string()))?;
    }
    if let Some(q) = queue {
        if q == 0 {
            return Err(err("stream_queue", "must be at least 1"));
        }
        config.queue_capacity = q;
    }
    Ok(Some(StreamSettings { inputs, config }))
}

/// Turns toml/serde messages ("unknown field `x`", "invalid type … for key
/// `y`") into a ConfigError naming the key when the message does.
fn toml_error(message: &str) -> ConfigError {
    let first_line = message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message);
    let key = message
        .split('`')
        .nth(1)
        .filter(|k| !k.contains(' '))
        .unwrap_or("agent.toml")
        .to_string();
    // toml's messages span lines (a source excerpt); keep it to one.
    let flat: String = message.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|')).collect::<Vec<_>>().join("; ");
    ConfigError { key, message: if flat.is_empty() { first_line.to_string() } else { flat } }
}

/// `mqtt://host[:port]` or `mqtts://host[:port]`.
pub fn parse_broker(url: &str) -> Result<BrokerUrl, ConfigError> {
    let bad = |m: &str| err("broker", format!("{url:?}: {m}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected mqtt://host:port or mqtts://host:port"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        _ => return Err(bad("scheme must be mqtt or mqtts")),
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('@') || hostport.contains('/') {
        return Err(bad("put credentials in username/password, not in the URL"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().map_err(|_| bad("port is not a number"))?)
        }
        _ => (hostport, default_port),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if port == 0 {
        return Err(bad("port 0 cannot be dialled"));
    }
    Ok(BrokerUrl { tls, host: host.to_string(), port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_keys(dir: &Path) -> (PathBuf, PathBuf) {
        let root = SecretKey::from_seed([1; 32]);
        let dev = SecretKey::from_seed([2; 32]);
        let rp = dir.join("root.pub");
        let dp = dir.join("device.key");
        root.public_key().write_file(&rp, "root").unwrap();
        dev.write_file(&dp, "device").unwrap();
        (rp, dp)
    }

    #[test]
    fn file_env_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (rp, dp) = write_keys(dir.path());
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "device_id = \"pi-7\"\nbroker = \"mqtt://127.0.0.1:1883\"\ntrust_root = {:?}\ndevice_key = {:?}\nstate_dir = {:?}\n",
                rp,
                dp,
                dir.path()
            ),
        )
        .unwrap();
        let c = AgentConfig::load(Some(&file), |_| None).unwrap();
        assert_eq!(c.device_id, "pi-7");
        assert_eq!(c.broker, BrokerUrl { tls: false, host: "127.0.0.1".into(), port: 1883 });
        assert_eq!(c.chunk_size, 32768);

        let env = |k: &str| match k {
            "OUTPOST_TAGS" => Some("pi4, lab".to_string()),
            "OUTPOST_CHUNK_SIZE" => Some("4096".to_string()),
            _ => None,
        };
        let c = AgentConfig::load(Some(&file), env).unwrap();
        assert_eq!(c.tags, vec!["pi4", "lab"]);
        assert_eq!(c.chunk_size, 4096);

        let e = AgentConfig::load(Some(&file), |k| (k == "OUTPOST_CHUNK_SIZE").then(|| "lots".into())).unwrap_err();
        assert_eq!(e.key, "chunk_size");
        let e = AgentConfig::load(Some(&file), |k| (k == "OUTPOST_BROKER").then(|| "http://x".into())).unwrap_err();
        assert_eq!(e.key, "broker");
        let e = AgentConfig::load(Some(&file), |k| (k == "OUTPOST_DEVICE_ID").then(|| "a/b".into())).unwrap_err();
        assert_eq!(e.key, "device_id");

        // Streaming keys: a list from the environment; filters checked.
        let stream = |v: &'static str| move |k: &str| (k == "OUTPOST_STREAM_INPUTS").then(|| v.to_string());
        let c = AgentConfig::load(Some(&file), stream("sensors/+/reading, plant/#")).unwrap();
        assert_eq!(c.stream.map(|s| s.inputs), Some(vec!["sensors/+/reading".to_string(), "plant/#".to_string()]));
        assert!(AgentConfig::load(Some(&file), |_| None).unwrap().stream.is_none());
        for bad in ["outpost/v1/#", "#", "a/#/b", "a+/b"] {
            let e = AgentConfig::load(Some(&file), stream(bad)).unwrap_err();
            assert_eq!(e.key, "stream_inputs", "{bad}: {e}");
        }
        let e = AgentConfig::load(Some(&file), |k| (k == "OUTPOST_STREAM_QUEUE").then(|| "8".into())).unwrap_err();
        assert_eq!(e.key, "stream_inputs", "{e}");

        std::fs::write(&file, "device_id = \"x\"\nbrokr = \"mqtt://h\"\n").unwrap();
        let e = AgentConfig::load(Some(&file), |_| None).unwrap_err();
        assert_eq!(e.key, "brokr", "{e}");
        assert!(!e.to_string().contains('\n'));
        std::fs::write(&file, "device_id = \"x\"\n").unwrap();
        assert_eq!(AgentConfig::load(Some(&file), |_| None).unwrap_err().key, "broker");
    }

    #[test]
    fn broker_urls() {
        assert_eq!(parse_broker("mqtts://h").unwrap(), BrokerUrl { tls: true, host: "h".into(), port: 8883 });
        assert_eq!(parse_broker("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(parse_broker("mqtt://u:p@h").is_err());
        assert!(parse_broker("h:1883").is_err());
        assert!(parse_broker("mqtt://h:0").is_err(), "port 0 cannot be dialled");
        assert!(parse_broker("mqtt://:1883").is_err());
    }

    #[test]
    fn placeholders_are_named_and_real_values_pass() {
        assert!(placeholder_host("fleet.example.com") && placeholder_host("EXAMPLE.org.") && placeholder_host("x.invalid"));
        assert!(!placeholder_host("fleet.lan") && !placeholder_host("examples.com") && !placeholder_host("127.0.0.1"));
        let raw = |password: &str, broker: &str| Raw {
            password: Some(password.into()),
            broker: Some(broker.into()),
            ..Default::default()
        };
        let keys = |r: Raw| placeholders(&r).into_iter().map(|e| e.key).collect::<Vec<_>>();
        assert_eq!(keys(raw("change-me", "mqtt://fleet.lan")), ["password"]);
        assert_eq!(keys(raw("<password>", "mqtt://[::]:1883")), ["broker", "password"]);
        assert!(keys(raw("3f1c9a0b7d2e4f6a", "mqtts://10.0.0.5:8883")).is_empty());
    }
}
