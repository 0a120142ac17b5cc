//! `usersync enroll`: a user enrolled with a card presented at a device,
//! or — with `--overwrite` — a card added to an existing user, every other
//! byte of its record kept. Records whose header numbering does not fit
//! `[gateway] api` are refused before the card is asked for.

use prost::Message;

use super::drift::record_drift;
use super::render::holdings;
use super::{CliError, TargetWrite, at, client, configured, summarize, target_warning};
use crate::config::Config;
use crate::gateway::GatewayClient;
use crate::proto::gsdk::card::CsnCardData;
use crate::proto::gsdk::user::UserSetting;
use crate::proto::usersync::schema::{v16, v18};
use crate::sync;
use crate::wire::{EditError, MAX_CARDS, Numbering, NumberingFit};

/// Builds a card user from scratch in the configured numbering (the only
/// place outside the simulator that encodes a user).
pub fn card_user(numbering: Numbering, id: &str, name: &str, card: CsnCardData) -> Vec<u8> {
    let setting = Some(UserSetting {
        biometric_auth_mode: 0xFF,
        card_auth_mode: 0xFF,
        id_auth_mode: 0xFF,
        face_auth_ext_mode: 0xFF,
        finger_auth_ext_mode: 0xFF,
        card_auth_ext_mode: 0xFF,
        id_auth_ext_mode: 0xFF,
        ..Default::default()
    });
    match numbering {
        Numbering::V18 => v18::UserInfo {
            hdr: Some(v18::UserHdr {
                id: id.to_owned(),
                num_of_card: 1,
                ..Default::default()
            }),
            setting,
            name: name.to_owned(),
            cards: vec![card],
            ..Default::default()
        }
        .encode_to_vec(),
        Numbering::V16 => v16::UserInfo {
            hdr: Some(v16::UserHdr {
                id: id.to_owned(),
                num_of_card: 1,
                ..Default::default()
            }),
            setting,
            name: name.to_owned(),
            cards: vec![card],
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

/// Most characters a user's name may have (WIRE.md §2.3).
pub const MAX_NAME_CHARS: usize = 48;

/// Refuses a name the device cannot store.
fn check_name(name: &str) -> Result<(), CliError> {
    let n = name.chars().count();
    if n > MAX_NAME_CHARS {
        return Err(CliError::Usage(format!(
            "--name has {n} characters; a device stores at most {MAX_NAME_CHARS} (WIRE.md §2.3): shorten it; \
             nothing changed"
        )));
    }
    Ok(())
}

/// The field of the other numbering's header that numOfCard, written
/// with `numbering`, would land on.
fn clobbered(numbering: Numbering) -> &'static str {
    match numbering {
        // ≤V1.6 numOfCard is field 2: a V1.8 header's userFlag.
        Numbering::V16 => "userFlag — a disabled user would be enabled again —",
        // V1.8 numOfCard is field 3: a ≤V1.6 header's numOfFinger.
        Numbering::V18 => "numOfFinger",
    }
}

/// "If the gateway runs V1.8 or later, set api = "v1.8" in [gateway] of FILE".
fn set_api(config: &Config, n: Numbering) -> String {
    let runs = match n {
        Numbering::V16 => "V1.6 or earlier",
        Numbering::V18 => "V1.8 or later",
    };
    format!(
        "If the gateway runs {runs}, set api = \"{}\" in [gateway] of {}",
        n.api_name(),
        config.path.display()
    )
}

/// Why a user's record cannot get a card, in the operator's words, or
/// `None` if it can: it is readable, its header fits the configured
/// numbering (WIRE.md §1.3), and it holds fewer than [`MAX_CARDS`] cards.
fn uneditable(config: &Config, device: u32, user: &str, raw: &[u8], held: &str) -> Option<String> {
    let numbering = config.gateway.api.numbering();
    let file = config.path.display();
    let api = config.gateway.api;
    let cards = match crate::wire::raw_cards(raw) {
        Ok(c) => c.len(),
        Err(e) => {
            return Some(format!(
                "user {user} on device {device} has a record usersync cannot edit ({e}); nothing changed, \
                 rather than lose what it holds ({held})"
            ));
        }
    };
    let fit = match crate::wire::numbering_fit(raw) {
        Ok(f) => f,
        Err(e) => {
            return Some(format!(
                "user {user} on device {device} has a record usersync cannot edit ({e}); nothing changed, \
                 rather than lose what it holds ({held})"
            ));
        }
    };
    if !fit.allows(numbering) {
        let why = EditError::WrongNumbering { numbering, fit };
        let next = match fit {
            NumberingFit::Only(n) => set_api(config, n),
            _ => {
                "usersync cannot tell where its card count is: add the card at the device, or with \
                  BioStar"
                    .to_owned()
            }
        };
        return Some(format!(
            "user {user} on device {device}: {why}. Adding a card with api = \"{api}\" ([gateway] of {file}) \
             would write the card count over its {} and the daemon would copy the damaged record to every \
             target; nothing changed. {next}",
            clobbered(numbering)
        ));
    }
    if cards >= MAX_CARDS {
        return Some(format!(
            "user {user} on device {device} already has {MAX_CARDS} cards, the most a user may hold; \
             nothing changed"
        ));
    }
    None
}

/// Whether the gateway agrees with `[gateway] api` on the numbering of
/// user headers: the version `Admin.GetInfo` reports (when it can be read
/// and says), and — when `sample` (no record of the user itself decides)
/// — a few of the device's own records. Evidence against the configured
/// numbering refuses the write.
async fn check_numbering(
    config: &Config,
    gw: &GatewayClient,
    device: u32,
    sample: bool,
) -> Result<(), CliError> {
    let numbering = config.gateway.api.numbering();
    let api = config.gateway.api;
    let file = config.path.display();
    if let Ok(info) = gw.admin_get_info().await
        && let Some(n) = crate::wire::numbering_of_version(&info.version)
        && n != numbering
    {
        return Err(CliError::Usage(format!(
            "the gateway at {} reports version {:?}, whose user headers are numbered as api = \"{}\" ({}), \
             but [gateway] api in {file} is \"{api}\": a record written that way has its card count where \
             this gateway keeps {} and the daemon would copy it to every target (WIRE.md §1.3); nothing \
             changed. {}",
            config.gateway.address,
            info.version,
            n.api_name(),
            n.gateways(),
            clobbered(numbering),
            set_api(config, n)
        )));
    }
    if !sample {
        return Ok(());
    }
    // A handful of the device's records, each judged by its own counts.
    const SAMPLE: usize = 8;
    let mut ids = gw.user_ids(device).await.map_err(at(device))?;
    ids.sort();
    ids.truncate(SAMPLE);
    let got = sync::get_users(gw, device, ids).await.map_err(at(device))?;
    let (mut ours, mut other) = (0usize, 0usize);
    for rec in got.values() {
        match crate::wire::numbering_fit(&rec.raw) {
            Ok(NumberingFit::Only(n)) if n == numbering => ours += 1,
            Ok(NumberingFit::Only(_)) => other += 1,
            _ => {}
        }
    }
    if other > 0 && ours == 0 {
        let n = numbering.other();
        return Err(CliError::Usage(format!(
            "the users on device {device} are numbered as api = \"{}\" ({}: {other} of the {} records read fit \
             only that numbering), but [gateway] api in {file} is \"{api}\": a record written that way has its \
             card count where this gateway keeps {} and the daemon would copy it to every target (WIRE.md \
             §1.3); nothing changed. {}",
            n.api_name(),
            n.gateways(),
            got.len(),
            clobbered(numbering),
            set_api(config, n)
        )));
    }
    Ok(())
}

/// Waits for a card at `device` and enrolls `user` with it. Inputs are
/// checked before anyone is asked for a card: the device is configured, the
/// ID is valid, the name fits, and the user is absent unless `overwrite`.
/// With `overwrite`, an existing user gets the card *added*: its record is
/// read and written back with one more card, every other byte untouched
/// (fingers, faces, PIN, photo, access groups, fields unknown to usersync);
/// `name` renames it. Nothing else ever replaces a user's record. A record
/// whose header does not fit `[gateway] api` (or a gateway whose version
/// says another numbering) is refused, before the card and again after it
/// (`uneditable`, `check_numbering`), as is a ninth card.
pub async fn enroll_card(
    config: &Config,
    device: u32,
    user: &str,
    name: Option<&str>,
    overwrite: bool,
) -> Result<String, CliError> {
    crate::wire::validate_user_id(user).map_err(CliError::Usage)?;
    if let Some(n) = name {
        check_name(n)?;
    }
    configured(config, device)?;
    let numbering = config.gateway.api.numbering();
    let gw = client(config)?;
    let read = |gw: GatewayClient| async move {
        sync::get_users(&gw, device, vec![user.to_owned()])
            .await
            .map(|mut m| m.remove(user))
            .map_err(at(device))
    };
    let existing = read(gw.clone()).await?;
    let held_by = |raw: &[u8]| {
        summarize(raw, numbering)
            .map(|s| holdings(&s))
            .unwrap_or_else(|e| format!("a record usersync cannot read: {e}"))
    };
    // Whether the user's own record tells the numbering apart; if not,
    // the device's other records are asked.
    let mut decided = false;
    if let Some(rec) = &existing {
        let held = held_by(&rec.raw);
        if !overwrite {
            return Err(CliError::Usage(format!(
                "user {user} already exists on device {device} ({held}); nothing changed. --overwrite adds the \
                 card to it and keeps everything else"
            )));
        }
        if let Some(why) = uneditable(config, device, user, &rec.raw, &held) {
            return Err(CliError::Usage(why));
        }
        decided = matches!(
            crate::wire::numbering_fit(&rec.raw),
            Ok(NumberingFit::Only(_))
        );
    }
    check_numbering(config, &gw, device, !decided).await?;
    let what = if existing.is_some() {
        TargetWrite::AddCard
    } else {
        TargetWrite::Enroll
    };
    if let Some(w) = target_warning(config, device, what) {
        eprintln!("{w}");
    }
    eprintln!("place a card on device {device} …");
    let card = gw.card_scan(device).await.map_err(at(device))?;
    let csn = card.csn_card_data.ok_or_else(|| {
        CliError::Usage(format!(
            "the card (type {}) carries no CSN; smart cards cannot be enrolled by this command",
            card.r#type
        ))
    })?;
    if existing.is_none() {
        let raw = card_user(numbering, user, name.unwrap_or(""), csn);
        gw.user_enroll(device, vec![raw], false)
            .await
            .map_err(at(device))?;
        record_drift(config, device, user);
        return Ok(format!(
            "enrolled user {user} with a card on device {device}{}",
            if config.is_source(device) {
                "; the daemon copies it to the group's targets"
            } else {
                ""
            }
        ));
    }
    // Read again: presenting the card took time, and the user may have
    // changed at the device meanwhile. Edit what is there now, after the
    // same checks.
    let Some(rec) = read(gw.clone()).await? else {
        return Err(CliError::Usage(format!(
            "user {user} was deleted from device {device} while waiting for the card; nothing written"
        )));
    };
    let card_bytes = csn.encode_to_vec();
    let cards = crate::wire::raw_cards(&rec.raw)
        .map_err(|e| CliError::Usage(format!("user {user}: {e}; nothing changed")))?;
    if cards.iter().any(|c| {
        CsnCardData::decode(c.as_slice())
            .is_ok_and(|c| c.data == csn.data && c.r#type == csn.r#type)
    }) {
        return Ok(format!(
            "user {user} on device {device} already has this card; nothing changed"
        ));
    }
    if let Some(why) = uneditable(config, device, user, &rec.raw, &held_by(&rec.raw)) {
        return Err(CliError::Usage(format!(
            "{why} (the user changed at the device while the card was awaited)"
        )));
    }
    let mut raw = crate::wire::add_card(&rec.raw, numbering, &card_bytes)
        .map_err(|e| CliError::Usage(format!("user {user}: {e}; nothing changed")))?;
    if let Some(n) = name {
        raw = crate::wire::set_name(&raw, n)
            .map_err(|e| CliError::Usage(format!("user {user}: {e}; nothing changed")))?;
    }
    gw.user_enroll(device, vec![raw.clone()], true)
        .await
        .map_err(at(device))?;
    record_drift(config, device, user);
    let held = summarize(&raw, numbering)
        .map(|s| holdings(&s))
        .unwrap_or_default();
    Ok(format!(
        "added a card to user {user} on device {device}; it now holds {held} (everything else kept){}",
        if config.is_source(device) {
            "; the daemon copies it to the group's targets"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::summarize;

    #[test]
    fn names_longer_than_a_device_stores_are_refused() {
        assert!(check_name(&"é".repeat(MAX_NAME_CHARS)).is_ok());
        let e = check_name(&"é".repeat(MAX_NAME_CHARS + 1)).unwrap_err();
        assert!(e.to_string().contains("has 49 characters"), "{e}");
    }

    #[test]
    fn card_users_use_the_right_numbering() {
        let card = crate::sim::users::scanned_card(7);
        let raw = card_user(Numbering::V16, "9", "Ann", card.clone());
        assert_eq!(summarize(&raw, Numbering::V16).unwrap().cards, 1);
        let raw = card_user(Numbering::V18, "9", "Ann", card);
        let u = v18::UserInfo::decode(raw.as_slice()).unwrap();
        assert_eq!(u.hdr.unwrap().num_of_card, 1);
        assert_eq!(crate::wire::peek_user_id(&raw).unwrap(), "9");
    }
}
