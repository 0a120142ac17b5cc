//! The daemon's own writes to members, remembered before they are made,
//! so the events they log are known as echoes and not taken for changes.
//!
//! An expectation ends when its echo comes, or when a read of the member's
//! log that started after the write's call returned (by the process's
//! own-write tick, and by [`OWN_WRITE_GRACE_MS`] of wall time) reached the
//! log's end without it: the write logged nothing (a delete of a user the
//! member lacked, a write it refused). A leftover would swallow a real
//! change of that user made at the member. Bounded in number, and in time
//! by [`OWN_WRITE_MAX_SECS`] for a member never read again.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::store::now_ms;

/// Orders the calls of writes against the starts of log reads in this
/// process; 0 is before every read of it (a write of an earlier run).
static TICK: AtomicU64 = AtomicU64::new(1);

/// The next own-write tick: taken when a write's call returned, and when
/// a read of a device's log starts.
pub fn own_write_tick() -> u64 {
    TICK.fetch_add(1, Ordering::SeqCst)
}

/// Remembers that the daemon is about to write `users` (`op`) to
/// `devices`, so the events they log are known as its own: one row per
/// write, in the order they are made. Forgets what expired, and the oldest
/// beyond [`OWN_WRITES_MAX`].
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
        "INSERT INTO own_write (grp, device_id, user_id, op, expires_at, sent_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let sent = now_ms();
    for d in devices {
        for u in users {
            stmt.execute(params![
                group,
                i64::from(*d),
                u,
                op.code(),
                now + OWN_WRITE_MAX_SECS,
                sent
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
            "DELETE FROM own_write WHERE grp = ?1 AND seq IN (
                SELECT seq FROM own_write WHERE grp = ?1 ORDER BY seq LIMIT ?2)",
            params![group, kept - OWN_WRITES_MAX],
        )?;
    }
    Ok(())
}

/// Whether the event matches a write of the daemon still expected; if so,
/// the oldest such write is no longer expected. A write can only have
/// logged its event while it was under way: one whose call returned
/// before the event happened (by `event_ms`, the daemon's clock, within
/// the grace and `slack_ms` of clock error) did not cause it — a change
/// made at the member later (while the member or the daemon was away) is
/// never taken for the echo of a write that logged nothing.
#[allow(clippy::too_many_arguments)]
pub(super) fn consume_own_write(
    tx: &Transaction<'_>,
    group: &str,
    device: u32,
    user: &str,
    op: MemberOp,
    now: i64,
    event_ms: i64,
    slack_ms: i64,
) -> Result<bool, StoreError> {
    let matched: Option<i64> = tx.query_row(
        "SELECT MIN(seq) FROM own_write
         WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4 AND expires_at > ?5
         AND (done_at_ms IS NULL OR ?6 <= done_at_ms + ?7)",
        params![
            group,
            i64::from(device),
            user,
            op.code(),
            now,
            event_ms,
            OWN_WRITE_GRACE_MS
                .saturating_add(slack_ms)
                .saturating_add(1000)
        ],
        |r| r.get(0),
    )?;
    match matched {
        // Writes of the other operation made before this one that never
        // came back (a delete of a user the member did not hold logs
        // nothing) are overtaken by it: the member logs our writes in
        // order. Ones made after it are still to come.
        Some(seq) => {
            tx.execute(
                "DELETE FROM own_write WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3
                 AND ((op != ?4 AND seq < ?5) OR seq = ?5)",
                params![group, i64::from(device), user, op.code(), seq],
            )?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Writes that did not happen (the call failed for these devices) are no
/// longer expected: a change made there later must not pass for one. The
/// newest expectation of each is the failed write's.
pub fn unexpect_own_writes(
    tx: &Transaction<'_>,
    group: &str,
    devices: &[u32],
    users: &[String],
    op: MemberOp,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(
        "DELETE FROM own_write WHERE seq = (
            SELECT MAX(seq) FROM own_write
            WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4)",
    )?;
    for d in devices {
        for u in users {
            stmt.execute(params![group, i64::from(*d), u, op.code()])?;
        }
    }
    Ok(())
}

/// The group's writes made so far have returned (whatever their outcome):
/// stamped with `tick` and the wall time, so a later read of a member's
/// log can end the ones that logged nothing. One applier writes a group at
/// a time, so every write of the group not yet stamped has returned.
/// Returns how many were stamped.
pub fn own_writes_done(conn: &Connection, group: &str, tick: u64) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "UPDATE own_write SET done_tick = ?2, done_at_ms = ?3 WHERE grp = ?1 AND done_tick IS NULL",
        params![group, i64::try_from(tick).unwrap_or(i64::MAX), now_ms()],
    )?)
}

/// `device`'s log was read to its end by a read that started at `tick`
/// (wall time `wall_ms`), and the events it found are recorded: writes of
/// the daemon to it that returned before that read (by the grace margin)
/// and are still expected logged nothing, and are expected no more.
/// Returns how many ended so.
pub fn expire_own_writes(
    conn: &Connection,
    group: &str,
    device: u32,
    tick: u64,
    wall_ms: i64,
) -> Result<usize, StoreError> {
    let n = conn.execute(
        "DELETE FROM own_write WHERE grp = ?1 AND device_id = ?2
         AND done_tick IS NOT NULL AND done_tick < ?3 AND done_at_ms <= ?4",
        params![
            group,
            i64::from(device),
            i64::try_from(tick).unwrap_or(i64::MAX),
            wall_ms.saturating_sub(OWN_WRITE_GRACE_MS)
        ],
    )?;
    if n > 0 {
        tracing::debug!(
            group,
            device_id = device,
            writes = n,
            "own writes that logged no event at the member are no longer expected"
        );
    }
    Ok(n)
}

/// At the daemon's start: every write remembered was made by an earlier
/// run, before any read of this one. One in flight when it stopped had
/// returned by `call_timeout_ms` after it was sent, at the latest.
pub fn own_writes_restarted(conn: &Connection, call_timeout_ms: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE own_write SET done_tick = 0,
         done_at_ms = COALESCE(done_at_ms, MIN(COALESCE(sent_at_ms, ?1) + ?2, ?1))",
        params![now_ms(), call_timeout_ms],
    )?;
    Ok(())
}

/// Own writes still expected in a group.
pub fn own_writes_expected(conn: &Connection, group: &str) -> Result<u64, StoreError> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM own_write WHERE grp = ?1 AND expires_at > ?2",
        params![group, now()],
        |r| r.get::<_, u64>(0),
    )?)
}
