//! Access policies on the server (issue 7): passwords, application keys, `access`-scope API
//! keys, short codes, the login pages and the rotation of assertion keys.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use axum::http::{Method, header};
use chrono::Utc;
use edgible::access::{Expected, verify};
use edgible::model::{Hostname, Role};
use edgible_server::AppState;
use edgible_server::access::AccessSettings;
use serde_json::{Value, json};

use crate::support::{Answer, Org, TestApp, TestRequest, application, fleet, form_encode};

const PUBLIC_URL: &str = "https://login.example.test";
const PASSWORD: &str = "tr0ub4dor&3-horse";

async fn access_app(url: &str) -> anyhow::Result<(TestApp, AppState)> {
    TestApp::with_access_settings(url, AccessSettings::new(PUBLIC_URL, Duration::from_secs(300), None)).await
}

/// Adds a member with `role` and sets their password; answers the member id.
async fn member_with_password(app: &TestApp, org: &Org, email: &str, role: &str) -> anyhow::Result<String> {
    let id = app
        .post("/v1/members", &org.admin_key, json!({"email": email, "role": role}))
        .await?
        .expect(201)?
        .str("/id")?;
    app.put(&format!("/v1/members/{id}/password"), &org.admin_key, json!({"password": PASSWORD})).await?.expect(204)?;
    Ok(id)
}

/// An application of `org` at `host` with `access`.
async fn protected(app: &TestApp, org: &Org, name: &str, host: &str, access: Value) -> anyhow::Result<String> {
    let mut spec = application(name, &[host]);
    spec["access"] = access;
    app.post("/v1/applications", &org.admin_key, spec).await?.expect(201)?.str("/id")
}

fn login_path(host: &str, state: &str) -> String {
    format!("/login?host={}&state={}", form_encode(host), form_encode(state))
}

async fn login_form(app: &TestApp, host: &str, state: &str, cookie: Option<&str>) -> anyhow::Result<Answer> {
    let mut request = TestRequest::new(Method::GET, &login_path(host, state));
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    app.send(request).await
}

async fn log_in(app: &TestApp, email: &str, password: &str, host: &str, state: &str) -> anyhow::Result<Answer> {
    let form = [("email", email), ("password", password), ("host", host), ("state", state)];
    app.send(TestRequest::new(Method::POST, "/login").form(&form)).await
}

/// The `edgible_login=...` pair of a login answer's `Set-Cookie`.
fn login_cookie(answer: &Answer) -> anyhow::Result<String> {
    let set_cookie = answer
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with("edgible_login="))
        .context("no login cookie")?;
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Secure"] {
        ensure!(set_cookie.contains(attribute), "the login cookie lacks {attribute}: {set_cookie}");
    }
    Ok(set_cookie.split(';').next().unwrap_or_default().to_owned())
}

/// The assertion and state of a redirect to `https://<host>/.edgible/callback`.
fn callback(answer: &Answer, host: &str) -> anyhow::Result<(String, String)> {
    ensure!(answer.status.as_u16() == 302, "expected a redirect, got {}: {}", answer.status, answer.text);
    let location = answer.headers.get(header::LOCATION).context("no Location")?.to_str()?;
    let query = location
        .strip_prefix(&format!("https://{host}/.edgible/callback?"))
        .with_context(|| format!("not the callback of {host}: {location}"))?;
    let mut assertion = None;
    let mut state = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("assertion", value)) => assertion = Some(value.to_owned()),
            Some(("state", value)) => state = Some(value.to_owned()),
            _ => bail!("unexpected callback parameter {pair}"),
        }
    }
    Ok((assertion.context("no assertion")?, state.context("no state")?))
}

async fn check_assertion(
    state: &AppState,
    token: &str,
    host: &str,
    expected_state: &str,
) -> anyhow::Result<edgible::access::Assertion> {
    let keys = edgible_server::access::published_keys(state.db(), state.access_settings(), Utc::now()).await?;
    let audience: Hostname = host.parse()?;
    Ok(verify(token, &keys, Expected { audience: &audience, state: expected_state, now: Utc::now() })?)
}

