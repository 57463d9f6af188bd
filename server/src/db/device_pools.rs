//! Device pools. The tunnel network and kind are fixed at creation; a pool that still has
//! devices or edges, or that a cloud placement names, cannot be deleted.

use edgible::model::{DevicePool, DevicePoolId, DevicePoolSpec, OrganizationId, Page, Revision};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, Set};

use super::entities::{device, device_pool, edge, placement};
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, check_revision, enum_from_text, enum_text, parse, revision};

/// How device pools are read within an organization.
const DEVICE_POOLS: Scoped<device_pool::Entity> = Scoped {
    organization: device_pool::Column::OrganizationId,
    id: device_pool::Column::Id,
    name: Some(device_pool::Column::Name),
    row_id: |row| row.id,
};

pub(super) fn to_model(row: device_pool::Model) -> Result<DevicePool, StoreError> {
    Ok(DevicePool {
        id: DevicePoolId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        spec: DevicePoolSpec {
            name: parse("pool name", &row.name)?,
            tunnel_cidr: parse("pool tunnel network", &row.tunnel_cidr)?,
            kind: enum_from_text("pool kind", &row.kind)?,
            region: row.region.as_deref().map(|region| parse("pool region", region)).transpose()?,
        },
    })
}

impl Db {
    pub async fn device_pool(
        &self,
        organization_id: OrganizationId,
        id: DevicePoolId,
    ) -> Result<DevicePool, StoreError> {
        let row = DEVICE_POOLS.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    pub async fn list_device_pools(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<DevicePool>, StoreError> {
        DEVICE_POOLS.page(&self.conn, organization_id.0, request, to_model).await
    }

    pub async fn create_device_pool(
        &self,
        organization_id: OrganizationId,
        spec: &DevicePoolSpec,
    ) -> Result<DevicePool, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            if DEVICE_POOLS.name_taken(&write.txn, organization_id.0, spec.name.as_str(), None).await? {
                return Err(StoreError::conflict("name", format!("a device pool named {} already exists", spec.name)));
            }
            let row = device_pool::ActiveModel {
                id: Set(DevicePoolId::new().0),
                organization_id: Set(organization_id.0),
                name: Set(spec.name.to_string()),
                tunnel_cidr: Set(spec.tunnel_cidr.to_string()),
                kind: Set(enum_text(&spec.kind)?),
                region: Set(spec.region.as_ref().map(ToString::to_string)),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
            }
            .insert(&write.txn)
            .await?;
            to_model(row)
        }
        .await;
        write.finish(result).await
    }

    pub async fn update_device_pool(
        &self,
        organization_id: OrganizationId,
        id: DevicePoolId,
        expected: Option<Revision>,
        spec: &DevicePoolSpec,
    ) -> Result<DevicePool, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = DEVICE_POOLS.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec.tunnel_cidr != spec.tunnel_cidr {
                return Err(StoreError::invalid(
                    "tunnel_cidr",
                    format!("cannot be changed (it is {}); create a new pool instead", current.spec.tunnel_cidr),
                ));
            }
            if current.spec.kind != spec.kind {
                return Err(StoreError::invalid("kind", "cannot be changed; create a new pool instead"));
            }
            if current.spec == *spec {
                return Ok(current);
            }
            if DEVICE_POOLS.name_taken(&write.txn, organization_id.0, spec.name.as_str(), Some(id.0)).await? {
                return Err(StoreError::conflict("name", format!("a device pool named {} already exists", spec.name)));
            }
            let mut active: device_pool::ActiveModel = row.into();
            active.name = Set(spec.name.to_string());
            active.region = Set(spec.region.as_ref().map(ToString::to_string));
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    pub async fn delete_device_pool(
        &self,
        organization_id: OrganizationId,
        id: DevicePoolId,
    ) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            DEVICE_POOLS.row(&write.txn, organization_id.0, id.0).await?;
            let devices = device::Entity::find().filter(device::Column::PoolId.eq(id.0)).count(&write.txn).await?;
            if devices > 0 {
                return Err(StoreError::Conflict {
                    field: None,
                    message: format!("the pool still has {devices} device(s); delete them first"),
                });
            }
            let edges = edge::Entity::find().filter(edge::Column::PoolId.eq(id.0)).count(&write.txn).await?;
            if edges > 0 {
                return Err(StoreError::Conflict {
                    field: None,
                    message: format!("the pool still has {edges} edge(s); delete them first"),
                });
            }
            let placements =
                placement::Entity::find().filter(placement::Column::PoolId.eq(id.0)).count(&write.txn).await?;
            if placements > 0 {
                return Err(StoreError::Conflict {
                    field: None,
                    message: format!("{placements} placement(s) use this pool; change or delete them first"),
                });
            }
            device_pool::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}
