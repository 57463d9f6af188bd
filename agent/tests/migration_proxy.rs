//! The proxy's side of migrations, through the real proxy over TLS: a quiesced application's
//! requests get 503 with `Retry-After: 1` and `Connection: close`, a draining one's answers
//! carry `Connection: close` (so a kept-alive connection ends with its next answer), and a
//! request counts as in flight until its body is sent.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use edgible::model::Application;
use edgible_agent::driver::Wake;
use edgible_agent::proxy::{AccessControl, CertificateStore, Proxy, ProxyConfig, Route, RouteTable};
use edgible_agent::sleep::{Gate, SleepTable};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const HOST: &str = "moving.example.test";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A workload that answers `/slow` after a second and anything else at once.
async fn workload() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    if request.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"served\n"))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(port)
}

struct Fixture {
    application: Application,
    sleep: Arc<SleepTable>,
    proxy: SocketAddr,
    client: Arc<ClientConfig>,
    _stop: watch::Sender<bool>,
}

async fn fixture() -> Result<Fixture> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = workload().await?;
    let application: Application = serde_json::from_value(json!({
        "id": "00000000-0000-7000-8000-00000000aaaa",
        "organization_id": "00000000-0000-7000-8000-000000000001",
        "revision": 1,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "spec": {"name": "moving", "hostnames": [HOST], "port": port,
                 "workload": {"process": {"command": "/bin/true"}}},
    }))?;
    let sleep = SleepTable::new(Wake::new());
    sleep.set_applications([&application]);
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_der: CertificateDer<'static> = ca_params.self_signed(&ca_key)?.der().clone();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let certificates = CertificateStore::new();
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![HOST.to_owned()])?.signed_by(&key, &issuer)?;
    certificates.insert_pem(HOST, leaf.pem().as_bytes(), key.serialize_pem().as_bytes())?;
    let routes = RouteTable::new();
    routes.insert(HOST, Route { port, raw_tcp: false });
    let config = ProxyConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let access = AccessControl::new(edgible_agent::proxy::access::cookies::CookieKey::random());
    let proxy = Proxy::bind_with_sleep(config, certificates, routes, access, Arc::clone(&sleep)).await?;
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
    Ok(Fixture { application, sleep, proxy: address, client: Arc::new(client), _stop: stop })
}

impl Fixture {
    /// A kept-alive HTTP/1.1 connection, like an edge relays it (PROXY v2 header, then TLS),
    /// and the task driving it: the task ends when the connection does.
    async fn connect(
        &self,
    ) -> Result<(hyper::client::conn::http1::SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>)> {
        let mut stream = TcpStream::connect(self.proxy).await?;
        let SocketAddr::V4(destination) = self.proxy else { anyhow::bail!("IPv4 only") };
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7]);
        header.extend_from_slice(&destination.ip().octets());
        header.extend_from_slice(&50123u16.to_be_bytes());
        header.extend_from_slice(&destination.port().to_be_bytes());
        stream.write_all(&header).await?;
        let tls = TlsConnector::from(Arc::clone(&self.client)).connect(ServerName::try_from(HOST)?, stream).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((sender, driver))
    }

    /// One GET on a fresh connection.
    async fn get(&self, path: &str) -> Result<Response<Incoming>> {
        let (mut sender, _driver) = self.connect().await?;
        let request = Request::get(path).header("host", HOST).body(Empty::<Bytes>::new())?;
        Ok(tokio::time::timeout(TIMEOUT, sender.send_request(request)).await??)
    }
}

fn header(response: &Response<Incoming>, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
}

#[tokio::test]
async fn quiesce_refuses_drain_closes_and_requests_count_in_flight() -> Result<()> {
    let fixture = fixture().await?;
    let id = fixture.application.id;

    let open = fixture.get("/").await?;
    ensure!(open.status() == 200, "open: {}", open.status());
    ensure!(header(&open, "connection").is_none(), "kept alive while open");

    // A slow request is in flight until its answer has been sent.
    let slow = {
        let fixture = &fixture;
        async move {
            let response = fixture.get("/slow").await?;
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(body)
        }
    };
    let watch_in_flight = async {
        for _ in 0..100 {
            if fixture.sleep.in_flight(id) == 1 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("the slow request was never counted in flight")
    };
    let (body, counted) = tokio::join!(slow, watch_in_flight);
    counted?;
    ensure!(body? == Bytes::from_static(b"served\n"));
    for _ in 0..100 {
        if fixture.sleep.in_flight(id) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(fixture.sleep.in_flight(id) == 0, "nothing in flight once answered");

    fixture.sleep.set_gate(id, Gate::Close);
    let draining = fixture.get("/").await?;
    ensure!(draining.status() == 200, "draining still serves: {}", draining.status());
    ensure!(header(&draining, "connection").as_deref() == Some("close"), "draining ends connections");

    fixture.sleep.set_gate(id, Gate::Refuse);
    let refused = fixture.get("/").await?;
    ensure!(refused.status() == 503, "quiesced: {}", refused.status());
    ensure!(header(&refused, "retry-after").as_deref() == Some("1"));
    ensure!(header(&refused, "connection").as_deref() == Some("close"));
    ensure!(fixture.sleep.in_flight(id) == 0, "refused requests are not in flight");

    fixture.sleep.set_gate(id, Gate::Open);
    let resumed = fixture.get("/").await?;
    ensure!(resumed.status() == 200, "resumed: {}", resumed.status());
    let _ = resumed.into_body().collect().await.context("body")?;
    Ok(())
}

#[tokio::test]
async fn a_kept_alive_connection_ends_with_its_first_answer_once_draining() -> Result<()> {
    let fixture = fixture().await?;
    let (mut sender, driver) = fixture.connect().await?;
    let get = || Request::get("/").header("host", HOST).body(Empty::<Bytes>::new());
    let response = tokio::time::timeout(TIMEOUT, sender.send_request(get()?)).await??;
    ensure!(response.status() == 200 && header(&response, "connection").is_none(), "kept alive while open");
    let _ = response.into_body().collect().await?;

    // Draining: the idle connection is not cut (a request may be on its way), but its next
    // answer ends it, so the client's following request opens a new connection (through the
    // edge, to wherever the application runs next).
    fixture.sleep.set_gate(fixture.application.id, Gate::Close);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(!driver.is_finished(), "an idle HTTP/1.1 connection is not cut");
    let response = tokio::time::timeout(TIMEOUT, sender.send_request(get()?)).await??;
    ensure!(response.status() == 200, "draining still serves: {}", response.status());
    ensure!(header(&response, "connection").as_deref() == Some("close"), "and ends the connection");
    let _ = response.into_body().collect().await?;
    tokio::time::timeout(TIMEOUT, driver).await.context("the connection did not end")??;
    ensure!(fixture.sleep.open_connections(fixture.application.id) == 0, "no connection left open");
    Ok(())
}
