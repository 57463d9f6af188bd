//! The push session with the server: one authenticated WebSocket that brings desired state to
//! the reconciler and takes its reports (acks, status, events, logs) back.
//!
//! - [`transport`]: frames, the server URL, and the WebSocket connector.
//! - [`session`]: one session over any sink and stream of frames.
//! - [`link`]: what the session exchanges with the data path (tunnel network, edges,
//!   certificates and their requests, reconnect requests).
//! - [`run`] (here): the loop that connects, runs a session, and reconnects after exponential
//!   backoff with full jitter. The backoff resets once a session stayed up for the policy's
//!   `reset_after`, so a server that accepts and then drops connections is still backed off.
//!   When the data path reports that the device's addresses changed, the loop drops the
//!   session (or its wait) and connects again at once: the old connection's path is gone.
//!
//! The reconciler does not depend on any of this: while the server is unreachable, workloads
//! keep running on the last desired state the agent persisted.

pub mod link;
pub mod session;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use edgible::model::ApplicationId;
use edgible::protocol::close;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::backoff::{Backoff, BackoffPolicy, Jitter};
use crate::events::EventLog;
use crate::logs::LogBuffer;
use crate::migration::Migrations;
use crate::reconcile::{AgentReport, DesiredUpdate, ReconcileError, ReconcilerHandle, UpdateOutcome};
use crate::usage::UsageLedger;

pub use link::{DataPathLink, SessionLink, link};
pub use session::{ControlStats, HelloParams, SessionEnd, SessionOutcome};
pub use transport::{Connect, ConnectError, Connection, Frame, WebSocketConnector};

/// Timing and limits of the push channel.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Backoff between connection attempts.
    pub reconnect: BackoffPolicy,
    /// The longest a connection attempt (TCP, TLS, upgrade) may take.
    pub connect_timeout: Duration,
    /// How long the server may take to answer `hello` with `welcome`.
    pub welcome_timeout: Duration,
    /// How long writing one frame may take before the server counts as gone.
    pub send_timeout: Duration,
    /// The server's ping interval when its `welcome` does not say.
    pub default_ping_interval: Duration,
    /// After this many ping intervals without any frame, the server counts as gone.
    pub missed_pings: u32,
    /// How often buffered events and log lines are sent.
    pub flush_interval: Duration,
    /// The most log lines in one `logs` frame.
    pub max_log_lines_per_frame: usize,
    /// Pongs waiting for the writer; beyond this, pings go unanswered (the writer is stuck).
    pub outgoing_capacity: usize,
    /// Desired-state updates received and not yet taken by the reconciler; beyond this the
    /// session stops reading until it catches up.
    pub update_queue: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            reconnect: BackoffPolicy {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                reset_after: Duration::from_secs(60),
            },
            connect_timeout: Duration::from_secs(15),
            welcome_timeout: Duration::from_secs(15),
            send_timeout: Duration::from_secs(10),
            default_ping_interval: Duration::from_secs(20),
            missed_pings: 3,
            flush_interval: Duration::from_millis(100),
            max_log_lines_per_frame: 200,
            outgoing_capacity: 64,
            update_queue: 64,
        }
    }
}

/// What the push session needs from the rest of the agent: the reconciler, its report, and
/// the buffers of events and output. [`ReconcilerHandle`] is the real one.
#[async_trait::async_trait]
pub trait Local: Send + Sync {
    /// Takes desired state (persisting it first); answers whether it was stale.
    async fn update(&self, update: DesiredUpdate) -> Result<UpdateOutcome, ReconcileError>;

    /// The reconciler's report: applied revision and per-application status.
    fn report(&self) -> watch::Receiver<AgentReport>;

    /// The recent output of an application, if a driver keeps any.
    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer>;

    fn events(&self) -> EventLog;

    /// The usage ledger whose records the session sends and whose acks it applies, if any.
    fn usage(&self) -> Option<Arc<UsageLedger>> {
        None
    }

    /// The executor of migration steps the session hands `migration_step`s to and whose
    /// results it sends, if any.
    fn migrations(&self) -> Option<Arc<Migrations>> {
        None
    }
}

/// A [`Local`] with a usage ledger and migration steps: what `edgible-agent run` hands the
/// session. Everything else is the wrapped reconciler's.
pub struct WithServices<L> {
    pub local: L,
    pub usage: Arc<UsageLedger>,
    pub migrations: Arc<Migrations>,
}

#[async_trait::async_trait]
impl<L: Local> Local for WithServices<L> {
    async fn update(&self, update: DesiredUpdate) -> Result<UpdateOutcome, ReconcileError> {
        self.local.update(update).await
    }

