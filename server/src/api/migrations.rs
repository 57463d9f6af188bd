//! Migrations: what users call (`POST /v1/applications/{id}/migrations`,
//! `GET /v1/migrations/{id}`, `GET /v1/applications/{id}/migrations`; a `PUT` of a placement
//! that changes its device or strategy starts one too, see `placements::update`) and the
//! blob store endpoints of agents (`/v1/agent/migrations/{id}/chunks[/{index}]`), which
//! authenticate with the device credential and are open only to the migration's devices:
//! its source uploads, its target downloads, both list.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgible::model::{
    ApplicationId, DeviceId, ErrorBody, Migration, MigrationId, MigrationPhase, MigrationRequest, Page, Scope,
    ValidationError,
};
use edgible::protocol::v1::{ChunkDigest, MAX_CHUNK_BYTES};
use serde::Serialize;

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id, JsonBody, NoParams};
use super::{ListParams, tagged};
use crate::AppState;
use crate::migrations::MigrationState;

/// The header carrying a chunk's SHA-256 (lowercase hex) on upload.
pub const SHA256_HEADER: &str = "x-edgible-sha256";

/// The largest request body of a chunk upload.
pub const CHUNK_BODY_LIMIT: usize = MAX_CHUNK_BYTES as usize;

#[utoipa::path(post, path = "/v1/applications/{id}/migrations", tag = "migrations", request_body = MigrationRequest,
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 202, description = "Started; follow it with `GET /v1/migrations/{id}`", body = Migration),
              (status = 409, description = "Refused, nothing started: another migration runs, a volume is not \
                                            movable, the target is offline, not in the organization or the source",
               body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<NoParams>,
    JsonBody(request): JsonBody<MigrationRequest>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let (migration, _) = state
        .migrations()
        .create(caller.organization_id, id, &request.to, None)
        .await
        .map_err(|e| ApiError::from_store(e, "application", &id))?;
    Ok((StatusCode::ACCEPTED, Json(migration)).into_response())
}

#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = uuid::Uuid, Path, description = "Migration id")),
    responses((status = 200, body = Migration), (status = "4XX", body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<MigrationId>,
    _: ApiQuery<NoParams>,
) -> Result<Json<Migration>, ApiError> {
    caller.require(Scope::Read)?;
    let migration =
        state.db.migration(caller.organization_id, id).await.map_err(|e| ApiError::from_store(e, "migration", &id))?;
    Ok(Json(migration))
}

#[utoipa::path(get, path = "/v1/applications/{id}/migrations", tag = "migrations",
    params(ListParams, ("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 200, description = "Newest first", body = Page<Migration>), (status = "4XX", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<Migration>>, ApiError> {
    caller.require(Scope::Read)?;
    let request = params.page_request()?;
    let all = state
        .db
        .application_migrations(caller.organization_id, id)
        .await
        .map_err(|e| ApiError::from_store(e, "application", &id))?;
    // Newest first: a cursor names the last migration of the previous page.
    let mut items: Vec<Migration> =
        all.into_iter().filter(|migration| request.after.is_none_or(|after| migration.id.0 < after)).collect();
    let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|migration| migration.id.to_string())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

/// `PUT /v1/placements/{id}` with a new device or strategy: starts a migration and answers
/// the placement, which names it.
pub(super) async fn from_placement_update(
    state: &AppState,
    caller: &Caller,
    expected: Option<edgible::model::Revision>,
    spec: &edgible::model::PlacementSpec,
) -> Result<Response, ApiError> {
    let application = spec.application_id();
    let (_, placement) = state
        .migrations()
        .create(caller.organization_id, application, spec, expected)
        .await
        .map_err(|e| ApiError::from_store(e, "application", &application))?;
    Ok(tagged(StatusCode::OK, placement.revision, placement))
}

/// The chunks a migration's blob store holds.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChunkList {
    #[schema(value_type = Vec<Object>)]
    pub chunks: Vec<ChunkDigest>,
}

/// Which of a migration's devices may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Party {
    Source,
    Target,
    Either,
}

