//! The `container` driver: runs a workload as a container through the Docker Engine API, which
//! Podman serves too.
//!
//! - Each run is a fresh container named `{name_prefix}{application id}` and labelled with the
//!   application, created from the image (pulled if it is not there), started, and removed
//!   when stopped. The engine never restarts it: restarts go through the reconciler.
//! - The application's `port` and every port in `ports` are published on 127.0.0.1 only, at
//!   the same number: the device's proxy and health checks reach the workload there, and
//!   nothing else can.
//! - Stopping asks the engine to stop with the grace period (SIGTERM, then SIGKILL), which
//!   covers every process in the container; with `init`, PID 1 is the engine's init, so the
//!   workload gets the SIGTERM even if it installs no handler.
//! - Output comes from the engine's log stream into a bounded [`LogBuffer`]; exits from its
//!   wait endpoint (with an inspect as fallback when that connection breaks).
//! - A recorded container is adopted when it still runs and carries the application's label.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use edgible::model::ApplicationId;
use edgible::protocol::v1::Stream;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::{Driver, DriverError, ExitInfo, LaunchSpec, Program, Wake, WorkloadHandle, WorkloadKind, WorkloadStatus};
use crate::logs::{LineSplitter, LogBuffer, LogLimits};
use crate::tasks::AbortOnDrop;

/// The label that ties a container to its application.
pub const APPLICATION_LABEL: &str = "io.edgible.application";

#[derive(Debug, Clone)]
pub struct ContainerDriverConfig {
    /// The engine's API socket (`/var/run/docker.sock`, or Podman's).
    pub socket: PathBuf,
    /// How long a container may take to exit after SIGTERM before the engine kills it.
    pub stop_grace: Duration,
    /// Containers are named this followed by the application id.
    pub name_prefix: String,
    pub log_limits: LogLimits,
    /// The longest an engine request may take to answer (pulls excepted).
    pub request_timeout: Duration,
    /// Run the engine's init (docker-init, catatonit) as PID 1 of each container, so that
    /// SIGTERM reaches workloads that do not handle signals and zombies are reaped.
    pub init: bool,
    /// Where the volumes of applications are mounted on the host (`<state_dir>/volumes`, see
    /// [`crate::volumes`]); each is bind-mounted into the container at its `mount_path`.
    /// `None`: applications with volumes cannot run in containers.
    pub volumes_dir: Option<PathBuf>,
}

impl Default for ContainerDriverConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            stop_grace: Duration::from_secs(10),
            name_prefix: "edgible-".to_owned(),
            log_limits: LogLimits::default(),
            request_timeout: Duration::from_secs(120),
            init: true,
            volumes_dir: None,
        }
    }
}

pub struct ContainerDriver {
    docker: Docker,
    config: ContainerDriverConfig,
    apps: Mutex<HashMap<ApplicationId, AppEntry>>,
}

struct AppEntry {
    logs: LogBuffer,
    instance: Option<Instance>,
}

struct Instance {
    id: String,
    exit: watch::Receiver<Option<ExitInfo>>,
    _monitor: AbortOnDrop,
    log_follower: AbortOnDrop,
}

fn engine(action: &'static str) -> impl FnOnce(EngineError) -> DriverError {
    move |source| DriverError::Engine { action, source: Box::new(source) }
}

