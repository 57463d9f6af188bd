//! `/v1/agent/*`: what device agents call. Enrollment trades a device's one-time token for
//! its credential; `connect` upgrades to the WebSocket push session (`hub::agent`).

use std::future::Future;
use std::pin::Pin;

use axum::Json;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use edgible::model::{Enrollment, EnrollmentRequest, ErrorBody};
use edgible::protocol::MAX_FRAME_BYTES;
use futures::stream::BoxStream;
use futures::{Sink, SinkExt, StreamExt};

use super::error::ApiError;
use super::extract::{ApiQuery, JsonBody, NoParams, bearer_secret};
use crate::AppState;
use crate::db::EnrollError;
use crate::hub::transport::Frame;
use crate::secrets::{NewSecret, sha256_hex};

/// The largest WebSocket message the transport takes. It is above the protocol's limit, so
/// that a frame between the two is answered with an error frame (and the session goes on)
/// rather than a dropped connection.
const TRANSPORT_LIMIT: usize = 2 * MAX_FRAME_BYTES;
/// Socket buffer sizes per session: small, since most frames are small and there may be many
/// thousands of sessions.
const READ_BUFFER_BYTES: usize = 4 * 1024;
const WRITE_BUFFER_BYTES: usize = 0;

/// The frames of an upgraded hub WebSocket, as the sessions of `hub` take them.
pub(super) type FrameSink = Pin<Box<dyn Sink<Frame, Error = axum::Error> + Send>>;
pub(super) type FrameStream = BoxStream<'static, Result<Frame, axum::Error>>;

/// Completes a hub WebSocket upgrade (agents' and edges' alike) with the hub's buffer sizes
/// and message limits, and runs `session` over the socket's frames.
pub(super) async fn upgrade_to_session<F, Fut>(
    state: &AppState,
    parts: &mut axum::http::request::Parts,
    session: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(FrameSink, FrameStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let upgrade = WebSocketUpgrade::from_request_parts(parts, state)
        .await
        .map_err(|rejection| ApiError::bad_request(format!("this endpoint speaks WebSocket: {rejection}")))?;
    Ok(upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            let sink = sink.with(|frame: Frame| futures::future::ready(Ok::<_, axum::Error>(Message::from(frame))));
            let stream = stream.map(|message| message.map(Frame::from));
            session(Box::pin(sink), stream.boxed()).await;
        }))
}

#[utoipa::path(post, path = "/v1/agent/enroll", tag = "agents", request_body = EnrollmentRequest, security(()),
    responses((status = 200, description = "The device and its credential, shown only here", body = Enrollment),
              (status = 401, description = "Unknown or already used token", body = ErrorBody),
              (status = 410, description = "Expired token", body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn enroll(
    State(state): State<AppState>,
    _: ApiQuery<NoParams>,
    JsonBody(request): JsonBody<EnrollmentRequest>,
) -> Result<Response, ApiError> {
    let credential = NewSecret::device_credential();
    match state.db.enroll(&sha256_hex(&request.token), &request.public_key, &credential).await {
        Ok(device) => {
            tracing::info!(device = %device.id, "device enrolled");
            Ok((StatusCode::OK, Json(Enrollment { device, credential: credential.secret })).into_response())
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

#[utoipa::path(get, path = "/v1/agent/connect", tag = "agents",
    description = "The push session of a device agent: a WebSocket carrying the versioned JSON frames of \
                   `edgible::protocol`. Authenticated with the device credential from enrollment.",
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 401, description = "Unknown device credential", body = ErrorBody),
              (status = "4XX", body = ErrorBody)))]
pub async fn connect(State(state): State<AppState>, request: axum::extract::Request) -> Result<Response, ApiError> {
    let (mut parts, _body) = request.into_parts();
    let device = authenticate(&state, &parts.headers).await?;
    let agents = state.agents.clone();
    upgrade_to_session(&state, &mut parts, move |tx, rx| async move {
        crate::hub::agent::run(agents, device, tx, rx).await;
    })
    .await
}

/// The device whose credential the request carries.
pub(super) async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<edgible::model::Device, ApiError> {
    let secret = bearer_secret(headers, "a device credential")?;
    state
        .db
        .device_by_credential(&sha256_hex(secret))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("unknown device credential; enroll the device again".into()))
}
