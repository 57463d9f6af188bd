//! A real `edgible-server` process on an ephemeral port with its own SQLite file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bin_path;

/// A running server. Killed when dropped; its log stays in `dir/server.log`.
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The secret of the bootstrap key (scopes: platform).
    pub admin_key: String,
    pub dir: PathBuf,
    database: String,
}

impl ServerProcess {
    /// Starts a server with a fresh SQLite database in `dir`, bootstrapped with organization
    /// `acme`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let database = format!("sqlite://{}?mode=rwc", dir.join("edgible.db").display());
        Self::start_with_database(dir, &database)
    }

    /// Starts a server on an existing database URL (a restart keeps the data).
    pub fn start_with_database(dir: &Path, database: &str) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let ready_file = dir.join("server.ready");
        let key_file = dir.join("admin.key");
        let _ = fs::remove_file(&ready_file);
        let log = fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log"))?;
        let child = Command::new(bin_path("edgible-server")?)
            .args(["serve", "--database", database, "--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready_file)
            .args(["--bootstrap", "acme", "--bootstrap-key-file"])
            .arg(&key_file)
            .env("RUST_LOG", "info,edgible_server=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting edgible-server")?;
        let mut server = ServerProcess {
            child,
            url: String::new(),
            admin_key: String::new(),
            dir: dir.to_owned(),
            database: database.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(url) = fs::read_to_string(&ready_file)
                && !url.trim().is_empty()
            {
                server.url = url.trim().to_owned();
                break;
            }
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("edgible-server exited with {status}; see {}", dir.join("server.log").display());
            }
            anyhow::ensure!(Instant::now() < deadline, "edgible-server did not become ready in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server.admin_key = fs::read_to_string(&key_file)
            .with_context(|| format!("reading the bootstrap key {}", key_file.display()))?
            .trim()
            .to_owned();
        Ok(server)
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// A client with the bootstrap key.
    pub fn client(&self) -> anyhow::Result<edgible::Client> {
        Ok(edgible::Client::new(&self.url, &self.admin_key)?)
    }

    /// Stops the server with SIGTERM and waits for it, keeping the directory for a restart.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}
