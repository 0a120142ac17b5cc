//! The holes a review of the sync core found (issue 8): each test shows a
//! path where a change was lost, an older version won, a user was deleted
//! although its source held it, or a group stopped making progress. Against
//! the simulator's least convenient defaults; every wait is bounded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, config_with, eventually, open_store, within};
use tokio::sync::mpsc;
use usersync::config::Config;
use usersync::service::Health;
use usersync::sim::{SimOptions, Simulator, codes};

async fn sim(devices: u32) -> Simulator {
    let mut opts = SimOptions::with_devices(devices);
    opts.reconnect_delay = Duration::from_millis(20);
    common::sim_with(opts).await
}

fn group(name: &str, sources: &[u32], targets: &[u32], extra: &str) -> String {
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    format!(
        "[[group]]\nname = \"{name}\"\nsources = [{}]\ntargets = [{}]\n{extra}\n",
        list(sources),
        list(targets)
    )
}

/// A daemon that takes reloads.
struct Reloadable {
    tx: mpsc::Sender<usersync::Reload>,
    signals: usersync::Shutdown,
    task: tokio::task::JoinHandle<Result<(), usersync::DaemonError>>,
}

impl Reloadable {
    fn start(config: Config) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let signals = usersync::Shutdown::default();
        let task = tokio::spawn(usersync::supervisor::run_with(
            config,
            signals.clone(),
            Some(rx),
            Arc::new(Health::default()),
        ));
        Reloadable { tx, signals, task }
    }

    async fn reload(&self, config: Config) -> String {
        let (done, summary) = tokio::sync::oneshot::channel();
        self.tx
            .send(usersync::Reload { config, done })
            .await
            .expect("daemon takes reloads");
        within("reload applied", summary).await.expect("summary")
    }

    async fn stop(self) {
        self.signals.shutdown.cancel();
        within("daemon stops", self.task)
            .await
            .expect("daemon task")
            .expect("daemon exits cleanly");
    }
}

/// Item 1: a reload that replaces a group's applier while its write is in
/// flight. The new applier must not write until the old one's call is
/// over, or the older version can land last and stay.
#[tokio::test]
async fn reload_never_runs_two_writers_for_one_group() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let g = group("main", &[src], &[dst], "");
    let daemon = Reloadable::start(config_with(&sim, dir.path(), &g));
    sim.enroll_on_device(src, "warm").unwrap();
    eventually("warm-up", || async { sim.holds(dst, "warm") }).await;

    // The target answers nothing: the applier's write of v1 hangs. (Its
    // log reads hang too; only writes are counted.)
    let writes = || {
        sim.rpc_log()
            .iter()
            .filter(|r| r.method.starts_with("Enroll") || r.method.starts_with("Delete"))
            .filter(|r| r.device_ids.contains(&dst))
            .count()
    };
    sim.clear_rpc_log();
    sim.hold_device(dst, true);
    sim.enroll_on_device(src, "u").unwrap();
    eventually("v1 in flight", || async { writes() == 1 }).await;
    // A [sync] change replaces the applier; then the user changes (v2).
    let mut cfg = config_with(&sim, dir.path(), &g);
    cfg.sync.batch_users = 32;
    let summary = daemon.reload(cfg).await;
    assert!(summary.contains("main"), "{summary}");
    sim.update_on_device(src, "u").unwrap();
    // However long we look, one write at a time reaches the held target.
    for _ in 0..30 {
        assert_eq!(writes(), 1, "two writers for one group");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.hold_device(dst, false);
    eventually("the target ends with v2", || async {
        sim.user_bytes(dst, "u") == sim.user_bytes(src, "u")
    })
    .await;
    daemon.stop().await;
}

