//! The side-by-side benchmark of issue 8: the Edgible path (`edgible-edge` → Edgible's
//! WireGuard → `edgible-agent`'s proxy) against HAProxy → boringtun-cli → Caddy, in one
//! namespace topology (client, edge, dev1, server), both in front of the same origin (the
//! `e2e_workload` the agent runs), measured in alternating runs over several rounds.
//!
//! Figures: single-stream TCP through each tunnel (iperf3) and the tunnel's CPU per Gb/s;
//! HTTPS keep-alive requests/s with p50/p99 (`wrk`); new TLS connections/s (`wrk` with
//! `Connection: close`); HTTP/2 requests/s (`h2load`); a 1 GiB download (`curl`); the RSS of
//! each side with thousands of idle proxied connections. It writes a Markdown table (medians,
//! ranges, Edgible ÷ anchor) and issue 8's targets to `--out` and prints it.
//!
//! Not a test. Needs root, the Debian packages `haproxy caddy wireguard-tools iperf3 wrk
//! nghttp2-client curl`, boringtun-cli and the release binaries:
//!
//! ```text
//! cargo install boringtun-cli --locked --root target/bench-tools
//! cargo build --release -p edgible-edge -p edgible-agent -p edgible-server -p edgible -p edgible-acceptance-tests
//! sudo target/release/bench --out bench.md
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible_acceptance_tests::bench::anchor::{self, Anchor, AnchorConfig, HAPROXY_PORT};
use edgible_acceptance_tests::bench::edgible::{EdgibleConfig, EdgiblePlatform};
use edgible_acceptance_tests::bench::load::{self, IdleConnections, IdleTarget};
use edgible_acceptance_tests::bench::report::{self, Figure, Samples, Settings, Stack};
use edgible_acceptance_tests::bench::{NamespaceHosts, PROGRAMS, default_boringtun, machine, program};
use edgible_acceptance_tests::netns::{
    CLIENT_ADDRESS, DEV1_ADDRESS, EDGE_ADDRESS, Namespace, SERVER_ADDRESS, Topology, output_within, require_root,
};

/// The hostname both stacks serve.
const SERVER_NAME: &str = "bench.example.test";
/// The origin's port on the device's loopback.
const ORIGIN_PORT: u16 = 18_090;
/// The size of the download.
const DOWNLOAD_BYTES: u64 = 1 << 30;
/// How long the download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long opening the idle connections may take.
const IDLE_OPEN: Duration = Duration::from_secs(120);
/// Streams per HTTP/2 connection.
const HTTP2_STREAMS: u32 = 10;
/// The namespace tag (`eg-bn-<pid>-<role>`).
const TAG: &str = "bn";

const USAGE: &str = "usage: bench [--rounds N] [--seconds S] [--out FILE] [--idle-connections N]
             [--connections N] [--dir DIR] [--boringtun PATH] [--only LIST]

  --rounds N            alternating rounds; medians are reported (default 3, at least 1)
  --seconds S           length of each timed run (default 5)
  --out FILE            where the Markdown report goes (default target/bench.md)
  --idle-connections N  idle proxied connections of the memory run (default 9900: each holds two
                        sockets at the edge, so 10,000 do not fit the 20,000 open-file limit)
  --connections N       concurrent connections of the request-rate runs (default 50)
  --dir DIR             keep configurations and logs in DIR instead of a temporary directory
  --boringtun PATH      boringtun-cli (default target/bench-tools/bin/boringtun-cli, then PATH)
  --only LIST           only these measurements, comma-separated: idle, tunnel, keep-alive,
                        new-connections, http2, download (default all)";

