//! The sync engine, one applier per group. State-based: the journal says
//! which users changed; applying reads each user's *current* state from its
//! source (`User.Get`; absent ⇒ delete) and writes it to the targets
//! (`EnrollMulti` with overwrite, `DeleteMulti`), all targets at the same
//! cursor in one call. A target's cursor advances only over what it holds.
//!
//! Partial failures: devices named in a Multi error retry on their own
//! (transient: back off; permanent: find the poison user one by one and
//! quarantine it after `quarantine_after` tries, so it stops blocking the
//! device). Reconcile compares users of sources and a target and records
//! what differs in the journal, so it goes through the same path.
//!
//! Never logs or stores a user record: only IDs, counts and sizes.

mod apply;
mod failure;
pub mod multi;
pub mod plan;
mod reconcile;
mod source;

pub use reconcile::{Comparison, compare, source_users};
pub use source::{fetch_users, get_users};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::backoff::Backoff;
use crate::config::{GroupConfig, SyncConfig};
use crate::device::Board;
use crate::gateway::{Disposition, GatewayClient, GatewayError};
use crate::metrics::Metrics;
use crate::store::{self, ChangeKind, JournalRow, QuarantineEntry, Store, StoreError};
use crate::wire::UserRecord;
use plan::Batch;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a batch's rows come from: the group journal (all targets, cursor
/// per target) or one target's reconcile queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Journal,
    Pending,
}

/// A reconcile in progress: the lists read at its start.
struct ReconcileRun {
    target: u32,
    /// The request it serves: a newer request for the target starts over.
    generation: i64,
    sources: BTreeMap<String, u32>,
    target_users: BTreeSet<String>,
    missing: usize,
    different: usize,
}

pub struct Applier {
    pub group: GroupConfig,
    pub client: GatewayClient,
    pub store: Store,
    pub board: Board,
    pub sync: SyncConfig,
    /// Woken when the journal grows or a reconcile is requested.
    pub wake: Arc<Notify>,
    pub backoff: Backoff,
    metrics: Arc<Metrics>,
    /// When failed targets, sources, reconciles and parked rows are tried
    /// again.
    timers: Timers,
    poison: HashMap<(u32, String), u32>,
    /// Users whose source record could not be read: failures so far and
    /// when to try again.
    source_poison: HashMap<String, (u32, Instant)>,
    /// Users per Multi call now: halved when a call times out, grown back
    /// after successes (a slow device may not take a full batch in time).
    batch_limit: usize,
    /// The target of the reconcile step under way.
    reconcile_current: Option<u32>,
    reconcile: Option<ReconcileRun>,
    targets_initialized: bool,
    /// Where the cohort served last moved to: cohorts take turns, so a
    /// target replaying a long backlog never holds up fresh changes to the
    /// others (head-of-line blocking).
    last_cohort: Option<u64>,
    /// Which lane goes first in the next step (see `step`).
    turn: u8,
    /// A multi-master group's own state (see [`multi`]).
    multi: multi::State,
}

/// What a source said of a user.
#[derive(Debug, Clone)]
pub enum Fetched {
    Present(UserRecord),
    /// The source answered and does not hold it: delete at the targets.
    Absent,
    /// The source's answer cannot be read (a record that does not decode,
    /// carries another ID, or a call that keeps failing for this user).
    /// Never taken for absent: the targets keep what they hold.
    Failed(String),
    /// A source could not be asked now: try again later.
    Unknown,
    /// Absent at the row's source, held at this other source of the group:
    /// the targets keep what they hold (the group is marked diverged).
    HeldElsewhere(u32),
}

/// Retry times of what failed: (failures so far, retry at).
#[derive(Debug, Default)]
struct Timers {
    /// Targets that failed a call.
    target: HashMap<u32, (u32, Instant)>,
    /// Sources whose calls failed transiently. Their rows wait aside
    /// meanwhile; the others go on.
    source: HashMap<u32, (u32, Instant)>,
    /// Targets whose reconcile failed transiently.
    reconcile: HashMap<u32, (u32, Instant)>,
    /// Targets whose pending rows could not go.
    pending: HashMap<u32, (u32, Instant)>,
    /// Multi-master members written lately: when their logs are read to
    /// end the expectations of writes that logged nothing.
    confirm: HashMap<u32, (u32, Instant)>,
}

