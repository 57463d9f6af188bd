//! `terraform-provider-edgible`: started by Terraform, never by hand. Checks the handshake
//! environment, announces where it listens, serves until Terraform shuts it down.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use terraform_provider_edgible::plugin::{Plugin, PluginEnv};
use terraform_provider_edgible::{EdgibleProvider, config};
use tokio::signal::unix::{SignalKind, signal};

/// The filter for the provider's log lines on stderr (Terraform shows them with `TF_LOG`).
const LOG_ENV: &str = "EDGIBLE_PROVIDER_LOG";

fn main() -> ExitCode {
    // One line per panic, never a backtrace, whatever RUST_BACKTRACE says: Terraform shows
    // the plugin's stderr to users.
    std::panic::set_hook(Box::new(|info| eprintln!("terraform-provider-edgible: internal error: {info}")));

    let env = PluginEnv::from_lookup(|name| std::env::var(name).ok());
    if let Err(error) = env.check() {
        eprintln!("{error}");
        return ExitCode::FAILURE;
    }
    // Terraform's client certificate is ECDSA P-521, which only aws-lc-rs verifies. Installing
    // fails only if a provider is already installed, which nothing here does.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_env_filter(filter).init();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("terraform-provider-edgible: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("terraform-provider-edgible: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(env: PluginEnv) -> anyhow::Result<()> {
    let plugin = Plugin::bind(&env).await?;
    let line = plugin.handshake_line()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
    }

    let shutdown = plugin.shutdown_handle();
    terraform_provider_edgible::plugin::watch_parent(shutdown.clone());
    // Ctrl-C in the terminal reaches the whole process group; Terraform itself decides how to
    // stop and tells the provider through StopProvider, so SIGINT is ignored here.
    let mut interrupts = signal(SignalKind::interrupt())?;
    tokio::spawn(async move { while interrupts.recv().await.is_some() {} });
    let mut terminations = signal(SignalKind::terminate())?;
    let on_terminate = shutdown.clone();
    tokio::spawn(async move {
        if terminations.recv().await.is_some() {
            on_terminate.send_replace(true);
        }
    });

    plugin.serve(EdgibleProvider::new(Arc::new(config::process_env))).await?;
    Ok(())
}
