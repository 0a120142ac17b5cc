//! Suprema's sync example configuration (`sync_config.json`): read,
//! checked as our configuration will be (every problem named by its place
//! in the JSON), and converted to our TOML.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ImportTarget;
use crate::cli::CliError;

/// Suprema's sync example configuration (`sync_config.json`).
#[derive(Debug, Deserialize)]
pub struct ExampleConfig {
    pub enroll_device: ExampleDevice,
    #[serde(default)]
    pub devices: Vec<ExampleDevice>,
}

#[derive(Debug, Deserialize)]
pub struct ExampleDevice {
    pub device_id: u32,
    pub ip_addr: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub use_ssl: bool,
    #[serde(default)]
    pub last_event_id: u32,
}

fn default_port() -> u16 {
    51211
}

/// TOML text of a string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Converts the example's JSON into our TOML (a group "main": the
/// enrollment device as source, the others as targets). `ca_file` and
/// `state_dir` are written as given (absolute, from
/// [`import_config`](super::import_config())).
pub fn import_text(example: &ExampleConfig, t: &ImportTarget) -> String {
    let mut s = format!(
        "# Converted from Suprema's sync example by `usersync import-config`.\n\
         # Every key is explained in /usr/share/doc/usersync/README.md (Configure).\n\n\
         [gateway]\naddress = {}\nca_file = {}\napi = {}\n\n[state]\ndir = {}\n\n",
        toml_str(&t.gateway),
        toml_str(&t.ca_file.display().to_string()),
        toml_str(t.api.as_str()),
        toml_str(&t.state_dir.display().to_string())
    );
    for d in std::iter::once(&example.enroll_device).chain(&example.devices) {
        s.push_str(&format!(
            "[[device]]\nid = {}\naddress = {}\nport = {}\ntls = {}\n\n",
            d.device_id,
            toml_str(&d.ip_addr),
            d.port,
            d.use_ssl
        ));
    }
    let targets: Vec<String> = example
        .devices
        .iter()
        .map(|d| d.device_id.to_string())
        .collect();
    s.push_str(&format!(
        "[[group]]\nname = \"main\"\nsources = [{}]\ntargets = [{}]\n",
        example.enroll_device.device_id,
        targets.join(", ")
    ));
    s
}

/// The JSON key at (1-based) `line` and `column` of `text`: the last
/// `"key":` before the column on that line.
pub(super) fn json_key_at(text: &str, line: usize, column: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    // The column counts bytes and may fall inside a character.
    let mut end = column.min(l.len());
    while !l.is_char_boundary(end) {
        end -= 1;
    }
    let upto = &l[..end];
    let colon = upto.rfind(':')?;
    let before = upto[..colon].trim_end().strip_suffix('"')?;
    let start = before.rfind('"')?;
    Some(before[start + 1..].to_owned())
}

/// Checks the example's devices as the configuration will: every problem
/// is named by its place in the JSON.
pub(super) fn check_example(json: &Path, example: &ExampleConfig) -> Result<(), CliError> {
    let err = |place: String, reason: String| {
        Err(CliError::Usage(format!(
            "{}: {place}: {reason}; nothing written",
            json.display()
        )))
    };
    if example.devices.is_empty() {
        return err(
            "devices".into(),
            "is empty: the group needs at least one device to copy users to".into(),
        );
    }
    let mut seen: BTreeMap<u32, String> = BTreeMap::new();
    let places = std::iter::once(("enroll_device".to_owned(), &example.enroll_device)).chain(
        example
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("devices[{i}]"), d)),
    );
    for (place, d) in places {
        if d.device_id == 0 {
            return err(
                format!("{place}.device_id"),
                "must not be 0 (a device ID is a whole number between 1 and 4294967295)".into(),
            );
        }
        if let Some(first) = seen.insert(d.device_id, place.clone()) {
            return err(
                format!("{place}.device_id"),
                format!(
                    "device {} is also {first}: a device is listed once (the enrollment device is the \
                     source, the others are targets)",
                    d.device_id
                ),
            );
        }
        if d.ip_addr.trim().is_empty() {
            return err(format!("{place}.ip_addr"), "is empty".into());
        }
        if let Err(reason) = crate::config::check_device_host(&d.ip_addr) {
            // Said in the JSON's terms.
            let reason = reason
                .replace("write address = ", "write \"ip_addr\": ")
                .replace(" and port = ", " and \"port\": ");
            return Err(CliError::Usage(format!(
                "{}: {place}.ip_addr {:?} {reason}; nothing written",
                json.display(),
                d.ip_addr
            )));
        }
        if d.port == 0 {
            return err(
                format!("{place}.port"),
                "must be a port between 1 and 65535".into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_their_key() {
        let text = "{\n  \"enroll_device\": {\"device_id\": \"x\", \"ip_addr\": \"a\"}\n}";
        let e = serde_json::from_str::<ExampleConfig>(text).unwrap_err();
        assert_eq!(
            json_key_at(text, e.line(), e.column()).as_deref(),
            Some("device_id")
        );
    }

    /// Finding 5: serde_json's column counts bytes; inside a multi-byte
    /// character it must not panic.
    #[test]
    fn json_errors_inside_a_character_do_not_panic() {
        for text in [
            "{\"enroll_device\": é}",
            "{\"enroll_device\": {\"ip_addr\": \"ü\", \"device_id\": ñ}}",
            "é",
        ] {
            let e = serde_json::from_str::<ExampleConfig>(text).unwrap_err();
            for column in 0..=text.len() + 1 {
                let _ = json_key_at(text, e.line(), column);
            }
            let _ = json_key_at(text, e.line(), e.column());
        }
        let text = "{\"enroll_device\": é}";
        let e = serde_json::from_str::<ExampleConfig>(text).unwrap_err();
        assert_eq!(
            json_key_at(text, e.line(), e.column()).as_deref(),
            Some("enroll_device")
        );
    }
}
