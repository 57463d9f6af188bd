//! Edges as objects, their enrollment and push session, what agents learn about them, and
//! the internal CA: over the API and real sockets (a test edge and test agents speaking the
//! protocol with `tokio-tungstenite`).

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use axum::http::{Method, header};
use edgible::model::{ApplicationId, EdgeId, Revision};
use edgible::protocol::v1::{AgentMessage, EdgeMessage, EdgeRoute, EdgeServerMessage, ErrorCode, ServerMessage};
use edgible::protocol::{close, decode, encode};
use edgible_server::db::Db;
use edgible_server::hub::agent::SessionConfig;
use futures::{SinkExt, StreamExt};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::agents::{TestAgent, enrolled_device, placed_application, pool, public_key};
use crate::crud::{Collection, life_cycle};
use crate::support::{Org, Served, TestApp, TestRequest, application, eventually};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const FRAME_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) async fn create_edge(
    app: &TestApp,
    org: &Org,
    pool: &str,
    name: &str,
) -> anyhow::Result<crate::support::Answer> {
    app.post("/v1/edges", &org.admin_key, json!({"name": name, "pool_id": pool, "endpoint": "203.0.113.1:51820"}))
        .await?
        .expect(201)
}

async fn enroll(app: &TestApp, token: &str, key: &str) -> anyhow::Result<crate::support::Answer> {
    app.send(TestRequest::new(Method::POST, "/v1/edge/enroll").json(&json!({"token": token, "public_key": key}))).await
}

/// An edge that enrolled.
#[derive(Debug, Clone)]
struct EnrolledEdge {
    edge_id: EdgeId,
    public_key: String,
    credential: String,
    tunnel_address: Ipv4Addr,
}

async fn enrolled_edge(app: &TestApp, org: &Org, pool: &str, name: &str, seed: u8) -> anyhow::Result<EnrolledEdge> {
    let created = create_edge(app, org, pool, name).await?;
    let answer = enroll(app, &created.str("/enrollment_token")?, &public_key(seed)).await?.expect(200)?;
    Ok(EnrolledEdge {
        edge_id: answer.str("/edge/id")?.parse()?,
        public_key: public_key(seed),
        credential: answer.str("/credential")?,
        tunnel_address: answer.str("/edge/status/tunnel_address")?.parse()?,
    })
}

