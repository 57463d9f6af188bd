//! Migration end to end (issue 10), with every part real: the server (SQLite, short step
//! timeout and retention), an edge, two devices with real agents and WireGuard tunnels in
//! their own namespaces, applications running the `e2e_workload` binary as process workloads
//! (a stateful one writes to its movable volume), `terraform`, the `edgible` CLI, and clients
//! in the `client` namespace reaching the applications through the edge.
//!
//! One test walks the scenarios on one platform, printing what each step checks:
//! 1. stateful: a client writes 10,000 records (each acknowledged only once fsynced on the
//!    volume) during the whole run while the application moves dev1 → dev2 (a Terraform change
//!    of the placement's `device_id`) → a microVM on a cloud host (`edgible app migrate
//!    --to cloud:eu`; its volume is attached to the guest as a disk) → dev1 (`edgible app
//!    migrate --to dev1`); every acknowledged record is there at the end, and the downtime of
//!    each move, as the client saw it, is printed. The client reaches the devices through their
//!    pool's edge and the cloud host through the cloud's edge, trying the other one when a
//!    request fails (as with DNS naming both). After the retention, a source's copy is gone.
//! 2. stateless: continuous load while the application moves dev1 → dev2, with zero failed
//!    requests.
//! 3. fault injection on a stateful application with 200 MB of incompressible data (so
//!    shipping takes seconds), each leaving it served from the source with its data intact and
//!    the migration `failed` with a reason: a chunk corrupted in the server's blob store; the
//!    target agent killed during ship; the target's health check failing; then the server
//!    restarted in the middle of ship (the migration resumes and completes); and the source
//!    agent killed during quiesce (the application is served from the source again once its
//!    agent is back).
//!
//! 4. cloud: the fault scenarios' application (200 MB, 50 records) moves from dev2 to the
//!    cloud host and back to dev1, its data intact each time.
//!
//! The guest kernel comes from `EDGIBLE_VM_KERNEL_DIR` (`.ci/test` fetches it), as for the
//! cloud test.
//!
//! Needs root, `ip`, `nft`, `nsenter`, `curl`, `terraform`, e2fsprogs and loop devices; runs
//! with `EDGIBLE_ACC=1` after `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{Application, ApplicationId, Migration, MigrationPhase, Placement};
use edgible_acceptance_tests::Cli;
use edgible_acceptance_tests::cloud_platform::VmKernel;
use edgible_acceptance_tests::migration_platform::{
    Attempt, CLOUD, CLOUD_EDGE_ADDRESS, CLOUD_REGION, MigrationPlatform, MigrationTiming, app_client, app_client_via,
    describe_migration, device_of, in_namespace, join, moves, phase_duration, step,
};
use edgible_acceptance_tests::netns::DEV2_ADDRESS;
use edgible_acceptance_tests::terraform::Terraform;
use edgible_acceptance_tests::workload::{UNHEALTHY_AT_ENV, field};
use edgible_acceptance_tests::{bin_path, heavy_tier};

/// Names a subset of the scenarios to walk (`stateful,stateless,faults`), for a developer
/// chasing one; all of them when unset.
const SCENARIOS_ENV: &str = "EDGIBLE_MIGRATION_SCENARIOS";
/// The stateful application of scenario 1 (Terraform-managed).
const REC: &str = "rec.example.test";
/// The stateless application of scenario 2.
const WEB: &str = "web.example.test";
/// The stateful application of the fault scenarios.
const BIG: &str = "big.example.test";
/// How many records the client of scenario 1 writes.
const RECORDS: u64 = 10_000;
/// The last records are written only once both moves are done, so writes span the run.
const HELD_BACK: u64 = 500;
/// Concurrent writers (each writes the ids equal to its index modulo this).
const WRITERS: u64 = 4;
/// At most this many records per second until the moves are done.
const PACED_RATE: u64 = 150;
/// The fault scenarios' incompressible data: large enough that ship takes seconds.
const FILL: u64 = 200 << 20;
/// The server's migration timing.
const TIMING: MigrationTiming = MigrationTiming {
    step_timeout: Duration::from_secs(20),
    retention: Duration::from_secs(10),
    drain: Duration::from_secs(5),
};
/// How long the first request of an application may take (certificate, tunnels).
const FIRST_REQUEST: Duration = Duration::from_secs(120);
/// How long a migration may take from start to end here (a step timeout, with room).
const MIGRATION: Duration = Duration::from_secs(120);
/// How long one `terraform apply` may take (it waits for the migration).
const APPLY: Duration = Duration::from_secs(240);

