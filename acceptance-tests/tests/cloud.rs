//! Cloud placement end to end (issue 9), with every part real: the server, an operator's two
//! cloud hosts running each application in its own QEMU microVM (TCG here), the cloud pool's
//! edge, a tenant's own device and edge, WireGuard tunnels, namespaces on a bridge, the real
//! `terraform`, and `curl` in a client namespace (see `edgible_acceptance_tests::cloud_platform`).
//!
//! One test walks the scenario in order, printing what each step checks:
//! 1. `terraform apply` of tenant A's application with a `cloud` placement in region `eu`: the
//!    `host` in the Terraform state is the host the API reports, the tenant cannot read that
//!    device, and the application is served through the cloud edge from a microVM on that host
//!    (its `/whereami` shows the guest kernel and a boot id that is not this machine's, and a
//!    QEMU process runs in that host's namespace);
//! 2. the placement switched to `serving-device` on the tenant's own device in Terraform: served
//!    through the tenant's edge by a process on the device (this machine's kernel, a pid in the
//!    device's namespace), and the microVM is gone; then back to `cloud`: a new microVM serves;
//! 3. tenant B's application lands on the same host and listens on the same port as A: each
//!    hostname is served by its own guest (the agent reaches every guest at its own address);
//!    from inside B's guest (the workload's `/connect`) neither A's guest, nor the server, nor
//!    the host's tunnel address can be reached, while the same connections from the host's namespace (or the edge's) do open,
//!    and B's guest connects to its own address: so each refusal is the host's firewall
//!    between guests, not a broken check;
//! 4. sleep after idle, mode `stop` then `suspend`: the application goes `sleeping` (in `stop`
//!    its QEMU is gone), the first request wakes it and succeeds, printing the wake latency; a
//!    `stop` wake boots a new guest (new boot id), a `suspend` wake resumes the same one; after
//!    the wakes each hostname is still served by its own tenant's guest;
//! 5. `GET /v1/usage` for tenant B grows by exactly the number of requests the test sent, and
//!    the bytes by the bodies sent and received plus at most a bounded protocol overhead; tenant
//!    A's usage shows exactly the two wakes.
//!
//! Needs root, `ip`, `nft`, `nsenter`, `curl`, `bash`, `terraform`, `qemu-system-x86_64` and the
//! guest kernel (`EDGIBLE_VM_KERNEL_DIR`, which `.ci/test` sets); runs with `EDGIBLE_ACC=1`
//! after `cargo build --workspace --bins`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{
    Application, ApplicationId, ApplicationPhase, ApplicationSpec, Device, DeviceId, Placement, PlacementSpec,
    UsageHour,
};
use edgible_acceptance_tests::cloud_platform::{
    CLOUD_EDGE_ADDRESS, CloudPlatform, HOSTS, Org, REGION, TENANT_EDGE_ADDRESS, Whereami, host_boot_id, step,
};
use edgible_acceptance_tests::netns::{Namespace, output_within};
use edgible_acceptance_tests::terraform::Terraform;
use edgible_acceptance_tests::workload::field;
use edgible_acceptance_tests::{bin_path, heavy_tier, wait_for};
use serde_json::json;

/// Tenant A's application (moved between the cloud and its device).
const HOST_A: &str = "a.cloud.example.test";
/// Tenant B's application (in the cloud, next to A).
const HOST_B: &str = "b.cloud.example.test";
/// The port A's and B's workloads both listen on, on the same host: the agent reaches each
/// guest at the guest's own address, so one port serves two tenants' applications apart.
const PORT: u16 = 8080;
/// The idle timeout of the sleep steps (the model's minimum).
const IDLE_SECONDS: u32 = 10;
/// How often the agents report usage in this test.
const USAGE_INTERVAL_SECONDS: u64 = 2;
/// The network the hosts' guests are on (the agent's `--vm-network` default).
const VM_NETWORK: (Ipv4Addr, u32) = (Ipv4Addr::new(198, 51, 100, 0), 24);
/// How long an application may take to be served after a placement changed (a microVM boots
/// under TCG, a certificate is issued, routes reach the edge).
const CONVERGE: Duration = Duration::from_secs(240);
/// How long one `terraform` command may take.
const TERRAFORM: Duration = Duration::from_secs(300);
/// How long an idle application may take to go to sleep after its timeout.
const FALL_ASLEEP: Duration = Duration::from_secs(120);
/// How long usage may take to reach the server.
const USAGE_ARRIVES: Duration = Duration::from_secs(60);
/// What the usage of one request may add to its bodies: the request and response headers the
/// proxy counts (about 150 bytes each way here), with room to spare.
const OVERHEAD_PER_REQUEST: u64 = 1 << 10;

