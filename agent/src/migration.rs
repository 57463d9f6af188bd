//! The device's side of migrations (DESIGN.md section 9): executing the steps the server sends
//! (`migration_step`) and answering each with a `migration_step_result`.
//!
//! - Each step runs in a task of its own, bounded by the step's deadline, so the push session
//!   keeps reading. Steps are remembered by `(migration_id, step_id)` ([`steps`]): a repeat of a
//!   running step is ignored, a repeat of an ended one is answered again with the stored
//!   outcome (the server repeats the current step after a reconnect or its own restart).
//! - `preflight` (target): the driver for the workload kind (the container driver pulls the
//!   image if it is missing), free disk for the volumes, the right to mount them. Changes no
//!   workload or volume.
//! - `quiesce` (source): the proxy refuses the application's new requests (503,
//!   `Retry-After: 1`), waits up to `drain_seconds` for those in flight, then a persisted hold
//!   ([`holds`]) stops the workload and keeps it stopped, also across agent restarts, until
//!   `resume` or `release`.
//! - `snapshot` (source, quiesced): the movable volumes' files into a zstd-compressed tar cut
//!   into chunks under `<state_dir>/migrations/<migration_id>/` ([`archive`]), answered with
//!   the manifest.
//! - `ship` (source): uploads the chunks the blob store lacks ([`blobs`]), retrying connection
//!   errors with backoff until the deadline, so an upload resumes after a server restart.
//! - `restore` (target): downloads the chunks (keeping those already verified), checks each
//!   on arrival and the whole archive as they arrive in order, and only once all passed
//!   replaces the application's volumes with fresh images holding the archive's files.
//! - `drain` (source, stateless, after cutover): HTTP/1 answers carry `Connection: close`, and
//!   the step waits up to `drain_seconds` for the requests in flight.
//! - `resume`: lifts the hold and opens the proxy again; the reconciler starts the workload.
//! - `release`: refused while the application is desired here; else deletes its volumes and
//!   snapshots.
//!
//! `ship` and `restore` move [`TRANSFERS`] chunks at once (the downtime of a stateful
//! migration is mostly these steps). `snapshot`, `ship` and `restore` report
//! `migration_progress` at most four times a second.
//! Results and progress wait in a small outbox that the session's writer empties; a result
//! lost with a connection is sent again when the server repeats the step.

pub mod archive;
pub mod blobs;
pub mod holds;
pub mod steps;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use edgible::model::{Application, ApplicationId, MigrationId, Name};
use edgible::protocol::v1::{AgentMessage, ChunkDigest, MAX_CHUNK_BYTES, MigrationStep, SnapshotManifest, StepOutcome};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub use self::blobs::BlobClient;
pub use self::holds::{Holds, MIGRATIONS_DIR};
use self::steps::{Begin, EndedStep, StepLog};
use crate::driver::LaunchSpec;
use crate::reconcile::{AgentReport, DesiredState, Drivers};
use crate::sleep::{Gate, SleepTable};
use crate::state::{StateDir, StateError};
use crate::volumes::Volumes;

const STEPS_FILE: &str = "steps.json";
/// The file in a snapshot directory naming its application.
const APPLICATION_FILE: &str = "application";
/// The manifest of a snapshot made on this device.
const MANIFEST_FILE: &str = "manifest.json";
/// The most messages waiting for the session; progress beyond it is dropped, results never.
const OUTBOX_CAPACITY: usize = 256;
/// The shortest time between two progress messages of a step.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How often quiesce and drain look at what is in flight, and quiesce at the workload.
const POLL: Duration = Duration::from_millis(50);
/// Retries of the blob store: the first delay, doubling up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How many chunks ship or restore transfer at once.
const TRANSFERS: usize = 3;

