//! systemd integration: `READY=1` once config and state are loaded,
//! `RELOADING=1` around a reload, `STOPPING=1`, a one-line `STATUS=` an
//! operator understands, and `WATCHDOG=1` only while the main loop and the
//! event consumer make progress. Without `NOTIFY_SOCKET` every call is a
//! no-op, so tests and foreground runs need nothing. The process is made
//! non-dumpable at start: the watchdog's SIGABRT must not leave the user
//! records in memory (templates, PINs) in a core file.
//!
//! The daemon's own health (the gateway session, since when) lives in its
//! memory; the notifier also writes it to `health.json` in the state
//! directory, so `usersync status`, another process, can tell it — and,
//! after the daemon stopped, tell it as last known.
//!
//! [`signals`] answers the daemon's signals: stop, abandon, reload (the
//! reload protocol around `RELOADING=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::device::{Board, Phase};
use crate::store::{self, Store};

pub mod signals;

pub use signals::{Reload, Shutdown};

/// The gateway session as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayHealth {
    Starting,
    Up,
    Down { error: String, retry_at: Instant },
}

/// Shared liveness of the daemon, written by the supervisor and the
/// consumer, read by the notifier.
#[derive(Debug)]
pub struct Health {
    /// tokio's clock, so tests can run the watchdog decision in paused time.
    epoch: tokio::time::Instant,
    gateway: Mutex<GatewayHealth>,
    main_beat: AtomicU64,
    consumer_beat: AtomicU64,
    consumer_active: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            epoch: tokio::time::Instant::now(),
            gateway: Mutex::new(GatewayHealth::Starting),
            main_beat: AtomicU64::new(0),
            consumer_beat: AtomicU64::new(0),
            consumer_active: AtomicBool::new(false),
        }
    }
}

