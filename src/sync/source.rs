//! Reading the source: each changed user's current record (`User.Get`),
//! absence confirmed at every source, unreadable sources and users backed
//! off without ever being taken for absent.

use super::*;

impl Applier {
    /// A user whose source record cannot be read: retried with a backoff
    /// (parked meanwhile), quarantined on every cohort target after
    /// `quarantine_after` failures. The targets keep what they hold.
    /// Returns whether the row is settled (quarantined).
    pub(super) async fn source_failed(
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

    /// Whether `source` can be asked now: live and not backing off.
    pub(super) fn source_ready(&self, source: u32) -> bool {
        self.board.is_live(source)
            && self
                .timers
                .source
                .get(&source)
                .is_none_or(|(_, at)| *at <= Instant::now())
    }

    /// A source whose call failed transiently (unavailable, or too slow):
    /// its rows wait aside until it answers again; the others go on.
    pub(super) fn source_backoff(&mut self, source: u32, e: &GatewayError) {
        let failures = self.timers.source.get(&source).map_or(0, |(n, _)| *n);
        let delay = self.backoff.delay(failures);
        tracing::warn!(group = %self.group.name, source, error = %e, retry_in = ?delay, "source did not answer; its changes wait, the others go on");
        self.timers
            .source
            .insert(source, (failures.saturating_add(1), Instant::now() + delay));
    }

    /// The current state of the rows' users at their sources. A user is
    /// absent only when every source of the group confirms it by its user
    /// list (a user may be enrolled at several desks; an unknown-user answer
    /// is not proof enough, WIRE.md §5.3); when a source cannot be asked,
    /// the user is [`Fetched::Unknown`].
    pub(super) async fn fetch(
        &mut self,
        rows: &[JournalRow],
    ) -> Result<HashMap<String, Fetched>, SyncError> {
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
                    self.timers.source.remove(&s);
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
            let listed: BTreeSet<String> = match self.client.user_ids_checked(s).await {
                Ok(l) if l.unreadable == 0 => l.ids.into_iter().collect(),
                // A header it cannot read may be any of them: absence is
                // not confirmed there, the users wait.
                Ok(l) => {
                    tracing::warn!(group = %self.group.name, source = s, unreadable = l.unreadable,
                        "a source lists user headers that cannot be read: users absent elsewhere are not taken for deleted");
                    for u in still {
                        out.insert(u, Fetched::Unknown);
                    }
                    continue;
                }
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
    // The device's users, listed once a call failed with a code that may
    // be the device's answer to a missing user (WIRE.md §5.3 leaves it
    // open): if the device answers the list, the failure is the request's.
    let mut listed: Option<Option<BTreeSet<String>>> = None;
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
            // A device that did not answer (unavailable, timed out) fails
            // the fetch.
            Err(e) if e.disposition() == Disposition::Transient && !e.answered_vaguely(device) => {
                return Err(e);
            }
            Err(e) if e.disposition() == Disposition::Transient => {
                if listed.is_none() {
                    match client.user_ids_checked(device).await {
                        Ok(l) => {
                            listed = Some((l.unreadable == 0).then(|| l.ids.into_iter().collect()))
                        }
                        Err(_) => return Err(e),
                    }
                }
                // A list with headers it cannot read proves no absence: the
                // users are asked for alone, and one that still fails is a
                // failure of its own (retried, then quarantined).
                let Some(Some(l)) = listed.as_ref() else {
                    if ids.len() == 1 {
                        let id = ids.into_iter().next().unwrap_or_default();
                        out.insert(id, Fetched::Failed(e.to_string()));
                    } else {
                        let mut a = ids;
                        let b = a.split_off(a.len() / 2);
                        work.push(a);
                        work.push(b);
                    }
                    continue;
                };
                let (held, missing): (Vec<String>, Vec<String>) =
                    ids.into_iter().partition(|i| l.contains(i));
                if missing.is_empty() {
                    // Every user asked for is there: the device or the
                    // gateway failed.
                    return Err(e);
                }
                for id in missing {
                    out.insert(id, Fetched::Absent);
                }
                work.push(held);
            }
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
