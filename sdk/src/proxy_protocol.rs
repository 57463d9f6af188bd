//! The PROXY protocol, version 2: the binary header the edge writes before a client's bytes,
//! so that the device learns the real client address of a connection it receives from the
//! edge's tunnel address. Pure code, no IO, and the one codec of the workspace: [`encode`] for
//! the edge, [`decode`] (and [`header_len`], for a reader that must not read past the header)
//! for the device's proxy.
//!
//! The layout follows the specification (HAProxy, `doc/proxy-protocol.txt`, section 2.2):
//!
//! ```text
//! 12 bytes  signature  \r\n\r\n\0\r\nQUIT\n
//!  1 byte   version (high nibble, always 2) | command (low nibble: 0 LOCAL, 1 PROXY)
//!  1 byte   address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
//!           | transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
//!  2 bytes  length of what follows, big endian
//!  then     addresses: INET 4+4+2+2 bytes (source address, destination address, source
//!           port, destination port), INET6 16+16+2+2, UNIX 108+108; then TLVs
//!           (1 byte type, 2 bytes length, value) up to the announced length.
//! ```
//!
//! A `LOCAL` header (a connection the proxy made itself, such as a health check) carries no
//! meaningful address: the receiver skips whatever follows and uses the connection's own
//! addresses. Like the edge's ClientHello parser, [`decode`] is fed the whole buffer after
//! every read and answers [`ProxyV2Error::Incomplete`] until the header is complete; garbage
//! is refused at its first wrong byte.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The fixed first twelve bytes of every version 2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The length of the fixed part: signature, version and command, family and transport, length.
pub const FIXED_LEN: usize = 16;

/// The longest possible header: the fixed part and a 16-bit length.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + u16::MAX as usize;

const VERSION_2: u8 = 0x20;
const COMMAND_LOCAL: u8 = 0x0;
const COMMAND_PROXY: u8 = 0x1;
const FAMILY_UNSPEC: u8 = 0x0;
const FAMILY_INET: u8 = 0x1;
const FAMILY_INET6: u8 = 0x2;
const FAMILY_UNIX: u8 = 0x3;
const INET_ADDRESSES_LEN: usize = 12;
const INET6_ADDRESSES_LEN: usize = 36;
const UNIX_PATH_LEN: usize = 108;
const UNIX_ADDRESSES_LEN: usize = 2 * UNIX_PATH_LEN;
const TLV_HEADER_LEN: usize = 3;

/// What the sender says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The sender opened the connection on its own behalf; there is no client to report.
    Local,
    /// The sender relays a client's connection, whose addresses follow.
    Proxy,
}

/// The transport protocol of the relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unspecified,
    Stream,
    Datagram,
}

impl Transport {
    fn nibble(self) -> u8 {
        match self {
            Self::Unspecified => 0x0,
            Self::Stream => 0x1,
            Self::Datagram => 0x2,
        }
    }
}

/// The addresses of the relayed connection, as the client saw them: `source` is the client,
/// `destination` the address it connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addresses {
    /// No address (`LOCAL`, or `PROXY` over an unknown family).
    Unspecified,
    Ipv4 {
        source: SocketAddrV4,
        destination: SocketAddrV4,
    },
    Ipv6 {
        source: SocketAddrV6,
        destination: SocketAddrV6,
    },
    /// Unix socket paths, without their trailing NUL padding.
    Unix {
        source: Vec<u8>,
        destination: Vec<u8>,
    },
}

impl Addresses {
    /// The addresses of a TCP connection from `source` to `destination`. Both are put in the
    /// same family, as the header requires: an IPv4-mapped IPv6 address (a dual-stack socket
    /// accepting an IPv4 client) becomes plain IPv4 when the other side is IPv4 too, and an
    /// IPv4 address is mapped into IPv6 when the other side is IPv6.
    pub fn from_socket_addrs(source: SocketAddr, destination: SocketAddr) -> Self {
        let source = SocketAddr::new(source.ip().to_canonical(), source.port());
        let destination = SocketAddr::new(destination.ip().to_canonical(), destination.port());
        match (source, destination) {
            (SocketAddr::V4(source), SocketAddr::V4(destination)) => Self::Ipv4 { source, destination },
            (source, destination) => Self::Ipv6 { source: to_v6(source), destination: to_v6(destination) },
        }
    }

