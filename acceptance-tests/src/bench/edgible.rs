//! The Edgible stack of the benchmark, the way a user runs it: a server, one pool, an enrolled
//! edge and an enrolled device, and one application deployed with `edgible stack deploy`
//! whose workload (the `e2e_workload` binary, run by the agent on `127.0.0.1:PORT` in the
//! device namespace) is also the anchor's origin.
//!
//! The edge and the agent are started here rather than with `platform`'s test settings: logs
//! at `info` (debug logging costs per connection), the agent's default timing, and the edge's
//! per-client cap raised to its global cap, because the benchmark's one client opens
//! thousands of idle connections (HAProxy gets the same room through its `maxconn`). The
//! device firewall is not loaded: it is no part of either proxy path, and the anchor's tunnel
//! interface would need a rule of its own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use edgible::model::{DevicePool, Edge, EdgeSpec};

use super::load::interface_addresses;
use crate::netns::{Namespace, Topology};
use crate::platform::{EDGE_ADMIN_PORT, EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer};
use crate::{Cli, bin_path};

/// The pool's tunnel network.
pub const POOL_CIDR: &str = "100.64.20.0/24";
/// The tunnel interfaces of the edge and of the agent.
pub const EDGE_INTERFACE: &str = "edgible-edge0";
pub const AGENT_INTERFACE: &str = "edgible0";

/// The application's stack file: one application on `device`, running `workload` on `port`.
pub fn stack_file(server_name: &str, workload: &Path, port: u16, device: &str) -> String {
    format!(
        "\
applications:
  - name: bench
    hostnames:
      - {server_name}
    port: {port}
    env:
      NAME: bench
    workload:
      process:
        command: {workload}
    health_check:
      protocol: http
      path: /health
      interval_seconds: 2
      timeout_seconds: 1
    placement:
      strategy: serving-device
      device: {device}
",
        workload = workload.display()
    )
}

/// The running platform. Fields drop in order: agent, edge, then the server.
pub struct EdgiblePlatform {
    pub agent: NsAgent,
    pub edge: NsEdge,
    pub server: NsServer,
    /// The server's internal CA (PEM) and its file.
    pub ca_pem: String,
    pub ca_file: PathBuf,
}

/// What [`EdgiblePlatform::start`] needs.
pub struct EdgibleConfig<'a> {
    pub topology: &'a Topology,
    pub edge_address: Ipv4Addr,
    pub server_address: Ipv4Addr,
    pub server_name: &'a str,
    pub origin_port: u16,
    /// The edge's connection cap, global and per client address.
    pub max_connections: u32,
    pub dir: &'a Path,
}

impl EdgiblePlatform {
    /// Starts the server, creates pool, device and edge, starts edge and agent, and deploys the
    /// application (the CLI waits until it runs).
    pub async fn start(config: &EdgibleConfig<'_>) -> anyhow::Result<Self> {
        let dir = config.dir;
        let topology = config.topology;
        let server = NsServer::start(topology.namespace("server")?, config.server_address, &dir.join("server"))?;
        let ca_file = dir.join("edgible-ca.pem");
        let ca_pem = server.save_ca(&ca_file).await?;

        let cli = Cli::new(&dir.join("cli"))?;
        cli.ok(&["login", "--server", &server.url, "--key", &server.admin_key])?;
        cli.ok(&["pool", "create", "bench", "--cidr", POOL_CIDR])?;
        let device = cli.json(&["device", "create", "dev1", "--pool", "bench"])?;
        let device_token =
            device["enrollment_token"].as_str().context("`device create` printed no enrollment token")?;
        let client = server.client()?;
        let pool = client.find_by_name::<DevicePool>("bench").await?.context("pool bench was not created")?;
        let spec = EdgeSpec {
            name: "edge1".parse()?,
            pool_id: pool.id,
            endpoint: format!("{}:{EDGE_WIREGUARD_PORT}", config.edge_address).parse()?,
        };
        let created = client.create::<Edge>(&spec).await.context("creating the edge")?;

        let edge_namespace = topology.namespace("edge")?;
        let mut edge = NsEdge::enroll(
            edge_namespace,
            config.edge_address,
            &server.url,
            &created.enrollment_token,
            &dir.join("edge"),
        )?;
        edge.process = Some(start_edge(edge_namespace, &edge.dir, config)?);
        let device_namespace = topology.namespace("dev1")?;
        let mut agent = NsAgent::enroll(device_namespace, "dev1", &server.url, device_token, &dir.join("dev1"))?;
        agent.process = Some(start_agent(device_namespace, &agent)?);
        let platform = Self { agent, edge, server, ca_pem, ca_file };

        let stack = dir.join("bench.yaml");
        std::fs::write(&stack, stack_file(config.server_name, &bin_path("e2e_workload")?, config.origin_port, "dev1"))?;
        let deployed = cli.run(&["stack", "deploy", "--timeout", "3m", &stack.display().to_string()])?;
        anyhow::ensure!(
            deployed.status.success(),
            "`edgible stack deploy` failed:\n{}{}\n--- edge log\n{}\n--- agent log\n{}",
            deployed.stdout,
            deployed.stderr,
            platform.edge.log_tail(),
            platform.agent.log_tail()
        );
        Ok(platform)
    }

