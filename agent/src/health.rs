//! Health checks of running workloads, per the application's [`HealthCheck`]: an HTTP `GET` of
//! a path (any 2xx or 3xx passes) or a TCP connect, on the workload's address and port (its
//! driver's [`crate::driver::Driver::address`]: `127.0.0.1`, or a microVM's guest address).
//!
//! A workload is `starting` until its first passing check, then `running`; after
//! `unhealthy_threshold` consecutive failures it is `unhealthy` until a check passes again.
//! Until the first pass, checks run after pauses that start at 20 ms and double up to
//! `starting_interval` (at most the declared interval), so that a workload is reported running
//! soon after it is ready (a migrated application is down until then). Without a declared check
//! a workload counts as healthy as long as it runs.
//!
//! [`HealthTracker`] holds the rules and does no IO; [`HealthMonitor`] runs the checks.

use std::net::SocketAddr;
use std::time::Duration;

use edgible::model::{HealthCheck, HealthProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::driver::Wake;
use crate::tasks::AbortOnDrop;

/// What the checks say about a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthState {
    /// No check has passed yet; the last failure, if any.
    Starting {
        last_error: Option<String>,
    },
    Healthy,
    Unhealthy {
        message: String,
    },
}

/// The rules that turn check results into a [`HealthState`].
#[derive(Debug, Clone)]
pub struct HealthTracker {
    threshold: u32,
    consecutive_failures: u32,
    state: HealthState,
}

impl HealthTracker {
    pub fn new(unhealthy_threshold: u32) -> Self {
        Self {
            threshold: unhealthy_threshold.max(1),
            consecutive_failures: 0,
            state: HealthState::Starting { last_error: None },
        }
    }

    pub fn state(&self) -> &HealthState {
        &self.state
    }

    /// Records one check result; answers whether the state changed.
    pub fn record(&mut self, result: Result<(), String>) -> bool {
        let next = match result {
            Ok(()) => {
                self.consecutive_failures = 0;
                HealthState::Healthy
            }
            Err(error) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                match &self.state {
                    HealthState::Starting { .. } => HealthState::Starting { last_error: Some(error) },
                    HealthState::Healthy if self.consecutive_failures < self.threshold => HealthState::Healthy,
                    HealthState::Healthy | HealthState::Unhealthy { .. } => HealthState::Unhealthy {
                        message: format!("{} consecutive health checks failed: {error}", self.consecutive_failures),
                    },
                }
            }
        };
        let changed = next != self.state;
        self.state = next;
        changed
    }
}

/// Timing of health checks that the application spec does not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// How often to check a workload that has not passed a check yet.
    pub starting_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { starting_interval: Duration::from_millis(250) }
    }
}

/// The pause after a starting workload's first failed check; it doubles with each further
/// failure up to `starting_interval`. Most workloads listen within tens of milliseconds, and a
/// migrated one is down until its first check passes.
const FIRST_STARTING_PAUSE: Duration = Duration::from_millis(20);

/// The pauses between the checks of a starting workload: [`FIRST_STARTING_PAUSE`], doubling
/// up to `max`.
struct StartingPauses {
    next: Duration,
    max: Duration,
}

impl StartingPauses {
    fn new(max: Duration) -> Self {
        Self { next: FIRST_STARTING_PAUSE.min(max), max }
    }

    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

/// Runs the health checks of one workload while it lives; dropping it stops the checks.
#[derive(Debug)]
pub struct HealthMonitor {
    state: watch::Receiver<HealthState>,
    _task: Option<AbortOnDrop>,
}

impl HealthMonitor {
    /// Starts checking the workload listening on `address`; `wake` is woken on every change.
    /// A workload without an address (its driver runs nothing for it any more) never passes.
    pub fn spawn(check: Option<HealthCheck>, address: Option<SocketAddr>, config: HealthConfig, wake: Wake) -> Self {
        let Some(check) = check else {
            let (_, state) = watch::channel(HealthState::Healthy);
            return Self { state, _task: None };
        };
        let Some(address) = address else {
            let last_error = Some("the workload has no address".to_owned());
            let (_, state) = watch::channel(HealthState::Starting { last_error });
            return Self { state, _task: None };
        };
        let (sender, state) = watch::channel(HealthState::Starting { last_error: None });
        let task = tokio::spawn(run_checks(check, address, config, sender, wake));
        Self { state, _task: Some(AbortOnDrop::new(task)) }
    }

