//! The operator commands, run as the real binary against the simulator:
//! status (daemon running and stopped), events, users, enroll --card,
//! delete, reconcile (dry run, through the daemon, directly),
//! import-config and demo; and the single-instance lock: every writer of
//! the state holds it, the daemon takes it before it opens the state, and
//! a command that cannot tell whether the daemon runs refuses to act.

mod common;

use std::path::{Path, PathBuf};

use common::{Daemon, config_text, eventually, main_group, sim, wait_converged};
use usersync::wire::Api;

struct Site {
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

fn site(sim: &usersync::sim::Simulator) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("usersync.toml");
    std::fs::write(&cfg, config_text(sim, dir.path(), &main_group(sim))).unwrap();
    Site { dir, cfg }
}

/// Runs `usersync ARGS --config CFG` on the blocking pool (the simulator
/// runs on this test's runtime); returns (exit code, stdout, stderr).
async fn run(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"));
    cmd.args(args).arg("--config").arg(cfg);
    let out = common::within(
        &format!("usersync {args:?}"),
        tokio::task::spawn_blocking(move || cmd.output().expect("run usersync")),
    )
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_against_the_simulator() {
    let sim = sim(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1, t2) = (ids[0], ids[1], ids[2]);
    let site = site(&sim);
    let config = usersync::config::load(&site.cfg).unwrap();

    // status before the daemon ever ran: a clear error.
    let (code, _, err) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("has the daemon ever run"), "{err}");

    let daemon = Daemon::start(config.clone());
    sim.enroll_on_device(src, "1000").unwrap();
    wait_converged(&sim, src, &[t1, t2]).await;

    // status while running.
    let (code, out, err) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("daemon: running"), "{out}");
    assert!(out.contains(&format!("{src:<12} source  live")), "{out}");
    let (code, out, _) = run(&site.cfg, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["daemon_running"], true);
    assert_eq!(v["devices"].as_array().unwrap().len(), 3);
    assert_eq!(v["targets"][0]["behind"], 0);

    // events: readable, from the device log.
    let (code, out, _) = run(&site.cfg, &["events", "--device", &src.to_string()]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "Device {src}, User 1000, User enrollment success (at the device)"
        )),
        "{out}"
    );
    let (code, out, _) = run(
        &site.cfg,
        &[
            "events",
            "--device",
            &t1.to_string(),
            "--since",
            "1",
            "--limit",
            "5",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["code"], "0x2000");
    assert_eq!(v[0]["changed_on_device"], false);

    // users: a list, and one user as counts and sizes only.
    let (code, out, _) = run(&site.cfg, &["users", "--device", &t2.to_string()]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("1 users on device") && out.contains("1000"),
        "{out}"
    );
    let (code, out, _) = run(
        &site.cfg,
        &[
            "users",
            "--device",
            &t2.to_string(),
            "--user",
            "1000",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v["cards"].as_u64(),
            v["fingers"].as_u64(),
            v["faces"].as_u64()
        ),
        (Some(1), Some(2), Some(1))
    );
    assert_eq!(v["has_pin"], true);
    assert!(!out.contains("templates"), "{out}");
    let (code, _, err) = run(
        &site.cfg,
        &["users", "--device", &t2.to_string(), "--user", "nobody"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("has no user nobody"), "{err}");

    // enroll with a card at the source: the daemon syncs it.
    let (code, out, err) = run(
        &site.cfg,
        &[
            "enroll",
            "--device",
            &src.to_string(),
            "--user",
            "2000",
            "--name",
            "Ann",
            "--card",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enrolled user 2000"), "{out}");
    wait_converged(&sim, src, &[t1, t2]).await;
    let (code, _, err) = run(
        &site.cfg,
        &[
            "enroll",
            "--device",
            &src.to_string(),
            "--user",
            "2000",
            "--card",
        ],
    )
    .await;
    assert_eq!(
        code, 1,
        "an existing ID is not overwritten without --overwrite"
    );
    assert!(err.contains("already exists"), "{err}");

    // delete at the source: propagated.
    let (code, _, _) = run(
        &site.cfg,
        &["delete", "--device", &src.to_string(), "--user", "1000"],
    )
    .await;
    assert_eq!(code, 0);
    wait_converged(&sim, src, &[t1, t2]).await;

    // Drift at a target (changed locally), then reconcile.
    sim.delete_on_device(t1, "2000").unwrap();
    sim.enroll_on_device(t1, "stray").unwrap();
    let (code, out, _) = run(&site.cfg, &["reconcile", "--dry-run"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "group main target {t1}: 1 missing, 0 different, 1 extra (kept: prune is off)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("group main target {t2}: 0 missing")),
        "{out}"
    );
    let (code, out, _) = run(&site.cfg, &["reconcile", "--dry-run", "--prune", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["extra"][0], "stray");
    // Through the running daemon (a request it picks up).
    let (code, out, err) = run(&site.cfg, &["reconcile", "--prune"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requested from the running daemon"), "{out}");
    wait_converged(&sim, src, &[t1, t2]).await;

    daemon.stop().await;
    let (code, out, _) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("daemon: stopped"), "{out}");

    // With the daemon stopped, reconcile runs here.
    sim.delete_on_device(t2, "2000").unwrap();
    let (code, out, err) = run(&site.cfg, &["reconcile"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "group main target {t2}: 1 users written, 0 deleted"
        )),
        "{out}"
    );
    assert_eq!(sim.users(t2), sim.users(src));

    // A second daemon on the same state is refused.
    sim.clear_rpc_log();
    let first = Daemon::start(config.clone());
    // It takes the lock before it ever calls the gateway.
    eventually("the first daemon is up", || async {
        sim.rpc_log().iter().any(|r| r.method == "SubscribeStatus")
    })
    .await;
    let second = usersync::run(config, usersync::Shutdown::default());
    let err = common::within("the second daemon gives up", second)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another usersync daemon"), "{err}");
    first.stop().await;
    drop(site.dir);
}

#[tokio::test]
async fn import_config_converts_and_seeds_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sync_config.json");
    std::fs::write(
        &json,
        r#"{
  "enroll_device": {"device_id": 939504224, "ip_addr": "192.168.0.110", "port": 51211, "use_ssl": false, "last_event_id": 34667},
  "devices": [
    {"device_id": 543664528, "ip_addr": "192.168.0.135", "port": 51211, "use_ssl": false, "last_event_id": 5984},
    {"device_id": 547634389, "ip_addr": "192.168.0.100", "port": 51211, "use_ssl": true, "last_event_id": 295005}
  ]
}"#,
    )
    .unwrap();
    usersync::sim::tls::generate(&["localhost"])
        .unwrap()
        .write_ca(dir.path())
        .unwrap();
    let out_path = dir.path().join("usersync.toml");
    let state = dir.path().join("state");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .arg("import-config")
        .arg(&json)
        .arg("--output")
        .arg(&out_path)
        .args([
            "--gateway",
            "127.0.0.1:4000",
            "--ca-file",
            "ca.crt",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("seeded 3 checkpoints"));
    let cfg = usersync::config::load(&out_path).unwrap();
    assert_eq!(cfg.groups[0].sources, vec![939_504_224]);
    assert_eq!(cfg.groups[0].targets, vec![543_664_528, 547_634_389]);
    assert!(cfg.devices[&547_634_389].tls);
    let store = usersync::store::Store::open(&state).unwrap();
    assert_eq!(store.checkpoint(939_504_224).unwrap(), Some(34_667));
    assert_eq!(store.checkpoint(547_634_389).unwrap(), Some(295_005));
    // Never overwrites an existing file.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .arg("import-config")
        .arg(&json)
        .arg("--output")
        .arg(&out_path)
        .args(["--gateway", "127.0.0.1:4000"])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
}

#[tokio::test]
async fn demo_runs_its_scene() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
            .arg("demo")
            .output()
            .expect("run demo")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "users 1 and 2 copied to both targets",
        "user 1000 on every device",
        "the returning device caught up",
        "restarted daemon replayed the log",
        "reconnected, resubscribed, caught up",
        "demo finished",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

// ---- the single-instance lock --------------------------------------------------

/// A non-root operator whose user cannot look into the state directory
/// (the unit's is /var/lib/private/usersync, 0700) used to be told
/// "stopped" and reconcile wrote to the devices beside a running daemon.
/// It now says it cannot tell, and touches no device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_tell_whether_the_daemon_runs_refuses_to_act() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // Registered, as the daemon leaves them.
    let sim = common::sim_registered(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = dir.path().join("private");
    let state = private.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let text = config_text(&sim, dir.path(), &main_group(&sim)).replace(
        &dir.path().join("state").display().to_string(),
        &state.display().to_string(),
    );
    let cfg = dir.path().join("usersync.toml");
    std::fs::write(&cfg, text).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Root reads everything: the operator is then `nobody`, as a non-root
    // operator is with the unit's 0700 directory. Anyone else locks
    // themselves out.
    let root = rustix::process::geteuid().is_root();
    let mode = if root { 0o700 } else { 0o000 };
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(mode)).unwrap();

    // A change the targets lack: a reconcile from here would write it.
    sim.enroll_on_device(src, "1000").unwrap();
    sim.clear_rpc_log();
    let as_operator = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"));
        cmd.args(args).arg("--config").arg(&cfg);
        if root {
            cmd.uid(65534).gid(65534);
        }
        tokio::task::spawn_blocking(move || cmd.output().expect("run usersync"))
    };
    let refusal = format!(
        "cannot tell whether the daemon is running: permission denied on {}; run as the service user or with sudo",
        state.display()
    );
    for args in [&["reconcile"][..], &["status"]] {
        let out = common::within("usersync as the operator", as_operator(args))
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&refusal), "{args:?}: {stderr}");
    }
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        sim.rpc_log().is_empty(),
        "no device was called: {:?}",
        sim.rpc_log()
    );
    assert!(!sim.users(t1).contains_key("1000"));

    // Other ways of not knowing are refused too: a lock that cannot be
    // opened (here a directory in its place).
    std::fs::create_dir(state.join(usersync::supervisor::LOCK_FILE)).unwrap();
    let (code, _, err) = run(&cfg, &["reconcile"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot tell whether the daemon is running")
            && err.contains("refusing to act"),
        "{err}"
    );
    assert!(sim.rpc_log().is_empty(), "{:?}", sim.rpc_log());
}

