//! How many client connections a listener holds, and what gives way when it is full.
//!
//! Every accepted connection takes a [`ConnectionSlot`] from the listener's [`Admission`]
//! before a byte is read. Past the limit a new connection is closed at once and counted
//! (Envoy's `max_active_downstream_connections`); from nine tenths of the limit on, every
//! connection sitting idle between requests is told to close ([`Admission::idle_drain`]),
//! so keep-alive clients that do nothing cannot starve clients with requests.

use super::stats::{CloseReason, DownstreamStats};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// Connection accounting of one listener.
#[derive(Debug)]
pub struct Admission {
    active: AtomicU64,
    drain: Arc<Notify>,
    stats: DownstreamStats,
}

/// A connection's place in its listener's count; given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    admission: Arc<Admission>,
}

impl Admission {
    /// Accounting that reports to `stats`.
    pub fn new(stats: DownstreamStats) -> Arc<Self> {
        Arc::new(Admission {
            active: AtomicU64::new(0),
            drain: Arc::new(Notify::new()),
            stats,
        })
    }

    /// Admits one more connection under `limit`, or refuses it (counted).
    pub fn try_admit(self: &Arc<Self>, limit: u64) -> Option<ConnectionSlot> {
        let active = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        if active > limit {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.stats.closed(CloseReason::Overflow);
            self.drain.notify_waiters();
            return None;
        }
        if self.under_pressure(limit) {
            self.drain.notify_waiters();
        }
        self.stats.cx_total.inc();
        self.stats.cx_active.inc();
        Some(ConnectionSlot {
            admission: Arc::clone(self),
        })
    }

    /// Resolves when idle connections should close to make room.
    pub fn idle_drain(&self) -> OwnedNotified {
        Arc::clone(&self.drain).notified_owned()
    }

    /// Whether the listener is at nine tenths of `limit` or more (idle connections give way).
    pub fn under_pressure(&self, limit: u64) -> bool {
        self.active().saturating_mul(10) >= limit.saturating_mul(9)
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    /// The listener's counters.
    pub fn stats(&self) -> &DownstreamStats {
        &self.stats
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.admission.active.fetch_sub(1, Ordering::AcqRel);
        self.admission.stats.cx_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_past_the_limit_and_drains_idle_connections_near_it() {
        let admission = Admission::new(DownstreamStats::default());
        let mut slots: Vec<ConnectionSlot> = (0..8)
            .map(|_| admission.try_admit(10).expect("under the limit"))
            .collect();
        let idle = admission.idle_drain();
        slots.push(admission.try_admit(10).unwrap()); // the ninth: 90 %
        tokio::time::timeout(std::time::Duration::from_secs(1), idle)
            .await
            .expect("idle connections are told to close at 90 %");
        slots.push(admission.try_admit(10).unwrap());
        assert!(admission.try_admit(10).is_none());
        assert_eq!(admission.stats().closed_count(CloseReason::Overflow), 1);
        slots.pop();
        assert_eq!(admission.active(), 9);
        assert!(admission.try_admit(10).is_some());
    }
}
