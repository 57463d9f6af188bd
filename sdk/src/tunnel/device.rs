//! A running WireGuard tunnel: one TUN interface, one UDP socket, and three worker threads.
//!
//! ```text
//!   TUN ──read batch──► egress: route by destination, encrypt ──write batch──► UDP
//!   UDP ──read batch──► ingress: match peer, decrypt, filter by source ──write batch──► TUN
//!                                                         └─ handshake answers ──► UDP
//!   every 250 ms ──► timers: handshake retries, rekeying, keepalives ──► UDP
//! ```
//!
//! Each worker owns reusable batches ([`batch`]) and runs three separate stages: fill a batch
//! with system calls ([`io`]), process it without any ([`engine`]), drain the results with
//! system calls. The peer set is an immutable snapshot that workers take once per batch, so
//! [`Tunnel::set_peers`] never waits for them and never disturbs a peer that did not change.
//!
//! Bulk transfers are bound by per-packet system calls and kernel work, not by crypto, so the
//! I/O stages move up to 64 KiB per call: the TUN hands over TCP super-packets that [`offload`]
//! splits into MTU-size packets before encryption, and takes coalesced ones after decryption;
//! the socket sends runs with UDP GSO and receives them merged by UDP GRO. Each packet is still
//! encrypted on its own by `Tunn`. One egress and one ingress worker suffice on the small
//! machines this runs on; a multi-queue TUN with a worker pair per core would be the next step
//! for larger ones.

mod batch;
mod engine;
mod io;
mod offload;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use nix::poll::PollFlags;
use nix::sys::socket::{setsockopt, sockopt};
use tun_rs::{DeviceBuilder, SyncDevice};

use self::batch::PacketBatch;
use self::engine::{Clock, Identity, PeerTable};
use self::io::{GRO_BUFFER_LEN, GRO_BUFFERS, Wake, Waker};
use self::offload::{Coalescer, MAX_FRAME_LEN};
use super::keys::{PrivateKey, PublicKey};
use super::peers::{PeerChange, PeerConfig, PeerSetError};

/// The MTU of the tunnel interface: 1500 bytes of underlay less the 80 bytes of an IPv6 UDP
/// WireGuard header, as WireGuard's own tools choose.
pub const MTU: u16 = 1420;

/// Packets read per system-call stage.
const BATCH_SIZE: usize = 64;

/// How often WireGuard's timers run (boringtun's own device uses the same period).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// The UDP socket's buffers: large enough to absorb bursts at gigabit rates. Root may exceed
/// `net.core.rmem_max`; otherwise the kernel caps the value.
const SOCKET_BUFFER: usize = 8 << 20;

/// Everything needed to start a tunnel.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The TUN interface to create, at most 15 characters (e.g. `edgible0`).
    pub interface_name: String,
    pub private_key: PrivateKey,
    /// This side's tunnel address and the prefix routed through the interface, e.g.
    /// `100.96.0.5/16` for a device of a pool whose CIDR is `100.96.0.0/16`.
    pub address: Ipv4Net,
    /// The UDP port to listen on; `None` picks a free one (devices, which only dial out).
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerConfig>,
}

/// What the tunnel knows about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    /// Where the peer's datagrams currently go: configured, or learned from its last
    /// authenticated packet.
    pub endpoint: Option<SocketAddr>,
    /// When the current session's handshake completed.
    pub last_handshake: Option<SystemTime>,
    /// Bytes of authenticated datagrams received from the peer.
    pub rx_bytes: u64,
    /// Bytes of datagrams sent to the peer.
    pub tx_bytes: u64,
    /// Authenticated packets dropped because their inner source address is not one of the
    /// peer's allowed IPs.
    pub spoofed_packets: u64,
}

