//! Per device: its checkpoint (event and anchor), the checkpoint's trail,
//! the newest event seen and the search for it. Usable inside a
//! transaction.

use super::*;

pub fn checkpoints(conn: &Connection) -> Result<BTreeMap<u32, u32>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT device_id, event_id FROM checkpoint")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn checkpoint(conn: &Connection, device: u32) -> Result<Option<u32>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT event_id FROM checkpoint WHERE device_id = ?1")?
        .query_row([i64::from(device)], |r| r.get::<_, u32>(0))
        .optional()?)
}

/// Seeds a checkpoint without an anchor (import); any trail it had is
/// dropped, as it led to another checkpoint.
pub fn set_checkpoint(conn: &Connection, device: u32, event_id: u32) -> Result<(), StoreError> {
    clear_trail(conn, device)?;
    set_checkpoint_anchored(conn, device, event_id, None)
}

/// One event of a checkpoint trail: (event, anchor).
pub type TrailRow = (u32, Option<String>);

/// Every device's checkpoint trail, oldest first.
pub fn trails(conn: &Connection) -> Result<BTreeMap<u32, Vec<TrailRow>>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT device_id, event_id, anchor FROM checkpoint_trail ORDER BY device_id, event_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?, r.get(2)?))
    })?;
    let mut out: BTreeMap<u32, Vec<TrailRow>> = BTreeMap::new();
    for row in rows {
        let (device, event, anchor) = row?;
        out.entry(device).or_default().push((event, anchor));
    }
    Ok(out)
}

/// Adds an event to a device's checkpoint trail.
pub fn add_to_trail(
    conn: &Connection,
    device: u32,
    event_id: u32,
    anchor: Option<&str>,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO checkpoint_trail (device_id, event_id, anchor) VALUES (?1, ?2, ?3)",
        params![i64::from(device), i64::from(event_id), anchor],
    )?;
    Ok(())
}

/// Empties a device's checkpoint trail (a read found the log as expected).
pub fn clear_trail(conn: &Connection, device: u32) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM checkpoint_trail WHERE device_id = ?1",
        [i64::from(device)],
    )?;
    Ok(())
}

pub fn set_checkpoint_anchored(
    conn: &Connection,
    device: u32,
    event_id: u32,
    anchor: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO checkpoint (device_id, event_id, anchor, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device_id) DO UPDATE SET event_id = ?2, anchor = ?3, updated_at = ?4",
    )?
    .execute(params![
        i64::from(device),
        i64::from(event_id),
        anchor,
        now()
    ])?;
    Ok(())
}

/// The progress of the search for a device's newest event: (newest event
/// known, an ID known to be past the newest).
pub fn log_search(conn: &Connection, device: u32) -> Result<Option<(u32, u64)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT low, high FROM log_search WHERE device_id = ?1")?
        .query_row([i64::from(device)], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?))
        })
        .optional()?)
}

pub fn set_log_search(
    conn: &Connection,
    device: u32,
    low: u32,
    high: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO log_search (device_id, low, high) VALUES (?1, ?2, ?3)
         ON CONFLICT (device_id) DO UPDATE SET low = ?2, high = ?3",
    )?
    .execute(params![
        i64::from(device),
        i64::from(low),
        i64::try_from(high).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

pub fn clear_log_search(conn: &Connection, device: u32) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM log_search WHERE device_id = ?1")?
        .execute([i64::from(device)])?;
    Ok(())
}

/// Records the newest event ID seen on a device.
pub fn set_newest(conn: &Connection, device: u32, newest: u32) -> Result<(), StoreError> {
    conn.prepare_cached(
        // The consumer's newest, which follows the log across a wrap at 2^32
        // and starts over after a reset (a plain maximum would not).
        "UPDATE checkpoint SET newest = ?2 WHERE device_id = ?1",
    )?
    .execute(params![i64::from(device), i64::from(newest)])?;
    Ok(())
}

/// A device's checkpoint row: (checkpoint, newest seen, updated_at).
pub type CheckpointRow = (u32, Option<u32>, u64);

/// Per device: its checkpoint row.
pub fn checkpoint_rows(conn: &Connection) -> Result<BTreeMap<u32, CheckpointRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT device_id, event_id, newest, updated_at FROM checkpoint")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, u32>(0)?,
            (
                r.get::<_, u32>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, u64>(3)?,
            ),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Checkpoints with their anchors.
pub fn anchored_checkpoints(
    conn: &Connection,
) -> Result<BTreeMap<u32, (u32, Option<String>)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT device_id, event_id, anchor FROM checkpoint")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, (r.get::<_, u32>(1)?, r.get(2)?)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
