//! The effectful half of reconciliation: observe what runs, plan, execute the plan through the
//! drivers, record the outcome, persist, report. Then wait for the next reason to look again.
//!
//! - Every pass requeues: after at most `requeue_interval`, sooner when a backoff expires, a
//!   workload exits, a health state changes or desired state arrives.
//! - Failures (a start that fails, a workload that exits) back off per application, with
//!   exponential backoff and full jitter; the count resets once the workload has been healthy
//!   for `backoff.reset_after`. A changed spec is tried at once, whatever the backoff.
//! - The changes of one pass run concurrently (each is for a different application), so one
//!   workload taking its grace period to stop does not hold back the others.
//! - The desired state is persisted before it is taken, and what runs after every pass, so an
//!   agent restarting without the server keeps serving and adopts its workloads. A reconciler
//!   holds its state directory's lock for its whole life.
//! - Sleep ([`crate::sleep`]): each pass first puts idle applications with a `sleep` policy
//!   to sleep: mode `stop` stops the workload and leaves the application out of the plan while
//!   it sleeps (so nothing restarts it), mode `suspend` asks the driver to suspend it (and
//!   stops it instead, with an event, when the driver cannot). Wakes come from the proxy as
//!   commands: start or resume, then the waker waits for the health check (or the port). A
//!   change to a suspended application's spec resumes it first. Phases `sleeping` and
//!   `waking`; every transition is an event. What sleeps is not persisted: after an agent
//!   restart every application starts awake and sleeps again once idle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgible::model::{Application, ApplicationId, HealthCheck, Revision, SleepMode};
use edgible::protocol::v1::{ApplicationStatus, Phase};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::plan::{ActualState, ActualWorkload, Change, RestartReason, RunState, Supervision, plan};
use super::{DesiredState, DesiredUpdate, UpdateOutcome};
use crate::backoff::{Backoff, BackoffPolicy, Jitter, RandomJitter};
use crate::driver::{Driver, ExitInfo, LaunchSpec, Wake, WorkloadHandle, WorkloadKind, WorkloadStatus};
use crate::events::EventLog;
use crate::health::{HealthConfig, HealthMonitor, HealthState};
use crate::logs::LogBuffer;
use crate::migration::Holds;
use crate::sleep::{SleepState, SleepTable, WakeWorkload};
use crate::state::{PersistedState, StateDir, StateError, StateLock, WorkloadRecord};
use crate::volumes::{VOLUMES_DIR, Volumes};

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// The longest time between two passes.
    pub requeue_interval: Duration,
    /// Backoff of restarts after failures, per application.
    pub backoff: BackoffPolicy,
    pub health: HealthConfig,
    /// How many lifecycle events are kept for the push session.
    pub event_capacity: usize,
    /// How many statuses of stopped applications are kept in the report.
    pub stopped_capacity: usize,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            requeue_interval: Duration::from_secs(10),
            backoff: BackoffPolicy::default(),
            health: HealthConfig::default(),
            event_capacity: 1024,
            stopped_capacity: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot persist desired state: {0}")]
    State(#[from] StateError),
    #[error("the reconciler has stopped")]
    Stopped,
}

/// The drivers of an agent, one per workload kind.
#[derive(Clone, Default)]
pub struct Drivers(Arc<BTreeMap<WorkloadKind, Arc<dyn Driver>>>);

impl Drivers {
    pub fn new(drivers: impl IntoIterator<Item = Arc<dyn Driver>>) -> Self {
        Self(Arc::new(drivers.into_iter().map(|driver| (driver.kind(), driver)).collect()))
    }

    pub fn get(&self, kind: WorkloadKind) -> Option<Arc<dyn Driver>> {
        self.0.get(&kind).cloned()
    }

    /// The recent output of an application, from whichever driver runs it.
    pub fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        self.0.values().find_map(|driver| driver.logs(application_id))
    }

    pub fn kinds(&self) -> Vec<WorkloadKind> {
        self.0.keys().copied().collect()
    }

    /// Where the application's workload listens, from whichever driver runs it; `None` while
    /// none does.
    pub fn address(&self, application_id: ApplicationId) -> Option<std::net::IpAddr> {
        self.0.values().find_map(|driver| driver.address(application_id))
    }
}

impl crate::sleep::WorkloadAddresses for Drivers {
    fn address(&self, application_id: ApplicationId) -> Option<std::net::IpAddr> {
        Drivers::address(self, application_id)
    }
}

/// What the agent reports: the revision it applied and the state of every application.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentReport {
    pub applied_revision: Option<Revision>,
    /// The desired applications, then recently stopped ones.
    pub applications: Vec<ApplicationStatus>,
    /// What runs, per application.
    pub workloads: BTreeMap<ApplicationId, WorkloadHandle>,
}

impl AgentReport {
    pub fn status(&self, application_id: ApplicationId) -> Option<&ApplicationStatus> {
        self.applications.iter().find(|status| status.application_id == application_id)
    }
}

/// How to end a reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Leave workloads running for the next agent to adopt (an agent restart or upgrade).
    LeaveRunning,
    /// Stop every workload.
    StopWorkloads,
}

/// A workload the agent is responsible for.
struct Tracked {
    launch: LaunchSpec,
    revision: Revision,
    handle: WorkloadHandle,
    supervision: Supervision,
    /// Set once the workload's exit has been observed (and counted as a failure).
    exit: Option<ExitInfo>,
    health: Option<HealthMonitor>,
    health_check: Option<HealthCheck>,
}

/// The failures of one application and when it may be tried again.
struct Attempts {
    backoff: Backoff,
    not_before: Option<Instant>,
    last_error: Option<String>,
    /// The launch spec that failed; a different one is tried at once.
    failed_launch: Option<LaunchSpec>,
}

impl Attempts {
    fn new(policy: BackoffPolicy) -> Self {
        Self { backoff: Backoff::new(policy), not_before: None, last_error: None, failed_launch: None }
    }

    fn fail(&mut self, now: Instant, error: String, launch: LaunchSpec, jitter: &mut dyn Jitter) -> Duration {
        let delay = self.backoff.failure(&mut JitterRef(jitter));
        self.not_before = Some(now + delay);
        self.last_error = Some(error);
        self.failed_launch = Some(launch);
        delay
    }

    fn waiting(&self, now: Instant) -> Option<Duration> {
        self.not_before.filter(|at| *at > now).map(|at| at - now)
    }
}

/// Lets a `&mut dyn Jitter` be passed where `impl Jitter` is expected.
struct JitterRef<'a>(&'a mut dyn Jitter);

impl Jitter for JitterRef<'_> {
    fn pick(&mut self, ceiling: Duration) -> Duration {
        self.0.pick(ceiling)
    }
}