/// Item 2: a group with two enrollment desks, one switched off: changes of
/// the other flow; the switched-off desk's changes wait and go once it is
/// back.
#[tokio::test]
async fn an_offline_source_does_not_stall_its_group() {
    let sim = sim(3).await;
    let ids = sim.device_ids();
    let (s1, s2, t) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("desks", &[s1, s2], &[t], ""),
    ));
    sim.enroll_on_device(s2, "from-s2").unwrap();
    eventually("s2's user", || async { sim.holds(t, "from-s2") }).await;
    // s2 records a change, then goes away before it is applied.
    sim.hold_device(s2, true);
    sim.update_on_device(s2, "from-s2").unwrap();
    sim.set_offline(s2).unwrap();
    sim.hold_device(s2, false);
    for i in 0..5 {
        sim.enroll_on_device(s1, &format!("s1-{i}")).unwrap();
    }
    eventually("s1's users flow while s2 is away", || async {
        (0..5).all(|i| sim.holds(t, &format!("s1-{i}")))
    })
    .await;
    sim.set_online(s2).unwrap();
    eventually("s2's change goes once it is back", || async {
        sim.user_bytes(t, "from-s2") == sim.user_bytes(s2, "from-s2")
    })
    .await;
    daemon.stop().await;
}

/// Item 3: a source added to an existing group has its users synced; a
/// group removed and added again starts afresh.
#[tokio::test]
async fn a_source_added_by_reload_has_its_users_synced() {
    let sim = sim(4).await;
    let ids = sim.device_ids();
    let (s1, s2, t, t2) = (ids[0], ids[1], ids[2], ids[3]);
    for u in ["old-1", "old-2"] {
        sim.enroll_on_device(s2, u).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Reloadable::start(config_with(&sim, dir.path(), &group("g", &[s1], &[t], "")));
    sim.enroll_on_device(s1, "a").unwrap();
    eventually("s1's user", || async { sim.holds(t, "a") }).await;
    daemon
        .reload(config_with(
            &sim,
            dir.path(),
            &group("g", &[s1, s2], &[t], ""),
        ))
        .await;
    eventually("s2's users, enrolled before it joined", || async {
        sim.holds(t, "old-1") && sim.holds(t, "old-2")
    })
    .await;

    // Removed, then added back: no stale cursor, a full reconcile.
    let other = group("other", &[s2], &[t2], "");
    daemon.reload(config_with(&sim, dir.path(), &other)).await;
    eventually("the removed group's state is dropped", || async {
        open_store(dir.path()).cursors("g").unwrap().is_empty()
    })
    .await;
    sim.enroll_on_device(s1, "while-removed").unwrap();
    daemon
        .reload(config_with(
            &sim,
            dir.path(),
            &(group("g", &[s1], &[t], "") + &other),
        ))
        .await;
    eventually("the re-added group catches up", || async {
        sim.holds(t, "while-removed")
    })
    .await;
    daemon.stop().await;
}

/// Items 4 and 7: a source record that cannot be read is never taken for
/// a deleted user, and does not hold up the other users of its batch.
#[tokio::test]
async fn an_unreadable_source_record_is_not_a_delete() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[src], &[dst], ""),
    ));
    sim.enroll_on_device(src, "victim").unwrap();
    eventually("victim synced", || async { sim.holds(dst, "victim") }).await;
    let before = sim.user_bytes(dst, "victim").unwrap();

    // The source's record of "victim" no longer decodes (truncated), and
    // the device logs an update of it along with other users' changes.
    sim.with_model(|m| m.corrupt_user(src, "victim", vec![0x0a, 0x05, 0x0a]));
    sim.event_on_device(src, codes::USER_UPDATE_SUCCESS, "victim")
        .unwrap();
    for i in 0..3 {
        sim.enroll_on_device(src, &format!("other-{i}")).unwrap();
    }
    eventually("the other users get through", || async {
        (0..3).all(|i| sim.holds(dst, &format!("other-{i}")))
    })
    .await;
    eventually("the unreadable user is quarantined", || async {
        open_store(dir.path())
            .quarantine()
            .unwrap()
            .iter()
            .any(|q| q.user_id == "victim" && q.code == "SourceUnreadable")
    })
    .await;
    assert_eq!(
        sim.user_bytes(dst, "victim"),
        Some(before),
        "the target keeps what it held"
    );
    assert!(
        !sim.rpc_log().iter().any(|r| {
            r.method.starts_with("Delete") && r.user_ids.iter().any(|u| u == "victim")
        }),
        "no delete was ever sent for it"
    );
    daemon.stop().await;
}

