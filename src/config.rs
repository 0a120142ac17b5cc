//! The daemon's configuration: raw serde types (unknown keys rejected) →
//! [`validate`] → a typed [`Config`] with no leftover options.
//!
//! Every error names the file, the line and the reason; `main` maps them to
//! exit 78 (EX_CONFIG).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::gateway::{
    DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_INPUT_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, GatewaySettings, TlsSettings,
};
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

// ---- raw file shape --------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: Spanned<RawGateway>,
    state: Spanned<RawState>,
    #[serde(default)]
    device: Vec<Spanned<RawDevice>>,
    #[serde(default)]
    group: Vec<Spanned<RawGroup>>,
    #[serde(default)]
    sync: Option<Spanned<RawSync>>,
    #[serde(default)]
    log: Option<Spanned<RawLog>>,
    #[serde(default)]
    metrics: Option<Spanned<RawMetrics>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    address: Spanned<String>,
    ca_file: Option<Spanned<PathBuf>>,
    #[serde(default = "yes")]
    tls: bool,
    server_name: Option<Spanned<String>>,
    api: Option<Spanned<String>>,
    keepalive_interval_secs: Option<Spanned<u64>>,
    keepalive_timeout_secs: Option<Spanned<u64>>,
    connect_timeout_secs: Option<Spanned<u64>>,
    call_timeout_secs: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Spanned<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: Spanned<u32>,
    address: Spanned<String>,
    #[serde(default = "default_port")]
    port: Spanned<u16>,
    #[serde(default)]
    tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    sources: Spanned<Vec<u32>>,
    targets: Spanned<Vec<u32>>,
    #[serde(default)]
    prune: bool,
    #[serde(default)]
    propagate_delete_all: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    batch_users: Option<Spanned<usize>>,
    batch_bytes: Option<Spanned<usize>>,
    poll_interval_secs: Option<Spanned<u64>>,
    tail_check_delay_ms: Option<Spanned<u64>>,
    idle_check_interval_secs: Option<Spanned<u64>>,
    device_concurrency: Option<Spanned<usize>>,
    realtime_queue: Option<Spanned<i32>>,
    quarantine_after: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    events: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

fn yes() -> bool {
    true
}

fn default_port() -> Spanned<u16> {
    // The span of a default is never shown: only port 0 is an error.
    Spanned::new(0..0, 51211)
}

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
    pub sources: Vec<u32>,
    pub targets: Vec<u32>,
    /// Remove users from targets that the sources do not have (reconcile).
    pub prune: bool,
    /// Propagate a source's "delete all users" (0x2600) to the targets.
    pub propagate_delete_all: bool,
}

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
    let v = Validator { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let key = e.span().and_then(|s| key_at(text, s.start));
        ConfigError {
            file: path.to_owned(),
            line: e.span().map(|s| v.line_of(s.start)),
            reason: in_words(e.message().trim(), key.as_deref()),
        }
    })?;
    v.validate(raw)
}

/// The key of the `key = value` line that holds byte `offset`, if any.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    key.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then(|| key.to_owned())
}

/// Keys (of the TOML file and of Suprema's JSON) that hold device IDs.
const DEVICE_ID_KEYS: [&str; 4] = ["id", "sources", "targets", "device_id"];

