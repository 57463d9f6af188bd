//! The command line of `edgible-edge`, the one typed configuration of the binary. Every option
//! that has an environment variable names it in a constant here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::limits::LimitsConfig;
use crate::server::EdgeConfig;
use crate::splice::SpliceConfig;

/// Where the TLS listen address may also come from.
pub const LISTEN_HTTPS_ENV: &str = "EDGIBLE_EDGE_LISTEN_HTTPS";
/// Where the HTTP listen address may also come from.
pub const LISTEN_HTTP_ENV: &str = "EDGIBLE_EDGE_LISTEN_HTTP";
/// Where the admin listen address may also come from.
pub const ADMIN_ENV: &str = "EDGIBLE_EDGE_ADMIN";
/// Where the routes file may also come from.
pub const ROUTES_ENV: &str = "EDGIBLE_EDGE_ROUTES";
/// Where the log format may also come from.
pub const LOG_FORMAT_ENV: &str = "EDGIBLE_LOG_FORMAT";

#[derive(Debug, Parser)]
#[command(
    name = "edgible-edge",
    version,
    about = "The Edgible edge: routes TLS connections by SNI, without decrypting them"
)]
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
    /// Serve the TLS, HTTP and admin ports until SIGTERM or SIGINT.
    Run(RunConfig),
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// The TLS port: connections are routed by the server name of their ClientHello.
    #[arg(long, env = LISTEN_HTTPS_ENV, default_value = "0.0.0.0:443")]
    pub listen_https: SocketAddr,

    /// The HTTP port: ACME HTTP-01 challenges, and redirects to https for everything else.
    #[arg(long, env = LISTEN_HTTP_ENV, default_value = "0.0.0.0:80")]
    pub listen_http: SocketAddr,

    /// The admin port: `/metrics` (Prometheus) and `/healthz`. Keep it off public networks.
    #[arg(long, env = ADMIN_ENV, default_value = "127.0.0.1:9180")]
    pub admin: SocketAddr,

    /// A static routes file (YAML or JSON; see the `route_file` module documentation),
    /// loaded at start and reloaded on SIGHUP. Without it the edge starts with no routes.
    #[arg(long, env = ROUTES_ENV)]
    pub routes: Option<PathBuf>,

    /// Once listening, write the bound addresses as JSON (`{"https": "IP:PORT", "http": ...,
    /// "admin": ...}`) to this file; useful with port 0.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,

    /// The port of the devices' TLS proxies on their tunnel addresses.
    #[arg(long, default_value_t = 443)]
    pub target_port: u16,

    /// Milliseconds a client has, from accept, to send its whole ClientHello.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub hello_timeout_ms: u64,

    /// Milliseconds to connect to a device before refusing the client with `internal_error`.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,

    /// Seconds a spliced connection may stay without a byte moving either way.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_seconds: u64,

    /// Connections open at once on the TLS port, across all clients.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Connections open at once on the TLS port from one IPv4 address or one IPv6 /64.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// Seconds to let open connections finish after SIGTERM or SIGINT before exiting anyway.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
}

impl RunConfig {
    pub fn edge_config(&self) -> EdgeConfig {
        EdgeConfig {
            listen_https: self.listen_https,
            listen_http: self.listen_http,
            admin: self.admin,
            splice: SpliceConfig {
                hello_timeout: Duration::from_millis(self.hello_timeout_ms),
                connect_timeout: Duration::from_millis(self.connect_timeout_ms),
                idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
                target_port: self.target_port,
            },
            limits: LimitsConfig {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
            },
            drain_timeout: Duration::from_secs(self.drain_seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("edgible-edge").chain(args.iter().copied()))
    }

    #[test]
    fn run_takes_the_documented_options() {
        let config = parse(&[
            "run",
            "--listen-https",
            "127.0.0.1:0",
            "--listen-http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--routes",
            "/etc/edgible/routes.yaml",
            "--hello-timeout-ms",
            "250",
            "--max-connections-per-ip",
            "3",
        ])
        .expect("valid command line");
        let Command::Run(run) = config.command;
        let edge = run.edge_config();
        assert_eq!(edge.listen_https.port(), 0);
        assert_eq!(edge.splice.hello_timeout, Duration::from_millis(250));
        assert_eq!(edge.splice.target_port, 443);
        assert_eq!(edge.limits.max_connections_per_ip, 3);
        assert_eq!(run.routes.as_deref(), Some(std::path::Path::new("/etc/edgible/routes.yaml")));
    }

    #[test]
    fn zero_timeouts_and_caps_are_refused() {
        assert!(parse(&["run", "--hello-timeout-ms", "0"]).is_err());
        assert!(parse(&["run", "--max-connections", "0"]).is_err());
        assert!(parse(&["run", "--listen-https", "not-an-address"]).is_err());
    }
}
