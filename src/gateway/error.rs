//! Gateway failures: the one place where a gRPC failure is decoded (Multi
//! errors in the status details, WIRE.md §1.4) and classified as transient
//! (retry with backoff) or permanent.

use std::fmt;
use std::time::Duration;

use prost::Message;
use tonic::Code;
// The standard `google.rpc.Status` of `grpc-status-details-bin`; its
// details stay `Any`s, matched here by type name (WIRE.md §1.4).
use tonic_types::Status as RpcStatus;

use crate::proto::gsdk::err::MultiErrorResponse;
use crate::wire::{GSDK_MULTI_ERROR, LEGACY_MULTI_ERROR, PeekError};

/// What a caller should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The device or gateway may succeed later: back off and retry.
    Transient,
    /// Retrying the same request will fail the same way.
    Permanent,
}

/// Classifies a gRPC code. Unknown and Internal count as transient: devices
/// and the gateway report link glitches with them, and callers bound their
/// retries (the sync engine quarantines a user that keeps failing).
pub fn classify(code: Code) -> Disposition {
    match code {
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unavailable => Disposition::Transient,
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => Disposition::Permanent,
    }
}

/// One device's failure inside a Multi call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    pub device_id: u32,
    pub code: Code,
    pub msg: String,
}

impl DeviceError {
    pub fn disposition(&self) -> Disposition {
        classify(self.code)
    }
}

/// A Multi call that failed on some of its devices. Devices not listed
/// succeeded (WIRE.md B22).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiError {
    /// The status code of the call as a whole (undocumented, WIRE.md §5.2).
    pub code: Code,
    pub message: String,
    pub devices: Vec<DeviceError>,
}

impl MultiError {
    /// Decodes the per-device errors from a failed call's
    /// `grpc-status-details-bin`. Returns `None` when the status carries no
    /// Multi-error detail (a plain failure of the whole call). Accepts the
    /// detail under both names and any type-URL prefix (match on the name
    /// after the last `/`), and merges several details if a gateway sends them.
    pub fn from_status(status: &tonic::Status) -> Option<MultiError> {
        let details = status.details();
        if details.is_empty() {
            return None;
        }
        let rpc = match RpcStatus::decode(details) {
            Ok(rpc) => rpc,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable grpc-status-details-bin; treating the call as failed on every device");
                return None;
            }
        };
        let mut devices = Vec::new();
        let mut found = false;
        for any in &rpc.details {
            let name = any.type_url.rsplit('/').next().unwrap_or_default();
            if name != GSDK_MULTI_ERROR && name != LEGACY_MULTI_ERROR {
                continue;
            }
            match MultiErrorResponse::decode(any.value.as_slice()) {
                Ok(multi) => {
                    found = true;
                    devices.extend(multi.device_errors.into_iter().map(|e| DeviceError {
                        device_id: e.device_id,
                        code: Code::from_i32(e.code),
                        msg: e.msg,
                    }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, type_name = name, "undecodable Multi-error detail skipped");
                }
            }
        }
        found.then(|| MultiError {
            code: status.code(),
            message: status.message().to_owned(),
            devices,
        })
    }

    pub fn failed_devices(&self) -> impl Iterator<Item = u32> + '_ {
        self.devices.iter().map(|d| d.device_id)
    }

    pub fn for_device(&self, device_id: u32) -> Option<&DeviceError> {
        self.devices.iter().find(|d| d.device_id == device_id)
    }
}

impl fmt::Display for MultiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "failed on {} device(s):", self.devices.len())?;
        for d in &self.devices {
            write!(f, " {} ({:?}: {})", d.device_id, d.code, d.msg)?;
        }
        Ok(())
    }
}

/// A failed gateway operation.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{method}: {} ({:?})", .status.message(), .status.code())]
    Rpc {
        method: &'static str,
        status: tonic::Status,
    },
    #[error("{method}: {error}")]
    Multi {
        method: &'static str,
        error: MultiError,
    },
    #[error("{method}: no answer within {after:?}")]
    Timeout {
        method: &'static str,
        after: Duration,
    },
    #[error("{method}: bad data from the gateway: {reason}")]
    BadData {
        method: &'static str,
        reason: String,
    },
    #[error("gateway channel: {0}")]
    Channel(String),
}

impl GatewayError {
    /// Wraps a failed call's status (unary or a stream's ending), decoding
    /// Multi errors.
    pub fn from_status(method: &'static str, status: tonic::Status) -> Self {
        match MultiError::from_status(&status) {
            Some(error) => GatewayError::Multi { method, error },
            None => GatewayError::Rpc { method, status },
        }
    }

    /// The disposition of the call as a whole. For a Multi error this is
    /// transient if any device may succeed on retry; callers that care about
    /// single devices look at [`MultiError::devices`].
    pub fn disposition(&self) -> Disposition {
        match self {
            GatewayError::Rpc { status, .. } => classify(status.code()),
            GatewayError::Multi { error, .. } => {
                if error
                    .devices
                    .iter()
                    .any(|d| d.disposition() == Disposition::Transient)
                    || error.devices.is_empty()
                {
                    Disposition::Transient
                } else {
                    Disposition::Permanent
                }
            }
            GatewayError::Timeout { .. } => Disposition::Transient,
            GatewayError::BadData { .. } => Disposition::Permanent,
            GatewayError::Channel(_) => Disposition::Transient,
        }
    }

    /// The gRPC code of a plain failure, if it was one.
    pub fn code(&self) -> Option<Code> {
        match self {
            GatewayError::Rpc { status, .. } => Some(status.code()),
            GatewayError::Multi { error, .. } => Some(error.code),
            _ => None,
        }
    }

