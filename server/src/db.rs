//! The database: sea-orm entities, migrations and every query and rule that needs a
//! transaction. This is the only module that imports `sea_orm`; it takes and returns
//! `edgible::model` types and converts rows at this edge.
//!
//! Writes are serialized. Every write transaction first bumps the single revision counter
//! row, which stamps the objects it changes and, on PostgreSQL, makes concurrent writers (even
//! in other server processes) queue on that row's lock; on SQLite a process-wide mutex keeps a
//! second writer from ever meeting `SQLITE_BUSY`. Checks that span rows (unique names and
//! hostnames, free tunnel addresses, the last owner) therefore see a stable database, and
//! unique indexes stay behind them as a safety net.

mod access;
mod acme;
mod agents;
mod api_keys;
mod applications;
mod certificate_authority;
mod cloud;
mod device_pools;
mod devices;
mod domains;
mod edges;
mod entities;
mod members;
mod migration;
mod migrations;
mod organizations;
mod placements;
mod scoped;
mod usage;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use edgible::model::{DeviceId, DevicePoolId, EdgeId, Page, Revision};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, SqlErr, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

pub use self::access::{LoginUser, StoredAssertionKey};
pub use self::acme::{CertificateState, CertificateSummary, StoredOrder};
pub use self::agents::{EVENTS_KEPT, EnrollError, EventQuery, StatusReport};
pub use self::cloud::{CloudHostError, Rescheduled, Stranded};
pub use self::edges::EdgeEnrolled;
pub use self::usage::{MAX_RECORDS_PER_MESSAGE, RefusedRecord, UsageOutcome};

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist in the caller's organization.
    #[error("not found")]
    NotFound,
    /// The request clashes with stored state (a taken name, a full pool, a dependent object).
    #[error("{message}")]
    Conflict { field: Option<String>, message: String },
    /// The request is well-formed but not acceptable given stored state (a changed immutable
    /// field, a reference to an object that does not exist).
    #[error("{message}")]
    Invalid { field: Option<String>, message: String },
    /// The caller's expected revision is not the object's current one.
    #[error("the object is at revision {current}, not {expected}")]
    StaleRevision { expected: Revision, current: Revision },
    /// A stored value no longer parses; someone edited the database by hand.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot open the database: {0}")]
    Connect(String),
    /// The database itself failed; retrying may help.
    #[error("database error: {0}")]
    Backend(#[source] DbErr),
}

impl From<DbErr> for StoreError {
    fn from(error: DbErr) -> Self {
        // The unique indexes are a safety net behind the explicit checks; if one still fires,
        // the caller gets a conflict rather than a server error.
        if let Some(SqlErr::UniqueConstraintViolation(message)) = error.sql_err() {
            return StoreError::Conflict {
                field: None,
                message: format!("conflicts with an existing object: {message}"),
            };
        }
        StoreError::Backend(error)
    }
}

impl StoreError {
    fn conflict(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Conflict { field: Some(field.into()), message: message.into() }
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid { field: Some(field.into()), message: message.into() }
    }
}

/// One page of a listing to fetch: objects after `after` (an id), in id order, which is
/// creation order because ids are UUIDv7.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// At most this many items (the API bounds it to 1-1000).
    pub limit: u64,
    pub after: Option<Uuid>,
    /// Only objects with exactly this name (for members: this e-mail address).
    pub name: Option<String>,
}

/// Whose sessions a committed write concerns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Woken {
    /// Devices whose desired state (the applications placed on them) the write changed, which
    /// it deleted, or whose pool's set of edges it changed.
    pub devices: Vec<DeviceId>,
    /// Edges whose configuration (the devices and routes of their pool) may have changed, or
    /// which the write deleted.
    pub edges: Vec<EdgeId>,
}

impl Woken {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.edges.is_empty()
    }

    fn add_devices(&mut self, devices: impl IntoIterator<Item = DeviceId>) {
        for device in devices {
            if !self.devices.contains(&device) {
                self.devices.push(device);
            }
        }
    }

    fn add_edges(&mut self, edges: impl IntoIterator<Item = EdgeId>) {
        for edge in edges {
            if !self.edges.contains(&edge) {
                self.edges.push(edge);
            }
        }
    }
}

/// Called after a write committed (or a device went online or offline) with the sessions
/// that must re-read their state.
pub type DesiredListener = Arc<dyn Fn(&Woken) + Send + Sync>;

/// The database handle shared by all requests. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    conn: DatabaseConnection,
    /// Held for the whole of every write transaction on SQLite; `None` on PostgreSQL, where
    /// the revision counter's row lock does the same across processes.
    write_lock: Option<Arc<Mutex<()>>>,
    /// Who hears about changed desired state; shared by every clone of this handle.
    ///
    /// This is an in-process fan-out, enough for one server replica. With several replicas on
    /// PostgreSQL, `Write::finish` would also `NOTIFY` the device ids inside the transaction
    /// and each replica would `LISTEN` and call its own listener.
    listener: Arc<std::sync::RwLock<Option<DesiredListener>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("backend", &self.conn.get_database_backend()).finish_non_exhaustive()
    }
}

