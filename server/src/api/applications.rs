//! `/v1/applications`: applications; their hostnames are unique across the whole server, and
//! when ownership is enforced, each must be the organization's to use (`crate::domains`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{Application, ApplicationId, ApplicationSpec, ErrorBody, Page, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;

const KIND: &str = "application";

#[utoipa::path(get, path = "/v1/applications", tag = "applications", params(ListParams),
    responses((status = 200, body = Page<Application>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Application>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_applications(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/applications", tag = "applications", request_body = ApplicationSpec,
    responses((status = 201, body = Application), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<ApplicationSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let created = state.db.create_owned_application(caller.organization_id, &spec, &state.domains.policy).await?;
    Ok(tagged(StatusCode::CREATED, created.revision, created))
}

#[utoipa::path(get, path = "/v1/applications/{id}", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 200, body = Application), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object =
        state.db.application(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/applications/{id}", tag = "applications", request_body = ApplicationSpec,
    params(("id" = uuid::Uuid, Path, description = "Application id"),
           ("If-Match" = Option<String>, Header, description = "Only if the application is at this revision (its ETag)")),
    responses((status = 200, body = Application), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<ApplicationSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let object = state
        .db
        .update_owned_application(caller.organization_id, id, expected, &spec, &state.domains.policy)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/applications/{id}", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    state.db.delete_application(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    state.agents.logs.forget(id);
    Ok(StatusCode::NO_CONTENT)
}
