//! Bounded log capture: a per-application ring of recent lines, and a splitter that turns a
//! workload's output bytes into lines of bounded length.
//!
//! The reader of a workload's output never waits for whoever consumes the lines (later, the
//! push session to a possibly slow server): when the ring is full the oldest lines are dropped
//! and counted, so neither the workload nor the agent's memory depends on the consumer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::Utc;
use edgible::protocol::v1::{LogLine, Stream};
use tokio::sync::Notify;

/// How much one application's buffer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// The most lines kept.
    pub max_lines: usize,
    /// The most bytes of line text kept.
    pub max_bytes: usize,
    /// Longer lines are split into pieces of at most this many bytes.
    pub max_line_bytes: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self { max_lines: 2_000, max_bytes: 1024 * 1024, max_line_bytes: 16 * 1024 }
    }
}

/// Lines taken out of a buffer, and how many were dropped before they could be taken.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogBatch {
    pub lines: Vec<LogLine>,
    pub dropped: u64,
}

/// The recent output of one application. Cloning shares the buffer.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    appended: Notify,
}

#[derive(Debug)]
struct Inner {
    limits: LogLimits,
    lines: VecDeque<LogLine>,
    bytes: usize,
    dropped_total: u64,
    dropped_since_take: u64,
}

impl LogBuffer {
    pub fn new(limits: LogLimits) -> Self {
        let inner = Inner { limits, lines: VecDeque::new(), bytes: 0, dropped_total: 0, dropped_since_take: 0 };
        Self { shared: Arc::new(Shared { inner: Mutex::new(inner), appended: Notify::new() }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the ring inconsistent in a way that
        // matters (at worst a count is off by one), so a poisoned lock is still used.
        self.shared.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a line, dropping the oldest lines if the buffer is full.
    pub fn push(&self, stream: Stream, line: String) {
        let mut inner = self.lock();
        let max_line = inner.limits.max_line_bytes.max(1);
        let line = truncate_to_char_boundary(line, max_line);
        inner.bytes += line.len();
        inner.lines.push_back(LogLine { at: Utc::now(), stream, line });
        while inner.lines.len() > inner.limits.max_lines || inner.bytes > inner.limits.max_bytes {
            let Some(oldest) = inner.lines.pop_front() else { break };
            inner.bytes -= oldest.line.len();
            inner.dropped_total += 1;
            inner.dropped_since_take += 1;
        }
        drop(inner);
        self.shared.appended.notify_waiters();
    }

    /// Takes up to `max` of the oldest lines out of the buffer, with the number of lines
    /// dropped since the previous take.
    pub fn take(&self, max: usize) -> LogBatch {
        let mut inner = self.lock();
        let count = max.min(inner.lines.len());
        let lines: Vec<LogLine> = inner.lines.drain(..count).collect();
        inner.bytes -= lines.iter().map(|line| line.line.len()).sum::<usize>();
        let dropped = std::mem::take(&mut inner.dropped_since_take);
        LogBatch { lines, dropped }
    }

    /// A copy of every line currently held, oldest first.
    pub fn snapshot(&self) -> Vec<LogLine> {
        self.lock().lines.iter().cloned().collect()
    }

    /// Lines dropped because the buffer was full, since it was created.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped_total
    }

    /// Waits until a line is appended after this call.
    pub async fn appended(&self) {
        self.shared.appended.notified().await;
    }
}

fn truncate_to_char_boundary(mut line: String, max: usize) -> String {
    if line.len() > max {
        let mut cut = max;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

/// Splits a byte stream into lines of at most `max_line_bytes` bytes. A longer line is cut
/// into several, so that a workload writing without newlines cannot grow the agent's memory.
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max_line_bytes: usize,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> Self {
        Self { pending: Vec::new(), max_line_bytes: max_line_bytes.max(1) }
    }

    /// Feeds bytes and answers the lines they complete, without their line endings. Invalid
    /// UTF-8 is replaced rather than refused: logs are for humans.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(self.finish_line());
            } else {
                self.pending.push(byte);
                if self.pending.len() >= self.max_line_bytes {
                    lines.push(self.finish_line());
                }
            }
        }
        lines
    }

    /// Answers what is left after the stream ended, if anything.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() { None } else { Some(self.finish_line()) }
    }

    fn finish_line(&mut self) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(buffer: &LogBuffer) -> Vec<String> {
        buffer.snapshot().into_iter().map(|line| line.line).collect()
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_lines_and_counts_them() {
        let buffer = LogBuffer::new(LogLimits { max_lines: 3, ..LogLimits::default() });
        for index in 0..5 {
            buffer.push(Stream::Stdout, format!("line {index}"));
        }
        assert_eq!(texts(&buffer), ["line 2", "line 3", "line 4"]);
        assert_eq!(buffer.dropped(), 2);
    }

    #[test]
    fn the_byte_limit_bounds_memory_too() {
        let buffer = LogBuffer::new(LogLimits { max_lines: 100, max_bytes: 10, max_line_bytes: 100 });
        buffer.push(Stream::Stdout, "12345".into());
        buffer.push(Stream::Stderr, "67890".into());
        buffer.push(Stream::Stdout, "abc".into());
        assert_eq!(texts(&buffer), ["67890", "abc"]);
        assert_eq!(buffer.dropped(), 1);
    }

    #[test]
    fn take_empties_in_order_and_reports_drops_once() {
        let buffer = LogBuffer::new(LogLimits { max_lines: 2, ..LogLimits::default() });
        for index in 0..3 {
            buffer.push(Stream::Stdout, format!("{index}"));
        }
        let batch = buffer.take(1);
        assert_eq!(batch.lines.len(), 1);
        assert_eq!(batch.lines[0].line, "1");
        assert_eq!(batch.dropped, 1);
        let batch = buffer.take(10);
        assert_eq!(batch.lines[0].line, "2");
        assert_eq!(batch.dropped, 0);
        assert!(buffer.take(10).lines.is_empty());
        assert_eq!(buffer.dropped(), 1);
    }

    #[test]
    fn an_oversized_line_is_cut_at_a_character_boundary() {
        let buffer = LogBuffer::new(LogLimits { max_line_bytes: 4, ..LogLimits::default() });
        buffer.push(Stream::Stdout, "aéé".into());
        assert_eq!(texts(&buffer), ["aé"]);
    }

    #[test]
    fn the_splitter_handles_partial_lines_and_carriage_returns() {
        let mut splitter = LineSplitter::new(100);
        assert_eq!(splitter.feed(b"hel"), Vec::<String>::new());
        assert_eq!(splitter.feed(b"lo\r\nwor"), ["hello"]);
        assert_eq!(splitter.feed(b"ld\n\n"), ["world", ""]);
        assert_eq!(splitter.finish(), None);
        splitter.feed(b"tail");
        assert_eq!(splitter.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn the_splitter_bounds_lines_without_newlines() {
        let mut splitter = LineSplitter::new(4);
        assert_eq!(splitter.feed(b"abcdefghij\n"), ["abcd", "efgh", "ij"]);
        assert_eq!(splitter.feed(&[0xff, b'\n']), ["\u{fffd}"]);
    }
}
