//! The `vm` driver for real: QEMU `microvm` guests (TCG here, KVM where it works) booting the
//! Debian cloud kernel with an initramfs the driver builds, on taps and the agent's nftables
//! table.
//!
//! Gated by `EDGIBLE_ACC=1`; needs root, `qemu-system-x86`, `busybox-static`, `nftables`,
//! `iproute2`, `e2fsprogs` (volume images: `mkfs.ext4`, read back with `debugfs`), and the kernel package extracted in `$EDGIBLE_VM_KERNEL_DIR` (`boot/vmlinuz-*`,
//! `lib/modules/`), which `.ci/test` prepares. Each test runs in a network namespace of its own
//! (unshared by the test's thread before its runtime starts, so the runtime's threads and every
//! QEMU, `ip` and `nft` they start are inside it): taps and the firewall table never meet the
//! host's or another test's. Addresses: guests from 198.51.100.0/24, the host's "other"
//! address 192.0.2.1.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgible::model::ApplicationId;
use edgible::protocol::v1::Stream;
use edgible_agent::driver::vm::network;
use edgible_agent::driver::{
    Driver, LaunchSpec, Program, VmDriver, VmDriverConfig, Wake, WorkloadHandle, WorkloadStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KERNEL_DIR_ENV: &str = "EDGIBLE_VM_KERNEL_DIR";

/// The kernel and module tree, when the heavy tier runs.
fn kernel() -> Option<(PathBuf, PathBuf)> {
    if std::env::var("EDGIBLE_ACC").as_deref() != Ok("1") {
        eprintln!("skipping: microVM tests run with EDGIBLE_ACC=1 (root, qemu-system-x86, and ${KERNEL_DIR_ENV})");
        return None;
    }
    let dir = PathBuf::from(std::env::var_os(KERNEL_DIR_ENV).unwrap_or_else(|| {
        panic!(
            "EDGIBLE_ACC=1 needs ${KERNEL_DIR_ENV}: an extracted linux-image-*-cloud-amd64 package (.ci/test makes one)"
        )
    }));
    let vmlinuz = std::fs::read_dir(dir.join("boot"))
        .expect("the kernel directory has boot/")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz")))
        .expect("a vmlinuz in boot/");
    Some((vmlinuz, dir.join("lib/modules")))
}

/// Runs `test` on a fresh runtime inside a new network namespace with loopback up, also
/// holding 192.0.2.1 (an address of the host that guests must not reach).
fn in_namespace(test: impl AsyncFnOnce() -> Result<()>) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a network namespace (root?)");
    for args in [&["link", "set", "lo", "up"][..], &["addr", "add", "192.0.2.1/32", "dev", "lo"]] {
        let status = std::process::Command::new("ip").args(args).status().expect("ip runs");
        assert!(status.success(), "ip {args:?}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(test()).expect("the test passes");
}

/// Kills, when dropped (also when a test fails half-way), every process whose command line
/// names the test's directory: the QEMUs a failed test would otherwise leave running.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn driver(dir: &Path, kernel: &(PathBuf, PathBuf)) -> VmDriver {
    let mut config = VmDriverConfig::new(dir.join("vm"), &kernel.0, &kernel.1);
    config.stop_grace = Duration::from_secs(3);
    VmDriver::new(config).expect("a driver")
}

/// A busybox workload: `script` under `sh -c`, with PORT.
fn launch(name: &str, port: u16, script: &str, env: &[(&str, &str)]) -> LaunchSpec {
    let mut environment: BTreeMap<String, String> =
        env.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect();
    environment.insert("PORT".into(), port.to_string());
    LaunchSpec {
        application_id: ApplicationId::new(),
        name: serde_json::from_value(serde_json::json!(name)).expect("a name"),
        program: Program::Process {
            command: "/bin/busybox".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            working_dir: Some("/srv".into()),
        },
        port,
        env: environment,
        resources: None,
        volumes: Vec::new(),
    }
}

/// One HTTP/1.0 GET; the body, or an error within `timeout`.
async fn get(address: SocketAddr, timeout: Duration) -> Result<String> {
    tokio::time::timeout(timeout, async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: vm\r\n\r\n").await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::ensure!(response.starts_with("HTTP/1.") && response.contains(" 200 "), "answered {response:?}");
        Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
    })
    .await
    .context("timed out")?
}

