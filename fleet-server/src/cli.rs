//! The operator subcommands: argument types and what they print.
//!
//! Commands that talk to a server take `--server URL --token T`, or
//! `OUTPOST_SERVER` / `OUTPOST_TOKEN` from the environment. Each prints a
//! human table by default and the server's JSON with `--json`. A refusal is
//! an error: exit code 1 and the server's one-line message.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done (for `rollout wait` and `rollout status --watch`: the rollout completed) |
//! | 1 | an error: bad config, the server refused, the server unreachable, `check-config` found problems |
//! | 2 | bad arguments (clap's usage error) |
//! | 3 | `rollout wait` / `status --watch`: the rollout halted (a gate failed) |
//! | 4 | `rollout wait` / `status --watch`: the rollout was aborted |
//! | 5 | `rollout wait` / `status --watch`: `--timeout` passed before the rollout ended |
//!
//! A command that ends with a code other than 0 or 1 returns an [`Exit`]
//! error, which the binary turns into that code.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::client::{ApiClient, ClientError};
use crate::config::FleetConfig;

/// Exit code: the rollout halted (module docs).
pub const EXIT_HALTED: i32 = 3;
/// Exit code: the rollout was aborted.
pub const EXIT_ABORTED: i32 = 4;
/// Exit code: `--timeout` passed first.
pub const EXIT_TIMEOUT: i32 = 5;

/// A command's end with a specific exit code: `stdout` printed as is (when
/// not empty), each line of `message` on stderr.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub stdout: String,
    pub message: String,
}

const EXIT_CODES_HELP: &str = "Exit codes: 0 the rollout completed, 1 an error (unknown rollout, \
server refused), 2 bad arguments, 3 the rollout halted (a gate failed), 4 it was aborted, 5 --timeout \
passed first. While the server cannot be reached (a restart), it keeps asking until --timeout.";

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
    /// Write the config even when its broker address is loopback or wildcard
    /// (only an agent on the fleet server's machine could use it). Without
    /// it such a provision is refused, registering nothing: set [broker]
    /// public_url in fleet.toml to the address devices dial.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The fleet.toml to check.
    #[arg(long)]
    pub config: PathBuf,
}

/// `devices` lists; `devices show ID` shows one.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DevicesArgs {
    #[command(subcommand)]
    pub command: Option<DevicesCommand>,
    /// Only devices with this tag (repeatable: any of them).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Only devices running this model: NAME or NAME@VERSION.
    #[arg(long)]
    pub model: Option<String>,
    /// Only devices whose last reported status is this (e.g. committed, probation, offline; `unknown` for never heard from).
    #[arg(long)]
    pub status: Option<String>,
    #[command(flatten)]
    pub list: ListArgs,
}

