//! The system calls of the tunnel, one function per stage: fill a batch from the TUN or the UDP
//! socket, drain a batch to either. Both descriptors are non-blocking; a worker blocks only in
//! [`Waker::wait`], which also returns when the tunnel shuts down.
//!
//! The UDP side moves a whole batch per system call: `recvmmsg` fills every free slot of a batch
//! with the datagrams waiting, and `sendmmsg` sends the datagrams of a batch in order, resuming
//! after a partial send (the kernel sends a prefix of the messages and returns its length). A run
//! of datagrams to one peer of one size (a bulk transfer) goes out as one UDP GSO send
//! (`UDP_SEGMENT`): the kernel walks its stack once for the run and splits it into datagrams as
//! late as it can. When the kernel refuses GSO for a run (no checksum offload on the route, a
//! segment larger than the route's MTU), that run goes out with `sendmmsg` instead. Where the
//! socket has UDP GRO, the kernel keeps such a run whole on the way in, and one receive buffer
//! of 64 KiB takes it; it is cut back into datagrams here ([`read_udp_gro`]).
//!
//! The TUN side, with offloads (`IFF_VNET_HDR`, see [`super::offload`]), reads one frame per
//! system call, a TCP or UDP super-packet of up to 64 KiB that is split into packets, and writes
//! the packets of a batch as coalesced frames, each one gathering `write` straight from the
//! batch. Without offloads (a kernel that refuses them) it is one `read`/`write` per packet.

use std::io::{self, ErrorKind, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, sendmsg,
};
use tun_rs::SyncDevice;

use super::batch::{MAX_PACKET_LEN, PacketBatch};
use super::offload::{self, Coalescer};

/// The most datagrams one `sendmmsg` call carries; far below the kernel's limit (`UIO_MAXIOV`,
/// 1024), and the size of the tunnel's input batches, so a batch rarely needs two calls.
const DATAGRAMS_PER_CALL: usize = 64;

/// The kernel's limit on the segments of one GSO send (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;

/// The most payload one GSO send carries: a UDP datagram's limit over IPv6, the smaller one.
const MAX_GSO_BYTES: usize = 65_527 - 40;

/// Set once the kernel answered a GSO send with `EIO` (a route without checksum offload): from
/// then on the tunnels of this process send without GSO.
static GSO_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Wakes every worker of a tunnel when it shuts down.
pub(crate) struct Waker {
    event: EventFd,
    stopping: AtomicBool,
}

/// Why [`Waker::wait`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The descriptor is ready, or the timeout passed.
    Ready,
    Stopping,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        let event = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Self { event, stopping: AtomicBool::new(false) })
    }

    /// Tells every worker to stop. The event counter is never read back, so the event stays
    /// readable and wakes every waiter, now and later.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(error) = self.event.write(1) {
            tracing::error!(%error, "cannot wake the tunnel's workers");
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Blocks until `fd` is ready for `flags` (or, without `fd`, until `timeout`), or the tunnel
    /// stops.
    pub(crate) fn wait(
        &self,
        fd: Option<BorrowedFd<'_>>,
        flags: PollFlags,
        timeout: Option<Duration>,
    ) -> io::Result<Wake> {
        let timeout = match timeout {
            // Durations beyond poll's range (about 24 days) are not used here; waiting "forever"
            // instead is harmless because the waker still interrupts.
            Some(timeout) => PollTimeout::try_from(timeout).unwrap_or(PollTimeout::NONE),
            None => PollTimeout::NONE,
        };
        let event = PollFd::new(self.event.as_fd(), PollFlags::POLLIN);
        let polled = match fd {
            Some(fd) => poll(&mut [event, PollFd::new(fd, flags)], timeout),
            None => poll(&mut [event], timeout),
        };
        match polled {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
        Ok(if self.is_stopping() { Wake::Stopping } else { Wake::Ready })
    }
}

