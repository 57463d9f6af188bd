//! What agents report, for people: `edgible app status`, `edgible logs`, `edgible events`.

use std::collections::BTreeMap;
use std::io::Write as _;

use anyhow::Context as _;
use clap::Args;
use edgible::Client;
use edgible::client::EventQuery;
use edgible::model::{
    Application, ApplicationId, ApplicationPhase, ApplicationStatus, Device, DeviceId, LogEntry, LogStream,
};
use futures::StreamExt;

use crate::Context;
use crate::output::{Details, Format, Table, optional, print_json};
use crate::resolve::resolve;

pub fn phase_name(phase: ApplicationPhase) -> &'static str {
    match phase {
        ApplicationPhase::Pending => "pending",
        ApplicationPhase::Starting => "starting",
        ApplicationPhase::Running => "running",
        ApplicationPhase::Unhealthy => "unhealthy",
        ApplicationPhase::Stopped => "stopped",
        ApplicationPhase::Failed => "failed",
        ApplicationPhase::Sleeping => "sleeping",
        ApplicationPhase::Waking => "waking",
    }
}

/// The reported revision, saying whether the device has caught up with the application.
pub fn revision_summary(status: &ApplicationStatus) -> String {
    match status.revision {
        None => format!("not reported (current: {})", status.application_revision),
        Some(revision) if revision == status.application_revision => revision.to_string(),
        Some(revision) => format!("{revision} (current: {})", status.application_revision),
    }
}

/// `edgible app status NAME`.
pub async fn app_status(client: &Client, reference: &str, context: &Context) -> anyhow::Result<()> {
    let application = resolve::<Application>(client, reference).await?;
    let status = client
        .application_status(&application.id)
        .await
        .with_context(|| format!("reading the status of application {}", application.spec.name))?;
    match context.format {
        Format::Json => print_json(&status)?,
        Format::Table => {
            let device = match status.device_id {
                Some(device_id) => Some(device_name(client, device_id).await),
                None => None,
            };
            Details::new()
                .field("name", &application.spec.name)
                .field("phase", phase_name(status.phase))
                .field("message", optional(status.message.as_ref()))
                .field("device", device.unwrap_or_else(|| "- (not placed on a device)".to_owned()))
                .field("revision", revision_summary(&status))
                .field("reported", optional(status.reported_at.map(|at| at.to_rfc3339())))
                .field("certificate", optional(status.certificate_status.as_ref()))
                .field("certificate expires", optional(status.certificate_expires_at.map(|at| at.to_rfc3339())))
                .field("access", crate::access::access_summary(&application.spec.access))
                .print();
        }
    }
    Ok(())
}

