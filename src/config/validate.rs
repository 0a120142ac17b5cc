//! From the raw file to a typed [`Config`]: every value checked, every
//! error with the file, the line and the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawConfig, RawGateway, RawSync, in_words, key_at};
use super::*;
use crate::gateway::{
    DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
};
use crate::wire::Api;

/// Parses and validates `text` (the contents of `path`).
pub(super) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
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

/// A one-way group's lists, once both are known to be there.
struct OneWay {
    sources: Spanned<Vec<u32>>,
    targets: Spanned<Vec<u32>>,
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
        // Each multi-master member's group.
        let mut members_seen: BTreeMap<u32, String> = BTreeMap::new();
        for g in raw.group {
            let group_span = g.span();
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
            let shape =
                super::multi::shape(&name, &g).or_else(|(span, why)| self.err(span, why))?;
            if shape == super::multi::Shape::MultiMaster {
                let group = super::multi::multi_master(
                    name,
                    group_span,
                    g,
                    &devices,
                    &sources_seen,
                    &targets_seen,
                    &members_seen,
                )
                .or_else(|(span, why)| self.err(span, why))?;
                members_seen.extend(group.members().iter().map(|m| (*m, group.name.clone())));
                groups.push(group);
                continue;
            }
            let (Some(sources), Some(targets)) = (g.sources, g.targets) else {
                return self.err(
                    group_span,
                    format!("group {name:?} needs sources and targets (or mode = \"multi-master\" and members)"),
                );
            };
            let (prune, propagate_delete_all) = (
                g.prune,
                g.propagate_delete_all.is_some_and(Spanned::into_inner),
            );
            let g = OneWay { sources, targets };
            // A member of a multi-master group is written by that group
            // and its events are its own changes there.
            for (list, key) in [(&g.sources, "sources"), (&g.targets, "targets")] {
                if let Some((d, other)) = list
                    .get_ref()
                    .iter()
                    .find_map(|d| members_seen.get(d).map(|o| (d, o)))
                {
                    return self.err(
                        list.span(),
                        format!("group {name:?}: {key} names device {d}, a member of multi-master group {other:?}; a member belongs to that group only"),
                    );
                }
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
                prune,
                propagate_delete_all,
                mode: GroupMode::OneWay,
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
