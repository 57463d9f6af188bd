//! Wake-to-first-byte of a sleeping process workload through the device proxy, for `stop`
//! and `suspend` (cgroup freezer, or SIGSTOP without one) sleep modes. Not a test: it prints
//! medians for the README.
//!
//! Each round waits until the reconciler has put the application to sleep (idle timeout 1 s),
//! then times one HTTPS request through the proxy from its first byte sent to the first byte
//! of the answer. The workload is `python3 -m http.server` (or `--command CMD` taking the port
//! as `$PORT`); its own cold start (spawn until the port accepts) is measured alone first, so
//! the proxy's and reconciler's share of a `stop` wake can be told apart.
//!
//! `cargo run -p edgible-agent --example wake_bench -- [--rounds N] [--command CMD]`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgible::model::Application;
use edgible::protocol::v1::Phase;
use edgible_agent::driver::{Driver, ProcessDriver, ProcessDriverConfig};
use edgible_agent::proxy::access::cookies::CookieKey;
use edgible_agent::proxy::{AccessControl, CertificateStore, Proxy, ProxyConfig, Route, RouteTable};
use edgible_agent::reconcile::{DesiredUpdate, Drivers, Reconciler, ReconcilerConfig, Shutdown};
use edgible_agent::state::StateDir;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const HOST: &str = "bench.example.test";

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut rounds = 10usize;
    let mut command = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--command" => command = Some(args.next().context("--command CMD")?),
            other => bail!("unknown argument {other}; usage: [--rounds N] [--command CMD]"),
        }
    }
    let rounds = rounds.clamp(1, 1000);
    let command = match command {
        Some(command) => command,
        None => "exec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory /tmp".to_owned(),
    };

    let cold = median(cold_starts(&command, rounds).await?);
    println!("workload cold start alone (spawn → port accepts), median of {rounds}: {}", millis(cold));
    for mode in ["stop", "suspend"] {
        let samples = wake_rounds(&command, mode, rounds).await?;
        let median = median(samples);
        println!("wake-to-first-byte, mode {mode}, median of {rounds}: {}", millis(median));
        if mode == "stop" {
            println!("  of which beyond the workload's own start: {}", millis(median.saturating_sub(cold)));
        }
    }
    Ok(())
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns the workload `rounds` times and times until its port accepts.
async fn cold_starts(command: &str, rounds: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let port = free_port()?;
        let started = Instant::now();
        let mut child = tokio::process::Command::new("/bin/sh")
            .args(["-c", command])
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = started + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("the workload did not listen within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(started.elapsed());
        child.kill().await?;
    }
    Ok(samples)
}

async fn wake_rounds(command: &str, mode: &str, rounds: usize) -> Result<Vec<Duration>> {
    let temp = tempfile::tempdir()?;
    let port = free_port()?;
    let application: Application = serde_json::from_value(json!({
        "id": edgible::model::ApplicationId::new(),
        "organization_id": edgible::model::OrganizationId::new(),
        "revision": 1,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z",
        "spec": {
            "name": "bench",
            "hostnames": [HOST],
            "port": port,
            "workload": {"process": {"command": "/bin/sh", "args": ["-c", command]}},
            "sleep": {"idle_timeout_seconds": 1, "mode": mode, "wake_timeout_seconds": 30},
        },
    }))?;
    let mut process = ProcessDriverConfig::new(temp.path().join("logs"));
    process.stop_grace = Duration::from_secs(3);
    let drivers = Drivers::new([Arc::new(ProcessDriver::new(process)) as Arc<dyn Driver>]);
    let config = ReconcilerConfig { requeue_interval: Duration::from_secs(1), ..ReconcilerConfig::default() };
    let agent = Reconciler::new(config, StateDir::open(temp.path().join("state"))?, drivers)?.spawn();
    let sleep = agent.sleep_table();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?.der().clone();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![HOST.to_owned()])?.signed_by(&key, &issuer)?;
    let certificates = CertificateStore::new();
    certificates.insert_pem(HOST, leaf.pem().as_bytes(), key.serialize_pem().as_bytes())?;
    let routes = RouteTable::new();
    routes.insert(HOST, Route { port, raw_tcp: false });
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let config = ProxyConfig::new(listen, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let access = AccessControl::new(CookieKey::random());
    let proxy = Proxy::bind_with_sleep(config, certificates, routes, access, sleep).await?;
    let address = proxy.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(proxy.run(stopped));
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let mut client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(client));

    agent.update(DesiredUpdate::full(1, vec![application.clone()])).await?;
    let mut report = agent.report();
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let asleep = tokio::time::timeout(
            Duration::from_secs(60),
            report.wait_for(|report| report.status(application.id).is_some_and(|s| s.phase == Phase::Sleeping)),
        )
        .await
        .is_ok_and(|asleep| asleep.is_ok());
        // (The report's guard is released here: holding it would block the reconciler.)
        if !asleep {
            bail!("the application did not fall asleep within 60 s");
        }
        // The handshake is not part of a wake: the edge's connection arrives first.
        let mut tls = connect(&connector, address).await?;
        let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        let started = Instant::now();
        tls.write_all(request.as_bytes()).await?;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), tls.read(&mut byte)).await??;
        samples.push(started.elapsed());
        if read == 0 {
            bail!("the proxy closed without an answer");
        }
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
    }
    let _ = stop.send(true);
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(samples)
}

async fn connect(connector: &TlsConnector, proxy: SocketAddr) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let SocketAddr::V4(destination) = proxy else { bail!("IPv4 only") };
    let mut stream = TcpStream::connect(proxy).await?;
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7]);
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&50123u16.to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    stream.write_all(&header).await?;
    Ok(connector.connect(ServerName::try_from(HOST.to_owned())?, stream).await?)
}
