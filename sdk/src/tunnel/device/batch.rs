//! Reusable packet buffers. Every stage of the tunnel works on a batch of packets held in one
//! contiguous allocation made when the worker starts, so the data path never allocates per
//! packet, and a later change can fill or drain a whole batch with one system call
//! (`recvmmsg`/`sendmmsg`, or one TUN read with GRO) without touching the stages around it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The size of one packet slot: room for the largest IP packet the tunnel carries plus
/// WireGuard's 32 bytes of data overhead, and more than the 148 bytes of a handshake message.
pub(crate) const SLOT_LEN: usize = 2048;

/// WireGuard's per-packet overhead: 16 bytes of header and a 16 byte authentication tag.
pub(crate) const DATA_OVERHEAD: usize = 32;

/// The largest IP packet that fits a slot once encrypted.
pub(crate) const MAX_PACKET_LEN: usize = SLOT_LEN - DATA_OVERHEAD;

/// The address stored with packets that have none (those read from or written to the TUN).
const NO_ADDRESS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// A batch of packets, each with an address: the source of a received datagram or the
/// destination of one to send.
pub(crate) struct PacketBatch {
    data: Vec<u8>,
    lens: Vec<usize>,
    addresses: Vec<SocketAddr>,
    count: usize,
    /// Batches grow when one input produces several outputs (a TUN frame split into segments, a
    /// run of datagrams merged by UDP GRO, a completed handshake releasing queued packets), and
    /// keep the grown capacity so that growth is rare and amortised. Bounded batches (tests)
    /// never grow.
    growable: bool,
}

impl PacketBatch {
    /// A batch of exactly `capacity` slots.
    #[cfg(test)]
    pub(crate) fn bounded(capacity: usize) -> Self {
        Self::with_capacity(capacity, false)
    }

    /// A batch that starts with `capacity` slots and grows on demand.
    pub(crate) fn growable(capacity: usize) -> Self {
        Self::with_capacity(capacity, true)
    }

    fn with_capacity(capacity: usize, growable: bool) -> Self {
        let capacity = capacity.max(1);
        Self {
            data: vec![0; capacity * SLOT_LEN],
            lens: vec![0; capacity],
            addresses: vec![NO_ADDRESS; capacity],
            count: 0,
            growable,
        }
    }

    fn capacity(&self) -> usize {
        self.lens.len()
    }

    pub(crate) fn clear(&mut self) {
        self.count = 0;
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The next free slot, to be filled and then [`commit`](Self::commit)ted; `None` when a
    /// bounded batch is full.
    pub(crate) fn free_slot(&mut self) -> Option<&mut [u8]> {
        if self.count == self.capacity() {
            if !self.growable {
                return None;
            }
            let capacity = self.capacity() * 2;
            self.data.resize(capacity * SLOT_LEN, 0);
            self.lens.resize(capacity, 0);
            self.addresses.resize(capacity, NO_ADDRESS);
        }
        let start = self.count * SLOT_LEN;
        Some(&mut self.data[start..start + SLOT_LEN])
    }

    /// Every free slot of the batch, in order, without growing it: a read that fills several
    /// slots with one system call then [`commit`](Self::commit)s them in the same order.
    pub(crate) fn free_slots(&mut self) -> impl Iterator<Item = &mut [u8]> {
        let start = self.count * SLOT_LEN;
        self.data[start..].chunks_exact_mut(SLOT_LEN)
    }

    /// Keeps the first `len` bytes of the free slot as the next packet.
    pub(crate) fn commit(&mut self, len: usize, address: Option<SocketAddr>) {
        debug_assert!(self.count < self.capacity() && len <= SLOT_LEN);
        if self.count < self.capacity() {
            self.lens[self.count] = len.min(SLOT_LEN);
            self.addresses[self.count] = address.unwrap_or(NO_ADDRESS);
            self.count += 1;
        }
    }

    /// Copies `packet` into the next slot. Returns false when a bounded batch is full or the
    /// packet does not fit a slot.
    pub(crate) fn push(&mut self, packet: &[u8], address: Option<SocketAddr>) -> bool {
        let Some(slot) = self.free_slot() else { return false };
        let Some(target) = slot.get_mut(..packet.len()) else { return false };
        target.copy_from_slice(packet);
        self.commit(packet.len(), address);
        true
    }

    /// The packet at `index` and its address.
    pub(crate) fn get(&self, index: usize) -> (&[u8], SocketAddr) {
        let start = index * SLOT_LEN;
        (&self.data[start..start + self.lens[index]], self.addresses[index])
    }

    /// The packet at `index`, to rewrite its headers in place.
    pub(crate) fn get_mut(&mut self, index: usize) -> &mut [u8] {
        let start = index * SLOT_LEN;
        &mut self.data[start..start + self.lens[index]]
    }

    /// Keeps only the first `len` packets.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.count = self.count.min(len);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        (0..self.count).map(|index| self.get(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_batch_stops_at_capacity() {
        let mut batch = PacketBatch::bounded(2);
        assert!(batch.push(b"one", None));
        assert!(batch.push(b"two", Some("192.0.2.1:9".parse().unwrap())));
        assert!(batch.free_slot().is_none());
        assert!(!batch.push(b"three", None));
        let packets: Vec<_> = batch.iter().collect();
        assert_eq!(packets, vec![(&b"one"[..], NO_ADDRESS), (&b"two"[..], "192.0.2.1:9".parse().unwrap())]);
        batch.clear();
        assert!(batch.is_empty());
        assert!(batch.push(b"again", None));
        assert_eq!(batch.get(0).0, b"again");
    }

    #[test]
    fn growable_batch_keeps_its_packets_when_it_grows() {
        let mut batch = PacketBatch::growable(1);
        for index in 0..5u8 {
            assert!(batch.push(&[index; 3], None));
        }
        assert_eq!(batch.len(), 5);
        assert_eq!(batch.get(4).0, &[4, 4, 4]);
        assert_eq!(batch.get(0).0, &[0, 0, 0]);
    }

    #[test]
    fn free_slots_are_the_slots_after_the_packets() {
        let mut batch = PacketBatch::bounded(3);
        assert!(batch.push(b"one", None));
        let slots: Vec<usize> = batch.free_slots().map(|slot| slot.len()).collect();
        assert_eq!(slots, vec![SLOT_LEN, SLOT_LEN]);
        for (index, slot) in batch.free_slots().enumerate() {
            slot[0] = index as u8 + 10;
        }
        batch.commit(1, None);
        batch.commit(1, None);
        assert_eq!(batch.free_slots().count(), 0);
        let packets: Vec<&[u8]> = batch.iter().map(|(packet, _)| packet).collect();
        assert_eq!(packets, vec![&b"one"[..], &[10][..], &[11][..]]);
    }

    #[test]
    fn oversized_packets_are_refused() {
        let mut batch = PacketBatch::growable(1);
        assert!(!batch.push(&[0; SLOT_LEN + 1], None));
        assert!(batch.is_empty());
    }
}
