//! Volumes of applications (`spec.storage`): one ext4 image per volume, so that the size limit
//! is the filesystem's and the same image serves every runtime.
//!
//! - The image is `<state_dir>/volumes/<application_id>/<volume_name>.img`, `size_mib` long,
//!   made by `mkfs.ext4` (e2fsprogs) the first time the volume is provisioned.
//! - For `process` and `container` workloads the image is loop-mounted (`mount -o loop`) at
//!   `<state_dir>/volumes/<application_id>/<volume_name>/`: the process driver names that path
//!   in `EDGIBLE_VOLUME_<NAME>` ([`env_name`]), the container driver bind-mounts it at the
//!   volume's `mount_path`. On a cloud host ([`Volumes::new`] with `mount: false`) images are
//!   never mounted on the host: the VM driver attaches them ([`image_paths`], in spec order).
//! - Provisioning is idempotent: it runs before every start, creates what is missing and mounts
//!   what is not mounted (after an agent or host restart), so data outlives workload and agent
//!   restarts. A larger `size_mib` grows the image and, unmounted, its filesystem (`e2fsck`,
//!   `resize2fs`); a smaller one is refused, naming the volume. Before a resize or a recreation
//!   the agent waits until the unmounted image's loop device is released, so that a later
//!   `mount -o loop` cannot reuse a device with stale cached blocks.
//! - Nothing here deletes data except [`Volumes::release`] (the migration step `release`):
//!   an application leaving the desired state is stopped, its volumes are kept.
//!
//! Mounting needs root; an agent that cannot mount fails the provisioning with an error naming
//! the volume, which becomes the application's status message.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use edgible::model::{ApplicationId, Volume};
use tokio::process::Command;

/// The directory below the state directory that holds every application's volumes.
pub const VOLUMES_DIR: &str = "volumes";

/// The prefix of the variable naming a volume's mount point for process workloads.
pub const ENV_PREFIX: &str = "EDGIBLE_VOLUME_";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: cannot {action}: {source}")]
    Io { volume: String, action: &'static str, source: std::io::Error },
    #[error("volume {volume}: {command} failed: {message}")]
    Command { volume: String, command: &'static str, message: String },
    #[error("volume {volume}: cannot mount it: the agent is not running as root")]
    NotRoot { volume: String },
    #[error("volume {volume}: cannot shrink from {current_mib} MiB to {requested_mib} MiB")]
    Shrink { volume: String, current_mib: u64, requested_mib: u64 },
    #[error("cannot remove the volumes of application {application_id}: {source}")]
    Remove { application_id: ApplicationId, source: std::io::Error },
}

/// The variable that names a volume's mount point: `EDGIBLE_VOLUME_` and the name in upper
/// snake case (`app-data` → `EDGIBLE_VOLUME_APP_DATA`).
pub fn env_name(volume: &str) -> String {
    let name: String =
        volume.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("{ENV_PREFIX}{name}")
}

/// The directory of one application's volumes below `root` (`<state_dir>/volumes`).
pub fn application_dir(root: &Path, application_id: ApplicationId) -> PathBuf {
    root.join(application_id.to_string())
}

/// A volume's image file.
pub fn image_path(root: &Path, application_id: ApplicationId, volume: &str) -> PathBuf {
    application_dir(root, application_id).join(format!("{volume}.img"))
}

/// Where a volume's image is mounted on the host (process and container workloads).
pub fn mount_dir(root: &Path, application_id: ApplicationId, volume: &str) -> PathBuf {
    application_dir(root, application_id).join(volume)
}

/// The images of an application's volumes in spec order, for the VM driver to attach as
/// virtio-blk disks (`/dev/vda`, `/dev/vdb`, ... in the guest).
pub fn image_paths(root: &Path, application_id: ApplicationId, volumes: &[Volume]) -> Vec<PathBuf> {
    volumes.iter().map(|volume| image_path(root, application_id, volume.name.as_str())).collect()
}

/// The environment a process workload gets for its volumes.
pub fn process_env(root: &Path, application_id: ApplicationId, volumes: &[Volume]) -> Vec<(String, String)> {
    volumes
        .iter()
        .map(|volume| {
            let path = mount_dir(root, application_id, volume.name.as_str());
            (env_name(volume.name.as_str()), path.display().to_string())
        })
        .collect()
}

/// Provisions and releases volumes below one root. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Volumes {
    root: PathBuf,
    mount: bool,
}

