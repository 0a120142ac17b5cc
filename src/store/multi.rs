//! State of multi-master groups, in the same database and transactions as
//! the rest: each user's last-writer-wins register (the `stamp`, `origin`
//! and `deleted` columns of its journal row, migration 5), the daemon's
//! own writes to recognise their echoes, what the group learnt about the
//! `changedOnDevice` flag, conflicts a reconcile could not decide, and each
//! device's clock skew. User IDs, device IDs, times and counts only.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Change, StoreError, add_pending, head, now};
use crate::config::EchoDetection;
use crate::sync::multi::order::{self, InForce, Merge, Origin, Stamp, Version};

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
}

/// How long a write of the daemon is expected to come back as an event
/// (realtime, or a tail check that reads a dropped one: seconds; the idle
/// sweep of a quiet device: `idle_check_interval_secs`, 10 minutes by
/// default).
pub const OWN_WRITE_WINDOW_SECS: i64 = 900;
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
    /// A delete from before the group first ran, of a user with no
    /// recorded change: history read again, not a change.
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
    let seen = echo_observed(tx, group)?.is_some();
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
            "echo detection: member reported changedOnDevice; from now on only such events are changes (changed-on-device)"
        );
    }
    let own = consume_own_write(tx, group, device, user, ev.op, now)?;
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
    let (time, bounded) = order::bound(ev.time, u32_time(now), ev.max_skew);
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
    // wrongly) replays deletes of long ago; one of a user the group never
    // saw change could delete a user enrolled elsewhere since. The
    // reconcile such a read asks for decides instead.
    if incoming.deleted
        && stored.is_none()
        && started_at(tx, group)?.is_some_and(|s| i64::from(time) + i64::from(ev.max_skew) < s)
    {
        tracing::warn!(
            group,
            device_id = device,
            user_id = user,
            event_id = ev.event,
            change_time = time,
            "delete from before the group first ran, of a user with no recorded change: taken for history read again, not spread \
             (if the member's clock is behind, set it)"
        );
        return Ok(Recorded::History);
    }
    match order::merge(stored.as_ref().map(|r| &r.version), incoming) {
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

fn member_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MemberRow> {
    Ok(MemberRow {
        seq: r.get::<_, u64>(0)?,
        user_id: r.get(1)?,
        source: r.get::<_, u32>(2)?,
        version: Version {
            stamp: Stamp {
                time: r.get::<_, u32>(3)?,
                device: r.get::<_, u32>(4)?,
            },
            deleted: r.get::<_, i64>(5)? != 0,
        },
    })
}

const ROW: &str =
    "SELECT seq, user_id, source, stamp, COALESCE(origin, source), deleted FROM journal";

/// A user's register (`None`: no change recorded by a multi-master group).
pub fn row(conn: &Connection, group: &str, user: &str) -> Result<Option<MemberRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("{ROW} WHERE grp = ?1 AND user_id = ?2 AND stamp IS NOT NULL"),
            params![group, user],
            member_row,
        )
        .optional()?)
}

/// Registers of several users.
pub fn rows_of(
    conn: &Connection,
    group: &str,
    users: &[String],
) -> Result<HashMap<String, MemberRow>, StoreError> {
    let mut out = HashMap::new();
    for u in users {
        if let Some(r) = row(conn, group, u)? {
            out.insert(u.clone(), r);
        }
    }
    Ok(out)
}