impl Timers {
    /// The earliest retry still to come.
    fn next(&self, now: Instant) -> Option<Instant> {
        self.target
            .values()
            .chain(self.source.values())
            .chain(self.reconcile.values())
            .chain(self.pending.values())
            .chain(self.confirm.values())
            .map(|(_, at)| *at)
            .filter(|at| *at > now)
            .min()
    }
}

/// Why an idle applier looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woke {
    Cancelled,
    /// The journal grew or a reconcile was asked for.
    Notified,
    /// A device's phase changed.
    Board,
    /// A retry is due.
    Retry,
    /// The poll interval passed: requests written by `usersync reconcile`
    /// into the state database arrive this way.
    Poll,
}

/// Waits until something may give an idle applier work.
async fn idle(
    timers: &Timers,
    wake: &Notify,
    board: &mut tokio::sync::watch::Receiver<BTreeMap<u32, crate::device::Phase>>,
    poll: std::time::Duration,
    cancel: &CancellationToken,
) -> Woke {
    let next_retry = timers.next(Instant::now());
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Woke::Cancelled,
        _ = wake.notified() => Woke::Notified,
        r = board.changed() => if r.is_err() { Woke::Cancelled } else { Woke::Board },
        _ = crate::backoff::retry_at(next_retry), if next_retry.is_some() => Woke::Retry,
        _ = tokio::time::sleep(poll) => Woke::Poll,
    }
}

