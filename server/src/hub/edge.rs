//! One edge's session: `edge_hello`, then `edge_welcome` and its full `edge_config`, then a
//! new full `edge_config` whenever the configuration changed, pings, and the edge's acks.
//!
//! Like the agent session it is generic over a sink and a stream of [`Frame`]s, so tests
//! drive it through channels. The session is woken (through the `Hub<EdgeId>`) by any write
//! that may change what the edge should know: placements, applications, devices enrolled or
//! deleted in its pool, devices going online or offline, the edge itself deleted. When woken
//! it reads its inputs again, computes the configuration (`edge_config`, pure) and sends it
//! only if it differs from the last one sent, so spurious wake-ups cost one read and nothing
//! on the wire. Bad frames are answered with an `error` frame and the session goes on; only a
//! bad `edge_hello` ends it. An `error` from the edge is logged, never answered.
//!
//! The configuration also carries the ACME HTTP-01 challenges of the edge's pool
//! (`certs::challenges::ChallengeBoard`); the ACME orders wake the pool's edges when they
//! change, and the session reports each ack to the board with the challenge generation the
//! acknowledged revision carried, which is what lets an order tell the CA to validate only once
//! the edges serve its challenges.

use std::collections::VecDeque;
use std::fmt::Display;
use std::sync::Arc;

use edgible::model::{Edge, EdgeId, Revision};
use edgible::protocol::v1::{EdgeMessage, EdgeServerMessage, ErrorCode};
use edgible::protocol::{DecodeError, VERSION, close, decode, encode};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{Instant, sleep_until, timeout};
use uuid::Uuid;

use super::agent::{Ended, SessionConfig};
use super::heartbeat::{Beat, Heartbeat};
use super::transport::Frame;
use super::{Hub, Registration};
use crate::certs::challenges::ChallengeBoard;
use crate::db::Db;
use crate::edge_config::SentConfig;

/// The longest error text from an edge that is logged, in bytes.
const MAX_MESSAGE_BYTES: usize = 4096;

/// What every edge session shares. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Edges {
    pub db: Db,
    pub hub: Arc<Hub<EdgeId>>,
    pub config: SessionConfig,
    /// The ACME HTTP-01 challenges each pool's edges serve.
    pub board: Arc<ChallengeBoard>,
}

/// How many sent revisions a session remembers the challenge generation of, for acks.
const GENERATIONS_KEPT: usize = 32;

/// Runs the session of `edge` (already authenticated by its credential) until it ends,
/// keeping the edge's online state.
pub async fn run<Tx, Rx, E>(edges: Edges, edge: Edge, tx: Tx, mut rx: Rx) -> Ended
where
    Tx: Sink<Frame> + Unpin,
    Rx: Stream<Item = Result<Frame, E>> + Unpin,
    E: Display,
{
    let mut session = Session {
        heartbeat: Heartbeat::new(Instant::now(), edges.config.ping_interval, edges.config.pong_timeout),
        edges,
        edge,
        tx,
        sent: SentConfig::default(),
        generations: VecDeque::new(),
        acked: 0,
        session_id: Uuid::now_v7(),
        last_seen_write: Instant::now(),
    };
    let span = tracing::info_span!("edge", edge = %session.edge.id);
    tracing::Instrument::instrument(session.serve(&mut rx), span).await
}

