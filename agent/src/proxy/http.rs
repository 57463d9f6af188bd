//! The reverse proxy service: one per TLS connection, forwarding each request to the workload
//! (at its port on the address its driver gives, asked per request once the application is
//! awake: `127.0.0.1`, or a microVM's guest address) over HTTP/1.1 with streaming bodies both
//! ways and upgrade pass-through, once the application's access policies ([`super::access`])
//! let it through.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use edgible::model::ApplicationId;

use super::ProxyMetrics;
use super::access::pages::page;
use super::access::{AccessControl, Visit};
use crate::sleep::{Counters, Gate, InFlight, SleepTable, WakeError};

/// The body of every answer: the workload's streamed body, or a small page of our own.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop and must not be forwarded (RFC 9110 section 7.6.1), plus the
/// non-standard ones clients still send.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What the service knows about its connection.
#[derive(Debug)]
pub struct RequestContext {
    /// The SNI name of the TLS connection, which every request's host must match.
    pub server_name: String,
    /// The real client address, from the PROXY v2 header.
    pub client: SocketAddr,
    /// The workload's port.
    pub port: u16,
    /// Kept-alive connections to the workloads, shared by every connection of the proxy.
    pub upstream: Upstream,
    pub metrics: Arc<ProxyMetrics>,
    /// The access policies each request is checked against.
    pub access: Arc<AccessControl>,
    /// The application's sleep and usage counting, when the proxy knows the application.
    pub sleep: Option<Sleeper>,
}

/// What a request needs to count itself and wake its application.
#[derive(Clone)]
pub struct Sleeper {
    pub table: Arc<SleepTable>,
    pub application_id: ApplicationId,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Sleeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleeper").field("application_id", &self.application_id).finish_non_exhaustive()
    }
}

/// The per-connection service handed to hyper; cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyService {
    context: Arc<RequestContext>,
}

impl ProxyService {
    pub fn new(context: RequestContext) -> Self {
        Self { context: Arc::new(context) }
    }