/// Whether an error of a single datagram or packet is worth dropping that packet for, rather
/// than stopping the tunnel: the network changing under us (roaming), firewalls, full buffers.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::AddrNotAvailable
            | ErrorKind::PermissionDenied
            | ErrorKind::InvalidInput
            | ErrorKind::NetworkDown
    ) || error.raw_os_error() == Some(nix::libc::ENOBUFS)
        || error.raw_os_error() == Some(nix::libc::EMSGSIZE)
        || error.raw_os_error() == Some(nix::libc::EIO)
}

/// Fills `batch` with the IP packets waiting on the TUN, without blocking, until it holds at
/// least `limit` packets. With offloads (`frame` is then a buffer of [`MAX_FRAME_LEN`] bytes),
/// each read returns a frame that [`offload::split`] cuts into packets, so `batch` must be
/// growable; a frame that cannot be split is dropped. Without, each read is one packet.
pub(crate) fn read_tun(
    tun: &SyncDevice,
    frame: Option<&mut [u8]>,
    batch: &mut PacketBatch,
    limit: usize,
) -> io::Result<()> {
    match frame {
        Some(frame) => {
            while batch.len() < limit {
                let len = match tun.recv(frame) {
                    Ok(len) => len,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                    Err(error) => return Err(error),
                };
                if let Err(error) = offload::split(&mut frame[..len], batch) {
                    tracing::debug!(%error, "dropped a frame read from the TUN");
                }
            }
        }
        None => {
            while batch.len() < limit {
                let Some(slot) = batch.free_slot() else { return Ok(()) };
                // Reading into at most `MAX_PACKET_LEN` bytes leaves room to encrypt in the same
                // slot size; a longer packet (an MTU raised behind our back) is truncated and
                // then dropped by the IP length check.
                match tun.recv(&mut slot[..MAX_PACKET_LEN]) {
                    Ok(len) => batch.commit(len, None),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(error) if error.kind() == ErrorKind::Interrupted => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }
    Ok(())
}

/// Fills `batch` with the datagrams waiting on the socket, without blocking.
pub(crate) fn read_udp(socket: &UdpSocket, batch: &mut PacketBatch) -> io::Result<()> {
    let mut received = Vec::with_capacity(DATAGRAMS_PER_CALL);
    loop {
        let wanted = batch.free_slots().count();
        if wanted == 0 {
            return Ok(());
        }
        match receive_datagrams(socket, batch, &mut received) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, "UDP receive error");
                continue;
            }
            Err(error) => return Err(error),
        }
        for &(len, source) in &received {
            batch.commit(len, source);
        }
        // With a non-blocking receive the kernel returns fewer datagrams than asked for only
        // when the socket has no more.
        if received.len() < wanted {
            return Ok(());
        }
    }
}

/// The size of each receive buffer with UDP GRO: the kernel merges up to 64 KiB of datagrams
/// of one flow into one.
pub(crate) const GRO_BUFFER_LEN: usize = 1 << 16;

/// How many receive buffers one `recvmmsg` fills with UDP GRO.
pub(crate) const GRO_BUFFERS: usize = 8;

/// Fills `batch` with the datagrams waiting on a socket with UDP GRO (`UDP_GRO`), without
/// blocking, until it holds at least `limit` datagrams. One `recvmmsg` fills up to
/// [`GRO_BUFFERS`] buffers of `buffers`, each with one datagram or a run of datagrams of one
/// source merged by the kernel, which the control message `UDP_GRO` says the length of (the last
/// may be shorter); the run is cut back into datagrams in `batch`, which must be growable. A
/// datagram longer than a slot is dropped, as it cannot be a valid one.
pub(crate) fn read_udp_gro(
    socket: &UdpSocket,
    buffers: &mut [u8],
    batch: &mut PacketBatch,
    limit: usize,
) -> io::Result<()> {
    let mut received = Vec::with_capacity(GRO_BUFFERS);
    while batch.len() < limit {
        match receive_merged(socket, buffers, &mut received) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, "UDP receive error");
                continue;
            }
            Err(error) => return Err(error),
        }
        for (buffer, &(len, source, segment)) in buffers.chunks_exact(GRO_BUFFER_LEN).zip(&received) {
            let merged = &buffer[..len.min(GRO_BUFFER_LEN)];
            for datagram in merged.chunks(segment.unwrap_or(merged.len()).max(1)) {
                batch.push(datagram, source);
            }
        }
        if received.len() < buffers.len() / GRO_BUFFER_LEN {
            return Ok(());
        }
    }
    Ok(())
}