/// Waits until `address` answers, for at most `limit`; answers how long it took.
async fn wait_answering(address: SocketAddr, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    for _ in 0..10_000 {
        if started.elapsed() > limit {
            break;
        }
        match get(address, Duration::from_millis(500)).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{address} did not answer within {limit:?}: {last:?}")
}

async fn wait_log(driver: &VmDriver, id: ApplicationId, stream: Stream, text: &str, limit: Duration) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let lines = driver.logs(id).map(|logs| logs.snapshot()).unwrap_or_default();
        if lines.iter().any(|line| line.stream == stream && line.line.contains(text)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = driver.logs(id).map(|logs| logs.snapshot()).unwrap_or_default();
    let last: Vec<&str> = lines.iter().rev().take(20).map(|line| line.line.as_str()).collect();
    bail!("no {stream:?} line with {text:?} within {limit:?}; the last lines, newest first: {last:?}")
}

fn pid_of(handle: &WorkloadHandle) -> i32 {
    match handle {
        WorkloadHandle::Vm { pid, .. } => *pid,
        other => panic!("not a VM handle: {other:?}"),
    }
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", "dev", name])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn nft_table_exists() -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", network::TABLE])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

const HTTPD: &str = r#"echo "hello from the guest in $(pwd) as $GREETING"; echo "port=$PORT" >&2; mkdir -p /www; echo "$GREETING" > /www/index.html; exec httpd -f -p "$PORT" -h /www"#;

#[test]
fn a_process_workload_serves_logs_suspends_resumes_restores_and_stops() {
    let Some(kernel) = kernel() else { return };
    in_namespace(async || {
        let temp = tempfile::tempdir()?;
        let _reaper = Reaper(temp.path().to_path_buf());
        let driver = driver(temp.path(), &kernel);
        let app = launch("web", 8080, HTTPD, &[("GREETING", "it's me")]);
        // Something else of the host's on the application's loopback port changes nothing: the
        // guest is reached at its own address.
        let _squatter = std::net::TcpListener::bind("127.0.0.1:8080")?;
        assert_eq!(driver.address(app.application_id), None, "nothing runs yet");
        let booted = Instant::now();
        let handle = driver.start(&app, Wake::new()).await?;
        let guest = driver.guest_address(app.application_id).context("a guest address")?;
        assert_eq!(guest, Ipv4Addr::new(198, 51, 100, 2));
        assert_eq!(driver.address(app.application_id), Some(guest.into()), "the workload's address is the guest's");
        let at_guest = SocketAddr::from((guest, 8080));
        wait_answering(at_guest, Duration::from_secs(45)).await?;
        println!("microVM ({:?}) answered {:?} after start", driver.accel().await?, booted.elapsed());
        assert_eq!(get(at_guest, Duration::from_secs(2)).await?.trim(), "it's me");
        wait_log(
            &driver,
            app.application_id,
            Stream::Stdout,
            "hello from the guest in /srv as it's me",
            Duration::from_secs(5),
        )
        .await?;
        wait_log(&driver, app.application_id, Stream::Stderr, "port=8080", Duration::from_secs(5)).await?;
        assert!(nft_table_exists() && link_exists("edgvm0"));

        // An agent restart: the next driver adopts the running VM by its handle.
        driver.release_all().await;
        let next = self::driver(temp.path(), &kernel);
        next.adopt(&app, &handle, Wake::new()).await.context("adoption")?;
        let driver = next;
        assert!(
            matches!(driver.status(app.application_id), WorkloadStatus::Running { handle: ref now } if *now == handle)
        );
        assert_eq!(get(at_guest, Duration::from_secs(2)).await?.trim(), "it's me");
        assert_eq!(driver.address(app.application_id), Some(guest.into()));

        driver.suspend(app.application_id).await?;
        assert!(get(at_guest, Duration::from_secs(1)).await.is_err(), "a suspended guest does not answer");
        assert!(matches!(driver.status(app.application_id), WorkloadStatus::Running { .. }));
        let resuming = Instant::now();
        driver.resume(app.application_id).await?;
        let latency = wait_answering(at_guest, Duration::from_secs(10)).await?;
        println!("resume (QMP cont) to first answer: {:?}", resuming.elapsed().max(latency));

        // QEMU gone while suspended: resume restores the snapshot in a new QEMU.
        driver.suspend(app.application_id).await.context("the second suspend")?;
        let old_pid = pid_of(&handle);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid), nix::sys::signal::Signal::SIGKILL)?;
        let resuming = Instant::now();
        let restored = driver.resume(app.application_id).await.context("the restore");
        if restored.is_err() {
            let log = std::fs::read_to_string(temp.path().join(format!("vm/vms/{}/qemu.log", app.application_id)));
            eprintln!("qemu.log: {log:?}");
        }
        restored?;
        wait_answering(at_guest, Duration::from_secs(20)).await?;
        println!("restore from snapshot to first answer: {:?}", resuming.elapsed());
        let WorkloadStatus::Running { handle: restored } = driver.status(app.application_id) else {
            bail!("the restored VM is not running")
        };
        assert_ne!(pid_of(&restored), old_pid, "a new QEMU");
        assert_eq!(get(at_guest, Duration::from_secs(2)).await?.trim(), "it's me", "the same guest, restored");

        driver.stop(app.application_id).await?;
        let pid = pid_of(&restored);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))?.contains(") Z"),
            "QEMU is gone"
        );
        assert!(!link_exists("edgvm0"), "the tap is gone");
        assert!(!nft_table_exists(), "no VM, no table");
        assert!(get(at_guest, Duration::from_secs(1)).await.is_err());
        assert_eq!(driver.address(app.application_id), None, "a stopped VM has no address");
        driver.remove(app.application_id).await?;
        Ok(())
    });
}

