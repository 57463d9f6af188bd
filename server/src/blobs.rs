//! The blob store of migration snapshots: the chunks a source uploads and a target downloads
//! (`PUT`/`GET /v1/agent/migrations/{id}/chunks/{index}`), on the `object_store` crate.
//!
//! A chunk lives at `migrations/<id>/<index>`, and its SHA-256 and size beside it at
//! `migrations/<id>/<index>.sha256` (written after the chunk, so a listing never names a
//! chunk that is not whole). The server stores a chunk only once its digest was checked, so a
//! listing answers from the small digest objects without re-reading chunks. Everything of a
//! migration is deleted when it ends.
//!
//! The store is a local directory (`--blob-dir`) in production and memory in tests. S3 is not
//! offered: `object_store`'s AWS client needs a TLS stack this binary does not use (aws-lc-rs
//! next to ring), and it has not been tested against a real endpoint.

use std::sync::Arc;

use bytes::Bytes;
use edgible::model::MigrationId;
use edgible::protocol::v1::ChunkDigest;
use futures::TryStreamExt;
use object_store::path::Path;
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
            let text = self.store.get(&object.location).await?.bytes().await?;
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
