//! Sleep and wake of applications with a `sleep` policy, and the per-application usage counters
//! the proxy feeds.
//!
//! The [`SleepTable`] is shared by the proxy and the reconciler. The proxy tells it what
//! happens (a connection opened or closed, a request, bytes in and out) and asks it to have an
//! application awake before serving ([`SleepTable::ensure_awake`]). The reconciler asks it
//! which applications are idle ([`SleepTable::idle`]: awake, with a policy, no open
//! connection and no activity for the idle timeout), puts them to sleep through its drivers and
//! executes wakes ([`WakeWorkload`]). The table owns the coalescing: the first request to a
//! sleeping application starts one wake, every request arriving during it waits on the same
//! outcome, and the wake's deadline is the policy's `wake_timeout_seconds`.
//!
//! Time is tokio's clock, so tests drive it with paused time. The table keeps the counters of
//! usage ([`Counters`]) as atomics per application, handed to each connection once, so that
//! counting bytes takes no lock; [`SleepTable::take_usage`] turns them into one period's usage.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use edgible::model::{Application, ApplicationId, SleepMode, SleepPolicy};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::driver::Wake;

/// Executes wakes: starts or resumes the workload and waits until it is ready. The reconciler
/// implements it; tests use fakes.
#[async_trait::async_trait]
pub trait WakeWorkload: Send + Sync {
    /// Makes the application's workload run and answers once it is ready to serve.
    async fn wake(&self, application_id: ApplicationId) -> Result<(), String>;

    /// A wake failed or timed out: whatever it started must go back to sleep.
    fn failed(&self, application_id: ApplicationId, reason: String);
}

/// Where each application's workload listens (the drivers answer: `127.0.0.1` for processes
/// and containers, the guest's address for a microVM). The reconciler sets it on the table, so
/// that the proxy, which finds applications here, also finds where to reach them.
pub trait WorkloadAddresses: Send + Sync {
    /// `None` while no workload of the application runs.
    fn address(&self, application_id: ApplicationId) -> Option<IpAddr>;
}

/// Why a request could not be served by a sleeping application.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeError {
    #[error("the application did not wake within {0:?}")]
    TimedOut(Duration),
    #[error("the application could not be woken: {0}")]
    Failed(String),
    #[error("this agent cannot wake applications")]
    NoWaker,
}

/// Where an application is in its sleep cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepState {
    Awake,
    Sleeping,
    Waking,
}

/// The usage counters of one application, shared with its connections.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub wakes: AtomicU64,
    /// HTTP requests being answered (until their response body ends) and raw connections
    /// open: what a migration's quiesce or drain waits for. Not usage: never taken.
    pub in_flight: AtomicU64,
}

/// Counts one request (or raw connection) in flight while it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Counters>);

impl InFlight {
    pub fn new(counters: Arc<Counters>) -> Self {
        Counters::add(&counters.in_flight, 1);
        Self(counters)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How the proxy lets requests through to an application, set by migration steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gate {
    /// Serve as usual.
    #[default]
    Open,
    /// Quiesced: refuse new requests and raw connections (503, `Retry-After: 1`,
    /// `Connection: close`).
    Refuse,
    /// Draining: serve, but end every HTTP/1 connection after its response
    /// (`Connection: close`).
    Close,
}

impl Counters {
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    fn take(counter: &AtomicU64) -> u64 {
        counter.swap(0, Ordering::Relaxed)
    }
}

/// One application's usage over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub awake_ms: u64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wakes: u64,
}

impl Usage {
    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

type WakeOutcome = Option<Result<(), WakeError>>;

struct Entry {
    policy: Option<SleepPolicy>,
    state: SleepState,
    open: u64,
    last_activity: Instant,
    wake: Option<watch::Receiver<WakeOutcome>>,
    counters: Arc<Counters>,
    awake_since: Option<Instant>,
    awake: Duration,
}

impl Entry {
    fn new(policy: Option<SleepPolicy>, now: Instant) -> Self {
        Self {
            policy,
            state: SleepState::Awake,
            open: 0,
            last_activity: now,
            wake: None,
            counters: Arc::default(),
            awake_since: Some(now),
            awake: Duration::ZERO,
        }
    }

