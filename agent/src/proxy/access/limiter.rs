//! Rate limiting of short-code attempts: exponential lockout after a few free failures.
//!
//! Failures are counted per client address and application (an IPv6 client counts by its /64,
//! which one subscriber usually holds whole) and, with a larger allowance, per application
//! alone, so that many addresses together cannot brute force a code either. After
//! [`LockoutPolicy::free_failures`] failures every further failure locks the key for
//! `first_lockout`, doubling each time up to `max_lockout`. While locked, attempts are refused
//! unchecked. A success clears the client's count (not the application's: that one decays).
//!
//! Memory is bounded: an entry is forgotten once its lockout ended and it saw no failure for
//! `forget_after`, and beyond `max_entries` the least recently failed entries go first.
//! Time is passed in (`now`), so every rule is tested without waiting.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use edgible::model::ApplicationId;

/// How failures turn into lockouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures allowed before the first lockout.
    pub free_failures: u32,
    /// The first lockout; each further failure doubles it.
    pub first_lockout: Duration,
    pub max_lockout: Duration,
    /// An entry without failures for this long (and not locked) is forgotten.
    pub forget_after: Duration,
}

impl LockoutPolicy {
    /// Per client and application: 5 free failures, then 1 s doubling to 15 min.
    pub const CLIENT: Self = Self {
        free_failures: 5,
        first_lockout: Duration::from_secs(1),
        max_lockout: Duration::from_secs(15 * 60),
        forget_after: Duration::from_secs(30 * 60),
    };
    /// Per application, all clients together: 100 free failures, then the same doubling.
    pub const APPLICATION: Self = Self {
        free_failures: 100,
        first_lockout: Duration::from_secs(1),
        max_lockout: Duration::from_secs(15 * 60),
        forget_after: Duration::from_secs(30 * 60),
    };

    /// The lockout after `failures` failures.
    pub fn lockout(&self, failures: u32) -> Duration {
        let Some(beyond) = failures.checked_sub(self.free_failures + 1) else { return Duration::ZERO };
        let factor = 1u32.checked_shl(beyond.min(31)).unwrap_or(u32::MAX);
        self.first_lockout.saturating_mul(factor).min(self.max_lockout)
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    locked_until: Instant,
    last_failure: Instant,
}

/// Failure counts under one policy, bounded.
#[derive(Debug)]
struct Counts<K> {
    policy: LockoutPolicy,
    max_entries: usize,
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new(policy: LockoutPolicy, max_entries: usize) -> Self {
        Self { policy, max_entries, entries: HashMap::new() }
    }

    fn locked(&self, key: &K, now: Instant) -> Option<Duration> {
        let entry = self.entries.get(key)?;
        (entry.failures > self.policy.free_failures && entry.locked_until > now).then(|| entry.locked_until - now)
    }

    fn fail(&mut self, key: K, now: Instant) {
        let entry = self.entries.entry(key).or_insert(Entry { failures: 0, locked_until: now, last_failure: now });
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
        entry.locked_until = now + self.policy.lockout(entry.failures);
        if self.entries.len() > self.max_entries {
            self.prune(now);
        }
    }

    fn clear(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Forgets stale entries, then the least recently failed down to 90% of the cap, so that a
    /// full map is not pruned at every failure.
    fn prune(&mut self, now: Instant) {
        let forget_after = self.policy.forget_after;
        self.entries.retain(|_, entry| {
            entry.locked_until > now || now.saturating_duration_since(entry.last_failure) < forget_after
        });
        let target = self.max_entries - self.max_entries / 10;
        if self.entries.len() > target {
            let mut ages: Vec<(Instant, K)> =
                self.entries.iter().map(|(key, entry)| (entry.last_failure, key.clone())).collect();
            ages.sort_by_key(|(last_failure, _)| *last_failure);
            let excess = self.entries.len() - target;
            for (_, key) in ages.into_iter().take(excess) {
                self.entries.remove(&key);
            }
        }
    }
}

/// The short-code limiter of one proxy.
#[derive(Debug)]
pub struct CodeLimiter {
    clients: Counts<(IpAddr, ApplicationId)>,
    applications: Counts<ApplicationId>,
}

impl Default for CodeLimiter {
    fn default() -> Self {
        Self::new(LockoutPolicy::CLIENT, LockoutPolicy::APPLICATION, 10_000)
    }
}

impl CodeLimiter {
    /// At most `max_entries` clients are remembered (and as many applications).
    pub fn new(client: LockoutPolicy, application: LockoutPolicy, max_entries: usize) -> Self {
        let max_entries = max_entries.max(10);
        Self { clients: Counts::new(client, max_entries), applications: Counts::new(application, max_entries) }
    }

    /// How long `client` must wait before trying a code for `application`; `None` when it may
    /// try now.
    pub fn locked(&self, client: IpAddr, application: ApplicationId, now: Instant) -> Option<Duration> {
        let client = self.clients.locked(&(prefix(client), application), now);
        let application = self.applications.locked(&application, now);
        client.max(application)
    }

