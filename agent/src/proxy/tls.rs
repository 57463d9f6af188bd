//! Certificates by SNI name: a store whose entries can be swapped while connections run, and
//! the rustls resolver and server configuration built on it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::Ticketer;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig, SupportedCipherSuite};
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

/// The TLS configurations of the proxy, all with ring and certificates from the store by SNI:
/// `http` offers ALPN h2 and http/1.1; `raw`, for applications exposed as plain TCP, offers no
/// ALPN at all, so that a client never believes it agreed on a protocol the workload does not
/// speak. Each comes in two cipher suite orders, chosen per ClientHello by
/// [`ServerConfigs::select`].
///
/// What a new connection costs is mostly the handshake, so the configurations keep it cheap:
///
/// - Session resumption with stateless tickets (ring's [`Ticketer`]: keys in memory, rotated
///   every 6 hours), one ticket per connection: a returning client skips the certificate and
///   the signature however many other clients came in between (the default stateful cache holds
///   256 sessions, first in first out, which a busy proxy cycles through in a fraction of a
///   second). Tickets are bound to their SNI name (rustls checks it on resumption) and work
///   across both configurations' orders.
/// - The server picks the cipher suite (`ignore_client_order`): AES-128-GCM with SHA-256 first,
///   whose key schedule and transcript hash run on the CPU's SHA-256 instructions, unlike
///   SHA-384, which AES-256-GCM brings and which ring computed in generic code here (6.5% of
///   the proxy's CPU on new connections). A client that lists ChaCha20-Poly1305 first (one
///   without AES instructions) keeps it, as Go's TLS server does.
#[derive(Debug, Clone)]
pub struct ServerConfigs {
    /// HTTP, AES-128-GCM first.
    pub http: Arc<ServerConfig>,
    /// Raw TCP, AES-128-GCM first.
    pub raw: Arc<ServerConfig>,
    /// HTTP, ChaCha20-Poly1305 first.
    http_chacha: Arc<ServerConfig>,
    /// Raw TCP, ChaCha20-Poly1305 first.
    raw_chacha: Arc<ServerConfig>,
}

impl ServerConfigs {
    /// The configuration for a connection: `raw` or HTTP, and the ChaCha20-first order when the
    /// first cipher suite the client offers that the proxy knows is a ChaCha20-Poly1305 one.
    pub fn select(&self, raw_tcp: bool, client_suites: &[CipherSuite]) -> &Arc<ServerConfig> {
        match (raw_tcp, prefers_chacha(client_suites)) {
            (false, false) => &self.http,
            (true, false) => &self.raw,
            (false, true) => &self.http_chacha,
            (true, true) => &self.raw_chacha,
        }
    }
}

/// The ring suites in the proxy's order of preference: AES-128-GCM, AES-256-GCM,
/// ChaCha20-Poly1305 (or ChaCha20-Poly1305 first), TLS 1.3 and 1.2 alike (rustls only picks among
/// the suites of the version it negotiated).
fn suites(chacha_first: bool) -> Vec<SupportedCipherSuite> {
    let rank = |suite: &SupportedCipherSuite| match (suite_bulk(suite.suite()), chacha_first) {
        (Some(Bulk::Aes128), false) | (Some(Bulk::ChaCha20), true) => 0,
        (Some(Bulk::Aes128), true) | (Some(Bulk::ChaCha20), false) => 1,
        (Some(Bulk::Aes256), _) => 2,
        (None, _) => 3,
    };
    let mut suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    suites.sort_by_key(rank);
    suites
}

/// The bulk cipher of a suite the ring provider offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Aes128,
    Aes256,
    ChaCha20,
}

fn suite_bulk(suite: CipherSuite) -> Option<Bulk> {
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Bulk::Aes128),
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Bulk::Aes256),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Bulk::ChaCha20),
        _ => None,
    }
}

/// Whether the first suite in the client's list that the proxy knows (GREASE and unknown values
/// skipped) is a ChaCha20-Poly1305 one.
fn prefers_chacha(client_suites: &[CipherSuite]) -> bool {
    client_suites.iter().find_map(|suite| suite_bulk(*suite)) == Some(Bulk::ChaCha20)
}

pub fn server_configs(store: Arc<CertificateStore>) -> Result<ServerConfigs, rustls::Error> {
    // One ticketer for every configuration, so that a ticket resumes whichever order and
    // protocol the next connection gets.
    let ticketer = Ticketer::new()?;
    let resolver: Arc<dyn ResolvesServerCert> = Arc::new(SniResolver { store });
    let build = |chacha_first: bool, alpn: bool| -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider =
            CryptoProvider { cipher_suites: suites(chacha_first), ..rustls::crypto::ring::default_provider() };
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.ignore_client_order = true;
        config.ticketer = ticketer.clone();
        config.send_tls13_tickets = 1;
        if alpn {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        }
        Ok(Arc::new(config))
    };
    Ok(ServerConfigs {
        http: build(false, true)?,
        raw: build(false, false)?,
        http_chacha: build(true, true)?,
        raw_chacha: build(true, false)?,
    })
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
    fn suites_put_aes_128_first_or_chacha20_for_clients_that_lead_with_it() {
        let names = |chacha_first| suites(chacha_first).iter().map(|suite| suite.suite()).collect::<Vec<_>>();
        let aes_first = names(false);
        assert_eq!(
            aes_first[..2],
            [CipherSuite::TLS13_AES_128_GCM_SHA256, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
        );
        let chacha_first = names(true);
        assert_eq!(chacha_first[0], CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        // Nothing is dropped, only reordered.
        assert_eq!(aes_first.len(), rustls::crypto::ring::DEFAULT_CIPHER_SUITES.len());
        assert_eq!(chacha_first.len(), aes_first.len());

        // OpenSSL's default order (AES-256 first) gets the server's; GREASE and unknown values
        // before ChaCha20 do not hide it.
        let openssl = [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ];
        assert!(!prefers_chacha(&openssl));
        let mobile = [
            CipherSuite::Unknown(0x0a0a),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ];
        assert!(prefers_chacha(&mobile));
        assert!(!prefers_chacha(&[]));
    }

    #[test]
    fn select_gives_alpn_to_http_only_and_chacha_first_on_request() {
        let configs = server_configs(CertificateStore::new()).unwrap();
        let chacha = [CipherSuite::TLS13_CHACHA20_POLY1305_SHA256];
        let aes = [CipherSuite::TLS13_AES_256_GCM_SHA384];
        for (raw, alpn) in [(false, 2), (true, 0)] {
            for (offered, first) in [(&aes[..], CipherSuite::TLS13_AES_128_GCM_SHA256), (&chacha[..], chacha[0])] {
                let config = configs.select(raw, offered);
                assert_eq!(config.alpn_protocols.len(), alpn);
                assert_eq!(config.crypto_provider().cipher_suites[0].suite(), first);
                assert!(config.ignore_client_order);
                assert_eq!(config.send_tls13_tickets, 1);
                assert!(config.ticketer.enabled());
            }
        }
    }

    #[test]
    fn refuses_bad_pem() {
        let store = CertificateStore::new();
        assert!(matches!(store.insert_pem("a.test", b"", b""), Err(CertificateError::EmptyChain)));
        assert!(store.find("a.test").is_none());
    }
}
