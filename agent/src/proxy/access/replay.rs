//! The login assertions already used, so that each is accepted once.
//!
//! An assertion carries a unique `jti`; the guard remembers it until the assertion could no
//! longer be accepted anyway (its expiry plus the allowed clock skew). Memory is bounded: past
//! `max_entries`, the oldest entries go first. Only assertions with a valid server signature
//! reach the guard, so filling it takes the server's cooperation.

use std::collections::{HashMap, VecDeque};

use edgible::access::CLOCK_SKEW_SECONDS;

/// Remembers used `jti`s.
#[derive(Debug)]
pub struct ReplayGuard {
    max_entries: usize,
    /// `jti` → Unix second after which it can be forgotten.
    seen: HashMap<String, i64>,
    /// Insertion order, for pruning and eviction.
    order: VecDeque<String>,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        Self::new(50_000)
    }
}

impl ReplayGuard {
    pub fn new(max_entries: usize) -> Self {
        Self { max_entries: max_entries.max(1), seen: HashMap::new(), order: VecDeque::new() }
    }

    /// Records `jti` (of an assertion expiring at `expires`, Unix seconds) and says whether it
    /// is new; `false` is a replay.
    pub fn first_use(&mut self, jti: &str, expires: i64, now: i64) -> bool {
        self.prune(now);
        if let Some(forget_at) = self.seen.get(jti)
            && *forget_at > now
        {
            return false;
        }
        let forget_at = expires.saturating_add(CLOCK_SKEW_SECONDS);
        if self.seen.insert(jti.to_owned(), forget_at).is_none() {
            self.order.push_back(jti.to_owned());
        }
        while self.seen.len() > self.max_entries {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.seen.remove(&oldest);
                }
                None => break,
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops expired entries from the front. Assertions live about as long as each other, so
    /// insertion order is close to expiry order; an entry stuck behind a longer-lived one is
    /// dropped a little later, never earlier.
    fn prune(&mut self, now: i64) {
        while let Some(oldest) = self.order.front() {
            match self.seen.get(oldest) {
                Some(forget_at) if *forget_at > now => break,
                _ => {
                    if let Some(oldest) = self.order.pop_front() {
                        self.seen.remove(&oldest);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_until_it_could_no_longer_be_valid() {
        let mut guard = ReplayGuard::default();
        let now = 1_000_000;
        assert!(guard.first_use("a", now + 60, now));
        assert!(!guard.first_use("a", now + 60, now + 1));
        assert!(guard.first_use("b", now + 60, now + 1));
        // Within the clock skew after expiry, still a replay.
        assert!(!guard.first_use("a", now + 60, now + 60 + CLOCK_SKEW_SECONDS - 1));
        // Afterwards the entries are gone (the assertion itself would be refused as expired).
        assert!(guard.first_use("c", now + 1000, now + 60 + CLOCK_SKEW_SECONDS));
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest() {
        let mut guard = ReplayGuard::new(3);
        let now = 1_000_000;
        for jti in ["a", "b", "c", "d"] {
            assert!(guard.first_use(jti, now + 60, now));
        }
        assert_eq!(guard.len(), 3);
        assert!(!guard.first_use("d", now + 60, now));
        assert!(guard.first_use("a", now + 60, now), "the oldest was evicted");
    }
}
