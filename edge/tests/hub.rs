//! The edge against a real `edgible-server`: `edgible-edge enroll` (the real binary) trades an
//! edge's token for its credential, then the hub client connects, receives its configuration
//! and applies it to a real WireGuard tunnel started inside a network namespace the test makes
//! (so it needs root), and to the route table. The server sees the acknowledgement.
//!
//! A second test runs the real `edgible-edge run --state-dir` binary, with the server, inside a
//! namespace and watches it through its admin port: hub connected, tunnel up with the device as
//! peer, the device's (offline) route refused with a TLS alert, and the interface removed at
//! SIGTERM.
//!
//! Runs only with `EDGIBLE_ACC=1` and the workspace binaries built (`cargo build --workspace
//! --bins`), like the acceptance tests.

use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use edgible::Client;
use edgible::model::{
    Application, ApplicationSpec, Device, DeviceCreated, DevicePool, DevicePoolSpec, DeviceSpec, Edge, EdgeCreated,
    EdgeSpec, EnrollmentRequest, Placement, PlacementSpec,
};
use edgible::tunnel::{PrivateKey, Tunnel};
use edgible_acceptance_tests::{ServerProcess, heavy_tier, wait_for};
use edgible_edge::acme_http::ChallengeStore;
use edgible_edge::hub_client::{self, HelloParams, HubConfig, HubConnector, HubStats, SessionContext};
use edgible_edge::metrics::MetricSource as _;
use edgible_edge::route_source::SharedRoutes;
use edgible_edge::state::{self, StateDir};
use edgible_edge::tunnel::{EdgeTunnel, TunnelSettings};
use serde_json::json;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

/// A network namespace that exists as long as this value (deleted on drop, also on failure).
struct Namespace {
    name: String,
}

impl Namespace {
    fn create(role: &str) -> Result<Self> {
        let name = format!("edgehub-{}-{role}", std::process::id());
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        run("ip", &["netns", "add", &name])?;
        let namespace = Self { name };
        run("ip", &["-n", &namespace.name, "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// Starts a tunnel from a thread inside the namespace: its interface and UDP socket, and
    /// the worker threads it spawns, belong to the namespace.
    fn start_tunnel(&self, config: edgible::tunnel::TunnelConfig) -> Result<Tunnel> {
        self.run(|| Ok(Tunnel::start(config)?))
    }

    /// Runs `work` on a new thread inside the namespace: sockets it opens and processes it
    /// spawns belong to the namespace.
    fn run<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || -> Result<T> {
                let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                work()
            });
            worker.join().unwrap_or_else(|_| bail!("the thread in the namespace panicked"))
        })
    }

    /// `ip -n NAME ARGS`, answering standard output.
    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("cannot delete namespace {}: {error:#}", self.name);
        }
    }
}

/// A veth pair between two namespaces, addressed from 192.0.2.0/24.
fn link(a: &Namespace, a_address: &str, b: &Namespace, b_address: &str) -> Result<()> {
    run(
        "ip",
        &["link", "add", "veth-a", "netns", &a.name, "type", "veth", "peer", "name", "veth-b", "netns", &b.name],
    )?;
    a.ip(&["address", "add", a_address, "dev", "veth-a"])?;
    b.ip(&["address", "add", b_address, "dev", "veth-b"])?;
    a.ip(&["link", "set", "veth-a", "up"])?;
    b.ip(&["link", "set", "veth-b", "up"])?;
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A pool with one enrolled device serving `app.example.test`, and an edge created for it.
struct Platform {
    client: Client,
    device: Device,
    device_key: PrivateKey,
    edge: EdgeCreated,
}

async fn platform(server: &ServerProcess) -> Result<Platform> {
    let client = server.client()?;
    let pool_spec: DevicePoolSpec = serde_json::from_value(json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}))?;
    let pool = client.create::<DevicePool>(&pool_spec).await?;
    let device_spec: DeviceSpec = serde_json::from_value(json!({"name": "laptop", "pool_id": pool.id}))?;
    let created: DeviceCreated = client.create::<Device>(&device_spec).await?;
    let device_key = PrivateKey::generate()?;
    let request =
        EnrollmentRequest { token: created.enrollment_token, public_key: device_key.public_key().to_base64() };
    let device = Client::enroll(&server.url, &request).await?.device;

    let application: ApplicationSpec = serde_json::from_value(json!({
        "name": "app",
        "hostnames": ["app.example.test"],
        "port": 8080,
        "workload": {"process": {"command": "/bin/true"}},
    }))?;
    let application = client.create::<Application>(&application).await?;
    let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: device.id };
    client.create::<Placement>(&placement).await?;

    let edge_spec: EdgeSpec =
        serde_json::from_value(json!({"name": "edge-1", "pool_id": pool.id, "endpoint": "203.0.113.1:51820"}))?;
    let edge = client.create::<Edge>(&edge_spec).await?;
    Ok(Platform { client, device, device_key, edge })
}

