//! The edge's state directory: who the edge is, as enrollment left it.
//!
//! ```text
//! STATE_DIR/                         mode 0700
//!   identity.json                    mode 0600: server URL, edge id, tunnel address, pool CIDR
//!   edge-credential                  mode 0600: what the hub session authenticates with
//!   wireguard-private-key            mode 0600: the edge's tunnel key, WireGuard's base64 form
//! ```
//!
//! Every file is written to a temporary file created with mode 0600, then renamed over the old
//! one, so a reader sees the old or the new content and a secret is never readable by others,
//! not even briefly. The secrets are written before the identity: a directory with an identity
//! is complete. Smaller than the agent's (`agent/src/state.rs`) on purpose: the edge keeps no
//! desired state across restarts, the server pushes it whole on every session.

use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use edgible::model::EdgeId;
use edgible::tunnel::{KeyError, PrivateKey};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The identity file.
pub const IDENTITY_FILE: &str = "identity.json";
/// The credential of the hub session.
pub const CREDENTIAL_FILE: &str = "edge-credential";
/// The edge's WireGuard private key.
pub const PRIVATE_KEY_FILE: &str = "wireguard-private-key";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "the state directory {0} holds no enrollment: run `edgible-edge enroll --server URL --token TOKEN \
         --state-dir DIR` first"
    )]
    NotEnrolled(PathBuf),
    #[error("the enrollment in {path} is incomplete: {missing} is missing; enroll the edge again")]
    Incomplete { path: PathBuf, missing: &'static str },
    #[error("{path} is not a valid identity file: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("the WireGuard private key in {path} is unreadable: {source}")]
    Key { path: PathBuf, source: KeyError },
    #[error("the private key in {0} does not match the enrolled public key; enroll the edge again")]
    KeyMismatch(PathBuf),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io { action, path: path.to_owned(), source }
}

/// Who this edge is, as enrollment recorded it. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The server's base URL, `http(s)://host[:port]`, without a trailing slash.
    pub server: String,
    pub edge_id: EdgeId,
    /// The edge's WireGuard public key (base64).
    pub public_key: String,
    /// The edge's address inside its pool's tunnel network.
    pub tunnel_address: Ipv4Addr,
    /// The pool's tunnel network.
    pub tunnel_cidr: Ipv4Net,
    pub enrolled_at: DateTime<Utc>,
}

/// An enrolled edge: its identity and its secrets.
pub struct Enrolled {
    pub identity: Identity,
    /// For `Authorization: Bearer` on `/v1/edge/connect`.
    pub credential: String,
    pub private_key: PrivateKey,
}

/// An open state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed) the directory and makes it private.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_error("create", &root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_error("set permissions of", &root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The identity, if the directory was enrolled. Reads no secret.
    pub fn identity(&self) -> Result<Option<Identity>, StateError> {
        let path = self.root.join(IDENTITY_FILE);
        match self.read(IDENTITY_FILE)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| StateError::Corrupt { path, source })
            }
            None => Ok(None),
        }
    }

    /// Loads what [`StateDir::save`] wrote, checking that the pieces belong together.
    pub fn load(&self) -> Result<Enrolled, StateError> {
        let identity = self.identity()?.ok_or_else(|| StateError::NotEnrolled(self.root.clone()))?;
        let incomplete = |missing| StateError::Incomplete { path: self.root.clone(), missing };
        let credential = self.read(CREDENTIAL_FILE)?.ok_or_else(|| incomplete("the edge credential"))?;
        let credential = String::from_utf8_lossy(&credential).trim().to_owned();
        let key = self.read(PRIVATE_KEY_FILE)?.ok_or_else(|| incomplete("the WireGuard private key"))?;
        let private_key = PrivateKey::from_base64(String::from_utf8_lossy(&key).trim())
            .map_err(|source| StateError::Key { path: self.root.join(PRIVATE_KEY_FILE), source })?;
        if private_key.public_key().to_base64() != identity.public_key {
            return Err(StateError::KeyMismatch(self.root.clone()));
        }
        Ok(Enrolled { identity, credential, private_key })
    }

    /// Writes the secrets, then the identity.
    pub fn save(&self, identity: &Identity, credential: &str, private_key: &PrivateKey) -> Result<(), StateError> {
        self.write(PRIVATE_KEY_FILE, private_key.expose_base64().as_bytes())?;
        self.write(CREDENTIAL_FILE, credential.as_bytes())?;
        // The identity holds strings, an id, addresses and a time, which always serialize.
        let bytes = serde_json::to_vec_pretty(identity).unwrap_or_default();
        self.write(IDENTITY_FILE, &bytes)
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.root.join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.root.join(name);
        let temporary = self.root.join(format!(".{name}.tmp"));
        // A temporary file left by a crash may have other permissions; start from scratch.
        match fs::remove_file(&temporary) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error("remove", &temporary)(error));
            }
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error("create", &temporary))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_error("write", &temporary))?;
        drop(file);
        fs::rename(&temporary, &path).map_err(io_error("rename into", &path))?;
        fs::File::open(&self.root).and_then(|dir| dir.sync_all()).map_err(io_error("sync", &self.root))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn identity_for(key: &PrivateKey) -> Identity {
        Identity {
            server: "http://127.0.0.1:1".into(),
            edge_id: EdgeId::new(),
            public_key: key.public_key().to_base64(),
            tunnel_address: Ipv4Addr::new(100, 96, 0, 1),
            tunnel_cidr: "100.96.0.0/16".parse().unwrap(),
            enrolled_at: Utc::now(),
        }
    }

    #[test]
    fn a_saved_enrollment_loads_back_and_every_file_is_private() {
        let temp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(temp.path().join("state")).unwrap();
        assert!(matches!(dir.load(), Err(StateError::NotEnrolled(_))));
        let key = PrivateKey::generate().unwrap();
        let identity = identity_for(&key);
        dir.save(&identity, "edgedge_secret", &key).unwrap();

        let enrolled = dir.load().unwrap();
        assert_eq!(enrolled.identity, identity);
        assert_eq!(enrolled.credential, "edgedge_secret");
        assert_eq!(enrolled.private_key.public_key(), key.public_key());
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.root()), 0o700);
        for file in [IDENTITY_FILE, CREDENTIAL_FILE, PRIVATE_KEY_FILE] {
            assert_eq!(mode(&dir.root().join(file)), 0o600, "{file}");
        }
    }

    #[test]
    fn mismatched_or_missing_pieces_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(temp.path()).unwrap();
        let key = PrivateKey::generate().unwrap();
        dir.save(&identity_for(&key), "c", &PrivateKey::generate().unwrap()).unwrap();
        assert!(matches!(dir.load(), Err(StateError::KeyMismatch(_))));
        fs::remove_file(dir.root().join(CREDENTIAL_FILE)).unwrap();
        assert!(matches!(dir.load(), Err(StateError::Incomplete { .. })));
        fs::write(dir.root().join(IDENTITY_FILE), b"{").unwrap();
        assert!(matches!(dir.load(), Err(StateError::Corrupt { .. })));
    }
}
