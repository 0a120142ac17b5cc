//! The daemon against the simulator, in process, over TLS on loopback: every
//! fault the sync engine must survive. Every wait is bounded.

mod common;

use std::time::Duration;

use common::{Daemon, config, config_with, eventually, open_store, sim, sim_with, wait_converged};
use usersync::sim::{MissingUser, Policies, SimOptions, Simulator, StaleStart};
use usersync::wire::Api;

/// Group "main": the first device as source, the second as the only
/// target, with `extra` settings.
fn one_target_group(sim: &Simulator, extra: &str) -> String {
    let ids = sim.device_ids();
    format!(
        "[[group]]\nname = \"main\"\nsources = [{}]\ntargets = [{}]\n{extra}\n",
        ids[0], ids[1]
    )
}

fn split(sim: &Simulator) -> (u32, Vec<u32>) {
    let ids = sim.device_ids();
    (ids[0], ids[1..].to_vec())
}

#[tokio::test]
async fn enroll_update_delete_propagate_in_every_generation() {
    for api in Api::ALL {
        for missing in [
            MissingUser::Lenient,
            MissingUser::NotFound,
            MissingUser::Internal,
        ] {
            let sim = sim(api, 3).await;
            sim.set_policies(Policies {
                missing_user: missing,
                ..Policies::default()
            });
            let dir = tempfile::tempdir().unwrap();
            let daemon = Daemon::start(config(&sim, dir.path(), ""));
            let (src, targets) = split(&sim);

            sim.enroll_on_device(src, "1000").unwrap();
            sim.enroll_on_device(src, "1001").unwrap();
            wait_converged(&sim, src, &targets).await;
            assert_eq!(sim.users(targets[0]).len(), 2, "{api} {missing:?}");

            sim.update_on_device(src, "1000").unwrap();
            wait_converged(&sim, src, &targets).await;
            sim.delete_on_device(src, "1001").unwrap();
            wait_converged(&sim, src, &targets).await;
            assert_eq!(
                sim.users(targets[1]).keys().collect::<Vec<_>>(),
                vec!["1000"]
            );

            // A change at a target does not propagate (no echo loops).
            sim.enroll_on_device(targets[0], "local").unwrap();
            sim.enroll_on_device(src, "1002").unwrap();
            eventually("1002 everywhere", || async {
                targets.iter().all(|t| sim.users(*t).contains_key("1002"))
            })
            .await;
            assert!(!sim.users(targets[1]).contains_key("local"));
            assert!(!sim.users(src).contains_key("local"));
            daemon.stop().await;
        }
    }
}

#[tokio::test]
async fn offline_target_catches_up_when_it_returns() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "1").unwrap();
    wait_converged(&sim, src, &targets).await;

    sim.set_offline(targets[1]).unwrap();
    for u in ["2", "3", "4"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    sim.delete_on_device(src, "1").unwrap();
    wait_converged(&sim, src, &targets[..1]).await;
    assert_eq!(sim.users(targets[1]).len(), 1, "offline target untouched");

    sim.set_online(targets[1]).unwrap();
    let took = wait_converged(&sim, src, &targets).await;
    eprintln!("offline target converged {took:?} after coming back");
    daemon.stop().await;
}

