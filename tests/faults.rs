//! A randomized, seeded fault suite: each schedule runs the daemon (in
//! process) against a simulator with a random answer to every open
//! question of WIRE.md (§5), drives a random sequence of on-device changes
//! and faults, then a quiet period, and asserts:
//!
//! * every target holds exactly its source's users, byte for byte
//!   (pairs the daemon quarantined excepted, and reported);
//! * no user the source still held was deleted from a target (the
//!   simulator's delete guard: a delete of a user the source had held
//!   without a break for longer than a call could take is a violation);
//! * the daemon never exited with an error.
//!
//! Quick profile (CI): `cargo test --test faults`. Long profile:
//! `USERSYNC_FAULT_SCHEDULES=1000 cargo test --release --test faults -- --nocapture`.
//! A failing schedule prints its seed; `USERSYNC_FAULT_SEED=<seed>
//! USERSYNC_FAULT_SCHEDULES=1 cargo test --test faults -- --nocapture`
//! replays it (the same faults in the same order; timing may differ).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use usersync::sim::{
    LowByteCodes, MissingUser, PastNewest, Policies, SimOptions, StaleStart, StreamHeaders,
};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one schedule did.
#[derive(Debug, Default)]
struct Report {
    faults: BTreeMap<&'static str, u32>,
    converged_in: Duration,
    quarantined: usize,
}

fn policies(rng: &mut SmallRng) -> (Policies, bool) {
    let p = Policies {
        stream_headers: if rng.random() {
            StreamHeaders::Lazy
        } else {
            StreamHeaders::Eager
        },
        stale_start: if rng.random() {
            StaleStart::OutOfRange
        } else {
            StaleStart::Clamp
        },
        past_newest: if rng.random() {
            PastNewest::OutOfRange
        } else {
            PastNewest::Empty
        },
        missing_user: if rng.random() {
            MissingUser::NotFound
        } else {
            MissingUser::Lenient
        },
        low_byte_codes: if rng.random() {
            LowByteCodes::Full
        } else {
            LowByteCodes::Split
        },
        ..Policies::default()
    };
    (p, rng.random())
}

