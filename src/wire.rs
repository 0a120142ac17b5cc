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

mod edit;
#[cfg(test)]
mod tests;

pub use edit::*;
