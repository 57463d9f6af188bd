//! One connection on the TLS port, from its first byte to its close: peek the ClientHello,
//! route it by server name, then either refuse it with a TLS alert or splice it, still
//! encrypted, to the device that serves the name.
//!
//! The ClientHello is read into a buffer bounded by the parser's limit
//! ([`MAX_CLIENT_HELLO_LEN`]) within a deadline for the whole hello, so a client trickling
//! bytes (slowloris) is dropped at the deadline however it paces them. The buffered bytes are
//! not consumed: after the PROXY v2 header they are the first bytes the device reads, exactly
//! as the client sent them, and the device's TLS server does the real handshake.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use edgible::proxy_protocol;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::alert::{AlertDescription, fatal_alert_record};
use crate::metrics::{Metrics, Outcome, SpliceEnd};
use crate::route_source::SharedRoutes;
use crate::sni::{MAX_CLIENT_HELLO_LEN, ServerName, SniError, parse_client_hello};

/// How long a refused client may keep its connection after the alert, so that the alert is
/// read rather than lost to a reset (closing a socket with unread input resets it).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// How many bytes a refused client may still send during the linger before it is cut off.
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;

/// The first capacity of a connection's ClientHello buffer.
const INITIAL_HELLO_BUFFER: usize = 4096;

/// The timing and target port of spliced connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceConfig {
    /// The time a client has, from accept, to send its complete ClientHello.
    pub hello_timeout: Duration,
    /// The time to connect to the device before refusing the client with `internal_error`.
    pub connect_timeout: Duration,
    /// A spliced connection is closed when no byte moved either way for this long.
    pub idle_timeout: Duration,
    /// The port of the device's TLS proxy on its tunnel address.
    pub target_port: u16,
}

impl Default for SpliceConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(300),
            target_port: 443,
        }
    }
}

/// Why no routing decision came out of the first bytes.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the ClientHello was refused: {0}")]
    Parse(#[from] SniError),
    #[error("the ClientHello did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("the client closed the connection after {0} bytes, before its ClientHello was complete")]
    Closed(usize),
    #[error("reading the ClientHello failed: {0}")]
    Io(#[from] io::Error),
}

/// The bytes read so far and the routing decision they allow.
pub struct ClientHello {
    /// Every byte read from the client, forwarded verbatim to the device.
    pub bytes: Vec<u8>,
    pub server_name: Option<ServerName>,
}

/// Reads from `stream` until its beginning is a complete ClientHello, or refused, or the
/// deadline passes. Never buffers more than [`MAX_CLIENT_HELLO_LEN`] bytes.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<ClientHello, HelloError> {
    // Most first flights fit in a few KiB; the buffer only grows towards the bound for the
    // rare big one, so that many clients in their hello phase cost little memory.
    let mut buffer = Vec::with_capacity(INITIAL_HELLO_BUFFER);
    let read = async {
        loop {
            match parse_client_hello(&buffer) {
                Err(error) if error.is_incomplete() => {}
                Ok(server_name) => return Ok(server_name),
                Err(error) => return Err(HelloError::Parse(error)),
            }
            let room = MAX_CLIENT_HELLO_LEN.saturating_sub(buffer.len());
            if room == 0 {
                // The parser answers within its bound, so a full buffer is always decided;
                // this keeps the loop finite should that ever change.
                return Err(HelloError::Parse(SniError::TooLarge { limit: MAX_CLIENT_HELLO_LEN }));
            }
            if buffer.len() == buffer.capacity() {
                buffer.reserve_exact(buffer.capacity().min(room));
            }
            let read = (&mut *stream).take(room as u64).read_buf(&mut buffer).await?;
            if read == 0 {
                return Err(HelloError::Closed(buffer.len()));
            }
        }
    };
    let server_name = tokio::time::timeout(timeout, read).await.map_err(|_| HelloError::Timeout(timeout))??;
    Ok(ClientHello { bytes: buffer, server_name })
}

/// Routes connections on the TLS port. One per edge, shared by every connection task.
pub struct Forwarder {
    config: SpliceConfig,
    routes: SharedRoutes,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    pub fn new(config: SpliceConfig, routes: SharedRoutes, metrics: Arc<Metrics>) -> Self {
        Self { config, routes, metrics }
    }

