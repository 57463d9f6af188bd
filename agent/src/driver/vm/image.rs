//! The guest image: an initramfs of concatenated `newc` archives (the kernel unpacks them one
//! after the other into the same root), uncompressed so nothing is spent on compression and the
//! guest unpacks it fastest.
//!
//! - The base layer: busybox-static as `/bin/busybox`, the guest `/init` (a shell script), the
//!   virtio modules from `--vm-modules` (inserted in [`MODULES`] order) and `/dev/console`.
//! - The application layer of a `process` workload: its program and every shared library the
//!   loader maps for it ([`super::deps`]), at the same paths as on the host.
//! - The root filesystem of a `container` workload's image, exported through the engine
//!   (read by [`super::tar`]).
//! - The launch layer: the environment, the command line, the working directory and the
//!   volumes to mount (each disk's serial and mount path).
//!
//! What the agent adds lives below `/.edgible` (busybox, modules, launch files), so that a
//! container's own `/bin` and `/etc` are never shadowed.
//!
//! The base and application layers are cached by content in the image directory (named by the
//! SHA-256 of their bytes), so two VMs of the same program share them and a rebuilt identical
//! layer is not written again; the launch layer is tiny and written per VM. The guest's network
//! comes from the kernel command line (`edgible.addr=`, `edgible.gw=`), so a restored snapshot
//! and its image agree without rebuilding anything.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cpio::{Archive, CpioError, Entry};
use super::deps::{self, DepsError};
use super::tar::{TarEntry, TarError};

/// The virtio modules the guest inserts, in dependency order.
/// (`ext4` is built into Debian's cloud kernel; `virtio_blk` carries the volumes.)
pub const MODULES: &[&str] =
    &["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net", "virtio_console", "virtio_blk"];

/// What the guest prints on its serial console once the workload ended, before it reboots.
pub const EXIT_MARKER: &str = "EDGIBLE_EXIT ";
/// What a probing guest prints on its serial console as soon as `/init` runs.
pub const PROBE_MARKER: &str = "EDGIBLE_PROBE_OK";
/// What the host writes on the guest's control line (`/dev/hvc2`) to stop the workload, followed
/// by how long, in tenths of a second, the workload has between SIGTERM and SIGKILL.
pub const STOP_COMMAND: &str = "stop ";

/// A volume the guest mounts before the workload starts: the disk with this virtio serial
/// (ext4), at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub serial: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("image cache {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("kernel module {module} is not under {dir}")]
    MissingModule { module: String, dir: String },
    #[error("program {0:?} is not found on this host's PATH")]
    ProgramNotFound(String),
    #[error(transparent)]
    Deps(#[from] DepsError),
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("container filesystem: {0}")]
    Tar(#[from] TarError),
}

/// The guest's `/init`. It runs as pid 1 with nothing but the initramfs. The initramfs is
/// already in memory and writable, so `/tmp` gets no tmpfs of its own: one would hide a
/// workload that the host keeps under `/tmp` (its command is copied to the same path).
///
/// Volumes (`/.edgible/volumes`: a serial and a mount path per line) are mounted before the
/// workload starts; one that cannot be mounted ends the guest with status 125 before the
/// workload runs. A `stop N` on the control line (`/dev/hvc2`) sends the workload SIGTERM,
/// then SIGKILL after N tenths of a second. Whichever way the workload ends, every process left
/// is killed, the volumes are unmounted (their data written to the disks) and the guest powers
/// off.
const INIT: &str = r#"#!/.edgible/busybox sh
/.edgible/busybox mkdir -p /proc /sys /dev /tmp /run /.edgible/bin
/.edgible/busybox --install -s /.edgible/bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.edgible/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for word in $(cat /proc/cmdline); do
  case "$word" in
    edgible.addr=*) addr="${word#edgible.addr=}" ;;
    edgible.gw=*) gw="${word#edgible.gw=}" ;;
    edgible.probe=1) probe=1 ;;
  esac
done
if [ -n "$probe" ]; then
  echo "EDGIBLE_PROBE_OK"
  reboot -f
fi
for module in $(cat /.edgible/modules); do
  insmod "/.edgible/lib/$module.ko" || echo "edgible: cannot insert $module"
done
ip link set lo up
if [ -n "$addr" ]; then
  ip addr add "$addr" dev eth0 && ip link set eth0 up && ip route add default via "$gw" || echo "edgible: cannot configure eth0"
