//! The hub benchmark (not a test): API write → agent acknowledgement latency and server memory
//! per connected agent, against a real `edgible-server` process.
//!
//! For each agent count N it starts a release server on a fresh SQLite database, creates N
//! devices through the API and enrolls each (one WireGuard key per device), places one
//! application on each of up to 100 of them, and connects N simulated agents that speak the
//! real protocol over WebSockets: `hello`, then acknowledging every update the moment it
//! arrives and answering pings. It then updates the placed applications through the API, one
//! at a time and then from several writers at once, and measures from just before the write
//! request to the moment the affected agent received the delta and sent its `ack`. Server
//! memory is VmRSS from `/proc/PID/status` before and after the agents connect.
//!
//! Run (release, both binaries):
//!
//! ```text
//! cargo build --release -p edgible-server
//! cargo run --release -p edgible-acceptance-tests --bin hub_bench -- --agents 100,1000,10000
//! ```
//!
//! Options: `--agents N[,N...]` (default 100,1000,10000), `--samples K` writes per phase
//! (default 200), `--writers W` concurrent writers in the second phase (default 8).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use edgible::Client;
use edgible::model::{
    Application, ApplicationId, ApplicationSpec, Device, DeviceId, DevicePool, DevicePoolSpec, DeviceSpec,
    EnrollmentRequest, Placement, PlacementSpec, Revision,
};
use edgible::protocol::v1::{AgentMessage, ServerMessage};
use edgible::protocol::{decode, encode};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Devices per pool: a /22 holds 1022 addresses.
const DEVICES_PER_POOL: usize = 1000;
/// How many devices get an application (and so take part in the latency samples).
const PLACED: usize = 100;
/// Requests in flight while setting up.
const SETUP_CONCURRENCY: usize = 16;
/// WebSocket handshakes in flight while connecting agents.
const CONNECT_CONCURRENCY: usize = 200;
/// How long one write may take to be acknowledged before the run fails.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting all agents may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a simulated agent tells the bench which revision it acknowledged, and when.
type AckReceiver = mpsc::UnboundedReceiver<(Revision, Instant)>;

struct Options {
    agents: Vec<usize>,
    samples: usize,
    writers: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options { agents: vec![100, 1000, 10_000], samples: 200, writers: 8 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--agents" => {
                options.agents = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--samples" => options.samples = value()?.parse()?,
            "--writers" => options.writers = value()?.parse()?,
            other => bail!("unknown option {other}; see the module documentation"),
        }
    }
    ensure!(options.samples > 0 && options.writers > 0 && !options.agents.is_empty(), "nothing to measure");
    ensure!(options.agents.iter().all(|n| (1..=60_000).contains(n)), "agent counts must be 1-60000");
    Ok(options)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        bail!("a rustls crypto provider was already installed");
    }
    let options = options()?;
    let limit = raise_open_files_limit()?;
    let server_bin = edgible_acceptance_tests::bin_path("edgible-server")?;
    println!("hub_bench: open files limit {limit}, server {}", server_bin.display());
    let mut rows = Vec::new();
    for &agents in &options.agents {
        println!("hub_bench: {agents} agents ...");
        match run(agents, &options, &server_bin).await {
            Ok(row) => rows.push(row),
            Err(error) => {
                println!("hub_bench: {agents} agents FAILED: {error:#}");
                rows.push(Row { agents, failed: Some(format!("{error:#}")), ..Row::default() });
            }
        }
    }
    print_table(&rows, &options);
    Ok(())
}

/// Raises this process's soft open-files limit to the hard limit (the server raises its own).
fn raise_open_files_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

#[derive(Debug, Default)]
struct Row {
    agents: usize,
    setup: Duration,
    connect: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
    sequential: Vec<Duration>,
    concurrent: Vec<Duration>,
    failed: Option<String>,
}

