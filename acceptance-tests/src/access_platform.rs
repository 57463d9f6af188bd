//! The platform the access policy tests (`tests/access.rs`, `tests/browser.rs`) run against:
//! a namespace [`Topology`] (server, edge, one device behind its firewall, a client), the
//! server on a fixed port so its public URL (where login pages live) is known before it
//! starts, one edge and one agent, and one `e2e_workload` application per access policy on
//! the device, created through the API.
//!
//! It also holds the clients the tests use: `curl` from the client namespace through the edge
//! ([`AccessPlatform::request`], which parses status and headers), and an HTTPS client in the
//! test's own (root) namespace that reaches the edge over the bridge, for loops that must be
//! fast enough to time (key revocation, brute force).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{
    Application, ApplicationPhase, ApplicationSpec, Device, DeviceCreated, DevicePool, DeviceState, Edge, EdgeCreated,
    Member, MemberSpec, PasswordSpec, Placement, PlacementSpec, Role,
};
use serde_json::json;

use crate::netns::{CLIENT_ADDRESS, DEV1_ADDRESS, EDGE_ADDRESS, SERVER_ADDRESS, Topology, log_tail};
use crate::platform::{CurlOutput, EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer, ServerOptions, curl, through_edge};

/// The server's port in its namespace: fixed, so `--public-url` can name it.
pub const SERVER_PORT: u16 = 8080;
/// How long the applications may take to be served after the platform started (certificates
/// issued, tunnel up, workloads healthy).
pub const FIRST_SERVED: Duration = Duration::from_secs(180);

/// One application to create: its name (also the workload's `NAME`), hostname, port and
/// `access` policy as JSON (`{}` for public).
#[derive(Debug, Clone)]
pub struct AppDef {
    pub name: &'static str,
    pub hostname: &'static str,
    pub port: u16,
    pub access: serde_json::Value,
}

/// The server's flags for access policies.
#[derive(Debug, Clone, Default)]
pub struct AccessOptions {
    /// `--access-session-ttl` in seconds; the server's default when absent.
    pub session_ttl_seconds: Option<u64>,
}

/// What one request answered: the status, the headers (names in lower case) and the body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The curl run, for messages.
    pub raw: String,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// Parses `curl -i` output: the last header block (after any `100 Continue` and any redirect
    /// followed with `-L`), then the body.
    pub fn parse(output: &CurlOutput) -> anyhow::Result<Self> {
        anyhow::ensure!(output.success, "{output}");
        let mut rest = output.stdout.as_str();
        loop {
            let (head, body) = rest
                .split_once("\r\n\r\n")
                .with_context(|| format!("no end of the headers in the answer: {output}"))?;
            let mut lines = head.lines();
            let status_line = lines.next().unwrap_or_default();
            let status: u16 = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .with_context(|| format!("no status in {status_line:?}: {output}"))?;
            // An interim answer, or a redirect curl followed (`-L`): the next block follows.
            if status == 100 || body.starts_with("HTTP/") {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect();
            return Ok(Self { status, headers, body: body.to_owned(), raw: output.to_string() });
        }
    }
}

/// Everything one run holds. Fields drop in order: agent, edge and server stop before the
/// topology deletes the namespaces, and the directory goes last.
pub struct AccessPlatform {
    pub agent: NsAgent,
    pub edge: NsEdge,
    pub server: NsServer,
    /// The applications created, by name.
    pub applications: Vec<Application>,
    pub ca_file: PathBuf,
    pub ca_pem: String,
    /// Where login pages are: `http://203.0.113.10:8080`.
    pub public_url: String,
    pub topology: Topology,
    pub dir: tempfile::TempDir,
}

/// Creates member `email` (role `member`, display name `name`) in `client`'s organization and
/// sets the password they log in with.
pub async fn member_with_password(
    client: &edgible::Client,
    email: &str,
    name: &str,
    password: &str,
) -> anyhow::Result<Member> {
    let spec = MemberSpec { email: email.to_owned(), display_name: Some(name.to_owned()), role: Role::Member };
    let member = client.create::<Member>(&spec).await.with_context(|| format!("creating member {email}"))?;
    client
        .set_member_password(&member.id, &PasswordSpec { password: password.to_owned() })
        .await
        .with_context(|| format!("setting {email}'s password"))?;
    Ok(member)
}

/// Prints a step of a walk.
pub fn step(text: &str) {
    eprintln!("==> {text}");
}

