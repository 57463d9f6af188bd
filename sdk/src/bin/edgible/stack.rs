//! `edgible stack diff|deploy FILE`: read a stack file, plan against what the server holds
//! (see [`crate::plan`]), apply the plan with a progress display, and wait until the devices
//! run it (see [`crate::progress`]), following first the migrations of applications it moved
//! (see [`crate::migrations`]).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use edgible::model::{Application, ApplicationId, Device, DevicePool, Name, Placement};
use edgible::stack::Stack;
use edgible::{Client, ClientError};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Context;
use crate::output::{Format, print_json};
use crate::plan::{Change, ChangeView, Inventory, Summary, plan};
use crate::progress::{self, parse_duration};

#[derive(Debug, Subcommand)]
pub enum StackCommand {
    /// Show what `deploy` would create or update, without changing anything.
    Diff {
        /// The stack file (YAML).
        file: PathBuf,
    },
    /// Create or update the applications and placements a stack file declares, then show
    /// each application's progress until it runs on its device.
    Deploy {
        /// The stack file (YAML).
        file: PathBuf,
        /// Return once the server holds the stack, without waiting for devices to run it.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the applications to run: 90s, 5m, 1h (seconds without a unit).
        #[arg(long, default_value = "5m", value_parser = parse_duration, conflicts_with = "no_wait")]
        timeout: Duration,
    },
}

pub async fn run(command: StackCommand, context: &Context) -> anyhow::Result<()> {
    match command {
        StackCommand::Diff { file } => {
            let client = context.client()?;
            let (_, changes) = prepare(&client, &file).await?;
            match context.format {
                Format::Json => print_json(&changes.iter().map(Change::view).collect::<Vec<ChangeView>>())?,
                Format::Table => {
                    print_plan(&changes);
                    let summary = Summary::of(&changes);
                    if summary.writes() == 0 {
                        println!("No changes: {} is up to date.", file.display());
                    } else {
                        println!(
                            "Plan: {} to create, {} to update, {} unchanged.",
                            summary.create, summary.update, summary.unchanged
                        );
                    }
                }
            }
        }
        StackCommand::Deploy { file, no_wait, timeout } => {
            let client = context.client()?;
            let (stack, changes) = prepare(&client, &file).await?;
            let summary = Summary::of(&changes);
            if context.format == Format::Table {
                print_plan(&changes);
            }
            if summary.writes() > 0 {
                apply(&client, &changes).await?;
            }
            match context.format {
                Format::Json => print_json(&changes.iter().map(Change::view).collect::<Vec<ChangeView>>())?,
                Format::Table if summary.writes() == 0 => {
                    println!("No changes: {} is up to date.", file.display());
                }
                Format::Table => println!(
                    "Deployed {}: {} created, {} updated, {} unchanged.",
                    file.display(),
                    summary.create,
                    summary.update,
                    summary.unchanged
                ),
            }
            if !no_wait {
                wait_until_running(&client, &stack, timeout).await?;
            }
        }
    }
    Ok(())
}

/// Shows each application's progress until it runs on its device; fails when one fails or
/// the timeout passes.
async fn wait_until_running(client: &Client, stack: &Stack, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let names: Vec<Name> = stack.applications.iter().map(|application| application.spec.name.clone()).collect();
    let read = || async {
        tokio::try_join!(client.list_all::<Application>(), client.list_all::<Placement>(), client.list_all::<Device>(),)
            .context("reading the deployed applications, placements and devices")
    };
    let (applications, placements, devices) = read().await?;
    // A placement the deploy moved to another device is being migrated: follow each move to
    // its end first (a failed one leaves the application where it was, and fails the deploy).
    let mut moved = false;
    for application in applications.iter().filter(|application| names.contains(&application.spec.name)) {
        let placement = placements.iter().find(|placement| placement.spec.application_id() == application.id);
        let Some(migration_id) = placement.and_then(|placement| placement.migration_id) else { continue };
        let name = &application.spec.name;
        let migration = client.migration(&migration_id).await.with_context(|| format!("reading the move of {name}"))?;
        eprintln!("{name}: moving ({migration_id})");
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ended = crate::migrations::follow(client, migration, remaining).await?;
        if ended.phase != edgible::model::MigrationPhase::Completed {
            anyhow::bail!("{}", crate::migrations::failure_summary(name, &ended, &devices));
        }
        moved = true;
    }
    let (applications, placements, devices) = if moved { read().await? } else { (applications, placements, devices) };
    let (targets, skipped) = progress::targets(&names, &applications, &placements, &devices);
    for skip in &skipped {
        eprintln!("{}: not waiting, {}", skip.name, skip.reason);
    }
    if targets.is_empty() {
        return Ok(());
    }
    progress::wait(client, &targets, deadline.saturating_duration_since(tokio::time::Instant::now())).await?;
    match targets.len() {
        1 => eprintln!("The application runs on its device."),
        count => eprintln!("All {count} applications run on their devices."),
    }
    Ok(())
}

