//! `outpost-agent run --config agent.toml`: see the library docs.

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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = AgentConfig::load(config.as_deref(), |k| std::env::var(k).ok())?;
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
