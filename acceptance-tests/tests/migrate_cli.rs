//! The clients of migration against a real `edgible-server`: `edgible app migrate`, `app
//! migrations` and `migration get`, and a Terraform change of a placement's device. No agent
//! runs: the devices' push sessions are spoken by the test (as in `usage_cli.rs`), online and
//! answering the migration steps as the test decides: refusing the preflight, or doing every
//! step (a snapshot uploaded to and fetched from the blob store, the application reported
//! running). That covers what the clients add: the server's refusals reaching the user,
//! following a migration phase by phase with ship progress, the exit code, the downtime, and
//! Terraform's state after a move and after a failure. Moves of real workloads with their data
//! are `migration.rs`'s.
//!
//! Needs the workspace binaries: `cargo build -p edgible-server -p edgible -p
//! terraform-provider-edgible --bins && cargo test -p edgible-acceptance-tests --test
//! migrate_cli`; the Terraform test runs with `EDGIBLE_ACC=1` (it needs `terraform`).

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use base64::Engine;
use edgible::Client;
use edgible::model::{
    Application, Device, DevicePool, EnrollmentRequest, MigrationId, Placement, PlacementSpec, parse_json,
};
use edgible::protocol::v1::{
    AgentMessage, ApplicationStatus, ChunkDigest, MigrationStep, Phase, ServerMessage, SnapshotManifest, StepOutcome,
};
use edgible::protocol::{decode, encode};
use edgible_acceptance_tests::terraform::Terraform;
use edgible_acceptance_tests::{Cli, ServerProcess, heavy_tier};
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A device's push session spoken by the test, and what it needs for the blob store.
struct Agent {
    socket: Socket,
    /// The server's base URL.
    server: String,
    /// The device credential (bearer token of the session and of the blob store).
    credential: String,
}

/// The snapshot a cooperative source makes: 1.5 MiB in one chunk.
const SNAPSHOT_BYTES: usize = 1536 * 1024;

/// Why the test's target refuses the application at preflight.
const REFUSAL: &str = "the container driver is not available on this device";

