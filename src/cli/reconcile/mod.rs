//! `usersync reconcile`: targets made to hold their sources' users —
//! through the running daemon (a request it picks up), or here when it is
//! stopped. A prune that deletes users says how many and asks first.
//!
//! Members of a multi-master group are reconciled by the daemon only: its
//! member reconcile decides by the journal's history (which change of each
//! user came last), which only the daemon keeps current. Here they are
//! requests to the running daemon, refused with the daemon stopped, and
//! not planned by a dry run; a selection of both kinds handles each as its
//! own.

use std::io::IsTerminal;

use crate::cli::render::not_reconciled_text;
use crate::cli::{
    CliError, Daemon, client, configured, daemon, describe, json, plural, render_plan,
};
use crate::config::{Config, GroupConfig};
use crate::store::Store;

mod members;
mod plan;
mod sources;
mod write;

use members::{needs_daemon, prune_not_for_members, request_members};
use plan::plan;
pub use plan::{
    KeptUser, NotPlanned, NotReconciled, Plan, TargetPlan, UnreadableHeaders, reconcile_plan,
};
use write::reconcile_here;

/// Groups and the devices of each a reconcile addresses.
type Picked<'c> = Vec<(&'c GroupConfig, Vec<u32>)>;

/// What a reconcile addresses, by kind of group.
struct Selection<'c> {
    /// One-way groups and their targets: planned and written here with
    /// the daemon stopped, or requested from it.
    one_way: Picked<'c>,
    /// Multi-master groups and their members: requested from the running
    /// daemon only.
    members: Picked<'c>,
}

/// The groups and targets (or members) a reconcile addresses.
fn selection<'c>(
    config: &'c Config,
    group: Option<&str>,
    target: Option<u32>,
) -> Result<Selection<'c>, CliError> {
    let groups: Vec<&GroupConfig> = config
        .groups
        .iter()
        .filter(|g| group.is_none_or(|n| n == g.name))
        .collect();
    if groups.is_empty() {
        let names: Vec<&str> = config.groups.iter().map(|g| g.name.as_str()).collect();
        return Err(CliError::Usage(match group {
            Some(g) => format!(
                "no group {g:?} in the configuration {}; its groups: {}",
                config.path.display(),
                if names.is_empty() {
                    "(none)".to_owned()
                } else {
                    names.join(" ")
                }
            ),
            None => format!("the configuration {} has no group", config.path.display()),
        }));
    }
    let Some(t) = target else {
        let (multi, one_way): (Vec<&GroupConfig>, Vec<&GroupConfig>) =
            groups.into_iter().partition(|g| g.multi_master().is_some());
        return Ok(Selection {
            one_way: one_way
                .into_iter()
                .map(|g| (g, g.targets.clone()))
                .collect(),
            members: multi
                .into_iter()
                .map(|g| (g, g.members().to_vec()))
                .collect(),
        });
    };
    configured(config, t)?;
    let picked = |of: fn(&GroupConfig) -> &[u32]| -> Picked<'c> {
        groups
            .iter()
            .filter(|g| of(g).contains(&t))
            .map(|g| (*g, vec![t]))
            .collect()
    };
    let sel = Selection {
        one_way: picked(|g| &g.targets),
        members: picked(|g| g.members()),
    };
    if sel.one_way.is_empty() && sel.members.is_empty() {
        let what = match config.groups.iter().find(|g| g.sources.contains(&t)) {
            Some(g) => format!(
                "device {t} is a source of group {}, not a target: a reconcile writes targets only",
                g.name
            ),
            None => format!(
                "device {t} is neither a target nor a multi-master member of {}",
                group.map_or("any group".to_owned(), |g| format!("group {g}"))
            ),
        };
        return Err(CliError::Usage(what));
    }
    Ok(sel)
}

/// Asks before a prune deletes users: on a terminal, the operator types
/// `yes`; elsewhere only `--yes` confirms.
async fn confirm_prune(plan: &Plan, yes: bool) -> Result<(), CliError> {
    let (users, targets) = plan.deletions();
    if users == 0 || yes {
        return Ok(());
    }
    let list: String = plan
        .targets
        .iter()
        .filter(|p| p.prunes() && !p.delete.is_empty())
        .map(|p| {
            format!(
                "  group {} target {}: {}\n",
                p.group,
                p.target,
                p.delete.join(" ")
            )
        })
        .collect();
    let what = format!(
        "this reconcile deletes {} from {} (users no source of the group has):\n{list}",
        plural(users, "user"),
        plural(targets, "target")
    );
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(CliError::Usage(format!(
            "{what}nothing changed: confirm with --yes (there is no terminal to ask on), or review with \
             --dry-run --prune"
        )));
    }
    eprint!("{what}type yes to delete them: ");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| CliError::Usage(e.to_string()))?
    .map_err(|e| CliError::Usage(format!("cannot read the answer: {e}")))?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(CliError::Usage("not confirmed; nothing changed".into()))
    }
}

