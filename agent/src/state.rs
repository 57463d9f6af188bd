//! The agent's state directory: what it must remember across restarts.
//!
//! ```text
//! STATE_DIR/            mode 0700
//!   state.json          mode 0600: last desired state, applied revision, what runs
//!   identity.json       mode 0600: the server, the device id and public key (`enroll`)
//!   secrets/NAME        mode 0600: the device credential, the WireGuard private key, the
//!                       proxy's cookie key (`cookie-key`, 32 random bytes, made once)
//!   certs/APP_ID.key    mode 0600: each application's TLS private key (the data path)
//!   certs/APP_ID.pem    its certificate chain, as the server signed it
//!   logs/               output files of process workloads
//!   volumes/APP_ID/     each volume's ext4 image (NAME.img) and mount point (NAME/)
//!   migrations/         holds.json (quiesced applications), steps.json (ended migration
//!                       steps), MIGRATION_ID/ (snapshot chunks and their application)
//!   lock                held (flock) by the agent that uses the directory
//! ```
//!
//! Every file is written atomically: to a temporary file in the same directory, synced, then
//! renamed over the old one (and the directory synced), so a crash or power loss leaves either
//! the old or the new content, never a mix. `state.json` holds environment values, which may be
//! secrets, so it is private too.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edgible::model::{ApplicationId, Revision};
use serde::{Deserialize, Serialize};

use crate::driver::{LaunchSpec, WorkloadHandle};
use crate::reconcile::DesiredState;

/// The version of `state.json` this build writes.
pub const STATE_FORMAT: u32 = 1;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// The secret holding the proxy's cookie key.
const COOKIE_KEY: &str = "cookie-key";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid state file: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("{path} has format {found}; this agent reads format {STATE_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{0:?} is not a valid file name (letters, digits, '-', '_' and '.')")]
    SecretName(String),
    #[error("another agent uses the state directory {0}")]
    Locked(PathBuf),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io { action, path: path.to_owned(), source }
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    pub format: u32,
    pub desired: DesiredState,
    /// The revision of desired state last applied.
    pub applied_revision: Option<Revision>,
    /// The workloads the agent started or adopted and has not stopped.
    pub workloads: BTreeMap<ApplicationId, WorkloadRecord>,
}

impl Default for PersistedState {
    fn default() -> Self {
        Self {
            format: STATE_FORMAT,
            desired: DesiredState::default(),
            applied_revision: None,
            workloads: BTreeMap::new(),
        }
    }
}

/// A workload the agent is responsible for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub launch: LaunchSpec,
    /// The revision of the application it runs.
    pub revision: Revision,
    pub handle: WorkloadHandle,
}

