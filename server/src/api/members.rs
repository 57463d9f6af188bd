//! `/v1/members`: memberships of users in the caller's organization; changing them needs `admin`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{ErrorBody, Member, MemberId, MemberSpec, Page, Scope};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, IfMatch, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;

const KIND: &str = "member";

#[utoipa::path(get, path = "/v1/members", tag = "members", params(ListParams),
    responses((status = 200, body = Page<Member>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Member>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_members(caller.organization_id, &params.page_request()?).await?))
}

#[utoipa::path(post, path = "/v1/members", tag = "members", request_body = MemberSpec,
    responses((status = 201, body = Member), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<MemberSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let created = state.db.create_member(caller.organization_id, &spec).await?;
    Ok(tagged(StatusCode::CREATED, created.revision, created))
}

#[utoipa::path(get, path = "/v1/members/{id}", tag = "members",
    params(("id" = uuid::Uuid, Path, description = "Member id")),
    responses((status = 200, body = Member), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<MemberId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object = state.db.member(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(put, path = "/v1/members/{id}", tag = "members", request_body = MemberSpec,
    params(("id" = uuid::Uuid, Path, description = "Member id"),
           ("If-Match" = Option<String>, Header, description = "Only if the member is at this revision (its ETag)")),
    responses((status = 200, body = Member), (status = "4XX", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<MemberId>,
    IfMatch(expected): IfMatch,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<MemberSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let object = state
        .db
        .update_member(caller.organization_id, id, expected, &spec)
        .await
        .map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

#[utoipa::path(delete, path = "/v1/members/{id}", tag = "members",
    params(("id" = uuid::Uuid, Path, description = "Member id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<MemberId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    state.db.delete_member(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
