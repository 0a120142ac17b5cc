//! Realistic user records for the simulator: a CSN card, two fingers, a face
//! with image data, a PIN hash, a photo, access groups and a job code — built
//! with the typed schema of the gateway generation (WIRE.md §1.3) and handed
//! around as raw bytes from then on.
//!
//! Content is a pure function of (user ID, revision), so tests can predict it
//! and an update really changes the bytes.

use prost::Message;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::proto::gsdk::card::{CsnCardData, Type as CardType};
use crate::proto::gsdk::finger::FingerData;
use crate::proto::gsdk::tna::JobCode;
use crate::proto::gsdk::user::UserSetting;
use crate::proto::usersync::schema::{v16, v18};
use crate::wire::Numbering;

/// Sizes of the generated credentials, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserProfile {
    pub finger_template: usize,
    pub face_template: usize,
    pub face_image: usize,
    pub photo: usize,
}

impl Default for UserProfile {
    /// Sizes in the range of real devices: 384-byte finger templates, a
    /// 552-byte face template, a ~12 KiB face image and a 4 KiB photo.
    fn default() -> Self {
        UserProfile {
            finger_template: 384,
            face_template: 552,
            face_image: 12 * 1024,
            photo: 4 * 1024,
        }
    }
}

fn seed(id: &str, revision: u32) -> u64 {
    // FNV-1a: stable across runs and platforms (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes().iter().chain(revision.to_le_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn blob(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(v.as_mut_slice());
    v
}

/// A 32-byte CSN card, zero-padded at the front (WIRE.md §2.4).
pub fn csn_card(rng: &mut SmallRng) -> CsnCardData {
    let mut data = vec![0u8; 32];
    rng.fill(&mut data[25..]);
    CsnCardData {
        r#type: CardType::CardTypeCsn as i32,
        size: 32,
        data,
    }
}

/// A generated card for Card.Scan.
pub fn scanned_card(seed_value: u64) -> CsnCardData {
    csn_card(&mut SmallRng::seed_from_u64(seed_value))
}

struct Parts {
    setting: UserSetting,
    name: String,
    cards: Vec<CsnCardData>,
    fingers: Vec<FingerData>,
    face_templates: Vec<Vec<u8>>,
    face_image: Vec<u8>,
    access_groups: Vec<u32>,
    job_codes: Vec<JobCode>,
    pin: Vec<u8>,
    photo: Vec<u8>,
}

fn parts(id: &str, revision: u32, profile: UserProfile) -> Parts {
    let mut rng = SmallRng::seed_from_u64(seed(id, revision));
    let fingers = (0..2)
        .map(|index| FingerData {
            index,
            flag: 0,
            templates: vec![
                blob(&mut rng, profile.finger_template),
                blob(&mut rng, profile.finger_template),
            ],
        })
        .collect();
    Parts {
        setting: UserSetting {
            start_time: 978_307_200,
            end_time: 1_924_991_999,
            biometric_auth_mode: 255,
            card_auth_mode: 255,
            id_auth_mode: 255,
            security_level: 0,
            face_auth_ext_mode: 255,
            finger_auth_ext_mode: 255,
            card_auth_ext_mode: 255,
            id_auth_ext_mode: 255,
        },
        name: format!("User {id} rev {revision}"),
        cards: vec![csn_card(&mut rng)],
        fingers,
        face_templates: vec![blob(&mut rng, profile.face_template)],
        face_image: blob(&mut rng, profile.face_image),
        access_groups: vec![1, 2 + revision % 3],
        job_codes: vec![JobCode {
            code: 100 + revision,
            label: "Shift A".into(),
        }],
        pin: blob(&mut rng, 32),
        photo: blob(&mut rng, profile.photo),
    }
}

