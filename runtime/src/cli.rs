//! Argument types and entry points of the `outpost-runtime` subcommands.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model file: .onnx, .tflite, or a signed .outpost bundle (with --trust).
    #[arg(long)]
    pub model: PathBuf,
    /// Root public key to verify a signed .outpost bundle against.
    #[arg(long)]
    pub trust: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Worker threads that take requests and run the model (default: number
    /// of cores, plus one with dynamic batching on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest request body in bytes; larger ones are answered 413 unread.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body: usize,
    /// Requests waiting for a worker before new ones are shed with 503 + Retry-After.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Dynamic batching window in microseconds: how long the first request
    /// of a batch waits for others (0 = off).
    #[arg(long, default_value_t = 0)]
    pub batch_window_us: u64,
    /// Most samples one batched run takes.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Seconds a client may stall mid-request (or idle on a keep-alive connection).
    #[arg(long, default_value_t = 30)]
    pub io_timeout_secs: u64,
    /// Microseconds a worker keeps polling for the next request before it
    /// sleeps (yielding its core to anything else runnable): cuts the
    /// wake-up from each request's latency at the cost of up to that much
    /// CPU after the last one (0 = off, for battery devices).
    #[arg(long, default_value_t = 200)]
    pub idle_spin_us: u64,
    /// Streaming over MQTT beside HTTP (`--mqtt URL --mqtt-in FILTER`).
    #[cfg(feature = "mqtt")]
    #[command(flatten)]
    pub stream: outpost_runtime::stream::mqtt::MqttArgs,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use outpost_runtime::server::{ModelSlot, Server, ServerConfig};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let started = Instant::now();
    let config = ServerConfig {
        listen: args.listen.clone(),
        threads: args.threads.unwrap_or(0),
        max_body_bytes: args.max_body,
        queue_capacity: args.queue,
        batch_window: Duration::from_micros(args.batch_window_us),
        max_batch: args.max_batch,
        io_timeout: Duration::from_secs(args.io_timeout_secs),
        idle_spin: Duration::from_micros(args.idle_spin_us),
        ..ServerConfig::default()
    };
    // Before any thread exists: an arena for each thread that allocates per
    // request (workers, the overflow dispatcher, main), and no more.
    outpost_runtime::server::memory::limit_malloc_arenas(config.worker_threads() + 2);
    let deployed = load_for_serving(&args)?;
    let info = deployed.info().clone();
    let slot = Arc::new(ModelSlot::with(deployed));
    // The stream predicts from the same slot as HTTP, and its counters show
    // on the same /metrics.
    #[cfg(feature = "mqtt")]
    let stream = args.stream.start(slot.clone()).context("starting the MQTT stream")?;
    #[cfg(feature = "mqtt")]
    let extra: Vec<Box<dyn prometheus_client::collector::Collector>> =
        stream.iter().map(|s| Box::new(s.stats().collector()) as Box<dyn prometheus_client::collector::Collector>).collect();
    #[cfg(not(feature = "mqtt"))]
    let extra = Vec::new();
    let server = Server::start_with_metrics(config, slot, extra).with_context(|| format!("serving on {}", args.listen))?;
    #[cfg(feature = "mqtt")]
    if let (Some(_), Some(url)) = (&stream, &args.stream.mqtt) {
        log::info!("predicting over MQTT too: {} on {}", args.stream.mqtt_in.join(", "), redact_url(url));
    }
    log::info!(
        "serving {} {} (sha256 {}) on http://{}, ready {:.1} ms after start",
        info.name,
        info.version,
        &info.sha256[..12],
        server.local_addr(),
        started.elapsed().as_secs_f64() * 1e3
    );
    // Loading touched megabytes of code that serving never runs again, and
    // left free pages in the heap.
    match outpost_runtime::server::memory::release_startup_memory() {
        Ok(bytes) => log::debug!("released {} KiB of start-up code from resident memory", bytes / 1024),
        Err(e) => log::debug!("could not release start-up code: {e}"),
    }
    server.wait();
    #[cfg(feature = "mqtt")]
    if let Some(s) = stream {
        s.shutdown();
    }
    Ok(())
}

/// The URL without its password, for logs.
#[cfg(feature = "mqtt")]
fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => match rest.split_once('@') {
            Some((user, host)) => format!("{scheme}://{}@{host}", user.split(':').next().unwrap_or("")),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// Loads the model to serve: a plain model file as it is, a signed bundle
/// only after verifying it (signature, certificate, expiry, digest, the
/// model's signature against the manifest, the self-test). The standalone
/// server keeps no record of what it accepted before, so it cannot refuse a
/// replayed older bundle; the agent, which does, checks that too.
fn load_for_serving(args: &ServeArgs) -> anyhow::Result<outpost_runtime::server::Deployed> {
    use outpost_runtime::bundle::{open_verified, Freshness, TrustRoot, VerifyOptions};
    use outpost_runtime::drift::{DriftMonitor, MonitorConfig};
    use outpost_runtime::server::{Deployed, ModelInfo};
    use std::sync::Arc;

    let path = &args.model;
    let is_bundle = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("outpost"));
    if !is_bundle {
        if args.trust.is_some() {
            anyhow::bail!("--trust verifies signed .outpost bundles; {} is a plain model file", path.display());
        }
        return Deployed::load_file(path, &Default::default()).with_context(|| format!("loading {}", path.display()));
    }
    let Some(trust) = &args.trust else {
        anyhow::bail!("{} is a signed bundle: pass --trust ROOT.pub to verify it", path.display());
    };
    let root = TrustRoot::read_file(trust).with_context(|| format!("reading trust root {}", trust.display()))?;
    let verified = open_verified(path, &root, &VerifyOptions::new(Freshness::NothingAcceptedYet), &Default::default())
        .with_context(|| format!("opening {}", path.display()))?;
    let manifest = &verified.header.value;
    let info = ModelInfo {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.model_sha256.to_hex(),
        format: manifest.model_format.into(),
        size_bytes: manifest.model_size,
        signer: Some(verified.header.signer.to_string()),
    };
    let reference = Arc::new(manifest.reference.clone());
    let deployed = Deployed::new(verified.model, info);
    // The reference travels signed with the model; one that does not fit
    // its own model means a broken bundle, so refuse it like one.
    match DriftMonitor::new(reference, MonitorConfig::default()) {
        Ok(monitor) => match deployed.with_drift(Arc::new(monitor)) {
            Ok(d) => Ok(d),
            Err(e) => anyhow::bail!("the bundle's drift reference does not fit its model: {e}"),
        },
        Err(e) => anyhow::bail!("the bundle's drift reference is unusable: {e}"),
    }
}

