//! Multi-master groups (issue 12) against the simulator's least convenient
//! defaults: every member accepts changes, the last writer wins per user
//! (event time, then device ID), deletes are tombstones, the daemon's own
//! writes never come back as changes. Device clocks are set apart by whole
//! seconds so that which change is later never depends on the second a test
//! runs in. Every wait is bounded; nothing is timed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Daemon, config_with, eventually};
use usersync::sim::users::{UserProfile, generate};
use usersync::sim::{ChangedOnDevice, SimOptions, Simulator};
use usersync::store::Store;

/// `USERSYNC_TEST_LOG=info` (an env filter) shows the daemon's log.
fn log() {
    if let Ok(filter) = std::env::var("USERSYNC_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

async fn sim(devices: u32) -> Simulator {
    log();
    let mut opts = SimOptions::with_devices(devices);
    opts.reconnect_delay = Duration::from_millis(20);
    common::sim_with(opts).await
}

fn group(members: &[u32], extra: &str) -> String {
    let list = members
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!("[[group]]\nname = \"desks\"\nmode = \"multi-master\"\nmembers = [{list}]\n{extra}\n")
}

/// A user record with content of its own (`revision` makes it differ).
fn record(sim: &Simulator, user: &str, revision: u32) -> Vec<u8> {
    generate(
        user,
        revision,
        sim.api().numbering(),
        UserProfile::default(),
    )
}

/// Whether every member holds `user` exactly as `want` (`None`: nowhere).
fn everywhere(sim: &Simulator, members: &[u32], user: &str, want: Option<&[u8]>) -> bool {
    members
        .iter()
        .all(|m| sim.user_bytes(*m, user).as_deref() == want)
}

async fn wait_everywhere(sim: &Simulator, members: &[u32], user: &str, want: Option<&[u8]>) {
    let what = match want {
        Some(_) => format!("every member holds the winning version of {user}"),
        None => format!("no member holds {user}"),
    };
    eventually(&what, || async { everywhere(sim, members, user, want) }).await;
}

/// Waits until the daemon has read every member's log to its end: every
/// event the daemon's own writes caused has been judged by then.
async fn quiet(sim: &Simulator, store: &Store, members: &[u32]) {
    eventually("every member's log read to its end", || async {
        members
            .iter()
            .all(|m| store.checkpoint(*m).ok().flatten() == sim.newest_event_id(*m))
    })
    .await;
}

/// The daemon's state store, once the daemon has created (and upgraded)
/// it: the test never migrates it itself (two processes must not race
/// on a migration).
async fn state(dir: &std::path::Path) -> Store {
    let path = dir.join("state");
    let mut store = None;
    eventually("the daemon's state store exists", || {
        let opened = Store::open_existing(&path).ok();
        let ok = opened.is_some();
        if ok {
            store = opened;
        }
        async move { ok }
    })
    .await;
    store.expect("opened")
}

/// Waits until the daemon knows where every member's log stands and the
/// first start's reconcile is over: changes made from now on are changes
/// (before, they are history, which the reconcile covers).
async fn ready(store: &Store, members: &[u32]) {
    eventually("every member seen and the first reconcile done", || async {
        members
            .iter()
            .all(|m| store.checkpoint(*m).ok().flatten().is_some())
            && store.reconcile_requests().unwrap().is_empty()
    })
    .await;
}

/// A user enrolled at member `at` (its own content by `revision`), once
/// every member holds it.
async fn spread(sim: &Simulator, members: &[u32], at: u32, user: &str, revision: u32) -> Vec<u8> {
    let raw = record(sim, user, revision);
    sim.put_raw_on_device(at, raw.clone()).unwrap();
    wait_everywhere(sim, members, user, Some(&raw)).await;
    raw
}

/// Starts the daemon with `device`'s stored checkpoint moved past its
/// log (keeping the anchor of the event it stood at, as a log whose IDs
/// restarted below it looks): the start judges the log reset and reads it
/// from its oldest record. Returns once that read and the reset's
/// reconcile are done and every member's log is read.
async fn restart_past_the_log(
    sim: &Simulator,
    store: &Store,
    config: usersync::config::Config,
    device: u32,
    members: &[u32],
) -> Daemon {
    let beyond = sim.newest_event_id(device).unwrap_or(0) + 100;
    store
        .with(|c| {
            let anchor = usersync::store::anchored_checkpoints(c)?
                .get(&device)
                .and_then(|(_, a)| a.clone());
            usersync::store::set_checkpoint_anchored(c, device, beyond, anchor.as_deref())
        })
        .unwrap();
    let daemon = Daemon::start(config);
    eventually(
        "the log read again and the reset's reconcile done",
        || async {
            store.checkpoint(device).ok().flatten() == sim.newest_event_id(device)
                && store.reconcile_requests().unwrap().is_empty()
        },
    )
    .await;
    quiet(sim, store, members).await;
    daemon
}

/// A daemon running the group of `members` (`extra` added to it), its
/// first start over (see [`ready`]); the directory holds its state.
async fn running(
    sim: &Simulator,
    members: &[u32],
    extra: &str,
) -> (tempfile::TempDir, Daemon, Store) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(sim, dir.path(), &group(members, extra)));
    let store = state(dir.path()).await;
    ready(&store, members).await;
    (dir, daemon, store)
}

/// The journal's registers of the group: user → (origin, deleted).
fn registers(store: &Store) -> BTreeMap<String, (u32, bool)> {
    store
        .with(|c| usersync::store::multi::all_rows(c, "desks"))
        .unwrap()
        .into_iter()
        .map(|(u, r)| (u, (r.version.stamp.device, r.version.deleted)))
        .collect()
}

/// Changes recorded so far (the journal's head): echoes never count.
fn recorded(store: &Store) -> u64 {
    store.head("desks").unwrap()
}