fn is_status(error: &EngineError, status: u16) -> bool {
    matches!(error, EngineError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

impl ContainerDriver {
    /// Connects to the engine and agrees on an API version it speaks.
    pub async fn connect(config: ContainerDriverConfig) -> Result<Self, DriverError> {
        let socket = config.socket.to_string_lossy().into_owned();
        let docker =
            Docker::connect_with_unix(&socket, config.request_timeout.as_secs().max(1), bollard::API_DEFAULT_VERSION)
                .map_err(engine("connect to the engine"))?;
        let docker = docker.negotiate_version().await.map_err(engine("agree on an API version"))?;
        docker.ping().await.map_err(engine("reach the engine"))?;
        Ok(Self { docker, config, apps: Mutex::new(HashMap::new()) })
    }

    fn apps(&self) -> MutexGuard<'_, HashMap<ApplicationId, AppEntry>> {
        // Nothing panics while holding this lock except on a bug; the map is still coherent.
        self.apps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bind mounts of the application's volumes (`HOST:MOUNT_PATH`, like `docker -v`).
    fn binds(&self, launch: &LaunchSpec) -> Result<Option<Vec<String>>, DriverError> {
        if launch.volumes.is_empty() {
            return Ok(None);
        }
        let Some(root) = &self.config.volumes_dir else {
            return Err(DriverError::Volume("this agent has no volume directory for containers".to_owned()));
        };
        let binds = launch
            .volumes
            .iter()
            .map(|volume| {
                let host = crate::volumes::mount_dir(root, launch.application_id, volume.name.as_str());
                format!("{}:{}", host.display(), volume.mount_path.as_str())
            })
            .collect();
        Ok(Some(binds))
    }

    fn container_name(&self, application_id: ApplicationId) -> String {
        format!("{}{application_id}", self.config.name_prefix)
    }

    fn ensure_entry(&self, application_id: ApplicationId) -> LogBuffer {
        self.apps()
            .entry(application_id)
            .or_insert_with(|| AppEntry { logs: LogBuffer::new(self.config.log_limits), instance: None })
            .logs
            .clone()
    }

    /// Pulls the image unless the engine already has it.
    async fn ensure_image(&self, image: &str) -> Result<(), DriverError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(error) if is_status(&error, 404) => {}
            Err(error) => return Err(engine("inspect the image")(error)),
        }
        tracing::info!(image, "pulling image");
        let options = CreateImageOptions { from_image: Some(image.to_owned()), ..Default::default() };
        self.docker
            .create_image(Some(options), None, None)
            .try_collect::<Vec<_>>()
            .await
            .map_err(engine("pull the image"))?;
        Ok(())
    }

    /// Stops and removes a container, whatever state it is in; a missing one is fine.
    async fn stop_and_remove(&self, id: &str) -> Result<(), DriverError> {
        let grace = i32::try_from(self.config.stop_grace.as_secs()).unwrap_or(i32::MAX);
        match self.docker.stop_container(id, Some(StopContainerOptions { t: Some(grace), signal: None })).await {
            Ok(()) => {}
            // 304: already stopped; 404: already gone.
            Err(error) if is_status(&error, 304) || is_status(&error, 404) => {}
            Err(error) => return Err(engine("stop the container")(error)),
        }
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if is_status(&error, 404) || is_status(&error, 409) => Ok(()),
            Err(error) => Err(engine("remove the container")(error)),
        }
    }

    fn install(&self, application_id: ApplicationId, id: String, logs: LogBuffer, since: i32, wake: Wake) {
        let (exit_sender, exit) = watch::channel(None);
        let monitor = tokio::spawn(monitor_container(self.docker.clone(), id.clone(), exit_sender, wake));
        let follower = tokio::spawn(follow_logs(
            self.docker.clone(),
            id.clone(),
            since,
            logs,
            self.config.log_limits.max_line_bytes,
        ));
        let instance =
            Instance { id, exit, _monitor: AbortOnDrop::new(monitor), log_follower: AbortOnDrop::new(follower) };
        if let Some(entry) = self.apps().get_mut(&application_id) {
            entry.instance = Some(instance);
        }
    }
}

