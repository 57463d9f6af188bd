//! A real browser for the acceptance tests: Debian's headless Chromium driven over W3C
//! WebDriver by Debian's `chromedriver`, with a small client written here (JSON over reqwest)
//! rather than a WebDriver crate, because the tests need only a handful of commands.
//!
//! [`Browser::start`] runs `chromedriver` on a free loopback port in its own process group
//! (the group, and with it Chromium, is killed when the [`Browser`] drops), opens a session
//! with a fresh profile directory, and maps the given hostnames to an address with
//! `--host-resolver-rules`, so `https://app.example.test/` reaches the edge of a namespace
//! topology from the root namespace. Chromium is told to trust exactly the public keys the
//! test passes (`--ignore-certificate-errors-spki-list`): the test verifies the certificates
//! against the platform's internal CA itself first (see [`spki_sha256_base64`]); every other
//! certificate error still fails the navigation.
//!
//! Every [`Browser::screenshot`] is a PNG in the artifacts directory ([`artifacts_dir`]): one
//! file per step, its path printed, so a CI run keeps what the browser saw.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use serde_json::{Value, json};

/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Where Debian's `chromium-driver` package puts the driver.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The environment variable naming the directory screenshots go to.
pub const ARTIFACTS_ENV: &str = "EDGIBLE_ARTIFACTS_DIR";

/// The W3C name of the key an element reference is under.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long chromedriver may take to start listening.
const DRIVER_START: Duration = Duration::from_secs(30);
/// How long one WebDriver command may take (a navigation waits for the page to load).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The browser and driver binaries, when both are installed.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

impl Binaries {
    /// Both binaries, or what is missing and how to install it.
    pub fn find() -> Result<Self, String> {
        let missing: Vec<&str> = [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")]
            .into_iter()
            .filter(|(path, _)| !Path::new(path).is_file())
            .map(|(_, package)| package)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install {}), missing: {}",
                missing.join(" "),
                missing.join(", ")
            ));
        }
        Ok(Self { chromium: CHROMIUM.into(), chromedriver: CHROMEDRIVER.into() })
    }
}

/// Whether a browser test runs: `None` (printing why) when heavy tiers are off; with them
/// on, the binaries, or an error when they are missing (a CI run must not pass silently
/// without its browser).
pub fn browser_tier(test: &str) -> anyhow::Result<Option<Binaries>> {
    let found = Binaries::find();
    if !crate::heavy_tier(test) {
        if let Err(missing) = found {
            eprintln!("  (and the browser is not installed: {missing})");
        }
        return Ok(None);
    }
    found.map(Some).map_err(|missing| anyhow::anyhow!("{test} needs a browser: {missing}"))
}

/// The directory screenshots go to: `$EDGIBLE_ARTIFACTS_DIR/<test>`, or
/// `target/artifacts/browser/<test>`.
pub fn artifacts_dir(test: &str) -> PathBuf {
    match std::env::var_os(ARTIFACTS_ENV) {
        Some(dir) => PathBuf::from(dir).join(test),
        None => crate::target_dir().join("artifacts").join("browser").join(test),
    }
}

/// The base64 of the SHA-256 of a DER certificate's SubjectPublicKeyInfo: what
/// `--ignore-certificate-errors-spki-list` takes.
pub fn spki_sha256_base64(certificate_der: &[u8]) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let (_, certificate) =
        x509_parser::parse_x509_certificate(certificate_der).context("parsing the certificate's DER")?;
    let spki = certificate.tbs_certificate.subject_pki.raw;
    Ok(base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki)))
}

/// How to start the browser.
#[derive(Debug, Clone)]
pub struct BrowserOptions {
    /// Hostnames that resolve to `address` (every other name fails to resolve).
    pub hosts: Vec<String>,
    pub address: Ipv4Addr,
    /// Public keys (see [`spki_sha256_base64`]) whose certificates Chromium accepts although
    /// it does not know their CA.
    pub trusted_spki: Vec<String>,
    /// Where screenshots go.
    pub artifacts: PathBuf,
}

/// What a failed WebDriver command answered.
#[derive(Debug, thiserror::Error)]
pub enum WebDriverError {
    #[error("WebDriver {command} failed: {error}: {message}")]
    Command { command: String, error: String, message: String },
    #[error("WebDriver {command}: {source}")]
    Transport {
        command: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("WebDriver {command} answered something unexpected: {answer}")]
    Unexpected { command: String, answer: String },
}

