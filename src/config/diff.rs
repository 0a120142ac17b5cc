//! What a reload changes, computed once ([`diff`]) and routed by the
//! supervisor to whoever owns each part: device tasks and groups' appliers
//! to the task tree, registrations to the gateway session.

use super::Config;

/// One difference between the running configuration and a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    AddDevice(u32),
    RemoveDevice(u32),
    /// Address, port or TLS changed: re-registered with the gateway.
    ChangeDevice(u32),
    AddGroup(String),
    RemoveGroup(String),
    /// Sources, targets, policies or `[sync]` settings changed: the
    /// group's applier restarts with them.
    ChangeGroup(String),
    /// A setting that only takes effect at the next start.
    NeedsRestart(&'static str),
    /// A setting read where it is used, from the new configuration at once
    /// (`[log] events`: the event consumer's).
    Setting(&'static str),
}

impl Change {
    /// Whether the gateway session must act on it (register or forget a
    /// device).
    pub fn concerns_gateway(&self) -> bool {
        matches!(
            self,
            Change::AddDevice(_) | Change::RemoveDevice(_) | Change::ChangeDevice(_)
        )
    }
}

/// Compares two configurations: devices first, then groups, then settings
/// that need a restart, each in a stable order.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut out = Vec::new();
    for (id, dev) in &new.devices {
        match old.devices.get(id) {
            None => out.push(Change::AddDevice(*id)),
            Some(o) if o != dev => out.push(Change::ChangeDevice(*id)),
            Some(_) => {}
        }
    }
    out.extend(
        old.devices
            .keys()
            .filter(|id| !new.devices.contains_key(id))
            .map(|id| Change::RemoveDevice(*id)),
    );
    // Batch sizes and the poll interval are read by appliers at start.
    let sync_changed = old.sync != new.sync;
    for g in &new.groups {
        match old.group(&g.name) {
            None => out.push(Change::AddGroup(g.name.clone())),
            Some(o) if o != g || sync_changed => out.push(Change::ChangeGroup(g.name.clone())),
            Some(_) => {}
        }
    }
    out.extend(
        old.groups
            .iter()
            .filter(|g| new.group(&g.name).is_none())
            .map(|g| Change::RemoveGroup(g.name.clone())),
    );
    if old.gateway != new.gateway {
        out.push(Change::NeedsRestart("[gateway]"));
    }
    if old.state_dir != new.state_dir {
        out.push(Change::NeedsRestart("[state] dir"));
    }
    if old.metrics_listen != new.metrics_listen {
        out.push(Change::NeedsRestart("[metrics] listen"));
    }
    if old.ship_events != new.ship_events {
        out.push(Change::Setting("[log] events"));
    }
    out
}

/// One line for the log and `RELOADING`'s status: what changed, by kind.
pub fn summary(changes: &[Change]) -> String {
    struct Kind {
        what: &'static str,
        items: Vec<String>,
    }
    let mut kinds: Vec<Kind> = [
        "devices added",
        "devices removed",
        "devices changed",
        "groups added",
        "groups removed",
        "groups changed",
    ]
    .into_iter()
    .map(|what| Kind {
        what,
        items: Vec::new(),
    })
    .collect();
    let (mut restart, mut settings) = (Vec::new(), Vec::new());
    for c in changes {
        let (i, item) = match c {
            Change::AddDevice(id) => (0, id.to_string()),
            Change::RemoveDevice(id) => (1, id.to_string()),
            Change::ChangeDevice(id) => (2, id.to_string()),
            Change::AddGroup(g) => (3, g.clone()),
            Change::RemoveGroup(g) => (4, g.clone()),
            Change::ChangeGroup(g) => (5, g.clone()),
            Change::NeedsRestart(s) => {
                restart.push(*s);
                continue;
            }
            Change::Setting(s) => {
                settings.push(*s);
                continue;
            }
        };
        kinds[i].items.push(item);
    }
    let mut parts: Vec<String> = kinds
        .iter()
        .filter(|k| !k.items.is_empty())
        .map(|k| format!("{}: {}", k.what, k.items.join(" ")))
        .collect();
    if parts.is_empty() {
        parts.push("no device or group changed".to_owned());
    }
    if !settings.is_empty() {
        parts.push(format!("applied: {}", settings.join(", ")));
    }
    let mut out = parts.join("; ");
    if !restart.is_empty() {
        out.push_str(&format!("; needs a restart: {}", restart.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse;

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
        assert_eq!(summary(&[]), "no device or group changed");
        let new = cfg(
            "[[device]]\nid = 1\naddress = \"a2\"\n[[device]]\nid = 3\naddress = \"c\"\n",
            "[[group]]\nname = \"h\"\nsources = [1]\ntargets = [3]\n",
        );
        let d = diff(&old, &new);
        assert_eq!(
            d,
            vec![
                Change::ChangeDevice(1),
                Change::AddDevice(3),
                Change::RemoveDevice(2),
                Change::AddGroup("h".into()),
                Change::RemoveGroup("g".into()),
            ]
        );
        assert_eq!(
            summary(&d),
            "devices added: 3; devices removed: 2; devices changed: 1; groups added: h; groups removed: g"
        );
        assert_eq!(d.iter().filter(|c| c.concerns_gateway()).count(), 3);

        let pruned = cfg(
            D12,
            "[[group]]\nname = \"g\"\nsources = [1]\ntargets = [2]\nprune = true\n",
        );
        assert_eq!(diff(&old, &pruned), vec![Change::ChangeGroup("g".into())]);
        let mut moved = old.clone();
        moved.gateway.address = "other:2".into();
        assert_eq!(diff(&old, &moved), vec![Change::NeedsRestart("[gateway]")]);
        // Event shipping is the consumer's, taken at once.
        let mut quiet = old.clone();
        quiet.ship_events = crate::config::EventShipping::UserEvents;
        let changes = diff(&old, &quiet);
        assert_eq!(changes, vec![Change::Setting("[log] events")]);
        assert!(!changes[0].concerns_gateway());
        assert_eq!(
            summary(&changes),
            "no device or group changed; applied: [log] events"
        );
        assert_eq!(
            summary(&diff(&old, &moved)),
            "no device or group changed; needs a restart: [gateway]"
        );
    }

    #[test]
    fn sync_settings_restart_every_group() {
        let old = cfg(
            &format!(
                "{D12}[[device]]\nid = 3\naddress = \"c\"\n[[device]]\nid = 4\naddress = \"d\"\n"
            ),
            "[[group]]\nname = \"g\"\nsources = [1]\ntargets = [2]\n[[group]]\nname = \"h\"\nsources = [3]\ntargets = [4]\n",
        );
        let mut new = old.clone();
        new.sync.batch_users += 1;
        assert_eq!(
            diff(&old, &new),
            vec![
                Change::ChangeGroup("g".into()),
                Change::ChangeGroup("h".into())
            ]
        );
    }
}
