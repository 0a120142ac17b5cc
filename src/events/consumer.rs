//! The consumer's loop ([`run`]) and its state ([`Consumer`]).
//!
//! Inputs: realtime events (forwarded by the gateway session's stream
//! task), catch-up requests (from device tasks), configuration changes, the
//! results of log reads (tasks it spawned) and a ticker for the tail checks.
//! After each drained burst of inputs it commits once.
//!
//! A device's reads form a *pass*: reads follow each other until the log
//! says nothing follows the checkpoint. Every read must advance the
//! checkpoint or find a reset (at most one per pass); a read that does
//! neither ends the pass with an error, and the device is retried after a
//! backoff, so no pass loops.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::read::{self, PAGE, Read, ReadError, Search};
use super::{Anchor, Checkpoint, Effects, Mark, TRAIL_MAX, apply_effects, codes, effects, ship};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::device::{Board, CatchUpRequest, Phase};
use crate::gateway::GatewayClient;
use crate::metrics::Metrics;
use crate::proto::gsdk::event::EventLog;
use crate::service::Health;
use crate::store::{self, Store, StoreError};

/// How long after drops were last seen follow-up tail checks go on.
const DROPS_RECENT: Duration = Duration::from_secs(600);

/// Inputs drained before one commit, at most.
const BURST: usize = 4096;
/// How often tail checks and idle checks are looked for.
const TICK: Duration = Duration::from_millis(100);

/// Tells a device's task to set the device up again.
pub type Relink = Arc<dyn Fn(u32) + Send + Sync>;

/// The wakers of the groups' appliers, by group name (shared with the
/// supervisor, which adds groups on reload).
pub type Wakers = Arc<RwLock<HashMap<String, Arc<Notify>>>>;

type Reply = oneshot::Sender<Result<(), String>>;

/// Where a device's reads stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Idle,
    /// Waiting for a free slot.
    Queued,
    /// A read is in flight.
    InFlight,
}

/// Reads that follow each other until the device is caught up.
#[derive(Debug, Default)]
struct Pass {
    /// Device tasks waiting for the end of the pass (catch-up).
    waiters: Vec<Reply>,
    /// Resets found in this pass; a second ends it with an error.
    resets: u32,
    /// Something arrived during a read that the read may have missed.
    again: bool,
    /// A catch-up asked for it: a settling tail check follows its end.
    settle: bool,
    /// A timer started it (a tail check no realtime event asked for).
    timer: bool,
    /// When its first read started.
    started: Option<Instant>,
    /// It read the log from its oldest record after a reset: history, not
    /// news (a delete-all in it is not replayed).
    replay: bool,
    /// New events the pass found in the log.
    found: u64,
}

#[derive(Debug)]
struct Track {
    checkpoint: Checkpoint,
    /// The events realtime moved the checkpoint past since a read last
    /// found the log as expected, oldest first (see [`Mark`]); at most
    /// [`TRAIL_MAX`]. Empty after every read that ends well.
    trail: Vec<Mark>,
    /// The newest event ID seen (realtime or read), for the lag and to know
    /// a read is due.
    newest: u32,
    reading: Reading,
    pass: Option<Pass>,
    /// Debounced tail check.
    tail_at: Option<Instant>,
    /// Idle check.
    idle_at: Instant,
    /// Failed passes in a row (for the retry delay).
    failures: u32,
    /// When the device's last realtime event arrived.
    last_heard: Option<Instant>,
    /// Realtime events delivered but left to a read (one was under way, or
    /// the device was not live yet) that no read has found yet: a check
    /// that finds more new events than this found drops.
    delivered_unread: u64,
    /// When its previous pass started reading.
    last_pass_start: Option<Instant>,
    /// When it was last set up again for events realtime never delivered.
    last_relink: Option<Instant>,
    /// Where the device is on the follow-up ladder of tail checks (see
    /// [`follow_up`]).
    ladder: usize,
}

/// The delay of the `step`th follow-up tail check after a device's last
/// activity: the debounce, then 5 s, 15 s and 1 min; after that the idle
/// check (`None`). A device that logged something is checked a few times
/// more, a quiet one once per idle interval.
fn follow_up(sync: &crate::config::SyncConfig, step: usize) -> Option<Duration> {
    let ladder = [
        sync.tail_check_delay,
        Duration::from_secs(5),
        Duration::from_secs(15),
        Duration::from_secs(60),
    ];
    ladder
        .get(step)
        .copied()
        .filter(|d| *d < sync.idle_check_interval)
}

