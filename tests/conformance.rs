//! The daemon against every answer a conforming gateway may give where
//! WIRE.md leaves the question open (§5): stream headers lazy or eager
//! (§5.14), GetLog clamped or OUT_OF_RANGE before the oldest and empty or
//! OUT_OF_RANGE past the newest (§5.4), unknown users omitted or NOT_FOUND
//! (§5.3), devices known before AddAsyncConnection or not (B14), plus
//! low-byte event codes full or split (§5.9).
//!
//! Each scenario runs against a covering set of those switches: the
//! least convenient answers (the simulator's defaults), the most
//! convenient ones, and rows that pair every answer of each switch with
//! both answers of every other (pairwise). `USERSYNC_CONFORMANCE=full`
//! runs every combination instead. Every wait is bounded.

mod common;

use std::time::Duration;

use common::{Daemon, config, config_with, eventually, open_store, within};
use usersync::sim::{
    LowByteCodes, MissingUser, PastNewest, Policies, SimOptions, Simulator, StaleStart,
    StreamHeaders,
};
use usersync::wire::Api;

/// One row of the matrix.
#[derive(Debug, Clone, Copy)]
struct Row {
    headers: StreamHeaders,
    stale: StaleStart,
    past: PastNewest,
    missing: MissingUser,
    preconnect: bool,
    low_byte: LowByteCodes,
}

impl Row {
    fn from_bits(b: [bool; 6]) -> Row {
        Row {
            headers: if b[0] {
                StreamHeaders::Eager
            } else {
                StreamHeaders::Lazy
            },
            stale: if b[1] {
                StaleStart::Clamp
            } else {
                StaleStart::OutOfRange
            },
            past: if b[2] {
                PastNewest::Empty
            } else {
                PastNewest::OutOfRange
            },
            missing: if b[3] {
                MissingUser::Lenient
            } else {
                MissingUser::NotFound
            },
            preconnect: b[4],
            low_byte: if b[5] {
                LowByteCodes::Split
            } else {
                LowByteCodes::Full
            },
        }
    }
}

/// Pairwise cover of six two-valued switches (every pair of columns shows
/// all four combinations), with the all-inconvenient row first.
const PAIRWISE: [[u8; 6]; 6] = [
    [0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [0, 0, 1, 1, 1, 0],
    [1, 1, 0, 0, 1, 0],
    [0, 1, 0, 1, 0, 1],
    [1, 0, 1, 0, 0, 1],
];

fn rows() -> Vec<Row> {
    if std::env::var("USERSYNC_CONFORMANCE").as_deref() == Ok("full") {
        return (0..64u8)
            .map(|n| Row::from_bits(std::array::from_fn(|i| n >> i & 1 == 1)))
            .collect();
    }
    PAIRWISE
        .iter()
        .map(|r| Row::from_bits(r.map(|b| b == 1)))
        .collect()
}

fn options(row: Row, devices: u32) -> SimOptions {
    let mut opts = SimOptions::with_devices(devices);
    opts.reconnect_delay = Duration::from_millis(20);
    opts.model.preconnect = row.preconnect;
    opts.model.policies = Policies {
        stream_headers: row.headers,
        stale_start: row.stale,
        past_newest: row.past,
        missing_user: row.missing,
        low_byte_codes: row.low_byte,
        ..Policies::default()
    };
    opts
}

async fn start(row: Row, devices: u32) -> Simulator {
    common::sim_with(options(row, devices)).await
}

fn split(sim: &Simulator) -> (u32, Vec<u32>) {
    let ids = sim.device_ids();
    (ids[0], ids[1..].to_vec())
}

async fn converge(sim: &Simulator, row: Row, what: &str) {
    let (src, targets) = split(sim);
    let want = sim.users(src);
    eventually(&format!("{what} converges with {row:?}"), || async {
        let want = sim.users(src);
        targets.iter().all(|t| sim.users(*t) == want)
    })
    .await;
    drop(want);
}

/// Runs `scenario` for every row, each with a fresh simulator and state.
macro_rules! matrix {
    ($name:ident, $devices:expr, |$sim:ident, $dir:ident, $row:ident| $body:block) => {
        #[tokio::test]
        async fn $name() {
            for $row in rows() {
                let $sim = start($row, $devices).await;
                let $dir = tempfile::tempdir().unwrap();
                $body
                $sim.shutdown().await;
            }
        }
    };
}

matrix!(enroll_update_delete, 3, |sim, dir, row| {
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "1000").unwrap();
    sim.enroll_on_device(src, "1001").unwrap();
    converge(&sim, row, "enroll").await;
    sim.update_on_device(src, "1000").unwrap();
    converge(&sim, row, "update").await;
    sim.delete_on_device(src, "1001").unwrap();
    converge(&sim, row, "delete").await;
    assert_eq!(
        sim.users(targets[0]).keys().collect::<Vec<_>>(),
        vec!["1000"]
    );
    daemon.stop().await;
});

