//! The login pages at the server's root (not under `/v1`): `GET /login?host=&state=`,
//! `POST /login` and `GET /logout`, the server's half of the organization login flow.
//!
//! A device's proxy sends a visitor without a session here with the application's hostname and
//! a `state` it signed. With a valid login (the `edgible_login` cookie, a row in
//! `login_sessions` holding only the SHA-256 of its secret, 12 h) the server *authorizes* at
//! once; otherwise it shows a form. Authorizing finds the application holding `host` (404 page
//! if none or if it has no `organization` policy), checks that the user is a member of its
//! organization with an allowed role (403 "no access" page otherwise; checked at every visit,
//! so a removed member loses access at their next refresh), and redirects to
//! `https://<host>/.edgible/callback` with an assertion signed by the current key (aud = host,
//! 60 s) and the state echoed. Failed logins are rate limited per client address and per
//! e-mail address (`limiter`, 429 page). The pages are plain HTML (no JavaScript), every
//! value escaped.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{TimeDelta, Utc};
use edgible::access::Assertion;
use edgible::model::{Application, Hostname, Member};
use serde::Deserialize;

use super::limiter::LimitKey;
use super::{AccessError, LOGIN_SESSION_LIFETIME};
use crate::AppState;
use crate::db::LoginUser;
use crate::secrets::{NewSecret, sha256_hex};

/// The login cookie's name.
pub const LOGIN_COOKIE: &str = "edgible_login";
/// The longest `state` accepted (the contract's bound).
pub const MAX_STATE_CHARS: usize = 512;
/// The longest e-mail address accepted.
const MAX_EMAIL_CHARS: usize = 320;
/// The longest password accepted (the model's bound).
const MAX_PASSWORD_CHARS: usize = 256;

/// The query of `GET /login`. Unknown parameters are ignored; both are checked by hand so the
/// 400 page names the field.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    host: Option<String>,
    state: Option<String>,
}

/// The form `POST /login` takes.
#[derive(Deserialize)]
pub struct LoginForm {
    email: Option<String>,
    password: Option<String>,
    host: Option<String>,
    state: Option<String>,
}

/// Where the visitor wants to go: a checked hostname and state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: Hostname,
    state: String,
}

/// A field of the request was wrong: the 400 page names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BadField {
    field: &'static str,
    message: &'static str,
}

/// Checks `host` (a plain hostname) and `state` (1-512 URL-safe characters).
fn target(host: Option<&str>, state: Option<&str>) -> Result<Target, BadField> {
    let host = host.unwrap_or_default();
    if host.is_empty() {
        return Err(BadField { field: "host", message: "is missing" });
    }
    if host.len() > 253 {
        return Err(BadField { field: "host", message: "is too long for a hostname" });
    }
    let host: Hostname = host.parse().map_err(|_| BadField { field: "host", message: "is not a valid hostname" })?;
    if host.is_wildcard() {
        return Err(BadField { field: "host", message: "must be a hostname, not a wildcard" });
    }
    let state = state.unwrap_or_default();
    if state.is_empty() {
        return Err(BadField { field: "state", message: "is missing" });
    }
    if state.chars().count() > MAX_STATE_CHARS {
        return Err(BadField { field: "state", message: "is longer than 512 characters" });
    }
    if !state.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '=')) {
        return Err(BadField { field: "state", message: "may hold only letters, digits and - _ . ~ =" });
    }
    Ok(Target { host, state: state.to_owned() })
}

/// `GET /login`: authorize at once with a valid login, otherwise show the form.
pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return bad_request(&BadField { field: "query", message: "is not a valid query string" });
    };
    let target = match target(query.host.as_deref(), query.state.as_deref()) {
        Ok(target) => target,
        Err(bad) => return bad_request(&bad),
    };
    match logged_in_user(&state, &headers).await {
        Ok(Some(user)) => authorize(&state, &user, &target).await,
        Ok(None) => form_page(StatusCode::OK, &target, "", None),
        Err(error) => internal(&error),
    }
}

