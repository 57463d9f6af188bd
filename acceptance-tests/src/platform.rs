//! The platform's processes inside a [`Topology`]: the server (SQLite) in its namespace on its
//! underlay address, an edge, and agents, each started through `nsenter` with its files and
//! log in a directory of its own; plus the clients the data path tests and the local platform
//! use: `curl` in a namespace, the edge's metrics, and a TLS connector trusting the server's
//! internal CA.
//!
//! Processes stop when dropped (see [`NsProcess`]); the topology kills whatever is left.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::AgentHome;
use crate::bin_path;
use crate::netns::{Namespace, NsProcess, output_text, output_within};

/// How long an enrollment (one request to the server) may take.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(60);

/// The edge's WireGuard port, also the port of its registered endpoint.
pub const EDGE_WIREGUARD_PORT: u16 = 51820;
/// The edge's admin (metrics) port, on its underlay address.
pub const EDGE_ADMIN_PORT: u16 = 9100;

/// The server, listening on `address` (an ephemeral port) in `namespace`.
#[derive(Debug)]
pub struct NsServer {
    pub process: NsProcess,
    /// `http://ADDRESS:PORT`
    pub url: String,
    /// The bootstrap key of organization `acme` (scopes: platform, which includes admin).
    pub admin_key: String,
    pub dir: PathBuf,
}

/// How [`NsServer::start_with`] runs the server beyond what [`NsServer::start`] does.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The port to listen on; 0 (the default) for an ephemeral one. A fixed port (free in the
    /// server's own namespace) lets a restarted server keep the URL that edges and agents
    /// enrolled with.
    pub port: u16,
    /// More `serve` flags, e.g. the issuer's (`--issuer acme --acme-directory URL ...`).
    pub extra_args: Vec<String>,
}

impl NsServer {
    /// Starts a server with a fresh SQLite database in `dir`, bootstrapped with organization
    /// `acme`, and waits until it listens.
    pub fn start(namespace: &Namespace, address: Ipv4Addr, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(namespace, address, dir, &ServerOptions::default())
    }

    /// Starts a server like [`NsServer::start`], with `options`. On a `dir` a server used
    /// before, it is a restart: the same database (bootstrap only happens on an empty one),
    /// its log appended to.
    pub fn start_with(
        namespace: &Namespace,
        address: Ipv4Addr,
        dir: &Path,
        options: &ServerOptions,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ready_file = dir.join("server.ready");
        // A restart must not take the previous run's address for its own.
        match std::fs::remove_file(&ready_file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::new(error).context(format!("removing {}", ready_file.display())));
            }
            _ => {}
        }
        let key_file = dir.join("admin.key");
        let database = format!("sqlite://{}?mode=rwc", dir.join("edgible.db").display());
        let mut command = namespace.nsenter(&bin_path("edgible-server")?);
        command
            .args([
                "serve",
                "--database",
                &database,
                "--listen",
                &format!("{address}:{}", options.port),
                "--ready-file",
            ])
            .arg(&ready_file)
            .args(["--bootstrap", "acme", "--bootstrap-key-file"])
            .arg(&key_file)
            // Short pings: a session whose device moved or died is noticed within seconds.
            .args(["--agent-ping-seconds", "5", "--agent-pong-timeout-seconds", "5"])
            .args(&options.extra_args)
            .env("RUST_LOG", "info,edgible_server=debug");
        let mut process = namespace.spawn("edgible-server", command, &dir.join("server.log"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Ok(url) = std::fs::read_to_string(&ready_file)
                && !url.trim().is_empty()
            {
                break url.trim().to_owned();
            }
            process.check_running()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "edgible-server did not become ready in 60 s; its log:\n{}",
                process.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let admin_key = std::fs::read_to_string(&key_file)
            .with_context(|| format!("reading the bootstrap key {}", key_file.display()))?
            .trim()
            .to_owned();
        Ok(Self { process, url, admin_key, dir: dir.to_owned() })
    }

    /// A REST client with the bootstrap key.
    pub fn client(&self) -> anyhow::Result<edgible::Client> {
        Ok(edgible::Client::new(&self.url, &self.admin_key)?)
    }

    /// The internal CA's certificate, fetched from `GET /v1/ca.pem`, written to `path`.
    pub async fn save_ca(&self, path: &Path) -> anyhow::Result<String> {
        let url = format!("{}/v1/ca.pem", self.url);
        let (status, body) = http_get(&url).await.with_context(|| format!("fetching {url}"))?;
        anyhow::ensure!(status == 200, "GET {url} answered {status}: {body}");
        anyhow::ensure!(body.contains("BEGIN CERTIFICATE"), "GET {url} is not a PEM certificate: {body}");
        std::fs::write(path, &body)?;
        Ok(body)
    }
}

