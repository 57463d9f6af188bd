//! `/v1/device-pools`: the tunnel networks devices are addressed from.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{DevicePool, DevicePoolId, DevicePoolSpec, ErrorBody, Page, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;

const KIND: &str = "device pool";

#[utoipa::path(get, path = "/v1/device-pools", tag = "device-pools", params(ListParams),
    responses((status = 200, body = Page<DevicePool>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<DevicePool>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_device_pools(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/device-pools", tag = "device-pools", request_body = DevicePoolSpec,
    responses((status = 201, body = DevicePool), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<DevicePoolSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let created = state.db.create_device_pool(caller.organization_id, &spec).await?;
    Ok(tagged(StatusCode::CREATED, created.revision, created))
}

#[utoipa::path(get, path = "/v1/device-pools/{id}", tag = "device-pools",
    params(("id" = uuid::Uuid, Path, description = "Device pool id")),
    responses((status = 200, body = DevicePool), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DevicePoolId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object =
        state.db.device_pool(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/device-pools/{id}", tag = "device-pools", request_body = DevicePoolSpec,
    params(("id" = uuid::Uuid, Path, description = "Device pool id"),
           ("If-Match" = Option<String>, Header, description = "Only if the device pool is at this revision (its ETag)")),
    responses((status = 200, body = DevicePool), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DevicePoolId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<DevicePoolSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let object = state
        .db
        .update_device_pool(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/device-pools/{id}", tag = "device-pools",
    params(("id" = uuid::Uuid, Path, description = "Device pool id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DevicePoolId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    state.db.delete_device_pool(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
