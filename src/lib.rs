//! # usersync
//!
//! Keeps the users of Suprema BioStar devices in sync through a G-SDK
//! device gateway.
//!
//! # Layout
//!
//! * [`proto`] — messages and service stubs generated from `proto/`
//!   (written from WIRE.md); users are `bytes` on the sync path.
//! * [`wire`] — API generations, method-path mapping, peeking `hdr.ID` out
//!   of raw user records, valid user IDs; `wire/edit.rs` — editing a raw
//!   record in place (a card, a name), every other byte kept.
//! * [`gateway`] — the client: channel (TLS, keepalive), typed wrappers per
//!   RPC, Multi-error decoding (from tonic-types' `google.rpc.Status`),
//!   transient/permanent classification.
//! * [`config`] — the typed configuration and loading; `config/raw.rs` (the
//!   file's serde shape, errors in words), `validate.rs` (raw → typed, file
//!   and line in every error), `checks.rs` (can the daemon run with it,
//!   warnings), `diff.rs` (a reload as a list of `Change`s, computed once).
//! * [`store`] — SQLite state: checkpoints, journal, cursors, quarantine;
//!   `store/lock.rs` — the daemon lock of the state directory.
//! * [`supervisor`] — owns the task tree (device tasks, appliers, the
//!   event consumer's task), restarts, reloads and shutdown;
//!   `supervisor/session.rs` — one gateway session (streams, registration,
//!   status routing); `supervisor/tasks.rs` — task kinds, (re)spawning,
//!   routing a reload's changes.
//! * [`device`] — per-device state machine (pure and total: every state ×
//!   input decided in `transition`) and the task that performs its actions.
//! * [`events`] — the one event consumer: dedupe, gap backfill, replay,
//!   log shipping, change recording.
//! * [`sync`] — one applier per group: `mod.rs` (its loop, lanes taking
//!   turns, the idle wait), `apply.rs` (journal and pending lanes, Multi
//!   calls, moving cursors), `source.rs` (reading users at the sources,
//!   absence confirmed), `reconcile.rs`, `failure.rs` (transient/permanent,
//!   narrowing down and quarantine), `plan.rs` (cohorts, batches; pure).
//!   [`sync::multi`] — multi-master groups (last writer wins per user, echo
//!   detection, clock skew, union reconcile), their registers in
//!   [`store::multi`].
//! * [`backoff`] — the retry policy.
//! * [`service`] — systemd notifications, STATUS line, watchdog;
//!   `service::signals` — SIGTERM/SIGINT (stop, a second abandons), SIGHUP
//!   (the reload protocol).
//! * [`metrics`] — Prometheus metrics and their endpoint.
//! * [`cli`] — operator commands, one file each under `cli/` (status,
//!   events, users, enroll, delete, reconcile/, import_config/,
//!   check_config), with `render` (text and JSON output), `time`,
//!   `next_step` (errors in the operator's words) and `drift`; it works
//!   through config, store and gateway, never the supervisor or the
//!   simulator.
//!   [`demo`] — the scripted demo.
//! * [`logging`] — journald / stderr / JSON logging.
//! * [`sim`] — the gateway simulator used by the tests and the demo.
//!
//! This file: [`run`] (the daemon with a shutdown signal as a parameter,
//! for tests and the demo), [`check_start`] and [`serve`] (what `usersync
//! run` does). `main.rs` only parses, sets up logging and maps exit codes.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod config;
pub mod demo;
pub mod device;
pub mod events;
pub mod gateway;
pub mod logging;
pub mod metrics;
pub mod service;
pub mod sim;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod wire;

pub use service::{Reload, Shutdown};
pub use supervisor::DaemonError;

/// Runs the daemon with `config` until `signals.shutdown` is cancelled.
pub async fn run(config: config::Config, signals: Shutdown) -> Result<(), DaemonError> {
    supervisor::run(config, signals).await
}

/// What `usersync run` checks before it starts logging, beyond what
/// `check-config` checks: that `[metrics] listen` can be listened on. A
/// port that a daemon on the same state directory holds is said as that
/// daemon.
pub fn check_start(config: &config::Config) -> Result<(), DaemonError> {
    let Some(addr) = config.metrics_listen else {
        return Ok(());
    };
    metrics::check_listen(addr).map_err(|reason| {
        if let Ok(None) = store::try_lock(&config.state_dir) {
            DaemonError::AlreadyRunning(config.state_dir.clone())
        } else {
            DaemonError::MetricsListen {
                config: config.path.clone(),
                reason,
            }
        }
    })
}

/// Runs the daemon as `usersync run` does, under systemd or in the
/// foreground: warns about what the configuration exposes, answers the
/// signals ([`service::signals`]: stop, abandon, reload from
/// `config.path`) and keeps the service manager informed, until stopped.
pub async fn serve(config: config::Config) -> Result<(), DaemonError> {
    for w in config::warnings(&config) {
        tracing::warn!("{w}");
    }
    let (signals, reloads) =
        service::signals::listen(config.path.clone()).map_err(DaemonError::Signals)?;
    let health = std::sync::Arc::new(service::Health::default());
    supervisor::run_with(config, signals, Some(reloads), health).await
}

/// Generated from `proto/` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));
}
