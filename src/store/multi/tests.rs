use super::super::{ChangeKind, Store, now_ms, pending};
use super::*;
use proptest::prelude::*;

fn store() -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    (tmp, store)
}

fn ev(time: u32, op: MemberOp, on_device: bool, echo: EchoDetection) -> MemberEvent {
    MemberEvent {
        time,
        op,
        on_device,
        echo,
        max_skew: 10,
        event: 1,
        replayed: false,
        after_reset: false,
    }
}

/// The same event read again from a reset log.
fn replayed(e: MemberEvent) -> MemberEvent {
    MemberEvent {
        replayed: true,
        ..e
    }
}

fn change(device: u32, user: &str) -> Change {
    Change {
        group: "g".into(),
        user_id: user.into(),
        source: device,
        kind: ChangeKind::User,
    }
}

/// A time the bound never touches (an hour ago).
fn past() -> u32 {
    u32_time(now() - 3600)
}

fn rec(store: &Store, device: u32, user: &str, e: MemberEvent) -> Recorded {
    store
        .with(|c| {
            let tx = c.transaction()?;
            let r = record(&tx, &change(device, user), &e)?;
            tx.commit()?;
            Ok(r)
        })
        .unwrap()
}

fn expect(store: &Store, devices: &[u32], user: &str, op: MemberOp) {
    store
        .with(|c| {
            let tx = c.transaction()?;
            expect_own_writes(&tx, "g", devices, &[user.to_owned()], op)?;
            tx.commit()?;
            Ok(())
        })
        .unwrap();
}

#[test]
fn registers_order_changes_and_set_losers_back() {
    use EchoDetection::ChangedOnDevice as Cod;
    let (_t, s) = store();
    let t = past();
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, true, Cod)),
        Recorded::Won(1)
    );
    assert_eq!(
        rec(&s, 2, "u", ev(t + 5, MemberOp::Delete, true, Cod)),
        Recorded::Won(2)
    );
    // Older than the tombstone: ignored, and member 3 is set back.
    assert_eq!(
        rec(&s, 3, "u", ev(t + 1, MemberOp::Upsert, true, Cod)),
        Recorded::Older
    );
    let r = s.with(|c| row(c, "g", "u")).unwrap().unwrap();
    assert_eq!((r.seq, r.source, r.version.deleted), (2, 2, true));
    let queued = s.with(|c| pending(c, "g", 3, 10, &[1, 2, 3])).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].user_id.as_str(), queued[0].source), ("u", 2));
    // Not a change: the flag is not set (changed-on-device).
    assert_eq!(
        rec(&s, 1, "u", ev(t + 9, MemberOp::Upsert, false, Cod)),
        Recorded::Foreign
    );
    assert_eq!(s.head("g").unwrap(), 2);
    // A one-way row is no register.
    assert_eq!(s.with(|c| row(c, "g", "nobody")).unwrap(), None);
}

#[test]
fn replayed_deletes_of_users_without_history_are_history() {
    use EchoDetection::ChangedOnDevice as Cod;
    let (_t, s) = store();
    s.with(|c| mark_started(c, "g")).unwrap();
    let old = u32_time(now() - 86_400);
    assert_eq!(
        rec(&s, 1, "u", replayed(ev(old, MemberOp::Delete, true, Cod))),
        Recorded::History
    );
    // Even a recent one: read again, it is not known to be news.
    assert_eq!(
        rec(
            &s,
            1,
            "u",
            replayed(ev(past(), MemberOp::Delete, true, Cod))
        ),
        Recorded::History
    );
    assert_eq!(s.head("g").unwrap(), 0);
    // An old enroll is recorded (its state is read now), and an old
    // delete of a user with history is ordered as any change.
    assert_eq!(
        rec(&s, 1, "v", ev(old, MemberOp::Upsert, true, Cod)),
        Recorded::Won(1)
    );
    assert_eq!(
        rec(&s, 2, "v", ev(old + 1, MemberOp::Delete, true, Cod)),
        Recorded::Won(2)
    );
    // A delete since the start is a change.
    assert_eq!(
        rec(&s, 1, "w", ev(u32_time(now()), MemberOp::Delete, true, Cod)),
        Recorded::Won(3)
    );
}