#[test]
fn guests_reach_neither_each_other_nor_the_host() {
    let Some(kernel) = kernel() else { return };
    in_namespace(async || {
        let temp = tempfile::tempdir()?;
        let _reaper = Reaper(temp.path().to_path_buf());
        let driver = driver(temp.path(), &kernel);
        // The host's own service, on every address.
        let listener = tokio::net::TcpListener::bind("0.0.0.0:9000").await?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost service\n").await;
                });
            }
        });
        let a = launch("a", 8081, HTTPD, &[("GREETING", "a")]);
        driver.start(&a, Wake::new()).await?;
        let guest_a = driver.guest_address(a.application_id).context("a's address")?;
        // B probes A, its own host side, the host's other address and A's host side, once a
        // second, and serves so that the test knows it runs.
        let probe = r#"mkdir -p /www; echo b > /www/index.html; httpd -p "$PORT" -h /www
            while true; do
              for target in "$A:8081" "$HOST_SIDE:9000" "192.0.2.1:9000" "$A_HOST_SIDE:9000"; do
                if printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 1 ${target%:*} ${target#*:} 2>/dev/null | grep -q " 200 "; then echo "probe $target reached"; else echo "probe $target blocked"; fi
              done
              sleep 1
            done"#;
        // Slots are handed out lowest first: a has slot 0 (198.51.100.0/30), b slot 1.
        let b = launch(
            "b",
            8082,
            probe,
            &[("A", "198.51.100.2"), ("HOST_SIDE", "198.51.100.5"), ("A_HOST_SIDE", "198.51.100.1")],
        );
        driver.start(&b, Wake::new()).await?;
        let guest_b = driver.guest_address(b.application_id).context("b's address")?;
        let host_b = driver.host_address(b.application_id).context("b's host side")?;
        let host_a = driver.host_address(a.application_id).context("a's host side")?;
        assert_eq!(
            (guest_a, host_a, guest_b, host_b),
            (
                Ipv4Addr::new(198, 51, 100, 2),
                Ipv4Addr::new(198, 51, 100, 1),
                Ipv4Addr::new(198, 51, 100, 6),
                Ipv4Addr::new(198, 51, 100, 5)
            )
        );
        wait_answering(SocketAddr::from((guest_a, 8081)), Duration::from_secs(45)).await?;
        wait_answering(SocketAddr::from((guest_b, 8082)), Duration::from_secs(45)).await?;
        for target in ["198.51.100.2:8081", "198.51.100.5:9000", "192.0.2.1:9000", "198.51.100.1:9000"] {
            wait_log(
                &driver,
                b.application_id,
                Stream::Stdout,
                &format!("probe {target} blocked"),
                Duration::from_secs(30),
            )
            .await?;
        }
        let reached = driver
            .logs(b.application_id)
            .map(|logs| logs.snapshot())
            .unwrap_or_default()
            .into_iter()
            .filter(|line| line.line.contains("reached"))
            .count();
        assert_eq!(reached, 0, "nothing was reached with the firewall up");
        // The control: without the agent's table, the same probes get through, so it was the
        // firewall that blocked them.
        network::remove_table().await?;
        wait_log(&driver, b.application_id, Stream::Stdout, "probe 198.51.100.5:9000 reached", Duration::from_secs(30))
            .await?;
        driver.remove(a.application_id).await?;
        driver.remove(b.application_id).await?;
        assert!(!link_exists("edgvm0") && !link_exists("edgvm1"), "the taps are gone");
        Ok(())
    });
}