impl AccessPlatform {
    /// Builds the topology (namespaces `eg-<tag>-...`), starts the server with
    /// `--public-url` and `options`, creates pool, edge, device and `apps` (all placed on the
    /// device), starts edge and agent, and waits until every application runs with a valid
    /// certificate and the edge routes its name.
    pub async fn start(tag: &str, apps: &[AppDef], options: &AccessOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(&format!("edgible-{tag}-")).tempdir()?;
        step("building the namespaces: edge, server, dev1, client on 203.0.113.0/24");
        let topology = Topology::build(
            tag,
            &[("edge", EDGE_ADDRESS), ("server", SERVER_ADDRESS), ("dev1", DEV1_ADDRESS), ("client", CLIENT_ADDRESS)],
        )?;
        topology.namespace("dev1")?.install_device_firewall()?;
        let public_url = format!("http://{SERVER_ADDRESS}:{SERVER_PORT}");
        let mut extra_args = vec!["--public-url".to_owned(), public_url.clone()];
        if let Some(ttl) = options.session_ttl_seconds {
            extra_args.extend(["--access-session-ttl".to_owned(), ttl.to_string()]);
        }
        step(&format!("starting the server on {SERVER_ADDRESS}:{SERVER_PORT}: {}", extra_args.join(" ")));
        let server = NsServer::start_with(
            topology.namespace("server")?,
            SERVER_ADDRESS,
            &dir.path().join("server"),
            &ServerOptions { port: SERVER_PORT, extra_args },
        )?;
        let ca_file = dir.path().join("ca.pem");
        let ca_pem = server.save_ca(&ca_file).await?;

        step("creating pool, edge, device dev1 and the applications through the API");
        let client = server.client()?;
        let pool: DevicePool = client
            .create::<DevicePool>(&serde_json::from_value(json!({"name": "access", "tunnel_cidr": "100.64.30.0/24"}))?)
            .await
            .context("creating the pool")?;
        let edge: EdgeCreated = client
            .create::<Edge>(&serde_json::from_value(json!({
                "name": "edge1",
                "pool_id": pool.id,
                "endpoint": format!("{EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}"),
            }))?)
            .await
            .context("creating the edge")?;
        let device: DeviceCreated = client
            .create::<Device>(&serde_json::from_value(json!({"name": "dev1", "pool_id": pool.id}))?)
            .await
            .context("creating the device")?;
        let workload = crate::bin_path("e2e_workload")?;
        let mut applications = Vec::new();
        for app in apps {
            let spec: ApplicationSpec = serde_json::from_value(json!({
                "name": app.name,
                "hostnames": [app.hostname],
                "port": app.port,
                "env": {"NAME": app.name},
                "workload": {"process": {"command": workload.display().to_string()}},
                "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 2, "timeout_seconds": 1},
                "access": app.access,
            }))
            .with_context(|| format!("the spec of {}", app.name))?;
            let application =
                client.create::<Application>(&spec).await.with_context(|| format!("creating {}", app.name))?;
            let placement =
                PlacementSpec::ServingDevice { application_id: application.id, device_id: device.device.id };
            client.create::<Placement>(&placement).await.with_context(|| format!("placing {}", app.name))?;
            applications.push(application);
        }

        step("enrolling and starting the edge and dev1's agent");
        let mut edge = NsEdge::enroll(
            topology.namespace("edge")?,
            EDGE_ADDRESS,
            &server.url,
            &edge.enrollment_token,
            &dir.path().join("edge"),
        )?;
        edge.start()?;
        let mut agent = NsAgent::enroll(
            topology.namespace("dev1")?,
            "dev1",
            &server.url,
            &device.enrollment_token,
            &dir.path().join("dev1"),
        )?;
        agent.start()?;
        let platform = Self { agent, edge, server, applications, ca_file, ca_pem, public_url, topology, dir };
        if let Err(error) = platform.wait_served(apps).await {
            let diagnosis = platform.diagnose();
            let kept = platform.keep();
            return Err(error.context(format!("{diagnosis}\nlogs and database are kept in {}", kept.display())));
        }
        Ok(platform)
    }

