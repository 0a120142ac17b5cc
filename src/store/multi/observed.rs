//! What the daemon observed about members, for ordering and for `usersync
//! status`: which members reported `changedOnDevice` (echo detection
//! `Observe` then uses the flag for them), and each device's clock skew
//! measured from its realtime events.

use super::*;

/// The members of the group that reported `changedOnDevice` (echo
/// detection `Observe` then uses the flag for them): (device, unix time
/// first seen), by device.
pub fn echo_observed(conn: &Connection, group: &str) -> Result<Vec<(u32, u64)>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT device_id, seen_at FROM member_echo WHERE grp = ?1 ORDER BY device_id")?;
    let rows = stmt.query_map([group], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Whether `device` reported `changedOnDevice` in the group.
pub(super) fn echo_seen_at(
    conn: &Connection,
    group: &str,
    device: u32,
) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM member_echo WHERE grp = ?1 AND device_id = ?2",
            params![group, i64::from(device)],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The detection in force for a member of a group now.
pub fn echo_in_force(
    conn: &Connection,
    group: &str,
    device: u32,
    configured: EchoDetection,
) -> Result<InForce, StoreError> {
    let seen = echo_seen_at(conn, group, device)?;
    Ok(order::in_force(configured, seen, false))
}

/// A device's clock against the daemon's, as its realtime events showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ClockSkew {
    pub device: u32,
    /// Event time minus receive time, seconds (positive: ahead).
    pub skew_secs: i64,
    pub measured_at: u64,
}

/// Stores a device's clock skew as measured now.
pub fn set_clock_skew(conn: &Connection, device: u32, skew_secs: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO device_clock (device_id, skew_secs, measured_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (device_id) DO UPDATE SET skew_secs = ?2, measured_at = ?3",
        params![i64::from(device), skew_secs, now()],
    )?;
    Ok(())
}

/// A device's last measured clock skew (seconds, positive: ahead).
pub(super) fn clock_skew_of(conn: &Connection, device: u32) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT skew_secs FROM device_clock WHERE device_id = ?1",
            [i64::from(device)],
            |r| r.get(0),
        )
        .optional()?)
}

/// Every device's last measured clock skew, by device.
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
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_skew_measured_again_replaces_the_last() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store
            .with(|c| {
                set_clock_skew(c, 7, 30)?;
                set_clock_skew(c, 3, -4)?;
                set_clock_skew(c, 7, 2)
            })
            .unwrap();
        let skews = store.with(|c| clock_skews(c)).unwrap();
        assert_eq!(
            skews
                .iter()
                .map(|s| (s.device, s.skew_secs))
                .collect::<Vec<_>>(),
            vec![(3, -4), (7, 2)]
        );
        assert!(skews.iter().all(|s| s.measured_at > 0));
        assert_eq!(store.with(|c| clock_skew_of(c, 7)).unwrap(), Some(2));
        assert_eq!(store.with(|c| clock_skew_of(c, 9)).unwrap(), None);
    }

    #[test]
    fn the_echo_detection_in_force_follows_what_each_member_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store
            .with(|c| {
                c.execute(
                    "INSERT INTO member_echo (grp, device_id, seen_at) VALUES ('g', 2, 40)",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        let in_force = |device, configured| {
            store
                .with(|c| echo_in_force(c, "g", device, configured))
                .unwrap()
        };
        assert_eq!(
            in_force(2, EchoDetection::Observe),
            InForce::ChangedOnDevice
        );
        assert_eq!(in_force(1, EchoDetection::Observe), InForce::OwnWrites);
        assert_eq!(in_force(2, EchoDetection::OwnWrites), InForce::OwnWrites);
        assert_eq!(
            in_force(1, EchoDetection::ChangedOnDevice),
            InForce::ChangedOnDevice
        );
        assert_eq!(
            store.with(|c| echo_observed(c, "g")).unwrap(),
            vec![(2, 40)]
        );
        assert_eq!(store.with(|c| echo_observed(c, "h")).unwrap(), vec![]);
    }
}