/// What steps act on: the agent's volumes, holds, proxy gates, desired state and report.
#[derive(Clone)]
pub struct MigrationContext {
    pub state_dir: StateDir,
    pub volumes: Volumes,
    pub holds: Arc<Holds>,
    pub sleep: Arc<SleepTable>,
    pub desired: watch::Receiver<Arc<DesiredState>>,
    pub report: watch::Receiver<AgentReport>,
    /// The agent's drivers, which preflight asks.
    pub drivers: Drivers,
    /// The server's blob store; `None` where there is no server (ship and restore of a
    /// snapshot then fail).
    pub blobs: Option<BlobClient>,
}

/// Executes migration steps; shared by the push sessions of the agent's life.
pub struct Migrations {
    context: MigrationContext,
    log: Mutex<StepLog>,
    outbox: Mutex<VecDeque<AgentMessage>>,
    outgoing: Notify,
}

impl Migrations {
    /// Continues from the steps the state directory remembers.
    pub fn new(context: MigrationContext) -> Result<Arc<Self>, StateError> {
        let ended: Vec<EndedStep> = match context.state_dir.read_in(MIGRATIONS_DIR, STEPS_FILE)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: context.state_dir.root().join(MIGRATIONS_DIR).join(STEPS_FILE),
                source,
            })?,
            None => Vec::new(),
        };
        Ok(Arc::new(Self {
            context,
            log: Mutex::new(StepLog::new(ended)),
            outbox: Mutex::new(VecDeque::new()),
            outgoing: Notify::new(),
        }))
    }

    fn log(&self) -> MutexGuard<'_, StepLog> {
        // Every critical section leaves the log coherent, so a poisoned lock is still usable.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn outbox(&self) -> MutexGuard<'_, VecDeque<AgentMessage>> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a step the server sent: runs it in a task, or answers a repeat. Never waits.
    pub fn submit(
        self: &Arc<Self>,
        migration_id: MigrationId,
        step_id: u64,
        deadline: DateTime<Utc>,
        step: MigrationStep,
    ) {
        match self.log().begin(migration_id, step_id) {
            Begin::Running => {
                tracing::debug!(%migration_id, step_id, "the step runs already");
            }
            Begin::Ended(outcome) => {
                self.push(AgentMessage::MigrationStepResult { migration_id, step_id, outcome }, true);
            }
            Begin::Run => {
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let outcome = this.run(migration_id, step_id, deadline, step).await;
                    this.end(migration_id, step_id, outcome);
                });
            }
        }
    }

    async fn run(
        &self,
        migration_id: MigrationId,
        step_id: u64,
        deadline: DateTime<Utc>,
        step: MigrationStep,
    ) -> StepOutcome {
        let name = step.name();
        tracing::info!(%migration_id, step_id, step = name, "running a migration step");
        let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let progress = Progress { migrations: self, migration_id, step_id, last: Mutex::new(None) };
        let runner =
            Step { context: &self.context, migration_id, progress: &progress, deadline: Instant::now() + left };
        match tokio::time::timeout(left, runner.execute(step)).await {
            Ok(Ok(manifest)) => StepOutcome::Done { manifest },
            Ok(Err(reason)) => StepOutcome::Failed { reason },
            Err(_) => StepOutcome::Failed { reason: format!("{name} did not finish by its deadline") },
        }
    }

    fn end(&self, migration_id: MigrationId, step_id: u64, outcome: StepOutcome) {
        let ended = {
            let mut log = self.log();
            log.end(migration_id, step_id, outcome.clone());
            log.ended()
        };
        // Serializing ids, numbers and strings cannot fail.
        let bytes = serde_json::to_vec(&ended).unwrap_or_default();
        if let Err(error) = self.context.state_dir.write_in(MIGRATIONS_DIR, STEPS_FILE, &bytes) {
            // The result still goes out; a repeat after an agent restart would run it again.
            tracing::warn!(%error, "cannot persist the migration steps");
        }
        match &outcome {
            StepOutcome::Done { .. } => tracing::info!(%migration_id, step_id, "migration step done"),
            StepOutcome::Failed { reason } => tracing::warn!(%migration_id, step_id, %reason, "migration step failed"),
        }
        self.push(AgentMessage::MigrationStepResult { migration_id, step_id, outcome }, true);
    }

    fn push(&self, message: AgentMessage, keep: bool) {
        {
            let mut outbox = self.outbox();
            if outbox.len() >= OUTBOX_CAPACITY {
                if !keep {
                    return;
                }
                // Make room by dropping the oldest progress message, if any.
                if let Some(position) =
                    outbox.iter().position(|message| matches!(message, AgentMessage::MigrationProgress { .. }))
                {
                    outbox.remove(position);
                }
            }
            outbox.push_back(message);
        }
        self.outgoing.notify_one();
    }

    /// Waits until a message is waiting for the session.
    pub async fn outgoing(&self) {
        if !self.outbox().is_empty() {
            return;
        }
        self.outgoing.notified().await;
    }

    /// The messages waiting for the session, oldest first.
    pub fn take_outgoing(&self) -> Vec<AgentMessage> {
        self.outbox().drain(..).collect()
    }
}