pub struct Reconciler {
    config: ReconcilerConfig,
    state_dir: StateDir,
    _lock: StateLock,
    drivers: Drivers,
    desired: DesiredState,
    applied_revision: Option<Revision>,
    workloads: BTreeMap<ApplicationId, Tracked>,
    attempts: BTreeMap<ApplicationId, Attempts>,
    stopped: BTreeMap<ApplicationId, ApplicationStatus>,
    wake: Wake,
    jitter: Box<dyn Jitter + Send>,
    events: EventLog,
    report: watch::Sender<AgentReport>,
    /// The desired state as taken, for the data path (routes and certificates).
    desired_watch: watch::Sender<Arc<DesiredState>>,
    last_saved: Vec<u8>,
    /// Activity, sleep and wake of applications, shared with the proxy.
    sleep: Arc<SleepTable>,
    /// The applications asleep and how.
    sleeping: BTreeMap<ApplicationId, SleepMode>,
    /// Applications a migration quiesced: kept stopped, across restarts, until resumed.
    holds: Arc<Holds>,
    /// Provisions each application's volumes before its workload starts.
    volumes: Volumes,
}

impl Reconciler {
    /// A reconciler that continues from what `state_dir` remembers: its desired state, and the
    /// workloads a previous agent left running, to be adopted or replaced on the first pass.
    pub fn new(config: ReconcilerConfig, state_dir: StateDir, drivers: Drivers) -> Result<Self, StateError> {
        let lock = state_dir.lock()?;
        let persisted = state_dir.load()?;
        let workloads = persisted
            .workloads
            .into_iter()
            .map(|(application_id, record)| {
                let tracked = Tracked {
                    launch: record.launch,
                    revision: record.revision,
                    handle: record.handle,
                    supervision: Supervision::Recorded,
                    exit: None,
                    health: None,
                    health_check: None,
                };
                (application_id, tracked)
            })
            .collect();
        let (report, _) =
            watch::channel(AgentReport { applied_revision: persisted.applied_revision, ..AgentReport::default() });
        let (desired_watch, _) = watch::channel(Arc::new(persisted.desired.clone()));
        let wake = Wake::new();
        let sleep = SleepTable::new(wake.clone());
        sleep.set_applications(persisted.desired.applications.values());
        let holds = Arc::new(Holds::open(state_dir.clone())?);
        holds.set_wake(wake.clone());
        for application_id in holds.all() {
            // Held across the restart: the proxy keeps refusing it until resumed.
            sleep.set_gate(application_id, crate::sleep::Gate::Refuse);
        }
        let volumes = Volumes::new(state_dir.root().join(VOLUMES_DIR), true);
        Ok(Self {
            holds,
            volumes,
            sleep,
            sleeping: BTreeMap::new(),
            desired_watch,
            events: EventLog::new(config.event_capacity),
            config,
            state_dir,
            _lock: lock,
            drivers,
            desired: persisted.desired,
            applied_revision: persisted.applied_revision,
            workloads,
            attempts: BTreeMap::new(),
            stopped: BTreeMap::new(),
            wake,
            jitter: Box::new(RandomJitter),
            report,
            last_saved: Vec::new(),
        })
    }

    /// Provisions volumes with `volumes` instead of mounting them below the state directory
    /// (a cloud host, whose images are attached to microVMs and never mounted on the host).
    pub fn with_volumes(mut self, volumes: Volumes) -> Self {
        self.volumes = volumes;
        self
    }

    /// The holds of quiesced applications, shared with the migration steps.
    pub fn holds(&self) -> Arc<Holds> {
        Arc::clone(&self.holds)
    }

    pub fn volumes(&self) -> Volumes {
        self.volumes.clone()
    }

