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
use crate::config::{self, Config};
use crate::device::{Board, CatchUpRequest, DeviceTask, Input};
use crate::events::{self, Consumer, Wakers};
use crate::gateway::{GatewayClient, GatewayError};
use crate::metrics::Metrics;
use crate::proto::gsdk::connect::{AsyncConnectInfo, Status as DevStatus};
use crate::proto::gsdk::event::EventLog;
use crate::service::{self, GatewayHealth, Health, Reload, Shutdown};
use crate::store::{self, Store, StoreError};
use crate::sync::{Applier, WriterLock};

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

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("{0} stream ended")]
    StreamEnded(&'static str),
    #[error("{stream} stream failed: {status}")]
    Stream {
        stream: &'static str,
        status: GatewayError,
    },
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
enum TaskKind {
    Device(u32),
    Group(String),
    Service,
    Events,
}

struct Tasks {
    set: JoinSet<()>,
    kinds: HashMap<tokio::task::Id, (TaskKind, CancellationToken)>,
    cancel: CancellationToken,
}

impl Tasks {
    /// Stops the task of `kind` (it is not restarted).
    fn stop(&mut self, kind: &TaskKind) {
        for (k, token) in self.kinds.values() {
            if k == kind {
                token.cancel();
            }
        }
    }
}

/// Everything a task needs to be (re)spawned.
struct Parts {
    config: RwLock<Arc<Config>>,
    /// Tells the gateway session that the configuration changed.
    config_changed: Notify,
    /// Tells the event consumer.
    config_tx: watch::Sender<Arc<Config>>,
    /// Realtime events for the consumer.
    realtime: mpsc::Sender<EventLog>,
    client: GatewayClient,
    store: Store,
    board: Board,
    inboxes: Inboxes,
    catch_up: mpsc::Sender<CatchUpRequest>,
    wake: Wakers,
    /// One writer per group: see [`crate::sync::WriterLock`].
    writers: Mutex<HashMap<String, WriterLock>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Parts {
    fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn writer(&self, group: &str) -> WriterLock {
        Arc::clone(
            self.writers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(group.to_owned())
                .or_default(),
        )
    }

    fn wake(&self) -> HashMap<String, Arc<Notify>> {
        self.wake.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn spawn(&self, tasks: &mut Tasks, kind: TaskKind) {
        let cancel = tasks.cancel.child_token();
        let config = self.config();
        let handle = match &kind {
            TaskKind::Device(id) => {
                let (tx, rx) = mpsc::channel(64);
                self.inboxes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*id, tx);
                let task = DeviceTask {
                    id: *id,
                    client: self.client.clone(),
                    catch_up: self.catch_up.clone(),
                    board: self.board.clone(),
                    store: self.store.clone(),
                    backoff: Backoff::device(),
                    metrics: Arc::clone(&self.metrics),
                };
                let span = tracing::info_span!("device", device_id = id);
                tasks.set.spawn(tracing::Instrument::instrument(
                    task.run(rx, cancel.clone()),
                    span,
                ))
            }
            TaskKind::Group(name) => {
                let Some(group) = config.group(name).cloned() else {
                    return;
                };
                let wake = self.wake().get(name).cloned().unwrap_or_default();
                let applier = Applier::new(
                    group,
                    self.client.clone(),
                    self.store.clone(),
                    self.board.clone(),
                    config.sync.clone(),
                    wake,
                    Arc::clone(&self.metrics),
                );
                let span = tracing::info_span!("group", group = %name);
                tasks.set.spawn(tracing::Instrument::instrument(
                    applier.run(self.writer(name), cancel.clone()),
                    span,
                ))
            }
            TaskKind::Events => return,
            TaskKind::Service => {
                let notifier = service::notifier(
                    Arc::clone(&self.health),
                    self.board.clone(),
                    self.store.clone(),
                    cancel.clone(),
                );
                tasks.set.spawn(notifier)
            }
        };
        tasks.kinds.insert(handle.id(), (kind, cancel));
    }

    /// Applies a new configuration to the tasks (the gateway session
    /// applies its part when woken). Returns a summary.
    fn reconfigure(&self, tasks: &mut Tasks, new: Config) -> String {
        let old = self.config();
        let d = config::diff(&old, &new);
        if d.is_empty() {
            return "configuration unchanged".to_owned();
        }
        for name in &d.added_groups {
            self.wake
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), Arc::new(Notify::new()));
        }
        let new = Arc::new(new);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&new);
        self.config_tx.send_replace(new);
        for id in &d.removed_devices {
            tasks.stop(&TaskKind::Device(*id));
            self.inboxes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            self.board.remove(*id);
            self.metrics.forget_device(*id);
        }
        for id in &d.added_devices {
            self.board.set(*id, crate::device::Phase::Disconnected);
            self.spawn(tasks, TaskKind::Device(*id));
        }
        for name in d.removed_groups.iter().chain(&d.changed_groups) {
            tasks.stop(&TaskKind::Group(name.clone()));
        }
        for name in &d.removed_groups {
            // Once its applier's last step is over, the group's state goes:
            // a group added later under that name starts afresh.
            let (store, writer, name) = (self.store.clone(), self.writer(name), name.clone());
            tokio::spawn(async move {
                let _w = writer.lock().await;
                let n = name.clone();
                match store.run(move |c| store::drop_group(c, &n)).await {
                    Ok(()) => tracing::info!(group = %name, "group removed: its state is dropped"),
                    Err(e) => {
                        tracing::error!(group = %name, error = %e, "cannot drop the state of a removed group")
                    }
                }
            });
        }
        for name in d.added_groups.iter().chain(&d.changed_groups) {
            self.spawn(tasks, TaskKind::Group(name.clone()));
        }
        self.config_changed.notify_one();
        if !d.needs_restart.is_empty() {
            tracing::warn!(settings = ?d.needs_restart, "these settings take effect at the next start");
        }
        d.to_string()
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
    let store = Store::open(&config.state_dir)?;
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
        .await?;
    for g in dropped {
        tracing::info!(group = %g, "group no longer configured: its state is dropped");
    }
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
    tracing::info!(
        devices = config.devices.len(),
        groups = config.groups.len(),
        gateway = %config.gateway.address,
        api = %config.gateway.api,
        state = %store.path().display(),
        "usersync started"
    );
    // Config and state are loaded: ready, without waiting for the gateway.
    service::ready();

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
    let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            joined = tasks.set.join_next() => if joined.is_none() { break },
            _ = signals.abandon.cancelled() => {
                tracing::warn!("second signal: abandoning in-flight work");
                tasks.set.abort_all();
                break;
            }
            _ = &mut deadline => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "tasks still busy; abandoning in-flight work");
                tasks.set.abort_all();
                break;
            }
        }
    }
    while tasks.set.join_next().await.is_some() {}
    if let Some(e) = fatal {
        tracing::error!(error = %e, "usersync stopped");
        return Err(e);
    }
    tracing::info!("usersync stopped");
    Ok(())
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
        tracing::error!(task = ?kind, "task panicked; restarting it");
    } else {
        tracing::warn!(task = ?kind, "task ended unexpectedly; restarting it");
    }
    parts.spawn(tasks, kind);
    Ok(())
}