/// Sends a step's progress, at most every [`PROGRESS_INTERVAL`].
struct Progress<'a> {
    migrations: &'a Migrations,
    migration_id: MigrationId,
    step_id: u64,
    last: Mutex<Option<Instant>>,
}

impl Progress<'_> {
    fn report(&self, bytes_done: u64, bytes_total: u64, force: bool) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if !force && last.is_some_and(|last| now.duration_since(last) < PROGRESS_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        let message = AgentMessage::MigrationProgress {
            migration_id: self.migration_id,
            step_id: self.step_id,
            bytes_done,
            bytes_total,
        };
        self.migrations.push(message, false);
    }
}

/// One step being executed. Failures are the reason the server shows.
struct Step<'a> {
    context: &'a MigrationContext,
    migration_id: MigrationId,
    progress: &'a Progress<'a>,
    /// When the step must be over (retries stop before it).
    deadline: Instant,
}

impl Step<'_> {
    async fn execute(&self, step: MigrationStep) -> Result<Option<SnapshotManifest>, String> {
        match step {
            MigrationStep::Preflight { application } => self.preflight(&application).await.map(|()| None),
            MigrationStep::Quiesce { application_id, drain_seconds } => {
                self.quiesce(application_id, drain_seconds).await.map(|()| None)
            }
            MigrationStep::Snapshot { application_id } => self.snapshot(application_id).await.map(Some),
            MigrationStep::Ship { application_id, manifest } => {
                self.ship(application_id, &manifest).await.map(|()| None)
            }
            MigrationStep::Restore { application, manifest } => {
                self.restore(&application, manifest.as_ref()).await.map(|()| None)
            }
            MigrationStep::Drain { application_id, drain_seconds } => {
                // Closing the gate also ends the open HTTP connections gracefully (see
                // `proxy::serve_connection`): wait for them too, not only for requests.
                self.context.sleep.set_gate(application_id, Gate::Close);
                self.wait_in_flight(application_id, drain_seconds).await;
                self.wait_connections(application_id, drain_seconds).await;
                Ok(None)
            }
            MigrationStep::Resume { application_id } => {
                self.context.holds.lift(application_id).map_err(|error| format!("cannot lift the hold: {error}"))?;
                self.context.sleep.set_gate(application_id, Gate::Open);
                Ok(None)
            }
            MigrationStep::Release { application_id } => self.release(application_id).await.map(|()| None),
        }
    }

    fn snapshot_dir(&self) -> PathBuf {
        snapshot_dir(&self.context.state_dir, self.migration_id)
    }

    /// Whether this device can run the application: its kind's driver, the right to mount its
    /// volumes, and free disk for them.
    async fn preflight(&self, application: &Application) -> Result<(), String> {
        let launch = LaunchSpec::from_application(application);
        let kind = launch.kind();
        let Some(driver) = self.context.drivers.get(kind) else {
            return Err(format!("this device cannot run {kind} workloads"));
        };
        driver.preflight(&launch).await.map_err(|error| error.to_string())?;
        let storage = &application.spec.storage;
        if let Some(volume) = storage.first()
            && !nix::unistd::Uid::effective().is_root()
        {
            return Err(format!("volume {}: cannot mount it: the agent is not running as root", volume.name));
        }
        let needed: u64 = storage
            .iter()
            .filter(|volume| {
                !crate::volumes::image_path(self.context.volumes.root(), application.id, volume.name.as_str()).exists()
            })
            .map(|volume| volume.size_mib.saturating_mul(1024 * 1024))
            .sum();
        if needed > 0 {
            let free =
                free_bytes(self.context.volumes.root()).map_err(|error| format!("cannot tell free disk: {error}"))?;
            if free < needed {
                return Err(format!(
                    "not enough free disk for the volumes: {} MiB needed, {} MiB free",
                    needed / (1024 * 1024),
                    free / (1024 * 1024)
                ));
            }
        }
        Ok(())
    }

    async fn quiesce(&self, application_id: ApplicationId, drain_seconds: u32) -> Result<(), String> {
        self.context.sleep.set_gate(application_id, Gate::Refuse);
        self.wait_in_flight(application_id, drain_seconds).await;
        self.context.holds.hold(application_id).map_err(|error| format!("cannot persist the hold: {error}"))?;
        let mut report = self.context.report.clone();
        // The hold woke the reconciler, which stops the workload; the step's deadline bounds it.
        while report.borrow_and_update().workloads.contains_key(&application_id) {
            let _ = tokio::time::timeout(POLL, report.changed()).await;
        }
        Ok(())
    }

    /// Waits until nothing of the application is in flight, for at most `drain_seconds`.
    async fn wait_in_flight(&self, application_id: ApplicationId, drain_seconds: u32) {
        let until = Instant::now() + Duration::from_secs(u64::from(drain_seconds));
        while self.context.sleep.in_flight(application_id) > 0 && Instant::now() < until {
            tokio::time::sleep(POLL).await;
        }
        let left = self.context.sleep.in_flight(application_id);
        if left > 0 {
            tracing::info!(application = %application_id, left, "drain time is up; going on with requests in flight");
        }
    }

    /// Waits until the application has no open proxied connection, for at most
    /// `drain_seconds` (a WebSocket or raw TCP connection may stay open that long).
    async fn wait_connections(&self, application_id: ApplicationId, drain_seconds: u32) {
        let until = Instant::now() + Duration::from_secs(u64::from(drain_seconds));
        while self.context.sleep.open_connections(application_id) > 0 && Instant::now() < until {
            tokio::time::sleep(POLL).await;
        }
        let left = self.context.sleep.open_connections(application_id);
        if left > 0 {
            tracing::info!(application = %application_id, left, "drain time is up; going on with connections open");
        }
    }

    async fn snapshot(&self, application_id: ApplicationId) -> Result<SnapshotManifest, String> {
        if !self.context.holds.is_held(application_id) {
            return Err("the application is not quiesced on this device".to_owned());
        }
        if self.context.report.borrow().workloads.contains_key(&application_id) {
            return Err("the application's workload still runs".to_owned());
        }
        let application = self
            .context
            .desired
            .borrow()
            .applications
            .get(&application_id)
            .cloned()
            .ok_or("the application is not placed on this device")?;
        let volumes = &self.context.volumes;
        let movable: Vec<Name> =
            application.spec.storage.iter().filter(|volume| volume.movable).map(|volume| volume.name.clone()).collect();
        let mut sources = Vec::new();
        for name in &movable {
            // On a cloud host the image is mounted read-only, privately, for the snapshot; else
            // the workload's own mount (it is stopped) serves.
            let read_only = !volumes.mounts();
            let dir =
                volumes.mount_for_files(application_id, name.as_str(), read_only).await.map_err(|e| e.to_string())?;
            sources.push((name.clone(), dir));
        }
        let dir = self.snapshot_dir();
        write_application(&dir, application_id)?;
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&written);
        let archive_dir = dir.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            archive::write_snapshot(&archive_dir, &sources, &mut |bytes| {
                counter.store(bytes, std::sync::atomic::Ordering::Relaxed);
            })
        });
        let result = loop {
            tokio::select! {
                result = &mut task => break result,
                () = tokio::time::sleep(PROGRESS_INTERVAL) => {
                    // The total is unknown until the archive is written.
                    self.progress.report(written.load(std::sync::atomic::Ordering::Relaxed), 0, false);
                }
            }
        };
        for name in &movable {
            if let Err(error) = volumes.unmount_private(application_id, name.as_str()).await {
                tracing::warn!(%error, "cannot unmount a volume after its snapshot");
            }
        }
        let manifest =
            result.map_err(|error| format!("the snapshot task failed: {error}"))?.map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|error| error.to_string())?;
        std::fs::write(dir.join(MANIFEST_FILE), bytes)
            .map_err(|error| format!("cannot store the manifest: {error}"))?;
        self.progress.report(manifest.total_bytes, manifest.total_bytes, true);
        Ok(manifest)
    }

    async fn ship(&self, application_id: ApplicationId, manifest: &SnapshotManifest) -> Result<(), String> {
        let blobs = self.context.blobs.as_ref().ok_or("this agent has no server to ship to")?;
        archive::check_manifest(manifest).map_err(|error| error.to_string())?;
        let dir = self.snapshot_dir();
        if read_application(&dir) != Some(application_id) {
            return Err("no snapshot of the application for this migration on this device".to_owned());
        }
        let stored = self.retry("listing the stored chunks", || blobs.list(self.migration_id)).await?;
        let total = manifest.total_bytes;
        let missing: Vec<ChunkDigest> = manifest
            .chunks
            .iter()
            .filter(|chunk| !stored.iter().any(|stored| stored.index == chunk.index && stored.sha256 == chunk.sha256))
            .cloned()
            .collect();
        let mut done = total.saturating_sub(missing.iter().map(|chunk| chunk.bytes).sum::<u64>());
        // Several uploads at once: one request at a time leaves the link and the server idle
        // while each side hashes and stores a chunk.
        let mut uploads = futures::stream::iter(missing)
            .map(|chunk| self.upload_chunk(blobs, &dir, chunk))
            .buffer_unordered(TRANSFERS);
        while let Some(bytes) = uploads.next().await {
            done += bytes?;
            self.progress.report(done, total, false);
        }
        self.progress.report(done, total, true);
        Ok(())
    }

    /// Reads, checks and uploads one chunk; answers its size.
    async fn upload_chunk(&self, blobs: &BlobClient, dir: &Path, chunk: ChunkDigest) -> Result<u64, String> {
        let path = archive::chunk_path(dir, chunk.index);
        let bytes =
            tokio::fs::read(&path).await.map_err(|error| format!("cannot read chunk {}: {error}", chunk.index))?;
        archive::verify_bytes(&chunk, &bytes).map_err(|error| error.to_string())?;
        let bytes = bytes::Bytes::from(bytes);
        self.retry(&format!("uploading chunk {}", chunk.index), || blobs.put(self.migration_id, &chunk, bytes.clone()))
            .await?;
        Ok(chunk.bytes)
    }

    /// Makes chunk `chunk` of the snapshot be on disk in `dir`, checked: kept if already
    /// there (an earlier attempt), else downloaded. Answers its bytes.
    async fn download_chunk(&self, blobs: &BlobClient, dir: &Path, chunk: ChunkDigest) -> Result<Vec<u8>, String> {
        let check_dir = dir.to_owned();
        let check_chunk = chunk.clone();
        let present = tokio::task::spawn_blocking(move || archive::verify_chunk(&check_dir, &check_chunk).ok())
            .await
            .ok()
            .flatten();
        if let Some(bytes) = present {
            return Ok(bytes);
        }
        let bytes = self
            .retry(&format!("downloading chunk {}", chunk.index), || {
                blobs.get(self.migration_id, chunk.index, MAX_CHUNK_BYTES)
            })
            .await?;
        archive::verify_bytes(&chunk, &bytes).map_err(|error| error.to_string())?;
        let path = archive::chunk_path(dir, chunk.index);
        let partial = dir.join(format!(".chunk-{}.part", chunk.index));
        tokio::fs::write(&partial, &bytes)
            .await
            .map_err(|error| format!("cannot store chunk {}: {error}", chunk.index))?;
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(|error| format!("cannot store chunk {}: {error}", chunk.index))?;
        Ok(bytes)
    }

    async fn restore(&self, application: &Application, manifest: Option<&SnapshotManifest>) -> Result<(), String> {
        let volumes = &self.context.volumes;
        let storage = &application.spec.storage;
        let Some(manifest) = manifest else {
            volumes.provision(application.id, storage).await.map_err(|error| error.to_string())?;
            return self.arrive(application.id);
        };
        let blobs = self.context.blobs.as_ref().ok_or("this agent has no server to restore from")?;
        archive::check_manifest(manifest).map_err(|error| error.to_string())?;
        let dir = self.snapshot_dir();
        write_application(&dir, application.id)?;
        let total = manifest.total_bytes;
        let started = Instant::now();
        let mut done = 0u64;
        // Downloads run [`TRANSFERS`] at once but arrive in order, each checked on its own, so
        // the whole archive's digest grows meanwhile (on a blocking thread).
        let mut downloads = futures::stream::iter(manifest.chunks.clone())
            .map(|chunk| self.download_chunk(blobs, &dir, chunk))
            .buffered(TRANSFERS);
        let mut whole = archive::ArchiveDigest::default();
        while let Some(bytes) = downloads.next().await {
            let bytes = bytes?;
            done += bytes.len() as u64;
            whole = tokio::task::spawn_blocking(move || {
                whole.update(&bytes);
                whole
            })
            .await
            .map_err(|error| format!("the verification task failed: {error}"))?;
            self.progress.report(done, total, false);
        }
        drop(downloads);
        whole.check(manifest).map_err(|error| error.to_string())?;
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "restore: archive verified");
        // Everything verified: only now are the volumes replaced.
        let mut targets = BTreeMap::new();
        for volume in storage {
            let name = volume.name.as_str();
            volumes.recreate(application.id, name, volume.size_mib).await.map_err(|error| error.to_string())?;
            let files =
                volumes.mount_for_files(application.id, name, false).await.map_err(|error| error.to_string())?;
            targets.insert(name.to_owned(), files);
        }
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "restore: fresh volumes mounted");
        let unpack_manifest = manifest.clone();
        let unpacked =
            tokio::task::spawn_blocking(move || archive::unpack_snapshot(&dir, &unpack_manifest, &targets)).await;
        for volume in storage {
            if let Err(error) = volumes.unmount_private(application.id, volume.name.as_str()).await {
                tracing::warn!(%error, "cannot unmount a restored volume");
            }
        }
        unpacked.map_err(|error| format!("the restore task failed: {error}"))?.map_err(|error| error.to_string())?;
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "restore: archive unpacked");
        self.arrive(application.id)?;
        self.progress.report(total, total, true);
        Ok(())
    }

    /// The application comes (back) to this device: a hold or gate that an earlier migration
    /// away from it left (before its `release`) must not keep it stopped or refused.
    fn arrive(&self, application_id: ApplicationId) -> Result<(), String> {
        self.context.holds.lift(application_id).map_err(|error| format!("cannot lift the hold: {error}"))?;
        self.context.sleep.set_gate(application_id, Gate::Open);
        Ok(())
    }

    async fn release(&self, application_id: ApplicationId) -> Result<(), String> {
        if self.context.desired.borrow().applications.contains_key(&application_id) {
            return Err("the application is still placed on this device".to_owned());
        }
        self.context.holds.lift(application_id).map_err(|error| format!("cannot lift the hold: {error}"))?;
        self.context.sleep.set_gate(application_id, Gate::Open);
        self.context.volumes.release(application_id).await.map_err(|error| error.to_string())?;
        remove_snapshots(&self.context.state_dir, application_id)
            .map_err(|error| format!("cannot remove snapshots: {error}"))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline is near; connection
    /// errors and 5xx answers are retried with doubling delays.
    async fn retry<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, blobs::BlobError>>,
    {
        let mut delay = RETRY_FIRST;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) if error.is_retryable() && Instant::now() + delay < self.deadline => {
                    tracing::info!(%error, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(error) => return Err(format!("{what}: {error}")),
            }
        }
    }
}

