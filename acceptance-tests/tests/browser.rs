//! The organization login in a real browser (issue 7): headless Chromium (Debian's
//! `chromium`), driven over WebDriver by Debian's `chromedriver` (`src/browser.rs`), in the
//! test's own namespace, reaching the edge of the namespace topology over the bridge (the app's
//! hostname mapped to the edge) and the server's login pages at its `--public-url`.
//!
//! The walk, with a screenshot of each step in the artifacts directory
//! (`$EDGIBLE_ARTIFACTS_DIR/browser_login_flow`, or `target/artifacts/browser/...`): the
//! organization-protected app sends the browser to the login page; the member logs in and
//! lands on the app, whose workload shows the `X-Edgible-Email` it received; logout ends on
//! the "signed out" page; a user of another organization logs in and sees the "no access"
//! page; and a member removed from the organization loses access within the session TTL (the
//! server runs with `--access-session-ttl 10`, the shortest it accepts).
//!
//! Needs root (namespaces) and `chromium` + `chromium-driver`; runs with `EDGIBLE_ACC=1` after
//! `cargo build --workspace --bins`. Without `EDGIBLE_ACC` it skips, saying whether the browser
//! is installed; with it, a missing browser fails the test.

use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{Member, Organization, OrganizationSpec};
use edgible_acceptance_tests::access_platform::{AccessOptions, AccessPlatform, AppDef, member_with_password, step};
use edgible_acceptance_tests::browser::{Browser, BrowserOptions, artifacts_dir, browser_tier};
use edgible_acceptance_tests::netns::EDGE_ADDRESS;
use edgible_acceptance_tests::workload::field;
use serde_json::json;

/// The organization-protected application's hostname.
const HOST: &str = "org.example.test";
/// The member of the application's organization.
const ALICE: &str = "alice@example.test";
const ALICE_PASSWORD: &str = "violet-harbor-7f3k";
/// A user of another organization.
const BOB: &str = "bob@example.test";
const BOB_PASSWORD: &str = "amber-lantern-9q2m";
/// The server's `--access-session-ttl` (its minimum).
const SESSION_TTL: Duration = Duration::from_secs(10);
/// How long any page may take to show what a step expects.
const PAGE: Duration = Duration::from_secs(30);
/// How much later than the session TTL a removed member may still get in (the poll interval
/// and a round through the login pages).
const REMOVAL_SLACK: Duration = Duration::from_secs(5);

/// Fills the login form shown and submits it.
async fn log_in(browser: &Browser, email: &str, password: &str) -> anyhow::Result<()> {
    let email_field = browser.find("input[name=email]").await.context("the login form's e-mail field")?;
    browser.send_keys(&email_field, email).await?;
    let password_field = browser.find("input[name=password]").await.context("the login form's password field")?;
    browser.send_keys(&password_field, password).await?;
    match browser.find("form [type=submit]").await {
        Ok(submit) => browser.click(&submit).await?,
        // No submit control: Enter in the password field submits the form.
        Err(error) if error.code() == Some("no such element") => browser.send_keys(&password_field, "\u{E007}").await?,
        Err(error) => return Err(error.into()),
    }
    Ok(())
}

/// Whether `url` is one of the server's pages `path` (`/login`, `/logout`).
fn on_server(run: &AccessPlatform, url: &str, path: &str) -> bool {
    url.starts_with(&format!("{}{path}", run.public_url))
}

/// Whether the browser shows the workload's page as seen by `email`.
fn app_page_of(text: &str, email: &str) -> bool {
    field(text, "name") == Some("app-org") && field(text, "x-edgible-email") == Some(email)
}