/// An open state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed) a state directory and makes it private.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_error("create", &root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_error("set permissions of", &root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the directory for this agent: two agents on one directory would each adopt and
    /// restart the other's workloads. Held until the lock is dropped (or the process ends).
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.root.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StateError::Locked(self.root.clone())),
            Err(fs::TryLockError::Error(error)) => Err(io_error("lock", &path)(error)),
        }
    }

    /// Where process workloads' output files go.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Reads `state.json`; a directory without one is a fresh agent.
    pub fn load(&self) -> Result<PersistedState, StateError> {
        let path = self.root.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(PersistedState::default()),
            Err(error) => return Err(io_error("read", &path)(error)),
        };
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let format: Format =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if format.format != STATE_FORMAT {
            return Err(StateError::Format { path, found: format.format });
        }
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source })
    }

    pub fn save(&self, state: &PersistedState) -> Result<(), StateError> {
        let bytes = serialize(state);
        write_atomically(&self.root.join(STATE_FILE), &bytes)
    }

    /// Stores a secret (mode 0600) under `secrets/NAME`.
    pub fn write_secret(&self, name: &str, secret: &[u8]) -> Result<PathBuf, StateError> {
        let path = self.secret_path(name)?;
        let dir = self.root.join("secrets");
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_error("set permissions of", &dir))?;
        write_atomically(&path, secret)?;
        Ok(path)
    }

    /// Reads a secret, `None` if it was never stored.
    pub fn read_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.secret_path(name)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    /// Stores a file that is not secret (the enrollment identity) at the top of the directory,
    /// atomically and private all the same: the directory is nobody else's business.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, StateError> {
        let path = self.root.join(checked_name(name)?);
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    /// Reads a file written by [`StateDir::write_file`], `None` if it was never written.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.root.join(checked_name(name)?);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    /// Stores a file under the subdirectory `dir` (created mode 0700), atomically and mode 0600.
    pub fn write_in(&self, dir: &str, name: &str, bytes: &[u8]) -> Result<PathBuf, StateError> {
        let dir = self.root.join(checked_name(dir)?);
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_error("set permissions of", &dir))?;
        let path = dir.join(checked_name(name)?);
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    /// Reads a file written by [`StateDir::write_in`], `None` if there is none.
    pub fn read_in(&self, dir: &str, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.root.join(checked_name(dir)?).join(checked_name(name)?);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    /// Removes a file of the subdirectory `dir`; answers whether there was one.
    pub fn remove_in(&self, dir: &str, name: &str) -> Result<bool, StateError> {
        let path = self.root.join(checked_name(dir)?).join(checked_name(name)?);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }

    /// The names of the files in the subdirectory `dir` (none if it does not exist), without
    /// temporary files.
    pub fn list_in(&self, dir: &str) -> Result<Vec<String>, StateError> {
        let path = self.root.join(checked_name(dir)?);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error("list", &path)(error)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The key the proxy signs its cookies with: 32 random bytes, made at the first call and
    /// kept as the secret `cookie-key`, so that sessions survive a restart. A file of another
    /// length (damaged) is replaced, which only ends the sessions signed with it.
    pub fn cookie_key(&self) -> Result<[u8; 32], StateError> {
        if let Some(bytes) = self.read_secret(COOKIE_KEY)?
            && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            return Ok(key);
        }
        let key = crate::proxy::access::cookies::random_bytes();
        self.write_secret(COOKIE_KEY, &key)?;
        Ok(key)
    }

    fn secret_path(&self, name: &str) -> Result<PathBuf, StateError> {
        Ok(self.root.join("secrets").join(checked_name(name)?))
    }
}

/// A file name that stays inside its directory and is not a temporary file's.
fn checked_name(name: &str) -> Result<&str, StateError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid { Ok(name) } else { Err(StateError::SecretName(name.to_owned())) }
}

/// Exclusive use of a state directory; released when dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
}

/// The bytes `save` writes, to let callers skip writing what did not change.
pub fn serialize(state: &PersistedState) -> Vec<u8> {
    // The state holds only strings, numbers and maps keyed by ids, which always serialize.
    serde_json::to_vec_pretty(state).unwrap_or_else(|error| {
        tracing::error!(%error, "could not serialize the agent state");
        Vec::new()
    })
}

