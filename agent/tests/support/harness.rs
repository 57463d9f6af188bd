//! Shared by the agent's integration tests: a temporary state directory with agents on it,
//! applications, and bounded waits for conditions.
//!
//! Not every test binary uses every helper.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use edgible::model::{Application, ApplicationId, Revision};
use edgible::protocol::v1::{Phase, Stream};
use edgible_agent::backoff::{BackoffPolicy, Jitter};
use edgible_agent::driver::process::{Liveness, ProcessIdentity};
use edgible_agent::driver::{Driver, ProcessDriver, ProcessDriverConfig, WorkloadHandle};
use edgible_agent::health::HealthConfig;
use edgible_agent::reconcile::{AgentReport, Drivers, Reconciler, ReconcilerConfig, ReconcilerHandle};
use edgible_agent::state::StateDir;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

/// The longest any condition in these tests may take to come true.
pub const WAIT: Duration = Duration::from_secs(30);

/// A temporary state directory and the agents started on it. Dropping it kills every process
/// group and removes every container the state directory records, so that a failed test
/// leaves nothing behind.
pub struct Harness {
    temp: tempfile::TempDir,
    extra_pids: Mutex<Vec<i32>>,
}

impl Harness {
    pub fn new() -> Self {
        Self { temp: tempfile::tempdir().expect("a temporary directory"), extra_pids: Mutex::default() }
    }

    pub fn state_path(&self) -> PathBuf {
        self.temp.path().join("state")
    }

    /// A directory for files the workloads write.
    pub fn work_dir(&self) -> PathBuf {
        let dir = self.temp.path().join("work");
        std::fs::create_dir_all(&dir).expect("work dir");
        dir
    }

    pub fn config() -> ReconcilerConfig {
        ReconcilerConfig {
            requeue_interval: Duration::from_secs(2),
            backoff: BackoffPolicy {
                initial: Duration::from_millis(300),
                max: Duration::from_secs(5),
                reset_after: Duration::from_secs(60),
            },
            health: HealthConfig { starting_interval: Duration::from_millis(50) },
            ..ReconcilerConfig::default()
        }
    }

    pub fn process_config(&self) -> ProcessDriverConfig {
        let mut config = ProcessDriverConfig::new(self.state_path().join("logs"));
        config.stop_grace = Duration::from_secs(3);
        config.poll_interval = Duration::from_millis(20);
        config
    }

    pub fn reconciler(&self, drivers: Vec<Arc<dyn Driver>>) -> Result<Reconciler> {
        let state_dir = StateDir::open(self.state_path())?;
        Ok(Reconciler::new(Self::config(), state_dir, Drivers::new(drivers))?)
    }

    pub fn process_reconciler(&self, config: ProcessDriverConfig) -> Result<Reconciler> {
        self.reconciler(vec![Arc::new(ProcessDriver::new(config))])
    }

    /// An agent with the process driver, running.
    pub fn agent(&self) -> Result<ReconcilerHandle> {
        Ok(self.process_reconciler(self.process_config())?.spawn())
    }

