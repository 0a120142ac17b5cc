//! Applying rows: the journal lane (every target of a cohort at one
//! cursor, one Multi call) and the pending lane (one target's reconcile
//! and parked rows); batches, deletes, and moving targets past what they
//! hold, in one transaction.

use super::failure::{Failure, ok_targets, record_failure};
use super::*;

impl Applier {
    /// The next journal batch for the next cohort in turn.
    pub(super) async fn journal_step(&mut self) -> Result<bool, SyncError> {
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
    pub(super) async fn pending_step(&mut self) -> Result<bool, SyncError> {
        let targets = self.with_pending(self.eligible_targets()).await?;
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
                self.timers.pending.remove(&t);
                return Ok(true);
            }
            // Nothing of it could go (its sources cannot answer yet): look
            // again later, not at every wake.
            let n = self.timers.pending.get(&t).map_or(0, |(n, _)| *n);
            self.timers.pending.insert(
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
    pub(super) async fn apply_delete_all(
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

    pub(super) async fn apply_users(
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

        let mut outcomes: BTreeMap<u32, Result<(), Failure>> =
            cohort.iter().map(|t| (*t, Ok(()))).collect();
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
                let mut delete_outcomes: BTreeMap<u32, Result<(), Failure>> = ok_targets(&outcomes)
                    .into_iter()
                    .map(|t| (t, Ok(())))
                    .collect();
                record_failure(&mut delete_outcomes, &e);
                for (t, o) in delete_outcomes {
                    // Some user was already gone (WIRE.md §5.3): delete one
                    // by one, where missing counts as done.
                    let o = if self.delete_again(t, &o, &e) {
                        self.delete_each(t, &deletes).await
                    } else {
                        o
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
                Ok(()) => {}
                Err(Failure::Transient(msg)) => self.back_off(t, &msg),
                Err(Failure::Permanent(_, msg)) => {
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
    pub(super) async fn park(&self, cohort: &[u32], rows: &[JournalRow]) -> Result<(), SyncError> {
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

    /// A call that timed out as a whole may carry too much for a slow
    /// device: halve the batch (down to one user).
    pub(super) fn batch_timed_out(&mut self, e: &GatewayError) {
        let timeout =
            matches!(e, GatewayError::Timeout { .. }) || e.code() == Some(Code::DeadlineExceeded);
        if timeout && self.batch_limit > 1 {
            self.batch_limit /= 2;
            tracing::warn!(group = %self.group.name, batch_users = self.batch_limit, "a call timed out; smaller batches from now on");
        }
    }

    /// A batch went through: grow back towards `batch_users`.
    pub(super) fn batch_fits(&mut self) {
        self.batch_limit = (self.batch_limit * 2).min(self.sync.batch_users).max(1);
    }

    /// Deletes one by one; NOT_FOUND counts as done only if the target's
    /// user list confirms the user is not there (the code might name an
    /// unknown device rather than an unknown user).
    pub(super) async fn delete_each(&self, target: u32, ids: &[String]) -> Result<(), Failure> {
        // The device's users, listed once a delete failed with NOT_FOUND or
        // a code that says nothing (WIRE.md §5.3 leaves open what a delete
        // of a missing user answers): a user it does not hold is deleted.
        // A list with headers it cannot read proves no absence: a single
        // User.Get of the user decides then.
        let mut listed: Option<(BTreeSet<String>, bool)> = None;
        for id in ids {
            let e = match self.client.user_delete(target, vec![id.clone()]).await {
                Ok(()) => continue,
                Err(e) => e,
            };
            let not_found = e.code() == Some(Code::NotFound);
            if !not_found && !e.answered_vaguely(target) {
                return Err(Failure::of(&e));
            }
            if listed.is_none() {
                let l = self
                    .client
                    .user_ids_checked(target)
                    .await
                    .map_err(|_| Failure::of(&e))?;
                listed = Some((l.ids.into_iter().collect(), l.unreadable == 0));
            }
            let Some((l, trusted)) = listed.as_ref() else {
                return Err(Failure::of(&e));
            };
            let absent = if *trusted {
                !l.contains(id)
            } else {
                match self.client.user_get(target, vec![id.clone()]).await {
                    Ok(users) => users.iter().all(|u| u.id != *id),
                    Err(g) => g.code() == Some(Code::NotFound),
                }
            };
            if absent {
                continue;
            }
            return Err(if not_found {
                Failure::Permanent(
                    Code::NotFound,
                    format!("delete of user {id} answered NOT_FOUND, yet the device holds it"),
                )
            } else {
                Failure::of(&e)
            });
        }
        Ok(())
    }

    /// Whether a delete that failed at `target` (the call failed with
    /// `e`) is tried again one by one now ([`Self::delete_each`]):
    /// NOT_FOUND, or a connected device that answered with a code that
    /// says nothing (the code for a missing user is not known). Not a
    /// device that did not answer (unavailable, timed out): it backs off.
    pub(super) fn delete_again(
        &self,
        target: u32,
        o: &Result<(), Failure>,
        e: &GatewayError,
    ) -> bool {
        match o {
            Err(Failure::Permanent(Code::NotFound, _)) => true,
            Err(_) => self.board.is_live(target) && e.answered_vaguely(target),
            Ok(()) => false,
        }
    }

    /// `rows` reached `targets`: move them past the rows and clear any
    /// quarantine of their users there, in one transaction.
    pub(super) async fn complete(
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
            self.timers.target.remove(t);
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
    pub(super) async fn complete_only(
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
}
