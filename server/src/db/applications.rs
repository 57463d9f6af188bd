//! Applications and their hostnames. The spec is kept as JSON; each hostname also gets a row
//! in `application_hostnames`, whose primary key makes it unique across the whole server and
//! whose `parent` column finds wildcard overlaps between organizations.

use edgible::model::{Application, ApplicationId, ApplicationSpec, Hostname, OrganizationId, Page, Revision};
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};
use uuid::Uuid;

use super::entities::{application, application_hostname, application_status, event, placement};
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, Write, check_revision, parse_json, revision, to_json};
use crate::domains::HostnamePolicy;

/// How applications are read within an organization.
const APPLICATIONS: Scoped<application::Entity> = Scoped {
    organization: application::Column::OrganizationId,
    id: application::Column::Id,
    name: Some(application::Column::Name),
    row_id: |row| row.id,
};

pub(super) fn to_model(row: application::Model) -> Result<Application, StoreError> {
    Ok(Application {
        id: ApplicationId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        spec: parse_json("application spec", &row.spec)?,
    })
}

/// Refuses hostnames another application holds, names under another organization's
/// wildcard, and wildcards over another organization's names.
async fn check_hostnames(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    application_id: ApplicationId,
    hostnames: &[Hostname],
) -> Result<(), StoreError> {
    for (index, hostname) in hostnames.iter().enumerate() {
        let field = format!("hostnames[{index}]");
        let taken = application_hostname::Entity::find_by_id(hostname.to_string())
            .filter(application_hostname::Column::ApplicationId.ne(application_id.0))
            .one(conn)
            .await?;
        if taken.is_some() {
            return Err(StoreError::conflict(field, format!("{hostname} is already used by another application")));
        }
        if hostname.is_wildcard() {
            let covered = application_hostname::Entity::find()
                .filter(application_hostname::Column::Parent.eq(hostname.parent()))
                .filter(application_hostname::Column::Wildcard.eq(false))
                .filter(application_hostname::Column::OrganizationId.ne(organization_id.0))
                .one(conn)
                .await?;
            if covered.is_some() {
                return Err(StoreError::conflict(
                    field,
                    format!("{hostname} would cover names of another organization"),
                ));
            }
        } else if let Some(wildcard) = hostname.covering_wildcard() {
            let covering = application_hostname::Entity::find_by_id(wildcard.to_string())
                .filter(application_hostname::Column::OrganizationId.ne(organization_id.0))
                .one(conn)
                .await?;
            if covering.is_some() {
                return Err(StoreError::conflict(
                    field,
                    format!("{hostname} is covered by another organization's {wildcard}"),
                ));
            }
        }
    }
    Ok(())
}

/// Replaces the hostname rows of an application.
async fn store_hostnames(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    application_id: ApplicationId,
    hostnames: &[Hostname],
) -> Result<(), StoreError> {
    application_hostname::Entity::delete_many()
        .filter(application_hostname::Column::ApplicationId.eq(application_id.0))
        .exec(conn)
        .await?;
    for hostname in hostnames {
        application_hostname::ActiveModel {
            hostname: Set(hostname.to_string()),
            parent: Set(hostname.parent().to_owned()),
            wildcard: Set(hostname.is_wildcard()),
            application_id: Set(application_id.0),
            organization_id: Set(organization_id.0),
        }
        .insert(conn)
        .await?;
    }
    Ok(())
}

async fn check_name(
    write: &Write,
    organization_id: OrganizationId,
    spec: &ApplicationSpec,
    except: Option<Uuid>,
) -> Result<(), StoreError> {
    if APPLICATIONS.name_taken(&write.txn, organization_id.0, spec.name.as_str(), except).await? {
        return Err(StoreError::conflict("name", format!("an application named {} already exists", spec.name)));
    }
    Ok(())
}

