//! Secrets the server hands out once (API keys, enrollment tokens) and the hashes it keeps of
//! them. A secret has 256 random bits, so one unsalted SHA-256 is enough to store it: there is
//! nothing to guess, and lookups by hash stay a single indexed query.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// How API key secrets start, so that they are recognizable in logs and secret scanners.
pub const API_KEY_PREFIX: &str = "edg_";
/// How device enrollment tokens start.
pub const ENROLLMENT_TOKEN_PREFIX: &str = "edgenr_";
/// How device credentials start.
pub const DEVICE_CREDENTIAL_PREFIX: &str = "edgdev_";
/// How edge enrollment tokens start. The same prefix as devices': both are one-time
/// enrollment tokens, looked up in their own table.
pub const EDGE_ENROLLMENT_TOKEN_PREFIX: &str = "edgenr_";
/// How edge credentials start.
pub const EDGE_CREDENTIAL_PREFIX: &str = "edgedge_";
/// How application keys (`/v1/applications/{id}/keys`) start.
pub const APPLICATION_KEY_PREFIX: &str = "edgak_";
/// How the secrets of login sessions (the `edgible_login` cookie) start.
pub const LOGIN_SESSION_PREFIX: &str = "edglogin_";
/// How many characters of a key's secret are kept in clear to tell keys apart.
const VISIBLE_PREFIX_CHARS: usize = 12;

/// A freshly generated secret: the text to show once, and what is stored.
#[derive(Clone)]
pub struct NewSecret {
    /// The full secret; never stored, never logged.
    pub secret: String,
    /// Hex SHA-256 of `secret`.
    pub sha256: String,
    /// The first characters of `secret`, safe to show later.
    pub prefix: String,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl NewSecret {
    /// A new API key secret.
    pub fn api_key() -> Self {
        Self::generate(API_KEY_PREFIX)
    }

    /// A new device enrollment token.
    pub fn enrollment_token() -> Self {
        Self::generate(ENROLLMENT_TOKEN_PREFIX)
    }

    /// A new device credential, issued at enrollment.
    pub fn device_credential() -> Self {
        Self::generate(DEVICE_CREDENTIAL_PREFIX)
    }

    /// A new edge enrollment token.
    pub fn edge_enrollment_token() -> Self {
        Self::generate(EDGE_ENROLLMENT_TOKEN_PREFIX)
    }

    /// A new edge credential, issued at enrollment.
    pub fn edge_credential() -> Self {
        Self::generate(EDGE_CREDENTIAL_PREFIX)
    }

    /// A new application key secret.
    pub fn application_key() -> Self {
        Self::generate(APPLICATION_KEY_PREFIX)
    }

    /// A new login session secret, for the login pages' cookie.
    pub fn login_session() -> Self {
        Self::generate(LOGIN_SESSION_PREFIX)
    }

    fn generate(kind: &str) -> Self {
        let bytes: [u8; 32] = rand::rng().random();
        let secret = format!("{kind}{}", URL_SAFE_NO_PAD.encode(bytes));
        let prefix = secret.chars().take(VISIBLE_PREFIX_CHARS).collect();
        Self { sha256: sha256_hex(&secret), prefix, secret }
    }
}

/// Hex SHA-256 of a presented secret, to look it up.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// 128 random bits as URL-safe text: unique ids such as an assertion's `jti` or a key id.
pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A short code for `short_code` access policies: letters and digits, easy to type.
pub fn short_code() -> String {
    rand::rng().sample_iter(&Alphanumeric).take(10).map(char::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_prefixed_and_hashed() {
        let first = NewSecret::api_key();
        let second = NewSecret::api_key();
        assert_ne!(first.secret, second.secret);
        assert!(first.secret.starts_with(API_KEY_PREFIX));
        assert!(first.secret.starts_with(&first.prefix));
        assert_eq!(first.sha256, sha256_hex(&first.secret));
        assert_eq!(first.sha256.len(), 64);
        assert!(!format!("{first:?}").contains(&first.secret));
    }

    #[test]
    fn short_codes_satisfy_the_model_rules() {
        let code = short_code();
        assert!((6..=64).contains(&code.len()));
        assert!(code.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
