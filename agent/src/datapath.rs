//! The device's data path: the WireGuard tunnel to the pool's edges, the proxy on the tunnel
//! address, and the certificates it serves.
//!
//! ```text
//!  push session ──welcome (tunnel network), edges, certificates──► DataPath ──► Tunnel (peers = edges)
//!  reconciler ──desired applications──────────────────────────────►    │    ──► Proxy on <tunnel address>:443
//!  host addresses (polled every second) ──changed──► nudge + reconnect  │        (routes, certificates,
//!                                                                      └─ certificate_request ─► session
//! ```
//!
//! One task owns it all and reacts to each input in turn:
//!
//! - `welcome` with a tunnel network starts the tunnel (once) as `tunnel_address/prefix`; the
//!   proxy binds on the tunnel address as soon as the interface is up. If the tunnel cannot start
//!   (not root, say), the error is logged and recorded as an event, workloads keep running, and
//!   the start is tried again every `retry_interval`. Every new session nudges the tunnel.
//! - `edges` become the tunnel's peers ([`edges`]: endpoints resolved, allowed IPs the edge's
//!   /32, persistent keepalive) and the proxy's accepted sources.
//! - Desired applications become the proxy's routes ([`routes`]) and certificates
//!   ([`certs`]): requested, checked, stored and installed; removed with their application.
//! - Their access policies, with the server's `access` message (login URL, assertion keys,
//!   session lifetime, digests of API keys and short codes), become the proxy's access table
//!   ([`access`]), replaced whole whenever either changes; the table is updated before the
//!   routes, so a new hostname is never routed before its policy is known.
//! - The last tunnel address, edges and `access` message are remembered in the state directory
//!   (`data-path.json`), so an agent restarting while the server is unreachable brings the
//!   tunnel and the proxy back, serving the certificates it stored and enforcing the policies
//!   it knew.
//! - A change of the host's IPv4 addresses ([`addresses`]) means the device moved: the tunnel
//!   is nudged (every edge hears from the new address at once, so WireGuard roaming moves the
//!   edge's view of the device) and the push session reconnects without waiting.

pub mod access;
pub mod addresses;
pub mod certs;
pub mod edges;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use edgible::model::EdgeId;
use edgible::protocol::v1::EdgePeer;
use edgible::tunnel::{PrivateKey, Tunnel, TunnelConfig};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::control::link::{AccessUpdate, DataPathLink, IssuedCertificate, Welcomed};
use crate::events::EventLog;
use crate::proxy::access::cookies::CookieKey;
use crate::proxy::{AccessControl, CertificateStore, EdgeSources, Proxy, ProxyConfig, RouteTable};
use crate::reconcile::DesiredState;
use crate::state::StateDir;
use crate::tasks::AbortOnDrop;

use self::certs::Certificates;

/// The file in the state directory that remembers the tunnel address and the edges.
pub const DATA_PATH_FILE: &str = "data-path.json";

/// What the data path remembers across restarts: what the server last said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    tunnel: Option<Ipv4Net>,
    edges: Vec<EdgePeer>,
    /// Absent in files of agents before access policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<AccessUpdate>,
}

/// How the data path is set up.
#[derive(Debug, Clone)]
pub struct DataPathConfig {
    /// The tunnel interface to create.
    pub interface_name: String,
    /// The proxy's port on the tunnel address.
    pub proxy_port: u16,
    /// The device's WireGuard key, as enrolled.
    pub private_key: PrivateKey,
    /// How often a tunnel that could not start, a proxy that could not bind, unresolved edge
    /// endpoints and certificate renewals are looked at again.
    pub retry_interval: Duration,
    /// The shortest time between two certificate requests for the same application.
    pub request_interval: Duration,
    /// How often the host's addresses are read.
    pub address_poll: Duration,
}

impl DataPathConfig {
    /// Defaults: retries every 10 s, requests at most every 30 s, addresses every second.
    pub fn new(interface_name: impl Into<String>, proxy_port: u16, private_key: PrivateKey) -> Self {
        Self {
            interface_name: interface_name.into(),
            proxy_port,
            private_key,
            retry_interval: Duration::from_secs(10),
            request_interval: Duration::from_secs(30),
            address_poll: Duration::from_secs(1),
        }
    }
}

