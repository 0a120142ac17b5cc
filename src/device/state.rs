//! A device's connection life cycle as a pure function
//! `(state, input) → (state, actions)`, tested without I/O. The task in
//! `task.rs` feeds it inputs and performs the actions.
//!
//! Disconnected → Connected (link up: enable monitoring) → CatchingUp
//! (monitoring on: replay the log from the checkpoint) → Live. Failures go to
//! Backoff, which retries from Connected. Monitoring is assumed not to
//! survive a reconnect (WIRE.md B12), so every link-up starts over.

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
    /// Set-up failed `attempt` times; retried after a delay.
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
    /// Ask the gateway to enable monitoring; answers `MonitoringEnabled`
    /// or `MonitoringFailed`.
    EnableMonitoring,
    /// Ask the event consumer to catch the device up; answers `CaughtUp`
    /// or `CatchUpFailed`.
    CatchUp,
    /// Stop waiting for the answer of the operation under way (its late
    /// answer would be ignored anyway).
    Abandon,
    /// Answer `RetryElapsed` after the backoff's delay for `attempt`; the
    /// task draws the delay (the policy and its jitter live in
    /// [`crate::backoff`], not here).
    RetryAfter { attempt: u32 },
    /// Forget a pending `RetryAfter`.
    CancelRetry,
}

impl Input {
    /// The name logs and the device status use.
    pub fn name(self) -> &'static str {
        match self {
            Input::LinkUp => "link-up",
            Input::LinkDown => "link-down",
            Input::MonitoringEnabled => "monitoring-enabled",
            Input::MonitoringFailed => "monitoring-failed",
            Input::CaughtUp => "caught-up",
            Input::CatchUpFailed => "catch-up-failed",
            Input::RetryElapsed => "retry-elapsed",
        }
    }
}

/// What other parts of the daemon see of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Disconnected,
    /// Connected, being set up (monitoring, replay): shown as
    /// `catching-up`.
    CatchingUp,
    Live,
    Backoff,
}