/// Says a deserializer's type error in words an operator reads
/// (`expected u32` → `expected a whole number between 0 and 4294967295`;
/// a device ID is between 1 and 4294967295).
pub fn in_words(message: &str, key: Option<&str>) -> String {
    let device_id = key.is_some_and(|k| DEVICE_ID_KEYS.contains(&k));
    let whole = |lo: &str, hi: &str| format!("expected a whole number between {lo} and {hi}");
    let table: [(&str, String); 10] = [
        (
            "expected u32",
            if device_id {
                "expected a device ID, a whole number between 1 and 4294967295".to_owned()
            } else {
                whole("0", "4294967295")
            },
        ),
        (
            "expected u16",
            if key == Some("port") {
                "expected a port, a whole number between 1 and 65535".to_owned()
            } else {
                whole("0", "65535")
            },
        ),
        ("expected u64", whole("0", "18446744073709551615")),
        ("expected usize", whole("0", "18446744073709551615")),
        ("expected i32", whole("-2147483648", "2147483647")),
        (
            "expected i64",
            whole("-9223372036854775808", "9223372036854775807"),
        ),
        ("expected a boolean", "expected true or false".to_owned()),
        (
            "expected a sequence",
            "expected a list, e.g. [1, 2]".to_owned(),
        ),
        (
            "expected a string",
            "expected text in double quotes".to_owned(),
        ),
        (
            "expected a borrowed string",
            "expected text in double quotes".to_owned(),
        ),
    ];
    let mut out = message.to_owned();
    for (rust, words) in &table {
        if let Some(i) = out.find(rust) {
            let end = i + rust.len();
            // Only whole words: `expected u32` but not `expected u320`.
            if out[end..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_ascii_alphanumeric())
            {
                out.replace_range(i..end, words);
                break;
            }
        }
    }
    if let Some(k) = key
        && !out.starts_with(k)
    {
        out = format!("{k}: {out}");
    }
    out
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        reason: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.path.to_owned(),
            line: Some(self.line_of(span.start)),
            reason: reason.into(),
        })
    }

    fn secs(
        &self,
        value: Option<Spanned<u64>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 || *v.get_ref() > 86_400 => self.err(
                v.span(),
                format!("{key} must be between 1 and 86400 seconds"),
            ),
            Some(v) => Ok(Duration::from_secs(*v.get_ref())),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let gateway = self.gateway(raw.gateway)?;
        let state_dir = raw.state.into_inner().dir;
        if state_dir.get_ref().as_os_str().is_empty() {
            return self.err(state_dir.span(), "state.dir must not be empty");
        }
        if !state_dir.get_ref().is_absolute() {
            return self.err(state_dir.span(), "state.dir must be an absolute path");
        }

        let mut devices = BTreeMap::new();
        for d in raw.device {
            let d = d.into_inner();
            let id = *d.id.get_ref();
            if id == 0 {
                return self.err(d.id.span(), "device.id must not be 0");
            }
            if d.address.get_ref().trim().is_empty() {
                return self.err(
                    d.address.span(),
                    format!("device {id}: address must not be empty"),
                );
            }
            if let Err(reason) = check_device_host(d.address.get_ref()) {
                return self.err(
                    d.address.span(),
                    format!("device {id}: address {:?} {reason}", d.address.get_ref()),
                );
            }
            if *d.port.get_ref() == 0 {
                return self.err(d.port.span(), format!("device {id}: port must not be 0"));
            }
            let cfg = DeviceConfig {
                id,
                address: d.address.into_inner(),
                port: d.port.into_inner(),
                tls: d.tls,
            };
            if devices.insert(id, cfg).is_some() {
                return self.err(d.id.span(), format!("device {id} is declared twice"));
            }
        }

        let mut groups: Vec<GroupConfig> = Vec::new();
        let mut sources_seen: BTreeSet<u32> = BTreeSet::new();
        // Each target's group: a device is written by one group only.
        let mut targets_seen: BTreeMap<u32, String> = BTreeMap::new();
        for g in raw.group {
            let g = g.into_inner();
            let name = g.name.get_ref().trim().to_owned();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return self.err(
                    g.name.span(),
                    "group.name must be non-empty letters, digits, '-', '_' or '.'",
                );
            }
            if groups.iter().any(|o| o.name == name) {
                return self.err(g.name.span(), format!("group {name:?} is declared twice"));
            }
            for (list, key) in [(&g.sources, "sources"), (&g.targets, "targets")] {
                if list.get_ref().is_empty() {
                    return self.err(
                        list.span(),
                        format!("group {name:?}: {key} must not be empty"),
                    );
                }
                let mut seen = BTreeSet::new();
                for id in list.get_ref() {
                    if !devices.contains_key(id) {
                        return self.err(
                            list.span(),
                            format!("group {name:?}: {key} names device {id}, which no [[device]] declares"),
                        );
                    }
                    if !seen.insert(*id) {
                        return self.err(
                            list.span(),
                            format!("group {name:?}: device {id} is listed twice in {key}"),
                        );
                    }
                }
            }
            if let Some(both) = g
                .sources
                .get_ref()
                .iter()
                .find(|s| g.targets.get_ref().contains(s))
            {
                return self.err(
                    g.targets.span(),
                    format!("group {name:?}: device {both} is both a source and a target"),
                );
            }
            // A device written by one group must not drive another: its
            // write events would be taken for changes and could loop.
            if let Some(d) = g
                .sources
                .get_ref()
                .iter()
                .find(|d| targets_seen.contains_key(d))
            {
                return self.err(
                    g.sources.span(),
                    format!("group {name:?}: device {d} is a target of another group; chains of groups are not supported"),
                );
            }
            if let Some(d) = g
                .targets
                .get_ref()
                .iter()
                .find(|d| sources_seen.contains(d))
            {
                return self.err(
                    g.targets.span(),
                    format!("group {name:?}: device {d} is a source of another group; chains of groups are not supported"),
                );
            }
            // Prune and delete-all make a target hold exactly its group's
            // users: a second group's users there would be deleted by one
            // group and put back by the other, a tug of war on a door.
            if let Some((d, other)) = g
                .targets
                .get_ref()
                .iter()
                .find_map(|d| targets_seen.get(d).map(|o| (d, o)))
            {
                return self.err(
                    g.targets.span(),
                    format!(
                        "group {name:?}: device {d} is already a target of group {other:?}; a device can be \
                         the target of one group only, since prune and delete-all of one group would \
                         delete the other group's users from it (list every source in one group instead)"
                    ),
                );
            }
            sources_seen.extend(g.sources.get_ref());
            targets_seen.extend(g.targets.get_ref().iter().map(|t| (*t, name.clone())));
            groups.push(GroupConfig {
                name,
                sources: g.sources.into_inner(),
                targets: g.targets.into_inner(),
                prune: g.prune,
                propagate_delete_all: g.propagate_delete_all,
            });
        }

        let sync = self.sync(raw.sync)?;
        let ship_events = match raw.log.map(Spanned::into_inner).and_then(|l| l.events) {
            None => EventShipping::All,
            Some(v) => match v.get_ref().as_str() {
                "all" => EventShipping::All,
                "user" => EventShipping::UserEvents,
                "none" => EventShipping::None,
                other => {
                    return self.err(
                        v.span(),
                        format!("log.events must be \"all\", \"user\" or \"none\", not {other:?}"),
                    );
                }
            },
        };
        let metrics_listen = match raw.metrics.map(Spanned::into_inner) {
            None => None,
            Some(m) => match m.listen.get_ref().parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    return self.err(
                        m.listen.span(),
                        "metrics.listen must be an address like \"127.0.0.1:9187\"",
                    );
                }
            },
        };

        Ok(Config {
            path: self.path.to_owned(),
            gateway,
            state_dir: state_dir.into_inner(),
            devices,
            groups,
            sync,
            ship_events,
            metrics_listen,
        })
    }

    fn gateway(&self, raw: Spanned<RawGateway>) -> Result<GatewayConfig, ConfigError> {
        let span = raw.span();
        let g = raw.into_inner();
        let address = g.address.get_ref().clone();
        if let Err(reason) = check_host_port(&address) {
            return self.err(
                g.address.span(),
                format!("gateway.address {address:?}: {reason}"),
            );
        }
        let api = match &g.api {
            None => Api::default(),
            Some(a) => match a.get_ref().parse() {
                Ok(api) => api,
                Err(e) => return self.err(a.span(), format!("gateway.api: {e}")),
            },
        };
        let (ca_file, ca_pem) = match (&g.ca_file, g.tls) {
            (None, true) => {
                return self.err(
                    span,
                    "gateway.ca_file is required when gateway.tls is true (the default)",
                );
            }
            (Some(f), true) => {
                let path = f.get_ref();
                let path = if path.is_relative() {
                    self.path.parent().unwrap_or(Path::new(".")).join(path)
                } else {
                    path.clone()
                };
                match std::fs::read(&path) {
                    Ok(pem) => match check_ca(&pem) {
                        Ok(()) => (Some(path), Some(pem)),
                        Err(reason) => {
                            return self.err(
                                f.span(),
                                format!("gateway.ca_file {}: {reason}", path.display()),
                            );
                        }
                    },
                    Err(e) => {
                        return self.err(
                            f.span(),
                            format!("gateway.ca_file {}: cannot read: {e}", path.display()),
                        );
                    }
                }
            }
            (f, false) => (f.as_ref().map(|f| f.get_ref().clone()), None),
        };
        let server_name = g.server_name.filter(|s| !s.get_ref().trim().is_empty());
        if let Some(name) = &server_name
            && rustls::pki_types::ServerName::try_from(name.get_ref().as_str()).is_err()
        {
            return self.err(
                name.span(),
                format!(
                    "gateway.server_name {:?} is not a DNS name or IP address",
                    name.get_ref()
                ),
            );
        }
        Ok(GatewayConfig {
            address,
            ca_file,
            ca_pem,
            server_name: server_name.map(Spanned::into_inner),
            api,
            keepalive_interval: self.secs(
                g.keepalive_interval_secs,
                "gateway.keepalive_interval_secs",
                DEFAULT_KEEPALIVE_INTERVAL,
            )?,
            keepalive_timeout: self.secs(
                g.keepalive_timeout_secs,
                "gateway.keepalive_timeout_secs",
                DEFAULT_KEEPALIVE_TIMEOUT,
            )?,
            connect_timeout: self.secs(
                g.connect_timeout_secs,
                "gateway.connect_timeout_secs",
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            call_timeout: self.secs(
                g.call_timeout_secs,
                "gateway.call_timeout_secs",
                DEFAULT_CALL_TIMEOUT,
            )?,
        })
    }

    fn sync(&self, raw: Option<Spanned<RawSync>>) -> Result<SyncConfig, ConfigError> {
        let mut s = SyncConfig::default();
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Ok(s);
        };
        if let Some(v) = raw.batch_users {
            if !(1..=10_000).contains(v.get_ref()) {
                return self.err(v.span(), "sync.batch_users must be between 1 and 10000");
            }
            s.batch_users = v.into_inner();
        }
        if let Some(v) = raw.batch_bytes {
            if !(64 * 1024..=32 * 1024 * 1024).contains(v.get_ref()) {
                return self.err(
                    v.span(),
                    "sync.batch_bytes must be between 65536 and 33554432",
                );
            }
            s.batch_bytes = v.into_inner();
        }
        s.poll_interval = self.secs(
            raw.poll_interval_secs,
            "sync.poll_interval_secs",
            s.poll_interval,
        )?;
        if let Some(v) = raw.tail_check_delay_ms {
            if !(10..=600_000).contains(v.get_ref()) {
                return self.err(
                    v.span(),
                    "sync.tail_check_delay_ms must be between 10 and 600000",
                );
            }
            s.tail_check_delay = Duration::from_millis(v.into_inner());
        }
        s.idle_check_interval = self.secs(
            raw.idle_check_interval_secs,
            "sync.idle_check_interval_secs",
            s.idle_check_interval,
        )?;
        if let Some(v) = raw.device_concurrency {
            if !(1..=1024).contains(v.get_ref()) {
                return self.err(
                    v.span(),
                    "sync.device_concurrency must be between 1 and 1024",
                );
            }
            s.device_concurrency = v.into_inner();
        }
        if let Some(v) = raw.realtime_queue {
            if !(1..=1_000_000).contains(v.get_ref()) {
                return self.err(
                    v.span(),
                    "sync.realtime_queue must be between 1 and 1000000",
                );
            }
            s.realtime_queue = v.into_inner();
        }
        if let Some(v) = raw.quarantine_after {
            if !(1..=1000).contains(v.get_ref()) {
                return self.err(v.span(), "sync.quarantine_after must be between 1 and 1000");
            }
            s.quarantine_after = v.into_inner();
        }
        Ok(s)
    }
}