#[async_trait::async_trait]
impl Driver for ContainerDriver {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Container
    }

    async fn preflight(&self, launch: &LaunchSpec) -> Result<(), DriverError> {
        let Program::Container { image, .. } = &launch.program else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Container, requested: launch.kind() });
        };
        self.ensure_image(image).await
    }

    async fn start(&self, launch: &LaunchSpec, wake: Wake) -> Result<WorkloadHandle, DriverError> {
        let Program::Container { image, ports } = &launch.program else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Container, requested: launch.kind() });
        };
        let application_id = launch.application_id;
        if let WorkloadStatus::Running { .. } = self.status(application_id) {
            return Err(DriverError::AlreadyRunning);
        }
        let logs = self.ensure_entry(application_id);
        self.ensure_image(image).await?;
        let name = self.container_name(application_id);
        // A container of an earlier run (or an earlier agent) may still hold the name.
        self.stop_and_remove(&name).await?;

        let published: BTreeSet<u16> = ports.iter().copied().chain([launch.port]).collect();
        let port_bindings = published
            .iter()
            .map(|port| {
                let binding = PortBinding { host_ip: Some("127.0.0.1".to_owned()), host_port: Some(port.to_string()) };
                (format!("{port}/tcp"), Some(vec![binding]))
            })
            .collect();
        let binds = self.binds(launch)?;
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            env: Some(launch.env.iter().map(|(name, value)| format!("{name}={value}")).collect()),
            labels: Some(HashMap::from([(APPLICATION_LABEL.to_owned(), application_id.to_string())])),
            exposed_ports: Some(published.iter().map(|port| format!("{port}/tcp")).collect()),
            host_config: Some(HostConfig {
                port_bindings: Some(port_bindings),
                binds,
                init: Some(self.config.init),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(name), ..Default::default() };
        let created =
            self.docker.create_container(Some(options), body).await.map_err(engine("create the container"))?;
        if let Err(error) = self.docker.start_container(&created.id, None).await {
            if let Err(cleanup) = self.stop_and_remove(&created.id).await {
                tracing::warn!(container = %created.id, error = %cleanup, "could not remove a container that failed to start");
            }
            return Err(engine("start the container")(error));
        }
        tracing::info!(application = %launch.name, container = %created.id, "started container");
        self.install(application_id, created.id.clone(), logs, 0, wake);
        Ok(WorkloadHandle::Container { id: created.id })
    }

    async fn adopt(&self, launch: &LaunchSpec, handle: &WorkloadHandle, wake: Wake) -> Result<(), DriverError> {
        let WorkloadHandle::Container { id } = handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Container, requested: handle.kind() });
        };
        let info = match self.docker.inspect_container(id, None).await {
            Ok(info) => info,
            Err(error) if is_status(&error, 404) => return Err(DriverError::NotRunning),
            Err(error) => return Err(engine("inspect the container")(error)),
        };
        let running = info.state.and_then(|state| state.running).unwrap_or(false);
        let label =
            info.config.and_then(|config| config.labels).and_then(|labels| labels.get(APPLICATION_LABEL).cloned());
        if !running || label.as_deref() != Some(&launch.application_id.to_string()) {
            return Err(DriverError::NotRunning);
        }
        if let WorkloadStatus::Running { .. } = self.status(launch.application_id) {
            return Err(DriverError::AlreadyRunning);
        }
        let logs = self.ensure_entry(launch.application_id);
        // The previous agent read the output so far: follow from now on.
        let since = i32::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
        self.install(launch.application_id, id.clone(), logs, since, wake);
        tracing::info!(application = %launch.name, container = %id, "adopted running container");
        Ok(())
    }

    async fn probe(&self, handle: &WorkloadHandle) -> Result<bool, DriverError> {
        let WorkloadHandle::Container { id } = handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Container, requested: handle.kind() });
        };
        match self.docker.inspect_container(id, None).await {
            Ok(info) => Ok(info.state.and_then(|state| state.running).unwrap_or(false)),
            Err(error) if is_status(&error, 404) => Ok(false),
            Err(error) => Err(engine("inspect the container")(error)),
        }
    }

    async fn stop(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let instance = self.apps().get_mut(&application_id).and_then(|entry| entry.instance.take());
        let Some(instance) = instance else { return Ok(()) };
        let result = self.stop_and_remove(&instance.id).await;
        // The log stream ends with the container; let it deliver its last lines.
        instance.log_follower.join(Duration::from_secs(2)).await;
        result
    }

    async fn stop_recorded(&self, handle: &WorkloadHandle) -> Result<(), DriverError> {
        let WorkloadHandle::Container { id } = handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Container, requested: handle.kind() });
        };
        self.stop_and_remove(id).await
    }

    async fn remove(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        self.stop(application_id).await?;
        self.apps().remove(&application_id);
        Ok(())
    }

    async fn release_all(&self) {
        // Dropping the entries ends the monitors and log followers; containers keep running.
        self.apps().clear();
    }

    fn status(&self, application_id: ApplicationId) -> WorkloadStatus {
        let apps = self.apps();
        let Some(instance) = apps.get(&application_id).and_then(|entry| entry.instance.as_ref()) else {
            return WorkloadStatus::Absent;
        };
        match &*instance.exit.borrow() {
            Some(exit) => WorkloadStatus::Exited(exit.clone()),
            None => WorkloadStatus::Running { handle: WorkloadHandle::Container { id: instance.id.clone() } },
        }
    }

    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        self.apps().get(&application_id).map(|entry| entry.logs.clone())
    }
}

/// Waits for a container to stop and reports how it ended.
async fn monitor_container(docker: Docker, id: String, exit_sender: watch::Sender<Option<ExitInfo>>, wake: Wake) {
    let code = loop {
        match docker.wait_container(&id, None).next().await {
            Some(Ok(answer)) => break Some(answer.status_code),
            Some(Err(EngineError::DockerContainerWaitError { code, .. })) => break Some(code),
            // The wait connection broke or timed out: ask directly.
            Some(Err(_)) | None => match docker.inspect_container(&id, None).await {
                Ok(info) => {
                    let state = info.state.unwrap_or_default();
                    if !state.running.unwrap_or(false) {
                        break state.exit_code;
                    }
                }
                Err(error) if is_status(&error, 404) => break None,
                Err(error) => tracing::warn!(container = %id, %error, "cannot check a container"),
            },
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let code = code.and_then(|code| i32::try_from(code).ok());
    tracing::info!(container = %id, ?code, "container stopped");
    exit_sender.send_replace(Some(ExitInfo::now(code, None)));
    wake.wake();
}

/// Copies a container's output into `logs` until the container stops.
async fn follow_logs(docker: Docker, id: String, since: i32, logs: LogBuffer, max_line_bytes: usize) {
    let options = LogsOptions { follow: true, stdout: true, stderr: true, since, ..Default::default() };
    let mut output = docker.logs(&id, Some(options));
    let mut stdout = LineSplitter::new(max_line_bytes);
    let mut stderr = LineSplitter::new(max_line_bytes);
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                stdout.feed(&message).into_iter().for_each(|line| logs.push(Stream::Stdout, line));
            }
            Ok(LogOutput::StdErr { message }) => {
                stderr.feed(&message).into_iter().for_each(|line| logs.push(Stream::Stderr, line));
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(error) => {
                tracing::warn!(container = %id, %error, "the container's log stream broke");
                break;
            }
        }
    }
    stdout.finish().into_iter().for_each(|line| logs.push(Stream::Stdout, line));
    stderr.finish().into_iter().for_each(|line| logs.push(Stream::Stderr, line));
}