matrix!(offline_target_catches_up, 3, |sim, dir, row| {
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    sim.enroll_on_device(src, "1").unwrap();
    converge(&sim, row, "first user").await;
    sim.set_offline(targets[1]).unwrap();
    sim.enroll_on_device(src, "2").unwrap();
    sim.delete_on_device(src, "1").unwrap();
    eventually("online target converges", || async {
        sim.users(targets[0]) == sim.users(src)
    })
    .await;
    sim.set_online(targets[1]).unwrap();
    converge(&sim, row, "returning target").await;
    daemon.stop().await;
});

matrix!(restart_replays_from_the_checkpoint, 2, |sim, dir, row| {
    let cfg = config(&sim, dir.path(), "");
    let (src, _) = split(&sim);
    let daemon = Daemon::start(cfg.clone());
    sim.enroll_on_device(src, "1").unwrap();
    converge(&sim, row, "before the stop").await;
    daemon.stop().await;
    sim.enroll_on_device(src, "2").unwrap();
    sim.update_on_device(src, "1").unwrap();
    let daemon = Daemon::start(cfg);
    converge(&sim, row, "after the restart").await;
    daemon.stop().await;
});

matrix!(crash_mid_burst_loses_nothing, 3, |sim, dir, row| {
    // In process: the daemon's task is aborted, as a kill -9 would leave
    // it (tests/crash.rs does the same to the real binary).
    let cfg = config(&sim, dir.path(), "");
    let (src, _) = split(&sim);
    let daemon = Daemon::start(cfg.clone());
    sim.enroll_on_device(src, "warm").unwrap();
    converge(&sim, row, "warm-up").await;
    for i in 0..40 {
        sim.enroll_on_device(src, &format!("b{i}")).unwrap();
    }
    daemon.task.abort();
    let _ = daemon.task.await;
    sim.delete_on_device(src, "b3").unwrap();
    let daemon = Daemon::start(cfg);
    converge(&sim, row, "after the crash").await;
    daemon.stop().await;
});

matrix!(
    realtime_drops_including_the_last_event,
    3,
    |sim, dir, row| {
        let daemon = Daemon::start(config(&sim, dir.path(), ""));
        let (src, _) = split(&sim);
        sim.enroll_on_device(src, "warm").unwrap();
        converge(&sim, row, "warm-up").await;
        sim.drop_realtime(Some(src), 0.5);
        for i in 0..20 {
            sim.enroll_on_device(src, &format!("u{i}")).unwrap();
        }
        // Nothing follows the last one: only a tail check reveals it.
        sim.drop_realtime(Some(src), 1.0);
        sim.enroll_on_device(src, "last").unwrap();
        converge(&sim, row, "after drops").await;
        sim.drop_realtime(Some(src), 0.0);
        daemon.stop().await;
    }
);

matrix!(
    log_overwritten_while_down_is_reconciled,
    2,
    |sim, dir, row| {
        let cfg = config(&sim, dir.path(), "");
        let (src, _) = split(&sim);
        let daemon = Daemon::start(cfg.clone());
        sim.enroll_on_device(src, "1").unwrap();
        converge(&sim, row, "before").await;
        daemon.stop().await;
        // More events than the ring holds: the checkpoint event is gone.
        sim.enroll_on_device(src, "2").unwrap();
        let capacity = 64;
        sim.with_model(|m| m.set_log_capacity(src, capacity));
        for _ in 0..(capacity * 2) {
            sim.event_on_device(src, 0x1000, "1").unwrap();
        }
        let daemon = Daemon::start(cfg);
        converge(&sim, row, "after the overwrite").await;
        daemon.stop().await;
    }
);

