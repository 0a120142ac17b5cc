//! The event path: the one consumer of device events and the only owner of
//! per-device checkpoints.
//!
//! For every device event, from the realtime stream or from a `GetLog`
//! read: drop it if its ID is at or below the checkpoint; if it jumps past
//! checkpoint + 1, read the gap from the device log first (the gateway drops
//! realtime events when its queue is full, WIRE.md B10); ship it to the
//! journal (log shipping); record user changes of source devices in the
//! change journal; then advance the checkpoint, in the same transaction as
//! the changes it covers. What the consumer drained at once is committed in
//! one transaction (group commit).
//!
//! Reads are anchored: `GetLog(startEventID = checkpoint)` must return the
//! checkpoint event itself, unchanged. If it does not, the device's ring
//! buffer overwrote events we never saw, or its log was reset (cleared,
//! factory reset: IDs may restart, WIRE.md §5.5), and the affected groups are
//! reconciled ([`read`] judges every answer a gateway may give). Events
//! realtime moved the checkpoint past are kept as its trail ([`Mark`]) until
//! a read finds them in the log: the read starts at the oldest of them, so
//! a reset whose next event arrived as `checkpoint + 1` is still seen.
//!
//! Device calls never run inside the consumer's loop: reads are tasks, at
//! most `[sync] device_concurrency` at a time, whose results come back to
//! the loop. A device's log tail is checked shortly after its own last
//! realtime event (debounced) and after each catch-up, and every device is
//! checked rarely when idle, so a dropped *last* event is found without a
//! sweep of every device.
//!
//! Must never: write a checkpoint past an event whose effects are not in
//! the same transaction; take a page that does not hold the verified
//! checkpoint as "nothing lost"; wait on a device inside its loop.

pub mod codes;
mod consumer;
pub mod read;

use crate::config::{Config, EventShipping};
use crate::proto::gsdk::event::EventLog;
use crate::store::{self, Change, ChangeKind, StoreError};
use codes::Meaning;

pub use consumer::{Consumer, Context, Inbox, Relink, Wakers, run};
pub use read::PAGE;

/// Where a device's log is read from next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// Never seen: its newest event is searched for; history before it is
    /// neither shipped nor synced (the first-start reconcile covers users).
    Unseen,
    /// Its log was reset (or was empty): read from the oldest record; every
    /// record is new.
    Reset,
    /// Everything up to `event` is handled; `anchor` is what that event
    /// looked like, to notice a log whose IDs restarted past it.
    At { event: u32, anchor: Option<Anchor> },
}

impl Checkpoint {
    /// The event ID handled last (0 for none).
    pub fn event(&self) -> u32 {
        match self {
            Checkpoint::At { event, .. } => *event,
            _ => 0,
        }
    }

    pub fn after(ev: &EventLog) -> Self {
        Checkpoint::At {
            event: ev.id,
            anchor: Some(Anchor::of(ev)),
        }
    }

    /// From the stored row (`None`: no row). Event 0 without an anchor is
    /// how a reset is stored.
    pub fn from_row(row: Option<(u32, Option<String>)>) -> Self {
        match row {
            None => Checkpoint::Unseen,
            Some((0, None)) => Checkpoint::Reset,
            Some((event, anchor)) => Checkpoint::At {
                event,
                anchor: anchor.map(Anchor),
            },
        }
    }

    /// The stored row: (event, anchor); `None` for [`Checkpoint::Unseen`].
    pub fn to_row(&self) -> Option<(u32, Option<String>)> {
        match self {
            Checkpoint::Unseen => None,
            Checkpoint::Reset => Some((0, None)),
            Checkpoint::At { event, anchor } => {
                Some((*event, anchor.as_ref().map(|a| a.0.clone())))
            }
        }
    }
}

/// How many times realtime may move a device's checkpoint on before a read
/// verifies the trail: the event that would make the trail longer is left
/// to a read instead (a device busy enough never to get its debounced tail
/// check pays one read per this many events; quieter ones none extra).
pub const TRAIL_MAX: usize = 64;

/// An event the checkpoint was moved past by realtime alone, which no read
/// has yet found in the log: its ID and what it looked like. The next read
/// starts at the oldest such event and must find each one there unchanged.
///
/// Realtime's `checkpoint + 1` is no proof of continuation: a log reset
/// without a reboot (a database reset; IDs restart, WIRE.md §5.5) whose
/// reset event and every event up to the checkpoint the gateway's queue
/// dropped (B10) delivers its next event as exactly that ID. Reading from
/// the new checkpoint would verify it against the new log and never see
/// the reset; the events before it, read back, are others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub event: u32,
    pub anchor: Option<Anchor>,
}

