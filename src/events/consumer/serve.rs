//! The consumer's loop: what it waits on, what it does with each input,
//! and how it starts over from the stored checkpoints when the store fails.

use super::*;

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
    loop {
        // Asleep until the next tail or idle check is due (a quiet site
        // wakes rarely), at most TICK: a device that went live meanwhile
        // has its due check run by then.
        let wake = consumer.next_timer().min(Instant::now() + TICK);
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
            _ = tokio::time::sleep_until(wake) => Next::Tick,
        };
        // One budget of inputs per commit, realtime drained ahead of read
        // results included.
        let mut budget = BURST;
        handle_in_order(consumer, inbox, next, &mut budget).await?;
        // Drain what is ready too, then commit once (group commit).
        while budget > 0 {
            budget -= 1;
            let next = if let Some(Ok(f)) = consumer.reads.try_join_next() {
                handle_in_order(consumer, inbox, Next::Fetched(f), &mut budget).await?;
                continue;
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

/// Handles `next`; a read's result only after the realtime events already
/// waiting (as many as the commit's `budget` of inputs leaves). A read that finds events realtime
/// delivered but the consumer had not handled yet would count them as
/// dropped, and start follow-up reads of every device active lately.
async fn handle_in_order(
    consumer: &mut Consumer,
    inbox: &mut Inbox,
    next: Next,
    budget: &mut usize,
) -> Result<(), StoreError> {
    if matches!(next, Next::Fetched(_)) {
        while *budget > 0 {
            match inbox.realtime.try_recv() {
                Ok(ev) => {
                    *budget -= 1;
                    consumer.handle(Next::Realtime(ev)).await?;
                }
                Err(_) => break,
            }
        }
    }
    consumer.handle(next).await
}
