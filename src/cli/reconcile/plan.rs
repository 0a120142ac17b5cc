//! What a reconcile would do, read from the devices without changing them:
//! per target, the users missing, different and extra, and which extras a
//! prune deletes (each confirmed absent at every source).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::members::{no_plan, not_planned};
use super::selection;
use super::sources::{SourceLists, confirm_absent, read_sources};
use crate::cli::next_step::{chain_text, is_transport};
use crate::cli::{CliError, client, gateway_hint};
use crate::config::{Config, GroupConfig};
use crate::gateway::{GatewayClient, GatewayError};
use crate::sync;

#[derive(Debug, Serialize, Default)]
pub struct TargetPlan {
    pub group: String,
    pub target: u32,
    pub missing: Vec<String>,
    pub different: Vec<String>,
    /// Users on the target that no source lists.
    pub extra: Vec<String>,
    /// Whether a prune was asked (`--prune`, or the group's `prune`).
    pub prune: bool,
    /// The extras a prune deletes: each confirmed absent at every source
    /// of the group (`User.Get`), not only missing from their lists.
    pub delete: Vec<String>,
    /// The extras a prune keeps, and why (a source holds it after all, or
    /// cannot say).
    pub kept: Vec<KeptUser>,
    /// Why no extra of this target is pruned although a prune was asked.
    pub prune_refused: Option<String>,
    /// Users of the group's sources that cannot be named (their `GetList`
    /// headers do not decode): neither copied nor judged.
    pub unreadable_at_sources: Vec<UnreadableHeaders>,
    /// The source each missing or different user is copied from.
    #[serde(skip)]
    pub(super) from: BTreeMap<String, u32>,
}

impl TargetPlan {
    /// Whether this target's extras are pruned.
    pub(super) fn prunes(&self) -> bool {
        self.prune && self.prune_refused.is_none()
    }
}

/// A user a reconcile leaves as it is on the target, and why.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct KeptUser {
    pub user: String,
    pub reason: String,
}

/// Headers of a source's `GetList` answer that do not decode.
#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct UnreadableHeaders {
    pub source: u32,
    pub headers: usize,
}

/// A target a reconcile could not handle (or not completely), why, and
/// what to do about it.
#[derive(Debug, Serialize)]
pub struct NotReconciled {
    pub group: String,
    pub target: u32,
    pub reason: String,
    pub next: String,
}

impl NotReconciled {
    /// A target that could not be read or written (or a source of its group).
    pub(super) fn unreachable(group: &str, target: u32, reason: String) -> Self {
        NotReconciled {
            group: group.to_owned(),
            target,
            reason,
            next: format!(
                "run `usersync reconcile --group {group} --target {target}` once it can be reached"
            ),
        }
    }
}

/// A multi-master group a dry run has no plan for, and why.
#[derive(Debug, Serialize)]
pub struct NotPlanned {
    pub group: String,
    /// The members the reconcile would address.
    pub members: Vec<u32>,
    pub reason: String,
}

/// What a reconcile would do: a plan per target it could read, the
/// targets it could not (unreachable target, or a source of the group
/// unreachable: extras and differences are judged against every source),
/// and the multi-master groups of the selection, which have no plan.
#[derive(Debug, Serialize, Default)]
pub struct Plan {
    pub targets: Vec<TargetPlan>,
    pub not_reconciled: Vec<NotReconciled>,
    pub not_planned: Vec<NotPlanned>,
}

impl Plan {
    /// (users, targets) a prune would delete.
    pub(super) fn deletions(&self) -> (u64, u64) {
        let doomed = self
            .targets
            .iter()
            .filter(|p| p.prunes() && !p.delete.is_empty());
        let users: usize = doomed.clone().map(|p| p.delete.len()).sum();
        (users as u64, doomed.count() as u64)
    }
}

