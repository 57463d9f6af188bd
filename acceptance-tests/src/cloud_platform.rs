//! The platform the cloud placement test (`tests/cloud.rs`, issue 9) runs against: a namespace
//! [`Topology`] with the server, an operator organization running two cloud hosts (agents with
//! `--cloud-host`, each running applications in QEMU microVMs) in a `cloud` pool of region
//! [`REGION`] with an edge of its own, and two tenant organizations: tenant A with a pool, an
//! edge and a device of its own (so its application can move between the cloud and its own
//! hardware), tenant B with nothing but its applications.
//!
//! The two hosts declare different capacities on purpose: host1 is large, host2 fits exactly
//! one default-sized application (1 vCPU, 256 MiB). The scheduler spreads by free capacity, so
//! the first applications of both tenants land on host1, side by side, which is what the
//! isolation check needs.
//!
//! The guest kernel and its modules come from the directory [`VM_KERNEL_ENV`] names (the
//! test command fetches Debian's `linux-image-cloud-amd64` with `apt-get download` and unpacks
//! it there): `boot/vmlinuz-RELEASE` and `lib/modules/RELEASE/`.
//!
//! Everything stops when dropped (agents and edges first, then the server, then the
//! namespaces); [`CloudPlatform::keep`] keeps the logs of a failed run.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{
    ApplicationId, Device, DeviceCreated, DeviceId, DevicePool, DeviceState, Edge, EdgeCreated, Organization,
    OrganizationCreated, OrganizationSpec, UsageReport,
};
use serde_json::json;

use crate::netns::{CLIENT_ADDRESS, DEV1_ADDRESS, DEV2_ADDRESS, EDGE_ADDRESS, SERVER_ADDRESS, Topology, log_tail};
use crate::platform::{CurlOutput, EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer, curl, through_edge};
use crate::workload::field;

/// The environment variable naming the unpacked guest kernel package (see the module docs).
pub const VM_KERNEL_ENV: &str = "EDGIBLE_VM_KERNEL_DIR";
/// The region of the operator's cloud pool.
pub const REGION: &str = "eu";
/// The cloud pool's edge.
pub const CLOUD_EDGE_ADDRESS: Ipv4Addr = EDGE_ADDRESS;
/// Tenant A's own edge (of its devices pool).
pub const TENANT_EDGE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Tenant A's own device.
pub const TENANT_DEVICE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 23);
/// How long the platform may take to come up (enrollments, sessions, tunnels).
pub const PLATFORM_UP: Duration = Duration::from_secs(120);

/// One cloud host: its device name (also its namespace's role), underlay address and the
/// capacity its agent declares.
#[derive(Debug, Clone, Copy)]
pub struct HostDef {
    pub name: &'static str,
    pub address: Ipv4Addr,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// The two cloud hosts (see the module docs for why their sizes differ).
pub const HOSTS: [HostDef; 2] = [
    HostDef { name: "host1", address: DEV1_ADDRESS, vcpus: 4, memory_mib: 2048, disk_mib: 4096 },
    HostDef { name: "host2", address: DEV2_ADDRESS, vcpus: 1, memory_mib: 512, disk_mib: 1024 },
];

/// The guest kernel and modules the cloud hosts boot their microVMs with.
#[derive(Debug, Clone)]
pub struct VmKernel {
    /// `boot/vmlinuz-RELEASE`.
    pub kernel: PathBuf,
    /// `lib/modules/RELEASE`.
    pub modules: PathBuf,
    /// The kernel release (`6.1.0-56-cloud-amd64`), what `uname -r` says in a guest.
    pub release: String,
}

impl VmKernel {
    /// The kernel in the directory [`VM_KERNEL_ENV`] names, or an error saying how to get one.
    pub fn from_env() -> anyhow::Result<Self> {
        let dir = std::env::var_os(VM_KERNEL_ENV).with_context(|| {
            format!(
                "{VM_KERNEL_ENV} is not set: it names the unpacked linux-image-cloud-amd64 package \
                 (`.ci/test` fetches it with apt-get download and exports the variable)"
            )
        })?;
        Self::in_dir(Path::new(&dir))
    }

