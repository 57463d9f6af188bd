//! The rate limit of failed logins, per client address and per e-mail address: a few free
//! failures, then each failure locks the key out for twice as long as the one before (1 s up to
//! 15 min). A success clears the e-mail address's count. Pure (the caller passes `now`) and
//! bounded: at most [`MAX_ENTRIES`] keys are remembered, idle ones are forgotten first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Failures allowed before the first lockout.
pub const FREE_FAILURES: u32 = 5;
/// The first lockout; each further failure doubles it.
pub const FIRST_LOCKOUT: Duration = Duration::from_secs(1);
/// The longest lockout.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// How long a key's failures are remembered after its last one (when not locked).
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
/// How many keys are remembered at most.
pub const MAX_ENTRIES: usize = 10_000;

/// What failed logins are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Address(String),
    Email(String),
}

impl LimitKey {
    /// The key of an e-mail address, case-insensitive.
    pub fn email(email: &str) -> Self {
        LimitKey::Email(email.trim().to_lowercase())
    }
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    locked_until: Instant,
    last_failure: Instant,
}

/// Failed logins by key.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    entries: HashMap<LimitKey, Entry>,
}

impl LoginLimiter {
    /// `Err(wait)` if any of `keys` is locked out at `now`, with how long the longest lock lasts.
    pub fn check(&self, keys: &[LimitKey], now: Instant) -> Result<(), Duration> {
        let wait = keys
            .iter()
            .filter_map(|key| self.entries.get(key))
            .map(|entry| entry.locked_until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Counts a failure against each of `keys`.
    pub fn failed(&mut self, keys: &[LimitKey], now: Instant) {
        if self.entries.len() + keys.len() > MAX_ENTRIES {
            self.forget_idle(now);
        }
        for key in keys {
            let entry =
                self.entries.entry(key.clone()).or_insert(Entry { failures: 0, locked_until: now, last_failure: now });
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = now;
            if entry.failures > FREE_FAILURES {
                let doublings = (entry.failures - FREE_FAILURES - 1).min(20);
                let lockout = FIRST_LOCKOUT.saturating_mul(1 << doublings).min(MAX_LOCKOUT);
                entry.locked_until = now + lockout;
            }
        }
    }

    /// Clears the count of `key` after a successful login.
    pub fn succeeded(&mut self, key: &LimitKey) {
        self.entries.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets keys that are neither locked nor recently failed; if that is not enough, the
    /// ones whose last failure is oldest, down to three quarters of the bound.
    fn forget_idle(&mut self, now: Instant) {
        self.entries.retain(|_, entry| {
            entry.locked_until > now || now.saturating_duration_since(entry.last_failure) < FORGET_AFTER
        });
        let target = MAX_ENTRIES / 4 * 3;
        if self.entries.len() > target {
            let mut by_age: Vec<(Instant, LimitKey)> =
                self.entries.iter().map(|(key, entry)| (entry.last_failure, key.clone())).collect();
            by_age.sort_by_key(|(last, _)| *last);
            let excess = self.entries.len() - target;
            for (_, key) in by_age.into_iter().take(excess) {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockouts_start_after_the_free_failures_and_double() {
        let mut limiter = LoginLimiter::default();
        let start = Instant::now();
        let keys = [LimitKey::Address("192.0.2.1".into()), LimitKey::email("Ada@Example.test")];
        for _ in 0..FREE_FAILURES {
            assert_eq!(limiter.check(&keys, start), Ok(()));
            limiter.failed(&keys, start);
        }
        assert_eq!(limiter.check(&keys, start), Ok(()), "the free failures lock nothing");
        limiter.failed(&keys, start);
        assert_eq!(limiter.check(&keys, start), Err(FIRST_LOCKOUT));
        let later = start + FIRST_LOCKOUT;
        assert_eq!(limiter.check(&keys, later), Ok(()), "the lock ends");
        limiter.failed(&keys, later);
        assert_eq!(limiter.check(&keys, later), Err(FIRST_LOCKOUT * 2), "and doubles");
        // Either key alone is locked: the same e-mail address from another client too.
        assert!(limiter.check(&[LimitKey::email("ada@example.test")], later).is_err());
        assert!(limiter.check(&[LimitKey::Address("192.0.2.2".into())], later).is_ok());
    }

    #[test]
    fn lockouts_are_capped_and_success_clears_the_email() {
        let mut limiter = LoginLimiter::default();
        let now = Instant::now();
        let key = LimitKey::email("ada@example.test");
        for _ in 0..100 {
            limiter.failed(std::slice::from_ref(&key), now);
        }
        assert_eq!(limiter.check(std::slice::from_ref(&key), now), Err(MAX_LOCKOUT));
        limiter.succeeded(&key);
        assert_eq!(limiter.check(std::slice::from_ref(&key), now), Ok(()));
    }

    #[test]
    fn memory_is_bounded() {
        let mut limiter = LoginLimiter::default();
        let now = Instant::now();
        for i in 0..(MAX_ENTRIES + 100) {
            limiter.failed(&[LimitKey::Address(format!("client-{i}"))], now);
        }
        assert!(limiter.len() <= MAX_ENTRIES, "{} entries", limiter.len());
    }
}
