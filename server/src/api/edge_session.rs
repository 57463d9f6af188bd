//! `/v1/edge/*` and `/v1/ca.pem`: what edges (and clients of the data path) call.
//! Enrollment trades an edge's one-time token for its credential; `connect` upgrades to the
//! edge's WebSocket session (`hub::edge`); `ca.pem` is the internal CA's certificate, public
//! so that clients can trust the certificates devices serve.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgible::model::{EdgeEnrollment, EnrollmentRequest, ErrorBody};

use super::agents::upgrade_to_session;
use super::error::ApiError;
use super::extract::{ApiQuery, JsonBody, NoParams, bearer_secret};
use crate::AppState;
use crate::db::EnrollError;
use crate::secrets::{NewSecret, sha256_hex};

#[utoipa::path(post, path = "/v1/edge/enroll", tag = "edges", request_body = EnrollmentRequest, security(()),
    responses((status = 200, description = "The edge, its pool's network and its credential, shown only here",
               body = EdgeEnrollment),
              (status = 401, description = "Unknown or already used token", body = ErrorBody),
              (status = 410, description = "Expired token", body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn enroll(
    State(state): State<AppState>,
    _: ApiQuery<NoParams>,
    JsonBody(request): JsonBody<EnrollmentRequest>,
) -> Result<Response, ApiError> {
    let credential = NewSecret::edge_credential();
    match state.db.enroll_edge(&sha256_hex(&request.token), &request.public_key, &credential).await {
        Ok(enrolled) => {
            tracing::info!(edge = %enrolled.edge.id, "edge enrolled");
            let enrollment = EdgeEnrollment {
                edge: enrolled.edge,
                tunnel_cidr: enrolled.tunnel_cidr.net(),
                credential: credential.secret,
            };
            Ok((StatusCode::OK, Json(enrollment)).into_response())
        }
        Err(error @ (EnrollError::UnknownToken | EnrollError::AlreadyUsed { .. })) => {
            Err(ApiError::Unauthorized(error.to_string()))
        }
        Err(error @ EnrollError::Expired { .. }) => Err(ApiError::Gone(error.to_string())),
        Err(error @ EnrollError::KeyTaken) => {
            Err(ApiError::Conflict { field: Some("public_key".into()), message: error.to_string() })
        }
        Err(EnrollError::Store(error)) => Err(error.into()),
    }
}

#[utoipa::path(get, path = "/v1/edge/connect", tag = "edges",
    description = "The push session of an edge: a WebSocket carrying the versioned JSON frames of \
                   `edgible::protocol` (edge_hello, edge_welcome, edge_config, ...). Authenticated with the \
                   edge credential from enrollment.",
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 401, description = "Unknown edge credential", body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn connect(State(state): State<AppState>, request: axum::extract::Request) -> Result<Response, ApiError> {
    let (mut parts, _body) = request.into_parts();
    let edge = authenticate(&state, &parts.headers).await?;
    let edges = state.edges.clone();
    upgrade_to_session(&state, &mut parts, move |tx, rx| async move {
        crate::hub::edge::run(edges, edge, tx, rx).await;
    })
    .await
}

/// The edge whose credential the request carries.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<edgible::model::Edge, ApiError> {
    let secret = bearer_secret(headers, "an edge credential")?;
    state
        .db
        .edge_by_credential(&sha256_hex(secret))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("unknown edge credential; enroll the edge again".into()))
}

#[utoipa::path(get, path = "/v1/ca.pem", tag = "edges", security(()),
    description = "The certificate of the server's internal CA, which signs the certificates devices serve \
                   their applications with (valid 30 days, renewed by the agent). Trust it to verify them.",
    responses((status = 200, description = "The CA certificate, PEM", content_type = "application/x-pem-file",
               body = String),
              (status = "5XX", body = ErrorBody)))]
pub async fn ca_pem(State(state): State<AppState>, _: ApiQuery<NoParams>) -> Result<Response, ApiError> {
    let ca = state.certificate_authority().await.map_err(|error| {
        tracing::error!(%error, "the internal CA is unusable");
        ApiError::Internal("the internal CA is unusable".into())
    })?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], ca.certificate_pem().to_owned()).into_response())
}