/// Finding 1: an old delete read again from a member's reset log must not
/// become the winner over that member's later enroll.
#[test]
fn a_replayed_old_delete_does_not_beat_the_same_members_enroll() {
    use EchoDetection::ChangedOnDevice as Cod;
    let (_t, s) = store();
    // The group ran for two hours (the changes below are since).
    s.with(|c| {
        c.execute(
            "INSERT INTO member_group (grp, started_at) VALUES ('g', ?1)",
            [now() - 7200],
        )?;
        Ok(())
    })
    .unwrap();
    let t = past();
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, true, Cod)),
        Recorded::Won(1)
    );
    let old = u32_time(now() - 365 * 86_400);
    assert_eq!(
        rec(&s, 1, "u", replayed(ev(old, MemberOp::Delete, true, Cod))),
        Recorded::History
    );
    // The enroll itself read again: not newer either.
    assert_eq!(
        rec(&s, 1, "u", replayed(ev(t, MemberOp::Upsert, true, Cod))),
        Recorded::History
    );
    let r = s.with(|c| row(c, "g", "u")).unwrap().unwrap();
    assert_eq!(
        (r.seq, r.version.deleted, r.version.stamp.time),
        (1, false, t)
    );
    assert_eq!(s.head("g").unwrap(), 1);
    // Nothing queued for the member on account of history.
    assert!(
        s.with(|c| pending(c, "g", 1, 10, &[1, 2]))
            .unwrap()
            .is_empty()
    );
    // A replayed change that is newer than the register still wins.
    assert_eq!(
        rec(&s, 1, "u", replayed(ev(t + 5, MemberOp::Delete, true, Cod))),
        Recorded::Won(2)
    );
    // Live, the same member's log order still decides.
    assert_eq!(
        rec(&s, 1, "u", ev(t + 1, MemberOp::Upsert, true, Cod)),
        Recorded::Won(3)
    );
}

/// Finding 2 (4a/b): a live delete is a change whatever the member's
/// clock says, and whenever it was made.
#[test]
fn a_live_delete_at_a_member_whose_clock_is_behind_is_a_change() {
    use EchoDetection::ChangedOnDevice as Cod;
    let (_t, s) = store();
    s.with(|c| mark_started(c, "g")).unwrap();
    let behind = u32_time(now() - 365 * 86_400);
    assert_eq!(
        rec(&s, 2, "u", ev(behind, MemberOp::Delete, true, Cod)),
        Recorded::Won(1)
    );
    assert!(
        s.with(|c| row(c, "g", "u"))
            .unwrap()
            .unwrap()
            .version
            .deleted
    );
}

#[test]
fn times_far_ahead_are_ordered_at_the_bound() {
    let (_t, s) = store();
    let far = u32_time(now() + 86_400);
    rec(
        &s,
        1,
        "u",
        ev(far, MemberOp::Upsert, true, EchoDetection::ChangedOnDevice),
    );
    let r = s.with(|c| row(c, "g", "u")).unwrap().unwrap();
    assert!(i64::from(r.version.stamp.time) <= now() + 10);
    // A change a minute later (in the daemon's time) wins over it.
    let later = u32_time(now() + 60);
    assert_eq!(
        rec(
            &s,
            2,
            "u",
            ev(
                later,
                MemberOp::Delete,
                true,
                EchoDetection::ChangedOnDevice
            )
        ),
        Recorded::Won(2)
    );
}

