//! The proxy reaches each workload at the address its driver gives (through the sleep table's
//! [`WorkloadAddresses`]), asked per request: two workloads on the same port at two addresses
//! are each served under their own hostname, HTTP and raw TCP alike; an application whose
//! workload has no address gets 502 (HTTP) or a closed connection (raw), never whatever else
//! listens on the port. The "guest" addresses are loopback ones (127.0.0.2, 127.0.0.3), which
//! Linux routes without set-up.

#![allow(clippy::unwrap_used)]

#[path = "support/harness.rs"]
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edgible::model::{Application, ApplicationId};
use edgible_agent::proxy::{AccessControl, CertificateStore, Proxy, ProxyConfig, Route, RouteTable};
use edgible_agent::sleep::{SleepTable, WorkloadAddresses};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Addresses a test sets and changes: what the drivers would answer.
#[derive(Default)]
struct Addresses(Mutex<HashMap<ApplicationId, IpAddr>>);

impl Addresses {
    fn set(&self, application_id: ApplicationId, address: Option<Ipv4Addr>) {
        let mut map = self.0.lock().unwrap();
        match address {
            Some(address) => map.insert(application_id, IpAddr::V4(address)),
            None => map.remove(&application_id),
        };
    }
}

impl WorkloadAddresses for Addresses {
    fn address(&self, application_id: ApplicationId) -> Option<IpAddr> {
        self.0.lock().unwrap().get(&application_id).copied()
    }
}

/// An HTTP workload on `address` answering every request with `name`; also a raw one when
/// `raw`: it writes `name` and a newline, then closes.
async fn workload(address: SocketAddr, name: &'static str, raw: bool) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if raw {
                    let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
                    return;
                }
                let service = hyper::service::service_fn(move |_request| async move {
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(name))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    }))
}

struct Fixture {
    proxy: SocketAddr,
    client: Arc<ClientConfig>,
    addresses: Arc<Addresses>,
    _stop: watch::Sender<bool>,
}

/// A proxy serving `applications` (each with a certificate for its hostname, raw TCP for those
/// named in `raw`), their workloads found through the test's [`Addresses`].
async fn fixture(applications: &[Application], raw: &[&str]) -> Result<Fixture> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_der: CertificateDer<'static> = ca_params.self_signed(&ca_key)?.der().clone();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let certificates = CertificateStore::new();
    let routes = RouteTable::new();
    for application in applications {
        let name = application.spec.hostnames[0].as_str().to_owned();
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec![name.clone()])?.signed_by(&key, &issuer)?;
        certificates.insert_pem(&name, leaf.pem().as_bytes(), key.serialize_pem().as_bytes())?;
        let raw_tcp = raw.contains(&application.spec.name.as_str());
        routes.insert(&name, Route { port: application.spec.port, raw_tcp });
    }
    let sleep = SleepTable::new(edgible_agent::driver::Wake::new());
    sleep.set_applications(applications);
    let addresses = Arc::new(Addresses::default());
    sleep.set_addresses(Arc::clone(&addresses) as Arc<dyn WorkloadAddresses>);
    let mut config = ProxyConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    config.connect_timeout = Duration::from_secs(2);
    let access = AccessControl::new(edgible_agent::proxy::access::cookies::CookieKey::random());
    let proxy = Proxy::bind_with_sleep(config, certificates, routes, access, sleep).await?;
    let address = proxy.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(proxy.run(stopped));
    let mut roots = RootCertStore::empty();
    roots.add(ca_der)?;
    let mut client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Fixture { proxy: address, client: Arc::new(client), addresses, _stop: stop })
}

impl Fixture {
    /// A TLS connection to `host` as an edge opens it (PROXY v2 header first).
    async fn connect(&self, host: &str, alpn: bool) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut stream = TcpStream::connect(self.proxy).await?;
        let SocketAddr::V4(destination) = self.proxy else { anyhow::bail!("IPv4 only") };
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7]);
        header.extend_from_slice(&destination.ip().octets());
        header.extend_from_slice(&50123u16.to_be_bytes());
        header.extend_from_slice(&destination.port().to_be_bytes());
        stream.write_all(&header).await?;
        let mut config = (*self.client).clone();
        if !alpn {
            config.alpn_protocols.clear();
        }
        let connector = TlsConnector::from(Arc::new(config));
        Ok(tokio::time::timeout(TIMEOUT, connector.connect(ServerName::try_from(host.to_owned())?, stream)).await??)
    }

    /// An HTTP/1.1 client connection to `host`, for several requests.
    async fn http(&self, host: &str) -> Result<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>> {
        let tls = self.connect(host, true).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// The status and body of one GET on `sender`.
    async fn get(
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
        host: &str,
    ) -> Result<(u16, String)> {
        let request = hyper::Request::get("/").header("host", host).body(Empty::new())?;
        let response = tokio::time::timeout(TIMEOUT, sender.send_request(request)).await??;
        let status = response.status().as_u16();
        let body = tokio::time::timeout(TIMEOUT, response.into_body().collect()).await??.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// What a raw connection to `host` received before it closed.
    async fn raw(&self, host: &str) -> Result<String> {
        let mut tls = self.connect(host, false).await?;
        let mut received = Vec::new();
        // A close without TLS close_notify is an error to rustls; what arrived still counts.
        let _ = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut received)).await?;
        Ok(String::from_utf8_lossy(&received).into_owned())
    }
}

