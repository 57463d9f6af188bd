//! `/v1/placements`: where each application runs; one placement per application. A `PUT`
//! that moves a placed application to another device starts a migration (`migrations`).

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
    description = "Changing the device or the strategy of a placed application starts a migration \
                   (as `POST /v1/applications/{id}/migrations` would); the answer names it in `migration_id`.",
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
    // A placed application that changes device or strategy moves with its data, or without
    // downtime: a migration (see `Db::move_needs_migration` for when a plain move does).
    let current =
        state.db.placement(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    if current.migration_id.is_none()
        && moves(&current.spec, &spec)
        && state
            .db
            .move_needs_migration(caller.organization_id, &current, &spec)
            .await
            .map_err(|e| ApiError::from_store(e, KIND, &id))?
    {
        return super::migrations::from_placement_update(&state, &caller, expected, &spec).await;
    }
    let object = state
        .db
        .update_placement(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

/// Whether `after` puts the application on another device than `before`: another device of
/// a `serving-device` placement, or another strategy. (A change of the application is refused
/// by `update_placement`; a `cloud` placement's new pool or region re-schedules as before.)
fn moves(before: &PlacementSpec, after: &PlacementSpec) -> bool {
    if before.application_id() != after.application_id() {
        return false;
    }
    match (before, after) {
        (PlacementSpec::ServingDevice { device_id: from, .. }, PlacementSpec::ServingDevice { device_id: to, .. }) => {
            from != to
        }
        (PlacementSpec::Cloud { .. }, PlacementSpec::Cloud { .. }) => false,
        _ => true,
    }
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
