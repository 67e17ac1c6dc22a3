//! The operator subcommands: argument types and what they print.
//!
//! Commands that talk to a server take `--server URL --token T`, or
//! `OUTPOST_SERVER` / `OUTPOST_TOKEN` from the environment. Each prints a
//! human table by default and the server's JSON with `--json`. A refusal is
//! an error: exit code 1 and the server's one-line message.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::client::ApiClient;
use crate::config::FleetConfig;

/// Where the fleet server is.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Fleet server API, e.g. http://127.0.0.1:8700.
    #[arg(long, env = "OUTPOST_SERVER", default_value = "http://127.0.0.1:8700")]
    pub server: String,
    /// The api_token of the server's fleet.toml.
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new(&self.server, &self.token)?)
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The fleet.toml to run with.
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// The new device's id (letters, digits, '.', '_', '-').
    pub device_id: String,
    /// A hardware or site tag (repeatable), e.g. --tag pi4 --tag site-a.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Where to write the agent config (mode 0600). Refuses to overwrite.
    #[arg(long)]
    pub out: PathBuf,
    /// The agent's state directory on the device.
    #[arg(long)]
    pub state_dir: Option<String>,
    /// The agent's local predict API address on the device.
    #[arg(long)]
    pub listen: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The model file (.onnx or .tflite).
    pub model: PathBuf,
    /// Model name.
    #[arg(long)]
    pub name: String,
    /// Semantic version, e.g. 1.2.0.
    #[arg(long)]
    pub version: String,
    /// Training data CSV: the drift reference and self-test rows.
    #[arg(long)]
    pub train_data: PathBuf,
    /// Labelled test data CSV (label in the last column).
    #[arg(long)]
    pub test_data: PathBuf,
    /// Refuse the version if accuracy on the test data is below this (0..1).
    #[arg(long)]
    pub min_accuracy: f64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// NAME@VERSION, a published version.
    pub target: String,
    /// Comma-separated device ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub devices: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// How many entries, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `serve`: runs until killed.
pub fn serve(args: &ServeArgs) -> anyhow::Result<String> {
    let config = FleetConfig::load(&args.config)?;
    let _running = crate::server::start(config)?;
    loop {
        std::thread::park();
    }
}

/// A table: header and rows, columns padded to the widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn pretty(v: &Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

/// Writes `text` to a new file with mode 0600 (it holds secrets).
fn write_secret_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("--out {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub fn provision(args: &ProvisionArgs) -> anyhow::Result<String> {
    // Check --out before registering: the config returned is the only copy
    // of the device's secrets, so it must have somewhere to go.
    if args.out.exists() {
        bail!("--out {} already exists; refusing to overwrite a device config", args.out.display());
    }
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("--out {}: directory {} does not exist", args.out.display(), parent.display());
        }
    }
    let client = args.server.client()?;
    let body = json!({"device_id": args.device_id, "tags": args.tags, "state_dir": args.state_dir, "listen": args.listen});
    let answer = client.post_json("/v1/devices", &body)?;
    let config = answer["agent_config"].as_str().context("the server's answer has no agent_config")?;
    write_secret_file(&args.out, config)?;
    if args.server.json {
        let mut shown = answer.clone();
        if let Some(o) = shown.as_object_mut() {
            o.remove("agent_config");
            o.insert("out".into(), json!(args.out));
        }
        return pretty(&shown);
    }
    Ok(format!(
        "provisioned {} (tags: {}; device key {})\nwrote {} (mode 0600: it holds the device's password and private key)\nbroker {}",
        s(&answer["device_id"]),
        answer["tags"].as_array().map(|t| t.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default(),
        s(&answer["key_id"]),
        args.out.display(),
        s(&answer["broker"]),
    ))
}

fn age(unix: &Value) -> String {
    let Some(t) = unix.as_i64() else { return "never".into() };
    let d = (outpost_runtime::bundle::unix_now() as i64 - t).max(0);
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        _ => format!("{}h ago", d / 3600),
    }
}

