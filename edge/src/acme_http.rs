//! The edge's plain HTTP port: answers the ACME HTTP-01 challenges it was told about and
//! redirects every other request to https.
//!
//! An ACME CA validates a name by fetching `http://NAME/.well-known/acme-challenge/TOKEN`
//! (RFC 8555 section 8.3) and expects the key authorization in the body. The server orders
//! certificates and tells the edges which challenges to serve ([`ChallengeStore::set_challenges`],
//! called by the hub client); a challenge is only answered for the host name it was issued
//! for. Everything else gets a `308 Permanent Redirect` to the same host, path and query over
//! https; a request without a valid host name gets `400`, as there is nowhere to send it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use edgible::model::Hostname;
use http::uri::Authority;

use crate::metrics::{HttpOutcome, Metrics};
use crate::sni::ServerName;

/// The path prefix of HTTP-01 challenges.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// One HTTP-01 challenge: the CA will fetch `http://{hostname}/.well-known/acme-challenge/{token}`
/// and expects `key_authorization` as the body. The protocol's type, as the server pushes it in
/// `edge_config`.
pub use edgible::protocol::v1::AcmeChallenge;

/// Why a challenge cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("challenge for {hostname}: HTTP-01 cannot validate a wildcard name")]
    Wildcard { hostname: Hostname },
    #[error("challenge for {hostname}: the token is not a non-empty base64url string")]
    InvalidToken { hostname: Hostname },
    #[error("challenge for {hostname}: the key authorization is not `TOKEN.THUMBPRINT` in base64url")]
    InvalidKeyAuthorization { hostname: Hostname },
}

/// The challenges the edge currently answers. Cloning shares the store.
#[derive(Clone, Default)]
pub struct ChallengeStore {
    /// Key authorizations by (host name, token).
    challenges: Arc<RwLock<HashMap<(String, String), String>>>,
}

