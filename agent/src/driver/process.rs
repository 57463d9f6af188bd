//! The `process` driver: runs a workload as a supervised child process.
//!
//! - Each workload leads its own process group, so stopping it signals the whole tree: SIGTERM,
//!   then SIGKILL after a grace period, then a bounded wait until no process of the group is
//!   left. When the leader exits by itself, what it left behind in its group is stopped the
//!   same way before the exit is reported, so a restart never runs beside an orphan.
//! - Output goes to two files per application in the log directory (not to pipes), so that a
//!   workload outlives an agent restart without getting SIGPIPE, and the next agent can adopt
//!   it. A tail task per stream turns the files into lines in a bounded [`LogBuffer`] and
//!   truncates a file once it has read past `max_log_file_bytes` (the workload writes with
//!   `O_APPEND`, so it continues at the new end).
//! - A workload is recorded as its pid and start time; adoption checks both, so a pid that
//!   the kernel gave to another process is never adopted or signalled.
//! - `suspend` freezes the process group with the cgroup v1 freezer when the host has one,
//!   else stops it with SIGSTOP (see `freezer`); `resume`, and every stop or adoption, thaws it
//!   first, so a frozen workload is never left behind or waited on.
//! - The workload's environment is the launch spec's plus a few basics inherited from the
//!   agent (`inherited_env`), never the agent's whole environment.

mod freezer;
mod procfs;

use std::collections::HashMap;
use std::io::SeekFrom;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use edgible::model::ApplicationId;
use edgible::protocol::v1::Stream;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Driver, DriverError, ExitInfo, LaunchSpec, Program, Wake, WorkloadHandle, WorkloadKind, WorkloadStatus};
use crate::logs::{LineSplitter, LogBuffer, LogLimits};
use crate::tasks::AbortOnDrop;

pub use procfs::{Liveness, ProcessIdentity, group_members};

/// Environment variables a workload inherits from the agent unless its spec sets them.
pub const DEFAULT_INHERITED_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

#[derive(Debug, Clone)]
pub struct ProcessDriverConfig {
    /// Where the output files of workloads live (inside the agent's state directory).
    pub log_dir: PathBuf,
    /// How long a workload may take to exit after SIGTERM before it gets SIGKILL.
    pub stop_grace: Duration,
    /// How long to wait for the group to vanish after SIGKILL before reporting an error.
    pub kill_timeout: Duration,
    /// How often output files are read and adopted workloads are checked.
    pub poll_interval: Duration,
    pub log_limits: LogLimits,
    /// An output file is truncated once the tail has read this many bytes of it.
    pub max_log_file_bytes: u64,
    /// Variables copied from the agent's environment (see [`DEFAULT_INHERITED_ENV`]).
    pub inherited_env: Vec<String>,
    /// Where the volumes of applications are mounted (`<state_dir>/volumes`, see
    /// [`crate::volumes`]): each volume's mount point is given to the workload as
    /// `EDGIBLE_VOLUME_<NAME>`. [`ProcessDriverConfig::new`] puts it beside `log_dir`.
    pub volumes_dir: PathBuf,
}

impl ProcessDriverConfig {
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        let log_dir: PathBuf = log_dir.into();
        let volumes_dir = log_dir.parent().unwrap_or(Path::new("/")).join(crate::volumes::VOLUMES_DIR);
        Self {
            volumes_dir,
            log_dir,
            stop_grace: Duration::from_secs(10),
            kill_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            log_limits: LogLimits::default(),
            max_log_file_bytes: 8 * 1024 * 1024,
            inherited_env: DEFAULT_INHERITED_ENV.iter().map(|name| (*name).to_owned()).collect(),
        }
    }
}

pub struct ProcessDriver {
    config: Arc<ProcessDriverConfig>,
    apps: Mutex<HashMap<ApplicationId, AppEntry>>,
}

/// What the driver keeps per application: its logs live across restarts of its process.
struct AppEntry {
    logs: LogBuffer,
    tails: Vec<Tail>,
    instance: Option<Instance>,
}

