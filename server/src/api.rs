//! The REST API under `/v1`: routes, the handlers of each collection, the OpenAPI document,
//! and the pieces they share (paging, ETags). Handlers check the caller's scope, parse with
//! the sdk's model types and leave every rule that needs the database to [`crate::db`].

mod access;
mod agents;
mod api_keys;
mod applications;
mod device_pools;
mod devices;
mod domains;
mod edge_session;
mod edges;
pub mod error;
pub mod extract;
mod members;
mod migrations;
mod organizations;
mod placements;
mod reports;
mod system;
mod usage;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use edgible::model::Revision;
use serde::{Deserialize, Serialize};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use self::error::ApiError;
use self::extract::MAX_BODY_BYTES;
use crate::AppState;
use crate::db::PageRequest;

/// The page size when a listing names none.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page size a listing may ask for.
const MAX_PAGE_SIZE: u32 = 1000;

/// Builds the whole HTTP interface of the server around `state`.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/metrics", get(system::metrics))
        .route("/v1/openapi.json", get(system::openapi))
        .route("/v1/whoami", get(system::whoami))
        .route("/v1/organizations", get(organizations::list).post(organizations::create))
        .route(
            "/v1/organizations/{id}",
            get(organizations::get).put(organizations::update).delete(organizations::delete),
        )
        .route("/v1/members", get(members::list).post(members::create))
        .route("/v1/members/{id}", get(members::get).put(members::update).delete(members::delete))
        .route("/v1/api-keys", get(api_keys::list).post(api_keys::create))
        .route("/v1/api-keys/{id}", get(api_keys::get).put(api_keys::update).delete(api_keys::delete))
        .route("/v1/device-pools", get(device_pools::list).post(device_pools::create))
        .route("/v1/device-pools/{id}", get(device_pools::get).put(device_pools::update).delete(device_pools::delete))
        .route("/v1/devices", get(devices::list).post(devices::create))
        .route("/v1/devices/{id}", get(devices::get).put(devices::update).delete(devices::delete))
        .route("/v1/edges", get(edges::list).post(edges::create))
        .route("/v1/edges/{id}", get(edges::get).put(edges::update).delete(edges::delete))
        .route("/v1/applications", get(applications::list).post(applications::create))
        .route("/v1/applications/{id}", get(applications::get).put(applications::update).delete(applications::delete))
        .route("/v1/placements", get(placements::list).post(placements::create))
        .route("/v1/placements/{id}", get(placements::get).put(placements::update).delete(placements::delete))
        .route("/v1/domains", get(domains::list).post(domains::create))
        .route("/v1/domains/{id}", get(domains::get).delete(domains::delete))
        .route("/v1/domains/{id}/verify", post(domains::verify))
        .route("/v1/applications/{id}/status", get(reports::status))
        .route("/v1/applications/{id}/logs", get(reports::logs))
        .route("/v1/events", get(reports::events))
        .route("/v1/usage", get(usage::report))
        .route("/v1/agent/enroll", post(agents::enroll))
        .route("/v1/agent/connect", get(agents::connect))
        .route("/v1/edge/enroll", post(edge_session::enroll))
        .route("/v1/edge/connect", get(edge_session::connect))
        .route("/v1/ca.pem", get(edge_session::ca_pem))
        .route("/v1/members/{id}/password", axum::routing::put(access::set_password))
        .route("/v1/applications/{id}/keys", get(access::list_keys).post(access::create_key))
        .route("/v1/applications/{id}/keys/{key_id}", get(access::get_key).delete(access::delete_key))
        .route("/v1/applications/{id}/short-code", get(access::short_code))
        .route("/v1/applications/{id}/short-code/rotate", post(access::rotate_short_code))
        .route("/v1/assertion-keys/rotate", post(access::rotate_assertion_key))
        .route("/v1/applications/{id}/migrations", get(migrations::list).post(migrations::create))
        .route("/v1/migrations/{id}", get(migrations::get))
        .route("/v1/agent/migrations/{id}/chunks", get(migrations::list_chunks))
        .route(
            "/v1/agent/migrations/{id}/chunks/{index}",
            get(migrations::get_chunk)
                .put(migrations::put_chunk)
                .layer(DefaultBodyLimit::max(migrations::CHUNK_BODY_LIMIT)),
        )
        .route("/login", get(crate::access::pages::login_page).post(crate::access::pages::login_submit))
        .route("/logout", get(crate::access::pages::logout))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::record))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Paging and filtering of every listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// How many items to answer, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only the object with exactly this name (for members: this e-mail address).
    name: Option<String>,
}

