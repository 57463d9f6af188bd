//! The command line of `edgible-agent`, the one typed configuration of the binary. Every option
//! that has an environment variable names it in a constant here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use edgible::tunnel::PrivateKey;

use crate::backoff::BackoffPolicy;
use crate::control::ControlConfig;
use crate::datapath::DataPathConfig;
use crate::driver::{ContainerDriverConfig, ProcessDriverConfig, VmDriverConfig};
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

    /// Seconds between two usage records of each application (requests, bytes, awake time,
    /// wakes), which are kept on disk until the server acknowledges them.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub usage_interval_seconds: u64,

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

    /// Run as a cloud host of an operator's `cloud` pool: every application (process or
    /// container spec) runs in its own microVM, and the agent declares the capacity below to the
    /// server.
    #[arg(long, requires_all = ["host_vcpus", "host_memory_mib", "host_disk_mib", "vm_kernel", "vm_modules"])]
    pub cloud_host: bool,

    /// The vCPUs this cloud host offers to applications.
    #[arg(long, requires = "cloud_host", value_parser = clap::value_parser!(u32).range(1..))]
    pub host_vcpus: Option<u32>,

    /// The memory, in MiB, this cloud host offers to applications.
    #[arg(long, requires = "cloud_host", value_parser = clap::value_parser!(u64).range(1..))]
    pub host_memory_mib: Option<u64>,

    /// The disk, in MiB, this cloud host offers to applications' volumes.
    #[arg(long, requires = "cloud_host")]
    pub host_disk_mib: Option<u64>,

    /// The guest kernel of microVMs (a `vmlinuz` with virtio drivers as modules).
    #[arg(long, requires = "cloud_host")]
    pub vm_kernel: Option<PathBuf>,

    /// A directory holding that kernel's modules (searched recursively for the virtio ones).
    #[arg(long, requires = "cloud_host")]
    pub vm_modules: Option<PathBuf>,

    /// The network the microVMs' links (a /30 each) come from.
    #[arg(long, default_value = "198.51.100.0/24")]
    pub vm_network: ipnet::Ipv4Net,
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

    /// What this agent declares as a cloud host, with `--cloud-host`.
    pub fn cloud_host_capacity(&self) -> Option<edgible::model::HostCapacity> {
        if !self.cloud_host {
            return None;
        }
        Some(edgible::model::HostCapacity {
            vcpus: self.host_vcpus?,
            memory_mib: self.host_memory_mib?,
            disk_mib: self.host_disk_mib?,
        })
    }

    /// The microVM driver's setup, with `--cloud-host`: its files live in the state directory.
    pub fn vm_config(&self) -> Option<VmDriverConfig> {
        if !self.cloud_host {
            return None;
        }
        let mut config =
            VmDriverConfig::new(self.state_dir.join("vm"), self.vm_kernel.clone()?, self.vm_modules.clone()?);
        config.network = self.vm_network;
        config.stop_grace = self.stop_grace();
        config.container_socket = self.container_socket.clone();
        Some(config)
    }

    /// Where applications' volumes live (`<state_dir>/volumes`, see [`crate::volumes`]).
    pub fn volumes_dir(&self) -> PathBuf {
        self.state_dir.join(crate::volumes::VOLUMES_DIR)
    }

    pub fn container_config(&self) -> ContainerDriverConfig {
        ContainerDriverConfig {
            socket: self.container_socket.clone(),
            stop_grace: self.stop_grace(),
            volumes_dir: Some(self.volumes_dir()),
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
    fn cloud_host_flags_come_together() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else { panic!("expected run") };
        assert_eq!((run.cloud_host_capacity(), run.vm_config().is_none()), (None, true));
        let flags = [
            "run",
            "--state-dir",
            "/tmp/a",
            "--cloud-host",
            "--host-vcpus",
            "4",
            "--host-memory-mib",
            "8192",
            "--host-disk-mib",
            "10240",
            "--vm-kernel",
            "/k/vmlinuz",
            "--vm-modules",
            "/k/modules",
            "--vm-network",
            "203.0.113.0/25",
        ];
        let Command::Run(run) = parse(&flags).unwrap().command else { panic!("expected run") };
        assert_eq!(
            run.cloud_host_capacity(),
            Some(edgible::model::HostCapacity { vcpus: 4, memory_mib: 8192, disk_mib: 10240 })
        );
        let vm = run.vm_config().expect("a VM driver");
        assert_eq!((vm.dir, vm.network.to_string()), (PathBuf::from("/tmp/a/vm"), "203.0.113.0/25".to_owned()));
        assert!(parse(&flags[..flags.len() - 4]).is_err(), "--vm-kernel and --vm-modules are required");
        assert!(parse(&["run", "--host-vcpus", "2"]).is_err(), "capacity needs --cloud-host");
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
