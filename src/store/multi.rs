//! State of multi-master groups, in the same database and transactions as
//! the rest: each user's last-writer-wins register (the `stamp`, `origin`
//! and `deleted` columns of its journal row, migration 5), the daemon's
//! own writes to recognise their echoes, what the group learnt about the
//! `changedOnDevice` flag, conflicts a reconcile could not decide, and each
//! device's clock skew. User IDs, device IDs, times and counts only.
//!
//! This file: the event types and [`record`], which orders a member's
//! event into its user's register; the group's shape. Beside it:
//! `registers` (reading them), `own_writes` (echoes expected),
//! `conflicts` (what a member reconcile could not decide), `observed`
//! (the `changedOnDevice` flag seen per member, clock skews).

use std::collections::{BTreeMap, HashMap};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Change, StoreError, add_pending, head, now};
use crate::config::EchoDetection;
use crate::sync::multi::order::{self, InForce, Merge, Origin, Stamp, Version};

mod conflicts;
mod observed;
mod own_writes;
mod registers;
#[cfg(test)]
mod tests;

pub use conflicts::{Conflict, clear_conflict, conflicts, set_conflicts};
pub use observed::{ClockSkew, clock_skews, echo_in_force, echo_observed, set_clock_skew};
use observed::{clock_skew_of, echo_seen_at};
use own_writes::consume_own_write;
pub use own_writes::{
    expect_own_writes, expire_own_writes, own_write_tick, own_writes_done, own_writes_expected,
    own_writes_restarted, unexpect_own_writes,
};
pub use registers::{all_rows, given_winner, row, rows_after, rows_of, set_source, waiting_for};

/// What a member's user event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberOp {
    /// Enrolled or updated (0x2000, 0x2200, 0x2900).
    Upsert,
    /// Deleted (0x2400).
    Delete,
}

impl MemberOp {
    fn code(self) -> i64 {
        match self {
            MemberOp::Upsert => 0,
            MemberOp::Delete => 1,
        }
    }
}

/// A member's user event as the journal needs it (see
/// [`super::ChangeKind::Member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberEvent {
    /// The event's timestamp (the member's clock).
    pub time: u32,
    pub op: MemberOp,
    /// `changedOnDevice` (WIRE.md B13).
    pub on_device: bool,
    pub echo: EchoDetection,
    /// The group's `max_clock_skew_secs`.
    pub max_skew: u32,
    /// The event's ID, for the log.
    pub event: u32,
    /// Read from the member's log from its oldest record after a reset
    /// (`Checkpoint::Reset`, the consumer's replay pass): history read
    /// again, not known to follow the member's recorded changes.
    pub replayed: bool,
    /// Replayed, but logged after the reset marker of that log (0x4200,
    /// 0x4501, 0x4502, 0x4504) logged at or after the last event handled
    /// before the reset: made after the log restarted, so a delete of a
    /// user with no recorded change is news; the strictly-newer ordering
    /// of `replayed` and the group-start rule still apply.
    pub after_reset: bool,
}

/// How long an own write may stay expected at most, a bound for a member
/// whose log is never read again (removed from the group while offline).
/// Expectations end far sooner: when their echo comes, or when a read of
/// the member's log that started after the write found none
/// ([`expire_own_writes`]).
pub const OWN_WRITE_MAX_SECS: i64 = 86_400;
/// How long after a write's call returned a device may still be logging
/// it: a read of its log started later than this without the echo ends
/// the expectation. A device logs a user change as it makes it, before it
/// answers; WIRE.md does not say so, and a read too soon would take a late
/// echo for a change (harmless then: the same version, spread again, or a
/// delete ordered last-writer-wins), so the margin.
pub const OWN_WRITE_GRACE_MS: i64 = 2_000;
/// Own writes remembered per group at most (oldest forgotten first).
pub const OWN_WRITES_MAX: i64 = 200_000;

/// One user's register in a multi-master group's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub seq: u64,
    pub user_id: String,
    /// Where the winning version is read (its origin, unless a reconcile
    /// found the origin had lost it and another member holds it).
    pub source: u32,
    pub version: Version,
}

/// What recording an event did, for the caller's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The user's new winner, at this sequence number.
    Won(u64),
    /// Older than the recorded change: the member is set back to it.
    Older,
    /// The daemon's own write.
    Echo,
    /// Not a change in this mode (another SDK client's write).
    Foreign,
    /// Read again from a reset log and not newer than the register (or a
    /// delete of a user with no recorded change): history, not a change;
    /// the reconcile the reset asked for covers the member.
    History,
}