/// One run of an application's process.
struct Instance {
    identity: ProcessIdentity,
    exit: watch::Receiver<Option<ExitInfo>>,
    /// Set while the driver stops the process on purpose, so the monitor leaves the group to
    /// the stopper.
    stopping: Arc<AtomicBool>,
    _monitor: AbortOnDrop,
}

struct Tail {
    stop: watch::Sender<bool>,
    task: AbortOnDrop,
}

impl ProcessDriver {
    pub fn new(config: ProcessDriverConfig) -> Self {
        Self { config: Arc::new(config), apps: Mutex::new(HashMap::new()) }
    }

    fn apps(&self) -> MutexGuard<'_, HashMap<ApplicationId, AppEntry>> {
        // Nothing panics while holding this lock except on a bug; the map is still coherent.
        self.apps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_path(&self, application_id: ApplicationId, stream: Stream) -> PathBuf {
        let suffix = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        self.config.log_dir.join(format!("{application_id}.{suffix}.log"))
    }

    /// Makes sure the application has an entry with its log files and tails. A fresh entry
    /// starts with empty files; an adopting one keeps them and tails from their end, since a
    /// previous agent already read what they hold.
    fn ensure_entry(&self, application_id: ApplicationId, adopting: bool) -> Result<(), DriverError> {
        if self.apps().contains_key(&application_id) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.config.log_dir)
            .map_err(|source| DriverError::LogFile { path: self.config.log_dir.display().to_string(), source })?;
        let logs = LogBuffer::new(self.config.log_limits);
        let mut tails = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let path = self.log_path(application_id, stream);
            let mut options = std::fs::OpenOptions::new();
            options.create(true).write(true).mode(0o600);
            if !adopting {
                options.truncate(true);
            }
            options.open(&path).map_err(|source| log_error(&path, source))?;
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(tail_file(path, stream, adopting, logs.clone(), Arc::clone(&self.config), stopped));
            tails.push(Tail { stop, task: AbortOnDrop::new(task) });
        }
        self.apps().entry(application_id).or_insert(AppEntry { logs, tails, instance: None });
        Ok(())
    }

    fn install(&self, application_id: ApplicationId, instance: Instance) {
        if let Some(entry) = self.apps().get_mut(&application_id) {
            entry.instance = Some(instance);
        }
    }

    fn take_instance(&self, application_id: ApplicationId) -> Option<Instance> {
        self.apps().get_mut(&application_id).and_then(|entry| entry.instance.take())
    }

    async fn stop_instance(&self, instance: Instance) -> Result<(), DriverError> {
        instance.stopping.store(true, Ordering::SeqCst);
        if instance.exit.borrow().is_some() {
            // The monitor saw the leader exit and already stopped the rest of its group. The
            // pid may belong to someone else by now: signalling it would be wrong.
            return Ok(());
        }
        let result = terminate_group(instance.identity.pid, &self.config).await;
        // Give the monitor a moment to reap the leader and record how it ended; it is
        // aborted when the instance is dropped anyway.
        let mut exit = instance.exit.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), exit.wait_for(Option::is_some)).await;
        result
    }
}