/// Users enrolled at one desk before the daemon first runs reach the
/// others (the first start's reconcile is the union); then an enroll, an
/// update and a delete at any member reach every other member, and the
/// daemon's writes are never taken for changes (the journal holds exactly
/// the changes made at the members).
#[tokio::test]
async fn every_member_accepts_changes_and_writes_never_echo() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let before_a = record(&sim, "alice", 0);
    let before_b = record(&sim, "bob", 0);
    sim.put_raw_on_device(a, before_a.clone()).unwrap();
    sim.put_raw_on_device(b, before_b.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(&sim, dir.path(), &group(&m, "")));
    wait_everywhere(&sim, &m, "alice", Some(&before_a)).await;
    wait_everywhere(&sim, &m, "bob", Some(&before_b)).await;
    let store = state(dir.path()).await;
    quiet(&sim, &store, &m).await;
    assert_eq!(
        recorded(&store),
        0,
        "a reconcile copies; it records no change"
    );

    spread(&sim, &m, c, "carol", 1).await;
    spread(&sim, &m, b, "alice", 7).await;
    sim.delete_on_device(a, "bob").unwrap();
    wait_everywhere(&sim, &m, "bob", None).await;

    quiet(&sim, &store, &m).await;
    assert_eq!(recorded(&store), 3, "three changes, no echo recorded");
    let regs = registers(&store);
    assert_eq!(regs["carol"], (c, false));
    assert_eq!(regs["alice"], (b, false));
    assert_eq!(regs["bob"], (a, true), "a delete is a tombstone");
    // The flag was seen: the group judges by it from now on.
    let seen = store
        .with(|conn| usersync::store::multi::echo_observed(conn, "desks"))
        .unwrap();
    assert!(!seen.is_empty());
    daemon.stop().await;
}

/// Two members change the same user at about the same time: the change
/// with the later event time wins at every member, whichever the daemon
/// hears first; the loser's own member is set back too.
#[tokio::test]
async fn concurrent_edits_the_later_wins_everywhere() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    spread(&sim, &m, a, "u", 0).await;

    // B's clock is 5 s ahead: its edit is the later one although the
    // daemon hears of it second.
    sim.set_clock_offset(b, 5);
    let at_a = record(&sim, "u", 1);
    let at_b = record(&sim, "u", 2);
    sim.put_raw_on_device(a, at_a).unwrap();
    sim.put_raw_on_device(b, at_b.clone()).unwrap();
    wait_everywhere(&sim, &m, "u", Some(&at_b)).await;

    // The other way round: B edits first, A second, A's clock 10 s ahead
    // (5 s ahead of B's last edit, which may be in this very second).
    sim.set_clock_offset(b, 0);
    sim.set_clock_offset(a, 10);
    let at_b = record(&sim, "u", 3);
    let at_a = record(&sim, "u", 4);
    sim.put_raw_on_device(b, at_b).unwrap();
    sim.put_raw_on_device(a, at_a.clone()).unwrap();
    wait_everywhere(&sim, &m, "u", Some(&at_a)).await;
    quiet(&sim, &store, &m).await;
    assert!(everywhere(&sim, &m, "u", Some(&at_a)), "stays converged");
    assert_eq!(registers(&store)["u"], (a, false));
    daemon.stop().await;
}

/// A delete at one member races an update at another: the order of their
/// event times decides, both ways. A delete that wins is a tombstone: the
/// older update arriving after it does not bring the user back.
#[tokio::test]
async fn a_delete_racing_an_update_is_decided_by_their_order() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    spread(&sim, &m, c, "u", 0).await;
    spread(&sim, &m, c, "w", 0).await;

    // The update is later (B's clock 5 s ahead): the user stays, in B's
    // version, at A too (where it had been deleted).
    sim.set_clock_offset(b, 5);
    sim.delete_on_device(a, "u").unwrap();
    let v1 = spread(&sim, &m, b, "u", 1).await;

    // The delete is later (A's clock 5 s ahead), though made first: it
    // wins, and B's update arriving after it changes nothing.
    sim.set_clock_offset(b, 0);
    sim.set_clock_offset(a, 5);
    sim.delete_on_device(a, "w").unwrap();
    let w1 = record(&sim, "w", 1);
    sim.put_raw_on_device(b, w1).unwrap();
    wait_everywhere(&sim, &m, "w", None).await;
    quiet(&sim, &store, &m).await;
    assert!(
        everywhere(&sim, &m, "w", None),
        "the older update did not resurrect it"
    );
    assert!(everywhere(&sim, &m, "u", Some(&v1)));
    let regs = registers(&store);
    assert_eq!(regs["w"], (a, true));
    assert_eq!(regs["u"], (b, false));
    daemon.stop().await;
}

/// A member is offline while two others change users; it changes users of
/// its own meanwhile (one newer, one older than another member's change).
/// When it returns it gets what it missed, its newer change reaches the
/// others, and its older one is set back to the winner.
#[tokio::test]
async fn an_offline_member_catches_up_on_its_return() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    spread(&sim, &m, a, "shared", 0).await;
    spread(&sim, &m, a, "gone", 0).await;

    sim.set_offline(c).unwrap();
    // C's clock is 30 s behind while it is away: its edit of "shared" is
    // older than B's.
    sim.set_clock_offset(c, -30);
    let at_c = record(&sim, "shared", 5);
    sim.put_raw_on_device(c, at_c).unwrap();
    let own = record(&sim, "from-c", 0);
    sim.set_clock_offset(c, 30);
    sim.put_raw_on_device(c, own.clone()).unwrap();
    let x = record(&sim, "x", 0);
    let shared_b = record(&sim, "shared", 6);
    sim.put_raw_on_device(a, x.clone()).unwrap();
    sim.put_raw_on_device(b, shared_b.clone()).unwrap();
    sim.delete_on_device(b, "gone").unwrap();
    let online = [a, b];
    wait_everywhere(&sim, &online, "x", Some(&x)).await;
    wait_everywhere(&sim, &online, "shared", Some(&shared_b)).await;
    wait_everywhere(&sim, &online, "gone", None).await;

    sim.set_clock_offset(c, 0);
    sim.set_online(c).unwrap();
    wait_everywhere(&sim, &m, "x", Some(&x)).await;
    wait_everywhere(&sim, &m, "gone", None).await;
    wait_everywhere(&sim, &m, "from-c", Some(&own)).await;
    wait_everywhere(&sim, &m, "shared", Some(&shared_b)).await;
    quiet(&sim, &store, &m).await;
    assert!(everywhere(&sim, &m, "shared", Some(&shared_b)));
    assert_eq!(registers(&store)["shared"], (b, false));
    daemon.stop().await;
}