/// How long a SQLite connection waits for a lock held by another process before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Db {
    /// Opens the database at `url` (`sqlite://PATH?mode=rwc` or `postgres://...`) and brings
    /// its schema up to date.
    pub async fn connect(url: &str) -> Result<Db, StoreError> {
        let sqlite = url.starts_with("sqlite:");
        if !sqlite && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(StoreError::Connect(format!(
                "unsupported database URL {url:?}: use sqlite://PATH?mode=rwc or postgres://..."
            )));
        }
        let mut options = ConnectOptions::new(url);
        options.sqlx_logging(false).acquire_timeout(Duration::from_secs(30));
        if sqlite {
            // Readers never block the writer in WAL mode, so several connections help reads.
            options.max_connections(8).min_connections(1).map_sqlx_sqlite_opts(|options| {
                options
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
            });
        } else {
            options.max_connections(16);
        }
        let conn = Database::connect(options).await.map_err(|e| StoreError::Connect(e.to_string()))?;
        migration::Migrator::up(&conn, None).await.map_err(|e| StoreError::Connect(format!("migrating: {e}")))?;
        let write_lock = sqlite.then(|| Arc::new(Mutex::new(())));
        let db = Db { conn, write_lock, listener: Arc::default() };
        db.backfill_short_codes().await?;
        Ok(db)
    }

    /// Sets who is told, after each commit, which devices' desired state and which edges'
    /// configuration may have changed.
    pub fn set_desired_listener(&self, listener: DesiredListener) {
        // A poisoned lock only means a panic elsewhere while swapping listeners.
        *self.listener.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(listener);
    }

    fn listener(&self) -> Option<DesiredListener> {
        self.listener.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes the SQLite writer lock (nothing on PostgreSQL) for a write that does not stamp
    /// objects: status the platform records, such as what an agent reported.
    async fn status_write_lock(&self) -> Option<OwnedMutexGuard<()>> {
        match &self.write_lock {
            Some(lock) => Some(Arc::clone(lock).lock_owned().await),
            None => None,
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.conn.ping().await.map_err(StoreError::Backend)
    }

    /// How many objects of each kind are stored, for the metrics gauges.
    pub async fn object_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        Ok(vec![
            ("organizations", entities::organization::Entity::find().count(&self.conn).await?),
            ("members", entities::member::Entity::find().count(&self.conn).await?),
            ("api_keys", entities::api_key::Entity::find().count(&self.conn).await?),
            ("device_pools", entities::device_pool::Entity::find().count(&self.conn).await?),
            ("devices", entities::device::Entity::find().count(&self.conn).await?),
            ("edges", entities::edge::Entity::find().count(&self.conn).await?),
            ("applications", entities::application::Entity::find().count(&self.conn).await?),
            ("placements", entities::placement::Entity::find().count(&self.conn).await?),
        ])
    }

    /// The current value of the revision counter.
    pub async fn current_revision(&self) -> Result<Revision, StoreError> {
        let row = entities::revision_counter::Entity::find_by_id(1)
            .one(&self.conn)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the revision counter row is missing".into()))?;
        revision(row.value)
    }

    /// Starts a write transaction: takes the writer lock and bumps the revision counter.
    async fn begin_write(&self) -> Result<Write, StoreError> {
        let guard = match &self.write_lock {
            Some(lock) => Some(Arc::clone(lock).lock_owned().await),
            None => None,
        };
        let txn = self.conn.begin().await?;
        // The UPDATE comes first so that, on PostgreSQL, the row lock is taken before anything
        // is read: every later read of this transaction sees all earlier writers' commits.
        txn.execute_unprepared("UPDATE revision_counter SET value = value + 1 WHERE id = 1").await?;
        let row = entities::revision_counter::Entity::find_by_id(1)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the revision counter row is missing".into()))?;
        Ok(Write {
            txn,
            revision: revision(row.value)?,
            now: now(),
            touched: std::sync::Mutex::default(),
            listener: self.listener(),
            _guard: guard,
        })
    }
}