/// Item 5: a delete-all event the source does not bear out (it still holds
/// users) wipes nothing: a delete-all becomes a reconcile with prune, which
/// deletes only the users no source holds.
#[tokio::test]
async fn a_delete_all_is_confirmed_at_the_source() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[src], &[dst], "propagate_delete_all = true"),
    ));
    for u in ["1", "2"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    eventually("synced", || async {
        sim.holds(dst, "1") && sim.holds(dst, "2")
    })
    .await;
    // A delete-all event while the source still holds its users (a log
    // re-read after a false reset, say).
    sim.event_on_device(src, codes::USER_DELETE_ALL_SUCCESS, "")
        .unwrap();
    sim.enroll_on_device(src, "3").unwrap();
    eventually("later changes flow", || async { sim.holds(dst, "3") }).await;
    assert!(sim.holds(dst, "1") && sim.holds(dst, "2"), "nothing wiped");
    assert!(
        !sim.rpc_log().iter().any(|r| r.method == "DeleteAllMulti"),
        "no DeleteAllMulti sent"
    );
    // A real one (the source is empty) is propagated.
    sim.delete_all_on_device(src).unwrap();
    eventually("a confirmed delete-all propagates", || async {
        sim.user_count(dst) == 0
    })
    .await;
    daemon.stop().await;
}

/// Item 8: a target back from a long absence replays its backlog while
/// the up-to-date targets keep receiving fresh changes.
#[tokio::test]
async fn a_lagging_target_does_not_hold_up_the_others() {
    let sim = sim(3).await;
    let ids = sim.device_ids();
    let (src, lagging, fresh) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with(&sim, dir.path(), &group("g", &[src], &[lagging, fresh], ""));
    cfg.sync.batch_users = 16;
    let daemon = Daemon::start(cfg);
    sim.enroll_on_device(src, "warm").unwrap();
    eventually("warm-up", || async {
        sim.holds(lagging, "warm") && sim.holds(fresh, "warm")
    })
    .await;
    sim.set_offline(lagging).unwrap();
    for i in 0..600 {
        sim.enroll_on_device(src, &format!("b{i}")).unwrap();
    }
    eventually("the online target has the backlog", || async {
        sim.holds(fresh, "b599")
    })
    .await;
    // Every write costs the lagging target's replay real time.
    sim.set_device_latency(Duration::from_millis(5));
    sim.set_online(lagging).unwrap();
    eventually("the replay has begun", || async {
        sim.holds(lagging, "b0")
    })
    .await;
    let t0 = std::time::Instant::now();
    sim.enroll_on_device(src, "new").unwrap();
    eventually("the fresh change reaches the up-to-date target", || async {
        sim.holds(fresh, "new")
    })
    .await;
    let took = t0.elapsed();
    let replayed = (0..600)
        .filter(|i| sim.holds(lagging, &format!("b{i}")))
        .count();
    eprintln!(
        "fresh change reached the up-to-date target in {took:?}; the lagging one had replayed {replayed}/600"
    );
    assert!(
        !sim.holds(lagging, "b599"),
        "the fresh change waited for the whole replay"
    );
    eventually("the lagging target converges", || async {
        sim.holds(lagging, "b599") && sim.holds(lagging, "new")
    })
    .await;
    daemon.stop().await;
}

