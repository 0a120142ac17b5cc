//! The operator commands, run as the real binary against the simulator:
//! status (daemon running, stopped, killed; gateway up and down; drift and
//! reconcile results), events, users, enroll --card (a card added to an
//! existing user keeps every other byte), delete, reconcile (dry run,
//! through the daemon, directly, per target, with unreachable targets, a
//! prune that asks), import-config (all or nothing), demo, errors that say
//! what to do next and one CLI convention; and the single-instance lock:
//! every writer of the state holds it, the daemon takes it before it opens
//! the state, and a command that cannot tell whether the daemon runs
//! refuses to act.

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

    // status before the daemon ever ran: what to do.
    let (code, _, err) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no state yet") && err.contains("start it"),
        "{err}"
    );

    let daemon = Daemon::start(config.clone());
    sim.enroll_on_device(src, "1000").unwrap();
    wait_converged(&sim, src, &[t1, t2]).await;

    // status while running.
    let (code, out, err) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("daemon:  running"), "{out}");
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
        out.contains("1 user on device") && out.contains("1000"),
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
    assert_eq!(v["targets"][0]["extra"][0], "stray");
    // Through the running daemon (a request it picks up); the prune is
    // confirmed with --yes (no terminal here to ask on).
    let (code, out, err) = run(&site.cfg, &["reconcile", "--prune", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requested from the running daemon"), "{out}");
    wait_converged(&sim, src, &[t1, t2]).await;

    daemon.stop().await;
    let (code, out, _) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("daemon:  stopped"), "{out}");

    // With the daemon stopped, reconcile runs here.
    sim.delete_on_device(t2, "2000").unwrap();
    let (code, out, err) = run(&site.cfg, &["reconcile"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "group main target {t2}: 1 user written, 0 deleted"
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
    // Relative paths are relative to the current directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .current_dir(dir.path())
        .arg("import-config")
        .arg("sync_config.json")
        .arg("--output")
        .arg("usersync.toml")
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
    assert_eq!(cfg.gateway.ca_file, Some(dir.path().join("ca.crt")));
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
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists; not overwriting it"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
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
        "cannot tell whether the daemon is running: permission denied on {}; run with sudo",
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
    std::fs::create_dir(state.join(usersync::store::LOCK_FILE)).unwrap();
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
    assert!(out.contains("1 user written"), "{out}");
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
    let held = usersync::store::try_lock(&config.state_dir)
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
    let held = usersync::store::try_lock(&state)
        .unwrap()
        .expect("the lock is free");
    let out_path = dir.path().join("usersync.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .arg("import-config")
        .arg(&json)
        .arg("--output")
        .arg(&out_path)
        .args(["--gateway", "127.0.0.1:4000", "--ca-file"])
        .arg(dir.path().join("ca.crt"))
        .arg("--state-dir")
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

// ---- the operator's edge (issue 9) ------------------------------------------------

/// The top-level fields of a raw protobuf record, as (number, whole field
/// bytes), without interpreting any of them.
fn wire_fields(buf: &[u8]) -> Vec<(u64, Vec<u8>)> {
    fn varint(buf: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = buf[*pos];
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = varint(buf, &mut pos);
        match key & 7 {
            0 => {
                varint(buf, &mut pos);
            }
            1 => pos += 8,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)).unwrap();
                pos += len;
            }
            5 => pos += 4,
            t => panic!("wire type {t}"),
        }
        out.push((key >> 3, buf[start..pos].to_vec()));
    }
    out
}

/// A record's bytes without its header (field 1) and cards (field 4).
fn without_hdr_and_cards(raw: &[u8]) -> Vec<u8> {
    wire_fields(raw)
        .into_iter()
        .filter(|(n, _)| *n != 1 && *n != 4)
        .flat_map(|(_, b)| b)
        .collect()
}

/// Item 1: `enroll --card --overwrite` on an existing user adds the card
/// and keeps every other byte — fingers, face, PIN, photo, name and a
/// field no schema of ours knows — on the device and, after sync, on every
/// target. Without --overwrite it refuses before asking for a card and
/// says what the user holds. `delete` of a user the device does not have
/// says so and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_card_keeps_everything_else_on_every_device() {
    use prost::Message;
    use usersync::proto::usersync::schema::v18;
    let sim = sim(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1, t2) = (ids[0], ids[1], ids[2]);
    let site = site(&sim);
    let config = usersync::config::load(&site.cfg).unwrap();
    let daemon = Daemon::start(config);
    // A generated user (a card, two fingers, a face, PIN, photo), plus a
    // field of a later gateway generation (number 15).
    let mut raw = usersync::sim::users::generate(
        "1000",
        1,
        usersync::wire::Numbering::V18,
        Default::default(),
    );
    raw.extend_from_slice(&[0x7a, 0x06]);
    raw.extend_from_slice(b"future");
    sim.put_raw_on_device(src, raw.clone()).unwrap();
    wait_converged(&sim, src, &[t1, t2]).await;
    let before = sim.user_bytes(src, "1000").unwrap();
    assert_eq!(before, raw);
    let s = src.to_string();

    sim.clear_rpc_log();
    let (code, _, err) = run(&site.cfg, &["enroll", "--device", &s, "--user", "1000"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("user 1000 already exists")
            && err.contains("2 fingers")
            && err.contains("1 face")
            && err.contains("--overwrite adds the card to it and keeps everything else"),
        "{err}"
    );
    assert!(
        !sim.rpc_log().iter().any(|r| r.method == "Scan"),
        "no card is asked for before the inputs are checked"
    );

    let (code, out, err) = run(
        &site.cfg,
        &[
            "enroll",
            "--device",
            &s,
            "--user",
            "1000",
            "--card",
            "--overwrite",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("added a card to user 1000")
            && out.contains("2 cards, 2 fingers, 1 face, a PIN, a photo"),
        "{out}"
    );
    let after = sim.user_bytes(src, "1000").unwrap();
    assert_eq!(
        without_hdr_and_cards(&after),
        without_hdr_and_cards(&before),
        "every byte but the header and the cards is kept"
    );
    assert!(
        after.windows(8).any(|w| w == b"\x7a\x06future"),
        "the unknown field is kept"
    );
    let (a, b) = (
        v18::UserInfo::decode(before.as_slice()).unwrap(),
        v18::UserInfo::decode(after.as_slice()).unwrap(),
    );
    assert_eq!(b.cards.len(), a.cards.len() + 1);
    assert_eq!(b.cards[0], a.cards[0]);
    let (ha, hb) = (a.hdr.clone().unwrap(), b.hdr.clone().unwrap());
    assert_eq!(hb.num_of_card, ha.num_of_card + 1);
    assert_eq!(
        (hb.id, hb.user_flag, hb.num_of_finger, hb.num_of_face),
        (ha.id, ha.user_flag, ha.num_of_finger, ha.num_of_face)
    );
    assert_eq!(
        (&b.name, &b.fingers, &b.faces, &b.pin, &b.photo, &b.setting),
        (&a.name, &a.fingers, &a.faces, &a.pin, &a.photo, &a.setting)
    );
    // Every target gets exactly these bytes.
    wait_converged(&sim, src, &[t1, t2]).await;
    assert_eq!(sim.user_bytes(t1, "1000"), Some(after.clone()));
    assert_eq!(sim.user_bytes(t2, "1000"), Some(after));

    sim.clear_rpc_log();
    let (code, _, err) = run(&site.cfg, &["delete", "--device", &s, "--user", "nosuch"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("device {src} has no user nosuch: nothing deleted")),
        "{err}"
    );
    assert!(!sim.rpc_log().iter().any(|r| r.method == "Delete"));
    daemon.stop().await;
}

fn import_cmd(dir: &Path, ca: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"));
    let gateway = extra.first().copied().unwrap_or("127.0.0.1:4000");
    cmd.current_dir(dir)
        .args(["import-config", "sync_config.json", "--gateway", gateway])
        .args(["--ca-file", ca, "--output", "usersync.toml", "--state-dir"])
        .arg(dir.join("state"));
    cmd
}

const EXAMPLE: &str = r#"{
  "enroll_device": {"device_id": 939504224, "ip_addr": "192.168.0.110", "port": 51211, "use_ssl": false, "last_event_id": 34667},
  "devices": [
    {"device_id": 543664528, "ip_addr": "192.168.0.135", "port": 51211, "use_ssl": false, "last_event_id": 5984}
  ]
}"#;

/// Item 2: import-config checks everything before it writes anything;
/// errors are said in terms of the JSON and the flags; the file and the
/// seeded checkpoints appear together; a failed run leaves nothing behind,
/// so a rerun works; a directory this user may not write says sudo.
#[tokio::test]
async fn import_config_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    usersync::sim::tls::generate(&["localhost"])
        .unwrap()
        .write_ca(dir.path())
        .unwrap();
    let json = dir.path().join("sync_config.json");
    let out_path = dir.path().join("usersync.toml");
    let db = dir.path().join("state").join(usersync::store::DB_FILE);
    let attempt = |text: &str, ca: &str, extra: &[&str]| {
        std::fs::write(&json, text).unwrap();
        let out = import_cmd(dir.path(), ca, extra).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let failures: Vec<(String, &str, Vec<&str>, Vec<String>)> = vec![
        (
            EXAMPLE.into(),
            "nope.crt",
            vec![],
            vec![
                "--ca-file nope.crt: cannot read".into(),
                "relative paths are relative to the current directory".into(),
            ],
        ),
        (
            EXAMPLE.replace("\"device_id\": 939504224", "\"device_id\": \"939504224\""),
            "ca.crt",
            vec![],
            vec![
                "sync_config.json:2:".into(),
                "device_id: invalid type: string \"939504224\", expected a device ID, a whole number between 1 and 4294967295".into(),
            ],
        ),
        (
            EXAMPLE.replace("\"192.168.0.135\"", "\"192.168.0.135:51211\""),
            "ca.crt",
            vec![],
            vec!["sync_config.json: devices[0].ip_addr \"192.168.0.135:51211\" has a port in it".into()],
        ),
        (
            EXAMPLE.replace("543664528", "939504224"),
            "ca.crt",
            vec![],
            vec!["devices[0].device_id: device 939504224 is also enroll_device".into()],
        ),
        // Finding 5: a column inside a multi-byte character.
        (
            r#"{"enroll_device": é}"#.into(),
            "ca.crt",
            vec![],
            vec!["sync_config.json:1:".into(), "enroll_device".into()],
        ),
        (
            EXAMPLE.into(),
            "ca.crt",
            vec!["http://192.168.0.2:4000"],
            vec!["--gateway \"http://192.168.0.2:4000\": is host:port, not a URL".into()],
        ),
    ];
    for (text, ca, extra, wanted) in &failures {
        let (code, _, err) = attempt(text, ca, extra);
        assert_eq!(code, Some(1), "{err}");
        for w in wanted {
            assert!(err.contains(w.as_str()), "expected {w:?} in {err}");
        }
        assert!(err.contains("nothing written"), "{err}");
        assert!(!err.contains("u32"), "{err}");
        assert!(!out_path.exists(), "{err}: a file was left behind");
        assert!(!db.exists(), "{err}: the state was touched");
    }
    // After all that, the good input goes through at once.
    let (code, out, err) = attempt(EXAMPLE, "ca.crt", &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("(2 devices, 1 group); seeded 2 checkpoints"),
        "{out}"
    );
    let store = usersync::store::Store::open(&dir.path().join("state")).unwrap();
    assert_eq!(store.checkpoint(939_504_224).unwrap(), Some(34_667));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "readable by the service's user");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".import-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // An output directory this user may not write: sudo, and nothing else.
    use std::os::unix::process::CommandExt;
    let other = tempfile::tempdir().unwrap();
    std::fs::set_permissions(other.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let locked = other.path().join("etc");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::write(other.path().join("sync_config.json"), EXAMPLE).unwrap();
    std::fs::set_permissions(
        other.path().join("sync_config.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"));
    cmd.current_dir(other.path())
        .args([
            "import-config",
            "sync_config.json",
            "--gateway",
            "127.0.0.1:4000",
        ])
        .arg("--output")
        .arg(locked.join("usersync.toml"));
    if rustix::process::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "--output {}: this user may not write in {} (run it with sudo",
            locked.join("usersync.toml").display(),
            locked.display()
        )),
        "{err}"
    );
}