    /// Handles one accepted connection to its end and answers (and counts) what became of
    /// it. `local` is the address the client connected to, reported to the device as the
    /// PROXY header's destination.
    pub async fn handle(&self, mut client: TcpStream, peer: SocketAddr, local: SocketAddr) -> Outcome {
        let _ = client.set_nodelay(true);
        let hello = match read_client_hello(&mut client, self.config.hello_timeout).await {
            Ok(hello) => hello,
            Err(error) => {
                let outcome = match &error {
                    HelloError::Parse(parse) => {
                        let outcome = Outcome::for_parse_error(parse);
                        self.refuse(client, AlertDescription::for_parse_error(parse), outcome, peer).await;
                        return outcome;
                    }
                    HelloError::Timeout(_) => Outcome::HelloTimeout,
                    HelloError::Closed(_) => Outcome::ClientClosed,
                    HelloError::Io(_) => Outcome::ClientError,
                };
                tracing::debug!(%peer, %error, "connection abandoned before its ClientHello");
                self.metrics.count(outcome);
                return outcome;
            }
        };
        let Some(server_name) = hello.server_name else {
            return self.refuse(client, AlertDescription::UnrecognizedName, Outcome::NoServerName, peer).await;
        };

        // The snapshot is dropped before splicing: a long connection must not pin an old
        // table in memory.
        let (target, wildcard) = {
            let table = self.routes.current();
            match table.lookup(server_name.as_str()) {
                Some(matched) => (matched.route.target, matched.wildcard),
                None => {
                    tracing::debug!(%peer, server_name = %server_name, "no route for the server name");
                    return self.refuse(client, AlertDescription::UnrecognizedName, Outcome::UnknownName, peer).await;
                }
            }
        };
        if !target.online {
            tracing::debug!(%peer, server_name = %server_name, device = %target.device_id, "the device is offline");
            return self.refuse(client, AlertDescription::InternalError, Outcome::DeviceOffline, peer).await;
        }

        let address = SocketAddr::new(IpAddr::V4(target.tunnel_address), self.config.target_port);
        let device = match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(device)) => device,
            Ok(Err(error)) => {
                tracing::debug!(%peer, server_name = %server_name, device = %target.device_id, %address, %error, "cannot connect to the device");
                return self.refuse(client, AlertDescription::InternalError, Outcome::DeviceUnreachable, peer).await;
            }
            Err(_) => {
                tracing::debug!(%peer, server_name = %server_name, device = %target.device_id, %address, "connecting to the device timed out");
                return self.refuse(client, AlertDescription::InternalError, Outcome::DeviceUnreachable, peer).await;
            }
        };
        let _ = device.set_nodelay(true);
        let outcome = if wildcard { Outcome::RoutedWildcard } else { Outcome::Routed };
        self.metrics.count(outcome);
        tracing::debug!(%peer, server_name = %server_name, device = %target.device_id, %address, "splicing");

        let guard = self.metrics.splice_started();
        let end = self.splice(client, device, peer, local, &hello.bytes).await;
        tracing::debug!(%peer, server_name = %server_name, end = end.label(), "spliced connection closed");
        guard.finish(end);
        outcome
    }

    /// Writes the PROXY header and the buffered hello to the device, then copies both ways
    /// until both directions ended, an error, or the idle timeout.
    async fn splice(
        &self,
        client: TcpStream,
        mut device: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        hello: &[u8],
    ) -> SpliceEnd {
        let mut first = proxy_protocol::encode_tcp(peer, local);
        first.extend_from_slice(hello);
        if device.write_all(&first).await.is_err() {
            return SpliceEnd::Error;
        }
        self.metrics.add_client_to_device(hello.len() as u64);

        let activity = Activity::new();
        let mut client =
            Metered { inner: client, activity: &activity, count: |bytes| self.metrics.add_client_to_device(bytes) };
        let mut device =
            Metered { inner: device, activity: &activity, count: |bytes| self.metrics.add_device_to_client(bytes) };
        // `copy_bidirectional` handles half-close: when one side ends its stream, it shuts
        // down the write side of the other and keeps copying the opposite direction.
        let copy = tokio::io::copy_bidirectional(&mut client, &mut device);
        tokio::pin!(copy);
        loop {
            let deadline = activity.last() + self.config.idle_timeout;
            tokio::select! {
                result = &mut copy => return if result.is_ok() { SpliceEnd::Completed } else { SpliceEnd::Error },
                () = tokio::time::sleep_until(deadline) => {
                    if activity.last() + self.config.idle_timeout <= Instant::now() {
                        return SpliceEnd::IdleTimeout;
                    }
                }
            }
        }
    }

    /// Sends a fatal alert, closes the connection and counts the outcome.
    async fn refuse(
        &self,
        mut client: TcpStream,
        description: AlertDescription,
        outcome: Outcome,
        peer: SocketAddr,
    ) -> Outcome {
        self.metrics.count(outcome);
        tracing::debug!(%peer, reason = outcome.labels().1, alert = description.code(), "refusing the connection");
        let record = fatal_alert_record(description);
        // Bounded as a whole, so a client that never reads nor closes cannot hold the task.
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            client.write_all(&record).await?;
            client.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut discarded = 0;
            while discarded < REFUSAL_LINGER_BYTES {
                let read = client.read(&mut sink).await?;
                if read == 0 {
                    break;
                }
                discarded += read;
            }
            Ok::<_, io::Error>(())
        })
        .await;
        outcome
    }
}