/// The container tests' image (`agent/tests/container_workloads.rs`): the same name and script,
/// so that whichever test builds it first builds the one both expect.
const CONTAINER_IMAGE: &str = "edgible-test/busybox:1";
const CONTAINER_SCRIPT: &str = r#"echo "greeting=$GREETING"; echo "port=$PORT" >&2; mkdir -p /www; echo "$GREETING" > /www/index.html; exec httpd -f -p "$PORT" -h /www"#;

#[test]
fn a_container_image_boots_as_the_guests_root_filesystem() {
    let Some(kernel) = kernel() else { return };
    // Before the namespace: this may start dockerd, which must live in the host's.
    edgible_acceptance_tests::docker::prepare(CONTAINER_IMAGE, CONTAINER_SCRIPT).expect("the engine and the image");
    in_namespace(async || {
        let temp = tempfile::tempdir()?;
        let _reaper = Reaper(temp.path().to_path_buf());
        let mut config = VmDriverConfig::new(temp.path().join("vm"), &kernel.0, &kernel.1);
        config.container_socket = edgible_acceptance_tests::docker::SOCKET.into();
        let driver = VmDriver::new(config)?.serving(edgible_agent::driver::WorkloadKind::Container);
        let mut app = launch("boxed", 8083, "", &[("GREETING", "from a container")]);
        app.program = Program::Container { image: CONTAINER_IMAGE.into(), ports: vec![] };
        let handle = driver.start(&app, Wake::new()).await?;
        assert!(matches!(handle, WorkloadHandle::Vm { runs: edgible_agent::driver::WorkloadKind::Container, .. }));
        let guest = driver.guest_address(app.application_id).context("a guest address")?;
        wait_answering(SocketAddr::from((guest, 8083)), Duration::from_secs(45)).await?;
        assert_eq!(get(SocketAddr::from((guest, 8083)), Duration::from_secs(2)).await?.trim(), "from a container");
        wait_log(&driver, app.application_id, Stream::Stdout, "greeting=from a container", Duration::from_secs(5))
            .await?;
        wait_log(&driver, app.application_id, Stream::Stderr, "port=8083", Duration::from_secs(5)).await?;
        let layers = std::fs::read_dir(temp.path().join("vm/images"))?
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("container-"))
            .count();
        assert_eq!(layers, 1, "the image's filesystem is cached as one layer");
        driver.remove(app.application_id).await?;
        assert!(!link_exists("edgvm0"));
        Ok(())
    });
}

#[test]
fn two_guests_listen_on_one_port_each_at_its_own_address() {
    let Some(kernel) = kernel() else { return };
    in_namespace(async || {
        let temp = tempfile::tempdir()?;
        let _reaper = Reaper(temp.path().to_path_buf());
        let driver = driver(temp.path(), &kernel);
        let a = launch("a", 8080, HTTPD, &[("GREETING", "tenant a")]);
        let b = launch("b", 8080, HTTPD, &[("GREETING", "tenant b")]);
        driver.start(&a, Wake::new()).await?;
        driver.start(&b, Wake::new()).await.context("a second guest on the same port")?;
        let (Some(at_a), Some(at_b)) = (driver.address(a.application_id), driver.address(b.application_id)) else {
            bail!("both guests have an address");
        };
        assert_ne!(at_a, at_b);
        let (at_a, at_b) = (SocketAddr::new(at_a, 8080), SocketAddr::new(at_b, 8080));
        wait_answering(at_a, Duration::from_secs(45)).await?;
        wait_answering(at_b, Duration::from_secs(45)).await?;
        assert_eq!(get(at_a, Duration::from_secs(2)).await?.trim(), "tenant a");
        assert_eq!(get(at_b, Duration::from_secs(2)).await?.trim(), "tenant b");
        // Stopping one leaves the other serving; the freed address is not handed out again at
        // once, so a restarted `a` has another one.
        driver.stop(a.application_id).await?;
        assert_eq!(get(at_b, Duration::from_secs(2)).await?.trim(), "tenant b");
        driver.start(&a, Wake::new()).await?;
        let again = driver.address(a.application_id).context("a restarted guest's address")?;
        assert!(again != at_a.ip() && again != at_b.ip(), "{again}");
        wait_answering(SocketAddr::new(again, 8080), Duration::from_secs(45)).await?;
        assert_eq!(get(SocketAddr::new(again, 8080), Duration::from_secs(2)).await?.trim(), "tenant a");
        driver.remove(a.application_id).await?;
        driver.remove(b.application_id).await?;
        Ok(())
    });
}