/// Polls `usersync status --json` until `check` holds.
async fn status_until(
    cfg: &Path,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let (code, out, err) = run(cfg, &["status", "--json"]).await;
        if code == 0 {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            if check(&v) {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for status: {what}\n{out}{err}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn is_rfc3339(v: &serde_json::Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 20
            && s.as_bytes()[10] == b'T'
            && s.ends_with('Z')
            && s[..4].parse::<u32>().is_ok()
    })
}

/// Item 3 (and 8's status parts): status says the gateway's state and
/// since when, in text and JSON (RFC 3339); after the daemon is killed,
/// device rows are last known, with their age, and no orderly stop is
/// claimed; the CURSOR column is named for what it is; the phases are the
/// metrics' words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_the_truth_about_the_daemon_and_the_gateway() {
    let sim = sim(Api::V1_8, 3).await;
    let src = sim.device_ids()[0];
    let site = site(&sim);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(["run", "--log-target", "stderr", "--config"])
        .arg(&site.cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let v = status_until(&site.cfg, "every device live, gateway up", |v| {
        v["gateway"]["state"] == "up"
            && v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["state"] == "live")
    })
    .await;
    assert_eq!(v["daemon"]["running"], true);
    assert_eq!(v["gateway"]["current"], true);
    assert!(is_rfc3339(&v["gateway"]["since"]), "{v}");
    assert!(is_rfc3339(&v["devices"][0]["updated"]), "{v}");
    let (_, text, _) = run(&site.cfg, &["status"]).await;
    assert!(
        text.contains(&format!("gateway: {} up since", sim.address())),
        "{text}"
    );
    assert!(
        text.contains("JOURNAL-SEQ") && !text.contains("CURSOR"),
        "{text}"
    );
    assert!(text.contains("not a device event ID"), "{text}");

    // kill -9: what it recorded is last known.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let (code, text, err) = run(&site.cfg, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("daemon:  not running: last seen")
            && text.contains("no orderly stop recorded"),
        "{text}"
    );
    assert!(text.contains("devices as last known"), "{text}");
    assert!(
        text.contains(&format!("{src:<12} source  was live")),
        "{text}"
    );
    assert!(text.contains("ago)"), "{text}");
    assert!(text.contains("— last known, as of"), "{text}");
    let (_, out, _) = run(&site.cfg, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["daemon"]["running"], false);
    assert_eq!(v["devices"][0]["current"], false);
    assert!(v["devices"][0]["age_secs"].is_u64(), "{v}");
    assert_eq!(v["gateway"]["current"], false);

    // The gateway goes away under a running daemon: status says so, since
    // when, and what to check.
    let config = usersync::config::load(&site.cfg).unwrap();
    let daemon = Daemon::start(config);
    status_until(&site.cfg, "gateway up again", |v| {
        v["gateway"]["state"] == "up"
    })
    .await;
    sim.shutdown().await;
    let refused = format!("cannot connect to the gateway at {}", sim.address());
    let v = status_until(&site.cfg, "gateway down, cannot connect", |v| {
        v["gateway"]["state"] == "down"
            && v["gateway"]["next_step"]
                .as_str()
                .is_some_and(|s| s.contains(&refused))
    })
    .await;
    assert!(is_rfc3339(&v["gateway"]["since"]), "{v}");
    let (_, text, _) = run(&site.cfg, &["status"]).await;
    assert!(
        text.contains(&format!("gateway: {} DOWN since", sim.address()))
            && text.contains("next: cannot connect to the gateway"),
        "{text}"
    );
    daemon.stop().await;
    let (_, text, _) = run(&site.cfg, &["status"]).await;
    assert!(text.contains("daemon:  stopped"), "{text}");
}

