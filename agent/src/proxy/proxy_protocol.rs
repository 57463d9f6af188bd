//! A pure PROXY protocol version 2 decoder: bytes in, an outcome out, no IO.
//!
//! The edge writes this header before the client's TLS bytes so that the device learns the real
//! client address. Layout (haproxy's `proxy-protocol.txt`, section 2.2): a 12-byte signature,
//! one version/command byte, one family/protocol byte, a big-endian 16-bit length of what
//! follows, then the addresses for the family and optional TLVs, which we skip.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The fixed signature every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The size of the fixed part: signature, version/command, family/protocol, length.
pub const FIXED_LEN: usize = 16;

/// The largest header possible: the fixed part plus the largest 16-bit length.
pub const MAX_LEN: usize = FIXED_LEN + u16::MAX as usize;

/// What a PROXY v2 header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// `PROXY` with TCP over IPv4 or IPv6: the original client and destination addresses.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// `LOCAL` (a health check of the sender itself) or an address family we do not carry
    /// (`UNSPEC`, UNIX sockets, UDP): the receiver uses the connection's own addresses.
    Local,
}

/// Why bytes are not a valid PROXY v2 header. The connection must be closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyProtocolError {
    #[error("the connection did not start with a PROXY protocol v2 signature")]
    BadSignature,
    #[error("unsupported PROXY protocol version/command byte {0:#04x}")]
    BadVersionCommand(u8),
    #[error("PROXY protocol address block of {length} bytes is too short for family {family:#04x}")]
    AddressesTooShort { family: u8, length: usize },
}

