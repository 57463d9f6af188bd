//! `--issuer acme` against a real Pebble (Debian's `pebble` package), all on loopback.
//!
//! Pebble's HTTPS gets a CA and certificate made here (Debian ships none); its DNS is
//! `pebble-challtestsrv`, which resolves every name to 127.0.0.1, and its HTTP-01 validation
//! port is a port this test serves with a real edge's `acme_http` router and `ChallengeStore`,
//! fed by a real edge hub session (`edgible_edge::hub_client`, with no tunnel) connected to the
//! server. The server runs in-process from its `serve` command line; a simulated agent sends a
//! CSR and must get a chain that verifies against Pebble's root (`/roots/0` on its management
//! port). Then: a wildcard is refused, the status shows the certificate, the server's database
//! holds no private key, and a restart reuses the account. Also: 100 applications on four
//! devices all get certificates while the orders at the CA (the `acme_orders` rows created
//! there and not yet ended, polled during the run) never exceed `--acme-max-concurrent-orders`;
//! and a hostname change re-issues once, for exactly the new names.
//!
//! Heavy tier: runs only with `EDGIBLE_ACC=1` (it needs the `pebble` binaries).

use std::future::IntoFuture as _;
use std::net::{Ipv4Addr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use edgible::model::{ApplicationId, DeviceId};
use edgible::protocol::v1::{AgentMessage, ServerMessage};
use edgible::protocol::{decode, encode};
use edgible_acceptance_tests::heavy_tier;
use edgible_edge::acme_http::{self, ChallengeStore};
use edgible_edge::hub_client::plan::EdgePlan;
use edgible_edge::hub_client::{self, HelloParams, HubConfig, HubConnector, HubStats, PeerSet, PeerSetError};
use edgible_edge::route_source::SharedRoutes;
use edgible_server::certs::orders::OrderState;
use futures::{SinkExt as _, StreamExt as _};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(60);

/// A free loopback port (bound, then released for the process that will use it).
fn free_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pebble and its DNS on loopback.
struct Pebble {
    _pebble: Running,
    _dns: Running,
    acme_port: u16,
    management_port: u16,
    /// The CA of Pebble's HTTPS listeners, PEM (what the server trusts via --acme-ca-bundle).
    https_ca_pem: String,
    https_ca_file: PathBuf,
    log: PathBuf,
}

impl Pebble {
    fn start(dir: &Path, http_port: u16) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_certificate = ca_params.self_signed(&ca_key)?;
        let https_ca_pem = ca_certificate.pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        let certificate = params.signed_by(&key, &issuer)?;
        let (certificate_file, key_file) = (dir.join("pebble.pem"), dir.join("pebble.key"));
        std::fs::write(&certificate_file, certificate.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        let https_ca_file = dir.join("pebble-https-ca.pem");
        std::fs::write(&https_ca_file, &https_ca_pem)?;

        let (acme_port, management_port, dns_port, dns_management_port) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let config = json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": certificate_file,
            "privateKey": key_file,
            "httpPort": http_port,
            "tlsPort": free_port()?,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_file = dir.join("pebble.json");
        std::fs::write(&config_file, config.to_string())?;
        let log = dir.join("pebble.log");
        let dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_management_port}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(std::fs::File::create(dir.join("challtestsrv.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting pebble-challtestsrv (Debian package pebble)")?;
        let dns = Running(dns);
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("pebble.err"))?)
            .spawn()
            .context("starting pebble (Debian package pebble)")?;
        Ok(Self { _pebble: Running(pebble), _dns: dns, acme_port, management_port, https_ca_pem, https_ca_file, log })
    }

    fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    fn client(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.https_ca_pem.as_bytes())?)
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = self.client()?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(response) = client.get(self.directory_url()).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("Pebble did not come up: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The root Pebble issues under, PEM.
    async fn root_pem(&self) -> anyhow::Result<String> {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management_port);
        Ok(self.client()?.get(url).send().await?.error_for_status()?.text().await?)
    }

    fn accounts_created(&self) -> anyhow::Result<usize> {
        let log = std::fs::read_to_string(&self.log)?;
        Ok(log.lines().filter(|line| line.contains("There are now") && line.contains("accounts in memory")).count())
    }
}

