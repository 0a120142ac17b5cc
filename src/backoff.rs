//! Capped exponential backoff with jitter, used wherever something is
//! retried (gateway sessions, device set-up, failed targets). The policy
//! lives here, outside the loops that use it.

use std::time::Duration;

use rand::Rng;

/// Bounds of a backoff; construct with [`Backoff::new`], which validates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid backoff: min {min:?} must be > 0 and <= max {max:?}")]
pub struct InvalidBackoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if min.is_zero() || min > max {
            return Err(InvalidBackoff { min, max });
        }
        Ok(Backoff { min, max })
    }

    /// Gateway sessions: 1 s doubling to 60 s.
    pub fn gateway() -> Self {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }

    /// Devices and targets: 500 ms doubling to 30 s.
    pub fn device() -> Self {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }

    /// The ceiling for `attempt` (0 = first retry): min · 2^attempt, capped.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// A delay drawn uniformly from [ceiling/2, ceiling] ("equal jitter"), so
    /// many devices failing together do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=spread))
    }
}

/// Waits until a retry is due: `at`, or forever when none is pending (a
/// `select!` arm that never fires).
pub async fn retry_at(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_validated() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn grows_caps_and_jitters_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).unwrap();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(30), Duration::from_secs(5));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(5));
        for attempt in 0..40 {
            let d = b.delay(attempt);
            assert!(
                d <= b.ceiling(attempt) && d >= b.ceiling(attempt) / 2,
                "{d:?}"
            );
        }
    }
}