/// Checks a device address: a host name or an IP address, without a port
/// (the port has its own key) and without brackets.
pub fn check_device_host(address: &str) -> Result<(), String> {
    if address.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if address.chars().any(char::is_whitespace) {
        return Err("contains spaces; write the device's IP address or host name".into());
    }
    if address.contains("://") {
        return Err("is a URL; write only the device's IP address or host name".into());
    }
    if let Some(inner) = address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        return Err(format!(
            "has brackets; write the IPv6 address without them: {inner:?}"
        ));
    }
    if let Some((host, port)) = address.rsplit_once(':')
        && !host.is_empty()
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        return Err(format!(
            "has a port in it; write address = \"{host}\" and port = {port}"
        ));
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if !address.chars().all(name_char) || address.starts_with(['.', '-']) || address.ends_with('-')
    {
        return Err("is not a host name or IP address".into());
    }
    Ok(())
}

/// Checks a gateway address: `host:port` with a DNS name or IPv4 address,
/// or `[v6]:port`; no scheme, no spaces, a port in 1..=65535.
pub fn check_host_port(address: &str) -> Result<(), String> {
    const FORM: &str = "write host:port, e.g. \"192.168.0.2:4000\" or \"[fd00::2]:4000\"";
    if address.is_empty() {
        return Err(format!("is empty; {FORM}"));
    }
    if address.chars().any(char::is_whitespace) {
        return Err(format!("contains spaces; {FORM}"));
    }
    if address.contains("://") {
        return Err(format!("is host:port, not a URL (no scheme); {FORM}"));
    }
    let port = if let Some(rest) = address.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("has no ']' after the IPv6 address; {FORM}"))?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{ip:?} is not an IPv6 address"));
        }
        after
            .strip_prefix(':')
            .ok_or_else(|| format!("has no port after the IPv6 address; {FORM}"))?
    } else {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("has no port; {FORM}"))?;
        if host.contains(':') {
            return Err(format!(
                "an IPv6 address goes in brackets: [ADDRESS]:PORT; {FORM}"
            ));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
        if host.is_empty() {
            return Err(format!("has no host; {FORM}"));
        }
        if !host.chars().all(name_char) || host.starts_with(['.', '-']) || host.ends_with('-') {
            return Err(format!("{host:?} is not a host name or IPv4 address"));
        }
        port
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(()),
        _ => Err(format!("port {port} is out of range (1 to 65535)")),
    }
}