/// A server, a CLI logged in to it, pool `home` with device `dev1` (offline, or online with
/// [`Setup::with_online_source`]) and device `dev2`, online through the test's own session.
struct Setup {
    server: ServerProcess,
    cli: Cli,
    client: Client,
    dev1: Device,
    /// dev1's push session, when it is online.
    source_session: Option<Agent>,
    dev2: Device,
    /// dev2's push session (taken by a test that hands it to a task).
    session: Option<Agent>,
    // Declared last so that it is removed only after the server has stopped.
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    async fn with_online_source() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(online_source: bool) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(&dir.path().join("server"))?;
        let cli = Cli::new(&dir.path().join("config"))?;
        cli.ok(&["login", "--server", &server.url, "--key", &server.admin_key])?;
        let client = server.client()?;
        let pool: DevicePool = client
            .create::<DevicePool>(&serde_json::from_value(
                serde_json::json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}),
            )?)
            .await?;
        let (dev1, source_session) = if online_source {
            let (device, session) = online_device(&server, &client, &pool, "dev1", 8).await?;
            (device, Some(session))
        } else {
            let spec = serde_json::from_value(serde_json::json!({"name": "dev1", "pool_id": pool.id}))?;
            (client.create::<Device>(&spec).await?.device, None)
        };
        let (dev2, session) = online_device(&server, &client, &pool, "dev2", 9).await?;
        Ok(Self { server, cli, client, dev1, source_session, dev2, session: Some(session), dir })
    }

    /// Application `name` on dev1, with one volume `data` when `movable` says whether it moves.
    async fn application(&self, name: &str, movable: Option<bool>) -> anyhow::Result<Application> {
        let mut spec = serde_json::json!({
            "name": name, "hostnames": [format!("{name}.example.test")], "port": 8080,
            "workload": {"container": {"image": "busybox", "ports": [8080]}},
        });
        if let Some(movable) = movable {
            spec["storage"] =
                serde_json::json!([{"name": "data", "size_mib": 16, "mount_path": "/data", "movable": movable}]);
        }
        let application: Application =
            self.client.create::<Application>(&parse_json(spec.to_string().as_bytes())?).await?;
        self.client
            .create::<Placement>(&PlacementSpec::ServingDevice {
                application_id: application.id,
                device_id: self.dev1.id,
            })
            .await?;
        Ok(application)
    }

    /// dev2's push session.
    fn target(&mut self) -> anyhow::Result<&mut Socket> {
        self.session.as_mut().map(|agent| &mut agent.socket).context("dev2's session was handed to a task")
    }

    async fn placement(&self, application: &Application) -> anyhow::Result<Placement> {
        let placements = self.client.list_all::<Placement>().await?;
        placements
            .into_iter()
            .find(|placement| placement.spec.application_id() == application.id)
            .context("the application has no placement")
    }

    /// Runs `edgible ARGS` on a blocking thread, so that the test's session can answer the
    /// server meanwhile.
    fn spawn_cli(
        &self,
        args: &[&str],
    ) -> tokio::task::JoinHandle<anyhow::Result<edgible_acceptance_tests::cli::CliOutput>> {
        let cli = self.cli.clone();
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        tokio::task::spawn_blocking(move || cli.run(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    }
}

/// Creates device `name`, enrolls it and opens its push session, past the messages that
/// follow `hello`.
async fn online_device(
    server: &ServerProcess,
    client: &Client,
    pool: &DevicePool,
    name: &str,
    key_byte: u8,
) -> anyhow::Result<(Device, Agent)> {
    let created = client
        .create::<Device>(&serde_json::from_value(serde_json::json!({"name": name, "pool_id": pool.id}))?)
        .await?;
    let public_key = base64::engine::general_purpose::STANDARD.encode([key_byte; 32]);
    let enrolled = Client::enroll(
        &server.url,
        &EnrollmentRequest { token: created.enrollment_token, public_key: public_key.clone() },
    )
    .await?;
    let url = format!("{}/v1/agent/connect", server.url.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", enrolled.credential).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let hello = AgentMessage::Hello {
        device_id: enrolled.device.id,
        public_key,
        applied_revision: None,
        capabilities: vec!["process".into(), "container".into()],
        agent_version: "migrate-cli-test".into(),
        cloud_host: None,
    };
    socket.send(Message::text(encode(&hello))).await?;
    for _ in 0..10 {
        if matches!(next_message(&mut socket).await?, ServerMessage::Access { .. }) {
            let device = client.get::<Device>(&enrolled.device.id).await?;
            let agent = Agent { socket, server: server.url.clone(), credential: enrolled.credential };
            return Ok((device, agent));
        }
    }
    bail!("no access message after hello")
}

/// The next protocol message from the server, answering pings on the way.
async fn next_message(socket: &mut Socket) -> anyhow::Result<ServerMessage> {
    for _ in 0..100 {
        let frame = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .context("no frame from the server in time")?
            .context("the server closed the socket")??;
        match frame {
            Message::Text(text) => match decode::<ServerMessage>(text.as_str())? {
                ServerMessage::Ping { nonce } => {
                    socket.send(Message::text(encode(&AgentMessage::Pong { nonce }))).await?;
                }
                message => return Ok(message),
            },
            Message::Close(close) => bail!("the server closed the session: {close:?}"),
            _ => {}
        }
    }
    bail!("no protocol message in 100 frames")
}

/// Waits for the preflight step of a migration and refuses it with [`REFUSAL`], as an agent
/// without the driver would.
async fn refuse_preflight(socket: &mut Socket) -> anyhow::Result<MigrationId> {
    for _ in 0..20 {
        if let ServerMessage::MigrationStep { migration_id, step_id, step: MigrationStep::Preflight { .. }, .. } =
            next_message(socket).await?
        {
            let outcome = StepOutcome::Failed { reason: REFUSAL.to_owned() };
            let answer = AgentMessage::MigrationStepResult { migration_id, step_id, outcome };
            socket.send(Message::text(encode(&answer))).await?;
            return Ok(migration_id);
        }
    }
    bail!("no preflight step for the target in 20 messages")
}

/// Answers every migration step as an agent that succeeds would: a snapshot of
/// [`SNAPSHOT_BYTES`] uploaded to the blob store with progress on the way, downloaded and
/// checked at restore; once it restored an application, it reports it running at its
/// revision. Runs until aborted; answers the steps it saw, in order.
fn cooperative_agent(agent: Agent) -> tokio::task::JoinHandle<anyhow::Result<Vec<String>>> {
    tokio::spawn(async move {
        let Agent { mut socket, server, credential } = agent;
        let http = reqwest::Client::new();
        let snapshot: Vec<u8> = (0..SNAPSHOT_BYTES).map(|index| (index % 251) as u8).collect();
        let digest = hex::encode(Sha256::digest(&snapshot));
        let mut seen = Vec::new();
        let mut restored: Option<ApplicationStatus> = None;
        loop {
            let message = next_message(&mut socket).await.with_context(|| format!("after steps {seen:?}"))?;
            if let ServerMessage::MigrationStep { migration_id, step_id, step, .. } = message {
                let name = serde_json::to_value(&step)?["kind"].as_str().unwrap_or("?").to_owned();
                let chunks = format!("{server}/v1/agent/migrations/{migration_id}/chunks");
                let mut manifest = None;
                match &step {
                    MigrationStep::Snapshot { .. } => {
                        manifest = Some(SnapshotManifest {
                            volumes: vec!["data".parse()?],
                            total_bytes: snapshot.len() as u64,
                            sha256: digest.clone(),
                            chunks: vec![ChunkDigest {
                                index: 0,
                                bytes: snapshot.len() as u64,
                                sha256: digest.clone(),
                            }],
                        });
                    }
                    MigrationStep::Ship { .. } => {
                        // Long enough for the CLI to read the ship phase a few times.
                        let total = snapshot.len() as u64;
                        for bytes_done in [0, total / 2] {
                            let progress = AgentMessage::MigrationProgress {
                                migration_id,
                                step_id,
                                bytes_done,
                                bytes_total: total,
                            };
                            socket.send(Message::text(encode(&progress))).await?;
                            tokio::time::sleep(Duration::from_millis(700)).await;
                        }
                        let stored = http
                            .put(format!("{chunks}/0"))
                            .bearer_auth(&credential)
                            .header("x-edgible-sha256", &digest)
                            .body(snapshot.clone())
                            .send()
                            .await?;
                        ensure!(stored.status().is_success(), "storing the chunk: {}", stored.status());
                    }
                    MigrationStep::Restore { application, manifest: Some(_) } => {
                        let fetched = http.get(format!("{chunks}/0")).bearer_auth(&credential).send().await?;
                        ensure!(fetched.status().is_success(), "fetching the chunk: {}", fetched.status());
                        ensure!(fetched.bytes().await? == snapshot, "the chunk came back changed");
                        restored = Some(running(application));
                    }
                    MigrationStep::Restore { application, manifest: None } => restored = Some(running(application)),
                    _ => {}
                }
                let outcome = StepOutcome::Done { manifest };
                let answer = AgentMessage::MigrationStepResult { migration_id, step_id, outcome };
                socket.send(Message::text(encode(&answer))).await?;
                seen.push(name);
            }
            // The status counts once the server gave the device the application (a desired
            // state that follows the restore): sent again with every message until then.
            if let Some(status) = &restored {
                let report = AgentMessage::Status { applications: vec![status.clone()] };
                socket.send(Message::text(encode(&report))).await?;
            }
        }
    })
}

fn running(application: &Application) -> ApplicationStatus {
    ApplicationStatus {
        application_id: application.id,
        revision: application.revision,
        phase: Phase::Running,
        message: None,
    }
}

/// Checks that the application still runs where it was and nothing is moving it.
async fn stays_on(setup: &Setup, application: &Application, device: &Device) -> anyhow::Result<()> {
    let placement = setup.placement(application).await?;
    ensure!(placement.spec.device_id() == Some(device.id), "the placement moved: {placement:?}");
    ensure!(placement.migration_id.is_none(), "a migration is still active: {placement:?}");
    Ok(())
}

#[tokio::test]
async fn refusals_and_a_timeout_reach_the_user_and_nothing_moves() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let cli = &setup.cli;
    let web = setup.application("web", None).await?;
    let notes = setup.application("notes", Some(false)).await?;

    // The server's 409s, with its message, exit 1.
    let pinned = cli.fails(&["app", "migrate", "notes", "--to", "dev2"])?;
    ensure!(pinned.stderr.contains("409") && pinned.stderr.contains("not movable"), "{}", pinned.stderr);
    ensure!(pinned.stderr.contains("migrating application notes"), "{}", pinned.stderr);
    cli.ok(&["device", "create", "dev3", "--pool", "home"])?;
    let offline = cli.fails(&["app", "migrate", "web", "--to", "dev3"])?;
    ensure!(offline.stderr.contains("409") && offline.stderr.contains("offline"), "{}", offline.stderr);
    let same = cli.fails(&["app", "migrate", "web", "--to", "dev1"])?;
    ensure!(same.stderr.contains("409"), "{}", same.stderr);

    // Mistakes caught before anything is asked.
    let unknown = cli.fails(&["app", "migrate", "web", "--to", "ghost"])?;
    ensure!(unknown.stderr.contains("no device is named or has the id \"ghost\""), "{}", unknown.stderr);
    let malformed = cli.run(&["app", "migrate", "web", "--to", "rack:dev2"])?;
    ensure!(malformed.status.code() == Some(2) && malformed.stderr.contains("cloud:REGION"), "{}", malformed.stderr);
    let region = cli.fails(&["app", "migrate", "web", "--to", "cloud:nowhere"])?;
    ensure!(region.stderr.contains("409") || region.stderr.contains("422"), "no cloud host: {}", region.stderr);

    // Nothing was created, nothing moved.
    ensure!(cli.json(&["app", "migrations", "web"])? == serde_json::json!([]));
    let table = cli.ok(&["app", "migrations", "notes"])?.stdout;
    ensure!(table.lines().count() == 1 && table.starts_with("ID"), "only the header: {table}");
    stays_on(&setup, &web, &setup.dev1).await?;
    stays_on(&setup, &notes, &setup.dev1).await?;
    let missing = cli.fails(&["migration", "get", &MigrationId::new().to_string()])?;
    ensure!(missing.stderr.contains("404"), "{}", missing.stderr);

    // dev2 never answers the preflight: the wait gives up, naming the phase, and the migration
    // goes on on the server.
    let waited = cli.run(&["app", "migrate", "web", "--to", "dev2", "--timeout", "2"])?;
    let error = waited.stderr.lines().last().unwrap_or_default();
    ensure!(waited.status.code() == Some(1), "exit 1 on a timeout:\n{}", waited.stderr);
    ensure!(error.starts_with("error: gave up after 2.0s") && error.contains("(now in preflight)"), "{error}");
    let table = cli.ok(&["app", "migrations", "web"])?.stdout;
    ensure!(table.lines().nth(1).is_some_and(|row| row.contains("preflight") && row.contains("so far")), "{table}");
    Ok(())
}

