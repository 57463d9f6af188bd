//! Workload drivers: the one place that knows how a kind of workload is started, watched,
//! stopped and found again after an agent restart.
//!
//! The reconciler talks to drivers only through [`Driver`]. A driver supervises the workloads it
//! started or adopted, keyed by application, and wakes the reconciler when one exits; it never
//! restarts anything by itself, so that every restart goes through the reconciler's plan and its
//! per-application backoff.

pub mod container;
pub mod process;
pub mod vm;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use edgible::model::{Application, ApplicationId, Name, Resources, Volume, Workload};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::logs::LogBuffer;

pub use container::{ContainerDriver, ContainerDriverConfig};
pub use process::{ProcessDriver, ProcessDriverConfig};
pub use vm::{VmDriver, VmDriverConfig};

/// The kinds of workload an application can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    Process,
    Container,
    Vm,
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadKind::Process => "process",
            WorkloadKind::Container => "container",
            WorkloadKind::Vm => "vm",
        })
    }
}

/// What is executed, without its environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Program {
    Process { command: String, args: Vec<String>, working_dir: Option<String> },
    Container { image: String, ports: Vec<u16> },
    Vm { kernel: Option<String>, rootfs: Option<String>, image: Option<String> },
}

impl Program {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Program::Process { .. } => WorkloadKind::Process,
            Program::Container { .. } => WorkloadKind::Container,
            Program::Vm { .. } => WorkloadKind::Vm,
        }
    }
}

/// Everything a driver needs to start an application's workload. Two launch specs that are
/// equal start the same workload; any difference calls for a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub application_id: ApplicationId,
    pub name: Name,
    pub program: Program,
    /// The port the workload listens on, also given to it as `PORT`.
    pub port: u16,
    /// The environment: the application's, then the workload's (which wins), then `PORT`.
    pub env: BTreeMap<String, String>,
    /// The application's CPU and memory limits; the VM driver sizes its guests by them.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// The application's volumes (`spec.storage`), in spec order. The reconciler provisions
    /// them before a start ([`crate::volumes`]); the process driver names their mount points in
    /// `EDGIBLE_VOLUME_<NAME>`, the container driver bind-mounts them, the VM driver attaches
    /// their images.
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

impl LaunchSpec {
    pub fn from_application(application: &Application) -> Self {
        let spec = &application.spec;
        let mut env: BTreeMap<String, String> =
            spec.env.iter().map(|(name, value)| (name.as_str().to_owned(), value.clone())).collect();
        let (program, workload_env) = match &spec.workload {
            Workload::Process(process) => (
                Program::Process {
                    command: process.command.clone(),
                    args: process.args.clone(),
                    working_dir: process.working_dir.as_ref().map(|dir| dir.as_str().to_owned()),
                },
                Some(&process.env),
            ),
            Workload::Container(container) => (
                Program::Container { image: container.image.clone(), ports: container.ports.clone() },
                Some(&container.env),
            ),
            Workload::Vm(vm) => {
                (Program::Vm { kernel: vm.kernel.clone(), rootfs: vm.rootfs.clone(), image: vm.image.clone() }, None)
            }
        };
        for (name, value) in workload_env.into_iter().flatten() {
            env.insert(name.as_str().to_owned(), value.clone());
        }
        // The agent owns PORT: the proxy forwards to this port whatever the environment says.
        env.insert("PORT".to_owned(), spec.port.to_string());
        Self {
            application_id: application.id,
            name: spec.name.clone(),
            program,
            port: spec.port,
            env,
            resources: spec.resources.clone(),
            volumes: spec.storage.clone(),
        }
    }

    pub fn kind(&self) -> WorkloadKind {
        self.program.kind()
    }
}

/// How to find a running workload again, persisted in the agent's state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkloadHandle {
    /// A process group led by `pid`. `start_time` (clock ticks after boot, from
    /// `/proc/PID/stat`) tells the process apart from a later one that reuses the pid.
    Process {
        pid: i32,
        start_time: u64,
    },
    Container {
        id: String,
    },
    /// A microVM (the `vm` driver of a cloud host) running a workload of kind `runs`: its QEMU
    /// process (pid and start time, like a process), its QMP socket and its network slot.
    Vm {
        runs: WorkloadKind,
        pid: i32,
        start_time: u64,
        control: String,
        slot: u32,
    },
}

impl WorkloadHandle {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            WorkloadHandle::Process { .. } => WorkloadKind::Process,
            WorkloadHandle::Container { .. } => WorkloadKind::Container,
            // On a cloud host the VM driver serves the kinds it runs in VMs, so the reconciler
            // finds it, and compares kinds, by the kind of workload inside.
            WorkloadHandle::Vm { runs, .. } => *runs,
        }
    }
}

/// How a workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit status, when the workload exited by itself and the agent could see it.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    pub at: DateTime<Utc>,
}

impl ExitInfo {
    pub fn now(code: Option<i32>, signal: Option<i32>) -> Self {
        Self { code, signal, at: Utc::now() }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with status {code}"),
            (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by signal {signal} ({name})"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            (None, None) => f.write_str("exited (status unknown)"),
        }
    }
}

/// What a driver knows about an application's workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadStatus {
    /// The driver supervises nothing for this application.
    Absent,
    Running {
        handle: WorkloadHandle,
    },
    Exited(ExitInfo),
}

