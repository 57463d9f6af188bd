//! The server's side of access policies (issue 7): it signs login assertions, keeps the keys
//! that verify them, and tells each device what its proxy needs to enforce the policies of the
//! applications placed on it. Devices enforce; the server only vouches.
//!
//! - Assertion keys: Ed25519 (`edgible::access::AssertionSigner`), in `assertion_keys`. The
//!   first server on a database creates one. With `--server-key-file` the PKCS#8 document is
//!   sealed with the server key (`certs::sealed`); without it, it is stored **unsealed** (base64),
//!   like the internal CA's key: whoever reads the database can then sign assertions. `POST
//!   /v1/assertion-keys/rotate` makes a new key current; retired keys stay published for
//!   [`KEY_GRACE`] (twice the longest assertion lifetime a device accepts), so an assertion
//!   signed just before a rotation still verifies.
//! - The push ([`access_message`]): the login URL, the published keys (current first), the
//!   device session lifetime and, per placed application with an `api_key` or `short_code`
//!   policy, digests of its secrets (`Db::device_access`). Every write that changes any of it
//!   wakes the devices concerned; the session resends the message only when it changed.
//! - Passwords ([`hash_password`], [`verify_password`]): argon2id PHC strings on the user.
//! - [`pages`]: the login pages (`/login`, `/logout`) and [`limiter`], their rate limit.

pub mod limiter;
pub mod pages;

use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, TimeDelta, Utc};
use edgible::access::{AssertionKey, AssertionSigner, MAX_ASSERTION_LIFETIME_SECONDS};
use edgible::model::DeviceId;
use edgible::protocol::v1::ServerMessage;

use crate::certs::sealed::{SealError, ServerKey};
use crate::db::{Db, StoreError, StoredAssertionKey};

/// How long an assertion the login page signs is valid: it only has to survive one redirect.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a retired assertion key stays published to devices.
pub const KEY_GRACE: Duration = Duration::from_secs(2 * MAX_ASSERTION_LIFETIME_SECONDS as u64);
/// The default lifetime of a device's login session (`--access-session-ttl`).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(300);
/// How long a login on the server's login pages lasts.
pub const LOGIN_SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// How access policies are configured.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// The base URL of the login pages, without a trailing slash (`--public-url`).
    pub public_url: String,
    /// How long a device's login session lasts (`--access-session-ttl`).
    pub session_ttl: Duration,
    /// Seals assertion keys at rest, when configured (`--server-key-file`).
    pub server_key: Option<ServerKey>,
}

impl Default for AccessSettings {
    fn default() -> Self {
        Self { public_url: "http://127.0.0.1:7070".into(), session_ttl: DEFAULT_SESSION_TTL, server_key: None }
    }
}

impl AccessSettings {
    /// Settings with this public URL (a trailing slash is dropped).
    pub fn new(public_url: &str, session_ttl: Duration, server_key: Option<ServerKey>) -> Self {
        Self { public_url: public_url.trim_end_matches('/').to_owned(), session_ttl, server_key }
    }

    /// Whether the login pages are served over HTTPS, so that their cookie is `Secure`.
    pub fn https(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

/// Why an access operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot make an assertion key: {0}")]
    Key(String),
    #[error("assertion key {kid} is sealed, but no --server-key-file is configured")]
    NoServerKey { kid: String },
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("cannot hash the password: {0}")]
    Password(String),
}

fn seal_purpose(kid: &str) -> String {
    format!("edgible assertion key {kid}")
}

/// A new key pair as it is stored: sealed with the server key if there is one.
pub fn new_stored_key(settings: &AccessSettings) -> Result<StoredAssertionKey, AccessError> {
    let kid = crate::secrets::random_id();
    let pkcs8 = AssertionSigner::generate_pkcs8().map_err(|e| AccessError::Key(e.to_string()))?;
    let (pkcs8, sealed) = match &settings.server_key {
        Some(key) => (key.seal(&pkcs8, &seal_purpose(&kid))?, true),
        None => (STANDARD.encode(&pkcs8), false),
    };
    Ok(StoredAssertionKey { kid, pkcs8, sealed, created_at: Utc::now(), retired_at: None })
}

