//! systemd integration: `READY=1` once config and state are loaded,
//! `RELOADING=1` around a reload, `STOPPING=1`, a one-line `STATUS=` an
//! operator understands, and `WATCHDOG=1` only while the main loop and the
//! event consumer make progress. Without `NOTIFY_SOCKET` every call is a
//! no-op, so tests and foreground runs need nothing. The process is made
//! non-dumpable at start: the watchdog's SIGABRT must not leave the user
//! records in memory (templates, PINs) in a core file.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::device::{Board, Phase};
use crate::store::{self, Store};

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
    epoch: Instant,
    gateway: Mutex<GatewayHealth>,
    main_beat: AtomicU64,
    consumer_beat: AtomicU64,
    consumer_active: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            epoch: Instant::now(),
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
    let behind: u64 = store::backlog(conn)?.values().sum();
    let queued: u64 = store::pending_counts(conn)?.values().sum();
    Ok(behind + queued)
}

/// Keeps `STATUS=` current and feeds the watchdog while the daemon is
/// healthy. Runs until cancelled.
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
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let counts = store
            .run(|c| Ok((pending(c)?, store::quarantine(c)?.len())))
            .await;
        let (pending, quarantined) = counts.unwrap_or((0, 0));
        let line = status_line(
            &board.snapshot(),
            &health.gateway(),
            pending,
            quarantined,
            Instant::now(),
        );
        if line != last {
            notify(&[NotifyState::Status(&line)]);
            last = line;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_forbidden() {
        use rustix::process::{DumpableBehavior, dumpable_behavior};
        forbid_core_dumps().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
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
}
