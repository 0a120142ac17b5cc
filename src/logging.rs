//! Where logs go: the systemd journal (structured fields: DEVICE_ID,
//! USER_ID, EVENT_ID, EVENT_CODE, GROUP … and the right PRIORITY) when
//! stderr is connected to it or when asked, otherwise readable text or JSON
//! lines on stderr. A missing journal socket falls back to stderr; logging
//! never stops the daemon.

use tracing_subscriber::layer::SubscriberExt;
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

/// Installs the global subscriber. Returns a note to log once it is up
/// (e.g. the journald fallback), since nothing can be logged before.
pub fn init(target: LogTarget, format: LogFormat) -> Option<String> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter()))
        .try_init();
    note
}