fn application(name: &str, port: u16) -> Application {
    support::application(name, 1, json!({"port": port, "workload": {"process": {"command": "/bin/true"}}}))
}

fn free_port() -> Result<u16> {
    // Free on all three addresses: a port free on 127.0.0.1 is almost always free on the others,
    // and a bind failure names the address.
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
const GUEST_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const GUEST_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

#[tokio::test]
async fn two_workloads_on_one_port_are_reached_each_at_its_own_address() -> Result<()> {
    let port = free_port()?;
    let (a, b) = (application("tenant-a", port), application("tenant-b", port));
    let fixture = fixture(&[a.clone(), b.clone()], &[]).await?;
    // Something else of the host's listens on the port on 127.0.0.1: nobody must reach it.
    let _host = workload(SocketAddr::from((LOOPBACK, port)), "the host's", false).await?;
    let _a = workload(SocketAddr::from((GUEST_A, port)), "tenant a", false).await?;
    let _b = workload(SocketAddr::from((GUEST_B, port)), "tenant b", false).await?;
    let (host_a, host_b) = ("tenant-a.example.test", "tenant-b.example.test");

    // Not running yet: 502, not the host's service.
    let mut to_a = fixture.http(host_a).await?;
    let (status, body) = Fixture::get(&mut to_a, host_a).await?;
    ensure!(status == 502 && !body.contains("the host's"), "{status} {body}");

    fixture.addresses.set(a.id, Some(GUEST_A));
    fixture.addresses.set(b.id, Some(GUEST_B));
    let mut to_b = fixture.http(host_b).await?;
    for _ in 0..3 {
        assert_eq!(Fixture::get(&mut to_a, host_a).await?, (200, "tenant a".to_owned()));
        assert_eq!(Fixture::get(&mut to_b, host_b).await?, (200, "tenant b".to_owned()));
    }

    // A's workload moves (a restarted microVM gets another address): the next request on the
    // same client connection goes to the new address; B's is unchanged.
    let _moved = workload(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 4), port)), "tenant a, moved", false).await?;
    fixture.addresses.set(a.id, Some(Ipv4Addr::new(127, 0, 0, 4)));
    assert_eq!(Fixture::get(&mut to_a, host_a).await?, (200, "tenant a, moved".to_owned()));
    assert_eq!(Fixture::get(&mut to_b, host_b).await?, (200, "tenant b".to_owned()));

    // Gone (stopped): 502 again.
    fixture.addresses.set(a.id, None);
    let (status, body) = Fixture::get(&mut to_a, host_a).await?;
    ensure!(status == 502 && body.contains("not running"), "{status} {body}");
    Ok(())
}

#[tokio::test]
async fn raw_connections_go_to_the_workloads_address() -> Result<()> {
    let port = free_port()?;
    let (a, b) = (application("raw-a", port), application("raw-b", port));
    let fixture = fixture(&[a.clone(), b.clone()], &["raw-a", "raw-b"]).await?;
    let _host = workload(SocketAddr::from((LOOPBACK, port)), "the host's", true).await?;
    let _a = workload(SocketAddr::from((GUEST_A, port)), "raw a", true).await?;
    let _b = workload(SocketAddr::from((GUEST_B, port)), "raw b", true).await?;
    fixture.addresses.set(a.id, Some(GUEST_A));
    fixture.addresses.set(b.id, Some(GUEST_B));
    assert_eq!(fixture.raw("raw-a.example.test").await?, "raw a\n");
    assert_eq!(fixture.raw("raw-b.example.test").await?, "raw b\n");
    fixture.addresses.set(b.id, None);
    assert_eq!(fixture.raw("raw-b.example.test").await?, "", "no workload: closed, not the host's service");
    Ok(())
}
