//! A state directory that cannot be written: read-only, full, or past the
//! process's file size limit. Recorded state is never lost or corrupted,
//! and changes made meanwhile arrive once the condition is lifted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::daemon::{Daemon, Launcher, until};
use crate::report::{Case, Observed, Section};
use crate::site::{DELIVERY, Pair, Site};

/// After the condition is lifted, the daemon's retries back off (at most
/// 60 s for the event consumer, 30 s for an applier): a bound for a stuck
/// daemon, not a measurement.
const RECOVERY: Duration = Duration::from_secs(180);

/// Changes made while the state cannot be written: enough to need new
/// pages in the database and its WAL.
const CHANGES: usize = 30;

/// The daemon's `[sync]` table here: the defaults but a short tail check,
/// so nothing relies on the 2 s idle check the gateway cases use.
const SYNC: &str = "tail_check_delay_ms = 100";

pub fn cases() -> Vec<Case> {
    vec![
        Case::new(
            Section::Disk,
            "disk/read-only-at-start",
            "the state directory (holding the state of an earlier run) is read-only when the daemon \
             starts; a change is made at the source meanwhile",
            "exit 78 (systemd does not retry), `FILE: state.dir …: cannot create a file in it: \
             Read-only file system …`; state.db byte-identical; writable again, the next start \
             delivers the change",
            read_only_at_start,
        ),
        Case::new(
            Section::Disk,
            "disk/full-while-running",
            format!(
                "the state directory's filesystem (a tmpfs of 8 MiB) filled to the last byte while \
                 the daemon runs; {CHANGES} users enrolled at the source; then the filler removed"
            ),
            "keeps running (a full disk may pass, and the gateway keeps sending): ERROR `event \
             consumer cannot write its state; retrying from the stored checkpoints` (`database or \
             disk is full`); once space is free, every change made meanwhile arrives with no \
             restart and no later event; integrity_check ok, no checkpoint moved back",
            || full_while_running(Limit::Tmpfs),
        ),
        Case::new(
            Section::Disk,
            "disk/full-at-start",
            "the state directory's filesystem (a tmpfs of 8 MiB, holding the state of an earlier \
             run) is full when the daemon starts; a change is made at the source meanwhile; then \
             the filler removed",
            "exit 1 (systemd retries every 5 s): `state database …/state.db cannot be opened: disk \
             I/O error. The disk or the filesystem failed …, not the file, which is kept as it is …` \
             (SQLite cannot size its -shm file); once space is free, the next start delivers the \
             change; integrity_check ok, no checkpoint moved back",
            full_at_start,
        ),
        Case::new(
            Section::Disk,
            "disk/file-size-limit-while-running",
            format!(
                "`RLIMIT_FSIZE` of the running daemon set to the size of its largest state file \
                 (writes past it fail with EFBIG); {CHANGES} users enrolled at the source; then the \
                 limit lifted"
            ),
            "keeps running: ERROR `event consumer cannot write its state; retrying …` (`disk I/O \
             error`); once lifted, every change made meanwhile arrives with no restart and no \
             later event; integrity_check ok, no checkpoint moved back",
            || full_while_running(Limit::FileSize),
        ),
    ]
}

// ---- a private mount namespace ------------------------------------------------

/// A private mount namespace, kept alive by a `sleep` in it: mounts made
/// there are seen by the processes started in it and by no one else, and
/// vanish with it (dropped, or at the latest when the `sleep` ends, should
/// this program be killed).
struct MountNs {
    helper: std::process::Child,
    pid: u32,
}

