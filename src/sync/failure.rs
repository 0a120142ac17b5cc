//! Failures of a target: which devices a Multi error names, transient
//! ones backed off, permanent ones narrowed down to the user the device
//! refuses and quarantined after `quarantine_after` tries.

use super::*;

impl Applier {
    /// Applies `rows` to `target` alone, one user at a time, to find the
    /// user it refuses. Returns whether the cursor moved.
    pub(super) async fn one_by_one(
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
                    Ok(()) => Ok(()),
                    Err(e) => Err(Failure::of(&e)),
                },
                None => {
                    self.delete_each(target, std::slice::from_ref(&row.user_id))
                        .await
                }
            };
            match outcome {
                Ok(()) => {
                    self.complete(
                        &[target],
                        lane,
                        std::slice::from_ref(row),
                        std::slice::from_ref(row),
                    )
                    .await?;
                    progressed = true;
                }
                Err(Failure::Permanent(code, msg)) => {
                    if !self.poisoned(target, lane, row, code, &msg).await? {
                        return Ok(progressed);
                    }
                    progressed = true;
                }
                Err(Failure::Transient(msg)) => {
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
    pub(super) async fn poisoned(
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

    pub(super) fn back_off(&mut self, target: u32, msg: &str) {
        self.metrics
            .failed
            .get_or_create(&Metrics::target(&self.group.name, target))
            .inc();
        let attempt = self.timers.target.get(&target).map_or(0, |(a, _)| *a);
        let delay = self.backoff.delay(attempt);
        tracing::warn!(group = %self.group.name, target, error = %msg, retry_in = ?delay, "target failed; retrying later");
        self.timers
            .target
            .insert(target, (attempt.saturating_add(1), Instant::now() + delay));
    }
}

/// Why a target did not take a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The device or the gateway could not do it now: back off, retry.
    Transient(String),
    /// The device refused (the code it answered): find the user it refuses.
    Permanent(Code, String),
}

impl Failure {
    /// How a failed call counts for the targets it addressed.
    pub(super) fn of(e: &GatewayError) -> Self {
        match (e.disposition(), e.code()) {
            (Disposition::Permanent, Some(code)) => Failure::Permanent(code, e.to_string()),
            (Disposition::Permanent, None) => Failure::Permanent(Code::Unknown, e.to_string()),
            (Disposition::Transient, _) => Failure::Transient(e.to_string()),
        }
    }
}

/// The targets that took every call so far.
pub(super) fn ok_targets(outcomes: &BTreeMap<u32, Result<(), Failure>>) -> Vec<u32> {
    outcomes
        .iter()
        .filter(|(_, o)| o.is_ok())
        .map(|(t, _)| *t)
        .collect()
}

/// Marks the devices a failed Multi call names (or all, for a plain
/// failure of the whole call).
pub(super) fn record_failure(outcomes: &mut BTreeMap<u32, Result<(), Failure>>, e: &GatewayError) {
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
                    *o = Err(match d.disposition() {
                        Disposition::Transient => {
                            Failure::Transient(format!("{:?}: {}", d.code, d.msg))
                        }
                        Disposition::Permanent => Failure::Permanent(d.code, d.msg.clone()),
                    });
                }
            }
        }
        _ => {
            let failure = Failure::of(e);
            for v in outcomes.values_mut().filter(|v| v.is_ok()) {
                *v = Err(failure.clone());
            }
        }
    }
}
