//! Migrations (issue 10, DESIGN.md section 9): moving a placed application to another device
//! with its volumes, as a persisted state machine that agents execute step by step.
//!
//! This module is the pure part: [`start`] and [`advance`] take a [`MigrationState`] and an
//! [`Input`] (a step's result, progress, a status report of the target, the clock, a device
//! coming online) and answer the next state and the [`Action`]s to apply. They do no IO, so
//! every path, each rollback included, is unit tested below. [`driver`] loads and saves the
//! state through `crate::db` (one write per transition, together with the placement and
//! desired-state changes the actions ask for) and sends the steps through the agent hub.
//!
//! The line of a migration: `preflight` (target) → `quiesce` → `snapshot` → `ship` (source;
//! stateful applications only) → `restore` (target; then the target's desired state gains the
//! application and the migration waits for the target to report it `running`) → `cutover`
//! (the placement's host becomes the target, so edges route there; a stateless source first
//! drains) → `completed`. Any failure or timeout before cutover rolls back: the target loses
//! the application and is told to `release` it, the source is told to `resume`, the placement
//! shows its old spec again. Steps owed after the line ended (`resume`, the two `release`s) are
//! [`Obligation`]s, sent whenever their device is online until it answers.

pub mod driver;

use chrono::{DateTime, TimeDelta, Utc};
use edgible::model::{
    Application, ApplicationId, ApplicationPhase, DeviceId, Migration, MigrationId, MigrationPhase,
    MigrationPhaseRecord, OrganizationId, PlacementId, PlacementSpec, Revision,
};
use edgible::protocol::v1::{MAX_CHUNK_BYTES, MigrationStep, SnapshotManifest, StepOutcome};
use serde::{Deserialize, Serialize};

/// How long things may take; from the server's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The deadline of every step, and how long the target may take to report the restored
    /// application running.
    pub step_timeout: TimeDelta,
    /// How long the source waits for requests in flight (`quiesce`, `drain`).
    pub drain_seconds: u32,
    /// How long after completion the source keeps its copy before it is told to release it.
    pub retention: TimeDelta,
}

/// A step sent to a device and not answered yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentStep {
    pub device: DeviceId,
    pub step_id: u64,
    pub deadline: DateTime<Utc>,
    pub step: MigrationStep,
}

/// What an [`Obligation`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Duty {
    /// The source serves the application again after a failure.
    Resume,
    /// The target deletes what a failed migration left there.
    ReleaseTarget,
    /// The source deletes its copy once the retention period after completion passed.
    ReleaseSource,
}

/// A step owed to a device after the migration's line ended, sent (again) whenever the
/// device is online from `due_at` on, until the device answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Obligation {
    pub duty: Duty,
    pub device: DeviceId,
    pub step_id: u64,
    pub due_at: DateTime<Utc>,
    pub step: MigrationStep,
    /// Whether it went out since the server started or the device last came online.
    #[serde(default)]
    pub sent: bool,
}

/// The restore finished: the target runs the application and must report it running, at
/// `revision` of the application or later, by `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthWait {
    pub until: DateTime<Utc>,
    pub revision: Revision,
}

/// Everything the server keeps about one migration, enough to go on after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationState {
    pub id: MigrationId,
    pub organization_id: OrganizationId,
    pub application_id: ApplicationId,
    pub placement_id: PlacementId,
    pub source: DeviceId,
    pub target: DeviceId,
    /// The placement before the migration, shown again after a failure.
    pub from: PlacementSpec,
    pub to: PlacementSpec,
    pub stateful: bool,
    pub phase: MigrationPhase,
    pub phases: Vec<MigrationPhaseRecord>,
    pub failure: Option<String>,
    pub failed_phase: Option<MigrationPhase>,
    pub rolled_back: bool,
    pub bytes_total: u64,
    pub bytes_shipped: u64,
    pub downtime_ms: Option<u64>,
    pub manifest: Option<SnapshotManifest>,
    /// When the source was told to stop serving (the start of the downtime).
    pub quiesced_at: Option<DateTime<Utc>>,
    /// The step of the migration's line that is running.
    pub current: Option<SentStep>,
    pub health_wait: Option<HealthWait>,
    /// The target's desired state has the application while its placement's host is still
    /// the source (from the end of the restore to cutover).
    pub target_runs: bool,
    /// The source's desired state keeps the application although its placement's host is the
    /// target (a stateless source draining after cutover).
    pub source_runs: bool,
    pub obligations: Vec<Obligation>,
    pub next_step_id: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What one transition asks the driver to do, in this order: the database changes in one
/// write with the new state, then sending and events after commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a step to a device (queued while it is offline).
    Send { device: DeviceId, step_id: u64, deadline: DateTime<Utc>, step: MigrationStep },
    /// These devices' desired state changed ([`MigrationState::extra_device`] did).
    DesiredChanged(Vec<DeviceId>),
    /// Cutover: the placement takes the requested spec with the target as its host, so the
    /// edges route there.
    MoveRoute,
    /// After a failure: the placement shows its old spec again and no migration.
    RevertPlacement,
    /// After completion: the placement shows no migration.
    EndPlacementMigration,
    /// An event on the application, recorded as `device`'s.
    Event { device: DeviceId, message: String },
    /// Delete the snapshot's chunks from the blob store.
    DeleteBlobs,
}