#[tokio::test]
async fn changes_made_while_the_daemon_was_down_are_replayed_from_the_checkpoint() {
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), "");
    let (src, targets) = split(&sim);
    let daemon = Daemon::start(cfg.clone());
    sim.enroll_on_device(src, "1").unwrap();
    wait_converged(&sim, src, &targets).await;
    daemon.stop().await;

    let checkpoint = open_store(dir.path()).checkpoint(src).unwrap().unwrap();
    assert_eq!(checkpoint, sim.log(src).last().unwrap().id);
    for u in ["2", "3"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    sim.update_on_device(src, "1").unwrap();
    sim.clear_rpc_log();

    let daemon = Daemon::start(cfg);
    wait_converged(&sim, src, &targets).await;
    // The replay is anchored at the checkpoint (the checkpoint event must
    // still be there, unchanged) and handles checkpoint+1 onwards.
    let first_replay = sim
        .rpc_log()
        .into_iter()
        .find(|r| r.method == "GetLog" && r.device_ids == vec![src])
        .unwrap();
    assert_eq!(first_replay.start_event_id, Some(checkpoint));
    let journal = open_store(dir.path()).journal("main").unwrap();
    assert_eq!(journal.len(), 3, "each user recorded once: {journal:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn dropped_realtime_events_are_backfilled() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "warmup").unwrap();
    wait_converged(&sim, src, &targets).await;

    sim.drop_realtime(Some(src), 0.5);
    for i in 0..30 {
        sim.enroll_on_device(src, &format!("u{i}")).unwrap();
    }
    // The last event is dropped too: only the poll can reveal it.
    sim.drop_realtime(Some(src), 1.0);
    sim.enroll_on_device(src, "last").unwrap();
    wait_converged(&sim, src, &targets).await;
    assert!(sim.realtime_stats().dropped_injected >= 2);
    daemon.stop().await;
}

/// Follow-up tail checks run only while drops were seen lately; a daemon
/// killed and started again has seen none yet. Its first drops all
/// trailing (nothing after them shows a gap) must still show within the
/// follow-up checks, not at the idle check ten minutes later (fault seeds
/// 100054 and 100323).
#[tokio::test]
async fn trailing_drops_after_a_restart_are_backfilled() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), "");
    let daemon = Daemon::start(cfg.clone());
    let (src, targets) = split(&sim);
    sim.drop_realtime(Some(src), 0.5);
    for i in 0..10 {
        sim.enroll_on_device(src, &format!("u{i}")).unwrap();
    }
    sim.drop_realtime(Some(src), 0.0);
    sim.enroll_on_device(src, "before").unwrap();
    wait_converged(&sim, src, &targets).await;
    // Every event (the targets' own too) committed: the next daemon's
    // catch-ups find nothing it would count as dropped.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // As a kill -9 leaves it.
    daemon.task.abort();
    let _ = daemon.task.await;
    let daemon = Daemon::start(cfg);
    // Live again (caught up) before the next event, which realtime
    // delivers: the new daemon has seen no drop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sim.enroll_on_device(src, "after").unwrap();
    wait_converged(&sim, src, &targets).await;
    // Past the debounced tail check of the last delivered event.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sim.drop_realtime(Some(src), 1.0);
    sim.enroll_on_device(src, "last").unwrap();
    wait_converged(&sim, src, &targets).await;
    daemon.stop().await;
}

#[tokio::test]
async fn gateway_restart_mid_stream() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "a").unwrap();
    wait_converged(&sim, src, &targets).await;

    sim.restart(Duration::from_millis(300)).await.unwrap();
    for u in ["b", "c"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    sim.delete_on_device(src, "a").unwrap();
    let took = wait_converged(&sim, src, &targets).await;
    eprintln!("converged {took:?} after the gateway restart");
    // Monitoring was lost with the restart and enabled again.
    eventually("monitoring re-enabled", || async { sim.is_monitoring(src) }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn gateway_restart_that_forgets_async_connections() {
    let mut opts = SimOptions::with_devices(2);
    opts.model.preconnect = false;
    opts.reconnect_delay = Duration::from_millis(20);
    let sim = sim_with(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "a").unwrap();
    wait_converged(&sim, src, &targets).await;
    sim.restart(Duration::from_millis(200)).await.unwrap();
    sim.enroll_on_device(src, "b").unwrap();
    wait_converged(&sim, src, &targets).await;
    daemon.stop().await;
}

#[tokio::test]
async fn transient_multi_errors_retry_only_the_failed_device() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "10").unwrap();
    wait_converged(&sim, src, &targets).await;

    sim.clear_rpc_log();
    sim.fail_next_multi(targets[1], 2);
    sim.enroll_on_device(src, "1").unwrap();
    wait_converged(&sim, src, &targets).await;
    let enrolls: Vec<Vec<u32>> = sim
        .rpc_log()
        .into_iter()
        .filter(|r| r.method == "EnrollMulti")
        .map(|r| r.device_ids)
        .collect();
    assert_eq!(enrolls[0], targets, "first attempt to both");
    assert!(enrolls.len() >= 3, "{enrolls:?}");
    assert!(
        enrolls[1..].iter().all(|d| d == &vec![targets[1]]),
        "retries name only the failed device: {enrolls:?}"
    );
    // The healthy target received the user once.
    let to_healthy = enrolls.iter().filter(|d| d.contains(&targets[0])).count();
    assert_eq!(to_healthy, 1);
    daemon.stop().await;
}