/// `outpost-runtime batch`: see [`outpost_runtime::batch`].
#[derive(clap::Args)]
pub struct BatchArgs {
    /// Model file: .onnx, .tflite, or a signed .outpost bundle (with --trust).
    #[arg(long)]
    pub model: PathBuf,
    /// Root public key to verify a signed .outpost bundle against.
    #[arg(long)]
    pub trust: Option<PathBuf>,
    /// Rows to predict: CSV (header optional) or JSON Lines (.jsonl, .ndjson); `-` reads stdin.
    #[arg(long)]
    pub input: PathBuf,
    /// Where predictions go, one row per good input row in input order:
    /// CSV, or JSON Lines by extension; `-` writes stdout. Written as
    /// OUTPUT.partial and renamed when complete.
    #[arg(long)]
    pub output: PathBuf,
    /// Rows per model run.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// Worker threads (default: number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The last column (or the JSON "label" field) is the true label: report accuracy.
    #[arg(long)]
    pub label_column: bool,
    /// Bad rows, as `line,reason` (default: OUTPUT.errors).
    #[arg(long)]
    pub errors: Option<PathBuf>,
    /// Input format, when the extension does not say it.
    #[arg(long, value_enum)]
    pub input_format: Option<BatchFormat>,
    /// Output format, when the extension does not say it.
    #[arg(long, value_enum)]
    pub output_format: Option<BatchFormat>,
    /// Write every model output, flattened, instead of prediction and probability.
    #[arg(long)]
    pub all_outputs: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BatchFormat {
    Csv,
    Jsonl,
}

pub fn batch(args: BatchArgs) -> anyhow::Result<()> {
    use outpost_runtime::batch::{run_files, BatchOptions, InputFormat, OutputFormat};

    if args.json && args.output == std::path::Path::new("-") {
        anyhow::bail!("--json prints the summary on stdout, where --output - already writes the predictions");
    }
    let model = load_for_batch(&args.model, args.trust.as_deref())?;
    let mut options = BatchOptions::for_files(&args.input, &args.output);
    if let Some(f) = args.input_format {
        options.input_format = match f {
            BatchFormat::Csv => InputFormat::Csv,
            BatchFormat::Jsonl => InputFormat::JsonLines,
        };
    }
    // Writing to stdout, the output follows the input's format unless told.
    options.output_format = match (args.output_format, args.output == std::path::Path::new("-")) {
        (Some(BatchFormat::Csv), _) => OutputFormat::Csv,
        (Some(BatchFormat::Jsonl), _) => OutputFormat::JsonLines,
        (None, true) if options.input_format == InputFormat::JsonLines => OutputFormat::JsonLines,
        (None, _) => options.output_format,
    };
    options.batch_size = args.batch_size;
    options.threads = args.threads.unwrap_or(0);
    options.label_column = args.label_column;
    options.all_outputs = args.all_outputs;
    let summary = run_files(&model, &args.input, &args.output, args.errors.as_deref(), &options)
        .with_context(|| format!("batch {} → {}", args.input.display(), args.output.display()))?;
    eprintln!("{summary}");
    if summary.rows_bad > 0 {
        let errors = args.errors.clone().unwrap_or_else(|| {
            if args.output == std::path::Path::new("-") {
                PathBuf::from("batch.errors")
            } else {
                PathBuf::from(format!("{}.errors", args.output.display()))
            }
        });
        eprintln!("{} bad rows: see {}", summary.rows_bad, errors.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// A plain model file as it is; a signed bundle only after verification
/// (as `serve` does), keeping just the model.
fn load_for_batch(path: &std::path::Path, trust: Option<&std::path::Path>) -> anyhow::Result<outpost_runtime::model::Model> {
    use outpost_runtime::bundle::{open_verified, Freshness, TrustRoot, VerifyOptions};
    use outpost_runtime::model::Model;

    let is_bundle = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("outpost"));
    if !is_bundle {
        if trust.is_some() {
            anyhow::bail!("--trust verifies signed .outpost bundles; {} is a plain model file", path.display());
        }
        return Model::load(path, &Default::default()).with_context(|| format!("loading {}", path.display()));
    }
    let Some(trust) = trust else {
        anyhow::bail!("{} is a signed bundle: pass --trust ROOT.pub to verify it", path.display());
    };
    let root = TrustRoot::read_file(trust).with_context(|| format!("reading trust root {}", trust.display()))?;
    let verified = open_verified(path, &root, &VerifyOptions::new(Freshness::NothingAcceptedYet), &Default::default())
        .with_context(|| format!("opening {}", path.display()))?;
    log::info!("verified bundle {} (signed by {})", verified.header.value.id(), verified.header.signer);
    Ok(verified.model)
}
