//! Wire facts of the G-SDK gateway that both the client and the simulator
//! depend on: the API generation (package prefix, user numbering, the name of
//! the Multi-error type) and the byte-level peeks into user records.
//!
//! This module must never re-encode a user record: records are forwarded byte
//! for byte (DESIGN.md "Lossless across gateway versions").

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use prost::Message;

/// The gateway API generation a site runs (WIRE.md §1.1, §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Api {
    /// V1.0–V1.4: bare package names (`/user.User/Get`).
    V1_4,
    /// V1.5–V1.6: `gsdk.` packages, ≤V1.6 UserHdr/FaceData numbering.
    V1_5,
    /// V1.8 and later: `gsdk.` packages, V1.8 numbering.
    #[default]
    V1_8,
}

/// Which field numbering `UserHdr` and `FaceData` use (WIRE.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Numbering {
    /// V1.4 … V1.6.0.
    V16,
    /// V1.8.0 onwards.
    V18,
}

impl Api {
    pub const ALL: [Api; 3] = [Api::V1_4, Api::V1_5, Api::V1_8];

    /// Whether method paths carry the `gsdk.` package prefix (V1.5+).
    pub fn uses_gsdk_prefix(self) -> bool {
        !matches!(self, Api::V1_4)
    }

    pub fn numbering(self) -> Numbering {
        match self {
            Api::V1_4 | Api::V1_5 => Numbering::V16,
            Api::V1_8 => Numbering::V18,
        }
    }

    /// The full protobuf name the gateway of this generation gives the
    /// Multi-error detail (WIRE.md §1.4).
    pub fn multi_error_type_name(self) -> &'static str {
        if self.uses_gsdk_prefix() {
            GSDK_MULTI_ERROR
        } else {
            LEGACY_MULTI_ERROR
        }
    }

    /// The version string a gateway of this generation reports in
    /// `Admin.GetInfo` (the format is undocumented, WIRE.md §5.8).
    pub fn nominal_version(self) -> &'static str {
        match self {
            Api::V1_4 => "1.4.0",
            Api::V1_5 => "1.5.2",
            Api::V1_8 => "1.8.0",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Api::V1_4 => "v1.4",
            Api::V1_5 => "v1.5",
            Api::V1_8 => "v1.8",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Api {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1.4" => Ok(Api::V1_4),
            "v1.5" => Ok(Api::V1_5),
            "v1.8" => Ok(Api::V1_8),
            other => Err(format!(
                "unknown api generation {other:?}; expected \"v1.4\", \"v1.5\" or \"v1.8\""
            )),
        }
    }
}

/// Multi-error detail names of both eras (WIRE.md §1.4).
pub const LEGACY_MULTI_ERROR: &str = "err.MultiErrorResponse";
pub const GSDK_MULTI_ERROR: &str = "gsdk.err.MultiErrorResponse";

const GSDK_PREFIX: &str = "/gsdk.";

/// Maps a method path of our codegen (always `/gsdk.<pkg>.<Svc>/<M>`) to the
/// path the gateway of `api` serves. Used by the client.
pub fn client_path(api: Api, path: &str) -> Cow<'_, str> {
    match path.strip_prefix(GSDK_PREFIX) {
        Some(rest) if !api.uses_gsdk_prefix() => Cow::Owned(format!("/{rest}")),
        _ => Cow::Borrowed(path),
    }
}

/// Maps an incoming path to the path of our codegen, for a server that
/// serves `api`. Paths of the other namespace are mapped to a path no route
/// serves, so they fail with UNIMPLEMENTED as on a real gateway (WIRE.md §1.3).
pub fn server_path(api: Api, path: &str) -> Cow<'_, str> {
    let has_prefix = path.starts_with(GSDK_PREFIX);
    match (api.uses_gsdk_prefix(), has_prefix) {
        (true, true) | (true, false) => Cow::Borrowed(path),
        (false, true) => Cow::Owned(format!("/wrong-namespace{path}")),
        (false, false) => Cow::Owned(format!("/gsdk.{}", path.trim_start_matches('/'))),
    }
}

