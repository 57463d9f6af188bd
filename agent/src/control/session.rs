//! One push session: `hello`, `welcome`, then desired state in and reports out until the
//! connection ends.
//!
//! The session is generic over a sink and a stream of [`Frame`]s, so tests drive it through
//! channels. After `welcome` it runs three parts concurrently in the caller's task:
//!
//! - The reader takes every frame the server sends, decodes it with the bounded
//!   `protocol::decode`, queues `application_update`s and `pong`s, and hands `edges`,
//!   `certificate`s and `access` to the data path through the [`SessionLink`] without waiting for it. A
//!   frame it cannot read is logged, counted and answered with an `error` frame, and the
//!   session goes on; an `error` from the server is logged and never answered, so errors
//!   cannot bounce between the two. Silence longer than a few of the server's ping intervals
//!   means the server is gone. The `welcome` (the pool's tunnel network) goes to the data path
//!   too.
//! - The applier hands the queued updates to the reconciler in order (it persists them and
//!   ignores stale ones). It is apart from the reader because the reconciler may be busy for a
//!   while, stopping a workload within its grace period, and pings must be answered meanwhile.
//! - The writer owns the sink. It sends queued pongs and errors first, then `ack`s and
//!   `status` when the reconciler's report changes, and every `flush_interval` the lifecycle
//!   events and log lines the reconciler and drivers buffered, and the `certificate_request`s
//!   the data path queued, and the results and progress of migration steps
//!   ([`crate::migration`], which runs each step the reader hands it in a task of its own).
//!   It pulls from those bounded rings only when the previous frame was written, so a slow
//!   server never blocks the reconciler or grows the agent: the rings drop their oldest
//!   entries and count them, and the count goes out with the next `logs` frame (and as an
//!   event, for events).

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use edgible::model::{ApplicationId, DeviceId, Revision};
use edgible::protocol::v1::{AgentMessage, ApplicationStatus, ErrorCode, LogLine, ServerMessage};
use edgible::protocol::{MAX_FRAME_BYTES, decode, encode};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior, timeout};

use super::link::{AccessUpdate, CertificateRequest, IssuedCertificate, SessionLink};
use super::transport::Frame;
use super::{ControlConfig, Local};
use crate::reconcile::{DesiredUpdate, ReconcileError, UpdateOutcome};

/// The longest message of an `error` frame the agent sends, in bytes: what the server sent
/// (an unknown type's name, say) is not echoed back whole.
const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// What the agent says about itself in `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloParams {
    pub device_id: DeviceId,
    /// The device's WireGuard public key, base64.
    pub public_key: String,
    /// The workload kinds this agent runs (`process`, `container`).
    pub capabilities: Vec<String>,
    pub agent_version: String,
    /// What this agent offers as a cloud host (`--cloud-host`), declared in its hello.
    pub cloud_host: Option<edgible::model::HostCapacity>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The server answered `hello` with an error (a version it does not speak, a credential of
    /// another device): its message.
    Refused(String),
    /// The server closed the connection (with a code and reason, if it gave them), or the
    /// connection broke.
    Closed { code: Option<u16>, reason: String },
    /// Nothing came from the server for this long.
    Silent(Duration),
    /// Writing to the server failed or took too long.
    SendFailed(String),
    /// The reconciler stopped, or could not persist desired state (then a new session's
    /// snapshot brings it again).
    Local(String),
}

impl Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Shutdown => f.write_str("the agent is shutting down"),
            SessionEnd::Refused(message) => write!(f, "the server refused the session: {message}"),
            SessionEnd::Closed { code: Some(code), reason } if !reason.is_empty() => {
                write!(f, "the server closed the connection ({code}: {reason})")
            }
            SessionEnd::Closed { code: Some(code), .. } => write!(f, "the server closed the connection ({code})"),
            SessionEnd::Closed { code: None, reason } => write!(f, "the connection ended: {reason}"),
            SessionEnd::Silent(silence) => {
                write!(f, "nothing heard from the server for {}s; it is presumed gone", silence.as_secs())
            }
            SessionEnd::SendFailed(message) => write!(f, "cannot write to the server: {message}"),
            SessionEnd::Local(message) => f.write_str(message),
        }
    }
}

/// How a session went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOutcome {
    pub end: SessionEnd,
    /// When the server's `welcome` arrived, if it did.
    pub welcomed_at: Option<Instant>,
}

/// Counters of the push channel across sessions, for logs and tests.
#[derive(Debug, Default)]
pub struct ControlStats {
    pub sessions: AtomicU64,
    pub frames_received: AtomicU64,
    /// Frames from the server that could not be read (malformed, unknown, too large).
    pub frames_rejected: AtomicU64,
    /// `error` frames about rejected frames not queued because the writer was that far behind.
    pub errors_dropped: AtomicU64,
    pub updates_taken: AtomicU64,
    pub updates_stale: AtomicU64,
    pub acks_sent: AtomicU64,
    /// Log lines handed to the connection.
    pub log_lines_sent: AtomicU64,
    pub events_sent: AtomicU64,
    /// Pongs not queued because the writer was that far behind.
    pub pongs_dropped: AtomicU64,
    /// Dropped events already reported to the server.
    event_drops_reported: AtomicU64,
}

impl ControlStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Usage records per `usage` frame, and frames per flush.
const USAGE_RECORDS_PER_FRAME: usize = 100;
const USAGE_BATCHES_PER_FLUSH: usize = 10;

/// Runs one session over an open connection until it ends or `shutdown` becomes true.
#[allow(clippy::too_many_arguments)]
pub async fn run<Tx, Rx, E, L>(
    config: &ControlConfig,
    hello: &HelloParams,
    local: &L,
    link: &SessionLink,
    stats: &ControlStats,
    mut tx: Tx,
    mut rx: Rx,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionOutcome
where
    Tx: Sink<Frame> + Unpin,
    Tx::Error: Display,
    Rx: Stream<Item = Result<Frame, E>> + Unpin,
    E: Display,
    L: Local + ?Sized,
{
    ControlStats::bump(&stats.sessions);
    let mut session = Session { config, local, link, stats, offered: None };
    let mut welcomed_at = None;
    let end = tokio::select! {
        end = session.serve(hello, &mut tx, &mut rx, &mut welcomed_at) => end,
        () = super::stopped(shutdown) => SessionEnd::Shutdown,
    };
    if end == SessionEnd::Shutdown {
        // Best effort: the server notices a vanished agent anyway, only later.
        let close = Frame::Close(Some((1000, "the agent is shutting down".to_owned())));
        let _ = timeout(config.send_timeout, tx.send(close)).await;
    }
    SessionOutcome { end, welcomed_at }
}

struct Session<'a, L: ?Sized> {
    config: &'a ControlConfig,
    local: &'a L,
    link: &'a SessionLink,
    stats: &'a ControlStats,
    /// The newest revision the server sent in this session: acks never go beyond it.
    offered: Option<Revision>,
}

