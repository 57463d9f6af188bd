//! The agent's data path for real, in network namespaces: a device namespace runs the
//! [`DataPath`] (a real TUN interface, WireGuard, the proxy on the tunnel address, a workload on
//! 127.0.0.1), fed through its link as the push session would feed it, with this test playing
//! the server's CA; an edge namespace holds a plain tunnel peered with the device and connects
//! to the proxy through it (PROXY v2 header, TLS verified against the test CA, HTTP/1.1).
//! Then the device's underlay address changes, and the edge must see the device at its new
//! address within seconds (the data path nudges the tunnel), well before the 25 s keepalive.
//!
//! Needs root, iproute2 and iputils-ping; runs only with `EDGIBLE_ACC=1`. Addresses:
//! 192.0.2.0/24 between the namespaces, 100.64.0.0/24 inside the tunnel.

// Fixtures outside `#[test]` functions, where `clippy.toml`'s `allow-unwrap-in-tests` does not
// reach; a failed setup is a test failure with a message.
#![allow(clippy::unwrap_used)]

#[path = "../../sdk/tests/tunnel/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use edgible::model::{Application, EdgeId};
use edgible::protocol::v1::EdgePeer;
use edgible::tunnel::{PeerConfig, PrivateKey, PublicKey, Tunnel, TunnelConfig};
use edgible_agent::control::link::{IssuedCertificate, SessionLink, link};
use edgible_agent::datapath::{DataPath, DataPathConfig, DataPathStatus};
use edgible_agent::events::EventLog;
use edgible_agent::reconcile::{DesiredState, DesiredUpdate};
use edgible_agent::state::StateDir;
use rcgen::{BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use netns::{Namespace, is_heavy, key, link as veth, test_number, wait_until};

const APP: &str = "app.example.test";
const EDGE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const DEVICE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const PROXY_PORT: u16 = 443;
const TIMEOUT: Duration = Duration::from_secs(30);
const ANSWER: &str = "hello from the device";

/// The test's CA, signing the agent's CSRs as the server's internal CA does.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
}

impl TestCa {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Edgible data path test CA");
        let certificate = params.self_signed(&key).unwrap().der().clone();
        Self { issuer: Issuer::new(params, key), certificate }
    }

    fn sign(&self, csr_pem: &str) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

fn application(port: u16) -> Application {
    serde_json::from_value(serde_json::json!({
        "id": "00000000-0000-7000-8000-00000000a001",
        "organization_id": "00000000-0000-7000-8000-000000000001",
        "revision": 1,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "spec": {
            "name": "app",
            "hostnames": [APP],
            "port": port,
            "workload": {"process": {"command": "/bin/true"}},
        },
    }))
    .unwrap()
}

/// A workload answering every HTTP request with [`ANSWER`], on 127.0.0.1 of the calling task's
/// namespace.
async fn workload() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let answer =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{ANSWER}", ANSWER.len());
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

/// What the device namespace's thread hands back.
struct Device {
    status: watch::Receiver<DataPathStatus>,
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

/// Starts the data path (and a workload, and the CA answering its requests) on a thread inside
/// `namespace`; answers once the workload listens.
fn start_device(
    namespace: &Namespace,
    state_dir: StateDir,
    session: Arc<SessionLink>,
    data_path_link: edgible_agent::control::DataPathLink,
    ca: Arc<TestCa>,
    desired: watch::Sender<Arc<DesiredState>>,
    private_key: PrivateKey,
) -> Result<Device> {
    let mut config = DataPathConfig::new("wg-dev", PROXY_PORT, private_key);
    config.retry_interval = Duration::from_secs(1);
    let events = EventLog::new(64);
    let (data_path, inputs) = DataPath::new(config, state_dir, data_path_link, desired.subscribe(), events);
    let status = data_path.status();
    let (stop, stopped) = watch::channel(false);
    let (ready, is_ready) = std::sync::mpsc::channel();
    let name = namespace.name().to_owned();
    let thread = std::thread::spawn(move || -> Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{name}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            let port = workload().await?;
            let mut state = DesiredState::default();
            state.apply(DesiredUpdate::full(1, vec![application(port)]));
            desired.send_replace(Arc::new(state));
            // The CA: every request is signed and handed back as the session would.
            let signer = Arc::clone(&session);
            tokio::spawn(async move {
                let mut requests = signer.requests().await;
                while let Some(request) = requests.recv().await {
                    match ca.sign(&request.csr_pem) {
                        Ok(chain_pem) => signer.certificate(IssuedCertificate {
                            application_id: request.application_id,
                            chain_pem,
                            hostnames: vec![APP.parse().unwrap()],
                            not_after: chrono::Utc::now() + chrono::Duration::days(90),
                        }),
                        Err(error) => eprintln!("the test CA refused a CSR: {error:#}"),
                    }
                }
            });
            let _ = ready.send(());
            data_path.run(inputs, stopped).await;
            Ok(())
        })
    });
    is_ready.recv_timeout(TIMEOUT).context("the device thread did not start")?;
    Ok(Device { status, stop, thread })
}

