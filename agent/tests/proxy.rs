//! The device proxy over real loopback sockets: a real rustls/hyper client that sends a PROXY v2
//! header first, the proxy, and a workload on 127.0.0.1 that reports what it received.

// The fixtures below are test code outside `#[test]` functions, where `clippy.toml`'s
// `allow-unwrap-in-tests` does not reach; a failed setup is a test failure with a message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use edgible_agent::proxy::{CertificateStore, Proxy, ProxyConfig, ProxyMetrics, Route, RouteTable};
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

const APP: &str = "app.example.test";
const TIMEOUT: Duration = Duration::from_secs(30);
/// The client address the "edge" claims in its PROXY header.
const CLIENT: &str = "203.0.113.7:50123";
const MIB: usize = 1024 * 1024;
const LARGE_CHUNKS: usize = 50;

type TestBody = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A test CA issuing leaf certificates, and client configurations trusting it.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Edgible proxy test CA");
        let ca = params.self_signed(&key).unwrap().der().clone();
        Self { issuer: Issuer::new(params, key), ca }
    }

    /// A new leaf (fresh key) for `name`: (chain PEM, key PEM, leaf DER).
    fn leaf(&self, name: &str) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let certificate = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem(), certificate.der().clone())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

/// An HTTP workload on 127.0.0.1:0 with an echo, a streaming upload sink, a streaming download
/// source and a WebSocket echo.
struct Workload {
    port: u16,
    /// Bytes of the current upload received so far.
    uploaded: watch::Receiver<usize>,
    /// Lets the download continue after its first chunk.
    release_download: Arc<Notify>,
}

#[derive(Clone)]
struct WorkloadState {
    uploaded: Arc<watch::Sender<usize>>,
    release_download: Arc<Notify>,
}

async fn start_workload() -> Workload {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (uploaded, uploaded_rx) = watch::channel(0);
    let state = WorkloadState { uploaded: Arc::new(uploaded), release_download: Arc::new(Notify::new()) };
    let release_download = state.release_download.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| workload(state.clone(), request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Workload { port, uploaded: uploaded_rx, release_download }
}

async fn workload(state: WorkloadState, mut request: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let response = match path.as_str() {
        "/upload" => {
            let mut body = request.into_body();
            let mut hasher = Sha256::new();
            let mut length = 0;
            state.uploaded.send_replace(0);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    hasher.update(&data);
                    length += data.len();
                    state.uploaded.send_replace(length);
                }
            }
            text(format!("{length} {}", hex(&hasher.finalize())))
        }
        "/download" => {
            let chunks: Vec<Bytes> = (0..LARGE_CHUNKS).map(large_chunk).collect();
            let mut hasher = Sha256::new();
            chunks.iter().for_each(|chunk| hasher.update(chunk));
            let digest = hex(&hasher.finalize());
            let (mut sender, receiver) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
            let release = state.release_download.clone();
            tokio::spawn(async move {
                for (index, chunk) in chunks.into_iter().enumerate() {
                    if sender.send(Ok(Frame::data(chunk))).await.is_err() {
                        return;
                    }
                    // The rest only comes once the client saw the first chunk: a proxy that
                    // buffered whole bodies would never deliver it.
                    if index == 0 {
                        release.notified().await;
                    }
                }
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(receiver)));
            response.headers_mut().insert("x-sha256", digest.parse().unwrap());
            response
        }
        "/ws" => {
            let key = request.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else { return Ok(status(StatusCode::BAD_REQUEST)) };
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() || message.is_binary() {
                        if socket.send(message).await.is_err() {
                            return;
                        }
                    } else if message.is_close() {
                        return;
                    }
                }
            });
            let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, "upgrade".parse().unwrap());
            headers.insert(header::UPGRADE, "websocket".parse().unwrap());
            headers.insert("sec-websocket-accept", accept.parse().unwrap());
            response
        }
        // Everything else echoes what the workload saw, as JSON.
        _ => {
            let headers: BTreeMap<String, String> = request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.to_str().unwrap_or("?").to_owned()))
                .collect();
            let echo = serde_json::json!({
                "path": request.uri().to_string(),
                "version": format!("{:?}", request.version()),
                "headers": headers,
            });
            text(echo.to_string())
        }
    };
    Ok(response)
}