matrix!(source_reset_new_users_propagate, 3, |sim, dir, row| {
    let group = common::main_group(&sim).replace("targets", "prune = true\ntargets");
    let daemon = Daemon::start(config_with(&sim, dir.path(), &group));
    let (src, targets) = split(&sim);
    for u in ["1", "2", "3"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    converge(&sim, row, "before the reset").await;
    sim.factory_reset(src).unwrap();
    // Users enrolled after the reset, with IDs restarting below the
    // checkpoint: they must reach the targets, the old ones go (prune).
    sim.enroll_on_device(src, "after").unwrap();
    converge(&sim, row, "after a source factory reset").await;
    assert_eq!(
        sim.users(targets[0]).keys().collect::<Vec<_>>(),
        vec!["after"]
    );
    // And once the new log is longer than the old checkpoint, too.
    sim.database_reset(src).unwrap();
    for i in 0..12 {
        sim.enroll_on_device(src, &format!("n{i}")).unwrap();
    }
    converge(
        &sim,
        row,
        "after a database reset refilled past the checkpoint",
    )
    .await;
    daemon.stop().await;
});

matrix!(target_reset_is_repopulated, 3, |sim, dir, row| {
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, targets) = split(&sim);
    for u in ["1", "2", "3"] {
        sim.enroll_on_device(src, u).unwrap();
    }
    converge(&sim, row, "before the reset").await;
    sim.factory_reset(targets[0]).unwrap();
    converge(&sim, row, "after a target factory reset").await;
    sim.database_reset(targets[1]).unwrap();
    converge(&sim, row, "after a target database reset").await;
    daemon.stop().await;
});

matrix!(gateway_restart, 3, |sim, dir, row| {
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    let (src, _) = split(&sim);
    sim.enroll_on_device(src, "1").unwrap();
    converge(&sim, row, "before").await;
    sim.restart(Duration::from_millis(200)).await.unwrap();
    sim.enroll_on_device(src, "2").unwrap();
    converge(&sim, row, "after a gateway restart").await;
    daemon.stop().await;
});

matrix!(reload_adds_a_target, 3, |sim, dir, row| {
    let ids = sim.device_ids();
    let one = format!(
        "[[group]]\nname = \"main\"\nsources = [{}]\ntargets = [{}]\n",
        ids[0], ids[1]
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let signals = usersync::Shutdown::default();
    let task = tokio::spawn(usersync::supervisor::run_with(
        config_with(&sim, dir.path(), &one),
        signals.clone(),
        Some(rx),
        std::sync::Arc::new(usersync::service::Health::default()),
    ));
    sim.enroll_on_device(ids[0], "1").unwrap();
    eventually("first target", || async {
        sim.users(ids[1]) == sim.users(ids[0])
    })
    .await;
    let (done, summary) = tokio::sync::oneshot::channel();
    tx.send(usersync::Reload {
        config: config(&sim, dir.path(), ""),
        done,
    })
    .await
    .unwrap();
    within("reload", summary).await.unwrap();
    sim.enroll_on_device(ids[0], "2").unwrap();
    converge(&sim, row, "after the reload").await;
    signals.shutdown.cancel();
    within("daemon stops", task).await.unwrap().unwrap();
});

/// A quiet site: the status and realtime streams send nothing, and with
/// lazy headers their calls never return. The session must come up all
/// the same: devices registered, listed and caught up.
#[tokio::test]
async fn quiet_site_with_lazy_headers_comes_up() {
    let mut opts = SimOptions::with_devices(2);
    opts.model.policies.stream_headers = StreamHeaders::Lazy;
    opts.model.preconnect = false;
    // Registered devices come up at once; no status change is ever sent
    // to the stream before the session has registered them.
    let sim = common::sim_with(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let cfg = config(&sim, dir.path(), "");
    let state = cfg.state_dir.clone();
    let daemon = Daemon::start(cfg);
    eventually("devices registered", || async {
        sim.rpc_log().iter().any(|r| r.method == "GetDeviceList")
    })
    .await;
    eprintln!("gateway session up after {:?}", started.elapsed());
    eventually("every device caught up", || async {
        let st = usersync::store::Store::open(&state).unwrap();
        let rows = st.device_statuses().unwrap();
        rows.len() == 2 && rows.iter().all(|r| r.state == "live")
    })
    .await;
    eprintln!("every device live after {:?}", started.elapsed());
    let (src, _) = split(&sim);
    sim.enroll_on_device(src, "1").unwrap();
    converge(&sim, Row::from_bits([false; 6]), "quiet site").await;
    daemon.stop().await;
    let _ = open_store(dir.path());
}

/// First sight of a device with a long log costs O(log n) calls, not a
/// read of the whole log.
#[tokio::test]
async fn first_sight_of_a_long_log_is_a_search() {
    let mut opts = SimOptions::with_devices(2);
    opts.model.log_capacity = 300_000;
    opts.reconnect_delay = Duration::from_millis(20);
    let sim = common::sim_with(opts).await;
    let (src, targets) = split(&sim);
    sim.append_events(src, 250_000, 0x1000).unwrap();
    let newest = sim.log(src).last().unwrap().id;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&sim, dir.path(), ""));
    eventually("checkpoint at the newest event", || async {
        open_store(dir.path()).checkpoint(src).unwrap() == Some(newest)
    })
    .await;
    let calls = sim
        .rpc_log()
        .iter()
        .filter(|r| r.method == "GetLog" && r.device_ids == vec![src])
        .count();
    eprintln!("first sight of {newest} events: {calls} GetLog calls");
    // One page from the oldest, a binary search over 32 bits, one read of
    // the newest, one read after it, a settling tail check.
    assert!(calls <= 40, "{calls} GetLog calls");
    sim.enroll_on_device(src, "1").unwrap();
    eventually("synced after first sight", || async {
        sim.users(targets[0]) == sim.users(src)
    })
    .await;
    daemon.stop().await;
}

