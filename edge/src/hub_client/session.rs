//! One hub session over any sink and stream of WebSocket messages, so that it is tested
//! without sockets.
//!
//! Order: send `edge_hello`; wait for `edge_welcome` (answering pings meanwhile); then for
//! each `edge_config`: plan it ([`super::plan`]), replace the ACME HTTP-01 challenges the
//! HTTP port answers, set the tunnel's peers, replace the route table, and `ack` its revision
//! (the server tells the CA a challenge is ready only once the edges acknowledged it). Pings
//! get a `pong`. A frame that cannot be read gets an `error` frame and the session goes on; a
//! configuration that cannot be planned, or whose challenges are invalid (a wildcard, a
//! malformed token), gets an `error` frame, is not acknowledged, and the edge keeps what it
//! runs. A tunnel that cannot
//! take the peers ends the session: the reconnect brings the whole configuration again.

use std::fmt;
use std::time::Duration;

use edgible::model::Revision;
use edgible::protocol::v1::{EdgeMessage, EdgeServerMessage, ErrorCode};
use edgible::protocol::{self, close};
use futures::{Sink, SinkExt as _, Stream, StreamExt as _};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::plan::plan;
use super::{HelloParams, HubConfig, HubStats, PeerSet};
use crate::acme_http::ChallengeStore;
use crate::route_source::SharedRoutes;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The shutdown signal: the session closed the socket itself.
    Shutdown,
    /// The server closed the socket, with its close code and reason if it gave them.
    Closed { code: Option<u16>, reason: String },
    /// The connection broke or ended without a close.
    Disconnected(String),
    /// Nothing came from the server for too long (no welcome, or no frame for several ping
    /// intervals).
    TimedOut(&'static str),
    /// The welcome named another edge than the one this credential enrolled.
    WrongEdge(String),
    /// The tunnel could not be started or take the peers.
    ApplyFailed(String),
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown => f.write_str("the hub session was shut down"),
            Self::Closed { code, reason } => {
                write!(f, "the server closed the hub session (code {code:?}): {reason}")
            }
            Self::Disconnected(error) => write!(f, "the hub session was lost: {error}"),
            Self::TimedOut(what) => write!(f, "the hub session timed out waiting for {what}"),
            Self::WrongEdge(edge) => write!(f, "the server welcomed edge {edge}, not this one; enroll the edge again"),
            Self::ApplyFailed(error) => write!(f, "the edge configuration could not be applied: {error}"),
        }
    }
}

/// What a session did, for the reconnect loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOutcome {
    pub end: SessionEnd,
    /// When the welcome arrived, if it did.
    pub welcomed_at: Option<Instant>,
}

/// What the session changes and counts.
pub struct SessionContext<'a> {
    pub config: &'a HubConfig,
    pub hello: &'a HelloParams,
    pub peers: &'a dyn PeerSet,
    pub routes: &'a SharedRoutes,
    /// The challenges the HTTP port answers.
    pub challenges: &'a ChallengeStore,
    pub stats: &'a HubStats,
}

