//! Virtual machine monitors: the [`Vmm`] trait the VM driver uses, and its QEMU backend.
//!
//! A [`Vmm`] turns a [`MachineConfig`] into a running monitor process and drives it through
//! create (the process exists, the guest has not run), start, pause, resume, stop,
//! snapshot-to-file and restore. Machines are named by [`MachineId`] (pid, start time, control
//! socket), which is all an agent restart needs to find one again.
//!
//! [`Qemu`] runs `qemu-system-x86_64 -M microvm,acpi=on` and speaks QMP on a unix socket:
//! create = the process with `-S`; start/resume = `cont`; pause = `stop`; snapshot = pause, then
//! `migrate` to a `file:` URI (only touched memory is written); restore = a new process with the
//! same devices and `-incoming file:...`, then `cont`; stop = `quit`, then SIGTERM, then SIGKILL.
//!
//! A Firecracker backend would implement the same trait over its REST API on a unix socket:
//! create = spawn `firecracker --api-sock` and PUT `/machine-config`, `/boot-source`
//! (kernel, initrd, the same command line) and `/network-interfaces` (the same tap); start = PUT
//! `/actions` `InstanceStart`; pause/resume = PATCH `/vm`; snapshot = PATCH `/vm` Paused, then PUT
//! `/snapshot/create` (memory file + state file); restore = a new process and PUT
//! `/snapshot/load`; stop = `SendCtrlAltDel`, then signals. Its console is one serial port, so
//! the guest `/init` would write the workload's output there instead of to virtio consoles.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use super::qmp::{Qmp, QmpError};
use crate::driver::process::{Liveness, ProcessIdentity};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("the monitor exited during startup: {0}")]
    Exited(String),
    #[error("the monitor's control socket did not appear within {0:?}")]
    NoSocket(Duration),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("snapshot failed: {0}")]
    Snapshot(String),
    #[error("cannot signal pid {pid}: {source}")]
    Signal { pid: i32, source: nix::Error },
    #[error("monitor pid {pid} still runs after SIGKILL")]
    StopTimedOut { pid: i32 },
}

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Everything a monitor needs to run one guest; persisted beside it so that a restore after an
/// agent restart uses exactly the same devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel parameters after the fixed ones (the guest's network, the probe flag).
    pub extra_cmdline: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// The host tap device and the guest's MAC address, if the guest has a network.
    pub tap: Option<(String, String)>,
    /// The directory with the control socket and the console files.
    pub dir: PathBuf,
    /// Raw disk images attached as virtio-blk disks in this order, the `N`th with the serial
    /// [`disk_serial`]`(N)` (the application's volumes).
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Whether the guest has a control line (a third virtio console on a unix socket, see
    /// [`MachineConfig::control_line`]). Recorded, so that a machine booted without one is
    /// restored without one.
    #[serde(default)]
    pub control: bool,
}

impl MachineConfig {
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    pub fn stdout_log(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }

