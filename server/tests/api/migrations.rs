//! Migrations through the API and real agent sockets: test agents answer the steps the server
//! sends, upload and download chunks over HTTP with their device credential, and report the
//! statuses the server waits for. Checked at each step: the phase, where the placement routes
//! (its host), what each device's desired state holds, and the rollback after every failure.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgible::model::{ApplicationId, DeviceId, Migration, MigrationId, MigrationPhase, Revision};
use edgible::protocol::v1::{
    AgentMessage, ApplicationStatus, ChunkDigest, MigrationStep, Phase, ServerMessage, SnapshotManifest, StepOutcome,
};
use edgible_server::blobs::sha256_hex;
use edgible_server::hub::agent::SessionConfig;
use edgible_server::migrations::driver::MigrationSettings;
use serde_json::{Value, json};

use crate::agents::{Enrolled, TestAgent, enrolled_device, pool};
use crate::support::{Org, Served, TestApp, TestRequest, application, eventually};
use axum::http::{Method, header};

/// A step the server sent.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub migration: MigrationId,
    pub step_id: u64,
    pub step: MigrationStep,
}

impl Step {
    fn kind(&self) -> &'static str {
        self.step.name()
    }
}

/// A test agent that keeps track of its desired state and queues the steps it is sent.
pub(crate) struct Agent {
    agent: TestAgent,
    pub enrolled: Enrolled,
    applications: BTreeSet<ApplicationId>,
    steps: VecDeque<Step>,
}

impl Agent {
    pub async fn connect(served: &Served, enrolled: &Enrolled) -> anyhow::Result<Agent> {
        let mut agent = TestAgent::connect(served, enrolled).await?;
        let (_, (_, _, applications, _)) = agent.hello(None).await?;
        let applications = applications.into_iter().map(|(id, _)| id).collect();
        Ok(Agent { agent, enrolled: enrolled.clone(), applications, steps: VecDeque::new() })
    }

    pub fn device(&self) -> DeviceId {
        self.enrolled.device_id
    }

    /// An agent that already said hello, whose desired state holds `applications`.
    pub fn wrap(agent: TestAgent, enrolled: &Enrolled, applications: &[ApplicationId]) -> Agent {
        let applications = applications.iter().copied().collect();
        Agent { agent, enrolled: enrolled.clone(), applications, steps: VecDeque::new() }
    }

    /// Handles the next message from the server.
    async fn pump(&mut self) -> anyhow::Result<()> {
        let message = self.agent.recv().await?;
        self.handle(message).await.map(drop)
    }

    /// Handles a message; answers whether it was an error frame.
    async fn handle(&mut self, message: ServerMessage) -> anyhow::Result<bool> {
        match message {
            ServerMessage::ApplicationUpdate { full, applications, removed, .. } => {
                if full {
                    self.applications.clear();
                }
                self.applications.extend(applications.iter().map(|application| application.id));
                for id in removed {
                    self.applications.remove(&id);
                }
            }
            ServerMessage::Ping { nonce } => self.agent.send(&AgentMessage::Pong { nonce }).await?,
            ServerMessage::MigrationStep { migration_id, step_id, step, .. } => {
                self.steps.push_back(Step { migration: migration_id, step_id, step });
            }
            ServerMessage::Error { .. } => return Ok(true),
            _ => {}
        }
        Ok(false)
    }

    /// The next step sent, which must be of `kind`.
    pub async fn step(&mut self, kind: &str) -> anyhow::Result<Step> {
        for _ in 0..100 {
            if let Some(step) = self.steps.pop_front() {
                ensure!(step.kind() == kind, "device {} expected {kind}, got {step:?}", self.device());
                return Ok(step);
            }
            self.pump().await?;
        }
        bail!("no {kind} step came")
    }

    pub async fn answer(&mut self, step: &Step, outcome: StepOutcome) -> anyhow::Result<()> {
        let message =
            AgentMessage::MigrationStepResult { migration_id: step.migration, step_id: step.step_id, outcome };
        self.agent.send(&message).await
    }

    pub async fn done(&mut self, step: &Step) -> anyhow::Result<()> {
        self.answer(step, StepOutcome::Done { manifest: None }).await
    }

    /// Reads until the desired state does (or does not) hold `application`.
    pub async fn until_runs(&mut self, application: ApplicationId, runs: bool) -> anyhow::Result<()> {
        for _ in 0..100 {
            if self.applications.contains(&application) == runs {
                return Ok(());
            }
            self.pump().await?;
        }
        bail!("device {}: the application never {}", self.device(), if runs { "came" } else { "left" })
    }

    pub fn runs(&self, application: ApplicationId) -> bool {
        self.applications.contains(&application)
    }