/// Runs `edgible-edge enroll` and answers the state directory.
fn enroll_edge(server: &ServerProcess, token: &str, state_dir: &Path) -> Result<()> {
    let enrolled = Command::new(env!("CARGO_BIN_EXE_edgible-edge"))
        .args(["enroll", "--server", &server.url, "--token", token, "--state-dir"])
        .arg(state_dir)
        .output()?;
    anyhow::ensure!(enrolled.status.success(), "enroll failed: {}", String::from_utf8_lossy(&enrolled.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_edge_receives_its_peers_and_routes_from_the_server() -> Result<()> {
    if !heavy_tier("an_enrolled_edge_receives_its_peers_and_routes_from_the_server") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"))?;
    let platform = platform(&server).await?;

    // Enrollment, through the real binary.
    let state_path = dir.path().join("edge-state");
    enroll_edge(&server, &platform.edge.enrollment_token, &state_path)?;
    for file in [state::CREDENTIAL_FILE, state::PRIVATE_KEY_FILE, state::IDENTITY_FILE] {
        let mode = std::fs::metadata(state_path.join(file))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    let state::Enrolled { identity, credential, private_key } = StateDir::open(&state_path)?.load()?;
    assert_eq!(identity.edge_id, platform.edge.edge.id);
    assert_eq!(identity.tunnel_cidr, "100.96.0.0/24".parse()?);
    assert_ne!(identity.tunnel_address, platform.device.status.tunnel_address);
    // A token works once.
    let again = Command::new(env!("CARGO_BIN_EXE_edgible-edge"))
        .args(["enroll", "--force", "--server", &server.url, "--token", &platform.edge.enrollment_token])
        .arg("--state-dir")
        .arg(dir.path().join("second"))
        .output()?;
    assert!(!again.status.success(), "a used token enrolled again");

    // The hub session, with the real tunnel inside a namespace.
    let namespace = Arc::new(Namespace::create("edge")?);
    let device_namespace = Namespace::create("dev")?;
    let in_namespace = Arc::clone(&namespace);
    let tunnel = Arc::new(EdgeTunnel::with_starter(
        TunnelSettings { interface_name: "edgible-edge0".into(), listen_port: 51820, private_key },
        Box::new(move |config| {
            in_namespace
                .start_tunnel(config)
                .map_err(|error| edgible::tunnel::TunnelError::Workers(std::io::Error::other(format!("{error:#}"))))
        }),
    ));
    let routes = SharedRoutes::default();
    let stats = HubStats::new();
    let connector = HubConnector::new(&identity.server, &credential)?;
    let hello =
        HelloParams { edge_id: identity.edge_id, public_key: identity.public_key.clone(), edge_version: "test".into() };
    let (stop, stopped) = watch::channel(false);
    let session = {
        let (tunnel, routes, stats) = (Arc::clone(&tunnel), routes.clone(), Arc::clone(&stats));
        tokio::spawn(async move {
            let config = HubConfig::default();
            let challenges = ChallengeStore::new();
            let context = SessionContext {
                config: &config,
                hello: &hello,
                peers: &*tunnel,
                routes: &routes,
                challenges: &challenges,
                stats: &stats,
            };
            hub_client::run(&context, &connector, stopped).await;
        })
    };

    let result = async {
        let route = wait_for("the route of app.example.test", WAIT, || {
            let routes = routes.clone();
            async move { routes.current().target("app.example.test").copied() }
        })
        .await?;
        assert_eq!(route.device_id, platform.device.id);
        assert_eq!(route.tunnel_address, platform.device.status.tunnel_address);
        assert!(!route.online, "the device's agent never connected");

        // The tunnel runs in the namespace with the device as its only peer, exactly its /32.
        let peers = tunnel.with_tunnel(|tunnel| tunnel.map(Tunnel::peers)).context("the tunnel was not started")?;
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].public_key, platform.device_key.public_key());
        let device_net = ipnet::Ipv4Net::from(platform.device.status.tunnel_address);
        assert_eq!(peers[0].allowed_ips, [device_net]);
        assert_eq!(peers[0].endpoint, None);
        let addresses = namespace.ip(&["-4", "address", "show", "edgible-edge0"])?;
        assert!(addresses.contains(&format!("{}/24", identity.tunnel_address)), "{addresses}");

        // The server recorded the acknowledgement.
        let client = &platform.client;
        let edge_id = identity.edge_id;
        wait_for("the edge's applied revision", WAIT, || async move {
            client.get::<Edge>(&edge_id).await.ok()?.status.applied_revision
        })
        .await?;
        assert!(stats.is_connected());
        assert!(stats.configs_applied() >= 1);
        let mut metrics = String::new();
        stats.write_metrics(&mut metrics);
        tunnel.write_metrics(&mut metrics);
        assert!(metrics.contains("edgible_edge_hub_connected 1\n"), "{metrics}");
        assert!(metrics.contains("edgible_edge_tunnel_peers 1\n"), "{metrics}");

        // A second hostname reaches the running edge without a reconnect.
        let other: ApplicationSpec = serde_json::from_value(json!({
            "name": "other",
            "hostnames": ["other.example.test"],
            "port": 8081,
            "workload": {"process": {"command": "/bin/true"}},
        }))?;
        let other = client.create::<Application>(&other).await?;
        let placement = PlacementSpec::ServingDevice { application_id: other.id, device_id: platform.device.id };
        client.create::<Placement>(&placement).await?;
        wait_for("the route of other.example.test", WAIT, || {
            let routes = routes.clone();
            async move { routes.current().target("other.example.test").copied() }
        })
        .await?;
        assert_eq!(tunnel.with_tunnel(|tunnel| tunnel.map(|tunnel| tunnel.peers().len())), Some(1));

        // The device, in its own namespace, dials the edge: the handshake shows in the
        // edge's metrics and the edge's tunnel address answers through the tunnel.
        link(&namespace, "192.0.2.1/24", &device_namespace, "192.0.2.2/24")?;
        let device_tunnel = device_namespace.start_tunnel(edgible::tunnel::TunnelConfig {
            interface_name: "edgible0".into(),
            private_key: platform.device_key.clone(),
            address: ipnet::Ipv4Net::new(platform.device.status.tunnel_address, 24)?,
            listen_port: None,
            peers: vec![edgible::tunnel::PeerConfig {
                public_key: identity.public_key.parse()?,
                endpoint: Some("192.0.2.1:51820".parse()?),
                allowed_ips: vec!["100.96.0.0/24".parse()?],
                persistent_keepalive: Some(1),
            }],
        })?;
        let series = format!("edgible_edge_peer_handshake_age_seconds{{device=\"{}\"", platform.device.id);
        let handshake = wait_for("a handshake with the device", WAIT, || {
            let tunnel = Arc::clone(&tunnel);
            let series = series.clone();
            async move {
                let mut metrics = String::new();
                tunnel.write_metrics(&mut metrics);
                metrics.contains(&series).then_some(metrics)
            }
        })
        .await;
        let edge_address = identity.tunnel_address.to_string();
        let pinged = run("ip", &["netns", "exec", &device_namespace.name, "ping", "-c", "1", "-W", "2", &edge_address]);
        device_tunnel.shutdown();
        handshake?;
        pinged.context("the edge's tunnel address does not answer through the tunnel")?;
        anyhow::Ok(())
    }
    .await;

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), session).await;
    // The tunnels go before their namespaces.
    tunnel.shutdown();
    drop(namespace);
    drop(device_namespace);
    result.with_context(|| {
        format!("server log:\n{}", std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default())
    })?;
    Ok(())
}

