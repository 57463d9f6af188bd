//! The REST side of access policies: members' passwords (`PUT /v1/members/{id}/password`,
//! admin), application keys (`/v1/applications/{id}/keys`; read to read, write to create and
//! delete; the secret is shown once), short codes (`/v1/applications/{id}/short-code`, and
//! `.../rotate` for generated codes) and the rotation of the assertion signing key
//! (`POST /v1/assertion-keys/rotate`, platform). The rules live in `crate::access` and
//! `crate::db`; every write that changes what devices enforce wakes them there, except the
//! key rotation, which concerns every device and wakes every session here.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{
    ApplicationId, ApplicationKey, ApplicationKeyCreated, ApplicationKeyId, ApplicationKeySpec, ErrorBody, MemberId,
    Page, PasswordSpec, Scope, ShortCode, ValidationError,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::access::AccessError;
use crate::secrets::NewSecret;

/// The answer to a key rotation: the id of the new current key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    pub kid: String,
}

impl From<AccessError> for ApiError {
    fn from(error: AccessError) -> Self {
        match error {
            AccessError::Store(error) => error.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The application and key ids of `/v1/applications/{id}/keys/{key_id}`.
fn key_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(ApplicationId, ApplicationKeyId), ApiError> {
    let Path((application, key)) = path.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let application = application.parse().map_err(|error: ValidationError| ApiError::bad_request(error.message))?;
    let key = key.parse().map_err(|error: ValidationError| ApiError::bad_request(error.message))?;
    Ok((application, key))
}

fn no_application(id: ApplicationId) -> impl FnOnce(crate::db::StoreError) -> ApiError {
    move |error| ApiError::from_store(error, "application", &id)
}

#[utoipa::path(put, path = "/v1/members/{id}/password", tag = "members", request_body = PasswordSpec,
    params(("id" = uuid::Uuid, Path, description = "Member id")),
    responses((status = 204, description = "The password is set; the user's login sessions ended"),
              (status = "4XX", body = ErrorBody)))]
pub async fn set_password(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<MemberId>,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<PasswordSpec>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    crate::access::check_password_strength(&spec.password)
        .map_err(|message| ApiError::Invalid(ValidationError::at("password", message)))?;
    // Make sure the member exists before spending a hash on it.
    state.db.member(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, "member", &id))?;
    let password = spec.password;
    let hash = tokio::task::spawn_blocking(move || crate::access::hash_password(&password))
        .await
        .map_err(|error| ApiError::Internal(format!("hashing a password: {error}")))??;
    state
        .db
        .set_member_password(caller.organization_id, id, &hash)
        .await
        .map_err(|e| ApiError::from_store(e, "member", &id))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/applications/{id}/keys", tag = "applications", params(ListParams,
    ("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 200, body = Page<ApplicationKey>), (status = "4XX", body = ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<ApplicationKey>>, ApiError> {
    caller.require(Scope::Read)?;
    let request = params.page_request()?;
    Ok(Json(state.db.list_application_keys(caller.organization_id, id, &request).await.map_err(no_application(id))?))
}

#[utoipa::path(post, path = "/v1/applications/{id}/keys", tag = "applications", request_body = ApplicationKeySpec,
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 201, body = ApplicationKeyCreated), (status = "4XX", body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<ApplicationKeySpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let created = state
        .db
        .create_application_key(caller.organization_id, id, &spec, &NewSecret::application_key())
        .await
        .map_err(no_application(id))?;
    Ok(tagged(StatusCode::CREATED, created.application_key.revision, created))
}

#[utoipa::path(get, path = "/v1/applications/{id}/keys/{key_id}", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id"),
           ("key_id" = uuid::Uuid, Path, description = "Application key id")),
    responses((status = 200, body = ApplicationKey), (status = "4XX", body = ErrorBody)))]
pub async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let (application, key) = key_path(path)?;
    let object = state
        .db
        .application_key(caller.organization_id, application, key)
        .await
        .map_err(|e| ApiError::from_store(e, "application key", &key))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/applications/{id}/keys/{key_id}", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id"),
           ("key_id" = uuid::Uuid, Path, description = "Application key id")),
    responses((status = 204, description = "Deleted; the device stops accepting it at once"),
              (status = "4XX", body = ErrorBody)))]
pub async fn delete_key(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    let (application, key) = key_path(path)?;
    state
        .db
        .delete_application_key(caller.organization_id, application, key)
        .await
        .map_err(|e| ApiError::from_store(e, "application key", &key))?;
    Ok(StatusCode::NO_CONTENT)
}

fn no_policy(id: ApplicationId) -> ApiError {
    ApiError::NotFound(format!("application {id} has no short_code access policy"))
}

#[utoipa::path(get, path = "/v1/applications/{id}/short-code", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 200, body = ShortCode), (status = "4XX", body = ErrorBody)))]
pub async fn short_code(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<NoParams>,
) -> Result<Json<ShortCode>, ApiError> {
    caller.require(Scope::Read)?;
    let code = state.db.short_code(caller.organization_id, id).await.map_err(no_application(id))?;
    code.map(Json).ok_or_else(|| no_policy(id))
}

#[utoipa::path(post, path = "/v1/applications/{id}/short-code/rotate", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 200, body = ShortCode), (status = 409, description = "The spec names the code", body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn rotate_short_code(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<NoParams>,
) -> Result<Json<ShortCode>, ApiError> {
    caller.require(Scope::Write)?;
    let code = state.db.rotate_short_code(caller.organization_id, id).await.map_err(no_application(id))?;
    code.map(Json).ok_or_else(|| no_policy(id))
}

#[utoipa::path(post, path = "/v1/assertion-keys/rotate", tag = "system",
    responses((status = 200, body = RotatedKey), (status = "4XX", body = ErrorBody)))]
pub async fn rotate_assertion_key(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
) -> Result<Json<RotatedKey>, ApiError> {
    caller.require(Scope::Platform)?;
    let kid = crate::access::rotate_key(&state.db, state.access_settings()).await?;
    // Every device verifies assertions with these keys.
    state.agents.hub.wake_all();
    Ok(Json(RotatedKey { kid }))
}