    /// Replaces the random source of backoff jitter (for tests).
    pub fn with_jitter(mut self, jitter: impl Jitter + Send + 'static) -> Self {
        self.jitter = Box::new(jitter);
        self
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn events(&self) -> EventLog {
        self.events.clone()
    }

    /// The sleep table the proxy counts activity in and asks for wakes.
    pub fn sleep_table(&self) -> Arc<SleepTable> {
        Arc::clone(&self.sleep)
    }

    pub fn subscribe(&self) -> watch::Receiver<AgentReport> {
        self.report.subscribe()
    }

    /// The desired state, as persisted on start and then as each update is taken.
    pub fn watch_desired(&self) -> watch::Receiver<Arc<DesiredState>> {
        self.desired_watch.subscribe()
    }

    /// Takes a desired-state update, persisting it first: an update that cannot be persisted
    /// is not taken (and must not be acknowledged).
    pub fn update(&mut self, update: DesiredUpdate) -> Result<UpdateOutcome, StateError> {
        let mut desired = self.desired.clone();
        let outcome = desired.apply(update);
        if let UpdateOutcome::Taken { .. } = outcome {
            let mut persisted = self.persisted();
            persisted.desired = desired.clone();
            self.save(&persisted)?;
            self.stopped.retain(|application_id, _| !desired.applications.contains_key(application_id));
            self.desired_watch.send_replace(Arc::new(desired.clone()));
            self.sleep.set_applications(desired.applications.values());
            self.desired = desired;
            self.wake.wake();
        }
        Ok(outcome)
    }

    /// Runs one pass and answers when the next one is due at the latest.
    pub async fn reconcile(&mut self) -> Instant {
        let now = Instant::now();
        self.observe(now).await;
        self.fall_asleep(now).await;
        let mut awake = self.desired.clone();
        awake.applications.retain(|application_id, _| {
            self.sleeping.get(application_id) != Some(&SleepMode::Stop) && !self.holds.is_held(*application_id)
        });
        let changes = plan(&awake, &self.actual());
        let mut jobs = Vec::new();
        for change in changes {
            if self.sleeping.get(&change.application_id()) == Some(&SleepMode::Suspend) {
                // A suspended workload cannot be stopped or changed: let it run first.
                self.resume(change.application_id(), "its spec changed").await;
            }
            if !self.gated(&change, now) {
                let held = self.holds.is_held(change.application_id());
                let job = self.job(change);
                jobs.push(if held { Job { stop_cause: StopCause::Held, ..job } } else { job });
            }
        }
        let outcomes = futures::future::join_all(jobs.into_iter().map(|job| job.run())).await;
        let now = Instant::now();
        for outcome in outcomes {
            self.absorb(outcome, now);
        }
        // Every change of this revision's plan was executed (or is waiting for its backoff, which
        // the status says): the revision is applied.
        if self.desired.revision.is_some() {
            self.applied_revision = self.desired.revision;
        }
        self.note_health(now);
        let persisted = self.persisted();
        if let Err(error) = self.save(&persisted) {
            tracing::error!(%error, "cannot persist the agent state; retrying on the next pass");
        }
        self.publish(now);
        self.next_pass(now)
    }

    /// Puts the applications the sleep table finds idle to sleep.
    async fn fall_asleep(&mut self, now: Instant) {
        // Applications that lost their policy (or went away) wake up first; the plan then
        // starts, keeps or stops them like any other.
        let woken: Vec<ApplicationId> = self
            .sleeping
            .keys()
            .filter(|id| self.desired.applications.get(id).is_none_or(|application| application.spec.sleep.is_none()))
            .copied()
            .collect();
        for application_id in woken {
            self.resume(application_id, "no longer under a sleep policy").await;
        }
        for (application_id, mode) in self.sleep.idle(now) {
            let running = self
                .workloads
                .get(&application_id)
                .is_some_and(|tracked| tracked.exit.is_none() && tracked.supervision == Supervision::Supervised);
            if !running || self.sleeping.contains_key(&application_id) || !self.sleep.begin_sleep(application_id, now) {
                continue;
            }
            let Some(tracked) = self.workloads.get(&application_id) else { continue };
            let name = tracked.launch.name.to_string();
            let driver = self.drivers.get(tracked.handle.kind());
            if mode == SleepMode::Suspend {
                let suspended = match &driver {
                    Some(driver) => driver.suspend(application_id).await.map_err(|error| error.to_string()),
                    None => Err("no driver".to_owned()),
                };
                match suspended {
                    Ok(()) => {
                        self.sleeping.insert(application_id, SleepMode::Suspend);
                        self.events.record(Some(application_id), format!("{name} is idle: suspended"));
                        continue;
                    }
                    Err(error) => self.events.record(
                        Some(application_id),
                        format!("{name} is idle but cannot be suspended ({error}); stopping it instead"),
                    ),
                }
            }
            let previous = self.job(Change::Stop { application_id }).previous;
            match stop_previous(application_id, previous, false).await {
                Ok(()) => {
                    self.workloads.remove(&application_id);
                    self.sleeping.insert(application_id, SleepMode::Stop);
                    self.events.record(Some(application_id), format!("{name} is idle: stopped until the next request"));
                }
                Err(error) => {
                    self.sleep.set_awake(application_id);
                    self.events.record(Some(application_id), format!("{name} is idle but cannot be stopped: {error}"));
                }
            }
        }
    }

    /// Lets a suspended application run again, outside of a wake.
    async fn resume(&mut self, application_id: ApplicationId, why: &str) {
        if self.sleeping.remove(&application_id).is_none() {
            return;
        }
        if let Some(driver) = self.workloads.get(&application_id).and_then(|t| self.drivers.get(t.handle.kind()))
            && let Err(error) = driver.resume(application_id).await
        {
            tracing::warn!(application = %application_id, %error, "cannot resume a suspended workload");
        }
        self.sleep.set_awake(application_id);
        self.events.record(Some(application_id), format!("awake again: {why}"));
    }

    /// Executes a wake the proxy asked for: starts or resumes the workload. The waker then
    /// waits until it is ready.
    async fn wake_application(&mut self, application_id: ApplicationId) -> Result<Readiness, String> {
        let Some(application) = self.desired.applications.get(&application_id).cloned() else {
            return Err("the application is no longer placed on this device".to_owned());
        };
        if self.holds.is_held(application_id) {
            return Err("the application is stopped for a migration".to_owned());
        }
        let readiness = Readiness { port: application.spec.port, health_check: application.spec.health_check.clone() };
        match self.sleeping.remove(&application_id) {
            None => Ok(readiness),
            Some(SleepMode::Suspend) => {
                let driver = self.workloads.get(&application_id).and_then(|t| self.drivers.get(t.handle.kind()));
                let resumed = match driver {
                    Some(driver) => driver.resume(application_id).await.map_err(|error| error.to_string()),
                    None => Err("no driver".to_owned()),
                };
                match resumed {
                    Ok(()) => {
                        self.events.record(Some(application_id), format!("{} waking: resumed", application.spec.name));
                        Ok(readiness)
                    }
                    Err(error) => {
                        self.sleeping.insert(application_id, SleepMode::Suspend);
                        Err(format!("cannot resume: {error}"))
                    }
                }
            }
            Some(SleepMode::Stop) => {
                let job = self.job(Change::Start { application: application.clone() });
                let outcome = start(application.clone(), Vec::new(), job.driver, None, job.wake, job.volumes).await;
                let started = matches!(outcome, Outcome::Started { .. });
                let error = match &outcome {
                    Outcome::StartFailed { error, .. } => error.clone(),
                    _ => String::new(),
                };
                self.absorb(outcome, Instant::now());
                if started {
                    self.events.record(Some(application_id), format!("{} waking: started", application.spec.name));
                    Ok(readiness)
                } else {
                    self.sleeping.insert(application_id, SleepMode::Stop);
                    Err(error)
                }
            }
        }
    }

    /// A wake failed or timed out: stops what it started, so the next request wakes afresh.
    async fn wake_failed(&mut self, application_id: ApplicationId, reason: &str) {
        let name = self.desired.applications.get(&application_id).map(|a| a.spec.name.to_string()).unwrap_or_default();
        self.events.record(Some(application_id), format!("{name} failed to wake: {reason}; asleep again"));
        if self.sleeping.contains_key(&application_id) || !self.desired.applications.contains_key(&application_id) {
            return;
        }
        let previous = self.job(Change::Stop { application_id }).previous;
        if let Err(error) = stop_previous(application_id, previous, false).await {
            tracing::warn!(application = %application_id, %error, "cannot stop a workload that failed to wake");
        }
        self.workloads.remove(&application_id);
        self.sleeping.insert(application_id, SleepMode::Stop);
    }

    /// Updates what is known about each tracked workload.
    async fn observe(&mut self, now: Instant) {
        for (application_id, tracked) in &mut self.workloads {
            if tracked.exit.is_some() {
                continue;
            }
            let Some(driver) = self.drivers.get(tracked.handle.kind()) else {
                tracked.exit = Some(ExitInfo::now(None, None));
                continue;
            };
            match tracked.supervision {
                Supervision::Supervised => {
                    let exit = match driver.status(*application_id) {
                        WorkloadStatus::Running { handle } => {
                            tracked.handle = handle;
                            continue;
                        }
                        WorkloadStatus::Exited(exit) => exit,
                        WorkloadStatus::Absent => ExitInfo::now(None, None),
                    };
                    let attempts =
                        self.attempts.entry(*application_id).or_insert_with(|| Attempts::new(self.config.backoff));
                    let delay = attempts.fail(now, exit.to_string(), tracked.launch.clone(), self.jitter.as_mut());
                    self.events.record(
                        Some(*application_id),
                        format!("{} {exit}; restarting in {}", tracked.launch.name, seconds(delay)),
                    );
                    tracked.health = None;
                    tracked.exit = Some(exit);
                }
                Supervision::Recorded => match driver.probe(&tracked.handle).await {
                    Ok(true) => {}
                    Ok(false) => tracked.exit = Some(ExitInfo::now(None, None)),
                    Err(error) => {
                        tracing::warn!(application = %application_id, %error, "cannot check a recorded workload");
                        tracked.exit = Some(ExitInfo::now(None, None));
                    }
                },
            }
        }
    }

    fn actual(&self) -> ActualState {
        let workloads = self
            .workloads
            .iter()
            .map(|(application_id, tracked)| {
                let workload = ActualWorkload {
                    launch: tracked.launch.clone(),
                    revision: tracked.revision,
                    supervision: tracked.supervision,
                    state: if tracked.exit.is_some() { RunState::Exited } else { RunState::Running },
                };
                (*application_id, workload)
            })
            .collect();
        ActualState { workloads }
    }

    /// Whether a change must wait for its application's backoff. Only retries of what failed
    /// wait; a different launch spec resets the backoff and goes at once.
    fn gated(&mut self, change: &Change, now: Instant) -> bool {
        let (application, failure_only) = match change {
            Change::Start { application } => (application, true),
            Change::Restart { application, reasons } => (application, reasons.iter().all(|r| r.is_failure())),
            Change::Adopt { .. } | Change::Refresh { .. } | Change::Stop { .. } => return false,
        };
        let Some(attempts) = self.attempts.get_mut(&application.id) else { return false };
        let launch = LaunchSpec::from_application(application);
        if !failure_only || attempts.failed_launch.as_ref() != Some(&launch) {
            if attempts.failed_launch.is_some() {
                attempts.backoff.reset();
                attempts.not_before = None;
                attempts.failed_launch = None;
            }
            return false;
        }
        attempts.waiting(now).is_some()
    }

    /// Gathers what executing a change needs, so that changes can run concurrently.
    fn job(&self, change: Change) -> Job {
        let previous = self.workloads.get(&change.application_id()).map(|tracked| Previous {
            driver: self.drivers.get(tracked.handle.kind()),
            handle: tracked.handle.clone(),
            supervision: tracked.supervision,
            launch: tracked.launch.clone(),
        });
        let driver = match &change {
            Change::Start { application } | Change::Restart { application, .. } => {
                self.drivers.get(LaunchSpec::from_application(application).kind())
            }
            Change::Adopt { .. } | Change::Refresh { .. } | Change::Stop { .. } => {
                previous.as_ref().and_then(|previous| previous.driver.clone())
            }
        };
        Job {
            change,
            driver,
            previous,
            wake: self.wake.clone(),
            stop_cause: StopCause::Removed,
            volumes: self.volumes.clone(),
        }
    }

    fn absorb(&mut self, outcome: Outcome, now: Instant) {
        match outcome {
            Outcome::Started { application, launch, handle, reasons } => {
                let message = if reasons.is_empty() {
                    format!("{} started", launch.name)
                } else {
                    let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                    format!("{} restarted: {}", launch.name, reasons.join(", "))
                };
                self.events.record(Some(application.id), message);
                let health = self.health_monitor(&application);
                self.workloads.insert(
                    application.id,
                    Tracked {
                        launch,
                        revision: application.revision,
                        handle,
                        supervision: Supervision::Supervised,
                        exit: None,
                        health: Some(health),
                        health_check: application.spec.health_check.clone(),
                    },
                );
                if let Some(attempts) = self.attempts.get_mut(&application.id) {
                    attempts.not_before = None;
                    attempts.last_error = None;
                }
            }
            Outcome::StartFailed { application, launch, error, previous_stopped } => {
                if previous_stopped {
                    self.workloads.remove(&application.id);
                }
                let attempts =
                    self.attempts.entry(application.id).or_insert_with(|| Attempts::new(self.config.backoff));
                let delay = attempts.fail(now, error.clone(), launch, self.jitter.as_mut());
                self.events.record(
                    Some(application.id),
                    format!("{} failed to start: {error}; retrying in {}", application.spec.name, seconds(delay)),
                );
            }
            Outcome::Adopted { application } => {
                let health = self.health_monitor(&application);
                if let Some(tracked) = self.workloads.get_mut(&application.id) {
                    tracked.supervision = Supervision::Supervised;
                    tracked.exit = None;
                    tracked.health = Some(health);
                    tracked.health_check = application.spec.health_check.clone();
                    self.events.record(
                        Some(application.id),
                        format!("{} adopted after an agent restart", tracked.launch.name),
                    );
                }
            }
            Outcome::AdoptFailed { application_id, error } => {
                tracing::info!(application = %application_id, %error, "could not adopt a recorded workload; starting it");
                if let Some(tracked) = self.workloads.get_mut(&application_id) {
                    tracked.exit = Some(ExitInfo::now(None, None));
                }
                self.wake.wake();
            }
            Outcome::Refreshed { application } => {
                let restart_health = self
                    .workloads
                    .get(&application.id)
                    .is_some_and(|tracked| tracked.health_check != application.spec.health_check);
                let health = restart_health.then(|| self.health_monitor(&application));
                if let Some(tracked) = self.workloads.get_mut(&application.id) {
                    tracked.revision = tracked.revision.max(application.revision);
                    if let Some(health) = health {
                        tracked.health = Some(health);
                        tracked.health_check = application.spec.health_check.clone();
                    }
                }
            }
            Outcome::Stopped { application_id, cause } => {
                let tracked = self.workloads.remove(&application_id);
                self.attempts.remove(&application_id);
                let name = tracked.as_ref().map(|tracked| tracked.launch.name.to_string()).unwrap_or_default();
                let why = match cause {
                    StopCause::Removed => "no longer placed on this device",
                    StopCause::Held => "quiesced for a migration",
                    StopCause::Shutdown => "the agent is shutting down",
                };
                self.events.record(Some(application_id), format!("{name} stopped: {why}"));
                let revision = self.desired.revision.or(tracked.map(|tracked| tracked.revision)).unwrap_or_default();
                self.stopped.insert(
                    application_id,
                    ApplicationStatus { application_id, revision, phase: Phase::Stopped, message: None },
                );
                while self.stopped.len() > self.config.stopped_capacity {
                    self.stopped.pop_first();
                }
            }
            Outcome::StopFailed { application_id, error } => {
                let Some(tracked) = self.workloads.get(&application_id) else { return };
                let launch = tracked.launch.clone();
                let attempts =
                    self.attempts.entry(application_id).or_insert_with(|| Attempts::new(self.config.backoff));
                let message = format!("cannot stop {}: {error}", launch.name);
                attempts.fail(now, message.clone(), launch, self.jitter.as_mut());
                self.events.record(Some(application_id), message);
            }
        }
    }

    /// Checks the workload where its driver says it listens now (a microVM's guest address
    /// is fixed while that VM runs; a new VM gets a new monitor).
    fn health_monitor(&self, application: &Application) -> HealthMonitor {
        let address = self.drivers.address(application.id);
        HealthMonitor::spawn(
            application.spec.health_check.clone(),
            address.map(|host| std::net::SocketAddr::new(host, application.spec.port)),
            self.config.health,
            self.wake.clone(),
        )
    }

    /// Lets the backoff of healthy workloads reset.
    fn note_health(&mut self, now: Instant) {
        for (application_id, tracked) in &self.workloads {
            let healthy = tracked.exit.is_none()
                && tracked.health.as_ref().is_some_and(|health| health.state() == HealthState::Healthy);
            if healthy && let Some(attempts) = self.attempts.get_mut(application_id) {
                attempts.backoff.healthy(now);
            }
        }
    }

    fn status(&self, application: &Application, now: Instant) -> ApplicationStatus {
        if self.holds.is_held(application.id) && !self.workloads.contains_key(&application.id) {
            let message = Some("stopped for a migration".to_owned());
            return ApplicationStatus {
                application_id: application.id,
                revision: application.revision,
                phase: Phase::Stopped,
                message,
            };
        }
        if let Some(mode) = self.sleeping.get(&application.id) {
            let how = match mode {
                SleepMode::Stop => "stopped",
                SleepMode::Suspend => "suspended",
            };
            let revision = self.workloads.get(&application.id).map_or(application.revision, |t| t.revision);
            let message = Some(format!("idle: {how} until the next request"));
            return ApplicationStatus { application_id: application.id, revision, phase: Phase::Sleeping, message };
        }
        let status = self.workload_status(application, now);
        // A failure while waking stays visible: the waker fails the wake on it.
        if self.sleep.state(application.id) == Some(SleepState::Waking) && status.phase != Phase::Failed {
            return ApplicationStatus { phase: Phase::Waking, message: None, ..status };
        }
        status
    }

    fn workload_status(&self, application: &Application, now: Instant) -> ApplicationStatus {
        let attempts = self.attempts.get(&application.id);
        let retry = || match attempts.and_then(|attempts| attempts.waiting(now)) {
            Some(delay) => format!("; retrying in {}", seconds(delay)),
            None => String::from("; retrying now"),
        };
        let (revision, phase, message) = match self.workloads.get(&application.id) {
            Some(tracked) => match (&tracked.exit, tracked.supervision, &tracked.health) {
                (Some(exit), _, _) => (tracked.revision, Phase::Failed, Some(format!("{exit}{}", retry()))),
                (None, Supervision::Recorded, _) | (None, Supervision::Supervised, None) => {
                    (tracked.revision, Phase::Pending, Some("found running after an agent restart".to_owned()))
                }
                (None, Supervision::Supervised, Some(health)) => match health.state() {
                    HealthState::Starting { last_error } => (tracked.revision, Phase::Starting, last_error),
                    HealthState::Healthy => (tracked.revision, Phase::Running, None),
                    HealthState::Unhealthy { message } => (tracked.revision, Phase::Unhealthy, Some(message)),
                },
            },
            None => match attempts.and_then(|attempts| attempts.last_error.as_ref()) {
                Some(error) => (application.revision, Phase::Failed, Some(format!("{error}{}", retry()))),
                None => (application.revision, Phase::Pending, None),
            },
        };
        ApplicationStatus { application_id: application.id, revision, phase, message }
    }

    fn publish(&self, now: Instant) {
        let mut applications: Vec<ApplicationStatus> =
            self.desired.applications.values().map(|application| self.status(application, now)).collect();
        // Workloads still running although no longer desired (their stop failed).
        for (application_id, tracked) in &self.workloads {
            if !self.desired.applications.contains_key(application_id) {
                let message = self.attempts.get(application_id).and_then(|attempts| attempts.last_error.clone());
                applications.push(ApplicationStatus {
                    application_id: *application_id,
                    revision: tracked.revision,
                    phase: Phase::Failed,
                    message,
                });
            }
        }
        applications.extend(self.stopped.values().cloned());
        let workloads = self
            .workloads
            .iter()
            .filter(|(_, tracked)| tracked.exit.is_none())
            .map(|(application_id, tracked)| (*application_id, tracked.handle.clone()))
            .collect();
        let report = AgentReport { applied_revision: self.applied_revision, applications, workloads };
        self.report.send_if_modified(|current| {
            if *current == report {
                false
            } else {
                *current = report;
                true
            }
        });
    }

    fn next_pass(&self, now: Instant) -> Instant {
        let requeue = now + self.config.requeue_interval;
        self.attempts
            .iter()
            .filter(|(application_id, _)| {
                self.desired.applications.contains_key(application_id) || self.workloads.contains_key(application_id)
            })
            .filter_map(|(_, attempts)| attempts.not_before)
            .filter(|at| *at > now)
            .chain(self.sleep.next_idle().map(|at| at.max(now)))
            .fold(requeue, Instant::min)
    }

    fn persisted(&self) -> PersistedState {
        PersistedState {
            desired: self.desired.clone(),
            applied_revision: self.applied_revision,
            workloads: self
                .workloads
                .iter()
                .map(|(application_id, tracked)| {
                    let record = WorkloadRecord {
                        launch: tracked.launch.clone(),
                        revision: tracked.revision,
                        handle: tracked.handle.clone(),
                    };
                    (*application_id, record)
                })
                .collect(),
            ..PersistedState::default()
        }
    }

    fn save(&mut self, persisted: &PersistedState) -> Result<(), StateError> {
        let bytes = crate::state::serialize(persisted);
        if bytes != self.last_saved {
            self.state_dir.save(persisted)?;
            self.last_saved = bytes;
        }
        Ok(())
    }

    /// Ends the reconciler: either stops every workload, or leaves them running for the next
    /// agent. The state directory is up to date afterwards either way.
    pub async fn shutdown(mut self, mode: Shutdown) {
        match mode {
            Shutdown::LeaveRunning => {
                for kind in self.drivers.kinds() {
                    if let Some(driver) = self.drivers.get(kind) {
                        driver.release_all().await;
                    }
                }
            }
            Shutdown::StopWorkloads => {
                let jobs: Vec<Job> = self
                    .workloads
                    .keys()
                    .map(|application_id| Job {
                        stop_cause: StopCause::Shutdown,
                        ..self.job(Change::Stop { application_id: *application_id })
                    })
                    .collect();
                let outcomes = futures::future::join_all(jobs.into_iter().map(|job| job.run())).await;
                for outcome in outcomes {
                    self.absorb(outcome, Instant::now());
                }
            }
        }
        self.workloads.values_mut().for_each(|tracked| tracked.health = None);
        let persisted = self.persisted();
        if let Err(error) = self.save(&persisted) {
            tracing::error!(%error, "cannot persist the agent state at shutdown");
        }
        self.publish(Instant::now());
    }

    /// Runs the reconciler in a task, reconciling whenever there is a reason to.
    pub fn spawn(self) -> ReconcilerHandle {
        let (commands, receiver) = mpsc::channel(64);
        let report = self.subscribe();
        let desired = self.watch_desired();
        let drivers = self.drivers.clone();
        let events = self.events.clone();
        let sleep = self.sleep_table();
        sleep.set_waker(Arc::new(ReconcilerWaker {
            commands: commands.downgrade(),
            report: report.clone(),
            drivers: drivers.clone(),
        }));
        sleep.set_addresses(Arc::new(drivers.clone()));
        let task = tokio::spawn(self.run(receiver));
        ReconcilerHandle { commands, report, desired, drivers, events, sleep, task }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let deadline = self.reconcile().await;
            let wake = self.wake.clone();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Update(update, reply)) => {
                        let _ = reply.send(self.update(update));
                    }
                    Some(Command::Wake(application_id, reply)) => {
                        let result = self.wake_application(application_id).await;
                        let _ = reply.send(result);
                    }
                    Some(Command::WakeFailed(application_id, reason)) => {
                        self.wake_failed(application_id, &reason).await;
                    }
                    Some(Command::Shutdown(mode, reply)) => {
                        self.shutdown(mode).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        // Everyone who could talk to the reconciler is gone: the agent is
                        // ending. Workloads keep running for the next agent.
                        self.shutdown(Shutdown::LeaveRunning).await;
                        return;
                    }
                },
                () = wake.woken() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

enum Command {
    Update(DesiredUpdate, oneshot::Sender<Result<UpdateOutcome, StateError>>),
    Shutdown(Shutdown, oneshot::Sender<()>),
    Wake(ApplicationId, oneshot::Sender<Result<Readiness, String>>),
    WakeFailed(ApplicationId, String),
}

/// What tells that a woken workload is ready.
#[derive(Debug, Clone)]
struct Readiness {
    port: u16,
    health_check: Option<HealthCheck>,
}

/// How often a waking workload is checked.
const READY_POLL: Duration = Duration::from_millis(10);

/// The reconciler's side of wakes: a command to start or resume, then polling readiness (the
/// health check, or the port accepting). It holds a weak sender, so it never keeps a
/// reconciler alive.
struct ReconcilerWaker {
    commands: mpsc::WeakSender<Command>,
    /// A workload that fails while waking fails the wake at once, not at its timeout.
    report: watch::Receiver<AgentReport>,
    /// Where the woken workload listens (a microVM's address may change with each start).
    drivers: Drivers,
}

#[async_trait::async_trait]
impl WakeWorkload for ReconcilerWaker {
    async fn wake(&self, application_id: ApplicationId) -> Result<(), String> {
        let commands = self.commands.upgrade().ok_or("the agent is shutting down")?;
        let (reply, answer) = oneshot::channel();
        commands.send(Command::Wake(application_id, reply)).await.map_err(|_| "the agent is shutting down")?;
        drop(commands);
        let readiness = answer.await.map_err(|_| "the agent is shutting down".to_owned())??;
        // The caller bounds the whole wake in time; the count bounds it here too.
        for _ in 0..60_000 {
            let ready = match self.drivers.address(application_id) {
                None => Err("no workload runs yet".to_owned()),
                Some(host) => {
                    let address = std::net::SocketAddr::new(host, readiness.port);
                    match &readiness.health_check {
                        Some(check) => crate::health::probe(check, address, Duration::from_secs(1)).await,
                        None => tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(address))
                            .await
                            .map_err(|_| format!("connecting to {address} timed out"))
                            .and_then(|connected| connected.map(drop).map_err(|error| error.to_string())),
                    }
                }
            };
            if ready.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.report.borrow().status(application_id)
                && status.phase == Phase::Failed
            {
                return Err(status.message.clone().unwrap_or_else(|| "the workload failed".to_owned()));
            }
            tokio::time::sleep(READY_POLL).await;
        }
        Err("the workload never became ready".to_owned())
    }