/// The flags every agent gets: short usage periods so the usage step does not wait a minute.
fn agent_args() -> Vec<String> {
    vec!["--usage-interval-seconds".to_owned(), USAGE_INTERVAL_SECONDS.to_string()]
}

/// Where tenant A's application is placed in its Terraform configuration.
enum Where {
    Cloud,
    Device(DeviceId),
}

/// Tenant A's Terraform configuration: the application (the test workload, health-checked,
/// with a `sleep` block when given one) and its placement.
fn configuration(workload: &Path, placement: &Where, sleep: Option<&str>) -> String {
    let placement = match placement {
        Where::Cloud => format!("strategy = \"cloud\"\n  region   = \"{REGION}\""),
        Where::Device(id) => format!("strategy  = \"serving-device\"\n  device_id = \"{id}\""),
    };
    let sleep = sleep.map_or_else(String::new, |mode| {
        format!(
            "\n  sleep {{\n    idle_timeout_seconds = {IDLE_SECONDS}\n    mode                 = \"{mode}\"\n    \
             wake_timeout_seconds = 120\n  }}\n"
        )
    });
    format!(
        r#"
provider "edgible" {{}}

resource "edgible_application" "app" {{
  name      = "cloud-a"
  hostnames = ["{HOST_A}"]
  port      = {PORT}
  env       = {{ NAME = "cloud-a", BIND_ADDRESS = "0.0.0.0" }}
  workload {{
    process {{
      command = "{workload}"
    }}
  }}
  health_check {{
    protocol         = "http"
    path             = "/health"
    interval_seconds = 2
    timeout_seconds  = 1
  }}{sleep}
}}

resource "edgible_placement" "app" {{
  application_id = edgible_application.app.id
  {placement}
}}
"#,
        workload = workload.display()
    )
}

/// Runs one terraform command within [`TERRAFORM`].
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(TERRAFORM, future).await.with_context(|| format!("{what} took over {TERRAFORM:?}"))?
}

/// Applies `main_tf`, then answers the placement's `host` from the state after checking that
/// the API reports the same.
async fn apply(platform: &CloudPlatform, terraform: &Terraform, main_tf: &str) -> anyhow::Result<DeviceId> {
    terraform.write_config(main_tf)?;
    bounded("terraform apply", terraform.apply()).await?;
    let values = bounded("terraform show", terraform.values("edgible_placement.app")).await?;
    let in_state = values
        .get("host")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("the placement has no host in the state: {values}"))?;
    let id: String = bounded("terraform show", terraform.id("edgible_placement.app")).await?;
    let placement = platform.tenant_a.client.get::<Placement>(&id.parse()?).await?;
    let host = placement.host.with_context(|| format!("the API shows no host: {placement:?}"))?;
    anyhow::ensure!(in_state == host.to_string(), "the state's host {in_state} is not the API's {host}");
    Ok(host)
}

/// Whether `address` is in `network`.
fn in_network(address: Ipv4Addr, (network, prefix): (Ipv4Addr, u32)) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(address) & mask == u32::from(network) & mask
}

/// The answer of a microVM: the guest kernel, a boot that is not this machine's, and guest
/// addresses on the VM network.
fn from_a_microvm(here: &Whereami, release: &str, host_boot: &str) -> bool {
    here.kernel == release
        && here.boot_id != host_boot
        && !here.addresses.is_empty()
        && here.addresses.iter().all(|address| in_network(*address, VM_NETWORK))
}

