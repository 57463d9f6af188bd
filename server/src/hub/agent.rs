//! One agent's session: `hello`, then `welcome` and a full snapshot, then the pool's `edges`,
//! then `access` (login URL, assertion keys, secrets' digests: `crate::access`), then deltas
//! (and a new `edges` or `access` when that changed) when woken, pings, whatever the agent
//! reports (acks, status, events, logs; usage records, stored and answered with `usage_ack`:
//! `db::usage`), and certificates for the applications placed on the device
//! (`certificate_request` → `certificate`, or an `error` naming the application and the reason):
//! signed at once by the internal CA, or, under `--issuer acme`, ordered from the ACME
//! CA (`certs::acme`) and sent later through the device's [`Outbox`], which the session empties
//! whenever it is woken and when it starts.
//! Migration steps' results, progress and the statuses of applications go to the migration
//! driver (`crate::migrations::driver`), whose steps come through the same outbox; a device
//! that connects is sent the steps of its running migrations again.
//!
//! The session is generic over a sink and a stream of [`Frame`]s, so tests drive it through
//! channels. Every frame the agent sends is decoded with the bounded `protocol::decode`;
//! anything wrong is counted, logged and answered with an `error` frame, and the session goes
//! on. Only a bad `hello` ends it, with an error frame and a close code that says why. An
//! `error` from the agent is logged and counted, never answered, so that errors cannot bounce
//! between the two.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use edgible::model::{ApplicationId, ApplicationPhase, Device, DeviceId, LogEntry, LogStream};
use edgible::protocol::v1::{
    AgentMessage, EdgePeer, ErrorCode, Phase, ServerMessage, StepOutcome, Stream as LogLineStream,
};
use edgible::protocol::{DecodeError, VERSION, close, decode, encode};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{Instant, sleep_until, timeout};
use uuid::Uuid;

use super::heartbeat::{Beat, Heartbeat};
use super::transport::Frame;
use super::{Hub, Registration};
use crate::certs::acme::{AcmeIssuer, RequestError};
use crate::certs::orders::Begin;
use crate::certs::{SharedCa, check_request};
use crate::db::{Db, StatusReport};
use crate::desired::Offered;
use crate::logs::LogStore;
use crate::metrics::Metrics;

/// How often a session re-reads its `access` message when nothing is due to change.
const ACCESS_RECHECK: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest message or event text kept, in bytes.
const MAX_MESSAGE_BYTES: usize = 4096;

/// Timing of agent sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How often the server pings each agent.
    pub ping_interval: Duration,
    /// How long a ping may go unanswered before the session is closed.
    pub pong_timeout: Duration,
    /// How long a new connection may take to send `hello`.
    pub hello_timeout: Duration,
    /// How long writing one frame may take before the agent counts as gone.
    pub send_timeout: Duration,
    /// How often an answered ping refreshes the device's `last_seen_at`.
    pub seen_interval: Duration,
    /// How often a followed log stream with no new lines sends a keep-alive, which is how the
    /// server notices a follower that went away.
    pub follow_keepalive: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            seen_interval: Duration::from_secs(60),
            follow_keepalive: Duration::from_secs(15),
        }
    }
}

/// What every agent session shares. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Agents {
    pub db: Db,
    pub hub: Arc<Hub<DeviceId>>,
    pub logs: Arc<LogStore>,
    pub metrics: Arc<Metrics>,
    pub config: SessionConfig,
    /// The internal CA that answers `certificate_request`s under `--issuer internal`.
    pub ca: Arc<SharedCa>,
    /// The ACME certificate manager under `--issuer acme`; set once at startup, before any
    /// session runs.
    pub acme: Arc<OnceLock<Arc<AcmeIssuer>>>,
    /// Messages for devices' sessions from elsewhere in the server (issued certificates).
    pub outbox: Arc<Outbox>,
    /// Access policies' settings: what the `access` message carries besides the secrets.
    pub access: Arc<crate::access::AccessSettings>,
    /// The migration driver, which hears of steps' results, progress and statuses.
    pub migrations: Arc<crate::migrations::driver::Migrations>,
}

/// Messages waiting for a device's session, which sends them when woken (and when it starts,
/// for a device that reconnected meanwhile). Bounded per device: the oldest go first.
#[derive(Debug, Default)]
pub struct Outbox {
    queued: Mutex<HashMap<DeviceId, VecDeque<ServerMessage>>>,
}

/// How many messages wait for one device at most.
const OUTBOX_PER_DEVICE: usize = 64;

impl Outbox {
    fn queued(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, VecDeque<ServerMessage>>> {
        // Every change is a single push or removal.
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `message` for `device`'s session; wake the session after.
    pub fn push(&self, device: DeviceId, message: ServerMessage) {
        let mut queued = self.queued();
        let messages = queued.entry(device).or_default();
        if messages.len() >= OUTBOX_PER_DEVICE {
            messages.pop_front();
        }
        messages.push_back(message);
    }

    /// Everything queued for `device`, oldest first.
    pub fn take(&self, device: DeviceId) -> Vec<ServerMessage> {
        self.queued().remove(&device).map(Vec::from).unwrap_or_default()
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The agent closed the connection, or it broke.
    Disconnected,
    /// A newer session of the same device took over.
    Replaced,
    /// The agent did not answer a ping in time.
    TimedOut,
    /// The first frame was not an acceptable `hello`.
    Refused,
    /// The device (or, for an edge session, the edge) was deleted while connected.
    DeviceDeleted,
    /// Writing to the agent failed or took too long.
    SendFailed,
    /// The database failed.
    Failed,
}

impl Ended {
    /// The metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            Ended::Disconnected => "disconnected",
            Ended::Replaced => "replaced",
            Ended::TimedOut => "timeout",
            Ended::Refused => "refused",
            Ended::DeviceDeleted => "device_deleted",
            Ended::SendFailed => "send_failed",
            Ended::Failed => "failed",
        }
    }
}

/// Runs the session of `device`'s agent (already authenticated by its credential) until it
/// ends, keeping the device's online state.
pub async fn run<Tx, Rx, E>(agents: Agents, device: Device, tx: Tx, mut rx: Rx) -> Ended
where
    Tx: Sink<Frame> + Unpin,
    Rx: Stream<Item = Result<Frame, E>> + Unpin,
    E: Display,
{
    let mut session = Session {
        heartbeat: Heartbeat::new(Instant::now(), agents.config.ping_interval, agents.config.pong_timeout),
        agents,
        device,
        tx,
        offered: Offered::default(),
        session_id: Uuid::now_v7(),
        known_applications: HashSet::new(),
        last_seen_write: Instant::now(),
        sent_edges: None,
        sent_access: None,
        access_changes_at: None,
    };
    let span = tracing::info_span!("agent", device = %session.device.id);
    let ended = tracing::Instrument::instrument(session.serve(&mut rx), span).await;
    session.agents.metrics.session_ended(ended.reason());
    ended
}

struct Session<Tx> {
    agents: Agents,
    device: Device,
    tx: Tx,
    /// What the agent has been sent.
    offered: Offered,
    session_id: Uuid,
    heartbeat: Heartbeat,
    /// Applications checked to belong to the device's organization, for logs.
    known_applications: HashSet<ApplicationId>,
    last_seen_write: Instant,
    /// The pool's edges as last sent; `None` before the first `edges`.
    sent_edges: Option<Vec<EdgePeer>>,
    /// The `access` message as last sent; `None` before the first.
    sent_access: Option<ServerMessage>,
    /// When that message changes by itself (a key expires or leaves its grace period).
    access_changes_at: Option<Instant>,
}

impl<Tx: Sink<Frame> + Unpin> Session<Tx> {
    async fn serve<Rx, E>(&mut self, rx: &mut Rx) -> Ended
    where
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        if let Err(ended) = self.hello(rx).await {
            return ended;
        }
        let (mut registration, replaced) = self.agents.hub.register(self.device.id);
        if replaced {
            tracing::info!("a new session replaced the device's previous one");
        }
        self.agents.metrics.session_started();
        let ended = match self.connected(rx, &mut registration).await {
            Ok(()) => Ended::Disconnected,
            Err(ended) => ended,
        };
        drop(registration);
        if let Err(error) = self.agents.db.agent_disconnected(self.device.id, self.session_id).await {
            tracing::warn!(%error, "cannot mark the device offline");
        }
        tracing::info!(reason = ended.reason(), "session ended");
        ended
    }

