//! Snapshot archives: the files of an application's movable volumes as one tar stream (one
//! top-level directory per volume, named after it) compressed with zstd, cut into chunk files
//! of [`CHUNK_BYTES`] on disk, with the SHA-256 of each chunk and of the whole archive in a
//! [`SnapshotManifest`].
//!
//! Everything streams: the archive is written chunk by chunk as tar and zstd produce it, and
//! read back by chaining the chunk files into the decoder, so no archive is ever held in
//! memory. These functions block (file IO); callers run them on a blocking thread.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use edgible::model::Name;
use edgible::protocol::v1::{CHUNK_BYTES, ChunkDigest, SnapshotManifest};
use sha2::{Digest, Sha256};

/// The zstd level: the fastest positive one. The archive is made while the application is
/// stopped, so its speed is downtime; level 1 still shrinks text and databases well, and data
/// that does not compress passes through at memory speed.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot write the archive: {0}")]
    Write(io::Error),
    #[error("cannot read the archive: {0}")]
    Read(io::Error),
    #[error("chunk {index} is missing")]
    MissingChunk { index: u32 },
    #[error("chunk {index} does not match the manifest ({reason})")]
    ChunkMismatch { index: u32, reason: String },
    #[error("the archive's SHA-256 does not match the manifest")]
    ArchiveMismatch,
    #[error("the manifest is inconsistent: {0}")]
    Manifest(String),
    #[error("the archive holds {0:?}, which is outside the volumes")]
    UnsafePath(String),
}

/// The file of chunk `index` in a snapshot directory.
pub fn chunk_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("chunk-{index:06}"))
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Archives each `(volume, directory)` into chunk files in `dir` (replacing any there) and
/// answers the manifest. `progress` hears the archive's bytes so far.
pub fn write_snapshot(
    dir: &Path,
    sources: &[(Name, PathBuf)],
    progress: &mut dyn FnMut(u64),
) -> Result<SnapshotManifest, ArchiveError> {
    fs::create_dir_all(dir).map_err(|source| ArchiveError::Io { action: "create", path: dir.to_owned(), source })?;
    remove_chunks(dir)?;
    let writer = ChunkWriter::new(dir.to_owned(), progress);
    let encoder = zstd::Encoder::new(writer, ZSTD_LEVEL).map_err(ArchiveError::Write)?;
    let mut builder = tar::Builder::new(encoder);
    // Symbolic links are archived as links, never followed out of the volume.
    builder.follow_symlinks(false);
    for (name, path) in sources {
        builder.append_dir_all(name.as_str(), path).map_err(ArchiveError::Write)?;
    }
    let encoder = builder.into_inner().map_err(ArchiveError::Write)?;
    let writer = encoder.finish().map_err(ArchiveError::Write)?;
    let (chunks, total_bytes, sha256) = writer.finish()?;
    Ok(SnapshotManifest {
        volumes: sources.iter().map(|(name, _)| name.clone()).collect(),
        total_bytes,
        sha256,
        chunks,
    })
}

fn remove_chunks(dir: &Path) -> Result<(), ArchiveError> {
    let entries =
        fs::read_dir(dir).map_err(|source| ArchiveError::Io { action: "read", path: dir.to_owned(), source })?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("chunk-") {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| ArchiveError::Io { action: "remove", path, source })?;
        }
    }
    Ok(())
}

/// Cuts what is written into chunk files, hashing each and the whole.
struct ChunkWriter<'a> {
    dir: PathBuf,
    file: Option<File>,
    chunk_hasher: Sha256,
    chunk_bytes: u64,
    whole: Sha256,
    total: u64,
    chunks: Vec<ChunkDigest>,
    progress: &'a mut dyn FnMut(u64),
}

impl<'a> ChunkWriter<'a> {
    fn new(dir: PathBuf, progress: &'a mut dyn FnMut(u64)) -> Self {
        Self {
            dir,
            file: None,
            chunk_hasher: Sha256::new(),
            chunk_bytes: 0,
            whole: Sha256::new(),
            total: 0,
            chunks: Vec::new(),
            progress,
        }
    }