/// What happened, for [`advance`].
#[derive(Debug, Clone, PartialEq)]
pub enum Input<'a> {
    StepResult {
        device: DeviceId,
        step_id: u64,
        outcome: &'a StepOutcome,
    },
    Progress {
        device: DeviceId,
        step_id: u64,
        bytes_done: u64,
    },
    /// The device reported the application in `phase`, describing `revision` of it.
    Status {
        device: DeviceId,
        phase: ApplicationPhase,
        revision: Revision,
        message: Option<&'a str>,
    },
    /// Time passed: deadlines and due obligations.
    Tick,
    /// The device connected (again): it gets its current step and due obligations again.
    Online {
        device: DeviceId,
    },
}

/// What a transition knows besides the state.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub now: DateTime<Utc>,
    pub timing: Timing,
    /// The application as it is now (what `preflight` and `restore` carry).
    pub application: &'a Application,
}

/// A migration the database checked and is about to store.
#[derive(Debug, Clone)]
pub struct NewMigration {
    pub id: MigrationId,
    pub placement_id: PlacementId,
    pub source: DeviceId,
    pub target: DeviceId,
    pub from: PlacementSpec,
    pub to: PlacementSpec,
}

/// Checks a manifest a source answered `snapshot` with: chunks numbered from 0 in order,
/// none empty or above [`MAX_CHUNK_BYTES`], sizes adding up, digests as lowercase hex SHA-256.
pub fn check_manifest(manifest: &SnapshotManifest) -> Result<(), String> {
    let hex64 = |text: &str| text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex64(&manifest.sha256) {
        return Err("manifest.sha256 is not a lowercase hex SHA-256".into());
    }
    let mut sum: u64 = 0;
    for (position, chunk) in manifest.chunks.iter().enumerate() {
        if usize::try_from(chunk.index).ok() != Some(position) {
            return Err(format!("manifest.chunks[{position}].index is {}, expected {position}", chunk.index));
        }
        if chunk.bytes == 0 || chunk.bytes > MAX_CHUNK_BYTES {
            return Err(format!("manifest.chunks[{position}].bytes is {}, not 1 to {MAX_CHUNK_BYTES}", chunk.bytes));
        }
        if !hex64(&chunk.sha256) {
            return Err(format!("manifest.chunks[{position}].sha256 is not a lowercase hex SHA-256"));
        }
        sum = sum.saturating_add(chunk.bytes);
    }
    if sum != manifest.total_bytes {
        return Err(format!("manifest.total_bytes is {}, but the chunks add up to {sum}", manifest.total_bytes));
    }
    Ok(())
}

impl MigrationState {
    /// The device that runs the application besides its placement's host, if any.
    pub fn extra_device(&self) -> Option<DeviceId> {
        if self.target_runs {
            Some(self.target)
        } else if self.source_runs {
            Some(self.source)
        } else {
            None
        }
    }

    /// Whether the clock alone would change something at `now`: a deadline passed, or an
    /// obligation is due and not sent yet. The driver skips the others when it ticks.
    pub fn due(&self, now: DateTime<Utc>) -> bool {
        self.current.as_ref().is_some_and(|current| current.deadline <= now)
            || self.health_wait.is_some_and(|wait| wait.until <= now)
            || self.obligations.iter().any(|obligation| !obligation.sent && obligation.due_at <= now)
    }

    /// Whether the migration still has something to do: its line, or an obligation.
    pub fn is_open(&self) -> bool {
        !self.phase.is_final() || !self.obligations.is_empty()
    }

    /// Drops a `release` still owed to `device`, which the application is moving (back) to:
    /// it must keep what the new migration restores there. Answers whether one was dropped.
    pub fn cancel_release(&mut self, device: DeviceId) -> bool {
        let before = self.obligations.len();
        self.obligations.retain(|obligation| {
            !(obligation.device == device && matches!(obligation.duty, Duty::ReleaseSource | Duty::ReleaseTarget))
        });
        self.obligations.len() != before
    }

