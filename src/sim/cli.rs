//! `usersync sim`: the simulator as a standalone process for demos and for
//! clients written independently of this crate. It is driven by commands on
//! standard input (`help` lists them) and stops on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{DeviceSpec, MissingUser, SimError, SimOptions, Simulator, StaleStart};
use crate::wire::Api;

/// Arguments of `usersync sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
    /// Number of simulated devices (IDs 540000001, 540000002, …).
    #[arg(long, default_value_t = 3)]
    pub devices: u32,
    /// Users generated on each device at start ("1", "2", …).
    #[arg(long, default_value_t = 0)]
    pub users: u32,
    /// Directory to write the generated CA certificate (`ca.crt`) to.
    #[arg(long, required_unless_present = "plaintext")]
    pub cert_dir: Option<PathBuf>,
    /// Gateway generation to imitate: v1.4, v1.5 or v1.8.
    #[arg(long, default_value = "v1.8")]
    pub api: Api,
    /// Serve plaintext HTTP/2 instead of TLS (real gateways never do).
    #[arg(long)]
    pub plaintext: bool,
    /// Event log capacity of each device (a ring buffer).
    #[arg(long, default_value_t = 50_000)]
    pub log_capacity: usize,
    /// TOML file describing the devices (replaces --devices/--users).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Answer User.Get of an unknown ID with NOT_FOUND instead of omitting it.
    #[arg(long)]
    pub strict_missing_user: bool,
    /// Do not register the devices as async connections at start.
    #[arg(long)]
    pub no_preconnect: bool,
    /// Reconnect delay after a device comes back, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub reconnect_delay_ms: u64,
}

/// The `--config` file of the simulator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimFile {
    api: Option<String>,
    log_capacity: Option<usize>,
    #[serde(default)]
    device: Vec<SimFileDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimFileDevice {
    id: u32,
    #[serde(default)]
    users: u32,
    #[serde(default = "one")]
    first_event_id: u32,
    #[serde(default)]
    tls: bool,
}

fn one() -> u32 {
    1
}

fn load_file(path: &Path, opts: &mut SimOptions) -> Result<(), SimError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SimError::Control(format!("{}: {e}", path.display())))?;
    let file: SimFile =
        toml::from_str(&text).map_err(|e| SimError::Control(format!("{}: {e}", path.display())))?;
    if let Some(api) = file.api {
        opts.model.api = api
            .parse()
            .map_err(|e| SimError::Control(format!("{}: api: {e}", path.display())))?;
    }
    if let Some(cap) = file.log_capacity {
        opts.model.log_capacity = cap;
    }
    opts.model.devices = file
        .device
        .into_iter()
        .map(|d| DeviceSpec {
            users: d.users,
            first_event_id: d.first_event_id,
            use_ssl: d.tls,
            ..DeviceSpec::new(d.id)
        })
        .collect();
    Ok(())
}

/// Builds simulator options from the command line (and `--config`).
pub fn options(args: &SimArgs) -> Result<SimOptions, SimError> {
    let mut opts = SimOptions::with_devices(args.devices);
    for d in &mut opts.model.devices {
        d.users = args.users;
    }
    opts.listen = args.listen;
    opts.tls = !args.plaintext;
    opts.model.api = args.api;
    opts.model.log_capacity = args.log_capacity;
    opts.model.preconnect = !args.no_preconnect;
    opts.reconnect_delay = Duration::from_millis(args.reconnect_delay_ms);
    if args.strict_missing_user {
        opts.model.policies.missing_user = MissingUser::NotFound;
    }
    if let Some(path) = &args.config {
        load_file(path, &mut opts)?;
    }
    Ok(opts)
}

/// Runs `usersync sim` until SIGTERM/SIGINT or the `quit` command.
pub async fn run(args: SimArgs) -> Result<(), SimError> {
    let opts = options(&args)?;
    let sim = Simulator::start(opts).await?;
    println!(
        "simulated gateway {} ({}) listening on {}",
        sim.api().nominal_version(),
        sim.api(),
        sim.address()
    );
    if let (Some(certs), Some(dir)) = (sim.certs(), &args.cert_dir) {
        let path = certs.write_ca(dir)?;
        println!("CA certificate: {}", path.display());
    } else {
        println!("plaintext (no TLS)");
    }
    let ids: Vec<String> = sim.device_ids().iter().map(u32::to_string).collect();
    println!("devices: {}", ids.join(" "));
    println!("type `help` for commands");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            biased;
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => match parse_command(&line) {
                    Ok(None) => {}
                    Ok(Some(Command::Quit)) => break,
                    Ok(Some(cmd)) => println!("{}", apply(&sim, cmd).await),
                    Err(e) => println!("error: {e}"),
                },
                // Without a terminal (e.g. under systemd) keep serving.
                Ok(None) | Err(_) => stdin_open = false,
            },
        }
    }
    sim.shutdown().await;
    println!("simulator stopped");
    Ok(())
}

