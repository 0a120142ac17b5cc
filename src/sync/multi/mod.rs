//! Multi-master groups: every member accepts changes, and each change
//! reaches every other member; the last writer wins per user.
//!
//! * **Origin.** A member's user event is its own change, or the echo of
//!   the daemon's write there ([`order::classify`]): by `changedOnDevice`
//!   (WIRE.md B13), or by the writes the daemon remembers making
//!   (`store::multi`); by default the flag once a member has shown it.
//! * **Order.** A user's journal row is its register: the winning change's
//!   (event time, member) and whether it deleted the user ([`order`]). An
//!   older change is ignored, and its member set back to the winner; a
//!   delete is a tombstone ordered like any change. Recorded by the event
//!   consumer in the transaction that moves the member's checkpoint.
//! * **Apply.** The same cursors, cohorts, batches, retries and quarantine
//!   as one-way groups, every member a target: a version is read from the
//!   member that holds it (`User.Get`, opaque bytes; a newer state read
//!   there is fine, it is newer) and written to every other member of the
//!   cohort; a delete goes to every member of the cohort, its origin too (a
//!   write of ours may have brought the user back there after its delete).
//!   A delete needs no confirmation elsewhere: the other members hold the
//!   user precisely because the delete has not reached them. Before a
//!   member is written, its log is read up to now (the event consumer's
//!   pass), so a change made there is ordered before it could be
//!   overwritten.
//! * **Reconcile** ([`reconcile`]): the union of the members' users; the
//!   journal decides where it knows the history; differences without
//!   history are reported as conflicts and left alone unless `prune`.
//!
//! Never: delete a user at a member for a reason other than a tombstone
//! (absence at the member a version is read from waits for its newer
//! event); log or store a user record (IDs, counts, sizes only).

pub mod clock;
pub mod order;

mod apply;
mod reconcile;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::config::{Config, EchoDetection};
use crate::device::CatchUpRequest;
use crate::events::codes::{self, Meaning};
use crate::proto::gsdk::event::EventLog;
use crate::store::Change;
use crate::store::multi::{MemberEvent, MemberOp};
use clock::ClockWatch;

/// How long a member's log read before a write may take before the member
/// is backed off instead.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The journal change a user event of a member records, if `device` is a
/// member of a multi-master group.
pub fn change_of(config: &Config, device: u32, ev: &EventLog) -> Option<Change> {
    let group = config.member_of(device)?;
    let mm = group.multi_master()?;
    if ev.user_id.is_empty() || codes::meaning(ev.event_code, ev.sub_code) != Meaning::UserChanged {
        return None;
    }
    let op = if ev.event_code == 0x2400 {
        MemberOp::Delete
    } else {
        MemberOp::Upsert
    };
    Some(Change {
        group: group.name.clone(),
        user_id: ev.user_id.clone(),
        source: device,
        kind: ChangeKind::Member(MemberEvent {
            time: ev.timestamp,
            op,
            on_device: ev.changed_on_device,
            echo: mm.echo,
            max_skew: u32::try_from(mm.max_clock_skew.as_secs()).unwrap_or(u32::MAX),
            event: ev.id,
            // Set by the consumer for a pass read after a reset.
            replayed: false,
            after_reset: false,
        }),
    })
}

/// What an applier of a multi-master group works with besides the
/// gateway and the store.
#[derive(Clone)]
pub struct Links {
    /// Asks the event consumer to read a device's log up to now.
    pub catch_up: mpsc::Sender<CatchUpRequest>,
    pub clocks: Arc<ClockWatch>,
}

/// Requests (member, generation) served by a partial reconcile, and the
/// members it reached.
type PartialRun = (Vec<(u32, i64)>, Vec<u32>);

