//! Recent output of applications, in memory: a bounded ring of lines per application, and a
//! broadcast of new lines to whoever follows them.
//!
//! Logs are kept in this process only, unlike events (in the database): they are the most
//! voluminous thing agents send, their value is in the last few minutes, and a restart losing
//! them is acceptable (agents keep their own buffers). Several replicas would each hold the
//! lines of the agents connected to them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use edgible::model::{ApplicationId, LogEntry};
use tokio::sync::broadcast;

/// How many lines each application keeps.
pub const LINES_KEPT: usize = 1000;
/// Longer lines are cut to this many bytes (the agent already splits at this size).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// How many new lines a follower may fall behind before it misses some.
const FOLLOW_BACKLOG: usize = 1024;

#[derive(Debug)]
struct Ring {
    lines: VecDeque<LogEntry>,
    /// Lines lost: dropped by agents, or pushed out of the ring.
    dropped: u64,
    followers: broadcast::Sender<LogEntry>,
}

impl Ring {
    fn new() -> Self {
        Self { lines: VecDeque::new(), dropped: 0, followers: broadcast::channel(FOLLOW_BACKLOG).0 }
    }
}

/// The recent lines of every application.
#[derive(Debug, Default)]
pub struct LogStore {
    rings: Mutex<HashMap<ApplicationId, Ring>>,
}

impl LogStore {
    fn rings(&self) -> std::sync::MutexGuard<'_, HashMap<ApplicationId, Ring>> {
        // A panic while holding the lock leaves the rings usable.
        self.rings.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends lines (oldest first), cutting long ones, and tells followers. `dropped` counts
    /// lines the agent lost before sending these.
    pub fn append(&self, application_id: ApplicationId, lines: Vec<LogEntry>, dropped: u64) {
        let mut rings = self.rings();
        let ring = rings.entry(application_id).or_insert_with(Ring::new);
        ring.dropped = ring.dropped.saturating_add(dropped);
        for mut entry in lines {
            truncate(&mut entry.line, MAX_LINE_BYTES);
            // Nobody following is not an error.
            let _ = ring.followers.send(entry.clone());
            if ring.lines.len() == LINES_KEPT {
                ring.lines.pop_front();
                ring.dropped += 1;
            }
            ring.lines.push_back(entry);
        }
    }

    /// The last `limit` lines, oldest first, and how many were lost.
    pub fn recent(&self, application_id: ApplicationId, limit: usize) -> (Vec<LogEntry>, u64) {
        let rings = self.rings();
        match rings.get(&application_id) {
            Some(ring) => {
                let skip = ring.lines.len().saturating_sub(limit);
                (ring.lines.iter().skip(skip).cloned().collect(), ring.dropped)
            }
            None => (Vec::new(), 0),
        }
    }

    /// The last `limit` lines and a receiver of every line appended after them, taken
    /// together so that no line falls between the two.
    pub fn follow(
        &self,
        application_id: ApplicationId,
        limit: usize,
    ) -> (Vec<LogEntry>, broadcast::Receiver<LogEntry>) {
        let mut rings = self.rings();
        let ring = rings.entry(application_id).or_insert_with(Ring::new);
        let skip = ring.lines.len().saturating_sub(limit);
        (ring.lines.iter().skip(skip).cloned().collect(), ring.followers.subscribe())
    }

    /// How many followers of an application's lines are connected.
    pub fn followers(&self, application_id: ApplicationId) -> usize {
        self.rings().get(&application_id).map_or(0, |ring| ring.followers.receiver_count())
    }

    /// Drops an application's lines (it was deleted). Followers see their stream end.
    pub fn forget(&self, application_id: ApplicationId) {
        self.rings().remove(&application_id);
    }
}

/// Cuts `line` to at most `max` bytes, at a character boundary.
fn truncate(line: &mut String, max: usize) {
    if line.len() > max {
        let mut end = max;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgible::model::{DeviceId, LogStream};

    fn entry(line: &str) -> LogEntry {
        LogEntry { at: chrono::Utc::now(), device_id: DeviceId::new(), stream: LogStream::Stdout, line: line.into() }
    }

    #[test]
    fn the_ring_keeps_the_newest_lines_and_counts_the_rest() {
        let store = LogStore::default();
        let application = ApplicationId::new();
        store.append(application, (0..LINES_KEPT + 5).map(|index| entry(&index.to_string())).collect(), 2);
        let (lines, dropped) = store.recent(application, 3);
        let texts: Vec<&str> = lines.iter().map(|line| line.line.as_str()).collect();
        assert_eq!(texts, ["1002", "1003", "1004"]);
        assert_eq!(dropped, 7);
        assert_eq!(store.recent(application, usize::MAX).0.len(), LINES_KEPT);
        assert_eq!(store.recent(ApplicationId::new(), 10), (Vec::new(), 0));
    }

    #[test]
    fn followers_get_new_lines_after_the_backlog() {
        let store = LogStore::default();
        let application = ApplicationId::new();
        store.append(application, vec![entry("old")], 0);
        let (backlog, mut receiver) = store.follow(application, 10);
        assert_eq!(backlog.len(), 1);
        store.append(application, vec![entry("new")], 0);
        assert_eq!(receiver.try_recv().map(|entry| entry.line).ok().as_deref(), Some("new"));
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        let mut line = "é".repeat(MAX_LINE_BYTES);
        truncate(&mut line, MAX_LINE_BYTES - 1);
        assert!(line.len() < MAX_LINE_BYTES);
        assert!(line.chars().all(|c| c == 'é'));
    }
}