/// Up to `limit` registers changed after `after`, in order.
pub fn rows_after(
    conn: &Connection,
    group: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<MemberRow>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "{ROW} WHERE grp = ?1 AND seq > ?2 AND stamp IS NOT NULL ORDER BY seq LIMIT ?3"
    ))?;
    let rows = stmt.query_map(
        params![
            group,
            i64::try_from(after).unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        member_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every register of a group, by user.
pub fn all_rows(conn: &Connection, group: &str) -> Result<BTreeMap<String, MemberRow>, StoreError> {
    Ok(rows_after(conn, group, 0, usize::MAX)?
        .into_iter()
        .map(|r| (r.user_id.clone(), r))
        .collect())
}

/// Reads the winning version of `user` from `source` from now on (its
/// origin lost it; `source` holds the same version). The order is kept.
pub fn set_source(
    conn: &Connection,
    group: &str,
    user: &str,
    source: u32,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE journal SET source = ?3 WHERE grp = ?1 AND user_id = ?2 AND stamp IS NOT NULL",
        params![group, user, i64::from(source)],
    )?;
    Ok(())
}

/// Remembers that the daemon is about to write `users` (`op`) to
/// `devices`, so the events they log are known as its own. Forgets what
/// expired, and the oldest beyond [`OWN_WRITES_MAX`].
pub fn expect_own_writes(
    tx: &Transaction<'_>,
    group: &str,
    devices: &[u32],
    users: &[String],
    op: MemberOp,
) -> Result<(), StoreError> {
    let now = now();
    tx.execute("DELETE FROM own_write WHERE expires_at <= ?1", [now])?;
    let mut stmt = tx.prepare(
        "INSERT INTO own_write (grp, device_id, user_id, op, pending, expires_at)
         VALUES (?1, ?2, ?3, ?4, 1, ?5)
         ON CONFLICT (grp, device_id, user_id, op) DO UPDATE
         SET pending = pending + 1, expires_at = ?5",
    )?;
    for d in devices {
        for u in users {
            stmt.execute(params![
                group,
                i64::from(*d),
                u,
                op.code(),
                now + OWN_WRITE_WINDOW_SECS
            ])?;
        }
    }
    let kept: i64 = tx.query_row(
        "SELECT COUNT(*) FROM own_write WHERE grp = ?1",
        [group],
        |r| r.get(0),
    )?;
    if kept > OWN_WRITES_MAX {
        tx.execute(
            "DELETE FROM own_write WHERE grp = ?1 AND rowid IN (
                SELECT rowid FROM own_write WHERE grp = ?1 ORDER BY expires_at LIMIT ?2)",
            params![group, kept - OWN_WRITES_MAX],
        )?;
    }
    Ok(())
}

/// Whether the event matches a write of the daemon still expected; if so,
/// that write is no longer expected.
fn consume_own_write(
    tx: &Transaction<'_>,
    group: &str,
    device: u32,
    user: &str,
    op: MemberOp,
    now: i64,
) -> Result<bool, StoreError> {
    let pending: Option<i64> = tx
        .query_row(
            "SELECT pending FROM own_write
             WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4 AND expires_at > ?5",
            params![group, i64::from(device), user, op.code(), now],
            |r| r.get(0),
        )
        .optional()?;
    match pending {
        // An earlier write of the other operation that never came back
        // (a delete of a user the member did not hold logs nothing) is
        // overtaken by this one: the member logs our writes in order.
        Some(_) => {
            tx.execute(
                "DELETE FROM own_write WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op != ?4",
                params![group, i64::from(device), user, op.code()],
            )?;
            take_one(tx, group, device, user, op)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// One expected write of (device, user, op) fewer.
fn take_one(
    tx: &Connection,
    group: &str,
    device: u32,
    user: &str,
    op: MemberOp,
) -> Result<(), StoreError> {
    let pending: Option<i64> = tx
        .query_row(
            "SELECT pending FROM own_write WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4",
            params![group, i64::from(device), user, op.code()],
            |r| r.get(0),
        )
        .optional()?;
    match pending {
        Some(n) if n > 1 => {
            tx.execute(
                "UPDATE own_write SET pending = pending - 1
                 WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4",
                params![group, i64::from(device), user, op.code()],
            )?;
        }
        Some(_) => {
            tx.execute(
                "DELETE FROM own_write WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4",
                params![group, i64::from(device), user, op.code()],
            )?;
        }
        None => {}
    }
    Ok(())
}

/// Writes that did not happen (the call failed for these devices) are no
/// longer expected: a change made there later must not pass for one.
pub fn unexpect_own_writes(
    tx: &Transaction<'_>,
    group: &str,
    devices: &[u32],
    users: &[String],
    op: MemberOp,
) -> Result<(), StoreError> {
    for d in devices {
        for u in users {
            take_one(tx, group, *d, u, op)?;
        }
    }
    Ok(())
}

/// Own writes still expected in a group.
pub fn own_writes_expected(conn: &Connection, group: &str) -> Result<u64, StoreError> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(pending), 0) FROM own_write WHERE grp = ?1 AND expires_at > ?2",
        params![group, now()],
        |r| r.get::<_, u64>(0),
    )?)
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

