//! The file's shape as serde reads it (unknown keys rejected), and
//! serde's errors said in words an operator reads.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) gateway: Spanned<RawGateway>,
    pub(super) state: Spanned<RawState>,
    #[serde(default)]
    pub(super) device: Vec<Spanned<RawDevice>>,
    #[serde(default)]
    pub(super) group: Vec<Spanned<RawGroup>>,
    #[serde(default)]
    pub(super) sync: Option<Spanned<RawSync>>,
    #[serde(default)]
    pub(super) log: Option<Spanned<RawLog>>,
    #[serde(default)]
    pub(super) metrics: Option<Spanned<RawMetrics>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) address: Spanned<String>,
    pub(super) ca_file: Option<Spanned<PathBuf>>,
    #[serde(default = "yes")]
    pub(super) tls: bool,
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) api: Option<Spanned<String>>,
    pub(super) keepalive_interval_secs: Option<Spanned<u64>>,
    pub(super) keepalive_timeout_secs: Option<Spanned<u64>>,
    pub(super) connect_timeout_secs: Option<Spanned<u64>>,
    pub(super) call_timeout_secs: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) dir: Spanned<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    pub(super) id: Spanned<u32>,
    pub(super) address: Spanned<String>,
    #[serde(default = "default_port")]
    pub(super) port: Spanned<u16>,
    #[serde(default)]
    pub(super) tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: Spanned<String>,
    /// `"one-way"` (the default) or `"multi-master"`.
    pub(super) mode: Option<Spanned<String>>,
    pub(super) sources: Option<Spanned<Vec<u32>>>,
    pub(super) targets: Option<Spanned<Vec<u32>>>,
    pub(super) members: Option<Spanned<Vec<u32>>>,
    pub(super) echo_detection: Option<Spanned<String>>,
    pub(super) max_clock_skew_secs: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) prune: bool,
    #[serde(default)]
    pub(super) propagate_delete_all: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    pub(super) batch_users: Option<Spanned<usize>>,
    pub(super) batch_bytes: Option<Spanned<usize>>,
    pub(super) poll_interval_secs: Option<Spanned<u64>>,
    pub(super) tail_check_delay_ms: Option<Spanned<u64>>,
    pub(super) idle_check_interval_secs: Option<Spanned<u64>>,
    pub(super) device_concurrency: Option<Spanned<usize>>,
    pub(super) realtime_queue: Option<Spanned<i32>>,
    pub(super) quarantine_after: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) events: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Spanned<String>,
}

fn yes() -> bool {
    true
}

fn default_port() -> Spanned<u16> {
    // The span of a default is never shown: only port 0 is an error.
    Spanned::new(0..0, 51211)
}

/// The key of the `key = value` line that holds byte `offset`, if any.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    key.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then(|| key.to_owned())
}

/// Keys (of the TOML file and of Suprema's JSON) that hold device IDs.
const DEVICE_ID_KEYS: [&str; 5] = ["id", "sources", "targets", "members", "device_id"];

/// Says a deserializer's type error in words an operator reads
/// (`expected u32` → `expected a whole number between 0 and 4294967295`;
/// a device ID is between 1 and 4294967295).
pub fn in_words(message: &str, key: Option<&str>) -> String {
    let device_id = key.is_some_and(|k| DEVICE_ID_KEYS.contains(&k));
    let whole = |lo: &str, hi: &str| format!("expected a whole number between {lo} and {hi}");
    let table: [(&str, String); 10] = [
        (
            "expected u32",
            if device_id {
                "expected a device ID, a whole number between 1 and 4294967295".to_owned()
            } else {
                whole("0", "4294967295")
            },
        ),
        (
            "expected u16",
            if key == Some("port") {
                "expected a port, a whole number between 1 and 65535".to_owned()
            } else {
                whole("0", "65535")
            },
        ),
        ("expected u64", whole("0", "18446744073709551615")),
        ("expected usize", whole("0", "18446744073709551615")),
        ("expected i32", whole("-2147483648", "2147483647")),
        (
            "expected i64",
            whole("-9223372036854775808", "9223372036854775807"),
        ),
        ("expected a boolean", "expected true or false".to_owned()),
        (
            "expected a sequence",
            "expected a list, e.g. [1, 2]".to_owned(),
        ),
        (
            "expected a string",
            "expected text in double quotes".to_owned(),
        ),
        (
            "expected a borrowed string",
            "expected text in double quotes".to_owned(),
        ),
    ];
    let mut out = message.to_owned();
    for (rust, words) in &table {
        if let Some(i) = out.find(rust) {
            let end = i + rust.len();
            // Only whole words: `expected u32` but not `expected u320`.
            if out[end..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_ascii_alphanumeric())
            {
                out.replace_range(i..end, words);
                break;
            }
        }
    }
    if let Some(k) = key
        && !out.starts_with(k)
    {
        out = format!("{k}: {out}");
    }
    out
}
