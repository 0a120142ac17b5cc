//! The `usersync` binary: CLI parsing, tracing setup and exit codes only.
//!
//! Exit codes: 0 clean stop; 78 (EX_CONFIG) invalid configuration; 1 any
//! other fatal error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const EX_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "usersync",
    version,
    about = "Keeps the users of Suprema BioStar devices in sync through a G-SDK device gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (what systemd starts).
    Run {
        /// The configuration file.
        #[arg(long, default_value = "/etc/usersync/usersync.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file: exit 0 if valid, 78 if not.
    CheckConfig {
        /// The configuration file.
        #[arg(default_value = "/etc/usersync/usersync.toml")]
        path: PathBuf,
    },
    /// Run a simulated G-SDK device gateway (for tests and demos).
    Sim(usersync::sim::cli::SimArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { path } => match usersync::config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: valid ({} devices, {} groups)",
                    path.display(),
                    c.devices.len(),
                    c.groups.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("usersync: invalid configuration: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run { config } => {
            let config = match usersync::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("usersync: invalid configuration: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            init_tracing();
            block_on(async move {
                let signals = usersync::Shutdown::default();
                spawn_signal_handler(signals.clone())?;
                usersync::run(config, signals).await?;
                Ok(())
            })
        }
        Command::Sim(args) => {
            init_tracing();
            block_on(async move { Ok(usersync::sim::cli::run(args).await?) })
        }
    }
}

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usersync: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usersync: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// First SIGTERM/SIGINT: orderly shutdown. Second: abandon in-flight work.
fn spawn_signal_handler(signals: usersync::Shutdown) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for stage in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if stage == 0 {
                tracing::info!("signal received: shutting down");
                signals.shutdown.cancel();
            } else {
                signals.abandon.cancel();
            }
        }
    });
    Ok(())
}