/// The edge binary, killed if the test fails before stopping it.
struct EdgeProcess(Child);

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn scrape(admin: &str) -> Option<String> {
    reqwest::get(format!("http://{admin}/metrics")).await.ok()?.text().await.ok()
}

/// The value of one series in a scrape.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_edge_binary_runs_from_its_state_directory() -> Result<()> {
    if !heavy_tier("the_edge_binary_runs_from_its_state_directory") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let namespace = Namespace::create("bin")?;
    let dir = tempfile::tempdir()?;
    // Everything runs inside the namespace: the server, the edge, and this test's clients.
    namespace.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(binary_scenario(&namespace, dir.path()))
    })
}

async fn binary_scenario(namespace: &Namespace, dir: &Path) -> Result<()> {
    let server = ServerProcess::start(&dir.join("server"))?;
    let platform = platform(&server).await?;
    let state_path = dir.join("edge-state");
    enroll_edge(&server, &platform.edge.enrollment_token, &state_path)?;

    let ready = dir.join("edge.ready");
    let log = File::create(dir.join("edge.log"))?;
    let mut edge = EdgeProcess(
        Command::new(env!("CARGO_BIN_EXE_edgible-edge"))
            .args(["run", "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen"])
            .args(["127.0.0.1:0", "--wireguard-port", "51820", "--tunnel-interface", "edgible-edge0", "--state-dir"])
            .arg(&state_path)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info,edgible_edge=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let result = async {
        let addresses: serde_json::Value = wait_for("the edge's ready file", WAIT, || {
            let ready = ready.clone();
            async move { serde_json::from_slice(&std::fs::read(ready).ok()?).ok() }
        })
        .await?;
        let admin = addresses["admin"].as_str().context("no admin address")?.to_owned();
        let https = addresses["https"].as_str().context("no https address")?.to_owned();

        let metrics = wait_for("the configuration to be applied", WAIT, || {
            let admin = admin.clone();
            async move {
                let metrics = scrape(&admin).await?;
                (sample(&metrics, "edgible_edge_hub_configs_applied_total")? >= 1.0).then_some(metrics)
            }
        })
        .await?;
        assert_eq!(sample(&metrics, "edgible_edge_hub_connected"), Some(1.0), "{metrics}");
        assert_eq!(sample(&metrics, "edgible_edge_tunnel_up"), Some(1.0), "{metrics}");
        assert_eq!(sample(&metrics, "edgible_edge_tunnel_peers"), Some(1.0), "{metrics}");
        assert_eq!(sample(&metrics, "edgible_edge_routes{state=\"offline\"}"), Some(1.0), "{metrics}");
        let link = namespace.ip(&["-4", "address", "show", "edgible-edge0"])?;
        assert!(link.contains("100.96.0."), "{link}");

        // The device's agent is not connected: its name is refused at once with an alert.
        let tcp = tokio::net::TcpStream::connect(&https).await?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from("app.example.test")?;
        let started = std::time::Instant::now();
        let error = connector.connect(name, tcp).await.err().context("the handshake succeeded")?;
        assert!(error.to_string().contains("InternalError"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2), "refused after {:?}", started.elapsed());
        let metrics = scrape(&admin).await.context("no metrics")?;
        let offline = "edgible_edge_connections_total{outcome=\"refused\",reason=\"device_offline\"}";
        assert_eq!(sample(&metrics, offline), Some(1.0), "{metrics}");

        // SIGTERM: the edge drains, stops, and removes its interface.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(edge.0.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = edge.0.try_wait()? {
                break status;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "the edge did not stop after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status}");
        assert!(namespace.ip(&["link", "show", "edgible-edge0"]).is_err(), "the interface outlived the edge");
        anyhow::Ok(())
    }
    .await;
    drop(edge);
    result.with_context(|| {
        format!(
            "edge log:\n{}\nserver log:\n{}",
            std::fs::read_to_string(dir.join("edge.log")).unwrap_or_default(),
            std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default()
        )
    })
}
