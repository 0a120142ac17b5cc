//! The one event consumer: the only owner of per-device checkpoints.
//!
//! For every device event, from the realtime stream or from a `GetLog`
//! replay: drop it if its ID is at or below the checkpoint; if it jumps past
//! checkpoint + 1, replay the gap with `GetLog` first (the gateway drops
//! realtime events when its queue is full, WIRE.md B10); ship it to the
//! journal (log shipping); record user changes of source devices in the
//! change journal; then advance the checkpoint — in the same transaction as
//! the changes it covers.
//!
//! Replays are anchored: `GetLog(startEventID = checkpoint)` must return the
//! checkpoint event itself, unchanged. If it does not, the device's ring
//! buffer overwrote events we never saw, or its log was reset (cleared,
//! factory reset: IDs may restart, WIRE.md §5.5), and the affected groups are
//! reconciled.

pub mod codes;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::Notify;
use tonic::Code;

use crate::config::{Config, EventShipping};
use crate::gateway::{GatewayClient, GatewayError};
use crate::metrics::Metrics;
use crate::proto::gsdk::event::EventLog;
use crate::service::Health;
use crate::store::{self, Change, ChangeKind, Store, StoreError};
use codes::Meaning;

/// Records per `GetLog` page.
pub const PAGE: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a batch of events of one device does to the state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    pub changes: Vec<Change>,
    /// (group, target, reason, prune)
    pub reconciles: Vec<(String, u32, String, bool)>,
    /// (group, why)
    pub diverged: Vec<(String, String)>,
}

impl Effects {
    /// Reconcile every target of every group `device` belongs to (all
    /// targets where it is a source; itself where it is a target).
    fn reconcile_device(&mut self, config: &Config, device: u32, reason: &str) {
        for g in &config.groups {
            if g.sources.contains(&device) {
                for t in &g.targets {
                    self.reconciles
                        .push((g.name.clone(), *t, reason.to_owned(), g.prune));
                }
            } else if g.targets.contains(&device) {
                self.reconciles
                    .push((g.name.clone(), device, reason.to_owned(), g.prune));
            }
        }
    }
}

