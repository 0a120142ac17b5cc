//! The rules of a multi-master group, pure: which change of a user wins
//! (last writer wins, ordered by event time, then member ID), how an event
//! time too far ahead of the daemon's clock is bounded, and whether an
//! event is a member's own change or the echo of the daemon's write.
//!
//! The store applies them when it records an event (`store::multi`); the
//! property tests here check them against a model.

use crate::config::EchoDetection;

/// Where a change sits in the order: its event time (seconds, as the
/// member's clock said, bounded by [`bound`]), then the member's device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub time: u32,
    pub device: u32,
}

/// A user's state as one change left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub stamp: Stamp,
    /// A delete: a tombstone, ordered like any change, so an older enroll
    /// arriving late cannot bring the user back.
    pub deleted: bool,
}

/// What recording a change does to the user's register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The change wins: the register takes this version.
    Replace(Version),
    /// The recorded change is newer: the change is ignored, and the member
    /// that made it must be set back to the recorded version.
    Keep,
}

/// Merges `incoming` into the register `stored`.
///
/// Across members the greater (time, device) wins; an equal stamp is not
/// older (it can only be the same member's change, read again). Within one
/// member, log order decides: a member's later event wins even if its clock
/// went back, and keeps the greater time (it happened after the earlier
/// one), so its clock going back cannot make it lose to a change it
/// followed.
///
/// A `replayed` change (read again from a log's oldest record after a
/// reset) is not known to follow anything: its place in the log says
/// nothing about the register, which may hold a later change of the same
/// member. It wins only if its (time, device) is strictly newer; otherwise
/// an old delete read again would become the winner and be applied to
/// every member.
pub fn merge(stored: Option<&Version>, incoming: Version, replayed: bool) -> Merge {
    match stored {
        None => Merge::Replace(incoming),
        Some(s) if replayed => {
            if incoming.stamp > s.stamp {
                Merge::Replace(incoming)
            } else {
                Merge::Keep
            }
        }
        Some(s) if s.stamp.device == incoming.stamp.device => Merge::Replace(Version {
            stamp: Stamp {
                time: s.stamp.time.max(incoming.stamp.time),
                device: incoming.stamp.device,
            },
            deleted: incoming.deleted,
        }),
        Some(s) if incoming.stamp >= s.stamp => Merge::Replace(incoming),
        Some(_) => Merge::Keep,
    }
}

/// An event time bounded by the daemon's clock: no event can be received
/// before it happens, so a time more than `max_skew` seconds ahead of
/// `now` is a clock running ahead, and is taken as `now + max_skew`.
/// Otherwise a member whose clock runs a day ahead would win every
/// conflict for a day (a delete made elsewhere meanwhile would be
/// ignored). Returns the time to order by and whether it was bounded.
pub fn bound(time: u32, now: u32, max_skew: u32) -> (u32, bool) {
    let limit = now.saturating_add(max_skew);
    if time > limit {
        (limit, true)
    } else {
        (time, false)
    }
}

/// The echo detection in force for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InForce {
    ChangedOnDevice,
    OwnWrites,
}

/// Which detection applies to a member's event: the configured one, or for
/// [`EchoDetection::Observe`] changed-on-device once that member reported
/// the flag (`seen`, or this event), own writes before (and for good at a
/// member whose firmware never sets it).
pub fn in_force(configured: EchoDetection, seen: bool, on_device: bool) -> InForce {
    match configured {
        EchoDetection::ChangedOnDevice => InForce::ChangedOnDevice,
        EchoDetection::OwnWrites => InForce::OwnWrites,
        EchoDetection::Observe if seen || on_device => InForce::ChangedOnDevice,
        EchoDetection::Observe => InForce::OwnWrites,
    }
}

/// What a member's user event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Someone changed the user at the member: recorded, ordered, spread.
    Local,
    /// The daemon's own write coming back.
    Echo,
    /// Written through the SDK by another client (`changedOnDevice` not
    /// set, not the daemon's): not a change in changed-on-device mode.
    Foreign,
}