/// The daemon stops in the middle of a conflict (changes made, not yet
/// all applied) and more changes come while it is down: started again, it
/// reads every member's log from its checkpoint and ends at the model.
#[tokio::test]
async fn a_restart_in_the_middle_of_a_conflict_ends_at_the_last_writer() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&sim, dir.path(), &group(&m, ""));
    let daemon = Daemon::start(config.clone());
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    spread(&sim, &m, a, "u", 0).await;
    spread(&sim, &m, a, "w", 0).await;

    // Conflicting edits, and the daemon stops at once.
    sim.set_clock_offset(b, 5);
    sim.put_raw_on_device(a, record(&sim, "u", 1)).unwrap();
    let winner = record(&sim, "u", 2);
    sim.put_raw_on_device(b, winner.clone()).unwrap();
    daemon.stop().await;
    // While it is down: an older edit at C (clock behind) and a delete.
    sim.set_clock_offset(c, -60);
    sim.put_raw_on_device(c, record(&sim, "u", 3)).unwrap();
    sim.set_clock_offset(c, 0);
    sim.delete_on_device(c, "w").unwrap();

    let daemon = Daemon::start(config);
    wait_everywhere(&sim, &m, "u", Some(&winner)).await;
    wait_everywhere(&sim, &m, "w", None).await;
    quiet(&sim, &store, &m).await;
    assert!(everywhere(&sim, &m, "u", Some(&winner)));
    let regs = registers(&store);
    assert_eq!(regs["u"], (b, false));
    assert_eq!(regs["w"], (c, true));
    daemon.stop().await;
}

/// A gateway that never sets `changedOnDevice`: with echo detection left
/// to the daemon it recognises its own writes (`own-writes`), so changes
/// flow and nothing echoes; the same with `own-writes` configured.
#[tokio::test]
async fn without_the_flag_own_writes_keep_echoes_out() {
    for extra in ["", "echo_detection = \"own-writes\""] {
        let mut opts = SimOptions::with_devices(3);
        opts.reconnect_delay = Duration::from_millis(20);
        opts.model.policies.changed_on_device = ChangedOnDevice::Omitted;
        let sim = common::sim_with(opts).await;
        let m = sim.device_ids();
        let (a, b, c) = (m[0], m[1], m[2]);
        let (_dir, daemon, store) = running(&sim, &m, extra).await;
        spread(&sim, &m, a, "u", 0).await;
        spread(&sim, &m, b, "u", 1).await;
        sim.delete_on_device(c, "u").unwrap();
        wait_everywhere(&sim, &m, "u", None).await;
        spread(&sim, &m, c, "v", 0).await;
        quiet(&sim, &store, &m).await;
        assert_eq!(
            recorded(&store),
            4,
            "{extra:?}: four changes, no echo recorded"
        );
        assert!(sim.log(b).iter().all(|e| !e.changed_on_device));
        let seen = store
            .with(|conn| usersync::store::multi::echo_observed(conn, "desks"))
            .unwrap();
        assert!(seen.is_empty(), "{extra:?}");
        let regs = registers(&store);
        assert_eq!(regs["u"], (c, true));
        assert_eq!(regs["v"], (c, false));
        daemon.stop().await;
    }
}

/// With `changed-on-device` configured, writes of other SDK clients
/// (events without the flag that the daemon did not cause) are not
/// changes; the members' own changes flow.
#[tokio::test]
async fn changed_on_device_mode_takes_only_flagged_events() {
    let sim = sim(2).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group(&m, "echo_detection = \"changed-on-device\""),
    ));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    spread(&sim, &m, a, "u", 0).await;
    // Another client writes through the gateway at B.
    let client = common::client(&sim);
    client
        .user_enroll(b, vec![record(&sim, "sdk", 0)], true)
        .await
        .unwrap();
    spread(&sim, &m, b, "v", 0).await;
    quiet(&sim, &store, &m).await;
    assert!(
        !sim.holds(a, "sdk"),
        "an SDK write is not a change in this mode"
    );
    assert_eq!(recorded(&store), 2);
    daemon.stop().await;
}

/// A member whose clock is two minutes ahead: the daemon measures it from
/// its realtime events and records it (a warning in the log), and its
/// change is ordered no later than the daemon's time plus the bound.
#[tokio::test]
async fn a_member_clock_far_ahead_is_warned_about_and_bounded() {
    let sim = sim(2).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &group(&m, "max_clock_skew_secs = 10"),
    ));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    spread(&sim, &m, a, "warm", 0).await;

    sim.set_clock_offset(b, 120);
    spread(&sim, &m, b, "u", 0).await;
    eventually("B's skew recorded", || async {
        store
            .with(|c| usersync::store::multi::clock_skews(c))
            .unwrap()
            .iter()
            .any(|s| s.device == b && (100..=140).contains(&s.skew_secs))
    })
    .await;
    let row = store
        .with(|c| usersync::store::multi::row(c, "desks", "u"))
        .unwrap()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        u64::from(row.version.stamp.time) <= now + 10,
        "ordered at most 10 s ahead: {} vs now {now}",
        row.version.stamp.time
    );
    let a_skew = store
        .with(|c| usersync::store::multi::clock_skews(c))
        .unwrap()
        .into_iter()
        .find(|s| s.device == a);
    assert!(a_skew.is_none_or(|s| s.skew_secs.abs() <= 5), "{a_skew:?}");
    daemon.stop().await;
}