/// A checked HTML page: the doctype, the language, and `needles` in its text.
fn html(answer: &Answer, status: u16, needles: &[&str]) -> anyhow::Result<()> {
    ensure!(answer.status.as_u16() == status, "expected {status}, got {}: {}", answer.status, answer.text);
    let content_type = answer.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    ensure!(content_type.starts_with("text/html"), "not HTML: {content_type}");
    ensure!(answer.text.starts_with("<!doctype html>"), "no doctype: {}", answer.text);
    ensure!(answer.text.contains("<html lang=\"en\">"), "no language: {}", answer.text);
    for needle in needles {
        ensure!(answer.text.contains(needle), "the page lacks {needle:?}: {}", answer.text);
    }
    Ok(())
}

pub async fn passwords_are_set_by_admins_of_their_organization(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let a = app.org("org-a").await?;
    let b = app.org("org-b").await?;
    let member = app
        .post("/v1/members", &a.admin_key, json!({"email": "ada@example.com", "role": "member"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let path = format!("/v1/members/{member}/password");
    app.put(&path, &a.admin_key, json!({"password": PASSWORD})).await?.expect(204)?;
    app.put(&path, &b.admin_key, json!({"password": PASSWORD})).await?.expect_error(404, "not_found", None)?;
    let reader = app.key(&a, "reader", &["read", "write"]).await?;
    app.put(&path, &reader, json!({"password": PASSWORD})).await?.expect_error(403, "forbidden", None)?;
    for weak in ["short", "aaaaaaaaaaaa", "MyPassword123"] {
        app.put(&path, &a.admin_key, json!({"password": weak})).await?.expect_error(
            422,
            "invalid",
            Some("password"),
        )?;
    }
    app.put(&path, &a.admin_key, json!({"password": PASSWORD, "extra": 1})).await?.expect(422)?;
    app.put("/v1/members/00000000-0000-7000-8000-000000000000/password", &a.admin_key, json!({"password": PASSWORD}))
        .await?
        .expect_error(404, "not_found", None)?;
    // The answer never echoes the password, nor does reading the member show a hash.
    let read = app.get(&format!("/v1/members/{member}"), &a.admin_key).await?.expect(200)?;
    ensure!(!read.text.contains("argon2") && !read.text.contains(PASSWORD), "{}", read.text);
    Ok(())
}

pub async fn application_keys_are_shown_once_and_stored_as_hashes(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let a = app.org("org-a").await?;
    let b = app.org("org-b").await?;
    let application = protected(&app, &a, "api", "api.example.com", json!({"api_key": {}})).await?;
    let keys = format!("/v1/applications/{application}/keys");
    let created = app.post(&keys, &a.admin_key, json!({"name": "ci"})).await?.expect(201)?;
    let secret = created.str("/secret")?;
    let id = created.str("/application_key/id")?;
    ensure!(secret.starts_with("edgak_"), "{secret}");
    ensure!(secret.starts_with(&created.str("/application_key/prefix")?), "the prefix is the secret's start");
    ensure!(created.str("/application_key/application_id")? == application);

    let listed = app.get(&keys, &a.admin_key).await?.expect(200)?;
    ensure!(listed.ids()? == [id.clone()], "{}", listed.text);
    let one = app.get(&format!("{keys}/{id}"), &a.admin_key).await?.expect(200)?;
    for answer in [&listed, &one] {
        ensure!(!answer.text.contains(&secret), "the secret is shown again: {}", answer.text);
        ensure!(!answer.text.contains(&edgible::access::sha256_hex(&secret)), "the hash is shown: {}", answer.text);
    }
    app.post(&keys, &a.admin_key, json!({"name": "ci"})).await?.expect_error(409, "conflict", Some("name"))?;
    app.post(&keys, &a.admin_key, json!({"name": "Not Valid"})).await?.expect_error(422, "invalid", Some("name"))?;
    let reader = app.key(&a, "reader", &["read"]).await?;
    app.get(&keys, &reader).await?.expect(200)?;
    app.post(&keys, &reader, json!({"name": "other"})).await?.expect_error(403, "forbidden", None)?;
    app.delete(&format!("{keys}/{id}"), &reader).await?.expect_error(403, "forbidden", None)?;

    // Another organization sees nothing and changes nothing.
    app.get(&keys, &b.admin_key).await?.expect_error(404, "not_found", None)?;
    app.get(&format!("{keys}/{id}"), &b.admin_key).await?.expect_error(404, "not_found", None)?;
    app.post(&keys, &b.admin_key, json!({"name": "stolen"})).await?.expect_error(404, "not_found", None)?;
    app.delete(&format!("{keys}/{id}"), &b.admin_key).await?.expect_error(404, "not_found", None)?;
    app.get("/v1/applications/00000000-0000-7000-8000-000000000000/keys", &a.admin_key).await?.expect_error(
        404,
        "not_found",
        None,
    )?;
    app.get(&format!("{keys}/not-an-id"), &a.admin_key).await?.expect_error(400, "bad_request", None)?;

    app.delete(&format!("{keys}/{id}"), &a.admin_key).await?.expect(204)?;
    app.get(&format!("{keys}/{id}"), &a.admin_key).await?.expect_error(404, "not_found", None)?;
    // An application with keys and a short code can be deleted, and so can its organization.
    app.post(&keys, &a.admin_key, json!({"name": "again", "expires_at": "2099-01-01T00:00:00Z"})).await?.expect(201)?;
    let coded = protected(&app, &a, "coded", "coded.example.com", json!({"short_code": {}})).await?;
    app.post(&format!("/v1/applications/{coded}/keys"), &a.admin_key, json!({"name": "k"})).await?.expect(201)?;
    app.delete(&format!("/v1/applications/{application}"), &a.admin_key).await?.expect(204)?;
    app.delete(&format!("/v1/organizations/{}", a.id), &app.platform_key).await?.expect(204)?;
    Ok(())
}

pub async fn access_keys_grant_nothing_on_the_api(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    fleet(&app, &org, "web.example.com").await?;
    let opener = app.key(&org, "opener", &["access"]).await?;
    for path in ["/v1/whoami", "/v1/applications", "/v1/devices", "/v1/api-keys", "/v1/members"] {
        app.get(path, &opener).await?.expect_error(403, "forbidden", None)?;
    }
    app.post("/v1/api-keys", &opener, json!({"name": "x", "scopes": ["access"]})).await?.expect_error(
        403,
        "forbidden",
        None,
    )?;
    app.post("/v1/applications", &opener, application("x", &["x.example.com"])).await?.expect_error(
        403,
        "forbidden",
        None,
    )?;
    // No key mixes `access` with API scopes, and only admins hand it out.
    app.post("/v1/api-keys", &org.admin_key, json!({"name": "mixed", "scopes": ["access", "read"]}))
        .await?
        .expect_error(422, "invalid", Some("scopes"))?;
    let writer = app.key(&org, "writer", &["write"]).await?;
    app.post("/v1/api-keys", &writer, json!({"name": "sneaky", "scopes": ["access"]})).await?.expect_error(
        403,
        "forbidden",
        None,
    )?;
    // And no other scope grants it: an admin key is no access key.
    let listed = app.get("/v1/api-keys?name=opener", &org.admin_key).await?.expect(200)?;
    ensure!(listed.body["items"][0]["spec"]["scopes"] == json!(["access"]), "{}", listed.text);
    Ok(())
}

pub async fn short_codes_are_generated_rotated_and_versioned(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let a = app.org("org-a").await?;
    let b = app.org("org-b").await?;
    let key = &a.admin_key;
    let id = protected(&app, &a, "web", "web.example.com", json!({})).await?;
    let path = format!("/v1/applications/{id}/short-code");
    let missing = app.get(&path, key).await?.expect_error(404, "not_found", None)?;
    ensure!(missing.text.contains("short_code"), "the 404 names the policy: {}", missing.text);
    app.post(&format!("{path}/rotate"), key, json!({})).await?.expect(404)?;

    let update = |access: Value| {
        let mut spec = application("web", &["web.example.com"]);
        spec["access"] = access;
        spec
    };
    app.put(&format!("/v1/applications/{id}"), key, update(json!({"short_code": {}}))).await?.expect(200)?;
    let first = app.get(&path, key).await?.expect(200)?;
    let code = first.str("/code")?;
    ensure!(code.len() >= 6 && code.chars().all(|c| c.is_ascii_alphanumeric()), "{code}");
    ensure!(first.u64("/version")? == 1 && first.body["set_by_spec"] == false, "{}", first.text);
    let read = app.get(&format!("/v1/applications/{id}"), key).await?.expect(200)?;
    ensure!(!read.text.contains(&code), "the generated code is not in the spec: {}", read.text);

    let rotated = app.post(&format!("{path}/rotate"), key, json!({})).await?.expect(200)?;
    ensure!(rotated.str("/code")? != code && rotated.u64("/version")? == 2, "{}", rotated.text);
    let code = rotated.str("/code")?;

    // An expiry alone keeps the code and the version.
    let expiring = json!({"short_code": {"expires_at": "2099-01-01T00:00:00Z"}});
    app.put(&format!("/v1/applications/{id}"), key, update(expiring)).await?.expect(200)?;
    let kept = app.get(&path, key).await?.expect(200)?;
    ensure!(kept.str("/code")? == code && kept.u64("/version")? == 2, "{}", kept.text);
    ensure!(kept.str("/expires_at")?.starts_with("2099-01-01"), "{}", kept.text);

    // A code named by the spec replaces it; it cannot be rotated through the API.
    let named = json!({"short_code": {"code": "opensesame1"}});
    app.put(&format!("/v1/applications/{id}"), key, update(named)).await?.expect(200)?;
    let set = app.get(&path, key).await?.expect(200)?;
    ensure!(set.str("/code")? == "opensesame1" && set.u64("/version")? == 3, "{}", set.text);
    ensure!(set.body["set_by_spec"] == true, "{}", set.text);
    app.post(&format!("{path}/rotate"), key, json!({})).await?.expect_error(
        409,
        "conflict",
        Some("access.short_code.code"),
    )?;
    app.put(&format!("/v1/applications/{id}"), key, update(json!({"short_code": {}}))).await?.expect(200)?;
    let generated = app.get(&path, key).await?.expect(200)?;
    ensure!(generated.str("/code")? != "opensesame1" && generated.u64("/version")? == 4, "{}", generated.text);

    // Other organizations and weaker keys.
    app.get(&path, &b.admin_key).await?.expect_error(404, "not_found", None)?;
    app.post(&format!("{path}/rotate"), &b.admin_key, json!({})).await?.expect_error(404, "not_found", None)?;
    let reader = app.key(&a, "reader", &["read"]).await?;
    app.get(&path, &reader).await?.expect(200)?;
    app.post(&format!("{path}/rotate"), &reader, json!({})).await?.expect_error(403, "forbidden", None)?;

    // Removing the policy removes the code.
    app.put(&format!("/v1/applications/{id}"), key, update(json!({"api_key": {}}))).await?.expect(200)?;
    app.get(&path, key).await?.expect_error(404, "not_found", None)?;

    // Created with a named code: version 1, set by the spec.
    let other = protected(&app, &a, "other", "other.example.com", json!({"short_code": {"code": "abcdef1"}})).await?;
    let created = app.get(&format!("/v1/applications/{other}/short-code"), key).await?.expect(200)?;
    ensure!(created.u64("/version")? == 1 && created.body["set_by_spec"] == true, "{}", created.text);
    Ok(())
}

pub async fn login_flow_signs_assertions_for_members(url: String) -> anyhow::Result<()> {
    let (app, state) = access_app(&url).await?;
    let org = app.org("acme").await?;
    let other = app.org("other").await?;
    member_with_password(&app, &org, "ada@example.com", "admin").await?;
    let bob = member_with_password(&app, &org, "bob@example.com", "member").await?;
    member_with_password(&app, &other, "carol@example.com", "owner").await?;
    let host = "portal.example.com";
    protected(&app, &org, "portal", host, json!({"organization": {"roles": ["admin", "owner"]}})).await?;
    protected(&app, &org, "team", "team.example.com", json!({"organization": {}})).await?;
    protected(&app, &org, "open", "open.example.com", json!({})).await?;

    // The form: accessible, no script, the state carried along.
    let form = login_form(&app, host, "st4te-1", None).await?;
    html(
        &form,
        200,
        &[
            "<label for=\"email\">",
            "<label for=\"password\">",
            "autocomplete=\"username\"",
            "autocomplete=\"current-password\"",
            "role=\"alert\"",
            "method=\"post\" action=\"/login\"",
            "value=\"st4te-1\"",
            host,
        ],
    )?;
    ensure!(!form.text.contains("<script"), "no JavaScript");

    // A wrong password: the form again, with the error, 401.
    let wrong = log_in(&app, "ada@example.com", "not the password", host, "st4te-1").await?;
    html(&wrong, 401, &["role=\"alert\"", "wrong", "value=\"ada@example.com\""])?;
    let unknown = log_in(&app, "nobody@example.com", PASSWORD, host, "st4te-1").await?;
    html(&unknown, 401, &["wrong"])?;

    // The right one: a login cookie and a redirect with an assertion for exactly this host.
    let signed_in = log_in(&app, "Ada@Example.com", PASSWORD, host, "st4te-1").await?;
    let cookie = login_cookie(&signed_in)?;
    let (token, echoed) = callback(&signed_in, host)?;
    ensure!(echoed == "st4te-1", "{echoed}");
    let assertion = check_assertion(&state, &token, host, "st4te-1").await?;
    ensure!(assertion.email == "ada@example.com" && assertion.role == Role::Admin, "{assertion:?}");
    ensure!(assertion.organization_id.to_string() == org.id, "{assertion:?}");
    ensure!(assertion.iss == PUBLIC_URL && assertion.exp - assertion.iat == 60, "{assertion:?}");
    ensure!(check_assertion(&state, &token, "team.example.com", "st4te-1").await.is_err(), "bound to its host");
    ensure!(check_assertion(&state, &token, host, "other").await.is_err(), "bound to its state");

    // Logged in, the next visit (another app of the organization) needs no form.
    let again = login_form(&app, "team.example.com", "st4te-2", Some(&cookie)).await?;
    let (token, _) = callback(&again, "team.example.com")?;
    let second = check_assertion(&state, &token, "team.example.com", "st4te-2").await?;
    ensure!(second.jti != assertion.jti, "every assertion has its own jti");

    // A member without an allowed role, and someone of another organization: no access.
    let bob_in = log_in(&app, "bob@example.com", PASSWORD, host, "s").await?;
    html(&bob_in, 403, &["bob@example.com", "not allowed into", host])?;
    let bob_cookie = login_cookie(&bob_in)?;
    let carol = log_in(&app, "carol@example.com", PASSWORD, "team.example.com", "s").await?;
    html(&carol, 403, &["carol@example.com", "team.example.com"])?;
    // Bob may enter the app open to any member.
    callback(&login_form(&app, "team.example.com", "s", Some(&bob_cookie)).await?, "team.example.com")?;

    // Unknown hosts and hosts without an organization policy.
    html(&login_form(&app, "nowhere.example.com", "s", Some(&cookie)).await?, 404, &["nowhere.example.com"])?;
    html(&login_form(&app, "open.example.com", "s", Some(&cookie)).await?, 404, &["open.example.com"])?;
    // Bad input: a 400 page naming the field.
    html(&app.send(TestRequest::new(Method::GET, "/login?state=s")).await?, 400, &["<code>host</code>"])?;
    html(&login_form(&app, "bad host", "s", None).await?, 400, &["<code>host</code>"])?;
    html(&login_form(&app, host, "a b<script>", None).await?, 400, &["<code>state</code>"])?;
    html(&login_form(&app, host, &"s".repeat(513), None).await?, 400, &["<code>state</code>"])?;
    html(&log_in(&app, "ada@example.com", PASSWORD, host, "").await?, 400, &["<code>state</code>"])?;

    // Membership is checked at every visit: a removed member is refused at the next one.
    app.delete(&format!("/v1/members/{bob}"), &org.admin_key).await?.expect(204)?;
    html(&login_form(&app, "team.example.com", "s", Some(&bob_cookie)).await?, 403, &["bob@example.com"])?;

    // Logout ends the login: the form again afterwards.
    let logout = app.send(TestRequest::new(Method::GET, "/logout").header(header::COOKIE, &cookie)).await?;
    html(&logout, 200, &["Signed out"])?;
    let cleared = logout.headers.get(header::SET_COOKIE).context("no cookie cleared")?.to_str()?;
    ensure!(cleared.starts_with("edgible_login=;") && cleared.contains("Max-Age=0"), "{cleared}");
    html(&login_form(&app, host, "s", Some(&cookie)).await?, 200, &["<form"])?;
    Ok(())
}

pub async fn failed_logins_are_rate_limited(url: String) -> anyhow::Result<()> {
    let (app, _state) = access_app(&url).await?;
    let org = app.org("acme").await?;
    member_with_password(&app, &org, "ada@example.com", "member").await?;
    let host = "team.example.com";
    protected(&app, &org, "team", host, json!({"organization": {}})).await?;
    let free = edgible_server::access::limiter::FREE_FAILURES;
    for attempt in 0..=free {
        let answer = log_in(&app, "ada@example.com", "wrong password", host, "s").await?;
        ensure!(answer.status.as_u16() == 401, "attempt {attempt}: {} {}", answer.status, answer.text);
    }
    // Locked: even the right password is refused for now, with a Retry-After.
    let locked = log_in(&app, "Ada@Example.com", PASSWORD, host, "s").await?;
    html(&locked, 429, &["Too many"])?;
    let retry_after: u64 = locked.headers.get(header::RETRY_AFTER).context("no Retry-After")?.to_str()?.parse()?;
    ensure!(retry_after >= 1, "{retry_after}");
    // Once the lock ends, the right password works (bounded wait: the first lock is 1 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = log_in(&app, "ada@example.com", PASSWORD, host, "s").await?;
        match answer.status.as_u16() {
            302 => break,
            429 if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => bail!("expected the lock to end: {} {}", answer.status, answer.text),
        }
    }
    Ok(())
}

pub async fn assertion_keys_rotate_with_a_grace_period(url: String) -> anyhow::Result<()> {
    let (app, state) = access_app(&url).await?;
    let org = app.org("acme").await?;
    let ada = member_with_password(&app, &org, "ada@example.com", "owner").await?;
    let host = "team.example.com";
    protected(&app, &org, "team", host, json!({"organization": {}})).await?;
    let before = log_in(&app, "ada@example.com", PASSWORD, host, "s").await?;
    let (old_token, _) = callback(&before, host)?;

    app.post("/v1/assertion-keys/rotate", &org.admin_key, json!({})).await?.expect_error(403, "forbidden", None)?;
    let rotated = app.post("/v1/assertion-keys/rotate", &app.platform_key, json!({})).await?.expect(200)?;
    let kid = rotated.str("/kid")?;
    let keys = edgible_server::access::published_keys(state.db(), state.access_settings(), Utc::now()).await?;
    ensure!(keys.len() == 2 && keys[0].kid == kid, "the new key is current, the old one still published: {keys:?}");
    // An assertion signed just before the rotation still verifies; new ones use the new key.
    check_assertion(&state, &old_token, host, "s").await?;
    let cookie = login_cookie(&before)?;
    let (new_token, _) = callback(&login_form(&app, host, "t", Some(&cookie)).await?, host)?;
    ensure!(new_token.starts_with(&format!("v1.{kid}.")), "signed with the new key: {new_token}");
    check_assertion(&state, &new_token, host, "t").await?;
    // After the grace period the old key is no longer published.
    let later = Utc::now() + chrono::TimeDelta::from_std(edgible_server::access::KEY_GRACE)?;
    let keys = edgible_server::access::published_keys(state.db(), state.access_settings(), later).await?;
    ensure!(keys.len() == 1 && keys[0].kid == kid, "{keys:?}");

    // Setting a new password ends the user's login sessions.
    app.put(&format!("/v1/members/{ada}/password"), &org.admin_key, json!({"password": "n3w-pass-phrase!"}))
        .await?
        .expect(204)?;
    html(&login_form(&app, host, "u", Some(&cookie)).await?, 200, &["<form"])?;
    Ok(())
}

/// The next `access` message the agent gets (deltas on the way are skipped).
async fn next_access(
    agent: &mut crate::agents::TestAgent,
) -> anyhow::Result<(Vec<String>, Vec<edgible::protocol::v1::ApplicationAccess>)> {
    for _ in 0..10 {
        match agent.recv().await? {
            edgible::protocol::v1::ServerMessage::Access { assertion_keys, applications, .. } => {
                return Ok((assertion_keys.into_iter().map(|key| key.kid).collect(), applications));
            }
            edgible::protocol::v1::ServerMessage::ApplicationUpdate { .. } => {}
            other => bail!("expected access, got {other:?}"),
        }
    }
    bail!("no access message")
}

pub async fn revocations_and_rotations_reach_the_device_at_once(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, edgible_server::hub::agent::SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = crate::agents::pool(app, &org).await?;
    let enrolled = crate::agents::enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let (web, _) = crate::agents::placed_application(app, &org, "web", enrolled.device_id).await?;
    let mut spec = application("web", &["web.acme.example.com"]);
    spec["access"] = json!({"api_key": {}, "organization": {}});
    app.put(&format!("/v1/applications/{web}"), &org.admin_key, spec).await?.expect(200)?;

    let mut agent = crate::agents::TestAgent::connect(&served, &enrolled).await?;
    agent.hello(None).await?;
    let keys = format!("/v1/applications/{web}/keys");
    let created = app.post(&keys, &org.admin_key, json!({"name": "ci"})).await?.expect(201)?;
    let digest = edgible::access::sha256_hex(&created.str("/secret")?);
    let (kids, access) = next_access(&mut agent).await?;
    ensure!(access.len() == 1 && access[0].api_keys.iter().any(|key| key.sha256 == digest), "{access:?}");

    let started = std::time::Instant::now();
    app.delete(&format!("{keys}/{}", created.str("/application_key/id")?), &org.admin_key).await?.expect(204)?;
    let (_, access) = next_access(&mut agent).await?;
    let elapsed = started.elapsed();
    ensure!(access[0].api_keys.is_empty(), "{access:?}");
    ensure!(elapsed < Duration::from_secs(1), "the revocation took {elapsed:?}");

    // An `access` key of the organization is accepted too, and leaves with its deletion.
    let opener =
        app.post("/v1/api-keys", &org.admin_key, json!({"name": "opener", "scopes": ["access"]})).await?.expect(201)?;
    let (_, access) = next_access(&mut agent).await?;
    ensure!(access[0].api_keys.len() == 1, "{access:?}");
    app.delete(&format!("/v1/api-keys/{}", opener.str("/api_key/id")?), &org.admin_key).await?.expect(204)?;
    let (_, access) = next_access(&mut agent).await?;
    ensure!(access[0].api_keys.is_empty(), "{access:?}");

    let rotated = app.post("/v1/assertion-keys/rotate", &app.platform_key, json!({})).await?.expect(200)?;
    let (rotated_kids, _) = next_access(&mut agent).await?;
    ensure!(rotated_kids == [rotated.str("/kid")?, kids[0].clone()], "{rotated_kids:?} after {kids:?}");
    Ok(())
}
