//! Crash safety: the real `usersync` binary is SIGKILLed at seeded random
//! moments while users change at the source, restarted each time, and in
//! the end every target must hold the source's users byte for byte.
//!
//! `USERSYNC_CRASH_SEED` and `USERSYNC_CRASH_ITERATIONS` override the
//! defaults (seed 0x5EED, 24 iterations).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DEADLINE, converged, sim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use usersync::wire::Api;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("daemon log");
    Command::new(env!("CARGO_BIN_EXE_usersync"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn usersync run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let seed = env_or("USERSYNC_CRASH_SEED", 0x5EED);
    let iterations = env_or("USERSYNC_CRASH_ITERATIONS", 24);
    let mut rng = StdRng::seed_from_u64(seed);

    let sim = sim(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, targets) = (ids[0], ids[1..].to_vec());
    // A few users exist before the daemon ever ran (first-start reconcile).
    for u in ["pre1", "pre2"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("usersync.toml");
    let text = common::config_text(&sim, dir.path(), &common::main_group(&sim));
    std::fs::write(&cfg_path, text).unwrap();
    let log = dir.path().join("daemon.log");

    let pool: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();
    let mut changes = 0u32;
    let mut settled = Vec::new();
    for iter in 0..iterations {
        let mut child = spawn(&cfg_path, &log);
        let ops = rng.random_range(1..=6);
        for _ in 0..ops {
            let user = &pool[rng.random_range(0..pool.len())];
            let exists = sim.users(src).contains_key(user);
            match (exists, rng.random_range(0..3)) {
                (true, 0) => sim.delete_on_device(src, user).map(drop),
                (true, _) => sim.update_on_device(src, user).map(drop),
                (false, _) => sim.enroll_on_device(src, user).map(drop),
            }
            .unwrap();
            changes += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        }
        if iter % 6 == 5 {
            // Now and then let it settle, to measure convergence under load.
            let started = Instant::now();
            wait_for(&sim, src, &targets).await;
            settled.push(started.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        }
        child.start_kill().expect("SIGKILL");
        let status = child.wait().await.expect("wait");
        assert!(!status.success(), "iteration {iter}: killed, not exited");
    }

    // The last life: no more faults; it must converge and stop cleanly.
    let started = Instant::now();
    let mut child = spawn(&cfg_path, &log);
    wait_for(&sim, src, &targets).await;
    // One more change proves this life is up (and its signal handler
    // installed) before it is asked to stop.
    sim.enroll_on_device(src, "final").unwrap();
    wait_for(&sim, src, &targets).await;
    let final_convergence = started.elapsed();
    for t in &targets {
        assert_eq!(sim.users(*t), sim.users(src), "target {t} differs");
    }
    let pid = child.id().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status}");

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("panicked"),
        "a daemon panicked:\n{log_text}"
    );
    eprintln!(
        "crash test: seed {seed:#x}, {iterations} SIGKILLs, {changes} changes, {} users; \
         settled after {settled:?}; final restart converged in {final_convergence:?}",
        sim.users(src).len()
    );
}

async fn wait_for(sim: &usersync::sim::Simulator, src: u32, targets: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !converged(sim, src, targets) {
        assert!(Instant::now() < deadline, "no convergence within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