impl Volumes {
    /// Volumes below `root` (`<state_dir>/volumes`); `mount` is false on a cloud host, whose
    /// images are attached to microVMs instead.
    pub fn new(root: impl Into<PathBuf>, mount: bool) -> Self {
        Self { root: root.into(), mount }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether images are mounted on the host.
    pub fn mounts(&self) -> bool {
        self.mount
    }

    /// Makes every volume exist at its size and, unless this is a cloud host, mounted. Safe to
    /// call again at every start.
    pub async fn provision(&self, application_id: ApplicationId, volumes: &[Volume]) -> Result<(), VolumeError> {
        for volume in volumes {
            let name = volume.name.as_str();
            self.ensure_image(application_id, name, volume.size_mib).await?;
            if self.mount {
                self.mount(application_id, name, false).await?;
            }
        }
        Ok(())
    }

    /// Creates the image if it is missing and grows it if it is smaller than `size_mib`.
    async fn ensure_image(&self, application_id: ApplicationId, name: &str, size_mib: u64) -> Result<(), VolumeError> {
        let image = image_path(&self.root, application_id, name);
        let io = |action: &'static str| move |source| VolumeError::Io { volume: name.to_owned(), action, source };
        let bytes = size_mib.saturating_mul(1024 * 1024);
        match fs::metadata(&image) {
            Ok(metadata) if metadata.len() > bytes => Err(VolumeError::Shrink {
                volume: name.to_owned(),
                current_mib: metadata.len() / (1024 * 1024),
                requested_mib: size_mib,
            }),
            Ok(metadata) => {
                if metadata.len() < bytes {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&image)
                        .and_then(|file| file.set_len(bytes))
                        .map_err(io("grow the image"))?;
                }
                // Compared with the filesystem rather than the file, so that a grow that
                // stopped between the two is finished by the next provisioning.
                if filesystem_bytes(name, &image).await? < bytes {
                    self.resize(application_id, name, &image).await?;
                }
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let dir = application_dir(&self.root, application_id);
                fs::create_dir_all(&dir).map_err(io("create its directory"))?;
                let partial = dir.join(format!(".{name}.img.new"));
                fs::File::create(&partial).and_then(|file| file.set_len(bytes)).map_err(io("create the image"))?;
                run(name, "mkfs.ext4", Command::new("mkfs.ext4").args(MKFS_ARGS).arg(&partial), &[0]).await?;
                // Renamed only once formatted, so a half-made image is never taken for a volume.
                fs::rename(&partial, &image).map_err(io("create the image"))
            }
            Err(error) => Err(io("read the image")(error)),
        }
    }

    /// Grows the filesystem to its image's size, offline: unmounted (the next provisioning
    /// mounts it again), checked (`resize2fs` insists; `e2fsck` exits 1 when it fixed
    /// something, which is fine here), resized.
    async fn resize(&self, application_id: ApplicationId, name: &str, image: &Path) -> Result<(), VolumeError> {
        self.unmount(application_id, name).await?;
        wait_detached(name, image).await?;
        run(name, "e2fsck", Command::new("e2fsck").arg("-f").arg("-p").arg(image), &[0, 1]).await?;
        run(name, "resize2fs", Command::new("resize2fs").arg(image), &[0]).await.map(drop)
    }

    /// Mounts a volume's image at its mount directory unless something is mounted there.
    pub async fn mount(
        &self,
        application_id: ApplicationId,
        name: &str,
        read_only: bool,
    ) -> Result<PathBuf, VolumeError> {
        let image = image_path(&self.root, application_id, name);
        let dir = mount_dir(&self.root, application_id, name);
        self.mount_at(name, &image, &dir, read_only).await?;
        Ok(dir)
    }

