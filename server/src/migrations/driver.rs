//! The migration driver: feeds the state machine of `crate::migrations` what happens (agents'
//! step results, progress and statuses from the hub, devices connecting, the clock), stores
//! each new state through `crate::db` together with the placement and desired-state changes
//! of its actions, then sends the steps (through the agent [`Outbox`], woken like any other
//! message), records the events and deletes finished migrations' blobs.
//!
//! Transitions run one at a time (one lock): migrations are rare and each transition is a
//! read and a write. A restart loses nothing: the next [`Migrations::tick`] goes on from the
//! stored states (a deadline that passed while the server was down fails the migration), and
//! a device that connects is sent its current step and owed obligations again.

use std::sync::Arc;
use std::time::Duration;

use edgible::model::{ApplicationId, DeviceId, Migration, MigrationId, OrganizationId, Placement, PlacementSpec};
use edgible::protocol::v1::{MigrationStep, ServerMessage, StepOutcome};
use tokio::sync::{Mutex, watch};

use super::{Action, Context, Input, MigrationState, Timing, advance, start};
use crate::blobs::BlobStore;
use crate::db::{Db, StatusReport, StoreError};
use crate::hub::Hub;
use crate::hub::agent::Outbox;

/// How migrations are timed and where their chunks go; from the server's flags.
#[derive(Debug, Clone)]
pub struct MigrationSettings {
    pub step_timeout: Duration,
    pub drain_seconds: u32,
    pub retention: Duration,
    pub blobs: BlobStore,
}

impl Default for MigrationSettings {
    /// The flags' defaults, with the blobs in memory (tests).
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(300),
            drain_seconds: 10,
            retention: Duration::from_secs(86_400),
            blobs: BlobStore::default(),
        }
    }
}

