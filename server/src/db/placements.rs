//! Placements: where an application runs. One per application; the application is fixed,
//! everything else (including the strategy and the device) can change in place.
//!
//! The `device_id` column is where the application runs (the placement's `host`): the device
//! a `serving-device` placement names, or the cloud host the scheduler chose for a `cloud`
//! one, chosen in the same write (see `cloud.rs`). Every change of host moves the application:
//! the old host's desired state loses it, the new one's gains it.

use edgible::model::{
    ApplicationId, DeviceId, DevicePoolId, OrganizationId, Page, Placement, PlacementId, PlacementSpec, Revision,
};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, Set,
};

use super::entities::{application, application_status, device, placement};
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, check_revision, parse, revision};

/// How placements are read within an organization; they have no name to filter by.
const PLACEMENTS: Scoped<placement::Entity> = Scoped {
    organization: placement::Column::OrganizationId,
    id: placement::Column::Id,
    name: None,
    row_id: |row| row.id,
};

const SERVING_DEVICE: &str = "serving-device";
pub(super) const CLOUD: &str = "cloud";

pub(super) fn to_model(row: placement::Model) -> Result<Placement, StoreError> {
    let application_id = ApplicationId(row.application_id);
    let spec = match (row.strategy.as_str(), row.device_id) {
        (SERVING_DEVICE, Some(device_id)) => {
            PlacementSpec::ServingDevice { application_id, device_id: DeviceId(device_id) }
        }
        (CLOUD, _) => PlacementSpec::Cloud {
            application_id,
            pool_id: row.pool_id.map(DevicePoolId),
            region: row.region.as_deref().map(|region| parse("placement region", region)).transpose()?,
        },
        (strategy, _) => return Err(StoreError::Corrupt(format!("placement {} has strategy {strategy:?}", row.id))),
    };
    // While a migration runs, the spec shown is where it moves the application.
    let spec = match &row.migration_to {
        Some(to) => super::parse_json("placement migration_to", to)?,
        None => spec,
    };
    Ok(Placement {
        id: PlacementId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        host: row.device_id.map(DeviceId),
        migration_id: row.migration_id.map(edgible::model::MigrationId),
        spec,
    })
}

/// The stored columns of a spec placed on `host`: strategy, host, pool, region.
pub(super) fn columns(
    spec: &PlacementSpec,
    host: DeviceId,
) -> (&'static str, Option<uuid::Uuid>, Option<uuid::Uuid>, Option<String>) {
    match spec {
        PlacementSpec::ServingDevice { .. } => (SERVING_DEVICE, Some(host.0), None, None),
        PlacementSpec::Cloud { pool_id, region, .. } => {
            (CLOUD, Some(host.0), pool_id.map(|id| id.0), region.as_ref().map(ToString::to_string))
        }
    }
}

/// Refuses to change or delete a placement while a migration moves its application.
pub(super) fn refuse_while_migrating(row: &placement::Model) -> Result<(), StoreError> {
    match row.migration_id {
        Some(migration) => Err(StoreError::conflict(
            "migration_id",
            format!("migration {migration} of the application is running; wait for it to end"),
        )),
        None => Ok(()),
    }
}

/// Checks that what the spec points at exists in the organization (objects of other
/// organizations are reported exactly like missing ones) and answers where the application
/// is to run: the named device, or the cloud host the scheduler chooses.
pub(super) async fn check_references(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    spec: &PlacementSpec,
) -> Result<DeviceId, StoreError> {
    let application_id = spec.application_id();
    let application = application::Entity::find_by_id(application_id.0)
        .filter(application::Column::OrganizationId.eq(organization_id.0))
        .one(conn)
        .await?
        .ok_or_else(|| StoreError::invalid("application_id", format!("no application {application_id}")))?;
    match spec {
        PlacementSpec::ServingDevice { device_id, .. } => {
            let device = device::Entity::find_by_id(device_id.0)
                .filter(device::Column::OrganizationId.eq(organization_id.0))
                .count(conn)
                .await?;
            if device == 0 {
                return Err(StoreError::invalid("device_id", format!("no device {device_id}")));
            }
            Ok(*device_id)
        }
        PlacementSpec::Cloud { .. } => {
            let application = super::applications::to_model(application)?;
            super::cloud::choose_host(conn, spec, &application.spec).await
        }
    }
}