/// Wakes the reconciler, for example when a workload exits. Wakes coalesce: many wakes before
/// the reconciler looks cause one pass.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub async fn woken(&self) {
        self.0.notified().await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot start {command:?}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("this driver runs {supported} workloads, not {requested}")]
    WrongKind { supported: WorkloadKind, requested: WorkloadKind },
    #[error("the workload is still running")]
    AlreadyRunning,
    #[error("the recorded workload is no longer running")]
    NotRunning,
    #[error("cannot signal process group {pgid}: {source}")]
    Signal { pgid: i32, source: nix::Error },
    #[error("processes of group {pgid} still run {waited:?} after SIGKILL")]
    StopTimedOut { pgid: i32, waited: Duration },
    #[error("log file {path}: {source}")]
    LogFile { path: String, source: std::io::Error },
    #[error("cannot read the state of process {pid}: {source}")]
    Proc { pid: i32, source: std::io::Error },
    #[error("container engine: cannot {action}: {source}")]
    Engine { action: &'static str, source: Box<bollard::errors::Error> },
    #[error("microVM: {0}")]
    Vm(Box<vm::VmError>),
    #[error("{0}")]
    Volume(String),
    #[error("{kind} workloads cannot {action}")]
    Unsupported { kind: WorkloadKind, action: &'static str },
}

/// A way of running workloads of one kind.
#[async_trait::async_trait]
pub trait Driver: Send + Sync {
    /// The kind of workload this driver runs.
    fn kind(&self) -> WorkloadKind;

    /// Starts the workload and supervises it; `wake` is woken when it exits. Fails with
    /// [`DriverError::AlreadyRunning`] if the application's workload still runs.
    async fn start(&self, launch: &LaunchSpec, wake: Wake) -> Result<WorkloadHandle, DriverError>;

    /// Takes over a workload that a previous agent started, if `handle` still designates it.
    /// Fails with [`DriverError::NotRunning`] otherwise.
    async fn adopt(&self, launch: &LaunchSpec, handle: &WorkloadHandle, wake: Wake) -> Result<(), DriverError>;

    /// Whether a recorded workload that this driver does not supervise still runs.
    async fn probe(&self, handle: &WorkloadHandle) -> Result<bool, DriverError>;

    /// Stops the application's supervised workload, keeping what a restart reuses (its logs).
    async fn stop(&self, application_id: ApplicationId) -> Result<(), DriverError>;

    /// Stops a recorded workload that this driver does not supervise, and whatever it left.
    async fn stop_recorded(&self, handle: &WorkloadHandle) -> Result<(), DriverError>;

    /// Stops the application's workload and removes everything the driver keeps for it.
    async fn remove(&self, application_id: ApplicationId) -> Result<(), DriverError>;

    /// Stops supervising every workload without stopping any, so that the next agent can
    /// adopt them.
    async fn release_all(&self);

    fn status(&self, application_id: ApplicationId) -> WorkloadStatus;

    /// The address the application's workload listens on (at its port), while this driver
    /// runs it: `127.0.0.1` for a process or a container, the guest's address for a microVM.
    /// `None` when the driver runs nothing for the application. The proxy, the health checks
    /// and wake readiness reach workloads here.
    fn address(&self, application_id: ApplicationId) -> Option<std::net::IpAddr> {
        matches!(self.status(application_id), WorkloadStatus::Running { .. })
            .then_some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }

    /// Keeps the application's running workload in memory but stops it from running (the
    /// `suspend` sleep mode): a frozen process group, a paused and snapshotted microVM. It
    /// stays supervised, and its status stays `Running`.
    async fn suspend(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let _ = application_id;
        Err(DriverError::Unsupported { kind: self.kind(), action: "be suspended" })
    }

    /// Lets a suspended workload run again.
    async fn resume(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let _ = application_id;
        Err(DriverError::Unsupported { kind: self.kind(), action: "be resumed" })
    }

    /// The application's recent output, while the driver knows the application.
    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer>;

    /// Whether this driver can run `launch` here, changing nothing that runs (a migration's
    /// preflight). The container driver makes sure the image is present, pulling it if needed.
    async fn preflight(&self, launch: &LaunchSpec) -> Result<(), DriverError> {
        let _ = launch;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn application(spec: serde_json::Value) -> Application {
        serde_json::from_value(json!({
            "id": ApplicationId::new(),
            "organization_id": edgible::model::OrganizationId::new(),
            "revision": 7,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
            "spec": spec,
        }))
        .expect("a valid application")
    }

    #[test]
    fn workload_env_wins_over_application_env_and_port_wins_over_both() {
        let application = application(json!({
            "name": "web",
            "hostnames": ["web.example.test"],
            "port": 8080,
            "env": {"A": "app", "B": "app", "PORT": "1"},
            "workload": {"process": {"command": "/bin/web", "args": ["-v"], "env": {"B": "workload", "C": "workload"}}},
        }));
        let launch = LaunchSpec::from_application(&application);
        let env: Vec<(&str, &str)> = launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env, [("A", "app"), ("B", "workload"), ("C", "workload"), ("PORT", "8080")]);
        assert_eq!(
            launch.program,
            Program::Process { command: "/bin/web".into(), args: vec!["-v".into()], working_dir: None }
        );
        assert_eq!(launch.kind(), WorkloadKind::Process);
    }

    #[test]
    fn exits_describe_themselves() {
        assert_eq!(ExitInfo::now(Some(3), None).to_string(), "exited with status 3");
        assert_eq!(ExitInfo::now(None, Some(9)).to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(ExitInfo::now(None, None).to_string(), "exited (status unknown)");
    }

    #[test]
    fn handles_persist_with_their_kind() {
        let handle = WorkloadHandle::Process { pid: 12, start_time: 345 };
        let value = serde_json::to_value(&handle).expect("serializable");
        assert_eq!(value, json!({"kind": "process", "pid": 12, "start_time": 345}));
        assert_eq!(serde_json::from_value::<WorkloadHandle>(value).expect("round trip"), handle);
    }
}