struct Session<Tx> {
    edges: Edges,
    edge: Edge,
    tx: Tx,
    /// The configuration last sent.
    sent: SentConfig,
    /// The challenge generation each recently sent revision carried, oldest first.
    generations: VecDeque<(Revision, u64)>,
    /// The newest revision the edge acknowledged in this session.
    acked: Revision,
    session_id: Uuid,
    heartbeat: Heartbeat,
    last_seen_write: Instant,
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
        let (mut registration, replaced) = self.edges.hub.register(self.edge.id);
        if replaced {
            tracing::info!("a new session replaced the edge's previous one");
        }
        let ended = match self.connected(rx, &mut registration).await {
            Ok(()) => Ended::Disconnected,
            Err(ended) => ended,
        };
        drop(registration);
        if let Err(error) = self.edges.db.edge_disconnected(self.edge.id, self.session_id).await {
            tracing::warn!(%error, "cannot mark the edge offline");
        }
        tracing::info!(reason = ended.reason(), "edge session ended");
        ended
    }

    /// Reads and checks `edge_hello`; on failure the edge has been told why and the socket
    /// closed.
    async fn hello<Rx, E>(&mut self, rx: &mut Rx) -> Result<(), Ended>
    where
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        let deadline = Instant::now() + self.edges.config.hello_timeout;
        let text = loop {
            match timeout(deadline.saturating_duration_since(Instant::now()), rx.next()).await {
                Err(_) => {
                    let message = "no edge_hello within the time allowed".to_owned();
                    return Err(self.refuse(ErrorCode::Unexpected, message, close::PROTOCOL_ERROR).await);
                }
                Ok(None | Some(Err(_)) | Some(Ok(Frame::Close(_)))) => return Err(Ended::Disconnected),
                Ok(Some(Ok(Frame::Control))) => {}
                Ok(Some(Ok(Frame::Binary(_)))) => {
                    let message = "binary frames are not part of the protocol; the first frame must be edge_hello";
                    return Err(self.refuse(ErrorCode::Malformed, message.into(), close::PROTOCOL_ERROR).await);
                }
                Ok(Some(Ok(Frame::Text(text)))) => break text,
            }
        };
        let hello = match decode::<EdgeMessage>(&text) {
            Ok(message) => message,
            Err(error) => {
                let message = match &error {
                    DecodeError::UnsupportedVersion { got } => {
                        format!("protocol version {got} is not supported: this server speaks version {VERSION}")
                    }
                    DecodeError::MissingVersion => {
                        format!("the edge_hello names no protocol version: this server speaks version {VERSION}")
                    }
                    other => format!("the first frame must be edge_hello: {other}"),
                };
                return Err(self.refuse(error.code(), message, close::PROTOCOL_ERROR).await);
            }
        };
        let EdgeMessage::EdgeHello { edge_id, public_key, applied_revision, edge_version } = hello else {
            let message = format!("the first frame must be edge_hello, not {}", message_type(&hello));
            return Err(self.refuse(ErrorCode::Unexpected, message, close::PROTOCOL_ERROR).await);
        };
        if edge_id != self.edge.id {
            let message = format!("edge_hello names edge {edge_id}, but the credential is edge {}'s", self.edge.id);
            return Err(self.refuse(ErrorCode::Unexpected, message, close::POLICY_VIOLATION).await);
        }
        if self.edge.status.public_key.as_deref() != Some(public_key.as_str()) {
            let message = "edge_hello carries another public key than the edge enrolled with; enroll again".to_owned();
            return Err(self.refuse(ErrorCode::Unexpected, message, close::POLICY_VIOLATION).await);
        }
        tracing::info!(%edge_version, ?applied_revision, "edge said hello");
        self.sent = SentConfig::after(applied_revision);
        Ok(())
    }

    /// Serves a session that passed `edge_hello`: welcome, configuration, then events until
    /// it ends.
    async fn connected<Rx, E>(&mut self, rx: &mut Rx, registration: &mut Registration<EdgeId>) -> Result<(), Ended>
    where
        Rx: Stream<Item = Result<Frame, E>> + Unpin,
        E: Display,
    {
        match self.edges.db.edge_connected(self.edge.id, self.session_id).await {
            Ok(true) => {}
            Ok(false) => return Err(self.deleted().await),
            Err(error) => return Err(self.failed(&error).await),
        }
        let tunnel_cidr = match self.edges.db.pool_tunnel_cidr(self.edge.spec.pool_id).await {
            Ok(cidr) => cidr,
            Err(error) => return Err(self.failed(&error).await),
        };
        self.send(&EdgeServerMessage::EdgeWelcome {
            edge_id: self.edge.id,
            tunnel_address: self.edge.status.tunnel_address,
            tunnel_cidr: tunnel_cidr.net(),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            ping_interval_seconds: Some(self.edges.config.ping_interval.as_secs().max(1)),
        })
        .await?;
        self.push_config().await?;
        loop {
            let deadline = self.heartbeat.deadline();
            tokio::select! {
                biased;
                _ = &mut registration.evicted => {
                    let message = "another session of this edge connected; this one is closed".to_owned();
                    self.send(&EdgeServerMessage::Error { code: ErrorCode::Replaced, message }).await?;
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
                        self.reject(ErrorCode::Malformed, message).await?;
                    }
                    Some(Ok(Frame::Control)) => {}
                },
                () = registration.wake.notified() => self.push_config().await?,
                () = sleep_until(deadline) => match self.heartbeat.on_deadline(Instant::now()) {
                    Beat::Ping(nonce) => self.send(&EdgeServerMessage::Ping { nonce }).await?,
                    Beat::Dead => {
                        let message = "no pong in time; closing the session".to_owned();
                        // The edge is probably gone; whether it hears this does not matter.
                        let _ = self.send(&EdgeServerMessage::Error { code: ErrorCode::Timeout, message }).await;
                        self.close(close::TIMEOUT, "ping timeout").await;
                        return Err(Ended::TimedOut);
                    }
                    Beat::Idle => {}
                },
            }
        }
    }

    /// Reads the configuration again and sends it if it changed since the last one sent.
    async fn push_config(&mut self) -> Result<(), Ended> {
        let inputs = match self.edges.db.edge_inputs(self.edge.id).await {
            Ok(Some(inputs)) => inputs,
            Ok(None) => return Err(self.deleted().await),
            Err(error) => return Err(self.failed(&error).await),
        };
        let pool = self.edge.spec.pool_id;
        let (generation, challenges) = self.edges.board.snapshot(pool);
        match self.sent.next(&inputs, challenges) {
            Some(config) => {
                self.send(&config).await?;
                if self.generations.len() == GENERATIONS_KEPT {
                    self.generations.pop_front();
                }
                self.generations.push_back((self.sent.revision(), generation));
            }
            None => {
                // The same configuration stands for this generation too (challenges that came
                // and went before the session woke); if the edge has it, it has this one.
                if let Some(last) = self.generations.back_mut() {
                    last.1 = last.1.max(generation);
                    if last.0 <= self.acked {
                        self.edges.board.acked(pool, self.edge.id, last.1);
                    }
                }
            }
        }
        Ok(())
    }

    /// Tells the challenge board which generation of challenges the edge now serves.
    fn challenges_acked(&mut self, revision: Revision) {
        self.acked = self.acked.max(revision);
        let generation = self.generations.iter().filter(|(sent, _)| *sent <= revision).map(|(_, g)| *g).max();
        if let Some(generation) = generation {
            self.edges.board.acked(self.edge.spec.pool_id, self.edge.id, generation);
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Ended> {
        let message = match decode::<EdgeMessage>(text) {
            Ok(message) => message,
            Err(error) => return self.reject(error.code(), error.to_string()).await,
        };
        match message {
            EdgeMessage::EdgeHello { .. } => {
                self.reject(ErrorCode::Unexpected, "edge_hello was already received".into()).await?;
            }
            EdgeMessage::Ack { revision } => {
                if revision > self.sent.revision() {
                    let message =
                        format!("ack of revision {revision}, but the latest revision sent is {}", self.sent.revision());
                    return self.reject(ErrorCode::Unexpected, message).await;
                }
                self.challenges_acked(revision);
                match self.edges.db.record_edge_applied(self.edge.id, revision).await {
                    Ok(true) => tracing::debug!(revision, "applied"),
                    Ok(false) => tracing::debug!(revision, "ignored a stale ack"),
                    Err(error) => tracing::warn!(%error, "cannot record an ack"),
                }
            }
            EdgeMessage::Pong { nonce } => {
                if self.heartbeat.on_pong(nonce) && self.last_seen_write.elapsed() >= self.edges.config.seen_interval {
                    self.last_seen_write = Instant::now();
                    if let Err(error) = self.edges.db.edge_seen(self.edge.id, self.session_id).await {
                        tracing::warn!(%error, "cannot record when the edge was seen");
                    }
                }
            }
            EdgeMessage::Error { code, message } => {
                // Never answered, so that errors cannot bounce between the two peers.
                let message = bounded(message, MAX_MESSAGE_BYTES);
                tracing::warn!(code = code.as_str(), %message, "the edge could not handle a frame");
            }
        }
        Ok(())
    }

    async fn send(&mut self, message: &EdgeServerMessage) -> Result<(), Ended> {
        let frame = Frame::Text(encode(message));
        match timeout(self.edges.config.send_timeout, self.tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::SendFailed),
            Err(_) => {
                tracing::info!("writing to the edge took too long");
                Err(Ended::SendFailed)
            }
        }
    }

    /// Answers a frame the session cannot take with an error frame, and goes on.
    async fn reject(&mut self, code: ErrorCode, message: String) -> Result<(), Ended> {
        tracing::warn!(code = code.as_str(), %message, "rejected a frame");
        self.send(&EdgeServerMessage::Error { code, message }).await
    }

    /// Answers a bad start with an error frame and closes.
    async fn refuse(&mut self, code: ErrorCode, message: String, close_code: u16) -> Ended {
        tracing::warn!(code = code.as_str(), %message, "refused an edge session");
        if self.send(&EdgeServerMessage::Error { code, message: message.clone() }).await.is_ok() {
            self.close(close_code, &message).await;
        }
        Ended::Refused
    }

    async fn deleted(&mut self) -> Ended {
        let message = "the edge was deleted".to_owned();
        if self.send(&EdgeServerMessage::Error { code: ErrorCode::Unexpected, message }).await.is_ok() {
            self.close(close::POLICY_VIOLATION, "the edge was deleted").await;
        }
        Ended::DeviceDeleted
    }

    async fn failed(&mut self, error: &crate::db::StoreError) -> Ended {
        tracing::error!(%error, "the edge session failed");
        let message = "the server failed; reconnect later".to_owned();
        if self.send(&EdgeServerMessage::Error { code: ErrorCode::Internal, message }).await.is_ok() {
            self.close(close::INTERNAL_ERROR, "server error").await;
        }
        Ended::Failed
    }

    /// Sends a close frame, best effort: the session ends either way.
    async fn close(&mut self, code: u16, reason: &str) {
        // Close reasons must fit a control frame (125 bytes with the code).
        let reason = bounded(reason.to_owned(), 120);
        let _ = timeout(self.edges.config.send_timeout, self.tx.send(Frame::Close(Some((code, reason))))).await;
    }
}

