//! `outpost-fleet simulate --devices N`: a fleet of N lightweight devices
//! in one process, to measure a fleet server (and its broker) at scale.
//!
//! ```text
//! outpost-fleet simulate --devices 10000 --server http://127.0.0.1:8700 --token T \
//!     --state-dir /dev/shm/sim --events events.csv --json
//! ```
//!
//! Each simulated device is provisioned through the fleet API like a real
//! one (its `agent.toml`, with its own broker password and ed25519 key, is
//! written to `STATE_DIR/ID/`), is loaded with the agent's own config code,
//! and opens **its own MQTT connection** with the agent's options (client id,
//! clean session, signed retained last will). It then runs the agent's update
//! state machine ([`device`]): verify directives against the pinned root,
//! download and verify bundles chunk by chunk with the agent's downloader,
//! report signed state, telemetry and sketches. Only inference is left out
//! (no model is loaded; probation only waits), so a run measures the fleet
//! server, not the devices.
//!
//! # How it scales in one process
//!
//! The N connections are tasks on a small tokio runtime (`--workers`
//! threads). Their events go to `--workers` device threads; each owns a
//! share of the devices and runs them like the agent's main loop — handle an
//! event, tick that device, and tick all of its devices every 200 ms. So
//! 10,000 devices cost a few threads, not 10,000.
//!
//! Downloads are written and fsynced like on a device: put `--state-dir` on
//! a tmpfs (`/dev/shm`) unless the simulator's own disk is what you measure.
//!
//! # Output
//!
//! A progress line per second on stderr (or a JSON [`Snapshot`] per second
//! on stdout with `--json`), and with `--events FILE` one CSV line
//! `unix_ms,device,event,detail` per connect, accepted directive, commit,
//! rollback and failure — what `bench/fleet/run.sh` times rollout stages
//! with. The run ends after `--duration`, or when every device has
//! committed `--until-committed NAME@VERSION`; without either it runs until
//! killed (the event log is flushed every second).

pub mod device;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_agent::link::LinkEvent;
use outpost_agent::AgentConfig;
use rumqttc::{AsyncClient, Event, EventLoop, Packet};
use serde_json::json;

use crate::client::{ApiClient, ClientError};
use device::SimDevice;
pub use stats::{Snapshot, Stats};

/// How often every device is ticked (the agent's main-loop tick).
const TICK: Duration = Duration::from_millis(200);
/// Requests a device may queue towards its connection (chunk requests,
/// telemetry, state); a full queue is handled like the agent's.
const REQUEST_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("provisioning {device}: {source}")]
    Provision { device: String, source: ClientError },
    #[error("provisioning {0}: the server's answer has no agent_config")]
    NoConfig(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{device}: {source}")]
    Config { device: String, source: outpost_agent::ConfigError },
    #[error("{device}: MQTT options: {source}")]
    Link { device: String, source: outpost_agent::link::LinkError },
    #[error("starting the simulator's threads: {0}")]
    Threads(std::io::Error),
    #[error("--devices must be at least 1")]
    NoDevices,
}

/// What to simulate (the `simulate` flags, minus the server's address).
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub devices: usize,
    /// Device ids are `PREFIX-00000`, `PREFIX-00001`, …
    pub prefix: String,
    pub tags: Vec<String>,
    /// Each device's config and download go to `STATE_DIR/ID/`.
    pub state_dir: PathBuf,
    /// Overrides the broker URL the server writes into agent configs.
    pub broker: Option<String>,
    pub telemetry_interval_secs: u64,
    /// Probation when the directive sets none (the agent's default is 60 s).
    pub probation_secs: u32,
    /// Threads for the MQTT connections, and as many for the devices.
    pub workers: usize,
    /// New connections per second (0: all at once, like a fleet coming back
    /// after an outage).
    pub connect_rate: u32,
    pub provision_threads: usize,
    /// The CSV event log (module docs).
    pub events: Option<PathBuf>,
}

impl SimOptions {
    pub fn device_id(&self, i: usize) -> String {
        format!("{}-{i:05}", self.prefix)
    }
}