/// The dangerous race: a member's change the daemon has not heard of yet
/// (its realtime events are all dropped) must not be overwritten by an
/// older change from another member. The member's log is read before it
/// is written, so its change is ordered first and wins.
#[tokio::test]
async fn a_change_not_yet_heard_of_is_never_overwritten() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    spread(&sim, &m, a, "u", 0).await;

    sim.drop_realtime(Some(b), 1.0);
    sim.set_clock_offset(b, 5);
    let at_b = record(&sim, "u", 1);
    sim.put_raw_on_device(b, at_b.clone()).unwrap();
    sim.put_raw_on_device(a, record(&sim, "u", 2)).unwrap();
    wait_everywhere(&sim, &m, "u", Some(&at_b)).await;
    quiet(&sim, &store, &m).await;
    assert!(everywhere(&sim, &m, "u", Some(&at_b)));
    assert_eq!(registers(&store)["u"], (b, false));
    daemon.stop().await;
}

/// A first start over members that already hold users: one version of a
/// user is copied to the members that lack it (the union); different
/// versions with no history are a conflict, reported and left alone;
/// changing the user at a member settles it.
#[tokio::test]
async fn a_reconcile_without_history_reports_conflicts_and_takes_the_union() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let only_a = record(&sim, "only-a", 0);
    let same = record(&sim, "same", 0);
    sim.put_raw_on_device(a, only_a.clone()).unwrap();
    sim.put_raw_on_device(a, same.clone()).unwrap();
    sim.put_raw_on_device(c, same.clone()).unwrap();
    let x_a = record(&sim, "x", 1);
    let x_b = record(&sim, "x", 2);
    sim.put_raw_on_device(a, x_a.clone()).unwrap();
    sim.put_raw_on_device(b, x_b.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(&sim, dir.path(), &group(&m, "")));
    let store = state(dir.path()).await;
    wait_everywhere(&sim, &m, "only-a", Some(&only_a)).await;
    wait_everywhere(&sim, &m, "same", Some(&same)).await;
    ready(&store, &m).await;
    let conflicts = store
        .with(|conn| usersync::store::multi::conflicts(conn))
        .unwrap();
    assert_eq!(
        conflicts
            .iter()
            .map(|c| c.user_id.as_str())
            .collect::<Vec<_>>(),
        vec!["x"]
    );
    assert!(store.diverged().unwrap().contains_key("desks"));
    // Left alone: each holder keeps its version, C gets none.
    assert_eq!(sim.user_bytes(a, "x"), Some(x_a));
    assert_eq!(sim.user_bytes(b, "x"), Some(x_b));
    assert!(!sim.holds(c, "x"));
    // A change settles it.
    spread(&sim, &m, c, "x", 3).await;
    eventually("the conflict is settled", || async {
        store
            .with(|conn| usersync::store::multi::conflicts(conn))
            .unwrap()
            .is_empty()
    })
    .await;
    daemon.stop().await;
}

/// With `prune = true`, a difference no history decides is settled by the
/// order of `members`: the first member that holds the user.
#[tokio::test]
async fn with_prune_member_order_settles_what_no_history_decides() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let x_b = record(&sim, "x", 1);
    let x_c = record(&sim, "x", 2);
    sim.put_raw_on_device(b, x_b).unwrap();
    sim.put_raw_on_device(c, x_c.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // C is listed first: its version wins.
    let daemon = Daemon::start(config_with(
        &sim,
        dir.path(),
        &format!(
            "[[group]]\nname = \"desks\"\nmode = \"multi-master\"\nmembers = [{c}, {a}, {b}]\nprune = true\n"
        ),
    ));
    wait_everywhere(&sim, &m, "x", Some(&x_c)).await;
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    assert!(
        store
            .with(|conn| usersync::store::multi::conflicts(conn))
            .unwrap()
            .is_empty()
    );
    daemon.stop().await;
}

/// A member wiped by a factory reset (users gone, log restarted) is
/// reconciled: it gets every user back, also those whose winning change
/// was made at it (read from another member that holds the version).
#[tokio::test]
async fn a_reset_member_gets_its_users_back() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    let mine = spread(&sim, &m, a, "made-at-a", 0).await;
    let theirs = spread(&sim, &m, b, "made-at-b", 0).await;

    sim.factory_reset(a).unwrap();
    wait_everywhere(&sim, &m, "made-at-a", Some(&mine)).await;
    wait_everywhere(&sim, &m, "made-at-b", Some(&theirs)).await;
    quiet(&sim, &store, &m).await;
    assert_eq!(
        registers(&store)["made-at-a"],
        (a, false),
        "the order is kept"
    );
    daemon.stop().await;
}

/// A one-way group made multi-master (same name, restart): its one-way
/// state is dropped, the members are reconciled, and a change at the former
/// target now reaches the former source.
#[tokio::test]
async fn a_one_way_group_can_become_multi_master() {
    let sim = sim(2).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let dir = tempfile::tempdir().unwrap();
    let one_way = format!("[[group]]\nname = \"desks\"\nsources = [{a}]\ntargets = [{b}]\n");
    let daemon = Daemon::start(config_with(&sim, dir.path(), &one_way));
    spread(&sim, &m, a, "u", 0).await;
    daemon.stop().await;

    let daemon = Daemon::start(config_with(&sim, dir.path(), &group(&m, "")));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    spread(&sim, &m, b, "v", 0).await;
    sim.delete_on_device(b, "u").unwrap();
    wait_everywhere(&sim, &m, "u", None).await;
    quiet(&sim, &store, &m).await;
    let regs = registers(&store);
    assert_eq!(regs.len(), 2, "{regs:?}");
    assert_eq!((regs["v"], regs["u"]), ((b, false), (b, true)));
    daemon.stop().await;
}

