//! Harness for tests that run the real binaries: it finds them in the workspace's target
//! directory, starts them on ephemeral ports with their files in a per-test directory, and
//! tears them down when dropped.
//!
//! Heavy tiers (terraform, namespaces, PostgreSQL, browsers) are gated by [`HEAVY_ENV`]; a test
//! calls [`heavy_tier`] first and returns early, printing why, when it is not set.

pub mod access_platform;
pub mod agent;
pub mod bench;
pub mod browser;
pub mod cli;
pub mod cloud_platform;
pub mod docker;
pub mod migration_platform;
pub mod netns;
pub mod pebble;
pub mod platform;
pub mod server;
pub mod terraform;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use cli::Cli;
pub use server::ServerProcess;

/// The environment variable that turns on the heavy test tiers. The README's test command
/// and CI set it.
pub const HEAVY_ENV: &str = "EDGIBLE_ACC";

/// Whether heavy tiers run. When they do not, prints why, naming the test.
pub fn heavy_tier(test: &str) -> bool {
    if std::env::var_os(HEAVY_ENV).is_some_and(|v| v == "1") {
        return true;
    }
    eprintln!("skipping {test}: set {HEAVY_ENV}=1 to run heavy acceptance tests (the README's test command does)");
    false
}

/// The directory cargo builds into for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

/// The path of a workspace binary built in the same profile as this test. Fails with the
/// command to run when it has not been built.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let path = target_dir().join(profile).join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins{}`)",
        path.display(),
        if profile == "release" { " --release" } else { "" }
    );
    Ok(path)
}

/// Polls `condition` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks `condition` every 50 ms until it holds or `timeout` passes; answers whether it held.
/// For code without a runtime (drop guards, threads inside a namespace).
pub fn wait_until_sync(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
