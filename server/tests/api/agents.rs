//! Enrollment and the agents' WebSocket hub, through a real socket: a test agent speaks the
//! protocol with `tokio-tungstenite` to the router served on an ephemeral loopback port.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use axum::http::Method;
use base64::Engine;
use edgible::model::{ApplicationId, DeviceId, DeviceSpec, OrganizationId, Revision};
use edgible::protocol::v1::{AgentMessage, ErrorCode, LogLine, Phase, ServerMessage, Stream as LogStream};
use edgible::protocol::{MAX_FRAME_BYTES, close, decode, encode};
use edgible_server::hub::agent::SessionConfig;
use edgible_server::secrets::NewSecret;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{Org, Served, TestApp, TestRequest, application, eventually};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a test waits for one frame.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// A WireGuard public key made of one repeated byte.
pub(crate) fn public_key(seed: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([seed; 32])
}

/// A device that enrolled: its id, key and credential.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub device_id: DeviceId,
    pub public_key: String,
    pub credential: String,
}

async fn enroll_request(app: &TestApp, body: Value) -> anyhow::Result<crate::support::Answer> {
    app.send(TestRequest::new(Method::POST, "/v1/agent/enroll").json(&body)).await
}

pub(crate) async fn pool(app: &TestApp, org: &Org) -> anyhow::Result<String> {
    app.post("/v1/device-pools", &org.admin_key, json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}))
        .await?
        .expect(201)?
        .str("/id")
}

/// Creates a device in `pool` and enrolls it with a key made of `seed`.
pub(crate) async fn enrolled_device(
    app: &TestApp,
    org: &Org,
    pool: &str,
    name: &str,
    seed: u8,
) -> anyhow::Result<Enrolled> {
    let created = app.post("/v1/devices", &org.admin_key, json!({"name": name, "pool_id": pool})).await?.expect(201)?;
    let token = created.str("/enrollment_token")?;
    let answer = enroll_request(app, json!({"token": token, "public_key": public_key(seed)})).await?.expect(200)?;
    Ok(Enrolled {
        device_id: answer.str("/device/id")?.parse()?,
        public_key: public_key(seed),
        credential: answer.str("/credential")?,
    })
}

