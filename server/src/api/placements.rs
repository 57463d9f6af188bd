//! `/v1/placements`: where each application runs; one placement per application.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{ErrorBody, Page, Placement, PlacementId, PlacementSpec, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;

const KIND: &str = "placement";

#[utoipa::path(get, path = "/v1/placements", tag = "placements", params(ListParams),
    responses((status = 200, body = Page<Placement>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Placement>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_placements(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/placements", tag = "placements", request_body = PlacementSpec,
    responses((status = 201, body = Placement), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<PlacementSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let created = state.db.create_placement(caller.organization_id, &spec).await?;
    Ok(tagged(StatusCode::CREATED, created.revision, created))
}

#[utoipa::path(get, path = "/v1/placements/{id}", tag = "placements",
    params(("id" = uuid::Uuid, Path, description = "Placement id")),
    responses((status = 200, body = Placement), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<PlacementId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object =
        state.db.placement(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/placements/{id}", tag = "placements", request_body = PlacementSpec,
    params(("id" = uuid::Uuid, Path, description = "Placement id"),
           ("If-Match" = Option<String>, Header, description = "Only if the placement is at this revision (its ETag)")),
    responses((status = 200, body = Placement), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<PlacementId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<PlacementSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let object = state
        .db
        .update_placement(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/placements/{id}", tag = "placements",
    params(("id" = uuid::Uuid, Path, description = "Placement id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<PlacementId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    state.db.delete_placement(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
