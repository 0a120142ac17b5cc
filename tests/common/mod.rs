//! Helpers shared by the integration tests: a simulator on 127.0.0.1:0 over
//! TLS, a client for it, and bounded waiting.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use usersync::gateway::GatewayClient;
use usersync::sim::{SimOptions, Simulator};
use usersync::wire::Api;

/// Every wait in the tests ends by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub async fn sim(api: Api, devices: u32) -> Simulator {
    let mut opts = SimOptions::with_devices(devices);
    opts.model.api = api;
    opts.reconnect_delay = Duration::from_millis(20);
    Simulator::start(opts).await.expect("simulator starts")
}

pub async fn sim_with(opts: SimOptions) -> Simulator {
    Simulator::start(opts).await.expect("simulator starts")
}

pub fn client(sim: &Simulator) -> GatewayClient {
    GatewayClient::new(&sim.gateway_settings()).expect("client")
}

/// Polls `check` until it holds, failing the test at the deadline.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut`, failing the test at the deadline.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}