/// Item 4: a CLI write at a target warns; changes at a target (at the
/// device, or through the CLI) show in status as drift with the reconcile
/// that fixes it; that reconcile, through the running daemon and for one
/// target, shows its result and clears the drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_at_a_target_warn_and_show_as_drift() {
    let sim = sim(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1, t2) = (ids[0], ids[1], ids[2]);
    let site = site(&sim);
    let config = usersync::config::load(&site.cfg).unwrap();
    let daemon = Daemon::start(config);
    sim.enroll_on_device(src, "1000").unwrap();
    wait_converged(&sim, src, &[t1, t2]).await;

    sim.enroll_on_device(t1, "stray").unwrap();
    let t = t1.to_string();
    // The source still holds 1000: deleting it here needs --force.
    let (code, out, err) = run(
        &site.cfg,
        &["delete", "--device", &t, "--user", "1000", "--force"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted user 1000"), "{out}");
    assert!(
        err.contains(&format!("warning: device {t1} is a target of group main"))
            && err.contains("puts it back"),
        "{err}"
    );
    let fix = format!("usersync reconcile --group main --target {t1}");
    let v = status_until(&site.cfg, "drift of two user changes", |v| {
        v["targets"][0]["drift"]["changes"].as_u64() == Some(2)
    })
    .await;
    assert_eq!(v["targets"][0]["drift"]["fix"], fix.as_str());
    assert!(v["targets"][1]["drift"].is_null(), "{v}");
    let (_, text, _) = run(&site.cfg, &["status"]).await;
    assert!(
        text.contains(&format!(
            "main/{t1}: 2 user changes since its last reconcile"
        )) && text.contains(&fix),
        "{text}"
    );

    // The reconcile status names, for that target only.
    let (code, out, err) = run(&site.cfg, &["reconcile", "--target", &t]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("reconcile of 1 target requested from the running daemon")
            && out.contains(&format!("group main: {t1}")),
        "{out}"
    );
    let v = status_until(&site.cfg, "the reconcile's result", |v| {
        v["targets"][0]["last_reconcile"]["reason"] == "requested by the operator"
            && v["targets"][0]["drift"].is_null()
    })
    .await;
    assert_eq!(v["targets"][0]["last_reconcile"]["missing"], 1);
    assert_eq!(v["targets"][0]["last_reconcile"]["extra"], 1);
    assert!(is_rfc3339(
        &v["targets"][0]["last_reconcile"]["finished_at"]
    ));
    // The result is recorded when the comparison ends; the missing user
    // is written by the pending lane right after.
    eventually("the reconcile puts 1000 back", || async {
        sim.holds(t1, "1000")
    })
    .await;
    assert!(sim.users(t1).contains_key("stray"), "kept: prune is off");
    daemon.stop().await;
}

/// Item 5: with the daemon stopped and one target offline, reconcile fixes
/// the reachable target and reports the other (exit 1); --target picks
/// one; a prune says how many users it deletes and needs --yes off a
/// terminal; a dry run lists the extra users it keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_does_what_it_can_and_asks_before_it_deletes() {
    let sim = common::sim_registered(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1, t2) = (ids[0], ids[1], ids[2]);
    let site = site(&sim);
    sim.enroll_on_device(src, "1000").unwrap();
    sim.enroll_on_device(t1, "stray").unwrap();
    sim.set_offline(t2).unwrap();

    let (code, out, err) = run(&site.cfg, &["reconcile", "--dry-run"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains(&format!(
            "group main target {t1}: 1 missing, 0 different, 1 extra (kept: prune is off)"
        )) && out.contains("keep (no source has them; --prune deletes them): stray"),
        "{out}"
    );
    assert!(
        err.contains(&format!(
            "not reconciled: group main target {t2}: target unreachable"
        )) && err.contains(&format!("usersync reconcile --group main --target {t2}")),
        "{err}"
    );

    // A prune off a terminal: refused, saying what it would delete.
    let (code, _, err) = run(&site.cfg, &["reconcile", "--prune"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("this reconcile deletes 1 user from 1 target")
            && err.contains(&format!("group main target {t1}: stray"))
            && err.contains("confirm with --yes"),
        "{err}"
    );
    assert!(sim.users(t1).contains_key("stray"), "nothing deleted");
    assert!(!sim.users(t1).contains_key("1000"), "nothing written");

    // Everything reachable is done; the offline target is reported.
    let (code, out, err) = run(&site.cfg, &["reconcile", "--prune", "--yes"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains(&format!(
            "group main target {t1}: 1 user written, 1 deleted"
        )),
        "{out}"
    );
    assert!(
        err.contains(&format!("not reconciled: group main target {t2}")),
        "{err}"
    );
    assert_eq!(sim.users(t1), sim.users(src));

    // --target: only that one.
    sim.set_online(t2).unwrap();
    eventually("the target is back", || async { sim.is_connected(t2) }).await;
    sim.enroll_on_device(src, "2000").unwrap();
    let (code, out, err) = run(&site.cfg, &["reconcile", "--target", &t2.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("group main target {t2}: 2 users written")),
        "{out}"
    );
    assert!(!out.contains(&t1.to_string()), "{out}");
    assert_eq!(sim.users(t2), sim.users(src));
    assert!(!sim.users(t1).contains_key("2000"));

    let (code, _, err) = run(&site.cfg, &["reconcile", "--target", &src.to_string()]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "device {src} is a source of group main, not a target"
        )),
        "{err}"
    );
}

/// Item 6: every error says what to do next — the gateway's address when
/// it cannot be reached, the CA file for an unknown issuer, `tls = true`
/// for a TLS gateway, "not in the configuration" for an unknown device —
/// and enroll checks its inputs before it asks for a card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do_next() {
    let sim = common::sim_registered(Api::V1_8, 2).await;
    let src = sim.device_ids()[0];
    let s = src.to_string();
    let site = site(&sim);
    let text = std::fs::read_to_string(&site.cfg).unwrap();
    let variant = |name: &str, text: String| {
        let p = site.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    // Nothing listens there.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = variant(
        "down.toml",
        text.replace(&sim.address().to_string(), &free.to_string()),
    );
    let (code, _, err) = run(&down, &["users", "--device", &s]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("cannot connect to the gateway at {free}"))
            && err.contains("check that the gateway runs"),
        "{err}"
    );

    // A CA that did not sign the gateway's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_ca = usersync::sim::tls::generate(&["localhost"])
        .unwrap()
        .write_ca(other.path())
        .unwrap();
    let ca_line = text
        .lines()
        .find(|l| l.starts_with("ca_file"))
        .unwrap()
        .to_owned();
    let badca = variant(
        "badca.toml",
        text.replace(&ca_line, &format!("ca_file = \"{}\"", other_ca.display())),
    );
    let (code, _, err) = run(&badca, &["users", "--device", &s]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "the gateway's certificate is not signed by ca_file {}",
            other_ca.display()
        )),
        "{err}"
    );

    // Plaintext to a TLS gateway.
    let plain = variant("plain.toml", text.replace(&ca_line, "tls = false"));
    let (code, _, err) = run(&plain, &["users", "--device", &s]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("speaks TLS") && err.contains("set tls = true"),
        "{err}"
    );

    // A device the configuration does not declare.
    sim.clear_rpc_log();
    for args in [
        &["users", "--device", "12345"][..],
        &["events", "--device", "12345"],
        &["delete", "--device", "12345", "--user", "1"],
        &["enroll", "--device", "12345", "--user", "1", "--card"],
    ] {
        let (code, _, err) = run(&site.cfg, args).await;
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains("device 12345 is not in the configuration"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = run(&site.cfg, &["enroll", "--device", &s, "--user", ""]).await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid user ID"), "{err}");
    // Finding 7: a name the device cannot store, and a limit of 0 (which
    // GetLog reads as "the whole log", WIRE.md B3).
    let long = "é".repeat(49);
    let (code, _, err) = run(
        &site.cfg,
        &["enroll", "--device", &s, "--user", "5", "--name", &long],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--name has 49 characters; a device stores at most 48"),
        "{err}"
    );
    for since in [&["--since", "1"][..], &[]] {
        let mut args = vec!["events", "--device", &s, "--limit", "0"];
        args.extend_from_slice(since);
        let (code, _, err) = run(&site.cfg, &args).await;
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("--limit 0"), "{err}");
    }
    assert!(
        sim.rpc_log().is_empty(),
        "nothing reached the gateway: {:?}",
        sim.rpc_log()
    );

    // And `events` with nothing to show says so.
    let (code, out, _) = run(&site.cfg, &["events", "--device", &s]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("no events on device {src}")), "{out}");
}

