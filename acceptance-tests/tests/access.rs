//! Access policies end to end (issue 7), with `curl` in a client namespace as the visitor:
//! the server, an edge and one device agent in network namespaces (see
//! `edgible_acceptance_tests::access_platform`), and one `e2e_workload` application per policy
//! on the device. The workload's `/headers` shows exactly which headers the device's proxy let
//! through.
//!
//! One test walks the policies in order, printing what each step checks: public passes and
//! forged `X-Edgible-*` headers never reach a workload; `api_key` refuses without a key (401
//! with `WWW-Authenticate`) or with a bad one, admits application keys and `access`-scoped
//! organization keys (and no other scope), hides the key from the workload, and refuses a
//! deleted key within a second (timed); `organization` answers 401 to non-HTML clients and
//! redirects browsers to the server's login page, a member logs in with curl through the whole
//! flow (callback, session, identity headers, replay refused, logout), logs in again after the
//! assertion signing key was rotated, and is refused by a policy for admins only; a combined
//! policy (organization or api_key) lets a key holder in without login; `short_code` sets a
//! cookie from `?code=` or its form, rotation ends the old cookie, and wrong codes are
//! throttled so a 6-character code cannot be guessed (rate measured and extrapolated).
//!
//! Needs root, `ip`, `nft`, `nsenter` and `curl`; runs with `EDGIBLE_ACC=1` after
//! `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{ApiKey, ApiKeySpec, ApplicationKeySpec, Scope};
use edgible_acceptance_tests::access_platform::{
    AccessOptions, AccessPlatform, Answer, AppDef, member_with_password, step,
};
use edgible_acceptance_tests::heavy_tier;
use edgible_acceptance_tests::netns::EDGE_ADDRESS;
use edgible_acceptance_tests::platform::{CurlOutput, curl, through_edge};
use edgible_acceptance_tests::workload::field;
use serde_json::json;

const PUBLIC: &str = "pub.example.test";
const KEYED: &str = "key.example.test";
const CODED: &str = "code.example.test";
const MEMBERS: &str = "org.example.test";
const EITHER: &str = "either.example.test";
const ADMINS: &str = "admins.example.test";

/// A revoked key must be refused on the device within this long.
const REVOCATION: Duration = Duration::from_secs(1);
/// How long a new key, a rotated code or a new member may take to reach the device.
const PROPAGATION: Duration = Duration::from_secs(10);
/// How long the brute force runs to measure the guessing rate.
const BRUTE_FORCE_WINDOW: Duration = Duration::from_secs(15);
/// Guessing half of the 6-character codes must take at least this long at the measured rate.
const BRUTE_FORCE_FLOOR_YEARS: f64 = 100.0;
/// The member who logs in.
const ALICE: &str = "alice@example.test";
const ALICE_PASSWORD: &str = "correct horse battery";

fn apps() -> Vec<AppDef> {
    vec![
        AppDef { name: "app-public", hostname: PUBLIC, port: 18091, access: json!({}) },
        AppDef { name: "app-key", hostname: KEYED, port: 18092, access: json!({"api_key": {}}) },
        AppDef { name: "app-code", hostname: CODED, port: 18093, access: json!({"short_code": {}}) },
        AppDef { name: "app-org", hostname: MEMBERS, port: 18094, access: json!({"organization": {}}) },
        AppDef {
            name: "app-either",
            hostname: EITHER,
            port: 18095,
            access: json!({"organization": {}, "api_key": {}}),
        },
        AppDef {
            name: "app-admins",
            hostname: ADMINS,
            port: 18096,
            access: json!({"organization": {"roles": ["admin", "owner"]}}),
        },
    ]
}