fn u32_time(secs: i64) -> u32 {
    u32::try_from(secs.max(0)).unwrap_or(u32::MAX)
}

/// Records a member's user event: classifies it (own change, echo),
/// bounds its time, and merges it into the user's register. A change older
/// than the register queues the register's version for that member (it
/// holds the loser now).
pub fn record(
    tx: &Transaction<'_>,
    change: &Change,
    ev: &MemberEvent,
) -> Result<Recorded, StoreError> {
    let (group, user, device) = (
        change.group.as_str(),
        change.user_id.as_str(),
        change.source,
    );
    let now = now();
    // Observed per member: firmware that never sets the flag keeps its
    // member on own writes, whatever the others report.
    let seen = echo_seen_at(tx, group, device)?;
    let mode = order::in_force(ev.echo, seen, ev.on_device);
    if ev.echo == EchoDetection::Observe && !seen && ev.on_device {
        tx.execute(
            "INSERT OR IGNORE INTO member_echo (grp, device_id, seen_at) VALUES (?1, ?2, ?3)",
            params![group, i64::from(device), now],
        )?;
        tracing::info!(
            group,
            device_id = device,
            event_id = ev.event,
            "echo detection: member reported changedOnDevice; from now on only its events with the flag are changes (changed-on-device for this member)"
        );
    }
    // When the event happened by the daemon's clock, at the latest: its
    // time with a clock measured ahead taken back, and never after it was
    // received (now). A skew measured negative is no help: events that
    // arrive late (a busy stream) look like a clock behind.
    let skew = clock_skew_of(tx, device)?;
    let event_ms = (i64::from(ev.time) - skew.unwrap_or(0).max(0))
        .saturating_mul(1000)
        .min(now.saturating_mul(1000));
    let slack_ms = i64::from(ev.max_skew).saturating_mul(1000);
    let own = consume_own_write(tx, group, device, user, ev.op, now, event_ms, slack_ms)?;
    match order::classify(mode, ev.on_device, own) {
        Origin::Echo => return Ok(Recorded::Echo),
        Origin::Foreign => {
            tracing::warn!(
                group,
                device_id = device,
                user_id = user,
                event_id = ev.event,
                "user written at a member through the SDK by another client (changedOnDevice not set, not written by usersync): \
                 not a change in changed-on-device mode, not propagated; make the change at the device, or set \
                 echo_detection = \"own-writes\""
            );
            return Ok(Recorded::Foreign);
        }
        Origin::Local => {}
    }
    // Writes of ours still expected here for this user are overtaken by
    // this change (or never logged, like a delete of a missing user).
    tx.execute(
        "DELETE FROM own_write WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3",
        params![group, i64::from(device), user],
    )?;
    // A member whose clock is measured ahead by more than the bound has
    // its event times taken back by the measured skew first: the bound
    // below is by the time the event is read, so an event read late (the
    // member was offline, a gap backfilled) would otherwise keep most of
    // its lead and beat a later change made elsewhere meanwhile.
    let corrected = match skew {
        Some(skew) if skew > i64::from(ev.max_skew) => {
            tracing::debug!(
                group,
                device_id = device,
                event_id = ev.event,
                event_time = ev.time,
                skew_secs = skew,
                "event time taken back by the member's measured clock skew"
            );
            u32_time(i64::from(ev.time) - skew)
        }
        _ => ev.time,
    };
    let (time, bounded) = order::bound(corrected, u32_time(now), ev.max_skew);
    if bounded {
        tracing::warn!(
            group,
            device_id = device,
            user_id = user,
            event_id = ev.event,
            event_time = ev.time,
            ahead_secs = i64::from(ev.time) - now,
            "event time ahead of the daemon's clock by more than max_clock_skew_secs: ordered as the daemon's time plus the bound; set the device's clock"
        );
    }
    let incoming = Version {
        stamp: Stamp { time, device },
        deleted: ev.op == MemberOp::Delete,
    };
    let stored = row(tx, group, user)?;
    // A log read again from its start (a reset, maybe taken for one
    // wrongly) replays changes of long ago, which are history:
    // * one made before the group first ran as multi-master was never a
    //   change of the group: the first start's reconcile took the members
    //   as they were (the union); taken for news, an old enroll and delete
    //   read back in turn would delete a user other members hold;
    // * a delete of a user the group never saw change could delete a user
    //   enrolled elsewhere since.
    // The reconcile such a read asks for decides instead. Only a replayed
    // event is history: a live change counts whatever the member's clock
    // says (a clock behind, or a change made while the daemon was down).
    if ev.replayed {
        let why = if started_at(tx, group)?.is_some_and(|s| i64::from(time) < s) {
            Some("made before the group first ran")
        } else if !ev.after_reset && incoming.deleted && stored.is_none() {
            Some("a delete of a user with no recorded change")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::info!(
                group,
                device_id = device,
                user_id = user,
                event_id = ev.event,
                change_time = time,
                deleted = incoming.deleted,
                "change read again from a reset log, {why}: history, not spread (the reconcile the reset asked for decides)"
            );
            return Ok(Recorded::History);
        }
    }
    match order::merge(stored.as_ref().map(|r| &r.version), incoming, ev.replayed) {
        Merge::Replace(v) => {
            let seq = head(tx, group)? + 1;
            tx.execute(
                "INSERT INTO journal (grp, user_id, seq, source, kind, recorded_at, stamp, origin, deleted)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?4, ?7)
                 ON CONFLICT (grp, user_id) DO UPDATE
                 SET seq = ?3, source = ?4, kind = 0, recorded_at = ?5, stamp = ?6, origin = ?4, deleted = ?7",
                params![
                    group,
                    user,
                    i64::try_from(seq).unwrap_or(i64::MAX),
                    i64::from(device),
                    now,
                    i64::from(v.stamp.time),
                    i64::from(v.deleted)
                ],
            )?;
            // Its history is known from now on.
            tx.execute(
                "DELETE FROM member_conflict WHERE grp = ?1 AND user_id = ?2",
                params![group, user],
            )?;
            Ok(Recorded::Won(seq))
        }
        Merge::Keep => {
            let Some(winner) = stored else {
                return Ok(Recorded::Older);
            };
            if ev.replayed {
                // Read again, not a change made now: the member is not set
                // back on its account (the reset's reconcile covers it).
                tracing::info!(
                    group,
                    user_id = user,
                    device_id = device,
                    event_id = ev.event,
                    change_time = time,
                    deleted = incoming.deleted,
                    winner_device = winner.version.stamp.device,
                    winner_time = winner.version.stamp.time,
                    "change read again from a reset log, not newer than the one recorded: history, ignored"
                );
                return Ok(Recorded::History);
            }
            tracing::warn!(
                group,
                user_id = user,
                device_id = device,
                event_id = ev.event,
                change_time = time,
                deleted = incoming.deleted,
                winner_device = winner.version.stamp.device,
                winner_time = winner.version.stamp.time,
                winner_deleted = winner.version.deleted,
                "change older than the one recorded for this user: ignored; the member is set back to the newer change (last writer wins)"
            );
            add_pending(tx, group, device, user, winner.source)?;
            Ok(Recorded::Older)
        }
    }
}

