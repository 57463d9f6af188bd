//! Access policies, enforced on every HTTP request before it reaches the workload.
//!
//! The proxy holds an [`AccessTable`] (per hostname: the application, its organization, its
//! [`AccessPolicy`] and the digests of its secrets; plus the login URL, the server's assertion
//! keys and the session lifetime), swapped as a whole by the data path whenever the desired
//! applications or the server's `access` message change. Each request reads the table once, so
//! a revoked key is refused from the next request on, also on a kept-alive connection.
//!
//! A request is handled in this order:
//!
//! 1. Every incoming `X-Edgible-*` header is removed (only the proxy sets them), and so are the
//!    proxy's own cookies, once read.
//! 2. A public application (no policy) passes.
//! 3. `/.edgible/callback`, `/.edgible/logout` (organization policy) and `/.edgible/code`
//!    (short-code policy) are answered by the proxy.
//! 4. Any of: a valid API key (`Authorization: Bearer` or `X-Edgible-Key`, not forwarded), a
//!    valid short-code cookie, a valid session cookie (→ `X-Edgible-User`, `X-Edgible-Email`),
//!    or a right `?code=` (→ the cookie and a 303 to the same URL without it).
//! 5. Otherwise browsers (`Accept` with `text/html`) are sent to the server's login page (302,
//!    with a signed `state` and its nonce in a cookie) or shown the short-code form; other
//!    clients get 401 with `WWW-Authenticate: Bearer realm="<host>"`.
//!
//! It never fails open: a hostname of an application whose policies are unknown, or an
//! application with a policy while no `access` message was ever received, is refused (503).
//!
//! - [`cookies`]: the signed state, session and short-code tokens, and the cookie headers.
//! - [`limiter`]: exponential lockout of wrong short codes. The code is never logged.
//! - [`replay`]: each login assertion is accepted once.
//! - [`pages`]: the small HTML pages.

pub mod cookies;
pub mod limiter;
pub mod pages;
pub mod replay;

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use edgible::access::{AssertionKey, Expected, digest_eq, sha256_hex, short_code_digest};
use edgible::model::{AccessPolicy, ApplicationId, Hostname, OrganizationId};
use edgible::protocol::v1::ApplicationAccess;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use url::Url;
use url::form_urlencoded;

use self::cookies::{
    CODE_COOKIE, CodePass, CookieKey, LoginState, SESSION_COOKIE, STATE_COOKIE, STATE_LIFETIME_SECONDS, Session,
};
use self::limiter::CodeLimiter;
use self::pages::page;
use self::replay::ReplayGuard;
use super::http::ProxyBody;

/// The proxy's own paths.
pub const CALLBACK_PATH: &str = "/.edgible/callback";
pub const LOGOUT_PATH: &str = "/.edgible/logout";
pub const CODE_PATH: &str = "/.edgible/code";

/// The API key header (the other is `Authorization: Bearer`).
const KEY_HEADER: HeaderName = HeaderName::from_static("x-edgible-key");
const USER_HEADER: HeaderName = HeaderName::from_static("x-edgible-user");
const EMAIL_HEADER: HeaderName = HeaderName::from_static("x-edgible-email");
/// How long a short-code cookie lasts (less if the code expires sooner).
const CODE_COOKIE_SECONDS: i64 = 24 * 3600;
/// The longest session the proxy grants, whatever the server asks.
const MAX_SESSION_SECONDS: u64 = 7 * 24 * 3600;
/// The longest short code read; longer ones are wrong without being hashed.
const MAX_CODE_CHARS: usize = 64;
/// The largest short-code form body read, and how long it may take to arrive.
const MAX_FORM_BYTES: usize = 8 * 1024;
const FORM_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest path kept to return to after a login or a code (longer ones return to `/`).
const MAX_RETURN_TO: usize = 1024;
/// The longest `state` sent to the login page.
const MAX_STATE_CHARS: usize = 512;

/// What the server's `access` message says for all applications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSettings {
    /// The base of the server's login pages; `None` if the server sent none usable.
    pub login_url: Option<Url>,
    pub assertion_keys: Vec<AssertionKey>,
    pub session_ttl: Duration,
}

impl AccessSettings {
    /// From the message's fields: an unusable login URL is logged and left out (organization
    /// logins then answer 503), the session lifetime is capped at a week.
    pub fn new(login_url: &str, assertion_keys: Vec<AssertionKey>, session_ttl_seconds: u64) -> Self {
        let login_url = match Url::parse(login_url.trim_end_matches('/')) {
            Ok(url) if matches!(url.scheme(), "https" | "http") && url.query().is_none() => Some(url),
            Ok(_) | Err(_) => {
                tracing::error!(%login_url, "the server's login_url is not an http(s) URL; organization logins are off");
                None
            }
        };
        let session_ttl = Duration::from_secs(session_ttl_seconds.clamp(1, MAX_SESSION_SECONDS));
        Self { login_url, assertion_keys, session_ttl }
    }

    /// `<login_url>/<page>`, plus the query.
    fn login_page(&self, page: &str, query: &[(&str, &str)]) -> Option<String> {
        let base = self.login_url.as_ref()?.as_str().trim_end_matches('/');
        let mut url = format!("{base}/{page}");
        if !query.is_empty() {
            url.push('?');
            url.push_str(&form_urlencoded::Serializer::new(String::new()).extend_pairs(query).finish());
        }
        Some(url)
    }
}

/// One application as the proxy checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplicationGate {
    pub application_id: ApplicationId,
    pub organization_id: OrganizationId,
    pub policy: AccessPolicy,
    /// The digests the server pushed for it; `None` if it sent none (yet).
    pub secrets: Option<ApplicationAccess>,
}

/// Everything the proxy checks requests against, replaced as a whole.
#[derive(Debug, Clone, Default)]
pub struct AccessTable {
    settings: Option<Arc<AccessSettings>>,
    /// Hostname (or `*.` wildcard), lowercase → its application.
    applications: HashMap<String, Arc<ApplicationGate>>,
    /// Whether a hostname missing from the table is refused rather than public.
    strict: bool,
}

/// What the table says about a hostname.
enum Lookup<'a> {
    Public,
    Gated(&'a Arc<ApplicationGate>),
    /// Routed, but its policies are unknown: refused.
    Unknown,
}