/// Provisions the devices through the API (skipping any whose `agent.toml`
/// is already in the state directory, so a run can be repeated against the
/// same server) and returns their config paths, in device order.
pub fn provision(api: &ApiClient, opts: &SimOptions) -> Result<Vec<PathBuf>, SimError> {
    let paths: Vec<PathBuf> = (0..opts.devices).map(|i| opts.state_dir.join(opts.device_id(i)).join("agent.toml")).collect();
    let next = AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<SimError>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..opts.provision_threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.devices || failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                if let Err(e) = provision_one(api, opts, i, &paths[i]) {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(paths),
    }
}

fn provision_one(api: &ApiClient, opts: &SimOptions, i: usize, path: &Path) -> Result<(), SimError> {
    if path.is_file() {
        return Ok(());
    }
    let id = opts.device_id(i);
    let dir = path.parent().unwrap_or(&opts.state_dir);
    std::fs::create_dir_all(dir).map_err(|source| SimError::Io { path: dir.to_path_buf(), source })?;
    let body = json!({"device_id": id, "tags": opts.tags, "state_dir": dir});
    let answer = api.post_json("/v1/devices", &body).map_err(|source| SimError::Provision { device: id.clone(), source })?;
    let text = answer["agent_config"].as_str().ok_or_else(|| SimError::NoConfig(id.clone()))?;
    write_private(path, text).map_err(|source| SimError::Io { path: path.to_path_buf(), source })
}

/// The config holds the device's password and key: mode 0600, as `provision` writes it.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)?.write_all(text.as_bytes())
}

/// Loads each config with the agent's own loader; the simulator's settings
/// come in the way an operator would set them, as `OUTPOST_<KEY>` variables.
pub fn load_configs(paths: &[PathBuf], opts: &SimOptions) -> Result<Vec<AgentConfig>, SimError> {
    let telemetry = opts.telemetry_interval_secs.to_string();
    let probation = opts.probation_secs.to_string();
    let env = |var: &str| match var {
        "OUTPOST_BROKER" => opts.broker.clone(),
        "OUTPOST_TELEMETRY_INTERVAL_SECS" => Some(telemetry.clone()),
        "OUTPOST_PROBATION_SECS" => Some(probation.clone()),
        _ => None,
    };
    paths
        .iter()
        .map(|p| {
            AgentConfig::load(Some(p), env).map_err(|source| SimError::Config { device: p.display().to_string(), source })
        })
        .collect()
}

/// What a device thread receives.
enum Work {
    Link(usize, LinkEvent),
    Stop,
}

/// A running simulated fleet.
pub struct Simulation {
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    senders: Vec<Sender<Work>>,
    workers: Vec<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Simulation {
    /// Starts one connection per config and the device threads.
    pub fn start(configs: Vec<AgentConfig>, opts: &SimOptions) -> Result<Simulation, SimError> {
        if configs.is_empty() {
            return Err(SimError::NoDevices);
        }
        let n = configs.len();
        let events = match &opts.events {
            Some(p) => Some(std::fs::File::create(p).map_err(|source| SimError::Io { path: p.clone(), source })?),
            None => None,
        };
        let stats = Arc::new(Stats::new(n, events));
        let workers = opts.workers.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .thread_name("sim-mqtt")
            .build()
            .map_err(SimError::Threads)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (senders, receivers): (Vec<Sender<Work>>, Vec<Receiver<Work>>) = (0..workers).map(|_| channel()).unzip();
        let mut shards: Vec<Vec<SimDevice>> = (0..workers).map(|_| Vec::with_capacity(n / workers + 1)).collect();
        for (i, config) in configs.into_iter().enumerate() {
            // The agent's signed last will, with a counter from the clock
            // as the simulated device's own (see `device`).
            let will_counter = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1);
            let will = outpost_agent::link::last_will(&config.device_id, will_counter, &config.device_key)
                .map_err(|e| log::warn!("{}: no last will: {e}", config.device_id))
                .ok();
            // Later sessions' wills: signed by the device when a session
            // drops, put into the options before reconnecting, as the agent.
            let next_will = Arc::new(outpost_agent::link::NextWill::default());
            let options = outpost_agent::link::mqtt_options(&config, will)
                .map_err(|source| SimError::Link { device: config.device_id.clone(), source })?;
            let (client, eventloop) = {
                let _guard = runtime.enter();
                AsyncClient::new(options, REQUEST_QUEUE)
            };
            let w = i % workers;
            let local = shards[w].len();
            let delay = if opts.connect_rate > 0 {
                Duration::from_secs_f64(i as f64 / f64::from(opts.connect_rate))
            } else {
                Duration::ZERO
            };
            let link = Connection {
                index: local,
                tx: senders[w].clone(),
                delay,
                reconnect: (config.reconnect_min, config.reconnect_max),
                stop: stop.clone(),
                next_will: next_will.clone(),
            };
            runtime.spawn(link.run(eventloop));
            let first_telemetry = config.telemetry_interval.mul_f64((i as f64 + 0.5) / n as f64);
            shards[w].push(SimDevice::new(config, client, stats.clone(), first_telemetry, next_will));
        }
        let mut handles = Vec::with_capacity(workers);
        for (w, (devices, rx)) in shards.into_iter().zip(receivers).enumerate() {
            let h = std::thread::Builder::new()
                .name(format!("sim-devices-{w}"))
                .spawn(move || run_devices(devices, rx))
                .map_err(SimError::Threads)?;
            handles.push(h);
        }
        Ok(Simulation { stats, stop, senders, workers: handles, runtime: Some(runtime) })
    }