/// An edge: its state directory, and its process once running.
#[derive(Debug)]
pub struct NsEdge {
    namespace: Namespace,
    pub dir: PathBuf,
    pub process: Option<NsProcess>,
    /// Where its metrics are served (reachable from the root namespace).
    pub admin: SocketAddr,
}

impl NsEdge {
    /// Enrolls an edge with `token`; its state lives in `dir/state`.
    pub fn enroll(
        namespace: &Namespace,
        address: Ipv4Addr,
        server: &str,
        token: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let state_dir = dir.join("state");
        let mut command = namespace.nsenter(&bin_path("edgible-edge")?);
        command
            .args(["enroll", "--server", server, "--token", token, "--state-dir"])
            .arg(&state_dir)
            .env_remove("RUST_LOG");
        let output = output_within(&mut command, ENROLL_TIMEOUT).context("running edgible-edge enroll")?;
        anyhow::ensure!(
            output.status.success(),
            "edgible-edge enroll failed ({}): {}",
            output.status,
            output_text(&output)
        );
        Ok(Self {
            namespace: namespace.clone(),
            dir: dir.to_owned(),
            process: None,
            admin: SocketAddr::from((address, EDGE_ADMIN_PORT)),
        })
    }

    /// Runs the edge: TLS on :443, HTTP on :80, metrics on the admin address.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut command = self.namespace.nsenter(&bin_path("edgible-edge")?);
        command
            .args(["run", "--state-dir"])
            .arg(self.dir.join("state"))
            .args(["--https-listen", "0.0.0.0:443", "--http-listen", "0.0.0.0:80", "--admin-listen"])
            .arg(self.admin.to_string())
            .args(["--wireguard-port", &EDGE_WIREGUARD_PORT.to_string()])
            .env("RUST_LOG", "info,edgible_edge=debug");
        self.process = Some(self.namespace.spawn("edgible-edge", command, &self.dir.join("edge.log"))?);
        Ok(())
    }

    /// The edge's Prometheus metrics.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.admin);
        let (status, body) = http_get(&url).await.with_context(|| format!("fetching {url}"))?;
        anyhow::ensure!(status == 200, "GET {url} answered {status}: {body}");
        Ok(body)
    }

    /// The edge's log so far.
    pub fn log_tail(&self) -> String {
        crate::netns::log_tail(&self.dir.join("edge.log"), 16 << 10)
    }
}

/// An agent in a device namespace: its home (whose drop kills the workloads it recorded) and
/// its process when running.
#[derive(Debug)]
pub struct NsAgent {
    namespace: Namespace,
    pub name: String,
    pub process: Option<NsProcess>,
    // After the process: workloads are killed once the agent is gone.
    pub home: AgentHome,
}

impl NsAgent {
    /// Enrolls device `name` with `token`, its home in `dir`.
    pub fn enroll(namespace: &Namespace, name: &str, server: &str, token: &str, dir: &Path) -> anyhow::Result<Self> {
        let home = AgentHome::new(dir)?;
        let mut command = namespace.nsenter(&bin_path("edgible-agent")?);
        command
            .args(["enroll", "--server", server, "--token", token, "--state-dir"])
            .arg(home.state_dir())
            .env_remove("RUST_LOG");
        let output = output_within(&mut command, ENROLL_TIMEOUT).context("running edgible-agent enroll")?;
        anyhow::ensure!(
            output.status.success(),
            "edgible-agent enroll failed ({}): {}",
            output.status,
            output_text(&output)
        );
        Ok(Self { namespace: namespace.clone(), name: name.to_owned(), process: None, home })
    }

    /// Runs the agent with test-friendly timing, no container engine, the default tunnel
    /// interface (`edgible0`, which the device firewall trusts) and proxy port 443.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.start_with(&[])
    }

    /// Runs the agent like [`NsAgent::start`], with more `run` flags (a cloud host's
    /// `--cloud-host --host-vcpus ...`).
    pub fn start_with(&mut self, extra_args: &[String]) -> anyhow::Result<()> {
        let mut command = self.namespace.nsenter(&bin_path("edgible-agent")?);
        command
            .args(["run", "--state-dir"])
            .arg(self.home.state_dir())
            .args(["--no-containers", "--reconnect-max-seconds", "2", "--stop-grace-seconds", "3"])
            .args(["--requeue-seconds", "2", "--tunnel-interface", "edgible0", "--proxy-port", "443"])
            .args(extra_args)
            .env("RUST_LOG", "info,edgible_agent=debug");
        let name = format!("edgible-agent ({})", self.name);
        self.process = Some(self.namespace.spawn(&name, command, &self.home.log_file())?);
        Ok(())
    }

    /// Kills the agent at once (SIGKILL); its workloads keep running, like after a crash.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// The agent's log so far (its end).
    pub fn log_tail(&self) -> String {
        crate::netns::log_tail(&self.home.log_file(), 16 << 10)
    }
}