    fn failed(&self, application_id: ApplicationId, reason: String) {
        if let Some(commands) = self.commands.upgrade()
            && commands.try_send(Command::WakeFailed(application_id, reason)).is_err()
        {
            tracing::warn!(application = %application_id, "cannot tell the reconciler that a wake failed");
        }
    }
}

/// Talks to a running reconciler.
pub struct ReconcilerHandle {
    commands: mpsc::Sender<Command>,
    report: watch::Receiver<AgentReport>,
    desired: watch::Receiver<Arc<DesiredState>>,
    drivers: Drivers,
    events: EventLog,
    sleep: Arc<SleepTable>,
    task: JoinHandle<()>,
}

impl ReconcilerHandle {
    /// Hands a desired-state update to the reconciler; answers once it is persisted (or
    /// found stale). The workloads converge afterwards, as the report shows.
    pub async fn update(&self, update: DesiredUpdate) -> Result<UpdateOutcome, ReconcileError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Update(update, reply)).await.map_err(|_| ReconcileError::Stopped)?;
        Ok(answer.await.map_err(|_| ReconcileError::Stopped)??)
    }

    /// The latest report; changes whenever a status or the applied revision changes.
    pub fn report(&self) -> watch::Receiver<AgentReport> {
        self.report.clone()
    }

    pub fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        self.drivers.logs(application_id)
    }

    /// The desired state: what the state directory held at start, then each update taken.
    pub fn desired(&self) -> watch::Receiver<Arc<DesiredState>> {
        self.desired.clone()
    }

    pub fn events(&self) -> EventLog {
        self.events.clone()
    }

    /// The sleep table, for the proxy.
    pub fn sleep_table(&self) -> Arc<SleepTable> {
        Arc::clone(&self.sleep)
    }

    /// Ends the reconciler and waits until it has.
    pub async fn shutdown(self, mode: Shutdown) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Shutdown(mode, reply)).await.is_ok() {
            let _ = done.await;
        }
        let _ = self.task.await;
    }
}