/// One writer per group at any time: an applier holds its group's lock for
/// its whole life, so one started by a reload waits until the step of the
/// one it replaces is over (its last Multi call answered).
pub type WriterLock = Arc<tokio::sync::Mutex<()>>;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Applier {
    pub fn new(
        group: GroupConfig,
        client: GatewayClient,
        store: Store,
        board: Board,
        sync: SyncConfig,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let batch_users = sync.batch_users;
        Applier {
            metrics,
            group,
            client,
            store,
            board,
            sync,
            wake,
            backoff: Backoff::device(),
            timers: Timers::default(),
            poison: HashMap::new(),
            source_poison: HashMap::new(),
            batch_limit: batch_users,
            reconcile_current: None,
            reconcile: None,
            targets_initialized: false,
            last_cohort: None,
            turn: 0,
            multi: multi::State::default(),
        }
    }

    /// Runs until cancelled, as the group's only writer. A step under way
    /// when cancelled is finished (its calls have deadlines), so no write of
    /// this applier can land after one of its successor.
    pub async fn run(mut self, writer: WriterLock, cancel: CancellationToken) {
        let _writer = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            g = writer.lock() => g,
        };
        let mut board = self.board.subscribe();
        let mut errors = 0u32;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let progressed = match self.step().await {
                Ok(p) => {
                    errors = 0;
                    p
                }
                Err(e) => {
                    tracing::warn!(group = %self.group.name, error = %e, "sync step failed; retrying");
                    let delay = self.backoff.delay(errors);
                    errors = errors.saturating_add(1);
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    false
                }
            };
            if progressed {
                continue;
            }
            match idle(
                &self.timers,
                &self.wake,
                &mut board,
                self.sync.poll_interval,
                &cancel,
            )
            .await
            {
                Woke::Cancelled => return,
                // A device came or went: parked rows may go now.
                Woke::Board => self.timers.pending.clear(),
                Woke::Notified | Woke::Retry | Woke::Poll => {}
            }
        }
    }

    /// One unit of work; `true` if anything moved.
    pub async fn step(&mut self) -> Result<bool, SyncError> {
        if self.group.multi_master().is_some() {
            return self.multi_step().await;
        }
        if !self.targets_initialized {
            self.init_targets().await?;
            self.targets_initialized = true;
        }
        // Reconcile chunks, reconcile results (pending) and journal batches
        // take turns, so a long reconcile or a target replaying a backlog
        // never delays fresh changes to the others.
        self.turn = (self.turn + 1) % 3;
        for i in 0..3 {
            let moved = match (self.turn + i) % 3 {
                0 => match self.reconcile_step().await {
                    Ok(moved) => {
                        if let Some(t) = self.reconcile_current.take() {
                            self.timers.reconcile.remove(&t);
                        }
                        moved
                    }
                    // A device of the reconcile did not answer: that
                    // target's reconcile waits; the other targets' and the
                    // journal changes go on.
                    Err(SyncError::Gateway(e)) => {
                        let t = self.reconcile_current.take().unwrap_or_default();
                        let n = self.timers.reconcile.get(&t).map_or(0, |(n, _)| *n);
                        let delay = self.backoff.delay(n);
                        tracing::warn!(group = %self.group.name, target = t, error = %e, retry_in = ?delay, "reconcile could not read a device; retrying later");
                        self.timers
                            .reconcile
                            .insert(t, (n.saturating_add(1), Instant::now() + delay));
                        self.reconcile = None;
                        false
                    }
                    Err(e) => return Err(e),
                },
                1 => self.pending_step().await?,
                _ => self.journal_step().await?,
            };
            if moved {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Of `devices`, those with rows of this group in their pending lane
    /// whose retry time (if any) has come.
    async fn with_pending(&self, devices: Vec<u32>) -> Result<Vec<u32>, SyncError> {
        let name = self.group.name.clone();
        let waiting = self
            .store
            .run(move |c| store::pending_counts(c))
            .await?
            .into_keys()
            .filter(|(g, _)| *g == name)
            .map(|(_, t)| t)
            .collect::<BTreeSet<u32>>();
        let now = Instant::now();
        Ok(devices
            .into_iter()
            .filter(|t| waiting.contains(t))
            .filter(|t| self.timers.pending.get(t).is_none_or(|(_, at)| *at <= now))
            .collect())
    }

    fn eligible(&self, device: u32) -> bool {
        self.board.is_live(device)
            && self
                .timers
                .target
                .get(&device)
                .is_none_or(|(_, at)| *at <= Instant::now())
    }

    /// Targets that are live and not backing off.
    fn eligible_targets(&self) -> Vec<u32> {
        self.group
            .targets
            .iter()
            .copied()
            .filter(|t| self.eligible(*t))
            .collect()
    }

    fn sources_live(&self) -> bool {
        self.group.sources.iter().all(|s| self.board.is_live(*s))
    }
}

#[cfg(test)]
mod tests {
    //! The applier's idle wait in tokio's paused time.

    use std::time::Duration;

    use super::*;
    use crate::device::Phase;

    async fn wait(timers: &Timers, wake: &Notify, board: &Board) -> (Woke, Duration) {
        let mut rx = board.subscribe();
        let start = Instant::now();
        let woke = idle(
            timers,
            wake,
            &mut rx,
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await;
        (woke, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_applier_polls_at_the_interval() {
        let (timers, wake, board) = (Timers::default(), Notify::new(), Board::new([1]));
        assert_eq!(
            wait(&timers, &wake, &board).await,
            (Woke::Poll, Duration::from_secs(5))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_due_before_the_poll_wakes_it_then() {
        let (mut timers, wake, board) = (Timers::default(), Notify::new(), Board::new([1]));
        let now = Instant::now();
        timers.target.insert(2, (1, now + Duration::from_secs(3)));
        timers.pending.insert(3, (1, now + Duration::from_secs(2)));
        // Past retries are not waited for again.
        timers.source.insert(4, (1, now));
        assert_eq!(
            wait(&timers, &wake, &board).await,
            (Woke::Retry, Duration::from_secs(2))
        );
        timers.pending.clear();
        timers
            .reconcile
            .insert(5, (1, Instant::now() + Duration::from_secs(30)));
        // 3 s from the start, 1 s from now.
        assert_eq!(
            wait(&timers, &wake, &board).await,
            (Woke::Retry, Duration::from_secs(1))
        );
        timers.target.clear();
        assert_eq!(
            wait(&timers, &wake, &board).await,
            (Woke::Poll, Duration::from_secs(5))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_or_a_device_change_ends_the_wait_at_once() {
        let (timers, wake, board) = (Timers::default(), Notify::new(), Board::new([1]));
        wake.notify_one();
        assert_eq!(
            wait(&timers, &wake, &board).await,
            (Woke::Notified, Duration::ZERO)
        );
        let b = board.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            b.set(1, Phase::Live);
        });
        assert_eq!(
            wait(&timers, &wake, &board).await,
            (Woke::Board, Duration::from_secs(1))
        );
    }
}
