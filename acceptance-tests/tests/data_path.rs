//! The data path end to end (issue 5), with every part real: the server (SQLite), an edge and
//! two agents with real WireGuard tunnels, each in its own network namespace on a bridge
//! (203.0.113.0/24), devices behind an nftables firewall that drops every new inbound
//! connection, applications running the `e2e_workload` binary as process workloads, Terraform
//! declaring them, and `curl` in a client namespace as the browser.
//!
//! One test walks the scenarios in order, printing what each step checks: HTTPS through the
//! edge with the internal CA and the client's address in `X-Forwarded-For`; HTTP/2, a WebSocket
//! echo and 100 MB each way with checksums, and a raw TCP application; refusals (unknown SNI,
//! no SNI, a Host that is not the SNI's) that never reach a workload; movability (the device changes address); a device
//! going offline and coming back; and a placement moved by Terraform. Another runs the local
//! platform with `--check`.
//!
//! Needs root, `ip`, `nft`, `nsenter`, `curl` and `terraform`; runs with `EDGIBLE_ACC=1` after
//! `cargo build --workspace --bins`.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{Application, Device, DeviceState};
use edgible_acceptance_tests::netns::{
    CLIENT_ADDRESS, DEV1_ADDRESS, DEV2_ADDRESS, EDGE_ADDRESS, SERVER_ADDRESS, Topology, log_tail,
};
use edgible_acceptance_tests::platform::{
    CurlOutput, EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer, curl, metric, metric_sum, through_edge, tls_connector,
};
use edgible_acceptance_tests::terraform::Terraform;
use edgible_acceptance_tests::workload::{field, fill_pattern, pattern_sha256};
use edgible_acceptance_tests::{heavy_tier, wait_for};
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

/// Application A's hostname (first on dev1, moved to dev2 at the end).
const HOST_A: &str = "a.example.test";
/// Application B's hostname (on dev2).
const HOST_B: &str = "b.example.test";
/// Application C's hostname (on dev2, exposed as raw TLS-terminated TCP).
const HOST_C: &str = "c.example.test";
/// The size of the streamed upload and download.
const TRANSFER: u64 = 100 << 20;
/// How long the first request may take: certificates are issued and tunnels come up.
const FIRST_REQUEST: Duration = Duration::from_secs(180);
/// How long any later change (a move, an agent back, a placement) may take to be served.
const CONVERGE: Duration = Duration::from_secs(120);
/// How long service may take to come back after the device changed address.
const MOVABILITY: Duration = Duration::from_secs(45);
/// How long one `terraform apply` may take.
const APPLY: Duration = Duration::from_secs(300);
/// A refusal by the edge must come at least this fast (no waiting for a timeout).
const QUICK_REFUSAL: Duration = Duration::from_secs(5);