impl DeviceState {
    pub fn phase(self) -> Phase {
        match self {
            DeviceState::Disconnected => Phase::Disconnected,
            DeviceState::Connected { .. } | DeviceState::CatchingUp { .. } => Phase::CatchingUp,
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

/// The transition function: every (state, input) pair is listed, so a new
/// input or state does not compile until each combination is decided.
/// Answers that arrive in a state that no longer waits for them (a late
/// answer after the link dropped) leave it unchanged.
pub fn transition(state: DeviceState, input: Input) -> (DeviceState, Vec<Action>) {
    use Action::*;
    use DeviceState::*;
    match (state, input) {
        // The link went down: whatever was under way is moot.
        (Disconnected | Live, Input::LinkDown) => (Disconnected, vec![]),
        (Connected { .. } | CatchingUp { .. }, Input::LinkDown) => (Disconnected, vec![Abandon]),
        (Backoff { .. }, Input::LinkDown) => (Disconnected, vec![CancelRetry]),

        // A (re)connect always starts over: monitoring may be gone
        // (WIRE.md B12), also on a reconnect we did not see go down.
        (Disconnected | Live, Input::LinkUp) => (Connected { attempt: 0 }, vec![EnableMonitoring]),
        // Link-up while setting up or backing off: the set-up under way (or
        // the retry) covers it.
        (Connected { .. } | CatchingUp { .. } | Backoff { .. }, Input::LinkUp) => (state, vec![]),

        (Connected { attempt }, Input::MonitoringEnabled) => {
            (CatchingUp { attempt }, vec![CatchUp])
        }
        (Connected { attempt }, Input::MonitoringFailed)
        | (CatchingUp { attempt }, Input::CatchUpFailed) => (
            Backoff {
                attempt: attempt.saturating_add(1),
            },
            vec![RetryAfter { attempt }],
        ),
        (CatchingUp { .. }, Input::CaughtUp) => (Live, vec![]),
        (Backoff { attempt }, Input::RetryElapsed) => {
            (Connected { attempt }, vec![EnableMonitoring])
        }

        // Answers and timers nobody waits for any more.
        (
            Disconnected | Live | CatchingUp { .. } | Backoff { .. },
            Input::MonitoringEnabled | Input::MonitoringFailed,
        )
        | (
            Disconnected | Live | Connected { .. } | Backoff { .. },
            Input::CaughtUp | Input::CatchUpFailed,
        )
        | (Disconnected | Live | Connected { .. } | CatchingUp { .. }, Input::RetryElapsed) => {
            (state, vec![])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn happy_path() {
        let (s, a) = transition(DeviceState::Disconnected, Input::LinkUp);
        assert_eq!(
            (s, a),
            (
                DeviceState::Connected { attempt: 0 },
                vec![Action::EnableMonitoring]
            )
        );
        let (s, a) = transition(s, Input::MonitoringEnabled);
        assert_eq!(
            (s, a),
            (
                DeviceState::CatchingUp { attempt: 0 },
                vec![Action::CatchUp]
            )
        );
        let (s, a) = transition(s, Input::CaughtUp);
        assert_eq!((s, a), (DeviceState::Live, vec![]));
        assert_eq!(s.phase(), Phase::Live);
        // A reconnect we did not see go down re-enables monitoring.
        let (s, a) = transition(s, Input::LinkUp);
        assert_eq!(
            (s, a),
            (
                DeviceState::Connected { attempt: 0 },
                vec![Action::EnableMonitoring]
            )
        );
    }

    #[test]
    fn failures_back_off_with_growing_attempts() {
        let mut s = DeviceState::Connected { attempt: 0 };
        for i in 0..6 {
            let (next, a) = transition(s, Input::MonitoringFailed);
            assert_eq!(next, DeviceState::Backoff { attempt: i + 1 });
            assert_eq!(a, vec![Action::RetryAfter { attempt: i }]);
            let (next, a) = transition(next, Input::RetryElapsed);
            assert_eq!(next, DeviceState::Connected { attempt: i + 1 });
            assert_eq!(a, vec![Action::EnableMonitoring]);
            s = next;
        }
        let (s, a) = transition(DeviceState::CatchingUp { attempt: 2 }, Input::CatchUpFailed);
        assert_eq!(s, DeviceState::Backoff { attempt: 3 });
        assert_eq!(a, vec![Action::RetryAfter { attempt: 2 }]);
        // Live again: the next failure starts from the first delay.
        let (s, _) = transition(DeviceState::Live, Input::LinkUp);
        assert_eq!(
            transition(s, Input::MonitoringFailed).1,
            vec![Action::RetryAfter { attempt: 0 }]
        );
    }

    #[test]
    fn a_link_down_abandons_what_is_under_way() {
        for s in [
            DeviceState::Connected { attempt: 1 },
            DeviceState::CatchingUp { attempt: 0 },
        ] {
            assert_eq!(
                transition(s, Input::LinkDown),
                (DeviceState::Disconnected, vec![Action::Abandon])
            );
        }
        assert_eq!(
            transition(DeviceState::Backoff { attempt: 2 }, Input::LinkDown),
            (DeviceState::Disconnected, vec![Action::CancelRetry])
        );
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
                assert_eq!(transition(s, i), (s, vec![]), "{s:?} {i:?}");
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
                let (next, actions) = transition(s, i);
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
                        Action::RetryAfter { attempt } => {
                            prop_assert_eq!(next, DeviceState::Backoff { attempt: attempt + 1 });
                        }
                        Action::Abandon => prop_assert!(matches!(s, DeviceState::Connected { .. } | DeviceState::CatchingUp { .. }), "abandon from {:?}", s),
                        Action::CancelRetry => prop_assert!(matches!(s, DeviceState::Backoff { .. }), "cancel retry from {:?}", s),
                    }
                }
                prop_assert!(actions.len() <= 1);
                s = next;
            }
        }
    }
}