/// A user record exactly as the gateway delivered it, with the user ID peeked
/// from `hdr.ID`. `Debug` never shows the bytes: they hold templates, the PIN
/// hash and the photo.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub raw: Vec<u8>,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("id", &self.id)
            .field("bytes", &self.raw.len())
            .finish()
    }
}

impl UserRecord {
    /// Wraps a raw `UserInfo`, peeking its ID.
    pub fn from_raw(raw: Vec<u8>) -> Result<Self, PeekError> {
        let id = peek_user_id(&raw)?;
        Ok(UserRecord { id, raw })
    }
}

/// User IDs: ≤ 32 bytes, not "0", printable (WIRE.md §2.3 UserHdr notes).
/// What a user built from scratch (the operator's enroll, the simulator)
/// must have; records read from devices are forwarded whatever their ID.
pub fn validate_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id == "0" || id.len() > 32 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "invalid user ID {id:?}: 1–32 printable ASCII characters, not \"0\""
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeekError {
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("record has no user ID")]
    MissingId,
}

/// Only field 1 (`ID`) of UserHdr, identical in every numbering. prost skips
/// every other field while decoding, and the peek is never re-encoded.
#[derive(Clone, PartialEq, Message)]
struct HdrIdPeek {
    #[prost(string, tag = "1")]
    id: String,
}

/// Only field 1 (`hdr`) of UserInfo.
#[derive(Clone, PartialEq, Message)]
struct UserIdPeek {
    #[prost(message, optional, tag = "1")]
    hdr: Option<HdrIdPeek>,
}

/// Extracts `hdr.ID` (field 1 of field 1) from a raw `UserInfo`.
pub fn peek_user_id(raw: &[u8]) -> Result<String, PeekError> {
    let peek = UserIdPeek::decode(raw).map_err(|e| PeekError::Malformed(e.to_string()))?;
    non_empty(peek.hdr.map(|h| h.id).unwrap_or_default())
}

/// Extracts `ID` (field 1) from a raw `UserHdr` (GetList).
pub fn peek_hdr_id(raw: &[u8]) -> Result<String, PeekError> {
    let peek = HdrIdPeek::decode(raw).map_err(|e| PeekError::Malformed(e.to_string()))?;
    non_empty(peek.id)
}

/// Extracts the raw `hdr` submessage (field 1) of a raw `UserInfo`, byte for
/// byte, so a GetList answer keeps whatever numbering the record has.
pub fn raw_hdr(raw: &[u8]) -> Result<Vec<u8>, PeekError> {
    #[derive(Clone, PartialEq, Message)]
    struct RawHdr {
        #[prost(bytes = "vec", optional, tag = "1")]
        hdr: Option<Vec<u8>>,
    }
    let peek = RawHdr::decode(raw).map_err(|e| PeekError::Malformed(e.to_string()))?;
    peek.hdr.ok_or(PeekError::MissingId)
}

fn non_empty(id: String) -> Result<String, PeekError> {
    if id.is_empty() {
        Err(PeekError::MissingId)
    } else {
        Ok(id)
    }
}

// ---- editing a raw record in place -------------------------------------------

/// One field of a raw protobuf message, located by byte offsets: the
/// whole field (key included) is `start..end`, its payload `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawField {
    number: u32,
    wire_type: u8,
    start: usize,
    value: std::ops::Range<usize>,
    end: usize,
}

