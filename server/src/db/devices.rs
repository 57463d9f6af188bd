//! Devices and their tunnel addresses. Each device gets the lowest free address of its
//! pool's network when it is created; deleting the device frees it. Allocation happens inside
//! the serialized write transaction, so two devices can never be handed the same address, and
//! the unique index on (pool, address) would refuse it anyway.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use edgible::model::{
    Device, DeviceCreated, DeviceId, DevicePoolId, DeviceSpec, DeviceStatus, HostCapacity, LabelKey, OrganizationId,
    Page, Revision, TunnelCidr,
};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, Set,
};

use super::entities::{device, device_pool, edge, placement};
use super::scoped::Scoped;
use super::{
    Db, PageRequest, StoreError, check_revision, enum_from_text, enum_text, parse, parse_json, revision, to_json,
};
use crate::secrets::NewSecret;

/// How devices are read within an organization.
const DEVICES: Scoped<device::Entity> = Scoped {
    organization: device::Column::OrganizationId,
    id: device::Column::Id,
    name: Some(device::Column::Name),
    row_id: |row| row.id,
};

pub(super) fn to_model(row: device::Model) -> Result<Device, StoreError> {
    let labels: BTreeMap<LabelKey, String> = parse_json("device labels", &row.labels)?;
    let cloud_host = cloud_host(&row)?;
    let address = u32::try_from(row.tunnel_address)
        .map_err(|_| StoreError::Corrupt(format!("tunnel address {} is not an IPv4 address", row.tunnel_address)))?;
    Ok(Device {
        id: DeviceId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        spec: DeviceSpec { name: parse("device name", &row.name)?, pool_id: DevicePoolId(row.pool_id), labels },
        status: DeviceStatus {
            tunnel_address: Ipv4Addr::from(address),
            public_key: row.public_key,
            state: enum_from_text("device state", &row.state)?,
            applied_revision: row.applied_revision.map(revision).transpose()?,
            last_seen_at: row.last_seen_at,
            cloud_host,
        },
    })
}

/// The capacity stored for a cloud host: all three columns or none.
pub(super) fn cloud_host(row: &device::Model) -> Result<Option<HostCapacity>, StoreError> {
    let number = |what: &str, value: i64| {
        u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("device {} has {what} {value}", row.id)))
    };
    match (row.cloud_vcpus, row.cloud_memory_mib, row.cloud_disk_mib) {
        (Some(vcpus), Some(memory_mib), Some(disk_mib)) => Ok(Some(HostCapacity {
            vcpus: u32::try_from(number("cloud vcpus", vcpus)?)
                .map_err(|_| StoreError::Corrupt(format!("device {} has cloud vcpus {vcpus}", row.id)))?,
            memory_mib: number("cloud memory", memory_mib)?,
            disk_mib: number("cloud disk", disk_mib)?,
        })),
        _ => Ok(None),
    }
}

/// The lowest address of `cidr` that is not in `used`, which must be sorted ascending.
fn lowest_free(cidr: TunnelCidr, used: &[i64]) -> Option<Ipv4Addr> {
    let mut used = used.iter().copied().peekable();
    for candidate in cidr.assignable() {
        let value = i64::from(u32::from(candidate));
        while used.next_if(|taken| *taken < value).is_some() {}
        if used.peek() != Some(&value) {
            return Some(candidate);
        }
    }
    None
}

/// The lowest address of the pool's network that neither a device nor an edge of the pool
/// holds. Devices and edges share one address space: an edge reaches devices at their
/// addresses and devices accept connections only from edges' addresses, so the two must
/// never meet. Runs inside the serialized write transaction.
pub(super) async fn allocate(
    conn: &impl ConnectionTrait,
    pool_id: DevicePoolId,
    cidr: TunnelCidr,
) -> Result<Ipv4Addr, StoreError> {
    let mut used: Vec<i64> = device::Entity::find()
        .select_only()
        .column(device::Column::TunnelAddress)
        .filter(device::Column::PoolId.eq(pool_id.0))
        .into_tuple()
        .all(conn)
        .await?;
    let edges: Vec<i64> = edge::Entity::find()
        .select_only()
        .column(edge::Column::TunnelAddress)
        .filter(edge::Column::PoolId.eq(pool_id.0))
        .into_tuple()
        .all(conn)
        .await?;
    used.extend(edges);
    used.sort_unstable();
    lowest_free(cidr, &used).ok_or_else(|| {
        StoreError::conflict(
            "pool_id",
            format!("the pool's network {cidr} has no free address left ({} in use)", used.len()),
        )
    })
}