    pub fn stderr_log(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    /// The unix socket of the guest's control line (`/dev/hvc2` in the guest).
    pub fn control_line(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn kernel_cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "tsc_early_khz=2400000".to_owned(),
            "earlyprintk=ttyS0".to_owned(),
            "quiet".to_owned(),
            "panic=-1".to_owned(),
            "reboot=t".to_owned(),
        ];
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// QEMU's arguments; with `incoming`, the process waits for a snapshot instead of booting.
    pub fn qemu_args(&self, incoming: Option<&Path>) -> Vec<String> {
        let mut args: Vec<String> = [
            "-M",
            "microvm,acpi=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let path = |path: PathBuf| path.display().to_string();
        args.extend([
            "-accel".into(),
            match self.accel {
                Accel::Kvm => "kvm".into(),
                Accel::Tcg => "tcg".into(),
            },
        ]);
        args.extend([
            "-cpu".into(),
            match self.accel {
                Accel::Kvm => "host".into(),
                Accel::Tcg => "max".into(),
            },
        ]);
        args.extend(["-smp".into(), self.vcpus.to_string(), "-m".into(), self.memory_mib.to_string()]);
        args.extend(["-kernel".into(), path(self.kernel.clone()), "-initrd".into(), path(self.initrd.clone())]);
        args.extend(["-append".into(), self.kernel_cmdline()]);
        args.extend(["-serial".into(), format!("file:{}", path(self.serial_log()))]);
        if let Some((tap, mac)) = &self.tap {
            args.extend(["-netdev".into(), format!("tap,id=n0,ifname={tap},script=no,downscript=no")]);
            args.extend(["-device".into(), format!("virtio-net-device,netdev=n0,mac={mac}")]);
        }
        args.extend(["-device".into(), "virtio-serial-device".into()]);
        for (id, file) in [("out", self.stdout_log()), ("err", self.stderr_log())] {
            args.extend(["-chardev".into(), format!("file,id={id},path={},append=on", path(file))]);
            args.extend(["-device".into(), format!("virtconsole,chardev={id}")]);
        }
        if self.control {
            let line = option_value(&path(self.control_line()));
            args.extend(["-chardev".into(), format!("socket,id=ctl,path={line},server=on,wait=off")]);
            args.extend(["-device".into(), "virtconsole,chardev=ctl".into()]);
        }
        for (index, disk) in self.disks.iter().enumerate() {
            let file = option_value(&path(disk.clone()));
            args.extend(["-drive".into(), format!("file={file},format=raw,if=none,id=v{index}")]);
            args.extend(["-device".into(), format!("virtio-blk-device,drive=v{index},serial={}", disk_serial(index))]);
        }
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", path(self.control_socket()))]);
        match incoming {
            Some(snapshot) => args.extend(["-incoming".into(), format!("file:{}", path(snapshot.to_path_buf()))]),
            None => args.push("-S".into()),
        }
        args
    }
}

/// The serial of the `index`th disk, by which the guest's `/init` finds it
/// (`/sys/block/vd*/serial`), whatever order the kernel names the disks in.
pub fn disk_serial(index: usize) -> String {
    format!("edgible{index}")
}

/// A value inside a QEMU option list: commas are doubled.
fn option_value(text: &str) -> String {
    text.replace(',', ",,")
}

/// A locally administered MAC address for a VM's slot.
pub fn mac_for(slot: u32) -> String {
    let [_, a, b, c] = slot.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// How to find a running machine again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineId {
    pub pid: i32,
    pub start_time: u64,
    pub control: PathBuf,
}

impl MachineId {
    pub fn alive(&self) -> bool {
        let identity = ProcessIdentity { pid: self.pid, start_time: self.start_time };
        matches!(identity.liveness(), Ok(Liveness::Running))
    }
}

/// A virtual machine monitor.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync {
    /// Starts the monitor with the guest not yet running.
    async fn create(&self, config: &MachineConfig) -> Result<MachineId, VmmError>;
    /// Lets a created machine run.
    async fn start(&self, machine: &MachineId) -> Result<(), VmmError>;
    async fn pause(&self, machine: &MachineId) -> Result<(), VmmError>;
    async fn resume(&self, machine: &MachineId) -> Result<(), VmmError>;
    /// Pauses the machine and writes its whole state to `file`; it stays paused, in memory.
    async fn snapshot(&self, machine: &MachineId, file: &Path) -> Result<(), VmmError>;
    /// A new, paused monitor process holding the state `snapshot` wrote to `file`.
    async fn restore(&self, config: &MachineConfig, file: &Path) -> Result<MachineId, VmmError>;
    /// Ends the machine: politely, then SIGTERM after `grace`, then SIGKILL.
    async fn stop(&self, machine: &MachineId, grace: Duration) -> Result<(), VmmError>;
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    /// The time limit of one QMP exchange and of the control socket's appearance.
    pub control_timeout: Duration,
    /// The longest a snapshot may take to write.
    pub snapshot_timeout: Duration,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            control_timeout: Duration::from_secs(10),
            snapshot_timeout: Duration::from_secs(60),
        }
    }
}