/// A command typed at the simulator's prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Devices,
    Enroll(u32, String),
    Update(u32, String),
    Delete(u32, String),
    DeleteAll(u32),
    Offline(u32),
    Online(u32),
    Drop(Option<u32>, f64),
    FailMulti(u32, u32),
    Reject(u32, String),
    Accept(u32, String),
    ClearLog(u32),
    FactoryReset(u32),
    Restart(Duration),
    Latency(String, Duration),
    Users(u32),
    Log(u32, usize),
    MissingUser(MissingUser),
    StaleStart(StaleStart),
    Quit,
}

pub const HELP: &str = "\
commands (DEV = device ID):
  devices                      list devices, status, users, newest event
  enroll DEV USER              enroll a generated user at the device
  update DEV USER              change an existing user at the device
  delete DEV USER              delete a user at the device
  delete-all DEV               delete every user at the device
  offline DEV | online DEV     take a device off the network / bring it back
  drop DEV|all FRACTION        drop this fraction (0-1) of realtime events
  fail-multi DEV N             fail the next N Multi calls for DEV (transient)
  reject DEV USER | accept DEV USER   permanently refuse / accept a user
  clear-log DEV                clear the device's event log
  factory-reset DEV            wipe users and log, restart event IDs
  restart SECONDS              restart the gateway, down for SECONDS
  latency METHOD MS            delay every METHOD call (0 = none)
  users DEV                    list the users stored on a device
  log DEV [N]                  show the last N (10) events of a device
  missing-user omit|not-found  User.Get answer for unknown IDs
  stale-start clamp|error      GetLog answer for a start older than the log
  quit";

fn num<T: std::str::FromStr>(word: Option<&str>, what: &str) -> Result<T, String> {
    let w = word.ok_or_else(|| format!("missing {what}"))?;
    w.parse().map_err(|_| format!("bad {what}: {w:?}"))
}

fn text(word: Option<&str>, what: &str) -> Result<String, String> {
    word.map(str::to_owned)
        .ok_or_else(|| format!("missing {what}"))
}

/// Parses one input line; `Ok(None)` for a blank line.
pub fn parse_command(line: &str) -> Result<Option<Command>, String> {
    let mut w = line.split_whitespace();
    let Some(verb) = w.next() else {
        return Ok(None);
    };
    let cmd = match verb {
        "help" | "?" => Command::Help,
        "devices" => Command::Devices,
        "enroll" => Command::Enroll(num(w.next(), "device")?, text(w.next(), "user")?),
        "update" => Command::Update(num(w.next(), "device")?, text(w.next(), "user")?),
        "delete" => Command::Delete(num(w.next(), "device")?, text(w.next(), "user")?),
        "delete-all" => Command::DeleteAll(num(w.next(), "device")?),
        "offline" => Command::Offline(num(w.next(), "device")?),
        "online" => Command::Online(num(w.next(), "device")?),
        "drop" => {
            let dev = match w.next() {
                Some("all") => None,
                other => Some(num(other, "device")?),
            };
            let f: f64 = num(w.next(), "fraction")?;
            if !(0.0..=1.0).contains(&f) {
                return Err(format!("fraction must be between 0 and 1, got {f}"));
            }
            Command::Drop(dev, f)
        }
        "fail-multi" => Command::FailMulti(num(w.next(), "device")?, num(w.next(), "count")?),
        "reject" => Command::Reject(num(w.next(), "device")?, text(w.next(), "user")?),
        "accept" => Command::Accept(num(w.next(), "device")?, text(w.next(), "user")?),
        "clear-log" => Command::ClearLog(num(w.next(), "device")?),
        "factory-reset" => Command::FactoryReset(num(w.next(), "device")?),
        "restart" => Command::Restart(Duration::from_secs_f64(
            num::<f64>(w.next(), "seconds")?.clamp(0.0, 3600.0),
        )),
        "latency" => Command::Latency(
            text(w.next(), "method")?,
            Duration::from_millis(num(w.next(), "milliseconds")?),
        ),
        "users" => Command::Users(num(w.next(), "device")?),
        "log" => {
            let dev = num(w.next(), "device")?;
            let n = match w.next() {
                Some(n) => num(Some(n), "count")?,
                None => 10,
            };
            Command::Log(dev, n)
        }
        "missing-user" => Command::MissingUser(match w.next() {
            Some("omit") => MissingUser::Lenient,
            Some("not-found") => MissingUser::NotFound,
            other => return Err(format!("expected omit or not-found, got {other:?}")),
        }),
        "stale-start" => Command::StaleStart(match w.next() {
            Some("clamp") => StaleStart::Clamp,
            Some("error") => StaleStart::OutOfRange,
            other => return Err(format!("expected clamp or error, got {other:?}")),
        }),
        "quit" | "exit" => Command::Quit,
        other => return Err(format!("unknown command {other:?}; type `help`")),
    };
    if let Some(extra) = w.next() {
        return Err(format!("unexpected {extra:?} after the command"));
    }
    Ok(Some(cmd))
}

