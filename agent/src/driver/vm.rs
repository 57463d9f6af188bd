//! The `vm` driver: on a cloud host (`--cloud-host`), every application's workload runs inside
//! its own microVM, so tenants share the host's kernel with nobody.
//!
//! - [`vm::vmm`](vmm): the [`Vmm`] trait and its QEMU backend (`-M microvm`, QMP over a unix
//!   socket, [`vm::qmp`](qmp)). KVM is used when a one-time probe guest reaches its init in
//!   time, TCG otherwise.
//! - [`vm::image`](image): the guest's initramfs (`newc` archives written by [`vm::cpio`](cpio)):
//!   busybox, the virtio modules, a shell `/init`, the program with its shared libraries
//!   ([`vm::deps`](deps)), and the launch's environment and command line. Layers are cached by
//!   content.
//! - [`vm::network`](network): a tap and a /30 per VM, and the agent's nftables table that lets
//!   a guest answer its host side and reach nothing else.
//!
//! The workload's stdout and stderr go to two virtio consoles that QEMU appends to files in the
//! VM's directory; tail tasks turn them into the application's logs. `/init` prints the
//! workload's exit status on the serial console and reboots, which ends QEMU (`-no-reboot`);
//! the driver reads the status from there. A third console is the guest's control line (a unix
//! socket in the VM's directory): `stop` asks `/init` to end the workload (SIGTERM, then SIGKILL),
//! unmount the volumes and power off, so that what the workload wrote is on its volumes when
//! the VM is gone; only a guest that does not end in time is ended by the monitor.
//!
//! The proxy, health checks and wake readiness reach the workload at the guest's own address
//! ([`Driver::address`], [`VmDriver::guest_address`]) and the application's port: two guests
//! may listen on one port. Nothing of a guest listens on the host.
//!
//! Volumes (`spec.storage`): each volume's ext4 image (`<state_dir>/volumes/<app>/<name>.img`,
//! provisioned by [`crate::volumes`], never mounted on the host while the VM runs) is attached
//! as a virtio-blk disk, in spec order, with the serial `edgible<index>`; `/init` finds each
//! disk by its serial, mounts it at the volume's `mount_path` before the workload starts, and
//! the workload gets `EDGIBLE_VOLUME_<NAME>=<mount_path>`, as a process workload does.
//!
//! A VM is recorded as [`WorkloadHandle::Vm`]: QEMU's pid and start time, its QMP socket and its
//! network slot; its kind is the kind of workload it runs, since on a cloud host this driver
//! takes the place of the process driver. A next agent adopts a VM whose QEMU still runs.
//! `suspend` pauses the guest and writes a snapshot to its directory; `resume` continues it, or,
//! when QEMU is gone, restores the snapshot in a new QEMU.
//!
//! `container` workloads run the same way: the image (pulled if the engine lacks it) is
//! exported through the Docker engine API from a created, never started, container, its tar
//! stream becomes the root filesystem layer (cached by image id), and `/init` runs the image's
//! entrypoint and command with its environment under the launch's.

pub mod cpio;
pub mod deps;
pub mod image;
pub mod network;
pub mod qmp;
pub mod tar;
pub mod vmm;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use edgible::model::ApplicationId;
use edgible::protocol::v1::Stream;
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{OnceCell, watch};

use super::{Driver, DriverError, ExitInfo, LaunchSpec, Program, Wake, WorkloadHandle, WorkloadKind, WorkloadStatus};
use crate::logs::{LineSplitter, LogBuffer, LogLimits};
use crate::tasks::AbortOnDrop;
use image::ImageCache;
use network::{Allocator, Link};
use vmm::{Accel, MachineConfig, MachineId, Qemu, Vmm};

/// Defaults of a VM without `resources`.
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;

#[derive(Debug, Clone)]
pub struct VmDriverConfig {
    /// Images, VM directories (consoles, control sockets, snapshots) live here.
    pub dir: PathBuf,
    /// The guest kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// Where the virtio modules of that kernel are (`--vm-modules`, searched recursively).
    pub modules: PathBuf,
    /// A static busybox for the guest.
    pub busybox: PathBuf,
    /// The /30s of guests come from here.
    pub network: Ipv4Net,
    pub qemu: Qemu,
    /// `None`: probe KVM once and fall back to TCG.
    pub accel: Option<Accel>,
    /// How long QEMU may take to quit before SIGTERM.
    pub stop_grace: Duration,
    /// How long the KVM probe guest may take to reach its init.
    pub kvm_probe_timeout: Duration,
    pub poll_interval: Duration,
    pub log_limits: LogLimits,
    /// Where the images of applications' volumes are (`<state_dir>/volumes`, see
    /// [`crate::volumes`]). [`VmDriverConfig::new`] puts it beside `dir`.
    pub volumes_dir: PathBuf,
    /// The container engine's API socket, whose images `container` workloads come from.
    pub container_socket: PathBuf,
}