/// Item 9: status changes lost on the way (the stream's queue, or sent
/// before it was registered): the periodic device list repairs the view.
#[tokio::test]
async fn lost_status_changes_are_repaired_from_the_device_list() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[src], &[dst], ""),
    ));
    sim.enroll_on_device(src, "1").unwrap();
    eventually("synced", || async { sim.holds(dst, "1") }).await;
    sim.mute_status(true);
    sim.set_offline(dst).unwrap();
    eventually("the daemon sees the target gone", || async {
        open_store(dir.path())
            .device_statuses()
            .unwrap()
            .iter()
            .any(|r| r.device == dst && r.state == "disconnected")
    })
    .await;
    sim.enroll_on_device(src, "2").unwrap();
    sim.set_online(dst).unwrap();
    eventually("the target catches up without a status change", || async {
        sim.holds(dst, "2")
    })
    .await;
    sim.mute_status(false);
    daemon.stop().await;
}

#[tokio::test]
async fn removed_source_rows_are_dropped_not_stuck() {
    let sim = sim(3).await;
    let ids = sim.device_ids();
    let (s1, s2, t) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Reloadable::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[s1, s2], &[t], ""),
    ));
    sim.enroll_on_device(s1, "warm").unwrap();
    eventually("warm-up", || async { sim.holds(t, "warm") }).await;
    // s2's change is recorded while the target is away, then s2 leaves.
    sim.set_offline(t).unwrap();
    sim.enroll_on_device(s2, "orphan").unwrap();
    eventually("recorded", || async {
        open_store(dir.path())
            .journal("g")
            .unwrap()
            .iter()
            .any(|r| r.user_id == "orphan")
    })
    .await;
    daemon
        .reload(config_with(&sim, dir.path(), &group("g", &[s1], &[t], "")))
        .await;
    sim.enroll_on_device(s1, "after").unwrap();
    sim.set_online(t).unwrap();
    eventually("the group moves on", || async { sim.holds(t, "after") }).await;
    assert!(!sim.holds(t, "orphan"));
    daemon.stop().await;
}

/// A device whose monitoring was lost without a status change we saw (a
/// short drop between two device-list reads, status muted): the idle
/// check finds events realtime never delivered and sets it up again.
#[tokio::test]
async fn silently_lost_monitoring_is_restored_by_the_idle_check() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with(&sim, dir.path(), &group("g", &[src], &[dst], ""));
    cfg.sync.idle_check_interval = Duration::from_secs(1);
    cfg.sync.poll_interval = Duration::from_secs(3600);
    let daemon = Daemon::start(cfg);
    sim.enroll_on_device(src, "1").unwrap();
    eventually("synced", || async { sim.holds(dst, "1") }).await;
    sim.mute_status(true);
    sim.set_offline(src).unwrap();
    sim.set_online(src).unwrap();
    eventually("back, unmonitored", || async {
        sim.is_connected(src) && !sim.is_monitoring(src)
    })
    .await;
    sim.enroll_on_device(src, "2").unwrap();
    eventually("found by the idle check", || async { sim.holds(dst, "2") }).await;
    eventually("monitoring enabled again", || async {
        sim.is_monitoring(src)
    })
    .await;
    sim.mute_status(false);
    daemon.stop().await;
}

/// A user changed at a target itself is counted as drift until a reconcile
/// of that target, whose result is kept (issue 9, item 4 and 5).
#[tokio::test]
async fn changes_at_a_target_are_counted_until_a_reconcile() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[src], &[dst], "prune = true"),
    ));
    sim.enroll_on_device(src, "1").unwrap();
    eventually("synced", || async { sim.holds(dst, "1") }).await;
    // The target's first-start reconcile (with prune) may still be under
    // way: it would prune the change below and clear its count.
    eventually("the first-start reconcile is done", || async {
        open_store(dir.path())
            .with(|c| usersync::store::reconcile_results(c))
            .unwrap()
            .iter()
            .any(|r| r.target == dst)
    })
    .await;
    // Our own writes to the target are not drift.
    assert!(
        open_store(dir.path())
            .with(|c| usersync::store::target_drift(c))
            .unwrap()
            .is_empty()
    );
    sim.enroll_on_device(dst, "local").unwrap();
    eventually("the change at the target is counted", || async {
        open_store(dir.path())
            .with(|c| usersync::store::target_drift(c))
            .unwrap()
            .iter()
            .any(|d| d.target == dst && d.changes == 1 && d.last_user == "local")
    })
    .await;
    open_store(dir.path())
        .request_reconcile("g", dst, "operator", true)
        .unwrap();
    eventually("the reconcile prunes it and records its result", || async {
        let st = open_store(dir.path());
        !sim.holds(dst, "local")
            && st
                .with(|c| usersync::store::target_drift(c))
                .unwrap()
                .is_empty()
            && st
                .with(|c| usersync::store::reconcile_results(c))
                .unwrap()
                .iter()
                .any(|r| r.target == dst && r.extra == 1 && r.pruned == 1)
    })
    .await;
    daemon.stop().await;
}