/// Where a migration's chunks live on this device.
pub fn snapshot_dir(state_dir: &StateDir, migration_id: MigrationId) -> PathBuf {
    state_dir.root().join(MIGRATIONS_DIR).join(migration_id.to_string())
}

fn write_application(dir: &std::path::Path, application_id: ApplicationId) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    std::fs::write(dir.join(APPLICATION_FILE), application_id.to_string())
        .map_err(|error| format!("cannot write into {}: {error}", dir.display()))
}

fn read_application(dir: &std::path::Path) -> Option<ApplicationId> {
    std::fs::read_to_string(dir.join(APPLICATION_FILE)).ok()?.trim().parse().ok()
}

/// Removes every snapshot directory of the application.
fn remove_snapshots(state_dir: &StateDir, application_id: ApplicationId) -> std::io::Result<()> {
    let root = state_dir.root().join(MIGRATIONS_DIR);
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && read_application(&path) == Some(application_id) {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// Free bytes for an unprivileged writer on the filesystem of `path` (or of its nearest
/// existing parent).
// The field types are `u64` on 64-bit Linux but narrower on some 32-bit targets.
#[allow(clippy::useless_conversion)]
fn free_bytes(path: &std::path::Path) -> Result<u64, nix::Error> {
    let existing = path.ancestors().find(|ancestor| ancestor.exists()).unwrap_or(std::path::Path::new("/"));
    let stats = nix::sys::statvfs::statvfs(existing)?;
    Ok(u64::from(stats.blocks_available()).saturating_mul(u64::from(stats.fragment_size())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Driver, ProcessDriver, ProcessDriverConfig, Wake, WorkloadHandle};
    use crate::reconcile::plan::tests::application;
    use crate::sleep::InFlight;

    struct Fixture {
        _temp: tempfile::TempDir,
        migrations: Arc<Migrations>,
        holds: Arc<Holds>,
        sleep: Arc<SleepTable>,
        desired: watch::Sender<Arc<DesiredState>>,
        report: watch::Sender<AgentReport>,
    }

    fn fixture() -> Fixture {
        let temp = tempfile::tempdir().expect("temp");
        let state_dir = StateDir::open(temp.path()).expect("state dir");
        let holds = Arc::new(Holds::open(state_dir.clone()).expect("holds"));
        let sleep = SleepTable::new(Wake::new());
        let (desired, desired_rx) = watch::channel(Arc::new(DesiredState::default()));
        let (report, report_rx) = watch::channel(AgentReport::default());
        let process = ProcessDriver::new(ProcessDriverConfig::new(temp.path().join("logs")));
        let drivers = Drivers::new([Arc::new(process) as Arc<dyn Driver>]);
        let migrations = Migrations::new(MigrationContext {
            volumes: Volumes::new(temp.path().join("volumes"), true),
            state_dir,
            holds: Arc::clone(&holds),
            sleep: Arc::clone(&sleep),
            desired: desired_rx,
            report: report_rx,
            drivers,
            blobs: None,
        })
        .expect("migrations");
        Fixture { _temp: temp, migrations, holds, sleep, desired, report }
    }

    fn place(fixture: &Fixture, application: &Application) {
        let mut state = DesiredState::default();
        state.applications.insert(application.id, application.clone());
        fixture.sleep.set_applications(state.applications.values());
        fixture.desired.send_replace(Arc::new(state));
    }

    fn deadline() -> DateTime<Utc> {
        Utc::now() + chrono::Duration::seconds(10)
    }

    /// The next step result, waiting at most a few seconds.
    async fn result(migrations: &Migrations) -> (u64, StepOutcome) {
        for _ in 0..500 {
            for message in migrations.take_outgoing() {
                if let AgentMessage::MigrationStepResult { step_id, outcome, .. } = message {
                    return (step_id, outcome);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no step result");
    }

    #[tokio::test]
    async fn a_repeated_step_is_answered_again_without_running_twice() {
        let fixture = fixture();
        let web = application("web", 1, "sleep 100");
        let migration = MigrationId::new();
        fixture.holds.hold(web.id).expect("held");
        fixture.migrations.submit(migration, 7, deadline(), MigrationStep::Resume { application_id: web.id });
        assert_eq!(result(&fixture.migrations).await, (7, StepOutcome::Done { manifest: None }));
        assert!(!fixture.holds.is_held(web.id), "resumed");

        // Held again by someone else: a repeat of step 7 must not lift it a second time.
        fixture.holds.hold(web.id).expect("held");
        fixture.migrations.submit(migration, 7, deadline(), MigrationStep::Resume { application_id: web.id });
        assert_eq!(result(&fixture.migrations).await, (7, StepOutcome::Done { manifest: None }));
        assert!(fixture.holds.is_held(web.id), "the repeat was answered, not run");
    }

    #[tokio::test]
    async fn release_is_refused_while_desired_and_snapshot_needs_a_quiesced_application() {
        let fixture = fixture();
        let web = application("web", 1, "sleep 100");
        place(&fixture, &web);
        let migration = MigrationId::new();
        fixture.migrations.submit(migration, 1, deadline(), MigrationStep::Release { application_id: web.id });
        let (_, outcome) = result(&fixture.migrations).await;
        assert!(matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("still placed")), "{outcome:?}");
        fixture.migrations.submit(migration, 2, deadline(), MigrationStep::Snapshot { application_id: web.id });
        let (_, outcome) = result(&fixture.migrations).await;
        assert!(matches!(&outcome, StepOutcome::Failed { reason } if reason.contains("not quiesced")), "{outcome:?}");
        let container: Application = serde_json::from_value(serde_json::json!({
            "id": ApplicationId::new(),
            "organization_id": "00000000-0000-7000-8000-000000000001",
            "revision": 1,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
            "spec": {"name": "box", "hostnames": ["box.example.test"], "port": 80,
                     "workload": {"container": {"image": "busybox"}}},
        }))
        .expect("an application");
        let preflight = MigrationStep::Preflight { application: Box::new(container) };
        fixture.migrations.submit(migration, 3, deadline(), preflight);
        let (_, outcome) = result(&fixture.migrations).await;
        assert_eq!(outcome, StepOutcome::Failed { reason: "this device cannot run container workloads".to_owned() });
    }

    #[tokio::test]
    async fn quiesce_refuses_requests_waits_for_those_in_flight_and_holds_the_workload() {
        let fixture = fixture();
        let web = application("web", 1, "sleep 100");
        place(&fixture, &web);
        let handle = WorkloadHandle::Process { pid: 1, start_time: 1 };
        fixture.report.send_modify(|report| {
            report.workloads.insert(web.id, handle);
        });
        let (_, counters) = fixture.sleep.lookup("web.example.test").expect("known");
        let request = InFlight::new(counters);
        let migration = MigrationId::new();
        let quiesce = MigrationStep::Quiesce { application_id: web.id, drain_seconds: 30 };
        fixture.migrations.submit(migration, 1, deadline(), quiesce.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fixture.sleep.gate(web.id), Gate::Refuse, "new requests are refused at once");
        assert!(!fixture.holds.is_held(web.id), "the request in flight is waited for");
        fixture.migrations.submit(migration, 1, deadline(), quiesce);
        assert!(fixture.migrations.take_outgoing().is_empty(), "a repeat of a running step is ignored");
        drop(request);
        for _ in 0..200 {
            if fixture.holds.is_held(web.id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(fixture.holds.is_held(web.id), "held once nothing is in flight");
        assert!(fixture.migrations.take_outgoing().is_empty(), "done only once the workload stopped");
        fixture.report.send_modify(|report| {
            report.workloads.clear();
        });
        assert_eq!(result(&fixture.migrations).await, (1, StepOutcome::Done { manifest: None }));
    }
}