/// The migration, if the calling device is allowed this call on it; 404 for a migration that
/// does not exist or does not concern the device at all, 403 for the wrong side.
async fn migration_for(
    state: &AppState,
    headers: &HeaderMap,
    id: MigrationId,
    party: Party,
) -> Result<MigrationState, ApiError> {
    let device = super::agents::authenticate(state, headers).await?;
    let unknown = || ApiError::NotFound(format!("no migration {id} of this device"));
    let migration = state.db.migration_state(id).await?.ok_or_else(unknown)?;
    let role = |wanted: DeviceId| device.id == wanted;
    if !role(migration.source) && !role(migration.target) {
        return Err(unknown());
    }
    let allowed = match party {
        Party::Source => role(migration.source),
        Party::Target => role(migration.target),
        Party::Either => true,
    };
    if !allowed {
        let side = if party == Party::Source { "source" } else { "target" };
        return Err(ApiError::Forbidden(format!("only the migration's {side} may do this")));
    }
    Ok(migration)
}

fn migration_id(raw: &str) -> Result<MigrationId, ApiError> {
    raw.parse().map_err(|error: ValidationError| ApiError::bad_request(error.message))
}

#[utoipa::path(get, path = "/v1/agent/migrations/{id}/chunks", tag = "agents",
    description = "The chunks of the migration's snapshot stored so far. For its source and target; \
                   authenticated with the device credential.",
    params(("id" = uuid::Uuid, Path, description = "Migration id")),
    responses((status = 200, body = ChunkList), (status = "4XX", body = ErrorBody)))]
pub async fn list_chunks(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChunkList>, ApiError> {
    let id = migration_id(&id)?;
    migration_for(&state, &headers, id, Party::Either).await?;
    let chunks = state.migrations().blobs().chunks(id).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(ChunkList { chunks }))
}

#[utoipa::path(put, path = "/v1/agent/migrations/{id}/chunks/{index}", tag = "agents",
    description = "Stores one chunk of the snapshot, while the migration ships. For its source; \
                   authenticated with the device credential. The body is the chunk (at most 16 MiB).",
    params(("id" = uuid::Uuid, Path, description = "Migration id"),
           ("index" = u32, Path, description = "Chunk index, from 0"),
           ("x-edgible-sha256" = String, Header, description = "The chunk's SHA-256, lowercase hex")),
    responses((status = 204, description = "Stored"),
              (status = 422, description = "The body does not match the digest or the manifest", body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn put_chunk(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let id = migration_id(&id)?;
    let migration = migration_for(&state, &headers, id, Party::Source).await?;
    let (Some(manifest), MigrationPhase::Ship) = (&migration.manifest, migration.phase) else {
        return Err(ApiError::Conflict {
            field: None,
            message: format!("migration {id} is in {}, not ship: no chunk is taken now", migration.phase.as_str()),
        });
    };
    let Some(expected) = manifest.chunks.iter().find(|chunk| chunk.index == index) else {
        let message = format!("the snapshot has {} chunks; there is no chunk {index}", manifest.chunks.len());
        return Err(ApiError::Invalid(ValidationError::at("index", message)));
    };
    let claimed =
        headers.get(SHA256_HEADER).and_then(|value| value.to_str().ok()).ok_or_else(|| ApiError::BadRequest {
            field: Some(SHA256_HEADER.into()),
            message: format!("{SHA256_HEADER} is required: the chunk's SHA-256, lowercase hex"),
        })?;
    let actual = crate::blobs::sha256_hex(&body);
    if actual != claimed {
        let message = format!("the body's SHA-256 is {actual}, not {claimed}: the chunk was damaged; send it again");
        return Err(ApiError::Invalid(ValidationError::at(SHA256_HEADER, message)));
    }
    if actual != expected.sha256 || body.len() as u64 != expected.bytes {
        let message = format!(
            "chunk {index} is {} bytes with SHA-256 {actual}, but the manifest says {} bytes with {}",
            body.len(),
            expected.bytes,
            expected.sha256
        );
        return Err(ApiError::Invalid(ValidationError::at("body", message)));
    }
    state.migrations().blobs().put_chunk(id, index, body).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/agent/migrations/{id}/chunks/{index}", tag = "agents",
    description = "One chunk of the snapshot. For the migration's target; authenticated with the device credential.",
    params(("id" = uuid::Uuid, Path, description = "Migration id"),
           ("index" = u32, Path, description = "Chunk index, from 0")),
    responses((status = 200, description = "The chunk's bytes", content_type = "application/octet-stream"),
              (status = "4XX", body = ErrorBody)))]
pub async fn get_chunk(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, u32)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = migration_id(&id)?;
    migration_for(&state, &headers, id, Party::Target).await?;
    let bytes = state
        .migrations()
        .blobs()
        .chunk(id, index)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::NotFound(format!("migration {id} has no chunk {index}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
