//! What agents report, as users read it: `/v1/applications/{id}/status`,
//! `/v1/applications/{id}/logs` (optionally followed as newline-delimited JSON) and
//! `/v1/events`. Every read is scoped to the caller's organization like the objects are.

use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use edgible::model::{
    ApplicationId, ApplicationLogs, ApplicationStatus, DeviceId, ErrorBody, Event, LogEntry, Page, Scope,
};
use serde::Deserialize;
use tokio::sync::broadcast;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{ApiQuery, Caller, Id};
use super::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use crate::AppState;
use crate::db::EventQuery;

#[utoipa::path(get, path = "/v1/applications/{id}/status", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id")),
    responses((status = 200, body = ApplicationStatus), (status = "4XX", body = ErrorBody)))]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    _: ApiQuery<super::extract::NoParams>,
) -> Result<Json<ApplicationStatus>, ApiError> {
    caller.require(Scope::Read)?;
    let status = state
        .db
        .application_status(caller.organization_id, id)
        .await
        .map_err(|e| ApiError::from_store(e, "application", &id))?;
    Ok(Json(status))
}

/// Which lines to answer.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// How many of the most recent lines, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Keep the response open and stream new lines as newline-delimited JSON (`LogEntry` per
    /// line; empty lines are keep-alives) until the client goes away.
    follow: Option<bool>,
}

#[utoipa::path(get, path = "/v1/applications/{id}/logs", tag = "applications",
    params(("id" = uuid::Uuid, Path, description = "Application id"), LogParams),
    responses((status = 200, description = "Recent lines, oldest first; with `follow=true`, \
                                            `application/x-ndjson` of `LogEntry` instead", body = ApplicationLogs),
              (status = "4XX", body = ErrorBody)))]
pub async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id<ApplicationId>,
    ApiQuery(params): ApiQuery<LogParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let limit = usize::try_from(bounded_limit(params.limit)?).unwrap_or(usize::MAX);
    if !state.db.application_exists(caller.organization_id, id).await? {
        return Err(ApiError::NotFound(format!("no application {id}")));
    }
    if !params.follow.unwrap_or(false) {
        let (lines, dropped) = state.agents.logs.recent(id, limit);
        return Ok(Json(ApplicationLogs { application_id: id, lines, dropped }).into_response());
    }
    let (backlog, receiver) = state.agents.logs.follow(id, limit);
    let keepalive = state.agents.config.follow_keepalive;
    let stream =
        futures::stream::unfold((backlog.into_iter(), receiver), move |(mut backlog, mut receiver)| async move {
            if let Some(entry) = backlog.next() {
                return Some((Ok::<_, Infallible>(ndjson(&entry)), (backlog, receiver)));
            }
            loop {
                match tokio::time::timeout(keepalive, receiver.recv()).await {
                    Ok(Ok(entry)) => return Some((Ok(ndjson(&entry)), (backlog, receiver))),
                    // A follower too slow for the lines loses some; the stream goes on.
                    Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                        tracing::debug!(missed, "a log follower fell behind");
                    }
                    // The application was deleted.
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                    // An empty line now and then finds out whether the client is still there.
                    Err(_) => return Some((Ok("\n".to_owned()), (backlog, receiver))),
                }
            }
        });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

fn ndjson(entry: &LogEntry) -> String {
    // A log entry holds only strings, ids and a timestamp: serializing it cannot fail.
    let mut line = serde_json::to_string(entry).unwrap_or_default();
    line.push('\n');
    line
}

/// Which events to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Only events of this application.
    application_id: Option<String>,
    /// Only events from this device.
    device_id: Option<String>,
    /// How many, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `next_cursor` of the previous page, for older events.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventParams),
    responses((status = 200, description = "Events, newest first", body = Page<Event>),
              (status = "4XX", body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<EventParams>,
) -> Result<Json<Page<Event>>, ApiError> {
    caller.require(Scope::Read)?;
    let application_id =
        params.application_id.as_deref().map(|id| parse_id::<ApplicationId>("application_id", id)).transpose()?;
    let device_id = params.device_id.as_deref().map(|id| parse_id::<DeviceId>("device_id", id)).transpose()?;
    let before = params.cursor.as_deref().map(|cursor| parse_id::<uuid::Uuid>("cursor", cursor)).transpose()?;
    // Naming another organization's object finds nothing, like reading it would.
    if let Some(application_id) = application_id
        && !state.db.application_exists(caller.organization_id, application_id).await?
    {
        return Err(ApiError::NotFound(format!("no application {application_id}")));
    }
    if let Some(device_id) = device_id {
        state
            .db
            .device(caller.organization_id, device_id)
            .await
            .map_err(|e| ApiError::from_store(e, "device", &device_id))?;
    }
    let query = EventQuery { application_id, device_id, limit: bounded_limit(params.limit)?, before };
    Ok(Json(state.db.list_events(caller.organization_id, &query).await?))
}

fn parse_id<T: std::str::FromStr>(field: &str, text: &str) -> Result<T, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest { field: Some(field.into()), message: format!("{text:?} is not an id") })
}

fn bounded_limit(limit: Option<u32>) -> Result<u64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(ApiError::BadRequest {
            field: Some("limit".into()),
            message: format!("limit must be 1 to {MAX_PAGE_SIZE}, got {limit}"),
        });
    }
    Ok(u64::from(limit))
}