    /// Answers one request: 421 when its host is not the SNI name, the access policies' answer
    /// when they do not let it through, 502 when the workload is unreachable, otherwise the
    /// workload's answer.
    pub async fn handle(&self, request: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let context = &self.context;
        ProxyMetrics::count(&context.metrics.requests);
        let Some(authority) = matching_authority(&request, &context.server_name) else {
            ProxyMetrics::count(&context.metrics.misdirected);
            return Ok(page(
                StatusCode::MISDIRECTED_REQUEST,
                "Misdirected request",
                "This host is not served on this connection.",
            ));
        };
        // Migrations (see `crate::migration`): a quiesced application refuses new requests, a
        // draining one ends HTTP/1 connections after each answer; both count what is in flight.
        let http1 = request.version() < Version::HTTP_2;
        let mut close = false;
        let mut in_flight = None;
        if let Some(sleep) = &context.sleep {
            match sleep.table.gate(sleep.application_id) {
                Gate::Refuse => return Ok(quiesced(http1)),
                Gate::Close => close = http1,
                Gate::Open => {}
            }
            in_flight = Some(InFlight::new(sleep.counters.clone()));
        }
        let visit = Visit::now(&context.server_name, context.client);
        let mut request = match context.access.authorize(request, &visit).await {
            Ok(request) => request,
            Err(answer) => {
                ProxyMetrics::count(&context.metrics.access_answered);
                return Ok(answer);
            }
        };
        if let Some(sleep) = &context.sleep {
            Counters::add(&sleep.counters.requests, 1);
            sleep.table.touch(sleep.application_id);
            if let Err(error) = sleep.table.ensure_awake(sleep.application_id).await {
                debug!(application = %sleep.application_id, %error, "answering 503: the application did not wake");
                return Ok(wake_failed(&request, &error));
            }
        }
        let Some(workload) = self.workload() else {
            ProxyMetrics::count(&context.metrics.bad_gateway);
            return Ok(page(
                StatusCode::BAD_GATEWAY,
                "Bad gateway",
                "The application is not running right now. Please try again in a moment.",
            ));
        };
        let upgrade = upgrade_protocol(&request);
        // Must be taken before the request is consumed: it resolves once hyper has sent our
        // 101 answer and hands over the client's raw stream.
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

        let upstream_request = match self.upstream_request(request, &authority, upgrade, workload) {
            Ok(upstream_request) => upstream_request,
            Err(error) => {
                debug!(%error, "cannot rebuild the request for the workload");
                return Ok(page(StatusCode::BAD_REQUEST, "Bad request", "The request could not be forwarded."));
            }
        };
        let mut response = match self.send(upstream_request).await {
            Ok(response) => response,
            Err(error) => {
                ProxyMetrics::count(&context.metrics.bad_gateway);
                debug!(%workload, %error, "workload unreachable");
                return Ok(page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    "The application is not answering right now. Please try again in a moment.",
                ));
            }
        };

        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        match client_upgrade {
            Some(client_upgrade) if switching => {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let client = context.client;
                tokio::spawn(async move {
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client_io, upstream_io)) => {
                            let mut client_io = TokioIo::new(client_io);
                            let mut upstream_io = TokioIo::new(upstream_io);
                            if let Err(error) = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await {
                                debug!(%client, %error, "upgraded connection ended with an error");
                            }
                        }
                        Err(error) => debug!(%client, %error, "upgrade failed"),
                    }
                });
                // The 101 answer keeps its `Connection: upgrade` and `Upgrade` headers: they are
                // the hop's agreement that the client needs to see.
                let upgrade_headers = (
                    response.headers().get(header::CONNECTION).cloned(),
                    response.headers().get(header::UPGRADE).cloned(),
                );
                strip_hop_by_hop(response.headers_mut());
                if let (Some(connection), Some(protocol)) = upgrade_headers {
                    response.headers_mut().insert(header::CONNECTION, connection);
                    response.headers_mut().insert(header::UPGRADE, protocol);
                }
            }
            _ => strip_hop_by_hop(response.headers_mut()),
        }
        if close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response.map(|body| InFlightBody { body, _in_flight: in_flight }.boxed()))
    }

    /// The request as the workload sees it: origin-form URI over HTTP/1.1, the client's host,
    /// no hop-by-hop headers, and `X-Forwarded-*` set by us alone. `X-Edgible-*` headers were
    /// already replaced by the access check.
    fn upstream_request(
        &self,
        request: Request<Incoming>,
        authority: &str,
        upgrade: Option<HeaderValue>,
        workload: SocketAddr,
    ) -> Result<Request<Incoming>, http::Error> {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        // Absolute, so the pool knows which workload; the workload itself is sent the origin
        // form.
        parts.uri = Uri::builder().scheme("http").authority(workload.to_string()).path_and_query(path).build()?;
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol);
        }
        // The client's own `X-Forwarded-*` values are not trusted: we are the first proxy that
        // knows the real address, so ours replace them.
        headers.insert(header::HOST, HeaderValue::from_str(authority)?);
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(&self.context.client.ip().to_string())?);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(X_FORWARDED_HOST, HeaderValue::from_str(authority)?);
        Ok(Request::from_parts(parts, body))
    }

    /// Where the workload listens now: its driver's address (the application's, once awake),
    /// or `127.0.0.1` for a connection whose application the proxy does not know.
    fn workload(&self) -> Option<SocketAddr> {
        let host = match &self.context.sleep {
            Some(sleep) => sleep.table.address(sleep.application_id)?,
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        Some(SocketAddr::new(host, self.context.port))
    }

    /// Sends the request to the workload on a kept-alive connection (a new one when none is
    /// idle; a request that found its pooled connection closed by the workload is sent again
    /// on a fresh one before anything of it was written).
    async fn send(&self, request: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        self.context.upstream.request(request).await.map_err(UpstreamError)
    }
}