    /// The code `device` answered: its entry in a Multi error, or the
    /// call's own.
    pub fn code_for(&self, device: u32) -> Option<Code> {
        match self
            .multi()
            .and_then(|m| m.devices.iter().find(|d| d.device_id == device))
        {
            Some(d) => Some(d.code),
            None => self.code(),
        }
    }

    /// Whether the device answered the call with a code that says nothing
    /// of why (INTERNAL, UNKNOWN, ABORTED: a device error passed on), as a
    /// gateway may for a user it does not hold (WIRE.md §5.3), rather than
    /// not answering (unavailable, timed out, cut off).
    pub fn answered_vaguely(&self, device: u32) -> bool {
        matches!(
            self.code_for(device),
            Some(Code::Internal | Code::Unknown | Code::Aborted)
        )
    }

    pub fn multi(&self) -> Option<&MultiError> {
        match self {
            GatewayError::Multi { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<(&'static str, PeekError)> for GatewayError {
    fn from((method, e): (&'static str, PeekError)) -> Self {
        GatewayError::BadData {
            method,
            reason: e.to_string(),
        }
    }
}

/// Builds the status a gateway sends for a failed Multi call: `code`, and the
/// per-device errors packed as an Any named for the gateway generation. The
/// simulator uses it; tests use it to produce both type names.
pub fn multi_error_status(
    code: Code,
    message: &str,
    type_name: &str,
    errors: Vec<crate::proto::gsdk::err::ErrorResponse>,
) -> tonic::Status {
    let detail = prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: MultiErrorResponse {
            device_errors: errors,
        }
        .encode_to_vec(),
    };
    let rpc = RpcStatus {
        code: code as i32,
        message: message.to_owned(),
        details: vec![detail],
    };
    tonic::Status::with_details(code, message, rpc.encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::gsdk::err::ErrorResponse;

    fn errors() -> Vec<ErrorResponse> {
        vec![
            ErrorResponse {
                device_id: 7,
                code: Code::Unavailable as i32,
                msg: "offline".into(),
            },
            ErrorResponse {
                device_id: 9,
                code: Code::InvalidArgument as i32,
                msg: "cannot store face".into(),
            },
        ]
    }

    #[test]
    fn decodes_both_type_names() {
        for name in [GSDK_MULTI_ERROR, LEGACY_MULTI_ERROR] {
            let status = multi_error_status(Code::Internal, "multi failed", name, errors());
            let m = MultiError::from_status(&status).expect("multi error");
            assert_eq!(m.code, Code::Internal);
            assert_eq!(m.failed_devices().collect::<Vec<_>>(), vec![7, 9]);
            assert_eq!(m.for_device(9).unwrap().code, Code::InvalidArgument);
            assert_eq!(
                m.for_device(7).unwrap().disposition(),
                Disposition::Transient
            );
            assert_eq!(
                m.for_device(9).unwrap().disposition(),
                Disposition::Permanent
            );
        }
    }

    #[test]
    fn accepts_any_type_url_prefix_and_several_details() {
        let a = prost_types::Any {
            type_url: "example.com/x/y/gsdk.err.MultiErrorResponse".into(),
            value: MultiErrorResponse {
                device_errors: errors()[..1].to_vec(),
            }
            .encode_to_vec(),
        };
        let b = prost_types::Any {
            type_url: "err.MultiErrorResponse".into(),
            value: MultiErrorResponse {
                device_errors: errors()[1..].to_vec(),
            }
            .encode_to_vec(),
        };
        let other = prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
            value: vec![1, 2, 3],
        };
        let rpc = RpcStatus {
            code: 2,
            message: "m".into(),
            details: vec![other, a, b],
        };
        let status = tonic::Status::with_details(Code::Unknown, "m", rpc.encode_to_vec().into());
        let m = MultiError::from_status(&status).unwrap();
        assert_eq!(m.failed_devices().collect::<Vec<_>>(), vec![7, 9]);
    }

    #[test]
    fn plain_and_garbled_statuses_are_not_multi() {
        assert!(MultiError::from_status(&tonic::Status::unavailable("x")).is_none());
        let garbled = tonic::Status::with_details(Code::Internal, "x", vec![0xff, 0xff].into());
        assert!(MultiError::from_status(&garbled).is_none());
        let foreign = RpcStatus {
            code: 13,
            message: "x".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                value: vec![],
            }],
        };
        let s = tonic::Status::with_details(Code::Internal, "x", foreign.encode_to_vec().into());
        assert!(MultiError::from_status(&s).is_none());
        let e = GatewayError::from_status("EnrollMulti", s);
        assert!(matches!(e, GatewayError::Rpc { .. }));
        assert_eq!(e.disposition(), Disposition::Transient);
    }

    #[test]
    fn disposition_of_whole_errors() {
        let all_permanent = GatewayError::Multi {
            method: "EnrollMulti",
            error: MultiError {
                code: Code::Internal,
                message: String::new(),
                devices: vec![DeviceError {
                    device_id: 1,
                    code: Code::InvalidArgument,
                    msg: String::new(),
                }],
            },
        };
        assert_eq!(all_permanent.disposition(), Disposition::Permanent);
        let not_found = GatewayError::Rpc {
            method: "Get",
            status: tonic::Status::not_found("no user"),
        };
        assert_eq!(not_found.disposition(), Disposition::Permanent);
        assert_eq!(classify(Code::Unavailable), Disposition::Transient);
        assert_eq!(classify(Code::Unimplemented), Disposition::Permanent);
    }
}
