//! `edgible-agent`: parse the configuration, set up logging, and run the chosen command.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use edgible_agent::config::{Command, Config, EnrollConfig, LogFormat};
use edgible_agent::state::StateDir;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("edgible-agent: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let config = Config::parse();
    init_tracing(config.log_format);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Printed rather than logged, so that it shows whatever RUST_LOG filters out.
            eprintln!("edgible-agent: {}", render_error(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    match config.command {
        Command::Enroll(enroll) => self::enroll(&enroll).await,
        Command::Run(run) => Ok(edgible_agent::service::run(&run, shutdown_signal()).await?),
    }
}

async fn enroll(config: &EnrollConfig) -> anyhow::Result<()> {
    let state_dir = StateDir::open(&config.state_dir)
        .with_context(|| format!("opening the state directory {}", config.state_dir.display()))?;
    let identity = edgible_agent::enroll::enroll(&state_dir, &config.server, &config.token, config.force).await?;
    println!(
        "Enrolled as device {} ({}) with {}; tunnel address {}, public key {}.",
        identity.device_name, identity.device_id, identity.server, identity.tunnel_address, identity.public_key
    );
    println!("Start the agent with:\n  edgible-agent run{}", state_dir_flag(&config.state_dir));
    Ok(())
}

/// The error and its causes on one line. Some errors repeat their source's text in their own
/// message (reqwest's and the client's do); a cause already shown is not shown again.
fn render_error(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// The `--state-dir` a later command needs, empty for the default directory.
fn state_dir_flag(state_dir: &Path) -> String {
    if state_dir == Path::new(edgible_agent::config::DEFAULT_STATE_DIR) {
        String::new()
    } else {
        format!(" --state-dir {}", state_dir.display())
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person watching; journald and log files get plain text.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = interrupt.await;
        }
    }
}
