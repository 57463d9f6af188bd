//! The device proxy: the only listener of a device, bound to its tunnel address.
//!
//! Every connection comes from an edge: the source address must be one of the edges' addresses
//! ([`EdgeSources`], replaceable while the proxy runs; anything else is closed at once), and the stream starts with a PROXY protocol v2
//! header carrying the real client address. Then the ClientHello is read and its SNI name
//! chooses the route (a name without a route is closed before any handshake); rustls
//! terminates TLS with that name's certificate, and the connection is served either as
//! HTTP/1.1 or HTTP/2 (ALPN; reverse proxied to the workload, see [`http`]) or, for raw
//! applications, without ALPN, spliced as plaintext TCP to the workload. The workload is reached
//! at its port on the address its driver gives ([`SleepTable::address`], asked per request after
//! any wake): `127.0.0.1` for processes and containers, the guest's own address for a microVM,
//! so two microVMs listening on one port never meet.
//!
//! - [`edgible::proxy_protocol`]: the pure PROXY v2 codec, shared with the edge that encodes it.
//! - [`tls`]: the certificate store, swappable while connections run, and the SNI resolver.
//! - [`http`]: the reverse proxy service.
//! - [`access`]: the access policies every HTTP request passes first (login sessions, API keys,
//!   short codes); raw TCP is spliced only for public applications.
//! - `idle`: the raw mode's splice with an idle timeout.
//! - `counted`: the byte counting of usage, around the decrypted stream.
//!
//! Applications with a sleep policy ([`crate::sleep`]): each served connection is counted as
//! open activity for its application while it lasts, each request (or raw connection) as a
//! request, and the bytes of the decrypted stream both ways; a request (or raw connection) to a
//! sleeping application waits for its wake, shared with every other request arriving during
//! it, and gets 503 (a small page) when the wake fails or times out.
//!
//! Migrations set a gate per application in the same table ([`crate::sleep::Gate`]): a
//! quiesced application's requests get 503 with `Retry-After: 1` and `Connection: close` (raw
//! connections are closed at once), a draining one's HTTP/1 answers carry `Connection: close`;
//! requests (until their body is sent) and raw connections count as in flight meanwhile.

pub mod access;
mod counted;
pub mod http;
mod idle;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edgible::proxy_protocol::{self, Command, FIXED_LEN, Header, ProxyV2Error, Transport};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

pub use self::access::{AccessControl, AccessSettings, AccessTable, ApplicationGate};
pub use self::tls::{CertificateError, CertificateStore};
use crate::sleep::{Counters, SleepTable};

/// Why the proxy could not start.
#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// How the proxy listens and how long it waits.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The address to listen on: the device's tunnel address and port 443 in production.
    pub listen: SocketAddr,
    /// The only source addresses accepted at first: the tunnel addresses of the pool's edges.
    /// The set can be replaced while the proxy runs, through [`Proxy::edges`].
    pub edges: HashSet<IpAddr>,
    /// How long a new connection may take to send its PROXY header and finish the TLS
    /// handshake.
    pub handshake_timeout: Duration,
    /// How long the proxy waits to connect to the workload before answering 502.
    pub connect_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send request headers (also on a kept-alive
    /// connection, which bounds idle connections), and the HTTP/2 keep-alive ping interval and
    /// timeout that close dead connections.
    pub header_timeout: Duration,
    /// How long a raw TCP connection may carry no byte in either direction before it is
    /// closed.
    pub idle_timeout: Duration,
}

impl ProxyConfig {
    /// Defaults for the timeouts: 10 s handshake, 5 s connect, 30 s headers, 5 min raw idle.
    pub fn new(listen: SocketAddr, edges: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            listen,
            edges: edges.into_iter().collect(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Where the connections of a hostname go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The workload's port (on the address its driver gives, see the module documentation).
    pub port: u16,
    /// Splice the decrypted stream as raw TCP instead of speaking HTTP.
    pub raw_tcp: bool,
}

/// The route table, hostname (or `*.`-wildcard) to [`Route`], which the reconciler updates
/// while connections run; each connection looks its route up once, from its ClientHello.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<String, Route>>,
}

impl RouteTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn insert(&self, hostname: &str, route: Route) {
        self.write().insert(hostname.to_ascii_lowercase(), route);
    }

