//! `usersync status`: the daemon, the gateway, devices and targets as the
//! state database and the health file tell them, whether the daemon runs
//! or not (what a stopped daemon recorded is marked as last known).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::time::{rfc3339, unix_now};
use super::{CliError, Daemon, daemon, gateway_hint};
use crate::config::Config;
use crate::store::{self, QuarantineEntry, ReconcileRequest, ReconcileResult, Store};

mod multi;

pub use multi::{ClockStatus, ConflictStatus, MemberReconcile, MemberStatus, MultiMasterStatus};

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
    /// Multi-master groups: members, conflicts, echo detection, clocks.
    pub multi_master: Vec<MultiMasterStatus>,
    pub diverged: BTreeMap<String, String>,
}

/// What the daemon recorded per (group, device) it writes: one-way
/// targets and multi-master members alike.
struct Lanes {
    cursors: BTreeMap<String, BTreeMap<u32, u64>>,
    backlog: BTreeMap<(String, u32), u64>,
    pending: BTreeMap<(String, u32), u64>,
    quarantine: Vec<QuarantineEntry>,
    requests: Vec<ReconcileRequest>,
    results: Vec<ReconcileResult>,
}

impl Lanes {
    fn journal_seq(&self, group: &str, device: u32) -> Option<u64> {
        self.cursors
            .get(group)
            .and_then(|c| c.get(&device).copied())
    }

    fn behind(&self, group: &str, device: u32) -> u64 {
        self.backlog
            .get(&(group.to_owned(), device))
            .copied()
            .unwrap_or(0)
    }

    fn queued(&self, group: &str, device: u32) -> u64 {
        self.pending
            .get(&(group.to_owned(), device))
            .copied()
            .unwrap_or(0)
    }

    fn reconcile(&self, group: &str, device: u32) -> Option<ReconcileProgress> {
        self.requests
            .iter()
            .find(|r| r.group == group && r.target == device)
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
            })
    }

    fn result(&self, group: &str, device: u32) -> Option<&ReconcileResult> {
        self.results
            .iter()
            .find(|r| r.group == group && r.target == device)
    }

    fn quarantined(&self, group: &str, device: u32) -> Vec<String> {
        self.quarantine
            .iter()
            .filter(|q| q.group == group && q.device == device)
            .map(|q| format!("{} ({}: {})", q.user_id, q.code, q.message))
            .collect()
    }
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
    let (cps, devs, lanes, diverged, drift, multi_rows) = st.with(|c| {
        let mut cursors = BTreeMap::new();
        for g in &config.groups {
            cursors.insert(g.name.clone(), store::cursors(c, &g.name)?);
        }
        let lanes = Lanes {
            cursors,
            backlog: store::backlog(c)?,
            pending: store::pending_counts(c)?,
            quarantine: store::quarantine(c)?,
            requests: store::reconcile_requests(c)?,
            results: store::reconcile_results(c)?,
        };
        Ok((
            store::checkpoint_rows(c)?,
            store::device_statuses(c)?,
            lanes,
            store::diverged(c)?,
            store::target_drift(c)?,
            multi::read(c, config)?,
        ))
    })?;
    let devices = config
        .devices
        .keys()
        .map(|id| {
            let role = match (
                config.groups.iter().any(|g| g.sources.contains(id)),
                config.groups.iter().any(|g| g.targets.contains(id)),
                config.member_of(*id).is_some(),
            ) {
                (true, _, _) => "source",
                (false, true, _) => "target",
                (false, false, true) => "member",
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
            let name = g.name.as_str();
            targets.push(TargetStatus {
                group: g.name.clone(),
                target: *t,
                journal_seq: lanes.journal_seq(name, *t),
                behind: lanes.behind(name, *t),
                reconcile_queued: lanes.queued(name, *t),
                reconcile: lanes.reconcile(name, *t),
                last_reconcile: lanes.result(name, *t).map(|r| LastReconcile {
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
                quarantined: lanes.quarantined(name, *t),
            });
        }
    }
    let multi_master = multi::groups(config, multi_rows, &lanes);
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
        multi_master,
        diverged,
    })
}