/// Classifies an event: `own_write` says whether it matched a write the
/// daemon made there lately (same device, user and operation).
pub fn classify(mode: InForce, on_device: bool, own_write: bool) -> Origin {
    match mode {
        InForce::ChangedOnDevice if on_device => Origin::Local,
        InForce::ChangedOnDevice if own_write => Origin::Echo,
        InForce::ChangedOnDevice => Origin::Foreign,
        InForce::OwnWrites if own_write => Origin::Echo,
        InForce::OwnWrites => Origin::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn v(time: u32, device: u32, deleted: bool) -> Version {
        Version {
            stamp: Stamp { time, device },
            deleted,
        }
    }

    #[test]
    fn later_wins_then_higher_device() {
        let a = v(100, 1, false);
        assert_eq!(merge(None, a, false), Merge::Replace(a));
        assert_eq!(
            merge(Some(&a), v(101, 2, false), false),
            Merge::Replace(v(101, 2, false))
        );
        assert_eq!(merge(Some(&a), v(99, 2, false), false), Merge::Keep);
        // The same second: the higher device ID wins, both ways round.
        assert_eq!(
            merge(Some(&a), v(100, 2, true), false),
            Merge::Replace(v(100, 2, true))
        );
        assert_eq!(merge(Some(&v(100, 2, true)), a, false), Merge::Keep);
    }

    #[test]
    fn a_tombstone_is_not_undone_by_an_older_enroll() {
        let deleted = v(200, 1, true);
        assert_eq!(merge(Some(&deleted), v(150, 2, false), false), Merge::Keep);
        assert_eq!(
            merge(Some(&deleted), v(201, 2, false), false),
            Merge::Replace(v(201, 2, false))
        );
    }

    #[test]
    fn one_member_in_log_order_even_if_its_clock_went_back() {
        let first = v(200, 1, false);
        assert_eq!(
            merge(Some(&first), v(150, 1, true), false),
            Merge::Replace(v(200, 1, true))
        );
    }

    #[test]
    fn a_replayed_change_wins_only_if_strictly_newer() {
        // The register holds member 1's enroll at 1000; its log, read again
        // from the oldest record, yields its delete of long ago.
        let enrolled = v(1_000, 1, false);
        assert_eq!(merge(Some(&enrolled), v(200, 1, true), true), Merge::Keep);
        // The same change read again (equal stamp) is not newer either.
        assert_eq!(merge(Some(&enrolled), v(1_000, 1, true), true), Merge::Keep);
        assert_eq!(merge(Some(&enrolled), v(900, 2, true), true), Merge::Keep);
        // A replayed change that is newer wins, as any change.
        assert_eq!(
            merge(Some(&enrolled), v(1_001, 1, true), true),
            Merge::Replace(v(1_001, 1, true))
        );
        assert_eq!(
            merge(None, v(200, 1, true), true),
            Merge::Replace(v(200, 1, true))
        );
    }

    #[test]
    fn times_ahead_of_the_daemon_are_bounded() {
        assert_eq!(bound(1_000, 1_000, 10), (1_000, false));
        assert_eq!(bound(1_010, 1_000, 10), (1_010, false));
        assert_eq!(bound(90_000, 1_000, 10), (1_010, true));
        assert_eq!(bound(u32::MAX, u32::MAX - 1, 10), (u32::MAX, false));
        // Behind is never bounded: an event read late is old, not skewed.
        assert_eq!(bound(10, 1_000, 10), (10, false));
    }

    #[test]
    fn echo_rules() {
        use EchoDetection::*;
        assert_eq!(in_force(Observe, false, false), InForce::OwnWrites);
        assert_eq!(in_force(Observe, false, true), InForce::ChangedOnDevice);
        assert_eq!(in_force(Observe, true, false), InForce::ChangedOnDevice);
        assert_eq!(in_force(OwnWrites, true, true), InForce::OwnWrites);
        assert_eq!(
            in_force(ChangedOnDevice, false, false),
            InForce::ChangedOnDevice
        );
        let cod = InForce::ChangedOnDevice;
        assert_eq!(classify(cod, true, true), Origin::Local);
        assert_eq!(classify(cod, false, true), Origin::Echo);
        assert_eq!(classify(cod, false, false), Origin::Foreign);
        let own = InForce::OwnWrites;
        assert_eq!(classify(own, true, true), Origin::Echo);
        assert_eq!(classify(own, false, false), Origin::Local);
    }

    /// A change at a member: its user, its time, whether it deletes.
    #[derive(Debug, Clone)]
    struct Ev {
        user: u8,
        time: u32,
        deleted: bool,
    }

    /// Per member, its changes in log order (each member's times may go
    /// up and down a little: clocks are not perfect).
    fn logs() -> impl Strategy<Value = BTreeMap<u32, Vec<Ev>>> {
        let ev = (0u8..4, 0u32..40, any::<bool>()).prop_map(|(user, time, deleted)| Ev {
            user,
            time,
            deleted,
        });
        proptest::collection::btree_map(1u32..5, proptest::collection::vec(ev, 0..8), 1..4)
    }

    /// The model of the group's outcome: per user, the version of the last
    /// writer. A member's change happened after its earlier changes (log
    /// order), so its time is at least theirs; across members the greater
    /// (time, device) wins.
    fn model(logs: &BTreeMap<u32, Vec<Ev>>) -> BTreeMap<u8, Version> {
        let mut all: Vec<(Version, u8)> = Vec::new();
        for (device, evs) in logs {
            let mut floor: BTreeMap<u8, u32> = BTreeMap::new();
            for e in evs {
                let t = floor.get(&e.user).map_or(e.time, |f| (*f).max(e.time));
                floor.insert(e.user, t);
                all.push((
                    Version {
                        stamp: Stamp {
                            time: t,
                            device: *device,
                        },
                        deleted: e.deleted,
                    },
                    e.user,
                ));
            }
        }
        let mut out: BTreeMap<u8, Version> = BTreeMap::new();
        // Stable: a member's later change with an equal stamp comes later.
        all.sort_by_key(|(v, _)| v.stamp);
        for (v, user) in all {
            out.insert(user, v);
        }
        out
    }

    proptest! {
        /// For any interleaving of the members' logs (each read in its own
        /// order, the members' reads mixed at random), the registers end
        /// at the model's version, and a member whose change lost is told
        /// to take the winner (so every member ends at the winner).
        #[test]
        fn any_interleaving_ends_at_the_last_writer(
            logs in logs(),
            picks in proptest::collection::vec(0usize..8, 0..64),
        ) {
            let mut cursors: BTreeMap<u32, usize> = logs.keys().map(|d| (*d, 0)).collect();
            let mut registers: BTreeMap<u8, Version> = BTreeMap::new();
            // What each member holds: the version it wrote or was given.
            let mut holds: BTreeMap<(u32, u8), Version> = BTreeMap::new();
            let mut picks = picks.into_iter();
            loop {
                let open: Vec<u32> = cursors
                    .iter()
                    .filter(|(d, c)| **c < logs[*d].len())
                    .map(|(d, _)| *d)
                    .collect();
                if open.is_empty() {
                    break;
                }
                let device = open[picks.next().unwrap_or(0) % open.len()];
                let e = &logs[&device][cursors[&device]];
                *cursors.get_mut(&device).unwrap() += 1;
                let incoming = Version { stamp: Stamp { time: e.time, device }, deleted: e.deleted };
                holds.insert((device, e.user), incoming);
                match merge(registers.get(&e.user), incoming, false) {
                    Merge::Replace(v) => {
                        registers.insert(e.user, v);
                    }
                    // Set back to the winner.
                    Merge::Keep => {
                        holds.insert((device, e.user), registers[&e.user]);
                    }
                }
            }
            let want = model(&logs);
            prop_assert_eq!(&registers, &want);
            // Applying the registers to every member converges them: the
            // winner's own member holds it already, the rest are written.
            for (user, v) in &want {
                let at_winner = holds.get(&(v.stamp.device, *user)).map(|h| h.deleted);
                prop_assert_eq!(at_winner, Some(v.deleted));
            }
        }

        /// Bounding never moves a time back past the daemon's clock and
        /// never forward.
        #[test]
        fn bound_is_a_ceiling(time in any::<u32>(), now in any::<u32>(), skew in 1u32..100_000) {
            let (t, clamped) = bound(time, now, skew);
            prop_assert!(t <= time);
            prop_assert_eq!(clamped, t != time);
            if clamped {
                prop_assert_eq!(t, now.saturating_add(skew));
            }
        }
    }
}
