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
//!   of raw user records.
//! * [`gateway`] — the client: channel (TLS, keepalive), typed wrappers per
//!   RPC, Multi-error decoding, transient/permanent classification.
//! * [`config`] — the TOML configuration, validated into typed settings.
//! * [`store`] — SQLite state: checkpoints, journal, cursors, quarantine.
//! * [`supervisor`] — owns the gateway session, device tasks and appliers.
//! * [`device`] — per-device state machine (pure) and its task.
//! * [`events`] — the one event consumer: dedupe, gap backfill, replay,
//!   log shipping, change recording.
//! * [`sync`] — the appliers: batches, Multi calls, partial failures,
//!   quarantine, reconcile; [`sync::multi`] — multi-master groups (last
//!   writer wins per user, echo detection, clock skew, union reconcile),
//!   their registers in [`store::multi`].
//! * [`backoff`] — the retry policy.
//! * [`service`] — systemd notifications, STATUS line, watchdog.
//! * [`metrics`] — Prometheus metrics and their endpoint.
//! * [`cli`] — operator commands (status, events, users, enroll, delete,
//!   reconcile, import-config); [`demo`] — the scripted demo.
//! * [`logging`] — journald / stderr / JSON logging.
//! * [`sim`] — the gateway simulator used by the tests and the demo.

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

pub use supervisor::{DaemonError, Reload, Shutdown};

/// Runs the daemon with `config` until `signals.shutdown` is cancelled.
pub async fn run(config: config::Config, signals: Shutdown) -> Result<(), DaemonError> {
    supervisor::run(config, signals).await
}

/// Generated from `proto/` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));
}