    pub fn remember_pid(&self, pid: i32) {
        self.extra_pids.lock().expect("not poisoned").push(pid);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Ok(state) = StateDir::open(self.state_path()).and_then(|dir| dir.load()) {
            for record in state.workloads.values() {
                match &record.handle {
                    WorkloadHandle::Process { pid, start_time } => {
                        let identity = ProcessIdentity { pid: *pid, start_time: *start_time };
                        if identity.liveness().ok() != Some(Liveness::Gone) {
                            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
                        }
                    }
                    WorkloadHandle::Container { id } => {
                        let _ = std::process::Command::new("docker")
                            .args(["rm", "--force", id])
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null())
                            .status();
                    }
                    WorkloadHandle::Vm { pid, start_time, .. } => {
                        let identity = ProcessIdentity { pid: *pid, start_time: *start_time };
                        if identity.liveness().ok() != Some(Liveness::Gone) {
                            let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
                        }
                    }
                }
            }
        }
        for pid in self.extra_pids.lock().map(|pids| pids.clone()).unwrap_or_default() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// An application with a fixed id per name, so that tests can build its next versions.
pub fn application(name: &str, revision: Revision, spec: serde_json::Value) -> Application {
    let mut spec = spec;
    spec["name"] = json!(name);
    spec["hostnames"] = json!([format!("{name}.example.test")]);
    if spec.get("port").is_none() {
        spec["port"] = json!(8080);
    }
    let id_suffix: u64 = name.bytes().fold(7, |sum, byte| sum.wrapping_mul(31).wrapping_add(u64::from(byte)));
    serde_json::from_value(json!({
        "id": format!("00000000-0000-7000-8000-{:012x}", id_suffix & 0xffff_ffff_ffff),
        "organization_id": "00000000-0000-7000-8000-000000000001",
        "revision": revision,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "spec": spec,
    }))
    .expect("a valid application")
}

/// An application running `/bin/sh -c script`.
pub fn shell(name: &str, revision: Revision, script: &str) -> Application {
    application(name, revision, json!({"workload": {"process": {"command": "/bin/sh", "args": ["-c", script]}}}))
}

/// The real interpreter behind `python3` (which may be a shim script).
pub fn python() -> Result<String> {
    let output = std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output()?;
    if !output.status.success() {
        bail!("python3 is not usable: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `check` answers something for the latest report.
pub async fn wait_report<T>(
    report: &mut watch::Receiver<AgentReport>,
    what: &str,
    mut check: impl FnMut(&AgentReport) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check(&report.borrow_and_update()) {
            return Ok(value);
        }
        match tokio::time::timeout_at(deadline, report.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the reconciler ended while waiting for {what}"),
            Err(_) => bail!("timed out after {WAIT:?} waiting for {what}; last report: {:#?}", *report.borrow()),
        }
    }
}

/// Waits until the application is in `phase` at `revision` and answers its workload (absent
/// once stopped).
pub async fn wait_workload(
    report: &mut watch::Receiver<AgentReport>,
    application_id: ApplicationId,
    revision: Revision,
    phase: Phase,
) -> Result<Option<WorkloadHandle>> {
    wait_report(report, &format!("{application_id} {phase:?} at revision {revision}"), |report| {
        let status = report.status(application_id)?;
        if status.phase != phase || status.revision != revision {
            return None;
        }
        match report.workloads.get(&application_id) {
            Some(handle) => Some(Some(handle.clone())),
            None if phase == Phase::Stopped => Some(None),
            None => None,
        }
    })
    .await
}

/// Waits until the application is in `phase` at `revision` and answers its process id.
pub async fn wait_phase(
    report: &mut watch::Receiver<AgentReport>,
    application_id: ApplicationId,
    revision: Revision,
    phase: Phase,
) -> Result<i32> {
    match wait_workload(report, application_id, revision, phase).await? {
        Some(WorkloadHandle::Process { pid, .. }) => Ok(pid),
        None => Ok(0),
        Some(other) => bail!("not a process: {other:?}"),
    }
}

/// Waits until the application runs in a different workload than `previous`, and answers it.
pub async fn wait_replaced(
    report: &mut watch::Receiver<AgentReport>,
    application_id: ApplicationId,
    previous: &WorkloadHandle,
) -> Result<WorkloadHandle> {
    wait_report(report, "a replacement workload", |report| {
        let status = report.status(application_id)?;
        let handle = report.workloads.get(&application_id)?;
        (handle != previous && status.phase == Phase::Running).then(|| handle.clone())
    })
    .await
}

/// Polls a condition that no report announces (a file, a process), for a bounded time.
pub async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| !matches!(state, Some('Z' | 'X')))
}

pub fn environment(pid: i32) -> Result<BTreeSet<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(bytes
        .split(|byte| *byte == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect())
}

pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub fn log_texts(agent: &ReconcilerHandle, application_id: ApplicationId) -> Vec<(Stream, String)> {
    agent
        .logs(application_id)
        .map(|logs| logs.snapshot())
        .unwrap_or_default()
        .into_iter()
        .map(|line| (line.stream, line.line))
        .collect()
}

pub fn event_messages(agent: &ReconcilerHandle) -> Vec<String> {
    agent.events().snapshot().into_iter().map(|event| event.message).collect()
}

/// Picks the largest delay every time, so that backoff delays are predictable.
pub struct WholeCeiling;

impl Jitter for WholeCeiling {
    fn pick(&mut self, ceiling: Duration) -> Duration {
        ceiling
    }
}
