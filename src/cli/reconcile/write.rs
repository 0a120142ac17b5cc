//! A reconcile run here, with the daemon stopped (the caller holds its
//! lock): each target of the plan written on its own, the prune's
//! deletions confirmed again right before they are made, the result
//! recorded for `usersync status` only when nothing was left undone.

use std::collections::BTreeMap;

use super::plan::unreachable;
use super::sources::{confirm_absent, read_sources};
use super::{KeptUser, NotReconciled, Plan, TargetPlan};
use crate::cli::next_step::chain_text;
use crate::cli::render::{kept_text, not_reconciled_text};
use crate::cli::time::unix_now;
use crate::cli::{CliError, describe, plural};
use crate::config::Config;
use crate::gateway::{GatewayClient, GatewayError};
use crate::store::{self, Store};
use crate::sync;

/// What writing one target's plan did.
#[derive(Debug, Default)]
struct Written {
    written: u64,
    deleted: u64,
    /// Missing or different users not written, and why (their source
    /// record cannot be read, say): the target keeps what it has.
    not_written: Vec<KeptUser>,
    /// Extras the prune kept, and why.
    kept: Vec<KeptUser>,
    /// Why the prune did not run although asked.
    prune_refused: Option<String>,
}

impl Written {
    /// What keeps the target from counting as reconciled, in words.
    fn problems(&self, p: &TargetPlan) -> Vec<String> {
        let mut out = Vec::new();
        if !self.not_written.is_empty() {
            out.push(format!(
                "{} not copied, the target keeps what it has: {}",
                plural(self.not_written.len() as u64, "source user"),
                kept_text(&self.not_written)
            ));
        }
        if !self.kept.is_empty() {
            out.push(format!(
                "{} kept: {}",
                plural(self.kept.len() as u64, "extra user"),
                kept_text(&self.kept)
            ));
        }
        if let Some(why) = &self.prune_refused {
            out.push(format!("no user deleted: {why}"));
        }
        // A refused prune names them already.
        let unnamed = if self.prune_refused.is_some() {
            &[][..]
        } else {
            &p.unreadable_at_sources[..]
        };
        for u in unnamed {
            out.push(format!(
                "source {} lists {} that cannot be read: those users were neither copied nor judged",
                u.source,
                plural(u.headers as u64, "user header")
            ));
        }
        out
    }
}

/// Reconciles from here; the caller holds the daemon lock. Each target
/// of the plan is written on its own: one that fails is reported, the
/// others are done. A target is recorded as reconciled (for `usersync
/// status`, when the state database exists) only if nothing was left
/// undone: a user not copied because its source record cannot be read,
/// an extra kept, a refused prune make it "not reconciled" (exit 1).
pub(super) async fn reconcile_here(
    config: &Config,
    gw: &GatewayClient,
    mut plan: Plan,
    allow_empty_source: bool,
) -> Result<String, CliError> {
    let mut done = String::new();
    let mut results = Vec::new();
    for p in &plan.targets {
        match write_target(config, gw, p, allow_empty_source).await {
            Ok(w) => {
                let problems = w.problems(p);
                let extras_kept = p.extra.len() as u64 - w.deleted;
                done.push_str(&format!(
                    "group {} target {}: {} written, {} deleted{}\n",
                    p.group,
                    p.target,
                    plural(w.written, "user"),
                    w.deleted,
                    if !p.prune && !p.extra.is_empty() {
                        format!(
                            " ({} kept: no source has them; --prune deletes them)",
                            plural(p.extra.len() as u64, "extra user")
                        )
                    } else if p.prune && extras_kept > 0 {
                        format!(" ({} kept)", plural(extras_kept, "extra user"))
                    } else {
                        String::new()
                    }
                ));
                if problems.is_empty() {
                    results.push(store::ReconcileResult {
                        group: p.group.clone(),
                        target: p.target,
                        reason: "run by the operator (daemon stopped)".into(),
                        finished_at: unix_now(),
                        missing: p.missing.len() as u64,
                        different: p.different.len() as u64,
                        extra: p.extra.len() as u64,
                        pruned: w.deleted,
                    });
                } else {
                    plan.not_reconciled.push(NotReconciled {
                        group: p.group.clone(),
                        target: p.target,
                        reason: problems.join("; "),
                        next: format!(
                            "the rest is done; rerun `usersync reconcile --group {} --target {}` once that is \
                             resolved",
                            p.group, p.target
                        ),
                    });
                }
            }
            Err(e) => plan.not_reconciled.push(NotReconciled::unreachable(
                &p.group,
                p.target,
                match unreachable(e, p.target, config) {
                    Ok(why) => why,
                    Err(e) => describe(&e, Some(config)),
                },
            )),
        }
    }
    if !results.is_empty()
        && let Ok(true) = config.state_dir.join(store::DB_FILE).try_exists()
    {
        let recorded = Store::open_existing(&config.state_dir).and_then(|st| {
            st.with(|c| {
                for r in &results {
                    store::record_reconcile_result(c, r)?;
                }
                Ok(())
            })
        });
        if let Err(e) = recorded {
            eprintln!("warning: the result is not recorded for `usersync status`: {e}");
        }
    }
    if plan.not_reconciled.is_empty() {
        Ok(done)
    } else {
        Err(CliError::Incomplete {
            done,
            failed: not_reconciled_text(&plan),
        })
    }
}