/// A live delete at a member whose clock is a year behind, of a user the
/// group has seen no change of (held everywhere since before the group
/// ran): it is a change and reaches every member (it was taken for history
/// by its time before).
#[tokio::test]
async fn a_live_delete_at_a_member_whose_clock_is_behind_spreads() {
    let sim = sim(2).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let u = record(&sim, "u", 0);
    sim.put_raw_on_device(a, u.clone()).unwrap();
    sim.put_raw_on_device(b, u.clone()).unwrap();
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    quiet(&sim, &store, &m).await;
    sim.set_clock_offset(b, -365 * 86_400);
    sim.delete_on_device(b, "u").unwrap();
    wait_everywhere(&sim, &m, "u", None).await;
    quiet(&sim, &store, &m).await;
    assert_eq!(registers(&store)["u"], (b, true));
    daemon.stop().await;
}

/// A write a member refused (quarantined there) logged nothing, so its
/// echo never comes: the expectation ends with the next read of the
/// member's log, and a change an administrator then makes to that user at
/// that member is a change, not taken for the daemon's echo.
#[tokio::test]
async fn a_refused_write_leaves_no_expectation_to_swallow_a_later_change() {
    let mut opts = SimOptions::with_devices(3);
    opts.reconnect_delay = Duration::from_millis(20);
    opts.model.policies.changed_on_device = ChangedOnDevice::Omitted;
    let sim = common::sim_with(opts).await;
    let m = sim.device_ids();
    let (a, c) = (m[0], m[2]);
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(&sim, dir.path(), &group(&m, ""))
        .replace("[sync]\n", "[sync]\nquarantine_after = 1\n");
    let config = usersync::config::parse(&dir.path().join("usersync.toml"), &text).unwrap();
    let daemon = Daemon::start(config);
    let store = state(dir.path()).await;
    ready(&store, &m).await;

    sim.reject(c, "u");
    let u = record(&sim, "u", 0);
    sim.put_raw_on_device(a, u.clone()).unwrap();
    wait_everywhere(&sim, &m[..2], "u", Some(&u)).await;
    eventually("the refused user quarantined at the member", || async {
        store
            .quarantine()
            .unwrap()
            .iter()
            .any(|q| q.device == c && q.user_id == "u")
    })
    .await;
    eventually("no own write expected any more", || async {
        store
            .with(|conn| usersync::store::multi::own_writes_expected(conn, "desks"))
            .unwrap()
            == 0
    })
    .await;

    // The administrator enrolls the user at the member itself.
    sim.accept(c, "u");
    spread(&sim, &m, c, "u", 1).await;
    quiet(&sim, &store, &m).await;
    assert_eq!(registers(&store)["u"], (c, false));
    daemon.stop().await;
}

/// A member wiped while another member is offline is refilled from the
/// reachable members at once (copies only), not when the offline one is
/// back; the full reconcile follows its return.
#[tokio::test]
async fn a_reset_member_is_refilled_while_another_is_offline() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    let mine = spread(&sim, &m, a, "made-at-a", 0).await;
    let theirs = spread(&sim, &m, b, "made-at-b", 0).await;
    quiet(&sim, &store, &m).await;

    sim.set_offline(c).unwrap();
    eventually("the daemon sees the member offline", || async {
        store
            .device_statuses()
            .unwrap()
            .iter()
            .any(|d| d.device == c && d.state != "live")
    })
    .await;
    sim.factory_reset(b).unwrap();
    let reachable = [a, b];
    wait_everywhere(&sim, &reachable, "made-at-a", Some(&mine)).await;
    wait_everywhere(&sim, &reachable, "made-at-b", Some(&theirs)).await;
    assert!(
        !store.reconcile_requests().unwrap().is_empty(),
        "the full reconcile waits for the offline member"
    );

    sim.set_online(c).unwrap();
    eventually("the full reconcile done", || async {
        store.reconcile_requests().unwrap().is_empty()
    })
    .await;
    assert!(everywhere(&sim, &m, "made-at-a", Some(&mine)));
    assert!(everywhere(&sim, &m, "made-at-b", Some(&theirs)));
    assert_eq!(
        registers(&store)["made-at-b"],
        (b, false),
        "the order is kept"
    );
    daemon.stop().await;
}

/// A member's log read again from its oldest record (a reset judged where
/// there was none: the checkpoint lies beyond the log, as after a state
/// directory restored from elsewhere) replays old changes: they are
/// history, never news. A user enrolled and deleted at the member before
/// the group first ran, and held by another member since, stays; a user
/// deleted there and enrolled later elsewhere stays.
#[tokio::test]
async fn a_log_read_again_after_a_reset_replays_no_old_change() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    // Before the group first runs (A's clock behind, so these are older
    // than the daemon's start whatever the second).
    sim.set_clock_offset(a, -10);
    sim.put_raw_on_device(a, record(&sim, "w", 0)).unwrap();
    sim.delete_on_device(a, "w").unwrap();
    sim.set_clock_offset(a, 0);
    let w = record(&sim, "w", 1);
    sim.put_raw_on_device(b, w.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&sim, dir.path(), &group(&m, ""));
    let daemon = Daemon::start(config.clone());
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    wait_everywhere(&sim, &m, "w", Some(&w)).await;
    // After: deleted at A, enrolled later at B.
    sim.put_raw_on_device(a, record(&sim, "x", 0)).unwrap();
    sim.delete_on_device(a, "x").unwrap();
    wait_everywhere(&sim, &m, "x", None).await;
    sim.set_clock_offset(b, 5);
    let x = spread(&sim, &m, b, "x", 1).await;
    quiet(&sim, &store, &m).await;
    let head = recorded(&store);
    daemon.stop().await;

    // A's checkpoint now lies beyond its log: the next start judges the
    // log reset and reads it from its oldest record.
    let daemon = restart_past_the_log(&sim, &store, config, a, &m).await;
    assert!(
        everywhere(&sim, &m, "w", Some(&w)),
        "w deleted by a replayed old delete"
    );
    assert!(
        everywhere(&sim, &m, "x", Some(&x)),
        "x deleted by a replayed old delete"
    );
    assert_eq!(
        recorded(&store),
        head,
        "nothing replayed was recorded as a change"
    );
    assert_eq!(registers(&store)["x"], (b, false));
    daemon.stop().await;
}