/// Which shape a group's state is kept for when its shape changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    OneWay,
    MultiMaster,
}

/// Drops what a group's other shape left (cursors, parked and queued rows,
/// reconcile requests and results, quarantine, status, the other shape's
/// journal rows), keeping the rows the event consumer may already have
/// recorded under the new shape: its new members or targets start at the
/// head and are reconciled, as on a first start.
pub fn drop_other_shape(conn: &Connection, group: &str, keep: Shape) -> Result<(), StoreError> {
    let rows = match keep {
        Shape::MultiMaster => "DELETE FROM journal WHERE grp = ?1 AND stamp IS NULL",
        Shape::OneWay => "DELETE FROM journal WHERE grp = ?1 AND stamp IS NOT NULL",
    };
    conn.execute(rows, [group])?;
    let mut tables = vec![
        "cursor",
        "pending",
        "reconcile",
        "quarantine",
        "group_status",
        "target_drift",
        "reconcile_result",
    ];
    if keep == Shape::OneWay {
        tables.extend([
            "own_write",
            "member_group",
            "member_echo",
            "member_conflict",
            "member_joined",
        ]);
    }
    for table in tables {
        conn.execute(&format!("DELETE FROM {table} WHERE grp = ?1"), [group])?;
    }
    Ok(())
}

/// Notes when the group first ran as multi-master (kept from then on).
pub fn mark_started(conn: &Connection, group: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO member_group (grp, started_at) VALUES (?1, ?2)",
        params![group, now()],
    )?;
    Ok(())
}

/// When the group first ran as multi-master (unix time).
pub fn started_at(conn: &Connection, group: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT started_at FROM member_group WHERE grp = ?1",
            [group],
            |r| r.get(0),
        )
        .optional()?)
}