impl AccessTable {
    /// Every hostname public: a proxy nobody configures policies for.
    pub fn open() -> Self {
        Self::default()
    }

    /// A table of the applications [`AccessTable::insert`]ed; any other hostname is refused.
    /// `settings` is `None` until the server's first `access` message.
    pub fn new(settings: Option<AccessSettings>) -> Self {
        Self { settings: settings.map(Arc::new), applications: HashMap::new(), strict: true }
    }

    pub fn insert(&mut self, hostname: &str, gate: Arc<ApplicationGate>) {
        self.applications.insert(hostname.to_ascii_lowercase(), gate);
    }

    pub fn settings(&self) -> Option<&AccessSettings> {
        self.settings.as_deref()
    }

    fn lookup(&self, hostname: &str) -> Lookup<'_> {
        match super::tls::lookup(&self.applications, hostname) {
            Some(gate) if gate.policy.is_public() => Lookup::Public,
            Some(gate) => Lookup::Gated(gate),
            None if self.strict => Lookup::Unknown,
            None => Lookup::Public,
        }
    }
}

/// The access state of one proxy: the table, the cookie key, used assertions and the
/// short-code limiter.
#[derive(Debug)]
pub struct AccessControl {
    key: CookieKey,
    table: RwLock<Arc<AccessTable>>,
    replay: Mutex<ReplayGuard>,
    limiter: Mutex<CodeLimiter>,
}

/// The request being checked: where it came from and when.
#[derive(Debug, Clone, Copy)]
pub struct Visit<'a> {
    /// The SNI name, which the request's host matches.
    pub hostname: &'a str,
    /// The client's address, from the PROXY header.
    pub client: SocketAddr,
    pub now: DateTime<Utc>,
    /// The same moment on the monotonic clock, for the limiter.
    pub instant: Instant,
}

impl<'a> Visit<'a> {
    pub fn now(hostname: &'a str, client: SocketAddr) -> Self {
        Self { hostname, client, now: Utc::now(), instant: Instant::now() }
    }
}

/// The credentials a request carries, read before the headers are stripped.
#[derive(Default)]
struct Credentials {
    /// The `X-Edgible-Key` value.
    key: Option<String>,
    /// The `Authorization: Bearer` token.
    bearer: Option<String>,
    sessions: Vec<String>,
    codes: Vec<String>,
    states: Vec<String>,
}

/// A short code that was tried.
enum CodeCheck {
    Accepted(HeaderValue),
    Wrong,
    Locked(Duration),
    Expired,
    Unavailable,
}

impl AccessControl {
    /// Starts with an open table (everything public) until [`AccessControl::replace`].
    pub fn new(key: CookieKey) -> Arc<Self> {
        Arc::new(Self {
            key,
            table: RwLock::new(Arc::new(AccessTable::open())),
            replay: Mutex::new(ReplayGuard::default()),
            limiter: Mutex::new(CodeLimiter::default()),
        })
    }

    /// Replaces the whole table at once: no request sees half an update.
    pub fn replace(&self, table: AccessTable) {
        // Replacing one pointer cannot leave the table half-written, so a poisoned lock is fine.
        *self.table.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(table);
    }

    pub fn snapshot(&self) -> Arc<AccessTable> {
        Arc::clone(&self.table.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Whether a raw TCP connection to `hostname` may be spliced: only for public
    /// applications, since no policy can be checked without HTTP.
    pub fn allows_raw(&self, hostname: &str) -> bool {
        matches!(self.snapshot().lookup(hostname), Lookup::Public)
    }

    /// The request to forward (identity headers set, credentials removed), or the answer to
    /// give instead.
    pub async fn authorize<B>(&self, request: Request<B>, visit: &Visit<'_>) -> Result<Request<B>, Response<ProxyBody>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut parts, body) = request.into_parts();
        let credentials = read_credentials(&parts.headers);
        strip_edgible_headers(&mut parts.headers);
        cookies::strip_own_cookies(&mut parts.headers);
        let table = self.snapshot();
        let gate = match table.lookup(visit.hostname) {
            Lookup::Public => return Ok(Request::from_parts(parts, body)),
            Lookup::Gated(gate) => Arc::clone(gate),
            Lookup::Unknown => return Err(not_ready()),
        };
        let Some(settings) = table.settings() else { return Err(not_ready()) };
        let policy = &gate.policy;
        match parts.uri.path() {
            CALLBACK_PATH if policy.organization.is_some() => {
                return Err(self.callback(&parts, &credentials, &gate, settings, visit));
            }
            LOGOUT_PATH if policy.organization.is_some() => return Err(logout(settings)),
            CODE_PATH if policy.short_code.is_some() => return Err(self.code_page(parts, body, &gate, visit).await),
            _ => {}
        }
        if self.granted(&mut parts, &credentials, &gate, visit) {
            return Ok(Request::from_parts(parts, body));
        }
        Err(self.challenge(&parts, &gate, settings, visit))
    }

    /// Whether any of the policies lets the request through; sets the identity headers of a
    /// session and removes an API key that was used.
    fn granted(&self, parts: &mut Parts, credentials: &Credentials, gate: &ApplicationGate, visit: &Visit<'_>) -> bool {
        let policy = &gate.policy;
        if policy.api_key.is_some() {
            let bearer_is_ours = credentials.bearer.as_deref().is_some_and(|key| key_accepted(gate, key, visit.now));
            if bearer_is_ours {
                // The key was for the proxy, whichever header let the request in; a token for
                // the workload is kept.
                parts.headers.remove(header::AUTHORIZATION);
            }
            if bearer_is_ours || credentials.key.as_deref().is_some_and(|key| key_accepted(gate, key, visit.now)) {
                return true;
            }
        }
        if policy.short_code.is_some()
            && let Some(digest) = gate.secrets.as_ref().and_then(|secrets| secrets.short_code.as_ref())
            && digest.expires_at.is_none_or(|expires_at| expires_at > visit.now)
            && credentials.codes.iter().any(|token| {
                self.key
                    .verify::<CodePass>(token, gate.application_id, visit.now)
                    .is_ok_and(|pass| pass.version == digest.version)
            })
        {
            return true;
        }
        if let Some(organization) = &policy.organization {
            let session = credentials.sessions.iter().find_map(|token| {
                self.key
                    .verify::<Session>(token, gate.application_id, visit.now)
                    .ok()
                    .filter(|session| organization.roles.is_empty() || organization.roles.contains(&session.role))
            });
            if let Some(session) = session {
                // A user id always makes a valid header value; an e-mail address with
                // characters a header cannot carry is left out rather than mangled.
                if let Ok(user) = HeaderValue::from_str(&session.user_id.to_string()) {
                    parts.headers.insert(USER_HEADER, user);
                }
                if let Ok(email) = HeaderValue::from_str(&session.email) {
                    parts.headers.insert(EMAIL_HEADER, email);
                }
                return true;
            }
        }
        false
    }

    /// The answer to a request no policy let through.
    fn challenge(
        &self,
        parts: &Parts,
        gate: &ApplicationGate,
        settings: &AccessSettings,
        visit: &Visit<'_>,
    ) -> Response<ProxyBody> {
        let html = wants_html(&parts.headers);
        let policy = &gate.policy;
        if policy.short_code.is_some()
            && let Some(code) = query_value(&parts.uri, "code")
        {
            let return_to = return_path(&parts.uri, true);
            return match self.try_code(gate, &code, visit) {
                CodeCheck::Accepted(cookie) => {
                    let mut response = redirect(StatusCode::SEE_OTHER, &return_to);
                    response.headers_mut().append(header::SET_COOKIE, cookie);
                    response
                }
                refused => self.code_refused(refused, html, visit.hostname, &return_to, gate),
            };
        }
        if html {
            if policy.organization.is_some() {
                return self.login_redirect(parts, gate, settings, visit);
            }
            if policy.short_code.is_some() {
                let return_to = return_path(&parts.uri, false);
                return pages::code_form(StatusCode::UNAUTHORIZED, visit.hostname, &return_to, None);
            }
        }
        unauthorized(html, visit.hostname, policy)
    }

    /// 302 to the server's login page with a fresh signed `state`, its nonce in a cookie.
    fn login_redirect(
        &self,
        parts: &Parts,
        gate: &ApplicationGate,
        settings: &AccessSettings,
        visit: &Visit<'_>,
    ) -> Response<ProxyBody> {
        let nonce = cookies::nonce();
        let expires = visit.now.timestamp() + STATE_LIFETIME_SECONDS;
        let mut state = LoginState {
            application_id: gate.application_id,
            nonce: nonce.clone(),
            return_to: return_path(&parts.uri, false),
            expires,
        };
        let mut token = self.key.sign(&state);
        if token.len() > MAX_STATE_CHARS {
            state.return_to = "/".to_owned();
            token = self.key.sign(&state);
        }
        let Some(location) = settings.login_page("login", &[("host", visit.hostname), ("state", &token)]) else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in unavailable",
                "Signing in to this site is not configured on this device yet. Please try again later.",
            );
        };
        let mut response = redirect(StatusCode::FOUND, &location);
        response
            .headers_mut()
            .append(header::SET_COOKIE, cookies::set_cookie(STATE_COOKIE, &nonce, STATE_LIFETIME_SECONDS));
        response
    }