/// Why a device could not be read, for a plan's `not_reconciled`; a
/// gateway that cannot be reached at all is the whole command's error.
pub(super) fn unreachable(
    e: GatewayError,
    device: u32,
    config: &Config,
) -> Result<String, CliError> {
    if is_transport(&e) {
        return Err(CliError::Gateway(e));
    }
    let text = chain_text(&e);
    Ok(match gateway_hint(&text, false, config, Some(device)) {
        Some(h) => format!("{h} ({text})"),
        None => text,
    })
}

/// What a reconcile would do, read from the devices without changing them.
/// Multi-master groups have no plan: they are listed as not planned, and a
/// selection of nothing else is refused.
pub async fn reconcile_plan(
    config: &Config,
    group: Option<&str>,
    target: Option<u32>,
    prune: bool,
    allow_empty_source: bool,
) -> Result<Plan, CliError> {
    let sel = selection(config, group, target)?;
    if sel.one_way.is_empty() {
        return Err(CliError::Usage(no_plan(&sel.members, target)));
    }
    let gw = client(config)?;
    let mut p = plan(config, &gw, &sel.one_way, prune, allow_empty_source).await?;
    p.not_planned = not_planned(&sel.members, target);
    Ok(p)
}

pub(super) async fn plan(
    config: &Config,
    gw: &GatewayClient,
    picked: &[(&GroupConfig, Vec<u32>)],
    prune: bool,
    allow_empty_source: bool,
) -> Result<Plan, CliError> {
    let mut out = Plan::default();
    for (g, targets) in picked {
        let lists = match read_sources(gw, g).await {
            Ok(l) => l,
            Err((s, e)) => {
                let why = format!(
                    "source {s} cannot be read, and a reconcile judges against every source of the group: {}",
                    unreachable(e, s, config)?
                );
                for t in targets {
                    out.not_reconciled
                        .push(NotReconciled::unreachable(&g.name, *t, why.clone()));
                }
                continue;
            }
        };
        let prune = prune || g.prune;
        let refusal = prune
            .then(|| lists.prune_refusal(&g.name, allow_empty_source))
            .flatten();
        for t in targets {
            match plan_target(config, gw, g, *t, &lists, prune, refusal.clone()).await {
                Ok(p) => out.targets.push(p),
                Err(e) => out.not_reconciled.push(NotReconciled::unreachable(
                    &g.name,
                    *t,
                    format!("target unreachable: {}", unreachable(e, *t, config)?),
                )),
            }
        }
    }
    Ok(out)
}

async fn plan_target(
    config: &Config,
    gw: &GatewayClient,
    g: &GroupConfig,
    t: u32,
    lists: &SourceLists,
    prune: bool,
    prune_refused: Option<String>,
) -> Result<TargetPlan, GatewayError> {
    let sources = &lists.users;
    let on_target: BTreeSet<String> = gw.user_ids(t).await?.into_iter().collect();
    let all: Vec<(String, u32)> = sources.iter().map(|(u, s)| (u.clone(), *s)).collect();
    let mut cmp = sync::Comparison::default();
    for chunk in all.chunks(config.sync.batch_users) {
        let c = sync::compare(gw, t, &on_target, chunk.to_vec()).await?;
        cmp.missing.extend(c.missing);
        cmp.different.extend(c.different);
    }
    let from = cmp
        .missing
        .iter()
        .chain(&cmp.different)
        .map(|(u, s)| (u.clone(), *s))
        .collect();
    let extra: Vec<String> = on_target
        .into_iter()
        .filter(|u| !sources.contains_key(u))
        .collect();
    let (delete, kept) = if prune && prune_refused.is_none() && !extra.is_empty() {
        confirm_absent(config, gw, &g.sources, extra.clone()).await
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(TargetPlan {
        group: g.name.clone(),
        target: t,
        missing: cmp.missing.into_iter().map(|(u, _)| u).collect(),
        different: cmp.different.into_iter().map(|(u, _)| u).collect(),
        extra,
        prune,
        delete,
        kept,
        prune_refused,
        unreadable_at_sources: lists.unreadable.clone(),
        from,
    })
}
