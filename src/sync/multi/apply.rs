//! Applying a multi-master group's registers to its members: the journal
//! lane (every member of a cohort at one cursor) and the pending lane (one
//! member: rows a reconcile queued, changes set back, rows parked while
//! the member holding a version could not answer).

use super::super::failure::{Failure, ok_targets, record_failure};
use super::*;
use crate::store::multi::MemberRow;
use crate::sync::multi::order::{Stamp, Version};

/// A row as the shared bookkeeping (cursors, pending, quarantine) sees it.
fn journal_row(r: &MemberRow) -> JournalRow {
    JournalRow {
        seq: r.seq,
        user_id: r.user_id.clone(),
        source: r.source,
        kind: ChangeKind::User,
    }
}

/// Whether `device` surely wrote nothing of a failed call: it could not be
/// reached (UNAVAILABLE, for it or for the call). Any other failure (a
/// timeout, a cut-off call, no stated reason) may have written: its writes
/// stay expected (the read after the grace ends them if nothing came), so
/// a late echo is not taken for a change.
fn unreached(e: &crate::gateway::GatewayError, device: u32) -> bool {
    e.code_for(device) == Some(Code::Unavailable)
}

/// Pages of a member's pending lane looked through at most per step for
/// rows that can go now, and their size.
const PENDING_PAGES: usize = 64;
const PENDING_PAGE: usize = 512;

