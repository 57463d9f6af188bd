//! TUN offloads as pure functions over bytes: the kernel and the tunnel exchange TCP
//! super-packets of up to 64 KiB instead of MTU-size packets, so that a bulk transfer costs one
//! TUN system call and one walk of the kernel's stack per 64 KiB rather than per 1.4 KiB.
//!
//! With `IFF_VNET_HDR` every frame read from or written to the TUN starts with a
//! [`VirtioNetHdr`] that says how the packet behind it is to be segmented (GSO) and which checksum
//! is left to complete (`NEEDS_CSUM`, the kernel's `CHECKSUM_PARTIAL`):
//!
//! - [`split`] (egress): a frame read from the TUN becomes MTU-size IPv4 packets with complete
//!   checksums, ready to encrypt. A TCP super-packet (TSO) is cut at `gso_size` bytes of payload,
//!   each segment with its own sequence number, IP length, ID and checksums, FIN and PSH only on
//!   the last segment and CWR only on the first (as the kernel's own `tcp_gso_segment` does); a
//!   UDP super-packet (USO) likewise. A single packet only gets its checksum completed.
//! - [`Coalescer`] (ingress): the decrypted packets of one batch become the frames to write.
//!   Consecutive in-sequence TCP segments of one flow (same addresses, ports, ACK, window,
//!   options; ACK with at most PSH on the last; valid checksums) become one super-packet whose
//!   TCP checksum the kernel completes; every other packet is written alone and untouched. The
//!   packets of one flow keep their order; only different flows may pass each other.
//!
//! Only IPv4 is carried (see [`crate::tunnel`]): an IPv6 super-packet is refused, and IPv6
//! packets are never coalesced. Everything here works on untrusted bytes: a malformed frame is an
//! [`OffloadError`] naming what is wrong, never a panic.

use std::ops::Range;

use super::batch::{MAX_PACKET_LEN, PacketBatch};

/// The size of the virtio-net header in front of every TUN frame (without the
/// `VIRTIO_NET_F_MRG_RXBUF` field, which a TUN does not use).
pub(crate) const VIRTIO_NET_HDR_LEN: usize = 10;

/// The largest frame read from the TUN: the header and a 64 KiB IP packet.
pub(crate) const MAX_FRAME_LEN: usize = VIRTIO_NET_HDR_LEN + 65_535;

/// `flags`: the checksum at `csum_start + csum_offset` still has to be completed.
const NEEDS_CSUM: u8 = 1;

/// `gso_type` values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP_L4: u8 = 5;
/// Or-ed into `gso_type` when the sender negotiated ECN.
const GSO_ECN: u8 = 0x80;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

const IPV4_HEADER_LEN: usize = 20;
const TCP_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
/// Where the checksum sits in a TCP and a UDP header.
const TCP_CHECKSUM: usize = 16;
const UDP_CHECKSUM: usize = 6;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// The most packets merged into one super-packet (wireguard-go's and the kernel's GRO limit of
/// 64 KiB is usually reached first).
pub(crate) const MAX_COALESCED: usize = 64;

/// Why a frame cannot be split or a header decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OffloadError {
    #[error("the frame is shorter than the virtio-net header")]
    ShortFrame,
    #[error("the frame has no IPv4 packet behind its virtio-net header")]
    NotIpv4,
    #[error("unsupported gso_type {0}")]
    GsoType(u8),
    #[error("the IPv4 header is malformed ({0})")]
    Ipv4Header(&'static str),
    #[error("the transport header is malformed ({0})")]
    TransportHeader(&'static str),
    #[error("csum_start and csum_offset point outside the packet")]
    ChecksumPosition,
    #[error("gso_size {0} is zero or makes segments larger than a slot")]
    GsoSize(u16),
    #[error("the batch has no room for the segments")]
    BatchFull,
}

/// The virtio-net header (`struct virtio_net_hdr`), in the host's byte order as a legacy TUN
/// uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct VirtioNetHdr {
    pub(crate) flags: u8,
    pub(crate) gso_type: u8,
    pub(crate) hdr_len: u16,
    pub(crate) gso_size: u16,
    pub(crate) csum_start: u16,
    pub(crate) csum_offset: u16,
}

impl VirtioNetHdr {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, OffloadError> {
        let bytes: &[u8; VIRTIO_NET_HDR_LEN] =
            bytes.get(..VIRTIO_NET_HDR_LEN).and_then(|bytes| bytes.try_into().ok()).ok_or(OffloadError::ShortFrame)?;
        let field = |at: usize| u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        Ok(Self {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: field(2),
            gso_size: field(4),
            csum_start: field(6),
            csum_offset: field(8),
        })
    }

