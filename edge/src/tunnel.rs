//! The edge's WireGuard tunnel: started once, with the first configuration the hub pushes, and
//! given every later peer set through [`Tunnel::set_peers`], which keeps the sessions of peers
//! that did not change. Also the tunnel's metrics: peer count and per-peer handshake age.
//!
//! The tunnel listens on a fixed UDP port (devices dial the edge's endpoint) and its address is
//! the edge's tunnel address with the pool's prefix, so the whole pool network routes through
//! the interface.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use edgible::model::DeviceId;
use edgible::tunnel::{PrivateKey, PublicKey, Tunnel, TunnelConfig, TunnelError};

use crate::hub_client::plan::EdgePlan;
use crate::hub_client::{PeerSet, PeerSetError};
use crate::metrics::{MetricSource, write_family};

/// How to start the tunnel.
#[derive(Clone)]
pub struct TunnelSettings {
    /// The TUN interface, e.g. `edgible-edge0`.
    pub interface_name: String,
    /// The UDP port devices send to.
    pub listen_port: u16,
    pub private_key: PrivateKey,
}

/// Starts a tunnel. [`Tunnel::start`] normally; tests that run the edge inside a network
/// namespace start it there.
pub type Starter = Box<dyn Fn(TunnelConfig) -> Result<Tunnel, TunnelError> + Send + Sync>;

/// The edge's tunnel, absent until the first configuration.
pub struct EdgeTunnel {
    settings: TunnelSettings,
    start: Starter,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    tunnel: Option<Tunnel>,
    /// Which device each peer key is, from the last plan, for metrics labels.
    devices: BTreeMap<PublicKey, DeviceId>,
}

impl EdgeTunnel {
    pub fn new(settings: TunnelSettings) -> Self {
        Self::with_starter(settings, Box::new(Tunnel::start))
    }

    pub fn with_starter(settings: TunnelSettings, start: Starter) -> Self {
        Self { settings, start, state: Mutex::new(State::default()) }
    }

    /// Stops the tunnel and removes its interface, if it was started.
    pub fn shutdown(&self) {
        let tunnel = self.state.lock().unwrap_or_else(PoisonError::into_inner).tunnel.take();
        if let Some(tunnel) = tunnel {
            tunnel.shutdown();
        }
    }

    /// Runs `f` with the tunnel, if started.
    pub fn with_tunnel<T>(&self, f: impl FnOnce(Option<&Tunnel>) -> T) -> T {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(state.tunnel.as_ref())
    }
}

impl PeerSet for EdgeTunnel {
    fn apply(&self, plan: &EdgePlan) -> Result<(), PeerSetError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &state.tunnel {
            Some(tunnel) if !tunnel.is_running() => {
                return Err(PeerSetError(format!("the tunnel {} stopped; see the log", tunnel.interface_name())));
            }
            Some(tunnel) if tunnel.address() != plan.address => {
                // The server never re-addresses an enrolled edge; a restart would pick it up.
                return Err(PeerSetError(format!(
                    "the tunnel runs {} but the server now says {}; restart the edge",
                    tunnel.address(),
                    plan.address
                )));
            }
            Some(tunnel) => {
                tunnel.set_peers(plan.peers.clone()).map_err(|error| PeerSetError(error.to_string()))?;
            }
            None => {
                let tunnel = (self.start)(TunnelConfig {
                    interface_name: self.settings.interface_name.clone(),
                    private_key: self.settings.private_key.clone(),
                    address: plan.address,
                    listen_port: Some(self.settings.listen_port),
                    peers: plan.peers.clone(),
                })
                .map_err(|error| PeerSetError(error.to_string()))?;
                state.tunnel = Some(tunnel);
            }
        }
        state.devices = plan.peer_devices.iter().copied().collect();
        Ok(())
    }
}

impl MetricSource for EdgeTunnel {
    fn write_metrics(&self, out: &mut String) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = state.tunnel.as_ref().map(Tunnel::stats).unwrap_or_default();
        write_family(out, "edgible_edge_tunnel_up", "gauge", "1 while the WireGuard tunnel runs, else 0.");
        let up = state.tunnel.as_ref().is_some_and(Tunnel::is_running);
        let _ = writeln!(out, "edgible_edge_tunnel_up {}", u8::from(up));
        write_family(out, "edgible_edge_tunnel_peers", "gauge", "WireGuard peers (devices of the pool).");
        let _ = writeln!(out, "edgible_edge_tunnel_peers {}", stats.len());
        write_handshake_ages(out, &stats, &state.devices, SystemTime::now());
    }
}

/// Writes the per-peer handshake age family: one sample per peer that ever completed a
/// handshake, labelled by device id (peers never handshaken have no sample).
fn write_handshake_ages(
    out: &mut String,
    stats: &[edgible::tunnel::PeerStats],
    devices: &BTreeMap<PublicKey, DeviceId>,
    now: SystemTime,
) {
    write_family(
        out,
        "edgible_edge_peer_handshake_age_seconds",
        "gauge",
        "Seconds since the last completed WireGuard handshake with each device.",
    );
    for peer in stats {
        let Some(at) = peer.last_handshake else { continue };
        let age = now.duration_since(at).unwrap_or_default().as_secs_f64();
        let device = devices.get(&peer.public_key).map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let _ = writeln!(
            out,
            "edgible_edge_peer_handshake_age_seconds{{device=\"{device}\",public_key=\"{}\"}} {age:.3}",
            peer.public_key
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use edgible::tunnel::PeerStats;

    use super::*;

    fn peer(key: PublicKey, last_handshake: Option<SystemTime>) -> PeerStats {
        PeerStats { public_key: key, endpoint: None, last_handshake, rx_bytes: 0, tx_bytes: 0, spoofed_packets: 0 }
    }

    #[test]
    fn handshake_ages_are_labelled_by_device_and_only_for_handshaken_peers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let one = PrivateKey::generate().unwrap().public_key();
        let two = PrivateKey::generate().unwrap().public_key();
        let device = DeviceId::new();
        let devices = BTreeMap::from([(one, device)]);
        let stats = [peer(one, Some(now - Duration::from_millis(12_500))), peer(two, None)];
        let mut out = String::new();
        write_handshake_ages(&mut out, &stats, &devices, now);
        assert!(
            out.contains(&format!(
                "edgible_edge_peer_handshake_age_seconds{{device=\"{device}\",public_key=\"{one}\"}} 12.500\n"
            )),
            "{out}"
        );
        assert!(!out.contains(&two.to_base64()), "{out}");
    }

    #[test]
    fn a_tunnel_that_cannot_start_is_an_error_and_nothing_is_recorded() {
        let settings = TunnelSettings {
            interface_name: "edgible-edge0".into(),
            listen_port: 51820,
            private_key: PrivateKey::generate().unwrap(),
        };
        let tunnel = EdgeTunnel::with_starter(
            settings,
            Box::new(|config| Err(TunnelError::InterfaceName(config.interface_name))),
        );
        let plan = crate::hub_client::plan::plan(
            std::net::Ipv4Addr::new(100, 96, 0, 1),
            "100.96.0.0/16".parse().unwrap(),
            &[],
            &[],
        )
        .unwrap();
        let error = tunnel.apply(&plan).unwrap_err();
        assert!(error.to_string().contains("edgible-edge0"), "{error}");
        assert!(tunnel.with_tunnel(|tunnel| tunnel.is_none()));
        let mut out = String::new();
        tunnel.write_metrics(&mut out);
        assert!(out.contains("edgible_edge_tunnel_up 0\n"), "{out}");
        assert!(out.contains("edgible_edge_tunnel_peers 0\n"), "{out}");
    }
}