/// What the data path is doing, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPathStatus {
    /// The tunnel's address, once it runs.
    pub tunnel: Option<Ipv4Net>,
    /// Where the proxy listens, once bound.
    pub proxy: Option<SocketAddr>,
    /// The tunnel's peers (edges with a resolved endpoint).
    pub peers: usize,
    /// The source addresses the proxy accepts.
    pub sources: BTreeSet<IpAddr>,
    /// Times the tunnel was nudged (device moved, session reconnected).
    pub nudges: u64,
    /// Times the host's addresses were seen to change.
    pub address_changes: u64,
}

/// A proxy bound on the tunnel address.
struct RunningProxy {
    address: SocketAddr,
    sources: Arc<EdgeSources>,
    stop: watch::Sender<bool>,
    task: AbortOnDrop,
}

/// The data path; build it with [`DataPath::new`], then [`DataPath::run`] it.
pub struct DataPath {
    config: DataPathConfig,
    state_dir: StateDir,
    events: EventLog,
    store: Arc<CertificateStore>,
    routes: Arc<RouteTable>,
    access: Arc<AccessControl>,
    /// The server's last `access` message (or the remembered one).
    received_access: Option<AccessUpdate>,
    certificates: Certificates,
    requests: mpsc::Sender<crate::control::link::CertificateRequest>,
    reconnect: watch::Sender<u64>,
    status: watch::Sender<DataPathStatus>,

    /// `tunnel_address/prefix`, from the last welcome.
    wanted: Option<Ipv4Net>,
    tunnel: Option<Tunnel>,
    next_tunnel_attempt: Option<Instant>,
    proxy: Option<RunningProxy>,
    /// The last failure reported as an event, so that a retry failing the same way does not
    /// flood the event log.
    reported: Option<String>,
    session: u64,

    edges: Vec<EdgePeer>,
    resolved: BTreeMap<EdgeId, SocketAddrV4>,
    unresolved: bool,

    desired: Arc<DesiredState>,
    host_addresses: Option<BTreeSet<(String, Ipv4Addr)>>,
    /// Nudges still to send after an address change, one per poll: the first may go out
    /// before the new route is usable.
    nudges_pending: u8,
    /// The reconciler's sleep table, for the proxy's wakes and usage counting.
    sleep: Option<Arc<crate::sleep::SleepTable>>,
}

/// The inputs of a data path, apart from its link's receivers.
struct Inputs {
    welcomed: watch::Receiver<Option<Welcomed>>,
    edges: watch::Receiver<Option<Vec<EdgePeer>>>,
    access: watch::Receiver<Option<AccessUpdate>>,
    certificates: mpsc::Receiver<IssuedCertificate>,
    desired: watch::Receiver<Arc<DesiredState>>,
}

impl DataPath {
    /// A data path fed by `link` and `desired`, recording events in `events`. Certificates
    /// live in `state_dir`.
    pub fn new(
        config: DataPathConfig,
        state_dir: StateDir,
        link: DataPathLink,
        desired: watch::Receiver<Arc<DesiredState>>,
        events: EventLog,
    ) -> (Self, DataPathInputs) {
        let store = CertificateStore::new();
        let certificates = Certificates::new(state_dir.clone(), Arc::clone(&store), config.request_interval);
        let DataPathLink { welcomed, edges, access, certificates: issued, requests, reconnect } = link;
        let key = match state_dir.cookie_key() {
            Ok(key) => CookieKey::new(key),
            Err(error) => {
                // Safe, not open: sessions then last only as long as this process.
                tracing::error!(%error, "cannot keep the proxy's cookie key; sessions end when the agent restarts");
                CookieKey::random()
            }
        };
        let data_path = Self {
            config,
            state_dir,
            events,
            store,
            routes: RouteTable::new(),
            access: AccessControl::new(key),
            received_access: None,
            certificates,
            requests,
            reconnect,
            status: watch::Sender::new(DataPathStatus::default()),
            wanted: None,
            tunnel: None,
            next_tunnel_attempt: None,
            proxy: None,
            reported: None,
            session: 0,
            edges: Vec::new(),
            resolved: BTreeMap::new(),
            unresolved: false,
            desired: Arc::default(),
            host_addresses: None,
            nudges_pending: 0,
            sleep: None,
        };
        let inputs = Inputs { welcomed, edges, access, certificates: issued, desired };
        (data_path, DataPathInputs(inputs))
    }