fn text(body: String) -> Response<TestBody> {
    Response::new(Full::new(Bytes::from(body)).boxed())
}

fn status(status: StatusCode) -> Response<TestBody> {
    let mut response = Response::new(Empty::new().boxed());
    *response.status_mut() = status;
    response
}

/// A 1 MiB chunk whose content depends on its index, so that a lost or reordered chunk changes
/// the checksum.
fn large_chunk(index: usize) -> Bytes {
    let mut state = (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut chunk = vec![0u8; MIB];
    for word in chunk.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    Bytes::from(chunk)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The proxy and its clients
// ---------------------------------------------------------------------------------------------

struct Fixture {
    proxy: SocketAddr,
    certificates: Arc<CertificateStore>,
    routes: Arc<RouteTable>,
    metrics: Arc<ProxyMetrics>,
    pki: Pki,
    workload: Workload,
    _shutdown: watch::Sender<bool>,
}

/// A proxy accepting only 127.0.0.1 (our "edge") with `app.example.test` routed to a fresh
/// workload.
async fn fixture() -> Fixture {
    fixture_with_edges([IpAddr::V4(Ipv4Addr::LOCALHOST)]).await
}

async fn fixture_with_edges(edges: impl IntoIterator<Item = IpAddr>) -> Fixture {
    fixture_with(edges, |_| {}).await
}

async fn fixture_with(edges: impl IntoIterator<Item = IpAddr>, adjust: impl FnOnce(&mut ProxyConfig)) -> Fixture {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new();
    let certificates = CertificateStore::new();
    let (chain, key, _) = pki.leaf(APP);
    certificates.insert_pem(APP, chain.as_bytes(), key.as_bytes()).unwrap();
    let workload = start_workload().await;
    let routes = RouteTable::new();
    routes.insert(APP, Route { port: workload.port, raw_tcp: false });
    let mut config = ProxyConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), edges);
    config.connect_timeout = Duration::from_secs(2);
    adjust(&mut config);
    let proxy = Proxy::bind(config, certificates.clone(), routes.clone()).await.unwrap();
    let address = proxy.local_addr().unwrap();
    let metrics = proxy.metrics();
    let (shutdown, shutdown_rx) = watch::channel(false);
    tokio::spawn(proxy.run(shutdown_rx));
    Fixture { proxy: address, certificates, routes, metrics, pki, workload, _shutdown: shutdown }
}

/// A PROXY v2 header for a TCP/IPv4 connection from `source` to `destination`.
fn proxy_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        panic!("the test header is IPv4 only");
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&source.ip().octets());
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