    /// The client's address, when the header carries an IP one.
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            Self::Ipv4 { source, .. } => Some(SocketAddr::V4(*source)),
            Self::Ipv6 { source, .. } => Some(SocketAddr::V6(*source)),
            Self::Unspecified | Self::Unix { .. } => None,
        }
    }

    /// The address the client connected to, when the header carries an IP one.
    pub fn destination(&self) -> Option<SocketAddr> {
        match self {
            Self::Ipv4 { destination, .. } => Some(SocketAddr::V4(*destination)),
            Self::Ipv6 { destination, .. } => Some(SocketAddr::V6(*destination)),
            Self::Unspecified | Self::Unix { .. } => None,
        }
    }

    fn family_nibble(&self) -> u8 {
        match self {
            Self::Unspecified => FAMILY_UNSPEC,
            Self::Ipv4 { .. } => FAMILY_INET,
            Self::Ipv6 { .. } => FAMILY_INET6,
            Self::Unix { .. } => FAMILY_UNIX,
        }
    }
}

fn to_v6(address: SocketAddr) -> SocketAddrV6 {
    match address {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0),
    }
}

/// A type-length-value extension of the header (section 2.2.7 of the specification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub kind: u8,
    pub value: Vec<u8>,
}

/// A PROXY protocol version 2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub command: Command,
    pub transport: Transport,
    pub addresses: Addresses,
    pub tlvs: Vec<Tlv>,
}

impl Header {
    /// The header the edge writes for a client's TCP connection.
    pub fn proxy_tcp(source: SocketAddr, destination: SocketAddr) -> Self {
        Self {
            command: Command::Proxy,
            transport: Transport::Stream,
            addresses: Addresses::from_socket_addrs(source, destination),
            tlvs: Vec::new(),
        }
    }

    /// A `LOCAL` header: a connection made by the sender itself, without addresses.
    pub fn local() -> Self {
        Self {
            command: Command::Local,
            transport: Transport::Unspecified,
            addresses: Addresses::Unspecified,
            tlvs: Vec::new(),
        }
    }
}

/// Why a header cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a Unix socket path is longer than {UNIX_PATH_LEN} bytes")]
    UnixPathTooLong,
    #[error("the header's addresses and TLVs do not fit in 65535 bytes")]
    TooLong,
}

/// Encodes a header. Only Unix paths longer than 108 bytes or TLVs beyond the 16-bit length
/// can fail; an IP header never does.
pub fn encode(header: &Header) -> Result<Vec<u8>, EncodeError> {
    let mut body = Vec::new();
    match &header.addresses {
        Addresses::Unspecified => {}
        Addresses::Ipv4 { source, destination } => {
            body.extend_from_slice(&source.ip().octets());
            body.extend_from_slice(&destination.ip().octets());
            body.extend_from_slice(&source.port().to_be_bytes());
            body.extend_from_slice(&destination.port().to_be_bytes());
        }
        Addresses::Ipv6 { source, destination } => {
            body.extend_from_slice(&source.ip().octets());
            body.extend_from_slice(&destination.ip().octets());
            body.extend_from_slice(&source.port().to_be_bytes());
            body.extend_from_slice(&destination.port().to_be_bytes());
        }
        Addresses::Unix { source, destination } => {
            for path in [source, destination] {
                if path.len() > UNIX_PATH_LEN {
                    return Err(EncodeError::UnixPathTooLong);
                }
                body.extend_from_slice(path);
                body.resize(body.len() + UNIX_PATH_LEN - path.len(), 0);
            }
        }
    }
    for tlv in &header.tlvs {
        let len = u16::try_from(tlv.value.len()).map_err(|_| EncodeError::TooLong)?;
        body.push(tlv.kind);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&tlv.value);
    }
    let body_len = u16::try_from(body.len()).map_err(|_| EncodeError::TooLong)?;
    let command = match header.command {
        Command::Local => COMMAND_LOCAL,
        Command::Proxy => COMMAND_PROXY,
    };
    let mut out = Vec::with_capacity(FIXED_LEN + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_2 | command);
    out.push(header.addresses.family_nibble() << 4 | header.transport.nibble());
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The header of a TCP connection from `source` to `destination`, encoded. Infallible: an IP
/// header without TLVs is always 28 or 52 bytes.
pub fn encode_tcp(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    // `encode` fails only on Unix paths and oversized TLVs, and this header has neither.
    #[allow(clippy::expect_used)]
    encode(&Header::proxy_tcp(source, destination)).expect("an IP header without TLVs always encodes")
}

