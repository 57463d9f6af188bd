//! Runs the real `terraform` against the freshly built provider.
//!
//! Each [`Terraform`] owns a working directory with its own CLI configuration whose
//! `dev_overrides` point `edgible/edgible` at the workspace's `terraform-provider-edgible`, so
//! no `terraform init` and no network are needed. Terraform finds the configuration through
//! `TF_CLI_CONFIG_FILE`; the provider finds the server through `EDGIBLE_ENDPOINT` and
//! `EDGIBLE_API_KEY`. Every command and its output is appended to `terraform.log` in the
//! working directory.
//!
//! [`SharedServer`] gives the Terraform tests of one test binary a single `edgible-server`,
//! and [`TestOrganization`] a fresh organization on it per test, so tests stay isolated
//! without paying for a server each.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Weak};

use anyhow::Context;
use edgible::model::{Organization, OrganizationSpec};
use tokio::process::Command;

use crate::{ServerProcess, bin_path};

/// The provider's address in configurations.
pub const PROVIDER_SOURCE: &str = "edgible/edgible";

/// The `terraform` binary on PATH, or an error saying how to get one.
pub fn find_terraform() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join("terraform")).find(|candidate| candidate.is_file()).context(
        "`terraform` is not on PATH: the Terraform acceptance tests need Terraform 1.11 or newer \
             (https://developer.hashicorp.com/terraform/install)",
    )
}

/// The directory holding the built `terraform-provider-edgible`, for `dev_overrides`.
pub fn provider_dir() -> anyhow::Result<PathBuf> {
    let binary = bin_path("terraform-provider-edgible")?;
    binary.parent().map(Path::to_path_buf).context("the provider binary has no directory")
}

/// The `terraform { required_providers }` block every test configuration starts with.
pub fn required_providers() -> String {
    format!("terraform {{\n  required_providers {{\n    edgible = {{ source = \"{PROVIDER_SOURCE}\" }}\n  }}\n}}\n")
}

/// One Terraform working directory.
#[derive(Debug, Clone)]
pub struct Terraform {
    binary: PathBuf,
    pub dir: PathBuf,
    cli_config: PathBuf,
    endpoint: String,
    api_key: String,
}

/// What one terraform command printed and how it ended.
#[derive(Debug)]
pub struct TfOutput {
    pub args: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl TfOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails with everything terraform printed unless it exited with `code`.
    pub fn expect_code(self, code: i32) -> anyhow::Result<Self> {
        anyhow::ensure!(self.code() == Some(code), "expected exit code {code}: {self}");
        Ok(self)
    }

    pub fn expect_success(self) -> anyhow::Result<Self> {
        self.expect_code(0)
    }

    /// Fails unless terraform failed.
    pub fn expect_failure(self) -> anyhow::Result<Self> {
        anyhow::ensure!(!self.status.success(), "expected a failure: {self}");
        Ok(self)
    }

    /// stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for TfOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`terraform {}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

impl Terraform {
    /// A working directory `dir` (created if needed) whose provider talks to `endpoint` with
    /// `api_key`.
    pub fn new(dir: &Path, endpoint: &str, api_key: &str) -> anyhow::Result<Self> {
        let binary = find_terraform()?;
        std::fs::create_dir_all(dir)?;
        let cli_config = dir.join("terraform.tfrc");
        let provider_dir = provider_dir()?;
        std::fs::write(
            &cli_config,
            format!(
                "provider_installation {{\n  dev_overrides {{\n    \"{PROVIDER_SOURCE}\" = \"{}\"\n  }}\n  direct {{}}\n}}\n",
                provider_dir.display()
            ),
        )?;
        Ok(Self { binary, dir: dir.to_owned(), cli_config, endpoint: endpoint.to_owned(), api_key: api_key.to_owned() })
    }

    /// Another working directory with the same server and key (a fresh state).
    pub fn sibling(&self, dir: &Path) -> anyhow::Result<Self> {
        Self::new(dir, &self.endpoint, &self.api_key)
    }