#[tokio::test]
async fn a_failed_migration_is_followed_to_its_end_and_exits_non_zero() -> anyhow::Result<()> {
    let mut setup = Setup::start().await?;
    let web = setup.application("web", Some(true)).await?;

    let run = setup.spawn_cli(&["app", "migrate", "web", "--to", "dev2", "--timeout", "120"]);
    let migration_id = refuse_preflight(setup.target()?).await?;
    let output = tokio::time::timeout(Duration::from_secs(150), run).await.context("the CLI did not end")???;
    ensure!(output.status.code() == Some(1), "exit 1 on failure:\n{}", output.stderr);
    let lines: Vec<&str> = output.stderr.lines().collect();
    ensure!(lines.first().is_some_and(|line| line.contains(&migration_id.to_string())), "{}", output.stderr);
    ensure!(lines.iter().any(|line| line.ends_with("] preflight")), "the phase is shown: {}", output.stderr);
    let failed = |line: &str| line.contains("failed in preflight: ") && line.matches("failed in").count() == 1;
    ensure!(
        lines.iter().any(|line| line.starts_with('[') && failed(line) && line.ends_with(REFUSAL)),
        "the phase and the reason, once: {}",
        output.stderr
    );
    let error = lines.last().context("no error line")?;
    ensure!(error.starts_with("error: migration ") && failed(error) && error.contains(REFUSAL), "{}", output.stderr);
    ensure!(error.contains("web stays on dev1") || error.contains("web runs on dev1 again"), "{error}");
    ensure!(output.stdout.is_empty(), "the result of a failure is the error: {}", output.stdout);
    stays_on(&setup, &web, &setup.dev1).await?;

    // The migration is listed and shown with its failure.
    let cli = &setup.cli;
    let listed = cli.json(&["app", "migrations", "web"])?;
    ensure!(listed.as_array().map(Vec::len) == Some(1), "{listed}");
    ensure!(listed[0]["phase"] == "failed" && listed[0]["failed_phase"] == "preflight", "{listed}");
    let table = cli.ok(&["app", "migrations", "web"])?.stdout;
    let row = table.lines().nth(1).context("no row")?;
    ensure!(row.starts_with(&migration_id.to_string()), "{table}");
    for cell in ["dev1", "dev2", "failed", "preflight: ", REFUSAL] {
        ensure!(row.contains(cell), "{cell:?} missing: {table}");
    }
    let shown = cli.ok(&["migration", "get", &migration_id.to_string()])?.stdout;
    ensure!(shown.contains("in preflight: ") && shown.contains(REFUSAL) && shown.contains("web"), "{shown}");
    ensure!(
        cli.json(&["migration", "get", &migration_id.to_string()])?["source"] == setup.dev1.id.to_string().as_str()
    );

    // --no-wait returns at once; the running migration refuses a second one.
    let started = cli.ok(&["app", "migrate", "web", "--to", "dev2", "--no-wait"])?.stdout;
    ensure!(started.starts_with("Started migration ") && started.contains("from dev1 to dev2"), "{started}");
    let second = cli.fails(&["app", "migrate", "web", "--to", "dev2"])?;
    ensure!(second.stderr.contains("409"), "{}", second.stderr);
    let running = setup.placement(&web).await?;
    ensure!(running.migration_id.is_some() && running.host == Some(setup.dev1.id), "{running:?}");
    refuse_preflight(setup.target()?).await?;
    edgible_acceptance_tests::wait_for("the second migration to fail", Duration::from_secs(20), || async {
        setup.placement(&web).await.ok().and_then(|placement| placement.migration_id.is_none().then_some(()))
    })
    .await?;
    stays_on(&setup, &web, &setup.dev1).await?;
    drop(setup.server);
    Ok(())
}

