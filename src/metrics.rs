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

const PHASES: [(Phase, &str); 4] = [
    (Phase::Disconnected, "disconnected"),
    (Phase::SettingUp, "setting_up"),
    (Phase::Live, "live"),
    (Phase::Backoff, "backoff"),
];

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
        for (p, name) in PHASES {
            self.device_phase
                .get_or_create(&PhaseLabel {
                    device: device.to_string(),
                    phase: name.to_owned(),
                })
                .set(i64::from(p == phase));
        }
    }

    pub fn forget_device(&self, device: u32) {
        for (_, name) in PHASES {
            self.device_phase.remove(&PhaseLabel {
                device: device.to_string(),
                phase: name.to_owned(),
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

/// Serves `/metrics` on `addr` until cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on /metrics");
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
        m.forget_device(7);
        assert!(!m.encode().contains("device=\"7\""));
    }
}
