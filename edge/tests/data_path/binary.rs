//! The real `edgible-edge` binary: ready file, routes file reloaded on SIGHUP, SIGTERM that
//! stops accepting while an open connection finishes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{
    ALERT_UNRECOGNIZED_NAME, Devices, WAIT, device_id, hello, http_get, read_header_and, read_to_close, sample,
    wait_until,
};

/// The running binary; killed if a test fails before it exits.
struct EdgeProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl EdgeProcess {
    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    async fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the edge did not exit; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn routes_file(path: &Path, routes: &[(&str, u8, std::net::Ipv4Addr)]) -> anyhow::Result<()> {
    let mut text = String::from("routes:\n");
    for (hostname, index, address) in routes {
        text.push_str(&format!(
            "  - hostname: {hostname}\n    device_id: {}\n    tunnel_address: {address}\n",
            device_id(*index)
        ));
    }
    std::fs::write(path, text)?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct Ready {
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
}

#[tokio::test]
async fn the_binary_reloads_routes_on_sighup_and_drains_on_sigterm() -> anyhow::Result<()> {
    let directory = tempfile::tempdir()?;
    let devices = Devices::bind(1, 0).await?;
    let routes = directory.path().join("routes.yaml");
    routes_file(&routes, &[("api.example.test", 1, devices.address(0))])?;
    let ready_file = directory.path().join("ready.json");
    let log = directory.path().join("edge.log");

    let mut edge = EdgeProcess {
        child: Command::new(env!("CARGO_BIN_EXE_edgible-edge"))
            .args(["run", "--listen-https", "127.0.0.1:0", "--listen-http", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--routes")
            .arg(&routes)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(["--target-port", &devices.port.to_string(), "--drain-seconds", "20"])
            .env("RUST_LOG", "edgible_edge=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting edgible-edge")?,
        log,
    };
    wait_until("the ready file appears", || async { ready_file.exists() }).await?;
    let ready: Ready = serde_json::from_slice(&std::fs::read(&ready_file)?)?;
    let (status, _, _) = http_get(ready.http, "/x", "app.example.test").await?;
    assert_eq!(status, 308);

    // app.example.test is not in the file yet.
    let mut refused = TcpStream::connect(ready.https).await?;
    refused.write_all(hello::CURL).await?;
    assert_eq!(read_to_close(&mut refused).await?, ALERT_UNRECOGNIZED_NAME);
    drop(refused);

    // Add it, and tell the edge.
    routes_file(&routes, &[("api.example.test", 1, devices.address(0)), ("app.example.test", 1, devices.address(0))])?;
    edge.signal(Signal::SIGHUP)?;
    wait_until("the reload shows in the metrics", || async {
        let Ok((_, _, body)) = http_get(ready.admin, "/metrics", "localhost").await else { return false };
        sample(&body, "edgible_edge_routes{state=\"online\"}") == Some(2)
    })
    .await?;

    // A broken file is refused and the routes stay.
    std::fs::write(&routes, "routes: [")?;
    edge.signal(Signal::SIGHUP)?;
    wait_until("the refused reload is logged", || async { edge.log().contains("the routes file was not reloaded") })
        .await?;

    let mut client = TcpStream::connect(ready.https).await?;
    client.write_all(hello::CURL).await?;
    let mut device = devices.accept(0).await?;
    let (header, bytes) = read_header_and(&mut device, hello::CURL.len()).await?;
    assert_eq!(header.addresses.source(), Some(client.local_addr()?));
    assert_eq!(bytes, hello::CURL);

    // SIGTERM: no new connections, but the open one keeps working until it ends.
    edge.signal(Signal::SIGTERM)?;
    wait_until("the TLS port stops accepting", || async { TcpStream::connect(ready.https).await.is_err() }).await?;
    device.write_all(b"still spliced").await?;
    let mut answer = [0u8; 13];
    client.read_exact(&mut answer).await?;
    assert_eq!(&answer, b"still spliced");
    assert!(edge.child.try_wait()?.is_none(), "the edge must wait for the open connection");
    drop(device);
    drop(client);

    let status = edge.wait().await?;
    assert!(status.success(), "exit status {status}; log:\n{}", edge.log());
    let log = edge.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("edge stopped"), "{log}");
    Ok(())
}

#[tokio::test]
async fn the_binary_refuses_an_invalid_routes_file_at_start() -> anyhow::Result<()> {
    let directory = tempfile::tempdir()?;
    let routes = directory.path().join("routes.yaml");
    std::fs::write(&routes, "routes:\n  - hostname: app.example.test\n    tunnel_address: 100.96.0.2\n")?;
    let output = Command::new(env!("CARGO_BIN_EXE_edgible-edge"))
        .args(["run", "--listen-https", "127.0.0.1:0", "--listen-http", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--routes")
        .arg(&routes)
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("device_id") && stderr.contains("routes.yaml"), "{stderr}");
    Ok(())
}
