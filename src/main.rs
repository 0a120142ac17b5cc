//! The `usersync` binary: CLI parsing, logging setup and exit codes only
//! (the commands are [`usersync::cli`]'s, the daemon's signals
//! [`usersync::service::signals`]').
//!
//! Exit codes: 0 success / clean stop; 78 (EX_CONFIG) invalid
//! configuration; 2 a usage error (clap's); 1 any other failure.

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
    after_help = "Commands that use the daemon's configuration read it from --config/-c FILE \
                  (default /etc/usersync/usersync.toml).\n\
                  Exit codes: 0 success; 1 failure (the message says what to do next); 2 usage error \
                  (unknown option, missing argument); 78 invalid configuration."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, short, value_name = "FILE", default_value = DEFAULT_CONFIG)]
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
        /// Log line format on stderr: readable text, or one JSON object per
        /// line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show the daemon, the gateway, devices (state, checkpoint, lag),
    /// targets (journal position, pending, reconcile, drift, quarantine),
    /// multi-master groups (members, echo detection, clock skew, own writes
    /// expected, conflicts): from the state database, with the daemon
    /// running or stopped.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (timestamps in RFC 3339) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Read a device's event log through the gateway.
    Events {
        #[command(flatten)]
        config: ConfigArg,
        /// The device (its ID as in the configuration).
        #[arg(long, value_name = "ID")]
        device: u32,
        /// First event ID to show (default: the last --limit events).
        #[arg(long, value_name = "EVENT_ID")]
        since: Option<u32>,
        /// How many events to show at most.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u32,
        /// Print JSON (timestamps in RFC 3339) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List a device's users, or show one (counts and sizes, never
    /// templates, PINs or photos).
    Users {
        #[command(flatten)]
        config: ConfigArg,
        /// The device (its ID as in the configuration).
        #[arg(long, value_name = "ID")]
        device: u32,
        /// Show this user instead of the list.
        #[arg(long, value_name = "USER_ID")]
        user: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Enroll a user with a card presented at a device (the inputs are
    /// checked before the card is asked for). With --overwrite, an existing
    /// user gets the card added and keeps everything else.
    Enroll {
        #[command(flatten)]
        config: ConfigArg,
        /// The device to enroll at (a source of a group, so that the daemon
        /// copies the user to its targets).
        #[arg(long, value_name = "ID")]
        device: u32,
        /// The user's ID (1–32 printable characters, not "0").
        #[arg(long, value_name = "USER_ID")]
        user: String,
        /// The user's name (for a new user; renames an existing one with
        /// --overwrite).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Read the credential from a card presented at the device (the
        /// default, and the only kind this command enrolls).
        #[arg(long)]
        card: bool,
        /// If the user exists, add the card to it (fingers, faces, PIN,
        /// photo and every other field are kept) instead of failing.
        #[arg(long)]
        overwrite: bool,
    },
    /// Delete a user from a device (exit 1 if the device does not have it).
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        /// The device to delete from (a source, so that the daemon deletes
        /// the user from its targets).
        #[arg(long, value_name = "ID")]
        device: u32,
        /// The user's ID.
        #[arg(long, value_name = "USER_ID")]
        user: String,
        /// Delete at a target even though a source of its group still
        /// holds the user (the person is locked out there until a
        /// reconcile puts them back).
        #[arg(long)]
        force: bool,
    },
    /// Reconcile targets with their sources: through the running daemon,
    /// or here when it is stopped (each reachable target is reconciled, the
    /// unreachable ones reported). Multi-master groups are reconciled by
    /// the running daemon only (a request; refused with it stopped).
    Reconcile {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this group.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Only this target device (or member of a multi-master group).
        #[arg(long, value_name = "ID")]
        target: Option<u32>,
        /// Print the plan (users to enroll, overwrite, delete or keep);
        /// change nothing. Multi-master groups have no plan (said so).
        #[arg(long)]
        dry_run: bool,
        /// Also delete users that no source of the group has (asks for
        /// confirmation, saying how many).
        #[arg(long)]
        prune: bool,
        /// Confirm a prune without asking (for scripts).
        #[arg(long)]
        yes: bool,
        /// Let a prune run although a source of the group lists no users
        /// (it deletes every user of the group's targets).
        #[arg(long)]
        allow_empty_source: bool,
        /// Print the --dry-run plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file as `run` does before it starts: exit 0
    /// if valid, 78 if not; warnings on stderr.
    CheckConfig {
        /// The configuration file (the same as --config).
        #[arg(value_name = "FILE", conflicts_with = "config")]
        path: Option<PathBuf>,
        /// The configuration file [default: /etc/usersync/usersync.toml].
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Convert the sync_config.json of Suprema's sync example and seed the
    /// checkpoints from its last_event_id values: all or nothing.
    ImportConfig {
        /// The example's sync_config.json.
        #[arg(value_name = "JSON")]
        json: PathBuf,
        /// Where to write the TOML configuration (must not exist).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        output: PathBuf,
        /// The gateway, host:port (the example keeps it in its code).
        #[arg(long, value_name = "HOST:PORT")]
        gateway: String,
        /// The gateway's CA certificate (relative paths are relative to the
        /// current directory).
        #[arg(long, value_name = "FILE", default_value = "/etc/usersync/ca.crt")]
        ca_file: PathBuf,
        /// The daemon's state directory, where the checkpoints are seeded.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/usersync")]
        state_dir: PathBuf,
        /// The gateway's API generation: v1.8 (V1.8+), v1.5 (V1.5–V1.6)
        /// or v1.4 (V1.0–V1.4).
        #[arg(long, value_name = "API", default_value = "v1.8")]
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
        Command::CheckConfig { path, config } => {
            let path = path
                .or(config)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            match runnable_config(&path) {
                Ok(c) => report(Ok(cli::check_config(&c)), None),
                Err(code) => code,
            }
        }
        Command::Run {
            config,
            log_target,
            log_format,
        } => {
            let config = match runnable_config(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(e) = usersync::check_start(&config) {
                eprintln!("usersync: {e}");
                return ExitCode::from(1);
            }
            let note = usersync::logging::init(log_target, log_format);
            block_on(async move {
                if let Some(note) = note {
                    tracing::warn!("{note}");
                }
                Ok(usersync::serve(config).await?)
            })
        }
        Command::Sim(args) => {
            usersync::logging::init(LogTarget::Stderr, LogFormat::Text);
            block_on(async move { Ok(usersync::sim::cli::run(args).await?) })
        }
        Command::Demo => {
            // The narration is the output; keep the daemon's own lines to
            // warnings.
            usersync::logging::init_with(LogTarget::Stderr, LogFormat::Text, "warn");
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
            report(cli::import_config(&json, &output, &target), None)
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
                cli::render_events(device, since, &lines)
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
            force,
        } => with_config(&config.config, |c| async move {
            cli::delete(&c, device, &user, force).await
        }),
        Command::Reconcile {
            config,
            group,
            target,
            dry_run,
            prune,
            yes,
            allow_empty_source,
            json,
        } => with_config(&config.config, |c| async move {
            if dry_run {
                let plan =
                    cli::reconcile_plan(&c, group.as_deref(), target, prune, allow_empty_source)
                        .await?;
                cli::plan_outcome(&plan, json)
            } else {
                cli::reconcile(&c, group.as_deref(), target, prune, yes, allow_empty_source).await
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

fn report(r: Result<String, cli::CliError>, config: Option<&usersync::config::Config>) -> ExitCode {
    let print = |text: &str| {
        print!("{text}");
        if !text.is_empty() && !text.ends_with('\n') {
            println!();
        }
    };
    match r {
        Ok(text) => {
            print(&text);
            ExitCode::SUCCESS
        }
        Err(cli::CliError::Incomplete { done, failed }) => {
            print(&done);
            eprint!("usersync: {failed}");
            if !failed.ends_with('\n') {
                eprintln!();
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("usersync: {}", cli::describe(&e, config));
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
    let r = runtime.block_on(f(config.clone()));
    report(r, Some(&config))
}

/// An error and its causes, each said once (a cause whose text is already
/// in the message is not repeated).
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let t = cause.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
    }
    out
}

/// Threads of the runtime's blocking pool. Store calls (one SQLite
/// connection behind a mutex) are what it runs for the daemon, one at a
/// time: more threads would only wait on the mutex, each with its stack and
/// malloc arena (tokio's default of 512 grew to 60+ threads and ~5 MiB of
/// RSS at a start of 1,000 devices). The simulator's stdin holds one.
const BLOCKING_THREADS: usize = 4;

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
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
            eprintln!("usersync: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}
