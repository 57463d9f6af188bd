//! Cloud hosts (issue 9): the capacity their agents declare, the candidates the scheduler
//! chooses from, and moving applications off hosts that stayed offline.
//!
//! A cloud host is a device in a `cloud` pool of an operator organization whose agent declared
//! a capacity in its hello. A `cloud` placement of any organization lands on one: the chosen
//! host is stored in the placement's `device_id`, the column every reader of "what runs
//! where" (desired state, edge routes, statuses, certificates, access) already follows, so a
//! host runs its guests exactly like its own applications. Choosing happens inside the write
//! transaction that stores the placement, which the revision counter serializes: two
//! placements can never both take the last free capacity of a host.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use edgible::model::{
    ApplicationId, ApplicationSpec, DeviceId, DevicePoolId, DeviceState, HostCapacity, OrganizationId, PlacementSpec,
    PoolKind, Region, Validate, ValidationError,
};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::entities::{application, device, device_pool, organization, placement};
use super::{Db, StoreError, enum_from_text, enum_text};
use crate::scheduler::{Candidate, NoFit, schedule};

/// Why an agent's declaration as a cloud host was refused.
#[derive(Debug, thiserror::Error)]
pub enum CloudHostError {
    #[error("cloud_host: the device's pool {pool} is not a cloud pool; enroll cloud hosts into a pool of kind cloud")]
    NotCloudPool { pool: String },
    #[error("cloud_host: the device's organization is not an operator organization; only operators run cloud hosts")]
    NotOperator,
    #[error("cloud_host.{}", .0)]
    Invalid(ValidationError),
    #[error("the device no longer exists")]
    Gone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for CloudHostError {
    fn from(error: sea_orm::DbErr) -> Self {
        CloudHostError::Store(error.into())
    }
}

/// A cloud placement on a host that has been offline for too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranded {
    pub organization_id: OrganizationId,
    pub application_id: ApplicationId,
    pub host: DeviceId,
    /// When the host was last heard from.
    pub offline_since: DateTime<Utc>,
    /// Whether the application has volumes: then it is not moved, its data is on the host.
    pub stateful: bool,
}

/// What rescheduling one stranded application did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rescheduled {
    Moved {
        to: DeviceId,
    },
    /// No other host fits; the placement stays where it is.
    NoFit(String),
    /// Meanwhile the host came back, or the placement moved or went away.
    Unchanged,
}

fn online_text() -> Result<String, StoreError> {
    enum_text(&DeviceState::Online)
}

