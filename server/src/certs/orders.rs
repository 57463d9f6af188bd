//! The pure rules of ACME orders: which request starts an order and which joins one already
//! running ([`InFlight`]), how a persisted order's state is written ([`OrderState`]), and what
//! to do next given what the CA says about an order ([`next_step`]). No IO, so the rules are
//! tested on their own; `certs::acme` runs them against the CA and the database.
//!
//! One order per application and set of hostnames runs at a time: an agent asking again (its
//! 30 s throttle, a reconnect, a server restart resuming the order) joins it instead of
//! creating a duplicate, which is what keeps the CA's rate limits safe. A request for another
//! set of hostnames (the application's hostnames changed) starts a new order.

use std::collections::HashMap;
use std::time::Duration;

use edgible::model::{ApplicationId, Hostname};
use tokio::time::Instant;

/// What an order is for: one application and all of its hostnames, sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderKey {
    pub application_id: ApplicationId,
    pub hostnames: Vec<Hostname>,
}

impl OrderKey {
    pub fn new(application_id: ApplicationId, hostnames: &[Hostname]) -> Self {
        let mut hostnames = hostnames.to_vec();
        hostnames.sort();
        hostnames.dedup();
        Self { application_id, hostnames }
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// No order runs for these names: start one.
    Start,
    /// An order for exactly these names is running: its certificate will be delivered.
    Join,
}

/// The orders running in this process, one per application.
#[derive(Debug, Default)]
pub struct InFlight {
    running: HashMap<ApplicationId, Vec<Hostname>>,
}

impl InFlight {
    /// Records a request for `key`. An order for the same names is joined; one for other
    /// names (stale hostnames) is superseded: the new one is the application's order, and
    /// the old one's [`InFlight::finish`] no longer removes it.
    pub fn begin(&mut self, key: &OrderKey) -> Begin {
        match self.running.get(&key.application_id) {
            Some(hostnames) if *hostnames == key.hostnames => Begin::Join,
            _ => {
                self.running.insert(key.application_id, key.hostnames.clone());
                Begin::Start
            }
        }
    }

    /// Whether `key` is still the application's current order.
    pub fn is_current(&self, key: &OrderKey) -> bool {
        self.running.get(&key.application_id) == Some(&key.hostnames)
    }

    /// Records that the order for `key` ended (issued or failed).
    pub fn finish(&mut self, key: &OrderKey) {
        if self.is_current(key) {
            self.running.remove(&key.application_id);
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

/// After a failed order, how long an application waits before the next one: the CA's rate
/// limits count failures, and an agent asks again every 30 s. The delay doubles per failure in
/// a row from [`RETRY_FIRST`] up to [`RETRY_MAX`], with "equal jitter" (half fixed, half random)
/// so that many applications failing together (an edge outage) do not retry in step. A success
/// clears it.
#[derive(Debug, Default)]
pub struct RetryGate {
    failed: HashMap<ApplicationId, (u32, Instant)>,
}

/// The delay after the first failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(60);
/// The longest delay.
pub const RETRY_MAX: Duration = Duration::from_secs(60 * 60);

impl RetryGate {
    /// Records a failure at `now`; `jitter` in `[0, 1)` picks the random half. Answers the delay.
    pub fn failed(&mut self, application_id: ApplicationId, now: Instant, jitter: f64) -> Duration {
        let failures = self.failed.get(&application_id).map_or(0, |(failures, _)| *failures).saturating_add(1);
        let exponent = failures.saturating_sub(1).min(16);
        let ceiling = RETRY_FIRST.saturating_mul(1 << exponent).min(RETRY_MAX);
        let delay = ceiling / 2 + ceiling.div_f64(2.0).mul_f64(jitter.clamp(0.0, 1.0));
        self.failed.insert(application_id, (failures, now + delay));
        delay
    }

    /// Records a success: the next failure starts from [`RETRY_FIRST`] again.
    pub fn succeeded(&mut self, application_id: ApplicationId) {
        self.failed.remove(&application_id);
    }

    /// How long the application must still wait at `now` before a new order, if at all.
    pub fn wait(&self, application_id: ApplicationId, now: Instant) -> Option<Duration> {
        let (_, until) = self.failed.get(&application_id)?;
        (*until > now).then(|| *until - now)
    }
}

/// A persisted order's state, as stored in `acme_orders.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    /// Recorded, not yet created at the CA (no order URL).
    New,
    /// Created at the CA; challenges being answered or validated.
    Pending,
    /// Finalized with the CSR; waiting for the certificate.
    Finalized,
    /// The certificate was issued.
    Valid,
    /// The order ended without a certificate.
    Failed,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::New => "new",
            OrderState::Pending => "pending",
            OrderState::Finalized => "finalized",
            OrderState::Valid => "valid",
            OrderState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "new" => OrderState::New,
            "pending" => OrderState::Pending,
            "finalized" => OrderState::Finalized,
            "valid" => OrderState::Valid,
            "failed" => OrderState::Failed,
            _ => return None,
        })
    }