    /// The API's view.
    pub fn to_model(&self) -> Migration {
        Migration {
            id: self.id,
            organization_id: self.organization_id,
            application_id: self.application_id,
            placement_id: self.placement_id,
            source: self.source,
            target: self.target,
            to: self.to.clone(),
            stateful: self.stateful,
            phase: self.phase,
            phases: self.phases.clone(),
            failure: self.failure.clone(),
            failed_phase: self.failed_phase,
            rolled_back: self.rolled_back,
            bytes_total: self.bytes_total,
            bytes_shipped: self.bytes_shipped,
            downtime_ms: self.downtime_ms,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// The first state of a checked migration: `preflight` sent to the target.
pub fn start(new: NewMigration, context: &Context<'_>) -> (MigrationState, Vec<Action>) {
    let application = context.application;
    let mut machine = Machine {
        state: MigrationState {
            id: new.id,
            organization_id: application.organization_id,
            application_id: application.id,
            placement_id: new.placement_id,
            source: new.source,
            target: new.target,
            from: new.from,
            to: new.to,
            stateful: !application.spec.storage.is_empty(),
            phase: MigrationPhase::Preflight,
            phases: vec![MigrationPhaseRecord {
                phase: MigrationPhase::Preflight,
                started_at: context.now,
                finished_at: None,
            }],
            failure: None,
            failed_phase: None,
            rolled_back: false,
            bytes_total: 0,
            bytes_shipped: 0,
            downtime_ms: None,
            manifest: None,
            quiesced_at: None,
            current: None,
            health_wait: None,
            target_runs: false,
            source_runs: false,
            obligations: Vec::new(),
            next_step_id: 1,
            created_at: context.now,
            updated_at: context.now,
        },
        actions: Vec::new(),
        context,
    };
    let kind = if machine.state.stateful { "stateful" } else { "stateless" };
    machine.event_on(
        new.source,
        format!("started ({kind}): from device {} to device {}; preflight", new.source, new.target),
    );
    let step = MigrationStep::Preflight { application: Box::new(application.clone()) };
    machine.send(new.target, step);
    (machine.state, machine.actions)
}

/// The next state after `input`, and what to do about it. Inputs that do not concern the
/// migration (another device, an old step, a finished line) change nothing.
pub fn advance(state: MigrationState, input: Input<'_>, context: &Context<'_>) -> (MigrationState, Vec<Action>) {
    let mut machine = Machine { state, actions: Vec::new(), context };
    machine.on(input);
    if !machine.actions.is_empty() {
        machine.state.updated_at = context.now;
    }
    (machine.state, machine.actions)
}

struct Machine<'a> {
    state: MigrationState,
    actions: Vec<Action>,
    context: &'a Context<'a>,
}

impl Machine<'_> {
    fn now(&self) -> DateTime<Utc> {
        self.context.now
    }

    fn timeout_seconds(&self) -> i64 {
        self.context.timing.step_timeout.num_seconds()
    }

    fn event_on(&mut self, device: DeviceId, text: String) {
        let message = format!("migration {}: {text}", self.state.id);
        self.actions.push(Action::Event { device, message });
    }

    fn event(&mut self, text: String) {
        let device = self.state.target;
        self.event_on(device, text);
    }

    fn application_id(&self) -> ApplicationId {
        self.state.application_id
    }

    fn next_step_id(&mut self) -> u64 {
        let step_id = self.state.next_step_id;
        self.state.next_step_id += 1;
        step_id
    }

    /// Sends the next step of the line.
    fn send(&mut self, device: DeviceId, step: MigrationStep) {
        let step_id = self.next_step_id();
        let deadline = self.now() + self.context.timing.step_timeout;
        self.state.current = Some(SentStep { device, step_id, deadline, step: step.clone() });
        self.actions.push(Action::Send { device, step_id, deadline, step });
    }

    fn oblige(&mut self, duty: Duty, device: DeviceId, due_at: DateTime<Utc>, step: MigrationStep) {
        let step_id = self.next_step_id();
        self.state.obligations.push(Obligation { duty, device, step_id, due_at, step, sent: false });
    }

    /// Sends the due obligations (of `device` only, if given) that have not gone out yet, or
    /// all due ones of `device` when it came online.
    fn send_obligations(&mut self, device: Option<DeviceId>, again: bool) {
        let now = self.now();
        let deadline = now + self.context.timing.step_timeout;
        let mut sends = Vec::new();
        for obligation in &mut self.state.obligations {
            let mine = device.is_none_or(|device| device == obligation.device);
            if mine && obligation.due_at <= now && (again || !obligation.sent) {
                obligation.sent = true;
                sends.push(Action::Send {
                    device: obligation.device,
                    step_id: obligation.step_id,
                    deadline,
                    step: obligation.step.clone(),
                });
            }
        }
        self.actions.extend(sends);
    }

    fn enter(&mut self, phase: MigrationPhase) {
        let now = self.now();
        if let Some(last) = self.state.phases.last_mut()
            && last.finished_at.is_none()
        {
            last.finished_at = Some(now);
        }
        self.state.phases.push(MigrationPhaseRecord { phase, started_at: now, finished_at: None });
        self.state.phase = phase;
    }

    fn on(&mut self, input: Input<'_>) {
        match input {
            Input::Tick => self.on_tick(),
            Input::Online { device } => {
                if let Some(current) = self.state.current.clone()
                    && current.device == device
                {
                    self.actions.push(Action::Send {
                        device,
                        step_id: current.step_id,
                        deadline: current.deadline,
                        step: current.step,
                    });
                }
                self.send_obligations(Some(device), true);
            }
            Input::StepResult { device, step_id, outcome } => self.on_result(device, step_id, outcome),
            Input::Progress { device, step_id, bytes_done } => {
                if let Some(current) = &self.state.current
                    && (current.device, current.step_id) == (device, step_id)
                    && matches!(current.step, MigrationStep::Ship { .. })
                {
                    let shipped = bytes_done.min(self.state.bytes_total);
                    if shipped != self.state.bytes_shipped {
                        self.state.bytes_shipped = shipped;
                        self.state.updated_at = self.now();
                    }
                }
            }
            Input::Status { device, phase, revision, message } => {
                let Some(wait) = self.state.health_wait else { return };
                if device != self.state.target || self.state.phase != MigrationPhase::Restore {
                    return;
                }
                match phase {
                    // A `sleep` application that started and went idle is as good as running.
                    ApplicationPhase::Running | ApplicationPhase::Sleeping if revision >= wait.revision => {
                        self.cutover();
                    }
                    ApplicationPhase::Failed => {
                        let why = message.map_or_else(String::new, |message| format!(": {message}"));
                        self.fail(format!("the application failed on the target{why}"));
                    }
                    _ => {}
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = self.now();
        if let Some(current) = self.state.current.clone()
            && now >= current.deadline
        {
            let name = current.step.name();
            if self.state.phase == MigrationPhase::Cutover {
                self.state.current = None;
                self.event(format!(
                    "the source did not finish draining within {} s; the application leaves it anyway",
                    self.timeout_seconds()
                ));
                self.finish_drain();
            } else {
                self.state.current = None;
                self.fail(format!(
                    "{name} on device {} did not finish within {} s",
                    current.device,
                    self.timeout_seconds()
                ));
            }
        }
        if let Some(wait) = self.state.health_wait
            && now >= wait.until
        {
            self.fail(format!(
                "the application did not report running on the target within {} s",
                self.timeout_seconds()
            ));
        }
        self.send_obligations(None, false);
    }

    fn on_result(&mut self, device: DeviceId, step_id: u64, outcome: &StepOutcome) {
        if let Some(position) = self.state.obligations.iter().position(|o| (o.device, o.step_id) == (device, step_id)) {
            let obligation = self.state.obligations.remove(position);
            let text = match (obligation.duty, outcome) {
                (Duty::Resume, StepOutcome::Done { .. }) => {
                    self.state.rolled_back = true;
                    "the source serves the application again".to_owned()
                }
                (Duty::ReleaseTarget, StepOutcome::Done { .. }) => "the target deleted its copy".to_owned(),
                (Duty::ReleaseSource, StepOutcome::Done { .. }) => "the source deleted its copy".to_owned(),
                (duty, StepOutcome::Failed { reason }) => format!(
                    "{} failed on device {device}: {reason}",
                    match duty {
                        Duty::Resume => "resume",
                        Duty::ReleaseTarget | Duty::ReleaseSource => "release",
                    }
                ),
            };
            self.event_on(device, text);
            self.state.updated_at = self.now();
            return;
        }
        let Some(current) = self.state.current.clone() else { return };
        if (current.device, current.step_id) != (device, step_id) {
            return;
        }
        self.state.current = None;
        match outcome {
            StepOutcome::Failed { reason } => {
                if self.state.phase == MigrationPhase::Cutover {
                    self.event(format!("the source failed to drain ({reason}); the application leaves it anyway"));
                    self.finish_drain();
                } else {
                    self.fail(format!("{} on device {device}: {reason}", current.step.name()));
                }
            }
            StepOutcome::Done { manifest } => self.on_done(manifest.as_ref()),
        }
    }

    fn on_done(&mut self, manifest: Option<&SnapshotManifest>) {
        let application = self.context.application;
        let (source, target) = (self.state.source, self.state.target);
        match self.state.phase {
            MigrationPhase::Preflight => {
                if self.state.stateful {
                    self.event("preflight passed; quiesce".into());
                    self.enter(MigrationPhase::Quiesce);
                    self.state.quiesced_at = Some(self.now());
                    let drain_seconds = self.context.timing.drain_seconds;
                    self.send(source, MigrationStep::Quiesce { application_id: self.application_id(), drain_seconds });
                } else {
                    self.event("preflight passed; restore (stateless: nothing to ship)".into());
                    self.enter(MigrationPhase::Restore);
                    self.send(
                        target,
                        MigrationStep::Restore { application: Box::new(application.clone()), manifest: None },
                    );
                }
            }
            MigrationPhase::Quiesce => {
                self.event_on(source, "quiesce done; snapshot".into());
                self.enter(MigrationPhase::Snapshot);
                self.send(source, MigrationStep::Snapshot { application_id: self.application_id() });
            }
            MigrationPhase::Snapshot => {
                let Some(manifest) = manifest else {
                    return self.fail("snapshot answered without a manifest".into());
                };
                if let Err(error) = check_manifest(manifest) {
                    return self.fail(format!("snapshot answered a bad manifest: {error}"));
                }
                self.state.manifest = Some(manifest.clone());
                self.state.bytes_total = manifest.total_bytes;
                self.event_on(
                    source,
                    format!("snapshot made: {} bytes in {} chunks; ship", manifest.total_bytes, manifest.chunks.len()),
                );
                self.enter(MigrationPhase::Ship);
                let manifest = manifest.clone();
                self.send(source, MigrationStep::Ship { application_id: self.application_id(), manifest });
            }
            MigrationPhase::Ship => {
                self.state.bytes_shipped = self.state.bytes_total;
                self.event_on(source, format!("shipped {} bytes; restore", self.state.bytes_total));
                self.enter(MigrationPhase::Restore);
                let manifest = self.state.manifest.clone();
                self.send(target, MigrationStep::Restore { application: Box::new(application.clone()), manifest });
            }
            MigrationPhase::Restore => {
                if self.state.health_wait.is_some() {
                    return;
                }
                self.event("restore done; the target starts the application".into());
                self.state.target_runs = true;
                self.state.health_wait = Some(HealthWait {
                    until: self.now() + self.context.timing.step_timeout,
                    revision: application.revision,
                });
                self.actions.push(Action::DesiredChanged(vec![target]));
            }
            MigrationPhase::Cutover => {
                self.event_on(source, "the source drained".into());
                self.finish_drain();
            }
            MigrationPhase::Completed | MigrationPhase::Failed => {}
        }
    }

    /// The target runs the application healthy: the edges route to it.
    fn cutover(&mut self) {
        self.state.health_wait = None;
        self.state.target_runs = false;
        self.enter(MigrationPhase::Cutover);
        self.actions.push(Action::MoveRoute);
        self.event("the application runs on the target; cutover: the edges route to it".into());
        if self.state.stateful {
            self.complete();
        } else {
            // The placement's host is the target now; the source keeps the application until
            // its requests in flight are done.
            self.state.source_runs = true;
            let drain_seconds = self.context.timing.drain_seconds;
            let step = MigrationStep::Drain { application_id: self.application_id(), drain_seconds };
            self.send(self.state.source, step);
        }
    }

    fn finish_drain(&mut self) {
        self.state.source_runs = false;
        self.actions.push(Action::DesiredChanged(vec![self.state.source]));
        self.complete();
    }

    fn complete(&mut self) {
        let now = self.now();
        if self.state.stateful
            && let Some(quiesced_at) = self.state.quiesced_at
        {
            self.state.downtime_ms = Some(u64::try_from((now - quiesced_at).num_milliseconds()).unwrap_or(0));
        }
        self.enter(MigrationPhase::Completed);
        self.actions.push(Action::EndPlacementMigration);
        self.actions.push(Action::DeleteBlobs);
        let release = MigrationStep::Release { application_id: self.application_id() };
        self.oblige(Duty::ReleaseSource, self.state.source, now + self.context.timing.retention, release);
        let downtime = self.state.downtime_ms.map_or_else(String::new, |ms| format!(" (downtime {ms} ms)"));
        self.event(format!("completed{downtime}"));
        self.send_obligations(None, false);
    }

    /// Rolls back from the phase it is in: the target loses the application and releases
    /// what it has, the source resumes, the placement shows where the application stayed.
    fn fail(&mut self, reason: String) {
        let phase = self.state.phase;
        if phase.is_final() || phase == MigrationPhase::Cutover {
            return;
        }
        self.state.current = None;
        self.state.health_wait = None;
        self.enter(MigrationPhase::Failed);
        let failure = format!("failed in {}: {reason}", phase.as_str());
        self.state.failure = Some(failure.clone());
        self.state.failed_phase = Some(phase);
        if self.state.target_runs {
            self.state.target_runs = false;
            self.actions.push(Action::DesiredChanged(vec![self.state.target]));
        }
        self.actions.push(Action::RevertPlacement);
        self.actions.push(Action::DeleteBlobs);
        self.event(format!("{failure}; rolling back: the application stays on device {}", self.state.source));
        let now = self.now();
        let application_id = self.application_id();
        self.oblige(Duty::ReleaseTarget, self.state.target, now, MigrationStep::Release { application_id });
        self.oblige(Duty::Resume, self.state.source, now, MigrationStep::Resume { application_id });
        self.send_obligations(None, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgible::protocol::v1::ChunkDigest;

    const HEX: &str = "ab";

    fn application(stateful: bool) -> Application {
        let mut spec = serde_json::json!({
            "name": "web", "hostnames": ["web.example.test"],
            "workload": {"process": {"command": "/bin/web"}}, "port": 8080
        });
        if stateful {
            spec["storage"] =
                serde_json::json!([{"name": "data", "size_mib": 64, "mount_path": "/data", "movable": true}]);
        }
        Application {
            id: ApplicationId::new(),
            organization_id: OrganizationId::new(),
            revision: 7,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            spec: edgible::model::parse_json(spec.to_string().as_bytes()).expect("a valid application"),
        }
    }

    fn timing() -> Timing {
        Timing { step_timeout: TimeDelta::seconds(30), drain_seconds: 5, retention: TimeDelta::seconds(600) }
    }

    fn manifest() -> SnapshotManifest {
        SnapshotManifest {
            volumes: vec!["data".parse().expect("name")],
            total_bytes: 30,
            sha256: HEX.repeat(32),
            chunks: vec![
                ChunkDigest { index: 0, bytes: 20, sha256: HEX.repeat(32) },
                ChunkDigest { index: 1, bytes: 10, sha256: "cd".repeat(32) },
            ],
        }
    }

    /// A migration under test: its state, the application, and a clock.
    struct Run {
        state: MigrationState,
        application: Application,
        now: DateTime<Utc>,
    }

    impl Run {
        fn new(stateful: bool) -> (Run, Vec<Action>) {
            let application = application(stateful);
            let now = Utc::now();
            let (source, target) = (DeviceId::new(), DeviceId::new());
            let new = NewMigration {
                id: MigrationId::new(),
                placement_id: PlacementId::new(),
                source,
                target,
                from: PlacementSpec::ServingDevice { application_id: application.id, device_id: source },
                to: PlacementSpec::ServingDevice { application_id: application.id, device_id: target },
            };
            let context = Context { now, timing: timing(), application: &application };
            let (state, actions) = start(new, &context);
            (Run { state, application, now }, actions)
        }

        fn feed(&mut self, input: Input<'_>) -> Vec<Action> {
            let context = Context { now: self.now, timing: timing(), application: &self.application };
            let (state, actions) = advance(self.state.clone(), input, &context);
            self.state = state;
            actions
        }

        fn current(&self) -> SentStep {
            self.state.current.clone().expect("a step is running")
        }

        fn answer(&mut self, outcome: StepOutcome) -> Vec<Action> {
            let current = self.current();
            self.feed(Input::StepResult { device: current.device, step_id: current.step_id, outcome: &outcome })
        }

        fn done(&mut self) -> Vec<Action> {
            let manifest = matches!(self.current().step, MigrationStep::Snapshot { .. }).then(manifest);
            self.answer(StepOutcome::Done { manifest })
        }

        fn running(&mut self) -> Vec<Action> {
            let target = self.state.target;
            let revision = self.application.revision;
            self.feed(Input::Status { device: target, phase: ApplicationPhase::Running, revision, message: None })
        }

        /// Drives the line until `phase` is entered.
        fn until(&mut self, phase: MigrationPhase) {
            for _ in 0..10 {
                if self.state.phase == phase {
                    return;
                }
                if self.state.current.is_some() {
                    self.done();
                } else {
                    self.running();
                }
            }
            panic!("never reached {phase:?}");
        }
    }

    fn sent(actions: &[Action]) -> Vec<(DeviceId, &'static str)> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Send { device, step, .. } => Some((*device, step.name())),
                _ => None,
            })
            .collect()
    }

    fn events(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Event { message, .. } => Some(message.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_stateful_migration_goes_through_every_phase() {
        let (mut run, actions) = Run::new(true);
        let (source, target) = (run.state.source, run.state.target);
        assert!(run.state.stateful);
        assert_eq!(sent(&actions), [(target, "preflight")]);
        assert!(events(&actions)[0].contains("started (stateful)"));

        let actions = run.done();
        assert_eq!(run.state.phase, MigrationPhase::Quiesce);
        assert_eq!(sent(&actions), [(source, "quiesce")]);
        assert!(events(&actions)[0].ends_with("preflight passed; quiesce"), "{actions:?}");
        assert_eq!(run.state.quiesced_at, Some(run.now));

        assert_eq!(sent(&run.done()), [(source, "snapshot")]);
        let actions = run.done();
        assert_eq!(run.state.phase, MigrationPhase::Ship);
        assert_eq!(sent(&actions), [(source, "ship")]);
        assert_eq!((run.state.bytes_total, run.state.bytes_shipped), (30, 0));

        let ship = run.current();
        run.feed(Input::Progress { device: source, step_id: ship.step_id, bytes_done: 20 });
        assert_eq!(run.state.bytes_shipped, 20);
        run.feed(Input::Progress { device: target, step_id: ship.step_id, bytes_done: 25 });
        assert_eq!(run.state.bytes_shipped, 20, "progress of another device is ignored");

        let actions = run.done();
        assert_eq!(run.state.phase, MigrationPhase::Restore);
        assert_eq!(run.state.bytes_shipped, 30);
        let Some(Action::Send { step: MigrationStep::Restore { manifest: Some(restored), .. }, .. }) =
            actions.iter().find(|action| matches!(action, Action::Send { .. }))
        else {
            panic!("expected restore with the manifest: {actions:?}");
        };
        assert_eq!(*restored, manifest());

        // Restored: the target runs it, but the route stays until it reports running.
        let actions = run.done();
        assert!(run.state.target_runs);
        assert_eq!(run.state.extra_device(), Some(target));
        assert!(actions.contains(&Action::DesiredChanged(vec![target])));
        assert!(!actions.contains(&Action::MoveRoute));
        let stale = run.application.revision - 1;
        run.feed(Input::Status { device: target, phase: ApplicationPhase::Running, revision: stale, message: None });
        assert_eq!(run.state.phase, MigrationPhase::Restore, "running an older revision is not enough");
        run.feed(Input::Status { device: source, phase: ApplicationPhase::Running, revision: 9, message: None });
        assert_eq!(run.state.phase, MigrationPhase::Restore, "the source's status does not count");

        run.now += TimeDelta::milliseconds(1500);
        let actions = run.running();
        assert_eq!(run.state.phase, MigrationPhase::Completed);
        assert!(actions.contains(&Action::MoveRoute));
        assert!(actions.contains(&Action::EndPlacementMigration));
        assert!(actions.contains(&Action::DeleteBlobs));
        assert!(!run.state.target_runs && run.state.extra_device().is_none());
        assert_eq!(run.state.downtime_ms, Some(1500));
        assert!(events(&actions).iter().any(|event| event.ends_with("completed (downtime 1500 ms)")));
        let phases: Vec<_> = run.state.phases.iter().map(|record| record.phase).collect();
        use MigrationPhase::*;
        assert_eq!(phases, [Preflight, Quiesce, Snapshot, Ship, Restore, Cutover, Completed]);
        assert!(run.state.phases[..6].iter().all(|record| record.finished_at.is_some()));
        assert!(run.state.is_open(), "the source's release is owed");
        assert!(sent(&actions).is_empty(), "the release waits for the retention period");
    }

    #[test]
    fn the_source_is_released_after_the_retention_period_and_closes_the_migration() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Completed);
        let source = run.state.source;
        run.now += TimeDelta::seconds(599);
        assert!(!run.state.due(run.now));
        assert!(sent(&run.feed(Input::Tick)).is_empty());
        run.now += TimeDelta::seconds(1);
        assert!(run.state.due(run.now));
        let actions = run.feed(Input::Tick);
        assert!(!run.state.due(run.now));
        assert_eq!(sent(&actions), [(source, "release")]);
        assert!(sent(&run.feed(Input::Tick)).is_empty(), "sent once per connection");
        assert_eq!(sent(&run.feed(Input::Online { device: source })), [(source, "release")], "again on reconnect");
        let step_id = run.state.obligations[0].step_id;
        let done = StepOutcome::Done { manifest: None };
        let actions = run.feed(Input::StepResult { device: source, step_id, outcome: &done });
        assert!(events(&actions)[0].ends_with("the source deleted its copy"));
        assert!(!run.state.is_open());
    }

    #[test]
    fn a_release_is_cancelled_when_the_application_moves_back() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Completed);
        assert!(!run.state.cancel_release(run.state.target));
        assert!(run.state.cancel_release(run.state.source));
        assert!(!run.state.is_open());
    }

    #[test]
    fn a_stateless_migration_starts_the_target_first_and_drains_the_source_after_cutover() {
        let (mut run, _) = Run::new(false);
        let (source, target) = (run.state.source, run.state.target);
        let actions = run.done();
        assert_eq!(run.state.phase, MigrationPhase::Restore);
        let Some(Action::Send { device, step: MigrationStep::Restore { manifest: None, .. }, .. }) =
            actions.iter().find(|action| matches!(action, Action::Send { .. }))
        else {
            panic!("expected restore without a manifest: {actions:?}");
        };
        assert_eq!(*device, target);
        run.done();
        let actions = run.running();
        assert_eq!(run.state.phase, MigrationPhase::Cutover);
        assert!(actions.contains(&Action::MoveRoute));
        assert_eq!(sent(&actions), [(source, "drain")]);
        assert_eq!(run.state.extra_device(), Some(source), "the source keeps it while draining");
        let actions = run.done();
        assert_eq!(run.state.phase, MigrationPhase::Completed);
        assert!(actions.contains(&Action::DesiredChanged(vec![source])));
        assert_eq!(run.state.extra_device(), None);
        assert_eq!(run.state.downtime_ms, None);
        let phases: Vec<_> = run.state.phases.iter().map(|record| record.phase).collect();
        use MigrationPhase::*;
        assert_eq!(phases, [Preflight, Restore, Cutover, Completed]);
    }

    #[test]
    fn a_drain_that_fails_or_times_out_still_completes() {
        let (mut run, _) = Run::new(false);
        run.until(MigrationPhase::Cutover);
        run.answer(StepOutcome::Failed { reason: "stuck".into() });
        assert_eq!(run.state.phase, MigrationPhase::Completed);

        let (mut run, _) = Run::new(false);
        run.until(MigrationPhase::Cutover);
        run.now += TimeDelta::seconds(31);
        let actions = run.feed(Input::Tick);
        assert_eq!(run.state.phase, MigrationPhase::Completed);
        assert!(events(&actions)[0].contains("did not finish draining"));
    }

    /// Checks the rollback after a failure in `phase`.
    fn assert_rolled_back(run: &mut Run, actions: &[Action], phase: MigrationPhase, reason: &str) {
        let (source, target) = (run.state.source, run.state.target);
        assert_eq!(run.state.phase, MigrationPhase::Failed);
        assert_eq!(run.state.failed_phase, Some(phase));
        let failure = run.state.failure.clone().expect("a failure");
        assert!(failure.starts_with(&format!("failed in {}: ", phase.as_str())), "{failure}");
        assert!(failure.contains(reason), "{failure}");
        assert!(actions.contains(&Action::RevertPlacement));
        assert!(actions.contains(&Action::DeleteBlobs));
        assert!(!actions.contains(&Action::MoveRoute));
        assert_eq!(sent(actions), [(target, "release"), (source, "resume")]);
        assert!(events(actions).iter().any(|event| event.contains(&failure)), "{actions:?}");
        assert_eq!(run.state.extra_device(), None);
        assert!(run.state.current.is_none() && run.state.health_wait.is_none());
        assert!(!run.state.rolled_back);

        // The source answers resume: rolled back. The target answers release: closed.
        let resume = run.state.obligations.iter().find(|o| o.duty == Duty::Resume).expect("resume").step_id;
        let done = StepOutcome::Done { manifest: None };
        run.feed(Input::StepResult { device: source, step_id: resume, outcome: &done });
        assert!(run.state.rolled_back);
        assert!(run.state.is_open());
        let release = run.state.obligations[0].step_id;
        run.feed(Input::StepResult { device: target, step_id: release, outcome: &done });
        assert!(!run.state.is_open());
    }

    #[test]
    fn a_failure_in_each_phase_rolls_back() {
        use MigrationPhase::*;
        for (stateful, phase) in
            [(true, Preflight), (true, Quiesce), (true, Snapshot), (true, Ship), (true, Restore), (false, Restore)]
        {
            let (mut run, _) = Run::new(stateful);
            run.until(phase);
            let actions = run.answer(StepOutcome::Failed { reason: "disk full".into() });
            assert_rolled_back(&mut run, &actions, phase, "disk full");
        }
    }

    #[test]
    fn a_timeout_in_each_phase_rolls_back() {
        use MigrationPhase::*;
        for phase in [Preflight, Quiesce, Snapshot, Ship, Restore] {
            let (mut run, _) = Run::new(true);
            run.until(phase);
            run.now += TimeDelta::seconds(29);
            assert!(!run.state.due(run.now));
            assert!(run.feed(Input::Tick).is_empty(), "nothing before the deadline");
            run.now += TimeDelta::seconds(1);
            assert!(run.state.due(run.now));
            let actions = run.feed(Input::Tick);
            assert_rolled_back(&mut run, &actions, phase, "did not finish within 30 s");
        }
    }

    #[test]
    fn a_target_that_never_runs_the_application_or_fails_it_rolls_back() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Restore);
        run.done();
        let target = run.state.target;
        run.now += TimeDelta::seconds(30);
        let actions = run.feed(Input::Tick);
        assert!(actions.contains(&Action::DesiredChanged(vec![target])), "the target loses it");
        assert_rolled_back(&mut run, &actions, MigrationPhase::Restore, "did not report running");

        let (mut run, _) = Run::new(false);
        run.until(MigrationPhase::Restore);
        run.done();
        let revision = run.application.revision;
        let crashed =
            Input::Status { device: target, phase: ApplicationPhase::Failed, revision, message: Some("exit 1") };
        assert!(run.feed(crashed).is_empty(), "another target's report");
        let target = run.state.target;
        let message = Some("exited with status 1");
        let actions = run.feed(Input::Status { device: target, phase: ApplicationPhase::Failed, revision, message });
        assert_rolled_back(&mut run, &actions, MigrationPhase::Restore, "failed on the target: exited with status 1");
    }

