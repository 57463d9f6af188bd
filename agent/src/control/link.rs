//! What the push session and the data path ([`crate::datapath`]) hand each other.
//!
//! The session is the only connection to the server, but it knows nothing of tunnels, proxies
//! or certificates: it forwards what the server says about them (the pool's tunnel network in
//! `welcome`, `edges`, `certificate`, `access`) and sends the `certificate_request`s the data path queues.
//! The data path in turn asks the session to reconnect at once when the device moved networks.
//! [`link`] makes the two halves: [`SessionLink`] for [`super::run`], [`DataPathLink`] for the
//! data path. Values that are "the latest state" travel in watches (a reconnecting session
//! simply replaces them); certificates and requests travel in bounded queues.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use edgible::access::AssertionKey;
use edgible::model::{ApplicationId, Hostname};
use edgible::protocol::v1::{ApplicationAccess, EdgePeer};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard, mpsc, watch};

/// Certificates received and not yet taken by the data path; beyond this they are dropped
/// (the data path asks again later).
const CERTIFICATE_QUEUE: usize = 64;
/// Certificate requests the data path queued and the session did not send yet.
const REQUEST_QUEUE: usize = 64;

/// What a `welcome` told about the device's place in its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    /// Counts the sessions welcomed since the agent started (1 for the first), so that the data
    /// path notices every reconnect, also one with an unchanged welcome.
    pub session: u64,
    pub tunnel_address: Ipv4Addr,
    /// The pool's tunnel network; `None` from a server without a data path.
    pub tunnel_cidr: Option<Ipv4Net>,
}

/// A certificate the server signed for an application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub application_id: ApplicationId,
    /// Leaf first, in PEM.
    pub chain_pem: String,
    pub hostnames: Vec<Hostname>,
    pub not_after: DateTime<Utc>,
}

/// What the server's `access` message said: what the proxy needs to enforce access policies.
/// Always the whole set; the data path remembers the last one across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessUpdate {
    pub login_url: String,
    pub assertion_keys: Vec<AssertionKey>,
    pub session_ttl_seconds: u64,
    pub applications: Vec<ApplicationAccess>,
}

/// A `certificate_request` to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    pub application_id: ApplicationId,
    pub csr_pem: String,
}

/// The session's half. Its methods are what a session does; tests of the data path play the
/// session through them.
#[derive(Debug)]
pub struct SessionLink {
    welcomed: watch::Sender<Option<Welcomed>>,
    edges: watch::Sender<Option<Vec<EdgePeer>>>,
    access: watch::Sender<Option<AccessUpdate>>,
    certificates: mpsc::Sender<IssuedCertificate>,
    /// Locked by the writer of the current session for its whole life.
    requests: Mutex<mpsc::Receiver<CertificateRequest>>,
    reconnect: watch::Receiver<u64>,
}

/// The data path's half.
#[derive(Debug)]
pub struct DataPathLink {
    pub welcomed: watch::Receiver<Option<Welcomed>>,
    /// The pool's edges as last sent: the whole set each time.
    pub edges: watch::Receiver<Option<Vec<EdgePeer>>>,
    /// The access configuration as last sent: the whole of it each time.
    pub access: watch::Receiver<Option<AccessUpdate>>,
    pub certificates: mpsc::Receiver<IssuedCertificate>,
    pub requests: mpsc::Sender<CertificateRequest>,
    /// Bumped to make the session reconnect now (the device's addresses changed).
    pub reconnect: watch::Sender<u64>,
}

/// The two halves of one link.
pub fn link() -> (SessionLink, DataPathLink) {
    let (welcomed_tx, welcomed_rx) = watch::channel(None);
    let (edges_tx, edges_rx) = watch::channel(None);
    let (access_tx, access_rx) = watch::channel(None);
    let (certificates_tx, certificates_rx) = mpsc::channel(CERTIFICATE_QUEUE);
    let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
    let (reconnect_tx, reconnect_rx) = watch::channel(0);
    let session = SessionLink {
        welcomed: welcomed_tx,
        edges: edges_tx,
        access: access_tx,
        certificates: certificates_tx,
        requests: Mutex::new(requests_rx),
        reconnect: reconnect_rx,
    };
    let data_path = DataPathLink {
        welcomed: welcomed_rx,
        edges: edges_rx,
        access: access_rx,
        certificates: certificates_rx,
        requests: requests_tx,
        reconnect: reconnect_tx,
    };
    (session, data_path)
}

impl SessionLink {
    /// A session was welcomed.
    pub fn welcomed(&self, tunnel_address: Ipv4Addr, tunnel_cidr: Option<Ipv4Net>) {
        self.welcomed.send_modify(|welcomed| {
            let session = welcomed.as_ref().map_or(1, |previous| previous.session + 1);
            *welcomed = Some(Welcomed { session, tunnel_address, tunnel_cidr });
        });
    }

    pub fn edges(&self, edges: Vec<EdgePeer>) {
        self.edges.send_replace(Some(edges));
    }

    /// The server's access configuration, replacing the previous one.
    pub fn access(&self, access: AccessUpdate) {
        self.access.send_replace(Some(access));
    }

    /// Hands a certificate over without waiting: the reader must never block on the data path.
    pub fn certificate(&self, certificate: IssuedCertificate) {
        let application_id = certificate.application_id;
        if let Err(error) = self.certificates.try_send(certificate) {
            tracing::warn!(%application_id, %error, "dropped a certificate the data path did not take; it will ask again");
        }
    }

    /// The queue of requests to send, for the current session's writer.
    pub async fn requests(&self) -> MutexGuard<'_, mpsc::Receiver<CertificateRequest>> {
        self.requests.lock().await
    }

    /// A receiver that sees reconnect requests made from now on.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        let mut reconnect = self.reconnect.clone();
        reconnect.mark_unchanged();
        reconnect
    }
}

/// Completes at the next reconnect request; never, once the data path is gone.
pub(crate) async fn reconnect_requested(reconnect: &mut watch::Receiver<u64>) {
    if reconnect.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
