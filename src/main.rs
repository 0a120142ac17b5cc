//! The `usersync` binary: CLI parsing, logging setup, signals and exit
//! codes only.
//!
//! Exit codes: 0 success / clean stop; 78 (EX_CONFIG) invalid
//! configuration; 1 any other failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use usersync::cli;
use usersync::logging::{LogFormat, LogTarget};

const EX_CONFIG: u8 = 78;
const DEFAULT_CONFIG: &str = "/etc/usersync/usersync.toml";

#[derive(Debug, Parser)]
#[command(
    name = "usersync",
    version,
    about = "Keeps the users of Suprema BioStar devices in sync through a G-SDK device gateway",
    after_help = "Exit codes: 0 success, 78 invalid configuration, 1 other errors."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (what systemd starts). SIGHUP
    /// reloads the configuration; SIGTERM stops it.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Where logs go.
        #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
        log_target: LogTarget,
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show devices, checkpoints, targets, pending and quarantined users
    /// (reads the state database; works with the daemon running or stopped).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Read a device's event log through the gateway.
    Events {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        device: u32,
        /// First event ID to show (default: the last --limit events).
        #[arg(long)]
        since: Option<u32>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// List a device's users, or show one (counts and sizes, never
    /// templates, PINs or photos).
    Users {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        device: u32,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Wait for a card on a device and enroll a user with it.
    Enroll {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        device: u32,
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: Option<String>,
        /// Read the credential from a card presented at the device (the
        /// only enrollment this command offers).
        #[arg(long, required = true)]
        card: bool,
        /// Replace a user with the same ID instead of failing.
        #[arg(long)]
        overwrite: bool,
    },
    /// Delete a user from a device.
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        device: u32,
        #[arg(long)]
        user: String,
    },
    /// Reconcile targets with their sources: through the running daemon, or
    /// here when it is stopped.
    Reconcile {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete users the sources do not have.
        #[arg(long)]
        prune: bool,
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file: exit 0 if valid, 78 if not.
    CheckConfig {
        /// The configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        path: PathBuf,
    },
    /// Convert the sync_config.json of Suprema's sync example and seed the
    /// checkpoints from its last_event_id values.
    ImportConfig {
        /// The example's sync_config.json.
        json: PathBuf,
        /// Where to write the TOML configuration (must not exist).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        output: PathBuf,
        /// The gateway, host:port (the example keeps it in its code).
        #[arg(long)]
        gateway: String,
        /// The gateway's CA certificate.
        #[arg(long, default_value = "ca.crt")]
        ca_file: String,
        #[arg(long, default_value = "/var/lib/usersync")]
        state_dir: String,
        #[arg(long, default_value = "v1.8")]
        api: usersync::wire::Api,
    },
    /// Run the simulator and the daemon together with a scripted scene.
    Demo,
    /// Run a simulated G-SDK device gateway (for tests and demos).
    Sim(usersync::sim::cli::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every command may hold user records (templates, PINs) in memory;
    // none may leave them in a core file.
    if let Err(e) = usersync::service::forbid_core_dumps() {
        eprintln!("usersync: cannot make the process non-dumpable, refusing to run: {e}");
        return ExitCode::from(1);
    }
    match cli.command {
        Command::CheckConfig { path } => {
            let c = match runnable_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            for w in usersync::config::warnings(&c) {
                eprintln!("warning: {w}");
            }
            if let Some(note) = usersync::config::sandbox_note(&c) {
                eprintln!("note: {note}");
            }
            println!(
                "{}: valid ({} devices, {} groups)",
                path.display(),
                c.devices.len(),
                c.groups.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run {
            config,
            log_target,
            log_format,
        } => {
            let path = config.config;
            let config = match runnable_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let note = usersync::logging::init(log_target, log_format);
            block_on(async move {
                if let Some(note) = note {
                    tracing::warn!("{note}");
                }
                for w in usersync::config::warnings(&config) {
                    tracing::warn!("{w}");
                }
                let signals = usersync::Shutdown::default();
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                spawn_signal_handler(signals.clone(), reload_tx, path)?;
                let health = std::sync::Arc::new(usersync::service::Health::default());
                usersync::supervisor::run_with(config, signals, Some(reload_rx), health).await?;
                Ok(())
            })
        }
        Command::Sim(args) => {
            usersync::logging::init(LogTarget::Stderr, LogFormat::Text);
            block_on(async move { Ok(usersync::sim::cli::run(args).await?) })
        }
        Command::Demo => {
            std::env::var("RUST_LOG").is_err().then(|| {
                // The narration is the output; keep the daemon's own lines
                // to warnings.
                tracing_subscriber::fmt()
                    .with_env_filter("warn")
                    .with_writer(std::io::stderr)
                    .init()
            });
            block_on(async { Ok(usersync::demo::run().await?) })
        }
        Command::ImportConfig {
            json,
            output,
            gateway,
            ca_file,
            state_dir,
            api,
        } => {
            let target = cli::ImportTarget {
                gateway,
                ca_file,
                state_dir,
                api,
            };
            report(cli::import_config(&json, &output, &target))
        }
        Command::Status { config, json } => with_config(&config.config, |c| async move {
            let s = cli::status(&c)?;
            Ok(if json {
                cli::json(&s)
            } else {
                cli::render_status(&s)
            })
        }),
        Command::Events {
            config,
            device,
            since,
            limit,
            json,
        } => with_config(&config.config, |c| async move {
            let lines = cli::events(&c, device, since, limit).await?;
            Ok(if json {
                cli::json(&lines)
            } else {
                cli::render_events(&lines)
            })
        }),
        Command::Users {
            config,
            device,
            user,
            json,
        } => with_config(&config.config, |c| async move {
            let o = cli::users(&c, device, user).await?;
            Ok(if json {
                cli::json(&o)
            } else {
                cli::render_users(&o)
            })
        }),
        Command::Enroll {
            config,
            device,
            user,
            name,
            card: _,
            overwrite,
        } => with_config(&config.config, |c| async move {
            cli::enroll_card(&c, device, &user, name.as_deref(), overwrite).await
        }),
        Command::Delete {
            config,
            device,
            user,
        } => with_config(&config.config, |c| async move {
            cli::delete(&c, device, &user).await
        }),
        Command::Reconcile {
            config,
            group,
            dry_run,
            prune,
            json,
        } => with_config(&config.config, |c| async move {
            if dry_run {
                let plan = cli::reconcile_plan(&c, group.as_deref(), prune).await?;
                Ok(if json {
                    cli::json(&plan)
                } else {
                    cli::render_plan(&plan)
                })
            } else {
                cli::reconcile(&c, group.as_deref(), prune).await
            }
        }),
    }
}

fn config_error(e: &usersync::config::ConfigError) -> ExitCode {
    eprintln!("usersync: invalid configuration: {e}");
    ExitCode::from(EX_CONFIG)
}

/// Loads the file and checks that the daemon can start from it (what
/// `check-config` and `run` share): 78 for what a restart cannot fix, 1
/// for a state directory that may recover.
fn runnable_config(path: &Path) -> Result<usersync::config::Config, ExitCode> {
    use usersync::config::Unrunnable;
    let config = usersync::config::load(path).map_err(|e| config_error(&e))?;
    match usersync::config::check_runnable(&config) {
        Ok(()) => Ok(config),
        Err(Unrunnable::Config(e)) => Err(config_error(&e)),
        Err(e @ Unrunnable::StateDir { .. }) => {
            eprintln!("usersync: {e}");
            Err(ExitCode::from(1))
        }
    }
}

fn report(r: Result<String, cli::CliError>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("usersync: {e}");
            ExitCode::from(1)
        }
    }
}

/// Loads the config (exit 78 if invalid) and runs an operator command.
fn with_config<F, Fut>(path: &Path, f: F) -> ExitCode
where
    F: FnOnce(usersync::config::Config) -> Fut,
    Fut: std::future::Future<Output = Result<String, cli::CliError>>,
{
    let config = match usersync::config::load(path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    usersync::logging::init(LogTarget::Stderr, LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usersync: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    report(runtime.block_on(f(config)))
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

/// SIGTERM/SIGINT: orderly shutdown, a second one abandons in-flight work.
/// SIGHUP: reload the configuration (`RELOADING=1` … `READY=1`); an invalid
/// file is logged and the running configuration stays.
fn spawn_signal_handler(
    signals: usersync::Shutdown,
    reload: tokio::sync::mpsc::Sender<usersync::Reload>,
    path: PathBuf,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    usersync::service::reloading();
                    match usersync::config::load(&path) {
                        Ok(config) => {
                            let (done, answer) = tokio::sync::oneshot::channel();
                            if reload.send(usersync::Reload { config, done }).await.is_ok() {
                                let _ = answer.await;
                            }
                        }
                        Err(e) => tracing::error!("reload rejected, keeping the running configuration: {e}"),
                    }
                    usersync::service::ready();
                    continue;
                }
            }
            stops += 1;
            if stops == 1 {
                tracing::info!("signal received: shutting down");
                signals.shutdown.cancel();
            } else {
                signals.abandon.cancel();
                return;
            }
        }
    });
    Ok(())
}
