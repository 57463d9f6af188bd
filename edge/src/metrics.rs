//! The edge's Prometheus metrics and the admin HTTP server that exposes them (`/metrics`,
//! `/healthz`).
//!
//! Counters live in [`Metrics`], plain atomics indexed by small enums, so that every label
//! value is known in advance: an untrusted client can never create a new series (no server
//! name or address ever becomes a label). Other parts of the edge that own numbers of their
//! own implement [`MetricSource`] and are rendered on each scrape: the route table
//! ([`crate::route_source::SharedRoutes`]) and the connection limits
//! ([`crate::limits::ConnectionLimits`]), and for an enrolled edge the hub session
//! ([`crate::hub_client::HubStats`]: connected, configurations applied) and the WireGuard
//! tunnel ([`crate::tunnel::EdgeTunnel`]: peers, per-peer handshake age, labelled by device id,
//! which comes from the server, never from a client).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::sni::SniError;

/// Something that writes whole metric families (`# HELP`, `# TYPE` and samples) in the
/// Prometheus text format on every scrape.
pub trait MetricSource: Send + Sync {
    fn write_metrics(&self, out: &mut String);
}

/// Writes the `# HELP` and `# TYPE` lines that open a metric family.
pub fn write_family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// How the edge handled a TCP connection on its TLS port, decided once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Spliced to the device of an exact route.
    Routed,
    /// Spliced to the device of a wildcard route.
    RoutedWildcard,
    /// A ClientHello without a server name: `unrecognized_name` alert.
    NoServerName,
    /// A server name without a route: `unrecognized_name` alert.
    UnknownName,
    /// The route's device is offline: `internal_error` alert.
    DeviceOffline,
    /// Connecting to the route's device failed or timed out: `internal_error` alert.
    DeviceUnreachable,
    /// The first bytes are not a TLS handshake (or not a version the parser knows).
    NotTls,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// The ClientHello exceeds the parser's bound.
    TooLarge,
    /// The ClientHello is malformed.
    Malformed,
    /// The server name is not a valid host name.
    InvalidServerName,
    /// The ClientHello did not complete within the hello timeout.
    HelloTimeout,
    /// The client closed the connection before its ClientHello was complete.
    ClientClosed,
    /// Reading from the client failed before its ClientHello was complete.
    ClientError,
    /// The edge was at its global connection cap.
    GlobalLimit,
    /// The client's address was at its connection cap.
    PerIpLimit,
}

impl Outcome {
    pub const ALL: [Self; 16] = [
        Self::Routed,
        Self::RoutedWildcard,
        Self::NoServerName,
        Self::UnknownName,
        Self::DeviceOffline,
        Self::DeviceUnreachable,
        Self::NotTls,
        Self::NotClientHello,
        Self::TooLarge,
        Self::Malformed,
        Self::InvalidServerName,
        Self::HelloTimeout,
        Self::ClientClosed,
        Self::ClientError,
        Self::GlobalLimit,
        Self::PerIpLimit,
    ];

    /// The `outcome` and `reason` labels: `routed`, `refused` (an alert was sent), `abandoned`
    /// (the client never finished its hello) or `limited` (closed at once by a cap).
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Self::Routed => ("routed", "exact"),
            Self::RoutedWildcard => ("routed", "wildcard"),
            Self::NoServerName => ("refused", "no_sni"),
            Self::UnknownName => ("refused", "unknown_name"),
            Self::DeviceOffline => ("refused", "device_offline"),
            Self::DeviceUnreachable => ("refused", "device_unreachable"),
            Self::NotTls => ("refused", "not_tls"),
            Self::NotClientHello => ("refused", "not_client_hello"),
            Self::TooLarge => ("refused", "too_large"),
            Self::Malformed => ("refused", "malformed"),
            Self::InvalidServerName => ("refused", "invalid_server_name"),
            Self::HelloTimeout => ("abandoned", "hello_timeout"),
            Self::ClientClosed => ("abandoned", "client_closed"),
            Self::ClientError => ("abandoned", "client_error"),
            Self::GlobalLimit => ("limited", "global"),
            Self::PerIpLimit => ("limited", "per_ip"),
        }
    }

    /// The outcome of a ClientHello the parser refused. `Incomplete` is not final and never
    /// reaches here; it counts as malformed so that the function stays total.
    pub fn for_parse_error(error: &SniError) -> Self {
        match error {
            SniError::NotHandshake { .. } | SniError::UnsupportedVersion { .. } => Self::NotTls,
            SniError::NotClientHello { .. } => Self::NotClientHello,
            SniError::TooLarge { .. } => Self::TooLarge,
            SniError::InvalidServerName(_) => Self::InvalidServerName,
            SniError::Incomplete { .. } | SniError::Malformed(_) => Self::Malformed,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions reached their end of stream.
    Completed,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// A read or write on either side failed (a reset, a broken tunnel).
    Error,
}

impl SpliceEnd {
    pub const ALL: [Self; 3] = [Self::Completed, Self::IdleTimeout, Self::Error];

    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::IdleTimeout => "idle_timeout",
            Self::Error => "error",
        }
    }
}

