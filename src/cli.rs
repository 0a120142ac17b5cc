//! Operator commands: what an operator of Suprema's example did through its
//! menu, as commands reading the daemon's configuration. Data output has a
//! `--json` form. No command ever prints a template, PIN or photo: users are
//! shown as counts and sizes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::events::codes;
use crate::gateway::{GatewayClient, GatewayError};
use crate::proto::gsdk::card::CsnCardData;
use crate::proto::gsdk::event::EventLog;
use crate::proto::gsdk::user::UserSetting;
use crate::proto::usersync::schema::{v16, v18};
use crate::store::{self, Store, StoreError};
use crate::supervisor::{self, DaemonError};
use crate::sync;
use crate::wire::Numbering;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
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
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn cannot_tell(path: &Path, source: &std::io::Error) -> String {
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot tell whether the daemon is running: permission denied on {}; run as the service user or with sudo",
            path.display()
        ),
        _ => format!(
            "cannot tell whether the daemon is running: {source} on {}; refusing to act",
            path.display()
        ),
    }
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

/// Pretty JSON for `--json` output.
pub fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `YYYY-MM-DD HH:MM:SSZ` for Unix seconds (civil-from-days, proleptic
/// Gregorian).
pub fn fmt_utc(secs: u64) -> String {
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
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// ---- status -------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct DeviceStatus {
    pub id: u32,
    pub role: String,
    pub state: String,
    pub detail: String,
    pub checkpoint: Option<u32>,
    pub newest_seen: Option<u32>,
    pub lag: Option<u32>,
    pub updated: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub group: String,
    pub target: u32,
    pub cursor: Option<u64>,
    pub behind: u64,
    pub reconcile_queued: u64,
    pub reconcile_requested: Option<String>,
    pub quarantined: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon_running: bool,
    pub state: String,
    pub devices: Vec<DeviceStatus>,
    pub targets: Vec<TargetStatus>,
    pub diverged: BTreeMap<String, String>,
}

/// Reads the state database; works whether the daemon runs or not.
pub fn status(config: &Config) -> Result<Status, CliError> {
    // Not knowing is said as such, not as "never ran".
    if let Err(source) = config.state_dir.try_exists() {
        return Err(CliError::CannotTell {
            path: config.state_dir.clone(),
            source,
        });
    }
    let st = Store::open_existing(&config.state_dir)?;
    let running = matches!(daemon(config)?, Daemon::Running);
    let (cps, devs, cursors, backlog, pending, quarantine, requests, diverged) = st.with(|c| {
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
                state: ds.map_or("unknown".into(), |d| d.state.clone()),
                detail: ds.map_or(String::new(), |d| d.detail.clone()),
                checkpoint: cp.map(|c| c.0),
                newest_seen: cp.and_then(|c| c.1),
                lag: cp.and_then(|c| c.1.map(|n| n.saturating_sub(c.0))),
                updated: ds.map(|d| fmt_utc(d.updated_at)),
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
                cursor: cursors.get(&g.name).and_then(|c| c.get(t).copied()),
                behind: backlog.get(&key).copied().unwrap_or(0),
                reconcile_queued: pending.get(&key).copied().unwrap_or(0),
                reconcile_requested: requests
                    .iter()
                    .find(|r| r.group == g.name && r.target == *t)
                    .map(|r| r.reason.clone()),
                quarantined: quarantine
                    .iter()
                    .filter(|q| q.group == g.name && q.device == *t)
                    .map(|q| format!("{} ({}: {})", q.user_id, q.code, q.message))
                    .collect(),
            });
        }
    }
    Ok(Status {
        daemon_running: running,
        state: st.path().display().to_string(),
        devices,
        targets,
        diverged,
    })
}