    /// Reads and checks `hello`; on failure the agent has been told why and the socket closed.
    async fn hello<Rx, E>(&mut self, rx: &mut Rx) -> Result<(), Ended>
    where
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        let deadline = Instant::now() + self.agents.config.hello_timeout;
        let text = loop {
            match timeout(deadline.saturating_duration_since(Instant::now()), rx.next()).await {
                Err(_) => {
                    let message = "no hello within the time allowed".to_owned();
                    return Err(self.refuse("timeout", ErrorCode::Unexpected, message, close::PROTOCOL_ERROR).await);
                }
                Ok(None | Some(Err(_)) | Some(Ok(Frame::Close(_)))) => return Err(Ended::Disconnected),
                Ok(Some(Ok(Frame::Control))) => {}
                Ok(Some(Ok(Frame::Binary(_)))) => {
                    let message = "binary frames are not part of the protocol; the first frame must be hello".into();
                    return Err(self.refuse("binary", ErrorCode::Malformed, message, close::PROTOCOL_ERROR).await);
                }
                Ok(Some(Ok(Frame::Text(text)))) => break text,
            }
        };
        self.agents.metrics.frame_received();
        let hello = match decode::<AgentMessage>(&text) {
            Ok(message) => message,
            Err(error) => {
                let message = match &error {
                    DecodeError::UnsupportedVersion { got } => {
                        format!("protocol version {got} is not supported: this server speaks version {VERSION}")
                    }
                    DecodeError::MissingVersion => {
                        format!("the hello names no protocol version: this server speaks version {VERSION}")
                    }
                    other => format!("the first frame must be hello: {other}"),
                };
                return Err(self.refuse(error.reason(), error.code(), message, close::PROTOCOL_ERROR).await);
            }
        };
        let AgentMessage::Hello { device_id, public_key, applied_revision, capabilities, agent_version, cloud_host } =
            hello
        else {
            let message = format!("the first frame must be hello, not {}", message_type(&hello));
            return Err(self.refuse("unexpected", ErrorCode::Unexpected, message, close::PROTOCOL_ERROR).await);
        };
        if device_id != self.device.id {
            let message = format!("hello names device {device_id}, but the credential is device {}'s", self.device.id);
            return Err(self.refuse("unexpected", ErrorCode::Unexpected, message, close::POLICY_VIOLATION).await);
        }
        if self.device.status.public_key.as_deref() != Some(public_key.as_str()) {
            let message = "hello carries another public key than the device enrolled with; enroll again".to_owned();
            return Err(self.refuse("unexpected", ErrorCode::Unexpected, message, close::POLICY_VIOLATION).await);
        }
        // Only a device in a cloud pool of an operator organization may offer itself as a cloud
        // host; a hello without `cloud_host` clears what an earlier one declared.
        match self.agents.db.record_cloud_host(self.device.id, cloud_host).await {
            Ok(()) => {}
            Err(crate::db::CloudHostError::Gone) => return Err(self.deleted().await),
            Err(crate::db::CloudHostError::Store(error)) => return Err(self.failed(&error).await),
            Err(error) => {
                let message = format!("hello refused: {error}");
                return Err(self.refuse("cloud_host", ErrorCode::Unexpected, message, close::POLICY_VIOLATION).await);
            }
        }
        tracing::info!(%agent_version, ?capabilities, ?applied_revision, ?cloud_host, "agent said hello");
        if let Some(applied) = applied_revision
            && let Err(error) = self.agents.db.record_applied(self.device.id, applied).await
        {
            tracing::warn!(%error, "cannot record the applied revision from hello");
        }
        Ok(())
    }

    /// Serves a session that passed `hello`: welcome, snapshot, then events until it ends.
    async fn connected<Rx, E>(&mut self, rx: &mut Rx, registration: &mut Registration<DeviceId>) -> Result<(), Ended>
    where
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        match self.agents.db.agent_connected(self.device.id, self.session_id).await {
            Ok(true) => {}
            Ok(false) => return Err(self.deleted().await),
            Err(error) => return Err(self.failed(&error).await),
        }
        let tunnel_cidr = match self.agents.db.pool_tunnel_cidr(self.device.spec.pool_id).await {
            Ok(cidr) => cidr.net(),
            Err(error) => return Err(self.failed(&error).await),
        };
        self.send(&ServerMessage::Welcome {
            device_id: self.device.id,
            tunnel_address: self.device.status.tunnel_address,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            ping_interval_seconds: Some(self.agents.config.ping_interval.as_secs().max(1)),
            tunnel_cidr: Some(tunnel_cidr),
        })
        .await?;
        self.push_desired(true).await?;
        self.push_edges().await?;
        self.push_access().await?;
        self.flush_outbox().await?;
        // Steps of running migrations come again (through the outbox, after a wake-up).
        self.agents.migrations.device_online(self.device.id).await;
        loop {
            let deadline = self.heartbeat.deadline();
            // Without a pending change, a day away: re-checking then costs nothing.
            let access_deadline = self.access_changes_at.unwrap_or_else(|| Instant::now() + ACCESS_RECHECK);
            tokio::select! {
                biased;
                _ = &mut registration.evicted => {
                    let message = "another session of this device connected; this one is closed".to_owned();
                    self.send(&ServerMessage::Error { code: ErrorCode::Replaced, message }).await?;
                    self.close(close::REPLACED, "replaced by a newer session").await;
                    return Err(Ended::Replaced);
                }
                frame = rx.next() => match frame {
                    None | Some(Ok(Frame::Close(_))) => return Ok(()),
                    Some(Err(error)) => {
                        tracing::debug!(%error, "the connection broke");
                        return Ok(());
                    }
                    Some(Ok(Frame::Text(text))) => self.on_text(&text).await?,
                    Some(Ok(Frame::Binary(_))) => {
                        let message = "binary frames are not part of the protocol".to_owned();
                        self.reject("binary", ErrorCode::Malformed, message).await?;
                    }
                    Some(Ok(Frame::Control)) => {}
                },
                () = registration.wake.notified() => {
                    self.push_desired(false).await?;
                    self.push_edges().await?;
                    self.push_access().await?;
                    self.flush_outbox().await?;
                }
                () = sleep_until(access_deadline) => self.push_access().await?,
                () = sleep_until(deadline) => match self.heartbeat.on_deadline(Instant::now()) {
                    Beat::Ping(nonce) => self.send(&ServerMessage::Ping { nonce }).await?,
                    Beat::Dead => {
                        let message = "no pong in time; closing the session".to_owned();
                        // The agent is probably gone; whether it hears this does not matter.
                        let _ = self.send(&ServerMessage::Error { code: ErrorCode::Timeout, message }).await;
                        self.close(close::TIMEOUT, "ping timeout").await;
                        return Err(Ended::TimedOut);
                    }
                    Beat::Idle => {}
                },
            }
        }
    }

    /// Sends the full snapshot, or the delta since what was offered if there is one.
    async fn push_desired(&mut self, full: bool) -> Result<(), Ended> {
        let state = match self.agents.db.desired_state(self.device.id).await {
            Ok(Some(state)) => state,
            Ok(None) => return Err(self.deleted().await),
            Err(error) => return Err(self.failed(&error).await),
        };
        self.note_placed(&state).await?;
        let update = if full { Some(self.offered.snapshot(&state)) } else { self.offered.delta_to(&state) };
        if let Some(update) = update {
            self.send(&update).await?;
            self.agents.metrics.update_sent();
        }
        Ok(())
    }

    /// Sends the pool's enrolled edges if they differ from what was sent last (always, the
    /// first time).
    async fn push_edges(&mut self) -> Result<(), Ended> {
        let edges = match self.agents.db.pool_edge_peers(self.device.spec.pool_id).await {
            Ok(edges) => edges,
            Err(error) => return Err(self.failed(&error).await),
        };
        if self.sent_edges.as_ref() == Some(&edges) {
            return Ok(());
        }
        self.send(&ServerMessage::Edges { edges: edges.clone() }).await?;
        self.sent_edges = Some(edges);
        Ok(())
    }

    /// Sends what the device's proxy needs to enforce access policies if it differs from what
    /// was sent last (always, the first time). A key the server cannot open is logged and the
    /// message skipped: the device keeps what it has, the session goes on.
    async fn push_access(&mut self) -> Result<(), Ended> {
        let push = match crate::access::access_message(&self.agents.db, &self.agents.access, self.device.id).await {
            Ok(push) => push,
            Err(crate::access::AccessError::Store(error)) => return Err(self.failed(&error).await),
            Err(error) => {
                tracing::error!(%error, "cannot compute the access message");
                self.access_changes_at = None;
                return Ok(());
            }
        };
        // A second after the change, so that the comparisons in the database have flipped.
        self.access_changes_at = push.changes_at.map(|at| {
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait + Duration::from_secs(1)
        });
        let message = push.message;
        if self.sent_access.as_ref() == Some(&message) {
            return Ok(());
        }
        self.send(&message).await?;
        self.sent_access = Some(message);
        Ok(())
    }

    /// Sends what the outbox holds for this device.
    async fn flush_outbox(&mut self) -> Result<(), Ended> {
        for message in self.agents.outbox.take(self.device.id) {
            self.send(&message).await?;
        }
        Ok(())
    }

    /// Answers a `certificate_request` for an application in the device's current desired
    /// state: under the internal CA a signed `certificate` at once; under ACME the request
    /// starts (or joins) an order whose `certificate` comes later, through the outbox. Anything
    /// refused is an `error` naming the application and why. The session goes on either way.
    async fn on_certificate_request(&mut self, application_id: ApplicationId, csr_pem: &str) -> Result<(), Ended> {
        let state = match self.agents.db.desired_state(self.device.id).await {
            Ok(Some(state)) => state,
            Ok(None) => return Err(self.deleted().await),
            Err(error) => return Err(self.failed(&error).await),
        };
        let Some(application) = state.applications.iter().find(|application| application.id == application_id) else {
            let message = format!(
                "certificate_request for application {application_id} refused: it is not placed on this device"
            );
            return self.reject("certificate", ErrorCode::Unexpected, message).await;
        };
        if let Some(acme) = self.agents.acme.get().cloned() {
            let application = application.clone();
            return self.request_from_acme(&acme, &application, csr_pem).await;
        }
        let ca = match self.agents.ca.get(&self.agents.db).await {
            Ok(ca) => ca,
            Err(error) => {
                tracing::error!(%error, "the internal CA is unusable");
                let message = format!(
                    "certificate_request for application {} ({application_id}) failed: the server's CA is unusable",
                    application.spec.name
                );
                return self.reject("certificate", ErrorCode::Internal, message).await;
            }
        };
        match ca.sign(csr_pem, &application.spec.hostnames, chrono::Utc::now()) {
            Ok(signed) => {
                tracing::info!(application = %application_id, not_after = %signed.not_after, "signed a certificate");
                let state = crate::db::CertificateState::Valid { not_after: signed.not_after };
                let organization_id = application.organization_id;
                if let Err(error) = self.agents.db.record_certificate(organization_id, application_id, &state).await {
                    tracing::warn!(%error, "cannot record the signed certificate");
                }
                self.send(&ServerMessage::Certificate {
                    application_id,
                    chain_pem: signed.chain_pem,
                    hostnames: signed.hostnames,
                    not_after: signed.not_after,
                })
                .await
            }
            Err(error) => {
                let message = format!(
                    "certificate_request for application {} ({application_id}) refused: {error}",
                    application.spec.name
                );
                self.reject("certificate", ErrorCode::Unexpected, message).await
            }
        }
    }

    /// Hands a checked request to the ACME certificate manager.
    async fn request_from_acme(
        &mut self,
        acme: &Arc<AcmeIssuer>,
        application: &edgible::model::Application,
        csr_pem: &str,
    ) -> Result<(), Ended> {
        let refused = |reason: &dyn Display| {
            format!(
                "certificate_request for application {} ({}) refused: {reason}",
                application.spec.name, application.id
            )
        };
        if let Err(error) = check_request(csr_pem, &application.spec.hostnames, true) {
            return self.reject("certificate", ErrorCode::Unexpected, refused(&error)).await;
        }
        match acme.request(&self.device, application, csr_pem).await {
            Ok(Begin::Start) => {
                tracing::info!(application = %application.id, "ordering a certificate from the ACME CA");
                Ok(())
            }
            Ok(Begin::Join) => {
                tracing::debug!(application = %application.id, "an ACME order for the application is running");
                Ok(())
            }
            Err(error @ (RequestError::Wildcard { .. } | RequestError::Backoff { .. })) => {
                self.reject("certificate", ErrorCode::Unexpected, refused(&error)).await
            }
            Err(RequestError::Store(error)) => {
                tracing::error!(%error, "cannot record an ACME order");
                let message = format!(
                    "certificate_request for application {} ({}) failed: the server failed; ask again later",
                    application.spec.name, application.id
                );
                self.reject("certificate", ErrorCode::Internal, message).await
            }
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Ended> {
        self.agents.metrics.frame_received();
        let message = match decode::<AgentMessage>(text) {
            Ok(message) => message,
            Err(error) => return self.reject(error.reason(), error.code(), error.to_string()).await,
        };
        match message {
            AgentMessage::Hello { .. } => {
                self.reject("unexpected", ErrorCode::Unexpected, "hello was already received".into()).await?;
            }
            AgentMessage::CertificateRequest { application_id, csr_pem } => {
                self.on_certificate_request(application_id, &csr_pem).await?;
            }
            AgentMessage::Usage { records } => self.on_usage(&records).await?,
            AgentMessage::MigrationStepResult { migration_id, step_id, outcome } => {
                tracing::debug!(%migration_id, step_id, ?outcome, "migration step answered");
                let outcome = match outcome {
                    StepOutcome::Failed { reason } => {
                        StepOutcome::Failed { reason: bounded(reason, MAX_MESSAGE_BYTES) }
                    }
                    done => done,
                };
                self.agents.migrations.step_result(self.device.id, migration_id, step_id, &outcome).await;
            }
            AgentMessage::MigrationProgress { migration_id, step_id, bytes_done, .. } => {
                self.agents.migrations.progress(self.device.id, migration_id, step_id, bytes_done).await;
            }
            AgentMessage::Ack { revision } => {
                if revision > self.offered.revision {
                    let message = format!(
                        "ack of revision {revision}, but the latest revision sent is {}",
                        self.offered.revision
                    );
                    return self.reject("unexpected", ErrorCode::Unexpected, message).await;
                }
                match self.agents.db.record_applied(self.device.id, revision).await {
                    Ok(true) => tracing::debug!(revision, "applied"),
                    Ok(false) => tracing::debug!(revision, "ignored a stale ack"),
                    Err(error) => tracing::warn!(%error, "cannot record an ack"),
                }
            }
            AgentMessage::Pong { nonce } => {
                if self.heartbeat.on_pong(nonce) && self.last_seen_write.elapsed() >= self.agents.config.seen_interval {
                    self.last_seen_write = Instant::now();
                    if let Err(error) = self.agents.db.agent_seen(self.device.id, self.session_id).await {
                        tracing::warn!(%error, "cannot record when the agent was seen");
                    }
                }
            }
            AgentMessage::Status { applications } => {
                let reports: Vec<StatusReport> = applications
                    .into_iter()
                    .map(|status| StatusReport {
                        application_id: status.application_id,
                        phase: phase(status.phase),
                        message: status.message.map(|message| bounded(message, MAX_MESSAGE_BYTES)),
                        revision: status.revision,
                    })
                    .collect();
                self.agents.migrations.statuses(self.device.id, &reports).await;
                match self.agents.db.record_statuses(&self.device, &reports).await {
                    Ok(stored) if stored < reports.len() => {
                        tracing::debug!(
                            ignored = reports.len() - stored,
                            "ignored statuses of applications not placed here"
                        );
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "cannot record statuses"),
                }
            }
            AgentMessage::Event { application_id, at, message } => {
                let message = bounded(message, MAX_MESSAGE_BYTES);
                match self.agents.db.record_event(&self.device, application_id, at, &message).await {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(?application_id, "ignored an event of an unknown application"),
                    Err(error) => tracing::warn!(%error, "cannot record an event"),
                }
            }
            AgentMessage::Error { code, message } => {
                // Never answered with an error frame: the agent does not answer ours either, and
                // two peers each answering the other's errors would loop forever.
                let message = bounded(message, MAX_MESSAGE_BYTES);
                tracing::warn!(code = code.as_str(), %message, "the agent could not handle a frame");
                self.agents.metrics.agent_error(code.as_str());
            }
            AgentMessage::Logs { application_id, lines, dropped } => {
                if self.knows(application_id).await {
                    let device_id = self.device.id;
                    let entries = lines
                        .into_iter()
                        .map(|line| LogEntry {
                            at: line.at,
                            device_id,
                            stream: log_stream(line.stream),
                            line: line.line,
                        })
                        .collect();
                    self.agents.logs.append(application_id, entries, dropped);
                } else {
                    tracing::debug!(%application_id, "ignored logs of an unknown application");
                }
            }
        }
        Ok(())
    }

    /// Remembers which applications the device is given, whose usage it may then report
    /// (`db::usage`), before it is told.
    async fn note_placed(&mut self, state: &crate::desired::DesiredState) -> Result<(), Ended> {
        let placed: Vec<_> =
            state.applications.iter().map(|application| (application.id, application.organization_id)).collect();
        match self.agents.db.note_placed(self.device.id, &placed).await {
            Ok(()) => Ok(()),
            Err(error) => Err(self.failed(&error).await),
        }
    }

    /// Stores usage records and acknowledges them; refused records are named in an `error`
    /// frame (see `db::usage` for what is accepted and what an ack covers). When the database
    /// fails nothing is acknowledged, and the agent sends the records again later.
    async fn on_usage(&mut self, records: &[edgible::protocol::v1::UsageRecord]) -> Result<(), Ended> {
        if records.len() > crate::db::MAX_RECORDS_PER_MESSAGE {
            let message = format!(
                "usage message refused, nothing stored: {} records, at most {} per message",
                records.len(),
                crate::db::MAX_RECORDS_PER_MESSAGE
            );
            return self.reject("usage", ErrorCode::Unexpected, message).await;
        }
        let outcome = match self.agents.db.record_usage(self.device.id, records).await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(%error, "cannot store usage records");
                let message =
                    format!("{} usage record(s) not stored: the server failed; send them again later", records.len());
                return self.reject("usage", ErrorCode::Internal, message).await;
            }
        };
        tracing::debug!(
            stored = outcome.stored,
            duplicates = outcome.duplicates,
            refused = outcome.refused.len(),
            "usage"
        );
        if let Some(message) = outcome.refusal_message() {
            self.reject("usage", ErrorCode::Unexpected, bounded(message, MAX_MESSAGE_BYTES)).await?;
        }
        if let Some(seq) = outcome.ack {
            self.send(&ServerMessage::UsageAck { seq }).await?;
        }
        Ok(())
    }

    /// Whether the application belongs to the device's organization or is placed on it (a
    /// cloud host's guest); cached once known.
    async fn knows(&mut self, application_id: ApplicationId) -> bool {
        if self.known_applications.contains(&application_id) {
            return true;
        }
        let known = match self.agents.db.application_exists(self.device.organization_id, application_id).await {
            Ok(false) => self.agents.db.placed_on(self.device.id, application_id).await,
            other => other,
        };
        match known {
            Ok(true) => {
                self.known_applications.insert(application_id);
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(%error, "cannot check an application");
                false
            }
        }
    }

    async fn send(&mut self, message: &ServerMessage) -> Result<(), Ended> {
        let frame = Frame::Text(encode(message));
        match timeout(self.agents.config.send_timeout, self.tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::SendFailed),
            Err(_) => {
                tracing::info!("writing to the agent took too long");
                Err(Ended::SendFailed)
            }
        }
    }

    /// Answers a frame the session cannot take with an error frame, and goes on.
    async fn reject(&mut self, reason: &'static str, code: ErrorCode, message: String) -> Result<(), Ended> {
        tracing::warn!(reason, %message, "rejected a frame");
        self.agents.metrics.frame_rejected(reason);
        self.send(&ServerMessage::Error { code, message }).await
    }

    /// Answers a bad start with an error frame and closes.
    async fn refuse(&mut self, reason: &'static str, code: ErrorCode, message: String, close_code: u16) -> Ended {
        tracing::warn!(reason, %message, "refused a session");
        self.agents.metrics.frame_rejected(reason);
        if self.send(&ServerMessage::Error { code, message: message.clone() }).await.is_ok() {
            self.close(close_code, &message).await;
        }
        Ended::Refused
    }

    async fn deleted(&mut self) -> Ended {
        let message = "the device was deleted".to_owned();
        if self.send(&ServerMessage::Error { code: ErrorCode::Unexpected, message }).await.is_ok() {
            self.close(close::POLICY_VIOLATION, "the device was deleted").await;
        }
        Ended::DeviceDeleted
    }

    async fn failed(&mut self, error: &crate::db::StoreError) -> Ended {
        tracing::error!(%error, "the session failed");
        let message = "the server failed; reconnect later".to_owned();
        if self.send(&ServerMessage::Error { code: ErrorCode::Internal, message }).await.is_ok() {
            self.close(close::INTERNAL_ERROR, "server error").await;
        }
        Ended::Failed
    }

    /// Sends a close frame, best effort: the session ends either way.
    async fn close(&mut self, code: u16, reason: &str) {
        // Close reasons must fit a control frame (125 bytes with the code).
        let reason = bounded(reason.to_owned(), 120);
        let _ = timeout(self.agents.config.send_timeout, self.tx.send(Frame::Close(Some((code, reason))))).await;
    }
}

