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

pub mod plan;

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

/// How one target fared in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Transient(String),
    Permanent(Code, String),
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
    retry: HashMap<u32, (u32, Instant)>,
    poison: HashMap<(u32, String), u32>,
    /// Users whose source record could not be read: failures so far and
    /// when to try again.
    source_poison: HashMap<String, (u32, Instant)>,
    /// Sources whose calls failed transiently: (failures, retry at). Their
    /// rows wait aside meanwhile; the others go on.
    source_retry: HashMap<u32, (u32, Instant)>,
    /// Users per Multi call now: halved when a call times out, grown back
    /// after successes (a slow device may not take a full batch in time).
    batch_limit: usize,
    /// A reconcile that failed transiently: (failures, retry at).
    reconcile_retry: HashMap<u32, (u32, Instant)>,
    /// The target of the reconcile step under way.
    reconcile_current: Option<u32>,
    /// Targets whose pending rows could not go: (tries, retry at).
    pending_retry: HashMap<u32, (u32, Instant)>,
    reconcile: Option<ReconcileRun>,
    targets_initialized: bool,
    /// Where the cohort served last moved to: cohorts take turns, so a
    /// target replaying a long backlog never holds up fresh changes to the
    /// others (head-of-line blocking).
    last_cohort: Option<u64>,
    /// Which lane goes first in the next step (see `step`).
    turn: u8,
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
            retry: HashMap::new(),
            poison: HashMap::new(),
            source_poison: HashMap::new(),
            source_retry: HashMap::new(),
            batch_limit: batch_users,
            reconcile_retry: HashMap::new(),
            reconcile_current: None,
            pending_retry: HashMap::new(),
            reconcile: None,
            targets_initialized: false,
            last_cohort: None,
            turn: 0,
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
            let now = Instant::now();
            let next_retry = self
                .retry
                .values()
                .chain(self.source_retry.values())
                .chain(self.reconcile_retry.values())
                .chain(self.pending_retry.values())
                .map(|(_, at)| *at)
                .filter(|at| *at > now)
                .min();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                r = board.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A device came or went: parked rows may go now.
                    self.pending_retry.clear();
                }
                _ = sleep_until(next_retry), if next_retry.is_some() => {}
                // Requests written by `usersync reconcile` arrive this way.
                _ = tokio::time::sleep(self.sync.poll_interval) => {}
            }
        }
    }

    /// One unit of work; `true` if anything moved.
    pub async fn step(&mut self) -> Result<bool, SyncError> {
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
                            self.reconcile_retry.remove(&t);
                        }
                        moved
                    }
                    // A device of the reconcile did not answer: that
                    // target's reconcile waits; the other targets' and the
                    // journal changes go on.
                    Err(SyncError::Gateway(e)) => {
                        let t = self.reconcile_current.take().unwrap_or_default();
                        let n = self.reconcile_retry.get(&t).map_or(0, |(n, _)| *n);
                        let delay = self.backoff.delay(n);
                        tracing::warn!(group = %self.group.name, target = t, error = %e, retry_in = ?delay, "reconcile could not read a device; retrying later");
                        self.reconcile_retry
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

    fn eligible(&self, device: u32) -> bool {
        self.board.is_live(device)
            && self
                .retry
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

    /// A target without a cursor is new (first start of the group, or added
    /// to it): it starts at the head and is reconciled, which covers every
    /// user its sources hold. A source added since the applier last ran
    /// has users no journal row names: every target is reconciled. A target
    /// that left the group is forgotten (a later return starts afresh).
    async fn init_targets(&mut self) -> Result<(), SyncError> {
        let group = self.group.clone();
        let (created, added_sources) = self
            .store
            .run(move |c| {
                let tx = c.transaction()?;
                let known = store::group_members(&tx, &group.name)?;
                let cursors = store::cursors(&tx, &group.name)?;
                let head = store::head(&tx, &group.name)?;
                let mut created = Vec::new();
                for t in &group.targets {
                    if !cursors.contains_key(t) {
                        store::advance_cursor(&tx, &group.name, *t, head)?;
                        store::request_reconcile(&tx, &group.name, *t, "new target", group.prune)?;
                        created.push(*t);
                    }
                }
                let mut added_sources = Vec::new();
                if let Some(known) = &known {
                    added_sources = group
                        .sources
                        .iter()
                        .filter(|s| !known.sources.contains(s))
                        .copied()
                        .collect();
                    for t in known.targets.iter().filter(|t| !group.targets.contains(t)) {
                        store::drop_target(&tx, &group.name, *t)?;
                    }
                }
                if !added_sources.is_empty() {
                    let reason = format!("source added: {added_sources:?}");
                    for t in group.targets.iter().filter(|t| !created.contains(t)) {
                        store::request_reconcile(&tx, &group.name, *t, &reason, group.prune)?;
                    }
                }
                // Rows parked for a source that left the group can never
                // be applied (their source is never asked again).
                store::drop_pending_of_other_sources(&tx, &group.name, &group.sources)?;
                store::set_group_members(&tx, &group.name, &group.sources, &group.targets)?;
                tx.commit()?;
                Ok((created, added_sources))
            })
            .await?;
        for t in created {
            tracing::info!(group = %self.group.name, target = t, "new target: full reconcile requested");
        }
        if !added_sources.is_empty() {
            tracing::info!(group = %self.group.name, sources = ?added_sources, "source added to the group: every target is reconciled");
        }
        Ok(())
    }

    // ---- reconcile --------------------------------------------------------

    async fn reconcile_step(&mut self) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        let (requests, stale): (Vec<store::ReconcileRequest>, Vec<store::ReconcileRequest>) = self
            .store
            .run(|c| store::reconcile_requests(c))
            .await?
            .into_iter()
            .filter(|r| r.group == name)
            .partition(|r| self.group.targets.contains(&r.target));
        // Requests for devices no longer in the group are dropped.
        for r in stale {
            let n = name.clone();
            self.store
                .run(move |c| store::reconcile_done(c, &n, r.target, r.generation))
                .await?;
        }
        if !self.sources_live() {
            return Ok(false);
        }
        let now = Instant::now();
        let Some(req) = requests.into_iter().find(|r| {
            self.eligible(r.target)
                && self
                    .reconcile_retry
                    .get(&r.target)
                    .is_none_or(|(_, at)| *at <= now)
        }) else {
            return Ok(false);
        };
        let target = req.target;
        let generation = req.generation;
        self.reconcile_current = Some(target);
        let fresh = self
            .reconcile
            .as_ref()
            .is_none_or(|r| r.target != target || r.generation != generation)
            || req.after_user.is_none();
        if fresh {
            let sources = source_users(&self.client, &self.group.sources).await?;
            let target_users: BTreeSet<String> =
                self.client.user_ids(target).await?.into_iter().collect();
            tracing::info!(
                group = %name, target, reason = %req.reason, source_users = sources.len(),
                target_users = target_users.len(), resume_after = ?req.after_user,
                "reconcile started"
            );
            self.reconcile = Some(ReconcileRun {
                target,
                generation,
                sources,
                target_users,
                missing: 0,
                different: 0,
            });
        }
        let Some(run) = self.reconcile.as_mut() else {
            return Ok(false);
        };
        let lower = match &req.after_user {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let chunk: Vec<(String, u32)> = run
            .sources
            .range::<String, _>((lower, Bound::Unbounded))
            .take(self.sync.batch_users)
            .map(|(u, s)| (u.clone(), *s))
            .collect();

        let mut changes: Vec<(String, u32)> = Vec::new();
        if let Some((last, _)) = chunk.last().cloned() {
            let diff = compare(&self.client, target, &run.target_users, chunk).await?;
            run.missing += diff.missing.len();
            run.different += diff.different.len();
            changes.extend(diff.missing);
            changes.extend(diff.different);
            let n = name.clone();
            self.store
                .run(move |c| {
                    let tx = c.transaction()?;
                    for (u, s) in &changes {
                        store::add_pending(&tx, &n, target, u, *s)?;
                    }
                    store::reconcile_progress(&tx, &n, target, generation, &last)?;
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            return Ok(true);
        }

        // Every source user compared: prune extras if asked, then done.
        let extras: Vec<String> = run
            .target_users
            .iter()
            .filter(|u| !run.sources.contains_key(*u))
            .cloned()
            .collect();
        let extra = extras.len();
        let prune = req.prune;
        let extras = if prune { extras } else { Vec::new() };
        let first_source = self.group.sources.first().copied().unwrap_or_default();
        let pruned = extras.len();
        let (missing, different) = (run.missing, run.different);
        let result = store::ReconcileResult {
            group: name.clone(),
            target,
            reason: req.reason.clone(),
            finished_at: now_secs(),
            missing: missing as u64,
            different: different as u64,
            extra: extra as u64,
            pruned: pruned as u64,
        };
        let n = name.clone();
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for u in extras {
                    // Deleted by the apply path unless a source holds it by
                    // then; logged as a prune.
                    store::add_pending_kind(&tx, &n, target, &u, first_source, ChangeKind::Prune)?;
                }
                store::reconcile_done(&tx, &n, target, generation)?;
                store::record_reconcile_result(&tx, &result)?;
                if prune {
                    store::set_diverged(&tx, &n, None)?;
                } else if extra > 0 {
                    store::set_diverged(
                        &tx,
                        &n,
                        Some(&format!(
                            "target {target} holds {extra} users no source holds; kept because prune = false \
                             (`usersync reconcile --group {n} --target {target} --prune` deletes them)"
                        )),
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.reconcile = None;
        self.metrics
            .reconciles
            .get_or_create(&crate::metrics::GroupLabel {
                group: name.clone(),
            })
            .inc();
        tracing::info!(group = %name, target, missing, different, extra, pruned, "reconcile done");
        Ok(true)
    }

    // ---- apply ------------------------------------------------------------

    /// The next journal batch for the next cohort in turn.
    async fn journal_step(&mut self) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        let (cursors, head) = {
            let n = name.clone();
            self.store
                .run(move |c| Ok((store::cursors(c, &n)?, store::head(c, &n)?)))
                .await?
        };
        let eligible = self.eligible_targets();
        for t in &self.group.targets {
            let behind = cursors.get(t).map_or(0, |c| head.saturating_sub(*c));
            self.metrics
                .backlog
                .get_or_create(&Metrics::target(&name, *t))
                .set(i64::try_from(behind).unwrap_or(i64::MAX));
        }
        let Some((cursor, cohort)) = plan::cohort(&cursors, &eligible, head, self.last_cohort)
        else {
            return Ok(false);
        };

        let rows = {
            let (n, limit) = (name.clone(), self.batch_limit);
            self.store
                .run(move |c| store::journal_after(c, &n, cursor, limit))
                .await?
        };
        // Where this cohort moves to: the next turn goes to a cohort above.
        self.last_cohort = rows.last().map(|r| r.seq).or(Some(cursor));
        match plan::next_batch(rows) {
            None => Ok(false),
            Some(Batch::DeleteAll(row)) => self.apply_delete_all(&cohort, row).await,
            Some(Batch::Users(rows)) => self.apply_users(&cohort, Lane::Journal, rows).await,
        }
    }

    /// Users a reconcile queued for one target, applied to it alone.
    async fn pending_step(&mut self) -> Result<bool, SyncError> {
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
        let targets: Vec<u32> = self
            .eligible_targets()
            .into_iter()
            .filter(|t| waiting.contains(t))
            .filter(|t| self.pending_retry.get(t).is_none_or(|(_, at)| *at <= now))
            .collect();
        let live_sources: Vec<u32> = self
            .group
            .sources
            .iter()
            .copied()
            .filter(|s| self.board.is_live(*s))
            .collect();
        let now = Instant::now();
        for t in targets {
            // Read past rows whose users back off, so they never hide the
            // rows behind them.
            let (n, limit, sources) = (
                self.group.name.clone(),
                self.batch_limit * 8,
                live_sources.clone(),
            );
            let rows: Vec<JournalRow> = self
                .store
                .run(move |c| store::pending(c, &n, t, limit, &sources))
                .await?
                .into_iter()
                .filter(|r| {
                    self.source_poison
                        .get(&r.user_id)
                        .is_none_or(|(_, at)| *at <= now)
                })
                .take(self.batch_limit)
                .collect();
            if rows.is_empty() {
                // Every row backs off on its own (per user), or its source
                // is away: nothing to try now.
                continue;
            }
            if self.apply_users(&[t], Lane::Pending, rows).await? {
                self.pending_retry.remove(&t);
                return Ok(true);
            }
            // Nothing of it could go (its sources cannot answer yet): look
            // again later, not at every wake.
            let n = self.pending_retry.get(&t).map_or(0, |(n, _)| *n);
            self.pending_retry.insert(
                t,
                (n.saturating_add(1), Instant::now() + self.backoff.delay(n)),
            );
        }
        Ok(false)
    }

    /// A delete-all at a source becomes a reconcile with prune of the
    /// cohort's targets: it deletes exactly the users no source holds when
    /// it runs (so users enrolled again since, and the users of the group's
    /// other sources, stay), enrolls what is missing, and needs no trust in
    /// one event (perhaps read back from an old log).
    async fn apply_delete_all(
        &mut self,
        cohort: &[u32],
        row: JournalRow,
    ) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        if self.group.sources.contains(&row.source) {
            let why = format!("all users deleted at source {}", row.source);
            let (targets, n, w) = (cohort.to_vec(), name.clone(), why.clone());
            self.store
                .run(move |c| {
                    let tx = c.transaction()?;
                    for t in &targets {
                        store::request_reconcile(&tx, &n, *t, &w, true)?;
                    }
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            tracing::info!(group = %name, source = row.source, targets = ?cohort, "{why}: reconciling the targets with prune");
        } else {
            tracing::warn!(group = %name, source = row.source, "delete-all of a source no longer in the group: dropped");
        }
        self.complete(cohort, Lane::Journal, std::slice::from_ref(&row), &[])
            .await?;
        Ok(true)
    }

    async fn apply_users(
        &mut self,
        cohort: &[u32],
        lane: Lane,
        rows: Vec<JournalRow>,
    ) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        let now = Instant::now();
        // Rows of a source that left the group are dropped; rows of a
        // source that is not live (or whose record keeps failing) wait in
        // the pending lane without holding up the others.
        let mut gone = Vec::new();
        let mut waiting = Vec::new();
        let mut ready = Vec::new();
        for r in rows.iter().cloned() {
            if !self.group.sources.contains(&r.source) {
                gone.push(r);
            } else if !self.source_ready(r.source)
                || self
                    .source_poison
                    .get(&r.user_id)
                    .is_some_and(|(_, at)| *at > now)
            {
                waiting.push(r);
            } else {
                ready.push(r);
            }
        }
        for r in &gone {
            tracing::warn!(group = %name, user_id = %r.user_id, source = r.source, "change of a source no longer in the group: dropped");
        }
        if lane == Lane::Journal && !waiting.is_empty() {
            self.park(cohort, &waiting).await?;
        }
        let fetched = self.fetch(&ready).await?;
        let mut records: HashMap<String, UserRecord> = HashMap::new();
        let mut applied: Vec<JournalRow> = Vec::new();
        let mut settled: Vec<JournalRow> = gone;
        let mut unsure: Vec<JournalRow> = Vec::new();
        for r in ready {
            match fetched.get(&r.user_id) {
                // A source could not answer (now, or for absence at every
                // source): the row waits aside.
                Some(Fetched::Unknown) => unsure.push(r),
                Some(Fetched::HeldElsewhere(other)) => {
                    let why = format!(
                        "user {} deleted at source {} but still held at source {other}: the doors keep their copy; \
                         change or delete it at source {other} to settle it",
                        r.user_id, r.source
                    );
                    tracing::warn!(group = %name, user_id = %r.user_id, source = r.source, other, "{why}");
                    let (n, w) = (name.clone(), why.clone());
                    self.store
                        .run(move |c| store::set_diverged(c, &n, Some(&w)))
                        .await?;
                    settled.push(r);
                }
                Some(Fetched::Present(u)) => {
                    records.insert(r.user_id.clone(), u.clone());
                    applied.push(r);
                }
                Some(Fetched::Absent) => applied.push(r),
                Some(Fetched::Failed(why)) => {
                    if self.source_failed(cohort, lane, &r, why).await? {
                        settled.push(r);
                    }
                }
                // Not asked (a duplicate row): nothing to do.
                None => settled.push(r),
            }
        }
        if lane == Lane::Journal && !unsure.is_empty() {
            self.park(cohort, &unsure).await?;
        }
        if applied.is_empty() {
            // Nothing to write: the rows are parked, dropped or quarantined.
            let all: Vec<JournalRow> = match lane {
                Lane::Journal => rows,
                Lane::Pending => settled,
            };
            if all.is_empty() {
                return Ok(false);
            }
            self.complete(cohort, lane, &all, &[]).await?;
            return Ok(true);
        }

        let mut outcomes: BTreeMap<u32, Outcome> =
            cohort.iter().map(|t| (*t, Outcome::Ok)).collect();
        let enroll: Vec<&UserRecord> = applied
            .iter()
            .filter_map(|r| records.get(&r.user_id))
            .collect();
        for chunk in plan::chunks(
            enroll,
            |u| u.raw.len(),
            self.batch_limit,
            self.sync.batch_bytes,
        ) {
            let targets = ok_targets(&outcomes);
            if targets.is_empty() {
                break;
            }
            let users = chunk.iter().map(|u| u.raw.clone()).collect();
            match self.client.user_enroll_multi(targets, users, true).await {
                Ok(()) => self.batch_fits(),
                Err(e) => {
                    self.batch_timed_out(&e);
                    record_failure(&mut outcomes, &e);
                }
            }
        }
        let deletes: Vec<String> = applied
            .iter()
            .filter(|r| !records.contains_key(&r.user_id))
            .map(|r| r.user_id.clone())
            .collect();
        if !deletes.is_empty() {
            let targets = ok_targets(&outcomes);
            if !targets.is_empty()
                && let Err(e) = self
                    .client
                    .user_delete_multi(targets, deletes.clone())
                    .await
            {
                let mut delete_outcomes: BTreeMap<u32, Outcome> = ok_targets(&outcomes)
                    .into_iter()
                    .map(|t| (t, Outcome::Ok))
                    .collect();
                record_failure(&mut delete_outcomes, &e);
                for (t, o) in delete_outcomes {
                    // NOT_FOUND: some user was already gone (WIRE.md §5.3);
                    // delete one by one, where missing counts as done.
                    let o = match o {
                        Outcome::Permanent(Code::NotFound, _) => {
                            self.delete_each(t, &deletes).await
                        }
                        other => other,
                    };
                    outcomes.insert(t, o);
                }
            }
        }

        // What the targets that took the batch move past: for the journal,
        // every row read (the rest is parked, dropped or quarantined); for
        // the pending lane, the rows written and those settled otherwise.
        let passed: Vec<JournalRow> = match lane {
            Lane::Journal => rows,
            Lane::Pending => applied.iter().cloned().chain(settled).collect(),
        };
        let done: Vec<u32> = ok_targets(&outcomes);
        let mut progressed = !done.is_empty();
        // Every target that took the batch moves in one transaction.
        self.complete(&done, lane, &passed, &applied).await?;
        for (t, o) in outcomes {
            match o {
                Outcome::Ok => {}
                Outcome::Transient(msg) => self.back_off(t, &msg),
                Outcome::Permanent(_, msg) => {
                    tracing::info!(group = %name, target = t, error = %msg, "permanent failure in a batch; applying its users one by one");
                    progressed |= self.one_by_one(t, lane, &applied, &records).await?;
                }
            }
        }
        if progressed {
            for r in &applied {
                self.source_poison.remove(&r.user_id);
                let action = match (records.contains_key(&r.user_id), r.kind) {
                    (true, _) => "enrolled",
                    (false, ChangeKind::Prune) => "pruned",
                    (false, _) => "deleted",
                };
                tracing::info!(group = %name, user_id = %r.user_id, source = r.source, targets = ?cohort, action, reconcile = lane == Lane::Pending, "change propagated");
            }
        }
        Ok(progressed)
    }

    /// Moves rows aside into each cohort target's pending lane (applied
    /// there once their source can answer).
    async fn park(&self, cohort: &[u32], rows: &[JournalRow]) -> Result<(), SyncError> {
        let (name, targets) = (self.group.name.clone(), cohort.to_vec());
        let rows = rows.to_vec();
        for r in &rows {
            tracing::debug!(group = %name, user_id = %r.user_id, source = r.source, "source unavailable: change waits");
        }
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for t in &targets {
                    for r in &rows {
                        store::add_pending(&tx, &name, *t, &r.user_id, r.source)?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// A user whose source record cannot be read: retried with a backoff
    /// (parked meanwhile), quarantined on every cohort target after
    /// `quarantine_after` failures. The targets keep what they hold.
    /// Returns whether the row is settled (quarantined).
    async fn source_failed(
        &mut self,
        cohort: &[u32],
        lane: Lane,
        row: &JournalRow,
        why: &str,
    ) -> Result<bool, SyncError> {
        let count = self
            .source_poison
            .get(&row.user_id)
            .map_or(0, |(n, _)| *n)
            .saturating_add(1);
        if count < self.sync.quarantine_after {
            let delay = self.backoff.delay(count - 1);
            tracing::warn!(group = %self.group.name, user_id = %row.user_id, source = row.source, attempt = count, error = %why, retry_in = ?delay, "cannot read the user at its source; the targets keep what they hold");
            self.source_poison
                .insert(row.user_id.clone(), (count, Instant::now() + delay));
            if lane == Lane::Journal {
                self.park(cohort, std::slice::from_ref(row)).await?;
            }
            return Ok(false);
        }
        self.source_poison.remove(&row.user_id);
        let since = now_secs();
        let entries: Vec<QuarantineEntry> = cohort
            .iter()
            .map(|t| QuarantineEntry {
                group: self.group.name.clone(),
                device: *t,
                user_id: row.user_id.clone(),
                seq: row.seq,
                code: "SourceUnreadable".into(),
                message: format!("source {}: {why}", row.source),
                since,
            })
            .collect();
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for e in &entries {
                    store::add_quarantine(&tx, e)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        tracing::error!(group = %self.group.name, user_id = %row.user_id, source = row.source, error = %why, "user quarantined: its source record cannot be read; the targets keep what they hold (retried on reconcile)");
        Ok(true)
    }

    /// A call that timed out as a whole may carry too much for a slow
    /// device: halve the batch (down to one user).
    fn batch_timed_out(&mut self, e: &GatewayError) {
        let timeout =
            matches!(e, GatewayError::Timeout { .. }) || e.code() == Some(Code::DeadlineExceeded);
        if timeout && self.batch_limit > 1 {
            self.batch_limit /= 2;
            tracing::warn!(group = %self.group.name, batch_users = self.batch_limit, "a call timed out; smaller batches from now on");
        }
    }

    /// A batch went through: grow back towards `batch_users`.
    fn batch_fits(&mut self) {
        self.batch_limit = (self.batch_limit * 2).min(self.sync.batch_users).max(1);
    }

    /// Whether `source` can be asked now: live and not backing off.
    fn source_ready(&self, source: u32) -> bool {
        self.board.is_live(source)
            && self
                .source_retry
                .get(&source)
                .is_none_or(|(_, at)| *at <= Instant::now())
    }

    /// A source whose call failed transiently (unavailable, or too slow):
    /// its rows wait aside until it answers again; the others go on.
    fn source_backoff(&mut self, source: u32, e: &GatewayError) {
        let failures = self.source_retry.get(&source).map_or(0, |(n, _)| *n);
        let delay = self.backoff.delay(failures);
        tracing::warn!(group = %self.group.name, source, error = %e, retry_in = ?delay, "source did not answer; its changes wait, the others go on");
        self.source_retry
            .insert(source, (failures.saturating_add(1), Instant::now() + delay));
    }

    /// The current state of the rows' users at their sources. A user is
    /// absent only when every source of the group confirms it by its user
    /// list (a user may be enrolled at several desks; an unknown-user answer
    /// is not proof enough, WIRE.md §5.3); when a source cannot be asked,
    /// the user is [`Fetched::Unknown`].
    async fn fetch(&mut self, rows: &[JournalRow]) -> Result<HashMap<String, Fetched>, SyncError> {
        let mut by_source: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut out: HashMap<String, Fetched> = HashMap::new();
        for r in rows {
            if r.kind == ChangeKind::Prune {
                // A reconcile found it at no source: only the sources'
                // lists (below) can tell whether one holds it by now.
                out.insert(r.user_id.clone(), Fetched::Absent);
                continue;
            }
            by_source
                .entry(r.source)
                .or_default()
                .push(r.user_id.clone());
        }
        for (s, ids) in by_source {
            match fetch_users(&self.client, s, ids.clone()).await {
                Ok(m) => {
                    self.source_retry.remove(&s);
                    out.extend(m);
                }
                Err(e) => {
                    self.batch_timed_out(&e);
                    self.source_backoff(s, &e);
                    out.extend(ids.into_iter().map(|id| (id, Fetched::Unknown)));
                }
            }
        }
        let absent: Vec<String> = out
            .iter()
            .filter(|(_, f)| matches!(f, Fetched::Absent))
            .map(|(u, _)| u.clone())
            .collect();
        if absent.is_empty() {
            return Ok(out);
        }
        for s in self.group.sources.clone() {
            let still: Vec<String> = absent
                .iter()
                .filter(|u| matches!(out.get(*u), Some(Fetched::Absent)))
                .cloned()
                .collect();
            if still.is_empty() {
                break;
            }
            if !self.source_ready(s) {
                for u in still {
                    out.insert(u, Fetched::Unknown);
                }
                continue;
            }
            let listed: BTreeSet<String> = match self.client.user_ids(s).await {
                Ok(ids) => ids.into_iter().collect(),
                Err(e) => {
                    self.source_backoff(s, &e);
                    for u in still {
                        out.insert(u, Fetched::Unknown);
                    }
                    continue;
                }
            };
            let held: Vec<String> = still.into_iter().filter(|u| listed.contains(u)).collect();
            if held.is_empty() {
                continue;
            }
            // Held at another source of the group: no delete. Nor is that
            // source's copy written (it may be older than what the doors
            // hold); its own changes come through its own rows.
            for u in held {
                out.insert(u, Fetched::HeldElsewhere(s));
            }
        }
        Ok(out)
    }

    /// Deletes one by one; NOT_FOUND counts as done only if the target's
    /// user list confirms the user is not there (the code might name an
    /// unknown device rather than an unknown user).
    async fn delete_each(&self, target: u32, ids: &[String]) -> Outcome {
        let mut not_found = Vec::new();
        for id in ids {
            match self.client.user_delete(target, vec![id.clone()]).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NotFound) => not_found.push(id.clone()),
                Err(e) => return outcome_of(&e),
            }
        }
        if not_found.is_empty() {
            return Outcome::Ok;
        }
        match self.client.user_ids(target).await {
            Ok(listed) => {
                let listed: BTreeSet<String> = listed.into_iter().collect();
                match not_found.iter().find(|u| listed.contains(*u)) {
                    None => Outcome::Ok,
                    Some(u) => Outcome::Permanent(
                        Code::NotFound,
                        format!("delete of user {u} answered NOT_FOUND, yet the device lists it"),
                    ),
                }
            }
            Err(e) => outcome_of(&e),
        }
    }

    /// Applies `rows` to `target` alone, one user at a time, to find the
    /// user it refuses. Returns whether the cursor moved.
    async fn one_by_one(
        &mut self,
        target: u32,
        lane: Lane,
        rows: &[JournalRow],
        records: &HashMap<String, UserRecord>,
    ) -> Result<bool, SyncError> {
        let mut progressed = false;
        for row in rows {
            let outcome = match records.get(&row.user_id) {
                Some(u) => match self
                    .client
                    .user_enroll(target, vec![u.raw.clone()], true)
                    .await
                {
                    Ok(()) => Outcome::Ok,
                    Err(e) => outcome_of(&e),
                },
                None => {
                    self.delete_each(target, std::slice::from_ref(&row.user_id))
                        .await
                }
            };
            match outcome {
                Outcome::Ok => {
                    self.complete(
                        &[target],
                        lane,
                        std::slice::from_ref(row),
                        std::slice::from_ref(row),
                    )
                    .await?;
                    progressed = true;
                }
                Outcome::Permanent(code, msg) => {
                    if !self.poisoned(target, lane, row, code, &msg).await? {
                        return Ok(progressed);
                    }
                    progressed = true;
                }
                Outcome::Transient(msg) => {
                    self.back_off(target, &msg);
                    return Ok(progressed);
                }
            }
        }
        Ok(progressed)
    }

    /// Counts a permanent failure of `row` on `target`; quarantines it (and
    /// moves the cursor past it) once it has failed `quarantine_after`
    /// times. Returns whether it was quarantined.
    async fn poisoned(
        &mut self,
        target: u32,
        lane: Lane,
        row: &JournalRow,
        code: Code,
        msg: &str,
    ) -> Result<bool, SyncError> {
        let key = (target, row.user_id.clone());
        let count = self.poison.entry(key.clone()).or_insert(0);
        *count += 1;
        if *count < self.sync.quarantine_after {
            tracing::warn!(group = %self.group.name, target, user_id = %row.user_id, attempt = *count, error = %msg, "device refused user; will retry");
            self.back_off(target, msg);
            return Ok(false);
        }
        self.poison.remove(&key);
        let entry = QuarantineEntry {
            group: self.group.name.clone(),
            device: target,
            user_id: row.user_id.clone(),
            seq: row.seq,
            code: format!("{code:?}"),
            message: msg.to_owned(),
            since: now_secs(),
        };
        self.store
            .run(move |c| store::add_quarantine(c, &entry))
            .await?;
        // Past it: the quarantine entry stays until the user gets through.
        self.complete_only(target, lane, std::slice::from_ref(row))
            .await?;
        self.metrics
            .quarantined
            .get_or_create(&Metrics::target(&self.group.name, target))
            .inc();
        tracing::error!(group = %self.group.name, target, user_id = %row.user_id, error = %msg, "user quarantined on device: it keeps refusing it; other users go on (retried on reconcile)");
        Ok(true)
    }

    /// `rows` reached `targets`: move them past the rows and clear any
    /// quarantine of their users there, in one transaction.
    async fn complete(
        &mut self,
        targets: &[u32],
        lane: Lane,
        rows: &[JournalRow],
        written: &[JournalRow],
    ) -> Result<(), SyncError> {
        if targets.is_empty() {
            return Ok(());
        }
        // Quarantine entries and parked rows go only for the users whose
        // state was written; the rest of `rows` were parked, dropped or
        // quarantined and keep their entries.
        let users: Vec<String> = written.iter().map(|r| r.user_id.clone()).collect();
        let passed: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
        for t in targets {
            // A target that took a batch starts its retry delays over.
            self.retry.remove(t);
            for u in &users {
                self.poison.remove(&(*t, u.clone()));
            }
            self.metrics
                .applied
                .get_or_create(&Metrics::target(&self.group.name, *t))
                .inc_by(written.len() as u64);
        }
        let name = self.group.name.clone();
        let seq = rows.iter().map(|r| r.seq).max().unwrap_or(0);
        let targets = targets.to_vec();
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for t in &targets {
                    store::clear_quarantine(&tx, &name, *t, &users)?;
                    match lane {
                        Lane::Journal => {
                            store::advance_cursor(&tx, &name, *t, seq)?;
                            // A row parked earlier for these users is older
                            // than what was just applied.
                            store::remove_pending(&tx, &name, *t, &users)?;
                        }
                        Lane::Pending => store::remove_pending(&tx, &name, *t, &passed)?,
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(SyncError::from)
    }

    /// Moves `target` past `rows` (cursor, or pending rows removed).
    async fn complete_only(
        &mut self,
        target: u32,
        lane: Lane,
        rows: &[JournalRow],
    ) -> Result<(), SyncError> {
        let name = self.group.name.clone();
        let users: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
        let seq = rows.iter().map(|r| r.seq).max().unwrap_or(0);
        self.store
            .run(move |c| match lane {
                Lane::Journal => store::advance_cursor(c, &name, target, seq),
                Lane::Pending => store::remove_pending(c, &name, target, &users),
            })
            .await?;
        Ok(())
    }

    fn back_off(&mut self, target: u32, msg: &str) {
        self.metrics
            .failed
            .get_or_create(&Metrics::target(&self.group.name, target))
            .inc();
        let attempt = self.retry.get(&target).map_or(0, |(a, _)| *a);
        let delay = self.backoff.delay(attempt);
        tracing::warn!(group = %self.group.name, target, error = %msg, retry_in = ?delay, "target failed; retrying later");
        self.retry
            .insert(target, (attempt.saturating_add(1), Instant::now() + delay));
    }
}

fn ok_targets(outcomes: &BTreeMap<u32, Outcome>) -> Vec<u32> {
    outcomes
        .iter()
        .filter(|(_, o)| **o == Outcome::Ok)
        .map(|(t, _)| *t)
        .collect()
}

fn outcome_of(e: &GatewayError) -> Outcome {
    match (e.disposition(), e.code()) {
        (Disposition::Permanent, Some(code)) => Outcome::Permanent(code, e.to_string()),
        (Disposition::Permanent, None) => Outcome::Permanent(Code::Unknown, e.to_string()),
        (Disposition::Transient, _) => Outcome::Transient(e.to_string()),
    }
}

/// Marks the devices a failed Multi call names (or all, for a plain
/// failure of the whole call).
fn record_failure(outcomes: &mut BTreeMap<u32, Outcome>, e: &GatewayError) {
    // A Multi error that names none of the devices called says nothing of
    // which failed: all did, as far as we can know.
    let names_ours = e.multi().is_some_and(|m| {
        m.devices
            .iter()
            .any(|d| outcomes.contains_key(&d.device_id))
    });
    match e.multi() {
        Some(m) if names_ours => {
            for d in &m.devices {
                if let Some(o) = outcomes.get_mut(&d.device_id) {
                    *o = match d.disposition() {
                        Disposition::Transient => {
                            Outcome::Transient(format!("{:?}: {}", d.code, d.msg))
                        }
                        Disposition::Permanent => Outcome::Permanent(d.code, d.msg.clone()),
                    };
                }
            }
        }
        _ => {
            let o = outcome_of(e);
            for v in outcomes.values_mut().filter(|v| **v == Outcome::Ok) {
                *v = o.clone();
            }
        }
    }
}

/// Every user ID of `sources`, with the first source that holds it.
pub async fn source_users(
    client: &GatewayClient,
    sources: &[u32],
) -> Result<BTreeMap<String, u32>, GatewayError> {
    let mut out = BTreeMap::new();
    for s in sources {
        for id in client.user_ids(*s).await? {
            out.entry(id).or_insert(*s);
        }
    }
    Ok(out)
}

/// What a target lacks of some source users.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// (user, source): not on the target.
    pub missing: Vec<(String, u32)>,
    /// (user, source): on the target with other bytes.
    pub different: Vec<(String, u32)>,
}

/// Compares `users` (user, source) with what `target` holds: IDs against
/// `target_users`, and record bytes of the users both hold.
pub async fn compare(
    client: &GatewayClient,
    target: u32,
    target_users: &BTreeSet<String>,
    users: Vec<(String, u32)>,
) -> Result<Comparison, GatewayError> {
    let (present, missing): (Vec<_>, Vec<_>) = users
        .into_iter()
        .partition(|(u, _)| target_users.contains(u));
    let mut out = Comparison {
        missing,
        different: Vec::new(),
    };
    let on_target = get_users(
        client,
        target,
        present.iter().map(|(u, _)| u.clone()).collect(),
    )
    .await?;
    let mut by_source: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (u, s) in &present {
        by_source.entry(*s).or_default().push(u.clone());
    }
    for (s, ids) in by_source {
        let on_source = get_users(client, s, ids.clone()).await?;
        for u in ids {
            let same = match (on_source.get(&u), on_target.get(&u)) {
                (Some(a), Some(b)) => a.raw == b.raw,
                _ => false,
            };
            if !same {
                out.different.push((u, s));
            }
        }
    }
    Ok(out)
}

/// The state of `ids` at `device`, each user judged on its own: a record
/// that does not decode or carries an ID not asked for makes the users it
/// might be unknown, and they are asked for one by one; a call that fails
/// for a batch (NOT_FOUND for one unknown ID, WIRE.md §5.3; an answer too
/// large to decode) is split in halves down to the user it fails for. Only
/// a transient failure (the device or the gateway unavailable) fails the
/// whole fetch.
pub async fn fetch_users(
    client: &GatewayClient,
    device: u32,
    ids: Vec<String>,
) -> Result<HashMap<String, Fetched>, GatewayError> {
    let mut out: HashMap<String, Fetched> = HashMap::new();
    let mut work: Vec<Vec<String>> = vec![ids];
    while let Some(ids) = work.pop() {
        if ids.is_empty() {
            continue;
        }
        let wanted: BTreeSet<&String> = ids.iter().collect();
        match client.user_get_checked(device, ids.clone()).await {
            Ok(answer) => {
                let mut foreign = 0usize;
                for u in answer.users {
                    if wanted.contains(&u.id) {
                        out.insert(u.id.clone(), Fetched::Present(u));
                    } else {
                        foreign += 1;
                        tracing::warn!(device_id = device, user_id = %u.id, "User.Get answered a user not asked for");
                    }
                }
                let rest: Vec<String> = ids
                    .iter()
                    .filter(|i| !out.contains_key(*i))
                    .cloned()
                    .collect();
                if answer.unreadable + foreign == 0 {
                    for id in rest {
                        out.insert(id, Fetched::Absent);
                    }
                } else if ids.len() == 1 {
                    for id in rest {
                        out.insert(
                            id,
                            Fetched::Failed(format!(
                                "User.Get answered {} record(s) that cannot be read or carry another ID",
                                answer.unreadable + foreign
                            )),
                        );
                    }
                } else {
                    work.extend(rest.into_iter().map(|id| vec![id]));
                }
            }
            Err(e) if e.disposition() == Disposition::Transient => return Err(e),
            Err(e) if ids.len() == 1 => {
                let id = ids.into_iter().next().unwrap_or_default();
                let f = if e.code() == Some(Code::NotFound) {
                    Fetched::Absent
                } else {
                    Fetched::Failed(e.to_string())
                };
                out.insert(id, f);
            }
            Err(_) => {
                let mut a = ids;
                let b = a.split_off(a.len() / 2);
                work.push(a);
                work.push(b);
            }
        }
    }
    Ok(out)
}

/// `User.Get` that tolerates both answers for unknown IDs (WIRE.md §5.3):
/// omitted, or NOT_FOUND for the whole call (then asked one by one).
pub async fn get_users(
    client: &GatewayClient,
    device: u32,
    ids: Vec<String>,
) -> Result<HashMap<String, UserRecord>, GatewayError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let wanted: BTreeSet<String> = ids.iter().cloned().collect();
    let keep = |v: Vec<UserRecord>| -> HashMap<String, UserRecord> {
        v.into_iter()
            .filter(|u| wanted.contains(&u.id))
            .map(|u| (u.id.clone(), u))
            .collect()
    };
    match client.user_get(device, ids.clone()).await {
        Ok(v) => Ok(keep(v)),
        Err(e) if e.code() == Some(Code::NotFound) => {
            let mut out = Vec::new();
            for id in ids {
                match client.user_get(device, vec![id]).await {
                    Ok(v) => out.extend(v),
                    Err(e) if e.code() == Some(Code::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(keep(out))
        }
        Err(e) => Err(e),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