/// `POST /login`: check the password (rate limited), start a login session, then authorize.
pub async fn login_submit(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return bad_request(&BadField { field: "form", message: "must be a form (application/x-www-form-urlencoded)" });
    };
    let target = match target(form.host.as_deref(), form.state.as_deref()) {
        Ok(target) => target,
        Err(bad) => return bad_request(&bad),
    };
    let email = form.email.unwrap_or_default().trim().to_owned();
    let password = form.password.unwrap_or_default();
    if email.is_empty() || email.chars().count() > MAX_EMAIL_CHARS {
        return form_page(StatusCode::BAD_REQUEST, &target, &email, Some("Enter the e-mail address you sign in with."));
    }
    if password.is_empty() || password.chars().count() > MAX_PASSWORD_CHARS {
        return form_page(StatusCode::BAD_REQUEST, &target, &email, Some("Enter your password."));
    }
    let keys = [LimitKey::Address(address), LimitKey::email(&email)];
    if let Err(wait) = state.login_limiter().check(&keys, Instant::now()) {
        return too_many(wait.as_secs().max(1));
    }
    let user = match state.db().login_user_by_email(&email).await {
        Ok(user) => user,
        Err(error) => return internal(&error.into()),
    };
    let stored = user.as_ref().and_then(|user| user.password_hash.clone());
    let typed = password.clone();
    let matches =
        tokio::task::spawn_blocking(move || super::verify_password(stored.as_deref(), &typed)).await.unwrap_or(false);
    let Some(user) = user.filter(|_| matches) else {
        state.login_limiter().failed(&keys, Instant::now());
        tracing::info!("a login failed: wrong e-mail address or password");
        return form_page(
            StatusCode::UNAUTHORIZED,
            &target,
            &email,
            Some("The e-mail address or the password is wrong."),
        );
    };
    state.login_limiter().succeeded(&LimitKey::email(&email));
    let secret = NewSecret::login_session();
    let lifetime = TimeDelta::from_std(LOGIN_SESSION_LIFETIME).unwrap_or(TimeDelta::hours(12));
    if let Err(error) = state.db().create_login_session(user.id, &secret.sha256, Utc::now() + lifetime).await {
        return internal(&error.into());
    }
    tracing::info!(user = %user.id, "signed in on the login page");
    let mut response = authorize(&state, &user, &target).await;
    let cookie = format!(
        "{LOGIN_COOKIE}={}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}{}",
        secret.secret,
        LOGIN_SESSION_LIFETIME.as_secs(),
        if state.access_settings().https() { "; Secure" } else { "" }
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// `GET /logout`: ends the login session and says so.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(secret) = cookie(&headers, LOGIN_COOKIE)
        && let Err(error) = state.db().delete_login_session(&sha256_hex(secret)).await
    {
        return internal(&error.into());
    }
    let mut response = page(
        StatusCode::OK,
        "Signed out",
        "<h1>Signed out</h1>\n<p>You are signed out. Applications you visited sign you out when their session ends; \
         use their sign-out link to leave them now.</p>",
    );
    let clear = format!(
        "{LOGIN_COOKIE}=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0{}",
        if state.access_settings().https() { "; Secure" } else { "" }
    );
    if let Ok(value) = HeaderValue::from_str(&clear) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// The user of the request's valid login cookie.
async fn logged_in_user(state: &AppState, headers: &HeaderMap) -> Result<Option<LoginUser>, AccessError> {
    let Some(secret) = cookie(headers, LOGIN_COOKIE) else {
        return Ok(None);
    };
    Ok(state.db().login_session_user(&sha256_hex(secret), Utc::now()).await?)
}

/// What authorizing `user` for an application decides.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// No application holds the host, or it has no `organization` policy.
    UnknownHost,
    /// The user may not enter.
    Refused,
    /// The user may enter as this member.
    Allowed(Box<Member>),
}

/// The rule itself: the application must have an `organization` policy and the user must be
/// a member with one of its roles (any role when it names none).
fn decide(application: Option<&Application>, membership: Option<Member>) -> Decision {
    let Some(policy) = application.and_then(|application| application.spec.access.organization.as_ref()) else {
        return Decision::UnknownHost;
    };
    match membership {
        Some(member) if policy.roles.is_empty() || policy.roles.contains(&member.spec.role) => {
            Decision::Allowed(Box::new(member))
        }
        _ => Decision::Refused,
    }
}

/// Checks membership and answers the redirect with an assertion, or the page saying why not.
async fn authorize(state: &AppState, user: &LoginUser, target: &Target) -> Response {
    let application = match state.db().application_by_hostname(&target.host).await {
        Ok(application) => application,
        Err(error) => return internal(&error.into()),
    };
    let membership = match &application {
        Some(application) => match state.db().membership(application.organization_id, user.id).await {
            Ok(membership) => membership,
            Err(error) => return internal(&error.into()),
        },
        None => None,
    };
    match decide(application.as_ref(), membership) {
        Decision::UnknownHost => unknown_host(&target.host),
        Decision::Refused => {
            tracing::info!(user = %user.id, host = %target.host, "refused: not a member with an allowed role");
            no_access(&user.email, &target.host)
        }
        Decision::Allowed(member) => match sign(state, user, &member, target).await {
            Ok(token) => {
                let location = format!(
                    "https://{}/.edgible/callback?assertion={}&state={}",
                    target.host,
                    percent_encode(&token),
                    percent_encode(&target.state)
                );
                tracing::info!(user = %user.id, host = %target.host, "signed an assertion");
                redirect(&location)
            }
            Err(error) => internal(&error),
        },
    }
}