impl Applier {
    /// The next journal batch for the next cohort of members.
    pub(super) async fn members_journal_step(&mut self) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        let (cursors, head) = {
            let n = name.clone();
            self.store
                .run(move |c| Ok((store::cursors(c, &n)?, store::head(c, &n)?)))
                .await?
        };
        for m in self.members() {
            let behind = cursors.get(&m).map_or(0, |c| head.saturating_sub(*c));
            self.metrics
                .backlog
                .get_or_create(&Metrics::target(&name, m))
                .set(i64::try_from(behind).unwrap_or(i64::MAX));
        }
        let eligible = self.eligible_members();
        let Some((cursor, cohort)) = plan::cohort(&cursors, &eligible, head, self.last_cohort)
        else {
            return Ok(false);
        };
        let rows = {
            let (n, limit) = (name.clone(), self.batch_limit);
            self.store
                .run(move |c| store::multi::rows_after(c, &n, cursor, limit))
                .await?
        };
        self.last_cohort = rows.last().map(|r| r.seq).or(Some(cursor));
        if rows.is_empty() {
            // Nothing a multi-master register holds is left below the head.
            let done: Vec<JournalRow> = vec![JournalRow {
                seq: head,
                user_id: String::new(),
                source: 0,
                kind: ChangeKind::User,
            }];
            self.complete(&cohort, Lane::Journal, &done, &[]).await?;
            return Ok(true);
        }
        self.apply_members(&cohort, Lane::Journal, rows).await
    }

    /// Rows queued for one member alone, brought to what the register says
    /// now (or, for a user with no history, to the row's source).
    pub(super) async fn members_pending_step(&mut self) -> Result<bool, SyncError> {
        let now = Instant::now();
        let members = self.with_pending(self.eligible_members()).await?;
        for t in members {
            // Pages of queued rows until a batch is ready to go: rows that
            // wait aside (their member cannot answer, or lost the version)
            // never hide the rows behind them.
            let mut rows: Vec<MemberRow> = Vec::new();
            let mut after = String::new();
            for _ in 0..PENDING_PAGES {
                let (n, limit, all, from) = (
                    self.group.name.clone(),
                    PENDING_PAGE,
                    self.members(),
                    after.clone(),
                );
                let (queued, registers) = self
                    .store
                    .run(move |c| {
                        let rows = store::pending_after(c, &n, t, &from, limit, &all)?;
                        let users: Vec<String> = rows.iter().map(|r| r.user_id.clone()).collect();
                        Ok((rows, store::multi::rows_of(c, &n, &users)?))
                    })
                    .await?;
                let full = queued.len() >= limit;
                if let Some(last) = queued.last() {
                    after = last.user_id.clone();
                }
                rows.extend(
                    queued
                        .into_iter()
                        .filter(|r| {
                            self.source_poison
                                .get(&r.user_id)
                                .is_none_or(|(_, at)| *at <= now)
                        })
                        .map(|r| match registers.get(&r.user_id) {
                            Some(reg) => MemberRow {
                                seq: 0,
                                ..reg.clone()
                            },
                            // No history: a reconcile chose the version at
                            // the row's source.
                            None => MemberRow {
                                seq: 0,
                                user_id: r.user_id,
                                source: r.source,
                                version: Version {
                                    stamp: Stamp {
                                        time: 0,
                                        device: r.source,
                                    },
                                    deleted: false,
                                },
                            },
                        })
                        // A version whose member cannot answer now, or lost
                        // it, waits aside (a delete needs no member's
                        // record).
                        .filter(|r| {
                            r.version.deleted
                                || (self.source_ready(r.source)
                                    && self
                                        .multi
                                        .absent
                                        .get(&r.user_id)
                                        .is_none_or(|(_, at)| *at <= now))
                        }),
                );
                if rows.len() >= self.batch_limit || !full {
                    break;
                }
            }
            rows.truncate(self.batch_limit);
            if rows.is_empty() {
                continue;
            }
            if self.apply_members(&[t], Lane::Pending, rows).await? {
                self.timers.pending.remove(&t);
                return Ok(true);
            }
            let n = self.timers.pending.get(&t).map_or(0, |(n, _)| *n);
            self.timers.pending.insert(
                t,
                (n.saturating_add(1), Instant::now() + self.backoff.delay(n)),
            );
        }
        Ok(false)
    }

    /// The rows whose register still says what they were read for: a
    /// change recorded since (the settle read found one) supersedes them.
    async fn still_current(
        &self,
        written: Vec<MemberRow>,
        deletes: Vec<MemberRow>,
    ) -> Result<(Vec<MemberRow>, Vec<MemberRow>), SyncError> {
        let users: Vec<String> = written
            .iter()
            .chain(&deletes)
            .map(|r| r.user_id.clone())
            .collect();
        let n = self.group.name.clone();
        let now = self
            .store
            .run(move |c| store::multi::rows_of(c, &n, &users))
            .await?;
        let current = |r: &MemberRow| match now.get(&r.user_id) {
            Some(reg) => reg.version == r.version,
            // No history when read (a reconcile's choice): still none.
            None => r.version.stamp.time == 0,
        };
        let name = &self.group.name;
        let keep = |rows: Vec<MemberRow>| -> Vec<MemberRow> {
            rows.into_iter()
                .filter(|r| {
                    let ok = current(r);
                    if !ok {
                        tracing::info!(group = %name, user_id = %r.user_id,
                            "a newer change of this user was recorded just before the write: left to it");
                    }
                    ok
                })
                .collect()
        };
        Ok((keep(written), keep(deletes)))
    }

    /// Remembers writes about to be made (or, `undo`, that failed), so
    /// the events they cause are known as the daemon's own. Kept in every
    /// echo mode: in changed-on-device mode they tell an echo from another
    /// client's write.
    async fn expect(
        &self,
        devices: &[u32],
        users: &[String],
        op: MemberOp,
        undo: bool,
    ) -> Result<(), SyncError> {
        if devices.is_empty() || users.is_empty() {
            return Ok(());
        }
        let (n, d, u) = (self.group.name.clone(), devices.to_vec(), users.to_vec());
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                if undo {
                    store::multi::unexpect_own_writes(&tx, &n, &d, &u, op)?;
                } else {
                    store::multi::expect_own_writes(&tx, &n, &d, &u, op)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Writes `rows` to `cohort` ([`Self::write_members`]), then stamps the
    /// writes made as returned and has the members' logs read once the
    /// grace has passed, so writes that logged nothing stop being expected.
    pub(super) async fn apply_members(
        &mut self,
        cohort: &[u32],
        lane: Lane,
        rows: Vec<MemberRow>,
    ) -> Result<bool, SyncError> {
        let moved = self.write_members(cohort, lane, rows).await;
        let (n, tick) = (self.group.name.clone(), store::multi::own_write_tick());
        let stamped = self
            .store
            .run(move |c| store::multi::own_writes_done(c, &n, tick))
            .await?;
        if stamped == 0 {
            return moved;
        }
        let due = Instant::now()
            + std::time::Duration::from_millis(
                u64::try_from(store::multi::OWN_WRITE_GRACE_MS).unwrap_or(0) + 100,
            );
        for m in cohort {
            self.timers.confirm.insert(*m, (0, due));
        }
        moved
    }

    /// Writes `rows` to `cohort`: each version to every member but the one
    /// it is read from, each delete to every member. Returns whether
    /// anything moved.
    async fn write_members(
        &mut self,
        cohort: &[u32],
        lane: Lane,
        rows: Vec<MemberRow>,
    ) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        let now = Instant::now();
        let others =
            |src: u32| -> Vec<u32> { cohort.iter().copied().filter(|m| *m != src).collect() };
        let mut deletes: Vec<MemberRow> = Vec::new();
        let mut by_source: BTreeMap<u32, Vec<MemberRow>> = BTreeMap::new();
        // Rows that need nothing of this cohort (a version only its own
        // source is in the cohort for), or that were settled otherwise.
        let mut settled: Vec<MemberRow> = Vec::new();
        for r in rows.iter().cloned() {
            if r.version.deleted {
                deletes.push(r);
            } else if others(r.source).is_empty() {
                settled.push(r);
            } else {
                by_source.entry(r.source).or_default().push(r);
            }
        }
        // Versions whose source cannot answer now wait aside (journal
        // lane: parked for the members they go to).
        let mut waiting: Vec<MemberRow> = Vec::new();
        let mut records: HashMap<String, UserRecord> = HashMap::new();
        let mut written: Vec<MemberRow> = Vec::new();
        for (src, rs) in by_source {
            let (ready, later): (Vec<MemberRow>, Vec<MemberRow>) = rs.into_iter().partition(|r| {
                self.source_ready(src)
                    && self
                        .source_poison
                        .get(&r.user_id)
                        .is_none_or(|(_, at)| *at <= now)
            });
            waiting.extend(later);
            if ready.is_empty() {
                continue;
            }
            let ids: Vec<String> = ready.iter().map(|r| r.user_id.clone()).collect();
            let fetched = match fetch_users(&self.client, src, ids).await {
                Ok(f) => {
                    self.timers.source.remove(&src);
                    f
                }
                Err(e) => {
                    self.batch_timed_out(&e);
                    self.source_backoff(src, &e);
                    waiting.extend(ready);
                    continue;
                }
            };
            for r in ready {
                match fetched.get(&r.user_id) {
                    Some(Fetched::Present(u)) => {
                        records.insert(r.user_id.clone(), u.clone());
                        written.push(r);
                    }
                    Some(Fetched::Failed(why)) => {
                        let why = why.clone();
                        if self
                            .source_failed(&others(src), lane, &journal_row(&r), &why)
                            .await?
                        {
                            settled.push(r);
                        }
                    }
                    // The member no longer holds the version it made or was
                    // given: a newer change there (its delete) is on the way,
                    // or it was wiped (its reconcile follows). Never taken for
                    // a delete; waits.
                    Some(Fetched::Absent) => {
                        let n = self.multi.absent.get(&r.user_id).map_or(0, |(n, _)| *n);
                        let delay = self.backoff.delay(n);
                        tracing::warn!(group = %name, user_id = %r.user_id, source = src, retry_in = ?delay,
                            "the member holding the winning version no longer holds it; its newer change or a reconcile settles it, the others keep what they hold");
                        self.multi
                            .absent
                            .insert(r.user_id.clone(), (n.saturating_add(1), now + delay));
                        waiting.push(r);
                    }
                    _ => waiting.push(r),
                }
            }
        }
        if lane == Lane::Journal {
            for r in &waiting {
                self.park(&others(r.source), std::slice::from_ref(&journal_row(r)))
                    .await?;
            }
        }
        if written.is_empty() && deletes.is_empty() {
            let all: Vec<JournalRow> = match lane {
                Lane::Journal => rows.iter().map(journal_row).collect(),
                Lane::Pending => settled.iter().map(journal_row).collect(),
            };
            if all.is_empty() {
                return Ok(false);
            }
            self.complete(cohort, lane, &all, &[]).await?;
            return Ok(true);
        }

        // Right before writing, the members' logs are read up to now
        // (after the winners' records were read, to keep the moment
        // between that read and the write short): a change made at one of
        // them is recorded first, and a row whose register moved on meanwhile
        // is left to its newer change (its own row, later in the journal, or
        // the same pending row again). A member whose log could not be read
        // is not written (it backs off).
        let read = self.settle_logs(cohort).await;
        let (mut written, deletes) = self.still_current(written, deletes).await?;
        let mut outcomes: BTreeMap<u32, Result<(), Failure>> =
            read.iter().map(|t| (*t, Ok(()))).collect();
        let mut sources: Vec<u32> = written.iter().map(|r| r.source).collect();
        sources.dedup();
        for src in sources {
            let users: Vec<&UserRecord> = written
                .iter()
                .filter(|r| r.source == src)
                .filter_map(|r| records.get(&r.user_id))
                .collect();
            for chunk in plan::chunks(
                users,
                |u| u.raw.len(),
                self.batch_limit,
                self.sync.batch_bytes,
            ) {
                let targets: Vec<u32> = ok_targets(&outcomes)
                    .into_iter()
                    .filter(|t| *t != src)
                    .collect();
                if targets.is_empty() {
                    break;
                }
                let ids: Vec<String> = chunk.iter().map(|u| u.id.clone()).collect();
                self.expect(&targets, &ids, MemberOp::Upsert, false).await?;
                let raws = chunk.iter().map(|u| u.raw.clone()).collect();
                match self
                    .client
                    .user_enroll_multi(targets.clone(), raws, true)
                    .await
                {
                    Ok(()) => self.batch_fits(),
                    Err(e) => {
                        self.batch_timed_out(&e);
                        let mut called: BTreeMap<u32, Result<(), Failure>> =
                            targets.iter().map(|t| (*t, Ok(()))).collect();
                        record_failure(&mut called, &e);
                        // A device that could not be reached wrote nothing;
                        // any other failure may have written.
                        let unwritten: Vec<u32> = called
                            .iter()
                            .filter(|(t, o)| {
                                matches!(o, Err(Failure::Transient(_))) && unreached(&e, **t)
                            })
                            .map(|(t, _)| *t)
                            .collect();
                        self.expect(&unwritten, &ids, MemberOp::Upsert, true)
                            .await?;
                        for (t, o) in called.into_iter().filter(|(_, o)| o.is_err()) {
                            outcomes.insert(t, o);
                        }
                    }
                }
            }
        }
        let ids: Vec<String> = deletes.iter().map(|r| r.user_id.clone()).collect();
        if !ids.is_empty() {
            let targets = ok_targets(&outcomes);
            if !targets.is_empty() {
                self.expect(&targets, &ids, MemberOp::Delete, false).await?;
                if let Err(e) = self
                    .client
                    .user_delete_multi(targets.clone(), ids.clone())
                    .await
                {
                    let mut called: BTreeMap<u32, Result<(), Failure>> =
                        targets.iter().map(|t| (*t, Ok(()))).collect();
                    record_failure(&mut called, &e);
                    // A member that could not be reached deleted nothing; one
                    // that is connected is tried one by one (still expected).
                    let unwritten: Vec<u32> = called
                        .iter()
                        .filter(|(t, o)| {
                            matches!(o, Err(Failure::Transient(_)))
                                && unreached(&e, **t)
                                && !self.delete_again(**t, o, &e)
                        })
                        .map(|(t, _)| *t)
                        .collect();
                    self.expect(&unwritten, &ids, MemberOp::Delete, true)
                        .await?;
                    for (t, o) in called {
                        // A member did not hold some user (the delete had
                        // reached it, or it never had it; WIRE.md §5.3):
                        // deleted one by one, missing confirmed by its list.
                        let o = if self.delete_again(t, &o, &e) {
                            self.delete_each(t, &ids).await
                        } else {
                            o
                        };
                        if o.is_err() {
                            outcomes.insert(t, o);
                        }
                    }
                }
            }
        }

        written.extend(deletes);
        let written_rows: Vec<JournalRow> = written.iter().map(journal_row).collect();
        let passed: Vec<JournalRow> = match lane {
            Lane::Journal => rows.iter().map(journal_row).collect(),
            Lane::Pending => written.iter().chain(&settled).map(journal_row).collect(),
        };
        let done = ok_targets(&outcomes);
        let mut progressed = !done.is_empty();
        self.complete(&done, lane, &passed, &written_rows).await?;
        for (t, o) in outcomes {
            match o {
                Ok(()) => {}
                Err(Failure::Transient(msg)) => self.back_off(t, &msg),
                Err(Failure::Permanent(_, msg)) => {
                    tracing::info!(group = %name, target = t, error = %msg, "permanent failure in a batch; applying its users one by one");
                    // What this member was to get: not the versions read
                    // from itself.
                    // In journal order: each row done moves the member's
                    // cursor to it, so one refused must stop those after it
                    // (the batch is grouped by source, deletes last).
                    let mut mine: Vec<JournalRow> = written
                        .iter()
                        .filter(|r| r.version.deleted || r.source != t)
                        .map(journal_row)
                        .collect();
                    mine.sort_by_key(|r| r.seq);
                    // Written again one by one: expected again.
                    let (del, up): (Vec<&MemberRow>, Vec<&MemberRow>) = written
                        .iter()
                        .filter(|r| r.version.deleted || r.source != t)
                        .partition(|r| r.version.deleted);
                    let ids = |v: Vec<&MemberRow>| {
                        v.iter().map(|r| r.user_id.clone()).collect::<Vec<_>>()
                    };
                    self.expect(&[t], &ids(up), MemberOp::Upsert, false).await?;
                    self.expect(&[t], &ids(del), MemberOp::Delete, false)
                        .await?;
                    progressed |= self.one_by_one(t, lane, &mine, &records).await?;
                }
            }
        }
        if progressed {
            for r in &written {
                self.source_poison.remove(&r.user_id);
                self.multi.absent.remove(&r.user_id);
                let action = if r.version.deleted {
                    "deleted"
                } else {
                    "enrolled"
                };
                // Only the members that took the batch: one whose log could
                // not be read, that failed, or that is retried one by one is
                // not named.
                let to: Vec<u32> = if r.version.deleted {
                    cohort.to_vec()
                } else {
                    others(r.source)
                }
                .into_iter()
                .filter(|m| done.contains(m))
                .collect();
                tracing::info!(group = %name, user_id = %r.user_id, source = r.source,
                    origin = r.version.stamp.device, change_time = r.version.stamp.time,
                    members = ?to, action, reconcile = lane == Lane::Pending, "change propagated");
            }
        }
        Ok(progressed)
    }
}
