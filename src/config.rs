//! The daemon's configuration: raw serde types (unknown keys rejected) →
//! `validate` → a typed [`Config`] with no leftover options.
//!
//! Every error names the file, the line and the reason; `main` maps them to
//! exit 78 (EX_CONFIG).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::gateway::{DEFAULT_INPUT_TIMEOUT, GatewaySettings, TlsSettings};
use crate::wire::Api;

/// An invalid configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

mod checks;
mod diff;
mod multi;
mod raw;
#[cfg(test)]
mod tests;

/// Configurations the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::Path;

    use super::Config;

    /// Devices 1–4: a multi-master group `desks` of 1 and 2
    /// (`max_clock_skew_secs = 7`), a one-way group `doors` from 3 to 4.
    pub(crate) fn desks_and_doors() -> Config {
        super::parse(
            Path::new("/t.toml"),
            "[gateway]\naddress = \"h:1\"\ntls = false\n[state]\ndir = \"/s\"\n\
             [[device]]\nid = 1\naddress = \"a\"\n[[device]]\nid = 2\naddress = \"b\"\n\
             [[device]]\nid = 3\naddress = \"c\"\n[[device]]\nid = 4\naddress = \"d\"\n\
             [[group]]\nname = \"desks\"\nmode = \"multi-master\"\nmembers = [1, 2]\nmax_clock_skew_secs = 7\n\
             [[group]]\nname = \"doors\"\nsources = [3]\ntargets = [4]\n",
        )
        .expect("the fixture parses")
    }
}
mod validate;

pub use checks::*;
pub use diff::{Change, diff, summary};
pub use raw::in_words;

// ---- typed configuration -----------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    /// Empty for a multi-master group (so every one-way path skips it).
    pub sources: Vec<u32>,
    /// Empty for a multi-master group.
    pub targets: Vec<u32>,
    /// One-way: remove users from targets that the sources do not have
    /// (reconcile). Multi-master: settle a difference between members that
    /// no history decides by the order of `members`.
    pub prune: bool,
    /// Propagate a source's "delete all users" (0x2600) to the targets
    /// (one-way only).
    pub propagate_delete_all: bool,
    pub mode: GroupMode,
}

impl GroupConfig {
    /// The multi-master settings, if the group is one.
    pub fn multi_master(&self) -> Option<&MultiMaster> {
        match &self.mode {
            GroupMode::OneWay => None,
            GroupMode::MultiMaster(m) => Some(m),
        }
    }

    /// The members of a multi-master group (empty for a one-way group).
    pub fn members(&self) -> &[u32] {
        self.multi_master().map_or(&[], |m| &m.members)
    }
}

/// How a group's devices relate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupMode {
    /// Changes at `sources` are copied to `targets`, never back.
    OneWay,
    /// Every member accepts changes; they reach every other member; the
    /// last writer wins per user (`sync::multi`).
    MultiMaster(MultiMaster),
}

/// A multi-master group's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiMaster {
    /// In the order given: with `prune`, the first member holding a user
    /// settles a difference no history decides.
    pub members: Vec<u32>,
    pub echo: EchoDetection,
    /// A device clock this far from the daemon's is warned about, and an
    /// event time further ahead than this is ordered as the daemon's time
    /// plus this bound.
    pub max_clock_skew: Duration,
}

/// How the daemon tells a member's own changes from its writes there
/// (which the device logs as user events too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoDetection {
    /// Only events with `changedOnDevice` set are changes (WIRE.md B13).
    ChangedOnDevice,
    /// Events matching a write of the daemon (device, user, operation)
    /// within a bounded window are its own; the rest are changes.
    OwnWrites,
    /// Not configured: own writes until a member reports an event with
    /// `changedOnDevice` set, then changed-on-device (recorded, logged).
    Observe,
}

/// Default of `max_clock_skew_secs`.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub address: String,
    pub ca_file: Option<PathBuf>,
    /// PEM read from `ca_file` at load time (`None` with `tls = false`).
    pub ca_pem: Option<Vec<u8>>,
    pub server_name: Option<String>,
    pub api: Api,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    pub call_timeout: Duration,
}

impl GatewayConfig {
    pub fn settings(&self) -> GatewaySettings {
        let tls = self.ca_pem.as_ref().map(|pem| TlsSettings {
            ca_pem: pem.clone(),
            server_name: self.server_name.clone(),
        });
        GatewaySettings {
            address: self.address.clone(),
            tls,
            api: self.api,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            connect_timeout: self.connect_timeout,
            call_timeout: self.call_timeout,
            input_timeout: DEFAULT_INPUT_TIMEOUT,
        }
    }
}

/// Tuning of the sync engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Users per Multi call.
    pub batch_users: usize,
    /// Bytes of user records per Multi call (well under the 4 MiB gRPC
    /// default of other peers; the gateway accepts 72 MiB, WIRE.md B25).
    pub batch_bytes: usize,
    /// How often appliers look for work nothing woke them for (operator
    /// requests such as `usersync reconcile` written to the state
    /// database). No device is called for it.
    pub poll_interval: Duration,
    /// A device's log tail is read this long after its last realtime event
    /// (debounced) and after each catch-up: a dropped *last* event is
    /// revealed by nothing else.
    pub tail_check_delay: Duration,
    /// A device with no event and no read for this long has its log tail
    /// read once (the idle sweep; one call per device per interval).
    pub idle_check_interval: Duration,
    /// Device log reads in flight at once (each is a LAN round trip to a
    /// reader, relayed by the gateway).
    pub device_concurrency: usize,
    /// `queueSize` of the realtime subscription.
    pub realtime_queue: i32,
    /// Permanent failures of one user on one device before it is quarantined.
    pub quarantine_after: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            batch_users: 64,
            batch_bytes: 2 * 1024 * 1024,
            poll_interval: Duration::from_secs(5),
            tail_check_delay: Duration::from_secs(1),
            idle_check_interval: Duration::from_secs(600),
            device_concurrency: 16,
            realtime_queue: 4096,
            quarantine_after: 3,
        }
    }
}

/// Which device events are written to the journal (log shipping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventShipping {
    #[default]
    All,
    UserEvents,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub gateway: GatewayConfig,
    pub state_dir: PathBuf,
    pub devices: BTreeMap<u32, DeviceConfig>,
    pub groups: Vec<GroupConfig>,
    pub sync: SyncConfig,
    pub ship_events: EventShipping,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Config {
    /// Every device that is a source of some group.
    pub fn is_source(&self, device: u32) -> bool {
        self.groups.iter().any(|g| g.sources.contains(&device))
    }

    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The multi-master group `device` is a member of (one at most).
    pub fn member_of(&self, device: u32) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.members().contains(&device))
    }
}

// ---- loading and validation -------------------------------------------------

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates `text` (the contents of `path`).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    validate::parse(path, text)
}
