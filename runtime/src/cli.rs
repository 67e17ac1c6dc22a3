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
    /// Replace input NAME by a constant before the model is optimized, so
    /// control flow on it folds (repeatable). VALUE: a number, a boolean, or
    /// a JSON array matching the input's shape. The input leaves the served
    /// signature.
    #[arg(long = "fix", value_name = "NAME=VALUE")]
    pub fix: Vec<String>,
    /// Give input NAME these dimensions instead of the model's own, e.g. a
    /// detector exported with free height and width: images=1,3,320,320
    /// (repeatable).
    #[arg(long = "shape", value_name = "NAME=D0,D1,...")]
    pub shape: Vec<String>,
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

/// The library's load options from `--fix` and `--shape`. Parsed here rather
/// than by clap so that a malformed value is a one-line error like any other.
fn load_options(args: &ServeArgs) -> anyhow::Result<outpost_runtime::model::LoadOptions> {
    use outpost_runtime::model::{FixedInput, InputShape, LoadOptions};

    let fixed_inputs = args
        .fix
        .iter()
        .map(|text| text.parse::<FixedInput>().with_context(|| format!("--fix {text}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let input_shapes = args
        .shape
        .iter()
        .map(|text| text.parse::<InputShape>().with_context(|| format!("--shape {text}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(LoadOptions { fixed_inputs, input_shapes, ..LoadOptions::default() })
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
        let options = load_options(args)?;
        return Deployed::load_file(path, &options).with_context(|| format!("loading {}", path.display()));
    }
    // A signed bundle is loaded as it was tested before signing: fixed
    // inputs and shapes belong in its manifest, not on a command line.
    if !args.fix.is_empty() || !args.shape.is_empty() {
        anyhow::bail!("--fix and --shape apply to plain model files; {} is a signed bundle, loaded as it was signed", path.display());
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

/// `outpost-runtime bench`: see [`outpost_runtime::bench`].
#[derive(clap::Args)]
#[command(after_help = "\
One timed call is one inference as `serve` runs it for a request (inputs in, \
outputs out) at --batch rows, on seeded random inputs of the model's own \
shapes and types (floats in [0,1), int8/uint8 over their range, wider \
integers in [0,10)). A model whose batch is fixed at 1 in the file runs the \
N rows one after another inside each timed call, as `serve` does; a model \
whose first dimension is fixed above 1 only takes --batch 1.

tract runs each call on one core: --threads N runs N workers calling the \
model at once, as `serve --threads N` does, and reports the latency per call \
under that contention; --threads 1 compares with LiteRT's \
`benchmark_model --num_threads=1`.")]
pub struct BenchArgs {
    /// Model file: .onnx, .tflite, or a signed .outpost bundle (with --trust).
    #[arg(long)]
    pub model: PathBuf,
    /// Root public key to verify a signed .outpost bundle against (as `serve`).
    #[arg(long)]
    pub trust: Option<PathBuf>,
    /// Rows per call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Workers calling the model at once (each call runs on one core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Timed calls per worker.
    #[arg(long, default_value_t = 100)]
    pub iterations: u64,
    /// Untimed calls per worker before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Seed of the random inputs (same seed, same inputs).
    #[arg(long, default_value_t = outpost_runtime::bench::BenchOptions::default().seed)]
    pub seed: u64,
    /// Print one JSON object on stdout:
    /// {"model","batch","threads","iterations","min_us","median_us","p99_us"}.
    #[arg(long)]
    pub json: bool,
    /// Also time every node of the plan and print the op-by-op profile
    /// (on stderr with --json, so stdout stays one object).
    #[arg(long)]
    pub profile: bool,
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use clap::FromArgMatches;
    use outpost_runtime::bench::{format_profile, random_inputs, BenchOptions, Report};

    let options = BenchOptions {
        batch: args.batch,
        threads: args.threads,
        iterations: args.iterations,
        warmup: args.warmup,
        seed: args.seed,
    };
    options.check().context("bench options")?;
    // Loaded by serve's own loader, with serve's defaults for everything but
    // the model and the trust root: what is timed is what serve would run
    // (same verification of a bundle, same load options), with no second
    // copy of that code to drift apart from it.
    let mut serve_argv: Vec<std::ffi::OsString> = vec!["serve".into(), "--model".into(), args.model.clone().into()];
    if let Some(trust) = &args.trust {
        serve_argv.extend(["--trust".into(), trust.clone().into()]);
    }
    let matches = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"))
        .try_get_matches_from(serve_argv)
        .context("bench cannot hand its model to the serve loader")?;
    let serve_args = ServeArgs::from_arg_matches(&matches).context("bench cannot hand its model to the serve loader")?;
    let deployed = load_for_serving(&serve_args)?;
    let info = deployed.info();
    let label = if info.signer.is_some() {
        format!("{}@{}", info.name, info.version)
    } else {
        args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| info.name.clone())
    };
    let model = deployed.model();
    if args.batch > 1 && !model.runs_batches_natively() {
        log::info!("{label}: batch fixed in the model, each call runs its {} rows one after another", args.batch);
    }
    let summary = outpost_runtime::bench::run(model, &options).with_context(|| format!("benchmarking {label}"))?;
    let report = Report::new(label.clone(), &options, summary);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    if args.profile {
        let inputs = random_inputs(model.signature(), args.batch, args.seed)?;
        let profile = model.profile(inputs, args.iterations).with_context(|| format!("profiling {label}"))?;
        if args.json {
            eprint!("{}", format_profile(&profile));
        } else {
            print!("\n{}", format_profile(&profile));
        }
    }
    Ok(())
}
