use super::edit::{USER_CARDS, USER_HDR, USER_NAME, len_field, raw_fields};
use super::*;
use crate::proto::usersync::schema::{v16, v18};

#[test]
fn user_ids_are_validated() {
    assert!(validate_user_id("1000").is_ok());
    assert!(validate_user_id("0").is_err());
    assert!(validate_user_id("").is_err());
    assert!(validate_user_id(&"9".repeat(33)).is_err());
    assert!(validate_user_id("a b").is_err());
}

#[test]
fn paths_follow_the_generation() {
    assert_eq!(
        client_path(Api::V1_4, "/gsdk.user.User/Get"),
        "/user.User/Get"
    );
    assert_eq!(
        client_path(Api::V1_5, "/gsdk.user.User/Get"),
        "/gsdk.user.User/Get"
    );
    assert_eq!(
        client_path(Api::V1_8, "/gsdk.user.User/Get"),
        "/gsdk.user.User/Get"
    );
    assert_eq!(
        server_path(Api::V1_4, "/user.User/Get"),
        "/gsdk.user.User/Get"
    );
    assert_eq!(
        server_path(Api::V1_4, "/gsdk.user.User/Get"),
        "/wrong-namespace/gsdk.user.User/Get"
    );
    assert_eq!(
        server_path(Api::V1_8, "/gsdk.user.User/Get"),
        "/gsdk.user.User/Get"
    );
    // A bare path on a gsdk gateway stays bare and so hits no route.
    assert_eq!(server_path(Api::V1_8, "/user.User/Get"), "/user.User/Get");
}

#[test]
fn api_parses_and_prints() {
    for api in Api::ALL {
        assert_eq!(api.as_str().parse::<Api>(), Ok(api));
    }
    assert!("1.8".parse::<Api>().is_err());
    assert_eq!(Api::default(), Api::V1_8);
}

