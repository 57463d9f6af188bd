//! `/v1/edges`: edges, the public entry points of pools; creating one allocates its tunnel
//! address (from the same pool addresses as devices) and answers a one-time enrollment token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{Edge, EdgeCreated, EdgeId, EdgeSpec, ErrorBody, Page, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::secrets::NewSecret;

const KIND: &str = "edge";

/// How long an edge's enrollment token stays usable.
const ENROLLMENT_TOKEN_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::hours(24);

#[utoipa::path(get, path = "/v1/edges", tag = "edges", params(ListParams),
    responses((status = 200, body = Page<Edge>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Edge>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_edges(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/edges", tag = "edges", request_body = EdgeSpec,
    responses((status = 201, body = EdgeCreated), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<EdgeSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let expires_at = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now() + ENROLLMENT_TOKEN_LIFETIME, 6);
    let created =
        state.db.create_edge(caller.organization_id, &spec, &NewSecret::edge_enrollment_token(), expires_at).await?;
    Ok(tagged(StatusCode::CREATED, created.edge.revision, created))
}

#[utoipa::path(get, path = "/v1/edges/{id}", tag = "edges",
    params(("id" = uuid::Uuid, Path, description = "Edge id")),
    responses((status = 200, body = Edge), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<EdgeId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object = state.db.edge(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/edges/{id}", tag = "edges", request_body = EdgeSpec,
    params(("id" = uuid::Uuid, Path, description = "Edge id"),
           ("If-Match" = Option<String>, Header, description = "Only if the edge is at this revision (its ETag)")),
    responses((status = 200, body = Edge), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<EdgeId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<EdgeSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let object = state
        .db
        .update_edge(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/edges/{id}", tag = "edges",
    params(("id" = uuid::Uuid, Path, description = "Edge id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<EdgeId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    state.db.delete_edge(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