impl MountNs {
    /// `Err` says why the machine does not allow one (no privilege, no
    /// `unshare`).
    async fn new() -> Result<MountNs> {
        let mut helper = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("unshare")?;
        let pid = helper.id();
        let own = std::fs::read_link("/proc/self/ns/mnt")?;
        // Until unshare has execed `sleep` in the new namespace, the PID is
        // unshare's in ours: mounting there would touch the machine.
        let entered = until(
            "unshare to enter a new mount namespace",
            Duration::from_secs(10),
            || {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
                let exited = matches!(helper.try_wait(), Ok(Some(_)));
                let other = ns.is_some_and(|n| n != own);
                async move {
                    if exited {
                        bail!("unshare exited");
                    }
                    Ok(comm.trim() == "sleep" && other)
                }
            },
        )
        .await;
        if let Err(e) = entered {
            let _ = helper.kill();
            let out = helper.wait_with_output().ok();
            let said = out
                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
                .unwrap_or_default();
            bail!("{e}: {said}");
        }
        Ok(MountNs { helper, pid })
    }

    /// Runs a command in the namespace.
    async fn run(&self, args: &[&str]) -> Result<()> {
        let out = tokio::process::Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("nsenter")?;
        ensure!(
            out.status.success(),
            "`{}` in the mount namespace: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn launcher(&self) -> Launcher {
        Launcher::direct().in_mount_namespace(self.pid)
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

// ---- checks shared by the cases ------------------------------------------------

/// The checkpoints and the integrity of a state database (opened on a
/// copy, so nothing here writes the daemon's files).
fn inspect(state: &Path) -> Result<(String, std::collections::BTreeMap<u32, u32>)> {
    let copy = tempfile::tempdir()?;
    for e in std::fs::read_dir(state)? {
        let p = e?.path();
        if let Some(name) = p.file_name().and_then(|n| n.to_str())
            && name.starts_with("state.db")
        {
            std::fs::copy(&p, copy.path().join(name))?;
        }
    }
    let c = rusqlite::Connection::open(copy.path().join("state.db"))?;
    let integrity: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    let mut q = c.prepare("SELECT device_id, event_id FROM checkpoint")?;
    let checkpoints = q
        .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok((integrity, checkpoints))
}

/// A first life of the daemon that records state, then stops.
async fn first_life(site: &Site, launcher: &Launcher, p: Pair) -> Result<()> {
    let mut d = Daemon::start(launcher, &site.config, &site.log)?;
    for u in ["u1", "u2"] {
        site.enroll(p.source, u)?;
    }
    site.wait_converged(DELIVERY).await?;
    let s = d.stop().await?;
    ensure!(s.success(), "the first life ended with {s}");
    Ok(())
}

// ---- read-only at start ---------------------------------------------------------

async fn read_only_at_start() -> Result<Observed> {
    let site = Site::start(1, |_| {}, SYNC).await?;
    let p = site.pair(0)?;
    let direct = Launcher::direct();
    first_life(&site, &direct, p).await?;
    site.enroll(p.source, "while-down")?;
    let db = site.state.join("state.db");
    let before = std::fs::read(&db)?;

    // Read-only: a read-only bind mount where the machine allows one;
    // else the directory's mode (which root ignores).
    let ns = MountNs::new().await;
    let (launcher, how, ns_guard) = match ns {
        Ok(ns) => {
            let s = path(&site.state)?;
            ns.run(&["mount", "--bind", s, s]).await?;
            ns.run(&["mount", "-o", "remount,bind,ro", s]).await?;
            (ns.launcher(), "read-only bind mount", Some(ns))
        }
        Err(e) if rustix::process::geteuid().is_root() => {
            return Ok(Observed::skipped(format!(
                "no private mount namespace ({e:#}), and root ignores a directory's mode"
            )));
        }
        Err(_) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&site.state, std::fs::Permissions::from_mode(0o500))?;
            (direct.clone(), "mode 0500", None)
        }
    };
    let mut d = Daemon::start(&launcher, &site.config, &site.dir.path().join("ro.log"))?;
    let status = d.wait_exit(Duration::from_secs(60)).await?;
    let log = d.log();
    drop(ns_guard);
    if how == "mode 0500" {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&site.state, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut o = Observed::default();
    o.exit = status
        .code()
        .map_or_else(|| status.to_string(), |c| c.to_string());
    o.message = log
        .find(0, |l| l.message.starts_with("usersync:"))
        .map_or_else(|| "(nothing)".into(), ToString::to_string);
    o.expect(status.code() == Some(78), format!("exited {status}"));
    o.expect(
        o.message.contains("state.dir") && o.message.contains(&site.state.display().to_string()),
        "the message does not name state.dir",
    );
    o.expect(!log.panicked(), "the daemon panicked");
    let kept = std::fs::read(&db)? == before;
    o.expect(kept, "state.db changed");

    let mut d = Daemon::start(&direct, &site.config, &site.dir.path().join("rw.log"))?;
    let delivered = site.wait_delivered(p, "while-down", DELIVERY).await;
    let s = d.stop().await?;
    o.expect(
        delivered.is_ok(),
        "writable again, the change made while down did not arrive",
    );
    o.expect(s.success(), format!("the writable start ended with {s}"));
    o.state = format!(
        "({how}) state.db byte-identical{}; writable again, the next start {} the change",
        if kept { "" } else { " NOT" },
        if delivered.is_ok() {
            "delivered"
        } else {
            "did NOT deliver"
        }
    );
    Ok(o.redact(site.dir.path()))
}

// ---- full while running -----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// A tmpfs with `size=`, filled by a file beside the state directory.
    Tmpfs,
    /// `RLIMIT_FSIZE` of the daemon process.
    FileSize,
}

async fn full_while_running(limit: Limit) -> Result<Observed> {
    let site = Site::start(1, |_| {}, SYNC).await?;
    let p = site.pair(0)?;
    // The tmpfs is mounted on `fs`, the state directory is inside it.
    let fs: PathBuf = site.dir.path().join("fs");
    let (launcher, ns) = match limit {
        Limit::Tmpfs => {
            let ns = match MountNs::new().await {
                Ok(ns) => ns,
                Err(e) => {
                    return Ok(Observed::skipped(format!(
                        "no private mount namespace to mount a tmpfs in ({e:#}); the file size \
                         limit case covers a full disk without privileges"
                    )));
                }
            };
            std::fs::create_dir_all(&fs)?;
            ns.run(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "size=8m,mode=0700",
                "tmpfs",
                path(&fs)?,
            ])
            .await?;
            site.write_config(&fs.join("state"), SYNC)?;
            (ns.launcher(), Some(ns))
        }
        Limit::FileSize => (Launcher::direct().ignoring_sigxfsz(), None),
    };
    let state = match limit {
        Limit::Tmpfs => fs.join("state"),
        Limit::FileSize => site.state.clone(),
    };
    let mut d = Daemon::start(&launcher, &site.config, &site.log)?;
    site.enroll(p.source, "warm")?;
    site.wait_delivered(p, "warm", DELIVERY).await?;
    // The state as it was before the fault (the tmpfs is seen from the
    // namespace only: copied out through it).
    let seen = site.dir.path().join("seen");
    let copy_out = |to: PathBuf| {
        let ns = &ns;
        let state = state.clone();
        async move {
            std::fs::create_dir_all(&to)?;
            match ns {
                Some(ns) => {
                    ns.run(&[
                        "sh",
                        "-c",
                        &format!("cp -a '{}'/. '{}'/", path(&state)?, path(&to)?),
                    ])
                    .await
                }
                None => {
                    for e in std::fs::read_dir(&state)? {
                        let p = e?.path();
                        if let Some(n) = p.file_name() {
                            std::fs::copy(&p, to.join(n))?;
                        }
                    }
                    Ok(())
                }
            }
        }
    };
    copy_out(seen.clone()).await?;
    let (_, before) = inspect(&seen)?;