/// Whether a TCP connection from `namespace` to `target` opens within 3 s (bash's `/dev/tcp`).
fn connects_from(namespace: &Namespace, target: SocketAddrV4) -> anyhow::Result<bool> {
    let mut command = namespace.exec("timeout");
    command.args(["3", "bash", "-c", &format!("exec 3<>/dev/tcp/{}/{}", target.ip(), target.port())]);
    Ok(output_within(&mut command, Duration::from_secs(10))?.status.success())
}

/// What B's guest answered to `GET /connect?to=target`: `Ok(())` when it connected, the
/// reason otherwise.
fn connect_from_guest(platform: &CloudPlatform, target: SocketAddrV4) -> anyhow::Result<Result<(), String>> {
    let body = platform.get(CLOUD_EDGE_ADDRESS, HOST_B, &format!("/connect?to={target}"))?;
    match field(&body, "outcome") {
        Some("connected") => Ok(Ok(())),
        Some("failed") => Ok(Err(field(&body, "reason").unwrap_or("-").to_owned())),
        _ => anyhow::bail!("unexpected /connect answer: {body:?}"),
    }
}

/// Each tenant's hostname is answered by its own guest, several times over (the pooled
/// connections of the host's proxy included): A's by a workload named `cloud-a` in the guest
/// `guest_a`, B's by `cloud-b` in `guest_b`, two guests with their own boots and addresses.
fn ensure_own_guests(platform: &CloudPlatform, guest_a: &Whereami, guest_b: &Whereami) -> anyhow::Result<()> {
    anyhow::ensure!(
        guest_a.boot_id != guest_b.boot_id && guest_a.addresses != guest_b.addresses,
        "A and B share a guest: {guest_a:?} {guest_b:?}"
    );
    for _ in 0..3 {
        for (hostname, name, guest) in [(HOST_A, "cloud-a", guest_a), (HOST_B, "cloud-b", guest_b)] {
            let greeting = platform.get(CLOUD_EDGE_ADDRESS, hostname, "/")?;
            anyhow::ensure!(field(&greeting, "name") == Some(name), "{hostname} answered {greeting}");
            let here = Whereami::parse(&platform.get(CLOUD_EDGE_ADDRESS, hostname, "/whereami")?)?;
            anyhow::ensure!(here == *guest, "{hostname} is served by {here:?}, not its guest {guest:?}");
        }
    }
    Ok(())
}

/// Waits until application `id` of `org` sleeps at its current revision.
async fn wait_sleeping(org: &Org, id: &ApplicationId) -> anyhow::Result<()> {
    let client = &org.client;
    wait_for("the application asleep", FALL_ASLEEP + Duration::from_secs(u64::from(IDLE_SECONDS)), || async move {
        let status = client.application_status(id).await.ok()?;
        (status.phase == ApplicationPhase::Sleeping && status.revision == Some(status.application_revision))
            .then_some(())
    })
    .await
}

/// The sum of `org`'s usage of application `id` since the test began.
async fn usage_of(org: &Org, id: &ApplicationId, since: chrono::DateTime<chrono::Utc>) -> anyhow::Result<UsageHour> {
    let from = since - chrono::Duration::hours(1);
    let to = chrono::Utc::now() + chrono::Duration::hours(1);
    let report = org.usage(from, to).await?;
    let mut total =
        UsageHour { application_id: *id, hour: from, awake_ms: 0, requests: 0, bytes_in: 0, bytes_out: 0, wakes: 0 };
    for hour in report.hours.iter().filter(|hour| hour.application_id == *id) {
        total.awake_ms += hour.awake_ms;
        total.requests += hour.requests;
        total.bytes_in += hour.bytes_in;
        total.bytes_out += hour.bytes_out;
        total.wakes += hour.wakes;
    }
    Ok(total)
}

/// `org`'s usage of `id` once it stopped changing (the same over three reporting periods).
async fn settled_usage(
    org: &Org,
    id: &ApplicationId,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<UsageHour> {
    let deadline = Instant::now() + USAGE_ARRIVES;
    let mut last = usage_of(org, id, since).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(3 * USAGE_INTERVAL_SECONDS)).await;
        let now = usage_of(org, id, since).await?;
        if (now.requests, now.bytes_in, now.bytes_out, now.wakes)
            == (last.requests, last.bytes_in, last.bytes_out, last.wakes)
        {
            return Ok(now);
        }
        anyhow::ensure!(Instant::now() < deadline, "usage of {id} still changes after {USAGE_ARRIVES:?}: {now:?}");
        last = now;
    }
}

