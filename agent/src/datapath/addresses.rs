//! The host's own IPv4 addresses, to notice the device moving networks.
//!
//! Polled (once a second by the data path) rather than subscribed to through netlink: one
//! `getifaddrs` is cheap, works the same under every network manager, and a second is well
//! within "service back within seconds".

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// The IPv4 addresses of the host's interfaces, by interface, leaving out loopback, the
/// tunnel's own interface (its address is not the underlay and changes with the tunnel) and
/// the microVMs' tap devices (they come and go with the guests, the host stays where it is).
pub fn host_ipv4_addresses(tunnel_interface: &str) -> nix::Result<BTreeSet<(String, Ipv4Addr)>> {
    let mut addresses = BTreeSet::new();
    for interface in nix::ifaddrs::getifaddrs()? {
        if interface.interface_name == tunnel_interface || is_vm_tap(&interface.interface_name) {
            continue;
        }
        let Some(address) = interface.address.as_ref().and_then(|address| address.as_sockaddr_in()) else {
            continue;
        };
        let address = address.ip();
        if address.is_loopback() {
            continue;
        }
        addresses.insert((interface.interface_name, address));
    }
    Ok(addresses)
}

/// Whether `name` is one of the microVM driver's tap devices.
fn is_vm_tap(name: &str) -> bool {
    name.strip_prefix(crate::driver::vm::network::TAP_PREFIX)
        .is_some_and(|slot| slot.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_taps_are_not_host_addresses() {
        assert!(is_vm_tap("edgvm0"));
        assert!(is_vm_tap("edgvm12"));
        assert!(!is_vm_tap("eth0"));
        assert!(!is_vm_tap("edgvmx"));
    }

    #[test]
    fn loopback_and_the_tunnel_are_left_out() {
        let addresses = host_ipv4_addresses("edgible-none").expect("getifaddrs works");
        assert!(addresses.iter().all(|(_, address)| !address.is_loopback()));
        let Some((first, _)) = addresses.iter().next().cloned() else { return };
        let without = host_ipv4_addresses(&first).expect("getifaddrs works");
        assert!(without.iter().all(|(name, _)| *name != first));
    }
}
