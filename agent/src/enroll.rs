//! Enrollment: trading a device's one-time token for its long-lived credential.
//!
//! The agent generates the device's WireGuard key pair here; only the public half goes to the
//! server, the private key stays in the state directory (mode 0600) and never leaves it. What
//! enrollment leaves behind:
//!
//! ```text
//! STATE_DIR/identity.json                    the server, the device and its public key
//! STATE_DIR/secrets/device-credential        what the push session authenticates with
//! STATE_DIR/secrets/wireguard-private-key    the device's tunnel key, WireGuard's base64 form
//! ```
//!
//! The key and the credential are written only after the server accepted the token, so a
//! refused token leaves the directory as it was; an enrolled directory is not enrolled again
//! unless asked to (`force`), because the old identity would be lost with its workloads' device.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use edgible::model::{DeviceId, EnrollmentRequest, Name, OrganizationId};
use edgible::tunnel::keys::{KeyError, PrivateKey, PublicKey};
use edgible::{Client, ClientError};
use serde::{Deserialize, Serialize};

use crate::state::{StateDir, StateError};

/// The identity file at the top of the state directory.
pub const IDENTITY_FILE: &str = "identity.json";
/// The secret the push session authenticates with.
pub const CREDENTIAL_SECRET: &str = "device-credential";
/// The device's WireGuard private key.
pub const PRIVATE_KEY_SECRET: &str = "wireguard-private-key";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "this state directory is already enrolled as device {device_id} with {server}; pass --force to replace \
         that identity"
    )]
    AlreadyEnrolled { device_id: DeviceId, server: String },
    /// The server refused the token: unknown, used or expired. The message is the server's.
    #[error("the server refused the enrollment token: {0}")]
    Refused(String),
    #[error("enrolling with {server}")]
    Server {
        server: String,
        #[source]
        source: ClientError,
    },
    #[error("the server answered for device {answered}, whose public key is not the one sent")]
    KeyMismatch { answered: DeviceId },
    #[error("cannot generate the device's WireGuard key: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "the device enrolled as {device_id}, but its identity could not be saved ({source}); the token is used: \
         create the device again to get a new one"
    )]
    NotSaved {
        device_id: DeviceId,
        #[source]
        source: StateError,
    },
}

/// Why an enrolled identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the state directory {0} holds no enrollment: run `edgible-agent enroll --server URL --token TOKEN` first")]
    NotEnrolled(String),
    #[error("the enrollment in {path} is incomplete: {missing} is missing; enroll the device again")]
    Incomplete { path: String, missing: &'static str },
    #[error("{path}/{IDENTITY_FILE} is not a valid identity file: {source}")]
    Corrupt { path: String, source: serde_json::Error },
    #[error("the WireGuard private key in {path} is unreadable: {source}")]
    Key { path: String, source: KeyError },
    #[error("the private key in {path} does not match the enrolled public key; enroll the device again")]
    KeyMismatch { path: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// Who this device is, as enrollment recorded it. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The server's base URL, `http(s)://host[:port]`.
    pub server: String,
    pub device_id: DeviceId,
    pub device_name: Name,
    pub organization_id: OrganizationId,
    /// The device's WireGuard public key in WireGuard's base64 form.
    pub public_key: String,
    pub tunnel_address: Ipv4Addr,
    pub enrolled_at: DateTime<Utc>,
}

/// An enrolled device: its identity and the secrets it holds.
#[derive(Debug)]
pub struct Enrolled {
    pub identity: Identity,
    /// The device credential for `Authorization: Bearer`.
    pub credential: String,
    pub private_key: PrivateKey,
}

impl Enrolled {
    /// Loads what `enroll` wrote, checking that the pieces belong together.
    pub fn load(state_dir: &StateDir) -> Result<Self, IdentityError> {
        let path = state_dir.root().display().to_string();
        let identity = match state_dir.read_file(IDENTITY_FILE)? {
            Some(bytes) => serde_json::from_slice::<Identity>(&bytes)
                .map_err(|source| IdentityError::Corrupt { path: path.clone(), source })?,
            None => return Err(IdentityError::NotEnrolled(path)),
        };
        let credential = state_dir
            .read_secret(CREDENTIAL_SECRET)?
            .ok_or_else(|| IdentityError::Incomplete { path: path.clone(), missing: "the device credential" })?;
        let credential = String::from_utf8_lossy(&credential).trim().to_owned();
        let key = state_dir
            .read_secret(PRIVATE_KEY_SECRET)?
            .ok_or_else(|| IdentityError::Incomplete { path: path.clone(), missing: "the WireGuard private key" })?;
        let private_key = PrivateKey::from_base64(&String::from_utf8_lossy(&key))
            .map_err(|source| IdentityError::Key { path: path.clone(), source })?;
        if private_key.public_key().to_base64() != identity.public_key {
            return Err(IdentityError::KeyMismatch { path });
        }
        Ok(Self { identity, credential, private_key })
    }
}

/// Answers the identity the directory holds, if any, without reading secrets.
pub fn identity(state_dir: &StateDir) -> Result<Option<Identity>, IdentityError> {
    match state_dir.read_file(IDENTITY_FILE)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| IdentityError::Corrupt { path: state_dir.root().display().to_string(), source }),
        None => Ok(None),
    }
}

