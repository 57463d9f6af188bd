//! The ACME HTTP-01 challenges the edges of each pool must answer, and which edges have
//! acknowledged a configuration that carries them.
//!
//! An order ([`crate::certs::acme`]) puts its challenges on the board for the pool of the
//! device it is for, wakes that pool's edge sessions, and waits until every connected edge of
//! the pool acknowledged a configuration at least as new as the board's *generation* after its
//! change; only then does it tell the CA to validate (the CA may ask any edge, as DNS may send
//! it to any). Edge sessions read [`ChallengeBoard::snapshot`] into each `edge_config` and
//! report acks with [`ChallengeBoard::acked`].
//!
//! The board lives in memory: one replica serves every session. After a restart, resumed
//! orders put their challenges back (the CA still has them) and the edges, reconnecting, get
//! them in their first configuration.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use edgible::model::{DevicePoolId, EdgeId};
use edgible::protocol::v1::AcmeChallenge;
use tokio::sync::watch;
use uuid::Uuid;

/// The challenges of every pool. Shared by the edge sessions and the ACME orders.
#[derive(Debug)]
pub struct ChallengeBoard {
    pools: Mutex<HashMap<DevicePoolId, PoolChallenges>>,
    /// Bumped on every ack, for waiters.
    acks: watch::Sender<u64>,
}

impl Default for ChallengeBoard {
    fn default() -> Self {
        Self { pools: Mutex::default(), acks: watch::channel(0).0 }
    }
}

#[derive(Debug, Default)]
struct PoolChallenges {
    /// Grows whenever the pool's set of challenges changes.
    generation: u64,
    /// The challenges of each order (by order id).
    by_order: BTreeMap<Uuid, Vec<AcmeChallenge>>,
    /// The newest generation each edge acknowledged.
    acked: HashMap<EdgeId, u64>,
}

impl PoolChallenges {
    fn challenges(&self) -> Vec<AcmeChallenge> {
        let mut all: Vec<AcmeChallenge> = self.by_order.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        all
    }
}

impl ChallengeBoard {
    fn pools(&self) -> MutexGuard<'_, HashMap<DevicePoolId, PoolChallenges>> {
        // Every change is a single insert or remove, so a panicking holder leaves it consistent.
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the challenges of `order` on `pool`; answers the generation the edges must
    /// acknowledge for them to be served. Setting the same challenges again changes nothing.
    pub fn set(&self, pool: DevicePoolId, order: Uuid, challenges: Vec<AcmeChallenge>) -> u64 {
        let mut pools = self.pools();
        let entry = pools.entry(pool).or_default();
        if entry.by_order.get(&order) != Some(&challenges) {
            let before = entry.challenges();
            entry.by_order.insert(order, challenges);
            if entry.challenges() != before {
                entry.generation += 1;
            }
        }
        entry.generation
    }

    /// Removes the challenges of `order` from every pool; answers the pools whose set changed.
    pub fn remove_order(&self, order: Uuid) -> Vec<DevicePoolId> {
        let mut changed = Vec::new();
        for (pool, entry) in self.pools().iter_mut() {
            let before = entry.challenges();
            if entry.by_order.remove(&order).is_some() && entry.challenges() != before {
                entry.generation += 1;
                changed.push(*pool);
            }
        }
        changed
    }

    /// The pool's challenges (sorted, each once) and their generation: what an edge
    /// configuration carries.
    pub fn snapshot(&self, pool: DevicePoolId) -> (u64, Vec<AcmeChallenge>) {
        self.pools().get(&pool).map_or((0, Vec::new()), |entry| (entry.generation, entry.challenges()))
    }

    /// Records that `edge` applied a configuration carrying generation `generation` of its
    /// pool's challenges.
    pub fn acked(&self, pool: DevicePoolId, edge: EdgeId, generation: u64) {
        {
            let mut pools = self.pools();
            let acked = pools.entry(pool).or_default().acked.entry(edge).or_default();
            *acked = (*acked).max(generation);
        }
        self.acks.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Whether every one of `edges` acknowledged `generation` (or newer). False for no edges:
    /// nobody would answer the CA.
    pub fn all_acked(&self, pool: DevicePoolId, generation: u64, edges: &[EdgeId]) -> bool {
        let pools = self.pools();
        let Some(entry) = pools.get(&pool) else { return false };
        !edges.is_empty() && edges.iter().all(|edge| entry.acked.get(edge).is_some_and(|acked| *acked >= generation))
    }

    /// A receiver that changes whenever an edge acknowledges something.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.acks.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(hostname: &str, token: &str) -> AcmeChallenge {
        AcmeChallenge {
            hostname: hostname.parse().expect("a hostname"),
            token: token.to_owned(),
            key_authorization: format!("{token}.thumb"),
        }
    }

    #[test]
    fn a_pool_serves_the_union_of_its_orders_and_only_its_own() {
        let board = ChallengeBoard::default();
        let (pool, other_pool) = (DevicePoolId::new(), DevicePoolId::new());
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(board.snapshot(pool), (0, Vec::new()));
        let one = board.set(pool, first, vec![challenge("b.example.test", "t2"), challenge("a.example.test", "t1")]);
        assert_eq!(one, 1);
        assert_eq!(
            board.set(pool, first, vec![challenge("b.example.test", "t2"), challenge("a.example.test", "t1")]),
            1
        );
        let two = board.set(pool, second, vec![challenge("c.example.test", "t3")]);
        assert_eq!(two, 2);
        let (generation, challenges) = board.snapshot(pool);
        assert_eq!(generation, 2);
        let names: Vec<_> = challenges.iter().map(|c| (c.hostname.as_str(), c.token.as_str())).collect();
        assert_eq!(names, [("a.example.test", "t1"), ("b.example.test", "t2"), ("c.example.test", "t3")]);
        assert_eq!(board.snapshot(other_pool), (0, Vec::new()), "another pool's edges never see them");

        assert_eq!(board.remove_order(first), [pool]);
        let (generation, challenges) = board.snapshot(pool);
        assert_eq!((generation, challenges.len()), (3, 1));
        assert!(board.remove_order(first).is_empty(), "removing twice changes nothing");
        assert_eq!(board.snapshot(pool).0, 3);
    }

    #[test]
    fn an_order_waits_for_every_given_edge_to_ack_its_generation() {
        let board = ChallengeBoard::default();
        let pool = DevicePoolId::new();
        let (edge_a, edge_b) = (EdgeId::new(), EdgeId::new());
        let generation = board.set(pool, Uuid::now_v7(), vec![challenge("a.example.test", "t1")]);
        assert!(!board.all_acked(pool, generation, &[]), "no edge: nobody answers");
        let mut acks = board.subscribe();
        board.acked(pool, edge_a, generation);
        assert!(acks.has_changed().expect("the board is alive"));
        acks.mark_unchanged();
        assert!(board.all_acked(pool, generation, &[edge_a]));
        assert!(!board.all_acked(pool, generation, &[edge_a, edge_b]));
        board.acked(pool, edge_b, generation - 1);
        assert!(!board.all_acked(pool, generation, &[edge_a, edge_b]), "an older generation is not enough");
        board.acked(pool, edge_b, generation + 1);
        board.acked(pool, edge_b, generation - 1);
        assert!(board.all_acked(pool, generation, &[edge_a, edge_b]), "acks never move backwards");
    }
}
