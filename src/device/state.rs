//! A device's connection life cycle as a pure function
//! `(state, input) → (state, actions)`, tested without I/O. The task in
//! `task.rs` feeds it inputs and performs the actions.
//!
//! Disconnected → Connected (link up: enable monitoring) → CatchingUp
//! (monitoring on: replay the log from the checkpoint) → Live. Failures go to
//! Backoff, which retries from Connected. Monitoring is assumed not to
//! survive a reconnect (WIRE.md B12), so every link-up starts over.

use std::time::Duration;

use crate::backoff::Backoff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// No link to the device through the gateway.
    Disconnected,
    /// Link up; monitoring being enabled. `attempt` counts failed set-ups
    /// since the device was last Live.
    Connected { attempt: u32 },
    /// Monitoring on; the event consumer is replaying the log.
    CatchingUp { attempt: u32 },
    /// Caught up; realtime events flow; targets may be written.
    Live,
    /// Set-up failed; retried after a delay.
    Backoff { attempt: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The gateway reports the device connected (TCP or TLS).
    LinkUp,
    /// The gateway reports it disconnected or failing, or the gateway
    /// session itself ended.
    LinkDown,
    MonitoringEnabled,
    MonitoringFailed,
    CaughtUp,
    CatchUpFailed,
    RetryElapsed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    EnableMonitoring,
    CatchUp,
    RetryAfter(Duration),
}

/// What other parts of the daemon see of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Disconnected,
    SettingUp,
    Live,
    Backoff,
}

impl DeviceState {
    pub fn phase(self) -> Phase {
        match self {
            DeviceState::Disconnected => Phase::Disconnected,
            DeviceState::Connected { .. } | DeviceState::CatchingUp { .. } => Phase::SettingUp,
            DeviceState::Live => Phase::Live,
            DeviceState::Backoff { .. } => Phase::Backoff,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Disconnected => "disconnected",
            DeviceState::Connected { .. } => "connected",
            DeviceState::CatchingUp { .. } => "catching-up",
            DeviceState::Live => "live",
            DeviceState::Backoff { .. } => "backoff",
        }
    }
}

/// The transition function. Inputs that make no sense in a state (a late
/// answer after the link dropped) leave it unchanged.
pub fn transition(
    state: DeviceState,
    input: Input,
    backoff: &Backoff,
) -> (DeviceState, Vec<Action>) {
    use Action::*;
    use DeviceState::*;
    match (state, input) {
        (_, Input::LinkDown) => (Disconnected, vec![]),
        // A (re)connect always starts over: monitoring may be gone.
        (Disconnected | Live, Input::LinkUp) => (Connected { attempt: 0 }, vec![EnableMonitoring]),
        (Connected { attempt }, Input::MonitoringEnabled) => {
            (CatchingUp { attempt }, vec![CatchUp])
        }
        (Connected { attempt }, Input::MonitoringFailed)
        | (CatchingUp { attempt }, Input::CatchUpFailed) => (
            Backoff {
                attempt: attempt.saturating_add(1),
            },
            vec![RetryAfter(backoff.delay(attempt))],
        ),
        (CatchingUp { .. }, Input::CaughtUp) => (Live, vec![]),
        (Backoff { attempt }, Input::RetryElapsed) => {
            (Connected { attempt }, vec![EnableMonitoring])
        }
        // Link-up while setting up or backing off: the set-up under way
        // covers it.
        (s, _) => (s, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).unwrap()
    }

    #[test]
    fn happy_path() {
        let (s, a) = transition(DeviceState::Disconnected, Input::LinkUp, &b());
        assert_eq!(
            (s, a),
            (
                DeviceState::Connected { attempt: 0 },
                vec![Action::EnableMonitoring]
            )
        );
        let (s, a) = transition(s, Input::MonitoringEnabled, &b());
        assert_eq!(
            (s, a),
            (
                DeviceState::CatchingUp { attempt: 0 },
                vec![Action::CatchUp]
            )
        );
        let (s, a) = transition(s, Input::CaughtUp, &b());
        assert_eq!((s, a), (DeviceState::Live, vec![]));
        assert_eq!(s.phase(), Phase::Live);
        // A reconnect we did not see go down re-enables monitoring.
        let (s, a) = transition(s, Input::LinkUp, &b());
        assert_eq!(
            (s, a),
            (
                DeviceState::Connected { attempt: 0 },
                vec![Action::EnableMonitoring]
            )
        );
    }

    #[test]
    fn failures_back_off_with_growing_delays() {
        let mut s = DeviceState::Connected { attempt: 0 };
        let mut last = Duration::ZERO;
        for i in 0..6 {
            let (next, a) = transition(s, Input::MonitoringFailed, &b());
            assert_eq!(next, DeviceState::Backoff { attempt: i + 1 });
            let [Action::RetryAfter(d)] = a[..] else {
                panic!("{a:?}")
            };
            assert!(d <= b().ceiling(i) && d >= b().ceiling(i) / 2);
            assert!(b().ceiling(i) >= last);
            last = b().ceiling(i);
            let (next, a) = transition(next, Input::RetryElapsed, &b());
            assert_eq!(a, vec![Action::EnableMonitoring]);
            s = next;
        }
        let (s, _) = transition(
            DeviceState::CatchingUp { attempt: 2 },
            Input::CatchUpFailed,
            &b(),
        );
        assert_eq!(s, DeviceState::Backoff { attempt: 3 });
    }

    #[test]
    fn late_answers_are_ignored() {
        for s in [
            DeviceState::Disconnected,
            DeviceState::Live,
            DeviceState::Backoff { attempt: 1 },
        ] {
            for i in [
                Input::MonitoringEnabled,
                Input::CaughtUp,
                Input::CatchUpFailed,
            ] {
                assert_eq!(transition(s, i, &b()), (s, vec![]), "{s:?} {i:?}");
            }
        }
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            Just(Input::LinkUp),
            Just(Input::LinkDown),
            Just(Input::MonitoringEnabled),
            Just(Input::MonitoringFailed),
            Just(Input::CaughtUp),
            Just(Input::CatchUpFailed),
            Just(Input::RetryElapsed),
        ]
    }

    proptest! {
        /// Against a simple model: the device is Live exactly when, since
        /// the last link-down, the last completed set-up (link-up → monitoring
        /// enabled → caught up) was not interrupted; LinkDown always
        /// disconnects; an action is only ever asked for in the state that
        /// needs it.
        #[test]
        fn invariants_hold(inputs in proptest::collection::vec(input(), 0..60)) {
            let mut s = DeviceState::Disconnected;
            for i in inputs {
                let (next, actions) = transition(s, i, &b());
                if i == Input::LinkDown {
                    prop_assert_eq!(next, DeviceState::Disconnected);
                }
                if next == DeviceState::Live {
                    prop_assert!(s == DeviceState::Live || (matches!(s, DeviceState::CatchingUp { .. }) && i == Input::CaughtUp), "Live reached from {:?} by {:?}", s, i);
                }
                for a in &actions {
                    match a {
                        Action::EnableMonitoring => prop_assert!(matches!(next, DeviceState::Connected { .. }), "EnableMonitoring in {:?}", next),
                        Action::CatchUp => prop_assert!(matches!(next, DeviceState::CatchingUp { .. }), "CatchUp in {:?}", next),
                        Action::RetryAfter(d) => {
                            prop_assert!(matches!(next, DeviceState::Backoff { .. }), "retry in {:?}", next);
                            prop_assert!(*d <= Duration::from_secs(2));
                        }
                    }
                }
                prop_assert!(actions.len() <= 1);
                s = next;
            }
        }
    }
}
