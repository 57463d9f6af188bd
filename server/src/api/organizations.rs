//! `/v1/organizations`. A key sees its own organization; a `platform` key may also read,
//! rename and delete others by id, and is the only kind that creates or deletes them. To
//! anyone else another organization does not exist (404). Only a `platform` key makes an
//! organization an operator (one that runs cloud hosts) or changes an operator organization.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{ErrorBody, Organization, OrganizationCreated, OrganizationId, OrganizationSpec, Page, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::secrets::NewSecret;

const KIND: &str = "organization";

/// Fails with 404 unless the caller may see organization `id`.
fn check_visible(caller: &Caller, id: OrganizationId) -> Result<(), ApiError> {
    if id == caller.organization_id || caller.holds(Scope::Platform) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("no {KIND} {id}")))
    }
}

#[utoipa::path(get, path = "/v1/organizations", tag = "organizations", params(ListParams),
    responses((status = 200, description = "The caller's organization", body = Page<Organization>),
              (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Organization>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_organizations(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/organizations", tag = "organizations", request_body = OrganizationSpec,
    responses((status = 201, description = "The organization and its first admin key", body = OrganizationCreated),
              (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<OrganizationSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Platform)?;
    let created = state.db.create_organization(&spec, &NewSecret::api_key()).await?;
    Ok(tagged(StatusCode::CREATED, created.organization.revision, created))
}

#[utoipa::path(get, path = "/v1/organizations/{id}", tag = "organizations",
    params(("id" = uuid::Uuid, Path, description = "Organization id")),
    responses((status = 200, body = Organization), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<OrganizationId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    check_visible(&caller, id)?;
    let organization = state.db.organization(id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, organization.revision, organization))
}

#[utoipa::path(put, path = "/v1/organizations/{id}", tag = "organizations", request_body = OrganizationSpec,
    params(("id" = uuid::Uuid, Path, description = "Organization id"),
           ("If-Match" = Option<String>, Header, description = "Only if the organization is at this revision")),
    responses((status = 200, body = Organization), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<OrganizationId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<OrganizationSpec>,
) -> Result<Response, ApiError> {
    check_visible(&caller, id)?;
    caller.require(if id == caller.organization_id { Scope::Admin } else { Scope::Platform })?;
    let current = state.db.organization(id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    if (current.spec.operator || spec.operator) && !caller.holds(Scope::Platform) {
        return Err(ApiError::Forbidden(
            "operator: only a platform key may make an organization an operator or change an operator organization"
                .into(),
        ));
    }
    let organization =
        state.db.update_organization(id, expected, &spec).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, organization.revision, organization))
}

#[utoipa::path(delete, path = "/v1/organizations/{id}", tag = "organizations",
    params(("id" = uuid::Uuid, Path, description = "Organization id")),
    responses((status = 204, description = "Deleted with everything it owned"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<OrganizationId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    check_visible(&caller, id)?;
    caller.require(Scope::Platform)?;
    state.db.delete_organization(id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
