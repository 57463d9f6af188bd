//! The one fact the tunnel reads from an outgoing IP packet: its IPv4 destination. A pure
//! function over untrusted bytes: anything too short or not IPv4 is `None`. (The source of an
//! incoming packet comes from boringtun, which checks the packet's length first.)

use std::net::Ipv4Addr;

/// The smallest IPv4 header.
const IPV4_HEADER_LEN: usize = 20;
const IPV4_DESTINATION: usize = 16;

/// The destination of an IPv4 packet.
pub(crate) fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < IPV4_HEADER_LEN || packet[0] >> 4 != 4 {
        return None;
    }
    let octets: [u8; 4] = packet.get(IPV4_DESTINATION..IPV4_DESTINATION + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_destination_of_an_ipv4_header() {
        let mut packet = [0u8; 28];
        packet[0] = 0x45;
        packet[12..16].copy_from_slice(&[100, 64, 0, 1]);
        packet[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(ipv4_destination(&packet), Some(Ipv4Addr::new(100, 64, 0, 2)));
    }

    #[test]
    fn short_or_non_ipv4_packets_have_no_destination() {
        assert_eq!(ipv4_destination(&[]), None);
        assert_eq!(ipv4_destination(&[0x45; 19]), None);
        let mut ipv6 = [0u8; 40];
        ipv6[0] = 0x60;
        assert_eq!(ipv4_destination(&ipv6), None);
    }
}
