//! What an edge is told: its WireGuard peers (the enrolled devices of its pool), its route
//! table (every hostname of every application placed on one of those devices) and the ACME
//! HTTP-01 challenges of its pool (`certs::challenges`, passed in). A pure function of what
//! the database and the challenge board hold, so the rules are tested without either.
//!
//! The result is deterministic (peers in address order, routes in hostname order), so that a
//! session can compare the configuration it computes with the one it sent last and send a new
//! one only when something changed.
//!
//! Tenancy: the inputs are read for the edge's own pool only, and [`edge_config`] still
//! drops any placement naming a device outside the given devices, so an edge can never route
//! to another pool's (or organization's) device.

use std::collections::BTreeMap;

use edgible::model::{Application, Device, DeviceId, DeviceState, Revision};
use edgible::protocol::v1::{AcmeChallenge, DevicePeer, EdgeRoute, EdgeServerMessage};

/// What an edge's configuration is computed from, read in one database snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeInputs {
    /// The server's revision counter at the snapshot.
    pub revision: Revision,
    /// The devices of the edge's pool (enrolled or not).
    pub devices: Vec<Device>,
    /// The applications placed on a device, with that device.
    pub placed: Vec<(DeviceId, Application)>,
}

/// An edge's whole configuration, without its revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EdgeConfig {
    pub peers: Vec<DevicePeer>,
    pub routes: Vec<EdgeRoute>,
    /// The pool's challenges, sorted (as [`crate::certs::challenges::ChallengeBoard::snapshot`]
    /// gives them).
    pub challenges: Vec<AcmeChallenge>,
}

/// The configuration of an edge serving the pool of `devices`. Peers are the enrolled
/// devices; routes are the hostnames of the applications placed on any of `devices` (enrolled
/// or not: a route to a device that is not online is served as offline).
pub fn edge_config(devices: &[Device], placed: &[(DeviceId, Application)]) -> EdgeConfig {
    let mut peers: Vec<DevicePeer> = devices
        .iter()
        .filter_map(|device| {
            let public_key = device.status.public_key.clone()?;
            Some(DevicePeer { device_id: device.id, public_key, tunnel_address: device.status.tunnel_address })
        })
        .collect();
    peers.sort_by_key(|peer| (peer.tunnel_address, peer.device_id));
    let by_id: BTreeMap<DeviceId, &Device> = devices.iter().map(|device| (device.id, device)).collect();
    let mut routes: Vec<EdgeRoute> = placed
        .iter()
        .filter_map(|(device_id, application)| by_id.get(device_id).map(|device| (*device, application)))
        .flat_map(|(device, application)| {
            application.spec.hostnames.iter().map(move |hostname| EdgeRoute {
                hostname: hostname.clone(),
                device_id: device.id,
                tunnel_address: device.status.tunnel_address,
                online: device.status.state == DeviceState::Online,
            })
        })
        .collect();
    routes.sort_by(|a, b| a.hostname.as_str().cmp(b.hostname.as_str()));
    EdgeConfig { peers, routes, challenges: Vec::new() }
}

/// What a session has sent its edge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentConfig {
    /// The last configuration sent and its revision; `None` before the first.
    last: Option<(Revision, EdgeConfig)>,
    /// The revision the edge said it applied in its `edge_hello`: the first configuration of a
    /// session never goes out below it. Revisions of configurations that only changed ACME
    /// challenges run ahead of the database's counter (they are counted in memory), so after a
    /// reconnect or a server restart the database alone could offer the edge a revision it
    /// would ignore as older than the one it applied.
    floor: Revision,
}

impl SentConfig {
    /// The configurations of a session with an edge that applied `applied` before.
    pub fn after(applied: Option<Revision>) -> Self {
        Self { last: None, floor: applied.unwrap_or(0) }
    }

