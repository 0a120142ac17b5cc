//! The operator commands on multi-master groups, run as the real binary
//! against the simulator and a daemon in this process: `status` shows a
//! group's members (echo detection in force, clock skew), its own writes
//! expected and its conflicts; `reconcile` of a multi-master group (or of
//! one member) is a request the running daemon's member reconcile serves,
//! is refused with the daemon stopped, has no dry run, and mixed
//! selections handle each kind of group as its own. Every wait is bounded;
//! nothing is timed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, config_text, eventually};
use usersync::sim::users::{UserProfile, generate};
use usersync::sim::{SimOptions, Simulator};

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

/// The configuration file of a site with `groups`.
fn site(sim: &Simulator, dir: &Path, groups: &str) -> PathBuf {
    let cfg = dir.join("usersync.toml");
    std::fs::write(&cfg, config_text(sim, dir, groups)).unwrap();
    cfg
}

fn desks(members: &[u32], extra: &str) -> String {
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

/// Runs `usersync ARGS --config CFG` on the blocking pool (the simulator
/// and the daemon run on this test's runtime); (exit code, stdout, stderr).
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The member `device` of the first multi-master group in a status.
fn member(v: &serde_json::Value, device: u32) -> &serde_json::Value {
    v["multi_master"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["device"] == device)
        .unwrap_or_else(|| panic!("no member {device}: {v}"))
}

/// Waits until the daemon has read every one of `devices`' logs to its
/// end, as status shows it. (Not through a `Store` opened here: opening
/// the state in the daemon's process drops the daemon's locks on it.)
async fn quiet(cfg: &Path, sim: &Simulator, devices: &[u32]) {
    status_until(cfg, "every log read to its end", |v| {
        devices.iter().all(|d| {
            let row = v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["id"] == *d)
                .unwrap();
            row["checkpoint"].as_u64() == sim.newest_event_id(*d).map(u64::from)
        })
    })
    .await;
}