    let mark = d.log().lines.len();
    match (limit, &ns) {
        (Limit::Tmpfs, Some(ns)) => {
            let ballast = fs.join("ballast");
            ns.run(&[
                "sh",
                "-c",
                &format!(
                    "dd if=/dev/zero of='{}' bs=64k 2>/dev/null; true",
                    path(&ballast)?
                ),
            ])
            .await?;
        }
        _ => {
            let biggest = std::fs::read_dir(&state)?
                .filter_map(|e| e.ok()?.metadata().ok().map(|m| m.len()))
                .max()
                .unwrap_or(0);
            let pid = rustix::process::Pid::from_raw(i32::try_from(d.pid())?)
                .context("the daemon's PID")?;
            rustix::process::prlimit(
                Some(pid),
                rustix::process::Resource::Fsize,
                rustix::process::Rlimit {
                    current: Some(biggest),
                    maximum: None,
                },
            )?;
        }
    }
    let users: Vec<String> = (0..CHANGES).map(|i| format!("full-{i:02}")).collect();
    for u in &users {
        site.enroll(p.source, u)?;
    }
    let mut o = Observed::default();
    // The daemon must notice (or the case tried nothing), and must have
    // failed to record the last change: it is lifted only then, so no
    // later event can show the daemon what it failed to record.
    let last = users.last().cloned().unwrap_or_default();
    let noticed = until(
        "the daemon to fail to record the last change",
        DELIVERY,
        || async {
            let log = d.log();
            let Some(i) = log.lines.iter().position(|l| l.says(&last)) else {
                return Ok(false);
            };
            Ok(log.lines.iter().skip(i).any(|l| l.level == "ERROR"))
        },
    )
    .await;
    o.expect(
        noticed.is_ok(),
        "the daemon logged no failed state write: the fault did not bite",
    );
    let log = d.log();
    o.message = log
        .find(mark, |l| l.level == "ERROR")
        .or_else(|| log.problems(mark).first().copied())
        .map_or_else(|| "(nothing)".into(), ToString::to_string);
    let alive = d.exited()?.is_none();
    o.expect(
        alive,
        "the daemon exited while the state could not be written",
    );

