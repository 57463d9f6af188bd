//! WireGuard key pairs: x25519 keys written as WireGuard writes them (32 bytes, standard base64
//! with padding, 44 characters), so keys can be exchanged with `wg genkey`/`wg pubkey`.
//!
//! The private key never leaves this type by accident: it has no `Display`, its `Debug` shows
//! only the public half, and the one way to get its text is the explicitly named
//! [`PrivateKey::expose_base64`].

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;
use rand::TryRngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The length of an x25519 key in bytes.
pub const KEY_LEN: usize = 32;

/// The length of a key in WireGuard's base64 form.
const BASE64_LEN: usize = 44;

/// Why a key could not be parsed, generated, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a WireGuard key is {BASE64_LEN} characters of base64, got {0} characters")]
    Length(usize),
    #[error("a WireGuard key must be base64: {0}")]
    Base64(#[from] base64::DecodeSliceError),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("cannot read the private key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the private key file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Decodes one key from WireGuard's base64 form.
fn decode(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if text.len() != BASE64_LEN {
        return Err(KeyError::Length(text.len()));
    }
    // 44 base64 characters decode to at most 33 bytes before padding is accounted for, so the
    // scratch buffer is one byte longer than a key and the real length is checked afterwards.
    let mut scratch = [0u8; KEY_LEN + 1];
    let decoded = STANDARD.decode_slice(text, &mut scratch)?;
    if decoded != KEY_LEN {
        return Err(KeyError::Length(text.len()));
    }
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(&scratch[..KEY_LEN]);
    scratch.fill(0);
    Ok(key)
}

/// A peer's WireGuard public key: its identity on the data plane.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw key bytes. Every 32-byte string is a valid x25519 public key.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key in WireGuard's base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        decode(text).map(Self)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl From<&PublicKey> for x25519::PublicKey {
    fn from(key: &PublicKey) -> Self {
        x25519::PublicKey::from(key.0)
    }
}

/// A WireGuard private key. Cloning copies the secret; the copies are zeroed on drop.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    /// Generates a new key from the operating system's random source, clamped as `wg genkey`
    /// clamps it.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|error| KeyError::Random(error.to_string()))?;
        // Clamping as RFC 7748 describes; x25519 clamps again on use, so this only makes the
        // written form identical to what WireGuard's own tools write.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        let key = Self(x25519::StaticSecret::from(bytes));
        bytes.fill(0);
        Ok(key)
    }

    /// Parses a key in WireGuard's base64 form.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let mut bytes = decode(text.trim())?;
        let key = Self(x25519::StaticSecret::from(bytes));
        bytes.fill(0);
        Ok(key)
    }

    /// The secret in WireGuard's base64 form. Named so that every place that reveals the secret
    /// is easy to find.
    pub fn expose_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    /// Reads a key written by [`PrivateKey::write_file`] or by `wg genkey > file`.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_path_buf(), source })?;
        Self::from_base64(&text)
    }

    /// Writes the key to `path` with mode 0600, atomically: the key is written to a temporary
    /// file beside `path` that is created with mode 0600 (so the secret is never readable by
    /// others, not even briefly) and then renamed over `path`.
    pub fn write_file(&self, path: &Path) -> Result<(), KeyError> {
        let error = |source| KeyError::Write { path: path.to_path_buf(), source };
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        // A leftover temporary file from an interrupted write may have other permissions.
        match fs::remove_file(&temporary) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => return Err(error(source)),
            _ => {}
        }
        let mut file =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary).map_err(error)?;
        // The umask can only remove bits, but be explicit so the mode never depends on it.
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(error)?;
        let mut text = self.expose_base64();
        text.push('\n');
        let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
        // The text is a copy of the secret: overwrite it in place before it is freed.
        text.clear();
        text.extend(std::iter::repeat_n('0', BASE64_LEN));
        written.map_err(error)?;
        fs::rename(&temporary, path).map_err(error)
    }

    pub(crate) fn secret(&self) -> &x25519::StaticSecret {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public: {})", self.public_key())
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_base64(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748, section 6.1: Alice's key pair.
    const ALICE_PRIVATE: [u8; 32] = [
        0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66, 0x45, 0xdf, 0x4c,
        0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9, 0x2c, 0x2a,
    ];
    const ALICE_PUBLIC: [u8; 32] = [
        0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7, 0x5a, 0x0d, 0xbf,
        0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b, 0x4e, 0x6a,
    ];

    #[test]
    fn public_key_matches_the_rfc_7748_vector() {
        let private = PrivateKey::from_base64(&STANDARD.encode(ALICE_PRIVATE)).unwrap();
        assert_eq!(private.public_key(), PublicKey::from_bytes(ALICE_PUBLIC));
        assert_eq!(private.public_key().to_string(), STANDARD.encode(ALICE_PUBLIC));
    }

    #[test]
    fn base64_round_trips_and_is_44_characters() {
        let private = PrivateKey::generate().unwrap();
        let text = private.expose_base64();
        assert_eq!(text.len(), 44);
        assert!(text.ends_with('='));
        let again: PrivateKey = text.parse().unwrap();
        assert_eq!(again.public_key(), private.public_key());

        let public = private.public_key();
        assert_eq!(public.to_string().parse::<PublicKey>().unwrap(), public);
        let json = serde_json::to_string(&public).unwrap();
        assert_eq!(json, format!("\"{public}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), public);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let first = PrivateKey::generate().unwrap();
        let second = PrivateKey::generate().unwrap();
        assert_ne!(first.public_key(), second.public_key());
        let bytes = first.secret().to_bytes();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(matches!("".parse::<PublicKey>(), Err(KeyError::Length(0))));
        assert!(matches!("abc".parse::<PublicKey>(), Err(KeyError::Length(3))));
        // 44 characters but not base64.
        assert!(matches!("!".repeat(44).parse::<PublicKey>(), Err(KeyError::Base64(_))));
        // 44 characters of base64 that decode to 33 bytes (no padding).
        assert!("A".repeat(44).parse::<PublicKey>().is_err());
        assert!(serde_json::from_str::<PublicKey>("\"short\"").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let private = PrivateKey::generate().unwrap();
        let debug = format!("{private:?}");
        assert!(!debug.contains(&private.expose_base64()));
        assert!(debug.contains(&private.public_key().to_string()));
    }

    #[test]
    fn key_file_is_private_and_reads_back() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("wg.key");
        let private = PrivateKey::generate().unwrap();
        private.write_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(PrivateKey::read_file(&path).unwrap().public_key(), private.public_key());

        // Overwriting replaces the key and keeps the mode.
        let other = PrivateKey::generate().unwrap();
        other.write_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(PrivateKey::read_file(&path).unwrap().public_key(), other.public_key());
        assert!(matches!(PrivateKey::read_file(&directory.path().join("missing")), Err(KeyError::Read { .. })));
    }
}