fn column(value: u64) -> i64 {
    // Capacities are declared in MiB and vCPUs; they stay far below i64::MAX.
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The ids of the operator organizations.
async fn operators(conn: &impl ConnectionTrait) -> Result<Vec<Uuid>, StoreError> {
    Ok(organization::Entity::find()
        .select_only()
        .column(organization::Column::Id)
        .filter(organization::Column::Operator.eq(true))
        .into_tuple()
        .all(conn)
        .await?)
}

/// The cloud pools a `cloud` placement may land in: the named pool (which must be a cloud pool
/// of an operator organization; a tenant may name it without being able to read it) or every
/// operator's cloud pool in the region.
async fn cloud_pools(
    conn: &impl ConnectionTrait,
    pool_id: Option<DevicePoolId>,
    region: Option<&Region>,
) -> Result<Vec<Uuid>, StoreError> {
    let operators = operators(conn).await?;
    let cloud = enum_text(&PoolKind::Cloud)?;
    let mut select = device_pool::Entity::find()
        .select_only()
        .column(device_pool::Column::Id)
        .filter(device_pool::Column::Kind.eq(cloud))
        .filter(device_pool::Column::OrganizationId.is_in(operators));
    if let Some(pool_id) = pool_id {
        select = select.filter(device_pool::Column::Id.eq(pool_id.0));
    }
    if let Some(region) = region {
        select = select.filter(device_pool::Column::Region.eq(region.to_string()));
    }
    let pools: Vec<Uuid> = select.into_tuple().all(conn).await?;
    if let Some(pool_id) = pool_id
        && pools.is_empty()
    {
        let message = match region {
            Some(region) => format!("no cloud pool {pool_id} of an operator organization in region {region}"),
            None => format!("no cloud pool {pool_id} of an operator organization"),
        };
        return Err(StoreError::invalid("pool_id", message));
    }
    Ok(pools)
}

/// The hosts of `pools` that declared a capacity, with what is placed on them (all
/// organizations' applications, except `moving`, the one being scheduled).
async fn candidates(
    conn: &impl ConnectionTrait,
    pools: Vec<Uuid>,
    moving: ApplicationId,
) -> Result<Vec<Candidate>, StoreError> {
    let online = online_text()?;
    let hosts = device::Entity::find()
        .filter(device::Column::PoolId.is_in(pools))
        .filter(device::Column::CloudVcpus.is_not_null())
        .order_by_asc(device::Column::Id)
        .all(conn)
        .await?;
    let host_ids: Vec<Uuid> = hosts.iter().map(|host| host.id).collect();
    let placed: Vec<(Uuid, Option<Uuid>)> = placement::Entity::find()
        .select_only()
        .column(placement::Column::ApplicationId)
        .column(placement::Column::DeviceId)
        .filter(placement::Column::DeviceId.is_in(host_ids))
        .filter(placement::Column::ApplicationId.ne(moving.0))
        .into_tuple()
        .all(conn)
        .await?;
    let applications = application::Entity::find()
        .filter(application::Column::Id.is_in(placed.iter().map(|(id, _)| *id)))
        .all(conn)
        .await?;
    let mut used: BTreeMap<Uuid, HostCapacity> = BTreeMap::new();
    for row in applications {
        let Some(host) = placed.iter().find(|(id, _)| *id == row.id).and_then(|(_, host)| *host) else {
            continue;
        };
        let needed = HostCapacity::required_by(&super::applications::to_model(row)?.spec);
        let total = used.entry(host).or_insert(HostCapacity { vcpus: 0, memory_mib: 0, disk_mib: 0 });
        total.vcpus = total.vcpus.saturating_add(needed.vcpus);
        total.memory_mib = total.memory_mib.saturating_add(needed.memory_mib);
        total.disk_mib = total.disk_mib.saturating_add(needed.disk_mib);
    }
    let mut candidates = Vec::new();
    for host in hosts {
        let Some(capacity) = super::devices::cloud_host(&host)? else {
            continue;
        };
        candidates.push(Candidate {
            device_id: DeviceId(host.id),
            online: host.state == online,
            capacity,
            used: used.get(&host.id).copied().unwrap_or(HostCapacity { vcpus: 0, memory_mib: 0, disk_mib: 0 }),
        });
    }
    Ok(candidates)
}

/// Chooses the cloud host for `spec` (a `cloud` placement of `application`); a 409 naming
/// what was needed and what the best host had when none fits.
pub(super) async fn choose_host(
    conn: &impl ConnectionTrait,
    spec: &PlacementSpec,
    application: &ApplicationSpec,
) -> Result<DeviceId, StoreError> {
    let PlacementSpec::Cloud { application_id, pool_id, region } = spec else {
        return Err(StoreError::Corrupt("only cloud placements are scheduled".into()));
    };
    let pools = cloud_pools(conn, *pool_id, region.as_ref()).await?;
    let candidates = candidates(conn, pools, *application_id).await?;
    let needed = HostCapacity::required_by(application);
    schedule(&candidates, needed).map_err(|error| {
        let field = if pool_id.is_some() { "pool_id" } else { "region" };
        let place = match (pool_id, region) {
            (Some(pool_id), _) => format!("cloud pool {pool_id}"),
            (None, Some(region)) => format!("region {region}"),
            (None, None) => "the cloud".to_owned(),
        };
        let message = match error {
            NoFit::TooSmall { .. } => format!("cannot place the application in {place}: {error}"),
            _ => format!(
                "cannot place the application (it needs {}) in {place}: {error}",
                crate::scheduler::describe(needed)
            ),
        };
        StoreError::conflict(field, message)
    })
}

/// Refuses a change of an application that would no longer fit on the cloud host it is placed
/// on (it needs more than before and the host has not that much free). Run inside the
/// application's write, like scheduling. Ports are no host resource: the agent reaches each
/// guest at its own address, so applications on one host may listen on the same port.
pub(super) async fn check_host_still_fits(
    conn: &impl ConnectionTrait,
    application_id: ApplicationId,
    before: &ApplicationSpec,
    after: &ApplicationSpec,
) -> Result<(), StoreError> {
    let needed = HostCapacity::required_by(after);
    if needed == HostCapacity::required_by(before) {
        return Ok(());
    }
    let Some(placement) = placement::Entity::find()
        .filter(placement::Column::ApplicationId.eq(application_id.0))
        .filter(placement::Column::Strategy.eq(super::placements::CLOUD))
        .one(conn)
        .await?
    else {
        return Ok(());
    };
    let Some(host) = placement.device_id else {
        return Ok(());
    };
    let Some(row) = device::Entity::find_by_id(host).one(conn).await? else {
        return Ok(());
    };
    let candidates = candidates(conn, vec![row.pool_id], application_id).await?;
    let Some(candidate) = candidates.iter().find(|candidate| candidate.device_id.0 == host) else {
        return Ok(());
    };
    if !crate::scheduler::covers(candidate.free(), needed) {
        return Err(StoreError::conflict(
            "resources",
            format!(
                "the application would need {}, but its cloud host {host} has {} free; place it elsewhere first",
                crate::scheduler::describe(needed),
                crate::scheduler::describe(candidate.free())
            ),
        ));
    }
    Ok(())
}

impl Db {
    /// Records what the device's agent declared in its hello: its capacity as a cloud host,
    /// which only a device in a `cloud` pool of an operator organization may declare, or
    /// nothing (a hello without it clears what was declared before). Platform status: no
    /// revision changes.
    pub async fn record_cloud_host(
        &self,
        device_id: DeviceId,
        capacity: Option<HostCapacity>,
    ) -> Result<(), CloudHostError> {
        let row = device::Entity::find_by_id(device_id.0).one(&self.conn).await?.ok_or(CloudHostError::Gone)?;
        if let Some(capacity) = &capacity {
            capacity.validate().map_err(CloudHostError::Invalid)?;
            let pool =
                device_pool::Entity::find_by_id(row.pool_id).one(&self.conn).await?.ok_or(CloudHostError::Gone)?;
            if enum_from_text::<PoolKind>("pool kind", &pool.kind)? != PoolKind::Cloud {
                return Err(CloudHostError::NotCloudPool { pool: pool.name });
            }
            let operator = organization::Entity::find_by_id(row.organization_id)
                .one(&self.conn)
                .await?
                .is_some_and(|organization| organization.operator);
            if !operator {
                return Err(CloudHostError::NotOperator);
            }
        } else if row.cloud_vcpus.is_none() {
            return Ok(());
        }
        let _guard = self.status_write_lock().await;
        device::Entity::update_many()
            .col_expr(device::Column::CloudVcpus, Expr::value(capacity.map(|c| i64::from(c.vcpus))))
            .col_expr(device::Column::CloudMemoryMib, Expr::value(capacity.map(|c| column(c.memory_mib))))
            .col_expr(device::Column::CloudDiskMib, Expr::value(capacity.map(|c| column(c.disk_mib))))
            .filter(device::Column::Id.eq(device_id.0))
            .exec(&self.conn)
            .await?;
        Ok(())
    }

    /// The `cloud` placements on cloud hosts that are offline and were last heard from
    /// before `offline_before`.
    pub async fn stranded_placements(&self, offline_before: DateTime<Utc>) -> Result<Vec<Stranded>, StoreError> {
        let hosts = device::Entity::find()
            .filter(device::Column::CloudVcpus.is_not_null())
            .filter(device::Column::State.ne(online_text()?))
            .filter(device::Column::LastSeenAt.lt(offline_before))
            .all(&self.conn)
            .await?;
        let mut stranded = Vec::new();
        for host in hosts {
            let Some(offline_since) = host.last_seen_at else {
                continue;
            };
            let placements = placement::Entity::find()
                .filter(placement::Column::DeviceId.eq(host.id))
                .filter(placement::Column::Strategy.eq(super::placements::CLOUD))
                // A migration moving the application decides where it goes (and rolls back
                // if its source stays away).
                .filter(placement::Column::MigrationId.is_null())
                .order_by_asc(placement::Column::ApplicationId)
                .all(&self.conn)
                .await?;
            for placement in placements {
                let Some(application) =
                    application::Entity::find_by_id(placement.application_id).one(&self.conn).await?
                else {
                    continue;
                };
                let application = super::applications::to_model(application)?;
                stranded.push(Stranded {
                    organization_id: OrganizationId(placement.organization_id),
                    application_id: application.id,
                    host: DeviceId(host.id),
                    offline_since,
                    stateful: !application.spec.storage.is_empty(),
                });
            }
        }
        Ok(stranded)
    }

    /// Moves a stateless application off its offline host `from` to another fitting host, in
    /// one write: the placement's host changes (platform-written, so its revision does not),
    /// both hosts' desired revisions move, the old status is forgotten.
    pub async fn reschedule(&self, application_id: ApplicationId, from: DeviceId) -> Result<Rescheduled, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let Some(row) = placement::Entity::find()
                .filter(placement::Column::ApplicationId.eq(application_id.0))
                .one(&write.txn)
                .await?
            else {
                return Ok(Rescheduled::Unchanged);
            };
            let online = online_text()?;
            let host = device::Entity::find_by_id(from.0).one(&write.txn).await?;
            if row.device_id != Some(from.0) || host.is_none_or(|host| host.state == online) {
                return Ok(Rescheduled::Unchanged);
            }
            let placement = super::placements::to_model(row.clone())?;
            let Some(application) = application::Entity::find_by_id(application_id.0).one(&write.txn).await? else {
                return Ok(Rescheduled::Unchanged);
            };
            let application = super::applications::to_model(application)?;
            let to = match choose_host(&write.txn, &placement.spec, &application.spec).await {
                Ok(to) => to,
                Err(StoreError::Conflict { message, .. } | StoreError::Invalid { message, .. }) => {
                    return Ok(Rescheduled::NoFit(message));
                }
                Err(error) => return Err(error),
            };
            placement::Entity::update_many()
                .col_expr(placement::Column::DeviceId, Expr::value(Some(to.0)))
                .filter(placement::Column::Id.eq(row.id))
                .exec(&write.txn)
                .await?;
            write.change_desired(&[from, to]).await?;
            super::placements::forget_status(&write.txn, application_id).await?;
            Ok(Rescheduled::Moved { to })
        }
        .await;
        write.finish(result).await
    }

    /// Whether the application is placed on the device (a cloud host's guest, of any
    /// organization, included).
    pub async fn placed_on(&self, device_id: DeviceId, application_id: ApplicationId) -> Result<bool, StoreError> {
        let count = placement::Entity::find()
            .filter(placement::Column::ApplicationId.eq(application_id.0))
            .filter(placement::Column::DeviceId.eq(device_id.0))
            .count(&self.conn)
            .await?;
        Ok(count > 0)
    }

    /// Records an event the platform itself raises about an application (rescheduling).
    pub async fn record_platform_event(
        &self,
        organization_id: OrganizationId,
        device_id: DeviceId,
        application_id: ApplicationId,
        message: &str,
    ) -> Result<(), StoreError> {
        self.insert_event(organization_id, device_id, Some(application_id), super::now(), message).await?;
        Ok(())
    }
}
