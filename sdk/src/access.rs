//! The shared pieces of access policies (issue 7): the login assertion the server signs and the
//! device's proxy verifies, and the digests both sides compare secrets by. Pure: no IO, no
//! clock (callers pass `now`), so every rule here is unit tested.
//!
//! An assertion travels in a URL, so it is compact text:
//! `v1.<kid>.<base64url(JSON claims)>.<base64url(Ed25519 signature)>`, the signature covering
//! everything before the last dot. The key id names which of the server's keys signed it;
//! devices hold every published key, so keys can be rotated without a gap.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{ApplicationId, Hostname, OrganizationId, Role, UserId};

/// The format tag every assertion starts with.
const VERSION: &str = "v1";
/// The longest lifetime a device accepts for an assertion, whatever it claims: it only has to
/// survive one redirect.
pub const MAX_ASSERTION_LIFETIME_SECONDS: i64 = 300;
/// How far a device's clock may be behind the server's.
pub const CLOCK_SKEW_SECONDS: i64 = 30;
/// An upper bound on an assertion's length, so a hostile one is refused before any decoding.
pub const MAX_ASSERTION_BYTES: usize = 4096;

/// Who logged in, for which hostname, answering which `state`: what the server vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// The server's login URL.
    pub iss: String,
    /// The hostname the assertion is for; any other hostname refuses it.
    pub aud: Hostname,
    /// The user.
    pub sub: UserId,
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub organization_id: OrganizationId,
    pub role: Role,
    /// The `state` the device put in the redirect to the login page, echoed.
    pub state: String,
    /// Issued at and expires at, Unix seconds.
    pub iat: i64,
    pub exp: i64,
    /// Unique per assertion, so a device can refuse one it has seen.
    pub jti: String,
}

/// A public key devices verify assertions with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionKey {
    pub kid: String,
    /// The raw 32-byte Ed25519 public key, base64url without padding.
    pub public_key: String,
}

/// Why an assertion was refused. The messages are safe to show to the visitor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the sign-in answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("the sign-in answer is signed with a key this device does not know")]
    UnknownKey,
    #[error("the sign-in answer's signature is wrong")]
    BadSignature,
    #[error("the sign-in answer is for another site")]
    WrongAudience,
    #[error("the sign-in answer has expired")]
    Expired,
    #[error("the sign-in answer is not valid yet")]
    NotYetValid,
    #[error("the sign-in answer claims too long a lifetime")]
    TooLong,
    #[error("the sign-in answer belongs to another sign-in attempt")]
    StateMismatch,
}

/// The server's signing half: an Ed25519 key pair and its key id.
pub struct AssertionSigner {
    kid: String,
    key_pair: Ed25519KeyPair,
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// A key pair could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Ed25519 key pair: {0}")]
pub struct KeyError(String);

impl AssertionSigner {
    /// A new key pair, as the PKCS#8 document to store.
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|document| document.as_ref().to_vec())
            .map_err(|e| KeyError(e.to_string()))
    }

    /// The signer for a stored PKCS#8 document.
    pub fn from_pkcs8(kid: impl Into<String>, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key_pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| KeyError(e.to_string()))?;
        Ok(Self { kid: kid.into(), key_pair })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, as published to devices.
    pub fn public_key(&self) -> AssertionKey {
        AssertionKey { kid: self.kid.clone(), public_key: URL_SAFE_NO_PAD.encode(self.key_pair.public_key().as_ref()) }
    }

    /// The assertion as the text to put in the callback URL.
    pub fn sign(&self, assertion: &Assertion) -> String {
        // Serializing a struct of strings and numbers cannot fail.
        let claims = serde_json::to_vec(assertion).unwrap_or_default();
        let signed = format!("{VERSION}.{}.{}", self.kid, URL_SAFE_NO_PAD.encode(claims));
        let signature = self.key_pair.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

/// What a device checks an assertion against.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The hostname the request came for.
    pub audience: &'a Hostname,
    /// The state the device issued (and the visitor's browser carried back).
    pub state: &'a str,
    pub now: DateTime<Utc>,
}

/// Checks an assertion's format, key, signature, audience, lifetime and state, in that order.
/// Replay (the same `jti` twice) is for the caller to refuse: it needs memory of what it saw.
pub fn verify(token: &str, keys: &[AssertionKey], expected: Expected<'_>) -> Result<Assertion, AssertionError> {
    if token.len() > MAX_ASSERTION_BYTES {
        return Err(AssertionError::Malformed("too long"));
    }
    let (signed, signature) = token.rsplit_once('.').ok_or(AssertionError::Malformed("no signature"))?;
    let mut parts = signed.split('.');
    let (Some(version), Some(kid), Some(claims), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AssertionError::Malformed("wrong number of parts"));
    };
    if version != VERSION {
        return Err(AssertionError::Malformed("unknown version"));
    }
    let key = keys.iter().find(|key| key.kid == kid).ok_or(AssertionError::UnknownKey)?;
    let public_key = URL_SAFE_NO_PAD.decode(&key.public_key).map_err(|_| AssertionError::UnknownKey)?;
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| AssertionError::Malformed("signature encoding"))?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| AssertionError::BadSignature)?;
    let claims = URL_SAFE_NO_PAD.decode(claims).map_err(|_| AssertionError::Malformed("claims encoding"))?;
    let assertion: Assertion = serde_json::from_slice(&claims).map_err(|_| AssertionError::Malformed("claims"))?;
    if &assertion.aud != expected.audience {
        return Err(AssertionError::WrongAudience);
    }
    let now = expected.now.timestamp();
    if assertion.exp - assertion.iat > MAX_ASSERTION_LIFETIME_SECONDS {
        return Err(AssertionError::TooLong);
    }
    if assertion.iat > now + CLOCK_SKEW_SECONDS {
        return Err(AssertionError::NotYetValid);
    }
    if assertion.exp <= now - CLOCK_SKEW_SECONDS {
        return Err(AssertionError::Expired);
    }
    if !digest_eq(&sha256_hex(&assertion.state), &sha256_hex(expected.state)) {
        return Err(AssertionError::StateMismatch);
    }
    Ok(assertion)
}

