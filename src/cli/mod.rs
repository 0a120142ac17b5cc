//! Operator commands: what an operator of Suprema's example did through its
//! menu, as commands reading the daemon's configuration. Data output has a
//! `--json` form (timestamps in RFC 3339). No command ever prints a
//! template, PIN or photo: users are shown as counts and sizes.
//!
//! The operator's edge: no command destroys data by surprise (adding a card
//! to a user keeps everything else the user has; a prune says how many
//! users it deletes and asks), and every error says what to do next
//! ([`describe`]).
//!
//! Commands work through the configuration, the state database and the
//! gateway only, never through the daemon's tasks or the simulator: the
//! daemon lock ([`crate::store::try_lock`]) tells whether a daemon runs,
//! and is held while a command writes what the daemon owns.
//!
//! # Layout
//!
//! * this file — [`CliError`], and what every command shares: the gateway
//!   client, the check that a device is configured, the daemon lock.
//! * `next_step` — an error in the operator's words, with what to do next.
//! * `render` — text and JSON output of the commands (`render/multi.rs`:
//!   multi-master groups in status); `time` — UTC and RFC 3339 times, ages.
//! * `status`, `events`, `users`, `enroll`, `delete`, `check_config` — one
//!   command each (`status/multi.rs`: what status shows of multi-master
//!   groups); `drift` — what a write at a target means for its group
//!   (shared by enroll and delete).
//! * `reconcile/` — the plan (`plan`), what the sources list (`sources`),
//!   writing it here with the daemon stopped (`write`), multi-master
//!   members (`members`: requests to the running daemon only, and what to
//!   say otherwise), and the requests to a running daemon (`mod.rs`).
//! * `import_config/` — Suprema's `sync_config.json` (`example`), converted
//!   and seeded all or nothing (`mod.rs`).

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::gateway::{GatewayClient, GatewayError};
use crate::store::{self, StoreError};

mod check_config;
mod delete;
mod drift;
mod enroll;
mod events;
mod import_config;
mod next_step;
mod reconcile;
mod render;
mod status;
mod time;
mod users;

pub use check_config::check_config;
pub use delete::delete;
pub use drift::{TargetWrite, target_warning};
pub use enroll::{MAX_NAME_CHARS, card_user, enroll_card};
pub use events::{EventLine, events};
pub use import_config::{ExampleConfig, ExampleDevice, ImportTarget, import_config, import_text};
pub use next_step::{describe, gateway_hint};
pub use reconcile::{
    KeptUser, NotPlanned, NotReconciled, Plan, TargetPlan, UnreadableHeaders, plan_outcome,
    reconcile, reconcile_plan,
};
pub use render::{json, plural, render_events, render_plan, render_status, render_users};
pub use status::{
    ClockStatus, ConflictStatus, DaemonInfo, DeviceStatus, Drift, GatewayStatus, LastReconcile,
    MemberReconcile, MemberStatus, MultiMasterStatus, ReconcileProgress, Status, TargetStatus,
    status,
};
pub use time::{age, fmt_utc, rfc3339};
pub use users::{UserSummary, UsersOutput, summarize, users};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// A call addressing one device failed.
    #[error("device {device}: {source}")]
    AtDevice { device: u32, source: GatewayError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] crate::events::read::ReadError),
    #[error("{0}")]
    Usage(String),
    #[error("{}", cannot_tell(path, source))]
    CannotTell {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no state yet in {}: the daemon has not run with {} — start it (`sudo systemctl start usersync`, \
         or `usersync run --config {}` in the foreground); `usersync status` shows the devices once it runs",
        dir.display(), config.display(), config.display()
    )]
    NoState { dir: PathBuf, config: PathBuf },
    /// Part of the work was done (`done`, for stdout), part not (`failed`).
    #[error("{failed}")]
    Incomplete { done: String, failed: String },
}

fn cannot_tell(path: &Path, source: &std::io::Error) -> String {
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot tell whether the daemon is running: permission denied on {}; run with sudo \
             (the state directory belongs to the service)",
            path.display()
        ),
        _ => format!(
            "cannot tell whether the daemon is running: {source} on {}; refusing to act",
            path.display()
        ),
    }
}

fn at(device: u32) -> impl FnOnce(GatewayError) -> CliError {
    move |source| CliError::AtDevice { device, source }
}

/// Whether a daemon runs on the state directory. Writers of the state (and
/// of devices on the daemon's behalf) act only with [`Daemon::Stopped`],
/// holding its lock until they are done; when this process cannot tell,
/// it says so instead of guessing.
enum Daemon {
    Running,
    /// No daemon runs, and none can start while this lock is held.
    Stopped(std::fs::File),
}

/// Takes the daemon lock if it is free, making a missing state directory
/// (as the daemon would) to take it in.
fn daemon(config: &Config) -> Result<Daemon, CliError> {
    let dir = &config.state_dir;
    // Not `Path::exists`: it answers "no" for a directory this user may
    // not look into, which is how a daemon beside us was taken for none.
    match dir.try_exists() {
        Ok(true) => {}
        Ok(false) => store::prepare_dir(dir)?,
        Err(source) => {
            return Err(CliError::CannotTell {
                path: dir.clone(),
                source,
            });
        }
    }
    match store::try_lock(dir) {
        Ok(Some(lock)) => Ok(Daemon::Stopped(lock)),
        Ok(None) => Ok(Daemon::Running),
        Err(StoreError::Lock { path, source }) => Err(CliError::CannotTell { path, source }),
        Err(e) => Err(e.into()),
    }
}

fn client(config: &Config) -> Result<GatewayClient, CliError> {
    Ok(GatewayClient::new(&config.gateway.settings())?)
}

/// Refuses a device the configuration does not declare: the daemon never
/// registers it with the gateway, so the gateway would only say "not
/// connected".
fn configured(config: &Config, device: u32) -> Result<(), CliError> {
    if config.devices.contains_key(&device) {
        return Ok(());
    }
    let known: Vec<String> = config.devices.keys().map(u32::to_string).collect();
    Err(CliError::Usage(format!(
        "device {device} is not in the configuration {}: add a [[device]] with id = {device} (and \
         `systemctl reload usersync`), or use one of: {}",
        config.path.display(),
        if known.is_empty() {
            "(none)".to_owned()
        } else {
            known.join(" ")
        }
    )))
}
