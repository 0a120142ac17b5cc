//! Each device's clock against the daemon's, from its realtime events:
//! event time minus receive time. Delays on the way (a full gateway queue,
//! a busy consumer) only make an event look older, never newer, so the
//! greatest of a device's last few measurements is the closest to its real
//! skew. Fed by the gateway session's realtime stream; read by the
//! appliers of multi-master groups, which order changes by device time and
//! warn when a member's clock is off by more than the group's bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Measurements kept per device.
const KEPT: usize = 8;

/// A device's clock skew as measured lately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew {
    /// Seconds ahead of the daemon (negative: behind).
    pub secs: i64,
    /// Grows with every measurement of any device: tells a new one from
    /// one already seen.
    pub serial: u64,
}

#[derive(Debug, Default)]
pub struct ClockWatch {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    serial: u64,
    devices: HashMap<u32, VecDeque<i64>>,
    latest: HashMap<u32, Skew>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ClockWatch {
    /// A realtime event of `device` with `event_time` arrived now.
    pub fn observe(&self, device: u32, event_time: u32) {
        self.observe_at(device, event_time, now_secs());
    }

    fn observe_at(&self, device: u32, event_time: u32, now: i64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.serial += 1;
        let serial = inner.serial;
        let kept = inner.devices.entry(device).or_default();
        if kept.len() == KEPT {
            kept.pop_front();
        }
        kept.push_back(i64::from(event_time) - now);
        let secs = kept.iter().copied().max().unwrap_or(0);
        inner.latest.insert(device, Skew { secs, serial });
    }

    /// The device's skew as its last few realtime events show it.
    pub fn skew(&self, device: u32) -> Option<Skew> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .latest
            .get(&device)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_events_do_not_make_a_clock_look_behind() {
        let w = ClockWatch::default();
        assert_eq!(w.skew(1), None);
        w.observe_at(1, 1_000, 1_000);
        // Delivered 30 s late: still 0.
        w.observe_at(1, 1_000, 1_030);
        assert_eq!(w.skew(1).map(|s| s.secs), Some(0));
        let ahead = ClockWatch::default();
        ahead.observe_at(2, 1_120, 1_000);
        assert_eq!(ahead.skew(2).map(|s| s.secs), Some(120));
        // Once the old measurements are gone, a clock set right shows.
        for _ in 0..KEPT {
            ahead.observe_at(2, 2_000, 2_000);
        }
        assert_eq!(ahead.skew(2).map(|s| s.secs), Some(0));
        let behind = ClockWatch::default();
        behind.observe_at(3, 700, 1_000);
        let first = behind.skew(3).unwrap();
        assert_eq!(first.secs, -300);
        behind.observe_at(3, 701, 1_001);
        assert!(behind.skew(3).unwrap().serial > first.serial);
    }
}
