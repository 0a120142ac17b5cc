//! The supervisor: owns the gateway channel, the gateway session (status
//! and realtime streams, the event consumer), one task per device and one
//! applier per group. Restarts what fails — a broken session with capped,
//! jittered backoff; a panicked task at once — and shuts down cleanly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::device::{Board, CatchUpRequest, DeviceTask, Input};
use crate::events::{Consumer, ConsumerError};
use crate::gateway::{GatewayClient, GatewayError};
use crate::proto::gsdk::connect::{AsyncConnectInfo, Status as DevStatus};
use crate::store::{Store, StoreError};
use crate::sync::Applier;

/// How long an orderly shutdown waits for tasks before abandoning them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(60);
const STATUS_QUEUE: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("{0} stream ended")]
    StreamEnded(&'static str),
    #[error("{stream} stream failed: {status}")]
    Stream {
        stream: &'static str,
        status: GatewayError,
    },
}

/// Signals for the daemon: `shutdown` asks for an orderly stop; `abandon`
/// (a second signal) stops waiting for in-flight work.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    pub shutdown: CancellationToken,
    pub abandon: CancellationToken,
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
        tracing::warn!(device, ?input, "device inbox full or closed; input dropped");
    }
}

#[derive(Debug, Clone)]
enum TaskKind {
    Device(u32),
    Group(String),
}

struct Tasks {
    set: JoinSet<()>,
    kinds: HashMap<tokio::task::Id, TaskKind>,
    cancel: CancellationToken,
}

/// Everything a task needs to be (re)spawned.
struct Parts {
    config: Arc<Config>,
    client: GatewayClient,
    store: Store,
    board: Board,
    inboxes: Inboxes,
    catch_up: mpsc::Sender<CatchUpRequest>,
    wake: HashMap<String, Arc<Notify>>,
}

impl Parts {
    fn spawn(&self, tasks: &mut Tasks, kind: TaskKind) {
        let cancel = tasks.cancel.child_token();
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
                };
                tasks.set.spawn(task.run(rx, cancel))
            }
            TaskKind::Group(name) => {
                let Some(group) = self.config.group(name).cloned() else {
                    return;
                };
                let wake = self.wake.get(name).cloned().unwrap_or_default();
                let applier = Applier::new(
                    group,
                    self.client.clone(),
                    self.store.clone(),
                    self.board.clone(),
                    self.config.sync.clone(),
                    wake,
                );
                tasks.set.spawn(applier.run(cancel))
            }
        };
        tasks.kinds.insert(handle.id(), kind);
    }
}

/// Runs the daemon until `signals.shutdown` is cancelled.
pub async fn run(config: Config, signals: Shutdown) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let store = Store::open(&config.state_dir)?;
    let client = GatewayClient::new(&config.gateway.settings())?;
    let board = Board::new(config.devices.keys().copied());
    let wake: HashMap<String, Arc<Notify>> = config
        .groups
        .iter()
        .map(|g| (g.name.clone(), Arc::new(Notify::new())))
        .collect();
    let (catch_tx, mut catch_rx) = mpsc::channel::<CatchUpRequest>(1024);
    let parts = Parts {
        config: Arc::clone(&config),
        client: client.clone(),
        store: store.clone(),
        board: board.clone(),
        inboxes: Arc::new(Mutex::new(HashMap::new())),
        catch_up: catch_tx,
        wake: wake.clone(),
    };
    let mut tasks = Tasks {
        set: JoinSet::new(),
        kinds: HashMap::new(),
        cancel: CancellationToken::new(),
    };
    for id in config.devices.keys() {
        parts.spawn(&mut tasks, TaskKind::Device(*id));
    }
    for g in &config.groups {
        parts.spawn(&mut tasks, TaskKind::Group(g.name.clone()));
    }
    tracing::info!(
        devices = config.devices.len(),
        groups = config.groups.len(),
        gateway = %config.gateway.address,
        api = %config.gateway.api,
        state = %store.path().display(),
        "usersync started"
    );

    let mut consumer = Consumer::new(client.clone(), store.clone(), Arc::clone(&config), wake);
    let backoff = Backoff::gateway();
    let mut attempt = 0u32;
    let mut delay = Duration::ZERO;
    loop {
        let started = Instant::now();
        let session = session(&parts, &mut consumer, &mut catch_rx, delay);
        tokio::pin!(session);
        let result = loop {
            tokio::select! {
                biased;
                _ = signals.shutdown.cancelled() => break None,
                Some(joined) = tasks.set.join_next_with_id() => {
                    restart_if_needed(&parts, &mut tasks, joined, &signals.shutdown);
                }
                r = &mut session => break Some(r),
            }
        };
        let Some(result) = result else { break };
        send_all(&parts.inboxes, Input::LinkDown);
        if started.elapsed() >= HEALTHY + delay {
            attempt = 0;
        }
        delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        match result {
            Ok(()) => tracing::warn!(retry_in = ?delay, "gateway session ended; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "gateway session failed; reconnecting")
            }
        }
    }

    tracing::info!("shutting down");
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
    tracing::info!("usersync stopped");
    Ok(())
}