/// Reads and checks the stack file and plans it against the server's objects. Nothing is
/// written here, so any error leaves the server as it was.
async fn prepare(client: &Client, file: &Path) -> anyhow::Result<(Stack, Vec<Change>)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let stack = Stack::parse(&text).with_context(|| format!("invalid stack file {}", file.display()))?;
    let (applications, placements, devices, pools) = tokio::try_join!(
        client.list_all::<Application>(),
        client.list_all::<Placement>(),
        client.list_all::<Device>(),
        client.list_all::<DevicePool>(),
    )
    .context("reading the organization's applications, placements, devices and pools")?;
    let inventory = Inventory { applications, placements, devices, pools };
    let changes = plan(&stack, &text, &inventory).with_context(|| format!("cannot deploy {}", file.display()))?;
    Ok((stack, changes))
}

fn print_plan(changes: &[Change]) {
    for change in changes {
        println!("{change}");
    }
}

/// Applies the writes of the plan in order. Updates send the revision read when planning, so
/// an object someone changed in between is not overwritten.
async fn apply(client: &Client, changes: &[Change]) -> anyhow::Result<()> {
    let total = changes.iter().filter(|change| change.is_write()).count();
    let progress = Progress::new(total);
    // The id of every application of the stack, for placing it.
    let mut ids: BTreeMap<Name, ApplicationId> = BTreeMap::new();
    let mut applied = 0;
    for change in changes {
        if change.is_write() {
            progress.start(change);
        }
        let result = apply_one(client, change, &mut ids).await;
        if let Err(error) = result {
            progress.fail();
            let error = describe(error);
            return Err(
                error.context(format!("{} failed after {applied} of {total} changes were applied", change.doing()))
            );
        }
        if change.is_write() {
            applied += 1;
            progress.finish_one(change, applied, total);
        }
    }
    progress.finish();
    Ok(())
}

async fn apply_one(
    client: &Client,
    change: &Change,
    ids: &mut BTreeMap<Name, ApplicationId>,
) -> Result<(), ApplyError> {
    match change {
        Change::CreateApplication { spec } => {
            let created: Application = client.create::<Application>(spec).await?;
            ids.insert(spec.name.clone(), created.id);
        }
        Change::UpdateApplication { id, revision, spec, .. } => {
            client.update::<Application>(id, Some(*revision), spec).await?;
            ids.insert(spec.name.clone(), *id);
        }
        Change::KeepApplication { id, name } => {
            ids.insert(name.clone(), *id);
        }
        Change::CreatePlacement { application, target } => {
            let application_id = *ids.get(application).ok_or_else(|| ApplyError::Unordered(application.clone()))?;
            client.create::<Placement>(&target.spec(application_id)).await?;
        }
        Change::UpdatePlacement { id, revision, application, target, .. } => {
            let application_id = *ids.get(application).ok_or_else(|| ApplyError::Unordered(application.clone()))?;
            client.update::<Placement>(id, Some(*revision), &target.spec(application_id)).await?;
        }
        Change::KeepPlacement { .. } => {}
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A plan places an application before its own change; `plan` never builds one.
    #[error("the plan places application {0} before creating it")]
    Unordered(Name),
}

/// Adds the advice a user needs to the errors that have one.
fn describe(error: ApplyError) -> anyhow::Error {
    let stale = matches!(
        &error,
        ApplyError::Client(ClientError::Api { body: Some(body), .. }) if body.error.code == "stale_revision"
    );
    let error = anyhow::Error::new(error);
    if stale {
        error.context("it changed on the server since the plan was made; run the deploy again to plan anew")
    } else {
        error
    }
}

/// Progress on stderr: a bar on a terminal, one line per change otherwise (logs, CI, tests).
enum Progress {
    Bar(ProgressBar),
    Lines,
}

impl Progress {
    fn new(total: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        let bar = ProgressBar::new(total as u64);
        let style = ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress::Bar(bar)
    }

    fn start(&self, change: &Change) {
        if let Progress::Bar(bar) = self {
            bar.set_message(change.doing());
        }
    }

    fn finish_one(&self, change: &Change, applied: usize, total: usize) {
        match self {
            Progress::Bar(bar) => {
                bar.println(change.done());
                bar.inc(1);
            }
            Progress::Lines => eprintln!("[{applied}/{total}] {}", change.done()),
        }
    }

    fn fail(&self) {
        if let Progress::Bar(bar) = self {
            bar.abandon();
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
