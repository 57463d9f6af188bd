//! The harness of the data-path tests: an in-process edge on ephemeral loopback ports,
//! device backends, raw clients, and waits on conditions.
//!
//! Every route targets the same port (the edge's `target_port`) on a different loopback
//! address (127.0.0.1, 127.0.0.2, ...): Linux routes all of 127.0.0.0/8 to `lo`, so each
//! backend stands for one device's tunnel address, and none needs a fixed port.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use edgible::model::DeviceId;
use edgible::proxy_protocol::{self, Header};
use edgible_edge::acme_http::ChallengeStore;
use edgible_edge::limits::{ConnectionLimits, LimitsConfig};
use edgible_edge::metrics::Metrics;
use edgible_edge::route_source::SharedRoutes;
use edgible_edge::routes::{Route, RouteTable, RouteTarget};
use edgible_edge::server::{BoundAddresses, Edge, EdgeConfig};
use edgible_edge::splice::SpliceConfig;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single wait in these tests may take before it fails the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Captured ClientHellos (see `edge/testdata/README.md`).
pub mod hello {
    pub const CURL: &[u8] = include_bytes!("../../testdata/curl.bin"); // app.example.test
    pub const CURL_NO_SNI: &[u8] = include_bytes!("../../testdata/curl-no-sni.bin");
    pub const OPENSSL: &[u8] = include_bytes!("../../testdata/openssl.bin"); // api.example.test
    pub const OPENSSL_MIXED_CASE: &[u8] = include_bytes!("../../testdata/openssl-mixed-case.bin"); // mixed.example.test
    pub const CHROMIUM: &[u8] = include_bytes!("../../testdata/chromium.bin"); // www.example.test
    pub const RUSTLS_NO_SNI: &[u8] = include_bytes!("../../testdata/rustls-no-sni.bin");
}

/// The alert records the edge sends.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
pub const ALERT_INTERNAL_ERROR: [u8; 7] = [21, 3, 3, 0, 2, 2, 80];
pub const ALERT_DECODE_ERROR: [u8; 7] = [21, 3, 3, 0, 2, 2, 50];

/// Loopback addresses standing for device tunnel addresses, all listening (or bound) on one
/// shared port.
pub struct Devices {
    pub port: u16,
    /// Standard listeners in non-blocking mode, so that [`Devices::has_pending`] can ask the
    /// kernel directly whether a connection is queued.
    listeners: Vec<std::net::TcpListener>,
    /// Addresses bound on the port but not listening: connecting to one is refused at once,
    /// like a device whose proxy is down.
    pub unreachable: Vec<Ipv4Addr>,
    _reserved: Vec<TcpSocket>,
}

impl Devices {
    /// `listening` backends on 127.0.0.1, 127.0.0.2, ... and `unreachable` addresses after them.
    pub async fn bind(listening: u8, unreachable: u8) -> anyhow::Result<Self> {
        'attempt: for _ in 0..20 {
            let first = std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 1), 0))?;
            let port = first.local_addr()?.port();
            let mut listeners = vec![first];
            for index in 2..=listening {
                match std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, index), port)) {
                    Ok(listener) => listeners.push(listener),
                    // Another test holds this port on that address: pick another port.
                    Err(_) => continue 'attempt,
                }
            }
            for listener in &listeners {
                listener.set_nonblocking(true)?;
            }
            let mut reserved = Vec::new();
            let mut addresses = Vec::new();
            for index in listening + 1..=listening + unreachable {
                let address = Ipv4Addr::new(127, 0, 0, index);
                let socket = TcpSocket::new_v4()?;
                if socket.bind(SocketAddr::from((address, port))).is_err() {
                    continue 'attempt;
                }
                reserved.push(socket);
                addresses.push(address);
            }
            return Ok(Self { port, listeners, unreachable: addresses, _reserved: reserved });
        }
        bail!("no port was free on every loopback address")
    }

    pub fn address(&self, index: usize) -> Ipv4Addr {
        match self.listeners[index].local_addr().map(|address| address.ip()) {
            Ok(IpAddr::V4(ip)) => ip,
            other => panic!("backend {index} has no IPv4 address: {other:?}"),
        }
    }

    /// Accepts the next connection on backend `index`.
    pub async fn accept(&self, index: usize) -> anyhow::Result<TcpStream> {
        // A duplicate of the listening socket, registered with tokio for this one accept.
        let listener = TcpListener::from_std(self.listeners[index].try_clone()?)?;
        let (stream, _) =
            tokio::time::timeout(WAIT, listener.accept()).await.context("no connection reached the backend")??;
        Ok(stream)
    }

    /// Whether backend `index` has a connection queued (accepting it if so). The edge
    /// connects to a device before it answers the client, so a connection it made is queued
    /// by the time the client has the edge's answer.
    pub fn has_pending(&self, index: usize) -> bool {
        match self.listeners[index].accept() {
            Ok(_) => true,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(error) => panic!("accept on backend {index} failed: {error}"),
        }
    }
}

