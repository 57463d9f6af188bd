//! Certificates from a real ACME CA (issue 6): Debian's Pebble in its own namespace of the
//! data path topology, resolving every application hostname to the edge's public address and
//! validating HTTP-01 on the edge's :80.
//!
//! `pebble_issues_through_the_edge_address` proves the harness on its own, with an independent
//! ACME client (Debian's `lego`, answering HTTP-01 itself on :80 in the edge's namespace):
//! Pebble serves its directory over HTTPS verified by the generated CA (and by nothing else),
//! its DNS answers every name with the edge's address (and single names as told), Pebble
//! validates through that address on port 80, the chain it issues verifies against its root
//! from `/roots/0`, and the lifetime is the configured short validity (what scenario 2 needs
//! from Pebble 2.4).
//!
//! `acme_end_to_end` walks issue 6's scenarios in order with every part real: the server on
//! `--issuer acme` against Pebble, an edge, one device (agent behind the device firewall) and
//! Terraform declaring the application; `curl` in the client namespace verifies what the edge
//! serves against Pebble's root only.
//! 1. `terraform apply` of an application → a verified HTTPS response through the edge, the
//!    chain Pebble's and the names the application's; prints the time from the start of the
//!    apply to the first verified response.
//! 2. Pebble issues certificates valid [`VALIDITY`]; the device renews at two thirds of that:
//!    an HTTP/1.1 connection kept open (and used) across the swap keeps working, new
//!    connections get the new certificate.
//! 3. Pebble's validation requests to the edge's :80 are refused (nftables in the edge's
//!    namespace) → the renewal fails, the application's status says so and an event is
//!    recorded, the old certificate is still served; the path back → renewed.
//! 4. The server is killed right after Pebble created an order (the edge frozen, so the order
//!    cannot have completed) and started again → the order completes, with neither a second
//!    ACME account nor a second order at Pebble.
//!
//! Needs root, `ip`, `nsenter`, `nft`, `curl`, `terraform`, `pebble`, `pebble-challtestsrv` and
//! `lego`; runs with `EDGIBLE_ACC=1` after `cargo build --workspace --bins`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use edgible::client::EventQuery;
use edgible::model::{Application, ApplicationStatus, Device, DeviceState};
use edgible_acceptance_tests::netns::{
    ACME_ADDRESS, CLIENT_ADDRESS, DEV1_ADDRESS, EDGE_ADDRESS, SERVER_ADDRESS, Topology, log_tail, output_text,
    output_within,
};
use edgible_acceptance_tests::pebble::{
    CertificateFacts, Pebble, PebbleSettings, https_get, pem_chain, resolve_a, verify_chain,
};
use edgible_acceptance_tests::platform::{
    CurlOutput, EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer, ServerOptions, curl, through_edge, tls_connector,
};
use edgible_acceptance_tests::terraform::Terraform;
use edgible_acceptance_tests::workload::field;
use edgible_acceptance_tests::{heavy_tier, wait_for};
use http_body_util::{BodyExt as _, Empty};
use rustls::pki_types::{CertificateDer, ServerName};

/// The hostname the harness test orders a certificate for.
const HOST: &str = "harness.example.test";
/// The short validity the harness test configures.
const SHORT_VALIDITY: Duration = Duration::from_secs(120);
/// How long one `lego run` (account, order, validation, finalization) may take.
const LEGO_TIMEOUT: Duration = Duration::from_secs(120);

