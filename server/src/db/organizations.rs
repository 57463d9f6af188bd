//! Organizations: the tenancy boundary. Deleting one deletes everything it owns, children
//! first, in one transaction.

use std::collections::BTreeSet;

use edgible::model::{
    Name, Organization, OrganizationCreated, OrganizationId, OrganizationSpec, Page, Revision, Scope,
};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, Set,
};

use super::entities::{
    api_key, application, application_hostname, application_status, device, device_pool, edge, event, member,
    organization, placement,
};
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, Write, api_keys, check_revision, parse, revision};
use crate::secrets::NewSecret;

/// How organizations are read: a key only ever sees its own, so each is scoped by its own id.
const ORGANIZATIONS: Scoped<organization::Entity> = Scoped {
    organization: organization::Column::Id,
    id: organization::Column::Id,
    name: Some(organization::Column::Name),
    row_id: |row| row.id,
};

/// The name of the key made with a new organization.
const ADMIN_KEY_NAME: &str = "admin";
/// The name of the key made by bootstrapping.
const BOOTSTRAP_KEY_NAME: &str = "bootstrap";

pub(super) fn to_model(row: organization::Model) -> Result<Organization, StoreError> {
    Ok(Organization {
        id: OrganizationId(row.id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        spec: OrganizationSpec { name: parse("organization name", &row.name)?, operator: row.operator },
    })
}

impl Db {
    pub async fn organization(&self, id: OrganizationId) -> Result<Organization, StoreError> {
        let row = organization::Entity::find_by_id(id.0).one(&self.conn).await?.ok_or(StoreError::NotFound)?;
        to_model(row)
    }

    /// The listing of organizations a key sees: only its own.
    pub async fn list_organizations(
        &self,
        own: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Organization>, StoreError> {
        ORGANIZATIONS.page(&self.conn, own.0, request, to_model).await
    }

    /// Creates an organization with a first key of scope `admin`.
    pub async fn create_organization(
        &self,
        spec: &OrganizationSpec,
        admin_key: &NewSecret,
    ) -> Result<OrganizationCreated, StoreError> {
        let write = self.begin_write().await?;
        let result = create(&write, spec, ADMIN_KEY_NAME, Scope::Admin, admin_key).await;
        write.finish(result).await
    }

    /// On a database without organizations, creates organization `name` with a key of scope
    /// `platform`; answers `None` once any organization exists.
    pub async fn bootstrap(&self, name: &Name, key: &NewSecret) -> Result<Option<OrganizationCreated>, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            if organization::Entity::find().count(&write.txn).await? > 0 {
                return Ok(None);
            }
            let spec = OrganizationSpec { name: name.clone(), operator: false };
            create(&write, &spec, BOOTSTRAP_KEY_NAME, Scope::Platform, key).await.map(Some)
        }
        .await;
        write.finish(result).await
    }

    /// Whether no organization exists yet.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(organization::Entity::find().count(&self.conn).await? == 0)
    }

    pub async fn update_organization(
        &self,
        id: OrganizationId,
        expected: Option<Revision>,
        spec: &OrganizationSpec,
    ) -> Result<Organization, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = organization::Entity::find_by_id(id.0).one(&write.txn).await?.ok_or(StoreError::NotFound)?;
            check_revision(expected, row.revision)?;
            if row.name == spec.name.as_str() && row.operator == spec.operator {
                return to_model(row);
            }
            if row.name != spec.name.as_str() {
                check_name_free(&write.txn, spec.name.as_str()).await?;
            }
            if row.operator && !spec.operator {
                check_no_guests(&write.txn, id).await?;
            }
            let mut active: organization::ActiveModel = row.into();
            active.name = Set(spec.name.to_string());
            active.operator = Set(spec.operator);
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    /// Deletes an organization and everything it owns.
    pub async fn delete_organization(&self, id: OrganizationId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            organization::Entity::find_by_id(id.0).one(&write.txn).await?.ok_or(StoreError::NotFound)?;
            check_no_guests(&write.txn, id).await?;
            let txn = &write.txn;
            // Children before parents, so that no foreign key is ever left dangling.
            let devices: Vec<uuid::Uuid> = device::Entity::find()
                .select_only()
                .column(device::Column::Id)
                .filter(device::Column::OrganizationId.eq(id.0))
                .into_tuple()
                .all(txn)
                .await?;
            // Connected agents of the organization learn after commit that their device is gone.
            write.touch(&devices.into_iter().map(edgible::model::DeviceId).collect::<Vec<_>>());
            event::Entity::delete_many().filter(event::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            application_status::Entity::delete_many()
                .filter(application_status::Column::OrganizationId.eq(id.0))
                .exec(txn)
                .await?;
            // Operators' cloud hosts running its applications stop running them.
            let hosts: Vec<Option<uuid::Uuid>> = placement::Entity::find()
                .select_only()
                .column(placement::Column::DeviceId)
                .filter(placement::Column::OrganizationId.eq(id.0))
                .into_tuple()
                .all(txn)
                .await?;
            let hosts: Vec<edgible::model::DeviceId> =
                hosts.into_iter().flatten().map(edgible::model::DeviceId).collect();
            placement::Entity::delete_many().filter(placement::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            write.change_desired(&hosts).await?;
            // Devices running its applications for a migration stop too.
            write.change_desired(&super::migrations::delete_of_organization(txn, id).await?).await?;
            application_hostname::Entity::delete_many()
                .filter(application_hostname::Column::OrganizationId.eq(id.0))
                .exec(txn)
                .await?;
            super::access::delete_organization_secrets(txn, id).await?;
            application::Entity::delete_many().filter(application::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            device::Entity::delete_many().filter(device::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            let edges: Vec<uuid::Uuid> = edge::Entity::find()
                .select_only()
                .column(edge::Column::Id)
                .filter(edge::Column::OrganizationId.eq(id.0))
                .into_tuple()
                .all(txn)
                .await?;
            // Connected edges of the organization learn after commit that they are gone.
            write.touch_edges(&edges.into_iter().map(edgible::model::EdgeId).collect::<Vec<_>>());
            edge::Entity::delete_many().filter(edge::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            device_pool::Entity::delete_many().filter(device_pool::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            super::entities::domain::Entity::delete_many()
                .filter(super::entities::domain::Column::OrganizationId.eq(id.0))
                .exec(txn)
                .await?;
            api_key::Entity::delete_many().filter(api_key::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            member::Entity::delete_many().filter(member::Column::OrganizationId.eq(id.0)).exec(txn).await?;
            organization::Entity::delete_by_id(id.0).exec(txn).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}

/// Refuses to end an operator organization's role (or delete it) while other organizations'
/// applications are placed on its cloud hosts: they would be left on hosts nobody may run.
async fn check_no_guests(conn: &impl ConnectionTrait, id: OrganizationId) -> Result<(), StoreError> {
    let devices: Vec<uuid::Uuid> = device::Entity::find()
        .select_only()
        .column(device::Column::Id)
        .filter(device::Column::OrganizationId.eq(id.0))
        .into_tuple()
        .all(conn)
        .await?;
    let guests = placement::Entity::find()
        .filter(placement::Column::DeviceId.is_in(devices))
        .filter(placement::Column::OrganizationId.ne(id.0))
        .count(conn)
        .await?;
    if guests > 0 {
        return Err(StoreError::conflict(
            "operator",
            format!("{guests} application(s) of other organizations are placed on this organization's cloud hosts"),
        ));
    }
    Ok(())
}

async fn check_name_free(conn: &impl ConnectionTrait, name: &str) -> Result<(), StoreError> {
    if organization::Entity::find().filter(organization::Column::Name.eq(name)).count(conn).await? > 0 {
        return Err(StoreError::conflict("name", format!("an organization named {name} already exists")));
    }
    Ok(())
}

async fn create(
    write: &Write,
    spec: &OrganizationSpec,
    key_name: &str,
    scope: Scope,
    key: &NewSecret,
) -> Result<OrganizationCreated, StoreError> {
    check_name_free(&write.txn, spec.name.as_str()).await?;
    let id = OrganizationId::new();
    let row = organization::ActiveModel {
        id: Set(id.0),
        name: Set(spec.name.to_string()),
        operator: Set(spec.operator),
        revision: Set(write.revision_column()),
        created_at: Set(write.now),
        updated_at: Set(write.now),
    }
    .insert(&write.txn)
    .await?;
    let key_spec = edgible::model::ApiKeySpec {
        name: parse("key name", key_name)?,
        scopes: BTreeSet::from([scope]),
        expires_at: None,
    };
    let admin_key = api_keys::insert(write, id, &key_spec, key).await?;
    Ok(OrganizationCreated { organization: to_model(row)?, admin_key })
}
