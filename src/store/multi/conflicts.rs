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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn found(users: &[&str]) -> Vec<(String, String)> {
        users
            .iter()
            .map(|u| {
                (
                    (*u).to_owned(),
                    format!("[1] hold one version ({} bytes)", u.len()),
                )
            })
            .collect()
    }

    fn set(store: &Store, group: &str, users: &[&str]) {
        store
            .with(|c| {
                let tx = c.transaction()?;
                set_conflicts(&tx, group, &found(users))?;
                tx.commit()?;
                Ok(())
            })
            .unwrap();
    }

    fn listed(store: &Store) -> Vec<(String, String)> {
        store
            .with(|c| conflicts(c))
            .unwrap()
            .into_iter()
            .map(|c| (c.group, c.user_id))
            .collect()
    }

    #[test]
    fn a_reconcile_replaces_its_groups_conflicts_and_a_change_settles_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        set(&store, "b", &["z"]);
        set(&store, "a", &["y", "x"]);
        let pair = |g: &str, u: &str| (g.to_owned(), u.to_owned());
        assert_eq!(
            listed(&store),
            vec![pair("a", "x"), pair("a", "y"), pair("b", "z")],
            "by group, then user"
        );
        let all = store.with(|c| conflicts(c)).unwrap();
        assert_eq!(all[0].detail, "[1] hold one version (1 bytes)");
        assert!(all[0].found_at > 0);
        // The next reconcile of "a" found only y: x is gone, "b" is kept.
        set(&store, "a", &["y"]);
        assert_eq!(listed(&store), vec![pair("a", "y"), pair("b", "z")]);
        store.with(|c| clear_conflict(c, "a", "y")).unwrap();
        assert_eq!(listed(&store), vec![pair("b", "z")]);
    }
}
