//! API keys. The secret is stored only as its SHA-256; a presented secret is looked up by
//! that hash.

use std::collections::BTreeSet;

use edgible::model::{ApiKey, ApiKeyCreated, ApiKeyId, ApiKeySpec, OrganizationId, Page, Revision, Scope};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};

use super::entities::api_key;
use super::{
    Db, PageRequest, StoreError, Write, check_revision, name_taken, page, parse, parse_json, revision, to_json,
};
use crate::secrets::NewSecret;

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
    if name_taken::<api_key::Entity, _>(
        &write.txn,
        api_key::Column::OrganizationId,
        api_key::Column::Name,
        api_key::Column::Id,
        organization_id.0,
        spec.name.as_str(),
        None,
    )
    .await?
    {
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
    Ok(ApiKeyCreated { api_key: to_model(row)?, secret: secret.secret.clone() })
}

impl Db {
    /// The key whose secret hashes to `sha256`, expired or not.
    pub async fn api_key_by_secret_hash(&self, sha256: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = api_key::Entity::find().filter(api_key::Column::SecretSha256.eq(sha256)).one(&self.conn).await?;
        row.map(to_model).transpose()
    }

    pub async fn api_key(&self, organization_id: OrganizationId, id: ApiKeyId) -> Result<ApiKey, StoreError> {
        let row = api_key::Entity::find_by_id(id.0)
            .filter(api_key::Column::OrganizationId.eq(organization_id.0))
            .one(&self.conn)
            .await?
            .ok_or(StoreError::NotFound)?;
        to_model(row)
    }

    pub async fn list_api_keys(
        &self,
        organization_id: OrganizationId,
        request: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let mut query = api_key::Entity::find().filter(api_key::Column::OrganizationId.eq(organization_id.0));
        if let Some(name) = &request.name {
            query = query.filter(api_key::Column::Name.eq(name.as_str()));
        }
        if let Some(after) = request.after {
            query = query.filter(api_key::Column::Id.gt(after));
        }
        let rows = query.order_by_asc(api_key::Column::Id).limit(request.limit + 1).all(&self.conn).await?;
        page(rows, request.limit, |row| row.id, to_model)
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
            let row = api_key::Entity::find_by_id(id.0)
                .filter(api_key::Column::OrganizationId.eq(organization_id.0))
                .one(&write.txn)
                .await?
                .ok_or(StoreError::NotFound)?;
            check_revision(expected, row.revision)?;
            let current = to_model(row.clone())?;
            if current.spec == *spec {
                return Ok(current);
            }
            if name_taken::<api_key::Entity, _>(
                &write.txn,
                api_key::Column::OrganizationId,
                api_key::Column::Name,
                api_key::Column::Id,
                organization_id.0,
                spec.name.as_str(),
                Some(id.0),
            )
            .await?
            {
                return Err(StoreError::conflict("name", format!("an API key named {} already exists", spec.name)));
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
            let deleted = api_key::Entity::delete_many()
                .filter(api_key::Column::Id.eq(id.0))
                .filter(api_key::Column::OrganizationId.eq(organization_id.0))
                .exec(&write.txn)
                .await?;
            if deleted.rows_affected == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        }
        .await;
        write.finish(result).await
    }
}