impl MigrationSettings {
    fn timing(&self) -> Timing {
        let delta = |duration: Duration| chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX);
        Timing {
            step_timeout: delta(self.step_timeout),
            drain_seconds: self.drain_seconds,
            retention: delta(self.retention),
        }
    }

    /// How often the clock is looked at: a tenth of the step timeout, between 100 ms and 1 s.
    pub fn tick_interval(&self) -> Duration {
        (self.step_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// The migration driver. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Migrations {
    db: Db,
    hub: Arc<Hub<DeviceId>>,
    outbox: Arc<Outbox>,
    settings: MigrationSettings,
    /// Held for each transition, from reading the state to sending its steps.
    turn: Mutex<()>,
}

impl Migrations {
    pub fn new(db: Db, hub: Arc<Hub<DeviceId>>, outbox: Arc<Outbox>, settings: MigrationSettings) -> Self {
        Self { db, hub, outbox, settings, turn: Mutex::new(()) }
    }

    pub fn settings(&self) -> &MigrationSettings {
        &self.settings
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.settings.blobs
    }

    /// Checks and starts a migration of `application_id` to `to` (see
    /// `Db::create_migration` for what is refused), sending `preflight` to the target.
    pub async fn create(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        to: &PlacementSpec,
        expected: Option<edgible::model::Revision>,
    ) -> Result<(Migration, Placement), StoreError> {
        let _turn = self.turn.lock().await;
        let timing = self.settings.timing();
        let (state, actions, placement) = self
            .db
            .create_migration(organization_id, application_id, to, expected, |new, application| {
                let context = Context { now: chrono::Utc::now(), timing, application };
                start(new, &context)
            })
            .await?;
        tracing::info!(migration = %state.id, application = %application_id, source = %state.source,
            target = %state.target, "migration started");
        self.after_commit(&state, actions).await;
        Ok((state.to_model(), placement))
    }

    /// An agent answered a step.
    pub async fn step_result(&self, device: DeviceId, migration: MigrationId, step_id: u64, outcome: &StepOutcome) {
        let outcome = match (outcome, self.check_ship(migration, step_id, outcome).await) {
            (_, Some(missing)) => StepOutcome::Failed { reason: missing },
            (outcome, None) => outcome.clone(),
        };
        self.drive(migration, Input::StepResult { device, step_id, outcome: &outcome }).await;
    }

    /// An agent reported progress of a step.
    pub async fn progress(&self, device: DeviceId, migration: MigrationId, step_id: u64, bytes_done: u64) {
        self.drive(migration, Input::Progress { device, step_id, bytes_done }).await;
    }

    /// An agent reported its applications' statuses: the migrations waiting for it to run
    /// one of them healthy hear about it.
    pub async fn statuses(&self, device: DeviceId, reports: &[StatusReport]) {
        let waiting = match self.db.migrations_awaiting_health(device).await {
            Ok(waiting) => waiting,
            Err(error) => {
                tracing::warn!(%error, "cannot read the migrations waiting for a status");
                return;
            }
        };
        for state in waiting {
            if let Some(report) = reports.iter().find(|report| report.application_id == state.application_id) {
                let input = Input::Status {
                    device,
                    phase: report.phase,
                    revision: report.revision,
                    message: report.message.as_deref(),
                };
                self.drive(state.id, input).await;
            }
        }
    }

    /// A device's agent connected: it gets its running steps and owed obligations again.
    pub async fn device_online(&self, device: DeviceId) {
        match self.db.open_migrations_of_device(device).await {
            Ok(states) => {
                for state in states {
                    self.drive(state.id, Input::Online { device }).await;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the migrations of a device that connected"),
        }
    }

    /// Looks at the clock for every open migration: deadlines, due obligations.
    pub async fn tick(&self) -> Result<(), StoreError> {
        let now = chrono::Utc::now();
        for state in self.db.open_migrations().await? {
            if state.due(now) {
                self.drive(state.id, Input::Tick).await;
            }
        }
        Ok(())
    }

    /// Ticks until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = self.settings.tick_interval();
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(every) => {
                    if let Err(error) = self.tick().await {
                        tracing::warn!(%error, "looking at migrations' deadlines failed; retrying");
                    }
                }
            }
        }
    }

    /// A `ship` that the source says is done, but whose chunks the blob store does not all
    /// hold (or not as the manifest says), fails: the answer says which chunk.
    async fn check_ship(&self, migration: MigrationId, step_id: u64, outcome: &StepOutcome) -> Option<String> {
        if !matches!(outcome, StepOutcome::Done { .. }) {
            return None;
        }
        let state = self.db.migration_state(migration).await.ok()??;
        let current = state.current.as_ref()?;
        let MigrationStep::Ship { manifest, .. } = &current.step else { return None };
        if current.step_id != step_id {
            return None;
        }
        let stored = match self.blobs().chunks(migration).await {
            Ok(stored) => stored,
            Err(error) => return Some(format!("the blob store failed: {error}")),
        };
        manifest
            .chunks
            .iter()
            .find(|chunk| !stored.contains(chunk))
            .map(|chunk| format!("ship answered done, but the blob store lacks chunk {}", chunk.index))
    }

    /// Runs one transition of `migration`: read, advance, save, then act.
    async fn drive(&self, migration: MigrationId, input: Input<'_>) {
        let _turn = self.turn.lock().await;
        if let Err(error) = self.transition(migration, input).await {
            tracing::warn!(%migration, %error, "a migration transition failed; it is retried with the next input");
        }
    }

    async fn transition(&self, migration: MigrationId, input: Input<'_>) -> Result<(), StoreError> {
        let Some(state) = self.db.migration_state(migration).await? else {
            return Ok(());
        };
        let Some(application) = self.db.migrating_application(state.application_id).await? else {
            return Ok(());
        };
        let context = Context { now: chrono::Utc::now(), timing: self.settings.timing(), application: &application };
        let before = state.clone();
        let (state, actions) = advance(state, input, &context);
        if state != before {
            self.db.save_migration(&state, &actions).await?;
        }
        if actions.is_empty() {
            return Ok(());
        }
        if state.phase != before.phase {
            tracing::info!(%migration, phase = state.phase.as_str(), "migration moved on");
        }
        self.after_commit(&state, actions).await;
        Ok(())
    }

    /// What a stored transition does outside the database.
    async fn after_commit(&self, state: &MigrationState, actions: Vec<Action>) {
        let mut woken = Vec::new();
        for action in actions {
            match action {
                Action::Send { device, step_id, deadline, step } => {
                    let message = ServerMessage::MigrationStep { migration_id: state.id, step_id, deadline, step };
                    self.outbox.push(device, message);
                    woken.push(device);
                }
                Action::Event { device, message } => {
                    let recorded = self
                        .db
                        .record_platform_event(state.organization_id, device, state.application_id, &message)
                        .await;
                    if let Err(error) = recorded {
                        tracing::warn!(%error, "cannot record a migration event");
                    }
                }
                Action::DeleteBlobs => {
                    // In the background: on object storage this takes a round trip per chunk,
                    // and the agent session that reported the cutover's healthy status waits
                    // for this transition before it stores that status.
                    let blobs = self.blobs().clone();
                    let migration = state.id;
                    tokio::spawn(async move {
                        if let Err(error) = blobs.delete(migration).await {
                            tracing::warn!(%migration, %error, "cannot delete a migration's blobs");
                        }
                    });
                }
                Action::DesiredChanged(_)
                | Action::MoveRoute
                | Action::RevertPlacement
                | Action::EndPlacementMigration => {}
            }
        }
        self.hub.wake(&woken);
    }
}
