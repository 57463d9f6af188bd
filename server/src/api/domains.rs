//! `/v1/domains`: domains an organization claims, and their verification by a DNS TXT record
//! (see `crate::domains` for the rules and why).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use edgible::model::{Domain, DomainId, DomainSpec, ErrorBody, Page, Scope, ValidationError};

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::domains::{LookupError, challenge_fqdn, mismatch_message};

const KIND: &str = "domain";

#[utoipa::path(get, path = "/v1/domains", tag = "domains", params(ListParams),
    responses((status = 200, body = Page<Domain>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Domain>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(state.db.list_domains(caller.organization_id, &params.page_request()?).await?))
}

/// Creates a pending domain; the answer's `status` names the TXT record to publish and the
/// value it must hold.
#[utoipa::path(post, path = "/v1/domains", tag = "domains", request_body = DomainSpec,
    responses((status = 201, body = Domain), (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
    JsonBody(spec): JsonBody<DomainSpec>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let created = state.db.create_domain(caller.organization_id, &spec, &state.domains.policy).await?;
    Ok(tagged(StatusCode::CREATED, created.revision, created))
}

#[utoipa::path(get, path = "/v1/domains/{id}", tag = "domains",
    params(("id" = uuid::Uuid, Path, description = "Domain id")),
    responses((status = 200, body = Domain), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DomainId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let object = state.db.domain(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(tagged(StatusCode::OK, object.revision, object))
}

/// Looks up the domain's TXT record now and marks the domain verified when it holds the
/// domain's token: 422 with what was found otherwise, 409 (`name`) when another organization
/// holds the domain, a name above or a name below it.
#[utoipa::path(post, path = "/v1/domains/{id}/verify", tag = "domains",
    params(("id" = uuid::Uuid, Path, description = "Domain id")),
    responses((status = 200, body = Domain), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DomainId>,
    _: ApiQuery<NoParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let organization_id = caller.organization_id;
    let domain = state.db.domain(organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    if domain.status.verified_at.is_some() {
        return Ok(tagged(StatusCode::OK, domain.revision, domain));
    }
    let name = domain.spec.name.as_str();
    state.db.check_domain_free(organization_id, &domain.spec.name).await?;
    let found = match state.domains.resolver.lookup(&challenge_fqdn(name)).await {
        Ok(found) => found,
        Err(error @ (LookupError::NotFound { .. } | LookupError::Refused { .. })) => {
            return Err(ApiError::Invalid(ValidationError::new(error.to_string())));
        }
        Err(error @ LookupError::Unavailable { .. }) => return Err(ApiError::Unavailable(error.to_string())),
    };
    if !found.iter().any(|value| value == &domain.status.txt_record_value) {
        return Err(ApiError::Invalid(ValidationError::new(mismatch_message(name, &found))));
    }
    let verified = state.db.verify_domain(organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    tracing::info!(domain = name, organization = %organization_id, "domain verified");
    Ok(tagged(StatusCode::OK, verified.revision, verified))
}

/// Deletes a domain; refused (409) while it is verified and applications use names under it.
#[utoipa::path(delete, path = "/v1/domains/{id}", tag = "domains",
    params(("id" = uuid::Uuid, Path, description = "Domain id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<DomainId>,
    _: ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Write)?;
    state.db.delete_domain(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, KIND, &id))?;
    Ok(StatusCode::NO_CONTENT)
}