/// Opens the status stream and forwards its changes; returns when it ends.
/// Opening may take until the first change (lazy headers, WIRE.md §6).
async fn status_stream(
    client: GatewayClient,
    tx: mpsc::Sender<crate::proto::gsdk::connect::StatusChange>,
) -> SessionError {
    let mut stream = match client.subscribe_status(STATUS_QUEUE).await {
        Ok(s) => s,
        Err(e) => return SessionError::Gateway(e),
    };
    loop {
        match stream.message().await {
            Ok(Some(change)) => {
                if tx.send(change).await.is_err() {
                    return SessionError::StreamEnded("status");
                }
            }
            Ok(None) => return SessionError::StreamEnded("status"),
            Err(s) => {
                return SessionError::Stream {
                    stream: "status",
                    status: GatewayError::from_status("SubscribeStatus", s),
                };
            }
        }
    }
}

/// Opens the realtime stream (all devices, all codes: WIRE.md B9, so a
/// reload that adds devices needs no new subscription) and forwards its
/// events to the consumer.
async fn realtime_stream(
    client: GatewayClient,
    queue: i32,
    tx: mpsc::Sender<EventLog>,
) -> SessionError {
    let mut stream = match client
        .subscribe_realtime_log(queue, Vec::new(), Vec::new())
        .await
    {
        Ok(s) => s,
        Err(e) => return SessionError::Gateway(e),
    };
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                if tx.send(ev).await.is_err() {
                    return SessionError::StreamEnded("realtime");
                }
            }
            Ok(None) => return SessionError::StreamEnded("realtime"),
            Err(s) => {
                return SessionError::Stream {
                    stream: "realtime",
                    status: GatewayError::from_status("SubscribeRealtimeLog", s),
                };
            }
        }
    }
}

/// Tells each device task what the gateway's device list says of it.
/// `only_changed`: only devices whose view differs (a missed status change).
fn apply_list(
    parts: &Parts,
    ids: &[u32],
    list: &[crate::proto::gsdk::connect::DeviceInfo],
    only_changed: bool,
) {
    for id in ids {
        let up = list
            .iter()
            .any(|d| d.device_id == *id && is_connected(d.status));
        let phase = parts.board.phase(*id);
        let known_down = phase == crate::device::Phase::Disconnected;
        if only_changed && up != known_down {
            continue;
        }
        send_one(
            &parts.inboxes,
            *id,
            if up { Input::LinkUp } else { Input::LinkDown },
        );
    }
}

