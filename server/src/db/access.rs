//! What access policies (issue 7) keep in the database: users' password hashes, the sessions
//! of the login pages, the keys login assertions are signed with, application keys, short
//! codes, and the one read a device's `access` message is computed from.
//!
//! Secrets are stored as digests wherever the server only has to recognize them (application
//! keys, login session cookies); short codes are kept in clear because `GET .../short-code`
//! shows them, and assertion keys as the caller hands them (sealed by `crate::access` when a
//! server key is configured). Writes that change what a device is pushed record the device in
//! the write's [`Woken`](super::Woken) set, so its session re-reads after commit.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use edgible::access::short_code_digest;
use edgible::model::{
    Application, ApplicationId, ApplicationKey, ApplicationKeyCreated, ApplicationKeyId, ApplicationKeySpec, DeviceId,
    Hostname, Member, MemberId, OrganizationId, Page, Scope, ShortCode, ShortCodeAccess, UserId,
};
use edgible::protocol::v1::{AccessKeyDigest, ApplicationAccess, ShortCodeDigest};
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};

use super::entities::{
    api_key, application, application_hostname, application_key, assertion_key, device, login_session, member,
    placement, short_code, user,
};
use super::{Db, PageRequest, StoreError, Write, page, parse, parse_json, revision};
use crate::secrets::NewSecret;

/// A user as the login pages need them.
#[derive(Clone)]
pub struct LoginUser {
    pub id: UserId,
    pub email: String,
    /// The argon2id PHC string, if a password was set.
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for LoginUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginUser").field("id", &self.id).field("email", &self.email).finish_non_exhaustive()
    }
}