/// Why the first bytes of a connection are not a PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyV2Error {
    /// A valid beginning: read at least `needed` more bytes, append them, decode again.
    #[error("the PROXY header is incomplete: at least {needed} more bytes are needed")]
    Incomplete { needed: usize },
    /// The bytes do not start with the version 2 signature (a direct client, or version 1's
    /// text header).
    #[error("not a PROXY protocol v2 header")]
    NotProxyV2,
    #[error("unsupported PROXY protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown PROXY protocol command {0}")]
    UnknownCommand(u8),
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    #[error("unknown transport protocol {0}")]
    UnknownTransport(u8),
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

impl ProxyV2Error {
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete { .. })
    }
}

/// A decoded header and how many bytes of the input it took; the connection's own bytes
/// start right after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub header: Header,
    pub len: usize,
}

/// Decodes the PROXY v2 header at the start of `input`.
pub fn decode(input: &[u8]) -> Result<Decoded, ProxyV2Error> {
    check_fixed_prefix(input)?;
    let Some(fixed) = input.get(..FIXED_LEN) else {
        return Err(ProxyV2Error::Incomplete { needed: FIXED_LEN - input.len() });
    };
    let body_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let len = FIXED_LEN + body_len;
    let Some(body) = input.get(FIXED_LEN..len) else {
        return Err(ProxyV2Error::Incomplete { needed: len - input.len() });
    };

    let command = if fixed[12] & 0x0f == COMMAND_PROXY { Command::Proxy } else { Command::Local };
    let transport = match fixed[13] & 0x0f {
        0x1 => Transport::Stream,
        0x2 => Transport::Datagram,
        _ => Transport::Unspecified,
    };
    if command == Command::Local {
        // The specification tells receivers of LOCAL to skip the whole block, whatever the
        // family says, and to keep the connection's own addresses.
        return Ok(Decoded {
            header: Header { command, transport, addresses: Addresses::Unspecified, tlvs: Vec::new() },
            len,
        });
    }
    let (addresses, rest) = match fixed[13] >> 4 {
        FAMILY_INET => {
            let (block, rest) = split(body, INET_ADDRESSES_LEN)?;
            let ip = |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            (
                Addresses::Ipv4 {
                    source: SocketAddrV4::new(ip(0), port(8)),
                    destination: SocketAddrV4::new(ip(4), port(10)),
                },
                rest,
            )
        }
        FAMILY_INET6 => {
            let (block, rest) = split(body, INET6_ADDRESSES_LEN)?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            (
                Addresses::Ipv6 {
                    source: SocketAddrV6::new(ip(0), port(32), 0, 0),
                    destination: SocketAddrV6::new(ip(16), port(34), 0, 0),
                },
                rest,
            )
        }
        FAMILY_UNIX => {
            let (block, rest) = split(body, UNIX_ADDRESSES_LEN)?;
            let path = |raw: &[u8]| raw.iter().position(|byte| *byte == 0).map_or(raw, |end| &raw[..end]).to_vec();
            let (source, destination) = block.split_at(UNIX_PATH_LEN);
            (Addresses::Unix { source: path(source), destination: path(destination) }, rest)
        }
        // UNSPEC with PROXY: the receiver must accept it and ignore the block.
        _ => {
            return Ok(Decoded {
                header: Header { command, transport, addresses: Addresses::Unspecified, tlvs: Vec::new() },
                len,
            });
        }
    };
    let tlvs = decode_tlvs(rest)?;
    Ok(Decoded { header: Header { command, transport, addresses, tlvs }, len })
}

/// The total length of the header whose fixed part is `fixed`, once that part is checked like
/// [`decode`] checks it. Lets a reader fetch exactly the header, and not a byte of the stream
/// behind it, before it calls [`decode`] on the whole header.
pub fn header_len(fixed: &[u8; FIXED_LEN]) -> Result<usize, ProxyV2Error> {
    check_fixed_prefix(fixed)?;
    Ok(FIXED_LEN + usize::from(u16::from_be_bytes([fixed[14], fixed[15]])))
}