async fn open_edge(served: &Served, credential: &str) -> anyhow::Result<Socket> {
    let url = format!("{}/v1/edge/connect", served.base.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {credential}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

/// A test edge speaking the protocol over a real socket.
struct TestEdge {
    socket: Socket,
    enrolled: EnrolledEdge,
}

/// An `edge_config` as plain values.
#[derive(Debug)]
struct Config {
    revision: Revision,
    peers: Vec<String>,
    routes: Vec<EdgeRoute>,
}

impl TestEdge {
    async fn connect(served: &Served, enrolled: &EnrolledEdge) -> anyhow::Result<TestEdge> {
        Ok(TestEdge { socket: open_edge(served, &enrolled.credential).await?, enrolled: enrolled.clone() })
    }

    /// Sends `edge_hello`; answers the welcome and the first configuration.
    async fn hello(&mut self) -> anyhow::Result<(EdgeServerMessage, Config)> {
        self.send(&EdgeMessage::EdgeHello {
            edge_id: self.enrolled.edge_id,
            public_key: self.enrolled.public_key.clone(),
            applied_revision: None,
            edge_version: "test".into(),
        })
        .await?;
        let welcome = self.recv().await?;
        ensure!(matches!(welcome, EdgeServerMessage::EdgeWelcome { .. }), "expected edge_welcome, got {welcome:?}");
        Ok((welcome, self.config().await?))
    }

    async fn send(&mut self, message: &EdgeMessage) -> anyhow::Result<()> {
        Ok(self.socket.send(Message::text(encode(message))).await?)
    }

    async fn recv(&mut self) -> anyhow::Result<EdgeServerMessage> {
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

    /// The next `edge_config`, answering pings on the way.
    async fn config(&mut self) -> anyhow::Result<Config> {
        loop {
            match self.recv().await? {
                EdgeServerMessage::EdgeConfig { revision, peers, routes, .. } => {
                    let peers = peers.into_iter().map(|peer| peer.public_key).collect();
                    return Ok(Config { revision, peers, routes });
                }
                EdgeServerMessage::Ping { nonce } => self.send(&EdgeMessage::Pong { nonce }).await?,
                other => bail!("expected an edge_config, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; answers the close code.
    async fn closed(&mut self) -> anyhow::Result<Option<u16>> {
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

/// The next `edges` frame an agent gets: (public key, endpoint) pairs.
async fn agent_edges(agent: &mut TestAgent) -> anyhow::Result<Vec<(String, String)>> {
    match agent.recv().await? {
        ServerMessage::Edges { edges } => Ok(edges.into_iter().map(|edge| (edge.public_key, edge.endpoint)).collect()),
        other => bail!("expected edges, got {other:?}"),
    }
}

fn route_states(config: &Config) -> Vec<(String, bool)> {
    config.routes.iter().map(|route| (route.hostname.to_string(), route.online)).collect()
}

pub async fn crud_edges(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let pool = pool(&app, &org).await?;
    let other_pool = app
        .post("/v1/device-pools", key, json!({"name": "office", "tunnel_cidr": "100.101.0.0/24"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let first_device = app.post("/v1/devices", key, json!({"name": "laptop", "pool_id": pool})).await?.expect(201)?;
    ensure!(first_device.body["device"]["status"]["tunnel_address"] == "100.96.0.1");

    let updated = life_cycle(
        &app,
        key,
        Collection { path: "/v1/edges", created_object: "/edge" },
        json!({"name": "gateway", "pool_id": pool, "endpoint": "203.0.113.1:51820"}),
        json!({"name": "gateway-2", "pool_id": pool, "endpoint": "edge.example.test:51821"}),
        Some("gateway"),
    )
    .await?;
    ensure!(updated["spec"]["endpoint"] == "edge.example.test:51821", "{updated}");
    ensure!(updated["status"]["tunnel_address"] == "100.96.0.2", "edges share the pool's addresses: {updated}");
    ensure!(updated["status"]["state"] == "pending", "{updated}");

    // The deleted edge's address is free again, and a device never gets an edge's address.
    let created = create_edge(&app, &org, &pool, "gateway").await?;
    ensure!(created.str("/enrollment_token")?.starts_with("edgenr_"), "{}", created.text);
    ensure!(created.body["edge"]["status"]["tunnel_address"] == "100.96.0.2", "{}", created.text);
    let edge = created.str("/edge/id")?;
    let fetched = app.get(&format!("/v1/edges/{edge}"), key).await?.expect(200)?;
    ensure!(!fetched.text.contains(&created.str("/enrollment_token")?), "the token is shown only at creation");
    let second_device = app.post("/v1/devices", key, json!({"name": "desk", "pool_id": pool})).await?.expect(201)?;
    ensure!(second_device.body["device"]["status"]["tunnel_address"] == "100.96.0.3", "{}", second_device.text);

    // The pool cannot change; bad endpoints, names and pools are refused naming the field.
    let path = format!("/v1/edges/{edge}");
    let moved = json!({"name": "gateway", "pool_id": other_pool, "endpoint": "203.0.113.1:51820"});
    app.put(&path, key, moved).await?.expect_error(422, "invalid", Some("pool_id"))?;
    for endpoint in ["203.0.113.1", "203.0.113.1:0", "bad_host:51820", ""] {
        let body = json!({"name": "gateway", "pool_id": pool, "endpoint": endpoint});
        app.post("/v1/edges", key, body).await?.expect_error(422, "invalid", Some("endpoint"))?;
    }
    let unknown_pool = json!({"name": "x", "pool_id": uuid::Uuid::now_v7(), "endpoint": "203.0.113.1:51820"});
    app.post("/v1/edges", key, unknown_pool).await?.expect_error(422, "invalid", Some("pool_id"))?;
    let duplicate = json!({"name": "gateway", "pool_id": pool, "endpoint": "203.0.113.9:51820"});
    app.post("/v1/edges", key, duplicate).await?.expect_error(409, "conflict", Some("name"))?;

    // Another organization sees none of it.
    let other = app.org("globex").await?;
    app.get(&path, &other.admin_key).await?.expect_error(404, "not_found", None)?;
    ensure!(app.get("/v1/edges", &other.admin_key).await?.expect(200)?.ids()?.is_empty());
    let foreign = json!({"name": "mine", "pool_id": pool, "endpoint": "203.0.113.1:51820"});
    app.post("/v1/edges", &other.admin_key, foreign).await?.expect_error(422, "invalid", Some("pool_id"))?;

    // A pool with an edge cannot be deleted.
    for device in [&first_device, &second_device] {
        app.delete(&format!("/v1/devices/{}", device.str("/device/id")?), key).await?.expect(204)?;
    }
    let refused = app.delete(&format!("/v1/device-pools/{pool}"), key).await?.expect_error(409, "conflict", None)?;
    ensure!(refused.text.contains("edge"), "{}", refused.text);
    app.delete(&path, key).await?.expect(204)?;
    app.delete(&format!("/v1/device-pools/{pool}"), key).await?.expect(204)?;
    Ok(())
}

pub async fn edges_enroll_and_follow_their_pool(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let laptop = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    // A device that never enrolled is no peer.
    app.post("/v1/devices", &org.admin_key, json!({"name": "spare", "pool_id": pool})).await?.expect(201)?;
    let (web, _) = placed_application(app, &org, "web", laptop.device_id).await?;

    // Another organization, with the same network: none of it may reach this pool's edge.
    let globex = app.org("globex").await?;
    let globex_pool = crate::agents::pool(app, &globex).await?;
    let globex_device = enrolled_device(app, &globex, &globex_pool, "server", 2).await?;
    placed_application(app, &globex, "shop", globex_device.device_id).await?;

    // The laptop's agent is connected before the edge exists.
    let mut agent = TestAgent::connect(&served, &laptop).await?;
    let (welcome, _) = agent.hello(None).await?;
    let ServerMessage::Welcome { tunnel_cidr, .. } = welcome else { bail!("not a welcome") };
    ensure!(tunnel_cidr == Some("100.96.0.0/24".parse()?), "{tunnel_cidr:?}");

    // Enrollment: once, with a key no device or edge has.
    let created = create_edge(app, &org, &pool, "gateway").await?;
    let token = created.str("/enrollment_token")?;
    enroll(app, &token, &public_key(1)).await?.expect_error(409, "conflict", Some("public_key"))?;
    let answer = enroll(app, &token, &public_key(9)).await?.expect(200)?;
    ensure!(answer.str("/credential")?.starts_with("edgedge_"), "{}", answer.text);
    ensure!(answer.body["tunnel_cidr"] == "100.96.0.0/24", "{}", answer.text);
    ensure!(answer.body["edge"]["status"]["state"] == "offline", "{}", answer.text);
    enroll(app, &token, &public_key(10)).await?.expect_error(401, "unauthorized", None)?;
    let edge = EnrolledEdge {
        edge_id: answer.str("/edge/id")?.parse()?,
        public_key: public_key(9),
        credential: answer.str("/credential")?,
        tunnel_address: answer.str("/edge/status/tunnel_address")?.parse()?,
    };
    // The agent learns about the enrolled edge.
    ensure!(agent_edges(&mut agent).await? == [(public_key(9), "203.0.113.1:51820".to_owned())]);

    // Only the edge's credential opens its session.
    match open_edge(&served, &laptop.credential).await {
        Err(error) => ensure!(error.to_string().contains("401"), "{error:#}"),
        Ok(_) => bail!("a device credential opened an edge session"),
    }

    let mut test_edge = TestEdge::connect(&served, &edge).await?;
    let (welcome, config) = test_edge.hello().await?;
    let EdgeServerMessage::EdgeWelcome { edge_id, tunnel_address, tunnel_cidr, ping_interval_seconds, .. } = welcome
    else {
        bail!("not a welcome")
    };
    ensure!(edge_id == edge.edge_id && tunnel_address == edge.tunnel_address);
    ensure!(tunnel_cidr == "100.96.0.0/24".parse()? && ping_interval_seconds.is_some());
    ensure!(config.peers == [public_key(1)], "only the pool's enrolled devices are peers: {config:?}");
    ensure!(route_states(&config) == [("web.acme.example.com".to_owned(), true)], "{config:?}");
    ensure!(config.routes[0].device_id == laptop.device_id);
    let edge_json = app.get(&format!("/v1/edges/{}", edge.edge_id), &org.admin_key).await?.expect(200)?;
    ensure!(edge_json.body["status"]["state"] == "online", "{}", edge_json.text);
    let metrics = app.send(TestRequest::new(Method::GET, "/metrics")).await?.expect(200)?.text;
    ensure!(metrics.contains("edgible_hub_connected_edges 1"), "{metrics}");
    ensure!(metrics.contains("edgible_objects{kind=\"edges\"} 1"), "{metrics}");

    // Acks are recorded; acks of revisions never sent are refused.
    test_edge.send(&EdgeMessage::Ack { revision: config.revision }).await?;
    test_edge.send(&EdgeMessage::Ack { revision: config.revision + 1000 }).await?;
    let EdgeServerMessage::Error { code, message } = test_edge.recv().await? else { bail!("expected an error") };
    ensure!(code == ErrorCode::Unexpected && message.contains("ack of revision"), "{message}");
    let applied = app.get(&format!("/v1/edges/{}", edge.edge_id), &org.admin_key).await?.expect(200)?;
    ensure!(applied.u64("/status/applied_revision")? == config.revision, "{}", applied.text);

    // The device going offline, and back, reaches the edge with newer revisions.
    drop(agent);
    let offline = test_edge.config().await?;
    ensure!(route_states(&offline) == [("web.acme.example.com".to_owned(), false)], "{offline:?}");
    ensure!(offline.revision > config.revision);
    let mut agent = TestAgent::connect(&served, &laptop).await?;
    agent.hello(None).await?;
    let online = test_edge.config().await?;
    ensure!(route_states(&online) == [("web.acme.example.com".to_owned(), true)], "{online:?}");
    ensure!(online.revision > offline.revision);

    // A new placement adds its hostnames; an application change that keeps them sends nothing.
    let (api, _) = placed_application(app, &org, "api", laptop.device_id).await?;
    let _ = agent.update().await?;
    let placed = test_edge.config().await?;
    let expected = [("api.acme.example.com".to_owned(), true), ("web.acme.example.com".to_owned(), true)];
    ensure!(route_states(&placed) == expected, "{placed:?}");
    let mut new_port = application("web", &["web.acme.example.com"]);
    new_port["port"] = json!(9090);
    app.put(&format!("/v1/applications/{web}"), &org.admin_key, new_port).await?.expect(200)?;
    let _ = agent.update().await?;
    // So the next configuration the edge gets is the one without `api`.
    app.delete(&format!("/v1/applications/{api}"), &org.admin_key).await?.expect(204)?;
    let _ = agent.update().await?;
    let removed = test_edge.config().await?;
    ensure!(route_states(&removed) == [("web.acme.example.com".to_owned(), true)], "{removed:?}");

    // A device enrolling later becomes a peer.
    let desk = enrolled_device(app, &org, &pool, "desk", 3).await?;
    let with_desk = test_edge.config().await?;
    ensure!(with_desk.peers == [public_key(1), public_key(3)], "{with_desk:?}");
    ensure!(desk.device_id != laptop.device_id);

    // A new endpoint reaches the agent; deleting the edge ends its session and empties the
    // agent's set.
    let path = format!("/v1/edges/{}", edge.edge_id);
    let moved = json!({"name": "gateway", "pool_id": pool, "endpoint": "edge.example.test:51999"});
    app.put(&path, &org.admin_key, moved).await?.expect(200)?;
    ensure!(agent_edges(&mut agent).await? == [(public_key(9), "edge.example.test:51999".to_owned())]);
    app.delete(&path, &org.admin_key).await?.expect(204)?;
    let EdgeServerMessage::Error { message, .. } = test_edge.recv().await? else { bail!("expected an error") };
    ensure!(message.contains("deleted"), "{message}");
    ensure!(test_edge.closed().await? == Some(close::POLICY_VIOLATION));
    ensure!(agent_edges(&mut agent).await?.is_empty());
    eventually("the edge session is gone", || async { Ok(served.state.edges().hub.is_empty()) }).await?;
    Ok(())
}

pub async fn a_bad_edge_hello_is_refused(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let edge = enrolled_edge(app, &org, &pool, "gateway", 9).await?;

    let mut test_edge = TestEdge::connect(&served, &edge).await?;
    test_edge
        .send(&EdgeMessage::EdgeHello {
            edge_id: edge.edge_id,
            public_key: public_key(8),
            applied_revision: None,
            edge_version: "test".into(),
        })
        .await?;
    let EdgeServerMessage::Error { message, .. } = test_edge.recv().await? else { bail!("expected an error") };
    ensure!(message.contains("public key"), "{message}");
    ensure!(test_edge.closed().await? == Some(close::POLICY_VIOLATION));

    let mut test_edge = TestEdge::connect(&served, &edge).await?;
    test_edge.socket.send(Message::text(r#"{"v":1,"type":"pong","nonce":1}"#)).await?;
    let EdgeServerMessage::Error { message, .. } = test_edge.recv().await? else { bail!("expected an error") };
    ensure!(message.contains("edge_hello"), "{message}");
    ensure!(test_edge.closed().await? == Some(close::PROTOCOL_ERROR));

    // A good session goes on after hostile frames.
    let mut test_edge = TestEdge::connect(&served, &edge).await?;
    test_edge.hello().await?;
    test_edge.socket.send(Message::text("{")).await?;
    let EdgeServerMessage::Error { code, .. } = test_edge.recv().await? else { bail!("expected an error") };
    ensure!(code == ErrorCode::Malformed);
    // A reconnect replaces the session.
    let mut newer = TestEdge::connect(&served, &edge).await?;
    newer.hello().await?;
    let EdgeServerMessage::Error { code, .. } = test_edge.recv().await? else { bail!("expected an error") };
    ensure!(code == ErrorCode::Replaced);
    Ok(())
}

/// Checks that `leaf_pem` is valid for `name` under the CA `ca_pem`.
pub(crate) fn verify(ca_pem: &str, leaf_pem: &str, name: &str) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes())?;
    verifier.verify_server_cert(&leaf, &[], &ServerName::try_from(name.to_owned())?, &[], UnixTime::now())?;
    Ok(())
}

pub(crate) fn csr(names: &[&str]) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>())?;
    Ok(params.serialize_request(&key)?.pem()?)
}

pub(crate) async fn request_certificate(
    agent: &mut TestAgent,
    application_id: ApplicationId,
    csr_pem: String,
) -> anyhow::Result<ServerMessage> {
    agent.send(&AgentMessage::CertificateRequest { application_id, csr_pem }).await?;
    agent.recv().await
}

pub async fn certificates_are_signed_for_placed_applications(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let org = app.org("acme").await?;
    let pool = pool(app, &org).await?;
    let laptop = enrolled_device(app, &org, &pool, "laptop", 1).await?;
    let desk = enrolled_device(app, &org, &pool, "desk", 2).await?;
    let (web, _) = placed_application(app, &org, "web", laptop.device_id).await?;
    let (elsewhere, _) = placed_application(app, &org, "elsewhere", desk.device_id).await?;
    let ca_pem = app.send(TestRequest::new(Method::GET, "/v1/ca.pem")).await?.expect(200)?;
    ensure!(ca_pem.headers.get(header::CONTENT_TYPE).is_some_and(|value| value == "application/x-pem-file"));
    let ca_pem = ca_pem.text;

    let mut agent = TestAgent::connect(&served, &laptop).await?;
    agent.hello(None).await?;
    let hostname = "web.acme.example.com";
    let ServerMessage::Certificate { application_id, chain_pem, hostnames, not_after } =
        request_certificate(&mut agent, web, csr(&[hostname])?).await?
    else {
        bail!("expected a certificate");
    };
    ensure!(application_id == web && hostnames.iter().map(ToString::to_string).eq([hostname.to_owned()]));
    let days = (not_after - chrono::Utc::now()).num_days();
    ensure!((29..=30).contains(&days), "a leaf is valid 30 days, not {days}");
    verify(&ca_pem, &chain_pem, hostname)?;
    ensure!(verify(&ca_pem, &chain_pem, "elsewhere.acme.example.com").is_err());
    let status = app.get(&format!("/v1/applications/{web}/status"), &org.admin_key).await?.expect(200)?;
    ensure!(status.str("/certificate_status")? == "valid", "{}", status.text);
    let expires: chrono::DateTime<chrono::Utc> = status.str("/certificate_expires_at")?.parse()?;
    ensure!(expires == not_after, "{}", status.text);

    // Refusals name the application and the reason; the session goes on.
    let refusals = [
        (elsewhere, csr(&["elsewhere.acme.example.com"])?, "not placed on this device"),
        (web, csr(&[hostname, "evil.example.com"])?, "evil.example.com"),
        (web, "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n".to_owned(), "csr_pem"),
    ];
    for (application_id, csr_pem, reason) in refusals {
        let answer = request_certificate(&mut agent, application_id, csr_pem).await?;
        let ServerMessage::Error { code, message } = answer else { bail!("expected a refusal, got {answer:?}") };
        ensure!(code == ErrorCode::Unexpected, "{code:?}");
        ensure!(message.contains(&application_id.to_string()) && message.contains(reason), "{message}");
    }
    agent.barrier().await?;
    Ok(())
}

pub async fn the_ca_is_kept_across_restarts(url: String) -> anyhow::Result<()> {
    // Two servers starting at once on an empty database agree on one CA.
    let (first_server, second_server) = (
        edgible_server::AppState::new(Db::connect(&url).await?),
        edgible_server::AppState::new(Db::connect(&url).await?),
    );
    let (one, two) = tokio::join!(first_server.certificate_authority(), second_server.certificate_authority());
    ensure!(one?.certificate_pem() == two?.certificate_pem(), "two servers generated two CAs");

    let app = TestApp::new(&url).await?;
    // Public: no key needed.
    let first = app.send(TestRequest::new(Method::GET, "/v1/ca.pem")).await?.expect(200)?.text;
    ensure!(first.starts_with("-----BEGIN CERTIFICATE-----"), "{first}");
    let again = app.send(TestRequest::new(Method::GET, "/v1/ca.pem")).await?.expect(200)?.text;
    ensure!(again == first);

    // Another server process on the same database serves the same CA.
    let db = Db::connect(&url).await?;
    let state = edgible_server::AppState::new(db);
    let restarted = state.certificate_authority().await?.certificate_pem().to_owned();
    ensure!(restarted == first, "a second server generated another CA");

    // And signs with it: a leaf it issues verifies against the first server's PEM.
    let hostnames = ["api.example.test".parse()?];
    let signed =
        state.certificate_authority().await?.sign(&csr(&["api.example.test"])?, &hostnames, chrono::Utc::now())?;
    verify(&first, &signed.chain_pem, "api.example.test")?;
    Ok(())
}