/// Hex SHA-256 of a secret: how API key secrets are stored by the server, pushed to devices
/// and looked up by the device's proxy.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The digest of an application's short code, salted with the application so that equal
/// codes of two applications have different digests.
pub fn short_code_digest(application_id: ApplicationId, code: &str) -> String {
    sha256_hex(&format!("edgible-short-code:{application_id}:{code}"))
}

/// Compares two digests without an early exit, so timing tells nothing of how much matched.
pub fn digest_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |difference, (x, y)| difference | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn signer(kid: &str) -> AssertionSigner {
        AssertionSigner::from_pkcs8(kid, &AssertionSigner::generate_pkcs8().expect("generate")).expect("read back")
    }

    fn host(name: &str) -> Hostname {
        name.parse().expect("hostname")
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).single().expect("time")
    }

    fn assertion() -> Assertion {
        Assertion {
            iss: "https://login.example.test".into(),
            aud: host("app.example.test"),
            sub: UserId::new(),
            email: "ada@example.test".into(),
            name: Some("Ada".into()),
            organization_id: OrganizationId::new(),
            role: Role::Member,
            state: "state-123".into(),
            iat: now().timestamp(),
            exp: now().timestamp() + 60,
            jti: "jti-1".into(),
        }
    }

    fn check(token: &str, keys: &[AssertionKey]) -> Result<Assertion, AssertionError> {
        verify(token, keys, Expected { audience: &host("app.example.test"), state: "state-123", now: now() })
    }

    #[test]
    fn a_signed_assertion_verifies_with_the_published_key() {
        let signer = signer("k1");
        let claims = assertion();
        assert_eq!(check(&signer.sign(&claims), &[signer.public_key()]), Ok(claims));
    }

    #[test]
    fn rotation_keeps_old_assertions_valid_while_the_old_key_is_published() {
        let (old, new) = (signer("k1"), signer("k2"));
        let keys = [new.public_key(), old.public_key()];
        assert!(check(&old.sign(&assertion()), &keys).is_ok());
        assert!(check(&new.sign(&assertion()), &keys).is_ok());
        assert_eq!(check(&old.sign(&assertion()), &[new.public_key()]), Err(AssertionError::UnknownKey));
    }

    #[test]
    fn another_keys_signature_is_refused() {
        let (real, forger) = (signer("k1"), signer("k1"));
        assert_eq!(check(&forger.sign(&assertion()), &[real.public_key()]), Err(AssertionError::BadSignature));
    }

    #[test]
    fn tampered_claims_are_refused() {
        let signer = signer("k1");
        let token = signer.sign(&assertion());
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut claims = assertion();
        claims.role = Role::Owner;
        let forged_claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
        parts[2] = &forged_claims;
        assert_eq!(check(&parts.join("."), &[signer.public_key()]), Err(AssertionError::BadSignature));
    }

    #[test]
    fn wrong_audience_expiry_lifetime_and_state_are_refused() {
        let signer = signer("k1");
        let keys = [signer.public_key()];
        let mut other_host = assertion();
        other_host.aud = host("evil.example.test");
        assert_eq!(check(&signer.sign(&other_host), &keys), Err(AssertionError::WrongAudience));

        let mut expired = assertion();
        expired.iat -= 200;
        expired.exp = now().timestamp() - CLOCK_SKEW_SECONDS;
        assert_eq!(check(&signer.sign(&expired), &keys), Err(AssertionError::Expired));

        let mut future = assertion();
        future.iat += 120;
        future.exp += 120;
        assert_eq!(check(&signer.sign(&future), &keys), Err(AssertionError::NotYetValid));

        let mut long = assertion();
        long.exp = long.iat + MAX_ASSERTION_LIFETIME_SECONDS + 1;
        assert_eq!(check(&signer.sign(&long), &keys), Err(AssertionError::TooLong));

        let mut other_state = assertion();
        other_state.state = "state-456".into();
        assert_eq!(check(&signer.sign(&other_state), &keys), Err(AssertionError::StateMismatch));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let keys = [signer("k1").public_key()];
        for token in ["", ".", "v1.k1.x", "v2.k1.e30.AA", "v1.k1.!!!.AA", "v1.k1.e30.!!!", &"a".repeat(5000)] {
            assert!(check(token, &keys).is_err(), "{token:?} was accepted");
        }
    }

    #[test]
    fn digests_compare_by_value() {
        let application = ApplicationId::new();
        assert!(digest_eq(&short_code_digest(application, "abc123"), &short_code_digest(application, "abc123")));
        assert!(!digest_eq(&short_code_digest(application, "abc123"), &short_code_digest(application, "abc124")));
        assert_ne!(short_code_digest(application, "abc123"), short_code_digest(ApplicationId::new(), "abc123"));
        assert!(!digest_eq("ab", "abc"));
        assert_eq!(sha256_hex("edg_x").len(), 64);
    }
}