/// Checks whatever part of the signature, version, command, family and transport `input`
/// holds, so that a client that is not a PROXY sender is refused at its first wrong byte.
fn check_fixed_prefix(input: &[u8]) -> Result<(), ProxyV2Error> {
    let signature_len = input.len().min(SIGNATURE.len());
    if input[..signature_len] != SIGNATURE[..signature_len] {
        return Err(ProxyV2Error::NotProxyV2);
    }
    if let Some(&version_command) = input.get(12) {
        let version = version_command >> 4;
        if version != VERSION_2 >> 4 {
            return Err(ProxyV2Error::UnsupportedVersion(version));
        }
        let command = version_command & 0x0f;
        if command != COMMAND_LOCAL && command != COMMAND_PROXY {
            return Err(ProxyV2Error::UnknownCommand(command));
        }
    }
    if let Some(&family_transport) = input.get(13) {
        let family = family_transport >> 4;
        if family > FAMILY_UNIX {
            return Err(ProxyV2Error::UnknownFamily(family));
        }
        let transport = family_transport & 0x0f;
        if transport > 0x2 {
            return Err(ProxyV2Error::UnknownTransport(transport));
        }
    }
    Ok(())
}

/// Splits the address block of `len` bytes off the body.
fn split(body: &[u8], len: usize) -> Result<(&[u8], &[u8]), ProxyV2Error> {
    if body.len() < len {
        return Err(ProxyV2Error::Malformed("the length is shorter than the address family needs"));
    }
    Ok(body.split_at(len))
}