/// Builds the raw `UserInfo` of user `id` at `revision` in `numbering`.
pub fn generate(id: &str, revision: u32, numbering: Numbering, profile: UserProfile) -> Vec<u8> {
    let p = parts(id, revision, profile);
    match numbering {
        Numbering::V18 => v18::UserInfo {
            hdr: Some(v18::UserHdr {
                id: id.to_owned(),
                user_flag: if revision == 0 { 0x01 } else { 0x02 },
                num_of_card: 1,
                num_of_finger: 2,
                num_of_face: 1,
                auth_group_id: 0,
                update_mask: 0,
            }),
            setting: Some(p.setting),
            name: p.name,
            cards: p.cards,
            fingers: p.fingers,
            faces: vec![v18::FaceData {
                index: 0,
                flag: 0,
                templates: p.face_templates,
                image_data: p.face_image,
                ir_templates: Vec::new(),
                ir_image_data: Vec::new(),
            }],
            access_group_i_ds: p.access_groups,
            job_codes: p.job_codes,
            pin: p.pin,
            photo: p.photo,
        }
        .encode_to_vec(),
        Numbering::V16 => v16::UserInfo {
            hdr: Some(v16::UserHdr {
                id: id.to_owned(),
                num_of_card: 1,
                num_of_finger: 2,
                num_of_face: 1,
                auth_group_id: 0,
                update_mask: 0,
            }),
            setting: Some(p.setting),
            name: p.name,
            cards: p.cards,
            fingers: p.fingers,
            faces: vec![v16::FaceData {
                index: 0,
                flag: 0,
                templates: p.face_templates,
                image_data: p.face_image,
                ir_templates: Vec::new(),
                ir_image_data: Vec::new(),
            }],
            access_group_i_ds: p.access_groups,
            job_codes: p.job_codes,
            pin: p.pin,
            photo: p.photo,
        }
        .encode_to_vec(),
    }
}

/// A V1.8 user with every field of every message set (IR face data
/// included), for losslessness tests.
pub fn every_field_v18(id: &str) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed(id, 0xFFFF));
    v18::UserInfo {
        hdr: Some(v18::UserHdr {
            id: id.to_owned(),
            user_flag: 0x82,
            num_of_card: 2,
            num_of_finger: 1,
            num_of_face: 1,
            auth_group_id: 7,
            update_mask: 0x10,
        }),
        setting: Some(UserSetting {
            start_time: 1,
            end_time: 2,
            biometric_auth_mode: 3,
            card_auth_mode: 4,
            id_auth_mode: 5,
            security_level: 5,
            face_auth_ext_mode: 11,
            finger_auth_ext_mode: 16,
            card_auth_ext_mode: 21,
            id_auth_ext_mode: 36,
        }),
        name: "Zoë Ñandú 名前".into(),
        cards: vec![csn_card(&mut rng), csn_card(&mut rng)],
        fingers: vec![FingerData {
            index: 3,
            flag: 1,
            templates: vec![blob(&mut rng, 384), blob(&mut rng, 384)],
        }],
        faces: vec![v18::FaceData {
            index: 1,
            flag: 0x120,
            templates: vec![blob(&mut rng, 552)],
            image_data: blob(&mut rng, 9000),
            ir_templates: vec![blob(&mut rng, 552)],
            ir_image_data: blob(&mut rng, 7000),
        }],
        access_group_i_ds: vec![1, 2, 3, 16],
        job_codes: vec![JobCode {
            code: 42,
            label: "Night".into(),
        }],
        pin: blob(&mut rng, 32),
        photo: blob(&mut rng, 16 * 1024),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::peek_user_id;

    #[test]
    fn generation_is_deterministic_and_revision_changes_content() {
        let p = UserProfile::default();
        let a = generate("1000", 0, Numbering::V18, p);
        assert_eq!(a, generate("1000", 0, Numbering::V18, p));
        assert_ne!(a, generate("1000", 1, Numbering::V18, p));
        assert_ne!(a, generate("1001", 0, Numbering::V18, p));
        assert_eq!(peek_user_id(&a).unwrap(), "1000");
        assert!(a.len() > 16 * 1024, "realistic size, got {}", a.len());
    }

    #[test]
    fn numberings_differ_on_the_wire_as_wire_md_says() {
        let p = UserProfile::default();
        let new = generate("55", 0, Numbering::V18, p);
        let old = generate("55", 0, Numbering::V16, p);
        assert_ne!(new, old);
        // Decoding a V1.6 record with the V1.8 schema succeeds but puts
        // numOfCard (field 2) into userFlag: the silent corruption the
        // opaque-bytes design avoids.
        let wrong = v18::UserInfo::decode(old.as_slice()).unwrap();
        let hdr = wrong.hdr.unwrap();
        assert_eq!(hdr.user_flag, 1);
        assert_eq!(hdr.num_of_card, 2);
        let right = v16::UserInfo::decode(old.as_slice()).unwrap();
        assert_eq!(right.hdr.unwrap().num_of_card, 1);
        let face = v16::UserInfo::decode(new.as_slice()).unwrap().faces;
        assert!(
            face[0].image_data.is_empty(),
            "V1.8 imageData (4) is not V1.6 imageData (5)"
        );
    }
}
