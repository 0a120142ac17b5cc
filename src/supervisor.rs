//! The supervisor: owns the gateway channel, the gateway session (device
//! registration, the status and realtime streams), the event consumer's
//! task, one task per device and one applier per group. Restarts what fails
//! (a broken session with capped, jittered backoff; a panicked device or
//! group task at once) and shuts down cleanly.
//!
//! Opening a stream never gates the session: tonic returns a server stream
//! only when its response headers arrive, and a gateway may send them only
//! with the first message (WIRE.md §5.14, §6), hours later on a quiet site.
//! Each stream is opened and read by a task of its own; the session goes on
//! to register and list the devices at once. What we rely on for "subscribe
//! first, replay second": the subscription's request is handed to the
//! channel before any device is registered (and so before any replay), and
//! one HTTP/2 connection carries requests in the order they were handed
//! over. The gateway may still register the subscription later than it
//! answers a `GetLog`; nothing is lost then either, because every catch-up
//! ends with a settling tail check of the device's log (events::consumer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{self, Change, Config};
use crate::device::{Board, CatchUpRequest, DeviceTask, Input};
use crate::events::{self, Consumer, Wakers};
use crate::gateway::{GatewayClient, GatewayError};
use crate::metrics::Metrics;
use crate::proto::gsdk::event::EventLog;
use crate::service::{self, GatewayHealth, Health, Reload, Shutdown};
use crate::store::{self, Store, StoreError};

mod session;
mod tasks;

use crate::sync::{Applier, WriterLock};
use session::session;
use tasks::{Parts, TaskKind, Tasks};

/// How long an orderly shutdown waits for tasks before abandoning them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(60);
const STATUS_QUEUE: i32 = 1024;
/// Events buffered between the realtime stream and the consumer; when full,
/// the stream is not read, the gateway's queue fills and it drops events
/// (WIRE.md B10), which the consumer then reads from the device logs.
const REALTIME_BUFFER: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(
        "the event consumer stopped unexpectedly (a bug); exiting so the service manager restarts usersync"
    )]
    EventsStopped,
    #[error("another usersync daemon is running on {0} (it holds daemon.lock)")]
    AlreadyRunning(std::path::PathBuf),
    /// `[metrics] listen` cannot be listened on (checked before the start).
    #[error("{}: {reason}", .config.display())]
    MetricsListen {
        config: std::path::PathBuf,
        reason: String,
    },
    /// The signal handlers cannot be installed.
    #[error(transparent)]
    Signals(std::io::Error),
}

/// Looks at the lock, 250 ms apart, before the daemon gives up (5 s).
const LOCK_TRIES: u32 = 20;

type Inboxes = Arc<Mutex<HashMap<u32, mpsc::Sender<Input>>>>;

fn send_all(inboxes: &Inboxes, input: Input) {
    let senders: Vec<mpsc::Sender<Input>> = inboxes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for tx in senders {
        let _ = tx.try_send(input);
    }
}

fn send_one(inboxes: &Inboxes, device: u32, input: Input) {
    let tx = inboxes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&device)
        .cloned();
    if let Some(tx) = tx
        && tx.try_send(input).is_err()
    {
        tracing::warn!(
            device_id = device,
            ?input,
            "device inbox full or closed; input dropped"
        );
    }
}

/// Runs the daemon until `signals.shutdown` is cancelled.
pub async fn run(config: Config, signals: Shutdown) -> Result<(), DaemonError> {
    run_with(config, signals, None, Arc::new(Health::default())).await
}

