//! Reconcile of a multi-master group (first start, a member added, reset or
//! wiped, a delete-all at a member, a request): one pass over the union of
//! every member's users, chunk by chunk, while the journal lane goes on.
//!
//! Per user:
//! * the journal knows its history: a tombstone is deleted wherever it is
//!   held; a version is copied wherever it is missing or differs (read from
//!   its member, or from another member holding it if its own lost it);
//! * no history, one version among the members that hold it: copied to the
//!   members that lack it (the union: a user is never deleted on a guess);
//! * no history, versions that differ: a conflict, reported (log, state,
//!   `status`) and left alone; with `prune = true` the first member in
//!   `members` order that holds it settles it.
//!
//! What it queues goes to each member's pending lane, applied (after that
//! member's log is read) to what the register says by then.

use super::*;

/// The reason of a member's reconcile when it joins the group.
pub(super) const NEW_MEMBER: &str = "new member";

/// How long a member must have been unreachable before the others are
/// reconciled without it.
const PARTIAL_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a full reconcile under way waits for a member that went away
/// before the reachable members are reconciled among themselves.
const FULL_RUN_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a chunk of a member reconcile failed.
enum ChunkError {
    /// A member's reads failed: it is left out for a while.
    Member(u32, crate::gateway::GatewayError),
    Other(SyncError),
}

impl From<StoreError> for ChunkError {
    fn from(e: StoreError) -> Self {
        ChunkError::Other(SyncError::Store(e))
    }
}

/// A reconcile under way.
pub(super) struct Run {
    /// The requests it serves: (member, generation).
    requests: Vec<(u32, i64)>,
    /// The members it reads and writes: every member, or (`partial`) the
    /// reachable ones. A partial run only copies: a user with a history is
    /// copied from where it is read (if reachable) to reachable members
    /// that lack it, a tombstone deleted where reachable members hold it,
    /// and a user with no history copied among them only where they
    /// agree; what it cannot see (the unreachable members' versions) it
    /// never decides. Its requests stay open for the full run.
    reach: Vec<u32>,
    partial: bool,
    reason: String,
    /// Each member's user IDs when it started.
    lists: BTreeMap<u32, BTreeSet<String>>,
    /// Every user to look at, in order, and how far it got.
    users: Vec<String>,
    next: usize,
    /// Per member: users queued because missing, because different, and
    /// tombstones queued for deletion.
    missing: BTreeMap<u32, u64>,
    different: BTreeMap<u32, u64>,
    deleted: BTreeMap<u32, u64>,
    /// (user, what differs): no history decides.
    conflicts: Vec<(String, String)>,
    settled_by_order: u64,
}

/// What the members hold of one user: the record at each holder.
type Held = BTreeMap<u32, UserRecord>;