/// Finding 4: an event read late from a member whose clock is measured a
/// day ahead is ordered by its time less the skew, so it does not beat a
/// later delete made elsewhere.
#[test]
fn a_late_event_of_a_member_measured_ahead_loses_to_a_later_delete() {
    use EchoDetection::ChangedOnDevice as Cod;
    let (_t, s) = store();
    let n = now();
    s.with(|c| set_clock_skew(c, 2, 86_400)).unwrap();
    assert_eq!(
        rec(
            &s,
            1,
            "u",
            ev(u32_time(n - 1800), MemberOp::Delete, true, Cod)
        ),
        Recorded::Won(1)
    );
    // Made an hour ago at member 2 (its clock a day ahead), read now.
    assert_eq!(
        rec(
            &s,
            2,
            "u",
            ev(u32_time(n - 3600 + 86_400), MemberOp::Upsert, true, Cod)
        ),
        Recorded::Older
    );
    let r = s.with(|c| row(c, "g", "u")).unwrap().unwrap();
    assert!(r.version.deleted);
    // A change it makes later than the delete (in true time) still wins.
    assert_eq!(
        rec(
            &s,
            2,
            "v",
            ev(u32_time(n - 60 + 86_400), MemberOp::Upsert, true, Cod)
        ),
        Recorded::Won(2)
    );
    let r = s.with(|c| row(c, "g", "v")).unwrap().unwrap();
    assert!(i64::from(r.version.stamp.time) <= n);
    // A skew within the bound is left alone.
    s.with(|c| set_clock_skew(c, 3, 5)).unwrap();
    let t = past();
    rec(&s, 3, "w", ev(t, MemberOp::Upsert, true, Cod));
    let r = s.with(|c| row(c, "g", "w")).unwrap().unwrap();
    assert_eq!(r.version.stamp.time, t);
}

#[test]
fn own_writes_are_echoes_once_each() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    let t = past();
    expect(&s, &[1, 2], "u", MemberOp::Upsert);
    expect(&s, &[1], "u", MemberOp::Upsert);
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 3);
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
        Recorded::Echo
    );
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
        Recorded::Echo
    );
    // The third event at 1 is a change.
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
        Recorded::Won(1)
    );
    // A delete is not the echo of an enroll; a change clears what was
    // expected there.
    assert_eq!(
        rec(&s, 2, "u", ev(t + 1, MemberOp::Delete, false, Own)),
        Recorded::Won(2)
    );
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
    // A failed write is not expected any more.
    expect(&s, &[3], "v", MemberOp::Delete);
    s.with(|c| {
        let tx = c.transaction()?;
        unexpect_own_writes(&tx, "g", &[3], &["v".to_owned()], MemberOp::Delete)?;
        tx.commit()?;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        rec(&s, 3, "v", ev(t, MemberOp::Delete, false, Own)),
        Recorded::Won(3)
    );
}

#[test]
fn an_echo_overtakes_an_unanswered_write_of_the_other_kind() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    let t = past();
    // A delete of a user member 1 did not hold (no event), then an
    // enroll (its echo comes): the delete is no longer expected, so
    // a real delete there later is a change.
    expect(&s, &[1], "u", MemberOp::Delete);
    expect(&s, &[1], "u", MemberOp::Upsert);
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
        Recorded::Echo
    );
    assert_eq!(
        rec(&s, 1, "u", ev(t + 1, MemberOp::Delete, false, Own)),
        Recorded::Won(1)
    );
}

/// Finding 5: the echo of an enroll does not wipe the expectation of a
/// delete made after it.
#[test]
fn an_echo_keeps_a_later_write_of_the_other_kind_expected() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    let t = past();
    expect(&s, &[1], "u", MemberOp::Upsert);
    expect(&s, &[1], "u", MemberOp::Delete);
    assert_eq!(
        rec(&s, 1, "u", ev(t, MemberOp::Upsert, false, Own)),
        Recorded::Echo
    );
    assert_eq!(
        rec(&s, 1, "u", ev(t + 1, MemberOp::Delete, false, Own)),
        Recorded::Echo
    );
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
    // Delete, enroll, delete: the enroll's echo overtakes only the first.
    expect(&s, &[1], "v", MemberOp::Delete);
    expect(&s, &[1], "v", MemberOp::Upsert);
    expect(&s, &[1], "v", MemberOp::Delete);
    assert_eq!(
        rec(&s, 1, "v", ev(t, MemberOp::Upsert, false, Own)),
        Recorded::Echo
    );
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 1);
    assert_eq!(
        rec(&s, 1, "v", ev(t + 1, MemberOp::Delete, false, Own)),
        Recorded::Echo
    );
}

#[test]
fn expected_writes_expire() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    expect(&s, &[1], "u", MemberOp::Upsert);
    s.with(|c| {
        c.execute("UPDATE own_write SET expires_at = ?1", [now() - 1])?;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        rec(&s, 1, "u", ev(past(), MemberOp::Upsert, false, Own)),
        Recorded::Won(1)
    );
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
}

