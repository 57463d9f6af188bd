//! The certificates of the applications placed on this device.
//!
//! Each application gets its own ECDSA P-256 key, generated here and kept in the state
//! directory (`certs/<application_id>.key`, 0600); it never leaves the device. The agent sends
//! a CSR whose subject alternative names are the application's hostnames, the server signs it
//! with its internal CA, and the agent checks what comes back (it belongs to the key, it names
//! exactly the hostnames, it is valid now) before storing it (`certs/<application_id>.pem`)
//! and installing it in the proxy's [`CertificateStore`], which swaps it for new handshakes
//! without touching running connections.
//!
//! An application needs a request when it has no certificate, when its hostnames changed, or
//! once its certificate is past two thirds of its lifetime ([`need`], pure). Requests for one
//! application go out at most once per `request_interval`: a server that refuses (the
//! application is not placed here any more, say) is not asked in a loop. A key is kept for the
//! application's life and reused by renewals; removing the application removes its key, its
//! certificate and its names from the store. On start, what the state directory holds is
//! installed for the applications of the persisted desired state, so an agent restarting while
//! the server is unreachable keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use edgible::model::{Application, ApplicationId};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use tokio::time::Instant;
use x509_parser::extensions::GeneralName;

use crate::control::link::{CertificateRequest, IssuedCertificate};
use crate::proxy::tls::certified_key;
use crate::proxy::{CertificateError, CertificateStore};
use crate::reconcile::DesiredState;
use crate::state::{StateDir, StateError};

/// The state directory's subdirectory of keys and certificates.
pub const CERTS_DIR: &str = "certs";

/// Why a certificate was not installed, or a request not made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("a certificate for application {0}, which is not placed on this device")]
    UnknownApplication(ApplicationId),
    #[error("certificate for application {application_id}: chain_pem: {message}")]
    Unreadable { application_id: ApplicationId, message: String },
    #[error(
        "certificate for application {application_id}: hostnames: the certificate names {found:?}, the application \
         has {expected:?}"
    )]
    Names { application_id: ApplicationId, expected: BTreeSet<String>, found: BTreeSet<String> },
    #[error("certificate for application {application_id}: not_after: it expired at {not_after}")]
    Expired { application_id: ApplicationId, not_after: DateTime<Utc> },
    #[error("certificate for application {application_id}: chain_pem: {source}")]
    Key { application_id: ApplicationId, source: CertificateError },
    #[error("cannot make a key or CSR for application {application_id}: {message}")]
    Generate { application_id: ApplicationId, message: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Its DNS subject alternative names, lowercase.
    pub names: BTreeSet<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// Why an application needs a (new) certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Missing,
    /// Its hostnames are not exactly the certificate's names.
    NamesChanged,
    /// Past two thirds of its lifetime.
    Renewal,
    Expired,
}

/// Whether an application with these hostnames needs a certificate, given the one it has.
pub fn need(hostnames: &BTreeSet<String>, installed: Option<&CertificateInfo>, now: DateTime<Utc>) -> Option<Need> {
    let Some(installed) = installed else { return Some(Need::Missing) };
    if installed.names != *hostnames {
        return Some(Need::NamesChanged);
    }
    if now >= installed.not_after {
        return Some(Need::Expired);
    }
    let lifetime = installed.not_after - installed.not_before;
    if now >= installed.not_before + lifetime * 2 / 3 {
        return Some(Need::Renewal);
    }
    None
}

/// Reads the leaf (first) certificate of a PEM chain.
pub fn read_leaf(chain_pem: &[u8]) -> Result<CertificateInfo, String> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .ok_or("no certificate in the PEM")?
        .map_err(|error| format!("not valid PEM: {error}"))?;
    let (_, certificate) =
        x509_parser::parse_x509_certificate(&leaf).map_err(|error| format!("not an X.509 certificate: {error}"))?;
    let time = |seconds: i64| Utc.timestamp_opt(seconds, 0).single().ok_or("a validity date out of range");
    let not_before = time(certificate.validity().not_before.timestamp())?;
    let not_after = time(certificate.validity().not_after.timestamp())?;
    let mut names = BTreeSet::new();
    let alternative_names = certificate
        .subject_alternative_name()
        .map_err(|error| format!("unreadable subject alternative names: {error}"))?;
    for name in alternative_names.iter().flat_map(|extension| extension.value.general_names.iter()) {
        if let GeneralName::DNSName(name) = name {
            names.insert(name.to_ascii_lowercase());
        }
    }
    Ok(CertificateInfo { names, not_before, not_after })
}