/// The fingerprint of an event, to recognise the checkpoint event later:
/// time, code, sub-code and user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor(pub String);

impl Anchor {
    /// Whether `ev` is the event this anchor was taken from: the same
    /// time, code, sub-code and user. Strict on purpose: a false "reset"
    /// costs a reconcile, a missed one loses changes.
    pub fn matches(&self, ev: &EventLog) -> bool {
        *self == Anchor::of(ev)
    }

    /// The time of the event it was taken from (device clock), if it says.
    pub fn time(&self) -> Option<u32> {
        self.0.split('/').next()?.parse().ok()
    }

    pub fn of(ev: &EventLog) -> Self {
        Anchor(format!(
            "{}/{:x}/{:x}/{}",
            ev.timestamp, ev.event_code, ev.sub_code, ev.user_id
        ))
    }
}

/// What a batch of events of one device does to the state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    pub changes: Vec<Change>,
    pub reconciles: Vec<ReconcileRequest>,
    pub diverged: Vec<Divergence>,
    pub drift: Vec<Drift>,
    /// What the events said that could not be taken as it is (logged as
    /// warnings; nothing is stored for them).
    pub warnings: Vec<String>,
}

/// A target to compare with its sources (a reset, a delete-all at it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileRequest {
    pub group: String,
    pub target: u32,
    pub reason: String,
    /// Whether extras may be deleted (the group's `prune`).
    pub prune: bool,
}

/// A group whose targets knowingly differ from its sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub group: String,
    pub why: String,
}

/// A user changed at a target itself, not through a source (WIRE.md B13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub group: String,
    pub target: u32,
    pub user_id: String,
    pub event: u32,
}

impl Effects {
    /// Reconcile every target of every group `device` belongs to (all
    /// targets where it is a source; itself where it is a target).
    fn reconcile_device(&mut self, config: &Config, device: u32, reason: &str) {
        for g in &config.groups {
            let targets: &[u32] = if g.sources.contains(&device) {
                &g.targets
            } else if g.targets.contains(&device) || g.members().contains(&device) {
                std::slice::from_ref(&device)
            } else {
                &[]
            };
            self.reconciles
                .extend(targets.iter().map(|t| ReconcileRequest {
                    group: g.name.clone(),
                    target: *t,
                    reason: reason.to_owned(),
                    prune: g.prune,
                }));
        }
    }
}