    async fn mount_at(&self, name: &str, image: &Path, dir: &Path, read_only: bool) -> Result<(), VolumeError> {
        fs::create_dir_all(dir).map_err(|source| VolumeError::Io {
            volume: name.to_owned(),
            action: "create its mount point",
            source,
        })?;
        if is_mounted(dir) {
            return Ok(());
        }
        if !nix::unistd::Uid::effective().is_root() {
            return Err(VolumeError::NotRoot { volume: name.to_owned() });
        }
        let options = if read_only { "loop,ro" } else { "loop" };
        run(name, "mount", Command::new("mount").args(["-o", options]).arg(image).arg(dir), &[0]).await.map(drop)
    }

    /// Unmounts a volume if it is mounted.
    pub async fn unmount(&self, application_id: ApplicationId, name: &str) -> Result<(), VolumeError> {
        unmount_dir(name, &mount_dir(&self.root, application_id, name)).await
    }

    /// Whether the application has any volume image on this device.
    pub fn exists(&self, application_id: ApplicationId) -> bool {
        application_dir(&self.root, application_id).exists()
    }

    /// Unmounts and deletes every volume of the application: images, mount points, and the
    /// directory. The only way volume data is deleted.
    pub async fn release(&self, application_id: ApplicationId) -> Result<(), VolumeError> {
        let dir = application_dir(&self.root, application_id);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(VolumeError::Remove { application_id, source }),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                let name = entry.file_name().to_string_lossy().into_owned();
                unmount_dir(&name, &path).await?;
            }
        }
        fs::remove_dir_all(&dir).map_err(|source| VolumeError::Remove { application_id, source })
    }

    /// Replaces a volume with a fresh, empty image of `size_mib` (restore), unmounted.
    pub async fn recreate(&self, application_id: ApplicationId, name: &str, size_mib: u64) -> Result<(), VolumeError> {
        self.unmount(application_id, name).await?;
        let image = image_path(&self.root, application_id, name);
        if image.exists() {
            wait_detached(name, &image).await?;
        }
        match fs::remove_file(&image) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VolumeError::Io { volume: name.to_owned(), action: "remove the old image", source });
            }
        }
        self.ensure_image(application_id, name, size_mib).await
    }

    /// Mounts a volume for reading or writing its files while its workload is stopped, at its
    /// usual mount point, or (cloud host) at a private one that [`Volumes::unmount_private`]
    /// takes down again.
    pub async fn mount_for_files(
        &self,
        application_id: ApplicationId,
        name: &str,
        read_only: bool,
    ) -> Result<PathBuf, VolumeError> {
        if self.mount {
            return self.mount(application_id, name, read_only).await;
        }
        let image = image_path(&self.root, application_id, name);
        let dir = application_dir(&self.root, application_id).join(format!(".{name}.files"));
        self.mount_at(name, &image, &dir, read_only).await?;
        Ok(dir)
    }

    /// Takes down what [`Volumes::mount_for_files`] mounted on a cloud host; nothing otherwise
    /// (the host mount stays for the workload).
    pub async fn unmount_private(&self, application_id: ApplicationId, name: &str) -> Result<(), VolumeError> {
        if self.mount {
            return Ok(());
        }
        let dir = application_dir(&self.root, application_id).join(format!(".{name}.files"));
        unmount_dir(name, &dir).await?;
        let _ = fs::remove_dir(&dir);
        Ok(())
    }
}

async fn unmount_dir(name: &str, dir: &Path) -> Result<(), VolumeError> {
    if !is_mounted(dir) {
        return Ok(());
    }
    run(name, "umount", Command::new("umount").arg(dir), &[0]).await.map(drop)
}

/// `mkfs.ext4`'s arguments: quiet, on a file, and fast (a restore formats while the
/// application is down): no discard of the fresh sparse file, and the inode tables and the
/// journal are zeroed lazily by the kernel after mounting instead of by `mkfs`.
const MKFS_ARGS: [&str; 4] = ["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"];

