//! Moving applications: `edgible app migrate`, `edgible app migrations` and `edgible
//! migration get`.
//!
//! `app migrate` asks the server for a migration and, unless told `--no-wait`, follows it until
//! it ends: every phase the server records is shown with the time since the migration started,
//! and ship with the bytes shipped and the rate; on a terminal as one updating line, otherwise
//! (logs, CI, tests) as plain lines. It exits 0 once the application runs at the target and 1
//! with the phase and the reason when the migration failed or the wait timed out (the migration
//! goes on on the server then). Progress goes to stderr, so stdout keeps only the result.
//!
//! What is shown is decided by pure parts, tested without a server: [`MigrationTarget`] parses
//! `--to`, [`Follower`] turns successive readings of a migration into lines and a status, and
//! [`Rate`] computes the ship throughput.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use edgible::model::{
    Application, ApplicationId, Device, DeviceId, DevicePool, DevicePoolId, Migration, MigrationId, MigrationPhase,
    MigrationPhaseRecord, MigrationRequest, Name, PlacementSpec, Region, Validate,
};
use edgible::{Client, ClientError};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use crate::Context;
use crate::output::{Details, Format, Table, print_json};
use crate::placements::describe_placement;
use crate::progress::parse_duration;
use crate::resolve::{ResolveError, resolve};

/// How often a migration is read while following it.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Without a terminal, ship progress is printed at most this often.
const PLAIN_SHIP_INTERVAL: Duration = Duration::from_secs(1);

/// The span of time the ship rate is computed over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

const MIB: f64 = 1024.0 * 1024.0;

/// `edgible migration ...`.
#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// Show a migration: where from and to, its phases with their durations, bytes shipped,
    /// downtime, and why it failed.
    Get {
        /// The migration's id (`edgible app migrations NAME` lists them).
        id: MigrationId,
    },
}

/// `edgible app migrate NAME --to TARGET`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The application (name or id).
    application: String,
    /// Where to move it: a device (name or id), `cloud:REGION` or `cloud-pool:POOL` (a pool
    /// name or id).
    #[arg(long, value_name = "TARGET")]
    to: MigrationTarget,
    /// How long to follow the migration before giving up (seconds, or with a unit: 90s, 15m).
    /// The migration itself goes on; its own steps have deadlines on the server.
    #[arg(long, value_name = "SECONDS", default_value = "900", value_parser = parse_duration)]
    timeout: Duration,
    /// Start the migration and return at once, printing its id.
    #[arg(long)]
    no_wait: bool,
}

/// Where `--to` says the application should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationTarget {
    /// A device of the organization, by name or id.
    Device(String),
    /// Whichever operator cloud host the scheduler picks in the region.
    CloudRegion(Region),
    /// Whichever host the scheduler picks in this cloud pool (name or id).
    CloudPool(String),
}

const TARGET_FORMS: &str = "a device name or id, cloud:REGION or cloud-pool:POOL";

impl FromStr for MigrationTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(region) = text.strip_prefix("cloud:") {
            return region
                .parse::<Region>()
                .map(MigrationTarget::CloudRegion)
                .map_err(|error| format!("region {region:?}: {}", error.message));
        }
        if let Some(pool) = text.strip_prefix("cloud-pool:") {
            check_reference::<DevicePoolId>(pool, "pool")?;
            return Ok(MigrationTarget::CloudPool(pool.to_owned()));
        }
        if text.contains(':') {
            return Err(format!("{text:?} is not a target: give {TARGET_FORMS}"));
        }
        check_reference::<DeviceId>(text, "device")?;
        Ok(MigrationTarget::Device(text.to_owned()))
    }
}

/// Accepts what can name an object: a valid name or an id.
fn check_reference<Id: FromStr>(reference: &str, kind: &str) -> Result<(), String> {
    if reference.is_empty() {
        return Err(format!("the {kind} is missing: give {TARGET_FORMS}"));
    }
    if reference.parse::<Id>().is_ok() {
        return Ok(());
    }
    reference.parse::<Name>().map(drop).map_err(|error| format!("{kind} {reference:?}: {}", error.message))
}

