//! TLS session resumption through the edge, with the real device proxy behind it: the edge
//! splices the bytes, the agent's proxy (`edgible_agent::proxy`) terminates TLS. A returning
//! client resumes its session (no certificate, no signature: the cheap handshake that decides
//! how many new connections per second the path takes), still after hundreds of other clients
//! came in between; the server picks AES-128-GCM over a client's AES-256-GCM-first order, and
//! leaves ChaCha20-Poly1305 to a client that lists it first.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use edgible_agent::proxy::{CertificateStore, Proxy, ProxyConfig, Route, RouteTable};
use rustls::client::Resumption;
use rustls::crypto::ring::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CipherSuite, ClientConfig, HandshakeKind, RootCertStore};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::{TestEdge, WAIT, read_to_close, route, table, test_config};

const APP: &str = "resume.example.test";

/// More sessions than rustls' default stateful cache holds (256), so that only tickets the
/// proxy does not have to remember can resume after them.
const OTHER_CLIENTS: usize = 300;

/// A workload answering every `GET` on a connection with `200 ok` (the proxy keeps its
/// connections to the workload alive).
async fn workload() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|window| window == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => pending.extend_from_slice(&buffer[..read]),
                    }
                }
            });
        }
    });
    Ok(port)
}

/// The device's proxy on 127.0.0.1 (its "tunnel address"), accepting the edge on loopback,
/// with a certificate for [`APP`] from a fresh CA; returns the proxy's port, the CA and the
/// proxy's stop switch.
async fn device_proxy() -> anyhow::Result<(u16, CertificateDer<'static>, watch::Sender<bool>)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec![APP.to_owned()])?.signed_by(&leaf_key, &issuer)?;

    let certificates = CertificateStore::new();
    certificates.insert_pem(APP, leaf.pem().as_bytes(), leaf_key.serialize_pem().as_bytes())?;
    let routes = RouteTable::new();
    routes.insert(APP, Route { port: workload().await?, raw_tcp: false });
    let config = ProxyConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), [Ipv4Addr::LOCALHOST.into()]);
    let proxy = Proxy::bind(config, certificates, routes).await?;
    let port = proxy.local_addr()?.port();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(proxy.run(stopped));
    Ok((port, ca.der().clone(), stop))
}

fn client(ca: &CertificateDer<'static>, suites: Option<Vec<rustls::SupportedCipherSuite>>) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suites) = suites {
        provider.cipher_suites = suites;
    }
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("a valid CA certificate");
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One `GET /` with `Connection: close` through the edge, as the bench's `wrk` makes them;
/// returns how the handshake went and the suite it agreed on.
async fn get(edge: &TestEdge, config: &Arc<ClientConfig>) -> anyhow::Result<(HandshakeKind, CipherSuite)> {
    let stream: TcpStream = edge.connect().await?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let mut tls = tokio::time::timeout(WAIT, connector.connect(ServerName::try_from(APP)?, stream))
        .await
        .context("the handshake through the edge timed out")??;
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {APP}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    // Reading to the end also takes in the session ticket the proxy sends after the handshake.
    let answer = String::from_utf8(read_to_close(&mut tls).await?)?;
    ensure!(answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("ok"), "unexpected answer: {answer:?}");
    let (_, connection) = tls.get_ref();
    let kind = connection.handshake_kind().context("the handshake is complete")?;
    let suite = connection.negotiated_cipher_suite().context("a suite was agreed")?.suite();
    Ok((kind, suite))
}

#[tokio::test]
async fn a_returning_client_resumes_its_session_through_the_edge() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (proxy_port, ca, _stop) = device_proxy().await?;
    let edge = TestEdge::start(test_config(proxy_port), table(vec![route(APP, 1, Ipv4Addr::LOCALHOST, true)])).await?;

    // rustls' client lists AES-256-GCM first, as OpenSSL does; the proxy answers AES-128-GCM.
    let returning = client(&ca, None);
    assert_eq!(get(&edge, &returning).await?, (HandshakeKind::Full, CipherSuite::TLS13_AES_128_GCM_SHA256));
    assert_eq!(get(&edge, &returning).await?, (HandshakeKind::Resumed, CipherSuite::TLS13_AES_128_GCM_SHA256));

    // Many other clients, each with a full handshake and a ticket of its own.
    let mut others = client(&ca, None);
    Arc::make_mut(&mut others).resumption = Resumption::disabled();
    for _ in 0..OTHER_CLIENTS {
        assert_eq!(get(&edge, &others).await?.0, HandshakeKind::Full);
    }
    assert_eq!(get(&edge, &returning).await?.0, HandshakeKind::Resumed);

    // A client that leads with ChaCha20-Poly1305 (one without AES instructions) keeps it.
    let chacha =
        client(&ca, Some(vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256]));
    assert_eq!(get(&edge, &chacha).await?, (HandshakeKind::Full, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    assert_eq!(get(&edge, &chacha).await?, (HandshakeKind::Resumed, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    edge.stop().await
}