/// The `type` of a message, for error texts.
fn message_type(message: &AgentMessage) -> &'static str {
    match message {
        AgentMessage::Hello { .. } => "hello",
        AgentMessage::Ack { .. } => "ack",
        AgentMessage::Status { .. } => "status",
        AgentMessage::Event { .. } => "event",
        AgentMessage::Logs { .. } => "logs",
        AgentMessage::Pong { .. } => "pong",
        AgentMessage::Error { .. } => "error",
        AgentMessage::CertificateRequest { .. } => "certificate_request",
        AgentMessage::Usage { .. } => "usage",
        AgentMessage::MigrationStepResult { .. } => "migration_step_result",
        AgentMessage::MigrationProgress { .. } => "migration_progress",
    }
}

fn phase(phase: Phase) -> ApplicationPhase {
    match phase {
        Phase::Pending => ApplicationPhase::Pending,
        Phase::Starting => ApplicationPhase::Starting,
        Phase::Running => ApplicationPhase::Running,
        Phase::Unhealthy => ApplicationPhase::Unhealthy,
        Phase::Stopped => ApplicationPhase::Stopped,
        Phase::Failed => ApplicationPhase::Failed,
        Phase::Sleeping => ApplicationPhase::Sleeping,
        Phase::Waking => ApplicationPhase::Waking,
    }
}

