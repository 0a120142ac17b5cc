//! Multi-master groups in `usersync status`, as an operator on call reads
//! them: per group, its members (journal position, pending, reconcile, the
//! echo detection in force, the clock), the own writes still expected, and
//! the conflicts the member reconcile left — a count and the first few;
//! `--json` lists every one.

use super::plural;
use crate::cli::MultiMasterStatus;
use crate::cli::status::{ClockStatus, MemberStatus};
use crate::cli::time::text_time;

/// Conflicts listed in text; `--json` has them all.
const CONFLICTS_SHOWN: usize = 5;

fn clock_text(c: &Option<ClockStatus>) -> String {
    let Some(c) = c else {
        return "not measured".to_owned();
    };
    let off = match c.skew_secs {
        0 => "in step".to_owned(),
        s if s > 0 => format!("{s} s ahead"),
        s => format!("{} s behind", s.unsigned_abs()),
    };
    if c.over_bound {
        format!("{off}, OVER")
    } else {
        off
    }
}

fn reconcile_text(m: &MemberStatus) -> String {
    match (&m.reconcile, m.reconcile_queued) {
        (Some(r), _) => r.state.clone(),
        (None, 0) => "-".to_owned(),
        (None, n) => format!("{n} queued"),
    }
}

/// One group's block.
pub(super) fn render_group(g: &MultiMasterStatus, running: bool, now: u64) -> String {
    let mut out = format!(
        "\nmulti-master group {} (max clock skew {} s{})",
        g.group,
        g.max_clock_skew_secs,
        if g.prune {
            "; prune: member order settles conflicts"
        } else {
            ""
        }
    );
    if g.started_at.is_none() {
        out.push_str(": not run by the daemon yet");
    } else if !running {
        out.push_str(": as last recorded (the daemon is not running)");
    }
    out.push('\n');
    out.push_str(&match g.echo_detection.as_str() {
        "observe" => "echo detection: each member on own writes until it reports changedOnDevice, then the flag\n"
            .to_owned(),
        configured => format!("echo detection: {configured} (configured)\n"),
    });
    out.push_str(&format!(
        "{:<12} {:>11} {:>8} {:<12} {:<18} {:<22} {}\n",
        "MEMBER", "JOURNAL-SEQ", "PENDING", "RECONCILE", "ECHO DETECTION", "CLOCK", "QUARANTINED"
    ));
    for m in &g.members {
        out.push_str(&format!(
            "{:<12} {:>11} {:>8} {:<12} {:<18} {:<22} {}\n",
            m.device,
            m.journal_seq.map_or("-".to_owned(), |c| c.to_string()),
            m.behind + m.reconcile_queued,
            reconcile_text(m),
            m.echo_in_force,
            clock_text(&m.clock),
            if m.quarantined.is_empty() {
                "-".to_owned()
            } else {
                m.quarantined.join(", ")
            }
        ));
    }
    let over: Vec<String> = g
        .members
        .iter()
        .filter(|m| m.clock.as_ref().is_some_and(|c| c.over_bound))
        .map(|m| m.device.to_string())
        .collect();
    if !over.is_empty() {
        out.push_str(&format!(
            "  clock OVER max_clock_skew_secs ({} s) at {}: set the device's clock (NTP) — changes are ordered by \
             device time\n",
            g.max_clock_skew_secs,
            over.join(" ")
        ));
    }
    for m in &g.members {
        if let Some(r) = &m.reconcile {
            out.push_str(&format!(
                "  reconcile {}: {} ({}); one pass covers every member\n",
                m.device, r.state, r.reason
            ));
        }
    }
    // One pass reconciles every member: its members' results share the
    // time and the reason, said once; members it queued nothing for are
    // left out.
    let mut passes: Vec<(&str, &str, Vec<String>)> = Vec::new();
    for m in &g.members {
        let Some(r) = &m.last_reconcile else {
            continue;
        };
        let pass = match passes
            .iter_mut()
            .position(|(at, why, _)| *at == r.finished_at && *why == r.reason)
        {
            Some(i) => &mut passes[i].2,
            None => {
                passes.push((&r.finished_at, &r.reason, Vec::new()));
                &mut passes.last_mut().expect("just pushed").2
            }
        };
        if r.missing + r.different + r.deleted > 0 {
            pass.push(format!(
                "{} {} missing, {} different, {} deleted",
                m.device, r.missing, r.different, r.deleted
            ));
        }
    }
    for (at, why, members) in passes {
        out.push_str(&format!(
            "  last reconcile: finished {} — {why}: {}\n",
            text_time(&Some(at.to_owned()), now),
            if members.is_empty() {
                "nothing queued".to_owned()
            } else {
                members.join("; ")
            }
        ));
    }
    if g.own_writes_expected > 0 {
        out.push_str(&format!(
            "  own writes expected back: {} (events of the daemon's writes, taken for its own, not for changes)\n",
            g.own_writes_expected
        ));
    }
    if g.conflicts.is_empty() {
        if g.started_at.is_some() {
            out.push_str("  conflicts: none\n");
        }
        return out;
    }
    out.push_str(&format!(
        "  conflicts: {} that members hold in different versions, with no history to say which is the last \
         change; left as they are — change the user at one member to settle it{}:\n",
        plural(g.conflict_count, "user"),
        if g.prune {
            ""
        } else {
            " (or set prune = true to let member order decide)"
        }
    ));
    for c in g.conflicts.iter().take(CONFLICTS_SHOWN) {
        out.push_str(&format!(
            "    user {}: {} — found {}\n",
            c.user_id,
            c.detail,
            text_time(&Some(c.found_at.clone()), now)
        ));
    }
    if g.conflicts.len() > CONFLICTS_SHOWN {
        out.push_str(&format!(
            "    … and {} more: `usersync status --json` lists every one\n",
            g.conflicts.len() - CONFLICTS_SHOWN
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::status::{ConflictStatus, MemberReconcile};
    use crate::cli::time::rfc3339;

    fn member(device: u32, clock: Option<(i64, bool)>) -> MemberStatus {
        MemberStatus {
            device,
            echo_in_force: "own-writes".into(),
            echo_flag_seen_at: None,
            clock: clock.map(|(skew_secs, over_bound)| ClockStatus {
                skew_secs,
                measured_at: rfc3339(1_000),
                over_bound,
            }),
            journal_seq: Some(7),
            behind: 1,
            reconcile_queued: 2,
            reconcile: None,
            last_reconcile: None,
            quarantined: Vec::new(),
        }
    }

    fn group(conflicts: usize) -> MultiMasterStatus {
        MultiMasterStatus {
            group: "desks".into(),
            echo_detection: "observe".into(),
            max_clock_skew_secs: 10,
            prune: false,
            started_at: Some(rfc3339(1_000)),
            own_writes_expected: 3,
            conflict_count: conflicts as u64,
            conflicts: (0..conflicts)
                .map(|i| ConflictStatus {
                    user_id: format!("u{i}"),
                    detail: "[1] hold one version (10 bytes); [2] hold one version (12 bytes)"
                        .into(),
                    found_at: rfc3339(1_000),
                })
                .collect(),
            members: vec![
                member(1, Some((120, true))),
                member(2, Some((-3, false))),
                member(3, None),
            ],
        }
    }

    #[test]
    fn conflicts_are_counted_and_the_first_few_listed() {
        let text = render_group(&group(7), true, 2_000);
        assert!(
            text.contains("conflicts: 7 users that members hold in different versions"),
            "{text}"
        );
        assert!(text.contains("(or set prune = true"), "{text}");
        for i in 0..CONFLICTS_SHOWN {
            assert!(text.contains(&format!("    user u{i}: [1] hold one version (10 bytes)")));
        }
        assert!(!text.contains("user u5:"), "{text}");
        assert!(
            text.contains("… and 2 more: `usersync status --json` lists every one"),
            "{text}"
        );
        let text = render_group(&group(0), true, 2_000);
        assert!(text.contains("  conflicts: none\n"), "{text}");
    }

    #[test]
    fn members_show_echo_detection_clock_and_pending() {
        let text = render_group(&group(0), true, 2_000);
        assert!(
            text.contains("multi-master group desks (max clock skew 10 s)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "echo detection: each member on own writes until it reports changedOnDevice"
            ),
            "{text}"
        );
        let row = |d: u32| {
            text.lines()
                .find(|l| l.starts_with(&format!("{d:<12} ")))
                .unwrap_or_else(|| panic!("no row for {d}: {text}"))
                .to_owned()
        };
        assert!(row(1).contains("120 s ahead, OVER"), "{text}");
        assert!(row(1).contains("own-writes"), "{text}");
        // PENDING: journal backlog and queued users.
        assert!(row(1).contains("          7        3 2 queued"), "{text}");
        assert!(row(2).contains("3 s behind") && !row(2).contains("OVER"));
        assert!(row(3).contains("not measured"));
        assert!(
            text.contains("clock OVER max_clock_skew_secs (10 s) at 1: set the device's clock"),
            "{text}"
        );
        assert!(text.contains("own writes expected back: 3"), "{text}");
        assert!(!text.contains("not running"), "{text}");
    }

    #[test]
    fn a_stopped_daemon_and_a_member_reconcile_are_said() {
        let mut g = group(0);
        g.echo_detection = "changed-on-device".into();
        g.members[0].last_reconcile = Some(MemberReconcile {
            finished_at: rfc3339(1_000),
            reason: "requested by the operator".into(),
            missing: 2,
            different: 1,
            deleted: 4,
        });
        g.members[1].last_reconcile = Some(MemberReconcile {
            finished_at: rfc3339(1_000),
            reason: "requested by the operator".into(),
            missing: 0,
            different: 0,
            deleted: 0,
        });
        let text = render_group(&g, false, 2_000);
        assert!(
            text.contains("as last recorded (the daemon is not running)"),
            "{text}"
        );
        assert!(
            text.contains("echo detection: changed-on-device (configured)"),
            "{text}"
        );
        assert!(
            text.contains(
                "last reconcile: finished 1970-01-01 00:16:40Z (16m ago) — requested by the operator: \
                 1 2 missing, 1 different, 4 deleted\n"
            ),
            "{text}"
        );
        g.started_at = None;
        let text = render_group(&g, true, 2_000);
        assert!(text.contains(": not run by the daemon yet"), "{text}");
        assert!(!text.contains("conflicts"), "{text}");
    }
}
