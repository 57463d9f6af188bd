//! Volumes and migration steps with real ext4 images, loop mounts and processes: a process
//! writes to its volume and finds its data again after a restart of itself and of the agent;
//! the image's size bounds what fits (ENOSPC); quiesce holds the workload stopped across an
//! agent restart; snapshot → ship (to an in-process blob store) → restore into a second
//! agent's state directory reproduces the files byte for byte; release deletes everything.
//!
//! Gated by `EDGIBLE_ACC=1`; needs root and e2fsprogs (`mkfs.ext4`, `e2fsck`, `resize2fs`).

#[path = "support/harness.rs"]
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::Utc;
use edgible::model::{Application, MigrationId};
use edgible::protocol::v1::{AgentMessage, ChunkDigest, MigrationStep, Phase, SnapshotManifest, StepOutcome};
use edgible_agent::migration::{BlobClient, MigrationContext, Migrations};
use edgible_agent::reconcile::{DesiredUpdate, ReconcilerHandle, Shutdown};
use edgible_agent::state::StateDir;
use edgible_agent::volumes::{image_path, mount_dir};
use harness::*;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};

fn enabled() -> bool {
    if std::env::var("EDGIBLE_ACC").as_deref() == Ok("1") && nix::unistd::Uid::effective().is_root() {
        return true;
    }
    eprintln!("skipping: volume tests run with EDGIBLE_ACC=1 as root (they loop-mount ext4 images; e2fsprogs)");
    false
}

/// Unmounts whatever is still mounted below a directory when dropped, so that a failing test
/// leaves no loop mount behind (and its temporary directory can go).
struct Mounts(PathBuf);

impl Drop for Mounts {
    fn drop(&mut self) {
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
        let prefix = self.0.canonicalize().unwrap_or_else(|_| self.0.clone());
        for line in mountinfo.lines() {
            if let Some(point) = line.split(' ').nth(4)
                && Path::new(point).starts_with(&prefix)
            {
                let _ = std::process::Command::new("umount").arg("-l").arg(point).status();
            }
        }
    }
}

/// An application whose process appends a line to `$EDGIBLE_VOLUME_DATA/boots` at each start,
/// with one volume of `size_mib`.
fn store(revision: u64, size_mib: u64) -> Application {
    application(
        "store",
        revision,
        json!({
            "workload": {"process": {"command": "/bin/sh", "args": ["-c", "echo boot >> \"$EDGIBLE_VOLUME_DATA/boots\"; exec sleep 600"]}},
            "storage": [{"name": "data", "size_mib": size_mib, "mount_path": "/data", "movable": true}],
        }),
    )
}

fn boots(path: &Path) -> usize {
    std::fs::read_to_string(path.join("boots")).map(|text| text.lines().count()).unwrap_or(0)
}

