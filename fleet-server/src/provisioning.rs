//! Provisioning: registering a device and writing its ready-to-flash
//! `agent.toml`.
//!
//! `outpost-fleet provision DEVICE_ID --tag T … --out agent.toml` asks the
//! server to:
//!
//! 1. check the id (it becomes an MQTT client id and topic level, so only
//!    letters, digits, `.`, `_`, `-`; 1–64 characters);
//! 2. make the device's ed25519 key pair and a random 256-bit broker secret;
//! 3. store the public key and the *hashed* secret in the registry;
//! 4. return the agent config, which the CLI writes with mode 0600.
//!
//! The server never keeps the device's private key or its secret: the
//! config returned once is the only copy. Losing it means provisioning the
//! device again under a new id (or decommissioning and re-provisioning).
//!
//! # The agent config
//!
//! One self-contained file, so imaging a device is "copy binary, copy
//! config". Secrets are inline rather than separate files:
//!
//! ```toml
//! device_id  = "pi-0042"
//! tags       = ["pi4", "site-a"]
//! broker     = "mqtt://fleet.example.com:1883"
//! username   = "pi-0042"                      # = device_id = MQTT client id
//! password   = "<64 hex digits>"
//! trust_root = "outpost-ed25519-public-v1 <64 hex digits>"   # the pinned root key
//! device_key = "outpost-ed25519-secret-v1 <64 hex digits>"   # this device's signing key
//! state_dir  = "/var/lib/outpost-agent"
//! listen     = "127.0.0.1:8080"
//! ```
//!
//! # A broker address a device can dial
//!
//! The `broker` written is the fleet's `[broker] public_url`, or, without
//! one, derived from where the broker listens (an external broker's `url`,
//! the embedded broker's `listen`, with a wildcard `0.0.0.0` written as
//! `localhost`). A loopback or wildcard address there works only for an
//! agent on the fleet server's own machine: a Pi flashed with it never
//! connects. So a request with `"check_broker": true` (what `outpost-fleet
//! provision` sends unless given `--force`) is refused, before anything is
//! registered, with [`ProvisionError::LocalBroker`], which says how to set
//! `public_url`. The API alone does not check by default, so scripts and
//! tools that provision agents on the same machine (tests, `simulate`) go
//! on working.
//!
//! `trust_root` and `device_key` hold the one key line of an outpost key file
//! (see `outpost_runtime::bundle::keys`), so `SecretKey::from_file_text` /
//! `PublicKey::from_file_text` read them as they are.

use std::sync::Arc;

use outpost_runtime::bundle::{PublicKey, SecretKey};

use crate::config::BrokerUrl;
use crate::registry::{Registry, RegistryError};

/// Client ids of the fleet server itself; never a device's.
pub const RESERVED_PREFIX: &str = "outpost-fleet";
/// Where the agent keeps its slots unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/outpost-agent";
/// The device's local predict API: loopback, apps on the device call it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("device id {0:?}: {1}")]
    BadId(String, &'static str),
    #[error("tag {0:?}: only letters, digits, '.', '_', '-', ':', at most 64 characters")]
    BadTag(String),
    #[error("device {0} is already provisioned; pick another id")]
    Exists(String),
    #[error("the OS random source failed: {0}")]
    Random(String),
    #[error(
        "the broker address written into the agent config would be {broker}, which only a device on the fleet server's own \
         machine can reach: set `public_url` in the [broker] table of fleet.toml to the address devices dial (e.g. \
         public_url = \"mqtts://fleet.example.com:8883\") and restart the fleet server, or provision with --force \
         for an agent on this machine"
    )]
    LocalBroker { broker: String },
    #[error(transparent)]
    Registry(RegistryError),
}

/// Whether only the fleet server's own machine can dial `broker`: a
/// loopback host (`localhost`, `127.x`, `::1`, `*.localhost`) or a wildcard
/// address (`0.0.0.0`, `::`), IPv4-mapped forms included.
pub fn is_local_broker(broker: &BrokerUrl) -> bool {
    let host = broker.host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
        }
        Err(_) => false,
    }
}

/// What to provision.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct ProvisionRequest {
    pub device_id: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub state_dir: Option<String>,
    pub listen: Option<String>,
    /// Refuse (before registering anything) when the broker address to be
    /// written is loopback or wildcard (module docs). Default false.
    #[serde(default)]
    pub check_broker: bool,
}

/// A provisioned device: the public facts, and the config to flash.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Provisioned {
    pub device_id: String,
    pub tags: Vec<String>,
    pub public_key: String,
    pub key_id: String,
    pub broker: String,
    /// The agent.toml text. Holds the device's secrets: write it 0600.
    pub agent_config: String,
}