/// The signer of a stored key.
fn signer_of(key: &StoredAssertionKey, settings: &AccessSettings) -> Result<AssertionSigner, AccessError> {
    let pkcs8 = if key.sealed {
        let server_key =
            settings.server_key.as_ref().ok_or_else(|| AccessError::NoServerKey { kid: key.kid.clone() })?;
        server_key.open(&key.pkcs8, &seal_purpose(&key.kid))?
    } else {
        STANDARD.decode(&key.pkcs8).map_err(|e| AccessError::Key(format!("stored key {}: {e}", key.kid)))?
    };
    AssertionSigner::from_pkcs8(key.kid.clone(), &pkcs8).map_err(|e| AccessError::Key(e.to_string()))
}

/// Creates the first assertion key if the database has none; run at startup. Warns when the
/// key is stored unsealed.
pub async fn ensure_key(db: &Db, settings: &AccessSettings) -> Result<(), AccessError> {
    db.ensure_assertion_key(|| new_stored_key(settings)).await?;
    if settings.server_key.is_none() {
        tracing::warn!(
            "assertion signing keys are stored unsealed in the database; configure --server-key-file to seal them"
        );
    }
    Ok(())
}

/// Makes a new assertion key current; the previous ones stay published for [`KEY_GRACE`].
pub async fn rotate_key(db: &Db, settings: &AccessSettings) -> Result<String, AccessError> {
    let key = new_stored_key(settings)?;
    let kid = key.kid.clone();
    db.rotate_assertion_key(key).await?;
    tracing::info!(%kid, "rotated the assertion signing key");
    Ok(kid)
}

/// The published keys at `now`, current first, creating the first key if there is none.
async fn stored_keys(
    db: &Db,
    settings: &AccessSettings,
    now: DateTime<Utc>,
) -> Result<Vec<StoredAssertionKey>, AccessError> {
    let retired_after = now - TimeDelta::from_std(KEY_GRACE).unwrap_or(TimeDelta::MAX);
    let keys = db.assertion_keys(retired_after).await?;
    if keys.first().is_some_and(|key| key.retired_at.is_none()) {
        return Ok(keys);
    }
    db.ensure_assertion_key(|| new_stored_key(settings)).await?;
    Ok(db.assertion_keys(retired_after).await?)
}

/// The signer of the current key.
pub async fn current_signer(db: &Db, settings: &AccessSettings) -> Result<AssertionSigner, AccessError> {
    let keys = stored_keys(db, settings, Utc::now()).await?;
    let current = keys.first().ok_or_else(|| AccessError::Key("no current assertion key".into()))?;
    signer_of(current, settings)
}

/// The public keys devices verify assertions with, current first.
pub async fn published_keys(
    db: &Db,
    settings: &AccessSettings,
    now: DateTime<Utc>,
) -> Result<Vec<AssertionKey>, AccessError> {
    Ok(published(db, settings, now).await?.0)
}

/// The published keys, and when the first retired one among them stops being published.
async fn published(
    db: &Db,
    settings: &AccessSettings,
    now: DateTime<Utc>,
) -> Result<(Vec<AssertionKey>, Option<DateTime<Utc>>), AccessError> {
    let grace = TimeDelta::from_std(KEY_GRACE).unwrap_or(TimeDelta::MAX);
    let mut published = Vec::new();
    let mut unpublished_at: Option<DateTime<Utc>> = None;
    for key in stored_keys(db, settings, now).await? {
        if let Some(retired_at) = key.retired_at {
            let end = retired_at + grace;
            unpublished_at = Some(unpublished_at.map_or(end, |earliest| earliest.min(end)));
        }
        match signer_of(&key, settings) {
            Ok(signer) => published.push(signer.public_key()),
            // A retired key that cannot be opened is left out; the current one must work.
            Err(error) if key.retired_at.is_some() => {
                tracing::warn!(kid = %key.kid, %error, "leaving out a retired assertion key");
            }
            Err(error) => return Err(error),
        }
    }
    Ok((published, unpublished_at))
}