    fn report(&self) -> watch::Receiver<AgentReport> {
        self.local.report()
    }

    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        self.local.logs(application_id)
    }

    fn events(&self) -> EventLog {
        self.local.events()
    }

    fn usage(&self) -> Option<Arc<UsageLedger>> {
        Some(Arc::clone(&self.usage))
    }

    fn migrations(&self) -> Option<Arc<Migrations>> {
        Some(Arc::clone(&self.migrations))
    }
}

#[async_trait::async_trait]
impl Local for ReconcilerHandle {
    async fn update(&self, update: DesiredUpdate) -> Result<UpdateOutcome, ReconcileError> {
        ReconcilerHandle::update(self, update).await
    }

    fn report(&self) -> watch::Receiver<AgentReport> {
        ReconcilerHandle::report(self)
    }

    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        ReconcilerHandle::logs(self, application_id)
    }

    fn events(&self) -> EventLog {
        ReconcilerHandle::events(self)
    }
}

#[async_trait::async_trait]
impl<T: Local + ?Sized> Local for Arc<T> {
    async fn update(&self, update: DesiredUpdate) -> Result<UpdateOutcome, ReconcileError> {
        T::update(self, update).await
    }

    fn report(&self) -> watch::Receiver<AgentReport> {
        T::report(self)
    }

    fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
        T::logs(self, application_id)
    }

    fn events(&self) -> EventLog {
        T::events(self)
    }

    fn usage(&self) -> Option<Arc<UsageLedger>> {
        T::usage(self)
    }

    fn migrations(&self) -> Option<Arc<Migrations>> {
        T::migrations(self)
    }
}

/// Keeps a session with the server until `shutdown` becomes true (or its sender is dropped):
/// connects, runs the session, and after it ends waits a backoff before connecting again.
#[allow(clippy::too_many_arguments)]
pub async fn run<C, L>(
    config: &ControlConfig,
    hello: &HelloParams,
    connector: &C,
    local: &L,
    link: &SessionLink,
    stats: &ControlStats,
    jitter: &mut (impl Jitter + Send),
    mut shutdown: watch::Receiver<bool>,
) where
    C: Connect + ?Sized,
    L: Local + ?Sized,
{
    let mut backoff = Backoff::new(config.reconnect);
    let mut reconnects = link.reconnects();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = tokio::select! {
            attempt = timeout(config.connect_timeout, connector.connect()) => attempt,
            () = stopped(&mut shutdown) => return,
            () = link::reconnect_requested(&mut reconnects) => {
                tracing::info!("the device's addresses changed; connecting again");
                continue;
            }
        };
        match attempt {
            Ok(Ok(Connection { tx, rx })) => {
                let outcome = tokio::select! {
                    outcome = session::run(config, hello, local, link, stats, tx, rx, &mut shutdown) => outcome,
                    () = link::reconnect_requested(&mut reconnects) => {
                        // The connection's path is gone with the old address; its socket would
                        // only notice after the server's silence timeout.
                        tracing::info!("the device's addresses changed; reconnecting now");
                        continue;
                    }
                };
                if outcome.end == SessionEnd::Shutdown {
                    return;
                }
                if let Some(welcomed_at) = outcome.welcomed_at {
                    // Healthy from the welcome until now: long enough, and the backoff starts over.
                    backoff.healthy(welcomed_at);
                    backoff.healthy(Instant::now());
                }
                match &outcome.end {
                    SessionEnd::Closed { code: Some(close::REPLACED), .. } => {
                        // Another agent holds this device's credential (a copied state
                        // directory). Reconnecting at once would evict it and be evicted in
                        // turn; backing off to the longest delays keeps the two from flapping.
                        tracing::error!(
                            "another agent connected as this device and replaced this session; two agents \
                             must not share one identity"
                        );
                        backoff.saturate();
                    }
                    SessionEnd::Refused(_) | SessionEnd::Closed { code: Some(close::POLICY_VIOLATION), .. } => {
                        tracing::error!("{}", outcome.end);
                    }
                    end => tracing::warn!("{end}"),
                }
            }
            Ok(Err(error @ ConnectError::Refused { .. })) => tracing::error!(%error, "cannot open the push session"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot open the push session"),
            Err(_) => {
                tracing::warn!(error = %ConnectError::TimedOut(connector.target()), "cannot open the push session");
            }
        }
        let delay = backoff.failure(jitter);
        tracing::info!(delay_seconds = delay.as_secs_f64(), attempt = backoff.failures(), "reconnecting after a delay");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut shutdown) => return,
            () = link::reconnect_requested(&mut reconnects) => {
                tracing::info!("the device's addresses changed; connecting again without waiting");
            }
        }
    }
}

