//! Operator commands: what an operator of Suprema's example did through its
//! menu, as commands reading the daemon's configuration. Data output has a
//! `--json` form (timestamps in RFC 3339). No command ever prints a
//! template, PIN or photo: users are shown as counts and sizes.
//!
//! The operator's edge: no command destroys data by surprise (adding a card
//! to a user keeps everything else the user has; a prune says how many
//! users it deletes and asks), and every error says what to do next
//! ([`describe`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::config::{Config, GroupConfig};
use crate::events::codes;
use crate::gateway::{GatewayClient, GatewayError};
use crate::proto::gsdk::card::CsnCardData;
use crate::proto::gsdk::event::EventLog;
use crate::proto::gsdk::user::UserSetting;
use crate::proto::usersync::schema::{v16, v18};
use crate::store::{self, Store, StoreError};
use crate::supervisor::{self, DaemonError};
use crate::sync;
use crate::wire::{EditError, MAX_CARDS, Numbering, NumberingFit};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// A call addressing one device failed.
    #[error("device {device}: {source}")]
    AtDevice { device: u32, source: GatewayError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Read(#[from] crate::events::read::ReadError),
    #[error("{0}")]
    Usage(String),
    #[error("{}", cannot_tell(path, source))]
    CannotTell {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no state yet in {}: the daemon has not run with {} — start it (`sudo systemctl start usersync`, \
         or `usersync run --config {}` in the foreground); `usersync status` shows the devices once it runs",
        dir.display(), config.display(), config.display()
    )]
    NoState { dir: PathBuf, config: PathBuf },
    /// Part of the work was done (`done`, for stdout), part not (`failed`).
    #[error("{failed}")]
    Incomplete { done: String, failed: String },
}

fn cannot_tell(path: &Path, source: &std::io::Error) -> String {
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot tell whether the daemon is running: permission denied on {}; run with sudo \
             (the state directory belongs to the service)",
            path.display()
        ),
        _ => format!(
            "cannot tell whether the daemon is running: {source} on {}; refusing to act",
            path.display()
        ),
    }
}

fn at(device: u32) -> impl FnOnce(GatewayError) -> CliError {
    move |source| CliError::AtDevice { device, source }
}

// ---- what to do next ------------------------------------------------------------

/// The message an operator sees for `e`: what went wrong in words, and the
/// next step where one is known (the gateway's own text follows as
/// `detail:`).
pub fn describe(e: &CliError, config: Option<&Config>) -> String {
    let (g, device) = match e {
        CliError::Gateway(g) => (g, None),
        CliError::AtDevice { device, source } => (source, Some(*device)),
        CliError::Read(crate::events::read::ReadError::Gateway(g)) => (g, None),
        _ => return e.to_string(),
    };
    let Some(config) = config else {
        return e.to_string();
    };
    match gateway_hint(&chain_text(g), is_transport(g), config, device) {
        // A transport failure is the gateway's, whatever device was asked.
        Some(hint) if is_transport(g) => format!("{hint}\n  detail: {g}"),
        Some(hint) => format!("{hint}\n  detail: {e}"),
        None => e.to_string(),
    }
}

/// A failure's text with every source in its chain (the transport's reason
/// sits in the sources, not in the status message).
fn chain_text(e: &GatewayError) -> String {
    let mut parts = vec![e.to_string()];
    let mut src: Option<&(dyn std::error::Error + 'static)> = match e {
        GatewayError::Rpc { status, .. } => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// A failure of the connection to the gateway itself (no answer from it),
/// rather than an answer about a device.
fn is_transport(e: &GatewayError) -> bool {
    match e {
        GatewayError::Rpc { status, .. } => std::error::Error::source(status).is_some(),
        GatewayError::Channel(_) => true,
        _ => false,
    }
}

/// The io reason inside a transport error's text, e.g. "Connection refused".
fn io_reason(text: &str) -> Option<&str> {
    [
        "Connection refused",
        "Connection reset by peer",
        "No route to host",
        "Network is unreachable",
        "timed out",
        "Name or service not known",
        "failed to lookup address information",
    ]
    .into_iter()
    .find(|r| text.contains(r))
}

/// The next step for a gateway failure, judged from its text (the daemon's
/// recorded errors have only their text).
pub fn gateway_hint(
    text: &str,
    transport: bool,
    config: &Config,
    device: Option<u32>,
) -> Option<String> {
    let addr = &config.gateway.address;
    let file = config.path.display();
    let ca = config
        .gateway
        .ca_file
        .as_ref()
        .map_or("(none)".to_owned(), |p| p.display().to_string());
    // Another CA's certificate: unknown issuer, or (same issuer name, other
    // key) a bad signature.
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        return Some(format!(
            "the gateway's certificate is not signed by ca_file {ca}: copy the CA certificate of the gateway \
             at {addr} (cert/ca.crt of its installation) to {ca}, or point [gateway] ca_file in {file} at it"
        ));
    }
    if text.contains("NotValidForName") || text.contains("not valid for name") {
        return Some(format!(
            "the gateway's certificate does not name the host usersync checks: set [gateway] server_name in \
             {file} to a name the certificate lists, or regenerate the certificate with that name"
        ));
    }
    if text.contains("tcp connect error") || text.contains("error trying to connect") {
        let why = io_reason(text).map_or(String::new(), |r| format!(" ({r})"));
        return Some(format!(
            "cannot connect to the gateway at {addr}{why}: check that the gateway runs and listens on that \
             address and port, and [gateway] address in {file}"
        ));
    }
    let transport = transport
        || text.contains("transport error")
        || text.contains("h2 protocol error")
        || text.contains("connection error");
    let plaintext = config.gateway.ca_pem.is_none();
    if transport && plaintext {
        return Some(format!(
            "the gateway at {addr} speaks TLS (it does not answer plaintext HTTP/2; real gateways always use \
             TLS): set tls = true and ca_file in [gateway] of {file}"
        ));
    }
    if transport
        && (text.contains("InvalidContentType")
            || text.contains("corrupt message")
            || text.contains("CorruptMessage"))
    {
        return Some(format!(
            "what answers at {addr} does not speak TLS: check [gateway] address in {file} (the gateway's gRPC \
             port, 4000 on a default installation)"
        ));
    }
    if text.contains("no answer within") {
        return Some(format!(
            "the gateway at {addr} did not answer in time ([gateway] call_timeout_secs in {file}); the gateway \
             or the device it relays to may be slow or overloaded: try again"
        ));
    }
    if let Some(d) = device
        && text.contains("(Unavailable)")
        && !transport
    {
        let where_ = config
            .devices
            .get(&d)
            .map_or(String::new(), |c| format!(" at {}:{}", c.address, c.port));
        return Some(format!(
            "device {d} is not connected to the gateway: the running daemon registers every configured device \
             (`usersync status` shows whether it runs and the device's state); check that the device is on and \
             reachable from the gateway{where_}"
        ));
    }
    None
}

/// Whether a daemon runs on the state directory. Writers of the state (and
/// of devices on the daemon's behalf) act only with [`Daemon::Stopped`],
/// holding its lock until they are done; when this process cannot tell,
/// it says so instead of guessing.
enum Daemon {
    Running,
    /// No daemon runs, and none can start while this lock is held.
    Stopped(std::fs::File),
}

/// Takes the daemon lock if it is free, making a missing state directory
/// (as the daemon would) to take it in.
fn daemon(config: &Config) -> Result<Daemon, CliError> {
    let dir = &config.state_dir;
    // Not `Path::exists`: it answers "no" for a directory this user may
    // not look into, which is how a daemon beside us was taken for none.
    match dir.try_exists() {
        Ok(true) => {}
        Ok(false) => store::prepare_dir(dir)?,
        Err(source) => {
            return Err(CliError::CannotTell {
                path: dir.clone(),
                source,
            });
        }
    }
    match supervisor::try_lock(dir) {
        Ok(Some(lock)) => Ok(Daemon::Stopped(lock)),
        Ok(None) => Ok(Daemon::Running),
        Err(DaemonError::Lock { path, source }) => Err(CliError::CannotTell { path, source }),
        Err(e) => Err(e.into()),
    }
}

fn client(config: &Config) -> Result<GatewayClient, CliError> {
    Ok(GatewayClient::new(&config.gateway.settings())?)
}

/// Refuses a device the configuration does not declare: the daemon never
/// registers it with the gateway, so the gateway would only say "not
/// connected".
fn configured(config: &Config, device: u32) -> Result<(), CliError> {
    if config.devices.contains_key(&device) {
        return Ok(());
    }
    let known: Vec<String> = config.devices.keys().map(u32::to_string).collect();
    Err(CliError::Usage(format!(
        "device {device} is not in the configuration {}: add a [[device]] with id = {device} (and \
         `systemctl reload usersync`), or use one of: {}",
        config.path.display(),
        if known.is_empty() {
            "(none)".to_owned()
        } else {
            known.join(" ")
        }
    )))
}

/// Pretty JSON for `--json` output.
pub fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// "1 user", "2 users".
pub fn plural(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// (date, time) of Unix seconds (civil-from-days, proleptic Gregorian).
fn civil(secs: u64) -> (String, String) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, (rem % 3600) / 60, rem % 60),
    )
}

/// `YYYY-MM-DD HH:MM:SSZ` for Unix seconds (text output).
pub fn fmt_utc(secs: u64) -> String {
    let (d, t) = civil(secs);
    format!("{d} {t}Z")
}