/// The device an application is placed on, if it is placed on one.
pub(super) async fn placed_device(
    conn: &impl ConnectionTrait,
    application_id: ApplicationId,
) -> Result<Option<DeviceId>, StoreError> {
    let device: Option<Option<uuid::Uuid>> = placement::Entity::find()
        .select_only()
        .column(placement::Column::DeviceId)
        .filter(placement::Column::ApplicationId.eq(application_id.0))
        .into_tuple()
        .one(conn)
        .await?;
    Ok(device.flatten().map(DeviceId))
}

/// Forgets the status reported for an application that leaves its device: it described the
/// old device, and the new one reports its own.
pub(super) async fn forget_status(
    conn: &impl ConnectionTrait,
    application_id: ApplicationId,
) -> Result<(), StoreError> {
    application_status::Entity::delete_many()
        .filter(application_status::Column::ApplicationId.eq(application_id.0))
        .exec(conn)
        .await?;
    Ok(())
}

impl Db {
    pub async fn placement(&self, organization_id: OrganizationId, id: PlacementId) -> Result<Placement, StoreError> {
        let row = PLACEMENTS.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    /// Placements in creation order. They have no name; a `name` filter matches none.
    pub async fn list_placements(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Placement>, StoreError> {
        PLACEMENTS.page(&self.conn, organization_id.0, request, to_model).await
    }

    pub async fn create_placement(
        &self,
        organization_id: OrganizationId,
        spec: &PlacementSpec,
    ) -> Result<Placement, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let existing = placement::Entity::find()
                .filter(placement::Column::ApplicationId.eq(spec.application_id().0))
                .filter(placement::Column::OrganizationId.eq(organization_id.0))
                .count(&write.txn)
                .await?;
            if existing > 0 {
                return Err(StoreError::conflict(
                    "application_id",
                    "the application is already placed; update its placement instead",
                ));
            }
            let host = check_references(&write.txn, organization_id, spec).await?;
            let (strategy, device_id, pool_id, region) = columns(spec, host);
            let row = placement::ActiveModel {
                id: Set(PlacementId::new().0),
                organization_id: Set(organization_id.0),
                application_id: Set(spec.application_id().0),
                strategy: Set(strategy.to_owned()),
                device_id: Set(device_id),
                pool_id: Set(pool_id),
                region: Set(region),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
                migration_id: Set(None),
                migration_to: Set(None),
            }
            .insert(&write.txn)
            .await?;
            write.change_desired(&crate::desired::placement_devices(None, Some(host))).await?;
            to_model(row)
        }
        .await;
        write.finish(result).await
    }

    pub async fn update_placement(
        &self,
        organization_id: OrganizationId,
        id: PlacementId,
        expected: Option<Revision>,
        spec: &PlacementSpec,
    ) -> Result<Placement, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = PLACEMENTS.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            // The same spec again (the migration's destination while one runs) changes nothing.
            if current.spec == *spec {
                return Ok(current);
            }
            refuse_while_migrating(&row)?;
            if current.spec.application_id() != spec.application_id() {
                return Err(StoreError::invalid(
                    "application_id",
                    format!(
                        "cannot be changed (it is {}); delete the placement instead",
                        current.spec.application_id()
                    ),
                ));
            }
            if current.spec == *spec {
                return Ok(current);
            }
            let host = check_references(&write.txn, organization_id, spec).await?;
            let (strategy, device_id, pool_id, region) = columns(spec, host);
            let mut active: placement::ActiveModel = row.into();
            active.strategy = Set(strategy.to_owned());
            active.device_id = Set(device_id);
            active.pool_id = Set(pool_id);
            active.region = Set(region);
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            let updated = to_model(active.update(&write.txn).await?)?;
            write.change_desired(&crate::desired::placement_devices(current.host, Some(host))).await?;
            if current.host != Some(host) {
                forget_status(&write.txn, spec.application_id()).await?;
            }
            Ok(updated)
        }
        .await;
        write.finish(result).await
    }

    pub async fn delete_placement(&self, organization_id: OrganizationId, id: PlacementId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = PLACEMENTS.row(&write.txn, organization_id.0, id.0).await?;
            refuse_while_migrating(&row)?;
            let current = to_model(row)?;
            placement::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            write.change_desired(&crate::desired::placement_devices(current.host, None)).await?;
            forget_status(&write.txn, current.spec.application_id()).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}