/// When and where a member of the group first reported `changedOnDevice`
/// (echo detection `Observe` then uses the flag): (device, unix time).
pub fn echo_observed(conn: &Connection, group: &str) -> Result<Option<(u32, u64)>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT device_id, seen_at FROM member_echo WHERE grp = ?1",
            [group],
            |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?)),
        )
        .optional()?)
}

/// The detection in force for a group now.
pub fn echo_in_force(
    conn: &Connection,
    group: &str,
    configured: EchoDetection,
) -> Result<InForce, StoreError> {
    let seen = echo_observed(conn, group)?.is_some();
    Ok(order::in_force(configured, seen, false))
}

/// A user whose versions differ between members with no history to decide.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    pub group: String,
    pub user_id: String,
    /// Which members hold which version (device IDs and sizes only).
    pub detail: String,
    pub found_at: u64,
}

/// Replaces the group's conflicts with what its last reconcile found.
pub fn set_conflicts(
    tx: &Transaction<'_>,
    group: &str,
    found: &[(String, String)],
) -> Result<(), StoreError> {
    tx.execute("DELETE FROM member_conflict WHERE grp = ?1", [group])?;
    let now = now();
    for (user, detail) in found {
        tx.execute(
            "INSERT INTO member_conflict (grp, user_id, detail, found_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (grp, user_id) DO UPDATE SET detail = ?3, found_at = ?4",
            params![group, user, detail, now],
        )?;
    }
    Ok(())
}

/// A conflict is settled by a change of the user (its history is known
/// from then on).
pub fn clear_conflict(conn: &Connection, group: &str, user: &str) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM member_conflict WHERE grp = ?1 AND user_id = ?2",
        params![group, user],
    )?;
    Ok(())
}