    /// The one kernel in `dir` (`boot/vmlinuz-RELEASE` with `lib/modules/RELEASE`).
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let boot = dir.join("boot");
        let mut kernels = Vec::new();
        for entry in std::fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
            let entry = entry?;
            if let Some(release) = entry.file_name().to_str().and_then(|name| name.strip_prefix("vmlinuz-")) {
                kernels.push((release.to_owned(), entry.path()));
            }
        }
        anyhow::ensure!(kernels.len() == 1, "expected exactly one vmlinuz-* in {}, found {kernels:?}", boot.display());
        let (release, kernel) = kernels.remove(0);
        let modules = dir.join("lib/modules").join(&release);
        anyhow::ensure!(modules.is_dir(), "{} is missing (the kernel's modules)", modules.display());
        Ok(Self { kernel, modules, release })
    }
}

/// An organization with a client using its admin key.
pub struct Org {
    pub organization: Organization,
    pub api_key: String,
    pub client: edgible::Client,
}

impl Org {
    /// Creates organization `name` (operator or not) with the platform key's `platform` client.
    async fn create(platform: &edgible::Client, url: &str, name: &str, operator: bool) -> anyhow::Result<Self> {
        let spec = OrganizationSpec { name: name.parse().with_context(|| format!("{name:?} as a name"))?, operator };
        let created: OrganizationCreated =
            platform.create::<Organization>(&spec).await.with_context(|| format!("creating organization {name}"))?;
        anyhow::ensure!(
            created.organization.spec.operator == operator,
            "organization {name} was created with operator={}, asked {operator}",
            created.organization.spec.operator
        );
        let api_key = created.admin_key.secret;
        let client = edgible::Client::new(url, &api_key)?;
        Ok(Self { organization: created.organization, api_key, client })
    }

    /// `GET /v1/usage?from=..&to=..` with this organization's key.
    pub async fn usage(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<UsageReport> {
        self.client.usage(from, to, None).await.context("GET /v1/usage")
    }
}

/// What `GET /whereami` of the test workload answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whereami {
    pub boot_id: String,
    pub kernel: String,
    pub addresses: Vec<Ipv4Addr>,
}

impl Whereami {
    /// Parses the workload's answer.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let boot_id = field(text, "boot_id").with_context(|| format!("no boot_id in {text:?}"))?.to_owned();
        let kernel = field(text, "kernel").with_context(|| format!("no kernel in {text:?}"))?.to_owned();
        let addresses = match field(text, "addresses").with_context(|| format!("no addresses in {text:?}"))? {
            "-" => Vec::new(),
            list => list
                .split(',')
                .map(|address| address.parse().with_context(|| format!("address {address:?} in {text:?}")))
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Self { boot_id, kernel, addresses })
    }
}

/// This machine's boot id: what a workload running on the host kernel (not in a microVM)
/// reports.
pub fn host_boot_id() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim().to_owned())
}

/// Everything one run holds. Fields drop in order: agents and edges stop before the server,
/// the server before the namespaces go, and the directory last.
pub struct CloudPlatform {
    /// host1, host2 (as in [`HOSTS`]).
    pub hosts: Vec<NsAgent>,
    /// Tenant A's own device.
    pub device: NsAgent,
    pub edge: NsEdge,
    pub tenant_edge: NsEdge,
    pub server: NsServer,
    pub operator: Org,
    pub tenant_a: Org,
    pub tenant_b: Org,
    pub cloud_pool: DevicePool,
    /// The cloud hosts' device ids (operator's), as in [`HOSTS`].
    pub host_ids: Vec<DeviceId>,
    /// Tenant A's device.
    pub tenant_device: Device,
    pub kernel: VmKernel,
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub topology: Topology,
    pub dir: tempfile::TempDir,
}

/// Prints a step of the walk.
pub fn step(text: &str) {
    eprintln!("==> {text}");
}