/// A device that logs events faster than one read takes still finishes its
/// catch-up (a pass ends at the end of the log; what came meanwhile is read
/// by the tail check after it).
#[tokio::test]
async fn a_busy_device_finishes_its_catch_up() {
    let sim = Arc::new(sim(2).await);
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    sim.set_device_latency(Duration::from_millis(150));
    let busy = {
        let sim = Arc::clone(&sim);
        tokio::spawn(async move {
            // Access events at the target, one every 50 ms, for at most 30 s.
            for _ in 0..600 {
                let _ = sim.event_on_device(dst, 0x1000, "");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    sim.enroll_on_device(src, "1").unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[src], &[dst], ""),
    ));
    eventually("the busy target gets its users", || async {
        sim.holds(dst, "1")
    })
    .await;
    busy.abort();
    daemon.stop().await;
}

/// A source that stays connected but answers nothing holds up only its own
/// changes; the other source's changes of the same batch go on.
#[tokio::test]
async fn a_hanging_source_does_not_stall_its_group() {
    let sim = sim(3).await;
    let ids = sim.device_ids();
    let (s1, s2, t) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with(&sim, dir.path(), &group("g", &[s1, s2], &[t], ""));
    cfg.gateway.call_timeout = Duration::from_secs(1);
    let daemon = Daemon::start(cfg);
    sim.enroll_on_device(s1, "warm").unwrap();
    eventually("warm-up", || async { sim.holds(t, "warm") }).await;
    sim.hold_device(s2, true);
    sim.enroll_on_device(s2, "from-s2").unwrap();
    sim.enroll_on_device(s1, "from-s1").unwrap();
    eventually("s1's change goes while s2 hangs", || async {
        sim.holds(t, "from-s1")
    })
    .await;
    sim.hold_device(s2, false);
    eventually("s2's change goes once it answers", || async {
        sim.holds(t, "from-s2")
    })
    .await;
    daemon.stop().await;
}

/// Progress of a first-sight search saved before the device's log was
/// cleared: the stale progress is dropped, not retried forever.
#[tokio::test]
async fn stale_search_progress_is_dropped() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(&sim, dir.path(), &group("g", &[src], &[dst], ""));
    open_store(dir.path())
        .with(|c| usersync::store::set_log_search(c, dst, 999_999, 1 << 32))
        .unwrap();
    sim.enroll_on_device(src, "1").unwrap();
    let daemon = Daemon::start(cfg);
    eventually("the target becomes live and gets its users", || async {
        sim.holds(dst, "1")
    })
    .await;
    daemon.stop().await;
}

/// A user enrolled at two desks of one group and deleted at one of them
/// stays on the doors: absent means absent at every source.
#[tokio::test]
async fn a_user_another_source_holds_is_not_deleted() {
    let sim = sim(3).await;
    let ids = sim.device_ids();
    let (a, b, t) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[a, b], &[t], ""),
    ));
    sim.enroll_on_device(a, "u").unwrap();
    sim.enroll_on_device(b, "u").unwrap();
    eventually("u on the door", || async { sim.holds(t, "u") }).await;
    sim.clear_rpc_log();
    sim.delete_on_device(b, "u").unwrap();
    sim.enroll_on_device(a, "later").unwrap();
    eventually("a later change went through", || async {
        sim.holds(t, "later")
    })
    .await;
    assert!(sim.holds(t, "u"), "a still holds u");
    assert!(
        !sim.rpc_log()
            .iter()
            .any(|r| r.method.starts_with("Delete") && r.device_ids.contains(&t)),
        "no delete was sent to the door"
    );
    daemon.stop().await;
}

