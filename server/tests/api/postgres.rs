//! A throwaway PostgreSQL cluster for the API suite, started by the test itself.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the cluster runs as an
//! unprivileged system user (created on first use). It listens only on 127.0.0.1, on a port
//! picked by the kernel, with durability turned off since the data is thrown away.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, bail};

/// The system user the cluster runs as when the tests run as root.
const CLUSTER_USER: &str = "edgible-pg";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some(user)` when commands must run as another user.
    run_as: Option<&'static str>,
}

impl Postgres {
    /// Initializes and starts a cluster; fails with what is missing if PostgreSQL is not
    /// installed.
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = find_bin_dir()?;
        let run_as = is_root().then_some(CLUSTER_USER);
        if let Some(user) = run_as {
            ensure_user(user)?;
        }
        let dir = tempfile::Builder::new().prefix("edgible-pg-").tempdir()?;
        if let Some(user) = run_as {
            run(Command::new("chown").args(["-R", user]).arg(dir.path()))?;
        }
        let port = free_port()?;
        let postgres = Postgres { dir, bin, port, run_as };
        postgres
            .run_tool("initdb", |c| {
                c.arg("-D").arg(postgres.data_dir()).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            })
            .context("initdb")?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            postgres.dir.path().display()
        );
        postgres
            .run_tool("pg_ctl", |c| {
                c.arg("-D")
                    .arg(postgres.data_dir())
                    .arg("-l")
                    .arg(postgres.dir.path().join("postgres.log"))
                    .args(["-o", &options, "-w", "-t", "60", "start"])
            })
            .with_context(|| format!("pg_ctl start (log: {})", postgres.dir.path().join("postgres.log").display()))?;
        Ok(postgres)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        self.run_tool("createdb", |c| c.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name]))
            .with_context(|| format!("createdb {name}"))?;
        Ok(format!("postgres://postgres@127.0.0.1:{}/{name}", self.port))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run_tool(&self, tool: &str, args: impl FnOnce(&mut Command) -> &mut Command) -> anyhow::Result<Output> {
        let program = self.bin.join(tool);
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        // The cluster user cannot enter root's working directory.
        command.current_dir(self.dir.path());
        run(args(&mut command))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run_tool("pg_ctl", |c| c.arg("-D").arg(self.data_dir()).args(["-m", "immediate", "-w", "stop"]));
    }
}

fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// The directory holding `initdb` and `pg_ctl`: from PATH, else Debian's versioned directory.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        // Debian links initdb into PATH; createdb may only be in the versioned directory.
        let real = std::fs::canonicalize(dir.join("initdb"))?;
        if let Some(real_dir) = real.parent()
            && real_dir.join("createdb").is_file()
        {
            return Ok(real_dir.to_owned());
        }
        return Ok(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().filter(|dir| dir.join("initdb").is_file()).context(
        "PostgreSQL is not installed: no initdb on PATH or in /usr/lib/postgresql/*/bin (apt-get install postgresql)",
    )
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn ensure_user(user: &str) -> anyhow::Result<()> {
    if Command::new("id").arg(user).output()?.status.success() {
        return Ok(());
    }
    let created = Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
        .output()?;
    // Another test binary may have created it at the same moment.
    if !created.status.success() && !Command::new("id").arg(user).output()?.status.success() {
        bail!("could not create the system user {user}: {}", String::from_utf8_lossy(&created.stderr));
    }
    Ok(())
}

/// A port the kernel just handed out and released. Another process could take it before
/// PostgreSQL binds it; on loopback in a test run that is unlikely enough.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
