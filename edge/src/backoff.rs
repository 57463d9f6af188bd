//! Exponential backoff with full jitter for reconnecting the hub session.
//!
//! After the n-th consecutive failure the delay is drawn uniformly from
//! `[0, min(max, initial * 2^n)]`, so that many edges losing the server at once do not come
//! back in lockstep. The random draw is passed in, which keeps the arithmetic testable. The
//! agent has a richer one (`agent/src/backoff.rs`); the edge needs only this much and does not
//! depend on the agent crate.

use std::time::Duration;

/// Consecutive failures of a connection, and the delays they lead to.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, failures: 0 }
    }

    /// The ceiling the next failure's delay is drawn under.
    pub fn ceiling(&self) -> Duration {
        // Beyond 2^31 any sensible initial delay exceeds any sensible maximum.
        let factor = 1u32 << self.failures.min(31);
        self.initial.checked_mul(factor).map_or(self.max, |ceiling| ceiling.min(self.max))
    }

    /// Records a failure and answers the delay before the next attempt: `pick(ceiling)`,
    /// clamped to the ceiling. `pick` should answer uniformly in `[0, ceiling]`.
    pub fn failure(&mut self, pick: impl FnOnce(Duration) -> Duration) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        pick(ceiling).min(ceiling)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets the failures: a session stayed up long enough to count as healthy.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A uniformly random duration in `[0, ceiling]` (full jitter).
pub fn full_jitter(ceiling: Duration) -> Duration {
    use rand::Rng as _;
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_maximum_and_reset() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let ceilings: Vec<u64> = (0..6).map(|_| backoff.failure(|ceiling| ceiling).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff.failures(), 6);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn the_draw_is_clamped_and_jitter_stays_under_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(backoff.failure(|_| Duration::from_secs(99)), Duration::from_secs(1));
        assert_eq!(backoff.failure(|_| Duration::ZERO), Duration::ZERO);
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_millis(5)) <= Duration::from_millis(5));
        }
        // Many failures never overflow.
        for _ in 0..100 {
            backoff.failure(|ceiling| ceiling);
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(10));
    }
}
