//! The WebSocket hub: one session per connected peer (agents and edges), and the
//! fan-out that wakes a peer's session when its desired state changed.
//!
//! [`Hub`] is generic over the peer key, so edges get their own `Hub<EdgeId>` with the same
//! rules: at most one session per peer (a reconnecting peer evicts its own stale session),
//! wake-ups that coalesce (a burst of writes costs one re-read), and unregistering that never
//! removes a newer session. Sessions are plain async functions over a [`transport::Frame`]
//! sink and stream, so their logic runs in tests without sockets; `api::agents` adapts an
//! axum WebSocket to them.
//!
//! Wake-ups come from the database after each commit (see `Db::set_desired_listener`), in this
//! process only: one replica serves all sessions. Several replicas on PostgreSQL would carry
//! them with `LISTEN/NOTIFY`, each replica waking the sessions it holds.

pub mod agent;
pub mod edge;
pub mod heartbeat;
pub mod transport;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, oneshot};

/// The live sessions of one kind of peer, by peer key.
#[derive(Debug)]
pub struct Hub<K> {
    slots: Mutex<HashMap<K, Slot>>,
    generations: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    generation: u64,
    wake: Arc<Notify>,
    evict: oneshot::Sender<()>,
}

impl<K> Default for Hub<K> {
    fn default() -> Self {
        Self { slots: Mutex::new(HashMap::new()), generations: AtomicU64::new(0) }
    }
}

/// A session's place in the hub. Dropping it leaves the hub, unless a newer session of the
/// same peer has taken the place meanwhile.
#[derive(Debug)]
pub struct Registration<K: Eq + Hash + Clone> {
    hub: Arc<Hub<K>>,
    key: K,
    generation: u64,
    /// Notified when the peer's desired state may have changed.
    pub wake: Arc<Notify>,
    /// Completes when a newer session of the same peer replaced this one.
    pub evicted: oneshot::Receiver<()>,
}

impl<K: Eq + Hash + Clone> Drop for Registration<K> {
    fn drop(&mut self) {
        let mut slots = self.hub.slots();
        if slots.get(&self.key).is_some_and(|slot| slot.generation == self.generation) {
            slots.remove(&self.key);
        }
    }
}

impl<K: Eq + Hash + Clone> Hub<K> {
    fn slots(&self) -> MutexGuard<'_, HashMap<K, Slot>> {
        // The map stays consistent even if a holder panicked: every change is one insert or
        // remove.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a new session the peer's only one; answers whether it evicted an older one,
    /// which is told through its [`Registration::evicted`].
    pub fn register(self: &Arc<Self>, key: K) -> (Registration<K>, bool) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let (evict, evicted) = oneshot::channel();
        let previous = self.slots().insert(key.clone(), Slot { generation, wake: Arc::clone(&wake), evict });
        let replaced = previous.is_some();
        if let Some(previous) = previous {
            // The old session may be finishing on its own; then nobody is listening.
            let _ = previous.evict.send(());
        }
        (Registration { hub: Arc::clone(self), key, generation, wake, evicted }, replaced)
    }

    /// Wakes the sessions of these peers, if connected; answers how many were.
    pub fn wake(&self, keys: &[K]) -> usize {
        let slots = self.slots();
        keys.iter().filter_map(|key| slots.get(key)).map(|slot| slot.wake.notify_one()).count()
    }

    /// Wakes every session, for when it is unknown whose state changed.
    pub fn wake_all(&self) {
        self.slots().values().for_each(|slot| slot.wake.notify_one());
    }

    /// How many peers are connected.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: &K) -> bool {
        self.slots().contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_session_evicts_the_old_one() {
        let hub = Arc::new(Hub::<u32>::default());
        let (mut first, replaced) = hub.register(7);
        assert!(!replaced);
        let (second, replaced) = hub.register(7);
        assert!(replaced);
        assert!((&mut first.evicted).await.is_ok(), "the first session is told");
        // The old session leaving does not remove the new one.
        drop(first);
        assert!(hub.contains(&7));
        assert_eq!(hub.wake(&[7, 8]), 1);
        second.wake.notified().await;
        drop(second);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn wake_ups_coalesce_and_are_not_lost() {
        let hub = Arc::new(Hub::<u32>::default());
        let (registration, _) = hub.register(1);
        // Woken twice before listening: one stored wake-up.
        hub.wake(&[1]);
        hub.wake_all();
        registration.wake.notified().await;
        let again = tokio::time::timeout(std::time::Duration::from_millis(20), registration.wake.notified()).await;
        assert!(again.is_err(), "the two wake-ups coalesced into one");
    }
}
