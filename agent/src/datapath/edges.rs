//! The pool's edges as the tunnel's peers and the proxy's accepted sources.
//!
//! Resolving `host:port` endpoints is the only IO here ([`resolve`]); turning edges and their
//! resolved endpoints into peers is pure ([`peers`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use edgible::model::EdgeId;
use edgible::protocol::v1::EdgePeer;
use edgible::tunnel::{PeerConfig, PublicKey};
use ipnet::Ipv4Net;

/// Seconds between keepalives to each edge: keeps NAT mappings open and lets the edge always
/// know where the device is.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

/// How long resolving one endpoint may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an edge cannot be a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeError {
    #[error("edges[{index}].public_key: not a WireGuard public key: {message}")]
    PublicKey { index: usize, message: String },
    #[error("edges[{index}].endpoint: cannot resolve {endpoint:?} to an IPv4 address: {message}")]
    Endpoint { index: usize, endpoint: String, message: String },
}

/// Resolves one `host:port` to its first IPv4 address (the tunnel carries IPv4 only).
pub async fn resolve(endpoint: &str) -> Result<SocketAddrV4, String> {
    let addresses = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(endpoint))
        .await
        .map_err(|_| format!("no answer within {}s", RESOLVE_TIMEOUT.as_secs()))?
        .map_err(|error| error.to_string())?;
    addresses
        .filter_map(|address| match address {
            SocketAddr::V4(address) => Some(address),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| "it has no IPv4 address".to_owned())
}

/// Resolves every edge's endpoint, concurrently; answers the resolved ones by edge and an error
/// for each that failed.
pub async fn resolve_all(edges: &[EdgePeer]) -> (BTreeMap<EdgeId, SocketAddrV4>, Vec<EdgeError>) {
    let answers = futures::future::join_all(edges.iter().map(|edge| resolve(&edge.endpoint))).await;
    let mut resolved = BTreeMap::new();
    let mut errors = Vec::new();
    for (index, (edge, answer)) in edges.iter().zip(answers).enumerate() {
        match answer {
            Ok(address) => {
                resolved.insert(edge.edge_id, address);
            }
            Err(message) => errors.push(EdgeError::Endpoint { index, endpoint: edge.endpoint.clone(), message }),
        }
    }
    (resolved, errors)
}

/// The tunnel's peers for the pool's edges: each edge at its resolved endpoint, allowed IPs
/// exactly its tunnel address, with a persistent keepalive. An edge whose key is invalid is
/// left out (and reported); one whose endpoint did not resolve is left out too, until it does.
pub fn peers(edges: &[EdgePeer], resolved: &BTreeMap<EdgeId, SocketAddrV4>) -> (Vec<PeerConfig>, Vec<EdgeError>) {
    let mut peers = Vec::new();
    let mut errors = Vec::new();
    for (index, edge) in edges.iter().enumerate() {
        let public_key = match edge.public_key.parse::<PublicKey>() {
            Ok(public_key) => public_key,
            Err(error) => {
                errors.push(EdgeError::PublicKey { index, message: error.to_string() });
                continue;
            }
        };
        let Some(endpoint) = resolved.get(&edge.edge_id) else { continue };
        peers.push(PeerConfig {
            public_key,
            endpoint: Some(SocketAddr::V4(*endpoint)),
            allowed_ips: vec![Ipv4Net::from(edge.tunnel_address)],
            persistent_keepalive: Some(PERSISTENT_KEEPALIVE),
        });
    }
    (peers, errors)
}

/// The addresses the proxy accepts connections from: every edge's tunnel address, whether or
/// not its endpoint resolved (the tunnel's ingress filter already ties each address to its key).
pub fn sources(edges: &[EdgePeer]) -> Vec<IpAddr> {
    edges.iter().map(|edge| IpAddr::V4(edge.tunnel_address)).collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use edgible::tunnel::PrivateKey;

    use super::*;

    fn edge(number: u8) -> (EdgePeer, PublicKey) {
        let key = PrivateKey::generate().expect("random keys").public_key();
        let edge = EdgePeer {
            edge_id: EdgeId::new(),
            public_key: key.to_base64(),
            endpoint: format!("127.0.0.1:{}", 51820 + u16::from(number)),
            tunnel_address: Ipv4Addr::new(100, 96, 0, number),
        };
        (edge, key)
    }

    #[test]
    fn edges_become_peers_with_their_32_and_a_keepalive() {
        let (first, first_key) = edge(1);
        let (second, _) = edge(2);
        let (mut broken, _) = edge(3);
        broken.public_key = "not a key".into();
        let edges = vec![first.clone(), second.clone(), broken];
        let resolved: BTreeMap<EdgeId, SocketAddrV4> =
            [(first.edge_id, "192.0.2.1:51821".parse().expect("an address"))].into_iter().collect();

        let (peers, errors) = peers(&edges, &resolved);
        assert_eq!(
            peers,
            [PeerConfig {
                public_key: first_key,
                endpoint: Some("192.0.2.1:51821".parse().expect("an address")),
                allowed_ips: vec!["100.96.0.1/32".parse().expect("a network")],
                persistent_keepalive: Some(PERSISTENT_KEEPALIVE),
            }],
            "the unresolved and the broken edge are left out"
        );
        assert!(matches!(errors.as_slice(), [EdgeError::PublicKey { index: 2, .. }]), "{errors:?}");
        assert!(errors[0].to_string().starts_with("edges[2].public_key"));
        assert_eq!(sources(&edges).len(), 3, "every edge's address is a source");
    }

    #[tokio::test]
    async fn endpoints_resolve_to_ipv4_or_name_the_edge() {
        let (good, _) = edge(1);
        let (mut bad, _) = edge(2);
        bad.endpoint = "no port here".into();
        let (resolved, errors) = resolve_all(&[good.clone(), bad]).await;
        assert_eq!(resolved.get(&good.edge_id), Some(&"127.0.0.1:51821".parse().expect("an address")));
        assert!(matches!(errors.as_slice(), [EdgeError::Endpoint { index: 1, .. }]), "{errors:?}");
    }
}