pub fn render_status(s: &Status) -> String {
    let mut out = format!(
        "daemon: {}\nstate:  {}\n\n{:<12} {:<7} {:<12} {:>10} {:>10} {:>6}  {}\n",
        if s.daemon_running {
            "running"
        } else {
            "stopped"
        },
        s.state,
        "DEVICE",
        "ROLE",
        "STATE",
        "CHECKPOINT",
        "NEWEST",
        "LAG",
        "UPDATED"
    );
    let opt = |v: Option<u32>| v.map_or("-".to_owned(), |v| v.to_string());
    for d in &s.devices {
        out.push_str(&format!(
            "{:<12} {:<7} {:<12} {:>10} {:>10} {:>6}  {}\n",
            d.id,
            d.role,
            d.state,
            opt(d.checkpoint),
            opt(d.newest_seen),
            opt(d.lag),
            d.updated.as_deref().unwrap_or("-")
        ));
    }
    out.push_str(&format!(
        "\n{:<12} {:<12} {:>8} {:>8} {:>10}  {}\n",
        "GROUP", "TARGET", "CURSOR", "PENDING", "RECONCILE", "QUARANTINED"
    ));
    for t in &s.targets {
        let reconcile = match (&t.reconcile_requested, t.reconcile_queued) {
            (Some(_), _) => "requested".to_owned(),
            (None, 0) => "-".to_owned(),
            (None, n) => format!("{n} queued"),
        };
        out.push_str(&format!(
            "{:<12} {:<12} {:>8} {:>8} {:>10}  {}\n",
            t.group,
            t.target,
            t.cursor.map_or("-".to_owned(), |c| c.to_string()),
            t.behind + t.reconcile_queued,
            reconcile,
            if t.quarantined.is_empty() {
                "-".to_owned()
            } else {
                t.quarantined.join(", ")
            }
        ));
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
    pub time: String,
    pub device: u32,
    pub user: String,
    pub code: String,
    pub sub_code: u32,
    pub description: String,
    pub changed_on_device: bool,
}

fn event_line(e: &EventLog) -> EventLine {
    EventLine {
        id: e.id,
        time: fmt_utc(u64::from(e.timestamp)),
        device: e.device_id,
        user: e.user_id.clone(),
        code: format!("0x{:04X}", e.event_code),
        sub_code: e.sub_code,
        description: codes::name(e.event_code, e.sub_code),
        changed_on_device: e.changed_on_device,
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
    let gw = client(config)?;
    let events = match since {
        Some(start) => gw.get_log(device, start, limit).await?,
        None => {
            // The newest event in O(log n) calls, then the page before it.
            let Some(newest) = crate::events::read::find_newest(&gw, device, None, None).await?
            else {
                return Ok(Vec::new());
            };
            let start = newest.id.saturating_sub(limit.saturating_sub(1)).max(1);
            let page = match gw.get_log(device, start, limit).await {
                Ok(page) => page,
                // Older than the oldest record (WIRE.md §5.4): the log is
                // shorter than `limit`; read it from its start.
                Err(e) if e.code() == Some(tonic::Code::OutOfRange) => {
                    gw.get_log(device, 0, limit).await?
                }
                Err(e) => return Err(e.into()),
            };
            page.into_iter().filter(|e| e.id <= newest.id).collect()
        }
    };
    Ok(events.iter().map(event_line).collect())
}

pub fn render_events(lines: &[EventLine]) -> String {
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
                l.time,
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
    let gw = client(config)?;
    match user {
        None => {
            let mut users = gw.user_ids(device).await?;
            users.sort();
            Ok(UsersOutput::List { device, users })
        }
        Some(id) => {
            let got = sync::get_users(&gw, device, vec![id.clone()]).await?;
            let rec = got
                .get(&id)
                .ok_or_else(|| CliError::Usage(format!("device {device} has no user {id}")))?;
            let s = summarize(&rec.raw, config.gateway.api.numbering())
                .map_err(|e| CliError::Usage(format!("user {id}: undecodable record: {e}")))?;
            Ok(UsersOutput::One(s))
        }
    }
}

pub fn render_users(o: &UsersOutput) -> String {
    match o {
        UsersOutput::List { device, users } => {
            let mut s = format!("{} users on device {device}\n", users.len());
            for u in users {
                s.push_str(&format!("  {u}\n"));
            }
            s
        }
        UsersOutput::One(u) => format!(
            "user {}\n  name:          {}\n  cards:         {}\n  fingers:       {}\n  faces:         {}\n  access groups: {:?}\n  PIN:           {}\n  photo:         {} bytes\n  record:        {} bytes{}\n",
            u.id,
            u.name,
            u.cards,
            u.fingers,
            u.faces,
            u.access_groups,
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

/// Waits for a card at `device` and enrolls `user` with it.
pub async fn enroll_card(
    config: &Config,
    device: u32,
    user: &str,
    name: Option<&str>,
    overwrite: bool,
) -> Result<String, CliError> {
    crate::sim::model::validate_user_id(user).map_err(CliError::Usage)?;
    let gw = client(config)?;
    eprintln!("place a card on device {device} …");
    let card = gw.card_scan(device).await?;
    let csn = card.csn_card_data.ok_or_else(|| {
        CliError::Usage(format!(
            "the card (type {}) carries no CSN; smart cards cannot be enrolled by this command",
            card.r#type
        ))
    })?;
    let raw = card_user(
        config.gateway.api.numbering(),
        user,
        name.unwrap_or(""),
        csn,
    );
    gw.user_enroll(device, vec![raw], overwrite).await?;
    Ok(format!(
        "enrolled user {user} with a card on device {device}; the daemon syncs it if the device is a source"
    ))
}

pub async fn delete(config: &Config, device: u32, user: &str) -> Result<String, CliError> {
    client(config)?
        .user_delete(device, vec![user.to_owned()])
        .await?;
    Ok(format!("deleted user {user} from device {device}"))
}

// ---- reconcile ----------------------------------------------------------------

#[derive(Debug, Serialize, Default)]
pub struct TargetPlan {
    pub group: String,
    pub target: u32,
    pub missing: Vec<String>,
    pub different: Vec<String>,
    pub extra: Vec<String>,
    pub prune: bool,
}

/// What a reconcile would do, read from the devices without changing them.
pub async fn reconcile_plan(
    config: &Config,
    group: Option<&str>,
    prune: bool,
) -> Result<Vec<TargetPlan>, CliError> {
    let gw = client(config)?;
    let groups: Vec<_> = config
        .groups
        .iter()
        .filter(|g| group.is_none_or(|n| n == g.name))
        .collect();
    if groups.is_empty() {
        return Err(CliError::Usage(format!(
            "no group {:?} in the configuration",
            group.unwrap_or("")
        )));
    }
    let mut plans = Vec::new();
    for g in groups {
        let sources = sync::source_users(&gw, &g.sources).await?;
        for t in &g.targets {
            let on_target: BTreeSet<String> = gw.user_ids(*t).await?.into_iter().collect();
            let all: Vec<(String, u32)> = sources.iter().map(|(u, s)| (u.clone(), *s)).collect();
            let mut cmp = sync::Comparison::default();
            for chunk in all.chunks(config.sync.batch_users) {
                let c = sync::compare(&gw, *t, &on_target, chunk.to_vec()).await?;
                cmp.missing.extend(c.missing);
                cmp.different.extend(c.different);
            }
            plans.push(TargetPlan {
                group: g.name.clone(),
                target: *t,
                missing: cmp.missing.into_iter().map(|(u, _)| u).collect(),
                different: cmp.different.into_iter().map(|(u, _)| u).collect(),
                extra: on_target
                    .into_iter()
                    .filter(|u| !sources.contains_key(u))
                    .collect(),
                prune: prune || g.prune,
            });
        }
    }
    Ok(plans)
}

pub fn render_plan(plans: &[TargetPlan]) -> String {
    let mut s = String::new();
    for p in plans {
        s.push_str(&format!(
            "group {} target {}: {} missing, {} different, {} extra{}\n",
            p.group,
            p.target,
            p.missing.len(),
            p.different.len(),
            p.extra.len(),
            if p.extra.is_empty() {
                ""
            } else if p.prune {
                " (would be deleted)"
            } else {
                " (kept: prune is off)"
            }
        ));
        for (what, users) in [("enroll", &p.missing), ("overwrite", &p.different)] {
            if !users.is_empty() {
                s.push_str(&format!("  {what}: {}\n", users.join(" ")));
            }
        }
        if p.prune && !p.extra.is_empty() {
            s.push_str(&format!("  delete: {}\n", p.extra.join(" ")));
        }
    }
    s
}

/// Reconciles: asks the running daemon (request rows it picks up within
/// its poll interval), or — with the daemon stopped — does it here,
/// holding the daemon lock so that none starts meanwhile.
pub async fn reconcile(
    config: &Config,
    group: Option<&str>,
    prune: bool,
) -> Result<String, CliError> {
    let _lock = match daemon(config)? {
        Daemon::Stopped(lock) => lock,
        Daemon::Running => return request_reconcile(config, group, prune),
    };
    reconcile_here(config, group, prune).await
}

/// Writes reconcile requests for the running daemon.
fn request_reconcile(
    config: &Config,
    group: Option<&str>,
    prune: bool,
) -> Result<String, CliError> {
    let st = Store::open_existing(&config.state_dir)?;
    let mut n = 0;
    for g in config
        .groups
        .iter()
        .filter(|g| group.is_none_or(|x| x == g.name))
    {
        for t in &g.targets {
            st.request_reconcile(&g.name, *t, "requested by the operator", prune || g.prune)?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(CliError::Usage(format!(
            "no group {:?} in the configuration",
            group.unwrap_or("")
        )));
    }
    Ok(format!(
        "reconcile of {n} target(s) requested from the running daemon; it starts within {}s (see `usersync status`)",
        config.sync.poll_interval.as_secs()
    ))
}

/// Reconciles from here; the caller holds the daemon lock.
async fn reconcile_here(
    config: &Config,
    group: Option<&str>,
    prune: bool,
) -> Result<String, CliError> {
    let plans = reconcile_plan(config, group, prune).await?;
    let gw = client(config)?;
    let mut done = String::new();
    for p in &plans {
        let g = config
            .group(&p.group)
            .ok_or_else(|| CliError::Usage(p.group.clone()))?;
        let sources = sync::source_users(&gw, &g.sources).await?;
        let write: Vec<String> = p.missing.iter().chain(&p.different).cloned().collect();
        let mut by_source: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for u in write {
            if let Some(s) = sources.get(&u) {
                by_source.entry(*s).or_default().push(u);
            }
        }
        let mut written = 0;
        for (s, ids) in by_source {
            for chunk in ids.chunks(config.sync.batch_users) {
                let recs = sync::get_users(&gw, s, chunk.to_vec()).await?;
                let raws: Vec<Vec<u8>> = recs.into_values().map(|r| r.raw).collect();
                written += raws.len();
                gw.user_enroll_multi(vec![p.target], raws, true).await?;
            }
        }
        let mut deleted = 0;
        if p.prune && !p.extra.is_empty() {
            gw.user_delete_multi(vec![p.target], p.extra.clone())
                .await?;
            deleted = p.extra.len();
        }
        done.push_str(&format!(
            "group {} target {}: {written} users written, {deleted} deleted\n",
            p.group, p.target
        ));
    }
    Ok(done)
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

/// Where the converted configuration points.
#[derive(Debug, Clone)]
pub struct ImportTarget {
    pub gateway: String,
    pub ca_file: String,
    pub state_dir: String,
    pub api: crate::wire::Api,
}

/// Converts the example's JSON into our TOML (a group "main": the
/// enrollment device as source, the others as targets).
pub fn import_text(example: &ExampleConfig, t: &ImportTarget) -> String {
    let mut s = format!(
        "# Converted from Suprema's sync example by `usersync import-config`.\n\n\
         [gateway]\naddress = \"{}\"\nca_file = \"{}\"\napi = \"{}\"\n\n[state]\ndir = \"{}\"\n\n",
        t.gateway, t.ca_file, t.api, t.state_dir
    );
    for d in std::iter::once(&example.enroll_device).chain(&example.devices) {
        s.push_str(&format!(
            "[[device]]\nid = {}\naddress = \"{}\"\nport = {}\ntls = {}\n\n",
            d.device_id, d.ip_addr, d.port, d.use_ssl
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

/// Converts `json`, validates the result and writes it to `output`; seeds
/// the checkpoints from `last_event_id` so nothing is replayed twice. The
/// checkpoints are the daemon's: a running daemon is refused, and the lock
/// is held while they are written.
pub fn import_config(json: &Path, output: &Path, t: &ImportTarget) -> Result<String, CliError> {
    let text = std::fs::read_to_string(json)
        .map_err(|e| CliError::Usage(format!("{}: {e}", json.display())))?;
    let example: ExampleConfig = serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{}: {e}", json.display())))?;
    let toml = import_text(&example, t);
    if output.exists() {
        return Err(CliError::Usage(format!(
            "{} exists; not overwriting it",
            output.display()
        )));
    }
    let config = crate::config::parse(output, &toml)
        .map_err(|e| CliError::Usage(format!("the converted configuration is invalid: {e}")))?;
    let Daemon::Stopped(_lock) = daemon(&config)? else {
        return Err(CliError::Usage(format!(
            "a usersync daemon is running on {}: stop it first (systemctl stop usersync); \
             import-config seeds the checkpoints it owns",
            config.state_dir.display()
        )));
    };
    std::fs::write(output, &toml)
        .map_err(|e| CliError::Usage(format!("{}: {e}", output.display())))?;
    let st = Store::open(&config.state_dir)?;
    let mut seeded = 0;
    for d in std::iter::once(&example.enroll_device).chain(&example.devices) {
        if d.last_event_id > 0 {
            st.set_checkpoint(d.device_id, d.last_event_id)?;
            seeded += 1;
        }
    }
    Ok(format!(
        "wrote {} ({} devices, 1 group); seeded {seeded} checkpoints in {}",
        output.display(),
        config.devices.len(),
        st.path().display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(fmt_utc(1_624_226_577), "2021-06-20 22:02:57Z");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00Z");
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
