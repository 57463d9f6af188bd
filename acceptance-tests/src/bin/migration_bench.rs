//! The migration benchmark (issue 10): how long a stateful application is down when it moves
//! between two devices, and how fast its volume ships, for volumes of 100 MB and 1 GB (sizes
//! settable).
//!
//! It builds the migration test's platform (`edgible_acceptance_tests::migration_platform`:
//! server, edge, dev1, dev2 and a client in namespaces, real agents and tunnels), deploys the
//! test workload with a movable volume, fills the volume with random (incompressible) data,
//! then moves the application back and forth (dev1 → dev2, dev2 → dev1, ...) while a client in
//! the client namespace sends `GET /whereami` through the edge every 10 ms. Per move it reports
//! the phases' durations from the server (snapshot, ship, restore), the ship throughput (archive
//! bytes over the ship phase), the server's `downtime_ms` (quiesce start to cutover) and the
//! downtime the client saw (last answer from the source to first answer from the target). There
//! is no anchor to alternate with: the figures are absolute, for this machine.
//!
//! Usage (root; after `cargo build --release --workspace --bins`):
//! `migration_bench [--sizes-mib 100,1024] [--rounds 3] [--out FILE.md]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{Application, MigrationPhase};
use edgible_acceptance_tests::migration_platform::{
    Attempt, MigrationPlatform, MigrationTiming, app_client, describe_migration, device_of, in_namespace, join, moves,
    phase_duration, step,
};
use edgible_acceptance_tests::workload::field;

/// The bench's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    sizes_mib: Vec<u64>,
    rounds: u32,
    out: Option<std::path::PathBuf>,
}

impl Settings {
    fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut settings = Self { sizes_mib: vec![100, 1024], rounds: 3, out: None };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--sizes-mib" => {
                    settings.sizes_mib = value()?
                        .split(',')
                        .map(|size| size.trim().parse().with_context(|| format!("--sizes-mib: {size:?} is no size")))
                        .collect::<anyhow::Result<_>>()?;
                    anyhow::ensure!(
                        !settings.sizes_mib.is_empty()
                            && settings.sizes_mib.iter().all(|size| (1..=8192).contains(size)),
                        "--sizes-mib: each size must be 1 to 8192 MiB"
                    );
                }
                "--rounds" => {
                    settings.rounds = value()?.parse().context("--rounds: not a number")?;
                    anyhow::ensure!((1..=20).contains(&settings.rounds), "--rounds must be 1 to 20");
                }
                "--out" => settings.out = Some(value()?.into()),
                "--help" | "-h" => {
                    println!("migration_bench [--sizes-mib 100,1024] [--rounds 3] [--out FILE.md]");
                    std::process::exit(0);
                }
                other => anyhow::bail!("unknown argument {other:?} (see --help)"),
            }
        }
        Ok(settings)
    }
}

/// One measured move.
#[derive(Debug, Clone)]
struct Row {
    size_mib: u64,
    from: &'static str,
    to: &'static str,
    archive_bytes: u64,
    snapshot: Duration,
    ship: Duration,
    restore: Duration,
    total: Duration,
    server_downtime_ms: Option<u64>,
    client_downtime: Option<Duration>,
    failed_probes: usize,
}

impl Row {
    fn ship_mib_per_second(&self) -> f64 {
        self.archive_bytes as f64 / (1u64 << 20) as f64 / self.ship.as_secs_f64().max(0.001)
    }
}

