//! The gateway client: the channel (TLS, keepalive, namespace rewriting),
//! typed per-RPC wrappers, and the classification of failures.
//!
//! Owns every byte that crosses to the gateway; must never decode and
//! re-encode a user record (see [`crate::wire`]).

mod channel;
mod client;
mod error;

pub use channel::{
    ApiPath, DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_INPUT_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, GatewayChannel, GatewaySettings,
    MAX_MESSAGE_BYTES, TlsSettings, connect_lazy,
};
pub use client::{GatewayClient, GatewayInfo, UserAnswer};
pub use error::{DeviceError, Disposition, GatewayError, MultiError, classify, multi_error_status};
