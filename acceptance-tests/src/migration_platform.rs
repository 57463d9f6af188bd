//! The platform the migration test (`tests/migration.rs`) and the migration benchmark
//! (`src/bin/migration_bench.rs`) run against (issue 10): a namespace [`Topology`] with the
//! server (SQLite, on a fixed port so that a restart keeps the URL agents enrolled with, blobs
//! in a directory the test can reach), an edge, two devices (`dev1`, `dev2`, behind the device
//! firewall) and a client; one pool, both devices enrolled and online.
//!
//! Applications run the `e2e_workload` binary as process workloads; a stateful one has a
//! movable volume `data`, which the workload writes its records and fill file to. Clients of
//! the applications run in the `client` namespace: `curl` for single requests, and
//! [`in_namespace`] threads (a runtime of their own, inside the namespace) for the continuous
//! writers and load.
//!
//! What the tests measure from the client's side (the downtime of a move: last success on the
//! source, first success on the target) is computed by [`moves`], a pure function tested here.
//!
//! With a guest kernel ([`crate::cloud_platform::VmKernel`]), the platform also has a cloud:
//! an operator organization with a cloud pool in region [`CLOUD_REGION`], its own edge (at
//! [`CLOUD_EDGE_ADDRESS`]) and one cloud host (an agent with `--cloud-host`, running
//! applications in microVMs). An application placed there is reached through the cloud edge;
//! [`MigrationPlatform::curl`] tries the devices' edge first, then the cloud's (as a client
//! whose DNS names both would).
//!
//! Everything stops when dropped: agents first (their homes kill the workloads and unmount
//! the volumes, see [`crate::agent::unmount_under`]), then the edge and the server, then the
//! namespaces, and the directory last.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{
    Application, ApplicationId, Device, DeviceCreated, DeviceId, DevicePool, DeviceState, Edge, EdgeCreated, Migration,
    MigrationId, MigrationPhase, Placement,
};
use serde_json::json;

use crate::cloud_platform::VmKernel;
use crate::netns::{CLIENT_ADDRESS, DEV1_ADDRESS, DEV2_ADDRESS, EDGE_ADDRESS, Namespace, SERVER_ADDRESS, Topology};
use crate::platform::{CurlOutput, EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer, ServerOptions, curl, through_edge};
use crate::workload::field;

/// The server's port in its namespace (fixed: a restarted server keeps its URL).
pub const SERVER_PORT: u16 = 8440;
/// The devices, by name (also their namespaces' roles), with their underlay addresses.
pub const DEVICES: [(&str, Ipv4Addr); 2] = [("dev1", DEV1_ADDRESS), ("dev2", DEV2_ADDRESS)];
/// How long the platform may take to come up (enrollments, sessions, tunnels).
pub const PLATFORM_UP: Duration = Duration::from_secs(120);
/// The cloud pool's region.
pub const CLOUD_REGION: &str = "eu";
/// The cloud pool's edge.
pub const CLOUD_EDGE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The cloud host's underlay address.
pub const CLOUD_HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 23);
/// What [`device_of`] answers for a workload in a microVM (its addresses are guest ones).
pub const CLOUD: &str = "cloud";

/// The server's migration timing for a run.
#[derive(Debug, Clone, Copy)]
pub struct MigrationTiming {
    /// `--migration-step-timeout`.
    pub step_timeout: Duration,
    /// `--migration-retention`.
    pub retention: Duration,
    /// `--migration-drain-seconds`.
    pub drain: Duration,
}

/// Everything one run holds. Fields drop in order (see the module docs).
pub struct MigrationPlatform {
    /// dev1, dev2 (as in [`DEVICES`]), then the cloud host (`host`) if there is a cloud.
    pub agents: Vec<NsAgent>,
    pub edge: NsEdge,
    /// The cloud pool's edge, if there is a cloud.
    pub cloud_edge: Option<NsEdge>,
    /// The operator organization's client and its cloud host's id, if there is a cloud.
    pub cloud_host: Option<(edgible::Client, DeviceId)>,
    pub server: NsServer,
    server_options: ServerOptions,
    pub client: edgible::Client,
    pub device_ids: Vec<DeviceId>,
    pub pool: DevicePool,
    /// The server's blob store (`--blob-dir`): `migrations/<id>/<index>`.
    pub blob_dir: PathBuf,
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub topology: Topology,
    pub dir: tempfile::TempDir,
}