/// Replaces `path` with `bytes` so that readers see the old or the new content, never a mix.
/// The file is private (0600) from its creation on.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = dir.join(format!(".{file_name}.tmp"));
    // A temporary file left by a crash may have other permissions; start from scratch.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("remove", &temporary)(error)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io_error("create", &temporary))?;
    file.write_all(bytes).map_err(io_error("write", &temporary))?;
    file.sync_all().map_err(io_error("sync", &temporary))?;
    drop(file);
    fs::rename(&temporary, path).map_err(io_error("rename into", path))?;
    // The rename is durable only once the directory is synced.
    fs::File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_error("sync", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::DesiredUpdate;
    use crate::reconcile::plan::tests::application;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("exists").permissions().mode() & 0o777
    }

    #[test]
    fn state_round_trips_and_is_private() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path().join("agent")).expect("open");
        assert_eq!(dir.load().expect("load"), PersistedState::default(), "a fresh directory has a default state");

        let web = application("web", 3, "serve");
        let mut state = PersistedState::default();
        state.desired.apply(DesiredUpdate::full(3, vec![web.clone()]));
        state.applied_revision = Some(3);
        state.workloads.insert(
            web.id,
            WorkloadRecord {
                launch: crate::driver::LaunchSpec::from_application(&web),
                revision: 3,
                handle: WorkloadHandle::Process { pid: 42, start_time: 4242 },
            },
        );
        dir.save(&state).expect("save");
        assert_eq!(dir.load().expect("load"), state);
        assert_eq!(mode(dir.root()), 0o700);
        assert_eq!(mode(&dir.root().join(STATE_FILE)), 0o600);
        let leftovers: Vec<_> =
            fs::read_dir(dir.root()).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
        assert_eq!(leftovers, [std::ffi::OsString::from(STATE_FILE)], "no temporary file is left behind");
    }

    #[test]
    fn a_stale_temporary_file_with_loose_permissions_is_replaced() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        let temporary = dir.root().join(".state.json.tmp");
        fs::write(&temporary, b"half written").expect("write");
        fs::set_permissions(&temporary, fs::Permissions::from_mode(0o644)).expect("chmod");
        dir.save(&PersistedState::default()).expect("save");
        assert_eq!(mode(&dir.root().join(STATE_FILE)), 0o600);
        assert!(!temporary.exists());
    }

    #[test]
    fn corrupt_and_future_state_files_are_named_errors() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        fs::write(dir.root().join(STATE_FILE), b"{not json").expect("write");
        assert!(matches!(dir.load(), Err(StateError::Corrupt { .. })));
        fs::write(dir.root().join(STATE_FILE), br#"{"format": 99}"#).expect("write");
        assert!(matches!(dir.load(), Err(StateError::Format { found: 99, .. })));
    }

    #[test]
    fn one_agent_at_a_time_holds_the_directory() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        let lock = dir.lock().expect("the first lock");
        assert!(matches!(dir.lock(), Err(StateError::Locked(_))));
        drop(lock);
        dir.lock().expect("free again");
    }

    #[test]
    fn the_cookie_key_is_made_once_privately_and_a_damaged_one_replaced() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        let key = dir.cookie_key().expect("made");
        assert_eq!(mode(&dir.root().join("secrets").join(COOKIE_KEY)), 0o600);
        assert_eq!(dir.cookie_key().expect("read back"), key);
        assert_eq!(StateDir::open(temp.path()).expect("reopen").cookie_key().expect("read back"), key);
        assert_ne!(key, [0u8; 32]);
        dir.write_secret(COOKIE_KEY, b"short").expect("damage");
        let replaced = dir.cookie_key().expect("replaced");
        assert_ne!(replaced, key);
        assert_eq!(dir.cookie_key().expect("read back"), replaced);
    }

    #[test]
    fn secrets_are_private_and_names_cannot_escape() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        assert_eq!(dir.read_secret("device-key").expect("read"), None);
        let path = dir.write_secret("device-key", b"s3cret").expect("write");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.root().join("secrets")), 0o700);
        assert_eq!(dir.read_secret("device-key").expect("read").as_deref(), Some(&b"s3cret"[..]));
        dir.write_secret("device-key", b"rotated").expect("overwrite");
        assert_eq!(dir.read_secret("device-key").expect("read").as_deref(), Some(&b"rotated"[..]));
        for bad in ["", "../state.json", "a/b", ".hidden"] {
            assert!(matches!(dir.write_secret(bad, b"x"), Err(StateError::SecretName(_))), "{bad:?}");
        }
    }

    #[test]
    fn files_in_subdirectories_are_private_listed_and_removed() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        assert_eq!(dir.list_in("certs").expect("list"), Vec::<String>::new());
        let path = dir.write_in("certs", "a.key", b"key").expect("write");
        dir.write_in("certs", "a.pem", b"pem").expect("write");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.root().join("certs")), 0o700);
        assert_eq!(dir.read_in("certs", "a.key").expect("read").as_deref(), Some(&b"key"[..]));
        assert_eq!(dir.list_in("certs").expect("list"), ["a.key", "a.pem"]);
        assert!(dir.remove_in("certs", "a.key").expect("remove"));
        assert!(!dir.remove_in("certs", "a.key").expect("remove again"));
        assert_eq!(dir.read_in("certs", "a.key").expect("read"), None);
        assert!(matches!(dir.write_in("..", "x", b"x"), Err(StateError::SecretName(_))));
        assert!(matches!(dir.write_in("certs", "../x", b"x"), Err(StateError::SecretName(_))));
    }

    #[test]
    fn plain_files_are_written_atomically_and_privately() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("open");
        assert_eq!(dir.read_file("identity.json").expect("read"), None);
        let path = dir.write_file("identity.json", b"{}").expect("write");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(dir.read_file("identity.json").expect("read").as_deref(), Some(&b"{}"[..]));
        assert!(matches!(dir.write_file("../escape", b"x"), Err(StateError::SecretName(_))));
    }
}