/// The placement a target stands for, looked up on the server.
async fn placement_spec(
    client: &Client,
    application_id: ApplicationId,
    target: &MigrationTarget,
) -> anyhow::Result<PlacementSpec> {
    let spec = match target {
        MigrationTarget::Device(reference) => {
            let device = resolve::<Device>(client, reference).await?;
            PlacementSpec::ServingDevice { application_id, device_id: device.id }
        }
        MigrationTarget::CloudRegion(region) => {
            PlacementSpec::Cloud { application_id, pool_id: None, region: Some(region.clone()) }
        }
        MigrationTarget::CloudPool(reference) => {
            let pool_id = match resolve::<DevicePool>(client, reference).await {
                Ok(pool) => pool.id,
                // An operator's cloud pool belongs to another organization, which the key
                // cannot read: its id is passed on for the server to check.
                Err(ResolveError::NotFound { .. }) if reference.parse::<DevicePoolId>().is_ok() => {
                    reference.parse::<DevicePoolId>().map_err(|error| anyhow::anyhow!(error.message))?
                }
                Err(ResolveError::NotFound { .. }) => anyhow::bail!(
                    "no device pool is named {reference:?}; an operator's cloud pool is given by its id \
                     (cloud-pool:ID)"
                ),
                Err(error) => return Err(error.into()),
            };
            PlacementSpec::Cloud { application_id, pool_id: Some(pool_id), region: None }
        }
    };
    spec.validate().context("invalid target")?;
    Ok(spec)
}

/// `edgible app migrate`.
pub async fn migrate(client: &Client, args: MigrateArgs, context: &Context) -> anyhow::Result<()> {
    let application = resolve::<Application>(client, &args.application).await?;
    let name = application.spec.name.clone();
    let to = placement_spec(client, application.id, &args.to).await?;
    // Read before the migration starts: a failure here must not leave one running unseen.
    let devices = client.list_all::<Device>().await.context("listing devices")?;
    let started = client
        .create_migration(&application.id, &MigrationRequest { to })
        .await
        .with_context(|| format!("migrating application {name}"))?;
    let route = format!("{} to {}", device_name(started.source, &devices), device_name(started.target, &devices));
    if args.no_wait {
        match context.format {
            Format::Json => print_json(&started)?,
            Format::Table => println!(
                "Started migration {} of {name} from {route}; `edgible migration get {}` follows it.",
                started.id, started.id
            ),
        }
        return Ok(());
    }
    let kind = if started.stateful { "with its volumes" } else { "stateless" };
    eprintln!("Migration {} of {name} from {route} ({kind}).", started.id);
    let ended = follow(client, started, args.timeout).await?;
    if context.format == Format::Json {
        print_json(&ended)?;
    }
    match ended.phase {
        MigrationPhase::Completed => {
            if context.format == Format::Table {
                println!("{}", completion_summary(&name, &ended, &devices));
            }
            Ok(())
        }
        _ => anyhow::bail!("{}", failure_summary(&name, &ended, &devices)),
    }
}

/// What a completed migration achieved, in one sentence.
fn completion_summary(name: &Name, migration: &Migration, devices: &[Device]) -> String {
    let took = seconds(total_duration(migration));
    let target = device_name(migration.target, devices);
    match (migration.stateful, migration.downtime_ms) {
        (true, Some(downtime)) => {
            format!("Migrated {name} to {target} in {took}; downtime {:.3}s.", downtime as f64 / 1000.0)
        }
        (true, None) => format!("Migrated {name} to {target} in {took}."),
        (false, _) => format!("Migrated {name} to {target} in {took} with no downtime (stateless)."),
    }
}

/// Why a migration failed and where the application runs now, in one sentence.
pub fn failure_summary(name: &Name, migration: &Migration, devices: &[Device]) -> String {
    let source = device_name(migration.source, devices);
    let resumed = if migration.rolled_back {
        format!("{name} runs on {source} again")
    } else {
        format!("{name} stays on {source}, which resumes it as soon as it is online")
    };
    format!("migration {} failed {}; {resumed}", migration.id, failure_text(migration))
}

/// `in PHASE: REASON`, however the server put the reason (`failed in PHASE: ...`, `PHASE:
/// ...` or the bare reason), so that the phase is named exactly once.
fn failure_text(migration: &Migration) -> String {
    let reason = migration.failure.as_deref().unwrap_or("without a reason given");
    let reason = reason.strip_prefix("failed ").unwrap_or(reason);
    let Some(phase) = migration.failed_phase.map(MigrationPhase::as_str) else {
        return if reason.starts_with("in ") { reason.to_owned() } else { format!("in an unknown phase: {reason}") };
    };
    if reason.starts_with(&format!("in {phase}")) {
        reason.to_owned()
    } else if reason.starts_with(&format!("{phase}: ")) {
        format!("in {reason}")
    } else {
        format!("in {phase}: {reason}")
    }
}

