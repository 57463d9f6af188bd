//! Userspace WireGuard over a TUN interface, shared by the agent and the edge.
//!
//! - [`keys`]: x25519 key pairs in WireGuard's base64 form, and the 0600 key file.
//! - [`peers`]: peer configurations and their reconciliation as a pure diff.
//! - [`Tunnel`]: the interface, one UDP socket and an I/O loop written here around
//!   `boringtun::noise::Tunn` (one per peer), with cryptokey routing, ingress filtering by
//!   source address, roaming and persistent keepalives.
//!
//! The edge holds one peer per device with allowed IPs exactly the device's /32 (so a device can
//! never send as another address); a device holds its pool's edges as peers with a persistent
//! keepalive, so the edge always knows where it is, also after it moved networks.
//!
//! Only IPv4 is carried, inside and outside the tunnel.

mod device;
pub mod keys;
mod packet;
pub mod peers;
mod routes;

pub use device::{MTU, PeerStats, Tunnel, TunnelConfig, TunnelError};
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use peers::{PeerChange, PeerConfig, PeerSetError, PeerUpdate, diff};