/// Reading one device's log never holds up the others: with every call
/// to one device hanging, a change on another still propagates.
#[tokio::test]
async fn a_hanging_device_does_not_stall_the_others() {
    let sim = start(Row::from_bits([false; 6]), 4).await;
    let ids = sim.device_ids();
    let groups = format!(
        "[[group]]\nname = \"a\"\nsources = [{}]\ntargets = [{}]\n\
         [[group]]\nname = \"b\"\nsources = [{}]\ntargets = [{}]\n",
        ids[0], ids[1], ids[2], ids[3]
    );
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config_with(&sim, dir.path(), &groups));
    sim.enroll_on_device(ids[0], "warm").unwrap();
    sim.enroll_on_device(ids[2], "warm").unwrap();
    eventually("warm-up", || async {
        sim.users(ids[1]) == sim.users(ids[0]) && sim.users(ids[3]) == sim.users(ids[2])
    })
    .await;
    // Device 0 answers nothing from now on, and a gap makes the consumer
    // read its log.
    sim.hold_device(ids[0], true);
    sim.drop_realtime(Some(ids[0]), 1.0);
    sim.enroll_on_device(ids[0], "x").unwrap();
    sim.drop_realtime(Some(ids[0]), 0.0);
    sim.enroll_on_device(ids[0], "y").unwrap();
    eventually("a read of the held device is in flight", || async {
        sim.held_calls(ids[0]) > 0
    })
    .await;
    sim.enroll_on_device(ids[2], "z").unwrap();
    eventually("group b converges while device 0 hangs", || async {
        sim.users(ids[3]) == sim.users(ids[2])
    })
    .await;
    assert!(sim.held_calls(ids[0]) > 0, "device 0 still hangs");
    sim.hold_device(ids[0], false);
    eventually("group a converges once device 0 answers", || async {
        sim.users(ids[1]) == sim.users(ids[0])
    })
    .await;
    daemon.stop().await;
}

#[test]
fn the_pairwise_rows_cover_every_pair() {
    for a in 0..6 {
        for b in (a + 1)..6 {
            for (x, y) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                assert!(
                    PAIRWISE.iter().any(|r| r[a] == x && r[b] == y),
                    "columns {a},{b} lack ({x},{y})"
                );
            }
        }
    }
    let _ = Api::V1_8;
}
