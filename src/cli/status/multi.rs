//! Multi-master groups in `usersync status`: per group, the users its
//! member reconcile found in different versions with no history to decide
//! (conflicts), the daemon's own writes whose events it still expects, and
//! per member its journal position, reconcile, the echo detection in force
//! and its clock against the daemon's. User IDs, device IDs, counts, sizes
//! and times only: never a record.

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde::Serialize;

use super::{Lanes, ReconcileProgress};
use crate::cli::time::rfc3339;
use crate::config::{Config, EchoDetection};
use crate::store::multi::{self, ClockSkew, Conflict};
use crate::store::{ReconcileResult, StoreError};
use crate::sync::multi::order::InForce;

#[derive(Debug, Serialize)]
pub struct MultiMasterStatus {
    pub group: String,
    /// As configured: `changed-on-device`, `own-writes`, or `observe`
    /// (not set: per member, own writes until it reports
    /// `changedOnDevice`, then the flag).
    pub echo_detection: String,
    pub max_clock_skew_secs: u64,
    /// `prune = true`: member order settles what no history decides.
    pub prune: bool,
    /// When the daemon first ran the group as multi-master (`null`: not
    /// yet).
    pub started_at: Option<String>,
    /// Writes of the daemon to members whose events it still expects (and
    /// will take for its own, not for changes).
    pub own_writes_expected: u64,
    /// Users whose versions differ between members and that no history
    /// decides, as the last member reconcile found them; a change of the
    /// user at a member settles it.
    pub conflict_count: u64,
    /// Every one of them, by user ID.
    pub conflicts: Vec<ConflictStatus>,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConflictStatus {
    pub user_id: String,
    /// Which members hold which version: device IDs and sizes only.
    pub detail: String,
    pub found_at: String,
}

#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub device: u32,
    /// How this member's events are told from the daemon's own writes
    /// now: `changed-on-device` or `own-writes`.
    pub echo_in_force: String,
    /// When it first reported an event with `changedOnDevice` (`null`:
    /// never, or `echo_detection` is configured).
    pub echo_flag_seen_at: Option<String>,
    /// Its clock as last measured from its realtime events (`null`: not
    /// measured yet).
    pub clock: Option<ClockStatus>,
    /// The last change-journal entry the member has applied (not a device
    /// event ID).
    pub journal_seq: Option<u64>,
    /// Journal entries not applied to it yet.
    pub behind: u64,
    /// Users a reconcile (or an older change) queued for it alone.
    pub reconcile_queued: u64,
    pub reconcile: Option<ReconcileProgress>,
    pub last_reconcile: Option<MemberReconcile>,
    pub quarantined: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ClockStatus {
    /// Its clock minus the daemon's, seconds (positive: ahead).
    pub skew_secs: i64,
    pub measured_at: String,
    /// Further off than `max_clock_skew_secs`.
    pub over_bound: bool,
}

/// What the last member reconcile did at one member.
#[derive(Debug, Serialize)]
pub struct MemberReconcile {
    pub finished_at: String,
    pub reason: String,
    /// Users the member lacked, queued to be copied there.
    pub missing: u64,
    /// Users it held in another version, queued to be overwritten.
    pub different: u64,
    /// Users it held whose delete the journal records, queued to be
    /// deleted there.
    pub deleted: u64,
}

/// What the state database holds about multi-master groups.
pub(super) struct Rows {
    conflicts: Vec<Conflict>,
    skews: Vec<ClockSkew>,
    groups: BTreeMap<String, GroupRows>,
}

struct GroupRows {
    started_at: Option<i64>,
    own_writes: u64,
    /// Per member: the detection in force, when it reported the flag.
    echo: BTreeMap<u32, (InForce, Option<u64>)>,
}

pub(super) fn read(conn: &Connection, config: &Config) -> Result<Rows, StoreError> {
    let mut groups = BTreeMap::new();
    for g in &config.groups {
        let Some(mm) = g.multi_master() else {
            continue;
        };
        let seen: BTreeMap<u32, u64> = multi::echo_observed(conn, &g.name)?.into_iter().collect();
        let mut echo = BTreeMap::new();
        for m in &mm.members {
            let in_force = multi::echo_in_force(conn, &g.name, *m, mm.echo)?;
            echo.insert(*m, (in_force, seen.get(m).copied()));
        }
        groups.insert(
            g.name.clone(),
            GroupRows {
                started_at: multi::started_at(conn, &g.name)?,
                own_writes: multi::own_writes_expected(conn, &g.name)?,
                echo,
            },
        );
    }
    Ok(Rows {
        conflicts: multi::conflicts(conn)?,
        skews: multi::clock_skews(conn)?,
        groups,
    })
}

fn echo_word(e: EchoDetection) -> &'static str {
    match e {
        EchoDetection::ChangedOnDevice => "changed-on-device",
        EchoDetection::OwnWrites => "own-writes",
        EchoDetection::Observe => "observe",
    }
}