/// What the command line asks.
#[derive(Debug, Clone, PartialEq)]
struct Options {
    rounds: u32,
    seconds: u32,
    out: PathBuf,
    idle_connections: u32,
    connections: u32,
    dir: Option<PathBuf>,
    boringtun: Option<PathBuf>,
    /// The measurements to make, in [`Measurement::ALL`]'s order.
    only: Vec<Measurement>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rounds: 3,
            seconds: 5,
            out: edgible_acceptance_tests::target_dir().join("bench.md"),
            idle_connections: 9_900,
            connections: 50,
            dir: None,
            boringtun: None,
            only: Measurement::ALL.to_vec(),
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Options> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        let positive = |name: &str, text: String| -> anyhow::Result<u32> {
            let number: u32 =
                text.parse().with_context(|| format!("{name} must be a positive number, got {text:?}"))?;
            anyhow::ensure!(number > 0, "{name} must be at least 1");
            Ok(number)
        };
        match arg.as_str() {
            "--rounds" => options.rounds = positive("--rounds", value("--rounds")?)?,
            "--seconds" => options.seconds = positive("--seconds", value("--seconds")?)?,
            "--out" => options.out = value("--out")?.into(),
            "--idle-connections" => {
                options.idle_connections = positive("--idle-connections", value("--idle-connections")?)?;
            }
            "--connections" => options.connections = positive("--connections", value("--connections")?)?,
            "--dir" => options.dir = Some(value("--dir")?.into()),
            "--boringtun" => options.boringtun = Some(value("--boringtun")?.into()),
            "--only" => options.only = Measurement::parse_list(&value("--only")?)?,
            "-h" | "--help" => anyhow::bail!("{USAGE}"),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(options)
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = parse_args(std::env::args().skip(1)).and_then(|options| {
        require_root()?;
        raise_open_files_limit();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        runtime.block_on(run(options))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-files limit to the hard one: this process holds the idle connections,
/// and the agent and tools it starts inherit the limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("cannot raise the open files limit from {soft} to {hard}: {error}");
    }
}

/// Prints a step.
fn step(text: &str) {
    eprintln!("==> {text}");
}

async fn run(options: Options) -> anyhow::Result<()> {
    for name in PROGRAMS {
        program(name)?;
    }
    let boringtun = match &options.boringtun {
        Some(path) => path.clone(),
        None if default_boringtun().is_file() => default_boringtun(),
        None => program("boringtun-cli").map_err(|_| {
            anyhow::anyhow!(
                "boringtun-cli is not installed: cargo install boringtun-cli --locked --root {}",
                edgible_acceptance_tests::target_dir().join("bench-tools").display()
            )
        })?,
    };
    let temporary;
    let dir = match &options.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::canonicalize(dir)?
        }
        None => {
            temporary = tempfile::Builder::new().prefix("edgible-bench-").tempdir()?;
            temporary.path().to_owned()
        }
    };
    let mut settings = Settings {
        date: String::new(),
        machine: machine(),
        rounds: options.rounds,
        seconds: options.seconds,
        connections: options.connections,
        http2_streams: HTTP2_STREAMS,
        idle_connections: options.idle_connections,
    };
    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(watch_signals(stop.clone()));

    // Locals drop in reverse order: the stacks stop before the hosts file and the namespaces go.
    step("building namespaces: client, edge, dev1, server on 203.0.113.0/24");
    NamespaceHosts::remove_stale(TAG);
    let topology = Topology::build(
        TAG,
        &[("edge", EDGE_ADDRESS), ("server", SERVER_ADDRESS), ("dev1", DEV1_ADDRESS), ("client", CLIENT_ADDRESS)],
    )?;
    // The date of the measurement, not of the wait for another topology's lock.
    settings.date = utc_now();
    for role in ["client", "edge", "dev1"] {
        // The new-connection runs leave thousands of sockets in TIME-WAIT; let connect() reuse them.
        let mut sysctl = topology.namespace(role)?.exec("sysctl");
        sysctl.args(["-q", "-w", "net.ipv4.tcp_tw_reuse=1"]);
        output_within(&mut sysctl, Duration::from_secs(10))?;
    }
    let _hosts = NamespaceHosts::write(topology.namespace("client")?.name(), &[(EDGE_ADDRESS, SERVER_NAME)])?;