    /// Ends the current chunk. Not synced to disk: the chunks are checked against the
    /// manifest before they are shipped and after they are downloaded, so a chunk torn by a
    /// crash is refused, never used (and syncing each one cost downtime).
    fn close_chunk(&mut self) -> io::Result<()> {
        if let Some(file) = self.file.take() {
            drop(file);
            let index = u32::try_from(self.chunks.len()).map_err(|_| io::Error::other("too many chunks"))?;
            let sha256 = hex::encode(std::mem::take(&mut self.chunk_hasher).finalize());
            self.chunks.push(ChunkDigest { index, bytes: self.chunk_bytes, sha256 });
            self.chunk_bytes = 0;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<ChunkDigest>, u64, String), ArchiveError> {
        self.close_chunk().map_err(ArchiveError::Write)?;
        Ok((self.chunks, self.total, hex::encode(self.whole.finalize())))
    }
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.chunk_bytes == CHUNK_BYTES {
            self.close_chunk()?;
        }
        if self.file.is_none() {
            let index = u32::try_from(self.chunks.len()).map_err(|_| io::Error::other("too many chunks"))?;
            self.file = Some(File::create(chunk_path(&self.dir, index))?);
        }
        let room = usize::try_from(CHUNK_BYTES - self.chunk_bytes).unwrap_or(usize::MAX);
        let part = &buf[..buf.len().min(room)];
        // Just set when missing.
        let Some(file) = self.file.as_mut() else { return Err(io::Error::other("no chunk file")) };
        file.write_all(part)?;
        self.chunk_hasher.update(part);
        self.whole.update(part);
        self.chunk_bytes += part.len() as u64;
        self.total += part.len() as u64;
        (self.progress)(self.total);
        Ok(part.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// Checks that the manifest's chunks are numbered from 0 and add up to its total.
pub fn check_manifest(manifest: &SnapshotManifest) -> Result<(), ArchiveError> {
    let mut total = 0u64;
    for (position, chunk) in manifest.chunks.iter().enumerate() {
        if chunk.index as usize != position {
            return Err(ArchiveError::Manifest(format!("chunks[{position}].index is {}", chunk.index)));
        }
        if chunk.bytes > edgible::protocol::v1::MAX_CHUNK_BYTES {
            return Err(ArchiveError::Manifest(format!("chunks[{position}].bytes is too large")));
        }
        total = total.saturating_add(chunk.bytes);
    }
    if total != manifest.total_bytes {
        return Err(ArchiveError::Manifest(format!(
            "the chunks add up to {total} bytes, not {}",
            manifest.total_bytes
        )));
    }
    Ok(())
}

/// Checks one chunk file against its digest; answers its bytes.
pub fn verify_chunk(dir: &Path, chunk: &ChunkDigest) -> Result<Vec<u8>, ArchiveError> {
    let bytes = read_chunk(dir, chunk.index)?;
    verify_bytes(chunk, &bytes)?;
    Ok(bytes)
}

fn read_chunk(dir: &Path, index: u32) -> Result<Vec<u8>, ArchiveError> {
    let path = chunk_path(dir, index);
    match fs::read(&path) {
        Ok(bytes) => Ok(bytes),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(ArchiveError::MissingChunk { index }),
        Err(source) => Err(ArchiveError::Io { action: "read", path, source }),
    }
}

/// Checks a chunk's bytes against its digest.
pub fn verify_bytes(chunk: &ChunkDigest, bytes: &[u8]) -> Result<(), ArchiveError> {
    if bytes.len() as u64 != chunk.bytes {
        let reason = format!("{} bytes instead of {}", bytes.len(), chunk.bytes);
        return Err(ArchiveError::ChunkMismatch { index: chunk.index, reason });
    }
    if sha256_hex(bytes) != chunk.sha256 {
        return Err(ArchiveError::ChunkMismatch { index: chunk.index, reason: "SHA-256 differs".to_owned() });
    }
    Ok(())
}

/// The SHA-256 of a whole archive, fed its chunks in order (each checked on its own before),
/// so that a restore checks the whole while it downloads instead of reading it all again.
#[derive(Default)]
pub struct ArchiveDigest(Sha256);

impl ArchiveDigest {
    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    /// Compares the digest of what was fed with the manifest's.
    pub fn check(self, manifest: &SnapshotManifest) -> Result<(), ArchiveError> {
        if hex::encode(self.0.finalize()) == manifest.sha256 { Ok(()) } else { Err(ArchiveError::ArchiveMismatch) }
    }
}

/// Unpacks a verified archive: each volume's directory into `targets[volume]`. Entries of
/// volumes without a target are skipped; paths that would leave their volume are refused.
pub fn unpack_snapshot(
    dir: &Path,
    manifest: &SnapshotManifest,
    targets: &BTreeMap<String, PathBuf>,
) -> Result<(), ArchiveError> {
    let reader = ChunkReader { dir: dir.to_owned(), count: manifest.chunks.len() as u32, next: 0, current: None };
    let decoder = zstd::Decoder::new(reader).map_err(ArchiveError::Read)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(true);
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let path = entry.path().map_err(ArchiveError::Read)?.into_owned();
        let mut components = path.components();
        let Some(Component::Normal(volume)) = components.next() else {
            return Err(ArchiveError::UnsafePath(path.display().to_string()));
        };
        let Some(target) = targets.get(&*volume.to_string_lossy()) else { continue };
        let rest: PathBuf = components.as_path().to_owned();
        if rest.components().any(|component| !matches!(component, Component::Normal(_))) {
            return Err(ArchiveError::UnsafePath(path.display().to_string()));
        }
        if rest.as_os_str().is_empty() {
            // The volume's own directory: its permissions, on the mount point.
            continue;
        }
        let destination = target.join(&rest);
        if let Some(parent) = destination.parent() {
            fs::create_dir_all(parent).map_err(|source| ArchiveError::Io {
                action: "create",
                path: parent.to_owned(),
                source,
            })?;
        }
        entry.unpack(&destination).map_err(|source| ArchiveError::Io {
            action: "unpack",
            path: destination,
            source,
        })?;
    }
    Ok(())
}

/// Reads the chunk files one after the other as one stream.
struct ChunkReader {
    dir: PathBuf,
    count: u32,
    next: u32,
    current: Option<BufReader<File>>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(current) = self.current.as_mut() {
                let read = current.read(buf)?;
                if read > 0 || buf.is_empty() {
                    return Ok(read);
                }
                self.current = None;
            }
            if self.next >= self.count {
                return Ok(0);
            }
            self.current = Some(BufReader::new(File::open(chunk_path(&self.dir, self.next))?));
            self.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        text.parse().expect("a name")
    }

    /// Files whose content does not compress, so that the archive spans several chunks.
    fn fill(dir: &Path) {
        fs::create_dir_all(dir.join("sub/deeper")).expect("dirs");
        fs::write(dir.join("small.txt"), b"hello volume\n").expect("file");
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..(CHUNK_BYTES as usize + CHUNK_BYTES as usize / 2))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        fs::write(dir.join("sub/deeper/noise.bin"), &noise).expect("file");
        std::os::unix::fs::symlink("small.txt", dir.join("link")).expect("symlink");
    }

