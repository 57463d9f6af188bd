//! The processing stage of the tunnel: WireGuard state per peer (one `boringtun::noise::Tunn`
//! each), cryptokey routing, ingress filtering, roaming and keepalives. It works on
//! [`PacketBatch`]es and makes no system call, so it is tested without a TUN device or a socket,
//! and the I/O around it can change (batched system calls, several queues) without touching it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::PeerStats;
use super::batch::{MAX_PACKET_LEN, PacketBatch};
use crate::tunnel::keys::{PrivateKey, PublicKey};
use crate::tunnel::packet::ipv4_destination;
use crate::tunnel::peers::{PeerChange, PeerConfig, PeerSetError, PeerUpdate, diff, normalized, validate};
use crate::tunnel::routes::RouteTable;

/// Handshakes per second accepted from all peers together before senders must prove their
/// address with a cookie (the value boringtun's own device uses).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// WireGuard message types, the first byte of every message.
const HANDSHAKE_RESPONSE: u8 = 2;
const COOKIE_REPLY: u8 = 3;
const DATA: u8 = 4;

/// Peer indexes are 24 bits: boringtun puts a session counter in the low 8 bits of the 32-bit
/// index on the wire.
const INDEX_MASK: u32 = 0x00ff_ffff;

/// This side's keys and the rate limiter shared by all peers.
pub(crate) struct Identity {
    private_key: PrivateKey,
    static_public: x25519::PublicKey,
    public_key: PublicKey,
    rate_limiter: RateLimiter,
}

impl Identity {
    pub(crate) fn new(private_key: PrivateKey) -> Self {
        let public_key = private_key.public_key();
        let static_public = x25519::PublicKey::from(&public_key);
        let rate_limiter = RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT);
        Self { private_key, static_public, public_key, rate_limiter }
    }

    pub(crate) fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Starts a new second of handshake rate limiting once a second has passed; called by the
    /// timer stage.
    pub(crate) fn reset_rate_limit(&self) {
        self.rate_limiter.reset_count();
    }
}

/// What kind of WireGuard message a datagram is, known before it is decrypted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MessageKind {
    HandshakeInit,
    HandshakeResponse,
    CookieReply,
    Data,
}

/// A datagram matched to its peer, not yet decrypted.
struct Received<'a> {
    datagram: &'a [u8],
    source: SocketAddr,
    kind: MessageKind,
}

/// One peer: its WireGuard state and what the tunnel learned about it.
pub(crate) struct Peer {
    public_key: PublicKey,
    /// The peer's index in WireGuard's session indexes, so that a message is matched to its
    /// peer without trying every key.
    index: u32,
    state: Mutex<PeerState>,
}

struct PeerState {
    tunn: Tunn,
    /// Where the peer's datagrams go: configured, then updated from every authenticated packet
    /// (roaming).
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<u16>,
    /// When a datagram was last sent to this peer, for persistent keepalives.
    last_sent: Option<Instant>,
    last_handshake: Option<SystemTime>,
    rx_bytes: u64,
    tx_bytes: u64,
    spoofed_packets: u64,
}