impl Health {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn beat_main(&self) {
        self.main_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn beat_consumer(&self) {
        self.consumer_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The consumer runs only while a gateway session is up; while the
    /// daemon waits to reconnect, only the main loop must beat.
    pub fn set_consumer_active(&self, active: bool) {
        if active {
            self.beat_consumer();
        }
        self.consumer_active.store(active, Ordering::Relaxed);
    }

    pub fn set_gateway(&self, g: GatewayHealth) {
        *self.gateway.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }

    pub fn gateway(&self) -> GatewayHealth {
        self.gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the watchdog may be fed: every loop that must run has beaten
    /// within `limit`.
    pub fn alive(&self, limit: Duration) -> bool {
        watchdog_ok(
            self.now_ms(),
            self.main_beat.load(Ordering::Relaxed),
            self.consumer_beat.load(Ordering::Relaxed),
            self.consumer_active.load(Ordering::Relaxed),
            u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        )
    }
}

/// The watchdog decision, pure.
pub fn watchdog_ok(now: u64, main: u64, consumer: u64, consumer_active: bool, limit: u64) -> bool {
    let fresh = |beat: u64| now.saturating_sub(beat) <= limit;
    fresh(main) && (!consumer_active || fresh(consumer))
}

/// The `STATUS=` line, e.g. "5/6 devices live, 0 pending, gateway ok".
pub fn status_line(
    phases: &BTreeMap<u32, Phase>,
    gateway: &GatewayHealth,
    pending: u64,
    quarantined: usize,
    now: Instant,
) -> String {
    let live = phases.values().filter(|p| **p == Phase::Live).count();
    let mut s = format!("{live}/{} devices live, {pending} pending", phases.len());
    if quarantined > 0 {
        s.push_str(&format!(", {quarantined} quarantined"));
    }
    match gateway {
        GatewayHealth::Starting => s.push_str(", connecting to the gateway"),
        GatewayHealth::Up => s.push_str(", gateway ok"),
        GatewayHealth::Down { error, retry_at } => {
            let secs = retry_at.saturating_duration_since(now).as_secs();
            let short: String = error.chars().take(80).collect();
            s = format!("gateway unreachable: retrying in {secs}s ({short}); {s}");
        }
    }
    s
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Makes this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core
/// file on a crash or the watchdog's SIGABRT, whatever `LimitCORE=` or
/// `core_pattern` say, and no ptrace attach by same-user processes. Its
/// `/proc/PID` files become root's.
pub fn forbid_core_dumps() -> std::io::Result<()> {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

pub fn ready() {
    notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// `RELOADING=1` with the monotonic timestamp `Type=notify-reload` needs.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// Users waiting to reach targets: journal rows past each cursor plus
/// reconcile queues.
pub fn pending(conn: &rusqlite::Connection) -> Result<u64, store::StoreError> {
    store::pending_total(conn)
}

/// The file in the state directory where the daemon keeps its health for
/// `usersync status`.
pub const HEALTH_FILE: &str = "health.json";

/// How often the health file is rewritten when nothing changed, so its age
/// tells when a daemon that was killed was last alive.
const HEALTH_HEARTBEAT: Duration = Duration::from_secs(30);

/// The gateway session as recorded for `usersync status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// `connecting`, `up` or `down`.
    pub state: String,
    /// Unix seconds since the session has been in this state.
    pub since: u64,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the daemon last said about itself (`health.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub pid: u32,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds; rewritten at least every 30 s while the daemon runs.
    pub written_at: u64,
    /// Set by an orderly stop; a daemon that was killed leaves it unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<u64>,
    pub gateway: GatewayRecord,
    /// The `STATUS=` line.
    pub status: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state word of a gateway health, as status and the health file say it.
pub fn gateway_state_name(g: &GatewayHealth) -> &'static str {
    match g {
        GatewayHealth::Starting => "connecting",
        GatewayHealth::Up => "up",
        GatewayHealth::Down { .. } => "down",
    }
}

/// Reads the health file of a state directory; `None` if there is none
/// (a daemon that never ran, or one older than this file) or it does not
/// parse.
pub fn read_health(dir: &Path) -> Option<HealthRecord> {
    let text = std::fs::read_to_string(dir.join(HEALTH_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Replaces the health file atomically (a temporary file, synced to disk,
/// renamed over it), mode 0600 like the rest of the state — set on the file
/// itself, since `mode` applies only to a file that open creates, not to a
/// temporary file an earlier run left behind.
pub fn write_health(dir: &Path, record: &HealthRecord) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = dir.join(format!(".{HEALTH_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let text = serde_json::to_string(record).map_err(std::io::Error::other)?;
    f.write_all(text.as_bytes())?;
    // Without this, a crash after the rename can leave an empty file.
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(HEALTH_FILE))
}

/// Keeps `STATUS=` current, feeds the watchdog while the daemon is
/// healthy, and keeps the health file current. Runs until cancelled.
pub async fn notifier(
    health: std::sync::Arc<Health>,
    board: Board,
    store: Store,
    cancel: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    // Check twice per watchdog period; beats must be younger than half of it.
    let period = watchdog.map_or(Duration::from_secs(2), |w| {
        (w / 2).max(Duration::from_millis(100))
    });
    let limit = watchdog.map_or(Duration::MAX, |w| (w / 2).max(Duration::from_secs(2)));
    let mut tick = tokio::time::interval(period.min(Duration::from_secs(2)));
    let mut last = String::new();
    let dir: Option<PathBuf> = store.path().parent().map(Path::to_owned);
    let mut record = HealthRecord {
        pid: std::process::id(),
        started_at: unix_now(),
        written_at: 0,
        stopped_at: None,
        gateway: GatewayRecord {
            state: gateway_state_name(&GatewayHealth::Starting).to_owned(),
            since: unix_now(),
            error: None,
        },
        status: String::new(),
    };
    let mut written: Option<(HealthRecord, Instant)> = None;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                if let Some(dir) = dir {
                    record.stopped_at = Some(unix_now());
                    record.written_at = unix_now();
                    save_health(dir, record).await;
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let counts = store
            .run(|c| Ok((pending(c)?, store::quarantine(c)?.len())))
            .await;
        let (pending, quarantined) = counts.unwrap_or((0, 0));
        let gateway = health.gateway();
        let line = status_line(
            &board.snapshot(),
            &gateway,
            pending,
            quarantined,
            Instant::now(),
        );
        if line != last {
            notify(&[NotifyState::Status(&line)]);
            last.clone_from(&line);
        }
        let state = gateway_state_name(&gateway);
        if record.gateway.state != state {
            record.gateway.state = state.to_owned();
            record.gateway.since = unix_now();
        }
        record.gateway.error = match &gateway {
            GatewayHealth::Down { error, .. } => Some(error.clone()),
            _ => None,
        };
        record.status = line;
        let changed = written.as_ref().is_none_or(|(w, at)| {
            w.gateway != record.gateway
                || w.status != record.status
                || at.elapsed() >= HEALTH_HEARTBEAT
        });
        if changed && let Some(dir) = &dir {
            record.written_at = unix_now();
            save_health(dir.clone(), record.clone()).await;
            written = Some((record.clone(), Instant::now()));
        }
        if watchdog.is_some() {
            if health.alive(limit) {
                notify(&[NotifyState::Watchdog]);
            } else {
                tracing::error!("main loop or event consumer stalled; withholding the watchdog");
            }
        }
    }
}

/// Writes the health file off the runtime's threads; a failure is logged
/// at debug level only (status then shows what it has).
async fn save_health(dir: PathBuf, record: HealthRecord) {
    let r = tokio::task::spawn_blocking(move || write_health(&dir, &record)).await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot write the health file"),
        Err(e) => tracing::debug!(error = %e, "health file task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 7: a temporary file left with a wider mode (an earlier run,
    /// another umask) does not pass its mode on to the health file.
    #[test]
    fn the_health_file_is_private_even_over_a_stale_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(format!(".{HEALTH_FILE}.tmp"));
        std::fs::write(&tmp, "stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        let record = HealthRecord {
            pid: 1,
            started_at: 2,
            written_at: 3,
            stopped_at: None,
            gateway: GatewayRecord {
                state: "up".into(),
                since: 2,
                error: None,
            },
            status: "ok".into(),
        };
        write_health(dir.path(), &record).unwrap();
        let file = dir.path().join(HEALTH_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_health(dir.path()).unwrap().written_at, 3);
        assert!(!tmp.exists());
    }

    #[test]
    fn core_dumps_are_forbidden() {
        use rustix::process::{DumpableBehavior, dumpable_behavior};
        forbid_core_dumps().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_is_withheld_when_a_loop_stops_beating() {
        let limit = Duration::from_secs(2);
        let h = Health::default();
        h.beat_main();
        // While no gateway session is up, only the main loop must beat.
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(h.alive(limit));
        h.set_consumer_active(true);
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(!h.alive(limit), "main loop silent for 2.5 s");
        h.beat_main();
        assert!(h.alive(limit));
        tokio::time::advance(Duration::from_millis(1500)).await;
        h.beat_main();
        assert!(
            !h.alive(limit),
            "consumer silent for 2.5 s while a session is up"
        );
        h.beat_consumer();
        assert!(h.alive(limit));
        h.set_consumer_active(false);
        tokio::time::advance(Duration::from_secs(60)).await;
        h.beat_main();
        assert!(h.alive(limit), "an inactive consumer is not waited for");
    }

    #[test]
    fn watchdog_needs_fresh_beats() {
        assert!(watchdog_ok(10_000, 9_500, 9_000, true, 2_000));
        assert!(
            !watchdog_ok(10_000, 7_000, 9_000, true, 2_000),
            "main loop stalled"
        );
        assert!(
            !watchdog_ok(10_000, 9_500, 1_000, true, 2_000),
            "consumer stalled"
        );
        assert!(
            watchdog_ok(10_000, 9_500, 1_000, false, 2_000),
            "no session: consumer idle is fine"
        );
    }

    #[test]
    fn status_lines_read_well() {
        let now = Instant::now();
        let phases: BTreeMap<u32, Phase> =
            [(1, Phase::Live), (2, Phase::Live), (3, Phase::Backoff)].into();
        assert_eq!(
            status_line(&phases, &GatewayHealth::Up, 4, 0, now),
            "2/3 devices live, 4 pending, gateway ok"
        );
        assert_eq!(
            status_line(&phases, &GatewayHealth::Up, 0, 2, now),
            "2/3 devices live, 0 pending, 2 quarantined, gateway ok"
        );
        let down = GatewayHealth::Down {
            error: "connection refused".into(),
            retry_at: now + Duration::from_secs(8),
        };
        assert_eq!(
            status_line(&phases, &down, 0, 0, now),
            "gateway unreachable: retrying in 8s (connection refused); 2/3 devices live, 0 pending"
        );
    }

    #[test]
    fn the_health_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_health(dir.path()), None);
        let r = HealthRecord {
            pid: 7,
            started_at: 1,
            written_at: 2,
            stopped_at: None,
            gateway: GatewayRecord {
                state: "down".into(),
                since: 3,
                error: Some("tcp connect error".into()),
            },
            status: "gateway unreachable".into(),
        };
        write_health(dir.path(), &r).unwrap();
        assert_eq!(read_health(dir.path()), Some(r));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(HEALTH_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