impl Qemu {
    async fn spawn(&self, config: &MachineConfig, incoming: Option<&Path>) -> Result<MachineId, VmmError> {
        let spawn_error = |source| VmmError::Spawn { program: self.binary.display().to_string(), source };
        std::fs::create_dir_all(&config.dir).map_err(spawn_error)?;
        let control = config.control_socket();
        let _ = std::fs::remove_file(&control);
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.dir.join("qemu.log"))
            .map_err(spawn_error)?;
        let errors = output.try_clone().map_err(spawn_error)?;
        let mut child = tokio::process::Command::new(&self.binary)
            .args(config.qemu_args(incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(errors))
            // Its own process group: signals to the agent's group (Ctrl-C) do not reach it, and
            // it outlives an agent restart like any workload.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(spawn_error)?;
        let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
        let identity = match pid {
            Some(pid) => ProcessIdentity::of(pid).ok().flatten(),
            None => None,
        };
        let deadline = Instant::now() + self.control_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(config.dir.join("qemu.log")).unwrap_or_default();
                let tail: String =
                    log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
                return Err(VmmError::Exited(format!("{status}: {tail}")));
            }
            if control.exists() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(VmmError::NoSocket(self.control_timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Some(identity) = identity else {
            return Err(VmmError::Exited("the process vanished right after it started".into()));
        };
        // Reap the child whenever it ends; liveness is watched through /proc by pid and start time.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(MachineId { pid: identity.pid, start_time: identity.start_time, control })
    }

    async fn qmp(&self, machine: &MachineId) -> Result<Qmp<tokio::net::UnixStream>, VmmError> {
        Ok(Qmp::connect(&machine.control, self.control_timeout).await?)
    }
}

#[async_trait::async_trait]
impl Vmm for Qemu {
    async fn create(&self, config: &MachineConfig) -> Result<MachineId, VmmError> {
        self.spawn(config, None).await
    }

    async fn start(&self, machine: &MachineId) -> Result<(), VmmError> {
        self.qmp(machine).await?.execute("cont", None).await?;
        Ok(())
    }

    async fn pause(&self, machine: &MachineId) -> Result<(), VmmError> {
        self.qmp(machine).await?.execute("stop", None).await?;
        Ok(())
    }

    async fn resume(&self, machine: &MachineId) -> Result<(), VmmError> {
        self.qmp(machine).await?.execute("cont", None).await?;
        Ok(())
    }

