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
use crate::store::{self, JournalRow, QuarantineEntry, Store, StoreError};
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
    reconcile: Option<ReconcileRun>,
    targets_initialized: bool,
}

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
            reconcile: None,
            targets_initialized: false,
        }
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
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
            let next_retry = self.retry.values().map(|(_, at)| *at).min();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                r = board.changed() => if r.is_err() { return },
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
        let now = Instant::now();
        self.retry.retain(|_, (_, at)| *at > now);
        if self.reconcile_step().await? {
            return Ok(true);
        }
        self.apply_step().await
    }

    fn eligible(&self, device: u32) -> bool {
        self.board.is_live(device) && !self.retry.contains_key(&device)
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
    /// user its sources hold.
    async fn init_targets(&mut self) -> Result<(), SyncError> {
        let group = self.group.clone();
        let created = self
            .store
            .run(move |c| {
                let tx = c.transaction()?;
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
                tx.commit()?;
                Ok(created)
            })
            .await?;
        for t in created {
            tracing::info!(group = %self.group.name, target = t, "new target: full reconcile requested");
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
                .run(move |c| store::reconcile_done(c, &n, r.target))
                .await?;
        }
        if !self.sources_live() {
            return Ok(false);
        }
        let Some(req) = requests.into_iter().find(|r| self.eligible(r.target)) else {
            return Ok(false);
        };
        let target = req.target;
        let fresh =
            self.reconcile.as_ref().is_none_or(|r| r.target != target) || req.after_user.is_none();
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
                    store::reconcile_progress(&tx, &n, target, &last)?;
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            return Ok(true);
        }

        // Every source user compared: prune extras if asked, then done.
        let extras: Vec<String> = if req.prune {
            run.target_users
                .iter()
                .filter(|u| !run.sources.contains_key(*u))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let first_source = self.group.sources.first().copied().unwrap_or_default();
        let pruned = extras.len();
        let (missing, different) = (run.missing, run.different);
        let n = name.clone();
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for u in extras {
                    // Absent at the source ⇒ the apply path deletes it.
                    store::add_pending(&tx, &n, target, &u, first_source)?;
                }
                store::reconcile_done(&tx, &n, target)?;
                store::set_diverged(&tx, &n, None)?;
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
        tracing::info!(group = %name, target, missing, different, pruned, "reconcile done");
        Ok(true)
    }

    // ---- apply ------------------------------------------------------------

    async fn apply_step(&mut self) -> Result<bool, SyncError> {
        if self.pending_step().await? {
            return Ok(true);
        }
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
        let Some((cursor, cohort)) = plan::cohort(&cursors, &eligible, head) else {
            return Ok(false);
        };
        let rows = {
            let (n, limit) = (name.clone(), self.sync.batch_users);
            self.store
                .run(move |c| store::journal_after(c, &n, cursor, limit))
                .await?
        };
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
        let targets: Vec<u32> = self
            .eligible_targets()
            .into_iter()
            .filter(|t| waiting.contains(t))
            .collect();
        for t in targets {
            let (n, limit) = (self.group.name.clone(), self.sync.batch_users);
            let rows = self
                .store
                .run(move |c| store::pending(c, &n, t, limit))
                .await?;
            if !rows.is_empty() && self.apply_users(&[t], Lane::Pending, rows).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn apply_delete_all(
        &mut self,
        cohort: &[u32],
        row: JournalRow,
    ) -> Result<bool, SyncError> {
        let mut outcomes: BTreeMap<u32, Outcome> =
            cohort.iter().map(|t| (*t, Outcome::Ok)).collect();
        if let Err(e) = self.client.user_delete_all_multi(cohort.to_vec()).await {
            record_failure(&mut outcomes, &e);
        }
        let mut progressed = false;
        for (t, o) in outcomes {
            match o {
                Outcome::Ok => {
                    self.complete(&[t], Lane::Journal, std::slice::from_ref(&row))
                        .await?;
                    tracing::info!(group = %self.group.name, target = t, "all users deleted (propagated)");
                    progressed = true;
                }
                Outcome::Transient(msg) => self.back_off(t, &msg),
                Outcome::Permanent(code, msg) => {
                    progressed |= self.poisoned(t, Lane::Journal, &row, code, &msg).await?;
                }
            }
        }
        Ok(progressed)
    }

    async fn apply_users(
        &mut self,
        cohort: &[u32],
        lane: Lane,
        rows: Vec<JournalRow>,
    ) -> Result<bool, SyncError> {
        // Rows whose source is not live wait; rows before them go now.
        let rows: Vec<JournalRow> = rows
            .into_iter()
            .take_while(|r| self.board.is_live(r.source))
            .collect();
        if rows.is_empty() {
            return Ok(false);
        }
        let records = self.fetch(&rows).await?;
        let (present, absent): (Vec<&JournalRow>, Vec<&JournalRow>) =
            rows.iter().partition(|r| records.contains_key(&r.user_id));

        let mut outcomes: BTreeMap<u32, Outcome> =
            cohort.iter().map(|t| (*t, Outcome::Ok)).collect();
        let enroll: Vec<&UserRecord> = present
            .iter()
            .filter_map(|r| records.get(&r.user_id))
            .collect();
        for chunk in plan::chunks(
            enroll,
            |u| u.raw.len(),
            self.sync.batch_users,
            self.sync.batch_bytes,
        ) {
            let targets = ok_targets(&outcomes);
            if targets.is_empty() {
                break;
            }
            let users = chunk.iter().map(|u| u.raw.clone()).collect();
            if let Err(e) = self.client.user_enroll_multi(targets, users, true).await {
                record_failure(&mut outcomes, &e);
            }
        }
        let deletes: Vec<String> = absent.iter().map(|r| r.user_id.clone()).collect();
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

        let done: Vec<u32> = ok_targets(&outcomes);
        let mut progressed = !done.is_empty();
        // Every target that took the batch moves in one transaction.
        self.complete(&done, lane, &rows).await?;
        for (t, o) in outcomes {
            match o {
                Outcome::Ok => {}
                Outcome::Transient(msg) => self.back_off(t, &msg),
                Outcome::Permanent(_, msg) => {
                    tracing::info!(group = %self.group.name, target = t, error = %msg, "permanent failure in a batch; applying its users one by one");
                    progressed |= self.one_by_one(t, lane, &rows, &records).await?;
                }
            }
        }
        if progressed {
            for r in &rows {
                let action = if records.contains_key(&r.user_id) {
                    "enrolled"
                } else {
                    "deleted"
                };
                tracing::info!(group = %self.group.name, user_id = %r.user_id, source = r.source, targets = ?cohort, action, reconcile = lane == Lane::Pending, "change propagated");
            }
        }
        Ok(progressed)
    }

    /// The current state of the rows' users at their sources.
    async fn fetch(&self, rows: &[JournalRow]) -> Result<HashMap<String, UserRecord>, SyncError> {
        let mut by_source: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for r in rows {
            by_source
                .entry(r.source)
                .or_default()
                .push(r.user_id.clone());
        }
        let mut out = HashMap::new();
        for (s, ids) in by_source {
            out.extend(get_users(&self.client, s, ids).await?);
        }
        Ok(out)
    }

    async fn delete_each(&self, target: u32, ids: &[String]) -> Outcome {
        for id in ids {
            match self.client.user_delete(target, vec![id.clone()]).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NotFound) => {}
                Err(e) => return outcome_of(&e),
            }
        }
        Outcome::Ok
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
            let result = match records.get(&row.user_id) {
                Some(u) => {
                    self.client
                        .user_enroll(target, vec![u.raw.clone()], true)
                        .await
                }
                None => match self
                    .client
                    .user_delete(target, vec![row.user_id.clone()])
                    .await
                {
                    Err(e) if e.code() == Some(Code::NotFound) => Ok(()),
                    other => other,
                },
            };
            match result.as_ref().map_err(outcome_of) {
                Ok(()) => {
                    self.complete(&[target], lane, std::slice::from_ref(row))
                        .await?;
                    progressed = true;
                }
                Err(Outcome::Permanent(code, msg)) => {
                    if !self.poisoned(target, lane, row, code, &msg).await? {
                        return Ok(progressed);
                    }
                    progressed = true;
                }
                Err(Outcome::Transient(msg)) => {
                    self.back_off(target, &msg);
                    return Ok(progressed);
                }
                Err(Outcome::Ok) => {}
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
    ) -> Result<(), SyncError> {
        if targets.is_empty() {
            return Ok(());
        }
        let users: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
        for t in targets {
            for u in &users {
                self.poison.remove(&(*t, u.clone()));
            }
            self.metrics
                .applied
                .get_or_create(&Metrics::target(&self.group.name, *t))
                .inc_by(rows.len() as u64);
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
                        Lane::Journal => store::advance_cursor(&tx, &name, *t, seq)?,
                        Lane::Pending => store::remove_pending(&tx, &name, *t, &users)?,
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
    match e.multi() {
        Some(m) if !m.devices.is_empty() => {
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