    pub fn remove(&self, hostname: &str) -> bool {
        self.write().remove(&hostname.to_ascii_lowercase()).is_some()
    }

    /// Replaces the whole table at once, so that no connection sees half an update.
    pub fn replace(&self, routes: impl IntoIterator<Item = (String, Route)>) {
        let routes = routes.into_iter().map(|(name, route)| (name.to_ascii_lowercase(), route)).collect();
        *self.write() = routes;
    }

    pub fn find(&self, hostname: &str) -> Option<Route> {
        let routes = self.routes.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        tls::lookup(&routes, hostname).copied()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
        // Every write is one map operation, so a poisoned lock still guards a consistent map.
        self.routes.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The source addresses the proxy accepts connections from (the edges' tunnel addresses),
/// replaced as a whole when the pool's edges change; each connection is checked once, at
/// accept, so connections from an edge that went away are not cut.
#[derive(Debug, Default)]
pub struct EdgeSources {
    addresses: RwLock<Arc<HashSet<IpAddr>>>,
}

impl EdgeSources {
    pub fn new(addresses: impl IntoIterator<Item = IpAddr>) -> Arc<Self> {
        Arc::new(Self { addresses: RwLock::new(Arc::new(addresses.into_iter().collect())) })
    }

    pub fn replace(&self, addresses: impl IntoIterator<Item = IpAddr>) {
        let addresses = Arc::new(addresses.into_iter().collect());
        // Replacing one pointer cannot leave the set half-written, so a poisoned lock is fine.
        *self.addresses.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = addresses;
    }

    pub fn contains(&self, address: &IpAddr) -> bool {
        self.snapshot().contains(address)
    }

    pub fn snapshot(&self) -> Arc<HashSet<IpAddr>> {
        Arc::clone(&self.addresses.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// Counters of what happened to connections and requests, for metrics and tests.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Connections from an address that is not an edge, closed without reading.
    pub refused_source: AtomicU64,
    /// Connections without a valid PROXY v2 header (or too slow to send one).
    pub bad_proxy_header: AtomicU64,
    /// Failed or timed out TLS handshakes, including unknown SNI names.
    pub tls_failed: AtomicU64,
    /// Handshakes for a name that has a certificate but no route.
    pub no_route: AtomicU64,
    /// Connections that reached HTTP or raw TCP serving.
    pub served_connections: AtomicU64,
    /// HTTP requests received.
    pub requests: AtomicU64,
    /// Requests answered 421 because Host did not match SNI.
    pub misdirected: AtomicU64,
    /// Requests answered 502 because the workload could not be reached.
    pub bad_gateway: AtomicU64,
    /// Requests the access policies answered instead of the workload (refusals, logins,
    /// redirects, the short-code form).
    pub access_answered: AtomicU64,
    /// Raw TCP connections closed because their application has an access policy.
    pub raw_refused: AtomicU64,
}

impl ProxyMetrics {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A bound proxy, ready to [`Proxy::run`].
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// What every connection task needs.
struct Shared {
    config: ProxyConfig,
    edges: Arc<EdgeSources>,
    tls: tls::ServerConfigs,
    routes: Arc<RouteTable>,
    access: Arc<AccessControl>,
    metrics: Arc<ProxyMetrics>,
    /// Kept-alive connections to the workloads.
    upstream: http::Upstream,
    /// Sleep, wake and usage counting per application; an empty table knows no application.
    sleep: Arc<SleepTable>,
}

impl Proxy {
    /// Binds the listener; certificates and routes are read from `certificates` and `routes`
    /// at each connection, so both may change while the proxy runs. Every application is
    /// public (identity headers are still stripped); see [`Proxy::bind_with_access`].
    pub async fn bind(
        config: ProxyConfig,
        certificates: Arc<CertificateStore>,
        routes: Arc<RouteTable>,
    ) -> Result<Self, ProxyError> {
        let access = AccessControl::new(access::cookies::CookieKey::random());
        Self::bind_with_access(config, certificates, routes, access).await
    }

    /// [`Proxy::bind_with_access`], with sleep, wake and usage counting through `sleep`.
    pub async fn bind_with_sleep(
        config: ProxyConfig,
        certificates: Arc<CertificateStore>,
        routes: Arc<RouteTable>,
        access: Arc<AccessControl>,
        sleep: Arc<SleepTable>,
    ) -> Result<Self, ProxyError> {
        let mut proxy = Self::bind_with_access(config, certificates, routes, access).await?;
        // Just built: nothing else holds the shared part yet.
        if let Some(shared) = Arc::get_mut(&mut proxy.shared) {
            shared.sleep = sleep;
        }
        Ok(proxy)
    }

    /// [`Proxy::bind`], with every request checked against `access`, whose table may be
    /// replaced while the proxy runs.
    pub async fn bind_with_access(
        config: ProxyConfig,
        certificates: Arc<CertificateStore>,
        routes: Arc<RouteTable>,
        access: Arc<AccessControl>,
    ) -> Result<Self, ProxyError> {
        let tls = tls::server_configs(certificates)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Bind { address: config.listen, source })?;
        let shared = Shared {
            edges: EdgeSources::new(config.edges.iter().copied()),
            upstream: http::upstream(config.connect_timeout),
            config,
            tls,
            routes,
            access,
            metrics: Arc::new(ProxyMetrics::default()),
            sleep: SleepTable::new(crate::driver::Wake::new()),
        };
        Ok(Self { listener, shared: Arc::new(shared) })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        self.shared.metrics.clone()
    }

    /// The accepted source addresses, which start as [`ProxyConfig::edges`] and may be
    /// replaced while the proxy runs.
    pub fn edges(&self) -> Arc<EdgeSources> {
        self.shared.edges.clone()
    }

    /// Accepts connections until `shutdown` turns true (or its sender is dropped). Running
    /// connections are not awaited: they end with their clients or their timeouts.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if !self.shared.edges.contains(&peer.ip()) {
                            ProxyMetrics::count(&self.shared.metrics.refused_source);
                            debug!(%peer, "refused a connection from an address that is not an edge");
                            drop(stream);
                            continue;
                        }
                        tokio::spawn(serve_connection(self.shared.clone(), stream, peer));
                    }
                    // Accept errors (too many open files, a connection reset before accept)
                    // concern one connection or are transient; back off a little and go on.
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                // The guard `wait_for` returns is not `Send`; drop it inside the branch future.
                _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => return,
            }
        }
    }
}