/// The `type` of a message, for error texts.
fn message_type(message: &EdgeMessage) -> &'static str {
    match message {
        EdgeMessage::EdgeHello { .. } => "edge_hello",
        EdgeMessage::Ack { .. } => "ack",
        EdgeMessage::Pong { .. } => "pong",
        EdgeMessage::Error { .. } => "error",
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
    use std::time::Duration;

    use edgible::model::{DevicePoolSpec, DeviceSpec, DeviceState, EdgeSpec, PlacementSpec};
    use futures::channel::mpsc;

    use super::*;
    use crate::secrets::NewSecret;

    const DEVICE_KEY: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=";
    const EDGE_KEY: &str = "ZWRnZWRnZWRnZWRnZWRnZWRnZWRnZWRnZWRnZWRnZWQ=";

    /// A database with one enrolled device and one enrolled edge in the same pool.
    struct Fixture {
        _dir: tempfile::TempDir,
        state: crate::AppState,
        device: edgible::model::Device,
        edge: Edge,
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
        let expires_at = chrono::Utc::now() + chrono::TimeDelta::hours(1);
        let token = NewSecret::enrollment_token();
        let spec = DeviceSpec { name: "laptop".parse().expect("name"), pool_id: pool.id, labels: Default::default() };
        db.create_device(org, &spec, &token, expires_at).await.expect("device");
        let device = db.enroll(&token.sha256, DEVICE_KEY, &NewSecret::device_credential()).await.expect("enrolled");
        let token = NewSecret::edge_enrollment_token();
        let spec = EdgeSpec {
            name: "gateway".parse().expect("name"),
            pool_id: pool.id,
            endpoint: "203.0.113.1:51820".parse().expect("endpoint"),
        };
        db.create_edge(org, &spec, &token, expires_at).await.expect("edge");
        let edge = db.enroll_edge(&token.sha256, EDGE_KEY, &NewSecret::edge_credential()).await.expect("enrolled");
        Fixture { _dir: dir, state: crate::AppState::new(db), device, edge: edge.edge }
    }

    fn hello(edge: &Edge) -> String {
        encode(&EdgeMessage::EdgeHello {
            edge_id: edge.id,
            public_key: EDGE_KEY.into(),
            applied_revision: None,
            edge_version: "t".into(),
        })
    }

    async fn next_message(frames: &mut mpsc::UnboundedReceiver<Frame>) -> EdgeServerMessage {
        match frames.next().await {
            Some(Frame::Text(text)) => decode(&text).expect("the server sends valid frames"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_session_sends_welcome_config_and_only_changed_configs() {
        let fixture = fixture().await;
        let edges = fixture.state.edges().clone();
        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        let session = tokio::spawn(run(edges.clone(), fixture.edge.clone(), to_test, from_test));
        to_server.unbounded_send(Ok(Frame::Text(hello(&fixture.edge)))).expect("queued");
        let EdgeServerMessage::EdgeWelcome { tunnel_address, tunnel_cidr, .. } = next_message(&mut frames).await else {
            panic!("expected a welcome");
        };
        assert_eq!(tunnel_address, fixture.edge.status.tunnel_address);
        assert_eq!(tunnel_cidr, "100.96.0.0/24".parse::<ipnet::Ipv4Net>().expect("a network"));
        let EdgeServerMessage::EdgeConfig { revision: first, peers, routes, .. } = next_message(&mut frames).await
        else {
            panic!("expected the configuration");
        };
        assert_eq!(peers.iter().map(|peer| peer.device_id).collect::<Vec<_>>(), [fixture.device.id]);
        assert!(routes.is_empty());

        // A wake-up that changes nothing sends nothing.
        edges.hub.wake(&[fixture.edge.id]);
        let nothing = tokio::time::timeout(Duration::from_millis(100), frames.next()).await;
        assert!(nothing.is_err(), "an unchanged configuration was sent again: {nothing:?}");

        // A placement written through the database wakes the session, which sends the routes.
        let db = &edges.db;
        let org = fixture.device.organization_id;
        let spec = serde_json::json!({
            "name": "web", "hostnames": ["web.example.test"], "workload": {"process": {"command": "/bin/web"}}, "port": 80
        });
        let application = db
            .create_application(org, &edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec"))
            .await
            .expect("application");
        let placement = PlacementSpec::ServingDevice { application_id: application.id, device_id: fixture.device.id };
        db.create_placement(org, &placement).await.expect("placement");
        let EdgeServerMessage::EdgeConfig { revision, routes, .. } = next_message(&mut frames).await else {
            panic!("expected a new configuration");
        };
        assert!(revision > first);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].hostname.as_str(), "web.example.test");
        assert!(!routes[0].online, "the device's agent is not connected");

        // The ack is recorded; leaving marks the edge offline.
        to_server.unbounded_send(Ok(Frame::Text(encode(&EdgeMessage::Ack { revision })))).expect("queued");
        drop(to_server);
        assert_eq!(session.await.expect("the session task"), Ended::Disconnected);
        let edge = db.edge(org, fixture.edge.id).await.expect("edge");
        assert_eq!(edge.status.applied_revision, Some(revision));
        assert_eq!(edge.status.state, DeviceState::Offline);
        assert!(edges.hub.is_empty());
    }

    #[tokio::test]
    async fn a_hello_for_another_edge_is_refused() {
        let fixture = fixture().await;
        let (to_server, from_test) = mpsc::unbounded::<Result<Frame, Infallible>>();
        let (to_test, mut frames) = mpsc::unbounded::<Frame>();
        let mut other = fixture.edge.clone();
        other.id = EdgeId::new();
        to_server.unbounded_send(Ok(Frame::Text(hello(&other)))).expect("queued");
        let ended = run(fixture.state.edges().clone(), fixture.edge.clone(), to_test, from_test).await;
        assert_eq!(ended, Ended::Refused);
        let EdgeServerMessage::Error { code, message } = next_message(&mut frames).await else {
            panic!("not an error")
        };
        assert_eq!(code, ErrorCode::Unexpected);
        assert!(message.contains("names edge"), "{message}");
        assert!(matches!(frames.next().await, Some(Frame::Close(Some((close::POLICY_VIOLATION, _))))));
    }
}