    pub fn state(&self) -> HealthState {
        self.state.borrow().clone()
    }
}

async fn run_checks(
    check: HealthCheck,
    address: SocketAddr,
    config: HealthConfig,
    sender: watch::Sender<HealthState>,
    wake: Wake,
) {
    let mut tracker = HealthTracker::new(check.unhealthy_threshold);
    let interval = Duration::from_secs(u64::from(check.interval_seconds.max(1)));
    let timeout = Duration::from_secs(u64::from(check.timeout_seconds.max(1)));
    let mut starting = StartingPauses::new(config.starting_interval.min(interval));
    loop {
        let result = probe(&check, address, timeout).await;
        if tracker.record(result) {
            sender.send_replace(tracker.state().clone());
            wake.wake();
        }
        let pause = match tracker.state() {
            HealthState::Starting { .. } => starting.next(),
            HealthState::Healthy | HealthState::Unhealthy { .. } => interval,
        };
        tokio::time::sleep(pause).await;
    }
}

/// Runs one check against `address`.
pub async fn probe(check: &HealthCheck, address: SocketAddr, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(address).await.map_err(|e| format!("cannot connect to {address}: {e}"))?;
        match (check.protocol, &check.path) {
            (HealthProtocol::Tcp, _) | (HealthProtocol::Http, None) => Ok(()),
            (HealthProtocol::Http, Some(path)) => http_get(&mut stream, address, path.as_str()).await,
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// The most of an answer read to find its status line.
const MAX_STATUS_LINE: usize = 4096;

async fn http_get(stream: &mut TcpStream, address: SocketAddr, path: &str) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: edgible-agent health check\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < MAX_STATUS_LINE {
        let count = stream.read(&mut chunk).await.map_err(|e| format!("cannot read the answer: {e}"))?;
        if count == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..count]);
    }
    let status = parse_status_line(&head)?;
    if (200..400).contains(&status) { Ok(()) } else { Err(format!("GET {path} answered {status}")) }
}

/// Reads the status code from the start of an HTTP/1.x answer (`HTTP/1.1 204 No Content`).
pub fn parse_status_line(head: &[u8]) -> Result<u16, String> {
    let end = head.iter().position(|byte| *byte == b'\n').ok_or("the answer has no complete status line")?;
    let line = std::str::from_utf8(&head[..end]).map_err(|_| "the status line is not text")?.trim_end();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 answer: {:?}", truncate(line)));
    }
    let code = parts.next().unwrap_or_default();
    match code.parse::<u16>() {
        Ok(status) if (100..600).contains(&status) && code.len() == 3 => Ok(status),
        _ => Err(format!("bad status line: {:?}", truncate(line))),
    }
}

fn truncate(line: &str) -> &str {
    let mut end = line.len().min(80);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_until_the_first_pass_then_unhealthy_only_after_the_threshold() {
        let mut tracker = HealthTracker::new(3);
        assert!(tracker.record(Err("refused".into())));
        assert_eq!(tracker.state(), &HealthState::Starting { last_error: Some("refused".into()) });
        assert!(!tracker.record(Err("refused".into())));
        assert!(!tracker.record(Err("refused".into())));
        assert!(matches!(tracker.state(), HealthState::Starting { .. }), "never unhealthy before a first pass");

        assert!(tracker.record(Ok(())));
        assert_eq!(tracker.state(), &HealthState::Healthy);
        assert!(!tracker.record(Err("500".into())));
        assert!(!tracker.record(Err("500".into())));
        assert_eq!(tracker.state(), &HealthState::Healthy);
        assert!(tracker.record(Err("500".into())));
        assert_eq!(
            tracker.state(),
            &HealthState::Unhealthy { message: "3 consecutive health checks failed: 500".into() }
        );
        assert!(tracker.record(Ok(())));
        assert_eq!(tracker.state(), &HealthState::Healthy);
    }

    #[test]
    fn a_starting_workload_is_checked_soon_then_less_often() {
        let ms = Duration::from_millis;
        let mut pauses = StartingPauses::new(ms(250));
        let seen: Vec<Duration> = (0..6).map(|_| pauses.next()).collect();
        assert_eq!(seen, [ms(20), ms(40), ms(80), ms(160), ms(250), ms(250)]);
        let mut pauses = StartingPauses::new(ms(10));
        assert_eq!([pauses.next(), pauses.next()], [ms(10), ms(10)], "never above the maximum");
    }

    #[test]
    fn a_threshold_of_zero_behaves_as_one() {
        let mut tracker = HealthTracker::new(0);
        tracker.record(Ok(()));
        tracker.record(Err("down".into()));
        assert!(matches!(tracker.state(), HealthState::Unhealthy { .. }));
    }

    #[test]
    fn status_lines_parse_and_garbage_is_named() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\nServer: x\r\n"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 302\r\n"), Ok(302));
        assert!(parse_status_line(b"HTTP/1.1 200 OK").is_err(), "incomplete line");
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 OK\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 +20 OK\r\n").is_err());
        assert!(parse_status_line(b"\xff\xfe\r\n").is_err());
        assert!(parse_status_line(b"").is_err());
    }

    #[tokio::test]
    async fn probes_reach_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 503 Busy\r\n\r\n"] {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                stream.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        let check: HealthCheck =
            serde_json::from_value(serde_json::json!({"protocol": "http", "path": "/healthz"})).expect("a valid check");
        let timeout = Duration::from_secs(5);
        assert_eq!(probe(&check, address, timeout).await, Ok(()));
        assert_eq!(probe(&check, address, timeout).await, Err("GET /healthz answered 503".into()));
        server.await.expect("server");

        let tcp: HealthCheck = serde_json::from_value(serde_json::json!({"protocol": "tcp"})).expect("a valid check");
        let error = probe(&tcp, address, timeout).await.expect_err("nothing listens any more");
        assert!(error.contains(&format!("cannot connect to {address}")), "{error}");
    }
}