pub fn devices(args: &ListArgs) -> anyhow::Result<String> {
    let answer = args.server.client()?.get("/v1/devices")?;
    if args.server.json {
        return pretty(&answer);
    }
    let rows: Vec<Vec<String>> = answer["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    let model = match (d["model"].as_str(), d["version"].as_str()) {
                        (Some(m), Some(v)) => format!("{m}@{v}"),
                        _ => "-".into(),
                    };
                    vec![
                        s(&d["id"]),
                        d["tags"].as_array().map(|t| t.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default(),
                        d["status"].as_str().unwrap_or("unknown").to_string(),
                        model,
                        age(&d["last_seen"]),
                        s(&d["last_error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let n = rows.len();
    Ok(format!("{}\n{n} device(s)", table(&["DEVICE", "TAGS", "STATUS", "MODEL", "LAST SEEN", "LAST ERROR"], &rows)))
}

pub fn models(args: &ListArgs) -> anyhow::Result<String> {
    let answer = args.server.client()?.get("/v1/models")?;
    if args.server.json {
        return pretty(&answer);
    }
    let rows: Vec<Vec<String>> = answer["versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    vec![
                        s(&v["model"]),
                        s(&v["version"]),
                        s(&v["sequence"]),
                        v["accuracy"].as_f64().map(|a| format!("{a:.4}")).unwrap_or("-".into()),
                        s(&v["bundle_size"]),
                        s(&v["bundle_sha256"]).chars().take(16).collect(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(table(&["MODEL", "VERSION", "SEQ", "ACCURACY", "BYTES", "BUNDLE"], &rows))
}

pub fn publish(args: &PublishArgs) -> anyhow::Result<String> {
    let files = [&args.model, &args.train_data, &args.test_data];
    let mut total = 0u64;
    for f in files {
        total += std::fs::metadata(f).with_context(|| f.display().to_string())?.len();
    }
    let client = args.server.client()?;
    let bar = if args.quiet || args.server.json {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b
    };
    let mut ids = Vec::new();
    for f in files {
        bar.set_message(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let answer = client.upload(f, |n| bar.inc(n))?;
        ids.push(answer["upload"].as_str().context("the server's answer has no upload id")?.to_string());
    }
    bar.set_message("checking");
    bar.finish_and_clear();
    if !(args.quiet || args.server.json) {
        eprintln!("uploaded {total} bytes; the server is loading the model and measuring accuracy…");
    }
    let body = json!({
        "name": args.name, "version": args.version,
        "model": ids[0], "train_data": ids[1], "test_data": ids[2],
        "min_accuracy": args.min_accuracy,
    });
    let r = client.post_json("/v1/publish", &body)?;
    if args.server.json {
        return pretty(&r);
    }
    Ok(format!(
        "published {}@{} (sequence {})\n  accuracy {} (minimum {}) on {} test rows\n  bundle {} ({} bytes), {} self-test vectors, reference from {} rows\n  server time {:.2}s",
        s(&r["name"]),
        s(&r["version"]),
        s(&r["sequence"]),
        r["accuracy"]["accuracy"].as_f64().map(|a| format!("{a:.4}")).unwrap_or("-".into()),
        s(&r["min_accuracy"]),
        s(&r["accuracy"]["total"]),
        s(&r["bundle_sha256"]),
        s(&r["bundle_size"]),
        s(&r["self_test_vectors"]),
        s(&r["reference_rows"]),
        r["seconds"].as_f64().unwrap_or(0.0),
    ))
}

pub fn deploy(args: &DeployArgs) -> anyhow::Result<String> {
    let r = args.server.client()?.post_json("/v1/deploy", &json!({"target": args.target, "devices": args.devices}))?;
    if args.server.json {
        return pretty(&r);
    }
    let rows: Vec<Vec<String>> = r["deployed"]
        .as_array()
        .map(|a| a.iter().map(|d| vec![s(&d["device"]), format!("{}@{}", s(&d["model"]), s(&d["version"])), s(&d["sequence"])]).collect())
        .unwrap_or_default();
    Ok(table(&["DEVICE", "DESIRED", "DIRECTIVE SEQ"], &rows))
}

pub fn audit(args: &AuditArgs) -> anyhow::Result<String> {
    let r = args.server.client()?.get(&format!("/v1/audit?limit={}", args.limit))?;
    if args.server.json {
        return pretty(&r);
    }
    let rows: Vec<Vec<String>> = r["audit"]
        .as_array()
        .map(|a| a.iter().map(|e| vec![age(&e["at"]), s(&e["actor"]), s(&e["action"]), s(&e["target"]), s(&e["result"])]).collect())
        .unwrap_or_default();
    Ok(table(&["WHEN", "ACTOR", "ACTION", "TARGET", "RESULT"], &rows))
}