impl VmDriverConfig {
    pub fn new(dir: impl Into<PathBuf>, kernel: impl Into<PathBuf>, modules: impl Into<PathBuf>) -> Self {
        let dir: PathBuf = dir.into();
        let volumes_dir = dir.parent().unwrap_or(Path::new("/")).join(crate::volumes::VOLUMES_DIR);
        Self {
            volumes_dir,
            dir,
            kernel: kernel.into(),
            modules: modules.into(),
            busybox: PathBuf::from("/bin/busybox"),
            network: Ipv4Net::new(Ipv4Addr::new(198, 51, 100, 0), 24).unwrap_or_default(),
            qemu: Qemu::default(),
            accel: None,
            stop_grace: Duration::from_secs(10),
            kvm_probe_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(100),
            log_limits: LogLimits::default(),
            container_socket: PathBuf::from("/var/run/docker.sock"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("guest image: {0}")]
    Image(#[from] image::ImageError),
    #[error("guest network: {0}")]
    Network(#[from] network::NetworkError),
    #[error("virtual machine monitor: {0}")]
    Vmm(#[from] vmm::VmmError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("volume {volume}: its image {path} is missing (volumes are provisioned before the start)")]
    MissingVolume { volume: String, path: String },
    #[error("the workload is suspended and has no snapshot to restore")]
    NoSnapshot,
    #[error("container engine: cannot {action}: {source}")]
    Engine { action: &'static str, source: Box<bollard::errors::Error> },
    #[error("image {0} has neither an entrypoint nor a command")]
    NoCommand(String),
    #[error("image {image} exports more than {limit} bytes")]
    ImageTooLarge { image: String, limit: usize },
}

impl From<VmError> for DriverError {
    fn from(error: VmError) -> Self {
        DriverError::Vm(Box::new(error))
    }
}

/// Runs `process` workloads in microVMs. Cheap to clone; clones share every VM.
#[derive(Clone)]
pub struct VmDriver {
    /// The kind of workload this handle of the driver serves (see [`VmDriver::serving`]).
    serves: WorkloadKind,
    inner: Arc<Inner>,
}

struct Inner {
    config: VmDriverConfig,
    vmm: Arc<dyn Vmm>,
    images: ImageCache,
    apps: Mutex<HashMap<ApplicationId, AppEntry>>,
    allocator: Mutex<Allocator>,
    accel: OnceCell<Accel>,
    /// Serializes rebuilds of the nftables table.
    firewall: tokio::sync::Mutex<()>,
    docker: OnceCell<bollard::Docker>,
}

struct AppEntry {
    logs: LogBuffer,
    _tails: Vec<AbortOnDrop>,
    instance: Option<Instance>,
}

struct Instance {
    /// The kind of workload inside.
    runs: WorkloadKind,
    machine: Arc<Mutex<MachineId>>,
    config: MachineConfig,
    link: Link,
    exit: watch::Receiver<Option<ExitInfo>>,
    /// Set while the driver stops or suspends the VM on purpose, so the monitor leaves it be.
    stopping: Arc<AtomicBool>,
    suspended: Arc<AtomicBool>,
    _monitor: AbortOnDrop,
}

/// What the driver persists beside a VM, so that an agent restart can restore it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Recorded {
    config: MachineConfig,
    port: u16,
}

impl VmDriver {
    pub fn new(config: VmDriverConfig) -> Result<Self, VmError> {
        let vmm: Arc<dyn Vmm> = Arc::new(config.qemu.clone());
        Self::with_vmm(config, vmm)
    }

    /// The driver over another [`Vmm`].
    pub fn with_vmm(config: VmDriverConfig, vmm: Arc<dyn Vmm>) -> Result<Self, VmError> {
        let allocator = Allocator::new(config.network)?;
        let images = ImageCache::new(config.dir.join("images"));
        Ok(Self {
            serves: WorkloadKind::Process,
            inner: Arc::new(Inner {
                config,
                vmm,
                images,
                apps: Mutex::new(HashMap::new()),
                allocator: Mutex::new(allocator),
                accel: OnceCell::new(),
                firewall: tokio::sync::Mutex::new(()),
                docker: OnceCell::new(),
            }),
        })
    }

    /// The same driver (same VMs) registered for another kind of workload: on a cloud host one
    /// driver serves `process` and `container` workloads alike, and the reconciler finds drivers
    /// by kind.
    pub fn serving(&self, kind: WorkloadKind) -> Self {
        Self { serves: kind, inner: Arc::clone(&self.inner) }
    }

    /// The guest address of the application's VM, while one runs.
    pub fn guest_address(&self, application_id: ApplicationId) -> Option<Ipv4Addr> {
        let apps = self.inner.apps();
        apps.get(&application_id).and_then(|entry| entry.instance.as_ref()).map(|instance| instance.link.guest)
    }

    /// The host side's address of the application's VM link, while one runs.
    pub fn host_address(&self, application_id: ApplicationId) -> Option<Ipv4Addr> {
        let apps = self.inner.apps();
        apps.get(&application_id).and_then(|entry| entry.instance.as_ref()).map(|instance| instance.link.host)
    }

    /// The accelerator in use, probing once.
    pub async fn accel(&self) -> Result<Accel, VmError> {
        let inner = &self.inner;
        if let Some(accel) = inner.config.accel {
            return Ok(accel);
        }
        let base = inner.images.base(&inner.config.busybox, &inner.config.modules)?;
        let accel = inner
            .accel
            .get_or_init(|| async {
                let dir = inner.config.dir.join("kvm-probe");
                let kvm = vmm::probe_kvm(
                    &inner.config.qemu,
                    &inner.config.kernel,
                    &base,
                    &dir,
                    inner.config.kvm_probe_timeout,
                )
                .await;
                let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
                tracing::info!(?accel, "microVM accelerator chosen");
                accel
            })
            .await;
        Ok(*accel)
    }

    fn vm_dir(&self, application_id: ApplicationId) -> PathBuf {
        self.inner.config.dir.join("vms").join(application_id.to_string())
    }

    fn links(&self) -> Vec<Link> {
        self.inner.apps().values().filter_map(|entry| entry.instance.as_ref().map(|instance| instance.link)).collect()
    }

    /// Rebuilds the firewall table from the VMs the driver supervises.
    async fn refresh_firewall(&self) -> Result<(), VmError> {
        let _guard = self.inner.firewall.lock().await;
        let links = self.links();
        if links.is_empty() {
            network::remove_table().await?;
        } else {
            network::apply(&network::ruleset(&links)).await?;
        }
        Ok(())
    }

    fn ensure_entry(&self, application_id: ApplicationId, dir: &Path, from_end: bool) {
        let mut apps = self.inner.apps();
        if apps.contains_key(&application_id) {
            return;
        }
        let logs = LogBuffer::new(self.inner.config.log_limits);
        let tails = [(Stream::Stdout, "stdout.log"), (Stream::Stderr, "stderr.log")]
            .into_iter()
            .map(|(stream, name)| {
                AbortOnDrop::new(tokio::spawn(tail(
                    dir.join(name),
                    stream,
                    from_end,
                    logs.clone(),
                    self.inner.config.log_limits.max_line_bytes,
                    self.inner.config.poll_interval,
                )))
            })
            .collect();
        apps.insert(application_id, AppEntry { logs, _tails: tails, instance: None });
    }

    /// The images of the launch's volumes, in spec order; each must exist.
    fn volume_images(&self, launch: &LaunchSpec) -> Result<Vec<PathBuf>, VmError> {
        let images =
            crate::volumes::image_paths(&self.inner.config.volumes_dir, launch.application_id, &launch.volumes);
        for (volume, image) in launch.volumes.iter().zip(&images) {
            if !image.is_file() {
                return Err(VmError::MissingVolume {
                    volume: volume.name.to_string(),
                    path: image.display().to_string(),
                });
            }
        }
        Ok(images)
    }

    async fn build_image(&self, launch: &LaunchSpec, dir: &Path) -> Result<PathBuf, VmError> {
        let inner = &self.inner;
        let base = inner.images.base(&inner.config.busybox, &inner.config.modules)?;
        let mounts: Vec<image::GuestMount> = launch
            .volumes
            .iter()
            .enumerate()
            .map(|(index, volume)| image::GuestMount {
                serial: vmm::disk_serial(index),
                path: volume.mount_path.to_string(),
            })
            .collect();
        // The workload finds each volume where the guest mounts it, as a process finds its own.
        let mut env = launch.env.clone();
        for volume in &launch.volumes {
            env.insert(crate::volumes::env_name(volume.name.as_str()), volume.mount_path.to_string());
        }
        let (layer, launch_files) = match &launch.program {
            Program::Process { command, args, working_dir } => {
                let (app, program) = inner.images.program(command).await?;
                let mut argv = vec![program.to_string_lossy().into_owned()];
                argv.extend(args.iter().cloned());
                (app, image::launch_layer(&argv, &env, working_dir.as_deref(), &mounts)?)
            }
            Program::Container { image, .. } => {
                let (rootfs, config) = self.container_rootfs(image).await?;
                let mut argv = config.entrypoint.unwrap_or_default();
                argv.extend(config.cmd.unwrap_or_default());
                if argv.is_empty() {
                    return Err(VmError::NoCommand(image.clone()));
                }
                // The image's environment, then the launch's, which wins.
                let mut merged: std::collections::BTreeMap<String, String> = config
                    .env
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(name, value)| (name.to_owned(), value.to_owned()))
                    .collect();
                merged.extend(env);
                (rootfs, image::launch_layer(&argv, &merged, config.working_dir.as_deref(), &mounts)?)
            }
            Program::Vm { .. } => {
                return Err(VmError::NoCommand("a vm workload".into()));
            }
        };
        let initrd = dir.join("initrd");
        image::assemble(&initrd, &[base, layer], &launch_files)?;
        Ok(initrd)
    }

    async fn docker(&self) -> Result<&bollard::Docker, VmError> {
        let socket = self.inner.config.container_socket.clone();
        self.inner
            .docker
            .get_or_try_init(|| async move {
                let socket = socket.to_string_lossy().into_owned();
                let docker = bollard::Docker::connect_with_unix(&socket, 300, bollard::API_DEFAULT_VERSION)
                    .map_err(engine("connect"))?;
                docker.negotiate_version().await.map_err(engine("agree on an API version"))
            })
            .await
    }

    /// The image's filesystem as a layer (exported through a created, never started,
    /// container) and its configuration.
    async fn container_rootfs(&self, image: &str) -> Result<(PathBuf, bollard::models::ImageConfig), VmError> {
        use futures::TryStreamExt;
        /// Images larger than this are refused: the whole filesystem is unpacked into RAM.
        const MAX_EXPORT: usize = 2 * 1024 * 1024 * 1024;
        let docker = self.docker().await?;
        let inspected = match docker.inspect_image(image).await {
            Ok(inspected) => inspected,
            Err(_) => {
                let options = bollard::query_parameters::CreateImageOptions {
                    from_image: Some(image.to_owned()),
                    ..Default::default()
                };
                docker
                    .create_image(Some(options), None, None)
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(engine("pull the image"))?;
                docker.inspect_image(image).await.map_err(engine("inspect the image"))?
            }
        };
        let config = inspected.config.unwrap_or_default();
        let key = inspected.id.unwrap_or_else(|| image.to_owned());
        if let Some(cached) = self.inner.images.container_cached(&key) {
            return Ok((cached, config));
        }
        let body = bollard::models::ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["true".to_owned()]),
            ..Default::default()
        };
        let created = docker
            .create_container(None::<bollard::query_parameters::CreateContainerOptions>, body)
            .await
            .map_err(engine("create a container to export"))?;
        let mut tar = Vec::new();
        let mut stream = docker.export_container(&created.id);
        let exported = loop {
            match stream.try_next().await {
                Ok(Some(chunk)) if tar.len() + chunk.len() > MAX_EXPORT => {
                    break Err(VmError::ImageTooLarge { image: image.to_owned(), limit: MAX_EXPORT });
                }
                Ok(Some(chunk)) => tar.extend_from_slice(&chunk),
                Ok(None) => break Ok(()),
                Err(error) => break Err(engine("export the container")(error)),
            }
        };
        let options = bollard::query_parameters::RemoveContainerOptions { force: true, ..Default::default() };
        if let Err(error) = docker.remove_container(&created.id, Some(options)).await {
            tracing::warn!(container = %created.id, %error, "could not remove an exported container");
        }
        exported?;
        Ok((image::container_layer(&self.inner.images, &key, &tar)?, config))
    }

    async fn boot(&self, launch: &LaunchSpec, link: Link, wake: Wake) -> Result<WorkloadHandle, VmError> {
        let application_id = launch.application_id;
        let dir = self.vm_dir(application_id);
        let io = |source| VmError::Io { path: dir.display().to_string(), source };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let disks = self.volume_images(launch)?;
        let initrd = self.build_image(launch, &dir).await?;
        let accel = self.accel().await?;
        let resources = launch.resources.as_ref();
        let config = MachineConfig {
            kernel: self.inner.config.kernel.clone(),
            initrd,
            extra_cmdline: vmm::network_cmdline(link.guest, link.host),
            vcpus: resources.map_or(DEFAULT_VCPUS, |resources| resources.vcpus),
            memory_mib: resources.map_or(DEFAULT_MEMORY_MIB, |resources| resources.memory_mib),
            accel,
            tap: Some((link.tap(), vmm::mac_for(link.slot))),
            dir: dir.clone(),
            disks,
            control: true,
        };
        let recorded = serde_json::to_vec(&Recorded { config: config.clone(), port: launch.port })
            .map_err(|error| io(std::io::Error::other(error)))?;
        std::fs::write(dir.join("machine.json"), recorded).map_err(io)?;
        network::create_tap(&link).await?;
        self.ensure_entry(application_id, &dir, false);
        let machine = self.inner.vmm.create(&config).await?;
        let handle = self.supervise(launch, machine.clone(), config, link, wake);
        self.refresh_firewall().await?;
        self.inner.vmm.start(&machine).await?;
        tracing::info!(application = %launch.name, pid = machine.pid, guest = %link.guest, ?accel, "started microVM");
        Ok(handle)
    }

    /// Installs the instance and its monitor.
    fn supervise(
        &self,
        launch: &LaunchSpec,
        machine: MachineId,
        config: MachineConfig,
        link: Link,
        wake: Wake,
    ) -> WorkloadHandle {
        let (application_id, runs) = (launch.application_id, launch.kind());
        let handle = handle_of(&machine, link, runs);
        let machine = Arc::new(Mutex::new(machine));
        let (exit_sender, exit) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        let suspended = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(monitor(
            self.clone(),
            Arc::clone(&machine),
            config.serial_log(),
            link,
            exit_sender,
            Arc::clone(&stopping),
            Arc::clone(&suspended),
            wake,
        ));
        let instance =
            Instance { runs, machine, config, link, exit, stopping, suspended, _monitor: AbortOnDrop::new(monitor) };
        if let Some(entry) = self.inner.apps().get_mut(&application_id) {
            entry.instance = Some(instance);
        }
        handle
    }

    /// Ends the instance's VM: the guest is asked to end its workload and power off (so that
    /// its volumes are unmounted, their data on the images); a guest that does not within the
    /// stop grace is ended by the monitor (QMP `quit`, then signals).
    async fn stop_instance(&self, instance: Instance) -> Result<(), DriverError> {
        instance.stopping.store(true, Ordering::SeqCst);
        let machine = lock(&instance.machine).clone();
        let grace = self.inner.config.stop_grace;
        let started = tokio::time::Instant::now();
        if instance.config.control && machine.alive() {
            match ask_guest_to_stop(&instance.config.control_line(), grace).await {
                // The line stays open until the guest is gone: what was written on it is then
                // surely read.
                Ok(_line) => {
                    if vmm::wait_gone(&machine, grace).await {
                        tracing::debug!(pid = machine.pid, "the guest powered off");
                    }
                }
                Err(error) => tracing::warn!(pid = machine.pid, %error, "cannot ask the guest to stop"),
            }
        }
        let left = grace.saturating_sub(started.elapsed());
        let result = self.inner.vmm.stop(&machine, left).await;
        let _ = std::fs::remove_file(instance.config.dir.join("snapshot"));
        let link = instance.link;
        drop(instance);
        self.release_link(link).await;
        result.map_err(|error| VmError::from(error).into())
    }

    async fn release_link(&self, link: Link) {
        if let Err(error) = network::delete_tap(&link).await {
            tracing::warn!(tap = %link.tap(), %error, "could not delete a VM's tap device");
        }
        lock(&self.inner.allocator).release(link.slot);
        if let Err(error) = self.refresh_firewall().await {
            tracing::warn!(%error, "could not rebuild the VM firewall table");
        }
    }

    fn controls(&self, application_id: ApplicationId) -> Option<Controls> {
        let apps = self.inner.apps();
        let instance = apps.get(&application_id)?.instance.as_ref()?;
        Some(Controls {
            machine: Arc::clone(&instance.machine),
            config: instance.config.clone(),
            link: instance.link,
            suspended: Arc::clone(&instance.suspended),
        })
    }
}

/// What `suspend` and `resume` work with, taken out of the lock.
struct Controls {
    machine: Arc<Mutex<MachineId>>,
    config: MachineConfig,
    link: Link,
    suspended: Arc<AtomicBool>,
}

impl Inner {
    fn apps(&self) -> MutexGuard<'_, HashMap<ApplicationId, AppEntry>> {
        lock(&self.apps)
    }
}

fn engine(action: &'static str) -> impl Fn(bollard::errors::Error) -> VmError {
    move |source| VmError::Engine { action, source: Box::new(source) }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks except on a bug; the data is still coherent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn handle_of(machine: &MachineId, link: Link, runs: WorkloadKind) -> WorkloadHandle {
    WorkloadHandle::Vm {
        runs,
        pid: machine.pid,
        start_time: machine.start_time,
        control: machine.control.display().to_string(),
        slot: link.slot,
    }
}

#[async_trait::async_trait]
impl Driver for VmDriver {
    fn kind(&self) -> WorkloadKind {
        self.serves
    }

    async fn start(&self, launch: &LaunchSpec, wake: Wake) -> Result<WorkloadHandle, DriverError> {
        if !matches!(launch.program, Program::Process { .. } | Program::Container { .. }) {
            return Err(DriverError::WrongKind { supported: self.serves, requested: launch.kind() });
        }
        if let WorkloadStatus::Running { .. } = self.status(launch.application_id) {
            return Err(DriverError::AlreadyRunning);
        }
        // A previous run's instance (exited) gives its slot back first.
        let previous = self.inner.apps().get_mut(&launch.application_id).and_then(|entry| entry.instance.take());
        if let Some(previous) = previous {
            self.stop_instance(previous).await?;
        }
        let link = lock(&self.inner.allocator).allocate().map_err(VmError::from)?;
        match self.boot(launch, link, wake).await {
            Ok(handle) => Ok(handle),
            Err(error) => {
                let instance =
                    self.inner.apps().get_mut(&launch.application_id).and_then(|entry| entry.instance.take());
                match instance {
                    Some(instance) => {
                        let _ = self.stop_instance(instance).await;
                    }
                    None => self.release_link(link).await,
                }
                Err(error.into())
            }
        }
    }

    fn address(&self, application_id: ApplicationId) -> Option<std::net::IpAddr> {
        let apps = self.inner.apps();
        let instance = apps.get(&application_id)?.instance.as_ref()?;
        let running = instance.exit.borrow().is_none();
        running.then_some(std::net::IpAddr::V4(instance.link.guest))
    }

    async fn adopt(&self, launch: &LaunchSpec, handle: &WorkloadHandle, wake: Wake) -> Result<(), DriverError> {
        let WorkloadHandle::Vm { pid, start_time, control, slot, .. } = handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Vm, requested: handle.kind() });
        };
        let machine = MachineId { pid: *pid, start_time: *start_time, control: PathBuf::from(control) };
        if !machine.alive() {
            return Err(DriverError::NotRunning);
        }
        if let WorkloadStatus::Running { .. } = self.status(launch.application_id) {
            return Err(DriverError::AlreadyRunning);
        }
        let dir = self.vm_dir(launch.application_id);
        let recorded = std::fs::read(dir.join("machine.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Recorded>(&bytes).ok())
            .ok_or(DriverError::NotRunning)?;
        let link = {
            let mut allocator = lock(&self.inner.allocator);
            if !allocator.claim(*slot) {
                return Err(DriverError::NotRunning);
            }
            allocator.link(*slot).ok_or(DriverError::NotRunning)?
        };
        self.ensure_entry(launch.application_id, &dir, true);
        self.supervise(launch, machine, recorded.config, link, wake);
        self.refresh_firewall().await.map_err(DriverError::from)?;
        tracing::info!(application = %launch.name, pid, "adopted running microVM");
        Ok(())
    }

    async fn probe(&self, handle: &WorkloadHandle) -> Result<bool, DriverError> {
        let WorkloadHandle::Vm { pid, start_time, control, .. } = handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Vm, requested: handle.kind() });
        };
        Ok(MachineId { pid: *pid, start_time: *start_time, control: PathBuf::from(control) }.alive())
    }

    async fn stop(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        // A suspended guest cannot end its workload: it runs again first (restored, if its
        // QEMU is gone), so that what it had not written to its volumes yet is written.
        let suspended = self.controls(application_id).is_some_and(|controls| controls.suspended.load(Ordering::SeqCst));
        if suspended && let Err(error) = self.resume(application_id).await {
            tracing::warn!(application = %application_id, %error, "cannot resume a suspended VM to stop it cleanly");
        }
        let instance = self.inner.apps().get_mut(&application_id).and_then(|entry| entry.instance.take());
        match instance {
            Some(instance) => self.stop_instance(instance).await,
            None => Ok(()),
        }
    }

    async fn stop_recorded(&self, handle: &WorkloadHandle) -> Result<(), DriverError> {
        let WorkloadHandle::Vm { pid, start_time, control, slot, .. } = handle else {
            return Err(DriverError::WrongKind { supported: WorkloadKind::Vm, requested: handle.kind() });
        };
        let machine = MachineId { pid: *pid, start_time: *start_time, control: PathBuf::from(control) };
        self.inner.vmm.stop(&machine, self.inner.config.stop_grace).await.map_err(VmError::from)?;
        let allocator = lock(&self.inner.allocator).clone();
        if let Some(link) = allocator.link(*slot)
            && !self.links().contains(&link)
        {
            let _ = network::delete_tap(&link).await;
        }
        Ok(())
    }

    async fn remove(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        self.stop(application_id).await?;
        self.inner.apps().remove(&application_id);
        let dir = self.vm_dir(application_id);
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), %error, "could not remove a VM's directory");
        }
        Ok(())
    }

    async fn release_all(&self) {
        // Dropping the entries aborts monitors and tails; the VMs keep running, and their taps
        // and firewall rules stay for the next agent.
        self.inner.apps().clear();
    }

    fn status(&self, application_id: ApplicationId) -> WorkloadStatus {
        let apps = self.inner.apps();
        let Some(instance) = apps.get(&application_id).and_then(|entry| entry.instance.as_ref()) else {
            return WorkloadStatus::Absent;
        };
        match &*instance.exit.borrow() {
            Some(exit) => WorkloadStatus::Exited(exit.clone()),
            None => {
                WorkloadStatus::Running { handle: handle_of(&lock(&instance.machine), instance.link, instance.runs) }
            }
        }
    }

    async fn suspend(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let Controls { machine, config, suspended, .. } =
            self.controls(application_id).ok_or(DriverError::NotRunning)?;
        let current = lock(&machine).clone();
        suspended.store(true, Ordering::SeqCst);
        if let Err(error) = self.inner.vmm.snapshot(&current, &config.dir.join("snapshot")).await {
            // The guest may be paused by now; let it run again rather than leave it frozen.
            let _ = self.inner.vmm.resume(&current).await;
            suspended.store(false, Ordering::SeqCst);
            return Err(VmError::from(error).into());
        }
        Ok(())
    }

    async fn resume(&self, application_id: ApplicationId) -> Result<(), DriverError> {
        let Controls { machine, config, link, suspended } =
            self.controls(application_id).ok_or(DriverError::NotRunning)?;
        let current = lock(&machine).clone();
        // A QEMU that dies while being asked to continue is restored like one already gone.
        let continued = match current.alive() {
            true => match self.inner.vmm.resume(&current).await {
                Ok(()) => true,
                Err(_) if vmm::wait_gone(&current, Duration::from_secs(1)).await => false,
                Err(error) => return Err(VmError::from(error).into()),
            },
            false => false,
        };
        if !continued {
            let snapshot = config.dir.join("snapshot");
            if !snapshot.exists() {
                return Err(VmError::NoSnapshot.into());
            }
            if config.tap.is_some() && !network::tap_exists(&link).await {
                network::create_tap(&link).await.map_err(VmError::from)?;
            }
            let restored = self.inner.vmm.restore(&config, &snapshot).await.map_err(VmError::from)?;
            self.inner.vmm.resume(&restored).await.map_err(VmError::from)?;
            tracing::info!(pid = restored.pid, "restored a microVM from its snapshot");
            *lock(&machine) = restored;
        }
        suspended.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        self.inner.apps().get(&application_id).map(|entry| entry.logs.clone())
    }
}

