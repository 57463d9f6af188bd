//! Usage records: the agent's ledger of what each application used, kept until the server
//! acknowledges it.
//!
//! Every period ([`run_collector`], default 60 s) the [`crate::sleep::SleepTable`]'s counters
//! become one [`UsageRecord`] per application that used anything, each with the next
//! per-device `seq`. The ledger persists the next `seq` and every unacknowledged record in
//! `usage.json` in the state directory (written atomically) before they are sent, so that
//! after an agent restart nothing is numbered twice and unacknowledged records are sent again;
//! the server stores each `(device, seq)` once, so a resend is never counted twice. A
//! `usage_ack{seq}` drops every record up to `seq`, and those are never sent again. The ledger
//! is bounded: beyond `capacity` records the oldest are dropped, counted and warned about.
//! Counts since the last period are in memory only: an agent that crashes loses at most one
//! period (a clean shutdown records it).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use edgible::protocol::v1::UsageRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::sleep::SleepTable;
use crate::state::{StateDir, StateError};

/// The ledger's file in the state directory.
pub const USAGE_FILE: &str = "usage.json";

/// The default number of unacknowledged records kept.
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cannot persist usage records: {0}")]
    State(#[from] StateError),
    #[error("the usage ledger {path} is unreadable: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Persisted {
    /// The `seq` of the next record.
    next_seq: u64,
    /// Unacknowledged records, oldest first.
    pending: Vec<UsageRecord>,
    /// Records dropped because the ledger was full, over the device's life.
    dropped: u64,
}

/// See the module documentation.
pub struct UsageLedger {
    state_dir: StateDir,
    capacity: usize,
    inner: Mutex<Persisted>,
    recorded: Notify,
}

