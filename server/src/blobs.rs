//! The blob store of migration snapshots: the chunks a source uploads and a target downloads
//! (`PUT`/`GET /v1/agent/migrations/{id}/chunks/{index}`), on the `object_store` crate.
//!
//! A chunk lives at `migrations/<id>/<index>`, and its SHA-256 and size beside it at
//! `migrations/<id>/<index>.sha256` (written after the chunk, so a listing never names a
//! chunk that is not whole). The server stores a chunk only once its digest was checked, so a
//! listing answers from the small digest objects without re-reading chunks. Everything of a
//! migration is deleted when it ends.
//!
//! The store is a local directory (`--blob-dir`, the default), an S3-compatible bucket
//! (`--blob-url s3://BUCKET[/PREFIX]`, for servers that share no disk or keep big snapshots), or
//! memory in tests. The S3 client takes its region, credentials and endpoint from the standard
//! `AWS_*` variables ([`AmazonS3Builder::from_env`]); `--blob-s3-endpoint` overrides the endpoint,
//! and plain `http://` is refused unless `--blob-s3-allow-http` says so. Its TLS goes through
//! rustls with the process's default provider (the mains install ring), so it needs no other
//! set-up. [`BlobStore::probe`] writes and deletes one small object, so a server whose bucket is
//! unreachable or read-only fails at start, not at its first migration.

use std::sync::Arc;

use bytes::Bytes;
use edgible::model::MigrationId;
use edgible::protocol::v1::ChunkDigest;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot use the blob directory {}: {message}", dir.display())]
    Open { dir: std::path::PathBuf, message: String },
    #[error("the blob store failed: {0}")]
    Store(#[from] object_store::Error),
    #[error("the blob store holds a corrupt digest at {0}")]
    Corrupt(String),
    #[error("--blob-url {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot use the S3 bucket of --blob-url {url}: {message}")]
    S3 { url: String, message: String },
    #[error("the blob store {store} is unreachable: {message}")]
    Unreachable { store: String, message: String },
}

/// An S3-compatible bucket as the flags name it; everything else comes from the `AWS_*`
/// environment (or, in tests, the builder given to [`BlobStore::s3_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `s3://BUCKET[/PREFIX]` (`--blob-url`).
    pub url: String,
    /// The endpoint, when not AWS itself or `AWS_ENDPOINT_URL` (`--blob-s3-endpoint`).
    pub endpoint: Option<String>,
    /// Whether an `http://` endpoint is allowed (`--blob-s3-allow-http`).
    pub allow_http: bool,
}

impl S3Location {
    /// The bucket and the prefix (empty for none) of the URL.
    fn bucket_and_prefix(&self) -> Result<(&str, &str), BlobError> {
        let bad = |message: &str| BlobError::Url { url: self.url.clone(), message: message.to_owned() };
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| bad("must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("names no bucket"));
        }
        if !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.') {
            return Err(bad("the bucket name may hold only a-z, 0-9, '-' and '.'"));
        }
        Ok((bucket, prefix.trim_matches('/')))
    }
}

/// Where snapshot chunks are kept. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
}

impl Default for BlobStore {
    /// A store in memory, for tests.
    fn default() -> Self {
        Self { store: Arc::new(object_store::memory::InMemory::new()) }
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn prefix(migration: MigrationId) -> Path {
    Path::from(format!("migrations/{migration}"))
}

fn chunk_path(migration: MigrationId, index: u32) -> Path {
    Path::from(format!("migrations/{migration}/{index}"))
}

fn digest_path(migration: MigrationId, index: u32) -> Path {
    Path::from(format!("migrations/{migration}/{index}.sha256"))
}

impl BlobStore {
    /// A store in the directory `dir`, created if missing.
    pub fn local(dir: &std::path::Path) -> Result<Self, BlobError> {
        let open = |message: String| BlobError::Open { dir: dir.to_owned(), message };
        std::fs::create_dir_all(dir).map_err(|error| open(error.to_string()))?;
        let store =
            object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|error| open(error.to_string()))?;
        Ok(Self { store: Arc::new(store) })
    }

    /// A store in the S3 bucket `location` names, configured from the `AWS_*` environment.
    pub fn s3(location: &S3Location) -> Result<Self, BlobError> {
        Self::s3_with(AmazonS3Builder::from_env(), location)
    }

    /// A store in the S3 bucket `location` names, on top of `builder` (region, credentials and
    /// endpoint already set as the caller wants; `location`'s endpoint wins).
    pub fn s3_with(builder: AmazonS3Builder, location: &S3Location) -> Result<Self, BlobError> {
        let (bucket, prefix) = location.bucket_and_prefix()?;
        let mut builder = builder.with_bucket_name(bucket).with_allow_http(location.allow_http);
        if let Some(endpoint) = &location.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        // The endpoint the client will use: the flag's, else `AWS_ENDPOINT_URL_S3`'s, else
        // `AWS_ENDPOINT_URL`'s (none: AWS itself, over HTTPS).
        let endpoint = location.endpoint.clone().or_else(|| {
            [AmazonS3ConfigKey::S3Endpoint, AmazonS3ConfigKey::Endpoint]
                .iter()
                .find_map(|key| builder.get_config_value(key))
        });
        let fail = |message: String| BlobError::S3 { url: location.url.clone(), message };
        let plain = endpoint.filter(|endpoint| endpoint.to_ascii_lowercase().starts_with("http://"));
        if let Some(endpoint) = plain.filter(|_| !location.allow_http) {
            return Err(fail(format!("the endpoint {endpoint} is plain HTTP; pass --blob-s3-allow-http to allow it")));
        }
        let store = builder.build().map_err(|error| fail(error.to_string()))?;
        let store: Arc<dyn ObjectStore> =
            if prefix.is_empty() { Arc::new(store) } else { Arc::new(PrefixStore::new(store, prefix)) };
        Ok(Self { store })
    }

    /// Writes and deletes one small object, within `timeout`: checks once, at start, that the
    /// store is reachable and writable.
    pub async fn probe(&self, timeout: std::time::Duration) -> Result<(), BlobError> {
        let path = Path::from(format!("probes/{}", uuid::Uuid::new_v4()));
        let check = async {
            self.store.put(&path, PutPayload::from_static(b"edgible blob store probe")).await?;
            self.store.delete(&path).await
        };
        let unreachable = |message: String| BlobError::Unreachable { store: self.store.to_string(), message };
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(unreachable(error.to_string())),
            Err(_) => Err(unreachable(format!("no answer within {} s", timeout.as_secs()))),
        }
    }

