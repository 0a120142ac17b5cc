//! `usersync demo`: the simulator and the daemon in one process, with a
//! scripted scene — enroll, update, delete, a device offline that catches
//! up, a daemon restart with changes made while it was down — narrated as
//! it happens. Everything stays on loopback and in a temporary directory.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::service::Shutdown;
use crate::sim::{SimOptions, Simulator};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Sim(#[from] crate::sim::SimError),
    #[error(transparent)]
    Daemon(#[from] crate::DaemonError),
    #[error("demo: {0}")]
    Step(String),
}

const WAIT: Duration = Duration::from_secs(30);

/// Device IDs as an operator writes them: `540000002 and 540000003`.
fn list(devices: &[u32]) -> String {
    let ids: Vec<String> = devices.iter().map(u32::to_string).collect();
    match ids.split_last() {
        None => "no device".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

struct Scene {
    sim: Simulator,
    source: u32,
    targets: Vec<u32>,
}

impl Scene {
    fn holders(&self, user: &str) -> Vec<u32> {
        std::iter::once(self.source)
            .chain(self.targets.iter().copied())
            .filter(|d| self.sim.users(*d).contains_key(user))
            .collect()
    }

    /// Waits until `targets` hold exactly what the source holds.
    async fn converge(&self, targets: &[u32], what: &str) -> Result<Duration, DemoError> {
        let started = Instant::now();
        let want = self.sim.users(self.source);
        while targets.iter().any(|t| self.sim.users(*t) != want) {
            if started.elapsed() > WAIT {
                return Err(DemoError::Step(format!(
                    "{what}: targets did not converge within {} s",
                    WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        println!("   ✓ {what} — in sync after {} ms", took.as_millis());
        Ok(took)
    }

    fn table(&self) -> String {
        let mut s = String::new();
        for d in std::iter::once(self.source).chain(self.targets.iter().copied()) {
            let users: Vec<String> = self.sim.users(d).keys().cloned().collect();
            let role = if d == self.source {
                "enrollment"
            } else {
                "target    "
            };
            let _ = writeln!(
                s,
                "     {d} {role} {:<12} users: {}",
                if self.sim.is_connected(d) {
                    "connected"
                } else {
                    "offline"
                },
                if users.is_empty() {
                    "-".to_owned()
                } else {
                    users.join(" ")
                }
            );
        }
        s
    }
}

fn start(
    config: &crate::config::Config,
) -> (
    Shutdown,
    tokio::task::JoinHandle<Result<(), crate::DaemonError>>,
) {
    let signals = Shutdown {
        shutdown: CancellationToken::new(),
        abandon: CancellationToken::new(),
    };
    let task = tokio::spawn(crate::run(config.clone(), signals.clone()));
    (signals, task)
}

async fn stop(
    signals: Shutdown,
    task: tokio::task::JoinHandle<Result<(), crate::DaemonError>>,
) -> Result<(), DemoError> {
    signals.shutdown.cancel();
    match task.await {
        Ok(r) => Ok(r?),
        Err(e) => Err(DemoError::Step(format!("daemon task: {e}"))),
    }
}

/// Runs the scene; returns when it is over.
pub async fn run() -> Result<(), DemoError> {
    let dir = std::env::temp_dir().join(format!("usersync-demo-{}", std::process::id()));
    let result = scene(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn scene(dir: &std::path::Path) -> Result<(), DemoError> {
    let mut opts = SimOptions::with_devices(3);
    opts.reconnect_delay = Duration::from_millis(300);
    opts.model.devices[0].users = 2;
    let sim = Simulator::start(opts).await?;
    let ids = sim.device_ids();
    let scene = Scene {
        source: ids[0],
        targets: ids[1..].to_vec(),
        sim,
    };
    let certs = scene
        .sim
        .certs()
        .ok_or_else(|| DemoError::Step("the simulator has no certificate".into()))?;
    let ca = certs
        .write_ca(dir)
        .map_err(|e| DemoError::Step(format!("{}: {e}", dir.display())))?;
    let text = format!(
        "[gateway]\naddress = \"{}\"\nca_file = \"{}\"\nserver_name = \"localhost\"\n\n\
         [state]\ndir = \"{}\"\n\n[sync]\npoll_interval_secs = 1\n\n[log]\nevents = \"none\"\n\n{}\
         [[group]]\nname = \"demo\"\nsources = [{}]\ntargets = [{}]\n",
        scene.sim.address(),
        ca.display(),
        dir.join("state").display(),
        ids.iter()
            .map(|d| format!(
                "[[device]]\nid = {d}\naddress = \"192.0.2.{}\"\n\n",
                d % 250
            ))
            .collect::<String>(),
        scene.source,
        scene
            .targets
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let config = crate::config::parse(&dir.join("usersync.toml"), &text)
        .map_err(|e| DemoError::Step(e.to_string()))?;

    println!(
        "usersync demo: a simulated G-SDK gateway ({}, TLS) with three devices",
        scene.sim.address()
    );
    println!(
        "   enrollment device {}, targets {}",
        scene.source,
        list(&scene.targets)
    );
    println!("   the enrollment device already holds users 1 and 2\n");

    println!("1. The daemon starts for the first time and reconciles the targets");
    let (signals, task) = start(&config);
    scene
        .converge(&scene.targets, "users 1 and 2 copied to both targets")
        .await?;

    println!(
        "\n2. An administrator enrolls user 1000 (card, two fingers, face, PIN, photo) at the enrollment device"
    );
    scene.sim.enroll_on_device(scene.source, "1000")?;
    scene
        .converge(&scene.targets, "user 1000 on every device")
        .await?;

    println!("\n3. User 1000 is updated, user 2 deleted");
    scene.sim.update_on_device(scene.source, "1000")?;
    scene.sim.delete_on_device(scene.source, "2")?;
    scene
        .converge(&scene.targets, "update and delete propagated")
        .await?;

    let offline = scene.targets[1];
    println!("\n4. Device {offline} goes offline; users 1001 and 1002 are enrolled meanwhile");
    scene.sim.set_offline(offline)?;
    scene.sim.enroll_on_device(scene.source, "1001")?;
    scene.sim.enroll_on_device(scene.source, "1002")?;
    scene
        .converge(&scene.targets[..1], "the online target has them")
        .await?;
    println!("   user 1001 is on {}", list(&scene.holders("1001")));
    println!("   device {offline} comes back");
    scene.sim.set_online(offline)?;
    scene
        .converge(&scene.targets, "the returning device caught up")
        .await?;

    println!("\n5. The daemon stops; user 1000 is deleted and 1003 enrolled while it is down");
    stop(signals, task).await?;
    scene.sim.delete_on_device(scene.source, "1000")?;
    scene.sim.enroll_on_device(scene.source, "1003")?;
    println!("   user 1003 is on {} only", list(&scene.holders("1003")));
    let (signals, task) = start(&config);
    scene
        .converge(
            &scene.targets,
            "restarted daemon replayed the log from its checkpoint",
        )
        .await?;

    println!("\n6. The gateway restarts (every stream cut) and user 1004 is enrolled");
    scene.sim.restart(Duration::from_millis(500)).await?;
    scene.sim.enroll_on_device(scene.source, "1004")?;
    scene
        .converge(&scene.targets, "reconnected, resubscribed, caught up")
        .await?;

    println!("\nFinal state:\n{}", scene.table());
    stop(signals, task).await?;
    scene.sim.shutdown().await;
    println!("demo finished: every device holds the same users, byte for byte");
    Ok(())
}