    pub fn snapshot(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// Disconnects every device cleanly and stops.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for s in &self.senders {
            let _ = s.send(Work::Stop);
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        // Give the connections a moment to send their DISCONNECT.
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        self.stats.flush();
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        if self.runtime.is_some() {
            self.shutdown();
        }
    }
}

/// One device's MQTT connection: the agent's link thread as a task.
struct Connection {
    index: usize,
    tx: Sender<Work>,
    delay: Duration,
    reconnect: (Duration, Duration),
    stop: Arc<AtomicBool>,
    next_will: Arc<outpost_agent::link::NextWill>,
}

impl Connection {
    async fn run(self, mut eventloop: EventLoop) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let (min, max) = self.reconnect;
        let mut backoff = min;
        loop {
            let event = eventloop.poll().await;
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let link = match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = min;
                    LinkEvent::Connected
                }
                Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Message { topic: p.topic, payload: p.payload.to_vec() },
                Ok(_) => continue,
                Err(e) => {
                    if self.tx.send(Work::Link(self.index, LinkEvent::Disconnected(e.to_string()))).is_err() {
                        return;
                    }
                    // Jittered exponential backoff, as the agent's link.
                    tokio::time::sleep(outpost_agent::link::jittered(backoff)).await;
                    if let Some(will) = self.next_will.take(Duration::ZERO) {
                        eventloop.mqtt_options.set_last_will(will);
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            if self.tx.send(Work::Link(self.index, link)).is_err() {
                return;
            }
        }
    }
}