/// Makes an ext4 image of `size_mib` at `path`, as the agent's volumes do.
fn make_volume(path: &Path, size_mib: u64) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("a parent")?)?;
    let output = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .context("mkfs.ext4 runs (e2fsprogs)")?;
    anyhow::ensure!(output.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// A file of an ext4 image, read on the host without mounting it (`debugfs`).
fn read_from_image(image: &Path, file: &str) -> Result<String> {
    let output = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .context("debugfs runs (e2fsprogs)")?;
    anyhow::ensure!(output.status.success(), "debugfs: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn volume(name: &str, mount_path: &str) -> edgible::model::Volume {
    serde_json::from_value(serde_json::json!({"name": name, "size_mib": 64, "mount_path": mount_path}))
        .expect("a volume")
}

#[test]
fn volumes_are_disks_mounted_in_the_guest_and_written_through_on_stop() {
    let Some(kernel) = kernel() else { return };
    in_namespace(async || {
        let temp = tempfile::tempdir()?;
        let _reaper = Reaper(temp.path().to_path_buf());
        let driver = driver(temp.path(), &kernel);
        // The workload appends a line to each volume at every start, then serves what it finds;
        // the write is not synced: only a clean stop puts it on the image.
        let script = r#"echo "start $GREETING" >> "$EDGIBLE_VOLUME_APP_DATA/log"
            echo "cache" > "$EDGIBLE_VOLUME_CACHE/mark"
            mkdir -p /www
            { echo "data=$EDGIBLE_VOLUME_APP_DATA cache=$EDGIBLE_VOLUME_CACHE"; cat "$EDGIBLE_VOLUME_APP_DATA/log"; } > /www/index.html
            exec httpd -f -p "$PORT" -h /www"#;
        let mut app = launch("stateful", 8090, script, &[("GREETING", "hello")]);
        app.volumes = vec![volume("app-data", "/var/lib/app"), volume("cache", "/cache")];
        let volumes = temp.path().join("volumes");
        let data = edgible_agent::volumes::image_path(&volumes, app.application_id, "app-data");
        let cache = edgible_agent::volumes::image_path(&volumes, app.application_id, "cache");

        // A missing image fails the start, naming the volume.
        let error = driver.start(&app, Wake::new()).await.expect_err("no images yet");
        assert!(error.to_string().contains("volume app-data"), "{error}");
        make_volume(&data, 64)?;
        make_volume(&cache, 64)?;

        driver.start(&app, Wake::new()).await?;
        let guest = SocketAddr::new(driver.address(app.application_id).context("an address")?, 8090);
        wait_answering(guest, Duration::from_secs(45)).await?;
        let page = get(guest, Duration::from_secs(2)).await?;
        assert!(page.contains("data=/var/lib/app cache=/cache"), "{page}");
        assert!(page.contains("start hello"), "{page}");
        let stopping = Instant::now();
        driver.stop(app.application_id).await?;
        let serial = temp.path().join(format!("vm/vms/{}/serial.log", app.application_id));
        let serial = std::fs::read_to_string(serial)?;
        assert!(serial.contains("EDGIBLE_EXIT 143"), "the guest ended the workload with SIGTERM: {serial}");
        println!("a clean guest stop took {:?}", stopping.elapsed());
        assert_eq!(read_from_image(&data, "/log")?, "start hello\n", "written through on stop");
        assert_eq!(read_from_image(&cache, "/mark")?, "cache\n");

        // The next start finds what the last one wrote.
        driver.start(&app, Wake::new()).await?;
        let guest = SocketAddr::new(driver.address(app.application_id).context("an address")?, 8090);
        wait_answering(guest, Duration::from_secs(45)).await?;
        let page = get(guest, Duration::from_secs(2)).await?;
        assert_eq!(page.matches("start hello").count(), 2, "{page}");

        // Suspended, then stopped: the guest runs again to end cleanly.
        driver.suspend(app.application_id).await?;
        driver.stop(app.application_id).await?;
        assert_eq!(read_from_image(&data, "/log")?, "start hello\nstart hello\n");
        driver.remove(app.application_id).await?;
        Ok(())
    });
}