/// A reconcile run here, with no daemon, holds the lock for as long as it
/// writes to devices: a daemon started meanwhile gives up instead of
/// writing beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_run_here_holds_the_daemon_lock() {
    // Registered as a daemon that ran before would have left them.
    let sim = common::sim_registered(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1, t2) = (ids[0], ids[1], ids[2]);
    let site = site(&sim);
    let config = usersync::config::load(&site.cfg).unwrap();
    sim.enroll_on_device(src, "1000").unwrap();
    // The source answers nothing until released: the reconcile waits in
    // its first read.
    sim.hold_device(src, true);
    let cfg = site.cfg.clone();
    let reconcile = tokio::spawn(async move { run(&cfg, &["reconcile"]).await });
    eventually("the reconcile reads the source", || async {
        sim.held_calls(src) > 0
    })
    .await;
    let daemon = usersync::run(config, usersync::Shutdown::default());
    let err = common::within("a daemon started meanwhile gives up", daemon)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another usersync daemon"), "{err}");
    sim.hold_device(src, false);
    let (code, out, err) = reconcile.await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 users written"), "{out}");
    wait_converged(&sim, src, &[t1, t2]).await;
}

/// `Store::open` upgrades the schema: a daemon that finds the lock taken
/// leaves the state as it was (it used to open, and so create or migrate,
/// the database first).
#[tokio::test]
async fn the_daemon_takes_the_lock_before_it_opens_the_state() {
    let sim = sim(Api::V1_8, 2).await;
    let site = site(&sim);
    let config = usersync::config::load(&site.cfg).unwrap();
    std::fs::create_dir(&config.state_dir).unwrap();
    let held = usersync::supervisor::try_lock(&config.state_dir)
        .unwrap()
        .expect("the lock is free");
    let err = common::within(
        "the daemon gives up",
        usersync::run(config.clone(), usersync::Shutdown::default()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("another usersync daemon"), "{err}");
    assert!(
        !config.state_dir.join(usersync::store::DB_FILE).exists(),
        "the database was opened without the lock"
    );
    drop(held);
}

/// import-config seeds checkpoints the daemon owns: it refuses while a
/// daemon holds the lock, and writes neither the file nor the state.
#[tokio::test]
async fn import_config_refuses_while_a_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sync_config.json");
    std::fs::write(
        &json,
        r#"{"enroll_device": {"device_id": 1, "ip_addr": "192.0.2.1", "last_event_id": 7},
            "devices": [{"device_id": 2, "ip_addr": "192.0.2.2", "last_event_id": 9}]}"#,
    )
    .unwrap();
    usersync::sim::tls::generate(&["localhost"])
        .unwrap()
        .write_ca(dir.path())
        .unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let held = usersync::supervisor::try_lock(&state)
        .unwrap()
        .expect("the lock is free");
    let out_path = dir.path().join("usersync.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .arg("import-config")
        .arg(&json)
        .arg("--output")
        .arg(&out_path)
        .args(["--gateway", "127.0.0.1:4000", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a usersync daemon is running"), "{stderr}");
    assert!(!out_path.exists(), "the configuration was written");
    assert!(!state.join(usersync::store::DB_FILE).exists());
    drop(held);
}