/// The effects of `events` of `device`, a pure function of the config.
/// Events of target devices never record changes (no echo loops).
pub fn effects(config: &Config, device: u32, events: &[EventLog]) -> Effects {
    let mut fx = Effects::default();
    for ev in events {
        let user_id = usable_user_id(&ev.user_id);
        match codes::meaning(ev.event_code, ev.sub_code) {
            Meaning::UserChanged if user_id.is_err() => {
                let why = user_id.err().unwrap_or_default();
                // A user changed, but the event does not say which one a
                // device could hold (a gateway's or device's fault): the
                // ID is never sent on, and only comparing the user lists
                // finds the change.
                let what = codes::name(ev.event_code, ev.sub_code);
                let mut source = config.groups.iter().any(|g| g.sources.contains(&device));
                // At a multi-master member the group's reconcile (a union)
                // finds an enroll; a delete whose user is not named cannot
                // be told from the others' copies and is not spread.
                if let Some(g) = config.member_of(device) {
                    source = true;
                    fx.reconciles.push(ReconcileRequest {
                        group: g.name.clone(),
                        target: device,
                        reason: format!("{what} (event {}) with {why}", ev.id),
                        prune: g.prune,
                    });
                }
                if source {
                    for g in config.groups.iter().filter(|g| g.sources.contains(&device)) {
                        // Without prune the reconcile finds an enroll, not
                        // a delete: say so where the operator looks.
                        if !g.prune {
                            fx.diverged.push(Divergence {
                                group: g.name.clone(),
                                why: format!(
                                    "source {device}'s event {} ({what}) has {why}: if it deleted a user, the \
                                     targets keep it until `usersync reconcile --group {} --prune`",
                                    ev.id, g.name
                                ),
                            });
                        }
                        for t in &g.targets {
                            fx.reconciles.push(ReconcileRequest {
                                group: g.name.clone(),
                                target: *t,
                                reason: format!("{what} (event {}) with {why}", ev.id),
                                prune: g.prune,
                            });
                        }
                    }
                }
                fx.warnings.push(format!(
                    "event {} of device {device} ({what}) has {why}; {}",
                    ev.id,
                    if source {
                        "the targets of its groups are reconciled to find the change"
                    } else {
                        "ignored"
                    }
                ));
            }
            Meaning::UserChanged => {
                // At a member of a multi-master group: ordered into the
                // user's register when recorded (it may be an echo).
                fx.changes
                    .extend(crate::sync::multi::change_of(config, device, ev));
                for g in config.groups.iter().filter(|g| g.sources.contains(&device)) {
                    fx.changes.push(Change {
                        group: g.name.clone(),
                        user_id: ev.user_id.clone(),
                        source: device,
                        kind: ChangeKind::User,
                    });
                }
                // At a target, by someone at the device (our own writes are
                // not `changedOnDevice`, WIRE.md B13): the door now differs
                // from its sources until a reconcile.
                if ev.changed_on_device {
                    for g in config.groups.iter().filter(|g| g.targets.contains(&device)) {
                        fx.drift.push(Drift {
                            group: g.name.clone(),
                            target: device,
                            user_id: ev.user_id.clone(),
                            event: ev.id,
                        });
                    }
                }
            }
            Meaning::AllUsersDeleted => {
                for g in config.groups.iter().filter(|g| g.sources.contains(&device)) {
                    if g.propagate_delete_all {
                        fx.changes.push(Change {
                            group: g.name.clone(),
                            user_id: String::new(),
                            source: device,
                            kind: ChangeKind::DeleteAll,
                        });
                    } else {
                        fx.diverged.push(Divergence {
                            group: g.name.clone(),
                            why: format!(
                                "source {device} deleted all its users (event {}); not propagated \
                                 because propagate_delete_all = false",
                                ev.id
                            ),
                        });
                    }
                }
                for g in config.groups.iter().filter(|g| g.targets.contains(&device)) {
                    fx.reconciles.push(ReconcileRequest {
                        group: g.name.clone(),
                        target: device,
                        reason: format!("all users deleted at target (event {})", ev.id),
                        prune: g.prune,
                    });
                }
                // Never spread to the other members: the member is
                // reconciled (its users come back from the others).
                if let Some(g) = config.member_of(device) {
                    fx.diverged.push(Divergence {
                        group: g.name.clone(),
                        why: format!(
                            "member {device} deleted all its users (event {}); not propagated in a \
                             multi-master group: the member is reconciled from the others (delete users \
                             one by one to remove them from the group)",
                            ev.id
                        ),
                    });
                    fx.reconciles.push(ReconcileRequest {
                        group: g.name.clone(),
                        target: device,
                        reason: format!("all users deleted at member (event {})", ev.id),
                        prune: g.prune,
                    });
                }
            }
            Meaning::Reset => {
                let what = codes::name(ev.event_code, ev.sub_code);
                fx.reconcile_device(config, device, &format!("{what} (event {})", ev.id));
            }
            _ => {}
        }
    }
    fx
}

fn apply_effects(tx: &rusqlite::Transaction<'_>, fx: &Effects) -> Result<(), StoreError> {
    for c in &fx.changes {
        store::record_change(tx, c)?;
    }
    for r in &fx.reconciles {
        store::request_reconcile(tx, &r.group, r.target, &r.reason, r.prune)?;
    }
    for d in &fx.diverged {
        store::set_diverged(tx, &d.group, Some(&d.why))?;
    }
    for d in &fx.drift {
        store::record_target_change(tx, &d.group, d.target, &d.user_id)?;
    }
    Ok(())
}

/// Whether `id` can name a user on a device: 1 to 32 bytes, not "0"
/// (WIRE.md §2.3, UserHdr.ID). `Err` says what is wrong, in words.
pub fn usable_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("no user ID".into())
    } else if id == "0" {
        Err("user ID \"0\", which no user may have".into())
    } else if id.len() > 32 {
        Err(format!(
            "a user ID of {} bytes (at most 32): {:?}",
            id.len(),
            id.chars().take(40).collect::<String>()
        ))
    } else {
        Ok(())
    }
}