/// What the reader hands the writer.
enum Outgoing {
    Pong(u64),
    /// The `error` frame answering a frame that could not be read.
    Error(AgentMessage),
    /// The server sent desired state up to this revision.
    Offered(Revision),
}

impl<L: Local + ?Sized> Session<'_, L> {
    async fn serve<Tx, Rx, E>(
        &mut self,
        hello: &HelloParams,
        tx: &mut Tx,
        rx: &mut Rx,
        welcomed_at: &mut Option<Instant>,
    ) -> SessionEnd
    where
        Tx: Sink<Frame> + Unpin,
        Tx::Error: Display,
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        let applied_revision = self.local.report().borrow().applied_revision;
        let message = AgentMessage::Hello {
            device_id: hello.device_id,
            public_key: hello.public_key.clone(),
            applied_revision,
            capabilities: hello.capabilities.clone(),
            agent_version: hello.agent_version.clone(),
            cloud_host: hello.cloud_host,
        };
        if let Err(end) = send(self.config, tx, &message).await {
            return end;
        }
        let ping_interval = match self.welcome(tx, rx).await {
            Ok(interval) => interval,
            Err(end) => return end,
        };
        *welcomed_at = Some(Instant::now());
        let silence = ping_interval.saturating_mul(self.config.missed_pings.max(1));
        tracing::info!(ping_interval_seconds = ping_interval.as_secs(), "connected to the server");
        let offered = self.offered;
        let mut requests = self.link.requests().await;
        let mut writer = Writer::new(self.config, self.local, self.stats, offered);
        let (outgoing, queued) = mpsc::channel(self.config.outgoing_capacity.max(1));
        let (updates, pending) = mpsc::channel(self.config.update_queue.max(1));
        tokio::select! {
            // The reader first: when the server closes with a reason, a write failing at the
            // same moment must not hide that reason.
            biased;
            end = self.read(rx, silence, &outgoing, &updates) => end,
            end = writer.run(tx, queued, &mut requests) => end,
            end = apply(self.local, self.stats, pending, &outgoing) => end,
        }
    }

    /// Waits for `welcome`, handling whatever comes before it; answers the server's ping
    /// interval.
    async fn welcome<Tx, Rx, E>(&mut self, tx: &mut Tx, rx: &mut Rx) -> Result<Duration, SessionEnd>
    where
        Tx: Sink<Frame> + Unpin,
        Tx::Error: Display,
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        let deadline = Instant::now() + self.config.welcome_timeout;
        loop {
            let frame = match timeout(deadline.saturating_duration_since(Instant::now()), rx.next()).await {
                Err(_) => return Err(SessionEnd::Silent(self.config.welcome_timeout)),
                Ok(frame) => frame,
            };
            let message = match self.frame(frame)? {
                Received::Message(message) => message,
                Received::Skip => continue,
                Received::Rejected(answer) => {
                    // Before welcome, the writer is not running yet: answer directly.
                    send(self.config, tx, &answer).await?;
                    continue;
                }
            };
            match message {
                ServerMessage::Welcome {
                    device_id,
                    tunnel_address,
                    server_version,
                    ping_interval_seconds,
                    tunnel_cidr,
                } => {
                    tracing::debug!(%device_id, %tunnel_address, ?tunnel_cidr, %server_version, "welcomed");
                    self.link.welcomed(tunnel_address, tunnel_cidr);
                    let interval = ping_interval_seconds
                        .filter(|seconds| *seconds > 0)
                        .map_or(self.config.default_ping_interval, Duration::from_secs);
                    return Ok(interval);
                }
                ServerMessage::Error { code, message } => {
                    return Err(SessionEnd::Refused(match code {
                        ErrorCode::Other => message,
                        code => format!("{message} ({})", code.as_str()),
                    }));
                }
                // The server sends neither before its welcome.
                ServerMessage::UsageAck { .. } | ServerMessage::MigrationStep { .. } => {}
                ServerMessage::Ping { nonce } => {
                    // Before welcome, the writer is not running yet: answer directly.
                    send(self.config, tx, &AgentMessage::Pong { nonce }).await?;
                }
                message @ (ServerMessage::Edges { .. }
                | ServerMessage::Certificate { .. }
                | ServerMessage::Access { .. }) => {
                    self.data_path(message);
                }
                update @ ServerMessage::ApplicationUpdate { .. } => {
                    let Some(update) = DesiredUpdate::from_message(update) else { continue };
                    let revision = take(self.local, self.stats, update).await?;
                    // The writer is not running yet; it starts from `self.offered`.
                    self.offered = self.offered.max(Some(revision));
                }
            }
        }
    }

    /// Reads frames until the connection ends or the server falls silent.
    async fn read<Rx, E>(
        &self,
        rx: &mut Rx,
        silence: Duration,
        outgoing: &mpsc::Sender<Outgoing>,
        updates: &mpsc::Sender<DesiredUpdate>,
    ) -> SessionEnd
    where
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        loop {
            let frame = match timeout(silence, rx.next()).await {
                Err(_) => return SessionEnd::Silent(silence),
                Ok(frame) => frame,
            };
            let message = match self.frame(frame) {
                Ok(Received::Message(message)) => message,
                Ok(Received::Skip) => continue,
                Ok(Received::Rejected(answer)) => {
                    // Dropped rather than waited for, like pongs: a server sending garbage
                    // faster than the writer sends answers must not hold the reader up.
                    if outgoing.try_send(Outgoing::Error(answer)).is_err() {
                        ControlStats::bump(&self.stats.errors_dropped);
                        tracing::debug!("the writer is behind; not answering a rejected frame");
                    }
                    continue;
                }
                Err(end) => return end,
            };
            let result = match message {
                ServerMessage::Ping { nonce } => {
                    if outgoing.try_send(Outgoing::Pong(nonce)).is_err() {
                        ControlStats::bump(&self.stats.pongs_dropped);
                        tracing::debug!(nonce, "the writer is behind; not answering a ping");
                    }
                    Ok(())
                }
                update @ ServerMessage::ApplicationUpdate { .. } => {
                    // Queued rather than taken here: the reconciler may be busy for a while
                    // (stopping a workload takes its grace period), and pings must still be
                    // answered meanwhile. Waits only when the queue is full.
                    match DesiredUpdate::from_message(update) {
                        Some(update) => updates
                            .send(update)
                            .await
                            .map_err(|_| SessionEnd::Local("the update queue is closed".to_owned())),
                        None => Ok(()),
                    }
                }
                message @ (ServerMessage::Edges { .. }
                | ServerMessage::Certificate { .. }
                | ServerMessage::Access { .. }) => {
                    self.data_path(message);
                    Ok(())
                }
                ServerMessage::Welcome { .. } => {
                    tracing::warn!("the server sent a second welcome; ignored");
                    Ok(())
                }
                ServerMessage::MigrationStep { migration_id, step_id, deadline, step } => {
                    match self.local.migrations() {
                        // Runs in a task of its own (or is answered again): never waited for here.
                        Some(migrations) => migrations.submit(migration_id, step_id, deadline, step),
                        None => tracing::warn!(%migration_id, step_id, "this agent does not execute migration steps"),
                    }
                    Ok(())
                }
                ServerMessage::UsageAck { seq } => {
                    tracing::debug!(seq, "usage stored up to");
                    if let Some(ledger) = self.local.usage()
                        && let Err(error) = ledger.ack(seq)
                    {
                        // Kept records are sent again and deduplicated by the server.
                        tracing::warn!(%error, seq, "cannot drop acknowledged usage records");
                    }
                    Ok(())
                }
                ServerMessage::Error { code, message } => {
                    // Errors that end the session come with a close frame, which ends it here.
                    // Never answered with an error of our own, so errors cannot bounce.
                    tracing::warn!(code = code.as_str(), %message, "the server reported an error");
                    Ok(())
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Hands what the server says about the data path to it, without waiting.
    fn data_path(&self, message: ServerMessage) {
        match message {
            ServerMessage::Edges { edges } => {
                tracing::debug!(edges = edges.len(), "the pool's edges");
                self.link.edges(edges);
            }
            ServerMessage::Certificate { application_id, chain_pem, hostnames, not_after } => {
                tracing::debug!(%application_id, %not_after, "a certificate");
                self.link.certificate(IssuedCertificate { application_id, chain_pem, hostnames, not_after });
            }
            ServerMessage::Access { login_url, assertion_keys, session_ttl_seconds, applications } => {
                tracing::debug!(
                    keys = assertion_keys.len(),
                    applications = applications.len(),
                    "the access configuration"
                );
                self.link.access(AccessUpdate { login_url, assertion_keys, session_ttl_seconds, applications });
            }
            _ => {}
        }
    }

    /// Turns one frame into a message, a frame to skip, or the `error` frame answering a frame
    /// that cannot be read (logged and counted here); `Err` when the session ends.
    fn frame<E: Display>(&self, frame: Option<Result<Frame, E>>) -> Result<Received, SessionEnd> {
        let text = match frame {
            None => return Err(SessionEnd::Closed { code: None, reason: "the server closed the stream".to_owned() }),
            Some(Err(error)) => return Err(SessionEnd::Closed { code: None, reason: error.to_string() }),
            Some(Ok(Frame::Close(close))) => {
                let (code, reason) = close.map_or((None, String::new()), |(code, reason)| (Some(code), reason));
                return Err(SessionEnd::Closed { code, reason });
            }
            Some(Ok(Frame::Control)) => return Ok(Received::Skip),
            Some(Ok(Frame::Binary(bytes))) => {
                ControlStats::bump(&self.stats.frames_rejected);
                tracing::warn!(bytes = bytes.len(), "ignored a binary frame: the protocol is text");
                let message = "binary frames are not part of the protocol".to_owned();
                return Ok(Received::Rejected(AgentMessage::Error { code: ErrorCode::Malformed, message }));
            }
            Some(Ok(Frame::Text(text))) => text,
        };
        ControlStats::bump(&self.stats.frames_received);
        match decode::<ServerMessage>(&text) {
            Ok(message) => Ok(Received::Message(message)),
            Err(error) => {
                ControlStats::bump(&self.stats.frames_rejected);
                tracing::warn!(reason = error.reason(), %error, "ignored a frame from the server");
                let message = bounded(error.to_string(), MAX_ERROR_MESSAGE_BYTES);
                Ok(Received::Rejected(AgentMessage::Error { code: error.code(), message }))
            }
        }
    }
}

/// What one frame from the server turned out to be.
enum Received {
    Message(ServerMessage),
    /// A frame with nothing to act on (a WebSocket control frame).
    Skip,
    /// A frame that could not be read, already logged and counted, and the `error` frame that
    /// answers it.
    Rejected(AgentMessage),
}

/// Hands queued desired state to the reconciler in order, telling the writer what was offered.
async fn apply<L: Local + ?Sized>(
    local: &L,
    stats: &ControlStats,
    mut pending: mpsc::Receiver<DesiredUpdate>,
    outgoing: &mpsc::Sender<Outgoing>,
) -> SessionEnd {
    while let Some(update) = pending.recv().await {
        let revision = match take(local, stats, update).await {
            Ok(revision) => revision,
            Err(end) => return end,
        };
        // The writer acknowledges only what was offered; it learns that in order with the pongs.
        if outgoing.send(Outgoing::Offered(revision)).await.is_err() {
            break;
        }
    }
    SessionEnd::Closed { code: None, reason: "the reader ended".to_owned() }
}

/// Hands one update to the reconciler (which persists it, or ignores it as stale); answers
/// the revision the server offered.
async fn take<L: Local + ?Sized>(
    local: &L,
    stats: &ControlStats,
    update: DesiredUpdate,
) -> Result<Revision, SessionEnd> {
    let revision = update.revision;
    match local.update(update).await {
        Ok(UpdateOutcome::Taken { revision }) => {
            ControlStats::bump(&stats.updates_taken);
            tracing::debug!(revision, "took desired state");
        }
        Ok(UpdateOutcome::Stale { current, offered }) => {
            ControlStats::bump(&stats.updates_stale);
            tracing::info!(current, offered, "ignored desired state older than what this agent holds");
        }
        Err(ReconcileError::Stopped) => return Err(SessionEnd::Local("the reconciler has stopped".to_owned())),
        Err(error) => {
            // Not taken, so not acknowledged; a new session's snapshot brings it again.
            tracing::error!(%error, revision, "cannot take desired state");
            return Err(SessionEnd::Local(format!("cannot take desired state at revision {revision}: {error}")));
        }
    }
    Ok(revision)
}

/// The sending half: acks, status, events and logs, pulled from their sources when there is
/// room to send.
struct Writer<'a, L: ?Sized> {
    config: &'a ControlConfig,
    local: &'a L,
    stats: &'a ControlStats,
    offered: Option<Revision>,
    acked: Option<Revision>,
    /// The statuses last sent.
    status: Option<Vec<ApplicationStatus>>,
    /// The newest usage record sent in this session: a new session sends every pending one.
    usage_sent: Option<u64>,
}

impl<'a, L: Local + ?Sized> Writer<'a, L> {
    fn new(config: &'a ControlConfig, local: &'a L, stats: &'a ControlStats, offered: Option<Revision>) -> Self {
        Self { config, local, stats, offered, acked: None, status: None, usage_sent: None }
    }

    async fn run<Tx>(
        &mut self,
        tx: &mut Tx,
        mut queued: mpsc::Receiver<Outgoing>,
        requests: &mut mpsc::Receiver<CertificateRequest>,
    ) -> SessionEnd
    where
        Tx: Sink<Frame> + Unpin,
        Tx::Error: Display,
    {
        let mut report = self.local.report();
        let migrations = self.local.migrations();
        let mut flush = tokio::time::interval(self.config.flush_interval);
        flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
        report.mark_changed();
        // Closed once the data path is gone (in tests without one): then never polled again.
        let mut requests_open = true;
        let result: Result<(), SessionEnd> = async {
            loop {
                tokio::select! {
                    biased;
                    item = queued.recv() => match item {
                        Some(Outgoing::Pong(nonce)) => send(self.config, tx, &AgentMessage::Pong { nonce }).await?,
                        Some(Outgoing::Error(message)) => send(self.config, tx, &message).await?,
                        Some(Outgoing::Offered(revision)) => {
                            self.offered = self.offered.max(Some(revision));
                            self.sync(tx, &mut report).await?;
                        }
                        // The reader ended; the session is over.
                        None => return Ok(()),
                    },
                    changed = report.changed() => {
                        if changed.is_err() {
                            return Err(SessionEnd::Local("the reconciler has stopped".to_owned()));
                        }
                        self.sync(tx, &mut report).await?;
                    }
                    request = requests.recv(), if requests_open => match request {
                        Some(CertificateRequest { application_id, csr_pem }) => {
                            tracing::info!(%application_id, "requesting a certificate");
                            send(self.config, tx, &AgentMessage::CertificateRequest { application_id, csr_pem }).await?;
                        }
                        None => requests_open = false,
                    },
                    () = migration_outgoing(migrations.as_deref()) => {
                        if let Some(migrations) = &migrations {
                            for message in migrations.take_outgoing() {
                                send(self.config, tx, &message).await?;
                            }
                        }
                    }
                    _ = flush.tick() => self.flush(tx, &report).await?,
                }
            }
        }
        .await;
        match result {
            Ok(()) => SessionEnd::Closed { code: None, reason: "the reader ended".to_owned() },
            Err(end) => end,
        }
    }

    /// Sends an ack when a newer revision was applied, and the statuses when they changed.
    async fn sync<Tx>(
        &mut self,
        tx: &mut Tx,
        report: &mut watch::Receiver<crate::reconcile::AgentReport>,
    ) -> Result<(), SessionEnd>
    where
        Tx: Sink<Frame> + Unpin,
        Tx::Error: Display,
    {
        let (applied, applications) = {
            let report = report.borrow_and_update();
            (report.applied_revision, report.applications.clone())
        };
        if let Some(revision) = ack_due(applied, self.acked, self.offered) {
            send(self.config, tx, &AgentMessage::Ack { revision }).await?;
            ControlStats::bump(&self.stats.acks_sent);
            self.acked = Some(revision);
        }
        if self.status.as_ref() != Some(&applications) {
            send(self.config, tx, &AgentMessage::Status { applications: applications.clone() }).await?;
            self.status = Some(applications);
        }
        Ok(())
    }

    /// Sends the buffered events and log lines, one frame at a time, so that at most one
    /// frame's worth is lost if the connection breaks mid-way.
    async fn flush<Tx>(
        &mut self,
        tx: &mut Tx,
        report: &watch::Receiver<crate::reconcile::AgentReport>,
    ) -> Result<(), SessionEnd>
    where
        Tx: Sink<Frame> + Unpin,
        Tx::Error: Display,
    {
        if let Some(ledger) = self.local.usage() {
            // Bounded per flush; the next flush goes on where this one stopped.
            for _ in 0..USAGE_BATCHES_PER_FLUSH {
                let records = ledger.pending_after(self.usage_sent, USAGE_RECORDS_PER_FRAME);
                let Some(last) = records.last().map(|record| record.seq) else { break };
                send(self.config, tx, &AgentMessage::Usage { records }).await?;
                self.usage_sent = Some(last);
            }
        }
        let events = self.local.events();
        while let Some(event) = events.take(1).pop() {
            let message =
                AgentMessage::Event { application_id: event.application_id, at: event.at, message: event.message };
            send(self.config, tx, &message).await?;
            ControlStats::bump(&self.stats.events_sent);
        }
        let dropped = events.dropped();
        let reported = ControlStats::get(&self.stats.event_drops_reported);
        if dropped > reported {
            let message = format!(
                "the agent dropped {} lifecycle events while the server was slow or unreachable",
                dropped - reported
            );
            send(self.config, tx, &AgentMessage::Event { application_id: None, at: Utc::now(), message }).await?;
            self.stats.event_drops_reported.store(dropped, Ordering::Relaxed);
        }
        let applications: Vec<ApplicationId> =
            report.borrow().applications.iter().map(|status| status.application_id).collect();
        for application_id in applications {
            let Some(buffer) = self.local.logs(application_id) else { continue };
            loop {
                let batch = buffer.take(self.config.max_log_lines_per_frame.max(1));
                if batch.lines.is_empty() && batch.dropped == 0 {
                    break;
                }
                let full = batch.lines.len() >= self.config.max_log_lines_per_frame.max(1);
                self.stats.log_lines_sent.fetch_add(batch.lines.len() as u64, Ordering::Relaxed);
                for frame in log_frames(application_id, batch.lines, batch.dropped) {
                    send_frame(self.config, tx, frame).await?;
                }
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Resolves when migration results or progress wait to be sent; never without an executor.
async fn migration_outgoing(migrations: Option<&crate::migration::Migrations>) {
    match migrations {
        Some(migrations) => migrations.outgoing().await,
        None => std::future::pending().await,
    }
}

/// The revision to acknowledge, if any: the applied one, once it is newer than the last ack
/// and not newer than what this session's server offered (a server never hears of revisions
/// it did not send).
pub fn ack_due(applied: Option<Revision>, acked: Option<Revision>, offered: Option<Revision>) -> Option<Revision> {
    let applied = applied?;
    let offered = offered?;
    (applied <= offered && Some(applied) > acked).then_some(applied)
}

/// `logs` frames for a batch of lines, split so that none exceeds the protocol's frame limit
/// (escaping can make a line several times longer in JSON). A single line too large on its
/// own is cut.
pub fn log_frames(application_id: ApplicationId, lines: Vec<LogLine>, dropped: u64) -> Vec<String> {
    let mut frames = Vec::new();
    let mut pending = vec![(lines, dropped)];
    while let Some((lines, dropped)) = pending.pop() {
        let message = AgentMessage::Logs { application_id, lines, dropped };
        let frame = encode(&message);
        if frame.len() <= MAX_FRAME_BYTES {
            frames.push(frame);
            continue;
        }
        let AgentMessage::Logs { mut lines, .. } = message else { continue };
        if lines.len() <= 1 {
            if let Some(line) = lines.first_mut() {
                // Even if every byte needs a six-byte escape, this fits.
                let mut cut = (MAX_FRAME_BYTES / 8).min(line.line.len());
                while !line.line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.line.truncate(cut);
            }
            pending.push((lines, dropped));
            continue;
        }
        let second = lines.split_off(lines.len() / 2);
        // Popped last in, first out: the first half goes out first, with the drop count.
        pending.push((second, 0));
        pending.push((lines, dropped));
    }
    frames
}

async fn send<Tx>(config: &ControlConfig, tx: &mut Tx, message: &AgentMessage) -> Result<(), SessionEnd>
where
    Tx: Sink<Frame> + Unpin,
    Tx::Error: Display,
{
    send_frame(config, tx, encode(message)).await
}

async fn send_frame<Tx>(config: &ControlConfig, tx: &mut Tx, frame: String) -> Result<(), SessionEnd>
where
    Tx: Sink<Frame> + Unpin,
    Tx::Error: Display,
{
    match timeout(config.send_timeout, tx.send(Frame::Text(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(SessionEnd::SendFailed(error.to_string())),
        Err(_) => Err(SessionEnd::SendFailed(format!(
            "a frame took longer than {}s to write",
            config.send_timeout.as_secs_f64()
        ))),
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgible::protocol::v1::{Phase, Stream as LogStream};

    use super::*;
    use crate::control::DataPathLink;
    use crate::control::tests::{FakeLocal, FakeServer, hello};
    use crate::logs::LogLimits;
    use crate::reconcile::plan::tests::application;

    type Outcome = tokio::task::JoinHandle<SessionOutcome>;

    /// Starts a session against a fake server whose unread frames are bounded by `capacity`,
    /// without a data path.
    fn start(
        config: ControlConfig,
        local: Arc<FakeLocal>,
        capacity: usize,
    ) -> (FakeServer, Arc<ControlStats>, watch::Sender<bool>, Outcome) {
        let (server, stats, stop, outcome, _data_path) = start_linked(config, local, capacity);
        (server, stats, stop, outcome)
    }

    /// Starts a session as [`start`] does, and answers the data path's end of its link too.
    fn start_linked(
        config: ControlConfig,
        local: Arc<FakeLocal>,
        capacity: usize,
    ) -> (FakeServer, Arc<ControlStats>, watch::Sender<bool>, Outcome, DataPathLink) {
        let (server, tx, rx) = FakeServer::pair(capacity);
        let stats = Arc::new(ControlStats::default());
        let (stop, mut shutdown) = watch::channel(false);
        let session_stats = Arc::clone(&stats);
        let (session_link, data_path) = crate::control::link();
        let outcome = tokio::spawn(async move {
            run(&config, &hello(), &*local, &session_link, &session_stats, tx, rx, &mut shutdown).await
        });
        (server, stats, stop, outcome, data_path)
    }

    fn update(revision: Revision, full: bool, names: &[&str]) -> ServerMessage {
        let applications = names.iter().map(|name| application(name, revision, "serve")).collect();
        ServerMessage::ApplicationUpdate { revision, full, applications, removed: Vec::new() }
    }

    async fn ack(server: &mut FakeServer) -> Revision {
        match server.until("an ack", |message| matches!(message, AgentMessage::Ack { .. })).await {
            AgentMessage::Ack { revision } => revision,
            _ => unreachable!("matched an ack"),
        }
    }

    fn usage_seqs(message: AgentMessage) -> Vec<u64> {
        match message {
            AgentMessage::Usage { records } => records.iter().map(|record| record.seq).collect(),
            _ => unreachable!("matched usage"),
        }
    }

    #[tokio::test]
    async fn usage_is_sent_acknowledged_and_resent_after_a_reconnect() {
        let temp = tempfile::tempdir().expect("temp dir");
        let state_dir = crate::state::StateDir::open(temp.path()).expect("state dir");
        let ledger = crate::usage::UsageLedger::open(state_dir, 100).expect("ledger");
        let usage = |requests| (ApplicationId::new(), crate::sleep::Usage { requests, ..Default::default() });
        let now = Utc::now();
        ledger.record([usage(1), usage(2)], now, now).expect("recorded");
        let local = Arc::new(FakeLocal::new(true));
        *local.usage.lock().expect("not poisoned") = Some(Arc::clone(&ledger));
        let is_usage = |message: &AgentMessage| matches!(message, AgentMessage::Usage { .. });

        let (mut server, _stats, stop, outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);
        server.welcome(Some(20)).await;
        assert_eq!(usage_seqs(server.until("usage", is_usage).await), [1, 2]);
        server.send(&ServerMessage::UsageAck { seq: 1 }).await;
        ledger.record([usage(3)], now, now).expect("recorded");
        assert_eq!(usage_seqs(server.until("new usage", is_usage).await), [3], "sent once per session");
        for _ in 0..300 {
            if ledger.pending_len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pending: Vec<u64> = ledger.pending_after(None, 10).iter().map(|record| record.seq).collect();
        assert_eq!(pending, [2, 3], "the ack dropped what it covers");
        let _ = stop.send(true);
        let _ = outcome.await;

        // A new session sends again what was not acknowledged, and nothing that was.
        let (mut server, _stats, _stop, _outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);
        server.welcome(Some(20)).await;
        assert_eq!(usage_seqs(server.until("usage again", is_usage).await), [2, 3]);
        server.send(&ServerMessage::UsageAck { seq: 3 }).await;
        for _ in 0..300 {
            if ledger.pending_len() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ledger.pending_len(), 0);
    }

    #[tokio::test]
    async fn hello_welcome_snapshot_and_acks_in_order() {
        let local = Arc::new(FakeLocal::new(true));
        local.apply(2);
        let (mut server, stats, _stop, _outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);

        let Some(AgentMessage::Hello { applied_revision, capabilities, .. }) = server.next().await else {
            panic!("the first frame must be hello");
        };
        assert_eq!(applied_revision, Some(2), "hello carries the revision applied before");
        assert_eq!(capabilities, ["process"]);
        server.welcome(Some(20)).await;
        server.send(&update(5, true, &["web", "api"])).await;
        assert_eq!(ack(&mut server).await, 5);
        assert_eq!(local.desired.lock().expect("not poisoned").applications.len(), 2);

        // A stale delta is ignored and never acknowledged; the next newer one is.
        server.send(&update(4, false, &["worker"])).await;
        server.send(&update(6, false, &["web"])).await;
        assert_eq!(ack(&mut server).await, 6);
        assert_eq!(ControlStats::get(&stats.updates_stale), 1);
        assert_eq!(ControlStats::get(&stats.updates_taken), 2);
        assert_eq!(local.desired.lock().expect("not poisoned").applications.len(), 2, "the stale delta added nothing");
    }

    #[tokio::test]
    async fn migration_steps_are_executed_once_and_their_results_sent_again_on_repeat() {
        let temp = tempfile::tempdir().expect("temp dir");
        let local = Arc::new(FakeLocal::new(true));
        let state_dir = crate::state::StateDir::open(temp.path()).expect("state dir");
        let holds = Arc::new(crate::migration::Holds::open(state_dir.clone()).expect("holds"));
        let web = application("web", 1, "serve");
        holds.hold(web.id).expect("held");
        let (_, desired) = watch::channel(Arc::new(crate::reconcile::DesiredState::default()));
        let migrations = crate::migration::Migrations::new(crate::migration::MigrationContext {
            volumes: crate::volumes::Volumes::new(temp.path().join("volumes"), true),
            state_dir,
            holds: Arc::clone(&holds),
            sleep: crate::sleep::SleepTable::new(crate::driver::Wake::new()),
            desired,
            report: local.report(),
            drivers: crate::reconcile::Drivers::new([]),
            blobs: None,
        })
        .expect("migrations");
        *local.migrations.lock().expect("not poisoned") = Some(migrations);
        let (mut server, _stats, _stop, _outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);
        server.next().await;
        server.welcome(Some(20)).await;
        let migration_id = edgible::model::MigrationId::new();
        let step = ServerMessage::MigrationStep {
            migration_id,
            step_id: 3,
            deadline: Utc::now() + chrono::Duration::seconds(30),
            step: edgible::protocol::v1::MigrationStep::Resume { application_id: web.id },
        };
        let is_result = |message: &AgentMessage| matches!(message, AgentMessage::MigrationStepResult { .. });
        server.send(&step).await;
        let done = AgentMessage::MigrationStepResult {
            migration_id,
            step_id: 3,
            outcome: edgible::protocol::v1::StepOutcome::Done { manifest: None },
        };
        assert_eq!(server.until("the step's result", is_result).await, done);
        assert!(!holds.is_held(web.id), "resumed");
        holds.hold(web.id).expect("held again");
        server.send(&step).await;
        assert_eq!(server.until("the repeated step's result", is_result).await, done);
        assert!(holds.is_held(web.id), "the repeat was answered from memory, not run again");
    }

    #[tokio::test]
    async fn pings_are_answered_while_the_reconciler_is_busy() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, _stats, _stop, _outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);
        server.next().await;
        server.welcome(Some(20)).await;
        local.busy.send_replace(true);
        server.send(&update(3, true, &["web"])).await;
        server.send(&ServerMessage::Ping { nonce: 5 }).await;
        let answer =
            server.until("a pong", |message| matches!(message, AgentMessage::Pong { .. } | AgentMessage::Ack { .. }));
        assert_eq!(answer.await, AgentMessage::Pong { nonce: 5 }, "answered before the update was taken");
        local.busy.send_replace(false);
        assert_eq!(ack(&mut server).await, 3);
    }

    #[tokio::test]
    async fn an_applied_revision_newer_than_the_offer_is_not_acknowledged() {
        // The agent applied 9 in an earlier session; this server only offers 7 (its data went
        // back in time). The agent keeps 9 and acknowledges nothing it was not sent.
        let local = Arc::new(FakeLocal::new(true));
        local.desired.lock().expect("not poisoned").revision = Some(9);
        local.apply(9);
        let (mut server, stats, _stop, _outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);
        server.next().await;
        server.welcome(None).await;
        server.send(&update(7, true, &["web"])).await;
        server.send(&ServerMessage::Ping { nonce: 1 }).await;
        let pong =
            server.until("a pong", |message| matches!(message, AgentMessage::Pong { .. } | AgentMessage::Ack { .. }));
        assert_eq!(pong.await, AgentMessage::Pong { nonce: 1 });
        assert_eq!(ControlStats::get(&stats.updates_stale), 1);
        assert_eq!(ControlStats::get(&stats.acks_sent), 0);
    }

    #[tokio::test]
    async fn pings_are_answered_and_hostile_frames_are_counted_without_ending_the_session() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, stats, _stop, outcome) = start(ControlConfig::default(), local, 64);
        server.next().await;
        server.welcome(Some(20)).await;
        let hostile = [
            "not json".to_owned(),
            "[1,2,3]".to_owned(),
            r#"{"v":1,"type":"launch_missiles"}"#.to_owned(),
            r#"{"v":2,"type":"ping","nonce":1}"#.to_owned(),
            r#"{"type":"ping","nonce":1}"#.to_owned(),
            r#"{"v":1,"type":"application_update","revision":-1,"full":true,"applications":[]}"#.to_owned(),
            format!(r#"{{"v":1,"type":"error","message":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES)),
            "[".repeat(100_000),
        ];
        let count = hostile.len() as u64;
        for text in hostile {
            server.send_text(text).await;
        }
        server.to_agent.send(Ok(Frame::Binary(vec![0, 1, 2]))).await.expect("the agent listens");
        server.send(&ServerMessage::Ping { nonce: 77 }).await;
        let pong = server.until("a pong", |message| matches!(message, AgentMessage::Pong { .. })).await;
        assert_eq!(pong, AgentMessage::Pong { nonce: 77 });
        assert_eq!(ControlStats::get(&stats.frames_rejected), count + 1);
        assert!(!outcome.is_finished());
    }

    #[tokio::test]
    async fn unreadable_frames_are_answered_with_an_error_and_server_errors_are_not() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, stats, _stop, outcome) = start(ControlConfig::default(), local, 64);
        server.next().await;
        // Before welcome too: the session answers directly.
        server.send_text("garbage".to_owned()).await;
        let is_error = |message: &AgentMessage| matches!(message, AgentMessage::Error { .. });
        let AgentMessage::Error { code, message } = server.until("an error", is_error).await else {
            unreachable!("matched an error")
        };
        assert_eq!(code, ErrorCode::Malformed);
        assert!(message.starts_with("malformed frame"), "{message}");
        server.welcome(Some(20)).await;

        // An unknown type's name is not echoed back whole.
        server.send_text(format!(r#"{{"v":1,"type":"{}"}}"#, "x".repeat(100_000))).await;
        let AgentMessage::Error { code, message } = server.until("an error", is_error).await else {
            unreachable!("matched an error")
        };
        assert_eq!(code, ErrorCode::UnknownType);
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES, "{}", message.len());

        // The server's own error is logged, never answered: the next frame is the pong.
        server.send(&ServerMessage::Error { code: ErrorCode::Unexpected, message: "no".into() }).await;
        server.send(&ServerMessage::Ping { nonce: 3 }).await;
        let next =
            server.until("a pong", |message| matches!(message, AgentMessage::Pong { .. } | AgentMessage::Error { .. }));
        assert_eq!(next.await, AgentMessage::Pong { nonce: 3 });
        assert_eq!(ControlStats::get(&stats.frames_rejected), 2);
        assert!(!outcome.is_finished());
    }

    #[tokio::test]
    async fn an_error_instead_of_welcome_ends_the_session_with_the_servers_message() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, _stats, _stop, outcome) = start(ControlConfig::default(), local, 64);
        server.next().await;
        let message = "protocol version 1 is not supported: this server speaks version 2".to_owned();
        server.send(&ServerMessage::Error { code: ErrorCode::UnsupportedVersion, message }).await;
        let outcome = outcome.await.expect("the session ends");
        assert_eq!(
            outcome.end,
            SessionEnd::Refused(
                "protocol version 1 is not supported: this server speaks version 2 (unsupported_version)".into()
            )
        );
        assert_eq!(outcome.welcomed_at, None);
    }

    #[tokio::test]
    async fn a_close_frame_ends_the_session_with_its_code() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, _stats, _stop, outcome) = start(ControlConfig::default(), local, 64);
        server.next().await;
        server.welcome(Some(20)).await;
        server.to_agent.send(Ok(Frame::Close(Some((4000, "replaced".into()))))).await.expect("the agent listens");
        let outcome = outcome.await.expect("the session ends");
        assert_eq!(outcome.end, SessionEnd::Closed { code: Some(4000), reason: "replaced".into() });
        assert!(outcome.welcomed_at.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_is_presumed_gone_after_a_few_ping_intervals() {
        let local = Arc::new(FakeLocal::new(true));
        let config = ControlConfig { missed_pings: 3, ..ControlConfig::default() };
        let (mut server, _stats, _stop, outcome) = start(config, local, 64);
        server.next().await;
        server.welcome(Some(2)).await;
        let start = Instant::now();
        let outcome = outcome.await.expect("the session ends");
        assert_eq!(outcome.end, SessionEnd::Silent(Duration::from_secs(6)));
        assert_eq!(start.elapsed(), Duration::from_secs(6));
        drop(server);
    }

    #[tokio::test(start_paused = true)]
    async fn no_welcome_in_time_ends_the_session() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, _stats, _stop, outcome) = start(ControlConfig::default(), local, 64);
        server.next().await;
        let outcome = outcome.await.expect("the session ends");
        assert_eq!(outcome.end, SessionEnd::Silent(ControlConfig::default().welcome_timeout));
    }

    #[tokio::test]
    async fn shutdown_closes_the_connection() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, _stats, stop, outcome) = start(ControlConfig::default(), local, 64);
        server.next().await;
        server.welcome(Some(20)).await;
        stop.send(true).expect("the session listens");
        assert_eq!(outcome.await.expect("the session ends").end, SessionEnd::Shutdown);
        loop {
            match server.from_agent.next().await {
                Some(Frame::Close(Some((code, _)))) => {
                    assert_eq!(code, 1000);
                    break;
                }
                Some(_) => continue,
                None => panic!("no close frame"),
            }
        }
    }

    #[tokio::test]
    async fn events_status_and_logs_reach_the_server() {
        let local = Arc::new(FakeLocal::new(true));
        let web = application("web", 1, "serve");
        let logs = local.log_buffer(web.id, LogLimits::default());
        logs.push(LogStream::Stdout, "listening on 8080".into());
        local.events.record(Some(web.id), "web started");
        let (mut server, _stats, _stop, _outcome) = start(ControlConfig::default(), Arc::clone(&local), 64);
        server.next().await;
        server.welcome(Some(20)).await;
        let status = server.until("a status", |message| matches!(message, AgentMessage::Status { .. })).await;
        let AgentMessage::Status { applications } = status else { unreachable!("matched") };
        assert_eq!(applications[0].phase, Phase::Running);
        let event = server.until("an event", |message| matches!(message, AgentMessage::Event { .. })).await;
        assert!(matches!(event, AgentMessage::Event { message, .. } if message == "web started"));
        let lines = server.until("logs", |message| matches!(message, AgentMessage::Logs { .. })).await;
        let AgentMessage::Logs { application_id, lines, dropped } = lines else { unreachable!("matched") };
        assert_eq!((application_id, lines[0].line.as_str(), dropped), (web.id, "listening on 8080", 0));

        // Output produced later follows within a flush interval.
        logs.push(LogStream::Stderr, "oops".into());
        let later = server.until("more logs", |message| matches!(message, AgentMessage::Logs { .. })).await;
        assert!(matches!(later, AgentMessage::Logs { lines, .. } if lines[0].line == "oops"));
    }

    #[tokio::test]
    async fn a_slow_server_neither_blocks_nor_grows_the_agent_and_hears_what_was_dropped() {
        let local = Arc::new(FakeLocal::new(true));
        let web = application("web", 1, "serve");
        let limits = LogLimits { max_lines: 50, ..LogLimits::default() };
        let logs = local.log_buffer(web.id, limits);
        let config = ControlConfig { send_timeout: Duration::from_secs(600), ..ControlConfig::default() };
        // At most one unread frame: the server reads nothing until the end of the test.
        let (mut server, stats, _stop, outcome) = start(config, Arc::clone(&local), 0);
        server.next().await;
        server.welcome(Some(20)).await;

        // The workload writes far more than the buffer holds while the server does not read.
        for index in 0..10_000 {
            logs.push(LogStream::Stdout, format!("line {index}"));
            if index % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert!(logs.snapshot().len() <= 50, "the buffer stays bounded");
        assert!(logs.dropped() >= 9_000);
        assert!(!outcome.is_finished(), "the session waits for the server rather than failing");

        // The server catches up: it gets at most what the buffer held plus the frames in
        // flight, and learns how many lines were lost.
        let mut received = Vec::new();
        let mut dropped = 0;
        while received.last().map(String::as_str) != Some("line 9999") {
            if let Some(AgentMessage::Logs { lines, dropped: lost, .. }) = server.next().await {
                dropped += lost;
                received.extend(lines.into_iter().map(|line| line.line));
            }
        }
        assert!(received.len() <= 50 + 2 * ControlConfig::default().max_log_lines_per_frame, "{}", received.len());
        assert_eq!(dropped + received.len() as u64, 10_000, "every line is either delivered or counted");
        assert!(ControlStats::get(&stats.log_lines_sent) >= received.len() as u64);
    }

    #[test]
    fn acks_never_go_back_nor_beyond_the_offer() {
        assert_eq!(ack_due(None, None, Some(3)), None, "nothing applied yet");
        assert_eq!(ack_due(Some(3), None, None), None, "nothing offered yet");
        assert_eq!(ack_due(Some(3), None, Some(3)), Some(3));
        assert_eq!(ack_due(Some(3), Some(3), Some(4)), None, "already acknowledged");
        assert_eq!(ack_due(Some(5), Some(3), Some(4)), None, "never offered by this server");
        assert_eq!(ack_due(Some(4), Some(3), Some(4)), Some(4));
    }

    #[test]
    fn oversized_log_batches_are_split_into_frames_that_fit() {
        let application_id = ApplicationId::new();
        let line = |text: String| LogLine { at: Utc::now(), stream: LogStream::Stdout, line: text };
        let lines: Vec<LogLine> = (0..10).map(|index| line(format!("{index}{}", "x".repeat(1024 * 1024)))).collect();
        let frames = log_frames(application_id, lines, 7);
        assert!(frames.len() >= 3);
        let mut total = 0;
        let mut dropped = 0;
        let mut first_characters = String::new();
        for frame in &frames {
            assert!(frame.len() <= MAX_FRAME_BYTES);
            let Ok(AgentMessage::Logs { lines, dropped: lost, .. }) = decode::<AgentMessage>(frame) else {
                panic!("a logs frame");
            };
            total += lines.len();
            dropped += lost;
            first_characters.extend(lines.iter().filter_map(|line| line.line.chars().next()));
        }
        assert_eq!((total, dropped), (10, 7));
        assert_eq!(first_characters, "0123456789", "order is kept");

        // One line of control characters, six bytes each in JSON, is cut to fit.
        let frames = log_frames(application_id, vec![line("\u{1}".repeat(MAX_FRAME_BYTES))], 0);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].len() <= MAX_FRAME_BYTES);
    }

    #[tokio::test]
    async fn the_data_path_hears_welcome_edges_certificates_and_access_and_its_requests_are_sent() {
        let local = Arc::new(FakeLocal::new(true));
        let (mut server, _stats, _stop, outcome, mut data_path) =
            start_linked(ControlConfig::default(), Arc::clone(&local), 64);
        server.next().await;
        let tunnel_cidr: ipnet::Ipv4Net = "100.96.0.0/16".parse().expect("a network");
        let welcome = ServerMessage::Welcome {
            device_id: DeviceId::new(),
            tunnel_address: std::net::Ipv4Addr::new(100, 96, 0, 2),
            server_version: "test".into(),
            ping_interval_seconds: Some(20),
            tunnel_cidr: Some(tunnel_cidr),
        };
        server.send(&welcome).await;
        let welcomed = data_path.welcomed.wait_for(Option::is_some).await.expect("the link is up").clone();
        assert_eq!(
            welcomed.as_ref().map(|welcomed| (welcomed.session, welcomed.tunnel_cidr)),
            Some((1, Some(tunnel_cidr)))
        );

        let edge = edgible::protocol::v1::EdgePeer {
            edge_id: edgible::model::EdgeId::new(),
            public_key: "e".repeat(43) + "=",
            endpoint: "edge.example.test:51820".into(),
            tunnel_address: std::net::Ipv4Addr::new(100, 96, 0, 1),
        };
        server.send(&ServerMessage::Edges { edges: vec![edge.clone()] }).await;
        let edges = data_path.edges.wait_for(Option::is_some).await.expect("the link is up").clone();
        assert_eq!(edges, Some(vec![edge]));

        let access = ServerMessage::Access {
            login_url: "https://login.example.test".into(),
            assertion_keys: vec![edgible::access::AssertionKey { kid: "k1".into(), public_key: "AAAA".into() }],
            session_ttl_seconds: 300,
            applications: vec![edgible::protocol::v1::ApplicationAccess {
                application_id: ApplicationId::new(),
                api_keys: Vec::new(),
                short_code: None,
            }],
        };
        server.send(&access).await;
        let received = data_path.access.wait_for(Option::is_some).await.expect("the link is up").clone();
        let received = received.expect("an access configuration");
        assert_eq!(
            (received.login_url.as_str(), received.assertion_keys.len(), received.session_ttl_seconds),
            ("https://login.example.test", 1, 300)
        );
        assert_eq!(received.applications.len(), 1);

        let application_id = ApplicationId::new();
        let certificate = ServerMessage::Certificate {
            application_id,
            chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            hostnames: vec!["web.example.test".parse().expect("a hostname")],
            not_after: Utc::now(),
        };
        server.send(&certificate).await;
        let issued = tokio::time::timeout(Duration::from_secs(30), data_path.certificates.recv())
            .await
            .expect("in time")
            .expect("a certificate");
        assert_eq!((issued.application_id, issued.hostnames.len()), (application_id, 1));

        let request = CertificateRequest { application_id, csr_pem: "csr".into() };
        data_path.requests.send(request).await.expect("the session listens");
        let sent = server
            .until("a certificate request", |message| matches!(message, AgentMessage::CertificateRequest { .. }))
            .await;
        assert_eq!(sent, AgentMessage::CertificateRequest { application_id, csr_pem: "csr".into() });
        assert!(!outcome.is_finished());
    }
}