/// A stored assertion signing key.
#[derive(Clone)]
pub struct StoredAssertionKey {
    pub kid: String,
    /// The PKCS#8 document: sealed text when `sealed`, base64 otherwise.
    pub pkcs8: String,
    pub sealed: bool,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for StoredAssertionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredAssertionKey")
            .field("kid", &self.kid)
            .field("sealed", &self.sealed)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

fn stored_key(row: assertion_key::Model) -> StoredAssertionKey {
    StoredAssertionKey {
        kid: row.kid,
        pkcs8: row.pkcs8,
        sealed: row.sealed,
        created_at: row.created_at,
        retired_at: row.retired_at,
    }
}

fn application_key_model(row: application_key::Model) -> Result<ApplicationKey, StoreError> {
    Ok(ApplicationKey {
        id: ApplicationKeyId(row.id),
        organization_id: OrganizationId(row.organization_id),
        application_id: ApplicationId(row.application_id),
        revision: revision(row.revision)?,
        created_at: row.created_at,
        updated_at: row.updated_at,
        prefix: row.prefix,
        spec: ApplicationKeySpec { name: parse("application key name", &row.name)?, expires_at: row.expires_at },
    })
}

fn short_code_model(row: short_code::Model) -> Result<ShortCode, StoreError> {
    Ok(ShortCode {
        application_id: ApplicationId(row.application_id),
        code: row.code,
        version: u64::try_from(row.version)
            .map_err(|_| StoreError::Corrupt(format!("short code version {}", row.version)))?,
        expires_at: row.expires_at,
        set_by_spec: !row.generated,
    })
}

/// Whether a stored API key's scopes (JSON) include `access`.
fn has_access_scope(scopes: &str) -> Result<bool, StoreError> {
    let scopes: Vec<Scope> = parse_json("key scopes", scopes)?;
    Ok(scopes.contains(&Scope::Access))
}

/// Records that every device of the organization, and every cloud host running one of its
/// applications, must re-read its access secrets after commit (an `access`-scope API key came
/// or went).
pub(super) async fn touch_organization_devices(
    write: &Write,
    organization_id: OrganizationId,
) -> Result<(), StoreError> {
    let mut devices: Vec<uuid::Uuid> = device::Entity::find()
        .select_only()
        .column(device::Column::Id)
        .filter(device::Column::OrganizationId.eq(organization_id.0))
        .into_tuple()
        .all(&write.txn)
        .await?;
    let hosts: Vec<Option<uuid::Uuid>> = placement::Entity::find()
        .select_only()
        .column(placement::Column::DeviceId)
        .filter(placement::Column::OrganizationId.eq(organization_id.0))
        .into_tuple()
        .all(&write.txn)
        .await?;
    devices.extend(hosts.into_iter().flatten());
    devices.sort_unstable();
    devices.dedup();
    write.touch(&devices.into_iter().map(DeviceId).collect::<Vec<_>>());
    Ok(())
}

/// Records that the device the application is placed on (if any) must re-read its access
/// secrets after commit.
async fn touch_placed_device(write: &Write, application_id: ApplicationId) -> Result<(), StoreError> {
    if let Some(device) = super::placements::placed_device(&write.txn, application_id).await? {
        write.touch(&[device]);
    }
    write.touch(&super::migrations::extra_devices(&write.txn, application_id).await?);
    Ok(())
}

/// Brings the application's short code in line with its `short_code` policy, inside the
/// application's own write: no policy, no row; a code named by the spec is taken as is; without
/// one, a generated code is kept or made. The version grows whenever the code changes.
pub(super) async fn sync_short_code(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    application_id: ApplicationId,
    policy: Option<&ShortCodeAccess>,
) -> Result<(), StoreError> {
    let stored = short_code::Entity::find_by_id(application_id.0).one(conn).await?;
    let Some(policy) = policy else {
        if stored.is_some() {
            short_code::Entity::delete_by_id(application_id.0).exec(conn).await?;
        }
        return Ok(());
    };
    let (code, generated) = match (&policy.code, &stored) {
        (Some(code), _) => (code.clone(), false),
        (None, Some(row)) if row.generated => (row.code.clone(), true),
        (None, _) => (crate::secrets::short_code(), true),
    };
    match stored {
        None => {
            short_code::ActiveModel {
                application_id: Set(application_id.0),
                organization_id: Set(organization_id.0),
                code: Set(code),
                version: Set(1),
                generated: Set(generated),
                expires_at: Set(policy.expires_at),
            }
            .insert(conn)
            .await?;
        }
        Some(row) => {
            if row.code == code && row.generated == generated && row.expires_at == policy.expires_at {
                return Ok(());
            }
            let version = if row.code == code { row.version } else { row.version + 1 };
            let mut active: short_code::ActiveModel = row.into();
            active.code = Set(code);
            active.version = Set(version);
            active.generated = Set(generated);
            active.expires_at = Set(policy.expires_at);
            active.update(conn).await?;
        }
    }
    Ok(())
}

/// Deletes what access policies keep about an application (inside its deletion).
pub(super) async fn delete_application_secrets(
    conn: &impl ConnectionTrait,
    application_id: ApplicationId,
) -> Result<(), StoreError> {
    application_key::Entity::delete_many()
        .filter(application_key::Column::ApplicationId.eq(application_id.0))
        .exec(conn)
        .await?;
    short_code::Entity::delete_by_id(application_id.0).exec(conn).await?;
    Ok(())
}

/// Deletes what access policies keep about an organization's applications (inside its
/// deletion, before the applications go).
pub(super) async fn delete_organization_secrets(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
) -> Result<(), StoreError> {
    application_key::Entity::delete_many()
        .filter(application_key::Column::OrganizationId.eq(organization_id.0))
        .exec(conn)
        .await?;
    short_code::Entity::delete_many()
        .filter(short_code::Column::OrganizationId.eq(organization_id.0))
        .exec(conn)
        .await?;
    Ok(())
}

/// Fails with `NotFound` unless the application exists in the organization.
async fn check_application(
    conn: &impl ConnectionTrait,
    organization_id: OrganizationId,
    application_id: ApplicationId,
) -> Result<application::Model, StoreError> {
    application::Entity::find_by_id(application_id.0)
        .filter(application::Column::OrganizationId.eq(organization_id.0))
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound)
}

