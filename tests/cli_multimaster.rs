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

async fn sim(devices: u32) -> Simulator {
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
