//! The edge as a client of the server's hub: one authenticated WebSocket
//! (`GET /v1/edge/connect`, `Authorization: Bearer <credential>`) that brings the edge its
//! WireGuard peers and its route table as pushed, versioned configurations.
//!
//! - [`plan`]: the pure conversion of an `edge_config` into peers and a route table.
//! - [`session`]: one session over any sink and stream of WebSocket messages.
//! - [`run`] (here): connect, run a session, and reconnect after exponential backoff with full
//!   jitter ([`crate::backoff`]); a session that stayed up for `reset_after` resets the backoff.
//!
//! The peers go to a [`PeerSet`] (the real one is [`crate::tunnel::EdgeTunnel`]), the routes to
//! [`crate::route_source::SharedRoutes`], the ACME HTTP-01 challenges to the HTTP port's
//! [`crate::acme_http::ChallengeStore`]. While the server is unreachable the edge keeps serving
//! the last configuration it applied.

pub mod plan;
pub mod session;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use edgible::model::{EdgeId, Revision};
use edgible::protocol::MAX_FRAME_BYTES;
use futures::StreamExt as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, tungstenite};
use url::Url;

use self::plan::EdgePlan;
pub use self::session::SessionContext;
use self::session::{SessionEnd, stopped};
use crate::backoff::{Backoff, full_jitter};
use crate::metrics::{MetricSource, write_family};

/// The path of the edges' push endpoint, below the server's base URL.
pub const CONNECT_PATH: &str = edgible::protocol::EDGE_CONNECT_PATH;

/// The largest message the transport reads: twice the protocol's limit, so that a frame between
/// the two reaches the decoder and is answered as too large instead of breaking the connection.
const TRANSPORT_LIMIT: usize = 2 * MAX_FRAME_BYTES;

/// Timing of the hub session.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The ceiling of the first reconnect delay.
    pub reconnect_initial: Duration,
    /// The largest reconnect delay ceiling.
    pub reconnect_max: Duration,
    /// A session that stayed up this long resets the backoff.
    pub reset_after: Duration,
    /// The longest a connection attempt (TCP, TLS, upgrade) may take.
    pub connect_timeout: Duration,
    /// How long the server may take to answer `edge_hello` with `edge_welcome`.
    pub welcome_timeout: Duration,
    /// How long writing one frame may take.
    pub send_timeout: Duration,
    /// The ping interval when the welcome does not say.
    pub default_ping_interval: Duration,
    /// After this many ping intervals without any frame, the server counts as gone.
    pub missed_pings: u32,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
            welcome_timeout: Duration::from_secs(15),
            send_timeout: Duration::from_secs(10),
            default_ping_interval: Duration::from_secs(20),
            missed_pings: 3,
        }
    }
}

/// What `edge_hello` says about this edge.
#[derive(Debug, Clone)]
pub struct HelloParams {
    pub edge_id: EdgeId,
    /// The WireGuard public key (base64), as enrolled.
    pub public_key: String,
    pub edge_version: String,
}

/// Where the peers of each configuration go.
pub trait PeerSet: Send + Sync {
    /// Makes the tunnel run `plan.address` with exactly `plan.peers`, keeping the sessions of
    /// peers that did not change.
    fn apply(&self, plan: &EdgePlan) -> Result<(), PeerSetError>;
}

/// Why the peers could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerSetError(pub String);

/// The hub session's numbers, for the admin port.
#[derive(Debug, Default)]
pub struct HubStats {
    connected: AtomicBool,
    applied: AtomicU64,
    refused: AtomicU64,
    revision: AtomicU64,
}

impl HubStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn configs_applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn configs_refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    fn count_applied(&self, revision: Revision) {
        self.applied.fetch_add(1, Ordering::Relaxed);
        self.revision.store(revision, Ordering::Relaxed);
    }

    fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