    /// Stores a chunk whose digest the caller checked, then its digest.
    pub async fn put_chunk(&self, migration: MigrationId, index: u32, bytes: Bytes) -> Result<ChunkDigest, BlobError> {
        let digest = ChunkDigest { index, bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) };
        self.store.put(&chunk_path(migration, index), PutPayload::from_bytes(bytes)).await?;
        let sidecar = format!("{} {}", digest.sha256, digest.bytes);
        self.store.put(&digest_path(migration, index), PutPayload::from(sidecar)).await?;
        Ok(digest)
    }

    /// The chunks of a migration stored so far, by index.
    pub async fn chunks(&self, migration: MigrationId) -> Result<Vec<ChunkDigest>, BlobError> {
        let objects: Vec<_> = self.store.list(Some(&prefix(migration))).try_collect().await?;
        let mut chunks = Vec::new();
        for object in objects {
            let Some(index) = object.location.filename().and_then(|name| name.strip_suffix(".sha256")) else {
                continue;
            };
            let corrupt = || BlobError::Corrupt(object.location.to_string());
            let index: u32 = index.parse().map_err(|_| corrupt())?;
            // A migration's blobs are deleted in the background once it ends: a digest listed
            // a moment ago may be gone now, and then its chunk is not stored any more.
            let text = match self.store.get(&object.location).await {
                Ok(found) => found.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            let text = std::str::from_utf8(&text).map_err(|_| corrupt())?;
            let (sha256, bytes) = text.split_once(' ').ok_or_else(corrupt)?;
            let bytes = bytes.parse().map_err(|_| corrupt())?;
            chunks.push(ChunkDigest { index, bytes, sha256: sha256.to_owned() });
        }
        chunks.sort_by_key(|chunk| chunk.index);
        Ok(chunks)
    }

    /// One chunk's bytes, or `None` if it was never stored (or is not whole yet).
    pub async fn chunk(&self, migration: MigrationId, index: u32) -> Result<Option<Bytes>, BlobError> {
        match self.store.head(&digest_path(migration, index)).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        }
        match self.store.get(&chunk_path(migration, index)).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Deletes everything of a migration; answers how many objects went.
    pub async fn delete(&self, migration: MigrationId) -> Result<usize, BlobError> {
        let objects: Vec<_> = self.store.list(Some(&prefix(migration))).try_collect().await?;
        for object in &objects {
            match self.store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(objects.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(store: BlobStore) {
        let migration = MigrationId::new();
        let other = MigrationId::new();
        assert!(store.chunks(migration).await.expect("listed").is_empty());
        let second = store.put_chunk(migration, 1, Bytes::from_static(b"world")).await.expect("stored");
        let first = store.put_chunk(migration, 0, Bytes::from_static(b"hello ")).await.expect("stored");
        store.put_chunk(other, 0, Bytes::from_static(b"other")).await.expect("stored");
        assert_eq!(first.sha256, sha256_hex(b"hello "));
        assert_eq!(store.chunks(migration).await.expect("listed"), [first, second]);
        assert_eq!(store.chunk(migration, 1).await.expect("read").as_deref(), Some(&b"world"[..]));
        assert_eq!(store.chunk(migration, 2).await.expect("read"), None);
        assert_eq!(store.delete(migration).await.expect("deleted"), 4);
        assert!(store.chunks(migration).await.expect("listed").is_empty());
        assert_eq!(store.chunk(migration, 0).await.expect("read"), None);
        assert_eq!(store.chunks(other).await.expect("listed").len(), 1, "another migration's chunks stay");
    }

    #[tokio::test]
    async fn chunks_are_stored_listed_read_and_deleted_in_memory() {
        round_trip(BlobStore::default()).await;
    }

    #[tokio::test]
    async fn chunks_are_stored_listed_read_and_deleted_on_disk() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        round_trip(BlobStore::local(&dir.path().join("blobs")).expect("opened")).await;
    }
}