/// Why a tunnel could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the interface name {0:?} must be 1 to 15 characters, without '/' or white space")]
    InterfaceName(String),
    #[error("invalid peer set: {0}")]
    Peers(#[from] PeerSetError),
    #[error("cannot open the UDP socket on port {port}: {source}")]
    Socket { port: u16, source: std::io::Error },
    #[error("cannot create the TUN interface {name} (this needs root or CAP_NET_ADMIN): {source}")]
    Tun { name: String, source: std::io::Error },
    #[error("cannot start the tunnel's workers: {0}")]
    Workers(std::io::Error),
}

/// The body of one worker thread.
type Worker = fn(&Shared) -> std::io::Result<()>;

/// State shared by the handle and the workers.
struct Shared {
    identity: Identity,
    table: RwLock<Arc<PeerTable>>,
    tun: SyncDevice,
    /// Whether the TUN exchanges frames with a virtio-net header (TSO/USO and GRO offloads).
    offload: bool,
    socket: UdpSocket,
    /// Whether the socket receives runs of datagrams merged by UDP GRO.
    udp_gro: bool,
    waker: Waker,
    interface_name: String,
}

impl Shared {
    /// The current peer set.
    fn table(&self) -> Arc<PeerTable> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A running tunnel. Dropping it (or [`Tunnel::shutdown`]) stops the workers and removes the
/// interface.
pub struct Tunnel {
    shared: Arc<Shared>,
    address: Ipv4Net,
    listen_port: u16,
    /// Serialises peer-set changes, so that each diff is taken against the set it replaces.
    changing: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Creates the interface (address, MTU, up), opens the socket and starts the workers.
    /// Blocking but quick; needs root or CAP_NET_ADMIN.
    pub fn start(config: TunnelConfig) -> Result<Tunnel, TunnelError> {
        let TunnelConfig { interface_name, private_key, address, listen_port, peers } = config;
        if !valid_interface_name(&interface_name) {
            return Err(TunnelError::InterfaceName(interface_name));
        }
        let identity = Identity::new(private_key);
        let (table, _) = PeerTable::default().apply(&identity, peers)?;

        let port = listen_port.unwrap_or(0);
        let (socket, udp_gro) = open_socket(port).map_err(|source| TunnelError::Socket { port, source })?;
        let listen_port = socket.local_addr().map_err(|source| TunnelError::Socket { port, source })?.port();
        let (tun, offload) = open_tun(&interface_name, address)
            .map_err(|source| TunnelError::Tun { name: interface_name.clone(), source })?;
        let waker = Waker::new().map_err(TunnelError::Workers)?;

        let shared = Arc::new(Shared {
            identity,
            table: RwLock::new(Arc::new(table)),
            tun,
            offload,
            socket,
            udp_gro,
            waker,
            interface_name: interface_name.clone(),
        });
        let mut tunnel = Tunnel { shared, address, listen_port, changing: Mutex::new(()), workers: Vec::new() };
        let workers: [(&str, Worker); 3] = [("egress", egress), ("ingress", ingress), ("timers", timers)];
        for (role, work) in workers {
            let shared = Arc::clone(&tunnel.shared);
            let spawned =
                std::thread::Builder::new().name(format!("wg-{role}-{interface_name}")).spawn(move || {
                    if let Err(error) = work(&shared) {
                        tracing::error!(interface = %shared.interface_name, role, %error, "tunnel worker failed; stopping the tunnel");
                        shared.waker.stop();
                    }
                });
            // On failure, dropping `tunnel` stops and joins the workers already started.
            tunnel.workers.push(spawned.map_err(TunnelError::Workers)?);
        }
        tracing::info!(
            interface = %interface_name,
            %address,
            listen_port,
            offload,
            udp_gro,
            public_key = %tunnel.public_key(),
            peers = tunnel.shared.table().configs().len(),
            "tunnel started"
        );
        Ok(tunnel)
    }

    /// Replaces the peer set: peers are added, removed or updated as [`diff`](super::peers::diff)
    /// says, and peers that did not change keep their sessions. Returns the applied changes.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<Vec<PeerChange>, TunnelError> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let (table, changes) = self.shared.table().apply(&self.shared.identity, peers)?;
        *self.shared.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        for change in &changes {
            tracing::info!(interface = %self.shared.interface_name, ?change, "peer set changed");
        }
        Ok(changes)
    }