fn in_force_word(e: InForce) -> &'static str {
    match e {
        InForce::ChangedOnDevice => "changed-on-device",
        InForce::OwnWrites => "own-writes",
    }
}

fn member_reconcile(r: &ReconcileResult) -> MemberReconcile {
    MemberReconcile {
        finished_at: rfc3339(r.finished_at),
        reason: r.reason.clone(),
        missing: r.missing,
        different: r.different,
        // A member reconcile records its deletions (tombstones) as both.
        deleted: r.pruned,
    }
}

pub(super) fn groups(config: &Config, rows: Rows, lanes: &Lanes) -> Vec<MultiMasterStatus> {
    let mut out = Vec::new();
    for g in &config.groups {
        let Some(mm) = g.multi_master() else {
            continue;
        };
        let name = g.name.as_str();
        let bound = mm.max_clock_skew.as_secs();
        let recorded = rows.groups.get(name);
        let conflicts: Vec<ConflictStatus> = rows
            .conflicts
            .iter()
            .filter(|c| c.group == name)
            .map(|c| ConflictStatus {
                user_id: c.user_id.clone(),
                detail: c.detail.clone(),
                found_at: rfc3339(c.found_at),
            })
            .collect();
        let members = mm
            .members
            .iter()
            .map(|m| {
                let (in_force, seen) = recorded
                    .and_then(|r| r.echo.get(m).copied())
                    .unwrap_or((InForce::OwnWrites, None));
                MemberStatus {
                    device: *m,
                    echo_in_force: in_force_word(in_force).into(),
                    echo_flag_seen_at: seen.map(rfc3339),
                    clock: rows
                        .skews
                        .iter()
                        .find(|s| s.device == *m)
                        .map(|s| ClockStatus {
                            skew_secs: s.skew_secs,
                            measured_at: rfc3339(s.measured_at),
                            over_bound: s.skew_secs.unsigned_abs() > bound,
                        }),
                    journal_seq: lanes.journal_seq(name, *m),
                    behind: lanes.behind(name, *m),
                    reconcile_queued: lanes.queued(name, *m),
                    reconcile: lanes.reconcile(name, *m),
                    last_reconcile: lanes.result(name, *m).map(member_reconcile),
                    quarantined: lanes.quarantined(name, *m),
                }
            })
            .collect();
        out.push(MultiMasterStatus {
            group: g.name.clone(),
            echo_detection: echo_word(mm.echo).into(),
            max_clock_skew_secs: bound,
            prune: g.prune,
            started_at: recorded
                .and_then(|r| r.started_at)
                .and_then(|t| u64::try_from(t).ok())
                .map(rfc3339),
            own_writes_expected: recorded.map_or(0, |r| r.own_writes),
            conflict_count: conflicts.len() as u64,
            conflicts,
            members,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::multi::MemberOp;

    fn config() -> Config {
        crate::config::fixtures::desks_and_doors()
    }

    fn lanes(results: Vec<ReconcileResult>) -> Lanes {
        Lanes {
            cursors: BTreeMap::new(),
            backlog: BTreeMap::new(),
            pending: BTreeMap::new(),
            quarantine: Vec::new(),
            requests: Vec::new(),
            results,
        }
    }

    #[test]
    fn what_the_state_holds_of_a_multi_master_group() {
        let tmp = tempfile::tempdir().unwrap();
        let st = Store::open(tmp.path()).unwrap();
        let config = config();
        st.with(|c| {
            multi::mark_started(c, "desks")?;
            let tx = c.transaction()?;
            multi::set_conflicts(
                &tx,
                "desks",
                &[
                    ("x".into(), "[1] hold one version (5 bytes)".into()),
                    ("y".into(), "[2] hold one version (6 bytes)".into()),
                ],
            )?;
            multi::expect_own_writes(&tx, "desks", &[2], &["u".into()], MemberOp::Upsert)?;
            tx.execute(
                "INSERT INTO member_echo (grp, device_id, seen_at) VALUES ('desks', 2, 50)",
                [],
            )?;
            tx.commit()?;
            multi::set_clock_skew(c, 1, -9)?;
            multi::set_clock_skew(c, 2, 3)?;
            // Not a member: not shown.
            multi::set_clock_skew(c, 3, 100)?;
            Ok(())
        })
        .unwrap();
        let rows = st.with(|c| read(c, &config)).unwrap();
        let result = ReconcileResult {
            group: "desks".into(),
            target: 2,
            reason: "new member".into(),
            finished_at: 60,
            missing: 1,
            different: 2,
            extra: 3,
            pruned: 3,
        };
        let out = groups(&config, rows, &lanes(vec![result]));
        assert_eq!(out.len(), 1, "one multi-master group");
        let g = &out[0];
        assert_eq!(
            (
                g.group.as_str(),
                g.echo_detection.as_str(),
                g.max_clock_skew_secs
            ),
            ("desks", "observe", 7)
        );
        assert!(g.started_at.is_some());
        assert_eq!(g.own_writes_expected, 1);
        assert_eq!(g.conflict_count, 2);
        assert_eq!(
            g.conflicts
                .iter()
                .map(|c| (c.user_id.as_str(), c.detail.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("x", "[1] hold one version (5 bytes)"),
                ("y", "[2] hold one version (6 bytes)")
            ]
        );
        let (m1, m2) = (&g.members[0], &g.members[1]);
        assert_eq!((m1.device, m2.device), (1, 2));
        // Member 2 reported the flag: it is judged by it now.
        assert_eq!(m1.echo_in_force, "own-writes");
        assert_eq!(m1.echo_flag_seen_at, None);
        assert_eq!(m2.echo_in_force, "changed-on-device");
        assert_eq!(
            m2.echo_flag_seen_at.as_deref(),
            Some("1970-01-01T00:00:50Z")
        );
        let c1 = m1.clock.as_ref().unwrap();
        assert_eq!(
            (c1.skew_secs, c1.over_bound),
            (-9, true),
            "9 s behind, bound 7"
        );
        let c2 = m2.clock.as_ref().unwrap();
        assert_eq!((c2.skew_secs, c2.over_bound), (3, false));
        assert!(m1.last_reconcile.is_none());
        let r = m2.last_reconcile.as_ref().unwrap();
        assert_eq!((r.missing, r.different, r.deleted), (1, 2, 3));
    }

    #[test]
    fn a_group_the_daemon_never_ran_shows_its_configuration_only() {
        let tmp = tempfile::tempdir().unwrap();
        let st = Store::open(tmp.path()).unwrap();
        let config = config();
        let rows = st.with(|c| read(c, &config)).unwrap();
        let g = &groups(&config, rows, &lanes(Vec::new()))[0];
        assert_eq!(g.started_at, None);
        assert_eq!((g.conflict_count, g.own_writes_expected), (0, 0));
        assert!(g.members.iter().all(|m| m.clock.is_none()
            && m.journal_seq.is_none()
            && m.echo_in_force == "own-writes"));
    }
}
