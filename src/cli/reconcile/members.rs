//! Multi-master members in `usersync reconcile`: only the daemon runs a
//! member reconcile (it decides by the journal's history of each user,
//! which only the daemon keeps current), so here they are requests to the
//! running daemon, and otherwise what to say: why not with the daemon
//! stopped, why not `--prune`, why no dry-run plan.

use super::{NotPlanned, Picked};
use crate::cli::CliError;
use crate::config::{Config, GroupConfig};
use crate::store::Store;

/// `--group G [--target T]`, to run a reconcile of `g` again.
pub(super) fn again(g: &GroupConfig, target: Option<u32>) -> String {
    match target {
        Some(t) => format!("usersync reconcile --group {} --target {t}", g.name),
        None => format!("usersync reconcile --group {}", g.name),
    }
}

/// "group desks is", "groups desks and halls are".
pub(super) fn groups_are(picked: &Picked<'_>) -> String {
    let names: Vec<&str> = picked.iter().map(|(g, _)| g.name.as_str()).collect();
    match names.as_slice() {
        [one] => format!("group {one} is"),
        [rest @ .., last] => format!("groups {} and {last} are", rest.join(", ")),
        [] => "no group is".to_owned(),
    }
}

/// Why a multi-master reconcile is not run with the daemon stopped, and
/// how to have it run.
pub(super) fn needs_daemon(config: &Config, members: &Picked<'_>, target: Option<u32>) -> String {
    format!(
        "{} multi-master: a member reconcile decides by the journal's history (which change of each user came \
         last), which only the daemon keeps, so it runs in the daemon — and the daemon is not running; nothing \
         was changed there. Start it (`sudo systemctl start usersync`, or `usersync run --config {}` in the \
         foreground), then run {} again",
        groups_are(members),
        config.path.display(),
        members
            .iter()
            .map(|(g, _)| format!("`{}`", again(g, target)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Why `--prune` does not apply to multi-master groups.
pub(super) fn prune_not_for_members(members: &Picked<'_>) -> String {
    format!(
        "--prune does not apply to multi-master {}: a member reconcile deletes only users whose delete the journal \
         records, and otherwise copies the union of the members' users (`prune = true` in the group lets member \
         order settle the versions no history decides); nothing requested: run it without --prune",
        match members.as_slice() {
            [(g, _)] => format!("group {}", g.name),
            _ => format!(
                "groups {}",
                members
                    .iter()
                    .map(|(g, _)| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    )
}

/// Writes reconcile requests for a multi-master group's members, which
/// the daemon's member reconcile serves: one pass over every member,
/// whichever of them asked.
pub(super) fn request_members(
    config: &Config,
    st: &Store,
    g: &GroupConfig,
    members: &[u32],
    prune: bool,
) -> Result<String, CliError> {
    for m in members {
        // The request's prune is not a member reconcile's (the group's
        // `prune` is); recorded as the group has it.
        st.request_reconcile(&g.name, *m, "requested by the operator", g.prune)?;
    }
    let asked = members
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    Ok(format!(
        "reconcile of multi-master group {} requested from the running daemon ({} {asked}); it starts within {} \
         s, once every member is live, and one pass covers every member of the group{} — `usersync status` shows \
         its result and the group's conflicts",
        g.name,
        if members.len() == 1 {
            "member"
        } else {
            "members"
        },
        config.sync.poll_interval.as_secs(),
        if prune {
            " (--prune applies to one-way targets only)"
        } else {
            ""
        }
    ))
}

/// Why a dry run has no plan for a multi-master group.
const NO_MEMBER_PLAN: &str = "a multi-master reconcile is decided in the daemon by the journal's history of \
    each user (which change came last), so a dry run cannot say what it would do";

/// A dry run of multi-master groups only: why there is no plan, and what
/// to look at instead.
pub(super) fn no_plan(members: &Picked<'_>, target: Option<u32>) -> String {
    format!(
        "no plan: {} multi-master, and {NO_MEMBER_PLAN}. `usersync status` shows its conflicts (the users the last \
         member reconcile could not decide); {} asks the running daemon to reconcile it",
        groups_are(members),
        members
            .iter()
            .map(|(g, _)| format!("`{}`", again(g, target)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The multi-master groups of a dry run that also plans one-way targets.
pub(super) fn not_planned(members: &Picked<'_>, target: Option<u32>) -> Vec<NotPlanned> {
    members
        .iter()
        .map(|(g, devices)| NotPlanned {
            group: g.name.clone(),
            members: devices.clone(),
            reason: format!(
                "{NO_MEMBER_PLAN}; `{}` asks the running daemon for it",
                again(g, target)
            ),
        })
        .collect()
}
