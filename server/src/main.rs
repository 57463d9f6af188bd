//! `edgible-server`: parse the configuration, set up logging, and run the chosen command.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use edgible_server::config::{Command, Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("edgible-server: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let config = Config::parse();
    init_tracing(config.log_format);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Printed rather than logged, so that it shows whatever RUST_LOG filters out.
            eprintln!("edgible-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    match config.command {
        Command::Serve(serve) => Ok(edgible_server::serve::serve(&serve, shutdown_signal()).await?),
        Command::Bootstrap(bootstrap) => {
            let db = edgible_server::db::Db::connect(&bootstrap.database_url).await?;
            let created =
                edgible_server::bootstrap::bootstrap(&db, &bootstrap.organization).await.context("bootstrapping")?;
            println!("{}", created.admin_key.secret);
            Ok(())
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
