//! The first organization of a new installation and its `platform` key, which is the only
//! way to get a key without already having one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use edgible::model::{Name, OrganizationCreated};

use crate::db::{Db, StoreError};
use crate::secrets::NewSecret;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("the database already holds organizations; bootstrap only runs on an empty database")]
    NotEmpty,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates organization `name` with a `platform` key, or fails with
/// [`BootstrapError::NotEmpty`] if any organization exists.
pub async fn bootstrap(db: &Db, name: &Name) -> Result<OrganizationCreated, BootstrapError> {
    db.bootstrap(name, &NewSecret::api_key()).await?.ok_or(BootstrapError::NotEmpty)
}

/// Bootstraps an empty database and writes the key's secret to `key_file` (mode 0600).
/// Returns whether it did; on a database that already holds organizations it leaves the file
/// alone, so restarting a bootstrapped server is harmless.
pub async fn bootstrap_if_empty(db: &Db, name: &Name, key_file: &Path) -> Result<bool, BootstrapError> {
    match bootstrap(db, name).await {
        Ok(created) => {
            write_secret(key_file, &created.admin_key.secret)
                .map_err(|source| BootstrapError::KeyFile { path: key_file.to_owned(), source })?;
            tracing::info!(organization = %name, key_file = %key_file.display(), "bootstrapped an empty database");
            Ok(true)
        }
        Err(BootstrapError::NotEmpty) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Writes `secret` to `path` readable by the owner only. The file is written beside its final
/// name and renamed, so a reader never sees half a secret.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let temporary = crate::serve::temporary_path(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary)?;
    #[cfg(unix)]
    std::fs::set_permissions(&temporary, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}