/// A device id for route `index` (stable, so route files and tables compare equal).
pub fn device_id(index: u8) -> DeviceId {
    format!("00000000-0000-7000-8000-0000000000{index:02x}").parse().expect("a valid id")
}

pub fn route(hostname: &str, index: u8, tunnel_address: Ipv4Addr, online: bool) -> Route {
    Route {
        hostname: hostname.parse().expect("a valid hostname"),
        target: RouteTarget { device_id: device_id(index), tunnel_address, online },
    }
}

pub fn table(routes: Vec<Route>) -> RouteTable {
    RouteTable::from_routes(routes).expect("no duplicate hostnames")
}

/// An edge running in this process on 127.0.0.1 ephemeral ports.
pub struct TestEdge {
    pub addresses: BoundAddresses,
    pub routes: SharedRoutes,
    pub challenges: ChallengeStore,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<ConnectionLimits>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Settings for tests: short timeouts so failures show quickly.
pub fn test_config(target_port: u16) -> EdgeConfig {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    EdgeConfig {
        listen_https: loopback,
        listen_http: loopback,
        admin: loopback,
        splice: SpliceConfig {
            hello_timeout: Duration::from_secs(5),
            // Longer than any refusal the tests expect to be quick, so that a refusal that
            // waited for this timeout fails them.
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            target_port,
        },
        limits: LimitsConfig::default(),
        // Tests stop their edge with connections still open; draining is tested on the
        // binary, with a long deadline.
        drain_timeout: Duration::from_millis(300),
    }
}

impl TestEdge {
    pub async fn start(config: EdgeConfig, routes: RouteTable) -> anyhow::Result<Self> {
        let shared = SharedRoutes::new(routes);
        let challenges = ChallengeStore::new();
        let edge = Edge::bind(config, shared.clone(), challenges.clone()).await?;
        let addresses = edge.addresses();
        let metrics = edge.metrics();
        let limits = edge.limits();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(edge.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self { addresses, routes: shared, challenges, metrics, limits, stop: Some(stop), task: Some(task) })
    }

    /// Signals shutdown and waits for the edge to finish draining.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.context("the edge did not stop")??;
        }
        Ok(())
    }

    pub async fn connect(&self) -> anyhow::Result<TcpStream> {
        let stream = TcpStream::connect(self.addresses.https).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Connects from a chosen loopback source address.
    pub async fn connect_from(&self, source: Ipv4Addr) -> anyhow::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        Ok(socket.connect(self.addresses.https).await?)
    }

    /// `GET path` on the admin port.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        let (status, _, body) = http_get(self.addresses.admin, "/metrics", "localhost").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Reads until the peer closes, with a deadline; a reset counts as a close.
pub async fn read_to_close<S: AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<Vec<u8>> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await
    .context("the connection was not closed")?;
    Ok(received)
}

/// Reads a PROXY v2 header and exactly `len` more bytes from a device-side connection.
pub async fn read_header_and(stream: &mut TcpStream, len: usize) -> anyhow::Result<(Header, Vec<u8>)> {
    let mut fixed = [0u8; proxy_protocol::FIXED_LEN];
    tokio::time::timeout(WAIT, stream.read_exact(&mut fixed)).await??;
    let mut header = fixed.to_vec();
    header.resize(proxy_protocol::header_len(&fixed)?, 0);
    tokio::time::timeout(WAIT, stream.read_exact(&mut header[proxy_protocol::FIXED_LEN..])).await??;
    let decoded = proxy_protocol::decode(&header)?;
    let mut rest = vec![0u8; len];
    tokio::time::timeout(WAIT, stream.read_exact(&mut rest)).await??;
    Ok((decoded.header, rest))
}

/// A minimal HTTP/1.1 GET over a fresh connection: status, raw header lines, body.
pub async fn http_get(address: SocketAddr, path: &str, host: &str) -> anyhow::Result<(u16, Vec<String>, String)> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let response = String::from_utf8(read_to_close(&mut stream).await?)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.lines();
    let status_line = lines.next().context("no status line")?;
    let status = status_line.split(' ').nth(1).context("no status")?.parse()?;
    Ok((status, lines.map(str::to_owned).collect(), body.to_owned()))
}

/// The value of a sample line (`name{labels} value`) in a Prometheus text body.
pub fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `condition` holds, checking every few milliseconds, up to [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
