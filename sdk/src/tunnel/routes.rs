//! Longest-prefix matching of IPv4 addresses against the peers' allowed IPs (WireGuard's
//! "cryptokey routing"), used both ways: outgoing packets go to the peer owning their
//! destination, and an incoming packet is accepted only if its source is owned by the peer that
//! sent it.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A routing table from IPv4 networks to values. A lookup costs one hash probe per distinct
/// prefix length in the table (typically one or two: devices' /32s and a pool's CIDR), longest
/// first.
#[derive(Debug, Clone)]
pub(crate) struct RouteTable<T> {
    /// One map per prefix length, longest prefix first, keyed by the network address.
    by_length: Vec<(u8, HashMap<u32, T>)>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self { by_length: Vec::new() }
    }
}

impl<T> RouteTable<T> {
    /// Routes `network` (host bits ignored) to `value`, returning the value it replaces.
    pub(crate) fn insert(&mut self, network: Ipv4Net, value: T) -> Option<T> {
        let length = network.prefix_len();
        let position = match self.by_length.binary_search_by(|(existing, _)| length.cmp(existing)) {
            Ok(position) => position,
            Err(position) => {
                self.by_length.insert(position, (length, HashMap::new()));
                position
            }
        };
        self.by_length[position].1.insert(u32::from(network.network()), value)
    }

    /// The value of the longest prefix containing `address`.
    pub(crate) fn lookup(&self, address: Ipv4Addr) -> Option<&T> {
        let address = u32::from(address);
        self.by_length.iter().find_map(|(length, networks)| networks.get(&(address & mask(*length))))
    }
}

/// The netmask of a prefix length, as a host-order integer.
fn mask(length: u8) -> u32 {
    match length {
        0 => 0,
        length => u32::MAX << (32 - u32::from(length.min(32))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &'static str)]) -> RouteTable<&'static str> {
        let mut table = RouteTable::default();
        for (network, name) in entries {
            assert_eq!(table.insert(network.parse().unwrap(), *name), None);
        }
        table
    }

    fn lookup(table: &RouteTable<&'static str>, address: &str) -> Option<&'static str> {
        table.lookup(address.parse().unwrap()).copied()
    }

    #[test]
    fn longest_prefix_wins() {
        let table = table(&[("100.64.0.0/10", "pool"), ("100.64.0.7/32", "device"), ("100.64.0.0/24", "edge")]);
        assert_eq!(lookup(&table, "100.64.0.7"), Some("device"));
        assert_eq!(lookup(&table, "100.64.0.8"), Some("edge"));
        assert_eq!(lookup(&table, "100.100.1.1"), Some("pool"));
        assert_eq!(lookup(&table, "100.128.0.1"), None);
        assert_eq!(lookup(&table, "192.0.2.1"), None);
    }

    #[test]
    fn host_bits_of_a_network_are_ignored() {
        let table = table(&[("100.64.0.77/24", "edge")]);
        assert_eq!(lookup(&table, "100.64.0.1"), Some("edge"));
    }

    #[test]
    fn default_route_matches_everything_last() {
        let table = table(&[("0.0.0.0/0", "default"), ("198.51.100.0/24", "docs")]);
        assert_eq!(lookup(&table, "198.51.100.9"), Some("docs"));
        assert_eq!(lookup(&table, "203.0.113.1"), Some("default"));
    }

    #[test]
    fn inserting_the_same_network_replaces_it() {
        let mut table = table(&[("100.64.0.1/32", "old")]);
        assert_eq!(table.insert("100.64.0.1/32".parse().unwrap(), "new"), Some("old"));
        assert_eq!(lookup(&table, "100.64.0.1"), Some("new"));
    }
}