/// Prints a step of the walk.
pub fn step(text: &str) {
    eprintln!("==> {text}");
}

impl MigrationPlatform {
    /// Builds the topology (namespaces `eg-<tag>-...`), starts the server with `timing`,
    /// creates the pool, the edge and both devices, starts them and waits until both devices
    /// are online.
    pub async fn start(tag: &str, timing: MigrationTiming, cloud: Option<&VmKernel>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(&format!("edgible-{tag}-")).tempdir()?;
        step("building the namespaces: edge, server, dev1, dev2, client on 203.0.113.0/24");
        let topology = Topology::build(
            tag,
            &[
                ("edge", EDGE_ADDRESS),
                ("server", SERVER_ADDRESS),
                (DEVICES[0].0, DEVICES[0].1),
                (DEVICES[1].0, DEVICES[1].1),
                ("client", CLIENT_ADDRESS),
                ("cedge", CLOUD_EDGE_ADDRESS),
                ("host", CLOUD_HOST_ADDRESS),
            ],
        )?;
        for (device, _) in DEVICES {
            topology.namespace(device)?.install_device_firewall()?;
        }
        let blob_dir = dir.path().join("blobs");
        let server_options = ServerOptions {
            port: SERVER_PORT,
            extra_args: vec![
                "--migration-step-timeout".into(),
                timing.step_timeout.as_secs().to_string(),
                "--migration-retention".into(),
                timing.retention.as_secs().to_string(),
                "--migration-drain-seconds".into(),
                timing.drain.as_secs().to_string(),
                "--blob-dir".into(),
                blob_dir.display().to_string(),
            ],
        };
        step(&format!(
            "starting the server on {SERVER_ADDRESS}:{SERVER_PORT} (step timeout {:?}, retention {:?})",
            timing.step_timeout, timing.retention
        ));
        let server = NsServer::start_with(
            topology.namespace("server")?,
            SERVER_ADDRESS,
            &dir.path().join("server"),
            &server_options,
        )?;
        let ca_file = dir.path().join("ca.pem");
        let ca_pem = server.save_ca(&ca_file).await?;
        let client = server.client()?;

        step("creating the pool, the edge and dev1, dev2");
        let pool: DevicePool = client
            .create::<DevicePool>(&serde_json::from_value(json!({"name": "mig", "tunnel_cidr": "100.64.20.0/24"}))?)
            .await
            .context("creating the pool")?;
        let edge_created: EdgeCreated = client
            .create::<Edge>(&serde_json::from_value(json!({
                "name": "edge1", "pool_id": pool.id, "endpoint": format!("{EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}"),
            }))?)
            .await
            .context("creating the edge")?;
        let mut edge = NsEdge::enroll(
            topology.namespace("edge")?,
            EDGE_ADDRESS,
            &server.url,
            &edge_created.enrollment_token,
            &dir.path().join("edge"),
        )?;
        edge.start()?;
        let mut agents = Vec::new();
        let mut device_ids = Vec::new();
        for (name, _) in DEVICES {
            let created: DeviceCreated = client
                .create::<Device>(&serde_json::from_value(json!({"name": name, "pool_id": pool.id}))?)
                .await
                .with_context(|| format!("creating device {name}"))?;
            let mut agent = NsAgent::enroll(
                topology.namespace(name)?,
                name,
                &server.url,
                &created.enrollment_token,
                &dir.path().join(name),
            )?;
            agent.start()?;
            agents.push(agent);
            device_ids.push(created.device.id);
        }
        let (mut cloud_edge, mut cloud_host) = (None, None);
        if let Some(kernel) = cloud {
            step(&format!("creating the operator's cloud pool (region {CLOUD_REGION}), its edge and a cloud host"));
            let (edge, host, operator, host_id) = start_cloud(&topology, &server, &client, kernel, dir.path()).await?;
            cloud_edge = Some(edge);
            cloud_host = Some((operator, host_id));
            agents.push(host);
        }
        let platform = Self {
            agents,
            edge,
            cloud_edge,
            cloud_host,
            server,
            server_options,
            client,
            device_ids,
            pool,
            blob_dir,
            ca_file,
            ca_pem,
            topology,
            dir,
        };
        let mut up = platform.wait_cloud_host().await;
        for (name, _) in DEVICES {
            up = up.and(platform.wait_online(name, PLATFORM_UP).await);
        }
        if let Err(error) = up {
            let diagnosis = platform.diagnose();
            let kept = platform.keep();
            return Err(error.context(format!("{diagnosis}\nlogs and database are kept in {}", kept.display())));
        }
        Ok(platform)
    }

