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
    raise_open_files_limit();
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

/// Raises the soft limit of open files to the hard limit: every connected agent holds a
/// socket, and the usual soft limit of 1024 would cap the server far below what it can serve.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(error) => tracing::warn!(%error, soft, hard, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
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
