//! Writes the CLI makes at a target: the daemon copies from sources to
//! targets only, so such a write is drift. The operator is warned before
//! it, and after it the write is counted for `usersync status`.

use crate::config::Config;
use crate::store::{self, Store};

/// A warning for a write the CLI makes at a target: the daemon copies
/// changes from sources to targets only, so a change made at a target is
/// drift that the next reconcile of it judges.
pub fn target_warning(config: &Config, device: u32, what: TargetWrite) -> Option<String> {
    let g = config.groups.iter().find(|g| g.targets.contains(&device))?;
    let fix = format!("usersync reconcile --group {} --target {device}", g.name);
    let effect = match what {
        TargetWrite::Enroll => format!(
            "the user is on this device only (no source has it): it stays as an extra user, and `{fix} --prune` \
             deletes it"
        ),
        TargetWrite::AddCard => format!(
            "the card is added on this device only: if a source of the group has the user, the change is \
             undone by the next change of the user at a source or the next reconcile of the device (`{fix}`), \
             which write the source's record over it (add the card at a source to keep it); if no source has \
             the user, it stays as an extra user, and `{fix} --prune` deletes it"
        ),
        TargetWrite::Delete => format!(
            "if a source of the group has the user, the next reconcile of the device (`{fix}`) puts it back"
        ),
    };
    Some(format!(
        "warning: device {device} is a target of group {}: the daemon copies changes from the group's sources \
         ({}) to it, never from it; {effect}. `usersync status` counts this as drift. To change the group's \
         users, write to a source instead",
        g.name,
        g.sources
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// Counts a write the CLI made at a target as drift, for `usersync
/// status`: the daemon counts what is changed at the device itself, but the
/// CLI's writes go through the gateway as the daemon's own do
/// (`changedOnDevice` false, WIRE.md B13). Best effort: without a state
/// database (or the right to write it) the warning printed is all.
pub(super) fn record_drift(config: &Config, device: u32, user: &str) {
    let groups: Vec<&str> = config
        .groups
        .iter()
        .filter(|g| g.targets.contains(&device))
        .map(|g| g.name.as_str())
        .collect();
    if groups.is_empty() || !matches!(config.state_dir.join(store::DB_FILE).try_exists(), Ok(true))
    {
        return;
    }
    let r = Store::open_existing(&config.state_dir).and_then(|st| {
        st.with(|c| {
            for g in &groups {
                store::record_target_change(c, g, device, user)?;
            }
            Ok(())
        })
    });
    if let Err(e) = r {
        eprintln!("warning: the change is not counted as drift in `usersync status`: {e}");
    }
}

/// What the CLI writes at a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetWrite {
    /// A new user.
    Enroll,
    /// A card added to an existing user (`enroll --overwrite`).
    AddCard,
    Delete,
}
