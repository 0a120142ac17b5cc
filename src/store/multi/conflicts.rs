//! Conflicts: users whose versions differ between members where no
//! history decides which wins. A member reconcile replaces the group's
//! list; a change of the user settles its entry. For `usersync status`:
//! user IDs, device IDs, sizes and times only, never a record.

use super::*;

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

/// Every group's conflicts, by group and user.
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
