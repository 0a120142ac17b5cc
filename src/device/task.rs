//! The I/O loop of one device: feeds status changes, answers and timers to
//! the pure transition function and performs its actions (enable monitoring
//! through the gateway, ask the event consumer to catch the device up).

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Board;
use super::state::{Action, DeviceState, Input, transition};
use crate::backoff::Backoff;
use crate::gateway::GatewayClient;
use crate::store::{self, Store};

/// Asks the event consumer, the only owner of checkpoints, to replay a
/// device's log from its checkpoint. The reply says whether it succeeded.
#[derive(Debug)]
pub struct CatchUpRequest {
    pub device: u32,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub struct DeviceTask {
    pub id: u32,
    pub client: GatewayClient,
    pub catch_up: mpsc::Sender<CatchUpRequest>,
    pub board: Board,
    pub store: Store,
    pub backoff: Backoff,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl DeviceTask {
    /// Runs until cancelled or until the inbox closes.
    pub async fn run(self, mut inbox: mpsc::Receiver<Input>, cancel: CancellationToken) {
        let mut state = DeviceState::Disconnected;
        let mut retry_at: Option<Instant> = None;
        self.publish(state, "started").await;
        loop {
            let input = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                msg = inbox.recv() => match msg {
                    Some(i) => i,
                    None => return,
                },
                _ = sleep_until(retry_at), if retry_at.is_some() => {
                    retry_at = None;
                    Input::RetryElapsed
                }
            };
            let mut pending = vec![input];
            while let Some(input) = pending.pop() {
                let (next, actions) = transition(state, input, &self.backoff);
                if next != state {
                    tracing::info!(
                        device_id = self.id,
                        from = state.name(),
                        to = next.name(),
                        ?input,
                        "device state"
                    );
                    state = next;
                    self.publish(state, &format!("{input:?}")).await;
                }
                if state == DeviceState::Disconnected {
                    retry_at = None;
                }
                for action in actions {
                    let follow = match action {
                        Action::RetryAfter(d) => {
                            retry_at = Some(Instant::now() + d);
                            None
                        }
                        Action::EnableMonitoring => {
                            tokio::select! {
                                biased;
                                _ = cancel.cancelled() => return,
                                r = self.client.enable_monitoring(self.id) => Some(match r {
                                    Ok(()) => Input::MonitoringEnabled,
                                    Err(e) => {
                                        tracing::warn!(device_id = self.id, error = %e, "enable monitoring failed");
                                        Input::MonitoringFailed
                                    }
                                }),
                            }
                        }
                        Action::CatchUp => match self.catch_up(&mut inbox, &cancel).await {
                            Some(i) => Some(i),
                            None => return,
                        },
                    };
                    pending.extend(follow);
                }
            }
        }
    }

    /// Waits for the consumer to catch the device up. A link-down while
    /// waiting abandons the wait. `None`: cancelled.
    async fn catch_up(
        &self,
        inbox: &mut mpsc::Receiver<Input>,
        cancel: &CancellationToken,
    ) -> Option<Input> {
        let (reply, answer) = oneshot::channel();
        let req = CatchUpRequest {
            device: self.id,
            reply,
        };
        if self.catch_up.send(req).await.is_err() {
            return Some(Input::CatchUpFailed);
        }
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                r = &mut answer => return Some(match r {
                    Ok(Ok(())) => Input::CaughtUp,
                    Ok(Err(e)) => {
                        tracing::warn!(device_id = self.id, error = %e, "catch-up failed");
                        Input::CatchUpFailed
                    }
                    Err(_) => Input::CatchUpFailed,
                }),
                msg = inbox.recv() => match msg {
                    Some(Input::LinkDown) => return Some(Input::LinkDown),
                    Some(_) => {}
                    None => return None,
                },
            }
        }
    }

    async fn publish(&self, state: DeviceState, detail: &str) {
        self.board.set(self.id, state.phase());
        self.metrics.set_phase(self.id, state.phase());
        let (id, name, detail) = (self.id, state.name(), detail.to_owned());
        let r = self
            .store
            .run(move |c| store::set_device_status(c, id, name, &detail))
            .await;
        if let Err(e) = r {
            tracing::warn!(device_id = self.id, error = %e, "cannot record device status");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
