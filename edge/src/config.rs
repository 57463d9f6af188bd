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
/// Where the state directory may also come from.
pub const STATE_DIR_ENV: &str = "EDGIBLE_EDGE_STATE_DIR";
/// Where the server URL of `enroll` may also come from.
pub const SERVER_ENV: &str = "EDGIBLE_SERVER";
/// Where the enrollment token of `enroll` may also come from.
pub const TOKEN_ENV: &str = "EDGIBLE_EDGE_TOKEN";
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
    /// Enroll this edge with the server: generate its WireGuard key, trade the one-time token
    /// (from `edgible edge create`) for a credential, and store both in the state directory.
    Enroll(EnrollConfig),
    /// Serve the TLS, HTTP and admin ports until SIGTERM or SIGINT.
    Run(RunConfig),
}

#[derive(Debug, Clone, clap::Args)]
pub struct EnrollConfig {
    /// The server's base URL, `http(s)://HOST[:PORT]`.
    #[arg(long, env = SERVER_ENV)]
    pub server: String,

    /// The one-time enrollment token.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub token: String,

    /// Where the identity, the credential and the WireGuard key are stored (created 0700).
    #[arg(long, env = STATE_DIR_ENV)]
    pub state_dir: PathBuf,

    /// Replace an existing enrollment in the state directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// The TLS port: connections are routed by the server name of their ClientHello.
    #[arg(long, visible_alias = "https-listen", env = LISTEN_HTTPS_ENV, default_value = "0.0.0.0:443")]
    pub listen_https: SocketAddr,

    /// The HTTP port: ACME HTTP-01 challenges, and redirects to https for everything else.
    #[arg(long, visible_alias = "http-listen", env = LISTEN_HTTP_ENV, default_value = "0.0.0.0:80")]
    pub listen_http: SocketAddr,

    /// The admin port: `/metrics` (Prometheus) and `/healthz`. Keep it off public networks.
    #[arg(long, visible_alias = "admin-listen", env = ADMIN_ENV, default_value = "127.0.0.1:9180")]
    pub admin: SocketAddr,

    /// A static routes file (YAML or JSON; see the `route_file` module documentation),
    /// loaded at start and reloaded on SIGHUP. Without it (and without `--state-dir`) the
    /// edge starts with no routes.
    #[arg(long, env = ROUTES_ENV, conflicts_with = "state_dir")]
    pub routes: Option<PathBuf>,

    /// The state directory of an enrolled edge (`edgible-edge enroll`): the edge connects to
    /// the server's hub, runs the WireGuard tunnel and takes its routes from the server.
    #[arg(long, env = STATE_DIR_ENV)]
    pub state_dir: Option<PathBuf>,

    /// The UDP port of the WireGuard tunnel (with `--state-dir`); devices send to the
    /// endpoint the edge was created with, so the two must agree.
    #[arg(long, default_value_t = 51820, value_parser = clap::value_parser!(u16).range(1..))]
    pub wireguard_port: u16,

    /// The name of the tunnel interface (with `--state-dir`), at most 15 characters.
    #[arg(long, default_value = "edgible-edge0")]
    pub tunnel_interface: String,

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
        let Command::Run(run) = config.command else { panic!("not run") };
        let edge = run.edge_config();
        assert_eq!(edge.listen_https.port(), 0);
        assert_eq!(edge.splice.hello_timeout, Duration::from_millis(250));
        assert_eq!(edge.splice.target_port, 443);
        assert_eq!(edge.limits.max_connections_per_ip, 3);
        assert_eq!(run.routes.as_deref(), Some(std::path::Path::new("/etc/edgible/routes.yaml")));
    }

    #[test]
    fn run_from_a_state_directory_takes_the_tunnel_options() {
        let config = parse(&[
            "run",
            "--state-dir",
            "/var/lib/edgible-edge",
            "--https-listen",
            "127.0.0.1:8443",
            "--admin-listen",
            "127.0.0.1:0",
            "--wireguard-port",
            "51821",
        ])
        .expect("valid command line");
        let Command::Run(run) = config.command else { panic!("not run") };
        assert_eq!(run.state_dir.as_deref(), Some(std::path::Path::new("/var/lib/edgible-edge")));
        assert_eq!(run.listen_https.port(), 8443);
        assert_eq!(run.wireguard_port, 51821);
        assert_eq!(run.tunnel_interface, "edgible-edge0");

        let defaults = parse(&["run", "--state-dir", "/s"]).expect("valid");
        let Command::Run(run) = defaults.command else { panic!("not run") };
        assert_eq!(run.wireguard_port, 51820);
        // The routes file and the hub are two sources of the same table: one at a time.
        assert!(parse(&["run", "--state-dir", "/s", "--routes", "/r.yaml"]).is_err());
        assert!(parse(&["run", "--wireguard-port", "0"]).is_err());
    }

    #[test]
    fn enroll_takes_server_token_and_state_directory() {
        let config = parse(&["enroll", "--server", "http://127.0.0.1:7070", "--token", "t", "--state-dir", "/s"])
            .expect("valid command line");
        let Command::Enroll(enroll) = config.command else { panic!("not enroll") };
        assert_eq!(enroll.server, "http://127.0.0.1:7070");
        assert_eq!(enroll.token, "t");
        assert!(!enroll.force);
        assert!(parse(&["enroll", "--server", "http://x", "--state-dir", "/s"]).is_err());
    }

    #[test]
    fn zero_timeouts_and_caps_are_refused() {
        assert!(parse(&["run", "--hello-timeout-ms", "0"]).is_err());
        assert!(parse(&["run", "--max-connections", "0"]).is_err());
        assert!(parse(&["run", "--listen-https", "not-an-address"]).is_err());
    }
}