impl ChallengeStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole set of challenges, as the server pushes it. Refuses the whole set
    /// (keeping the previous one) if any challenge is invalid: the server sent something it
    /// should not have, and serving part of a set would hide that.
    pub fn set_challenges(&self, challenges: impl IntoIterator<Item = AcmeChallenge>) -> Result<(), ChallengeError> {
        let mut next = HashMap::new();
        for challenge in challenges {
            validate(&challenge)?;
            next.insert((challenge.hostname.as_str().to_owned(), challenge.token), challenge.key_authorization);
        }
        *self.challenges.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// The key authorization for `token` on `hostname`, if the edge was told about it.
    pub fn key_authorization(&self, hostname: &str, token: &str) -> Option<String> {
        let challenges = self.challenges.read().unwrap_or_else(PoisonError::into_inner);
        challenges.get(&(hostname.to_owned(), token.to_owned())).cloned()
    }

    pub fn len(&self) -> usize {
        self.challenges.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn is_base64url(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

fn validate(challenge: &AcmeChallenge) -> Result<(), ChallengeError> {
    let hostname = || challenge.hostname.clone();
    if challenge.hostname.is_wildcard() {
        return Err(ChallengeError::Wildcard { hostname: hostname() });
    }
    if !is_base64url(&challenge.token) {
        return Err(ChallengeError::InvalidToken { hostname: hostname() });
    }
    // RFC 8555 section 8.1: keyAuthorization = token || '.' || base64url(Thumbprint(accountKey)).
    let thumbprint = challenge
        .key_authorization
        .strip_prefix(challenge.token.as_str())
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|thumbprint| is_base64url(thumbprint));
    if thumbprint.is_none() {
        return Err(ChallengeError::InvalidKeyAuthorization { hostname: hostname() });
    }
    Ok(())
}

#[derive(Clone)]
struct HttpState {
    challenges: ChallengeStore,
    metrics: Arc<Metrics>,
}

/// The router of the HTTP port.
pub fn router(challenges: ChallengeStore, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(challenge))
        .fallback(redirect)
        .with_state(HttpState { challenges, metrics })
}

async fn challenge(
    State(state): State<HttpState>,
    Path(token): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(host) = request_host(&uri, &headers) else {
        state.metrics.count_http(HttpOutcome::BadRequest);
        return bad_request();
    };
    match state.challenges.key_authorization(host.as_str(), &token) {
        Some(key_authorization) => {
            state.metrics.count_http(HttpOutcome::Challenge);
            tracing::info!(host = %host, "answered an ACME HTTP-01 challenge");
            ([(header::CONTENT_TYPE, "application/octet-stream")], key_authorization).into_response()
        }
        None => {
            state.metrics.count_http(HttpOutcome::ChallengeNotFound);
            (StatusCode::NOT_FOUND, "no such ACME challenge\n").into_response()
        }
    }
}

async fn redirect(State(state): State<HttpState>, request: Request) -> Response {
    let Some(host) = request_host(request.uri(), request.headers()) else {
        state.metrics.count_http(HttpOutcome::BadRequest);
        return bad_request();
    };
    let path_and_query = request.uri().path_and_query().map_or("/", |path_and_query| path_and_query.as_str());
    state.metrics.count_http(HttpOutcome::Redirect);
    // The port is dropped on purpose: https is served on 443 whatever port this request came in on.
    Redirect::permanent(&format!("https://{host}{path_and_query}")).into_response()
}

fn bad_request() -> Response {
    (StatusCode::BAD_REQUEST, "a valid Host header naming a DNS host is required\n").into_response()
}

/// The host a request is for: the authority of an absolute-form request target, which RFC 9112
/// section 3.2.2 makes win over `Host`, otherwise the single `Host` header. Normalized like a
/// TLS server name (lowercase, no trailing dot) and refused when it is not a DNS host name
/// (an IP literal, user info, more than one `Host` header).
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<ServerName> {
    let authority = match uri.authority() {
        Some(authority) => authority.clone(),
        None => {
            let mut hosts = headers.get_all(header::HOST).iter();
            let host = hosts.next()?;
            if hosts.next().is_some() {
                return None;
            }
            host.to_str().ok()?.parse::<Authority>().ok()?
        }
    };
    if authority.as_str().contains('@') {
        return None;
    }
    ServerName::parse(authority.host().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    const TOKEN: &str = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
    const KEY_AUTHORIZATION: &str =
        "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ";

    fn challenge_for(hostname: &str) -> AcmeChallenge {
        AcmeChallenge {
            hostname: hostname.parse().unwrap(),
            token: TOKEN.to_owned(),
            key_authorization: KEY_AUTHORIZATION.to_owned(),
        }
    }

    fn setup() -> (Router, Arc<Metrics>) {
        let store = ChallengeStore::new();
        store.set_challenges([challenge_for("app.example.test")]).unwrap();
        let metrics = Metrics::new();
        (router(store, metrics.clone()), metrics)
    }

    async fn send(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn get(path: &str, host: Option<&str>) -> Request<Body> {
        let mut builder = Request::get(path);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn known_challenges_are_answered_for_their_host_only() {
        let (router, metrics) = setup();
        let path = format!("{CHALLENGE_PATH}{TOKEN}");
        let (status, headers, body) = send(&router, get(&path, Some("APP.example.test:80"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, KEY_AUTHORIZATION);
        assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");

        let (status, _, _) = send(&router, get(&path, Some("other.example.test"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = send(&router, get(&format!("{CHALLENGE_PATH}unknown"), Some("app.example.test"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(metrics.http_count(HttpOutcome::Challenge), 1);
        assert_eq!(metrics.http_count(HttpOutcome::ChallengeNotFound), 2);
    }

    #[tokio::test]
    async fn everything_else_is_redirected_to_https() {
        let (router, metrics) = setup();
        for (path, host, location) in [
            ("/", "app.example.test", "https://app.example.test/"),
            ("/a/b?c=d&e=%20f", "App.Example.Test.:8080", "https://app.example.test/a/b?c=d&e=%20f"),
            (
                "/.well-known/acme-challenge/",
                "app.example.test",
                "https://app.example.test/.well-known/acme-challenge/",
            ),
        ] {
            let (status, headers, _) = send(&router, get(path, Some(host))).await;
            assert_eq!(status, StatusCode::PERMANENT_REDIRECT, "{path}");
            assert_eq!(headers[header::LOCATION], location);
        }
        let post = Request::post("/form").header(header::HOST, "app.example.test").body(Body::from("x=1")).unwrap();
        let (status, headers, _) = send(&router, post).await;
        assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
        assert_eq!(headers[header::LOCATION], "https://app.example.test/form");

        // An absolute-form target names the host itself.
        let absolute = Request::get("http://abs.example.test/x").header(header::HOST, "ignored.example.test");
        let (_, headers, _) = send(&router, absolute.body(Body::empty()).unwrap()).await;
        assert_eq!(headers[header::LOCATION], "https://abs.example.test/x");
        assert_eq!(metrics.http_count(HttpOutcome::Redirect), 5);
    }

    #[tokio::test]
    async fn missing_or_invalid_hosts_are_bad_requests() {
        let (router, metrics) = setup();
        for host in [
            None,
            Some(""),
            Some("192.0.2.1"),
            Some("[2001:db8::1]:80"),
            Some("a_b.example.test"),
            Some("user@app.example.test"),
        ] {
            let (status, _, _) = send(&router, get("/", host)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{host:?}");
        }
        let two_hosts = Request::get("/")
            .header(header::HOST, "a.example.test")
            .header(header::HOST, "b.example.test")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, two_hosts).await.0, StatusCode::BAD_REQUEST);
        let (status, _, _) = send(&router, get(&format!("{CHALLENGE_PATH}{TOKEN}"), None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(metrics.http_count(HttpOutcome::BadRequest), 8);
    }

    #[test]
    fn invalid_challenges_are_refused_and_keep_the_previous_set() {
        let store = ChallengeStore::new();
        store.set_challenges([challenge_for("app.example.test")]).unwrap();
        let wildcard = challenge_for("*.example.test");
        assert!(matches!(store.set_challenges([wildcard]), Err(ChallengeError::Wildcard { .. })));
        let bad_token = AcmeChallenge { token: "../etc".to_owned(), ..challenge_for("app.example.test") };
        assert!(matches!(store.set_challenges([bad_token]), Err(ChallengeError::InvalidToken { .. })));
        let bad_key =
            AcmeChallenge { key_authorization: "other.thumb".to_owned(), ..challenge_for("app.example.test") };
        assert!(matches!(store.set_challenges([bad_key]), Err(ChallengeError::InvalidKeyAuthorization { .. })));
        let no_thumbprint =
            AcmeChallenge { key_authorization: format!("{TOKEN}."), ..challenge_for("app.example.test") };
        assert!(store.set_challenges([no_thumbprint]).is_err());
        assert_eq!(store.len(), 1);
        assert_eq!(store.key_authorization("app.example.test", TOKEN).as_deref(), Some(KEY_AUTHORIZATION));
        store.set_challenges([]).unwrap();
        assert!(store.is_empty());
    }
}