/// A device's `access` message and when it changes by itself (a retired key's grace period
/// ends, a pushed key or code expires), so that its session resends it then.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessPush {
    pub message: ServerMessage,
    pub changes_at: Option<DateTime<Utc>>,
}

/// The whole `access` message for a device.
pub async fn access_message(
    db: &Db,
    settings: &AccessSettings,
    device_id: DeviceId,
) -> Result<AccessPush, AccessError> {
    let now = Utc::now();
    let (assertion_keys, unpublished_at) = published(db, settings, now).await?;
    let applications = db.device_access(device_id, now).await?;
    let expiries = applications.iter().flat_map(|application| {
        let keys = application.api_keys.iter().filter_map(|key| key.expires_at);
        keys.chain(application.short_code.iter().filter_map(|code| code.expires_at))
    });
    let changes_at = expiries.chain(unpublished_at).filter(|at| *at > now).min();
    Ok(AccessPush {
        message: ServerMessage::Access {
            login_url: settings.public_url.clone(),
            assertion_keys,
            session_ttl_seconds: settings.session_ttl.as_secs(),
            applications,
        },
        changes_at,
    })
}

/// The argon2id hash of a password, as a PHC string. CPU-heavy: call off the async threads.
pub fn hash_password(password: &str) -> Result<String, AccessError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AccessError::Password(e.to_string()))
}

/// Whether `password` matches a stored hash; `None` (no password set) still costs one hash,
/// so that timing does not tell which e-mail addresses have a password.
pub fn verify_password(stored: Option<&str>, password: &str) -> bool {
    static DUMMY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("a password nobody has").ok());
    let (hash, real) = match stored {
        Some(hash) => (Some(hash), true),
        None => (dummy.as_deref(), false),
    };
    let Some(parsed) = hash.and_then(|hash| PasswordHash::new(hash).ok()) else {
        return false;
    };
    Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok() && real
}

/// Refuses passwords that satisfy the length rule but are trivially guessable; the message
/// is for the admin setting it.
pub fn check_password_strength(password: &str) -> Result<(), &'static str> {
    let distinct: std::collections::BTreeSet<char> = password.chars().collect();
    if distinct.len() < 4 {
        return Err("is too weak: use at least 4 different characters");
    }
    let lowered = password.to_lowercase();
    const COMMON: [&str; 6] = ["password", "1234567890", "qwertyuiop", "letmein", "welcome", "abcdefghij"];
    if COMMON.iter().any(|common| lowered.contains(common)) {
        return Err("is too weak: it contains a common password");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(Some(&hash), "correct horse battery"));
        assert!(!verify_password(Some(&hash), "correct horse battery!"));
        assert!(!verify_password(None, "a password nobody has"), "no password set never matches");
        assert!(!verify_password(Some("not a hash"), "x"));
    }

    #[test]
    fn weak_passwords_are_refused() {
        assert!(check_password_strength("aaaaaaaaaaaa").is_err());
        assert!(check_password_strength("MyPassword99").is_err());
        assert!(check_password_strength("tr0ub4dor&3x").is_ok());
    }

    #[test]
    fn keys_are_sealed_with_a_server_key_and_plain_without() {
        let (server_key, _) = ServerKey::generate();
        let sealed_settings = AccessSettings::new("https://login.example.test/", DEFAULT_SESSION_TTL, Some(server_key));
        assert_eq!(sealed_settings.public_url, "https://login.example.test");
        assert!(sealed_settings.https());
        let sealed = new_stored_key(&sealed_settings).expect("key");
        assert!(sealed.sealed);
        let signer = signer_of(&sealed, &sealed_settings).expect("opens with the server key");
        assert_eq!(signer.kid(), sealed.kid);
        let without = AccessSettings::default();
        assert!(matches!(signer_of(&sealed, &without), Err(AccessError::NoServerKey { .. })));
        let (other_key, _) = ServerKey::generate();
        let other = AccessSettings { server_key: Some(other_key), ..AccessSettings::default() };
        assert!(matches!(signer_of(&sealed, &other), Err(AccessError::Seal(_))));

        let plain = new_stored_key(&without).expect("key");
        assert!(!plain.sealed);
        assert!(signer_of(&plain, &without).is_ok());
    }
}
