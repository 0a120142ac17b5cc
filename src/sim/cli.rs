//! `usersync sim`: the simulator as a standalone process for demos and for
//! clients written independently of this crate. It is driven by commands on
//! standard input (`help` lists them) and stops on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{
    DeviceSpec, LogFault, MissingUser, PastNewest, Policies, SimError, SimOptions, Simulator,
    StaleStart, StreamHeaders,
};
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
    /// TOML file describing the devices (replaces --devices/--users) and
    /// the answers below; a flag given here wins over the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// When SubscribeStatus/SubscribeRealtimeLog send response headers:
    /// `lazy` (with the first message, as grpc-go servers), `eager`, or
    /// `never` (hostile: the streams never answer) [default: lazy].
    #[arg(long, value_name = "lazy|eager|never", value_parser = parse_stream_headers)]
    pub stream_headers: Option<StreamHeaders>,
    /// GetLog with a start older than the oldest record: `error`
    /// (OUT_OF_RANGE) or `clamp` (answer from the oldest) [default: error].
    #[arg(long, value_name = "error|clamp", value_parser = parse_stale_start)]
    pub stale_start: Option<StaleStart>,
    /// GetLog with a start past the newest record (also newest + 1, and any
    /// start but 0 on an empty log): `error` (OUT_OF_RANGE) or `empty`
    /// [default: error].
    #[arg(long, value_name = "error|empty", value_parser = parse_past_newest)]
    pub past_newest: Option<PastNewest>,
    /// User.Get of an unknown ID and Delete of a missing user: `not-found`
    /// (the call fails), `omit` (omitted / success) or `internal` (the call
    /// fails with INTERNAL) [default: not-found].
    #[arg(long, value_name = "not-found|omit|internal", value_parser = parse_missing_user)]
    pub missing_user: Option<MissingUser>,
    /// Old name of `--missing-user not-found` (now the default).
    #[arg(long, hide = true, conflicts_with = "missing_user")]
    pub strict_missing_user: bool,
    /// Register every device as an async connection at start and after a
    /// restart, as if the gateway remembered them. Without it, GetDeviceList
    /// is empty until a client calls AddAsyncConnection.
    #[arg(long)]
    pub preconnect: bool,
    /// Old flag; not registering the devices is now the default.
    #[arg(long, hide = true, conflicts_with = "preconnect")]
    pub no_preconnect: bool,
    /// Time each device takes to answer a relayed command (GetLog, User.*,
    /// monitoring, ClearLog, Card.Scan), once per call; real readers take
    /// tens of ms to 2 s [default: 0].
    #[arg(long, value_name = "MS")]
    pub device_latency_ms: Option<u64>,
    /// Reconnect delay after a device comes back, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub reconnect_delay_ms: u64,
}

// One vocabulary for the answers to WIRE.md's open questions, shared by the
// flags, the `--config` keys and the stdin commands.

fn expected<T>(what: &str, got: &str) -> Result<T, String> {
    Err(format!("expected {what}, got {got:?}"))
}

pub fn parse_stream_headers(s: &str) -> Result<StreamHeaders, String> {
    match s {
        "lazy" => Ok(StreamHeaders::Lazy),
        "eager" => Ok(StreamHeaders::Eager),
        "never" => Ok(StreamHeaders::Never),
        other => expected("lazy, eager or never", other),
    }
}

pub fn parse_stale_start(s: &str) -> Result<StaleStart, String> {
    match s {
        "error" => Ok(StaleStart::OutOfRange),
        "clamp" => Ok(StaleStart::Clamp),
        other => expected("error or clamp", other),
    }
}

pub fn parse_past_newest(s: &str) -> Result<PastNewest, String> {
    match s {
        "error" => Ok(PastNewest::OutOfRange),
        "empty" => Ok(PastNewest::Empty),
        other => expected("error or empty", other),
    }
}

pub fn parse_missing_user(s: &str) -> Result<MissingUser, String> {
    match s {
        "not-found" => Ok(MissingUser::NotFound),
        "omit" => Ok(MissingUser::Lenient),
        "internal" => Ok(MissingUser::Internal),
        other => expected("not-found, omit or internal", other),
    }
}

