//! A Docker Engine and a tiny test image for container tests, without any registry: the
//! image is a root filesystem holding only Debian's static busybox, loaded with
//! `docker import`.
//!
//! Needs root and the Debian packages `docker.io` and `busybox-static`. When no engine answers
//! on [`SOCKET`], `dockerd` is started (in its own process group, so it outlives the test and
//! serves later ones like any system service). Test processes prepare at the same time, so
//! everything happens under one file lock.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The engine's API socket the tests use.
pub const SOCKET: &str = "/var/run/docker.sock";

/// How long `dockerd` may take to answer after it was started.
const ENGINE_START: Duration = Duration::from_secs(30);

/// Makes sure an engine answers on [`SOCKET`] and that `image` exists, building it (running
/// `/bin/sh -c script` as its command) if it does not.
pub fn prepare(image: &str, script: &str) -> anyhow::Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("edgible-agent-docker.lock"))?;
    lock.lock()?;
    if !engine_answers() {
        start_dockerd()?;
    }
    let inspected = Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !inspected.success() {
        build_image(image, script)?;
    }
    lock.unlock()?;
    Ok(())
}

fn engine_answers() -> bool {
    Command::new("docker")
        .arg(format!("--host=unix://{SOCKET}"))
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn start_dockerd() -> anyhow::Result<()> {
    let log = std::env::temp_dir().join("edgible-dockerd.log");
    eprintln!("starting dockerd (log: {})", log.display());
    let output = std::fs::File::create(&log)?;
    Command::new("dockerd")
        .arg(format!("--host=unix://{SOCKET}"))
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        // Its own process group, so that it is not part of this test's.
        .process_group(0)
        .spawn()
        .context("cannot start dockerd: install the Debian package docker.io")?;
    let deadline = Instant::now() + ENGINE_START;
    while !engine_answers() {
        anyhow::ensure!(Instant::now() < deadline, "dockerd does not answer; see {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Imports a root filesystem holding only a static busybox and its applets.
fn build_image(image: &str, script: &str) -> anyhow::Result<()> {
    let busybox = Path::new("/bin/busybox");
    let list = Command::new(busybox).arg("--list").output().context("install the Debian package busybox-static")?;
    let root = tempfile::tempdir()?;
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(root.path().join("tmp"))?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    for applet in String::from_utf8(list.stdout)?.lines().filter(|name| !name.is_empty() && *name != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let tarball = root.path().join("rootfs.tar");
    let status =
        Command::new("tar").arg("-C").arg(root.path()).arg("-cf").arg(&tarball).args(["bin", "tmp"]).status()?;
    anyhow::ensure!(status.success(), "tar failed");
    let cmd = serde_json::to_string(&["/bin/sh", "-c", script])?;
    let mut import = Command::new("docker")
        .args(["import", "--change", &format!("CMD {cmd}"), "-", image])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut tar = Vec::new();
    std::fs::File::open(&tarball)?.read_to_end(&mut tar)?;
    import.stdin.take().context("stdin")?.write_all(&tar)?;
    let output = import.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "docker import failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}