/// The Terraform configuration of scenario 1: application `rec` (with a movable volume) placed
/// on `device`, the devices read by name.
fn rec_configuration(workload: &std::path::Path, device: &str) -> String {
    let workload = workload.display();
    format!(
        r#"
provider "edgible" {{}}

data "edgible_device" "target" {{
  name = "{device}"
}}

resource "edgible_application" "rec" {{
  name      = "rec"
  hostnames = ["{REC}"]
  port      = 18090
  # In a microVM the host's proxy reaches the workload at the guest's address.
  env       = {{ NAME = "rec", BIND_ADDRESS = "0.0.0.0" }}
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
  }}
  storage {{
    name       = "data"
    size_mib   = 64
    mount_path = "/data"
    movable    = true
  }}
}}

resource "edgible_placement" "rec" {{
  application_id = edgible_application.rec.id
  strategy       = "serving-device"
  device_id      = data.edgible_device.target.id
}}
"#
    )
}

/// Everything the walk holds beyond the platform.
struct Walk {
    platform: MigrationPlatform,
    terraform: Terraform,
    cli: Cli,
}

/// What the writer of scenario 1 saw.
struct Writes {
    acknowledged: BTreeSet<u64>,
    attempts: Vec<Attempt>,
    failures: usize,
}

/// Writes records `1..=RECORDS` to `REC` through the edge, `WRITERS` at a time, paced at
/// `PACED_RATE` and holding the last `HELD_BACK` until `moves_done`; a refused write is retried
/// until acknowledged. Bounded by `within`.
async fn write_records(
    clients: Vec<reqwest::Client>,
    moves_done: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    within: Duration,
) -> anyhow::Result<Writes> {
    let started = Instant::now();
    let deadline = started + within;
    let writer = |index: u64| {
        let clients = clients.clone();
        let moves_done = moves_done.clone();
        let abort = abort.clone();
        let acknowledged = acknowledged.clone();
        async move {
            let mut attempts = Vec::new();
            let mut acked = BTreeSet::new();
            let mut failures = 0;
            // Which edge this writer goes through; the other one after a failure.
            let mut edge = 0;
            for id in (1..=RECORDS).filter(|id| id % WRITERS == index) {
                if id > RECORDS - HELD_BACK {
                    while !moves_done.load(Ordering::SeqCst) {
                        anyhow::ensure!(Instant::now() < deadline, "the moves did not end within {within:?}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                } else {
                    // Pacing: record `id` not before id / PACED_RATE seconds into the run.
                    let due = started + Duration::from_millis(id * 1000 / PACED_RATE);
                    tokio::time::sleep_until(due.into()).await;
                }
                loop {
                    anyhow::ensure!(!abort.load(Ordering::SeqCst), "the writer was stopped: a move failed");
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "record {id} was not acknowledged within the run's {within:?}"
                    );
                    let served_by = match clients[edge].post(format!("https://{REC}/records/{id}")).send().await {
                        Ok(response) if response.status() == 200 => {
                            let body = response.text().await.unwrap_or_default();
                            (field(&body, "stored") == Some(id.to_string().as_str()))
                                .then(|| field(&body, "addresses").and_then(device_of))
                                .flatten()
                        }
                        _ => None,
                    };
                    attempts.push(Attempt { at: started.elapsed(), served_by });
                    if served_by.is_some() {
                        acked.insert(id);
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    failures += 1;
                    edge = (edge + 1) % clients.len();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            anyhow::Ok((acked, attempts, failures))
        }
    };
    let results = futures::future::join_all((0..WRITERS).map(writer)).await;
    let mut writes = Writes { acknowledged: BTreeSet::new(), attempts: Vec::new(), failures: 0 };
    for result in results {
        let (acked, attempts, failures) = result?;
        writes.acknowledged.extend(acked);
        writes.attempts.extend(attempts);
        writes.failures += failures;
    }
    writes.attempts.sort_by_key(|attempt| attempt.at);
    Ok(writes)
}

/// Waits until `counter` reaches `at_least`.
async fn wait_count(counter: &AtomicU64, at_least: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while counter.load(Ordering::SeqCst) < at_least {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} records acknowledged after {timeout:?}, waiting for {at_least}",
            counter.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The newest migration of `application`.
async fn newest_migration(platform: &MigrationPlatform, application: &ApplicationId) -> anyhow::Result<Migration> {
    let migrations = platform.client.application_migrations(application).await?;
    migrations.into_iter().next().context("the application has no migration")
}

/// Checks that a migration completed, printing its phases.
fn expect_completed(migration: &Migration) -> anyhow::Result<()> {
    anyhow::ensure!(
        migration.phase == MigrationPhase::Completed,
        "the migration did not complete: {}",
        describe_migration(migration)
    );
    let phases: Vec<String> = migration
        .phases
        .iter()
        .map(|record| {
            let took = phase_duration(migration, record.phase).map(|took| format!("{took:.1?}")).unwrap_or_default();
            format!("{:?} {took}", record.phase)
        })
        .collect();
    eprintln!("    migration {} completed: {}", migration.id, phases.join(", "));
    Ok(())
}

/// Scenario 1: the stateful walk dev1 → dev2 (Terraform) → dev1 (CLI) under 10,000 writes.
async fn scenario_stateful(walk: &mut Walk) -> anyhow::Result<()> {
    let platform = &walk.platform;
    let application = platform.client.find_by_name::<Application>("rec").await?.context("no application rec")?;
    step("1. stateful: a client writes 10,000 records to rec through the edge during the whole run");
    let clients =
        vec![app_client(&platform.ca_pem, &[REC])?, app_client_via(&platform.ca_pem, &[REC], CLOUD_EDGE_ADDRESS)?];
    let moves_done = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let writer = {
        let (moves_done, abort, acknowledged) = (moves_done.clone(), abort.clone(), acknowledged.clone());
        in_namespace(platform.topology.namespace("client")?, "record-writer", move || {
            write_records(clients, moves_done, abort, acknowledged, Duration::from_secs(420))
        })?
    };
    let result = async {
        wait_count(&acknowledged, 1000, Duration::from_secs(60)).await?;

        step("1a. terraform moves rec from dev1 to dev2 (the placement's device_id changes, in place)");
        let started = Instant::now();
        walk.terraform.write_config(&rec_configuration(&std::fs::canonicalize(bin_path("e2e_workload")?)?, "dev2"))?;
        let output =
            tokio::time::timeout(APPLY, walk.terraform.apply()).await.context("terraform apply took too long")??;
        anyhow::ensure!(
            !output.stdout.contains("must be replaced") && output.stdout.contains("1 changed"),
            "the move was not an in-place update: {output}"
        );
        eprintln!("    terraform apply took {:.1?}", started.elapsed());
        let first = newest_migration(platform, &application.id).await?;
        expect_completed(&first)?;
        let placement = platform.client.get::<Placement>(&first.placement_id).await?;
        anyhow::ensure!(
            placement.host == Some(platform.device_id("dev2")?) && placement.migration_id.is_none(),
            "after the move the placement is {placement:?}"
        );

        let so_far = acknowledged.load(Ordering::SeqCst);
        wait_count(&acknowledged, so_far + 500, Duration::from_secs(60)).await?;

        step(&format!("1b. edgible app migrate rec --to cloud:{CLOUD_REGION}"));
        let second = cli_migrate(walk, &application.id, &format!("cloud:{CLOUD_REGION}"), &first).await?;
        let (_, host_id) = platform.cloud_host.as_ref().context("the platform has no cloud")?;
        anyhow::ensure!(second.target == *host_id, "the migration went to {}, not the cloud host", second.target);

        let so_far = acknowledged.load(Ordering::SeqCst);
        wait_count(&acknowledged, so_far + 500, Duration::from_secs(60)).await?;

        step("1c. edgible app migrate rec --to dev1");
        let third = cli_migrate(walk, &application.id, "dev1", &second).await?;
        anyhow::Ok([first, second, third])
    }
    .await;
    // After a failed move the writer stops at once (its records could wait for minutes).
    abort.store(result.is_err(), Ordering::SeqCst);
    moves_done.store(true, Ordering::SeqCst);
    let writes = join(writer).await;
    let migrations = result?;
    let writes = writes?;

    step("1d. every acknowledged record is on the volume, and the client saw three moves");
    let stored = platform.records(REC)?;
    let lost: Vec<u64> = writes.acknowledged.difference(&stored).copied().collect();
    eprintln!(
        "    {} records acknowledged, {} stored, {} lost; {} refused or failed attempts retried",
        writes.acknowledged.len(),
        stored.len(),
        lost.len(),
        writes.failures
    );
    anyhow::ensure!(writes.acknowledged.len() as u64 == RECORDS, "not every record was acknowledged");
    anyhow::ensure!(
        lost.is_empty(),
        "{} acknowledged records are lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    let seen = moves(&writes.attempts);
    for (index, (moved, migration)) in seen.iter().zip(&migrations).enumerate() {
        eprintln!(
            "    move {}: {} -> {}: downtime seen by the client {:.0?} ({} failed attempts); the server's downtime_ms {:?}",
            index + 1,
            moved.from,
            moved.to,
            moved.downtime(),
            moved.failures,
            migration.downtime_ms
        );
    }
    let path: Vec<(&str, &str)> = seen.iter().map(|moved| (moved.from, moved.to)).collect();
    anyhow::ensure!(
        path == [("dev1", "dev2"), ("dev2", CLOUD), (CLOUD, "dev1")],
        "the client saw the serving device change {path:?}, expected dev1 -> dev2 -> cloud -> dev1"
    );
    let last = writes.attempts.last().context("no attempts")?;
    anyhow::ensure!(last.served_by == Some("dev1"), "the last write was not served by dev1");

    step("1e. after the retention, dev2 (the second move's source) has deleted its copy of the volume");
    let image = platform.agents[1].home.state_dir().join("volumes").join(application.id.to_string()).join("data.img");
    let deadline = Instant::now() + TIMING.retention + Duration::from_secs(30);
    while image.exists() {
        anyhow::ensure!(Instant::now() < deadline, "{} still exists after the retention", image.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Runs `edgible app migrate rec --to TARGET` (which waits for the end) and answers the
/// migration it started, checked completed.
async fn cli_migrate(
    walk: &Walk,
    application: &ApplicationId,
    target: &str,
    previous: &Migration,
) -> anyhow::Result<Migration> {
    let started = Instant::now();
    let cli = walk.cli.clone();
    let target = target.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        cli.run(&["app", "migrate", "rec", "--to", &target, "--timeout", &MIGRATION.as_secs().to_string()])
    })
    .await??
    .success()?;
    eprintln!(
        "    edgible app migrate took {:.1?}; it printed:\n{}{}",
        started.elapsed(),
        output.stdout,
        output.stderr.trim_end()
    );
    let migration = newest_migration(&walk.platform, application).await?;
    anyhow::ensure!(migration.id != previous.id, "the CLI started no migration");
    expect_completed(&migration)?;
    anyhow::ensure!(
        output.stdout.contains("completed") || output.stderr.contains("completed"),
        "the CLI did not say the migration completed: {output:?}"
    );
    Ok(migration)
}

/// Scenario 2: a stateless application moves under continuous load with no failed request.
async fn scenario_stateless(walk: &Walk, application: &ApplicationId) -> anyhow::Result<()> {
    let platform = &walk.platform;
    step("2. stateless: web moves dev1 -> dev2 under continuous load, with zero failed requests");
    let client = app_client(&platform.ca_pem, &[WEB])?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        in_namespace(platform.topology.namespace("client")?, "web-load", move || async move {
            let started = Instant::now();
            let worker = |_: usize| {
                let (client, stop) = (client.clone(), stop.clone());
                async move {
                    let mut attempts = Vec::new();
                    let mut errors = Vec::new();
                    // Bounded: the stop flag, 180 s, 20,000 requests per worker.
                    while !stop.load(Ordering::SeqCst)
                        && started.elapsed() < Duration::from_secs(180)
                        && attempts.len() < 20_000
                    {
                        let served_by = match client.get(format!("https://{WEB}/whereami")).send().await {
                            Ok(response) if response.status() == 200 => {
                                let body = response.text().await.unwrap_or_default();
                                field(&body, "addresses").and_then(device_of)
                            }
                            Ok(response) => {
                                let (status, at) = (response.status(), started.elapsed());
                                let connection = response
                                    .headers()
                                    .get("connection")
                                    .and_then(|value| value.to_str().ok())
                                    .unwrap_or("-")
                                    .to_owned();
                                let body = response.text().await.unwrap_or_default();
                                // An HTML page says what it is in its title.
                                let line = body
                                    .split_once("<title>")
                                    .and_then(|(_, rest)| rest.split_once("</title>"))
                                    .map(|(title, _)| title)
                                    .or_else(|| body.lines().find(|line| !line.trim().is_empty()))
                                    .unwrap_or_default();
                                errors.push(format!("{status} at {at:.1?} (connection: {connection}): {line}"));
                                None
                            }
                            Err(error) => {
                                errors.push(format!("{error:#} at {:.1?}", started.elapsed()));
                                None
                            }
                        };
                        attempts.push(Attempt { at: started.elapsed(), served_by });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (attempts, errors)
                }
            };
            let results = futures::future::join_all((0..2).map(worker)).await;
            let mut attempts = Vec::new();
            let mut errors = Vec::new();
            for (mut a, mut e) in results {
                attempts.append(&mut a);
                errors.append(&mut e);
            }
            attempts.sort_by_key(|attempt: &Attempt| attempt.at);
            anyhow::Ok((attempts, errors))
        })?
    };
    let result = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let migration = platform.migrate(application, "dev2").await?;
        anyhow::ensure!(!migration.stateful, "web has no volume, yet the migration is stateful");
        let migration = platform.wait_ended(&migration.id, MIGRATION).await?;
        expect_completed(&migration)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        anyhow::Ok(())
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    let (attempts, errors) = join(load).await?;
    result?;
    let on_target = attempts.iter().filter(|attempt| attempt.served_by == Some("dev2")).count();
    eprintln!("    {} requests, {} failed, {on_target} served by dev2", attempts.len(), errors.len());
    anyhow::ensure!(errors.is_empty(), "requests failed during the move: {:?}", &errors[..errors.len().min(20)]);
    anyhow::ensure!(on_target > 0, "no request was served by dev2 after the move");
    anyhow::ensure!(
        attempts.last().and_then(|attempt| attempt.served_by) == Some("dev2"),
        "the last request was not served by dev2"
    );
    Ok(())
}

/// The data of the fault scenarios' application: its records and its fill file's digest.
#[derive(Debug, PartialEq, Eq)]
struct Data {
    records: BTreeSet<u64>,
    fill: (String, u64),
}

fn read_data(platform: &MigrationPlatform) -> anyhow::Result<Data> {
    Ok(Data { records: platform.records(BIG)?, fill: platform.fill_digest(BIG)? })
}

/// After a failed migration: it names `cause` (any of the words, case-insensitive), failed in
/// one of `phases`, the application is served from `source` with `data` intact, and the source
/// confirmed the rollback.
async fn expect_failed_safely(
    platform: &MigrationPlatform,
    migration: &Migration,
    phases: &[MigrationPhase],
    cause: &[&str],
    culprit: Option<&str>,
    source: &str,
    data: &Data,
) -> anyhow::Result<()> {
    anyhow::ensure!(migration.phase == MigrationPhase::Failed, "not failed: {}", describe_migration(migration));
    let failure = migration.failure.clone().unwrap_or_default();
    eprintln!("    failed in {:?}: {failure}", migration.failed_phase);
    anyhow::ensure!(
        migration.failed_phase.is_some_and(|phase| phases.contains(&phase)),
        "failed in {:?}, expected one of {phases:?}: {}",
        migration.failed_phase,
        describe_migration(migration)
    );
    let lower = failure.to_lowercase();
    anyhow::ensure!(
        cause.iter().any(|word| lower.contains(word)),
        "the failure does not name the cause (one of {cause:?}): {failure:?}"
    );
    if let Some(device) = culprit {
        let id = platform.device_id(device)?.to_string();
        anyhow::ensure!(
            failure.contains(device) || failure.contains(&id),
            "the failure does not name the device at fault ({device}, {id}): {failure:?}"
        );
    }
    let took = platform.wait_served_from(BIG, source, Duration::from_secs(60)).await?;
    eprintln!("    served from {source} again ({took:.1?} after the failure was read)");
    let now = read_data(platform)?;
    anyhow::ensure!(now.fill == data.fill, "the fill file changed: {:?}, was {:?}", now.fill, data.fill);
    anyhow::ensure!(
        data.records.is_subset(&now.records),
        "records were lost: {:?}",
        data.records.difference(&now.records).take(20).collect::<Vec<_>>()
    );
    // The migration has ended, so poll by hand (`wait_migration` stops at the end).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = platform.client.migration(&migration.id).await?;
        if now.rolled_back {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the source never confirmed the rollback: {}",
            describe_migration(&now)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let placement = platform.client.get::<Placement>(&migration.placement_id).await?;
    anyhow::ensure!(
        placement.host == Some(platform.device_id(source)?) && placement.migration_id.is_none(),
        "after the rollback the placement is {placement:?}"
    );
    Ok(())
}

/// Waits until migration `id` is in `phase` (with something shipped, for ship).
async fn wait_phase(
    platform: &MigrationPlatform,
    migration: &Migration,
    phase: MigrationPhase,
) -> anyhow::Result<Migration> {
    platform
        .wait_migration(&migration.id, Duration::from_secs(90), &format!("in {phase:?}"), |now| {
            now.phase == phase && (phase != MigrationPhase::Ship || now.bytes_shipped > 0)
        })
        .await
}

/// Scenario 3: fault injection on `big` (200 MB of incompressible data).
async fn scenario_faults(walk: &mut Walk, application: &ApplicationId) -> anyhow::Result<()> {
    step("3. fault injection: big holds 200 MB of random data and 50 records, on dev1");
    let platform = &walk.platform;
    let output =
        platform.curl(BIG, &format!("/fill?bytes={FILL}"), &["-X", "POST", "--fail-with-body", "--max-time", "300"])?;
    anyhow::ensure!(output.success, "{output}");
    let urls: Vec<String> = (1..=50).map(|id| format!("https://{BIG}/records/{id}")).collect();
    let mut args: Vec<&str> = vec!["-X", "POST", "--fail-with-body", "--max-time", "60"];
    let (first_url, rest) = urls.split_first().context("no urls")?;
    args.extend(rest.iter().map(String::as_str));
    let output = platform.curl(BIG, &first_url[format!("https://{BIG}").len()..], &args)?;
    anyhow::ensure!(output.success, "{output}");
    let data = read_data(platform)?;
    anyhow::ensure!(
        data.records.len() == 50 && data.fill.1 == FILL,
        "big holds {:?} records and {} bytes",
        data.records.len(),
        data.fill.1
    );

    step("3a. a chunk corrupted in the server's blob store: the target refuses it at restore");
    let migration = platform.migrate(application, "dev2").await?;
    anyhow::ensure!(migration.stateful, "big has a volume, yet the migration is not stateful");
    let deadline = Instant::now() + Duration::from_secs(90);
    let chunk = loop {
        if let Some(chunk) = platform.blob_chunks(&migration.id).into_iter().next() {
            break chunk;
        }
        let now = platform.client.migration(&migration.id).await?;
        anyhow::ensure!(!now.phase.is_final(), "it ended before a chunk was stored: {}", describe_migration(&now));
        anyhow::ensure!(Instant::now() < deadline, "no chunk reached {} within 90 s", platform.blob_dir.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    corrupt(&chunk)?;
    eprintln!("    corrupted {}", chunk.display());
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    expect_failed_safely(
        platform,
        &ended,
        &[MigrationPhase::Restore],
        &["checksum", "sha-256", "sha256", "digest", "corrupt"],
        None,
        "dev1",
        &data,
    )
    .await?;

    step("3b. the target agent (dev2) killed during ship");
    let migration = platform.migrate(application, "dev2").await?;
    let now = wait_phase(platform, &migration, MigrationPhase::Ship).await?;
    eprintln!("    killing dev2's agent at {}/{} bytes shipped", now.bytes_shipped, now.bytes_total);
    walk.platform.agent("dev2")?.kill();
    let platform = &walk.platform;
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    expect_failed_safely(
        platform,
        &ended,
        &[MigrationPhase::Ship, MigrationPhase::Restore],
        &["offline", "timed out", "timeout", "within"],
        Some("dev2"),
        "dev1",
        &data,
    )
    .await?;
    walk.platform.agent("dev2")?.start()?;
    let platform = &walk.platform;
    platform.wait_online("dev2", Duration::from_secs(60)).await?;

    step("3c. the target's health check fails (UNHEALTHY_AT = dev2's address)");
    set_env(platform, application, Some(&DEV2_ADDRESS.to_string())).await?;
    platform.wait_served_from(BIG, "dev1", Duration::from_secs(60)).await?;
    let migration = platform.migrate(application, "dev2").await?;
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    let result = expect_failed_safely(
        platform,
        &ended,
        &[MigrationPhase::Restore, MigrationPhase::Cutover],
        &["health", "running", "timed out", "timeout", "within"],
        None,
        "dev1",
        &data,
    )
    .await;
    set_env(platform, application, None).await?;
    result?;
    platform.wait_served_from(BIG, "dev1", Duration::from_secs(60)).await?;

    step("3d. the server restarted in the middle of ship: the migration resumes and completes");
    let migration = platform.migrate(application, "dev2").await?;
    let now = wait_phase(platform, &migration, MigrationPhase::Ship).await?;
    eprintln!("    restarting the server at {}/{} bytes shipped", now.bytes_shipped, now.bytes_total);
    walk.platform.restart_server()?;
    let platform = &walk.platform;
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    expect_completed(&ended)?;
    platform.wait_served_from(BIG, "dev2", Duration::from_secs(60)).await?;
    let now = read_data(platform)?;
    anyhow::ensure!(now == data, "the data changed in the move: {:?} records, fill {:?}", now.records.len(), now.fill);

    step("3e. the source agent (dev2) killed during quiesce, a request in flight; it comes back");
    // A slow request keeps quiesce draining (up to the drain time) while the agent dies.
    let slow = {
        let client = app_client(&platform.ca_pem, &[BIG])?;
        in_namespace(platform.topology.namespace("client")?, "slow-request", move || async move {
            let _ = client.get(format!("https://{BIG}/slow?ms=8000")).send().await;
            anyhow::Ok(())
        })?
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let migration = platform.migrate(application, "dev1").await?;
    wait_phase(platform, &migration, MigrationPhase::Quiesce).await?;
    walk.platform.agent("dev2")?.kill();
    let platform = &walk.platform;
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    let _ = join(slow).await;
    anyhow::ensure!(ended.phase == MigrationPhase::Failed, "not failed: {}", describe_migration(&ended));
    anyhow::ensure!(!ended.rolled_back, "rolled back while the source is down: {}", describe_migration(&ended));
    step("    dev2's agent back: big is served from dev2 again");
    walk.platform.agent("dev2")?.start()?;
    let platform = &walk.platform;
    expect_failed_safely(
        platform,
        &ended,
        &[MigrationPhase::Quiesce, MigrationPhase::Snapshot],
        &["offline", "timed out", "timeout", "within"],
        Some("dev2"),
        "dev2",
        &data,
    )
    .await?;
    Ok(())
}

/// Scenario 4: big moves to the cloud host and back to dev1 with its data.
async fn scenario_cloud(walk: &Walk, application: &ApplicationId) -> anyhow::Result<()> {
    let platform = &walk.platform;
    let data = read_data(platform)?;
    let from = platform.serving_device(BIG)?;
    step(&format!(
        "4. cloud: big ({} records, {} bytes of fill) moves {from} -> a microVM on the cloud host",
        data.records.len(),
        data.fill.1
    ));
    let migration = platform.migrate_to_cloud(application).await?;
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    expect_completed(&ended)?;
    let (_, host_id) = platform.cloud_host.as_ref().context("the platform has no cloud")?;
    anyhow::ensure!(ended.target == *host_id, "the migration went to {}, not the cloud host", ended.target);
    platform.wait_served_from(BIG, CLOUD, Duration::from_secs(60)).await?;
    let now = read_data(platform)?;
    anyhow::ensure!(
        now == data,
        "the data changed in the move to the cloud: {} records, fill {:?}",
        now.records.len(),
        now.fill
    );

    step("4b. big moves from the cloud host back to dev1");
    let migration = platform.migrate(application, "dev1").await?;
    let ended = platform.wait_ended(&migration.id, MIGRATION).await?;
    expect_completed(&ended)?;
    platform.wait_served_from(BIG, "dev1", Duration::from_secs(60)).await?;
    let now = read_data(platform)?;
    anyhow::ensure!(
        now == data,
        "the data changed in the move back: {} records, fill {:?}",
        now.records.len(),
        now.fill
    );
    Ok(())
}

/// Flips bytes in the middle of a chunk file.
fn corrupt(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{Read as _, Seek as _, Write as _};
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    anyhow::ensure!(len > 0, "{} is empty", path.display());
    let offset = len / 2;
    let mut bytes = [0u8; 16];
    file.seek(std::io::SeekFrom::Start(offset))?;
    let read = file.read(&mut bytes)?;
    for byte in &mut bytes[..read] {
        *byte ^= 0xa5;
    }
    file.seek(std::io::SeekFrom::Start(offset))?;
    file.write_all(&bytes[..read])?;
    file.sync_all()?;
    Ok(())
}

/// Sets (or removes) `UNHEALTHY_AT` in the application's env.
async fn set_env(platform: &MigrationPlatform, application: &ApplicationId, value: Option<&str>) -> anyhow::Result<()> {
    let current = platform.client.get::<Application>(application).await?;
    let mut spec = serde_json::to_value(&current.spec)?;
    match value {
        Some(value) => spec["env"][UNHEALTHY_AT_ENV] = serde_json::json!(value),
        None => {
            if let Some(env) = spec["env"].as_object_mut() {
                env.remove(UNHEALTHY_AT_ENV);
            }
        }
    }
    platform
        .client
        .update::<Application>(application, Some(current.revision), &serde_json::from_value(spec)?)
        .await
        .context("updating big's env")?;
    Ok(())
}

async fn run(walk: &mut Walk) -> anyhow::Result<()> {
    let platform = &walk.platform;
    step("deploying web (stateless) and big (stateful, 512 MiB volume) on dev1; terraform applies rec on dev1");
    let (web, _) = platform.deploy("web", WEB, 18091, None, &[], "dev1").await?;
    let (big, _) = platform.deploy("big", BIG, 18092, Some(512), &[], "dev1").await?;
    walk.terraform.write_config(&rec_configuration(&std::fs::canonicalize(bin_path("e2e_workload")?)?, "dev1"))?;
    tokio::time::timeout(APPLY, walk.terraform.apply()).await.context("terraform apply took too long")??;
    for hostname in [REC, WEB, BIG] {
        let took = platform.wait_served_from(hostname, "dev1", FIRST_REQUEST).await?;
        eprintln!("    {hostname} served from dev1 after {took:.1?}");
    }
    let only = std::env::var(SCENARIOS_ENV).unwrap_or_default();
    let runs = |name: &str| only.is_empty() || only.split(',').any(|wanted| wanted.trim() == name);
    if runs("stateful") {
        scenario_stateful(walk).await?;
    }
    if runs("stateless") {
        scenario_stateless(walk, &web.id).await?;
    }
    if runs("faults") {
        scenario_faults(walk, &big.id).await?;
    }
    if runs("cloud") {
        scenario_cloud(walk, &big.id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_end_to_end() -> anyhow::Result<()> {
    if !heavy_tier("migration_end_to_end") {
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let started = Instant::now();
    let kernel = VmKernel::from_env()?;
    let platform = MigrationPlatform::start("mig", TIMING, Some(&kernel)).await?;
    let terraform =
        Terraform::new(&platform.dir.path().join("terraform"), &platform.server.url, &platform.server.admin_key)?;
    let cli = Cli::new(&platform.dir.path().join("cli"))?;
    cli.ok(&["login", "--server", &platform.server.url, "--key", &platform.server.admin_key])?;
    let mut walk = Walk { platform, terraform, cli };
    let result = run(&mut walk).await;
    if let Err(error) = result {
        let diagnosis = walk.platform.diagnose();
        let kept: PathBuf = walk.platform.keep();
        return Err(error.context(format!("{diagnosis}\nlogs and state are kept in {}", kept.display())));
    }
    step(&format!("all scenarios passed in {:.0?}", started.elapsed()));
    Ok(())
}
