//! What the sources of a group hold, as a reconcile must know it: their
//! lists (and whether those can bear out a prune), and — for a user no
//! list shows — each source asked record by record.

use std::collections::BTreeMap;

use super::{KeptUser, UnreadableHeaders};
use crate::cli::next_step::chain_text;
use crate::cli::plural;
use crate::config::{Config, GroupConfig};
use crate::gateway::{GatewayClient, GatewayError};
use crate::sync;

/// What the sources of a group list.
pub(super) struct SourceLists {
    /// Every listed user, with the first source that lists it.
    pub(super) users: BTreeMap<String, u32>,
    pub(super) unreadable: Vec<UnreadableHeaders>,
    /// Sources that list no user at all.
    pub(super) empty: Vec<u32>,
}

impl SourceLists {
    /// Why a prune of the group must not run, judged from the lists: a
    /// user the lists cannot name, or a source with no user at all (reset,
    /// or a wrong answer), would make every user it holds look like one no
    /// source has.
    pub(super) fn prune_refusal(&self, group: &str, allow_empty: bool) -> Option<String> {
        let mut why: Vec<String> = self
            .unreadable
            .iter()
            .map(|u| {
                format!(
                    "source {} lists {} that cannot be read (those users are neither copied nor judged, and a \
                     prune could delete users it still holds); refusing to prune group {group} (repair or \
                     re-enroll those users at the source)",
                    u.source,
                    plural(u.headers as u64, "user header")
                )
            })
            .collect();
        if !allow_empty {
            why.extend(self.empty.iter().map(|s| {
                format!(
                    "source {s} lists no users, so a prune would delete every user of the target; refusing to \
                     prune group {group} (if the group is meant to be empty, rerun with --allow-empty-source)"
                )
            }));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Reads the list of every source of `g`; the first that cannot be read
/// is the error.
pub(super) async fn read_sources(
    gw: &GatewayClient,
    g: &GroupConfig,
) -> Result<SourceLists, (u32, GatewayError)> {
    let mut out = SourceLists {
        users: BTreeMap::new(),
        unreadable: Vec::new(),
        empty: Vec::new(),
    };
    for s in &g.sources {
        let list = gw.user_ids_checked(*s).await.map_err(|e| (*s, e))?;
        if list.unreadable > 0 {
            out.unreadable.push(UnreadableHeaders {
                source: *s,
                headers: list.unreadable,
            });
        }
        if list.ids.is_empty() && list.unreadable == 0 {
            out.empty.push(*s);
        }
        for id in list.ids {
            out.users.entry(id).or_insert(*s);
        }
    }
    Ok(out)
}

/// Asks every source of a group, record by record, about `users` (extras:
/// no source lists them): (absent at every source, kept and why). Only an
/// answer of "absent" from every source lets a user be deleted; a record
/// that cannot be read, a source that holds it after all or cannot be
/// asked keeps it.
pub(super) async fn confirm_absent(
    config: &Config,
    gw: &GatewayClient,
    sources: &[u32],
    users: Vec<String>,
) -> (Vec<String>, Vec<KeptUser>) {
    let mut open = users;
    let mut kept = Vec::new();
    for s in sources {
        let mut still = Vec::new();
        for chunk in open.chunks(config.sync.batch_users.max(1)) {
            let answers = match sync::fetch_users(gw, *s, chunk.to_vec()).await {
                Ok(a) => a,
                Err(e) => {
                    let why = chain_text(&e);
                    kept.extend(chunk.iter().map(|u| KeptUser {
                        user: u.clone(),
                        reason: format!(
                            "source {s} could not be asked whether it holds it ({why})"
                        ),
                    }));
                    continue;
                }
            };
            for u in chunk {
                let reason = match answers.get(u) {
                    Some(sync::Fetched::Absent) => {
                        still.push(u.clone());
                        continue;
                    }
                    Some(sync::Fetched::Present(_) | sync::Fetched::HeldElsewhere(_)) => {
                        format!("source {s} holds it (its list did not show it)")
                    }
                    Some(sync::Fetched::Failed(why)) => {
                        format!("its record at source {s} cannot be read ({why})")
                    }
                    Some(sync::Fetched::Unknown) | None => {
                        format!("source {s} could not say whether it holds it")
                    }
                };
                kept.push(KeptUser {
                    user: u.clone(),
                    reason,
                });
            }
        }
        open = still;
        if open.is_empty() {
            break;
        }
    }
    (open, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 2: the lists alone refuse a prune when a source has a
    /// header that cannot be read, or lists nobody (unless allowed).
    #[test]
    fn a_prune_is_refused_when_the_lists_cannot_bear_it_out() {
        let lists = |unreadable: usize, empty: bool| SourceLists {
            users: if empty {
                BTreeMap::new()
            } else {
                [("1".to_owned(), 7)].into()
            },
            unreadable: if unreadable > 0 {
                vec![UnreadableHeaders {
                    source: 7,
                    headers: unreadable,
                }]
            } else {
                Vec::new()
            },
            empty: if empty { vec![7] } else { Vec::new() },
        };
        assert_eq!(lists(0, false).prune_refusal("g", false), None);
        let why = lists(2, false).prune_refusal("g", true).unwrap();
        assert!(
            why.contains("source 7 lists 2 user headers that cannot be read"),
            "{why}"
        );
        let why = lists(0, true).prune_refusal("g", false).unwrap();
        assert!(
            why.contains("source 7 lists no users") && why.contains("--allow-empty-source"),
            "{why}"
        );
        assert_eq!(lists(0, true).prune_refusal("g", true), None);
    }
}