    async fn snapshot(&self, machine: &MachineId, file: &Path) -> Result<(), VmmError> {
        let mut qmp = self.qmp(machine).await?;
        qmp.execute("stop", None).await?;
        let _ = std::fs::remove_file(file);
        let partial = file.with_extension("partial");
        let _ = std::fs::remove_file(&partial);
        qmp.execute("migrate", Some(json!({"uri": format!("file:{}", partial.display())}))).await?;
        let deadline = Instant::now() + self.snapshot_timeout;
        loop {
            let state = qmp.execute("query-migrate", None).await?;
            match state.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    let reason =
                        state.get("error-desc").and_then(serde_json::Value::as_str).unwrap_or("no reason given");
                    return Err(VmmError::Snapshot(reason.to_owned()));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = qmp.execute("migrate_cancel", None).await;
                return Err(VmmError::Snapshot(format!("not written within {:?}", self.snapshot_timeout)));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::rename(&partial, file).map_err(|error| VmmError::Snapshot(error.to_string()))
    }

    async fn restore(&self, config: &MachineConfig, file: &Path) -> Result<MachineId, VmmError> {
        let machine = self.spawn(config, Some(file)).await?;
        let mut qmp = self.qmp(&machine).await?;
        let deadline = Instant::now() + self.snapshot_timeout;
        loop {
            let status = qmp.status().await?;
            if status != "inmigrate" {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.stop(&machine, Duration::ZERO).await;
                return Err(VmmError::Snapshot(format!("not restored within {:?}", self.snapshot_timeout)));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(machine)
    }

    async fn stop(&self, machine: &MachineId, grace: Duration) -> Result<(), VmmError> {
        if !machine.alive() {
            return Ok(());
        }
        if let Ok(mut qmp) = self.qmp(machine).await {
            // `quit` may close the socket before answering.
            let _ = qmp.execute("quit", None).await;
        }
        if wait_gone(machine, grace).await {
            return Ok(());
        }
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            match kill(Pid::from_raw(machine.pid), signal) {
                Ok(()) => {}
                Err(nix::errno::Errno::ESRCH) => return Ok(()),
                Err(source) => return Err(VmmError::Signal { pid: machine.pid, source }),
            }
            if wait_gone(machine, Duration::from_secs(5)).await {
                return Ok(());
            }
        }
        Err(VmmError::StopTimedOut { pid: machine.pid })
    }
}

/// Waits until the machine's monitor process is gone, for at most `timeout`; answers whether it is.
pub async fn wait_gone(machine: &MachineId, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !machine.alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether KVM runs a guest here: boots `initrd` (whose `/init` prints
/// [`super::image::PROBE_MARKER`] on `edgible.probe=1`) once with KVM and waits for the marker.
pub async fn probe_kvm(qemu: &Qemu, kernel: &Path, initrd: &Path, dir: &Path, timeout: Duration) -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let config = MachineConfig {
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        extra_cmdline: vec!["edgible.probe=1".into()],
        vcpus: 1,
        memory_mib: 128,
        accel: Accel::Kvm,
        tap: None,
        dir: dir.to_path_buf(),
        disks: Vec::new(),
        control: false,
    };
    let _ = std::fs::remove_dir_all(dir);
    let Ok(machine) = qemu.create(&config).await else { return false };
    let reached = async {
        qemu.start(&machine).await.ok()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let serial = std::fs::read_to_string(config.serial_log()).unwrap_or_default();
            if serial.contains(super::image::PROBE_MARKER) {
                return Some(());
            }
            if !machine.alive() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
    .await
    .is_some();
    let _ = qemu.stop(&machine, Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(dir);
    reached
}

/// The guest address of a `/30` link as the kernel parameters `/init` reads.
pub fn network_cmdline(guest: Ipv4Addr, host: Ipv4Addr) -> Vec<String> {
    vec![format!("edgible.addr={guest}/30"), format!("edgible.gw={host}")]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MachineConfig {
        MachineConfig {
            kernel: "/k/vmlinuz".into(),
            initrd: "/s/initrd".into(),
            extra_cmdline: network_cmdline("198.51.100.2".parse().unwrap(), "198.51.100.1".parse().unwrap()),
            vcpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            tap: Some(("edgvm0".into(), mac_for(0))),
            dir: "/s/vm".into(),
            disks: Vec::new(),
            control: false,
        }
    }

    #[test]
    fn volumes_are_serial_numbered_disks_and_the_control_line_a_third_console() {
        let mut config = config();
        config.disks = vec!["/s/volumes/a/data.img".into(), "/s/volumes/a/odd,name.img".into()];
        config.control = true;
        let args = config.qemu_args(None).join(" ");
        for expected in [
            "-drive file=/s/volumes/a/data.img,format=raw,if=none,id=v0 -device virtio-blk-device,drive=v0,serial=edgible0",
            "-drive file=/s/volumes/a/odd,,name.img,format=raw,if=none,id=v1 -device virtio-blk-device,drive=v1,serial=edgible1",
            "-chardev socket,id=ctl,path=/s/vm/control.sock,server=on,wait=off -device virtconsole,chardev=ctl",
        ] {
            assert!(args.contains(expected), "{expected:?} in {args}");
        }
        // The control line comes after stdout and stderr: it is the guest's /dev/hvc2.
        assert!(args.find("chardev=err").unwrap() < args.find("chardev=ctl").unwrap());
        let without = super::tests::config().qemu_args(None).join(" ");
        assert!(!without.contains("virtio-blk") && !without.contains("control.sock"), "{without}");
        // Recorded machines from before volumes and the control line still load.
        let mut old = serde_json::to_value(super::tests::config()).unwrap();
        let object = old.as_object_mut().unwrap();
        object.remove("disks");
        object.remove("control");
        let loaded: MachineConfig = serde_json::from_value(old).unwrap();
        assert!(loaded.disks.is_empty() && !loaded.control);
    }

    #[test]
    fn the_command_line_has_the_machine_limits_devices_and_control_socket() {
        let args = config().qemu_args(None).join(" ");
        for expected in [
            "-M microvm,acpi=on",
            "-accel tcg -cpu max -smp 2 -m 512",
            "-kernel /k/vmlinuz -initrd /s/initrd",
            "-append console=ttyS0 tsc_early_khz=2400000 earlyprintk=ttyS0 quiet panic=-1 reboot=t edgible.addr=198.51.100.2/30 edgible.gw=198.51.100.1",
            "-netdev tap,id=n0,ifname=edgvm0,script=no,downscript=no -device virtio-net-device,netdev=n0,mac=52:54:00:00:00:00",
            "-chardev file,id=out,path=/s/vm/stdout.log,append=on -device virtconsole,chardev=out",
            "-qmp unix:/s/vm/qmp.sock,server=on,wait=off",
        ] {
            assert!(args.contains(expected), "{expected:?} in {args}");
        }
        assert!(args.ends_with(" -S"), "created paused");
        let restored = config().qemu_args(Some(Path::new("/s/vm/snapshot"))).join(" ");
        assert!(restored.ends_with("-incoming file:/s/vm/snapshot"), "{restored}");
        assert!(!restored.contains(" -S"));
    }

    #[test]
    fn macs_are_local_and_distinct_per_slot() {
        assert_eq!(mac_for(0), "52:54:00:00:00:00");
        assert_eq!(mac_for(258), "52:54:00:00:01:02");
    }
}
