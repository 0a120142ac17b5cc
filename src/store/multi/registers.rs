//! Reading and re-pointing the registers: a user's journal row in a
//! multi-master group (the `stamp`, `origin` and `deleted` columns) is
//! its last-writer-wins register. Ordered by [`super::record`] only; a
//! member reconcile may change where a version is read ([`set_source`]).

use super::*;

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

/// The devices of `group` known to hold the version of `user` recorded at
/// journal sequence `seq`: their cursor is past it, nothing of the user
/// waits for them (no pending row, no quarantine), and they were members
/// when it was recorded (one that joined since starts at the head holding
/// whatever it held). A member behind, or one that refused it, may hold an
/// older version.
pub fn given_winner(
    conn: &Connection,
    group: &str,
    user: &str,
    seq: u64,
) -> Result<Vec<u32>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id FROM cursor WHERE grp = ?1 AND seq >= ?2
         AND device_id NOT IN (SELECT device_id FROM pending WHERE grp = ?1 AND user_id = ?3)
         AND device_id NOT IN (SELECT device_id FROM quarantine WHERE grp = ?1 AND user_id = ?3)
         AND device_id NOT IN (SELECT device_id FROM member_joined WHERE grp = ?1 AND seq >= ?2)
         ORDER BY device_id",
    )?;
    let rows = stmt.query_map(
        params![group, i64::try_from(seq).unwrap_or(i64::MAX), user],
        |r| r.get::<_, u32>(0),
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The devices of `group` where something of `user` is known to wait (a
/// pending row, a quarantine entry): a change reached them only in part.
/// A quarantine entry counts from `seq` on (one of an older change of the
/// user is not about this one).
pub fn waiting_for(
    conn: &Connection,
    group: &str,
    user: &str,
    seq: u64,
) -> Result<Vec<u32>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id FROM pending WHERE grp = ?1 AND user_id = ?2
         UNION SELECT device_id FROM quarantine WHERE grp = ?1 AND user_id = ?2 AND seq >= ?3",
    )?;
    let rows = stmt.query_map(
        params![group, user, i64::try_from(seq).unwrap_or(i64::MAX)],
        |r| r.get::<_, u32>(0),
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}