/// One gateway session: open both streams (in tasks of their own), register
/// the devices, then route status changes until something breaks.
async fn session(parts: &Parts, delay: Duration) -> Result<(), SessionError> {
    tokio::time::sleep(delay).await;
    let mut config = parts.config();
    let client = &parts.client;
    let mut streams: JoinSet<SessionError> = JoinSet::new();
    let (status_tx, mut status_rx) = mpsc::channel(STATUS_QUEUE as usize);
    streams.spawn(status_stream(client.clone(), status_tx));
    streams.spawn(realtime_stream(
        client.clone(),
        config.sync.realtime_queue,
        parts.realtime.clone(),
    ));
    // Let the stream tasks hand their requests to the channel before any
    // device is registered (see the module doc).
    tokio::task::yield_now().await;
    register(client, config.devices.values().map(connect_info).collect()).await?;
    let list = client.get_device_list().await?;
    tracing::info!(devices = list.len(), "gateway session up");
    {
        let client = client.clone();
        streams.spawn(async move {
            // Informational; a gateway that never answers is not an error.
            if let Ok(info) = client.admin_get_info().await {
                tracing::info!(gateway_version = %info.version, "gateway version");
            }
            std::future::pending().await
        });
    }
    parts.health.set_gateway(GatewayHealth::Up);
    parts.metrics.gateway_up.set(1);
    let ids: Vec<u32> = config.devices.keys().copied().collect();
    apply_list(parts, &ids, &list, false);

    // The device list is read every poll interval while the session is up:
    // a status change the stream did not deliver (lost in its queue, or
    // sent before it was registered) is noticed this way, and a device
    // input dropped from a full inbox is repaired. Gateway-local: no device
    // is called for it.
    let mut refresh = tokio::time::interval(config.sync.poll_interval);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    loop {
        tokio::select! {
            biased;
            Some(ended) = streams.join_next() => {
                return Err(match ended {
                    Ok(e) => e,
                    Err(e) => SessionError::StreamEnded(if e.is_panic() { "panicked" } else { "cancelled" }),
                });
            }
            _ = parts.config_changed.notified() => {
                let new = parts.config();
                let d = config::diff(&config, &new);
                let gone: Vec<u32> = d.removed_devices.iter().chain(&d.changed_devices).copied().collect();
                if !gone.is_empty() {
                    client.delete_async_connection(gone).await?;
                }
                let added: Vec<AsyncConnectInfo> = d
                    .added_devices
                    .iter()
                    .chain(&d.changed_devices)
                    .filter_map(|id| new.devices.get(id))
                    .map(connect_info)
                    .collect();
                if !added.is_empty() {
                    register(client, added).await?;
                    // Their status may already be "connected"; ask.
                    let list = client.get_device_list().await?;
                    let ids: Vec<u32> = d.added_devices.iter().chain(&d.changed_devices).copied().collect();
                    apply_list(parts, &ids, &list, false);
                }
                config = new;
            }
            Some(change) = status_rx.recv() => {
                if config.devices.contains_key(&change.device_id) {
                    let input = if is_connected(change.status) { Input::LinkUp } else { Input::LinkDown };
                    send_one(&parts.inboxes, change.device_id, input);
                }
            }
            _ = refresh.tick() => {
                let list = client.get_device_list().await?;
                let ids: Vec<u32> = config.devices.keys().copied().collect();
                apply_list(parts, &ids, &list, true);
            }
        }
    }
}

/// Registers devices with the gateway in one call. A refusal that is not
/// transient (a device already registered, one entry the gateway does not
/// accept: WIRE.md says nothing of either) falls back to one call per
/// device, so one bad entry never keeps the others (or the session) down.
async fn register(
    client: &GatewayClient,
    infos: Vec<AsyncConnectInfo>,
) -> Result<(), GatewayError> {
    let e = match client.add_async_connection(infos.clone()).await {
        Ok(()) => return Ok(()),
        Err(e) if e.disposition() == crate::gateway::Disposition::Transient => return Err(e),
        Err(e) => e,
    };
    tracing::warn!(error = %e, "the gateway refused to register the devices at once; registering them one by one");
    for info in infos {
        let id = info.device_id;
        match client.add_async_connection(vec![info]).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => {}
            Err(e) if e.disposition() == crate::gateway::Disposition::Transient => return Err(e),
            Err(e) => {
                tracing::error!(device_id = id, error = %e, "the gateway refused to register the device; check its address and port in the configuration");
            }
        }
    }
    Ok(())
}

fn connect_info(d: &crate::config::DeviceConfig) -> AsyncConnectInfo {
    AsyncConnectInfo {
        device_id: d.id,
        ip_addr: d.address.clone(),
        port: i32::from(d.port),
        use_ssl: d.tls,
    }
}

fn is_connected(status: i32) -> bool {
    status == DevStatus::TcpConnected as i32 || status == DevStatus::TlsConnected as i32
}
