//! Hostile data from the gateway (the simulator's switches): the daemon
//! logs and skips, never panics, never exits, never deletes a user a
//! source holds, and the other devices keep syncing.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use usersync::sim::{DeviceSpec, LogFault, SimOptions, StreamHeaders, codes};

use crate::daemon::{Daemon, Launcher, Line, Log, until};
use crate::report::{Case, Observed, Section};
use crate::site::{DELIVERY, Site};

/// Short tail checks and a 2 s idle check, so that what only an idle check
/// finds is found within a case.
const SYNC: &str = "tail_check_delay_ms = 100\nidle_check_interval_secs = 2";

/// A user ID of 32 characters, the most a device stores.
const LONGEST: &str = "a-longest-user-id-of-32-chars-xx";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hostile {
    UnknownCodes,
    EmptyUserIds,
    LongUserIds,
    Undecodable,
    DuplicateIds,
    OutOfOrderIds,
    Wrap,
    Oversize,
    Stall,
    NoHeaders,
}

pub fn cases() -> Vec<Case> {
    use Hostile::*;
    let spec: [(Hostile, &str, &str, &str); 10] = [
        (
            UnknownCodes,
            "gateway/unknown-event-codes",
            "events at A with codes no table has: 0x0000, 0x2B00, 0x7F00, 0xFFFF and 0x12345 (wider \
             than 16 bits), one of them naming a user",
            "shipped to the journal like any event, nothing recorded or synced, no WARN",
        ),
        (
            EmptyUserIds,
            "gateway/empty-user-ids",
            "user events at A (enroll 0x2000, update 0x2200, delete 0x2400) whose user ID is empty",
            "WARN `event N of device A (…) has no user ID; the targets of its groups are \
             reconciled to find the change`; nothing sent on, nothing deleted",
        ),
        (
            LongUserIds,
            "gateway/33-byte-user-ids",
            "user events at A whose user ID has 33 bytes: a delete of the 32-byte ID of a user A \
             holds plus one character, and an enroll of an ID A does not hold",
            "WARN `… has a user ID of 33 bytes (at most 32) …; the targets of its groups are \
             reconciled …` (WIRE.md: an ID has at most 32 bytes); no such ID sent to the gateway; \
             the 32-byte user stays at B",
        ),
        (
            Undecodable,
            "gateway/undecodable-user-record",
            "a user synced to B, then its record at A replaced by bytes that do not decode (`peek` \
             fails) and a user-update event logged; later the user re-enrolled at A",
            "ERROR `user quarantined: its source record cannot be read; the targets keep what they \
             hold`; B keeps its copy; after the re-enroll, B holds the new record",
        ),
        (
            DuplicateIds,
            "gateway/duplicate-event-ids",
            "every GetLog page of A holds each record twice (realtime of A dropped, so every \
             change is found by a read); 5 users enrolled at A",
            "pages deduplicated silently; every change arrives, each event shipped once",
        ),
        (
            OutOfOrderIds,
            "gateway/out-of-order-event-ids",
            "every GetLog page of A in descending order (realtime of A dropped); 5 users enrolled \
             at A",
            "pages put in order silently; every change arrives, each event shipped once",
        ),
        (
            Wrap,
            "gateway/event-id-wrap",
            "A's event IDs start at 2^32 − 4 and wrap past 2^32 (skipping 0) while 6 users are \
             enrolled at A",
            "the events after the wrap follow the checkpoint in the gateway's order: no reset, no \
             WARN; every change arrives, each event shipped once, and later tail checks find \
             nothing new",
        ),
        (
            Oversize,
            "gateway/enormous-getlog-page",
            "GetLog of A ignores `maxNumOfLog`: every record from the start (A's log holds 50,000 \
             records before the daemon starts; 10,000 more and an enroll while realtime of A is \
             dropped)",
            "the oversized pages are taken as they are (nothing skipped or read twice); the \
             change arrives and A's checkpoint reaches its newest event",
        ),
        (
            Stall,
            "gateway/realtime-stream-stalls",
            "the realtime stream stays open (HTTP/2 pings answered) but carries nothing; later it \
             goes on with what waited",
            "INFO `a tail check found events realtime never delivered; enabling monitoring again`; \
             changes arrive by tail checks (within `idle_check_interval_secs`, 600 s by default); \
             the stale events, once they come, are verified and not shipped again",
        ),
        (
            NoHeaders,
            "gateway/stream-headers-never-come",
            "SubscribeStatus and SubscribeRealtimeLog never answer, not even with headers \
             (`stream-headers never`), from the daemon's start",
            "devices go live from GetDeviceList alone; INFO `a tail check found events realtime \
             never delivered; enabling monitoring again`; changes arrive by tail checks (within \
             `idle_check_interval_secs`, 600 s by default)",
        ),
    ];
    spec.into_iter()
        .map(|(kind, name, input, expected)| {
            Case::new(Section::Gateway, name, input, expected, move || {
                hostile(kind)
            })
        })
        .collect()
}