    fn fall_asleep(&mut self, now: Instant) {
        if let Some(since) = self.awake_since.take() {
            self.awake += now.saturating_duration_since(since);
        }
        self.state = SleepState::Sleeping;
    }

    fn usage(&mut self, now: Instant) -> Usage {
        if let Some(since) = self.awake_since.as_mut() {
            self.awake += now.saturating_duration_since(*since);
            *since = now;
        }
        let awake = std::mem::take(&mut self.awake);
        Usage {
            awake_ms: u64::try_from(awake.as_millis()).unwrap_or(u64::MAX),
            requests: Counters::take(&self.counters.requests),
            bytes_in: Counters::take(&self.counters.bytes_in),
            bytes_out: Counters::take(&self.counters.bytes_out),
            wakes: Counters::take(&self.counters.wakes),
        }
    }
}

#[derive(Default)]
struct Inner {
    apps: HashMap<ApplicationId, Entry>,
    /// Hostname (lower case, or a `*.` wildcard) to application.
    hostnames: HashMap<String, ApplicationId>,
    /// Applications no longer desired whose last usage was not taken yet.
    retired: Vec<(ApplicationId, Usage)>,
    /// Gates other than [`Gate::Open`], kept whether or not the application is desired.
    gates: HashMap<ApplicationId, Gate>,
}

/// See the module documentation.
pub struct SleepTable {
    inner: Mutex<Inner>,
    waker: Mutex<Option<Arc<dyn WakeWorkload>>>,
    addresses: Mutex<Option<Arc<dyn WorkloadAddresses>>>,
    /// Woken whenever a state changes, so the reconciler publishes it (phases `waking`).
    changed: Wake,
    /// Bumped whenever a gate changes, so that open connections can end themselves
    /// gracefully when their application's gate closes ([`SleepTable::gate_changes`]).
    gate_changes: watch::Sender<u64>,
}

impl SleepTable {
    pub fn new(changed: Wake) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            waker: Mutex::new(None),
            addresses: Mutex::new(None),
            changed,
            gate_changes: watch::Sender::new(0),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps coherent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_waker(&self, waker: Arc<dyn WakeWorkload>) {
        *self.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker);
    }

    pub fn set_addresses(&self, addresses: Arc<dyn WorkloadAddresses>) {
        *self.addresses.lock().unwrap_or_else(PoisonError::into_inner) = Some(addresses);
    }

    /// Where the application's workload listens now: asked at each request (and raw
    /// connection), after its wake, because a woken or restarted microVM may have another
    /// address than before. `127.0.0.1` when no one told the table (a proxy without a
    /// reconciler); `None` while no workload of the application runs.
    pub fn address(&self, application_id: ApplicationId) -> Option<IpAddr> {
        let addresses = self.addresses.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match addresses {
            Some(addresses) => addresses.address(application_id),
            None => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        }
    }

    /// Takes the desired applications: new ones start awake, gone ones are dropped (their
    /// last usage is kept for the next [`SleepTable::take_usage`]), policies are updated.
    pub fn set_applications<'a>(&self, applications: impl IntoIterator<Item = &'a Application>) {
        let now = Instant::now();
        let mut inner = self.inner();
        let mut hostnames = HashMap::new();
        let mut seen = Vec::new();
        for application in applications {
            seen.push(application.id);
            for hostname in &application.spec.hostnames {
                hostnames.insert(hostname.as_str().to_ascii_lowercase(), application.id);
            }
            let policy = application.spec.sleep.clone();
            inner
                .apps
                .entry(application.id)
                .and_modify(|entry| {
                    if policy.is_none() && entry.state == SleepState::Sleeping {
                        // Without a policy it must run; the reconciler wakes it.
                        entry.state = SleepState::Awake;
                        entry.awake_since = Some(now);
                    }
                    entry.policy = policy.clone();
                })
                .or_insert_with(|| Entry::new(policy, now));
        }
        let gone: Vec<ApplicationId> = inner.apps.keys().filter(|id| !seen.contains(id)).copied().collect();
        for application_id in gone {
            if let Some(mut entry) = inner.apps.remove(&application_id) {
                let usage = entry.usage(now);
                inner.retired.push((application_id, usage));
            }
        }
        inner.hostnames = hostnames;
    }