/// An expectation ends when a read of the member's log that started after
/// the write returned (and after the grace) found no echo; not before: a
/// read that started before the write returned, a write still in flight,
/// another member's read, and a read within the grace leave it.
#[test]
fn a_read_after_the_write_ends_an_expectation_it_found_no_echo_of() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    let expected = |s: &Store| s.with(|c| own_writes_expected(c, "g")).unwrap();
    let expire = |s: &Store, device: u32, tick: u64, wall: i64| {
        s.with(|c| expire_own_writes(c, "g", device, tick, wall))
            .unwrap()
    };
    let read_before = own_write_tick();
    expect(&s, &[1, 2], "u", MemberOp::Delete);
    // In flight: no read ends it.
    assert_eq!(expire(&s, 1, own_write_tick(), now_ms() + 60_000), 0);
    let done = own_write_tick();
    assert_eq!(s.with(|c| own_writes_done(c, "g", done)).unwrap(), 2);
    let wall = now_ms();
    // A read that started before the write returned may not hold its echo.
    assert_eq!(expire(&s, 1, read_before, wall + 60_000), 0);
    // A read just after, within the grace: the device may still log it.
    let after = own_write_tick();
    assert_eq!(expire(&s, 1, after, wall), 0);
    assert_eq!(expected(&s), 2);
    // After the grace: member 1's ends, member 2's stays.
    assert_eq!(expire(&s, 1, after, wall + OWN_WRITE_GRACE_MS + 1_000), 1);
    assert_eq!(expected(&s), 1);
    // So a delete made at member 1 now is a change.
    assert_eq!(
        rec(&s, 1, "u", ev(past(), MemberOp::Delete, false, Own)),
        Recorded::Won(1)
    );
}

