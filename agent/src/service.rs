//! `edgible-agent run`: builds the agent from its configuration and runs it until shutdown.
//!
//! The reconciler starts first, from what the state directory remembers, so workloads a
//! previous agent left running are adopted and served whether or not the server answers; the
//! push session starts beside it, and the data path (tunnel, proxy, certificates) beside both,
//! fed by the session through a [`control::link`] and by the reconciler's desired state. On
//! shutdown the session closes, the data path removes the tunnel, then the reconciler ends,
//! leaving the workloads running for the next agent unless told to stop them.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use crate::backoff::RandomJitter;
use crate::config::RunConfig;
use crate::control::{self, ConnectError, ControlStats, HelloParams, WebSocketConnector, WithServices};
use crate::datapath::DataPath;
use crate::driver::{ContainerDriver, Driver, ProcessDriver, VmDriver, WorkloadKind};
use crate::enroll::{Enrolled, IdentityError};
use crate::migration::{BlobClient, MigrationContext, Migrations};
use crate::reconcile::{Drivers, Reconciler, Shutdown};
use crate::state::{StateDir, StateError};
use crate::usage::{self, UsageError, UsageLedger};
use crate::volumes::Volumes;

/// How long the container engine may take to answer at startup before the agent goes on
/// without container workloads.
const ENGINE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("the enrolled server URL is unusable: {0}")]
    Server(#[from] ConnectError),
    #[error("cannot reach the server's blob store: {0}")]
    Blobs(#[from] crate::migration::blobs::BlobError),
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: &RunConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let state_dir = StateDir::open(&config.state_dir)?;
    let enrolled = Enrolled::load(&state_dir)?;
    let connector = WebSocketConnector::new(&enrolled.identity.server, &enrolled.credential)?;
    let drivers = drivers(config).await;
    let capabilities = drivers.kinds().iter().map(ToString::to_string).collect();
    // A cloud host attaches volume images to its microVMs and never mounts them itself.
    let volumes = Volumes::new(config.volumes_dir(), config.vm_config().is_none());
    let reconciler =
        Reconciler::new(config.reconciler_config(), state_dir.clone(), drivers.clone())?.with_volumes(volumes);
    let holds = reconciler.holds();
    let volumes = reconciler.volumes();
    let identity = &enrolled.identity;
    tracing::info!(
        device = %identity.device_name,
        device_id = %identity.device_id,
        server = %identity.server,
        ?capabilities,
        "agent starting"
    );
    let usage = UsageLedger::open(StateDir::open(&config.state_dir)?, usage::DEFAULT_CAPACITY)?;
    let reconciler = Arc::new(reconciler.spawn());
    let sleep = reconciler.sleep_table();
    let migrations = Migrations::new(MigrationContext {
        state_dir,
        volumes,
        holds,
        sleep: Arc::clone(&sleep),
        desired: reconciler.desired(),
        report: reconciler.report(),
        drivers,
        blobs: Some(BlobClient::new(&identity.server, &enrolled.credential)?),
    })?;
    let hello = HelloParams {
        device_id: identity.device_id,
        public_key: identity.public_key.clone(),
        capabilities,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        cloud_host: config.cloud_host_capacity(),
    };

    let (stop, stopped) = watch::channel(false);
    let (session_link, data_path_link) = control::link();
    let (data_path, inputs) = DataPath::new(
        config.data_path_config(enrolled.private_key.clone()),
        StateDir::open(&config.state_dir)?,
        data_path_link,
        reconciler.desired(),
        reconciler.events(),
    );
    let data_path = data_path.with_sleep_table(Arc::clone(&sleep));
    let collector = tokio::spawn(usage::run_collector(
        sleep,
        Arc::clone(&usage),
        std::time::Duration::from_secs(config.usage_interval_seconds),
        stop.subscribe(),
    ));
    let mut data_path = tokio::spawn(data_path.run(inputs, stop.subscribe()));
    let control_config = config.control_config();
    let local = WithServices { local: Arc::clone(&reconciler), usage, migrations };
    let stats = Arc::new(ControlStats::default());
    let session_stats = Arc::clone(&stats);
    let mut session = tokio::spawn(async move {
        control::run(
            &control_config,
            &hello,
            &connector,
            &local,
            &session_link,
            &session_stats,
            &mut RandomJitter,
            stopped,
        )
        .await;
    });

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    if tokio::time::timeout(config.drain_deadline(), &mut session).await.is_err() {
        tracing::warn!("the push session did not end in time; dropping it");
        session.abort();
        let _ = session.await;
    }
    if tokio::time::timeout(config.drain_deadline(), &mut data_path).await.is_err() {
        tracing::warn!("the data path did not stop in time; dropping it");
        data_path.abort();
        let _ = data_path.await;
    }
    // The collector records the last period when told to stop.
    if tokio::time::timeout(config.drain_deadline(), collector).await.is_err() {
        tracing::warn!("the usage collector did not finish in time; this period's usage is lost");
    }
    let mode = if config.stop_workloads_on_exit { Shutdown::StopWorkloads } else { Shutdown::LeaveRunning };
    match Arc::try_unwrap(reconciler) {
        Ok(reconciler) => reconciler.shutdown(mode).await,
        // Unreachable: the session task, the only other holder, has ended. Dropping the last
        // handle still ends the reconciler, leaving workloads running.
        Err(_) => tracing::warn!("the reconciler is still shared; leaving workloads running"),
    }
    tracing::info!(
        sessions = ControlStats::get(&stats.sessions),
        frames_rejected = ControlStats::get(&stats.frames_rejected),
        "agent stopped"
    );
    Ok(())
}

/// The process driver always; the container driver when an engine answers. A cloud host
/// (`--cloud-host`) runs every application in a microVM instead: the VM driver takes the place
/// of the process and container drivers (a container's image is exported through the engine and
/// booted as the guest's root filesystem), and no workload runs on the host itself.
async fn drivers(config: &RunConfig) -> Drivers {
    if let Some(vm) = config.vm_config() {
        match VmDriver::new(vm) {
            Ok(driver) => {
                let mut drivers: Vec<Arc<dyn Driver>> = vec![Arc::new(driver.serving(WorkloadKind::Process))];
                if !config.no_containers {
                    drivers.push(Arc::new(driver.serving(WorkloadKind::Container)));
                }
                return Drivers::new(drivers);
            }
            Err(error) => {
                tracing::error!(%error, "cannot run microVMs: this cloud host runs no workloads");
                return Drivers::new([]);
            }
        }
    }
    let mut drivers: Vec<Arc<dyn Driver>> = vec![Arc::new(ProcessDriver::new(config.process_config()))];
    if config.no_containers {
        return Drivers::new(drivers);
    }
    let container = config.container_config();
    if !container.socket.exists() {
        tracing::info!(socket = %container.socket.display(), "no container engine socket: container workloads are unavailable");
        return Drivers::new(drivers);
    }
    match tokio::time::timeout(ENGINE_PROBE_TIMEOUT, ContainerDriver::connect(container)).await {
        Ok(Ok(driver)) => drivers.push(Arc::new(driver)),
        Ok(Err(error)) => tracing::warn!(%error, "container workloads are unavailable"),
        Err(_) => tracing::warn!("the container engine did not answer in time: container workloads are unavailable"),
    }
    Drivers::new(drivers)
}