impl Db {
    /// Gives every application with a `short_code` policy its short code row, for databases
    /// written before short codes had their own table (those kept the code in the spec, which
    /// is then taken as named by the spec). Idempotent; writes only when a row is missing.
    pub(super) async fn backfill_short_codes(&self) -> Result<(), StoreError> {
        let candidates = application::Entity::find()
            .filter(application::Column::Spec.contains("\"short_code\""))
            .all(&self.conn)
            .await?;
        let mut missing = Vec::new();
        for row in candidates {
            if short_code::Entity::find_by_id(row.id).one(&self.conn).await?.is_none() {
                let application = super::applications::to_model(row)?;
                if application.spec.access.short_code.is_some() {
                    missing.push(application);
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let write = self.begin_write().await?;
        let result: Result<(), StoreError> = async {
            for application in &missing {
                let policy = application.spec.access.short_code.as_ref();
                sync_short_code(&write.txn, application.organization_id, application.id, policy).await?;
            }
            Ok(())
        }
        .await;
        write.finish(result).await?;
        tracing::info!(applications = missing.len(), "gave short codes their own rows");
        Ok(())
    }

    /// Stores the password hash of the user behind a member of the organization, and ends
    /// the user's login sessions.
    pub async fn set_member_password(
        &self,
        organization_id: OrganizationId,
        member_id: MemberId,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let row = member::Entity::find_by_id(member_id.0)
                .filter(member::Column::OrganizationId.eq(organization_id.0))
                .one(&write.txn)
                .await?
                .ok_or(StoreError::NotFound)?;
            user::Entity::update_many()
                .col_expr(user::Column::PasswordHash, sea_orm::sea_query::Expr::value(Some(password_hash.to_owned())))
                .filter(user::Column::Id.eq(row.user_id))
                .exec(&write.txn)
                .await?;
            login_session::Entity::delete_many()
                .filter(login_session::Column::UserId.eq(row.user_id))
                .exec(&write.txn)
                .await?;
            Ok(())
        }
        .await;
        write.finish(result).await
    }

    /// The user with this e-mail address: as typed, or else in lower case (how addresses are
    /// usually stored), so that `Ada@Example.com` finds `ada@example.com`.
    pub async fn login_user_by_email(&self, email: &str) -> Result<Option<LoginUser>, StoreError> {
        let mut row = user::Entity::find().filter(user::Column::Email.eq(email)).one(&self.conn).await?;
        let lower = email.to_lowercase();
        if row.is_none() && lower != email {
            row = user::Entity::find().filter(user::Column::Email.eq(lower)).one(&self.conn).await?;
        }
        Ok(row.map(|row| LoginUser { id: UserId(row.id), email: row.email, password_hash: row.password_hash }))
    }

    /// Stores a login session of `user_id` (the hash of its cookie's secret) until `expires_at`.
    pub async fn create_login_session(
        &self,
        user_id: UserId,
        secret_sha256: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _guard = self.status_write_lock().await;
        let now = super::now();
        // Expired sessions go whenever a new one comes, so the table stays small.
        login_session::Entity::delete_many().filter(login_session::Column::ExpiresAt.lte(now)).exec(&self.conn).await?;
        login_session::ActiveModel {
            secret_sha256: Set(secret_sha256.to_owned()),
            user_id: Set(user_id.0),
            created_at: Set(now),
            expires_at: Set(expires_at),
        }
        .insert(&self.conn)
        .await?;
        Ok(())
    }

    /// The user of the unexpired login session whose cookie secret hashes to `secret_sha256`.
    pub async fn login_session_user(
        &self,
        secret_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<LoginUser>, StoreError> {
        let Some(session) = login_session::Entity::find_by_id(secret_sha256.to_owned())
            .filter(login_session::Column::ExpiresAt.gt(now))
            .one(&self.conn)
            .await?
        else {
            return Ok(None);
        };
        let row = user::Entity::find_by_id(session.user_id).one(&self.conn).await?;
        Ok(row.map(|row| LoginUser { id: UserId(row.id), email: row.email, password_hash: row.password_hash }))
    }

    /// Ends a login session; nothing if there is none.
    pub async fn delete_login_session(&self, secret_sha256: &str) -> Result<(), StoreError> {
        let _guard = self.status_write_lock().await;
        login_session::Entity::delete_by_id(secret_sha256.to_owned()).exec(&self.conn).await?;
        Ok(())
    }

    /// The application serving `hostname`: the one holding exactly that name, or else the one
    /// holding the wildcard that covers it.
    pub async fn application_by_hostname(&self, hostname: &Hostname) -> Result<Option<Application>, StoreError> {
        let mut held = application_hostname::Entity::find_by_id(hostname.to_string()).one(&self.conn).await?;
        if held.is_none()
            && let Some(wildcard) = hostname.covering_wildcard()
        {
            held = application_hostname::Entity::find_by_id(wildcard.to_string()).one(&self.conn).await?;
        }
        let Some(held) = held else {
            return Ok(None);
        };
        let row = application::Entity::find_by_id(held.application_id).one(&self.conn).await?;
        row.map(super::applications::to_model).transpose()
    }

    /// The user's membership in the organization, if any.
    pub async fn membership(
        &self,
        organization_id: OrganizationId,
        user_id: UserId,
    ) -> Result<Option<Member>, StoreError> {
        let row = member::Entity::find()
            .filter(member::Column::OrganizationId.eq(organization_id.0))
            .filter(member::Column::UserId.eq(user_id.0))
            .one(&self.conn)
            .await?;
        row.map(super::members::to_model).transpose()
    }

    /// Makes sure a current (unretired) assertion key exists, storing `make()`'s if there is
    /// none. Inside a write, so two servers starting at once store one key, not two.
    pub async fn ensure_assertion_key<E: From<StoreError>>(
        &self,
        make: impl FnOnce() -> Result<StoredAssertionKey, E>,
    ) -> Result<(), E> {
        let write = self.begin_write().await?;
        let result: Result<bool, E> = async {
            let current = assertion_key::Entity::find()
                .filter(assertion_key::Column::RetiredAt.is_null())
                .one(&write.txn)
                .await
                .map_err(StoreError::from)?;
            if current.is_some() {
                return Ok(false);
            }
            let key = make()?;
            insert_assertion_key(&write, key).await?;
            Ok(true)
        }
        .await;
        if write.finish(result).await? {
            tracing::info!("created the first assertion signing key");
        }
        Ok(())
    }

    /// Retires every current assertion key and makes `key` the current one, in one write.
    pub async fn rotate_assertion_key(&self, key: StoredAssertionKey) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            assertion_key::Entity::update_many()
                .col_expr(assertion_key::Column::RetiredAt, sea_orm::sea_query::Expr::value(Some(write.now)))
                .filter(assertion_key::Column::RetiredAt.is_null())
                .exec(&write.txn)
                .await?;
            insert_assertion_key(&write, key).await
        }
        .await;
        write.finish(result).await
    }

    /// The current assertion key and the keys retired after `retired_after`, the current one
    /// first, then the most recently retired.
    pub async fn assertion_keys(&self, retired_after: DateTime<Utc>) -> Result<Vec<StoredAssertionKey>, StoreError> {
        let rows = assertion_key::Entity::find()
            .filter(
                sea_orm::Condition::any()
                    .add(assertion_key::Column::RetiredAt.is_null())
                    .add(assertion_key::Column::RetiredAt.gt(retired_after)),
            )
            .order_by_desc(assertion_key::Column::CreatedAt)
            .all(&self.conn)
            .await?;
        let mut keys: Vec<StoredAssertionKey> = rows.into_iter().map(stored_key).collect();
        // The current key first (there is one unretired key; newest first among the rest).
        keys.sort_by_key(|key| (key.retired_at.is_some(), std::cmp::Reverse(key.created_at)));
        Ok(keys)
    }

    /// The keys of an application, in creation order.
    pub async fn list_application_keys(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        request: &PageRequest,
    ) -> Result<Page<ApplicationKey>, StoreError> {
        check_application(&self.conn, organization_id, application_id).await?;
        let mut query = application_key::Entity::find()
            .filter(application_key::Column::OrganizationId.eq(organization_id.0))
            .filter(application_key::Column::ApplicationId.eq(application_id.0));
        if let Some(name) = &request.name {
            query = query.filter(application_key::Column::Name.eq(name.as_str()));
        }
        if let Some(after) = request.after {
            query = query.filter(application_key::Column::Id.gt(after));
        }
        let rows = query.order_by_asc(application_key::Column::Id).limit(request.limit + 1).all(&self.conn).await?;
        page(rows, request.limit, |row| row.id, application_key_model)
    }

    pub async fn application_key(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        id: ApplicationKeyId,
    ) -> Result<ApplicationKey, StoreError> {
        let row = application_key::Entity::find_by_id(id.0)
            .filter(application_key::Column::OrganizationId.eq(organization_id.0))
            .filter(application_key::Column::ApplicationId.eq(application_id.0))
            .one(&self.conn)
            .await?
            .ok_or(StoreError::NotFound)?;
        application_key_model(row)
    }

    /// Creates an application key (only the hash of `secret` is stored) and wakes the device
    /// the application is placed on.
    pub async fn create_application_key(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        spec: &ApplicationKeySpec,
        secret: &NewSecret,
    ) -> Result<ApplicationKeyCreated, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            check_application(&write.txn, organization_id, application_id).await?;
            let taken = application_key::Entity::find()
                .filter(application_key::Column::ApplicationId.eq(application_id.0))
                .filter(application_key::Column::Name.eq(spec.name.as_str()))
                .one(&write.txn)
                .await?;
            if taken.is_some() {
                return Err(StoreError::conflict(
                    "name",
                    format!("the application already has a key named {}", spec.name),
                ));
            }
            let row = application_key::ActiveModel {
                id: Set(ApplicationKeyId::new().0),
                organization_id: Set(organization_id.0),
                application_id: Set(application_id.0),
                name: Set(spec.name.to_string()),
                prefix: Set(secret.prefix.clone()),
                secret_sha256: Set(secret.sha256.clone()),
                expires_at: Set(spec.expires_at),
                revision: Set(write.revision_column()),
                created_at: Set(write.now),
                updated_at: Set(write.now),
            }
            .insert(&write.txn)
            .await?;
            touch_placed_device(&write, application_id).await?;
            Ok(ApplicationKeyCreated { application_key: application_key_model(row)?, secret: secret.secret.clone() })
        }
        .await;
        write.finish(result).await
    }

    /// Deletes an application key and wakes the device the application is placed on, so the
    /// key stops working there at once.
    pub async fn delete_application_key(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
        id: ApplicationKeyId,
    ) -> Result<(), StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            let deleted = application_key::Entity::delete_many()
                .filter(application_key::Column::Id.eq(id.0))
                .filter(application_key::Column::OrganizationId.eq(organization_id.0))
                .filter(application_key::Column::ApplicationId.eq(application_id.0))
                .exec(&write.txn)
                .await?;
            if deleted.rows_affected == 0 {
                return Err(StoreError::NotFound);
            }
            touch_placed_device(&write, application_id).await
        }
        .await;
        write.finish(result).await
    }

    /// The application's short code: `Ok(None)` when the application has no `short_code`
    /// policy, `NotFound` when there is no such application in the organization.
    pub async fn short_code(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
    ) -> Result<Option<ShortCode>, StoreError> {
        check_application(&self.conn, organization_id, application_id).await?;
        let row = short_code::Entity::find_by_id(application_id.0).one(&self.conn).await?;
        row.map(short_code_model).transpose()
    }

    /// Replaces a generated short code with a new one (version + 1) and wakes the device the
    /// application is placed on. `Ok(None)` without a `short_code` policy; a conflict when the
    /// spec names the code.
    pub async fn rotate_short_code(
        &self,
        organization_id: OrganizationId,
        application_id: ApplicationId,
    ) -> Result<Option<ShortCode>, StoreError> {
        let write = self.begin_write().await?;
        let result = async {
            check_application(&write.txn, organization_id, application_id).await?;
            let Some(row) = short_code::Entity::find_by_id(application_id.0).one(&write.txn).await? else {
                return Ok(None);
            };
            if !row.generated {
                return Err(StoreError::conflict(
                    "access.short_code.code",
                    "the application's spec names its short code; change the spec to change the code",
                ));
            }
            let version = row.version + 1;
            let mut active: short_code::ActiveModel = row.into();
            active.code = Set(crate::secrets::short_code());
            active.version = Set(version);
            let updated = active.update(&write.txn).await?;
            touch_placed_device(&write, application_id).await?;
            short_code_model(updated).map(Some)
        }
        .await;
        write.finish(result).await
    }

    /// The secrets of the applications placed on `device_id` that have an `api_key` or
    /// `short_code` policy, as digests, sorted by application: unexpired application keys and
    /// `access`-scope API keys of the organization for `api_key`, the short code for
    /// `short_code`. Empty for a device that does not exist.
    pub async fn device_access(
        &self,
        device_id: DeviceId,
        now: DateTime<Utc>,
    ) -> Result<Vec<ApplicationAccess>, StoreError> {
        if device::Entity::find_by_id(device_id.0).one(&self.conn).await?.is_none() {
            return Ok(Vec::new());
        }
        let mut placed: Vec<uuid::Uuid> = placement::Entity::find()
            .select_only()
            .column(placement::Column::ApplicationId)
            .filter(placement::Column::DeviceId.eq(device_id.0))
            .into_tuple()
            .all(&self.conn)
            .await?;
        placed.extend(super::migrations::extra_placed(&self.conn, device_id).await?);
        if placed.is_empty() {
            return Ok(Vec::new());
        }
        let rows = application::Entity::find()
            .filter(application::Column::Id.is_in(placed))
            .order_by_asc(application::Column::Id)
            .all(&self.conn)
            .await?;
        let unexpired = |expires_at: Option<DateTime<Utc>>| expires_at.is_none_or(|expires_at| expires_at > now);
        // Per organization: a cloud host runs applications of several organizations, and each
        // application accepts only its own organization's keys.
        let mut organization_keys: BTreeMap<uuid::Uuid, Vec<AccessKeyDigest>> = BTreeMap::new();
        let mut applications = Vec::new();
        for row in rows {
            let application = super::applications::to_model(row)?;
            let policy = &application.spec.access;
            if policy.api_key.is_none() && policy.short_code.is_none() {
                continue;
            }
            let mut api_keys = Vec::new();
            if policy.api_key.is_some() {
                let own = application_key::Entity::find()
                    .filter(application_key::Column::ApplicationId.eq(application.id.0))
                    .all(&self.conn)
                    .await?;
                api_keys.extend(
                    own.into_iter()
                        .filter(|key| unexpired(key.expires_at))
                        .map(|key| AccessKeyDigest { sha256: key.secret_sha256, expires_at: key.expires_at }),
                );
                let organization_id = application.organization_id.0;
                if let std::collections::btree_map::Entry::Vacant(entry) = organization_keys.entry(organization_id) {
                    let keys = api_key::Entity::find()
                        .filter(api_key::Column::OrganizationId.eq(organization_id))
                        .all(&self.conn)
                        .await?;
                    let mut digests = Vec::new();
                    for key in keys {
                        if unexpired(key.expires_at) && has_access_scope(&key.scopes)? {
                            digests.push(AccessKeyDigest { sha256: key.secret_sha256, expires_at: key.expires_at });
                        }
                    }
                    entry.insert(digests);
                }
                api_keys.extend(organization_keys.get(&organization_id).into_iter().flatten().cloned());
                api_keys.sort_by(|a, b| a.sha256.cmp(&b.sha256));
            }
            let short_code = if policy.short_code.is_some() {
                short_code::Entity::find_by_id(application.id.0).one(&self.conn).await?.map(|row| ShortCodeDigest {
                    sha256: short_code_digest(application.id, &row.code),
                    version: u64::try_from(row.version).unwrap_or(0),
                    expires_at: row.expires_at,
                })
            } else {
                None
            };
            applications.push(ApplicationAccess { application_id: application.id, api_keys, short_code });
        }
        Ok(applications)
    }
}