/// RFC 3339, `YYYY-MM-DDTHH:MM:SSZ` (JSON output).
pub fn rfc3339(secs: u64) -> String {
    let (d, t) = civil(secs);
    format!("{d}T{t}Z")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "12s", "4m", "3h", "2d".
pub fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// `2026-01-02 10:00:00Z (4m ago)`.
fn when(secs: u64, now: u64) -> String {
    format!("{} ({} ago)", fmt_utc(secs), age(now.saturating_sub(secs)))
}

// ---- status -------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct DaemonInfo {
    pub running: bool,
    pub pid: Option<u32>,
    pub started_at: Option<String>,
    /// When the daemon last recorded its health (at least every 30 s
    /// while it runs).
    pub last_seen: Option<String>,
    /// Set when it stopped in order; unset after a kill or a crash.
    pub stopped_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub address: String,
    /// `connecting`, `up`, `down`, or `unknown` (nothing recorded).
    pub state: String,
    pub since: Option<String>,
    /// Seconds in this state (as of `as_of` when not current).
    pub for_secs: Option<u64>,
    pub error: Option<String>,
    /// What to do about `error`.
    pub next_step: Option<String>,
    /// False: as last known by a daemon that is not running.
    pub current: bool,
    pub as_of: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeviceStatus {
    pub id: u32,
    pub role: String,
    /// `disconnected`, `catching-up`, `live`, `backoff` (the metrics'
    /// `phase` words), or `unknown`.
    pub state: String,
    /// False: as last known by a daemon that is not running.
    pub current: bool,
    pub detail: String,
    pub checkpoint: Option<u32>,
    pub newest_seen: Option<u32>,
    pub lag: Option<u32>,
    pub updated: Option<String>,
    pub age_secs: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ReconcileProgress {
    /// `requested` (not started yet) or `in progress`.
    pub state: String,
    pub reason: String,
    pub prune: bool,
    /// Users up to this ID (sorted) are done.
    pub after_user: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LastReconcile {
    pub finished_at: String,
    pub reason: String,
    pub missing: u64,
    pub different: u64,
    pub extra: u64,
    pub pruned: u64,
}

#[derive(Debug, Serialize)]
pub struct Drift {
    /// Users changed at the target itself since its last reconcile.
    pub changes: u64,
    pub last_user: String,
    pub last_at: String,
    /// The command that puts the sources' users back.
    pub fix: String,
}

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub group: String,
    pub target: u32,
    /// The last change-journal entry the target has applied (a sequence
    /// number of usersync's journal, not a device event ID).
    pub journal_seq: Option<u64>,
    /// Journal entries not applied yet.
    pub behind: u64,
    /// Users a reconcile queued for this target.
    pub reconcile_queued: u64,
    pub reconcile: Option<ReconcileProgress>,
    pub last_reconcile: Option<LastReconcile>,
    pub drift: Option<Drift>,
    pub quarantined: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon_running: bool,
    pub daemon: DaemonInfo,
    pub gateway: GatewayStatus,
    pub state: String,
    pub devices: Vec<DeviceStatus>,
    pub targets: Vec<TargetStatus>,
    pub diverged: BTreeMap<String, String>,
}

/// The state database's directory and file, or why status cannot read
/// them: not allowed (sudo), or not there yet (start the daemon).
fn state_present(config: &Config) -> Result<(), CliError> {
    let dir = &config.state_dir;
    let no_state = || CliError::NoState {
        dir: dir.clone(),
        config: config.path.clone(),
    };
    let cannot = |path: &Path, source| CliError::CannotTell {
        path: path.to_owned(),
        source,
    };
    match dir.try_exists() {
        Ok(true) => {}
        Ok(false) => return Err(no_state()),
        Err(e) => return Err(cannot(dir, e)),
    }
    // The directory may exist and be closed to this user (0700): then the
    // file's existence cannot be told either.
    if let Err(e) = std::fs::read_dir(dir) {
        return Err(cannot(dir, e));
    }
    match dir.join(store::DB_FILE).try_exists() {
        Ok(true) => Ok(()),
        Ok(false) => Err(no_state()),
        Err(e) => Err(cannot(dir, e)),
    }
}

/// Reads the state database; works whether the daemon runs or not. What a
/// daemon that is not running recorded is marked as last known, with its
/// age.
pub fn status(config: &Config) -> Result<Status, CliError> {
    state_present(config)?;
    let st = Store::open_existing(&config.state_dir)?;
    let running = matches!(daemon(config)?, Daemon::Running);
    let health = crate::service::read_health(&config.state_dir);
    let now = unix_now();
    #[allow(clippy::type_complexity)]
    let (cps, devs, cursors, backlog, pending, quarantine, requests, diverged, drift, results) = st
        .with(|c| {
            let mut cursors = BTreeMap::new();
            for g in &config.groups {
                cursors.insert(g.name.clone(), store::cursors(c, &g.name)?);
            }
            Ok((
                store::checkpoint_rows(c)?,
                store::device_statuses(c)?,
                cursors,
                store::backlog(c)?,
                store::pending_counts(c)?,
                store::quarantine(c)?,
                store::reconcile_requests(c)?,
                store::diverged(c)?,
                store::target_drift(c)?,
                store::reconcile_results(c)?,
            ))
        })?;
    let devices = config
        .devices
        .keys()
        .map(|id| {
            let role = match (
                config.groups.iter().any(|g| g.sources.contains(id)),
                config.groups.iter().any(|g| g.targets.contains(id)),
            ) {
                (true, _) => "source",
                (false, true) => "target",
                _ => "-",
            };
            let ds = devs.iter().find(|d| d.device == *id);
            let cp = cps.get(id);
            DeviceStatus {
                id: *id,
                role: role.into(),
                state: ds.map_or("unknown".into(), |d| {
                    crate::metrics::phase_of_state(&d.state).to_owned()
                }),
                current: running,
                detail: ds.map_or(String::new(), |d| d.detail.clone()),
                checkpoint: cp.map(|c| c.0),
                newest_seen: cp.and_then(|c| c.1),
                lag: cp.and_then(|c| c.1.map(|n| n.saturating_sub(c.0))),
                updated: ds.map(|d| rfc3339(d.updated_at)),
                age_secs: ds.map(|d| now.saturating_sub(d.updated_at)),
            }
        })
        .collect();
    let mut targets = Vec::new();
    for g in &config.groups {
        for t in &g.targets {
            let key = (g.name.clone(), *t);
            targets.push(TargetStatus {
                group: g.name.clone(),
                target: *t,
                journal_seq: cursors.get(&g.name).and_then(|c| c.get(t).copied()),
                behind: backlog.get(&key).copied().unwrap_or(0),
                reconcile_queued: pending.get(&key).copied().unwrap_or(0),
                reconcile: requests
                    .iter()
                    .find(|r| r.group == g.name && r.target == *t)
                    .map(|r| ReconcileProgress {
                        state: if r.after_user.is_some() {
                            "in progress"
                        } else {
                            "requested"
                        }
                        .into(),
                        reason: r.reason.clone(),
                        prune: r.prune,
                        after_user: r.after_user.clone(),
                    }),
                last_reconcile: results
                    .iter()
                    .find(|r| r.group == g.name && r.target == *t)
                    .map(|r| LastReconcile {
                        finished_at: rfc3339(r.finished_at),
                        reason: r.reason.clone(),
                        missing: r.missing,
                        different: r.different,
                        extra: r.extra,
                        pruned: r.pruned,
                    }),
                drift: drift
                    .iter()
                    .find(|d| d.group == g.name && d.target == *t && d.changes > 0)
                    .map(|d| Drift {
                        changes: d.changes,
                        last_user: d.last_user.clone(),
                        last_at: rfc3339(d.last_at),
                        fix: format!("usersync reconcile --group {} --target {t}", g.name),
                    }),
                quarantined: quarantine
                    .iter()
                    .filter(|q| q.group == g.name && q.device == *t)
                    .map(|q| format!("{} ({}: {})", q.user_id, q.code, q.message))
                    .collect(),
            });
        }
    }
    let gateway = match &health {
        Some(h) => GatewayStatus {
            address: config.gateway.address.clone(),
            state: h.gateway.state.clone(),
            since: Some(rfc3339(h.gateway.since)),
            for_secs: Some(
                if running { now } else { h.written_at }.saturating_sub(h.gateway.since),
            ),
            error: h.gateway.error.clone(),
            next_step: h
                .gateway
                .error
                .as_deref()
                .and_then(|e| gateway_hint(e, false, config, None)),
            current: running,
            as_of: Some(rfc3339(h.written_at)),
        },
        None => GatewayStatus {
            address: config.gateway.address.clone(),
            state: "unknown".into(),
            since: None,
            for_secs: None,
            error: None,
            next_step: None,
            current: running,
            as_of: None,
        },
    };
    Ok(Status {
        daemon_running: running,
        daemon: DaemonInfo {
            running,
            pid: health.as_ref().map(|h| h.pid),
            started_at: health.as_ref().map(|h| rfc3339(h.started_at)),
            last_seen: health.as_ref().map(|h| rfc3339(h.written_at)),
            stopped_at: health
                .as_ref()
                .and_then(|h| h.stopped_at)
                .filter(|_| !running)
                .map(rfc3339),
        },
        gateway,
        state: st.path().display().to_string(),
        devices,
        targets,
        diverged,
    })
}

/// Unix seconds of an RFC 3339 time this module wrote.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let (d, t) = s.strip_suffix('Z')?.split_once('T')?;
    let mut dp = d.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (dp.next()?.ok()?, dp.next()?.ok()?, dp.next()?.ok()?);
    let mut tp = t.split(':').map(|x| x.parse::<u64>());
    let (hh, mm, ss) = (tp.next()?.ok()?, tp.next()?.ok()?, tp.next()?.ok()?);
    // days-from-civil
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn text_time(rfc: &Option<String>, now: u64) -> String {
    rfc.as_deref()
        .and_then(parse_rfc3339)
        .map_or("-".to_owned(), |t| when(t, now))
}

pub fn render_status(s: &Status) -> String {
    let now = unix_now();
    let mut out = String::new();
    let d = &s.daemon;
    out.push_str(&if d.running {
        format!(
            "daemon:  running{}\n",
            match (d.pid, &d.started_at) {
                (Some(pid), Some(_)) => format!(
                    " (pid {pid}, started {})",
                    text_time(&d.started_at, now)
                ),
                _ => String::new(),
            }
        )
    } else {
        match (&d.stopped_at, &d.last_seen) {
            (Some(_), _) => format!("daemon:  stopped {}\n", text_time(&d.stopped_at, now)),
            (None, Some(_)) => format!(
                "daemon:  not running: last seen {}, with no orderly stop recorded (killed or crashed?) — \
                 `systemctl status usersync`, `journalctl -u usersync`\n",
                text_time(&d.last_seen, now)
            ),
            (None, None) => "daemon:  stopped\n".to_owned(),
        }
    });
    let g = &s.gateway;
    let state = match g.state.as_str() {
        "down" => "DOWN",
        other => other,
    };
    out.push_str(&format!("gateway: {} {state}", g.address));
    if g.since.is_some() {
        out.push_str(&format!(" since {}", text_time(&g.since, now)));
    }
    if !g.current && g.as_of.is_some() {
        out.push_str(&format!(
            " — last known, as of {}",
            text_time(&g.as_of, now)
        ));
    }
    out.push('\n');
    if let Some(e) = &g.error {
        out.push_str(&format!("         {e}\n"));
    }
    if let Some(n) = &g.next_step {
        out.push_str(&format!("         next: {n}\n"));
    }
    out.push_str(&format!("state:   {}\n\n", s.state));
    if !d.running && !s.devices.is_empty() {
        out.push_str("devices as last known (the daemon is not running):\n");
    }
    out.push_str(&format!(
        "{:<12} {:<7} {:<15} {:>10} {:>10} {:>6}  {}\n",
        "DEVICE", "ROLE", "STATE", "CHECKPOINT", "NEWEST", "LAG", "UPDATED"
    ));
    let opt = |v: Option<u32>| v.map_or("-".to_owned(), |v| v.to_string());
    for dv in &s.devices {
        let state = if dv.current || dv.state == "unknown" {
            dv.state.clone()
        } else {
            format!("was {}", dv.state)
        };
        out.push_str(&format!(
            "{:<12} {:<7} {:<15} {:>10} {:>10} {:>6}  {}\n",
            dv.id,
            dv.role,
            state,
            opt(dv.checkpoint),
            opt(dv.newest_seen),
            opt(dv.lag),
            text_time(&dv.updated, now)
        ));
    }
    out.push_str(&format!(
        "\n{:<12} {:<12} {:>11} {:>8} {:<12} {}\n",
        "GROUP", "TARGET", "JOURNAL-SEQ", "PENDING", "RECONCILE", "QUARANTINED"
    ));
    for t in &s.targets {
        let reconcile = match (&t.reconcile, t.reconcile_queued) {
            (Some(r), _) => r.state.clone(),
            (None, 0) => "-".to_owned(),
            (None, n) => format!("{n} queued"),
        };
        out.push_str(&format!(
            "{:<12} {:<12} {:>11} {:>8} {:<12} {}\n",
            t.group,
            t.target,
            t.journal_seq.map_or("-".to_owned(), |c| c.to_string()),
            t.behind + t.reconcile_queued,
            reconcile,
            if t.quarantined.is_empty() {
                "-".to_owned()
            } else {
                t.quarantined.join(", ")
            }
        ));
    }
    out.push_str(
        "JOURNAL-SEQ: the last entry of usersync's change journal the target has applied (not a device event ID)\n",
    );
    let results: Vec<&TargetStatus> = s
        .targets
        .iter()
        .filter(|t| t.last_reconcile.is_some() || t.reconcile.is_some())
        .collect();
    if !results.is_empty() {
        out.push_str("\nreconcile:\n");
        for t in results {
            if let Some(r) = &t.reconcile {
                out.push_str(&format!(
                    "  {}/{}: {} ({}{}){}\n",
                    t.group,
                    t.target,
                    r.state,
                    r.reason,
                    if r.prune { ", prune" } else { "" },
                    r.after_user
                        .as_ref()
                        .map_or(String::new(), |u| format!(", done up to user {u}"))
                ));
            }
            if let Some(r) = &t.last_reconcile {
                out.push_str(&format!(
                    "  {}/{}: last finished {}, {}: {} missing, {} different, {} extra, {} pruned\n",
                    t.group,
                    t.target,
                    text_time(&Some(r.finished_at.clone()), now),
                    r.reason,
                    r.missing,
                    r.different,
                    r.extra,
                    r.pruned
                ));
            }
        }
    }
    let drifting: Vec<&TargetStatus> = s.targets.iter().filter(|t| t.drift.is_some()).collect();
    if !drifting.is_empty() {
        out.push_str(
            "\ndrift (users changed at a target itself, which the daemon does not copy):\n",
        );
        for t in drifting {
            if let Some(d) = &t.drift {
                out.push_str(&format!(
                    "  {}/{}: {} since its last reconcile (last: user {} at {}); `{}` restores the sources' \
                     users there (add --prune to also delete users no source has)\n",
                    t.group,
                    t.target,
                    plural(d.changes, "user change"),
                    d.last_user,
                    text_time(&Some(d.last_at.clone()), now),
                    d.fix
                ));
            }
        }
    }
    for (g, why) in &s.diverged {
        out.push_str(&format!("\ngroup {g} diverged: {why}\n"));
    }
    out
}

// ---- events -------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct EventLine {
    pub id: u32,
    /// RFC 3339.
    pub time: String,
    pub device: u32,
    pub user: String,
    pub code: String,
    pub sub_code: u32,
    pub description: String,
    pub changed_on_device: bool,
    #[serde(skip)]
    timestamp: u64,
}

fn event_line(e: &EventLog) -> EventLine {
    EventLine {
        id: e.id,
        time: rfc3339(u64::from(e.timestamp)),
        device: e.device_id,
        user: e.user_id.clone(),
        code: format!("0x{:04X}", e.event_code),
        sub_code: e.sub_code,
        description: codes::name(e.event_code, e.sub_code),
        changed_on_device: e.changed_on_device,
        timestamp: u64::from(e.timestamp),
    }
}

/// Reads a device's log: from `since` (inclusive) if given, else its last
/// `limit` events.
pub async fn events(
    config: &Config,
    device: u32,
    since: Option<u32>,
    limit: u32,
) -> Result<Vec<EventLine>, CliError> {
    if limit == 0 {
        // maxNumOfLog = 0 asks the device for its whole log (WIRE.md B3).
        return Err(CliError::Usage(
            "--limit 0: give a number of events of at least 1 (0 would read the device's whole log)".into(),
        ));
    }
    configured(config, device)?;
    let gw = client(config)?;
    let events = match since {
        Some(start) => gw.get_log(device, start, limit).await.map_err(at(device))?,
        None => {
            // The newest event in O(log n) calls, then the page before it.
            let newest = match crate::events::read::find_newest(&gw, device, None, None).await {
                Ok(n) => n,
                Err(crate::events::read::ReadError::Gateway(e)) => return Err(at(device)(e)),
                Err(e) => return Err(e.into()),
            };
            let Some(newest) = newest else {
                return Ok(Vec::new());
            };
            let start = newest.id.saturating_sub(limit.saturating_sub(1)).max(1);
            let page = match gw.get_log(device, start, limit).await {
                Ok(page) => page,
                // Older than the oldest record (WIRE.md §5.4): the log is
                // shorter than `limit`; read it from its start.
                Err(e) if e.code() == Some(tonic::Code::OutOfRange) => {
                    gw.get_log(device, 0, limit).await.map_err(at(device))?
                }
                Err(e) => return Err(at(device)(e)),
            };
            page.into_iter().filter(|e| e.id <= newest.id).collect()
        }
    };
    Ok(events.iter().map(event_line).collect())
}

pub fn render_events(device: u32, since: Option<u32>, lines: &[EventLine]) -> String {
    if lines.is_empty() {
        return match since {
            Some(id) => format!("no events on device {device} from event {id} on\n"),
            None => format!("no events on device {device}: its log is empty\n"),
        };
    }
    lines
        .iter()
        .map(|l| {
            let user = if l.user.is_empty() {
                String::new()
            } else {
                format!(", User {}", l.user)
            };
            format!(
                "#{:<8} {}  Device {}{}, {}{}\n",
                l.id,
                fmt_utc(l.timestamp),
                l.device,
                user,
                l.description,
                if l.changed_on_device {
                    " (at the device)"
                } else {
                    ""
                }
            )
        })
        .collect()
}

// ---- users --------------------------------------------------------------------

/// A user as the operator sees it: no credential bytes, only counts and
/// sizes.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UserSummary {
    pub id: String,
    pub name: String,
    pub cards: usize,
    pub fingers: usize,
    pub faces: usize,
    pub access_groups: Vec<u32>,
    pub has_pin: bool,
    pub photo_bytes: usize,
    pub record_bytes: usize,
    pub disabled: Option<bool>,
}

