//! Extractors that turn the parts of a request into typed values or an [`ApiError`], so that
//! every malformed request gets the contract's error body rather than axum's plain text.

use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use chrono::Utc;
use edgible::model::{ApiKey, OrganizationId, Revision, Scope, Validate};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::AppState;

/// The largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Who is calling: the organization and the API key the bearer secret belongs to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub organization_id: OrganizationId,
    pub api_key: ApiKey,
}

impl Caller {
    /// Whether the key holds `scope` (directly or through a stronger one).
    pub fn holds(&self, scope: Scope) -> bool {
        self.api_key.spec.scopes.iter().any(|held| held.grants(scope))
    }

    /// Fails with 403 unless the key holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.holds(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("this API key lacks the {} scope", scope_name(scope))))
        }
    }
}

pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "write",
        Scope::Admin => "admin",
        Scope::Platform => "platform",
        Scope::Access => "access",
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let secret = bearer_secret(&parts.headers, "an API key")?;
        let api_key = state
            .db
            .api_key_by_secret_hash(&crate::secrets::sha256_hex(secret))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown API key".into()))?;
        if api_key.spec.expires_at.is_some_and(|expires_at| expires_at <= Utc::now()) {
            return Err(ApiError::Unauthorized(format!("API key {} has expired", api_key.spec.name)));
        }
        // An `access` key only opens applications' `api_key` policies on devices; every scope
        // check would refuse it too, but no route should even see it as a caller.
        if api_key.spec.scopes.iter().all(|scope| *scope == Scope::Access) {
            return Err(ApiError::Forbidden(format!(
                "API key {} has only the access scope, which opens applications and grants nothing on the API",
                api_key.spec.name
            )));
        }
        Ok(Caller { organization_id: api_key.organization_id, api_key })
    }
}

/// The secret of an `Authorization: Bearer <secret>` header; `what` names the expected
/// secret in the 401 message (`an API key`, `a device credential`).
pub fn bearer_secret<'a>(headers: &'a axum::http::HeaderMap, what: &str) -> Result<&'a str, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized(format!("{what} is required: send `Authorization: Bearer <secret>`")))?;
    header
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, secret)| secret.trim())
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized(format!("the Authorization header must be `Bearer <secret>` with {what}"))
        })
}

/// A JSON request body parsed into a spec with [`edgible::model::parse_json`]: 415 unless it
/// is declared JSON, 413 above [`MAX_BODY_BYTES`], 400 if it is not JSON at all, and 422
/// naming the field if a value is wrong.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned + Validate,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
        if !content_type.is_some_and(is_json) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be JSON (Content-Type: application/json), not {}",
                content_type.unwrap_or("untyped")
            )));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES }
            } else {
                ApiError::bad_request(format!("cannot read the request body: {rejection}"))
            }
        })?;
        // Syntax first: text that is not JSON is a malformed request (400), while JSON with
        // a wrong value is an invalid one (422, with the field).
        if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            return Err(ApiError::bad_request(format!("the body is not valid JSON: {error}")));
        }
        Ok(JsonBody(edgible::model::parse_json(&bytes)?))
    }
}

/// `application/json`, with or without parameters, or any `+json` type.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The query string, parsed strictly: unknown parameters and bad values are 400.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// The query of endpoints that take no parameters: any parameter is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The object id of an `/{id}` path, parsed into its typed id; 400 if it is not one.
#[derive(Debug)]
pub struct Id<T>(pub T);

impl<T, S> FromRequestParts<S> for Id<T>
where
    T: FromStr<Err = edgible::model::ValidationError> + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        raw.parse().map(Id).map_err(|error: edgible::model::ValidationError| ApiError::bad_request(error.message))
    }
}

/// The revision named by `If-Match` (`"7"`, `W/"7"` or `7`); absent, or `*`, means any.
#[derive(Debug)]
pub struct IfMatch(pub Option<Revision>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(IfMatch(None));
        };
        let malformed = || ApiError::BadRequest {
            field: None,
            message: "If-Match must be the ETag of the object, a quoted revision such as \"7\"".into(),
        };
        let text = value.to_str().map_err(|_| malformed())?.trim();
        if text == "*" {
            return Ok(IfMatch(None));
        }
        let text = text.strip_prefix("W/").unwrap_or(text);
        let text = text.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')).unwrap_or(text);
        text.parse().map(|revision| IfMatch(Some(revision))).map_err(|_| malformed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognized() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("Application/JSON"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}
