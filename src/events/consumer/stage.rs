//! What reads and realtime found, staged and committed: effects,
//! checkpoints and their trails, all in one transaction per burst.

use super::*;

impl Consumer {
    /// Empties a device's trail: a read judged the log against it.
    pub(super) fn forget_trail(&mut self, device: u32) {
        let Some(t) = self.tracks.get_mut(&device) else {
            return;
        };
        if t.trail.is_empty() && !self.staged.trails.contains_key(&device) {
            // Nothing stored (the normal case: nothing to write).
            return;
        }
        t.trail.clear();
        self.staged.trails.insert(
            device,
            TrailWrite {
                clear: true,
                add: Vec::new(),
            },
        );
    }

    /// Stages `events` read after the checkpoint. Returns whether to read
    /// on: a full page goes on; a read that found nothing ends the pass
    /// (an error if the page was full: no progress).
    pub(super) fn advance(
        &mut self,
        device: u32,
        events: Vec<EventLog>,
        more: bool,
        extra: Effects,
    ) -> Result<bool, String> {
        let cp = self.tracks.get(&device).map_or(0, |t| t.checkpoint.event());
        let reset = matches!(
            self.tracks.get(&device).map(|t| &t.checkpoint),
            Some(Checkpoint::Reset)
        );
        let fresh: Vec<EventLog> = if reset {
            events
        } else {
            events
                .into_iter()
                .filter(|e| read::follows(e.id, cp))
                .collect()
        };
        let progressed = !fresh.is_empty();
        if let Some(p) = self.tracks.get_mut(&device).and_then(|t| t.pass.as_mut()) {
            p.found += fresh.len() as u64;
        }
        self.stage(device, fresh, extra);
        match (progressed, more) {
            (true, true) => Ok(true),
            (false, true) => Err(format!(
                "a full page after checkpoint {cp} held nothing new; retrying later"
            )),
            // Something arrived during the read that it may have missed.
            // The end of the log: the pass ends (a busy device would never
            // end it otherwise). What came during the read is read by the
            // tail check that follows (see `fetched`).
            (_, false) => Ok(false),
        }
    }

    /// Stages `events` (ascending, all new) with their effects plus
    /// `extra`, and moves the checkpoint past them.
    pub(super) fn stage(&mut self, device: u32, events: Vec<EventLog>, extra: Effects) {
        let mut fx = effects(&self.config, device, &events);
        let replay = self.tracks.get(&device).is_some_and(|t| {
            t.checkpoint == Checkpoint::Reset || t.pass.as_ref().is_some_and(|p| p.replay)
        });
        if replay {
            // A member's user events read again are history, not news:
            // they win only if newer than the register (`store::multi`).
            // Those logged after a reset marker were made after the log
            // restarted (WIRE.md §5.5: its IDs may restart), and the rest of
            // the pass reads on after it.
            use crate::events::codes::{Meaning, meaning};
            let pass = self.tracks.get(&device).and_then(|t| t.pass.as_ref());
            let earlier = pass.is_some_and(|p| p.after_reset);
            let until = pass.and_then(|p| p.handled_until);
            let marker = events.iter().rposition(|e| {
                meaning(e.event_code, e.sub_code) == Meaning::Reset
                    && until.is_some_and(|t| e.timestamp >= t)
            });
            let after: std::collections::HashSet<u32> = marker
                .map(|i| events[i + 1..].iter().map(|e| e.id).collect())
                .unwrap_or_default();
            let read_on_after = marker.is_some();
            for c in &mut fx.changes {
                if let store::ChangeKind::Member(m) = &mut c.kind {
                    m.replayed = true;
                    m.after_reset = earlier || after.contains(&m.event);
                }
            }
            if read_on_after
                && let Some(p) = self.tracks.get_mut(&device).and_then(|t| t.pass.as_mut())
            {
                p.after_reset = true;
            }
            // A log read from its oldest record after a reset: a delete-all
            // in it may be history (a reset taken for one wrongly), and the
            // reset already asked for a reconcile of every target.
            let before = fx.changes.len();
            fx.changes
                .retain(|c| c.kind != store::ChangeKind::DeleteAll);
            if fx.changes.len() < before {
                tracing::warn!(
                    device_id = device,
                    "a delete-all read back from a reset log is not propagated; the reconcile the reset asked for covers it"
                );
            }
        }
        fx.extend(extra);
        for w in &fx.warnings {
            tracing::warn!(device_id = device, "{w}");
        }
        for d in &fx.diverged {
            tracing::warn!(group = %d.group, "group diverged: {}", d.why);
        }
        for d in &fx.drift {
            let (group, target) = (&d.group, d.target);
            tracing::warn!(group = %group, device_id = target, user_id = %d.user_id, event_id = d.event,
                "user changed at a target itself, not at a source: the target now differs from its sources; `usersync reconcile --group {group} --target {target}` repairs it");
            self.metrics
                .target_changes
                .get_or_create(&Metrics::target(group, target))
                .inc();
        }
        self.staged.fx.extend(fx);
        let Some(last) = events.last() else {
            return;
        };
        // Ship now: a crash before the commit ships again (at least once;
        // DEVICE_ID + EVENT_ID identify duplicates).
        for ev in &events {
            ship(self.config.ship_events, ev);
        }
        let checkpoint = Checkpoint::after(last);
        *self.staged.events.entry(device).or_default() += events.len() as u64;
        if let Some(t) = self.tracks.get_mut(&device) {
            t.newest = newer(t.newest, last.id);
            t.checkpoint = checkpoint.clone();
        }
        self.staged.checkpoints.insert(device, checkpoint);
        self.update_lag(device);
    }

