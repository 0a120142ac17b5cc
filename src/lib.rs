//! # usersync
//!
//! Keeps the users of Suprema BioStar devices in sync through a G-SDK
//! device gateway.
//!
//! # Layout
//!
//! * [`proto`] — messages and service stubs generated from `proto/`
//!   (written from WIRE.md); users are `bytes` on the sync path.
//! * [`wire`] — API generations, method-path mapping, peeking `hdr.ID` out
//!   of raw user records.
//! * [`gateway`] — the client: channel (TLS, keepalive), typed wrappers per
//!   RPC, Multi-error decoding, transient/permanent classification.
//! * [`sim`] — the gateway simulator used by the tests and the demo.

#![forbid(unsafe_code)]

pub mod gateway;
pub mod sim;
pub mod wire;

/// Generated from `proto/` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));
}