#[async_trait::async_trait]
impl Driver for ProcessDriver {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Process
    }

    async fn start(&self, launch: &LaunchSpec, wake: Wake) -> Result<WorkloadHandle, DriverError> {
        let Program::Process { command, args, working_dir } = &launch.program else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Process, requested: launch.kind() });
        };
        let application_id = launch.application_id;
        if let WorkloadStatus::Running { .. } = self.status(application_id) {
            return Err(DriverError::AlreadyRunning);
        }
        self.ensure_entry(application_id, false)?;
        let stdout = open_for_append(&self.log_path(application_id, Stream::Stdout))?;
        let stderr = open_for_append(&self.log_path(application_id, Stream::Stderr))?;

        let mut builder = tokio::process::Command::new(command);
        builder.args(args).env_clear();
        for name in &self.config.inherited_env {
            if let Some(value) = std::env::var_os(name) {
                builder.env(name, value);
            }
        }
        builder.envs(&launch.env);
        builder.envs(crate::volumes::process_env(&self.config.volumes_dir, application_id, &launch.volumes));
        if let Some(dir) = working_dir {
            builder.current_dir(dir);
        }
        builder
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            // Its own process group, so that stopping reaches every process it starts.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = builder.spawn().map_err(|source| DriverError::Spawn { command: command.clone(), source })?;

        // The child is not reaped before `wait` is called, so its /proc entry exists even if it
        // already exited.
        let identity = match child.id().map(i32::try_from) {
            Some(Ok(pid)) => ProcessIdentity::of(pid).map_err(|source| DriverError::Proc { pid, source })?,
            _ => None,
        };
        let Some(identity) = identity else {
            let _ = child.kill().await;
            return Err(DriverError::Spawn {
                command: command.clone(),
                source: std::io::Error::other("the process vanished right after it started"),
            });
        };

        let (exit_sender, exit) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(monitor_child(
            child,
            identity,
            exit_sender,
            Arc::clone(&stopping),
            wake,
            Arc::clone(&self.config),
        ));
        self.install(application_id, Instance { identity, exit, stopping, _monitor: AbortOnDrop::new(monitor) });
        tracing::info!(application = %launch.name, pid = identity.pid, "started process");
        Ok(WorkloadHandle::Process { pid: identity.pid, start_time: identity.start_time })
    }

    async fn adopt(&self, launch: &LaunchSpec, handle: &WorkloadHandle, wake: Wake) -> Result<(), DriverError> {
        let WorkloadHandle::Process { pid, start_time } = *handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Process, requested: handle.kind() });
        };
        let identity = ProcessIdentity { pid, start_time };
        if identity.liveness().map_err(|source| DriverError::Proc { pid, source })? != Liveness::Running {
            return Err(DriverError::NotRunning);
        }
        if let WorkloadStatus::Running { .. } = self.status(launch.application_id) {
            return Err(DriverError::AlreadyRunning);
        }
        // A previous agent may have left it suspended; what is adopted runs.
        if let Err(error) = freezer::resume(launch.application_id, Some(pid)) {
            tracing::warn!(application = %launch.name, %error, "cannot thaw an adopted workload");
        }
        self.ensure_entry(launch.application_id, true)?;
        let (exit_sender, exit) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        let monitor =
            tokio::spawn(monitor_adopted(identity, exit_sender, Arc::clone(&stopping), wake, Arc::clone(&self.config)));
        self.install(launch.application_id, Instance { identity, exit, stopping, _monitor: AbortOnDrop::new(monitor) });
        tracing::info!(application = %launch.name, pid, "adopted running process");
        Ok(())
    }

    async fn probe(&self, handle: &WorkloadHandle) -> Result<bool, DriverError> {
        let WorkloadHandle::Process { pid, start_time } = *handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Process, requested: handle.kind() });
        };
        let liveness =
            ProcessIdentity { pid, start_time }.liveness().map_err(|source| DriverError::Proc { pid, source })?;
        Ok(liveness == Liveness::Running)
    }

    async fn stop(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        match self.take_instance(application_id) {
            Some(instance) => {
                // A suspended group would never act on SIGTERM.
                if let Err(error) = freezer::resume(application_id, Some(instance.identity.pid)) {
                    tracing::warn!(%application_id, %error, "cannot thaw a workload before stopping it");
                }
                let result = self.stop_instance(instance).await;
                freezer::remove(application_id);
                result
            }
            None => Ok(()),
        }
    }

    async fn suspend(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let pid = match self.status(application_id) {
            WorkloadStatus::Running { handle: WorkloadHandle::Process { pid, .. } } => pid,
            _ => return Err(DriverError::NotRunning),
        };
        let how = freezer::suspend(application_id, pid)
            .await
            .map_err(|message| DriverError::Proc { pid, source: std::io::Error::other(message) })?;
        tracing::info!(%application_id, pid, ?how, "suspended process group");
        Ok(())
    }

    async fn resume(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let pid = match self.status(application_id) {
            WorkloadStatus::Running { handle: WorkloadHandle::Process { pid, .. } } => pid,
            _ => return Err(DriverError::NotRunning),
        };
        freezer::resume(application_id, Some(pid))
            .map_err(|message| DriverError::Proc { pid, source: std::io::Error::other(message) })
    }

    async fn stop_recorded(&self, handle: &WorkloadHandle) -> Result<(), DriverError> {
        let WorkloadHandle::Process { pid, start_time } = *handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Process, requested: handle.kind() });
        };
        match (ProcessIdentity { pid, start_time }).liveness().map_err(|source| DriverError::Proc { pid, source })? {
            Liveness::Running | Liveness::Leftovers => {
                // A group stopped by signal must continue to act on SIGTERM. (A frozen cgroup
                // is thawed by `adopt`, which knows the application.)
                let _ = killpg(Pid::from_raw(pid), Signal::SIGCONT);
                terminate_group(pid, &self.config).await
            }
            Liveness::Gone => Ok(()),
        }
    }

    async fn remove(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        self.stop(application_id).await?;
        let entry = self.apps().remove(&application_id);
        for tail in entry.into_iter().flat_map(|entry| entry.tails) {
            // The tail reads what is left before it ends.
            let _ = tail.stop.send(true);
            tail.task.join(Duration::from_secs(1)).await;
        }
        for stream in [Stream::Stdout, Stream::Stderr] {
            let path = self.log_path(application_id, stream);
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "could not remove a log file");
            }
        }
        Ok(())
    }

    async fn release_all(&self) {
        // Dropping the entries aborts monitors and tails; the processes keep running.
        self.apps().clear();
    }

    fn status(&self, application_id: ApplicationId) -> WorkloadStatus {
        let apps = self.apps();
        let Some(instance) = apps.get(&application_id).and_then(|entry| entry.instance.as_ref()) else {
            return WorkloadStatus::Absent;
        };
        match &*instance.exit.borrow() {
            Some(exit) => WorkloadStatus::Exited(exit.clone()),
            None => WorkloadStatus::Running {
                handle: WorkloadHandle::Process {
                    pid: instance.identity.pid,
                    start_time: instance.identity.start_time,
                },
            },
        }
    }

    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        self.apps().get(&application_id).map(|entry| entry.logs.clone())
    }
}