/// Reconciles: asks the running daemon (request rows it picks up within
/// its poll interval), or — with the daemon stopped — does it here,
/// holding the daemon lock so that none starts meanwhile. Each reachable
/// target is reconciled; unreachable ones are reported (exit 1). A prune
/// that deletes users is confirmed first (`confirm_prune`); a prune the
/// sources' lists cannot bear out (a header that cannot be read, a source
/// with no user unless `allow_empty_source`) is refused, here and as a
/// request to the daemon. Multi-master members are only ever requested
/// from the running daemon; with it stopped they are reported (exit 1),
/// after the one-way targets of the selection are done.
pub async fn reconcile(
    config: &Config,
    group: Option<&str>,
    target: Option<u32>,
    prune: bool,
    yes: bool,
    allow_empty_source: bool,
) -> Result<String, CliError> {
    let sel = selection(config, group, target)?;
    if prune && sel.one_way.is_empty() {
        return Err(CliError::Usage(prune_not_for_members(&sel.members)));
    }
    let prunes = sel.one_way.iter().any(|(g, _)| prune || g.prune);
    let lock = match daemon(config)? {
        Daemon::Stopped(lock) => lock,
        Daemon::Running => {
            if prunes {
                // Count what the daemon's prune would delete now.
                let gw = client(config)?;
                match plan(config, &gw, &sel.one_way, prune, allow_empty_source).await {
                    Ok(p) => {
                        let refused: Vec<String> = p
                            .targets
                            .iter()
                            .filter_map(|t| {
                                t.prune_refused.as_ref().map(|why| {
                                    format!("group {} target {}: {why}", t.group, t.target)
                                })
                            })
                            .collect();
                        if !refused.is_empty() {
                            return Err(CliError::Usage(format!(
                                "{}; nothing requested from the running daemon",
                                refused.join("; ")
                            )));
                        }
                        confirm_prune(&p, yes).await?;
                    }
                    // The daemon's prune waits for every source to be live.
                    Err(_) if yes => {}
                    Err(e) => {
                        return Err(CliError::Usage(format!(
                            "cannot count the users a prune would delete ({}); nothing requested: retry when \
                             the devices can be read, or confirm with --yes",
                            describe(&e, Some(config))
                        )));
                    }
                }
            }
            let st = Store::open_existing(&config.state_dir)?;
            let mut said = Vec::new();
            if !sel.one_way.is_empty() {
                said.push(request_reconcile(config, &st, &sel.one_way, prune)?);
            }
            for (g, members) in &sel.members {
                said.push(request_members(config, &st, g, members, prune)?);
            }
            return Ok(said.join("\n"));
        }
    };
    if sel.one_way.is_empty() {
        drop(lock);
        return Err(CliError::Usage(needs_daemon(config, &sel.members, target)));
    }
    let gw = client(config)?;
    let p = plan(config, &gw, &sel.one_way, prune, allow_empty_source).await?;
    confirm_prune(&p, yes).await?;
    let r = reconcile_here(config, &gw, p, allow_empty_source).await;
    drop(lock);
    if sel.members.is_empty() {
        return r;
    }
    let refused = needs_daemon(config, &sel.members, target);
    match r {
        Ok(done) => Err(CliError::Incomplete {
            done,
            failed: refused,
        }),
        Err(CliError::Incomplete { done, failed }) => Err(CliError::Incomplete {
            done,
            failed: format!("{failed}{refused}\n"),
        }),
        Err(e) => Err(e),
    }
}