#[tokio::test]
async fn a_process_keeps_its_volume_across_restarts_and_cannot_outgrow_it() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let harness = Harness::new();
    let _mounts = Mounts(harness.state_path());
    let agent = harness.agent()?;
    let mut report = agent.report();
    let app = store(1, 8);
    agent.update(DesiredUpdate::full(1, vec![app.clone()])).await?;
    let pid = wait_phase(&mut report, app.id, 1, Phase::Running).await?;
    let volumes = harness.state_path().join("volumes");
    let data = mount_dir(&volumes, app.id, "data");
    assert!(image_path(&volumes, app.id, "data").is_file(), "the image exists");
    assert!(environment(pid)?.contains(&format!("EDGIBLE_VOLUME_DATA={}", data.display())));
    wait_until("the first boot's line", || (boots(&data) == 1).then_some(())).await?;

    // The workload crashes and is restarted: its data is still there.
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    wait_until("the second boot's line", || (boots(&data) == 2).then_some(())).await?;

    // The image's size is the limit: 8 MiB do not hold 16.
    let error = std::fs::write(data.join("big"), vec![7u8; 16 * 1024 * 1024]).expect_err("the volume is full");
    assert_eq!(error.raw_os_error(), Some(nix::libc::ENOSPC), "{error}");
    std::fs::remove_file(data.join("big"))?;

    // Growing the volume restarts the workload on the larger filesystem; shrinking is refused
    // with a message naming the volume, and the workload is not started on the old size.
    let grown = store(2, 24);
    agent.update(DesiredUpdate::full(2, vec![grown.clone()])).await?;
    wait_phase(&mut report, app.id, 2, Phase::Running).await?;
    wait_until("the grown volume's boot", || (boots(&data) == 3).then_some(())).await?;
    assert_eq!(std::fs::metadata(image_path(&volumes, app.id, "data"))?.len(), 24 * 1024 * 1024);
    std::fs::write(data.join("big"), vec![7u8; 12 * 1024 * 1024]).context("writing 12 MiB to the grown volume")?;
    std::fs::remove_file(data.join("big"))?;
    agent.update(DesiredUpdate::full(3, vec![store(3, 4)])).await?;
    let message = wait_report(&mut report, "the refused shrink", |report| {
        let status = report.status(app.id)?;
        (status.phase == Phase::Failed).then(|| status.message.clone().unwrap_or_default())
    })
    .await?;
    assert!(message.contains("volume data: cannot shrink"), "{message}");
    agent.update(DesiredUpdate::full(4, vec![store(4, 24)])).await?;
    wait_phase(&mut report, app.id, 4, Phase::Running).await?;
    wait_until("the boot after the refused shrink", || (boots(&data) == 4).then_some(())).await?;

    // The agent stops with its workloads, the volume is unmounted (as after a reboot): the
    // next agent mounts it again and the data is there.
    agent.shutdown(Shutdown::StopWorkloads).await;
    let status = std::process::Command::new("umount").arg(&data).status()?;
    assert!(status.success());
    let agent = harness.agent()?;
    let mut report = agent.report();
    wait_phase(&mut report, app.id, 4, Phase::Running).await?;
    wait_until("the boot after the agent restart", || (boots(&data) == 5).then_some(())).await?;

    // Gone from the desired state: stopped, but the data stays.
    agent.update(DesiredUpdate::full(5, Vec::new())).await?;
    wait_phase(&mut report, app.id, 5, Phase::Stopped).await?;
    assert!(image_path(&volumes, app.id, "data").is_file(), "removing an application keeps its volume");
    assert_eq!(boots(&data), 5);
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

/// The server's blob store of chunks, in memory, with the endpoints' semantics.
#[derive(Default)]
struct BlobStore {
    chunks: Mutex<HashMap<(String, u32), Bytes>>,
    /// Answer this many requests with 503 first (a restarting server).
    unavailable: Mutex<u32>,
}

