//! `edgible-edge`: parse the configuration, set up logging, then either enroll (`enroll`) or
//! bind the ports and serve until SIGTERM or SIGINT, then drain (`run`). `run` takes its routes
//! from a static file (`--routes`) or, for an enrolled edge (`--state-dir`), from the server's
//! hub, which also brings the WireGuard peers.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use edgible_edge::acme_http::ChallengeStore;
use edgible_edge::config::{Command, Config, EnrollConfig, LogFormat, RunConfig};
use edgible_edge::hub_client::{self, HelloParams, HubConfig, HubConnector, HubStats, SessionContext};
use edgible_edge::metrics::MetricSource;
use edgible_edge::route_file;
use edgible_edge::route_source::SharedRoutes;
use edgible_edge::server::{BoundAddresses, Edge};
use edgible_edge::state::StateDir;
use edgible_edge::tunnel::{EdgeTunnel, TunnelSettings};
use edgible_edge::{enroll, state};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("edgible-edge: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let config = Config::parse();
    init_tracing(config.log_format);
    raise_open_files_limit();
    let result = match config.command {
        Command::Enroll(enroll_config) => enroll_edge(enroll_config).await,
        Command::Run(run_config) => run(run_config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Printed rather than logged, so that it shows whatever RUST_LOG filters out.
            eprintln!("edgible-edge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn enroll_edge(config: EnrollConfig) -> anyhow::Result<()> {
    let state_dir = StateDir::open(&config.state_dir)?;
    let identity = enroll::enroll(&state_dir, &config.server, &config.token, config.force).await?;
    println!(
        "enrolled edge {} with {}: tunnel address {} in {}; state in {}",
        identity.edge_id,
        identity.server,
        identity.tunnel_address,
        identity.tunnel_cidr,
        state_dir.root().display()
    );
    Ok(())
}

/// What an enrolled edge runs beside its ports: the hub session and the tunnel.
struct Hub {
    config: HubConfig,
    hello: HelloParams,
    connector: HubConnector,
    tunnel: Arc<EdgeTunnel>,
    stats: Arc<HubStats>,
}

impl Hub {
    fn load(config: &RunConfig, state_dir: &Path) -> anyhow::Result<Self> {
        let enrolled = StateDir::open(state_dir)?.load()?;
        let state::Enrolled { identity, credential, private_key } = enrolled;
        let connector = HubConnector::new(&identity.server, &credential)?;
        let tunnel = EdgeTunnel::new(TunnelSettings {
            interface_name: config.tunnel_interface.clone(),
            listen_port: config.wireguard_port,
            private_key,
        });
        Ok(Self {
            config: HubConfig::default(),
            hello: HelloParams {
                edge_id: identity.edge_id,
                public_key: identity.public_key,
                edge_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            connector,
            tunnel: Arc::new(tunnel),
            stats: HubStats::new(),
        })
    }
}

async fn run(config: RunConfig) -> anyhow::Result<()> {
    let routes = SharedRoutes::default();
    let hub = match &config.state_dir {
        Some(state_dir) => Some(Hub::load(&config, state_dir)?),
        None => None,
    };
    if let Some(path) = &config.routes {
        let changes = route_file::reload(path, &routes)?;
        tracing::info!(routes = changes.len(), file = %path.display(), "loaded the routes file");
    }
    // Signals are registered before binding, so that a SIGHUP or SIGTERM sent as soon as the
    // ready file appears is never missed.
    let shutdown = shutdown_signal().context("listening for SIGTERM")?;
    let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;

    let challenges = ChallengeStore::new();
    let mut edge = Edge::bind(config.edge_config(), routes.clone(), challenges.clone()).await?;
    if let Some(hub) = &hub {
        edge = edge
            .with_metric_source(Arc::clone(&hub.stats) as Arc<dyn MetricSource>)
            .with_metric_source(Arc::clone(&hub.tunnel) as Arc<dyn MetricSource>);
    }
    if let Some(ready_file) = &config.ready_file {
        write_ready_file(ready_file, edge.addresses())?;
    }
    let (stop_hub, hub_stopped) = watch::channel(false);
    let hub_task = hub.map(|hub| {
        let routes = routes.clone();
        tokio::spawn(async move {
            let context = SessionContext {
                config: &hub.config,
                hello: &hub.hello,
                peers: &*hub.tunnel,
                routes: &routes,
                challenges: &challenges,
                stats: &hub.stats,
            };
            hub_client::run(&context, &hub.connector, hub_stopped).await;
            hub.tunnel
        })
    });
    if let Some(path) = config.routes.clone() {
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                reload_routes(&path, &routes);
            }
        });
    } else {
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP ignored: the edge runs without --routes");
            }
        });
    }
    edge.run(async move {
        shutdown.await;
        let _ = stop_hub.send(true);
    })
    .await;
    if let Some(task) = hub_task {
        match task.await {
            // Removes the tunnel interface.
            Ok(tunnel) => tunnel.shutdown(),
            Err(error) => tracing::error!(%error, "the hub session task failed"),
        }
    }
    Ok(())
}

fn reload_routes(path: &Path, routes: &SharedRoutes) {
    match route_file::reload(path, routes) {
        Ok(changes) => tracing::info!(changes = changes.len(), file = %path.display(), "reloaded the routes file"),
        Err(error) => tracing::error!(%error, "the routes file was not reloaded; keeping the current routes"),
    }
}

/// Writes the bound addresses under another name first and renames it, so that a reader never
/// sees a half-written file.
fn write_ready_file(path: &Path, addresses: BoundAddresses) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec(&addresses)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Raises the soft limit of open files to the hard limit: every spliced connection holds two
/// sockets, and the usual soft limit of 1024 would cap the edge far below its connection cap.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(error) => tracing::warn!(%error, soft, hard, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colors only for a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A future that completes on the first SIGTERM or SIGINT. The handlers are installed when
/// this is called, not when the future is first polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}