    /// The `edge_config` frame to send for `inputs` and the pool's `challenges`, or `None` if
    /// its configuration is the one sent last. Revisions only grow: a configuration read at a
    /// revision not above the last one sent (reads and wake-ups may race) goes out as the last
    /// revision plus one.
    pub fn next(&mut self, inputs: &EdgeInputs, challenges: Vec<AcmeChallenge>) -> Option<EdgeServerMessage> {
        let mut config = edge_config(&inputs.devices, &inputs.placed);
        config.challenges = challenges;
        let revision = match &self.last {
            Some((_, last)) if *last == config => return None,
            Some((last_revision, _)) => inputs.revision.max(last_revision + 1),
            None => inputs.revision.max(self.floor),
        };
        self.last = Some((revision, config.clone()));
        Some(EdgeServerMessage::EdgeConfig {
            revision,
            peers: config.peers,
            routes: config.routes,
            challenges: config.challenges,
        })
    }

    /// The revision of the configuration sent last (0 before the first).
    pub fn revision(&self) -> Revision {
        self.last.as_ref().map_or(0, |(revision, _)| *revision)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use edgible::model::{ApplicationId, DevicePoolId, DeviceSpec, DeviceStatus, OrganizationId};

    use super::*;

    fn device(address: u8, key: Option<&str>, state: DeviceState) -> Device {
        Device {
            id: DeviceId::new(),
            organization_id: OrganizationId::new(),
            revision: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: DeviceSpec {
                name: format!("d{address}").parse().expect("a valid name"),
                pool_id: DevicePoolId::new(),
                labels: Default::default(),
            },
            status: DeviceStatus {
                tunnel_address: Ipv4Addr::new(100, 96, 0, address),
                public_key: key.map(str::to_owned),
                state,
                applied_revision: None,
                last_seen_at: None,
                cloud_host: None,
            },
        }
    }

    fn application(name: &str, hostnames: &[&str]) -> Application {
        let spec = serde_json::json!({
            "name": name, "hostnames": hostnames, "workload": {"process": {"command": "/bin/true"}}, "port": 8080
        });
        Application {
            id: ApplicationId::new(),
            organization_id: OrganizationId::new(),
            revision: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: edgible::model::parse_json(spec.to_string().as_bytes()).expect("a valid application"),
        }
    }

    fn hostnames(config: &EdgeConfig) -> Vec<(&str, Ipv4Addr, bool)> {
        config.routes.iter().map(|route| (route.hostname.as_str(), route.tunnel_address, route.online)).collect()
    }

    #[test]
    fn peers_are_the_enrolled_devices_in_address_order() {
        let pending = device(1, None, DeviceState::Pending);
        let second = device(3, Some("k3"), DeviceState::Offline);
        let first = device(2, Some("k2"), DeviceState::Online);
        let config = edge_config(&[pending, second.clone(), first.clone()], &[]);
        let peers: Vec<_> = config.peers.iter().map(|peer| (peer.device_id, peer.public_key.as_str())).collect();
        assert_eq!(peers, [(first.id, "k2"), (second.id, "k3")]);
        assert!(config.routes.is_empty());
    }

    #[test]
    fn routes_are_every_hostname_sorted_with_the_devices_state() {
        let online = device(2, Some("k2"), DeviceState::Online);
        let offline = device(3, Some("k3"), DeviceState::Offline);
        let web = application("web", &["web.example.test", "*.web.example.test"]);
        let api = application("api", &["api.example.test"]);
        let config = edge_config(&[online.clone(), offline.clone()], &[(offline.id, web), (online.id, api)]);
        let online_address = online.status.tunnel_address;
        let offline_address = offline.status.tunnel_address;
        assert_eq!(
            hostnames(&config),
            [
                ("*.web.example.test", offline_address, false),
                ("api.example.test", online_address, true),
                ("web.example.test", offline_address, false),
            ]
        );
    }

    #[test]
    fn placements_on_devices_outside_the_pool_are_dropped() {
        let mine = device(2, Some("k2"), DeviceState::Online);
        let elsewhere = device(2, Some("other"), DeviceState::Online);
        let config = edge_config(
            std::slice::from_ref(&mine),
            &[(elsewhere.id, application("theirs", &["theirs.example.test"]))],
        );
        assert!(config.routes.is_empty(), "{config:?}");
        assert_eq!(config.peers.len(), 1);
    }

    #[test]
    fn a_configuration_is_sent_only_when_it_changed_and_revisions_grow() {
        let mut host = device(2, Some("k2"), DeviceState::Offline);
        let web = application("web", &["web.example.test"]);
        let mut sent = SentConfig::default();
        let inputs = EdgeInputs { revision: 5, devices: vec![host.clone()], placed: vec![(host.id, web.clone())] };
        let Some(EdgeServerMessage::EdgeConfig { revision, routes, .. }) = sent.next(&inputs, Vec::new()) else {
            panic!("the first configuration is always sent");
        };
        assert_eq!((revision, routes.len()), (5, 1));
        assert_eq!(sent.next(&EdgeInputs { revision: 9, ..inputs.clone() }, Vec::new()), None, "nothing changed");

        // The device came online, read at a revision not above the last one sent.
        host.status.state = DeviceState::Online;
        let inputs = EdgeInputs { revision: 5, devices: vec![host.clone()], placed: vec![(host.id, web)] };
        let Some(EdgeServerMessage::EdgeConfig { revision, routes, .. }) = sent.next(&inputs, Vec::new()) else {
            panic!("a changed configuration is sent");
        };
        assert_eq!(revision, 6);
        assert!(routes[0].online);
        assert_eq!(sent.revision(), 6);
    }

    #[test]
    fn challenges_ride_in_the_configuration_and_a_change_sends_it_again() {
        let host = device(2, Some("k2"), DeviceState::Online);
        let inputs = EdgeInputs { revision: 3, devices: vec![host.clone()], placed: Vec::new() };
        let challenge = AcmeChallenge {
            hostname: "web.example.test".parse().expect("a hostname"),
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        };
        let mut sent = SentConfig::default();
        assert!(sent.next(&inputs, Vec::new()).is_some());
        let Some(EdgeServerMessage::EdgeConfig { revision, challenges, peers, .. }) =
            sent.next(&inputs, vec![challenge.clone()])
        else {
            panic!("a new challenge changes the configuration");
        };
        assert_eq!((revision, challenges, peers.len()), (4, vec![challenge.clone()], 1));
        assert_eq!(sent.next(&inputs, vec![challenge]), None, "the same challenges again");
        let Some(EdgeServerMessage::EdgeConfig { revision, challenges, .. }) = sent.next(&inputs, Vec::new()) else {
            panic!("taking the challenge down changes the configuration");
        };
        assert_eq!((revision, challenges.len()), (5, 0));
    }

    #[test]
    fn a_new_session_never_offers_a_revision_below_what_the_edge_applied() {
        let host = device(2, Some("k2"), DeviceState::Online);
        let inputs = EdgeInputs { revision: 12, devices: vec![host], placed: Vec::new() };
        // Challenge-only changes took the edge to 18 while the database counter is at 12
        // (for instance across a server restart): the edge would ignore 12 as older.
        let mut sent = SentConfig::after(Some(18));
        let Some(EdgeServerMessage::EdgeConfig { revision, .. }) = sent.next(&inputs, Vec::new()) else {
            panic!("the first configuration is always sent");
        };
        assert_eq!(revision, 18);
        // An edge that applied less, or nothing, gets the database's revision as before.
        let mut sent = SentConfig::after(Some(3));
        assert!(matches!(sent.next(&inputs, Vec::new()), Some(EdgeServerMessage::EdgeConfig { revision: 12, .. })));
        let mut sent = SentConfig::after(None);
        assert!(matches!(sent.next(&inputs, Vec::new()), Some(EdgeServerMessage::EdgeConfig { revision: 12, .. })));
    }
}
