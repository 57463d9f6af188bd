//! The real `edgible-server` binary: `serve` on port 0 with a ready file and bootstrap key
//! file, a clean exit on SIGTERM, a restart that leaves the key alone, and `bootstrap`.
//! Logs go to files in the test's directory, shown when something fails.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgible::model::{Organization, OrganizationSpec};
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_edgible-server");
/// How long the server may take to start or stop on a slow, busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
    log: PathBuf,
    url: String,
}

impl Server {
    async fn start(dir: &Path, database: &str, run: &str) -> anyhow::Result<Server> {
        let ready = dir.join(format!("{run}.ready"));
        let log = dir.join(format!("{run}.log"));
        let child = Command::new(BINARY)
            .args(["serve", "--database", database, "--listen", "127.0.0.1:0", "--bootstrap", "platform"])
            .arg("--bootstrap-key-file")
            .arg(dir.join("platform.key"))
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let mut server = Server { child, log, url: String::new() };
        server.url = server.wait_for_ready(&ready).await?;
        Ok(server)
    }

    async fn wait_for_ready(&mut self, ready: &Path) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(url) = std::fs::read_to_string(ready) {
                return Ok(url);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the server exited with {status} before it was ready:\n{}", self.log_text());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the server was not ready after {PATIENCE:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits for a successful exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the server already exited")?;
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(PATIENCE, self.child.wait()).await.context("no exit after SIGTERM")??;
        ensure!(status.success(), "exit status {status} after SIGTERM:\n{}", self.log_text());
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_bootstraps_and_drains() -> anyhow::Result<()> {
    // The client's TLS stack needs a provider even for plain HTTP; another test may have
    // installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new().prefix("edgible-binary-").tempdir()?;
    let database = format!("sqlite://{}?mode=rwc", dir.path().join("edgible.db").display());
    let key_file = dir.path().join("platform.key");

    let server = Server::start(dir.path(), &database, "first").await?;
    ensure!(server.url.starts_with("http://127.0.0.1:"), "ready file holds {:?}", server.url);
    let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the key file has mode {mode:o}");
    let secret = std::fs::read_to_string(&key_file)?.trim().to_owned();
    let client = edgible::Client::new(&server.url, &secret)?;
    let whoami = client.whoami().await?;
    ensure!(whoami.organization.spec.name.as_str() == "platform");
    let created = client.create::<Organization>(&OrganizationSpec { name: "acme".parse()?, operator: false }).await?;
    ensure!(created.admin_key.api_key.spec.name.as_str() == "admin");
    server.stop().await?;

    // A restart on the same database keeps the data and leaves the key file alone.
    let modified = std::fs::metadata(&key_file)?.modified()?;
    let server = Server::start(dir.path(), &database, "second").await?;
    ensure!(std::fs::metadata(&key_file)?.modified()? == modified, "the key file was rewritten");
    let client = edgible::Client::new(&server.url, &secret)?;
    client.whoami().await?;
    let admin = edgible::Client::new(&server.url, &created.admin_key.secret)?;
    ensure!(admin.whoami().await?.organization.spec.name.as_str() == "acme");
    server.stop().await?;

    // `bootstrap` refuses a database that holds organizations...
    let refused =
        Command::new(BINARY).args(["bootstrap", "--database", &database, "--organization", "again"]).output().await?;
    ensure!(!refused.status.success(), "bootstrap ran on a database with organizations");
    ensure!(String::from_utf8_lossy(&refused.stderr).contains("empty"), "{}", String::from_utf8_lossy(&refused.stderr));
    // ...and prints a working platform key on an empty one.
    let fresh = format!("sqlite://{}?mode=rwc", dir.path().join("fresh.db").display());
    let output =
        Command::new(BINARY).args(["bootstrap", "--database", &fresh, "--organization", "ops"]).output().await?;
    ensure!(output.status.success(), "bootstrap failed: {}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout)?.trim().to_owned();
    ensure!(printed.starts_with("edg_"), "bootstrap printed {printed:?}");
    let db = edgible_server::db::Db::connect(&fresh).await?;
    let key =
        db.api_key_by_secret_hash(&edgible_server::secrets::sha256_hex(&printed)).await?.context("printed key")?;
    ensure!(key.spec.scopes.contains(&edgible::model::Scope::Platform));
    Ok(())
}