impl ListParams {
    fn page_request(self) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(ApiError::BadRequest {
                field: Some("limit".into()),
                message: format!("limit must be 1 to {MAX_PAGE_SIZE}, got {limit}"),
            });
        }
        let after = self
            .cursor
            .map(|cursor| {
                cursor.parse::<uuid::Uuid>().map_err(|_| ApiError::BadRequest {
                    field: Some("cursor".into()),
                    message: "cursor must be the next_cursor of a previous page".into(),
                })
            })
            .transpose()?;
        Ok(PageRequest { limit: u64::from(limit), after, name: self.name })
    }
}

/// A JSON answer carrying the object's revision as its ETag.
fn tagged<T: Serialize>(status: StatusCode, revision: Revision, value: T) -> Response {
    (status, [(header::ETAG, format!("\"{revision}\""))], Json(value)).into_response()
}

/// The OpenAPI document of `/v1`, generated from the sdk model and the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "Edgible API", description = "Publish workloads on your devices at HTTPS hostnames."),
    paths(
        system::whoami,
        organizations::list, organizations::create, organizations::get, organizations::update, organizations::delete,
        members::list, members::create, members::get, members::update, members::delete,
        api_keys::list, api_keys::create, api_keys::get, api_keys::update, api_keys::delete,
        device_pools::list, device_pools::create, device_pools::get, device_pools::update, device_pools::delete,
        devices::list, devices::create, devices::get, devices::update, devices::delete,
        edges::list, edges::create, edges::get, edges::update, edges::delete,
        applications::list, applications::create, applications::get, applications::update, applications::delete,
        placements::list, placements::create, placements::get, placements::update, placements::delete,
        reports::status, reports::logs, reports::events,
        usage::report,
        agents::enroll, agents::connect,
        edge_session::enroll, edge_session::connect, edge_session::ca_pem,
        domains::list, domains::create, domains::get, domains::verify, domains::delete,
        access::set_password, access::list_keys, access::create_key, access::get_key, access::delete_key,
        access::short_code, access::rotate_short_code, access::rotate_assertion_key,
        migrations::create, migrations::get, migrations::list,
        migrations::list_chunks, migrations::put_chunk, migrations::get_chunk,
    ),
    components(schemas(edgible::model::ErrorBody, edgible::model::ErrorDetail)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "system", description = "Who am I"),
        (name = "organizations", description = "Tenants; everything else belongs to one"),
        (name = "members", description = "Users' memberships in the organization"),
        (name = "api-keys", description = "Keys for the API; secrets are shown once"),
        (name = "device-pools", description = "Tunnel networks devices are addressed from"),
        (name = "devices", description = "Machines that run applications"),
        (name = "edges", description = "Public entry points of pools: enrollment, their push session, the internal CA"),
        (name = "applications", description = "Workloads and how they are exposed"),
        (name = "placements", description = "Where each application runs"),
        (name = "events", description = "Lifecycle events agents reported"),
        (name = "usage", description = "Metered usage per application and hour, as agents reported it"),
        (name = "agents", description = "Enrollment and the push session of device agents"),
        (name = "domains", description = "Domains an organization proves it owns, for application hostnames"),
        (name = "migrations", description = "Moving an application, with its volumes, to another device"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(limit: Option<u32>, cursor: Option<&str>) -> ListParams {
        ListParams { limit, cursor: cursor.map(str::to_owned), name: None }
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(params(None, None).page_request().map(|p| p.limit).ok(), Some(100));
        assert_eq!(params(Some(1000), None).page_request().map(|p| p.limit).ok(), Some(1000));
        assert!(params(Some(0), None).page_request().is_err());
        assert!(params(Some(1001), None).page_request().is_err());
    }

    #[test]
    fn cursors_must_be_ids() {
        assert!(params(None, Some("nonsense")).page_request().is_err());
        let id = uuid::Uuid::now_v7();
        assert_eq!(params(None, Some(&id.to_string())).page_request().ok().and_then(|p| p.after), Some(id));
    }
}