fn done<T: std::fmt::Display>(r: Result<T, SimError>, what: &str) -> String {
    match r {
        Ok(v) => format!("{what} (event {v})"),
        Err(e) => format!("error: {e}"),
    }
}

/// Carries out a command and returns what to print.
pub async fn apply(sim: &Simulator, cmd: Command) -> String {
    match cmd {
        Command::Help => HELP.to_owned(),
        Command::Devices => sim
            .device_ids()
            .into_iter()
            .map(|d| {
                let newest = sim.log(d).last().map_or(0, |e| e.id);
                format!(
                    "{d}: {}{}, {} users, newest event {newest}",
                    if sim.is_connected(d) {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    if sim.is_monitoring(d) {
                        ", monitored"
                    } else {
                        ""
                    },
                    sim.users(d).len()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Command::Enroll(d, u) => done(sim.enroll_on_device(d, &u), "enrolled"),
        Command::Update(d, u) => done(sim.update_on_device(d, &u), "updated"),
        Command::Delete(d, u) => done(sim.delete_on_device(d, &u), "deleted"),
        Command::DeleteAll(d) => done(sim.delete_all_on_device(d), "all users deleted"),
        Command::Offline(d) => result(sim.set_offline(d), "offline"),
        Command::Online(d) => result(sim.set_online(d), "online; reconnecting"),
        Command::Drop(d, f) => {
            sim.drop_realtime(d, f);
            format!("dropping {:.0}% of realtime events", f * 100.0)
        }
        Command::FailMulti(d, n) => {
            sim.fail_next_multi(d, n);
            format!("next {n} Multi calls fail for {d}")
        }
        Command::Reject(d, u) => {
            sim.reject(d, &u);
            format!("device {d} now refuses user {u}")
        }
        Command::Accept(d, u) => {
            sim.accept(d, &u);
            format!("device {d} accepts user {u} again")
        }
        Command::ClearLog(d) => result(sim.clear_log(d), "log cleared"),
        Command::FactoryReset(d) => result(sim.factory_reset(d), "factory reset"),
        Command::Restart(down) => result(sim.restart(down).await, "gateway restarted"),
        Command::Latency(m, d) => {
            sim.set_latency(&m, d);
            format!("{m} delayed by {d:?}")
        }
        Command::Users(d) => {
            let users = sim.users(d);
            let mut out = format!("{} users on {d}", users.len());
            for (id, raw) in users {
                out.push_str(&format!("\n  {id} ({} bytes)", raw.len()));
            }
            out
        }
        Command::Log(d, n) => {
            let log = sim.log(d);
            let start = log.len().saturating_sub(n);
            log[start..]
                .iter()
                .map(|e| {
                    format!(
                        "  #{} code 0x{:04X}/{:02X} user {:?}{}",
                        e.id,
                        e.event_code,
                        e.sub_code,
                        e.user_id,
                        if e.changed_on_device {
                            " (on device)"
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Command::MissingUser(p) => {
            let mut pol = sim.policies();
            pol.missing_user = p;
            sim.set_policies(pol);
            format!("missing users: {p:?}")
        }
        Command::StaleStart(p) => {
            let mut pol = sim.policies();
            pol.stale_start = p;
            sim.set_policies(pol);
            format!("stale GetLog start: {p:?}")
        }
        Command::Quit => "bye".to_owned(),
    }
}

fn result(r: Result<(), SimError>, what: &str) -> String {
    match r {
        Ok(()) => what.to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse_command("  "), Ok(None));
        assert_eq!(
            parse_command("enroll 5 1000"),
            Ok(Some(Command::Enroll(5, "1000".into())))
        );
        assert_eq!(
            parse_command("drop all 0.5"),
            Ok(Some(Command::Drop(None, 0.5)))
        );
        assert_eq!(parse_command("log 7"), Ok(Some(Command::Log(7, 10))));
        assert_eq!(
            parse_command("restart 1.5"),
            Ok(Some(Command::Restart(Duration::from_millis(1500))))
        );
        assert!(parse_command("drop 1 2").is_err());
        assert!(parse_command("enroll x 1").is_err());
        assert!(parse_command("enroll 1").is_err());
        assert!(parse_command("enroll 1 2 3").is_err());
        assert!(parse_command("frobnicate").is_err());
    }

    #[test]
    fn sim_file_is_strict() {
        let dir = std::env::temp_dir().join(format!("usersync-simfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "api = \"v1.4\"\nlog_capacity = 10\n[[device]]\nid = 7\nusers = 2\n",
        )
        .unwrap();
        let mut opts = SimOptions::default();
        load_file(&good, &mut opts).unwrap();
        assert_eq!(opts.model.api, Api::V1_4);
        assert_eq!(opts.model.devices.len(), 1);
        assert_eq!(opts.model.devices[0].users, 2);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[device]]\nid = 7\ncolour = 2\n").unwrap();
        let err = load_file(&bad, &mut SimOptions::default()).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
