//! Running the server: open the database, bootstrap if asked, listen, announce the address,
//! and serve until told to stop, then drain open requests for a bounded time.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bootstrap::{BootstrapError, bootstrap_if_empty};
use crate::config::ServeConfig;
use crate::db::{Db, StoreError};
use crate::{AppState, router};

/// How long the start waits for the blob store's probe object to be written and deleted.
const BLOB_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    CertificateAuthority(#[from] crate::certs::CaError),
    #[error(transparent)]
    Acme(#[from] crate::certs::acme::AcmeError),
    #[error(transparent)]
    ServerKey(#[from] crate::certs::sealed::SealError),
    #[error(transparent)]
    Blobs(#[from] crate::blobs::BlobError),
    #[error("access policies: {0}")]
    Access(#[from] crate::access::AccessError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
}

/// Serves until `shutdown` completes, then lets open requests finish for at most the
/// configured drain deadline.
pub async fn serve(config: &ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let db = Db::connect(&config.database_url).await?;
    if let (Some(organization), Some(key_file)) = (&config.bootstrap, &config.bootstrap_key_file) {
        bootstrap_if_empty(&db, organization, key_file).await?;
    }
    // Only one replica serves sessions, and none is open yet: whoever looks online is a
    // leftover of a previous run.
    let stale = db.mark_all_offline().await?;
    if stale > 0 {
        tracing::info!(devices_and_edges = stale, "marked devices and edges of a previous run offline");
    }
    let migrations = config.migration_settings()?;
    // An unreachable or read-only blob store fails the start, not the first migration.
    migrations.blobs.probe(BLOB_PROBE_TIMEOUT).await?;
    let state = AppState::with_session_config(db, config.session_config())
        .with_domain_settings(config.domain_settings())
        .with_migration_settings(migrations);
    // The first start on a database generates the internal CA; later starts load it.
    state.certificate_authority().await?;
    if config.issuer == crate::config::Issuer::Acme {
        let settings = crate::certs::acme::AcmeSettings::from_config(config)?;
        tracing::info!(directory = %settings.directory_url, "certificates come from the ACME CA");
        state.start_acme(settings).await?;
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen { address: config.listen, source })?;
    let address = listener.local_addr().map_err(|source| ServeError::Listen { address: config.listen, source })?;
    let url = format!("http://{address}");
    let access = config.access_settings(address)?;
    tracing::info!(public_url = %access.public_url, "login pages");
    // The first start on a database creates the assertion signing key; later starts use it.
    crate::access::ensure_key(state.db(), &access).await?;
    let state = state.with_access_settings(access);
    if let Some(path) = &config.ready_file {
        write_ready_file(path, &url).map_err(|source| ServeError::ReadyFile { path: path.clone(), source })?;
    }
    tracing::info!(%url, "listening");

    let (stop, stopped) = watch::channel(false);
    let rescheduler =
        tokio::spawn(crate::rescheduler::run(state.db().clone(), config.cloud_reschedule_after(), stop.subscribe()));
    // Migrations of a previous run go on where they stood (or fail, if a deadline passed).
    let migrations = tokio::spawn(std::sync::Arc::clone(state.migrations()).run(stop.subscribe()));
    let acme_state = state.clone();
    // Connection info gives the login pages the client's address to rate-limit by.
    let service = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, service).with_graceful_shutdown(async move {
        let mut stopped = stopped;
        // An error means the sender is gone, which only happens once we are stopping anyway.
        let _ = stopped.wait_for(|stop| *stop).await;
    });
    let mut server = tokio::spawn(server.into_future());
    tokio::select! {
        joined = &mut server => return finished(joined),
        () = shutdown => {}
    }
    tracing::info!(deadline = ?config.drain_deadline(), "shutting down; draining open requests");
    acme_state.stop_acme();
    let _ = stop.send(true);
    // They stop at the signal; nothing of them needs draining.
    let _ = rescheduler.await;
    let _ = migrations.await;
    match tokio::time::timeout(config.drain_deadline(), &mut server).await {
        Ok(joined) => finished(joined),
        Err(_) => {
            tracing::warn!("the drain deadline passed; closing the remaining connections");
            server.abort();
            Ok(())
        }
    }
}

fn finished(joined: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), ServeError> {
    match joined {
        Ok(result) => result.map_err(ServeError::Http),
        Err(error) => Err(ServeError::Http(std::io::Error::other(error))),
    }
}

/// Writes the URL beside the final name and renames it, so that whoever waits for the file
/// never reads it half-written.
fn write_ready_file(path: &Path, url: &str) -> std::io::Result<()> {
    let temporary = temporary_path(path);
    std::fs::write(&temporary, url)?;
    std::fs::rename(&temporary, path)
}

/// `NAME.tmp` beside `path`, for writing a file before renaming it into place.
pub(crate) fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}