/// The Terraform configuration: pool, edge, two devices, applications A and B, A placed on
/// `a_device`, B on dev2, and C (raw TCP) on dev2.
fn configuration(workload: &Path, a_device: &str) -> String {
    let workload = workload.display();
    format!(
        r#"
provider "edgible" {{}}

resource "edgible_device_pool" "pool" {{
  name        = "e2e"
  tunnel_cidr = "100.64.10.0/24"
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

resource "edgible_device" "dev2" {{
  name    = "dev2"
  pool_id = edgible_device_pool.pool.id
}}

resource "edgible_application" "a" {{
  name      = "app-a"
  hostnames = ["{HOST_A}"]
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

resource "edgible_application" "b" {{
  name      = "app-b"
  hostnames = ["{HOST_B}"]
  port      = 18082
  env       = {{ NAME = "app-b" }}
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

resource "edgible_application" "c" {{
  name      = "app-c"
  hostnames = ["{HOST_C}"]
  port      = 18083
  protocol  = "tcp"
  env       = {{ NAME = "app-c" }}
  workload {{
    process {{
      command = "{workload}"
    }}
  }}
}}

resource "edgible_placement" "a" {{
  application_id = edgible_application.a.id
  strategy       = "serving-device"
  device_id      = edgible_device.{a_device}.id
}}

resource "edgible_placement" "b" {{
  application_id = edgible_application.b.id
  strategy       = "serving-device"
  device_id      = edgible_device.dev2.id
}}

resource "edgible_placement" "c" {{
  application_id = edgible_application.c.id
  strategy       = "serving-device"
  device_id      = edgible_device.dev2.id
}}

output "edge_token" {{
  value     = edgible_edge.edge1.enrollment_token
  sensitive = true
}}

output "dev1_token" {{
  value     = edgible_device.dev1.enrollment_token
  sensitive = true
}}

output "dev2_token" {{
  value     = edgible_device.dev2.enrollment_token
  sensitive = true
}}
"#
    )
}

/// Everything one run holds. Fields drop in order: agents, edge and server stop before the
/// topology deletes the namespaces, and the directory goes last.
struct DataPath {
    agents: Vec<NsAgent>,
    edge: NsEdge,
    server: NsServer,
    terraform: Terraform,
    ca_file: PathBuf,
    ca_pem: String,
    topology: Topology,
    dir: tempfile::TempDir,
}

/// Prints a step of the walk.
fn step(text: &str) {
    eprintln!("==> {text}");
}

impl DataPath {
    /// The topology, the server, `terraform apply`, the edge and both agents, enrolled and
    /// running.
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("edgible-data-path-").tempdir()?;
        step("building the namespaces: edge, server, dev1, dev2, client on 203.0.113.0/24");
        let topology = Topology::build(
            "dp",
            &[
                ("edge", EDGE_ADDRESS),
                ("server", SERVER_ADDRESS),
                ("dev1", DEV1_ADDRESS),
                ("dev2", DEV2_ADDRESS),
                ("client", CLIENT_ADDRESS),
            ],
        )?;
        for device in ["dev1", "dev2"] {
            topology.namespace(device)?.install_device_firewall()?;
        }
        step(&format!("starting the server (SQLite) on {SERVER_ADDRESS}"));
        let server = NsServer::start(topology.namespace("server")?, SERVER_ADDRESS, &dir.path().join("server"))?;
        let ca_file = dir.path().join("ca.pem");
        let ca_pem = server.save_ca(&ca_file).await?;

        step("terraform apply: pool, edge, dev1, dev2, app-a on dev1, app-b on dev2");
        let terraform = Terraform::new(&dir.path().join("terraform"), &server.url, &server.admin_key)?;
        terraform.write_config(&configuration(Path::new(env!("CARGO_BIN_EXE_e2e_workload")), "dev1"))?;
        tokio::time::timeout(APPLY, terraform.apply()).await.context("terraform apply took over 300 s")??;
        let token = async |name: &str| -> anyhow::Result<String> {
            let output = terraform.run(&["output", "-raw", name]).await?.expect_success()?;
            Ok(output.stdout.trim().to_owned())
        };
        let (edge_token, dev1_token, dev2_token) =
            (token("edge_token").await?, token("dev1_token").await?, token("dev2_token").await?);

        step("enrolling and starting the edge");
        let mut edge = NsEdge::enroll(
            topology.namespace("edge")?,
            EDGE_ADDRESS,
            &server.url,
            &edge_token,
            &dir.path().join("edge"),
        )?;
        edge.start()?;
        let mut agents = Vec::new();
        for (name, token) in [("dev1", &dev1_token), ("dev2", &dev2_token)] {
            step(&format!("enrolling and starting the agent of {name}"));
            let mut agent =
                NsAgent::enroll(topology.namespace(name)?, name, &server.url, token, &dir.path().join(name))?;
            agent.start()?;
            agents.push(agent);
        }
        Ok(Self { agents, edge, server, terraform, ca_file, ca_pem, topology, dir })
    }

    fn agent(&mut self, name: &str) -> anyhow::Result<&mut NsAgent> {
        self.agents.iter_mut().find(|agent| agent.name == name).with_context(|| format!("no agent {name}"))
    }

    /// `curl` from the client namespace to `hostname` through the edge, plus `extra` arguments.
    fn curl(&self, hostname: &str, path: &str, extra: &[&str]) -> anyhow::Result<CurlOutput> {
        let mut args: Vec<String> = through_edge(hostname, EDGE_ADDRESS, &self.ca_file);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args.push(format!("https://{hostname}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(self.topology.namespace("client")?, &args)
    }

    /// One `GET /` of `hostname`: the workload's answer, or why there is none.
    fn greeting(&self, hostname: &str) -> anyhow::Result<String> {
        let output = self.curl(hostname, "/", &["--max-time", "10", "--fail-with-body"])?;
        anyhow::ensure!(output.success, "{output}");
        Ok(output.stdout)
    }

    /// Waits until `hostname` is answered by workload `name` running on device `device`.
    async fn served_by(&self, hostname: &str, name: &str, device: &str, timeout: Duration) -> anyhow::Result<String> {
        let namespace = self.topology.namespace(device)?.clone();
        let (answer, elapsed) = eventually(&format!("{hostname} served by {name} on {device}"), timeout, || {
            let answer = self.greeting(hostname)?;
            anyhow::ensure!(field(&answer, "name") == Some(name), "answered by another workload:\n{answer}");
            let pid: u32 = field(&answer, "pid").context("no pid in the answer")?.parse()?;
            anyhow::ensure!(namespace.holds_pid(pid), "the workload (pid {pid}) does not run on {device}:\n{answer}");
            Ok(answer)
        })
        .await?;
        eprintln!("    {hostname} served by {name} on {device} after {elapsed:.1?}");
        Ok(answer)
    }

    /// The logs' ends, for a failure message.
    fn diagnose(&self) -> String {
        let mut text = String::new();
        text.push_str(&format!("--- server log\n{}\n", log_tail(&self.server.dir.join("server.log"), 6 << 10)));
        text.push_str(&format!("--- edge log\n{}\n", log_tail(&self.edge.dir.join("edge.log"), 6 << 10)));
        for agent in &self.agents {
            text.push_str(&format!("--- agent {} log\n{}\n", agent.name, log_tail(&agent.home.log_file(), 6 << 10)));
        }
        text
    }
}

/// Tries `attempt` every 500 ms until it succeeds or `timeout` passes; answers its value and
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
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The hex SHA-256 of a file, read in chunks.
fn file_sha256(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok((hex::encode(digest.finalize()), len));
        }
        digest.update(&buffer[..read]);
        len += read as u64;
    }
}

/// Writes `len` bytes of the workload's pattern to `path`.
fn write_pattern(path: &Path, len: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buffer = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < len {
        let chunk = usize::try_from(len - offset).unwrap_or(buffer.len()).min(buffer.len());
        fill_pattern(offset, &mut buffer[..chunk]);
        file.write_all(&buffer[..chunk])?;
        offset += chunk as u64;
    }
    file.flush()?;
    Ok(())
}

/// A WebSocket to `wss://HOST_A/ws` through the edge, from the test's own namespace: echoes a
/// text and a 256 KiB binary message.
async fn websocket_echo(ca_pem: &str) -> anyhow::Result<()> {
    let connector = tls_connector(ca_pem, &[b"http/1.1"])?;
    let tcp = tokio::net::TcpStream::connect(SocketAddr::from((EDGE_ADDRESS, 443))).await?;
    let name = rustls::pki_types::ServerName::try_from(HOST_A)?;
    let tls = connector.connect(name, tcp).await.context("the TLS handshake through the edge")?;
    let (mut socket, response) = tokio_tungstenite::client_async(format!("wss://{HOST_A}/ws"), tls)
        .await
        .context("the WebSocket upgrade through the edge and the device's proxy")?;
    anyhow::ensure!(response.status() == 101, "the upgrade answered {}", response.status());
    let mut binary = vec![0u8; 256 << 10];
    fill_pattern(7, &mut binary);
    for message in [Message::text("hello through the tunnel"), Message::binary(binary)] {
        socket.send(message.clone()).await?;
        let echo = loop {
            match socket.next().await.context("the socket closed before the echo")?? {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => break other,
            }
        };
        anyhow::ensure!(echo == message, "the echo differs from what was sent ({} bytes back)", echo.len());
    }
    socket.close(None).await?;
    Ok(())
}

/// Before anything: the devices accept no inbound connection from the underlay. A connection
/// to a device's port 443 must time out (dropped by the firewall), not be refused nor served.
fn scenario_closed_devices(run: &DataPath) -> anyhow::Result<()> {
    for device in ["dev1", "dev2"] {
        let address = run.topology.address(device)?;
        step(&format!("0. {device} accepts no inbound connection: https://{address}/ from the client is dropped"));
        let output = curl(
            run.topology.namespace("client")?,
            &["--max-time", "3", "--insecure", &format!("https://{address}/")],
        )?;
        anyhow::ensure!(
            output.code == Some(28),
            "expected a timeout (curl exit 28), the firewall should drop it: {output}"
        );
    }
    Ok(())
}

/// Scenario 1: both applications through the edge, certificate verified against the CA, the
/// client's real address forwarded.
async fn scenario_https(run: &DataPath) -> anyhow::Result<()> {
    step("1. curl from the client to each hostname through the edge, verifying against the internal CA");
    for (hostname, name, device) in [(HOST_A, "app-a", "dev1"), (HOST_B, "app-b", "dev2")] {
        let answer = run.served_by(hostname, name, device, FIRST_REQUEST).await?;
        let client = CLIENT_ADDRESS.to_string();
        anyhow::ensure!(
            field(&answer, "x-forwarded-for") == Some(client.as_str()),
            "X-Forwarded-For should be the client's address {client}:\n{answer}"
        );
        anyhow::ensure!(field(&answer, "x-forwarded-proto") == Some("https"), "X-Forwarded-Proto:\n{answer}");
        anyhow::ensure!(field(&answer, "x-forwarded-host") == Some(hostname), "X-Forwarded-Host:\n{answer}");
    }
    let client = run.server.client()?;
    let application = client.find_by_name::<Application>("app-a").await?.context("app-a exists")?;
    let status = client.application_status(&application.id).await?;
    anyhow::ensure!(
        status.certificate_status.as_deref() == Some("valid")
            && status
                .certificate_expires_at
                .is_some_and(|at| std::time::SystemTime::from(at) > std::time::SystemTime::now()),
        "the application's status shows its certificate: {status:?}"
    );
    // Terraform shows the same after a refresh.
    let refresh = run.terraform.run(&["apply", "-refresh-only", "-auto-approve", "-no-color"]);
    tokio::time::timeout(APPLY, refresh).await.context("terraform refresh took over 300 s")??.expect_success()?;
    let shown = run.terraform.run(&["state", "show", "-no-color", "edgible_application.a"]).await?.expect_success()?;
    anyhow::ensure!(
        shown
            .stdout
            .lines()
            .filter_map(|line| line.split_once('='))
            .any(|(name, value)| { name.trim() == "certificate_status" && value.trim() == r#""valid""# }),
        "terraform state shows the certificate:\n{}",
        shown.stdout
    );
    Ok(())
}

/// Scenario 2: HTTP/2, a WebSocket echo, 100 MB up and down.
async fn scenario_protocols(run: &DataPath) -> anyhow::Result<()> {
    step("2a. HTTP/2 negotiated end to end (curl --http2)");
    let output = run.curl(HOST_A, "/", &["--http2", "--fail-with-body", "-w", "\nhttp_version=%{http_version}\n"])?;
    anyhow::ensure!(output.success, "{output}");
    anyhow::ensure!(field(&output.stdout, "http_version") == Some("2"), "HTTP/2 was not negotiated: {output}");
    anyhow::ensure!(field(&output.stdout, "name") == Some("app-a"), "{output}");

    step("2b. a WebSocket echo through edge and proxy");
    tokio::time::timeout(Duration::from_secs(60), websocket_echo(&run.ca_pem))
        .await
        .context("the WebSocket echo took over 60 s")??;

    step("2c. a 100 MB streaming upload, checksum checked by the workload");
    let upload = run.dir.path().join("upload.bin");
    write_pattern(&upload, TRANSFER)?;
    let upload_path = upload.display().to_string();
    let started = Instant::now();
    let output = run.curl(
        HOST_A,
        "/upload",
        &["--max-time", "600", "--fail-with-body", "-X", "POST", "--upload-file", &upload_path],
    )?;
    anyhow::ensure!(output.success, "{output}");
    let expected = pattern_sha256(TRANSFER);
    let bytes = TRANSFER.to_string();
    anyhow::ensure!(
        field(&output.stdout, "sha256") == Some(expected.as_str())
            && field(&output.stdout, "bytes") == Some(bytes.as_str()),
        "the workload received something else than the {TRANSFER} bytes sent (sha256 {expected}):\n{output}"
    );
    eprintln!("    uploaded 100 MB in {:.1?}", started.elapsed());
    std::fs::remove_file(&upload)?;

    step("2d. a 100 MB streaming download, checksum checked by the test");
    let download = run.dir.path().join("download.bin");
    let download_path = download.display().to_string();
    let started = Instant::now();
    let output = run.curl(
        HOST_A,
        &format!("/download?bytes={TRANSFER}"),
        &["--max-time", "600", "--fail", "-o", &download_path],
    )?;
    anyhow::ensure!(output.success, "{output}");
    let (digest, len) = file_sha256(&download)?;
    anyhow::ensure!(len == TRANSFER, "downloaded {len} bytes, expected {TRANSFER}");
    anyhow::ensure!(digest == expected, "the download arrived corrupted (sha256 {digest}, expected {expected})");
    eprintln!("    downloaded 100 MB in {:.1?}", started.elapsed());
    std::fs::remove_file(&download)?;

    step("2e. a raw TCP application: TLS ends on the device, the bytes reach the workload unchanged");
    // The workload happens to speak HTTP; behind a raw route it must see the client's request
    // exactly as sent (no X-Forwarded-* added), and no ALPN is agreed, so curl falls back to
    // HTTP/1.1 by itself.
    let answer = run.served_by(HOST_C, "app-c", "dev2", CONVERGE).await?;
    anyhow::ensure!(field(&answer, "x-forwarded-for") == Some("-"), "the raw route added headers:\n{answer}");
    let output = run.curl(HOST_C, "/", &["--fail-with-body", "-w", "\nhttp_version=%{http_version}\n"])?;
    anyhow::ensure!(output.success, "{output}");
    anyhow::ensure!(field(&output.stdout, "http_version") == Some("1.1"), "raw TCP negotiated HTTP/2: {output}");
    Ok(())
}

/// Scenario 3: unknown SNI, no SNI and a Host that is not the SNI's are refused, and none of
/// them reaches a workload.
async fn scenario_refusals(run: &DataPath) -> anyhow::Result<()> {
    let before = run.edge.metrics().await?;

    step("3a. an unknown SNI is refused by the edge with a TLS alert");
    let output = run.curl("unknown.example.test", "/", &["--max-time", "10"])?;
    anyhow::ensure!(!output.success, "an unknown name was served: {output}");
    anyhow::ensure!(output.code == Some(35), "expected a TLS handshake failure (curl exit 35): {output}");
    eprintln!("    curl: {}", output.stderr.trim());

    step("3b. a ClientHello without SNI (curl to the edge's IP) is refused");
    let ca = run.ca_file.display().to_string();
    let output = curl(
        run.topology.namespace("client")?,
        &["--max-time", "10", "--cacert", &ca, &format!("https://{EDGE_ADDRESS}/")],
    )?;
    anyhow::ensure!(!output.success, "a connection without SNI was served: {output}");
    anyhow::ensure!(output.code == Some(35), "expected a TLS handshake failure (curl exit 35): {output}");
    eprintln!("    curl: {}", output.stderr.trim());

    let after = run.edge.metrics().await?;
    let delta = |labels: &[&str]| {
        metric_sum(&after, "edgible_edge_connections_total", labels)
            - metric_sum(&before, "edgible_edge_connections_total", labels)
    };
    let (routed, unknown, no_sni) =
        (delta(&["outcome=\"routed\""]), delta(&["reason=\"unknown_name\""]), delta(&["reason=\"no_sni\""]));
    anyhow::ensure!(
        routed == 0.0 && unknown == 1.0 && no_sni == 1.0,
        "the edge should have refused both (one unknown_name, one no_sni) and routed neither to a device: \
         routed +{routed}, unknown_name +{unknown}, no_sni +{no_sni}\n{}",
        after.lines().filter(|line| line.starts_with("edgible_edge_connections_total")).collect::<Vec<_>>().join("\n")
    );

    step("3c. SNI of app-a with the Host of app-b: 421 from app-a's device, app-b never sees it");
    let output = run.curl(HOST_A, "/", &["-H", &format!("Host: {HOST_B}"), "-w", "\nstatus=%{http_code}\n"])?;
    anyhow::ensure!(field(&output.stdout, "status") == Some("421"), "expected 421 Misdirected Request: {output}");
    anyhow::ensure!(field(&output.stdout, "name").is_none(), "a workload answered a misdirected request: {output}");
    Ok(())
}

/// Scenario 4: dev1 changes its underlay address; service comes back without any restart.
async fn scenario_movability(run: &mut DataPath) -> anyhow::Result<()> {
    let moved = Ipv4Addr::new(203, 0, 113, 31);
    step(&format!("4. movability: dev1 moves from {DEV1_ADDRESS} to {moved}; {HOST_A} must be served again"));
    let agent_pid = run.agent("dev1")?.process.as_ref().map(|process| process.pid());
    run.topology.readdress("dev1", moved)?;
    run.served_by(HOST_A, "app-a", "dev1", MOVABILITY).await?;
    let agent = run.agent("dev1")?;
    anyhow::ensure!(
        agent.process.as_ref().map(|process| process.pid()) == agent_pid,
        "the agent was restarted during the move"
    );
    if let Some(process) = agent.process.as_mut() {
        process.check_running().context("dev1's agent died during the move")?;
    }
    Ok(())
}

/// Scenario 5: dev1's agent killed → the edge refuses quickly; agent back → served.
async fn scenario_offline(run: &mut DataPath) -> anyhow::Result<()> {
    step("5a. dev1's agent killed: the edge must refuse app-a quickly, with an alert");
    let offline = "edgible_edge_connections_total{outcome=\"refused\",reason=\"device_offline\"}";
    let offline_before = metric(&run.edge.metrics().await?, offline);
    run.agent("dev1")?.kill();
    let (took, elapsed) = eventually("the edge refusing app-a quickly", CONVERGE, || {
        let started = Instant::now();
        let output = run.curl(HOST_A, "/", &["--max-time", "10"])?;
        let took = started.elapsed();
        anyhow::ensure!(!output.success, "still served: {}", output.stdout.lines().next().unwrap_or_default());
        anyhow::ensure!(output.code == Some(35), "not refused by a TLS alert: {output}");
        anyhow::ensure!(took < QUICK_REFUSAL, "refused, but only after {took:.1?}: {output}");
        Ok(took)
    })
    .await?;
    eprintln!("    refused in {took:.2?}, {elapsed:.1?} after the agent died");
    let metrics = run.edge.metrics().await?;
    anyhow::ensure!(
        metric(&metrics, offline) > offline_before,
        "the edge did not count the refusal as device_offline:\n{}",
        metrics
            .lines()
            .filter(|line| line.starts_with("edgible_edge_connections_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    step("5b. dev1's agent back: app-a served again");
    run.agent("dev1")?.start()?;
    run.served_by(HOST_A, "app-a", "dev1", CONVERGE).await?;
    Ok(())
}

/// Scenario 6: Terraform moves app-a to dev2; the edge routes it there.
async fn scenario_placement(run: &DataPath) -> anyhow::Result<()> {
    step("6. terraform moves app-a from dev1 to dev2");
    run.terraform.write_config(&configuration(Path::new(env!("CARGO_BIN_EXE_e2e_workload")), "dev2"))?;
    tokio::time::timeout(APPLY, run.terraform.apply()).await.context("terraform apply took over 300 s")??;
    run.served_by(HOST_A, "app-a", "dev2", CONVERGE).await?;
    run.served_by(HOST_B, "app-b", "dev2", CONVERGE).await?;
    Ok(())
}

async fn walk(run: &mut DataPath) -> anyhow::Result<()> {
    let client = run.server.client()?;
    for name in ["dev1", "dev2"] {
        step(&format!("waiting for {name} to be online"));
        let client = &client;
        wait_for(&format!("{name} online"), CONVERGE, || async move {
            let device = client.find_by_name::<Device>(name).await.ok()??;
            (device.status.state == DeviceState::Online).then_some(())
        })
        .await?;
    }
    scenario_closed_devices(run)?;
    scenario_https(run).await?;
    scenario_protocols(run).await?;
    scenario_refusals(run).await?;
    scenario_movability(run).await?;
    scenario_offline(run).await?;
    scenario_placement(run).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_path_end_to_end() -> anyhow::Result<()> {
    if !heavy_tier("data_path_end_to_end") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut run = DataPath::start().await?;
    let result = walk(&mut run).await;
    if let Err(error) = result {
        let diagnosis = run.diagnose();
        let DataPath { agents, edge, server, topology, dir, .. } = run;
        drop((agents, edge, server, topology));
        let kept = dir.keep();
        return Err(error.context(format!("{diagnosis}\nlogs and Terraform state are kept in {}", kept.display())));
    }
    step("all scenarios passed");
    Ok(())
}

/// The local platform (`local_platform --check`): builds its own topology, deploys the hello
/// example and exits after the first request served through the edge.
#[test]
fn local_platform_serves_the_example() -> anyhow::Result<()> {
    if !heavy_tier("local_platform_serves_the_example") {
        return Ok(());
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_local_platform"))
        .arg("--check")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            // SIGTERM lets it tear its namespaces down.
            let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let output = child.wait_with_output()?;
            anyhow::bail!(
                "local_platform --check did not finish in 600 s:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(output.status.success(), "local_platform --check failed ({}):\n{stdout}\n{stderr}", output.status);
    anyhow::ensure!(
        stdout.contains(&format!("curl --resolve hello.example.test:443:{EDGE_ADDRESS} --cacert ")),
        "it did not print how to reach the app:\n{stdout}"
    );
    Ok(())
}

/// The workload on its own, on loopback: what the data path test relies on it answering.
#[tokio::test]
async fn the_workload_answers_hashes_streams_and_echoes() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e_workload"))
        .env("PORT", port.to_string())
        .env("NAME", "solo")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let base = format!("127.0.0.1:{port}");
    let result = async {
        let (status, body) = wait_for("the workload to listen", Duration::from_secs(20), || {
            let url = format!("http://{base}/");
            async move { edgible_acceptance_tests::platform::http_get(&url).await.ok() }
        })
        .await?;
        anyhow::ensure!(status == 200 && field(&body, "name") == Some("solo"), "GET / answered {status}: {body}");
        anyhow::ensure!(field(&body, "x-forwarded-for") == Some("-"), "{body}");

        // Below 128 bytes the pattern is ASCII, so the text answer holds it unchanged.
        let (status, body) =
            edgible_acceptance_tests::platform::http_get(&format!("http://{base}/download?bytes=120")).await?;
        let mut expected = vec![0u8; 120];
        fill_pattern(0, &mut expected);
        anyhow::ensure!(status == 200 && body.as_bytes() == expected, "download answered {status}: {body:?}");
        let (status, body) =
            edgible_acceptance_tests::platform::http_get(&format!("http://{base}/download?bytes=x")).await?;
        anyhow::ensure!(status == 400 && body.contains("`bytes`"), "a bad query answered {status}: {body}");

        // An upload in two writes, hashed by the workload.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut payload = vec![0u8; 300_000];
        fill_pattern(0, &mut payload);
        let mut stream = tokio::net::TcpStream::connect(&base).await?;
        stream
            .write_all(
                format!(
                    "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    payload.len()
                )
                .as_bytes(),
            )
            .await?;
        stream.write_all(&payload[..1000]).await?;
        stream.write_all(&payload[1000..]).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        anyhow::ensure!(field(&answer, "sha256") == Some(pattern_sha256(300_000).as_str()), "{answer}");
        anyhow::ensure!(field(&answer, "bytes") == Some("300000"), "{answer}");

        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{base}/ws")).await?;
        socket.send(Message::text("ping?")).await?;
        let echo = socket.next().await.context("no echo")??;
        anyhow::ensure!(echo == Message::text("ping?"), "echo: {echo:?}");
        Ok(())
    }
    .await;
    let _ = child.kill().await;
    result
}
