//! The ACME certificate manager (`--issuer acme`): one account per directory, and one order
//! per application and set of hostnames, answered over HTTP-01 by the edges of the device's
//! pool and finalized with the device's CSR. The private key never reaches the server.
//!
//! - Account: created once (`instant-acme`), its credentials sealed with the server key
//!   (`certs::sealed`) and stored per directory URL (`acme_accounts`); every later start
//!   restores it instead of registering again.
//! - Requests: a `certificate_request` for an application placed on the device (the agent
//!   session checked that, and that the CSR asks for exactly the hostnames) starts an order,
//!   or joins the one running for the same hostnames ([`super::orders::InFlight`]). Wildcards
//!   are refused: they need DNS-01, which is not configured.
//! - Orders are persisted (`acme_orders`: application, hostnames, order URL, state, CSR) before
//!   anything is asked of the CA, and updated as they progress; a starting server resumes the
//!   ones in flight ([`AcmeIssuer::resume`]) through their order URL, so a restart never
//!   creates a second order.
//! - HTTP-01: the pending authorizations' token and key authorization go on the
//!   [`ChallengeBoard`] of the device's pool, which every edge session of the pool sends in
//!   its `edge_config`. The CA is told a challenge is ready only once every connected edge of
//!   the pool acknowledged a configuration carrying it; with no edge connected for
//!   [`AcmeTiming::no_edge_timeout`] the order fails, saying so.
//! - Then: poll with bounded backoff, finalize with the CSR, download the chain, take the
//!   challenges down, record the certificate (`valid`, its `not_after`) and hand the chain to
//!   the device's current session, if it has one (otherwise the agent asks again: it
//!   re-requests every 30 s without a certificate, and renews at 2/3 of the lifetime).
//! - Failures are recorded as an event on the application with the CA's error, and as the
//!   certificate status `failed: ...`; the device keeps serving the certificate it has. The
//!   application's next order waits ([`super::orders::RetryGate`]: exponential from one minute
//!   to an hour, jittered); requests meanwhile are refused saying when.
//! - At most `--acme-max-concurrent-orders` orders talk to the CA at once (a semaphore);
//!   the others wait their turn.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use edgible::model::{Application, Device, DeviceId, DevicePoolId, EdgeId, Hostname};
use edgible::protocol::v1::{AcmeChallenge, ServerMessage};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, ExternalAccountKey, HttpClient,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::challenges::ChallengeBoard;
use super::orders::{Begin, CaStatus, InFlight, OrderKey, OrderState, RetryGate, Step, next_step};
use super::sealed::{SealError, ServerKey};
use crate::db::{CertificateState, Db, StoreError, StoredOrder};
use crate::hub::Hub;
use crate::hub::agent::Outbox;

/// How long the steps of an order may take.
#[derive(Debug, Clone)]
pub struct AcmeTiming {
    /// How long the connected edges of the pool may take to acknowledge the challenges.
    pub edge_ack_timeout: Duration,
    /// How long to wait for any edge of the pool to be connected before failing the order.
    pub no_edge_timeout: Duration,
    /// How long the CA may take to validate the challenges.
    pub validation_timeout: Duration,
    /// How long the CA may take to issue once finalized.
    pub issuance_timeout: Duration,
    /// The first delay between polls; it doubles up to the timeouts above. Short, because a
    /// CA usually validates and issues within tens of milliseconds and every poll interval is
    /// waited in full before the device gets its certificate; the doubling keeps a slow CA's
    /// polls few (seven in the first six seconds), and the CA's `Retry-After` wins when given.
    pub poll_delay: Duration,
}

impl Default for AcmeTiming {
    fn default() -> Self {
        Self {
            edge_ack_timeout: Duration::from_secs(30),
            no_edge_timeout: Duration::from_secs(10),
            validation_timeout: Duration::from_secs(120),
            issuance_timeout: Duration::from_secs(120),
            poll_delay: Duration::from_millis(50),
        }
    }
}

/// The ACME configuration, from the `--acme-*` flags.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The CA's directory URL (https).
    pub directory_url: String,
    /// `mailto:` contact URIs.
    pub contacts: Vec<String>,
    /// External Account Binding: key id and HMAC key.
    pub eab: Option<(String, Vec<u8>)>,
    /// Roots to trust for the CA's HTTPS instead of the system's.
    pub ca_bundle: Option<PathBuf>,
    pub max_concurrent_orders: usize,
    pub server_key: ServerKey,
    pub timing: AcmeTiming,
}

