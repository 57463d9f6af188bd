//! Where the CLI finds its server and key: the file `edgible login` writes, overridden by the
//! environment. The environment is read through [`Env`] so that tests inject it instead of
//! mutating the process environment.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The directory holding `config.json`, instead of `<user config dir>/edgible`.
pub const CONFIG_DIR_ENV: &str = "EDGIBLE_CONFIG_DIR";
/// The server URL, overriding the saved one.
pub const ENDPOINT_ENV: &str = "EDGIBLE_ENDPOINT";
/// The API key secret, overriding the saved one (and the key `edgible login` saves).
pub const API_KEY_ENV: &str = "EDGIBLE_API_KEY";

const CONFIG_FILE: &str = "config.json";

/// A source of environment variables.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        // An unset, empty or non-UTF-8 variable counts as absent, so `EDGIBLE_API_KEY=` does
        // not log the user out by accident.
        std::env::var(name).ok().filter(|value| !value.trim().is_empty())
    }
}

/// What `edgible login` saves: the server and the key to talk to it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The server's base URL (`https://edgible.example.com`).
    pub endpoint: String,
    /// The API key's secret.
    pub api_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not logged in: run `edgible login --server URL` first (or set {ENDPOINT_ENV} and {API_KEY_ENV})")]
    NotLoggedIn,
    #[error("cannot find the user's configuration directory: set {CONFIG_DIR_ENV}")]
    NoConfigDir,
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not a valid edgible configuration: {source}; run `edgible login` again", path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// The path of the configuration file.
pub fn path(env: &impl Env) -> Result<PathBuf, ConfigError> {
    let dir = match env.var(CONFIG_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => dirs::config_dir().ok_or(ConfigError::NoConfigDir)?.join("edgible"),
    };
    Ok(dir.join(CONFIG_FILE))
}

/// The saved configuration, if there is one.
pub fn read(path: &Path) -> Result<Option<Config>, ConfigError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
    };
    serde_json::from_slice(&text).map(Some).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
}

/// The server and key to use: each from the environment when set there, else from the file.
pub fn load(env: &impl Env) -> Result<Config, ConfigError> {
    let (endpoint, api_key) = (env.var(ENDPOINT_ENV), env.var(API_KEY_ENV));
    if let (Some(endpoint), Some(api_key)) = (&endpoint, &api_key) {
        return Ok(Config { endpoint: endpoint.clone(), api_key: api_key.clone() });
    }
    let saved = read(&path(env)?)?.ok_or(ConfigError::NotLoggedIn)?;
    Ok(Config { endpoint: endpoint.unwrap_or(saved.endpoint), api_key: api_key.unwrap_or(saved.api_key) })
}

/// Saves the configuration readable by its owner only, replacing the file atomically so that a
/// crash never leaves half a key behind.
pub fn save(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let write_error = |source| ConfigError::Write { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        create_private_dir(dir).map_err(write_error)?;
    }
    let temporary = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec_pretty(config).map_err(|error| write_error(std::io::Error::other(error)))?;
    text.push(b'\n');
    let mut file = private_file(&temporary).map_err(write_error)?;
    file.write_all(&text).and_then(|()| file.sync_all()).map_err(write_error)?;
    drop(file);
    fs::rename(&temporary, path).map_err(write_error)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)
}

#[cfg(unix)]
fn private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // `mode` only applies to a new file; a leftover temporary file keeps its old mode otherwise.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::File::create(path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env_with_dir(dir: &Path) -> BTreeMap<&'static str, String> {
        BTreeMap::from([(CONFIG_DIR_ENV, dir.display().to_string())])
    }

    impl Env for BTreeMap<&str, String> {
        fn var(&self, name: &str) -> Option<String> {
            self.get(name).cloned()
        }
    }

    #[test]
    fn a_saved_config_is_private_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_with_dir(&dir.path().join("nested"));
        let path = path(&env).unwrap();
        let config = Config { endpoint: "http://127.0.0.1:1".into(), api_key: "edg_secret".into() };
        save(&path, &config).unwrap();
        assert_eq!(load(&env).unwrap(), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = env_with_dir(dir.path());
        save(&path(&env).unwrap(), &Config { endpoint: "http://saved".into(), api_key: "saved".into() }).unwrap();
        env.insert(API_KEY_ENV, "from-env".into());
        assert_eq!(load(&env).unwrap(), Config { endpoint: "http://saved".into(), api_key: "from-env".into() });
    }

    #[test]
    fn without_a_file_or_environment_the_user_is_told_to_log_in() {
        let dir = tempfile::tempdir().unwrap();
        let error = load(&env_with_dir(dir.path())).unwrap_err();
        assert!(error.to_string().contains("edgible login"), "{error}");

        let env = BTreeMap::from([(ENDPOINT_ENV, "http://x".to_owned()), (API_KEY_ENV, "k".to_owned())]);
        assert_eq!(load(&env).unwrap().api_key, "k");
    }
}