/// Reads exactly the PROXY v2 header from `stream`, so that the TLS bytes behind it stay in the
/// socket for rustls.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<Header, std::io::Error> {
    let invalid = |error: ProxyV2Error| std::io::Error::new(std::io::ErrorKind::InvalidData, error);
    let mut fixed = [0u8; FIXED_LEN];
    stream.read_exact(&mut fixed).await?;
    let total = proxy_protocol::header_len(&fixed).map_err(invalid)?;
    let mut header = vec![0u8; total];
    header[..FIXED_LEN].copy_from_slice(&fixed);
    stream.read_exact(&mut header[FIXED_LEN..]).await?;
    // `header_len` and `decode` read the same length field, so the complete buffer is never
    // reported incomplete; were it, the error would close the connection like any other.
    Ok(proxy_protocol::decode(&header).map_err(invalid)?.header)
}

/// The client a connection serves: the source address of a `PROXY` header relaying a TCP
/// connection over IPv4 or IPv6, else (`LOCAL`, a health check of the edge itself, or a family
/// or transport that is not a TCP client: UNSPEC, UNIX, UDP) the connection's own `peer`.
fn client_address(header: &Header, peer: SocketAddr) -> SocketAddr {
    match (header.command, header.transport, header.addresses.source()) {
        (Command::Proxy, Transport::Stream, Some(source)) => source,
        _ => peer,
    }
}