/// Why the ACME issuer could not start.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("--acme-directory {url}: {message}")]
    Directory { url: String, message: String },
    #[error("--acme-ca-bundle {path}: {message}")]
    CaBundle { path: PathBuf, message: String },
    #[error("--acme-eab-hmac-key: {0}")]
    EabKey(String),
    #[error("--acme-contact {contact}: not an e-mail address")]
    Contact { contact: String },
    #[error("cannot create or restore the ACME account at {url}: {source}")]
    Account {
        url: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the stored ACME account of {url} is unreadable: {message}")]
    Credentials { url: String, message: String },
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a certificate request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{hostnames}: wildcards need DNS-01, which is not configured")]
    Wildcard { hostnames: String },
    /// The application's last order failed; the next may start after a delay.
    #[error(
        "its last certificate order failed (see the application's events); the next starts in {}s",
        retry_in.as_secs().max(1)
    )]
    Backoff { retry_in: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an order ended without a certificate; the message is recorded for the user.
#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("the ACME CA: {0}")]
    Ca(#[from] instant_acme::Error),
    #[error("the CA refused the order: {0}")]
    Invalid(String),
    #[error("no edge of the device's pool is connected to answer the HTTP-01 challenge")]
    NoEdge,
    #[error("the pool's edges did not acknowledge the HTTP-01 challenges in time")]
    EdgesSilent,
    #[error("the CA offers no http-01 challenge for {0}")]
    NoHttp01(String),
    #[error("the stored CSR: {0}")]
    Csr(String),
    #[error("the issued chain: {0}")]
    Chain(String),
    #[error("the device or its application is gone")]
    Gone,
    #[error("the order did not progress")]
    Stuck,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AcmeSettings {
    /// The settings the `serve` flags give, checked; errors name the flag.
    pub fn from_config(config: &crate::config::ServeConfig) -> Result<Self, AcmeError> {
        let directory_url = config.acme_directory.clone().unwrap_or_default();
        if !directory_url.starts_with("https://") || directory_url.len() <= "https://".len() {
            return Err(AcmeError::Directory {
                url: directory_url,
                message: "must be an https:// URL (required with --issuer acme)".into(),
            });
        }
        let contacts = config
            .acme_contacts
            .iter()
            .map(|contact| {
                let address = contact.trim().trim_start_matches("mailto:");
                if address.is_empty() || !address.contains('@') || address.contains(char::is_whitespace) {
                    return Err(AcmeError::Contact { contact: contact.clone() });
                }
                Ok(format!("mailto:{address}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let eab = match (&config.acme_eab_kid, &config.acme_eab_hmac_key) {
            (Some(kid), Some(key)) => {
                let key = URL_SAFE_NO_PAD
                    .decode(key.trim().trim_end_matches('='))
                    .map_err(|error| AcmeError::EabKey(format!("not base64url: {error}")))?;
                Some((kid.clone(), key))
            }
            _ => None,
        };
        let key_file = config.server_key_file.as_deref().ok_or_else(|| {
            AcmeError::Seal(SealError::KeyFile { path: PathBuf::new(), message: "required with --issuer acme".into() })
        })?;
        Ok(Self {
            directory_url,
            contacts,
            eab,
            ca_bundle: config.acme_ca_bundle.clone(),
            max_concurrent_orders: usize::try_from(config.acme_max_concurrent_orders).unwrap_or(1).max(1),
            server_key: ServerKey::load_or_create(key_file)?,
            timing: AcmeTiming::default(),
        })
    }
}

/// An HTTP client for the CA that trusts exactly the roots in `bundle`.
fn bundle_client(bundle: &Path) -> Result<Box<dyn HttpClient>, AcmeError> {
    let error = |message: String| AcmeError::CaBundle { path: bundle.to_owned(), message };
    let pem = std::fs::read(bundle).map_err(|e| error(format!("cannot read it: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let certificate = certificate.map_err(|e| error(format!("not PEM certificates: {e}")))?;
        roots.add(certificate).map_err(|e| error(format!("an unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(error("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, BodyWrapper<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    Ok(Box::new(client))
}

/// The sealing purpose of an account's credentials: bound to the directory.
fn account_purpose(directory_url: &str) -> String {
    format!("edgible acme account {directory_url}")
}

/// Restores the stored account of the directory, or creates one and stores it.
async fn load_or_create_account(settings: &AcmeSettings, db: &Db) -> Result<Account, AcmeError> {
    let url = settings.directory_url.clone();
    let builder = || -> Result<instant_acme::AccountBuilder, AcmeError> {
        match &settings.ca_bundle {
            Some(bundle) => Ok(Account::builder_with_http(bundle_client(bundle)?)),
            None => Account::builder().map_err(|source| AcmeError::Account { url: url.clone(), source }),
        }
    };
    let purpose = account_purpose(&url);
    let credentials_error = |message: String| AcmeError::Credentials { url: url.clone(), message };
    let stored = match db.acme_account(&url).await? {
        Some(stored) => stored,
        None => {
            let contacts: Vec<&str> = settings.contacts.iter().map(String::as_str).collect();
            let new_account =
                NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
            let eab = settings.eab.as_ref().map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
            let (_, credentials) = builder()?
                .create(&new_account, url.clone(), eab.as_ref())
                .await
                .map_err(|source| AcmeError::Account { url: url.clone(), source })?;
            let json = serde_json::to_vec(&credentials).map_err(|e| credentials_error(e.to_string()))?;
            let sealed = settings.server_key.seal(&json, &purpose)?;
            tracing::info!(directory = %url, "created the ACME account");
            // Another server may have stored one meanwhile; everyone uses the stored one.
            db.store_acme_account(&url, &sealed).await?
        }
    };
    let json = settings.server_key.open(&stored, &purpose)?;
    let credentials: AccountCredentials =
        serde_json::from_slice(&json).map_err(|e| credentials_error(e.to_string()))?;
    builder()?.from_credentials(credentials).await.map_err(|source| AcmeError::Account { url: url.clone(), source })
}

/// What the ACME issuer needs of the rest of the server.
#[derive(Debug, Clone)]
pub struct IssuerLinks {
    pub db: Db,
    pub board: Arc<ChallengeBoard>,
    pub agent_hub: Arc<Hub<DeviceId>>,
    pub edge_hub: Arc<Hub<EdgeId>>,
    pub outbox: Arc<Outbox>,
}

/// The running certificate manager.
pub struct AcmeIssuer {
    directory_url: String,
    timing: AcmeTiming,
    account: Account,
    links: IssuerLinks,
    permits: Arc<Semaphore>,
    in_flight: Mutex<InFlight>,
    /// When applications whose last order failed may order again.
    retry: Mutex<RetryGate>,
    /// Turns true when the server stops: orders stop where they are and resume at the next
    /// start.
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer").field("directory_url", &self.directory_url).finish_non_exhaustive()
    }
}

/// A certificate the CA issued.
struct Issued {
    chain_pem: String,
    not_after: DateTime<Utc>,
}

impl AcmeIssuer {
    /// Restores (or creates) the account; nothing runs until [`AcmeIssuer::resume`] or a request.
    pub async fn start(settings: AcmeSettings, links: IssuerLinks) -> Result<Arc<Self>, AcmeError> {
        let account = load_or_create_account(&settings, &links.db).await?;
        tracing::info!(directory = %settings.directory_url, account = account.id(), "ACME account ready");
        Ok(Arc::new(Self {
            directory_url: settings.directory_url,
            timing: settings.timing,
            account,
            links,
            permits: Arc::new(Semaphore::new(settings.max_concurrent_orders)),
            in_flight: Mutex::default(),
            retry: Mutex::default(),
            stop: watch::channel(false).0,
        }))
    }

    /// Stops every running order where it stands; each stays in flight in the database and
    /// resumes at the next start.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn in_flight(&self) -> MutexGuard<'_, InFlight> {
        // Every change is a single insert or remove.
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retry(&self) -> MutexGuard<'_, RetryGate> {
        // Every change is a single insert or remove.
        self.retry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resumes the orders a previous run left in flight; answers how many.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, StoreError> {
        let orders = self.links.db.acme_orders_in_flight(&self.directory_url).await?;
        let count = orders.len();
        for order in orders {
            let key = OrderKey::new(order.application_id, &order.hostnames);
            if self.in_flight().begin(&key) == Begin::Join {
                // An older order for the same names; the newer one stands for both.
                self.links.db.update_acme_order(order.id, OrderState::Failed, None, Some("superseded")).await?;
                continue;
            }
            tracing::info!(order = %order.id, application = %order.application_id, "resuming an ACME order");
            tokio::spawn(Arc::clone(self).run(order, key));
        }
        Ok(count)
    }

    /// Takes a certificate request for `application` (placed on `device`, CSR checked):
    /// starts an order for all its hostnames or joins the one running.
    pub async fn request(
        self: &Arc<Self>,
        device: &Device,
        application: &Application,
        csr_pem: &str,
    ) -> Result<Begin, RequestError> {
        let wildcards: Vec<&str> =
            application.spec.hostnames.iter().filter(|name| name.is_wildcard()).map(Hostname::as_str).collect();
        if !wildcards.is_empty() {
            return Err(RequestError::Wildcard { hostnames: wildcards.join(", ") });
        }
        let key = OrderKey::new(application.id, &application.spec.hostnames);
        if let Some(retry_in) = self.retry().wait(application.id, Instant::now()) {
            return Err(RequestError::Backoff { retry_in });
        }
        if self.in_flight().begin(&key) == Begin::Join {
            return Ok(Begin::Join);
        }
        let db = &self.links.db;
        let created = db
            .create_acme_order(
                &self.directory_url,
                application.organization_id,
                application.id,
                device.id,
                &key.hostnames,
                csr_pem,
            )
            .await;
        let order = match created {
            Ok(order) => order,
            Err(error) => {
                self.in_flight().finish(&key);
                return Err(error.into());
            }
        };
        if let Err(error) =
            db.record_certificate(application.organization_id, application.id, &CertificateState::Pending).await
        {
            tracing::warn!(%error, "cannot record the certificate as pending");
        }
        tracing::info!(order = %order.id, application = %application.id, "started an ACME order");
        tokio::spawn(Arc::clone(self).run(order, key));
        Ok(Begin::Start)
    }

    /// Runs one order to its end and records the outcome.
    async fn run(self: Arc<Self>, order: StoredOrder, key: OrderKey) {
        let mut stop = self.stop.subscribe();
        // The permit is held until the outcome is recorded: an order counts against
        // `--acme-max-concurrent-orders` for as long as the database shows it in flight.
        let (result, _permit) = tokio::select! {
            result = async {
                // The semaphore is never closed.
                let permit = Arc::clone(&self.permits).acquire_owned().await;
                (self.drive(&order).await, permit)
            } => result,
            () = async {
                // The guard the wait answers with must not live on: the task moves threads.
                let _ = stop.wait_for(|stop| *stop).await;
            } => {
                tracing::info!(order = %order.id, "the server is stopping; the order resumes at the next start");
                self.take_down_challenges(order.id).await;
                self.in_flight().finish(&key);
                return;
            }
        };
        self.take_down_challenges(order.id).await;
        let db = &self.links.db;
        match result {
            Ok(issued) => {
                tracing::info!(order = %order.id, not_after = %issued.not_after, "the ACME CA issued a certificate");
                let recorded = db.update_acme_order(order.id, OrderState::Valid, None, None).await;
                let state = CertificateState::Valid { not_after: issued.not_after };
                let status = db.record_certificate(order.organization_id, order.application_id, &state).await;
                if let Err(error) = recorded.and(status) {
                    tracing::warn!(%error, "cannot record the issued certificate");
                }
                self.retry().succeeded(order.application_id);
                if self.in_flight().is_current(&key) {
                    self.deliver(&order, issued);
                }
            }
            Err(OrderError::Gone) => {
                tracing::info!(order = %order.id, "the order's device or application is gone; dropped");
                let _ = db.update_acme_order(order.id, OrderState::Failed, None, Some("gone")).await;
            }
            Err(error) => {
                let message = error.to_string();
                let jitter: f64 = rand::Rng::random(&mut rand::rng());
                let retry_in = self.retry().failed(order.application_id, Instant::now(), jitter);
                tracing::warn!(order = %order.id, %message, ?retry_in, "an ACME order failed");
                let _ = db.update_acme_order(order.id, OrderState::Failed, None, Some(&message)).await;
                let state = CertificateState::Failed { message: message.clone() };
                if let Err(error) = db.record_certificate(order.organization_id, order.application_id, &state).await {
                    tracing::warn!(%error, "cannot record the failed certificate");
                }
                self.record_failure(&order, &message).await;
            }
        }
        self.in_flight().finish(&key);
    }

    /// An event on the application saying why its certificate was not issued.
    async fn record_failure(&self, order: &StoredOrder, message: &str) {
        let db = &self.links.db;
        let device = match db.device(order.organization_id, order.device_id).await {
            Ok(device) => device,
            Err(error) => {
                tracing::warn!(%error, "cannot record the failure event: no device");
                return;
            }
        };
        let text = format!("certificate order for {} failed: {message}", hostnames_text(&order.hostnames));
        if let Err(error) = db.record_event(&device, Some(order.application_id), Utc::now(), &text).await {
            tracing::warn!(%error, "cannot record the failure event");
        }
    }

    /// Hands the chain to the device: to its current session at once, or, when it is not
    /// connected (an order resumed after a restart often completes before the agent is back),
    /// to the session it opens next, which sends the outbox right after the welcome. Without
    /// that, the agent's next request would cost a second order for a certificate already
    /// issued.
    fn deliver(&self, order: &StoredOrder, issued: Issued) {
        let message = ServerMessage::Certificate {
            application_id: order.application_id,
            chain_pem: issued.chain_pem,
            hostnames: order.hostnames.clone(),
            not_after: issued.not_after,
        };
        self.links.outbox.push(order.device_id, message);
        if self.links.agent_hub.contains(&order.device_id) {
            self.links.agent_hub.wake(&[order.device_id]);
        } else {
            tracing::info!(device = %order.device_id, "the device is offline; the certificate waits for its next session");
        }
    }

    /// The next steps of an order, from wherever it stands, until it has a certificate.
    async fn drive(&self, order: &StoredOrder) -> Result<Issued, OrderError> {
        let db = &self.links.db;
        let mut acme_order = match &order.order_url {
            Some(url) => self.account.order(url.clone()).await?,
            None => {
                let identifiers: Vec<Identifier> =
                    order.hostnames.iter().map(|name| Identifier::Dns(name.as_str().to_owned())).collect();
                let created = self.account.new_order(&NewOrder::new(&identifiers)).await?;
                db.update_acme_order(order.id, OrderState::Pending, Some(created.url()), None).await?;
                created
            }
        };
        // Each pass moves the order on by one step; five are more than any order needs.
        for _ in 0..5 {
            match next_step(Some(ca_status(acme_order.state().status))) {
                Step::Create => return Err(OrderError::Stuck),
                Step::AnswerChallenges => {
                    self.answer_challenges(order, &mut acme_order).await?;
                    let retries = self.retries(self.timing.validation_timeout);
                    acme_order.poll_ready(&retries).await?;
                }
                Step::Finalize => {
                    let csr = CertificateSigningRequestDer::from_pem_slice(order.csr_pem.as_bytes())
                        .map_err(|error| OrderError::Csr(error.to_string()))?;
                    acme_order.finalize_csr(csr.as_ref()).await?;
                    db.update_acme_order(order.id, OrderState::Finalized, None, None).await?;
                }
                Step::AwaitCertificate => {
                    let retries = self.retries(self.timing.issuance_timeout);
                    let chain_pem = acme_order.poll_certificate(&retries).await?;
                    let not_after = leaf_not_after(&chain_pem).map_err(OrderError::Chain)?;
                    return Ok(Issued { chain_pem, not_after });
                }
                Step::Fail => return Err(OrderError::Invalid(why_invalid(&mut acme_order).await)),
            }
        }
        Err(OrderError::Stuck)
    }

    fn retries(&self, timeout: Duration) -> RetryPolicy {
        RetryPolicy::new().initial_delay(self.timing.poll_delay).backoff(2.0).timeout(timeout)
    }

    /// Puts the pending authorizations' HTTP-01 challenges on the edges of the device's pool,
    /// waits for them to acknowledge, and tells the CA to validate.
    async fn answer_challenges(&self, order: &StoredOrder, acme_order: &mut Order) -> Result<(), OrderError> {
        let db = &self.links.db;
        let pool = match db.device(order.organization_id, order.device_id).await {
            Ok(device) => device.spec.pool_id,
            Err(StoreError::NotFound) => return Err(OrderError::Gone),
            Err(error) => return Err(error.into()),
        };
        let mut challenges = Vec::new();
        let mut authorizations = acme_order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            if authorization.status != AuthorizationStatus::Pending {
                continue;
            }
            let name = authorization.identifier().to_string();
            let challenge =
                authorization.challenge(ChallengeType::Http01).ok_or_else(|| OrderError::NoHttp01(name.clone()))?;
            let hostname: Hostname =
                name.parse().map_err(|_| OrderError::Invalid(format!("the CA named {name:?}, not a hostname")))?;
            challenges.push(AcmeChallenge {
                hostname,
                token: challenge.token.clone(),
                key_authorization: challenge.key_authorization().as_str().to_owned(),
            });
        }
        if challenges.is_empty() {
            return Ok(());
        }
        let generation = self.links.board.set(pool, order.id, challenges);
        self.wake_pool_edges(pool).await;
        self.wait_for_edges(pool, generation).await?;
        let mut authorizations = acme_order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            if authorization.status != AuthorizationStatus::Pending {
                continue;
            }
            let name = authorization.identifier().to_string();
            let mut challenge =
                authorization.challenge(ChallengeType::Http01).ok_or_else(|| OrderError::NoHttp01(name.clone()))?;
            challenge.set_ready().await?;
        }
        Ok(())
    }

    /// The connected edges of `pool`.
    async fn connected_edges(&self, pool: DevicePoolId) -> Result<Vec<EdgeId>, StoreError> {
        let edges = self.links.db.pool_edge_peers(pool).await?;
        Ok(edges.into_iter().map(|edge| edge.edge_id).filter(|edge| self.links.edge_hub.contains(edge)).collect())
    }

    async fn wake_pool_edges(&self, pool: DevicePoolId) {
        match self.links.db.pool_edge_peers(pool).await {
            Ok(edges) => {
                self.links.edge_hub.wake(&edges.into_iter().map(|edge| edge.edge_id).collect::<Vec<_>>());
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the pool's edges; waking every edge");
                self.links.edge_hub.wake_all();
            }
        }
    }

    /// Waits until every connected edge of `pool` acknowledged `generation` of its challenges.
    async fn wait_for_edges(&self, pool: DevicePoolId, generation: u64) -> Result<(), OrderError> {
        let started = Instant::now();
        let mut acks = self.links.board.subscribe();
        loop {
            let edges = self.connected_edges(pool).await?;
            if self.links.board.all_acked(pool, generation, &edges) {
                return Ok(());
            }
            let waited = started.elapsed();
            if edges.is_empty() && waited >= self.timing.no_edge_timeout {
                return Err(OrderError::NoEdge);
            }
            if waited >= self.timing.edge_ack_timeout {
                return Err(OrderError::EdgesSilent);
            }
            // Acks wake this at once; edges connecting are noticed within the poll.
            let _ = tokio::time::timeout(Duration::from_millis(200), acks.changed()).await;
        }
    }

    /// Removes an order's challenges from every pool and tells the edges.
    async fn take_down_challenges(&self, order: uuid::Uuid) {
        for pool in self.links.board.remove_order(order) {
            self.wake_pool_edges(pool).await;
        }
    }
}

fn ca_status(status: OrderStatus) -> CaStatus {
    match status {
        OrderStatus::Pending => CaStatus::Pending,
        OrderStatus::Ready => CaStatus::Ready,
        OrderStatus::Processing => CaStatus::Processing,
        OrderStatus::Valid => CaStatus::Valid,
        OrderStatus::Invalid => CaStatus::Invalid,
    }
}

/// The CA's reasons an order is invalid: the order's error and its challenges' errors.
async fn why_invalid(acme_order: &mut Order) -> String {
    let mut reasons = Vec::new();
    if let Some(problem) = &acme_order.state().error {
        reasons.push(problem.to_string());
    }
    let mut authorizations = acme_order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let name = authorization.identifier().to_string();
        if authorization.refresh().await.is_err() {
            continue;
        }
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                reasons.push(format!("{name}: {problem}"));
            }
        }
    }
    if reasons.is_empty() { "the order is invalid".to_owned() } else { reasons.join("; ") }
}

/// The expiry of the first certificate of a PEM chain.
fn leaf_not_after(chain_pem: &str) -> Result<DateTime<Utc>, String> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("no certificate")?
        .map_err(|error| error.to_string())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|error| error.to_string())?;
    DateTime::from_timestamp(parsed.validity().not_after.timestamp(), 0).ok_or_else(|| "not_after out of range".into())
}

fn hostnames_text(hostnames: &[Hostname]) -> String {
    hostnames.iter().map(Hostname::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_settings_and_bad_ones_are_named() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = dir.path().join("server.key");
        let key = key.to_str().expect("a UTF-8 path");
        let settings = |extra: &[&str]| {
            let mut args = vec!["edgible-server", "serve", "--database", "sqlite://x", "--issuer", "acme"];
            args.extend_from_slice(extra);
            let config = crate::config::Config::try_parse_from(args).expect("parses");
            let crate::config::Command::Serve(serve) = config.command else { panic!("serve") };
            AcmeSettings::from_config(&serve)
        };
        let ok = settings(&[
            "--acme-directory",
            "https://ca.example/dir",
            "--server-key-file",
            key,
            "--acme-contact",
            "ops@example.com,mailto:sec@example.com",
            "--acme-eab-kid",
            "kid-1",
            "--acme-eab-hmac-key",
            "c2VjcmV0",
        ])
        .expect("valid");
        assert_eq!(ok.contacts, ["mailto:ops@example.com", "mailto:sec@example.com"]);
        assert_eq!(ok.eab, Some(("kid-1".to_owned(), b"secret".to_vec())));
        assert!(std::path::Path::new(key).exists(), "the server key was created");

        let error =
            settings(&["--acme-directory", "http://ca.example/dir", "--server-key-file", key]).expect_err("http");
        assert!(error.to_string().starts_with("--acme-directory"), "{error}");
        let error =
            settings(&["--acme-directory", "https://ca/d", "--server-key-file", key, "--acme-contact", "nobody"])
                .expect_err("not an address");
        assert!(error.to_string().starts_with("--acme-contact"), "{error}");
        let error = settings(&[
            "--acme-directory",
            "https://ca/d",
            "--server-key-file",
            key,
            "--acme-eab-kid",
            "k",
            "--acme-eab-hmac-key",
            "!!",
        ])
        .expect_err("not base64url");
        assert!(error.to_string().starts_with("--acme-eab-hmac-key"), "{error}");
    }

    #[test]
    fn a_ca_bundle_must_hold_certificates() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("roots.pem");
        std::fs::write(&path, "nothing here").expect("written");
        let error = bundle_client(&path).err().expect("no certificates");
        assert!(error.to_string().starts_with("--acme-ca-bundle"), "{error}");
        let missing = bundle_client(&dir.path().join("missing.pem")).err().expect("missing");
        assert!(missing.to_string().contains("cannot read it"), "{missing}");
        let ca = crate::certs::CertificateAuthority::generate(Utc::now()).expect("a CA");
        std::fs::write(&path, ca.certificate_pem).expect("written");
        assert!(bundle_client(&path).is_ok());
    }

    #[test]
    fn the_leaf_expiry_is_read_from_the_chain() {
        let generated = crate::certs::CertificateAuthority::generate(Utc::now()).expect("a CA");
        let ca = crate::certs::CertificateAuthority::load(&generated.certificate_pem, &generated.key_pem).expect("ca");
        let key = rcgen::KeyPair::generate().expect("a key");
        let csr = rcgen::CertificateParams::new(vec!["a.example.test".to_owned()])
            .expect("names")
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let signed = ca.sign(&csr, &["a.example.test".parse().expect("name")], Utc::now()).expect("signed");
        let chain = format!("{}{}", signed.chain_pem, generated.certificate_pem);
        assert_eq!(leaf_not_after(&chain).expect("a leaf"), signed.not_after);
        assert!(leaf_not_after("").is_err());
    }
}