impl Db {
    pub async fn application(
        &self,
        organization_id: OrganizationId,
        id: ApplicationId,
    ) -> Result<Application, StoreError> {
        let row = APPLICATIONS.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    pub async fn list_applications(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<Application>, StoreError> {
        APPLICATIONS.page(&self.conn, organization_id.0, request, to_model).await
    }

    /// Creates an application without checking hostname ownership (uniqueness only).
    pub async fn create_application(
        &self,
        organization_id: OrganizationId,
        spec: &ApplicationSpec,
    ) -> Result<Application, StoreError> {
        self.create_owned_application(organization_id, spec, &HostnamePolicy::default()).await
    }

    /// Creates an application whose hostnames the organization may use under `policy`
    /// (see `crate::domains`).
    pub async fn create_owned_application(
        &self,
        organization_id: OrganizationId,
        spec: &ApplicationSpec,
        policy: &HostnamePolicy,
    ) -> Result<Application, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let id = ApplicationId::new();
            check_name(&write, organization_id, spec, None).await?;
            super::domains::check_ownership(&write.txn, organization_id, id, &spec.hostnames, policy).await?;
            check_hostnames(&write.txn, organization_id, id, &spec.hostnames).await?;
            let row = application::ActiveModel {
                id: Set(id.0),
                organization_id: Set(organization_id.0),
                name: Set(spec.name.to_string()),
                spec: Set(to_json(&spec)?),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
            }
            .insert(&write.txn)
            .await?;
            store_hostnames(&write.txn, organization_id, id, &spec.hostnames).await?;
            super::access::sync_short_code(&write.txn, organization_id, id, spec.access.short_code.as_ref()).await?;
            to_model(row)
        }
        .await;
        write.finish(result).await
    }

    /// Updates an application without checking hostname ownership (uniqueness only).
    pub async fn update_application(
        &self,
        organization_id: OrganizationId,
        id: ApplicationId,
        expected: Option<Revision>,
        spec: &ApplicationSpec,
    ) -> Result<Application, StoreError> {
        self.update_owned_application(organization_id, id, expected, spec, &HostnamePolicy::default()).await
    }

    /// Updates an application; hostnames it adds must be the organization's to use under
    /// `policy` (see `crate::domains`).
    pub async fn update_owned_application(
        &self,
        organization_id: OrganizationId,
        id: ApplicationId,
        expected: Option<Revision>,
        spec: &ApplicationSpec,
        policy: &HostnamePolicy,
    ) -> Result<Application, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = APPLICATIONS.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec == *spec {
                return Ok(current);
            }
            check_name(&write, organization_id, spec, Some(id.0)).await?;
            super::domains::check_ownership(&write.txn, organization_id, id, &spec.hostnames, policy).await?;
            check_hostnames(&write.txn, organization_id, id, &spec.hostnames).await?;
            super::cloud::check_host_still_fits(&write.txn, id, &current.spec, spec).await?;
            let mut active: application::ActiveModel = row.into();
            active.name = Set(spec.name.to_string());
            active.spec = Set(to_json(spec)?);
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            let updated = active.update(&write.txn).await?;
            if current.spec.hostnames != spec.hostnames {
                store_hostnames(&write.txn, organization_id, id, &spec.hostnames).await?;
            }
            super::access::sync_short_code(&write.txn, organization_id, id, spec.access.short_code.as_ref()).await?;
            if let Some(device) = super::placements::placed_device(&write.txn, id).await? {
                write.change_desired(&[device]).await?;
            }
            write.change_desired(&super::migrations::extra_devices(&write.txn, id).await?).await?;
            to_model(updated)
        }
        .await;
        write.finish(result).await
    }

    /// Deletes an application together with its placement, hostnames, status and events.
    pub async fn delete_application(
        &self,
        organization_id: OrganizationId,
        id: ApplicationId,
    ) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            APPLICATIONS.row(&write.txn, organization_id.0, id.0).await?;
            super::migrations::delete_of_application(&write, id).await?;
            if let Some(device) = super::placements::placed_device(&write.txn, id).await? {
                write.change_desired(&[device]).await?;
            }
            placement::Entity::delete_many().filter(placement::Column::ApplicationId.eq(id.0)).exec(&write.txn).await?;
            application_status::Entity::delete_many()
                .filter(application_status::Column::ApplicationId.eq(id.0))
                .exec(&write.txn)
                .await?;
            event::Entity::delete_many().filter(event::Column::ApplicationId.eq(id.0)).exec(&write.txn).await?;
            super::access::delete_application_secrets(&write.txn, id).await?;
            application_hostname::Entity::delete_many()
                .filter(application_hostname::Column::ApplicationId.eq(id.0))
                .exec(&write.txn)
                .await?;
            application::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}
