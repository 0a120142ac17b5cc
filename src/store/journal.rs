//! The group journal (one row per user, compacted), the pending lane of
//! single targets, group membership, and dropping a group's state.

use super::*;

pub fn head(conn: &Connection, group: &str) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM journal WHERE grp = ?1")?
        .query_row([group], |r| r.get::<_, u64>(0))?)
}

/// Records a change, replacing the user's earlier row (compaction) with a
/// new, higher sequence number. Returns the sequence number.
pub fn record_change(tx: &Transaction<'_>, change: &Change) -> Result<u64, StoreError> {
    if let ChangeKind::Member(ev) = &change.kind {
        // Ordered into the user's register: it may not win (older, or an
        // echo of the daemon's own write).
        return match multi::record(tx, change, ev)? {
            multi::Recorded::Won(seq) => Ok(seq),
            _ => head(tx, &change.group),
        };
    }
    let seq = head(tx, &change.group)? + 1;
    tx.prepare_cached(
        "INSERT INTO journal (grp, user_id, seq, source, kind, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (grp, user_id) DO UPDATE
         SET seq = ?3, source = ?4, kind = ?5, recorded_at = ?6,
             stamp = NULL, origin = NULL, deleted = 0",
    )?
    .execute(params![
        change.group,
        change.user_id,
        i64::try_from(seq).unwrap_or(i64::MAX),
        i64::from(change.source),
        kind_code(change.kind),
        now()
    ])?;
    Ok(seq)
}

pub fn journal_after(
    conn: &Connection,
    group: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<JournalRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, user_id, source, kind FROM journal
         WHERE grp = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![
            group,
            i64::try_from(after).unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok(JournalRow {
                seq: r.get::<_, u64>(0)?,
                user_id: r.get(1)?,
                source: r.get::<_, u32>(2)?,
                kind: kind_of(r.get(3)?)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Journal rows not applied yet, summed over every target, plus rows
/// queued for single targets (the `pending` of the STATUS line): one
/// query, counted in SQLite, where [`backlog`] and [`pending_counts`] build
/// a map of every target every two seconds.
pub fn pending_total(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM cursor c JOIN journal j ON j.grp = c.grp AND j.seq > c.seq)
                  + (SELECT COUNT(*) FROM pending)",
        )?
        .query_row([], |r| r.get::<_, u64>(0))?)
}

/// Journal rows each target has not applied yet, per (group, target).
pub fn backlog(conn: &Connection) -> Result<BTreeMap<(String, u32), u64>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.grp, c.device_id,
                (SELECT COUNT(*) FROM journal j WHERE j.grp = c.grp AND j.seq > c.seq)
         FROM cursor c",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(((r.get(0)?, r.get::<_, u32>(1)?), r.get::<_, u64>(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Queues `user` for `target` alone (reconcile).
pub fn add_pending(
    conn: &Connection,
    group: &str,
    target: u32,
    user: &str,
    source: u32,
) -> Result<(), StoreError> {
    add_pending_kind(conn, group, target, user, source, ChangeKind::User)
}

/// Queues a user for one target; `kind` is [`ChangeKind::User`] (apply
/// the source's state) or [`ChangeKind::Prune`].
pub fn add_pending_kind(
    conn: &Connection,
    group: &str,
    target: u32,
    user: &str,
    source: u32,
    kind: ChangeKind,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO pending (grp, device_id, user_id, source, kind) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (grp, device_id, user_id) DO UPDATE SET source = ?4, kind = ?5",
    )?
    .execute(params![
        group,
        i64::from(target),
        user,
        i64::from(source),
        kind_code(kind)
    ])?;
    Ok(())
}

/// Up to `limit` queued users of `target` whose source is one of
/// `sources`, as journal rows with seq 0.
pub fn pending(
    conn: &Connection,
    group: &str,
    target: u32,
    limit: usize,
    sources: &[u32],
) -> Result<Vec<JournalRow>, StoreError> {
    pending_after(conn, group, target, "", limit, sources)
}

/// [`pending`] from the first user ID after `after` on (a page of them).
pub fn pending_after(
    conn: &Connection,
    group: &str,
    target: u32,
    after: &str,
    limit: usize,
    sources: &[u32],
) -> Result<Vec<JournalRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, source, kind FROM pending WHERE grp = ?1 AND device_id = ?2
         AND source IN (SELECT value FROM json_each(?4)) AND user_id > ?5
         ORDER BY user_id LIMIT ?3",
    )?;
    let sources = serde_json::to_string(sources).unwrap_or_else(|_| "[]".into());
    let rows = stmt.query_map(
        params![
            group,
            i64::from(target),
            i64::try_from(limit).unwrap_or(i64::MAX),
            sources,
            after
        ],
        |r| {
            Ok(JournalRow {
                seq: 0,
                user_id: r.get(0)?,
                source: r.get::<_, u32>(1)?,
                kind: kind_of(r.get(2)?)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A group's sources and targets as its applier last saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMembers {
    pub sources: Vec<u32>,
    pub targets: Vec<u32>,
}

/// The sources and targets a group had when its applier last ran.
pub fn group_members(conn: &Connection, group: &str) -> Result<Option<GroupMembers>, StoreError> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT sources, targets FROM group_members WHERE grp = ?1")?
        .query_row([group], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((s, t)) = row else {
        return Ok(None);
    };
    let parse = |v: &str| -> Result<Vec<u32>, StoreError> {
        serde_json::from_str(v)
            .map_err(|e| StoreError::Invalid(format!("group_members of {group}: {e}")))
    };
    Ok(Some(GroupMembers {
        sources: parse(&s)?,
        targets: parse(&t)?,
    }))
}

pub fn set_group_members(
    conn: &Connection,
    group: &str,
    sources: &[u32],
    targets: &[u32],
) -> Result<(), StoreError> {
    let enc = |v: &[u32]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "INSERT INTO group_members (grp, sources, targets) VALUES (?1, ?2, ?3)
         ON CONFLICT (grp) DO UPDATE SET sources = ?2, targets = ?3",
    )?
    .execute(params![group, enc(sources), enc(targets)])?;
    Ok(())
}

/// Every group some state is stored for.
pub fn stored_groups(conn: &Connection) -> Result<BTreeSet<String>, StoreError> {
    // Group by group, one index seek each (the key of every table starts
    // with `grp`): a UNION of the tables read every journal row, 10–45 ms
    // for 100,000 rows at each start.
    let mut groups = BTreeSet::new();
    for table in ["journal", "cursor", "pending", "reconcile", "group_members"] {
        let mut first = conn.prepare_cached(&format!("SELECT MIN(grp) FROM {table}"))?;
        let mut next =
            conn.prepare_cached(&format!("SELECT MIN(grp) FROM {table} WHERE grp > ?1"))?;
        let mut grp: Option<String> = first.query_row([], |r| r.get(0))?;
        while let Some(g) = grp {
            grp = next.query_row([&g], |r| r.get(0))?;
            groups.insert(g);
        }
    }
    Ok(groups)
}

/// Forgets a group that left the configuration: a group added later under
/// the same name starts afresh (with a full reconcile), never from stale
/// cursors.
pub fn drop_group(conn: &Connection, group: &str) -> Result<(), StoreError> {
    for table in [
        "journal",
        "cursor",
        "pending",
        "reconcile",
        "quarantine",
        "group_status",
        "group_members",
        "target_drift",
        "reconcile_result",
        "own_write",
        "member_group",
        "member_echo",
        "member_conflict",
        "member_joined",
    ] {
        conn.execute(&format!("DELETE FROM {table} WHERE grp = ?1"), [group])?;
    }
    Ok(())
}