/// When bytes last moved on a spliced connection, shared by both directions.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write that moved bytes.
    last_millis: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_millis: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_millis.load(Ordering::Relaxed))
    }
}

/// A stream that records activity on every read or write that moves bytes, and counts the
/// bytes read from it.
struct Metered<'a, S, F> {
    inner: S,
    activity: &'a Activity,
    count: F,
}

impl<S: AsyncRead + Unpin, F: Fn(u64) + Unpin> AsyncRead for Metered<'_, S, F> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity.touch();
            (self.count)(read as u64);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for Metered<'_, S, F> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = poll
            && written > 0
        {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::AsyncWriteExt as _;

    use super::*;

    const RUSTLS_HELLO: &[u8] = include_bytes!("../testdata/rustls.bin");

    #[tokio::test]
    async fn a_hello_split_across_reads_is_reassembled() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in RUSTLS_HELLO.chunks(7) {
                client.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let hello = read_client_hello(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(hello.server_name.unwrap().as_str(), "rustls.example.test");
        assert_eq!(hello.bytes, RUSTLS_HELLO);
        drop(writer.await.unwrap());
    }

    /// A single-record ClientHello for `name`, padded to exactly `len` bytes on the wire.
    fn padded_hello(name: &[u8], len: usize) -> Vec<u8> {
        let mut server_name = vec![0, 0];
        let list_len = u16::try_from(name.len() + 3).unwrap();
        server_name.extend_from_slice(&(list_len + 2).to_be_bytes());
        server_name.extend_from_slice(&list_len.to_be_bytes());
        server_name.push(0);
        server_name.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        server_name.extend_from_slice(name);
        let fixed = 2 + 32 + 1 + 4 + 2 + 2;
        let padding = len - 5 - 4 - fixed - server_name.len() - 4;
        let mut extensions = server_name;
        extensions.extend_from_slice(&[0, 21]);
        extensions.extend_from_slice(&u16::try_from(padding).unwrap().to_be_bytes());
        extensions.resize(extensions.len() + padding, 0);

        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&extensions);
        let body_len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut message = vec![1, body_len[1], body_len[2], body_len[3]];
        message.extend_from_slice(&body);
        let mut record = vec![22, 3, 1];
        record.extend_from_slice(&u16::try_from(message.len()).unwrap().to_be_bytes());
        record.extend_from_slice(&message);
        assert_eq!(record.len(), len);
        record
    }

    #[tokio::test]
    async fn a_hello_of_exactly_the_bound_is_read_whole() {
        let hello = padded_hello(b"big.example.test", MAX_CLIENT_HELLO_LEN);
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut stream = hello.clone();
        // Bytes after the hello (early data) may be read along with it, never past the bound.
        stream.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        let writer = tokio::spawn(async move {
            client.write_all(&stream).await.unwrap();
            client
        });
        let read = read_client_hello(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(read.server_name.unwrap().as_str(), "big.example.test");
        assert_eq!(read.bytes, hello);
        drop(writer.await.unwrap());

        let small = padded_hello(b"small.example.test", 600);
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&small).await.unwrap();
        let read = read_client_hello(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(read.bytes, small);
        assert!(read.bytes.capacity() <= INITIAL_HELLO_BUFFER);
    }

    #[tokio::test]
    async fn a_closed_or_silent_client_gives_up() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&RUSTLS_HELLO[..10]).await.unwrap();
        drop(client);
        assert!(matches!(read_client_hello(&mut server, Duration::from_secs(10)).await, Err(HelloError::Closed(10))));

        let (_client, mut server) = tokio::io::duplex(64);
        let silent = read_client_hello(&mut server, Duration::from_millis(50)).await;
        assert!(matches!(silent, Err(HelloError::Timeout(_))));
    }

    #[tokio::test]
    async fn garbage_is_refused_without_waiting() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let error = read_client_hello(&mut server, Duration::from_secs(10)).await.err().unwrap();
        assert!(matches!(error, HelloError::Parse(SniError::NotHandshake { .. })), "{error}");
    }
}
