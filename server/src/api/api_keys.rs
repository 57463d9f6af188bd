//! `/v1/api-keys`: API keys of the caller's organization; changing them needs `admin`, and a key
//! can only grant scopes it holds itself.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{ApiKey, ApiKeyCreated, ApiKeyId, ApiKeySpec, ErrorBody, Page, Scope};

use super::error::ApiError;
use super::extract::scope_name;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::secrets::NewSecret;

const KIND: &str = "API key";

/// Fails with 403 if the spec asks for a scope the caller's own key does not hold, so that
/// no key can mint a stronger one. `access` grants nothing on the API, so any key allowed to
/// manage keys (`admin`) may hand it out; it cannot be combined with another scope, because
/// its hash is pushed to devices and such a key must not be able to change the platform.
fn check_grantable(caller: &Caller, spec: &ApiKeySpec) -> Result<(), ApiError> {
    if spec.scopes.contains(&Scope::Access) && spec.scopes.len() > 1 {
        return Err(ApiError::Invalid(edgible::model::ValidationError::at(
            "scopes",
            "access cannot be combined with other scopes: its hash is pushed to devices",
        )));
    }
    match spec.scopes.iter().find(|scope| **scope != Scope::Access && !caller.holds(**scope)) {
        Some(scope) => Err(ApiError::Forbidden(format!(
            "this API key cannot grant the {} scope, which it does not hold",
            scope_name(*scope)
        ))),
        None => Ok(()),
    }
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys", params(ListParams),
    responses((status = 200, body = Page<ApiKey>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_api_keys(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys", request_body = ApiKeySpec,
    responses((status = 201, body = ApiKeyCreated), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<ApiKeySpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    check_grantable(&caller, &spec)?;
    let created = state.db.create_api_key(caller.organization_id, &spec, &NewSecret::api_key()).await?;
    Ok(tagged(StatusCode::CREATED, created.api_key.revision, created))
}

#[utoipa::path(get, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = uuid::Uuid, Path, description = "API key id")),
    responses((status = 200, body = ApiKey), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApiKeyId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object = state.db.api_key(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/api-keys/{id}", tag = "api-keys", request_body = ApiKeySpec,
    params(("id" = uuid::Uuid, Path, description = "API key id"),
           ("If-Match" = Option<String>, Header, description = "Only if the API key is at this revision (its ETag)")),
    responses((status = 200, body = ApiKey), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApiKeyId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<ApiKeySpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    check_grantable(&caller, &spec)?;
    let object = state
        .db
        .update_api_key(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = uuid::Uuid, Path, description = "API key id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApiKeyId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    state.db.delete_api_key(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