    /// The edge process.
    pub fn edge_pid(&self) -> anyhow::Result<u32> {
        self.edge.process.as_ref().map(|process| process.pid()).context("the edge is not running")
    }

    /// The agent process.
    pub fn agent_pid(&self) -> anyhow::Result<u32> {
        self.agent.process.as_ref().map(|process| process.pid()).context("the agent is not running")
    }

    /// Whether edge and agent still run; an error with the log of the one that does not.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for process in [self.edge.process.as_mut(), self.agent.process.as_mut()] {
            process.context("not started")?.check_running()?;
        }
        Ok(())
    }

    /// The tunnel address of the device (its agent's interface).
    pub fn device_tunnel_address(&self, topology: &Topology) -> anyhow::Result<Ipv4Addr> {
        let addresses = interface_addresses(topology.namespace("dev1")?, AGENT_INTERFACE)?;
        addresses.first().copied().with_context(|| format!("{AGENT_INTERFACE} in dev1 has no IPv4 address"))
    }
}

/// `edgible-edge run` with the benchmark's settings (see the module documentation).
fn start_edge(
    namespace: &Namespace,
    dir: &Path,
    config: &EdgibleConfig<'_>,
) -> anyhow::Result<crate::netns::NsProcess> {
    let cap = config.max_connections.to_string();
    let mut command = namespace.nsenter(&bin_path("edgible-edge")?);
    command
        .args(["run", "--state-dir"])
        .arg(dir.join("state"))
        .args(["--https-listen", "0.0.0.0:443", "--http-listen", "0.0.0.0:80", "--admin-listen"])
        .arg(format!("{}:{EDGE_ADMIN_PORT}", config.edge_address))
        .args(["--wireguard-port", &EDGE_WIREGUARD_PORT.to_string(), "--tunnel-interface", EDGE_INTERFACE])
        .args(["--max-connections", &cap, "--max-connections-per-ip", &cap])
        .env("RUST_LOG", "info");
    Ok(namespace.spawn("edgible-edge", command, &dir.join("edge.log"))?)
}

/// `edgible-agent run` with default timing, no container engine, `edgible0` and port 443.
fn start_agent(namespace: &Namespace, agent: &NsAgent) -> anyhow::Result<crate::netns::NsProcess> {
    let mut command = namespace.nsenter(&bin_path("edgible-agent")?);
    command
        .args(["run", "--state-dir"])
        .arg(agent.home.state_dir())
        .args(["--no-containers", "--tunnel-interface", AGENT_INTERFACE, "--proxy-port", "443"])
        .env("RUST_LOG", "info");
    Ok(namespace.spawn("edgible-agent (dev1)", command, &agent.home.log_file())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_file_places_one_application_running_the_workload() -> anyhow::Result<()> {
        let text = stack_file("bench.example.test", Path::new("/opt/e2e_workload"), 18_090, "dev1");
        let stack = edgible::stack::Stack::parse(&text)?;
        let [application] = stack.applications.as_slice() else { anyhow::bail!("not one application: {stack:?}") };
        let spec = &application.spec;
        assert_eq!(spec.hostnames.iter().map(ToString::to_string).collect::<Vec<_>>(), ["bench.example.test"]);
        assert_eq!(spec.port, 18_090);
        let json = serde_json::to_value(spec)?;
        assert_eq!(json["workload"]["process"]["command"], "/opt/e2e_workload", "{json}");
        assert_eq!(json["env"]["NAME"], "bench", "{json}");
        assert_eq!(
            application.placement,
            Some(edgible::stack::StackPlacement::ServingDevice { device: "dev1".parse()? })
        );
        Ok(())
    }
}
