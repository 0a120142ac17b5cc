//! `usersync users`: a device's users, or one of them as counts and sizes
//! (never templates, PINs or photos).

use prost::Message;
use serde::Serialize;

use super::{CliError, at, client, configured};
use crate::config::Config;
use crate::proto::usersync::schema::{v16, v18};
use crate::sync;
use crate::wire::Numbering;

/// A user as the operator sees it: no credential bytes, only counts and
/// sizes.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UserSummary {
    pub id: String,
    pub name: String,
    pub cards: usize,
    pub fingers: usize,
    pub faces: usize,
    pub access_groups: Vec<u32>,
    pub has_pin: bool,
    pub photo_bytes: usize,
    pub record_bytes: usize,
    pub disabled: Option<bool>,
}

/// The fields both numberings share (UserInfo numbers never changed).
macro_rules! summary {
    ($u:expr, $id:expr, $raw:expr, $disabled:expr) => {
        UserSummary {
            id: $id,
            name: $u.name,
            cards: $u.cards.len(),
            fingers: $u.fingers.len(),
            faces: $u.faces.len(),
            access_groups: $u.access_group_i_ds,
            has_pin: !$u.pin.is_empty(),
            photo_bytes: $u.photo.len(),
            record_bytes: $raw.len(),
            disabled: $disabled,
        }
    };
}

/// Summarises a raw record with the configured numbering.
pub fn summarize(raw: &[u8], numbering: Numbering) -> Result<UserSummary, String> {
    match numbering {
        Numbering::V18 => {
            let u = v18::UserInfo::decode(raw).map_err(|e| e.to_string())?;
            let hdr = u.hdr.clone().unwrap_or_default();
            Ok(summary!(u, hdr.id, raw, Some(hdr.user_flag & 0x80 != 0)))
        }
        Numbering::V16 => {
            let u = v16::UserInfo::decode(raw).map_err(|e| e.to_string())?;
            let id = u.hdr.clone().unwrap_or_default().id;
            Ok(summary!(u, id, raw, None))
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum UsersOutput {
    List { device: u32, users: Vec<String> },
    One(UserSummary),
}

pub async fn users(
    config: &Config,
    device: u32,
    user: Option<String>,
) -> Result<UsersOutput, CliError> {
    configured(config, device)?;
    let gw = client(config)?;
    match user {
        None => {
            let mut users = gw.user_ids(device).await.map_err(at(device))?;
            users.sort();
            Ok(UsersOutput::List { device, users })
        }
        Some(id) => {
            let got = sync::get_users(&gw, device, vec![id.clone()])
                .await
                .map_err(at(device))?;
            let rec = got.get(&id).ok_or_else(|| {
                CliError::Usage(format!(
                    "device {device} has no user {id} (`usersync users --device {device}` lists its users)"
                ))
            })?;
            let s = summarize(&rec.raw, config.gateway.api.numbering())
                .map_err(|e| CliError::Usage(format!("user {id}: undecodable record: {e}")))?;
            Ok(UsersOutput::One(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::render_users;

    #[test]
    fn summaries_show_counts_never_bytes() {
        for n in [Numbering::V16, Numbering::V18] {
            let raw = crate::sim::users::generate("42", 1, n, Default::default());
            let s = summarize(&raw, n).unwrap();
            assert_eq!(
                (s.id.as_str(), s.cards, s.fingers, s.faces),
                ("42", 1, 2, 1)
            );
            assert!(s.has_pin);
            let text = render_users(&UsersOutput::One(s));
            assert!(text.contains("fingers:       2"), "{text}");
        }
    }
}
