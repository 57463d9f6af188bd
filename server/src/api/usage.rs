//! `GET /v1/usage`: an organization's metered usage (issue 9) per application and hour, as
//! agents reported it (`db::usage`). The caller's own organization needs the `read` scope;
//! any other needs `platform`, and to anyone else it does not exist (404).

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, TimeDelta, Utc};
use edgible::model::{ErrorBody, OrganizationId, Scope, UsageReport};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{ApiQuery, Caller};
use crate::AppState;

/// The longest period one report covers.
pub const MAX_PERIOD: TimeDelta = TimeDelta::days(93);

/// The period and whose usage.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// The start of the period (RFC 3339); the hour it falls in is included.
    from: Option<String>,
    /// The end of the period (RFC 3339, after `from`, at most 93 days later), exclusive.
    to: Option<String>,
    /// Another organization than the caller's (needs the `platform` scope).
    organization_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageParams),
    responses((status = 200, description = "Usage per application in every hour that overlaps the period, \
                                            oldest first", body = UsageReport),
              (status = "4XX", body = ErrorBody)))]
pub async fn report(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> Result<Json<UsageReport>, ApiError> {
    caller.require(Scope::Read)?;
    let from = time("from", params.from.as_deref())?;
    let to = time("to", params.to.as_deref())?;
    if to <= from {
        return Err(bad_parameter("to", format!("to ({to}) must be after from ({from})")));
    }
    if to - from > MAX_PERIOD {
        return Err(bad_parameter(
            "to",
            format!("the period from {from} to {to} is longer than {} days", MAX_PERIOD.num_days()),
        ));
    }
    let organization_id = match params.organization_id {
        None => caller.organization_id,
        Some(text) => {
            let id: OrganizationId = text.parse().map_err(|_| {
                bad_parameter("organization_id", format!("organization_id must be an organization id, not {text:?}"))
            })?;
            if id != caller.organization_id {
                if !caller.holds(Scope::Platform) {
                    return Err(ApiError::NotFound(format!("no organization {id}")));
                }
                state.db.organization(id).await.map_err(|e| ApiError::from_store(e, "organization", &id))?;
            }
            id
        }
    };
    Ok(Json(state.db.usage_report(organization_id, from, to).await?))
}

/// The RFC 3339 time of the query parameter `name`, which is required.
fn time(name: &str, text: Option<&str>) -> Result<DateTime<Utc>, ApiError> {
    let text = text.ok_or_else(|| bad_parameter(name, format!("{name} is required (an RFC 3339 time)")))?;
    DateTime::parse_from_rfc3339(text).map(|time| time.with_timezone(&Utc)).map_err(|error| {
        bad_parameter(
            name,
            format!("{name} must be an RFC 3339 time such as 2026-01-31T00:00:00Z, not {text:?}: {error}"),
        )
    })
}

fn bad_parameter(name: &str, message: String) -> ApiError {
    ApiError::BadRequest { field: Some(name.to_owned()), message }
}
