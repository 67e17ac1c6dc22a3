//! `outpost-agent run --config agent.toml`: see the library docs.
//! `outpost-agent check-config --config agent.toml`: the same checks `run`
//! makes at start, every problem on its own line, without starting.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_agent::{Agent, AgentConfig};

#[derive(Parser)]
#[command(name = "outpost-agent", version, about = "Outpost device agent: serves predictions locally and keeps the model current from the fleet over MQTT.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent. Every config key can also come from OUTPOST_<KEY>.
    Run {
        /// The agent.toml file (optional when everything comes from the environment).
        #[arg(long, env = "OUTPOST_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a config without starting: one line per problem, naming the key.
    ///
    /// Refuses what `run` refuses at start: a key of the wrong shape, and
    /// values that parse but cannot work on a device (all-zero or placeholder
    /// keys, `change-me` passwords, a broker URL without a host, with port 0,
    /// a wildcard or example.com host). Exit codes: 0 the config is usable
    /// (a short summary on stdout), 1 it has problems (one line each on
    /// stderr), 2 bad arguments.
    #[command(name = "check-config")]
    CheckConfig {
        /// The agent.toml file (OUTPOST_<KEY> variables apply on top, as for `run`).
        #[arg(long, env = "OUTPOST_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line, the cause chain joined: what a person reads in journalctl.
        eprintln!("outpost-agent: {e:#}");
        std::process::exit(2);
    }
}

/// Every problem of the config, one line each (the same for `run` and
/// `check-config`), or the checked config.
fn load_or_report(path: Option<&std::path::Path>) -> Result<AgentConfig, i32> {
    AgentConfig::load_all(path, |k| std::env::var(k).ok()).map_err(|problems| {
        let name = path.map(|p| p.display().to_string()).unwrap_or_else(|| "environment".into());
        for p in &problems {
            eprintln!("outpost-agent: {name}: {p}");
        }
        problems.len() as i32
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            let Ok(c) = load_or_report(config.as_deref()) else { std::process::exit(1) };
            let scheme = if c.broker.tls { "mqtts" } else { "mqtt" };
            println!(
                "{}: OK: device {} (tags {}), broker {scheme}://{}:{} as {}, root key {}, device key {}, state_dir {}, listen {}",
                config.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "environment".into()),
                c.device_id,
                if c.tags.is_empty() { "-".to_string() } else { c.tags.join(",") },
                c.broker.host,
                c.broker.port,
                c.username.as_deref().unwrap_or("(anonymous)"),
                c.trust_root.key_id(),
                c.device_key.key_id(),
                c.state_dir.display(),
                c.listen,
            );
            Ok(())
        }
        Command::Run { config } => {
            // Refuse at start, naming each key: a config that cannot work
            // would otherwise retry the broker forever.
            let Ok(config) = load_or_report(config.as_deref()) else { std::process::exit(2) };
            let (agent, stop) = Agent::start(config).context("starting")?;
            // State on disk is crash-safe at every step, so a SIGKILL or a
            // power cut loses nothing. SIGTERM (systemd's stop) and SIGINT
            // get a clean stop on top: requests already taken are answered,
            // and the device says "offline" itself (a clean disconnect
            // suppresses the broker's last will). A second signal exits at once.
            let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
                .context("installing the SIGTERM handler")?;
            std::thread::Builder::new()
                .name("outpost-signals".into())
                .spawn(move || {
                    let mut seen = signals.forever();
                    if let Some(sig) = seen.next() {
                        log::info!("signal {sig}: stopping");
                        let _ = stop.send(outpost_agent::agent::Input::Stop);
                    }
                    if seen.next().is_some() {
                        std::process::exit(1);
                    }
                })
                .context("starting the signal thread")?;
            agent.run();
            Ok(())
        }
    }
}