impl WebDriverError {
    /// The W3C error code (`no such element`), when the driver answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            WebDriverError::Command { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A found element.
#[derive(Debug, Clone)]
pub struct Element {
    id: String,
}

/// A Chromium session. Dropping it kills the driver's process group, Chromium included.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    base: String,
    session: String,
    artifacts: PathBuf,
    steps: u32,
    // Removed after the processes are gone (fields drop after `drop` runs).
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start(binaries: &Binaries, options: &BrowserOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.artifacts)
            .with_context(|| format!("creating {}", options.artifacts.display()))?;
        let artifacts = std::fs::canonicalize(&options.artifacts)?;
        // Screenshots of an earlier run would mix with this run's.
        for entry in std::fs::read_dir(&artifacts)? {
            let path = entry?.path();
            if path.extension().is_some_and(|extension| extension == "png") {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        let profile = tempfile::Builder::new().prefix("edgible-chromium-").tempdir()?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        let log = std::fs::File::create(artifacts.join("chromedriver.log"))?;
        let driver = Command::new(&binaries.chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, so the drop kills Chromium with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binaries.chromedriver.display()))?;
        let http = reqwest::Client::builder().timeout(COMMAND_TIMEOUT).no_proxy().build()?;
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser { driver, http, base, session: String::new(), artifacts, steps: 0, profile };
        browser.wait_ready().await?;
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "goog:chromeOptions": {
                        "binary": binaries.chromium.display().to_string(),
                        "args": chromium_args(options, browser.profile.path()),
                    },
                    "pageLoadStrategy": "normal",
                    "timeouts": {"pageLoad": 30_000, "script": 10_000, "implicit": 0},
                }
            }
        });
        let answer = browser.command(reqwest::Method::POST, "session", Some(capabilities)).await?;
        browser.session = answer
            .get("sessionId")
            .and_then(Value::as_str)
            .with_context(|| format!("the new session has no id: {answer}"))?
            .to_owned();
        Ok(browser)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + DRIVER_START;
        loop {
            if let Some(status) = self.driver.try_wait()? {
                anyhow::bail!("chromedriver exited with {status}; see {}/chromedriver.log", self.artifacts.display());
            }
            let ready = self.http.get(format!("{}/status", self.base)).timeout(Duration::from_secs(2)).send().await;
            if let Ok(response) = ready
                && let Ok(body) = response.json::<Value>().await
                && body["value"]["ready"] == Value::Bool(true)
            {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "chromedriver was not ready within {DRIVER_START:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One WebDriver command: `path` below the driver's root; answers the `value`.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, WebDriverError> {
        let name = format!("{method} /{path}");
        let mut request = self.http.request(method, format!("{}/{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let transport = |source| WebDriverError::Transport { command: name.clone(), source };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let answer: Value = response.json().await.map_err(transport)?;
        let value = answer.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() {
            let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or("-").to_owned();
            return Err(WebDriverError::Command { command: name, error: text("error"), message: text("message") });
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("session/{}/{rest}", self.session)
    }

    /// Opens `url` and waits for the page (after redirects) to load.
    pub async fn navigate(&self, url: &str) -> Result<(), WebDriverError> {
        self.command(reqwest::Method::POST, &self.session_path("url"), Some(json!({"url": url}))).await?;
        Ok(())
    }

    /// The URL of the page shown.
    pub async fn current_url(&self) -> Result<String, WebDriverError> {
        let value = self.command(reqwest::Method::GET, &self.session_path("url"), None).await?;
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| WebDriverError::Unexpected { command: "GET url".into(), answer: value.to_string() })
    }

    /// The first element matching a CSS selector.
    pub async fn find(&self, css: &str) -> Result<Element, WebDriverError> {
        let body = json!({"using": "css selector", "value": css});
        let value = self.command(reqwest::Method::POST, &self.session_path("element"), Some(body)).await?;
        let id = value
            .get(ELEMENT_KEY)
            .and_then(Value::as_str)
            .ok_or_else(|| WebDriverError::Unexpected { command: format!("find {css}"), answer: value.to_string() })?;
        Ok(Element { id: id.to_owned() })
    }

    /// Types `text` into an element (after what it holds).
    pub async fn send_keys(&self, element: &Element, text: &str) -> Result<(), WebDriverError> {
        let path = self.session_path(&format!("element/{}/value", element.id));
        self.command(reqwest::Method::POST, &path, Some(json!({"text": text}))).await?;
        Ok(())
    }

    /// Clicks an element.
    pub async fn click(&self, element: &Element) -> Result<(), WebDriverError> {
        let path = self.session_path(&format!("element/{}/click", element.id));
        self.command(reqwest::Method::POST, &path, Some(json!({}))).await?;
        Ok(())
    }

    /// The page's HTML as the browser holds it.
    pub async fn source(&self) -> Result<String, WebDriverError> {
        let value = self.command(reqwest::Method::GET, &self.session_path("source"), None).await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// The page's visible text (of `body`).
    pub async fn text(&self) -> Result<String, WebDriverError> {
        let body = self.find("body").await?;
        let value =
            self.command(reqwest::Method::GET, &self.session_path(&format!("element/{}/text", body.id)), None).await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// Saves a screenshot as `NN-<step>.png` in the artifacts directory and prints its path.
    pub async fn screenshot(&mut self, step: &str) -> anyhow::Result<PathBuf> {
        let value = self.command(reqwest::Method::GET, &self.session_path("screenshot"), None).await?;
        let encoded = value.as_str().context("the screenshot is not a base64 string")?;
        let png = base64::engine::general_purpose::STANDARD.decode(encoded).context("decoding the screenshot")?;
        anyhow::ensure!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        self.steps += 1;
        let name: String = step.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
        let path = self.artifacts.join(format!("{:02}-{name}.png", self.steps));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("    screenshot: {}", path.display());
        Ok(path)
    }

    /// Waits until the page shown satisfies `check` (given its URL and text), polling every
    /// 200 ms; answers the URL and text. On timeout the error shows the last page.
    pub async fn wait_page(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&str, &str) -> bool,
    ) -> anyhow::Result<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let url = self.current_url().await?;
            // A page being replaced may have no body for a moment.
            let text = match self.text().await {
                Ok(text) => text,
                Err(error) if error.code().is_some() => String::new(),
                Err(error) => return Err(error.into()),
            };
            if check(&url, &text) {
                return Ok((url, text));
            }
            if Instant::now() >= deadline {
                anyhow::bail!("timed out after {timeout:?} waiting for {what}; the browser shows {url}:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Ends the session (Chromium exits) and stops the driver.
    pub async fn quit(mut self) {
        if !self.session.is_empty() {
            let path = format!("session/{}", self.session);
            let _ =
                tokio::time::timeout(Duration::from_secs(10), self.command(reqwest::Method::DELETE, &path, None)).await;
            self.session.clear();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver leads its own group (`process_group(0)`), which Chromium's processes join.
        // The leader is reaped only at the end, so the group id cannot be reused by anyone else
        // while it is signalled.
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
            crate::wait_until_sync(Duration::from_secs(5), || exited_unreaped(self.driver.id()));
            // Whatever outlived the driver (or a driver that ignored SIGTERM).
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// Whether process `pid` (a child not yet waited for) has exited: a zombie, or gone.
fn exited_unreaped(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// Chromium's command line for `options`, with its profile in `profile`.
pub fn chromium_args(options: &BrowserOptions, profile: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        // The login pages are plain HTTP on a test address: no automatic upgrade to HTTPS.
        "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
        "--window-size=1024,768",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    if !options.hosts.is_empty() {
        let rules: Vec<String> = options.hosts.iter().map(|host| format!("MAP {host} {}", options.address)).collect();
        // Everything else stays unresolvable, so the browser can only reach the topology.
        args.push(format!("--host-resolver-rules={}, EXCLUDE localhost", rules.join(", ")));
    }
    // The honest narrow choice: only certificates with these keys (which the test verified
    // against the platform's CA) pass; `--ignore-certificate-errors` would accept anything.
    // Chromium honours this flag only with `--user-data-dir`, which is always set here.
    if !options.trusted_spki.is_empty() {
        args.push(format!("--ignore-certificate-errors-spki-list={}", options.trusted_spki.join(",")));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chromium_maps_the_hosts_and_trusts_only_the_given_keys() {
        let options = BrowserOptions {
            hosts: vec!["a.example.test".into(), "b.example.test".into()],
            address: Ipv4Addr::new(203, 0, 113, 1),
            trusted_spki: vec!["AAA=".into(), "BBB=".into()],
            artifacts: PathBuf::from("/tmp/x"),
        };
        let args = chromium_args(&options, Path::new("/tmp/profile"));
        assert!(args.contains(&"--headless=new".to_owned()));
        assert!(args.contains(&"--user-data-dir=/tmp/profile".to_owned()));
        assert!(args.contains(
            &"--host-resolver-rules=MAP a.example.test 203.0.113.1, MAP b.example.test 203.0.113.1, EXCLUDE localhost"
                .to_owned()
        ));
        assert!(args.contains(&"--ignore-certificate-errors-spki-list=AAA=,BBB=".to_owned()));
        assert!(!args.iter().any(|arg| arg == "--ignore-certificate-errors"));
    }

    #[test]
    fn the_spki_hash_is_of_the_public_key_only() -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let first = rcgen::CertificateParams::new(vec!["a.example.test".into()])?.self_signed(&key)?;
        let second = rcgen::CertificateParams::new(vec!["b.example.test".into()])?.self_signed(&key)?;
        let other =
            rcgen::CertificateParams::new(vec!["a.example.test".into()])?.self_signed(&rcgen::KeyPair::generate()?)?;
        let hash = spki_sha256_base64(first.der())?;
        assert_eq!(hash, spki_sha256_base64(second.der())?);
        assert_ne!(hash, spki_sha256_base64(other.der())?);
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(&hash)?.len(), 32);
        assert!(spki_sha256_base64(b"not DER").is_err());
        Ok(())
    }

    #[test]
    fn artifacts_go_under_the_target_directory_by_default() {
        if std::env::var_os(ARTIFACTS_ENV).is_none() {
            assert!(artifacts_dir("t").ends_with("artifacts/browser/t"));
        }
    }

    /// The driver and Chromium for real, on a page served from loopback: navigate, find, type,
    /// click, read, screenshot, and nothing left running after the drop.
    #[tokio::test]
    async fn the_browser_fills_a_form_and_takes_screenshots() -> anyhow::Result<()> {
        let Some(binaries) = browser_tier("the_browser_fills_a_form_and_takes_screenshots")? else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(serve_form(listener));
        let dir = tempfile::tempdir()?;
        let options = BrowserOptions {
            hosts: Vec::new(),
            address: Ipv4Addr::LOCALHOST,
            trusted_spki: Vec::new(),
            artifacts: dir.path().join("shots"),
        };
        let mut browser = Browser::start(&binaries, &options).await?;
        let result = async {
            browser.navigate(&format!("http://{address}/")).await?;
            let field = browser.find("input[name=word]").await?;
            browser.send_keys(&field, "hello").await?;
            browser.click(&browser.find("[type=submit]").await?).await?;
            let (url, text) = browser
                .wait_page("the answer page", Duration::from_secs(20), |_, text| text.contains("you said hello"))
                .await?;
            anyhow::ensure!(url.ends_with("/said?word=hello"), "{url}");
            anyhow::ensure!(browser.source().await?.contains("<b>"), "{text}");
            let shot = browser.screenshot("answer page").await?;
            anyhow::ensure!(shot.ends_with("01-answer-page.png") && shot.is_file(), "{}", shot.display());
            let error = browser.find("#missing").await.expect_err("no such element");
            anyhow::ensure!(error.code() == Some("no such element"), "{error}");
            Ok(())
        }
        .await;
        let pid = browser.driver.id();
        browser.quit().await;
        server.abort();
        result?;
        let gone = crate::wait_until_sync(Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.contains(") Z "))
        });
        anyhow::ensure!(gone, "chromedriver (pid {pid}) survived the drop");
        Ok(())
    }

    /// A two-page site: a form at `/` and its answer at `/said`.
    async fn serve_form(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let mut request = vec![0u8; 8192];
                let read = stream.read(&mut request).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..read]);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body = if let Some(query) = path.strip_prefix("/said?word=") {
                    format!("<!doctype html><title>said</title><p>you said <b>{query}</b></p>")
                } else {
                    "<!doctype html><title>form</title><form action=/said method=get>\
                     <input name=word><button type=submit>Send</button></form>"
                        .to_owned()
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    }
}