    /// Whether the order still needs work (and is resumed after a restart).
    pub fn is_in_flight(self) -> bool {
        matches!(self, OrderState::New | OrderState::Pending | OrderState::Finalized)
    }
}

/// What the CA says about an order (RFC 8555 section 7.1.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaStatus {
    Pending,
    Ready,
    Processing,
    Valid,
    Invalid,
}

/// The next thing to do for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create the order at the CA.
    Create,
    /// Serve the pending authorizations' HTTP-01 challenges, tell the CA, and poll.
    AnswerChallenges,
    /// Send the CSR.
    Finalize,
    /// Poll until the certificate is issued, then download it.
    AwaitCertificate,
    /// The CA gave up on the order: read why from its authorizations and fail.
    Fail,
}

/// The step for an order whose CA status is `status` (`None`: not created at the CA yet).
pub fn next_step(status: Option<CaStatus>) -> Step {
    match status {
        None => Step::Create,
        Some(CaStatus::Pending) => Step::AnswerChallenges,
        Some(CaStatus::Ready) => Step::Finalize,
        Some(CaStatus::Processing | CaStatus::Valid) => Step::AwaitCertificate,
        Some(CaStatus::Invalid) => Step::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(application_id: ApplicationId, names: &[&str]) -> OrderKey {
        let hostnames: Vec<Hostname> = names.iter().map(|name| name.parse().expect("a hostname")).collect();
        OrderKey::new(application_id, &hostnames)
    }

    #[test]
    fn requests_for_the_same_names_join_and_other_names_supersede() {
        let (web, api) = (ApplicationId::new(), ApplicationId::new());
        let mut running = InFlight::default();
        assert_eq!(running.begin(&key(web, &["a.example.test", "b.example.test"])), Begin::Start);
        // The same names in another order, twice: one order.
        assert_eq!(running.begin(&key(web, &["b.example.test", "a.example.test", "a.example.test"])), Begin::Join);
        assert_eq!(running.begin(&key(api, &["a.example.test"])), Begin::Start, "another application");
        assert_eq!(running.len(), 2);

        // The hostnames changed: a new order, and the old one ending does not remove it.
        let old = key(web, &["a.example.test", "b.example.test"]);
        let new = key(web, &["a.example.test"]);
        assert_eq!(running.begin(&new), Begin::Start);
        assert!(!running.is_current(&old));
        running.finish(&old);
        assert_eq!(running.begin(&new), Begin::Join, "still running");
        running.finish(&new);
        assert_eq!(running.begin(&new), Begin::Start, "a finished order is started again");
        running.finish(&new);
        running.finish(&key(api, &["a.example.test"]));
        assert!(running.is_empty());
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_until_a_success() {
        let (web, api) = (ApplicationId::new(), ApplicationId::new());
        let mut gate = RetryGate::default();
        let now = Instant::now();
        assert_eq!(gate.wait(web, now), None);
        assert_eq!(gate.failed(web, now, 0.0), RETRY_FIRST / 2, "no jitter: the fixed half");
        assert_eq!(gate.wait(web, now), Some(RETRY_FIRST / 2));
        assert_eq!(gate.wait(web, now + RETRY_FIRST), None, "waited long enough");
        assert_eq!(gate.wait(api, now), None, "per application");
        assert_eq!(gate.failed(web, now, 1.0), RETRY_FIRST * 2, "the second failure doubles the ceiling");
        let third = gate.failed(web, now, 0.5);
        assert_eq!(third, RETRY_FIRST * 3, "half of 4 min fixed, plus half of the other half");
        for _ in 0..20 {
            assert!(gate.failed(web, now, 0.99) <= RETRY_MAX, "capped");
        }
        gate.succeeded(web);
        assert_eq!(gate.wait(web, now), None);
        assert_eq!(gate.failed(web, now, 0.0), RETRY_FIRST / 2, "a success starts over");
    }

    #[test]
    fn every_ca_status_has_one_next_step() {
        assert_eq!(next_step(None), Step::Create);
        assert_eq!(next_step(Some(CaStatus::Pending)), Step::AnswerChallenges);
        assert_eq!(next_step(Some(CaStatus::Ready)), Step::Finalize);
        assert_eq!(next_step(Some(CaStatus::Processing)), Step::AwaitCertificate);
        assert_eq!(next_step(Some(CaStatus::Valid)), Step::AwaitCertificate);
        assert_eq!(next_step(Some(CaStatus::Invalid)), Step::Fail);
    }

    #[test]
    fn order_states_round_trip_and_only_unfinished_ones_resume() {
        for state in
            [OrderState::New, OrderState::Pending, OrderState::Finalized, OrderState::Valid, OrderState::Failed]
        {
            assert_eq!(OrderState::parse(state.as_str()), Some(state));
        }
        assert_eq!(OrderState::parse("bogus"), None);
        let resumed: Vec<_> =
            [OrderState::New, OrderState::Pending, OrderState::Finalized, OrderState::Valid, OrderState::Failed]
                .into_iter()
                .filter(|state| state.is_in_flight())
                .collect();
        assert_eq!(resumed, [OrderState::New, OrderState::Pending, OrderState::Finalized]);
    }
}
