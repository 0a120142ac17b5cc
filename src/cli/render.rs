//! The commands' output: pretty JSON for `--json`, and the text an
//! operator reads. Data comes in already gathered; nothing here calls a
//! device or the state database. Users are counts and sizes, never bytes.

use serde::Serialize;

use super::time::{fmt_utc, text_time, unix_now};
use super::{EventLine, KeptUser, Plan, Status, TargetStatus, UserSummary, UsersOutput};

mod multi;

/// Pretty JSON for `--json` output.
pub fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// "1 user", "2 users".
pub fn plural(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

const JOURNAL_SEQ: &str = "JOURNAL-SEQ: the last entry of usersync's change journal a device has applied (not a device event ID)\n";

pub fn render_status(s: &Status) -> String {
    let now = unix_now();
    let mut out = String::new();
    let d = &s.daemon;
    out.push_str(&if d.running {
        format!(
            "daemon:  running{}\n",
            match (d.pid, &d.started_at) {
                (Some(pid), Some(_)) => format!(
                    " (pid {pid}, started {})",
                    text_time(&d.started_at, now)
                ),
                _ => String::new(),
            }
        )
    } else {
        match (&d.stopped_at, &d.last_seen) {
            (Some(_), _) => format!("daemon:  stopped {}\n", text_time(&d.stopped_at, now)),
            (None, Some(_)) => format!(
                "daemon:  not running: last seen {}, with no orderly stop recorded (killed or crashed?) — \
                 `systemctl status usersync`, `journalctl -u usersync`\n",
                text_time(&d.last_seen, now)
            ),
            (None, None) => "daemon:  stopped\n".to_owned(),
        }
    });
    let g = &s.gateway;
    let state = match g.state.as_str() {
        "down" => "DOWN",
        other => other,
    };
    out.push_str(&format!("gateway: {} {state}", g.address));
    if g.since.is_some() {
        out.push_str(&format!(" since {}", text_time(&g.since, now)));
    }
    if !g.current && g.as_of.is_some() {
        out.push_str(&format!(
            " — last known, as of {}",
            text_time(&g.as_of, now)
        ));
    }
    out.push('\n');
    if let Some(e) = &g.error {
        out.push_str(&format!("         {e}\n"));
    }
    if let Some(n) = &g.next_step {
        out.push_str(&format!("         next: {n}\n"));
    }
    out.push_str(&format!("state:   {}\n\n", s.state));
    if !d.running && !s.devices.is_empty() {
        out.push_str("devices as last known (the daemon is not running):\n");
    }
    out.push_str(&format!(
        "{:<12} {:<7} {:<15} {:>10} {:>10} {:>6}  {}\n",
        "DEVICE", "ROLE", "STATE", "CHECKPOINT", "NEWEST", "LAG", "UPDATED"
    ));
    let opt = |v: Option<u32>| v.map_or("-".to_owned(), |v| v.to_string());
    for dv in &s.devices {
        let state = if dv.current || dv.state == "unknown" {
            dv.state.clone()
        } else {
            format!("was {}", dv.state)
        };
        out.push_str(&format!(
            "{:<12} {:<7} {:<15} {:>10} {:>10} {:>6}  {}\n",
            dv.id,
            dv.role,
            state,
            opt(dv.checkpoint),
            opt(dv.newest_seen),
            opt(dv.lag),
            text_time(&dv.updated, now)
        ));
    }
    // A site of multi-master groups only has no target table.
    let target_table = !s.targets.is_empty() || s.multi_master.is_empty();
    if target_table {
        out.push_str(&format!(
            "\n{:<12} {:<12} {:>11} {:>8} {:<12} {}\n",
            "GROUP", "TARGET", "JOURNAL-SEQ", "PENDING", "RECONCILE", "QUARANTINED"
        ));
        for t in &s.targets {
            let reconcile = match (&t.reconcile, t.reconcile_queued) {
                (Some(r), _) => r.state.clone(),
                (None, 0) => "-".to_owned(),
                (None, n) => format!("{n} queued"),
            };
            out.push_str(&format!(
                "{:<12} {:<12} {:>11} {:>8} {:<12} {}\n",
                t.group,
                t.target,
                t.journal_seq.map_or("-".to_owned(), |c| c.to_string()),
                t.behind + t.reconcile_queued,
                reconcile,
                if t.quarantined.is_empty() {
                    "-".to_owned()
                } else {
                    t.quarantined.join(", ")
                }
            ));
        }
        out.push_str(JOURNAL_SEQ);
    }
    let results: Vec<&TargetStatus> = s
        .targets
        .iter()
        .filter(|t| t.last_reconcile.is_some() || t.reconcile.is_some())
        .collect();
    if !results.is_empty() {
        out.push_str("\nreconcile:\n");
        for t in results {
            if let Some(r) = &t.reconcile {
                out.push_str(&format!(
                    "  {}/{}: {} ({}{}){}\n",
                    t.group,
                    t.target,
                    r.state,
                    r.reason,
                    if r.prune { ", prune" } else { "" },
                    r.after_user
                        .as_ref()
                        .map_or(String::new(), |u| format!(", done up to user {u}"))
                ));
            }
            if let Some(r) = &t.last_reconcile {
                out.push_str(&format!(
                    "  {}/{}: last finished {}, {}: {} missing, {} different, {} extra, {} pruned\n",
                    t.group,
                    t.target,
                    text_time(&Some(r.finished_at.clone()), now),
                    r.reason,
                    r.missing,
                    r.different,
                    r.extra,
                    r.pruned
                ));
            }
        }
    }
    let drifting: Vec<&TargetStatus> = s.targets.iter().filter(|t| t.drift.is_some()).collect();
    if !drifting.is_empty() {
        out.push_str(
            "\ndrift (users changed at a target itself, which the daemon does not copy):\n",
        );
        for t in drifting {
            if let Some(d) = &t.drift {
                out.push_str(&format!(
                    "  {}/{}: {} since its last reconcile (last: user {} at {}); `{}` restores the sources' \
                     users there (add --prune to also delete users no source has)\n",
                    t.group,
                    t.target,
                    plural(d.changes, "user change"),
                    d.last_user,
                    text_time(&Some(d.last_at.clone()), now),
                    d.fix
                ));
            }
        }
    }
    for g in &s.multi_master {
        out.push_str(&multi::render_group(g, d.running, now));
    }
    if !target_table {
        out.push('\n');
        out.push_str(JOURNAL_SEQ);
    }
    for (g, why) in &s.diverged {
        out.push_str(&format!("\ngroup {g} diverged: {why}\n"));
    }
    out
}

pub fn render_events(device: u32, since: Option<u32>, lines: &[EventLine]) -> String {
    if lines.is_empty() {
        return match since {
            Some(id) => format!("no events on device {device} from event {id} on\n"),
            None => format!("no events on device {device}: its log is empty\n"),
        };
    }
    lines
        .iter()
        .map(|l| {
            let user = if l.user.is_empty() {
                String::new()
            } else {
                format!(", User {}", l.user)
            };
            format!(
                "#{:<8} {}  Device {}{}, {}{}\n",
                l.id,
                fmt_utc(l.timestamp),
                l.device,
                user,
                l.description,
                if l.changed_on_device {
                    " (at the device)"
                } else {
                    ""
                }
            )
        })
        .collect()
}

pub fn render_users(o: &UsersOutput) -> String {
    match o {
        UsersOutput::List { device, users } if users.is_empty() => {
            format!("no users on device {device}\n")
        }
        UsersOutput::List { device, users } => {
            let mut s = format!(
                "{} on device {device}\n",
                plural(u64::try_from(users.len()).unwrap_or(u64::MAX), "user")
            );
            for u in users {
                s.push_str(&format!("  {u}\n"));
            }
            s
        }
        UsersOutput::One(u) => format!(
            "user {}\n  name:          {}\n  cards:         {}\n  fingers:       {}\n  faces:         {}\n  access groups: {}\n  PIN:           {}\n  photo:         {} bytes\n  record:        {} bytes{}\n",
            u.id,
            u.name,
            u.cards,
            u.fingers,
            u.faces,
            if u.access_groups.is_empty() {
                "-".to_owned()
            } else {
                u.access_groups
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            if u.has_pin { "set" } else { "none" },
            u.photo_bytes,
            u.record_bytes,
            match u.disabled {
                Some(true) => "\n  status:        disabled",
                _ => "",
            }
        ),
    }
}

/// What a user holds, in words ("2 fingers, 1 face, a PIN, a photo").
pub(super) fn holdings(s: &UserSummary) -> String {
    let mut parts = vec![plural(s.cards as u64, "card")];
    if s.fingers > 0 {
        parts.push(plural(s.fingers as u64, "finger"));
    }
    if s.faces > 0 {
        parts.push(plural(s.faces as u64, "face"));
    }
    if s.has_pin {
        parts.push("a PIN".into());
    }
    if s.photo_bytes > 0 {
        parts.push("a photo".into());
    }
    if !s.access_groups.is_empty() {
        parts.push(plural(s.access_groups.len() as u64, "access group"));
    }
    if !s.name.is_empty() {
        parts.push(format!("name {:?}", s.name));
    }
    parts.join(", ")
}

pub(super) fn not_reconciled_text(plan: &Plan) -> String {
    plan.not_reconciled
        .iter()
        .map(|n| {
            format!(
                "not reconciled: group {} target {}: {}; {}\n",
                n.group, n.target, n.reason, n.next
            )
        })
        .collect()
}

pub(super) fn kept_text(kept: &[KeptUser]) -> String {
    kept.iter()
        .map(|k| format!("{} ({})", k.user, k.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn render_plan(plan: &Plan) -> String {
    let mut s = String::new();
    for p in &plan.targets {
        s.push_str(&format!(
            "group {} target {}: {} missing, {} different, {} extra{}\n",
            p.group,
            p.target,
            p.missing.len(),
            p.different.len(),
            p.extra.len(),
            if p.extra.is_empty() {
                String::new()
            } else if !p.prune {
                " (kept: prune is off)".to_owned()
            } else if p.prune_refused.is_some() {
                " (kept: prune refused)".to_owned()
            } else if p.kept.is_empty() {
                " (would be deleted)".to_owned()
            } else {
                format!(
                    " ({} would be deleted, {} kept)",
                    p.delete.len(),
                    p.kept.len()
                )
            }
        ));
        for (what, users) in [("enroll", &p.missing), ("overwrite", &p.different)] {
            if !users.is_empty() {
                s.push_str(&format!("  {what}: {}\n", users.join(" ")));
            }
        }
        if !p.extra.is_empty() {
            match (&p.prune_refused, p.prune) {
                (_, false) => s.push_str(&format!(
                    "  keep (no source has them; --prune deletes them): {}\n",
                    p.extra.join(" ")
                )),
                (Some(why), true) => s.push_str(&format!(
                    "  keep (prune refused: {why}): {}\n",
                    p.extra.join(" ")
                )),
                (None, true) => {
                    if !p.delete.is_empty() {
                        s.push_str(&format!("  delete: {}\n", p.delete.join(" ")));
                    }
                    if !p.kept.is_empty() {
                        s.push_str(&format!(
                            "  keep (no source lists them, but not every source says it lacks them): {}\n",
                            kept_text(&p.kept)
                        ));
                    }
                }
            }
        }
        for u in &p.unreadable_at_sources {
            s.push_str(&format!(
                "  source {} lists {} that cannot be read: those users are neither copied nor judged\n",
                u.source,
                plural(u.headers as u64, "user header")
            ));
        }
    }
    for n in &plan.not_planned {
        s.push_str(&format!(
            "group {} (multi-master, {} {}): not planned: {}\n",
            n.group,
            if n.members.len() == 1 {
                "member"
            } else {
                "members"
            },
            n.members
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            n.reason
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals() {
        assert_eq!(plural(1u64, "user"), "1 user");
        assert_eq!(plural(2u64, "user"), "2 users");
        assert_eq!(plural(0u64, "target"), "0 targets");
    }
}