fn log_error(path: &Path, source: std::io::Error) -> DriverError {
    DriverError::LogFile { path: path.display().to_string(), source }
}

fn open_for_append(path: &Path) -> Result<std::fs::File, DriverError> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| log_error(path, source))
}

/// Waits for a child the driver started, stops what it left in its group, and reports.
async fn monitor_child(
    mut child: tokio::process::Child,
    identity: ProcessIdentity,
    exit_sender: watch::Sender<Option<ExitInfo>>,
    stopping: Arc<AtomicBool>,
    wake: Wake,
    config: Arc<ProcessDriverConfig>,
) {
    let exit = match child.wait().await {
        Ok(status) => ExitInfo::now(status.code(), status.signal()),
        Err(error) => {
            tracing::warn!(pid = identity.pid, %error, "could not wait for a workload process");
            ExitInfo::now(None, None)
        }
    };
    finish(identity, exit, &exit_sender, &stopping, &wake, &config).await;
}

/// Watches a process that a previous agent started (not a child of this one, so it cannot be
/// waited for) until it is gone.
async fn monitor_adopted(
    identity: ProcessIdentity,
    exit_sender: watch::Sender<Option<ExitInfo>>,
    stopping: Arc<AtomicBool>,
    wake: Wake,
    config: Arc<ProcessDriverConfig>,
) {
    loop {
        match identity.liveness() {
            Ok(Liveness::Running) => {}
            Ok(_) => break,
            Err(error) => tracing::warn!(pid = identity.pid, %error, "could not check an adopted process"),
        }
        tokio::time::sleep(config.poll_interval).await;
    }
    finish(identity, ExitInfo::now(None, None), &exit_sender, &stopping, &wake, &config).await;
}

async fn finish(
    identity: ProcessIdentity,
    exit: ExitInfo,
    exit_sender: &watch::Sender<Option<ExitInfo>>,
    stopping: &AtomicBool,
    wake: &Wake,
    config: &ProcessDriverConfig,
) {
    if !stopping.load(Ordering::SeqCst) {
        tracing::info!(pid = identity.pid, "workload process {exit}");
        if let Err(error) = terminate_group(identity.pid, config).await {
            tracing::warn!(pid = identity.pid, %error, "could not stop what an exited workload left behind");
        }
    }
    exit_sender.send_replace(Some(exit));
    wake.wake();
}

