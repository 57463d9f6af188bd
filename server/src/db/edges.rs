//! Edges: the public entry points of pools. An edge is created like a device (a name, its
//! pool, and here the `host:port` devices send WireGuard datagrams to), gets its tunnel
//! address from the pool's network by the same allocator as devices (so an edge and a device
//! never share an address), and enrolls with a one-time token (stored hashed) for a
//! credential (stored hashed). What the edge reports (online state, acknowledged revision) is
//! status: it never bumps object revisions.
//!
//! Every change here that alters what a device of the pool must know (the set of enrolled
//! edges: enrollment, a changed endpoint, deletion) wakes the pool's agents after commit;
//! deleting an edge also wakes its own session, which then ends.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use edgible::model::{
    DevicePoolId, DeviceState, Edge, EdgeCreated, EdgeId, EdgeSpec, EdgeStatus, OrganizationId, Page, Revision,
    TunnelCidr,
};
use edgible::protocol::v1::EdgePeer;
use sea_orm::sea_query::Expr;
use sea_orm::{
    AccessMode, ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, IsolationLevel,
    QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use uuid::Uuid;

use super::agents::{check_token_usable, public_key_taken};
use super::entities::{application, device, device_pool, edge, placement};
use super::scoped::Scoped;
use super::{
    Db, EnrollError, PageRequest, StoreError, check_revision, enum_from_text, enum_text, now, parse, revision,
};
use crate::edge_config::EdgeInputs;
use crate::secrets::NewSecret;

/// How edges are read within an organization.
const EDGES: Scoped<edge::Entity> = Scoped {
    organization: edge::Column::OrganizationId,
    id: edge::Column::Id,
    name: Some(edge::Column::Name),
    row_id: |row| row.id,
};

/// An edge that just enrolled, and its pool's network.
#[derive(Debug, Clone)]
pub struct EdgeEnrolled {
    pub edge: Edge,
    pub tunnel_cidr: TunnelCidr,
}

fn address(value: i64) -> Result<Ipv4Addr, StoreError> {
    u32::try_from(value)
        .map(Ipv4Addr::from)
        .map_err(|_| StoreError::Corrupt(format!("tunnel address {value} is not an IPv4 address")))
}

pub(super) fn to_model(row: edge::Model) -> Result<Edge, StoreError> {
    Ok(Edge {
        id: EdgeId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        spec: EdgeSpec {
            name: parse("edge name", &row.name)?,
            pool_id: DevicePoolId(row.pool_id),
            endpoint: parse("edge endpoint", &row.endpoint)?,
        },
        status: EdgeStatus {
            tunnel_address: address(row.tunnel_address)?,
            public_key: row.public_key,
            state: enum_from_text("edge state", &row.state)?,
            applied_revision: row.applied_revision.map(revision).transpose()?,
            last_seen_at: row.last_seen_at,
        },
    })
}

/// The ids of the edges of `pool`.
pub(super) async fn edges_of_pool(conn: &impl ConnectionTrait, pool: DevicePoolId) -> Result<Vec<EdgeId>, StoreError> {
    let ids: Vec<Uuid> = edge::Entity::find()
        .select_only()
        .column(edge::Column::Id)
        .filter(edge::Column::PoolId.eq(pool.0))
        .into_tuple()
        .all(conn)
        .await?;
    Ok(ids.into_iter().map(EdgeId).collect())
}

fn revision_column(value: Revision) -> i64 {
    // Revisions come from the server's own counter; they stay far below i64::MAX.
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Db {
    pub async fn edge(&self, organization_id: OrganizationId, id: EdgeId) -> Result<Edge, StoreError> {
        let row = EDGES.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    pub async fn list_edges(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Edge>, StoreError> {
        EDGES.page(&self.conn, organization_id.0, request, to_model).await
    }

    /// Creates an edge with the lowest free address of its pool (free of devices and edges)
    /// and a one-time enrollment token (stored hashed) valid until `enrollment_expires_at`.
    pub async fn create_edge(
        &self,
        organization_id: OrganizationId,
        spec: &EdgeSpec,
        enrollment: &NewSecret,
        enrollment_expires_at: DateTime<Utc>,
    ) -> Result<EdgeCreated, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let pool = device_pool::Entity::find_by_id(spec.pool_id.0)
                .filter(device_pool::Column::OrganizationId.eq(organization_id.0))
                .one(&write.txn)
                .await?
                .ok_or_else(|| StoreError::invalid("pool_id", format!("no device pool {}", spec.pool_id)))?;
            if EDGES.name_taken(&write.txn, organization_id.0, spec.name.as_str(), None).await? {
                return Err(StoreError::conflict("name", format!("an edge named {} already exists", spec.name)));
            }
            let cidr: TunnelCidr = parse("pool tunnel network", &pool.tunnel_cidr)?;
            let address = super::devices::allocate(&write.txn, spec.pool_id, cidr).await?;
            let row = edge::ActiveModel {
                id: Set(EdgeId::new().0),
                organization_id: Set(organization_id.0),
                name: Set(spec.name.to_string()),
                pool_id: Set(spec.pool_id.0),
                endpoint: Set(spec.endpoint.to_string()),
                tunnel_address: Set(i64::from(u32::from(address))),
                public_key: Set(None),
                state: Set(enum_text(&DeviceState::Pending)?),
                applied_revision: Set(None),
                last_seen_at: Set(None),
                enrollment_token_sha256: Set(Some(enrollment.sha256.clone())),
                enrollment_expires_at: Set(Some(enrollment_expires_at)),
                enrollment_used_at: Set(None),
                credential_sha256: Set(None),
                session_id: Set(None),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
            }
            .insert(&write.txn)
            .await?;
            Ok(EdgeCreated { edge: to_model(row)?, enrollment_token: enrollment.secret.clone(), enrollment_expires_at })
        }
        .await;
        write.finish(result).await
    }

    /// Changes an edge's name or endpoint; its pool cannot change. A new endpoint of an
    /// enrolled edge reaches the pool's devices after commit.
    pub async fn update_edge(
        &self,
        organization_id: OrganizationId,
        id: EdgeId,
        expected: Option<Revision>,
        spec: &EdgeSpec,
    ) -> Result<Edge, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = EDGES.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec.pool_id != spec.pool_id {
                return Err(StoreError::invalid(
                    "pool_id",
                    format!("cannot be changed (it is {}); create a new edge instead", current.spec.pool_id),
                ));
            }
            if current.spec == *spec {
                return Ok(current);
            }
            if EDGES.name_taken(&write.txn, organization_id.0, spec.name.as_str(), Some(id.0)).await? {
                return Err(StoreError::conflict("name", format!("an edge named {} already exists", spec.name)));
            }
            if current.spec.endpoint != spec.endpoint && current.status.public_key.is_some() {
                write.touch_pool_devices(spec.pool_id).await?;
            }
            let mut active: edge::ActiveModel = row.into();
            active.name = Set(spec.name.to_string());
            active.endpoint = Set(spec.endpoint.to_string());
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    /// Deletes an edge, freeing its address. Its session ends and the pool's devices drop it
    /// from their peers after commit.
    pub async fn delete_edge(&self, organization_id: OrganizationId, id: EdgeId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = EDGES.row(&write.txn, organization_id.0, id.0).await?;
            edge::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            write.touch_edges(&[id]);
            if row.public_key.is_some() {
                write.touch_pool_devices(DevicePoolId(row.pool_id)).await?;
            }
            Ok(())
        }
        .await;
        write.finish(result).await
    }

    /// Exchanges an edge enrollment token (by its hash) for an edge credential: records the
    /// public key and the credential's hash and marks the token used.
    pub async fn enroll_edge(
        &self,
        token_sha256: &str,
        public_key: &str,
        credential: &NewSecret,
    ) -> Result<EdgeEnrolled, EnrollError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = edge::Entity::find()
                .filter(edge::Column::EnrollmentTokenSha256.eq(token_sha256))
                .one(&write.txn)
                .await?
                .ok_or(EnrollError::UnknownToken)?;
            check_token_usable(row.enrollment_used_at, row.enrollment_expires_at, write.now)?;
            if public_key_taken(&write.txn, public_key, row.id).await? {
                return Err(EnrollError::KeyTaken);
            }
            let pool = device_pool::Entity::find_by_id(row.pool_id)
                .one(&write.txn)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("edge {} names a missing pool", row.id)))?;
            let tunnel_cidr = parse("pool tunnel network", &pool.tunnel_cidr)?;
            // The pool's devices add the edge to their peers.
            write.touch_pool_devices(DevicePoolId(row.pool_id)).await?;
            let mut active: edge::ActiveModel = row.into();
            active.public_key = Set(Some(public_key.to_owned()));
            active.credential_sha256 = Set(Some(credential.sha256.clone()));
            active.enrollment_used_at = Set(Some(write.now));
            active.state = Set(enum_text(&DeviceState::Offline)?);
            let edge = to_model(active.update(&write.txn).await?)?;
            Ok(EdgeEnrolled { edge, tunnel_cidr })
        }
        .await;
        write.finish(result).await
    }

    /// The edge a credential (by its hash) belongs to.
    pub async fn edge_by_credential(&self, credential_sha256: &str) -> Result<Option<Edge>, StoreError> {
        let row =
            edge::Entity::find().filter(edge::Column::CredentialSha256.eq(credential_sha256)).one(&self.conn).await?;
        row.map(to_model).transpose()
    }

    /// The network of a pool (any organization's: callers hold an object of that pool).
    pub async fn pool_tunnel_cidr(&self, pool: DevicePoolId) -> Result<TunnelCidr, StoreError> {
        let row = device_pool::Entity::find_by_id(pool.0).one(&self.conn).await?.ok_or(StoreError::NotFound)?;
        parse("pool tunnel network", &row.tunnel_cidr)
    }

    /// The enrolled edges of a pool, as its devices' WireGuard peers, in address order.
    pub async fn pool_edge_peers(&self, pool: DevicePoolId) -> Result<Vec<EdgePeer>, StoreError> {
        let rows = edge::Entity::find()
            .filter(edge::Column::PoolId.eq(pool.0))
            .filter(edge::Column::PublicKey.is_not_null())
            .order_by_asc(edge::Column::TunnelAddress)
            .all(&self.conn)
            .await?;
        rows.into_iter()
            .filter_map(|row| {
                let public_key = row.public_key?;
                Some(address(row.tunnel_address).map(|tunnel_address| EdgePeer {
                    edge_id: EdgeId(row.id),
                    public_key,
                    endpoint: row.endpoint,
                    tunnel_address,
                }))
            })
            .collect()
    }

    /// What an edge's configuration is computed from, read from one snapshot of the
    /// database: the revision counter, the devices of the edge's pool (and no other), and the
    /// applications placed on them. `None` if the edge no longer exists.
    pub async fn edge_inputs(&self, edge_id: EdgeId) -> Result<Option<EdgeInputs>, StoreError> {
        let txn = match self.conn.get_database_backend() {
            DbBackend::Postgres => {
                self.conn.begin_with_config(Some(IsolationLevel::RepeatableRead), Some(AccessMode::ReadOnly)).await?
            }
            // A SQLite transaction reads one snapshot from its first read on.
            _ => self.conn.begin().await?,
        };
        let Some(row) = edge::Entity::find_by_id(edge_id.0).one(&txn).await? else {
            txn.commit().await?;
            return Ok(None);
        };
        let counter = super::entities::revision_counter::Entity::find_by_id(1)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the revision counter row is missing".into()))?;
        let devices = device::Entity::find()
            .filter(device::Column::PoolId.eq(row.pool_id))
            .order_by_asc(device::Column::TunnelAddress)
            .all(&txn)
            .await?;
        let device_ids: Vec<Uuid> = devices.iter().map(|device| device.id).collect();
        let placements = if device_ids.is_empty() {
            Vec::new()
        } else {
            placement::Entity::find()
                .filter(placement::Column::DeviceId.is_in(device_ids))
                .order_by_asc(placement::Column::ApplicationId)
                .all(&txn)
                .await?
        };
        let application_ids: Vec<Uuid> = placements.iter().map(|placement| placement.application_id).collect();
        let applications = if application_ids.is_empty() {
            Vec::new()
        } else {
            application::Entity::find().filter(application::Column::Id.is_in(application_ids)).all(&txn).await?
        };
        txn.commit().await?;
        let devices = devices.into_iter().map(super::devices::to_model).collect::<Result<Vec<_>, _>>()?;
        let mut placed = Vec::new();
        for row in applications {
            let device = placements
                .iter()
                .find(|placement| placement.application_id == row.id)
                .and_then(|placement| placement.device_id);
            if let Some(device) = device {
                placed.push((edgible::model::DeviceId(device), super::applications::to_model(row)?));
            }
        }
        Ok(Some(EdgeInputs { revision: revision(counter.value)?, devices, placed }))
    }

    /// Marks the edge online for session `session_id`; false if the edge is gone.
    pub async fn edge_connected(&self, edge_id: EdgeId, session_id: Uuid) -> Result<bool, StoreError> {
        let _guard = self.status_write_lock().await;
        let updated = edge::Entity::update_many()
            .col_expr(edge::Column::State, Expr::value(enum_text(&DeviceState::Online)?))
            .col_expr(edge::Column::SessionId, Expr::value(Some(session_id)))
            .col_expr(edge::Column::LastSeenAt, Expr::value(now()))
            .filter(edge::Column::Id.eq(edge_id.0))
            .exec(&self.conn)
            .await?;
        Ok(updated.rows_affected > 0)
    }

    /// Marks the edge offline, unless a newer session has taken it over meanwhile.
    pub async fn edge_disconnected(&self, edge_id: EdgeId, session_id: Uuid) -> Result<(), StoreError> {
        let _guard = self.status_write_lock().await;
        edge::Entity::update_many()
            .col_expr(edge::Column::State, Expr::value(enum_text(&DeviceState::Offline)?))
            .col_expr(edge::Column::SessionId, Expr::value(None::<Uuid>))
            .col_expr(edge::Column::LastSeenAt, Expr::value(now()))
            .filter(edge::Column::Id.eq(edge_id.0))
            .filter(edge::Column::SessionId.eq(session_id))
            .exec(&self.conn)
            .await?;
        Ok(())
    }

    /// Records that the session's edge was heard from now.
    pub async fn edge_seen(&self, edge_id: EdgeId, session_id: Uuid) -> Result<(), StoreError> {
        let _guard = self.status_write_lock().await;
        edge::Entity::update_many()
            .col_expr(edge::Column::LastSeenAt, Expr::value(now()))
            .filter(edge::Column::Id.eq(edge_id.0))
            .filter(edge::Column::SessionId.eq(session_id))
            .exec(&self.conn)
            .await?;
        Ok(())
    }

    /// Stores `applied` as the edge's applied revision if it moves it forward; answers
    /// whether it did. The session checks that the revision was sent.
    pub async fn record_edge_applied(&self, edge_id: EdgeId, applied: Revision) -> Result<bool, StoreError> {
        let applied = revision_column(applied);
        let _guard = self.status_write_lock().await;
        let updated = edge::Entity::update_many()
            .col_expr(edge::Column::AppliedRevision, Expr::value(Some(applied)))
            .col_expr(edge::Column::LastSeenAt, Expr::value(now()))
            .filter(edge::Column::Id.eq(edge_id.0))
            .filter(
                Condition::any()
                    .add(edge::Column::AppliedRevision.is_null())
                    .add(edge::Column::AppliedRevision.lt(applied)),
            )
            .exec(&self.conn)
            .await?;
        Ok(updated.rows_affected > 0)
    }
}