fn malformed(what: &str) -> PeekError {
    PeekError::Malformed(what.to_owned())
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, PeekError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or_else(|| malformed("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(malformed("varint longer than 10 bytes"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Splits a message into its fields without interpreting any of them.
fn raw_fields(buf: &[u8]) -> Result<Vec<RawField>, PeekError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let number = u32::try_from(key >> 3).map_err(|_| malformed("field number out of range"))?;
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        let wire_type = (key & 7) as u8;
        let value_start = match wire_type {
            0 => {
                let s = pos;
                read_varint(buf, &mut pos)?;
                s
            }
            1 => {
                pos += 8;
                pos - 8
            }
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?)
                    .map_err(|_| malformed("length out of range"))?;
                pos = pos
                    .checked_add(len)
                    .ok_or_else(|| malformed("length out of range"))?;
                pos - len
            }
            5 => {
                pos += 4;
                pos - 4
            }
            _ => return Err(malformed("group or unknown wire type")),
        };
        if pos > buf.len() {
            return Err(malformed("field runs past the end of the record"));
        }
        out.push(RawField {
            number,
            wire_type,
            start,
            value: value_start..pos,
            end: pos,
        });
    }
    Ok(out)
}

fn key(number: u32, wire_type: u8) -> u64 {
    (u64::from(number) << 3) | u64::from(wire_type)
}

fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 6);
    put_varint(&mut out, key(number, 2));
    put_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

/// Rebuilds `buf` with every occurrence of field `number` removed and
/// `replacement` (a whole encoded field, or nothing) put where the first
/// occurrence was, else after the last field numbered below `number`.
/// Every other field keeps its bytes and its place.
fn replace_field(buf: &[u8], number: u32, replacement: &[u8]) -> Result<Vec<u8>, PeekError> {
    let fields = raw_fields(buf)?;
    let at = fields
        .iter()
        .position(|f| f.number == number)
        .or_else(|| {
            fields
                .iter()
                .rposition(|f| f.number < number)
                .map(|i| i + 1)
        })
        .unwrap_or(0);
    let mut out = Vec::with_capacity(buf.len() + replacement.len());
    for (i, f) in fields.iter().enumerate() {
        if i == at {
            out.extend_from_slice(replacement);
        }
        if f.number != number {
            out.extend_from_slice(&buf[f.start..f.end]);
        }
    }
    if at >= fields.len() {
        out.extend_from_slice(replacement);
    }
    Ok(out)
}

/// UserInfo field numbers, the same in every generation (WIRE.md §2.3).
const USER_HDR: u32 = 1;
const USER_NAME: u32 = 3;
const USER_CARDS: u32 = 4;
const USER_FINGERS: u32 = 5;
const USER_FACES: u32 = 6;

/// Most cards a user may hold (WIRE.md §2.3, `numOfCard` ≤ 8).
pub const MAX_CARDS: usize = 8;

impl Numbering {
    /// `UserHdr.numOfCard`: 2 up to V1.6, 3 from V1.8 (WIRE.md §1.3).
    fn num_of_card_field(self) -> u32 {
        self.count_fields()[0]
    }

    /// `UserHdr` numbers of (numOfCard, numOfFinger, numOfFace), counting
    /// UserInfo's cards (4), fingers (5) and faces (6) (WIRE.md §1.3).
    fn count_fields(self) -> [u32; 3] {
        match self {
            Numbering::V16 => [2, 3, 4],
            Numbering::V18 => [3, 4, 5],
        }
    }

    /// The `[gateway] api` value of a gateway with this numbering (v1.4
    /// shares v1.5's numbering and differs in its method paths only).
    pub fn api_name(self) -> &'static str {
        match self {
            Numbering::V16 => "v1.5",
            Numbering::V18 => "v1.8",
        }
    }

    /// The gateway versions that use this numbering, in words.
    pub fn gateways(self) -> &'static str {
        match self {
            Numbering::V16 => "gateways up to V1.6",
            Numbering::V18 => "gateways V1.8 and later",
        }
    }

    pub fn other(self) -> Numbering {
        match self {
            Numbering::V16 => Numbering::V18,
            Numbering::V18 => Numbering::V16,
        }
    }
}