async fn schedule(seed: u64, steps: u32) -> Result<Report, String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (policies, preconnect) = policies(&mut rng);
    let mut opts = SimOptions::with_devices(4);
    opts.reconnect_delay = Duration::from_millis(20);
    opts.model.policies = policies;
    opts.model.preconnect = preconnect;
    opts.model.log_capacity = 200;
    opts.model.seed = seed;
    let sim = common::sim_with(opts).await;
    let ids = sim.device_ids();
    let (src, targets) = (ids[0], ids[1..].to_vec());
    // The guard's window: longer than any call may take (call timeout 5 s).
    sim.with_model(|m| m.guard_deletes(vec![src], targets.clone(), Duration::from_secs(6)));
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let delete_all = rng.random::<bool>();
    let group = format!(
        "[[group]]\nname = \"main\"\nsources = [{src}]\ntargets = [{}]\nprune = true\npropagate_delete_all = {delete_all}\n",
        targets
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cfg = common::config_with(&sim, dir.path(), &group);
    let mut daemon = common::Daemon::start(cfg.clone());
    let mut report = Report::default();
    let mut offline: Vec<u32> = Vec::new();
    for _ in 0..steps {
        let user = format!("u{}", rng.random_range(0..24));
        let fault = match rng.random_range(0..100) {
            0..=29 => {
                sim.enroll_on_device(src, &user)
                    .map_err(|e| e.to_string())?;
                "enroll"
            }
            30..=39 => {
                if sim.holds(src, &user) {
                    sim.update_on_device(src, &user)
                        .map_err(|e| e.to_string())?;
                }
                "update"
            }
            40..=49 => {
                if sim.holds(src, &user) {
                    sim.delete_on_device(src, &user)
                        .map_err(|e| e.to_string())?;
                }
                "delete"
            }
            50..=56 => {
                let t = targets[rng.random_range(0..targets.len())];
                if offline.contains(&t) {
                    sim.set_online(t).map_err(|e| e.to_string())?;
                    offline.retain(|o| *o != t);
                    "target online"
                } else {
                    sim.set_offline(t).map_err(|e| e.to_string())?;
                    offline.push(t);
                    "target offline"
                }
            }
            57..=61 => {
                sim.drop_realtime(None, rng.random_range(0.0..0.8));
                "realtime drops"
            }
            62..=65 => {
                let t = targets[rng.random_range(0..targets.len())];
                sim.fail_next_multi(t, rng.random_range(1..4));
                "transient Multi errors"
            }
            66..=67 => {
                let t = targets[rng.random_range(0..targets.len())];
                sim.reject(t, &user);
                "permanent refusal"
            }
            68..=71 => {
                sim.restart(Duration::from_millis(rng.random_range(50..300)))
                    .await
                    .map_err(|e| e.to_string())?;
                "gateway restart"
            }
            72..=74 => {
                let d = ids[rng.random_range(0..ids.len())];
                let _ = sim.clear_log(d);
                "log clear"
            }
            75..=77 => {
                let t = targets[rng.random_range(0..targets.len())];
                let _ = sim.factory_reset(t);
                "target factory reset"
            }
            78..=79 => {
                let t = targets[rng.random_range(0..targets.len())];
                let _ = sim.database_reset(t);
                "target database reset"
            }
            80..=81 => {
                let _ = sim.database_reset(src);
                "source database reset"
            }
            82..=83 if delete_all => {
                let _ = sim.delete_all_on_device(src);
                "source delete-all"
            }
            84..=89 => {
                // As a kill -9 leaves it: no orderly stop.
                daemon.task.abort();
                let _ = daemon.task.await;
                daemon = common::Daemon::start(cfg.clone());
                "daemon killed and restarted"
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
                "pause"
            }
        };
        *report.faults.entry(fault).or_default() += 1;
        if std::env::var("USERSYNC_FAULT_TRACE").is_ok() {
            eprintln!(
                "fault step: {fault} {user} at {:?}",
                std::time::SystemTime::now()
            );
        }
        if daemon.task.is_finished() {
            return Err(format!("seed {seed}: the daemon exited during the run"));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
    }

    // Quiet period: every fault lifted.
    sim.drop_realtime(None, 0.0);
    for t in offline {
        sim.set_online(t).map_err(|e| e.to_string())?;
    }
    let quiet = Instant::now();
    // Trailing events all dropped show at the next follow-up tail check
    // (up to a minute after the last one that arrived), then a reconcile.
    let deadline = quiet + Duration::from_secs(150);
    loop {
        let quarantined: Vec<(u32, String)> = common::open_store(dir.path())
            .quarantine()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|q| (q.device, q.user_id))
            .collect();
        let want = sim.users(src);
        let mut pending = Vec::new();
        for t in &targets {
            let mut have = sim.users(*t);
            let mut expect = want.clone();
            for (d, u) in &quarantined {
                if d == t {
                    have.remove(u);
                    expect.remove(u);
                }
            }
            if have != expect {
                pending.push(*t);
            }
        }
        if pending.is_empty() {
            report.converged_in = quiet.elapsed();
            report.quarantined = quarantined.len();
            break;
        }
        if daemon.task.is_finished() {
            return Err(format!(
                "seed {seed}: the daemon exited during the quiet period"
            ));
        }
        if Instant::now() > deadline {
            let diff: Vec<String> = pending
                .iter()
                .map(|t| {
                    let have = sim.users(*t);
                    let missing: Vec<&String> =
                        want.keys().filter(|u| !have.contains_key(*u)).collect();
                    let extra: Vec<&String> =
                        have.keys().filter(|u| !want.contains_key(*u)).collect();
                    let different: Vec<&String> = want
                        .iter()
                        .filter(|(u, b)| have.get(*u).is_some_and(|h| h != *b))
                        .map(|(u, _)| u)
                        .collect();
                    format!(
                        "target {t}: missing {missing:?}, extra {extra:?}, different {different:?}"
                    )
                })
                .collect();
            return Err(format!(
                "seed {seed}: did not converge within 150 s of quiet (faults: {:?}; quarantined {quarantined:?}): {diff:#?}",
                report.faults
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let violations = sim.with_model(|m| m.delete_violations());
    if !violations.is_empty() {
        return Err(format!("seed {seed}: {violations:?}"));
    }
    daemon.signals.shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(20), daemon.task).await {
        Ok(Ok(Ok(()))) => {}
        other => {
            return Err(format!(
                "seed {seed}: the daemon did not stop cleanly: {other:?}"
            ));
        }
    }
    sim.shutdown().await;
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_fault_schedules() {
    if std::env::var("USERSYNC_FAULT_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("usersync=info")
            .with_ansi(false)
            .try_init();
    }
    let base = env("USERSYNC_FAULT_SEED", 0xfa17);
    let n = env("USERSYNC_FAULT_SCHEDULES", 4);
    let steps = u32::try_from(env("USERSYNC_FAULT_STEPS", 30)).unwrap_or(30);
    let mut totals: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut worst = Duration::ZERO;
    let mut quarantined = 0;
    let mut failures = Vec::new();
    for i in 0..n {
        let seed = base + i;
        match schedule(seed, steps).await {
            Ok(r) => {
                for (k, v) in r.faults {
                    *totals.entry(k).or_default() += v;
                }
                worst = worst.max(r.converged_in);
                quarantined += r.quarantined;
            }
            Err(e) => {
                eprintln!("FAILED {e}");
                failures.push(e);
            }
        }
        if (i + 1) % 50 == 0 {
            eprintln!(
                "... {} schedules, {} failed, worst convergence {worst:?}",
                i + 1,
                failures.len()
            );
        }
    }
    let injected: u32 = totals.values().sum();
    eprintln!(
        "fault suite: {n} schedules from seed {base:#x}, {injected} steps ({totals:?}), worst convergence after the quiet period began {worst:?}, {quarantined} quarantined pairs, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
