//! `/v1/devices`: devices; creating one allocates its tunnel address and answers a one-time
//! enrollment token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{Device, DeviceCreated, DeviceId, DeviceSpec, ErrorBody, Page, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::secrets::NewSecret;

const KIND: &str = "device";

/// How long a device's enrollment token stays usable.
const ENROLLMENT_TOKEN_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::hours(24);

#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(ListParams),
    responses((status = 200, body = Page<Device>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Device>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_devices(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/devices", tag = "devices", request_body = DeviceSpec,
    responses((status = 201, body = DeviceCreated), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<DeviceSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let expires_at = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now() + ENROLLMENT_TOKEN_LIFETIME, 6);
    let created =
        state.db.create_device(caller.organization_id, &spec, &NewSecret::enrollment_token(), expires_at).await?;
    Ok(tagged(StatusCode::CREATED, created.device.revision, created))
}

#[utoipa::path(get, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "Device id")),
    responses((status = 200, body = Device), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DeviceId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object = state.db.device(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/devices/{id}", tag = "devices", request_body = DeviceSpec,
    params(("id" = uuid::Uuid, Path, description = "Device id"),
           ("If-Match" = Option<String>, Header, description = "Only if the device is at this revision (its ETag)")),
    responses((status = 200, body = Device), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DeviceId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<DeviceSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let object = state
        .db
        .update_device(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "Device id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DeviceId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    state.db.delete_device(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
