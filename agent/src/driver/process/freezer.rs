//! Suspending a process workload: the cgroup v1 freezer when the host mounts one, else
//! SIGSTOP/SIGCONT of the process group.
//!
//! With the freezer, every member of the workload's process group is moved into the cgroup
//! `<freezer mount>/edgible/<application id>` and the cgroup is frozen; the kernel stops the
//! tasks where they are, without a signal the workload could observe, and children forked
//! later stay in the cgroup. Without it (cgroup v2 only hosts, containers without the
//! hierarchy), SIGSTOP stops the group the same way from the outside, although a workload that
//! waits for its children may notice. Resuming thaws the cgroup and sends SIGCONT, which is
//! harmless when not needed, so it also releases a workload a previous agent left suspended.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgible::model::ApplicationId;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::group_members;

/// How a workload was suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspension {
    Freezer,
    Signal,
}

/// How long the kernel may take to report a cgroup frozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// The freezer hierarchy's mount point, from `/proc/self/mounts`.
pub fn freezer_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mount_of(&mounts)
}

/// The mount point of the first `cgroup` mount with the `freezer` option.
fn mount_of(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (point, kind, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        (*kind == "cgroup" && options.split(',').any(|option| option == "freezer")).then(|| PathBuf::from(point))
    })
}

fn cgroup_dir(mount: &Path, application_id: ApplicationId) -> PathBuf {
    mount.join("edgible").join(application_id.to_string())
}

/// Suspends the process group `pgid`: frozen if the freezer works, else stopped by signal.
pub async fn suspend(application_id: ApplicationId, pgid: i32) -> Result<Suspension, String> {
    suspend_with(freezer_mount(), application_id, pgid).await
}

async fn suspend_with(mount: Option<PathBuf>, application_id: ApplicationId, pgid: i32) -> Result<Suspension, String> {
    if let Some(mount) = mount {
        match freeze(&cgroup_dir(&mount, application_id), pgid).await {
            Ok(()) => return Ok(Suspension::Freezer),
            Err(error) => {
                tracing::warn!(%application_id, %error, "the cgroup freezer failed; stopping by signal instead")
            }
        }
    }
    killpg(Pid::from_raw(pgid), Signal::SIGSTOP)
        .map_err(|error| format!("cannot stop process group {pgid}: {error}"))?;
    Ok(Suspension::Signal)
}

async fn freeze(dir: &Path, pgid: i32) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let members = group_members(pgid).map_err(|error| error.to_string())?;
    if members.is_empty() {
        return Err(format!("process group {pgid} has no live member"));
    }
    let procs = dir.join("cgroup.procs");
    for pid in members {
        // A member that exited meanwhile cannot be moved; the others still can.
        if let Err(error) = std::fs::write(&procs, pid.to_string())
            && group_members(pgid).is_ok_and(|members| members.contains(&pid))
        {
            return Err(format!("cannot move process {pid} into {}: {error}", procs.display()));
        }
    }
    let state = dir.join("freezer.state");
    std::fs::write(&state, "FROZEN").map_err(|error| format!("cannot write {}: {error}", state.display()))?;
    let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if std::fs::read_to_string(&state).is_ok_and(|text| text.trim() == "FROZEN") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = std::fs::write(&state, "THAWED");
    Err(format!("{} did not freeze within {FREEZE_TIMEOUT:?}", dir.display()))
}

/// Lets the group run again, however it was suspended (also when it was not).
pub fn resume(application_id: ApplicationId, pgid: Option<i32>) -> Result<(), String> {
    if let Some(mount) = freezer_mount() {
        let state = cgroup_dir(&mount, application_id).join("freezer.state");
        if state.exists() {
            std::fs::write(&state, "THAWED").map_err(|error| format!("cannot write {}: {error}", state.display()))?;
        }
    }
    if let Some(pgid) = pgid
        && group_members(pgid).is_ok_and(|members| !members.is_empty())
    {
        killpg(Pid::from_raw(pgid), Signal::SIGCONT)
            .map_err(|error| format!("cannot continue process group {pgid}: {error}"))?;
    }
    Ok(())
}

/// Removes the application's (empty) cgroup, if any.
pub fn remove(application_id: ApplicationId) {
    if let Some(mount) = freezer_mount() {
        let dir = cgroup_dir(&mount, application_id);
        if dir.exists()
            && let Err(error) = std::fs::remove_dir(&dir)
        {
            tracing::debug!(dir = %dir.display(), %error, "could not remove a freezer cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;
    use crate::driver::process::procfs::read_stat;

    /// A `sleep` leading its own process group, killed and reaped on drop.
    struct Sleeper(i32, std::process::Child);

    impl Sleeper {
        fn spawn() -> Self {
            let child = std::process::Command::new("sleep").arg("30").process_group(0).spawn().expect("sleep runs");
            Self(i32::try_from(child.id()).expect("a pid"), child)
        }

        fn state(&self) -> char {
            read_stat(self.0).expect("readable").expect("alive").state
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = killpg(Pid::from_raw(self.0), Signal::SIGCONT);
            let _ = self.1.kill();
            let _ = self.1.wait();
        }
    }

    #[tokio::test]
    async fn without_a_freezer_the_group_is_stopped_and_continued_by_signal() {
        let sleeper = Sleeper::spawn();
        let application_id = ApplicationId::new();
        assert_eq!(suspend_with(None, application_id, sleeper.0).await, Ok(Suspension::Signal));
        for _ in 0..100 {
            if sleeper.state() == 'T' {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sleeper.state(), 'T', "stopped");
        resume(application_id, Some(sleeper.0)).expect("resumed");
        for _ in 0..100 {
            if sleeper.state() != 'T' {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_ne!(sleeper.state(), 'T', "running again");
    }

    #[tokio::test]
    async fn with_the_freezer_the_cgroup_is_frozen_and_thawed() {
        let Some(mount) = freezer_mount() else {
            eprintln!("skipped: this host mounts no cgroup v1 freezer");
            return;
        };
        let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("procfs")) == 0;
        if !root {
            eprintln!("skipped: the freezer needs root");
            return;
        }
        let sleeper = Sleeper::spawn();
        let application_id = ApplicationId::new();
        assert_eq!(suspend_with(Some(mount.clone()), application_id, sleeper.0).await, Ok(Suspension::Freezer));
        let state = cgroup_dir(&mount, application_id).join("freezer.state");
        assert_eq!(std::fs::read_to_string(&state).expect("state").trim(), "FROZEN");
        resume(application_id, Some(sleeper.0)).expect("resumed");
        assert_eq!(std::fs::read_to_string(&state).expect("state").trim(), "THAWED");
        drop(sleeper);
        for _ in 0..100 {
            remove(application_id);
            if !cgroup_dir(&mount, application_id).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!cgroup_dir(&mount, application_id).exists(), "the empty cgroup is removed");
    }

    #[test]
    fn finds_the_freezer_mount() {
        let mounts = "proc /proc proc rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(mount_of(mounts), Some(PathBuf::from("/sys/fs/cgroup/freezer")));
        assert_eq!(mount_of("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n"), None);
        assert_eq!(mount_of("cgroup /x cgroup rw,freezer_not 0 0\n"), None);
    }
}
