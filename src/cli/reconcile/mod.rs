//! `usersync reconcile`: targets made to hold their sources' users —
//! through the running daemon (a request it picks up), or here when it is
//! stopped. A prune that deletes users says how many and asks first.

use std::io::IsTerminal;

use crate::cli::render::not_reconciled_text;
use crate::cli::{
    CliError, Daemon, client, configured, daemon, describe, json, plural, render_plan,
};
use crate::config::{Config, GroupConfig};
use crate::store::Store;

mod plan;
mod sources;
mod write;

use plan::plan;
pub use plan::{KeptUser, NotReconciled, Plan, TargetPlan, UnreadableHeaders, reconcile_plan};
use write::reconcile_here;

/// The groups and targets a reconcile addresses.
fn selection<'c>(
    config: &'c Config,
    group: Option<&str>,
    target: Option<u32>,
) -> Result<Vec<(&'c GroupConfig, Vec<u32>)>, CliError> {
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
        return Ok(groups.into_iter().map(|g| (g, g.targets.clone())).collect());
    };
    configured(config, t)?;
    let picked: Vec<(&GroupConfig, Vec<u32>)> = groups
        .iter()
        .filter(|g| g.targets.contains(&t))
        .map(|g| (*g, vec![t]))
        .collect();
    if picked.is_empty() {
        let what = match config.groups.iter().find(|g| g.sources.contains(&t)) {
            Some(g) => format!(
                "device {t} is a source of group {}, not a target: a reconcile writes targets only",
                g.name
            ),
            None => format!(
                "device {t} is not a target of {}",
                group.map_or("any group".to_owned(), |g| format!("group {g}"))
            ),
        };
        return Err(CliError::Usage(what));
    }
    Ok(picked)
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
/// request to the daemon.
pub async fn reconcile(
    config: &Config,
    group: Option<&str>,
    target: Option<u32>,
    prune: bool,
    yes: bool,
    allow_empty_source: bool,
) -> Result<String, CliError> {
    let picked = selection(config, group, target)?;
    let prunes = picked.iter().any(|(g, _)| prune || g.prune);
    let lock = match daemon(config)? {
        Daemon::Stopped(lock) => lock,
        Daemon::Running => {
            if prunes {
                // Count what the daemon's prune would delete now.
                let gw = client(config)?;
                match plan(config, &gw, &picked, prune, allow_empty_source).await {
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
            return request_reconcile(config, &picked, prune);
        }
    };
    let gw = client(config)?;
    let p = plan(config, &gw, &picked, prune, allow_empty_source).await?;
    confirm_prune(&p, yes).await?;
    let r = reconcile_here(config, &gw, p, allow_empty_source).await;
    drop(lock);
    r
}

/// Writes reconcile requests for the running daemon, one per target.
fn request_reconcile(
    config: &Config,
    picked: &[(&GroupConfig, Vec<u32>)],
    prune: bool,
) -> Result<String, CliError> {
    let st = Store::open_existing(&config.state_dir)?;
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