/// The server under test, in-process.
struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), edgible_server::serve::ServeError>>,
}

impl Server {
    async fn start(dir: &Path, pebble: &Pebble) -> anyhow::Result<Self> {
        Self::start_with(dir, pebble, &[]).await
    }

    /// Starts the server with `extra` flags after the usual ones.
    async fn start_with(dir: &Path, pebble: &Pebble, extra: &[&str]) -> anyhow::Result<Self> {
        use clap::Parser as _;
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let database = format!("sqlite://{}?mode=rwc", dir.join("edgible.db").display());
        let mut args = vec![
            "edgible-server".to_owned(),
            "serve".into(),
            "--database".into(),
            database,
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.display().to_string(),
            "--bootstrap".into(),
            "platform".into(),
            "--bootstrap-key-file".into(),
            dir.join("platform.key").display().to_string(),
            "--issuer".into(),
            "acme".into(),
            "--acme-directory".into(),
            pebble.directory_url(),
            "--acme-ca-bundle".into(),
            pebble.https_ca_file.display().to_string(),
            "--acme-contact".into(),
            "ops@example.com".into(),
            "--server-key-file".into(),
            dir.join("server.key").display().to_string(),
        ];
        args.extend(extra.iter().map(|flag| (*flag).to_owned()));
        let config = edgible_server::config::Config::try_parse_from(args)?;
        let edgible_server::config::Command::Serve(serve) = config.command else { bail!("not serve") };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            edgible_server::serve::serve(&serve, async {
                let _ = stopped.await;
            })
            .await
        });
        let deadline = tokio::time::Instant::now() + WAIT;
        let base = loop {
            if let Ok(base) = std::fs::read_to_string(&ready) {
                break base;
            }
            if task.is_finished() {
                bail!("the server stopped: {:?}", task.await);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the server did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(Self { base, stop: Some(stop), task })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task).await???;
        Ok(())
    }
}

/// A REST client with a key.
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        ensure!(status.is_success(), "{path}: {status}: {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
}

fn text(value: &Value, pointer: &str) -> anyhow::Result<String> {
    value.pointer(pointer).and_then(Value::as_str).map(str::to_owned).with_context(|| format!("{pointer} in {value}"))
}

fn public_key(seed: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([seed; 32])
}

/// The edge's tunnel is not under test: peers are accepted and dropped.
struct NoTunnel;

impl PeerSet for NoTunnel {
    fn apply(&self, _plan: &EdgePlan) -> Result<(), PeerSetError> {
        Ok(())
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A simulated agent: hello, then certificate requests.
struct Agent {
    socket: Socket,
}

impl Agent {
    async fn connect(base: &str, device_id: DeviceId, credential: &str, key: &str) -> anyhow::Result<Self> {
        let url = format!("{}/v1/agent/connect", base.replacen("http", "ws", 1));
        let mut request = url.into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {credential}").parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        let mut agent = Self { socket };
        let hello = AgentMessage::Hello {
            device_id,
            public_key: key.to_owned(),
            applied_revision: None,
            capabilities: Vec::new(),
            agent_version: "test".into(),
            cloud_host: None,
        };
        agent.socket.send(Message::text(encode(&hello))).await?;
        Ok(agent)
    }

    /// The next message that is not a ping (pings are answered), welcome, update or edges.
    async fn next_interesting(&mut self) -> anyhow::Result<ServerMessage> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.socket.next()).await.context("no frame in time")?;
            let Some(Message::Text(text)) = frame.transpose()? else { continue };
            match decode::<ServerMessage>(text.as_str())? {
                ServerMessage::Ping { nonce } => {
                    self.socket.send(Message::text(encode(&AgentMessage::Pong { nonce }))).await?;
                }
                ServerMessage::Welcome { .. }
                | ServerMessage::ApplicationUpdate { .. }
                | ServerMessage::Edges { .. }
                | ServerMessage::Access { .. } => {}
                other => return Ok(other),
            }
        }
    }

    async fn request(&mut self, application_id: ApplicationId, csr_pem: String) -> anyhow::Result<()> {
        let request = AgentMessage::CertificateRequest { application_id, csr_pem };
        self.socket.send(Message::text(encode(&request))).await?;
        Ok(())
    }
}