    /// The id of device `name`.
    pub fn device_id(&self, name: &str) -> anyhow::Result<DeviceId> {
        let index = DEVICES.iter().position(|(device, _)| *device == name).with_context(|| format!("no {name}"))?;
        Ok(self.device_ids[index])
    }

    /// The name of the device with id `id`.
    pub fn device_name(&self, id: &DeviceId) -> Option<&'static str> {
        self.device_ids.iter().position(|device| device == id).map(|index| DEVICES[index].0)
    }

    /// The agent of device `name`.
    pub fn agent(&mut self, name: &str) -> anyhow::Result<&mut NsAgent> {
        self.agents.iter_mut().find(|agent| agent.name == name).with_context(|| format!("no agent {name}"))
    }

    /// Waits until the cloud host (if there is a cloud) is online and shows its capacity.
    async fn wait_cloud_host(&self) -> anyhow::Result<()> {
        let Some((operator, host_id)) = &self.cloud_host else { return Ok(()) };
        crate::wait_for("the cloud host online with its capacity", PLATFORM_UP, || async move {
            let host = operator.get::<Device>(host_id).await.ok()?;
            (host.status.state == DeviceState::Online && host.status.cloud_host.is_some()).then_some(())
        })
        .await
    }

    /// Waits until device `name` is online.
    pub async fn wait_online(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let id = self.device_id(name)?;
        let client = &self.client;
        crate::wait_for(&format!("{name} online"), timeout, || async move {
            let device = client.get::<Device>(&id).await.ok()?;
            (device.status.state == DeviceState::Online).then_some(())
        })
        .await
    }

    /// Creates an application running the test workload on `port`, answering at `hostname`,
    /// with a movable volume `data` of `volume_mib` MiB when given, plus `env`; places it on
    /// device `device`.
    pub async fn deploy(
        &self,
        name: &str,
        hostname: &str,
        port: u16,
        volume_mib: Option<u64>,
        env: &[(&str, &str)],
        device: &str,
    ) -> anyhow::Result<(Application, Placement)> {
        let spec = application_spec(name, hostname, port, volume_mib, env)?;
        let application: Application = self
            .client
            .create::<Application>(&serde_json::from_value(spec)?)
            .await
            .with_context(|| format!("creating application {name}"))?;
        let placement: Placement = self
            .client
            .create::<Placement>(&serde_json::from_value(json!({
                "strategy": "serving-device", "application_id": application.id, "device_id": self.device_id(device)?,
            }))?)
            .await
            .with_context(|| format!("placing {name} on {device}"))?;
        Ok((application, placement))
    }

    /// Starts moving `application` to the cloud (region [`CLOUD_REGION`]).
    pub async fn migrate_to_cloud(&self, application: &ApplicationId) -> anyhow::Result<Migration> {
        let request = serde_json::from_value(json!({"to": {
            "strategy": "cloud", "application_id": application, "region": CLOUD_REGION,
        }}))?;
        self.client
            .create_migration(application, &request)
            .await
            .with_context(|| format!("POST /v1/applications/{application}/migrations to the cloud"))
    }

    /// Starts moving `application` to device `device` with `POST .../migrations`.
    pub async fn migrate(&self, application: &ApplicationId, device: &str) -> anyhow::Result<Migration> {
        let request = serde_json::from_value(json!({"to": {
            "strategy": "serving-device", "application_id": application, "device_id": self.device_id(device)?,
        }}))?;
        self.client
            .create_migration(application, &request)
            .await
            .with_context(|| format!("POST /v1/applications/{application}/migrations to {device}"))
    }

    /// Polls `GET /v1/migrations/{id}` every 50 ms until `accept` holds (or the migration
    /// ended, when `accept` does not take that), for at most `timeout`; answers the last one.
    pub async fn wait_migration(
        &self,
        id: &MigrationId,
        timeout: Duration,
        what: &str,
        accept: impl Fn(&Migration) -> bool,
    ) -> anyhow::Result<Migration> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match self.client.migration(id).await {
                Ok(migration) => {
                    if accept(&migration) {
                        return Ok(migration);
                    }
                    anyhow::ensure!(
                        !migration.phase.is_final(),
                        "migration {id} ended ({}) before {what}: {}",
                        migration.phase.as_str(),
                        describe_migration(&migration)
                    );
                    last = Some(migration);
                }
                // The server may be restarting; the deadline bounds it.
                Err(error) => eprintln!("    GET /v1/migrations/{id}: {error}"),
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "migration {id}: not {what} after {timeout:?}; last: {}",
                last.as_ref().map(describe_migration).unwrap_or_else(|| "never read".into())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until migration `id` ended; answers it.
    pub async fn wait_ended(&self, id: &MigrationId, timeout: Duration) -> anyhow::Result<Migration> {
        self.wait_migration(id, timeout, "ended", |migration| migration.phase.is_final()).await
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and starts it again on the same
    /// database, port and blob directory.
    pub fn restart_server(&mut self) -> anyhow::Result<()> {
        self.server.process.stop(Duration::from_secs(10));
        self.server = NsServer::start_with(
            self.topology.namespace("server")?,
            SERVER_ADDRESS,
            &self.dir.path().join("server"),
            &self.server_options,
        )?;
        Ok(())
    }

    /// The chunk files the blob store holds for migration `id`.
    pub fn blob_chunks(&self, id: &MigrationId) -> Vec<PathBuf> {
        let dir = self.blob_dir.join("migrations").join(id.to_string());
        let mut chunks: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| path.file_name().and_then(|name| name.to_str()).is_some_and(is_chunk_name))
                    .collect()
            })
            .unwrap_or_default();
        chunks.sort();
        chunks
    }

    /// `curl -sS` from the client namespace to `https://hostname{path}` through the edge,
    /// verifying against the platform's CA, plus `extra` arguments.
    pub fn curl(&self, hostname: &str, path: &str, extra: &[&str]) -> anyhow::Result<CurlOutput> {
        let output = self.curl_via(EDGE_ADDRESS, hostname, path, extra)?;
        if output.success || self.cloud_edge.is_none() {
            return Ok(output);
        }
        let through_cloud = self.curl_via(CLOUD_EDGE_ADDRESS, hostname, path, extra)?;
        Ok(if through_cloud.success { through_cloud } else { output })
    }

    /// `curl -sS` like [`MigrationPlatform::curl`], through the edge at `edge` only.
    pub fn curl_via(&self, edge: Ipv4Addr, hostname: &str, path: &str, extra: &[&str]) -> anyhow::Result<CurlOutput> {
        let mut args: Vec<String> = through_edge(hostname, edge, &self.ca_file);
        args.extend(["--noproxy".to_owned(), "*".to_owned()]);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args.push(format!("https://{hostname}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(self.topology.namespace("client")?, &args)
    }

    /// A request through the edge that must answer 2xx; answers the body.
    pub fn request(&self, method: &str, hostname: &str, path: &str) -> anyhow::Result<String> {
        let output = self.curl(hostname, path, &["-X", method, "--fail-with-body", "--max-time", "60"])?;
        anyhow::ensure!(output.success, "{method} https://{hostname}{path}: {output}");
        Ok(output.stdout)
    }

    /// The device serving `hostname` now (by the addresses `GET /whereami` shows).
    pub fn serving_device(&self, hostname: &str) -> anyhow::Result<&'static str> {
        let answer = self.request("GET", hostname, "/whereami")?;
        let addresses = field(&answer, "addresses").context("no addresses in /whereami")?;
        device_of(addresses).with_context(|| format!("{hostname} is served from none of the devices: {answer}"))
    }

    /// Waits until `hostname` is served from device `device`; answers how long it took.
    pub async fn wait_served_from(&self, hostname: &str, device: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let last = match self.serving_device(hostname) {
                Ok(serving) if serving == device => return Ok(started.elapsed()),
                Ok(serving) => format!("served from {serving}"),
                Err(error) => format!("{error:#}"),
            };
            anyhow::ensure!(
                started.elapsed() < timeout,
                "{hostname} is not served from {device} after {timeout:?}; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The record ids `GET /records` of `hostname` lists.
    pub fn records(&self, hostname: &str) -> anyhow::Result<std::collections::BTreeSet<u64>> {
        let listing = self.request("GET", hostname, "/records")?;
        Ok(crate::workload::parse_records_listing(&listing)?)
    }

    /// `GET /fill` of `hostname`: the SHA-256 and length of the fill file.
    pub fn fill_digest(&self, hostname: &str) -> anyhow::Result<(String, u64)> {
        let answer = self.request("GET", hostname, "/fill")?;
        let digest = field(&answer, "sha256").context("no sha256 in /fill")?.to_owned();
        let len = field(&answer, "bytes").context("no bytes in /fill")?.parse()?;
        Ok((digest, len))
    }

    /// The logs' ends, for a failure message.
    pub fn diagnose(&self) -> String {
        // The server logs every request; the tests poll, so those lines are left out.
        let server_log = crate::netns::log_tail(&self.server.dir.join("server.log"), 256 << 10);
        let server_log: Vec<&str> = server_log.lines().filter(|line| !line.contains("tower_http::trace")).collect();
        let mut text = format!(
            "--- server log\n{}\n--- edge log\n{}\n",
            strip_ansi(&server_log[server_log.len().saturating_sub(80)..].join("\n")),
            crate::netns::log_tail(&self.edge.dir.join("edge.log"), 3 << 10),
        );
        for agent in &self.agents {
            text.push_str(&format!(
                "--- agent {} log\n{}\n",
                agent.name,
                strip_ansi(&crate::netns::log_tail(&agent.home.log_file(), 8 << 10))
            ));
        }
        text
    }

    /// Tears everything down but keeps the directory (logs, database), answering its path.
    pub fn keep(self) -> PathBuf {
        let Self { agents, edge, cloud_edge, server, topology, dir, .. } = self;
        drop((agents, edge, cloud_edge, server, topology));
        dir.keep()
    }
}

/// Creates the operator organization, its cloud pool, edge and host, and starts the edge and
/// the host's agent (capacity 4 vCPUs, 2 GiB, 4 GiB of disk).
async fn start_cloud(
    topology: &Topology,
    server: &NsServer,
    platform: &edgible::Client,
    kernel: &VmKernel,
    dir: &std::path::Path,
) -> anyhow::Result<(NsEdge, NsAgent, edgible::Client, DeviceId)> {
    use edgible::model::{Organization, OrganizationCreated};
    let created: OrganizationCreated = platform
        .create::<Organization>(&serde_json::from_value(json!({"name": "cloudops", "operator": true}))?)
        .await
        .context("creating the operator organization")?;
    let operator = edgible::Client::new(&server.url, &created.admin_key.secret)?;
    let pool: DevicePool = operator
        .create::<DevicePool>(&serde_json::from_value(json!({
            "name": "cloud-eu", "tunnel_cidr": "100.64.40.0/24", "kind": "cloud", "region": CLOUD_REGION,
        }))?)
        .await
        .context("creating the cloud pool")?;
    let edge_created: EdgeCreated = operator
        .create::<Edge>(&serde_json::from_value(json!({
            "name": "edge-eu", "pool_id": pool.id, "endpoint": format!("{CLOUD_EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}"),
        }))?)
        .await
        .context("creating the cloud edge")?;
    let host: DeviceCreated = operator
        .create::<Device>(&serde_json::from_value(json!({"name": "host", "pool_id": pool.id}))?)
        .await
        .context("creating the cloud host")?;
    let mut edge = NsEdge::enroll(
        topology.namespace("cedge")?,
        CLOUD_EDGE_ADDRESS,
        &server.url,
        &edge_created.enrollment_token,
        &dir.join("cedge"),
    )?;
    edge.start()?;
    let mut agent =
        NsAgent::enroll(topology.namespace("host")?, "host", &server.url, &host.enrollment_token, &dir.join("host"))?;
    let args: Vec<String> = vec![
        "--cloud-host".into(),
        "--host-vcpus".into(),
        "4".into(),
        "--host-memory-mib".into(),
        "2048".into(),
        "--host-disk-mib".into(),
        "4096".into(),
        "--vm-kernel".into(),
        kernel.kernel.display().to_string(),
        "--vm-modules".into(),
        kernel.modules.display().to_string(),
    ];
    agent.start_with(&args)?;
    Ok((edge, agent, operator, host.device.id))
}

/// The application spec [`MigrationPlatform::deploy`] creates, as JSON.
pub fn application_spec(
    name: &str,
    hostname: &str,
    port: u16,
    volume_mib: Option<u64>,
    env: &[(&str, &str)],
) -> anyhow::Result<serde_json::Value> {
    // Canonical: a microVM's image copies the binary from this path.
    let workload = std::fs::canonicalize(crate::bin_path("e2e_workload")?)?;
    let mut env_map = serde_json::Map::new();
    env_map.insert("NAME".into(), json!(name));
    // In a microVM the host's proxy reaches the workload at the guest's address.
    env_map.insert("BIND_ADDRESS".into(), json!("0.0.0.0"));
    for (key, value) in env {
        env_map.insert((*key).into(), json!(value));
    }
    let storage = match volume_mib {
        Some(size_mib) => json!([{"name": "data", "size_mib": size_mib, "mount_path": "/data", "movable": true}]),
        None => json!([]),
    };
    Ok(json!({
        "name": name,
        "hostnames": [hostname],
        "port": port,
        "env": env_map,
        "workload": {"process": {"command": workload.display().to_string()}},
        "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 2, "timeout_seconds": 1},
        "storage": storage,
    }))
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a blob store file name is a chunk's (its index).
fn is_chunk_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_digit())
}

/// A migration in one line, for messages.
pub fn describe_migration(migration: &Migration) -> String {
    format!(
        "{} phase={} failed_phase={:?} failure={:?} rolled_back={} shipped={}/{} downtime_ms={:?}",
        migration.id,
        migration.phase.as_str(),
        migration.failed_phase.map(MigrationPhase::as_str),
        migration.failure,
        migration.rolled_back,
        migration.bytes_shipped,
        migration.bytes_total,
        migration.downtime_ms,
    )
}

/// How long migration spent in `phase` (entered to left), if it entered and left it.
pub fn phase_duration(migration: &Migration, phase: MigrationPhase) -> Option<Duration> {
    let record = migration.phases.iter().find(|record| record.phase == phase)?;
    let finished = record.finished_at?;
    (finished - record.started_at).to_std().ok()
}

/// The device (of [`DEVICES`]) whose underlay address is among `addresses` (comma-separated),
/// or [`CLOUD`] for a microVM guest (the VM driver's guest network, 198.51.100.0/24).
pub fn device_of(addresses: &str) -> Option<&'static str> {
    let addresses: Vec<Ipv4Addr> = addresses.split(',').filter_map(|text| text.trim().parse().ok()).collect();
    if let Some((name, _)) = DEVICES.iter().find(|(_, address)| addresses.contains(address)) {
        return Some(name);
    }
    addresses.iter().any(|address| address.octets()[..3] == [198, 51, 100]).then_some(CLOUD)
}