async fn run(agents: usize, options: &Options, server_bin: &Path) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new().prefix("edgible-hub-bench-").tempdir()?;
    let server = Server::start(dir.path(), server_bin)?;
    let client = Client::new(&server.url, &server.key)?;
    let started = Instant::now();

    let pools = agents.div_ceil(DEVICES_PER_POOL);
    let mut pool_ids = Vec::new();
    for index in 0..pools {
        let spec: DevicePoolSpec = serde_json::from_value(
            json!({"name": format!("pool-{index}"), "tunnel_cidr": format!("100.64.{}.0/22", index * 4)}),
        )?;
        pool_ids.push(client.create::<DevicePool>(&spec).await?.id);
    }
    let devices: Vec<(DeviceId, String, String)> = futures::stream::iter(0..agents)
        .map(|index| {
            let client = client.clone();
            let url = server.url.clone();
            let pool_id = pool_ids[index / DEVICES_PER_POOL];
            async move {
                let spec = DeviceSpec { name: format!("device-{index}").parse()?, pool_id, labels: Default::default() };
                let created = client.create::<Device>(&spec).await?;
                let public_key = public_key(index);
                let request = EnrollmentRequest { token: created.enrollment_token, public_key: public_key.clone() };
                let enrollment = Client::enroll(&url, &request).await?;
                anyhow::Ok((created.device.id, public_key, enrollment.credential))
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let placed = agents.min(PLACED);
    let mut applications = Vec::new();
    for (index, (device_id, ..)) in devices.iter().enumerate().take(placed) {
        let application = client.create::<Application>(&application_spec(index, 0)?).await?;
        let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: *device_id };
        client.create::<Placement>(&placement).await?;
        applications.push(application.id);
    }
    let setup = started.elapsed();
    println!("hub_bench:   set up {agents} enrolled devices and {placed} placed applications in {setup:.1?}");

    let rss_before_kib = rss_kib(server.pid())?;
    let connected_at = Instant::now();
    let ready = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut acks = Vec::new();
    let mut tasks = Vec::new();
    for (index, (device_id, public_key, credential)) in devices.into_iter().enumerate() {
        let (ack_sender, ack_receiver) = mpsc::unbounded_channel();
        let ack_sender = (index < placed).then_some(ack_sender);
        if index < placed {
            acks.push(ack_receiver);
        }
        let agent = SimulatedAgent { url: server.url.clone(), device_id, public_key, credential };
        let ready = Arc::clone(&ready);
        let handshakes = Arc::clone(&handshakes);
        tasks.push(tokio::spawn(async move { agent.run(ready, handshakes, ack_sender).await }));
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while ready.load(Ordering::Relaxed) < agents {
        if let Some(failed) = tasks.iter().position(tokio::task::JoinHandle::is_finished) {
            let result = (&mut tasks[failed]).await?;
            bail!("agent {failed} stopped while connecting: {result:?}");
        }
        ensure!(Instant::now() < deadline, "only {} of {agents} agents connected", ready.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect = connected_at.elapsed();
    let gauge = connected_gauge(&server.url).await?;
    ensure!(gauge == agents as u64, "the server counts {gauge} connected agents, expected {agents}");
    let rss_after_kib = rss_kib(server.pid())?;
    println!(
        "hub_bench:   {agents} agents connected in {connect:.1?}; server RSS {} -> {} MiB",
        rss_before_kib / 1024,
        rss_after_kib / 1024
    );

    // One write at a time.
    let mut sequential = Vec::new();
    for sample in 0..options.samples {
        let index = sample % placed;
        sequential.push(write_and_wait(&client, applications[index], index, sample + 1, &mut acks[index]).await?);
    }
    // Several writers at once, each with its own applications.
    let writers = options.writers.min(placed);
    let mut groups: Vec<Vec<(usize, ApplicationId, AckReceiver)>> = (0..writers).map(|_| Vec::new()).collect();
    for (index, receiver) in acks.into_iter().enumerate() {
        groups[index % writers].push((index, applications[index], receiver));
    }
    let per_writer = options.samples.div_ceil(writers);
    let base = options.samples + 1;
    let mut writer_tasks = Vec::new();
    for mut group in groups {
        let client = client.clone();
        writer_tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for sample in 0..per_writer {
                let slot = sample % group.len();
                let (index, application, receiver) = &mut group[slot];
                latencies.push(write_and_wait(&client, *application, *index, base + sample, receiver).await?);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut concurrent = Vec::new();
    for task in writer_tasks {
        concurrent.extend(task.await??);
    }

    // The acknowledgements reached the database: a written device shows them.
    let device = client.find_by_name::<Device>("device-0").await?.context("device-0")?;
    ensure!(device.status.applied_revision.is_some(), "applied revisions are recorded: {:?}", device.status);

    for task in &tasks {
        task.abort();
    }
    server.stop()?;
    Ok(Row { agents, setup, connect, rss_before_kib, rss_after_kib, sequential, concurrent, failed: None })
}

/// Updates the application's environment and waits until its agent acknowledged the update;
/// answers the time from just before the request to the acknowledgement.
async fn write_and_wait(
    client: &Client,
    application: ApplicationId,
    index: usize,
    generation: usize,
    acks: &mut AckReceiver,
) -> anyhow::Result<Duration> {
    let spec = application_spec(index, generation)?;
    let started = Instant::now();
    let updated = client.update::<Application>(&application, None, &spec).await?;
    loop {
        let (revision, acked) = tokio::time::timeout(ACK_TIMEOUT, acks.recv())
            .await
            .with_context(|| format!("no ack of revision {} within {ACK_TIMEOUT:?}", updated.revision))?
            .context("the agent stopped")?;
        if revision >= updated.revision {
            return Ok(acked.saturating_duration_since(started));
        }
    }
}

fn application_spec(index: usize, generation: usize) -> anyhow::Result<ApplicationSpec> {
    Ok(serde_json::from_value(json!({
        "name": format!("app-{index}"),
        "hostnames": [format!("app-{index}.bench.example.com")],
        "workload": {"process": {"command": "/usr/bin/app", "env": {"GENERATION": generation.to_string()}}},
        "port": 8080
    }))?)
}

/// A distinct WireGuard public key per device.
fn public_key(index: usize) -> String {
    let mut bytes = [7_u8; 32];
    bytes[..8].copy_from_slice(&(index as u64).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An agent that speaks the real protocol and acknowledges every update at once.
struct SimulatedAgent {
    url: String,
    device_id: DeviceId,
    public_key: String,
    credential: String,
}

impl SimulatedAgent {
    async fn run(
        self,
        ready: Arc<AtomicUsize>,
        handshakes: Arc<Semaphore>,
        acks: Option<mpsc::UnboundedSender<(Revision, Instant)>>,
    ) -> anyhow::Result<()> {
        // Held until connected, so that only so many handshakes are in flight.
        let mut permit = Some(handshakes.acquire().await?);
        let url = format!("{}/v1/agent/connect", self.url.replacen("http", "ws", 1));
        let mut request = url.into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {}", self.credential).parse()?);
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
        let hello = AgentMessage::Hello {
            device_id: self.device_id,
            public_key: self.public_key.clone(),
            applied_revision: None,
            capabilities: vec!["process".into()],
            agent_version: "hub-bench".into(),
            cloud_host: None,
        };
        socket.send(Message::text(encode(&hello))).await?;
        let mut snapshot_taken = false;
        while let Some(frame) = socket.next().await {
            let text = match frame? {
                Message::Text(text) => text,
                Message::Close(close) => bail!("the server closed the session: {close:?}"),
                _ => continue,
            };
            match decode::<ServerMessage>(text.as_str())? {
                ServerMessage::ApplicationUpdate { revision, full, .. } => {
                    let acked = Instant::now();
                    socket.send(Message::text(encode(&AgentMessage::Ack { revision }))).await?;
                    if full && !snapshot_taken {
                        snapshot_taken = true;
                        permit.take();
                        ready.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(acks) = &acks {
                        // The bench may have stopped listening; the agent just goes on.
                        let _ = acks.send((revision, acked));
                    }
                }
                ServerMessage::Ping { nonce } => {
                    socket.send(Message::text(encode(&AgentMessage::Pong { nonce }))).await?
                }
                ServerMessage::Welcome { .. }
                | ServerMessage::Edges { .. }
                | ServerMessage::Certificate { .. }
                | ServerMessage::Access { .. }
                | ServerMessage::UsageAck { .. }
                | ServerMessage::MigrationStep { .. } => {}
                ServerMessage::Error { code, message } => bail!("the server sent an error: {code:?}: {message}"),
            }
        }
        bail!("the connection ended")
    }
}

/// The server's `edgible_hub_connected_agents` gauge.
async fn connected_gauge(url: &str) -> anyhow::Result<u64> {
    let text = http_get(&format!("{url}/metrics")).await?;
    text.lines()
        .find_map(|line| line.strip_prefix("edgible_hub_connected_agents ").and_then(|value| value.trim().parse().ok()))
        .context("no connected agents gauge in /metrics")
}

/// A plain GET through a bare TCP connection: the metrics need no client library.
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("an http URL")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// A release `edgible-server` on an ephemeral port with its own SQLite database; its log goes
/// to `server.log` in its directory. Logging is at `warn` so that it does not skew timings.
struct Server {
    child: Child,
    url: String,
    key: String,
}

impl Server {
    fn start(dir: &Path, bin: &Path) -> anyhow::Result<Server> {
        let ready_file = dir.join("server.ready");
        let key_file = dir.join("admin.key");
        let log = std::fs::File::create(dir.join("server.log"))?;
        let database = format!("sqlite://{}?mode=rwc", dir.join("edgible.db").display());
        let child = Command::new(bin)
            .args(["serve", "--database", &database, "--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready_file)
            .args(["--bootstrap", "bench", "--bootstrap-key-file"])
            .arg(&key_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting edgible-server")?;
        let mut server = Server { child, url: String::new(), key: String::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(url) = std::fs::read_to_string(&ready_file)
                && !url.trim().is_empty()
            {
                server.url = url.trim().to_owned();
                break;
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("edgible-server exited with {status}; see {}", dir.join("server.log").display());
            }
            ensure!(Instant::now() < deadline, "edgible-server did not become ready in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server.key = std::fs::read_to_string(&key_file)?.trim().to_owned();
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn millis(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1000.0)
}

fn print_table(rows: &[Row], options: &Options) {
    println!();
    println!(
        "API write -> agent ack latency (ms); {} sequential writes, then {} writes from {} concurrent writers",
        options.samples, options.samples, options.writers
    );
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>10} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7}",
        "agents",
        "setup s",
        "connect s",
        "RSS0 MiB",
        "RSS1 MiB",
        "KiB/agent",
        "seq p50",
        "p99",
        "max",
        "conc p50",
        "p99",
        "max"
    );
    for row in rows {
        if let Some(failed) = &row.failed {
            println!("{:>7} failed: {failed}", row.agents);
            continue;
        }
        let mut sequential = row.sequential.clone();
        sequential.sort();
        let mut concurrent = row.concurrent.clone();
        concurrent.sort();
        let per_agent = row.rss_after_kib.saturating_sub(row.rss_before_kib) as f64 / row.agents as f64;
        println!(
            "{:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7}",
            row.agents,
            row.setup.as_secs_f64(),
            row.connect.as_secs_f64(),
            row.rss_before_kib as f64 / 1024.0,
            row.rss_after_kib as f64 / 1024.0,
            per_agent,
            millis(percentile(&sequential, 0.50)),
            millis(percentile(&sequential, 0.99)),
            millis(sequential.last().copied().unwrap_or_default()),
            millis(percentile(&concurrent, 0.50)),
            millis(percentile(&concurrent, 0.99)),
            millis(concurrent.last().copied().unwrap_or_default()),
        );
    }
}
