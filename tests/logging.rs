//! What reaches the journal: the fields a shipped device event and a
//! propagated change carry. tracing-journald upper-cases field names, so
//! `device_id` becomes DEVICE_ID; the test checks the names the layer
//! receives and the priority level.

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
