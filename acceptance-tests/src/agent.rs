//! Real `edgible-agent` processes, each with its own state directory, and a TCP relay that
//! keeps the address agents enrolled with while the server behind it restarts on a new port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};

use crate::bin_path;

/// An agent's state directory. Dropping it kills the workloads its `state.json` records
/// (process groups, containers): agents leave workloads running when they stop, and a test
/// must not leave them behind, passed or failed.
#[derive(Debug)]
pub struct AgentHome {
    pub dir: PathBuf,
}

impl AgentHome {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned() })
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Where the agents of this home write their logs (appended across restarts).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Runs `edgible-agent enroll` and answers how it went, successful or not.
    pub fn enroll(&self, server: &str, token: &str) -> anyhow::Result<Output> {
        Command::new(bin_path("edgible-agent")?)
            .args(["enroll", "--server", server, "--token", token, "--state-dir"])
            .arg(self.state_dir())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .context("running edgible-agent enroll")
    }

    /// What the agent's `state.json` says, if there is one.
    pub fn state(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.state_dir().join("state.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The agent's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Kills every workload `state.json` records. A process is killed only if it still is the
    /// recorded one (same start time), never a later process that reuses its pid.
    pub fn kill_workloads(&self) {
        let Some(state) = self.state() else { return };
        let Some(workloads) = state["workloads"].as_object() else { return };
        for record in workloads.values() {
            let handle = &record["handle"];
            match handle["kind"].as_str() {
                Some("process") => {
                    let (Some(pid), Some(start_time)) = (handle["pid"].as_i64(), handle["start_time"].as_u64()) else {
                        continue;
                    };
                    if process_start_time(pid) == Some(start_time) {
                        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
                    }
                }
                Some("container") => {
                    if let Some(id) = handle["id"].as_str() {
                        let _ = Command::new("docker")
                            .args(["rm", "--force", id])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                }
                _ => {}
            }
        }
    }
}

impl Drop for AgentHome {
    fn drop(&mut self) {
        self.kill_workloads();
        // Volumes (loop-mounted images, issue 10) outlive the agent; the directory cannot go
        // while they are mounted.
        unmount_under(&self.dir);
    }
}

/// Lazily unmounts every mount point under `dir` (deepest first), so that the directory can
/// be deleted; a loop device mounted with `-o loop` is freed once its last user goes. Agents
/// run with `nsenter --net` only, so their mounts are in this process's mount namespace.
pub fn unmount_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points = mount_points_under(&mountinfo, &dir);
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let _ = Command::new("umount").arg("-l").arg(&point).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
    // Loop devices do not always go with their mount (one attached with `losetup`, or mounted
    // through an existing device, has no autoclear). Detaching a busy one marks it to go
    // when its last user does.
    let Ok(blocks) = std::fs::read_dir("/sys/block") else { return };
    for block in blocks.filter_map(Result::ok) {
        let name = block.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read_to_string(block.path().join("loop/backing_file")) else { continue };
        if backing_file_under(&backing, &dir) {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(format!("/dev/{name}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether a loop device's backing file (`/sys/block/loopN/loop/backing_file`, which ends with
/// ` (deleted)` once the file is gone) is under `dir`.
fn backing_file_under(backing: &str, dir: &Path) -> bool {
    let backing = backing.trim_end();
    let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
    Path::new(backing).starts_with(dir)
}

/// The mount points in `mountinfo` (the text of `/proc/PID/mountinfo`) at or under `dir`.
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_point(point)))
        .filter(|point| point.starts_with(dir))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_point(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && let Some(code) = text.get(index + 1..index + 4).and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(code);
            index += 4;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The start time of a process in clock ticks after boot (`/proc/PID/stat`, field 22), which
/// tells it apart from a later process with the same pid.
pub fn process_start_time(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it do not.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A running `edgible-agent run`. Dropping it stops the agent with SIGTERM, leaving its
/// workloads to the [`AgentHome`].
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    /// Starts the agent of `home` with test-friendly timing: reconnects at most 2 s apart,
    /// workloads stopped within 3 s, and no container engine unless `extra_args` ask.
    pub fn start(home: &AgentHome, extra_args: &[&str]) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(home.log_file())?;
        let mut command = Command::new(bin_path("edgible-agent")?);
        command.args(["run", "--state-dir"]).arg(home.state_dir()).args([
            "--reconnect-max-seconds",
            "2",
            "--stop-grace-seconds",
            "3",
            "--requeue-seconds",
            "2",
        ]);
        if !extra_args.contains(&"--container-socket") {
            command.arg("--no-containers");
        }
        let child = command
            .args(extra_args)
            .env("RUST_LOG", "info,edgible_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting edgible-agent run")?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the agent with SIGTERM and waits for it; its workloads keep running.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        anyhow::bail!("edgible-agent did not stop within 20 s of SIGTERM")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// Relays TCP connections on a fixed loopback port to an upstream address that can change,
/// so a server restarted on another ephemeral port is still where its agents enrolled.
/// Connections are refused (closed at once) while the upstream does not answer.
///
/// The relay runs on a thread of its own, so that tests may block their own runtime (running
/// the CLI, stopping a server) without stalling the connections it carries.
#[derive(Debug)]
pub struct TcpRelay {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    upstream: Arc<Mutex<SocketAddr>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpRelay {
    /// Starts relaying to the server at `upstream` (`http://IP:PORT`).
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let upstream = Arc::new(Mutex::new(socket_addr(upstream)?));
        let target = Arc::clone(&upstream);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else { return };
                let accept = async {
                    // Dropped with the relay's runtime: every relayed connection ends then.
                    let mut connections = tokio::task::JoinSet::new();
                    while let Ok((mut client, _)) = listener.accept().await {
                        let address = *target.lock().unwrap_or_else(PoisonError::into_inner);
                        connections.spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(address).await {
                                let _ = server.set_nodelay(true);
                                let _ = client.set_nodelay(true);
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                        while connections.try_join_next().is_some() {}
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Self { url, upstream, stop: Some(stop), thread: Some(thread) })
    }

    /// Sends new connections to the server at `upstream` (`http://IP:PORT`).
    pub fn set_upstream(&self, upstream: &str) -> anyhow::Result<()> {
        *self.upstream.lock().unwrap_or_else(PoisonError::into_inner) = socket_addr(upstream)?;
        Ok(())
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn socket_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let address = url.trim_start_matches("http://").trim_end_matches('/');
    address.parse().with_context(|| format!("{url} is not http://IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_of_this_process_is_readable() {
        let pid = i64::from(std::process::id());
        let first = process_start_time(pid).expect("this process has a start time");
        assert_eq!(process_start_time(pid), Some(first));
        assert_eq!(process_start_time(i64::from(i32::MAX)), None);
    }

    #[tokio::test]
    async fn the_relay_follows_its_upstream() -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        async fn echo_server(greeting: &'static [u8]) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let task = tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let _ = stream.write_all(greeting).await;
                }
            });
            Ok((url, task))
        }

        async fn read(url: &str) -> anyhow::Result<String> {
            let mut stream = TcpStream::connect(socket_addr(url)?).await?;
            let mut text = String::new();
            let mut buffer = [0; 16];
            let read = stream.read(&mut buffer).await?;
            text.push_str(std::str::from_utf8(&buffer[..read])?);
            Ok(text)
        }

        let (first, first_task) = echo_server(b"one").await?;
        let (second, second_task) = echo_server(b"two").await?;
        let relay = TcpRelay::start(&first)?;
        assert_eq!(read(&relay.url).await?, "one");
        relay.set_upstream(&second)?;
        assert_eq!(read(&relay.url).await?, "two");
        first_task.abort();
        second_task.abort();
        Ok(())
    }

    #[test]
    fn mount_points_under_a_directory_are_found_and_unescaped() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 7:0 / /tmp/edgible-x/dev1/state/volumes/app/data rw,relatime shared:50 - ext4 /dev/loop0 rw
99 22 7:1 / /tmp/edgible-x/dev\\0402/vol rw,relatime shared:51 - ext4 /dev/loop1 rw
100 22 7:2 / /tmp/edgible-xy/other rw,relatime shared:52 - ext4 /dev/loop2 rw
";
        assert!(backing_file_under(
            "/tmp/edgible-x/dev1/state/volumes/a/data.img (deleted)\n",
            Path::new("/tmp/edgible-x")
        ));
        assert!(backing_file_under("/tmp/edgible-x/v.img\n", Path::new("/tmp/edgible-x")));
        assert!(!backing_file_under("/tmp/edgible-xy/v.img\n", Path::new("/tmp/edgible-x")));
        let found = mount_points_under(mountinfo, Path::new("/tmp/edgible-x"));
        assert_eq!(
            found,
            [PathBuf::from("/tmp/edgible-x/dev1/state/volumes/app/data"), PathBuf::from("/tmp/edgible-x/dev 2/vol")]
        );
    }
}
