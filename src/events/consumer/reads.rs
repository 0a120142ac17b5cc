//! Reads of device logs: asked for (catch-ups, tail checks, timers), run
//! as tasks at most `device_concurrency` at a time, and judged when they
//! come back (advance, reset, lost events).

use super::*;

impl Consumer {
    /// A device task asks for its catch-up (after link-up and monitoring).
    pub(super) fn catch_up(&mut self, req: CatchUpRequest) {
        if !self.tracks.contains_key(&req.device) {
            let _ = req
                .reply
                .send(Err("device is not in the configuration".into()));
            return;
        }
        self.request_read(req.device, Some(req.reply), true);
    }

    /// Starts (or joins) a pass for `device`.
    pub(super) fn request_read(&mut self, device: u32, waiter: Option<Reply>, settle: bool) {
        let Some(t) = self.tracks.get_mut(&device) else {
            return;
        };
        t.tail_at = None;
        let pass = t.pass.get_or_insert_with(Pass::default);
        pass.settle |= settle;
        match t.reading {
            Reading::Idle => {
                pass.waiters.extend(waiter);
                t.reading = Reading::Queued;
                self.queue.push_back(device);
            }
            Reading::Queued => pass.waiters.extend(waiter),
            // The read under way may have passed the log's end already: a
            // waiter is answered only by a read that starts after it asked.
            Reading::InFlight => {
                pass.late.extend(waiter);
                pass.again = true;
            }
        }
    }

    /// When the next tail check or idle check of a live device is due
    /// (see [`Self::timers`]); far ahead if none is.
    pub(super) fn next_timer(&self) -> Instant {
        // Once per turn of the loop: one look at the board, not one per
        // device.
        self.board
            .with_phases(|phases| {
                self.tracks
                    .iter()
                    .filter(|(d, t)| {
                        t.reading == Reading::Idle && phases.get(d) == Some(&Phase::Live)
                    })
                    .map(|(_, t)| t.tail_at.unwrap_or(t.idle_at))
                    .min()
            })
            .unwrap_or_else(|| Instant::now() + self.config.sync.idle_check_interval)
    }

    /// Due tail checks and idle checks of live devices.
    pub(super) fn timers(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .tracks
            .iter()
            .filter(|(d, t)| {
                t.reading == Reading::Idle
                    && t.tail_at.map_or(t.idle_at <= now, |at| at <= now)
                    && self.board.phase(**d) == Phase::Live
            })
            .map(|(d, _)| *d)
            .collect();
        for d in due {
            self.request_read(d, None, false);
            if let Some(p) = self.tracks.get_mut(&d).and_then(|t| t.pass.as_mut()) {
                p.timer = true;
            }
        }
    }

    /// Reads the log of every live device from its stored checkpoint
    /// (devices not live are caught up by their own tasks).
    pub(super) fn read_live_devices(&mut self) {
        let live: Vec<u32> = self
            .tracks
            .keys()
            .copied()
            .filter(|d| self.board.phase(*d) == Phase::Live)
            .collect();
        for d in live {
            self.request_read(d, None, false);
        }
    }