/// The effects of `events` of `device`, a pure function of the config.
/// Events of target devices never record changes (no echo loops).
pub fn effects(config: &Config, device: u32, events: &[EventLog]) -> Effects {
    let mut fx = Effects::default();
    for ev in events {
        match codes::meaning(ev.event_code, ev.sub_code) {
            Meaning::UserChanged if !ev.user_id.is_empty() => {
                for g in config.groups.iter().filter(|g| g.sources.contains(&device)) {
                    fx.changes.push(Change {
                        group: g.name.clone(),
                        user_id: ev.user_id.clone(),
                        source: device,
                        kind: ChangeKind::User,
                    });
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
                        fx.diverged.push((
                            g.name.clone(),
                            format!(
                                "source {device} deleted all its users (event {}); not propagated \
                                 because propagate_delete_all = false",
                                ev.id
                            ),
                        ));
                    }
                }
                for g in config.groups.iter().filter(|g| g.targets.contains(&device)) {
                    fx.reconciles.push((
                        g.name.clone(),
                        device,
                        format!("all users deleted at target (event {})", ev.id),
                        g.prune,
                    ));
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

/// The fingerprint of an event, to recognise the checkpoint event later.
pub fn anchor(ev: &EventLog) -> String {
    format!(
        "{}/{:x}/{:x}/{}",
        ev.timestamp, ev.event_code, ev.sub_code, ev.user_id
    )
}

/// Consumer state for one daemon.
pub struct Consumer {
    client: GatewayClient,
    store: Store,
    config: Arc<Config>,
    /// Wakes a group's applier when its journal grows or a reconcile of it
    /// is requested.
    wake: HashMap<String, Arc<Notify>>,
    checkpoints: BTreeMap<u32, (u32, Option<String>)>,
    /// The newest event ID seen per device (for the lag metric).
    newest: BTreeMap<u32, u32>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Consumer {
    pub fn new(
        client: GatewayClient,
        store: Store,
        config: Arc<Config>,
        wake: HashMap<String, Arc<Notify>>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Consumer {
            client,
            store,
            config,
            wake,
            checkpoints: BTreeMap::new(),
            newest: BTreeMap::new(),
            metrics,
            health,
        }
    }

    fn seen(&mut self, device: u32, id: u32) {
        let n = self.newest.entry(device).or_insert(id);
        *n = (*n).max(id);
        self.update_lag(device);
    }

    fn update_lag(&self, device: u32) {
        let cp = self.checkpoint(device).unwrap_or(0);
        let newest = self.newest.get(&device).copied().unwrap_or(cp);
        let label = Metrics::device(device);
        self.metrics
            .checkpoint
            .get_or_create(&label)
            .set(i64::from(cp));
        self.metrics
            .checkpoint_lag
            .get_or_create(&label)
            .set(i64::from(newest.saturating_sub(cp)));
    }

    pub fn set_config(&mut self, config: Arc<Config>, wake: HashMap<String, Arc<Notify>>) {
        self.config = config;
        self.wake = wake;
    }

    fn wake_groups(&self, fx: &Effects) {
        let groups = fx
            .changes
            .iter()
            .map(|c| &c.group)
            .chain(fx.reconciles.iter().map(|r| &r.0));
        for g in groups {
            if let Some(n) = self.wake.get(g) {
                n.notify_one();
            }
        }
    }

    /// Reloads the checkpoints from the store (at each gateway session).
    pub async fn load(&mut self) -> Result<(), ConsumerError> {
        self.checkpoints = self.store.run(|c| store::anchored_checkpoints(c)).await?;
        Ok(())
    }

    pub fn checkpoint(&self, device: u32) -> Option<u32> {
        self.checkpoints.get(&device).map(|c| c.0)
    }

    /// Handles one realtime event.
    pub async fn realtime(&mut self, ev: EventLog) -> Result<(), ConsumerError> {
        let device = ev.device_id;
        if !self.config.devices.contains_key(&device) {
            tracing::debug!(
                device_id = device,
                event = ev.id,
                "event of an unconfigured device ignored"
            );
            return Ok(());
        }
        self.seen(device, ev.id);
        match self.checkpoint(device) {
            // Not caught up yet: the device's catch-up handles its log.
            None => Ok(()),
            // At or below the checkpoint: a duplicate — unless it says the
            // log was reset, whose IDs may restart without a reboot
            // (WIRE.md §5.5): then verify the log against the anchor.
            Some(cp) if ev.id <= cp && cp != 0 => {
                if codes::meaning(ev.event_code, ev.sub_code) == Meaning::Reset {
                    tracing::info!(
                        device_id = device,
                        checkpoint = cp,
                        event = ev.id,
                        "reset event at or below the checkpoint; verifying the log"
                    );
                    self.catch_up(device).await
                } else {
                    Ok(())
                }
            }
            Some(cp) if ev.id == cp.wrapping_add(1) => {
                self.commit(device, vec![ev], Effects::default()).await
            }
            // A gap: events were dropped on the way. Replay from the log.
            Some(cp) => {
                tracing::info!(
                    device_id = device,
                    checkpoint = cp,
                    event = ev.id,
                    "realtime gap; replaying from the device log"
                );
                self.catch_up(device).await
            }
        }
    }

    /// Replays a device's log from its checkpoint until caught up.
    pub async fn catch_up(&mut self, device: u32) -> Result<(), ConsumerError> {
        // Bounded: every pass either returns or advances the checkpoint by
        // a full page or resets it once.
        let mut resets = 0;
        loop {
            let Some((cp, anchor_text)) = self.checkpoints.get(&device).cloned() else {
                return self.first_sight(device).await;
            };
            if cp == 0 {
                let page = self.client.get_log(device, 0, PAGE).await?;
                let full = page.len() == PAGE as usize;
                if page.is_empty() {
                    return Ok(());
                }
                self.commit(device, page, Effects::default()).await?;
                if !full {
                    return Ok(());
                }
                continue;
            }
            self.health.beat_consumer();
            let page = match self.client.get_log(device, cp, PAGE).await {
                Ok(page) => page,
                // Some gateways may refuse a start older than the oldest
                // record (WIRE.md §5.4): read from the oldest instead.
                Err(e) if e.code() == Some(Code::OutOfRange) => {
                    self.client.get_log(device, 0, PAGE).await?
                }
                Err(e) => return Err(e.into()),
            };
            let full = page.len() == PAGE as usize;
            let anchor_ok = page.first().is_some_and(|first| {
                first.id == cp && anchor_text.as_deref().is_none_or(|a| a == anchor(first))
            });
            let first_id = page.first().map(|e| e.id);
            match first_id {
                // The checkpoint event itself may just have been overwritten
                // while the next one is still the oldest: nothing was lost.
                Some(first) if anchor_ok || first < cp || first == cp.wrapping_add(1) => {
                    let fresh: Vec<EventLog> = page.into_iter().filter(|e| e.id > cp).collect();
                    if !fresh.is_empty() {
                        self.commit(device, fresh, Effects::default()).await?;
                    }
                }
                Some(first) if first > cp => {
                    tracing::warn!(
                        device_id = device,
                        checkpoint = cp,
                        oldest = first,
                        "the device's log no longer holds the events after the checkpoint (ring buffer overwritten); reconciling"
                    );
                    let mut fx = Effects::default();
                    fx.reconcile_device(
                        &self.config,
                        device,
                        &format!(
                            "events {}..{} lost from the device log",
                            cp.wrapping_add(1),
                            first.wrapping_sub(1)
                        ),
                    );
                    self.commit(device, page, fx).await?;
                }
                _ => {
                    // Empty, or the checkpoint event is not what we saw: the
                    // log was cleared or the device reset.
                    resets += 1;
                    if resets > 1 {
                        return Ok(());
                    }
                    tracing::warn!(
                        device_id = device,
                        checkpoint = cp,
                        "the device's log was reset (newest event below the checkpoint or changed); reconciling"
                    );
                    let mut fx = Effects::default();
                    fx.reconcile_device(&self.config, device, "device log reset");
                    self.reset_checkpoint(device, fx).await?;
                    continue;
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// A device never seen before: start at its newest event. Its history is
    /// not shipped or synced; the first-start reconcile of its groups covers
    /// the users.
    async fn first_sight(&mut self, device: u32) -> Result<(), ConsumerError> {
        let mut newest: Option<EventLog> = None;
        let mut start = 0;
        loop {
            let page = self.client.get_log(device, start, PAGE).await?;
            let full = page.len() == PAGE as usize;
            if let Some(last) = page.into_iter().last() {
                start = last.id.wrapping_add(1);
                newest = Some(last);
            }
            if !full || start == 0 {
                break;
            }
        }
        let (id, anchor_text) = match &newest {
            Some(ev) => (ev.id, Some(anchor(ev))),
            None => (0, None),
        };
        let a = anchor_text.clone();
        self.store
            .run(move |c| store::set_checkpoint_anchored(c, device, id, a.as_deref()))
            .await?;
        tracing::info!(
            device_id = device,
            checkpoint = id,
            "first sight of device; starting at its newest event"
        );
        self.checkpoints.insert(device, (id, anchor_text));
        Ok(())
    }

    async fn reset_checkpoint(&mut self, device: u32, fx: Effects) -> Result<(), ConsumerError> {
        let fx = Arc::new(fx);
        let recorded = Arc::clone(&fx);
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                apply_effects(&tx, &recorded)?;
                store::set_checkpoint_anchored(&tx, device, 0, None)?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.checkpoints.insert(device, (0, None));
        self.wake_groups(&fx);
        Ok(())
    }

    /// Ships `events` (ascending, all past the checkpoint), records their
    /// effects plus `extra`, and advances the checkpoint, in one transaction.
    async fn commit(
        &mut self,
        device: u32,
        events: Vec<EventLog>,
        extra: Effects,
    ) -> Result<(), ConsumerError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let (last_id, last_anchor) = (last.id, anchor(last));
        let mut fx = effects(&self.config, device, &events);
        fx.changes.extend(extra.changes);
        fx.reconciles.extend(extra.reconciles);
        fx.diverged.extend(extra.diverged);
        // Ship first: a crash before the commit ships again (at least once;
        // DEVICE_ID + EVENT_ID identify duplicates).
        for ev in &events {
            ship(self.config.ship_events, ev);
        }
        for d in &fx.diverged {
            tracing::warn!(group = %d.0, "group diverged: {}", d.1);
        }
        let fx = Arc::new(fx);
        let recorded = Arc::clone(&fx);
        let a = last_anchor.clone();
        let newest = self
            .newest
            .get(&device)
            .copied()
            .unwrap_or(last_id)
            .max(last_id);
        self.store
            .run(move |c| {
                let tx = c.transaction()?;
                apply_effects(&tx, &recorded)?;
                store::set_checkpoint_anchored(&tx, device, last_id, Some(&a))?;
                store::set_newest(&tx, device, newest)?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.checkpoints
            .insert(device, (last_id, Some(last_anchor)));
        self.metrics
            .events
            .get_or_create(&Metrics::device(device))
            .inc_by(events.len() as u64);
        self.seen(device, last_id);
        self.health.beat_consumer();
        self.wake_groups(&fx);
        Ok(())
    }
}

fn apply_effects(tx: &rusqlite::Transaction<'_>, fx: &Effects) -> Result<(), StoreError> {
    for c in &fx.changes {
        store::record_change(tx, c)?;
    }
    for (group, target, reason, prune) in &fx.reconciles {
        store::request_reconcile(tx, group, *target, reason, *prune)?;
    }
    for (group, why) in &fx.diverged {
        store::set_diverged(tx, group, Some(why))?;
    }
    Ok(())
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
        assert_eq!(fx.reconciles[0].1, 3);
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
            fx.reconciles.iter().map(|r| r.1).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let fx = effects(&c, 2, &[ev(9, 0x4200, "")]);
        assert_eq!(
            fx.reconciles.iter().map(|r| r.1).collect::<Vec<_>>(),
            vec![2]
        );
    }
}