/// Which numbering a record's header counts agree with: a header fits a
/// numbering when its numOfCard, numOfFinger and numOfFace (read at that
/// numbering's field numbers, absent = 0) equal the number of cards,
/// fingers and faces the record holds. Wire types are the same in both
/// numberings (WIRE.md §1.3), so this is the only evidence a record gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberingFit {
    /// Nothing tells them apart (e.g. a user with no credential and no
    /// flag).
    Both,
    Only(Numbering),
    Neither,
}

impl NumberingFit {
    /// Whether a record that fits so may be edited with `numbering`.
    pub fn allows(self, numbering: Numbering) -> bool {
        match self {
            NumberingFit::Both => true,
            NumberingFit::Only(n) => n == numbering,
            NumberingFit::Neither => false,
        }
    }
}

/// The single `hdr` (UserInfo field 1) of a record's fields.
fn the_header(fields: &[RawField]) -> Result<&RawField, PeekError> {
    let hdrs: Vec<&RawField> = fields.iter().filter(|f| f.number == USER_HDR).collect();
    let [hdr] = hdrs.as_slice() else {
        return Err(malformed("the record does not have exactly one header"));
    };
    if hdr.wire_type != 2 {
        return Err(malformed("the header is not a message"));
    }
    Ok(hdr)
}

/// How a raw `UserInfo` fits the two numberings ([`NumberingFit`]).
pub fn numbering_fit(raw: &[u8]) -> Result<NumberingFit, PeekError> {
    let fields = raw_fields(raw)?;
    let hdr = the_header(&fields)?;
    let hdr_bytes = &raw[hdr.value.clone()];
    let hdr_fields = raw_fields(hdr_bytes)?;
    let held = [USER_CARDS, USER_FINGERS, USER_FACES].map(|n| {
        fields
            .iter()
            .filter(|f| f.number == n && f.wire_type == 2)
            .count() as u64
    });
    let fits = |numbering: Numbering| -> Result<bool, PeekError> {
        for (field, held) in numbering.count_fields().into_iter().zip(held) {
            let mut count = 0u64;
            for f in hdr_fields.iter().filter(|f| f.number == field) {
                if f.wire_type != 0 {
                    return Ok(false);
                }
                // The last occurrence wins, as in any protobuf decoder.
                let mut pos = f.value.start;
                count = read_varint(hdr_bytes, &mut pos)?;
            }
            if count != held {
                return Ok(false);
            }
        }
        Ok(true)
    };
    Ok(match (fits(Numbering::V16)?, fits(Numbering::V18)?) {
        (true, true) => NumberingFit::Both,
        (true, false) => NumberingFit::Only(Numbering::V16),
        (false, true) => NumberingFit::Only(Numbering::V18),
        (false, false) => NumberingFit::Neither,
    })
}

/// The numbering a gateway uses, judged from the version string
/// `Admin.GetInfo` reports (`"1.8.0"`, `"v1.5.2"`). The format is not
/// documented (WIRE.md §1.3), so anything else — and V1.7, where the break
/// probably lies (WIRE.md §1.2) — is `None`: no opinion.
pub fn numbering_of_version(version: &str) -> Option<Numbering> {
    let v = version.trim();
    let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
    let (major, rest) = v.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    match (major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?) {
        (1, 0..=6) => Some(Numbering::V16),
        (1, 8..) => Some(Numbering::V18),
        _ => None,
    }
}

/// Why a record was not edited.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EditError {
    #[error(transparent)]
    Peek(#[from] PeekError),
    /// The header's counts do not fit the numbering the edit would use:
    /// writing numOfCard at its field number would overwrite another field
    /// (the V1.8 userFlag, say).
    #[error("{}", wrong_numbering(*.numbering, *.fit))]
    WrongNumbering {
        numbering: Numbering,
        fit: NumberingFit,
    },
    #[error("the user already has {MAX_CARDS} cards, the most a user may hold")]
    CardLimit,
}

