//! The real binary under a fake service manager: a `NOTIFY_SOCKET`
//! datagram listener receives READY, STATUS, WATCHDOG, RELOADING (with
//! MONOTONIC_USEC) and STOPPING; SIGHUP reloads a config that adds a target
//! without dropping the others; an invalid reload is rejected and the
//! running config stays; metrics are served. The daemon is not dumpable
//! and warns at start about what its settings expose; a metrics port in
//! use stops it at start. A second SIGTERM abandons the shutdown's grace
//! period.

mod common;

use std::process::Stdio;

use common::{DEADLINE, config_text, eventually, sim, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixDatagram;
use tokio::process::Command;
use usersync::wire::Api;

struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    /// Waits for a datagram containing `needle`; returns it.
    async fn expect(&mut self, needle: &str) -> String {
        let mut buf = vec![0u8; 4096];
        within(&format!("notification {needle:?}"), async {
            loop {
                let n = self.socket.recv(&mut buf).await.expect("recv");
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.contains(needle) {
                    return msg;
                }
            }
        })
        .await
    }
}

fn hup(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

async fn scrape(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reload_watchdog_and_metrics() {
    let sim = sim(Api::V1_8, 3).await;
    let ids = sim.device_ids();
    let (src, t1, t2) = (ids[0], ids[1], ids[2]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let group = |targets: &str| {
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[[group]]\nname = \"main\"\nsources = [{src}]\ntargets = [{targets}]\n"
        )
    };
    let cfg_path = dir.path().join("usersync.toml");
    std::fs::write(
        &cfg_path,
        config_text(&sim, dir.path(), &group(&t1.to_string())),
    )
    .unwrap();

    let notify_path = dir.path().join("notify.sock");
    let mut notes = Notifications {
        socket: UnixDatagram::bind(&notify_path).unwrap(),
        seen: Vec::new(),
    };
    let stderr_path = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(["run", "--log-target", "journald", "--config"])
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();

    // READY without waiting for anything; then STATUS and WATCHDOG.
    notes.expect("READY=1").await;
    let status = notes.expect("STATUS=").await;
    assert!(
        status.contains("devices live") || status.contains("gateway"),
        "{status}"
    );
    notes.expect("WATCHDOG=1").await;
    notes.expect("gateway ok").await;

    sim.enroll_on_device(src, "u1").unwrap();
    eventually("u1 reaches the first target", || async {
        sim.users(t1).contains_key("u1")
    })
    .await;
    assert!(sim.users(t2).is_empty(), "t2 is not configured yet");

    // Metrics are served and count what happened (the count follows the
    // write to the device a moment later: wait for it).
    let applied = format!("usersync_changes_applied_total{{group=\"main\",target=\"{t1}\"}}");
    eventually("the applied count is exported", || {
        let applied = applied.clone();
        async move { scrape(port).await.contains(&applied) }
    })
    .await;
    let m = scrape(port).await;
    assert!(m.contains("200 OK"), "{m}");
    assert!(
        m.contains(&format!(
            "usersync_device_phase{{device=\"{src}\",phase=\"live\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "usersync_changes_applied_total{{group=\"main\",target=\"{t1}\"}}"
        )),
        "{m}"
    );
    assert!(m.contains("usersync_gateway_up 1"), "{m}");

    // Reload: add the second target. The first one is not dropped.
    sim.clear_rpc_log();
    std::fs::write(
        &cfg_path,
        config_text(&sim, dir.path(), &group(&format!("{t1}, {t2}"))),
    )
    .unwrap();
    hup(pid, "-HUP");
    let reloading = notes.expect("RELOADING=1").await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notes.expect("READY=1").await;
    eventually("the added target is reconciled", || async {
        sim.users(t2).contains_key("u1")
    })
    .await;
    sim.enroll_on_device(src, "u2").unwrap();
    eventually("u2 on both targets", || async {
        sim.users(t1).contains_key("u2") && sim.users(t2).contains_key("u2")
    })
    .await;
    let log = sim.rpc_log();
    assert!(
        !log.iter().any(|r| r.method == "DeleteAsyncConnection"),
        "unaffected devices were dropped: {log:?}"
    );
    assert!(
        !log.iter().any(|r| r.method == "SubscribeRealtimeLog"),
        "the reload must not resubscribe"
    );

    // An invalid reload is rejected; the daemon keeps going.
    std::fs::write(&cfg_path, "[gateway]\naddress = 1\n").unwrap();
    hup(pid, "-HUP");
    notes.expect("RELOADING=1").await;
    notes.expect("READY=1").await;
    sim.enroll_on_device(src, "u3").unwrap();
    eventually("still syncing after a rejected reload", || async {
        sim.users(t2).contains_key("u3")
    })
    .await;

    hup(pid, "-TERM");
    notes.expect("STOPPING=1").await;
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success(), "{status}");

    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    if !std::path::Path::new("/run/systemd/journal/socket").exists() {
        // No journal here: the daemon said so and logged to stderr.
        assert!(stderr.contains("journald unavailable"), "{stderr}");
        assert!(stderr.contains("reload rejected"), "{stderr}");
    }
    let watchdogs = notes
        .seen
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    eprintln!(
        "received {} notifications, {watchdogs} watchdog pings",
        notes.seen.len()
    );
}

#[tokio::test]
async fn json_log_lines_for_collectors() {
    let sim = sim(Api::V1_8, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("usersync.toml");
    std::fs::write(
        &cfg_path,
        config_text(&sim, dir.path(), &common::main_group(&sim)),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args([
            "run",
            "--log-target",
            "stderr",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    use tokio::io::AsyncBufReadExt;
    let started = within("the first log line", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("a log line");
            if line.contains("usersync started") {
                return line;
            }
        }
    })
    .await;
    let v: serde_json::Value =
        serde_json::from_str(&started).unwrap_or_else(|e| panic!("{e}: {started}"));
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["message"], "usersync started");
    assert_eq!(v["devices"], 2);
    hup(child.id().unwrap(), "-TERM");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success());
}

/// The owner of a process's /proc files: root's for a non-dumpable
/// process, its own otherwise (the kernel's `task_dump_owner`).
fn proc_owner(pid: u32) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/proc/{pid}/status");
    let owner = std::fs::metadata(&path).unwrap().uid();
    let status = std::fs::read_to_string(&path).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no Uid: in {status}"));
    (uid, owner)
}

/// Core files would hold the user records in flight (templates, PINs):
/// `usersync run` makes itself non-dumpable at once. Run as a user other
/// than root (nobody, when the tests run as root), its /proc files then
/// belong to root, where a dumpable process's belong to its user. At
/// start it warns about plaintext to the gateway and about metrics served
/// beyond loopback; a gateway that is down is no reason to stop.
#[tokio::test]
async fn the_daemon_is_not_dumpable_and_warns_about_what_it_exposes() {
    use std::os::unix::fs::PermissionsExt;
    let root = rustix::process::geteuid().is_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    if root {
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    }
    let cfg_path = dir.path().join("usersync.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[gateway]\naddress = \"127.0.0.1:1\"\ntls = false\n[state]\ndir = \"{}\"\n\
             [metrics]\nlisten = \"0.0.0.0:0\"\n",
            state.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_operator = |cmd: &mut Command| {
        if root {
            cmd.uid(65534).gid(65534);
        }
    };

    // The same user's ordinary process, for comparison.
    let mut control = Command::new("sleep");
    control.arg("30").kill_on_drop(true);
    as_operator(&mut control);
    let mut control = control.spawn().unwrap();
    let (uid, owner) = proc_owner(control.id().unwrap());
    assert_ne!(uid, 0, "the comparison runs as a user other than root");
    assert_eq!(owner, uid, "a dumpable process owns its /proc files");
    control.kill().await.unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_usersync"));
    cmd.args(["run", "--log-target", "stderr", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    as_operator(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    use tokio::io::AsyncBufReadExt;
    let mut seen = Vec::new();
    within("the start-up warnings", async {
        while !seen.iter().any(|l: &String| l.contains("usersync started")) {
            let line = lines.next_line().await.unwrap().expect("a log line");
            seen.push(line);
        }
    })
    .await;
    let warned = |needle: &str| {
        seen.iter()
            .any(|l| l.contains("WARN") && l.contains(needle))
    };
    assert!(
        warned("gateway.tls = false") && warned("plaintext"),
        "{seen:#?}"
    );
    assert!(
        warned("metrics.listen = \"0.0.0.0:0\" is not a loopback address"),
        "{seen:#?}"
    );

    let pid = child.id().unwrap();
    let (uid, owner) = proc_owner(pid);
    assert_ne!(uid, 0);
    assert_eq!(
        owner, 0,
        "usersync run is dumpable (its /proc files are its user's)"
    );

    hup(pid, "-TERM");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// A metrics address already in use is an error at start (exit 1, the
/// port named), not one log line and a daemon serving no metrics.
#[tokio::test]
async fn a_metrics_port_in_use_is_an_error_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("usersync.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[gateway]\naddress = \"127.0.0.1:1\"\ntls = false\n[state]\ndir = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out = within(
        "usersync run gives up",
        Command::new(env!("CARGO_BIN_EXE_usersync"))
            .args(["run", "--log-target", "stderr", "--config"])
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "metrics.listen = \"127.0.0.1:{port}\": cannot listen: port {port} is already in use"
        )),
        "{stderr}"
    );
    drop(taken);
}

/// SIGTERM stops in order: in-flight work gets the grace period
/// (`SHUTDOWN_GRACE`) to finish. A second SIGTERM abandons it at once,
/// here with a write to a target that answers nothing still in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_abandons_the_grace_period() {
    let sim = sim(Api::V1_8, 2).await;
    let ids = sim.device_ids();
    let (src, target) = (ids[0], ids[1]);
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("usersync.toml");
    // A call deadline beyond the grace period: the held write outlasts it.
    let text = config_text(&sim, dir.path(), &common::main_group(&sim));
    let longer = text.replace("call_timeout_secs = 5", "call_timeout_secs = 60");
    assert_ne!(text, longer, "the test sets the call deadline");
    std::fs::write(&cfg_path, longer).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let mut notes = Notifications {
        socket: UnixDatagram::bind(&notify_path).unwrap(),
        seen: Vec::new(),
    };
    let stderr_path = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(["run", "--log-target", "stderr", "--config"])
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    notes.expect("2/2 devices live").await;

    // The target answers nothing from now on: the write of a new user to
    // it stays in flight.
    sim.hold_device(target, true);
    sim.enroll_on_device(src, "u1").unwrap();
    eventually("the write to the target is in flight", || async {
        sim.held_calls(target) > 0
            && sim
                .rpc_log()
                .iter()
                .any(|r| r.method == "EnrollMulti" && r.device_ids.contains(&target))
    })
    .await;

    hup(pid, "-TERM");
    let first = std::time::Instant::now();
    notes.expect("STOPPING=1").await;
    hup(pid, "-TERM");
    let status = within("the daemon stops", child.wait()).await.unwrap();
    let took = first.elapsed();
    assert!(status.success(), "{status}");
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        stderr.contains("second signal: abandoning in-flight work"),
        "{stderr}"
    );
    assert!(!stderr.contains("tasks still busy"), "{stderr}");
    assert!(
        took < usersync::supervisor::SHUTDOWN_GRACE,
        "stopped after {took:?}, not at once"
    );
    sim.hold_device(target, false);
}
