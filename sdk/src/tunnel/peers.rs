//! Peer sets as data, and their reconciliation as a pure diff.
//!
//! The agent and the edge receive their desired peer set from the server; [`diff`] turns
//! "desired" and "actual" into the smallest list of changes, so that a peer whose configuration
//! did not change is never touched and its WireGuard session survives every update.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::keys::PublicKey;

/// One peer as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Where to send this peer's packets until it is heard from elsewhere. `None` means the
    /// address is learned from the peer's first authenticated packet (the edge's view of a
    /// device behind NAT).
    pub endpoint: Option<SocketAddr>,
    /// The inner addresses this peer may send from, and the destinations routed to it.
    pub allowed_ips: Vec<Ipv4Net>,
    /// Seconds between keepalives sent to this peer even when there is no traffic, so that a
    /// NAT mapping stays open and the peer always knows where this side is.
    pub persistent_keepalive: Option<u16>,
}

/// One step from the actual peer set towards the desired one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    Add(PeerConfig),
    Remove(PublicKey),
    Update(PeerUpdate),
}

/// The fields of one existing peer that change; `None` means "unchanged". The peer's session is
/// kept across every update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: PublicKey,
    /// The new configured endpoint. Setting `Some(address)` sends to that address from now on;
    /// setting `None` only forgets the configured one and keeps sending where the peer was last
    /// heard from.
    pub endpoint: Option<Option<SocketAddr>>,
    pub allowed_ips: Option<Vec<Ipv4Net>>,
    pub persistent_keepalive: Option<Option<u16>>,
}

/// Why a peer set cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerSetError {
    #[error("peer {0} appears more than once")]
    DuplicatePeer(PublicKey),
    #[error("peer {0} is this tunnel's own key")]
    OwnKey(PublicKey),
    #[error("allowed IP {network} is given to both {first} and {second}")]
    DuplicateAllowedIp { network: Ipv4Net, first: PublicKey, second: PublicKey },
}

/// Checks that a peer set can be applied as a whole: every key once, never our own key, and no
/// network routed to two peers (a longer prefix inside a shorter one of another peer is fine:
/// the longest prefix wins, as in WireGuard).
pub fn validate(peers: &[PeerConfig], own_key: &PublicKey) -> Result<(), PeerSetError> {
    let mut keys = BTreeSet::new();
    let mut networks: BTreeMap<Ipv4Net, PublicKey> = BTreeMap::new();
    for peer in peers {
        if peer.public_key == *own_key {
            return Err(PeerSetError::OwnKey(peer.public_key));
        }
        if !keys.insert(peer.public_key) {
            return Err(PeerSetError::DuplicatePeer(peer.public_key));
        }
        for network in normalized(&peer.allowed_ips) {
            if let Some(first) = networks.insert(network, peer.public_key) {
                return Err(PeerSetError::DuplicateAllowedIp { network, first, second: peer.public_key });
            }
        }
    }
    Ok(())
}

/// The changes that turn `actual` into `desired`: removals first (so that allowed IPs freed by a
/// removed peer can be taken by another), then updates, then additions, each in a stable order.
/// Allowed IPs are compared as sets of networks, so reordering them or writing `10.0.0.1/24`
/// for `10.0.0.0/24` is not a change. Both sets are expected to pass [`validate`]; if a key
/// appears twice, its last entry counts.
pub fn diff(desired: &[PeerConfig], actual: &[PeerConfig]) -> Vec<PeerChange> {
    let desired_by_key: BTreeMap<PublicKey, &PeerConfig> = desired.iter().map(|peer| (peer.public_key, peer)).collect();
    let actual_by_key: BTreeMap<PublicKey, &PeerConfig> = actual.iter().map(|peer| (peer.public_key, peer)).collect();

    let mut changes: Vec<PeerChange> = actual_by_key
        .keys()
        .filter(|key| !desired_by_key.contains_key(*key))
        .map(|key| PeerChange::Remove(*key))
        .collect();

    for (key, wanted) in &desired_by_key {
        let Some(current) = actual_by_key.get(key) else { continue };
        let endpoint = (wanted.endpoint != current.endpoint).then_some(wanted.endpoint);
        let allowed_ips = (normalized(&wanted.allowed_ips) != normalized(&current.allowed_ips))
            .then(|| normalized(&wanted.allowed_ips).into_iter().collect());
        let persistent_keepalive =
            (wanted.persistent_keepalive != current.persistent_keepalive).then_some(wanted.persistent_keepalive);
        if endpoint.is_some() || allowed_ips.is_some() || persistent_keepalive.is_some() {
            changes.push(PeerChange::Update(PeerUpdate {
                public_key: *key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            }));
        }
    }

    let mut added = BTreeSet::new();
    for key in desired.iter().map(|peer| peer.public_key) {
        if actual_by_key.contains_key(&key) || !added.insert(key) {
            continue;
        }
        // Additions keep the order of `desired`; the map holds the last entry of a repeated key.
        if let Some(wanted) = desired_by_key.get(&key) {
            changes.push(PeerChange::Add((*wanted).clone()));
        }
    }
    changes
}