#[tokio::test]
async fn cloud_placement_end_to_end() -> anyhow::Result<()> {
    if !heavy_tier("cloud_placement_end_to_end") {
        return Ok(());
    }
    let platform = CloudPlatform::start("cloud", &agent_args()).await?;
    let terraform =
        Terraform::new(&platform.dir.path().join("tenant-a"), &platform.server.url, &platform.tenant_a.api_key)?;
    let result = scenario(&platform, &terraform).await;
    // Teardown: Terraform's objects first (best effort on failure), then the platform.
    let destroyed = bounded("terraform destroy", terraform.destroy()).await;
    match (result, destroyed) {
        (Ok(()), Ok(_)) => Ok(()),
        (Ok(()), Err(error)) => {
            let kept = platform.keep();
            Err(error.context(format!("logs and database are kept in {}", kept.display())))
        }
        (Err(error), _) => {
            let diagnosis = platform.diagnose();
            let kept = platform.keep();
            Err(error
                .context(format!("{diagnosis}\nlogs, Terraform state and database are kept in {}", kept.display())))
        }
    }
}

async fn scenario(platform: &CloudPlatform, terraform: &Terraform) -> anyhow::Result<()> {
    let began = chrono::Utc::now();
    // Canonical: `bin_path` goes through `acceptance-tests/..`.
    let workload = std::fs::canonicalize(bin_path("e2e_workload")?)?;
    let host_boot = host_boot_id()?;
    let release = platform.kernel.release.as_str();
    let host1 = platform.host_ids[0];

    step(&format!("terraform apply: tenant A's application with a cloud placement in region {REGION}"));
    let host = apply(platform, terraform, &configuration(&workload, &Where::Cloud, None)).await?;
    anyhow::ensure!(
        platform.host_name(&host) == Some(HOSTS[0].name),
        "the scheduler chose {host}, expected host1 ({host1}), the one with the most free capacity"
    );
    let hidden = platform.tenant_a.client.get::<Device>(&host).await;
    anyhow::ensure!(
        hidden.as_ref().is_err_and(|error| error.status().is_some_and(|status| [403, 404].contains(&status.as_u16()))),
        "the tenant must not read the operator's host: {hidden:?}"
    );
    let first_guest = platform
        .wait_whereami(CLOUD_EDGE_ADDRESS, HOST_A, CONVERGE, "served from a microVM", |here| {
            from_a_microvm(here, release, &host_boot)
        })
        .await?;
    let greeting = platform.get(CLOUD_EDGE_ADDRESS, HOST_A, "/")?;
    anyhow::ensure!(field(&greeting, "name") == Some("cloud-a"), "{greeting}");
    let qemu = platform.qemu_pids(&host1)?;
    anyhow::ensure!(qemu.len() == 1, "host1 runs one QEMU: {qemu:?}");
    anyhow::ensure!(platform.qemu_pids(&platform.host_ids[1])?.is_empty(), "host2 runs no QEMU");
    eprintln!("    served by host1 from guest {first_guest:?} (QEMU pids {qemu:?})");

    step("terraform apply: the placement switched to serving-device on tenant A's own device");
    let device_id = platform.tenant_device.id;
    let host = apply(platform, terraform, &configuration(&workload, &Where::Device(device_id), None)).await?;
    anyhow::ensure!(host == device_id, "a serving-device placement's host is its device: {host}");
    platform
        .wait_whereami(TENANT_EDGE_ADDRESS, HOST_A, CONVERGE, "served from the device", |here| {
            here.boot_id == host_boot
        })
        .await?;
    let greeting = platform.get(TENANT_EDGE_ADDRESS, HOST_A, "/")?;
    let pid: u32 = field(&greeting, "pid").context("no pid")?.parse()?;
    anyhow::ensure!(platform.topology.namespace("dev")?.holds_pid(pid), "pid {pid} is not in the device's namespace");
    wait_for("A's microVM gone from host1", CONVERGE, || async {
        platform.qemu_pids(&host1).ok()?.is_empty().then_some(())
    })
    .await?;
    eprintln!("    served by pid {pid} on the device; host1 runs no QEMU any more");

    step("terraform apply: back to the cloud");
    let host = apply(platform, terraform, &configuration(&workload, &Where::Cloud, None)).await?;
    anyhow::ensure!(host == host1, "back in the cloud on host1 again (the emptiest), got {host}");
    let guest_a = platform
        .wait_whereami(CLOUD_EDGE_ADDRESS, HOST_A, CONVERGE, "served from a new microVM", |here| {
            from_a_microvm(here, release, &host_boot) && here.boot_id != first_guest.boot_id
        })
        .await?;

    step("tenant B's application, on A's port, placed in the cloud through the API, lands next to A on host1");
    let spec: ApplicationSpec = serde_json::from_value(json!({
        "name": "cloud-b",
        "hostnames": [HOST_B],
        "port": PORT,
        "env": {"NAME": "cloud-b", "BIND_ADDRESS": "0.0.0.0"},
        "workload": {"process": {"command": workload.display().to_string()}},
        "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 2, "timeout_seconds": 1},
    }))?;
    let app_b = platform.tenant_b.client.create::<Application>(&spec).await.context("creating B")?;
    let placement = PlacementSpec::Cloud { application_id: app_b.id, pool_id: None, region: Some(REGION.parse()?) };
    let placed: Placement = platform.tenant_b.client.create::<Placement>(&placement).await.context("placing B")?;
    anyhow::ensure!(placed.host == Some(host1), "B must share host1 with A: {placed:?}");
    let guest_b = platform
        .wait_whereami(CLOUD_EDGE_ADDRESS, HOST_B, CONVERGE, "served from a microVM", |here| {
            from_a_microvm(here, release, &host_boot)
        })
        .await?;
    let greeting = platform.get(CLOUD_EDGE_ADDRESS, HOST_B, "/")?;
    anyhow::ensure!(
        field(&greeting, "name") == Some("cloud-b") && guest_b.boot_id != guest_a.boot_id,
        "B's hostname must be served by B's own guest, not A's: {greeting} {guest_b:?} (A: {guest_a:?})"
    );
    let qemu = platform.qemu_pids(&host1)?;
    anyhow::ensure!(qemu.len() == 2, "host1 runs A's and B's QEMU: {qemu:?}");
    ensure_own_guests(platform, &guest_a, &guest_b)?;
    eprintln!("    one host, one port: {HOST_A} served by A's guest {guest_a:?}, {HOST_B} by B's {guest_b:?}");

    step("isolation: from inside B's guest, A's guest, the server and host1's tunnel address are unreachable");
    let a_address = SocketAddrV4::new(guest_a.addresses[0], PORT);
    let b_address = SocketAddrV4::new(guest_b.addresses[0], PORT);
    anyhow::ensure!(a_address.ip() != b_address.ip(), "two guests with one address: {guest_a:?} {guest_b:?}");
    let server_address: SocketAddrV4 =
        platform.server.url.strip_prefix("http://").context("the server URL is http://")?.parse()?;
    let host1_device = platform.operator.client.get::<Device>(&host1).await?;
    let tunnel_address = SocketAddrV4::new(host1_device.status.tunnel_address, 443);
    // The check can say "connected": B's guest reaches its own workload.
    anyhow::ensure!(connect_from_guest(platform, b_address)? == Ok(()), "B's guest cannot reach its own address");
    let host1_namespace = platform.topology.namespace(HOSTS[0].name)?;
    let edge_namespace = platform.topology.namespace("edge")?;
    for (target, what, control_from, control) in [
        (a_address, "A's guest", host1_namespace, "host1"),
        (server_address, "the server", host1_namespace, "host1"),
        (tunnel_address, "host1's tunnel address", edge_namespace, "the cloud edge"),
    ] {
        // Control: the target is up and routable from outside the guest.
        anyhow::ensure!(
            connects_from(control_from, target)?,
            "{what} ({target}) is not reachable from {control} either"
        );
        match connect_from_guest(platform, target)? {
            Ok(()) => anyhow::bail!("B's guest reached {what} ({target})"),
            Err(reason) => eprintln!("    B's guest -> {what} {target}: {reason} (from {control}: connected)"),
        }
    }

    let app_a: ApplicationId = bounded("terraform show", terraform.id("edgible_application.app")).await?.parse()?;
    for mode in ["stop", "suspend"] {
        step(&format!("sleep after {IDLE_SECONDS} s idle, mode {mode}: the first request wakes it"));
        // The guest and its QEMU before the change: the one that goes to sleep, unless the
        // policy change restarts it (which the QEMU pids show).
        let before = Whereami::parse(&platform.get(CLOUD_EDGE_ADDRESS, HOST_A, "/whereami")?)?;
        let qemu_before = platform.qemu_pids_of(&host1, &app_a)?;
        anyhow::ensure!(qemu_before.len() == 1, "A runs in one QEMU: {qemu_before:?}");
        apply(platform, terraform, &configuration(&workload, &Where::Cloud, Some(mode))).await?;
        wait_sleeping(&platform.tenant_a, &app_a).await?;
        let qemu_asleep = platform.qemu_pids_of(&host1, &app_a)?;
        if mode == "stop" {
            anyhow::ensure!(qemu_asleep.is_empty(), "asleep in stop mode, A's QEMU is gone: {qemu_asleep:?}");
        }
        let started = Instant::now();
        let body = platform.get(CLOUD_EDGE_ADDRESS, HOST_A, "/whereami")?;
        let latency = started.elapsed();
        let after = Whereami::parse(&body)?;
        anyhow::ensure!(from_a_microvm(&after, release, &host_boot), "woken, A is served from a microVM: {after:?}");
        eprintln!("    wake latency ({mode}, QEMU under TCG, through the edge): {latency:.2?}");
        let qemu_after = platform.qemu_pids_of(&host1, &app_a)?;
        if mode == "stop" {
            anyhow::ensure!(after.boot_id != before.boot_id, "a stop wake boots a new guest: {after:?}");
        } else if qemu_asleep.is_empty() || qemu_asleep == qemu_before {
            // Not restarted by the policy change: the guest that slept is `before`'s.
            anyhow::ensure!(after.boot_id == before.boot_id, "a suspend wake resumes the guest that slept: {after:?}");
        } else {
            // Restarted by the policy change: the paused QEMU must be the one that answers.
            anyhow::ensure!(qemu_after == qemu_asleep, "a suspend wake resumes the paused QEMU {qemu_asleep:?}");
        }
        eprintln!("    A's QEMU: before {qemu_before:?}, asleep {qemu_asleep:?}, woken {qemu_after:?}");
        // The status follows the health checks, which run on their own schedule.
        let client = &platform.tenant_a.client;
        wait_for("A running again after the wake", Duration::from_secs(60), || async move {
            let status = client.application_status(&app_a).await.ok()?;
            (status.phase == ApplicationPhase::Running).then_some(())
        })
        .await?;
    }

    step("after A's wakes, each hostname is still served by its own tenant's guest");
    let guest_a = Whereami::parse(&platform.get(CLOUD_EDGE_ADDRESS, HOST_A, "/whereami")?)?;
    ensure_own_guests(platform, &guest_a, &guest_b)?;
    eprintln!("    {HOST_A}: {guest_a:?}; {HOST_B}: {guest_b:?}");

    step("usage: tenant B's counts grow by exactly the requests sent, bytes by the bodies plus overhead");
    let base = settled_usage(&platform.tenant_b, &app_b.id, began).await?;
    let upload = platform.dir.path().join("upload.bin");
    std::fs::write(&upload, vec![b'x'; 5000])?;
    let upload_arg = format!("@{}", upload.display());
    let (downloads, uploads, download_bytes, upload_bytes) = (10u64, 10u64, 10_000u64, 5000u64);
    for _ in 0..downloads {
        let path = format!("/download?bytes={download_bytes}");
        let extra = ["--fail-with-body", "--max-time", "30", "-o", "/dev/null", "-w", "%{size_download}"];
        let output = platform.curl(CLOUD_EDGE_ADDRESS, HOST_B, &path, &extra)?;
        anyhow::ensure!(output.success && output.stdout.trim() == download_bytes.to_string(), "{output}");
    }
    for _ in 0..uploads {
        let output = platform.curl(
            CLOUD_EDGE_ADDRESS,
            HOST_B,
            "/upload",
            &["--fail-with-body", "--max-time", "30", "--data-binary", &upload_arg],
        )?;
        anyhow::ensure!(field(&output.stdout, "bytes") == Some("5000"), "{output}");
    }
    let sent = downloads + uploads;
    let expected = base.requests + sent;
    let client = &platform.tenant_b;
    wait_for("the requests in the usage", USAGE_ARRIVES, || async {
        let usage = usage_of(client, &app_b.id, began).await.ok()?;
        (usage.requests >= expected).then_some(())
    })
    .await?;
    let usage = settled_usage(&platform.tenant_b, &app_b.id, began).await?;
    anyhow::ensure!(usage.requests == expected, "sent {sent} requests, usage grew from {base:?} to {usage:?}");
    let bytes_in = usage.bytes_in - base.bytes_in;
    let bytes_out = usage.bytes_out - base.bytes_out;
    let (body_in, body_out) = (uploads * upload_bytes, downloads * download_bytes);
    let slack = sent * OVERHEAD_PER_REQUEST;
    anyhow::ensure!(
        (body_in..=body_in + slack).contains(&bytes_in),
        "bytes in grew by {bytes_in}, the bodies sent were {body_in} (+ at most {slack} of overhead)"
    );
    anyhow::ensure!(
        (body_out..=body_out + slack).contains(&bytes_out),
        "bytes out grew by {bytes_out}, the bodies received were {body_out} (+ at most {slack} of overhead)"
    );
    eprintln!(
        "    {sent} requests counted exactly; bytes in +{bytes_in} (bodies {body_in}), out +{bytes_out} (bodies {body_out})"
    );
    let usage_a = settled_usage(&platform.tenant_a, &app_a, began).await?;
    anyhow::ensure!(usage_a.wakes == 2, "A was woken twice (stop, suspend): {usage_a:?}");
    anyhow::ensure!(usage_a.awake_ms > 0 && usage_a.requests > 0, "{usage_a:?}");
    Ok(())
}

