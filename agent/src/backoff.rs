//! Exponential backoff with full jitter, reset after a healthy period.
//!
//! Used for restarting failed workloads (per application) and, later, for reconnecting the push
//! session. The delay after the n-th consecutive failure is drawn uniformly from
//! `[0, min(max, initial * 2^n)]` ("full jitter"), so that many agents failing at once spread
//! their retries instead of retrying in lockstep. The failure count only resets once the
//! subject has been healthy for `reset_after`, so that a workload which crashes a few seconds
//! after every start still backs off.
//!
//! Nothing here reads a clock or a random source on its own: callers pass `now` and a
//! [`Jitter`], which keeps the arithmetic unit testable.

use std::time::Duration;

use tokio::time::Instant;

/// The shape of a backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// The largest ceiling, however many failures happened.
    pub max: Duration,
    /// How long the subject must stay healthy before the failure count resets.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_millis(500), max: Duration::from_secs(60), reset_after: Duration::from_secs(60) }
    }
}

/// A source of randomness for jitter: picks a duration uniformly in `[0, ceiling]`.
pub trait Jitter {
    fn pick(&mut self, ceiling: Duration) -> Duration;
}

/// Jitter from the thread-local random generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn pick(&mut self, ceiling: Duration) -> Duration {
        use rand::Rng;
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// The backoff state of one subject (an application, a connection).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    healthy_since: Option<Instant>,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self { policy, failures: 0, healthy_since: None }
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling of the delay the next failure will draw from.
    pub fn ceiling(&self) -> Duration {
        // 2^31 times any initial delay is beyond every sensible maximum, so capping the
        // exponent keeps the multiplication from overflowing without changing the result.
        let factor = 1u32 << self.failures.min(31);
        self.policy.initial.checked_mul(factor).map_or(self.policy.max, |ceiling| ceiling.min(self.policy.max))
    }

    /// Records a failure and answers how long to wait before the next attempt.
    pub fn failure(&mut self, jitter: &mut impl Jitter) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        self.healthy_since = None;
        jitter.pick(ceiling).min(ceiling)
    }

    /// Records that the subject is healthy at `now`; once it has been healthy without a
    /// failure for `reset_after`, the failure count resets. Answers whether it did.
    pub fn healthy(&mut self, now: Instant) -> bool {
        match self.healthy_since {
            None => {
                self.healthy_since = Some(now);
                false
            }
            Some(since) if self.failures > 0 && now.saturating_duration_since(since) >= self.policy.reset_after => {
                self.failures = 0;
                true
            }
            Some(_) => false,
        }
    }

    /// Jumps to the largest ceiling, as after many failures: for a failure that retrying soon
    /// cannot fix.
    pub fn saturate(&mut self) {
        while self.ceiling() < self.policy.max && self.failures < 32 {
            self.failures += 1;
        }
        self.healthy_since = None;
    }

    /// Forgets every failure, for example because what failed was replaced.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.healthy_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Always picks the same fraction of the ceiling.
    struct Fraction(f64);

    impl Jitter for Fraction {
        fn pick(&mut self, ceiling: Duration) -> Duration {
            ceiling.mul_f64(self.0)
        }
    }

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            reset_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let mut backoff = Backoff::new(policy());
        let delays: Vec<Duration> = (0..8).map(|_| backoff.failure(&mut Fraction(1.0))).collect();
        let millis: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(backoff.failures(), 8);
    }

    #[test]
    fn full_jitter_draws_between_zero_and_the_ceiling() {
        let mut backoff = Backoff::new(policy());
        assert_eq!(backoff.failure(&mut Fraction(0.0)), Duration::ZERO);
        assert_eq!(backoff.failure(&mut Fraction(0.5)), Duration::from_millis(100));
        let mut random = Backoff::new(policy());
        for _ in 0..100 {
            let ceiling = random.ceiling();
            assert!(random.failure(&mut RandomJitter) <= ceiling);
        }
    }

    #[test]
    fn a_jitter_beyond_the_ceiling_is_clamped() {
        let mut backoff = Backoff::new(policy());
        assert_eq!(backoff.failure(&mut Fraction(7.0)), Duration::from_millis(100));
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut backoff = Backoff::new(BackoffPolicy { max: Duration::MAX, ..policy() });
        for _ in 0..100 {
            backoff.failure(&mut Fraction(1.0));
        }
        assert_eq!(backoff.ceiling(), Duration::from_millis(100) * (1 << 31));
    }

    #[test]
    fn the_count_resets_only_after_a_healthy_period() {
        let start = Instant::now();
        let mut backoff = Backoff::new(policy());
        backoff.failure(&mut Fraction(1.0));
        backoff.failure(&mut Fraction(1.0));
        assert!(!backoff.healthy(start));
        assert!(!backoff.healthy(start + Duration::from_secs(9)));
        assert_eq!(backoff.failures(), 2);
        assert!(backoff.healthy(start + Duration::from_secs(10)));
        assert_eq!(backoff.failures(), 0);
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn saturating_jumps_to_the_largest_ceiling() {
        let mut backoff = Backoff::new(policy());
        backoff.saturate();
        assert_eq!(backoff.ceiling(), Duration::from_secs(2));
        assert_eq!(backoff.failure(&mut Fraction(1.0)), Duration::from_secs(2));
        let mut unbounded = Backoff::new(BackoffPolicy { max: Duration::MAX, ..policy() });
        unbounded.saturate();
        assert_eq!(unbounded.failures(), 32, "an unbounded maximum does not loop forever");
    }

    #[test]
    fn a_failure_interrupts_the_healthy_period() {
        let start = Instant::now();
        let mut backoff = Backoff::new(policy());
        backoff.failure(&mut Fraction(1.0));
        backoff.healthy(start);
        // The workload crashed again after five healthy seconds: the clock starts over.
        backoff.failure(&mut Fraction(1.0));
        assert!(!backoff.healthy(start + Duration::from_secs(5)));
        assert!(!backoff.healthy(start + Duration::from_secs(14)));
        assert_eq!(backoff.failures(), 2);
        assert!(backoff.healthy(start + Duration::from_secs(15)));
        assert_eq!(backoff.failures(), 0);
    }
}
