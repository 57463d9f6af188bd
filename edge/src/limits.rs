//! Caps on concurrent connections: one for the whole edge, one per client address, so that a
//! single client (or a flood) cannot take every file descriptor and slot from everyone else.
//!
//! A connection holds a [`ConnectionPermit`] from accept to close. IPv6 clients are counted
//! per /64, the smallest block a network usually hands to one site: counting single IPv6
//! addresses would let one host escape its cap by using many addresses of its own prefix.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{MetricSource, write_family};

/// The caps. Both count connections from accept to close, whatever phase they are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Connections open at once, across all clients.
    pub max_connections: u32,
    /// Connections open at once from one IPv4 address or one IPv6 /64.
    pub max_connections_per_ip: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_connections: 10_000, max_connections_per_ip: 256 }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("the edge is at its cap of concurrent connections")]
    Global,
    #[error("the client's address is at its cap of concurrent connections")]
    PerIp,
}

/// The key a client is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    /// The first 64 bits of the address.
    V6Prefix(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6Prefix(prefix_64(v6)),
        }
    }
}

fn prefix_64(ip: Ipv6Addr) -> u64 {
    (u128::from(ip) >> 64) as u64
}

/// The caps and the connections they currently count.
pub struct ConnectionLimits {
    config: LimitsConfig,
    global: Arc<Semaphore>,
    per_client: Mutex<HashMap<ClientKey, u32>>,
}

impl ConnectionLimits {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            global: Arc::new(Semaphore::new(config.max_connections as usize)),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> LimitsConfig {
        self.config
    }

    /// Admits a connection from `ip`, or says which cap it hits. Never waits: a refused
    /// connection is closed at once rather than queued.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, LimitExceeded> {
        let global = Arc::clone(&self.global).try_acquire_owned().map_err(|_| LimitExceeded::Global)?;
        let key = ClientKey::of(ip);
        {
            let mut per_client = self.per_client.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_client.entry(key).or_insert(0);
            if *count >= self.config.max_connections_per_ip {
                return Err(LimitExceeded::PerIp);
            }
            *count += 1;
        }
        Ok(ConnectionPermit { limits: Arc::clone(self), key, _global: global })
    }

    /// Connections currently admitted.
    pub fn active(&self) -> usize {
        self.config.max_connections as usize - self.global.available_permits()
    }

    /// Connections currently admitted from `ip` (its /64 for IPv6).
    pub fn active_from(&self, ip: IpAddr) -> u32 {
        let per_client = self.per_client.lock().unwrap_or_else(PoisonError::into_inner);
        per_client.get(&ClientKey::of(ip)).copied().unwrap_or(0)
    }

    fn release(&self, key: ClientKey) {
        let mut per_client = self.per_client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_client.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                // Keys are removed at zero, so the map holds only clients with open
                // connections and cannot grow without bound.
                per_client.remove(&key);
            }
        }
    }
}

impl MetricSource for ConnectionLimits {
    fn write_metrics(&self, out: &mut String) {
        write_family(
            out,
            "edgible_edge_connections_active",
            "gauge",
            "Connections open on the TLS port, in any phase.",
        );
        let _ = writeln!(out, "edgible_edge_connections_active {}", self.active());
        write_family(out, "edgible_edge_connection_limit", "gauge", "The configured caps of concurrent connections.");
        let _ = writeln!(out, "edgible_edge_connection_limit{{scope=\"global\"}} {}", self.config.max_connections);
        let _ =
            writeln!(out, "edgible_edge_connection_limit{{scope=\"per_ip\"}} {}", self.config.max_connections_per_ip);
    }
}

/// An admitted connection; returns its slots when dropped.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    key: ClientKey,
    _global: OwnedSemaphorePermit,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_ip_cap_counts_each_address_separately() {
        let limits = ConnectionLimits::new(LimitsConfig { max_connections: 10, max_connections_per_ip: 2 });
        let first = limits.try_acquire(ip("192.0.2.1")).unwrap();
        let _second = limits.try_acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(limits.try_acquire(ip("192.0.2.1")).err(), Some(LimitExceeded::PerIp));
        // The refused attempt returned its global slot.
        assert_eq!(limits.active(), 2);
        let _other = limits.try_acquire(ip("192.0.2.2")).unwrap();
        drop(first);
        assert_eq!(limits.active_from(ip("192.0.2.1")), 1);
        assert!(limits.try_acquire(ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let limits = ConnectionLimits::new(LimitsConfig { max_connections: 10, max_connections_per_ip: 1 });
        let _a = limits.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(limits.try_acquire(ip("2001:db8:1:2::ffff")).err(), Some(LimitExceeded::PerIp));
        assert!(limits.try_acquire(ip("2001:db8:1:3::1")).is_ok());
        let _v4 = limits.try_acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(limits.try_acquire(ip("::ffff:192.0.2.1")).err(), Some(LimitExceeded::PerIp));
    }

    #[test]
    fn global_cap_applies_across_clients_and_keys_are_released() {
        let limits = ConnectionLimits::new(LimitsConfig { max_connections: 2, max_connections_per_ip: 5 });
        let a = limits.try_acquire(ip("192.0.2.1")).unwrap();
        let b = limits.try_acquire(ip("192.0.2.2")).unwrap();
        assert_eq!(limits.try_acquire(ip("192.0.2.3")).err(), Some(LimitExceeded::Global));
        drop((a, b));
        assert_eq!(limits.active(), 0);
        assert!(limits.per_client.lock().unwrap().is_empty());
    }
}