    /// Checks every chunk and the whole archive against the manifest, as a restore does.
    fn verify_snapshot(dir: &Path, manifest: &SnapshotManifest) -> Result<(), ArchiveError> {
        check_manifest(manifest)?;
        let mut whole = ArchiveDigest::default();
        for chunk in &manifest.chunks {
            whole.update(&verify_chunk(dir, chunk)?);
        }
        whole.check(manifest)
    }

    #[test]
    fn snapshots_round_trip_in_chunks_and_refuse_corruption() {
        let temp = tempfile::tempdir().expect("temp");
        let data = temp.path().join("data");
        let empty = temp.path().join("empty");
        fill(&data);
        fs::create_dir_all(&empty).expect("dir");
        let chunks = temp.path().join("chunks");
        let mut seen = 0;
        let manifest =
            write_snapshot(&chunks, &[(name("data"), data.clone()), (name("empty"), empty)], &mut |bytes| seen = bytes)
                .expect("snapshot");
        assert_eq!(seen, manifest.total_bytes);
        assert!(manifest.chunks.len() >= 2, "the noise spans chunks: {:?}", manifest.chunks);
        assert!(manifest.chunks.iter().rev().skip(1).all(|chunk| chunk.bytes == CHUNK_BYTES));
        check_manifest(&manifest).expect("consistent");
        verify_snapshot(&chunks, &manifest).expect("verified");

        let restored = temp.path().join("restored");
        let restored_empty = temp.path().join("restored-empty");
        fs::create_dir_all(&restored).expect("dir");
        fs::create_dir_all(&restored_empty).expect("dir");
        let targets = BTreeMap::from([("data".to_owned(), restored.clone()), ("empty".to_owned(), restored_empty)]);
        unpack_snapshot(&chunks, &manifest, &targets).expect("unpacked");
        for file in ["small.txt", "sub/deeper/noise.bin"] {
            assert_eq!(fs::read(data.join(file)).expect("original"), fs::read(restored.join(file)).expect("restored"));
        }
        assert_eq!(fs::read_link(restored.join("link")).expect("a link"), PathBuf::from("small.txt"));

        // One flipped byte in the second chunk: named, and the whole archive fails too.
        let second = chunk_path(&chunks, 1);
        let mut bytes = fs::read(&second).expect("chunk");
        bytes[10] ^= 0xff;
        fs::write(&second, &bytes).expect("corrupt");
        let error = verify_snapshot(&chunks, &manifest).expect_err("corrupt");
        assert!(matches!(error, ArchiveError::ChunkMismatch { index: 1, .. }), "{error}");
        assert!(error.to_string().contains("chunk 1"), "{error}");
        fs::remove_file(&second).expect("removed");
        assert!(matches!(verify_snapshot(&chunks, &manifest), Err(ArchiveError::MissingChunk { index: 1 })));
    }

    #[test]
    fn manifests_must_add_up_and_a_wrong_whole_digest_is_refused() {
        let temp = tempfile::tempdir().expect("temp");
        let data = temp.path().join("data");
        fs::create_dir_all(&data).expect("dir");
        fs::write(data.join("a"), b"a").expect("file");
        let chunks = temp.path().join("chunks");
        let mut manifest = write_snapshot(&chunks, &[(name("data"), data)], &mut |_| {}).expect("snapshot");
        let mut wrong = manifest.clone();
        wrong.total_bytes += 1;
        assert!(matches!(check_manifest(&wrong), Err(ArchiveError::Manifest(_))));
        manifest.sha256 = "00".repeat(32);
        assert!(matches!(verify_snapshot(&chunks, &manifest), Err(ArchiveError::ArchiveMismatch)));
    }
}