#[test]
fn networks_and_microvm_answers_are_recognized() {
    assert!(in_network(Ipv4Addr::new(198, 51, 100, 6), VM_NETWORK));
    assert!(!in_network(Ipv4Addr::new(198, 51, 101, 6), VM_NETWORK));
    assert!(in_network(Ipv4Addr::new(10, 1, 2, 3), (Ipv4Addr::new(0, 0, 0, 0), 0)));
    let guest = Whereami {
        boot_id: "guest".into(),
        kernel: "6.1.0-56-cloud-amd64".into(),
        addresses: vec![Ipv4Addr::new(198, 51, 100, 2)],
    };
    assert!(from_a_microvm(&guest, "6.1.0-56-cloud-amd64", "host"));
    assert!(!from_a_microvm(&guest, "6.1.0-56-cloud-amd64", "guest"), "the host's own boot");
    assert!(!from_a_microvm(&guest, "6.18", "host"), "another kernel");
    let outside = Whereami { addresses: vec![Ipv4Addr::new(203, 0, 113, 21)], ..guest.clone() };
    assert!(!from_a_microvm(&outside, "6.1.0-56-cloud-amd64", "host"), "not on the VM network");
    let none = Whereami { addresses: Vec::new(), ..guest };
    assert!(!from_a_microvm(&none, "6.1.0-56-cloud-amd64", "host"));
    let main_tf = configuration(Path::new("/bin/w"), &Where::Cloud, Some("suspend"));
    assert!(main_tf.contains("strategy = \"cloud\"") && main_tf.contains("mode                 = \"suspend\""));
}