/// Tries `attempt` every 200 ms until it succeeds or `timeout` passes; answers its value and
/// how long it took, or the last failure.
async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut attempt: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Duration)> {
    let started = Instant::now();
    loop {
        let error = match attempt() {
            Ok(value) => return Ok((value, started.elapsed())),
            Err(error) => error,
        };
        if started.elapsed() >= timeout {
            return Err(error.context(format!("{what}: not within {timeout:?}; the last attempt above")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Requires `answer` to be the workload `name`'s (status 200).
fn served_by(answer: &Answer, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(answer.status == 200, "expected 200 from {name}: {}", answer.raw);
    anyhow::ensure!(field(&answer.body, "name") == Some(name), "not answered by {name}: {}", answer.raw);
    Ok(())
}

/// Requires a `401` with `WWW-Authenticate: Bearer realm="<hostname>"` and no workload answer.
fn refused_401(answer: &Answer, hostname: &str) -> anyhow::Result<()> {
    anyhow::ensure!(answer.status == 401, "expected 401: {}", answer.raw);
    let expected = format!("Bearer realm=\"{hostname}\"");
    anyhow::ensure!(
        answer.header("www-authenticate").is_some_and(|value| value.starts_with(&expected)),
        "expected `WWW-Authenticate: {expected}`: {}",
        answer.raw
    );
    anyhow::ensure!(field(&answer.body, "name").is_none(), "a workload answered: {}", answer.raw);
    Ok(())
}

/// The `X-Edgible-*` lines a workload's `/headers` answer shows.
fn identity_lines(body: &str) -> Vec<&str> {
    body.lines().filter(|line| line.starts_with("x-edgible-")).collect()
}

fn scenario_public(run: &AccessPlatform) -> anyhow::Result<()> {
    step("1a. public: served without any credential");
    let answer = run.request(PUBLIC, "/", &[])?;
    served_by(&answer, "app-public")?;
    anyhow::ensure!(field(&answer.body, "x-edgible-user") == Some("-"), "{}", answer.raw);

    step("1b. forged X-Edgible-* headers never reach the workload");
    let answer = run.request(
        PUBLIC,
        "/headers",
        &[
            "-H",
            "X-Edgible-User: usr_forged",
            "-H",
            "X-Edgible-Email: mallory@example.test",
            "-H",
            "X-Edgible-Role: owner",
        ],
    )?;
    anyhow::ensure!(answer.status == 200, "{}", answer.raw);
    anyhow::ensure!(
        identity_lines(&answer.body).is_empty(),
        "forged identity headers reached the workload:\n{}",
        answer.body
    );
    anyhow::ensure!(
        field(&answer.body, "x-forwarded-for").is_some(),
        "not the workload's header list:\n{}",
        answer.body
    );
    Ok(())
}

async fn scenario_api_key(run: &AccessPlatform) -> anyhow::Result<()> {
    let client = run.server.client()?;
    let application = run.application("app-key")?;

    step("2a. api_key without a key: 401 with WWW-Authenticate, no redirect even for a browser");
    refused_401(&run.request(KEYED, "/", &[])?, KEYED)?;
    refused_401(&run.request(KEYED, "/", &["-H", "Accept: text/html"])?, KEYED)?;

    step("2b. an application key, as Authorization: Bearer and as X-Edgible-Key; the workload never sees it");
    let spec = ApplicationKeySpec { name: "ci".parse()?, expires_at: None };
    let created = client.create_application_key(&application.id, &spec).await?;
    let secret = created.secret.clone();
    let bearer = format!("Authorization: Bearer {secret}");
    let (_, took) = eventually("the application key accepted", PROPAGATION, || {
        served_by(&run.request(KEYED, "/", &["-H", &bearer])?, "app-key")
    })
    .await?;
    eprintln!("    accepted {took:.2?} after it was created");
    served_by(&run.request(KEYED, "/", &["-H", &format!("X-Edgible-Key: {secret}")])?, "app-key")?;
    // Each way on its own: the header that carried the key is not forwarded. (With both, an
    // `Authorization` the key did not come from is the workload's own business.)
    for header in [bearer.clone(), format!("X-Edgible-Key: {secret}")] {
        let answer = run.request(KEYED, "/headers", &["-H", &header])?;
        anyhow::ensure!(answer.status == 200, "{}", answer.raw);
        anyhow::ensure!(
            !answer.body.contains(&secret)
                && field(&answer.body, "authorization").is_none()
                && identity_lines(&answer.body).is_empty(),
            "the key reached the workload:\n{}",
            answer.body
        );
    }

    step("2c. a bad key: 401");
    refused_401(&run.request(KEYED, "/", &["-H", &format!("Authorization: Bearer {secret}x")])?, KEYED)?;
    refused_401(&run.request(KEYED, "/", &["-H", "X-Edgible-Key: edg_not_a_key"])?, KEYED)?;

    step("2d. an organization API key with scope `access` passes; one with scope `read` does not");
    let access = client
        .create::<ApiKey>(&ApiKeySpec { name: "door".parse()?, scopes: [Scope::Access].into(), expires_at: None })
        .await?;
    let read = client
        .create::<ApiKey>(&ApiKeySpec { name: "reader".parse()?, scopes: [Scope::Read].into(), expires_at: None })
        .await?;
    let access_header = format!("Authorization: Bearer {}", access.secret);
    eventually("the access-scoped key accepted", PROPAGATION, || {
        served_by(&run.request(KEYED, "/", &["-H", &access_header])?, "app-key")
    })
    .await?;
    refused_401(&run.request(KEYED, "/", &["-H", &format!("Authorization: Bearer {}", read.secret)])?, KEYED)?;
    let denied = edgible::Client::new(&run.server.url, &access.secret)?.whoami().await;
    anyhow::ensure!(
        denied.as_ref().err().and_then(|error| error.status()).is_some_and(|status| status == 403 || status == 401),
        "an access-only key must grant nothing on the API: {denied:?}"
    );

    step("2e. the application key deleted: refused within a second (timed from the test's namespace)");
    let https = run.https_client(&[KEYED])?;
    let url = format!("https://{KEYED}/");
    let before = https.get(&url).bearer_auth(&secret).send().await?;
    anyhow::ensure!(before.status() == 200, "the key should still pass before the deletion: {}", before.status());
    client.delete_application_key(&application.id, &created.application_key.id).await?;
    let deleted = Instant::now();
    let mut attempts = 0u32;
    let refused_after = loop {
        attempts += 1;
        let status = https.get(&url).bearer_auth(&secret).send().await?.status();
        if status == 401 {
            break deleted.elapsed();
        }
        anyhow::ensure!(status == 200, "unexpected answer {status} while waiting for the revocation");
        anyhow::ensure!(
            deleted.elapsed() < REVOCATION * 10,
            "the deleted key was still accepted {:?} after the deletion",
            deleted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("    the deleted key was refused {refused_after:.3?} after the DELETE answered ({attempts} requests)");
    anyhow::ensure!(refused_after <= REVOCATION, "revocation took {refused_after:?}, more than {REVOCATION:?}");
    Ok(())
}

/// curl from the client namespace to any `url` (e.g. the server's login page), reaching the
/// application hostnames through the edge.
fn curl_url(run: &AccessPlatform, url: &str, extra: &[&str]) -> anyhow::Result<CurlOutput> {
    let mut args: Vec<String> = Vec::new();
    for hostname in [MEMBERS, EITHER, ADMINS] {
        args.extend(through_edge(hostname, EDGE_ADDRESS, &run.ca_file));
    }
    args.extend(["--noproxy", "*", "--max-time", "20"].map(str::to_owned));
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args.push(url.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(run.topology.namespace("client")?, &args)
}

/// A whole login with curl following every redirect: `hostname` sends a browser to the login
/// page, the form is posted with `email` and `password`, and the answer at the end of the
/// redirects (the workload's page, or the server's "no access" page) is returned. Cookies live
/// in `jar`.
fn login_following(
    run: &AccessPlatform,
    hostname: &str,
    jar: &std::path::Path,
    email: &str,
    password: &str,
) -> anyhow::Result<Answer> {
    let jar = jar.display().to_string();
    let answer = run.request(hostname, "/", &["-H", "Accept: text/html", "-c", &jar])?;
    anyhow::ensure!(answer.status == 302, "expected a redirect to the login page: {}", answer.raw);
    let location = answer.header("location").context("no Location")?;
    let state = query_param(location, "state")?;
    let posted = curl_url(
        run,
        &format!("{}/login", run.public_url),
        &[
            "-i",
            "-L",
            "-b",
            &jar,
            "-c",
            &jar,
            "--data-urlencode",
            &format!("email={email}"),
            "--data-urlencode",
            &format!("password={password}"),
            "--data-urlencode",
            &format!("host={hostname}"),
            "--data-urlencode",
            &format!("state={state}"),
        ],
    )?;
    Answer::parse(&posted)
}

/// The value of query parameter `name` in `url`.
fn query_param(url: &str, name: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .with_context(|| format!("no `{name}` in {url}"))
}

async fn scenario_organization(run: &AccessPlatform) -> anyhow::Result<()> {
    step("3a. organization, non-HTML client: 401 with WWW-Authenticate");
    refused_401(&run.request(MEMBERS, "/", &[])?, MEMBERS)?;

    step("3b. organization, browser (Accept: text/html): 302 to the server's login page with a state cookie");
    let jar = run.dir.path().join("alice.jar");
    let jar_text = jar.display().to_string();
    let html = ["-H", "Accept: text/html,application/xhtml+xml"];
    let answer = run.request(MEMBERS, "/hello?x=1", &[html[0], html[1], "-c", &jar_text])?;
    anyhow::ensure!(answer.status == 302, "expected a redirect to the login page: {}", answer.raw);
    let location = answer.header("location").context("no Location")?.to_owned();
    let login_prefix = format!("{}/login?", run.public_url);
    anyhow::ensure!(location.starts_with(&login_prefix), "expected {login_prefix}...: {}", answer.raw);
    anyhow::ensure!(query_param(&location, "host")? == MEMBERS, "{location}");
    let state = query_param(&location, "state")?;
    anyhow::ensure!(!state.is_empty() && state.len() <= 512, "a bad state ({} chars): {location}", state.len());
    let cookie = answer.header("set-cookie").context("no state cookie")?;
    anyhow::ensure!(
        cookie.starts_with("__Host-edgible_state=") && cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "the state cookie: {cookie}"
    );
    let state_nonce =
        cookie.trim_start_matches("__Host-edgible_state=").split(';').next().unwrap_or_default().to_owned();

    step("3c. a member logs in with curl: form, POST, callback with the assertion, session cookie");
    let alice = member_with_password(&run.server.client()?, ALICE, "Alice", ALICE_PASSWORD).await?;
    let form = Answer::parse(&curl_url(run, &location, &["-i", "-b", &jar_text, "-c", &jar_text])?)?;
    anyhow::ensure!(form.status == 200, "the login page: {}", form.raw);
    for input in ["email", "password", "state"] {
        anyhow::ensure!(form.body.contains(input), "the login form has no {input} field:\n{}", form.body);
    }
    let wrong = curl_url(
        run,
        &format!("{}/login", run.public_url),
        &[
            "-i",
            "-b",
            &jar_text,
            "-c",
            &jar_text,
            "--data-urlencode",
            &format!("email={ALICE}"),
            "--data-urlencode",
            "password=not the password",
            "--data-urlencode",
            &format!("host={MEMBERS}"),
            "--data-urlencode",
            &format!("state={state}"),
        ],
    )?;
    let wrong = Answer::parse(&wrong)?;
    anyhow::ensure!(wrong.status == 401 && wrong.header("location").is_none(), "a wrong password: {}", wrong.raw);
    let posted = curl_url(
        run,
        &format!("{}/login", run.public_url),
        &[
            "-i",
            "-b",
            &jar_text,
            "-c",
            &jar_text,
            "--data-urlencode",
            &format!("email={ALICE}"),
            "--data-urlencode",
            &format!("password={ALICE_PASSWORD}"),
            "--data-urlencode",
            &format!("host={MEMBERS}"),
            "--data-urlencode",
            &format!("state={state}"),
        ],
    )?;
    let posted = Answer::parse(&posted)?;
    anyhow::ensure!(posted.status == 302, "the login did not redirect back: {}", posted.raw);
    let callback = posted.header("location").context("no Location after login")?.to_owned();
    let callback_prefix = format!("https://{MEMBERS}/.edgible/callback?");
    anyhow::ensure!(callback.starts_with(&callback_prefix), "expected {callback_prefix}...: {callback}");
    anyhow::ensure!(query_param(&callback, "state")? == state, "the state changed: {callback}");
    query_param(&callback, "assertion")?;
    let path = callback.trim_start_matches(&format!("https://{MEMBERS}"));
    let landed = run.request(MEMBERS, path, &["-b", &jar_text, "-c", &jar_text])?;
    anyhow::ensure!(landed.status == 302, "the callback: {}", landed.raw);
    anyhow::ensure!(landed.header("location") == Some("/hello?x=1"), "not back where the visit began: {}", landed.raw);
    let session = landed
        .headers
        .iter()
        .filter(|(name, _)| name == "set-cookie")
        .map(|(_, value)| value.as_str())
        .find(|value| value.starts_with("__Host-edgible_session="))
        .with_context(|| format!("no session cookie: {}", landed.raw))?;
    anyhow::ensure!(session.contains("Secure") && session.contains("HttpOnly"), "the session cookie: {session}");

    step("3d. with the session: the workload gets the member's identity, forged headers are replaced");
    let answer = run.request(MEMBERS, "/", &["-b", &jar_text, "-H", "X-Edgible-Email: mallory@example.test"])?;
    served_by(&answer, "app-org")?;
    anyhow::ensure!(field(&answer.body, "x-edgible-email") == Some(ALICE), "{}", answer.raw);
    let user = alice.user_id.to_string();
    anyhow::ensure!(
        field(&answer.body, "x-edgible-user") == Some(user.as_str()),
        "expected user {user}: {}",
        answer.raw
    );

    step("3e. the same assertion replayed with the same state cookie: refused");
    let replay = run.request(MEMBERS, path, &["-H", &format!("Cookie: __Host-edgible_state={state_nonce}")])?;
    let replay_session =
        replay.headers.iter().any(|(name, value)| name == "set-cookie" && value.starts_with("__Host-edgible_session="));
    anyhow::ensure!(
        !replay_session && (replay.status >= 400 || replay.header("location").is_some_and(|to| to.contains("/login?"))),
        "a replayed assertion was accepted: {}",
        replay.raw
    );

    step("3f. logout: the session cookie cleared, 302 to the server's logout page");
    let answer = run.request(MEMBERS, "/.edgible/logout", &["-b", &jar_text, "-c", &jar_text])?;
    anyhow::ensure!(answer.status == 302, "{}", answer.raw);
    anyhow::ensure!(answer.header("location") == Some(format!("{}/logout", run.public_url).as_str()), "{}", answer.raw);
    refused_401(&run.request(MEMBERS, "/", &["-b", &jar_text])?, MEMBERS)?;

    step("3g. the assertion signing key rotated: a new login is verified with the new key");
    let rotated = run.server.client()?.rotate_assertion_key().await?;
    let mut attempt = 0;
    let (answer, took) = eventually("a login after the key rotation", PROPAGATION, || {
        attempt += 1;
        let jar = run.dir.path().join(format!("rotated-{attempt}.jar"));
        let answer = login_following(run, MEMBERS, &jar, ALICE, ALICE_PASSWORD)?;
        served_by(&answer, "app-org")?;
        Ok(answer)
    })
    .await?;
    anyhow::ensure!(field(&answer.body, "x-edgible-email") == Some(ALICE), "{}", answer.raw);
    eprintln!("    signed in {took:.1?} after the rotation to key {}", rotated.kid);

    step("3h. a policy for admins only: the member is shown the server's no-access page");
    let answer = login_following(run, ADMINS, &run.dir.path().join("admins.jar"), ALICE, ALICE_PASSWORD)?;
    anyhow::ensure!(
        answer.status == 403 && answer.body.contains(ALICE) && answer.body.contains(ADMINS),
        "expected the no-access page: {}",
        answer.raw
    );
    anyhow::ensure!(field(&answer.body, "name").is_none(), "a workload answered: {}", answer.raw);
    Ok(())
}

async fn scenario_either(run: &AccessPlatform) -> anyhow::Result<()> {
    let client = run.server.client()?;
    let application = run.application("app-either")?;
    step("4. organization OR api_key: a key holder gets in without logging in; others are sent to log in");
    let created = client
        .create_application_key(&application.id, &ApplicationKeySpec { name: "robot".parse()?, expires_at: None })
        .await?;
    let bearer = format!("Authorization: Bearer {}", created.secret);
    eventually("the key passing the combined policy", PROPAGATION, || {
        served_by(&run.request(EITHER, "/", &["-H", &bearer])?, "app-either")
    })
    .await?;
    let answer = run.request(EITHER, "/headers", &["-H", &bearer, "-H", "X-Edgible-User: usr_forged"])?;
    anyhow::ensure!(answer.status == 200, "{}", answer.raw);
    anyhow::ensure!(identity_lines(&answer.body).is_empty(), "identity headers without a login:\n{}", answer.body);
    refused_401(&run.request(EITHER, "/", &[])?, EITHER)?;
    let answer = run.request(EITHER, "/", &["-H", "Accept: text/html"])?;
    anyhow::ensure!(
        answer.status == 302
            && answer
                .header("location")
                .is_some_and(|location| location.starts_with(&format!("{}/login?", run.public_url))),
        "a browser without a key should be sent to log in: {}",
        answer.raw
    );
    Ok(())
}

async fn scenario_short_code(run: &AccessPlatform) -> anyhow::Result<()> {
    let client = run.server.client()?;
    let application = run.application("app-code")?;
    let jar = run.dir.path().join("code.jar");
    let jar_text = jar.display().to_string();

    step("5a. short_code without the code: 401 for non-HTML, the code form for a browser");
    refused_401(&run.request(CODED, "/", &[])?, CODED)?;
    let form = run.request(CODED, "/.edgible/code", &["-H", "Accept: text/html"])?;
    anyhow::ensure!(form.status == 200 && form.body.contains("<form"), "the code form: {}", form.raw);

    step("5b. ?code= sets a cookie and lets the visitor in; the cookie alone works afterwards");
    let code = client.short_code(&application.id).await?;
    anyhow::ensure!(code.code.len() >= 6 && !code.set_by_spec, "the generated code: {code:?}");
    let (answer, took) = eventually("the code accepted", PROPAGATION, || {
        let answer = Answer::parse(&run.curl(
            CODED,
            &format!("/?code={}", code.code),
            &["-i", "-L", "-c", &jar_text, "-b", &jar_text],
        )?)?;
        served_by(&answer, "app-code")?;
        Ok(answer)
    })
    .await?;
    eprintln!(
        "    the code was accepted after {took:.1?}; the workload saw {}",
        answer.body.lines().next().unwrap_or_default()
    );
    let saved = std::fs::read_to_string(&jar)?;
    anyhow::ensure!(saved.contains("__Host-edgible_code"), "no code cookie in the jar:\n{saved}");
    anyhow::ensure!(!answer.body.contains(&code.code), "the code reached the workload:\n{}", answer.body);
    served_by(&run.request(CODED, "/", &["-b", &jar_text])?, "app-code")?;

    step("5c. the code form: POST code and return_to sets the cookie too");
    let form_jar = run.dir.path().join("code-form.jar");
    let form_jar_text = form_jar.display().to_string();
    let posted = run.request(
        CODED,
        "/.edgible/code",
        &[
            "-H",
            "Accept: text/html",
            "-c",
            &form_jar_text,
            "--data-urlencode",
            &format!("code={}", code.code),
            "--data-urlencode",
            "return_to=/",
        ],
    )?;
    anyhow::ensure!(
        posted.headers.iter().any(|(name, value)| name == "set-cookie" && value.starts_with("__Host-edgible_code=")),
        "the form set no cookie: {}",
        posted.raw
    );
    served_by(&run.request(CODED, "/", &["-b", &form_jar_text])?, "app-code")?;

    step("5d. rotating the code ends the old cookie; the new code works");
    let rotated = client.rotate_short_code(&application.id).await?;
    anyhow::ensure!(rotated.version > code.version && rotated.code != code.code, "{code:?} -> {rotated:?}");
    let (_, took) = eventually("the old cookie refused", PROPAGATION, || {
        refused_401(&run.request(CODED, "/", &["-b", &jar_text])?, CODED)
    })
    .await?;
    eprintln!("    the old cookie was refused {took:.2?} after the rotation");
    refused_401(&run.request(CODED, &format!("/?code={}", code.code), &[])?, CODED)?;
    let new_jar = run.dir.path().join("code-new.jar").display().to_string();
    let answer = Answer::parse(&run.curl(
        CODED,
        &format!("/?code={}", rotated.code),
        &["-i", "-L", "-c", &new_jar, "-b", &new_jar],
    )?)?;
    served_by(&answer, "app-code")?;

    step("5e. wrong codes are throttled: 429 with Retry-After, and the measured rate makes guessing hopeless");
    let https = run.https_client(&[CODED])?;
    let started = Instant::now();
    let (mut checked, mut throttled, mut first_429) = (0u32, 0u32, None);
    let mut attempt = 0u32;
    while started.elapsed() < BRUTE_FORCE_WINDOW {
        attempt += 1;
        let guess = format!("Zz{attempt:08}");
        let response = https.get(format!("https://{CODED}/?code={guess}")).send().await?;
        match response.status().as_u16() {
            429 => {
                throttled += 1;
                if first_429.is_none() {
                    let retry = response.headers().get("retry-after").and_then(|value| value.to_str().ok());
                    let seconds: u64 = retry
                        .and_then(|value| value.parse().ok())
                        .with_context(|| format!("a 429 without a Retry-After in seconds: {retry:?}"))?;
                    anyhow::ensure!(seconds >= 1, "Retry-After: {seconds}");
                    first_429 = Some(attempt);
                    // While locked out, even the right code is not checked: a lockout that
                    // answered it would tell the attacker when they guessed right.
                    let right = https.get(format!("https://{CODED}/?code={}", rotated.code)).send().await?;
                    anyhow::ensure!(
                        right.status() == 429,
                        "the right code during a lockout answered {}",
                        right.status()
                    );
                }
            }
            200 | 301..=303 | 307 | 308 => anyhow::bail!("a wrong code {guess} was let in ({})", response.status()),
            _ => checked += 1,
        }
        // Still hundreds of guesses a second, without taking both cores of a CI machine.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let first_429 = first_429.context("no 429 in the whole window: wrong codes are not throttled")?;
    anyhow::ensure!(first_429 <= 20, "the first 429 came only at attempt {first_429}");
    let rate = f64::from(checked) / elapsed;
    // A 6-character code of letters and digits (the shortest a spec may set); the generated
    // ones are longer. Half the space is the expected effort.
    let space = 62f64.powi(6);
    let years = space / 2.0 / rate.max(f64::MIN_POSITIVE) / (365.25 * 24.0 * 3600.0);
    eprintln!(
        "    {attempt} requests in {elapsed:.1}s: {checked} guesses checked, {throttled} throttled (first 429 at \
         attempt {first_429}); at {rate:.2} guesses/s, guessing a 6-character code takes {years:.0} years on average"
    );
    anyhow::ensure!(
        years >= BRUTE_FORCE_FLOOR_YEARS,
        "at {rate:.2} guesses/s a 6-character code falls in {years:.1} years (less than {BRUTE_FORCE_FLOOR_YEARS})"
    );
    Ok(())
}

async fn walk(run: &AccessPlatform) -> anyhow::Result<()> {
    scenario_public(run)?;
    scenario_api_key(run).await?;
    scenario_organization(run).await?;
    scenario_either(run).await?;
    // Last: the brute force locks the application out for a while.
    scenario_short_code(run).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_policies_end_to_end() -> anyhow::Result<()> {
    if !heavy_tier("access_policies_end_to_end") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let run = AccessPlatform::start("ac", &apps(), &AccessOptions::default()).await?;
    if let Err(error) = walk(&run).await {
        let diagnosis = run.diagnose();
        let kept = run.keep();
        return Err(error.context(format!("{diagnosis}\nlogs and database are kept in {}", kept.display())));
    }
    step("all access scenarios passed");
    Ok(())
}