pub fn parse_log_fault(s: &str) -> Result<LogFault, String> {
    match s {
        "none" => Ok(LogFault::None),
        "duplicate" => Ok(LogFault::Duplicate),
        "out-of-order" => Ok(LogFault::OutOfOrder),
        "oversize" => Ok(LogFault::Oversize),
        other => expected("none, duplicate, out-of-order or oversize", other),
    }
}

/// An event code in hex (`0x2000`) or decimal.
fn parse_code(w: Option<&str>) -> Result<u32, String> {
    let w = w.ok_or("missing event code")?;
    let parsed = match w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => w.parse(),
    };
    parsed.map_err(|_| format!("bad event code: {w:?} (e.g. 0x2000)"))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => expected("on or off", other),
    }
}

/// The switches as `policies` prints them, in the words the commands use.
fn describe(p: &Policies, preconnect: bool, device_latency: Duration) -> String {
    format!(
        "stream-headers {}\nstale-start {}\npast-newest {}\nmissing-user {}\n\
         preconnect {}\ndevice-latency {}",
        match p.stream_headers {
            StreamHeaders::Lazy => "lazy",
            StreamHeaders::Eager => "eager",
            StreamHeaders::Never => "never",
        },
        match p.stale_start {
            StaleStart::OutOfRange => "error",
            StaleStart::Clamp => "clamp",
        },
        match p.past_newest {
            PastNewest::OutOfRange => "error",
            PastNewest::Empty => "empty",
        },
        match p.missing_user {
            MissingUser::NotFound => "not-found",
            MissingUser::Lenient => "omit",
            MissingUser::Internal => "internal",
        },
        if preconnect { "on" } else { "off" },
        device_latency.as_millis(),
    )
}