/// The user IDs of the case's changes at A that must end at B.
fn users(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn hostile(kind: Hostile) -> Result<Observed> {
    let site = Site::start(
        2,
        |o: &mut SimOptions| match kind {
            Hostile::Wrap => {
                o.model.devices[0] = DeviceSpec {
                    first_event_id: u32::MAX - 3,
                    ..DeviceSpec::new(o.model.devices[0].id)
                };
            }
            Hostile::NoHeaders => o.model.policies.stream_headers = StreamHeaders::Never,
            _ => {}
        },
        SYNC,
    )
    .await?;
    let (a, c) = (site.pair(0)?, site.pair(1)?);
    let sim = &site.sim;
    if kind == Hostile::Oversize {
        sim.append_events(a.source, 50_000, codes::VERIFY_SUCCESS)
            .map_err(|e| anyhow!("{e}"))?;
        sim.set_log_fault(Some(a.source), LogFault::Oversize);
    }
    sim.with_model(|m| {
        m.guard_deletes(
            vec![a.source, c.source],
            vec![a.target, c.target],
            Duration::ZERO,
        );
    });

    let mut d = Daemon::start(&Launcher::direct(), &site.config, &site.log)?;
    let mut warm = vec!["a-warm".to_owned()];
    match kind {
        Hostile::LongUserIds => warm.push(LONGEST.to_owned()),
        Hostile::Undecodable => warm.push("a-peek".to_owned()),
        _ => {}
    }
    for u in &warm {
        site.enroll(a.source, u)?;
    }
    site.enroll(c.source, "c-warm")?;
    for u in &warm {
        site.wait_delivered(a, u, DELIVERY).await?;
    }
    site.wait_delivered(c, "c-warm", DELIVERY).await?;
    let mark = d.log().lines.len();

    let mut o = Observed::default();
    let mut notes: Vec<String> = Vec::new();
    let mut must_arrive: Vec<String> = Vec::new();
    let peek_copy = sim.user_bytes(a.target, "a-peek");
    match kind {
        Hostile::UnknownCodes => {
            for (code, user) in [
                (0x0000, ""),
                (0x2B00, "a-warm"),
                (0x7F00, ""),
                (0xFFFF, ""),
                (0x1_2345, ""),
            ] {
                sim.event_on_device(a.source, code, user)
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
        Hostile::EmptyUserIds => {
            for code in [
                codes::USER_ENROLL_SUCCESS,
                codes::USER_UPDATE_SUCCESS,
                codes::USER_DELETE_SUCCESS,
            ] {
                sim.event_on_device(a.source, code, "")
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
        Hostile::LongUserIds => {
            let over = format!("{LONGEST}z");
            sim.event_on_device(a.source, codes::USER_DELETE_SUCCESS, &over)
                .map_err(|e| anyhow!("{e}"))?;
            sim.event_on_device(a.source, codes::USER_ENROLL_SUCCESS, &"b".repeat(33))
                .map_err(|e| anyhow!("{e}"))?;
        }
        Hostile::Undecodable => {
            sim.corrupt_on_device(a.source, "a-peek")
                .map_err(|e| anyhow!("{e}"))?;
            until(
                "the undecodable record to be quarantined",
                DELIVERY,
                || async { Ok(d.log().find(mark, |l| l.says("quarantined")).is_some()) },
            )
            .await?;
        }
        Hostile::DuplicateIds | Hostile::OutOfOrderIds => {
            let fault = if kind == Hostile::DuplicateIds {
                LogFault::Duplicate
            } else {
                LogFault::OutOfOrder
            };
            sim.set_log_fault(Some(a.source), fault);
            sim.drop_realtime(Some(a.source), 1.0);
            must_arrive = users("a-page", 5);
            for u in &must_arrive {
                site.enroll(a.source, u)?;
            }
        }
        Hostile::Wrap => {
            must_arrive = users("a-wrap", 6);
            for u in &must_arrive {
                site.enroll(a.source, u)?;
            }
            let ids: Vec<u32> = sim.log(a.source).iter().map(|e| e.id).collect();
            ensure!(
                ids.first().is_some_and(|f| *f > u32::MAX - 8) && ids.contains(&1),
                "the simulator's IDs did not wrap: {ids:?}"
            );
        }
        Hostile::Oversize => {
            sim.drop_realtime(Some(a.source), 1.0);
            sim.append_events(a.source, 10_000, codes::VERIFY_SUCCESS)
                .map_err(|e| anyhow!("{e}"))?;
            must_arrive = vec!["a-big".to_owned()];
            site.enroll(a.source, "a-big")?;
        }
        Hostile::Stall => sim.stall_realtime(true),
        Hostile::NoHeaders => {}
    }
    for u in &must_arrive {
        let arrived = site.wait_delivered(a, u, DELIVERY).await;
        o.expect(arrived.is_ok(), format!("{u} did not arrive at B"));
    }

    // The other group keeps syncing; a later change at A still arrives.
    site.enroll(c.source, "c-after")?;
    let c_after = site.wait_delivered(c, "c-after", DELIVERY).await;
    o.expect(c_after.is_ok(), "c-after did not arrive at D");
    site.enroll(a.source, "a-after")?;
    let a_after = site.wait_delivered(a, "a-after", DELIVERY).await;
    o.expect(a_after.is_ok(), "a-after did not arrive at B");

    // The case's own outcome.
    let tell: Box<dyn Fn(&Line) -> bool> = match kind {
        Hostile::UnknownCodes => Box::new(|l| l.says("0x12345")),
        Hostile::EmptyUserIds | Hostile::LongUserIds => {
            Box::new(|l| l.is_problem() && l.says("user ID"))
        }
        Hostile::Undecodable => Box::new(|l| l.says("quarantined")),
        Hostile::Stall | Hostile::NoHeaders => Box::new(|l| l.says("realtime never delivered")),
        _ => Box::new(|l| l.is_problem()),
    };
    match kind {
        Hostile::UnknownCodes | Hostile::DuplicateIds | Hostile::OutOfOrderIds | Hostile::Wrap => {
            let problems = d.log().problems(mark).len();
            o.expect(problems == 0, format!("{problems} WARN/ERROR lines"));
        }
        Hostile::EmptyUserIds
        | Hostile::LongUserIds
        | Hostile::Undecodable
        | Hostile::NoHeaders => {
            o.expect(
                d.log().find(mark, |l| tell(l)).is_some(),
                "the expected log line is missing",
            );
        }
        Hostile::Stall => {
            o.expect(
                d.log().find(mark, |l| tell(l)).is_some(),
                "no tail check noticed the stalled stream",
            );
            // The stream goes on: what waited is stale by now.
            sim.stall_realtime(false);
            site.enroll(a.source, "a-resumed")?;
            let resumed = site.wait_delivered(a, "a-resumed", DELIVERY).await;
            o.expect(resumed.is_ok(), "after the stall, a-resumed did not arrive");
            notes.push("after the stall: a-resumed → B".into());
        }
        Hostile::Oversize => {}
    }
    match kind {
        Hostile::LongUserIds => {
            let kept = sim.holds(a.target, LONGEST);
            o.expect(kept, "the 32-byte user was deleted from B");
            let stray = sim.holds(a.target, &"b".repeat(33));
            o.expect(!stray, "B holds the 33-byte ID");
            let sent = sim
                .rpc_log()
                .iter()
                .any(|r| r.user_ids.iter().any(|u| u.len() > 32));
            o.expect(!sent, "a 33-byte ID was sent to the gateway");
            notes.push(format!(
                "33-byte IDs sent to the gateway: {}",
                if sent { "YES" } else { "none" }
            ));
            notes.push(format!(
                "32-byte user at B: {}",
                if kept { "kept" } else { "DELETED" }
            ));
        }
        Hostile::Undecodable => {
            let kept = peek_copy.is_some() && sim.user_bytes(a.target, "a-peek") == peek_copy;
            o.expect(
                kept,
                "B's copy of a-peek changed while A's record could not be read",
            );
            notes.push(format!(
                "B's copy of a-peek {}",
                if kept { "kept" } else { "CHANGED" }
            ));
            site.enroll(a.source, "a-peek")?;
            let repaired = site.wait_delivered(a, "a-peek", DELIVERY).await;
            o.expect(repaired.is_ok(), "the re-enrolled a-peek did not arrive");
            notes.push(format!(
                "re-enrolled: {}",
                if repaired.is_ok() {
                    "new record at B"
                } else {
                    "NOT at B"
                }
            ));
        }
        Hostile::DuplicateIds | Hostile::OutOfOrderIds | Hostile::Stall => {
            let twice = shipped_twice(&d.log(), a.source);
            o.expect(
                twice.is_empty(),
                format!("events of A shipped twice: {twice:?}"),
            );
            notes.push(if twice.is_empty() {
                "each event of A shipped once".into()
            } else {
                format!("events SHIPPED TWICE: {twice:?}")
            });
        }
        Hostile::Wrap => {
            // Three more reads of A's log: none may find a reset or news.
            let reads = |sim: &usersync::sim::Simulator| {
                sim.rpc_log()
                    .iter()
                    .filter(|r| r.method == "GetLog" && r.device_ids == [a.source])
                    .count()
            };
            let before = reads(sim);
            until("three more reads of A's log", DELIVERY, || async {
                Ok(reads(sim) >= before + 3)
            })
            .await?;
            let log = d.log();
            let resets = log.find(mark, |l| l.says("log was reset")).is_some();
            o.expect(!resets, "the wrap was taken for a reset");
            let twice = shipped_twice(&log, a.source);
            o.expect(
                twice.is_empty(),
                format!("events of A shipped twice: {twice:?}"),
            );
            notes.push(format!(
                "{}; {} after 3 more reads of A's log",
                if resets {
                    "TAKEN FOR A RESET"
                } else {
                    "no reset"
                },
                if twice.is_empty() {
                    "each event of A shipped once".to_owned()
                } else {
                    format!("events SHIPPED TWICE: {twice:?}")
                }
            ));
        }
        Hostile::Oversize => {
            let newest = sim.newest_event_id(a.source).context("A's newest event")?;
            let reached = until("A's checkpoint at its newest event", DELIVERY, || async {
                Ok(checkpoint(&site, a.source)? == Some(newest))
            })
            .await;
            o.expect(
                reached.is_ok(),
                "A's checkpoint did not reach its newest event",
            );
            let asked: Vec<(Option<u32>, Option<u32>)> = sim
                .rpc_log()
                .into_iter()
                .filter(|r| r.method == "GetLog" && r.device_ids == [a.source])
                .map(|r| (r.start_event_id, r.max))
                .collect();
            notes.push(format!(
                "A's checkpoint {} its newest event {newest} ({} GetLog calls to A)",
                if reached.is_ok() { "at" } else { "NOT at" },
                asked.len()
            ));
        }
        _ => {}
    }

    // Throughout: up, no panic, no user a source holds deleted.
    let alive = d.exited()?.is_none();
    o.expect(alive, "the daemon exited");
    let violations = sim.with_model(|m| m.delete_violations());
    o.expect(
        violations.is_empty(),
        format!("guarded deletes: {violations:?}"),
    );
    let status = d.stop().await?;
    let log = d.log();
    o.expect(!log.panicked(), "the daemon panicked");
    o.expect(status.success(), format!("stopped with {status}"));
    o.exit = format!(
        "{}; {} after SIGTERM",
        if alive { "kept running" } else { "EXITED" },
        status
            .code()
            .map_or_else(|| status.to_string(), |c| c.to_string())
    );
    o.message = log
        .find(mark, |l| tell(l))
        .map_or_else(|| "(no WARN or ERROR)".to_owned(), ToString::to_string);
    let mut state = vec![format!(
        "c-after → D {}, a-after → B {}",
        if c_after.is_ok() { "yes" } else { "NO" },
        if a_after.is_ok() { "yes" } else { "NO" }
    )];
    if !must_arrive.is_empty() {
        let n = must_arrive.iter().filter(|u| site.delivered(a, u)).count();
        state.push(format!("{n} of {} changes at A → B", must_arrive.len()));
    }
    state.extend(notes);
    state.push(if violations.is_empty() {
        "no user a source holds was deleted".into()
    } else {
        format!("{} GUARDED DELETES", violations.len())
    });
    o.state = state.join("; ");
    Ok(o.redact(site.dir.path()))
}

/// Event IDs of `device` that the daemon shipped (logged) more than once.
fn shipped_twice(log: &Log, device: u32) -> Vec<u64> {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for l in &log.lines {
        let dev = l
            .fields
            .get("device_id")
            .and_then(serde_json::Value::as_u64);
        let id = l.fields.get("event_id").and_then(serde_json::Value::as_u64);
        if l.fields.contains_key("event_code")
            && dev == Some(u64::from(device))
            && let Some(id) = id
        {
            *seen.entry(id).or_default() += 1;
        }
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect()
}

/// The daemon's checkpoint of `device`, read as `usersync status` does.
fn checkpoint(site: &Site, device: u32) -> Result<Option<u32>> {
    match usersync::store::Store::open_existing(&site.state) {
        Ok(s) => Ok(s.checkpoint(device)?),
        Err(e) => Err(anyhow!("{e}")),
    }
}