/// The table of rows, as Markdown.
fn table(rows: &[Row]) -> String {
    let mut text = String::from(
        "| volume | move | archive | snapshot | ship | ship rate | restore | whole migration | downtime (server) | downtime (client) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        text.push_str(&format!(
            "| {} MiB | {} → {} | {:.1} MiB | {:.2} s | {:.2} s | {:.0} MiB/s | {:.2} s | {:.1} s | {} | {} |\n",
            row.size_mib,
            row.from,
            row.to,
            row.archive_bytes as f64 / (1u64 << 20) as f64,
            row.snapshot.as_secs_f64(),
            row.ship.as_secs_f64(),
            row.ship_mib_per_second(),
            row.restore.as_secs_f64(),
            row.total.as_secs_f64(),
            row.server_downtime_ms.map(|ms| format!("{:.2} s", ms as f64 / 1000.0)).unwrap_or_else(|| "-".into()),
            row.client_downtime
                .map(|took| format!("{:.2} s ({} failed probes)", took.as_secs_f64(), row.failed_probes))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    text
}

/// The median of the client downtimes of the rows of `size_mib`.
fn median_downtime(rows: &[Row], size_mib: u64) -> Option<Duration> {
    let mut downtimes: Vec<Duration> =
        rows.iter().filter(|row| row.size_mib == size_mib).filter_map(|row| row.client_downtime).collect();
    downtimes.sort();
    downtimes.get(downtimes.len() / 2).copied()
}

/// Moves the application to `to` once, probing it from the client namespace.
async fn measure(
    platform: &MigrationPlatform,
    application: &Application,
    hostname: &str,
    size_mib: u64,
    from: &'static str,
    to: &'static str,
) -> anyhow::Result<Row> {
    let client = app_client(&platform.ca_pem, &[hostname])?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (stop, hostname) = (stop.clone(), hostname.to_owned());
        in_namespace(platform.topology.namespace("client")?, "probe", move || async move {
            let started = Instant::now();
            let mut attempts = Vec::new();
            // Bounded by the stop flag and one hour.
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(3600) {
                let served_by = match client.get(format!("https://{hostname}/whereami")).send().await {
                    Ok(response) if response.status() == 200 => {
                        let body = response.text().await.unwrap_or_default();
                        field(&body, "addresses").and_then(device_of)
                    }
                    _ => None,
                };
                attempts.push(Attempt { at: started.elapsed(), served_by });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(attempts)
        })?
    };
    let result = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let migration = platform.migrate(&application.id, to).await?;
        let ended = platform.wait_ended(&migration.id, Duration::from_secs(1800)).await?;
        anyhow::ensure!(
            ended.phase == MigrationPhase::Completed,
            "the move did not complete: {}",
            describe_migration(&ended)
        );
        let total = started.elapsed();
        platform.wait_served_from(hostname, to, Duration::from_secs(60)).await?;
        anyhow::Ok((ended, total))
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    let attempts = join(probe).await?;
    let (migration, total) = result?;
    let seen = moves(&attempts);
    let moved = seen.iter().find(|moved| moved.from == from && moved.to == to);
    let phase = |phase| phase_duration(&migration, phase).unwrap_or_default();
    Ok(Row {
        size_mib,
        from,
        to,
        archive_bytes: migration.bytes_total,
        snapshot: phase(MigrationPhase::Snapshot),
        ship: phase(MigrationPhase::Ship),
        restore: phase(MigrationPhase::Restore),
        total,
        server_downtime_ms: migration.downtime_ms,
        client_downtime: moved.map(|moved| moved.downtime()),
        failed_probes: moved.map(|moved| moved.failures).unwrap_or_default(),
    })
}

async fn bench(platform: &MigrationPlatform, settings: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (index, &size_mib) in settings.sizes_mib.iter().enumerate() {
        let name = format!("bench{size_mib}");
        let hostname = format!("{name}.example.test");
        // Room for the data, the records file and ext4's own overhead.
        let volume_mib = size_mib + size_mib / 5 + 64;
        step(&format!("deploying {name} with a {volume_mib} MiB volume on dev1 and filling it with {size_mib} MiB"));
        let port = 18100 + u16::try_from(index)?;
        let (application, placement) = platform.deploy(&name, &hostname, port, Some(volume_mib), &[], "dev1").await?;
        platform.wait_served_from(&hostname, "dev1", Duration::from_secs(120)).await?;
        let output = platform.curl(
            &hostname,
            &format!("/fill?bytes={}", size_mib << 20),
            &["-X", "POST", "--fail-with-body", "--max-time", "1800"],
        )?;
        anyhow::ensure!(output.success, "{output}");
        let mut at = "dev1";
        for round in 1..=settings.rounds {
            let to = if at == "dev1" { "dev2" } else { "dev1" };
            step(&format!("{name}: round {round}/{}: {at} -> {to}", settings.rounds));
            let row = measure(platform, &application, &hostname, size_mib, at, to).await?;
            eprint!(
                "{}",
                table(std::slice::from_ref(&row))
                    .lines()
                    .nth(2)
                    .map(|line| format!("    {line}\n"))
                    .unwrap_or_default()
            );
            rows.push(row);
            at = to;
        }
        // Free the disk before the next size: the placement, then the application.
        platform.client.delete::<edgible::model::Placement>(&placement.id).await?;
        platform.client.delete::<Application>(&application.id).await?;
    }
    Ok(rows)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = Settings::parse(std::env::args().skip(1))?;
    edgible_acceptance_tests::netns::require_root()?;
    let timing = MigrationTiming {
        step_timeout: Duration::from_secs(900),
        retention: Duration::from_secs(5),
        drain: Duration::from_secs(2),
    };
    let platform = MigrationPlatform::start("mbench", timing, None).await?;
    let result = bench(&platform, &settings).await;
    let rows = match result {
        Ok(rows) => rows,
        Err(error) => {
            let diagnosis = platform.diagnose();
            let kept = platform.keep();
            return Err(error.context(format!("{diagnosis}\nlogs are kept in {}", kept.display())));
        }
    };
    drop(platform);
    let mut report = format!(
        "## Migration between two devices ({}, {})\n\n{}\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        edgible_acceptance_tests::bench::machine(),
        table(&rows)
    );
    for size_mib in &settings.sizes_mib {
        if let Some(downtime) = median_downtime(&rows, *size_mib) {
            report.push_str(&format!(
                "- {size_mib} MiB: median downtime seen by the client {:.2} s\n",
                downtime.as_secs_f64()
            ));
        }
    }
    println!("{report}");
    if let Some(out) = &settings.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn settings_are_parsed_and_checked() -> anyhow::Result<()> {
        assert_eq!(Settings::parse(args(""))?, Settings { sizes_mib: vec![100, 1024], rounds: 3, out: None });
        let settings = Settings::parse(args("--sizes-mib 10,20 --rounds 2 --out x.md"))?;
        assert_eq!(settings.sizes_mib, [10, 20]);
        assert_eq!(settings.rounds, 2);
        assert_eq!(settings.out.as_deref(), Some(std::path::Path::new("x.md")));
        assert!(Settings::parse(args("--sizes-mib 0")).is_err());
        assert!(Settings::parse(args("--sizes-mib ten")).is_err());
        assert!(Settings::parse(args("--rounds 0")).is_err());
        assert!(Settings::parse(args("--rounds")).is_err());
        assert!(Settings::parse(args("--what")).is_err());
        Ok(())
    }

    #[test]
    fn rows_make_a_table_and_a_median() {
        let row = |size_mib, client_ms| Row {
            size_mib,
            from: "dev1",
            to: "dev2",
            archive_bytes: 100 << 20,
            snapshot: Duration::from_millis(500),
            ship: Duration::from_secs(2),
            restore: Duration::from_millis(800),
            total: Duration::from_secs(4),
            server_downtime_ms: Some(1500),
            client_downtime: Some(Duration::from_millis(client_ms)),
            failed_probes: 3,
        };
        let rows = [row(100, 1400), row(100, 1800), row(100, 1600), row(1024, 9000)];
        assert_eq!(rows[0].ship_mib_per_second().round(), 50.0);
        let text = table(&rows);
        assert_eq!(text.lines().count(), 2 + rows.len());
        assert!(text.contains("| 100 MiB | dev1 → dev2 | 100.0 MiB | 0.50 s | 2.00 s | 50 MiB/s | 0.80 s | 4.0 s | 1.50 s | 1.40 s (3 failed probes) |"), "{text}");
        assert_eq!(median_downtime(&rows, 100), Some(Duration::from_millis(1600)));
        assert_eq!(median_downtime(&rows, 7), None);
    }
}