fn log_stream(stream: LogLineStream) -> LogStream {
    match stream {
        LogLineStream::Stdout => LogStream::Stdout,
        LogLineStream::Stderr => LogStream::Stderr,
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
    use std::convert::Infallible;

    use edgible::model::{DevicePoolSpec, DeviceSpec, PlacementSpec};
    use edgible::protocol::v1::UsageRecord;
    use futures::channel::mpsc;

    use super::*;
    use crate::secrets::NewSecret;

    const KEY: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=";

    /// A database with one enrolled device, and what sessions share.
    struct Fixture {
        _dir: tempfile::TempDir,
        agents: Agents,
        device: Device,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("hub.db").display());
        let db = Db::connect(&url).await.expect("a test database");
        let org = db.bootstrap(&"acme".parse().expect("name"), &NewSecret::api_key()).await.expect("bootstrap");
        let org = org.expect("an empty database").organization.id;
        let pool_spec: DevicePoolSpec =
            serde_json::from_value(serde_json::json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"})).expect("pool");
        let pool = db.create_device_pool(org, &pool_spec).await.expect("pool");
        let token = NewSecret::enrollment_token();
        let spec = DeviceSpec { name: "laptop".parse().expect("name"), pool_id: pool.id, labels: Default::default() };
        let expires_at = chrono::Utc::now() + chrono::TimeDelta::hours(1);
        db.create_device(org, &spec, &token, expires_at).await.expect("device");
        let device = db.enroll(&token.sha256, KEY, &NewSecret::device_credential()).await.expect("enrolled");
        let state = crate::AppState::new(db);
        Fixture { _dir: dir, agents: state.agents().clone(), device }
    }

    fn hello(device: &Device, frame_version: u32) -> String {
        format!(
            r#"{{"v":{frame_version},"type":"hello","device_id":"{}","public_key":"{KEY}","applied_revision":null,"agent_version":"t"}}"#,
            device.id
        )
    }

    async fn next_message(frames: &mut mpsc::UnboundedReceiver<Frame>) -> ServerMessage {
        match frames.next().await {
            Some(Frame::Text(text)) => decode(&text).expect("the server sends valid frames"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    #[test]
    fn the_outbox_keeps_each_devices_newest_messages_in_order() {
        let outbox = Outbox::default();
        let (device, other) = (DeviceId::new(), DeviceId::new());
        for nonce in 0..(OUTBOX_PER_DEVICE as u64 + 2) {
            outbox.push(device, ServerMessage::Ping { nonce });
        }
        outbox.push(other, ServerMessage::Ping { nonce: 99 });
        let taken = outbox.take(device);
        assert_eq!(taken.len(), OUTBOX_PER_DEVICE);
        assert_eq!(taken.first(), Some(&ServerMessage::Ping { nonce: 2 }), "the oldest went first");
        assert_eq!(taken.last(), Some(&ServerMessage::Ping { nonce: OUTBOX_PER_DEVICE as u64 + 1 }));
        assert!(outbox.take(device).is_empty(), "taken once");
        assert_eq!(outbox.take(other), [ServerMessage::Ping { nonce: 99 }]);
    }

    #[tokio::test]
    async fn a_hello_of_another_version_is_refused_and_closed() {
        let fixture = fixture().await;
        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        to_server.unbounded_send(Ok(Frame::Text(hello(&fixture.device, 2)))).expect("queued");
        let ended = run(fixture.agents.clone(), fixture.device.clone(), to_test, from_test).await;
        assert_eq!(ended, Ended::Refused);
        let ServerMessage::Error { code, message } = next_message(&mut frames).await else { panic!("not an error") };
        assert_eq!(code, ErrorCode::UnsupportedVersion);
        assert!(message.contains("version 2 is not supported"), "{message}");
        assert!(matches!(frames.next().await, Some(Frame::Close(Some((close::PROTOCOL_ERROR, _))))));
        assert!(fixture.agents.hub.is_empty(), "a refused session never joins the hub");
    }

    #[tokio::test]
    async fn a_session_sends_a_snapshot_then_deltas_when_woken() {
        let fixture = fixture().await;
        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        let session = tokio::spawn(run(fixture.agents.clone(), fixture.device.clone(), to_test, from_test));
        to_server.unbounded_send(Ok(Frame::Text(hello(&fixture.device, 1)))).expect("queued");
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Welcome { .. }));
        let ServerMessage::ApplicationUpdate { full: true, applications, .. } = next_message(&mut frames).await else {
            panic!("expected a snapshot");
        };
        assert!(applications.is_empty());
        assert_eq!(next_message(&mut frames).await, ServerMessage::Edges { edges: Vec::new() });
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Access { .. }));

        // A placement written through the database wakes the session, which sends the delta.
        let db = &fixture.agents.db;
        let org = fixture.device.organization_id;
        let spec = serde_json::json!({
            "name": "web", "hostnames": ["web.example.test"], "workload": {"process": {"command": "/bin/web"}}, "port": 80
        });
        let application = db
            .create_application(org, &edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec"))
            .await
            .expect("application");
        let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: fixture.device.id };
        let placement = db.create_placement(org, &placement).await.expect("placement");
        let ServerMessage::ApplicationUpdate { revision, full: false, applications, removed } =
            next_message(&mut frames).await
        else {
            panic!("expected a delta");
        };
        assert_eq!(revision, placement.revision);
        assert_eq!(applications.iter().map(|a| a.id).collect::<Vec<_>>(), [application.id]);
        assert!(removed.is_empty());

        // Hostile input is answered and the session goes on; the peer leaving ends it.
        to_server.unbounded_send(Ok(Frame::Text("{".into()))).expect("queued");
        let ServerMessage::Error { code, .. } = next_message(&mut frames).await else { panic!("expected an error") };
        assert_eq!(code, ErrorCode::Malformed);
        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
        let device = db.device(org, fixture.device.id).await.expect("device");
        assert_eq!(device.status.state, edgible::model::DeviceState::Offline);
    }

    #[tokio::test]
    async fn an_agent_error_is_counted_and_never_answered() {
        let fixture = fixture().await;
        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        let session = tokio::spawn(run(fixture.agents.clone(), fixture.device.clone(), to_test, from_test));
        to_server.unbounded_send(Ok(Frame::Text(hello(&fixture.device, 1)))).expect("queued");
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Welcome { .. }));
        assert!(matches!(next_message(&mut frames).await, ServerMessage::ApplicationUpdate { full: true, .. }));
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Edges { .. }));
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Access { .. }));

        let error = AgentMessage::Error { code: ErrorCode::Malformed, message: "cannot read a frame".into() };
        to_server.unbounded_send(Ok(Frame::Text(encode(&error)))).expect("queued");
        // Frames are handled in order, so the first answer after the error is the one to this
        // ack of a revision never sent: the error itself got none, and the session went on.
        to_server.unbounded_send(Ok(Frame::Text(r#"{"v":1,"type":"ack","revision":999}"#.into()))).expect("queued");
        let ServerMessage::Error { code, message } = next_message(&mut frames).await else {
            panic!("expected the answer to the ack")
        };
        assert_eq!(code, ErrorCode::Unexpected);
        assert!(message.starts_with("ack of revision 999"), "{message}");
        let metrics = fixture.agents.metrics.render_hub(0);
        assert!(metrics.contains("edgible_hub_agent_errors_total{code=\"malformed\"} 1"), "{metrics}");
        let rejected = metrics.lines().filter(|line| line.starts_with("edgible_hub_frames_rejected_total")).count();
        assert_eq!(rejected, 1, "only the ack was rejected: {metrics}");

        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
    }

    /// A session past its opening messages, and a web application placed on its device.
    async fn usage_session() -> (
        Fixture,
        mpsc::UnboundedSender<Result<Frame, Infallible>>,
        mpsc::UnboundedReceiver<Frame>,
        tokio::task::JoinHandle<Ended>,
        edgible::model::Application,
        edgible::model::Placement,
    ) {
        let fixture = fixture().await;
        let db = &fixture.agents.db;
        let org = fixture.device.organization_id;
        let spec = serde_json::json!({
            "name": "web", "hostnames": ["web.example.test"], "workload": {"process": {"command": "/bin/web"}}, "port": 80
        });
        let application = db
            .create_application(org, &edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec"))
            .await
            .expect("application");
        let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: fixture.device.id };
        let placement = db.create_placement(org, &placement).await.expect("placement");
        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        let session = tokio::spawn(run(fixture.agents.clone(), fixture.device.clone(), to_test, from_test));
        to_server.unbounded_send(Ok(Frame::Text(hello(&fixture.device, 1)))).expect("queued");
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Welcome { .. }));
        assert!(matches!(next_message(&mut frames).await, ServerMessage::ApplicationUpdate { full: true, .. }));
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Edges { .. }));
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Access { .. }));
        (fixture, to_server, frames, session, application, placement)
    }

    /// A record of one request of `application` that ended `ago` before now.
    fn usage_record(seq: u64, application_id: ApplicationId, ago: chrono::TimeDelta) -> UsageRecord {
        let end = chrono::Utc::now() - ago;
        UsageRecord {
            seq,
            application_id,
            start: end - chrono::TimeDelta::seconds(10),
            end,
            awake_ms: 10_000,
            requests: 1,
            bytes_in: 100,
            bytes_out: 1000,
            wakes: 1,
        }
    }

    fn send_usage(to_server: &mpsc::UnboundedSender<Result<Frame, Infallible>>, records: Vec<UsageRecord>) {
        let frame = encode(&AgentMessage::Usage { records });
        to_server.unbounded_send(Ok(Frame::Text(frame))).expect("queued");
    }

    /// The organization's requests and wakes over the last two days.
    async fn usage_totals(agents: &Agents, organization_id: edgible::model::OrganizationId) -> (u64, u64) {
        let now = chrono::Utc::now();
        let report = agents
            .db
            .usage_report(organization_id, now - chrono::TimeDelta::days(2), now + chrono::TimeDelta::hours(1))
            .await
            .expect("report");
        report.hours.iter().fold((0, 0), |(requests, wakes), hour| (requests + hour.requests, wakes + hour.wakes))
    }

    #[tokio::test]
    async fn usage_is_stored_once_and_acknowledged() {
        let (fixture, to_server, mut frames, session, application, _) = usage_session().await;
        let minute = chrono::TimeDelta::minutes(1);
        send_usage(&to_server, vec![usage_record(1, application.id, minute), usage_record(2, application.id, minute)]);
        assert_eq!(next_message(&mut frames).await, ServerMessage::UsageAck { seq: 2 });
        assert_eq!(usage_totals(&fixture.agents, application.organization_id).await, (2, 2));

        // After a lost ack the agent sends everything again, with a new record: only that counts.
        let again = (1..=3).map(|seq| usage_record(seq, application.id, minute)).collect();
        send_usage(&to_server, again);
        assert_eq!(next_message(&mut frames).await, ServerMessage::UsageAck { seq: 3 });
        assert_eq!(usage_totals(&fixture.agents, application.organization_id).await, (3, 3));

        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
    }

    #[tokio::test]
    async fn usage_of_an_application_not_placed_here_is_refused_without_holding_back_later_acks() {
        let (fixture, to_server, mut frames, session, application, _) = usage_session().await;
        let db = &fixture.agents.db;
        let org = fixture.device.organization_id;
        let spec = serde_json::json!({
            "name": "elsewhere", "hostnames": ["elsewhere.example.test"],
            "workload": {"process": {"command": "/bin/web"}}, "port": 80
        });
        let foreign = db
            .create_application(org, &edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec"))
            .await
            .expect("application");
        let minute = chrono::TimeDelta::minutes(1);

        // The refused record is named; the valid one after it is acknowledged.
        send_usage(&to_server, vec![usage_record(5, foreign.id, minute), usage_record(6, application.id, minute)]);
        let ServerMessage::Error { code, message } = next_message(&mut frames).await else { panic!("not an error") };
        assert_eq!(code, ErrorCode::Unexpected);
        assert!(message.contains(&format!("seq 5 (application {})", foreign.id)), "{message}");
        assert!(message.contains("never placed on this device"), "{message}");
        assert!(!message.contains("seq 6"), "{message}");
        assert_eq!(next_message(&mut frames).await, ServerMessage::UsageAck { seq: 6 });

        // A refused record alone is never acknowledged: the next frame answers the barrier.
        send_usage(&to_server, vec![usage_record(7, foreign.id, minute)]);
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Error { .. }));
        to_server.unbounded_send(Ok(Frame::Text("{".into()))).expect("queued");
        let ServerMessage::Error { code, .. } = next_message(&mut frames).await else { panic!("expected an error") };
        assert_eq!(code, ErrorCode::Malformed, "no ack came before the barrier's answer");

        // A malformed record is refused the same way, naming what is wrong.
        let mut backwards = usage_record(8, application.id, minute);
        std::mem::swap(&mut backwards.start, &mut backwards.end);
        send_usage(&to_server, vec![backwards]);
        let ServerMessage::Error { message, .. } = next_message(&mut frames).await else { panic!("not an error") };
        assert!(message.contains("seq 8") && message.contains("is before start"), "{message}");

        // A message with too many records is refused whole.
        let flood = (100..1101).map(|seq| usage_record(seq, application.id, minute)).collect();
        send_usage(&to_server, flood);
        let ServerMessage::Error { message, .. } = next_message(&mut frames).await else { panic!("not an error") };
        assert!(message.contains("1001 records, at most 1000"), "{message}");

        assert_eq!(usage_totals(&fixture.agents, org).await, (1, 1), "only seq 6 counted");
        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
    }

    #[tokio::test]
    async fn usage_from_before_an_application_moved_away_is_still_accepted() {
        let (fixture, to_server, mut frames, session, application, placement) = usage_session().await;
        let org = fixture.device.organization_id;
        fixture.agents.db.delete_placement(org, placement.id).await.expect("deleted");
        let ServerMessage::ApplicationUpdate { removed, .. } = next_message(&mut frames).await else {
            panic!("expected a delta");
        };
        assert_eq!(removed, [application.id]);

        // Counted while it was still here, reported after it left: accepted.
        send_usage(&to_server, vec![usage_record(1, application.id, chrono::TimeDelta::minutes(1))]);
        assert_eq!(next_message(&mut frames).await, ServerMessage::UsageAck { seq: 1 });
        // Started after it left: refused.
        let mut late = usage_record(2, application.id, chrono::TimeDelta::zero());
        late.start = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
        late.end = late.start;
        late.awake_ms = 0;
        send_usage(&to_server, vec![late]);
        let ServerMessage::Error { message, .. } = next_message(&mut frames).await else { panic!("not an error") };
        assert!(message.contains("seq 2") && message.contains("left this device"), "{message}");
        assert_eq!(usage_totals(&fixture.agents, org).await, (1, 1));

        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
    }

    /// The `access` message of a session, as its parts.
    async fn next_access(
        frames: &mut mpsc::UnboundedReceiver<Frame>,
    ) -> (String, Vec<String>, u64, Vec<edgible::protocol::v1::ApplicationAccess>) {
        match next_message(frames).await {
            ServerMessage::Access { login_url, assertion_keys, session_ttl_seconds, applications } => {
                (login_url, assertion_keys.into_iter().map(|key| key.kid).collect(), session_ttl_seconds, applications)
            }
            other => panic!("expected access, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn access_is_pushed_at_start_and_whenever_it_changes() {
        let fixture = fixture().await;
        let db = fixture.agents.db.clone();
        let org = fixture.device.organization_id;
        let spec = serde_json::json!({
            "name": "api", "hostnames": ["api.example.test"], "workload": {"process": {"command": "/bin/api"}},
            "port": 80, "access": {"api_key": {}, "short_code": {"code": "opensesame1"}}
        });
        let application = db
            .create_application(org, &edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec"))
            .await
            .expect("application");
        let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: fixture.device.id };
        db.create_placement(org, &placement).await.expect("placement");

        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        let session = tokio::spawn(run(fixture.agents.clone(), fixture.device.clone(), to_test, from_test));
        to_server.unbounded_send(Ok(Frame::Text(hello(&fixture.device, 1)))).expect("queued");
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Welcome { .. }));
        let ServerMessage::ApplicationUpdate { applications, .. } = next_message(&mut frames).await else {
            panic!("expected a snapshot");
        };
        let pushed = &applications[0].spec.access;
        assert!(pushed.short_code.as_ref().is_some_and(|code| code.code.is_none()), "the code is never sent in clear");
        assert!(matches!(next_message(&mut frames).await, ServerMessage::Edges { .. }));

        // At the start: the login URL, one key, the default TTL, the short code's digest.
        let (login_url, kids, ttl, access) = next_access(&mut frames).await;
        assert_eq!(login_url, crate::access::AccessSettings::default().public_url);
        assert_eq!(kids.len(), 1);
        assert_eq!(ttl, 300);
        assert_eq!(access.len(), 1);
        assert!(access[0].api_keys.is_empty());
        let short_code = access[0].short_code.clone().expect("the short code");
        assert_eq!(short_code.sha256, edgible::access::short_code_digest(application.id, "opensesame1"));
        assert_eq!(short_code.version, 1);

        // A new application key is pushed as its digest; deleting it takes it away again.
        let key_spec = edgible::model::ApplicationKeySpec { name: "ci".parse().expect("name"), expires_at: None };
        let secret = NewSecret::application_key();
        let created = db.create_application_key(org, application.id, &key_spec, &secret).await.expect("key");
        let (_, _, _, access) = next_access(&mut frames).await;
        let digests: Vec<&str> = access[0].api_keys.iter().map(|key| key.sha256.as_str()).collect();
        assert_eq!(digests, [edgible::access::sha256_hex(&secret.secret)]);
        db.delete_application_key(org, application.id, created.application_key.id).await.expect("deleted");
        let (_, _, _, access) = next_access(&mut frames).await;
        assert!(access[0].api_keys.is_empty());

        // An organization key with the access scope counts too; one without it does not.
        let read_key = edgible::model::ApiKeySpec {
            name: "reader".parse().expect("name"),
            scopes: [edgible::model::Scope::Read].into(),
            expires_at: None,
        };
        db.create_api_key(org, &read_key, &NewSecret::api_key()).await.expect("read key");
        let access_key = edgible::model::ApiKeySpec {
            name: "opener".parse().expect("name"),
            scopes: [edgible::model::Scope::Access].into(),
            expires_at: None,
        };
        let opener = NewSecret::api_key();
        db.create_api_key(org, &access_key, &opener).await.expect("access key");
        let (_, _, _, access) = next_access(&mut frames).await;
        let digests: Vec<&str> = access[0].api_keys.iter().map(|key| key.sha256.as_str()).collect();
        assert_eq!(digests, [edgible::access::sha256_hex(&opener.secret)]);

        // Rotation: a new current key first, the old one still published.
        let kid = crate::access::rotate_key(&db, &fixture.agents.access).await.expect("rotated");
        fixture.agents.hub.wake_all();
        let (_, rotated, _, _) = next_access(&mut frames).await;
        assert_eq!(rotated.len(), 2);
        assert_eq!(rotated[0], kid);
        assert_eq!(rotated[1], kids[0]);

        // A key that expires leaves the message by itself, without any write.
        let expiring = edgible::model::ApplicationKeySpec {
            name: "brief".parse().expect("name"),
            expires_at: Some(chrono::Utc::now() + chrono::TimeDelta::seconds(1)),
        };
        db.create_application_key(org, application.id, &expiring, &NewSecret::application_key()).await.expect("key");
        let (_, _, _, access) = next_access(&mut frames).await;
        assert_eq!(access[0].api_keys.len(), 2, "the opener and the brief key");
        let (_, _, _, access) =
            tokio::time::timeout(Duration::from_secs(10), next_access(&mut frames)).await.expect("resent in time");
        assert_eq!(access[0].api_keys.len(), 1, "the brief key expired: {access:?}");

        // A change of the spec's code bumps the version.
        let mut changed = application.spec.clone();
        changed.access.short_code =
            Some(edgible::model::ShortCodeAccess { code: Some("opensesame2".into()), expires_at: None });
        db.update_application(org, application.id, None, &changed).await.expect("updated");
        assert!(matches!(next_message(&mut frames).await, ServerMessage::ApplicationUpdate { full: false, .. }));
        let (_, _, _, access) = next_access(&mut frames).await;
        let short_code = access[0].short_code.clone().expect("the short code");
        assert_eq!(short_code.sha256, edgible::access::short_code_digest(application.id, "opensesame2"));
        assert_eq!(short_code.version, 2);

        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
    }
}
