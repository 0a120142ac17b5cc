//! The daemon's signals, as systemd (`Type=notify-reload`) and an operator
//! send them: SIGTERM or SIGINT asks for an orderly stop and a second one
//! abandons the grace period; SIGHUP reloads the configuration file
//! (`RELOADING=1` … `READY=1`), and a file that does not load is logged
//! while the running configuration stays. What the signals ask reaches the
//! supervisor as a [`Shutdown`] and [`Reload`]s: this module never touches
//! the daemon's tasks.
//!
//! The signals arrive through signal-hook-tokio: signal-hook's handler
//! writes to a self-pipe that tokio's reactor reads, so they come as a
//! stream in a task of their own (no thread, nothing to join at exit).

use std::ffi::c_int;
use std::path::PathBuf;

use futures_util::{Stream, StreamExt};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};

/// Signals for the daemon: `shutdown` asks for an orderly stop; `abandon`
/// (a second signal) stops waiting for in-flight work.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    pub shutdown: CancellationToken,
    pub abandon: CancellationToken,
}

/// A new configuration to apply; `done` receives a summary of the change.
#[derive(Debug)]
pub struct Reload {
    pub config: Config,
    pub done: oneshot::Sender<String>,
}

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Stop,
    Reload,
}

fn request(signal: c_int) -> Option<Request> {
    match signal {
        SIGTERM | SIGINT => Some(Request::Stop),
        SIGHUP => Some(Request::Reload),
        _ => None,
    }
}

/// Installs the handlers for SIGTERM, SIGINT and SIGHUP and answers them
/// in a task of its own; reloads read `config_path`. Returns what the
/// supervisor watches. Must be called within a tokio runtime.
pub fn listen(config_path: PathBuf) -> std::io::Result<(Shutdown, mpsc::Receiver<Reload>)> {
    let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let shutdown = Shutdown::default();
    let (reload, reloads) = mpsc::channel(1);
    tokio::spawn(answer(signals, shutdown.clone(), reload, config_path));
    Ok((shutdown, reloads))
}

/// Answers the signals in the order they come; a reload is answered whole
/// (applied by the supervisor, or rejected) before the next signal is
/// read. Returns after the second stop.
async fn answer(
    mut signals: impl Stream<Item = c_int> + Unpin,
    shutdown: Shutdown,
    reload: mpsc::Sender<Reload>,
    config_path: PathBuf,
) {
    let mut stops = 0u32;
    // The reload under way (the supervisor applying it), and whether
    // another SIGHUP came meanwhile: read again when it is done. It runs
    // beside the signals, so a stop is never held back by it.
    let mut reloading: Option<tokio::task::JoinHandle<()>> = None;
    let mut again = false;
    loop {
        tokio::select! {
            signal = signals.next() => {
                let Some(signal) = signal else {
                    if let Some(r) = reloading.take() {
                        let _ = r.await;
                    }
                    return;
                };
                match request(signal) {
                    Some(Request::Reload) if stops > 0 => {
                        tracing::info!("reload ignored: the daemon is shutting down");
                    }
                    Some(Request::Reload) if reloading.is_some() => again = true,
                    Some(Request::Reload) => {
                        reloading = Some(tokio::spawn(reload_from(config_path.clone(), reload.clone())));
                    }
                    Some(Request::Stop) => {
                        stops += 1;
                        if stops == 1 {
                            tracing::info!("signal received: shutting down");
                            shutdown.shutdown.cancel();
                            // The supervisor answers no reload now.
                            if let Some(r) = reloading.take() {
                                r.abort();
                            }
                        } else {
                            shutdown.abandon.cancel();
                            return;
                        }
                    }
                    None => {}
                }
            }
            _ = async { if let Some(r) = reloading.as_mut() { let _ = r.await; } }, if reloading.is_some() => {
                reloading = None;
                if std::mem::take(&mut again) {
                    reloading = Some(tokio::spawn(reload_from(config_path.clone(), reload.clone())));
                }
            }
        }
    }
}