    /// Starts queued reads while slots are free.
    pub(super) fn start_reads(&mut self) {
        while self.reads.len() < self.config.sync.device_concurrency {
            let Some(device) = self.queue.pop_front() else {
                return;
            };
            let Some(t) = self.tracks.get_mut(&device) else {
                continue;
            };
            if t.reading != Reading::Queued {
                continue;
            }
            t.reading = Reading::InFlight;
            if let Some(p) = t.pass.as_mut() {
                p.again = false;
                p.started.get_or_insert_with(Instant::now);
                p.replay |= t.checkpoint == Checkpoint::Reset;
                // Asked before this read started: its end covers them.
                let late = std::mem::take(&mut p.late);
                p.waiters.extend(late);
                p.read_tick = store::multi::own_write_tick();
                p.read_wall_ms = store::now_ms();
            }
            let from = t.checkpoint.clone();
            let trail = t.trail.clone();
            let client = self.client.clone();
            let store = self.store.clone();
            self.reads.spawn(async move {
                // A panic in a read (a bug) fails this pass, not the device
                // forever: its track must hear back.
                let result =
                    std::panic::AssertUnwindSafe(read_once(&client, &store, device, &from, &trail))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| Err(ReadError::Panicked { device }));
                Fetched {
                    device,
                    from,
                    result,
                }
            });
        }
    }

    /// Handles the result of a read: stages what it found and decides
    /// whether the pass goes on.
    pub(super) async fn fetched(&mut self, f: Fetched) -> Result<(), StoreError> {
        let Fetched {
            device,
            from,
            result,
        } = f;
        let Some(t) = self.tracks.get_mut(&device) else {
            return Ok(());
        };
        t.reading = Reading::Idle;
        t.idle_at = Instant::now() + self.config.sync.idle_check_interval;
        if t.checkpoint != from {
            // The device was replaced meanwhile: read again.
            self.request_read(device, None, false);
            return Ok(());
        }
        let outcome = match result {
            Err(e) => Err(e.to_string()),
            Ok(read) => self.judge(device, read).await?,
        };
        let Some(t) = self.tracks.get_mut(&device) else {
            return Ok(());
        };
        match outcome {
            Ok(true) => {
                t.reading = Reading::Queued;
                self.queue.push_back(device);
            }
            Ok(false) => {
                t.failures = 0;
                let pass = t.pass.take().unwrap_or_default();
                // A timer's check found events although no realtime event of
                // the device arrived since its previous pass began: realtime
                // delivered nothing, so its monitoring may be gone without a
                // status change we saw. Set the device up again (at most
                // once per idle interval).
                let now = Instant::now();
                // Events found beyond those delivered and left to reads
                // were dropped on the way (or never sent).
                let dropped = pass.found.saturating_sub(t.delivered_unread);
                t.delivered_unread = t.delivered_unread.saturating_sub(pass.found);
                if dropped > 0 {
                    self.last_drop = Some(now);
                }
                let silent = match (t.last_heard, t.last_pass_start) {
                    (None, _) => true,
                    (Some(heard), Some(prev)) => heard < prev,
                    (Some(_), None) => false,
                };
                let recent = t
                    .last_relink
                    .is_some_and(|r| now.duration_since(r) < self.config.sync.idle_check_interval);
                if pass.timer && dropped > 0 && silent && !recent {
                    tracing::info!(
                        device_id = device,
                        events = pass.found,
                        "a tail check found events realtime never delivered; enabling monitoring again"
                    );
                    t.last_relink = Some(now);
                    (self.relink)(device);
                }
                t.last_pass_start = pass.started;
                let next = if pass.settle || pass.again {
                    // Events logged between this read and the moment the
                    // realtime subscription took effect (its headers may
                    // never come to say so, WIRE.md §6), or an event that
                    // arrived during the read, show here.
                    t.ladder = 0;
                    Some(self.config.sync.tail_check_delay)
                } else {
                    // Trailing events all dropped (a full gateway queue)
                    // show only to a later check: checks follow at growing
                    // intervals after activity, until the idle check.
                    // Only while drops were seen lately (a realtime gap, or
                    // a check that found events): a site whose realtime
                    // delivers everything costs one check per burst.
                    t.ladder = if pass.found > 0 { 0 } else { t.ladder + 1 };
                    let dropping = self
                        .last_drop
                        .is_some_and(|d| now.duration_since(d) < DROPS_RECENT);
                    follow_up(&self.config.sync, t.ladder).filter(|_| dropping)
                };
                t.tail_at = next.map(|d| now + d);
                // The daemon's writes to a member finished before this read
                // started and still expected did not log what we expected
                // (a delete of a user it lacked, a write it refused): no
                // longer expected, so a real change there is not swallowed.
                if let Some(g) = self
                    .config
                    .member_of(device)
                    .filter(|g| g.multi_master().is_some() && pass.read_tick > 0)
                {
                    self.staged.own_writes_read.push(OwnWritesRead {
                        group: g.name.clone(),
                        device,
                        tick: pass.read_tick,
                        wall_ms: pass.read_wall_ms,
                    });
                }
                for w in pass.waiters {
                    self.staged.replies.push((w, Ok(())));
                }
                if !pass.late.is_empty() {
                    // Asked during the last read: a pass of their own.
                    self.request_read(device, None, true);
                    if let Some(p) = self.tracks.get_mut(&device).and_then(|t| t.pass.as_mut()) {
                        p.waiters.extend(pass.late);
                    }
                }
            }
            Err(e) => {
                let delay = self.retry.delay(t.failures);
                t.failures = t.failures.saturating_add(1);
                t.tail_at = Some(Instant::now() + delay);
                let pass = t.pass.take().unwrap_or_default();
                tracing::warn!(device_id = device, error = %e, retry_in = ?delay, "reading the device log failed");
                for w in pass.waiters.into_iter().chain(pass.late) {
                    self.staged.replies.push((w, Err(e.clone())));
                }
            }
        }
        Ok(())
    }

    /// Stages a read's findings. `Ok(true)`: read on; `Ok(false)`: caught
    /// up; `Err`: the pass ends without progress.
    pub(super) async fn judge(
        &mut self,
        device: u32,
        read: Read,
    ) -> Result<Result<bool, String>, StoreError> {
        let config = Arc::clone(&self.config);
        let Some(t) = self.tracks.get_mut(&device) else {
            return Ok(Ok(false));
        };
        match read {
            Read::Newest(newest) => {
                let checkpoint = match &newest {
                    Some(ev) => Checkpoint::after(ev),
                    None => Checkpoint::Reset,
                };
                tracing::info!(
                    device_id = device,
                    checkpoint = checkpoint.event(),
                    "first sight of device; starting at its newest event"
                );
                t.newest = newer(t.newest, checkpoint.event());
                t.checkpoint = checkpoint.clone();
                // A trail stored from an earlier time in the configuration
                // leads elsewhere.
                t.trail.clear();
                self.staged.trails.insert(
                    device,
                    TrailWrite {
                        clear: true,
                        add: Vec::new(),
                    },
                );
                self.staged.checkpoints.insert(device, checkpoint);
                self.staged.searches_done.push(device);
                self.update_lag(device);
                Ok(Ok(true))
            }
            Read::Reset { why } => {
                let Some(pass) = t.pass.as_mut() else {
                    return Ok(Ok(false));
                };
                pass.resets += 1;
                if pass.resets > 1 {
                    return Ok(Err(format!(
                        "log found reset again in the same pass ({why}); retrying later"
                    )));
                }
                tracing::warn!(device_id = device, checkpoint = t.checkpoint.event(), why = %why, "the device's log was reset; reading it from its oldest event and reconciling");
                // A reset marker logged at or after the last event handled
                // (device clock) is the reset: what follows it is news.
                pass.handled_until = match &t.checkpoint {
                    Checkpoint::At {
                        anchor: Some(a), ..
                    } => a.time(),
                    _ => None,
                };
                t.checkpoint = Checkpoint::Reset;
                t.newest = 0;
                self.forget_trail(device);
                let mut fx = Effects::default();
                fx.reconcile_device(&config, device, &format!("device log reset: {why}"));
                self.staged.checkpoints.insert(device, Checkpoint::Reset);
                self.staged.fx.extend(fx);
                self.update_lag(device);
                Ok(Ok(true))
            }
            Read::Next { events, more } => {
                // The log held every event of the trail: it is the log the
                // checkpoint was moved along.
                self.forget_trail(device);
                Ok(self.advance(device, events, more, Effects::default()))
            }
            Read::Lost {
                events,
                more,
                first_lost,
            } => {
                let oldest = events.first().map_or(first_lost, |e| e.id);
                tracing::warn!(
                    device_id = device,
                    checkpoint = t.checkpoint.event(),
                    oldest,
                    "the device's log no longer holds the events after the checkpoint (ring buffer overwritten); reconciling"
                );
                self.forget_trail(device);
                let mut fx = Effects::default();
                fx.reconcile_device(
                    &config,
                    device,
                    &format!(
                        "events {}..{} lost from the device log",
                        first_lost,
                        oldest.wrapping_sub(1)
                    ),
                );
                Ok(self.advance(device, events, more, fx))
            }
        }
    }
}

/// One read of `device`'s log from `from` (a search for its newest event
/// if it was never seen), with no state but the search's progress.
pub(super) async fn read_once(
    client: &GatewayClient,
    store: &Store,
    device: u32,
    from: &Checkpoint,
    trail: &[Mark],
) -> Result<Read, ReadError> {
    match from {
        Checkpoint::Unseen => {
            // A checkpoint stored earlier (the device was in the
            // configuration before a reload removed it) is not trusted; the
            // search is resumable across restarts.
            let resume = store
                .run(move |c| store::log_search(c, device))
                .await
                .ok()
                .flatten()
                .map(|(low, high)| Search { low, high });
            match read::find_newest(client, device, resume, Some(store)).await {
                Ok(newest) => Ok(Read::Newest(newest)),
                Err(e) => {
                    // The saved progress may be what fails (the log was
                    // cleared meanwhile): the next try starts afresh.
                    let _ = store.run(move |c| store::clear_log_search(c, device)).await;
                    Err(e)
                }
            }
        }
        other => read::read_after(client, device, other, trail, PAGE).await,
    }
}