impl MetricSource for HubStats {
    fn write_metrics(&self, out: &mut String) {
        write_family(out, "edgible_edge_hub_connected", "gauge", "1 while the hub session is established, else 0.");
        let _ = writeln!(out, "edgible_edge_hub_connected {}", u8::from(self.is_connected()));
        write_family(
            out,
            "edgible_edge_hub_configs_applied_total",
            "counter",
            "Edge configurations applied (and acknowledged).",
        );
        let _ = writeln!(out, "edgible_edge_hub_configs_applied_total {}", self.configs_applied());
        write_family(
            out,
            "edgible_edge_hub_configs_refused_total",
            "counter",
            "Edge configurations refused as invalid (the previous one kept running).",
        );
        let _ = writeln!(out, "edgible_edge_hub_configs_refused_total {}", self.configs_refused());
        write_family(
            out,
            "edgible_edge_hub_config_revision",
            "gauge",
            "The revision of the configuration applied last.",
        );
        let _ = writeln!(out, "edgible_edge_hub_config_revision {}", self.revision.load(Ordering::Relaxed));
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid server URL {url:?}: {message}")]
    InvalidServer { url: String, message: String },
    /// The server answered the upgrade with an error status (an unknown credential, a
    /// deleted edge).
    #[error("the server refused the hub connection ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("cannot connect to {url}: {message}")]
    Transport { url: String, message: String },
}

/// The URL of the edge push endpoint of the server at `server` (`http(s)://host[:port][/prefix]`).
pub fn connect_url(server: &str) -> Result<Url, ConnectError> {
    edgible::protocol::hub_url(server, CONNECT_PATH)
        .map_err(|message| ConnectError::InvalidServer { url: server.to_owned(), message })
}

/// Dials the server's edge endpoint: `ws://` for `http://` servers, `wss://` over rustls
/// (the system's and the Mozilla roots) for `https://` ones.
#[derive(Debug, Clone)]
pub struct HubConnector {
    url: Url,
    credential: String,
}

/// The socket type of an open session.
type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl HubConnector {
    pub fn new(server: &str, credential: &str) -> Result<Self, ConnectError> {
        Ok(Self { url: connect_url(server)?, credential: credential.to_owned() })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    async fn connect(&self) -> Result<Socket, ConnectError> {
        let transport = |message: String| ConnectError::Transport { url: self.url.to_string(), message };
        let mut request = self.url.as_str().into_client_request().map_err(|error| transport(error.to_string()))?;
        let authorization = HeaderValue::from_str(&format!("Bearer {}", self.credential))
            .map_err(|_| transport("the edge credential is not a valid header value".to_owned()))?;
        request.headers_mut().insert(header::AUTHORIZATION, authorization);
        let config =
            WebSocketConfig::default().max_message_size(Some(TRANSPORT_LIMIT)).max_frame_size(Some(TRANSPORT_LIMIT));
        let connector: Option<Connector> = None;
        // `true`: no Nagle delay for small frames (acks, pongs).
        let (socket, _response) =
            tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector).await.map_err(
                |error| match error {
                    tungstenite::Error::Http(response) => ConnectError::Refused {
                        status: response.status().as_u16(),
                        message: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                            .trim()
                            .to_owned(),
                    },
                    other => transport(other.to_string()),
                },
            )?;
        Ok(socket)
    }
}

/// Keeps a session with the server until `shutdown` turns true (or its sender is dropped).
/// `context` says what the sessions change (peers, routes, challenges) and count.
pub async fn run(context: &SessionContext<'_>, connector: &HubConnector, mut shutdown: watch::Receiver<bool>) {
    let config = context.config;
    let mut backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
    let mut applied: Option<Revision> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = tokio::select! {
            attempt = tokio::time::timeout(config.connect_timeout, connector.connect()) => attempt,
            () = stopped(&mut shutdown) => return,
        };
        match attempt {
            Ok(Ok(socket)) => {
                let (tx, rx) = socket.split();
                let outcome = session::run(context, &mut applied, tx, rx, &mut shutdown).await;
                if outcome.end == SessionEnd::Shutdown {
                    return;
                }
                if outcome.welcomed_at.is_some_and(|at| at.elapsed() >= config.reset_after) {
                    backoff.reset();
                }
                if session::is_refusal(&outcome.end) {
                    tracing::error!("{}", outcome.end);
                } else {
                    tracing::warn!("{}", outcome.end);
                }
            }
            Ok(Err(error @ ConnectError::Refused { .. })) => tracing::error!(%error, "cannot open the hub session"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot open the hub session"),
            Err(_) => tracing::warn!(url = %connector.url(), "connecting to the hub took too long"),
        }
        let delay = backoff.failure(full_jitter);
        tracing::info!(
            delay_seconds = delay.as_secs_f64(),
            attempt = backoff.failures(),
            "reconnecting to the hub after a delay"
        );
        let wake = Instant::now() + delay;
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn server_urls_become_edge_endpoint_urls() {
        for (server, expected) in [
            ("http://127.0.0.1:7070", "ws://127.0.0.1:7070/v1/edge/connect"),
            ("https://edgible.example.com/", "wss://edgible.example.com/v1/edge/connect"),
            ("https://example.com/edgible?x=1", "wss://example.com/edgible/v1/edge/connect"),
        ] {
            assert_eq!(connect_url(server).unwrap().as_str(), expected);
        }
        for bad in ["ftp://example.com", "not a url"] {
            assert!(matches!(connect_url(bad), Err(ConnectError::InvalidServer { .. })), "{bad}");
        }
    }

    #[test]
    fn stats_render_as_prometheus_families() {
        let stats = HubStats::new();
        stats.set_connected(true);
        stats.count_applied(7);
        let mut out = String::new();
        stats.write_metrics(&mut out);
        assert!(out.contains("edgible_edge_hub_connected 1\n"), "{out}");
        assert!(out.contains("edgible_edge_hub_configs_applied_total 1\n"), "{out}");
        assert!(out.contains("edgible_edge_hub_config_revision 7\n"), "{out}");
    }
}