#[tokio::test]
async fn terraform_moves_in_place_and_keeps_the_old_device_when_the_migration_fails() -> anyhow::Result<()> {
    if !heavy_tier("terraform_moves_in_place_and_keeps_the_old_device_when_the_migration_fails") {
        return Ok(());
    }
    let mut setup = Setup::with_online_source().await?;
    let terraform = Terraform::new(&setup.dir.path().join("terraform"), &setup.server.url, &setup.server.admin_key)?;
    terraform.write_config(&format!(
        r#"
variable "device_id" {{
  type    = string
  default = "{dev1}"
}}

resource "edgible_application" "web" {{
  name      = "web"
  hostnames = ["web.example.test"]
  port      = 8080
  workload {{
    container {{
      image = "busybox"
      ports = [8080]
    }}
  }}
  storage {{
    name       = "data"
    size_mib   = 16
    mount_path = "/data"
    movable    = true
  }}
}}

resource "edgible_placement" "web" {{
  application_id            = edgible_application.web.id
  strategy                  = "serving-device"
  device_id                 = var.device_id
  migration_timeout_seconds = 120
}}
"#,
        dev1 = setup.dev1.id
    ))?;
    terraform.apply().await?;
    terraform.expect_no_changes().await?;

    let to_dev2 = format!("device_id={}", setup.dev2.id);
    let args = ["apply", "-auto-approve", "-input=false", "-no-color", "-var", &to_dev2];
    let apply = terraform.run(&args);
    let (apply, refused) = tokio::join!(apply, refuse_preflight(setup.target()?));
    let (apply, migration_id) = (apply?, refused?);
    let apply = apply.expect_failure()?;
    // Terraform wraps diagnostics at 78 columns.
    let said = apply.stderr.split_whitespace().collect::<Vec<_>>().join(" ");
    ensure!(said.contains("Error: Migration failed in preflight"), "{apply}");
    ensure!(said.contains(REFUSAL) && said.contains(&migration_id.to_string()), "{apply}");
    ensure!(!apply.all().contains("inconsistent result"), "{apply}");

    // The state shows where the application runs, so the move is proposed again.
    let values = terraform.values("edgible_placement.web").await?;
    ensure!(values["device_id"] == setup.dev1.id.to_string().as_str(), "{values}");
    ensure!(values["host"] == setup.dev1.id.to_string().as_str(), "{values}");
    let placement = setup.client.get::<Placement>(&values["id"].as_str().context("id")?.parse()?).await?;
    ensure!(values["revision"] == placement.revision, "the state has the placement's current revision: {values}");
    let plan = terraform.run(&["plan", "-detailed-exitcode", "-input=false", "-no-color", "-var", &to_dev2]).await?;
    let plan = plan.expect_code(2)?;
    ensure!(plan.stdout.contains("edgible_placement.web will be updated in-place"), "{plan}");
    terraform.expect_no_changes().await?;

    // With agents that do their part, the same change moves the application: the apply waits
    // for the migration and the state shows the new host.
    let source = cooperative_agent(setup.source_session.take().context("dev1 is online")?);
    let target = cooperative_agent(setup.session.take().context("dev2 is online")?);
    let applied = terraform.run(&args).await;
    let (source, target) = (abort(source).await, abort(target).await);
    let applied = applied?;
    ensure!(applied.code() == Some(0), "{applied}\nsource saw {source}, target saw {target}");
    let values = terraform.values("edgible_placement.web").await?;
    ensure!(values["device_id"] == setup.dev2.id.to_string().as_str(), "{values}");
    ensure!(values["host"] == setup.dev2.id.to_string().as_str(), "the new host, not unknown: {values}");
    let plan = terraform.run(&["plan", "-detailed-exitcode", "-input=false", "-no-color", "-var", &to_dev2]).await?;
    plan.expect_code(0).context("nothing left to change")?;
    let listed = setup.cli.json(&["app", "migrations", "web"])?;
    ensure!(listed[0]["phase"] == "completed" && listed[1]["phase"] == "failed", "{listed}");
    terraform
        .run(&["destroy", "-auto-approve", "-input=false", "-no-color", "-var", &to_dev2])
        .await?
        .expect_success()?;
    Ok(())
}