    /// Sets how the proxy lets requests through to the application (migration steps).
    pub fn set_gate(&self, application_id: ApplicationId, gate: Gate) {
        let mut inner = self.inner();
        if gate == Gate::Open {
            inner.gates.remove(&application_id);
        } else {
            inner.gates.insert(application_id, gate);
        }
        drop(inner);
        self.gate_changes.send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Changes whenever any gate does: a connection watches it and looks at its own
    /// application's [`SleepTable::gate`] when it changes.
    pub fn gate_changes(&self) -> watch::Receiver<u64> {
        self.gate_changes.subscribe()
    }

    /// The application's open proxied connections (0 for an unknown one).
    pub fn open_connections(&self, application_id: ApplicationId) -> u64 {
        self.inner().apps.get(&application_id).map_or(0, |entry| entry.open)
    }

    pub fn gate(&self, application_id: ApplicationId) -> Gate {
        self.inner().gates.get(&application_id).copied().unwrap_or_default()
    }

    /// The application's requests and raw connections in flight (0 for an unknown one).
    pub fn in_flight(&self, application_id: ApplicationId) -> u64 {
        self.inner().apps.get(&application_id).map_or(0, |entry| entry.counters.in_flight.load(Ordering::Relaxed))
    }

    /// The application serving `hostname`, and its counters.
    pub fn lookup(&self, hostname: &str) -> Option<(ApplicationId, Arc<Counters>)> {
        let inner = self.inner();
        let application_id = *crate::proxy::tls::lookup(&inner.hostnames, &hostname.to_ascii_lowercase())?;
        let counters = inner.apps.get(&application_id)?.counters.clone();
        Some((application_id, counters))
    }

    pub fn state(&self, application_id: ApplicationId) -> Option<SleepState> {
        self.inner().apps.get(&application_id).map(|entry| entry.state)
    }

    /// A proxied connection to the application opened; it counts as activity until dropped.
    pub fn open(self: &Arc<Self>, application_id: ApplicationId) -> ConnectionGuard {
        if let Some(entry) = self.inner().apps.get_mut(&application_id) {
            entry.open += 1;
            entry.last_activity = Instant::now();
        }
        ConnectionGuard { table: Arc::clone(self), application_id }
    }

    fn close(&self, application_id: ApplicationId) {
        let idle_now = {
            let mut inner = self.inner();
            let Some(entry) = inner.apps.get_mut(&application_id) else { return };
            entry.open = entry.open.saturating_sub(1);
            entry.last_activity = Instant::now();
            entry.open == 0 && entry.policy.is_some()
        };
        if idle_now {
            // The idle deadline starts now: let the reconciler plan its next pass by it.
            self.changed.wake();
        }
    }

    /// A request (or a raw connection) reached the application.
    pub fn touch(&self, application_id: ApplicationId) {
        if let Some(entry) = self.inner().apps.get_mut(&application_id) {
            entry.last_activity = Instant::now();
        }
    }

    /// The awake applications with a policy, no open connection and no activity for their
    /// idle timeout, with their mode.
    pub fn idle(&self, now: Instant) -> Vec<(ApplicationId, SleepMode)> {
        let inner = self.inner();
        let mut idle: Vec<(ApplicationId, SleepMode)> = inner
            .apps
            .iter()
            .filter_map(|(id, entry)| {
                let policy = entry.policy.as_ref()?;
                let timeout = Duration::from_secs(u64::from(policy.idle_timeout_seconds));
                let is_idle = entry.state == SleepState::Awake
                    && entry.open == 0
                    && now.saturating_duration_since(entry.last_activity) >= timeout;
                is_idle.then_some((*id, policy.mode))
            })
            .collect();
        idle.sort_by_key(|(id, _)| *id);
        idle
    }

    /// When the next application becomes idle if nothing happens meanwhile.
    pub fn next_idle(&self) -> Option<Instant> {
        let inner = self.inner();
        inner
            .apps
            .values()
            .filter(|entry| entry.state == SleepState::Awake && entry.open == 0)
            .filter_map(|entry| {
                let policy = entry.policy.as_ref()?;
                Some(entry.last_activity + Duration::from_secs(u64::from(policy.idle_timeout_seconds)))
            })
            .min()
    }

    /// Marks an idle application asleep, unless something happened since [`SleepTable::idle`]
    /// said it was idle; answers whether it did. The reconciler then stops or suspends it.
    pub fn begin_sleep(&self, application_id: ApplicationId, now: Instant) -> bool {
        let mut inner = self.inner();
        let Some(entry) = inner.apps.get_mut(&application_id) else { return false };
        let Some(policy) = &entry.policy else { return false };
        let timeout = Duration::from_secs(u64::from(policy.idle_timeout_seconds));
        if entry.state != SleepState::Awake
            || entry.open > 0
            || now.saturating_duration_since(entry.last_activity) < timeout
        {
            return false;
        }
        entry.fall_asleep(now);
        true
    }

    /// The reconciler could not put the application to sleep (or woke it for a change of its
    /// spec): it is awake.
    pub fn set_awake(&self, application_id: ApplicationId) {
        let now = Instant::now();
        if let Some(entry) = self.inner().apps.get_mut(&application_id)
            && entry.state == SleepState::Sleeping
        {
            entry.state = SleepState::Awake;
            entry.awake_since = Some(now);
            entry.last_activity = now;
        }
    }

    /// Answers once the application is awake: at once if it is, else after the one wake
    /// that every concurrent caller shares, started by the first. Applications the table
    /// does not know are treated as awake (they have no policy).
    pub async fn ensure_awake(self: &Arc<Self>, application_id: ApplicationId) -> Result<(), WakeError> {
        let mut outcome = {
            let mut inner = self.inner();
            let Some(entry) = inner.apps.get_mut(&application_id) else { return Ok(()) };
            entry.last_activity = Instant::now();
            match entry.state {
                SleepState::Awake => return Ok(()),
                SleepState::Waking => match &entry.wake {
                    Some(wake) => wake.clone(),
                    None => return Err(WakeError::Failed("the wake in progress was lost".to_owned())),
                },
                SleepState::Sleeping => {
                    let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    let Some(waker) = waker else { return Err(WakeError::NoWaker) };
                    let timeout = entry.policy.as_ref().map_or(Duration::from_secs(60), |policy| {
                        Duration::from_secs(u64::from(policy.wake_timeout_seconds))
                    });
                    let (sender, receiver) = watch::channel(None);
                    entry.state = SleepState::Waking;
                    entry.wake = Some(receiver.clone());
                    entry.awake_since = Some(Instant::now());
                    Counters::add(&entry.counters.wakes, 1);
                    tokio::spawn(Arc::clone(self).run_wake(application_id, waker, timeout, sender));
                    self.changed.wake();
                    receiver
                }
            }
        };
        match outcome.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Ok(())),
            Err(_) => Err(WakeError::Failed("the wake was abandoned".to_owned())),
        }
    }

    async fn run_wake(
        self: Arc<Self>,
        application_id: ApplicationId,
        waker: Arc<dyn WakeWorkload>,
        timeout: Duration,
        sender: watch::Sender<WakeOutcome>,
    ) {
        let result = match tokio::time::timeout(timeout, waker.wake(application_id)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(WakeError::Failed(reason)),
            Err(_) => Err(WakeError::TimedOut(timeout)),
        };
        {
            let now = Instant::now();
            let mut inner = self.inner();
            if let Some(entry) = inner.apps.get_mut(&application_id) {
                entry.wake = None;
                entry.last_activity = now;
                match &result {
                    Ok(()) => entry.state = SleepState::Awake,
                    Err(error) => {
                        // Told while the lock is held, so the reconciler hears of the failure
                        // before any later wake of the same application.
                        waker.failed(application_id, error.to_string());
                        entry.fall_asleep(now);
                    }
                }
            }
        }
        sender.send_replace(Some(result));
        self.changed.wake();
    }

    /// Each application's usage since the previous call (and that of applications that went
    /// away meanwhile); awake time counts every moment an application was desired and not
    /// sleeping.
    pub fn take_usage(&self) -> BTreeMap<ApplicationId, Usage> {
        let now = Instant::now();
        let mut inner = self.inner();
        let mut usage: BTreeMap<ApplicationId, Usage> =
            inner.apps.iter_mut().map(|(id, entry)| (*id, entry.usage(now))).collect();
        for (application_id, retired) in std::mem::take(&mut inner.retired) {
            let total = usage.entry(application_id).or_default();
            total.awake_ms += retired.awake_ms;
            total.requests += retired.requests;
            total.bytes_in += retired.bytes_in;
            total.bytes_out += retired.bytes_out;
            total.wakes += retired.wakes;
        }
        usage
    }
}