#[tokio::test]
async fn poison_user_is_quarantined_and_others_converge() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.reject(targets[0], "666");
    for u in ["1", "2", "666", "3"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    wait_converged(&sim, src, &targets[1..]).await;
    eventually("the poisoned target holds everything else", || async {
        let mut want = sim.users(src);
        want.remove("666");
        sim.users(targets[0]) == want
    })
    .await;
    let store = open_store(dir.path());
    eventually("quarantine recorded", || async {
        store
            .quarantine()
            .unwrap()
            .iter()
            .any(|q| q.device == targets[0] && q.user_id == "666")
    })
    .await;
    // Later users still flow to the poisoned target.
    sim.enroll_on_device(src, "4").unwrap();
    eventually("later user reaches the poisoned target", || async {
        sim.users(targets[0]).contains_key("4")
    })
    .await;
    // Once the device accepts it, a reconcile clears the quarantine.
    sim.accept(targets[0], "666");
    store
        .request_reconcile("main", targets[0], "test", false)
        .unwrap();
    sim.enroll_on_device(src, "5").unwrap(); // wakes the applier
    wait_converged(&sim, src, &targets).await;
    eventually("quarantine cleared", || async {
        store.quarantine().unwrap().is_empty()
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn first_start_reconciles_existing_users() {
    let mut opts = SimOptions::with_devices(3);
    opts.model.devices[0].users = 12;
    opts.model.devices[2].users = 2; // users "1", "2" already there, same bytes
    opts.reconnect_delay = Duration::from_millis(20);
    let sim = sim_with(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let (src, targets) = split(&sim);
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    wait_converged(&sim, src, &targets).await;
    // Users already identical were not written again.
    let enrolled: Vec<String> = sim
        .rpc_log()
        .into_iter()
        .filter(|r| r.method == "EnrollMulti" && r.device_ids.contains(&targets[1]))
        .flat_map(|r| r.user_ids)
        .collect();
    assert_eq!(enrolled.len(), 10, "{enrolled:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn ring_overwrite_while_down_triggers_reconcile() {
    for stale in [StaleStart::Clamp, StaleStart::OutOfRange] {
        let mut opts = SimOptions::with_devices(2);
        opts.model.log_capacity = 8;
        opts.model.policies.stale_start = stale;
        opts.reconnect_delay = Duration::from_millis(20);
        let sim = sim_with(opts).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&sim, dir.path(), "");
        let (src, targets) = split(&sim);
        let daemon = Daemon::start(cfg.clone());
        sim.enroll_on_device(src, "first").unwrap();
        wait_converged(&sim, src, &targets).await;
        daemon.stop().await;

        for i in 0..20 {
            sim.enroll_on_device(src, &format!("u{i}")).unwrap();
        }
        let daemon = Daemon::start(cfg);
        wait_converged(&sim, src, &targets).await;
        assert_eq!(sim.users(targets[0]).len(), 21, "{stale:?}");
        daemon.stop().await;
    }
}

#[tokio::test]
async fn factory_reset_of_a_target_is_repaired() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    for u in ["1", "2", "3"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    wait_converged(&sim, src, &targets).await;
    sim.factory_reset(targets[0]).unwrap();
    assert!(sim.users(targets[0]).is_empty());
    let took = wait_converged(&sim, src, &targets).await;
    eprintln!("factory-reset target repopulated in {took:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn factory_reset_of_a_source_with_prune() {
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let (src, targets) = split(&sim);
    let cfg = config_with(&sim, dir.path(), &one_target_group(&sim, "prune = true"));
    let daemon = Daemon::start(cfg);
    for u in ["1", "2"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    wait_converged(&sim, src, &targets).await;
    sim.factory_reset(src).unwrap();
    eventually("source back", || async { sim.is_connected(src) }).await;
    sim.enroll_on_device(src, "after").unwrap();
    wait_converged(&sim, src, &targets).await;
    assert_eq!(
        sim.users(targets[0]).keys().collect::<Vec<_>>(),
        vec!["after"]
    );
    daemon.stop().await;
}

/// A database reset that keeps the link up and restarts event IDs: the
/// reset event arrives in realtime with an ID at or below the checkpoint.
#[tokio::test]
async fn database_reset_without_reboot_of_a_source_with_prune() {
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let (src, targets) = split(&sim);
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &one_target_group(&sim, "prune = true"),
    ));
    for u in ["1", "2", "3", "4"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    wait_converged(&sim, src, &targets).await;
    sim.database_reset(src).unwrap();
    assert!(sim.is_connected(src) && sim.is_monitoring(src));
    // Enough new events that the restarted IDs pass the old checkpoint: an
    // event with ID checkpoint + 1 must not be taken for the next one.
    let after: Vec<String> = (0..8).map(|i| format!("after{i}")).collect();
    for u in &after {
        sim.enroll_on_device(src, u).unwrap();
    }
    wait_converged(&sim, src, &targets).await;
    assert_eq!(
        sim.users(targets[0]).keys().cloned().collect::<Vec<_>>(),
        after
    );
    daemon.stop().await;
}

#[tokio::test]
async fn delete_all_policy() {
    for propagate in [false, true] {
        let sim = sim(Api::V1_8, 2).await;
        let dir = tempfile::tempdir().unwrap();
        let (src, targets) = split(&sim);
        let cfg = config_with(
            &sim,
            dir.path(),
            &one_target_group(&sim, &format!("propagate_delete_all = {propagate}")),
        );
        let daemon = Daemon::start(cfg);
        for u in ["1", "2"] {
            sim.enroll_on_device(src, u).unwrap();
        }
        wait_converged(&sim, src, &targets).await;
        sim.delete_all_on_device(src).unwrap();
        sim.enroll_on_device(src, "3").unwrap();
        if propagate {
            wait_converged(&sim, src, &targets).await;
        } else {
            eventually("3 arrives", || async {
                sim.users(targets[0]).contains_key("3")
            })
            .await;
            assert_eq!(sim.users(targets[0]).len(), 3, "delete-all not propagated");
            let store = open_store(dir.path());
            eventually("group marked diverged", || async {
                store.diverged().unwrap().contains_key("main")
            })
            .await;
        }
        daemon.stop().await;
    }
}

#[tokio::test]
async fn shutdown_during_a_burst_loses_nothing() {
    let sim = sim(Api::V1_8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), "");
    let (src, targets) = split(&sim);
    sim.set_latency("EnrollMulti", Duration::from_millis(50));
    let daemon = Daemon::start(cfg.clone());
    sim.enroll_on_device(src, "warm").unwrap();
    wait_converged(&sim, src, &targets).await;
    for i in 0..40 {
        sim.enroll_on_device(src, &format!("b{i}")).unwrap();
    }
    daemon.stop().await;
    for i in 40..50 {
        sim.enroll_on_device(src, &format!("b{i}")).unwrap();
    }
    let daemon = Daemon::start(cfg);
    wait_converged(&sim, src, &targets).await;
    assert_eq!(sim.users(targets[1]).len(), 51);
    daemon.stop().await;
}

#[tokio::test]
async fn gateway_down_at_start_is_not_fatal() {
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), "");
    let (src, targets) = split(&sim);
    sim.shutdown().await;
    let daemon = Daemon::start(cfg);
    // Nothing answers; the daemon is up (state open, devices tracked) and
    // keeps retrying instead of exiting.
    let store = open_store(dir.path());
    eventually("daemon started its devices", || async {
        store.device_statuses().unwrap().len() == 2
    })
    .await;
    assert!(!daemon.task.is_finished());
    sim.restart(Duration::ZERO).await.unwrap();
    sim.enroll_on_device(src, "x").unwrap();
    wait_converged(&sim, src, &targets).await;
    daemon.stop().await;
}

#[tokio::test]
async fn corrupt_state_is_an_error_not_a_reset() {
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), "");
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/state.db"),
        b"not a database at all, not at all",
    )
    .unwrap();
    let signals = usersync::Shutdown::default();
    let err = usersync::run(cfg, signals).await.unwrap_err();
    assert!(err.to_string().contains("state.db"), "{err}");
}