/// The objects both tests use: an organization, a pool with an enrolled edge and device, and
/// two applications placed on the device (`web` with two names, `wild` with a wildcard).
struct Fleet {
    api: Api,
    pool: String,
    edge_credential: String,
    edge_hello: HelloParams,
    device_id: DeviceId,
    device_credential: String,
    placed: Vec<(ApplicationId, Vec<&'static str>)>,
}

impl Fleet {
    async fn create(dir: &Path, server: &Server) -> anyhow::Result<Self> {
        let platform_key = std::fs::read_to_string(dir.join("platform.key"))?.trim().to_owned();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let platform = Api { http: http.clone(), base: server.base.clone(), key: platform_key };
        let org = platform.post("/v1/organizations", json!({"name": "shop"})).await?;
        let api = Api { http, base: server.base.clone(), key: text(&org, "/admin_key/secret")? };
        let pool = api.post("/v1/device-pools", json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"})).await?;
        let pool = text(&pool, "/id")?;
        let edge =
            api.post("/v1/edges", json!({"name": "gateway", "pool_id": pool, "endpoint": "203.0.113.1:51820"})).await?;
        let token = text(&edge, "/enrollment_token")?;
        let edge = api.post("/v1/edge/enroll", json!({"token": token, "public_key": public_key(9)})).await?;
        let edge_hello = HelloParams {
            edge_id: text(&edge, "/edge/id")?.parse()?,
            public_key: public_key(9),
            edge_version: "test".into(),
        };
        let device = api.post("/v1/devices", json!({"name": "laptop", "pool_id": pool})).await?;
        let token = text(&device, "/enrollment_token")?;
        let device = api.post("/v1/agent/enroll", json!({"token": token, "public_key": public_key(7)})).await?;
        let device_id: DeviceId = text(&device, "/device/id")?.parse()?;
        let mut placed = Vec::new();
        for (name, hostnames) in [("web", vec!["web.shop.test", "www.shop.test"]), ("wild", vec!["*.wild.shop.test"])] {
            let workload = json!({"process": {"command": "/bin/web"}});
            let spec = json!({"name": name, "hostnames": hostnames, "workload": workload, "port": 8080});
            let id: ApplicationId = text(&api.post("/v1/applications", spec).await?, "/id")?.parse()?;
            let placement = json!({"strategy": "serving-device", "application_id": id, "device_id": device_id});
            api.post("/v1/placements", placement).await?;
            placed.push((id, hostnames));
        }
        Ok(Self {
            api,
            pool,
            edge_credential: text(&edge, "/credential")?,
            edge_hello,
            device_id,
            device_credential: text(&device, "/credential")?,
            placed,
        })
    }

    /// Enrolls another device in the pool; answers its id and credential.
    async fn add_device(&self, name: &str, seed: u8) -> anyhow::Result<(DeviceId, String)> {
        let device = self.api.post("/v1/devices", json!({"name": name, "pool_id": self.pool})).await?;
        let token = text(&device, "/enrollment_token")?;
        let enroll = json!({"token": token, "public_key": public_key(seed)});
        let device = self.api.post("/v1/agent/enroll", enroll).await?;
        Ok((text(&device, "/device/id")?.parse()?, text(&device, "/credential")?))
    }

    /// Creates an application serving `hostnames` and places it on `device_id`.
    async fn place(&self, name: &str, hostnames: &[String], device_id: DeviceId) -> anyhow::Result<ApplicationId> {
        let id: ApplicationId =
            text(&self.api.post("/v1/applications", app_spec(name, hostnames)).await?, "/id")?.parse()?;
        let placement = json!({"strategy": "serving-device", "application_id": id, "device_id": device_id});
        self.api.post("/v1/placements", placement).await?;
        Ok(id)
    }

    /// Runs the edge's hub session, feeding `challenges`, until the sender is told to stop.
    fn spawn_edge(
        &self,
        base: &str,
        challenges: &ChallengeStore,
    ) -> anyhow::Result<(watch::Sender<bool>, tokio::task::JoinHandle<()>)> {
        let connector = HubConnector::new(base, &self.edge_credential)?;
        let hello = self.edge_hello.clone();
        let (stop, stopped) = watch::channel(false);
        let challenges = challenges.clone();
        let task = tokio::spawn(async move {
            let (config, routes, stats) = (HubConfig::default(), SharedRoutes::default(), HubStats::new());
            let context = hub_client::SessionContext {
                config: &config,
                hello: &hello,
                peers: &NoTunnel,
                routes: &routes,
                challenges: &challenges,
                stats: &stats,
            };
            hub_client::run(&context, &connector, stopped).await;
        });
        Ok((stop, task))
    }
}

/// A CSR for `names` with a fresh key, as the agent makes it (rcgen's defaults).
fn csr(names: &[&str]) -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let csr = CertificateParams::new(names)?.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// An application's spec, as the tests create it.
fn app_spec(name: &str, hostnames: &[String]) -> Value {
    json!({"name": name, "hostnames": hostnames, "workload": {"process": {"command": "/bin/web"}}, "port": 8080})
}

/// The DNS names of the leaf (first) certificate of a PEM chain, sorted.
fn leaf_dns_names(chain_pem: &str) -> anyhow::Result<Vec<String>> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next().context("no certificate")??;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())?;
    let mut names: Vec<String> = parsed
        .subject_alternative_name()?
        .map(|extension| {
            extension
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(name) => Some((*name).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    Ok(names)
}

fn verify(chain_pem: &str, root_pem: &str, hostname: &str) -> anyhow::Result<()> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    ensure!(chain.len() >= 2, "a leaf and an intermediate: {} certificates", chain.len());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(root_pem.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    let name = ServerName::try_from(hostname.to_owned())?;
    verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_certificates_come_from_pebble_through_the_edges() -> anyhow::Result<()> {
    if !heavy_tier("acme_certificates_come_from_pebble_through_the_edges") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new().prefix("edgible-acme-").tempdir()?;

    // The edge's HTTP port, which Pebble validates against.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_port = http.local_addr()?.port();
    let challenges = ChallengeStore::new();
    let metrics = edgible_edge::metrics::Metrics::new();
    let http_task = tokio::spawn(axum::serve(http, acme_http::router(challenges.clone(), metrics)).into_future());

    let pebble = Pebble::start(dir.path(), http_port)?;
    pebble.wait_ready().await?;
    let server = Server::start(dir.path(), &pebble).await?;

    let result = async {
        let fleet = Fleet::create(dir.path(), &server).await?;
        let (stop_edge, edge_task) = fleet.spawn_edge(&server.base, &challenges)?;
        let (device_id, placed) = (fleet.device_id, fleet.placed.clone());
        let mut agent = Agent::connect(&server.base, device_id, &fleet.device_credential, &public_key(7)).await?;

        // A wildcard needs DNS-01: refused with a clear error.
        let wild_key = KeyPair::generate()?;
        let wild_csr =
            CertificateParams::new(vec!["*.wild.shop.test".to_owned()])?.serialize_request(&wild_key)?.pem()?;
        agent.request(placed[1].0, wild_csr).await?;
        let ServerMessage::Error { message, .. } = agent.next_interesting().await? else { bail!("expected an error") };
        ensure!(message.contains("wildcards need DNS-01, which is not configured"), "{message}");

        // The certificate for both names, from Pebble, validated through the edge's challenges.
        let (web, hostnames) = placed[0].clone();
        let (key, request) = csr(&hostnames)?;
        let started = std::time::Instant::now();
        agent.request(web, request.clone()).await?;
        // Asking again while the order runs joins it: one order.
        agent.request(web, request).await?;
        let ServerMessage::Certificate { application_id, chain_pem, hostnames: issued_for, not_after } =
            agent.next_interesting().await?
        else {
            bail!("expected the certificate");
        };
        eprintln!("issued in {:?}", started.elapsed());
        ensure!(application_id == web);
        ensure!(issued_for.iter().map(|name| name.as_str()).collect::<Vec<_>>() == hostnames, "{issued_for:?}");
        let root = pebble.root_pem().await?;
        for hostname in &hostnames {
            verify(&chain_pem, &root, hostname)?;
        }
        ensure!(challenges.is_empty(), "the challenges were taken down");

        let status = fleet.api.get(&format!("/v1/applications/{web}/status")).await?;
        ensure!(status["certificate_status"] == "valid", "{status}");
        let expires: chrono::DateTime<chrono::Utc> = serde_json::from_value(status["certificate_expires_at"].clone())?;
        ensure!(expires == not_after, "{status}");

        // The server never held the device's private key.
        let key_der = key.serialize_der();
        for file in std::fs::read_dir(dir.path())? {
            let path = file?.path();
            if path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("edgible.db")) {
                let bytes = std::fs::read(&path)?;
                ensure!(
                    !bytes.windows(key_der.len()).any(|window| window == key_der),
                    "{} holds the key",
                    path.display()
                );
            }
        }
        let database = format!("sqlite://{}?mode=rwc", dir.path().join("edgible.db").display());
        let orders = edgible_server::db::Db::connect(&database).await?.acme_orders_of(web).await?;
        ensure!(orders.len() == 1, "asking twice made one order: {orders:?}");

        // With the edge gone, a renewal fails: an event and the status say why, and the expiry
        // of the certificate the device keeps serving stays.
        stop_edge.send(true)?;
        let _ = tokio::time::timeout(WAIT, edge_task).await;
        let edge_path = format!("/v1/edges/{}", fleet.edge_hello.edge_id);
        let deadline = tokio::time::Instant::now() + WAIT;
        while fleet.api.get(&edge_path).await?["status"]["state"] != "offline" {
            ensure!(tokio::time::Instant::now() < deadline, "the edge never went offline");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_key, renewal) = csr(&hostnames)?;
        agent.request(web, renewal).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            let status = fleet.api.get(&format!("/v1/applications/{web}/status")).await?;
            if status["certificate_status"].as_str().is_some_and(|text| text.starts_with("failed")) {
                break status;
            }
            ensure!(tokio::time::Instant::now() < deadline, "the renewal never failed: {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(status["certificate_status"].as_str().is_some_and(|text| text.contains("no edge")), "{status}");
        let kept: chrono::DateTime<chrono::Utc> = serde_json::from_value(status["certificate_expires_at"].clone())?;
        ensure!(kept == not_after, "the issued certificate's expiry stays: {status}");
        // The next order waits for its backoff; asking meanwhile is refused, saying so.
        let (_key, again) = csr(&hostnames)?;
        agent.request(web, again).await?;
        let ServerMessage::Error { message, .. } = agent.next_interesting().await? else { bail!("expected a refusal") };
        ensure!(message.contains("last certificate order failed") && message.contains("next starts in"), "{message}");
        let events = fleet.api.get(&format!("/v1/events?application_id={web}")).await?;
        let messages: Vec<&str> =
            events["items"].as_array().into_iter().flatten().filter_map(|e| e["message"].as_str()).collect();
        ensure!(
            messages.iter().any(|message| message.starts_with("certificate order for") && message.contains("no edge")),
            "{events}"
        );
        anyhow::Ok(())
    }
    .await;
    server.stop().await?;
    if let Err(error) = result {
        bail!("{error:#}\nPebble's log:\n{}", std::fs::read_to_string(&pebble.log).unwrap_or_default());
    }

    // A restart restores the stored account instead of registering another.
    let accounts = pebble.accounts_created()?;
    ensure!(accounts == 1, "one account was created: {accounts}");
    let server = Server::start(dir.path(), &pebble).await?;
    ensure!(pebble.accounts_created()? == accounts, "a restart created another ACME account");
    server.stop().await?;
    http_task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_interrupted_by_a_restart_resumes_without_a_second_order() -> anyhow::Result<()> {
    if !heavy_tier("an_order_interrupted_by_a_restart_resumes_without_a_second_order") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new().prefix("edgible-acme-restart-").tempdir()?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_port = http.local_addr()?.port();
    let challenges = ChallengeStore::new();
    let metrics = edgible_edge::metrics::Metrics::new();
    let http_task = tokio::spawn(axum::serve(http, acme_http::router(challenges.clone(), metrics)).into_future());
    let pebble = Pebble::start(dir.path(), http_port)?;
    pebble.wait_ready().await?;
    let database = format!("sqlite://{}?mode=rwc", dir.path().join("edgible.db").display());

    // First run: the order is created at the CA, then waits for an edge that never comes.
    let server = Server::start(dir.path(), &pebble).await?;
    let fleet = Fleet::create(dir.path(), &server).await?;
    let (web, hostnames) = fleet.placed[0].clone();
    let mut agent = Agent::connect(&server.base, fleet.device_id, &fleet.device_credential, &public_key(7)).await?;
    let (_key, request) = csr(&hostnames)?;
    agent.request(web, request).await?;
    let db = edgible_server::db::Db::connect(&database).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let order_url = loop {
        let orders = db.acme_orders_of(web).await?;
        if let Some(url) = orders.first().and_then(|order| order.order_url.clone()) {
            ensure!(orders.len() == 1, "{orders:?}");
            break url;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the order never reached the CA: {orders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(agent);
    server.stop().await?;
    let orders = db.acme_orders_of(web).await?;
    ensure!(orders[0].state.is_in_flight(), "stopping leaves the order in flight: {orders:?}");

    // Second run: the order resumes through its URL once the edge and the agent are back.
    let server = Server::start(dir.path(), &pebble).await?;
    let result = async {
        let (stop_edge, edge_task) = fleet.spawn_edge(&server.base, &challenges)?;
        let mut agent = Agent::connect(&server.base, fleet.device_id, &fleet.device_credential, &public_key(7)).await?;
        let ServerMessage::Certificate { application_id, chain_pem, .. } = agent.next_interesting().await? else {
            bail!("expected the certificate of the resumed order");
        };
        ensure!(application_id == web);
        verify(&chain_pem, &pebble.root_pem().await?, hostnames[0])?;
        let orders = db.acme_orders_of(web).await?;
        ensure!(orders.len() == 1, "one order across the restart: {orders:?}");
        ensure!(orders[0].order_url.as_deref() == Some(order_url.as_str()), "the same order at the CA: {orders:?}");
        ensure!(orders[0].state == edgible_server::certs::orders::OrderState::Valid, "{orders:?}");
        ensure!(pebble.accounts_created()? == 1, "one ACME account across the restart");
        stop_edge.send(true)?;
        let _ = tokio::time::timeout(WAIT, edge_task).await;
        anyhow::Ok(())
    }
    .await;
    server.stop().await?;
    http_task.abort();
    result.map_err(|error| {
        anyhow::anyhow!("{error:#}\nPebble's log:\n{}", std::fs::read_to_string(&pebble.log).unwrap_or_default())
    })
}

/// How many applications the concurrency test places, over how many devices, and the
/// server's limit on orders at the CA at once.
const APPLICATIONS: usize = 100;
const DEVICES: usize = 4;
const MAX_ORDERS: usize = 4;

/// A simulated agent's certificates for `expected` (application and its one hostname), each
/// verified against `root`; any refusal or unexpected certificate fails.
async fn collect_certificates(
    agent: &mut Agent,
    expected: &[(ApplicationId, String)],
    root: &str,
) -> anyhow::Result<()> {
    let mut missing: std::collections::HashMap<ApplicationId, &str> =
        expected.iter().map(|(id, hostname)| (*id, hostname.as_str())).collect();
    while !missing.is_empty() {
        match agent.next_interesting().await? {
            ServerMessage::Certificate { application_id, chain_pem, hostnames, .. } => {
                let hostname = missing
                    .remove(&application_id)
                    .with_context(|| format!("unexpected or twice: {application_id}"))?;
                ensure!(hostnames.len() == 1 && hostnames[0].as_str() == hostname, "{hostnames:?} for {hostname}");
                ensure!(leaf_dns_names(&chain_pem)? == [hostname], "the leaf names exactly {hostname}");
                verify(&chain_pem, root, hostname).with_context(|| format!("the chain of {hostname}"))?;
            }
            ServerMessage::Error { message, .. } => bail!("refused: {message}"),
            other => bail!("unexpected: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_applications_get_certificates_with_orders_at_the_ca_bounded() -> anyhow::Result<()> {
    if !heavy_tier("a_hundred_applications_get_certificates_with_orders_at_the_ca_bounded") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new().prefix("edgible-acme-many-").tempdir()?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_port = http.local_addr()?.port();
    let challenges = ChallengeStore::new();
    let metrics = edgible_edge::metrics::Metrics::new();
    let http_task = tokio::spawn(axum::serve(http, acme_http::router(challenges.clone(), metrics)).into_future());
    let pebble = Pebble::start(dir.path(), http_port)?;
    pebble.wait_ready().await?;
    let limit = MAX_ORDERS.to_string();
    let server = Server::start_with(dir.path(), &pebble, &["--acme-max-concurrent-orders", &limit]).await?;

    let result = async {
        let fleet = Fleet::create(dir.path(), &server).await?;
        let (stop_edge, edge_task) = fleet.spawn_edge(&server.base, &challenges)?;
        let mut devices = Vec::new();
        for index in 0..DEVICES {
            let seed = 20 + u8::try_from(index)?;
            let (device_id, credential) = fleet.add_device(&format!("node-{index}"), seed).await?;
            devices.push((device_id, credential, seed, Vec::new()));
        }
        for index in 0..APPLICATIONS {
            let hostname = format!("app-{index}.shop.test");
            let device = &mut devices[index % DEVICES];
            let id = fleet.place(&format!("app-{index}"), std::slice::from_ref(&hostname), device.0).await?;
            device.3.push((id, hostname));
        }
        let root = pebble.root_pem().await?;
        let mut agents = Vec::new();
        for (device_id, credential, seed, _) in &devices {
            agents.push(Agent::connect(&server.base, *device_id, credential, &public_key(*seed)).await?);
        }

        // Watch the orders the database shows at the CA (created there, not yet ended) while
        // they run: never more than the limit.
        let database = format!("sqlite://{}?mode=rwc", dir.path().join("edgible.db").display());
        let db = edgible_server::db::Db::connect(&database).await?;
        let directory = pebble.directory_url();
        let (stop_watch, mut watch_stopped) = watch::channel(false);
        let watcher = tokio::spawn(async move {
            let (mut most, mut polls) = (0usize, 0usize);
            loop {
                let orders = db.acme_orders_in_flight(&directory).await?;
                let at_ca = orders.iter().filter(|order| order.state != OrderState::New).count();
                most = most.max(at_ca);
                polls += 1;
                if *watch_stopped.borrow() {
                    return anyhow::Ok((most, polls, db));
                }
                let _ = tokio::time::timeout(Duration::from_millis(5), watch_stopped.changed()).await;
            }
        });

        // Every agent asks for all its applications at once.
        let started = std::time::Instant::now();
        for (agent, (_, _, _, placed)) in agents.iter_mut().zip(&devices) {
            for (id, hostname) in placed {
                let (_key, request) = csr(&[hostname.as_str()])?;
                agent.request(*id, request).await?;
            }
        }
        let collected = futures::future::try_join_all(
            agents.iter_mut().zip(&devices).map(|(agent, device)| collect_certificates(agent, &device.3, &root)),
        );
        let collected = tokio::time::timeout(Duration::from_secs(300), collected).await;
        let elapsed = started.elapsed();
        stop_watch.send(true)?;
        let (most, polls, db) = tokio::time::timeout(WAIT, watcher).await???;
        collected.context("the certificates did not all come in 300 s")??;
        eprintln!(
            "{APPLICATIONS} certificates in {elapsed:?} with at most {most} of {MAX_ORDERS} orders at the CA \
             ({polls} polls)"
        );
        ensure!(most <= MAX_ORDERS, "{most} orders were at the CA at once; the limit is {MAX_ORDERS}");
        ensure!(most >= 2, "orders ran one at a time ({most} at most): the limit was not exercised");

        // One order per application, each issued.
        for (_, _, _, placed) in &devices {
            for (id, hostname) in placed {
                let orders = db.acme_orders_of(*id).await?;
                ensure!(orders.len() == 1 && orders[0].state == OrderState::Valid, "{hostname}: {orders:?}");
            }
        }
        stop_edge.send(true)?;
        let _ = tokio::time::timeout(WAIT, edge_task).await;
        anyhow::Ok(())
    }
    .await;
    server.stop().await?;
    http_task.abort();
    result.map_err(|error| {
        anyhow::anyhow!("{error:#}\nPebble's log:\n{}", std::fs::read_to_string(&pebble.log).unwrap_or_default())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostname_change_reissues_once_for_exactly_the_new_names() -> anyhow::Result<()> {
    if !heavy_tier("a_hostname_change_reissues_once_for_exactly_the_new_names") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new().prefix("edgible-acme-rename-").tempdir()?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_port = http.local_addr()?.port();
    let challenges = ChallengeStore::new();
    let metrics = edgible_edge::metrics::Metrics::new();
    let http_task = tokio::spawn(axum::serve(http, acme_http::router(challenges.clone(), metrics)).into_future());
    let pebble = Pebble::start(dir.path(), http_port)?;
    pebble.wait_ready().await?;
    let server = Server::start(dir.path(), &pebble).await?;

    let result = async {
        let fleet = Fleet::create(dir.path(), &server).await?;
        let (stop_edge, edge_task) = fleet.spawn_edge(&server.base, &challenges)?;
        let mut agent = Agent::connect(&server.base, fleet.device_id, &fleet.device_credential, &public_key(7)).await?;
        let root = pebble.root_pem().await?;
        let database = format!("sqlite://{}?mode=rwc", dir.path().join("edgible.db").display());
        let db = edgible_server::db::Db::connect(&database).await?;

        // The certificate for the first names.
        let (web, old) = fleet.placed[0].clone();
        let (_key, request) = csr(&old)?;
        agent.request(web, request).await?;
        let ServerMessage::Certificate { chain_pem, .. } = agent.next_interesting().await? else {
            bail!("expected the first certificate");
        };
        ensure!(leaf_dns_names(&chain_pem)? == old, "the first chain names {old:?}");

        // The hostnames change: www goes, shop comes, web stays.
        let new = ["shop.shop.test", "web.shop.test"];
        let new_names: Vec<String> = new.iter().map(|name| (*name).to_owned()).collect();
        fleet.api.put(&format!("/v1/applications/{web}"), app_spec("web", &new_names)).await?;

        // A request still for the old names (an agent that has not applied the change) is
        // refused and orders nothing.
        let (_key, stale) = csr(&old)?;
        agent.request(web, stale).await?;
        let ServerMessage::Error { message, .. } = agent.next_interesting().await? else {
            bail!("expected the stale request to be refused");
        };
        ensure!(message.contains("www.shop.test, which is not one of the application's hostnames"), "{message}");

        // The agent's CSR for the new names, asked three times while its order runs: one order,
        // one certificate, for exactly the new names.
        let (_key, request) = csr(&new)?;
        for _ in 0..3 {
            agent.request(web, request.clone()).await?;
        }
        let ServerMessage::Certificate { application_id, chain_pem, hostnames, not_after } =
            agent.next_interesting().await?
        else {
            bail!("expected the certificate for the new names");
        };
        ensure!(application_id == web);
        ensure!(hostnames.iter().map(|name| name.as_str()).collect::<Vec<_>>() == new, "{hostnames:?}");
        ensure!(leaf_dns_names(&chain_pem)? == new, "the new chain names exactly {new:?}");
        for hostname in new {
            verify(&chain_pem, &root, hostname)?;
        }
        ensure!(verify(&chain_pem, &root, "www.shop.test").is_err(), "the dropped name is not certified");
        let more = tokio::time::timeout(Duration::from_secs(2), agent.next_interesting()).await;
        ensure!(more.is_err(), "nothing more after the one certificate: {more:?}");

        let orders = db.acme_orders_of(web).await?;
        ensure!(orders.len() == 2, "one order before the change and one after: {orders:?}");
        let names = |order: &edgible_server::db::StoredOrder| -> Vec<String> {
            order.hostnames.iter().map(|name| name.as_str().to_owned()).collect()
        };
        ensure!(names(&orders[0]) == old && names(&orders[1]) == new, "{orders:?}");
        ensure!(orders.iter().all(|order| order.state == OrderState::Valid), "{orders:?}");
        let status = fleet.api.get(&format!("/v1/applications/{web}/status")).await?;
        ensure!(status["certificate_status"] == "valid", "{status}");
        let expires: chrono::DateTime<chrono::Utc> = serde_json::from_value(status["certificate_expires_at"].clone())?;
        ensure!(expires == not_after, "the status shows the new certificate: {status}");
        stop_edge.send(true)?;
        let _ = tokio::time::timeout(WAIT, edge_task).await;
        anyhow::Ok(())
    }
    .await;
    server.stop().await?;
    http_task.abort();
    result.map_err(|error| {
        anyhow::anyhow!("{error:#}\nPebble's log:\n{}", std::fs::read_to_string(&pebble.log).unwrap_or_default())
    })
}
