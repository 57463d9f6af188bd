//! When to ping a peer and when to give up on it: a pure state machine over instants, so the
//! timing rules are tested without waiting.

use std::time::Duration;

use tokio::time::Instant;

/// What the session should do when the heartbeat's deadline comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Send a ping with this nonce.
    Ping(u64),
    /// The last ping went unanswered for too long: the peer is gone.
    Dead,
    /// Nothing yet.
    Idle,
}

/// Pings every `interval`; a ping unanswered for `timeout` means the peer is dead. One ping is
/// outstanding at most.
#[derive(Debug)]
pub struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    /// The nonce of the unanswered ping and when it expires.
    outstanding: Option<(u64, Instant)>,
    next_nonce: u64,
}

impl Heartbeat {
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self { interval, timeout, next_ping: now + interval, outstanding: None, next_nonce: 1 }
    }

    /// When [`Heartbeat::on_deadline`] should be called next.
    pub fn deadline(&self) -> Instant {
        match self.outstanding {
            Some((_, expires)) => expires,
            None => self.next_ping,
        }
    }

    pub fn on_deadline(&mut self, now: Instant) -> Beat {
        if let Some((_, expires)) = self.outstanding {
            return if now >= expires { Beat::Dead } else { Beat::Idle };
        }
        if now < self.next_ping {
            return Beat::Idle;
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.outstanding = Some((nonce, now + self.timeout));
        self.next_ping = now + self.interval;
        Beat::Ping(nonce)
    }

    /// Takes a pong; answers whether it answered the outstanding ping.
    pub fn on_pong(&mut self, nonce: u64) -> bool {
        match self.outstanding {
            Some((expected, _)) if expected == nonce => {
                self.outstanding = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);
    const TIMEOUT: Duration = Duration::from_secs(3);

    #[test]
    fn pings_every_interval_while_answered() {
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(start, INTERVAL, TIMEOUT);
        assert_eq!(heartbeat.deadline(), start + INTERVAL);
        assert_eq!(heartbeat.on_deadline(start + Duration::from_secs(1)), Beat::Idle);
        assert_eq!(heartbeat.on_deadline(start + INTERVAL), Beat::Ping(1));
        assert_eq!(heartbeat.deadline(), start + INTERVAL + TIMEOUT);
        assert!(!heartbeat.on_pong(7), "a pong with another nonce answers nothing");
        assert!(heartbeat.on_pong(1));
        assert_eq!(heartbeat.deadline(), start + INTERVAL * 2);
        assert_eq!(heartbeat.on_deadline(start + INTERVAL * 2), Beat::Ping(2));
    }

    #[test]
    fn an_unanswered_ping_means_the_peer_is_dead() {
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(start, INTERVAL, TIMEOUT);
        assert_eq!(heartbeat.on_deadline(start + INTERVAL), Beat::Ping(1));
        assert_eq!(heartbeat.on_deadline(start + INTERVAL + Duration::from_secs(1)), Beat::Idle);
        assert_eq!(heartbeat.on_deadline(start + INTERVAL + TIMEOUT), Beat::Dead);
        assert!(!heartbeat.on_pong(2));
    }
}
