//! What reaches the journal: the fields a shipped device event and a
//! propagated change carry. tracing-journald upper-cases field names, so
//! `device_id` becomes DEVICE_ID; the test checks the names the layer
//! receives and the priority level. On stderr: no colours off a
//! terminal, no Rust `Debug` notation, JSON fields as values.

mod common;

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use usersync::config::EventShipping;
use usersync::proto::gsdk::event::EventLog;

/// One captured event: level, target, (FIELD, value) pairs.
type Record = (tracing::Level, String, Vec<(String, String)>);

#[derive(Default, Clone)]
struct Captured(Arc<Mutex<Vec<Record>>>);

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((
            field.name().to_uppercase(),
            format!("{value:?}").trim_matches('"').to_owned(),
        ));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_uppercase(), value.to_owned()));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields(Vec::new());
        event.record(&mut f);
        let meta = event.metadata();
        if let Ok(mut v) = self.0.lock() {
            v.push((*meta.level(), meta.target().to_owned(), f.0));
        }
    }
}

fn get<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn shipped_events_carry_journal_fields() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    tracing::subscriber::with_default(subscriber, || {
        let ev = EventLog {
            id: 34_667,
            timestamp: 1_624_226_577,
            device_id: 939_504_224,
            user_id: "1000".into(),
            event_code: 0x2000,
            changed_on_device: true,
            ..Default::default()
        };
        usersync::events::ship(EventShipping::All, &ev);
        // Filtered out: an access event with user-events-only shipping.
        let access = EventLog {
            event_code: 0x1000,
            ..ev.clone()
        };
        usersync::events::ship(EventShipping::UserEvents, &access);
        usersync::events::ship(EventShipping::None, &ev);
    });
    let got = captured.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "only the first event is shipped");
    let (level, target, fields) = &got[0];
    assert_eq!(
        *level,
        tracing::Level::INFO,
        "journald maps INFO to PRIORITY=6"
    );
    assert_eq!(target, "usersync::device_event");
    assert_eq!(
        get(fields, "MESSAGE"),
        Some("Device 939504224, User 1000, User enrollment success")
    );
    assert_eq!(get(fields, "DEVICE_ID"), Some("939504224"));
    assert_eq!(get(fields, "EVENT_ID"), Some("34667"));
    assert_eq!(get(fields, "EVENT_CODE"), Some("0x2000"));
    assert_eq!(get(fields, "USER_ID"), Some("1000"));
    assert_eq!(get(fields, "EVENT_TIME"), Some("1624226577"));
    assert_eq!(get(fields, "CHANGED_ON_DEVICE"), Some("true"));
}

/// Lines `usersync run` writes on stderr until one contains `until`.
async fn daemon_lines(format: &str, until: &str) -> Vec<String> {
    use tokio::io::AsyncBufReadExt;
    let sim = common::sim(usersync::wire::Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("usersync.toml");
    std::fs::write(
        &cfg,
        common::config_text(&sim, dir.path(), &common::main_group(&sim)),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args([
            "run",
            "--log-target",
            "stderr",
            "--log-format",
            format,
            "--config",
        ])
        .arg(&cfg)
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    common::within(&format!("a log line with {until:?}"), async {
        while !seen.iter().any(|l: &String| l.contains(until)) {
            seen.push(lines.next_line().await.unwrap().expect("a log line"));
        }
    })
    .await;
    child.start_kill().unwrap();
    seen
}

/// Stderr that is not a terminal gets no ANSI colours, and no value is
/// shown in Rust's `Debug` notation (`Some(…)`, `None`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_no_colours_off_a_terminal_and_no_debug_notation() {
    let lines = daemon_lines("text", "reconcile done").await;
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "ANSI escape in {l:?}");
        assert!(!l.contains("Some(") && !l.contains("=None"), "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reconcile started") && l.contains("resume_after=-")),
        "{lines:#?}"
    );
}

/// JSON lines for collectors: every line is one object; fields are values
/// (numbers are numbers, an absent value is null, not "None"); the Rust
/// module that logged is `module`, so a `target` field (a target device)
/// is not shadowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_fields_are_values() {
    let lines = daemon_lines("json", "reconcile done").await;
    let mut started = None;
    for l in &lines {
        assert!(l.matches("\"target\":").count() <= 1, "a key twice: {l}");
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["module"].is_string(), "{l}");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(ts.contains('T') && ts.ends_with('Z'), "RFC 3339: {ts}");
        for (k, val) in v.as_object().unwrap() {
            if let Some(s) = val.as_str() {
                assert!(!s.starts_with("Some(") && s != "None", "{k} = {s} in {l}");
            }
        }
        if v["message"] == "reconcile started" {
            started = Some(v);
        }
    }
    let v = started.expect("a reconcile started line");
    assert!(v["target"].is_u64(), "a target device ID is a number: {v}");
    assert!(v["resume_after"].is_null(), "{v}");
    assert_eq!(v["group"], "main");
}
