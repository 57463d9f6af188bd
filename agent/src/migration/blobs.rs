//! The server's blob store of snapshot chunks, over HTTP with the device credential as bearer
//! token (like the push session): list what is stored, upload a chunk (the source), download
//! one (the target). Connection errors and 5xx answers are retryable: the caller retries them
//! with backoff until its step's deadline, so a server restarting mid-transfer only delays it.

use std::time::Duration;

use edgible::model::MigrationId;
use edgible::protocol::v1::ChunkDigest;
use serde::Deserialize;

/// The header carrying a chunk's SHA-256 on upload.
pub const SHA256_HEADER: &str = "x-edgible-sha256";

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The server could not be reached or answered 5xx: worth retrying.
    #[error("the blob store is unreachable: {0}")]
    Unavailable(String),
    /// The server refused the request for good.
    #[error("the blob store refused {what} ({status}): {message}")]
    Refused { what: String, status: u16, message: String },
    #[error("the blob store's answer is unreadable: {0}")]
    Invalid(String),
}

impl BlobError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, BlobError::Unavailable(_))
    }
}

#[derive(Deserialize)]
struct ChunkList {
    chunks: Vec<ChunkDigest>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct BlobClient {
    http: reqwest::Client,
    /// The server's base URL, without a trailing slash.
    server: String,
    credential: String,
}

impl BlobClient {
    /// A client of the server at `server` (`http(s)://host[:port][/prefix]`), trusting the same
    /// roots as the push session (the system's and Mozilla's).
    pub fn new(server: &str, credential: &str) -> Result<Self, BlobError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| BlobError::Invalid(error.to_string()))?;
        Ok(Self { http, server: server.trim_end_matches('/').to_owned(), credential: credential.to_owned() })
    }

    fn url(&self, migration_id: MigrationId, index: Option<u32>) -> String {
        match index {
            Some(index) => format!("{}/v1/agent/migrations/{migration_id}/chunks/{index}", self.server),
            None => format!("{}/v1/agent/migrations/{migration_id}/chunks", self.server),
        }
    }

    /// The chunks the store holds for the migration.
    pub async fn list(&self, migration_id: MigrationId) -> Result<Vec<ChunkDigest>, BlobError> {
        let response = self.http.get(self.url(migration_id, None)).bearer_auth(&self.credential).send().await;
        let response = checked(response, "the chunk list").await?;
        let list: ChunkList = response.json().await.map_err(|error| BlobError::Invalid(error.to_string()))?;
        Ok(list.chunks)
    }

    /// Uploads one chunk with its SHA-256.
    pub async fn put(
        &self,
        migration_id: MigrationId,
        chunk: &ChunkDigest,
        bytes: bytes::Bytes,
    ) -> Result<(), BlobError> {
        let response = self
            .http
            .put(self.url(migration_id, Some(chunk.index)))
            .bearer_auth(&self.credential)
            .header(SHA256_HEADER, &chunk.sha256)
            .body(bytes)
            .send()
            .await;
        checked(response, &format!("chunk {}", chunk.index)).await.map(drop)
    }

    /// Downloads one chunk (at most `limit` bytes).
    pub async fn get(&self, migration_id: MigrationId, index: u32, limit: u64) -> Result<Vec<u8>, BlobError> {
        let response = self.http.get(self.url(migration_id, Some(index))).bearer_auth(&self.credential).send().await;
        let mut response = checked(response, &format!("chunk {index}")).await?;
        let mut bytes = Vec::new();
        while let Some(part) = response.chunk().await.map_err(|error| BlobError::Unavailable(error.to_string()))? {
            if (bytes.len() + part.len()) as u64 > limit {
                return Err(BlobError::Invalid(format!("chunk {index} is larger than {limit} bytes")));
            }
            bytes.extend_from_slice(&part);
        }
        Ok(bytes)
    }
}

async fn checked(response: reqwest::Result<reqwest::Response>, what: &str) -> Result<reqwest::Response, BlobError> {
    let response = response.map_err(|error| BlobError::Unavailable(error.to_string()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let mut message = response.text().await.unwrap_or_default();
    message.truncate(512);
    if status.is_server_error() {
        return Err(BlobError::Unavailable(format!("{status}: {message}")));
    }
    Err(BlobError::Refused { what: what.to_owned(), status: status.as_u16(), message })
}