/// A restart: every write remembered is from an earlier run, so the
/// first read of this run ends those that never echoed.
#[test]
fn after_a_restart_the_first_read_ends_old_expectations() {
    let (_t, s) = store();
    expect(&s, &[1], "u", MemberOp::Upsert);
    s.with(|c| own_writes_restarted(c, 5_000)).unwrap();
    let n = s
        .with(|c| {
            expire_own_writes(
                c,
                "g",
                1,
                own_write_tick(),
                now_ms() + OWN_WRITE_GRACE_MS + 1_000,
            )
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
}

#[test]
fn observing_switches_a_member_to_the_flag_once_it_shows_it() {
    use EchoDetection::Observe;
    let (_t, s) = store();
    let t = past();
    // Not seen yet: own writes decide.
    assert_eq!(
        rec(&s, 2, "u", ev(t, MemberOp::Upsert, false, Observe)),
        Recorded::Won(1)
    );
    assert_eq!(s.with(|c| echo_observed(c, "g")).unwrap(), vec![]);
    assert_eq!(
        rec(&s, 2, "u", ev(t + 1, MemberOp::Upsert, true, Observe)),
        Recorded::Won(2)
    );
    assert_eq!(
        s.with(|c| echo_observed(c, "g"))
            .unwrap()
            .iter()
            .map(|(d, _)| *d)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        s.with(|c| echo_in_force(c, "g", 2, Observe)).unwrap(),
        InForce::ChangedOnDevice
    );
    // From now on an unflagged event of member 2 is not a change.
    assert_eq!(
        rec(&s, 2, "u", ev(t + 2, MemberOp::Delete, false, Observe)),
        Recorded::Foreign
    );
}

/// Finding 3: a member whose firmware never sets the flag keeps own-writes
/// detection after another member showed the flag; its changes spread.
#[test]
fn observing_decides_per_member_with_mixed_firmware() {
    use EchoDetection::Observe;
    let (_t, s) = store();
    let t = past();
    assert_eq!(
        rec(&s, 1, "a", ev(t, MemberOp::Upsert, true, Observe)),
        Recorded::Won(1)
    );
    assert_eq!(
        s.with(|c| echo_in_force(c, "g", 2, Observe)).unwrap(),
        InForce::OwnWrites
    );
    assert_eq!(
        rec(&s, 2, "b", ev(t + 5, MemberOp::Delete, false, Observe)),
        Recorded::Won(2)
    );
    // Its echoes are still recognised by own writes.
    expect(&s, &[2], "a", MemberOp::Upsert);
    assert_eq!(
        rec(&s, 2, "a", ev(t + 6, MemberOp::Upsert, false, Observe)),
        Recorded::Echo
    );
    // Member 1 stays on the flag.
    assert_eq!(
        rec(&s, 1, "b", ev(t + 7, MemberOp::Upsert, false, Observe)),
        Recorded::Foreign
    );
}

proptest! {
    // Each case is a database on disk (synchronous = FULL).
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The store's registers follow the pure rules (`order::merge`) for
    /// any sequence of members' changes.
    #[test]
    fn registers_match_the_rules(
        events in proptest::collection::vec((1u32..4, 0u8..3, 0u32..20, any::<bool>()), 0..40)
    ) {
        let (_t, s) = store();
        let base = past();
        let mut model: BTreeMap<String, Version> = BTreeMap::new();
        for (device, user, time, deleted) in events {
            let user = format!("u{user}");
            let op = if deleted { MemberOp::Delete } else { MemberOp::Upsert };
            rec(&s, device, &user, ev(base + time, op, true, EchoDetection::ChangedOnDevice));
            let incoming = Version { stamp: Stamp { time: base + time, device }, deleted };
            if let Merge::Replace(v) = order::merge(model.get(&user), incoming, false) {
                model.insert(user, v);
            }
        }
        let got: BTreeMap<String, Version> = s
            .with(|c| all_rows(c, "g"))
            .unwrap()
            .into_iter()
            .map(|(u, r)| (u, r.version))
            .collect();
        prop_assert_eq!(got, model);
    }
}

/// Replayed changes made before the group first ran are history; live
/// ones of that time are changes (a member offline since, its clock
/// behind).
#[test]
fn replayed_changes_from_before_the_group_ran_are_history() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    s.with(|c| mark_started(c, "g")).unwrap();
    let before = past();
    assert_eq!(
        rec(
            &s,
            1,
            "u",
            replayed(ev(before, MemberOp::Upsert, false, Own))
        ),
        Recorded::History
    );
    assert_eq!(
        rec(
            &s,
            1,
            "u",
            replayed(ev(before + 1, MemberOp::Delete, false, Own))
        ),
        Recorded::History
    );
    assert_eq!(s.with(|c| head(c, "g")).unwrap(), 0);
    assert_eq!(
        rec(&s, 1, "u", ev(before + 2, MemberOp::Upsert, false, Own)),
        Recorded::Won(1)
    );
}

/// An expected write matches only events that happened while it was under
/// way (by the daemon's clock, within the grace and the skew bound): a
/// change made at the member after the write returned — later, while the
/// member or the daemon was away — is a change, even with the expectation
/// still there; one in flight matches whenever.
#[test]
fn an_expectation_matches_only_events_from_while_its_write_was_under_way() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    expect(&s, &[1], "u", MemberOp::Upsert);
    let done = own_write_tick();
    s.with(|c| own_writes_done(c, "g", done)).unwrap();
    // The write returned a minute ago; the event happened now: a change
    // (max_skew is 10 s).
    let back_a_minute = |s: &Store| {
        s.with(|c| {
            c.execute(
                "UPDATE own_write SET done_at_ms = done_at_ms - 60000, sent_at_ms = sent_at_ms - 60000",
                [],
            )?;
            Ok(())
        })
        .unwrap()
    };
    back_a_minute(&s);
    let later = u32_time(now());
    assert_eq!(
        rec(&s, 1, "u", ev(later, MemberOp::Upsert, false, Own)),
        Recorded::Won(1)
    );
    // The change overtook the expectation.
    assert_eq!(s.with(|c| own_writes_expected(c, "g")).unwrap(), 0);
    // An echo from when the write was made matches.
    expect(&s, &[1], "v", MemberOp::Upsert);
    s.with(|c| own_writes_done(c, "g", own_write_tick()))
        .unwrap();
    assert_eq!(
        rec(
            &s,
            1,
            "v",
            ev(u32_time(now()), MemberOp::Upsert, false, Own)
        ),
        Recorded::Echo
    );
    // A write in flight when the daemon stopped returned by the call
    // timeout after it was sent: a change made at the member a minute
    // after (while the daemon was down) is a change.
    expect(&s, &[1], "w", MemberOp::Delete);
    back_a_minute(&s);
    s.with(|c| own_writes_restarted(c, 5_000)).unwrap();
    rec(&s, 2, "w", ev(past(), MemberOp::Upsert, false, Own));
    assert!(matches!(
        rec(&s, 1, "w", ev(later, MemberOp::Delete, false, Own)),
        Recorded::Won(_)
    ));
}

