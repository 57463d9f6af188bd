//! The whole platform on one machine, in one command: a server (SQLite), one edge and one
//! device agent, each in its own network namespace on 203.0.113.0/24 with a real WireGuard
//! tunnel between edge and device, the device behind a firewall that drops every new inbound
//! connection; then the example stack `examples/stacks/hello.yaml` deployed with the CLI and
//! answering through the edge over HTTPS, with a certificate from the server's internal CA.
//!
//! It prints how to reach the application (the `curl` line to run in the client namespace,
//! and the CA file), then runs until Ctrl-C or SIGTERM and tears everything down. With
//! `--check` it exits after the first request served (what the acceptance test runs).
//!
//! Needs root (namespaces, TUN interfaces, nftables) and the workspace binaries:
//!
//! ```text
//! cargo build --workspace --bins && sudo target/debug/local_platform
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgible::model::{DevicePool, Edge, EdgeSpec};
use edgible_acceptance_tests::Cli;
use edgible_acceptance_tests::netns::{
    CLIENT_ADDRESS, DEV1_ADDRESS, EDGE_ADDRESS, SERVER_ADDRESS, Topology, require_root,
};
use edgible_acceptance_tests::platform::{EDGE_WIREGUARD_PORT, NsAgent, NsEdge, NsServer, curl, through_edge};

/// The example's hostname (`examples/stacks/hello.yaml`).
const HOSTNAME: &str = "hello.example.test";
/// How long the example may take to answer through the edge.
const READY: Duration = Duration::from_secs(300);

const USAGE: &str = "usage: local_platform [--check] [--dir DIR]

  --check    exit after the first request served through the edge
  --dir DIR  keep the platform's files (logs, database, CA) in DIR instead of a temporary directory";

