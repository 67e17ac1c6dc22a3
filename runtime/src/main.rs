//! `outpost-runtime`: the standalone device model server and its tools.
//! A thin binary: every subcommand is a call into the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "outpost-runtime", version, about = "Run ONNX and TFLite models on a device and serve a local predict API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over HTTP (seed-style /predict, Open Inference Protocol v2, /metrics).
    Serve(cli::ServeArgs),
    /// Predict every row of a CSV or JSON Lines file, streaming, in input order.
    Batch(cli::BatchArgs),
    /// Verify a signed .outpost bundle against the pinned root key.
    Verify(outpost_runtime::bundle::cli::VerifyArgs),
    /// Show a bundle's manifest and certificates as JSON (nothing is verified).
    Inspect(outpost_runtime::bundle::cli::InspectArgs),
    /// Time inference on random inputs: min/median/p99 per call, op-by-op profile on request.
    Bench(cli::BenchArgs),
}

mod cli;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => cli::serve(args),
        Command::Batch(args) => cli::batch(args),
        Command::Verify(args) => outpost_runtime::bundle::cli::verify(&args).map(|out| println!("{out}")),
        Command::Inspect(args) => outpost_runtime::bundle::cli::inspect(&args).map(|out| println!("{out}")),
        Command::Bench(args) => cli::bench(args),
    };
    if let Err(e) = result {
        // One line with the whole cause chain: what failed and why.
        eprintln!("outpost-runtime: {e:#}");
        std::process::exit(1);
    }
}