/// Writes one target's plan. Source records are read again, user by
/// user: one that cannot be read is not copied and is reported, never
/// skipped silently. The prune's deletions are confirmed again right
/// before they are made (the operator may have taken a while to confirm):
/// the sources' lists are read again, and each user must still be absent
/// at every source.
async fn write_target(
    config: &Config,
    gw: &GatewayClient,
    p: &TargetPlan,
    allow_empty_source: bool,
) -> Result<Written, GatewayError> {
    let mut out = Written {
        kept: p.kept.clone(),
        prune_refused: p.prune_refused.clone().filter(|_| p.prune),
        ..Written::default()
    };
    let mut by_source: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for u in p.missing.iter().chain(&p.different) {
        if let Some(s) = p.from.get(u) {
            by_source.entry(*s).or_default().push(u.clone());
        }
    }
    for (s, ids) in by_source {
        for chunk in ids.chunks(config.sync.batch_users) {
            let answers = sync::fetch_users(gw, s, chunk.to_vec()).await?;
            let mut raws = Vec::new();
            for u in chunk {
                let reason = match answers.get(u) {
                    Some(sync::Fetched::Present(r)) => {
                        raws.push(r.raw.clone());
                        continue;
                    }
                    Some(sync::Fetched::Absent) => format!("source {s} no longer holds it"),
                    Some(sync::Fetched::HeldElsewhere(o)) => format!("source {o} holds it"),
                    Some(sync::Fetched::Failed(why)) => {
                        format!("its record at source {s} cannot be read ({why})")
                    }
                    Some(sync::Fetched::Unknown) | None => {
                        format!("source {s} could not say whether it holds it")
                    }
                };
                out.not_written.push(KeptUser {
                    user: u.clone(),
                    reason,
                });
            }
            // Batched as the daemon batches: by users and by bytes, so a
            // chunk of big (face, fingerprint) records stays under the
            // message size the gateway and the device take.
            for batch in sync::plan::chunks(
                raws,
                |r| r.len(),
                config.sync.batch_users,
                config.sync.batch_bytes,
            ) {
                let n = batch.len() as u64;
                gw.user_enroll_multi(vec![p.target], batch, true).await?;
                out.written += n;
            }
        }
    }
    if !p.prunes() || p.delete.is_empty() {
        return Ok(out);
    }
    let Some(g) = config.groups.iter().find(|g| g.name == p.group) else {
        out.prune_refused = Some(format!("group {} is no longer configured", p.group));
        return Ok(out);
    };
    let lists = match read_sources(gw, g).await {
        Ok(l) => l,
        Err((s, e)) => {
            out.prune_refused = Some(format!(
                "source {s} cannot be read now to confirm the deletions ({})",
                chain_text(&e)
            ));
            return Ok(out);
        }
    };
    if let Some(why) = lists.prune_refusal(&g.name, allow_empty_source) {
        out.prune_refused = Some(why);
        return Ok(out);
    }
    let (unlisted, listed): (Vec<String>, Vec<String>) = p
        .delete
        .iter()
        .cloned()
        .partition(|u| !lists.users.contains_key(u));
    out.kept.extend(listed.into_iter().map(|u| KeptUser {
        reason: format!(
            "source {} lists it now",
            lists.users.get(&u).copied().unwrap_or_default()
        ),
        user: u,
    }));
    let (delete, kept) = confirm_absent(config, gw, &g.sources, unlisted).await;
    out.kept.extend(kept);
    if !delete.is_empty() {
        gw.user_delete_multi(vec![p.target], delete.clone()).await?;
        out.deleted = delete.len() as u64;
    }
    Ok(out)
}