/// The previous workload of an application that a change replaces or stops.
struct Previous {
    driver: Option<Arc<dyn Driver>>,
    handle: WorkloadHandle,
    supervision: Supervision,
    launch: LaunchSpec,
}

/// One change with everything needed to execute it, independent of the reconciler.
struct Job {
    change: Change,
    driver: Option<Arc<dyn Driver>>,
    previous: Option<Previous>,
    wake: Wake,
    stop_cause: StopCause,
    volumes: Volumes,
}

/// Why a workload is stopped, for its event.
#[derive(Debug, Clone, Copy)]
enum StopCause {
    Removed,
    Shutdown,
    /// A migration quiesced the application.
    Held,
}

enum Outcome {
    Started { application: Application, launch: LaunchSpec, handle: WorkloadHandle, reasons: Vec<RestartReason> },
    StartFailed { application: Application, launch: LaunchSpec, error: String, previous_stopped: bool },
    Adopted { application: Application },
    AdoptFailed { application_id: ApplicationId, error: String },
    Refreshed { application: Application },
    Stopped { application_id: ApplicationId, cause: StopCause },
    StopFailed { application_id: ApplicationId, error: String },
}

impl Job {
    async fn run(self) -> Outcome {
        let Job { change, driver, previous, wake, stop_cause, volumes } = self;
        match change {
            Change::Start { application } => start(application, Vec::new(), driver, previous, wake, volumes).await,
            Change::Restart { application, reasons } => {
                start(application, reasons, driver, previous, wake, volumes).await
            }
            Change::Adopt { application } => {
                let (Some(driver), Some(previous)) = (driver, previous) else {
                    return Outcome::AdoptFailed {
                        application_id: application.id,
                        error: "no driver for the recorded workload".to_owned(),
                    };
                };
                match driver.adopt(&previous.launch, &previous.handle, wake).await {
                    Ok(()) => Outcome::Adopted { application },
                    Err(error) => Outcome::AdoptFailed { application_id: application.id, error: error.to_string() },
                }
            }
            Change::Refresh { application } => Outcome::Refreshed { application },
            Change::Stop { application_id } => match stop_previous(application_id, previous, true).await {
                Ok(()) => Outcome::Stopped { application_id, cause: stop_cause },
                Err(error) => Outcome::StopFailed { application_id, error },
            },
        }
    }
}

