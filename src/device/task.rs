//! The I/O loop of one device: feeds status changes, answers and timers to
//! the pure transition function and performs its actions (enable monitoring
//! through the gateway, ask the event consumer to catch the device up).
//!
//! Every input, also one that arrives while an operation is under way,
//! goes through [`transition`]: the loop waits on the inbox, the one
//! operation in flight and the retry timer at once, and decides nothing
//! itself.

use std::future::Future;
use std::pin::Pin;

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

/// An operation in flight; resolves to the input that answers it.
type Operation = Pin<Box<dyn Future<Output = Input> + Send>>;

/// How a device's monitoring is enabled: the gateway in the daemon, a
/// stand-in in tests.
pub trait Monitoring: Send + Sync + 'static {
    fn enable(&self, device: u32) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
}

impl Monitoring for GatewayClient {
    fn enable(&self, device: u32) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        let client = self.clone();
        Box::pin(async move {
            client
                .enable_monitoring(device)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

pub struct DeviceTask<M = GatewayClient> {
    pub id: u32,
    pub monitoring: M,
    pub catch_up: mpsc::Sender<CatchUpRequest>,
    pub board: Board,
    pub store: Store,
    pub backoff: Backoff,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl<M: Monitoring> DeviceTask<M> {
    /// Runs until cancelled or until the inbox closes.
    pub async fn run(self, mut inbox: mpsc::Receiver<Input>, cancel: CancellationToken) {
        let mut state = DeviceState::Disconnected;
        let mut retry_at: Option<Instant> = None;
        let mut op: Option<Operation> = None;
        self.publish(state, "started").await;
        loop {
            let input = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                msg = inbox.recv() => match msg {
                    Some(i) => i,
                    None => return,
                },
                answer = run_op(&mut op), if op.is_some() => {
                    op = None;
                    answer
                }
                _ = crate::backoff::retry_at(retry_at), if retry_at.is_some() => {
                    retry_at = None;
                    Input::RetryElapsed
                }
            };
            let (next, actions) = transition(state, input);
            if next != state {
                tracing::info!(
                    device_id = self.id,
                    from = state.name(),
                    to = next.name(),
                    input = input.name(),
                    "device state"
                );
                state = next;
                self.publish(state, input.name()).await;
            }
            for action in actions {
                match action {
                    Action::RetryAfter { attempt } => {
                        retry_at = Some(Instant::now() + self.backoff.delay(attempt));
                    }
                    Action::CancelRetry => retry_at = None,
                    Action::Abandon => op = None,
                    Action::EnableMonitoring => op = Some(self.enable_monitoring()),
                    Action::CatchUp => op = Some(self.request_catch_up()),
                }
            }
        }
    }

    fn enable_monitoring(&self) -> Operation {
        let (id, call) = (self.id, self.monitoring.enable(self.id));
        Box::pin(async move {
            match call.await {
                Ok(()) => Input::MonitoringEnabled,
                Err(e) => {
                    tracing::warn!(device_id = id, error = %e, "enable monitoring failed");
                    Input::MonitoringFailed
                }
            }
        })
    }

    /// Asks the consumer to catch the device up and waits for its answer.
    fn request_catch_up(&self) -> Operation {
        let (id, consumer) = (self.id, self.catch_up.clone());
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            if consumer
                .send(CatchUpRequest { device: id, reply })
                .await
                .is_err()
            {
                return Input::CatchUpFailed;
            }
            match answer.await {
                Ok(Ok(())) => Input::CaughtUp,
                Ok(Err(e)) => {
                    tracing::warn!(device_id = id, error = %e, "catch-up failed");
                    Input::CatchUpFailed
                }
                Err(_) => Input::CatchUpFailed,
            }
        })
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

async fn run_op(op: &mut Option<Operation>) -> Input {
    match op {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The task's timing in tokio's paused time: retries wait the
    //! backoff's delay, a link-down abandons a catch-up under way.

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::device::Phase;

    /// Fails the first `failures` calls; records when each call came.
    #[derive(Clone)]
    struct Flaky {
        failures: u32,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl Monitoring for Flaky {
        fn enable(&self, _: u32) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            let fail = calls.len() <= self.failures as usize;
            Box::pin(async move {
                if fail {
                    Err("refused".to_owned())
                } else {
                    Ok(())
                }
            })
        }
    }

    struct Rig {
        inbox: mpsc::Sender<Input>,
        catch_ups: mpsc::Receiver<CatchUpRequest>,
        board: Board,
        calls: Arc<Mutex<Vec<Instant>>>,
        backoff: Backoff,
        _dir: tempfile::TempDir,
    }

    fn rig(failures: u32) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let board = Board::new([7]);
        let (inbox, rx) = mpsc::channel(8);
        let (catch_tx, catch_ups) = mpsc::channel(8);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).unwrap();
        let task = DeviceTask {
            id: 7,
            monitoring: Flaky {
                failures,
                calls: Arc::clone(&calls),
            },
            catch_up: catch_tx,
            board: board.clone(),
            store,
            backoff,
            metrics: Arc::new(crate::metrics::Metrics::default()),
        };
        tokio::spawn(task.run(rx, CancellationToken::new()));
        Rig {
            inbox,
            catch_ups,
            board,
            calls,
            backoff,
            _dir: dir,
        }
    }

    async fn phase(board: &Board, want: Phase) {
        let mut rx = board.subscribe();
        tokio::time::timeout(
            Duration::from_secs(3600),
            rx.wait_for(|m| m.get(&7) == Some(&want)),
        )
        .await
        .expect("phase reached")
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_set_ups_are_retried_after_growing_delays() {
        let mut r = rig(3);
        r.inbox.send(Input::LinkUp).await.unwrap();
        let req = tokio::time::timeout(Duration::from_secs(3600), r.catch_ups.recv())
            .await
            .expect("a catch-up is asked for once monitoring is on")
            .unwrap();
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 4, "three failures, then success");
        for (attempt, pair) in calls.windows(2).enumerate() {
            let waited = pair[1] - pair[0];
            let ceiling = r.backoff.ceiling(attempt as u32);
            assert!(
                waited >= ceiling / 2 && waited <= ceiling,
                "retry {attempt} after {waited:?}, ceiling {ceiling:?}"
            );
        }
        req.reply.send(Ok(())).unwrap();
        phase(&r.board, Phase::Live).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_down_abandons_a_catch_up_and_a_retry() {
        let mut r = rig(0);
        r.inbox.send(Input::LinkUp).await.unwrap();
        let first = r.catch_ups.recv().await.unwrap();
        r.inbox.send(Input::LinkDown).await.unwrap();
        phase(&r.board, Phase::Disconnected).await;
        // The abandoned request's late answer changes nothing.
        let _ = first.reply.send(Ok(()));
        r.inbox.send(Input::LinkUp).await.unwrap();
        let second = r.catch_ups.recv().await.unwrap();
        second.reply.send(Err("log unreadable".into())).unwrap();
        phase(&r.board, Phase::Backoff).await;
        // Down while backing off: no retry comes, even long after.
        r.inbox.send(Input::LinkDown).await.unwrap();
        phase(&r.board, Phase::Disconnected).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            r.calls.lock().unwrap().len(),
            2,
            "no retry after the link went down"
        );
        assert!(r.catch_ups.try_recv().is_err());
    }
}
