//! The Edgible control plane: the REST API over the platform's objects, the database behind
//! it, and the WebSocket hub that pushes desired state to agents. `main.rs` only wires
//! configuration, tracing and signals around [`serve`]; tests drive [`router`] in-process.

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod db;
pub mod desired;
pub mod hub;
pub mod logs;
pub mod metrics;
pub mod secrets;
pub mod serve;

use std::sync::Arc;

use crate::db::Db;
use crate::hub::Hub;
use crate::hub::agent::{Agents, SessionConfig};
use crate::logs::LogStore;
use crate::metrics::Metrics;

/// What every request handler shares. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    db: Db,
    metrics: Arc<Metrics>,
    agents: Agents,
}

impl AppState {
    pub fn new(db: Db) -> Self {
        Self::with_session_config(db, SessionConfig::default())
    }

    /// A state whose agent sessions use `config` (tests shorten the timeouts).
    pub fn with_session_config(db: Db, config: SessionConfig) -> Self {
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::default());
        // The database outlives no hub it points at: the listener holds it weakly.
        let listener_hub = Arc::downgrade(&hub);
        db.set_desired_listener(Arc::new(move |devices| {
            if let Some(hub) = listener_hub.upgrade() {
                hub.wake(devices);
            }
        }));
        let agents =
            Agents { db: db.clone(), hub, logs: Arc::new(LogStore::default()), metrics: Arc::clone(&metrics), config };
        Self { db, metrics, agents }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The agent hub and what its sessions share.
    pub fn agents(&self) -> &Agents {
        &self.agents
    }
}

/// The HTTP interface of the server: `/v1` (with the agents' WebSocket), `/healthz` and
/// `/metrics`.
pub fn router(state: AppState) -> axum::Router {
    api::routes(state)
}