/// Writes reconcile requests for the running daemon, one per target.
fn request_reconcile(
    config: &Config,
    st: &Store,
    picked: &Picked<'_>,
    prune: bool,
) -> Result<String, CliError> {
    let mut lines = Vec::new();
    let mut n = 0u64;
    for (g, targets) in picked {
        for t in targets {
            st.request_reconcile(&g.name, *t, "requested by the operator", prune || g.prune)?;
            n += 1;
        }
        lines.push(format!(
            "group {}: {}",
            g.name,
            targets
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    Ok(format!(
        "reconcile of {} requested from the running daemon ({}); it starts within {} s, once every source of \
         the group is live — `usersync status` shows its progress and result",
        plural(n, "target"),
        lines.join("; "),
        config.sync.poll_interval.as_secs()
    ))
}

/// The text a dry run prints, and the error for targets it could not read.
pub fn plan_outcome(plan: &Plan, as_json: bool) -> Result<String, CliError> {
    let text = if as_json {
        json(plan)
    } else {
        render_plan(plan)
    };
    if plan.not_reconciled.is_empty() {
        Ok(text)
    } else {
        Err(CliError::Incomplete {
            done: text,
            failed: not_reconciled_text(plan),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config() -> Config {
        crate::config::parse(
            Path::new("/etc/usersync/usersync.toml"),
            "[gateway]\naddress = \"h:1\"\ntls = false\n[state]\ndir = \"/s\"\n\
             [[device]]\nid = 1\naddress = \"a\"\n[[device]]\nid = 2\naddress = \"b\"\n\
             [[device]]\nid = 3\naddress = \"c\"\n[[device]]\nid = 4\naddress = \"d\"\n\
             [[device]]\nid = 5\naddress = \"e\"\n\
             [[group]]\nname = \"doors\"\nsources = [1]\ntargets = [2]\n\
             [[group]]\nname = \"desks\"\nmode = \"multi-master\"\nmembers = [3, 4]\n",
        )
        .unwrap()
    }

    /// Group names and their devices.
    type Named = Vec<(String, Vec<u32>)>;

    /// (one-way, multi-master) picked.
    fn picked(sel: &Selection<'_>) -> (Named, Named) {
        let names = |p: &Picked<'_>| -> Named {
            p.iter().map(|(g, d)| (g.name.clone(), d.clone())).collect()
        };
        (names(&sel.one_way), names(&sel.members))
    }

    fn usage(r: Result<Selection<'_>, CliError>) -> String {
        match r {
            Err(CliError::Usage(why)) => why,
            Err(e) => panic!("{e}"),
            Ok(sel) => panic!("selected {:?}", picked(&sel)),
        }
    }

    #[test]
    fn members_are_selected_as_members_and_targets_as_targets() {
        let c = config();
        let pair = |g: &str, d: &[u32]| vec![(g.to_owned(), d.to_vec())];
        assert_eq!(
            picked(&selection(&c, None, None).unwrap()),
            (pair("doors", &[2]), pair("desks", &[3, 4])),
            "every group, each as its kind"
        );
        assert_eq!(
            picked(&selection(&c, Some("desks"), None).unwrap()),
            (vec![], pair("desks", &[3, 4]))
        );
        assert_eq!(
            picked(&selection(&c, None, Some(4)).unwrap()),
            (vec![], pair("desks", &[4])),
            "a member is no longer \"not a target\""
        );
        assert_eq!(
            picked(&selection(&c, Some("doors"), Some(2)).unwrap()),
            (pair("doors", &[2]), vec![])
        );
        assert_eq!(
            usage(selection(&c, Some("doors"), Some(4))),
            "device 4 is neither a target nor a multi-master member of group doors"
        );
        assert_eq!(
            usage(selection(&c, None, Some(1))),
            "device 1 is a source of group doors, not a target: a reconcile writes targets only"
        );
        assert!(usage(selection(&c, None, Some(5))).contains("of any group"));
    }

    #[test]
    fn a_refusal_says_the_daemon_runs_it_and_how_to_ask_again() {
        let c = config();
        let sel = selection(&c, None, Some(4)).unwrap();
        let why = needs_daemon(&c, &sel.members, Some(4));
        assert!(why.starts_with("group desks is multi-master: "), "{why}");
        assert!(why.contains("journal's history"), "{why}");
        assert!(
            why.contains("the daemon is not running; nothing was changed there"),
            "{why}"
        );
        assert!(
            why.contains("`usersync run --config /etc/usersync/usersync.toml`"),
            "{why}"
        );
        assert!(
            why.contains("then run `usersync reconcile --group desks --target 4` again"),
            "{why}"
        );
        let why = prune_not_for_members(&sel.members);
        assert!(
            why.starts_with("--prune does not apply to multi-master group desks:"),
            "{why}"
        );
    }
}