    /// Makes every peer with a known endpoint hear from this side now: a keepalive on a live
    /// session, or a handshake initiation without one. Call it when this host's addresses
    /// changed (it moved networks) so that peers learn its new address within a round trip
    /// rather than at the next persistent keepalive, and when the application above suspects
    /// the path (a control connection that came back). Sent from the calling thread; send errors
    /// are logged, never fatal.
    pub fn nudge(&self) {
        let mut to_net = PacketBatch::growable(8);
        engine::process_nudge(&self.shared.table(), &mut to_net, &Clock::now());
        if let Err(error) = io::write_udp(&self.shared.socket, &to_net, &self.shared.waker) {
            tracing::warn!(interface = %self.shared.interface_name, %error, "cannot nudge the tunnel's peers");
        }
        tracing::debug!(interface = %self.shared.interface_name, "nudged the peers");
    }

    /// The configured peer set (as last given, not as learned: see [`Tunnel::stats`]).
    pub fn peers(&self) -> Vec<PeerConfig> {
        self.shared.table().configs().to_vec()
    }

    /// One entry per configured peer, in the configured order.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.shared.table().stats()
    }

    pub fn public_key(&self) -> PublicKey {
        self.shared.identity.public_key()
    }

    pub fn interface_name(&self) -> &str {
        &self.shared.interface_name
    }

    pub fn address(&self) -> Ipv4Net {
        self.address
    }

    /// The UDP port the tunnel listens on (the chosen one when none was configured).
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// False once the tunnel stopped, by [`Tunnel::shutdown`] or because a worker failed (the
    /// failure is logged).
    pub fn is_running(&self) -> bool {
        !self.shared.waker.is_stopping()
    }

    /// Stops the workers and removes the interface.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.waker.stop();
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!(interface = %self.shared.interface_name, "a tunnel worker panicked");
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("interface_name", &self.shared.interface_name)
            .field("address", &self.address)
            .field("listen_port", &self.listen_port)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// Linux interface names: at most 15 bytes (IFNAMSIZ less the terminating zero), and no
/// characters that `dev_valid_name` refuses.
fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|character| character == '/' || character == ':' || character.is_whitespace())
}

/// Opens the socket, with UDP GRO where the kernel has it; returns whether it does.
fn open_socket(port: u16) -> std::io::Result<(UdpSocket, bool)> {
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    // The forcing variants let root exceed `net.core.[rw]mem_max`; without the privilege, fall
    // back to what the limits allow. Small buffers only cost throughput, so errors are ignored.
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    socket.set_nonblocking(true)?;
    let udp_gro = setsockopt(&socket, sockopt::UdpGroSegment, &true).is_ok();
    Ok((socket, udp_gro))
}

/// Creates the TUN with offloads (`IFF_VNET_HDR` with checksum, TSO and USO offloads), or,
/// where the kernel refuses them, without. Returns whether offloads are on.
fn open_tun(name: &str, address: Ipv4Net) -> std::io::Result<(SyncDevice, bool)> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .ipv4(address.addr(), address.prefix_len(), None)
            .mtu(MTU)
            .offload(offload)
            .build_sync()
    };
    let tun = match build(true) {
        Ok(tun) => tun,
        Err(error) => {
            tracing::warn!(interface = name, %error, "TUN offloads unavailable; one system call per packet");
            build(false)?
        }
    };
    tun.set_nonblocking(true)?;
    let offload = tun.tcp_gso();
    Ok((tun, offload))
}