/// Enrolls the device with `server` using its one-time `token`, and writes the identity, the
/// credential and the private key into `state_dir`.
pub async fn enroll(state_dir: &StateDir, server: &str, token: &str, force: bool) -> Result<Identity, EnrollError> {
    // A running agent holds the lock; its identity must not change under it.
    let _lock = state_dir.lock()?;
    let server = server.trim_end_matches('/').to_owned();
    if !force && let Ok(Some(existing)) = identity(state_dir) {
        return Err(EnrollError::AlreadyEnrolled { device_id: existing.device_id, server: existing.server });
    }
    let private_key = PrivateKey::generate()?;
    let public_key: PublicKey = private_key.public_key();
    let request = EnrollmentRequest { token: token.trim().to_owned(), public_key: public_key.to_base64() };
    let enrollment = match Client::enroll(&server, &request).await {
        Ok(enrollment) => enrollment,
        Err(error) if refused(&error) => return Err(EnrollError::Refused(error.message())),
        Err(source) => return Err(EnrollError::Server { server, source }),
    };
    let device = enrollment.device;
    if device.status.public_key.as_deref() != Some(request.public_key.as_str()) {
        return Err(EnrollError::KeyMismatch { answered: device.id });
    }
    let identity = Identity {
        server,
        device_id: device.id,
        device_name: device.spec.name.clone(),
        organization_id: device.organization_id,
        public_key: request.public_key,
        tunnel_address: device.status.tunnel_address,
        enrolled_at: Utc::now(),
    };
    save(state_dir, &identity, &enrollment.credential, &private_key)
        .map_err(|source| EnrollError::NotSaved { device_id: identity.device_id, source })?;
    Ok(identity)
}

/// Whether the server said no to the token itself (rather than failing).
fn refused(error: &ClientError) -> bool {
    error.status().is_some_and(|status| matches!(status.as_u16(), 400 | 401 | 404 | 409 | 410 | 422))
}

/// Writes the secrets first and the identity last: a directory with an identity is complete.
fn save(state_dir: &StateDir, identity: &Identity, credential: &str, key: &PrivateKey) -> Result<(), StateError> {
    state_dir.write_secret(PRIVATE_KEY_SECRET, key.expose_base64().as_bytes())?;
    state_dir.write_secret(CREDENTIAL_SECRET, credential.as_bytes())?;
    // The identity holds only strings, ids, an address and a time, which always serialize.
    let bytes = serde_json::to_vec_pretty(identity).unwrap_or_default();
    state_dir.write_file(IDENTITY_FILE, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity_for(key: &PrivateKey) -> Identity {
        Identity {
            server: "http://127.0.0.1:1".into(),
            device_id: DeviceId::new(),
            device_name: "pi".parse().expect("a name"),
            organization_id: OrganizationId::new(),
            public_key: key.public_key().to_base64(),
            tunnel_address: Ipv4Addr::new(100, 96, 0, 2),
            enrolled_at: Utc::now(),
        }
    }

    #[test]
    fn a_saved_enrollment_loads_back_and_secrets_are_private() {
        use std::os::unix::fs::PermissionsExt;

        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("state dir");
        assert!(matches!(Enrolled::load(&dir), Err(IdentityError::NotEnrolled(_))));
        let key = PrivateKey::generate().expect("a key");
        let identity = identity_for(&key);
        save(&dir, &identity, "edgdev_secret", &key).expect("saved");

        let enrolled = Enrolled::load(&dir).expect("loads");
        assert_eq!(enrolled.identity, identity);
        assert_eq!(enrolled.credential, "edgdev_secret");
        assert_eq!(enrolled.private_key.public_key(), key.public_key());
        for secret in [CREDENTIAL_SECRET, PRIVATE_KEY_SECRET] {
            let mode = std::fs::metadata(dir.root().join("secrets").join(secret)).expect("exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
    }

    #[test]
    fn a_key_that_does_not_match_the_identity_is_refused() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("state dir");
        let key = PrivateKey::generate().expect("a key");
        let other = PrivateKey::generate().expect("another key");
        save(&dir, &identity_for(&key), "c", &other).expect("saved");
        assert!(matches!(Enrolled::load(&dir), Err(IdentityError::KeyMismatch { .. })));
        std::fs::remove_file(dir.root().join("secrets").join(CREDENTIAL_SECRET)).expect("removed");
        assert!(matches!(Enrolled::load(&dir), Err(IdentityError::Incomplete { .. })));
    }

    #[tokio::test]
    async fn an_enrolled_directory_is_not_enrolled_again_without_force() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("state dir");
        let key = PrivateKey::generate().expect("a key");
        let identity = identity_for(&key);
        save(&dir, &identity, "c", &key).expect("saved");
        let error = enroll(&dir, "http://127.0.0.1:1", "token", false).await.expect_err("refused");
        assert!(matches!(error, EnrollError::AlreadyEnrolled { device_id, .. } if device_id == identity.device_id));
        // The directory was not touched.
        assert_eq!(Enrolled::load(&dir).expect("loads").identity, identity);
    }

    #[tokio::test]
    async fn an_unreachable_server_leaves_the_directory_empty() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::open(temp.path()).expect("state dir");
        // A port that was just free: nothing listens there any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let error = enroll(&dir, &format!("http://127.0.0.1:{port}/"), "token", false).await.expect_err("fails");
        assert!(matches!(error, EnrollError::Server { .. }), "{error}");
        assert!(matches!(Enrolled::load(&dir), Err(IdentityError::NotEnrolled(_))));
        assert_eq!(dir.read_secret(PRIVATE_KEY_SECRET).expect("read"), None);
    }
}