    pub async fn status(&mut self, application: ApplicationId, phase: Phase, revision: Revision) -> anyhow::Result<()> {
        let status = ApplicationStatus { application_id: application, revision, phase, message: None };
        self.agent.send(&AgentMessage::Status { applications: vec![status] }).await
    }

    /// Makes sure everything sent before was handled.
    pub async fn barrier(&mut self) -> anyhow::Result<()> {
        self.agent.send_text("barrier".into()).await?;
        for _ in 0..100 {
            let message = self.agent.recv().await?;
            if self.handle(message).await? {
                return Ok(());
            }
        }
        bail!("no answer to the barrier")
    }
}

/// A migration's record, through the API.
async fn migration(app: &TestApp, org: &Org, id: MigrationId) -> anyhow::Result<Migration> {
    app.get(&format!("/v1/migrations/{id}"), &org.admin_key).await?.expect(200)?.parse()
}

/// Waits until the migration is in `phase`.
async fn until_phase(app: &TestApp, org: &Org, id: MigrationId, phase: MigrationPhase) -> anyhow::Result<Migration> {
    eventually(&format!("migration {id} is in {phase:?}"), || async {
        Ok(migration(app, org, id).await?.phase == phase)
    })
    .await?;
    migration(app, org, id).await
}

async fn placement(app: &TestApp, org: &Org, id: &str) -> anyhow::Result<Value> {
    Ok(app.get(&format!("/v1/placements/{id}"), &org.admin_key).await?.expect(200)?.body)
}

