//! Helpers shared by the integration tests: a simulator on 127.0.0.1:0 over
//! TLS, a client for it, and bounded waiting.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use usersync::gateway::GatewayClient;
use usersync::sim::{MissingUser, PastNewest, SimOptions, Simulator, StaleStart, StreamHeaders};
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

/// Like [`sim`], but the devices are already registered as async
/// connections (`preconnect`), for tests of calls to connected devices that
/// are not about registration. Every other answer keeps its default.
pub async fn sim_registered(api: Api, devices: u32) -> Simulator {
    let mut opts = SimOptions::with_devices(devices);
    opts.model.api = api;
    opts.reconnect_delay = Duration::from_millis(20);
    opts.model.preconnect = true;
    sim_with(opts).await
}

/// The old, convenient answers to WIRE.md's open questions: eager stream
/// headers, GetLog clamped to the oldest and empty past the newest, unknown
/// users omitted, devices registered at start and after a restart. For the
/// rare test that is not about them; other settings are kept.
pub fn lenient(opts: &mut SimOptions) {
    let p = &mut opts.model.policies;
    p.stream_headers = StreamHeaders::Eager;
    p.stale_start = StaleStart::Clamp;
    p.past_newest = PastNewest::Empty;
    p.missing_user = MissingUser::Lenient;
    opts.model.preconnect = true;
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

// ---- the daemon, in process -----------------------------------------------

use usersync::config::Config;
use usersync::store::Store;

/// A daemon under test, with its own state directory.
pub struct Daemon {
    pub signals: usersync::Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), usersync::DaemonError>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        let signals = usersync::Shutdown::default();
        let task = tokio::spawn(usersync::run(config, signals.clone()));
        Daemon { signals, task }
    }

    /// Orderly stop (SIGTERM); the daemon must exit cleanly in time.
    pub async fn stop(self) {
        self.signals.shutdown.cancel();
        within("daemon stops", self.task)
            .await
            .expect("daemon task")
            .expect("daemon exits cleanly");
    }
}

/// The group "main": the first device is the source, the others targets.
pub fn main_group(sim: &Simulator) -> String {
    let devices = sim.device_ids();
    format!(
        "[[group]]\nname = \"main\"\nsources = [{}]\ntargets = [{}]\n",
        devices[0],
        devices[1..]
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Config for group "main" plus `extra_group`.
pub fn config(sim: &Simulator, dir: &std::path::Path, extra_group: &str) -> Config {
    config_with(sim, dir, &format!("{}{extra_group}", main_group(sim)))
}

/// Writes the simulator's CA into `dir` and returns a config file's text
/// with every simulated device and `groups`.
pub fn config_text(sim: &Simulator, dir: &std::path::Path, groups: &str) -> String {
    let ca = sim
        .certs()
        .expect("TLS simulator")
        .write_ca(dir)
        .expect("write CA");
    let mut text = format!(
        "[gateway]\naddress = \"{}\"\nca_file = \"{}\"\nserver_name = \"localhost\"\napi = \"{}\"\n\
         keepalive_interval_secs = 2\nkeepalive_timeout_secs = 2\ncall_timeout_secs = 5\n\n\
         [state]\ndir = \"{}\"\n\n[sync]\npoll_interval_secs = 1\n\n",
        sim.address(),
        ca.display(),
        sim.api(),
        dir.join("state").display()
    );
    for d in sim.device_ids() {
        text.push_str(&format!(
            "[[device]]\nid = {d}\naddress = \"192.0.2.{}\"\n\n",
            d % 250
        ));
    }
    text.push_str(groups);
    text
}

pub fn config_with(sim: &Simulator, dir: &std::path::Path, groups: &str) -> Config {
    let text = config_text(sim, dir, groups);
    usersync::config::parse(&dir.join("usersync.toml"), &text).expect("valid test config")
}

/// Whether every target holds exactly the source's users, byte for byte.
pub fn converged(sim: &Simulator, source: u32, targets: &[u32]) -> bool {
    let want = sim.users(source);
    targets.iter().all(|t| sim.users(*t) == want)
}

pub async fn wait_converged(sim: &Simulator, source: u32, targets: &[u32]) -> Duration {
    let started = std::time::Instant::now();
    eventually("targets converge to the source", || async {
        converged(sim, source, targets)
    })
    .await;
    started.elapsed()
}

pub fn open_store(dir: &std::path::Path) -> Store {
    Store::open(&dir.join("state")).expect("state store")
}