/// Runs the daemon with reloads from `reload` and liveness in `health`.
pub async fn run_with(
    config: Config,
    signals: Shutdown,
    mut reload: Option<mpsc::Receiver<Reload>>,
    health: Arc<Health>,
) -> Result<(), DaemonError> {
    // The lock first: opening the store upgrades its schema, which only
    // the one daemon of this state directory may do.
    crate::store::prepare_dir(&config.state_dir)?;
    // An operator command (`usersync status`, say) may hold the lock for a
    // moment: look again for a few seconds before calling it a second
    // daemon.
    let mut tries = 0;
    let _lock = loop {
        if let Some(lock) = store::try_lock(&config.state_dir)? {
            break lock;
        }
        tries += 1;
        if tries >= LOCK_TRIES {
            return Err(DaemonError::AlreadyRunning(config.state_dir.clone()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The integrity check of every page runs before anything is written:
    // deferred past READY=1, the start's own writes reached a damaged file
    // before the check (the WAL folded into it), and an operator moving it
    // aside no longer had the file as it was.
    let store = Store::open(&config.state_dir)?;
    let call_timeout_ms =
        i64::try_from(config.gateway.call_timeout.as_millis()).unwrap_or(i64::MAX);
    store
        .run(move |c| crate::store::multi::own_writes_restarted(c, call_timeout_ms))
        .await?;
    let client = GatewayClient::new(&config.gateway.settings())?;
    let board = Board::new(config.devices.keys().copied());
    let metrics = Arc::new(Metrics::new());
    let wake: Wakers = Arc::new(RwLock::new(
        config
            .groups
            .iter()
            .map(|g| (g.name.clone(), Arc::new(Notify::new())))
            .collect(),
    ));
    let (catch_tx, catch_rx) = mpsc::channel::<CatchUpRequest>(1024);
    let (realtime_tx, realtime_rx) = mpsc::channel::<EventLog>(REALTIME_BUFFER);
    let config = Arc::new(config);
    let (config_tx, config_rx) = watch::channel(Arc::clone(&config));
    let parts = Parts {
        config: RwLock::new(Arc::clone(&config)),
        gateway_changes: Mutex::new(Vec::new()),
        registered: Mutex::new(std::collections::BTreeMap::new()),
        config_changed: Notify::new(),
        config_tx,
        realtime: realtime_tx,
        client: client.clone(),
        store: store.clone(),
        board: board.clone(),
        inboxes: Arc::new(Mutex::new(HashMap::new())),
        catch_up: catch_tx,
        wake: Arc::clone(&wake),
        writers: Mutex::new(HashMap::new()),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        clocks: Arc::default(),
    };
    // Groups that left the configuration while the daemon was stopped.
    let configured: Vec<String> = config.groups.iter().map(|g| g.name.clone()).collect();
    let dropped = store
        .run(move |c| {
            let tx = c.transaction()?;
            let mut dropped = Vec::new();
            for g in store::stored_groups(&tx)? {
                if !configured.contains(&g) {
                    store::drop_group(&tx, &g)?;
                    dropped.push(g);
                }
            }
            tx.commit()?;
            Ok(dropped)
        })
        .await;
    let dropped = dropped?;
    for g in dropped {
        tracing::info!(group = %g, "group no longer configured: its state is dropped");
    }
    tracing::info!(
        devices = config.devices.len(),
        groups = config.groups.len(),
        gateway = %config.gateway.address,
        api = %config.gateway.api,
        state = %store.path().display(),
        "usersync started"
    );
    // Config and state are loaded: ready, without waiting for the gateway,
    // and before one task per device is spawned (60 ms for 10,000 devices,
    // and the tasks' first store writes would compete with it).
    service::ready();
    let mut tasks = Tasks {
        set: JoinSet::new(),
        kinds: HashMap::new(),
        cancel: CancellationToken::new(),
    };
    // The event consumer: one for the daemon's life, across gateway
    // sessions (its reads fail while the gateway is away and are retried).
    let consumer = Consumer::new(
        events::Context {
            client: client.clone(),
            store: store.clone(),
            board: board.clone(),
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            relink: {
                let inboxes = Arc::clone(&parts.inboxes);
                Arc::new(move |device| send_one(&inboxes, device, Input::LinkUp))
            },
        },
        Arc::clone(&config),
        Arc::clone(&wake),
    );
    let inbox = events::Inbox {
        realtime: realtime_rx,
        catch_ups: catch_rx,
        config: config_rx,
    };
    let events_cancel = tasks.cancel.child_token();
    let handle = tasks.set.spawn(tracing::Instrument::instrument(
        events::run(consumer, inbox, events_cancel.clone()),
        tracing::info_span!("events"),
    ));
    tasks
        .kinds
        .insert(handle.id(), (TaskKind::Events, events_cancel));
    for id in config.devices.keys() {
        parts.spawn(&mut tasks, TaskKind::Device(*id));
    }
    for g in &config.groups {
        parts.spawn(&mut tasks, TaskKind::Group(g.name.clone()));
    }
    parts.spawn(&mut tasks, TaskKind::Service);
    if let Some(addr) = config.metrics_listen {
        let (m, cancel) = (Arc::clone(&metrics), tasks.cancel.child_token());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m, cancel).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }

    let backoff = Backoff::gateway();
    let mut attempt = 0u32;
    let mut delay = Duration::ZERO;
    let mut beat = tokio::time::interval(Duration::from_millis(500));
    let mut fatal = None;
    loop {
        let started = Instant::now();
        let session = session(&parts, delay);
        tokio::pin!(session);
        let result = loop {
            tokio::select! {
                biased;
                _ = signals.shutdown.cancelled() => break None,
                Some(joined) = tasks.set.join_next_with_id() => {
                    if let Err(e) = restart_if_needed(&parts, &mut tasks, joined, &signals.shutdown) {
                        fatal = Some(e);
                        break None;
                    }
                }
                Some(r) = recv(&mut reload) => {
                    let summary = parts.reconfigure(&mut tasks, r.config);
                    tracing::info!(change = %summary, "configuration reloaded");
                    let _ = r.done.send(summary);
                }
                _ = beat.tick() => health.beat_main(),
                r = &mut session => break Some(r),
            }
        };
        let Some(result) = result else { break };
        metrics.gateway_up.set(0);
        metrics.gateway_reconnects.inc();
        send_all(&parts.inboxes, Input::LinkDown);
        if started.elapsed() >= HEALTHY + delay {
            attempt = 0;
        }
        delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        let error = match result {
            Ok(()) => "session ended".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %error, retry_in = ?delay, "gateway session ended; reconnecting");
        health.set_gateway(GatewayHealth::Down {
            error,
            retry_at: std::time::Instant::now() + delay,
        });
    }

    tracing::info!("shutting down");
    service::stopping();
    tasks.cancel.cancel();
    wind_down(&mut tasks.set, SHUTDOWN_GRACE, &signals.abandon).await;
    while tasks.set.join_next().await.is_some() {}
    if let Some(e) = fatal {
        tracing::error!(error = %e, "usersync stopped");
        return Err(e);
    }
    tracing::info!("usersync stopped");
    Ok(())
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindDown {
    /// Every task finished its step.
    Finished,
    /// A second signal: in-flight work aborted.
    Abandoned,
    /// The grace period ran out: in-flight work aborted.
    GraceExpired,
}

/// Waits for the (cancelled) tasks to end: at most `grace`, or until
/// `abandon` (a second signal); then aborts what is left.
async fn wind_down(
    set: &mut JoinSet<()>,
    grace: Duration,
    abandon: &CancellationToken,
) -> WindDown {
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    let how = loop {
        tokio::select! {
            biased;
            joined = set.join_next() => if joined.is_none() { break WindDown::Finished },
            _ = abandon.cancelled() => {
                tracing::warn!("second signal: abandoning in-flight work");
                break WindDown::Abandoned;
            }
            _ = &mut deadline => {
                tracing::warn!(grace = ?grace, "tasks still busy; abandoning in-flight work");
                break WindDown::GraceExpired;
            }
        }
    };
    set.abort_all();
    while set.join_next().await.is_some() {}
    how
}

async fn recv(rx: &mut Option<mpsc::Receiver<Reload>>) -> Option<Reload> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn restart_if_needed(
    parts: &Parts,
    tasks: &mut Tasks,
    joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let (id, panicked) = match &joined {
        Ok((id, ())) => (*id, false),
        Err(e) => (e.id(), e.is_panic()),
    };
    let Some((kind, token)) = tasks.kinds.remove(&id) else {
        return Ok(());
    };
    if shutdown.is_cancelled() || token.is_cancelled() {
        return Ok(());
    }
    if kind == TaskKind::Events {
        // The one owner of checkpoints cannot be replaced in place (device
        // tasks hold its inbox); what it committed is safe in the store.
        return Err(DaemonError::EventsStopped);
    }
    if panicked {
        tracing::error!(task = %kind, "task panicked; restarting it");
    } else {
        tracing::warn!(task = %kind, "task ended unexpectedly; restarting it");
    }
    parts.spawn(tasks, kind);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The shutdown's timing in tokio's paused time.

    use super::*;

    /// A task that ends `after` its cancellation (or never).
    fn busy(set: &mut JoinSet<()>, cancel: &CancellationToken, after: Option<Duration>) {
        let cancel = cancel.clone();
        set.spawn(async move {
            cancel.cancelled().await;
            match after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_that_finish_within_the_grace_period_are_waited_for() {
        let (mut set, cancel) = (JoinSet::new(), CancellationToken::new());
        busy(&mut set, &cancel, Some(Duration::from_secs(3)));
        busy(&mut set, &cancel, Some(Duration::from_secs(1)));
        cancel.cancel();
        let start = Instant::now();
        let how = wind_down(&mut set, Duration::from_secs(10), &CancellationToken::new()).await;
        assert_eq!(how, WindDown::Finished);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_task_is_aborted_when_the_grace_period_ends() {
        let (mut set, cancel) = (JoinSet::new(), CancellationToken::new());
        busy(&mut set, &cancel, None);
        busy(&mut set, &cancel, Some(Duration::from_secs(1)));
        cancel.cancel();
        let start = Instant::now();
        let how = wind_down(&mut set, Duration::from_secs(10), &CancellationToken::new()).await;
        assert_eq!(how, WindDown::GraceExpired);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(set.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_abandons_at_once() {
        let (mut set, cancel) = (JoinSet::new(), CancellationToken::new());
        busy(&mut set, &cancel, None);
        cancel.cancel();
        let abandon = CancellationToken::new();
        let second = abandon.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            second.cancel();
        });
        let start = Instant::now();
        let how = wind_down(&mut set, Duration::from_secs(10), &abandon).await;
        assert_eq!(how, WindDown::Abandoned);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert!(set.is_empty());
    }
}