fi
[ -e /bin/sh ] || { mkdir -p /bin && ln -s /.edgible/busybox /bin/sh; }
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/hvc1 ] && break; sleep 0.1; done
disk() {
  for block in /sys/block/vd*; do
    [ "$(cat "$block/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${block##*/}"; return 0; }
  done
  return 1
}
if [ -s /.edgible/volumes ]; then
  while read -r serial target; do
    device=""
    for i in $(seq 1 50); do device="$(disk "$serial")" && [ -b "$device" ] && break; sleep 0.1; done
    if ! { [ -b "$device" ] && mkdir -p "$target" && mount -t ext4 "$device" "$target"; }; then
      echo "edgible: cannot mount volume $serial at $target"
      echo "EDGIBLE_EXIT 125"
      reboot -f
    fi
  done < /.edgible/volumes
fi
. /.edgible/env
mkdir -p "$(cat /.edgible/workdir)"
cd "$(cat /.edgible/workdir)"
echo "edgible: starting the workload"
/.edgible/busybox sh /.edgible/run </dev/null >/dev/hvc0 2>/dev/hvc1 &
workload=$!
if [ -e /dev/hvc2 ]; then
  (
    exec 3</dev/hvc2
    stty -F /dev/hvc2 -echo 2>/dev/null
    while read -r command limit <&3; do [ "$command" = stop ] && break; done
    echo "edgible: stopping the workload"
    kill -TERM "$workload" 2>/dev/null
    i=0
    while kill -0 "$workload" 2>/dev/null && [ "$i" -lt "${limit:-50}" ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$workload" 2>/dev/null
  ) </dev/null >/dev/null 2>&1 &
fi
wait "$workload"
status=$?
echo "EDGIBLE_EXIT $status"
kill -TERM -1 2>/dev/null
sleep 0.1
kill -KILL -1 2>/dev/null
if [ -s /.edgible/volumes ]; then
  while read -r serial target; do
    umount "$target" 2>/dev/null || mount -o remount,ro "$target" 2>/dev/null
  done < /.edgible/volumes
fi
sync
reboot -f
"#;

/// Where image layers are cached.
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Stores `bytes` under their digest unless already there; answers the layer's path.
    fn store(&self, kind: &str, bytes: &[u8]) -> Result<PathBuf, ImageError> {
        let path = self.dir.join(format!("{kind}-{}.cpio", digest(bytes)));
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| write_error(&self.dir, source))?;
        let partial = path.with_extension("cpio.partial");
        std::fs::write(&partial, bytes).map_err(|source| write_error(&partial, source))?;
        std::fs::rename(&partial, &path).map_err(|source| write_error(&path, source))?;
        Ok(path)
    }

    /// The cached layer of a container image, if there is one.
    pub fn container_cached(&self, key: &str) -> Option<PathBuf> {
        Some(self.container_path(key)).filter(|path| path.exists())
    }

    fn container_path(&self, key: &str) -> PathBuf {
        let key: String = key.chars().filter(char::is_ascii_alphanumeric).collect();
        self.dir.join(format!("container-{key}.cpio"))
    }

    /// The base layer: busybox, `/init`, the modules.
    pub fn base(&self, busybox: &Path, modules_dir: &Path) -> Result<PathBuf, ImageError> {
        let mut archive = Archive::new();
        // Everything of the agent's lives below `/.edgible`, so that a container's root
        // filesystem (unpacked on top) can have its own `/bin` (often a symlink to `usr/bin`).
        archive.add(".edgible/busybox", Entry::File { mode: 0o755, data: read(busybox)? })?;
        archive.add("init", Entry::File { mode: 0o755, data: INIT.as_bytes().to_vec() })?;
        archive.add("dev/console", Entry::CharDevice { mode: 0o600, major: 5, minor: 1 })?;
        for directory in ["proc", "sys", "tmp", "run"] {
            archive.add(directory, Entry::Directory { mode: 0o755 })?;
        }
        for module in MODULES {
            let path = find_module(modules_dir, module)?;
            archive.add(&format!(".edgible/lib/{module}.ko"), Entry::File { mode: 0o644, data: read(&path)? })?;
        }
        let list = MODULES.join("\n") + "\n";
        archive.add(".edgible/modules", Entry::File { mode: 0o644, data: list.into_bytes() })?;
        self.store("base", &archive.finish())
    }

    /// The application layer of a program and its libraries; answers it and the program's
    /// absolute path.
    pub async fn program(&self, command: &str) -> Result<(PathBuf, PathBuf), ImageError> {
        let program = locate(command)?;
        let mut files = vec![program.clone()];
        files.extend(deps::resolve(&program).await?);
        let mut archive = Archive::new();
        for file in &files {
            let relative = file.to_string_lossy().trim_start_matches('/').to_owned();
            archive.add(&relative, Entry::File { mode: 0o755, data: read(file)? })?;
        }
        Ok((self.store("app", &archive.finish())?, program))
    }
}

/// Turns a container's exported filesystem (a tar stream) into a layer, cached by `key` (the
/// image's id, itself a content digest).
pub fn container_layer(cache: &ImageCache, key: &str, tar: &[u8]) -> Result<PathBuf, ImageError> {
    let path = cache.container_path(key);
    if path.exists() {
        return Ok(path);
    }
    let mut archive = Archive::new();
    let mut files: std::collections::HashMap<String, (u32, Vec<u8>)> = std::collections::HashMap::new();
    for entry in super::tar::entries(tar)? {
        match entry {
            TarEntry::Directory { path, mode } => archive.add(&path, Entry::Directory { mode })?,
            TarEntry::File { path, mode, data } => {
                archive.add(&path, Entry::File { mode, data: data.clone() })?;
                files.insert(path, (mode, data));
            }
            TarEntry::Symlink { path, target } => archive.add(&path, Entry::Symlink { target })?,
            TarEntry::Hardlink { path, target } => {
                // newc can express hard links, but a copy is simpler and the guest's RAM holds
                // either the same way.
                if let Some((mode, data)) = files.get(&target).cloned() {
                    archive.add(&path, Entry::File { mode, data })?;
                }
            }
        }
    }
    let bytes = archive.finish();
    std::fs::create_dir_all(&cache.dir).map_err(|source| write_error(&cache.dir, source))?;
    let partial = path.with_extension("cpio.partial");
    std::fs::write(&partial, bytes).map_err(|source| write_error(&partial, source))?;
    std::fs::rename(&partial, &path).map_err(|source| write_error(&path, source))?;
    Ok(path)
}

/// The launch layer: `/.edgible/{env,run,workdir,volumes}`; `argv` is the program and its
/// arguments, `mounts` the volumes in the order of their disks.
pub fn launch_layer(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
    working_dir: Option<&str>,
    mounts: &[GuestMount],
) -> Result<Vec<u8>, ImageError> {
    let mut environment = String::new();
    for (name, value) in env {
        // Launch names are validated environment names; an image's odd ones are left out.
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        environment.push_str(&format!("export {name}={}\n", quote(value)));
    }
    let words: Vec<String> = argv.iter().map(|word| quote(word)).collect();
    let run = format!("exec {}\n", words.join(" "));
    let mut archive = Archive::new();
    archive.add(".edgible/env", Entry::File { mode: 0o600, data: environment.into_bytes() })?;
    archive.add(".edgible/run", Entry::File { mode: 0o755, data: run.into_bytes() })?;
    let workdir = working_dir.filter(|dir| !dir.is_empty()).unwrap_or("/");
    archive.add(".edgible/workdir", Entry::File { mode: 0o644, data: format!("{workdir}\n").into_bytes() })?;
    let volumes: String = mounts.iter().map(|mount| format!("{} {}\n", mount.serial, mount.path)).collect();
    archive.add(".edgible/volumes", Entry::File { mode: 0o644, data: volumes.into_bytes() })?;
    Ok(archive.finish())
}

/// Writes the VM's initramfs: the layers, then the launch layer.
pub fn assemble(target: &Path, layers: &[PathBuf], launch: &[u8]) -> Result<(), ImageError> {
    let mut bytes = Vec::new();
    for layer in layers {
        bytes.extend(read(layer)?);
    }
    bytes.extend_from_slice(launch);
    let partial = target.with_extension("partial");
    std::fs::write(&partial, &bytes).map_err(|source| write_error(&partial, source))?;
    std::fs::rename(&partial, target).map_err(|source| write_error(target, source))
}

/// A shell word that the guest's shell reads back as exactly `text`.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The absolute path of a command: as given when it has a `/`, else the first match on PATH.
fn locate(command: &str) -> Result<PathBuf, ImageError> {
    if command.contains('/') {
        let path = std::path::absolute(command).map_err(|source| ImageError::Read { path: command.into(), source })?;
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| ImageError::ProgramNotFound(command.to_owned()))
}

/// `NAME.ko` anywhere below `dir` (a kernel's `lib/modules/VERSION` tree, or a flat directory).
fn find_module(dir: &Path, module: &str) -> Result<PathBuf, ImageError> {
    let wanted = format!("{module}.ko");
    let mut stack = vec![dir.to_path_buf()];
    let mut visited = 0usize;
    while let Some(current) = stack.pop() {
        visited += 1;
        // A kernel's module tree has a few thousand directories; this bounds a wrong --vm-modules.
        if visited > 100_000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&current) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy() == wanted {
                return Ok(path);
            }
        }
    }
    Err(ImageError::MissingModule { module: module.to_owned(), dir: dir.display().to_string() })
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| ImageError::Read { path: path.display().to_string(), source })
}