impl CloudPlatform {
    /// Builds the topology (namespaces `eg-<tag>-...`), starts the server, creates the
    /// organizations, pools, edges, hosts and tenant A's device, starts every edge and agent
    /// (cloud hosts with `--cloud-host`, their capacity from [`HOSTS`], and `host_args`), and
    /// waits until every device is online and both hosts show their capacity.
    pub async fn start(tag: &str, host_args: &[String]) -> anyhow::Result<Self> {
        let kernel = VmKernel::from_env()?;
        let dir = tempfile::Builder::new().prefix(&format!("edgible-{tag}-")).tempdir()?;
        step("building the namespaces: two edges, server, host1, host2, a tenant device and a client");
        let topology = Topology::build(
            tag,
            &[
                ("edge", CLOUD_EDGE_ADDRESS),
                ("tedge", TENANT_EDGE_ADDRESS),
                ("server", SERVER_ADDRESS),
                (HOSTS[0].name, HOSTS[0].address),
                (HOSTS[1].name, HOSTS[1].address),
                ("dev", TENANT_DEVICE_ADDRESS),
                ("client", CLIENT_ADDRESS),
            ],
        )?;
        // The tenant's device gets the device firewall; the cloud hosts do not: what keeps
        // guests apart and away from the host must be the agent's own rules, and a test
        // firewall dropping new inbound connections would hide their absence.
        topology.namespace("dev")?.install_device_firewall()?;
        let server = NsServer::start(topology.namespace("server")?, SERVER_ADDRESS, &dir.path().join("server"))?;
        let ca_file = dir.path().join("ca.pem");
        let ca_pem = server.save_ca(&ca_file).await?;
        let platform = server.client()?;

        step(&format!("creating the operator organization, its cloud pool in region {REGION}, edge and hosts"));
        let operator = Org::create(&platform, &server.url, "cloudops", true).await?;
        let cloud_pool: DevicePool = operator
            .client
            .create::<DevicePool>(&serde_json::from_value(json!({
                "name": "cloud-eu", "tunnel_cidr": "100.64.40.0/24", "kind": "cloud", "region": REGION,
            }))?)
            .await
            .context("creating the cloud pool")?;
        let cloud_edge: EdgeCreated = operator
            .client
            .create::<Edge>(&serde_json::from_value(json!({
                "name": "edge-eu", "pool_id": cloud_pool.id,
                "endpoint": format!("{CLOUD_EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}"),
            }))?)
            .await
            .context("creating the cloud edge")?;
        let mut host_tokens = Vec::new();
        for host in HOSTS {
            let created: DeviceCreated = operator
                .client
                .create::<Device>(&serde_json::from_value(json!({"name": host.name, "pool_id": cloud_pool.id}))?)
                .await
                .with_context(|| format!("creating cloud host {}", host.name))?;
            host_tokens.push((created.device.id, created.enrollment_token));
        }

        step("creating tenant A (with a pool, an edge and a device of its own) and tenant B");
        let tenant_a = Org::create(&platform, &server.url, "tenant-a", false).await?;
        let tenant_b = Org::create(&platform, &server.url, "tenant-b", false).await?;
        let home: DevicePool = tenant_a
            .client
            .create::<DevicePool>(&serde_json::from_value(json!({"name": "home", "tunnel_cidr": "100.64.41.0/24"}))?)
            .await
            .context("creating tenant A's pool")?;
        let tenant_edge: EdgeCreated = tenant_a
            .client
            .create::<Edge>(&serde_json::from_value(json!({
                "name": "home-edge", "pool_id": home.id,
                "endpoint": format!("{TENANT_EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}"),
            }))?)
            .await
            .context("creating tenant A's edge")?;
        let device: DeviceCreated = tenant_a
            .client
            .create::<Device>(&serde_json::from_value(json!({"name": "dev", "pool_id": home.id}))?)
            .await
            .context("creating tenant A's device")?;

        step("enrolling and starting both edges, both cloud hosts and tenant A's device");
        let mut edge = NsEdge::enroll(
            topology.namespace("edge")?,
            CLOUD_EDGE_ADDRESS,
            &server.url,
            &cloud_edge.enrollment_token,
            &dir.path().join("edge"),
        )?;
        edge.start()?;
        let mut tenant_edge = NsEdge::enroll(
            topology.namespace("tedge")?,
            TENANT_EDGE_ADDRESS,
            &server.url,
            &tenant_edge.enrollment_token,
            &dir.path().join("tedge"),
        )?;
        tenant_edge.start()?;
        let mut hosts = Vec::new();
        for (host, (_, token)) in HOSTS.iter().zip(&host_tokens) {
            let mut agent = NsAgent::enroll(
                topology.namespace(host.name)?,
                host.name,
                &server.url,
                token,
                &dir.path().join(host.name),
            )?;
            let mut args: Vec<String> = vec![
                "--cloud-host".into(),
                "--host-vcpus".into(),
                host.vcpus.to_string(),
                "--host-memory-mib".into(),
                host.memory_mib.to_string(),
                "--host-disk-mib".into(),
                host.disk_mib.to_string(),
                "--vm-kernel".into(),
                kernel.kernel.display().to_string(),
                "--vm-modules".into(),
                kernel.modules.display().to_string(),
            ];
            args.extend(host_args.iter().cloned());
            agent.start_with(&args)?;
            hosts.push(agent);
        }
        let mut tenant_agent = NsAgent::enroll(
            topology.namespace("dev")?,
            "dev",
            &server.url,
            &device.enrollment_token,
            &dir.path().join("dev"),
        )?;
        tenant_agent.start_with(host_args)?;
        let host_ids = host_tokens.iter().map(|(id, _)| *id).collect();
        let platform = Self {
            hosts,
            device: tenant_agent,
            edge,
            tenant_edge,
            server,
            operator,
            tenant_a,
            tenant_b,
            cloud_pool,
            host_ids,
            tenant_device: device.device,
            kernel,
            ca_file,
            ca_pem,
            topology,
            dir,
        };
        if let Err(error) = platform.wait_up().await {
            let diagnosis = platform.diagnose();
            let kept = platform.keep();
            return Err(error.context(format!("{diagnosis}\nlogs and database are kept in {}", kept.display())));
        }
        Ok(platform)
    }