#[tokio::test]
async fn a_completed_migration_exits_zero_and_the_application_runs_at_the_target() -> anyhow::Result<()> {
    let mut setup = Setup::with_online_source().await?;
    let web = setup.application("web", None).await?;
    let source = cooperative_agent(setup.source_session.take().context("dev1 is online")?);
    let target = cooperative_agent(setup.session.take().context("dev2 is online")?);

    let run = setup.spawn_cli(&["app", "migrate", "web", "--to", "dev2", "--timeout", "60"]);
    let output = tokio::time::timeout(Duration::from_secs(90), run).await;
    let (source, target) = (abort(source).await, abort(target).await);
    let output = output.context("the CLI did not end")???;
    ensure!(
        output.status.success(),
        "exit 0:\n{}\n{}\nsource saw {source:?}, target saw {target:?}",
        output.stdout,
        output.stderr
    );
    for phase in ["preflight", "restore", "cutover", "completed"] {
        let shown = output.stderr.lines().any(|line| line.starts_with('[') && line.ends_with(&format!("] {phase}")));
        ensure!(shown, "{phase} is shown:\n{}", output.stderr);
    }
    let summary = output.stdout.trim();
    ensure!(summary.starts_with("Migrated web to dev2 in "), "{summary}");
    ensure!(summary.ends_with("with no downtime (stateless)."), "{summary}");
    let placement = setup.placement(&web).await?;
    ensure!(placement.spec.device_id() == Some(setup.dev2.id), "{placement:?}");
    ensure!(placement.host == Some(setup.dev2.id) && placement.migration_id.is_none(), "{placement:?}");
    let listed = setup.cli.json(&["app", "migrations", "web"])?;
    ensure!(listed[0]["phase"] == "completed", "{listed}");
    Ok(())
}