impl Db {
    pub async fn device(&self, organization_id: OrganizationId, id: DeviceId) -> Result<Device, StoreError> {
        let row = DEVICES.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    pub async fn list_devices(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Device>, StoreError> {
        DEVICES.page(&self.conn, organization_id.0, request, to_model).await
    }

    /// Creates a device with the lowest free address of its pool and a one-time enrollment
    /// token (stored hashed) valid until `enrollment_expires_at`.
    pub async fn create_device(
        &self,
        organization_id: OrganizationId,
        spec: &DeviceSpec,
        enrollment: &NewSecret,
        enrollment_expires_at: DateTime<Utc>,
    ) -> Result<DeviceCreated, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let pool = device_pool::Entity::find_by_id(spec.pool_id.0)
                .filter(device_pool::Column::OrganizationId.eq(organization_id.0))
                .one(&write.txn)
                .await?
                .ok_or_else(|| StoreError::invalid("pool_id", format!("no device pool {}", spec.pool_id)))?;
            if DEVICES.name_taken(&write.txn, organization_id.0, spec.name.as_str(), None).await? {
                return Err(StoreError::conflict("name", format!("a device named {} already exists", spec.name)));
            }
            let cidr: TunnelCidr = parse("pool tunnel network", &pool.tunnel_cidr)?;
            let address = allocate(&write.txn, spec.pool_id, cidr).await?;
            let row = device::ActiveModel {
                id: Set(DeviceId::new().0),
                organization_id: Set(organization_id.0),
                name: Set(spec.name.to_string()),
                pool_id: Set(spec.pool_id.0),
                labels: Set(to_json(&spec.labels)?),
                tunnel_address: Set(i64::from(u32::from(address))),
                public_key: Set(None),
                state: Set(enum_text(&edgible::model::DeviceState::Pending)?),
                applied_revision: Set(None),
                last_seen_at: Set(None),
                enrollment_token_sha256: Set(Some(enrollment.sha256.clone())),
                enrollment_expires_at: Set(Some(enrollment_expires_at)),
                enrollment_used_at: Set(None),
                credential_sha256: Set(None),
                desired_revision: Set(write.revision_column()),
                session_id: Set(None),
                cloud_vcpus: Set(None),
                cloud_memory_mib: Set(None),
                cloud_disk_mib: Set(None),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
            }
            .insert(&write.txn)
            .await?;
            Ok(DeviceCreated {
                device: to_model(row)?,
                enrollment_token: enrollment.secret.clone(),
                enrollment_expires_at,
            })
        }
        .await;
        write.finish(result).await
    }

    pub async fn update_device(
        &self,
        organization_id: OrganizationId,
        id: DeviceId,
        expected: Option<Revision>,
        spec: &DeviceSpec,
    ) -> Result<Device, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = DEVICES.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec.pool_id != spec.pool_id {
                return Err(StoreError::invalid(
                    "pool_id",
                    format!("cannot be changed (it is {}); create a new device instead", current.spec.pool_id),
                ));
            }
            if current.spec == *spec {
                return Ok(current);
            }
            if DEVICES.name_taken(&write.txn, organization_id.0, spec.name.as_str(), Some(id.0)).await? {
                return Err(StoreError::conflict("name", format!("a device named {} already exists", spec.name)));
            }
            let mut active: device::ActiveModel = row.into();
            active.name = Set(spec.name.to_string());
            active.labels = Set(to_json(&spec.labels)?);
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    /// Deletes a device, freeing its address; refused while a placement puts an application
    /// on it.
    pub async fn delete_device(&self, organization_id: OrganizationId, id: DeviceId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = DEVICES.row(&write.txn, organization_id.0, id.0).await?;
            let placements =
                placement::Entity::find().filter(placement::Column::DeviceId.eq(id.0)).count(&write.txn).await?;
            if placements > 0 {
                return Err(StoreError::Conflict {
                    field: None,
                    message: format!(
                        "{placements} application(s) are placed on this device; move or delete them first"
                    ),
                });
            }
            device::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            // Its agent, if connected, learns after commit that the device is gone, and the
            // pool's edges drop it from their peers.
            write.touch(&[id]);
            write.touch_pool_edges(DevicePoolId(row.pool_id)).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> TunnelCidr {
        text.parse().expect("valid test network")
    }

    fn address(text: &str) -> i64 {
        i64::from(u32::from(text.parse::<Ipv4Addr>().expect("valid test address")))
    }

    #[test]
    fn the_lowest_free_address_fills_holes_first() {
        let net = cidr("10.0.0.0/29");
        assert_eq!(lowest_free(net, &[]), Some(Ipv4Addr::new(10, 0, 0, 1)));
        let used = [address("10.0.0.1"), address("10.0.0.2"), address("10.0.0.4")];
        assert_eq!(lowest_free(net, &used), Some(Ipv4Addr::new(10, 0, 0, 3)));
    }

    #[test]
    fn a_full_network_has_no_free_address() {
        let net = cidr("10.0.0.0/30");
        assert_eq!(lowest_free(net, &[address("10.0.0.1"), address("10.0.0.2")]), None);
    }
}
