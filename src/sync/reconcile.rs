//! Reconcile: a target's users compared with its sources', and what
//! differs recorded in the target's pending lane, so it is applied by the
//! same path as every change. Prunes only what every source confirms
//! absent.

use super::*;

impl Applier {
    /// A target without a cursor is new (first start of the group, or added
    /// to it): it starts at the head and is reconciled, which covers every
    /// user its sources hold. A source added since the applier last ran
    /// has users no journal row names: every target is reconciled. A target
    /// that left the group is forgotten (a later return starts afresh).
    pub(super) async fn init_targets(&mut self) -> Result<(), SyncError> {
        let group = self.group.clone();
        let (created, added_sources) = self
            .store
            .run(move |c| {
                let tx = c.transaction()?;
                let mut known = store::group_members(&tx, &group.name)?;
                // It was a multi-master group (members stored as both
                // lists): what that shape left goes, and the targets start
                // as on a first start.
                if known
                    .as_ref()
                    .is_some_and(|k| !k.sources.is_empty() && k.sources == k.targets)
                {
                    store::multi::drop_other_shape(&tx, &group.name, store::multi::Shape::OneWay)?;
                    known = None;
                }
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

    pub(super) async fn reconcile_step(&mut self) -> Result<bool, SyncError> {
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
                    .timers
                    .reconcile
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