/// Checks a CA file the way the TLS client reads it, but strictly: every
/// PEM certificate block decodes and is a certificate a trust store
/// accepts (the client skips unparsable ones silently and would then trust
/// nothing).
pub fn check_ca(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let n = i + 1;
        let cert = cert.map_err(|e| format!("certificate {n}: not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("certificate {n}: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(())
}

// ---- what a valid file must also allow: the daemon can start ---------------

/// Why a valid file still cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Unrunnable {
    /// Restarting does not fix it (exit 78, EX_CONFIG).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory failed in a way that may pass (a full disk, an
    /// I/O error): exit 1, and the service manager retries.
    #[error("state.dir {}: {what}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Builds what `usersync run` builds from the file before it touches
/// anything — the gateway endpoint and TLS client configuration — and
/// checks that the state directory exists and takes a new file, or can be
/// created. `check-config` and `run` both call it, so a file `check-config`
/// accepts does not fail at start.
pub fn check_runnable(config: &Config) -> Result<(), Unrunnable> {
    let invalid = |reason: String| ConfigError {
        file: config.path.clone(),
        line: None,
        reason,
    };
    // The client spawns its connection worker, which needs a runtime
    // context; it never dials here (the channel is lazy).
    let build = || crate::gateway::GatewayClient::new(&config.gateway.settings()).map(drop);
    let built = match tokio::runtime::Handle::try_current() {
        Ok(_) => build(),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| invalid(format!("cannot start a runtime: {e}")))?;
            let _entered = rt.enter();
            build()
        }
    };
    built.map_err(|e| invalid(format!("gateway: {e}")))?;
    check_state_dir(&config.state_dir).map_err(|(what, source)| {
        use std::io::ErrorKind::*;
        // What a restart cannot fix: the wrong place, the wrong owner, a
        // sandbox that makes it read-only.
        if matches!(
            source.kind(),
            PermissionDenied | ReadOnlyFilesystem | NotADirectory | NotFound | IsADirectory
        ) {
            Unrunnable::Config(invalid(format!(
                "state.dir {}: {what}: {source} (the systemd unit makes only {UNIT_STATE_DIR} writable: use it, \
                 or add ReadWritePaths= with `systemctl edit usersync`)",
                config.state_dir.display()
            )))
        } else {
            Unrunnable::StateDir {
                path: config.state_dir.clone(),
                what,
                source,
            }
        }
    })
}