    step("starting the Edgible platform (server, edge, agent) and deploying the origin");
    let mut edgible = EdgiblePlatform::start(&EdgibleConfig {
        topology: &topology,
        edge_address: EDGE_ADDRESS,
        server_address: SERVER_ADDRESS,
        server_name: SERVER_NAME,
        origin_port: ORIGIN_PORT,
        max_connections: options.idle_connections.max(10_000),
        dir: &dir.join("edgible"),
    })
    .await?;
    step("starting the anchor (boringtun-cli tunnel, Caddy, HAProxy)");
    let mut anchor = Anchor::start(&AnchorConfig {
        edge: topology.namespace("edge")?,
        device: topology.namespace("dev1")?,
        edge_address: EDGE_ADDRESS,
        boringtun: &boringtun,
        server_name: SERVER_NAME,
        origin_port: ORIGIN_PORT,
        maxconn: options.idle_connections,
        dir: &dir.join("anchor"),
    })?;

    let bench = Bench {
        client: topology.namespace("client")?.clone(),
        edge: topology.namespace("edge")?.clone(),
        device: topology.namespace("dev1")?.clone(),
        edgible_device_tunnel: edgible.device_tunnel_address(&topology)?,
        options: options.clone(),
    };
    for stack in Stack::BOTH {
        step(&format!("checking that {} serves the origin", stack.name()));
        bench.wait_served(stack, &edgible, &anchor)?;
    }
    let fresh = Baseline {
        anchor_edge_kib: load::total_rss_kib(&anchor.edge_pids())?,
        edgible_edge_kib: load::total_rss_kib(&[edgible.edge_pid()?])?,
    };

    let mut samples = Samples::default();
    let started = Instant::now();
    'rounds: for round in 0..options.rounds {
        for &measurement in &options.only {
            for stack in Stack::order(round) {
                if stop.load(Ordering::Relaxed) {
                    samples.fail(format!("interrupted in round {}", round + 1));
                    break 'rounds;
                }
                step(&format!("round {}/{}: {} on {}", round + 1, options.rounds, measurement.name(), stack.name()));
                let what = format!("round {}, {}, {}", round + 1, stack.name(), measurement.name());
                if let Err(error) = bench.measure(measurement, stack, &edgible, &anchor, &fresh, &mut samples, &what) {
                    eprintln!("    failed: {error:#}");
                    samples.fail(format!("{what}: {}", one_line(&format!("{error:#}"))));
                }
                edgible.check_running()?;
                anchor.check_running()?;
            }
        }
    }
    step(&format!("measured in {:.0?}", started.elapsed()));

    let text = report::render(&samples, &settings);
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&options.out, &text).with_context(|| format!("writing {}", options.out.display()))?;
    println!("{text}");
    eprintln!("written to {}", options.out.display());
    drop(anchor);
    drop(edgible);
    Ok(())
}

/// The first line of an error, for the report (the logs keep the rest).
fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

/// The current time, UTC, to the minute.
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown date".to_owned())
}

/// Sets `stop` on SIGINT or SIGTERM: the run ends after the current measurement, still writing
/// its report and tearing everything down.
async fn watch_signals(stop: Arc<AtomicBool>) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    eprintln!("stopping after the current measurement");
    stop.store(true, Ordering::Relaxed);
}

/// One kind of run, made for each stack in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measurement {
    IdleConnections,
    Tunnel,
    KeepAlive,
    NewConnections,
    Http2,
    Download,
}

impl Measurement {
    /// The memory run goes first in each round, before the load runs grow the heaps.
    const ALL: [Measurement; 6] = [
        Measurement::IdleConnections,
        Measurement::Tunnel,
        Measurement::KeepAlive,
        Measurement::NewConnections,
        Measurement::Http2,
        Measurement::Download,
    ];