impl BlobStore {
    async fn serve(self: Arc<Self>) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = Arc::clone(&self);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let store = Arc::clone(&store);
                        async move { Ok::<_, Infallible>(store.handle(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(format!("http://{address}"))
    }

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let answer = |status: StatusCode, body: Bytes| {
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = status;
            response
        };
        {
            let mut unavailable = self.unavailable.lock().expect("not poisoned");
            if *unavailable > 0 {
                *unavailable -= 1;
                return answer(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
            }
        }
        if request.headers().get("authorization").and_then(|value| value.to_str().ok()) != Some("Bearer device-secret")
        {
            return answer(StatusCode::UNAUTHORIZED, Bytes::new());
        }
        let path: Vec<String> = request.uri().path().split('/').map(str::to_owned).collect();
        // ["", "v1", "agent", "migrations", ID, "chunks", INDEX?]
        let migration = path.get(4).cloned().unwrap_or_default();
        let index: Option<u32> = path.get(6).and_then(|index| index.parse().ok());
        let method = request.method().clone();
        let sha = request.headers().get("x-edgible-sha256").and_then(|value| value.to_str().ok()).map(str::to_owned);
        match (method.as_str(), index) {
            ("GET", None) => {
                let chunks = self.chunks.lock().expect("not poisoned");
                let mut list: Vec<ChunkDigest> = chunks
                    .iter()
                    .filter(|((id, _), _)| *id == migration)
                    .map(|((_, index), bytes)| ChunkDigest {
                        index: *index,
                        bytes: bytes.len() as u64,
                        sha256: hex(&Sha256::digest(bytes)),
                    })
                    .collect();
                list.sort_by_key(|chunk| chunk.index);
                answer(StatusCode::OK, Bytes::from(serde_json::to_vec(&json!({"chunks": list})).expect("json")))
            }
            ("PUT", Some(index)) => {
                let Ok(body) = request.into_body().collect().await else {
                    return answer(StatusCode::BAD_REQUEST, Bytes::new());
                };
                let bytes = body.to_bytes();
                if sha.as_deref() != Some(hex(&Sha256::digest(&bytes)).as_str()) {
                    return answer(StatusCode::UNPROCESSABLE_ENTITY, Bytes::new());
                }
                self.chunks.lock().expect("not poisoned").insert((migration, index), bytes);
                answer(StatusCode::NO_CONTENT, Bytes::new())
            }
            ("GET", Some(index)) => match self.chunks.lock().expect("not poisoned").get(&(migration, index)) {
                Some(bytes) => answer(StatusCode::OK, bytes.clone()),
                None => answer(StatusCode::NOT_FOUND, Bytes::new()),
            },
            _ => answer(StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn migrations(
    harness: &Harness,
    agent: &ReconcilerHandle,
    holds_and_volumes: &Parts,
    server: &str,
) -> Result<Arc<Migrations>> {
    Ok(Migrations::new(MigrationContext {
        state_dir: StateDir::open(harness.state_path())?,
        volumes: holds_and_volumes.volumes.clone(),
        holds: Arc::clone(&holds_and_volumes.holds),
        sleep: agent.sleep_table(),
        desired: agent.desired(),
        report: agent.report(),
        drivers: edgible_agent::reconcile::Drivers::new([]),
        blobs: Some(BlobClient::new(server, "device-secret")?),
    })?)
}

/// What the migration steps share with a reconciler.
struct Parts {
    holds: Arc<edgible_agent::migration::Holds>,
    volumes: edgible_agent::volumes::Volumes,
}

fn agent_with_parts(harness: &Harness) -> Result<(ReconcilerHandle, Parts)> {
    let reconciler = harness.process_reconciler(harness.process_config())?;
    let parts = Parts { holds: reconciler.holds(), volumes: reconciler.volumes() };
    Ok((reconciler.spawn(), parts))
}

/// Runs one step and answers its outcome, and how many progress messages came with it.
async fn step(
    migrations: &Arc<Migrations>,
    migration_id: MigrationId,
    step_id: u64,
    step: MigrationStep,
) -> Result<(StepOutcome, usize)> {
    migrations.submit(migration_id, step_id, Utc::now() + chrono::Duration::seconds(60), step);
    let mut progress = 0;
    for _ in 0..6000 {
        for message in migrations.take_outgoing() {
            match message {
                AgentMessage::MigrationStepResult { step_id: id, outcome, .. } if id == step_id => {
                    return Ok((outcome, progress));
                }
                AgentMessage::MigrationProgress { .. } => progress += 1,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("step {step_id} did not end")
}

/// Every file below `dir` (but `lost+found`) with its content.
fn files(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            let relative = path.strip_prefix(dir)?.to_owned();
            if relative == Path::new("lost+found") {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                found.insert(relative, std::fs::read(&path)?);
            }
        }
    }
    Ok(found)
}

#[tokio::test]
async fn quiesce_holds_across_restarts_and_a_snapshot_restores_byte_for_byte_elsewhere() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let store_server = Arc::new(BlobStore::default());
    let server = Arc::clone(&store_server).serve().await?;
    let source = Harness::new();
    let _source_mounts = Mounts(source.state_path());
    let target = Harness::new();
    let _target_mounts = Mounts(target.state_path());

    let (agent, parts) = agent_with_parts(&source)?;
    let mut report = agent.report();
    let app = store(1, 32);
    agent.update(DesiredUpdate::full(1, vec![app.clone()])).await?;
    wait_phase(&mut report, app.id, 1, Phase::Running).await?;
    let data = mount_dir(parts.volumes.root(), app.id, "data");
    wait_until("the first boot", || (boots(&data) == 1).then_some(())).await?;
    // Files that span several chunks even compressed, and a few small ones.
    let mut noise = Vec::with_capacity(20 * 1024 * 1024);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    while noise.len() < 20 * 1024 * 1024 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::create_dir_all(data.join("nested/dir"))?;
    std::fs::write(data.join("nested/dir/noise.bin"), &noise)?;
    std::fs::write(data.join("nested/small.txt"), b"small\n")?;

    let migration = MigrationId::new();
    let steps = migrations(&source, &agent, &parts, &server)?;
    let (outcome, _) =
        step(&steps, migration, 1, MigrationStep::Quiesce { application_id: app.id, drain_seconds: 1 }).await?;
    assert_eq!(outcome, StepOutcome::Done { manifest: None });
    assert!(!report.borrow().workloads.contains_key(&app.id), "quiesce stopped the workload");

    // An agent restart does not start it again.
    agent.shutdown(Shutdown::LeaveRunning).await;
    drop(steps);
    let (agent, parts) = agent_with_parts(&source)?;
    let mut report = agent.report();
    let status = wait_report(&mut report, "the held status", |report| {
        report.status(app.id).filter(|status| status.phase == Phase::Stopped).cloned()
    })
    .await?;
    assert_eq!(status.message.as_deref(), Some("stopped for a migration"));
    let steps = migrations(&source, &agent, &parts, &server)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!report.borrow().workloads.contains_key(&app.id), "still held after a few passes");
    assert_eq!(boots(&data), 1, "never started again");

    let (outcome, _) = step(&steps, migration, 2, MigrationStep::Snapshot { application_id: app.id }).await?;
    let StepOutcome::Done { manifest: Some(manifest) } = outcome else { bail!("snapshot failed: {outcome:?}") };
    assert!(manifest.chunks.len() >= 2, "{manifest:?}");
    // The first upload attempts meet a restarting server.
    *store_server.unavailable.lock().expect("not poisoned") = 3;
    let ship = MigrationStep::Ship { application_id: app.id, manifest: manifest.clone() };
    let (outcome, progress) = step(&steps, migration, 3, ship).await?;
    assert_eq!(outcome, StepOutcome::Done { manifest: None });
    assert!(progress >= 1, "ship reports progress");

    // A corrupted manifest is refused by the target, naming the chunk, before any volume.
    let (target_agent, target_parts) = agent_with_parts(&target)?;
    let target_steps = migrations(&target, &target_agent, &target_parts, &server)?;
    let mut wrong: SnapshotManifest = manifest.clone();
    wrong.chunks[1].sha256 = "00".repeat(32);
    let restore = MigrationStep::Restore { application: Box::new(app.clone()), manifest: Some(wrong) };
    let (outcome, _) = step(&target_steps, migration, 1, restore).await?;
    let StepOutcome::Failed { reason } = outcome else { bail!("a corrupt chunk was accepted") };
    assert!(reason.contains("chunk 1"), "{reason}");
    assert!(!image_path(target_parts.volumes.root(), app.id, "data").exists(), "no volume was touched");

    let restore = MigrationStep::Restore { application: Box::new(app.clone()), manifest: Some(manifest) };
    let (outcome, _) = step(&target_steps, migration, 2, restore).await?;
    assert_eq!(outcome, StepOutcome::Done { manifest: None });
    let restored = mount_dir(target_parts.volumes.root(), app.id, "data");
    let original = files(&data)?;
    assert_eq!(original.len(), 3, "{:?}", original.keys());
    assert!(original == files(&restored)?, "the restored files differ");

    // The source resumes: the workload starts again on its data.
    let (outcome, _) = step(&steps, migration, 4, MigrationStep::Resume { application_id: app.id }).await?;
    assert_eq!(outcome, StepOutcome::Done { manifest: None });
    wait_phase(&mut report, app.id, 1, Phase::Running).await?;
    wait_until("the second boot", || (boots(&data) == 2).then_some(())).await?;

    // Release is refused while desired, then deletes volumes and snapshots.
    let (outcome, _) = step(&steps, migration, 5, MigrationStep::Release { application_id: app.id }).await?;
    assert!(matches!(outcome, StepOutcome::Failed { .. }), "{outcome:?}");
    agent.update(DesiredUpdate::full(2, Vec::new())).await?;
    wait_phase(&mut report, app.id, 2, Phase::Stopped).await?;
    let (outcome, _) = step(&steps, migration, 6, MigrationStep::Release { application_id: app.id }).await?;
    assert_eq!(outcome, StepOutcome::Done { manifest: None });
    assert!(!parts.volumes.root().join(app.id.to_string()).exists(), "volumes deleted");
    let snapshot = source.state_path().join("migrations").join(migration.to_string());
    assert!(!snapshot.exists(), "snapshot deleted");
    let (outcome, _) = step(&target_steps, migration, 3, MigrationStep::Release { application_id: app.id }).await?;
    assert_eq!(outcome, StepOutcome::Done { manifest: None });
    assert!(!target_parts.volumes.root().join(app.id.to_string()).exists(), "target volumes deleted");

    agent.shutdown(Shutdown::StopWorkloads).await;
    target_agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

/// A busybox image (built locally by the acceptance tests' helper) that appends `$GREETING`
/// to `/data/boots` and serves `/data` over HTTP on `$PORT`.
const CONTAINER_IMAGE: &str = "edgible-test/volume-busybox:1";
const CONTAINER_SCRIPT: &str = r#"echo "$GREETING" >> /data/boots; exec httpd -f -p "$PORT" -h /data"#;

#[tokio::test]
async fn a_container_sees_its_volume_at_its_mount_path_across_restarts() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    tokio::task::spawn_blocking(|| edgible_acceptance_tests::docker::prepare(CONTAINER_IMAGE, CONTAINER_SCRIPT))
        .await??;
    let harness = Harness::new();
    let _mounts = Mounts(harness.state_path());
    let volumes = harness.state_path().join("volumes");
    let prefix: String = harness
        .state_path()
        .parent()
        .and_then(|dir| dir.file_name())
        .map(|name| name.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let config = edgible_agent::driver::ContainerDriverConfig {
        socket: edgible_acceptance_tests::docker::SOCKET.into(),
        name_prefix: format!("edgible-test-{prefix}-"),
        stop_grace: Duration::from_secs(3),
        request_timeout: Duration::from_secs(30),
        volumes_dir: Some(volumes.clone()),
        ..edgible_agent::driver::ContainerDriverConfig::default()
    };
    let container: Arc<dyn edgible_agent::driver::Driver> =
        Arc::new(edgible_agent::driver::ContainerDriver::connect(config).await?);
    let agent = harness.reconciler(vec![container])?.spawn();
    let mut report = agent.report();
    let port = free_port()?;
    let app = application(
        "boxed",
        1,
        json!({
            "port": port,
            "env": {"GREETING": "hello"},
            "workload": {"container": {"image": CONTAINER_IMAGE}},
            "storage": [{"name": "data", "size_mib": 8, "mount_path": "/data"}],
            "health_check": {"protocol": "http", "path": "/boots", "interval_seconds": 1, "timeout_seconds": 1},
        }),
    );
    agent.update(DesiredUpdate::full(1, vec![app.clone()])).await?;
    wait_workload(&mut report, app.id, 1, Phase::Running).await?;
    let data = mount_dir(&volumes, app.id, "data");
    assert_eq!(std::fs::read_to_string(data.join("boots"))?, "hello\n", "the container wrote into the volume");

    // A new environment restarts the container; the volume keeps the first run's line.
    let mut changed = app.clone();
    changed.revision = 2;
    changed.spec.env.insert("GREETING".parse()?, "again".to_owned());
    agent.update(DesiredUpdate::full(2, vec![changed])).await?;
    wait_workload(&mut report, app.id, 2, Phase::Running).await?;
    assert_eq!(std::fs::read_to_string(data.join("boots"))?, "hello\nagain\n");
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}