/// Reads the migration until it ends or `timeout` passes, showing its progress on stderr.
/// Errors the server may recover from (it restarts, a proxy answers 502) are retried until the
/// deadline: a server restart does not end a migration.
pub async fn follow(client: &Client, mut migration: Migration, timeout: Duration) -> anyhow::Result<Migration> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut follower = Follower::new();
    let display = Display::new();
    let mut unreachable: Option<String> = None;
    loop {
        display.show(&follower.observe(&migration, start.elapsed()));
        if migration.phase.is_final() {
            display.finish();
            return Ok(migration);
        }
        if Instant::now() >= deadline {
            display.abandon();
            anyhow::bail!(
                "gave up after {} waiting for migration {} (now in {}); it goes on on the server: \
                 `edgible migration get {}` shows how it ends",
                seconds(timeout),
                migration.id,
                migration.phase.as_str(),
                migration.id
            );
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now()))).await;
        match client.migration(&migration.id).await {
            Ok(read) => {
                migration = read;
                unreachable = None;
            }
            Err(error) if error.is_retryable() => {
                let text = error.to_string();
                if unreachable.as_ref() != Some(&text) {
                    display.line(&format!("cannot read the migration, retrying: {text}"));
                    unreachable = Some(text);
                }
            }
            Err(error) => {
                display.abandon();
                return Err(reading_failed(error, migration.id));
            }
        }
    }
}

fn reading_failed(error: ClientError, id: MigrationId) -> anyhow::Error {
    anyhow::Error::new(error).context(format!("reading migration {id}"))
}

/// What one reading of a migration adds to the display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Lines to print once: one per phase entered since the last reading.
    pub lines: Vec<String>,
    /// The current state for the updating line of a terminal.
    pub status: String,
    /// A ship progress line for plain output, when one is due.
    pub ship: Option<String>,
}

/// Turns successive readings of one migration into what to show.
#[derive(Debug)]
pub struct Follower {
    /// How many phase records have been shown.
    shown: usize,
    rate: Rate,
    /// When the last plain ship line was due, and the bytes it showed.
    last_ship: Option<(Duration, u64)>,
}

impl Follower {
    pub fn new() -> Self {
        Self { shown: 0, rate: Rate::new(RATE_WINDOW), last_ship: None }
    }

    /// `elapsed` is the time since following started, by the local clock: the rate is
    /// measured with it.
    pub fn observe(&mut self, migration: &Migration, elapsed: Duration) -> Observation {
        let lines = migration.phases.iter().skip(self.shown).map(|record| phase_line(migration, record)).collect();
        self.shown = self.shown.max(migration.phases.len());
        if migration.phase != MigrationPhase::Ship {
            let status = format!("{} ({} elapsed)", migration.phase.as_str(), seconds(elapsed));
            return Observation { lines, status, ship: None };
        }
        let shipped = migration.bytes_shipped;
        self.rate.record(elapsed, shipped);
        let status = ship_progress(shipped, migration.bytes_total, self.rate.bytes_per_second());
        let due = match self.last_ship {
            None => true,
            Some((at, bytes)) => {
                bytes != shipped
                    && (elapsed >= at + PLAIN_SHIP_INTERVAL
                        || (migration.bytes_total > 0 && shipped >= migration.bytes_total))
            }
        };
        let ship = due.then(|| {
            self.last_ship = Some((elapsed, shipped));
            status.clone()
        });
        Observation { lines, status, ship }
    }
}

/// `[  1.2s] ship`: a phase entered, with the time since the migration started; the two ends
/// say how it ended.
fn phase_line(migration: &Migration, record: &MigrationPhaseRecord) -> String {
    let at = (record.started_at - migration.created_at).to_std().unwrap_or_default();
    let text = match record.phase {
        MigrationPhase::Failed => format!("failed {}", failure_text(migration)),
        MigrationPhase::Completed => match (migration.stateful, migration.downtime_ms) {
            (true, Some(downtime)) => format!("completed; downtime {:.3}s", downtime as f64 / 1000.0),
            _ => "completed".to_owned(),
        },
        phase => phase.as_str().to_owned(),
    };
    format!("[{:>7}] {text}", seconds(at))
}