    /// Lets the proxy count usage and wake sleeping applications through `sleep`.
    pub fn with_sleep_table(mut self, sleep: Arc<crate::sleep::SleepTable>) -> Self {
        self.sleep = Some(sleep);
        self
    }

    /// The certificates the proxy serves.
    pub fn certificate_store(&self) -> Arc<CertificateStore> {
        Arc::clone(&self.store)
    }

    /// The proxy's routes.
    pub fn route_table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.routes)
    }

    /// The proxy's access policies.
    pub fn access_control(&self) -> Arc<AccessControl> {
        Arc::clone(&self.access)
    }

    pub fn status(&self) -> watch::Receiver<DataPathStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), then stops the proxy and
    /// removes the tunnel.
    pub async fn run(mut self, inputs: DataPathInputs, mut shutdown: watch::Receiver<bool>) {
        let Inputs { mut welcomed, mut edges, mut access, mut certificates, mut desired } = inputs.0;
        // What the state directory remembers is served at once, whether or not the server answers.
        let initial = Arc::clone(&desired.borrow_and_update());
        self.desired_changed(initial);
        self.recall().await;
        let mut retry = tokio::time::interval(self.config.retry_interval);
        retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.config.address_poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = crate::control::stopped(&mut shutdown) => break,
                welcome = changed(&mut welcomed) => {
                    if let Some(welcome) = welcome {
                        self.welcomed(welcome).await;
                    }
                }
                list = changed(&mut edges) => {
                    if let Some(list) = list {
                        self.edges_changed(list).await;
                    }
                }
                update = changed(&mut access) => {
                    if let Some(update) = update {
                        self.access_changed(update);
                    }
                }
                state = changed(&mut desired) => self.desired_changed(state),
                issued = receive(&mut certificates) => self.certificate(&issued),
                _ = retry.tick() => self.retry().await,
                _ = poll.tick() => self.poll_addresses(),
            }
            self.publish();
        }
        self.stop_proxy().await;
        if let Some(tunnel) = self.tunnel.take() {
            tunnel.shutdown();
        }
        self.publish();
    }

    async fn welcomed(&mut self, welcome: Welcomed) {
        if welcome.session != self.session {
            self.session = welcome.session;
            // A new session may follow a path change the address poll did not see (NAT
            // rebinding, an upstream move): the edges hear from this device right away.
            self.nudge();
        }
        let wanted = welcome.tunnel_cidr.map(|cidr| {
            // The prefix comes from a parsed network, so it is always valid.
            Ipv4Net::new(welcome.tunnel_address, cidr.prefix_len()).unwrap_or(cidr)
        });
        if wanted == self.wanted {
            return;
        }
        tracing::info!(tunnel = ?wanted, "the tunnel address changed");
        self.wanted = wanted;
        self.remember();
        self.stop_proxy().await;
        if let Some(tunnel) = self.tunnel.take() {
            tunnel.shutdown();
        }
        self.next_tunnel_attempt = None;
        self.ensure_running().await;
    }

    async fn edges_changed(&mut self, edges: Vec<EdgePeer>) {
        self.edges = edges;
        self.remember();
        self.resolve().await;
        self.apply_edges();
    }

    /// Starts from what the server said before the agent restarted, if anything.
    async fn recall(&mut self) {
        let remembered = match self.state_dir.read_file(DATA_PATH_FILE) {
            Ok(Some(bytes)) => match serde_json::from_slice::<Remembered>(&bytes) {
                Ok(remembered) => remembered,
                Err(error) => {
                    tracing::warn!(%error, "ignoring an unreadable {DATA_PATH_FILE}");
                    return;
                }
            },
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot read what the data path remembers");
                return;
            }
        };
        tracing::info!(tunnel = ?remembered.tunnel, edges = remembered.edges.len(), "resuming the last data path");
        self.wanted = remembered.tunnel;
        self.edges = remembered.edges;
        // A newer message may have arrived before the file was read; it wins.
        if self.received_access.is_none() && remembered.access.is_some() {
            self.received_access = remembered.access;
            self.apply_access();
        }
        self.resolve().await;
        self.ensure_running().await;
        self.apply_edges();
    }

    /// Writes what the server said last, for the next start.
    fn remember(&self) {
        let remembered =
            Remembered { tunnel: self.wanted, edges: self.edges.clone(), access: self.received_access.clone() };
        // Addresses, keys and strings always serialize.
        let bytes = serde_json::to_vec_pretty(&remembered).unwrap_or_default();
        if let Err(error) = self.state_dir.write_file(DATA_PATH_FILE, &bytes) {
            tracing::warn!(%error, "cannot remember the data path's configuration");
        }
    }

    /// Resolves the edges' endpoints; an endpoint that fails keeps its previous address.
    async fn resolve(&mut self) {
        let (resolved, errors) = edges::resolve_all(&self.edges).await;
        for error in &errors {
            tracing::warn!(%error, "an edge is unreachable for now");
        }
        let current: BTreeSet<EdgeId> = self.edges.iter().map(|edge| edge.edge_id).collect();
        self.resolved.retain(|edge_id, _| current.contains(edge_id));
        self.resolved.extend(resolved);
        self.unresolved = !errors.is_empty();
    }

    /// Hands the edges to the tunnel and the proxy.
    fn apply_edges(&mut self) {
        let (peers, errors) = edges::peers(&self.edges, &self.resolved);
        for error in &errors {
            tracing::error!(%error, "the server sent an edge that cannot be a peer");
        }
        if let Some(tunnel) = &self.tunnel
            && let Err(error) = tunnel.set_peers(peers)
        {
            tracing::error!(%error, "cannot set the tunnel's peers");
            self.report(format!("the pool's edges cannot be the tunnel's peers: {error}"));
        }
        if let Some(proxy) = &self.proxy {
            proxy.sources.replace(edges::sources(&self.edges));
        }
    }

    fn access_changed(&mut self, update: AccessUpdate) {
        tracing::info!(applications = update.applications.len(), "the access configuration changed");
        self.received_access = Some(update);
        self.remember();
        self.apply_access();
    }

    /// Hands the policies of the desired applications, with the server's settings and
    /// secrets, to the proxy.
    fn apply_access(&self) {
        self.access.replace(access::table(&self.desired, self.received_access.as_ref()));
    }

    fn desired_changed(&mut self, desired: Arc<DesiredState>) {
        // Policies first: a new hostname must not be routed while its policy is unknown.
        self.access.replace(access::table(&desired, self.received_access.as_ref()));
        self.routes.replace(routes::routes(&desired));
        self.desired = desired;
        self.request_certificates();
    }

    fn request_certificates(&mut self) {
        for request in self.certificates.sync(&self.desired, Utc::now()) {
            let application_id = request.application_id;
            if let Err(error) = self.requests.try_send(request) {
                tracing::warn!(%application_id, %error, "cannot queue a certificate request; asking again later");
            }
        }
    }

    fn certificate(&mut self, issued: &IssuedCertificate) {
        if let Err(error) = self.certificates.install(issued, Utc::now()) {
            tracing::error!(%error, "refused a certificate from the server");
            self.events.record(Some(issued.application_id), format!("refused a certificate: {error}"));
        }
    }

    async fn retry(&mut self) {
        if self.unresolved {
            self.resolve().await;
            self.apply_edges();
        }
        self.ensure_running().await;
        // Renewals, and requests the server did not answer.
        self.request_certificates();
    }

    /// Starts the tunnel and binds the proxy if they should run and do not.
    async fn ensure_running(&mut self) {
        if self.tunnel.as_ref().is_some_and(|tunnel| !tunnel.is_running()) {
            self.stop_proxy().await;
            self.tunnel = None;
            self.report("the tunnel stopped; starting it again".to_owned());
        }
        let Some(address) = self.wanted else { return };
        if self.tunnel.is_none() {
            if self.next_tunnel_attempt.is_some_and(|at| Instant::now() < at) {
                return;
            }
            let (peers, _) = edges::peers(&self.edges, &self.resolved);
            let config = TunnelConfig {
                interface_name: self.config.interface_name.clone(),
                private_key: self.config.private_key.clone(),
                address,
                listen_port: None,
                peers,
            };
            match Tunnel::start(config) {
                Ok(tunnel) => {
                    self.tunnel = Some(tunnel);
                    self.next_tunnel_attempt = None;
                    self.reported = None;
                    self.events.record(None, format!("tunnel {} up as {address}", self.config.interface_name));
                }
                Err(error) => {
                    tracing::error!(
                        %error,
                        retry_seconds = self.config.retry_interval.as_secs(),
                        "cannot start the tunnel; workloads keep running but are not reachable through the edges"
                    );
                    self.report(format!("cannot start the tunnel: {error}"));
                    self.next_tunnel_attempt = Some(Instant::now() + self.config.retry_interval);
                    return;
                }
            }
        }
        if self.proxy.is_none() {
            self.bind_proxy(address.addr()).await;
        }
    }

    async fn bind_proxy(&mut self, address: Ipv4Addr) {
        let listen = SocketAddr::from((address, self.config.proxy_port));
        let config = ProxyConfig::new(listen, edges::sources(&self.edges));
        let bound = match &self.sleep {
            Some(sleep) => {
                let (store, routes, access) =
                    (Arc::clone(&self.store), Arc::clone(&self.routes), Arc::clone(&self.access));
                Proxy::bind_with_sleep(config, store, routes, access, Arc::clone(sleep)).await
            }
            None => {
                Proxy::bind_with_access(
                    config,
                    Arc::clone(&self.store),
                    Arc::clone(&self.routes),
                    Arc::clone(&self.access),
                )
                .await
            }
        };
        match bound {
            Ok(proxy) => {
                let address = proxy.local_addr().unwrap_or(listen);
                let sources = proxy.edges();
                let (stop, stopped) = watch::channel(false);
                let task = AbortOnDrop::new(tokio::spawn(proxy.run(stopped)));
                tracing::info!(%address, "the proxy listens");
                self.proxy = Some(RunningProxy { address, sources, stop, task });
            }
            Err(error) => {
                tracing::error!(%error, "cannot start the proxy; trying again later");
                self.report(format!("cannot start the proxy: {error}"));
            }
        }
    }

    async fn stop_proxy(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            let _ = proxy.stop.send(true);
            proxy.task.join(Duration::from_secs(1)).await;
        }
    }

    fn poll_addresses(&mut self) {
        match addresses::host_ipv4_addresses(&self.config.interface_name) {
            Ok(current) => {
                let moved = self.host_addresses.as_ref().is_some_and(|previous| *previous != current);
                if moved {
                    tracing::info!(addresses = ?current, "the host's addresses changed; nudging the edges and reconnecting");
                    self.status.send_modify(|status| status.address_changes += 1);
                    self.reconnect.send_modify(|count| *count += 1);
                    self.nudges_pending = 3;
                }
                self.host_addresses = Some(current);
            }
            Err(error) => tracing::warn!(%error, "cannot read the host's addresses"),
        }
        if self.nudges_pending > 0 {
            self.nudges_pending -= 1;
            self.nudge();
        }
    }

    fn nudge(&mut self) {
        if let Some(tunnel) = &self.tunnel {
            tunnel.nudge();
            self.status.send_modify(|status| status.nudges += 1);
        }
    }

    /// Records a failure as an event, unless it is the one reported last.
    fn report(&mut self, message: String) {
        if self.reported.as_deref() != Some(message.as_str()) {
            self.events.record(None, message.clone());
            self.reported = Some(message);
        }
    }

    fn publish(&self) {
        let tunnel = self.tunnel.as_ref().map(Tunnel::address);
        let proxy = self.proxy.as_ref().map(|proxy| proxy.address);
        let peers = self.tunnel.as_ref().map_or(0, |tunnel| tunnel.peers().len());
        let sources = edges::sources(&self.edges).into_iter().collect();
        self.status.send_if_modified(|status| {
            let next = DataPathStatus { tunnel, proxy, peers, sources, ..status.clone() };
            let modified = *status != next;
            *status = next;
            modified
        });
    }
}