    pub(crate) fn encode(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut bytes = [0; VIRTIO_NET_HDR_LEN];
        bytes[0] = self.flags;
        bytes[1] = self.gso_type;
        bytes[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        bytes[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        bytes[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        bytes[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        bytes
    }
}

/// Splits one frame read from the TUN (virtio-net header, then an IP packet) into IP packets with
/// complete checksums, appended to `out` in order. Returns how many were appended; on error none
/// are. A packet without GSO is passed as it is (IPv6 included, for the routing stage to drop);
/// only its checksum is completed when the header asks for it.
pub(crate) fn split(frame: &mut [u8], out: &mut PacketBatch) -> Result<usize, OffloadError> {
    let header = VirtioNetHdr::decode(frame)?;
    let packet = &mut frame[VIRTIO_NET_HDR_LEN..];
    match header.gso_type & !GSO_ECN {
        GSO_NONE => {
            if header.flags & NEEDS_CSUM != 0 {
                complete_checksum(packet, header.csum_start.into(), header.csum_offset.into())?;
            }
            Ok(usize::from(out.push(packet, None)))
        }
        GSO_TCPV4 => split_segments(packet, header.gso_size, IPPROTO_TCP, out),
        GSO_UDP_L4 => split_segments(packet, header.gso_size, IPPROTO_UDP, out),
        // GSO_TCPV6 included: no IPv6 is carried.
        other => Err(OffloadError::GsoType(other)),
    }
}

/// Completes a partial checksum: the field holds the pseudo-header's sum, and the checksum covers
/// everything from `start` to the end of the packet.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let field = start.checked_add(offset).ok_or(OffloadError::ChecksumPosition)?;
    if field + 2 > packet.len() {
        return Err(OffloadError::ChecksumPosition);
    }
    let checksum = !fold(sum(&packet[start..], 0));
    packet[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// The headers of an IPv4 packet carrying `protocol`: the IP header's length and the IP and
/// transport headers' length together.
fn ipv4_transport_headers(packet: &[u8], protocol: u8) -> Result<(usize, usize), OffloadError> {
    if packet.first().map(|byte| byte >> 4) != Some(4) {
        return Err(OffloadError::NotIpv4);
    }
    let ip_len = usize::from(packet[0] & 0x0f) * 4;
    if ip_len < IPV4_HEADER_LEN || packet.len() < ip_len {
        return Err(OffloadError::Ipv4Header("header length"));
    }
    if packet[9] != protocol {
        return Err(OffloadError::Ipv4Header("protocol does not match gso_type"));
    }
    let transport_len = if protocol == IPPROTO_TCP {
        let data_offset = packet.get(ip_len + 12).ok_or(OffloadError::TransportHeader("truncated"))?;
        usize::from(data_offset >> 4) * 4
    } else {
        UDP_HEADER_LEN
    };
    let minimum = if protocol == IPPROTO_TCP { TCP_HEADER_LEN } else { UDP_HEADER_LEN };
    if transport_len < minimum || packet.len() < ip_len + transport_len {
        return Err(OffloadError::TransportHeader("header length"));
    }
    Ok((ip_len, ip_len + transport_len))
}

/// Cuts a TCP or UDP super-packet into segments of `gso_size` bytes of payload (the last may be
/// shorter), each with its own headers and complete checksums.
fn split_segments(packet: &[u8], gso_size: u16, protocol: u8, out: &mut PacketBatch) -> Result<usize, OffloadError> {
    let (ip_len, headers_len) = ipv4_transport_headers(packet, protocol)?;
    let segment = usize::from(gso_size);
    if segment == 0 || headers_len + segment > MAX_PACKET_LEN {
        return Err(OffloadError::GsoSize(gso_size));
    }
    let headers = &packet[..headers_len];
    let payload = &packet[headers_len..];
    let first_id = u16::from_be_bytes([headers[4], headers[5]]);
    // UDP has no sequence number; these bytes are its length and checksum, unused.
    let first_sequence =
        u32::from_be_bytes([headers[ip_len + 4], headers[ip_len + 5], headers[ip_len + 6], headers[ip_len + 7]]);
    if payload.is_empty() {
        return Err(OffloadError::TransportHeader("a GSO packet without payload"));
    }
    let count = payload.len().div_ceil(segment);
    let start = out.len();
    for (index, chunk) in payload.chunks(segment).enumerate() {
        let len = headers_len + chunk.len();
        let Some(slot) = out.free_slot() else {
            out.truncate(start);
            return Err(OffloadError::BatchFull);
        };
        let segment_packet = &mut slot[..len];
        segment_packet[..headers_len].copy_from_slice(headers);
        segment_packet[headers_len..].copy_from_slice(chunk);
        // IPv4: this segment's length and ID (consecutive, as the kernel's GSO makes them), and
        // the header checksum over both.
        // `len` fits 16 bits: it is at most a slot.
        segment_packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        segment_packet[4..6].copy_from_slice(&first_id.wrapping_add(index as u16).to_be_bytes());
        set_ipv4_checksum(&mut segment_packet[..ip_len]);
        let transport = &mut segment_packet[ip_len..];
        if protocol == IPPROTO_TCP {
            let offset = (index * segment) as u32;
            transport[4..8].copy_from_slice(&first_sequence.wrapping_add(offset).to_be_bytes());
            if index + 1 < count {
                transport[13] &= !(TCP_FIN | TCP_PSH);
            }
            if index > 0 {
                transport[13] &= !TCP_CWR;
            }
        } else {
            transport[4..6].copy_from_slice(&((len - ip_len) as u16).to_be_bytes());
        }
        let checksum_at = if protocol == IPPROTO_TCP { TCP_CHECKSUM } else { UDP_CHECKSUM };
        transport[checksum_at..checksum_at + 2].fill(0);
        let pseudo = pseudo_header_sum(&segment_packet[12..20], protocol, len - ip_len);
        let mut checksum = !fold(sum(&segment_packet[ip_len..], pseudo));
        if protocol == IPPROTO_UDP && checksum == 0 {
            // Zero means "no checksum" in UDP; the same value is sent as all ones.
            checksum = 0xffff;
        }
        segment_packet[ip_len + checksum_at..ip_len + checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
        out.commit(len, None);
    }
    Ok(out.len() - start)
}

/// Sets the checksum of an IPv4 header.
fn set_ipv4_checksum(header: &mut [u8]) {
    header[10..12].fill(0);
    let checksum = !fold(sum(header, 0));
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// The one's complement sum of the TCP/UDP pseudo-header: addresses (8 bytes, source then
/// destination), protocol and transport length.
fn pseudo_header_sum(addresses: &[u8], protocol: u8, transport_len: usize) -> u64 {
    sum(addresses, u64::from(protocol) + transport_len as u64)
}

/// Adds `data` to a one's complement sum as big-endian 16-bit words (an odd last byte padded
/// with zero). Summing 32-bit words into 64 bits and folding later gives the same result, as
/// 2^16 ≡ 1 modulo 2^16 − 1.
fn sum(data: &[u8], initial: u64) -> u64 {
    let mut total = initial;
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        total += u64::from(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for pair in &mut pairs {
        total += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        total += u64::from(*last) << 8;
    }
    total
}

/// Folds a one's complement sum to 16 bits.
fn fold(mut total: u64) -> u16 {
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

/// What the coalescer reads from a TCP/IPv4 packet.
struct TcpSegment {
    /// Source and destination address and port: the flow.
    flow: [u8; 12],
    headers_len: usize,
    sequence: u32,
    payload_len: usize,
    flags: u8,
}

impl TcpSegment {
    /// The segment in `packet` if it is TCP over IPv4 without IP options or fragmentation and
    /// with a consistent length; `None` for anything else, which is then written untouched.
    fn parse(packet: &[u8]) -> Option<Self> {
        if packet.len() < IPV4_HEADER_LEN + TCP_HEADER_LEN
            || packet[0] != 0x45
            || packet[9] != IPPROTO_TCP
            || usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len()
            || u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0
        {
            return None;
        }
        let tcp = &packet[IPV4_HEADER_LEN..];
        let tcp_len = usize::from(tcp[12] >> 4) * 4;
        if tcp_len < TCP_HEADER_LEN || tcp.len() < tcp_len {
            return None;
        }
        let mut flow = [0; 12];
        flow[..8].copy_from_slice(&packet[12..20]);
        flow[8..].copy_from_slice(&tcp[..4]);
        Some(Self {
            flow,
            headers_len: IPV4_HEADER_LEN + tcp_len,
            sequence: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            payload_len: tcp.len() - tcp_len,
            flags: tcp[13],
        })
    }

    /// Whether the segment may be part of a super-packet: data with ACK and nothing but PSH
    /// besides (SYN, FIN, RST, URG, ECE and CWR segments pass alone), and a valid checksum, which
    /// the kernel will not check again once the packet is merged.
    fn can_coalesce(&self, packet: &[u8]) -> bool {
        self.payload_len > 0
            && self.flags & TCP_ACK != 0
            && self.flags & !(TCP_ACK | TCP_PSH) == 0
            && fold(sum(
                &packet[IPV4_HEADER_LEN..],
                pseudo_header_sum(&packet[12..20], IPPROTO_TCP, packet.len() - IPV4_HEADER_LEN),
            )) == 0xffff
    }
}

/// One frame to write: a packet of the batch, alone or followed by the payloads of the packets
/// merged into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The virtio-net header to write in front.
    pub(crate) header: [u8; VIRTIO_NET_HDR_LEN],
    /// The first packet (headers and payload), by index in the batch.
    pub(crate) head: usize,
    /// The length of the IP and TCP headers of the merged packets, which are left out of them.
    pub(crate) headers_len: usize,
    /// The merged packets after the head, as a range of [`Coalescer::merged`].
    merged: Range<usize>,
}

/// A run of segments of one flow still open to more.
struct OpenRun {
    flow: [u8; 12],
    /// The frame holding the run.
    frame: usize,
    /// The sequence number the next segment must have.
    next_sequence: u32,
    /// The payload length of every segment but the last (the GSO size).
    segment_len: usize,
    headers_len: usize,
    /// The IP length of the run so far.
    total_len: usize,
    /// The run takes no more: its last segment was short or had PSH.
    closed: bool,
}

/// Coalesces the packets of an ingress batch into the frames written to the TUN. Reused from
/// batch to batch, so that it allocates only while it grows.
#[derive(Default)]
pub(crate) struct Coalescer {
    frames: Vec<Frame>,
    /// Indexes of merged packets, in frame order; a frame's range is contiguous because frames
    /// are finished (and their merged packets moved here) one at a time at the end.
    merged: Vec<usize>,
    /// The packets merged into each frame while the batch is scanned, before they move to
    /// `merged`.
    pending: Vec<Vec<usize>>,
    open: Vec<OpenRun>,
}

impl Coalescer {
    /// Plans the frames for `batch`, rewriting the IP and TCP headers of packets that head a
    /// super-packet. Packets that are not TCP/IPv4 each get a frame of their own, unchanged.
    pub(crate) fn coalesce(&mut self, batch: &mut PacketBatch) {
        self.frames.clear();
        self.merged.clear();
        self.open.clear();
        for pending in &mut self.pending {
            pending.clear();
        }
        for index in 0..batch.len() {
            let packet = batch.get(index).0;
            let Some(segment) = TcpSegment::parse(packet) else {
                // TCP that cannot be parsed (IP options, a fragment) belongs to an unknown flow:
                // ending every run keeps whichever flow it is in order.
                if packet.get(9) == Some(&IPPROTO_TCP) {
                    self.open.clear();
                }
                self.push_alone(index);
                continue;
            };
            let open = self.open.iter().position(|run| run.flow == segment.flow);
            if !segment.can_coalesce(packet) {
                // Any other segment of the flow (a FIN, a pure ACK) ends its run, so that a
                // later segment is never merged into a frame written before this one.
                if let Some(open) = open {
                    self.open.swap_remove(open);
                }
                self.push_alone(index);
                continue;
            }
            if let Some(position) = open {
                let run = &self.open[position];
                let head = batch.get(self.frames[run.frame].head).0;
                if !run.closed && fits(run, head, &segment, packet, self.pending[run.frame].len()) {
                    let run = &mut self.open[position];
                    run.next_sequence = run.next_sequence.wrapping_add(segment.payload_len as u32);
                    run.total_len += segment.payload_len;
                    run.closed = segment.payload_len < run.segment_len || segment.flags & TCP_PSH != 0;
                    self.pending[run.frame].push(index);
                    continue;
                }
                self.open.swap_remove(position);
            }
            let frame = self.push_alone(index);
            self.open.push(OpenRun {
                flow: segment.flow,
                frame,
                next_sequence: segment.sequence.wrapping_add(segment.payload_len as u32),
                segment_len: segment.payload_len,
                headers_len: segment.headers_len,
                total_len: packet.len(),
                closed: segment.flags & TCP_PSH != 0,
            });
        }
        self.finish(batch);
    }

    /// The planned frames, in the order to write them.
    pub(crate) fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The indexes of the packets whose payloads follow the head of `frame`.
    pub(crate) fn merged(&self, frame: &Frame) -> &[usize] {
        &self.merged[frame.merged.clone()]
    }

    fn push_alone(&mut self, index: usize) -> usize {
        let frame = self.frames.len();
        self.frames.push(Frame { header: VirtioNetHdr::default().encode(), head: index, headers_len: 0, merged: 0..0 });
        if self.pending.len() <= frame {
            self.pending.push(Vec::new());
        }
        frame
    }

    /// Moves the merged packets in place and rewrites the head of every super-packet: IP length
    /// and checksum, PSH if its last segment had it, and the TCP checksum field set to the
    /// pseudo-header's sum for the kernel to complete.
    fn finish(&mut self, batch: &mut PacketBatch) {
        for (frame_index, frame) in self.frames.iter_mut().enumerate() {
            let pending = &self.pending[frame_index];
            let start = self.merged.len();
            self.merged.extend_from_slice(pending);
            frame.merged = start..self.merged.len();
            let Some(&last) = pending.last() else { continue };
            let last_flags = batch.get(last).0[IPV4_HEADER_LEN + 13];
            let payloads: usize = pending.iter().map(|&index| segment_payload_len(batch.get(index).0)).sum();
            let head = batch.get_mut(frame.head);
            let headers_len = IPV4_HEADER_LEN + usize::from(head[IPV4_HEADER_LEN + 12] >> 4) * 4;
            let segment_len = head.len() - headers_len;
            frame.headers_len = headers_len;
            let total_len = head.len() + payloads;
            // `total_len` fits 16 bits: `fits` keeps every run within 65,535 bytes.
            head[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
            set_ipv4_checksum(&mut head[..IPV4_HEADER_LEN]);
            head[IPV4_HEADER_LEN + 13] |= last_flags & TCP_PSH;
            let pseudo = fold(pseudo_header_sum(&head[12..20], IPPROTO_TCP, total_len - IPV4_HEADER_LEN));
            head[IPV4_HEADER_LEN + TCP_CHECKSUM..IPV4_HEADER_LEN + TCP_CHECKSUM + 2]
                .copy_from_slice(&pseudo.to_be_bytes());
            frame.header = VirtioNetHdr {
                flags: NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: headers_len as u16,
                gso_size: segment_len as u16,
                csum_start: IPV4_HEADER_LEN as u16,
                csum_offset: TCP_CHECKSUM as u16,
            }
            .encode();
        }
    }
}

/// The payload length of a packet that [`TcpSegment::parse`] accepted.
fn segment_payload_len(packet: &[u8]) -> usize {
    packet.len() - IPV4_HEADER_LEN - usize::from(packet[IPV4_HEADER_LEN + 12] >> 4) * 4
}

/// Whether `segment` continues `run` (headed by `head`, with `merged` packets after it): next in
/// sequence, no longer than the run's segments, the same IP and TCP headers but for length, ID,
/// checksums, sequence number and PSH, and within 64 KiB.
fn fits(run: &OpenRun, head: &[u8], segment: &TcpSegment, packet: &[u8], merged: usize) -> bool {
    let same = |range: Range<usize>| head.get(range.clone()) == packet.get(range);
    segment.sequence == run.next_sequence
        && segment.payload_len <= run.segment_len
        && segment.headers_len == run.headers_len
        && run.total_len + segment.payload_len <= usize::from(u16::MAX)
        && merged + 1 < MAX_COALESCED
        // IPv4: TOS, flags (DF), TTL.
        && same(1..2)
        && same(6..7)
        && same(8..9)
        // TCP: acknowledgment number, window, options.
        && same(IPV4_HEADER_LEN + 8..IPV4_HEADER_LEN + 12)
        && same(IPV4_HEADER_LEN + 14..IPV4_HEADER_LEN + 16)
        && same(IPV4_HEADER_LEN + TCP_HEADER_LEN..run.headers_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: [u8; 4] = [100, 64, 0, 2];
    const DESTINATION: [u8; 4] = [100, 64, 0, 1];

    /// A TCP segment as a peer sends it: IPv4 without options (DF, TTL 64), complete checksums.
    struct Tcp<'a> {
        ports: (u16, u16),
        sequence: u32,
        ack: u32,
        flags: u8,
        window: u16,
        options: &'a [u8],
        id: u16,
        payload: &'a [u8],
    }

    impl Default for Tcp<'_> {
        fn default() -> Self {
            Self {
                ports: (40000, 5201),
                sequence: 1000,
                ack: 77,
                flags: TCP_ACK,
                window: 500,
                options: &[],
                id: 9,
                payload: b"",
            }
        }
    }

    impl Tcp<'_> {
        fn packet(&self) -> Vec<u8> {
            let tcp_len = TCP_HEADER_LEN + self.options.len();
            let total = IPV4_HEADER_LEN + tcp_len + self.payload.len();
            let mut packet = vec![0u8; IPV4_HEADER_LEN];
            packet[0] = 0x45;
            packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            packet[4..6].copy_from_slice(&self.id.to_be_bytes());
            packet[6] = 0x40;
            packet[8] = 64;
            packet[9] = IPPROTO_TCP;
            packet[12..16].copy_from_slice(&SOURCE);
            packet[16..20].copy_from_slice(&DESTINATION);
            set_ipv4_checksum(&mut packet);
            packet.extend_from_slice(&self.ports.0.to_be_bytes());
            packet.extend_from_slice(&self.ports.1.to_be_bytes());
            packet.extend_from_slice(&self.sequence.to_be_bytes());
            packet.extend_from_slice(&self.ack.to_be_bytes());
            packet.push(((tcp_len / 4) as u8) << 4);
            packet.push(self.flags);
            packet.extend_from_slice(&self.window.to_be_bytes());
            packet.extend_from_slice(&[0, 0, 0, 0]);
            packet.extend_from_slice(self.options);
            packet.extend_from_slice(self.payload);
            set_transport_checksum(&mut packet, IPPROTO_TCP);
            packet
        }
    }

    fn set_transport_checksum(packet: &mut [u8], protocol: u8) {
        let at = IPV4_HEADER_LEN + if protocol == IPPROTO_TCP { TCP_CHECKSUM } else { UDP_CHECKSUM };
        packet[at..at + 2].fill(0);
        let pseudo = pseudo_header_sum(&packet[12..20], protocol, packet.len() - IPV4_HEADER_LEN);
        let checksum = !fold(sum(&packet[IPV4_HEADER_LEN..], pseudo));
        packet[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    }

    fn udp(payload: &[u8]) -> Vec<u8> {
        let total = IPV4_HEADER_LEN + UDP_HEADER_LEN + payload.len();
        let mut packet = vec![0u8; IPV4_HEADER_LEN];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        packet[8] = 64;
        packet[9] = IPPROTO_UDP;
        packet[12..16].copy_from_slice(&SOURCE);
        packet[16..20].copy_from_slice(&DESTINATION);
        set_ipv4_checksum(&mut packet);
        packet.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        packet.extend_from_slice(&((UDP_HEADER_LEN + payload.len()) as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
        packet.extend_from_slice(payload);
        set_transport_checksum(&mut packet, IPPROTO_UDP);
        packet
    }

    /// Whether the IPv4 header and TCP or UDP checksums of `packet` verify.
    fn checksums_valid(packet: &[u8]) -> bool {
        let ip_len = usize::from(packet[0] & 0x0f) * 4;
        let pseudo = pseudo_header_sum(&packet[12..20], packet[9], packet.len() - ip_len);
        fold(sum(&packet[..ip_len], 0)) == 0xffff && fold(sum(&packet[ip_len..], pseudo)) == 0xffff
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|index| (index * 7 % 251) as u8).collect()
    }

    /// A frame as the kernel hands it over with TSO or USO: the IP length of the whole
    /// super-packet and the transport checksum left partial (the pseudo-header's sum).
    fn gso_frame(packet: &[u8], gso_type: u8, gso_size: u16) -> Vec<u8> {
        let mut packet = packet.to_vec();
        let protocol = packet[9];
        let at = IPV4_HEADER_LEN + if protocol == IPPROTO_TCP { TCP_CHECKSUM } else { UDP_CHECKSUM };
        let pseudo = fold(pseudo_header_sum(&packet[12..20], protocol, packet.len() - IPV4_HEADER_LEN));
        packet[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        let headers_len = ipv4_transport_headers(&packet, protocol).unwrap().1;
        let header = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type,
            hdr_len: headers_len as u16,
            gso_size,
            csum_start: IPV4_HEADER_LEN as u16,
            csum_offset: (at - IPV4_HEADER_LEN) as u16,
        };
        let mut frame = header.encode().to_vec();
        frame.extend_from_slice(&packet);
        frame
    }

    fn packets(batch: &PacketBatch) -> Vec<Vec<u8>> {
        batch.iter().map(|(packet, _)| packet.to_vec()).collect()
    }

    /// The bytes of every planned frame, as `write_tun` gathers them.
    fn frames(coalescer: &Coalescer, batch: &PacketBatch) -> Vec<Vec<u8>> {
        coalescer
            .frames()
            .iter()
            .map(|frame| {
                let mut bytes = frame.header.to_vec();
                bytes.extend_from_slice(batch.get(frame.head).0);
                for &index in coalescer.merged(frame) {
                    bytes.extend_from_slice(&batch.get(index).0[frame.headers_len..]);
                }
                bytes
            })
            .collect()
    }

    fn coalesced(input: &[Vec<u8>]) -> (Coalescer, PacketBatch) {
        let mut batch = PacketBatch::growable(4);
        for packet in input {
            assert!(batch.push(packet, None));
        }
        let mut coalescer = Coalescer::default();
        coalescer.coalesce(&mut batch);
        (coalescer, batch)
    }

    /// The segments of one flow starting at `sequence`, `len` bytes of payload each.
    fn segments(sequence: u32, lens: &[usize], options: &[u8]) -> Vec<Vec<u8>> {
        let mut sequence = sequence;
        lens.iter()
            .enumerate()
            .map(|(index, &len)| {
                let data = payload(len);
                let packet = Tcp { sequence, id: 9 + index as u16, options, payload: &data, ..Tcp::default() }.packet();
                sequence = sequence.wrapping_add(len as u32);
                packet
            })
            .collect()
    }

    #[test]
    fn the_virtio_header_round_trips() {
        let header =
            VirtioNetHdr { flags: 1, gso_type: 1, hdr_len: 52, gso_size: 1368, csum_start: 20, csum_offset: 16 };
        assert_eq!(VirtioNetHdr::decode(&header.encode()), Ok(header));
        assert_eq!(VirtioNetHdr::decode(&[0; 9]), Err(OffloadError::ShortFrame));
    }

    #[test]
    fn a_tcp_super_packet_splits_into_segments_with_their_own_headers() {
        let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let data = payload(3 * 1000 + 500);
        let flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR;
        let sequence = u32::MAX - 1500;
        let packet =
            Tcp { sequence, flags, options: &options, payload: &data, id: u16::MAX, ..Tcp::default() }.packet();
        let mut frame = gso_frame(&packet, GSO_TCPV4 | GSO_ECN, 1000);
        let mut out = PacketBatch::growable(2);
        assert_eq!(split(&mut frame, &mut out), Ok(4));

        let mut joined = Vec::new();
        for (index, segment) in packets(&out).iter().enumerate() {
            let tcp = Tcp {
                sequence: sequence.wrapping_add(index as u32 * 1000),
                flags: match index {
                    0 => TCP_ACK | TCP_CWR,
                    3 => TCP_ACK | TCP_PSH | TCP_FIN,
                    _ => TCP_ACK,
                },
                options: &options,
                id: u16::MAX.wrapping_add(index as u16),
                payload: &data[index * 1000..(index * 1000 + 1000).min(data.len())],
                ..Tcp::default()
            };
            assert_eq!(segment, &tcp.packet(), "segment {index}");
            assert!(checksums_valid(segment));
            joined.extend_from_slice(&segment[IPV4_HEADER_LEN + 32..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn a_udp_super_packet_splits_into_datagrams() {
        let data = payload(2500);
        let mut frame = gso_frame(&udp(&data), GSO_UDP_L4, 1200);
        let mut out = PacketBatch::growable(2);
        assert_eq!(split(&mut frame, &mut out), Ok(3));
        let datagrams = packets(&out);
        for (index, datagram) in datagrams.iter().enumerate() {
            let chunk = &data[index * 1200..(index * 1200 + 1200).min(data.len())];
            assert_eq!(datagram.len(), IPV4_HEADER_LEN + UDP_HEADER_LEN + chunk.len());
            assert_eq!(usize::from(u16::from_be_bytes([datagram[2], datagram[3]])), datagram.len());
            assert_eq!(usize::from(u16::from_be_bytes([datagram[24], datagram[25]])), UDP_HEADER_LEN + chunk.len());
            assert_eq!(u16::from_be_bytes([datagram[4], datagram[5]]), index as u16);
            assert_eq!(&datagram[IPV4_HEADER_LEN + UDP_HEADER_LEN..], chunk);
            assert!(checksums_valid(datagram));
        }
    }

    #[test]
    fn a_single_packet_passes_with_its_checksum_completed() {
        // Partial checksum: completed.
        let datagram = udp(b"partial");
        let mut frame = gso_frame(&datagram, GSO_NONE, 0);
        let mut out = PacketBatch::growable(1);
        assert_eq!(split(&mut frame, &mut out), Ok(1));
        assert_eq!(packets(&out), vec![datagram]);

        // No offload asked for: the packet as it is, IPv6 and garbage included (routing drops
        // them later).
        for packet in [Tcp { payload: b"whole", ..Tcp::default() }.packet(), vec![0x60; 48], vec![1, 2, 3]] {
            let mut frame = VirtioNetHdr::default().encode().to_vec();
            frame.extend_from_slice(&packet);
            let mut out = PacketBatch::growable(1);
            assert_eq!(split(&mut frame, &mut out), Ok(1));
            assert_eq!(packets(&out), vec![packet]);
        }
    }

    #[test]
    fn malformed_frames_are_refused_without_output() {
        let data = payload(3000);
        let valid = gso_frame(&Tcp { payload: &data, ..Tcp::default() }.packet(), GSO_TCPV4, 1000);
        let mut cases: Vec<(Vec<u8>, OffloadError)> = vec![
            (vec![0; 5], OffloadError::ShortFrame),
            (
                {
                    let mut frame = valid.clone();
                    frame[1] = 4;
                    frame
                },
                OffloadError::GsoType(4),
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[1] = 3;
                    frame
                },
                OffloadError::GsoType(3),
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[VIRTIO_NET_HDR_LEN] = 0x65;
                    frame
                },
                OffloadError::NotIpv4,
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[VIRTIO_NET_HDR_LEN] = 0x44;
                    frame
                },
                OffloadError::Ipv4Header("header length"),
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[VIRTIO_NET_HDR_LEN + 9] = IPPROTO_UDP;
                    frame
                },
                OffloadError::Ipv4Header("protocol does not match gso_type"),
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[VIRTIO_NET_HDR_LEN + 32] = 0x40;
                    frame
                },
                OffloadError::TransportHeader("header length"),
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[4..6].copy_from_slice(&0u16.to_ne_bytes());
                    frame
                },
                OffloadError::GsoSize(0),
            ),
            (
                {
                    let mut frame = valid.clone();
                    frame[4..6].copy_from_slice(&2000u16.to_ne_bytes());
                    frame
                },
                OffloadError::GsoSize(2000),
            ),
            (valid[..VIRTIO_NET_HDR_LEN + 40].to_vec(), OffloadError::TransportHeader("a GSO packet without payload")),
            (
                {
                    let mut frame =
                        VirtioNetHdr { flags: NEEDS_CSUM, csum_start: 20, csum_offset: 60, ..VirtioNetHdr::default() }
                            .encode()
                            .to_vec();
                    frame.extend_from_slice(&udp(b"x"));
                    frame
                },
                OffloadError::ChecksumPosition,
            ),
        ];
        for (index, (frame, error)) in cases.iter_mut().enumerate() {
            let mut out = PacketBatch::growable(1);
            assert_eq!(split(frame, &mut out), Err(error.clone()), "case {index}");
            assert!(out.is_empty(), "case {index}");
        }

        // A full bounded batch takes none of the segments.
        let mut out = PacketBatch::bounded(2);
        assert_eq!(split(&mut valid.clone(), &mut out), Err(OffloadError::BatchFull));
        assert!(out.is_empty());

        // Every truncation of a valid frame is refused or split, never a panic.
        for len in 0..valid.len() {
            let mut out = PacketBatch::growable(1);
            let _ = split(&mut valid[..len].to_vec(), &mut out);
        }
    }

    #[test]
    fn consecutive_segments_of_a_flow_become_one_super_packet() {
        let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let mut input = segments(u32::MAX - 100, &[1000, 1000, 1000, 400], &options);
        // PSH on the last, as a sender's burst ends.
        let mut last = Tcp {
            sequence: (u32::MAX - 100).wrapping_add(3000),
            flags: TCP_ACK | TCP_PSH,
            options: &options,
            id: 12,
            payload: &payload(400),
            ..Tcp::default()
        }
        .packet();
        std::mem::swap(&mut input[3], &mut last);
        let (coalescer, batch) = coalesced(&input);
        let written = frames(&coalescer, &batch);
        assert_eq!(written.len(), 1);

        let frame = &written[0];
        let header = VirtioNetHdr::decode(frame).unwrap();
        assert_eq!(
            header,
            VirtioNetHdr {
                flags: NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 52,
                gso_size: 1000,
                csum_start: 20,
                csum_offset: 16
            }
        );
        let packet = &frame[VIRTIO_NET_HDR_LEN..];
        assert_eq!(usize::from(u16::from_be_bytes([packet[2], packet[3]])), packet.len());
        assert_eq!(packet.len(), 52 + 3400);
        assert_eq!(fold(sum(&packet[..IPV4_HEADER_LEN], 0)), 0xffff, "IP header checksum");
        assert_eq!(packet[IPV4_HEADER_LEN + 13], TCP_ACK | TCP_PSH);

        // What the kernel makes of it: splitting it the way TSO does gives back the segments.
        let mut frame = frame.clone();
        let mut out = PacketBatch::growable(4);
        assert_eq!(split(&mut frame, &mut out), Ok(4));
        assert_eq!(packets(&out), input);
    }

    #[test]
    fn interleaved_flows_coalesce_separately_each_in_order() {
        let flow_a = segments(1, &[100, 100, 100], &[]);
        let flow_b: Vec<Vec<u8>> = segments(5000, &[200, 200], &[])
            .into_iter()
            .map(|packet| {
                let mut packet = packet;
                packet[IPV4_HEADER_LEN..IPV4_HEADER_LEN + 2].copy_from_slice(&40001u16.to_be_bytes());
                set_transport_checksum(&mut packet, IPPROTO_TCP);
                packet
            })
            .collect();
        let other = udp(b"between");
        let input = vec![
            flow_a[0].clone(),
            flow_b[0].clone(),
            other.clone(),
            flow_a[1].clone(),
            flow_b[1].clone(),
            flow_a[2].clone(),
        ];
        let (coalescer, batch) = coalesced(&input);
        let heads: Vec<(usize, Vec<usize>)> =
            coalescer.frames().iter().map(|frame| (frame.head, coalescer.merged(frame).to_vec())).collect();
        assert_eq!(heads, vec![(0, vec![3, 5]), (1, vec![4]), (2, vec![])]);
        let written = frames(&coalescer, &batch);
        assert_eq!(written[2][..VIRTIO_NET_HDR_LEN], [0; VIRTIO_NET_HDR_LEN]);
        assert_eq!(written[2][VIRTIO_NET_HDR_LEN..], other[..]);
    }

    #[test]
    fn anything_but_a_continuation_ends_a_run_and_order_within_a_flow_holds() {
        let run = segments(1, &[100, 100, 100, 100], &[]);
        let gap = segments(10_000, &[100], &[]).remove(0);
        let pure_ack = Tcp { sequence: 201, ..Tcp::default() }.packet();
        let fin = Tcp { sequence: 301, flags: TCP_ACK | TCP_FIN, payload: &payload(100), ..Tcp::default() }.packet();
        let mut bad_checksum = run[3].clone();
        bad_checksum[IPV4_HEADER_LEN + 16] ^= 0xff;

        // 0 and 1 merge; the pure ACK (2) ends the run, so 3 starts a new one; the gap (4) starts
        // another; the FIN (5) passes alone.
        let input = vec![run[0].clone(), run[1].clone(), pure_ack, run[2].clone(), gap, fin];
        let (coalescer, _) = coalesced(&input);
        let heads: Vec<(usize, Vec<usize>)> =
            coalescer.frames().iter().map(|frame| (frame.head, coalescer.merged(frame).to_vec())).collect();
        assert_eq!(heads, vec![(0, vec![1]), (2, vec![]), (3, vec![]), (4, vec![]), (5, vec![])]);

        // A bad checksum is never hidden inside a super-packet: the segment passes untouched for
        // the kernel to drop.
        let input = vec![run[0].clone(), run[1].clone(), run[2].clone(), bad_checksum.clone()];
        let (coalescer, batch) = coalesced(&input);
        let heads: Vec<(usize, Vec<usize>)> =
            coalescer.frames().iter().map(|frame| (frame.head, coalescer.merged(frame).to_vec())).collect();
        assert_eq!(heads, vec![(0, vec![1, 2]), (3, vec![])]);
        assert_eq!(batch.get(3).0, &bad_checksum[..]);
    }

    #[test]
    fn segments_join_only_runs_they_match() {
        let base = segments(1, &[100], &[]).remove(0);
        let next = |change: &dyn Fn(&mut Tcp<'_>)| {
            let data = payload(100);
            let mut tcp = Tcp { sequence: 101, id: 10, payload: &data, ..Tcp::default() };
            change(&mut tcp);
            tcp.packet()
        };
        let merges = |second: Vec<u8>| {
            let (coalescer, _) = coalesced(&[base.clone(), second]);
            coalescer.frames().len() == 1
        };
        assert!(merges(next(&|_| {})));
        assert!(!merges(next(&|tcp| tcp.ack = 78)), "another ACK number");
        assert!(!merges(next(&|tcp| tcp.window = 501)), "another window");
        assert!(!merges(next(&|tcp| tcp.options = &[1, 1, 1, 1])), "other options");
        assert!(!merges(next(&|tcp| tcp.sequence = 102)), "out of sequence");
        assert!(!merges(next(&|tcp| tcp.ports = (40000, 5202))), "another flow");
        assert!(!merges(next(&|tcp| tcp.flags = TCP_ACK | TCP_CWR)), "CWR");
        assert!(!merges(segments(101, &[101], &[]).remove(0)), "longer than the run's segments");
        let mut other_ttl = next(&|_| {});
        other_ttl[8] = 63;
        set_ipv4_checksum(&mut other_ttl[..IPV4_HEADER_LEN]);
        assert!(!merges(other_ttl), "another TTL");

        // A shorter segment joins but ends the run; PSH likewise.
        let input = segments(1, &[100, 50, 50], &[]);
        let (coalescer, _) = coalesced(&input);
        assert_eq!(coalescer.frames().len(), 2);
    }

    #[test]
    fn super_packets_stay_within_64_kib() {
        let input = segments(1, &[1380; 60], &[]);
        let (coalescer, batch) = coalesced(&input);
        let written = frames(&coalescer, &batch);
        assert!(written.len() >= 2);
        assert!(written.iter().all(|frame| frame.len() - VIRTIO_NET_HDR_LEN <= usize::from(u16::MAX)));
        let total: usize = written.iter().map(|frame| frame.len() - VIRTIO_NET_HDR_LEN - 40).sum();
        assert_eq!(total, 60 * 1380);
    }

    #[test]
    fn malformed_packets_pass_alone_and_untouched() {
        let valid = segments(1, &[100], &[]).remove(0);
        let mut input: Vec<Vec<u8>> = (0..valid.len()).map(|len| valid[..len].to_vec()).collect();
        let mut wrong_length = valid.clone();
        wrong_length[3] ^= 1;
        let mut fragment = valid.clone();
        fragment[6] = 0x20;
        let mut options = valid.clone();
        options[0] = 0x46;
        input.extend([wrong_length, fragment, options, vec![0x60; 60]]);
        let (coalescer, batch) = coalesced(&input);
        assert_eq!(coalescer.frames().len(), input.len());
        assert_eq!(packets(&batch), input);
        assert!(coalescer.frames().iter().all(|frame| frame.header == [0; VIRTIO_NET_HDR_LEN]));

        // A TCP packet that cannot be parsed may belong to any flow: later segments never join a
        // run written before it.
        let run = segments(1, &[100, 100], &[]);
        let mut with_options = segments(5000, &[100], &[]).remove(0);
        with_options[0] = 0x46;
        let (coalescer, _) = coalesced(&[run[0].clone(), with_options, run[1].clone()]);
        let heads: Vec<usize> = coalescer.frames().iter().map(|frame| frame.head).collect();
        assert_eq!(heads, vec![0, 1, 2]);
    }
}