/// One `recvmmsg` into the GRO buffers; the length, source and segment length of each goes to
/// `received`, in order.
fn receive_merged(
    socket: &UdpSocket,
    buffers: &mut [u8],
    received: &mut Vec<(usize, Option<SocketAddr>, Option<usize>)>,
) -> io::Result<()> {
    received.clear();
    let mut slices: Vec<[IoSliceMut<'_>; 1]> =
        buffers.chunks_exact_mut(GRO_BUFFER_LEN).map(|buffer| [IoSliceMut::new(buffer)]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), Some(nix::cmsg_space!(i32)));
    let messages = recvmmsg(socket.as_raw_fd(), &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
    for message in messages {
        let segment = message.cmsgs()?.find_map(|cmsg| match cmsg {
            ControlMessageOwned::UdpGroSegments(segment) => usize::try_from(segment).ok(),
            _ => None,
        });
        received.push((message.bytes, message.address.as_ref().and_then(socket_addr), segment));
    }
    Ok(())
}

/// One `recvmmsg` into the free slots of `batch`; the length and source of each datagram go to
/// `received`, in order, for the caller to commit.
fn receive_datagrams(
    socket: &UdpSocket,
    batch: &mut PacketBatch,
    received: &mut Vec<(usize, Option<SocketAddr>)>,
) -> io::Result<()> {
    received.clear();
    let mut slices: Vec<[IoSliceMut<'_>; 1]> = batch.free_slots().map(|slot| [IoSliceMut::new(slot)]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
    let messages = recvmmsg(socket.as_raw_fd(), &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
    // A datagram longer than a slot is truncated to the slot, as `recv_from` did, and then
    // fails authentication.
    received.extend(messages.map(|message| (message.bytes, message.address.as_ref().and_then(socket_addr))));
    Ok(())
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends every datagram of `batch` to its address, in order, waiting for room in the socket
/// buffer rather than dropping when it is full.
pub(crate) fn write_udp(socket: &UdpSocket, batch: &PacketBatch, waker: &Waker) -> io::Result<()> {
    send_in_order(
        batch.len(),
        |range| send_datagrams(socket, batch, range),
        || waker.wait(Some(socket.as_fd()), PollFlags::POLLOUT, None),
    )
}

/// Sends the datagrams of `batch` at the start of `range`: one GSO run if the range starts with
/// one, otherwise with `sendmmsg` up to the next run. Returns how many datagrams, from the start
/// of the range, the kernel took.
fn send_datagrams(socket: &UdpSocket, batch: &PacketBatch, range: Range<usize>) -> io::Result<usize> {
    if GSO_UNSUPPORTED.load(Ordering::Relaxed) {
        return send_mmsg(socket, batch, range);
    }
    let run = gso_run(batch, range.clone());
    if run > 1 {
        match send_gso(socket, batch, range.start..range.start + run) {
            Ok(()) => return Ok(run),
            Err(error) if error.kind() == ErrorKind::WouldBlock || error.kind() == ErrorKind::Interrupted => {
                return Err(error);
            }
            Err(error) => {
                if error.raw_os_error() == Some(nix::libc::EIO) {
                    GSO_UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                tracing::debug!(%error, "UDP GSO send refused; sending the datagrams one by one");
                return send_mmsg(socket, batch, range.start..range.start + run);
            }
        }
    }
    let singles =
        (range.start..range.end).position(|index| gso_run(batch, index..range.end) > 1).unwrap_or(range.len()).max(1);
    send_mmsg(socket, batch, range.start..range.start + singles)
}

/// How many datagrams from the start of `range` one GSO send can carry: one destination, one
/// length (the last may be shorter, as the kernel splits a run into segments of the first's
/// length), within the kernel's limits.
fn gso_run(batch: &PacketBatch, range: Range<usize>) -> usize {
    let Some(first) = range.clone().next() else { return 0 };
    let (datagram, destination) = batch.get(first);
    let segment = datagram.len();
    let mut total = segment;
    let mut run = 1;
    for index in range.skip(1) {
        let (next, next_destination) = batch.get(index);
        if next_destination != destination
            || next.len() > segment
            || run == MAX_GSO_SEGMENTS
            || total + next.len() > MAX_GSO_BYTES
        {
            break;
        }
        total += next.len();
        run += 1;
        if next.len() < segment {
            break;
        }
    }
    run
}

/// One `sendmsg` of the run `range` with `UDP_SEGMENT`, gathering the datagrams in place.
fn send_gso(socket: &UdpSocket, batch: &PacketBatch, range: Range<usize>) -> io::Result<()> {
    let (first, destination) = batch.get(range.start);
    let segment = u16::try_from(first.len()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let slices: Vec<IoSlice<'_>> = range.map(|index| IoSlice::new(batch.get(index).0)).collect();
    let destination = SockaddrStorage::from(destination);
    sendmsg(
        socket.as_raw_fd(),
        &slices,
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::MSG_DONTWAIT,
        Some(&destination),
    )?;
    Ok(())
}

/// One `sendmmsg` of the datagrams of `batch` in `range`; returns how many of them, from the
/// start of the range, the kernel took.
fn send_mmsg(socket: &UdpSocket, batch: &PacketBatch, range: Range<usize>) -> io::Result<usize> {
    let slices: Vec<[IoSlice<'_>; 1]> = range.clone().map(|index| [IoSlice::new(batch.get(index).0)]).collect();
    let addresses: Vec<Option<SockaddrStorage>> =
        range.map(|index| Some(SockaddrStorage::from(batch.get(index).1))).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
    let sent = sendmmsg(socket.as_raw_fd(), &mut headers, slices.iter(), &addresses, [], MsgFlags::MSG_DONTWAIT)?;
    Ok(sent.count())
}

/// Sends datagrams `0..count` in order through `send`, which sends a prefix of the range it is
/// given (at most [`DATAGRAMS_PER_CALL`] long) and returns the prefix's length, or fails for the
/// first datagram of the range. A partial send resumes after the prefix; a full buffer waits with
/// `wait_writable`; a transient error drops only the datagram it belongs to.
fn send_in_order(
    count: usize,
    mut send: impl FnMut(Range<usize>) -> io::Result<usize>,
    mut wait_writable: impl FnMut() -> io::Result<Wake>,
) -> io::Result<()> {
    let mut next = 0;
    while next < count {
        let end = count.min(next + DATAGRAMS_PER_CALL);
        match send(next..end) {
            // The kernel never reports success for nothing; were it to, waiting for room is
            // safer than spinning.
            Ok(0) => {
                if wait_writable()? == Wake::Stopping {
                    return Ok(());
                }
            }
            Ok(sent) => next += sent.min(end - next),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                if wait_writable()? == Wake::Stopping {
                    return Ok(());
                }
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, "UDP send error");
                next += 1;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Writes every IP packet of `batch` to the TUN. With offloads (`coalescer` given), the
/// coalescer first merges runs of TCP segments, which may rewrite their headers in `batch`, and
/// each of its frames is one gathering `write`: the virtio-net header, the head packet, then the
/// payloads of the packets merged into it, read in place. Without, one `write` per packet.
pub(crate) fn write_tun(
    tun: &SyncDevice,
    batch: &mut PacketBatch,
    coalescer: Option<&mut Coalescer>,
    waker: &Waker,
) -> io::Result<()> {
    let Some(coalescer) = coalescer else {
        for (packet, _) in batch.iter() {
            if write_frame(tun, &[IoSlice::new(packet)], waker)? == Wake::Stopping {
                return Ok(());
            }
        }
        return Ok(());
    };
    coalescer.coalesce(batch);
    let mut slices = [IoSlice::new(&[]); offload::MAX_COALESCED + 1];
    for frame in coalescer.frames() {
        slices[0] = IoSlice::new(&frame.header);
        slices[1] = IoSlice::new(batch.get(frame.head).0);
        let merged = coalescer.merged(frame);
        for (slice, &index) in slices[2..].iter_mut().zip(merged) {
            // The coalescer merges only packets with `headers_len` bytes of headers.
            *slice = IoSlice::new(batch.get(index).0.get(frame.headers_len..).unwrap_or_default());
        }
        if write_frame(tun, &slices[..2 + merged.len()], waker)? == Wake::Stopping {
            return Ok(());
        }
    }
    Ok(())
}

/// Writes one frame, gathered from `slices`, waiting for room if the TUN's queue is full. A
/// transient error drops the frame.
fn write_frame(tun: &SyncDevice, slices: &[IoSlice<'_>], waker: &Waker) -> io::Result<Wake> {
    loop {
        match tun.send_vectored(slices) {
            Ok(_) => return Ok(Wake::Ready),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                if waker.wait(Some(tun.as_fd()), PollFlags::POLLOUT, None)? == Wake::Stopping {
                    return Ok(Wake::Stopping);
                }
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, "TUN write error");
                return Ok(Wake::Ready);
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A fake `sendmmsg`: records the datagrams it takes, taking at most `per_call` at a time,
    /// and answers the calls listed in `script` with an error instead.
    struct FakeSender {
        sent: Vec<usize>,
        ranges: Vec<Range<usize>>,
        per_call: usize,
        script: Vec<(usize, ErrorKind)>,
        calls: usize,
    }

    impl FakeSender {
        fn send(&mut self, range: Range<usize>) -> io::Result<usize> {
            self.calls += 1;
            self.ranges.push(range.clone());
            if let Some(&(_, kind)) = self.script.iter().find(|(call, _)| *call == self.calls) {
                return Err(io::Error::from(kind));
            }
            let taken = range.len().min(self.per_call);
            self.sent.extend(range.start..range.start + taken);
            Ok(taken)
        }
    }

    fn fake(per_call: usize, script: Vec<(usize, ErrorKind)>) -> FakeSender {
        FakeSender { sent: Vec::new(), ranges: Vec::new(), per_call, script, calls: 0 }
    }

    #[test]
    fn a_batch_is_sent_whole_in_order_in_chunks() {
        let mut sender = fake(usize::MAX, Vec::new());
        send_in_order(150, |range| sender.send(range), || panic!("no wait expected")).unwrap();
        assert_eq!(sender.sent, (0..150).collect::<Vec<_>>());
        assert_eq!(sender.ranges, vec![0..64, 64..128, 128..150]);
    }

    #[test]
    fn partial_sends_resume_after_the_sent_prefix() {
        let mut sender = fake(7, Vec::new());
        send_in_order(40, |range| sender.send(range), || panic!("no wait expected")).unwrap();
        assert_eq!(sender.sent, (0..40).collect::<Vec<_>>());
        assert!(sender.ranges.windows(2).all(|pair| pair[1].start == pair[0].start + 7));
    }

    #[test]
    fn a_full_buffer_waits_and_retries_the_same_datagram() {
        let mut sender = fake(3, vec![(2, ErrorKind::WouldBlock), (3, ErrorKind::Interrupted)]);
        let mut waits = 0;
        let result = send_in_order(
            10,
            |range| sender.send(range),
            || {
                waits += 1;
                Ok(Wake::Ready)
            },
        );
        result.unwrap();
        assert_eq!(waits, 1);
        assert_eq!(sender.sent, (0..10).collect::<Vec<_>>());
        assert_eq!(sender.ranges[1..4], [3..10, 3..10, 3..10]);
    }

    #[test]
    fn a_transient_error_drops_only_its_datagram() {
        let mut sender = fake(4, vec![(2, ErrorKind::ConnectionRefused)]);
        send_in_order(10, |range| sender.send(range), || panic!("no wait expected")).unwrap();
        // The second call started at datagram 4; the error is that datagram's.
        assert_eq!(sender.sent, vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn stopping_while_waiting_ends_the_send_and_other_errors_propagate() {
        let mut sender = fake(1, vec![(1, ErrorKind::WouldBlock)]);
        send_in_order(5, |range| sender.send(range), || Ok(Wake::Stopping)).unwrap();
        assert!(sender.sent.is_empty());

        let mut sender = fake(1, vec![(2, ErrorKind::Other)]);
        let error = send_in_order(5, |range| sender.send(range), || Ok(Wake::Ready)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Other);
        assert_eq!(sender.sent, vec![0]);
    }

    #[test]
    fn gso_runs_are_one_peer_one_size_with_a_shorter_last() {
        let peer: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut batch = PacketBatch::growable(8);
        for (len, destination) in
            [(100, peer), (100, peer), (100, peer), (60, peer), (100, peer), (100, other), (100, other), (120, other)]
        {
            assert!(batch.push(&vec![0; len], Some(destination)));
        }
        // Equal lengths, then a shorter one ends the run.
        assert_eq!(gso_run(&batch, 0..8), 4);
        // A new destination ends a run.
        assert_eq!(gso_run(&batch, 4..8), 1);
        // A longer datagram cannot join.
        assert_eq!(gso_run(&batch, 5..8), 2);
        assert_eq!(gso_run(&batch, 7..8), 1);
        assert_eq!(gso_run(&batch, 8..8), 0);
        // The range bounds the run.
        assert_eq!(gso_run(&batch, 0..2), 2);
    }

    #[test]
    fn gso_runs_stay_within_the_kernel_limits() {
        let peer: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let mut batch = PacketBatch::growable(8);
        for _ in 0..100 {
            assert!(batch.push(&[0; 100], Some(peer)));
        }
        assert_eq!(gso_run(&batch, 0..100), MAX_GSO_SEGMENTS);
        let mut large = PacketBatch::growable(8);
        for _ in 0..60 {
            assert!(large.push(&[0; 1452], Some(peer)));
        }
        let run = gso_run(&large, 0..60);
        assert_eq!(run, MAX_GSO_BYTES / 1452);
        assert!(run * 1452 <= MAX_GSO_BYTES);
    }

    /// Real sockets on loopback: `sendmmsg` to two receivers, `recvmmsg` into bounded batches;
    /// every datagram arrives once, whole, in its flow's order, with its source.
    #[test]
    fn datagrams_cross_loopback_whole_and_in_order() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receivers = [UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap()];
        for socket in receivers.iter().chain([&sender]) {
            socket.set_nonblocking(true).unwrap();
        }
        let waker = Waker::new().unwrap();

        // 100 datagrams (fewer than the default socket buffer holds): runs of ten to one receiver
        // of one length with a shorter last (sent with GSO), then alternating between the
        // receivers with lengths from 1 byte to a full slot (sent with `sendmmsg`).
        let count = 100usize;
        let mut batch = PacketBatch::growable(8);
        for index in 0..count {
            let len = datagram_len(index);
            let mut datagram = vec![index as u8; len];
            datagram[0] = flow_position(index);
            assert!(batch.push(&datagram, Some(receivers[flow_of(index)].local_addr().unwrap())));
        }
        write_udp(&sender, &batch, &waker).unwrap();

        for (flow, receiver) in receivers.iter().enumerate() {
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut input = PacketBatch::bounded(16);
            while got.len() < count / 2 && Instant::now() < deadline {
                input.clear();
                read_udp(receiver, &mut input).unwrap();
                assert!(input.len() <= 16);
                for (datagram, source) in input.iter() {
                    assert_eq!(source, sender.local_addr().unwrap());
                    got.push(datagram.to_vec());
                }
                if input.is_empty() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            assert_eq!(got.len(), count / 2, "flow {flow}");
            let indices: Vec<usize> = (0..count).filter(|&index| flow_of(index) == flow).collect();
            for (position, (datagram, &index)) in got.iter().zip(&indices).enumerate() {
                assert_eq!(datagram.len(), datagram_len(index));
                assert_eq!(datagram[0], position as u8, "flow {flow} out of order at {position}");
                assert!(datagram[1..].iter().all(|&byte| byte == index as u8));
            }
        }
    }

    /// Real sockets on loopback, the receivers with UDP GRO: runs sent with GSO arrive merged
    /// (loopback keeps them whole) and are cut back into the same datagrams, whole, in order,
    /// with their source; datagrams sent alone arrive alone.
    #[test]
    fn datagrams_merged_by_udp_gro_are_cut_back_whole_and_in_order() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receivers = [UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap()];
        for socket in receivers.iter().chain([&sender]) {
            socket.set_nonblocking(true).unwrap();
        }
        for receiver in &receivers {
            nix::sys::socket::setsockopt(receiver, nix::sys::socket::sockopt::UdpGroSegment, &true).unwrap();
        }
        let waker = Waker::new().unwrap();
        let count = 100usize;
        let mut batch = PacketBatch::growable(8);
        for index in 0..count {
            let mut datagram = vec![index as u8; datagram_len(index)];
            datagram[0] = flow_position(index);
            assert!(batch.push(&datagram, Some(receivers[flow_of(index)].local_addr().unwrap())));
        }
        write_udp(&sender, &batch, &waker).unwrap();

        let mut buffers = vec![0; 2 * GRO_BUFFER_LEN];
        for (flow, receiver) in receivers.iter().enumerate() {
            let mut input = PacketBatch::growable(4);
            let deadline = Instant::now() + Duration::from_secs(5);
            while input.len() < count / 2 && Instant::now() < deadline {
                read_udp_gro(receiver, &mut buffers, &mut input, count).unwrap();
                if input.len() < count / 2 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            assert_eq!(input.len(), count / 2, "flow {flow}");
            let indices: Vec<usize> = (0..count).filter(|&index| flow_of(index) == flow).collect();
            for (position, ((datagram, source), &index)) in input.iter().zip(&indices).enumerate() {
                assert_eq!(source, sender.local_addr().unwrap());
                assert_eq!(datagram.len(), datagram_len(index), "flow {flow} at {position}");
                assert_eq!(datagram[0], position as u8, "flow {flow} out of order at {position}");
                assert!(datagram[1..].iter().all(|&byte| byte == index as u8));
            }
        }
    }

    /// The kernel really merges on loopback: a GSO run of ten arrives as one buffer that says
    /// its segment length, so the test above covers the cutting.
    #[test]
    fn a_gso_run_arrives_as_one_merged_receive() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_nonblocking(true).unwrap();
        nix::sys::socket::setsockopt(&receiver, nix::sys::socket::sockopt::UdpGroSegment, &true).unwrap();
        let mut batch = PacketBatch::growable(8);
        for _ in 0..10 {
            assert!(batch.push(&[7; 1452], Some(receiver.local_addr().unwrap())));
        }
        assert_eq!(send_datagrams(&sender, &batch, 0..10).unwrap(), 10);

        let mut buffers = vec![0; GRO_BUFFER_LEN];
        let mut received = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.is_empty() && Instant::now() < deadline {
            match receive_merged(&receiver, &mut buffers, &mut received) {
                Err(error) if error.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                other => other.unwrap(),
            }
        }
        assert_eq!(received, vec![(14_520, Some(sender.local_addr().unwrap()), Some(1452))]);
    }

    // The datagrams of the loopback test: the first 40 in runs of ten per receiver, the rest
    // alternating.

    fn flow_of(index: usize) -> usize {
        if index < 40 { index / 10 % 2 } else { index % 2 }
    }

    fn flow_position(index: usize) -> u8 {
        (0..index).filter(|&earlier| flow_of(earlier) == flow_of(index)).count() as u8
    }

    fn datagram_len(index: usize) -> usize {
        if index < 40 {
            if index % 10 == 9 { 700 } else { 1452 }
        } else {
            1 + index * 37 % super::super::batch::SLOT_LEN
        }
    }
}