/// Checks a device id: safe as an MQTT client id and as one topic level.
pub fn validate_device_id(id: &str) -> Result<(), ProvisionError> {
    let bad = |why| Err(ProvisionError::BadId(id.to_string(), why));
    if id.is_empty() || id.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("only letters, digits, '.', '_' and '-' (it is an MQTT topic level)");
    }
    if id.starts_with('.') || id.starts_with('-') {
        return bad("must start with a letter, digit or '_'");
    }
    if id.starts_with(RESERVED_PREFIX) {
        return bad("names starting with \"outpost-fleet\" are reserved for the fleet server");
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), ProvisionError> {
    if tag.is_empty()
        || tag.len() > 64
        || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(ProvisionError::BadTag(tag.to_string()));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key line of a key file text (drops the comments).
fn key_line(file_text: &str) -> String {
    file_text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default()
        .to_string()
}

/// Registers the device and returns its config (module docs).
pub fn provision(
    registry: &Arc<Registry>,
    root: &PublicKey,
    broker: &BrokerUrl,
    req: &ProvisionRequest,
) -> Result<Provisioned, ProvisionError> {
    validate_device_id(&req.device_id)?;
    let mut tags = Vec::new();
    for t in &req.tags {
        validate_tag(t)?;
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    if req.check_broker && is_local_broker(broker) {
        return Err(ProvisionError::LocalBroker { broker: broker.to_string() });
    }
    let mut seed = [0u8; 32];
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| ProvisionError::Random(e.to_string()))?;
    getrandom::getrandom(&mut secret).map_err(|e| ProvisionError::Random(e.to_string()))?;
    let device_key = SecretKey::from_seed(seed);
    let public = device_key.public_key();
    let password = hex(&secret);
    registry.add_device(&req.device_id, &tags, &password, &public.to_bytes()).map_err(|e| match e {
        RegistryError::DeviceExists(id) => ProvisionError::Exists(id),
        e => ProvisionError::Registry(e),
    })?;

    let device_key_line = format!("outpost-ed25519-secret-v1 {}", hex(&seed));
    seed.fill(0);
    let trust_root = key_line(&root.to_file_text(""));
    let doc = AgentConfigFile {
        device_id: &req.device_id,
        tags: &tags,
        broker: &broker.to_string(),
        username: &req.device_id,
        password: &password,
        trust_root: &trust_root,
        device_key: &device_key_line,
        state_dir: req.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR),
        listen: req.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
    };
    let body = toml::to_string(&doc).map_err(|e| ProvisionError::Random(format!("encoding the config: {e}")))?;
    let agent_config = format!(
        "# outpost-agent configuration for device {id}, written by `outpost-fleet provision`.\n\
         # It holds this device's broker password and private key: keep it mode 0600,\n\
         # flash it onto this one device, and keep no other copy.\n\
         # root key id {root_id}; device key id {key_id}\n{body}",
        id = req.device_id,
        root_id = root.key_id(),
        key_id = public.key_id(),
    );
    Ok(Provisioned {
        device_id: req.device_id.clone(),
        tags,
        public_key: hex(&public.to_bytes()),
        key_id: public.key_id().to_string(),
        broker: broker.to_string(),
        agent_config,
    })
}

#[derive(serde::Serialize)]
struct AgentConfigFile<'a> {
    device_id: &'a str,
    tags: &'a [String],
    broker: &'a str,
    username: &'a str,
    password: &'a str,
    trust_root: &'a str,
    device_key: &'a str,
    state_dir: &'a str,
    listen: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn provisions_a_device_with_a_working_config() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = Arc::new(Registry::open(&dir.path().join("r.sqlite")).expect("registry"));
        let root = SecretKey::from_seed([9; 32]).public_key();
        let broker = BrokerUrl::parse("mqtt://fleet.example:1883").expect("url");
        let req = ProvisionRequest { device_id: "pi-1".into(), tags: vec!["pi4".into(), "pi4".into()], ..Default::default() };
        let p = provision(&reg, &root, &broker, &req).expect("provision");
        assert_eq!(p.tags, vec!["pi4".to_string()]);
        let cfg: toml::Value = toml::from_str(&p.agent_config).expect("valid toml");
        let password = cfg["password"].as_str().expect("password");
        assert!(reg.check_credentials("pi-1", password).expect("check"));
        let key = SecretKey::from_file_text(cfg["device_key"].as_str().expect("key"), Path::new("agent.toml")).expect("key");
        assert_eq!(hex(&key.public_key().to_bytes()), p.public_key);
        let pinned = PublicKey::from_file_text(cfg["trust_root"].as_str().expect("root"), Path::new("agent.toml")).expect("root");
        assert_eq!(pinned, root);
        assert!(matches!(provision(&reg, &root, &broker, &req), Err(ProvisionError::Exists(_))));
        // Asked to, a broker only this machine can dial is refused, and nothing is registered.
        for local in ["mqtt://localhost:1883", "mqtt://127.0.0.1:1", "mqtt://[::1]:1883", "mqtt://0.0.0.0:1883", "mqtt://[::]:1", "mqtt://[::ffff:127.0.0.2]:1"] {
            let b = BrokerUrl::parse(local).expect("url");
            assert!(is_local_broker(&b), "{local}");
            let req = ProvisionRequest { device_id: "pi-2".into(), check_broker: true, ..Default::default() };
            let e = provision(&reg, &root, &b, &req).expect_err(local);
            assert!(matches!(e, ProvisionError::LocalBroker { .. }) && e.to_string().contains("public_url"), "{e}");
        }
        assert!(reg.device("pi-2").expect("registry").is_none(), "a refused provision registers nothing");
        for remote in ["mqtt://10.0.0.5:1883", "mqtts://fleet.lan", "mqtt://[fd00::1]:1883"] {
            assert!(!is_local_broker(&BrokerUrl::parse(remote).expect("url")), "{remote}");
        }
        for bad in ["", "a/b", "+", "x#", "outpost-fleet-1", "-x"] {
            assert!(validate_device_id(bad).is_err(), "{bad:?}");
        }
    }
}