/// TUN → UDP.
fn egress(shared: &Shared) -> std::io::Result<()> {
    // With offloads one frame read can carry up to 64 KiB of segments, hence a growable batch.
    let mut frame = if shared.offload { vec![0; MAX_FRAME_LEN] } else { Vec::new() };
    let mut from_tun = PacketBatch::growable(BATCH_SIZE);
    let mut to_net = PacketBatch::growable(BATCH_SIZE);
    while !shared.waker.is_stopping() {
        from_tun.clear();
        to_net.clear();
        io::read_tun(&shared.tun, shared.offload.then_some(&mut frame[..]), &mut from_tun, BATCH_SIZE)?;
        if from_tun.is_empty() {
            shared.waker.wait(Some(shared.tun.as_fd()), PollFlags::POLLIN, None)?;
            continue;
        }
        engine::process_egress(&shared.table(), &from_tun, &mut to_net, &Clock::now());
        io::write_udp(&shared.socket, &to_net, &shared.waker)?;
    }
    Ok(())
}

/// UDP → TUN (and handshake answers back to UDP).
fn ingress(shared: &Shared) -> std::io::Result<()> {
    // With UDP GRO one receive can carry many datagrams, hence a growable batch.
    let mut gro_buffers = if shared.udp_gro { vec![0; GRO_BUFFERS * GRO_BUFFER_LEN] } else { Vec::new() };
    let mut from_net = PacketBatch::growable(BATCH_SIZE);
    let mut to_tun = PacketBatch::growable(BATCH_SIZE);
    let mut to_net = PacketBatch::growable(8);
    let mut coalescer = Coalescer::default();
    while !shared.waker.is_stopping() {
        from_net.clear();
        to_tun.clear();
        to_net.clear();
        if shared.udp_gro {
            io::read_udp_gro(&shared.socket, &mut gro_buffers, &mut from_net, BATCH_SIZE)?;
        } else {
            io::read_udp(&shared.socket, &mut from_net)?;
        }
        if from_net.is_empty() {
            shared.waker.wait(Some(shared.socket.as_fd()), PollFlags::POLLIN, None)?;
            continue;
        }
        engine::process_ingress(&shared.identity, &shared.table(), &from_net, &mut to_tun, &mut to_net, &Clock::now());
        io::write_udp(&shared.socket, &to_net, &shared.waker)?;
        io::write_tun(&shared.tun, &mut to_tun, shared.offload.then_some(&mut coalescer), &shared.waker)?;
    }
    Ok(())
}

/// WireGuard's timers, every [`TIMER_TICK`].
fn timers(shared: &Shared) -> std::io::Result<()> {
    let mut to_net = PacketBatch::growable(8);
    loop {
        to_net.clear();
        shared.identity.reset_rate_limit();
        engine::process_timers(&shared.table(), &mut to_net, &Clock::now());
        io::write_udp(&shared.socket, &to_net, &shared.waker)?;
        if shared.waker.wait(None, PollFlags::empty(), Some(TIMER_TICK))? == Wake::Stopping {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_can_be_shared_between_threads_and_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Tunnel>();
        shareable::<TunnelConfig>();
    }

    #[test]
    fn interface_names_follow_linux_rules() {
        assert!(valid_interface_name("edgible0"));
        assert!(valid_interface_name("wg-edge-123456"));
        assert!(!valid_interface_name(""));
        assert!(!valid_interface_name("sixteen-chars-xx"));
        assert!(!valid_interface_name("a/b"));
        assert!(!valid_interface_name("a b"));
        assert!(!valid_interface_name(".."));
    }

    #[test]
    fn start_refuses_a_bad_name_or_peer_set_before_touching_the_system() {
        let private_key = PrivateKey::generate().unwrap();
        let own = PeerConfig {
            public_key: private_key.public_key(),
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
        };
        let config = TunnelConfig {
            interface_name: "bad name".into(),
            private_key: private_key.clone(),
            address: "100.64.0.1/24".parse().unwrap(),
            listen_port: None,
            peers: vec![],
        };
        assert!(matches!(Tunnel::start(config.clone()), Err(TunnelError::InterfaceName(_))));
        let config = TunnelConfig { interface_name: "edg0".into(), peers: vec![own], ..config };
        assert!(matches!(Tunnel::start(config), Err(TunnelError::Peers(PeerSetError::OwnKey(_)))));
    }
}