/// Prints a step of the walk.
fn step(text: &str) {
    eprintln!("==> {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_through_the_edge_address() -> anyhow::Result<()> {
    if !heavy_tier("pebble_issues_through_the_edge_address") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new().prefix("edgible-pebble-").tempdir()?;
    step("building the namespaces: acme, edge on 203.0.113.0/24");
    let topology = Topology::build("pb", &[("acme", ACME_ADDRESS), ("edge", EDGE_ADDRESS)])?;
    step(&format!("starting Pebble and its DNS on {ACME_ADDRESS}, every name at {EDGE_ADDRESS}"));
    let settings = PebbleSettings { validity: Some(SHORT_VALIDITY), ..PebbleSettings::for_edge(EDGE_ADDRESS) };
    let pebble =
        Pebble::start(topology.namespace("acme")?, ACME_ADDRESS, &dir.path().join("pebble"), &settings).await?;
    let result = harness_walk(&topology, &pebble, dir.path()).await;
    if let Err(error) = result {
        let logs = pebble.log_tail();
        drop((pebble, topology));
        let kept = dir.keep();
        return Err(error.context(format!("{logs}\nfiles are kept in {}", kept.display())));
    }
    Ok(())
}

async fn harness_walk(topology: &Topology, pebble: &Pebble, dir: &Path) -> anyhow::Result<()> {
    step("the directory is served over HTTPS, verified against the generated CA only");
    let directory = pebble.directory().await?;
    for field in ["newAccount", "newNonce", "newOrder"] {
        anyhow::ensure!(directory[field].is_string(), "the directory has no {field}: {directory}");
    }
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?.cert.pem();
    let refused = https_get(&pebble.directory_url(), &stranger).await;
    anyhow::ensure!(refused.is_err(), "Pebble's directory verified against an unrelated CA: {refused:?}");

    step("Pebble's DNS answers any name with the edge's address, and single names as told");
    let resolved = resolve_a(pebble.dns_address(), HOST).await?;
    anyhow::ensure!(resolved == [EDGE_ADDRESS], "{HOST} resolved to {resolved:?}");
    let elsewhere = std::net::Ipv4Addr::new(203, 0, 113, 77);
    pebble.add_a("other.example.test", elsewhere).await?;
    let resolved = resolve_a(pebble.dns_address(), "other.example.test").await?;
    anyhow::ensure!(resolved == [elsewhere], "after add-a, other.example.test resolved to {resolved:?}");
    pebble.clear_a("other.example.test").await?;
    let resolved = resolve_a(pebble.dns_address(), "other.example.test").await?;
    anyhow::ensure!(resolved == [EDGE_ADDRESS], "after clear-a, other.example.test resolved to {resolved:?}");

    step("Pebble's root, from its management interface");
    let root_pem = pebble.root_pem().await?;
    anyhow::ensure!(pebble.accounts_in_memory()? == 0, "Pebble has accounts before anyone registered");

    step(&format!("lego in the edge's namespace orders {HOST}, answering HTTP-01 on :80"));
    let lego_dir = dir.join("lego");
    let started = Instant::now();
    let mut command = topology.namespace("edge")?.exec("lego");
    command
        .env("LEGO_CA_CERTIFICATES", pebble.https_ca_file())
        .args(["--server", &pebble.directory_url(), "--accept-tos", "--email", "harness@example.test"])
        .args(["--domains", HOST, "--http", "--http.port", ":80", "--path"])
        .arg(&lego_dir)
        .arg("run");
    let output = output_within(&mut command, LEGO_TIMEOUT).context("running lego")?;
    anyhow::ensure!(output.status.success(), "lego failed ({}): {}", output.status, output_text(&output));
    eprintln!("    issued in {:.2?}", started.elapsed());

    let chain_file = lego_dir.join("certificates").join(format!("{HOST}.crt"));
    let chain_pem =
        std::fs::read_to_string(&chain_file).with_context(|| format!("reading {}", chain_file.display()))?;
    let facts = verify_chain(&pem_chain(&chain_pem)?, &root_pem, HOST)?;
    anyhow::ensure!(facts.dns_names == [HOST], "the certificate names {:?}", facts.dns_names);
    let lifetime = facts.lifetime();
    anyhow::ensure!(
        lifetime <= SHORT_VALIDITY && lifetime + Duration::from_secs(5) >= SHORT_VALIDITY,
        "the certificate lives {lifetime:?}, configured {SHORT_VALIDITY:?}"
    );
    eprintln!("    {HOST}: issued by {}, serial {}, valid {lifetime:?}", facts.issuer, facts.serial);
    let (accounts, orders) = (pebble.accounts_in_memory()?, pebble.orders_added()?);
    anyhow::ensure!((accounts, orders) == (1, 1), "Pebble counts {accounts} accounts and {orders} orders, not 1 and 1");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The scenarios of issue 6

/// The application's first hostname.
const HOST_A: &str = "a.example.test";
/// The hostname scenario 4 adds to the application.
const HOST_A2: &str = "a2.example.test";
/// The lifetime of every certificate Pebble issues in the walk. The device renews at two
/// thirds of it and asks again at most every 30 s after a failure, so a third of it must
/// hold a failed attempt, the path coming back and a second attempt.
const VALIDITY: Duration = Duration::from_secs(180);
/// The server's port in its namespace, fixed so a restarted server keeps its URL.
const SERVER_PORT: u16 = 7070;
/// How long one `terraform apply` may take.
const APPLY: Duration = Duration::from_secs(300);
/// How long the device may take to come online, and a certificate to be issued and served.
const CONVERGE: Duration = Duration::from_secs(120);
/// How often a condition is checked again: short, as the time to the first verified response
/// is measured with it (a failed attempt, a curl in the client namespace, takes 10-20 ms
/// itself).
const POLL: Duration = Duration::from_millis(20);
/// The nftables table scenario 3 adds in the edge's namespace.
const BLOCK_TABLE: &str = "edgible_test_acme_block";

/// The Terraform configuration: pool, edge, dev1, and, with `hostnames`, application `app-a`
/// placed on dev1.
fn configuration(workload: &Path, hostnames: Option<&[&str]>) -> String {
    let mut text = format!(
        r#"
provider "edgible" {{}}

resource "edgible_device_pool" "pool" {{
  name        = "acme"
  tunnel_cidr = "100.64.20.0/24"
}}

resource "edgible_edge" "edge1" {{
  name     = "edge1"
  pool_id  = edgible_device_pool.pool.id
  endpoint = "{EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}"
}}

resource "edgible_device" "dev1" {{
  name    = "dev1"
  pool_id = edgible_device_pool.pool.id
}}

output "edge_token" {{
  value     = edgible_edge.edge1.enrollment_token
  sensitive = true
}}

output "dev1_token" {{
  value     = edgible_device.dev1.enrollment_token
  sensitive = true
}}
"#
    );
    if let Some(hostnames) = hostnames {
        let hostnames = hostnames.iter().map(|name| format!("\"{name}\"")).collect::<Vec<_>>().join(", ");
        text.push_str(&format!(
            r#"
resource "edgible_application" "a" {{
  name      = "app-a"
  hostnames = [{hostnames}]
  port      = 18081
  env       = {{ NAME = "app-a" }}
  workload {{
    process {{
      command = "{workload}"
    }}
  }}
  health_check {{
    protocol         = "http"
    path             = "/health"
    interval_seconds = 2
    timeout_seconds  = 1
  }}
}}

resource "edgible_placement" "a" {{
  application_id = edgible_application.a.id
  strategy       = "serving-device"
  device_id      = edgible_device.dev1.id
}}
"#,
            workload = workload.display()
        ));
    }
    text
}

fn workload() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_e2e_workload"))
}

/// Everything one walk holds. Fields drop in order: the agent, edge, server and Pebble stop
/// before the topology deletes the namespaces, and the directory goes last.
struct AcmeRun {
    agent: NsAgent,
    edge: NsEdge,
    server: NsServer,
    server_options: ServerOptions,
    pebble: Pebble,
    terraform: Terraform,
    /// Pebble's root (of the certificates it issues), PEM and its file for curl.
    root_pem: String,
    root_file: PathBuf,
    topology: Topology,
    dir: tempfile::TempDir,
}

impl AcmeRun {
    /// The topology, Pebble, the server on `--issuer acme`, `terraform apply` of the pool, edge
    /// and device, and the edge and agent enrolled and running, the device online.
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("edgible-acme-").tempdir()?;
        step("building the namespaces: edge, server, dev1, client, acme on 203.0.113.0/24");
        let topology = Topology::build(
            "ac",
            &[
                ("edge", EDGE_ADDRESS),
                ("server", SERVER_ADDRESS),
                ("dev1", DEV1_ADDRESS),
                ("client", CLIENT_ADDRESS),
                ("acme", ACME_ADDRESS),
            ],
        )?;
        topology.namespace("dev1")?.install_device_firewall()?;
        step(&format!("starting Pebble on {ACME_ADDRESS}: every name at the edge, certificates valid {VALIDITY:?}"));
        let settings = PebbleSettings { validity: Some(VALIDITY), ..PebbleSettings::for_edge(EDGE_ADDRESS) };
        let pebble =
            Pebble::start(topology.namespace("acme")?, ACME_ADDRESS, &dir.path().join("pebble"), &settings).await?;
        let root_pem = pebble.root_pem().await?;
        let root_file = dir.path().join("pebble-root.pem");
        std::fs::write(&root_file, &root_pem)?;

        step(&format!("starting the server (SQLite) on {SERVER_ADDRESS}:{SERVER_PORT} with --issuer acme"));
        let server_dir = dir.path().join("server");
        let server_options = ServerOptions {
            port: SERVER_PORT,
            extra_args: vec![
                "--issuer".into(),
                "acme".into(),
                "--acme-directory".into(),
                pebble.directory_url(),
                "--acme-contact".into(),
                "ops@example.test".into(),
                "--acme-ca-bundle".into(),
                pebble.https_ca_file().display().to_string(),
                "--server-key-file".into(),
                server_dir.join("server.key").display().to_string(),
            ],
        };
        let server = NsServer::start_with(topology.namespace("server")?, SERVER_ADDRESS, &server_dir, &server_options)?;

        step("terraform apply: pool, edge, dev1");
        let terraform = Terraform::new(&dir.path().join("terraform"), &server.url, &server.admin_key)?;
        terraform.write_config(&configuration(workload(), None))?;
        tokio::time::timeout(APPLY, terraform.apply()).await.context("terraform apply took over 300 s")??;
        let token = async |name: &str| -> anyhow::Result<String> {
            let output = terraform.run(&["output", "-raw", name]).await?.expect_success()?;
            Ok(output.stdout.trim().to_owned())
        };
        let (edge_token, dev1_token) = (token("edge_token").await?, token("dev1_token").await?);

        step("enrolling and starting the edge and dev1's agent");
        let mut edge = NsEdge::enroll(
            topology.namespace("edge")?,
            EDGE_ADDRESS,
            &server.url,
            &edge_token,
            &dir.path().join("edge"),
        )?;
        edge.start()?;
        let mut agent =
            NsAgent::enroll(topology.namespace("dev1")?, "dev1", &server.url, &dev1_token, &dir.path().join("dev1"))?;
        agent.start()?;
        let run = Self { agent, edge, server, server_options, pebble, terraform, root_pem, root_file, topology, dir };
        let client = run.server.client()?;
        wait_for("dev1 online", CONVERGE, || {
            let client = &client;
            async move {
                let device = client.find_by_name::<Device>("dev1").await.ok()??;
                (device.status.state == DeviceState::Online).then_some(())
            }
        })
        .await?;
        Ok(run)
    }

    /// `curl` from the client namespace to `https://HOSTNAME/` through the edge, trusting
    /// Pebble's root only.
    fn curl(&self, hostname: &str) -> anyhow::Result<CurlOutput> {
        let mut args: Vec<String> = through_edge(hostname, EDGE_ADDRESS, &self.root_file);
        args.extend(["--max-time".to_owned(), "10".to_owned(), "--fail-with-body".to_owned()]);
        args.push(format!("https://{hostname}/"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(self.topology.namespace("client")?, &args)
    }

    /// Waits until the client gets `app-a`'s answer for `hostname`, verified against Pebble's
    /// root; answers how long that took.
    async fn verified(&self, hostname: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let ((), elapsed) = eventually(&format!("a verified HTTPS answer from {hostname}"), timeout, || {
            let output = self.curl(hostname)?;
            anyhow::ensure!(output.success, "{output}");
            anyhow::ensure!(field(&output.stdout, "name") == Some("app-a"), "answered by someone else: {output}");
            Ok(())
        })
        .await?;
        Ok(elapsed)
    }

    /// The certificate the edge serves for `hostname` to a new connection (from the test's
    /// namespace), verified against Pebble's root.
    async fn served(&self, hostname: &str) -> anyhow::Result<CertificateFacts> {
        let chain = served_chain(hostname, &self.root_pem).await?;
        verify_chain(&chain, &self.root_pem, hostname)
    }

    async fn application_status(&self) -> anyhow::Result<ApplicationStatus> {
        let client = self.server.client()?;
        let application = client.find_by_name::<Application>("app-a").await?.context("no application app-a")?;
        Ok(client.application_status(&application.id).await?)
    }

    /// The messages of app-a's events, newest first, with their ids.
    async fn events(&self) -> anyhow::Result<Vec<(String, String)>> {
        let client = self.server.client()?;
        let application = client.find_by_name::<Application>("app-a").await?.context("no application app-a")?;
        let query = EventQuery { application_id: Some(application.id), limit: Some(1000), ..EventQuery::default() };
        let page = client.events(&query).await?;
        Ok(page.items.into_iter().map(|event| (event.id.to_string(), event.message)).collect())
    }

    /// The logs' ends, for a failure message.
    fn diagnose(&self) -> String {
        format!(
            "--- server log\n{}\n--- edge log\n{}\n--- agent dev1 log\n{}\n{}\n",
            log_tail(&self.server.dir.join("server.log"), 8 << 10),
            edge_log_without_splices(&self.edge.dir.join("edge.log")),
            log_tail(&self.agent.home.log_file(), 6 << 10),
            self.pebble.log_tail()
        )
    }
}

/// The end of the edge's log without its per-connection lines, which would drown its hub
/// session and challenge lines in a failure message.
fn edge_log_without_splices(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|line| !line.contains("edgible_edge::splice")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Tries `attempt` every [`POLL`] until it succeeds or `timeout` passes; answers its value and
/// how long it took, or the last failure.
async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut attempt: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Duration)> {
    let started = Instant::now();
    loop {
        let error = match attempt() {
            Ok(value) => return Ok((value, started.elapsed())),
            Err(error) => error,
        };
        if started.elapsed() >= timeout {
            return Err(error.context(format!("{what}: not within {timeout:?}; the last attempt above")));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls app-a's status every [`POLL`] until `condition` holds or `timeout` passes; answers the
/// status and how long it took.
async fn wait_for_status(
    run: &AcmeRun,
    what: &str,
    timeout: Duration,
    condition: impl Fn(&ApplicationStatus) -> bool,
) -> anyhow::Result<(ApplicationStatus, Duration)> {
    let started = Instant::now();
    loop {
        let status = run.application_status().await;
        match &status {
            Ok(status) if condition(status) => return Ok((status.clone(), started.elapsed())),
            _ if started.elapsed() >= timeout => {
                anyhow::bail!("{what}: not within {timeout:?}; the last status: {status:?}")
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Whether a status says the certificate is valid.
fn certificate_valid(status: &ApplicationStatus) -> bool {
    status.certificate_status.as_deref() == Some("valid")
}

/// The chain the edge at [`EDGE_ADDRESS`] serves for `hostname`, the handshake verifying it
/// against `root_pem`.
async fn served_chain(hostname: &str, root_pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let tls = connect(hostname, root_pem).await?;
    let (_, connection) = tls.get_ref();
    let chain = connection.peer_certificates().context("the edge sent no certificate")?;
    Ok(chain.iter().map(|certificate| certificate.clone().into_owned()).collect())
}

/// A TLS connection to `hostname` through the edge, from the test's namespace, verified
/// against `root_pem` only.
async fn connect(
    hostname: &str,
    root_pem: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tls_connector(root_pem, &[b"http/1.1"])?;
    let name = ServerName::try_from(hostname.to_owned())?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((EDGE_ADDRESS, 443)).await?;
        anyhow::Ok(connector.connect(name, tcp).await?)
    };
    tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .with_context(|| format!("no TLS handshake with {hostname} through the edge within 10 s"))?
        .with_context(|| format!("the TLS handshake with {hostname} through the edge"))
}

/// One HTTP/1.1 connection kept open to `HOST_A`, with the certificate it was opened with.
struct KeptConnection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    certificate: CertificateFacts,
    requests: u32,
}

impl KeptConnection {
    async fn open(root_pem: &str) -> anyhow::Result<Self> {
        let tls = connect(HOST_A, root_pem).await?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()).context("no certificate")?;
        let certificate = CertificateFacts::read(leaf)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.context("HTTP/1.1")?;
        tokio::spawn(connection);
        Ok(Self { sender, certificate, requests: 0 })
    }

    /// One `GET /` on the connection: it must be answered by app-a.
    async fn request(&mut self) -> anyhow::Result<()> {
        let exchange = async {
            self.sender.ready().await.context("the kept connection closed")?;
            let request = hyper::Request::get("/").header("host", HOST_A).body(Empty::<Bytes>::new())?;
            let response = self.sender.send_request(request).await.context("the request on the kept connection")?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            anyhow::ensure!(status == 200 && field(&body, "name") == Some("app-a"), "answered {status}: {body}");
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(10), exchange).await.context("no answer within 10 s")??;
        self.requests += 1;
        Ok(())
    }
}

/// Scenario 1: terraform apply of an application → verified HTTPS through the edge.
async fn scenario_issuance(run: &AcmeRun) -> anyhow::Result<()> {
    step(&format!("1. terraform apply of app-a ({HOST_A}) on dev1; curl verifies against Pebble's root"));
    run.terraform.write_config(&configuration(workload(), Some(&[HOST_A])))?;
    let started = Instant::now();
    tokio::time::timeout(APPLY, run.terraform.apply()).await.context("terraform apply took over 300 s")??;
    let applied = started.elapsed();
    run.verified(HOST_A, CONVERGE).await?;
    let total = started.elapsed();
    eprintln!(
        "    terraform apply → first verified HTTPS response through the edge: {total:.2?} \
         (the apply itself {applied:.2?})"
    );
    let facts = run.served(HOST_A).await?;
    anyhow::ensure!(facts.dns_names == [HOST_A], "the certificate names {:?}", facts.dns_names);
    anyhow::ensure!(facts.issuer.contains("Pebble"), "not issued by Pebble: {}", facts.issuer);
    anyhow::ensure!(facts.lifetime() + Duration::from_secs(5) >= VALIDITY, "lifetime {:?}", facts.lifetime());
    eprintln!("    {HOST_A}: serial {}, issued by {}, valid {:?}", facts.serial, facts.issuer, facts.lifetime());
    let accounts = run.pebble.accounts_in_memory()?;
    anyhow::ensure!(accounts == 1, "the server registered {accounts} ACME accounts, not 1");
    let (status, _) =
        wait_for_status(run, "app-a's certificate_status valid", Duration::from_secs(30), certificate_valid).await?;
    eprintln!("    status: certificate {:?}, expires {:?}", status.certificate_status, status.certificate_expires_at);
    no_copy_of_the_device_keys(run)?;
    Ok(())
}

/// The applications' private keys exist only on the device: no file of the server (its
/// database included) or of the edge holds one, in DER or in PEM.
fn no_copy_of_the_device_keys(run: &AcmeRun) -> anyhow::Result<()> {
    let certs = run.agent.home.state_dir().join("certs");
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(&certs).with_context(|| format!("reading {}", certs.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "key") {
            let pem = std::fs::read_to_string(&path)?;
            let der = rcgen::KeyPair::from_pem(&pem)?.serialize_der();
            let body: String = pem.lines().filter(|line| !line.starts_with("-----")).collect();
            keys.push((path, der, body));
        }
    }
    anyhow::ensure!(!keys.is_empty(), "the device holds no application key in {}", certs.display());
    let mut checked = 0;
    for dir in [&run.server.dir, &run.edge.dir] {
        for file in files_below(dir)? {
            let bytes = std::fs::read(&file)?;
            for (key, der, body) in &keys {
                let holds_der = bytes.windows(der.len()).any(|window| window == der.as_slice());
                let holds_pem = bytes.windows(body.len()).any(|window| window == body.as_bytes());
                anyhow::ensure!(
                    !holds_der && !holds_pem,
                    "{} holds the device's key {}",
                    file.display(),
                    key.display()
                );
            }
            checked += 1;
        }
    }
    eprintln!("    no copy of the device's {} key(s) in the server's or edge's {checked} files", keys.len());
    Ok(())
}

/// Every regular file below `dir`.
fn files_below(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    Ok(files)
}

/// Waits until a new connection gets a certificate other than `old` (a renewal), making a
/// request on `kept` every 2 s meanwhile, each of which must be answered.
async fn wait_for_renewal(
    run: &AcmeRun,
    old: &CertificateFacts,
    kept: Option<&mut KeptConnection>,
    timeout: Duration,
) -> anyhow::Result<CertificateFacts> {
    let started = Instant::now();
    let mut kept = kept;
    loop {
        if let Some(kept) = kept.as_deref_mut() {
            kept.request().await.with_context(|| {
                format!("request {} on the connection kept open across the renewal", kept.requests + 1)
            })?;
        }
        match run.served(HOST_A).await {
            Ok(facts) if facts.serial != old.serial => return Ok(facts),
            Ok(_) => {}
            Err(error) => eprintln!("    (a new connection failed: {error:#})"),
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "no new certificate within {timeout:?}: still serial {} (not after {})",
            old.serial,
            old.not_after
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Scenario 2: the short-lived certificate is renewed; a kept connection keeps working.
async fn scenario_renewal(run: &AcmeRun) -> anyhow::Result<()> {
    step(&format!("2. renewal at 2/3 of {VALIDITY:?}: a connection kept open across the swap keeps working"));
    let old = run.served(HOST_A).await?;
    let mut kept = KeptConnection::open(&run.root_pem).await?;
    anyhow::ensure!(kept.certificate.serial == old.serial, "the kept connection got another certificate");
    let new = wait_for_renewal(run, &old, Some(&mut kept), VALIDITY).await?;
    anyhow::ensure!(new.not_before >= old.not_before, "the new certificate is older than the old one");
    anyhow::ensure!(new.dns_names == [HOST_A], "the new certificate names {:?}", new.dns_names);
    let age = new.not_before - old.not_before;
    eprintln!("    renewed {age} s after the first issuance: serial {} → {}", old.serial, new.serial);
    for _ in 0..3 {
        kept.request().await.context("a request on the kept connection after the swap")?;
    }
    eprintln!(
        "    the kept connection (certificate {}) answered {} requests across the swap",
        kept.certificate.serial, kept.requests
    );
    run.verified(HOST_A, Duration::from_secs(10)).await?;
    Ok(())
}

/// Scenario 3: the edge unreachable from Pebble during renewal → failure recorded, old
/// certificate served; reachable again → renewed.
async fn scenario_unreachable(run: &AcmeRun) -> anyhow::Result<()> {
    step("3. Pebble's validation requests to the edge's :80 are refused during the renewal");
    let current = run.served(HOST_A).await?;
    let events_before: Vec<String> = run.events().await?.into_iter().map(|(id, _)| id).collect();
    let edge = run.topology.namespace("edge")?;
    edge.nft_script(&format!(
        "table inet {BLOCK_TABLE} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n    \
         ip saddr {ACME_ADDRESS} tcp dport 80 reject with tcp reset\n  }}\n}}\n"
    ))?;
    let renew_at = current.not_before + i64::try_from(VALIDITY.as_secs() * 2 / 3)?;
    eprintln!("    serial {} is due for renewal at {renew_at}, expires at {}", current.serial, current.not_after);
    let until_expiry = Duration::from_secs(u64::try_from(current.not_after - unix_now()).unwrap_or(0));
    let (status, elapsed) =
        wait_for_status(run, "the renewal to fail", until_expiry.saturating_sub(Duration::from_secs(5)), |status| {
            status.certificate_status.as_deref().is_some_and(|text| text.starts_with("failed"))
        })
        .await?;
    eprintln!("    after {elapsed:.1?}: certificate_status {:?}", status.certificate_status);
    let events = run.events().await?;
    let new_events: Vec<&String> =
        events.iter().filter(|(id, _)| !events_before.contains(id)).map(|(_, message)| message).collect();
    let recorded = new_events.iter().any(|message| {
        let message = message.to_lowercase();
        message.contains("certificate") || message.contains("acme")
    });
    anyhow::ensure!(recorded, "no event about the failed renewal on app-a; new events: {new_events:?}");
    eprintln!("    events: {new_events:?}");
    let served = run.served(HOST_A).await.context("the old certificate while the renewal fails")?;
    anyhow::ensure!(
        served.serial == current.serial,
        "serial {} served, expected the old {}",
        served.serial,
        current.serial
    );
    run.verified(HOST_A, Duration::from_secs(10)).await?;

    step("3b. the edge reachable again: the certificate is renewed");
    edge.nft_script(&format!("delete table inet {BLOCK_TABLE}\n"))?;
    let renewed = wait_for_renewal(run, &current, None, VALIDITY).await?;
    eprintln!("    renewed: serial {} → {}", current.serial, renewed.serial);
    wait_for_status(run, "certificate_status valid again", Duration::from_secs(30), certificate_valid).await?;
    run.verified(HOST_A, Duration::from_secs(10)).await?;
    Ok(())
}

/// Scenario 4: the server killed in the middle of an order and started again.
async fn scenario_restart(run: &mut AcmeRun) -> anyhow::Result<()> {
    step(&format!("4. {HOST_A2} added; the server is killed right after Pebble created the order"));
    let (accounts, orders) = (run.pebble.accounts_in_memory()?, run.pebble.orders_added()?);
    let edge_pid = run.edge.process.as_ref().context("the edge is not running")?.pid();
    let edge_pid = nix::unistd::Pid::from_raw(i32::try_from(edge_pid)?);
    // Frozen, the edge neither acknowledges the challenges nor answers Pebble: the order
    // cannot complete before the server dies.
    nix::sys::signal::kill(edge_pid, nix::sys::signal::Signal::SIGSTOP)?;
    let result = async {
        run.terraform.write_config(&configuration(workload(), Some(&[HOST_A, HOST_A2])))?;
        tokio::time::timeout(APPLY, run.terraform.apply()).await.context("terraform apply took over 300 s")??;
        let pebble = &run.pebble;
        wait_for("Pebble to create the order", CONVERGE, || async move {
            (pebble.orders_added().ok()? > orders).then_some(())
        })
        .await?;
        run.server.process.kill();
        anyhow::Ok(())
    }
    .await;
    nix::sys::signal::kill(edge_pid, nix::sys::signal::Signal::SIGCONT)?;
    result?;
    step("4b. the server started again on the same database");
    run.server =
        NsServer::start_with(run.topology.namespace("server")?, SERVER_ADDRESS, &run.server.dir, &run.server_options)?;
    let elapsed = run.verified(HOST_A2, CONVERGE).await?;
    let facts = run.served(HOST_A2).await?;
    let mut names = facts.dns_names.clone();
    names.sort();
    anyhow::ensure!(names == [HOST_A, HOST_A2], "the certificate names {names:?}");
    eprintln!("    {HOST_A2} served {elapsed:.1?} after the restart, serial {}", facts.serial);
    let (accounts_after, orders_after) = (run.pebble.accounts_in_memory()?, run.pebble.orders_added()?);
    anyhow::ensure!(
        accounts_after == accounts,
        "Pebble holds {accounts_after} accounts, {accounts} before the restart"
    );
    anyhow::ensure!(
        orders_after == orders + 1,
        "Pebble created {} orders for the hostname change, not one",
        orders_after - orders
    );
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
}

async fn walk(run: &mut AcmeRun) -> anyhow::Result<()> {
    scenario_issuance(run).await?;
    scenario_renewal(run).await?;
    scenario_unreachable(run).await?;
    scenario_restart(run).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_end_to_end() -> anyhow::Result<()> {
    if !heavy_tier("acme_end_to_end") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut run = AcmeRun::start().await?;
    if let Err(error) = walk(&mut run).await {
        let diagnosis = run.diagnose();
        let AcmeRun { agent, edge, server, pebble, topology, dir, .. } = run;
        drop((agent, edge, server, pebble, topology));
        let kept = dir.keep();
        return Err(error.context(format!("{diagnosis}\nlogs and Terraform state are kept in {}", kept.display())));
    }
    step("all scenarios passed");
    Ok(())
}