    /// A wrong code.
    pub fn failed(&mut self, client: IpAddr, application: ApplicationId, now: Instant) {
        self.clients.fail((prefix(client), application), now);
        self.applications.fail(application, now);
    }

    /// A right code: the client starts afresh.
    pub fn succeeded(&mut self, client: IpAddr, application: ApplicationId) {
        self.clients.clear(&(prefix(client), application));
    }

    /// How many clients are remembered.
    pub fn len(&self) -> usize {
        self.clients.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.entries.is_empty()
    }
}

/// The address a client is counted by: an IPv4 address itself, an IPv6 address by its /64.
fn prefix(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn lockouts_start_after_the_free_failures_and_double_up_to_the_cap() {
        let policy = LockoutPolicy::CLIENT;
        let lockouts: Vec<u64> = (1..=20).map(|failures| policy.lockout(failures).as_secs()).collect();
        assert_eq!(&lockouts[..5], [0, 0, 0, 0, 0]);
        assert_eq!(&lockouts[5..11], [1, 2, 4, 8, 16, 32]);
        assert_eq!(lockouts[19], 900);
        assert_eq!(policy.lockout(u32::MAX), Duration::from_secs(900));
    }

    #[test]
    fn a_client_is_locked_out_after_its_free_failures_and_others_are_not() {
        let mut limiter = CodeLimiter::default();
        let (attacker, neighbour, application) = (ip("203.0.113.7"), ip("203.0.113.8"), ApplicationId::new());
        let start = Instant::now();
        for attempt in 0..5 {
            assert_eq!(limiter.locked(attacker, application, start), None, "attempt {attempt} is free");
            limiter.failed(attacker, application, start);
        }
        assert_eq!(limiter.locked(attacker, application, start), None);
        limiter.failed(attacker, application, start);
        assert_eq!(limiter.locked(attacker, application, start), Some(Duration::from_secs(1)));
        assert_eq!(limiter.locked(attacker, application, start + Duration::from_secs(1)), None);
        limiter.failed(attacker, application, start + Duration::from_secs(1));
        assert_eq!(limiter.locked(attacker, application, start + Duration::from_secs(1)), Some(Duration::from_secs(2)));
        // Another address, and another application, are not affected.
        assert_eq!(limiter.locked(neighbour, application, start), None);
        assert_eq!(limiter.locked(attacker, ApplicationId::new(), start), None);
        // A right code clears the client.
        limiter.succeeded(attacker, application);
        assert_eq!(limiter.locked(attacker, application, start + Duration::from_secs(1)), None);
    }

    #[test]
    fn one_ipv6_subscriber_counts_as_one_client() {
        let mut limiter = CodeLimiter::default();
        let application = ApplicationId::new();
        let start = Instant::now();
        for host in 1..=6 {
            limiter.failed(ip(&format!("2001:db8:1:2::{host}")), application, start);
        }
        assert!(limiter.locked(ip("2001:db8:1:2::ffff"), application, start).is_some());
        assert_eq!(limiter.locked(ip("2001:db8:1:3::1"), application, start), None);
        assert_eq!(prefix(ip("::ffff:203.0.113.9")), ip("203.0.113.9"));
    }

    #[test]
    fn many_addresses_together_lock_the_application() {
        let mut limiter = CodeLimiter::new(LockoutPolicy::CLIENT, LockoutPolicy::APPLICATION, 100_000);
        let application = ApplicationId::new();
        let start = Instant::now();
        for host in 0..=100u32 {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0xcb00_7100 + host));
            limiter.failed(address, application, start);
        }
        assert!(limiter.locked(ip("198.51.100.1"), application, start).is_some(), "the application is locked");
        assert_eq!(limiter.locked(ip("198.51.100.1"), ApplicationId::new(), start), None);
    }

    #[test]
    fn memory_is_bounded_and_stale_entries_are_forgotten() {
        let mut limiter = CodeLimiter::new(LockoutPolicy::CLIENT, LockoutPolicy::APPLICATION, 100);
        let application = ApplicationId::new();
        let start = Instant::now();
        for host in 0..1000u32 {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + host));
            limiter.failed(address, application, start + Duration::from_millis(u64::from(host)));
        }
        assert!(limiter.len() <= 100, "{} entries", limiter.len());
        // The most recent failures are the ones kept.
        let latest = IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + 999));
        assert!(limiter.clients.entries.contains_key(&(latest, application)));

        // Long after, one more failure prunes everything stale once the map is full again.
        let later = start + Duration::from_secs(3600);
        for host in 0..100u32 {
            limiter.failed(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + host)), application, later);
        }
        assert!(limiter.len() <= 100);
        assert!(!limiter.clients.entries.contains_key(&(latest, application)));
    }
}