/// Item 7: one convention — `--config/-c` everywhere (check-config keeps
/// its positional form); exit 2 for usage errors is documented; every
/// option has help; the man page's synopsis lists every option.
#[test]
fn one_cli_convention_documented_everywhere() {
    let usersync = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = "/nonexistent/usersync.toml";
    for args in [
        &["check-config", "--config", missing][..],
        &["check-config", "-c", missing],
        &["check-config", missing],
        &["status", "-c", missing],
    ] {
        let (code, _, err) = usersync(args);
        assert_eq!(code, Some(78), "{args:?}: {err}");
        assert!(err.contains(missing), "{err}");
    }
    let (code, _, _) = usersync(&["check-config", missing, "--config", missing]);
    assert_eq!(code, Some(2), "one file, not two");
    let (_, help, _) = usersync(&["--help"]);
    assert!(help.contains("2 usage error"), "{help}");

    let man =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/usersync.1"))
            .unwrap();
    let synopsis = &man[man.find(".SH SYNOPSIS").unwrap()..man.find(".SH DESCRIPTION").unwrap()];
    assert!(
        man.contains("\n2 for a usage error"),
        "exit 2 in EXIT STATUS"
    );
    for cmd in [
        "run",
        "status",
        "events",
        "users",
        "enroll",
        "delete",
        "reconcile",
        "check-config",
        "import-config",
        "sim",
    ] {
        let (_, help, _) = usersync(&[cmd, "--help"]);
        let block = synopsis
            .split(".br")
            .find(|b| b.contains(&format!(".B usersync {}", cmd.replace('-', "\\-"))))
            .unwrap_or_else(|| panic!("no synopsis line for {cmd}"));
        for line in help.lines() {
            let line = line.trim_start();
            if !line.starts_with('-') {
                continue;
            }
            let Some(opt) = line
                .split([' ', ','])
                .find(|w| w.starts_with("--") && w.len() > 2)
            else {
                continue;
            };
            if opt == "--help" {
                continue;
            }
            // Every option has a help text.
            let described = line.split("  ").filter(|p| !p.trim().is_empty()).count() > 1
                || help.contains(&format!("{line}\n          "));
            assert!(described, "{cmd} {opt} has no help text:\n{help}");
            assert!(
                block.contains(&opt.replace('-', "\\-")),
                "the man page's synopsis of {cmd} lacks {opt}"
            );
        }
    }
}