/// Stops every process of group `pgid`: SIGTERM, SIGKILL after the grace period, then waits
/// until none is left.
///
/// A group with no live member is not signalled: once its leader is reaped and its last
/// member gone, the number may be given to an unrelated process. While any member lives, the
/// kernel does not reuse the number.
async fn terminate_group(pgid: i32, config: &ProcessDriverConfig) -> Result<(), DriverError> {
    if group_members(pgid).map_err(|source| DriverError::Proc { pid: pgid, source })?.is_empty() {
        return Ok(());
    }
    if !signal_group(pgid, Signal::SIGTERM)? {
        return Ok(());
    }
    if wait_group_empty(pgid, config.stop_grace).await? {
        return Ok(());
    }
    tracing::info!(pgid, grace = ?config.stop_grace, "workload ignored SIGTERM; sending SIGKILL");
    if !signal_group(pgid, Signal::SIGKILL)? {
        return Ok(());
    }
    if wait_group_empty(pgid, config.kill_timeout).await? {
        Ok(())
    } else {
        Err(DriverError::StopTimedOut { pgid, waited: config.kill_timeout })
    }
}

/// Signals a process group; answers false if the group no longer exists.
fn signal_group(pgid: i32, signal: Signal) -> Result<bool, DriverError> {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(source) => Err(DriverError::Signal { pgid, source }),
    }
}

/// Waits until group `pgid` has no live process, for at most `timeout`; answers whether it
/// emptied.
async fn wait_group_empty(pgid: i32, timeout: Duration) -> Result<bool, DriverError> {
    let deadline = Instant::now() + timeout;
    loop {
        let members = group_members(pgid).map_err(|source| DriverError::Proc { pid: pgid, source })?;
        if members.is_empty() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Turns an output file into lines in `logs`, until told to stop (after a last read).
async fn tail_file(
    path: PathBuf,
    stream: Stream,
    from_end: bool,
    logs: LogBuffer,
    config: Arc<ProcessDriverConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let mut file = match tokio::fs::OpenOptions::new().read(true).write(true).open(&path).await {
        Ok(file) => file,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read a workload's output");
            return;
        }
    };
    let mut offset = if from_end { file.metadata().await.map(|meta| meta.len()).unwrap_or(0) } else { 0 };
    let mut splitter = LineSplitter::new(config.log_limits.max_line_bytes);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut warned = false;
    loop {
        let stopping = *stop.borrow_and_update();
        match read_new(&mut file, &mut offset, &mut buffer, &mut splitter, stream, &logs, config.max_log_file_bytes)
            .await
        {
            Ok(()) => warned = false,
            Err(error) if !warned => {
                tracing::warn!(path = %path.display(), %error, "cannot read a workload's output");
                warned = true;
            }
            Err(_) => {}
        }
        if stopping {
            if let Some(rest) = splitter.finish() {
                logs.push(stream, rest);
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Reads whatever was appended since `offset`, and truncates the file once it is large and
/// fully read.
async fn read_new(
    file: &mut tokio::fs::File,
    offset: &mut u64,
    buffer: &mut [u8],
    splitter: &mut LineSplitter,
    stream: Stream,
    logs: &LogBuffer,
    max_file_bytes: u64,
) -> std::io::Result<()> {
    loop {
        let length = file.metadata().await?.len();
        if length < *offset {
            // Someone else truncated the file: start over at its beginning.
            *offset = 0;
        }
        if length == *offset {
            break;
        }
        file.seek(SeekFrom::Start(*offset)).await?;
        let count = file.read(buffer).await?;
        if count == 0 {
            break;
        }
        *offset += count as u64;
        for line in splitter.feed(&buffer[..count]) {
            logs.push(stream, line);
        }
    }
    if *offset > max_file_bytes {
        // Whatever the workload writes between the read above and this truncation is lost; the
        // window is a few microseconds, once per `max_file_bytes` of output.
        file.set_len(0).await?;
        *offset = 0;
    }
    Ok(())
}