/// Stops what runs for an application. `remove` also drops what the driver keeps for a restart
/// (logs, containers): used when the application goes away or changes kind.
async fn stop_previous(application_id: ApplicationId, previous: Option<Previous>, remove: bool) -> Result<(), String> {
    let Some(previous) = previous else { return Ok(()) };
    let Some(driver) = previous.driver else {
        return Err(format!("this agent has no {} driver to stop it with", previous.handle.kind()));
    };
    let result = match previous.supervision {
        Supervision::Supervised if remove => driver.remove(application_id).await,
        Supervision::Supervised => driver.stop(application_id).await,
        Supervision::Recorded => match driver.stop_recorded(&previous.handle).await {
            Ok(()) if remove => driver.remove(application_id).await,
            other => other,
        },
    };
    result.map_err(|error| error.to_string())
}

async fn start(
    application: Application,
    reasons: Vec<RestartReason>,
    driver: Option<Arc<dyn Driver>>,
    previous: Option<Previous>,
    wake: Wake,
    volumes: Volumes,
) -> Outcome {
    let launch = LaunchSpec::from_application(&application);
    let had_previous = previous.is_some();
    let kind_changed = previous.as_ref().is_some_and(|previous| previous.handle.kind() != launch.kind());
    if let Err(error) = stop_previous(application.id, previous, kind_changed).await {
        return Outcome::StartFailed {
            application,
            launch,
            error: format!("cannot stop the previous workload: {error}"),
            previous_stopped: false,
        };
    }
    let Some(driver) = driver else {
        let error = format!("this agent cannot run {} workloads", launch.kind());
        return Outcome::StartFailed { application, launch, error, previous_stopped: had_previous };
    };
    // Volumes exist (and are mounted, but on a cloud host) before the workload starts; data
    // of earlier runs is kept.
    if let Err(error) = volumes.provision(application.id, &launch.volumes).await {
        return Outcome::StartFailed { application, launch, error: error.to_string(), previous_stopped: had_previous };
    }
    match driver.start(&launch, wake).await {
        Ok(handle) => Outcome::Started { application, launch, handle, reasons },
        Err(error) => {
            Outcome::StartFailed { application, launch, error: error.to_string(), previous_stopped: had_previous }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::driver::{DriverError, Program, WorkloadStatus};
    use crate::reconcile::plan::tests::application;

    /// A driver without processes: starting a workload whose script is `fail` fails, anything
    /// else "runs" until the test says it exited.
    #[derive(Default)]
    struct FakeDriver {
        starts: Mutex<Vec<ApplicationId>>,
        running: Mutex<BTreeMap<ApplicationId, WorkloadStatus>>,
    }

    impl FakeDriver {
        fn starts(&self, application_id: ApplicationId) -> usize {
            self.starts.lock().expect("not poisoned").iter().filter(|id| **id == application_id).count()
        }

        fn exit(&self, application_id: ApplicationId, code: i32) {
            self.running
                .lock()
                .expect("not poisoned")
                .insert(application_id, WorkloadStatus::Exited(ExitInfo::now(Some(code), None)));
        }
    }

    #[async_trait::async_trait]
    impl Driver for FakeDriver {
        fn kind(&self) -> WorkloadKind {
            WorkloadKind::Process
        }

        async fn start(&self, launch: &LaunchSpec, _wake: Wake) -> Result<WorkloadHandle, DriverError> {
            self.starts.lock().expect("not poisoned").push(launch.application_id);
            if let Program::Process { args, .. } = &launch.program
                && args.last().map(String::as_str) == Some("fail")
            {
                return Err(DriverError::Spawn { command: "fail".into(), source: std::io::Error::other("refused") });
            }
            let handle = WorkloadHandle::Process { pid: 1000, start_time: 1 };
            self.running
                .lock()
                .expect("not poisoned")
                .insert(launch.application_id, WorkloadStatus::Running { handle: handle.clone() });
            Ok(handle)
        }

        async fn adopt(&self, _: &LaunchSpec, _: &WorkloadHandle, _: Wake) -> Result<(), DriverError> {
            Err(DriverError::NotRunning)
        }

        async fn probe(&self, _: &WorkloadHandle) -> Result<bool, DriverError> {
            Ok(false)
        }

        async fn stop(&self, application_id: ApplicationId) -> Result<(), DriverError> {
            self.running.lock().expect("not poisoned").remove(&application_id);
            Ok(())
        }

        async fn stop_recorded(&self, _: &WorkloadHandle) -> Result<(), DriverError> {
            Ok(())
        }

        async fn remove(&self, application_id: ApplicationId) -> Result<(), DriverError> {
            self.stop(application_id).await
        }

        async fn release_all(&self) {}

        fn status(&self, application_id: ApplicationId) -> WorkloadStatus {
            self.running.lock().expect("not poisoned").get(&application_id).cloned().unwrap_or(WorkloadStatus::Absent)
        }

        fn logs(&self, _: ApplicationId) -> Option<LogBuffer> {
            None
        }
    }

    struct WholeCeiling;

    impl Jitter for WholeCeiling {
        fn pick(&mut self, ceiling: Duration) -> Duration {
            ceiling
        }
    }

    fn reconciler(dir: &std::path::Path, driver: Arc<FakeDriver>) -> Reconciler {
        let config = ReconcilerConfig {
            backoff: BackoffPolicy {
                initial: Duration::from_millis(300),
                max: Duration::from_secs(10),
                reset_after: Duration::from_secs(5),
            },
            ..ReconcilerConfig::default()
        };
        let state_dir = StateDir::open(dir).expect("state dir");
        Reconciler::new(config, state_dir, Drivers::new([driver as Arc<dyn Driver>]))
            .expect("reconciler")
            .with_jitter(WholeCeiling)
    }

    fn phase(reconciler: &Reconciler, application_id: ApplicationId) -> (Phase, Option<String>) {
        let report = reconciler.subscribe().borrow().clone();
        let status = report.status(application_id).expect("a status");
        (status.phase, status.message.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_application_backs_off_alone_and_a_new_spec_goes_at_once() {
        let temp = tempfile::tempdir().expect("temp dir");
        let driver = Arc::new(FakeDriver::default());
        let mut reconciler = reconciler(temp.path(), Arc::clone(&driver));
        let good = application("good", 1, "serve");
        let bad = application("bad", 1, "fail");
        reconciler.update(DesiredUpdate::full(1, vec![good.clone(), bad.clone()])).expect("taken");

        let next = reconciler.reconcile().await;
        assert_eq!((driver.starts(good.id), driver.starts(bad.id)), (1, 1));
        assert_eq!(phase(&reconciler, good.id).0, Phase::Running);
        assert_eq!(
            phase(&reconciler, bad.id),
            (Phase::Failed, Some("cannot start \"fail\": refused; retrying in 0.3s".into()))
        );
        assert_eq!(reconciler.subscribe().borrow().applied_revision, Some(1));
        assert!(next <= Instant::now() + Duration::from_millis(300), "requeued for the end of the backoff");

        // Before the backoff ends, nothing is retried however often the reconciler runs.
        reconciler.reconcile().await;
        tokio::time::advance(Duration::from_millis(299)).await;
        reconciler.reconcile().await;
        assert_eq!(driver.starts(bad.id), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        reconciler.reconcile().await;
        assert_eq!(driver.starts(bad.id), 2);
        assert_eq!(phase(&reconciler, bad.id).1.as_deref(), Some("cannot start \"fail\": refused; retrying in 0.6s"));
        assert_eq!(driver.starts(good.id), 1, "the healthy application was left alone");

        // A fixed spec is not held back by the backoff of the broken one.
        let fixed = application("bad", 2, "serve");
        reconciler.update(DesiredUpdate::full(2, vec![good.clone(), fixed.clone()])).expect("taken");
        reconciler.reconcile().await;
        assert_eq!(driver.starts(bad.id), 3);
        assert_eq!(phase(&reconciler, bad.id).0, Phase::Running);
        assert_eq!(reconciler.subscribe().borrow().applied_revision, Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn exits_back_off_and_the_count_resets_after_a_healthy_period() {
        let temp = tempfile::tempdir().expect("temp dir");
        let driver = Arc::new(FakeDriver::default());
        let mut reconciler = reconciler(temp.path(), Arc::clone(&driver));
        let app = application("crashy", 1, "serve");
        reconciler.update(DesiredUpdate::full(1, vec![app.clone()])).expect("taken");
        reconciler.reconcile().await;

        for (attempt, delay) in [(2, 300), (3, 600), (4, 1200)] {
            driver.exit(app.id, 1);
            reconciler.reconcile().await;
            assert_eq!(phase(&reconciler, app.id).0, Phase::Failed);
            tokio::time::advance(Duration::from_millis(delay)).await;
            reconciler.reconcile().await;
            assert_eq!(driver.starts(app.id), attempt, "restarted after {delay} ms");
        }

        // Healthy for the reset period: the next crash starts over at the first delay.
        reconciler.reconcile().await;
        tokio::time::advance(Duration::from_secs(5)).await;
        reconciler.reconcile().await;
        driver.exit(app.id, 1);
        reconciler.reconcile().await;
        let message = phase(&reconciler, app.id).1.unwrap_or_default();
        assert_eq!(message, "exited with status 1; retrying in 0.3s");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_application_sleeps_and_is_not_restarted_while_asleep() {
        let temp = tempfile::tempdir().expect("temp dir");
        let driver = Arc::new(FakeDriver::default());
        let mut reconciler = reconciler(temp.path(), Arc::clone(&driver));
        let mut app = application("sleepy", 1, "serve");
        app.spec.sleep = Some(edgible::model::SleepPolicy {
            idle_timeout_seconds: 10,
            mode: SleepMode::Suspend,
            wake_timeout_seconds: 5,
        });
        reconciler.update(DesiredUpdate::full(1, vec![app.clone()])).expect("taken");
        reconciler.reconcile().await;
        assert_eq!(driver.starts(app.id), 1);
        tokio::time::advance(Duration::from_secs(9)).await;
        let next = reconciler.reconcile().await;
        assert_eq!(phase(&reconciler, app.id).0, Phase::Running);
        assert!(next <= Instant::now() + Duration::from_secs(1), "the next pass is due when it becomes idle");

        tokio::time::advance(Duration::from_secs(1)).await;
        reconciler.reconcile().await;
        // The fake driver cannot suspend: stopped instead, with an event saying so.
        assert_eq!(phase(&reconciler, app.id).0, Phase::Sleeping);
        assert_eq!(driver.status(app.id), WorkloadStatus::Absent);
        let events: Vec<String> = reconciler.events().snapshot().into_iter().map(|event| event.message).collect();
        assert!(events.iter().any(|message| message.contains("cannot be suspended")), "{events:?}");
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(60)).await;
            reconciler.reconcile().await;
        }
        assert_eq!(driver.starts(app.id), 1, "nothing restarts a sleeping application");
        assert_eq!(phase(&reconciler, app.id).0, Phase::Sleeping);

        // Without its policy it runs again.
        let mut awake = app.clone();
        awake.revision = 2;
        awake.spec.sleep = None;
        reconciler.update(DesiredUpdate::full(2, vec![awake])).expect("taken");
        reconciler.reconcile().await;
        assert_eq!(driver.starts(app.id), 2);
        assert_eq!(phase(&reconciler, app.id).0, Phase::Running);
    }

    #[tokio::test]
    async fn a_second_reconciler_on_the_same_directory_is_refused() {
        let temp = tempfile::tempdir().expect("temp dir");
        let first = reconciler(temp.path(), Arc::default());
        let second = Reconciler::new(
            ReconcilerConfig::default(),
            StateDir::open(temp.path()).expect("state dir"),
            Drivers::default(),
        );
        assert!(matches!(second, Err(StateError::Locked(_))));
        drop(first);
        assert!(
            Reconciler::new(ReconcilerConfig::default(), StateDir::open(temp.path()).expect("dir"), Drivers::default())
                .is_ok()
        );
    }
}