/// Creates an application (with a movable volume when `stateful`) placed on `device`.
async fn placed(
    app: &TestApp,
    org: &Org,
    name: &str,
    device: DeviceId,
    stateful: bool,
) -> anyhow::Result<(ApplicationId, String, Revision)> {
    let mut spec = application(name, &[&format!("{name}.{}.example.com", org.name)]);
    if stateful {
        spec["storage"] = json!([{"name": "data", "size_mib": 64, "mount_path": "/data", "movable": true}]);
    }
    let created = app.post("/v1/applications", &org.admin_key, spec).await?.expect(201)?;
    let id: ApplicationId = created.str("/id")?.parse()?;
    let revision = created.u64("/revision")?;
    let placement = app
        .post(
            "/v1/placements",
            &org.admin_key,
            json!({"strategy": "serving-device", "application_id": id, "device_id": device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    Ok((id, placement, revision))
}

fn to_device(application: ApplicationId, device: DeviceId) -> Value {
    json!({"to": {"strategy": "serving-device", "application_id": application, "device_id": device}})
}

async fn start(app: &TestApp, org: &Org, application: ApplicationId, device: DeviceId) -> anyhow::Result<MigrationId> {
    let path = format!("/v1/applications/{application}/migrations");
    let answer = app.post(&path, &org.admin_key, to_device(application, device)).await?.expect(202)?;
    Ok(answer.str("/id")?.parse()?)
}

/// The archive of a test volume: two chunks.
fn archive() -> (Vec<Vec<u8>>, SnapshotManifest) {
    let chunks: Vec<Vec<u8>> = vec![(0..70_000u32).map(|i| (i % 251) as u8).collect(), b"the last chunk".to_vec()];
    let whole: Vec<u8> = chunks.concat();
    let manifest = SnapshotManifest {
        volumes: vec!["data".parse().expect("a name")],
        total_bytes: whole.len() as u64,
        sha256: sha256_hex(&whole),
        chunks: chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| ChunkDigest {
                index: index as u32,
                bytes: chunk.len() as u64,
                sha256: sha256_hex(chunk),
            })
            .collect(),
    };
    (chunks, manifest)
}

fn chunk_url(served: &Served, migration: MigrationId, index: Option<u32>) -> String {
    match index {
        Some(index) => format!("{}/v1/agent/migrations/{migration}/chunks/{index}", served.base),
        None => format!("{}/v1/agent/migrations/{migration}/chunks", served.base),
    }
}

async fn put_chunk(
    served: &Served,
    credential: &str,
    migration: MigrationId,
    index: u32,
    sha256: &str,
    body: Vec<u8>,
) -> anyhow::Result<u16> {
    let response = reqwest::Client::new()
        .put(chunk_url(served, migration, Some(index)))
        .bearer_auth(credential)
        .header("x-edgible-sha256", sha256)
        .body(body)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

async fn get_chunk(
    served: &Served,
    credential: &str,
    migration: MigrationId,
    index: u32,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let response =
        reqwest::Client::new().get(chunk_url(served, migration, Some(index))).bearer_auth(credential).send().await?;
    Ok((response.status().as_u16(), response.bytes().await?.to_vec()))
}

async fn list_chunks(served: &Served, credential: &str, migration: MigrationId) -> anyhow::Result<(u16, Value)> {
    let response =
        reqwest::Client::new().get(chunk_url(served, migration, None)).bearer_auth(credential).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// The source's side of snapshot and ship: answers `snapshot` with the manifest, then uploads
/// every chunk and answers `ship`.
async fn snapshot_and_ship(served: &Served, source: &mut Agent) -> anyhow::Result<SnapshotManifest> {
    let (chunks, manifest) = archive();
    let snapshot = source.step("snapshot").await?;
    source.answer(&snapshot, StepOutcome::Done { manifest: Some(manifest.clone()) }).await?;
    let ship = source.step("ship").await?;
    let MigrationStep::Ship { manifest: shipped, .. } = &ship.step else { bail!("not a ship step") };
    ensure!(*shipped == manifest);
    for (index, chunk) in chunks.into_iter().enumerate() {
        let digest = &manifest.chunks[index].sha256;
        ensure!(
            put_chunk(served, &source.enrolled.credential, ship.migration, index as u32, digest, chunk).await? == 204
        );
    }
    source.done(&ship).await?;
    Ok(manifest)
}

/// A server whose migrations time out after `step_timeout` and keep their blobs in memory.
async fn serve(url: &str, step_timeout: Duration, retention: Duration) -> anyhow::Result<Served> {
    let settings = MigrationSettings { step_timeout, retention, drain_seconds: 1, ..MigrationSettings::default() };
    TestApp::serve_migrating(url, SessionConfig::default(), settings).await
}

/// Two connected devices of a new organization.
async fn two_devices(served: &Served) -> anyhow::Result<(Org, Agent, Agent)> {
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let first = enrolled_device(app, &org, &pool, "first", 1).await?;
    let second = enrolled_device(app, &org, &pool, "second", 2).await?;
    Ok((org, Agent::connect(served, &first).await?, Agent::connect(served, &second).await?))
}

pub async fn migrations_are_refused_before_anything_starts(url: String) -> anyhow::Result<()> {
    let served = serve(&url, Duration::from_secs(300), Duration::from_secs(3600)).await?;
    let app = &served.app;
    let (org, source, target) = two_devices(&served).await?;
    let key = &org.admin_key;
    let (web, web_placement, _) = placed(app, &org, "web", source.device(), true).await?;
    let path = format!("/v1/applications/{web}/migrations");

    // The target is the source.
    app.post(&path, key, to_device(web, source.device())).await?.expect_error(409, "conflict", Some("device_id"))?;
    // The target is not a device of the organization.
    let other = app.org("other").await?;
    let other_pool = pool(app, &other).await?;
    let foreign = enrolled_device(app, &other, &other_pool, "foreign", 3).await?;
    let _foreign_agent = Agent::connect(&served, &foreign).await?;
    app.post(&path, key, to_device(web, foreign.device_id)).await?.expect_error(409, "conflict", Some("device_id"))?;
    // The target is offline.
    let home = app.get(&format!("/v1/placements/{web_placement}"), key).await?.expect(200)?;
    let pool_id = app.get(&format!("/v1/devices/{}", source.device()), key).await?.expect(200)?.str("/spec/pool_id")?;
    ensure!(home.str("/host")? == source.device().to_string());
    let offline = app.post("/v1/devices", key, json!({"name": "offline", "pool_id": pool_id})).await?.expect(201)?;
    let offline: DeviceId = offline.str("/device/id")?.parse()?;
    let answer =
        app.post(&path, key, to_device(web, offline)).await?.expect_error(409, "conflict", Some("device_id"))?;
    ensure!(answer.text.contains("offline"), "{}", answer.text);
    // Through the placement too: an application with volumes never moves without its data
    // (a stateless one would just move: `crud.rs`).
    let to_offline = json!({"strategy": "serving-device", "application_id": web, "device_id": offline});
    let placement_path = format!("/v1/placements/{web_placement}");
    let answer = app.put(&placement_path, key, to_offline).await?.expect_error(409, "conflict", Some("device_id"))?;
    ensure!(answer.text.contains("offline"), "{}", answer.text);
    let kept = app.get(&placement_path, key).await?.expect(200)?;
    ensure!(kept.body == home.body, "nothing changed: {}", kept.text);
    // No cloud host fits (there is no cloud pool at all).
    let to_cloud = json!({"to": {"strategy": "cloud", "application_id": web, "region": "eu"}});
    app.post(&path, key, to_cloud).await?.expect_error(409, "conflict", Some("region"))?;
    // A volume that is not movable.
    let mut pinned = application("pinned", &["pinned.acme.example.com"]);
    pinned["storage"] = json!([{"name": "cache", "size_mib": 16, "mount_path": "/cache"}]);
    let pinned: ApplicationId = app.post("/v1/applications", key, pinned).await?.expect(201)?.str("/id")?.parse()?;
    let pinned_placement =
        json!({"strategy": "serving-device", "application_id": pinned, "device_id": source.device()});
    app.post("/v1/placements", key, pinned_placement).await?.expect(201)?;
    let answer = app
        .post(&format!("/v1/applications/{pinned}/migrations"), key, to_device(pinned, target.device()))
        .await?
        .expect_error(409, "conflict", Some("storage"))?;
    ensure!(answer.text.contains("volume cache is not movable"), "{}", answer.text);
    // The body must name the application of the path.
    app.post(&path, key, to_device(pinned, target.device())).await?.expect_error(
        422,
        "invalid",
        Some("to.application_id"),
    )?;
    // An application that is not placed.
    let loose: ApplicationId = app
        .post("/v1/applications", key, application("loose", &["loose.acme.example.com"]))
        .await?
        .expect(201)?
        .str("/id")?
        .parse()?;
    app.post(&format!("/v1/applications/{loose}/migrations"), key, to_device(loose, target.device()))
        .await?
        .expect_error(409, "conflict", None)?;

    // Nothing was created by any of these.
    let listed = app.get(&path, key).await?.expect(200)?;
    ensure!(listed.body["items"].as_array().is_some_and(Vec::is_empty), "{}", listed.text);
    ensure!(placement_json_has_no_migration(
        &app.get(&format!("/v1/placements/{web_placement}"), key).await?.expect(200)?.body
    ));

    // One that passes; a second one while it runs is refused, also through the placement.
    let started = start(app, &org, web, target.device()).await?;
    app.post(&path, key, to_device(web, target.device())).await?.expect_error(409, "conflict", Some("migration_id"))?;
    let put = json!({"strategy": "serving-device", "application_id": web, "device_id": source.device()});
    app.put(&format!("/v1/placements/{web_placement}"), key, put).await?.expect_error(
        409,
        "conflict",
        Some("migration_id"),
    )?;
    app.delete(&format!("/v1/placements/{web_placement}"), key).await?.expect_error(
        409,
        "conflict",
        Some("migration_id"),
    )?;
    // Asking again for where it is going changes nothing (a re-applied configuration).
    let again = json!({"strategy": "serving-device", "application_id": web, "device_id": target.device()});
    let unchanged = app.put(&format!("/v1/placements/{web_placement}"), key, again).await?.expect(200)?;
    ensure!(unchanged.str("/migration_id")? == started.to_string(), "{}", unchanged.text);
    app.delete(&format!("/v1/applications/{web}"), key).await?.expect_error(409, "conflict", Some("migration_id"))?;
    let shown = placement(app, &org, &web_placement).await?;
    ensure!(shown["migration_id"] == started.to_string(), "{shown}");
    ensure!(shown["spec"]["device_id"] == target.device().to_string(), "the spec shows the destination: {shown}");
    ensure!(shown["host"] == source.device().to_string(), "the host stays the source: {shown}");

    // Another organization sees none of it.
    app.get(&format!("/v1/migrations/{started}"), &other.admin_key).await?.expect_error(404, "not_found", None)?;
    app.get(&path, &other.admin_key).await?.expect_error(404, "not_found", None)?;
    let listed = app.get(&path, key).await?.expect(200)?;
    ensure!(listed.ids()? == [started.to_string()], "{}", listed.text);
    Ok(())
}

fn placement_json_has_no_migration(placement: &Value) -> bool {
    placement.get("migration_id").is_none()
}

pub async fn a_stateful_migration_ships_its_volume_and_moves_the_route(url: String) -> anyhow::Result<()> {
    a_stateful_migration_through(&url, edgible_server::blobs::BlobStore::default()).await
}

/// The stateful migration with its chunks kept in `blobs`: memory above, an S3 bucket in
/// `crate::s3`.
pub(crate) async fn a_stateful_migration_through(
    url: &str,
    blobs: edgible_server::blobs::BlobStore,
) -> anyhow::Result<()> {
    let settings = MigrationSettings {
        step_timeout: Duration::from_secs(300),
        retention: Duration::from_secs(1),
        drain_seconds: 1,
        blobs,
    };
    let served = TestApp::serve_migrating(url, SessionConfig::default(), settings).await?;
    let app = &served.app;
    let (org, mut source, mut target) = two_devices(&served).await?;
    let (web, web_placement, revision) = placed(app, &org, "web", source.device(), true).await?;
    source.until_runs(web, true).await?;
    let id = start(app, &org, web, target.device()).await?;

    let preflight = target.step("preflight").await?;
    ensure!(preflight.migration == id);
    let MigrationStep::Preflight { application } = &preflight.step else { bail!("not preflight") };
    ensure!(application.id == web && application.spec.storage.len() == 1);
    target.done(&preflight).await?;
    let quiesce = source.step("quiesce").await?;
    ensure!(matches!(quiesce.step, MigrationStep::Quiesce { drain_seconds: 1, .. }), "{quiesce:?}");
    source.done(&quiesce).await?;

    // Snapshot, then ship with progress; damaged chunks are refused.
    let (chunks, manifest) = archive();
    let snapshot = source.step("snapshot").await?;
    source.answer(&snapshot, StepOutcome::Done { manifest: Some(manifest.clone()) }).await?;
    let ship = source.step("ship").await?;
    let credential = source.enrolled.credential.clone();
    let mut damaged = chunks[0].clone();
    damaged[10] ^= 0xff;
    ensure!(put_chunk(&served, &credential, id, 0, &manifest.chunks[0].sha256, damaged.clone()).await? == 422);
    ensure!(put_chunk(&served, &credential, id, 0, &sha256_hex(&damaged), damaged).await? == 422, "not the manifest's");
    ensure!(put_chunk(&served, &credential, id, 7, &manifest.chunks[0].sha256, chunks[0].clone()).await? == 422);
    let target_credential = target.enrolled.credential.clone();
    ensure!(put_chunk(&served, &target_credential, id, 0, &manifest.chunks[0].sha256, chunks[0].clone()).await? == 403);
    ensure!(put_chunk(&served, &credential, MigrationId::new(), 0, "00", chunks[0].clone()).await? == 404);
    let oversized = vec![0u8; edgible::protocol::v1::MAX_CHUNK_BYTES as usize + 1];
    ensure!(put_chunk(&served, &credential, id, 0, &sha256_hex(&oversized), oversized).await? == 413);
    ensure!(put_chunk(&served, &credential, id, 0, &manifest.chunks[0].sha256, chunks[0].clone()).await? == 204);
    let progress = AgentMessage::MigrationProgress {
        migration_id: id,
        step_id: ship.step_id,
        bytes_done: chunks[0].len() as u64,
        bytes_total: manifest.total_bytes,
    };
    source.agent.send(&progress).await?;
    source.barrier().await?;
    let shipping = migration(app, &org, id).await?;
    ensure!(shipping.phase == MigrationPhase::Ship && shipping.bytes_shipped == chunks[0].len() as u64, "{shipping:?}");
    ensure!(shipping.bytes_total == manifest.total_bytes);
    let (status, listed) = list_chunks(&served, &credential, id).await?;
    ensure!(status == 200 && listed["chunks"].as_array().map(Vec::len) == Some(1), "{listed}");
    ensure!(put_chunk(&served, &credential, id, 1, &manifest.chunks[1].sha256, chunks[1].clone()).await? == 204);
    source.done(&ship).await?;

    // The target restores from the blob store; only it may download.
    let restore = target.step("restore").await?;
    let MigrationStep::Restore { manifest: Some(restored), .. } = &restore.step else { bail!("{restore:?}") };
    ensure!(*restored == manifest);
    ensure!(get_chunk(&served, &credential, id, 0).await?.0 == 403, "the source may not download");
    let (status, listed) = list_chunks(&served, &target_credential, id).await?;
    ensure!(status == 200 && listed["chunks"].as_array().map(Vec::len) == Some(2), "{listed}");
    for (index, chunk) in chunks.iter().enumerate() {
        let (status, body) = get_chunk(&served, &target_credential, id, index as u32).await?;
        ensure!(status == 200 && body == *chunk, "chunk {index}: {status}");
    }
    ensure!(get_chunk(&served, &target_credential, id, 2).await?.0 == 404);
    ensure!(!target.runs(web), "the target runs nothing before its restore is done");
    target.done(&restore).await?;

    // Restored: the target runs it, the route stays on the source until it is healthy.
    target.until_runs(web, true).await?;
    ensure!(source.runs(web));
    let shown = placement(app, &org, &web_placement).await?;
    ensure!(shown["host"] == source.device().to_string() && shown["migration_id"] == id.to_string(), "{shown}");
    target.status(web, Phase::Starting, revision).await?;
    target.barrier().await?;
    ensure!(migration(app, &org, id).await?.phase == MigrationPhase::Restore);
    target.status(web, Phase::Running, revision).await?;
    let done = until_phase(app, &org, id, MigrationPhase::Completed).await?;
    ensure!(done.downtime_ms.is_some() && done.bytes_shipped == manifest.total_bytes, "{done:?}");
    let phases: Vec<MigrationPhase> = done.phases.iter().map(|record| record.phase).collect();
    use MigrationPhase::*;
    ensure!(phases == [Preflight, Quiesce, Snapshot, Ship, Restore, Cutover, Completed], "{phases:?}");
    let shown = placement(app, &org, &web_placement).await?;
    ensure!(shown["host"] == target.device().to_string() && shown.get("migration_id").is_none(), "{shown}");
    ensure!(shown["spec"]["device_id"] == target.device().to_string(), "{shown}");
    source.until_runs(web, false).await?;
    ensure!(target.runs(web));
    // The status is the target's: the report that made it cut over (stored once the session
    // has driven the cutover).
    let target_device = target.device().to_string();
    eventually("the target's report is the application's status", || async {
        let status = app.get(&format!("/v1/applications/{web}/status"), &org.admin_key).await?.expect(200)?;
        Ok(status.str("/phase")? == "running" && status.str("/device_id")? == target_device)
    })
    .await?;
    // The chunks are gone (deleted in the background once it completed); the events tell
    // the story.
    eventually("the blobs are deleted", || async {
        let (_, listed) = list_chunks(&served, &target_credential, id).await?;
        Ok(listed["chunks"].as_array().is_some_and(Vec::is_empty))
    })
    .await?;
    let events = app.get(&format!("/v1/events?application_id={web}"), &org.admin_key).await?.expect(200)?;
    for needle in ["preflight passed", "snapshot made", "shipped", "restore done", "cutover", "completed"] {
        ensure!(
            events.text.contains(&format!("migration {id}: ")) && events.text.contains(needle),
            "{needle}: {}",
            events.text
        );
    }

    // After the retention period the source is told to delete its copy.
    let release = source.step("release").await?;
    ensure!(release.migration == id);
    source.done(&release).await?;
    eventually("the source's release is recorded", || async {
        let events = app.get(&format!("/v1/events?application_id={web}"), &org.admin_key).await?.expect(200)?;
        Ok(events.text.contains("the source deleted its copy"))
    })
    .await?;
    Ok(())
}

pub async fn a_stateless_migration_through_the_placement_drains_the_source(url: String) -> anyhow::Result<()> {
    let served = serve(&url, Duration::from_secs(300), Duration::from_secs(3600)).await?;
    let app = &served.app;
    let (org, mut source, mut target) = two_devices(&served).await?;
    let (web, web_placement, revision) = placed(app, &org, "web", source.device(), false).await?;
    source.until_runs(web, true).await?;
    let body = json!({"strategy": "serving-device", "application_id": web, "device_id": target.device()});
    let path = format!("/v1/placements/{web_placement}");
    let revision_before = app.get(&path, &org.admin_key).await?.expect(200)?.u64("/revision")?;
    let stale = TestRequest::new(Method::PUT, &path)
        .key(&org.admin_key)
        .header(header::IF_MATCH, &format!("\"{}\"", revision_before + 100))
        .json(&body);
    app.send(stale).await?.expect_error(409, "stale_revision", None)?;
    let put = app
        .send(
            TestRequest::new(Method::PUT, &path)
                .key(&org.admin_key)
                .header(header::IF_MATCH, &format!("\"{revision_before}\""))
                .json(&body),
        )
        .await?
        .expect(200)?;
    ensure!(put.u64("/revision")? > revision_before);
    let id: MigrationId = put.str("/migration_id")?.parse()?;
    ensure!(put.str("/host")? == source.device().to_string(), "{}", put.text);
    migrate_stateless(&served, &org, id, web, revision, &mut source, &mut target).await?;
    let done = migration(app, &org, id).await?;
    ensure!(!done.stateful && done.downtime_ms.is_none(), "{done:?}");
    let phases: Vec<MigrationPhase> = done.phases.iter().map(|record| record.phase).collect();
    use MigrationPhase::*;
    ensure!(phases == [Preflight, Restore, Cutover, Completed], "{phases:?}");
    Ok(())
}

/// Drives a started stateless migration of `application` from `source` to `target` to its
/// end, checking that the source serves until cutover and drains after it.
pub(crate) async fn migrate_stateless(
    served: &Served,
    org: &Org,
    id: MigrationId,
    application: ApplicationId,
    revision: Revision,
    source: &mut Agent,
    target: &mut Agent,
) -> anyhow::Result<()> {
    let app = &served.app;
    let preflight = target.step("preflight").await?;
    target.done(&preflight).await?;
    let restore = target.step("restore").await?;
    ensure!(matches!(restore.step, MigrationStep::Restore { manifest: None, .. }), "{restore:?}");
    target.done(&restore).await?;
    target.until_runs(application, true).await?;
    target.status(application, Phase::Running, revision).await?;
    // Cutover: the route moves, the source drains while it still runs the application.
    let drain = source.step("drain").await?;
    ensure!(source.runs(application), "the source keeps it while draining");
    let migrating = migration(app, org, id).await?;
    ensure!(migrating.phase == MigrationPhase::Cutover, "{migrating:?}");
    source.done(&drain).await?;
    source.until_runs(application, false).await?;
    until_phase(app, org, id, MigrationPhase::Completed).await?;
    let placements = app.get("/v1/placements", &org.admin_key).await?.expect(200)?;
    let moved = placements.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|placement| placement["spec"]["application_id"] == application.to_string())
        .context("the placement")?;
    ensure!(moved["host"] == target.device().to_string() && moved.get("migration_id").is_none(), "{moved}");
    Ok(())
}

/// Checks a failed migration's rollback: the source is told to resume (and the migration says
/// so once it did), the target to release, the placement is where it was.
async fn rolled_back(
    served: &Served,
    org: &Org,
    id: MigrationId,
    placement_id: &str,
    phase: MigrationPhase,
    source: &mut Agent,
    target: &mut Agent,
) -> anyhow::Result<Migration> {
    let app = &served.app;
    let failed = until_phase(app, org, id, MigrationPhase::Failed).await?;
    ensure!(failed.failed_phase == Some(phase), "{failed:?}");
    let failure = failed.failure.clone().context("a failure")?;
    ensure!(failure.starts_with(&format!("failed in {}", phase.as_str())), "{failure}");
    let release = target.step("release").await?;
    ensure!(release.migration == id);
    let resume = source.step("resume").await?;
    ensure!(!migration(app, org, id).await?.rolled_back);
    source.done(&resume).await?;
    target.done(&release).await?;
    eventually("the source resumed", || async { Ok(migration(app, org, id).await?.rolled_back) }).await?;
    let shown = placement(app, org, placement_id).await?;
    ensure!(shown["host"] == source.device().to_string() && shown.get("migration_id").is_none(), "{shown}");
    ensure!(shown["spec"]["device_id"] == source.device().to_string(), "the spec is back: {shown}");
    eventually("the blobs are deleted", || async {
        let (_, listed) = list_chunks(served, &source.enrolled.credential, id).await?;
        Ok(listed["chunks"].as_array().is_some_and(Vec::is_empty))
    })
    .await?;
    Ok(failed)
}

pub async fn a_failure_in_each_phase_rolls_back(url: String) -> anyhow::Result<()> {
    let served = serve(&url, Duration::from_secs(300), Duration::from_secs(3600)).await?;
    let app = &served.app;
    let (org, mut source, mut target) = two_devices(&served).await?;
    let (web, web_placement, revision) = placed(app, &org, "web", source.device(), true).await?;
    let failed = StepOutcome::Failed { reason: "the disk is full".into() };
    use MigrationPhase::*;
    for phase in [Preflight, Quiesce, Snapshot, Ship, Restore] {
        let id = start(app, &org, web, target.device()).await?;
        let preflight = target.step("preflight").await?;
        if phase == Preflight {
            target.answer(&preflight, failed.clone()).await?;
        } else {
            target.done(&preflight).await?;
            let quiesce = source.step("quiesce").await?;
            if phase == Quiesce {
                source.answer(&quiesce, failed.clone()).await?;
            } else {
                source.done(&quiesce).await?;
                if phase == Snapshot {
                    let snapshot = source.step("snapshot").await?;
                    source.answer(&snapshot, failed.clone()).await?;
                } else if phase == Ship {
                    let snapshot = source.step("snapshot").await?;
                    source.answer(&snapshot, StepOutcome::Done { manifest: Some(archive().1) }).await?;
                    let ship = source.step("ship").await?;
                    let (chunks, manifest) = archive();
                    let credential = source.enrolled.credential.clone();
                    put_chunk(&served, &credential, id, 0, &manifest.chunks[0].sha256, chunks[0].clone()).await?;
                    // Done, but a chunk is missing: the server does not believe it.
                    source.done(&ship).await?;
                } else {
                    snapshot_and_ship(&served, &mut source).await?;
                    let restore = target.step("restore").await?;
                    target.done(&restore).await?;
                    target.until_runs(web, true).await?;
                    // The restored application crashes on the target.
                    target.status(web, Phase::Failed, revision).await?;
                    target.until_runs(web, false).await?;
                }
            }
        }
        let failed = rolled_back(&served, &org, id, &web_placement, phase, &mut source, &mut target).await?;
        let failure = failed.failure.unwrap_or_default();
        let expected = match phase {
            Ship => "lacks chunk 1",
            Restore => "failed on the target",
            _ => "the disk is full",
        };
        ensure!(failure.contains(expected), "{phase:?}: {failure}");
        ensure!(source.runs(web) && !target.runs(web));
    }
    let listed = app.get(&format!("/v1/applications/{web}/migrations"), &org.admin_key).await?.expect(200)?;
    ensure!(listed.ids()?.len() == 5, "{}", listed.text);
    let phases: Vec<&str> =
        listed.body["items"].as_array().into_iter().flatten().filter_map(|m| m["failed_phase"].as_str()).collect();
    ensure!(phases == ["restore", "ship", "snapshot", "quiesce", "preflight"], "newest first: {phases:?}");
    Ok(())
}

pub async fn a_step_that_times_out_rolls_back(url: String) -> anyhow::Result<()> {
    let served = serve(&url, Duration::from_secs(2), Duration::from_secs(3600)).await?;
    let app = &served.app;
    let (org, mut source, mut target) = two_devices(&served).await?;
    let (web, web_placement, _) = placed(app, &org, "web", source.device(), true).await?;
    let id = start(app, &org, web, target.device()).await?;
    let preflight = target.step("preflight").await?;
    target.done(&preflight).await?;
    // The source never answers quiesce.
    source.step("quiesce").await?;
    let failed =
        rolled_back(&served, &org, id, &web_placement, MigrationPhase::Quiesce, &mut source, &mut target).await?;
    ensure!(failed.failure.is_some_and(|failure| failure.contains("did not finish within 2 s")));
    Ok(())
}

pub async fn a_restart_in_the_middle_of_ship_resumes_it(url: String) -> anyhow::Result<()> {
    let blobs = tempfile::tempdir()?;
    let settings = || -> anyhow::Result<MigrationSettings> {
        Ok(MigrationSettings {
            blobs: edgible_server::blobs::BlobStore::local(blobs.path())?,
            ..MigrationSettings::default()
        })
    };
    let served = TestApp::serve_migrating(&url, SessionConfig::default(), settings()?).await?;
    let (org, mut source, mut target) = two_devices(&served).await?;
    let (web, web_placement, revision) = placed(&served.app, &org, "web", source.device(), true).await?;
    let id = start(&served.app, &org, web, target.device()).await?;
    let preflight = target.step("preflight").await?;
    target.done(&preflight).await?;
    let quiesce = source.step("quiesce").await?;
    source.done(&quiesce).await?;
    let (chunks, manifest) = archive();
    let snapshot = source.step("snapshot").await?;
    source.answer(&snapshot, StepOutcome::Done { manifest: Some(manifest.clone()) }).await?;
    let ship = source.step("ship").await?;
    let credential = source.enrolled.credential.clone();
    ensure!(put_chunk(&served, &credential, id, 0, &manifest.chunks[0].sha256, chunks[0].clone()).await? == 204);

    // The server goes away in the middle of ship, and comes back on the same database.
    let (source_device, target_device) = (source.enrolled.clone(), target.enrolled.clone());
    drop((source, target));
    eventually("both devices are offline", || async {
        let device = served.app.get(&format!("/v1/devices/{}", source_device.device_id), &org.admin_key).await?;
        let other = served.app.get(&format!("/v1/devices/{}", target_device.device_id), &org.admin_key).await?;
        Ok(device.str("/status/state")? == "offline" && other.str("/status/state")? == "offline")
    })
    .await?;
    drop(served);
    let served = TestApp::serve_migrating(&url, SessionConfig::default(), settings()?).await?;
    let mut source = Agent::connect(&served, &source_device).await?;
    let mut target = Agent::connect(&served, &target_device).await?;
    // The same step again, and the chunk stored before the restart is still there.
    let again = source.step("ship").await?;
    ensure!((again.migration, again.step_id) == (id, ship.step_id), "{again:?} vs {ship:?}");
    let (_, listed) = list_chunks(&served, &credential, id).await?;
    ensure!(listed["chunks"].as_array().map(Vec::len) == Some(1), "{listed}");
    ensure!(put_chunk(&served, &credential, id, 1, &manifest.chunks[1].sha256, chunks[1].clone()).await? == 204);
    source.done(&again).await?;
    let restore = target.step("restore").await?;
    for (index, chunk) in chunks.iter().enumerate() {
        ensure!(get_chunk(&served, &target.enrolled.credential, id, index as u32).await?.1 == *chunk);
    }
    target.done(&restore).await?;
    target.until_runs(web, true).await?;
    target.status(web, Phase::Running, revision).await?;
    until_phase(&served.app, &org, id, MigrationPhase::Completed).await?;
    source.until_runs(web, false).await?;
    let shown = placement(&served.app, &org, &web_placement).await?;
    ensure!(shown["host"] == target.device().to_string(), "{shown}");
    Ok(())
}