/// The assertion for `member` entering `target`, signed by the current key.
async fn sign(state: &AppState, user: &LoginUser, member: &Member, target: &Target) -> Result<String, AccessError> {
    let settings = state.access_settings();
    let signer = super::current_signer(state.db(), settings).await?;
    let now = Utc::now().timestamp();
    let lifetime = i64::try_from(super::ASSERTION_LIFETIME.as_secs()).unwrap_or(60);
    let assertion = Assertion {
        iss: settings.public_url.clone(),
        aud: target.host.clone(),
        sub: user.id,
        email: user.email.clone(),
        name: member.spec.display_name.clone(),
        organization_id: member.organization_id,
        role: member.spec.role,
        state: target.state.clone(),
        iat: now,
        exp: now + lifetime,
        jti: crate::secrets::random_id(),
    };
    Ok(signer.sign(&assertion))
}

/// The address a request came from, as far as this server can tell: the peer of the TCP
/// connection when the server runs with connection info (`serve` does). A proxy in front of
/// the server makes all clients one address; the per-e-mail limit still holds.
#[derive(Debug, Clone)]
pub struct ClientAddress(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip().to_string());
        Ok(ClientAddress(peer.unwrap_or_else(|| "unknown".to_owned())))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Escapes text for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;\
line-height:1.5;color:#1a1a1a}label{display:block;margin-top:1rem;font-weight:600}\
input{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box;border:1px solid #555}\
button{margin-top:1.5rem;padding:.6rem 1.2rem;font-size:1rem}\
.error{border-left:4px solid #b00020;padding:.5rem;background:#fdecee;color:#5c000f}\
:focus{outline:3px solid #1a5fb4}";

/// A whole HTML page; `body` is already escaped.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} - Edgible</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n",
        escape(title)
    );
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// The sign-in form, with an error when a try failed.
fn form_page(status: StatusCode, target: &Target, email: &str, error: Option<&str>) -> Response {
    let error_region = match error {
        Some(error) => format!("<p id=\"error\" class=\"error\" role=\"alert\">{}</p>\n", escape(error)),
        None => "<div id=\"error\" role=\"alert\"></div>\n".to_owned(),
    };
    let body = format!(
        "<h1>Sign in</h1>\n<p>Sign in to continue to <strong>{host}</strong>.</p>\n{error_region}\
         <form method=\"post\" action=\"/login\" aria-describedby=\"error\">\n\
         <input type=\"hidden\" name=\"host\" value=\"{host}\">\n\
         <input type=\"hidden\" name=\"state\" value=\"{state}\">\n\
         <label for=\"email\">E-mail address</label>\n\
         <input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" required value=\"{email}\"{focus_email}>\n\
         <label for=\"password\">Password</label>\n\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required{focus_password}>\n\
         <button type=\"submit\">Sign in</button>\n</form>",
        host = escape(target.host.as_ref()),
        state = escape(&target.state),
        email = escape(email),
        focus_email = if email.is_empty() { " autofocus" } else { "" },
        focus_password = if email.is_empty() { "" } else { " autofocus" },
    );
    page(status, "Sign in", &body)
}

fn bad_request(bad: &BadField) -> Response {
    let body = format!(
        "<h1>Bad request</h1>\n<p class=\"error\" role=\"alert\">The <code>{}</code> parameter {}.</p>\n\
         <p>Go back to the application and try again.</p>",
        escape(bad.field),
        escape(bad.message)
    );
    page(StatusCode::BAD_REQUEST, "Bad request", &body)
}

fn unknown_host(host: &Hostname) -> Response {
    let body = format!(
        "<h1>Unknown application</h1>\n<p>No application at <strong>{}</strong> signs its visitors in here.</p>",
        escape(host.as_ref())
    );
    page(StatusCode::NOT_FOUND, "Unknown application", &body)
}

fn no_access(email: &str, host: &Hostname) -> Response {
    let body = format!(
        "<h1>No access</h1>\n<p class=\"error\" role=\"alert\">You are signed in as <strong>{}</strong>, \
         who is not allowed into <strong>{}</strong>.</p>\n\
         <p>Ask an administrator of its organization for access, or <a href=\"/logout\">sign out</a> \
         and sign in as someone else.</p>",
        escape(email),
        escape(host.as_ref())
    );
    page(StatusCode::FORBIDDEN, "No access", &body)
}

fn too_many(retry_after: u64) -> Response {
    let body = format!(
        "<h1>Too many attempts</h1>\n<p class=\"error\" role=\"alert\">Too many failed sign-in attempts. \
         Try again in {retry_after} seconds.</p>"
    );
    let mut response = page(StatusCode::TOO_MANY_REQUESTS, "Too many attempts", &body);
    if let Ok(value) = HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn internal(error: &AccessError) -> Response {
    tracing::error!(%error, "a login page failed");
    page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Error",
        "<h1>Something went wrong</h1>\n<p class=\"error\" role=\"alert\">The server could not handle the \
         sign-in. It has been logged; try again later.</p>",
    )
}

fn redirect(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(value) => {
            let mut response = StatusCode::FOUND.into_response();
            response.headers_mut().insert(header::LOCATION, value);
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            response
        }
        // Every part is percent-encoded or a checked hostname, so this does not happen.
        Err(_) => internal(&AccessError::Key("the callback URL is not a valid header".into())),
    }
}

#[cfg(test)]
mod tests {
    use edgible::model::{AccessPolicy, MemberId, MemberSpec, OrganizationAccess, OrganizationId, Role, UserId};

    use super::*;

    #[test]
    fn host_and_state_are_checked_and_named() {
        assert!(target(Some("app.example.test"), Some("abc.DEF-_~=")).is_ok());
        let field = |host: Option<&str>, state: Option<&str>| target(host, state).map_err(|bad| bad.field);
        assert_eq!(field(None, Some("s")), Err("host"));
        assert_eq!(field(Some("not a host"), Some("s")), Err("host"));
        assert_eq!(field(Some("*.example.test"), Some("s")), Err("host"));
        assert_eq!(field(Some(&"a".repeat(300)), Some("s")), Err("host"));
        assert_eq!(field(Some("app.example.test"), None), Err("state"));
        assert_eq!(field(Some("app.example.test"), Some("a b")), Err("state"));
        assert_eq!(field(Some("app.example.test"), Some("<script>")), Err("state"));
        assert_eq!(field(Some("app.example.test"), Some(&"a".repeat(513))), Err("state"));
        assert!(target(Some("app.example.test"), Some(&"a".repeat(512))).is_ok());
    }

    #[test]
    fn html_and_urls_are_escaped() {
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(percent_encode("a.b-c_d~e f/g=h"), "a.b-c_d~e%20f%2Fg%3Dh");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; edgible_login=secret; b=2"));
        assert_eq!(cookie(&headers, LOGIN_COOKIE), Some("secret"));
        assert_eq!(cookie(&headers, "edgible"), None);
    }

    fn application(roles: Option<&[Role]>) -> Application {
        let spec = serde_json::json!({
            "name": "web", "hostnames": ["web.example.test"], "workload": {"process": {"command": "/bin/web"}},
            "port": 80
        });
        let mut spec: edgible::model::ApplicationSpec =
            edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec");
        spec.access = AccessPolicy {
            organization: roles.map(|roles| OrganizationAccess { roles: roles.iter().copied().collect() }),
            ..AccessPolicy::default()
        };
        Application {
            id: edgible::model::ApplicationId::new(),
            organization_id: OrganizationId::new(),
            revision: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            spec,
        }
    }

    fn member(role: Role) -> Member {
        Member {
            id: MemberId::new(),
            organization_id: OrganizationId::new(),
            user_id: UserId::new(),
            revision: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            spec: MemberSpec { email: "ada@example.test".into(), display_name: None, role },
        }
    }

    #[test]
    fn members_with_an_allowed_role_are_let_in() {
        assert_eq!(decide(None, Some(member(Role::Owner))), Decision::UnknownHost);
        assert_eq!(decide(Some(&application(None)), Some(member(Role::Owner))), Decision::UnknownHost);
        let any_role = application(Some(&[]));
        assert!(matches!(decide(Some(&any_role), Some(member(Role::Member))), Decision::Allowed(_)));
        assert_eq!(decide(Some(&any_role), None), Decision::Refused);
        let admins = application(Some(&[Role::Admin, Role::Owner]));
        assert!(matches!(decide(Some(&admins), Some(member(Role::Admin))), Decision::Allowed(_)));
        assert_eq!(decide(Some(&admins), Some(member(Role::Member))), Decision::Refused);
    }
}