/// A delete-all at one desk of a two-desk group deletes that desk's users
/// from the doors and keeps the other desk's.
#[tokio::test]
async fn a_delete_all_at_one_source_keeps_the_others_users() {
    let sim = sim(3).await;
    let ids = sim.device_ids();
    let (a, b, t) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group("g", &[a, b], &[t], "propagate_delete_all = true"),
    ));
    sim.enroll_on_device(a, "a1").unwrap();
    sim.enroll_on_device(b, "b1").unwrap();
    eventually("both on the door", || async {
        sim.holds(t, "a1") && sim.holds(t, "b1")
    })
    .await;
    sim.delete_all_on_device(a).unwrap();
    eventually("a's users leave the door", || async { !sim.holds(t, "a1") }).await;
    assert!(sim.holds(t, "b1"), "b's user stays");
    daemon.stop().await;
}

/// In one step of the simulator, so no log read can come between: a
/// database reset of `device` without a reboot (users and log gone, IDs
/// restart, WIRE.md §5.5) whose reset event and every event up to the old
/// newest ID the gateway's queue drops (B10): `dropped` (an enroll, say),
/// then access events up to that ID. Then realtime delivers `delivered`,
/// whose new ID is the old newest + 1: it looks like the next event.
fn reset_behind_the_next_event(
    sim: &Simulator,
    device: u32,
    dropped: Option<&str>,
    delivered: Option<&str>,
) {
    sim.with_model(|m| {
        let old_newest = m.newest_event_id(device).expect("a log before the reset");
        m.set_drop_fraction(Some(device), 1.0);
        m.database_reset(device).unwrap();
        if let Some(user) = dropped {
            m.device_enroll(device, user).unwrap();
        }
        while m.newest_event_id(device) < Some(old_newest) {
            m.device_event(device, codes::VERIFY_SUCCESS, "").unwrap();
        }
        assert_eq!(m.newest_event_id(device), Some(old_newest), "all dropped");
        m.set_drop_fraction(Some(device), 0.0);
        let id = match delivered {
            Some(user) => m.device_enroll(device, user).unwrap(),
            None => m.device_event(device, codes::VERIFY_SUCCESS, "").unwrap(),
        };
        assert_eq!(id, old_newest + 1);
    });
}

/// Users enrolled at `source` before the daemon starts, with exact copies
/// at `target`: the daemon's first start reads no log but by its first
/// sight and writes nothing, so nothing reads a log afterwards unless an
/// event asks for it.
fn presynced(sim: &Simulator, source: u32, target: u32, users: &[&str]) {
    for u in users {
        sim.enroll_on_device(source, u).unwrap();
        let raw = sim.user_bytes(source, u).unwrap();
        sim.put_raw_on_device(target, raw).unwrap();
    }
}

async fn live_and_reconciled(dir: &std::path::Path, live: &[u32], targets: &[u32]) {
    eventually("devices live, first reconciles done", || async {
        let st = open_store(dir);
        let statuses = st.device_statuses().unwrap();
        let results = st.with(|c| usersync::store::reconcile_results(c)).unwrap();
        live.iter()
            .all(|d| statuses.iter().any(|r| r.device == *d && r.state == "live"))
            && targets
                .iter()
                .all(|t| results.iter().any(|r| r.target == *t))
    })
    .await;
}

