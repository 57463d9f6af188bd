//! The server key and what it seals: secrets the server must keep in the database but that a
//! copy of the database alone must not reveal (the ACME account's private key).
//!
//! The key is 32 random bytes, base64 in a file (`--server-key-file`), created mode 0600 on
//! first use. Sealing is ChaCha20-Poly1305 (the `chacha20poly1305` crate) with a random 96-bit
//! nonce per message and *associated data* naming what is sealed, so a sealed value copied into
//! another place (another directory's account row) fails to open. A sealed value is
//! `base64(nonce || ciphertext || tag)`. Opening with another key, or a value altered by one
//! bit, fails with [`SealError::Open`]: the server never uses credentials it cannot
//! authenticate.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use rand::Rng as _;

/// The length of the key, in bytes.
pub const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;

/// Why the server key could not be loaded, or a value not sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("--server-key-file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error("cannot seal a value: {0}")]
    Seal(String),
    /// The value was sealed with another key or for another purpose, or was altered.
    #[error("cannot open the sealed {what}: wrong server key, or the stored value was altered")]
    Open { what: String },
}

/// The server's symmetric key.
#[derive(Clone)]
pub struct ServerKey {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey").finish_non_exhaustive()
    }
}

impl ServerKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: &[u8; KEY_BYTES]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(bytes.into()) }
    }

    /// A new random key and its file contents (base64).
    pub fn generate() -> (Self, String) {
        let bytes: [u8; KEY_BYTES] = rand::rng().random();
        (Self::from_bytes(&bytes), STANDARD.encode(bytes))
    }

    /// Reads the key at `path`, or creates the file (mode 0600, never overwriting one that
    /// appeared meanwhile) with a new key if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let error = |message: String| SealError::KeyFile { path: path.to_owned(), message };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(error),
            Err(read) if read.kind() == std::io::ErrorKind::NotFound => {
                let (key, text) = Self::generate();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| error(format!("cannot create it: {e}")))?;
                file.write_all(format!("{text}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| error(format!("cannot write it: {e}")))?;
                tracing::info!(path = %path.display(), "created a new server key");
                Ok(key)
            }
            Err(read) => Err(error(format!("cannot read it: {read}"))),
        }
    }

    /// Parses the file contents: base64 of exactly [`KEY_BYTES`] bytes.
    fn parse(text: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| format!("not base64 ({e}); it must hold {KEY_BYTES} random bytes in base64"))?;
        let bytes: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|bytes: Vec<u8>| format!("{} bytes, but the key must be {KEY_BYTES}", bytes.len()))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Seals `plaintext` for `purpose` (the associated data, which opening must repeat).
    pub fn seal(&self, plaintext: &[u8], purpose: &str) -> Result<String, SealError> {
        let nonce_bytes: [u8; NONCE_BYTES] = rand::rng().random();
        let nonce = Nonce::from(nonce_bytes);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad: purpose.as_bytes() })
            .map_err(|e| SealError::Seal(e.to_string()))?;
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&ciphertext);
        Ok(STANDARD.encode(sealed))
    }

    /// Opens what [`ServerKey::seal`] sealed for `purpose`.
    pub fn open(&self, sealed: &str, purpose: &str) -> Result<Vec<u8>, SealError> {
        let failed = || SealError::Open { what: purpose.to_owned() };
        let bytes = STANDARD.decode(sealed).map_err(|_| failed())?;
        if bytes.len() < NONCE_BYTES {
            return Err(failed());
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let nonce = Nonce::from_slice(nonce);
        self.cipher.decrypt(nonce, Payload { msg: ciphertext, aad: purpose.as_bytes() }).map_err(|_| failed())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn sealed_values_open_with_the_same_key_and_purpose_only() {
        let (key, _) = ServerKey::generate();
        let sealed = key.seal(b"account credentials", "acme account https://ca.example/dir").expect("sealed");
        assert!(!sealed.contains("account credentials"));
        let opened = key.open(&sealed, "acme account https://ca.example/dir").expect("opens");
        assert_eq!(opened, b"account credentials");

        let (other, _) = ServerKey::generate();
        let error = other.open(&sealed, "acme account https://ca.example/dir").expect_err("another key");
        assert!(error.to_string().contains("wrong server key"), "{error}");
        assert!(key.open(&sealed, "acme account https://other.example/dir").is_err(), "another purpose");
        let mut altered = STANDARD.decode(&sealed).expect("base64");
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(key.open(&STANDARD.encode(altered), "acme account https://ca.example/dir").is_err(), "altered");
        assert!(key.open("not base64!", "x").is_err());
        assert!(key.open("", "x").is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(key.seal(b"v", "p").expect("sealed"), key.seal(b"v", "p").expect("sealed"));
    }

    #[test]
    fn the_key_file_is_created_0600_reused_and_checked() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("server.key");
        let created = ServerKey::load_or_create(&path).expect("created");
        let mode = std::fs::metadata(&path).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = created.seal(b"secret", "p").expect("sealed");
        let loaded = ServerKey::load_or_create(&path).expect("loaded");
        assert_eq!(loaded.open(&sealed, "p").expect("the same key"), b"secret");

        std::fs::write(&path, STANDARD.encode([1u8; 16])).expect("written");
        let error = ServerKey::load_or_create(&path).expect_err("too short");
        assert!(error.to_string().starts_with("--server-key-file"), "{error}");
        assert!(error.to_string().contains("16 bytes"), "{error}");
        std::fs::write(&path, "%%%").expect("written");
        assert!(ServerKey::load_or_create(&path).is_err());
    }
}
