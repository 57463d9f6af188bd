//! Sleep, wake and usage through the real proxy and a real process workload: the reconciler
//! puts an idle application to sleep, the first request wakes it (one wake for concurrent
//! requests), a workload that cannot wake gets 503, and the usage counters match the requests
//! and bytes the test sent. Prints the wake latency for `stop` and `suspend`.

#![allow(clippy::unwrap_used)]

#[path = "support/harness.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edgible::model::Application;
use edgible::protocol::v1::Phase;
use edgible_agent::proxy::{AccessControl, CertificateStore, Proxy, ProxyConfig, Route, RouteTable};
use edgible_agent::reconcile::ReconcilerHandle;
use edgible_agent::sleep::{SleepState, SleepTable};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use support::{Harness, application, free_port, python, wait_phase, wait_until};

struct Fixture {
    _harness: Harness,
    agent: ReconcilerHandle,
    sleep: Arc<SleepTable>,
    proxy: SocketAddr,
    client: Arc<ClientConfig>,
    _stop: watch::Sender<bool>,
}

/// A web server application with the given sleep mode, idle after one second.
fn web(name: &str, port: u16, mode: &str, command: &str, args: serde_json::Value) -> Application {
    application(
        name,
        1,
        json!({
            "port": port,
            "workload": {"process": {"command": command, "args": args}},
            "sleep": {"idle_timeout_seconds": 1, "mode": mode, "wake_timeout_seconds": 5},
        }),
    )
}

fn python_web(name: &str, port: u16, mode: &str, dir: &std::path::Path) -> Result<Application> {
    let args = json!(["-m", "http.server", port.to_string(), "--bind", "127.0.0.1", "--directory", dir]);
    Ok(web(name, port, mode, &python()?, args))
}

async fn fixture(applications: Vec<Application>) -> Result<Fixture> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let harness = Harness::new();
    let agent = harness.agent()?;
    let sleep = agent.sleep_table();
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_der: CertificateDer<'static> = ca_params.self_signed(&ca_key)?.der().clone();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let certificates = CertificateStore::new();
    let routes = RouteTable::new();
    for application in &applications {
        let name = application.spec.hostnames[0].as_str().to_owned();
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec![name.clone()])?.signed_by(&key, &issuer)?;
        certificates.insert_pem(&name, leaf.pem().as_bytes(), key.serialize_pem().as_bytes())?;
        routes.insert(&name, Route { port: application.spec.port, raw_tcp: false });
    }
    let config = ProxyConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let access = AccessControl::new(edgible_agent::proxy::access::cookies::CookieKey::random());
    let proxy = Proxy::bind_with_sleep(config, certificates, routes, access, Arc::clone(&sleep)).await?;
    let address = proxy.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(proxy.run(stopped));
    agent.update(edgible_agent::reconcile::DesiredUpdate::full(1, applications)).await?;
    let mut roots = RootCertStore::empty();
    roots.add(ca_der)?;
    let mut client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Fixture { _harness: harness, agent, sleep, proxy: address, client: Arc::new(client), _stop: stop })
}

impl Fixture {
    /// One HTTP/1.1 GET over its own connection, like an edge relays it; answers the status,
    /// the bytes sent and the bytes received (plaintext, inside TLS).
    async fn get(&self, host: &str) -> Result<(u16, u64, u64)> {
        let mut stream = TcpStream::connect(self.proxy).await?;
        let SocketAddr::V4(destination) = self.proxy else { anyhow::bail!("IPv4 only") };
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7]);
        header.extend_from_slice(&destination.ip().octets());
        header.extend_from_slice(&50123u16.to_be_bytes());
        header.extend_from_slice(&destination.port().to_be_bytes());
        stream.write_all(&header).await?;
        let connector = TlsConnector::from(Arc::clone(&self.client));
        let mut tls = connector.connect(ServerName::try_from(host.to_owned())?, stream).await?;
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut answer)).await.context("answer")??;
        let text = String::from_utf8_lossy(&answer);
        let status = text.get(9..12).and_then(|code| code.parse().ok()).context("a status line")?;
        Ok((status, request.len() as u64, answer.len() as u64))
    }

    async fn wait_asleep(&self, application: &Application) -> Result<()> {
        let what = format!("{} asleep", application.spec.name);
        support::wait_report(&mut self.agent.report(), &what, |report| {
            (report.status(application.id)?.phase == Phase::Sleeping).then_some(())
        })
        .await?;
        ensure!(self.sleep.state(application.id) == Some(SleepState::Sleeping));
        Ok(())
    }
}

fn events(agent: &ReconcilerHandle) -> Vec<String> {
    agent.events().snapshot().into_iter().map(|event| event.message).collect()
}