/// Decodes a header at the start of `bytes`.
///
/// Returns `Ok(None)` when `bytes` is a valid but incomplete prefix, and
/// `Ok(Some((header, consumed)))` once the whole header is present; the bytes after `consumed`
/// belong to the proxied stream.
pub fn decode(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyProtocolError> {
    // Check the signature as far as it goes so that garbage is refused on its first bytes
    // instead of after waiting for a full header that never comes.
    let signature_seen = bytes.len().min(SIGNATURE.len());
    if bytes[..signature_seen] != SIGNATURE[..signature_seen] {
        return Err(ProxyProtocolError::BadSignature);
    }
    let Some(&version_command) = bytes.get(12) else { return Ok(None) };
    let local = match version_command {
        0x20 => true,
        0x21 => false,
        other => return Err(ProxyProtocolError::BadVersionCommand(other)),
    };
    let (Some(&family_protocol), Some(&length_high), Some(&length_low)) = (bytes.get(13), bytes.get(14), bytes.get(15))
    else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([length_high, length_low]));
    let total = FIXED_LEN + length;
    let Some(body) = bytes.get(FIXED_LEN..total) else { return Ok(None) };
    if local {
        return Ok(Some((ProxyHeader::Local, total)));
    }
    let header = match family_protocol {
        // TCP over IPv4: source address, destination address, source port, destination port.
        0x11 => {
            let addresses =
                body.get(..12).ok_or(ProxyProtocolError::AddressesTooShort { family: family_protocol, length })?;
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(addresses[at], addresses[at + 1], addresses[at + 2], addresses[at + 3]))
            };
            let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP over IPv6: the same with 16-byte addresses.
        0x21 => {
            let addresses =
                body.get(..36).ok_or(ProxyProtocolError::AddressesTooShort { family: family_protocol, length })?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&addresses[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // The specification says a receiver must accept families it does not understand and
        // fall back to the connection's addresses; TLVs after the addresses are skipped alike.
        _ => ProxyHeader::Local,
    };
    Ok(Some((header, total)))
}

/// The total length of the header whose fixed part is `fixed`, once the signature is checked;
/// lets a reader fetch exactly the header and not a byte of the stream behind it.
pub fn header_len(fixed: &[u8; FIXED_LEN]) -> Result<usize, ProxyProtocolError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyProtocolError::BadSignature);
    }
    Ok(FIXED_LEN + usize::from(u16::from_be_bytes([fixed[14], fixed[15]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_header(tlvs: &[u8]) -> Vec<u8> {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11]);
        bytes.extend_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&[203, 0, 113, 7, 100, 64, 0, 2]);
        bytes.extend_from_slice(&51234u16.to_be_bytes());
        bytes.extend_from_slice(&443u16.to_be_bytes());
        bytes.extend_from_slice(tlvs);
        bytes
    }

    fn v6_header() -> Vec<u8> {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x21, 0, 36]);
        bytes.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        bytes.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        bytes.extend_from_slice(&[0x01, 0xbb, 0x00, 0x50]);
        bytes
    }

    #[test]
    fn decodes_ipv4_and_leaves_the_stream_behind_it() {
        let mut bytes = v4_header(&[]);
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (header, consumed) = decode(&bytes).unwrap().unwrap();
        assert_eq!(consumed, 28);
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: "203.0.113.7:51234".parse().unwrap(),
                destination: "100.64.0.2:443".parse().unwrap()
            }
        );
    }

    #[test]
    fn decodes_ipv6() {
        let bytes = v6_header();
        let (header, consumed) = decode(&bytes).unwrap().unwrap();
        assert_eq!(consumed, bytes.len());
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: "[2001:db8::1]:443".parse().unwrap(),
                destination: "[2001:db8::2]:80".parse().unwrap()
            }
        );
    }

    #[test]
    fn skips_tlvs() {
        // A PP2_TYPE_AUTHORITY TLV naming the host, then a NOOP.
        let tlvs = [0x02, 0x00, 0x04, b'a', b'.', b't', b'e', 0x04, 0x00, 0x00];
        let bytes = v4_header(&tlvs);
        let (header, consumed) = decode(&bytes).unwrap().unwrap();
        assert_eq!(consumed, bytes.len());
        assert!(matches!(header, ProxyHeader::Proxied { .. }));
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        for bytes in [v4_header(&[1, 0, 1, 9]), v6_header()] {
            for end in 0..bytes.len() {
                assert_eq!(decode(&bytes[..end]), Ok(None), "prefix of {end} bytes");
            }
            assert!(decode(&bytes).unwrap().is_some());
        }
    }

    #[test]
    fn local_and_unknown_families_fall_back_to_the_connection() {
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(decode(&local), Ok(Some((ProxyHeader::Local, 16))));
        // A LOCAL header may still carry addresses; they are ignored.
        let mut local = v4_header(&[]);
        local[12] = 0x20;
        assert_eq!(decode(&local), Ok(Some((ProxyHeader::Local, 28))));
        // UDP over IPv4 and AF_UNIX are not TCP peers we could report.
        let mut udp = v4_header(&[]);
        udp[13] = 0x12;
        assert_eq!(decode(&udp), Ok(Some((ProxyHeader::Local, 28))));
    }

    #[test]
    fn refuses_garbage_early() {
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(ProxyProtocolError::BadSignature));
        assert_eq!(decode(b"\x16"), Err(ProxyProtocolError::BadSignature));
        // Version 1 (the text form) is not accepted.
        assert_eq!(decode(b"PROXY TCP4 "), Err(ProxyProtocolError::BadSignature));
        let mut bytes = v4_header(&[]);
        bytes[12] = 0x11;
        assert_eq!(decode(&bytes), Err(ProxyProtocolError::BadVersionCommand(0x11)));
        bytes[12] = 0x22;
        assert_eq!(decode(&bytes[..13]), Err(ProxyProtocolError::BadVersionCommand(0x22)));
    }

    #[test]
    fn hostile_lengths() {
        // A length shorter than the family's addresses.
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(decode(&short), Err(ProxyProtocolError::AddressesTooShort { family: 0x11, length: 4 }));
        let mut short6 = v4_header(&[]);
        short6[13] = 0x21;
        assert_eq!(decode(&short6), Err(ProxyProtocolError::AddressesTooShort { family: 0x21, length: 12 }));
        // The largest length waits for its bytes instead of reading past the buffer, and is
        // accepted once they all arrived.
        let mut huge = v4_header(&[]);
        huge[14] = 0xff;
        huge[15] = 0xff;
        assert_eq!(decode(&huge), Ok(None));
        huge.resize(MAX_LEN, 0);
        assert!(matches!(decode(&huge), Ok(Some((ProxyHeader::Proxied { .. }, MAX_LEN)))));
        let fixed: [u8; FIXED_LEN] = huge[..FIXED_LEN].try_into().unwrap();
        assert_eq!(header_len(&fixed), Ok(MAX_LEN));
    }

    #[test]
    fn header_len_checks_the_signature() {
        let fixed: [u8; FIXED_LEN] = *b"GET / HTTP/1.1\r\n";
        assert_eq!(header_len(&fixed), Err(ProxyProtocolError::BadSignature));
        let bytes = v6_header();
        assert_eq!(header_len(&bytes[..FIXED_LEN].try_into().unwrap()), Ok(bytes.len()));
    }
}