/// Runs `work` on a thread of its own inside `namespace` (setns(2) moves only that thread, so
/// every socket it opens is the namespace's), on a runtime of its own; answers its handle.
pub fn in_namespace<T, F, Fut>(
    namespace: &Namespace,
    name: &str,
    work: F,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let namespace_file =
        std::fs::File::open(namespace.path()).with_context(|| format!("opening {}", namespace.path().display()))?;
    let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        nix::sched::setns(&namespace_file, nix::sched::CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(work())
    })?;
    Ok(thread)
}

/// Waits for a thread from [`in_namespace`] without blocking the caller's runtime.
pub async fn join<T: Send + 'static>(thread: std::thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// An HTTPS client for the applications, reaching every name through the edge, trusting only
/// the platform's CA, HTTP/1.1 with keep-alive.
pub fn app_client(ca_pem: &str, hostnames: &[&str]) -> anyhow::Result<reqwest::Client> {
    app_client_via(ca_pem, hostnames, EDGE_ADDRESS)
}

/// An HTTPS client like [`app_client`], reaching every name through the edge at `edge`.
pub fn app_client_via(ca_pem: &str, hostnames: &[&str], edge: Ipv4Addr) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .http1_only()
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    for hostname in hostnames {
        builder = builder.resolve(hostname, SocketAddr::from((edge, 443)));
    }
    Ok(builder.build()?)
}

