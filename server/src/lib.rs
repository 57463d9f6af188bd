//! The Edgible control plane: the REST API over the platform's objects, the database behind
//! it, and the WebSocket hub that pushes desired state to agents. `main.rs` only wires
//! configuration, tracing and signals around [`serve`]; tests drive [`router`] in-process.
//! The internal CA that signs devices' certificates lives in [`certs`].

pub mod api;
pub mod bootstrap;
pub mod certs;
pub mod config;
pub mod db;
pub mod desired;
pub mod edge_config;
pub mod hub;
pub mod logs;
pub mod metrics;
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
        let agents = Agents {
            db: db.clone(),
            hub,
            logs: Arc::new(LogStore::default()),
            metrics: Arc::clone(&metrics),
            config: config.clone(),
            ca,
        };
        let edges = Edges { db: db.clone(), hub: edge_hub, config };
        Self { db, metrics, agents, edges }
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
}

/// The HTTP interface of the server: `/v1` (with the agents' and edges' WebSockets),
/// `/healthz` and `/metrics`.
pub fn router(state: AppState) -> axum::Router {
    api::routes(state)
}
