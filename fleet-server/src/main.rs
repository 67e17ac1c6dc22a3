//! `outpost-fleet`: the fleet server and the operator's command line.
//! A thin binary: every subcommand is a call into the `outpost_fleet` library.
//! Exit codes: 0 done, 1 an error, 2 bad arguments; `rollout wait` and
//! `rollout status --watch` add 3 halted, 4 aborted, 5 timeout (see
//! `outpost_fleet::cli`).

use clap::{Parser, Subcommand};
use outpost_fleet::{bundle_cmd, cli, drift_cmd, keys};

#[derive(Parser)]
#[command(
    name = "outpost-fleet",
    version,
    about = "Sign, publish and roll out ML models to a fleet of devices",
    after_help = "Exit codes: 0 done, 1 an error (one line on stderr), 2 bad arguments; `rollout wait` and \
`rollout status --watch` also 3 halted, 4 aborted, 5 timeout."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make the root and online signing keys (or, with --rotate, a new online key).
    Keygen(keys::KeygenArgs),
    /// Make a signed .outpost bundle from a model file (offline).
    Bundle(bundle_cmd::BundleArgs),
    /// Run the fleet server (API, embedded broker, artifact serving).
    Serve(cli::ServeArgs),
    /// Check a fleet.toml without starting: keys, data_dir, broker; one line per problem.
    #[command(name = "check-config")]
    CheckConfig(cli::CheckConfigArgs),
    /// Register a device and write its ready-to-flash agent config.
    Provision(cli::ProvisionArgs),
    /// List the fleet's devices; `devices show ID` for one.
    Devices(cli::DevicesArgs),
    /// Take a device out of the fleet: revoke its credential and key, clear its directive.
    Decommission(cli::DecommissionArgs),
    /// List published model versions.
    Models(cli::ListArgs),
    /// Upload a model; the server gates it on accuracy, signs and stores it.
    Publish(cli::PublishArgs),
    /// Set devices' desired version directly: NAME@VERSION --devices ID,…
    Deploy(cli::DeployArgs),
    /// Show the audit log of operator actions.
    Audit(cli::AuditArgs),
    /// A version's drift across the fleet: every device's sketches merged and judged against the reference.
    Drift(drift_cmd::DriftArgs),
    /// Staged canary rollouts: start, status, list, pause, resume, abort.
    Rollout(cli::RolloutArgs),
    /// Send devices back to an older version: NAME --to VERSION [--tag T | --devices ID,…]
    Rollback(cli::RollbackArgs),
    /// Simulate N devices (real protocol, one MQTT connection each) to benchmark the server.
    Simulate(outpost_fleet::simulate::SimulateArgs),
}

/// Caps glibc's malloc at two arenas, before the server starts its threads.
///
/// glibc gives each thread that allocates under contention an arena of its
/// own (up to 8 per core) and hands freed memory back to that arena, not
/// to the system or the others. The fleet server's MQTT workers, chunk
/// sender, broker and API threads allocate and free in bursts (a rollout
/// stage sends thousands of chunk replies and states at once), so each
/// arena keeps its high-water mark: in `bench/fleet` at 10,000 devices the
/// server peaked at 278–302 MiB with glibc's default and at 157/156 MiB
/// with two arenas, with the same rollout time and CPU. An operator's own
/// `MALLOC_ARENA_MAX` is left alone.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && !outpost_runtime::server::memory::limit_malloc_arenas(2)
        && cfg!(all(target_os = "linux", target_env = "gnu"))
    {
        log::warn!("mallopt(M_ARENA_MAX, 2) failed; memory may grow under bursts");
    }
}

fn main() {
    // rumqttd logs every connection's tracing spans at ERROR level, so it is
    // off by default (refused logins are logged by our own auth handler);
    // RUST_LOG=info,rumqttd=debug shows it when debugging the broker.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,rumqttd=off,tracing::span=off")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(args) => keys::keygen_command(&args),
        Command::Bundle(args) => bundle_cmd::bundle_command(&args),
        Command::Serve(args) => {
            limit_malloc_arenas();
            cli::serve(&args)
        }
        Command::CheckConfig(args) => cli::check_config(&args),
        Command::Provision(args) => cli::provision(&args),
        Command::Devices(args) => cli::devices(&args),
        Command::Decommission(args) => cli::decommission(&args),
        Command::Models(args) => cli::models(&args),
        Command::Publish(args) => cli::publish(&args),
        Command::Deploy(args) => cli::deploy(&args),
        Command::Audit(args) => cli::audit(&args),
        Command::Drift(args) => drift_cmd::drift(&args),
        Command::Rollout(args) => cli::rollout(&args),
        Command::Rollback(args) => cli::rollback(&args),
        Command::Simulate(args) => outpost_fleet::simulate::simulate_command(&args),
    };
    match result {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
        }
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<cli::Exit>() {
                if !exit.stdout.is_empty() {
                    println!("{}", exit.stdout);
                }
                for line in exit.message.lines() {
                    eprintln!("outpost-fleet: {line}");
                }
                std::process::exit(exit.code);
            }
            // One line with the whole cause chain: what failed and why.
            eprintln!("outpost-fleet: {e:#}");
            std::process::exit(1);
        }
    }
}