/// The 503 answer while a migration has quiesced the application: try again in a second
/// (by then the application answers from its new device, or here again).
fn quiesced(http1: bool) -> Response<ProxyBody> {
    let message = "The application is moving and answers again in a moment.\n";
    let body = http_body_util::Full::new(Bytes::from(message)).map_err(|never| match never {}).boxed();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if http1 {
        // HTTP/2 has no connection-specific headers.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A response body that counts its request in flight until it has been sent (or dropped).
struct InFlightBody<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The 503 answer of a failed wake: a small page for browsers, plain text for the others.
fn wake_failed<B>(request: &Request<B>, error: &WakeError) -> Response<ProxyBody> {
    let wants_html = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    let message = format!("The application is asleep and could not be woken ({error}). Please try again in a moment.");
    let mut response = if wants_html {
        page(StatusCode::SERVICE_UNAVAILABLE, "Application unavailable", &message)
    } else {
        let body =
            http_body_util::Full::new(Bytes::from(format!("{message}\n"))).map_err(|never| match never {}).boxed();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        response
    };
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// Why the workload gave no answer.
#[derive(Debug, thiserror::Error)]
#[error("the exchange with the workload failed: {0}")]
struct UpstreamError(hyper_util::client::legacy::Error);

/// The proxy's client of the workloads: HTTP/1.1 to each workload's address, connections kept
/// alive and reused request after request, as a reverse proxy in front of a local server
/// should (a new TCP connection and task per request cost as much as the rest of the request).
pub type Upstream = hyper_util::client::legacy::Client<HttpConnector, Incoming>;

/// How many idle connections to one workload are kept, and for how long.
const IDLE_UPSTREAM_PER_WORKLOAD: usize = 64;
const IDLE_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// A pool of connections to the workloads, connecting within `connect_timeout`.
pub fn upstream(connect_timeout: Duration) -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_UPSTREAM_TIMEOUT)
        .pool_max_idle_per_host(IDLE_UPSTREAM_PER_WORKLOAD)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// The request's authority when every host it names (the URI's authority, which carries
/// HTTP/2's `:authority`, and the `Host` header) is the SNI name; `None` otherwise, including
/// when it names none.
fn matching_authority(request: &Request<Incoming>, server_name: &str) -> Option<String> {
    let from_uri = request.uri().authority().cloned();
    let from_header = match request.headers().get(header::HOST) {
        Some(value) => Some(value.to_str().ok()?.parse::<Authority>().ok()?),
        None => None,
    };
    let mut authority = None;
    for candidate in [from_uri, from_header].into_iter().flatten() {
        let host = candidate.host().trim_end_matches('.');
        if !host.eq_ignore_ascii_case(server_name.trim_end_matches('.')) {
            return None;
        }
        authority.get_or_insert(candidate);
    }
    authority.map(|authority| authority.as_str().to_owned())
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade`).
fn upgrade_protocol(request: &Request<Incoming>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let asks = connection_tokens(request.headers()).any(|token| token.eq_ignore_ascii_case("upgrade"));
    asks.then(|| request.headers().get(header::UPGRADE).cloned()).flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Removes the standard hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok()).collect();
    for name in named.into_iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn error_pages_are_html() {
        let response = page(StatusCode::BAD_GATEWAY, "Bad gateway", "down");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    }

    #[test]
    fn failed_wakes_answer_html_to_browsers_and_text_to_others() {
        let error = WakeError::Failed("exited".to_owned());
        let browser = Request::builder().header(header::ACCEPT, "text/html,*/*").body(()).expect("request");
        let answer = wake_failed(&browser, &error);
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let curl = Request::builder().header(header::ACCEPT, "*/*").body(()).expect("request");
        let answer = wake_failed(&curl, &error);
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(answer.headers()[header::RETRY_AFTER], "5");
    }
}
