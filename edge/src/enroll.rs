//! Enrollment: trading the edge's one-time token for its long-lived credential.
//!
//! The edge generates its WireGuard key pair here; only the public half goes to the server
//! (`POST /v1/edge/enroll`, body `EnrollmentRequest {token, public_key}`, answer
//! `EdgeEnrollment`). The key and the credential are written only after the server accepted
//! the token, so a refused token leaves the state directory as it was; an enrolled directory is
//! not enrolled again unless asked to (`force`).

use chrono::Utc;
use edgible::model::{EdgeEnrollment, EdgeId, EnrollmentRequest, ErrorBody};
use edgible::tunnel::{KeyError, PrivateKey};
use url::Url;

use crate::state::{Identity, StateDir, StateError};

/// The enrollment endpoint, below the server's base URL.
pub const ENROLL_PATH: &str = "v1/edge/enroll";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("this state directory is already enrolled as edge {edge_id} with {server}; pass --force to replace it")]
    AlreadyEnrolled { edge_id: EdgeId, server: String },
    #[error("invalid server URL {url:?}: {message}")]
    InvalidServer { url: String, message: String },
    /// The server refused the token: unknown, used or expired. The message is the server's.
    #[error("the server refused the enrollment token ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("enrolling with {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("the server's answer is not an edge enrollment: {0}")]
    Answer(String),
    #[error("the server answered for edge {0}, whose public key is not the one sent")]
    KeyMismatch(EdgeId),
    #[error("cannot generate the edge's WireGuard key: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "the edge enrolled as {edge_id}, but its identity could not be saved ({source}); the token is used: \
         create the edge again to get a new one"
    )]
    NotSaved {
        edge_id: EdgeId,
        #[source]
        source: StateError,
    },
}

/// Enrolls with `server` using `token` and writes the identity, the credential and the private
/// key into `state_dir`.
pub async fn enroll(state_dir: &StateDir, server: &str, token: &str, force: bool) -> Result<Identity, EnrollError> {
    let server = server.trim_end_matches('/').to_owned();
    if !force && let Ok(Some(existing)) = state_dir.identity() {
        return Err(EnrollError::AlreadyEnrolled { edge_id: existing.edge_id, server: existing.server });
    }
    let url = enroll_url(&server)?;
    let private_key = PrivateKey::generate()?;
    let request =
        EnrollmentRequest { token: token.trim().to_owned(), public_key: private_key.public_key().to_base64() };
    let enrollment = post(&url, &request).await?;
    let edge = enrollment.edge;
    if edge.status.public_key.as_deref() != Some(request.public_key.as_str()) {
        return Err(EnrollError::KeyMismatch(edge.id));
    }
    let identity = Identity {
        server,
        edge_id: edge.id,
        public_key: request.public_key,
        tunnel_address: edge.status.tunnel_address,
        tunnel_cidr: enrollment.tunnel_cidr,
        enrolled_at: Utc::now(),
    };
    state_dir
        .save(&identity, &enrollment.credential, &private_key)
        .map_err(|source| EnrollError::NotSaved { edge_id: identity.edge_id, source })?;
    Ok(identity)
}

/// `SERVER/v1/edge/enroll`, keeping a path prefix the server may live under.
pub fn enroll_url(server: &str) -> Result<Url, EnrollError> {
    let invalid = |message: String| EnrollError::InvalidServer { url: server.to_owned(), message };
    let mut url = Url::parse(server).map_err(|error| invalid(error.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid("the URL must be http(s)://HOST[:PORT]".to_owned()));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.join(ENROLL_PATH).map_err(|error| invalid(error.to_string()))
}

async fn post(url: &Url, request: &EnrollmentRequest) -> Result<EdgeEnrollment, EnrollError> {
    let transport = |source| EnrollError::Transport { url: url.to_string(), source };
    let response = reqwest::Client::new().post(url.clone()).json(request).send().await.map_err(transport)?;
    let status = response.status();
    let body = response.bytes().await.map_err(transport)?;
    if !status.is_success() {
        return Err(EnrollError::Refused { status: status.as_u16(), message: error_message(&body) });
    }
    serde_json::from_slice(&body).map_err(|error| EnrollError::Answer(error.to_string()))
}

/// The server's message from an error answer's body.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => error.message,
        Err(_) if body.is_empty() => "no explanation given".to_owned(),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn server_urls_become_the_enroll_endpoint() {
        for (server, expected) in [
            ("http://127.0.0.1:7070", "http://127.0.0.1:7070/v1/edge/enroll"),
            ("https://edgible.example.com/", "https://edgible.example.com/v1/edge/enroll"),
            ("https://example.com/edgible", "https://example.com/edgible/v1/edge/enroll"),
        ] {
            assert_eq!(enroll_url(server).unwrap().as_str(), expected);
        }
        for bad in ["ftp://example.com", "not a url"] {
            assert!(matches!(enroll_url(bad), Err(EnrollError::InvalidServer { .. })), "{bad}");
        }
    }

    #[test]
    fn error_bodies_give_the_servers_message() {
        let body = br#"{"error":{"code":"unauthorized","message":"unknown enrollment token"}}"#;
        assert_eq!(error_message(body), "unknown enrollment token");
        assert_eq!(error_message(b""), "no explanation given");
        assert_eq!(error_message(b"Bad Gateway\n"), "Bad Gateway");
    }

    #[tokio::test]
    async fn an_unreachable_server_leaves_the_directory_empty() {
        let temp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(temp.path()).unwrap();
        // A port that was just free: nothing listens there any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let error = enroll(&dir, &format!("http://127.0.0.1:{port}"), "token", false).await.unwrap_err();
        assert!(matches!(error, EnrollError::Transport { .. }), "{error}");
        assert!(dir.identity().unwrap().is_none());
        assert!(!dir.root().join(crate::state::PRIVATE_KEY_FILE).exists());
    }
}
