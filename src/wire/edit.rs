//! Editing a raw user record in place (a card added, a name set): the
//! fields of the record are walked at the byte level and only the one
//! edited is replaced, so every other byte — unknown fields too — is kept
//! (DESIGN.md "Lossless across gateway versions").

use super::*;

/// One field of a raw protobuf message, located by byte offsets: the
/// whole field (key included) is `start..end`, its payload `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawField {
    pub(super) number: u32,
    pub(super) wire_type: u8,
    pub(super) start: usize,
    pub(super) value: std::ops::Range<usize>,
    pub(super) end: usize,
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
pub(super) fn raw_fields(buf: &[u8]) -> Result<Vec<RawField>, PeekError> {
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

pub(super) fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
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
pub(super) const USER_HDR: u32 = 1;
pub(super) const USER_NAME: u32 = 3;
pub(super) const USER_CARDS: u32 = 4;
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