/// Watches QEMU until it ends on its own; then reads the workload's exit status from the
/// serial console, tears the link down and reports. A suspended VM whose QEMU is gone is left
/// for `resume` to restore.
#[allow(clippy::too_many_arguments)]
async fn monitor(
    driver: VmDriver,
    machine: Arc<Mutex<MachineId>>,
    serial: PathBuf,
    link: Link,
    exit_sender: watch::Sender<Option<ExitInfo>>,
    stopping: Arc<AtomicBool>,
    suspended: Arc<AtomicBool>,
    wake: Wake,
) {
    let poll = driver.inner.config.poll_interval;
    loop {
        tokio::time::sleep(poll).await;
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let alive = lock(&machine).alive();
        if alive || suspended.load(Ordering::SeqCst) {
            continue;
        }
        break;
    }
    let serial = std::fs::read_to_string(&serial).unwrap_or_default();
    let code = exit_code(&serial);
    let exit = ExitInfo::now(code, None);
    tracing::info!(tap = %link.tap(), "microVM workload {exit}");
    if let Err(error) = network::delete_tap(&link).await {
        tracing::warn!(tap = %link.tap(), %error, "could not delete a VM's tap device");
    }
    exit_sender.send_replace(Some(exit));
    wake.wake();
}

/// The workload's exit status as `/init` printed it on the serial console.
pub fn exit_code(serial: &str) -> Option<i32> {
    serial.lines().rev().find_map(|line| line.trim().strip_prefix(image::EXIT_MARKER)?.trim().parse().ok())
}