/// A multi-master applier's own state.
#[derive(Default)]
pub(crate) struct State {
    pub(super) links: Option<Links>,
    initialized: bool,
    /// Per member: the last clock measurement looked at, and whether its
    /// skew is over the bound now (warned once per crossing).
    clocks: HashMap<u32, (u64, bool)>,
    /// The skew stored last per member, to store only what changed.
    stored_skew: HashMap<u32, i64>,
    reconcile: Option<reconcile::Run>,
    /// Users whose version the member it is read from no longer holds: by
    /// user, (times seen so, when to look again). Their pending rows wait
    /// aside meanwhile, so the rows behind them go on.
    absent: HashMap<String, (u32, Instant)>,
    /// The last partial reconcile: the requests it served (served again
    /// in full once every member is reachable) and the members it reached.
    partial: Option<PartialRun>,
    /// Since when a member of the group has been unreachable while a
    /// reconcile was asked for (a full run under way waits so long).
    paused: Option<Instant>,
}

impl Applier {
    /// Gives the applier what a multi-master group needs (a one-way group
    /// ignores it).
    pub fn with_links(mut self, links: Links) -> Self {
        self.multi.links = Some(links);
        self
    }

    pub(super) fn members(&self) -> Vec<u32> {
        self.group.members().to_vec()
    }

    /// Members that are live and not backing off.
    fn eligible_members(&self) -> Vec<u32> {
        self.members()
            .into_iter()
            .filter(|m| self.eligible(*m))
            .collect()
    }