// ---- review findings ------------------------------------------------------------

/// A site whose configuration says `api` while the simulator serves
/// another generation (same `gsdk.` paths, other numbering).
fn site_with_api(sim: &usersync::sim::Simulator, api: &str) -> Site {
    let s = site(sim);
    let text = std::fs::read_to_string(&s.cfg).unwrap();
    let wrong = text.replace(
        &format!("api = \"{}\"", sim.api()),
        &format!("api = \"{api}\""),
    );
    assert_ne!(wrong, text);
    std::fs::write(&s.cfg, wrong).unwrap();
    s
}

/// Finding 1: `enroll --overwrite` edits numOfCard where `[gateway] api`
/// says it is. A disabled V1.8 user (userFlag 0x80) edited with api v1.5
/// would get the card count in its userFlag — enabled again — and every
/// target would get the damage: refused, naming the api the record fits,
/// before any card is asked for. The same for a ≤V1.6 record under v1.8,
/// and for a new user when the gateway's version contradicts the api.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_is_never_added_in_the_wrong_numbering() {
    use prost::Message;
    use usersync::proto::usersync::schema::v18;
    use usersync::wire::Numbering;

    let sim = common::sim_registered(Api::V1_8, 2).await;
    let src = sim.device_ids()[0];
    let s = src.to_string();
    let site = site_with_api(&sim, "v1.5");
    let raw = usersync::sim::users::generate("77", 1, Numbering::V18, Default::default());
    let mut u = v18::UserInfo::decode(raw.as_slice()).unwrap();
    u.hdr.as_mut().unwrap().user_flag = 0x80;
    let disabled = u.encode_to_vec();
    sim.put_raw_on_device(src, disabled.clone()).unwrap();
    sim.clear_rpc_log();
    let (code, out, err) = run(
        &site.cfg,
        &[
            "enroll",
            "--device",
            &s,
            "--user",
            "77",
            "--card",
            "--overwrite",
        ],
    )
    .await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("user 77 on device")
            && err.contains("numbering of api = \"v1.8\"")
            && err.contains("userFlag — a disabled user would be enabled again —")
            && err.contains("If the gateway runs V1.8 or later, set api = \"v1.8\" in [gateway]")
            && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(sim.user_bytes(src, "77"), Some(disabled), "unchanged");
    assert!(
        !sim.rpc_log()
            .iter()
            .any(|r| r.method == "Scan" || r.method.starts_with("Enroll")),
        "{:?}",
        sim.rpc_log()
    );
    // A new user: the gateway's version says V1.8.
    let (code, out, err) = run(
        &site.cfg,
        &["enroll", "--device", &s, "--user", "78", "--card"],
    )
    .await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("reports version \"v1.8.0\"") && err.contains("set api = \"v1.8\""),
        "{err}"
    );
    assert!(!sim.holds(src, "78"));

    // A ≤V1.6 record under api v1.8.
    let sim = common::sim_registered(Api::V1_5, 2).await;
    let src = sim.device_ids()[0];
    let s = src.to_string();
    let site = site_with_api(&sim, "v1.8");
    let old = usersync::sim::users::generate("42", 1, Numbering::V16, Default::default());
    sim.put_raw_on_device(src, old.clone()).unwrap();
    let (code, out, err) = run(
        &site.cfg,
        &[
            "enroll",
            "--device",
            &s,
            "--user",
            "42",
            "--card",
            "--overwrite",
        ],
    )
    .await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("numbering of api = \"v1.5\"") && err.contains("set api = \"v1.5\""),
        "{err}"
    );
    assert_eq!(sim.user_bytes(src, "42"), Some(old), "unchanged");
}