impl Fixture {
    /// Connects like the edge does: the PROXY header, then the client's TLS.
    async fn connect(&self, server_name: &str, alpn: &[&[u8]]) -> Result<TlsStream<TcpStream>> {
        let mut stream = TcpStream::connect(self.proxy).await?;
        stream.write_all(&proxy_header(CLIENT.parse()?, self.proxy)).await?;
        let connector = TlsConnector::from(self.pki.client_config(alpn));
        let name = ServerName::try_from(server_name.to_owned())?;
        let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, stream)).await??;
        Ok(tls)
    }

    async fn http1(&self, server_name: &str) -> Result<hyper::client::conn::http1::SendRequest<TestBody>> {
        let tls = self.connect(server_name, &[b"http/1.1"]).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

fn get(host: &str, path: &str) -> Request<TestBody> {
    Request::get(path).header(header::HOST, host).body(Empty::new().boxed()).unwrap()
}

async fn body_text(response: Response<Incoming>) -> Result<String> {
    let bytes = tokio::time::timeout(TIMEOUT, response.into_body().collect()).await??.to_bytes();
    Ok(String::from_utf8(bytes.to_vec())?)
}

async fn echo(response: Response<Incoming>) -> Result<serde_json::Value> {
    ensure!(response.status() == StatusCode::OK, "status {}", response.status());
    Ok(serde_json::from_str(&body_text(response).await?)?)
}

/// Waits until `condition` holds, checking every few milliseconds, failing after [`TIMEOUT`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) -> Result<()> {
    tokio::time::timeout(TIMEOUT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .with_context(|| format!("timed out waiting for {what}"))
}

/// Whether the proxy closed `stream` without sending anything.
async fn closed_silently(mut stream: TcpStream) -> Result<bool> {
    let mut buffer = [0u8; 64];
    match tokio::time::timeout(TIMEOUT, stream.read(&mut buffer)).await? {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        // A reset is a close too: the proxy dropped the socket with unread data.
        Err(_) => Ok(true),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http1_is_routed_by_sni_with_forwarded_headers_and_no_forged_identity() -> Result<()> {
    let fixture = fixture().await;
    // A second application under a wildcard certificate, on its own workload.
    let other = start_workload().await;
    let (chain, key, _) = fixture.pki.leaf("*.apps.example.test");
    fixture.certificates.insert_pem("*.apps.example.test", chain.as_bytes(), key.as_bytes())?;
    fixture.routes.insert("*.apps.example.test", Route { port: other.port, raw_tcp: false });

    let mut sender = fixture.http1(APP).await?;
    let request = Request::get("/echo?x=1")
        .header(header::HOST, APP)
        .header("x-edgible-user", "admin@example.test")
        .header("X-Edgible-Email", "admin@example.test")
        .header("x-forwarded-for", "192.0.2.66")
        .header(header::CONNECTION, "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("x-kept", "yes")
        .body(Empty::new().boxed())?;
    let seen = echo(sender.send_request(request).await?).await?;
    assert_eq!(seen["path"], "/echo?x=1");
    let headers = &seen["headers"];
    assert_eq!(headers["host"], APP);
    assert_eq!(headers["x-forwarded-for"], "203.0.113.7");
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-forwarded-host"], APP);
    assert_eq!(headers["x-kept"], "yes");
    for stripped in ["x-edgible-user", "x-edgible-email", "x-hop"] {
        assert!(headers.get(stripped).is_none(), "{stripped} reached the workload: {headers}");
    }
    // The same connection keeps working (keep-alive).
    let seen = echo(sender.send_request(get(APP, "/again")).await?).await?;
    assert_eq!(seen["path"], "/again");

    // The wildcard name reaches the other workload, which never saw `/echo?x=1`.
    let mut sender = fixture.http1("w1.apps.example.test").await?;
    let seen = echo(sender.send_request(get("w1.apps.example.test:443", "/other")).await?).await?;
    assert_eq!(seen["path"], "/other");
    assert_eq!(seen["headers"]["host"], "w1.apps.example.test:443");
    Ok(())
}

#[tokio::test]
async fn http2_is_routed_by_sni() -> Result<()> {
    let fixture = fixture().await;
    let tls = fixture.connect(APP, &[b"h2", b"http/1.1"]).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake::<_, _, TestBody>(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request =
        Request::get(format!("https://{APP}/h2?y=2")).header("x-edgible-user", "forged").body(Empty::new().boxed())?;
    let response = sender.send_request(request).await?;
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = echo(response).await?;
    assert_eq!(seen["path"], "/h2?y=2");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["host"], APP);
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(seen["headers"]["x-forwarded-host"], APP);
    assert!(seen["headers"].get("x-edgible-user").is_none());

    // An authority that is not the SNI name is misdirected on HTTP/2 as well.
    let request = Request::get("https://other.example.test/").body(Empty::new().boxed())?;
    let response = sender.send_request(request).await?;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    Ok(())
}

#[tokio::test]
async fn host_not_matching_sni_is_misdirected() -> Result<()> {
    let fixture = fixture().await;
    let mut sender = fixture.http1(APP).await?;
    let response = sender.send_request(get("other.example.test", "/")).await?;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    body_text(response).await?;
    assert_eq!(fixture.metrics.misdirected.load(Ordering::Relaxed), 1);
    // The connection stays usable for the right host.
    echo(sender.send_request(get(APP, "/")).await?).await?;
    Ok(())
}

#[tokio::test]
async fn workload_down_is_a_502_page() -> Result<()> {
    let fixture = fixture().await;
    let unused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = unused.local_addr()?.port();
    drop(unused);
    fixture.routes.insert(APP, Route { port, raw_tcp: false });
    let mut sender = fixture.http1(APP).await?;
    let response = sender.send_request(get(APP, "/")).await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(body_text(response).await?.contains("502 Bad gateway"));
    assert_eq!(fixture.metrics.bad_gateway.load(Ordering::Relaxed), 1);
    Ok(())
}

/// A workload that answers every request with how many connections it accepted so far; its
/// accept loop and connections end when the returned handle is aborted.
async fn counting_workload(
    listener: TcpListener,
) -> (Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let count = counter.fetch_add(1, Ordering::SeqCst) + 1;
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |_request| async move {
                    Ok::<_, Infallible>(text(format!("connection {count}")))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (accepted, task)
}

#[tokio::test]
async fn workload_connections_are_reused_and_a_restarted_workload_is_reached_again() -> Result<()> {
    let fixture = fixture().await;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = listener.local_addr()?.port();
    let (accepted, workload) = counting_workload(listener).await;
    fixture.routes.insert(APP, Route { port, raw_tcp: false });

    // Requests in turn, over two client connections: one connection to the workload serves all.
    for _ in 0..2 {
        let mut sender = fixture.http1(APP).await?;
        for _ in 0..5 {
            let response = sender.send_request(get(APP, "/")).await?;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_text(response).await?, "connection 1");
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the workload connection was kept alive and reused");

    // The workload restarts on its port: the pooled connection it closed is not a 502.
    workload.abort();
    let _ = workload.await;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let (accepted, _workload) = counting_workload(listener).await;
    let mut sender = fixture.http1(APP).await?;
    let response = sender.send_request(get(APP, "/")).await?;
    assert_eq!(response.status(), StatusCode::OK, "a restarted workload is reached on a new connection");
    assert_eq!(body_text(response).await?, "connection 1");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(fixture.metrics.bad_gateway.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test]
async fn large_upload_streams_through() -> Result<()> {
    let mut fixture = fixture().await;
    let mut sender = fixture.http1(APP).await?;
    let (mut body, receiver) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    let request = Request::post("/upload").header(header::HOST, APP).body(BodyExt::boxed(StreamBody::new(receiver)))?;
    let response = tokio::spawn(async move { sender.send_request(request).await });

    let mut hasher = Sha256::new();
    for index in 0..LARGE_CHUNKS {
        let chunk = large_chunk(index);
        hasher.update(&chunk);
        body.send(Ok(Frame::data(chunk))).await?;
        // The workload must see the first chunk while the rest is not even produced yet.
        if index == 0 {
            tokio::time::timeout(TIMEOUT, fixture.workload.uploaded.wait_for(|length| *length > 0))
                .await
                .context("the first chunk of the upload did not reach the workload")??;
        }
    }
    drop(body);
    let response = tokio::time::timeout(TIMEOUT, response).await???;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await?, format!("{} {}", LARGE_CHUNKS * MIB, hex(&hasher.finalize())));
    Ok(())
}

#[tokio::test]
async fn large_download_streams_through() -> Result<()> {
    let fixture = fixture().await;
    let mut sender = fixture.http1(APP).await?;
    let response = sender.send_request(get(APP, "/download")).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let expected = response.headers()["x-sha256"].to_str()?.to_owned();
    let mut body = response.into_body();
    let mut hasher = Sha256::new();
    let mut length = 0;
    let mut released = false;
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame()).await.context("download stalled")? {
        if let Ok(data) = frame?.into_data() {
            hasher.update(&data);
            length += data.len();
            if !released {
                fixture.workload.release_download.notify_one();
                released = true;
            }
        }
    }
    assert_eq!(length, LARGE_CHUNKS * MIB);
    assert_eq!(hex(&hasher.finalize()), expected);
    Ok(())
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() -> Result<()> {
    let fixture = fixture().await;
    let tls = fixture.connect(APP, &[b"http/1.1"]).await?;
    let (mut socket, response) = tokio_tungstenite::client_async(format!("wss://{APP}/ws"), tls).await?;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "through the proxy"] {
        socket.send(Message::text(text)).await?;
        let echoed = tokio::time::timeout(TIMEOUT, socket.next()).await?.context("socket closed")??;
        assert_eq!(echoed, Message::text(text));
    }
    let binary = vec![7u8; 200_000];
    socket.send(Message::binary(binary.clone())).await?;
    let echoed = tokio::time::timeout(TIMEOUT, socket.next()).await?.context("socket closed")??;
    assert_eq!(echoed.into_data().to_vec(), binary);
    socket.close(None).await?;
    Ok(())
}

/// Starts a TCP echo server and routes `raw.example.test` to it in raw mode.
async fn route_raw_echo(fixture: &Fixture) -> Result<()> {
    let echo_server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = echo_server.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo_server.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    let (chain, key, _) = fixture.pki.leaf("raw.example.test");
    fixture.certificates.insert_pem("raw.example.test", chain.as_bytes(), key.as_bytes())?;
    fixture.routes.insert("raw.example.test", Route { port, raw_tcp: true });
    Ok(())
}

#[tokio::test]
async fn raw_tcp_mode_splices_plaintext() -> Result<()> {
    let fixture = fixture().await;
    route_raw_echo(&fixture).await?;

    let mut tls = fixture.connect("raw.example.test", &[]).await?;
    tls.write_all(b"PING not http at all\n").await?;
    let mut buffer = [0u8; 21];
    tokio::time::timeout(TIMEOUT, tls.read_exact(&mut buffer)).await??;
    assert_eq!(&buffer, b"PING not http at all\n");
    // Half-close passes through: the echo server sees EOF and closes, and so do we.
    tls.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    Ok(())
}

#[tokio::test]
async fn raw_tcp_mode_negotiates_no_alpn_while_http_names_get_h2() -> Result<()> {
    let fixture = fixture().await;
    route_raw_echo(&fixture).await?;

    // A client offering h2 to a raw application must not believe the workload speaks it.
    let mut tls = fixture.connect("raw.example.test", &[b"h2", b"http/1.1"]).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"still raw\n").await?;
    let mut buffer = [0u8; 10];
    tokio::time::timeout(TIMEOUT, tls.read_exact(&mut buffer)).await??;
    assert_eq!(&buffer, b"still raw\n");

    let tls = fixture.connect(APP, &[b"h2", b"http/1.1"]).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    Ok(())
}

#[tokio::test]
async fn a_name_without_a_route_is_closed_before_the_handshake() -> Result<()> {
    let fixture = fixture().await;
    // A certificate exists for the name, but no route: nothing to serve, no handshake.
    let (chain, key, _) = fixture.pki.leaf("unrouted.example.test");
    fixture.certificates.insert_pem("unrouted.example.test", chain.as_bytes(), key.as_bytes())?;
    assert!(fixture.connect("unrouted.example.test", &[]).await.is_err());
    wait_until("a connection counted as without a route", || fixture.metrics.no_route.load(Ordering::Relaxed) == 1)
        .await?;
    assert_eq!(fixture.metrics.tls_failed.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test]
async fn connections_from_other_addresses_are_refused() -> Result<()> {
    // Only 127.0.0.9 is an edge; the test connects from 127.0.0.1.
    let fixture = fixture_with_edges([IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]).await;
    let mut stream = TcpStream::connect(fixture.proxy).await?;
    stream.write_all(&proxy_header(CLIENT.parse()?, fixture.proxy)).await.ok();
    assert!(closed_silently(stream).await?);
    assert_eq!(fixture.metrics.refused_source.load(Ordering::Relaxed), 1);
    assert!(fixture.connect(APP, &[]).await.is_err());
    assert_eq!(fixture.metrics.served_connections.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test]
async fn missing_or_bad_proxy_header_is_refused() -> Result<()> {
    let fixture = fixture().await;
    // TLS straight away, as a client that bypassed the edge would.
    let stream = TcpStream::connect(fixture.proxy).await?;
    let connector = TlsConnector::from(fixture.pki.client_config(&[]));
    assert!(connector.connect(ServerName::try_from(APP)?, stream).await.is_err());
    // Plain HTTP.
    let mut stream = TcpStream::connect(fixture.proxy).await?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n").await?;
    assert!(closed_silently(stream).await?);
    // A valid signature with a bad version byte.
    let mut header = proxy_header(CLIENT.parse()?, fixture.proxy);
    header[12] = 0x31;
    let mut stream = TcpStream::connect(fixture.proxy).await?;
    stream.write_all(&header).await?;
    assert!(closed_silently(stream).await?);
    let metrics = fixture.metrics.clone();
    wait_until("three bad headers counted", || metrics.bad_proxy_header.load(Ordering::Relaxed) == 3).await?;
    assert_eq!(fixture.metrics.served_connections.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test]
async fn unknown_sni_fails_the_handshake() -> Result<()> {
    let fixture = fixture().await;
    assert!(fixture.connect("unknown.example.test", &[]).await.is_err());
    let metrics = fixture.metrics.clone();
    wait_until("the unknown name counted", || metrics.no_route.load(Ordering::Relaxed) == 1).await?;
    assert_eq!(metrics.served_connections.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test]
async fn certificate_hot_swap_keeps_open_connections() -> Result<()> {
    let fixture = fixture().await;
    let old_tls = fixture.connect(APP, &[b"http/1.1"]).await?;
    let old_leaf = old_tls.get_ref().1.peer_certificates().context("no peer certificate")?[0].clone();
    let (mut old_sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(old_tls)).await?;
    tokio::spawn(connection);
    echo(old_sender.send_request(get(APP, "/before")).await?).await?;

    let (chain, key, new_leaf) = fixture.pki.leaf(APP);
    assert_ne!(new_leaf, old_leaf);
    fixture.certificates.insert_pem(APP, chain.as_bytes(), key.as_bytes())?;

    // The open connection keeps working after the swap.
    let seen = echo(old_sender.send_request(get(APP, "/after")).await?).await?;
    assert_eq!(seen["path"], "/after");
    // A new connection gets the new certificate.
    let new_tls = fixture.connect(APP, &[b"http/1.1"]).await?;
    let served = new_tls.get_ref().1.peer_certificates().context("no peer certificate")?[0].clone();
    assert_eq!(served, new_leaf);
    // Removing the name stops new handshakes for it.
    assert!(fixture.certificates.remove(APP));
    assert!(fixture.connect(APP, &[]).await.is_err());
    Ok(())
}

#[tokio::test]
async fn idle_http1_connections_are_closed_after_the_header_timeout() -> Result<()> {
    let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let fixture = fixture_with(localhost, |config| config.header_timeout = Duration::from_millis(300)).await;
    let tls = fixture.connect(APP, &[b"http/1.1"]).await?;
    let (mut sender, mut connection) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tls)).await?;
    // Drive the connection only while the request runs, then watch it end on its own while
    // the sender is still held (the client never closes it).
    let response = tokio::select! {
        response = sender.send_request(get(APP, "/first")) => response?,
        ended = &mut connection => anyhow::bail!("connection ended early: {ended:?}"),
    };
    echo(response).await?;
    // The proxy drops the connection without a TLS close_notify, which the client reports as an
    // error; either way the connection has ended.
    let ended = tokio::time::timeout(TIMEOUT, connection).await.context("the idle connection was never closed")?;
    if let Err(error) = ended {
        ensure!(error.to_string().contains("connection error"), "unexpected end: {error}");
    }
    drop(sender);
    Ok(())
}

#[tokio::test]
async fn idle_raw_connections_are_closed() -> Result<()> {
    let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let fixture = fixture_with(localhost, |config| config.idle_timeout = Duration::from_millis(300)).await;
    route_raw_echo(&fixture).await?;
    let mut tls = fixture.connect("raw.example.test", &[]).await?;
    tls.write_all(b"ping").await?;
    let mut buffer = [0u8; 4];
    tokio::time::timeout(TIMEOUT, tls.read_exact(&mut buffer)).await??;
    // Then nothing: the proxy ends the connection on its own (a bare close, so the client may
    // report a missing close_notify).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut rest)).await.context("never closed")?;
    assert!(rest.is_empty(), "unexpected data {rest:?} ({ended:?})");
    Ok(())
}
