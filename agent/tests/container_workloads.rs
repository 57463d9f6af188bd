//! The reconciler with the real `container` driver against a real Docker Engine, using a tiny
//! image built locally from Debian's static busybox (no registry involved).
//!
//! Gated by `EDGIBLE_ACC=1`. Needs the Debian packages `docker.io` and `busybox-static`, and
//! root: when no engine answers on /var/run/docker.sock, the tests start `dockerd` themselves
//! (once, under a lock; it keeps running for later tests, like any system service).

#[path = "support/harness.rs"]
mod harness;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgible::model::Application;
use edgible::protocol::v1::{Phase, Stream};
use edgible_agent::driver::{ContainerDriver, ContainerDriverConfig, Driver, ProcessDriver, WorkloadHandle};
use edgible_agent::reconcile::{DesiredUpdate, Reconciler, Shutdown};
use harness::*;
use serde_json::json;

const IMAGE: &str = "edgible-test/busybox:1";
use edgible_acceptance_tests::docker::SOCKET;

/// What the image runs: says hello on both streams, then serves `$GREETING` over HTTP on
/// `$PORT` with busybox httpd.
const SCRIPT: &str = r#"echo "greeting=$GREETING"; echo "port=$PORT" >&2; mkdir -p /www; echo "$GREETING" > /www/index.html; exec httpd -f -p "$PORT" -h /www"#;

/// Whether the heavy tier runs; prints why not.
fn enabled() -> bool {
    if std::env::var("EDGIBLE_ACC").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "skipping: container tests run with EDGIBLE_ACC=1 (they need the Debian packages docker.io and \
         busybox-static, and root to start dockerd)"
    );
    false
}

/// Makes sure an engine answers (starting `dockerd` if needed) and the test image exists.
async fn prepare_engine() -> Result<()> {
    tokio::task::spawn_blocking(|| edgible_acceptance_tests::docker::prepare(IMAGE, SCRIPT)).await?
}

/// Containers of each test get their own name prefix, so that concurrent runs never meet.
fn driver_config(prefix: &str) -> ContainerDriverConfig {
    ContainerDriverConfig {
        socket: SOCKET.into(),
        name_prefix: format!("edgible-test-{prefix}-"),
        stop_grace: Duration::from_secs(3),
        request_timeout: Duration::from_secs(30),
        ..ContainerDriverConfig::default()
    }
}

async fn reconciler(harness: &Harness) -> Result<Reconciler> {
    let temp_name =
        harness.state_path().parent().and_then(|dir| dir.file_name()).map(|name| name.to_string_lossy().into_owned());
    let prefix: String = temp_name.unwrap_or_default().chars().filter(char::is_ascii_alphanumeric).collect();
    let container: Arc<dyn Driver> = Arc::new(ContainerDriver::connect(driver_config(&prefix.to_lowercase())).await?);
    let process: Arc<dyn Driver> = Arc::new(ProcessDriver::new(harness.process_config()));
    harness.reconciler(vec![container, process])
}

fn web(name: &str, revision: u64, port: u16, greeting: &str) -> Application {
    application(
        name,
        revision,
        json!({
            "port": port,
            "env": {"GREETING": greeting},
            "workload": {"container": {"image": IMAGE}},
            "health_check": {"protocol": "http", "path": "/index.html", "interval_seconds": 1, "timeout_seconds": 1},
        }),
    )
}

/// GET / on 127.0.0.1:`port`, answering the body.
async fn fetch(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_owned()).unwrap_or_default())
}

fn container_id(handle: &WorkloadHandle) -> Result<&str> {
    match handle {
        WorkloadHandle::Container { id } => Ok(id),
        other => bail!("not a container: {other:?}"),
    }
}

/// What `docker inspect` says about a container, if it exists.
fn inspect(id: &str) -> Result<Option<serde_json::Value>> {
    let output = Command::new("docker").args(["container", "inspect", id]).output()?;
    if !output.status.success() {
        return Ok(None);
    }
    let mut list: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    Ok(list.pop())
}