/// How the HTTP port answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpOutcome {
    /// An ACME HTTP-01 challenge the edge was told about.
    Challenge,
    /// A path under `/.well-known/acme-challenge/` with no such challenge.
    ChallengeNotFound,
    /// A redirect to https.
    Redirect,
    /// A request without a usable host name.
    BadRequest,
}

impl HttpOutcome {
    pub const ALL: [Self; 4] = [Self::Challenge, Self::ChallengeNotFound, Self::Redirect, Self::BadRequest];

    pub fn label(self) -> &'static str {
        match self {
            Self::Challenge => "challenge",
            Self::ChallengeNotFound => "challenge_not_found",
            Self::Redirect => "redirect",
            Self::BadRequest => "bad_request",
        }
    }
}

/// The edge's counters. Shared by every connection through an `Arc`.
#[derive(Default)]
pub struct Metrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    splice_ends: [AtomicU64; SpliceEnd::ALL.len()],
    http: [AtomicU64; HttpOutcome::ALL.len()],
    bytes_client_to_device: AtomicU64,
    bytes_device_to_client: AtomicU64,
    spliced_active: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections ended with this outcome so far.
    pub fn outcome_count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }

    pub fn count_http(&self, outcome: HttpOutcome) {
        self.http[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn http_count(&self, outcome: HttpOutcome) -> u64 {
        self.http[outcome as usize].load(Ordering::Relaxed)
    }

    /// Bytes read from clients (and written towards devices).
    pub fn add_client_to_device(&self, bytes: u64) {
        self.bytes_client_to_device.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes read from devices (and written towards clients).
    pub fn add_device_to_client(&self, bytes: u64) {
        self.bytes_device_to_client.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn bytes_client_to_device(&self) -> u64 {
        self.bytes_client_to_device.load(Ordering::Relaxed)
    }

    pub fn bytes_device_to_client(&self) -> u64 {
        self.bytes_device_to_client.load(Ordering::Relaxed)
    }

    /// Marks a connection as spliced until the returned guard is dropped, when its end is
    /// counted.
    pub fn splice_started(self: &Arc<Self>) -> SpliceGuard {
        self.spliced_active.fetch_add(1, Ordering::Relaxed);
        SpliceGuard { metrics: Arc::clone(self), end: SpliceEnd::Error }
    }

    pub fn splice_end_count(&self, end: SpliceEnd) -> u64 {
        self.splice_ends[end as usize].load(Ordering::Relaxed)
    }

    pub fn spliced_active(&self) -> u64 {
        self.spliced_active.load(Ordering::Relaxed)
    }
}

/// Keeps a connection counted as spliced; counts how it ended when dropped. A guard dropped
/// without [`SpliceGuard::finish`] (a task cancelled at the drain deadline) counts as an error.
pub struct SpliceGuard {
    metrics: Arc<Metrics>,
    end: SpliceEnd,
}

impl SpliceGuard {
    pub fn finish(mut self, end: SpliceEnd) {
        self.end = end;
    }
}

impl Drop for SpliceGuard {
    fn drop(&mut self) {
        self.metrics.spliced_active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.splice_ends[self.end as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl MetricSource for Metrics {
    fn write_metrics(&self, out: &mut String) {
        write_family(
            out,
            "edgible_edge_connections_total",
            "counter",
            "TLS port connections by outcome (routed, refused with an alert, abandoned, limited) and reason.",
        );
        for outcome in Outcome::ALL {
            let (label, reason) = outcome.labels();
            let value = self.outcome_count(outcome);
            let _ = writeln!(out, "edgible_edge_connections_total{{outcome=\"{label}\",reason=\"{reason}\"}} {value}");
        }
        write_family(out, "edgible_edge_spliced_connections_active", "gauge", "Connections being spliced to a device.");
        let _ = writeln!(out, "edgible_edge_spliced_connections_active {}", self.spliced_active());
        write_family(
            out,
            "edgible_edge_spliced_connections_closed_total",
            "counter",
            "Spliced connections that ended, by how they ended.",
        );
        for end in SpliceEnd::ALL {
            let _ = writeln!(
                out,
                "edgible_edge_spliced_connections_closed_total{{reason=\"{}\"}} {}",
                end.label(),
                self.splice_end_count(end)
            );
        }
        write_family(out, "edgible_edge_bytes_total", "counter", "Bytes spliced between clients and devices.");
        let _ = writeln!(
            out,
            "edgible_edge_bytes_total{{direction=\"client_to_device\"}} {}",
            self.bytes_client_to_device()
        );
        let _ = writeln!(
            out,
            "edgible_edge_bytes_total{{direction=\"device_to_client\"}} {}",
            self.bytes_device_to_client()
        );
        write_family(
            out,
            "edgible_edge_http_requests_total",
            "counter",
            "Requests on the HTTP port, by how they were answered.",
        );
        for outcome in HttpOutcome::ALL {
            let _ = writeln!(
                out,
                "edgible_edge_http_requests_total{{outcome=\"{}\"}} {}",
                outcome.label(),
                self.http_count(outcome)
            );
        }
    }
}

/// Everything `/metrics` renders, in order.
#[derive(Clone, Default)]
pub struct MetricSources(Vec<Arc<dyn MetricSource>>);

impl MetricSources {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, source: Arc<dyn MetricSource>) -> Self {
        self.0.push(source);
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for source in &self.0 {
            source.write_metrics(&mut out);
        }
        out
    }
}

/// The admin router: `/metrics` in the Prometheus text format, `/healthz` answering `ok`.
pub fn admin_router(sources: MetricSources) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(|| async { "ok\n" })).with_state(sources)
}

async fn metrics(State(sources): State<MetricSources>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], sources.render())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    #[test]
    fn every_outcome_has_distinct_labels_and_its_own_slot() {
        let mut seen = std::collections::HashSet::new();
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), index);
            assert!(seen.insert(outcome.labels()), "{outcome:?}");
        }
        for (index, end) in SpliceEnd::ALL.iter().enumerate() {
            assert_eq!(*end as usize, index);
        }
        for (index, outcome) in HttpOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index);
        }
    }

    #[test]
    fn parse_errors_use_the_parser_s_reasons() {
        for error in [
            SniError::NotHandshake { content_type: 0 },
            SniError::NotClientHello { handshake_type: 2 },
            SniError::TooLarge { limit: 1 },
            SniError::Malformed("x"),
            SniError::InvalidServerName(crate::sni::ServerNameError::Empty),
        ] {
            assert_eq!(Outcome::for_parse_error(&error).labels().1, error.reason());
        }
    }

    #[test]
    fn splice_guards_count_their_end() {
        let metrics = Metrics::new();
        let guard = metrics.splice_started();
        assert_eq!(metrics.spliced_active(), 1);
        guard.finish(SpliceEnd::IdleTimeout);
        drop(metrics.splice_started());
        assert_eq!(metrics.spliced_active(), 0);
        assert_eq!(metrics.splice_end_count(SpliceEnd::IdleTimeout), 1);
        assert_eq!(metrics.splice_end_count(SpliceEnd::Error), 1);
    }

    #[tokio::test]
    async fn the_admin_router_renders_every_source() {
        let metrics = Metrics::new();
        metrics.count(Outcome::UnknownName);
        metrics.count(Outcome::UnknownName);
        metrics.add_client_to_device(42);
        let router = admin_router(MetricSources::new().with(metrics.clone()));
        let response = router.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(body.contains("edgible_edge_connections_total{outcome=\"refused\",reason=\"unknown_name\"} 2\n"));
        assert!(body.contains("edgible_edge_connections_total{outcome=\"routed\",reason=\"exact\"} 0\n"));
        assert!(body.contains("edgible_edge_bytes_total{direction=\"client_to_device\"} 42\n"));
        assert!(body.contains("# TYPE edgible_edge_connections_total counter\n"));
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{line}");
            }
        }

        let response = router.oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