    #[test]
    fn a_bad_or_missing_manifest_fails_the_snapshot() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Snapshot);
        let actions = run.answer(StepOutcome::Done { manifest: None });
        assert_rolled_back(&mut run, &actions, MigrationPhase::Snapshot, "without a manifest");

        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Snapshot);
        let mut bad = manifest();
        bad.total_bytes = 31;
        let actions = run.answer(StepOutcome::Done { manifest: Some(bad) });
        assert_rolled_back(&mut run, &actions, MigrationPhase::Snapshot, "add up to 30");
    }

    #[test]
    fn manifests_are_checked_field_by_field() {
        assert_eq!(check_manifest(&manifest()), Ok(()));
        let mut gap = manifest();
        gap.chunks[1].index = 2;
        assert!(check_manifest(&gap).unwrap_err().contains("chunks[1].index"));
        let mut huge = manifest();
        huge.chunks[0].bytes = MAX_CHUNK_BYTES + 1;
        assert!(check_manifest(&huge).unwrap_err().contains("chunks[0].bytes"));
        let mut upper = manifest();
        upper.chunks[0].sha256 = "AB".repeat(32);
        assert!(check_manifest(&upper).unwrap_err().contains("chunks[0].sha256"));
        let mut short = manifest();
        short.sha256 = "ab".into();
        assert!(check_manifest(&short).unwrap_err().contains("manifest.sha256"));
    }

    #[test]
    fn a_reconnecting_device_gets_the_same_step_again_and_old_answers_are_ignored() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Snapshot);
        let current = run.current();
        let actions = run.feed(Input::Online { device: run.state.source });
        assert_eq!(
            actions,
            [Action::Send {
                device: current.device,
                step_id: current.step_id,
                deadline: current.deadline,
                step: current.step.clone()
            }]
        );
        assert!(run.feed(Input::Online { device: run.state.target }).is_empty());
        // A repeated answer to the step before (quiesce) changes nothing.
        let done = StepOutcome::Done { manifest: None };
        let old = Input::StepResult { device: current.device, step_id: current.step_id - 1, outcome: &done };
        assert!(run.feed(old).is_empty());
        assert_eq!(run.state.phase, MigrationPhase::Snapshot);
        // Step ids are unique within the migration.
        run.done();
        assert!(run.current().step_id > current.step_id);
    }

    #[test]
    fn a_finished_migration_ignores_late_inputs() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Ship);
        run.answer(StepOutcome::Failed { reason: "network".into() });
        let before = run.state.clone();
        assert!(run.running().is_empty());
        run.now += TimeDelta::seconds(1000);
        assert!(sent(&run.feed(Input::Tick)).is_empty(), "obligations went out already");
        assert_eq!(run.state.phase, before.phase);
        assert_eq!(run.state.failure, before.failure);
    }

    #[test]
    fn the_state_survives_a_round_trip_through_json() {
        let (mut run, _) = Run::new(true);
        run.until(MigrationPhase::Ship);
        let text = serde_json::to_string(&run.state).expect("encoded");
        let back: MigrationState = serde_json::from_str(&text).expect("decoded");
        assert_eq!(back, run.state);
        assert_eq!(back.to_model().phase, MigrationPhase::Ship);
    }
}
