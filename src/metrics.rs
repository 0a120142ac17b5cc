//! Prometheus metrics, served on `[metrics] listen` at `/metrics` when
//! configured. Counters and gauges are updated where things happen; the
//! registry is only read when scraped.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::device::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub device: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub group: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

/// Every metric the daemon keeps.
pub struct Metrics {
    registry: Registry,
    pub device_phase: Family<PhaseLabel, Gauge>,
    pub checkpoint: Family<DeviceLabel, Gauge>,
    pub checkpoint_lag: Family<DeviceLabel, Gauge>,
    pub events: Family<DeviceLabel, Counter>,
    pub applied: Family<TargetLabel, Counter>,
    pub failed: Family<TargetLabel, Counter>,
    pub quarantined: Family<TargetLabel, Counter>,
    /// Users changed at a target itself (drift from its sources).
    pub target_changes: Family<TargetLabel, Counter>,
    pub backlog: Family<TargetLabel, Gauge>,
    pub reconciles: Family<GroupLabel, Counter>,
    pub gateway_reconnects: Counter,
    pub gateway_up: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const PHASES: [Phase; 4] = [
    Phase::Disconnected,
    Phase::CatchingUp,
    Phase::Live,
    Phase::Backoff,
];

/// The one vocabulary for device phases: the `phase` label here, the STATE
/// column of `usersync status`, the README.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Disconnected => "disconnected",
        // Monitoring being enabled, then the log replayed.
        Phase::CatchingUp => "catching-up",
        Phase::Live => "live",
        Phase::Backoff => "backoff",
    }
}

/// Maps a device state as the device task records it (its finer names:
/// `connected` is the first step of catching up) to [`phase_name`]'s
/// vocabulary. Unknown names pass through.
pub fn phase_of_state(state: &str) -> &str {
    match state {
        "connected" | "catching-up" => phase_name(Phase::CatchingUp),
        other => other,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("usersync");
        let m = Metrics {
            registry: Registry::default(),
            device_phase: Family::default(),
            checkpoint: Family::default(),
            checkpoint_lag: Family::default(),
            events: Family::default(),
            applied: Family::default(),
            failed: Family::default(),
            quarantined: Family::default(),
            target_changes: Family::default(),
            backlog: Family::default(),
            reconciles: Family::default(),
            gateway_reconnects: Counter::default(),
            gateway_up: Gauge::default(),
        };
        registry.register(
            "device_phase",
            "1 for the phase each device is in",
            m.device_phase.clone(),
        );
        registry.register(
            "device_checkpoint",
            "ID of the last event handled per device",
            m.checkpoint.clone(),
        );
        registry.register(
            "device_checkpoint_lag",
            "Newest event ID seen minus the checkpoint, per device",
            m.checkpoint_lag.clone(),
        );
        registry.register("device_events", "Device events handled", m.events.clone());
        registry.register(
            "target_changes",
            "Users enrolled, changed or deleted at a target itself (drift; a reconcile of the target repairs it)",
            m.target_changes.clone(),
        );
        registry.register(
            "changes_applied",
            "User changes written to a target",
            m.applied.clone(),
        );
        registry.register(
            "changes_failed",
            "Failed attempts to write a change to a target",
            m.failed.clone(),
        );
        registry.register(
            "changes_quarantined",
            "Users quarantined on a target",
            m.quarantined.clone(),
        );
        registry.register(
            "target_backlog",
            "Journal rows a target has not applied yet",
            m.backlog.clone(),
        );
        registry.register(
            "reconcile_runs",
            "Reconciles completed per group",
            m.reconciles.clone(),
        );
        registry.register(
            "gateway_reconnects",
            "Gateway sessions that ended and were retried",
            m.gateway_reconnects.clone(),
        );
        registry.register(
            "gateway_up",
            "1 while a gateway session is up",
            m.gateway_up.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn set_phase(&self, device: u32, phase: Phase) {
        for p in PHASES {
            self.device_phase
                .get_or_create(&PhaseLabel {
                    device: device.to_string(),
                    phase: phase_name(p).to_owned(),
                })
                .set(i64::from(p == phase));
        }
    }

    pub fn forget_device(&self, device: u32) {
        for p in PHASES {
            self.device_phase.remove(&PhaseLabel {
                device: device.to_string(),
                phase: phase_name(p).to_owned(),
            });
        }
        let d = DeviceLabel {
            device: device.to_string(),
        };
        self.checkpoint.remove(&d);
        self.checkpoint_lag.remove(&d);
    }

    pub fn device(device: u32) -> DeviceLabel {
        DeviceLabel {
            device: device.to_string(),
        }
    }

    pub fn target(group: &str, target: u32) -> TargetLabel {
        TargetLabel {
            group: group.to_owned(),
            target: target.to_string(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// How often a metrics address that cannot be bound is tried again (and
/// the warning repeated).
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks that `addr` can be listened on (`usersync run` does before it
/// starts: a port already in use is an error at start, not a log line).
pub fn check_listen(addr: SocketAddr) -> Result<(), String> {
    std::net::TcpListener::bind(addr).map(drop).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "port {} is already in use (another usersync, or another exporter: `ss -ltnp 'sport = :{}'` shows which)",
                addr.port(),
                addr.port()
            ),
            std::io::ErrorKind::AddrNotAvailable => {
                format!("{} is not an address of this machine", addr.ip())
            }
            _ => e.to_string(),
        };
        format!("metrics.listen = \"{addr}\": cannot listen: {why}; choose another address or free the port")
    })
}

/// Serves `/metrics` on `addr` until cancelled. An address that cannot be
/// bound (taken after the start check) is retried every 30 s with a warning
/// each time, so a scrape that finds nothing has a reason in the journal.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(
                    addr = %addr,
                    error = %e,
                    retry_in_secs = BIND_RETRY.as_secs(),
                    "metrics endpoint cannot listen; /metrics is not served"
                );
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(BIND_RETRY) => {}
                }
            }
        }
    };
    tracing::info!(addr = %addr, "metrics on /metrics");
    serve_on(listener, metrics, cancel).await
}

pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = Arc::clone(&metrics);
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_families() {
        let m = Metrics::new();
        m.set_phase(7, Phase::Live);
        m.applied
            .get_or_create(&Metrics::target("main", 9))
            .inc_by(3);
        m.gateway_reconnects.inc();
        let text = m.encode();
        assert!(
            text.contains("usersync_device_phase{device=\"7\",phase=\"live\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("usersync_device_phase{device=\"7\",phase=\"backoff\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("usersync_changes_applied_total{group=\"main\",target=\"9\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("usersync_gateway_reconnects_total 1"),
            "{text}"
        );
        m.set_phase(8, Phase::CatchingUp);
        assert!(
            m.encode()
                .contains("usersync_device_phase{device=\"8\",phase=\"catching-up\"} 1"),
            "one vocabulary with `usersync status`"
        );
        assert_eq!(phase_of_state("connected"), "catching-up");
        assert_eq!(phase_of_state("live"), "live");
        m.forget_device(7);
        assert!(!m.encode().contains("device=\"7\""));
    }

    #[test]
    fn a_port_in_use_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = check_listen(addr).unwrap_err();
        assert!(err.contains("already in use"), "{err}");
        drop(taken);
        check_listen(addr).unwrap();
    }
}