/// Finding 3: the user gains its eighth card at the device while the CLI
/// waits for the card to add: the record read again is refused, no ninth
/// card is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninth_card_is_refused_after_the_card_is_presented() {
    use usersync::wire::{Numbering, add_card};
    let sim = common::sim_registered(Api::V1_8, 2).await;
    let src = sim.device_ids()[0];
    let site = site(&sim);
    let card =
        |i: u64| prost::Message::encode_to_vec(&usersync::sim::users::scanned_card(1000 + i));
    let mut raw = usersync::sim::users::generate("1000", 1, Numbering::V18, Default::default());
    for i in 2..=7 {
        raw = add_card(&raw, Numbering::V18, &card(i)).unwrap();
    }
    let eight = add_card(&raw, Numbering::V18, &card(8)).unwrap();
    sim.put_raw_on_device(src, raw).unwrap();
    sim.set_auto_card(false);
    sim.clear_rpc_log();
    let cfg = site.cfg.clone();
    let s = src.to_string();
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
            .args(["enroll", "--device", &s, "--user", "1000", "--overwrite"])
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    });
    eventually("the CLI waits for a card", || async {
        sim.rpc_log().iter().any(|r| r.method == "Scan")
    })
    .await;
    sim.put_raw_on_device(src, eight.clone()).unwrap();
    sim.present_card(src, usersync::sim::users::scanned_card(99));
    let out = common::within("the CLI ends", cli).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("operator sees:\n{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already has 8 cards, the most a user may hold; nothing changed")
            && err.contains("changed at the device while the card was awaited"),
        "{err}"
    );
    assert_eq!(sim.user_bytes(src, "1000"), Some(eight));
}

