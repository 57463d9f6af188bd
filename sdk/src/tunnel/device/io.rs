//! The system calls of the tunnel, one function per stage: fill a batch from the TUN or the UDP
//! socket, drain a batch to either. Both descriptors are non-blocking; a worker blocks only in
//! [`Waker::wait`], which also returns when the tunnel shuts down.
//!
//! Today each packet is one `read`/`recvfrom`/`sendto`/`write`. Because a stage always works on a
//! whole [`PacketBatch`], these functions are where `recvmmsg`/`sendmmsg`, UDP GSO/GRO and TUN
//! offloads (`IFF_VNET_HDR`) go, without changing the processing stage.

use std::io::{self, ErrorKind};
use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tun_rs::SyncDevice;

use super::batch::{MAX_PACKET_LEN, PacketBatch};

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

/// Fills `batch` with the IP packets waiting on the TUN, without blocking.
pub(crate) fn read_tun(tun: &SyncDevice, batch: &mut PacketBatch) -> io::Result<()> {
    while let Some(slot) = batch.free_slot() {
        // Reading into at most `MAX_PACKET_LEN` bytes leaves room to encrypt in the same slot
        // size; a longer packet (an MTU raised behind our back) is truncated and then dropped
        // by the IP length check.
        match tun.recv(&mut slot[..MAX_PACKET_LEN]) {
            Ok(len) => batch.commit(len, None),
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Fills `batch` with the datagrams waiting on the socket, without blocking.
pub(crate) fn read_udp(socket: &UdpSocket, batch: &mut PacketBatch) -> io::Result<()> {
    while let Some(slot) = batch.free_slot() {
        match socket.recv_from(slot) {
            Ok((len, source)) => batch.commit(len, Some(source)),
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) if is_transient(&error) => tracing::debug!(%error, "UDP receive error"),
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Sends every datagram of `batch` to its address, waiting for room in the socket buffer
/// rather than dropping when it is full.
pub(crate) fn write_udp(socket: &UdpSocket, batch: &PacketBatch, waker: &Waker) -> io::Result<()> {
    for (datagram, destination) in batch.iter() {
        loop {
            match socket.send_to(datagram, destination) {
                Ok(_) => break,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    if waker.wait(Some(socket.as_fd()), PollFlags::POLLOUT, None)? == Wake::Stopping {
                        return Ok(());
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) if is_transient(&error) => {
                    tracing::debug!(%error, %destination, "UDP send error");
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}

/// Writes every IP packet of `batch` to the TUN.
pub(crate) fn write_tun(tun: &SyncDevice, batch: &PacketBatch, waker: &Waker) -> io::Result<()> {
    for (packet, _) in batch.iter() {
        loop {
            match tun.send(packet) {
                Ok(_) => break,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    if waker.wait(Some(tun.as_fd()), PollFlags::POLLOUT, None)? == Wake::Stopping {
                        return Ok(());
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) if is_transient(&error) => {
                    tracing::debug!(%error, "TUN write error");
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}
