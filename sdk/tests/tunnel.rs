//! The tunnel end to end: real TUN interfaces and UDP sockets in network namespaces joined by
//! veth pairs (192.0.2.0/24 and 198.51.100.0/24 underneath, 100.64.0.0/24 inside the tunnel).
//! An "edge" namespace holds one peer per device with allowed IPs exactly the device's /32;
//! each device holds the edge as its peer, like the platform's data plane.
//!
//! Needs root; runs only with `EDGIBLE_ACC=1` (see [`netns::is_heavy`]).

#[path = "tunnel/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use edgible::tunnel::{PeerChange, PeerConfig, PrivateKey, PublicKey, Tunnel, TunnelConfig};
use sha2::{Digest, Sha256};

use netns::{Namespace, is_heavy, key, link, ping_until, test_number, wait_until};

const EDGE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const TRANSFER_LEN: usize = 20 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// The tunnel address of device `number` (2, 3, ...).
fn device_address(number: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, number)
}

/// How the edge sees device `number`: only its /32, endpoint learned.
fn device_peer(key: PublicKey, number: u8) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: None,
        allowed_ips: vec![format!("{}/32", device_address(number)).parse().expect("a /32")],
        persistent_keepalive: None,
    }
}

fn start_edge(namespace: &Namespace, private_key: PrivateKey, peers: Vec<PeerConfig>) -> Result<Tunnel> {
    namespace.start_tunnel(TunnelConfig {
        interface_name: "wg-edge".into(),
        private_key,
        address: "100.64.0.1/24".parse()?,
        listen_port: None,
        peers,
    })
}

/// Starts device `number`, peered with the edge at `edge_underlay`.
fn start_device(
    namespace: &Namespace,
    private_key: PrivateKey,
    number: u8,
    edge: &Tunnel,
    edge_underlay: Ipv4Addr,
    persistent_keepalive: Option<u16>,
) -> Result<Tunnel> {
    namespace.start_tunnel(TunnelConfig {
        interface_name: "wg-dev".into(),
        private_key,
        address: format!("{}/24", device_address(number)).parse()?,
        listen_port: None,
        peers: vec![PeerConfig {
            public_key: edge.public_key(),
            endpoint: Some(SocketAddr::from((edge_underlay, edge.listen_port()))),
            allowed_ips: vec!["100.64.0.0/24".parse()?],
            persistent_keepalive,
        }],
    })
}

/// An edge and one device, linked by 192.0.2.0/24, tunnels up.
struct Pair {
    // Fields drop in order: tunnels before the namespaces they live in.
    edge: Tunnel,
    device: Tunnel,
    device_key: PublicKey,
    device_namespace: Namespace,
    edge_namespace: Namespace,
}

impl Pair {
    fn start(device_keepalive: Option<u16>) -> Result<Self> {
        let test = test_number();
        let edge_namespace = Namespace::create(test, "edge")?;
        let device_namespace = Namespace::create(test, "dev")?;
        link(&device_namespace, "192.0.2.2/24", &edge_namespace, "192.0.2.1/24")?;
        let device_private = key();
        let device_key = device_private.public_key();
        let edge = start_edge(&edge_namespace, key(), vec![device_peer(device_key, 2)])?;
        let device =
            start_device(&device_namespace, device_private, 2, &edge, Ipv4Addr::new(192, 0, 2, 1), device_keepalive)?;
        Ok(Self { edge, device, device_key, device_namespace, edge_namespace })
    }

    fn device_seen_by_edge(&self) -> Result<edgible::tunnel::PeerStats> {
        self.edge
            .stats()
            .into_iter()
            .find(|stats| stats.public_key == self.device_key)
            .ok_or_else(|| anyhow!("the edge has no peer for the device"))
    }
}

/// A reproducible stream of bytes (xorshift), so both sides can be checked by digest.
struct Bytes(u64);