/// A record that GetList names but User.Get answers undecodable: the
/// header decodes (bytes fields: the last occurrence wins), the record
/// does not (a first header whose ID has the wrong wire type).
fn listed_but_unreadable(id: &str) -> Vec<u8> {
    let mut hdr = vec![0x0a, id.len() as u8];
    hdr.extend_from_slice(id.as_bytes());
    let mut raw = vec![0x0a, 0x02, 0x08, 0x01];
    raw.push(0x0a);
    raw.push(hdr.len() as u8);
    raw.extend_from_slice(&hdr);
    raw
}

/// Finding 2: with the daemon stopped, `reconcile --prune --yes` deletes
/// only users every source answers it does not hold. A source record that
/// cannot be read (so its header is missing from GetList) is not a
/// deletion; a source user whose record cannot be read is not skipped in
/// silence: the target is "not reconciled" (exit 1) and not recorded as
/// reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_source_record_is_never_pruned_nor_skipped() {
    let sim = common::sim_registered(Api::V1_8, 2).await;
    let ids = sim.device_ids();
    let (src, t) = (ids[0], ids[1]);
    let site = site(&sim);
    drop(usersync::store::Store::open(&site.dir.path().join("state")).unwrap());
    for d in [src, t] {
        sim.enroll_on_device(d, "1000").unwrap();
        sim.enroll_on_device(d, "victim").unwrap();
    }
    sim.enroll_on_device(t, "gone").unwrap();
    sim.with_model(|m| m.corrupt_user(src, "victim", vec![0x0a, 0x05, 0x0a]));
    sim.with_model(|m| m.corrupt_user(src, "ghost", listed_but_unreadable("ghost")));
    let victim = sim.user_bytes(t, "victim").unwrap();

    let (code, out, err) = run(&site.cfg, &["reconcile", "--dry-run", "--prune"]).await;
    eprintln!("operator sees (dry run):\n{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 extra (1 would be deleted, 1 kept)")
            && out.contains("  delete: gone\n")
            && out.contains(&format!(
                "victim (its record at source {src} cannot be read"
            )),
        "{out}"
    );

    sim.clear_rpc_log();
    let (code, out, err) = run(&site.cfg, &["reconcile", "--prune", "--yes"]).await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains(&format!(
            "group main target {t}: 0 users written, 1 deleted (1 extra user kept)"
        )),
        "{out}"
    );
    assert!(
        err.contains(&format!("not reconciled: group main target {t}"))
            && err.contains(&format!("ghost (its record at source {src} cannot be read"))
            && err.contains("1 extra user kept: victim"),
        "{err}"
    );
    assert_eq!(sim.user_bytes(t, "victim"), Some(victim), "kept");
    assert!(!sim.holds(t, "gone"), "confirmed absent: deleted");
    assert!(
        !sim.rpc_log().iter().any(|r| {
            r.method.starts_with("Delete") && r.user_ids.iter().any(|u| u == "victim")
        }),
        "no delete was ever sent for it"
    );
    let (_, out, _) = run(&site.cfg, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["targets"][0]["last_reconcile"].is_null(),
        "not recorded as reconciled: {v}"
    );
}