/// Runs one session until it ends. `applied` is the revision applied so far (carried across
/// sessions by the caller) and is updated in place.
pub async fn run<Tx, Rx, TxError, RxError>(
    context: &SessionContext<'_>,
    applied: &mut Option<Revision>,
    mut tx: Tx,
    mut rx: Rx,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionOutcome
where
    Tx: Sink<Message, Error = TxError> + Unpin,
    Rx: Stream<Item = Result<Message, RxError>> + Unpin,
    TxError: fmt::Display,
    RxError: fmt::Display,
{
    let mut session = Session { context, tx: &mut tx, welcomed_at: None };
    let end = session.drive(applied, &mut rx, shutdown).await;
    context.stats.set_connected(false);
    if end == SessionEnd::Shutdown {
        let _ = session.tx.send(Message::Close(None)).await;
    }
    SessionOutcome { end, welcomed_at: session.welcomed_at }
}

struct Session<'s, 'c, Tx> {
    context: &'s SessionContext<'c>,
    tx: &'s mut Tx,
    welcomed_at: Option<Instant>,
}

/// One frame from the server, or why none came.
enum Received {
    Message(EdgeServerMessage),
    /// Handled already (answered with an error frame, or a WebSocket control frame).
    Nothing,
    End(SessionEnd),
}

impl<Tx, TxError> Session<'_, '_, Tx>
where
    Tx: Sink<Message, Error = TxError> + Unpin,
    TxError: fmt::Display,
{
    async fn drive<Rx, RxError>(
        &mut self,
        applied: &mut Option<Revision>,
        rx: &mut Rx,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd
    where
        Rx: Stream<Item = Result<Message, RxError>> + Unpin,
        RxError: fmt::Display,
    {
        let config = self.context.config;
        let hello = EdgeMessage::EdgeHello {
            edge_id: self.context.hello.edge_id,
            public_key: self.context.hello.public_key.clone(),
            applied_revision: *applied,
            edge_version: self.context.hello.edge_version.clone(),
        };
        if let Err(end) = self.send(&hello).await {
            return end;
        }

        // Until the welcome.
        let deadline = Instant::now() + config.welcome_timeout;
        let (tunnel_address, tunnel_cidr, ping_interval) = loop {
            let received = tokio::select! {
                received = tokio::time::timeout_at(deadline, self.receive(rx)) => received,
                () = stopped(shutdown) => return SessionEnd::Shutdown,
            };
            match received {
                Err(_) => return SessionEnd::TimedOut("the welcome"),
                Ok(Received::End(end)) => return end,
                Ok(Received::Nothing) => {}
                Ok(Received::Message(EdgeServerMessage::EdgeWelcome {
                    edge_id,
                    tunnel_address,
                    tunnel_cidr,
                    ping_interval_seconds,
                    server_version,
                })) => {
                    if edge_id != self.context.hello.edge_id {
                        return SessionEnd::WrongEdge(edge_id.to_string());
                    }
                    tracing::info!(%tunnel_address, %tunnel_cidr, %server_version, "hub session established");
                    let interval = ping_interval_seconds
                        .filter(|seconds| *seconds > 0)
                        .map_or(config.default_ping_interval, Duration::from_secs);
                    break (tunnel_address, tunnel_cidr, interval);
                }
                Ok(Received::Message(EdgeServerMessage::Ping { nonce })) => {
                    if let Err(end) = self.send(&EdgeMessage::Pong { nonce }).await {
                        return end;
                    }
                }
                Ok(Received::Message(EdgeServerMessage::Error { code, message })) => {
                    tracing::warn!(code = code.as_str(), %message, "the server sent an error before the welcome");
                }
                Ok(Received::Message(other)) => {
                    if let Err(end) = self.unexpected(&other, "before edge_welcome").await {
                        return end;
                    }
                }
            }
        };
        self.welcomed_at = Some(Instant::now());
        self.context.stats.set_connected(true);

        // The server counts as gone after this long without any frame.
        let silence = ping_interval.saturating_mul(config.missed_pings.max(1));
        loop {
            let received = tokio::select! {
                received = tokio::time::timeout(silence, self.receive(rx)) => received,
                () = stopped(shutdown) => return SessionEnd::Shutdown,
            };
            let message = match received {
                Err(_) => return SessionEnd::TimedOut("any frame from the server"),
                Ok(Received::End(end)) => return end,
                Ok(Received::Nothing) => continue,
                Ok(Received::Message(message)) => message,
            };
            let sent = match message {
                EdgeServerMessage::EdgeConfig { revision, peers, routes, challenges } => {
                    if applied.is_some_and(|applied| revision < applied) {
                        tracing::warn!(%revision, "ignoring an edge configuration older than the one applied");
                        continue;
                    }
                    let planned = match plan(tunnel_address, tunnel_cidr, &peers, &routes) {
                        Ok(planned) => planned,
                        Err(error) => {
                            tracing::error!(%revision, %error, "refusing an edge configuration; keeping the current one");
                            self.context.stats.count_refused();
                            let message = format!("edge configuration {revision} refused: {error}");
                            if let Err(end) =
                                self.send(&EdgeMessage::Error { code: ErrorCode::Malformed, message }).await
                            {
                                return end;
                            }
                            continue;
                        }
                    };
                    // The whole set or nothing: a refused set keeps the previous one and the
                    // configuration is not acknowledged, like one that cannot be planned.
                    let challenge_count = challenges.len();
                    if let Err(error) = self.context.challenges.set_challenges(challenges) {
                        tracing::error!(%revision, %error, "refusing an edge configuration; keeping the current one");
                        self.context.stats.count_refused();
                        let message = format!("edge configuration {revision} refused: {error}");
                        if let Err(end) = self.send(&EdgeMessage::Error { code: ErrorCode::Malformed, message }).await {
                            return end;
                        }
                        continue;
                    }
                    // Peers first, so that no route ever points at a device the tunnel does not
                    // know yet.
                    if let Err(error) = self.context.peers.apply(&planned) {
                        return SessionEnd::ApplyFailed(error.to_string());
                    }
                    let changes = self.context.routes.replace(planned.routes);
                    tracing::info!(
                        %revision,
                        peers = planned.peers.len(),
                        route_changes = changes.len(),
                        challenges = challenge_count,
                        "applied the edge configuration"
                    );
                    *applied = Some(revision);
                    self.context.stats.count_applied(revision);
                    self.send(&EdgeMessage::Ack { revision }).await
                }
                EdgeServerMessage::Ping { nonce } => self.send(&EdgeMessage::Pong { nonce }).await,
                EdgeServerMessage::Error { code, message } => {
                    tracing::warn!(code = code.as_str(), %message, "the server sent an error");
                    Ok(())
                }
                welcome @ EdgeServerMessage::EdgeWelcome { .. } => self.unexpected(&welcome, "twice").await,
            };
            if let Err(end) = sent {
                return end;
            }
        }
    }

    /// Reads one frame and decodes it; answers undecodable ones with an error frame.
    async fn receive<Rx, RxError>(&mut self, rx: &mut Rx) -> Received
    where
        Rx: Stream<Item = Result<Message, RxError>> + Unpin,
        RxError: fmt::Display,
    {
        let text = match rx.next().await {
            None => return Received::End(SessionEnd::Disconnected("the connection ended without a close".into())),
            Some(Err(error)) => return Received::End(SessionEnd::Disconnected(error.to_string())),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = match frame {
                    Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
                    None => (None, String::new()),
                };
                return Received::End(SessionEnd::Closed { code, reason });
            }
            Some(Ok(Message::Binary(_))) => {
                let error = EdgeMessage::Error {
                    code: ErrorCode::Malformed,
                    message: "binary frames are not part of the protocol".into(),
                };
                return match self.send(&error).await {
                    Ok(()) => Received::Nothing,
                    Err(end) => Received::End(end),
                };
            }
            // The WebSocket library answers pings by itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return Received::Nothing,
        };
        match protocol::decode::<EdgeServerMessage>(text.as_str()) {
            Ok(message) => Received::Message(message),
            Err(error) => {
                tracing::warn!(%error, "the server sent a frame the edge cannot read");
                match self.send(&EdgeMessage::Error { code: error.code(), message: error.to_string() }).await {
                    Ok(()) => Received::Nothing,
                    Err(end) => Received::End(end),
                }
            }
        }
    }

    async fn unexpected(&mut self, message: &EdgeServerMessage, when: &str) -> Result<(), SessionEnd> {
        let kind = message_type(message);
        tracing::warn!(kind, when, "unexpected frame from the server");
        self.send(&EdgeMessage::Error { code: ErrorCode::Unexpected, message: format!("unexpected {kind} {when}") })
            .await
    }

    async fn send(&mut self, message: &EdgeMessage) -> Result<(), SessionEnd> {
        let frame = Message::text(protocol::encode(message));
        match tokio::time::timeout(self.context.config.send_timeout, self.tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SessionEnd::Disconnected(error.to_string())),
            Err(_) => Err(SessionEnd::TimedOut("a frame to be sent")),
        }
    }
}