    /// Replaces the configuration with `main.tf` (the `required_providers` block is added).
    pub fn write_config(&self, main_tf: &str) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("main.tf"), format!("{}\n{main_tf}", required_providers()))?;
        Ok(())
    }

    /// Copies the `.tf` files of `source` into the working directory.
    pub fn copy_config_from(&self, source: &Path) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(source).with_context(|| format!("reading {}", source.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|extension| extension == "tf") {
                let name = path.file_name().context("file without a name")?;
                std::fs::copy(&path, self.dir.join(name))?;
            }
        }
        Ok(())
    }

    /// Runs `terraform ARGS` in the working directory, with a clean, offline environment.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<TfOutput> {
        let output = Command::new(&self.binary)
            .args(args)
            .current_dir(&self.dir)
            .env("TF_CLI_CONFIG_FILE", &self.cli_config)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .env("EDGIBLE_ENDPOINT", &self.endpoint)
            .env("EDGIBLE_API_KEY", &self.api_key)
            .env("EDGIBLE_PROVIDER_LOG", "info")
            // The developer's Terraform settings must not leak into the test.
            .env_remove("TF_LOG")
            .env_remove("TF_LOG_PATH")
            .env_remove("TF_DATA_DIR")
            .env_remove("TF_PLUGIN_CACHE_DIR")
            .env_remove("TF_WORKSPACE")
            // The server is on loopback or in the test's namespaces: never through a proxy.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            // A test that gives up on a slow run must not leave terraform (and its provider) behind.
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running {}", self.binary.display()))?;
        let result = TfOutput {
            args: args.join(" "),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        let mut log = String::new();
        let _ = writeln!(log, "\n$ terraform {}\n{result}", result.args);
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("terraform.log"))
            .and_then(|mut file| std::io::Write::write_all(&mut file, log.as_bytes()));
        Ok(result)
    }

    /// `terraform apply`, which must succeed.
    pub async fn apply(&self) -> anyhow::Result<TfOutput> {
        self.run(&["apply", "-auto-approve", "-input=false", "-no-color"]).await?.expect_success()
    }

    /// `terraform apply`, which may fail.
    pub async fn try_apply(&self) -> anyhow::Result<TfOutput> {
        self.run(&["apply", "-auto-approve", "-input=false", "-no-color"]).await
    }

    /// `terraform plan -detailed-exitcode`: 0 without changes, 2 with changes, 1 on errors.
    pub async fn plan(&self) -> anyhow::Result<TfOutput> {
        self.run(&["plan", "-detailed-exitcode", "-input=false", "-no-color"]).await
    }

    /// Fails unless a plan shows no changes at all.
    pub async fn expect_no_changes(&self) -> anyhow::Result<()> {
        self.plan().await?.expect_code(0).map(drop).context("the configuration should plan no changes")
    }

    pub async fn import(&self, address: &str, id: &str) -> anyhow::Result<TfOutput> {
        self.run(&["import", "-input=false", "-no-color", address, id]).await?.expect_success()
    }

    pub async fn destroy(&self) -> anyhow::Result<TfOutput> {
        self.run(&["destroy", "-auto-approve", "-input=false", "-no-color"]).await?.expect_success()
    }

    /// `terraform show -json` of the state.
    pub async fn state(&self) -> anyhow::Result<serde_json::Value> {
        let output = self.run(&["show", "-json", "-no-color"]).await?.expect_success()?;
        serde_json::from_str(&output.stdout).context("parsing `terraform show -json`")
    }

    /// The attribute values of one resource in the state (`edgible_device.laptop`).
    pub async fn values(&self, address: &str) -> anyhow::Result<serde_json::Value> {
        let state = self.state().await?;
        let resources = state
            .pointer("/values/root_module/resources")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("the state has no resources, looking for {address}"))?;
        resources
            .iter()
            .find(|resource| resource.get("address").and_then(serde_json::Value::as_str) == Some(address))
            .and_then(|resource| resource.get("values"))
            .cloned()
            .with_context(|| format!("{address} is not in the state"))
    }

    /// The id of one resource in the state.
    pub async fn id(&self, address: &str) -> anyhow::Result<String> {
        let values = self.values(address).await?;
        values
            .get("id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{address} has no id"))
    }
}

/// The server shared by the Terraform tests of one test binary (under nextest, each test is
/// its own process and so gets its own). Stops when the last test holding it is done.
pub struct SharedServer {
    pub server: ServerProcess,
    // Dropped after the server (fields drop in order), so the log stays until the server is
    // gone.
    _dir: tempfile::TempDir,
}

impl SharedServer {
    pub fn get() -> anyhow::Result<Arc<SharedServer>> {
        static SHARED: Mutex<Weak<SharedServer>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(shared) = slot.upgrade() {
            return Ok(shared);
        }
        let dir = tempfile::Builder::new().prefix("edgible-terraform-server-").tempdir()?;
        let server = ServerProcess::start(dir.path())?;
        let shared = Arc::new(SharedServer { server, _dir: dir });
        *slot = Arc::downgrade(&shared);
        Ok(shared)
    }
}

/// An organization of its own for one test, with an admin key, and a Terraform working
/// directory using that key.
pub struct TestOrganization {
    pub server: Arc<SharedServer>,
    pub organization: Organization,
    pub api_key: String,
    pub client: edgible::Client,
    pub dir: tempfile::TempDir,
}

impl TestOrganization {
    /// Creates organization `name` (a valid object name) on the shared server.
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let server = SharedServer::get()?;
        let platform = server.server.client()?;
        let spec = OrganizationSpec {
            name: name.parse().with_context(|| format!("{name:?} as an organization name"))?,
            operator: false,
        };
        let created = platform.create::<Organization>(&spec).await.context("creating the test's organization")?;
        let api_key = created.admin_key.secret;
        let client = edgible::Client::new(&server.server.url, &api_key)?;
        let dir = tempfile::Builder::new().prefix(&format!("edgible-terraform-{name}-")).tempdir()?;
        Ok(Self { server, organization: created.organization, api_key, client, dir })
    }

    /// A Terraform working directory `name` inside the test's directory.
    pub fn terraform(&self, name: &str) -> anyhow::Result<Terraform> {
        Terraform::new(&self.dir.path().join(name), &self.server.server.url, &self.api_key)
    }

    /// Ends a test: on failure keeps the test's directory (Terraform logs and state, plus a
    /// copy of the server log) and says where it is.
    pub fn finish(self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        let Err(error) = result else { return Ok(()) };
        let _ = std::fs::copy(self.server.server.dir.join("server.log"), self.dir.path().join("server.log"));
        let kept = self.dir.keep();
        Err(error
            .context(format!("the test's files (terraform.log, state, server.log) are kept in {}", kept.display())))
    }
}