impl Peer {
    fn new(identity: &Identity, config: &PeerConfig, index: u32) -> Self {
        // Each peer gets its own handshake rate limiter from boringtun (reset by its timers); the
        // identity's limiter additionally bounds the work done before a message is matched to a
        // peer.
        let tunn = Tunn::new(
            identity.private_key.secret().clone(),
            x25519::PublicKey::from(&config.public_key),
            None,
            None,
            index,
            None,
        );
        let state = PeerState {
            tunn,
            endpoint: config.endpoint,
            persistent_keepalive: config.persistent_keepalive,
            last_sent: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            spoofed_packets: 0,
        };
        Self { public_key: config.public_key, index, state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, PeerState> {
        // A panic while the lock was held cannot leave the state half-updated in a way that
        // matters more than losing the peer, so keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, update: &PeerUpdate) {
        let mut state = self.lock();
        if let Some(Some(endpoint)) = update.endpoint {
            state.endpoint = Some(endpoint);
        }
        if let Some(persistent_keepalive) = update.persistent_keepalive {
            state.persistent_keepalive = persistent_keepalive;
        }
    }

    fn stats(&self) -> PeerStats {
        let state = self.lock();
        PeerStats {
            public_key: self.public_key,
            endpoint: state.endpoint,
            last_handshake: state.last_handshake,
            rx_bytes: state.rx_bytes,
            tx_bytes: state.tx_bytes,
            spoofed_packets: state.spoofed_packets,
        }
    }

    /// Encrypts one IP packet read from the TUN into the next slot of `to_net`.
    fn encapsulate(&self, packet: &[u8], to_net: &mut PacketBatch, now: Instant) {
        if packet.len() > MAX_PACKET_LEN {
            return;
        }
        let mut state = self.lock();
        // Without an endpoint there is nowhere to send the packet, and a handshake it would
        // start could not be sent either.
        let Some(endpoint) = state.endpoint else { return };
        let Some(slot) = to_net.free_slot() else { return };
        let len = match state.tunn.encapsulate(packet, slot) {
            TunnResult::WriteToNetwork(datagram) => datagram.len(),
            TunnResult::Err(error) => {
                tracing::trace!(peer = %self.public_key, ?error, "cannot encrypt a packet");
                return;
            }
            _ => return,
        };
        state.tx_bytes += len as u64;
        state.last_sent = Some(now);
        to_net.commit(len, Some(endpoint));
    }

    /// Handles one authenticated-to-be datagram from this peer: decrypted IP packets go to
    /// `to_tun` if their source is this peer's, handshake answers and released packets to
    /// `to_net`.
    fn decapsulate(
        &self,
        table: &PeerTable,
        received: Received<'_>,
        to_tun: &mut PacketBatch,
        to_net: &mut PacketBatch,
        clock: &Clock,
    ) {
        let Received { datagram, source, kind } = received;
        let mut state = self.lock();
        let Some(slot) = to_tun.free_slot() else { return };
        match state.tunn.decapsulate(Some(source.ip()), datagram, slot) {
            TunnResult::WriteToTunnelV4(packet, packet_source) => {
                let len = packet.len();
                state.authenticated(&self.public_key, datagram.len(), source);
                // Ingress filtering: the inner source must route back to this very peer, so a
                // peer can never send as an address that belongs to someone else.
                let owner = table.routes.lookup(packet_source);
                if owner.is_some_and(|owner| std::ptr::eq(owner.as_ref(), self)) {
                    to_tun.commit(len, None);
                } else {
                    state.spoofed_packets += 1;
                    tracing::debug!(peer = %self.public_key, %packet_source, "dropped a packet from outside the peer's allowed IPs");
                }
            }
            TunnResult::WriteToTunnelV6(..) => {
                // Authenticated, but no IPv6 network is ever allowed.
                state.authenticated(&self.public_key, datagram.len(), source);
                state.spoofed_packets += 1;
            }
            TunnResult::WriteToNetwork(answer) => {
                let message = answer.first().copied();
                if message == Some(COOKIE_REPLY) {
                    // A cookie reply answers a handshake that was not checked yet: it proves
                    // nothing about the sender, so it neither moves the endpoint nor counts.
                    to_net.push(answer, Some(source));
                    return;
                }
                let completed = matches!(
                    (kind, message),
                    (MessageKind::HandshakeInit, Some(HANDSHAKE_RESPONSE))
                        | (MessageKind::HandshakeResponse, Some(DATA))
                );
                if completed {
                    state.last_handshake = Some(clock.wall);
                }
                state.authenticated(&self.public_key, datagram.len(), source);
                state.tx_bytes += answer.len() as u64;
                to_net.push(answer, Some(source));
                state.release_queued(to_net, source);
                state.last_sent = Some(clock.now);
            }
            TunnResult::Done => {
                // A keepalive or a cookie reply was consumed.
                if kind == MessageKind::Data {
                    state.authenticated(&self.public_key, datagram.len(), source);
                }
            }
            TunnResult::Err(error) => {
                tracing::trace!(peer = %self.public_key, %source, ?error, "dropped a datagram");
            }
        }
    }

    /// Runs WireGuard's timers (handshake retries, rekeying, keepalives) and this tunnel's
    /// persistent keepalive.
    fn tick(&self, to_net: &mut PacketBatch, now: Instant) {
        let mut state = self.lock();
        let endpoint = state.endpoint;
        if let Some(slot) = to_net.free_slot() {
            match state.tunn.update_timers(slot) {
                TunnResult::WriteToNetwork(datagram) => {
                    let len = datagram.len();
                    if endpoint.is_some() {
                        state.tx_bytes += len as u64;
                        state.last_sent = Some(now);
                        to_net.commit(len, endpoint);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(error) => tracing::debug!(peer = %self.public_key, ?error, "timer error"),
                _ => {}
            }
        }
        // The persistent keepalive is kept here rather than in `Tunn` so that changing its
        // interval never replaces the peer's `Tunn` and its session. Encapsulating an empty
        // packet sends a keepalive on a live session, or starts a handshake without one.
        let Some(interval) = state.persistent_keepalive.filter(|seconds| *seconds > 0) else { return };
        if endpoint.is_none()
            || state.last_sent.is_some_and(|sent| now.duration_since(sent) < Duration::from_secs(interval.into()))
        {
            return;
        }
        state.last_sent = Some(now);
        let Some(slot) = to_net.free_slot() else { return };
        if let TunnResult::WriteToNetwork(datagram) = state.tunn.encapsulate(&[], slot) {
            let len = datagram.len();
            state.tx_bytes += len as u64;
            to_net.commit(len, endpoint);
        }
    }
    /// Sends something authenticated to the peer right now: a keepalive on a live session, or a
    /// handshake initiation without one (none while a handshake is already under way). Used when
    /// this side's network changed, so that the peer learns the new address at once instead of
    /// at the next persistent keepalive.
    fn nudge(&self, to_net: &mut PacketBatch, now: Instant) {
        let mut state = self.lock();
        let Some(endpoint) = state.endpoint else { return };
        let Some(slot) = to_net.free_slot() else { return };
        if let TunnResult::WriteToNetwork(datagram) = state.tunn.encapsulate(&[], slot) {
            let len = datagram.len();
            state.tx_bytes += len as u64;
            state.last_sent = Some(now);
            to_net.commit(len, Some(endpoint));
        }
    }
}

impl PeerState {
    /// Records an authenticated datagram: counts it and follows the peer to its new address
    /// (WireGuard roaming).
    fn authenticated(&mut self, peer: &PublicKey, len: usize, source: SocketAddr) {
        self.rx_bytes += len as u64;
        if self.endpoint != Some(source) {
            tracing::info!(%peer, from = ?self.endpoint, to = %source, "peer endpoint changed");
            self.endpoint = Some(source);
        }
    }

    /// Sends the packets `Tunn` queued while it had no session, now that it has one.
    fn release_queued(&mut self, to_net: &mut PacketBatch, endpoint: SocketAddr) {
        loop {
            let Some(slot) = to_net.free_slot() else { return };
            let len = match self.tunn.decapsulate(None, &[], slot) {
                TunnResult::WriteToNetwork(datagram) => datagram.len(),
                _ => return,
            };
            self.tx_bytes += len as u64;
            to_net.commit(len, Some(endpoint));
        }
    }
}

/// The time of one processing pass, read once per batch.
pub(crate) struct Clock {
    pub(crate) now: Instant,
    pub(crate) wall: SystemTime,
}

impl Clock {
    pub(crate) fn now() -> Self {
        Self { now: Instant::now(), wall: SystemTime::now() }
    }
}

/// An immutable snapshot of the peer set. Workers take the current snapshot once per batch;
/// a new peer set is a new snapshot that shares the [`Peer`]s (and so the sessions) of every
/// peer that did not change.
#[derive(Default)]
pub(crate) struct PeerTable {
    configs: Vec<PeerConfig>,
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: RouteTable<Arc<Peer>>,
}

impl PeerTable {
    /// The table for `desired`, reusing this table's peers, and the changes that led to it.
    /// Endpoint and keepalive updates are applied to the shared peers right away.
    pub(crate) fn apply(
        &self,
        identity: &Identity,
        desired: Vec<PeerConfig>,
    ) -> Result<(PeerTable, Vec<PeerChange>), PeerSetError> {
        validate(&desired, &identity.public_key)?;
        let changes = diff(&desired, &self.configs);
        let mut by_key = self.by_key.clone();
        let mut by_index = self.by_index.clone();
        for change in &changes {
            match change {
                PeerChange::Remove(key) => {
                    if let Some(peer) = by_key.remove(key) {
                        by_index.remove(&peer.index);
                    }
                }
                PeerChange::Update(update) => {
                    if let Some(peer) = by_key.get(&update.public_key) {
                        peer.update(update);
                    }
                }
                PeerChange::Add(config) => {
                    let index = free_index(&by_index);
                    let peer = Arc::new(Peer::new(identity, config, index));
                    by_index.insert(index, Arc::clone(&peer));
                    by_key.insert(config.public_key, peer);
                }
            }
        }
        let mut routes = RouteTable::default();
        for config in &desired {
            if let Some(peer) = by_key.get(&config.public_key) {
                for network in normalized(&config.allowed_ips) {
                    routes.insert(network, Arc::clone(peer));
                }
            }
        }
        Ok((PeerTable { configs: desired, by_key, by_index, routes }, changes))
    }

    pub(crate) fn configs(&self) -> &[PeerConfig] {
        &self.configs
    }

    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        self.configs.iter().filter_map(|config| self.by_key.get(&config.public_key)).map(|peer| peer.stats()).collect()
    }

    /// The peer a WireGuard message belongs to, and the message's kind.
    fn sender(&self, identity: &Identity, packet: &Packet<'_>) -> Option<(&Arc<Peer>, MessageKind)> {
        let (index, kind) = match packet {
            Packet::HandshakeInit(init) => {
                // The initiator's key is encrypted inside the message; decrypting it is the
                // expensive step the rate limiter protects.
                let half = parse_handshake_anon(identity.private_key.secret(), &identity.static_public, init).ok()?;
                let peer = self.by_key.get(&PublicKey::from_bytes(half.peer_static_public))?;
                return Some((peer, MessageKind::HandshakeInit));
            }
            Packet::HandshakeResponse(response) => (response.receiver_idx, MessageKind::HandshakeResponse),
            Packet::PacketCookieReply(reply) => (reply.receiver_idx, MessageKind::CookieReply),
            Packet::PacketData(data) => (data.receiver_idx, MessageKind::Data),
        };
        Some((self.by_index.get(&(index >> 8))?, kind))
    }
}

/// A random peer index not used yet. Random rather than sequential so that indexes on the wire
/// say nothing about how many peers a tunnel has had.
fn free_index(used: &HashMap<u32, Arc<Peer>>) -> u32 {
    loop {
        let index = rand::random::<u32>() & INDEX_MASK;
        if !used.contains_key(&index) {
            return index;
        }
    }
}

/// Egress: routes each IP packet read from the TUN to the peer owning its destination and
/// encrypts it. Packets to no peer are dropped.
pub(crate) fn process_egress(table: &PeerTable, from_tun: &PacketBatch, to_net: &mut PacketBatch, clock: &Clock) {
    for (packet, _) in from_tun.iter() {
        let Some(peer) = ipv4_destination(packet).and_then(|destination| table.routes.lookup(destination)) else {
            continue;
        };
        peer.encapsulate(packet, to_net, clock.now);
    }
}

/// Ingress: matches each datagram to its peer, decrypts it and filters it.
pub(crate) fn process_ingress(
    identity: &Identity,
    table: &PeerTable,
    from_net: &PacketBatch,
    to_tun: &mut PacketBatch,
    to_net: &mut PacketBatch,
    clock: &Clock,
) {
    for (datagram, source) in from_net.iter() {
        let Some(slot) = to_net.free_slot() else { return };
        let packet = match identity.rate_limiter.verify_packet(Some(source.ip()), datagram, slot) {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                to_net.commit(len, Some(source));
                continue;
            }
            Err(_) => continue,
        };
        let Some((peer, kind)) = table.sender(identity, &packet) else {
            tracing::trace!(%source, "dropped a datagram for no known peer");
            continue;
        };
        peer.decapsulate(table, Received { datagram, source, kind }, to_tun, to_net, clock);
    }
}

/// Timers: WireGuard's timers and persistent keepalives of every peer.
pub(crate) fn process_timers(table: &PeerTable, to_net: &mut PacketBatch, clock: &Clock) {
    for peer in table.by_key.values() {
        peer.tick(to_net, clock.now);
    }
}

/// Nudge: every peer with an endpoint gets a keepalive or a handshake initiation now (see
/// [`Peer::nudge`]).
pub(crate) fn process_nudge(table: &PeerTable, to_net: &mut PacketBatch, clock: &Clock) {
    for peer in table.by_key.values() {
        peer.nudge(to_net, clock.now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One side of an in-memory tunnel: its identity, its peer table and its address on the
    /// (simulated) underlay.
    struct Side {
        identity: Identity,
        table: PeerTable,
        address: SocketAddr,
    }

    impl Side {
        fn new(address: &str) -> Self {
            Self {
                identity: Identity::new(PrivateKey::generate().unwrap()),
                table: PeerTable::default(),
                address: address.parse().unwrap(),
            }
        }

        fn set_peers(&mut self, peers: Vec<PeerConfig>) -> Vec<PeerChange> {
            let (table, changes) = self.table.apply(&self.identity, peers).unwrap();
            self.table = table;
            changes
        }

        /// Sends IP packets: what this side puts on the wire.
        fn send(&self, packets: &[Vec<u8>]) -> PacketBatch {
            let mut from_tun = PacketBatch::bounded(packets.len().max(1));
            for packet in packets {
                assert!(from_tun.push(packet, None));
            }
            let mut to_net = PacketBatch::growable(4);
            process_egress(&self.table, &from_tun, &mut to_net, &Clock::now());
            to_net
        }

        /// Receives datagrams from `from`: returns the IP packets delivered to the TUN and the
        /// datagrams sent back.
        fn receive(&self, datagrams: &PacketBatch, from: SocketAddr) -> (Vec<Vec<u8>>, PacketBatch) {
            let mut from_net = PacketBatch::bounded(datagrams.len().max(1));
            for (datagram, _) in datagrams.iter() {
                assert!(from_net.push(datagram, Some(from)));
            }
            let mut to_tun = PacketBatch::growable(4);
            let mut to_net = PacketBatch::growable(4);
            process_ingress(&self.identity, &self.table, &from_net, &mut to_tun, &mut to_net, &Clock::now());
            (to_tun.iter().map(|(packet, _)| packet.to_vec()).collect(), to_net)
        }

        fn stats_of(&self, key: PublicKey) -> PeerStats {
            self.table.stats().into_iter().find(|stats| stats.public_key == key).unwrap()
        }
    }

    /// A minimal IPv4 packet with a correct total length (all `Tunn` checks).
    fn ipv4(source: [u8; 4], destination: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        let total = u16::try_from(20 + payload.len()).unwrap();
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[8] = 64;
        packet[9] = 17;
        packet[12..16].copy_from_slice(&source);
        packet[16..20].copy_from_slice(&destination);
        packet.extend_from_slice(payload);
        packet
    }

    fn config(side: &Side, endpoint: Option<SocketAddr>, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: side.identity.public_key(),
            endpoint,
            allowed_ips: allowed.iter().map(|network| network.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    /// A device (knows the edge's endpoint) and an edge (learns the device's), handshaken by a
    /// first packet from the device, which is returned as delivered.
    fn connected() -> (Side, Side, Vec<Vec<u8>>) {
        let mut device = Side::new("192.0.2.2:40000");
        let mut edge = Side::new("192.0.2.1:51820");
        device.set_peers(vec![config(&edge, Some(edge.address), &["100.64.0.0/24"])]);
        edge.set_peers(vec![config(&device, None, &["100.64.0.2/32"])]);

        let first = ipv4([100, 64, 0, 2], [100, 64, 0, 1], b"hello");
        let init = device.send(std::slice::from_ref(&first));
        assert_eq!(init.len(), 1, "the first packet is queued behind a handshake initiation");
        assert_eq!(init.get(0).1, edge.address);
        assert_eq!(init.get(0).0[0], 1);

        let (delivered, response) = edge.receive(&init, device.address);
        assert!(delivered.is_empty());
        assert_eq!(response.len(), 1);
        assert_eq!(response.get(0).1, device.address, "the edge learned the device's endpoint");

        let (delivered, released) = device.receive(&response, edge.address);
        assert!(delivered.is_empty());
        assert_eq!(released.len(), 2, "a keepalive, then the queued packet");
        let (delivered, answers) = edge.receive(&released, device.address);
        assert!(answers.is_empty());
        (device, edge, delivered)
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let (device, edge, delivered) = connected();
        assert_eq!(delivered, vec![ipv4([100, 64, 0, 2], [100, 64, 0, 1], b"hello")]);
        assert!(edge.stats_of(device.identity.public_key()).last_handshake.is_some());
        assert!(device.stats_of(edge.identity.public_key()).last_handshake.is_some());

        let reply = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"world");
        let datagrams = edge.send(std::slice::from_ref(&reply));
        assert_eq!(datagrams.get(0).1, device.address);
        let (delivered, _) = device.receive(&datagrams, edge.address);
        assert_eq!(delivered, vec![reply]);

        let stats = edge.stats_of(device.identity.public_key());
        assert!(stats.rx_bytes > 0 && stats.tx_bytes > 0);
        assert_eq!(stats.endpoint, Some(device.address));
    }

    #[test]
    fn packets_to_no_peer_are_dropped() {
        let (device, _edge, _) = connected();
        let datagrams = device.send(&[ipv4([100, 64, 0, 2], [198, 51, 100, 1], b"x"), vec![0x60; 40], vec![]]);
        assert!(datagrams.is_empty());
    }

    #[test]
    fn spoofed_inner_source_is_dropped_and_counted() {
        let (device, edge, _) = connected();
        let spoofed = ipv4([100, 64, 0, 99], [100, 64, 0, 1], b"as someone else");
        let (delivered, _) = edge.receive(&device.send(&[spoofed]), device.address);
        assert!(delivered.is_empty());
        assert_eq!(edge.stats_of(device.identity.public_key()).spoofed_packets, 1);

        // The device's own address still passes.
        let honest = ipv4([100, 64, 0, 2], [100, 64, 0, 1], b"as myself");
        let (delivered, _) = edge.receive(&device.send(std::slice::from_ref(&honest)), device.address);
        assert_eq!(delivered, vec![honest]);
    }

    #[test]
    fn a_source_owned_by_another_peer_is_refused_too() {
        let (device, mut edge, _) = connected();
        let other = Side::new("192.0.2.3:40000");
        let mut peers = edge.table.configs().to_vec();
        peers.push(config(&other, None, &["100.64.0.3/32"]));
        edge.set_peers(peers);
        let as_other = ipv4([100, 64, 0, 3], [100, 64, 0, 1], b"as the other device");
        let (delivered, _) = edge.receive(&device.send(&[as_other]), device.address);
        assert!(delivered.is_empty());
    }

    #[test]
    fn roaming_follows_authenticated_packets_only() {
        let (device, edge, _) = connected();
        let moved: SocketAddr = "198.51.100.2:40001".parse().unwrap();
        let packet = ipv4([100, 64, 0, 2], [100, 64, 0, 1], b"from a new network");
        let datagrams = device.send(std::slice::from_ref(&packet));

        // Garbage from yet another address moves nothing.
        let mut garbage = PacketBatch::bounded(1);
        let mut forged = datagrams.get(0).0.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(garbage.push(&forged, None));
        let (delivered, _) = edge.receive(&garbage, "203.0.113.66:1".parse().unwrap());
        assert!(delivered.is_empty());
        assert_eq!(edge.stats_of(device.identity.public_key()).endpoint, Some(device.address));

        let (delivered, _) = edge.receive(&datagrams, moved);
        assert_eq!(delivered, vec![packet]);
        assert_eq!(edge.stats_of(device.identity.public_key()).endpoint, Some(moved));
        let answer = edge.send(&[ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"back")]);
        assert_eq!(answer.get(0).1, moved);
    }

    #[test]
    fn unchanged_peers_keep_their_session_across_updates() {
        let (device, mut edge, _) = connected();
        let key = device.identity.public_key();
        let before = edge.stats_of(key).last_handshake;
        let third = Side::new("198.51.100.3:40000");
        let changes = edge.set_peers(vec![
            config(&device, None, &["100.64.0.2/32", "100.64.0.99/32"]),
            config(&third, None, &["100.64.0.3/32"]),
        ]);
        assert_eq!(changes.len(), 2);
        assert_eq!(edge.stats_of(key).last_handshake, before);

        // The old session still decrypts, and the widened allowed IPs apply at once.
        let packet = ipv4([100, 64, 0, 99], [100, 64, 0, 1], b"now allowed");
        let (delivered, answers) = edge.receive(&device.send(std::slice::from_ref(&packet)), device.address);
        assert_eq!(delivered, vec![packet]);
        assert!(answers.is_empty(), "no new handshake");
    }

    #[test]
    fn unknown_senders_get_nothing() {
        let (_device, edge, _) = connected();
        let stranger = {
            let mut stranger = Side::new("203.0.113.9:1");
            stranger.set_peers(vec![config(&edge, Some(edge.address), &["100.64.0.0/24"])]);
            stranger
        };
        let init = stranger.send(&[ipv4([100, 64, 0, 9], [100, 64, 0, 1], b"let me in")]);
        assert_eq!(init.len(), 1);
        let (delivered, answers) = edge.receive(&init, stranger.address);
        assert!(delivered.is_empty());
        assert!(answers.is_empty());
    }

    #[test]
    fn persistent_keepalive_starts_a_handshake_without_traffic() {
        let mut device = Side::new("192.0.2.2:40000");
        let edge = Side::new("192.0.2.1:51820");
        let mut peer = config(&edge, Some(edge.address), &["100.64.0.0/24"]);
        peer.persistent_keepalive = Some(1);
        device.set_peers(vec![peer]);
        let mut to_net = PacketBatch::growable(2);
        process_timers(&device.table, &mut to_net, &Clock::now());
        assert_eq!(to_net.len(), 1);
        assert_eq!(to_net.get(0).0[0], 1, "a handshake initiation");
        assert_eq!(to_net.get(0).1, edge.address);

        // Within the interval nothing more is sent.
        to_net.clear();
        process_timers(&device.table, &mut to_net, &Clock::now());
        assert!(to_net.is_empty());
    }

    #[test]
    fn a_nudge_sends_a_keepalive_that_moves_the_peers_view_at_once() {
        let (device, edge, _) = connected();
        let mut to_net = PacketBatch::growable(2);
        process_nudge(&device.table, &mut to_net, &Clock::now());
        assert_eq!(to_net.len(), 1);
        assert_eq!(to_net.get(0).0[0], DATA, "a keepalive on the live session");
        assert_eq!(to_net.get(0).1, edge.address);

        // The device moved networks: its nudge, from the new address, moves the edge's view.
        let moved: SocketAddr = "198.51.100.2:40000".parse().unwrap();
        let (delivered, answers) = edge.receive(&to_net, moved);
        assert!(delivered.is_empty() && answers.is_empty(), "a keepalive carries no packet");
        assert_eq!(edge.stats_of(device.identity.public_key()).endpoint, Some(moved));
    }

    #[test]
    fn a_nudge_without_a_session_starts_a_handshake_once() {
        let mut device = Side::new("192.0.2.2:40000");
        let edge = Side::new("192.0.2.1:51820");
        let learned = Side::new("192.0.2.3:40000");
        device.set_peers(vec![
            config(&edge, Some(edge.address), &["100.64.0.1/32"]),
            config(&learned, None, &["100.64.0.3/32"]),
        ]);
        let mut to_net = PacketBatch::growable(2);
        process_nudge(&device.table, &mut to_net, &Clock::now());
        assert_eq!(to_net.len(), 1, "nothing for a peer whose endpoint is unknown");
        assert_eq!(to_net.get(0).0[0], 1, "a handshake initiation");
        to_net.clear();
        process_nudge(&device.table, &mut to_net, &Clock::now());
        assert!(to_net.is_empty(), "not again while the handshake is under way");
    }
}
