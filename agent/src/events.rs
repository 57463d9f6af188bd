//! Lifecycle events (started, exited, restarted because..., adopted, stopped), kept in a
//! bounded ring until the push session takes them; the oldest are dropped when it is full.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use edgible::model::ApplicationId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEvent {
    pub application_id: Option<ApplicationId>,
    pub at: DateTime<Utc>,
    pub message: String,
}

/// A bounded, shared ring of events. Cloning shares it.
#[derive(Debug, Clone)]
pub struct EventLog {
    inner: Arc<Mutex<Ring>>,
}

#[derive(Debug)]
struct Ring {
    capacity: usize,
    events: VecDeque<AgentEvent>,
    dropped: u64,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        Self { inner: Arc::new(Mutex::new(Ring { capacity: capacity.max(1), events: VecDeque::new(), dropped: 0 })) }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // The ring stays coherent even if a holder panicked.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record(&self, application_id: Option<ApplicationId>, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(application = ?application_id.map(|id| id.to_string()), "{message}");
        let mut ring = self.lock();
        if ring.events.len() >= ring.capacity {
            ring.events.pop_front();
            ring.dropped += 1;
        }
        ring.events.push_back(AgentEvent { application_id, at: Utc::now(), message });
    }

    /// Takes up to `max` of the oldest events out.
    pub fn take(&self, max: usize) -> Vec<AgentEvent> {
        let mut ring = self.lock();
        let count = max.min(ring.events.len());
        ring.events.drain(..count).collect()
    }

    /// A copy of the events held, oldest first.
    pub fn snapshot(&self) -> Vec<AgentEvent> {
        self.lock().events.iter().cloned().collect()
    }

    /// Events dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events() {
        let log = EventLog::new(2);
        for index in 0..3 {
            log.record(None, format!("event {index}"));
        }
        let messages: Vec<String> = log.snapshot().into_iter().map(|event| event.message).collect();
        assert_eq!(messages, ["event 1", "event 2"]);
        assert_eq!(log.dropped(), 1);
        assert_eq!(log.take(1)[0].message, "event 1");
        assert_eq!(log.snapshot().len(), 1);
    }
}