/// The hostnames of an application, as certificate names.
fn hostnames(application: &Application) -> BTreeSet<String> {
    application.spec.hostnames.iter().map(|hostname| hostname.to_string().to_ascii_lowercase()).collect()
}

/// One application's key and certificate.
struct Entry {
    key_pem: String,
    /// The application's hostnames, as last seen in desired state.
    hostnames: BTreeSet<String>,
    /// The certificate installed, if any.
    installed: Option<CertificateInfo>,
    /// The names under which the store serves it.
    served: BTreeSet<String>,
    last_request: Option<Instant>,
}

/// The certificates of the desired applications, on disk and in the proxy's store.
pub struct Certificates {
    state_dir: StateDir,
    store: Arc<CertificateStore>,
    request_interval: Duration,
    entries: BTreeMap<ApplicationId, Entry>,
}

impl Certificates {
    pub fn new(state_dir: StateDir, store: Arc<CertificateStore>, request_interval: Duration) -> Self {
        Self { state_dir, store, request_interval, entries: BTreeMap::new() }
    }

    /// What is installed for an application.
    pub fn installed(&self, application_id: ApplicationId) -> Option<&CertificateInfo> {
        self.entries.get(&application_id)?.installed.as_ref()
    }

    /// Brings keys and certificates in line with `desired`: forgets removed applications (their
    /// names leave the store, their files the disk), loads or generates the keys of new ones
    /// (installing a stored certificate that is still good), and answers the requests due now.
    pub fn sync(&mut self, desired: &DesiredState, now: DateTime<Utc>) -> Vec<CertificateRequest> {
        let removed: Vec<ApplicationId> =
            self.entries.keys().filter(|id| !desired.applications.contains_key(id)).copied().collect();
        for application_id in removed {
            if let Some(entry) = self.entries.remove(&application_id) {
                for name in &entry.served {
                    self.store.remove(name);
                }
            }
        }
        self.remove_stray_files(desired);

        let mut requests = Vec::new();
        for application in desired.applications.values() {
            let wanted = hostnames(application);
            if !self.entries.contains_key(&application.id) {
                match self.load(application.id, &wanted, now) {
                    Ok(entry) => {
                        self.entries.insert(application.id, entry);
                    }
                    Err(error) => {
                        tracing::error!(%error, application = %application.id, "no key for the application's certificate");
                        continue;
                    }
                }
            }
            let Some(entry) = self.entries.get_mut(&application.id) else { continue };
            if entry.hostnames != wanted {
                // Names the application no longer has stop being served at once.
                for name in entry.served.difference(&wanted) {
                    self.store.remove(name);
                }
                entry.served.retain(|name| wanted.contains(name));
                entry.hostnames = wanted;
            }
            let Some(why) = need(&entry.hostnames, entry.installed.as_ref(), now) else { continue };
            if entry.last_request.is_some_and(|at| at.elapsed() < self.request_interval) {
                continue;
            }
            match csr(&entry.key_pem, &entry.hostnames) {
                Ok(csr_pem) => {
                    tracing::info!(application = %application.id, ?why, "a certificate is needed");
                    entry.last_request = Some(Instant::now());
                    requests.push(CertificateRequest { application_id: application.id, csr_pem });
                }
                Err(message) => {
                    tracing::error!(application = %application.id, %message, "cannot build a certificate request");
                }
            }
        }
        requests
    }

