//! The Edgible control plane: the REST API over the platform's objects and the database
//! behind it. `main.rs` only wires configuration, tracing and signals around [`serve`]; tests
//! drive [`router`] in-process.

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod db;
pub mod metrics;
pub mod secrets;
pub mod serve;

use std::sync::Arc;

use crate::db::Db;
use crate::metrics::Metrics;

/// What every request handler shares. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    db: Db,
    metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(db: Db) -> Self {
        Self { db, metrics: Arc::new(Metrics::default()) }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// The HTTP interface of the server: `/v1`, `/healthz` and `/metrics`.
pub fn router(state: AppState) -> axum::Router {
    api::routes(state)
}