/// Writes one device event to the log (journald when run under systemd).
pub fn ship(mode: EventShipping, ev: &EventLog) {
    let wanted = match mode {
        EventShipping::All => true,
        EventShipping::UserEvents => codes::is_user_event(ev.event_code),
        EventShipping::None => false,
    };
    if !wanted {
        return;
    }
    let name = codes::name(ev.event_code, ev.sub_code);
    let user = if ev.user_id.is_empty() {
        String::new()
    } else {
        format!(", User {}", ev.user_id)
    };
    tracing::info!(
        target: "usersync::device_event",
        device_id = ev.device_id,
        event_id = ev.id,
        event_code = format!("0x{:04X}", ev.event_code).as_str(),
        sub_code = ev.sub_code,
        user_id = ev.user_id.as_str(),
        event_time = ev.timestamp,
        changed_on_device = ev.changed_on_device,
        "Device {}{}, {}",
        ev.device_id,
        user,
        name
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        crate::config::parse(
            Path::new("/t.toml"),
            r#"
[gateway]
address = "127.0.0.1:1"
tls = false
[state]
dir = "/tmp/x"
[[device]]
id = 1
address = "a"
[[device]]
id = 2
address = "b"
[[device]]
id = 3
address = "c"
[[group]]
name = "g"
sources = [1]
targets = [2, 3]
"#,
        )
        .unwrap()
    }

    fn ev(id: u32, code: u32, user: &str) -> EventLog {
        EventLog {
            id,
            event_code: code,
            user_id: user.into(),
            ..Default::default()
        }
    }

    #[test]
    fn source_user_events_record_changes_target_events_do_not() {
        let c = config();
        let fx = effects(
            &c,
            1,
            &[ev(1, 0x2000, "7"), ev(2, 0x1000, "7"), ev(3, 0x2400, "8")],
        );
        let users: Vec<&str> = fx.changes.iter().map(|c| c.user_id.as_str()).collect();
        assert_eq!(users, vec!["7", "8"]);
        assert!(effects(&c, 2, &[ev(1, 0x2000, "7")]).changes.is_empty());
    }

    /// A user event whose ID no device could hold names nothing to copy:
    /// it was sent on as it was (a 33-byte ID reached User.Get and
    /// DeleteMulti) or dropped without a word (an empty one). Now it is a
    /// warning and a reconcile of the source's targets, which finds the
    /// change by comparing the user lists.
    #[test]
    fn user_events_without_a_usable_id_reconcile_instead() {
        let c = config();
        let long = "x".repeat(33);
        for bad in ["", "0", long.as_str()] {
            let fx = effects(&c, 1, &[ev(4, 0x2000, bad)]);
            assert!(fx.changes.is_empty(), "{bad:?}");
            assert_eq!(
                fx.reconciles.iter().map(|r| r.target).collect::<Vec<_>>(),
                vec![2, 3],
                "{bad:?}"
            );
            assert_eq!(fx.warnings.len(), 1, "{bad:?}");
            // Without prune a delete it made would stay: the group says so.
            assert_eq!(fx.diverged.len(), 1, "{bad:?}");
            assert!(fx.diverged[0].why.contains("--prune"), "{:?}", fx.diverged);
            // At a target: a warning, nothing else.
            let fx = effects(&c, 2, &[ev(4, 0x2400, bad)]);
            assert!(fx.changes.is_empty() && fx.reconciles.is_empty() && fx.drift.is_empty());
            assert_eq!(fx.warnings.len(), 1, "{bad:?}");
        }
        let fine = "x".repeat(32);
        let fx = effects(&c, 1, &[ev(4, 0x2000, &fine)]);
        assert_eq!(fx.changes.len(), 1);
        assert!(fx.warnings.is_empty() && fx.reconciles.is_empty());
    }

    #[test]
    fn delete_all_policy() {
        let mut c = config();
        let fx = effects(&c, 1, &[ev(5, 0x2600, "")]);
        assert!(fx.changes.is_empty());
        assert_eq!(fx.diverged.len(), 1);
        c.groups[0].propagate_delete_all = true;
        let fx = effects(&c, 1, &[ev(5, 0x2600, "")]);
        assert_eq!(fx.changes[0].kind, ChangeKind::DeleteAll);
        // At a target: that target is reconciled.
        let fx = effects(&c, 3, &[ev(5, 0x2600, "")]);
        assert_eq!(fx.reconciles.len(), 1);
        assert_eq!(fx.reconciles[0].target, 3);
    }

    #[test]
    fn resets_reconcile_the_right_targets() {
        let c = config();
        let fx = effects(&c, 1, &[ev(9, 0x4500, 0x02.to_string().as_str())]);
        assert!(
            fx.reconciles.is_empty(),
            "0x4500 with sub 0 is a config reset"
        );
        let mut split = ev(9, 0x4500, "");
        split.sub_code = 2;
        let fx = effects(&c, 1, &[split]);
        assert_eq!(
            fx.reconciles.iter().map(|r| r.target).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let fx = effects(&c, 2, &[ev(9, 0x4200, "")]);
        assert_eq!(
            fx.reconciles.iter().map(|r| r.target).collect::<Vec<_>>(),
            vec![2]
        );
    }
}
