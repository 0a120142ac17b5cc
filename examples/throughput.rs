//! Benchmark: how fast changes reach the targets, against the simulator on
//! loopback over TLS. Reports figures; asserts nothing.
//!
//!     cargo run --release --example throughput [-- TARGETS USERS]
//!
//! 1. latency of single changes (enroll at the source → on every target),
//! 2. a burst of USERS enrollments,
//! 3. a first-start reconcile of USERS existing users.
//!
//! Users are realistic (~20 KiB: card, two fingers, face image, photo).

use std::time::{Duration, Instant};

use usersync::sim::{SimOptions, Simulator};

async fn converged(
    sim: &Simulator,
    src: u32,
    targets: &[u32],
    limit: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    let want = sim.users(src);
    while targets.iter().any(|t| sim.users(*t) != want) {
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Some(t0.elapsed())
}

fn config(sim: &Simulator, dir: &std::path::Path) -> usersync::config::Config {
    let ids = sim.device_ids();
    let ca = sim.certs().expect("tls").write_ca(dir).expect("ca");
    let mut text = format!(
        "[gateway]\naddress = \"{}\"\nca_file = \"{}\"\nserver_name = \"localhost\"\n[state]\ndir = \"{}\"\n[log]\nevents = \"none\"\n",
        sim.address(),
        ca.display(),
        dir.join("state").display()
    );
    for d in &ids {
        text.push_str(&format!("[[device]]\nid = {d}\naddress = \"192.0.2.1\"\n"));
    }
    text.push_str(&format!(
        "[[group]]\nname = \"g\"\nsources = [{}]\ntargets = [{}]\n",
        ids[0],
        ids[1..]
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    usersync::config::parse(&dir.join("u.toml"), &text).expect("config")
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let targets = args.first().copied().unwrap_or(4) as u32;
    let users = args.get(1).copied().unwrap_or(1000);
    let limit = Duration::from_secs(300);
    println!(
        "throughput: 1 source, {targets} targets, {users} users, release build, TLS on loopback"
    );

    // 1 + 2: a running daemon.
    let sim = Simulator::start(SimOptions::with_devices(targets + 1))
        .await
        .expect("sim");
    let ids = sim.device_ids();
    let (src, tgts) = (ids[0], ids[1..].to_vec());
    let dir = tempfile::tempdir().expect("tmp");
    let signals = usersync::Shutdown::default();
    let daemon = tokio::spawn(usersync::run(config(&sim, dir.path()), signals.clone()));
    sim.enroll_on_device(src, "warmup").expect("enroll");
    converged(&sim, src, &tgts, limit)
        .await
        .expect("warm-up converges");

    let mut lat = Vec::new();
    for i in 0..50 {
        sim.enroll_on_device(src, &format!("single{i}"))
            .expect("enroll");
        lat.push(converged(&sim, src, &tgts, limit).await.expect("converges"));
    }
    println!(
        "single change → all {targets} targets: p50 {:?}, p90 {:?}, max {:?} (50 changes)",
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.9),
        percentile(&mut lat, 1.0)
    );

    let t0 = Instant::now();
    for i in 0..users {
        sim.enroll_on_device(src, &format!("burst{i}"))
            .expect("enroll");
    }
    let took = converged(&sim, src, &tgts, limit)
        .await
        .expect("burst converges");
    let total = t0.elapsed();
    let bytes: usize = sim.users(src).values().map(Vec::len).sum();
    println!(
        "burst of {users} enrollments: all targets in sync {total:?} after the first ({:.0} users/s, {:.1} MB/s of records to {targets} targets; last change took {took:?})",
        users as f64 / total.as_secs_f64(),
        (bytes as f64 * f64::from(targets)) / total.as_secs_f64() / 1e6
    );
    signals.shutdown.cancel();
    let _ = daemon.await;
    sim.shutdown().await;

    // 3: first-start reconcile.
    let mut opts = SimOptions::with_devices(targets + 1);
    opts.model.devices[0].users = users as u32;
    let sim = Simulator::start(opts).await.expect("sim");
    let ids = sim.device_ids();
    let (src, tgts) = (ids[0], ids[1..].to_vec());
    let dir = tempfile::tempdir().expect("tmp");
    let t0 = Instant::now();
    let signals = usersync::Shutdown::default();
    let daemon = tokio::spawn(usersync::run(config(&sim, dir.path()), signals.clone()));
    converged(&sim, src, &tgts, limit)
        .await
        .expect("reconcile converges");
    let total = t0.elapsed();
    println!(
        "first-start reconcile of {users} existing users to {targets} targets: {total:?} ({:.0} users/s per target)",
        users as f64 / total.as_secs_f64()
    );
    signals.shutdown.cancel();
    let _ = daemon.await;
}
