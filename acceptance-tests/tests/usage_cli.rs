//! `edgible usage` against a real `edgible-server`: a device's session reports usage over the
//! push protocol (spoken here by the test, as the agent would), and the command prints it per
//! application and hour with totals, or as the API's JSON.
//!
//! Needs the workspace binaries: `cargo build -p edgible-server -p edgible --bins && cargo test
//! -p edgible-acceptance-tests --test usage_cli`.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use base64::Engine;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use edgible::Client;
use edgible::model::{
    Application, Device, DevicePool, EnrollmentRequest, Organization, OrganizationSpec, Placement, PlacementSpec,
};
use edgible::protocol::v1::{AgentMessage, ServerMessage, UsageRecord};
use edgible::protocol::{decode, encode};
use edgible_acceptance_tests::{Cli, ServerProcess};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next protocol message from the server, answering pings on the way.
async fn next_message(socket: &mut Socket) -> anyhow::Result<ServerMessage> {
    for _ in 0..100 {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .context("no frame from the server in time")?
            .context("the server closed the socket")??;
        match frame {
            Message::Text(text) => match decode::<ServerMessage>(text.as_str())? {
                ServerMessage::Ping { nonce } => {
                    socket.send(Message::text(encode(&AgentMessage::Pong { nonce }))).await?;
                }
                message => return Ok(message),
            },
            Message::Close(close) => bail!("the server closed the session: {close:?}"),
            _ => {}
        }
    }
    bail!("no protocol message in 100 frames")
}

/// A device of the bootstrap organization, enrolled, with application `web` placed on it, and
/// its session after `hello` (past the snapshot, edges and access messages).
async fn device_session(server: &ServerProcess, client: &Client) -> anyhow::Result<(Socket, Application)> {
    let pool: DevicePool = client
        .create::<DevicePool>(&serde_json::from_value(
            serde_json::json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}),
        )?)
        .await?;
    let created = client
        .create::<Device>(&serde_json::from_value(serde_json::json!({"name": "dev1", "pool_id": pool.id}))?)
        .await?;
    let public_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let enrolled = Client::enroll(
        &server.url,
        &EnrollmentRequest { token: created.enrollment_token, public_key: public_key.clone() },
    )
    .await?;
    let spec = serde_json::json!({
        "name": "web", "hostnames": ["web.example.test"], "workload": {"process": {"command": "/bin/web"}}, "port": 80
    });
    let application: Application =
        client.create::<Application>(&edgible::model::parse_json(spec.to_string().as_bytes())?).await?;
    client
        .create::<Placement>(&PlacementSpec::ServingDevice {
            application_id: application.id,
            device_id: enrolled.device.id,
        })
        .await?;

    let url = format!("{}/v1/agent/connect", server.url.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", enrolled.credential).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let hello = AgentMessage::Hello {
        device_id: enrolled.device.id,
        public_key,
        applied_revision: None,
        capabilities: vec!["process".into()],
        agent_version: "usage-cli-test".into(),
        cloud_host: None,
    };
    socket.send(Message::text(encode(&hello))).await?;
    for _ in 0..10 {
        if matches!(next_message(&mut socket).await?, ServerMessage::Access { .. }) {
            return Ok((socket, application));
        }
    }
    bail!("no access message after hello")
}

fn record(seq: u64, application: &Application, start: DateTime<Utc>, minutes: i64, requests: u64) -> UsageRecord {
    UsageRecord {
        seq,
        application_id: application.id,
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

/// The whitespace-separated cells of the table line that starts with `first` and `second`.
fn row(stdout: &str, first: &str, second: &str) -> anyhow::Result<Vec<String>> {
    stdout
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.len() > 2 && cells[0] == first && cells[1] == second)
        .with_context(|| format!("no row {first} {second} in:\n{stdout}"))
}

#[tokio::test]
async fn usage_is_printed_per_application_and_hour_with_totals() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"))?;
    let cli = Cli::new(&dir.path().join("config"))?;
    cli.ok(&["login", "--server", &server.url, "--key", &server.admin_key])?;
    let client = server.client()?;
    let (mut socket, application) = device_session(&server, &client).await?;

    // Three hours back, so every record is in the past; the second record spans two hours.
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1))? - TimeDelta::hours(3);
    let next = hour + TimeDelta::hours(1);
    let records =
        vec![record(1, &application, hour + TimeDelta::minutes(10), 10, 3), record(2, &application, next, 5, 4)];
    socket.send(Message::text(encode(&AgentMessage::Usage { records }))).await?;
    let ack = next_message(&mut socket).await?;
    ensure!(ack == ServerMessage::UsageAck { seq: 2 }, "expected the ack of 2, got {ack:?}");

    let (from, to) = (rfc3339(hour), rfc3339(hour + TimeDelta::hours(2)));
    let table = cli.ok(&["usage", "--from", &from, "--to", &to])?.stdout;
    ensure!(row(&table, &rfc3339(hour), "web")? == [rfc3339(hour).as_str(), "web", "600.000", "3", "300", "3000", "1"]);
    ensure!(row(&table, &rfc3339(next), "web")? == [rfc3339(next).as_str(), "web", "300.000", "4", "400", "4000", "1"]);
    ensure!(row(&table, "total", "web")? == ["total", "web", "900.000", "7", "700", "7000", "2"], "{table}");
    ensure!(row(&table, "total", "(all)")? == ["total", "(all)", "900.000", "7", "700", "7000", "2"], "{table}");

    let json = cli.json(&["usage", "--from", &from, "--to", &to])?;
    let hours = json["hours"].as_array().context("hours")?;
    ensure!(hours.len() == 2, "{json}");
    ensure!(hours[0]["hour"] == rfc3339(hour).as_str() && hours[0]["requests"] == 3, "{json}");
    ensure!(hours[1]["application_id"] == application.id.to_string().as_str() && hours[1]["wakes"] == 1, "{json}");
    ensure!(json["organization_id"] == application.organization_id.to_string().as_str(), "{json}");

    // Without --from, the last 24 hours; the records are in them.
    let recent = cli.json(&["usage"])?;
    ensure!(recent["hours"].as_array().is_some_and(|hours| hours.len() == 2), "{recent}");

    // With the platform key, another organization by id: none of this organization's usage.
    let other = client.create::<Organization>(&OrganizationSpec { name: "other".parse()?, operator: false }).await?;
    let other_id = other.organization.id.to_string();
    let foreign = cli.json(&["usage", "--from", &from, "--to", &to, "--org", &other_id])?;
    ensure!(foreign["organization_id"] == other_id.as_str() && foreign["hours"] == serde_json::json!([]), "{foreign}");
    let own = cli.json(&["usage", "--from", &from, "--to", &to, "--org", "acme"])?;
    ensure!(own["hours"].as_array().is_some_and(|hours| hours.len() == 2), "by name: {own}");

    // The server's checks reach the user, naming the parameter; bad times are caught first.
    let backwards = cli.fails(&["usage", "--from", &to, "--to", &from])?;
    ensure!(backwards.stderr.contains("must be after from"), "{}", backwards.stderr);
    let long = cli.fails(&["usage", "--from", "2026-01-01T00:00:00Z", "--to", "2026-06-01T00:00:00Z"])?;
    ensure!(long.stderr.contains("longer than 93 days"), "{}", long.stderr);
    // A usage error of the command line itself (clap's exit code 2).
    let malformed = cli.run(&["usage", "--from", "yesterday"])?;
    ensure!(!malformed.status.success() && malformed.stderr.contains("RFC 3339"), "{}", malformed.stderr);
    Ok(())
}