pub fn conflicts(conn: &Connection) -> Result<Vec<Conflict>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT grp, user_id, detail, found_at FROM member_conflict ORDER BY grp, user_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Conflict {
            group: r.get(0)?,
            user_id: r.get(1)?,
            detail: r.get(2)?,
            found_at: r.get::<_, u64>(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A device's clock against the daemon's, as its realtime events showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ClockSkew {
    pub device: u32,
    /// Event time minus receive time, seconds (positive: ahead).
    pub skew_secs: i64,
    pub measured_at: u64,
}

pub fn set_clock_skew(conn: &Connection, device: u32, skew_secs: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO device_clock (device_id, skew_secs, measured_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (device_id) DO UPDATE SET skew_secs = ?2, measured_at = ?3",
        params![i64::from(device), skew_secs, now()],
    )?;
    Ok(())
}

pub fn clock_skews(conn: &Connection) -> Result<Vec<ClockSkew>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT device_id, skew_secs, measured_at FROM device_clock ORDER BY device_id")?;
    let rows = stmt.query_map([], |r| {
        Ok(ClockSkew {
            device: r.get::<_, u32>(0)?,
            skew_secs: r.get(1)?,
            measured_at: r.get::<_, u64>(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::super::{ChangeKind, Store, pending};
    use super::*;
    use proptest::prelude::*;

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        (tmp, store)
    }

    fn ev(time: u32, op: MemberOp, on_device: bool, echo: EchoDetection) -> MemberEvent {
        MemberEvent {
            time,
            op,
            on_device,
            echo,
            max_skew: 10,
            event: 1,
        }
    }

    fn change(device: u32, user: &str) -> Change {
        Change {
            group: "g".into(),
            user_id: user.into(),
            source: device,
            kind: ChangeKind::User,
        }
    }

    /// A time the bound never touches (an hour ago).
    fn past() -> u32 {
        u32_time(now() - 3600)
    }

    fn rec(store: &Store, device: u32, user: &str, e: MemberEvent) -> Recorded {
        store
            .with(|c| {
                let tx = c.transaction()?;
                let r = record(&tx, &change(device, user), &e)?;
                tx.commit()?;
                Ok(r)
            })
            .unwrap()
    }

    fn expect(store: &Store, devices: &[u32], user: &str, op: MemberOp) {
        store
            .with(|c| {
                let tx = c.transaction()?;
                expect_own_writes(&tx, "g", devices, &[user.to_owned()], op)?;
                tx.commit()?;
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn registers_order_changes_and_set_losers_back() {
        use EchoDetection::ChangedOnDevice as Cod;
        let (_t, s) = store();
        let t = past();
        assert_eq!(
            rec(&s, 1, "u", ev(t, MemberOp::Upsert, true, Cod)),
            Recorded::Won(1)
        );
        assert_eq!(
            rec(&s, 2, "u", ev(t + 5, MemberOp::Delete, true, Cod)),
            Recorded::Won(2)
        );
        // Older than the tombstone: ignored, and member 3 is set back.
        assert_eq!(
            rec(&s, 3, "u", ev(t + 1, MemberOp::Upsert, true, Cod)),
            Recorded::Older
        );
        let r = s.with(|c| row(c, "g", "u")).unwrap().unwrap();
        assert_eq!((r.seq, r.source, r.version.deleted), (2, 2, true));
        let queued = s.with(|c| pending(c, "g", 3, 10, &[1, 2, 3])).unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!((queued[0].user_id.as_str(), queued[0].source), ("u", 2));
        // Not a change: the flag is not set (changed-on-device).
        assert_eq!(
            rec(&s, 1, "u", ev(t + 9, MemberOp::Upsert, false, Cod)),
            Recorded::Foreign
        );
        assert_eq!(s.head("g").unwrap(), 2);
        // A one-way row is no register.
        assert_eq!(s.with(|c| row(c, "g", "nobody")).unwrap(), None);
    }

    #[test]
    fn old_deletes_of_users_without_history_are_history() {
        use EchoDetection::ChangedOnDevice as Cod;
        let (_t, s) = store();
        s.with(|c| mark_started(c, "g")).unwrap();
        let old = u32_time(now() - 86_400);
        assert_eq!(
            rec(&s, 1, "u", ev(old, MemberOp::Delete, true, Cod)),
            Recorded::History
        );
        assert_eq!(s.head("g").unwrap(), 0);
        // An old enroll is recorded (its state is read now), and an old
        // delete of a user with history is ordered as any change.
        assert_eq!(
            rec(&s, 1, "v", ev(old, MemberOp::Upsert, true, Cod)),
            Recorded::Won(1)
        );
        assert_eq!(
            rec(&s, 2, "v", ev(old + 1, MemberOp::Delete, true, Cod)),
            Recorded::Won(2)
        );
        // A delete since the start is a change.
        assert_eq!(
            rec(&s, 1, "w", ev(u32_time(now()), MemberOp::Delete, true, Cod)),
            Recorded::Won(3)
        );
    }

    #[test]
    fn times_far_ahead_are_ordered_at_the_bound() {
        let (_t, s) = store();
        let far = u32_time(now() + 86_400);
        rec(
            &s,
            1,
            "u",
            ev(far, MemberOp::Upsert, true, EchoDetection::ChangedOnDevice),
        );
        let r = s.with(|c| row(c, "g", "u")).unwrap().unwrap();
        assert!(i64::from(r.version.stamp.time) <= now() + 10);
        // A change a minute later (in the daemon's time) wins over it.
        let later = u32_time(now() + 60);
        assert_eq!(
            rec(
                &s,
                2,
                "u",
                ev(
                    later,
                    MemberOp::Delete,
                    true,
                    EchoDetection::ChangedOnDevice
                )
            ),
            Recorded::Won(2)
        );
    }

    #[test]
    fn own_writes_are_echoes_once_each() {
        use EchoDetection::OwnWrites as Own;
        let (_t, s) = store();
        let t = past();
        expect(&s, &[1, 2], "u", MemberOp::Upsert);
        expect(&s, &[1], "u", MemberOp::Upsert);
        assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 3);
        assert_eq!(
            rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
            Recorded::Echo
        );
        assert_eq!(
            rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
            Recorded::Echo
        );
        // The third event at 1 is a change.
        assert_eq!(
            rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
            Recorded::Won(1)
        );
        // A delete is not the echo of an enroll; a change clears what was
        // expected there.
        assert_eq!(
            rec(&s, 2, "u", ev(t + 1, MemberOp::Delete, false, Own)),
            Recorded::Won(2)
        );
        assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
        // A failed write is not expected any more.
        expect(&s, &[3], "v", MemberOp::Delete);
        s.with(|c| {
            let tx = c.transaction()?;
            unexpect_own_writes(&tx, "g", &[3], &["v".to_owned()], MemberOp::Delete)?;
            tx.commit()?;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            rec(&s, 3, "v", ev(t, MemberOp::Delete, false, Own)),
            Recorded::Won(3)
        );
    }

    #[test]
    fn an_echo_overtakes_an_unanswered_write_of_the_other_kind() {
        use EchoDetection::OwnWrites as Own;
        let (_t, s) = store();
        let t = past();
        // A delete of a user member 1 did not hold (no event), then an
        // enroll (its echo comes): the delete is no longer expected, so
        // a real delete there later is a change.
        expect(&s, &[1], "u", MemberOp::Delete);
        expect(&s, &[1], "u", MemberOp::Upsert);
        assert_eq!(
            rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
            Recorded::Echo
        );
        assert_eq!(
            rec(&s, 1, "u", ev(t + 1, MemberOp::Delete, false, Own)),
            Recorded::Won(1)
        );
    }

    #[test]
    fn expected_writes_expire() {
        use EchoDetection::OwnWrites as Own;
        let (_t, s) = store();
        expect(&s, &[1], "u", MemberOp::Upsert);
        s.with(|c| {
            c.execute("UPDATE own_write SET expires_at = ?1", [now() - 1])?;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            rec(&s, 1, "u", ev(past(), MemberOp::Upsert, false, Own)),
            Recorded::Won(1)
        );
        assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
    }

    #[test]
    fn observing_switches_to_the_flag_once_seen() {
        use EchoDetection::Observe;
        let (_t, s) = store();
        let t = past();
        // Not seen yet: own writes decide.
        assert_eq!(
            rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Observe)),
            Recorded::Won(1)
        );
        assert_eq!(s.with(|c| echo_observed(c, "g")).unwrap(), None);
        assert_eq!(
            rec(&s, 2, "u", ev(t + 1, MemberOp::Upsert, true, Observe)),
            Recorded::Won(2)
        );
        assert_eq!(
            s.with(|c| echo_observed(c, "g")).unwrap().map(|(d, _)| d),
            Some(2)
        );
        assert_eq!(
            s.with(|c| echo_in_force(c, "g", Observe)).unwrap(),
            InForce::ChangedOnDevice
        );
        // From now on an unflagged event is not a change.
        assert_eq!(
            rec(&s, 1, "u", ev(t + 2, MemberOp::Delete, false, Observe)),
            Recorded::Foreign
        );
    }

    proptest! {
        // Each case is a database on disk (synchronous = FULL).
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The store's registers follow the pure rules (`order::merge`) for
        /// any sequence of members' changes.
        #[test]
        fn registers_match_the_rules(
            events in proptest::collection::vec((1u32..4, 0u8..3, 0u32..20, any::<bool>()), 0..40)
        ) {
            let (_t, s) = store();
            let base = past();
            let mut model: BTreeMap<String, Version> = BTreeMap::new();
            for (device, user, time, deleted) in events {
                let user = format!("u{user}");
                let op = if deleted { MemberOp::Delete } else { MemberOp::Upsert };
                rec(&s, device, &user, ev(base + time, op, true, EchoDetection::ChangedOnDevice));
                let incoming = Version { stamp: Stamp { time: base + time, device }, deleted };
                if let Merge::Replace(v) = order::merge(model.get(&user), incoming) {
                    model.insert(user, v);
                }
            }
            let got: BTreeMap<String, Version> = s
                .with(|c| all_rows(c, "g"))
                .unwrap()
                .into_iter()
                .map(|(u, r)| (u, r.version))
                .collect();
            prop_assert_eq!(got, model);
        }
    }
}
