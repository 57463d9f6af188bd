//! The command line of `edgible-agent`, the one typed configuration of the binary. Every option
//! that has an environment variable names it in a constant here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use edgible::tunnel::PrivateKey;

use crate::backoff::BackoffPolicy;
use crate::control::ControlConfig;
use crate::datapath::DataPathConfig;
use crate::driver::{ContainerDriverConfig, ProcessDriverConfig};
use crate::reconcile::ReconcilerConfig;

/// Where the state directory may also come from.
pub const STATE_DIR_ENV: &str = "EDGIBLE_AGENT_STATE_DIR";
/// Where `enroll` may take the server URL from.
pub const SERVER_ENV: &str = "EDGIBLE_SERVER";
/// Where `enroll` may take the token from, which keeps it out of the process list.
pub const TOKEN_ENV: &str = "EDGIBLE_ENROLLMENT_TOKEN";
/// Where the container engine's socket may also come from.
pub const CONTAINER_SOCKET_ENV: &str = "EDGIBLE_CONTAINER_SOCKET";
/// Where the log format may also come from.
pub const LOG_FORMAT_ENV: &str = "EDGIBLE_LOG_FORMAT";

/// Where the tunnel interface's name may also come from.
pub const TUNNEL_INTERFACE_ENV: &str = "EDGIBLE_TUNNEL_INTERFACE";
/// Where the proxy's port may also come from.
pub const PROXY_PORT_ENV: &str = "EDGIBLE_PROXY_PORT";
/// The tunnel interface's name unless told otherwise.
pub const DEFAULT_TUNNEL_INTERFACE: &str = "edgible0";

/// The state directory of a system-wide agent (the systemd unit's).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/edgible-agent";

#[derive(Debug, Parser)]
#[command(name = "edgible-agent", version, about = "The Edgible device agent: runs what the server places here")]
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
    /// Enroll this device: generate its WireGuard key pair and trade the one-time enrollment
    /// token (from `edgible device create`) for the device's credential.
    Enroll(EnrollConfig),
    /// Run the agent until SIGTERM or SIGINT: keep the device's workloads as the server says,
    /// and report on them.
    Run(RunConfig),
}

#[derive(Debug, Clone, clap::Args)]
pub struct EnrollConfig {
    /// The server's base URL, `https://edgible.example.com`.
    #[arg(long, env = SERVER_ENV)]
    pub server: String,

    /// The device's one-time enrollment token.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub token: String,

    /// The agent's state directory (created mode 0700).
    #[arg(long, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Replace an enrollment the state directory already holds.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// The agent's state directory, as enrolled.
    #[arg(long, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// The Docker Engine (or Podman) API socket for container workloads.
    #[arg(long, env = CONTAINER_SOCKET_ENV, default_value = "/var/run/docker.sock")]
    pub container_socket: PathBuf,

    /// Run no container workloads, even if an engine answers.
    #[arg(long)]
    pub no_containers: bool,

    /// Seconds a workload may take to exit after SIGTERM before it is killed.
    #[arg(long, default_value_t = 10)]
    pub stop_grace_seconds: u64,

    /// Stop every workload when the agent exits. By default they keep running and the next
    /// agent adopts them, so that restarting or upgrading the agent does not interrupt them.
    #[arg(long)]
    pub stop_workloads_on_exit: bool,

    /// The longest wait, in seconds, between two attempts to reach the server.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_max_seconds: u64,

    /// Seconds between two reconciliations when nothing asks for one sooner.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub requeue_seconds: u64,

    /// Seconds to finish the push session and the reconciler after SIGTERM or SIGINT.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,

    /// The WireGuard interface the agent creates for its pool's tunnel (needs root or
    /// CAP_NET_ADMIN), at most 15 characters.
    #[arg(long, env = TUNNEL_INTERFACE_ENV, default_value = DEFAULT_TUNNEL_INTERFACE)]
    pub tunnel_interface: String,

    /// The port of the device proxy on the tunnel address, which the edges connect to.
    #[arg(long, env = PROXY_PORT_ENV, default_value_t = 443, value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,
}

impl RunConfig {
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_seconds)
    }

    pub fn control_config(&self) -> ControlConfig {
        let defaults = ControlConfig::default();
        let max = Duration::from_secs(self.reconnect_max_seconds);
        ControlConfig {
            reconnect: BackoffPolicy {
                initial: defaults.reconnect.initial.min(max),
                max,
                reset_after: defaults.reconnect.reset_after,
            },
            ..defaults
        }
    }

    pub fn reconciler_config(&self) -> ReconcilerConfig {
        ReconcilerConfig { requeue_interval: Duration::from_secs(self.requeue_seconds), ..ReconcilerConfig::default() }
    }

    /// The process driver keeps its output files in the state directory.
    pub fn process_config(&self) -> ProcessDriverConfig {
        let mut config = ProcessDriverConfig::new(self.state_dir.join("logs"));
        config.stop_grace = self.stop_grace();
        config
    }

    /// The data path's setup with the device's enrolled key.
    pub fn data_path_config(&self, private_key: PrivateKey) -> DataPathConfig {
        DataPathConfig::new(self.tunnel_interface.clone(), self.proxy_port, private_key)
    }

    pub fn container_config(&self) -> ContainerDriverConfig {
        ContainerDriverConfig {
            socket: self.container_socket.clone(),
            stop_grace: self.stop_grace(),
            ..ContainerDriverConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("edgible-agent").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }

    #[test]
    fn enroll_takes_server_token_and_state_dir() {
        let config =
            parse(&["enroll", "--server", "http://127.0.0.1:1", "--token", "t", "--state-dir", "/tmp/agent"]).unwrap();
        let Command::Enroll(enroll) = config.command else { panic!("expected enroll") };
        assert_eq!(enroll.server, "http://127.0.0.1:1");
        assert_eq!(enroll.state_dir, PathBuf::from("/tmp/agent"));
        assert!(!enroll.force);
        assert!(parse(&["enroll", "--token", "t", "--server"]).is_err());
    }

    #[test]
    fn run_derives_the_library_configurations() {
        let config =
            parse(&["run", "--state-dir", "/tmp/a", "--reconnect-max-seconds", "5", "--stop-grace-seconds", "2"])
                .unwrap();
        let Command::Run(run) = config.command else { panic!("expected run") };
        assert_eq!(run.process_config().log_dir, PathBuf::from("/tmp/a/logs"));
        assert_eq!(run.process_config().stop_grace, Duration::from_secs(2));
        assert_eq!(run.control_config().reconnect.max, Duration::from_secs(5));
        assert!(!run.stop_workloads_on_exit);
        assert!(parse(&["run", "--reconnect-max-seconds", "0"]).is_err());
    }

    #[test]
    fn run_has_the_data_path_flags_with_their_defaults() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else { panic!("expected run") };
        assert_eq!((run.tunnel_interface.as_str(), run.proxy_port), ("edgible0", 443));
        let Command::Run(run) =
            parse(&["run", "--tunnel-interface", "wg-dev", "--proxy-port", "8443"]).unwrap().command
        else {
            panic!("expected run")
        };
        assert_eq!((run.tunnel_interface.as_str(), run.proxy_port), ("wg-dev", 8443));
        assert!(parse(&["run", "--proxy-port", "0"]).is_err());
    }
}
