//! The proxy's signed tokens: the login `state`, the session cookie and the short-code cookie.
//!
//! A token is `base64url(JSON payload) "." base64url(HMAC-SHA256)`, compact enough for a URL
//! or a cookie. The MAC covers the token's kind as well as the payload, so a token of one kind
//! is never accepted as another; it is checked in constant time before the payload is read.
//! Every payload carries its expiry and the application it was made for: a cookie of one
//! application is worthless at another, even on the same device under the same key.
//!
//! The key ([`CookieKey`]) is 32 random bytes kept in the state directory, so sessions survive
//! an agent restart; it never leaves the device.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use edgible::model::{ApplicationId, Role, UserId};
use hmac::{Hmac, Mac};
use http::HeaderValue;
use http::header::{self, HeaderMap};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The cookie holding the nonce of a login in progress.
pub const STATE_COOKIE: &str = "__Host-edgible_state";
/// The cookie holding a signed [`Session`].
pub const SESSION_COOKIE: &str = "__Host-edgible_session";
/// The cookie holding a signed [`CodePass`].
pub const CODE_COOKIE: &str = "__Host-edgible_code";
/// The prefix of every cookie the proxy sets; the workload never sees them.
pub const COOKIE_PREFIX: &str = "__Host-edgible_";
/// How long a login may take from the redirect to the callback.
pub const STATE_LIFETIME_SECONDS: i64 = 600;
/// The longest signed token read; anything longer is refused unread.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The key every token is signed with.
#[derive(Clone)]
pub struct CookieKey([u8; 32]);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

impl CookieKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A key of fresh random bytes, for a proxy that keeps no state (tests, or a state
    /// directory that cannot hold one: sessions then end with the process).
    pub fn random() -> Self {
        Self(random_bytes())
    }

    /// `payload` as a token of `kind`.
    pub fn sign<T: Token>(&self, payload: &T) -> String {
        // A struct of strings and numbers always serializes.
        let json = serde_json::to_vec(payload).unwrap_or_default();
        let encoded = URL_SAFE_NO_PAD.encode(json);
        let tag = self.mac(T::KIND, &encoded).finalize().into_bytes();
        format!("{encoded}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The payload of a token of `T`'s kind made with this key for `application_id` and not
    /// expired at `now`.
    pub fn verify<T: Token>(
        &self,
        token: &str,
        application_id: ApplicationId,
        now: DateTime<Utc>,
    ) -> Result<T, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let (encoded, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
        // `verify_slice` compares in constant time.
        self.mac(T::KIND, encoded).verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| TokenError::Malformed)?;
        let payload: T = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if payload.application_id() != application_id {
            return Err(TokenError::OtherApplication);
        }
        if payload.expires() <= now.timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(payload)
    }

    fn mac(&self, kind: &str, encoded: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this never fails.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(b"edgible-proxy/");
        mac.update(kind.as_bytes());
        mac.update(b"/v1.");
        mac.update(encoded.as_bytes());
        mac
    }
}

/// 32 bytes from the thread's CSPRNG (seeded by the operating system).
pub fn random_bytes() -> [u8; 32] {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is wrong")]
    BadSignature,
    #[error("the token belongs to another application")]
    OtherApplication,
    #[error("the token has expired")]
    Expired,
}

/// A payload the proxy signs.
pub trait Token: Serialize + DeserializeOwned {
    /// Covered by the MAC, so tokens of different kinds never stand in for each other.
    const KIND: &'static str;
    fn application_id(&self) -> ApplicationId;
    /// Unix seconds.
    fn expires(&self) -> i64;
}

/// A login in progress: the `state` the proxy sends to the server's login page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginState {
    #[serde(rename = "a")]
    pub application_id: ApplicationId,
    /// Also in the state cookie, which binds the login to the browser that started it.
    #[serde(rename = "n")]
    pub nonce: String,
    /// Where to go back to after the login: a path on this host.
    #[serde(rename = "p")]
    pub return_to: String,
    #[serde(rename = "e")]
    pub expires: i64,
}

impl Token for LoginState {
    const KIND: &'static str = "state";
    fn application_id(&self) -> ApplicationId {
        self.application_id
    }
    fn expires(&self) -> i64 {
        self.expires
    }
}

/// A signed-in visitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    #[serde(rename = "a")]
    pub application_id: ApplicationId,
    #[serde(rename = "u")]
    pub user_id: UserId,
    #[serde(rename = "m")]
    pub email: String,
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "r")]
    pub role: Role,
    #[serde(rename = "e")]
    pub expires: i64,
}

impl Token for Session {
    const KIND: &'static str = "session";
    fn application_id(&self) -> ApplicationId {
        self.application_id
    }
    fn expires(&self) -> i64 {
        self.expires
    }
}

/// A visitor who entered the short code of `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodePass {
    #[serde(rename = "a")]
    pub application_id: ApplicationId,
    #[serde(rename = "v")]
    pub version: u64,
    #[serde(rename = "e")]
    pub expires: i64,
}

