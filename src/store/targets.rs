//! What the operator sees of targets: drift, reconcile requests and
//! results, cursors, quarantine, device status and divergence.

use super::*;

/// Counts a user changed at a target itself.
pub fn record_target_change(
    conn: &Connection,
    group: &str,
    target: u32,
    user: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO target_drift (grp, device_id, changes, last_user, last_at)
         VALUES (?1, ?2, 1, ?3, ?4)
         ON CONFLICT (grp, device_id) DO UPDATE SET changes = changes + 1, last_user = ?3, last_at = ?4")?
        .execute(params![group, i64::from(target), user, now()])?;
    Ok(())
}

/// Users changed at a target itself since its last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetDrift {
    pub group: String,
    pub target: u32,
    pub changes: u64,
    pub last_user: String,
    pub last_at: u64,
}

pub fn target_drift(conn: &Connection) -> Result<Vec<TargetDrift>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, changes, last_user, last_at FROM target_drift ORDER BY grp, device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TargetDrift {
            group: r.get(0)?,
            target: r.get::<_, u32>(1)?,
            changes: r.get::<_, u64>(2)?,
            last_user: r.get(3)?,
            last_at: r.get::<_, u64>(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The outcome of a target's last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileResult {
    pub group: String,
    pub target: u32,
    pub reason: String,
    pub finished_at: u64,
    /// Users the target lacked.
    pub missing: u64,
    /// Users it held with other bytes.
    pub different: u64,
    /// Users it held that no source holds.
    pub extra: u64,
    /// Of those, deleted (prune).
    pub pruned: u64,
}

/// Records a finished reconcile; the target's drift count starts over.
pub fn record_reconcile_result(conn: &Connection, r: &ReconcileResult) -> Result<(), StoreError> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    conn.prepare_cached("INSERT INTO reconcile_result (grp, device_id, reason, finished_at, missing, different, extra, pruned)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (grp, device_id) DO UPDATE SET reason = ?3, finished_at = ?4, missing = ?5,
           different = ?6, extra = ?7, pruned = ?8")?
        .execute(params![
            r.group,
            i64::from(r.target),
            r.reason,
            n(r.finished_at),
            n(r.missing),
            n(r.different),
            n(r.extra),
            n(r.pruned)
        ])?;
    conn.prepare_cached("DELETE FROM target_drift WHERE grp = ?1 AND device_id = ?2")?
        .execute(params![r.group, i64::from(r.target)])?;
    Ok(())
}

pub fn reconcile_results(conn: &Connection) -> Result<Vec<ReconcileResult>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, reason, finished_at, missing, different, extra, pruned
         FROM reconcile_result ORDER BY grp, device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ReconcileResult {
            group: r.get(0)?,
            target: r.get::<_, u32>(1)?,
            reason: r.get(2)?,
            finished_at: r.get::<_, u64>(3)?,
            missing: r.get::<_, u64>(4)?,
            different: r.get::<_, u64>(5)?,
            extra: r.get::<_, u64>(6)?,
            pruned: r.get::<_, u64>(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Drops a group's pending rows whose source is not one of `sources`.
pub fn drop_pending_of_other_sources(
    conn: &Connection,
    group: &str,
    sources: &[u32],
) -> Result<(), StoreError> {
    let sources = serde_json::to_string(sources).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "DELETE FROM pending WHERE grp = ?1 AND source NOT IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![group, sources])?;
    Ok(())
}

/// Forgets a target that left a group.
pub fn drop_target(conn: &Connection, group: &str, target: u32) -> Result<(), StoreError> {
    for table in [
        "cursor",
        "pending",
        "reconcile",
        "quarantine",
        "target_drift",
        "reconcile_result",
    ] {
        conn.execute(
            &format!("DELETE FROM {table} WHERE grp = ?1 AND device_id = ?2"),
            params![group, i64::from(target)],
        )?;
    }
    Ok(())
}

pub fn remove_pending(
    conn: &Connection,
    group: &str,
    target: u32,
    users: &[String],
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached("DELETE FROM pending WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3")?;
    for u in users {
        stmt.execute(params![group, i64::from(target), u])?;
    }
    Ok(())
}

/// Queued users per (group, target).
pub fn pending_counts(conn: &Connection) -> Result<BTreeMap<(String, u32), u64>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT grp, device_id, COUNT(*) FROM pending GROUP BY grp, device_id")?;
    let rows = stmt.query_map([], |r| {
        Ok(((r.get(0)?, r.get::<_, u32>(1)?), r.get::<_, u64>(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn cursors(conn: &Connection, group: &str) -> Result<BTreeMap<u32, u64>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT device_id, seq FROM cursor WHERE grp = ?1")?;
    let rows = stmt.query_map([group], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Moves a target's cursor forward (never back).
pub fn advance_cursor(
    conn: &Connection,
    group: &str,
    device: u32,
    seq: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO cursor (grp, device_id, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (grp, device_id) DO UPDATE SET seq = MAX(seq, ?3)",
    )?
    .execute(params![
        group,
        i64::from(device),
        i64::try_from(seq).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

pub fn add_quarantine(conn: &Connection, e: &QuarantineEntry) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO quarantine (grp, device_id, user_id, seq, code, message, since)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (grp, device_id, user_id) DO UPDATE SET seq = ?4, code = ?5, message = ?6",
    )?
    .execute(params![
        e.group,
        i64::from(e.device),
        e.user_id,
        i64::try_from(e.seq).unwrap_or(i64::MAX),
        e.code,
        e.message,
        i64::try_from(e.since).unwrap_or(0)
    ])?;
    Ok(())
}

pub fn clear_quarantine(
    conn: &Connection,
    group: &str,
    device: u32,
    user_ids: &[String],
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM quarantine WHERE grp = ?1 AND device_id = ?2 AND user_id = ?3",
    )?;
    for u in user_ids {
        stmt.execute(params![group, i64::from(device), u])?;
    }
    Ok(())
}

pub fn quarantine(conn: &Connection) -> Result<Vec<QuarantineEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, user_id, seq, code, message, since FROM quarantine
         ORDER BY grp, device_id, user_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(QuarantineEntry {
            group: r.get(0)?,
            device: r.get::<_, u32>(1)?,
            user_id: r.get(2)?,
            seq: r.get::<_, u64>(3)?,
            code: r.get(4)?,
            message: r.get(5)?,
            since: r.get::<_, u64>(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn request_reconcile(
    conn: &Connection,
    group: &str,
    target: u32,
    reason: &str,
    prune: bool,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO reconcile (grp, device_id, reason, prune, after_user, requested_at)
         VALUES (?1, ?2, ?3, ?4, NULL, ?5)
         ON CONFLICT (grp, device_id) DO UPDATE
         SET reason = ?3, prune = MAX(prune, ?4), after_user = NULL, requested_at = ?5,
             generation = generation + 1",
    )?
    .execute(params![
        group,
        i64::from(target),
        reason,
        i64::from(prune),
        now()
    ])?;
    Ok(())
}

pub fn reconcile_requests(conn: &Connection) -> Result<Vec<ReconcileRequest>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT grp, device_id, reason, prune, after_user, generation FROM reconcile
         ORDER BY requested_at, grp, device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ReconcileRequest {
            group: r.get(0)?,
            target: r.get::<_, u32>(1)?,
            reason: r.get(2)?,
            prune: r.get::<_, i64>(3)? != 0,
            after_user: r.get(4)?,
            generation: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records how far request `generation` got (nothing if a newer request
/// replaced it meanwhile).
pub fn reconcile_progress(
    conn: &Connection,
    group: &str,
    target: u32,
    generation: i64,
    after_user: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE reconcile SET after_user = ?4 WHERE grp = ?1 AND device_id = ?2 AND generation = ?3")?
        .execute(params![group, i64::from(target), generation, after_user])?;
    Ok(())
}

/// Ends request `generation` (a newer request for the target stays).
pub fn reconcile_done(
    conn: &Connection,
    group: &str,
    target: u32,
    generation: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM reconcile WHERE grp = ?1 AND device_id = ?2 AND generation = ?3",
    )?
    .execute(params![group, i64::from(target), generation])?;
    Ok(())
}

pub fn set_device_status(
    conn: &Connection,
    device: u32,
    state: &str,
    detail: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO device_status (device_id, state, detail, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device_id) DO UPDATE SET state = ?2, detail = ?3, updated_at = ?4",
    )?
    .execute(params![i64::from(device), state, detail, now()])?;
    Ok(())
}

pub fn device_statuses(conn: &Connection) -> Result<Vec<DeviceStatusRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, state, detail, updated_at FROM device_status ORDER BY device_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(DeviceStatusRow {
            device: r.get::<_, u32>(0)?,
            state: r.get(1)?,
            detail: r.get(2)?,
            updated_at: r.get::<_, u64>(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_diverged(conn: &Connection, group: &str, why: Option<&str>) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO group_status (grp, diverged, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (grp) DO UPDATE SET diverged = ?2, updated_at = ?3",
    )?
    .execute(params![group, why, now()])?;
    Ok(())
}

pub fn diverged(conn: &Connection) -> Result<BTreeMap<String, String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT grp, diverged FROM group_status WHERE diverged IS NOT NULL")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
