//! The assembled edge: the TLS port, the HTTP port and the admin port, bound together and run
//! until a shutdown signal, then drained within a deadline.
//!
//! Shutdown order: stop accepting on the TLS and HTTP ports; let connections being spliced
//! and HTTP requests in flight finish until the drain deadline, then cut what remains; stop
//! the admin port last, so metrics stay scrapeable while draining.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::acme_http::{self, ChallengeStore};
use crate::limits::{ConnectionLimits, LimitsConfig};
use crate::listener::accept_loop;
use crate::metrics::{self, MetricSources, Metrics};
use crate::route_source::SharedRoutes;
use crate::splice::{Forwarder, SpliceConfig};

/// How long the admin port may take to close after draining.
const ADMIN_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything the edge needs to run, as the binary's configuration resolves it.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The TLS port (SNI routing).
    pub listen_https: SocketAddr,
    /// The HTTP port (ACME HTTP-01 and redirects to https).
    pub listen_http: SocketAddr,
    /// The admin port (`/metrics`, `/healthz`).
    pub admin: SocketAddr,
    pub splice: SpliceConfig,
    pub limits: LimitsConfig,
    /// How long connections may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
}

/// The addresses the edge actually listens on (ports resolved when configured as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BoundAddresses {
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
}

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {address} ({port}): {source}")]
    Bind { port: &'static str, address: SocketAddr, source: std::io::Error },
}

/// A bound, not yet running edge.
pub struct Edge {
    config: EdgeConfig,
    https: TcpListener,
    http: TcpListener,
    admin: TcpListener,
    addresses: BoundAddresses,
    routes: SharedRoutes,
    challenges: ChallengeStore,
    metrics: Arc<Metrics>,
    limits: Arc<ConnectionLimits>,
    /// Further metric sources (the hub session, the tunnel), rendered after the built-in ones.
    extra_sources: Vec<Arc<dyn metrics::MetricSource>>,
}

impl Edge {
    /// Binds the three ports. `routes` and `challenges` are the handles through which the
    /// routes file or the hub client update the running edge.
    pub async fn bind(config: EdgeConfig, routes: SharedRoutes, challenges: ChallengeStore) -> Result<Self, EdgeError> {
        let bind = |port: &'static str, address: SocketAddr| async move {
            TcpListener::bind(address).await.map_err(|source| EdgeError::Bind { port, address, source })
        };
        let https = bind("https", config.listen_https).await?;
        let http = bind("http", config.listen_http).await?;
        let admin = bind("admin", config.admin).await?;
        let local = |port: &'static str, listener: &TcpListener, address: SocketAddr| {
            listener.local_addr().map_err(|source| EdgeError::Bind { port, address, source })
        };
        let addresses = BoundAddresses {
            https: local("https", &https, config.listen_https)?,
            http: local("http", &http, config.listen_http)?,
            admin: local("admin", &admin, config.admin)?,
        };
        let limits = ConnectionLimits::new(config.limits);
        Ok(Self {
            config,
            https,
            http,
            admin,
            addresses,
            routes,
            challenges,
            metrics: Metrics::new(),
            limits,
            extra_sources: Vec::new(),
        })
    }

    /// Adds a source of metrics to the admin port.
    pub fn with_metric_source(mut self, source: Arc<dyn metrics::MetricSource>) -> Self {
        self.extra_sources.push(source);
        self
    }

    pub fn addresses(&self) -> BoundAddresses {
        self.addresses
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    pub fn limits(&self) -> Arc<ConnectionLimits> {
        Arc::clone(&self.limits)
    }

    /// Serves until `shutdown` completes, then drains (see the module documentation).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Self { config, https, http, admin, addresses, routes, challenges, metrics, limits, extra_sources } = self;
        tracing::info!(https = %addresses.https, http = %addresses.http, admin = %addresses.admin, "edge listening");

        let (stop_http, http_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);
        let http_server =
            tokio::spawn(serve_http(http, acme_http::router(challenges, Arc::clone(&metrics)), http_stopped));
        let mut sources = MetricSources::new()
            .with(Arc::clone(&metrics) as Arc<dyn metrics::MetricSource>)
            .with(Arc::clone(&limits) as Arc<dyn metrics::MetricSource>)
            .with(Arc::new(routes.clone()) as Arc<dyn metrics::MetricSource>);
        for source in extra_sources {
            sources = sources.with(source);
        }
        let admin_server = tokio::spawn(serve_http(admin, metrics::admin_router(sources), admin_stopped));

        let forwarder = Arc::new(Forwarder::new(config.splice, routes, Arc::clone(&metrics)));
        let mut connections = JoinSet::new();
        {
            let accepting = accept_loop(&https, forwarder, limits, metrics, &mut connections);
            tokio::select! {
                () = accepting => {}
                () = shutdown => {}
            }
        }
        drop(https);
        let _ = stop_http.send(true);
        tracing::info!(
            connections = connections.len(),
            deadline = ?config.drain_timeout,
            "shutting down: no new connections, draining the open ones"
        );

        let http_abort = http_server.abort_handle();
        let drained = tokio::time::timeout(config.drain_timeout, async {
            while connections.join_next().await.is_some() {}
            let _ = http_server.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = connections.len(),
                "the drain deadline passed; closing the remaining connections"
            );
            connections.abort_all();
            http_abort.abort();
        }
        let _ = stop_admin.send(true);
        let admin_abort = admin_server.abort_handle();
        // A scraper holding its connection open must not keep the edge from exiting.
        if tokio::time::timeout(ADMIN_STOP_TIMEOUT, admin_server).await.is_err() {
            admin_abort.abort();
        }
        tracing::info!("edge stopped");
    }
}

/// Serves an axum router on `listener` until `stop` turns true, then lets requests in flight
/// finish. The caller bounds that wait.
async fn serve_http(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    let signal = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(signal).await {
        tracing::warn!(%error, "an HTTP server of the edge failed");
    }
}