async fn reload_from(path: PathBuf, reload: mpsc::Sender<Reload>) {
    super::reloading();
    match config::load(&path) {
        Ok(config) => {
            let (done, answer) = oneshot::channel();
            if reload.send(Reload { config, done }).await.is_ok() {
                let _ = answer.await;
            }
        }
        Err(e) => tracing::error!("reload rejected, keeping the running configuration: {e}"),
    }
    super::ready();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Every wait here ends by this deadline.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn config_text(devices: u32) -> String {
        let mut s = "[gateway]\naddress = \"127.0.0.1:4000\"\ntls = false\n\n[state]\ndir = \"/var/lib/usersync\"\n\n"
            .to_owned();
        for id in 1..=devices {
            s.push_str(&format!(
                "[[device]]\nid = {id}\naddress = \"192.0.2.{id}\"\n\n"
            ));
        }
        s
    }

    #[test]
    fn signals_ask_for_stop_or_reload() {
        assert_eq!(request(SIGTERM), Some(Request::Stop));
        assert_eq!(request(SIGINT), Some(Request::Stop));
        assert_eq!(request(SIGHUP), Some(Request::Reload));
        assert_eq!(request(signal_hook::consts::SIGUSR1), None);
    }

    /// The first stop asks for an orderly shutdown only; the second
    /// abandons in-flight work, and the answering ends.
    #[tokio::test]
    async fn a_second_stop_abandons() {
        let (tx, rx) = mpsc::channel(4);
        let shutdown = Shutdown::default();
        let (reload, _reloads) = mpsc::channel(1);
        let task = tokio::spawn(answer(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            shutdown.clone(),
            reload,
            PathBuf::from("/nonexistent/usersync.toml"),
        ));
        tx.send(SIGTERM).await.unwrap();
        tokio::time::timeout(DEADLINE, shutdown.shutdown.cancelled())
            .await
            .expect("the first stop asks for a shutdown");
        assert!(!shutdown.abandon.is_cancelled());
        tx.send(SIGINT).await.unwrap();
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("answering ends after the second stop")
            .unwrap();
        assert!(shutdown.abandon.is_cancelled());
    }

    /// SIGHUP hands over the file as it is then; a file that does not load
    /// hands over nothing, and the next good one is handed over again. The
    /// file is rewritten only when the next signal is read, which is after
    /// the previous one was answered.
    /// A reload that is never answered (the supervisor is shutting down)
    /// holds back neither the stop nor the second stop that abandons.
    #[tokio::test]
    async fn an_unanswered_reload_does_not_hold_back_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usersync.toml");
        std::fs::write(&path, config_text(1)).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let shutdown = Shutdown::default();
        // Kept, never read: the reload waits for its answer.
        let (reload, _reloads) = mpsc::channel(1);
        let task = tokio::spawn(answer(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            shutdown.clone(),
            reload,
            path,
        ));
        for signal in [SIGHUP, SIGTERM, SIGHUP, SIGTERM] {
            tx.send(signal).await.unwrap();
        }
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("answering ends after the second stop")
            .unwrap();
        assert!(shutdown.shutdown.is_cancelled());
        assert!(shutdown.abandon.is_cancelled());
    }

    #[tokio::test]
    async fn reloads_hand_over_the_files_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usersync.toml");
        let (tx, rx) = mpsc::channel(4);
        let shutdown = Shutdown::default();
        let (reload, mut reloads) = mpsc::channel(1);
        let task = tokio::spawn(answer(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            shutdown.clone(),
            reload,
            path.clone(),
        ));
        let mut handed = Vec::new();
        for devices in [1, 2] {
            std::fs::write(&path, config_text(devices)).unwrap();
            tx.send(SIGHUP).await.unwrap();
            let r = tokio::time::timeout(DEADLINE, reloads.recv())
                .await
                .expect("a reload")
                .expect("handed over");
            handed.push(r.config.devices.len());
            r.done.send("applied".into()).unwrap();
        }
        // A file that does not load is not handed over (the next good one
        // is).
        std::fs::write(&path, "[gateway]\naddress = 1\n").unwrap();
        tx.send(SIGHUP).await.unwrap();
        drop(tx);
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        assert!(reloads.try_recv().is_err(), "an invalid file handed over");
        assert_eq!(handed, vec![1, 2]);
        assert!(!shutdown.shutdown.is_cancelled());
    }
}