/// A replayed change logged after the log's reset marker was made after
/// the log restarted: never history by the replay rules (no register, or
/// from before the group ran by a clock behind), yet it still wins only
/// if newer than the register (read again after it was seen live).
#[test]
fn a_change_logged_after_a_reset_marker_is_news() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    s.with(|c| mark_started(c, "g")).unwrap();
    let after = |e: MemberEvent| MemberEvent {
        after_reset: true,
        ..replayed(e)
    };
    let t = u32_time(now());
    assert_eq!(
        rec(&s, 1, "u", after(ev(t, MemberOp::Delete, false, Own))),
        Recorded::Won(1)
    );
    // Read once more: not newer than itself.
    assert_eq!(
        rec(&s, 1, "u", after(ev(t, MemberOp::Delete, false, Own))),
        Recorded::History
    );
    // Without the marker the same delete would be history.
    assert_eq!(
        rec(&s, 1, "v", replayed(ev(t, MemberOp::Delete, false, Own))),
        Recorded::History
    );
}

/// Echoes that arrive late (a busy stream measures as a clock behind) or
/// from a member whose clock runs ahead unmeasured are still echoes: an
/// event is never later than when it was received.
#[test]
fn late_or_ahead_echoes_are_still_echoes() {
    use EchoDetection::OwnWrites as Own;
    let (_t, s) = store();
    s.with(|c| set_clock_skew(c, 1, -60)).unwrap();
    expect(&s, &[1], "u", MemberOp::Upsert);
    s.with(|c| own_writes_done(c, "g", own_write_tick()))
        .unwrap();
    assert_eq!(
        rec(
            &s,
            1,
            "u",
            ev(u32_time(now()), MemberOp::Upsert, false, Own)
        ),
        Recorded::Echo
    );
    expect(&s, &[2], "u", MemberOp::Upsert);
    s.with(|c| own_writes_done(c, "g", own_write_tick()))
        .unwrap();
    assert_eq!(
        rec(
            &s,
            2,
            "u",
            ev(u32_time(now() + 20), MemberOp::Upsert, false, Own)
        ),
        Recorded::Echo
    );
}

/// Known to hold the winner: past it, nothing of the user waiting there,
/// and a member already when it was recorded (a reconcile asked for a
/// member does not matter).
#[test]
fn who_is_known_to_hold_a_winner() {
    let (_t, s) = store();
    s.with(|c| {
        for (d, seq) in [(1, 5), (2, 5), (3, 5), (4, 2), (5, 5)] {
            c.execute(
                "INSERT INTO cursor (grp, device_id, seq) VALUES ('g', ?1, ?2)",
                [d, seq],
            )?;
        }
        // 2 has the user queued, 3 quarantined, 4 is behind, 5 joined at 4.
        super::super::add_pending(c, "g", 2, "u", 1)?;
        c.execute(
            "INSERT INTO quarantine (grp, device_id, user_id, seq, code, message, since)
             VALUES ('g', 3, 'u', 3, 'X', 'm', 0)",
            [],
        )?;
        c.execute(
            "INSERT INTO member_joined (grp, device_id, seq) VALUES ('g', 5, 4)",
            [],
        )?;
        super::super::request_reconcile(c, "g", 1, "requested by the operator", false)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(s.with(|c| given_winner(c, "g", "u", 3)).unwrap(), vec![1]);
    assert_eq!(
        s.with(|c| given_winner(c, "g", "u", 5)).unwrap(),
        vec![1, 5],
        "joined at 4, before the change at 5"
    );
    assert_eq!(s.with(|c| waiting_for(c, "g", "u", 3)).unwrap(), vec![2, 3]);
    assert_eq!(
        s.with(|c| waiting_for(c, "g", "u", 4)).unwrap(),
        vec![2],
        "a quarantine of an older change"
    );
}