/// One request as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When its answer came (or it failed), since the client started.
    pub at: Duration,
    /// The device that answered with success, or `None` for a failure.
    pub served_by: Option<&'static str>,
}

/// One change of the serving device, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: &'static str,
    pub to: &'static str,
    /// The last success on `from`.
    pub last_on_source: Duration,
    /// The first success on `to`.
    pub first_on_target: Duration,
    /// The requests that failed in between.
    pub failures: usize,
}

impl Move {
    /// The downtime the client saw: from the last success on the source to the first success
    /// on the target.
    pub fn downtime(&self) -> Duration {
        self.first_on_target.saturating_sub(self.last_on_source)
    }
}

/// The moves in a client's `attempts` (in time order): every place where the device serving
/// its successes changes.
pub fn moves(attempts: &[Attempt]) -> Vec<Move> {
    let mut moves = Vec::new();
    let mut last: Option<(&'static str, Duration)> = None;
    let mut failures = 0;
    for attempt in attempts {
        let Some(device) = attempt.served_by else {
            failures += 1;
            continue;
        };
        if let Some((previous, at)) = last
            && previous != device
        {
            moves.push(Move { from: previous, to: device, last_on_source: at, first_on_target: attempt.at, failures });
        }
        failures = 0;
        last = Some((device, attempt.at));
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(ms: u64, served_by: Option<&'static str>) -> Attempt {
        Attempt { at: Duration::from_millis(ms), served_by }
    }

    #[test]
    fn moves_are_where_the_serving_device_changes() {
        let attempts = [
            attempt(0, Some("dev1")),
            attempt(10, Some("dev1")),
            attempt(20, None),
            attempt(30, None),
            attempt(450, Some("dev2")),
            attempt(460, None),
            attempt(470, Some("dev2")),
            attempt(900, Some("dev1")),
        ];
        let found = moves(&attempts);
        assert_eq!(
            found,
            [
                Move {
                    from: "dev1",
                    to: "dev2",
                    last_on_source: Duration::from_millis(10),
                    first_on_target: Duration::from_millis(450),
                    failures: 2,
                },
                Move {
                    from: "dev2",
                    to: "dev1",
                    last_on_source: Duration::from_millis(470),
                    first_on_target: Duration::from_millis(900),
                    failures: 0,
                },
            ]
        );
        assert_eq!(found[0].downtime(), Duration::from_millis(440));
        assert!(moves(&attempts[..4]).is_empty());
        assert!(moves(&[]).is_empty());
    }

    #[test]
    fn devices_and_chunks_are_recognized() {
        assert_eq!(device_of("100.64.20.2,203.0.113.22"), Some("dev2"));
        assert_eq!(device_of("203.0.113.21"), Some("dev1"));
        assert_eq!(device_of("-"), None);
        assert_eq!(device_of("198.51.100.2"), Some(CLOUD));
        assert!(is_chunk_name("0") && is_chunk_name("12"));
        assert!(!is_chunk_name("") && !is_chunk_name("0.tmp") && !is_chunk_name("#tmp"));
        assert_eq!(strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"), "2026  INFO x");
    }

    #[test]
    fn stateful_applications_get_a_movable_data_volume() -> anyhow::Result<()> {
        if crate::bin_path("e2e_workload").is_err() {
            return Ok(());
        }
        let spec = application_spec("rec", "rec.example.test", 18090, Some(64), &[("UNHEALTHY_AT", "203.0.113.22")])?;
        assert_eq!(spec["storage"][0]["name"], "data");
        assert_eq!(spec["storage"][0]["movable"], true);
        assert_eq!(spec["env"]["UNHEALTHY_AT"], "203.0.113.22");
        assert_eq!(spec["env"]["NAME"], "rec");
        assert_eq!(spec["env"]["BIND_ADDRESS"], "0.0.0.0");
        let stateless = application_spec("web", "web.example.test", 18091, None, &[])?;
        assert_eq!(stateless["storage"], json!([]));
        // The model accepts both.
        serde_json::from_value::<edgible::model::ApplicationSpec>(spec)?;
        serde_json::from_value::<edgible::model::ApplicationSpec>(stateless)?;
        Ok(())
    }
}