/// A user's versions, said with device IDs and sizes only.
fn describe(held: &Held) -> String {
    let mut versions: Vec<(Vec<u32>, usize)> = Vec::new();
    for (m, u) in held {
        match versions
            .iter_mut()
            .find(|(ms, _)| held.get(&ms[0]).is_some_and(|o| o.raw == u.raw))
        {
            Some((ms, _)) => ms.push(*m),
            None => versions.push((vec![*m], u.raw.len())),
        }
    }
    versions
        .iter()
        .map(|(ms, size)| format!("{ms:?} hold one version ({size} bytes)"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a pass runs, each reason said once with the members that asked
/// ("new member (1 2 3)"): one pass serves every request, and `status`
/// shows this for every member.
fn reason_of(requests: &[store::ReconcileRequest]) -> String {
    let mut reasons: Vec<(&str, Vec<String>)> = Vec::new();
    for r in requests {
        match reasons.iter_mut().find(|(why, _)| *why == r.reason) {
            Some((_, members)) => members.push(r.target.to_string()),
            None => reasons.push((&r.reason, vec![r.target.to_string()])),
        }
    }
    reasons
        .iter()
        .map(|(why, members)| format!("{why} ({})", members.join(" ")))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Applier {
    pub(super) async fn members_reconcile_step(&mut self) -> Result<bool, SyncError> {
        let name = self.group.name.clone();
        let members = self.members();
        let (requests, stale): (Vec<store::ReconcileRequest>, Vec<store::ReconcileRequest>) = self
            .store
            .run(|c| store::reconcile_requests(c))
            .await?
            .into_iter()
            .filter(|r| r.group == name)
            .partition(|r| members.contains(&r.target));
        for r in stale {
            let n = name.clone();
            self.store
                .run(move |c| store::reconcile_done(c, &n, r.target, r.generation))
                .await?;
        }
        if requests.is_empty() {
            self.multi.reconcile = None;
            self.multi.partial = None;
            self.multi.paused = None;
            return Ok(false);
        }
        let now = Instant::now();
        if self
            .timers
            .reconcile
            .get(&0)
            .is_some_and(|(_, at)| *at > now)
        {
            return Ok(false);
        }
        // The union needs every member's list. With some unreachable, the
        // reachable ones are reconciled among themselves, copies only
        // (see [`Run::partial`]), and the full reconcile follows when every
        // member is back: a member reset while another is offline is
        // refilled now.
        // Reachable: connected (a member backing off its writes still
        // answers the reads a reconcile makes).
        // A member whose reads failed lately is left out for its delay.
        let reach: Vec<u32> = members
            .iter()
            .copied()
            .filter(|m| {
                self.board.is_live(*m)
                    && self
                        .timers
                        .reconcile
                        .get(m)
                        .is_none_or(|(_, at)| *at <= now)
            })
            .collect();
        let serving: Vec<(u32, i64)> = requests.iter().map(|r| (r.target, r.generation)).collect();
        if reach.len() < members.len() {
            // A full run under way waits a while for the member, its
            // progress kept; then the reachable ones go on without it.
            let waited = *self.multi.paused.get_or_insert(now);
            let full_under_way = self
                .multi
                .reconcile
                .as_ref()
                .is_some_and(|run| !run.partial && run.requests == serving)
                && now.duration_since(waited) < FULL_RUN_WAIT;
            let asked_reachable = requests.iter().any(|r| reach.contains(&r.target));
            // Not at a group's first start (its members are still coming
            // up, and what one of them holds may differ: copying the other
            // side first would take sides in a conflict), nor before a
            // member has been away a moment (a restart brings them up one
            // by one).
            let first_start = requests.iter().any(|r| r.reason == NEW_MEMBER);
            let too_soon = now.duration_since(waited) < PARTIAL_AFTER;
            // A partial run is run again only when it would reach a member
            // the last one did not (a flapping member costs one).
            let done_so = self
                .multi
                .partial
                .as_ref()
                .is_some_and(|(s, r)| *s == serving && reach.iter().all(|m| r.contains(m)));
            if full_under_way
                || first_start
                || too_soon
                || reach.len() < 2
                || !asked_reachable
                || done_so
            {
                return Ok(false);
            }
        }
        if reach.len() == members.len() {
            self.multi.paused = None;
        }
        let fresh = self
            .multi
            .reconcile
            .as_ref()
            .is_none_or(|run| run.requests != serving || run.reach != reach);
        if fresh {
            let mut lists = BTreeMap::new();
            for m in &reach {
                match self.client.user_ids(*m).await {
                    Ok(ids) => {
                        lists.insert(*m, ids.into_iter().collect::<BTreeSet<String>>());
                    }
                    Err(e) => {
                        self.member_read_failed(*m, &e);
                        return Ok(true);
                    }
                }
            }
            let n = name.clone();
            let known = self
                .store
                .run(move |c| store::multi::all_rows(c, &n))
                .await?;
            let mut users: BTreeSet<String> = lists.values().flatten().cloned().collect();
            users.extend(known.into_keys());
            let mut reason = reason_of(&requests);
            let unreachable: Vec<u32> = members
                .iter()
                .copied()
                .filter(|m| !reach.contains(m))
                .collect();
            if unreachable.is_empty() {
                tracing::info!(group = %name, reason = %reason, users = users.len(),
                    members = ?lists.iter().map(|(m, l)| (*m, l.len())).collect::<Vec<_>>(), "reconcile of the members started");
            } else {
                tracing::info!(group = %name, reason = %reason, users = users.len(), unreachable = ?unreachable,
                    members = ?lists.iter().map(|(m, l)| (*m, l.len())).collect::<Vec<_>>(),
                    "reconcile of the reachable members started (copies only; the full reconcile follows when every member is back)");
                reason = format!("{reason} (partial: members {unreachable:?} unreachable)");
            }
            self.multi.reconcile = Some(Run {
                requests: serving,
                partial: !unreachable.is_empty(),
                reach: reach.clone(),
                reason,
                lists,
                users: users.into_iter().collect(),
                next: 0,
                missing: BTreeMap::new(),
                different: BTreeMap::new(),
                deleted: BTreeMap::new(),
                conflicts: Vec::new(),
                settled_by_order: 0,
            });
        }
        let Some(mut run) = self.multi.reconcile.take() else {
            return Ok(false);
        };
        if run.next < run.users.len() {
            let end = (run.next + self.sync.batch_users).min(run.users.len());
            let chunk: Vec<String> = run.users[run.next..end].to_vec();
            match self.reconcile_chunk(&mut run, &chunk).await {
                Ok(()) => {
                    run.next = end;
                    self.multi.reconcile = Some(run);
                    return Ok(true);
                }
                // The run is over; the next one is without that member for
                // its delay (partial), or with it again.
                Err(ChunkError::Member(m, e)) => {
                    self.member_read_failed(m, &e);
                    return Ok(true);
                }
                Err(ChunkError::Other(e)) => return Err(e),
            }
        }
        self.finish_reconcile(run).await?;
        Ok(true)
    }

    /// Compares one chunk of users across the members and queues what
    /// differs.
    async fn reconcile_chunk(&mut self, run: &mut Run, chunk: &[String]) -> Result<(), ChunkError> {
        let name = self.group.name.clone();
        let members = run.reach.clone();
        // What each member holds of the chunk, read now (the lists are as
        // old as the reconcile).
        let mut held: BTreeMap<String, Held> = BTreeMap::new();
        for m in &members {
            let listed: Vec<String> = chunk
                .iter()
                .filter(|u| run.lists.get(m).is_some_and(|l| l.contains(*u)))
                .cloned()
                .collect();
            let got = get_users(&self.client, *m, listed)
                .await
                .map_err(|e| ChunkError::Member(*m, e))?;
            for (u, rec) in got {
                held.entry(u).or_default().insert(*m, rec);
            }
        }
        let (n, users) = (name.clone(), chunk.to_vec());
        let (registers, cursors, given) = self
            .store
            .run(move |c| {
                let registers = store::multi::rows_of(c, &n, &users)?;
                let mut given = HashMap::new();
                for r in registers.values() {
                    let known = if r.version.deleted {
                        // For a tombstone: where a delete is known to wait.
                        store::multi::waiting_for(c, &n, &r.user_id, r.seq)?
                    } else {
                        store::multi::given_winner(c, &n, &r.user_id, r.seq)?
                    };
                    given.insert(r.user_id.clone(), known);
                }
                Ok((registers, store::cursors(c, &n)?, given))
            })
            .await?;
        let prune = self.group.prune;
        // (member, user, source) to queue; (user, new source) to re-point.
        let mut queue: Vec<(u32, String, u32)> = Vec::new();
        let mut repoint: Vec<(String, u32)> = Vec::new();
        for u in chunk {
            let h = held.remove(u).unwrap_or_default();
            match registers.get(u) {
                Some(reg) if reg.version.deleted => {
                    // A member behind the tombstone gets it by the journal
                    // (its cursor). One past it that holds the user anyway
                    // (new to the group, its log lost or reset, a change
                    // there never seen, a delete it refused) may hold a
                    // person enrolled since under that ID: not deleted on
                    // a guess, a conflict (unless prune).
                    // One where the delete is known to wait (queued, or
                    // refused and quarantined) missed it: deleted there.
                    let missed = given.get(u).map_or(&[][..], Vec::as_slice);
                    for m in h.keys().filter(|m| missed.contains(m)) {
                        queue.push((*m, u.clone(), reg.source));
                        *run.deleted.entry(*m).or_default() += 1;
                    }
                    let past: Vec<u32> = h
                        .keys()
                        .copied()
                        .filter(|m| !missed.contains(m))
                        .filter(|m| cursors.get(m).is_some_and(|c| *c >= reg.seq))
                        .collect();
                    if past.is_empty() {
                        continue;
                    }
                    if prune && !run.partial {
                        for m in past {
                            queue.push((m, u.clone(), reg.source));
                            *run.deleted.entry(m).or_default() += 1;
                        }
                    } else {
                        tracing::warn!(group = %name, user_id = %u, held_at = ?past,
                            deleted_at = reg.version.stamp.device, change_time = reg.version.stamp.time,
                            "conflict: a user deleted in the group is held by members the delete reached or that joined since; left as it is \
                             (delete it there, or enroll it at a member to bring it back everywhere; prune = true deletes it)");
                        run.conflicts.push((
                            u.clone(),
                            format!(
                                "deleted at {} at {}, held by {past:?}",
                                reg.version.stamp.device, reg.version.stamp.time
                            ),
                        ));
                    }
                }
                Some(reg)
                    if !members.contains(&reg.source)
                        && self.group.members().contains(&reg.source) =>
                {
                    // Read where it is unreachable now: the reachable
                    // members that lack it get it once it answers (the
                    // pending lane waits for it); what they hold is not
                    // compared with a version not seen.
                    for m in members.iter().filter(|m| !h.contains_key(m)) {
                        queue.push((*m, u.clone(), reg.source));
                        *run.missing.entry(*m).or_default() += 1;
                    }
                }
                Some(reg) => {
                    let mut source = reg.source;
                    // Lost at its member (reset, wiped), or read at a
                    // member that left the group.
                    if !h.contains_key(&source) {
                        // Its member lost it (reset, wiped): read it from
                        // a member that holds it, the order unchanged.
                        // Only from a member known to have been given it: one
                        // behind, or that refused it, holds an older version.
                        let known = given.get(u).map_or(&[][..], Vec::as_slice);
                        let Some(other) = members
                            .iter()
                            .copied()
                            .find(|m| h.contains_key(m) && known.contains(m))
                        else {
                            tracing::warn!(group = %name, user_id = %u, origin = reg.version.stamp.device, holders = ?h.keys().collect::<Vec<_>>(),
                                "the winning version of this user is held by no member known to have it; nothing is copied");
                            run.conflicts.push((u.clone(), format!(
                                "the winning version (changed at {} at {}) is held by no member known to have it", reg.version.stamp.device, reg.version.stamp.time)));
                            continue;
                        };
                        tracing::warn!(group = %name, user_id = %u, lost_at = source, read_from = other,
                            "the member the winning version is read from no longer holds it; read from another member that does");
                        source = other;
                        repoint.push((u.clone(), other));
                    }
                    let Some(want) = h.get(&source) else { continue };
                    for m in members.iter().filter(|m| **m != source) {
                        match h.get(m) {
                            None => {
                                queue.push((*m, u.clone(), source));
                                *run.missing.entry(*m).or_default() += 1;
                            }
                            Some(have) if have.raw != want.raw => {
                                queue.push((*m, u.clone(), source));
                                *run.different.entry(*m).or_default() += 1;
                            }
                            Some(_) => {}
                        }
                    }
                }
                None if h.is_empty() => {}
                None => {
                    let first = h.iter().next().map(|(m, r)| (*m, r.raw.clone()));
                    let Some((first_holder, first_raw)) = first else {
                        continue;
                    };
                    let agree = h.values().all(|r| r.raw == first_raw);
                    let source = if agree {
                        first_holder
                    } else if prune && !run.partial {
                        // Settled by member order (prune = true).
                        let Some(s) = members.iter().copied().find(|m| h.contains_key(m)) else {
                            continue;
                        };
                        run.settled_by_order += 1;
                        tracing::info!(group = %name, user_id = %u, versions = %describe(&h), settled_by = s,
                            "members hold different versions and no history decides: settled by member order (prune = true)");
                        s
                    } else {
                        tracing::warn!(group = %name, user_id = %u, versions = %describe(&h),
                            "conflict: members hold different versions of this user and no history decides; left as it is \
                             (change the user at one member to settle it, or set prune = true to let member order decide)");
                        run.conflicts.push((u.clone(), describe(&h)));
                        continue;
                    };
                    let Some(want) = h.get(&source).map(|r| r.raw.clone()) else {
                        continue;
                    };
                    for m in members.iter().filter(|m| **m != source) {
                        match h.get(m) {
                            None => {
                                queue.push((*m, u.clone(), source));
                                *run.missing.entry(*m).or_default() += 1;
                            }
                            Some(have) if have.raw != want => {
                                queue.push((*m, u.clone(), source));
                                *run.different.entry(*m).or_default() += 1;
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        let n = name.clone();
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for (u, s) in &repoint {
                    store::multi::set_source(&tx, &n, u, *s)?;
                }
                for (m, u, s) in &queue {
                    store::add_pending(&tx, &n, *m, u, *s)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// A member's reads for a reconcile failed: the run under way ends and
    /// the member is left out for a delay (the reachable others go on).
    fn member_read_failed(&mut self, m: u32, e: &crate::gateway::GatewayError) {
        let n = self.timers.reconcile.get(&m).map_or(0, |(n, _)| *n);
        let delay = self.backoff.delay(n);
        tracing::warn!(group = %self.group.name, device_id = m, error = %e, retry_in = ?delay,
            "reconcile could not read a member; the others go on without it meanwhile");
        self.timers
            .reconcile
            .insert(m, (n.saturating_add(1), Instant::now() + delay));
        self.multi.reconcile = None;
    }

    /// Ends the requests served, records each member's result and the
    /// group's conflicts.
    async fn finish_reconcile(&mut self, run: Run) -> Result<(), SyncError> {
        let name = self.group.name.clone();
        let members = run.reach.clone();
        let finished_at = now_secs();
        let results: Vec<store::ReconcileResult> = members
            .iter()
            .map(|m| store::ReconcileResult {
                group: name.clone(),
                target: *m,
                reason: run.reason.clone(),
                finished_at,
                missing: run.missing.get(m).copied().unwrap_or(0),
                different: run.different.get(m).copied().unwrap_or(0),
                extra: run.deleted.get(m).copied().unwrap_or(0),
                pruned: run.deleted.get(m).copied().unwrap_or(0),
            })
            .collect();
        let conflicts = run.conflicts.clone();
        let requests = run.requests.clone();
        let n = name.clone();
        self.timers.reconcile.remove(&0);
        if run.partial {
            // Its requests stay open, and the conflicts it saw are a part
            // of the picture: both wait for the full run.
            self.store
                .run(move |c| {
                    let tx = c.transaction()?;
                    for r in &results {
                        store::record_reconcile_result(&tx, r)?;
                    }
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            self.multi.partial = Some((run.requests.clone(), run.reach.clone()));
            self.multi.reconcile = None;
            let sum = |m: &BTreeMap<u32, u64>| m.values().sum::<u64>();
            tracing::info!(group = %name, users = run.users.len(), reachable = ?run.reach, missing = sum(&run.missing),
                different = sum(&run.different), deleted = sum(&run.deleted), conflicts_seen = run.conflicts.len(),
                "reconcile of the reachable members done; the full reconcile follows when every member is back");
            return Ok(());
        }
        self.multi.partial = None;
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                for (m, generation) in &requests {
                    store::reconcile_done(&tx, &n, *m, *generation)?;
                }
                for r in &results {
                    store::record_reconcile_result(&tx, r)?;
                }
                store::multi::set_conflicts(&tx, &n, &conflicts)?;
                let why = (!conflicts.is_empty()).then(|| {
                    format!(
                        "{} users differ between members and no history decides which version wins; they are left \
                         as they are (changing a user at one member settles it; prune = true lets member order decide)",
                        conflicts.len()
                    )
                });
                store::set_diverged(&tx, &n, why.as_deref())?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.multi.reconcile = None;
        self.metrics
            .reconciles
            .get_or_create(&crate::metrics::GroupLabel {
                group: name.clone(),
            })
            .inc();
        let sum = |m: &BTreeMap<u32, u64>| m.values().sum::<u64>();
        tracing::info!(group = %name, users = run.users.len(), missing = sum(&run.missing), different = sum(&run.different),
            deleted = sum(&run.deleted), conflicts = run.conflicts.len(), settled_by_order = run.settled_by_order,
            "reconcile of the members done");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: u32, reason: &str) -> store::ReconcileRequest {
        store::ReconcileRequest {
            group: "desks".into(),
            target,
            reason: reason.into(),
            prune: false,
            after_user: None,
            generation: 0,
        }
    }

    #[test]
    fn a_pass_says_each_reason_once_with_its_members() {
        assert_eq!(
            reason_of(&[
                request(1, "new member"),
                request(2, "requested by the operator"),
                request(3, "new member"),
            ]),
            "new member (1 3); requested by the operator (2)"
        );
    }
}