/// The stored trail rows that lead to `checkpoint`: the newest run of
/// consecutive events ending just before it, at most [`TRAIL_MAX`] (the
/// rows are written in the transaction that moves the checkpoint, so all of
/// them, unless an operator's import replaced the checkpoint).
fn trail_to(checkpoint: &Checkpoint, rows: &[store::TrailRow]) -> Vec<Mark> {
    let Checkpoint::At { event, .. } = checkpoint else {
        return Vec::new();
    };
    let mut next = *event;
    let mut kept: Vec<Mark> = Vec::new();
    for (id, anchor) in rows.iter().rev() {
        if kept.len() == TRAIL_MAX || next == 0 || *id != next - 1 {
            break;
        }
        next = *id;
        kept.push(Mark {
            event: *id,
            anchor: anchor.clone().map(Anchor),
        });
    }
    kept.reverse();
    kept
}

/// Staged changes to a device's stored trail.
#[derive(Debug, Default)]
struct TrailWrite {
    /// Drop the stored trail first.
    clear: bool,
    /// Then add these.
    add: Vec<Mark>,
}

/// The result of one read task.
struct Fetched {
    device: u32,
    /// The checkpoint the read started from: a result for another one is
    /// stale (the device was removed and re-added meanwhile).
    from: Checkpoint,
    result: Result<Read, ReadError>,
}

/// Writes staged since the last commit.
#[derive(Default)]
struct Staged {
    fx: Effects,
    checkpoints: BTreeMap<u32, Checkpoint>,
    trails: BTreeMap<u32, TrailWrite>,
    events: BTreeMap<u32, u64>,
    searches_done: Vec<u32>,
    replies: Vec<(Reply, Result<(), String>)>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
            && self.trails.is_empty()
            && self.fx.changes.is_empty()
            && self.fx.reconciles.is_empty()
            && self.fx.diverged.is_empty()
            && self.fx.drift.is_empty()
            && self.searches_done.is_empty()
            && self.replies.is_empty()
    }
}

/// What the consumer works with besides its configuration.
pub struct Context {
    pub client: GatewayClient,
    pub store: Store,
    /// Device phases (events of a device not live are left to its
    /// catch-up).
    pub board: Board,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Asks a device's task to set the device up again.
    pub relink: Relink,
}

/// The consumer's state: every configured device's checkpoint and reads.
pub struct Consumer {
    client: GatewayClient,
    store: Store,
    config: Arc<Config>,
    /// Wakes a group's applier when its journal grows or a reconcile of it
    /// is requested.
    wake: Wakers,
    board: Board,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    retry: Backoff,
    /// Asks a device's task to set the device up again (monitoring).
    relink: Relink,
    tracks: BTreeMap<u32, Track>,
    /// When drops were last seen anywhere (a realtime gap, or a check that
    /// found events): follow-up checks run only while this is recent.
    last_drop: Option<Instant>,
    reads: JoinSet<Fetched>,
    queue: VecDeque<u32>,
    staged: Staged,
}

impl Consumer {
    pub fn new(ctx: Context, config: Arc<Config>, wake: Wakers) -> Self {
        Consumer {
            client: ctx.client,
            store: ctx.store,
            config,
            wake,
            board: ctx.board,
            metrics: ctx.metrics,
            health: ctx.health,
            relink: ctx.relink,
            retry: Backoff::device(),
            tracks: BTreeMap::new(),
            last_drop: None,
            reads: JoinSet::new(),
            queue: VecDeque::new(),
            staged: Staged::default(),
        }
    }