#[tokio::test]
async fn a_container_serves_on_loopback_restarts_with_new_env_and_is_removed() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    prepare_engine().await?;
    let harness = Harness::new();
    let agent = reconciler(&harness).await?.spawn();
    let mut report = agent.report();
    let port = free_port()?;

    let first = web("boxed", 1, port, "hello");
    agent.update(DesiredUpdate::full(1, vec![first.clone()])).await?;
    let handle = wait_workload(&mut report, first.id, 1, Phase::Running).await?.context("a container")?;
    let id = container_id(&handle)?.to_owned();
    assert_eq!(fetch(port).await?, "hello");
    let info = inspect(&id)?.context("the container exists")?;
    let bindings = &info["HostConfig"]["PortBindings"][format!("{port}/tcp")];
    assert_eq!(bindings, &json!([{"HostIp": "127.0.0.1", "HostPort": port.to_string()}]), "published on loopback only");
    wait_until("both streams in the log", || {
        let lines = log_texts(&agent, first.id);
        (lines.contains(&(Stream::Stdout, "greeting=hello".into()))
            && lines.contains(&(Stream::Stderr, format!("port={port}"))))
        .then_some(())
    })
    .await?;

    let second = web("boxed", 2, port, "bonjour");
    agent.update(DesiredUpdate::full(2, vec![second.clone()])).await?;
    let replaced = wait_workload(&mut report, second.id, 2, Phase::Running).await?.context("a container")?;
    assert_ne!(container_id(&replaced)?, id, "a new container runs");
    assert_eq!(fetch(port).await?, "bonjour");
    assert!(inspect(&id)?.is_none(), "the old container was removed");
    assert!(event_messages(&agent).contains(&"boxed restarted: environment changed".to_owned()));

    agent.update(DesiredUpdate::full(3, vec![])).await?;
    wait_workload(&mut report, second.id, 3, Phase::Stopped).await?;
    assert!(inspect(container_id(&replaced)?)?.is_none(), "the container was removed");
    assert!(fetch(port).await.is_err(), "nothing listens any more");
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn an_agent_restart_adopts_the_container_and_a_killed_one_is_restarted() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    prepare_engine().await?;
    let harness = Harness::new();
    let port = free_port()?;
    let app = web("adoptee", 1, port, "adopt-me");

    let agent = reconciler(&harness).await?.spawn();
    let mut report = agent.report();
    agent.update(DesiredUpdate::full(1, vec![app.clone()])).await?;
    let handle = wait_workload(&mut report, app.id, 1, Phase::Running).await?.context("a container")?;
    agent.shutdown(Shutdown::LeaveRunning).await;
    let id = container_id(&handle)?.to_owned();
    assert_eq!(inspect(&id)?.context("still there")?["State"]["Running"], json!(true));

    let agent = reconciler(&harness).await?.spawn();
    let mut report = agent.report();
    let adopted = wait_workload(&mut report, app.id, 1, Phase::Running).await?.context("a container")?;
    assert_eq!(adopted, handle, "the same container: adopted, not restarted");
    assert_eq!(event_messages(&agent), ["adoptee adopted after an agent restart"]);

    let killed = Command::new("docker").args(["kill", &id]).stdout(Stdio::null()).status()?;
    assert!(killed.success());
    let restarted = wait_replaced(&mut report, app.id, &handle).await?;
    assert_eq!(fetch(port).await?, "adopt-me");
    let events = event_messages(&agent);
    assert!(
        events.iter().any(|event| event.starts_with("adoptee exited with status 137; restarting in")),
        "{events:?}"
    );
    agent.shutdown(Shutdown::StopWorkloads).await;
    assert!(inspect(container_id(&restarted)?)?.is_none());
    Ok(())
}