    /// `/.edgible/callback?assertion=&state=`: the end of a login.
    fn callback(
        &self,
        parts: &Parts,
        credentials: &Credentials,
        gate: &ApplicationGate,
        settings: &AccessSettings,
        visit: &Visit<'_>,
    ) -> Response<ProxyBody> {
        let refused = |status: StatusCode, message: &str| page(status, "Sign-in failed", message);
        let (Some(assertion), Some(state)) = (query_value(&parts.uri, "assertion"), query_value(&parts.uri, "state"))
        else {
            return refused(
                StatusCode::BAD_REQUEST,
                "The sign-in answer is incomplete. Open the site again to sign in.",
            );
        };
        let Ok(login) = self.key.verify::<LoginState>(&state, gate.application_id, visit.now) else {
            return refused(
                StatusCode::BAD_REQUEST,
                "This sign-in attempt has expired or is not valid. Open the site again to sign in.",
            );
        };
        if !credentials.states.iter().any(|nonce| digest_eq(&sha256_hex(nonce), &sha256_hex(&login.nonce))) {
            return refused(
                StatusCode::BAD_REQUEST,
                "This sign-in attempt was started in another browser or tab. Open the site again to sign in.",
            );
        }
        let Ok(audience) = visit.hostname.parse::<Hostname>() else {
            return refused(StatusCode::BAD_REQUEST, "This site's name cannot be signed in to.");
        };
        let expected = Expected { audience: &audience, state: &state, now: visit.now };
        let assertion = match edgible::access::verify(&assertion, &settings.assertion_keys, expected) {
            Ok(assertion) => assertion,
            Err(error) => return refused(StatusCode::FORBIDDEN, &format!("{error}. Open the site again to sign in.")),
        };
        let first_use = self.replay.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).first_use(
            &assertion.jti,
            assertion.exp,
            visit.now.timestamp(),
        );
        if !first_use {
            return refused(
                StatusCode::FORBIDDEN,
                "This sign-in answer was already used. Open the site again to sign in.",
            );
        }
        if assertion.organization_id != gate.organization_id {
            return refused(StatusCode::FORBIDDEN, "The sign-in answer is for another organization.");
        }
        if let Some(organization) = &gate.policy.organization
            && !organization.roles.is_empty()
            && !organization.roles.contains(&assertion.role)
        {
            return refused(StatusCode::FORBIDDEN, "Your role in the organization does not give access to this site.");
        }
        let ttl = i64::try_from(settings.session_ttl.as_secs()).unwrap_or(i64::MAX);
        let session = Session {
            application_id: gate.application_id,
            user_id: assertion.sub,
            email: assertion.email,
            name: assertion.name,
            role: assertion.role,
            expires: visit.now.timestamp().saturating_add(ttl),
        };
        tracing::debug!(user = %session.user_id, hostname = visit.hostname, "signed in");
        let mut response = redirect(StatusCode::FOUND, &login.return_to);
        let headers = response.headers_mut();
        headers.append(header::SET_COOKIE, cookies::set_cookie(SESSION_COOKIE, &self.key.sign(&session), ttl));
        headers.append(header::SET_COOKIE, cookies::set_cookie(STATE_COOKIE, "", 0));
        response
    }

    /// `/.edgible/code`: the form (GET), or a code entered in it (POST).
    async fn code_page<B>(
        &self,
        parts: Parts,
        body: B,
        gate: &ApplicationGate,
        visit: &Visit<'_>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let html = wants_html(&parts.headers);
        if parts.method == Method::GET || parts.method == Method::HEAD {
            let return_to =
                query_value(&parts.uri, "return_to").map_or_else(|| "/".to_owned(), |path| local_path(&path));
            return pages::code_form(StatusCode::OK, visit.hostname, &return_to, None);
        }
        if parts.method != Method::POST {
            let mut response = page(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", "Use the form.");
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            return response;
        }
        let form = match tokio::time::timeout(FORM_TIMEOUT, Limited::new(body, MAX_FORM_BYTES).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => return page(StatusCode::PAYLOAD_TOO_LARGE, "Request too large", "The form was too large."),
            Err(_) => return page(StatusCode::REQUEST_TIMEOUT, "Request timeout", "The form took too long to arrive."),
        };
        let mut code = None;
        let mut return_to = "/".to_owned();
        for (name, value) in form_urlencoded::parse(&form) {
            match &*name {
                "code" => code = Some(value.into_owned()),
                "return_to" => return_to = local_path(&value),
                _ => {}
            }
        }
        let Some(code) = code else {
            return pages::code_form(
                StatusCode::BAD_REQUEST,
                visit.hostname,
                &return_to,
                Some("Enter the access code."),
            );
        };
        match self.try_code(gate, &code, visit) {
            CodeCheck::Accepted(cookie) => {
                let mut response = redirect(StatusCode::SEE_OTHER, &return_to);
                response.headers_mut().append(header::SET_COOKIE, cookie);
                response
            }
            refused => self.code_refused(refused, html, visit.hostname, &return_to, gate),
        }
    }

    /// Checks a short code under the rate limit; the code itself is never logged.
    fn try_code(&self, gate: &ApplicationGate, code: &str, visit: &Visit<'_>) -> CodeCheck {
        let Some(digest) = gate.secrets.as_ref().and_then(|secrets| secrets.short_code.as_ref()) else {
            return CodeCheck::Unavailable;
        };
        let client = visit.client.ip();
        let mut limiter = self.limiter.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(wait) = limiter.locked(client, gate.application_id, visit.instant) {
            return CodeCheck::Locked(wait);
        }
        if digest.expires_at.is_some_and(|expires_at| expires_at <= visit.now) {
            return CodeCheck::Expired;
        }
        let code = code.trim();
        let right = !code.is_empty()
            && code.chars().count() <= MAX_CODE_CHARS
            && digest_eq(&short_code_digest(gate.application_id, code), &digest.sha256);
        if !right {
            limiter.failed(client, gate.application_id, visit.instant);
            tracing::debug!(%client, application = %gate.application_id, "a wrong short code");
            return CodeCheck::Wrong;
        }
        limiter.succeeded(client, gate.application_id);
        let mut expires = visit.now.timestamp() + CODE_COOKIE_SECONDS;
        if let Some(expires_at) = digest.expires_at {
            expires = expires.min(expires_at.timestamp());
        }
        let pass = CodePass { application_id: gate.application_id, version: digest.version, expires };
        let max_age = expires - visit.now.timestamp();
        CodeCheck::Accepted(cookies::set_cookie(CODE_COOKIE, &self.key.sign(&pass), max_age))
    }

    fn code_refused(
        &self,
        refused: CodeCheck,
        html: bool,
        hostname: &str,
        return_to: &str,
        gate: &ApplicationGate,
    ) -> Response<ProxyBody> {
        match refused {
            CodeCheck::Locked(wait) => {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let message = format!("Too many wrong codes. Try again in {seconds} seconds.");
                let mut response = if html {
                    page(StatusCode::TOO_MANY_REQUESTS, "Too many attempts", &message)
                } else {
                    text(StatusCode::TOO_MANY_REQUESTS, &message)
                };
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                response
            }
            CodeCheck::Wrong if html => {
                pages::code_form(StatusCode::UNAUTHORIZED, hostname, return_to, Some("That code is not right."))
            }
            CodeCheck::Wrong => unauthorized(false, hostname, &gate.policy),
            CodeCheck::Expired => {
                page(StatusCode::FORBIDDEN, "Code expired", "The access code of this site has expired.")
            }
            CodeCheck::Unavailable | CodeCheck::Accepted(_) => not_ready(),
        }
    }
}