    /// Loads the checkpoints of the configured devices from the store.
    async fn load(&mut self) -> Result<(), StoreError> {
        let (rows, trails) = self
            .store
            .run(|c| Ok((store::anchored_checkpoints(c)?, store::trails(c)?)))
            .await?;
        self.tracks.clear();
        self.queue.clear();
        self.reads.abort_all();
        self.staged = Staged::default();
        let devices: Vec<u32> = self.config.devices.keys().copied().collect();
        let n = devices.len().max(1) as u32;
        for (i, device) in devices.into_iter().enumerate() {
            let checkpoint = Checkpoint::from_row(rows.get(&device).cloned());
            let stored = trails.get(&device).map_or(&[][..], Vec::as_slice);
            let trail = trail_to(&checkpoint, stored);
            if trail.len() != stored.len() {
                // Rows that do not lead to the checkpoint go.
                self.staged.trails.insert(
                    device,
                    TrailWrite {
                        clear: true,
                        add: trail.clone(),
                    },
                );
            }
            self.add_track(device, checkpoint, trail, i as u32, n);
        }
        Ok(())
    }

    /// Idle checks are spread over the interval so a big site never checks
    /// every device at once.
    fn add_track(
        &mut self,
        device: u32,
        checkpoint: Checkpoint,
        trail: Vec<Mark>,
        slot: u32,
        slots: u32,
    ) {
        let spread = self.config.sync.idle_check_interval.mul_f64(
            f64::from(slot + 1) / f64::from(slots), // never 0: first checks are not all now
        );
        let newest = checkpoint.event();
        self.tracks.insert(
            device,
            Track {
                checkpoint,
                trail,
                newest,
                reading: Reading::Idle,
                pass: None,
                tail_at: None,
                idle_at: Instant::now() + spread,
                failures: 0,
                last_heard: None,
                delivered_unread: 0,
                last_pass_start: None,
                last_relink: None,
                ladder: 0,
            },
        );
        self.update_lag(device);
    }

    pub fn checkpoint(&self, device: u32) -> Option<&Checkpoint> {
        self.tracks.get(&device).map(|t| &t.checkpoint)
    }

    fn set_config(&mut self, config: Arc<Config>) {
        self.config = config;
        let removed: Vec<u32> = self
            .tracks
            .keys()
            .filter(|d| !self.config.devices.contains_key(d))
            .copied()
            .collect();
        for d in removed {
            if let Some(mut t) = self.tracks.remove(&d)
                && let Some(pass) = t.pass.take()
            {
                for w in pass.waiters {
                    let _ = w.send(Err("device removed from the configuration".into()));
                }
            }
            self.queue.retain(|q| *q != d);
            let store = self.store.clone();
            tokio::spawn(async move {
                let _ = store.run(move |c| store::clear_log_search(c, d)).await;
            });
        }
        let added: Vec<u32> = self
            .config
            .devices
            .keys()
            .filter(|d| !self.tracks.contains_key(d))
            .copied()
            .collect();
        if added.is_empty() {
            return;
        }
        // A checkpoint stored from an earlier time in the configuration is
        // stale: the device is searched as on first sight.
        let n = added.len() as u32;
        for (i, d) in added.into_iter().enumerate() {
            self.add_track(d, Checkpoint::Unseen, Vec::new(), i as u32, n);
        }
    }

    fn update_lag(&self, device: u32) {
        let Some(t) = self.tracks.get(&device) else {
            return;
        };
        let cp = t.checkpoint.event();
        let label = Metrics::device(device);
        self.metrics
            .checkpoint
            .get_or_create(&label)
            .set(i64::from(cp));
        self.metrics
            .checkpoint_lag
            .get_or_create(&label)
            .set(i64::from(t.newest.saturating_sub(cp)));
    }

    // ---- inputs -------------------------------------------------------------

