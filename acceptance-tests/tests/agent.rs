//! The real `edgible-agent` against a real `edgible-server`: enrollment, desired state pushed
//! to the device and converged (deploy, update, delete), the server and the agent restarting,
//! a killed workload, and what the agent reports as the API and the CLI show it.
//!
//! Every test starts its own server behind a [`TcpRelay`] (so that a restarted server keeps the
//! URL agents enrolled with), and real agent processes with their own state directories.
//! Workloads are processes running a small Python web server; the container test needs a
//! Docker engine and runs with `EDGIBLE_ACC=1` only.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins && cargo test -p
//! edgible-acceptance-tests --test agent`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::Client;
use edgible::client::EventQuery;
use edgible::model::{
    Application, ApplicationPhase, ApplicationSpec, ApplicationStatus, Device, DeviceState, Placement, PlacementSpec,
};
use edgible_acceptance_tests::agent::{AgentHome, AgentProcess, TcpRelay, process_start_time};
use edgible_acceptance_tests::{Cli, ServerProcess, bin_path, heavy_tier, wait_for};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest any condition may take to come true.
const WAIT: Duration = Duration::from_secs(30);

/// The workload: answers every GET with its greeting (from `GREETING`) and its pid, and logs
/// each request on stdout.
const WEB_SCRIPT: &str = r#"
import http.server, json, os, sys
greeting = os.environ.get("GREETING", "")
port = int(os.environ["PORT"])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(f"request {self.path}", flush=True)
        body = json.dumps({"greeting": greeting, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print(f"serving {greeting} on {port}", flush=True)
print("ready, says stderr", file=sys.stderr, flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

/// A server behind a relay, a CLI logged in through the relay, and a pool `home`.
struct Setup {
    server: Option<ServerProcess>,
    relay: TcpRelay,
    cli: Cli,
    client: Client,
    // Declared last so that it is removed only after the server and agents have stopped.
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(&dir.path().join("server"))?;
        let relay = TcpRelay::start(&server.url)?;
        let cli = Cli::new(&dir.path().join("config"))?;
        cli.ok(&["login", "--server", &relay.url, "--key", &server.admin_key])?;
        let client = Client::new(&relay.url, &server.admin_key)?;
        cli.ok(&["pool", "create", "home", "--cidr", "100.96.0.0/24"])?;
        std::fs::write(dir.path().join("web.py"), WEB_SCRIPT)?;
        Ok(Self { server: Some(server), relay, cli, client, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates device `name` and answers its one-time enrollment token.
    fn device(&self, name: &str) -> anyhow::Result<String> {
        let created = self.cli.json(&["device", "create", name, "--pool", "home"])?;
        created["enrollment_token"].as_str().map(str::to_owned).context("no enrollment token")
    }

    /// Device `name`, enrolled, with its agent running and connected.
    async fn agent(&self, name: &str) -> anyhow::Result<(AgentHome, AgentProcess)> {
        let token = self.device(name)?;
        let home = AgentHome::new(&self.path(name))?;
        let enrolled = home.enroll(&self.relay.url, &token)?;
        anyhow::ensure!(enrolled.status.success(), "enroll failed: {}", String::from_utf8_lossy(&enrolled.stderr));
        let agent = AgentProcess::start(&home, &[])?;
        self.online(name, &home).await?;
        Ok((home, agent))
    }

    async fn online(&self, name: &str, home: &AgentHome) -> anyhow::Result<Device> {
        let client = &self.client;
        wait_for(&format!("device {name} to be online"), WAIT, || async move {
            let device = client.find_by_name::<Device>(name).await.ok()??;
            (device.status.state == DeviceState::Online).then_some(device)
        })
        .await
        .with_context(|| format!("agent log:\n{}", home.log()))
    }

    /// An application running the web script on a free port, with `GREETING`.
    fn web_spec(&self, name: &str, greeting: &str) -> anyhow::Result<ApplicationSpec> {
        Ok(serde_json::from_value(json!({
            "name": name,
            "hostnames": [format!("{name}.example.test")],
            "port": free_port()?,
            "env": {"GREETING": greeting},
            "workload": {"process": {"command": python(), "args": [self.path("web.py")]}},
            "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 2, "timeout_seconds": 1},
        }))?)
    }

    /// Creates the application and places it on `device`.
    async fn deploy(&self, spec: &ApplicationSpec, device: &str) -> anyhow::Result<Application> {
        let application: Application = self.client.create::<Application>(spec).await?;
        let device = self.client.find_by_name::<Device>(device).await?.context("no such device")?;
        let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: device.id };
        self.client.create::<Placement>(&placement).await?;
        Ok(application)
    }

    /// Stops the server and starts it again on the same database (on a new port, which the
    /// relay hides from the agents).
    fn restart_server(&mut self) -> anyhow::Result<()> {
        let server = self.server.take().context("the server is not running")?;
        let (dir, database) = (server.dir.clone(), server.database().to_owned());
        server.stop()?;
        let server = ServerProcess::start_with_database(&dir, &database)?;
        self.relay.set_upstream(&server.url)?;
        self.server = Some(server);
        Ok(())
    }
}

/// The Python the workloads run: Debian's, not a version manager's shim.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" }
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until the application's device reports it running at its current revision.
async fn running(client: &Client, application: &Application, home: &AgentHome) -> anyhow::Result<ApplicationStatus> {
    let id = application.id;
    wait_for(&format!("{} to run", application.spec.name), WAIT, || async move {
        let status = client.application_status(&id).await.ok()?;
        (status.phase == ApplicationPhase::Running && status.revision == Some(status.application_revision))
            .then_some(status)
    })
    .await
    .with_context(|| format!("agent log:\n{}", home.log()))
}

/// What the web workload on `port` answers: its greeting and its pid.
async fn fetch(port: u16, path: &str) -> anyhow::Result<(String, i64)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    let value: Value = serde_json::from_str(body).with_context(|| format!("not the web workload: {answer:?}"))?;
    Ok((value["greeting"].as_str().unwrap_or_default().to_owned(), value["pid"].as_i64().unwrap_or_default()))
}

/// Waits until the workload on `port` answers with `greeting`; answers its pid.
async fn serving(port: u16, greeting: &str) -> anyhow::Result<i64> {
    wait_for(&format!("the workload on port {port} to greet {greeting:?}"), WAIT, || async move {
        match fetch(port, "/").await {
            Ok((answered, pid)) if answered == greeting => Some(pid),
            _ => None,
        }
    })
    .await
}

/// The messages of the events the device reported about an application, oldest first.
async fn events(client: &Client, application: &Application) -> anyhow::Result<Vec<String>> {
    let query = EventQuery { application_id: Some(application.id), ..EventQuery::default() };
    let mut messages: Vec<String> = client.events(&query).await?.items.into_iter().map(|event| event.message).collect();
    messages.reverse();
    Ok(messages)
}

async fn event_matching(client: &Client, application: &Application, needle: &str) -> anyhow::Result<String> {
    wait_for(&format!("an event saying {needle:?}"), WAIT, || async move {
        events(client, application).await.ok()?.into_iter().find(|message| message.contains(needle))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_update_and_delete_converge_and_are_reported() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let (home, _agent) = setup.agent("pi").await?;
    let (cli, client) = (&setup.cli, &setup.client);

    // Deploy: running on the device within a bounded wait.
    let spec = setup.web_spec("web", "v1")?;
    let port = spec.port;
    let started = Instant::now();
    let web = setup.deploy(&spec, "pi").await?;
    running(client, &web, &home).await?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "deploy to running took {took:?}");
    let first_pid = serving(port, "v1").await?;

    // The applied revision is visible through the API and the CLI.
    let device = wait_for("the device to acknowledge the placement", WAIT, || async {
        let device = client.find_by_name::<Device>("pi").await.ok()??;
        let placement = client.list_all::<Placement>().await.ok()?.pop()?;
        (device.status.applied_revision >= Some(placement.revision)).then_some(device)
    })
    .await?;
    let applied = device.status.applied_revision.context("an applied revision")?;
    let shown = cli.ok(&["device", "get", "pi"])?.stdout;
    assert!(shown.contains(&format!("applied revision:  {applied}")), "{shown}");
    assert!(shown.contains("online"), "{shown}");
    assert_eq!(cli.json(&["device", "get", "pi"])?["status"]["applied_revision"], json!(applied));

    // What the agent reports: status, logs and events, through the CLI.
    let status = cli.ok(&["app", "status", "web"])?.stdout;
    assert!(status.contains("running"), "{status}");
    assert!(status.contains("pi ("), "{status}");
    let status = cli.json(&["app", "status", "web"])?;
    assert_eq!(status["phase"], "running");
    assert_eq!(status["revision"], json!(web.revision));
    let logs = wait_for("the workload's output to reach the server", WAIT, || async {
        let logs = cli.ok(&["logs", "web"]).ok()?.stdout;
        (logs.contains("serving v1 on") && logs.contains("ready, says stderr")).then_some(logs)
    })
    .await?;
    assert!(logs.contains(&format!("serving v1 on {port}")), "{logs}");
    let events_table = wait_for("the start event", WAIT, || async {
        let table = cli.ok(&["events", "--app", "web"]).ok()?.stdout;
        table.contains("web started").then_some(table)
    })
    .await?;
    assert!(events_table.contains("pi"), "{events_table}");

    // `logs -f` prints lines as the workload writes them.
    let mut follower = Command::new(bin_path("edgible")?)
        .args(["logs", "web", "--follow", "--tail", "1"])
        .env("EDGIBLE_CONFIG_DIR", &cli.config_dir)
        .env_remove("EDGIBLE_ENDPOINT")
        .env_remove("EDGIBLE_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = follower.stdout.take().context("the follower's stdout")?;
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut followed = Vec::new();
    while !followed.iter().any(|line: &String| line == "request /followed") {
        anyhow::ensure!(Instant::now() < deadline, "`logs -f` never showed the request: {followed:?}");
        fetch(port, "/followed").await?;
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(500)) {
            followed.push(line);
        }
    }
    follower.kill()?;
    follower.wait()?;

    // Update the environment: the workload restarts with it.
    let mut updated = spec.clone();
    updated.env.insert("GREETING".parse()?, "v2".to_owned());
    let web_v2: Application = client.update::<Application>(&web.id, None, &updated).await?;
    running(client, &web_v2, &home).await?;
    let second_pid = serving(port, "v2").await?;
    assert_ne!(second_pid, first_pid, "a new process runs the new environment");
    assert_eq!(process_start_time(first_pid), None, "the old process is gone");
    event_matching(client, &web_v2, "restarted: environment changed").await?;

    // Delete: the workload stops, and the agent no longer records it.
    client.delete::<Application>(&web.id).await?;
    wait_for("the workload to stop", WAIT, || async {
        let recorded = home.state().is_some_and(|state| state["workloads"] != json!({}));
        (fetch(port, "/").await.is_err() && process_start_time(second_pid).is_none() && !recorded).then_some(())
    })
    .await
    .with_context(|| format!("agent log:\n{}", home.log()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_without_the_server_and_converges_after_it_restarts() -> anyhow::Result<()> {
    let mut setup = Setup::start().await?;
    let (home, _agent) = setup.agent("pi").await?;
    let spec = setup.web_spec("web", "v1")?;
    let port = spec.port;
    let web = setup.deploy(&spec, "pi").await?;
    running(&setup.client, &web, &home).await?;
    let pid = serving(port, "v1").await?;

    // The server goes away: the workload goes on serving.
    let server = setup.server.take().context("a server")?;
    let (dir, database) = (server.dir.clone(), server.database().to_owned());
    server.stop()?;
    for _ in 0..5 {
        assert_eq!(fetch(port, "/").await?.1, pid);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // It comes back: the agent reconnects and converges to changes made after.
    let server = ServerProcess::start_with_database(&dir, &database)?;
    setup.relay.set_upstream(&server.url)?;
    setup.server = Some(server);
    let mut updated = spec.clone();
    updated.env.insert("GREETING".parse()?, "after the restart".to_owned());
    let web_v2: Application = setup.client.update::<Application>(&web.id, None, &updated).await?;
    running(&setup.client, &web_v2, &home).await?;
    serving(port, "after the restart").await?;

    // And again through the restart helper, to see that it was not luck.
    setup.restart_server()?;
    updated.env.insert("GREETING".parse()?, "third".to_owned());
    let web_v3: Application = setup.client.update::<Application>(&web.id, None, &updated).await?;
    running(&setup.client, &web_v3, &home).await?;
    serving(port, "third").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_adopts_the_workload_without_restarting_it() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let (home, agent) = setup.agent("pi").await?;
    let spec = setup.web_spec("web", "v1")?;
    let port = spec.port;
    let web = setup.deploy(&spec, "pi").await?;
    running(&setup.client, &web, &home).await?;
    let pid = serving(port, "v1").await?;

    agent.stop()?;
    assert_eq!(fetch(port, "/").await?.1, pid, "the workload outlives its agent");
    let _agent = AgentProcess::start(&home, &[])?;
    event_matching(&setup.client, &web, "adopted after an agent restart").await?;
    running(&setup.client, &web, &home).await?;
    assert_eq!(fetch(port, "/").await?.1, pid, "the same process serves");
    let started = events(&setup.client, &web).await?.iter().filter(|message| message.contains("web started")).count();
    assert_eq!(started, 1, "the workload was started once");
    let table = setup.cli.ok(&["events", "--app", "web"])?.stdout;
    assert!(table.contains("adopted after an agent restart"), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workload_is_restarted() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let (home, _agent) = setup.agent("pi").await?;
    let spec = setup.web_spec("web", "v1")?;
    let port = spec.port;
    let web = setup.deploy(&spec, "pi").await?;
    running(&setup.client, &web, &home).await?;
    let pid = serving(port, "v1").await?;

    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    assert!(killed.success());
    let restarted = wait_for("a new process to serve", WAIT, || async {
        match fetch(port, "/").await {
            Ok((_, new_pid)) if new_pid != pid => Some(new_pid),
            _ => None,
        }
    })
    .await
    .with_context(|| format!("agent log:\n{}", home.log()))?;
    assert_ne!(restarted, pid);
    event_matching(&setup.client, &web, "killed by signal 9").await?;
    running(&setup.client, &web, &home).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_keeps_the_private_key_and_refuses_a_used_token() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let setup = Setup::start().await?;
    let token = setup.device("pi")?;
    let home = AgentHome::new(&setup.path("pi"))?;
    let enrolled = home.enroll(&setup.relay.url, &token)?;
    let stdout = String::from_utf8_lossy(&enrolled.stdout);
    assert!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    assert!(stdout.contains("Enrolled as device pi"), "{stdout}");

    // The server knows the public key; the private key stays in a private file.
    let identity: Value = serde_json::from_slice(&std::fs::read(home.state_dir().join("identity.json"))?)?;
    let device = setup.client.find_by_name::<Device>("pi").await?.context("the device")?;
    assert_eq!(device.status.public_key.as_deref(), identity["public_key"].as_str());
    for file in ["identity.json", "secrets/device-credential", "secrets/wireguard-private-key"] {
        let mode = std::fs::metadata(home.state_dir().join(file))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
    }
    let private_key = std::fs::read_to_string(home.state_dir().join("secrets/wireguard-private-key"))?;
    assert_eq!(private_key.trim().len(), 44);
    assert_ne!(Some(private_key.trim()), device.status.public_key.as_deref());

    // The token was for one enrollment only.
    let again = AgentHome::new(&setup.path("again"))?;
    let refused = again.enroll(&setup.relay.url, &token)?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the enrollment token") && stderr.contains("already used"), "{stderr}");
    assert!(!again.state_dir().join("identity.json").exists(), "a refused enrollment writes nothing");
    let unknown = again.enroll(&setup.relay.url, "edgenr_not-a-token")?;
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown enrollment token"));

    // The same directory is not enrolled twice by accident.
    let twice = home.enroll(&setup.relay.url, &setup.device("pi2")?)?;
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already enrolled"), "{twice:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_deploy_waits_until_running_and_fails_with_the_agents_message() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let (_home, _agent) = setup.agent("pi").await?;
    let port = free_port()?;
    let stack = format!(
        "\
applications:
  - name: web
    hostnames: [web.example.test]
    port: {port}
    env:
      GREETING: stacked
    workload:
      process:
        command: {python}
        args: ['{script}']
    health_check:
      protocol: http
      path: /health
      interval_seconds: 2
      timeout_seconds: 1
    placement:
      strategy: serving-device
      device: pi
",
        python = python(),
        script = setup.path("web.py").display()
    );
    let file = setup.path("stack.yaml");
    std::fs::write(&file, &stack)?;
    let deployed = setup.cli.ok(&["stack", "deploy", &file.display().to_string()])?;
    assert!(deployed.stderr.contains("web: running on pi"), "{}", deployed.stderr);
    // When deploy returns, the application runs.
    let web = setup.client.find_by_name::<Application>("web").await?.context("web")?;
    let status = setup.client.application_status(&web.id).await?;
    assert_eq!((status.phase, status.revision), (ApplicationPhase::Running, Some(web.revision)));
    assert_eq!(fetch(port, "/").await?.0, "stacked");

    // A broken application: deploy fails with what the agent says.
    let broken = "\
applications:
  - name: broken
    hostnames: [broken.example.test]
    port: 9
    workload:
      process:
        command: /bin/sh
        args: ['-c', 'echo boom >&2; exit 3']
    placement:
      strategy: serving-device
      device: pi
";
    let file = setup.path("broken.yaml");
    std::fs::write(&file, broken)?;
    // Progress lines come first on stderr, then the error.
    let failed = setup.cli.run(&["stack", "deploy", &file.display().to_string(), "--timeout", "60s"])?;
    assert_eq!(failed.status.code(), Some(1), "{}", failed.stderr);
    let error = failed.stderr.lines().find(|line| line.starts_with("error: ")).unwrap_or_default();
    assert!(error.contains("broken on pi") && error.contains("exited with status 3"), "{}", failed.stderr);
    assert!(!failed.stderr.contains("panicked"), "{}", failed.stderr);

    // Without waiting, deploy returns once the server holds the stack.
    std::fs::write(&file, broken.replace("exit 3", "exit 4"))?;
    setup.cli.ok(&["stack", "deploy", &file.display().to_string(), "--no-wait"])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_workload_is_deployed_and_serves() -> anyhow::Result<()> {
    if !heavy_tier("a_container_workload_is_deployed_and_serves") {
        return Ok(());
    }
    container::prepare_engine()?;
    let setup = Setup::start().await?;
    let token = setup.device("boxed")?;
    let home = AgentHome::new(&setup.path("boxed"))?;
    let enrolled = home.enroll(&setup.relay.url, &token)?;
    anyhow::ensure!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    let _agent = AgentProcess::start(&home, &["--container-socket", container::SOCKET])?;
    setup.online("boxed", &home).await?;

    let port = free_port()?;
    let spec: ApplicationSpec = serde_json::from_value(json!({
        "name": "boxed",
        "hostnames": ["boxed.example.test"],
        "port": port,
        "env": {"GREETING": "from a container"},
        "workload": {"container": {"image": container::IMAGE}},
        "health_check": {"protocol": "http", "path": "/index.html", "interval_seconds": 2, "timeout_seconds": 1},
    }))?;
    let application = setup.deploy(&spec, "boxed").await?;
    running(&setup.client, &application, &home).await?;
    assert_eq!(container::fetch(port).await?, "from a container");
    let logs = wait_for("the container's output", WAIT, || async {
        let logs = setup.cli.ok(&["logs", "boxed"]).ok()?.stdout;
        logs.contains("greeting=from a container").then_some(logs)
    })
    .await?;
    assert!(logs.contains("greeting=from a container"), "{logs}");

    setup.client.delete::<Application>(&application.id).await?;
    wait_for("the container to go", WAIT, || async { container::fetch(port).await.is_err().then_some(()) }).await?;
    Ok(())
}

/// A tiny image made locally from Debian's static busybox, without any registry.
mod container {
    use super::*;

    pub use edgible_acceptance_tests::docker::SOCKET;
    pub const IMAGE: &str = "edgible-test/busybox-web:1";
    const SCRIPT: &str = r#"echo "greeting=$GREETING"; mkdir -p /www; echo "$GREETING" > /www/index.html; exec httpd -f -p "$PORT" -h /www"#;

    /// Makes sure an engine answers (starting `dockerd` if needed) and the image exists.
    pub fn prepare_engine() -> anyhow::Result<()> {
        edgible_acceptance_tests::docker::prepare(IMAGE, SCRIPT)
    }

    /// GET /index.html on 127.0.0.1:`port`, answering the body.
    pub async fn fetch(port: u16) -> anyhow::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        anyhow::ensure!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        Ok(answer.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_owned()).unwrap_or_default())
    }
}