/// Finding 2: a prune the sources' lists cannot bear out is refused: a
/// source that lists no users (unless --allow-empty-source), a source
/// with a header that cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_is_refused_when_a_source_list_cannot_bear_it_out() {
    let sim = common::sim_registered(Api::V1_8, 2).await;
    let ids = sim.device_ids();
    let (src, t) = (ids[0], ids[1]);
    let site = site(&sim);
    sim.enroll_on_device(t, "stray").unwrap();

    // Not even requested from a running daemon.
    let daemon = Daemon::start(usersync::config::load(&site.cfg).unwrap());
    eventually("the daemon holds its lock", || async {
        sim.rpc_log().iter().any(|r| r.method == "SubscribeStatus")
    })
    .await;
    let (code, out, err) = run(&site.cfg, &["reconcile", "--prune", "--yes"]).await;
    eprintln!("operator sees (daemon running):\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("source {src} lists no users"))
            && err.contains("nothing requested from the running daemon"),
        "{err}"
    );
    daemon.stop().await;
    assert!(sim.holds(t, "stray"), "nothing deleted");

    let (code, out, err) = run(&site.cfg, &["reconcile", "--prune", "--yes"]).await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("source {src} lists no users"))
            && err.contains("--allow-empty-source"),
        "{err}"
    );
    assert!(sim.holds(t, "stray"), "nothing deleted");
    let (code, out, _) = run(&site.cfg, &["reconcile", "--dry-run", "--prune"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("1 extra (kept: prune refused)"), "{out}");
    let (code, out, err) = run(
        &site.cfg,
        &["reconcile", "--prune", "--yes", "--allow-empty-source"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 users written, 1 deleted"), "{out}");
    assert!(!sim.holds(t, "stray"));

    // A header GetList answers that cannot be read.
    sim.enroll_on_device(src, "1000").unwrap();
    sim.with_model(|m| m.corrupt_user(src, "bad", vec![0x0a, 0x02, 0x08, 0x01]));
    sim.enroll_on_device(t, "stray").unwrap();
    let (code, out, err) = run(
        &site.cfg,
        &["reconcile", "--prune", "--yes", "--allow-empty-source"],
    )
    .await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains(&format!("group main target {t}: 1 user written, 0 deleted")),
        "{out}"
    );
    assert!(
        err.contains(&format!(
            "source {src} lists 1 user header that cannot be read (those users are neither copied nor judged"
        )) && err.contains("refusing to prune group main"),
        "{err}"
    );
    assert!(sim.holds(t, "stray"), "nothing deleted");
    assert!(sim.holds(t, "1000"), "the rest is done");
}

/// Finding 6: a card added at a target says that the sources undo it; a
/// delete at a target whose source still holds the user is refused
/// without --force (the person would be locked out there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_at_a_target_say_what_undoes_them() {
    let sim = common::sim_registered(Api::V1_8, 2).await;
    let ids = sim.device_ids();
    let (src, t) = (ids[0], ids[1]);
    let site = site(&sim);
    let ts = t.to_string();
    for d in [src, t] {
        sim.enroll_on_device(d, "1000").unwrap();
    }
    sim.enroll_on_device(t, "stray").unwrap();

    let (code, out, err) = run(
        &site.cfg,
        &["enroll", "--device", &ts, "--user", "1000", "--overwrite"],
    )
    .await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("undone by the next change of the user at a source")
            && err.contains(&format!("usersync reconcile --group main --target {t}")),
        "{err}"
    );

    let (code, out, err) = run(&site.cfg, &["delete", "--device", &ts, "--user", "1000"]).await;
    eprintln!("operator sees:\n{out}{err}");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("source {src} of group main holds user 1000"))
            && err.contains("locks the person out")
            && err.contains(&format!("usersync delete --device {src} --user 1000"))
            && err.contains("--force"),
        "{err}"
    );
    assert!(sim.holds(t, "1000"), "nothing deleted");
    let (code, out, err) = run(
        &site.cfg,
        &["delete", "--device", &ts, "--user", "1000", "--force"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted user 1000"), "{out}");
    assert!(err.contains("locks the person out"), "{err}");
    assert!(!sim.holds(t, "1000"));
    // No source has it: deleted without --force.
    let (code, _, err) = run(&site.cfg, &["delete", "--device", &ts, "--user", "stray"]).await;
    assert_eq!(code, 0, "{err}");
}

/// Finding 4: import-config never replaces a checkpoint the state already
/// has (the daemon's own progress): it says so and seeds the others.
#[tokio::test]
async fn import_config_keeps_existing_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    usersync::sim::tls::generate(&["localhost"])
        .unwrap()
        .write_ca(dir.path())
        .unwrap();
    std::fs::write(dir.path().join("sync_config.json"), EXAMPLE).unwrap();
    let state = dir.path().join("state");
    let store = usersync::store::Store::open(&state).unwrap();
    store.set_checkpoint(939_504_224, 40_000).unwrap();
    drop(store);
    let out = import_cmd(dir.path(), "ca.crt", &[]).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("operator sees:\n{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("seeded 1 checkpoint")
            && stdout.contains("device 939504224 already has a checkpoint in")
            && stdout.contains("(event 40000): kept, its last_event_id 34667 not used"),
        "{stdout}"
    );
    let store = usersync::store::Store::open(&state).unwrap();
    assert_eq!(store.checkpoint(939_504_224).unwrap(), Some(40_000));
    assert_eq!(store.checkpoint(543_664_528).unwrap(), Some(5_984));
}

/// The offline reconcile batches as the daemon does: by users and by
/// bytes (`[sync] batch_bytes`), so big records (face images, photos) never
/// go in one call larger than the configured bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_reconcile_keeps_to_batch_bytes() {
    let sim = common::sim_registered(Api::V1_8, 2).await;
    let ids = sim.device_ids();
    let (src, t1) = (ids[0], ids[1]);
    let site = site(&sim);
    let text = std::fs::read_to_string(&site.cfg).unwrap();
    let limited = text.replace("[sync]\n", "[sync]\nbatch_bytes = 65536\n");
    assert_ne!(limited, text);
    std::fs::write(&site.cfg, limited).unwrap();
    let users: Vec<String> = (0..12).map(|i| format!("{}", 3000 + i)).collect();
    for u in &users {
        sim.enroll_on_device(src, u).unwrap();
    }
    let total: usize = users
        .iter()
        .map(|u| sim.user_bytes(src, u).unwrap().len())
        .sum();
    assert!(
        total > 2 * 65536,
        "records of {total} bytes need several calls"
    );
    sim.clear_rpc_log();

    let (code, out, err) = run(&site.cfg, &["reconcile"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("12 users written"), "{out}");
    let calls: Vec<_> = sim
        .rpc_log()
        .into_iter()
        .filter(|r| r.method == "EnrollMulti")
        .collect();
    assert!(calls.len() >= 3, "{} EnrollMulti calls", calls.len());
    for c in &calls {
        let bytes: usize = c
            .user_ids
            .iter()
            .map(|u| sim.user_bytes(src, u).unwrap().len())
            .sum();
        assert!(
            c.user_ids.len() == 1 || bytes <= 65536,
            "a call of {} users and {bytes} bytes",
            c.user_ids.len()
        );
    }
    for u in &users {
        assert!(sim.holds_exactly(t1, u, &sim.user_bytes(src, u).unwrap()));
    }
}