/// Why a TLS handshake did not complete.
#[derive(Debug, Error)]
enum HandshakeError {
    #[error("the ClientHello names no server")]
    NoServerName,
    #[error("no route for {0}")]
    NoRoute(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the ClientHello, finds the route of its SNI name, and completes the handshake with the
/// configuration that route needs (ALPN for HTTP, none for raw TCP).
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
) -> Result<(TlsStream<TcpStream>, String, Route), HandshakeError> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    let server_name = start.client_hello().server_name().map(str::to_owned).ok_or(HandshakeError::NoServerName)?;
    let route = shared.routes.find(&server_name).ok_or_else(|| HandshakeError::NoRoute(server_name.clone()))?;
    let config = shared.tls.select(route.raw_tcp, start.client_hello().cipher_suites());
    let tls = start.into_stream(config.clone()).await?;
    Ok((tls, server_name, route))
}

async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let metrics = &shared.metrics;
    // One deadline for the PROXY header and the TLS handshake together.
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let header = match tokio::time::timeout_at(deadline, read_proxy_header(&mut stream)).await {
        Ok(Ok(header)) => header,
        Ok(Err(error)) => {
            ProxyMetrics::count(&metrics.bad_proxy_header);
            debug!(%peer, %error, "closed a connection without a valid PROXY v2 header");
            return;
        }
        Err(_) => {
            ProxyMetrics::count(&metrics.bad_proxy_header);
            debug!(%peer, "closed a connection that sent no PROXY v2 header in time");
            return;
        }
    };
    let client = client_address(&header, peer);
    let _ = stream.set_nodelay(true);
    let (tls, server_name, route) = match tokio::time::timeout_at(deadline, handshake(&shared, stream)).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(HandshakeError::NoRoute(server_name))) => {
            ProxyMetrics::count(&metrics.no_route);
            debug!(%client, %server_name, "no route for the name");
            return;
        }
        Ok(Err(error)) => {
            ProxyMetrics::count(&metrics.tls_failed);
            debug!(%client, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            ProxyMetrics::count(&metrics.tls_failed);
            debug!(%client, "TLS handshake timed out");
            return;
        }
    };
    if route.raw_tcp && !shared.access.allows_raw(&server_name) {
        ProxyMetrics::count(&metrics.raw_refused);
        warn!(%client, %server_name, "closed a raw TCP connection: its application has an access policy, which needs HTTP");
        return;
    }
    ProxyMetrics::count(&metrics.served_connections);
    let application = shared.sleep.lookup(&server_name);
    let guard = application.as_ref().map(|(application_id, _)| shared.sleep.open(*application_id));
    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let tls = counted::Counted::new(tls, application.as_ref().map(|(_, counters)| counters.clone()));
    if route.raw_tcp {
        let mut in_flight = None;
        if let Some((application_id, counters)) = &application {
            if shared.sleep.gate(*application_id) == crate::sleep::Gate::Refuse {
                debug!(%client, %server_name, "closed a raw connection: its application is quiesced for a migration");
                return;
            }
            in_flight = Some(crate::sleep::InFlight::new(counters.clone()));
            Counters::add(&counters.requests, 1);
            if let Err(error) = shared.sleep.ensure_awake(*application_id).await {
                warn!(%client, %server_name, %error, "closed a raw connection: its application did not wake");
                return;
            }
        }
        let host = match &application {
            Some((application_id, _)) => shared.sleep.address(*application_id),
            None => Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        };
        let Some(host) = host else {
            debug!(%client, %server_name, "closed a raw connection: no workload runs for it");
            return;
        };
        splice_raw(tls, SocketAddr::new(host, route.port), &shared.config, client).await;
        drop(in_flight);
        drop(guard);
        return;
    }
    let application_id = application.as_ref().map(|(application_id, _)| *application_id);
    let service = http::ProxyService::new(http::RequestContext {
        server_name,
        client,
        port: route.port,
        upstream: shared.upstream.clone(),
        metrics: shared.metrics.clone(),
        access: shared.access.clone(),
        sleep: application.map(|(application_id, counters)| http::Sleeper {
            table: shared.sleep.clone(),
            application_id,
            counters,
        }),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(shared.config.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(shared.config.header_timeout)
        .keep_alive_timeout(shared.config.header_timeout);
    let io = TokioIo::new(tls);
    let connection = builder.serve_connection_with_upgrades(
        io,
        hyper::service::service_fn(move |request| {
            let service = service.clone();
            async move { service.handle(request).await }
        }),
    );
    let mut connection = std::pin::pin!(connection);
    // When a migration quiesces or drains the application, an HTTP/2 connection ends
    // gracefully (GOAWAY: the client retries any stream the server did not take), so clients
    // reconnect, through the edge, to wherever the application runs next. An HTTP/1.1
    // connection is not closed while idle, as the client may be sending a request at that very
    // moment and could not tell whether it was received; it ends with its next answer, which
    // carries `Connection: close` (see `http::ProxyService::handle`).
    let mut gates = application_id.filter(|_| http2).map(|_| shared.sleep.gate_changes());
    let result = loop {
        let gate_changed = async {
            match gates.as_mut() {
                Some(gates) => gates.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => break result,
            open = gate_changed => {
                let closing = application_id.is_some_and(|id| shared.sleep.gate(id) != crate::sleep::Gate::Open);
                if !open || closing {
                    if closing {
                        connection.as_mut().graceful_shutdown();
                    }
                    gates = None;
                }
            }
        }
    };
    if let Err(error) = result {
        debug!(%client, %error, "HTTP connection ended with an error");
    }
    drop(guard);
}

/// Raw mode: the decrypted stream is copied to and from the workload until both sides close
/// or the connection idles out.
async fn splice_raw(
    tls: counted::Counted<tokio_rustls::server::TlsStream<TcpStream>>,
    workload: SocketAddr,
    config: &ProxyConfig,
    client: SocketAddr,
) {
    let upstream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(workload)).await;
    let upstream = match upstream {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            debug!(%client, %workload, %error, "workload refused a raw connection");
            return;
        }
        Err(_) => {
            debug!(%client, %workload, "connecting to the workload timed out");
            return;
        }
    };
    if let Err(error) = idle::copy_bidirectional_with_idle_timeout(tls, upstream, config.idle_timeout).await {
        debug!(%client, %error, "raw connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use edgible::proxy_protocol::{Addresses, decode, encode, encode_tcp};

    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn proxy_header_client_address_or_the_connection_fallback() {
        let peer = address("100.64.0.1:40000");
        let tcp = encode_tcp(address("203.0.113.7:51234"), address("100.64.0.2:443"));
        assert_eq!(client_address(&decode(&tcp).unwrap().header, peer), address("203.0.113.7:51234"));
        let tcp6 = encode_tcp(address("[2001:db8::1]:51234"), address("[2001:db8::2]:443"));
        assert_eq!(client_address(&decode(&tcp6).unwrap().header, peer), address("[2001:db8::1]:51234"));

        // LOCAL, even with an address block (which the decoder skips).
        assert_eq!(client_address(&Header::local(), peer), peer);
        let mut local = tcp.clone();
        local[12] = 0x20;
        assert_eq!(client_address(&decode(&local).unwrap().header, peer), peer);
        // UDP over IPv4 is not a TCP client we could report.
        let mut udp = tcp.clone();
        udp[13] = 0x12;
        assert_eq!(client_address(&decode(&udp).unwrap().header, peer), peer);
        // UNSPEC and UNIX carry no IP address.
        let mut unspec = tcp;
        unspec[13] = 0x01;
        assert_eq!(client_address(&decode(&unspec).unwrap().header, peer), peer);
        let unix = Header {
            command: Command::Proxy,
            transport: Transport::Stream,
            addresses: Addresses::Unix { source: b"/run/a.sock".to_vec(), destination: b"/run/b.sock".to_vec() },
            tlvs: Vec::new(),
        };
        assert_eq!(client_address(&decode(&encode(&unix).unwrap()).unwrap().header, peer), peer);
    }
}