/// The networks of an allowed-IP list with host bits cleared, sorted and without duplicates.
pub(crate) fn normalized(networks: &[Ipv4Net]) -> BTreeSet<Ipv4Net> {
    networks.iter().map(Ipv4Net::trunc).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; 32])
    }

    fn peer(byte: u8, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(byte),
            endpoint: None,
            allowed_ips: allowed.iter().map(|network| network.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    #[test]
    fn identical_sets_need_no_change() {
        let peers = vec![peer(1, &["100.64.0.1/32"]), peer(2, &["100.64.0.2/32"])];
        assert!(diff(&peers, &peers).is_empty());
        assert!(diff(&[], &[]).is_empty());
    }

    #[test]
    fn order_of_peers_and_of_allowed_ips_is_not_a_change() {
        let actual = vec![peer(1, &["100.64.0.1/32", "100.65.0.0/16"]), peer(2, &["100.64.0.2/32"])];
        let desired = vec![peer(2, &["100.64.0.2/32"]), peer(1, &["100.65.0.7/16", "100.64.0.1/32", "100.64.0.1/32"])];
        assert!(diff(&desired, &actual).is_empty());
    }

    #[test]
    fn additions_and_removals_leave_other_peers_alone() {
        let actual = vec![peer(1, &["100.64.0.1/32"]), peer(2, &["100.64.0.2/32"])];
        let desired = vec![peer(1, &["100.64.0.1/32"]), peer(4, &["100.64.0.4/32"]), peer(3, &["100.64.0.3/32"])];
        assert_eq!(
            diff(&desired, &actual),
            vec![
                PeerChange::Remove(key(2)),
                PeerChange::Add(peer(4, &["100.64.0.4/32"])),
                PeerChange::Add(peer(3, &["100.64.0.3/32"])),
            ]
        );
    }

    #[test]
    fn changed_fields_become_one_update_naming_only_them() {
        let actual = vec![peer(1, &["100.64.0.1/32"])];
        let mut moved = peer(1, &["100.64.0.1/32"]);
        moved.endpoint = Some("192.0.2.7:51820".parse().unwrap());
        assert_eq!(
            diff(std::slice::from_ref(&moved), &actual),
            vec![PeerChange::Update(PeerUpdate {
                public_key: key(1),
                endpoint: Some(moved.endpoint),
                allowed_ips: None,
                persistent_keepalive: None,
            })]
        );

        let mut keepalive = peer(1, &["100.64.0.1/32"]);
        keepalive.persistent_keepalive = Some(25);
        assert_eq!(
            diff(&[keepalive], &actual),
            vec![PeerChange::Update(PeerUpdate {
                public_key: key(1),
                endpoint: None,
                allowed_ips: None,
                persistent_keepalive: Some(Some(25)),
            })]
        );

        let widened = peer(1, &["100.64.0.1/32", "100.64.0.99/32"]);
        assert_eq!(
            diff(&[widened], &actual),
            vec![PeerChange::Update(PeerUpdate {
                public_key: key(1),
                endpoint: None,
                allowed_ips: Some(vec!["100.64.0.1/32".parse().unwrap(), "100.64.0.99/32".parse().unwrap()]),
                persistent_keepalive: None,
            })]
        );
    }

    #[test]
    fn forgetting_an_endpoint_is_an_update_to_none() {
        let mut actual = peer(1, &["100.64.0.1/32"]);
        actual.endpoint = Some("192.0.2.7:51820".parse().unwrap());
        let desired = peer(1, &["100.64.0.1/32"]);
        let changes = diff(&[desired], &[actual]);
        assert!(matches!(&changes[..], [PeerChange::Update(PeerUpdate { endpoint: Some(None), .. })]));
    }

    #[test]
    fn removals_come_before_additions_that_reuse_their_networks() {
        let actual = vec![peer(1, &["100.64.0.1/32"])];
        let desired = vec![peer(2, &["100.64.0.1/32"])];
        assert_eq!(
            diff(&desired, &actual),
            vec![PeerChange::Remove(key(1)), PeerChange::Add(peer(2, &["100.64.0.1/32"]))]
        );
    }

    #[test]
    fn validation_refuses_duplicates_and_our_own_key() {
        let own = key(9);
        assert_eq!(validate(&[peer(1, &["100.64.0.1/32"]), peer(2, &["100.64.0.0/24"])], &own), Ok(()));
        assert_eq!(
            validate(&[peer(1, &["100.64.0.1/32"]), peer(1, &["100.64.0.2/32"])], &own),
            Err(PeerSetError::DuplicatePeer(key(1)))
        );
        assert_eq!(
            validate(&[peer(1, &["100.64.0.1/32"]), peer(2, &["100.64.0.1/32"])], &own),
            Err(PeerSetError::DuplicateAllowedIp {
                network: "100.64.0.1/32".parse().unwrap(),
                first: key(1),
                second: key(2)
            })
        );
        assert_eq!(validate(&[peer(9, &[])], &own), Err(PeerSetError::OwnKey(key(9))));
    }
}
