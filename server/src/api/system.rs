//! Endpoints about the server and the caller rather than a collection: `/v1/whoami`,
//! `/v1/openapi.json`, `/healthz` and `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgible::client::WhoAmI;
use edgible::model::{ErrorBody, Scope};
use serde_json::json;
use utoipa::OpenApi;

use super::ApiDoc;
use super::error::ApiError;
use super::extract::{ApiQuery, Caller, NoParams};
use crate::AppState;

#[utoipa::path(get, path = "/v1/whoami", tag = "system",
    responses((status = 200, description = "The caller's organization and key", body = WhoAmI),
              (status = "4XX", body = ErrorBody)))]
pub async fn whoami(
    State(state): State<AppState>,
    caller: Caller,
    _: ApiQuery<NoParams>,
) -> Result<Json<WhoAmI>, ApiError> {
    caller.require(Scope::Read)?;
    let organization = state.db.organization(caller.organization_id).await?;
    Ok(Json(WhoAmI { organization, api_key: caller.api_key }))
}

/// The OpenAPI document; public, like the API's shape.
pub async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

/// 200 while the database answers, 503 otherwise; no authentication, for load balancers.
pub async fn healthz(State(state): State<AppState>) -> Response {
    match state.db.ping().await {
        Ok(()) => Json(json!({"status": "ok"})).into_response(),
        Err(error) => {
            tracing::warn!(%error, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "error": "database unreachable"})))
                .into_response()
        }
    }
}

/// Prometheus metrics. Object counts are left out (not failed) when the database is down,
/// so that the request metrics still describe the outage.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let objects = match state.db.object_counts().await {
        Ok(objects) => objects,
        Err(error) => {
            tracing::warn!(%error, "counting objects for metrics");
            Vec::new()
        }
    };
    let mut text = state.metrics.render(&objects);
    text.push_str(&state.metrics.render_hub(state.agents.hub.len()));
    text.push_str(&state.metrics.render_edge_hub(state.edges.hub.len()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