/// A device thread: the agent's main loop over a share of the devices.
fn run_devices(mut devices: Vec<SimDevice>, rx: Receiver<Work>) {
    let mut next_tick = Instant::now() + TICK;
    loop {
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(Work::Link(i, event)) => {
                if let Some(d) = devices.get_mut(i) {
                    d.on_link(event);
                    // The agent ticks after every event: chunk requests and
                    // state go out at once, not at the next round.
                    d.tick(Instant::now());
                }
            }
            Ok(Work::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if now >= next_tick {
            for d in &mut devices {
                d.tick(now);
            }
            next_tick = now + TICK;
        }
    }
    for d in &devices {
        d.disconnect();
    }
}

/// `outpost-fleet simulate` flags.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// How many devices to simulate.
    #[arg(long)]
    pub devices: usize,
    /// Device ids are PREFIX-00000, PREFIX-00001, …
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Tags of the simulated devices (repeatable; default: sim).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Where each device's agent.toml and download go (STATE_DIR/ID/).
    /// Configs found there are reused instead of provisioning again.
    /// Default: a new directory under the system temp dir, removed at exit.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Broker URL for the devices, instead of the one the server writes
    /// into agent configs (its public_url).
    #[arg(long)]
    pub broker: Option<String>,
    /// Seconds between a device's telemetry messages.
    #[arg(long, default_value_t = 10)]
    pub telemetry_interval_secs: u64,
    /// Probation, when the directive sets none (a device's default is 60).
    #[arg(long, default_value_t = 5)]
    pub probation_secs: u32,
    /// Threads for connections (and as many for devices); 0: one per core.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// New connections per second; 0: all at once.
    #[arg(long, default_value_t = 0)]
    pub connect_rate: u32,
    /// Parallel provisioning requests.
    #[arg(long, default_value_t = 4)]
    pub provision_threads: usize,
    /// Write one CSV line per device event (unix_ms,device,event,detail).
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Stop once every device has committed NAME@VERSION.
    #[arg(long)]
    pub until_committed: Option<String>,
    #[command(flatten)]
    pub server: crate::cli::ServerArgs,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// One progress line.
fn progress_line(s: &Snapshot, prev: Option<&Snapshot>) -> String {
    let dt = prev.map(|p| (s.elapsed_secs - p.elapsed_secs).max(1e-3)).unwrap_or(1.0);
    let rate = |now: u64, before: Option<u64>| (now - before.unwrap_or(0).min(now)) as f64 / dt;
    let statuses: Vec<String> = s.statuses.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let committed: Vec<String> = s.committed.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!(
        "[{:7.1}s] connected {}/{} | {} | committed: {} | telemetry {:.0}/s | chunks {:.1} MiB/s | sim rss {:.0} MiB",
        s.elapsed_secs,
        s.connected,
        s.devices,
        statuses.join(", "),
        if committed.is_empty() { "-".to_string() } else { committed.join(", ") },
        rate(s.telemetry_sent, prev.map(|p| p.telemetry_sent)),
        mib(rate(s.chunk_bytes_received, prev.map(|p| p.chunk_bytes_received)) as u64),
        mib(s.rss_bytes.unwrap_or(0)),
    )
}

/// `simulate`: provision, connect, run until the end condition, summarise.
pub fn simulate_command(args: &SimulateArgs) -> anyhow::Result<String> {
    use anyhow::Context;
    if args.devices == 0 {
        return Err(SimError::NoDevices.into());
    }
    let (state_dir, temporary) = match &args.state_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("outpost-sim-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&state_dir).with_context(|| format!("--state-dir {}", state_dir.display()))?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let opts = SimOptions {
        devices: args.devices,
        prefix: args.prefix.clone(),
        tags: if args.tags.is_empty() { vec!["sim".into()] } else { args.tags.clone() },
        state_dir: state_dir.clone(),
        broker: args.broker.clone(),
        telemetry_interval_secs: args.telemetry_interval_secs,
        probation_secs: args.probation_secs,
        workers: if args.workers == 0 { cores } else { args.workers },
        connect_rate: args.connect_rate,
        provision_threads: args.provision_threads,
        events: args.events.clone(),
    };
    let result = run(args, &opts);
    if temporary {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    result
}

fn run(args: &SimulateArgs, opts: &SimOptions) -> anyhow::Result<String> {
    let api = ApiClient::new(&args.server.server, &args.server.token)?;
    let t = Instant::now();
    let paths = provision(&api, opts)?;
    let configs = load_configs(&paths, opts)?;
    eprintln!("provisioned {} devices in {:.1}s; connecting", configs.len(), t.elapsed().as_secs_f64());
    let sim = Simulation::start(configs, opts)?;
    let mut prev: Option<Snapshot> = None;
    let deadline = args.duration_secs.map(|s| Instant::now() + Duration::from_secs(s));
    let last = loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = sim.snapshot();
        if args.server.json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            eprintln!("{}", progress_line(&s, prev.as_ref()));
        }
        // The event log is flushed every second, so a run ended by a signal
        // leaves it complete up to that second.
        sim.stats.flush();
        let done = deadline.is_some_and(|d| Instant::now() >= d)
            || args
                .until_committed
                .as_ref()
                .is_some_and(|v| s.committed.get(v).copied().unwrap_or(0) >= opts.devices as u64);
        prev = Some(s.clone());
        if done {
            break s;
        }
    };
    sim.stop();
    if args.server.json {
        return Ok(serde_json::to_string(&json!({"summary": last}))?);
    }
    Ok(format!(
        "{} devices for {:.0}s: all connected after {}; {} states, {} telemetry, {} sketches, {} chunk requests sent; {:.1} MiB of bundles verified; simulator CPU {:.1}s, RSS {:.0} MiB",
        last.devices,
        last.elapsed_secs,
        last.all_connected_after_secs.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "never".into()),
        last.states_sent,
        last.telemetry_sent,
        last.sketches_sent,
        last.chunk_requests_sent,
        mib(last.chunk_bytes_received),
        last.cpu_secs.unwrap_or(0.0),
        mib(last.rss_bytes.unwrap_or(0)),
    ))
}