fn restart_if_needed(
    parts: &Parts,
    tasks: &mut Tasks,
    joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    shutdown: &CancellationToken,
) {
    let (id, panicked) = match &joined {
        Ok((id, ())) => (*id, false),
        Err(e) => (e.id(), e.is_panic()),
    };
    let Some(kind) = tasks.kinds.remove(&id) else {
        return;
    };
    if shutdown.is_cancelled() {
        return;
    }
    if panicked {
        tracing::error!(task = ?kind, "task panicked; restarting it");
    } else {
        tracing::warn!(task = ?kind, "task ended unexpectedly; restarting it");
    }
    parts.spawn(tasks, kind);
}

/// One gateway session: register the devices, open both streams, then feed
/// the consumer until something breaks.
async fn session(
    parts: &Parts,
    consumer: &mut Consumer,
    catch_rx: &mut mpsc::Receiver<CatchUpRequest>,
    delay: Duration,
) -> Result<(), SessionError> {
    tokio::time::sleep(delay).await;
    let config = &parts.config;
    let client = &parts.client;
    consumer.load().await?;
    let infos: Vec<AsyncConnectInfo> = config
        .devices
        .values()
        .map(|d| AsyncConnectInfo {
            device_id: d.id,
            ip_addr: d.address.clone(),
            port: i32::from(d.port),
            use_ssl: d.tls,
        })
        .collect();
    let ids: Vec<u32> = config.devices.keys().copied().collect();
    // Subscribe before looking at the device list and before any replay,
    // so nothing falls between replay and live.
    let mut status = client.subscribe_status(STATUS_QUEUE).await?;
    let mut realtime = client
        .subscribe_realtime_log(config.sync.realtime_queue, ids.clone(), Vec::new())
        .await?;
    client.add_async_connection(infos).await?;
    let list = client.get_device_list().await?;
    let info = client.admin_get_info().await.ok();
    tracing::info!(gateway_version = ?info.map(|i| i.version), devices = list.len(), "gateway session up");
    for id in &ids {
        let up = list
            .iter()
            .any(|d| d.device_id == *id && is_connected(d.status));
        send_one(
            &parts.inboxes,
            *id,
            if up { Input::LinkUp } else { Input::LinkDown },
        );
    }

    let mut poll = tokio::time::interval(config.sync.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            msg = status.message() => match msg {
                Ok(Some(change)) => {
                    if config.devices.contains_key(&change.device_id) {
                        let input = if is_connected(change.status) { Input::LinkUp } else { Input::LinkDown };
                        send_one(&parts.inboxes, change.device_id, input);
                    }
                }
                Ok(None) => return Err(SessionError::StreamEnded("status")),
                Err(s) => return Err(SessionError::Stream { stream: "status", status: GatewayError::from_status("SubscribeStatus", s) }),
            },
            msg = realtime.message() => match msg {
                Ok(Some(ev)) => {
                    let device = ev.device_id;
                    match consumer.realtime(ev).await {
                        Ok(()) => {}
                        Err(ConsumerError::Gateway(e)) => {
                            tracing::warn!(device, error = %e, "cannot replay a realtime gap now; the next poll retries");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(None) => return Err(SessionError::StreamEnded("realtime")),
                Err(s) => return Err(SessionError::Stream { stream: "realtime", status: GatewayError::from_status("SubscribeRealtimeLog", s) }),
            },
            Some(req) = catch_rx.recv() => {
                let r = consumer.catch_up(req.device).await;
                let fatal = matches!(r, Err(ConsumerError::Store(_)));
                let reply = r.as_ref().map(|_| ()).map_err(ToString::to_string);
                let _ = req.reply.send(reply);
                if let (true, Err(e)) = (fatal, r) {
                    return Err(e.into());
                }
            }
            _ = poll.tick() => {
                // A dropped *last* event is revealed by nothing else.
                for (device, phase) in parts.board.snapshot() {
                    if phase != crate::device::Phase::Live {
                        continue;
                    }
                    match consumer.catch_up(device).await {
                        Ok(()) => {}
                        Err(ConsumerError::Gateway(e)) => {
                            tracing::debug!(device, error = %e, "poll failed");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
}

fn is_connected(status: i32) -> bool {
    status == DevStatus::TcpConnected as i32 || status == DevStatus::TlsConnected as i32
}