/// The inputs [`DataPath::run`] takes, made by [`DataPath::new`].
pub struct DataPathInputs(Inputs);

/// The next value of a watch; never completes once its sender is gone.
async fn changed<T: Clone>(receiver: &mut watch::Receiver<T>) -> T {
    if receiver.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    receiver.borrow_and_update().clone()
}

/// The next item of a queue; never completes once its senders are gone.
async fn receive<T>(receiver: &mut mpsc::Receiver<T>) -> T {
    match receiver.recv().await {
        Some(item) => item,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use edgible::model::Hostname;

    use super::*;
    use crate::control::link::{AccessUpdate, IssuedCertificate, link};
    use crate::datapath::certs::tests::TestCa;
    use crate::proxy::Route;
    use crate::reconcile::DesiredUpdate;
    use crate::reconcile::plan::tests::application;

    /// Checks `condition` every 10 ms until it holds, for at most 10 s.
    async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn without_a_tunnel_certificates_and_routes_still_follow_desired_state() {
        let temp = tempfile::tempdir().unwrap();
        let (session, link) = link();
        let (desired, desired_rx) = watch::channel(Arc::new(DesiredState::default()));
        let events = EventLog::new(64);
        // An interface name the kernel refuses: the tunnel cannot start, as without root.
        let config = DataPathConfig::new("not a name", 0, PrivateKey::generate().unwrap());
        let (data_path, inputs) =
            DataPath::new(config, StateDir::open(temp.path()).unwrap(), link, desired_rx, events.clone());
        let (store, routes, status) = (data_path.certificate_store(), data_path.route_table(), data_path.status());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(data_path.run(inputs, stopped));

        session.welcomed(Ipv4Addr::new(100, 96, 0, 2), Some("100.96.0.0/16".parse().unwrap()));
        eventually("the tunnel's failure as an event", || {
            events.snapshot().iter().any(|event| event.message.starts_with("cannot start the tunnel"))
        })
        .await;

        let mut web = application("web", 1, "serve");
        web.spec.hostnames = vec!["web.example.test".parse::<Hostname>().unwrap()];
        let mut state = DesiredState::default();
        state.apply(DesiredUpdate::full(1, vec![web.clone()]));
        desired.send_replace(Arc::new(state));

        let request = tokio::time::timeout(Duration::from_secs(10), async { session.requests().await.recv().await })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request.application_id, web.id);
        let chain_pem = TestCa::new().sign(&request.csr_pem, None);
        session.certificate(IssuedCertificate {
            application_id: web.id,
            chain_pem,
            hostnames: web.spec.hostnames.clone(),
            not_after: Utc::now(),
        });
        eventually("the certificate served", || store.find("web.example.test").is_some()).await;
        assert_eq!(routes.find("web.example.test"), Some(Route { port: 8080, raw_tcp: false }));
        assert_eq!(status.borrow().tunnel, None);
        stop.send(true).unwrap();
        task.await.unwrap();

        // A restart without the server: the tunnel is tried from what was remembered, and the
        // stored certificate is served without asking again.
        let (session, link) = crate::control::link::link();
        let (desired, desired_rx) = watch::channel(Arc::clone(&desired.borrow()));
        let events = EventLog::new(64);
        let config = DataPathConfig::new("not a name", 0, PrivateKey::generate().unwrap());
        let (data_path, inputs) =
            DataPath::new(config, StateDir::open(temp.path()).unwrap(), link, desired_rx, events.clone());
        let (store, routes) = (data_path.certificate_store(), data_path.route_table());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(data_path.run(inputs, stopped));
        eventually("the remembered tunnel tried", || {
            events.snapshot().iter().any(|event| event.message.starts_with("cannot start the tunnel"))
        })
        .await;
        assert!(store.find("web.example.test").is_some(), "the stored certificate is served");
        assert!(session.requests().await.try_recv().is_err(), "nothing is asked");

        desired.send_replace(Arc::new(DesiredState::default()));
        eventually("the application's removal", || {
            store.find("web.example.test").is_none() && routes.find("web.example.test").is_none()
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    /// Asks the proxy's access check about one request for `web.example.test`.
    async fn status_of(access: &AccessControl, key: Option<&str>) -> http::StatusCode {
        use bytes::Bytes;
        use http_body_util::Full;
        let mut request = http::Request::get("/").header(http::header::HOST, "web.example.test");
        if let Some(key) = key {
            request = request.header("x-edgible-key", key);
        }
        let request = request.body(Full::new(Bytes::new())).unwrap();
        let visit = crate::proxy::access::Visit::now("web.example.test", "203.0.113.7:40000".parse().unwrap());
        match access.authorize(request, &visit).await {
            Ok(_) => http::StatusCode::OK,
            Err(response) => response.status(),
        }
    }

    #[tokio::test]
    async fn policies_follow_desired_state_and_access_and_survive_a_restart_without_the_server() {
        use edgible::model::ApiKeyAccess;
        use edgible::protocol::v1::{AccessKeyDigest, ApplicationAccess};

        let temp = tempfile::tempdir().unwrap();
        let mut web = application("web", 1, "serve");
        web.spec.hostnames = vec!["web.example.test".parse::<Hostname>().unwrap()];
        web.spec.access.api_key = Some(ApiKeyAccess {});
        let mut state = DesiredState::default();
        state.apply(DesiredUpdate::full(1, vec![web.clone()]));
        let desired_state = Arc::new(state);
        let start = |link| {
            let (_desired, desired_rx) = watch::channel(Arc::clone(&desired_state));
            let config = DataPathConfig::new("not a name", 0, PrivateKey::generate().unwrap());
            let (data_path, inputs) =
                DataPath::new(config, StateDir::open(temp.path()).unwrap(), link, desired_rx, EventLog::new(64));
            let access = data_path.access_control();
            let (stop, stopped) = watch::channel(false);
            (access, stop, tokio::spawn(data_path.run(inputs, stopped)), _desired)
        };

        let (session, data_path_link) = link();
        let (access, stop, task, _desired) = start(data_path_link);
        // The policy is known, the server's keys are not: refused, never open.
        eventually("the policy in the table", || {
            access.snapshot().settings().is_none() && !access.allows_raw("web.example.test")
        })
        .await;
        assert_eq!(status_of(&access, Some("edg_key")).await, http::StatusCode::SERVICE_UNAVAILABLE);

        session.access(AccessUpdate {
            login_url: "https://login.example.test".into(),
            assertion_keys: Vec::new(),
            session_ttl_seconds: 300,
            applications: vec![ApplicationAccess {
                application_id: web.id,
                api_keys: vec![AccessKeyDigest { sha256: edgible::access::sha256_hex("edg_key"), expires_at: None }],
                short_code: None,
            }],
        });
        eventually("the access configuration", || access.snapshot().settings().is_some()).await;
        assert_eq!(status_of(&access, Some("edg_key")).await, http::StatusCode::OK);
        assert_eq!(status_of(&access, None).await, http::StatusCode::UNAUTHORIZED);
        stop.send(true).unwrap();
        task.await.unwrap();

        // A restart without the server enforces what was remembered.
        let (_session, data_path_link) = link();
        let (access, stop, task, _desired) = start(data_path_link);
        eventually("the remembered access configuration", || access.snapshot().settings().is_some()).await;
        assert_eq!(status_of(&access, Some("edg_key")).await, http::StatusCode::OK);
        assert_eq!(status_of(&access, Some("edg_other")).await, http::StatusCode::UNAUTHORIZED);
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