    /// Handles one realtime event.
    fn realtime(&mut self, ev: EventLog) {
        let device = ev.device_id;
        let live = self.board.phase(device) == Phase::Live;
        let delay = self.config.sync.tail_check_delay;
        let now = Instant::now();
        let idle_at = now + self.config.sync.idle_check_interval;
        let Some(t) = self.tracks.get_mut(&device) else {
            tracing::debug!(
                device_id = device,
                event = ev.id,
                "event of an unconfigured device ignored"
            );
            return;
        };
        t.idle_at = idle_at;
        t.ladder = 0;
        t.last_heard = Some(now);
        // Counted until staged below: an event a read will find was
        // delivered, not dropped.
        t.delivered_unread += 1;
        if t.reading != Reading::Idle {
            // A read is under way or queued: it reads this event from the
            // log, or the pass reads once more.
            t.newest = t.newest.max(ev.id);
            if let Some(p) = t.pass.as_mut() {
                p.again = true;
            }
            return;
        }
        if !live {
            // Until a device is caught up after (re)connecting, its log may
            // have been reset (a rebooted device restarts its IDs): its
            // catch-up reads and verifies the log, and a settling tail
            // check after it reads what came meanwhile.
            tracing::debug!(
                device_id = device,
                event = ev.id,
                "event before catch-up left to the catch-up"
            );
            return;
        }
        let Checkpoint::At {
            event: cp,
            anchor: ref cp_anchor,
        } = t.checkpoint
        else {
            self.request_read(device, None, false);
            return;
        };
        if ev.id <= cp {
            // A duplicate (realtime late behind a read), or the first sign
            // of a log whose IDs restarted without a reboot (WIRE.md §5.5),
            // its reset event perhaps dropped: verify the log at once. Until
            // the read ends, the device's events are left to it, so the
            // restarted IDs can never pass for the next events.
            if codes::meaning(ev.event_code, ev.sub_code) == codes::Meaning::Reset {
                tracing::info!(
                    device_id = device,
                    checkpoint = cp,
                    event = ev.id,
                    "reset event at or below the checkpoint; verifying the log"
                );
            } else {
                tracing::debug!(
                    device_id = device,
                    checkpoint = cp,
                    event = ev.id,
                    "event at or below the checkpoint; verifying the log"
                );
            }
            self.request_read(device, None, false);
            return;
        }
        t.newest = t.newest.max(ev.id);
        if ev.id == cp.wrapping_add(1) {
            if t.trail.len() >= TRAIL_MAX {
                // Realtime alone has moved the checkpoint on TRAIL_MAX
                // times (a device too busy for its debounced tail check):
                // a read verifies the trail and takes this event.
                tracing::debug!(
                    device_id = device,
                    checkpoint = cp,
                    "trail full; reading the device log"
                );
                self.request_read(device, None, false);
                return;
            }
            // Accepted as the continuation, but only a read can tell it
            // from the first event of a log reset whose earlier events
            // were all dropped: the checkpoint it replaces joins the trail.
            let mark = Mark {
                event: cp,
                anchor: cp_anchor.clone(),
            };
            t.trail.push(mark.clone());
            t.delivered_unread = t.delivered_unread.saturating_sub(1);
            t.tail_at = Some(now + delay);
            self.staged.trails.entry(device).or_default().add.push(mark);
            self.stage(device, vec![ev], Effects::default());
            return;
        }
        // A gap: events were dropped on the way. Read them from the log.
        self.last_drop = Some(now);
        tracing::info!(
            device_id = device,
            checkpoint = cp,
            event = ev.id,
            "realtime gap; reading the device log"
        );
        self.request_read(device, None, false);
    }

    /// A device task asks for its catch-up (after link-up and monitoring).
    fn catch_up(&mut self, req: CatchUpRequest) {
        if !self.tracks.contains_key(&req.device) {
            let _ = req
                .reply
                .send(Err("device is not in the configuration".into()));
            return;
        }
        self.request_read(req.device, Some(req.reply), true);
    }

    /// Starts (or joins) a pass for `device`.
    fn request_read(&mut self, device: u32, waiter: Option<Reply>, settle: bool) {
        let Some(t) = self.tracks.get_mut(&device) else {
            return;
        };
        t.tail_at = None;
        let pass = t.pass.get_or_insert_with(Pass::default);
        pass.waiters.extend(waiter);
        pass.settle |= settle;
        match t.reading {
            Reading::Idle => {
                t.reading = Reading::Queued;
                self.queue.push_back(device);
            }
            Reading::Queued => {}
            Reading::InFlight => pass.again = true,
        }
    }