/// The configuration of the group of `members`, with `sync` settings.
fn config_sync(
    sim: &Simulator,
    dir: &std::path::Path,
    members: &[u32],
    sync: &str,
) -> usersync::config::Config {
    let text = common::config_text(sim, dir, &group(members, ""))
        .replace("[sync]\n", &format!("[sync]\n{sync}\n"));
    usersync::config::parse(&dir.join("usersync.toml"), &text).unwrap()
}

async fn seen_offline(store: &Store, d: u32) {
    eventually("the daemon sees the member offline", || async {
        store
            .device_statuses()
            .unwrap()
            .iter()
            .any(|s| s.device == d && s.state != "live")
    })
    .await;
}

/// A member that was away refuses the first of the changes it missed
/// (B's, older in the journal) while the second (A's) goes through: the
/// refused one is retried, not passed over (the batch is grouped by the
/// member it is read from, so one by one must go in journal order).
#[tokio::test]
async fn a_refused_change_is_retried_not_passed_over() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_sync(&sim, dir.path(), &m, "quarantine_after = 20"));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    sim.set_offline(c).unwrap();
    seen_offline(&store, c).await;
    let y = spread(&sim, &[a, b], b, "y", 0).await;
    let x = spread(&sim, &[a, b], a, "x", 0).await;
    sim.reject(c, "y");
    sim.set_online(c).unwrap();
    eventually("C refused y once, alone", || async {
        sim.rpc_log()
            .iter()
            .any(|r| r.method == "Enroll" && r.device_ids == [c] && r.user_ids == ["y"])
    })
    .await;
    sim.accept(c, "y");
    wait_everywhere(&sim, &m, "y", Some(&y)).await;
    wait_everywhere(&sim, &m, "x", Some(&x)).await;
    assert!(store.quarantine().unwrap().is_empty());
    daemon.stop().await;
}

/// The member a winning version is read from loses it (a delete-all),
/// and another holds an older version (it refused the winner): the
/// reconcile reads the winner only from a member known to have it, never
/// the older one over it.
#[tokio::test]
async fn a_lost_winner_is_read_only_where_it_is_known_to_be() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_sync(&sim, dir.path(), &m, "quarantine_after = 1"));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    let v0 = spread(&sim, &m, a, "u", 0).await;
    sim.reject(b, "u");
    let v5 = record(&sim, "u", 5);
    sim.put_raw_on_device(a, v5.clone()).unwrap();
    wait_everywhere(&sim, &[a, c], "u", Some(&v5)).await;
    eventually("u quarantined at B", || async {
        store
            .quarantine()
            .unwrap()
            .iter()
            .any(|q| q.device == b && q.user_id == "u")
    })
    .await;
    assert!(sim.holds_exactly(b, "u", &v0));
    sim.delete_all_on_device(a).unwrap();
    eventually("A holds the winner again", || async {
        sim.holds_exactly(a, "u", &v5)
    })
    .await;
    eventually("the reconcile done", || async {
        store.reconcile_requests().unwrap().is_empty()
    })
    .await;
    quiet(&sim, &store, &m).await;
    assert!(everywhere(&sim, &[a, c], "u", Some(&v5)));
    daemon.stop().await;
}

/// A member added to the group holds a user whose ID was deleted in the
/// group before (IDs are reused, badge numbers): not deleted on the
/// tombstone, whose person may not be this one, but reported as a
/// conflict; a member that missed the delete still gets it.
#[tokio::test]
async fn a_tombstone_does_not_delete_at_a_member_that_joined_since() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    // C holds the ID from before it joins (what it held is not the
    // group's history).
    let held = record(&sim, "u", 9);
    sim.put_raw_on_device(c, held.clone()).unwrap();
    let (dir, daemon, store) = running(&sim, &[a, b], "").await;
    spread(&sim, &[a, b], a, "u", 0).await;
    sim.delete_on_device(a, "u").unwrap();
    wait_everywhere(&sim, &[a, b], "u", None).await;
    quiet(&sim, &store, &[a, b]).await;
    daemon.stop().await;

    let daemon = Daemon::start(config_with(&sim, dir.path(), &group(&m, "")));
    eventually("the user reported as a conflict", || async {
        store
            .with(|conn| usersync::store::multi::conflicts(conn))
            .unwrap()
            .iter()
            .any(|k| k.user_id == "u")
    })
    .await;
    assert!(sim.holds_exactly(c, "u", &held), "deleted on a tombstone");
    assert!(!sim.holds(a, "u") && !sim.holds(b, "u"));
    daemon.stop().await;
}

