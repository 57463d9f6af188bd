//! Runs the real `edgible` command line with its own configuration directory, isolated from
//! the environment of the test process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::Context;

use crate::bin_path;

/// The `edgible` binary with a private configuration directory.
#[derive(Debug, Clone)]
pub struct Cli {
    bin: PathBuf,
    /// Where `edgible login` saves `config.json` (`EDGIBLE_CONFIG_DIR`).
    pub config_dir: PathBuf,
}

/// What one run printed and how it ended.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub args: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    pub fn new(config_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self { bin: bin_path("edgible")?, config_dir: config_dir.to_owned() })
    }

    /// The path of the saved configuration.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.json")
    }

    /// Runs `edgible ARGS` with stdin closed.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        self.run_with_stdin(args, None)
    }

    /// Runs `edgible ARGS`, feeding `stdin` (a pipe, so never a terminal) when given.
    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<CliOutput> {
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .env("EDGIBLE_CONFIG_DIR", &self.config_dir)
            // The test process's own settings must not leak into the CLI under test.
            .env_remove("EDGIBLE_ENDPOINT")
            .env_remove("EDGIBLE_API_KEY")
            .env_remove("RUST_LOG")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        if let Some(text) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(text.as_bytes()).context("writing the CLI's stdin")?;
        }
        let output = child.wait_with_output().context("waiting for the CLI")?;
        Ok(CliOutput {
            args: args.join(" "),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs `edgible ARGS` and requires success.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        self.run(args)?.success()
    }

    /// Runs `edgible ARGS` and requires failure.
    pub fn fails(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        self.run(args)?.failure()
    }

    /// Runs `edgible ARGS -o json`, requires success and parses stdout.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        self.ok(&args)?.json()
    }
}

impl CliOutput {
    pub fn success(self) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.status.success(),
            "`edgible {}` failed ({}):\n{}",
            self.args,
            self.status,
            self.describe()
        );
        Ok(self)
    }

    /// Requires a failure with exit code 1 and an `error: ` line, and no sign of a panic or of
    /// Debug output.
    pub fn failure(self) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.status.code() == Some(1),
            "`edgible {}` should have failed with exit code 1 ({}):\n{}",
            self.args,
            self.status,
            self.describe()
        );
        anyhow::ensure!(self.stderr.starts_with("error: "), "no `error: ` line:\n{}", self.describe());
        for sign in ["panicked", "Backtrace", "Api {", "Error {"] {
            anyhow::ensure!(!self.stderr.contains(sign), "stderr shows {sign:?}:\n{}", self.describe());
        }
        Ok(self)
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("`edgible {}` did not print JSON:\n{}", self.args, self.describe()))
    }

    fn describe(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}
