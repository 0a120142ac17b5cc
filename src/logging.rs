//! Where logs go: the systemd journal (structured fields: DEVICE_ID,
//! USER_ID, EVENT_ID, EVENT_CODE, GROUP … and the right PRIORITY) when
//! stderr is connected to it or when asked, otherwise readable text or JSON
//! lines on stderr. A missing journal socket falls back to stderr; logging
//! never stops the daemon.
//!
//! What an operator or a collector reads is never Rust's `Debug` notation:
//! `Some(x)` is shown as `x`, `None` as nothing (text) or `null` (JSON);
//! JSON fields are values (numbers, booleans, lists), not pre-formatted
//! strings; colours only on a terminal (and never with `NO_COLOR`).

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogTarget {
    /// The journal if stderr is connected to it (`JOURNAL_STREAM`), else stderr.
    #[default]
    Auto,
    Journald,
    Stderr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether stderr gets ANSI colours: only a terminal, and not with
/// `NO_COLOR` set (<https://no-color.org>).
pub fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. Returns a note to log once it is up
/// (e.g. the journald fallback), since nothing can be logged before.
pub fn init(target: LogTarget, format: LogFormat) -> Option<String> {
    init_with(target, format, "info")
}

/// [`init`] with another default filter (`RUST_LOG` wins).
pub fn init_with(target: LogTarget, format: LogFormat, default: &str) -> Option<String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let want_journal = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    let mut note = None;
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("usersync".to_owned());
                let _ = tracing_subscriber::registry()
                    .with(layer.with_filter(filter()))
                    .try_init();
                return None;
            }
            Err(e) => note = Some(format!("journald unavailable ({e}); logging to stderr")),
        }
    }
    let layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colours())
            .fmt_fields(text_fields())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLines)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter()))
        .try_init();
    note
}

/// Text fields as `name=value`, with `Debug` notation taken off.
fn text_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(|w: &mut Writer<'_>, field: &Field, value| {
        if field.name() == "message" {
            write!(w, "{value:?}")
        } else {
            write!(w, "{}={}", field.name(), tidy(&format!("{value:?}")))
        }
    })
    .delimited(" ")
}

/// Takes Rust's `Debug` notation off a value: `Some(x)` → `x`, `None` →
/// `-`. Quoted strings stay quoted (they may hold spaces).
pub fn tidy(debug: &str) -> String {
    let mut s = debug;
    while let Some(inner) = s.strip_prefix("Some(").and_then(|r| r.strip_suffix(')')) {
        s = inner;
    }
    if s == "None" {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The JSON value of a field recorded through `Debug` (or `Display`,
/// which arrives the same way): `null` for `None`, the inner value of
/// `Some(…)`, a list for `[…]`, the text of a quoted string, and the text
/// itself otherwise. Numbers that arrive as text stay text (a user ID
/// `1000` must not be a number in one line and a string in the next);
/// fields logged as numbers are numbers.
pub fn debug_value(debug: &str) -> serde_json::Value {
    let mut s = debug;
    while let Some(inner) = s.strip_prefix("Some(").and_then(|r| r.strip_suffix(')')) {
        s = inner;
    }
    if s == "None" {
        return serde_json::Value::Null;
    }
    let notation = (s.starts_with('[') && s.ends_with(']'))
        || (s.len() >= 2 && s.starts_with('"') && s.ends_with('"'));
    if notation
        && let Ok(v @ (serde_json::Value::Array(_) | serde_json::Value::String(_))) =
            serde_json::from_str::<serde_json::Value>(s)
    {
        return v;
    }
    serde_json::Value::String(s.to_owned())
}

/// An event's fields as JSON values, in the order they were logged.
struct JsonVisitor(Vec<(String, serde_json::Value)>);

impl JsonVisitor {
    fn put(&mut self, name: &str, value: serde_json::Value) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }
}

impl Visit for JsonVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), serde_json::json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field.name(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field.name(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field.name(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let v = if field.name() == "message" {
            text.into()
        } else {
            debug_value(&text)
        };
        self.put(field.name(), v);
    }
}

/// One JSON object per line: `timestamp` (RFC 3339), `level`, `message`,
/// the event's fields as values, `module` (the Rust module that logged:
/// not `target`, which names a target device in usersync's own fields)
/// and `spans` (name and fields of each enclosing span, outermost first).
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut time = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut time))?;
        let meta = event.metadata();
        let mut obj = JsonVisitor(Vec::new());
        obj.put("timestamp", time.into());
        obj.put("level", meta.level().as_str().into());
        let mut fields = JsonVisitor(Vec::new());
        event.record(&mut fields);
        if let Some(i) = fields.0.iter().position(|(n, _)| n == "message") {
            let (_, m) = fields.0.remove(i);
            obj.put("message", m);
        }
        for (n, v) in fields.0 {
            obj.put(&n, v);
        }
        obj.put("module", meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<serde_json::Value> = scope
                .from_root()
                .map(|span| {
                    let mut s = serde_json::Map::new();
                    s.insert("name".into(), span.name().into());
                    let ext = span.extensions();
                    if let Some(f) = ext
                        .get::<tracing_subscriber::fmt::FormattedFields<N>>()
                        .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
                        .and_then(|v| v.as_object().cloned())
                    {
                        for (k, v) in f {
                            let v = match v {
                                serde_json::Value::String(t) => debug_value(&t),
                                other => other,
                            };
                            s.insert(k, v);
                        }
                    }
                    serde_json::Value::Object(s)
                })
                .collect();
            if !spans.is_empty() {
                obj.put("spans", spans.into());
            }
        }
        let mut line = String::from("{");
        for (i, (n, v)) in obj.0.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&serde_json::Value::from(n.as_str()).to_string());
            line.push(':');
            line.push_str(&v.to_string());
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_notation_is_taken_off() {
        assert_eq!(tidy("Some(\"v1.8.0\")"), "\"v1.8.0\"");
        assert_eq!(tidy("None"), "-");
        assert_eq!(tidy("1.5s"), "1.5s");
        assert_eq!(debug_value("Some(\"v1.8.0\")"), serde_json::json!("v1.8.0"));
        assert_eq!(debug_value("None"), serde_json::Value::Null);
        assert_eq!(
            debug_value("[540000002, 540000003]"),
            serde_json::json!([540000002, 540000003])
        );
        assert_eq!(debug_value("1.5s"), serde_json::json!("1.5s"));
        assert_eq!(debug_value("LinkUp"), serde_json::json!("LinkUp"));
        assert_eq!(
            debug_value("1000"),
            serde_json::json!("1000"),
            "text stays text"
        );
    }
}