/// One HTTPS request from the edge namespace to the device's proxy through the tunnel, as the
/// edge sends it: a PROXY v2 header first, then TLS for [`APP`].
fn request_through_tunnel(edge: &Namespace, ca: &TestCa) -> Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.certificate.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    edge.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            let proxy = SocketAddr::from((DEVICE, PROXY_PORT));
            let mut stream =
                tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(proxy)).await??;
            let client: SocketAddr = "203.0.113.7:50123".parse()?;
            stream.write_all(&edgible::proxy_protocol::encode_tcp(client, proxy)).await?;
            let mut tls = connector.connect(ServerName::try_from(APP)?, stream).await?;
            tls.write_all(format!("GET / HTTP/1.1\r\nhost: {APP}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut answer)).await??;
            Ok(answer)
        })
    })
}

#[test]
fn the_data_path_serves_through_the_tunnel_and_follows_the_device_when_it_moves() -> Result<()> {
    if !is_heavy() {
        return Ok(());
    }
    let test = test_number();
    let edge_namespace = Namespace::create(test, "edge")?;
    let device_namespace = Namespace::create(test, "dev")?;
    veth(&device_namespace, "192.0.2.2/24", &edge_namespace, "192.0.2.1/24")?;
    let temp = tempfile::tempdir()?;
    let state_dir = StateDir::open(temp.path())?;
    let ca = Arc::new(TestCa::new());
    let (session, data_path_link) = link();
    let session = Arc::new(session);
    let (desired, _) = watch::channel(Arc::new(DesiredState::default()));
    let device_private = key();
    let device_public = device_private.public_key();
    let device = start_device(
        &device_namespace,
        state_dir,
        Arc::clone(&session),
        data_path_link,
        Arc::clone(&ca),
        desired,
        device_private,
    )?;
    let result = exercise(&edge_namespace, &device_namespace, &session, &device, device_public, &ca);
    let _ = device.stop.send(true);
    let stopped = device.thread.join().map_err(|_| anyhow!("the device thread panicked"))?;
    result.and(stopped)
}

fn exercise(
    edge_namespace: &Namespace,
    device_namespace: &Namespace,
    session: &SessionLink,
    device: &Device,
    device_public: PublicKey,
    ca: &TestCa,
) -> Result<()> {
    // The server's welcome: the device's tunnel address in the pool's network. The data path
    // starts the tunnel and binds the proxy on the tunnel address.
    session.welcomed(DEVICE, Some("100.64.0.0/24".parse()?));
    ensure!(
        wait_until(TIMEOUT, || device.status.borrow().proxy == Some(SocketAddr::from((DEVICE, PROXY_PORT)))),
        "the proxy never listened on the tunnel address: {:?}",
        *device.status.borrow()
    );
    device_namespace.ip(&["link", "show", "wg-dev"]).context("the tunnel interface in the device namespace")?;
    // The edge: one peer, the device, at an endpoint it learns; then the pool's edges reach
    // the device, which peers with the edge and dials it.
    let edge_private = key();
    let edge_public = edge_private.public_key();
    let edge_tunnel = edge_namespace.start_tunnel(TunnelConfig {
        interface_name: "wg-edge".into(),
        private_key: edge_private,
        address: "100.64.0.1/24".parse()?,
        listen_port: None,
        peers: vec![PeerConfig {
            public_key: device_public,
            endpoint: None,
            allowed_ips: vec!["100.64.0.2/32".parse()?],
            persistent_keepalive: None,
        }],
    })?;
    session.edges(vec![EdgePeer {
        edge_id: EdgeId::new(),
        public_key: edge_public.to_base64(),
        endpoint: format!("192.0.2.1:{}", edge_tunnel.listen_port()),
        tunnel_address: EDGE,
    }]);
    let outcome = serve_and_move(edge_namespace, device_namespace, session, &edge_tunnel, ca);
    drop(edge_tunnel);
    outcome
}

fn serve_and_move(
    edge_namespace: &Namespace,
    device_namespace: &Namespace,
    session: &SessionLink,
    edge_tunnel: &Tunnel,
    ca: &TestCa,
) -> Result<()> {
    // Served: through the tunnel, with the CA-signed certificate, to the workload.
    let mut last = Err(anyhow!("no attempt"));
    let served = wait_until(TIMEOUT, || {
        last = request_through_tunnel(edge_namespace, ca);
        last.as_ref().is_ok_and(|answer| answer.ends_with(ANSWER))
    });
    ensure!(served, "never served through the tunnel: {last:?}");
    let seen = edge_tunnel.stats()[0].endpoint;
    ensure!(seen.map(|endpoint| endpoint.ip()) == Some("192.0.2.2".parse()?), "the edge sees the device at {seen:?}");

    // The device moves: a new underlay address. The edge follows within seconds, long before
    // the 25 s persistent keepalive, and the session is asked to reconnect.
    let mut reconnects = session.reconnects();
    device_namespace.ip(&["addr", "del", "192.0.2.2/24", "dev", "to-edge"])?;
    device_namespace.ip(&["addr", "add", "192.0.2.3/24", "dev", "to-edge"])?;
    let moved = wait_until(Duration::from_secs(8), || {
        edge_tunnel.stats()[0].endpoint.map(|endpoint| endpoint.ip()) == Some("192.0.2.3".parse().unwrap())
    });
    ensure!(moved, "the edge still sees the device at {:?}", edge_tunnel.stats()[0].endpoint);
    ensure!(reconnects.has_changed()?, "the push session was not asked to reconnect");
    let _ = reconnects.borrow_and_update();
    let answer = request_through_tunnel(edge_namespace, ca)?;
    ensure!(answer.ends_with(ANSWER), "after the move: {answer}");
    Ok(())
}
