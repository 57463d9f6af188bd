//! The one mapping from every failure of a request to an HTTP status and an [`ErrorBody`].

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgible::model::{ErrorBody, ErrorDetail, Revision, ValidationError};

use crate::db::StoreError;

/// Why a request failed, in terms the client can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a malformed query string, header or path.
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    /// The body parsed but a value is not acceptable.
    #[error("{0}")]
    Invalid(ValidationError),
    /// No key, an unknown key or an expired key.
    #[error("{0}")]
    Unauthorized(String),
    /// The key is valid but lacks the scope.
    #[error("{0}")]
    Forbidden(String),
    /// No such object in the caller's organization (objects of other organizations included,
    /// so that their existence never leaks).
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict { field: Option<String>, message: String },
    /// The thing asked for existed but is no more (an expired enrollment token).
    #[error("{0}")]
    Gone(String),
    #[error("the object changed: it is at revision {current}, the request expected {expected}")]
    StaleRevision { expected: Revision, current: Revision },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The server failed; the detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// A dependency (the database) is down; retrying later may help.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest { field: None, message: message.into() }
    }

    /// Maps a store failure, naming the missing object for a 404.
    pub fn from_store(error: StoreError, kind: &str, id: &dyn std::fmt::Display) -> Self {
        match error {
            StoreError::NotFound => ApiError::NotFound(format!("no {kind} {id}")),
            other => other.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone"),
            ApiError::StaleRevision { .. } => (StatusCode::CONFLICT, "stale_revision"),
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            ApiError::BadRequest { field, .. } | ApiError::Conflict { field, .. } => field.clone(),
            ApiError::Invalid(error) => error.field.clone(),
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Invalid(error) => error.message.clone(),
            // The detail of an internal failure may name tables or files; it goes to the log.
            ApiError::Internal(_) => "the server failed to handle the request; it has been logged".into(),
            other => other.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::Conflict { field, message } => ApiError::Conflict { field, message },
            StoreError::Invalid { field, message } => ApiError::Invalid(ValidationError { field, message }),
            StoreError::StaleRevision { expected, current } => ApiError::StaleRevision { expected, current },
            StoreError::Backend(_) | StoreError::Connect(_) => ApiError::Unavailable(format!("database: {error}")),
            StoreError::Corrupt(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        ApiError::Invalid(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body =
            ErrorBody { error: ErrorDetail { code: code.to_owned(), message: self.message(), field: self.field() } };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_the_contract() {
        let conflict = ApiError::from(StoreError::Conflict { field: Some("name".into()), message: "taken".into() });
        assert_eq!(conflict.status_and_code(), (StatusCode::CONFLICT, "conflict"));
        assert_eq!(conflict.field().as_deref(), Some("name"));

        let stale = ApiError::from(StoreError::StaleRevision { expected: 1, current: 2 });
        assert_eq!(stale.status_and_code(), (StatusCode::CONFLICT, "stale_revision"));

        let invalid = ApiError::from(StoreError::Invalid { field: Some("pool_id".into()), message: "fixed".into() });
        assert_eq!(invalid.status_and_code(), (StatusCode::UNPROCESSABLE_ENTITY, "invalid"));

        let missing = ApiError::from_store(StoreError::NotFound, "device", &"x");
        assert_eq!(missing.status_and_code().0, StatusCode::NOT_FOUND);
        assert_eq!(missing.message(), "no device x");
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let error = ApiError::from(StoreError::Corrupt("table devices row 7".into()));
        assert!(!error.message().contains("devices"));
    }

    #[test]
    fn unauthorized_answers_say_how_to_authenticate() {
        let response = ApiError::Unauthorized("no key".into()).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers().get(header::WWW_AUTHENTICATE).map(HeaderValue::as_bytes), Some(&b"Bearer"[..]));
    }
}