async fn sleep_then_wake(mode: &str) -> Result<()> {
    let port = free_port()?;
    let name = format!("sleepy-{mode}");
    let served = tempfile::tempdir()?;
    let app = python_web(&name, port, mode, served.path())?;
    let fixture = fixture_for(app.clone()).await?;
    let host = format!("{name}.example.test");
    wait_phase(&mut fixture.agent.report(), app.id, 1, Phase::Running).await?;
    wait_until("the port to answer", || std::net::TcpStream::connect(("127.0.0.1", port)).ok()).await?;
    let _ = fixture.sleep.take_usage();
    fixture.wait_asleep(&app).await?;
    let asleep = fixture.agent.report().borrow().workloads.get(&app.id).cloned();
    if mode == "stop" {
        ensure!(asleep.is_none(), "a stopped application has no workload: {asleep:?}");
        ensure!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing listens while asleep");
    } else {
        ensure!(asleep.is_some(), "a suspended application keeps its workload");
        ensure!(!answers_directly(port).await, "a suspended workload does not answer");
    }

    let started = std::time::Instant::now();
    let (status, mut sent, mut received) = fixture.get(&host).await?;
    let latency = started.elapsed();
    ensure!(status == 200, "the first request after sleep answered {status}");
    println!("wake-to-answer ({mode}, python http.server): {latency:?}");
    let messages = events(&fixture.agent);
    ensure!(messages.iter().any(|m| m.contains("is idle")), "a sleep event: {messages:?}");
    ensure!(messages.iter().any(|m| m.contains("waking")), "a wake event: {messages:?}");

    // Asleep again, then concurrent requests share one wake.
    fixture.wait_asleep(&app).await?;
    let requests: Vec<_> = (0..8).map(|_| fixture.get(&host)).collect();
    let answers = futures::future::join_all(requests).await;
    for answer in answers {
        let (status, out, back) = answer?;
        ensure!(status == 200, "a concurrent request answered {status}");
        sent += out;
        received += back;
    }
    let (status, out, back) = fixture.get(&host).await?;
    ensure!(status == 200);
    sent += out;
    received += back;
    let usage = fixture.sleep.take_usage();
    let usage = usage.get(&app.id).context("usage of the application")?;
    ensure!(usage.wakes == 2, "one wake for the first request, one for the concurrent ones: {usage:?}");
    ensure!(usage.requests == 10, "every request counted once: {usage:?}");
    ensure!(usage.bytes_in == sent && sent > 0, "bytes in {} vs sent {sent}", usage.bytes_in);
    ensure!(usage.bytes_out == received, "bytes out {} vs received {received}", usage.bytes_out);
    ensure!(usage.awake_ms > 0);
    Ok(())
}

/// Whether the workload answers an HTTP request on its port within half a second.
async fn answers_directly(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut byte = [0u8; 1];
        stream.read(&mut byte).await.ok().filter(|count| *count > 0)
    };
    tokio::time::timeout(Duration::from_millis(500), attempt).await.ok().flatten().is_some()
}

async fn fixture_for(app: Application) -> Result<Fixture> {
    fixture(vec![app]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_mode_sleeps_when_idle_and_wakes_on_request() -> Result<()> {
    sleep_then_wake("stop").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_mode_sleeps_when_idle_and_wakes_on_request() -> Result<()> {
    sleep_then_wake("suspend").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_cannot_wake_answers_503() -> Result<()> {
    let port = free_port()?;
    // Serves once; after sleeping, every start exits at once (the marker file exists).
    let work = tempfile::tempdir()?;
    let marker = work.path().join("served");
    let script = format!(
        "if [ -e {marker} ]; then exit 3; fi; touch {marker}; exec {python} -m http.server {port} --bind 127.0.0.1",
        marker = marker.display(),
        python = python()?,
    );
    let app = web("doomed", port, "stop", "/bin/sh", json!(["-c", script]));
    let fixture = fixture_for(app.clone()).await?;
    wait_phase(&mut fixture.agent.report(), app.id, 1, Phase::Running).await?;
    fixture.wait_asleep(&app).await?;
    let started = std::time::Instant::now();
    let (status, _, _) = fixture.get("doomed.example.test").await?;
    ensure!(status == 503, "a failed wake answered {status}");
    ensure!(started.elapsed() < Duration::from_secs(5), "failed before the wake timeout: the workload exited");
    wait_until("a wake failure event", || {
        events(&fixture.agent).iter().any(|message| message.contains("failed to wake")).then_some(())
    })
    .await?;
    fixture.wait_asleep(&app).await?;
    Ok(())
}