/// Completes once `shutdown` is true or its sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: nobody can ask to go on.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Mutex;

    use edgible::model::{DeviceId, Revision};
    use edgible::protocol::v1::{AgentMessage, ServerMessage};
    use edgible::protocol::{decode, encode};
    use futures::channel::mpsc;
    use futures::{SinkExt, StreamExt};

    use super::*;
    use crate::logs::LogLimits;
    use crate::reconcile::DesiredState;

    /// A reconciler without processes: it takes desired state like the real one and, when
    /// `auto_apply` is set, reports each taken revision as applied at once.
    pub(crate) struct FakeLocal {
        pub desired: Mutex<DesiredState>,
        pub report: watch::Sender<AgentReport>,
        pub events: EventLog,
        pub logs: Mutex<BTreeMap<ApplicationId, LogBuffer>>,
        pub auto_apply: bool,
        /// While true, updates wait: a reconciler busy stopping a workload.
        pub busy: watch::Sender<bool>,
        pub usage: Mutex<Option<Arc<UsageLedger>>>,
        pub migrations: Mutex<Option<Arc<Migrations>>>,
    }

    impl FakeLocal {
        pub(crate) fn new(auto_apply: bool) -> Self {
            Self {
                desired: Mutex::default(),
                report: watch::Sender::new(AgentReport::default()),
                events: EventLog::new(16),
                logs: Mutex::default(),
                auto_apply,
                busy: watch::Sender::new(false),
                usage: Mutex::default(),
                migrations: Mutex::default(),
            }
        }

        /// A log buffer for `application_id`, which the report lists so the session sends it.
        pub(crate) fn log_buffer(&self, application_id: ApplicationId, limits: LogLimits) -> LogBuffer {
            let buffer = LogBuffer::new(limits);
            self.logs.lock().expect("not poisoned").insert(application_id, buffer.clone());
            self.report.send_modify(|report| {
                report.applications.push(edgible::protocol::v1::ApplicationStatus {
                    application_id,
                    revision: 1,
                    phase: edgible::protocol::v1::Phase::Running,
                    message: None,
                });
            });
            buffer
        }

        pub(crate) fn apply(&self, revision: Revision) {
            self.report.send_modify(|report| report.applied_revision = Some(revision));
        }
    }

    #[async_trait::async_trait]
    impl Local for FakeLocal {
        async fn update(&self, update: DesiredUpdate) -> Result<UpdateOutcome, ReconcileError> {
            let _ = self.busy.subscribe().wait_for(|busy| !*busy).await;
            let outcome = self.desired.lock().expect("not poisoned").apply(update);
            if let (true, UpdateOutcome::Taken { revision }) = (self.auto_apply, outcome) {
                self.apply(revision);
            }
            Ok(outcome)
        }

        fn report(&self) -> watch::Receiver<AgentReport> {
            self.report.subscribe()
        }

        fn logs(&self, application_id: ApplicationId) -> Option<LogBuffer> {
            self.logs.lock().expect("not poisoned").get(&application_id).cloned()
        }

        fn events(&self) -> EventLog {
            self.events.clone()
        }

        fn usage(&self) -> Option<Arc<UsageLedger>> {
            self.usage.lock().expect("not poisoned").clone()
        }

        fn migrations(&self) -> Option<Arc<Migrations>> {
            self.migrations.lock().expect("not poisoned").clone()
        }
    }

    /// The server's end of a connection made of channels.
    pub(crate) struct FakeServer {
        pub to_agent: mpsc::Sender<Result<Frame, String>>,
        pub from_agent: mpsc::Receiver<Frame>,
    }

    impl FakeServer {
        /// A connection whose agent-to-server direction holds at most `capacity` unread frames.
        pub(crate) fn pair(
            capacity: usize,
        ) -> (FakeServer, mpsc::Sender<Frame>, mpsc::Receiver<Result<Frame, String>>) {
            let (agent_tx, from_agent) = mpsc::channel(capacity);
            let (to_agent, agent_rx) = mpsc::channel(64);
            (FakeServer { to_agent, from_agent }, agent_tx, agent_rx)
        }

        pub(crate) async fn send(&mut self, message: &ServerMessage) {
            self.send_text(encode(message)).await;
        }

        pub(crate) async fn send_text(&mut self, text: String) {
            self.to_agent.send(Ok(Frame::Text(text))).await.expect("the agent listens");
        }

        pub(crate) async fn welcome(&mut self, ping_interval_seconds: Option<u64>) {
            let device_id = DeviceId::new();
            let tunnel_address = std::net::Ipv4Addr::new(100, 96, 0, 2);
            let server_version = "test".to_owned();
            self.send(&ServerMessage::Welcome {
                device_id,
                tunnel_address,
                server_version,
                ping_interval_seconds,
                tunnel_cidr: None,
            })
            .await;
        }

        /// The next message the agent sent, skipping control frames.
        pub(crate) async fn next(&mut self) -> Option<AgentMessage> {
            loop {
                match tokio::time::timeout(Duration::from_secs(30), self.from_agent.next()).await {
                    Ok(Some(Frame::Text(text))) => return Some(decode(&text).expect("the agent sends valid frames")),
                    Ok(Some(Frame::Close(_)) | None) => return None,
                    Ok(Some(_)) => continue,
                    Err(_) => panic!("the agent sent nothing for 30 s"),
                }
            }
        }

        /// Reads until a message matches, answering nothing on the way.
        pub(crate) async fn until(&mut self, what: &str, matches: impl Fn(&AgentMessage) -> bool) -> AgentMessage {
            loop {
                match self.next().await {
                    Some(message) if matches(&message) => return message,
                    Some(_) => continue,
                    None => panic!("the connection ended before {what}"),
                }
            }
        }
    }

    pub(crate) fn hello() -> HelloParams {
        HelloParams {
            device_id: DeviceId::new(),
            public_key: "k".repeat(43) + "=",
            capabilities: vec!["process".to_owned()],
            agent_version: "0.1.0".to_owned(),
            cloud_host: None,
        }
    }

    /// Jitter that always waits the whole ceiling, so delays are predictable.
    struct WholeCeiling;

    impl Jitter for WholeCeiling {
        fn pick(&mut self, ceiling: Duration) -> Duration {
            ceiling
        }
    }

    /// What the fake connector does on each attempt.
    enum Attempt {
        Fail,
        /// Accept, welcome, keep the session for this long, then close.
        Serve(Duration),
        /// Accept, welcome, then close as a server does when another session of the same
        /// device replaced this one.
        Replaced,
    }

    struct ScriptedConnector {
        script: Mutex<VecDeque<Attempt>>,
        attempts: Mutex<Vec<Instant>>,
        /// Set when the script is used up.
        done: watch::Sender<bool>,
    }

    #[async_trait::async_trait]
    impl Connect for ScriptedConnector {
        async fn connect(&self) -> Result<Connection, ConnectError> {
            self.attempts.lock().expect("not poisoned").push(Instant::now());
            let next = self.script.lock().expect("not poisoned").pop_front();
            let (hold, close_frame) = match next {
                None => {
                    let _ = self.done.send(true);
                    return Err(ConnectError::Transport { url: "test".into(), message: "script over".into() });
                }
                Some(Attempt::Fail) => {
                    return Err(ConnectError::Transport { url: "test".into(), message: "refused".into() });
                }
                Some(Attempt::Serve(hold)) => (hold, None),
                Some(Attempt::Replaced) => (Duration::ZERO, Some((close::REPLACED, "replaced".to_owned()))),
            };
            let (server, tx, rx) = FakeServer::pair(64);
            tokio::spawn(serve_then_close(server, hold, close_frame));
            let tx = tx.sink_map_err(|error| transport::TransportError(error.to_string()));
            let rx = rx.map(|frame| frame.map_err(transport::TransportError));
            Ok(Connection { tx: Box::pin(tx), rx: Box::pin(rx) })
        }

        fn target(&self) -> String {
            "test".to_owned()
        }
    }

    /// Reads hello, welcomes, waits `hold`, then closes (with a close frame, if given).
    async fn serve_then_close(mut server: FakeServer, hold: Duration, close_frame: Option<(u16, String)>) {
        assert!(matches!(server.next().await, Some(AgentMessage::Hello { .. })));
        server.welcome(Some(3600)).await;
        tokio::time::sleep(hold).await;
        if let Some(frame) = close_frame {
            let _ = server.to_agent.send(Ok(Frame::Close(Some(frame)))).await;
        }
        // Dropping the server's ends closes the connection.
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_back_off_exponentially_and_reset_after_a_healthy_session() {
        let config = ControlConfig::default();
        let script = [
            Attempt::Fail,
            Attempt::Fail,
            Attempt::Fail,
            // Up for a short while: not healthy long enough, the backoff goes on growing.
            Attempt::Serve(Duration::from_secs(5)),
            Attempt::Fail,
            // Up for longer than `reset_after`: the backoff starts over.
            Attempt::Serve(Duration::from_secs(120)),
            Attempt::Fail,
        ];
        let (done, mut finished) = watch::channel(false);
        let connector =
            ScriptedConnector { script: Mutex::new(script.into_iter().collect()), attempts: Mutex::default(), done };
        let local = FakeLocal::new(true);
        let stats = ControlStats::default();
        let (_stop, shutdown) = watch::channel(false);
        let (params, mut jitter) = (hello(), WholeCeiling);
        let (session_link, _data_path) = link();
        tokio::select! {
            () = run(&config, &params, &connector, &local, &session_link, &stats, &mut jitter, shutdown) => {}
            _ = finished.wait_for(|done| *done) => {}
        }
        let attempts = connector.attempts.lock().expect("not poisoned").clone();
        let gaps: Vec<u64> = attempts.windows(2).map(|pair| (pair[1] - pair[0]).as_secs()).collect();
        // 1, 2, 4 after failures; 8 after the short session (plus its 5 s); 16 after a failure;
        // after the long session (120 s) the first delay again, 1, then 2.
        assert_eq!(gaps, [1, 2, 4, 5 + 8, 16, 120 + 1, 2]);
        assert_eq!(ControlStats::get(&stats.sessions), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_session_backs_off_to_the_longest_delay() {
        let config = ControlConfig::default();
        let (done, mut finished) = watch::channel(false);
        let script = [Attempt::Replaced, Attempt::Fail];
        let connector =
            ScriptedConnector { script: Mutex::new(script.into_iter().collect()), attempts: Mutex::default(), done };
        let local = FakeLocal::new(true);
        let (_stop, shutdown) = watch::channel(false);
        let (params, stats, mut jitter) = (hello(), ControlStats::default(), WholeCeiling);
        let (session_link, _data_path) = link();
        tokio::select! {
            () = run(&config, &params, &connector, &local, &session_link, &stats, &mut jitter, shutdown) => {}
            _ = finished.wait_for(|done| *done) => {}
        }
        let attempts = connector.attempts.lock().expect("not poisoned").clone();
        let gaps: Vec<u64> = attempts.windows(2).map(|pair| (pair[1] - pair[0]).as_secs()).collect();
        assert_eq!(gaps, [60, 60], "after being replaced, and after the failure that follows");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_request_drops_the_session_and_connects_again_at_once() {
        let config = ControlConfig::default();
        let (done, mut finished) = watch::channel(false);
        let script = [Attempt::Serve(Duration::from_secs(3600)), Attempt::Fail];
        let connector =
            ScriptedConnector { script: Mutex::new(script.into_iter().collect()), attempts: Mutex::default(), done };
        let local = FakeLocal::new(true);
        let (_stop, shutdown) = watch::channel(false);
        let (params, stats, mut jitter) = (hello(), ControlStats::default(), WholeCeiling);
        let (session_link, data_path) = link();
        let moved = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            data_path.reconnect.send_modify(|count| *count += 1);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = run(&config, &params, &connector, &local, &session_link, &stats, &mut jitter, shutdown) => {}
            () = moved => {}
            _ = finished.wait_for(|done| *done) => {}
        }
        let attempts = connector.attempts.lock().expect("not poisoned").clone();
        let gaps: Vec<u64> = attempts.windows(2).map(|pair| (pair[1] - pair[0]).as_secs()).collect();
        // The session of an hour ends after 10 s, the next attempt follows at once; after its
        // failure, the first backoff delay.
        assert_eq!(gaps, [10, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_loop_while_it_waits() {
        let config = ControlConfig::default();
        let (done, _finished) = watch::channel(false);
        let script = [Attempt::Fail, Attempt::Fail, Attempt::Fail, Attempt::Fail];
        let connector =
            ScriptedConnector { script: Mutex::new(script.into_iter().collect()), attempts: Mutex::default(), done };
        let local = FakeLocal::new(true);
        let (stop, shutdown) = watch::channel(false);
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            stop.send(true).expect("the loop listens");
        };
        let (params, stats, mut jitter) = (hello(), ControlStats::default(), WholeCeiling);
        let (session_link, _data_path) = link();
        let start = Instant::now();
        tokio::join!(run(&config, &params, &connector, &local, &session_link, &stats, &mut jitter, shutdown), stopper);
        assert_eq!(start.elapsed(), Duration::from_millis(1500), "the loop ended during its 2 s wait");
        assert_eq!(connector.attempts.lock().expect("not poisoned").len(), 2);
    }
}