    /// Waits until both hosts are online with the capacity they declared, and tenant A's
    /// device is online.
    async fn wait_up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        for (host, id) in HOSTS.iter().zip(&self.host_ids) {
            let client = &self.operator.client;
            let device =
                crate::wait_for(&format!("{} online as a cloud host", host.name), PLATFORM_UP, || async move {
                    let device = client.get::<Device>(id).await.ok()?;
                    (device.status.state == DeviceState::Online && device.status.cloud_host.is_some()).then_some(device)
                })
                .await?;
            let capacity = device.status.cloud_host.context("no capacity")?;
            anyhow::ensure!(
                (capacity.vcpus, capacity.memory_mib, capacity.disk_mib)
                    == (host.vcpus, host.memory_mib, host.disk_mib),
                "{} declared {capacity:?}, its agent was started with {host:?}",
                host.name
            );
        }
        let client = &self.tenant_a.client;
        let id = &self.tenant_device.id;
        let remaining = PLATFORM_UP.saturating_sub(started.elapsed());
        crate::wait_for("tenant A's device online", remaining, || async move {
            let device = client.get::<Device>(id).await.ok()?;
            (device.status.state == DeviceState::Online).then_some(())
        })
        .await?;
        eprintln!("    the platform is up after {:.1?}", started.elapsed());
        Ok(())
    }

    /// The name of the cloud host with device id `id`, if it is one.
    pub fn host_name(&self, id: &DeviceId) -> Option<&'static str> {
        self.host_ids.iter().position(|host| host == id).map(|index| HOSTS[index].name)
    }

    /// The agent of the cloud host with device id `id`.
    pub fn host_agent(&self, id: &DeviceId) -> anyhow::Result<&NsAgent> {
        let index =
            self.host_ids.iter().position(|host| host == id).with_context(|| format!("{id} is no cloud host"))?;
        Ok(&self.hosts[index])
    }

    /// `curl -sS` from the client namespace to `https://hostname{path}` through the edge at
    /// `edge`, verifying against the platform's CA, plus `extra` arguments.
    pub fn curl(&self, edge: Ipv4Addr, hostname: &str, path: &str, extra: &[&str]) -> anyhow::Result<CurlOutput> {
        let mut args: Vec<String> = through_edge(hostname, edge, &self.ca_file);
        args.extend(["--noproxy".to_owned(), "*".to_owned()]);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args.push(format!("https://{hostname}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(self.topology.namespace("client")?, &args)
    }

    /// `GET path` through `edge`, failing unless it answers 200; answers the body.
    pub fn get(&self, edge: Ipv4Addr, hostname: &str, path: &str) -> anyhow::Result<String> {
        let output = self.curl(edge, hostname, path, &["--fail-with-body", "--max-time", "30"])?;
        anyhow::ensure!(output.success, "GET https://{hostname}{path} through {edge}: {output}");
        Ok(output.stdout)
    }

    /// Waits until `GET /whereami` of `hostname` through `edge` answers 200 and `accept`s the
    /// answer; answers it. Each try is one request to the application.
    pub async fn wait_whereami(
        &self,
        edge: Ipv4Addr,
        hostname: &str,
        timeout: Duration,
        what: &str,
        accept: impl Fn(&Whereami) -> bool,
    ) -> anyhow::Result<Whereami> {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.curl(edge, hostname, "/whereami", &["--fail-with-body", "--max-time", "20"])?;
            let last = if output.success {
                let here = Whereami::parse(&output.stdout)?;
                if accept(&here) {
                    return Ok(here);
                }
                format!("{here:?}")
            } else {
                output.to_string()
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "{hostname} through {edge}: not {what} after {timeout:?}; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The QEMU processes running in cloud host `id`'s namespace.
    pub fn qemu_pids(&self, id: &DeviceId) -> anyhow::Result<Vec<i32>> {
        let name = self.host_name(id).with_context(|| format!("{id} is no cloud host"))?;
        Ok(self
            .topology
            .namespace(name)?
            .pids()
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with("qemu"))
            })
            .collect())
    }

    /// The QEMU processes of application `application` in cloud host `id`'s namespace: those
    /// whose command line names the application's id (the VM driver keeps each microVM's
    /// files in a directory named by it).
    pub fn qemu_pids_of(&self, id: &DeviceId, application: &ApplicationId) -> anyhow::Result<Vec<i32>> {
        let needle = application.to_string();
        Ok(self
            .qemu_pids(id)?
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
            })
            .collect())
    }

    /// The logs' ends, for a failure message.
    pub fn diagnose(&self) -> String {
        let mut text = format!(
            "--- server log\n{}\n--- cloud edge log\n{}\n--- tenant edge log\n{}\n--- tenant device log\n{}\n",
            log_tail(&self.server.dir.join("server.log"), 8 << 10),
            log_tail(&self.edge.dir.join("edge.log"), 3 << 10),
            log_tail(&self.tenant_edge.dir.join("edge.log"), 2 << 10),
            log_tail(&self.device.home.log_file(), 3 << 10),
        );
        for host in &self.hosts {
            text.push_str(&format!("--- {} log\n{}\n", host.name, log_tail(&host.home.log_file(), 8 << 10)));
        }
        text
    }

    /// Tears everything down but keeps the directory (logs, database), answering its path.
    pub fn keep(self) -> PathBuf {
        let Self { hosts, device, edge, tenant_edge, server, topology, dir, .. } = self;
        drop((hosts, device, edge, tenant_edge, server, topology));
        dir.keep()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whereami_answers_are_parsed() -> anyhow::Result<()> {
        let here = Whereami::parse("boot_id=b1\nkernel=6.1.0-56-cloud-amd64\naddresses=198.51.100.2,198.51.100.6\n")?;
        assert_eq!(here.boot_id, "b1");
        assert_eq!(here.kernel, "6.1.0-56-cloud-amd64");
        assert_eq!(here.addresses, [Ipv4Addr::new(198, 51, 100, 2), Ipv4Addr::new(198, 51, 100, 6)]);
        assert!(Whereami::parse("boot_id=b1\nkernel=k\naddresses=-\n")?.addresses.is_empty());
        assert!(Whereami::parse("boot_id=b1\nkernel=k\naddresses=nope\n").is_err());
        assert!(Whereami::parse("kernel=k\n").is_err());
        Ok(())
    }

    #[test]
    fn the_kernel_directory_holds_one_kernel_and_its_modules() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(VmKernel::in_dir(dir.path()).is_err(), "no boot directory");
        std::fs::create_dir_all(dir.path().join("boot"))?;
        std::fs::write(dir.path().join("boot/vmlinuz-6.1.0-56-cloud-amd64"), b"kernel")?;
        std::fs::write(dir.path().join("boot/config-6.1.0-56-cloud-amd64"), b"config")?;
        let error = VmKernel::in_dir(dir.path()).expect_err("no modules");
        assert!(error.to_string().contains("lib/modules/6.1.0-56-cloud-amd64"), "{error}");
        std::fs::create_dir_all(dir.path().join("lib/modules/6.1.0-56-cloud-amd64"))?;
        let kernel = VmKernel::in_dir(dir.path())?;
        assert_eq!(kernel.release, "6.1.0-56-cloud-amd64");
        assert_eq!(kernel.kernel, dir.path().join("boot/vmlinuz-6.1.0-56-cloud-amd64"));
        std::fs::write(dir.path().join("boot/vmlinuz-6.2"), b"another")?;
        assert!(VmKernel::in_dir(dir.path()).is_err(), "two kernels");
        Ok(())
    }

    #[test]
    fn the_hosts_are_sized_so_that_two_default_applications_share_host1() {
        // The scheduler spreads by free capacity: after one default application (1 vCPU,
        // 256 MiB) host1 must still have more of everything free than host2 has in total.
        let (large, small) = (HOSTS[0], HOSTS[1]);
        assert!(large.vcpus - 1 > small.vcpus && large.memory_mib - 256 > small.memory_mib);
        assert!(large.disk_mib > small.disk_mib);
    }
}