async fn insert_assertion_key(write: &Write, key: StoredAssertionKey) -> Result<(), StoreError> {
    assertion_key::ActiveModel {
        kid: Set(key.kid),
        pkcs8: Set(key.pkcs8),
        sealed: Set(key.sealed),
        created_at: Set(write.now),
        retired_at: Set(None),
    }
    .insert(&write.txn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use edgible::access::sha256_hex;

    use super::*;

    #[tokio::test]
    async fn applications_of_older_databases_get_their_short_code_rows() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = Db::connect(&format!("sqlite://{}?mode=rwc", dir.path().join("db").display())).await.expect("db");
        let org = db.bootstrap(&"acme".parse().expect("name"), &NewSecret::api_key()).await.expect("bootstrap");
        let org = org.expect("an empty database").organization.id;
        let spec = serde_json::json!({
            "name": "web", "hostnames": ["web.example.test"], "workload": {"process": {"command": "/bin/web"}},
            "port": 80, "access": {"short_code": {"code": "kept1234"}}
        });
        let spec = edgible::model::parse_json(spec.to_string().as_bytes()).expect("spec");
        let application = db.create_application(org, &spec).await.expect("application");
        // What a database of the previous version looks like: the code only in the spec.
        short_code::Entity::delete_by_id(application.id.0).exec(&db.conn).await.expect("deleted");
        assert_eq!(db.short_code(org, application.id).await.expect("read"), None);

        db.backfill_short_codes().await.expect("backfill");
        let code = db.short_code(org, application.id).await.expect("read").expect("a row again");
        assert_eq!((code.code.as_str(), code.version, code.set_by_spec), ("kept1234", 1, true));
        db.backfill_short_codes().await.expect("idempotent");
        assert_eq!(db.short_code(org, application.id).await.expect("read"), Some(code));
    }

    #[test]
    fn access_scopes_are_recognized_in_stored_json() {
        assert!(has_access_scope(r#"["access"]"#).ok() == Some(true));
        assert!(has_access_scope(r#"["read","admin"]"#).ok() == Some(false));
        assert!(has_access_scope("nonsense").is_err());
        // How the server hashes presented secrets is how the device compares them.
        assert_eq!(sha256_hex("edg_x"), crate::secrets::sha256_hex("edg_x"));
    }
}