fn wrong_numbering(numbering: Numbering, fit: NumberingFit) -> String {
    match fit {
        NumberingFit::Only(n) => format!(
            "the record's header is in the numbering of api = \"{}\" ({}), not of api = \"{}\" ({}): its \
             numOfCard, numOfFinger and numOfFace match the cards, fingers and faces it holds only when read \
             that way",
            n.api_name(),
            n.gateways(),
            numbering.api_name(),
            numbering.gateways()
        ),
        _ => "the record's header fits neither numbering: its numOfCard, numOfFinger and numOfFace match \
              the cards, fingers and faces it holds neither as api = \"v1.5\" nor as api = \"v1.8\" reads \
              them"
            .to_owned(),
    }
}

/// The raw `cards` entries (`CSNCardData`, UserInfo field 4) of a record.
pub fn raw_cards(raw: &[u8]) -> Result<Vec<Vec<u8>>, PeekError> {
    Ok(raw_fields(raw)?
        .into_iter()
        .filter(|f| f.number == USER_CARDS && f.wire_type == 2)
        .map(|f| raw[f.value].to_vec())
        .collect())
}

/// Adds a card (an encoded `CSNCardData`) to a raw `UserInfo` without
/// re-encoding anything else: the entry goes after the record's last
/// card (UserInfo field 4) and `hdr.numOfCard` is set to the new number of
/// cards. Every other byte — name, fingers, faces, PIN, photo, access
/// groups, fields no schema of ours knows — stays as it was.
///
/// Refused ([`EditError`]) when the record's header does not fit
/// `numbering` ([`numbering_fit`]: numOfCard would land on another field)
/// or the user already holds [`MAX_CARDS`] cards.
pub fn add_card(raw: &[u8], numbering: Numbering, card: &[u8]) -> Result<Vec<u8>, EditError> {
    let fields = raw_fields(raw)?;
    let hdr = the_header(&fields)?;
    let fit = numbering_fit(raw)?;
    if !fit.allows(numbering) {
        return Err(EditError::WrongNumbering { numbering, fit });
    }
    let cards = fields
        .iter()
        .filter(|f| f.number == USER_CARDS && f.wire_type == 2)
        .count();
    if cards >= MAX_CARDS {
        return Err(EditError::CardLimit);
    }
    // The header, with only numOfCard changed.
    let mut count = Vec::new();
    let n = numbering.num_of_card_field();
    put_varint(&mut count, key(n, 0));
    put_varint(&mut count, cards as u64 + 1);
    let new_hdr = replace_field(&raw[hdr.value.clone()], n, &count)?;
    // The card after the last field numbered up to 4 (after the existing
    // cards, or after the name), so the record keeps its field order.
    let card_at = fields
        .iter()
        .rposition(|f| f.number <= USER_CARDS)
        .map_or(0, |i| i + 1);
    let mut out = Vec::with_capacity(raw.len() + card.len() + 8);
    for (i, f) in fields.iter().enumerate() {
        if i == card_at {
            out.extend_from_slice(&len_field(USER_CARDS, card));
        }
        if f.number == USER_HDR {
            out.extend_from_slice(&len_field(USER_HDR, &new_hdr));
        } else {
            out.extend_from_slice(&raw[f.start..f.end]);
        }
    }
    if card_at >= fields.len() {
        out.extend_from_slice(&len_field(USER_CARDS, card));
    }
    Ok(out)
}

/// Sets the name (UserInfo field 3) of a raw `UserInfo`, every other byte
/// untouched.
pub fn set_name(raw: &[u8], name: &str) -> Result<Vec<u8>, PeekError> {
    let field = if name.is_empty() {
        Vec::new()
    } else {
        len_field(USER_NAME, name.as_bytes())
    };
    replace_field(raw, USER_NAME, &field)
}

#[cfg(test)]
mod tests {
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
}
