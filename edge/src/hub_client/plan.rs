//! The pure conversion of a pushed `edge_config` into what the edge runs: its tunnel address,
//! its WireGuard peers and its route table. No IO; every error names the field at fault.
//!
//! Each device of the pool becomes a peer whose allowed IPs are exactly the device's /32 (so a
//! device can never send as another address) with no endpoint (learned from the device's first
//! authenticated packet: devices dial out) and no keepalive (the devices keep the path open).
//! Each route goes to the device's tunnel address; the splice adds the port.

use std::net::Ipv4Addr;

use edgible::protocol::v1::{DevicePeer, EdgeRoute};
use edgible::tunnel::{KeyError, PeerConfig, PublicKey};
use ipnet::Ipv4Net;

use crate::routes::{Route, RouteTable, RouteTableError, RouteTarget};

/// What one `edge_config` asks the edge to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgePlan {
    /// The edge's tunnel address with the pool's prefix length, for its tunnel interface.
    pub address: Ipv4Net,
    pub peers: Vec<PeerConfig>,
    /// Which device each peer is, for metrics labels; in the order of `peers`.
    pub peer_devices: Vec<(PublicKey, edgible::model::DeviceId)>,
    pub routes: RouteTable,
}

/// Why a configuration cannot be applied. The edge keeps what it runs and tells the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("tunnel_address: {address} is not inside the pool's network {cidr}")]
    EdgeOutsidePool { address: Ipv4Addr, cidr: Ipv4Net },
    #[error("peers[{index}].public_key: {message}")]
    PeerKey { index: usize, message: String },
    #[error("peers[{index}].tunnel_address: {address} is not inside the pool's network {cidr}")]
    PeerOutsidePool { index: usize, address: Ipv4Addr, cidr: Ipv4Net },
    #[error("peers[{index}].tunnel_address: {address} is the edge's own address")]
    PeerIsEdge { index: usize, address: Ipv4Addr },
    #[error("routes[{index}].tunnel_address: {address} is not inside the pool's network {cidr}")]
    RouteOutsidePool { index: usize, address: Ipv4Addr, cidr: Ipv4Net },
    #[error("routes: {0}")]
    Routes(#[from] RouteTableError),
}