/// The API key, session, code and state cookies of a request.
fn read_credentials(headers: &HeaderMap) -> Credentials {
    let key = headers.get(KEY_HEADER).and_then(|value| value.to_str().ok()).map(|key| key.trim().to_owned());
    let bearer = headers.get(header::AUTHORIZATION).and_then(|value| {
        let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    let values = |name| cookies::cookie_values(headers, name).map(str::to_owned).collect();
    Credentials {
        key,
        bearer,
        sessions: values(SESSION_COOKIE),
        codes: values(CODE_COOKIE),
        states: values(STATE_COOKIE),
    }
}

/// Whether `key` is one of the application's unexpired keys, compared by digest in constant
/// time (each comparison; the number of keys is not secret).
fn key_accepted(gate: &ApplicationGate, key: &str, now: DateTime<Utc>) -> bool {
    if key.is_empty() {
        return false;
    }
    let digest = sha256_hex(key);
    let Some(secrets) = &gate.secrets else { return false };
    secrets.api_keys.iter().fold(false, |accepted, candidate| {
        let live = candidate.expires_at.is_none_or(|expires_at| expires_at > now);
        accepted | (digest_eq(&digest, &candidate.sha256) & live)
    })
}

/// Removes every `X-Edgible-*` header: only the proxy may set them.
pub fn strip_edgible_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("x-edgible-")).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether the client is a browser: its `Accept` names `text/html`.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.to_ascii_lowercase().contains("text/html"))
}

/// The first value of a query parameter.
fn query_value(uri: &http::Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

/// The request's path and query to come back to, without `code` if `without_code`.
fn return_path(uri: &http::Uri, without_code: bool) -> String {
    let path = uri.path();
    let query = match uri.query() {
        Some(query) if without_code => {
            let kept: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .filter(|(key, _)| key != "code")
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect();
            (!kept.is_empty()).then(|| form_urlencoded::Serializer::new(String::new()).extend_pairs(kept).finish())
        }
        Some(query) => Some(query.to_owned()),
        None => None,
    };
    local_path(&match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    })
}