    // Lift it.
    match (limit, &ns) {
        (Limit::Tmpfs, Some(ns)) => {
            ns.run(&["rm", "-f", path(&fs.join("ballast"))?]).await?;
        }
        _ => {
            if alive {
                let pid = rustix::process::Pid::from_raw(i32::try_from(d.pid())?)
                    .context("the daemon's PID")?;
                rustix::process::prlimit(
                    Some(pid),
                    rustix::process::Resource::Fsize,
                    rustix::process::Rlimit {
                        current: None,
                        maximum: None,
                    },
                )?;
            }
        }
    }
    let all = until(
        "every change made meanwhile at the target",
        RECOVERY,
        || async { Ok(users.iter().all(|u| site.delivered(p, u))) },
    )
    .await;
    o.expect(
        all.is_ok(),
        "changes made while the state could not be written did not all arrive",
    );
    site.enroll(p.source, "after")?;
    let after = site.wait_delivered(p, "after", DELIVERY).await;
    o.expect(after.is_ok(), "a change after the fault did not arrive");
    let status = d.stop().await?;
    o.expect(status.success(), format!("stopped with {status}"));
    o.expect(!d.log().panicked(), "the daemon panicked");
    o.exit = format!(
        "{}; {} after SIGTERM",
        if alive { "kept running" } else { "EXITED" },
        status
            .code()
            .map_or_else(|| status.to_string(), |c| c.to_string())
    );

    let end = site.dir.path().join("end");
    copy_out(end.clone()).await?;
    let (integrity, now) = inspect(&end)?;
    o.expect(integrity == "ok", format!("integrity_check: {integrity}"));
    let moved_back: Vec<String> = before
        .iter()
        .filter(|(dev, cp)| now.get(dev).is_none_or(|n| n < cp))
        .map(|(dev, cp)| format!("{dev}: {cp} → {:?}", now.get(dev)))
        .collect();
    o.expect(
        moved_back.is_empty(),
        format!("checkpoints moved back: {moved_back:?}"),
    );
    o.state = format!(
        "{} of {CHANGES} changes made meanwhile delivered, then `after`{}; integrity_check {integrity}; \
         checkpoints {}",
        users.iter().filter(|u| site.delivered(p, u)).count(),
        if after.is_ok() { "" } else { " NOT" },
        if moved_back.is_empty() {
            "kept or advanced".to_owned()
        } else {
            format!("MOVED BACK {moved_back:?}")
        }
    );
    drop(ns);
    Ok(o.redact(site.dir.path()))
}

