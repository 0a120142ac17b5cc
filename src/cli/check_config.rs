//! `usersync check-config`: what `usersync run` checks before it starts
//! (the checks are [`crate::config`]'s), told to the operator: warnings and
//! notes on stderr, the verdict on stdout.

use super::plural;
use crate::config::{self, Config};

/// Prints the warnings and notes about a configuration that can run, and
/// returns the verdict (`FILE: valid (3 devices, 1 group)`).
pub fn check_config(c: &Config) -> String {
    for w in config::warnings(c) {
        eprintln!("warning: {w}");
    }
    for w in config::unreadable_by_service(c) {
        eprintln!("warning: {w}");
    }
    if let Some(note) = config::sandbox_note(c) {
        eprintln!("note: {note}");
    }
    format!(
        "{}: valid ({}, {})",
        c.path.display(),
        plural(c.devices.len() as u64, "device"),
        plural(c.groups.len() as u64, "group")
    )
}