    /// Waits until dev1 is online, every application runs its current revision with a valid
    /// certificate, and the edge routes every hostname to the device (an HTTP answer of any
    /// status through the edge).
    async fn wait_served(&self, apps: &[AppDef]) -> anyhow::Result<()> {
        let started = Instant::now();
        let client = self.server.client()?;
        let client = &client;
        crate::wait_for("dev1 online", FIRST_SERVED, || async move {
            let device = client.find_by_name::<Device>("dev1").await.ok()??;
            (device.status.state == DeviceState::Online).then_some(())
        })
        .await?;
        for application in &self.applications {
            let name = application.spec.name.to_string();
            let remaining = FIRST_SERVED.saturating_sub(started.elapsed());
            crate::wait_for(&format!("{name} running with a valid certificate"), remaining, || async move {
                let status = client.application_status(&application.id).await.ok()?;
                (status.phase == ApplicationPhase::Running
                    && status.revision == Some(status.application_revision)
                    && status.certificate_status.as_deref() == Some("valid"))
                .then_some(())
            })
            .await?;
        }
        for app in apps {
            let deadline = started + FIRST_SERVED;
            loop {
                let output =
                    self.curl(app.hostname, "/health", &["--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])?;
                if output.success && output.stdout.trim() != "000" {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "{} is not routed through the edge: {output}", app.hostname);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        eprintln!("    every application is served after {:.1?}", started.elapsed());
        Ok(())
    }

    /// The application named `name`.
    pub fn application(&self, name: &str) -> anyhow::Result<&Application> {
        self.applications
            .iter()
            .find(|application| application.spec.name.as_str() == name)
            .with_context(|| format!("no application {name}"))
    }

    /// `curl -sS` from the client namespace to `https://hostname{path}` through the edge,
    /// verifying against the platform's CA, plus `extra` arguments.
    pub fn curl(&self, hostname: &str, path: &str, extra: &[&str]) -> anyhow::Result<CurlOutput> {
        let mut args: Vec<String> = through_edge(hostname, EDGE_ADDRESS, &self.ca_file);
        // No proxy from the environment: the topology is reached directly.
        args.extend(["--noproxy".to_owned(), "*".to_owned()]);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args.push(format!("https://{hostname}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(self.topology.namespace("client")?, &args)
    }

    /// One request with `curl -i` (redirects not followed): status, headers and body.
    pub fn request(&self, hostname: &str, path: &str, extra: &[&str]) -> anyhow::Result<Answer> {
        let mut args = vec!["-i", "--max-time", "20"];
        args.extend_from_slice(extra);
        Answer::parse(&self.curl(hostname, path, &args)?)
    }

    /// An HTTPS client in the test's own namespace that sends `hostnames` to the edge and
    /// trusts only the platform's CA; it follows no redirects and keeps connections open.
    pub fn https_client(&self, hostnames: &[&str]) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(10));
        for hostname in hostnames {
            builder = builder.resolve(hostname, SocketAddr::from((EDGE_ADDRESS, 443)));
        }
        Ok(builder.build()?)
    }

    /// The public key hashes Chromium is told to accept (see `browser::spki_sha256_base64`):
    /// the internal CA's, and that of the certificate each of `hostnames` presents through
    /// the edge, verified here against the CA first.
    pub async fn trusted_spki(&self, hostnames: &[&str]) -> anyhow::Result<Vec<String>> {
        use rustls::pki_types::pem::PemObject;
        let mut hashes = Vec::new();
        for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            hashes.push(crate::browser::spki_sha256_base64(&certificate?)?);
        }
        let connector = crate::platform::tls_connector(&self.ca_pem, &[b"http/1.1"])?;
        for hostname in hostnames {
            let tcp = tokio::net::TcpStream::connect(SocketAddr::from((EDGE_ADDRESS, 443))).await?;
            let name = rustls::pki_types::ServerName::try_from(hostname.to_string())?;
            let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
                .await
                .with_context(|| format!("the TLS handshake with {hostname} took over 10 s"))?
                .with_context(|| format!("{hostname}'s certificate does not verify against the internal CA"))?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .with_context(|| format!("{hostname} presented no certificate"))?;
            hashes.push(crate::browser::spki_sha256_base64(leaf)?);
        }
        Ok(hashes)
    }

    /// The logs' ends, for a failure message.
    pub fn diagnose(&self) -> String {
        format!(
            "--- server log\n{}\n--- edge log\n{}\n--- agent log\n{}\n",
            log_tail(&self.server.dir.join("server.log"), 8 << 10),
            log_tail(&self.edge.dir.join("edge.log"), 4 << 10),
            log_tail(&self.agent.home.log_file(), 8 << 10)
        )
    }

    /// Tears everything down but keeps the directory (logs, database), answering its path.
    pub fn keep(self) -> PathBuf {
        let Self { agent, edge, server, topology, dir, .. } = self;
        drop((agent, edge, server, topology));
        dir.keep()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stdout: &str) -> CurlOutput {
        CurlOutput {
            args: String::new(),
            success: true,
            code: Some(0),
            stdout: stdout.to_owned(),
            stderr: String::new(),
        }
    }

    #[test]
    fn answers_are_parsed_after_any_continue() -> anyhow::Result<()> {
        let answer = Answer::parse(&output(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/2 303 \r\nlocation: /\r\n\r\n\
             HTTP/2 401 \r\nwww-authenticate: Bearer realm=\"a.example.test\"\r\nSet-Cookie: a=b\r\n\r\nbody\n",
        ))?;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.header("www-authenticate"), Some("Bearer realm=\"a.example.test\""));
        assert_eq!(answer.header("set-cookie"), Some("a=b"));
        assert_eq!(answer.body, "body\n");
        assert!(Answer::parse(&output("garbage")).is_err());
        Ok(())
    }
}
