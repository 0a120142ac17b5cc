//! A damaged or foreign state database: the daemon stops before it does
//! anything, names the file and what to do, and never touches it.

use std::time::Duration;

use anyhow::{Result, ensure};
use rand::{RngCore, SeedableRng};

use crate::daemon::{Daemon, Launcher};
use crate::report::{Case, Observed, Section};
use crate::site::{DELIVERY, Site};

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// 4 KiB of seeded random bytes over the page in the middle.
    Corrupt,
    /// The second half cut off.
    Truncate,
    /// `PRAGMA user_version` past what this usersync knows.
    Newer,
}

/// The schema version written into the database by [`Damage::Newer`].
const NEWER: i64 = 99;

pub fn cases() -> Vec<Case> {
    let then = "the file byte-identical; moved aside as the message says, the next start rebuilds \
                the state (first-sight search, reconcile) and delivers a change made while it was \
                down";
    vec![
        Case::new(
            Section::State,
            "state/corrupted",
            "4 KiB of random bytes (seeded) over the page in the middle of `state.db`",
            format!(
                "exit 1 (not 78: systemd retries, and starts cleanly once the file is moved), \
                 `state database …/state.db cannot be used: …; move it aside …`; {then}"
            ),
            || damaged(Damage::Corrupt),
        ),
        Case::new(
            Section::State,
            "state/truncated",
            "`state.db` cut to half its length",
            format!("exit 1, `state database …/state.db cannot be used: …`; {then}"),
            || damaged(Damage::Truncate),
        ),
        Case::new(
            Section::State,
            "state/newer-schema",
            format!(
                "`PRAGMA user_version = {NEWER}` in `state.db` (this usersync knows fewer migrations)"
            ),
            format!(
                "exit 1, `state database …/state.db was written by a newer usersync (schema version \
                 {NEWER}, …)`: run that version, or move the file aside; {then}"
            ),
            || damaged(Damage::Newer),
        ),
    ]
}

async fn damaged(damage: Damage) -> Result<Observed> {
    let site = Site::start(1, |_| {}, "tail_check_delay_ms = 100").await?;
    let p = site.pair(0)?;
    let direct = Launcher::direct();
    // A life of the daemon that records real state: checkpoints, journal
    // rows, cursors.
    let mut daemon = Daemon::start(&direct, &site.config, &site.log)?;
    for u in ["u1", "u2", "u3"] {
        site.enroll(p.source, u)?;
    }
    site.wait_converged(DELIVERY).await?;
    let status = daemon.stop().await?;
    ensure!(status.success(), "the first life ended with {status}");

    let db = site.state.join("state.db");
    match damage {
        Damage::Corrupt => {
            let mut bytes = std::fs::read(&db)?;
            let page = 4096;
            let at = bytes.len() / 2 / page * page;
            let end = (at + page).min(bytes.len());
            rand::rngs::StdRng::seed_from_u64(0x5EED).fill_bytes(&mut bytes[at..end]);
            std::fs::write(&db, bytes)?;
        }
        Damage::Truncate => {
            let f = std::fs::OpenOptions::new().write(true).open(&db)?;
            let len = f.metadata()?.len();
            f.set_len(len / 2)?;
        }
        Damage::Newer => {
            let c = rusqlite::Connection::open(&db)?;
            c.pragma_update(None, "user_version", NEWER)?;
        }
    }
    let damaged = std::fs::read(&db)?;
    site.enroll(p.source, "while-down")?;

    let mut o = Observed::default();
    let mut daemon = Daemon::start(&direct, &site.config, &site.dir.path().join("damaged.log"))?;
    let status = daemon.wait_exit(Duration::from_secs(60)).await?;
    let log = daemon.log();
    o.exit = status
        .code()
        .map_or_else(|| status.to_string(), |c| c.to_string());
    o.message = log
        .find(0, |l| {
            l.level == "RAW" && l.message.starts_with("usersync:")
        })
        .or_else(|| log.find(0, |l| l.level == "ERROR"))
        .map_or_else(|| "(nothing)".to_owned(), ToString::to_string);
    o.expect(status.code() == Some(1), format!("exited {status}"));
    o.expect(
        o.message.contains(&db.display().to_string()),
        "the message does not name the file",
    );
    o.expect(
        o.message.contains("aside"),
        "the message does not say what to do",
    );
    if matches!(damage, Damage::Newer) {
        o.expect(
            o.message.contains("newer usersync"),
            "the message does not say a newer usersync wrote it",
        );
    }
    o.expect(!log.panicked(), "the daemon panicked");
    let kept = std::fs::read(&db)? == damaged;
    o.expect(kept, "state.db changed");

    // What the message says to do.
    let aside = site.state.join("state.db.damaged");
    std::fs::rename(&db, &aside)?;
    let mut daemon = Daemon::start(&direct, &site.config, &site.dir.path().join("afresh.log"))?;
    let delivered = site.wait_converged(DELIVERY).await;
    let stopped = daemon.stop().await?;
    o.expect(
        delivered.is_ok(),
        "after moving it aside, the change made while down did not arrive",
    );
    o.expect(
        stopped.success(),
        format!("the fresh start ended with {stopped}"),
    );
    let aside_kept = std::fs::read(&aside)? == damaged;
    o.expect(aside_kept, "the moved file changed");
    o.state = match (kept && aside_kept, delivered.is_ok()) {
        (true, true) => "state.db byte-identical; moved aside, the next start delivered the change made while down".into(),
        (true, false) => "state.db byte-identical; moved aside, the change made while down did NOT arrive".into(),
        (false, _) => "state.db CHANGED".into(),
    };
    Ok(o.redact(site.dir.path()))
}