/// An open proxied connection; closing it (dropping the guard) counts as activity.
pub struct ConnectionGuard {
    table: Arc<SleepTable>,
    application_id: ApplicationId,
}

impl ConnectionGuard {
    pub fn application_id(&self) -> ApplicationId {
        self.application_id
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.table.close(self.application_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;

    use super::*;

    fn application(idle: u32, mode: &str, wake_timeout: u32) -> Application {
        serde_json::from_value(json!({
            "id": ApplicationId::new(),
            "organization_id": edgible::model::OrganizationId::new(),
            "revision": 1,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
            "spec": {
                "name": "web",
                "hostnames": ["web.example.test"],
                "port": 8080,
                "workload": {"process": {"command": "/bin/web"}},
                "sleep": {"idle_timeout_seconds": idle, "mode": mode, "wake_timeout_seconds": wake_timeout},
            },
        }))
        .expect("a valid application")
    }

    /// Wakes after `delay`, or fails when `fail` is set; counts its wakes and failures.
    #[derive(Default)]
    struct FakeWaker {
        delay: Duration,
        fail: bool,
        wakes: AtomicUsize,
        failures: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl WakeWorkload for FakeWaker {
        async fn wake(&self, _: ApplicationId) -> Result<(), String> {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.fail { Err("refused to start".to_owned()) } else { Ok(()) }
        }

        fn failed(&self, _: ApplicationId, reason: String) {
            self.failures.lock().expect("not poisoned").push(reason);
        }
    }

    struct GuestAddresses(ApplicationId);

    impl WorkloadAddresses for GuestAddresses {
        fn address(&self, application_id: ApplicationId) -> Option<IpAddr> {
            (application_id == self.0).then_some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)))
        }
    }