/// The state directory the systemd unit provides (`StateDirectory=`).
pub const UNIT_STATE_DIR: &str = "/var/lib/usersync";

/// An existing directory must take a new file (created and removed); a
/// missing one must be creatable in its nearest existing ancestor, which
/// is checked with access(2) rather than by creating anything.
fn check_state_dir(dir: &Path) -> Result<(), (&'static str, std::io::Error)> {
    use std::io::{Error, ErrorKind};
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(("cannot be used", Error::from(ErrorKind::NotADirectory))),
        Ok(_) => {
            let probe = dir.join(format!(".usersync-probe-{}", std::process::id()));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .map_err(|e| ("cannot create a file in it", e))?;
            std::fs::remove_file(&probe).map_err(|e| ("cannot remove a file from it", e))
        }
        // A symbolic link to nowhere (a state directory removed under its
        // link) cannot be created through: mkdir finds the link.
        Err(e) if e.kind() == ErrorKind::NotFound && std::fs::symlink_metadata(dir).is_ok() => {
            Err(("is a symbolic link to a directory that does not exist", e))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let missing = |a: &Path| matches!(std::fs::symlink_metadata(a), Err(e) if e.kind() == ErrorKind::NotFound);
            let ancestor = dir
                .ancestors()
                .skip(1)
                .find(|a| !missing(a))
                .unwrap_or(Path::new("/"));
            match std::fs::metadata(ancestor) {
                Ok(m) if m.is_dir() => rustix::fs::access(
                    ancestor,
                    rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
                )
                .map_err(|e| ("cannot be created", Error::from(e))),
                Ok(_) => Err(("cannot be created", Error::from(ErrorKind::NotADirectory))),
                Err(e) => Err(("cannot be created", e)),
            }
        }
        Err(e) => Err(("cannot be read", e)),
    }
}

/// Settings that work but expose something; logged as warnings when the
/// daemon starts and printed by `check-config`.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.gateway.ca_pem.is_none() {
        w.push(format!(
            "gateway.tls = false: users (cards, fingerprint and face templates, PINs) travel to the gateway \
             at {} in plaintext; real gateways serve TLS only",
            config.gateway.address
        ));
    }
    if let Some(addr) = config.metrics_listen
        && !addr.ip().is_loopback()
    {
        w.push(format!(
            "metrics.listen = \"{addr}\" is not a loopback address: metrics (device IDs, group names, \
             counts) are served to the network without authentication"
        ));
    }
    w
}

/// Files the daemon reads that the systemd unit's user could not: the unit
/// runs as a dynamic user (not root, in no group of the file), so it reads
/// only what others may read, through directories others may enter, while
/// `sudo usersync check-config` runs as root and reads everything.
pub fn unreadable_by_service(config: &Config) -> Vec<String> {
    let mut files = vec![("the configuration", config.path.clone())];
    if config.gateway.ca_pem.is_some()
        && let Some(ca) = &config.gateway.ca_file
    {
        files.push(("gateway.ca_file", ca.clone()));
    }
    let mut out = Vec::new();
    for (what, path) in files {
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        if let Some(why) = not_world_readable(&path) {
            out.push(format!(
                "{what} {} is not readable by the service's user ({why}); the systemd unit runs as a \
                 dynamic user, not root and in no group, and would exit 78 at start",
                path.display()
            ));
        }
    }
    out
}

/// Why others cannot read `path`: a directory on the way they cannot enter,
/// or the file's mode.
fn not_world_readable(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode());
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        if d.as_os_str().is_empty() {
            continue;
        }
        if let Some(m) = mode(d)
            && m & 0o001 == 0
        {
            return Some(format!(
                "directory {} has mode {:o}: `sudo chmod o+x {}`",
                d.display(),
                m & 0o7777,
                d.display()
            ));
        }
    }
    match mode(path) {
        Some(m) if m & 0o004 == 0 => Some(format!(
            "mode {:o}: `sudo chmod o+r {}`",
            m & 0o7777,
            path.display()
        )),
        _ => None,
    }
}