/// The fields both numberings share (UserInfo numbers never changed).
macro_rules! summary {
    ($u:expr, $id:expr, $raw:expr, $disabled:expr) => {
        UserSummary {
            id: $id,
            name: $u.name,
            cards: $u.cards.len(),
            fingers: $u.fingers.len(),
            faces: $u.faces.len(),
            access_groups: $u.access_group_i_ds,
            has_pin: !$u.pin.is_empty(),
            photo_bytes: $u.photo.len(),
            record_bytes: $raw.len(),
            disabled: $disabled,
        }
    };
}

/// Summarises a raw record with the configured numbering.
pub fn summarize(raw: &[u8], numbering: Numbering) -> Result<UserSummary, String> {
    match numbering {
        Numbering::V18 => {
            let u = v18::UserInfo::decode(raw).map_err(|e| e.to_string())?;
            let hdr = u.hdr.clone().unwrap_or_default();
            Ok(summary!(u, hdr.id, raw, Some(hdr.user_flag & 0x80 != 0)))
        }
        Numbering::V16 => {
            let u = v16::UserInfo::decode(raw).map_err(|e| e.to_string())?;
            let id = u.hdr.clone().unwrap_or_default().id;
            Ok(summary!(u, id, raw, None))
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum UsersOutput {
    List { device: u32, users: Vec<String> },
    One(UserSummary),
}

pub async fn users(
    config: &Config,
    device: u32,
    user: Option<String>,
) -> Result<UsersOutput, CliError> {
    configured(config, device)?;
    let gw = client(config)?;
    match user {
        None => {
            let mut users = gw.user_ids(device).await.map_err(at(device))?;
            users.sort();
            Ok(UsersOutput::List { device, users })
        }
        Some(id) => {
            let got = sync::get_users(&gw, device, vec![id.clone()])
                .await
                .map_err(at(device))?;
            let rec = got.get(&id).ok_or_else(|| {
                CliError::Usage(format!(
                    "device {device} has no user {id} (`usersync users --device {device}` lists its users)"
                ))
            })?;
            let s = summarize(&rec.raw, config.gateway.api.numbering())
                .map_err(|e| CliError::Usage(format!("user {id}: undecodable record: {e}")))?;
            Ok(UsersOutput::One(s))
        }
    }
}

pub fn render_users(o: &UsersOutput) -> String {
    match o {
        UsersOutput::List { device, users } if users.is_empty() => {
            format!("no users on device {device}\n")
        }
        UsersOutput::List { device, users } => {
            let mut s = format!(
                "{} on device {device}\n",
                plural(u64::try_from(users.len()).unwrap_or(u64::MAX), "user")
            );
            for u in users {
                s.push_str(&format!("  {u}\n"));
            }
            s
        }
        UsersOutput::One(u) => format!(
            "user {}\n  name:          {}\n  cards:         {}\n  fingers:       {}\n  faces:         {}\n  access groups: {}\n  PIN:           {}\n  photo:         {} bytes\n  record:        {} bytes{}\n",
            u.id,
            u.name,
            u.cards,
            u.fingers,
            u.faces,
            if u.access_groups.is_empty() {
                "-".to_owned()
            } else {
                u.access_groups
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            if u.has_pin { "set" } else { "none" },
            u.photo_bytes,
            u.record_bytes,
            match u.disabled {
                Some(true) => "\n  status:        disabled",
                _ => "",
            }
        ),
    }
}

// ---- enroll / delete ----------------------------------------------------------

/// Builds a card user from scratch in the configured numbering (the only
/// place outside the simulator that encodes a user).
pub fn card_user(numbering: Numbering, id: &str, name: &str, card: CsnCardData) -> Vec<u8> {
    let setting = Some(UserSetting {
        biometric_auth_mode: 0xFF,
        card_auth_mode: 0xFF,
        id_auth_mode: 0xFF,
        face_auth_ext_mode: 0xFF,
        finger_auth_ext_mode: 0xFF,
        card_auth_ext_mode: 0xFF,
        id_auth_ext_mode: 0xFF,
        ..Default::default()
    });
    match numbering {
        Numbering::V18 => v18::UserInfo {
            hdr: Some(v18::UserHdr {
                id: id.to_owned(),
                num_of_card: 1,
                ..Default::default()
            }),
            setting,
            name: name.to_owned(),
            cards: vec![card],
            ..Default::default()
        }
        .encode_to_vec(),
        Numbering::V16 => v16::UserInfo {
            hdr: Some(v16::UserHdr {
                id: id.to_owned(),
                num_of_card: 1,
                ..Default::default()
            }),
            setting,
            name: name.to_owned(),
            cards: vec![card],
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

/// A warning for a write the CLI makes at a target: the daemon copies
/// changes from sources to targets only, so a change made at a target is
/// drift that the next reconcile of it judges.
pub fn target_warning(config: &Config, device: u32, what: TargetWrite) -> Option<String> {
    let g = config.groups.iter().find(|g| g.targets.contains(&device))?;
    let fix = format!("usersync reconcile --group {} --target {device}", g.name);
    let effect = match what {
        TargetWrite::Enroll => format!(
            "the user is on this device only (no source has it): it stays as an extra user, and `{fix} --prune` \
             deletes it"
        ),
        TargetWrite::AddCard => format!(
            "the card is added on this device only: if a source of the group has the user, the change is \
             undone by the next change of the user at a source or the next reconcile of the device (`{fix}`), \
             which write the source's record over it (add the card at a source to keep it); if no source has \
             the user, it stays as an extra user, and `{fix} --prune` deletes it"
        ),
        TargetWrite::Delete => format!(
            "if a source of the group has the user, the next reconcile of the device (`{fix}`) puts it back"
        ),
    };
    Some(format!(
        "warning: device {device} is a target of group {}: the daemon copies changes from the group's sources \
         ({}) to it, never from it; {effect}. `usersync status` counts this as drift. To change the group's \
         users, write to a source instead",
        g.name,
        g.sources
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// Counts a write the CLI made at a target as drift, for `usersync
/// status`: the daemon counts what is changed at the device itself, but the
/// CLI's writes go through the gateway as the daemon's own do
/// (`changedOnDevice` false, WIRE.md B13). Best effort: without a state
/// database (or the right to write it) the warning printed is all.
fn record_drift(config: &Config, device: u32, user: &str) {
    let groups: Vec<&str> = config
        .groups
        .iter()
        .filter(|g| g.targets.contains(&device))
        .map(|g| g.name.as_str())
        .collect();
    if groups.is_empty() || !matches!(config.state_dir.join(store::DB_FILE).try_exists(), Ok(true))
    {
        return;
    }
    let r = Store::open_existing(&config.state_dir).and_then(|st| {
        st.with(|c| {
            for g in &groups {
                store::record_target_change(c, g, device, user)?;
            }
            Ok(())
        })
    });
    if let Err(e) = r {
        eprintln!("warning: the change is not counted as drift in `usersync status`: {e}");
    }
}

/// What the CLI writes at a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetWrite {
    /// A new user.
    Enroll,
    /// A card added to an existing user (`enroll --overwrite`).
    AddCard,
    Delete,
}

/// What a user holds, in words ("2 fingers, 1 face, a PIN, a photo").
fn holdings(s: &UserSummary) -> String {
    let mut parts = vec![plural(s.cards as u64, "card")];
    if s.fingers > 0 {
        parts.push(plural(s.fingers as u64, "finger"));
    }
    if s.faces > 0 {
        parts.push(plural(s.faces as u64, "face"));
    }
    if s.has_pin {
        parts.push("a PIN".into());
    }
    if s.photo_bytes > 0 {
        parts.push("a photo".into());
    }
    if !s.access_groups.is_empty() {
        parts.push(plural(s.access_groups.len() as u64, "access group"));
    }
    if !s.name.is_empty() {
        parts.push(format!("name {:?}", s.name));
    }
    parts.join(", ")
}

/// Most characters a user's name may have (WIRE.md §2.3).
pub const MAX_NAME_CHARS: usize = 48;

/// Refuses a name the device cannot store.
fn check_name(name: &str) -> Result<(), CliError> {
    let n = name.chars().count();
    if n > MAX_NAME_CHARS {
        return Err(CliError::Usage(format!(
            "--name has {n} characters; a device stores at most {MAX_NAME_CHARS} (WIRE.md §2.3): shorten it; \
             nothing changed"
        )));
    }
    Ok(())
}

/// The field of the other numbering's header that numOfCard, written
/// with `numbering`, would land on.
fn clobbered(numbering: Numbering) -> &'static str {
    match numbering {
        // ≤V1.6 numOfCard is field 2: a V1.8 header's userFlag.
        Numbering::V16 => "userFlag — a disabled user would be enabled again —",
        // V1.8 numOfCard is field 3: a ≤V1.6 header's numOfFinger.
        Numbering::V18 => "numOfFinger",
    }
}

/// "If the gateway runs V1.8 or later, set api = "v1.8" in [gateway] of FILE".
fn set_api(config: &Config, n: Numbering) -> String {
    let runs = match n {
        Numbering::V16 => "V1.6 or earlier",
        Numbering::V18 => "V1.8 or later",
    };
    format!(
        "If the gateway runs {runs}, set api = \"{}\" in [gateway] of {}",
        n.api_name(),
        config.path.display()
    )
}

/// Why a user's record cannot get a card, in the operator's words, or
/// `None` if it can: it is readable, its header fits the configured
/// numbering (WIRE.md §1.3), and it holds fewer than [`MAX_CARDS`] cards.
fn uneditable(config: &Config, device: u32, user: &str, raw: &[u8], held: &str) -> Option<String> {
    let numbering = config.gateway.api.numbering();
    let file = config.path.display();
    let api = config.gateway.api;
    let cards = match crate::wire::raw_cards(raw) {
        Ok(c) => c.len(),
        Err(e) => {
            return Some(format!(
                "user {user} on device {device} has a record usersync cannot edit ({e}); nothing changed, \
                 rather than lose what it holds ({held})"
            ));
        }
    };
    let fit = match crate::wire::numbering_fit(raw) {
        Ok(f) => f,
        Err(e) => {
            return Some(format!(
                "user {user} on device {device} has a record usersync cannot edit ({e}); nothing changed, \
                 rather than lose what it holds ({held})"
            ));
        }
    };
    if !fit.allows(numbering) {
        let why = EditError::WrongNumbering { numbering, fit };
        let next = match fit {
            NumberingFit::Only(n) => set_api(config, n),
            _ => {
                "usersync cannot tell where its card count is: add the card at the device, or with \
                  BioStar"
                    .to_owned()
            }
        };
        return Some(format!(
            "user {user} on device {device}: {why}. Adding a card with api = \"{api}\" ([gateway] of {file}) \
             would write the card count over its {} and the daemon would copy the damaged record to every \
             target; nothing changed. {next}",
            clobbered(numbering)
        ));
    }
    if cards >= MAX_CARDS {
        return Some(format!(
            "user {user} on device {device} already has {MAX_CARDS} cards, the most a user may hold; \
             nothing changed"
        ));
    }
    None
}

/// Whether the gateway agrees with `[gateway] api` on the numbering of
/// user headers: the version `Admin.GetInfo` reports (when it can be read
/// and says), and — when `sample` (no record of the user itself decides)
/// — a few of the device's own records. Evidence against the configured
/// numbering refuses the write.
async fn check_numbering(
    config: &Config,
    gw: &GatewayClient,
    device: u32,
    sample: bool,
) -> Result<(), CliError> {
    let numbering = config.gateway.api.numbering();
    let api = config.gateway.api;
    let file = config.path.display();
    if let Ok(info) = gw.admin_get_info().await
        && let Some(n) = crate::wire::numbering_of_version(&info.version)
        && n != numbering
    {
        return Err(CliError::Usage(format!(
            "the gateway at {} reports version {:?}, whose user headers are numbered as api = \"{}\" ({}), \
             but [gateway] api in {file} is \"{api}\": a record written that way has its card count where \
             this gateway keeps {} and the daemon would copy it to every target (WIRE.md §1.3); nothing \
             changed. {}",
            config.gateway.address,
            info.version,
            n.api_name(),
            n.gateways(),
            clobbered(numbering),
            set_api(config, n)
        )));
    }
    if !sample {
        return Ok(());
    }
    // A handful of the device's records, each judged by its own counts.
    const SAMPLE: usize = 8;
    let mut ids = gw.user_ids(device).await.map_err(at(device))?;
    ids.sort();
    ids.truncate(SAMPLE);
    let got = sync::get_users(gw, device, ids).await.map_err(at(device))?;
    let (mut ours, mut other) = (0usize, 0usize);
    for rec in got.values() {
        match crate::wire::numbering_fit(&rec.raw) {
            Ok(NumberingFit::Only(n)) if n == numbering => ours += 1,
            Ok(NumberingFit::Only(_)) => other += 1,
            _ => {}
        }
    }
    if other > 0 && ours == 0 {
        let n = numbering.other();
        return Err(CliError::Usage(format!(
            "the users on device {device} are numbered as api = \"{}\" ({}: {other} of the {} records read fit \
             only that numbering), but [gateway] api in {file} is \"{api}\": a record written that way has its \
             card count where this gateway keeps {} and the daemon would copy it to every target (WIRE.md \
             §1.3); nothing changed. {}",
            n.api_name(),
            n.gateways(),
            got.len(),
            clobbered(numbering),
            set_api(config, n)
        )));
    }
    Ok(())
}

/// Waits for a card at `device` and enrolls `user` with it. Inputs are
/// checked before anyone is asked for a card: the device is configured, the
/// ID is valid, the name fits, and the user is absent unless `overwrite`.
/// With `overwrite`, an existing user gets the card *added*: its record is
/// read and written back with one more card, every other byte untouched
/// (fingers, faces, PIN, photo, access groups, fields unknown to usersync);
/// `name` renames it. Nothing else ever replaces a user's record. A record
/// whose header does not fit `[gateway] api` (or a gateway whose version
/// says another numbering) is refused, before the card and again after it
/// ([`uneditable`], [`check_numbering`]), as is a ninth card.
pub async fn enroll_card(
    config: &Config,
    device: u32,
    user: &str,
    name: Option<&str>,
    overwrite: bool,
) -> Result<String, CliError> {
    crate::sim::model::validate_user_id(user).map_err(CliError::Usage)?;
    if let Some(n) = name {
        check_name(n)?;
    }
    configured(config, device)?;
    let numbering = config.gateway.api.numbering();
    let gw = client(config)?;
    let read = |gw: GatewayClient| async move {
        sync::get_users(&gw, device, vec![user.to_owned()])
            .await
            .map(|mut m| m.remove(user))
            .map_err(at(device))
    };
    let existing = read(gw.clone()).await?;
    let held_by = |raw: &[u8]| {
        summarize(raw, numbering)
            .map(|s| holdings(&s))
            .unwrap_or_else(|e| format!("a record usersync cannot read: {e}"))
    };
    // Whether the user's own record tells the numbering apart; if not,
    // the device's other records are asked.
    let mut decided = false;
    if let Some(rec) = &existing {
        let held = held_by(&rec.raw);
        if !overwrite {
            return Err(CliError::Usage(format!(
                "user {user} already exists on device {device} ({held}); nothing changed. --overwrite adds the \
                 card to it and keeps everything else"
            )));
        }
        if let Some(why) = uneditable(config, device, user, &rec.raw, &held) {
            return Err(CliError::Usage(why));
        }
        decided = matches!(
            crate::wire::numbering_fit(&rec.raw),
            Ok(NumberingFit::Only(_))
        );
    }
    check_numbering(config, &gw, device, !decided).await?;
    let what = if existing.is_some() {
        TargetWrite::AddCard
    } else {
        TargetWrite::Enroll
    };
    if let Some(w) = target_warning(config, device, what) {
        eprintln!("{w}");
    }
    eprintln!("place a card on device {device} …");
    let card = gw.card_scan(device).await.map_err(at(device))?;
    let csn = card.csn_card_data.ok_or_else(|| {
        CliError::Usage(format!(
            "the card (type {}) carries no CSN; smart cards cannot be enrolled by this command",
            card.r#type
        ))
    })?;
    if existing.is_none() {
        let raw = card_user(numbering, user, name.unwrap_or(""), csn);
        gw.user_enroll(device, vec![raw], false)
            .await
            .map_err(at(device))?;
        record_drift(config, device, user);
        return Ok(format!(
            "enrolled user {user} with a card on device {device}{}",
            if config.is_source(device) {
                "; the daemon copies it to the group's targets"
            } else {
                ""
            }
        ));
    }
    // Read again: presenting the card took time, and the user may have
    // changed at the device meanwhile. Edit what is there now, after the
    // same checks.
    let Some(rec) = read(gw.clone()).await? else {
        return Err(CliError::Usage(format!(
            "user {user} was deleted from device {device} while waiting for the card; nothing written"
        )));
    };
    let card_bytes = csn.encode_to_vec();
    let cards = crate::wire::raw_cards(&rec.raw)
        .map_err(|e| CliError::Usage(format!("user {user}: {e}; nothing changed")))?;
    if cards.iter().any(|c| {
        CsnCardData::decode(c.as_slice())
            .is_ok_and(|c| c.data == csn.data && c.r#type == csn.r#type)
    }) {
        return Ok(format!(
            "user {user} on device {device} already has this card; nothing changed"
        ));
    }
    if let Some(why) = uneditable(config, device, user, &rec.raw, &held_by(&rec.raw)) {
        return Err(CliError::Usage(format!(
            "{why} (the user changed at the device while the card was awaited)"
        )));
    }
    let mut raw = crate::wire::add_card(&rec.raw, numbering, &card_bytes)
        .map_err(|e| CliError::Usage(format!("user {user}: {e}; nothing changed")))?;
    if let Some(n) = name {
        raw = crate::wire::set_name(&raw, n)
            .map_err(|e| CliError::Usage(format!("user {user}: {e}; nothing changed")))?;
    }
    gw.user_enroll(device, vec![raw.clone()], true)
        .await
        .map_err(at(device))?;
    record_drift(config, device, user);
    let held = summarize(&raw, numbering)
        .map(|s| holdings(&s))
        .unwrap_or_default();
    Ok(format!(
        "added a card to user {user} on device {device}; it now holds {held} (everything else kept){}",
        if config.is_source(device) {
            "; the daemon copies it to the group's targets"
        } else {
            ""
        }
    ))
}

/// The sources of `device`'s groups (when it is a target) that hold
/// `user`, or cannot say whether they do: (group, source, why not sure).
async fn sources_holding(
    config: &Config,
    gw: &GatewayClient,
    device: u32,
    user: &str,
) -> Vec<(String, u32, Option<String>)> {
    let mut out = Vec::new();
    for g in config.groups.iter().filter(|g| g.targets.contains(&device)) {
        for s in &g.sources {
            let answer = sync::fetch_users(gw, *s, vec![user.to_owned()]).await;
            let unsure = match answer.as_ref().map(|m| m.get(user)) {
                Ok(Some(sync::Fetched::Absent)) => continue,
                Ok(Some(sync::Fetched::Present(_) | sync::Fetched::HeldElsewhere(_))) => None,
                Ok(Some(sync::Fetched::Failed(why))) => {
                    Some(format!("its record there cannot be read: {why}"))
                }
                Ok(Some(sync::Fetched::Unknown) | None) => {
                    Some("the source could not say".to_owned())
                }
                Err(e) => Some(chain_text(e)),
            };
            out.push((g.name.clone(), *s, unsure));
        }
    }
    out
}

/// Deletes a user from a device. A user the device does not have is an
/// error (exit 1, "has no user … nothing deleted"): a mistyped ID must not
/// read as done. At a target whose group's source still holds the user
/// (or cannot say), it is refused unless `force`: the person would be
/// locked out there until a reconcile puts them back.
pub async fn delete(
    config: &Config,
    device: u32,
    user: &str,
    force: bool,
) -> Result<String, CliError> {
    configured(config, device)?;
    let gw = client(config)?;
    let not_there = || {
        CliError::Usage(format!(
            "device {device} has no user {user}: nothing deleted (`usersync users --device {device}` lists \
             its users)"
        ))
    };
    let found = sync::get_users(&gw, device, vec![user.to_owned()])
        .await
        .map_err(at(device))?;
    if !found.contains_key(user) {
        return Err(not_there());
    }
    let holding = sources_holding(config, &gw, device, user).await;
    if !holding.is_empty() {
        let (group, source, _) = &holding[0];
        let fix = format!("usersync reconcile --group {group} --target {device}");
        let whom: Vec<String> = holding
            .iter()
            .map(|(g, s, unsure)| match unsure {
                None => format!("source {s} of group {g} holds user {user}"),
                Some(why) => {
                    format!("cannot tell whether source {s} of group {g} holds user {user} ({why})")
                }
            })
            .collect();
        let effect = format!(
            "deleting it from target {device} locks the person out of device {device} until a reconcile \
             (`{fix}`) or the next change of user {user} at a source puts them back"
        );
        if !force {
            return Err(CliError::Usage(format!(
                "{}: {effect}; nothing deleted. To remove the person from the group, delete the user at the \
                 source (`usersync delete --device {source} --user {user}`); --force deletes it from device \
                 {device} anyway",
                whom.join("; ")
            )));
        }
        eprintln!("warning (--force): {}: {effect}", whom.join("; "));
    }
    if let Some(w) = target_warning(config, device, TargetWrite::Delete) {
        eprintln!("{w}");
    }
    match gw.user_delete(device, vec![user.to_owned()]).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(tonic::Code::NotFound) => return Err(not_there()),
        Err(e) => return Err(at(device)(e)),
    }
    record_drift(config, device, user);
    Ok(format!(
        "deleted user {user} from device {device}{}",
        if config.is_source(device) {
            "; the daemon deletes it from the group's targets"
        } else {
            ""
        }
    ))
}

// ---- reconcile ----------------------------------------------------------------

#[derive(Debug, Serialize, Default)]
pub struct TargetPlan {
    pub group: String,
    pub target: u32,
    pub missing: Vec<String>,
    pub different: Vec<String>,
    /// Users on the target that no source lists.
    pub extra: Vec<String>,
    /// Whether a prune was asked (`--prune`, or the group's `prune`).
    pub prune: bool,
    /// The extras a prune deletes: each confirmed absent at every source
    /// of the group (`User.Get`), not only missing from their lists.
    pub delete: Vec<String>,
    /// The extras a prune keeps, and why (a source holds it after all, or
    /// cannot say).
    pub kept: Vec<KeptUser>,
    /// Why no extra of this target is pruned although a prune was asked.
    pub prune_refused: Option<String>,
    /// Users of the group's sources that cannot be named (their `GetList`
    /// headers do not decode): neither copied nor judged.
    pub unreadable_at_sources: Vec<UnreadableHeaders>,
    /// The source each missing or different user is copied from.
    #[serde(skip)]
    from: BTreeMap<String, u32>,
}

impl TargetPlan {
    /// Whether this target's extras are pruned.
    fn prunes(&self) -> bool {
        self.prune && self.prune_refused.is_none()
    }
}

/// A user a reconcile leaves as it is on the target, and why.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct KeptUser {
    pub user: String,
    pub reason: String,
}

/// Headers of a source's `GetList` answer that do not decode.
#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct UnreadableHeaders {
    pub source: u32,
    pub headers: usize,
}

/// A target a reconcile could not handle (or not completely), why, and
/// what to do about it.
#[derive(Debug, Serialize)]
pub struct NotReconciled {
    pub group: String,
    pub target: u32,
    pub reason: String,
    pub next: String,
}

impl NotReconciled {
    /// A target that could not be read or written (or a source of its group).
    fn unreachable(group: &str, target: u32, reason: String) -> Self {
        NotReconciled {
            group: group.to_owned(),
            target,
            reason,
            next: format!(
                "run `usersync reconcile --group {group} --target {target}` once it can be reached"
            ),
        }
    }
}

/// What a reconcile would do: a plan per target it could read, and the
/// targets it could not (unreachable target, or a source of the group
/// unreachable: extras and differences are judged against every source).
#[derive(Debug, Serialize, Default)]
pub struct Plan {
    pub targets: Vec<TargetPlan>,
    pub not_reconciled: Vec<NotReconciled>,
}

impl Plan {
    /// (users, targets) a prune would delete.
    fn deletions(&self) -> (u64, u64) {
        let doomed = self
            .targets
            .iter()
            .filter(|p| p.prunes() && !p.delete.is_empty());
        let users: usize = doomed.clone().map(|p| p.delete.len()).sum();
        (users as u64, doomed.count() as u64)
    }
}

/// The groups and targets a reconcile addresses.
fn selection<'c>(
    config: &'c Config,
    group: Option<&str>,
    target: Option<u32>,
) -> Result<Vec<(&'c GroupConfig, Vec<u32>)>, CliError> {
    let groups: Vec<&GroupConfig> = config
        .groups
        .iter()
        .filter(|g| group.is_none_or(|n| n == g.name))
        .collect();
    if groups.is_empty() {
        let names: Vec<&str> = config.groups.iter().map(|g| g.name.as_str()).collect();
        return Err(CliError::Usage(match group {
            Some(g) => format!(
                "no group {g:?} in the configuration {}; its groups: {}",
                config.path.display(),
                if names.is_empty() {
                    "(none)".to_owned()
                } else {
                    names.join(" ")
                }
            ),
            None => format!("the configuration {} has no group", config.path.display()),
        }));
    }
    let Some(t) = target else {
        return Ok(groups.into_iter().map(|g| (g, g.targets.clone())).collect());
    };
    configured(config, t)?;
    let picked: Vec<(&GroupConfig, Vec<u32>)> = groups
        .iter()
        .filter(|g| g.targets.contains(&t))
        .map(|g| (*g, vec![t]))
        .collect();
    if picked.is_empty() {
        let what = match config.groups.iter().find(|g| g.sources.contains(&t)) {
            Some(g) => format!(
                "device {t} is a source of group {}, not a target: a reconcile writes targets only",
                g.name
            ),
            None => format!(
                "device {t} is not a target of {}",
                group.map_or("any group".to_owned(), |g| format!("group {g}"))
            ),
        };
        return Err(CliError::Usage(what));
    }
    Ok(picked)
}

/// Why a device could not be read, for a plan's `not_reconciled`; a
/// gateway that cannot be reached at all is the whole command's error.
fn unreachable(e: GatewayError, device: u32, config: &Config) -> Result<String, CliError> {
    if is_transport(&e) {
        return Err(CliError::Gateway(e));
    }
    let text = chain_text(&e);
    Ok(match gateway_hint(&text, false, config, Some(device)) {
        Some(h) => format!("{h} ({text})"),
        None => text,
    })
}

/// What the sources of a group list.
struct SourceLists {
    /// Every listed user, with the first source that lists it.
    users: BTreeMap<String, u32>,
    unreadable: Vec<UnreadableHeaders>,
    /// Sources that list no user at all.
    empty: Vec<u32>,
}

impl SourceLists {
    /// Why a prune of the group must not run, judged from the lists: a
    /// user the lists cannot name, or a source with no user at all (reset,
    /// or a wrong answer), would make every user it holds look like one no
    /// source has.
    fn prune_refusal(&self, group: &str, allow_empty: bool) -> Option<String> {
        let mut why: Vec<String> = self
            .unreadable
            .iter()
            .map(|u| {
                format!(
                    "source {} lists {} that cannot be read (those users are neither copied nor judged, and a \
                     prune could delete users it still holds); refusing to prune group {group} (repair or \
                     re-enroll those users at the source)",
                    u.source,
                    plural(u.headers as u64, "user header")
                )
            })
            .collect();
        if !allow_empty {
            why.extend(self.empty.iter().map(|s| {
                format!(
                    "source {s} lists no users, so a prune would delete every user of the target; refusing to \
                     prune group {group} (if the group is meant to be empty, rerun with --allow-empty-source)"
                )
            }));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Reads the list of every source of `g`; the first that cannot be read
/// is the error.
async fn read_sources(
    gw: &GatewayClient,
    g: &GroupConfig,
) -> Result<SourceLists, (u32, GatewayError)> {
    let mut out = SourceLists {
        users: BTreeMap::new(),
        unreadable: Vec::new(),
        empty: Vec::new(),
    };
    for s in &g.sources {
        let list = gw.user_ids_checked(*s).await.map_err(|e| (*s, e))?;
        if list.unreadable > 0 {
            out.unreadable.push(UnreadableHeaders {
                source: *s,
                headers: list.unreadable,
            });
        }
        if list.ids.is_empty() && list.unreadable == 0 {
            out.empty.push(*s);
        }
        for id in list.ids {
            out.users.entry(id).or_insert(*s);
        }
    }
    Ok(out)
}

/// Asks every source of a group, record by record, about `users` (extras:
/// no source lists them): (absent at every source, kept and why). Only an
/// answer of "absent" from every source lets a user be deleted; a record
/// that cannot be read, a source that holds it after all or cannot be
/// asked keeps it.
async fn confirm_absent(
    config: &Config,
    gw: &GatewayClient,
    sources: &[u32],
    users: Vec<String>,
) -> (Vec<String>, Vec<KeptUser>) {
    let mut open = users;
    let mut kept = Vec::new();
    for s in sources {
        let mut still = Vec::new();
        for chunk in open.chunks(config.sync.batch_users.max(1)) {
            let answers = match sync::fetch_users(gw, *s, chunk.to_vec()).await {
                Ok(a) => a,
                Err(e) => {
                    let why = chain_text(&e);
                    kept.extend(chunk.iter().map(|u| KeptUser {
                        user: u.clone(),
                        reason: format!(
                            "source {s} could not be asked whether it holds it ({why})"
                        ),
                    }));
                    continue;
                }
            };
            for u in chunk {
                let reason = match answers.get(u) {
                    Some(sync::Fetched::Absent) => {
                        still.push(u.clone());
                        continue;
                    }
                    Some(sync::Fetched::Present(_) | sync::Fetched::HeldElsewhere(_)) => {
                        format!("source {s} holds it (its list did not show it)")
                    }
                    Some(sync::Fetched::Failed(why)) => {
                        format!("its record at source {s} cannot be read ({why})")
                    }
                    Some(sync::Fetched::Unknown) | None => {
                        format!("source {s} could not say whether it holds it")
                    }
                };
                kept.push(KeptUser {
                    user: u.clone(),
                    reason,
                });
            }
        }
        open = still;
        if open.is_empty() {
            break;
        }
    }
    (open, kept)
}

/// What a reconcile would do, read from the devices without changing them.
pub async fn reconcile_plan(
    config: &Config,
    group: Option<&str>,
    target: Option<u32>,
    prune: bool,
    allow_empty_source: bool,
) -> Result<Plan, CliError> {
    let picked = selection(config, group, target)?;
    let gw = client(config)?;
    plan(config, &gw, &picked, prune, allow_empty_source).await
}

async fn plan(
    config: &Config,
    gw: &GatewayClient,
    picked: &[(&GroupConfig, Vec<u32>)],
    prune: bool,
    allow_empty_source: bool,
) -> Result<Plan, CliError> {
    let mut out = Plan::default();
    for (g, targets) in picked {
        let lists = match read_sources(gw, g).await {
            Ok(l) => l,
            Err((s, e)) => {
                let why = format!(
                    "source {s} cannot be read, and a reconcile judges against every source of the group: {}",
                    unreachable(e, s, config)?
                );
                for t in targets {
                    out.not_reconciled
                        .push(NotReconciled::unreachable(&g.name, *t, why.clone()));
                }
                continue;
            }
        };
        let prune = prune || g.prune;
        let refusal = prune
            .then(|| lists.prune_refusal(&g.name, allow_empty_source))
            .flatten();
        for t in targets {
            match plan_target(config, gw, g, *t, &lists, prune, refusal.clone()).await {
                Ok(p) => out.targets.push(p),
                Err(e) => out.not_reconciled.push(NotReconciled::unreachable(
                    &g.name,
                    *t,
                    format!("target unreachable: {}", unreachable(e, *t, config)?),
                )),
            }
        }
    }
    Ok(out)
}

async fn plan_target(
    config: &Config,
    gw: &GatewayClient,
    g: &GroupConfig,
    t: u32,
    lists: &SourceLists,
    prune: bool,
    prune_refused: Option<String>,
) -> Result<TargetPlan, GatewayError> {
    let sources = &lists.users;
    let on_target: BTreeSet<String> = gw.user_ids(t).await?.into_iter().collect();
    let all: Vec<(String, u32)> = sources.iter().map(|(u, s)| (u.clone(), *s)).collect();
    let mut cmp = sync::Comparison::default();
    for chunk in all.chunks(config.sync.batch_users) {
        let c = sync::compare(gw, t, &on_target, chunk.to_vec()).await?;
        cmp.missing.extend(c.missing);
        cmp.different.extend(c.different);
    }
    let from = cmp
        .missing
        .iter()
        .chain(&cmp.different)
        .map(|(u, s)| (u.clone(), *s))
        .collect();
    let extra: Vec<String> = on_target
        .into_iter()
        .filter(|u| !sources.contains_key(u))
        .collect();
    let (delete, kept) = if prune && prune_refused.is_none() && !extra.is_empty() {
        confirm_absent(config, gw, &g.sources, extra.clone()).await
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(TargetPlan {
        group: g.name.clone(),
        target: t,
        missing: cmp.missing.into_iter().map(|(u, _)| u).collect(),
        different: cmp.different.into_iter().map(|(u, _)| u).collect(),
        extra,
        prune,
        delete,
        kept,
        prune_refused,
        unreadable_at_sources: lists.unreadable.clone(),
        from,
    })
}

fn not_reconciled_text(plan: &Plan) -> String {
    plan.not_reconciled
        .iter()
        .map(|n| {
            format!(
                "not reconciled: group {} target {}: {}; {}\n",
                n.group, n.target, n.reason, n.next
            )
        })
        .collect()
}

fn kept_text(kept: &[KeptUser]) -> String {
    kept.iter()
        .map(|k| format!("{} ({})", k.user, k.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn render_plan(plan: &Plan) -> String {
    let mut s = String::new();
    for p in &plan.targets {
        s.push_str(&format!(
            "group {} target {}: {} missing, {} different, {} extra{}\n",
            p.group,
            p.target,
            p.missing.len(),
            p.different.len(),
            p.extra.len(),
            if p.extra.is_empty() {
                String::new()
            } else if !p.prune {
                " (kept: prune is off)".to_owned()
            } else if p.prune_refused.is_some() {
                " (kept: prune refused)".to_owned()
            } else if p.kept.is_empty() {
                " (would be deleted)".to_owned()
            } else {
                format!(
                    " ({} would be deleted, {} kept)",
                    p.delete.len(),
                    p.kept.len()
                )
            }
        ));
        for (what, users) in [("enroll", &p.missing), ("overwrite", &p.different)] {
            if !users.is_empty() {
                s.push_str(&format!("  {what}: {}\n", users.join(" ")));
            }
        }
        if !p.extra.is_empty() {
            match (&p.prune_refused, p.prune) {
                (_, false) => s.push_str(&format!(
                    "  keep (no source has them; --prune deletes them): {}\n",
                    p.extra.join(" ")
                )),
                (Some(why), true) => s.push_str(&format!(
                    "  keep (prune refused: {why}): {}\n",
                    p.extra.join(" ")
                )),
                (None, true) => {
                    if !p.delete.is_empty() {
                        s.push_str(&format!("  delete: {}\n", p.delete.join(" ")));
                    }
                    if !p.kept.is_empty() {
                        s.push_str(&format!(
                            "  keep (no source lists them, but not every source says it lacks them): {}\n",
                            kept_text(&p.kept)
                        ));
                    }
                }
            }
        }
        for u in &p.unreadable_at_sources {
            s.push_str(&format!(
                "  source {} lists {} that cannot be read: those users are neither copied nor judged\n",
                u.source,
                plural(u.headers as u64, "user header")
            ));
        }
    }
    s
}

/// Asks before a prune deletes users: on a terminal, the operator types
/// `yes`; elsewhere only `--yes` confirms.
async fn confirm_prune(plan: &Plan, yes: bool) -> Result<(), CliError> {
    let (users, targets) = plan.deletions();
    if users == 0 || yes {
        return Ok(());
    }
    let list: String = plan
        .targets
        .iter()
        .filter(|p| p.prunes() && !p.delete.is_empty())
        .map(|p| {
            format!(
                "  group {} target {}: {}\n",
                p.group,
                p.target,
                p.delete.join(" ")
            )
        })
        .collect();
    let what = format!(
        "this reconcile deletes {} from {} (users no source of the group has):\n{list}",
        plural(users, "user"),
        plural(targets, "target")
    );
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(CliError::Usage(format!(
            "{what}nothing changed: confirm with --yes (there is no terminal to ask on), or review with \
             --dry-run --prune"
        )));
    }
    eprint!("{what}type yes to delete them: ");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| CliError::Usage(e.to_string()))?
    .map_err(|e| CliError::Usage(format!("cannot read the answer: {e}")))?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(CliError::Usage("not confirmed; nothing changed".into()))
    }
}

/// Reconciles: asks the running daemon (request rows it picks up within
/// its poll interval), or — with the daemon stopped — does it here,
/// holding the daemon lock so that none starts meanwhile. Each reachable
/// target is reconciled; unreachable ones are reported (exit 1). A prune
/// that deletes users is confirmed first ([`confirm_prune`]); a prune the
/// sources' lists cannot bear out (a header that cannot be read, a source
/// with no user unless `allow_empty_source`) is refused, here and as a
/// request to the daemon.
pub async fn reconcile(
    config: &Config,
    group: Option<&str>,
    target: Option<u32>,
    prune: bool,
    yes: bool,
    allow_empty_source: bool,
) -> Result<String, CliError> {
    let picked = selection(config, group, target)?;
    let prunes = picked.iter().any(|(g, _)| prune || g.prune);
    let lock = match daemon(config)? {
        Daemon::Stopped(lock) => lock,
        Daemon::Running => {
            if prunes {
                // Count what the daemon's prune would delete now.
                let gw = client(config)?;
                match plan(config, &gw, &picked, prune, allow_empty_source).await {
                    Ok(p) => {
                        let refused: Vec<String> = p
                            .targets
                            .iter()
                            .filter_map(|t| {
                                t.prune_refused.as_ref().map(|why| {
                                    format!("group {} target {}: {why}", t.group, t.target)
                                })
                            })
                            .collect();
                        if !refused.is_empty() {
                            return Err(CliError::Usage(format!(
                                "{}; nothing requested from the running daemon",
                                refused.join("; ")
                            )));
                        }
                        confirm_prune(&p, yes).await?;
                    }
                    // The daemon's prune waits for every source to be live.
                    Err(_) if yes => {}
                    Err(e) => {
                        return Err(CliError::Usage(format!(
                            "cannot count the users a prune would delete ({}); nothing requested: retry when \
                             the devices can be read, or confirm with --yes",
                            describe(&e, Some(config))
                        )));
                    }
                }
            }
            return request_reconcile(config, &picked, prune);
        }
    };
    let gw = client(config)?;
    let p = plan(config, &gw, &picked, prune, allow_empty_source).await?;
    confirm_prune(&p, yes).await?;
    let r = reconcile_here(config, &gw, p, allow_empty_source).await;
    drop(lock);
    r
}

/// Writes reconcile requests for the running daemon, one per target.
fn request_reconcile(
    config: &Config,
    picked: &[(&GroupConfig, Vec<u32>)],
    prune: bool,
) -> Result<String, CliError> {
    let st = Store::open_existing(&config.state_dir)?;
    let mut lines = Vec::new();
    let mut n = 0u64;
    for (g, targets) in picked {
        for t in targets {
            st.request_reconcile(&g.name, *t, "requested by the operator", prune || g.prune)?;
            n += 1;
        }
        lines.push(format!(
            "group {}: {}",
            g.name,
            targets
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    Ok(format!(
        "reconcile of {} requested from the running daemon ({}); it starts within {} s, once every source of \
         the group is live — `usersync status` shows its progress and result",
        plural(n, "target"),
        lines.join("; "),
        config.sync.poll_interval.as_secs()
    ))
}

/// What writing one target's plan did.
#[derive(Debug, Default)]
struct Written {
    written: u64,
    deleted: u64,
    /// Missing or different users not written, and why (their source
    /// record cannot be read, say): the target keeps what it has.
    not_written: Vec<KeptUser>,
    /// Extras the prune kept, and why.
    kept: Vec<KeptUser>,
    /// Why the prune did not run although asked.
    prune_refused: Option<String>,
}

impl Written {
    /// What keeps the target from counting as reconciled, in words.
    fn problems(&self, p: &TargetPlan) -> Vec<String> {
        let mut out = Vec::new();
        if !self.not_written.is_empty() {
            out.push(format!(
                "{} not copied, the target keeps what it has: {}",
                plural(self.not_written.len() as u64, "source user"),
                kept_text(&self.not_written)
            ));
        }
        if !self.kept.is_empty() {
            out.push(format!(
                "{} kept: {}",
                plural(self.kept.len() as u64, "extra user"),
                kept_text(&self.kept)
            ));
        }
        if let Some(why) = &self.prune_refused {
            out.push(format!("no user deleted: {why}"));
        }
        // A refused prune names them already.
        let unnamed = if self.prune_refused.is_some() {
            &[][..]
        } else {
            &p.unreadable_at_sources[..]
        };
        for u in unnamed {
            out.push(format!(
                "source {} lists {} that cannot be read: those users were neither copied nor judged",
                u.source,
                plural(u.headers as u64, "user header")
            ));
        }
        out
    }
}

/// Reconciles from here; the caller holds the daemon lock. Each target
/// of the plan is written on its own: one that fails is reported, the
/// others are done. A target is recorded as reconciled (for `usersync
/// status`, when the state database exists) only if nothing was left
/// undone: a user not copied because its source record cannot be read,
/// an extra kept, a refused prune make it "not reconciled" (exit 1).
async fn reconcile_here(
    config: &Config,
    gw: &GatewayClient,
    mut plan: Plan,
    allow_empty_source: bool,
) -> Result<String, CliError> {
    let mut done = String::new();
    let mut results = Vec::new();
    for p in &plan.targets {
        match write_target(config, gw, p, allow_empty_source).await {
            Ok(w) => {
                let problems = w.problems(p);
                let extras_kept = p.extra.len() as u64 - w.deleted;
                done.push_str(&format!(
                    "group {} target {}: {} written, {} deleted{}\n",
                    p.group,
                    p.target,
                    plural(w.written, "user"),
                    w.deleted,
                    if !p.prune && !p.extra.is_empty() {
                        format!(
                            " ({} kept: no source has them; --prune deletes them)",
                            plural(p.extra.len() as u64, "extra user")
                        )
                    } else if p.prune && extras_kept > 0 {
                        format!(" ({} kept)", plural(extras_kept, "extra user"))
                    } else {
                        String::new()
                    }
                ));
                if problems.is_empty() {
                    results.push(store::ReconcileResult {
                        group: p.group.clone(),
                        target: p.target,
                        reason: "run by the operator (daemon stopped)".into(),
                        finished_at: unix_now(),
                        missing: p.missing.len() as u64,
                        different: p.different.len() as u64,
                        extra: p.extra.len() as u64,
                        pruned: w.deleted,
                    });
                } else {
                    plan.not_reconciled.push(NotReconciled {
                        group: p.group.clone(),
                        target: p.target,
                        reason: problems.join("; "),
                        next: format!(
                            "the rest is done; rerun `usersync reconcile --group {} --target {}` once that is \
                             resolved",
                            p.group, p.target
                        ),
                    });
                }
            }
            Err(e) => plan.not_reconciled.push(NotReconciled::unreachable(
                &p.group,
                p.target,
                match unreachable(e, p.target, config) {
                    Ok(why) => why,
                    Err(e) => describe(&e, Some(config)),
                },
            )),
        }
    }
    if !results.is_empty()
        && let Ok(true) = config.state_dir.join(store::DB_FILE).try_exists()
    {
        let recorded = Store::open_existing(&config.state_dir).and_then(|st| {
            st.with(|c| {
                for r in &results {
                    store::record_reconcile_result(c, r)?;
                }
                Ok(())
            })
        });
        if let Err(e) = recorded {
            eprintln!("warning: the result is not recorded for `usersync status`: {e}");
        }
    }
    if plan.not_reconciled.is_empty() {
        Ok(done)
    } else {
        Err(CliError::Incomplete {
            done,
            failed: not_reconciled_text(&plan),
        })
    }
}

/// Writes one target's plan. Source records are read again, user by
/// user: one that cannot be read is not copied and is reported, never
/// skipped silently. The prune's deletions are confirmed again right
/// before they are made (the operator may have taken a while to confirm):
/// the sources' lists are read again, and each user must still be absent
/// at every source.
async fn write_target(
    config: &Config,
    gw: &GatewayClient,
    p: &TargetPlan,
    allow_empty_source: bool,
) -> Result<Written, GatewayError> {
    let mut out = Written {
        kept: p.kept.clone(),
        prune_refused: p.prune_refused.clone().filter(|_| p.prune),
        ..Written::default()
    };
    let mut by_source: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for u in p.missing.iter().chain(&p.different) {
        if let Some(s) = p.from.get(u) {
            by_source.entry(*s).or_default().push(u.clone());
        }
    }
    for (s, ids) in by_source {
        for chunk in ids.chunks(config.sync.batch_users) {
            let answers = sync::fetch_users(gw, s, chunk.to_vec()).await?;
            let mut raws = Vec::new();
            for u in chunk {
                let reason = match answers.get(u) {
                    Some(sync::Fetched::Present(r)) => {
                        raws.push(r.raw.clone());
                        continue;
                    }
                    Some(sync::Fetched::Absent) => format!("source {s} no longer holds it"),
                    Some(sync::Fetched::HeldElsewhere(o)) => format!("source {o} holds it"),
                    Some(sync::Fetched::Failed(why)) => {
                        format!("its record at source {s} cannot be read ({why})")
                    }
                    Some(sync::Fetched::Unknown) | None => {
                        format!("source {s} could not say whether it holds it")
                    }
                };
                out.not_written.push(KeptUser {
                    user: u.clone(),
                    reason,
                });
            }
            if !raws.is_empty() {
                out.written += raws.len() as u64;
                gw.user_enroll_multi(vec![p.target], raws, true).await?;
            }
        }
    }
    if !p.prunes() || p.delete.is_empty() {
        return Ok(out);
    }
    let Some(g) = config.groups.iter().find(|g| g.name == p.group) else {
        out.prune_refused = Some(format!("group {} is no longer configured", p.group));
        return Ok(out);
    };
    let lists = match read_sources(gw, g).await {
        Ok(l) => l,
        Err((s, e)) => {
            out.prune_refused = Some(format!(
                "source {s} cannot be read now to confirm the deletions ({})",
                chain_text(&e)
            ));
            return Ok(out);
        }
    };
    if let Some(why) = lists.prune_refusal(&g.name, allow_empty_source) {
        out.prune_refused = Some(why);
        return Ok(out);
    }
    let (unlisted, listed): (Vec<String>, Vec<String>) = p
        .delete
        .iter()
        .cloned()
        .partition(|u| !lists.users.contains_key(u));
    out.kept.extend(listed.into_iter().map(|u| KeptUser {
        reason: format!(
            "source {} lists it now",
            lists.users.get(&u).copied().unwrap_or_default()
        ),
        user: u,
    }));
    let (delete, kept) = confirm_absent(config, gw, &g.sources, unlisted).await;
    out.kept.extend(kept);
    if !delete.is_empty() {
        gw.user_delete_multi(vec![p.target], delete.clone()).await?;
        out.deleted = delete.len() as u64;
    }
    Ok(out)
}

/// The text a dry run prints, and the error for targets it could not read.
pub fn plan_outcome(plan: &Plan, as_json: bool) -> Result<String, CliError> {
    let text = if as_json {
        json(plan)
    } else {
        render_plan(plan)
    };
    if plan.not_reconciled.is_empty() {
        Ok(text)
    } else {
        Err(CliError::Incomplete {
            done: text,
            failed: not_reconciled_text(plan),
        })
    }
}

// ---- import-config ------------------------------------------------------------

/// Suprema's sync example configuration (`sync_config.json`).
#[derive(Debug, Deserialize)]
pub struct ExampleConfig {
    pub enroll_device: ExampleDevice,
    #[serde(default)]
    pub devices: Vec<ExampleDevice>,
}

#[derive(Debug, Deserialize)]
pub struct ExampleDevice {
    pub device_id: u32,
    pub ip_addr: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub use_ssl: bool,
    #[serde(default)]
    pub last_event_id: u32,
}

fn default_port() -> u16 {
    51211
}

/// Where the converted configuration points. Paths are as the operator
/// gave them; [`import_config`] resolves them against the current
/// directory.
#[derive(Debug, Clone)]
pub struct ImportTarget {
    pub gateway: String,
    pub ca_file: PathBuf,
    pub state_dir: PathBuf,
    pub api: crate::wire::Api,
}

/// TOML text of a string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Converts the example's JSON into our TOML (a group "main": the
/// enrollment device as source, the others as targets). `ca_file` and
/// `state_dir` are written as given (absolute, from [`import_config`]).
pub fn import_text(example: &ExampleConfig, t: &ImportTarget) -> String {
    let mut s = format!(
        "# Converted from Suprema's sync example by `usersync import-config`.\n\
         # Every key is explained in /usr/share/doc/usersync/README.md (Configure).\n\n\
         [gateway]\naddress = {}\nca_file = {}\napi = {}\n\n[state]\ndir = {}\n\n",
        toml_str(&t.gateway),
        toml_str(&t.ca_file.display().to_string()),
        toml_str(t.api.as_str()),
        toml_str(&t.state_dir.display().to_string())
    );
    for d in std::iter::once(&example.enroll_device).chain(&example.devices) {
        s.push_str(&format!(
            "[[device]]\nid = {}\naddress = {}\nport = {}\ntls = {}\n\n",
            d.device_id,
            toml_str(&d.ip_addr),
            d.port,
            d.use_ssl
        ));
    }
    let targets: Vec<String> = example
        .devices
        .iter()
        .map(|d| d.device_id.to_string())
        .collect();
    s.push_str(&format!(
        "[[group]]\nname = \"main\"\nsources = [{}]\ntargets = [{}]\n",
        example.enroll_device.device_id,
        targets.join(", ")
    ));
    s
}

/// The JSON key at (1-based) `line` and `column` of `text`: the last
/// `"key":` before the column on that line.
fn json_key_at(text: &str, line: usize, column: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    // The column counts bytes and may fall inside a character.
    let mut end = column.min(l.len());
    while !l.is_char_boundary(end) {
        end -= 1;
    }
    let upto = &l[..end];
    let colon = upto.rfind(':')?;
    let before = upto[..colon].trim_end().strip_suffix('"')?;
    let start = before.rfind('"')?;
    Some(before[start + 1..].to_owned())
}

/// Checks the example's devices as the configuration will: every problem
/// is named by its place in the JSON.
fn check_example(json: &Path, example: &ExampleConfig) -> Result<(), CliError> {
    let err = |place: String, reason: String| {
        Err(CliError::Usage(format!(
            "{}: {place}: {reason}; nothing written",
            json.display()
        )))
    };
    if example.devices.is_empty() {
        return err(
            "devices".into(),
            "is empty: the group needs at least one device to copy users to".into(),
        );
    }
    let mut seen: BTreeMap<u32, String> = BTreeMap::new();
    let places = std::iter::once(("enroll_device".to_owned(), &example.enroll_device)).chain(
        example
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("devices[{i}]"), d)),
    );
    for (place, d) in places {
        if d.device_id == 0 {
            return err(
                format!("{place}.device_id"),
                "must not be 0 (a device ID is a whole number between 1 and 4294967295)".into(),
            );
        }
        if let Some(first) = seen.insert(d.device_id, place.clone()) {
            return err(
                format!("{place}.device_id"),
                format!(
                    "device {} is also {first}: a device is listed once (the enrollment device is the \
                     source, the others are targets)",
                    d.device_id
                ),
            );
        }
        if d.ip_addr.trim().is_empty() {
            return err(format!("{place}.ip_addr"), "is empty".into());
        }
        if let Err(reason) = crate::config::check_device_host(&d.ip_addr) {
            // Said in the JSON's terms.
            let reason = reason
                .replace("write address = ", "write \"ip_addr\": ")
                .replace(" and port = ", " and \"port\": ");
            return Err(CliError::Usage(format!(
                "{}: {place}.ip_addr {:?} {reason}; nothing written",
                json.display(),
                d.ip_addr
            )));
        }
        if d.port == 0 {
            return err(
                format!("{place}.port"),
                "must be a port between 1 and 65535".into(),
            );
        }
    }
    Ok(())
}

/// Why this user cannot write in `dir`, in words with the next step.
fn unwritable(flag: &str, path: &Path, dir: &Path, e: &std::io::Error) -> CliError {
    let why = match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "directory {} does not exist (create it, or pass {flag} with another path)",
            dir.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "this user may not write in {} (run it with sudo, or pass {flag} with a path of yours)",
            dir.display()
        ),
        _ => format!("cannot write in {}: {e}", dir.display()),
    };
    CliError::Usage(format!("{flag} {}: {why}; nothing written", path.display()))
}

/// Converts `json` and writes it to `output`, seeding the checkpoints from
/// `last_event_id` so nothing is replayed twice — all or nothing: the JSON,
/// the flags, the CA, the output's directory and the state directory are
/// checked first; the file appears (created beside it, then linked into
/// place, never over an existing file) in the same step as the seeded
/// checkpoints are committed. Relative paths (`json`, `--ca-file`,
/// `--output`, `--state-dir`) are relative to the current directory. The
/// checkpoints are the daemon's: a running daemon is refused, and its lock
/// is held meanwhile; a device that already has a checkpoint keeps it (the
/// output says so).
pub fn import_config(json: &Path, output: &Path, t: &ImportTarget) -> Result<String, CliError> {
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::Usage(format!("cannot tell the current directory: {e}")))?;
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            cwd.join(p)
        }
    };
    // The output first: where it goes decides whether anything else matters.
    let output = abs(output);
    match output.try_exists() {
        Ok(true) => {
            return Err(CliError::Usage(format!(
                "--output {}: exists; not overwriting it (move it aside, or pass --output with a new path)",
                output.display()
            )));
        }
        Ok(false) => {}
        Err(e) => {
            return Err(unwritable(
                "--output",
                &output,
                output.parent().unwrap_or(Path::new("/")),
                &e,
            ));
        }
    }
    let out_dir = output.parent().unwrap_or(Path::new("/")).to_owned();
    if let Err(e) = rustix::fs::access(
        &out_dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    ) {
        return Err(unwritable(
            "--output",
            &output,
            &out_dir,
            &std::io::Error::from(e),
        ));
    }

    // The JSON.
    let json_abs = abs(json);
    let text = std::fs::read_to_string(&json_abs).map_err(|e| {
        CliError::Usage(format!(
            "{}: cannot read: {e}{}",
            json.display(),
            if json.is_relative() {
                format!(" (relative to the current directory {})", cwd.display())
            } else {
                String::new()
            }
        ))
    })?;
    let example: ExampleConfig = serde_json::from_str(&text).map_err(|e| {
        let key = json_key_at(&text, e.line(), e.column());
        let msg = e.to_string();
        let msg = msg
            .rsplit_once(" at line ")
            .map_or(msg.as_str(), |(m, _)| m);
        CliError::Usage(format!(
            "{}:{}:{}: {}; nothing written",
            json.display(),
            e.line(),
            e.column(),
            crate::config::in_words(msg, key.as_deref())
        ))
    })?;
    check_example(json, &example)?;

    // The flags.
    if let Err(reason) = crate::config::check_host_port(&t.gateway) {
        return Err(CliError::Usage(format!(
            "--gateway {:?}: {reason}; nothing written",
            t.gateway
        )));
    }
    let ca = abs(&t.ca_file);
    let pem = std::fs::read(&ca).map_err(|e| {
        CliError::Usage(format!(
            "--ca-file {}: cannot read {}: {e}; copy the gateway's CA certificate (cert/ca.crt of its \
             installation) there, or pass --ca-file with its path (relative paths are relative to the \
             current directory); nothing written",
            t.ca_file.display(),
            ca.display()
        ))
    })?;
    crate::config::check_ca(&pem).map_err(|reason| {
        CliError::Usage(format!(
            "--ca-file {}: {reason}; nothing written",
            ca.display()
        ))
    })?;
    let state_dir = abs(&t.state_dir);
    let resolved = ImportTarget {
        gateway: t.gateway.clone(),
        ca_file: ca,
        state_dir: state_dir.clone(),
        api: t.api,
    };
    let toml = import_text(&example, &resolved);
    let config = crate::config::parse(&output, &toml).map_err(|e| {
        CliError::Usage(format!(
            "{}: the converted configuration is invalid: {} (a bug in the conversion: please report it \
             with the JSON); nothing written",
            json.display(),
            e.reason
        ))
    })?;
    if let Err(e) = crate::config::check_runnable(&config) {
        let why = match &e {
            crate::config::Unrunnable::Config(c) => c.reason.clone(),
            other => other.to_string(),
        };
        let sudo = if why.contains("Permission denied") {
            " (run it with sudo, or pass --state-dir with a directory of yours)"
        } else {
            ""
        };
        return Err(CliError::Usage(format!(
            "--state-dir {}: {}{sudo}; nothing written",
            state_dir.display(),
            why.split(" (the systemd unit").next().unwrap_or(&why)
        )));
    }

    // Everything checked: the daemon's lock, then file and checkpoints.
    let Daemon::Stopped(_lock) = daemon(&config)? else {
        return Err(CliError::Usage(format!(
            "a usersync daemon is running on {}: stop it first (systemctl stop usersync); \
             import-config seeds the checkpoints it owns; nothing written",
            config.state_dir.display()
        )));
    };
    let tmp = out_dir.join(format!(
        ".{}.import-{}",
        output
            .file_name()
            .map_or("usersync.toml".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let written = write_new(&tmp, &toml).and_then(|()| {
        let st = Store::open(&config.state_dir)?;
        let seeded = st.with(|c| {
            let tx = c.transaction()?;
            let mut seeded = Seeded::default();
            for d in std::iter::once(&example.enroll_device).chain(&example.devices) {
                if d.last_event_id == 0 {
                    continue;
                }
                // The daemon's own progress is newer knowledge than the
                // example's: replacing it could skip events it has not
                // handled (or replay handled ones).
                if let Some(at) = store::checkpoint(&tx, d.device_id)? {
                    seeded.kept.push((d.device_id, at, d.last_event_id));
                    continue;
                }
                store::set_checkpoint(&tx, d.device_id, d.last_event_id)?;
                seeded.set += 1;
            }
            // The file appears only if it is still new, just before the
            // commit; a commit that fails takes it away again.
            std::fs::hard_link(&tmp, &output).map_err(|source| StoreError::Dir {
                path: output.clone(),
                source,
            })?;
            if let Err(e) = tx.commit() {
                let _ = std::fs::remove_file(&output);
                return Err(e.into());
            }
            Ok(seeded)
        })?;
        Ok((seeded, st.path().to_owned()))
    });
    let _ = std::fs::remove_file(&tmp);
    let (seeded, db) = written.map_err(|e| match e {
        StoreError::Dir { path, source } if path == output => {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::Usage(format!(
                    "--output {}: appeared meanwhile; not overwriting it; nothing written",
                    output.display()
                ))
            } else {
                unwritable("--output", &output, &out_dir, &source)
            }
        }
        other => CliError::Store(other),
    })?;
    let kept: String = seeded
        .kept
        .iter()
        .map(|(device, at, example)| {
            format!(
                "device {device} already has a checkpoint in {} (event {at}): kept, its last_event_id {example} \
                 not used (replacing it could skip events the daemon has not handled yet)\n",
                db.display()
            )
        })
        .collect();
    Ok(format!(
        "wrote {} ({}, 1 group); seeded {} in {}\n{kept}next: `sudo usersync check-config --config {}`, then \
         `sudo systemctl start usersync`",
        output.display(),
        plural(config.devices.len() as u64, "device"),
        plural(seeded.set, "checkpoint"),
        db.display(),
        output.display()
    ))
}

/// What import-config did to the checkpoints.
#[derive(Debug, Default)]
struct Seeded {
    set: u64,
    /// (device, its checkpoint, the example's last_event_id): devices that
    /// already had a checkpoint, kept.
    kept: Vec<(u32, u32, u32)>,
}

/// Creates `path` (which must not exist) with `text`, mode 0644 (the
/// service's user reads it), synced to disk.
fn write_new(path: &Path, text: &str) -> Result<(), StoreError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| StoreError::Dir {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(fmt_utc(1_624_226_577), "2021-06-20 22:02:57Z");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(rfc3339(1_624_226_577), "2021-06-20T22:02:57Z");
        for t in [0, 951_782_400, 1_624_226_577, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(age(59), "59s");
        assert_eq!(age(61), "1m");
        assert_eq!(age(7200), "2h");
        assert_eq!(plural(1u64, "user"), "1 user");
        assert_eq!(plural(2u64, "user"), "2 users");
        assert_eq!(plural(0u64, "target"), "0 targets");
    }

    #[test]
    fn json_errors_name_their_key() {
        let text = "{\n  \"enroll_device\": {\"device_id\": \"x\", \"ip_addr\": \"a\"}\n}";
        let e = serde_json::from_str::<ExampleConfig>(text).unwrap_err();
        assert_eq!(
            json_key_at(text, e.line(), e.column()).as_deref(),
            Some("device_id")
        );
    }

    /// Finding 5: serde_json's column counts bytes; inside a multi-byte
    /// character it must not panic.
    #[test]
    fn json_errors_inside_a_character_do_not_panic() {
        for text in [
            "{\"enroll_device\": é}",
            "{\"enroll_device\": {\"ip_addr\": \"ü\", \"device_id\": ñ}}",
            "é",
        ] {
            let e = serde_json::from_str::<ExampleConfig>(text).unwrap_err();
            for column in 0..=text.len() + 1 {
                let _ = json_key_at(text, e.line(), column);
            }
            let _ = json_key_at(text, e.line(), e.column());
        }
        let text = "{\"enroll_device\": é}";
        let e = serde_json::from_str::<ExampleConfig>(text).unwrap_err();
        assert_eq!(
            json_key_at(text, e.line(), e.column()).as_deref(),
            Some("enroll_device")
        );
    }

    #[test]
    fn names_longer_than_a_device_stores_are_refused() {
        assert!(check_name(&"é".repeat(MAX_NAME_CHARS)).is_ok());
        let e = check_name(&"é".repeat(MAX_NAME_CHARS + 1)).unwrap_err();
        assert!(e.to_string().contains("has 49 characters"), "{e}");
    }

    /// Finding 2: the lists alone refuse a prune when a source has a
    /// header that cannot be read, or lists nobody (unless allowed).
    #[test]
    fn a_prune_is_refused_when_the_lists_cannot_bear_it_out() {
        let lists = |unreadable: usize, empty: bool| SourceLists {
            users: if empty {
                BTreeMap::new()
            } else {
                [("1".to_owned(), 7)].into()
            },
            unreadable: if unreadable > 0 {
                vec![UnreadableHeaders {
                    source: 7,
                    headers: unreadable,
                }]
            } else {
                Vec::new()
            },
            empty: if empty { vec![7] } else { Vec::new() },
        };
        assert_eq!(lists(0, false).prune_refusal("g", false), None);
        let why = lists(2, false).prune_refusal("g", true).unwrap();
        assert!(
            why.contains("source 7 lists 2 user headers that cannot be read"),
            "{why}"
        );
        let why = lists(0, true).prune_refusal("g", false).unwrap();
        assert!(
            why.contains("source 7 lists no users") && why.contains("--allow-empty-source"),
            "{why}"
        );
        assert_eq!(lists(0, true).prune_refusal("g", true), None);
    }

    #[test]
    fn summaries_show_counts_never_bytes() {
        for n in [Numbering::V16, Numbering::V18] {
            let raw = crate::sim::users::generate("42", 1, n, Default::default());
            let s = summarize(&raw, n).unwrap();
            assert_eq!(
                (s.id.as_str(), s.cards, s.fingers, s.faces),
                ("42", 1, 2, 1)
            );
            assert!(s.has_pin);
            let text = render_users(&UsersOutput::One(s));
            assert!(text.contains("fingers:       2"), "{text}");
        }
    }

    #[test]
    fn card_users_use_the_right_numbering() {
        let card = crate::sim::users::scanned_card(7);
        let raw = card_user(Numbering::V16, "9", "Ann", card.clone());
        assert_eq!(summarize(&raw, Numbering::V16).unwrap().cards, 1);
        let raw = card_user(Numbering::V18, "9", "Ann", card);
        let u = v18::UserInfo::decode(raw.as_slice()).unwrap();
        assert_eq!(u.hdr.unwrap().num_of_card, 1);
        assert_eq!(crate::wire::peek_user_id(&raw).unwrap(), "9");
    }
}