/// Writes `stop` on the guest's control line, with how long `/init` gives the workload after
/// SIGTERM before SIGKILL (in tenths of a second): about half the grace, so that unmounting
/// and powering off fit in the rest.
async fn ask_guest_to_stop(control_line: &Path, grace: Duration) -> std::io::Result<tokio::net::UnixStream> {
    use tokio::io::AsyncWriteExt;
    let tenths = (grace.as_millis() / 200).clamp(1, 6000);
    let exchange = async {
        let mut line = tokio::net::UnixStream::connect(control_line).await?;
        line.write_all(format!("{}{tenths}\n", image::STOP_COMMAND).as_bytes()).await?;
        line.flush().await?;
        Ok(line)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the control line did not accept")))
}

/// Turns a console file into log lines. QEMU appends to it, so reading on from an offset
/// sees everything once.
async fn tail(path: PathBuf, stream: Stream, from_end: bool, logs: LogBuffer, max_line: usize, poll: Duration) {
    let mut offset = if from_end { std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0) } else { 0 };
    let mut splitter = LineSplitter::new(max_line);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            let length = file.metadata().await.map(|meta| meta.len()).unwrap_or(0);
            if length < offset {
                offset = 0;
            }
            if length > offset && file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                while let Ok(count) = file.read(&mut buffer).await {
                    if count == 0 {
                        break;
                    }
                    offset += count as u64;
                    for line in splitter.feed(&buffer[..count]) {
                        logs.push(stream, line);
                    }
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_is_the_last_marker_on_the_console() {
        let serial = "[    2.1] virtio_net\nedgible: starting the workload\nEDGIBLE_EXIT 3\r\n";
        assert_eq!(exit_code(serial), Some(3));
        assert_eq!(exit_code("EDGIBLE_EXIT 0\nEDGIBLE_EXIT 7\n"), Some(7));
        assert_eq!(exit_code("no marker\nEDGIBLE_EXIT x\n"), None);
    }

    #[test]
    fn vm_handles_persist_with_the_kind_they_run() {
        let handle = WorkloadHandle::Vm {
            runs: WorkloadKind::Process,
            pid: 7,
            start_time: 99,
            control: "/s/vms/a/qmp.sock".into(),
            slot: 3,
        };
        assert_eq!(handle.kind(), WorkloadKind::Process);
        let value = serde_json::to_value(&handle).unwrap();
        assert_eq!(value["kind"], "vm");
        assert_eq!(serde_json::from_value::<WorkloadHandle>(value).unwrap(), handle);
    }
}
