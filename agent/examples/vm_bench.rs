//! MicroVM sleep/wake: time from the wake to the first successful HTTP answer of the guest's
//! workload, for the two sleep modes of a cloud host's applications. Not a test: it prints a
//! table (median and p90) for the README.
//!
//! One guest (the `vm` driver, QEMU `microvm`, KVM when it works here, TCG otherwise) runs
//! busybox `httpd`. Then, for `--rounds N` rounds each:
//! - `suspend`: the driver suspends the VM (pause and snapshot to file, not timed), then the
//!   clock starts and the driver resumes it (QMP `cont`); the round ends at the first `200`
//!   from the guest's address;
//! - `stop`: the driver stops the VM (the guest ends its workload and powers off, not timed),
//!   then the clock starts and the driver starts it again (initramfs from cached layers, a new
//!   QEMU, a boot); the round ends at the first `200`.
//!
//! Readiness is polled every 2 ms (each attempt a new TCP connection and `GET /`, at most
//! 250 ms), so a figure is at most a poll late. Everything runs in a network namespace of its
//! own (taps and the firewall table never touch the host's); needs root, `qemu-system-x86`,
//! `busybox-static`, `nftables`, `iproute2` and the guest kernel that `.ci/test` extracts.
//!
//! `cargo run -p edgible-agent --example vm_bench -- [--rounds N] [--kernel-dir DIR]`
//! (`DIR` defaults to `$EDGIBLE_VM_KERNEL_DIR`, then `~/.cache/edgible/vm-kernel`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgible::model::ApplicationId;
use edgible_agent::driver::{Driver, LaunchSpec, Program, VmDriver, VmDriverConfig, Wake};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The guest's port.
const PORT: u16 = 8080;
/// The most rounds a run may ask for.
const MAX_ROUNDS: usize = 200;
/// How long one wake may take before the round fails (a TCG boot takes a few seconds).
const WAKE_LIMIT: Duration = Duration::from_secs(60);
/// Between two readiness attempts.
const POLL: Duration = Duration::from_millis(2);

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut rounds = 10usize;
    let mut kernel_dir = std::env::var_os("EDGIBLE_VM_KERNEL_DIR").map(PathBuf::from);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse().context("--rounds N: a number")?,
            "--kernel-dir" => kernel_dir = Some(args.next().context("--kernel-dir DIR")?.into()),
            other => bail!("unknown argument {other}; usage: [--rounds N] [--kernel-dir DIR]"),
        }
    }
    if rounds == 0 || rounds > MAX_ROUNDS {
        bail!("--rounds must be between 1 and {MAX_ROUNDS}");
    }
    let kernel_dir = match kernel_dir {
        Some(dir) => dir,
        None => PathBuf::from(std::env::var_os("HOME").context("no HOME for the default kernel directory")?)
            .join(".cache/edgible/vm-kernel"),
    };
    let (kernel, modules) = kernel(&kernel_dir)?;
    // A network namespace of our own, entered before the runtime starts so that its threads
    // (and every QEMU, `ip` and `nft` they run) are inside it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare a network namespace (root?)")?;
    let status = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
    if !status.success() {
        bail!("ip link set lo up failed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let outcome = runtime.block_on(bench(dir.path(), &kernel, &modules, rounds));
    // Whatever happened, no QEMU of ours outlives the run.
    runtime.block_on(reap(dir.path()));
    outcome
}

/// `boot/vmlinuz-*` and `lib/modules` of an extracted kernel package.
fn kernel(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("{}: an extracted linux-image-*-cloud-amd64 (see .ci/test)", boot.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz")))
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    Ok((vmlinuz, dir.join("lib/modules")))
}

async fn bench(dir: &Path, kernel: &Path, modules: &Path, rounds: usize) -> Result<()> {
    let mut config = VmDriverConfig::new(dir.join("vm"), kernel, modules);
    config.stop_grace = Duration::from_secs(5);
    let driver = VmDriver::new(config)?;
    let accel = driver.accel().await?;
    let launch = launch()?;
    let id = launch.application_id;

    let started = Instant::now();
    driver.start(&launch, Wake::new()).await?;
    let boot = first_answer(&driver, id, started).await.context("the first boot")?;
    println!("microVM accelerator: {accel:?}; first boot to first answer: {}", millis(boot));

    let mut results: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 1..=rounds {
        driver.suspend(id).await.with_context(|| format!("suspend, round {round}"))?;
        let started = Instant::now();
        driver.resume(id).await.with_context(|| format!("resume, round {round}"))?;
        results.entry("suspend → resume").or_default().push(first_answer(&driver, id, started).await?);

        driver.stop(id).await.with_context(|| format!("stop, round {round}"))?;
        let started = Instant::now();
        driver.start(&launch, Wake::new()).await.with_context(|| format!("start, round {round}"))?;
        results.entry("stop → start").or_default().push(first_answer(&driver, id, started).await?);
        eprintln!("round {round}/{rounds} done");
    }
    driver.remove(id).await?;

    println!();
    println!("| mode ({accel:?}) | rounds | median | p90 | min | max |");
    println!("|---|---|---|---|---|---|");
    for (mode, samples) in results {
        let stats = Stats::of(samples);
        println!(
            "| {mode} | {} | {} | {} | {} | {} |",
            stats.count,
            millis(stats.median),
            millis(stats.p90),
            millis(stats.min),
            millis(stats.max)
        );
    }
    Ok(())
}

/// A guest serving a small page with busybox `httpd`.
fn launch() -> Result<LaunchSpec> {
    let script = r#"mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p "$PORT" -h /www"#;
    Ok(LaunchSpec {
        application_id: ApplicationId::new(),
        name: "vm-bench".parse().context("the application's name")?,
        program: Program::Process {
            command: "/bin/busybox".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            working_dir: None,
        },
        port: PORT,
        env: [("PORT".to_owned(), PORT.to_string())].into(),
        resources: None,
        volumes: Vec::new(),
    })
}

/// How long after `since` the guest first answered `200`, polling its address.
async fn first_answer(driver: &VmDriver, id: ApplicationId, since: Instant) -> Result<Duration> {
    let host = driver.address(id).context("the VM has no address")?;
    let address = SocketAddr::new(host, PORT);
    let limit = (WAKE_LIMIT.as_millis() / POLL.as_millis()) as usize;
    for _ in 0..limit {
        if answers(address).await {
            return Ok(since.elapsed());
        }
        if since.elapsed() > WAKE_LIMIT {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("{address} did not answer within {WAKE_LIMIT:?}")
}

/// Whether one `GET /` gets a `200` within 250 ms.
async fn answers(address: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n").await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::io::Result::Ok(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    matches!(tokio::time::timeout(Duration::from_millis(250), attempt).await, Ok(Ok(true)))
}

struct Stats {
    count: usize,
    median: Duration,
    p90: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    /// Nearest-rank percentiles of at least one sample.
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let rank = |percent: usize| samples[(samples.len() * percent).div_ceil(100).clamp(1, samples.len()) - 1];
        Self { count: samples.len(), median: rank(50), p90: rank(90), min: samples[0], max: samples[samples.len() - 1] }
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// Kills every process whose command line names `dir` (a QEMU a failed run left).
async fn reap(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
