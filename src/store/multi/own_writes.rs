//! The daemon's own writes to members, remembered before they are made,
//! so the events they log are known as echoes and not taken for changes
//! (bounded in time and in number).

use super::*;

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
        "INSERT INTO own_write (grp, device_id, user_id, op, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
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
            "DELETE FROM own_write WHERE grp = ?1 AND seq IN (
                SELECT seq FROM own_write WHERE grp = ?1 ORDER BY seq LIMIT ?2)",
            params![group, kept - OWN_WRITES_MAX],
        )?;
    }
    Ok(())
}

/// Whether the event matches a write of the daemon still expected; if so,
/// the oldest such write is no longer expected.
pub(super) fn consume_own_write(
    tx: &Transaction<'_>,
    group: &str,
    device: u32,
    user: &str,
    op: MemberOp,
    now: i64,
) -> Result<bool, StoreError> {
    let matched: Option<i64> = tx.query_row(
        "SELECT MIN(seq) FROM own_write
         WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3 AND op = ?4 AND expires_at > ?5",
        params![group, i64::from(device), user, op.code(), now],
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

/// Own writes still expected in a group.
pub fn own_writes_expected(conn: &Connection, group: &str) -> Result<u64, StoreError> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM own_write WHERE grp = ?1 AND expires_at > ?2",
        params![group, now()],
        |r| r.get::<_, u64>(0),
    )?)
}
