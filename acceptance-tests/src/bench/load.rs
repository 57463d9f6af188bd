//! The measurements: the load tools run inside the topology's namespaces (`iperf3` between the
//! tunnel addresses, `wrk`, `h2load`, `curl`), the processes' CPU time and RSS read from
//! `/proc`, and the idle connections of the memory run, opened by this process from a thread
//! that entered the client namespace. Every run has a deadline: a tool that hangs is killed.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::parse::{self, CurlTransfer, H2loadReport, IperfReport, WrkReport};
use crate::netns::{Namespace, output_text, output_within};

/// How much longer than its own duration a timed tool may take before it is killed.
const GRACE: Duration = Duration::from_secs(60);

/// The CPU time a process used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = parse::proc_stat_ticks(&stat)?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .context("reading CLK_TCK")?
        .filter(|ticks| *ticks > 0)
        .context("CLK_TCK is not set")?;
    Ok(ticks as f64 / per_second as f64)
}

/// The resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(parse::proc_status_rss_kib(&status)?)
}

/// The summed RSS of processes, in KiB.
pub fn total_rss_kib(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|pid| rss_kib(*pid)).sum()
}

/// The summed CPU time of processes, in seconds.
pub fn total_cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

/// The IPv4 addresses of `interface` in `namespace`.
pub fn interface_addresses(namespace: &Namespace, interface: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    Ok(parse::ip_addresses(&namespace.ip(&["-4", "-o", "addr", "show", "dev", interface])?))
}

/// How many TCP sockets in `namespace` match the `ss` filter `filter` (e.g.
/// `state established dport = :443`).
pub fn count_sockets(namespace: &Namespace, filter: &[&str]) -> anyhow::Result<usize> {
    let mut command = namespace.exec("ss");
    command.args(["-H", "-t", "-n"]).args(filter);
    let output = output_within(&mut command, Duration::from_secs(30))?;
    anyhow::ensure!(output.status.success(), "ss failed: {}", output_text(&output));
    Ok(String::from_utf8_lossy(&output.stdout).lines().filter(|line| !line.trim().is_empty()).count())
}