/// Stops a cooperative agent and answers the steps it saw, or why it stopped early.
async fn abort(agent: tokio::task::JoinHandle<anyhow::Result<Vec<String>>>) -> String {
    agent.abort();
    match agent.await {
        Ok(Ok(seen)) => format!("{seen:?}"),
        Ok(Err(error)) => format!("stopped: {error:#}"),
        Err(_) => "aborted".to_owned(),
    }
}

#[tokio::test]
async fn a_stateful_migration_shows_ship_progress_and_the_downtime() -> anyhow::Result<()> {
    let mut setup = Setup::with_online_source().await?;
    let notes = setup.application("notes", Some(true)).await?;
    let source = cooperative_agent(setup.source_session.take().context("dev1 is online")?);
    let target = cooperative_agent(setup.session.take().context("dev2 is online")?);

    let run = setup.spawn_cli(&["app", "migrate", "notes", "--to", "dev2", "--timeout", "60"]);
    let output = tokio::time::timeout(Duration::from_secs(90), run).await;
    let (source, target) = (abort(source).await, abort(target).await);
    let output = output.context("the CLI did not end")???;
    ensure!(
        output.status.success(),
        "exit 0:\n{}\n{}\nsource saw {source:?}, target saw {target:?}",
        output.stdout,
        output.stderr
    );
    // What a user sees, for the test's log.
    eprintln!("{}{}", output.stderr, output.stdout);
    let phases: Vec<&str> = output
        .stderr
        .lines()
        .filter(|line| line.starts_with('['))
        .filter_map(|line| line.split("] ").nth(1))
        .map(|text| text.split(';').next().unwrap_or(text))
        .collect();
    ensure!(
        phases == ["preflight", "quiesce", "snapshot", "ship", "restore", "cutover", "completed"],
        "every phase once, in order: {phases:?}\n{}",
        output.stderr
    );
    ensure!(
        output.stderr.lines().any(|line| line.trim_start().starts_with("ship ") && line.contains("/1.5 MiB")),
        "ship progress with the total:\n{}",
        output.stderr
    );
    let summary = output.stdout.trim();
    ensure!(summary.starts_with("Migrated notes to dev2 in ") && summary.contains("; downtime "), "{summary}");
    let shown = setup.cli.json(&["app", "migrations", "notes"])?;
    ensure!(shown[0]["bytes_shipped"] == SNAPSHOT_BYTES && shown[0]["downtime_ms"].is_u64(), "{shown}");
    let placement = setup.placement(&notes).await?;
    ensure!(placement.host == Some(setup.dev2.id) && placement.migration_id.is_none(), "{placement:?}");
    Ok(())
}