/// `ship 45.2/100.0 MiB 38.1 MiB/s`; the total and the rate only once known.
pub fn ship_progress(shipped: u64, total: u64, rate: Option<f64>) -> String {
    let mut text = if total > 0 {
        format!("ship {:.1}/{:.1} MiB", shipped as f64 / MIB, total as f64 / MIB)
    } else {
        format!("ship {:.1} MiB", shipped as f64 / MIB)
    };
    if let Some(rate) = rate {
        text.push_str(&format!(" {:.1} MiB/s", rate / MIB));
    }
    text
}

/// Throughput over a sliding window of (time, cumulative bytes) samples.
#[derive(Debug)]
pub struct Rate {
    window: Duration,
    samples: VecDeque<(Duration, u64)>,
}

impl Rate {
    pub fn new(window: Duration) -> Self {
        Self { window, samples: VecDeque::new() }
    }

    /// Adds a sample. A count that went down (a ship restarted from the beginning) starts the
    /// measurement over; samples older than the window are dropped, except the newest of them,
    /// which is where the window starts.
    pub fn record(&mut self, at: Duration, bytes: u64) {
        if self.samples.back().is_some_and(|&(last_at, last_bytes)| bytes < last_bytes || at < last_at) {
            self.samples.clear();
        }
        self.samples.push_back((at, bytes));
        while self.samples.len() > 2 && self.samples[1].0 + self.window <= at {
            self.samples.pop_front();
        }
    }

    /// Bytes per second, once two samples lie apart in time.
    pub fn bytes_per_second(&self) -> Option<f64> {
        let (first_at, first_bytes) = *self.samples.front()?;
        let (last_at, last_bytes) = *self.samples.back()?;
        let span = last_at.checked_sub(first_at)?.as_secs_f64();
        (span > 0.0).then(|| (last_bytes - first_bytes) as f64 / span)
    }
}

/// Where progress goes: an updating line on a terminal, plain lines otherwise.
enum Display {
    Bar(ProgressBar),
    Lines,
}

impl Display {
    fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Display::Lines;
        }
        let bar = ProgressBar::new_spinner();
        let style =
            ProgressStyle::with_template("{spinner} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        Display::Bar(bar)
    }

    fn show(&self, observation: &Observation) {
        match self {
            Display::Bar(bar) => {
                for line in &observation.lines {
                    bar.println(line);
                }
                bar.set_message(observation.status.clone());
            }
            Display::Lines => {
                for line in &observation.lines {
                    eprintln!("{line}");
                }
                if let Some(ship) = &observation.ship {
                    eprintln!("{:>9} {ship}", "");
                }
            }
        }
    }

    fn line(&self, line: &str) {
        match self {
            Display::Bar(bar) => bar.println(line),
            Display::Lines => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }

    fn abandon(&self) {
        if let Display::Bar(bar) = self {
            bar.abandon();
        }
    }
}