impl DevicesArgs {
    /// Whether device `d` (as `/v1/devices` lists it) passes the filters.
    fn keeps(&self, d: &Value) -> bool {
        let tags: Vec<&str> = d["tags"].as_array().map(|t| t.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let tag_ok = self.tags.is_empty() || self.tags.iter().any(|t| tags.contains(&t.as_str()));
        let model_ok = match &self.model {
            None => true,
            Some(want) => match (d["model"].as_str(), d["version"].as_str()) {
                (Some(m), Some(v)) if want.contains('@') => *want == format!("{m}@{v}"),
                (Some(m), _) => want == m,
                _ => false,
            },
        };
        let status_ok = self.status.as_deref().map_or(true, |want| d["status"].as_str().unwrap_or("unknown") == want);
        tag_ok && model_ok && status_ok
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum DevicesCommand {
    /// One device: tags, status, model, last error, its current directive.
    Show(DeviceShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct DeviceShowArgs {
    /// The device id.
    pub id: String,
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
/// Runs the server until SIGTERM or SIGINT; then writes what must survive
/// the stop (the devices' counter floors, see `fleet_link`) and exits.
/// Everything else is already on disk.
pub fn serve(args: &ServeArgs) -> anyhow::Result<String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let config = FleetConfig::load(&args.config)?;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("installing the SIGTERM handler")?;
    let running = crate::server::start(config)?;
    let signal = signals.forever().next();
    let n = running.fleet.inbox.flush_counters();
    log::info!("stopping on signal {}; wrote the counter floors of {n} device(s)", signal.unwrap_or(0));
    Ok("stopped".into())
}

#[derive(Debug, clap::Args)]
pub struct DecommissionArgs {
    /// The device to take out of the fleet.
    pub device_id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `decommission DEVICE_ID`: revokes the device's credential and key (its
/// signed messages are refused from then on, it cannot connect again) and
/// clears its directive. `provision` of the same id later issues new keys.
pub fn decommission(args: &DecommissionArgs) -> anyhow::Result<String> {
    crate::provisioning::validate_device_id(&args.device_id)?;
    let r = args.server.client()?.post_json(&format!("/v1/devices/{}/decommission", args.device_id), &json!({}))?;
    if args.server.json {
        return pretty(&r);
    }
    Ok(if r["already"].as_bool() == Some(true) {
        format!("{} was already decommissioned", args.device_id)
    } else {
        format!(
            "decommissioned {}: its credential and key are revoked, its directive cleared; provision the id again for new ones",
            args.device_id
        )
    })
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
    // The server refuses a loopback or wildcard broker before registering
    // anything unless --force (see `provisioning`).
    let body = json!({
        "device_id": args.device_id, "tags": args.tags, "state_dir": args.state_dir, "listen": args.listen,
        "check_broker": !args.force,
    });
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

/// `check-config --config fleet.toml`: problems on stderr (exit 1),
/// warnings on stderr, the summary on stdout.
pub fn check_config(args: &CheckConfigArgs) -> anyhow::Result<String> {
    let report = crate::config::check_file(&args.config);
    let mut lines: Vec<String> = report.problems.clone();
    lines.extend(report.warnings.iter().map(|w| format!("warning: {w}")));
    match report.summary {
        Some(summary) if report.problems.is_empty() => {
            for l in &lines {
                eprintln!("outpost-fleet: {l}");
            }
            Ok(summary)
        }
        _ => Err(Exit { code: 1, stdout: String::new(), message: lines.join("\n") }.into()),
    }
}

pub fn devices(args: &DevicesArgs) -> anyhow::Result<String> {
    match &args.command {
        Some(DevicesCommand::Show(a)) => device_show(a),
        None => devices_list(args),
    }
}

/// `devices show ID`: the device record and its directive.
fn device_show(a: &DeviceShowArgs) -> anyhow::Result<String> {
    crate::provisioning::validate_device_id(&a.id)?;
    let r = a.server.client()?.get(&format!("/v1/devices/{}", a.id))?;
    if a.server.json {
        return pretty(&r);
    }
    let d = &r["device"];
    let model = match (d["model"].as_str(), d["version"].as_str()) {
        (Some(m), Some(v)) => format!("{m}@{v}{}", if d["committed"] == true { " (committed)" } else { " (on probation)" }),
        _ => "-".into(),
    };
    let mut rows = vec![
        ("device", s(&d["id"])),
        ("tags", d["tags"].as_array().map(|t| t.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default()),
        ("status", d["status"].as_str().unwrap_or("unknown").to_string()),
        ("model", model),
        ("last seen", age(&d["last_seen"])),
        ("last error", s(&d["last_error"])),
        ("provisioned", age(&d["created_at"])),
        ("directive seq", s(&d["directive_sequence"])),
    ];
    if !d["decommissioned_at"].is_null() {
        rows.push(("decommissioned", age(&d["decommissioned_at"])));
    }
    let directive = &r["directive"];
    if !directive.is_null() {
        let desired = match (directive["model"].as_str(), directive["version"].as_str()) {
            (Some(m), Some(v)) => format!("{m}@{v}"),
            _ => directive.to_string(),
        };
        rows.push(("desired", format!("{desired} (sequence {})", s(&directive["sequence"]))));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    Ok(rows.iter().map(|(k, v)| format!("{k:<width$}  {v}")).collect::<Vec<_>>().join("\n"))
}

fn devices_list(filters: &DevicesArgs) -> anyhow::Result<String> {
    let args = &filters.list;
    let mut answer = args.server.client()?.get("/v1/devices")?;
    if let Some(all) = answer["devices"].as_array_mut() {
        all.retain(|d| filters.keeps(d));
    }
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
                        match (d["drift"]["drift"].as_bool(), d["drift"]["flagged"].as_array()) {
                            (Some(true), Some(f)) => format!("DRIFT {}", f.iter().map(s).collect::<Vec<_>>().join(",")),
                            (Some(false), _) => "ok".into(),
                            _ => "-".into(),
                        },
                        s(&d["last_error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let n = rows.len();
    Ok(format!("{}\n{n} device(s)", table(&["DEVICE", "TAGS", "STATUS", "MODEL", "LAST SEEN", "DRIFT", "LAST ERROR"], &rows)))
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

// ----- rollouts and rollback -----

/// What a failed gate does (`--on-failure`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OnFailureArg {
    /// Stop the rollout; the canaries keep the new version.
    Halt,
    /// Stop and send every canary back to the version it had.
    Rollback,
}

fn duration_arg(s: &str) -> Result<String, String> {
    crate::rollout::parse_duration(s).map(|_| s.to_string())
}

fn percent_arg(s: &str) -> Result<u32, String> {
    let n: u32 = s.trim().trim_end_matches('%').parse().map_err(|_| format!("{s:?} is not a percent (1..=100)"))?;
    if !(1..=100).contains(&n) {
        return Err(format!("{n}% is not in 1..=100"));
    }
    Ok(n)
}

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Start a staged canary rollout of NAME@VERSION; prints its id.
    #[command(long_about = ROLLOUT_START_HELP)]
    Start(RolloutStartArgs),
    /// One rollout: state, stage, and per stage its devices and gate values.
    #[command(long_about = "One rollout: state, stage, and per stage its devices and gate values. \
With --watch, prints it again whenever it changes (asking every --interval) until the rollout ends, \
and exits like `rollout wait`.")]
    Status(RolloutStatusArgs),
    /// Wait until the rollout ends; the exit code says how (0 completed, 3 halted, 4 aborted, 5 timeout).
    #[command(after_help = EXIT_CODES_HELP)]
    Wait(RolloutWaitArgs),
    /// Every rollout, newest first.
    List(ListArgs),
    /// Hold the rollout at its current stage (gates keep running: a failing one still halts it).
    Pause(RolloutIdArgs),
    /// Let a paused rollout go on to its next stage.
    Resume(RolloutIdArgs),
    /// Stop the rollout for good; with --on-failure rollback (the default) its canaries go back.
    Abort(RolloutIdArgs),
}

const ROLLOUT_START_HELP: &str = "\
Start a staged canary rollout of NAME@VERSION (a published version).

The targeted devices (every device, or those with one of the --tag tags) are
put in a fixed order: a hash of the device id and the rollout id, dealt out
tag by tag so every tag gets canaries early. Each stage reaches the first
PERCENT % of that order (at least one device, and at least one per tag);
stage k's devices include stage k-1's, so --stages 1,10,50,100 reaches 1 %,
then 10 %, then half, then everyone. Devices of later stages are never sent
the version until their stage starts.

A stage ends when its bake time has passed AND every one of its devices has
either committed the version (passed its probation on the device) or failed.
A device fails if it rolls back by itself, cannot apply the version, or has
not committed it by the silence deadline after it was sent the version (\"silent\"
if nothing was heard from it since). Then the gates run over the telemetry
the stage's devices sent for the new version since the stage started:

  --max-error-rate X   (input errors + failures) / all requests ≤ X. Client
                       errors count: a version that rejects requests its
                       predecessor served is what a canary must catch.
  --max-p99-ms MS      p99 latency of the merged latency sketches ≤ MS.
  --max-drift S        largest drift score a device reports ≤ S (≥ 1 = drift).
  --min-reporting F    share of the stage's devices that sent telemetry ≥ F.
  --max-failed N       failed devices ≤ N (checked continuously: one more
                       halts at once, without waiting for the bake).
  --compare-to-baseline  also compare the stage's devices with the targeted
                       devices still on the previous version over the same
                       window; any metric significantly worse halts.

A failing gate halts the rollout, publishes an alert on outpost/v1/fleet/alerts
and, with --on-failure rollback (the default), sends every canary back to the
version it had (a new signed directive). Durations: 500ms, 30s, 10m, 1h.
One rollout per model at a time. Rollouts survive a server restart.

Example:
  outpost-fleet rollout start bc@1.2.0 --tag pi4 --stages 1,10,50,100 --bake 10m \\
      --max-error-rate 0.02 --max-p99-ms 50 --max-failed 0";

#[derive(Debug, clap::Args)]
pub struct RolloutStartArgs {
    /// NAME@VERSION, a published version.
    pub target: String,
    /// Target only devices with this tag (repeatable: any of them). Default: every device.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Percent of the targeted devices reached by each stage, increasing, e.g. 1,10,50,100.
    #[arg(long, value_delimiter = ',', required = true, value_parser = percent_arg)]
    pub stages: Vec<u32>,
    /// Minimum time each stage runs before its gates are judged (e.g. 30s, 10m, 1h).
    #[arg(long, value_parser = duration_arg)]
    pub bake: String,
    /// Gate: highest share of requests the stage's devices could not answer (0..1, client errors included).
    #[arg(long)]
    pub max_error_rate: Option<f64>,
    /// Gate: highest p99 latency over the stage's devices, in ms.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Gate: highest drift score any stage device reports (≥ 1 means drift).
    #[arg(long)]
    pub max_drift: Option<f64>,
    /// Gate: lowest share of the stage's devices that must send telemetry (0..1).
    #[arg(long, default_value_t = 1.0)]
    pub min_reporting: f64,
    /// Gate: most failed devices tolerated (rolled back by themselves, refused, silent, not committed in time).
    #[arg(long, default_value_t = 0)]
    pub max_failed: u32,
    /// A device that has not committed this long after it was sent the version counts as failed. Default: the bake time + 60s.
    #[arg(long, value_parser = duration_arg)]
    pub silence_deadline: Option<String>,
    /// Gate: compare the stage's devices with those still on the previous version; any significantly worse metric halts.
    #[arg(long)]
    pub compare_to_baseline: bool,
    /// What a failed gate does: halt, or halt and send the canaries back to their previous version.
    #[arg(long, value_enum, default_value = "rollback")]
    pub on_failure: OnFailureArg,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How to follow a rollout until it ends.
#[derive(Debug, Clone, clap::Args)]
pub struct FollowArgs {
    /// Give up after this long (exit 5), e.g. 90s, 30m, 2h.
    #[arg(long, value_parser = duration_arg, default_value = "24h")]
    pub timeout: String,
    /// How often to ask the server.
    #[arg(long, value_parser = duration_arg, default_value = "2s")]
    pub interval: String,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "With --watch: ".to_string() + EXIT_CODES_HELP)]
pub struct RolloutStatusArgs {
    /// The rollout id (printed by `rollout start`, listed by `rollout list`).
    pub id: String,
    /// Print the status whenever it changes until the rollout ends (exit codes below).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RolloutWaitArgs {
    /// The rollout id (printed by `rollout start`, listed by `rollout list`).
    pub id: String,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RolloutIdArgs {
    /// The rollout id (printed by `rollout start`, listed by `rollout list`).
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, clap::Args)]
#[command(long_about = "Send devices back to an older version of a model: each gets a new signed \
directive (a higher sequence, the older model), which it accepts like any update and swaps to \
(no download when its other slot still holds that version). Without --tag or --devices, every \
device that runs NAME (or was told to) is targeted. A live rollout of NAME is aborted first.")]
pub struct RollbackArgs {
    /// The model name.
    pub model: String,
    /// The version to go back to (a published version).
    #[arg(long)]
    pub to: String,
    /// Only devices with this tag (repeatable) that run NAME.
    #[arg(long = "tag", conflicts_with = "devices")]
    pub tags: Vec<String>,
    /// Exactly these devices (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub fn rollout(args: &RolloutArgs) -> anyhow::Result<String> {
    match &args.command {
        RolloutCommand::Start(a) => rollout_start(a),
        RolloutCommand::Status(a) if a.watch => rollout_follow(&a.id, &a.follow, &a.server, true),
        RolloutCommand::Status(a) => rollout_status(&a.id, &a.server),
        RolloutCommand::Wait(a) => rollout_follow(&a.id, &a.follow, &a.server, false),
        RolloutCommand::List(a) => rollout_list(a),
        RolloutCommand::Pause(a) => rollout_command(a, "pause"),
        RolloutCommand::Resume(a) => rollout_command(a, "resume"),
        RolloutCommand::Abort(a) => rollout_command(a, "abort"),
    }
}

fn rollout_start(a: &RolloutStartArgs) -> anyhow::Result<String> {
    let body = json!({
        "target": a.target,
        "tags": a.tags,
        "stages": a.stages,
        "bake": a.bake,
        "max_error_rate": a.max_error_rate,
        "max_p99_ms": a.max_p99_ms,
        "max_drift": a.max_drift,
        "min_reporting": a.min_reporting,
        "max_failed": a.max_failed,
        "silence_deadline": a.silence_deadline,
        "compare_to_baseline": a.compare_to_baseline,
        "on_failure": match a.on_failure { OnFailureArg::Halt => "halt", OnFailureArg::Rollback => "rollback" },
    });
    let r = a.server.client()?.post_json("/v1/rollouts", &body)?;
    if a.server.json {
        return pretty(&r);
    }
    let first = &r["stages"][0];
    eprintln!(
        "started rollout {} of {}: {} device(s); stage 1 ({}%) sent to {}",
        s(&r["id"]),
        s(&r["target"]),
        s(&r["devices"]["total"]),
        s(&first["percent"]),
        s(&first["size"]),
    );
    // Only the id on stdout, so scripts can capture it.
    Ok(s(&r["id"]))
}

/// `error_rate 0.01 ≤ 0.05 ok`
fn gate_line(name: &str, g: &Value) -> String {
    let cmp = if name == "reporting" { "≥" } else { "≤" };
    let value = g["value"].as_f64().map(crate::rollout::gates::fmt).unwrap_or_else(|| "-".into());
    let limit = g["limit"].as_f64().map(crate::rollout::gates::fmt).unwrap_or_else(|| "-".into());
    let verdict = if g["pass"].as_bool().unwrap_or(false) { "ok" } else { "FAIL" };
    format!("{name} {value} {cmp} {limit} {verdict}")
}

fn clock(unix: &Value) -> String {
    let Some(t) = unix.as_u64() else { return "-".into() };
    let day = t % 86_400;
    format!("{:02}:{:02}:{:02}Z", day / 3600, day % 3600 / 60, day % 60)
}

/// The human view of a rollout: a header and a line per stage.
pub fn rollout_text(r: &Value) -> String {
    let stages = r["stages"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "rollout {}  {}  {}  stage {}/{}  (on failure: {})",
        s(&r["id"]),
        s(&r["target"]),
        s(&r["state"]).to_uppercase(),
        r["stage"].as_u64().map(|k| k + 1).unwrap_or(0),
        stages.len(),
        s(&r["on_failure"]),
    );
    if let Some(reason) = r["reason"].as_str() {
        out.push_str(&format!("\nreason: {reason}"));
    }
    let count = |st: &Value, state: &str| {
        st["devices"].as_array().map(|d| d.iter().filter(|d| d["state"] == state).count()).unwrap_or(0).to_string()
    };
    let rows: Vec<Vec<String>> = stages
        .iter()
        .map(|st| {
            let gates: Vec<String> = st["gates"]
                .as_object()
                .map(|g| g.iter().map(|(name, v)| gate_line(name, v)).collect())
                .unwrap_or_default();
            let state = if st["final"] == false && !gates.is_empty() {
                format!("{} (so far)", s(&st["state"]))
            } else {
                s(&st["state"])
            };
            vec![
                st["index"].as_u64().map(|k| (k + 1).to_string()).unwrap_or_default(),
                format!("{}%", s(&st["percent"])),
                s(&st["size"]),
                count(st, "committed"),
                count(st, "failed"),
                count(st, "rolled_back"),
                state,
                clock(&st["started_at"]),
                clock(&st["ended_at"]),
                if gates.is_empty() { "-".into() } else { gates.join(", ") },
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["STAGE", "PERCENT", "DEVICES", "COMMITTED", "FAILED", "ROLLED BACK", "STATE", "STARTED", "ENDED", "GATES"],
        &rows,
    ));
    // Why each failed device failed (from the last reached stage, which holds them all).
    let reached = r["stage"].as_u64().and_then(|k| stages.get(k as usize));
    if let Some(st) = reached {
        for d in st["devices"].as_array().into_iter().flatten().filter(|d| d["state"] == "failed") {
            out.push_str(&format!("\n  {} failed: {}", s(&d["id"]), s(&d["note"])));
        }
    }
    out
}

/// A rollout id as a path segment: refused if it could change the path.
fn rollout_path(id: &str) -> anyhow::Result<String> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) || id.starts_with('.') {
        bail!("rollout id {id:?}: only letters, digits, '-', '_' and '.'");
    }
    Ok(format!("/v1/rollouts/{id}"))
}

fn rollout_status(id: &str, server: &ServerArgs) -> anyhow::Result<String> {
    let r = server.client()?.get(&rollout_path(id)?)?;
    if server.json {
        return pretty(&r);
    }
    Ok(rollout_text(&r))
}

/// Errors worth asking again about: the server is restarting or briefly
/// overloaded (rollouts survive a restart), as opposed to an answer that
/// will not change (an unknown id, a bad token).
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Protocol(_) => true,
        ClientError::Api { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
        ClientError::BadServer(_) | ClientError::File { .. } => false,
    }
}

/// `rollout wait ID` and `rollout status ID --watch`: polls until the
/// rollout ends (module docs for the exit codes). `watch` prints every
/// status that differs from the previous one as it comes; `wait` prints
/// only the last.
fn rollout_follow(id: &str, follow: &FollowArgs, server: &ServerArgs, watch: bool) -> anyhow::Result<String> {
    use std::time::{Duration, Instant};
    let path = rollout_path(id)?;
    let timeout = crate::rollout::parse_duration(&follow.timeout).map_err(anyhow::Error::msg)?;
    let interval = crate::rollout::parse_duration(&follow.interval).map_err(anyhow::Error::msg)?.max(Duration::from_millis(100));
    // One slow answer must not hold the poll past the timeout for long.
    let client = server.client()?.with_read_timeout(interval.max(Duration::from_secs(10)));
    let render = |r: &Value| if server.json { serde_json::to_string(r).unwrap_or_default() } else { rollout_text(r) };
    let deadline = Instant::now() + timeout;
    let mut last_shown = String::new();
    let mut last: Option<Value> = None;
    let mut unreachable_said = false;
    loop {
        match client.get(&path) {
            Ok(r) => {
                unreachable_said = false;
                let text = render(&r);
                if watch && text != last_shown {
                    let mut out = std::io::stdout().lock();
                    if !server.json {
                        let _ = writeln!(out, "--- {}", clock(&json!(outpost_runtime::bundle::unix_now())));
                    }
                    let _ = writeln!(out, "{text}");
                    let _ = out.flush();
                    last_shown = text.clone();
                }
                let state = r["state"].as_str().unwrap_or_default().to_string();
                let reason = r["reason"].as_str().map(|why| format!(": {why}")).unwrap_or_default();
                // What is left to print at the end: the final status, unless --watch just did.
                let stdout = if watch { String::new() } else if server.json { pretty(&r)? } else { text };
                match state.as_str() {
                    "completed" => return Ok(stdout),
                    "halted" => {
                        return Err(Exit { code: EXIT_HALTED, stdout, message: format!("rollout {id} halted{reason}") }.into())
                    }
                    "aborted" => {
                        return Err(Exit { code: EXIT_ABORTED, stdout, message: format!("rollout {id} aborted{reason}") }.into())
                    }
                    "running" | "paused" => {}
                    other => bail!("rollout {id}: the server reports state {other:?}, which this outpost-fleet does not know"),
                }
                last = Some(r);
            }
            Err(e) if transient(&e) => {
                if !unreachable_said {
                    eprintln!("outpost-fleet: {e}; asking again every {}", follow.interval);
                    unreachable_said = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        let now = Instant::now();
        if now >= deadline {
            let state = last.as_ref().and_then(|r| r["state"].as_str()).unwrap_or("unknown (server unreachable)");
            let stdout = match (&last, watch) {
                (Some(r), false) if server.json => pretty(r)?,
                (Some(r), false) => rollout_text(r),
                _ => String::new(),
            };
            return Err(Exit {
                code: EXIT_TIMEOUT,
                stdout,
                message: format!("rollout {id} still {state} after --timeout {}", follow.timeout),
            }
            .into());
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

fn rollout_list(a: &ListArgs) -> anyhow::Result<String> {
    let r = a.server.client()?.get("/v1/rollouts")?;
    if a.server.json {
        return pretty(&r);
    }
    let rows: Vec<Vec<String>> = r["rollouts"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|r| {
                    let stages = r["stages"].as_array().map(Vec::len).unwrap_or(0);
                    vec![
                        s(&r["id"]),
                        s(&r["target"]),
                        s(&r["state"]),
                        format!("{}/{stages}", r["stage"].as_u64().map(|k| k + 1).unwrap_or(0)),
                        format!("{}/{}", s(&r["devices"]["by_state"]["committed"]), s(&r["devices"]["total"])),
                        age(&r["created_at"]),
                        s(&r["reason"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(table(&["ROLLOUT", "TARGET", "STATE", "STAGE", "COMMITTED", "STARTED", "REASON"], &rows))
}

fn rollout_command(a: &RolloutIdArgs, verb: &str) -> anyhow::Result<String> {
    let r = a.server.client()?.post_json(&format!("{}/{verb}", rollout_path(&a.id)?), &json!({}))?;
    if a.server.json {
        return pretty(&r);
    }
    Ok(rollout_text(&r))
}

pub fn rollback(a: &RollbackArgs) -> anyhow::Result<String> {
    let body = json!({"model": a.model, "to": a.to, "tags": a.tags, "devices": a.devices});
    let r = a.server.client()?.post_json("/v1/rollback", &body)?;
    if a.server.json {
        return pretty(&r);
    }
    let mut out = format!("rollback of {} to {}: {} device(s) targeted", a.model, a.to, s(&r["targeted"]));
    if let Some(id) = r["aborted_rollout"].as_str() {
        out.push_str(&format!(" (rollout {id} aborted)"));
    }
    Ok(out)
}