/// `path` if it is a path on this host that is safe to redirect to, else `/`: it starts with
/// one `/` (not `//`, which is another host), has no backslash or control character, is not
/// one of the proxy's own pages and is not too long.
fn local_path(path: &str) -> String {
    let safe = path.starts_with('/')
        && !path.starts_with("//")
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && !path.starts_with("/.edgible/")
        && path.len() <= MAX_RETURN_TO;
    if safe { path.to_owned() } else { "/".to_owned() }
}

/// `/.edgible/logout`: the session cookie cleared, then the server's logout page.
fn logout(settings: &AccessSettings) -> Response<ProxyBody> {
    let mut response = match settings.login_page("logout", &[]) {
        Some(location) => redirect(StatusCode::FOUND, &location),
        None => page(StatusCode::OK, "Signed out", "You are signed out of this site."),
    };
    response.headers_mut().append(header::SET_COOKIE, cookies::set_cookie(SESSION_COOKIE, "", 0));
    response
}

/// 401 naming what would let the client in; browsers get a page, others plain text.
fn unauthorized(html: bool, hostname: &str, policy: &AccessPolicy) -> Response<ProxyBody> {
    let mut ways = Vec::new();
    if policy.api_key.is_some() {
        ways.push("an API key (Authorization: Bearer <key> or X-Edgible-Key: <key>)");
    }
    if policy.short_code.is_some() {
        ways.push("the access code (?code=<code>)");
    }
    if policy.organization.is_some() {
        ways.push("signing in with a browser");
    }
    let mut message = format!("{hostname} needs ");
    for (index, way) in ways.iter().enumerate() {
        if index > 0 {
            message.push_str(if index + 1 == ways.len() { " or " } else { ", " });
        }
        message.push_str(way);
    }
    let _ = write!(message, ".");
    let mut response = if html {
        page(StatusCode::UNAUTHORIZED, "Authentication required", &message)
    } else {
        text(StatusCode::UNAUTHORIZED, &message)
    };
    // The hostname is a validated DNS name (the SNI name): no quote or control character.
    if let Ok(challenge) = HeaderValue::from_str(&format!("Bearer realm=\"{hostname}\"")) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

/// 503 while the policies of the application are not known.
/// 503 while the device lacks what it needs to check the request: the access configuration,
/// or the application itself (it just left this device, e.g. migrated away). The connection
/// ends with the answer, so the client's retry opens a new one, which the edge routes to
/// wherever the application runs now.
fn not_ready() -> Response<ProxyBody> {
    let mut response = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Not available yet",
        "Access configuration not received yet: this device cannot check who may open this site. \
         Please try again in a moment.",
    );
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn redirect(status: StatusCode, location: &str) -> Response<ProxyBody> {
    let mut response = page(status, "Redirecting", "You are being redirected.");
    match HeaderValue::from_str(location) {
        Ok(location) => {
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        // Locations are built from validated URLs and paths; were one not a valid header, the
        // visitor is told rather than sent nowhere.
        Err(_) => page(StatusCode::INTERNAL_SERVER_ERROR, "Redirect failed", "The redirect could not be made."),
    }
}

fn text(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response =
        Response::new(Full::new(Bytes::from(format!("{message}\n"))).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use edgible::access::{Assertion, AssertionSigner};
    use edgible::model::{ApiKeyAccess, OrganizationAccess, Role, ShortCodeAccess, UserId};
    use edgible::protocol::v1::{AccessKeyDigest, ShortCodeDigest};

    use super::*;

    const HOST: &str = "app.example.test";
    const API_KEY: &str = "edg_app_key_secret";
    const CODE: &str = "abc123";

    type TestRequest = Request<Full<Bytes>>;

    struct Setup {
        control: Arc<AccessControl>,
        signer: AssertionSigner,
        gate: Arc<ApplicationGate>,
        now: DateTime<Utc>,
        instant: Instant,
    }

    fn policy(organization: bool, api_key: bool, short_code: bool) -> AccessPolicy {
        AccessPolicy {
            organization: organization.then(OrganizationAccess::default),
            api_key: api_key.then(ApiKeyAccess::default),
            short_code: short_code.then(ShortCodeAccess::default),
        }
    }

    fn gate(policy: AccessPolicy) -> ApplicationGate {
        let application_id = ApplicationId::new();
        ApplicationGate {
            application_id,
            organization_id: OrganizationId::new(),
            policy,
            secrets: Some(ApplicationAccess {
                application_id,
                api_keys: vec![AccessKeyDigest { sha256: sha256_hex(API_KEY), expires_at: None }],
                short_code: Some(ShortCodeDigest {
                    sha256: short_code_digest(application_id, CODE),
                    version: 1,
                    expires_at: None,
                }),
            }),
        }
    }

    fn settings(signer: &AssertionSigner) -> AccessSettings {
        AccessSettings::new("https://login.example.test/", vec![signer.public_key()], 300)
    }

    fn setup(policy: AccessPolicy) -> Setup {
        let signer = AssertionSigner::from_pkcs8("k1", &AssertionSigner::generate_pkcs8().unwrap()).unwrap();
        let control = AccessControl::new(CookieKey::random());
        let gate = Arc::new(gate(policy));
        let setup = Setup { control, signer, gate, now: Utc::now(), instant: Instant::now() };
        setup.install(&[(HOST, &setup.gate)]);
        setup
    }

    impl Setup {
        fn install(&self, gates: &[(&str, &Arc<ApplicationGate>)]) {
            let mut table = AccessTable::new(Some(settings(&self.signer)));
            for (hostname, gate) in gates {
                table.insert(hostname, Arc::clone(gate));
            }
            self.control.replace(table);
        }

        fn visit(&self) -> Visit<'static> {
            self.visit_at(HOST, 0)
        }

        fn visit_at(&self, hostname: &'static str, later_seconds: u64) -> Visit<'static> {
            let later = Duration::from_secs(later_seconds);
            Visit {
                hostname,
                client: "203.0.113.7:50123".parse().unwrap(),
                now: self.now + chrono::Duration::from_std(later).unwrap(),
                instant: self.instant + later,
            }
        }

        async fn send(&self, request: TestRequest) -> Result<TestRequest, Response<ProxyBody>> {
            self.control.authorize(request, &self.visit()).await
        }

        /// A signed assertion for the login that `redirect` started.
        fn assertion(&self, state: &str, organization_id: OrganizationId, role: Role, jti: &str) -> String {
            self.signer.sign(&Assertion {
                iss: "https://login.example.test".into(),
                aud: HOST.parse().unwrap(),
                sub: UserId::new(),
                email: "ada@example.test".into(),
                name: Some("Ada".into()),
                organization_id,
                role,
                state: state.into(),
                iat: self.now.timestamp(),
                exp: self.now.timestamp() + 60,
                jti: jti.into(),
            })
        }
    }

    fn request(path: &str) -> http::request::Builder {
        Request::get(path).header(header::HOST, HOST)
    }

    fn browser(path: &str) -> http::request::Builder {
        request(path).header(header::ACCEPT, "text/html,application/xhtml+xml,*/*;q=0.8")
    }

    fn build(builder: http::request::Builder) -> TestRequest {
        builder.body(Full::new(Bytes::new())).unwrap()
    }

    /// The value a response sets cookie `name` to, and its Max-Age.
    fn set_cookie(response: &Response<ProxyBody>, name: &str) -> Option<(String, String)> {
        response.headers().get_all(header::SET_COOKIE).iter().find_map(|value| {
            let text = value.to_str().unwrap();
            let value = text.strip_prefix(&format!("{name}="))?.split(';').next()?.to_owned();
            let max_age = text.rsplit("Max-Age=").next()?.to_owned();
            Some((value, max_age))
        })
    }

    fn location(response: &Response<ProxyBody>) -> String {
        response.headers()[header::LOCATION].to_str().unwrap().to_owned()
    }

    async fn body(response: Response<ProxyBody>) -> String {
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    fn refused(outcome: Result<TestRequest, Response<ProxyBody>>) -> Response<ProxyBody> {
        match outcome {
            Ok(request) => panic!("let through: {:?}", request.uri()),
            Err(response) => response,
        }
    }

    fn passed(outcome: Result<TestRequest, Response<ProxyBody>>) -> TestRequest {
        match outcome {
            Ok(request) => request,
            Err(response) => panic!("refused with {}", response.status()),
        }
    }

    #[tokio::test]
    async fn public_applications_pass_without_forged_headers_or_the_proxys_cookies() {
        let setup = setup(AccessPolicy::default());
        let forwarded = passed(
            setup
                .send(build(
                    request("/x?code=1")
                        .header("x-edgible-user", "forged")
                        .header("X-Edgible-Email", "forged@example.test")
                        .header("x-edgible-anything", "forged")
                        .header(header::AUTHORIZATION, "Bearer theirs")
                        .header(header::COOKIE, "theirs=1; __Host-edgible_session=abc"),
                ))
                .await,
        );
        let headers = forwarded.headers();
        assert!(headers.keys().all(|name| !name.as_str().starts_with("x-edgible-")), "{headers:?}");
        assert_eq!(headers[header::AUTHORIZATION], "Bearer theirs");
        assert_eq!(headers[header::COOKIE], "theirs=1");
        assert_eq!(forwarded.uri(), "/x?code=1");

        // An open table (a proxy without a data path) lets every hostname through too.
        let open = AccessControl::new(CookieKey::random());
        assert!(open.authorize(build(request("/")), &setup.visit()).await.is_ok());
        assert!(open.allows_raw(HOST));
    }

    #[tokio::test]
    async fn unknown_policies_and_missing_configuration_refuse_instead_of_failing_open() {
        let setup = setup(policy(false, true, false));
        // A hostname the strict table does not know.
        let response =
            refused(setup.control.authorize(build(request("/")), &setup.visit_at("other.example.test", 0)).await);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!setup.control.allows_raw("other.example.test"));
        assert!(!setup.control.allows_raw(HOST), "raw TCP cannot carry a policy");

        // A policy but no `access` message yet.
        let mut table = AccessTable::new(None);
        table.insert(HOST, Arc::clone(&setup.gate));
        setup.control.replace(table);
        let response = refused(setup.send(build(request("/").header("x-edgible-key", API_KEY))).await);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(response).await.contains("Access configuration not received yet"));
    }

    #[tokio::test]
    async fn api_keys_in_either_header_pass_and_are_not_forwarded() {
        let setup = setup(policy(false, true, false));
        let forwarded =
            passed(setup.send(build(request("/").header(header::AUTHORIZATION, format!("Bearer {API_KEY}")))).await);
        assert!(forwarded.headers().get(header::AUTHORIZATION).is_none());
        let forwarded = passed(setup.send(build(request("/").header("X-Edgible-Key", API_KEY))).await);
        assert!(forwarded.headers().get("x-edgible-key").is_none());
        // A key for the proxy in one header, the workload's own token in the other: both kept apart.
        let forwarded = passed(
            setup
                .send(build(
                    request("/").header("x-edgible-key", API_KEY).header(header::AUTHORIZATION, "Bearer theirs"),
                ))
                .await,
        );
        assert_eq!(forwarded.headers()[header::AUTHORIZATION], "Bearer theirs");
        let forwarded = passed(
            setup
                .send(build(
                    request("/")
                        .header("x-edgible-key", API_KEY)
                        .header(header::AUTHORIZATION, format!("Bearer {API_KEY}")),
                ))
                .await,
        );
        assert!(forwarded.headers().get(header::AUTHORIZATION).is_none(), "our key never reaches the workload");
        passed(
            setup
                .send(build(
                    request("/")
                        .header("x-edgible-key", "stale")
                        .header(header::AUTHORIZATION, format!("Bearer {API_KEY}")),
                ))
                .await,
        );

        for wrong in [
            request("/").header(header::AUTHORIZATION, "Bearer edg_wrong"),
            request("/").header(header::AUTHORIZATION, format!("Basic {API_KEY}")),
            request("/").header("x-edgible-key", ""),
            request("/"),
        ] {
            let response = refused(setup.send(build(wrong)).await);
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer realm=\"app.example.test\"");
            assert!(body(response).await.contains("API key"));
        }

        // An expired key, and a key revoked by a new table, are refused at once.
        let mut expired = (*setup.gate).clone();
        if let Some(secrets) = &mut expired.secrets {
            secrets.api_keys[0].expires_at = Some(setup.now - chrono::Duration::seconds(1));
        }
        setup.install(&[(HOST, &Arc::new(expired))]);
        assert!(setup.send(build(request("/").header("x-edgible-key", API_KEY))).await.is_err());
        let mut revoked = (*setup.gate).clone();
        if let Some(secrets) = &mut revoked.secrets {
            secrets.api_keys.clear();
        }
        setup.install(&[(HOST, &Arc::new(revoked))]);
        assert!(setup.send(build(request("/").header("x-edgible-key", API_KEY))).await.is_err());

        // A key is worth nothing where the policy does not take keys.
        let setup = self::setup(policy(true, false, false));
        let response = refused(setup.send(build(request("/").header("x-edgible-key", API_KEY))).await);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_right_code_sets_the_cookie_and_redirects_to_the_same_url_without_it() {
        let setup = setup(policy(false, false, true));
        let response = refused(setup.send(build(browser(&format!("/page?x=1&code={CODE}&y=2")))).await);
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&response), "/page?x=1&y=2");
        let (cookie, max_age) = set_cookie(&response, CODE_COOKIE).expect("a code cookie");
        assert_eq!(max_age, CODE_COOKIE_SECONDS.to_string());
        let forwarded = passed(
            setup.send(build(request("/page?x=1&y=2").header(header::COOKIE, format!("{CODE_COOKIE}={cookie}")))).await,
        );
        assert!(forwarded.headers().get(header::COOKIE).is_none(), "the cookie is not forwarded");

        // A rotated code (a new version) ends the cookie.
        let mut rotated = (*setup.gate).clone();
        if let Some(code) = rotated.secrets.as_mut().and_then(|secrets| secrets.short_code.as_mut()) {
            code.version = 2;
            code.sha256 = short_code_digest(rotated.application_id, "xyz789");
        }
        setup.install(&[(HOST, &Arc::new(rotated))]);
        let response =
            refused(setup.send(build(browser("/").header(header::COOKIE, format!("{CODE_COOKIE}={cookie}")))).await);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(body(response).await.contains("<form method=\"post\" action=\"/.edgible/code\">"));
    }

    #[tokio::test]
    async fn wrong_codes_are_refused_then_locked_out_and_expired_codes_refused() {
        let setup = setup(policy(false, false, true));
        for _ in 0..5 {
            let response = refused(setup.send(build(browser("/?code=wrong1"))).await);
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert!(body(response).await.contains("That code is not right."));
        }
        let response = refused(setup.send(build(request("/?code=wrong1"))).await);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "the sixth failure is counted, then locks");
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer realm=\"app.example.test\"");
        // Locked: even the right code is not looked at.
        let response = refused(setup.send(build(request(&format!("/?code={CODE}")))).await);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        // Once the lockout is over, the right code passes.
        let later = setup.visit_at(HOST, 1);
        let response = refused(setup.control.authorize(build(request(&format!("/?code={CODE}"))), &later).await);
        assert_eq!(response.status(), StatusCode::SEE_OTHER);

        let mut expired = (*setup.gate).clone();
        if let Some(code) = expired.secrets.as_mut().and_then(|secrets| secrets.short_code.as_mut()) {
            code.expires_at = Some(setup.now - chrono::Duration::seconds(1));
        }
        setup.install(&[(HOST, &Arc::new(expired))]);
        let response = refused(setup.send(build(browser(&format!("/?code={CODE}")))).await);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(body(response).await.contains("expired"));
    }

    #[tokio::test]
    async fn the_code_form_posts_and_returns_only_to_local_paths() {
        let setup = setup(policy(false, false, true));
        let response = refused(setup.send(build(browser("/.edgible/code?return_to=/docs"))).await);
        assert_eq!(response.status(), StatusCode::OK);
        assert!(body(response).await.contains("name=\"return_to\" value=\"/docs\""));

        let post = |form: String| {
            Request::post(CODE_PATH)
                .header(header::HOST, HOST)
                .header(header::ACCEPT, "text/html")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form)))
                .unwrap()
        };
        let response = refused(setup.send(post(format!("code={CODE}&return_to=%2Fdocs%3Fa%3D1"))).await);
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&response), "/docs?a=1");
        assert!(set_cookie(&response, CODE_COOKIE).is_some());
        for evil in ["//evil.example", "https://evil.example/", "/\\evil.example", "/.edgible/logout"] {
            let form = form_urlencoded::Serializer::new(String::new())
                .append_pair("code", CODE)
                .append_pair("return_to", evil)
                .finish();
            let response = refused(setup.send(post(form)).await);
            assert_eq!(location(&response), "/", "{evil}");
        }
        let response = refused(setup.send(post("code=nope00&return_to=%2Fdocs".into())).await);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let page = body(response).await;
        assert!(page.contains("That code is not right.") && !page.contains("nope00"), "the code is not echoed");
    }

    /// Walks a browser through the login: the redirect, then the callback with an assertion
    /// the test signs. Returns the session cookie.
    async fn login(setup: &Setup, role: Role, jti: &str) -> Result<String, Response<ProxyBody>> {
        let response = refused(setup.send(build(browser("/private?a=1"))).await);
        assert_eq!(response.status(), StatusCode::FOUND);
        let login_page = Url::parse(&location(&response)).unwrap();
        assert_eq!((login_page.host_str(), login_page.path()), (Some("login.example.test"), "/login"));
        let query: HashMap<String, String> = login_page.query_pairs().into_owned().collect();
        assert_eq!(query["host"], HOST);
        let state = query["state"].clone();
        assert!(state.len() <= MAX_STATE_CHARS);
        let (nonce, max_age) = set_cookie(&response, STATE_COOKIE).expect("a state cookie");
        assert_eq!(max_age, "600");

        let assertion = setup.assertion(&state, setup.gate.organization_id, role, jti);
        let callback = format!(
            "{CALLBACK_PATH}?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("assertion", &assertion)
                .append_pair("state", &state)
                .finish()
        );
        let response = refused(
            setup.send(build(browser(&callback).header(header::COOKIE, format!("{STATE_COOKIE}={nonce}")))).await,
        );
        if response.status() != StatusCode::FOUND {
            return Err(response);
        }
        assert_eq!(location(&response), "/private?a=1");
        assert_eq!(set_cookie(&response, STATE_COOKIE), Some((String::new(), "0".into())), "the state is cleared");
        let (session, max_age) = set_cookie(&response, SESSION_COOKIE).expect("a session cookie");
        assert_eq!(max_age, "300");
        Ok(session)
    }

    #[tokio::test]
    async fn a_login_sets_a_session_that_identifies_the_user_to_the_workload() {
        let setup = setup(policy(true, false, false));
        let session = login(&setup, Role::Member, "jti-1").await.unwrap();
        let forwarded = passed(
            setup
                .send(build(
                    request("/private")
                        .header(header::COOKIE, format!("{SESSION_COOKIE}={session}; theirs=2"))
                        .header("x-edgible-email", "forged@example.test"),
                ))
                .await,
        );
        assert_eq!(forwarded.headers()[EMAIL_HEADER], "ada@example.test");
        assert!(forwarded.headers()[USER_HEADER].to_str().unwrap().len() > 10);
        assert_eq!(forwarded.headers()[header::COOKIE], "theirs=2");

        // After the session's lifetime, the visitor goes through the login again.
        let expired = setup.visit_at(HOST, 300);
        let response = refused(
            setup
                .control
                .authorize(build(browser("/").header(header::COOKIE, format!("{SESSION_COOKIE}={session}"))), &expired)
                .await,
        );
        assert_eq!(response.status(), StatusCode::FOUND);

        // Not a browser: 401, never a redirect.
        let response = refused(setup.send(build(request("/").header(header::ACCEPT, "application/json"))).await);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(header::LOCATION).is_none());

        // Logout clears the session and goes to the server's logout page.
        let response = refused(setup.send(build(browser(LOGOUT_PATH))).await);
        assert_eq!(location(&response), "https://login.example.test/logout");
        assert_eq!(set_cookie(&response, SESSION_COOKIE), Some((String::new(), "0".into())));
    }

    #[tokio::test]
    async fn replayed_foreign_and_unwelcome_assertions_are_refused() {
        let organization = OrganizationAccess { roles: BTreeSet::from([Role::Admin, Role::Owner]) };
        let setup = setup(AccessPolicy { organization: Some(organization), ..AccessPolicy::default() });
        let response = login(&setup, Role::Member, "jti-member").await.unwrap_err();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(body(response).await.contains("role"));
        login(&setup, Role::Admin, "jti-admin").await.unwrap();
        let response = login(&setup, Role::Admin, "jti-admin").await.unwrap_err();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(body(response).await.contains("already used"));

        // Another organization's member.
        let response = refused(setup.send(build(browser("/"))).await);
        let state: HashMap<String, String> =
            Url::parse(&location(&response)).unwrap().query_pairs().into_owned().collect();
        let (nonce, _) = set_cookie(&response, STATE_COOKIE).unwrap();
        let foreign = setup.assertion(&state["state"], OrganizationId::new(), Role::Owner, "jti-foreign");
        let callback = |assertion: &str, state: &str, nonce: &str| {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("assertion", assertion)
                .append_pair("state", state)
                .finish();
            build(
                browser(&format!("{CALLBACK_PATH}?{query}")).header(header::COOKIE, format!("{STATE_COOKIE}={nonce}")),
            )
        };
        let response = refused(setup.send(callback(&foreign, &state["state"], &nonce)).await);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(body(response).await.contains("another organization"));

        // A state cookie of another login (another tab, or an attacker's link).
        let fresh = setup.assertion(&state["state"], setup.gate.organization_id, Role::Owner, "jti-fresh");
        let response = refused(setup.send(callback(&fresh, &state["state"], "someone-elses-nonce")).await);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        // A forged state.
        let response = refused(setup.send(callback(&fresh, "forged.state", &nonce)).await);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        // An assertion signed by a key the device does not know.
        let stranger = AssertionSigner::from_pkcs8("k1", &AssertionSigner::generate_pkcs8().unwrap()).unwrap();
        let forged = stranger.sign(&Assertion {
            iss: "x".into(),
            aud: HOST.parse().unwrap(),
            sub: UserId::new(),
            email: "eve@example.test".into(),
            name: None,
            organization_id: setup.gate.organization_id,
            role: Role::Owner,
            state: state["state"].clone(),
            iat: setup.now.timestamp(),
            exp: setup.now.timestamp() + 60,
            jti: "jti-forged".into(),
        });
        let response = refused(setup.send(callback(&forged, &state["state"], &nonce)).await);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(body(response).await.contains("signature is wrong"));
    }

    #[tokio::test]
    async fn any_of_several_policies_lets_in_and_the_refusal_names_them_all() {
        let setup = setup(policy(true, true, true));
        passed(setup.send(build(request("/").header("x-edgible-key", API_KEY))).await);
        let session = login(&setup, Role::Member, "jti-any").await.unwrap();
        passed(setup.send(build(request("/").header(header::COOKIE, format!("{SESSION_COOKIE}={session}")))).await);
        let response = refused(setup.send(build(request(&format!("/?code={CODE}")))).await);
        assert_eq!(response.status(), StatusCode::SEE_OTHER);

        let response = refused(setup.send(build(request("/"))).await);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let text = body(response).await;
        assert!(text.contains("API key") && text.contains("?code=") && text.contains("signing in"), "{text}");
        // A browser is sent to the login (the organization policy), not to the code form.
        let response = refused(setup.send(build(browser("/"))).await);
        assert_eq!(response.status(), StatusCode::FOUND);
        // The proxy's paths of absent policies belong to the workload.
        let setup = self::setup(policy(false, true, false));
        passed(setup.send(build(request(CALLBACK_PATH).header("x-edgible-key", API_KEY))).await);
    }

    #[tokio::test]
    async fn a_cookie_of_one_application_is_worthless_at_another() {
        let setup = setup(policy(true, false, true));
        let other = Arc::new(gate(policy(true, false, true)));
        setup.install(&[(HOST, &setup.gate), ("other.example.test", &other)]);
        let session = login(&setup, Role::Member, "jti-a").await.unwrap();
        let response = refused(setup.send(build(request(&format!("/?code={CODE}")))).await);
        let (code, _) = set_cookie(&response, CODE_COOKIE).unwrap();
        let cookies = format!("{SESSION_COOKIE}={session}; {CODE_COOKIE}={code}");
        passed(setup.send(build(request("/").header(header::COOKIE, cookies.clone()))).await);
        let at_other = setup.visit_at("other.example.test", 0);
        let response = refused(
            setup
                .control
                .authorize(
                    build(Request::get("/").header(header::HOST, "other.example.test").header(header::COOKIE, cookies)),
                    &at_other,
                )
                .await,
        );
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}