impl UsageLedger {
    /// Opens the ledger in `state_dir`, continuing its `seq` and pending records.
    pub fn open(state_dir: StateDir, capacity: usize) -> Result<Arc<Self>, UsageError> {
        let persisted = match state_dir.read_file(USAGE_FILE)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| UsageError::Corrupt { path: state_dir.root().join(USAGE_FILE), source })?,
            None => Persisted { next_seq: 1, ..Persisted::default() },
        };
        Ok(Arc::new(Self {
            state_dir,
            capacity: capacity.max(1),
            inner: Mutex::new(persisted),
            recorded: Notify::new(),
        }))
    }

    fn inner(&self) -> MutexGuard<'_, Persisted> {
        // Changes are made on a copy and swapped in once persisted: the value is always whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn persist(&self, persisted: &Persisted) -> Result<(), UsageError> {
        // Serializing plain data cannot fail.
        let bytes = serde_json::to_vec(persisted).unwrap_or_default();
        self.state_dir.write_file(USAGE_FILE, &bytes)?;
        Ok(())
    }

    /// Numbers and stores one record per entry of `usage`, persisted before it answers; the
    /// records are then sent by the next session that looks.
    pub fn record(
        &self,
        usage: impl IntoIterator<Item = (edgible::model::ApplicationId, crate::sleep::Usage)>,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<usize, UsageError> {
        let mut inner = self.inner();
        let mut next = inner.clone();
        let mut count = 0;
        for (application_id, usage) in usage {
            next.pending.push(UsageRecord {
                seq: next.next_seq,
                application_id,
                start,
                end,
                awake_ms: usage.awake_ms,
                requests: usage.requests,
                bytes_in: usage.bytes_in,
                bytes_out: usage.bytes_out,
                wakes: usage.wakes,
            });
            next.next_seq += 1;
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        let over = next.pending.len().saturating_sub(self.capacity);
        if over > 0 {
            next.pending.drain(..over);
            next.dropped += over as u64;
            tracing::warn!(
                dropped = over,
                dropped_total = next.dropped,
                capacity = self.capacity,
                "the usage ledger is full (the server has not acknowledged records for long); dropped the oldest"
            );
        }
        self.persist(&next)?;
        *inner = next;
        drop(inner);
        self.recorded.notify_waiters();
        Ok(count)
    }

    /// Drops every record up to `seq`: the server stored them.
    pub fn ack(&self, seq: u64) -> Result<(), UsageError> {
        let mut inner = self.inner();
        if inner.pending.first().is_none_or(|record| record.seq > seq) {
            return Ok(());
        }
        let mut next = inner.clone();
        next.pending.retain(|record| record.seq > seq);
        self.persist(&next)?;
        *inner = next;
        Ok(())
    }

    /// Up to `max` pending records with a `seq` after `after`, oldest first.
    pub fn pending_after(&self, after: Option<u64>, max: usize) -> Vec<UsageRecord> {
        self.inner()
            .pending
            .iter()
            .filter(|record| after.is_none_or(|after| record.seq > after))
            .take(max)
            .cloned()
            .collect()
    }

    pub fn pending_len(&self) -> usize {
        self.inner().pending.len()
    }

    /// Records dropped because the ledger was full.
    pub fn dropped(&self) -> u64 {
        self.inner().dropped
    }

    /// Completes when new records were stored after the call.
    pub async fn recorded(&self) {
        self.recorded.notified().await;
    }
}

/// Every `interval`, turns the table's counters into records; once more at shutdown.
pub async fn run_collector(
    table: Arc<SleepTable>,
    ledger: Arc<UsageLedger>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut start = Utc::now();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticks.tick() => false,
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        let end = Utc::now();
        let usage = table.take_usage().into_iter().filter(|(_, usage)| !usage.is_zero());
        if let Err(error) = ledger.record(usage, start, end) {
            tracing::error!(%error, "cannot record usage; this period's counts are lost");
        }
        start = end;
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use edgible::model::ApplicationId;

    use super::*;
    use crate::sleep::Usage;

    fn usage(requests: u64) -> Usage {
        Usage { requests, ..Usage::default() }
    }

    #[test]
    fn seq_grows_across_restarts_and_acks_are_never_resent() {
        let temp = tempfile::tempdir().expect("temp dir");
        let open = || UsageLedger::open(StateDir::open(temp.path()).expect("state dir"), 10).expect("ledger");
        let (a, b) = (ApplicationId::new(), ApplicationId::new());
        let now = Utc::now();
        let ledger = open();
        assert_eq!(ledger.record([(a, usage(1)), (b, usage(2))], now, now).expect("recorded"), 2);
        assert_eq!(ledger.record([], now, now).expect("nothing"), 0);
        let sent: Vec<u64> = ledger.pending_after(None, 10).iter().map(|record| record.seq).collect();
        assert_eq!(sent, [1, 2]);
        assert_eq!(ledger.pending_after(Some(1), 10)[0].requests, 2);
        ledger.ack(1).expect("acked");
        drop(ledger);

        // After a restart: the unacknowledged record is still there, seq continues.
        let ledger = open();
        let pending = ledger.pending_after(None, 10);
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].seq, pending[0].application_id, pending[0].requests), (2, b, 2));
        ledger.record([(a, usage(5))], now, now).expect("recorded");
        assert_eq!(ledger.pending_after(None, 10).last().map(|record| record.seq), Some(3));
        ledger.ack(3).expect("acked");
        ledger.ack(2).expect("an old ack is harmless");
        assert_eq!(ledger.pending_len(), 0);
        drop(ledger);
        let ledger = open();
        assert_eq!(ledger.pending_len(), 0, "acknowledged records are gone for good");
        ledger.record([(a, usage(1))], now, now).expect("recorded");
        assert_eq!(ledger.pending_after(None, 10)[0].seq, 4);
    }

    #[test]
    fn a_full_ledger_drops_the_oldest_and_counts() {
        let temp = tempfile::tempdir().expect("temp dir");
        let ledger = UsageLedger::open(StateDir::open(temp.path()).expect("state dir"), 3).expect("ledger");
        let now = Utc::now();
        for requests in 1..=5 {
            ledger.record([(ApplicationId::new(), usage(requests))], now, now).expect("recorded");
        }
        let seqs: Vec<u64> = ledger.pending_after(None, 10).iter().map(|record| record.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(ledger.dropped(), 2);
        assert_eq!(ledger.pending_after(None, 2).len(), 2, "batches are bounded");
        let reopened = UsageLedger::open(StateDir::open(temp.path()).expect("state dir"), 3).expect("ledger");
        assert_eq!(reopened.dropped(), 2);
    }

    #[test]
    fn a_corrupt_ledger_is_an_error_naming_the_file() {
        let temp = tempfile::tempdir().expect("temp dir");
        let state_dir = StateDir::open(temp.path()).expect("state dir");
        state_dir.write_file(USAGE_FILE, b"{not json").expect("written");
        let error = UsageLedger::open(state_dir, 3).err().expect("refused");
        assert!(error.to_string().contains(USAGE_FILE), "{error}");
    }
}