    /// The name `--only` takes.
    fn flag(self) -> &'static str {
        match self {
            Measurement::IdleConnections => "idle",
            Measurement::Tunnel => "tunnel",
            Measurement::KeepAlive => "keep-alive",
            Measurement::NewConnections => "new-connections",
            Measurement::Http2 => "http2",
            Measurement::Download => "download",
        }
    }

    /// The measurements a comma-separated `--only` list names, in [`Measurement::ALL`]'s order.
    fn parse_list(text: &str) -> anyhow::Result<Vec<Measurement>> {
        let mut named = Vec::new();
        for name in text.split(',').map(str::trim) {
            let measurement = Self::ALL
                .into_iter()
                .find(|measurement| measurement.flag() == name)
                .with_context(|| format!("--only: unknown measurement {name:?}\n{USAGE}"))?;
            named.push(measurement);
        }
        Ok(Self::ALL.into_iter().filter(|measurement| named.contains(measurement)).collect())
    }

    fn name(self) -> &'static str {
        match self {
            Measurement::IdleConnections => "idle connections (RSS)",
            Measurement::Tunnel => "tunnel (iperf3)",
            Measurement::KeepAlive => "HTTPS keep-alive (wrk)",
            Measurement::NewConnections => "new TLS connections (wrk, Connection: close)",
            Measurement::Http2 => "HTTP/2 (h2load)",
            Measurement::Download => "1 GiB download (curl)",
        }
    }
}

/// The edge sides' RSS right after start, before any load: the base of the per-connection
/// figure.
struct Baseline {
    anchor_edge_kib: u64,
    edgible_edge_kib: u64,
}

/// What the measurements need besides the stacks.
struct Bench {
    client: Namespace,
    edge: Namespace,
    device: Namespace,
    edgible_device_tunnel: Ipv4Addr,
    options: Options,
}

impl Bench {
    /// Where a stack's edge listens.
    fn port(stack: Stack) -> u16 {
        match stack {
            Stack::Anchor => HAPROXY_PORT,
            Stack::Edgible => 443,
        }
    }

    fn url(stack: Stack, path: &str) -> String {
        match stack {
            Stack::Anchor => format!("https://{SERVER_NAME}:{HAPROXY_PORT}{path}"),
            Stack::Edgible => format!("https://{SERVER_NAME}{path}"),
        }
    }