/// What the command line asks.
#[derive(Debug, Default)]
struct Options {
    check: bool,
    dir: Option<PathBuf>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Options> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => options.check = true,
            "--dir" => options.dir = Some(args.next().context("--dir needs a directory")?.into()),
            "-h" | "--help" => anyhow::bail!("{USAGE}"),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(options)
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = parse_args(std::env::args().skip(1)).and_then(|options| {
        require_root()?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        runtime.block_on(run(options))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything running. Fields drop in order: agent, edge and server stop before the topology
/// deletes the namespaces.
struct Platform {
    agent: NsAgent,
    edge: NsEdge,
    server: NsServer,
    topology: Topology,
}

async fn run(options: Options) -> anyhow::Result<()> {
    let temporary;
    let dir = match &options.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temporary = tempfile::Builder::new().prefix("edgible-local-").tempdir()?;
            temporary.path().to_owned()
        }
    };
    let dir = std::fs::canonicalize(&dir)?;
    let (platform, ca_file) = start(&dir).await?;
    // A signal during the wait ends the wait; the platform is torn down when dropped below.
    let outcome = tokio::select! {
        result = wait_served(&platform, &ca_file) => result,
        () = shutdown_signal() => Err(anyhow::anyhow!("interrupted before the application answered")),
    };
    if let Err(error) = outcome {
        eprintln!("{}", logs(&platform));
        return Err(error);
    }
    let client = platform.topology.namespace("client")?.name().to_owned();
    println!();
    println!("The hello application answers at https://{HOSTNAME}/ through the edge at {EDGE_ADDRESS}.");
    println!("Its certificate is signed by the platform's internal CA, saved in {}.", ca_file.display());
    println!("From the client namespace ({CLIENT_ADDRESS}):");
    println!();
    println!(
        "  sudo ip netns exec {client} curl --resolve {HOSTNAME}:443:{EDGE_ADDRESS} --cacert {} https://{HOSTNAME}/",
        ca_file.display()
    );
    println!();
    println!(
        "that is, curl --resolve {HOSTNAME}:443:{EDGE_ADDRESS} --cacert {} https://{HOSTNAME}/",
        ca_file.display()
    );
    println!("The API is at {} (key in {}).", platform.server.url, platform.server.dir.join("admin.key").display());
    println!("Logs: {}", dir.display());
    if options.check {
        return Ok(());
    }
    println!("Press Ctrl-C to stop and remove everything.");
    shutdown_signal().await;
    eprintln!("stopping");
    drop(platform);
    Ok(())
}

/// Builds the namespaces, starts the server, creates pool, device and edge, starts edge and
/// agent, and deploys the example. Answers the platform and the CA file.
async fn start(dir: &Path) -> anyhow::Result<(Platform, PathBuf)> {
    eprintln!("building namespaces (server, edge, dev1, client) on 203.0.113.0/24");
    let topology = Topology::build(
        "lp",
        &[("edge", EDGE_ADDRESS), ("server", SERVER_ADDRESS), ("dev1", DEV1_ADDRESS), ("client", CLIENT_ADDRESS)],
    )?;
    topology.namespace("dev1")?.install_device_firewall()?;

    eprintln!("starting the server on {SERVER_ADDRESS} (SQLite in {})", dir.join("server").display());
    let server = NsServer::start(topology.namespace("server")?, SERVER_ADDRESS, &dir.join("server"))?;
    let ca_file = dir.join("ca.pem");
    server.save_ca(&ca_file).await?;

    let cli = Cli::new(&dir.join("cli"))?;
    cli.ok(&["login", "--server", &server.url, "--key", &server.admin_key])?;
    cli.ok(&["pool", "create", "home", "--cidr", "100.96.0.0/24"])?;
    let device = cli.json(&["device", "create", "dev1", "--pool", "home"])?;
    let device_token = device["enrollment_token"].as_str().context("`device create` printed no enrollment token")?;

    let client = server.client()?;
    let pool = client.find_by_name::<DevicePool>("home").await?.context("pool home was not created")?;
    let spec = EdgeSpec {
        name: "edge1".parse()?,
        pool_id: pool.id,
        endpoint: format!("{EDGE_ADDRESS}:{EDGE_WIREGUARD_PORT}").parse()?,
    };
    let created = client.create::<Edge>(&spec).await.context("creating the edge")?;

    eprintln!("enrolling and starting the edge on {EDGE_ADDRESS}");
    let mut edge = NsEdge::enroll(
        topology.namespace("edge")?,
        EDGE_ADDRESS,
        &server.url,
        &created.enrollment_token,
        &dir.join("edge"),
    )?;
    edge.start()?;
    eprintln!("enrolling and starting the agent of dev1 on {DEV1_ADDRESS}");
    let mut agent = NsAgent::enroll(topology.namespace("dev1")?, "dev1", &server.url, device_token, &dir.join("dev1"))?;
    agent.start()?;
    let platform = Platform { agent, edge, server, topology };

    let stack = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/stacks/hello.yaml");
    let stack = std::fs::canonicalize(&stack).with_context(|| format!("finding {}", stack.display()))?;
    eprintln!("deploying {}", stack.display());
    let deployed = cli.run(&["stack", "deploy", "--timeout", "3m", &stack.display().to_string()])?;
    if !deployed.status.success() {
        anyhow::bail!("`edgible stack deploy` failed:\n{}{}\n{}", deployed.stdout, deployed.stderr, logs(&platform));
    }
    Ok((platform, ca_file))
}

/// Waits until the example answers through the edge from the client namespace.
async fn wait_served(platform: &Platform, ca_file: &Path) -> anyhow::Result<()> {
    eprintln!("waiting for https://{HOSTNAME}/ to answer through the edge");
    let namespace = platform.topology.namespace("client")?;
    let mut args = through_edge(HOSTNAME, EDGE_ADDRESS, ca_file);
    args.extend([
        "--max-time".to_owned(),
        "10".to_owned(),
        "--fail".to_owned(),
        "-o".to_owned(),
        "/dev/null".to_owned(),
    ]);
    args.push(format!("https://{HOSTNAME}/"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    loop {
        let output = curl(namespace, &args)?;
        if output.success {
            eprintln!("answered after {:.1?}", started.elapsed());
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < READY,
            "https://{HOSTNAME}/ did not answer through the edge within {READY:?}; the last try: {output}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The ends of the logs, for a failure.
fn logs(platform: &Platform) -> String {
    format!(
        "--- server log\n{}\n--- edge log\n{}\n--- agent log\n{}",
        platform.server.process.log_tail(),
        platform.edge.log_tail(),
        platform.agent.log_tail()
    )
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> anyhow::Result<Options> {
        parse_args(list.iter().map(|arg| (*arg).to_owned()))
    }

    #[test]
    fn arguments_are_parsed_and_unknown_ones_named() -> anyhow::Result<()> {
        let options = args(&[])?;
        assert!(!options.check && options.dir.is_none());
        let options = args(&["--check", "--dir", "/tmp/x"])?;
        assert!(options.check);
        assert_eq!(options.dir.as_deref(), Some(Path::new("/tmp/x")));
        assert!(args(&["--dir"]).expect_err("needs a value").to_string().contains("--dir"));
        assert!(args(&["--bogus"]).expect_err("unknown").to_string().contains("\"--bogus\""));
        Ok(())
    }
}