    /// One unit of work of a multi-master group; `true` if anything moved.
    pub(super) async fn multi_step(&mut self) -> Result<bool, SyncError> {
        if !self.multi.initialized {
            self.multi_init().await?;
            self.multi.initialized = true;
        }
        self.check_clocks().await?;
        self.confirm_writes().await;
        // Reconcile chunks, parked and reconcile rows (pending) and journal
        // batches take turns, as in one-way groups.
        self.turn = (self.turn + 1) % 3;
        for i in 0..3 {
            let moved = match (self.turn + i) % 3 {
                0 => match self.members_reconcile_step().await {
                    Ok(moved) => moved,
                    Err(SyncError::Gateway(e)) => {
                        let n = self.timers.reconcile.get(&0).map_or(0, |(n, _)| *n);
                        let delay = self.backoff.delay(n);
                        tracing::warn!(group = %self.group.name, error = %e, retry_in = ?delay, "reconcile could not read a member; retrying later");
                        self.timers
                            .reconcile
                            .insert(0, (n.saturating_add(1), Instant::now() + delay));
                        self.multi.reconcile = None;
                        false
                    }
                    Err(e) => return Err(e),
                },
                1 => self.members_pending_step().await?,
                _ => self.members_journal_step().await?,
            };
            if moved {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A member without a cursor is new (first start of the group, or added
    /// to it): it starts at the head, and the group is reconciled. State
    /// left by the group's earlier one-way shape is dropped; a member that
    /// left is forgotten.
    async fn multi_init(&mut self) -> Result<(), SyncError> {
        let (name, members, prune) = (self.group.name.clone(), self.members(), self.group.prune);
        let (created, reshaped) = self
            .store
            .run(move |c| {
                let tx = c.transaction()?;
                let known = store::group_members(&tx, &name)?;
                // A one-way group's lists differ; a multi-master group
                // stores its members as both.
                let reshaped = known.as_ref().is_some_and(|k| k.sources != k.targets)
                    || tx.query_row(
                        "SELECT EXISTS (SELECT 1 FROM journal WHERE grp = ?1 AND stamp IS NULL)",
                        [&name],
                        |r| r.get::<_, bool>(0),
                    )?;
                if reshaped {
                    store::multi::drop_other_shape(&tx, &name, store::multi::Shape::MultiMaster)?;
                } else if let Some(k) = &known {
                    let gone: Vec<u32> = k
                        .targets
                        .iter()
                        .copied()
                        .filter(|m| !members.contains(m))
                        .collect();
                    for m in &gone {
                        store::drop_target(&tx, &name, *m)?;
                    }
                    // Versions read at a member that left are read from now
                    // on at a member known to hold them; rows queued with it
                    // as their source are dropped (a reconcile queues again
                    // what is missing). Versions no member is known to hold
                    // have the group reconciled.
                    if !gone.is_empty() {
                        let mut unplaced = false;
                        for r in store::multi::all_rows(&tx, &name)?.into_values() {
                            if r.version.deleted || !gone.contains(&r.source) {
                                continue;
                            }
                            let holder = store::multi::given_winner(&tx, &name, &r.user_id, r.seq)?
                                .into_iter()
                                .find(|m| members.contains(m));
                            match holder {
                                Some(h) => store::multi::set_source(&tx, &name, &r.user_id, h)?,
                                None => unplaced = true,
                            }
                        }
                        // Rows queued with it as their source are read at
                        // the member the register reads at now (a delete at
                        // any member: it needs no record); without one,
                        // the reconcile queues them again.
                        let queued: Vec<(u32, String)> = {
                            let mut stmt = tx.prepare(
                                "SELECT device_id, user_id FROM pending WHERE grp = ?1
                                 AND source IN (SELECT value FROM json_each(?2))",
                            )?;
                            let gone_json =
                                serde_json::to_string(&gone).unwrap_or_else(|_| "[]".into());
                            let rows = stmt.query_map(rusqlite::params![name, gone_json], |r| {
                                Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?))
                            })?;
                            rows.collect::<Result<_, _>>()?
                        };
                        for (m, u) in queued {
                            let now_at = match store::multi::row(&tx, &name, &u)? {
                                Some(r) if r.version.deleted => members.first().copied(),
                                Some(r) if !gone.contains(&r.source) => Some(r.source),
                                _ => None,
                            };
                            match now_at {
                                Some(src) => store::add_pending(&tx, &name, m, &u, src)?,
                                None => unplaced = true,
                            }
                        }
                        if unplaced {
                            for m in &members {
                                store::request_reconcile(
                                    &tx,
                                    &name,
                                    *m,
                                    "a member left the group",
                                    prune,
                                )?;
                            }
                        }
                    }
                }
                let cursors = store::cursors(&tx, &name)?;
                let head = store::head(&tx, &name)?;
                let mut created = Vec::new();
                for m in &members {
                    if reshaped || !cursors.contains_key(m) {
                        store::advance_cursor(&tx, &name, *m, head)?;
                        tx.execute(
                            "INSERT OR REPLACE INTO member_joined (grp, device_id, seq) VALUES (?1, ?2, ?3)",
                            rusqlite::params![name, i64::from(*m), i64::try_from(head).unwrap_or(i64::MAX)],
                        )?;
                        store::request_reconcile(&tx, &name, *m, reconcile::NEW_MEMBER, prune)?;
                        created.push(*m);
                    }
                }
                store::set_group_members(&tx, &name, &members, &members)?;
                store::multi::mark_started(&tx, &name)?;
                tx.commit()?;
                Ok((created, reshaped))
            })
            .await?;
        let name = &self.group.name;
        if reshaped {
            tracing::info!(group = %name, "group is multi-master now: its one-way state is dropped and the members reconciled");
        }
        if !created.is_empty() {
            tracing::info!(group = %name, members = ?created, "new members: the group is reconciled");
        }
        let configured = self.group.multi_master().map(|m| m.echo);
        let (n, store) = (name.clone(), self.store.clone());
        let observed = store
            .run(move |c| store::multi::echo_observed(c, &n))
            .await?;
        match (configured, observed) {
            (Some(EchoDetection::ChangedOnDevice), _) => {
                tracing::info!(group = %name, "echo detection: changed-on-device (configured): only events with changedOnDevice set are changes")
            }
            (Some(EchoDetection::OwnWrites), _) => {
                tracing::info!(group = %name, "echo detection: own-writes (configured): events matching the daemon's own writes are ignored")
            }
            (_, observed) if observed.is_empty() => {
                tracing::info!(group = %name, "echo detection: own-writes for each member until it reports changedOnDevice (echo_detection not set)")
            }
            (_, observed) => {
                let flagged: Vec<u32> = observed.iter().map(|(d, _)| *d).collect();
                tracing::info!(group = %name, members = ?flagged, "echo detection: changed-on-device for the members that reported changedOnDevice, own-writes for the others")
            }
        }
        Ok(())
    }

    /// Warns once when a member's clock goes further from the daemon's
    /// than the group's bound (and once when it is back), and stores the
    /// skew for `status`.
    async fn check_clocks(&mut self) -> Result<(), SyncError> {
        let Some(links) = self.multi.links.clone() else {
            return Ok(());
        };
        let bound = self.group.multi_master().map_or(i64::MAX, |m| {
            i64::try_from(m.max_clock_skew.as_secs()).unwrap_or(i64::MAX)
        });
        let mut store_now = Vec::new();
        for m in self.members() {
            let Some(skew) = links.clocks.skew(m) else {
                continue;
            };
            let (seen, over_before) = self.multi.clocks.get(&m).copied().unwrap_or((0, false));
            if seen == skew.serial {
                continue;
            }
            let over = skew.secs.abs() > bound;
            if over && !over_before {
                let way = if skew.secs > 0 { "ahead of" } else { "behind" };
                tracing::warn!(group = %self.group.name, device_id = m, skew_secs = skew.secs, max_clock_skew_secs = bound,
                    "member's clock is {}s {way} the daemon's: last writer wins orders changes by device time, so set the device's clock (NTP)", skew.secs.abs());
            } else if !over && over_before {
                tracing::info!(group = %self.group.name, device_id = m, skew_secs = skew.secs, "member's clock is within max_clock_skew_secs again");
            }
            self.multi.clocks.insert(m, (skew.serial, over));
            let changed = self
                .multi
                .stored_skew
                .get(&m)
                .is_none_or(|s| (s - skew.secs).abs() >= 2 || over != over_before);
            if changed {
                self.multi.stored_skew.insert(m, skew.secs);
                store_now.push((m, skew.secs));
            }
        }
        if !store_now.is_empty() {
            self.store
                .run(move |c| {
                    for (m, s) in &store_now {
                        store::multi::set_clock_skew(c, *m, *s)?;
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(())
    }

    /// Has the logs of members written lately read once the grace after
    /// their writes has passed: the reads end the expectations of writes
    /// that logged nothing (`store::multi::expire_own_writes`), so a real
    /// change of those users there is not taken for an echo. A member not
    /// live is read by its catch-up when it is back.
    async fn confirm_writes(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .timers
            .confirm
            .iter()
            .filter(|(m, (_, at))| *at <= now && self.board.is_live(**m))
            .map(|(m, _)| *m)
            .collect();
        if due.is_empty() {
            return;
        }
        let read = self.settle_logs(&due).await;
        for m in due {
            if read.contains(&m) {
                self.timers.confirm.remove(&m);
            } else if let Some((n, at)) = self.timers.confirm.get_mut(&m) {
                *at = Instant::now() + self.backoff.delay(*n);
                *n = n.saturating_add(1);
            }
        }
    }

    /// Has the event consumer read `members`' logs up to now, so a change
    /// made at a member is in the journal before the member is written.
    /// Returns the members whose logs were read; the others back off.
    async fn settle_logs(&mut self, members: &[u32]) -> Vec<u32> {
        let Some(links) = self.multi.links.clone() else {
            return members.to_vec();
        };
        let started = Instant::now();
        let mut waits = Vec::new();
        for m in members {
            let (reply, rx) = oneshot::channel();
            if links
                .catch_up
                .send(CatchUpRequest { device: *m, reply })
                .await
                .is_err()
            {
                // No event consumer (the daemon stops): nothing is written
                // unread; the members wait as if they had failed.
                for m in members {
                    self.back_off(*m, "the event consumer is not running");
                }
                return Vec::new();
            }
            waits.push((*m, rx));
        }
        let mut read = Vec::new();
        for (m, rx) in waits {
            match tokio::time::timeout(SETTLE_TIMEOUT, rx).await {
                Ok(Ok(Ok(()))) => {
                    // A read after the grace of the last write here also
                    // confirmed it.
                    if self
                        .timers
                        .confirm
                        .get(&m)
                        .is_some_and(|(_, at)| *at <= started)
                    {
                        self.timers.confirm.remove(&m);
                    }
                    read.push(m);
                }
                Ok(Ok(Err(e))) => {
                    self.back_off(m, &format!("its log could not be read before a write: {e}"))
                }
                Ok(Err(_)) => self.back_off(m, "the event consumer did not answer"),
                Err(_) => self.back_off(m, "its log read before a write took too long"),
            }
        }
        read
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::effects;

    fn config() -> Config {
        crate::config::fixtures::desks_and_doors()
    }

    fn ev(id: u32, code: u32, user: &str, on_device: bool) -> EventLog {
        EventLog {
            id,
            timestamp: 1_000 + id,
            event_code: code,
            user_id: user.into(),
            changed_on_device: on_device,
            ..Default::default()
        }
    }

    #[test]
    fn member_events_become_member_changes() {
        let c = config();
        let fx = effects(
            &c,
            1,
            &[
                ev(1, 0x2000, "u", true),
                ev(2, 0x2200, "u", false),
                ev(3, 0x2400, "v", true),
                ev(4, 0x1000, "u", false),
                ev(5, 0x2900, "w", true),
            ],
        );
        let got: Vec<(&str, u32, MemberOp, bool, u32)> = fx
            .changes
            .iter()
            .map(|c| match c.kind {
                ChangeKind::Member(m) => {
                    assert_eq!(c.group, "desks");
                    assert_eq!(m.max_skew, 7);
                    assert_eq!(m.echo, EchoDetection::Observe);
                    (c.user_id.as_str(), c.source, m.op, m.on_device, m.time)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("u", 1, MemberOp::Upsert, true, 1_001),
                ("u", 1, MemberOp::Upsert, false, 1_002),
                ("v", 1, MemberOp::Delete, true, 1_003),
                ("w", 1, MemberOp::Upsert, true, 1_005),
            ]
        );
        assert!(fx.drift.is_empty(), "a member is no one-way target");
        // One-way groups are untouched by it.
        let fx = effects(&c, 3, &[ev(1, 0x2000, "u", true)]);
        assert_eq!(fx.changes.len(), 1);
        assert_eq!(fx.changes[0].kind, ChangeKind::User);
        let fx = effects(&c, 4, &[ev(1, 0x2000, "u", true)]);
        assert!(fx.changes.is_empty());
        assert_eq!(fx.drift.len(), 1);
    }

    #[test]
    fn a_delete_all_or_a_reset_at_a_member_reconciles_it_and_spreads_nothing() {
        let c = config();
        let fx = effects(&c, 2, &[ev(9, 0x2600, "", true)]);
        assert!(fx.changes.is_empty());
        assert_eq!(fx.diverged.len(), 1);
        assert_eq!(
            fx.reconciles
                .iter()
                .map(|r| (r.group.as_str(), r.target))
                .collect::<Vec<_>>(),
            vec![("desks", 2)]
        );
        let fx = effects(&c, 1, &[ev(9, 0x4502, "", false)]);
        assert_eq!(
            fx.reconciles
                .iter()
                .map(|r| (r.group.as_str(), r.target))
                .collect::<Vec<_>>(),
            vec![("desks", 1)]
        );
    }
}