/// The daemon is killed after it noted a write to B and before the write
/// reached B; a minute later, while it is down, an administrator updates
/// that user at B. Started again, it takes B's update for the change it is
/// (the write in flight returned by the call timeout, long before), not
/// for the echo of its own write.
#[tokio::test]
async fn a_write_cut_short_by_a_crash_does_not_swallow_a_later_change() {
    let mut opts = SimOptions::with_devices(3);
    opts.reconnect_delay = Duration::from_millis(20);
    opts.model.policies.changed_on_device = ChangedOnDevice::Omitted;
    let sim = common::sim_with(opts).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&sim, dir.path(), &group(&m, ""));
    let daemon = Daemon::start(config.clone());
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    spread(&sim, &m, a, "u", 0).await;
    quiet(&sim, &store, &m).await;
    daemon.stop().await;
    // What a daemon killed between noting the write and making it leaves.
    store
        .with(|c| {
            let tx = c.transaction()?;
            usersync::store::multi::expect_own_writes(
                &tx,
                "desks",
                &[b],
                &["u".to_owned()],
                usersync::store::multi::MemberOp::Upsert,
            )?;
            // It was sent a minute before the update below.
            tx.execute("UPDATE own_write SET sent_at_ms = sent_at_ms - 60000", [])?;
            tx.commit()?;
            Ok(())
        })
        .unwrap();
    // The update at B.
    let v2 = record(&sim, "u", 2);
    sim.put_raw_on_device(b, v2.clone()).unwrap();
    let daemon = Daemon::start(config);
    wait_everywhere(&sim, &m, "u", Some(&v2)).await;
    quiet(&sim, &store, &m).await;
    assert_eq!(registers(&store)["u"], (b, false));
    daemon.stop().await;
}

/// While the daemon is down a member's log is cleared (its IDs restart,
/// WIRE.md §5.5) and an administrator deletes a user there that never
/// changed in the group. Read from its start, the log holds the clear
/// marker, then the delete: made after the log restarted, it is a change,
/// not history, and the user is deleted everywhere.
#[tokio::test]
async fn a_delete_made_after_a_log_restart_is_a_change() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let a = m[0];
    let u = record(&sim, "u", 0);
    for d in &m {
        sim.put_raw_on_device(*d, u.clone()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&sim, dir.path(), &group(&m, ""));
    let daemon = Daemon::start(config.clone());
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    quiet(&sim, &store, &m).await;
    daemon.stop().await;
    sim.clear_log(a).unwrap();
    sim.delete_on_device(a, "u").unwrap();
    // The restarted IDs lie below the stored checkpoint.
    let daemon = restart_past_the_log(&sim, &store, config, a, &m).await;
    wait_everywhere(&sim, &m, "u", None).await;
    assert_eq!(registers(&store)["u"], (a, true));
    daemon.stop().await;
}

/// Many queued rows whose member is away (C) sort first in B's pending
/// lane after B's reset: the rows behind them (A's users) still go to B
/// at once.
#[tokio::test]
async fn rows_waiting_for_an_absent_member_do_not_hold_back_the_others() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_sync(&sim, dir.path(), &m, "batch_users = 1"));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    for i in 0..10 {
        spread(&sim, &m, c, &format!("c{i}"), 0).await;
    }
    let z = spread(&sim, &m, a, "z", 0).await;
    quiet(&sim, &store, &m).await;
    sim.set_offline(c).unwrap();
    seen_offline(&store, c).await;
    sim.factory_reset(b).unwrap();
    eventually("B refilled with A's user while C is away", || async {
        sim.holds_exactly(b, "z", &z)
    })
    .await;
    sim.set_online(c).unwrap();
    for i in 0..10 {
        let u = format!("c{i}");
        eventually("C's users back at B", || async { sim.holds(b, &u) }).await;
    }
    daemon.stop().await;
}

/// A gateway that answers a delete of a missing user (and User.Get of
/// one) with INTERNAL: a delete made at a member still reaches every
/// member (its own included, which no longer holds the user), and changes
/// after it still flow (WIRE.md §5.3).
#[tokio::test]
async fn a_gateway_that_fails_missing_users_with_internal_still_spreads_deletes() {
    let mut opts = SimOptions::with_devices(3);
    opts.reconnect_delay = Duration::from_millis(20);
    opts.model.policies.missing_user = usersync::sim::MissingUser::Internal;
    let sim = common::sim_with(opts).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    let (_dir, daemon, store) = running(&sim, &m, "").await;
    spread(&sim, &m, a, "u", 0).await;
    sim.delete_on_device(a, "u").unwrap();
    wait_everywhere(&sim, &m, "u", None).await;
    spread(&sim, &m, b, "v", 0).await;
    spread(&sim, &m, a, "w", 0).await;
    quiet(&sim, &store, &m).await;
    assert_eq!(registers(&store)["u"], (a, true));
    daemon.stop().await;
}

/// A member leaves the group (and goes away); versions that were read at
/// it are read at a member known to hold them from then on: a member that
/// loses its users gets them back although their origin is gone.
#[tokio::test]
async fn versions_of_a_member_that_left_are_read_elsewhere() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    let (dir, daemon, store) = running(&sim, &m, "").await;
    let u = spread(&sim, &m, c, "u", 0).await;
    quiet(&sim, &store, &m).await;
    daemon.stop().await;

    let daemon = Daemon::start(config_with(&sim, dir.path(), &group(&[a, b], "")));
    eventually("the members reconciled after one left", || async {
        store.reconcile_requests().unwrap().is_empty()
            && store
                .with(|conn| usersync::store::multi::started_at(conn, "desks"))
                .unwrap()
                .is_some()
    })
    .await;
    sim.set_offline(c).unwrap();
    sim.delete_all_on_device(b).unwrap();
    eventually("B holds u again, read at A", || async {
        sim.holds_exactly(b, "u", &u)
    })
    .await;
    daemon.stop().await;
}