/// Creates an application named `name` and places it on `device`; returns the application's
/// id and the placement's.
pub(crate) async fn placed_application(
    app: &TestApp,
    org: &Org,
    name: &str,
    device: DeviceId,
) -> anyhow::Result<(ApplicationId, String)> {
    let hostname = format!("{name}.{}.example.com", org.name);
    let id = app.post("/v1/applications", &org.admin_key, application(name, &[&hostname])).await?.expect(201)?;
    let id: ApplicationId = id.str("/id")?.parse()?;
    let placement = app
        .post(
            "/v1/placements",
            &org.admin_key,
            json!({"strategy": "serving-device", "application_id": id, "device_id": device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    Ok((id, placement))
}

async fn device_json(app: &TestApp, org: &Org, device: DeviceId) -> anyhow::Result<Value> {
    Ok(app.get(&format!("/v1/devices/{device}"), &org.admin_key).await?.expect(200)?.body)
}

/// Opens the agent WebSocket with `credential`.
pub(crate) async fn open(served: &Served, credential: &str) -> anyhow::Result<Socket> {
    let url = format!("{}/v1/agent/connect", served.base.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {credential}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

/// The HTTP status with which the server refused a WebSocket upgrade.
async fn refused_status(served: &Served, credential: &str) -> anyhow::Result<u16> {
    match open(served, credential).await {
        Ok(_) => bail!("the upgrade with credential {credential:?} was accepted"),
        Err(error) => match error.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            Some(tokio_tungstenite::tungstenite::Error::Http(response)) => Ok(response.status().as_u16()),
            _ => bail!("the upgrade failed otherwise: {error:#}"),
        },
    }
}

/// An update as plain values: revision, full, (application, revision) pairs, removed.
type Update = (Revision, bool, Vec<(ApplicationId, Revision)>, Vec<ApplicationId>);

/// A test agent speaking the protocol over a real socket.
pub struct TestAgent {
    socket: Socket,
    enrolled: Enrolled,
    /// What its hello declares as a cloud host.
    cloud_host: Option<edgible::model::HostCapacity>,
}

impl TestAgent {
    pub async fn connect(served: &Served, enrolled: &Enrolled) -> anyhow::Result<TestAgent> {
        Ok(TestAgent {
            socket: open(served, &enrolled.credential).await?,
            enrolled: enrolled.clone(),
            cloud_host: None,
        })
    }

    /// Makes the hello declare `capacity` as a cloud host.
    pub fn cloud_host(mut self, capacity: edgible::model::HostCapacity) -> Self {
        self.cloud_host = Some(capacity);
        self
    }

    /// Sends `hello` (with the declared cloud host, if any) without reading the answer.
    pub async fn send_hello(&mut self, applied: Option<Revision>) -> anyhow::Result<()> {
        self.send(&AgentMessage::Hello {
            device_id: self.enrolled.device_id,
            public_key: self.enrolled.public_key.clone(),
            applied_revision: applied,
            capabilities: vec!["process".into()],
            agent_version: "test".into(),
            cloud_host: self.cloud_host,
        })
        .await
    }

    /// Sends `hello` and reads the welcome, the snapshot, the pool's edges and `access`.
    pub async fn hello(&mut self, applied: Option<Revision>) -> anyhow::Result<(ServerMessage, Update)> {
        self.send_hello(applied).await?;
        let welcome = self.recv().await?;
        ensure!(matches!(welcome, ServerMessage::Welcome { .. }), "expected welcome, got {welcome:?}");
        let snapshot = self.update().await?;
        ensure!(snapshot.1, "the first update must be a full snapshot: {snapshot:?}");
        let edges = self.recv().await?;
        ensure!(matches!(edges, ServerMessage::Edges { .. }), "expected the pool's edges, got {edges:?}");
        let access = self.recv().await?;
        ensure!(matches!(access, ServerMessage::Access { .. }), "expected access, got {access:?}");
        Ok((welcome, snapshot))
    }

    pub async fn send(&mut self, message: &AgentMessage) -> anyhow::Result<()> {
        self.send_text(encode(message)).await
    }

    pub async fn send_text(&mut self, text: String) -> anyhow::Result<()> {
        Ok(self.socket.send(Message::text(text)).await?)
    }

    /// The next protocol message (WebSocket pings and pongs skipped); fails on close.
    pub async fn recv(&mut self) -> anyhow::Result<ServerMessage> {
        loop {
            let frame = tokio::time::timeout(FRAME_WAIT, self.socket.next())
                .await
                .context("no frame from the server in time")?
                .context("the server closed the socket")??;
            match frame {
                Message::Text(text) => return Ok(decode(text.as_str())?),
                Message::Close(close) => bail!("the server closed the session: {close:?}"),
                Message::Ping(_) | Message::Pong(_) => {}
                other => bail!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next `application_update`, answering pings on the way.
    pub async fn update(&mut self) -> anyhow::Result<Update> {
        loop {
            match self.recv().await? {
                ServerMessage::ApplicationUpdate { revision, full, applications, removed } => {
                    let applications = applications.iter().map(|a| (a.id, a.revision)).collect();
                    return Ok((revision, full, applications, removed));
                }
                ServerMessage::Ping { nonce } => self.send(&AgentMessage::Pong { nonce }).await?,
                other => bail!("expected an application update, got {other:?}"),
            }
        }
    }

    /// The next `error` frame's code and message.
    pub async fn error(&mut self) -> anyhow::Result<(ErrorCode, String)> {
        match self.recv().await? {
            ServerMessage::Error { code, message } => Ok((code, message)),
            other => bail!("expected an error frame, got {other:?}"),
        }
    }

    /// Sends a frame the server answers with an error and waits for that answer: since a
    /// session handles frames in order, everything sent before has been handled then.
    pub async fn barrier(&mut self) -> anyhow::Result<()> {
        self.send_text("barrier".into()).await?;
        let (code, _) = self.error().await?;
        ensure!(code == ErrorCode::Malformed, "the barrier got {code:?}");
        Ok(())
    }

    /// Reads until the server closes; answers the close code.
    pub async fn closed(&mut self) -> anyhow::Result<Option<u16>> {
        loop {
            let frame =
                tokio::time::timeout(FRAME_WAIT, self.socket.next()).await.context("the server did not close")?;
            match frame {
                None | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Close(close))) => return Ok(close.map(|close| u16::from(close.code))),
                Some(Ok(_)) => {}
            }
        }
    }
}

async fn metric(app: &TestApp, line_start: &str) -> anyhow::Result<u64> {
    let text = app.send(TestRequest::new(Method::GET, "/metrics")).await?.expect(200)?.text;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(line_start).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0))
}

pub async fn enrollment_exchanges_the_token_once(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let created =
        app.post("/v1/devices", &org.admin_key, json!({"name": "laptop", "pool_id": pool})).await?.expect(201)?;
    let token = created.str("/enrollment_token")?;
    let device: DeviceId = created.str("/device/id")?.parse()?;

    for bad in ["", "c2hvcnQ=", &format!("{}=", "-".repeat(43)), &public_key(1)[..43]] {
        enroll_request(app, json!({"token": token, "public_key": bad})).await?.expect_error(
            422,
            "invalid",
            Some("public_key"),
        )?;
    }
    enroll_request(app, json!({"token": token})).await?.expect_error(422, "invalid", Some("public_key"))?;

    let answer = enroll_request(app, json!({"token": token, "public_key": public_key(1)})).await?.expect(200)?;
    ensure!(answer.str("/credential")?.starts_with("edgdev_"), "{}", answer.text);
    ensure!(answer.str("/device/id")? == device.to_string());
    let stored = device_json(app, &org, device).await?;
    ensure!(stored["status"]["public_key"] == public_key(1).as_str(), "{stored}");
    ensure!(stored["status"]["state"] == "offline", "an enrolled device is offline until it connects: {stored}");
    ensure!(!stored.to_string().contains(&answer.str("/credential")?), "the credential must not be shown again");

    let reused = enroll_request(app, json!({"token": token, "public_key": public_key(2)})).await?.expect_error(
        401,
        "unauthorized",
        None,
    )?;
    ensure!(reused.text.contains("already used"), "{}", reused.text);
    enroll_request(app, json!({"token": "edgenr_unknown", "public_key": public_key(2)})).await?.expect_error(
        401,
        "unauthorized",
        None,
    )?;

    // A token past its expiry, made through the database since the API always gives a day.
    let organization_id: OrganizationId = org.id.parse()?;
    let spec = DeviceSpec { name: "old".parse()?, pool_id: pool.parse()?, labels: Default::default() };
    let expired_token = NewSecret::enrollment_token();
    let expires_at = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    served.db.create_device(organization_id, &spec, &expired_token, expires_at).await?;
    let expired = enroll_request(app, json!({"token": expired_token.secret, "public_key": public_key(3)}))
        .await?
        .expect_error(410, "gone", None)?;
    ensure!(expired.text.contains("expired at"), "{}", expired.text);

    // Two devices cannot share a WireGuard key.
    let other = app.post("/v1/devices", &org.admin_key, json!({"name": "desk", "pool_id": pool})).await?.expect(201)?;
    enroll_request(app, json!({"token": other.str("/enrollment_token")?, "public_key": public_key(1)}))
        .await?
        .expect_error(409, "conflict", Some("public_key"))?;

    // Only the credential opens the push session.
    ensure!(refused_status(&served, "edgdev_wrong").await? == 401);
    ensure!(refused_status(&served, &org.admin_key).await? == 401, "an API key is not a device credential");
    let mut agent = TestAgent::connect(
        &served,
        &Enrolled { device_id: device, public_key: public_key(1), credential: answer.str("/credential")? },
    )
    .await?;
    agent.hello(None).await?;
    Ok(())
}

pub async fn hello_gets_welcome_and_a_snapshot(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let enrolled = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let (web, placement) = placed_application(app, &org, "web", enrolled.device_id).await?;
    let placement_revision = app.get(&format!("/v1/placements/{placement}"), &org.admin_key).await?.u64("/revision")?;
    let web_revision = app.get(&format!("/v1/applications/{web}"), &org.admin_key).await?.u64("/revision")?;

    let mut agent = TestAgent::connect(&served, &enrolled).await?;
    let (welcome, snapshot) = agent.hello(None).await?;
    let device = device_json(app, &org, enrolled.device_id).await?;
    let ServerMessage::Welcome { device_id, tunnel_address, ping_interval_seconds, .. } = welcome else {
        bail!("not a welcome");
    };
    ensure!(device_id == enrolled.device_id);
    ensure!(device["status"]["tunnel_address"] == tunnel_address.to_string(), "{device}");
    ensure!(ping_interval_seconds == Some(20));
    ensure!(snapshot == (placement_revision, true, vec![(web, web_revision)], vec![]), "{snapshot:?}");
    ensure!(device["status"]["state"] == "online", "{device}");
    ensure!(device["status"]["last_seen_at"].is_string(), "{device}");

    agent.send(&AgentMessage::Ack { revision: placement_revision }).await?;
    eventually("the applied revision shows", || async {
        Ok(device_json(app, &org, enrolled.device_id).await?["status"]["applied_revision"] == placement_revision)
    })
    .await?;

    drop(agent);
    eventually("the device is offline", || async {
        Ok(device_json(app, &org, enrolled.device_id).await?["status"]["state"] == "offline")
    })
    .await
}

pub async fn api_writes_push_deltas(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let pool = pool(app, &org).await?;
    let enrolled = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let (web, _) = placed_application(app, &org, "web", enrolled.device_id).await?;
    let mut agent = TestAgent::connect(&served, &enrolled).await?;
    let (_, (snapshot_revision, ..)) = agent.hello(None).await?;

    // An application update reaches the device as a delta.
    let mut spec = application("web", &["web.acme.example.com"]);
    spec["port"] = json!(9090);
    let updated = app.put(&format!("/v1/applications/{web}"), key, spec).await?.expect(200)?.u64("/revision")?;
    let delta = agent.update().await?;
    ensure!(delta == (updated, false, vec![(web, updated)], vec![]), "{delta:?}");

    // Acks move the applied revision forward only.
    agent.send(&AgentMessage::Ack { revision: updated }).await?;
    agent.send(&AgentMessage::Ack { revision: snapshot_revision }).await?;
    agent.barrier().await?;
    ensure!(device_json(app, &org, enrolled.device_id).await?["status"]["applied_revision"] == updated);
    agent.send(&AgentMessage::Ack { revision: updated + 100 }).await?;
    let (code, message) = agent.error().await?;
    ensure!(code == ErrorCode::Unexpected && message.contains("latest revision sent"), "{message}");

    // A write that does not change what the device runs sends nothing: the next frame is the
    // delta of the write after it.
    app.put(
        &format!("/v1/devices/{}", enrolled.device_id),
        key,
        json!({"name": "laptop", "pool_id": pool, "labels": {"room": "attic"}}),
    )
    .await?
    .expect(200)?;
    let (api, _) = placed_application(app, &org, "api", enrolled.device_id).await?;
    let (revision, full, changed, removed) = agent.update().await?;
    ensure!(!full && changed.iter().map(|(id, _)| *id).collect::<Vec<_>>() == [api] && removed.is_empty());
    ensure!(revision > updated);

    // Deleting a placed application removes it.
    app.delete(&format!("/v1/applications/{api}"), key).await?.expect(204)?;
    let (after_delete, _, changed, removed) = agent.update().await?;
    ensure!(after_delete > revision && changed.is_empty() && removed == [api], "{changed:?} {removed:?}");
    Ok(())
}

pub async fn moving_a_placement_moves_the_application(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let first = enrolled_device(app, &org, &pool, "first", 1).await?;
    let second = enrolled_device(app, &org, &pool, "second", 2).await?;
    let (web, placement) = placed_application(app, &org, "web", first.device_id).await?;
    let mut first_agent = TestAgent::connect(&served, &first).await?;
    let mut second_agent = TestAgent::connect(&served, &second).await?;
    ensure!(first_agent.hello(None).await?.1.2.len() == 1);
    ensure!(second_agent.hello(None).await?.1.2.is_empty());

    // Another device: a migration (stateless here), after which the old device lost it and
    // the new one has it.
    let moved = app
        .put(
            &format!("/v1/placements/{placement}"),
            &org.admin_key,
            json!({"strategy": "serving-device", "application_id": web, "device_id": second.device_id}),
        )
        .await?
        .expect(200)?;
    let migration = moved.str("/migration_id")?.parse()?;
    let revision = app.get(&format!("/v1/applications/{web}"), &org.admin_key).await?.expect(200)?.u64("/revision")?;
    let mut first_agent = crate::migrations::Agent::wrap(first_agent, &first, &[web]);
    let mut second_agent = crate::migrations::Agent::wrap(second_agent, &second, &[]);
    crate::migrations::migrate_stateless(&served, &org, migration, web, revision, &mut first_agent, &mut second_agent)
        .await?;
    ensure!(!first_agent.runs(web) && second_agent.runs(web));

    // Deleting the placement removes it from the new device.
    app.delete(&format!("/v1/placements/{placement}"), &org.admin_key).await?.expect(204)?;
    second_agent.until_runs(web, false).await?;
    Ok(())
}

pub async fn a_reconnecting_device_evicts_its_old_session(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let enrolled = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let (web, _) = placed_application(app, &org, "web", enrolled.device_id).await?;
    let mut old = TestAgent::connect(&served, &enrolled).await?;
    old.hello(None).await?;
    let mut new = TestAgent::connect(&served, &enrolled).await?;
    new.hello(None).await?;

    let (code, _) = old.error().await?;
    ensure!(code == ErrorCode::Replaced, "the old session was told {code:?}");
    ensure!(old.closed().await? == Some(close::REPLACED));
    eventually("the old session ended", || async {
        Ok(metric(app, "edgible_hub_sessions_ended_total{reason=\"replaced\"}").await? == 1)
    })
    .await?;
    let device = device_json(app, &org, enrolled.device_id).await?;
    ensure!(device["status"]["state"] == "online", "the old session's end must not mark the device offline: {device}");
    ensure!(metric(app, "edgible_hub_connected_agents").await? == 1);

    // The new session gets the deltas.
    let mut spec = application("web", &["web.acme.example.com"]);
    spec["env"] = json!({"MODE": "new"});
    app.put(&format!("/v1/applications/{web}"), &org.admin_key, spec).await?.expect(200)?;
    let (_, _, changed, _) = new.update().await?;
    ensure!(changed.len() == 1);
    Ok(())
}

pub async fn unanswered_pings_close_the_session(url: String) -> anyhow::Result<()> {
    let config = SessionConfig {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(1000),
        ..SessionConfig::default()
    };
    let served = TestApp::serve(&url, config).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let silent = enrolled_device(app, &org, &pool, "silent", 1).await?;
    let lively = enrolled_device(app, &org, &pool, "lively", 2).await?;

    // The lively agent answers every ping, in the background.
    let mut lively_agent = TestAgent::connect(&served, &lively).await?;
    lively_agent.hello(None).await?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let answering = tokio::spawn(async move {
        let mut pongs = 0_u32;
        loop {
            tokio::select! {
                _ = &mut stopped => return Ok::<_, anyhow::Error>((pongs, lively_agent)),
                message = lively_agent.recv() => match message? {
                    ServerMessage::Ping { nonce } => {
                        lively_agent.send(&AgentMessage::Pong { nonce }).await?;
                        pongs += 1;
                    }
                    other => bail!("unexpected {other:?}"),
                },
            }
        }
    });

    let mut silent_agent = TestAgent::connect(&served, &silent).await?;
    silent_agent.hello(None).await?;
    ensure!(matches!(silent_agent.recv().await?, ServerMessage::Ping { .. }));
    let (code, _) = silent_agent.error().await?;
    ensure!(code == ErrorCode::Timeout, "{code:?}");
    ensure!(silent_agent.closed().await? == Some(close::TIMEOUT));
    eventually("the silent device is offline", || async {
        Ok(device_json(app, &org, silent.device_id).await?["status"]["state"] == "offline")
    })
    .await?;

    let _ = stop.send(());
    // The lively agent is handed back, still connected.
    let (pongs, _lively_agent) = answering.await??;
    ensure!(pongs >= 3, "the lively agent answered {pongs} pings");
    ensure!(device_json(app, &org, lively.device_id).await?["status"]["state"] == "online");
    ensure!(metric(app, "edgible_hub_sessions_ended_total{reason=\"timeout\"}").await? == 1);
    ensure!(metric(app, "edgible_hub_connected_agents").await? == 1);
    Ok(())
}

pub async fn hostile_frames_get_error_frames(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let enrolled = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let other = enrolled_device(app, &org, &pool, "other", 2).await?;
    let mut agent = TestAgent::connect(&served, &enrolled).await?;
    let (_, (snapshot_revision, ..)) = agent.hello(None).await?;

    let oversized = format!(r#"{{"v":1,"type":"event","message":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES));
    let hello_again = encode(&AgentMessage::Hello {
        device_id: enrolled.device_id,
        public_key: enrolled.public_key.clone(),
        applied_revision: None,
        capabilities: vec![],
        agent_version: "test".into(),
        cloud_host: None,
    });
    let cases = [
        ("not json".to_owned(), ErrorCode::Malformed),
        ("[1,2,3]".to_owned(), ErrorCode::Malformed),
        (r#"{"v":1,"type":"launch_missiles"}"#.to_owned(), ErrorCode::UnknownType),
        (r#"{"v":1,"type":"ack"}"#.to_owned(), ErrorCode::Malformed),
        (r#"{"v":2,"type":"ack","revision":1}"#.to_owned(), ErrorCode::UnsupportedVersion),
        (r#"{"type":"ack","revision":1}"#.to_owned(), ErrorCode::UnsupportedVersion),
        (oversized, ErrorCode::TooLarge),
        (hello_again, ErrorCode::Unexpected),
    ];
    for (frame, expected) in cases {
        let shown: String = frame.chars().take(40).collect();
        agent.send_text(frame).await?;
        let (code, message) = agent.error().await?;
        ensure!(code == expected, "{shown}: expected {expected:?}, got {code:?}: {message}");
    }
    agent.socket.send(Message::binary(vec![1_u8, 2, 3])).await?;
    ensure!(agent.error().await?.0 == ErrorCode::Malformed);

    // The session survived all of it.
    agent.send(&AgentMessage::Ack { revision: snapshot_revision }).await?;
    agent.barrier().await?;
    ensure!(device_json(app, &org, enrolled.device_id).await?["status"]["applied_revision"] == snapshot_revision);
    ensure!(metric(app, "edgible_hub_frames_rejected_total{reason=\"malformed\"}").await? >= 4);
    ensure!(metric(app, "edgible_hub_frames_rejected_total{reason=\"too_large\"}").await? == 1);
    ensure!(metric(app, "edgible_hub_frames_rejected_total{reason=\"unknown_type\"}").await? == 1);

    // A hello of another protocol version is refused with a clear message, then closed.
    let mut future = TestAgent::connect(&served, &other).await?;
    future
        .send_text(format!(
            r#"{{"v":2,"type":"hello","device_id":"{}","public_key":"{}","agent_version":"9"}}"#,
            other.device_id, other.public_key
        ))
        .await?;
    let (code, message) = future.error().await?;
    ensure!(code == ErrorCode::UnsupportedVersion && message.contains("version 2 is not supported"), "{message}");
    ensure!(future.closed().await? == Some(close::PROTOCOL_ERROR));

    // So is a session that starts with anything but hello, or a hello naming another device.
    let mut rude = TestAgent::connect(&served, &other).await?;
    rude.send(&AgentMessage::Ack { revision: 1 }).await?;
    let (code, message) = rude.error().await?;
    ensure!(code == ErrorCode::Unexpected && message.contains("must be hello"), "{message}");
    ensure!(rude.closed().await? == Some(close::PROTOCOL_ERROR));
    let mut impostor = TestAgent::connect(&served, &other).await?;
    impostor.enrolled.device_id = enrolled.device_id;
    impostor
        .send(&AgentMessage::Hello {
            device_id: enrolled.device_id,
            public_key: other.public_key.clone(),
            applied_revision: None,
            capabilities: vec![],
            agent_version: "test".into(),
            cloud_host: None,
        })
        .await?;
    ensure!(impostor.error().await?.0 == ErrorCode::Unexpected);
    ensure!(impostor.closed().await? == Some(close::POLICY_VIOLATION));

    // And the first session is still being served.
    agent.barrier().await?;
    ensure!(device_json(app, &org, other.device_id).await?["status"]["state"] == "offline");
    Ok(())
}

pub async fn reports_are_stored_and_served(url: String) -> anyhow::Result<()> {
    let config = SessionConfig { follow_keepalive: Duration::from_millis(50), ..SessionConfig::default() };
    let served = TestApp::serve(&url, config).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let pool = pool(app, &org).await?;
    let enrolled = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let spare = enrolled_device(app, &org, &pool, "spare", 2).await?;
    let (web, placement) = placed_application(app, &org, "web", enrolled.device_id).await?;
    let web_revision = app.get(&format!("/v1/applications/{web}"), key).await?.u64("/revision")?;

    // Another organization with its own connected device.
    let rival = app.org("rival").await?;
    let rival_pool = self::pool(app, &rival).await?;
    let intruder = enrolled_device(app, &rival, &rival_pool, "intruder", 3).await?;
    let mut intruder_agent = TestAgent::connect(&served, &intruder).await?;
    intruder_agent.hello(None).await?;

    let status_path = format!("/v1/applications/{web}/status");
    let status = app.get(&status_path, key).await?.expect(200)?.body;
    ensure!(status["phase"] == "pending" && status["revision"].is_null(), "{status}");
    ensure!(status["device_id"] == enrolled.device_id.to_string() && status["application_revision"] == web_revision);

    let mut agent = TestAgent::connect(&served, &enrolled).await?;
    agent.hello(None).await?;
    let now = chrono::Utc::now();
    let line = |text: &str| LogLine { at: now, stream: LogStream::Stdout, line: text.to_owned() };
    let status_report = |phase, message: &str| AgentMessage::Status {
        applications: vec![edgible::protocol::v1::ApplicationStatus {
            application_id: web,
            revision: web_revision,
            phase,
            message: Some(message.to_owned()),
        }],
    };
    agent.send(&status_report(Phase::Running, "healthy")).await?;
    agent.send(&AgentMessage::Event { application_id: Some(web), at: now, message: "started".into() }).await?;
    agent.send(&AgentMessage::Event { application_id: None, at: now, message: "agent started".into() }).await?;
    agent.send(&AgentMessage::Logs { application_id: web, lines: vec![line("one"), line("two")], dropped: 1 }).await?;
    agent.barrier().await?;

    // Reports about an application of another organization, or not placed on the sender, go
    // nowhere.
    intruder_agent.send(&status_report(Phase::Failed, "pwned")).await?;
    intruder_agent.send(&AgentMessage::Event { application_id: Some(web), at: now, message: "pwned".into() }).await?;
    intruder_agent.send(&AgentMessage::Logs { application_id: web, lines: vec![line("pwned")], dropped: 0 }).await?;
    intruder_agent.barrier().await?;
    let mut spare_agent = TestAgent::connect(&served, &spare).await?;
    spare_agent.hello(None).await?;
    spare_agent.send(&status_report(Phase::Stopped, "not mine")).await?;
    spare_agent.barrier().await?;

    let status = app.get(&status_path, key).await?.expect(200)?.body;
    ensure!(status["phase"] == "running" && status["message"] == "healthy", "{status}");
    ensure!(status["revision"] == web_revision && status["reported_at"].is_string(), "{status}");

    let events = app.get(&format!("/v1/events?application_id={web}"), key).await?.expect(200)?.body;
    let messages: Vec<&str> =
        events["items"].as_array().context("items")?.iter().filter_map(|e| e["message"].as_str()).collect();
    ensure!(messages == ["started"], "{events}");
    let all = app.get("/v1/events", key).await?.expect(200)?.body;
    let messages: Vec<&str> =
        all["items"].as_array().context("items")?.iter().filter_map(|e| e["message"].as_str()).collect();
    ensure!(messages == ["agent started", "started"], "newest first: {all}");
    let by_device = app.get(&format!("/v1/events?device_id={}&limit=1", enrolled.device_id), key).await?.expect(200)?;
    ensure!(by_device.body["items"].as_array().map(Vec::len) == Some(1) && by_device.body["next_cursor"].is_string());

    let logs = app.get(&format!("/v1/applications/{web}/logs"), key).await?.expect(200)?.body;
    let lines: Vec<&str> =
        logs["lines"].as_array().context("lines")?.iter().filter_map(|l| l["line"].as_str()).collect();
    ensure!(lines == ["one", "two"] && logs["dropped"] == 1, "{logs}");
    let tail = app.get(&format!("/v1/applications/{web}/logs?limit=1"), key).await?.expect(200)?.body;
    ensure!(tail["lines"].as_array().map(Vec::len) == Some(1) && tail["lines"][0]["line"] == "two", "{tail}");

    // Following: the backlog, then new lines as they arrive.
    let client = edgible::Client::new(&served.base, key)?;
    let mut follow = Box::pin(client.follow_logs(&web, Some(1)).await?);
    let first = tokio::time::timeout(FRAME_WAIT, follow.next()).await?.context("the follow ended")??;
    ensure!(first.line == "two" && first.device_id == enrolled.device_id);
    agent.send(&AgentMessage::Logs { application_id: web, lines: vec![line("three")], dropped: 0 }).await?;
    let next = tokio::time::timeout(FRAME_WAIT, follow.next()).await?.context("the follow ended")??;
    ensure!(next.line == "three", "{next:?}");
    ensure!(served.state.agents().logs.followers(web) == 1);
    drop(follow);
    eventually("the follower is gone", || async { Ok(served.state.agents().logs.followers(web) == 0) }).await?;

    // The sdk client reads the same.
    let status = client.application_status(&web).await?;
    ensure!(status.phase == edgible::model::ApplicationPhase::Running);
    ensure!(client.logs(&web, None).await?.lines.len() == 3);
    let events =
        client.events(&edgible::client::EventQuery { application_id: Some(web), ..Default::default() }).await?;
    ensure!(events.items.len() == 1);

    // Other organizations see none of it.
    for path in
        [status_path.clone(), format!("/v1/applications/{web}/logs"), format!("/v1/events?application_id={web}")]
    {
        app.get(&path, &rival.admin_key).await?.expect_error(404, "not_found", None)?;
    }
    app.get(&format!("/v1/events?device_id={}", enrolled.device_id), &rival.admin_key).await?.expect_error(
        404,
        "not_found",
        None,
    )?;
    let rival_events = app.get("/v1/events", &rival.admin_key).await?.expect(200)?.body;
    ensure!(rival_events["items"].as_array().is_some_and(Vec::is_empty), "{rival_events}");
    app.get("/v1/events?limit=0", key).await?.expect_error(400, "bad_request", Some("limit"))?;
    app.get("/v1/events?application_id=nope", key).await?.expect_error(400, "bad_request", Some("application_id"))?;

    // Moving the application is a migration (the old device's status is forgotten at cutover:
    // `migrations.rs`).
    app.put(
        &format!("/v1/placements/{placement}"),
        key,
        json!({"strategy": "serving-device", "application_id": web, "device_id": spare.device_id}),
    )
    .await?
    .expect(200)?;
    // Until cutover the application runs (and is reported) where it was.
    let status = app.get(&status_path, key).await?.expect(200)?.body;
    ensure!(status["phase"] == "running" && status["device_id"] == enrolled.device_id.to_string(), "{status}");
    Ok(())
}

pub async fn events_are_bounded_per_application(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let enrolled = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let (web, _) = placed_application(app, &org, "web", enrolled.device_id).await?;
    let organization_id: OrganizationId = org.id.parse()?;
    let device = served.db.device(organization_id, enrolled.device_id).await?;
    let kept = edgible_server::db::EVENTS_KEPT;
    for index in 0..kept + 5 {
        served.db.record_event(&device, Some(web), chrono::Utc::now(), &format!("event {index}")).await?;
    }
    let mut messages = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = app.get(&format!("/v1/events?application_id={web}&limit=1000{cursor}"), &org.admin_key).await?;
        let page = page.expect(200)?.body;
        for event in page["items"].as_array().context("items")? {
            messages.push(event["message"].as_str().context("message")?.to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    ensure!(messages.len() as u64 == kept, "{} events kept", messages.len());
    ensure!(messages.first().map(String::as_str) == Some(&*format!("event {}", kept + 4)));
    ensure!(messages.last().map(String::as_str) == Some("event 5"));
    Ok(())
}