/// The integrity check of every page runs after READY=1 (it reads the
/// whole file): a database whose header is sound and whose pages are not
/// still stops the daemon with an error naming the file.
#[tokio::test]
async fn a_state_failing_its_integrity_check_stops_the_daemon() {
    use usersync::store::{self, Change, ChangeKind, Store};
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, dir.path(), "");
    {
        let s = Store::open(&cfg.state_dir).unwrap();
        s.with(|c| {
            let tx = c.transaction()?;
            for i in 0..3000 {
                let change = Change {
                    group: "gone".into(),
                    user_id: format!("{i:08}"),
                    source: 1,
                    kind: ChangeKind::User,
                };
                store::record_change(&tx, &change)?;
            }
            tx.commit()?;
            Ok(())
        })
        .unwrap();
    }
    // Closing the last connection folded the WAL into the file. Page 1
    // (header and schema) stays; the b-tree header of the last page goes.
    let db = cfg.state_dir.join(store::DB_FILE);
    let mut bytes = std::fs::read(&db).unwrap();
    let page = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    let last = bytes.len() / page - 1;
    assert!(last > 1, "a database of one page");
    for b in &mut bytes[last * page..last * page + 64] {
        *b = 0x5a;
    }
    std::fs::write(&db, bytes).unwrap();
    let run = usersync::run(cfg, usersync::Shutdown::default());
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the daemon stops by itself")
        .unwrap_err();
    assert!(err.to_string().contains("state.db"), "{err}");
}