/// A member's log that begins with a reset marker from long ago (it was
/// cleared when commissioned) is read again after a reset judged wrongly:
/// the old marker is not a reset now, so the old enroll and delete after
/// it stay history, and the user another member holds is not deleted.
#[tokio::test]
async fn an_old_reset_marker_read_again_makes_no_history_news() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b) = (m[0], m[1]);
    sim.set_clock_offset(b, -10);
    sim.clear_log(b).unwrap();
    sim.put_raw_on_device(b, record(&sim, "u", 0)).unwrap();
    sim.delete_on_device(b, "u").unwrap();
    sim.set_clock_offset(b, 0);
    let u = record(&sim, "u", 1);
    sim.put_raw_on_device(a, u.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&sim, dir.path(), &group(&m, ""));
    let daemon = Daemon::start(config.clone());
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    wait_everywhere(&sim, &m, "u", Some(&u)).await;
    quiet(&sim, &store, &m).await;
    let head = recorded(&store);
    daemon.stop().await;

    let daemon = restart_past_the_log(&sim, &store, config, b, &m).await;
    assert!(
        everywhere(&sim, &m, "u", Some(&u)),
        "u deleted by old history"
    );
    assert_eq!(recorded(&store), head, "nothing replayed was recorded");
    daemon.stop().await;
}

/// Waits until the daemon has read `members`' logs to their end and
/// applied the group's journal and queued rows to them.
async fn settled(sim: &Simulator, store: &Store, members: &[u32]) {
    eventually("the members' changes applied", || async {
        members
            .iter()
            // An empty log: checkpoint 0.
            .all(|m| {
                store.checkpoint(*m).ok().flatten().unwrap_or(0)
                    == sim.newest_event_id(*m).unwrap_or(0)
            })
            && store
                .with(|c| {
                    let head = usersync::store::head(c, "desks")?;
                    let cursors = usersync::store::cursors(c, "desks")?;
                    // Rows queued for a member that wait for one away are
                    // not under way.
                    let mut stmt =
                        c.prepare("SELECT device_id, source FROM pending WHERE grp = 'desks'")?;
                    let queued: Vec<(u32, u32)> = stmt
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    Ok(members
                        .iter()
                        .all(|m| cursors.get(m).is_some_and(|s| *s >= head))
                        && queued
                            .iter()
                            .all(|(d, src)| !members.contains(d) || !members.contains(src)))
                })
                .unwrap_or(false)
    })
    .await;
}

/// A small deterministic generator (xorshift), so a failing schedule can
/// be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random sequences of enrolls, updates and deletes at the members, with
/// members going offline (changes made there meanwhile) and the daemon
/// stopped (changes made meanwhile) and started again, end where the
/// model says: per user, the change with
/// the latest event time wins everywhere (each step's member clock is set
/// 2 s later than the previous step's, so the order of the steps is the
/// order of their times). `USERSYNC_MM_SCHEDULES` (default 3) schedules
/// from `USERSYNC_MM_SEED` (default 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_end_at_the_last_writer_per_user() {
    let schedules: u64 = std::env::var("USERSYNC_MM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let first: u64 = std::env::var("USERSYNC_MM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for seed in first..first + schedules {
        random_schedule(seed).await;
    }
}

async fn random_schedule(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let sim = sim(3).await;
    let m = sim.device_ids();
    let dir = tempfile::tempdir().unwrap();
    // A wide bound: the steps' clocks run up to a minute or two ahead.
    let config = config_with(&sim, dir.path(), &group(&m, "max_clock_skew_secs = 3600"));
    let mut daemon = Some(Daemon::start(config.clone()));
    let store = state(dir.path()).await;
    ready(&store, &m).await;
    let users = ["u0", "u1", "u2", "u3", "u4"];
    // The model: per user, the last change (None: deleted).
    let mut model: BTreeMap<&str, Option<Vec<u8>>> = BTreeMap::new();
    let mut offline: Option<u32> = None;
    let mut log = Vec::new();
    for step in 1..=24u32 {
        let at = m[rng.below(3) as usize];
        let user = users[rng.below(users.len() as u64) as usize];
        sim.set_clock_offset(at, i64::from(step) * 2);
        match rng.below(10) {
            0..=5 => {
                let raw = record(&sim, user, step);
                sim.put_raw_on_device(at, raw.clone()).unwrap();
                model.insert(user, Some(raw));
                log.push(format!("{step}: {user} enrolled at {at}"));
            }
            6..=7 => {
                if sim.delete_on_device(at, user).is_ok() {
                    model.insert(user, None);
                    log.push(format!("{step}: {user} deleted at {at}"));
                }
            }
            8 => match offline.take() {
                Some(d) => {
                    sim.set_online(d).unwrap();
                    log.push(format!("{step}: {d} online"));
                }
                None => {
                    sim.set_offline(at).unwrap();
                    offline = Some(at);
                    log.push(format!("{step}: {at} offline"));
                }
            },
            _ => match daemon.take() {
                Some(d) => {
                    d.stop().await;
                    log.push(format!("{step}: daemon stopped"));
                }
                None => {
                    daemon = Some(Daemon::start(config.clone()));
                    log.push(format!("{step}: daemon started"));
                }
            },
        }
        // With the daemon up, a change is made only once the daemon has
        // applied the ones before at the members online: a change made at
        // a member in the moment the daemon writes that user there is
        // overwritten (the window the README names; no gateway call can
        // write only if unchanged). Changes made while the daemon is down
        // or at a member that is away pile up.
        if daemon.is_some() {
            let now_online: Vec<u32> = m.iter().copied().filter(|d| Some(*d) != offline).collect();
            settled(&sim, &store, &now_online).await;
        }
    }
    if let Some(d) = offline.take() {
        sim.set_online(d).unwrap();
    }
    let daemon = match daemon {
        Some(d) => d,
        None => Daemon::start(config.clone()),
    };
    for (user, want) in &model {
        let what = format!(
            "seed {seed}: {user} as the model says; steps:\n{}",
            log.join("\n")
        );
        eventually(&what, || async {
            everywhere(&sim, &m, user, want.as_deref())
        })
        .await;
    }
    quiet(&sim, &store, &m).await;
    for (user, want) in &model {
        assert!(
            everywhere(&sim, &m, user, want.as_deref()),
            "seed {seed}: {user} moved after settling; steps:\n{}",
            log.join("\n")
        );
    }
    daemon.stop().await;
}