/// `edgible app migrations NAME`.
pub async fn list(client: &Client, reference: &str, context: &Context) -> anyhow::Result<()> {
    let application = resolve::<Application>(client, reference).await?;
    let name = &application.spec.name;
    let migrations = client
        .application_migrations(&application.id)
        .await
        .with_context(|| format!("listing the migrations of application {name}"))?;
    match context.format {
        Format::Json => print_json(&migrations)?,
        Format::Table => {
            let devices = client.list_all::<Device>().await.context("listing devices")?;
            let now = chrono::Utc::now();
            let mut table = Table::new(&["ID", "FROM", "TO", "PHASE", "STARTED", "DURATION", "FAILURE"]);
            for migration in &migrations {
                let duration = if migration.phase.is_final() {
                    seconds(total_duration(migration))
                } else {
                    format!("{} so far", seconds((now - migration.created_at).to_std().unwrap_or_default()))
                };
                let failure = match migration.phase {
                    MigrationPhase::Failed => failure_text(migration).trim_start_matches("in ").to_owned(),
                    _ => "-".to_owned(),
                };
                table.row(vec![
                    migration.id.to_string(),
                    device_name(migration.source, &devices),
                    device_name(migration.target, &devices),
                    migration.phase.as_str().to_owned(),
                    migration.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    duration,
                    failure,
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

pub async fn run(command: MigrationCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        MigrationCommand::Get { id } => {
            let migration = client.migration(&id).await.map_err(|error| reading_failed(error, id))?;
            match context.format {
                Format::Json => print_json(&migration)?,
                Format::Table => {
                    let (devices, pools) =
                        tokio::try_join!(client.list_all::<Device>(), client.list_all::<DevicePool>())
                            .context("looking up the migration's devices")?;
                    let application = match client.get::<Application>(&migration.application_id).await {
                        Ok(application) => format!("{} ({})", application.spec.name, application.id),
                        Err(_) => migration.application_id.to_string(),
                    };
                    let mut details = Details::new();
                    details
                        .field("id", migration.id)
                        .field("application", application)
                        .field("from", device_name(migration.source, &devices))
                        .field("to", device_name(migration.target, &devices))
                        .field("placement", describe_placement(&migration.to, &devices, &pools))
                        .field("stateful", if migration.stateful { "yes (volumes move)" } else { "no" })
                        .field("phase", migration.phase.as_str())
                        .field("phases", phase_durations(&migration));
                    if migration.stateful {
                        details.field("shipped", ship_progress(migration.bytes_shipped, migration.bytes_total, None));
                    }
                    if let Some(downtime) = migration.downtime_ms {
                        details.field("downtime", format!("{:.3}s", downtime as f64 / 1000.0));
                    }
                    if migration.phase == MigrationPhase::Failed {
                        let rolled_back = if migration.rolled_back {
                            "yes: the source serves the application again"
                        } else {
                            "not yet: the source resumes the application once it is online"
                        };
                        details.field("failure", failure_text(&migration)).field("rolled back", rolled_back);
                    }
                    details
                        .field("started", migration.created_at.to_rfc3339())
                        .field("updated", migration.updated_at.to_rfc3339())
                        .print();
                }
            }
        }
    }
    Ok(())
}

/// `preflight 0.2s, quiesce 0.1s, ..., completed`: each phase with how long it took (the
/// current one: so far).
fn phase_durations(migration: &Migration) -> String {
    let now = chrono::Utc::now();
    let parts: Vec<String> = migration
        .phases
        .iter()
        .map(|record| {
            if record.phase.is_final() {
                return record.phase.as_str().to_owned();
            }
            let end = record.finished_at.unwrap_or(now);
            let took = seconds((end - record.started_at).to_std().unwrap_or_default());
            match record.finished_at {
                Some(_) => format!("{} {took}", record.phase.as_str()),
                None => format!("{} {took} so far", record.phase.as_str()),
            }
        })
        .collect();
    if parts.is_empty() { "-".to_owned() } else { parts.join(", ") }
}

/// From the request to the end: the start of the final phase record (or the last update).
fn total_duration(migration: &Migration) -> Duration {
    let end = migration
        .phases
        .iter()
        .rev()
        .find(|record| record.phase.is_final())
        .map(|record| record.started_at)
        .unwrap_or(migration.updated_at);
    (end - migration.created_at).to_std().unwrap_or_default()
}

/// A device by name when the organization can read it, else `cloud host ID` (an operator's
/// host).
fn device_name(id: DeviceId, devices: &[Device]) -> String {
    match devices.iter().find(|device| device.id == id) {
        Some(device) => device.spec.name.to_string(),
        None => format!("cloud host {id}"),
    }
}

/// `1.2s`.
fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeDelta, Utc};
    use edgible::model::{OrganizationId, PlacementId};

    use super::*;

    #[test]
    fn targets_are_devices_cloud_regions_or_cloud_pools() {
        assert_eq!("dev2".parse(), Ok(MigrationTarget::Device("dev2".into())));
        let id = DeviceId::new().to_string();
        assert_eq!(id.parse(), Ok(MigrationTarget::Device(id.clone())));
        assert_eq!("cloud:eu-west".parse(), Ok(MigrationTarget::CloudRegion("eu-west".parse().unwrap())));
        assert_eq!("cloud-pool:eu-hosts".parse(), Ok(MigrationTarget::CloudPool("eu-hosts".into())));
        let pool = DevicePoolId::new().to_string();
        assert_eq!(format!("cloud-pool:{pool}").parse(), Ok(MigrationTarget::CloudPool(pool)));

        for (text, expected) in [
            ("cloud:", "region \"\""),
            ("cloud:EU", "region \"EU\""),
            ("cloud-pool:", "the pool is missing"),
            ("cloud-pool:Bad Pool", "pool \"Bad Pool\""),
            ("host:dev2", "is not a target"),
            ("", "the device is missing"),
            ("Dev2", "device \"Dev2\""),
        ] {
            let error = text.parse::<MigrationTarget>().expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_rate_follows_a_sliding_window() {
        let mut rate = Rate::new(Duration::from_secs(5));
        assert_eq!(rate.bytes_per_second(), None);
        rate.record(Duration::from_secs(0), 0);
        assert_eq!(rate.bytes_per_second(), None, "one sample says nothing");
        rate.record(Duration::from_secs(1), 10 * 1024 * 1024);
        assert_eq!(rate.bytes_per_second(), Some(10.0 * MIB));
        rate.record(Duration::from_secs(2), 30 * 1024 * 1024);
        assert_eq!(rate.bytes_per_second(), Some(15.0 * MIB), "30 MiB in 2 s");
        // Only the last five seconds count: a stall brings the rate down.
        for second in 3..=8 {
            rate.record(Duration::from_secs(second), 30 * 1024 * 1024);
        }
        assert_eq!(rate.bytes_per_second(), Some(0.0));
        // A ship that starts over (bytes went down) starts the measurement over.
        rate.record(Duration::from_secs(9), 1024);
        assert_eq!(rate.bytes_per_second(), None);
        rate.record(Duration::from_millis(9500), 1024 + 512 * 1024);
        assert_eq!(rate.bytes_per_second(), Some(MIB));
    }

    #[test]
    fn ship_progress_shows_what_is_known() {
        assert_eq!(ship_progress(0, 0, None), "ship 0.0 MiB");
        let (shipped, total) = (47_395_635, 104_857_600);
        assert_eq!(ship_progress(shipped, total, None), "ship 45.2/100.0 MiB");
        assert_eq!(ship_progress(shipped, total, Some(38.1 * MIB)), "ship 45.2/100.0 MiB 38.1 MiB/s");
    }

    fn at(start: DateTime<Utc>, millis: i64) -> DateTime<Utc> {
        start + TimeDelta::milliseconds(millis)
    }

    fn migration(phases: &[(MigrationPhase, i64)]) -> Migration {
        let created_at: DateTime<Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        let phases: Vec<MigrationPhaseRecord> = phases
            .iter()
            .enumerate()
            .map(|(index, &(phase, started))| MigrationPhaseRecord {
                phase,
                started_at: at(created_at, started),
                finished_at: phases.get(index + 1).map(|&(_, next)| at(created_at, next)),
            })
            .collect();
        let application_id = ApplicationId::new();
        let target = DeviceId::new();
        Migration {
            id: MigrationId::new(),
            organization_id: OrganizationId::new(),
            application_id,
            placement_id: PlacementId::new(),
            source: DeviceId::new(),
            target,
            to: PlacementSpec::ServingDevice { application_id, device_id: target },
            stateful: true,
            phase: phases.last().map(|record| record.phase).unwrap_or(MigrationPhase::Preflight),
            phases,
            failure: None,
            failed_phase: None,
            rolled_back: false,
            bytes_total: 0,
            bytes_shipped: 0,
            downtime_ms: None,
            created_at,
            updated_at: created_at,
        }
    }

    #[test]
    fn each_phase_is_shown_once_with_the_time_since_the_start() {
        use MigrationPhase::*;
        let mut follower = Follower::new();
        let first = follower.observe(&migration(&[(Preflight, 0)]), Duration::from_millis(100));
        assert_eq!(first.lines, ["[   0.0s] preflight"]);
        assert_eq!(first.status, "preflight (0.1s elapsed)");
        assert_eq!(first.ship, None);
        let again = follower.observe(&migration(&[(Preflight, 0)]), Duration::from_millis(400));
        assert!(again.lines.is_empty(), "nothing new");
        // Phases passed between two readings are shown too, in order.
        let later =
            follower.observe(&migration(&[(Preflight, 0), (Quiesce, 300), (Snapshot, 1250)]), Duration::from_secs(2));
        assert_eq!(later.lines, ["[   0.3s] quiesce", "[   1.2s] snapshot"]);
    }

    #[test]
    fn ship_shows_bytes_and_rate_and_plain_lines_at_most_every_second() {
        use MigrationPhase::*;
        let mut follower = Follower::new();
        let mut shipping = migration(&[(Preflight, 0), (Quiesce, 100), (Snapshot, 200), (Ship, 900)]);
        shipping.bytes_total = 100 * 1024 * 1024;
        let mut read = |shipped_mib: u64, millis: u64| {
            shipping.bytes_shipped = shipped_mib * 1024 * 1024;
            follower.observe(&shipping, Duration::from_millis(millis))
        };
        let first = read(0, 1000);
        assert_eq!(first.lines.len(), 4);
        assert_eq!(first.status, "ship 0.0/100.0 MiB");
        assert_eq!(first.ship.as_deref(), Some("ship 0.0/100.0 MiB"), "the first reading is shown");
        let soon = read(10, 1250);
        assert_eq!(soon.status, "ship 10.0/100.0 MiB 40.0 MiB/s", "the terminal line follows every reading");
        assert_eq!(soon.ship, None, "plain lines wait a second");
        let second = read(40, 2000);
        assert_eq!(second.ship.as_deref(), Some("ship 40.0/100.0 MiB 40.0 MiB/s"));
        let stalled = read(40, 3500);
        assert_eq!(stalled.ship, None, "no line without progress");
        let done = read(100, 3600);
        assert_eq!(
            done.ship.as_deref().map(|ship| ship.starts_with("ship 100.0/100.0 MiB")),
            Some(true),
            "the end is shown at once"
        );
    }

    #[test]
    fn the_ends_say_how_it_went() {
        use MigrationPhase::*;
        let mut completed =
            migration(&[(Preflight, 0), (Quiesce, 100), (Restore, 1500), (Cutover, 2400), (Completed, 2500)]);
        completed.downtime_ms = Some(2300);
        let observation = Follower::new().observe(&completed, Duration::from_secs(3));
        assert_eq!(observation.lines.last().map(String::as_str), Some("[   2.5s] completed; downtime 2.300s"));
        let name: Name = "web".parse().unwrap();
        let target = Device {
            id: completed.target,
            ..serde_json::from_value(serde_json::json!({
                "id": DeviceId::new(), "organization_id": OrganizationId::new(), "revision": 1,
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
                "spec": {"name": "dev2", "pool_id": DevicePoolId::new()},
                "status": {"tunnel_address": "100.96.0.2", "state": "online"}
            }))
            .unwrap()
        };
        assert_eq!(completion_summary(&name, &completed, &[target]), "Migrated web to dev2 in 2.5s; downtime 2.300s.");
        completed.stateful = false;
        let summary = completion_summary(&name, &completed, &[]);
        assert!(summary.ends_with("in 2.5s with no downtime (stateless)."), "{summary}");
        assert!(summary.contains("cloud host "), "an operator's host by id: {summary}");

        let mut failed = migration(&[(Preflight, 0), (Quiesce, 100), (Snapshot, 200), (Ship, 300), (Failed, 4000)]);
        failed.failed_phase = Some(Ship);
        failed.failure = Some("the target went offline".into());
        let observation = Follower::new().observe(&failed, Duration::from_secs(4));
        assert_eq!(
            observation.lines.last().map(String::as_str),
            Some("[   4.0s] failed in ship: the target went offline")
        );
        let summary = failure_summary(&name, &failed, &[]);
        assert!(summary.contains("failed in ship: the target went offline; web stays on cloud host"), "{summary}");
        assert!(summary.ends_with("which resumes it as soon as it is online"), "{summary}");
        failed.rolled_back = true;
        failed.failure = Some("ship: checksum mismatch".into());
        let summary = failure_summary(&name, &failed, &[]);
        assert!(summary.contains("failed in ship: checksum mismatch; web runs on cloud host"), "{summary}");
        assert!(summary.ends_with("again"), "{summary}");
        // However the server words it, the phase is named once.
        failed.failure = Some("failed in ship: ship on device d1: connection reset".into());
        assert_eq!(failure_text(&failed), "in ship: ship on device d1: connection reset");
        failed.failed_phase = None;
        failed.failure = Some("no reason".into());
        assert_eq!(failure_text(&failed), "in an unknown phase: no reason");
    }

    #[test]
    fn durations_of_finished_migrations_end_at_the_final_phase() {
        use MigrationPhase::*;
        let mut completed = migration(&[(Preflight, 0), (Restore, 500), (Cutover, 1900), (Completed, 2000)]);
        completed.updated_at = at(completed.created_at, 90_000);
        assert_eq!(total_duration(&completed), Duration::from_secs(2), "not the later update (release)");
        assert_eq!(phase_durations(&completed), "preflight 0.5s, restore 1.4s, cutover 0.1s, completed");
    }
}