async fn walk(run: &AccessPlatform, browser: &mut Browser) -> anyhow::Result<()> {
    let app = format!("https://{HOST}/");
    let client = run.server.client()?;
    let alice = member_with_password(&client, ALICE, "Alice", ALICE_PASSWORD).await?;
    let other = client.create::<Organization>(&OrganizationSpec { name: "other".parse()?, operator: false }).await?;
    let other_client = edgible::Client::new(&run.server.url, &other.admin_key.secret)?;
    member_with_password(&other_client, BOB, "Bob", BOB_PASSWORD).await?;

    step(&format!("1. open {app}: the browser lands on the server's login page"));
    browser.navigate(&app).await?;
    browser.wait_page("the login page", PAGE, |url, _| on_server(run, url, "/login")).await?;
    browser.find("input[name=email]").await.context("the login page has no e-mail field")?;
    browser.screenshot("login-page").await?;

    step("2. alice logs in: back on the app, whose workload received her e-mail");
    log_in(browser, ALICE, ALICE_PASSWORD).await?;
    let (url, _) = browser.wait_page("the app as alice", PAGE, |_, text| app_page_of(text, ALICE)).await?;
    anyhow::ensure!(url == app, "landed on {url}, not {app}");
    browser.screenshot("app-as-alice").await?;

    step("3. /.edgible/logout: the server's signed-out page");
    browser.navigate(&format!("https://{HOST}/.edgible/logout")).await?;
    browser
        .wait_page("the signed-out page", PAGE, |url, text| {
            on_server(run, url, "/logout") && text.to_lowercase().contains("signed out")
        })
        .await?;
    browser.screenshot("signed-out").await?;

    step("4. bob (another organization) logs in: the no-access page, naming him and the app");
    browser.navigate(&app).await?;
    browser.wait_page("the login page again", PAGE, |url, _| on_server(run, url, "/login")).await?;
    log_in(browser, BOB, BOB_PASSWORD).await?;
    let (_, text) = browser
        .wait_page("the no-access page", PAGE, |url, text| {
            url.starts_with(&run.public_url) && text.contains(BOB) && text.contains(HOST)
        })
        .await?;
    anyhow::ensure!(field(&text, "name").is_none(), "bob reached the workload:\n{text}");
    browser.screenshot("no-access").await?;
    browser.navigate(&format!("{}/logout", run.public_url)).await?;
    browser.wait_page("bob signed out", PAGE, |_, text| text.to_lowercase().contains("signed out")).await?;

    step("5. alice removed from the organization: her access ends within the session TTL");
    browser.navigate(&app).await?;
    browser.wait_page("the login page for alice", PAGE, |url, _| on_server(run, url, "/login")).await?;
    log_in(browser, ALICE, ALICE_PASSWORD).await?;
    browser.wait_page("the app as alice again", PAGE, |_, text| app_page_of(text, ALICE)).await?;
    client.delete::<Member>(&alice.id).await?;
    let removed = Instant::now();
    let ended = loop {
        browser.navigate(&app).await?;
        let text = browser.text().await?;
        if !app_page_of(&text, ALICE) {
            break removed.elapsed();
        }
        anyhow::ensure!(
            removed.elapsed() < SESSION_TTL + REMOVAL_SLACK,
            "alice still reached the app {:?} after her membership was removed",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (url, text) = browser
        .wait_page("the no-access page or the login form", PAGE, |url, text| {
            url.starts_with(&run.public_url) && (text.contains(ALICE) || on_server(run, url, "/login"))
        })
        .await?;
    eprintln!(
        "    alice lost access {ended:.1?} after the removal (session TTL {SESSION_TTL:?}); the browser shows {url}"
    );
    anyhow::ensure!(field(&text, "name").is_none(), "the page is the workload's:\n{text}");
    browser.screenshot("access-ended").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_flow() -> anyhow::Result<()> {
    let Some(binaries) = browser_tier("browser_login_flow")? else {
        return Ok(());
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let apps = [AppDef { name: "app-org", hostname: HOST, port: 18094, access: json!({"organization": {}}) }];
    let options = AccessOptions { session_ttl_seconds: Some(SESSION_TTL.as_secs()) };
    let run = AccessPlatform::start("br", &apps, &options).await?;
    let artifacts = artifacts_dir("browser_login_flow");
    let result = async {
        let trusted_spki = run.trusted_spki(&[HOST]).await?;
        let options = BrowserOptions {
            hosts: vec![HOST.to_owned()],
            address: EDGE_ADDRESS,
            trusted_spki,
            artifacts: artifacts.clone(),
        };
        let mut browser = Browser::start(&binaries, &options).await?;
        let walked = walk(&run, &mut browser).await;
        if walked.is_err() {
            let _ = browser.screenshot("failure").await;
        }
        browser.quit().await;
        walked
    }
    .await;
    if let Err(error) = result {
        let diagnosis = run.diagnose();
        let kept = run.keep();
        return Err(error.context(format!(
            "{diagnosis}\nscreenshots are in {}; logs and database are kept in {}",
            artifacts.display(),
            kept.display()
        )));
    }
    step(&format!("the browser walk passed; screenshots in {}", artifacts.display()));
    Ok(())
}