fn message_type(message: &EdgeServerMessage) -> &'static str {
    match message {
        EdgeServerMessage::EdgeWelcome { .. } => "edge_welcome",
        EdgeServerMessage::EdgeConfig { .. } => "edge_config",
        EdgeServerMessage::Ping { .. } => "ping",
        EdgeServerMessage::Error { .. } => "error",
    }
}

/// Completes once `shutdown` is true or its sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Whether the server's close means this edge should not hurry back.
pub fn is_refusal(end: &SessionEnd) -> bool {
    matches!(end, SessionEnd::WrongEdge(_))
        || matches!(end, SessionEnd::Closed { code: Some(code), .. } if *code == close::POLICY_VIOLATION || *code == close::REPLACED)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::convert::Infallible;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use edgible::model::{DeviceId, EdgeId};
    use edgible::protocol::v1::{AcmeChallenge, DevicePeer, EdgeRoute};
    use edgible::tunnel::PrivateKey;
    use futures::channel::mpsc;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    use super::*;
    use crate::hub_client::PeerSetError;
    use crate::hub_client::plan::EdgePlan;

    /// Keeps the plans it was given, as the tunnel would take their peers; fails on demand.
    #[derive(Default)]
    struct RecordedPeers {
        plans: Mutex<Vec<EdgePlan>>,
        fail: bool,
    }

    impl PeerSet for RecordedPeers {
        fn apply(&self, plan: &EdgePlan) -> Result<(), PeerSetError> {
            if self.fail {
                return Err(PeerSetError("cannot create the TUN interface".into()));
            }
            self.plans.lock().unwrap().push(plan.clone());
            Ok(())
        }
    }

    struct Harness {
        config: HubConfig,
        hello: HelloParams,
        peers: RecordedPeers,
        routes: SharedRoutes,
        challenges: ChallengeStore,
        stats: HubStats,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                config: HubConfig {
                    welcome_timeout: Duration::from_secs(5),
                    default_ping_interval: Duration::from_secs(5),
                    ..HubConfig::default()
                },
                hello: HelloParams {
                    edge_id: EdgeId::new(),
                    public_key: PrivateKey::generate().unwrap().public_key().to_base64(),
                    edge_version: "test".into(),
                },
                peers: RecordedPeers::default(),
                routes: SharedRoutes::default(),
                challenges: ChallengeStore::new(),
                stats: HubStats::default(),
            }
        }

        /// Runs a session over channels: what the test queued in `from_server` is what the
        /// server sent; the returned receiver holds what the edge sent.
        async fn run(
            &self,
            applied: &mut Option<Revision>,
            from_server: Vec<Message>,
            stay_open: bool,
        ) -> (SessionOutcome, Vec<EdgeMessage>, Vec<Message>) {
            let (to_edge, rx) = mpsc::unbounded::<Result<Message, Infallible>>();
            let (tx, mut sent) = mpsc::unbounded::<Message>();
            for message in from_server {
                to_edge.unbounded_send(Ok(message)).unwrap();
            }
            let keep = stay_open.then_some(to_edge);
            let (_stop, mut shutdown) = watch::channel(false);
            let context = SessionContext {
                config: &self.config,
                hello: &self.hello,
                peers: &self.peers,
                routes: &self.routes,
                challenges: &self.challenges,
                stats: &self.stats,
            };
            let outcome = run(&context, applied, tx, rx, &mut shutdown).await;
            drop(keep);
            let mut decoded = Vec::new();
            let mut raw = Vec::new();
            while let Ok(message) = sent.try_recv() {
                if let Message::Text(text) = &message {
                    decoded.push(protocol::decode::<EdgeMessage>(text.as_str()).unwrap());
                }
                raw.push(message);
            }
            (outcome, decoded, raw)
        }

        fn welcome(&self) -> Message {
            frame(&EdgeServerMessage::EdgeWelcome {
                edge_id: self.hello.edge_id,
                tunnel_address: Ipv4Addr::new(100, 96, 0, 1),
                tunnel_cidr: "100.96.0.0/16".parse().unwrap(),
                server_version: "test".into(),
                ping_interval_seconds: Some(20),
            })
        }
    }

    fn frame(message: &EdgeServerMessage) -> Message {
        Message::text(protocol::encode(message))
    }

    fn device(last: u8) -> DevicePeer {
        DevicePeer {
            device_id: DeviceId::new(),
            public_key: PrivateKey::generate().unwrap().public_key().to_base64(),
            tunnel_address: Ipv4Addr::new(100, 96, 0, last),
        }
    }

    fn config(revision: Revision, peers: &[DevicePeer], routes: &[(&str, usize, bool)]) -> Message {
        let routes = routes
            .iter()
            .map(|(name, peer, online)| EdgeRoute {
                hostname: name.parse().unwrap(),
                device_id: peers[*peer].device_id,
                tunnel_address: peers[*peer].tunnel_address,
                online: *online,
            })
            .collect();
        frame(&EdgeServerMessage::EdgeConfig { revision, peers: peers.to_vec(), routes, challenges: Vec::new() })
    }

    fn close(code: u16) -> Message {
        Message::Close(Some(CloseFrame { code: code.into(), reason: "bye".into() }))
    }

    #[tokio::test]
    async fn configurations_are_applied_acknowledged_and_pings_answered() {
        let harness = Harness::new();
        let (one, two) = (device(2), device(3));
        let frames = vec![
            harness.welcome(),
            config(5, &[one.clone(), two.clone()], &[("a.example.test", 0, true), ("*.b.example.test", 1, false)]),
            frame(&EdgeServerMessage::Ping { nonce: 42 }),
            config(6, std::slice::from_ref(&two), &[("b.example.test", 0, true)]),
            close(1000),
        ];
        let mut applied = None;
        let (outcome, sent, _) = harness.run(&mut applied, frames, false).await;

        assert_eq!(outcome.end, SessionEnd::Closed { code: Some(1000), reason: "bye".into() });
        assert!(outcome.welcomed_at.is_some());
        let EdgeMessage::EdgeHello { edge_id, applied_revision: None, .. } = &sent[0] else { panic!("{sent:?}") };
        assert_eq!(*edge_id, harness.hello.edge_id);
        assert_eq!(
            sent[1..],
            [EdgeMessage::Ack { revision: 5 }, EdgeMessage::Pong { nonce: 42 }, EdgeMessage::Ack { revision: 6 }]
        );
        assert_eq!(applied, Some(6));

        let plans = harness.peers.plans.lock().unwrap();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].address, "100.96.0.1/16".parse::<ipnet::Ipv4Net>().unwrap());
        assert_eq!(plans[0].peers.len(), 2);
        assert_eq!(plans[1].peers.len(), 1);
        assert_eq!(plans[1].peers[0].public_key.to_base64(), two.public_key);

        let routes = harness.routes.current();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes.target("b.example.test").unwrap().device_id, two.device_id);
        assert!(routes.target("a.example.test").is_none());
        assert_eq!(harness.stats.configs_applied(), 2);
        assert!(!harness.stats.is_connected(), "the session ended");
    }

    #[tokio::test]
    async fn a_reconnect_says_what_was_applied_and_older_configurations_are_ignored() {
        let harness = Harness::new();
        let one = device(2);
        let mut applied = Some(9);
        let frames = vec![
            harness.welcome(),
            config(8, std::slice::from_ref(&one), &[("old.example.test", 0, true)]),
            config(9, std::slice::from_ref(&one), &[("same.example.test", 0, true)]),
        ];
        let (outcome, sent, _) = harness.run(&mut applied, frames, false).await;
        assert!(matches!(outcome.end, SessionEnd::Disconnected(_)), "{:?}", outcome.end);
        assert!(matches!(sent[0], EdgeMessage::EdgeHello { applied_revision: Some(9), .. }));
        // The same revision again (a full snapshot after reconnecting) is applied and acked.
        assert_eq!(sent[1..], [EdgeMessage::Ack { revision: 9 }]);
        assert!(harness.routes.current().target("old.example.test").is_none());
        assert!(harness.routes.current().target("same.example.test").is_some());
    }

    #[tokio::test]
    async fn unreadable_frames_get_error_frames_and_the_session_goes_on() {
        let harness = Harness::new();
        let one = device(2);
        let frames = vec![
            Message::text("not json"),
            harness.welcome(),
            Message::text(r#"{"v":2,"type":"ping","nonce":1}"#),
            Message::text(r#"{"v":1,"type":"surprise"}"#),
            Message::binary(vec![1, 2, 3]),
            harness.welcome(),
            config(3, std::slice::from_ref(&one), &[("a.example.test", 0, true)]),
        ];
        let (_, sent, _) = harness.run(&mut None, frames, false).await;
        let codes: Vec<ErrorCode> = sent
            .iter()
            .filter_map(|message| match message {
                EdgeMessage::Error { code, .. } => Some(*code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            [
                ErrorCode::Malformed,
                ErrorCode::UnsupportedVersion,
                ErrorCode::UnknownType,
                ErrorCode::Malformed,
                ErrorCode::Unexpected
            ]
        );
        assert_eq!(sent.last(), Some(&EdgeMessage::Ack { revision: 3 }));
    }

    #[tokio::test]
    async fn an_invalid_configuration_is_refused_and_the_current_one_kept() {
        let harness = Harness::new();
        let one = device(2);
        let mut bad = device(3);
        bad.public_key = "AAAA".into();
        let frames = vec![
            harness.welcome(),
            config(1, std::slice::from_ref(&one), &[("a.example.test", 0, true)]),
            config(2, &[one.clone(), bad], &[("b.example.test", 1, true)]),
        ];
        let mut applied = None;
        let (_, sent, _) = harness.run(&mut applied, frames, false).await;
        assert_eq!(sent[1], EdgeMessage::Ack { revision: 1 });
        let EdgeMessage::Error { code: ErrorCode::Malformed, message } = &sent[2] else { panic!("{sent:?}") };
        assert!(message.contains("peers[1].public_key"), "{message}");
        assert_eq!(sent.len(), 3, "no ack for the refused configuration");
        assert_eq!(applied, Some(1));
        assert!(harness.routes.current().target("a.example.test").is_some());
        assert_eq!(harness.stats.configs_refused(), 1);
    }

    #[tokio::test]
    async fn a_welcome_for_another_edge_or_a_failing_tunnel_ends_the_session() {
        let harness = Harness::new();
        let other = frame(&EdgeServerMessage::EdgeWelcome {
            edge_id: EdgeId::new(),
            tunnel_address: Ipv4Addr::new(100, 96, 0, 1),
            tunnel_cidr: "100.96.0.0/16".parse().unwrap(),
            server_version: "test".into(),
            ping_interval_seconds: None,
        });
        let (outcome, _, _) = harness.run(&mut None, vec![other], true).await;
        assert!(matches!(outcome.end, SessionEnd::WrongEdge(_)), "{:?}", outcome.end);
        assert!(is_refusal(&outcome.end));

        let mut failing = Harness::new();
        failing.peers.fail = true;
        let one = device(2);
        let frames = vec![failing.welcome(), config(1, std::slice::from_ref(&one), &[("a.example.test", 0, true)])];
        let mut applied = None;
        let (outcome, sent, _) = failing.run(&mut applied, frames, true).await;
        assert!(matches!(&outcome.end, SessionEnd::ApplyFailed(error) if error.contains("TUN")), "{:?}", outcome.end);
        assert_eq!(sent.len(), 1, "only the hello: nothing acknowledged");
        assert_eq!(applied, None);
        assert!(failing.routes.current().is_empty(), "no route before the tunnel has its peers");
    }

    #[tokio::test]
    async fn challenges_are_served_as_pushed_and_an_invalid_set_is_refused_whole() {
        let harness = Harness::new();
        let one = device(2);
        let challenge = |hostname: &str, token: &str| AcmeChallenge {
            hostname: hostname.parse().unwrap(),
            token: token.to_owned(),
            key_authorization: format!("{token}.thumbprint"),
        };
        let with_challenges = |revision, challenges: Vec<AcmeChallenge>| {
            frame(&EdgeServerMessage::EdgeConfig { revision, peers: vec![one.clone()], routes: Vec::new(), challenges })
        };
        let frames = vec![
            harness.welcome(),
            with_challenges(3, vec![challenge("a.example.test", "tok-1")]),
            // A wildcard cannot be validated over HTTP-01: the whole set is refused.
            with_challenges(4, vec![challenge("b.example.test", "tok-2"), challenge("*.example.test", "tok-3")]),
            close(1000),
        ];
        let mut applied = None;
        let (_, sent, _) = harness.run(&mut applied, frames, false).await;
        assert_eq!(sent[1], EdgeMessage::Ack { revision: 3 });
        let EdgeMessage::Error { code: ErrorCode::Malformed, message } = &sent[2] else { panic!("{sent:?}") };
        assert!(message.contains("edge configuration 4 refused") && message.contains("wildcard"), "{message}");
        assert_eq!(sent.len(), 3, "revision 4 is not acknowledged: {sent:?}");
        assert_eq!(applied, Some(3));
        assert_eq!(
            harness.challenges.key_authorization("a.example.test", "tok-1").as_deref(),
            Some("tok-1.thumbprint")
        );
        assert_eq!(harness.challenges.key_authorization("b.example.test", "tok-2"), None);
        assert_eq!(harness.peers.plans.lock().unwrap().len(), 1, "the refused configuration changed no peers");

        // An empty set clears them.
        let frames = vec![harness.welcome(), with_challenges(5, Vec::new()), close(1000)];
        let (_, sent, _) = harness.run(&mut applied, frames, false).await;
        assert_eq!(sent[1], EdgeMessage::Ack { revision: 5 });
        assert!(harness.challenges.is_empty());
    }

    #[tokio::test]
    async fn silence_times_out() {
        let mut harness = Harness::new();
        harness.config.welcome_timeout = Duration::from_millis(50);
        let (outcome, _, _) = harness.run(&mut None, Vec::new(), true).await;
        assert_eq!(outcome.end, SessionEnd::TimedOut("the welcome"));

        harness.config.default_ping_interval = Duration::from_millis(20);
        harness.config.missed_pings = 2;
        let welcome = frame(&EdgeServerMessage::EdgeWelcome {
            edge_id: harness.hello.edge_id,
            tunnel_address: Ipv4Addr::new(100, 96, 0, 1),
            tunnel_cidr: "100.96.0.0/16".parse().unwrap(),
            server_version: "test".into(),
            ping_interval_seconds: None,
        });
        let (outcome, _, _) = harness.run(&mut None, vec![welcome], true).await;
        assert_eq!(outcome.end, SessionEnd::TimedOut("any frame from the server"));
        assert!(outcome.welcomed_at.is_some());
    }

    #[tokio::test]
    async fn shutdown_closes_the_socket() {
        let harness = Harness::new();
        let (to_edge, rx) = mpsc::unbounded::<Result<Message, Infallible>>();
        let (tx, mut sent) = mpsc::unbounded::<Message>();
        to_edge.unbounded_send(Ok(harness.welcome())).unwrap();
        let (stop, mut shutdown) = watch::channel(false);
        let context = SessionContext {
            config: &harness.config,
            hello: &harness.hello,
            peers: &harness.peers,
            routes: &harness.routes,
            challenges: &harness.challenges,
            stats: &harness.stats,
        };
        let mut applied = None;
        let session = run(&context, &mut applied, tx, rx, &mut shutdown);
        tokio::pin!(session);
        // Connected once the welcome was handled; then stop.
        let outcome = loop {
            tokio::select! {
                outcome = &mut session => break outcome,
                () = tokio::time::sleep(Duration::from_millis(10)) => {
                    if harness.stats.is_connected() {
                        stop.send(true).unwrap();
                    }
                }
            }
        };
        assert_eq!(outcome.end, SessionEnd::Shutdown);
        let mut last = None;
        while let Ok(message) = sent.try_recv() {
            last = Some(message);
        }
        assert_eq!(last, Some(Message::Close(None)));
        drop(to_edge);
    }
}