    /// Commits everything staged in one transaction, then wakes appliers
    /// and answers catch-ups.
    pub(super) async fn commit(&mut self) -> Result<(), StoreError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        let newest: BTreeMap<u32, u32> = staged
            .checkpoints
            .keys()
            .filter_map(|d| self.tracks.get(d).map(|t| (*d, t.newest)))
            .collect();
        let fx = Arc::new(staged.fx);
        let recorded = Arc::clone(&fx);
        let checkpoints: BTreeMap<u32, Checkpoint> = staged.checkpoints;
        let trails = staged.trails;
        let searches = staged.searches_done;
        let own_writes_read = staged.own_writes_read;
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                apply_effects(&tx, &recorded)?;
                for (device, checkpoint) in &checkpoints {
                    if let Some((event, anchor)) = checkpoint.to_row() {
                        store::set_checkpoint_anchored(&tx, *device, event, anchor.as_deref())?;
                    }
                    if let Some(n) = newest.get(device) {
                        store::set_newest(&tx, *device, *n)?;
                    }
                }
                for (device, write) in &trails {
                    if write.clear {
                        store::clear_trail(&tx, *device)?;
                    }
                    for m in &write.add {
                        let anchor = m.anchor.as_ref().map(|a| a.0.as_str());
                        store::add_to_trail(&tx, *device, m.event, anchor)?;
                    }
                }
                for d in &searches {
                    store::clear_log_search(&tx, *d)?;
                }
                // After the events recorded above consumed their echoes.
                for r in &own_writes_read {
                    store::multi::expire_own_writes(&tx, &r.group, r.device, r.tick, r.wall_ms)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        for (device, n) in staged.events {
            self.metrics
                .events
                .get_or_create(&Metrics::device(device))
                .inc_by(n);
        }
        let groups = fx
            .changes
            .iter()
            .map(|c| &c.group)
            .chain(fx.reconciles.iter().map(|r| &r.group));
        let wake = self.wake.read().unwrap_or_else(|e| e.into_inner());
        for g in groups {
            if let Some(n) = wake.get(g) {
                n.notify_one();
            }
        }
        drop(wake);
        for (reply, result) in staged.replies {
            let _ = reply.send(result);
        }
        Ok(())
    }
}