    /// Due tail checks and idle checks of live devices.
    fn timers(&mut self) {
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
    fn read_live_devices(&mut self) {
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
    fn start_reads(&mut self) {
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
    async fn fetched(&mut self, f: Fetched) -> Result<(), StoreError> {
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
                for w in pass.waiters {
                    self.staged.replies.push((w, Ok(())));
                }
            }
            Err(e) => {
                let delay = self.retry.delay(t.failures);
                t.failures = t.failures.saturating_add(1);
                t.tail_at = Some(Instant::now() + delay);
                let pass = t.pass.take().unwrap_or_default();
                tracing::warn!(device_id = device, error = %e, retry_in = ?delay, "reading the device log failed");
                for w in pass.waiters {
                    self.staged.replies.push((w, Err(e.clone())));
                }
            }
        }
        Ok(())
    }

    /// Stages a read's findings. `Ok(true)`: read on; `Ok(false)`: caught
    /// up; `Err`: the pass ends without progress.
    async fn judge(&mut self, device: u32, read: Read) -> Result<Result<bool, String>, StoreError> {
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
                t.newest = t.newest.max(checkpoint.event());
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

    /// Empties a device's trail: a read judged the log against it.
    fn forget_trail(&mut self, device: u32) {
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
    fn advance(
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
    fn stage(&mut self, device: u32, events: Vec<EventLog>, extra: Effects) {
        let mut fx = effects(&self.config, device, &events);
        let replay = self.tracks.get(&device).is_some_and(|t| {
            t.checkpoint == Checkpoint::Reset || t.pass.as_ref().is_some_and(|p| p.replay)
        });
        if replay {
            // A member's user events read again are history, not news:
            // they win only if newer than the register (`store::multi`).
            for c in &mut fx.changes {
                if let store::ChangeKind::Member(m) = &mut c.kind {
                    m.replayed = true;
                }
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
            t.newest = t.newest.max(last.id);
            t.checkpoint = checkpoint.clone();
        }
        self.staged.checkpoints.insert(device, checkpoint);
        self.update_lag(device);
    }

    /// Commits everything staged in one transaction, then wakes appliers
    /// and answers catch-ups.
    async fn commit(&mut self) -> Result<(), StoreError> {
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

/// One read of `device`'s log from `from` (a search for its newest event
/// if it was never seen), with no state but the search's progress.
async fn read_once(
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

/// Runs the consumer until cancelled. A store failure (a full disk) is
/// retried after a delay from the stored checkpoints: nothing uncommitted
/// was acknowledged, so nothing is lost, and every live device's log is
/// read again at once (events that were staged for the failed commit show
/// nowhere else).
pub async fn run(mut consumer: Consumer, mut inbox: Inbox, cancel: CancellationToken) {
    let backoff = Backoff::gateway();
    let mut failures = 0u32;
    let mut last_failure: Option<Instant> = None;
    consumer.health.set_consumer_active(true);
    loop {
        // The newest configuration: one a reload brought while a commit
        // failed was marked seen, and is not announced again.
        consumer.config = Arc::clone(&inbox.config.borrow_and_update());
        let result = match consumer.load().await {
            Ok(()) => {
                if failures > 0 {
                    // What was staged when the store failed went with the
                    // commit, and a device whose last events were in it
                    // shows nothing later (it would wait for its idle
                    // check): read every live device's log now.
                    consumer.read_live_devices();
                }
                serve(&mut consumer, &mut inbox, &cancel).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => break,
            Err(e) => {
                // Delays grow over a spell of failures, not over the
                // daemon's life: a failure long after the last starts over.
                if last_failure.is_some_and(|at| at.elapsed() >= FAILURE_SPELL) {
                    failures = 0;
                }
                last_failure = Some(Instant::now());
                let delay = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tracing::error!(error = %e, retry_in = ?delay, "event consumer cannot write its state; retrying from the stored checkpoints");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = beat_while(&consumer.health, delay) => {}
                }
            }
        }
    }
    consumer.reads.abort_all();
    consumer.health.set_consumer_active(false);
}

/// Store failures further apart than this are separate spells (their
/// retry delays start over).
const FAILURE_SPELL: Duration = Duration::from_secs(600);

/// Sleeps `d`, beating so the watchdog sees a consumer that waits on
/// purpose, not a stalled one.
async fn beat_while(health: &Health, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        health.beat_consumer();
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_secs(1))).await;
    }
}

/// What the consumer is told, by whom.
pub struct Inbox {
    /// Events from the realtime stream (the gateway session's stream task).
    pub realtime: mpsc::Receiver<EventLog>,
    /// Catch-up requests of device tasks.
    pub catch_ups: mpsc::Receiver<CatchUpRequest>,
    /// The configuration, replaced on reload.
    pub config: watch::Receiver<Arc<Config>>,
}

enum Next {
    Realtime(EventLog),
    CatchUp(CatchUpRequest),
    Config(Arc<Config>),
    Fetched(Fetched),
    Tick,
}

async fn serve(
    consumer: &mut Consumer,
    inbox: &mut Inbox,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            Some(f) = consumer.reads.join_next() => match f {
                Ok(f) => Next::Fetched(f),
                Err(e) => {
                    tracing::error!(error = %e, "a log read task failed");
                    continue;
                }
            },
            r = inbox.config.changed() => match r {
                Ok(()) => Next::Config(Arc::clone(&inbox.config.borrow_and_update())),
                Err(_) => return Ok(()),
            },
            Some(req) = inbox.catch_ups.recv() => Next::CatchUp(req),
            msg = inbox.realtime.recv() => match msg {
                Some(ev) => Next::Realtime(ev),
                None => return Ok(()),
            },
            _ = tick.tick() => Next::Tick,
        };
        consumer.handle(next).await?;
        // Drain what is ready too, then commit once (group commit).
        for _ in 0..BURST {
            let next = if let Some(Ok(f)) = consumer.reads.try_join_next() {
                Next::Fetched(f)
            } else if let Ok(req) = inbox.catch_ups.try_recv() {
                Next::CatchUp(req)
            } else if let Ok(ev) = inbox.realtime.try_recv() {
                Next::Realtime(ev)
            } else {
                break;
            };
            consumer.handle(next).await?;
        }
        // Reads start from the staged checkpoints before the commit: the
        // next page of a long log is on its way while this one's fsync runs
        // (its result is handled after the commit). A failed commit aborts
        // them with everything else (`load`).
        consumer.start_reads();
        consumer.commit().await?;
        consumer.health.beat_consumer();
    }
}

impl Consumer {
    async fn handle(&mut self, next: Next) -> Result<(), StoreError> {
        match next {
            Next::Realtime(ev) => self.realtime(ev),
            Next::Config(config) => {
                // What was staged under the old configuration is committed
                // first: its effects name the old groups.
                // The configuration is taken even when that commit fails:
                // the consumer then starts over from the stored checkpoints
                // (`run`), under the configuration the supervisor runs.
                let committed = self.commit().await;
                self.set_config(config);
                committed?;
            }
            Next::CatchUp(req) => self.catch_up(req),
            Next::Fetched(f) => self.fetched(f).await?,
            Next::Tick => self.timers(),
        }
        Ok(())
    }
}

impl Effects {
    pub(crate) fn extend(&mut self, other: Effects) {
        self.changes.extend(other.changes);
        self.reconciles.extend(other.reconciles);
        self.diverged.extend(other.diverged);
        self.drift.extend(other.drift);
        self.warnings.extend(other.warnings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(ids: &[u32]) -> Vec<store::TrailRow> {
        ids.iter().map(|id| (*id, Some(format!("a{id}")))).collect()
    }

    fn at(event: u32) -> Checkpoint {
        Checkpoint::At {
            event,
            anchor: None,
        }
    }

    fn events(trail: &[Mark]) -> Vec<u32> {
        trail.iter().map(|m| m.event).collect()
    }

    #[test]
    fn a_stored_trail_counts_only_where_it_leads_to_the_checkpoint() {
        assert_eq!(events(&trail_to(&at(10), &rows(&[7, 8, 9]))), [7, 8, 9]);
        assert_eq!(
            trail_to(&at(10), &rows(&[9]))[0].anchor,
            Some(Anchor("a9".into()))
        );
        // A run broken before the checkpoint keeps its newest part.
        assert_eq!(events(&trail_to(&at(10), &rows(&[3, 8, 9]))), [8, 9]);
        // Rows of another checkpoint, or of none, lead nowhere.
        assert!(trail_to(&at(10), &rows(&[7, 8])).is_empty());
        assert!(trail_to(&Checkpoint::Reset, &rows(&[7, 8])).is_empty());
        assert!(trail_to(&Checkpoint::Unseen, &rows(&[7, 8])).is_empty());
        let long: Vec<u32> = (1..=200).collect();
        let kept = trail_to(&at(201), &rows(&long));
        assert_eq!(kept.len(), TRAIL_MAX);
        assert_eq!(kept.last().map(|m| m.event), Some(200));
    }
}