/// A database reset without a reboot, at a source and at a target, whose
/// reset event and following events up to the checkpoint realtime all
/// dropped, and whose next event arrived as checkpoint + 1: realtime takes
/// it for the continuation. The tail check that follows it must still see
/// the reset (the log no longer holds the events before it): the source's
/// users the reset deleted leave the doors, the one enrolled among the
/// dropped events reaches them, and the target is repopulated.
#[tokio::test]
async fn a_reset_whose_next_event_passes_for_the_continuation_is_found_by_the_tail_check() {
    let sim = sim(5).await;
    let ids = sim.device_ids();
    let (s1, t1, s2, t2, spare) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    presynced(&sim, s1, t1, &["a", "b"]);
    presynced(&sim, s2, t2, &["x", "y"]);
    let dir = tempfile::tempdir().unwrap();
    let groups = group("g1", &[s1], &[t1], "prune = true") + &group("g2", &[s2], &[t2], "");
    // Setting the scene: no check of the daemon's own reads a log (the
    // settling checks after the catch-ups come an hour later).
    let mut quiet = config_with(&sim, dir.path(), &groups);
    quiet.sync.tail_check_delay = Duration::from_secs(3600);
    quiet.sync.idle_check_interval = Duration::from_secs(3600);
    quiet.devices.remove(&spare);
    let daemon = Reloadable::start(quiet);
    live_and_reconciled(dir.path(), &[s1, t1, s2, t2], &[t1, t2]).await;

    // Tail checks a second after each event from now on. The reload adds
    // a device: once it has a checkpoint, the event consumer works with the
    // new configuration (the settling checks already set stay an hour away).
    let mut checks = config_with(&sim, dir.path(), &groups);
    checks.sync.idle_check_interval = Duration::from_secs(3600);
    daemon.reload(checks).await;
    eventually("the consumer has the new configuration", || async {
        open_store(dir.path()).checkpoint(spare).unwrap().is_some()
    })
    .await;

    reset_behind_the_next_event(&sim, s1, Some("c"), Some("d"));
    reset_behind_the_next_event(&sim, t2, None, None);
    eventually("the doors hold what the desks hold", || async {
        sim.users(t1) == sim.users(s1) && sim.users(t2) == sim.users(s2)
    })
    .await;
    assert_eq!(sim.users(t1).keys().collect::<Vec<_>>(), ["c", "d"]);
    assert_eq!(sim.users(t2).keys().collect::<Vec<_>>(), ["x", "y"]);
    daemon.stop().await;
}

/// The same reset, with the daemon killed after it took the next event
/// for the continuation and before any check: what it took is stored with
/// the checkpoint, so the catch-up after the restart still sees the reset.
#[tokio::test]
async fn a_reset_passed_off_as_the_next_event_is_seen_after_a_restart() {
    let sim = sim(2).await;
    let ids = sim.device_ids();
    let (src, dst) = (ids[0], ids[1]);
    presynced(&sim, src, dst, &["a", "b"]);
    let dir = tempfile::tempdir().unwrap();
    let g = group("g", &[src], &[dst], "prune = true");
    let mut quiet = config_with(&sim, dir.path(), &g);
    quiet.sync.tail_check_delay = Duration::from_secs(3600);
    quiet.sync.idle_check_interval = Duration::from_secs(3600);
    let daemon = Daemon::start(quiet);
    live_and_reconciled(dir.path(), &[src, dst], &[dst]).await;
    let before = open_store(dir.path()).checkpoint(src).unwrap();
    assert_eq!(before, sim.newest_event_id(src));

    reset_behind_the_next_event(&sim, src, Some("c"), Some("d"));
    eventually("realtime took the event as the next one", || async {
        open_store(dir.path()).checkpoint(src).unwrap() == sim.newest_event_id(src)
    })
    .await;
    // As a kill -9 leaves it.
    daemon.task.abort();
    let _ = daemon.task.await;

    let daemon = Daemon::start(config_with(&sim, dir.path(), &g));
    eventually("the door holds what the desk holds", || async {
        sim.users(dst) == sim.users(src)
    })
    .await;
    assert_eq!(sim.users(dst).keys().collect::<Vec<_>>(), ["c", "d"]);
    daemon.stop().await;
}