/// The device's name and id, or just the id when it cannot be read.
async fn device_name(client: &Client, device_id: DeviceId) -> String {
    match client.get::<Device>(&device_id).await {
        Ok(device) => format!("{} ({device_id})", device.spec.name),
        Err(_) => device_id.to_string(),
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The application (name or id).
    application: String,
    /// Keep printing new lines as they arrive, until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// How many of the most recent lines to print first (1-1000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    tail: Option<u32>,
    /// Prefix each line with the time the agent read it.
    #[arg(short, long)]
    timestamps: bool,
}

/// `edgible logs NAME [-f]`.
pub async fn logs(args: LogsArgs, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    let application = resolve::<Application>(&client, &args.application).await?;
    let name = &application.spec.name;
    if !args.follow {
        let logs =
            client.logs(&application.id, args.tail).await.with_context(|| format!("reading the logs of {name}"))?;
        match context.format {
            Format::Json => print_json(&logs)?,
            Format::Table => {
                if logs.dropped > 0 {
                    eprintln!("({} earlier lines were lost before they reached the server)", logs.dropped);
                }
                let mut stdout = std::io::stdout().lock();
                for entry in &logs.lines {
                    writeln!(stdout, "{}", render_line(entry, args.timestamps)).context("writing to stdout")?;
                }
            }
        }
        return Ok(());
    }
    let stream = client
        .follow_logs(&application.id, args.tail)
        .await
        .with_context(|| format!("following the logs of {name}"))?;
    let mut stream = std::pin::pin!(stream);
    while let Some(entry) = stream.next().await {
        let entry = entry.with_context(|| format!("following the logs of {name}"))?;
        let text = match context.format {
            // One object per line, as the server streams them.
            Format::Json => serde_json::to_string(&entry).context("encoding a log line")?,
            Format::Table => render_line(&entry, args.timestamps),
        };
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (`edgible logs -f app | head`) ends following quietly.
        if writeln!(stdout, "{text}").and_then(|()| stdout.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn render_line(entry: &LogEntry, timestamps: bool) -> String {
    let stream = match entry.stream {
        LogStream::Stdout => "",
        LogStream::Stderr => "stderr ",
    };
    if timestamps {
        format!("{} {stream}{}", entry.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), entry.line)
    } else {
        entry.line.clone()
    }
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events of this application (name or id).
    #[arg(long = "app", visible_alias = "application")]
    application: Option<String>,
    /// Only events from this device (name or id).
    #[arg(long)]
    device: Option<String>,
    /// How many of the most recent events (1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
}

/// `edgible events [--app NAME]`: the most recent events, oldest first.
pub async fn events(args: EventsArgs, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    let application_id = match &args.application {
        Some(reference) => Some(resolve::<Application>(&client, reference).await?.id),
        None => None,
    };
    let device_id = match &args.device {
        Some(reference) => Some(resolve::<Device>(&client, reference).await?.id),
        None => None,
    };
    let query = EventQuery { application_id, device_id, limit: Some(args.limit), cursor: None };
    let mut events = client.events(&query).await.context("listing events")?.items;
    // The server answers newest first; people read a log oldest first.
    events.reverse();
    match context.format {
        Format::Json => print_json(&events)?,
        Format::Table => {
            let (applications, devices) =
                tokio::try_join!(client.list_all::<Application>(), client.list_all::<Device>())
                    .context("looking up the names of applications and devices")?;
            let application_names: BTreeMap<ApplicationId, String> =
                applications.iter().map(|application| (application.id, application.spec.name.to_string())).collect();
            let device_names: BTreeMap<DeviceId, String> =
                devices.iter().map(|device| (device.id, device.spec.name.to_string())).collect();
            let mut table = Table::new(&["TIME", "DEVICE", "APPLICATION", "MESSAGE"]);
            for event in &events {
                let application = event.application_id.map(|id| {
                    // A deleted application's events remain; show its id.
                    application_names.get(&id).cloned().unwrap_or_else(|| id.to_string())
                });
                table.row(vec![
                    event.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    device_names.get(&event.device_id).cloned().unwrap_or_else(|| event.device_id.to_string()),
                    optional(application),
                    event.message.clone(),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: ApplicationPhase, revision: Option<u64>, current: u64) -> ApplicationStatus {
        ApplicationStatus {
            application_id: ApplicationId::new(),
            application_revision: current,
            device_id: None,
            phase,
            message: None,
            revision,
            reported_at: None,
            certificate_expires_at: None,
            certificate_status: None,
        }
    }

    #[test]
    fn revisions_say_whether_the_device_caught_up() {
        assert_eq!(revision_summary(&status(ApplicationPhase::Running, Some(4), 4)), "4");
        assert_eq!(revision_summary(&status(ApplicationPhase::Running, Some(3), 4)), "3 (current: 4)");
        assert_eq!(revision_summary(&status(ApplicationPhase::Pending, None, 4)), "not reported (current: 4)");
    }

    #[test]
    fn lines_render_with_optional_timestamps() {
        let entry = LogEntry {
            at: "2025-01-02T03:04:05.678Z".parse().unwrap(),
            device_id: DeviceId::new(),
            stream: LogStream::Stderr,
            line: "oops".into(),
        };
        assert_eq!(render_line(&entry, false), "oops");
        assert_eq!(render_line(&entry, true), "2025-01-02T03:04:05.678Z stderr oops");
    }
}