fn decode_tlvs(mut rest: &[u8]) -> Result<Vec<Tlv>, ProxyV2Error> {
    let mut tlvs = Vec::new();
    while !rest.is_empty() {
        let Some(header) = rest.get(..TLV_HEADER_LEN) else {
            return Err(ProxyV2Error::Malformed("truncated TLV header"));
        };
        let value_len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        let Some(value) = rest.get(TLV_HEADER_LEN..TLV_HEADER_LEN + value_len) else {
            return Err(ProxyV2Error::Malformed("a TLV is longer than the header"));
        };
        tlvs.push(Tlv { kind: header[0], value: value.to_vec() });
        rest = &rest[TLV_HEADER_LEN + value_len..];
    }
    Ok(tlvs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn v4(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// A PROXY TCP/IPv4 header from 203.0.113.7:51234 to 100.64.0.2:443, built by hand (not by
    /// `encode`) and followed by the raw TLV bytes `tlvs`.
    fn ipv4_header_with_tlvs(tlvs: &[u8]) -> Vec<u8> {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11]);
        bytes.extend_from_slice(&u16::try_from(12 + tlvs.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(&[203, 0, 113, 7, 100, 64, 0, 2]);
        bytes.extend_from_slice(&51234u16.to_be_bytes());
        bytes.extend_from_slice(&443u16.to_be_bytes());
        bytes.extend_from_slice(tlvs);
        bytes
    }

    #[test]
    fn ipv4_layout_matches_the_specification() {
        let bytes = encode_tcp(v4("192.0.2.10:51000"), v4("203.0.113.5:443"));
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        expected.extend_from_slice(&[192, 0, 2, 10, 203, 0, 113, 5]);
        expected.extend_from_slice(&[0xc7, 0x38, 0x01, 0xbb]);
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), 28);

        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len, 28);
        assert_eq!(decoded.header.command, Command::Proxy);
        assert_eq!(decoded.header.transport, Transport::Stream);
        assert_eq!(decoded.header.addresses.source(), Some(v4("192.0.2.10:51000")));
        assert_eq!(decoded.header.addresses.destination(), Some(v4("203.0.113.5:443")));
    }

    #[test]
    fn ipv6_layout_matches_the_specification() {
        let source: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let destination: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let bytes = encode_tcp(source, destination);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        expected.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), 52);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.header.addresses.source(), Some(source));
        assert_eq!(decoded.header.addresses.destination(), Some(destination));
    }

    #[test]
    fn mixed_families_are_unified() {
        // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses.
        let mapped: SocketAddr = "[::ffff:192.0.2.10]:1234".parse().unwrap();
        let local: SocketAddr = "[::ffff:203.0.113.5]:443".parse().unwrap();
        let header = Header::proxy_tcp(mapped, local);
        assert_eq!(
            header.addresses,
            Addresses::Ipv4 {
                source: "192.0.2.10:1234".parse().unwrap(),
                destination: "203.0.113.5:443".parse().unwrap()
            }
        );
        let header = Header::proxy_tcp(v4("192.0.2.10:1234"), "[2001:db8::2]:443".parse().unwrap());
        assert_eq!(header.addresses.source(), Some("[::ffff:192.0.2.10]:1234".parse().unwrap()));
    }

    #[test]
    fn local_has_no_addresses_and_skips_its_block() {
        let bytes = encode(&Header::local()).unwrap();
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(bytes, expected);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded, Decoded { header: Header::local(), len: 16 });

        // A LOCAL header with an address block (some senders fill it): skipped entirely.
        let mut with_block = SIGNATURE.to_vec();
        with_block.extend_from_slice(&[0x20, 0x11, 0x00, 0x0c]);
        with_block.extend_from_slice(&[1; 12]);
        with_block.extend_from_slice(b"GET");
        let decoded = decode(&with_block).unwrap();
        assert_eq!(decoded.len, 28);
        assert_eq!(decoded.header.command, Command::Local);
        assert_eq!(decoded.header.addresses, Addresses::Unspecified);
    }

    #[test]
    fn proxy_over_unspec_is_accepted_without_addresses() {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x00, 0x00, 0x02, 9, 9]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.header.command, Command::Proxy);
        assert_eq!(decoded.header.addresses, Addresses::Unspecified);
        assert_eq!(decoded.len, 18);
    }

    #[test]
    fn tlvs_and_unix_round_trip() {
        let header = Header {
            command: Command::Proxy,
            transport: Transport::Stream,
            addresses: Addresses::Unix { source: b"/run/a.sock".to_vec(), destination: b"/run/b.sock".to_vec() },
            tlvs: vec![Tlv { kind: 0x02, value: b"app.example.test".to_vec() }, Tlv { kind: 0x04, value: vec![] }],
        };
        let bytes = encode(&header).unwrap();
        assert_eq!(bytes.len(), FIXED_LEN + 216 + 3 + 16 + 3);
        assert_eq!(bytes[13], 0x31);
        assert_eq!(decode(&bytes).unwrap(), Decoded { header, len: bytes.len() });

        let too_long =
            Header { addresses: Addresses::Unix { source: vec![b'a'; 109], destination: vec![] }, ..Header::local() };
        assert_eq!(encode(&too_long), Err(EncodeError::UnixPathTooLong));
        let huge = Header { tlvs: vec![Tlv { kind: 1, value: vec![0; 70_000] }], ..Header::local() };
        assert_eq!(encode(&huge), Err(EncodeError::TooLong));
    }

    #[test]
    fn bytes_after_the_header_are_not_consumed() {
        let mut bytes = encode_tcp(v4("192.0.2.10:1"), v4("203.0.113.5:443"));
        bytes.extend_from_slice(&[22, 3, 1, 0, 5]);
        assert_eq!(decode(&bytes).unwrap().len, 28);
    }

    #[test]
    fn every_prefix_is_incomplete_with_a_lower_bound() {
        for bytes in [
            encode_tcp(v4("192.0.2.10:1"), v4("203.0.113.5:443")),
            encode_tcp("[2001:db8::1]:2".parse().unwrap(), "[2001:db8::2]:443".parse().unwrap()),
            encode(&Header::local()).unwrap(),
            ipv4_header_with_tlvs(&[0x01, 0x00, 0x01, 0x09]),
        ] {
            for cut in 0..bytes.len() {
                match decode(&bytes[..cut]) {
                    Err(ProxyV2Error::Incomplete { needed }) => {
                        assert!(needed >= 1 && cut + needed <= bytes.len(), "cut {cut}: needed {needed}")
                    }
                    other => panic!("prefix of {cut} bytes: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn garbage_is_refused_early() {
        assert_eq!(decode(b"G"), Err(ProxyV2Error::NotProxyV2));
        assert_eq!(decode(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"), Err(ProxyV2Error::NotProxyV2));
        assert_eq!(decode(&[22, 3, 1]), Err(ProxyV2Error::NotProxyV2));
        let mut bytes = SIGNATURE.to_vec();
        bytes.push(0x11);
        assert_eq!(decode(&bytes), Err(ProxyV2Error::UnsupportedVersion(1)));
        bytes[12] = 0x22;
        assert_eq!(decode(&bytes), Err(ProxyV2Error::UnknownCommand(2)));
        bytes[12] = 0x21;
        bytes.push(0x41);
        assert_eq!(decode(&bytes), Err(ProxyV2Error::UnknownFamily(4)));
        bytes[13] = 0x13;
        assert_eq!(decode(&bytes), Err(ProxyV2Error::UnknownTransport(3)));
    }

    #[test]
    fn inconsistent_lengths_are_malformed() {
        // INET announced with fewer than 12 bytes of addresses.
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(matches!(decode(&bytes), Err(ProxyV2Error::Malformed(_))));
        // A TLV running past the announced length.
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x0f]);
        bytes.extend_from_slice(&[0; 12]);
        bytes.extend_from_slice(&[0x02, 0x00, 0x05]);
        assert!(matches!(decode(&bytes), Err(ProxyV2Error::Malformed(_))));
        // A truncated TLV header.
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x0e]);
        bytes.extend_from_slice(&[0; 14]);
        assert_eq!(decode(&bytes), Err(ProxyV2Error::Malformed("truncated TLV header")));
    }

    #[test]
    fn tlvs_after_ipv4_addresses_are_decoded() {
        // A PP2_TYPE_AUTHORITY TLV naming the host, then a PP2_TYPE_NOOP.
        let bytes = ipv4_header_with_tlvs(&[0x02, 0x00, 0x04, b'a', b'.', b't', b'e', 0x04, 0x00, 0x00]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len, bytes.len());
        assert_eq!(decoded.header.addresses.source(), Some(v4("203.0.113.7:51234")));
        assert_eq!(decoded.header.addresses.destination(), Some(v4("100.64.0.2:443")));
        assert_eq!(
            decoded.header.tlvs,
            vec![Tlv { kind: 0x02, value: b"a.te".to_vec() }, Tlv { kind: 0x04, value: vec![] }]
        );
    }

    #[test]
    fn datagram_transport_is_reported() {
        // UDP over IPv4: the addresses decode, and the transport tells a TCP receiver that they
        // are not those of a TCP client.
        let mut bytes = ipv4_header_with_tlvs(&[]);
        bytes[13] = 0x12;
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len, 28);
        assert_eq!(decoded.header.transport, Transport::Datagram);
        assert_eq!(decoded.header.addresses.source(), Some(v4("203.0.113.7:51234")));
    }

    #[test]
    fn the_largest_length_waits_for_its_bytes() {
        let mut bytes = ipv4_header_with_tlvs(&[]);
        bytes[14] = 0xff;
        bytes[15] = 0xff;
        assert_eq!(decode(&bytes), Err(ProxyV2Error::Incomplete { needed: MAX_HEADER_LEN - 28 }));
        // Zeros after the addresses are empty TLVs of type 0, three bytes each.
        bytes.resize(MAX_HEADER_LEN, 0);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len, MAX_HEADER_LEN);
        assert_eq!(decoded.header.addresses.source(), Some(v4("203.0.113.7:51234")));
        assert_eq!(header_len(&bytes[..FIXED_LEN].try_into().unwrap()), Ok(MAX_HEADER_LEN));
    }

    #[test]
    fn ipv6_announced_with_an_ipv4_block_is_malformed() {
        let mut bytes = ipv4_header_with_tlvs(&[]);
        bytes[13] = 0x21;
        assert!(matches!(decode(&bytes), Err(ProxyV2Error::Malformed(_))));
    }

    #[test]
    fn header_len_reads_the_length_of_a_checked_fixed_part() {
        for bytes in [
            encode_tcp(v4("192.0.2.10:1"), v4("203.0.113.5:443")),
            encode_tcp("[2001:db8::1]:2".parse().unwrap(), "[2001:db8::2]:443".parse().unwrap()),
            encode(&Header::local()).unwrap(),
            ipv4_header_with_tlvs(&[0x02, 0x00, 0x01, b'a']),
        ] {
            assert_eq!(header_len(&bytes[..FIXED_LEN].try_into().unwrap()), Ok(bytes.len()));
        }
        assert_eq!(header_len(b"GET / HTTP/1.1\r\n"), Err(ProxyV2Error::NotProxyV2));
        let mut fixed: [u8; FIXED_LEN] = ipv4_header_with_tlvs(&[])[..FIXED_LEN].try_into().unwrap();
        fixed[12] = 0x31;
        assert_eq!(header_len(&fixed), Err(ProxyV2Error::UnsupportedVersion(3)));
        fixed[12] = 0x21;
        fixed[13] = 0x51;
        assert_eq!(header_len(&fixed), Err(ProxyV2Error::UnknownFamily(5)));
    }
}