impl Token for CodePass {
    const KIND: &'static str = "code";
    fn application_id(&self) -> ApplicationId {
        self.application_id
    }
    fn expires(&self) -> i64 {
        self.expires
    }
}

/// `Set-Cookie` for one of the proxy's cookies, with the attributes the `__Host-` prefix
/// requires; `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, max_age: i64) -> HeaderValue {
    let text = format!("{name}={value}; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age={}", max_age.max(0));
    // Names are constants and values are base64url or empty, all valid header characters.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("__Host-edgible_invalid=; Max-Age=0"))
}

/// Every value of cookie `name` in the request's `Cookie` headers (HTTP/2 may split them).
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(move |pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"'))
        })
}

/// Removes the proxy's own cookies from the request, so the workload never sees them; other
/// cookies are kept, joined into one header.
pub fn strip_own_cookies(headers: &mut HeaderMap) {
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && !pair.starts_with(COOKIE_PREFIX))
        .map(str::to_owned)
        .collect();
    let any_own = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|value| value.to_str().map_or(true, |text| text.contains(COOKIE_PREFIX)));
    if !any_own {
        return;
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
}

/// A random nonce, base64url.
pub fn nonce() -> String {
    URL_SAFE_NO_PAD.encode(&random_bytes()[..18])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(application_id: ApplicationId, expires: i64) -> Session {
        Session {
            application_id,
            user_id: UserId::new(),
            email: "ada@example.test".into(),
            name: Some("Ada".into()),
            role: Role::Member,
            expires,
        }
    }

    #[test]
    fn a_token_verifies_with_its_key_for_its_application_until_it_expires() {
        let key = CookieKey::random();
        let application = ApplicationId::new();
        let now = Utc::now();
        let payload = session(application, now.timestamp() + 60);
        let token = key.sign(&payload);
        assert!(token.len() < 400, "compact: {token}");
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
        assert_eq!(key.verify::<Session>(&token, application, now), Ok(payload));

        assert_eq!(
            key.verify::<Session>(&token, application, now + chrono::Duration::seconds(60)),
            Err(TokenError::Expired)
        );
        assert_eq!(key.verify::<Session>(&token, ApplicationId::new(), now), Err(TokenError::OtherApplication));
        assert_eq!(CookieKey::random().verify::<Session>(&token, application, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_tokens_and_other_kinds_are_refused() {
        let key = CookieKey::random();
        let application = ApplicationId::new();
        let now = Utc::now();
        let token = key.sign(&session(application, now.timestamp() + 60));
        let (payload, tag) = token.split_once('.').unwrap();

        // A forged payload (another role) under the original tag.
        let mut forged = session(application, now.timestamp() + 60);
        forged.role = Role::Owner;
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            key.verify::<Session>(&format!("{forged_payload}.{tag}"), application, now),
            Err(TokenError::BadSignature)
        );
        // One flipped character of the tag.
        let mut flipped = tag.as_bytes().to_vec();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(key.verify::<Session>(&format!("{payload}.{flipped}"), application, now).is_err());
        // A code cookie is not a session, even with the same key and application.
        let code = key.sign(&CodePass { application_id: application, version: 1, expires: now.timestamp() + 60 });
        assert_eq!(key.verify::<Session>(&code, application, now), Err(TokenError::BadSignature));
        for garbage in ["", ".", "abc", "a.b", &"a".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(key.verify::<Session>(garbage, application, now).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn cookies_are_read_from_every_header_and_own_cookies_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; __Host-edgible_session=s1"));
        headers.append(header::COOKIE, HeaderValue::from_static("__Host-edgible_code=c1;b=2"));
        assert_eq!(cookie_values(&headers, SESSION_COOKIE).collect::<Vec<_>>(), ["s1"]);
        assert_eq!(cookie_values(&headers, CODE_COOKIE).collect::<Vec<_>>(), ["c1"]);
        strip_own_cookies(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);

        let mut only_own = HeaderMap::new();
        only_own.insert(header::COOKIE, HeaderValue::from_static("__Host-edgible_state=x"));
        strip_own_cookies(&mut only_own);
        assert!(only_own.get(header::COOKIE).is_none());

        // Cookies of the workload's own are left exactly as they were.
        let mut theirs = HeaderMap::new();
        theirs.append(header::COOKIE, HeaderValue::from_static("a=1"));
        theirs.append(header::COOKIE, HeaderValue::from_static("b=2"));
        strip_own_cookies(&mut theirs);
        assert_eq!(theirs.get_all(header::COOKIE).iter().count(), 2);
    }

    #[test]
    fn set_cookie_has_the_contracts_attributes() {
        assert_eq!(
            set_cookie(STATE_COOKIE, "n1", STATE_LIFETIME_SECONDS),
            "__Host-edgible_state=n1; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age=600"
        );
        assert_eq!(
            set_cookie(SESSION_COOKIE, "", 0),
            "__Host-edgible_session=; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age=0"
        );
    }
}
