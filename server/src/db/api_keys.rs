//! API keys. The secret is stored only as its SHA-256; a presented secret is looked up by
//! that hash.

use std::collections::BTreeSet;

use edgible::model::{ApiKey, ApiKeyCreated, ApiKeyId, ApiKeySpec, OrganizationId, Page, Revision, Scope};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use super::entities::api_key;
use super::scoped::Scoped;
use super::{Db, PageRequest, StoreError, Write, check_revision, parse, parse_json, revision, to_json};
use crate::secrets::NewSecret;

/// How API keys are read within an organization.
const API_KEYS: Scoped<api_key::Entity> = Scoped {
    organization: api_key::Column::OrganizationId,
    id: api_key::Column::Id,
    name: Some(api_key::Column::Name),
    row_id: |row| row.id,
};

fn to_model(row: api_key::Model) -> Result<ApiKey, StoreError> {
    let scopes: BTreeSet<Scope> = parse_json("key scopes", &row.scopes)?;
    Ok(ApiKey {
        id: ApiKeyId(row.id),
        organization_id: OrganizationId(row.organization_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        prefix: row.prefix,
        spec: ApiKeySpec { name: parse("key name", &row.name)?, scopes, expires_at: row.expires_at },
    })
}

/// Inserts a key inside an open write (also used when creating organizations).
pub(super) async fn insert(
    write: &Write,
    organization_id: OrganizationId,
    spec: &ApiKeySpec,
    secret: &NewSecret,
) -> Result<ApiKeyCreated, StoreError> {
    if API_KEYS.name_taken(&write.txn, organization_id.0, spec.name.as_str(), None).await? {
        return Err(StoreError::conflict("name", format!("an API key named {} already exists", spec.name)));
    }
    let row = api_key::ActiveModel {
        id: Set(ApiKeyId::new().0),
        organization_id: Set(organization_id.0),
        name: Set(spec.name.to_string()),
        prefix: Set(secret.prefix.clone()),
        secret_sha256: Set(secret.sha256.clone()),
        scopes: Set(to_json(&spec.scopes)?),
        expires_at: Set(spec.expires_at),
        revision: Set(write.revision_column()),
        created_at: Set(write.now),
        updated_at: Set(write.now),
    }
    .insert(&write.txn)
    .await?;
    if spec.scopes.contains(&Scope::Access) {
        // Devices accept the organization's `access` keys: they must hear of this one.
        super::access::touch_organization_devices(write, organization_id).await?;
    }
    Ok(ApiKeyCreated { api_key: to_model(row)?, secret: secret.secret.clone() })
}

impl Db {
    /// The key whose secret hashes to `sha256`, expired or not.
    pub async fn api_key_by_secret_hash(&self, sha256: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = api_key::Entity::find().filter(api_key::Column::SecretSha256.eq(sha256)).one(&self.conn).await?;
        row.map(to_model).transpose()
    }

    pub async fn api_key(&self, organization_id: OrganizationId, id: ApiKeyId) -> Result<ApiKey, StoreError> {
        let row = API_KEYS.row(&self.conn, organization_id.0, id.0).await?;
        to_model(row)
    }

    pub async fn list_api_keys(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        API_KEYS.page(&self.conn, organization_id.0, request, to_model).await
    }

    pub async fn create_api_key(
        &self,
        organization_id: OrganizationId,
        spec: &ApiKeySpec,
        secret: &NewSecret,
    ) -> Result<ApiKeyCreated, StoreError> {
        let write = self.begin_write().await?;
        let result = insert(&write, organization_id, spec, secret).await;
        write.finish(result).await
    }

    pub async fn update_api_key(
        &self,
        organization_id: OrganizationId,
        id: ApiKeyId,
        expected: Option<Revision>,
        spec: &ApiKeySpec,
    ) -> Result<ApiKey, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = API_KEYS.row(&write.txn, organization_id.0, id.0).await?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec == *spec {
                return Ok(current);
            }
            if API_KEYS.name_taken(&write.txn, organization_id.0, spec.name.as_str(), Some(id.0)).await? {
                return Err(StoreError::conflict("name", format!("an API key named {} already exists", spec.name)));
            }
            if current.spec.scopes.contains(&Scope::Access) || spec.scopes.contains(&Scope::Access) {
                super::access::touch_organization_devices(&write, organization_id).await?;
            }
            let mut active: api_key::ActiveModel = row.into();
            active.name = Set(spec.name.to_string());
            active.scopes = Set(to_json(&spec.scopes)?);
            active.expires_at = Set(spec.expires_at);
            active.revision = Set(write.revision_column());
            active.updated_at = Set(write.now);
            to_model(active.update(&write.txn).await?)
        }
        .await;
        write.finish(result).await
    }

    pub async fn delete_api_key(&self, organization_id: OrganizationId, id: ApiKeyId) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = API_KEYS.row(&write.txn, organization_id.0, id.0).await?;
            if to_model(row)?.spec.scopes.contains(&Scope::Access) {
                super::access::touch_organization_devices(&write, organization_id).await?;
            }
            api_key::Entity::delete_by_id(id.0).exec(&write.txn).await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}