// ---- full at start ------------------------------------------------------------------

async fn full_at_start() -> Result<Observed> {
    let site = Site::start(1, |_| {}, SYNC).await?;
    let p = site.pair(0)?;
    let ns = match MountNs::new().await {
        Ok(ns) => ns,
        Err(e) => {
            return Ok(Observed::skipped(format!(
                "no private mount namespace to mount a tmpfs in ({e:#})"
            )));
        }
    };
    let fs = site.dir.path().join("fs");
    let state = fs.join("state");
    std::fs::create_dir_all(&fs)?;
    ns.run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=8m,mode=0700",
        "tmpfs",
        path(&fs)?,
    ])
    .await?;
    site.write_config(&state, SYNC)?;
    let launcher = ns.launcher();
    first_life(&site, &launcher, p).await?;
    let copy_out = |to: PathBuf| {
        let ns = &ns;
        let state = state.clone();
        async move {
            std::fs::create_dir_all(&to)?;
            ns.run(&[
                "sh",
                "-c",
                &format!("cp -a '{}'/. '{}'/", path(&state)?, path(&to)?),
            ])
            .await
        }
    };
    let seen = site.dir.path().join("seen");
    copy_out(seen.clone()).await?;
    let (_, before) = inspect(&seen)?;
    let ballast = fs.join("ballast");
    ns.run(&[
        "sh",
        "-c",
        &format!(
            "dd if=/dev/zero of='{}' bs=64k 2>/dev/null; true",
            path(&ballast)?
        ),
    ])
    .await?;
    site.enroll(p.source, "while-full")?;

    let mut o = Observed::default();
    let mut d = Daemon::start(&launcher, &site.config, &site.dir.path().join("full.log"))?;
    let status = d.wait_exit(Duration::from_secs(60)).await?;
    let log = d.log();
    o.exit = status
        .code()
        .map_or_else(|| status.to_string(), |c| c.to_string());
    o.message = log
        .find(0, |l| l.message.starts_with("usersync:"))
        .map_or_else(|| "(nothing)".into(), ToString::to_string);
    o.expect(status.code() == Some(1), format!("exited {status}"));
    o.expect(
        o.message.contains("cannot be opened") && o.message.contains("not the file"),
        "the message does not say the disk failed",
    );
    o.expect(
        !o.message.contains("aside"),
        "the message says to move a good file aside",
    );
    o.expect(!log.panicked(), "the daemon panicked");

    // Space freed; systemd's next try.
    ns.run(&["rm", "-f", path(&ballast)?]).await?;
    let mut d = Daemon::start(&launcher, &site.config, &site.dir.path().join("freed.log"))?;
    let arrived = site.wait_delivered(p, "while-full", DELIVERY).await;
    o.expect(arrived.is_ok(), "the change made while full did not arrive");
    let status = d.stop().await?;
    o.expect(
        status.success(),
        format!("the next start stopped with {status}"),
    );
    let end = site.dir.path().join("end");
    copy_out(end.clone()).await?;
    let (integrity, now) = inspect(&end)?;
    o.expect(integrity == "ok", format!("integrity_check: {integrity}"));
    let moved_back = before
        .iter()
        .any(|(dev, cp)| now.get(dev).is_none_or(|n| n < cp));
    o.expect(!moved_back, "a checkpoint moved back");
    o.state = format!(
        "the change made while full {}; integrity_check {integrity}; checkpoints {}",
        if arrived.is_ok() {
            "delivered"
        } else {
            "NOT delivered"
        },
        if moved_back {
            "MOVED BACK"
        } else {
            "kept or advanced"
        }
    );
    drop(ns);
    Ok(o.redact(site.dir.path()))
}