/// Waits (bounded) until no loop device is attached to an unmounted image. An unmount releases
/// its loop device lazily, and `mount -o loop` reuses a device still attached to the same
/// file, whose cached blocks would predate a resize or a recreation of the image.
async fn wait_detached(name: &str, image: &Path) -> Result<(), VolumeError> {
    for attempt in 0..200 {
        let listed = run(name, "losetup", Command::new("losetup").arg("-j").arg(image), &[0]).await?;
        let devices: Vec<&str> =
            listed.lines().filter_map(|line| line.split_once(':').map(|(device, _)| device)).collect();
        if devices.is_empty() {
            return Ok(());
        }
        if attempt == 100 {
            // Still there after 5 s: detach them ourselves (an error means it went meanwhile).
            for device in devices {
                let _ = run(name, "losetup", Command::new("losetup").arg("-d").arg(device), &[0]).await;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(VolumeError::Command {
        volume: name.to_owned(),
        command: "losetup",
        message: "a loop device stays attached to the image after it was unmounted".to_owned(),
    })
}

/// The size of the ext4 filesystem in an image, from its superblock (`dumpe2fs -h`).
async fn filesystem_bytes(name: &str, image: &Path) -> Result<u64, VolumeError> {
    let output = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|error| VolumeError::Command {
            volume: name.to_owned(),
            command: "dumpe2fs",
            message: error.to_string(),
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |label: &str| -> Option<u64> {
        text.lines().find_map(|line| line.strip_prefix(label)).and_then(|value| value.trim().parse().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(count), Some(size)) => Ok(count.saturating_mul(size)),
        _ => Err(VolumeError::Command {
            volume: name.to_owned(),
            command: "dumpe2fs",
            message: format!("no block count in its answer: {}", String::from_utf8_lossy(&output.stderr).trim()),
        }),
    }
}

/// Whether `dir` is a mount point, from `/proc/self/mountinfo` (the fifth field; spaces and
/// other special characters are octal-escaped there).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else { return false };
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let wanted = escape_mount_path(&dir.to_string_lossy());
    mountinfo.lines().any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

fn escape_mount_path(path: &str) -> String {
    let mut escaped = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => escaped.push_str("\\040"),
            '\t' => escaped.push_str("\\011"),
            '\n' => escaped.push_str("\\012"),
            '\\' => escaped.push_str("\\134"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Runs a tool to completion; any exit status outside `ok` is an error with its output.
/// Runs a tool to completion and answers its standard output; any exit status outside `ok` is
/// an error with its output.
async fn run(volume: &str, name: &'static str, command: &mut Command, ok: &[i32]) -> Result<String, VolumeError> {
    let output =
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).output().await.map_err(|error| {
            VolumeError::Command { volume: volume.to_owned(), command: name, message: error.to_string() }
        })?;
    if output.status.code().is_some_and(|code| ok.contains(&code)) {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if message.is_empty() {
        message = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    if message.is_empty() {
        message = output.status.to_string();
    }
    Err(VolumeError::Command { volume: volume.to_owned(), command: name, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_upper_snake_case() {
        assert_eq!(env_name("data"), "EDGIBLE_VOLUME_DATA");
        assert_eq!(env_name("app-data-2"), "EDGIBLE_VOLUME_APP_DATA_2");
    }

    #[test]
    fn paths_follow_the_contract() {
        let root = Path::new("/var/lib/edgible/volumes");
        let id = ApplicationId::new();
        assert_eq!(image_path(root, id, "data"), PathBuf::from(format!("/var/lib/edgible/volumes/{id}/data.img")));
        assert_eq!(mount_dir(root, id, "data"), PathBuf::from(format!("/var/lib/edgible/volumes/{id}/data")));
        let volumes: Vec<Volume> = serde_json::from_value(serde_json::json!([
            {"name": "b", "size_mib": 1, "mount_path": "/b"},
            {"name": "a", "size_mib": 1, "mount_path": "/a"},
        ]))
        .expect("volumes");
        let images = image_paths(root, id, &volumes);
        assert_eq!(images, [image_path(root, id, "b"), image_path(root, id, "a")], "spec order");
        let env = process_env(root, id, &volumes);
        assert_eq!(env[0], ("EDGIBLE_VOLUME_B".to_owned(), mount_dir(root, id, "b").display().to_string()));
    }

    #[test]
    fn mount_paths_are_escaped_like_mountinfo() {
        assert_eq!(escape_mount_path("/a b\\c"), "/a\\040b\\134c");
        assert!(is_mounted(Path::new("/")), "the root is always a mount point");
        assert!(!is_mounted(Path::new("/proc/self")), "a directory inside a mount is not one");
    }
}