    /// Checks a certificate the server signed, stores it and serves it for the application's
    /// hostnames.
    pub fn install(&mut self, issued: &IssuedCertificate, now: DateTime<Utc>) -> Result<(), CertError> {
        let application_id = issued.application_id;
        let entry = self.entries.get_mut(&application_id).ok_or(CertError::UnknownApplication(application_id))?;
        let (info, certified) =
            check(application_id, &entry.hostnames, &entry.key_pem, issued.chain_pem.as_bytes(), now)?;
        self.state_dir.write_in(CERTS_DIR, &pem_file(application_id), issued.chain_pem.as_bytes())?;
        for name in &entry.hostnames {
            self.store.insert(name, Arc::clone(&certified));
        }
        entry.served = entry.hostnames.clone();
        tracing::info!(%application_id, not_after = %info.not_after, names = ?info.names, "certificate installed");
        entry.installed = Some(info);
        entry.last_request = None;
        Ok(())
    }

    /// The entry of an application seen for the first time: its stored key (or a new one) and
    /// its stored certificate, installed if it still fits.
    fn load(
        &self,
        application_id: ApplicationId,
        wanted: &BTreeSet<String>,
        now: DateTime<Utc>,
    ) -> Result<Entry, CertError> {
        let stored_key = self
            .state_dir
            .read_in(CERTS_DIR, &key_file(application_id))?
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|pem| KeyPair::from_pem(pem).is_ok());
        let key_pem = match stored_key {
            Some(key_pem) => key_pem,
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(|error| CertError::Generate { application_id, message: error.to_string() })?;
                let key_pem = key.serialize_pem();
                self.state_dir.write_in(CERTS_DIR, &key_file(application_id), key_pem.as_bytes())?;
                // A certificate stored for an older key is of no use any more.
                self.state_dir.remove_in(CERTS_DIR, &pem_file(application_id))?;
                key_pem
            }
        };
        let mut entry =
            Entry { key_pem, hostnames: wanted.clone(), installed: None, served: BTreeSet::new(), last_request: None };
        let Some(chain_pem) = self.state_dir.read_in(CERTS_DIR, &pem_file(application_id))? else { return Ok(entry) };
        match check(application_id, wanted, &entry.key_pem, &chain_pem, now) {
            Ok((info, certified)) => {
                for name in wanted {
                    self.store.insert(name, Arc::clone(&certified));
                }
                tracing::info!(%application_id, not_after = %info.not_after, "serving the stored certificate");
                entry.served = wanted.clone();
                entry.installed = Some(info);
            }
            Err(error) => tracing::info!(%error, "the stored certificate is not usable; asking for a new one"),
        }
        Ok(entry)
    }

    /// Removes the files of applications that are not desired (left by a removal while the
    /// agent was down, or by an earlier agent).
    fn remove_stray_files(&self, desired: &DesiredState) {
        let names = match self.state_dir.list_in(CERTS_DIR) {
            Ok(names) => names,
            Err(error) => {
                tracing::warn!(%error, "cannot list the stored certificates");
                return;
            }
        };
        for name in names {
            let desired_here = name
                .split_once('.')
                .and_then(|(stem, _)| stem.parse::<ApplicationId>().ok())
                .is_some_and(|application_id| desired.applications.contains_key(&application_id));
            if desired_here {
                continue;
            }
            match self.state_dir.remove_in(CERTS_DIR, &name) {
                Ok(_) => {
                    tracing::info!(file = %name, "removed the key or certificate of an application no longer here")
                }
                Err(error) => tracing::warn!(%error, "cannot remove a stored certificate"),
            }
        }
    }
}

/// Checks a chain against the application's key and hostnames: readable, exactly the names,
/// valid now, and the key's. Answers it ready to serve.
fn check(
    application_id: ApplicationId,
    wanted: &BTreeSet<String>,
    key_pem: &str,
    chain_pem: &[u8],
    now: DateTime<Utc>,
) -> Result<(CertificateInfo, Arc<CertifiedKey>), CertError> {
    let info = read_leaf(chain_pem).map_err(|message| CertError::Unreadable { application_id, message })?;
    if info.names != *wanted {
        return Err(CertError::Names { application_id, expected: wanted.clone(), found: info.names });
    }
    if now >= info.not_after {
        return Err(CertError::Expired { application_id, not_after: info.not_after });
    }
    let certified =
        certified_key(chain_pem, key_pem.as_bytes()).map_err(|source| CertError::Key { application_id, source })?;
    Ok((info, certified))
}

