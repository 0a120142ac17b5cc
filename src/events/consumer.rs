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
mod reads;
mod serve;
mod stage;

pub use serve::{Inbox, run};

const DROPS_RECENT: Duration = Duration::from_secs(600);

/// Inputs drained before one commit, at most.
const BURST: usize = 4096;
/// How long the consumer sleeps at most before it looks for due tail and
/// idle checks (it wakes when the next one is due, if sooner).
const TICK: Duration = Duration::from_secs(1);

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
    /// Waiting for the end of the pass (a catch-up, a log read before a
    /// write): each asked before the pass's current read started, so its
    /// end covers every event logged before they asked.
    waiters: Vec<Reply>,
    /// Asked while a read was in flight: that read may have passed the
    /// log's end before they asked, so they wait for a read started after
    /// (the next read of this pass, or a pass of their own).
    late: Vec<Reply>,
    /// The own-write tick and wall time (unix ms) when the pass's current
    /// read started: the daemon's writes to the device finished before it
    /// are in what it reads (`store::multi::expire_own_writes`).
    read_tick: u64,
    read_wall_ms: i64,
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
    /// A replay that read a reset marker: what follows it was logged after
    /// the log restarted (see `store::multi::MemberEvent::after_reset`).
    after_reset: bool,
    /// A replay: the time (device clock) of the last event handled before
    /// the reset, if known. Only a marker from then on is the reset (one
    /// older was in the log before: a reset taken for one wrongly).
    handled_until: Option<u32>,
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

/// Whether event ID `a` comes after `b` in a log whose IDs wrap at 2^32:
/// by less than half the ID space.
fn ahead(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

/// The newer of two event IDs (after a wrap, the small one).
fn newer(newest: u32, id: u32) -> u32 {
    if ahead(id, newest) { id } else { newest }
}

/// How many events `newest` is ahead of the checkpoint `cp`, across a
/// wrap at 2^32 (0 if it is not ahead).
fn lag(newest: u32, cp: u32) -> u32 {
    if ahead(newest, cp) {
        newest.wrapping_sub(cp)
    } else {
        0
    }
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
    own_writes_read: Vec<OwnWritesRead>,
    replies: Vec<(Reply, Result<(), String>)>,
}

/// A member's log read to its end by a read that started at `tick`
/// (`store::multi::expire_own_writes`).
#[derive(Debug)]
struct OwnWritesRead {
    group: String,
    device: u32,
    tick: u64,
    wall_ms: i64,
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
            && self.own_writes_read.is_empty()
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
    /// found events), or when the consumer (re)started: follow-up checks
    /// run only while this is recent.
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
        // A new set: finished results of the old one are dropped with it
        // (abort_all would still hand them back, stale).
        self.reads = JoinSet::new();
        self.staged = Staged::default();
        // A consumer (re)started knows nothing of the drops seen before
        // (a daemon restart, a retry after a store failure): it takes them
        // for recent, so the follow-up tail checks run. Otherwise trailing
        // events all dropped after a restart show only to the idle check.
        self.last_drop = Some(Instant::now());
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
                for w in pass.waiters.into_iter().chain(pass.late) {
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
            .set(i64::from(lag(t.newest, cp)));
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
            t.newest = newer(t.newest, ev.id);
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
        t.newest = newer(t.newest, ev.id);
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

    /// A consumer of one device (1, checkpoint 10) whose gateway is never
    /// reached: reads are driven by hand through `fetched`.
    async fn consumer(dir: &std::path::Path) -> Consumer {
        let config = crate::config::parse(
            &dir.join("usersync.toml"),
            &format!(
                "[gateway]\naddress = \"127.0.0.1:1\"\ntls = false\n[state]\ndir = \"{}\"\n\
                 [[device]]\nid = 1\naddress = \"a\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let store = Store::open(dir).unwrap();
        store.set_checkpoint(1, 10).unwrap();
        let ctx = Context {
            client: GatewayClient::new(&config.gateway.settings()).unwrap(),
            store,
            board: Board::new([1]),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            relink: Arc::new(|_| {}),
        };
        let mut c = Consumer::new(ctx, Arc::new(config), Wakers::default());
        c.load().await.unwrap();
        c
    }

    fn at_end(c: &Consumer) -> Fetched {
        Fetched {
            device: 1,
            from: c.tracks[&1].checkpoint.clone(),
            result: Ok(Read::Next {
                events: Vec::new(),
                more: false,
            }),
        }
    }

    /// A log read before a write must cover every event logged before it
    /// was asked for: a read already under way when it is asked may have
    /// passed the log's end before, so only a read started after answers
    /// it (else a change made at a member just then is overwritten).
    #[tokio::test]
    async fn a_catch_up_asked_during_a_read_waits_for_a_read_started_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = consumer(dir.path()).await;
        // A read of device 1 is under way.
        let t = c.tracks.get_mut(&1).unwrap();
        t.reading = Reading::InFlight;
        t.pass = Some(Pass::default());
        let (early_tx, mut early) = oneshot::channel();
        t.pass.as_mut().unwrap().waiters.push(early_tx);
        let (tx, mut rx) = oneshot::channel();
        c.request_read(1, Some(tx), true);
        // It comes back at the log's end: it answers the waiter that asked
        // before it started, not the one that asked during it.
        let f = at_end(&c);
        c.fetched(f).await.unwrap();
        c.commit().await.unwrap();
        assert_eq!(early.try_recv(), Ok(Ok(())));
        assert!(
            rx.try_recv().is_err(),
            "answered by a read that began before it asked"
        );
        assert_eq!(
            c.tracks[&1].reading,
            Reading::Queued,
            "a read of its own follows"
        );
        // That read starts (its task is left alone) and comes back.
        c.start_reads();
        assert_eq!(c.tracks[&1].reading, Reading::InFlight);
        let f = at_end(&c);
        c.fetched(f).await.unwrap();
        c.commit().await.unwrap();
        assert_eq!(rx.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn the_newest_event_and_the_lag_follow_the_log_across_a_wrap() {
        assert_eq!(newer(10, 12), 12);
        assert_eq!(newer(12, 10), 12);
        assert_eq!(newer(u32::MAX - 1, 3), 3, "3 follows a wrap");
        assert_eq!(newer(3, u32::MAX - 1), 3);
        assert_eq!(lag(12, 10), 2);
        assert_eq!(lag(10, 12), 0);
        assert_eq!(lag(3, u32::MAX - 1), 5);
        assert_eq!(lag(u32::MAX - 1, 3), 0);
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
