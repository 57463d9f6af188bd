//! `edgible usage`: metered usage (awake time, requests, bytes, wakes) per application and
//! hour, with totals per application and overall, as `GET /v1/usage` answers it.

use std::collections::BTreeMap;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use clap::Args;
use edgible::model::{Application, ApplicationId, Organization, UsageHour, UsageReport};

use crate::Context;
use crate::output::{Format, Table, print_json};
use crate::resolve::resolve;

/// How far back the report goes without `--from`.
const DEFAULT_PERIOD: TimeDelta = TimeDelta::hours(24);

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The start of the period (RFC 3339, e.g. 2026-01-31T00:00:00Z); default: 24 hours before
    /// `--to`.
    #[arg(long, value_parser = parse_time)]
    from: Option<DateTime<Utc>>,
    /// The end of the period (RFC 3339), exclusive; default: now. At most 93 days after
    /// `--from`.
    #[arg(long, value_parser = parse_time)]
    to: Option<DateTime<Utc>>,
    /// Another organization (name or id; needs a platform key).
    #[arg(long = "org", visible_alias = "organization")]
    organization: Option<String>,
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| format!("not an RFC 3339 time such as 2026-01-31T00:00:00Z: {error}"))
}

/// `edgible usage [--from TIME] [--to TIME] [--org ORG]`.
pub async fn usage(args: UsageArgs, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    let to = args.to.unwrap_or_else(Utc::now);
    let from = args.from.unwrap_or(to - DEFAULT_PERIOD);
    let organization = match &args.organization {
        Some(reference) => Some(resolve::<Organization>(&client, reference).await?.id),
        None => None,
    };
    let report = client.usage(from, to, organization).await.context("reading usage")?;
    match context.format {
        Format::Json => print_json(&report)?,
        Format::Table => {
            // Applications of another organization, or deleted ones, are shown by id.
            let names: BTreeMap<ApplicationId, String> = if organization.is_none() {
                let applications =
                    client.list_all::<Application>().await.context("looking up the names of applications")?;
                applications
                    .into_iter()
                    .map(|application| (application.id, application.spec.name.to_string()))
                    .collect()
            } else {
                BTreeMap::new()
            };
            print!("{}", render(&report, &names));
        }
    }
    Ok(())
}

/// The counters of a row.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    awake_ms: u64,
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
    wakes: u64,
}

impl Sums {
    fn add(&mut self, hour: &UsageHour) {
        self.awake_ms = self.awake_ms.saturating_add(hour.awake_ms);
        self.requests = self.requests.saturating_add(hour.requests);
        self.bytes_in = self.bytes_in.saturating_add(hour.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(hour.bytes_out);
        self.wakes = self.wakes.saturating_add(hour.wakes);
    }

    fn cells(&self) -> [String; 5] {
        [
            format!("{}.{:03}", self.awake_ms / 1000, self.awake_ms % 1000),
            self.requests.to_string(),
            self.bytes_in.to_string(),
            self.bytes_out.to_string(),
            self.wakes.to_string(),
        ]
    }
}

/// The report as a table: one row per application and hour, then each application's total and
/// the overall total.
fn render(report: &UsageReport, names: &BTreeMap<ApplicationId, String>) -> String {
    let name = |id: &ApplicationId| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let headers = ["HOUR", "APPLICATION", "AWAKE (S)", "REQUESTS", "BYTES IN", "BYTES OUT", "WAKES"];
    let mut table = Table::new(&headers);
    let mut per_application: BTreeMap<String, Sums> = BTreeMap::new();
    let mut total = Sums::default();
    for hour in &report.hours {
        let mut sums = Sums::default();
        sums.add(hour);
        let application = name(&hour.application_id);
        per_application.entry(application.clone()).or_default().add(hour);
        total.add(hour);
        let mut row = vec![hour.hour.to_rfc3339_opts(SecondsFormat::Secs, true), application];
        row.extend(sums.cells());
        table.row(row);
    }
    for (application, sums) in &per_application {
        let mut row = vec!["total".to_owned(), application.clone()];
        row.extend(sums.cells());
        table.row(row);
    }
    let mut row = vec!["total".to_owned(), "(all)".to_owned()];
    row.extend(total.cells());
    table.row(row);
    format!(
        "Usage of organization {} from {} to {}\n{}",
        report.organization_id,
        report.from.to_rfc3339_opts(SecondsFormat::Secs, true),
        report.to.to_rfc3339_opts(SecondsFormat::Secs, true),
        table.render()
    )
}

#[cfg(test)]
mod tests {
    use edgible::model::OrganizationId;

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("a test time")
    }

    #[test]
    fn the_table_has_a_row_per_application_and_hour_and_totals() {
        let (web, api) = (ApplicationId::new(), ApplicationId::new());
        let hour = |application_id, hour: &str, awake_ms, requests| UsageHour {
            application_id,
            hour: at(hour),
            awake_ms,
            requests,
            bytes_in: requests * 100,
            bytes_out: requests * 1000,
            wakes: 1,
        };
        let report = UsageReport {
            organization_id: OrganizationId::new(),
            from: at("2026-01-01T10:00:00Z"),
            to: at("2026-01-01T12:00:00Z"),
            hours: vec![
                hour(web, "2026-01-01T10:00:00Z", 1500, 3),
                hour(api, "2026-01-01T10:00:00Z", 60_000, 1),
                hour(web, "2026-01-01T11:00:00Z", 2, 2),
            ],
        };
        let names = BTreeMap::from([(web, "web".to_owned())]);
        let text = render(&report, &names);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("from 2026-01-01T10:00:00Z to 2026-01-01T12:00:00Z"), "{text}");
        let cells = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[1]),
            ["HOUR", "APPLICATION", "AWAKE", "(S)", "REQUESTS", "BYTES", "IN", "BYTES", "OUT", "WAKES"]
        );
        assert_eq!(cells(lines[2]), ["2026-01-01T10:00:00Z", "web", "1.500", "3", "300", "3000", "1"]);
        assert_eq!(cells(lines[3]), ["2026-01-01T10:00:00Z", &api.to_string(), "60.000", "1", "100", "1000", "1"]);
        assert_eq!(cells(lines[4]), ["2026-01-01T11:00:00Z", "web", "0.002", "2", "200", "2000", "1"]);
        // Per application (by name), then everything.
        assert_eq!(cells(lines[5]), ["total", &api.to_string(), "60.000", "1", "100", "1000", "1"]);
        assert_eq!(cells(lines[6]), ["total", "web", "1.502", "5", "500", "5000", "2"]);
        assert_eq!(cells(lines[7]), ["total", "(all)", "61.502", "6", "600", "6000", "3"]);
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn an_empty_report_shows_zero_totals() {
        let report = UsageReport {
            organization_id: OrganizationId::new(),
            from: at("2026-01-01T10:00:00Z"),
            to: at("2026-01-01T12:00:00Z"),
            hours: Vec::new(),
        };
        let text = render(&report, &BTreeMap::new());
        let last = text.lines().last().expect("a line");
        assert_eq!(last.split_whitespace().collect::<Vec<_>>(), ["total", "(all)", "0.000", "0", "0", "0", "0"]);
    }

    #[test]
    fn times_must_be_rfc_3339() {
        assert_eq!(parse_time("2026-01-31T01:00:00+01:00"), Ok(at("2026-01-31T00:00:00Z")));
        assert!(parse_time("yesterday").is_err_and(|error| error.contains("RFC 3339")));
    }
}