/// A PEM CSR for `hostnames` signed by the key. The names are subject alternative names and
/// the subject is the first of them: public ACME CAs refuse requests whose common name is not
/// one of the names (rcgen's default subject is a placeholder).
fn csr(key_pem: &str, hostnames: &BTreeSet<String>) -> Result<String, String> {
    let key = KeyPair::from_pem(key_pem).map_err(|error| error.to_string())?;
    let mut params =
        CertificateParams::new(hostnames.iter().cloned().collect::<Vec<_>>()).map_err(|error| error.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(first) = hostnames.iter().next() {
        params.distinguished_name.push(rcgen::DnType::CommonName, first.as_str());
    }
    let request = params.serialize_request(&key).map_err(|error| error.to_string())?;
    request.pem().map_err(|error| error.to_string())
}

fn key_file(application_id: ApplicationId) -> String {
    format!("{application_id}.key")
}

fn pem_file(application_id: ApplicationId) -> String {
    format!("{application_id}.pem")
}

#[cfg(test)]
pub(crate) mod tests {
    use edgible::model::Hostname;
    use rcgen::{BasicConstraints, CertificateSigningRequestParams, DnType, IsCa, Issuer, date_time_ymd};

    use super::*;
    use crate::reconcile::DesiredUpdate;
    use crate::reconcile::plan::tests::application;

    /// The test's CA: what the server's internal CA does, signing whatever CSR it is given.
    pub(crate) struct TestCa {
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub(crate) fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, "Edgible test CA");
            Self { issuer: Issuer::new(params, key) }
        }

        /// Signs a CSR as is, valid from 2020 to 2100 unless told otherwise.
        pub(crate) fn sign(&self, csr_pem: &str, years: Option<(i32, i32)>) -> String {
            let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
            let (from, to) = years.unwrap_or((2020, 2100));
            csr.params.not_before = date_time_ymd(from, 1, 1);
            csr.params.not_after = date_time_ymd(to, 1, 1);
            csr.signed_by(&self.issuer).unwrap().pem()
        }

        /// A certificate for `names` with a key of its own, not the agent's.
        fn sign_other_key(&self, names: &[&str]) -> String {
            let key = KeyPair::generate().unwrap();
            let csr = CertificateParams::new(names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>())
                .unwrap()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            self.sign(&csr, None)
        }
    }

    fn at(year: i32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap()
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    fn desired(applications: Vec<Application>) -> DesiredState {
        let mut desired = DesiredState::default();
        desired.apply(DesiredUpdate::full(1, applications));
        desired
    }

    fn issued(request: &CertificateRequest, chain_pem: String) -> IssuedCertificate {
        IssuedCertificate {
            application_id: request.application_id,
            chain_pem,
            hostnames: Vec::new(),
            not_after: at(2100),
        }
    }

    #[test]
    fn which_applications_need_a_certificate() {
        let web = names(&["web.example.test"]);
        let valid = CertificateInfo { names: web.clone(), not_before: at(2020), not_after: at(2023) };
        assert_eq!(need(&web, None, at(2021)), Some(Need::Missing));
        assert_eq!(need(&web, Some(&valid), at(2021)), None, "within the first two thirds");
        assert_eq!(need(&web, Some(&valid), at(2022)), Some(Need::Renewal), "two thirds are over at the start of 2022");
        assert_eq!(need(&web, Some(&valid), at(2023)), Some(Need::Expired));
        let more = names(&["web.example.test", "www.example.test"]);
        assert_eq!(need(&more, Some(&valid), at(2021)), Some(Need::NamesChanged), "a name was added");
        assert_eq!(need(&names(&[]), Some(&valid), at(2021)), Some(Need::NamesChanged), "a name was removed");
    }

    #[test]
    fn request_sign_install_restart_and_remove_against_a_ca() {
        let temp = tempfile::tempdir().unwrap();
        let state_dir = StateDir::open(temp.path()).unwrap();
        let ca = TestCa::new();
        let store = CertificateStore::new();
        let mut certificates = Certificates::new(state_dir.clone(), Arc::clone(&store), Duration::from_secs(30));
        let mut web = application("web", 1, "serve");
        web.spec.hostnames = vec!["web.example.test".parse().unwrap(), "*.web.example.test".parse().unwrap()];
        let state = desired(vec![web.clone()]);

        let requests = certificates.sync(&state, at(2026));
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.application_id, web.id);
        let key_path = temp.path().join(CERTS_DIR).join(format!("{}.key", web.id));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_path).unwrap().permissions()) & 0o777,
            0o600
        );
        let csr = CertificateSigningRequestParams::from_pem(&request.csr_pem).unwrap();
        assert_eq!(csr.params.subject_alt_names.len(), 2, "the hostnames are the CSR's names");
        let common_name = csr.params.distinguished_name.get(&rcgen::DnType::CommonName);
        assert!(
            format!("{common_name:?}").contains("\"*.web.example.test\""),
            "the subject is the first hostname, not rcgen's placeholder: {common_name:?}"
        );
        assert!(certificates.sync(&state, at(2026)).is_empty(), "no second request within the interval");

        // Refused: another key's certificate, and one for other names.
        let other_key = ca.sign_other_key(&["*.web.example.test", "web.example.test"]);
        assert!(matches!(certificates.install(&issued(request, other_key), at(2026)), Err(CertError::Key { .. })));
        let mut narrow = CertificateParams::new(vec!["web.example.test".to_owned()]).unwrap();
        narrow.distinguished_name = rcgen::DistinguishedName::new();
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
        let narrow_csr = narrow.serialize_request(&key).unwrap().pem().unwrap();
        let refused = certificates.install(&issued(request, ca.sign(&narrow_csr, None)), at(2026));
        assert!(matches!(refused, Err(CertError::Names { .. })), "{refused:?}");
        let expired = certificates.install(&issued(request, ca.sign(&request.csr_pem, Some((2020, 2021)))), at(2026));
        assert!(matches!(expired, Err(CertError::Expired { .. })), "{expired:?}");
        assert!(store.find("web.example.test").is_none(), "nothing refused is served");

        // Accepted: served under every hostname (the wildcard too), stored next to the key.
        certificates.install(&issued(request, ca.sign(&request.csr_pem, None)), at(2026)).unwrap();
        assert!(store.find("web.example.test").is_some());
        assert!(store.find("a.web.example.test").is_some());
        assert!(temp.path().join(CERTS_DIR).join(format!("{}.pem", web.id)).exists());
        assert!(certificates.sync(&state, at(2026)).is_empty(), "nothing more to ask");
        assert_eq!(certificates.sync(&state, at(2080)).len(), 1, "renewal after two thirds of 2020-2100");

        // A restart without the server serves what is stored, and asks for nothing.
        let restarted_store = CertificateStore::new();
        let mut restarted = Certificates::new(state_dir.clone(), Arc::clone(&restarted_store), Duration::from_secs(30));
        assert!(restarted.sync(&state, at(2026)).is_empty());
        assert!(restarted_store.find("web.example.test").is_some());

        // A changed hostname: the dropped name stops being served, and a new certificate is asked.
        let mut renamed = web.clone();
        renamed.spec.hostnames = vec!["web.example.test".parse::<Hostname>().unwrap()];
        let requests = restarted.sync(&desired(vec![renamed]), at(2026));
        assert_eq!(requests.len(), 1);
        assert!(restarted_store.find("a.web.example.test").is_none());
        assert!(
            restarted_store.find("web.example.test").is_some(),
            "the old certificate serves the kept name meanwhile"
        );

        // Removing the application removes its names and its files.
        assert!(restarted.sync(&DesiredState::default(), at(2026)).is_empty());
        assert!(restarted_store.find("web.example.test").is_none());
        assert_eq!(state_dir.list_in(CERTS_DIR).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_certificate_for_an_application_not_here_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let mut certificates =
            Certificates::new(StateDir::open(temp.path()).unwrap(), CertificateStore::new(), Duration::from_secs(30));
        let request = CertificateRequest { application_id: ApplicationId::new(), csr_pem: String::new() };
        let refused = certificates.install(&issued(&request, String::new()), at(2026));
        assert!(matches!(refused, Err(CertError::UnknownApplication(_))));
    }
}