    fn ca<'a>(stack: Stack, edgible: &'a EdgiblePlatform, anchor: &'a Anchor) -> (&'a Path, &'a str) {
        match stack {
            Stack::Anchor => (&anchor.ca_file, &anchor.ca_pem),
            Stack::Edgible => (&edgible.ca_file, &edgible.ca_pem),
        }
    }

    /// Waits until `GET /` through the stack, with its certificate checked, is the origin's.
    fn wait_served(&self, stack: Stack, edgible: &EdgiblePlatform, anchor: &Anchor) -> anyhow::Result<()> {
        let (ca_file, _) = Self::ca(stack, edgible, anchor);
        let url = Self::url(stack, "/");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut curl = self.client.exec("curl");
            curl.args(["-sS", "--fail", "--max-time", "10", "--cacert"]).arg(ca_file).arg(&url);
            let output = output_within(&mut curl, Duration::from_secs(30))?;
            let body = String::from_utf8_lossy(&output.stdout);
            if output.status.success() && body.lines().any(|line| line == "name=bench") {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{url} is not served by the origin within 120 s: {}",
                edgible_acceptance_tests::netns::output_text(&output)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn measure(
        &self,
        measurement: Measurement,
        stack: Stack,
        edgible: &EdgiblePlatform,
        anchor: &Anchor,
        fresh: &Baseline,
        samples: &mut Samples,
        what: &str,
    ) -> anyhow::Result<()> {
        let seconds = self.options.seconds;
        let connections = self.options.connections;
        match measurement {
            Measurement::IdleConnections => self.idle(stack, edgible, anchor, fresh, samples, what)?,
            Measurement::Tunnel => {
                let (address, pids) = match stack {
                    Stack::Anchor => (anchor::TUNNEL_DEVICE, anchor.tunnel_pids()),
                    Stack::Edgible => (self.edgible_device_tunnel, vec![edgible.edge_pid()?, edgible.agent_pid()?]),
                };
                let (report, cpu_seconds) = load::iperf3(&self.device, &self.edge, address, seconds, &pids)?;
                eprintln!("    {:.3} Gb/s, {cpu_seconds:.2} CPU-seconds", report.gbps);
                samples.record(Figure::TunnelGbps, stack, report.gbps);
                samples.record(Figure::TunnelCpuPerGbps, stack, cpu_seconds / report.gigabits());
            }
            Measurement::KeepAlive => {
                let report = load::wrk(&self.client, &Self::url(stack, "/"), connections, seconds, false)?;
                eprintln!(
                    "    {:.0} req/s, p50 {:?} ms, p99 {:?} ms",
                    report.requests_per_second, report.p50_ms, report.p99_ms
                );
                samples.record(Figure::KeepAliveRps, stack, report.requests_per_second);
                samples.record(Figure::KeepAliveP50Ms, stack, report.p50_ms.context("wrk printed no p50")?);
                samples.record(Figure::KeepAliveP99Ms, stack, report.p99_ms.context("wrk printed no p99")?);
                if report.socket_errors > 0 {
                    samples.note(format!("{what}: wrk counted {} socket errors", report.socket_errors));
                }
            }
            Measurement::NewConnections => {
                let report = load::wrk(&self.client, &Self::url(stack, "/"), connections, seconds, true)?;
                eprintln!("    {:.0} connections/s", report.requests_per_second);
                samples.record(Figure::NewTlsPerSecond, stack, report.requests_per_second);
                if report.socket_errors > 0 {
                    samples.note(format!("{what}: wrk counted {} socket errors", report.socket_errors));
                }
            }
            Measurement::Http2 => {
                let report = load::h2load(&self.client, &Self::url(stack, "/"), connections, HTTP2_STREAMS, seconds)?;
                eprintln!("    {:.0} req/s", report.requests_per_second);
                samples.record(Figure::Http2Rps, stack, report.requests_per_second);
                if report.failed > 0 {
                    samples.note(format!("{what}: h2load counted {} failed requests", report.failed));
                }
            }
            Measurement::Download => {
                let (ca_file, _) = Self::ca(stack, edgible, anchor);
                let url = Self::url(stack, &format!("/download?bytes={DOWNLOAD_BYTES}"));
                let transfer = load::download(&self.client, &url, ca_file, DOWNLOAD_BYTES, DOWNLOAD_TIMEOUT)?;
                eprintln!("    {:.2} s", transfer.seconds);
                samples.record(Figure::DownloadSeconds, stack, transfer.seconds);
            }
        }
        Ok(())
    }

    /// Opens the idle connections, reads both sides' RSS, closes them, and waits until the edge
    /// side let go of them.
    fn idle(
        &self,
        stack: Stack,
        edgible: &EdgiblePlatform,
        anchor: &Anchor,
        fresh: &Baseline,
        samples: &mut Samples,
        what: &str,
    ) -> anyhow::Result<()> {
        let (edge_pids, device_pids, baseline) = match stack {
            Stack::Anchor => (anchor.edge_pids(), anchor.device_pids(), fresh.anchor_edge_kib),
            Stack::Edgible => (vec![edgible.edge_pid()?], vec![edgible.agent_pid()?], fresh.edgible_edge_kib),
        };
        let (_, ca_pem) = Self::ca(stack, edgible, anchor);
        let port = Self::port(stack);
        let target = IdleTarget {
            address: SocketAddr::from((EDGE_ADDRESS, port)),
            server_name: SERVER_NAME.to_owned(),
            ca_pem: ca_pem.to_owned(),
        };
        let wanted = self.options.idle_connections as usize;
        let connections = IdleConnections::open(&self.client, target, wanted, IDLE_OPEN)?;
        // Let the last handshakes' buffers settle before reading.
        std::thread::sleep(Duration::from_secs(2));
        let filter = ["state", "established", "dport", "=", &format!(":{port}")];
        let open = load::count_sockets(&self.client, &filter)?;
        let edge_kib = load::total_rss_kib(&edge_pids)?;
        let device_kib = load::total_rss_kib(&device_pids)?;
        eprintln!(
            "    {} opened, {} failed, {open} still open; edge {} MiB, device {} MiB",
            connections.opened,
            connections.failed,
            edge_kib >> 10,
            device_kib >> 10
        );
        let first_error = connections.first_error.clone();
        if connections.failed > 0 {
            samples.note(format!(
                "{what}: {} connections failed to open and were replaced (the first: {})",
                connections.failed,
                first_error.as_deref().unwrap_or("unknown")
            ));
        }
        drop(connections);
        let released = edgible_acceptance_tests::wait_until_sync(Duration::from_secs(60), || {
            load::count_sockets(&self.edge, &["state", "established", "sport", "=", &format!(":{port}")])
                .is_ok_and(|count| count < 10)
        });
        anyhow::ensure!(open > 0, "no idle connection stayed open; the first failure: {first_error:?}");
        samples.record(Figure::EdgeKibPerConnection, stack, edge_kib.saturating_sub(baseline) as f64 / open as f64);
        if open == wanted {
            samples.record(Figure::EdgeRssMib, stack, edge_kib as f64 / 1024.0);
            samples.record(Figure::AgentRssMib, stack, device_kib as f64 / 1024.0);
        } else {
            samples.fail(format!(
                "{what}: only {open} of {wanted} idle connections were open when the RSS was read \
                 (the first failure: {})",
                first_error.as_deref().unwrap_or("none")
            ));
        }
        anyhow::ensure!(released, "the edge side still held the idle connections 60 s after they were closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> anyhow::Result<Options> {
        parse_args(list.iter().map(|arg| (*arg).to_owned()))
    }

    #[test]
    fn defaults_are_three_rounds_of_five_seconds_and_9900_idle_connections() -> anyhow::Result<()> {
        let options = args(&[])?;
        assert_eq!((options.rounds, options.seconds, options.idle_connections, options.connections), (3, 5, 9_900, 50));
        assert!(options.out.ends_with("bench.md"), "{}", options.out.display());
        assert_eq!((options.dir, options.boringtun), (None, None));
        assert_eq!(options.only, Measurement::ALL.to_vec());
        Ok(())
    }

    #[test]
    fn every_flag_is_read_and_bad_values_are_named() -> anyhow::Result<()> {
        let options = args(&[
            "--rounds",
            "5",
            "--seconds",
            "2",
            "--out",
            "/tmp/b.md",
            "--idle-connections",
            "1000",
            "--connections",
            "20",
            "--dir",
            "/tmp/bench",
            "--boringtun",
            "/opt/boringtun-cli",
            "--only",
            "new-connections,tunnel",
        ])?;
        assert_eq!(
            options,
            Options {
                rounds: 5,
                seconds: 2,
                out: "/tmp/b.md".into(),
                idle_connections: 1_000,
                connections: 20,
                dir: Some("/tmp/bench".into()),
                boringtun: Some("/opt/boringtun-cli".into()),
                only: vec![Measurement::Tunnel, Measurement::NewConnections],
            }
        );
        assert!(args(&["--only", "tunnel,fast"]).expect_err("unknown").to_string().contains("\"fast\""));
        assert!(args(&["--rounds", "0"]).expect_err("zero rounds").to_string().contains("--rounds must be at least 1"));
        assert!(args(&["--seconds", "x"]).expect_err("not a number").to_string().contains("--seconds"));
        assert!(args(&["--out"]).expect_err("no value").to_string().contains("--out needs a value"));
        assert!(args(&["--fast"]).expect_err("unknown").to_string().contains("\"--fast\""));
        Ok(())
    }

    #[test]
    fn errors_are_cut_to_their_first_line() {
        assert_eq!(one_line("wrk exited with 1: boom\nmore\n"), "wrk exited with 1: boom");
        assert_eq!(one_line(&"x".repeat(500)).len(), 300);
    }
}
