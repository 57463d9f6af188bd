//! The Edgible control plane: the REST API over the platform's objects, the database behind
//! it, and the WebSocket hub that pushes desired state to agents. `main.rs` only wires
//! configuration, tracing and signals around [`serve`]; tests drive [`router`] in-process.
//! The internal CA that signs devices' certificates lives in [`certs`].

pub mod access;
pub mod api;
pub mod blobs;
pub mod bootstrap;
pub mod certs;
pub mod config;
pub mod db;
pub mod desired;
pub mod domains;
pub mod edge_config;
pub mod hub;
pub mod logs;
pub mod metrics;
pub mod migrations;
pub mod rescheduler;
pub mod scheduler;
pub mod secrets;
pub mod serve;

use std::sync::Arc;

use crate::certs::SharedCa;
use crate::db::Db;
use crate::hub::Hub;
use crate::hub::agent::{Agents, SessionConfig};
use crate::hub::edge::Edges;
use crate::logs::LogStore;
use crate::metrics::Metrics;

/// What every request handler shares. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    db: Db,
    metrics: Arc<Metrics>,
    agents: Agents,
    edges: Edges,
    /// Hostname ownership: platform zones, enforcement and the DNS resolver (`crate::domains`).
    domains: Arc<crate::domains::DomainSettings>,
    /// Failed logins on the login pages (`crate::access::pages`).
    login_limiter: Arc<std::sync::Mutex<access::limiter::LoginLimiter>>,
}

impl AppState {
    pub fn new(db: Db) -> Self {
        Self::with_session_config(db, SessionConfig::default())
    }

    /// A state whose agent sessions use `config` (tests shorten the timeouts).
    pub fn with_session_config(db: Db, config: SessionConfig) -> Self {
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::default());
        let edge_hub = Arc::new(Hub::default());
        // The database outlives no hub it points at: the listener holds them weakly.
        let (listener_hub, listener_edge_hub) = (Arc::downgrade(&hub), Arc::downgrade(&edge_hub));
        db.set_desired_listener(Arc::new(move |woken| {
            if let Some(hub) = listener_hub.upgrade() {
                hub.wake(&woken.devices);
            }
            if let Some(hub) = listener_edge_hub.upgrade() {
                hub.wake(&woken.edges);
            }
        }));
        let ca = Arc::new(SharedCa::default());
        let outbox = Arc::new(hub::agent::Outbox::default());
        let migrations = Arc::new(migrations::driver::Migrations::new(
            db.clone(),
            Arc::clone(&hub),
            Arc::clone(&outbox),
            migrations::driver::MigrationSettings::default(),
        ));
        let agents = Agents {
            db: db.clone(),
            hub,
            logs: Arc::new(LogStore::default()),
            metrics: Arc::clone(&metrics),
            config: config.clone(),
            ca,
            acme: Arc::default(),
            outbox,
            access: Arc::default(),
            migrations,
        };
        let edges = Edges { db: db.clone(), hub: edge_hub, config, board: Arc::default() };
        Self { db, metrics, agents, edges, domains: Arc::default(), login_limiter: Arc::default() }
    }

    /// This state with access policies configured by `settings` (the login pages' public URL,
    /// the device session lifetime, the server key that seals assertion keys).
    pub fn with_access_settings(mut self, settings: access::AccessSettings) -> Self {
        self.agents.access = Arc::new(settings);
        self
    }

    /// This state with migrations timed, and their chunks stored, as `settings` say (the
    /// default keeps chunks in memory). Call before serving sessions.
    pub fn with_migration_settings(mut self, settings: migrations::driver::MigrationSettings) -> Self {
        self.agents.migrations = Arc::new(migrations::driver::Migrations::new(
            self.db.clone(),
            Arc::clone(&self.agents.hub),
            Arc::clone(&self.agents.outbox),
            settings,
        ));
        self
    }

    /// The migration driver.
    pub fn migrations(&self) -> &Arc<migrations::driver::Migrations> {
        &self.agents.migrations
    }

    /// How access policies are configured.
    pub fn access_settings(&self) -> &access::AccessSettings {
        &self.agents.access
    }

    /// The failed-login counts of the login pages.
    pub fn login_limiter(&self) -> std::sync::MutexGuard<'_, access::limiter::LoginLimiter> {
        // Every change is a single insert, update or removal; a panic cannot leave it half-done.
        self.login_limiter.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This state with hostname ownership configured by `settings` (the default checks
    /// uniqueness only and uses the system's resolver).
    pub fn with_domain_settings(mut self, settings: crate::domains::DomainSettings) -> Self {
        self.domains = Arc::new(settings);
        self
    }

    /// Hostname ownership settings.
    pub fn domain_settings(&self) -> &crate::domains::DomainSettings {
        &self.domains
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The agent hub and what its sessions share.
    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    /// The edge hub and what its sessions share.
    pub fn edges(&self) -> &Edges {
        &self.edges
    }

    /// The internal CA, loaded (or generated and stored) on first use.
    pub async fn certificate_authority(&self) -> Result<&certs::CertificateAuthority, certs::CaError> {
        self.agents.ca.get(&self.db).await
    }

    /// Stops the ACME orders where they stand (they resume at the next start), if ACME runs.
    pub fn stop_acme(&self) {
        if let Some(issuer) = self.agents.acme.get() {
            issuer.stop();
        }
    }

    /// Makes the ACME CA of `settings` issue devices' certificates from now on (`--issuer
    /// acme`): restores or creates the account and resumes the orders a previous run left in
    /// flight. Call before serving sessions.
    pub async fn start_acme(
        &self,
        settings: certs::acme::AcmeSettings,
    ) -> Result<Arc<certs::acme::AcmeIssuer>, certs::acme::AcmeError> {
        let links = certs::acme::IssuerLinks {
            db: self.db.clone(),
            board: Arc::clone(&self.edges.board),
            agent_hub: Arc::clone(&self.agents.hub),
            edge_hub: Arc::clone(&self.edges.hub),
            outbox: Arc::clone(&self.agents.outbox),
        };
        let issuer = certs::acme::AcmeIssuer::start(settings, links).await?;
        if self.agents.acme.set(Arc::clone(&issuer)).is_err() {
            tracing::warn!("an ACME issuer was already running; the new one only resumes orders");
        }
        let resumed = issuer.resume().await?;
        if resumed > 0 {
            tracing::info!(orders = resumed, "resumed ACME orders of a previous run");
        }
        Ok(issuer)
    }
}

/// The HTTP interface of the server: `/v1` (with the agents' and edges' WebSockets),
/// `/healthz`, `/metrics` and the login pages (`/login`, `/logout`, `crate::access::pages`).
pub fn router(state: AppState) -> axum::Router {
    api::routes(state)
}
