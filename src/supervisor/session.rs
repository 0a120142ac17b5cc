//! One gateway session: both streams opened in tasks of their own,
//! the devices registered and listed, then status changes, reload changes
//! and the periodic device list routed to the device tasks until something
//! breaks (see the supervisor's module doc for why streams never gate it).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Parts, STATUS_QUEUE, send_one};
use crate::config::Change;
use crate::device::Input;
use crate::gateway::{GatewayClient, GatewayError};
use crate::proto::gsdk::connect::{AsyncConnectInfo, Status as DevStatus};
use crate::proto::gsdk::event::EventLog;
use crate::service::GatewayHealth;

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
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
    clocks: std::sync::Arc<crate::sync::multi::clock::ClockWatch>,
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
                // Received now: its time against ours is the device's skew.
                clocks.observe(ev.device_id, ev.timestamp);
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
    // One pass over the list (it was searched once per device: a million
    // comparisons every poll interval at 1,000 devices).
    let connected: std::collections::HashSet<u32> = list
        .iter()
        .filter(|d| is_connected(d.status))
        .map(|d| d.device_id)
        .collect();
    for id in ids {
        let up = connected.contains(id);
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
pub(super) async fn session(parts: &Parts, delay: Duration) -> Result<(), SessionError> {
    tokio::time::sleep(delay).await;
    // Registrations are made right below from what this daemon registered
    // before and the configuration read next: reload changes queued before
    // it are done by that. (Cleared first, so a reload in between is made
    // twice rather than never; registering and forgetting are idempotent.)
    parts
        .gateway_changes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let mut config = parts.config();
    let client = &parts.client;
    let mut streams: JoinSet<SessionError> = JoinSet::new();
    let (status_tx, mut status_rx) = mpsc::channel(STATUS_QUEUE as usize);
    streams.spawn(status_stream(client.clone(), status_tx));
    streams.spawn(realtime_stream(
        client.clone(),
        config.sync.realtime_queue,
        parts.realtime.clone(),
        std::sync::Arc::clone(&parts.clocks),
    ));
    // Let the stream tasks hand their requests to the channel before any
    // device is registered (see the module doc).
    tokio::task::yield_now().await;
    // A device removed or re-addressed while no session was up is still
    // registered at a gateway that kept running: forgotten first.
    let stale: Vec<u32> = registered(parts)
        .iter()
        .filter(|(id, was)| config.devices.get(id) != Some(*was))
        .map(|(id, _)| *id)
        .collect();
    forget(parts, stale).await?;
    register(client, config.devices.values().map(connect_info).collect()).await?;
    *parts.registered.lock().unwrap_or_else(|e| e.into_inner()) = config.devices.clone();
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
                // The changes the supervisor computed (config::diff, once),
                // taken together with the configuration they lead to.
                let changes = std::mem::take(&mut *parts.gateway_changes.lock().unwrap_or_else(|e| e.into_inner()));
                let new = parts.config();
                // Two reloads may have queued changes of one device (added,
                // then removed): what is done is decided per device by what
                // this session registered and what the configuration holds now.
                let mut ids: Vec<u32> = changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::AddDevice(id) | Change::RemoveDevice(id) | Change::ChangeDevice(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                let (mut gone, mut added) = (Vec::new(), Vec::new());
                for id in ids {
                    match (config.devices.get(&id), new.devices.get(&id)) {
                        (Some(_), None) => gone.push(id),
                        (None, Some(_)) => added.push(id),
                        (Some(was), Some(now)) if was != now => {
                            gone.push(id);
                            added.push(id);
                        }
                        _ => {}
                    }
                }
                // On an error the session starts over, and its start makes
                // the registrations from `registered` and the configuration.
                forget(parts, gone).await?;
                let infos: Vec<AsyncConnectInfo> =
                    added.iter().filter_map(|id| new.devices.get(id)).map(connect_info).collect();
                if !infos.is_empty() {
                    register(client, infos).await?;
                    {
                        let mut held = parts.registered.lock().unwrap_or_else(|e| e.into_inner());
                        for id in &added {
                            if let Some(d) = new.devices.get(id) {
                                held.insert(*id, d.clone());
                            }
                        }
                    }
                    // Their status may already be "connected"; ask.
                    let list = client.get_device_list().await?;
                    apply_list(parts, &added, &list, false);
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

fn registered(parts: &Parts) -> std::collections::BTreeMap<u32, crate::config::DeviceConfig> {
    parts
        .registered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Forgets devices at the gateway (`DeleteAsyncConnection`). A refusal
/// that is not transient (a device the gateway does not hold: WIRE.md
/// says nothing of it) is tried device by device and logged, never fatal
/// to the session: a device that cannot be forgotten costs a registration,
/// not a reconnect of every device.
async fn forget(parts: &Parts, ids: Vec<u32>) -> Result<(), GatewayError> {
    if ids.is_empty() {
        return Ok(());
    }
    let client = &parts.client;
    let done = |ids: &[u32]| {
        let mut held = parts.registered.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            held.remove(id);
        }
    };
    let e = match client.delete_async_connection(ids.clone()).await {
        Ok(()) => {
            done(&ids);
            return Ok(());
        }
        Err(e) if e.disposition() == crate::gateway::Disposition::Transient => return Err(e),
        Err(e) => e,
    };
    tracing::warn!(error = %e, "the gateway refused to forget the devices at once; forgetting them one by one");
    for id in ids {
        match client.delete_async_connection(vec![id]).await {
            Ok(()) => {}
            Err(e) if e.disposition() == crate::gateway::Disposition::Transient => return Err(e),
            Err(e) => {
                tracing::warn!(device_id = id, error = %e, "the gateway refused to forget the device; taking it as not registered");
            }
        }
        done(&[id]);
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