#[test]
fn peeks_id_in_both_numberings() {
    let u18 = v18::UserInfo {
        hdr: Some(v18::UserHdr {
            id: "1000".into(),
            user_flag: 1,
            num_of_card: 2,
            ..Default::default()
        }),
        name: "Ann".into(),
        ..Default::default()
    };
    let u16 = v16::UserInfo {
        hdr: Some(v16::UserHdr {
            id: "2000".into(),
            num_of_card: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(peek_user_id(&u18.encode_to_vec()).unwrap(), "1000");
    assert_eq!(peek_user_id(&u16.encode_to_vec()).unwrap(), "2000");
    let hdr = raw_hdr(&u18.encode_to_vec()).unwrap();
    assert_eq!(hdr, u18.hdr.as_ref().unwrap().encode_to_vec());
    assert_eq!(peek_hdr_id(&hdr).unwrap(), "1000");
}

#[test]
fn peek_rejects_bad_records() {
    assert_eq!(peek_user_id(&[]), Err(PeekError::MissingId));
    assert!(matches!(
        peek_user_id(&[0x0a, 0x05, 0x01]),
        Err(PeekError::Malformed(_))
    ));
    let no_id = v18::UserInfo {
        name: "x".into(),
        ..Default::default()
    };
    assert_eq!(
        peek_user_id(&no_id.encode_to_vec()),
        Err(PeekError::MissingId)
    );
}

#[test]
fn debug_hides_record_bytes() {
    let rec = UserRecord {
        id: "7".into(),
        raw: vec![0xAB; 40],
    };
    let shown = format!("{rec:?}");
    assert!(shown.contains("\"7\""));
    assert!(shown.contains("40"));
    assert!(!shown.contains("171"), "{shown}");
}

/// The record with its header and cards taken out: what adding a card
/// must leave byte for byte.
fn without_hdr_and_cards(raw: &[u8]) -> Vec<u8> {
    raw_fields(raw)
        .unwrap()
        .into_iter()
        .filter(|f| f.number != USER_HDR && f.number != USER_CARDS)
        .flat_map(|f| raw[f.start..f.end].to_vec())
        .collect()
}

#[test]
fn adding_a_card_keeps_every_other_byte() {
    use crate::proto::gsdk::card::CsnCardData;
    let card = CsnCardData {
        r#type: 1,
        size: 32,
        data: vec![7; 32],
    };
    for n in [Numbering::V16, Numbering::V18] {
        let mut raw = crate::sim::users::generate("42", 1, n, Default::default());
        // A field no schema of ours knows (a future generation's).
        raw.extend_from_slice(&len_field(15, b"future"));
        let edited = add_card(&raw, n, &card.encode_to_vec()).unwrap();
        assert_eq!(without_hdr_and_cards(&edited), without_hdr_and_cards(&raw));
        let cards = raw_cards(&edited).unwrap();
        assert_eq!(cards.len(), 2);
        assert_eq!(cards[0], raw_cards(&raw).unwrap()[0]);
        assert_eq!(cards[1], card.encode_to_vec());
        assert_eq!(peek_user_id(&edited).unwrap(), "42");
        match n {
            Numbering::V18 => {
                let (a, b) = (
                    v18::UserInfo::decode(raw.as_slice()).unwrap(),
                    v18::UserInfo::decode(edited.as_slice()).unwrap(),
                );
                let (ha, hb) = (a.hdr.clone().unwrap(), b.hdr.clone().unwrap());
                assert_eq!(hb.num_of_card, 2);
                assert_eq!(
                    (hb.num_of_finger, hb.num_of_face, hb.user_flag),
                    (ha.num_of_finger, ha.num_of_face, ha.user_flag)
                );
                assert_eq!((b.name, b.fingers, b.faces), (a.name, a.fingers, a.faces));
            }
            Numbering::V16 => {
                let (a, b) = (
                    v16::UserInfo::decode(raw.as_slice()).unwrap(),
                    v16::UserInfo::decode(edited.as_slice()).unwrap(),
                );
                let (ha, hb) = (a.hdr.clone().unwrap(), b.hdr.clone().unwrap());
                assert_eq!(hb.num_of_card, 2);
                assert_eq!(
                    (hb.num_of_finger, hb.num_of_face),
                    (ha.num_of_finger, ha.num_of_face)
                );
                assert_eq!((b.name, b.fingers, b.faces), (a.name, a.fingers, a.faces));
            }
        }
        // A user without a card gets its first.
        let bare = v18::UserInfo {
            hdr: Some(v18::UserHdr {
                id: "9".into(),
                ..Default::default()
            }),
            pin: vec![1; 32],
            ..Default::default()
        }
        .encode_to_vec();
        let one = add_card(&bare, Numbering::V18, &card.encode_to_vec()).unwrap();
        let u = v18::UserInfo::decode(one.as_slice()).unwrap();
        assert_eq!((u.cards.len(), u.hdr.unwrap().num_of_card), (1, 1));
        assert_eq!(u.pin, vec![1; 32]);
    }
}

#[test]
fn renaming_keeps_every_other_byte() {
    let raw = crate::sim::users::generate("42", 1, Numbering::V18, Default::default());
    let renamed = set_name(&raw, "Ann").unwrap();
    let u = v18::UserInfo::decode(renamed.as_slice()).unwrap();
    assert_eq!(u.name, "Ann");
    let strip = |r: &[u8]| -> Vec<u8> {
        raw_fields(r)
            .unwrap()
            .into_iter()
            .filter(|f| f.number != USER_NAME)
            .flat_map(|f| r[f.start..f.end].to_vec())
            .collect()
    };
    assert_eq!(strip(&renamed), strip(&raw));
}

/// A V1.8 user as the reviewer found it: disabled (userFlag 0x80), one
/// card, two fingers, a face.
fn disabled_v18_user() -> Vec<u8> {
    let raw = crate::sim::users::generate("77", 1, Numbering::V18, Default::default());
    let mut u = v18::UserInfo::decode(raw.as_slice()).unwrap();
    u.hdr.as_mut().unwrap().user_flag = 0x80;
    u.encode_to_vec()
}

fn csn(seed: u8) -> Vec<u8> {
    crate::proto::gsdk::card::CsnCardData {
        r#type: 1,
        size: 32,
        data: vec![seed; 32],
    }
    .encode_to_vec()
}

#[test]
fn records_fit_the_numbering_they_were_written_in() {
    let v18 = disabled_v18_user();
    assert_eq!(
        numbering_fit(&v18).unwrap(),
        NumberingFit::Only(Numbering::V18)
    );
    let v16 = crate::sim::users::generate("42", 1, Numbering::V16, Default::default());
    assert_eq!(
        numbering_fit(&v16).unwrap(),
        NumberingFit::Only(Numbering::V16)
    );
    // No credential, no flag: nothing tells them apart.
    let bare = v18::UserInfo {
        hdr: Some(v18::UserHdr {
            id: "9".into(),
            ..Default::default()
        }),
        pin: vec![1; 32],
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(numbering_fit(&bare).unwrap(), NumberingFit::Both);
    // Counts that match no reading.
    let liar = v18::UserInfo {
        hdr: Some(v18::UserHdr {
            id: "9".into(),
            num_of_card: 5,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(numbering_fit(&liar).unwrap(), NumberingFit::Neither);
}

/// Finding 1: a disabled V1.8 user edited as ≤V1.6 would get its
/// userFlag (field 2) overwritten with the card count — re-enabled. The
/// edit is refused, naming the numbering the record fits; so is the
/// other way round.
#[test]
fn adding_a_card_refuses_a_record_of_the_other_numbering() {
    let v18 = disabled_v18_user();
    let e = add_card(&v18, Numbering::V16, &csn(1)).unwrap_err();
    assert_eq!(
        e,
        EditError::WrongNumbering {
            numbering: Numbering::V16,
            fit: NumberingFit::Only(Numbering::V18)
        }
    );
    assert!(e.to_string().contains("api = \"v1.8\""), "{e}");
    let ok = add_card(&v18, Numbering::V18, &csn(1)).unwrap();
    let hdr = v18::UserInfo::decode(ok.as_slice()).unwrap().hdr.unwrap();
    assert_eq!(
        (hdr.user_flag, hdr.num_of_card),
        (0x80, 2),
        "still disabled"
    );

    let v16 = crate::sim::users::generate("42", 1, Numbering::V16, Default::default());
    let e = add_card(&v16, Numbering::V18, &csn(1)).unwrap_err();
    assert_eq!(
        e,
        EditError::WrongNumbering {
            numbering: Numbering::V18,
            fit: NumberingFit::Only(Numbering::V16)
        }
    );
    assert!(e.to_string().contains("api = \"v1.5\""), "{e}");
    assert!(add_card(&v16, Numbering::V16, &csn(1)).is_ok());
}

/// Finding 3: the ninth card is refused by the edit itself.
#[test]
fn adding_a_ninth_card_is_refused() {
    let mut raw = crate::sim::users::generate("42", 1, Numbering::V18, Default::default());
    for i in 2..=MAX_CARDS as u8 {
        raw = add_card(&raw, Numbering::V18, &csn(i)).unwrap();
    }
    assert_eq!(raw_cards(&raw).unwrap().len(), MAX_CARDS);
    assert_eq!(
        add_card(&raw, Numbering::V18, &csn(99)),
        Err(EditError::CardLimit)
    );
}

#[test]
fn gateway_versions_name_their_numbering() {
    for (v, n) in [
        ("1.8.0", Some(Numbering::V18)),
        ("v1.8.0", Some(Numbering::V18)),
        ("V1.9.1", Some(Numbering::V18)),
        ("1.10", Some(Numbering::V18)),
        ("v1.5.2", Some(Numbering::V16)),
        ("1.6.0 (build 3)", Some(Numbering::V16)),
        ("1.4", Some(Numbering::V16)),
        ("1.7.1", None),
        ("2.0.0", None),
        ("", None),
        ("gateway", None),
    ] {
        assert_eq!(numbering_of_version(v), n, "{v:?}");
    }
    for api in Api::ALL {
        assert_eq!(
            numbering_of_version(api.nominal_version()),
            Some(api.numbering())
        );
    }
}

#[test]
fn editing_refuses_what_it_cannot_read() {
    assert!(add_card(&[0x0a, 0x05, 0x01], Numbering::V18, &[]).is_err());
    assert!(
        add_card(&[0x1a, 0x00], Numbering::V18, &[]).is_err(),
        "no header"
    );
    assert!(raw_fields(&[0x0b]).is_err(), "groups are not supported");
}