fn write_error(path: &Path, source: std::io::Error) -> ImageError {
    ImageError::Write { path: path.display().to_string(), source }
}

fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        let value = "it's $HOME `x` \"y\"";
        let output = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s {}", quote(value))])
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&output.stdout), value);
    }

    #[test]
    fn the_launch_layer_exports_the_environment_and_execs_the_program() {
        let env = [("PORT".to_owned(), "8080".to_owned()), ("GREETING".to_owned(), "it's".to_owned())].into();
        let argv = ["/usr/bin/app".to_owned(), "-v".to_owned()];
        let mounts = [
            GuestMount { serial: "edgible0".into(), path: "/var/lib/data".into() },
            GuestMount { serial: "edgible1".into(), path: "/cache".into() },
        ];
        let bytes = launch_layer(&argv, &env, None, &mounts).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("export GREETING='it'\\''s'\nexport PORT='8080'\n"), "{text}");
        assert!(text.contains(".edgible/workdir"), "{text}");
        assert!(text.contains("exec '/usr/bin/app' '-v'\n"), "{text}");
        assert!(text.contains(".edgible/volumes"), "{text}");
        assert!(text.contains("edgible0 /var/lib/data\nedgible1 /cache\n"), "{text}");
    }

    #[test]
    fn layers_are_cached_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path().join("images"));
        let first = cache.store("app", b"same").unwrap();
        let second = cache.store("app", b"same").unwrap();
        let other = cache.store("app", b"other").unwrap();
        assert_eq!(first, second);
        assert_ne!(first, other);
        assert_eq!(std::fs::read_dir(dir.path().join("images")).unwrap().count(), 2);
    }

    #[test]
    fn modules_are_found_in_a_tree_and_missing_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("kernel/drivers/net");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(nested.join("virtio_net.ko"), b"elf").unwrap();
        assert_eq!(find_module(dir.path(), "virtio_net").unwrap(), nested.join("virtio_net.ko"));
        let error = find_module(dir.path(), "virtio").unwrap_err();
        assert!(error.to_string().contains("virtio is not under"), "{error}");
    }

    #[test]
    fn a_container_filesystem_becomes_a_cached_layer_with_hard_links_copied() {
        use super::super::tar::tests::entry;
        let mut tar = Vec::new();
        tar.extend(entry("bin", b'2', b"", "usr/bin"));
        tar.extend(entry("usr/bin/", b'5', b"", ""));
        tar.extend(entry("usr/bin/app", b'0', b"program", ""));
        tar.extend(entry("usr/bin/same", b'1', b"", "usr/bin/app"));
        tar.extend(vec![0u8; 1024]);
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let layer = container_layer(&cache, "sha256:abc", &tar).unwrap();
        assert_eq!(layer, dir.path().join("container-sha256abc.cpio"));
        let bytes = std::fs::read(&layer).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.matches("program").count(), 2, "the hard link is a copy");
        assert!(text.contains("bin\0") && text.contains("usr/bin"));
        // Cached: the same key does not read the archive again.
        assert_eq!(container_layer(&cache, "sha256:abc", b"garbage").unwrap(), layer);
    }

    #[tokio::test]
    async fn a_programs_layer_holds_it_and_its_libraries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let (layer, program) = cache.program("ls").await.unwrap();
        assert!(program.is_absolute());
        let bytes = std::fs::read(layer).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("libc.so.6"), "libc is in the layer");
        assert!(text.contains(program.to_string_lossy().trim_start_matches('/')));
        assert!(matches!(cache.program("no-such-program-here").await, Err(ImageError::ProgramNotFound(_))));
    }
}