#[tokio::test]
async fn a_stack_deploy_that_moves_an_application_follows_the_migration() -> anyhow::Result<()> {
    let mut setup = Setup::with_online_source().await?;
    let stack = |device: &str| {
        format!(
            "applications:\n  - name: web\n    hostnames: [web.example.test]\n    port: 8080\n    workload:\n      \
             container:\n        image: busybox\n        ports: [8080]\n    placement:\n      strategy: serving-device\n      \
             device: {device}\n"
        )
    };
    let file = setup.dir.path().join("stack.yaml");
    std::fs::write(&file, stack("dev1"))?;
    let file = file.display().to_string();
    setup.cli.ok(&["stack", "deploy", &file, "--no-wait"])?;
    std::fs::write(&file, stack("dev2"))?;

    let source = cooperative_agent(setup.source_session.take().context("dev1 is online")?);
    let target = cooperative_agent(setup.session.take().context("dev2 is online")?);
    let run = setup.spawn_cli(&["stack", "deploy", &file, "--timeout", "60"]);
    let output = tokio::time::timeout(Duration::from_secs(90), run).await;
    let (source, target) = (abort(source).await, abort(target).await);
    let output = output.context("the CLI did not end")???;
    ensure!(
        output.status.success(),
        "exit 0:\n{}\n{}\nsource saw {source:?}, target saw {target:?}",
        output.stdout,
        output.stderr
    );
    eprintln!("{}{}", output.stdout, output.stderr);
    ensure!(output.stderr.contains("web: moving ("), "{}", output.stderr);
    ensure!(output.stderr.lines().any(|line| line.ends_with("] completed")), "followed to the end: {}", output.stderr);
    let listed = setup.cli.json(&["app", "migrations", "web"])?;
    ensure!(listed[0]["phase"] == "completed", "{listed}");
    Ok(())
}