/// Six users held in two versions before the daemon first runs are
/// conflicts: status counts them, lists the first five in text and every
/// one in JSON (IDs, device IDs and sizes, never a record); a member that
/// reported `changedOnDevice` is judged by the flag, the others by own
/// writes; a member's clock two minutes ahead is shown, over the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_conflicts_echo_detection_and_clock_skew() {
    let sim = sim(3).await;
    let m = sim.device_ids();
    let (a, b, c) = (m[0], m[1], m[2]);
    for i in 0..6 {
        let user = format!("x{i}");
        sim.put_raw_on_device(a, record(&sim, &user, 1)).unwrap();
        sim.put_raw_on_device(b, record(&sim, &user, 2)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(&sim, dir.path(), &desks(&m, "max_clock_skew_secs = 10"));
    let daemon = Daemon::start(usersync::config::load(&cfg).unwrap());

    let v = status_until(&cfg, "six conflicts", |v| {
        v["multi_master"][0]["conflict_count"] == 6
    })
    .await;
    let g = &v["multi_master"][0];
    assert_eq!(g["group"], "desks");
    assert_eq!(g["echo_detection"], "observe");
    assert_eq!(g["max_clock_skew_secs"], 10);
    assert!(g["started_at"].is_string(), "{g}");
    assert!(g["own_writes_expected"].is_u64(), "{g}");
    let conflicts = g["conflicts"].as_array().unwrap();
    assert_eq!(
        conflicts
            .iter()
            .map(|c| c["user_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["x0", "x1", "x2", "x3", "x4", "x5"],
        "every one in JSON"
    );
    let detail = conflicts[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("[{a}] hold one version ("))
            && detail.contains(&format!("[{b}] hold one version ("))
            && detail.contains(" bytes)"),
        "device IDs and sizes: {detail}"
    );
    assert!(conflicts[0]["found_at"].is_string());
    // The first start's reconcile is recorded for every member.
    let last = &member(&v, c)["last_reconcile"];
    assert!(
        last["reason"].as_str().unwrap().contains("new member") && last["missing"] == 0,
        "conflicts are left alone, not copied to C: {last}"
    );

    // B changes a user at the device (the flag set), its clock two
    // minutes ahead: it is judged by the flag from now on, and its clock
    // is measured from the event.
    sim.set_clock_offset(b, 120);
    let u = record(&sim, "u", 0);
    sim.put_raw_on_device(b, u.clone()).unwrap();
    eventually("u reaches every member", || async {
        m.iter()
            .all(|d| sim.user_bytes(*d, "u").as_deref() == Some(&u[..]))
    })
    .await;
    let v = status_until(&cfg, "B's clock measured, over the bound", |v| {
        member(v, b)["clock"]["over_bound"] == true
    })
    .await;
    let skew = member(&v, b)["clock"]["skew_secs"].as_i64().unwrap();
    assert!((100..=140).contains(&skew), "{skew}");
    assert_eq!(member(&v, b)["echo_in_force"], "changed-on-device");
    assert!(member(&v, b)["echo_flag_seen_at"].is_string(), "{v}");
    // C only ever received the daemon's writes (no flag).
    assert_eq!(member(&v, c)["echo_in_force"], "own-writes");
    assert!(member(&v, c)["echo_flag_seen_at"].is_null(), "{v}");
    assert!(member(&v, c)["journal_seq"].is_u64(), "{v}");
    assert_eq!(
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["role"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["member"; 3]
    );

    let (code, text, err) = run(&cfg, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("multi-master group desks (max clock skew 10 s)\n")
            && text.contains(
                "echo detection: each member on own writes until it reports changedOnDevice"
            ),
        "{text}"
    );
    assert!(text.contains(&format!("{a:<12} member  live")), "{text}");
    let row = |d: u32| {
        text.lines()
            .find(|l| l.starts_with(&format!("{d:<12} ")) && !l.contains(" member "))
            .unwrap_or_else(|| panic!("no member row for {d}: {text}"))
    };
    assert!(
        row(b).contains("changed-on-device") && row(b).contains(" s ahead, OVER"),
        "{text}"
    );
    assert!(row(c).contains("own-writes"), "{text}");
    assert!(
        text.contains(&format!("— new member ({a} {b} {c}): nothing queued\n")),
        "one pass, every member new, conflicts left alone: {text}"
    );
    assert!(
        text.contains(&format!(
            "clock OVER max_clock_skew_secs (10 s) at {b}: set the device's clock"
        )),
        "{text}"
    );
    assert!(
        text.contains("conflicts: 6 users that members hold in different versions"),
        "{text}"
    );
    assert!(
        text.contains("    user x4: ") && !text.contains("user x5:"),
        "the first five: {text}"
    );
    assert!(
        text.contains("… and 1 more: `usersync status --json` lists every one"),
        "{text}"
    );
    assert!(
        text.contains("group desks diverged: 6 users differ"),
        "{text}"
    );

    // Stopped: the same, as last recorded.
    daemon.stop().await;
    let (code, text, err) = run(&cfg, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(
            "multi-master group desks (max clock skew 10 s): as last recorded (the daemon is not running)"
        ) && text.contains("conflicts: 6 users"),
        "{text}"
    );
}

/// A one-way group "main" (source, target) and a multi-master group
/// "desks" judged by the flag (so a write through the SDK at a member is
/// no change, and only a reconcile copies it): devices 0 → 1, and 2, 3.
fn mixed(sim: &Simulator, dir: &Path) -> PathBuf {
    let d = sim.device_ids();
    site(
        sim,
        dir,
        &format!(
            "[[group]]\nname = \"main\"\nsources = [{}]\ntargets = [{}]\n{}",
            d[0],
            d[1],
            desks(&d[2..], "echo_detection = \"changed-on-device\"")
        ),
    )
}

/// With the daemon stopped, a reconcile of a multi-master group (or of
/// one member) is refused, saying that the daemon runs it and how to have
/// it run; --prune and a dry run of it are refused too; a dry run of every
/// group plans the one-way target and says the members are not planned;
/// a reconcile of every group does the one-way target here and reports
/// the multi-master group (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_master_reconcile_is_refused_with_the_daemon_stopped() {
    let mut opts = SimOptions::with_devices(4);
    opts.reconnect_delay = Duration::from_millis(20);
    // No daemon registers the devices here.
    opts.model.preconnect = true;
    let sim = common::sim_with(opts).await;
    let d = sim.device_ids();
    let (src, t, m1, m2) = (d[0], d[1], d[2], d[3]);
    sim.enroll_on_device(src, "1000").unwrap();
    sim.put_raw_on_device(m1, record(&sim, "m", 0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = mixed(&sim, dir.path());

    let member = m2.to_string();
    for (args, again) in [
        (
            vec!["reconcile", "--group", "desks"],
            "`usersync reconcile --group desks`".to_owned(),
        ),
        (
            vec!["reconcile", "--target", &member],
            format!("`usersync reconcile --group desks --target {m2}`"),
        ),
    ] {
        let (code, out, err) = run(&cfg, &args).await;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(
            err.contains(
                "group desks is multi-master: a member reconcile decides by the journal's history"
            ) && err.contains("so it runs in the daemon — and the daemon is not running")
                && err.contains("Start it (`sudo systemctl start usersync`")
                && err.contains(&format!("then run {again} again")),
            "{args:?}: {err}"
        );
        assert!(out.is_empty(), "{out}");
    }
    let (code, _, err) = run(&cfg, &["reconcile", "--group", "desks", "--prune"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("--prune does not apply to multi-master group desks"),
        "{err}"
    );
    let (code, out, err) = run(&cfg, &["reconcile", "--group", "desks", "--dry-run"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("no plan: group desks is multi-master")
            && err.contains("`usersync reconcile --group desks` asks the running daemon"),
        "{err}"
    );
    assert!(out.is_empty(), "no empty plan printed: {out}");

    // Every group: the one-way target is planned, the members are not.
    let (code, out, err) = run(&cfg, &["reconcile", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "group main target {t}: 1 missing, 0 different, 0 extra"
        )) && out.contains(&format!(
            "group desks (multi-master, members {m1} {m2}): not planned: a multi-master reconcile is decided in \
             the daemon"
        )),
        "{out}"
    );
    assert!(!out.contains(&format!("target {m2}")), "{out}");
    let (code, out, _) = run(&cfg, &["reconcile", "--dry-run", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["targets"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["targets"][0]["target"], t);
    assert_eq!(v["not_planned"][0]["group"], "desks");
    assert_eq!(v["not_planned"][0]["members"], serde_json::json!([m1, m2]));

    // Every group: the one-way target is reconciled here; the members
    // are left to the daemon, and reported.
    let (code, out, err) = run(&cfg, &["reconcile"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("group main target {t}: 1 user written")),
        "{out}"
    );
    assert!(
        err.contains("group desks is multi-master")
            && err.contains("then run `usersync reconcile --group desks` again"),
        "{err}"
    );
    assert_eq!(sim.users(t), sim.users(src));
    assert!(!sim.holds(m2, "m"), "nothing written to the members");
}

/// With the daemon running, a reconcile of one member is a request the
/// daemon's member reconcile serves: a user written at a member through
/// the SDK (no change when judged by the flag) reaches the other member
/// only then; status shows the result. A reconcile of every group
/// requests the one-way target and the members, and the daemon serves
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_master_reconcile_is_served_by_the_running_daemon() {
    let sim = sim(4).await;
    let d = sim.device_ids();
    let (src, t, m1, m2) = (d[0], d[1], d[2], d[3]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = mixed(&sim, dir.path());
    let daemon = Daemon::start(usersync::config::load(&cfg).unwrap());
    status_until(&cfg, "the first start's member reconcile done", |v| {
        [m1, m2].iter().all(|m| {
            member(v, *m)["last_reconcile"].is_object() && member(v, *m)["reconcile"].is_null()
        })
    })
    .await;

    // Written through the SDK at m2: judged by the flag, no change.
    let sdk = record(&sim, "sdk", 0);
    common::client(&sim)
        .user_enroll(m2, vec![sdk.clone()], true)
        .await
        .unwrap();
    quiet(&cfg, &sim, &[m2]).await;
    assert!(!sim.holds(m1, "sdk"), "not a change: not copied");

    let (code, out, err) = run(&cfg, &["reconcile", "--target", &m2.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "reconcile of multi-master group desks requested from the running daemon (member {m2}); it starts \
             within 1 s, once every member is live, and one pass covers every member of the group"
        )),
        "{out}"
    );
    eventually("the member reconcile copies the user", || async {
        sim.user_bytes(m1, "sdk").as_deref() == Some(&sdk[..])
    })
    .await;
    let v = status_until(&cfg, "the operator's reconcile recorded", |v| {
        member(v, m1)["last_reconcile"]["reason"] == format!("requested by the operator ({m2})")
    })
    .await;
    assert_eq!(member(&v, m1)["last_reconcile"]["missing"], 1, "{v}");
    assert_eq!(member(&v, m2)["last_reconcile"]["missing"], 0, "{v}");
    let (_, text, _) = run(&cfg, &["status"]).await;
    assert!(
        text.contains(&format!(
            "— requested by the operator ({m2}): {m1} 1 missing, 0 different, 0 deleted\n"
        )),
        "{text}"
    );

    // Every group, each kind as its own: the target lost a user, a member
    // got one through the SDK.
    sim.enroll_on_device(src, "1000").unwrap();
    common::wait_converged(&sim, src, &[t]).await;
    sim.delete_on_device(t, "1000").unwrap();
    let sdk2 = record(&sim, "sdk2", 0);
    common::client(&sim)
        .user_enroll(m1, vec![sdk2.clone()], true)
        .await
        .unwrap();
    quiet(&cfg, &sim, &[t, m1]).await;
    assert!(!sim.holds(m2, "sdk2") && !sim.holds(t, "1000"));
    let (code, out, err) = run(&cfg, &["reconcile"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "reconcile of 1 target requested from the running daemon (group main: {t})"
        )) && out.contains(&format!(
            "reconcile of multi-master group desks requested from the running daemon (members {m1} {m2})"
        )),
        "{out}"
    );
    eventually("both reconciles done", || async {
        sim.holds(t, "1000") && sim.user_bytes(m2, "sdk2").as_deref() == Some(&sdk2[..])
    })
    .await;
    let v = status_until(&cfg, "both results recorded", |v| {
        v["targets"][0]["last_reconcile"]["reason"] == "requested by the operator"
            && member(v, m2)["last_reconcile"]["reason"]
                == format!("requested by the operator ({m1} {m2})")
    })
    .await;
    assert_eq!(v["targets"][0]["last_reconcile"]["missing"], 1, "{v}");
    assert_eq!(member(&v, m2)["last_reconcile"]["missing"], 1, "{v}");
    daemon.stop().await;
}