/// `check-config` runs outside the unit's sandbox, where any directory
/// may be writable; under the unit only [`UNIT_STATE_DIR`] is.
pub fn sandbox_note(config: &Config) -> Option<String> {
    (config.state_dir != Path::new(UNIT_STATE_DIR)).then(|| {
        format!(
            "state.dir is {}; the systemd unit makes only {UNIT_STATE_DIR} writable (ProtectSystem=strict): \
             add ReadWritePaths={} with `systemctl edit usersync`, or the daemon will exit 78 at start",
            config.state_dir.display(),
            config.state_dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
address = "127.0.0.1:4000"
tls = false

[state]
dir = "/var/lib/usersync"

[[device]]
id = 1
address = "192.0.2.1"

[[device]]
id = 2
address = "192.0.2.2"
port = 51212
tls = true

[[group]]
name = "main"
sources = [1]
targets = [2]
"#;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/usersync/usersync.toml"), text)
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.gateway.api, Api::V1_8);
        assert_eq!(c.devices[&1].port, 51211);
        assert!(!c.devices[&1].tls);
        assert!(c.devices[&2].tls);
        assert!(!c.groups[0].prune);
        assert!(!c.groups[0].propagate_delete_all);
        assert_eq!(c.sync, SyncConfig::default());
        assert!(c.is_source(1) && !c.is_source(2));
        assert!(c.gateway.settings().tls.is_none());
    }

    fn expect_err(text: &str, line: Option<usize>, needle: &str) {
        let e = parse_str(text).unwrap_err();
        assert_eq!(e.line, line, "{e}");
        assert!(e.reason.contains(needle), "{e}");
        assert!(e.to_string().starts_with("/etc/usersync/usersync.toml"));
    }

    #[test]
    fn errors_name_line_and_reason() {
        expect_err(
            &GOOD.replace("tls = false", "tls = false\ncolour = 1"),
            Some(5),
            "colour",
        );
        expect_err(
            &GOOD.replace("id = 2", "id = 1"),
            Some(14),
            "declared twice",
        );
        expect_err(
            &GOOD.replace("targets = [2]", "targets = [3]"),
            Some(22),
            "no [[device]] declares",
        );
        expect_err(
            &GOOD.replace("targets = [2]", "targets = [2, 1]"),
            Some(22),
            "both a source and a target",
        );
        expect_err(
            &GOOD.replace("targets = [2]", "targets = []"),
            Some(22),
            "must not be empty",
        );
        expect_err(
            &GOOD.replace("tls = false\n", ""),
            Some(2),
            "ca_file is required",
        );
        expect_err(
            &GOOD.replace("127.0.0.1:4000", "localhost"),
            Some(3),
            "host:port",
        );
        expect_err(
            &GOOD.replace("tls = false", "tls = false\napi = \"1.8\""),
            Some(5),
            "unknown api",
        );
        expect_err(
            &GOOD.replace("/var/lib/usersync", "relative"),
            Some(7),
            "absolute",
        );
        expect_err(&GOOD.replace("id = 1\n", "id = \"one\"\n"), Some(10), "");
    }

    #[test]
    fn unreadable_ca_file_is_an_error() {
        let text = GOOD.replace("tls = false", "ca_file = \"/nonexistent/ca.crt\"");
        let e = parse_str(&text).unwrap_err();
        assert!(e.reason.contains("cannot read"), "{e}");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn gateway_addresses_are_host_and_port() {
        for good in [
            "127.0.0.1:4000",
            "gw.example:4000",
            "gateway:1",
            "[::1]:4000",
            "[fd00::2]:65535",
            "site_gw-2.local:4000",
        ] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("::1", "brackets"),
            ("::1:4000", "brackets"),
            ("http://h:1", "not a URL"),
            ("https://gw.example:4000", "not a URL"),
            ("h :1", "spaces"),
            (" gw:4000", "spaces"),
            (":4000", "no host"),
            ("", "empty"),
            ("gw", "no port"),
            ("gw:", "not a number"),
            ("gw:0", "out of range"),
            ("gw:65536", "out of range"),
            ("gw:99999999999", "out of range"),
            ("gw:40a", "not a number"),
            ("[::1]", "no port"),
            ("[::1:4000", "no ']'"),
            ("[gw]:4000", "not an IPv6 address"),
            ("g/w:4000", "not a host name"),
            ("-gw:4000", "not a host name"),
        ] {
            let e = check_host_port(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        // Named with key and line in the file.
        expect_err(
            &GOOD.replace("127.0.0.1:4000", "::1"),
            Some(3),
            "gateway.address \"::1\": an IPv6 address goes in brackets",
        );
        expect_err(
            &GOOD.replace("127.0.0.1:4000", "http://gw:4000"),
            Some(3),
            "not a URL",
        );
    }

    #[test]
    fn a_ca_file_must_hold_certificates_the_client_can_use() {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::sim::tls::generate(&["localhost"]).unwrap();
        certs.write_ca(dir.path()).unwrap();
        let good = std::fs::read(dir.path().join("ca.crt")).unwrap();
        assert_eq!(check_ca(&good), Ok(()));
        let garbage_b64 =
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
        assert!(check_ca(garbage_b64).unwrap_err().contains("not valid PEM"));
        let garbage_der =
            b"-----BEGIN CERTIFICATE-----\nSGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        assert!(
            check_ca(garbage_der)
                .unwrap_err()
                .contains("not a usable CA certificate")
        );
        assert!(
            check_ca(b"hello")
                .unwrap_err()
                .contains("no PEM certificate")
        );
        // In a file: named with key, path and line.
        let path = dir.path().join("bad.crt");
        std::fs::write(&path, garbage_der).unwrap();
        let text = GOOD.replace("tls = false", &format!("ca_file = \"{}\"", path.display()));
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(
            e.reason.contains(&format!(
                "gateway.ca_file {}: certificate 1",
                path.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_server_name_must_be_a_name() {
        expect_err(
            &GOOD.replace("tls = false", "tls = false\nserver_name = \"not a name\""),
            Some(5),
            "gateway.server_name",
        );
    }

    #[test]
    fn a_target_of_two_groups_is_rejected() {
        let text = format!(
            "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [3]\ntargets = [2]\n"
        );
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(30), "{e}");
        for needle in [
            "group \"two\": device 2 is already a target of group \"main\"",
            "prune and delete-all",
        ] {
            assert!(e.reason.contains(needle), "{e}");
        }
        // Two groups may share a source: reading it twice harms nobody.
        let text = format!(
            "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [1]\ntargets = [3]\n"
        );
        parse_str(&text).unwrap();
    }

    #[test]
    fn a_source_of_a_later_group_that_targets_it_is_a_chain() {
        // The target comes first, then a group makes it a source…
        let text = format!(
            "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [2]\ntargets = [3]\n"
        );
        assert!(parse_str(&text).unwrap_err().reason.contains("chains"));
        // …or the source comes first, then a group targets it.
        let text = format!(
            "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [3]\ntargets = [1]\n"
        );
        let e = parse_str(&text).unwrap_err();
        assert!(
            e.reason.contains("device 1 is a source of another group"),
            "{e}"
        );
    }

    #[test]
    fn plaintext_and_exposed_metrics_are_warned_about() {
        let c = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9187\"\n")).unwrap();
        let w = warnings(&c);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("tls = false") && w[0].contains("plaintext"),
            "{w:?}"
        );
        assert!(
            w[1].contains("0.0.0.0:9187") && w[1].contains("not a loopback"),
            "{w:?}"
        );
        let c = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"[::1]:9187\"\n")).unwrap();
        assert_eq!(warnings(&c).len(), 1);
    }

    #[test]
    fn the_state_dir_must_take_a_file_or_be_creatable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_state_dir(dir.path()).is_ok());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe removed"
        );
        assert!(check_state_dir(&dir.path().join("new/deeper")).is_ok());
        assert!(!dir.path().join("new").exists(), "nothing created");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        for bad in [file.clone(), file.join("state")] {
            let (what, e) = check_state_dir(&bad).unwrap_err();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::NotADirectory,
                "{bad:?}: {what}: {e}"
            );
        }
        let dangling = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
        let (what, _) = check_state_dir(&dangling).unwrap_err();
        assert!(what.contains("symbolic link"), "{what}");
        let mut c = parse_str(GOOD).unwrap();
        c.state_dir = file.join("state");
        let e = check_runnable(&c).unwrap_err();
        assert!(matches!(e, Unrunnable::Config(_)), "{e}");
        assert!(e.to_string().contains("state.dir"), "{e}");
        c.state_dir = dir.path().join("state");
        check_runnable(&c).unwrap();
    }

    #[test]
    fn a_device_address_has_no_port() {
        let text = GOOD.replace("address = \"192.0.2.1\"", "address = \"192.0.2.1:51211\"");
        let e = parse_str(&text).unwrap_err();
        assert!(
            e.reason
                .contains("has a port in it; write address = \"192.0.2.1\" and port = 51211"),
            "{e}"
        );
        for ok in ["192.0.2.1", "fd00::1", "reader-1.site.local"] {
            assert!(check_device_host(ok).is_ok(), "{ok}");
        }
        for bad in ["[fd00::1]", "reader 1", "http://x", "x:1"] {
            assert!(check_device_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn type_errors_are_said_in_words() {
        let text = GOOD.replace("id = 1", "id = \"one\"");
        let e = parse_str(&text).unwrap_err();
        assert!(
            e.reason
                .contains("id: invalid type: string \"one\", expected a device ID, a whole number between 1 and 4294967295"),
            "{e}"
        );
        assert!(!e.reason.contains("u32"), "{e}");
        assert_eq!(
            in_words("invalid value: integer `-1`, expected u16", Some("port")),
            "port: invalid value: integer `-1`, expected a port, a whole number between 1 and 65535"
        );
    }

    #[test]
    fn reload_summaries_read_as_words() {
        let d = ConfigDiff {
            added_devices: vec![5, 6],
            changed_groups: vec!["main".into()],
            ..Default::default()
        };
        assert_eq!(d.to_string(), "devices added: 5 6; groups changed: main");
        assert_eq!(
            ConfigDiff::default().to_string(),
            "no device or group changed"
        );
    }

    #[test]
    fn files_the_service_cannot_read_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.path().join("usersync.toml");
        std::fs::write(&f, GOOD).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(&f, GOOD).unwrap();
        let w = unreadable_by_service(&c);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("chmod o+r"), "{w:?}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(unreadable_by_service(&c).is_empty());
    }

    #[test]
    fn chains_of_groups_are_rejected() {
        let text = format!(
            "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [2]\ntargets = [3]\n"
        );
        let e = parse_str(&text).unwrap_err();
        assert!(e.reason.contains("chains"), "{e}");
    }
}

/// What a reload changes (applied without a restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    pub added_devices: Vec<u32>,
    pub removed_devices: Vec<u32>,
    /// Address, port or TLS changed: re-registered with the gateway.
    pub changed_devices: Vec<u32>,
    pub added_groups: Vec<String>,
    pub removed_groups: Vec<String>,
    /// Sources, targets or policies changed: the applier restarts.
    pub changed_groups: Vec<String>,
    /// Settings that only take effect at the next start.
    pub needs_restart: Vec<&'static str>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        *self == ConfigDiff::default()
    }
}

impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(v: &[T]) -> String {
            v.iter().map(T::to_string).collect::<Vec<_>>().join(" ")
        }
        let mut parts = Vec::new();
        for (what, devices) in [
            ("devices added", &self.added_devices),
            ("devices removed", &self.removed_devices),
            ("devices changed", &self.changed_devices),
        ] {
            if !devices.is_empty() {
                parts.push(format!("{what}: {}", list(devices)));
            }
        }
        for (what, groups) in [
            ("groups added", &self.added_groups),
            ("groups removed", &self.removed_groups),
            ("groups changed", &self.changed_groups),
        ] {
            if !groups.is_empty() {
                parts.push(format!("{what}: {}", list(groups)));
            }
        }
        if parts.is_empty() {
            parts.push("no device or group changed".to_owned());
        }
        write!(f, "{}", parts.join("; "))?;
        if !self.needs_restart.is_empty() {
            write!(f, "; needs a restart: {}", self.needs_restart.join(", "))?;
        }
        Ok(())
    }
}

/// Compares two configurations.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    for (id, dev) in &new.devices {
        match old.devices.get(id) {
            None => d.added_devices.push(*id),
            Some(o) if o != dev => d.changed_devices.push(*id),
            Some(_) => {}
        }
    }
    d.removed_devices = old
        .devices
        .keys()
        .filter(|id| !new.devices.contains_key(id))
        .copied()
        .collect();
    for g in &new.groups {
        match old.group(&g.name) {
            None => d.added_groups.push(g.name.clone()),
            Some(o) if o != g => d.changed_groups.push(g.name.clone()),
            Some(_) => {}
        }
    }
    d.removed_groups = old
        .groups
        .iter()
        .filter(|g| new.group(&g.name).is_none())
        .map(|g| g.name.clone())
        .collect();
    // Batch sizes and the poll interval are read by appliers at start.
    if old.sync != new.sync {
        for g in &new.groups {
            if !d.changed_groups.contains(&g.name) && !d.added_groups.contains(&g.name) {
                d.changed_groups.push(g.name.clone());
            }
        }
    }
    if old.gateway != new.gateway {
        d.needs_restart.push("[gateway]");
    }
    if old.state_dir != new.state_dir {
        d.needs_restart.push("[state] dir");
    }
    if old.metrics_listen != new.metrics_listen {
        d.needs_restart.push("[metrics] listen");
    }
    d
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    fn cfg(devices: &str, groups: &str) -> Config {
        parse(
            Path::new("/t.toml"),
            &format!("[gateway]\naddress = \"h:1\"\ntls = false\n[state]\ndir = \"/s\"\n{devices}\n{groups}"),
        )
        .unwrap()
    }

    const D12: &str = "[[device]]\nid = 1\naddress = \"a\"\n[[device]]\nid = 2\naddress = \"b\"\n";

    #[test]
    fn diff_of_devices_and_groups() {
        let old = cfg(
            D12,
            "[[group]]\nname = \"g\"\nsources = [1]\ntargets = [2]\n",
        );
        assert!(diff(&old, &old).is_empty());
        let new = cfg(
            "[[device]]\nid = 1\naddress = \"a2\"\n[[device]]\nid = 3\naddress = \"c\"\n",
            "[[group]]\nname = \"h\"\nsources = [1]\ntargets = [3]\n",
        );
        let d = diff(&old, &new);
        assert_eq!(d.added_devices, vec![3]);
        assert_eq!(d.removed_devices, vec![2]);
        assert_eq!(d.changed_devices, vec![1]);
        assert_eq!(d.added_groups, vec!["h"]);
        assert_eq!(d.removed_groups, vec!["g"]);
        assert!(d.changed_groups.is_empty());
        assert!(d.needs_restart.is_empty());

        let pruned = cfg(
            D12,
            "[[group]]\nname = \"g\"\nsources = [1]\ntargets = [2]\nprune = true\n",
        );
        assert_eq!(diff(&old, &pruned).changed_groups, vec!["g"]);
        let mut moved = old.clone();
        moved.gateway.address = "other:2".into();
        assert_eq!(diff(&old, &moved).needs_restart, vec!["[gateway]"]);
    }
}