/// Turns a configuration into peers and routes, for an edge at `tunnel_address` in the pool
/// network `tunnel_cidr`.
pub fn plan(
    tunnel_address: Ipv4Addr,
    tunnel_cidr: Ipv4Net,
    peers: &[DevicePeer],
    routes: &[EdgeRoute],
) -> Result<EdgePlan, PlanError> {
    let cidr = tunnel_cidr.trunc();
    if !cidr.contains(&tunnel_address) {
        return Err(PlanError::EdgeOutsidePool { address: tunnel_address, cidr });
    }
    // Safe: the prefix length comes from a valid network.
    let address = Ipv4Net::new(tunnel_address, cidr.prefix_len()).unwrap_or(cidr);
    let mut peer_configs = Vec::with_capacity(peers.len());
    let mut peer_devices = Vec::with_capacity(peers.len());
    for (index, peer) in peers.iter().enumerate() {
        let public_key: PublicKey = peer
            .public_key
            .parse()
            .map_err(|error: KeyError| PlanError::PeerKey { index, message: error.to_string() })?;
        if !cidr.contains(&peer.tunnel_address) {
            return Err(PlanError::PeerOutsidePool { index, address: peer.tunnel_address, cidr });
        }
        if peer.tunnel_address == tunnel_address {
            return Err(PlanError::PeerIsEdge { index, address: peer.tunnel_address });
        }
        peer_configs.push(PeerConfig {
            public_key,
            endpoint: None,
            allowed_ips: vec![Ipv4Net::from(peer.tunnel_address)],
            persistent_keepalive: None,
        });
        peer_devices.push((public_key, peer.device_id));
    }
    let mut table_routes = Vec::with_capacity(routes.len());
    for (index, route) in routes.iter().enumerate() {
        if !cidr.contains(&route.tunnel_address) {
            return Err(PlanError::RouteOutsidePool { index, address: route.tunnel_address, cidr });
        }
        table_routes.push(Route {
            hostname: route.hostname.clone(),
            target: RouteTarget {
                device_id: route.device_id,
                tunnel_address: route.tunnel_address,
                online: route.online,
            },
        });
    }
    let routes = RouteTable::from_routes(table_routes)?;
    Ok(EdgePlan { address, peers: peer_configs, peer_devices, routes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use edgible::model::DeviceId;
    use edgible::tunnel::PrivateKey;

    use super::*;

    const EDGE: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);

    fn cidr() -> Ipv4Net {
        "100.96.0.0/16".parse().unwrap()
    }

    fn device(last: u8) -> (DevicePeer, PublicKey) {
        let key = PrivateKey::generate().unwrap().public_key();
        let peer = DevicePeer {
            device_id: DeviceId::new(),
            public_key: key.to_base64(),
            tunnel_address: Ipv4Addr::new(100, 96, 0, last),
        };
        (peer, key)
    }

    fn route(name: &str, peer: &DevicePeer, online: bool) -> EdgeRoute {
        EdgeRoute {
            hostname: name.parse().unwrap(),
            device_id: peer.device_id,
            tunnel_address: peer.tunnel_address,
            online,
        }
    }

    #[test]
    fn devices_become_peers_with_exactly_their_address_and_routes_a_table() {
        let (one, one_key) = device(2);
        let (two, two_key) = device(3);
        let routes = [
            route("app.example.test", &one, true),
            route("*.apps.example.test", &two, false),
            route("api.example.test", &two, true),
        ];
        let plan = plan(EDGE, cidr(), &[one.clone(), two.clone()], &routes).unwrap();

        assert_eq!(plan.address, "100.96.0.1/16".parse::<Ipv4Net>().unwrap());
        assert_eq!(
            plan.peers,
            [
                PeerConfig {
                    public_key: one_key,
                    endpoint: None,
                    allowed_ips: vec!["100.96.0.2/32".parse().unwrap()],
                    persistent_keepalive: None,
                },
                PeerConfig {
                    public_key: two_key,
                    endpoint: None,
                    allowed_ips: vec!["100.96.0.3/32".parse().unwrap()],
                    persistent_keepalive: None,
                },
            ]
        );
        assert_eq!(plan.peer_devices, [(one_key, one.device_id), (two_key, two.device_id)]);

        assert_eq!(plan.routes.len(), 3);
        let app = plan.routes.target("app.example.test").unwrap();
        assert_eq!((app.device_id, app.tunnel_address, app.online), (one.device_id, one.tunnel_address, true));
        let wildcard = plan.routes.lookup("x.apps.example.test").unwrap();
        assert!(wildcard.wildcard);
        assert_eq!(wildcard.route.target.device_id, two.device_id);
        assert!(!wildcard.route.target.online);
        assert_eq!(plan.routes.target("api.example.test").unwrap().tunnel_address, two.tunnel_address);
    }

    #[test]
    fn an_empty_configuration_is_an_empty_plan() {
        let plan = plan(EDGE, "100.96.7.0/24".parse().unwrap(), &[], &[]);
        assert_eq!(
            plan.unwrap_err(),
            PlanError::EdgeOutsidePool { address: EDGE, cidr: "100.96.7.0/24".parse().unwrap() }
        );
        let plan = super::plan(EDGE, cidr(), &[], &[]).unwrap();
        assert!(plan.peers.is_empty());
        assert!(plan.routes.is_empty());
    }

    #[test]
    fn bad_input_names_the_field() {
        let (one, _) = device(2);
        let mut bad_key = one.clone();
        bad_key.public_key = "not a key".into();
        let error = plan(EDGE, cidr(), &[one.clone(), bad_key], &[]).unwrap_err();
        assert!(error.to_string().starts_with("peers[1].public_key: "), "{error}");

        let mut outside = one.clone();
        outside.tunnel_address = Ipv4Addr::new(100, 97, 0, 2);
        let error = plan(EDGE, cidr(), &[outside.clone()], &[]).unwrap_err();
        assert!(error.to_string().starts_with("peers[0].tunnel_address: "), "{error}");

        let mut itself = one.clone();
        itself.tunnel_address = EDGE;
        assert!(matches!(plan(EDGE, cidr(), &[itself], &[]), Err(PlanError::PeerIsEdge { index: 0, .. })));

        let error =
            plan(EDGE, cidr(), std::slice::from_ref(&one), &[route("a.example.test", &outside, true)]).unwrap_err();
        assert!(error.to_string().starts_with("routes[0].tunnel_address: "), "{error}");

        let duplicate = [route("a.example.test", &one, true), route("a.example.test", &one, false)];
        let error = plan(EDGE, cidr(), &[one], &duplicate).unwrap_err();
        assert!(matches!(error, PlanError::Routes(RouteTableError::DuplicateHostname(_))), "{error}");
    }
}
