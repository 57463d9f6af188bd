//! Certificates by SNI name: a store whose entries can be swapped while connections run, and
//! the rustls resolver and server configuration built on it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;

/// Why a certificate could not be installed.
#[derive(Debug, Error)]
pub enum CertificateError {
    #[error("the certificate chain is not valid PEM: {0}")]
    ChainPem(rustls::pki_types::pem::Error),
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the private key is not valid PEM: {0}")]
    KeyPem(rustls::pki_types::pem::Error),
    #[error("the private key is not usable for TLS: {0}")]
    Key(rustls::Error),
    #[error("the private key does not belong to the certificate: {0}")]
    Mismatch(rustls::Error),
}

/// The certificates the proxy serves, keyed by hostname (`app.example.test`) or wildcard
/// (`*.example.test`).
///
/// Replacing an entry only affects handshakes that start afterwards: a running connection
/// already holds its certificate, so renewals never drop connections.
#[derive(Debug, Default)]
pub struct CertificateStore {
    certificates: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl CertificateStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs (or replaces) the certificate served for `name` from a PEM chain (leaf first)
    /// and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn insert_pem(&self, name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), CertificateError> {
        self.insert(name, certified_key(chain_pem, key_pem)?);
        Ok(())
    }

    /// Installs (or replaces) a ready certificate for `name`.
    pub fn insert(&self, name: &str, certified: Arc<CertifiedKey>) {
        self.write().insert(name.to_ascii_lowercase(), certified);
    }

    /// Stops serving `name`; returns whether it was served.
    pub fn remove(&self, name: &str) -> bool {
        self.write().remove(&name.to_ascii_lowercase()).is_some()
    }

    /// The certificate for an SNI name: the exact name first, then a wildcard covering its
    /// first label.
    pub fn find(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let certificates = self.certificates.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        lookup(&certificates, server_name).cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        // A panic while holding the lock cannot leave the map half-updated (inserts and
        // removes are single calls), so a poisoned lock is still a consistent map.
        self.certificates.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A certificate ready to serve, from a PEM chain (leaf first) and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1), checked to belong together.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, CertificateError> {
    let chain =
        CertificateDer::pem_slice_iter(chain_pem).collect::<Result<Vec<_>, _>>().map_err(CertificateError::ChainPem)?;
    if chain.is_empty() {
        return Err(CertificateError::EmptyChain);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(CertificateError::KeyPem)?;
    let signing_key = any_supported_type(&key).map_err(CertificateError::Key)?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(CertificateError::Mismatch)?;
    Ok(Arc::new(certified))
}

/// Looks `name` up in a table keyed by lowercase names and `*.`-wildcards: exact first, then
/// the wildcard for its parent, which covers exactly one label (`*.example.test` matches
/// `a.example.test`, not `a.b.example.test` nor `example.test`).
pub(crate) fn lookup<'a, T>(table: &'a HashMap<String, T>, name: &str) -> Option<&'a T> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if let Some(found) = table.get(&name) {
        return Some(found);
    }
    let (label, parent) = name.split_once('.')?;
    if label.is_empty() || parent.is_empty() {
        return None;
    }
    table.get(&format!("*.{parent}"))
}

/// The rustls resolver over a [`CertificateStore`]: an unknown or missing SNI name has no
/// certificate, which makes rustls fail the handshake.
#[derive(Debug)]
pub struct SniResolver {
    store: Arc<CertificateStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.find(client_hello.server_name()?)
    }
}

/// The TLS configurations of the proxy, both with ring and certificates from the store by SNI:
/// `http` offers ALPN h2 and http/1.1; `raw`, for applications exposed as plain TCP, offers no
/// ALPN at all, so that a client never believes it agreed on a protocol the workload does not
/// speak.
#[derive(Debug, Clone)]
pub struct ServerConfigs {
    pub http: Arc<ServerConfig>,
    pub raw: Arc<ServerConfig>,
}

pub fn server_configs(store: Arc<CertificateStore>) -> Result<ServerConfigs, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let raw = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { store }));
    let mut http = raw.clone();
    http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerConfigs { http: Arc::new(http), raw: Arc::new(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_prefers_exact_then_one_label_wildcards() {
        let table: HashMap<String, u8> =
            [("a.example.test".to_owned(), 1), ("*.example.test".to_owned(), 2)].into_iter().collect();
        assert_eq!(lookup(&table, "a.example.test"), Some(&1));
        assert_eq!(lookup(&table, "A.Example.Test."), Some(&1));
        assert_eq!(lookup(&table, "b.example.test"), Some(&2));
        assert_eq!(lookup(&table, "x.b.example.test"), None);
        assert_eq!(lookup(&table, "example.test"), None);
        assert_eq!(lookup(&table, ".example.test"), None);
        assert_eq!(lookup(&table, "other.test"), None);
    }

    #[test]
    fn refuses_bad_pem() {
        let store = CertificateStore::new();
        assert!(matches!(store.insert_pem("a.test", b"", b""), Err(CertificateError::EmptyChain)));
        assert!(store.find("a.test").is_none());
    }
}