/// Waits until something in `namespace` listens on TCP `address`.
pub fn wait_listening(namespace: &Namespace, address: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let port = format!("sport = :{}", address.port());
    loop {
        let mut command = namespace.exec("ss");
        command.args(["-H", "-l", "-t", "-n", &port]);
        let output = output_within(&mut command, Duration::from_secs(30))?;
        if String::from_utf8_lossy(&output.stdout).contains(&address.to_string()) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listens on {address} in {} after {timeout:?}",
            namespace.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `command` (made with [`Namespace::exec`]) with a deadline; answers its stdout, or an
/// error with everything it printed.
fn run_tool(tool: &str, command: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let output = output_within(command, timeout).with_context(|| format!("running {tool}"))?;
    anyhow::ensure!(output.status.success(), "{tool} exited with {}: {}", output.status, output_text(&output));
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One iperf3 test of `seconds`: a one-off server on `server_address` in `server`, the client
/// in `client` with `--reverse`, so the data flows from the server's side (the device) to the
/// client's (the edge), the way a download does. `pids` are the tunnel's processes, whose CPU
/// time over the run is answered too (in seconds).
pub fn iperf3(
    server: &Namespace,
    client: &Namespace,
    server_address: Ipv4Addr,
    seconds: u32,
    pids: &[u32],
) -> anyhow::Result<(IperfReport, f64)> {
    let mut daemon = server
        .exec("iperf3")
        .args(["--server", "--one-off", "--bind", &server_address.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (apt-get install iperf3)")?;
    let result = (|| {
        // Connecting to see whether it listens would use up its one test: look at sockets instead.
        wait_listening(server, SocketAddr::from((server_address, 5201)), Duration::from_secs(10))?;
        let before = total_cpu_seconds(pids)?;
        let mut command = client.exec("iperf3");
        command.args(["--client", &server_address.to_string(), "--reverse", "--json", "--time", &seconds.to_string()]);
        let json = output_within(&mut command, Duration::from_secs(u64::from(seconds)) + GRACE)
            .context("running iperf3 --client")?;
        let after = total_cpu_seconds(pids)?;
        let report = parse::iperf3(&String::from_utf8_lossy(&json.stdout))?;
        anyhow::Ok((report, after - before))
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    result
}

/// `wrk` against `url` from `client` with `connections` connections for `seconds`; with
/// `close`, every request asks for `Connection: close`, so each one is a new TLS connection.
pub fn wrk(client: &Namespace, url: &str, connections: u32, seconds: u32, close: bool) -> anyhow::Result<WrkReport> {
    let mut command = client.exec("wrk");
    command.args([
        "--threads",
        "2",
        "--connections",
        &connections.to_string(),
        "--duration",
        &format!("{seconds}s"),
        "--timeout",
        "10s",
        "--latency",
    ]);
    if close {
        command.args(["--header", "Connection: close"]);
    }
    command.arg(url);
    let text = run_tool("wrk", &mut command, Duration::from_secs(u64::from(seconds)) + GRACE)?;
    let report = parse::wrk(&text)?;
    anyhow::ensure!(report.requests > 0, "wrk completed no request:\n{text}");
    anyhow::ensure!(report.non_success == 0, "wrk saw {} responses that were not 2xx/3xx:\n{text}", report.non_success);
    Ok(report)
}

/// `h2load` over HTTP/2 against `url` from `client`: `connections` connections with `streams`
/// concurrent streams each, for `seconds`.
pub fn h2load(
    client: &Namespace,
    url: &str,
    connections: u32,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<H2loadReport> {
    let mut command = client.exec("h2load");
    command.args([
        "--threads",
        "2",
        "--clients",
        &connections.to_string(),
        "--max-concurrent-streams",
        &streams.to_string(),
        "--duration",
        &seconds.to_string(),
        "--connection-inactivity-timeout",
        "10",
        url,
    ]);
    let text = run_tool("h2load", &mut command, Duration::from_secs(u64::from(seconds)) + GRACE)?;
    let report = parse::h2load(&text)?;
    anyhow::ensure!(
        report.succeeded > 0 && report.status_errors == 0,
        "h2load: {} requests succeeded, {} answered 4xx or 5xx:\n{text}",
        report.succeeded,
        report.status_errors
    );
    anyhow::ensure!(text.contains("Application protocol: h2"), "h2load did not negotiate HTTP/2:\n{text}");
    Ok(report)
}

/// Downloads `url` with `curl` from `client` into nothing, checking the certificate against
/// `ca_file`; answers the transfer, which must be a 200 of `bytes` bytes.
pub fn download(
    client: &Namespace,
    url: &str,
    ca_file: &Path,
    bytes: u64,
    timeout: Duration,
) -> anyhow::Result<CurlTransfer> {
    let mut command = client.exec("curl");
    command
        .args(["-sS", "--fail", "--cacert"])
        .arg(ca_file)
        .args(["--max-time", &timeout.as_secs().to_string(), "-o", "/dev/null", "-w"])
        .arg("%{http_code} %{size_download} %{time_total}")
        .arg(url);
    let text = run_tool("curl", &mut command, timeout + GRACE)?;
    let transfer = parse::curl_transfer(&text)?;
    anyhow::ensure!(
        transfer.status == 200 && transfer.bytes == bytes,
        "the download of {url} answered {} with {} bytes, not 200 with {bytes}",
        transfer.status,
        transfer.bytes
    );
    Ok(transfer)
}

/// Idle connections held open from the client namespace: each one went through the whole
/// path (TCP to the edge, TLS with the device side, one `GET /` answered 200 with keep-alive)
/// and then sits idle until this is dropped.
pub struct IdleConnections {
    /// How many are open.
    pub opened: usize,
    /// How many failed, and the first failure.
    pub failed: usize,
    pub first_error: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the thread holding the connections reports once it opened what it could.
struct Opened {
    opened: usize,
    failed: usize,
    first_error: Option<String>,
}

/// What one idle connection needs.
#[derive(Clone)]
pub struct IdleTarget {
    /// Where the edge side listens.
    pub address: SocketAddr,
    /// The SNI and `Host`.
    pub server_name: String,
    /// The CA that signed the device side's certificate, PEM.
    pub ca_pem: String,
}

/// At most this many connections are being opened at once.
const OPENING_AT_ONCE: usize = 64;
/// How long one connection may take to open and answer its request.
const OPEN_ONE: Duration = Duration::from_secs(15);

impl IdleConnections {
    /// Opens `count` connections to `target` from `namespace`, `OPENING_AT_ONCE` at a time,
    /// for at most `within`, replacing a few that fail; answers once `count` are open, or the
    /// attempts or the time ran out.
    pub fn open(namespace: &Namespace, target: IdleTarget, count: usize, within: Duration) -> anyhow::Result<Self> {
        let namespace_file =
            std::fs::File::open(namespace.path()).with_context(|| format!("opening {}", namespace.path().display()))?;
        let connector = crate::platform::tls_connector(&target.ca_pem, &[b"http/1.1"])?;
        let (report, opened) = std::sync::mpsc::channel::<anyhow::Result<Opened>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("idle-connections".into()).spawn(move || {
            // setns(2) moves only this thread into the client namespace, so every socket it
            // creates belongs there; the runtime runs on this thread alone.
            let runtime = nix::sched::setns(&namespace_file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the client namespace")
                .and_then(|()| {
                    tokio::runtime::Builder::new_current_thread().enable_all().build().context("building a runtime")
                });
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = report.send(Err(error));
                    return;
                }
            };
            runtime.block_on(async move {
                let deadline = tokio::time::Instant::now() + within;
                let target = Arc::new(target);
                // A connection that fails (a handshake lost under the burst) is replaced, up to
                // one extra attempt per 20 connections.
                let attempts_at_most = count + count / 20 + 10;
                let mut attempts = futures::stream::iter(0..attempts_at_most)
                    .map(|_| tokio::time::timeout(OPEN_ONE, open_one(target.clone(), connector.clone())))
                    .buffer_unordered(OPENING_AT_ONCE);
                let mut streams = Vec::with_capacity(count);
                let mut failed = 0;
                let mut first_error = None;
                while streams.len() < count
                    && let Ok(Some(attempt)) = tokio::time::timeout_at(deadline, attempts.next()).await
                {
                    match attempt
                        .map_err(|_| anyhow::anyhow!("no answer within {OPEN_ONE:?}"))
                        .and_then(|result| result)
                    {
                        Ok(stream) => streams.push(stream),
                        Err(error) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| format!("{error:#}"));
                        }
                    }
                }
                drop(attempts);
                let _ = report.send(Ok(Opened { opened: streams.len(), failed, first_error }));
                let _ = stopped.await;
                drop(streams);
            });
        })?;
        let opened = match opened.recv_timeout(within + Duration::from_secs(60)) {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("the idle connections were not opened within {within:?}"),
        };
        Ok(Self {
            opened: opened.opened,
            failed: opened.failed,
            first_error: opened.first_error,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection: TCP, TLS, `GET /` with keep-alive, the whole 200 response read.
async fn open_one(
    target: Arc<IdleTarget>,
    connector: tokio_rustls::TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(target.address).await.context("connecting")?;
    let name = rustls::pki_types::ServerName::try_from(target.server_name.clone())?;
    let mut tls = connector.connect(name, tcp).await.context("the TLS handshake")?;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: edgible-bench\r\n\r\n", target.server_name);
    tls.write_all(request.as_bytes()).await.context("sending the request")?;
    let mut response = Vec::with_capacity(1024);
    let mut buffer = [0u8; 4096];
    loop {
        let read = tls.read(&mut buffer).await.context("reading the response")?;
        anyhow::ensure!(read > 0, "the connection closed before the response was complete");
        response.extend_from_slice(&buffer[..read]);
        if let Some(len) = parse::http1_response_len(&response)?
            && response.len() >= len
        {
            return Ok(tls);
        }
    }
}