impl Bytes {
    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Sends `len` bytes over TCP from `client` to a listener on `address` in `server` and checks
/// that the SHA-256 of what arrived is the SHA-256 of what was sent. The client pauses halfway
/// until `midway` ran, which the test calls once a quarter of the data has arrived: so
/// `midway` happens in the middle of a live connection. Returns the throughput in Mbit/s.
fn transfer(
    client: &Namespace,
    server: &Namespace,
    address: Ipv4Addr,
    len: usize,
    midway: impl FnOnce() -> Result<()>,
) -> Result<f64> {
    let listener = server.run(|| Ok(TcpListener::bind((address, 0))?))?;
    let port = listener.local_addr()?.port();
    let mut sending = client.run(|| Ok(TcpStream::connect_timeout(&SocketAddr::from((address, port)), TIMEOUT)?))?;
    let (mut receiving, _) = listener.accept()?;
    sending.set_write_timeout(Some(TIMEOUT))?;
    receiving.set_read_timeout(Some(TIMEOUT))?;
    let received = AtomicU64::new(0);
    let (resume, resumed) = mpsc::channel::<()>();
    let started = Instant::now();

    let (sent_digest, received_digest) = std::thread::scope(|scope| -> Result<_> {
        let writer = scope.spawn(move || -> Result<[u8; 32]> {
            let mut bytes = Bytes(0x9e37_79b9_7f4a_7c15);
            let mut digest = Sha256::new();
            let mut buffer = vec![0u8; 64 << 10];
            let mut sent = 0;
            let mut paused = false;
            while sent < len {
                if !paused && sent >= len / 2 {
                    resumed.recv_timeout(TIMEOUT).context("midway never finished")?;
                    paused = true;
                }
                let chunk = buffer.len().min(len - sent);
                bytes.fill(&mut buffer[..chunk]);
                sending.write_all(&buffer[..chunk]).context("the transfer stalled")?;
                digest.update(&buffer[..chunk]);
                sent += chunk;
            }
            sending.shutdown(Shutdown::Write)?;
            Ok(digest.finalize().into())
        });
        let received = &received;
        let reader = scope.spawn(move || -> Result<[u8; 32]> {
            let mut digest = Sha256::new();
            let mut buffer = vec![0u8; 64 << 10];
            loop {
                let read = receiving.read(&mut buffer).context("the transfer stalled")?;
                if read == 0 {
                    return Ok(digest.finalize().into());
                }
                digest.update(&buffer[..read]);
                received.fetch_add(read as u64, Ordering::Relaxed);
            }
        });
        let quarter = len as u64 / 4;
        ensure!(
            wait_until(TIMEOUT, || received.load(Ordering::Relaxed) >= quarter),
            "only {} bytes arrived",
            received.load(Ordering::Relaxed)
        );
        let outcome = midway();
        // Resume the writer even when `midway` failed, so the threads end.
        let _ = resume.send(());
        outcome?;
        let sent = writer.join().map_err(|_| anyhow!("the writer panicked"))??;
        let arrived = reader.join().map_err(|_| anyhow!("the reader panicked"))??;
        Ok((sent, arrived))
    })?;
    let elapsed = started.elapsed();
    ensure!(
        received.load(Ordering::Relaxed) == len as u64,
        "{} of {len} bytes arrived",
        received.load(Ordering::Relaxed)
    );
    ensure!(sent_digest == received_digest, "the data arrived corrupted");
    Ok(len as f64 * 8.0 / elapsed.as_secs_f64() / 1e6)
}

#[test]
fn ping_and_a_20_mb_tcp_transfer_cross_the_tunnel() -> Result<()> {
    if !is_heavy() {
        return Ok(());
    }
    let pair = Pair::start(None)?;
    let took = ping_until(&pair.device_namespace, "100.64.0.1", Duration::from_secs(10))?;
    eprintln!("first ping (with handshake) answered after {took:?}");
    ping_until(&pair.edge_namespace, "100.64.0.2", Duration::from_secs(10))?;

    let mbits = transfer(&pair.device_namespace, &pair.edge_namespace, EDGE, TRANSFER_LEN, || Ok(()))?;
    eprintln!("20 MB device → edge at {mbits:.0} Mbit/s (this build's profile)");
    let mbits = transfer(&pair.edge_namespace, &pair.device_namespace, device_address(2), TRANSFER_LEN, || Ok(()))?;
    eprintln!("20 MB edge → device at {mbits:.0} Mbit/s (this build's profile)");

    let seen = pair.device_seen_by_edge()?;
    assert!(seen.last_handshake.is_some());
    assert!(seen.rx_bytes > TRANSFER_LEN as u64, "rx {}", seen.rx_bytes);
    assert!(seen.tx_bytes > TRANSFER_LEN as u64, "tx {}", seen.tx_bytes);
    assert_eq!(seen.endpoint.map(|endpoint| endpoint.ip()), Some(Ipv4Addr::new(192, 0, 2, 2).into()));
    assert_eq!(seen.endpoint.map(|endpoint| endpoint.port()), Some(pair.device.listen_port()));
    assert_eq!(seen.spoofed_packets, 0);
    assert!(pair.edge.is_running() && pair.device.is_running());
    Ok(())
}

#[test]
fn a_packet_spoofing_another_source_is_dropped() -> Result<()> {
    if !is_heavy() {
        return Ok(());
    }
    let pair = Pair::start(None)?;
    ping_until(&pair.device_namespace, "100.64.0.1", Duration::from_secs(10))?;
    let handshake = pair.device_seen_by_edge()?.last_handshake;

    // The device gives itself a second address it was not allocated, and sends from it.
    pair.device_namespace.ip(&["addr", "add", "100.64.0.99/32", "dev", "wg-dev"])?;
    let receiver = pair.edge_namespace.run(|| Ok(UdpSocket::bind((EDGE, 0))?))?;
    receiver.set_read_timeout(Some(Duration::from_secs(10)))?;
    let target = receiver.local_addr()?;
    let spoofing = pair.device_namespace.run(|| Ok(UdpSocket::bind((Ipv4Addr::new(100, 64, 0, 99), 0))?))?;
    let honest = pair.device_namespace.run(|| Ok(UdpSocket::bind((device_address(2), 0))?))?;

    spoofing.send_to(b"spoofed", target)?;
    honest.send_to(b"honest", target)?;
    // Packets of one peer cross the tunnel in order, so if the spoofed one had passed it would
    // arrive first.
    let mut buffer = [0u8; 64];
    let (len, from) = receiver.recv_from(&mut buffer).context("nothing arrived from the device")?;
    assert_eq!(&buffer[..len], b"honest");
    assert_eq!(from.ip(), device_address(2));
    assert_eq!(pair.device_seen_by_edge()?.spoofed_packets, 1);

    // The control: once the edge allows that address for the device, the same packet passes,
    // and widening the allowed IPs did not disturb the session.
    let mut widened = device_peer(pair.device_key, 2);
    widened.allowed_ips.push("100.64.0.99/32".parse()?);
    let changes = pair.edge.set_peers(vec![widened])?;
    assert!(matches!(&changes[..], [PeerChange::Update(update)] if update.allowed_ips.is_some()));
    spoofing.send_to(b"now allowed", target)?;
    let (len, from) = receiver.recv_from(&mut buffer).context("the newly allowed source did not pass")?;
    assert_eq!(&buffer[..len], b"now allowed");
    assert_eq!(from.ip(), Ipv4Addr::new(100, 64, 0, 99));
    assert_eq!(pair.device_seen_by_edge()?.last_handshake, handshake);
    Ok(())
}

#[test]
fn adding_a_peer_mid_transfer_leaves_the_existing_session_alone() -> Result<()> {
    if !is_heavy() {
        return Ok(());
    }
    let pair = Pair::start(None)?;
    let third_namespace = Namespace::create(test_number(), "third")?;
    link(&third_namespace, "198.51.100.2/24", &pair.edge_namespace, "198.51.100.1/24")?;
    ping_until(&pair.device_namespace, "100.64.0.1", Duration::from_secs(10))?;
    let handshake = pair.device_seen_by_edge()?.last_handshake;
    assert!(handshake.is_some());

    let third_private = key();
    let third_key = third_private.public_key();
    let mut third = None;
    transfer(&pair.device_namespace, &pair.edge_namespace, EDGE, TRANSFER_LEN, || {
        let changes = pair.edge.set_peers(vec![device_peer(pair.device_key, 2), device_peer(third_key, 3)])?;
        ensure!(changes == vec![PeerChange::Add(device_peer(third_key, 3))], "unexpected changes {changes:?}");
        let tunnel =
            start_device(&third_namespace, third_private, 3, &pair.edge, Ipv4Addr::new(198, 51, 100, 1), Some(1))?;
        third = Some(tunnel);
        // The new peer works while the first one's transfer goes on.
        ping_until(&third_namespace, "100.64.0.1", Duration::from_secs(10))?;
        Ok(())
    })?;

    let seen = pair.device_seen_by_edge()?;
    assert_eq!(seen.last_handshake, handshake, "the existing session was replaced");
    assert!(seen.rx_bytes > TRANSFER_LEN as u64);

    // Removing the new peer cuts it off, and again leaves the first one alone.
    let changes = pair.edge.set_peers(vec![device_peer(pair.device_key, 2)])?;
    assert_eq!(changes, vec![PeerChange::Remove(third_key)]);
    assert!(third_namespace.exec("ping", &["-c", "1", "-W", "1", "-q", "100.64.0.1"]).is_err());
    ping_until(&pair.device_namespace, "100.64.0.1", Duration::from_secs(10))?;
    assert_eq!(pair.device_seen_by_edge()?.last_handshake, handshake);
    drop(third);
    Ok(())
}

#[test]
fn traffic_resumes_after_the_device_changes_address() -> Result<()> {
    if !is_heavy() {
        return Ok(());
    }
    let pair = Pair::start(Some(1))?;
    ping_until(&pair.device_namespace, "100.64.0.1", Duration::from_secs(10))?;
    ping_until(&pair.edge_namespace, "100.64.0.2", Duration::from_secs(10))?;

    // A TCP connection opened before the move, on which the edge will speak first afterwards:
    // that needs the edge to know the device's new address.
    let listener = pair.edge_namespace.run(|| Ok(TcpListener::bind((EDGE, 0))?))?;
    let port = listener.local_addr()?.port();
    let mut device_side =
        pair.device_namespace.run(|| Ok(TcpStream::connect_timeout(&SocketAddr::from((EDGE, port)), TIMEOUT)?))?;
    let (mut edge_side, _) = listener.accept()?;
    device_side.set_read_timeout(Some(TIMEOUT))?;

    // The device moves to another address of its network, as after a new DHCP lease.
    pair.device_namespace.ip(&["addr", "del", "192.0.2.2/24", "dev", "to-edge"])?;
    pair.device_namespace.ip(&["addr", "add", "192.0.2.3/24", "dev", "to-edge"])?;
    let moved = Instant::now();

    edge_side.write_all(b"after the move")?;
    let mut buffer = [0u8; 14];
    device_side.read_exact(&mut buffer).context("the moved device heard nothing from the edge")?;
    assert_eq!(&buffer, b"after the move");
    let resumed = moved.elapsed();
    eprintln!("the edge reached the moved device over the old TCP connection after {resumed:?}");
    assert!(resumed < Duration::from_secs(10), "took {resumed:?}");

    let took = ping_until(&pair.edge_namespace, "100.64.0.2", Duration::from_secs(10))?;
    eprintln!("ping edge → device after the move answered after {took:?}");
    let endpoint = pair.device_seen_by_edge()?.endpoint.context("no endpoint")?;
    assert_eq!(endpoint, SocketAddr::from((Ipv4Addr::new(192, 0, 2, 3), pair.device.listen_port())));
    Ok(())
}
