//! `usersync delete`: a user deleted from a device; at a target whose
//! sources still hold the user, only with `--force`.

use super::drift::record_drift;
use super::next_step::chain_text;
use super::{CliError, TargetWrite, at, client, configured, target_warning};
use crate::config::Config;
use crate::gateway::GatewayClient;
use crate::sync;

/// The sources of `device`'s groups (when it is a target) that hold
/// `user`, or cannot say whether they do: (group, source, why not sure).
async fn sources_holding(
    config: &Config,
    gw: &GatewayClient,
    device: u32,
    user: &str,
) -> Vec<(String, u32, Option<String>)> {
    let mut out = Vec::new();
    for g in config.groups.iter().filter(|g| g.targets.contains(&device)) {
        for s in &g.sources {
            let answer = sync::fetch_users(gw, *s, vec![user.to_owned()]).await;
            let unsure = match answer.as_ref().map(|m| m.get(user)) {
                Ok(Some(sync::Fetched::Absent)) => continue,
                Ok(Some(sync::Fetched::Present(_) | sync::Fetched::HeldElsewhere(_))) => None,
                Ok(Some(sync::Fetched::Failed(why))) => {
                    Some(format!("its record there cannot be read: {why}"))
                }
                Ok(Some(sync::Fetched::Unknown) | None) => {
                    Some("the source could not say".to_owned())
                }
                Err(e) => Some(chain_text(e)),
            };
            out.push((g.name.clone(), *s, unsure));
        }
    }
    out
}

/// Deletes a user from a device. A user the device does not have is an
/// error (exit 1, "has no user … nothing deleted"): a mistyped ID must not
/// read as done. At a target whose group's source still holds the user
/// (or cannot say), it is refused unless `force`: the person would be
/// locked out there until a reconcile puts them back.
pub async fn delete(
    config: &Config,
    device: u32,
    user: &str,
    force: bool,
) -> Result<String, CliError> {
    configured(config, device)?;
    let gw = client(config)?;
    let not_there = || {
        CliError::Usage(format!(
            "device {device} has no user {user}: nothing deleted (`usersync users --device {device}` lists \
             its users)"
        ))
    };
    let found = sync::get_users(&gw, device, vec![user.to_owned()])
        .await
        .map_err(at(device))?;
    if !found.contains_key(user) {
        return Err(not_there());
    }
    let holding = sources_holding(config, &gw, device, user).await;
    if !holding.is_empty() {
        let (group, source, _) = &holding[0];
        let fix = format!("usersync reconcile --group {group} --target {device}");
        let whom: Vec<String> = holding
            .iter()
            .map(|(g, s, unsure)| match unsure {
                None => format!("source {s} of group {g} holds user {user}"),
                Some(why) => {
                    format!("cannot tell whether source {s} of group {g} holds user {user} ({why})")
                }
            })
            .collect();
        let effect = format!(
            "deleting it from target {device} locks the person out of device {device} until a reconcile \
             (`{fix}`) or the next change of user {user} at a source puts them back"
        );
        if !force {
            return Err(CliError::Usage(format!(
                "{}: {effect}; nothing deleted. To remove the person from the group, delete the user at the \
                 source (`usersync delete --device {source} --user {user}`); --force deletes it from device \
                 {device} anyway",
                whom.join("; ")
            )));
        }
        eprintln!("warning (--force): {}: {effect}", whom.join("; "));
    }
    if let Some(w) = target_warning(config, device, TargetWrite::Delete) {
        eprintln!("{w}");
    }
    match gw.user_delete(device, vec![user.to_owned()]).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(tonic::Code::NotFound) => return Err(not_there()),
        Err(e) => return Err(at(device)(e)),
    }
    record_drift(config, device, user);
    Ok(format!(
        "deleted user {user} from device {device}{}",
        if config.is_source(device) {
            "; the daemon deletes it from the group's targets"
        } else {
            ""
        }
    ))
}