/// An open write transaction, the revision it stamps and the time it happens at.
struct Write {
    // Field order matters: the transaction is dropped (rolled back) before the lock is freed.
    txn: DatabaseTransaction,
    revision: Revision,
    now: DateTime<Utc>,
    /// Sessions this write concerns, told to the listener after commit.
    touched: std::sync::Mutex<Woken>,
    listener: Option<DesiredListener>,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl Write {
    /// Commits if `result` is a success and rolls back otherwise, then hands `result` on.
    async fn finish<T, E: From<StoreError>>(self, result: Result<T, E>) -> Result<T, E> {
        match result {
            Ok(value) => {
                self.txn.commit().await.map_err(|error| E::from(error.into()))?;
                let touched =
                    std::mem::take(&mut *self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                if let Some(listener) = &self.listener
                    && !touched.is_empty()
                {
                    listener(&touched);
                }
                Ok(value)
            }
            Err(error) => {
                if let Err(rollback) = self.txn.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a failed write");
                }
                Err(error)
            }
        }
    }

    /// Records that this write changes what `devices` should run: their desired revision
    /// becomes this write's revision (in this transaction), and their sessions, and those of
    /// their pools' edges (whose routes follow placements), are woken after commit.
    async fn change_desired(&self, devices: &[DeviceId]) -> Result<(), StoreError> {
        if devices.is_empty() {
            return Ok(());
        }
        let pools: Vec<uuid::Uuid> = entities::device::Entity::find()
            .select_only()
            .column(entities::device::Column::PoolId)
            .filter(entities::device::Column::Id.is_in(devices.iter().map(|device| device.0)))
            .into_tuple()
            .all(&self.txn)
            .await?;
        for pool in pools {
            self.touch_pool_edges(DevicePoolId(pool)).await?;
        }
        entities::device::Entity::update_many()
            .col_expr(
                entities::device::Column::DesiredRevision,
                sea_orm::sea_query::Expr::value(self.revision_column()),
            )
            .filter(entities::device::Column::Id.is_in(devices.iter().map(|device| device.0)))
            .exec(&self.txn)
            .await?;
        self.touch(devices);
        Ok(())
    }

    /// Records that `devices` must hear about this write after commit (they were deleted, or
    /// their pool's edges changed).
    fn touch(&self, devices: &[DeviceId]) {
        self.touched().add_devices(devices.iter().copied());
    }

    /// Records that `edges` must hear about this write after commit.
    fn touch_edges(&self, edges: &[EdgeId]) {
        self.touched().add_edges(edges.iter().copied());
    }

    /// Records that the edges of `pool` must re-read their configuration after commit.
    async fn touch_pool_edges(&self, pool: DevicePoolId) -> Result<(), StoreError> {
        let edges = edges::edges_of_pool(&self.txn, pool).await?;
        self.touch_edges(&edges);
        Ok(())
    }

    /// Records that the devices of `pool` must hear about this write after commit: the set of
    /// the pool's edges changed.
    async fn touch_pool_devices(&self, pool: DevicePoolId) -> Result<(), StoreError> {
        let devices: Vec<uuid::Uuid> = entities::device::Entity::find()
            .select_only()
            .column(entities::device::Column::Id)
            .filter(entities::device::Column::PoolId.eq(pool.0))
            .into_tuple()
            .all(&self.txn)
            .await?;
        self.touch(&devices.into_iter().map(DeviceId).collect::<Vec<_>>());
        Ok(())
    }

    fn touched(&self) -> std::sync::MutexGuard<'_, Woken> {
        self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn revision_column(&self) -> i64 {
        // Revisions start at 1 and grow by one per write; they stay far below i64::MAX.
        i64::try_from(self.revision).unwrap_or(i64::MAX)
    }
}

/// The current time at the precision both databases keep (microseconds), so that an object
/// answered right after a write equals the same object read back later.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn revision(value: i64) -> Result<Revision, StoreError> {
    Revision::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative revision {value}")))
}

/// Parses a stored string into a model type.
fn parse<T: FromStr>(what: &str, value: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| StoreError::Corrupt(format!("{what} {value:?}: {e}")))
}

/// Parses a stored JSON text column.
fn parse_json<T: serde::de::DeserializeOwned>(what: &str, value: &str) -> Result<T, StoreError> {
    serde_json::from_str(value).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

/// The snake_case name serde gives a unit enum variant (`"owner"` for `Role::Owner`).
fn enum_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => Ok(text),
        _ => Err(StoreError::Corrupt("an enum did not serialize to a string".into())),
    }
}

fn enum_from_text<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|e| StoreError::Corrupt(format!("{what} {text:?}: {e}")))
}

/// Turns up to `limit + 1` rows (fetched in id order) into a page whose cursor is the last
/// id shown when more rows exist.
fn page<R, T>(
    mut rows: Vec<R>,
    limit: u64,
    id: impl Fn(&R) -> Uuid,
    convert: impl Fn(R) -> Result<T, StoreError>,
) -> Result<Page<T>, StoreError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|row| id(row).to_string())
    } else {
        None
    };
    let items = rows.into_iter().map(convert).collect::<Result<Vec<_>, _>>()?;
    Ok(Page { items, next_cursor })
}

/// Fails with a stale-revision error when the caller expected another revision.
fn check_revision(expected: Option<Revision>, stored: i64) -> Result<(), StoreError> {
    let current = revision(stored)?;
    match expected {
        Some(expected) if expected != current => Err(StoreError::StaleRevision { expected, current }),
        _ => Ok(()),
    }
}
