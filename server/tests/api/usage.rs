//! `GET /v1/usage` (issue 9): usage a test agent reports over a real socket, summed per
//! application and hour, scoped to organizations, and the checks of its parameters.

use anyhow::{Context, ensure};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use edgible::model::{ApplicationId, UsageReport};
use edgible::protocol::v1::{AgentMessage, ServerMessage, UsageRecord};
use edgible_server::hub::agent::SessionConfig;

use crate::agents::{TestAgent, enrolled_device, placed_application, pool};
use crate::support::{Org, Served, TestApp};

fn record(seq: u64, application_id: ApplicationId, start: DateTime<Utc>, minutes: i64, requests: u64) -> UsageRecord {
    UsageRecord {
        seq,
        application_id,
        start,
        end: start + TimeDelta::minutes(minutes),
        awake_ms: u64::try_from(minutes).unwrap_or(0) * 60_000,
        requests,
        bytes_in: requests * 100,
        bytes_out: requests * 1000,
        wakes: 1,
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A device of `org` (in its pool `home`, made if needed) with one placed application,
/// connected as a test agent.
async fn reporting_device(
    served: &Served,
    org: &Org,
    name: &str,
    seed: u8,
) -> anyhow::Result<(TestAgent, ApplicationId)> {
    let app = &served.app;
    let pool = match app.get("/v1/device-pools?name=home", &org.admin_key).await?.expect(200)?.ids()?.pop() {
        Some(pool) => pool,
        None => pool(app, org).await?,
    };
    let device = enrolled_device(app, org, &pool, &format!("{name}-device"), seed).await?;
    let (application, _) = placed_application(app, org, name, device.device_id).await?;
    let mut agent = TestAgent::connect(served, &device).await?;
    agent.hello(None).await?;
    Ok((agent, application))
}

/// Sends `records` and expects the ack of `seq`.
async fn report(agent: &mut TestAgent, records: Vec<UsageRecord>, seq: u64) -> anyhow::Result<()> {
    agent.send(&AgentMessage::Usage { records }).await?;
    let answer = agent.recv().await?;
    ensure!(answer == ServerMessage::UsageAck { seq }, "expected the ack of {seq}, got {answer:?}");
    Ok(())
}

/// Three hours back from the current hour, so that every record lies in the past.
fn base_hour() -> anyhow::Result<DateTime<Utc>> {
    Ok(Utc::now().duration_trunc(TimeDelta::hours(1))? - TimeDelta::hours(3))
}

pub async fn usage_is_summed_per_application_and_hour(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let (mut agent, web) = reporting_device(&served, &org, "web", 1).await?;
    let hour = base_hour()?;
    report(
        &mut agent,
        vec![
            record(1, web, hour + TimeDelta::minutes(10), 10, 3),
            // 10 minutes before the next hour and 10 after: split in half.
            record(2, web, hour + TimeDelta::minutes(50), 20, 4),
            record(3, web, hour + TimeDelta::minutes(70), 5, 1),
        ],
        3,
    )
    .await?;
    // A record sent again is not counted again.
    report(&mut agent, vec![record(3, web, hour + TimeDelta::minutes(70), 5, 1)], 3).await?;

    let path = format!("/v1/usage?from={}&to={}", rfc3339(hour), rfc3339(hour + TimeDelta::hours(2)));
    let answer = app.get(&path, &org.admin_key).await?.expect(200)?;
    let usage: UsageReport = answer.parse()?;
    ensure!(usage.organization_id.to_string() == org.id, "{}", answer.text);
    ensure!(usage.from == hour && usage.to == hour + TimeDelta::hours(2), "{}", answer.text);
    let hours: Vec<_> =
        usage.hours.iter().map(|h| (h.application_id, h.hour, h.awake_ms, h.requests, h.bytes_in, h.wakes)).collect();
    let next = hour + TimeDelta::hours(1);
    ensure!(
        hours
            == [
                // Record 2's one wake falls in its second half (parts are rounded down, the
                // remainder goes last).
                (web, hour, 20 * 60_000, 3 + 2, 300 + 200, 1),
                (web, next, 15 * 60_000, 2 + 1, 200 + 100, 1 + 1),
            ],
        "{hours:?}"
    );
    let requests: u64 = usage.hours.iter().map(|h| h.requests).sum();
    ensure!(requests == 8, "the totals are exactly what was reported: {requests}");

    // A period inside the first hour still answers that whole hour; the one after, only the
    // second.
    let path = format!(
        "/v1/usage?from={}&to={}",
        rfc3339(hour + TimeDelta::minutes(5)),
        rfc3339(hour + TimeDelta::minutes(6))
    );
    let usage: UsageReport = app.get(&path, &org.admin_key).await?.expect(200)?.parse()?;
    ensure!(usage.hours.len() == 1 && usage.hours[0].hour == hour, "{usage:?}");
    let path = format!("/v1/usage?from={}&to={}", rfc3339(next), rfc3339(next + TimeDelta::days(1)));
    let usage: UsageReport = app.get(&path, &org.admin_key).await?.expect(200)?.parse()?;
    ensure!(usage.hours.len() == 1 && usage.hours[0].hour == next, "{usage:?}");

    // Two applications in one hour come in application order, both counted.
    let (mut other_agent, api) = reporting_device(&served, &org, "api", 2).await?;
    report(&mut other_agent, vec![record(1, api, hour + TimeDelta::minutes(30), 1, 7)], 1).await?;
    let path = format!("/v1/usage?from={}&to={}", rfc3339(hour), rfc3339(next));
    let usage: UsageReport = app.get(&path, &org.admin_key).await?.expect(200)?.parse()?;
    let mut expected = vec![(web, 5), (api, 7)];
    expected.sort_by_key(|(application, _)| *application);
    let seen: Vec<_> = usage.hours.iter().map(|h| (h.application_id, h.requests)).collect();
    ensure!(seen == expected, "{seen:?}");

    // The document describes the endpoint.
    let document = app.send(crate::support::TestRequest::new(axum::http::Method::GET, "/v1/openapi.json")).await?;
    ensure!(document.body["paths"]["/v1/usage"]["get"].is_object(), "no GET /v1/usage in the OpenAPI document");
    ensure!(document.body["components"]["schemas"]["UsageReport"].is_object(), "no UsageReport schema");
    Ok(())
}

pub async fn usage_is_scoped_to_organizations(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let acme = app.org("acme").await?;
    let other = app.org("other").await?;
    let (mut agent, web) = reporting_device(&served, &acme, "web", 1).await?;
    let hour = base_hour()?;
    report(&mut agent, vec![record(1, web, hour, 1, 2)], 1).await?;
    let period = format!("from={}&to={}", rfc3339(hour), rfc3339(hour + TimeDelta::hours(1)));
    let requests = |answer: crate::support::Answer| -> anyhow::Result<u64> {
        let usage: UsageReport = answer.parse()?;
        Ok(usage.hours.iter().map(|h| h.requests).sum())
    };

    // A read key of the organization sees it; another organization sees none of it.
    let reader = app.key(&acme, "reader", &["read"]).await?;
    ensure!(requests(app.get(&format!("/v1/usage?{period}"), &reader).await?.expect(200)?)? == 2);
    ensure!(requests(app.get(&format!("/v1/usage?{period}"), &other.admin_key).await?.expect(200)?)? == 0);
    let own = format!("/v1/usage?{period}&organization_id={}", acme.id);
    ensure!(requests(app.get(&own, &reader).await?.expect(200)?)? == 2, "naming the own organization is fine");

    // Another organization's usage needs the platform scope; without it, it does not exist.
    let foreign = format!("/v1/usage?{period}&organization_id={}", acme.id);
    app.get(&foreign, &other.admin_key).await?.expect_error(404, "not_found", None)?;
    let answer = app.get(&foreign, &app.platform_key).await?.expect(200)?;
    ensure!(answer.str("/organization_id")? == acme.id, "{}", answer.text);
    ensure!(requests(answer)? == 2);
    let missing = format!("/v1/usage?{period}&organization_id={}", uuid::Uuid::now_v7());
    app.get(&missing, &app.platform_key).await?.expect_error(404, "not_found", None)?;

    // An access key grants nothing on the API; no key at all is 401.
    let opener = app.key(&acme, "opener", &["access"]).await?;
    app.get(&format!("/v1/usage?{period}"), &opener).await?.expect_error(403, "forbidden", None)?;
    let anonymous = app.send(crate::support::TestRequest::new(axum::http::Method::GET, &format!("/v1/usage?{period}")));
    anonymous.await?.expect_error(401, "unauthorized", None)?;
    Ok(())
}

pub async fn usage_parameters_are_checked(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let key = &app.platform_key;
    let cases = [
        ("/v1/usage?to=2026-01-02T00:00:00Z", "from"),
        ("/v1/usage?from=2026-01-01T00:00:00Z", "to"),
        ("/v1/usage?from=yesterday&to=2026-01-02T00:00:00Z", "from"),
        ("/v1/usage?from=2026-01-01T00:00:00Z&to=2026-01-02", "to"),
        ("/v1/usage?from=2026-01-02T00:00:00Z&to=2026-01-02T00:00:00Z", "to"),
        ("/v1/usage?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("/v1/usage?from=2026-01-01T00:00:00Z&to=2026-04-04T00:00:01Z", "to"),
        ("/v1/usage?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z&organization_id=acme", "organization_id"),
    ];
    for (path, field) in cases {
        let answer = app.get(path, key).await?.expect_error(400, "bad_request", Some(field))?;
        let message = answer.body["error"]["message"].as_str().context("message")?;
        ensure!(message.contains(field), "{path}: the message names {field}: {message}");
    }
    // 93 days exactly is allowed; unknown parameters are not.
    app.get("/v1/usage?from=2026-01-01T00:00:00Z&to=2026-04-04T00:00:00Z", key).await?.expect(200)?;
    app.get("/v1/usage?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z&org=x", key).await?.expect_error(
        400,
        "bad_request",
        None,
    )?;
    // Offsets other than Z are the same instants.
    let answer =
        app.get("/v1/usage?from=2026-01-01T01:00:00%2B01:00&to=2026-01-02T00:00:00Z", key).await?.expect(200)?;
    ensure!(answer.str("/from")? == "2026-01-01T00:00:00Z", "{}", answer.text);
    Ok(())
}