/// What one `curl` run printed.
#[derive(Debug)]
pub struct CurlOutput {
    pub args: String,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for CurlOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`curl {}` exited with {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `curl -sS ARGS` inside `namespace`, with a 60 s cap on the whole transfer unless `ARGS`
/// set their own `--max-time`.
pub fn curl(namespace: &Namespace, args: &[&str]) -> anyhow::Result<CurlOutput> {
    let mut command: Command = namespace.exec("curl");
    command.arg("-sS");
    if !args.contains(&"--max-time") {
        command.args(["--max-time", "60"]);
    }
    // curl's own --max-time bounds the transfer; this bounds a curl that hangs anyway.
    let output = output_within(command.args(args), Duration::from_secs(900)).context("running curl")?;
    Ok(CurlOutput {
        args: args.join(" "),
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// The arguments that make curl reach `hostname` through the edge at `edge` and check the
/// certificate against the CA in `ca_file`.
pub fn through_edge(hostname: &str, edge: Ipv4Addr, ca_file: &Path) -> Vec<String> {
    vec!["--resolve".to_owned(), format!("{hostname}:443:{edge}"), "--cacert".to_owned(), ca_file.display().to_string()]
}

/// The value of one metric sample (`name{labels}` exactly as printed), 0 when absent.
pub fn metric(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The sum of every sample of metric `name` whose labels contain all of `labels`
/// (`outcome="routed"`).
pub fn metric_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            let rest = sample.strip_prefix(name)?;
            let matches = (rest.is_empty() || rest.starts_with('{')) && labels.iter().all(|label| rest.contains(label));
            matches.then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A TLS connector that trusts only the CA in `ca_pem`, offering `alpn` protocols.
pub fn tls_connector(ca_pem: &str, alpn: &[&[u8]]) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(certificate.context("parsing the CA's PEM")?).context("adding the CA")?;
    }
    anyhow::ensure!(!roots.is_empty(), "the CA PEM holds no certificate");
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A plain `GET` over HTTP/1.0 (no TLS): answers the status and the body.
pub async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(index) => (&rest[..index], &rest[index..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange).await.context("no answer within 10 s")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("the answer has no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP edgible_edge_connections_total Connections.
# TYPE edgible_edge_connections_total counter
edgible_edge_connections_total{outcome=\"routed\",reason=\"exact\"} 3
edgible_edge_connections_total{outcome=\"routed\",reason=\"wildcard\"} 1
edgible_edge_connections_total{outcome=\"refused\",reason=\"unknown_name\"} 2
edgible_edge_connections_total_other 9
edgible_edge_connections_active 4
";

    #[test]
    fn metrics_are_read_by_sample_and_summed_by_labels() {
        assert_eq!(metric(METRICS, "edgible_edge_connections_active"), 4.0);
        assert_eq!(metric(METRICS, "edgible_edge_connections_total{outcome=\"refused\",reason=\"unknown_name\"}"), 2.0);
        assert_eq!(metric(METRICS, "missing"), 0.0);
        assert_eq!(metric_sum(METRICS, "edgible_edge_connections_total", &["outcome=\"routed\""]), 4.0);
        assert_eq!(metric_sum(METRICS, "edgible_edge_connections_total", &[]), 6.0);
        assert_eq!(metric_sum(METRICS, "edgible_edge_connections_total", &["reason=\"no_sni\""]), 0.0);
    }

    #[test]
    fn curl_goes_through_the_edge_with_the_ca() {
        let args = through_edge("a.example.test", Ipv4Addr::new(203, 0, 113, 1), Path::new("/tmp/ca.pem"));
        assert_eq!(args, ["--resolve", "a.example.test:443:203.0.113.1", "--cacert", "/tmp/ca.pem"]);
    }

    #[test]
    fn a_connector_needs_a_certificate() {
        assert!(tls_connector("not a pem", &[]).is_err());
    }

    #[tokio::test]
    async fn http_get_reads_status_and_body() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            let mut request = [0u8; 1024];
            let read = stream.read(&mut request).await?;
            let asked = String::from_utf8_lossy(&request[..read]).into_owned();
            stream.write_all(b"HTTP/1.0 201 Created\r\nContent-Type: text/plain\r\n\r\nbody").await?;
            anyhow::Ok(asked)
        });
        let (status, body) = http_get(&format!("http://{address}/metrics")).await?;
        assert_eq!((status, body.as_str()), (201, "body"));
        assert!(server.await??.starts_with("GET /metrics HTTP/1.0\r\n"));
        Ok(())
    }
}
