//! The command line of `edgible-server`, the one typed configuration of the binary. Every
//! option that has an environment variable names it in a constant here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use edgible::model::Name;

/// Where the database URL may also come from.
pub const DATABASE_URL_ENV: &str = "EDGIBLE_DATABASE_URL";
/// Where the listen address may also come from.
pub const LISTEN_ENV: &str = "EDGIBLE_LISTEN";
/// Where the log format may also come from.
pub const LOG_FORMAT_ENV: &str = "EDGIBLE_LOG_FORMAT";

#[derive(Debug, Parser)]
#[command(name = "edgible-server", version, about = "The Edgible control plane")]
pub struct Config {
    /// How log lines are written to standard error; the level comes from `RUST_LOG` (default
    /// `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API until SIGTERM or SIGINT.
    Serve(ServeConfig),
    /// Create the first organization and a `platform` key on an empty database, printing the
    /// key's secret; refuses once any organization exists.
    Bootstrap(BootstrapConfig),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// The database: `sqlite://PATH?mode=rwc` or `postgres://USER:PASSWORD@HOST/DB`.
    #[arg(long = "database", env = DATABASE_URL_ENV)]
    pub database_url: String,

    /// The address to listen on; port 0 picks a free port (see `--ready-file`).
    #[arg(long, env = LISTEN_ENV, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Once listening, write the server's base URL (`http://IP:PORT`) to this file.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,

    /// On an empty database, create this organization with a `platform` key.
    #[arg(long, requires = "bootstrap_key_file")]
    pub bootstrap: Option<Name>,

    /// Where `--bootstrap` writes the new key's secret (mode 0600); left alone when the
    /// database already holds organizations.
    #[arg(long, requires = "bootstrap")]
    pub bootstrap_key_file: Option<PathBuf>,

    /// Seconds to let open requests finish after SIGTERM or SIGINT before exiting anyway.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,

    /// Seconds between the pings the server sends each connected agent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub agent_ping_seconds: u64,

    /// Seconds an agent may take to answer a ping before its session is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub agent_pong_timeout_seconds: u64,
}

impl ServeConfig {
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    /// The timing of agent sessions.
    pub fn session_config(&self) -> crate::hub::agent::SessionConfig {
        crate::hub::agent::SessionConfig {
            ping_interval: Duration::from_secs(self.agent_ping_seconds),
            pong_timeout: Duration::from_secs(self.agent_pong_timeout_seconds),
            ..crate::hub::agent::SessionConfig::default()
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapConfig {
    /// The database: `sqlite://PATH?mode=rwc` or `postgres://USER:PASSWORD@HOST/DB`.
    #[arg(long = "database", env = DATABASE_URL_ENV)]
    pub database_url: String,

    /// The name of the first organization.
    #[arg(long)]
    pub organization: Name,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("edgible-server").chain(args.iter().copied()))
    }

    #[test]
    fn serve_takes_the_documented_options() {
        let config = parse(&[
            "serve",
            "--database",
            "sqlite:///tmp/x.db?mode=rwc",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            "/tmp/ready",
            "--bootstrap",
            "platform",
            "--bootstrap-key-file",
            "/tmp/key",
        ])
        .expect("valid command line");
        let Command::Serve(serve) = config.command else { panic!("expected serve") };
        assert_eq!(serve.listen.port(), 0);
        assert_eq!(serve.bootstrap.as_ref().map(Name::as_str), Some("platform"));
    }

    #[test]
    fn bootstrap_needs_a_key_file_and_a_valid_name() {
        assert!(parse(&["serve", "--database", "sqlite://x", "--bootstrap", "platform"]).is_err());
        assert!(parse(&["bootstrap", "--database", "sqlite://x", "--organization", "Not Valid"]).is_err());
        assert!(parse(&["bootstrap", "--database", "sqlite://x", "--organization", "acme"]).is_ok());
    }
}