/// The `--config` file of the simulator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimFile {
    api: Option<String>,
    log_capacity: Option<usize>,
    stream_headers: Option<String>,
    stale_start: Option<String>,
    past_newest: Option<String>,
    missing_user: Option<String>,
    preconnect: Option<bool>,
    device_latency_ms: Option<u64>,
    /// Absent: the devices of `--devices`/`--users`.
    device: Option<Vec<SimFileDevice>>,
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
    let key = |name: &str, e: String| SimError::Control(format!("{}: {name}: {e}", path.display()));
    let policies = &mut opts.model.policies;
    if let Some(v) = file.stream_headers {
        policies.stream_headers = parse_stream_headers(&v).map_err(|e| key("stream_headers", e))?;
    }
    if let Some(v) = file.stale_start {
        policies.stale_start = parse_stale_start(&v).map_err(|e| key("stale_start", e))?;
    }
    if let Some(v) = file.past_newest {
        policies.past_newest = parse_past_newest(&v).map_err(|e| key("past_newest", e))?;
    }
    if let Some(v) = file.missing_user {
        policies.missing_user = parse_missing_user(&v).map_err(|e| key("missing_user", e))?;
    }
    if let Some(on) = file.preconnect {
        opts.model.preconnect = on;
    }
    if let Some(ms) = file.device_latency_ms {
        opts.model.device_latency = Duration::from_millis(ms);
    }
    if let Some(devices) = file.device {
        opts.model.devices = devices
            .into_iter()
            .map(|d| DeviceSpec {
                users: d.users,
                first_event_id: d.first_event_id,
                use_ssl: d.tls,
                ..DeviceSpec::new(d.id)
            })
            .collect();
    }
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
    opts.reconnect_delay = Duration::from_millis(args.reconnect_delay_ms);
    if let Some(path) = &args.config {
        load_file(path, &mut opts)?;
    }
    // Flags given on the command line win over the file.
    let policies = &mut opts.model.policies;
    if let Some(h) = args.stream_headers {
        policies.stream_headers = h;
    }
    if let Some(p) = args.stale_start {
        policies.stale_start = p;
    }
    if let Some(p) = args.past_newest {
        policies.past_newest = p;
    }
    if let Some(p) = args.missing_user {
        policies.missing_user = p;
    }
    if args.strict_missing_user {
        policies.missing_user = MissingUser::NotFound;
    }
    if args.preconnect {
        opts.model.preconnect = true;
    }
    if args.no_preconnect {
        opts.model.preconnect = false;
    }
    if let Some(ms) = args.device_latency_ms {
        opts.model.device_latency = Duration::from_millis(ms);
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
    Hold(u32),
    Release(u32),
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
    PastNewest(PastNewest),
    StreamHeaders(StreamHeaders),
    Preconnect(bool),
    DeviceLatency(Duration),
    /// A device event with any code and user ID (none: empty).
    Event(u32, u32, String),
    Corrupt(u32, String),
    LogFault(Option<u32>, LogFault),
    StallRealtime(bool),
    Policies,
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
  hold DEV | release DEV       the device stops answering commands (calls to
                               it wait; link stays up) / answers again
  drop DEV|all FRACTION        drop this fraction (0-1) of realtime events
  fail-multi DEV N             fail the next N Multi calls for DEV (transient)
  reject DEV USER | accept DEV USER   permanently refuse / accept a user
  clear-log DEV                clear the device's event log
  factory-reset DEV            wipe users and log, restart event IDs
  restart SECONDS              restart the gateway, down for SECONDS
  latency METHOD MS            delay every METHOD call (0 = none)
  users DEV                    list the users stored on a device
  log DEV [N]                  show the last N (10) events of a device
hostile data (beyond what WIRE.md allows):
  event DEV CODE [USER]        log an event with any code (0x2000 or 8192) and
                               user ID (any length; none = empty)
  corrupt DEV USER             store a record that does not decode under USER
                               and log a user-update event for it
  log-fault DEV|all none|duplicate|out-of-order|oversize
                               GetLog pages: as WIRE.md says / every record
                               twice / descending / everything from the start
                               whatever the maximum asked for
  stall-realtime on|off        the open realtime streams stay open but carry
                               nothing (events queue, then drop) / go on
answers to WIRE.md's open questions (default first):
  policies                     show the current answers
  stream-headers lazy|eager|never
                               streams send headers with the first message
                               (a tonic client's subscribe blocks) / at once /
                               never (hostile: the call never answers)
  stale-start error|clamp      GetLog start older than the oldest record
  past-newest error|empty      GetLog start past the newest record
                               (newest+1 too; start 0 is always fine)
  missing-user not-found|omit|internal  User.Get of an unknown ID, Delete of a missing one
  preconnect off|on            devices registered again at the next restart
  device-latency MS            every device command takes MS longer (0)
  quit";

fn num<T: std::str::FromStr>(word: Option<&str>, what: &str) -> Result<T, String> {
    let w = word.ok_or_else(|| format!("missing {what}"))?;
    w.parse().map_err(|_| format!("bad {what}: {w:?}"))
}

/// The answer word of a policy command.
fn word(w: Option<&str>) -> Result<&str, String> {
    w.ok_or_else(|| "missing answer; type `help`".to_owned())
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
        "hold" => Command::Hold(num(w.next(), "device")?),
        "release" => Command::Release(num(w.next(), "device")?),
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
        "missing-user" => Command::MissingUser(parse_missing_user(word(w.next())?)?),
        "stale-start" => Command::StaleStart(parse_stale_start(word(w.next())?)?),
        "past-newest" => Command::PastNewest(parse_past_newest(word(w.next())?)?),
        "stream-headers" => Command::StreamHeaders(parse_stream_headers(word(w.next())?)?),
        "preconnect" => Command::Preconnect(parse_on_off(word(w.next())?)?),
        "device-latency" => {
            Command::DeviceLatency(Duration::from_millis(num(w.next(), "milliseconds")?))
        }
        "event" => {
            let dev = num(w.next(), "device")?;
            let code = parse_code(w.next())?;
            Command::Event(dev, code, w.next().unwrap_or_default().to_owned())
        }
        "corrupt" => Command::Corrupt(num(w.next(), "device")?, text(w.next(), "user")?),
        "log-fault" => {
            let dev = match w.next() {
                Some("all") => None,
                other => Some(num(other, "device")?),
            };
            Command::LogFault(dev, parse_log_fault(word(w.next())?)?)
        }
        "stall-realtime" => Command::StallRealtime(parse_on_off(word(w.next())?)?),
        "policies" => Command::Policies,
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
                let newest = sim.newest_event_id(d).unwrap_or(0);
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
                    sim.user_count(d)
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
        Command::Hold(d) => {
            sim.hold_device(d, true);
            format!("device {d} answers nothing until `release {d}`")
        }
        Command::Release(d) => {
            let waiting = sim.held_calls(d);
            sim.hold_device(d, false);
            format!("device {d} answers again ({waiting} waiting calls go on)")
        }
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
        Command::Log(d, n) => sim
            .log_tail(d, n)
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
            .join("\n"),
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
        Command::PastNewest(p) => {
            let mut pol = sim.policies();
            pol.past_newest = p;
            sim.set_policies(pol);
            format!("GetLog start past the newest: {p:?}")
        }
        Command::StreamHeaders(h) => {
            sim.set_stream_headers(h);
            format!("stream headers: {h:?} (for streams opened from now on)")
        }
        Command::Preconnect(on) => {
            sim.set_preconnect(on);
            format!(
                "preconnect {}: takes effect at the next restart",
                if on { "on" } else { "off" }
            )
        }
        Command::DeviceLatency(d) => {
            sim.set_device_latency(d);
            format!("device commands delayed by {d:?}")
        }
        Command::Event(d, code, u) => done(sim.event_on_device(d, code, &u), "logged"),
        Command::Corrupt(d, u) => done(
            sim.corrupt_on_device(d, &u),
            "stored a record that does not decode",
        ),
        Command::LogFault(d, fault) => {
            sim.set_log_fault(d, fault);
            format!("GetLog answers: {fault:?}")
        }
        Command::StallRealtime(on) => {
            sim.stall_realtime(on);
            if on {
                "open realtime streams stalled".to_owned()
            } else {
                "stalled realtime streams go on".to_owned()
            }
        }
        Command::Policies => describe(&sim.policies(), sim.preconnect(), sim.device_latency()),
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
    fn parses_hostile_data_commands() {
        let ok = |line: &str| parse_command(line).unwrap().unwrap();
        assert_eq!(
            ok("event 5 0x2000"),
            Command::Event(5, 0x2000, String::new())
        );
        assert_eq!(
            ok("event 5 8192 u1"),
            Command::Event(5, 0x2000, "u1".into())
        );
        assert_eq!(ok("corrupt 5 u1"), Command::Corrupt(5, "u1".into()));
        assert_eq!(
            ok("log-fault all oversize"),
            Command::LogFault(None, LogFault::Oversize)
        );
        assert_eq!(
            ok("log-fault 5 out-of-order"),
            Command::LogFault(Some(5), LogFault::OutOfOrder)
        );
        assert_eq!(ok("stall-realtime on"), Command::StallRealtime(true));
        for bad in [
            "event 5",
            "event 5 0xZZ",
            "event 5 1 u1 extra",
            "corrupt 5",
            "log-fault 5 sometimes",
            "log-fault 5",
            "stall-realtime",
        ] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_policy_commands() {
        let ok = |line: &str| parse_command(line).unwrap().unwrap();
        assert_eq!(
            ok("stream-headers lazy"),
            Command::StreamHeaders(StreamHeaders::Lazy)
        );
        assert_eq!(
            ok("stream-headers eager"),
            Command::StreamHeaders(StreamHeaders::Eager)
        );
        assert_eq!(
            ok("stale-start error"),
            Command::StaleStart(StaleStart::OutOfRange)
        );
        assert_eq!(
            ok("stale-start clamp"),
            Command::StaleStart(StaleStart::Clamp)
        );
        assert_eq!(
            ok("past-newest error"),
            Command::PastNewest(PastNewest::OutOfRange)
        );
        assert_eq!(
            ok("past-newest empty"),
            Command::PastNewest(PastNewest::Empty)
        );
        assert_eq!(
            ok("missing-user not-found"),
            Command::MissingUser(MissingUser::NotFound)
        );
        assert_eq!(
            ok("missing-user omit"),
            Command::MissingUser(MissingUser::Lenient)
        );
        assert_eq!(ok("preconnect on"), Command::Preconnect(true));
        assert_eq!(ok("preconnect off"), Command::Preconnect(false));
        assert_eq!(
            ok("device-latency 250"),
            Command::DeviceLatency(Duration::from_millis(250))
        );
        assert_eq!(
            ok("stream-headers never"),
            Command::StreamHeaders(StreamHeaders::Never)
        );
        assert_eq!(ok("policies"), Command::Policies);
        assert_eq!(ok("hold 3"), Command::Hold(3));
        assert_eq!(ok("release 3"), Command::Release(3));
        for bad in [
            "stream-headers",
            "stream-headers soon",
            "past-newest clamp",
            "stale-start empty",
            "preconnect yes",
            "device-latency -1",
            "policies now",
        ] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn args(extra: &[&str]) -> SimArgs {
        use clap::Parser;
        let mut argv = vec!["sim", "--plaintext"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("valid arguments").sim
    }

    #[test]
    fn defaults_are_the_inconvenient_answers() {
        let opts = options(&args(&[])).unwrap();
        assert_eq!(opts.model.policies, Policies::default());
        assert_eq!(opts.model.policies.stream_headers, StreamHeaders::Lazy);
        assert_eq!(opts.model.policies.stale_start, StaleStart::OutOfRange);
        assert_eq!(opts.model.policies.past_newest, PastNewest::OutOfRange);
        assert_eq!(opts.model.policies.missing_user, MissingUser::NotFound);
        assert!(!opts.model.preconnect);
        assert_eq!(opts.model.device_latency, Duration::ZERO);
    }

    #[test]
    fn flags_switch_every_answer() {
        let opts = options(&args(&[
            "--stream-headers",
            "eager",
            "--stale-start",
            "clamp",
            "--past-newest",
            "empty",
            "--missing-user",
            "omit",
            "--preconnect",
            "--device-latency-ms",
            "40",
        ]))
        .unwrap();
        assert_eq!(opts.model.policies, Policies::lenient());
        assert!(opts.model.preconnect);
        assert_eq!(opts.model.device_latency, Duration::from_millis(40));
        // The old flags are still accepted.
        let old = options(&args(&["--strict-missing-user", "--no-preconnect"])).unwrap();
        assert_eq!(old.model.policies.missing_user, MissingUser::NotFound);
        assert!(!old.model.preconnect);
        use clap::Parser;
        assert!(Cli::try_parse_from(["sim", "--plaintext", "--stale-start", "later"]).is_err());
        assert!(
            Cli::try_parse_from(["sim", "--plaintext", "--preconnect", "--no-preconnect"]).is_err()
        );
    }

    #[test]
    fn sim_file_sets_every_answer_and_flags_win() {
        let dir = tempdir("answers");
        let path = dir.join("answers.toml");
        std::fs::write(
            &path,
            "stream_headers = \"eager\"\nstale_start = \"clamp\"\npast_newest = \"empty\"\n\
             missing_user = \"omit\"\npreconnect = true\ndevice_latency_ms = 15\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let opts = options(&args(&["--devices", "2", "--config", p])).unwrap();
        assert_eq!(opts.model.policies, Policies::lenient());
        assert!(opts.model.preconnect);
        assert_eq!(opts.model.device_latency, Duration::from_millis(15));
        // No [[device]] in the file: the devices of --devices stay.
        assert_eq!(opts.model.devices.len(), 2);
        let opts = options(&args(&[
            "--config",
            p,
            "--stream-headers",
            "lazy",
            "--no-preconnect",
            "--device-latency-ms",
            "0",
        ]))
        .unwrap();
        assert_eq!(opts.model.policies.stream_headers, StreamHeaders::Lazy);
        assert_eq!(opts.model.policies.stale_start, StaleStart::Clamp);
        assert!(!opts.model.preconnect);
        assert_eq!(opts.model.device_latency, Duration::ZERO);

        std::fs::write(&path, "past_newest = \"clamp\"\n").unwrap();
        let err = options(&args(&["--config", p])).unwrap_err().to_string();
        assert!(
            err.contains("past_newest") && err.contains("clamp"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn policies_describe_themselves_in_command_words() {
        let text = describe(&Policies::default(), false, Duration::ZERO);
        for line in [
            "stream-headers lazy",
            "stale-start error",
            "past-newest error",
            "missing-user not-found",
            "preconnect off",
            "device-latency 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            // Each line is also a command that sets that answer.
            assert!(parse_command(line).unwrap().is_some(), "{line}");
        }
    }

    fn tempdir(what: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("usersync-simfile-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sim_file_is_strict() {
        let dir = tempdir("strict");
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