    #[test]
    fn workloads_are_at_loopback_until_the_drivers_tell_otherwise() {
        let table = SleepTable::new(Wake::new());
        let (app, other) = (ApplicationId::new(), ApplicationId::new());
        assert_eq!(table.address(app), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), "no reconciler: loopback");
        table.set_addresses(Arc::new(GuestAddresses(app)));
        assert_eq!(table.address(app), Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))));
        assert_eq!(table.address(other), None, "no workload runs for it");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_connections_and_after_the_timeout() {
        let table = SleepTable::new(Wake::new());
        let app = application(30, "stop", 10);
        table.set_applications([&app]);
        let start = Instant::now();
        assert!(table.idle(start).is_empty());
        assert_eq!(table.next_idle(), Some(start + Duration::from_secs(30)));

        tokio::time::advance(Duration::from_secs(20)).await;
        let connection = table.open(app.id);
        assert_eq!(table.next_idle(), None, "an open connection keeps it awake");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(table.idle(Instant::now()).is_empty());
        drop(connection);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(table.idle(Instant::now()).is_empty(), "the close restarted the idle timer");
        table.touch(app.id);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(table.idle(Instant::now()).is_empty(), "a request restarted it too");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(table.idle(Instant::now()), vec![(app.id, SleepMode::Stop)]);

        // A connection between `idle` and `begin_sleep` wins.
        let late = table.open(app.id);
        assert!(!table.begin_sleep(app.id, Instant::now()));
        drop(late);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(table.begin_sleep(app.id, Instant::now()));
        assert_eq!(table.state(app.id), Some(SleepState::Sleeping));
        assert!(table.idle(Instant::now()).is_empty(), "a sleeping application is not idle again");
    }

    #[tokio::test(start_paused = true)]
    async fn applications_without_a_policy_never_sleep() {
        let table = SleepTable::new(Wake::new());
        let mut app = application(10, "stop", 10);
        app.spec.sleep = None;
        table.set_applications([&app]);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(table.idle(Instant::now()).is_empty());
        assert!(!table.begin_sleep(app.id, Instant::now()));
        assert_eq!(table.ensure_awake(app.id).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_wake() {
        let table = SleepTable::new(Wake::new());
        let waker = Arc::new(FakeWaker { delay: Duration::from_millis(500), ..FakeWaker::default() });
        table.set_waker(waker.clone());
        let app = application(10, "suspend", 10);
        table.set_applications([&app]);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(table.begin_sleep(app.id, Instant::now()));

        let requests: Vec<_> = (0..20)
            .map(|_| {
                let table = Arc::clone(&table);
                tokio::spawn(async move { table.ensure_awake(app.id).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(table.state(app.id), Some(SleepState::Waking));
        for request in requests {
            assert_eq!(request.await.expect("joined"), Ok(()));
        }
        assert_eq!(waker.wakes.load(Ordering::SeqCst), 1, "one wake for all requests");
        assert_eq!(table.state(app.id), Some(SleepState::Awake));
        assert_eq!(table.ensure_awake(app.id).await, Ok(()));
        assert_eq!(waker.wakes.load(Ordering::SeqCst), 1, "an awake application is not woken");
        assert_eq!(table.take_usage()[&app.id].wakes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_slow_wake_fails_every_waiting_request_and_sleeps_again() {
        let table = SleepTable::new(Wake::new());
        let failing = Arc::new(FakeWaker { fail: true, ..FakeWaker::default() });
        table.set_waker(failing.clone());
        let app = application(10, "stop", 2);
        table.set_applications([&app]);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(table.begin_sleep(app.id, Instant::now()));
        let (first, second) = tokio::join!(table.ensure_awake(app.id), table.ensure_awake(app.id));
        assert_eq!(first, Err(WakeError::Failed("refused to start".to_owned())));
        assert_eq!(second, first);
        assert_eq!(table.state(app.id), Some(SleepState::Sleeping));
        assert_eq!(failing.failures.lock().expect("not poisoned").len(), 1);

        // Slower than the policy's wake timeout (2 s).
        let slow = Arc::new(FakeWaker { delay: Duration::from_secs(5), ..FakeWaker::default() });
        table.set_waker(slow.clone());
        assert_eq!(table.ensure_awake(app.id).await, Err(WakeError::TimedOut(Duration::from_secs(2))));
        assert_eq!(table.state(app.id), Some(SleepState::Sleeping));
        assert_eq!(slow.failures.lock().expect("not poisoned").len(), 1);
        assert_eq!(table.take_usage()[&app.id].wakes, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn usage_counts_awake_time_and_survives_removal_once() {
        let table = SleepTable::new(Wake::new());
        table.set_waker(Arc::new(FakeWaker::default()));
        let app = application(10, "stop", 10);
        table.set_applications([&app]);
        let (application_id, counters) = table.lookup("WEB.example.test").expect("known hostname");
        assert_eq!(application_id, app.id);
        Counters::add(&counters.requests, 3);
        Counters::add(&counters.bytes_in, 100);
        Counters::add(&counters.bytes_out, 2000);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(table.begin_sleep(app.id, Instant::now()));
        tokio::time::advance(Duration::from_secs(100)).await;
        let usage = table.take_usage()[&app.id];
        assert_eq!(
            usage,
            Usage { awake_ms: 10_000, requests: 3, bytes_in: 100, bytes_out: 2000, wakes: 0 },
            "asleep time is not awake time"
        );
        assert!(table.take_usage()[&app.id].is_zero());

        table.ensure_awake(app.id).await.expect("woken");
        tokio::time::advance(Duration::from_secs(4)).await;
        table.set_applications([]);
        assert!(table.lookup("web.example.test").is_none());
        let usage = table.take_usage();
        assert_eq!(usage[&app.id].awake_ms, 4000);
        assert_eq!(usage[&app.id].wakes, 1);
        assert!(table.take_usage().is_empty(), "a removed application is reported once");
    }
}
