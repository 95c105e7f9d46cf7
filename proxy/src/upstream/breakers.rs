//! Envoy's circuit breakers of a cluster: requests and retries in flight (with the retry
//! budget), and the connection slots of HTTP/1 clusters with their line of waiting requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Envoy's circuit breakers that NIP enforces (default priority).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitBreakers {
    /// Requests in flight to the cluster; more are answered 503 with flag `UO`.
    pub max_requests: u32,
    /// Retries in flight to the cluster; more are not made (unless a budget replaces it).
    pub max_retries: u32,
    /// Retries in flight as a share of the requests in flight (replaces `max_retries`).
    pub retry_budget: Option<RetryBudget>,
    /// Upstream connections in use (HTTP/1: one per request in flight); more requests
    /// wait for one (Envoy's `max_connections`).
    pub max_connections: u32,
    /// Requests waiting for a connection; more are answered 503 `UO`.
    pub max_pending_requests: u32,
}

/// Envoy's retry budget: retries in flight may be `percent` of the requests in flight, and
/// at least `min_retry_concurrency` — retries grow with traffic instead of a fixed count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Share of the requests in flight, in percent (Envoy's default 20).
    pub percent: f64,
    /// Retries always allowed in flight (Envoy's default 3).
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    /// Envoy's defaults.
    fn default() -> Self {
        RetryBudget {
            percent: 20.0,
            min_retry_concurrency: 3,
        }
    }
}

impl CircuitBreakers {
    /// How many retries may be in flight while `active_requests` requests are.
    pub fn retries_allowed(&self, active_requests: i64) -> i64 {
        match self.retry_budget {
            None => i64::from(self.max_retries),
            Some(budget) => {
                let share = (active_requests.max(0) as f64 * budget.percent / 100.0) as i64;
                share.max(i64::from(budget.min_retry_concurrency))
            }
        }
    }
}

impl Default for CircuitBreakers {
    /// Envoy's defaults.
    fn default() -> Self {
        CircuitBreakers {
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            max_connections: 1024,
            max_pending_requests: 1024,
        }
    }
}

/// The connections an HTTP/1 cluster may have in use and the requests waiting for one
/// (Envoy's `max_connections` and `max_pending_requests`). Each request to the cluster
/// holds a slot from its first try to its end (an HTTP/1 request uses one connection at a
/// time); a request that finds none free waits in line, unless the line is full. Idle
/// connections in pingora's pool hold no slot. Kept across reloads while the limits stay.
#[derive(Debug)]
pub struct ConnectionSlots {
    slots: Arc<tokio::sync::Semaphore>,
    /// The limits this was made for.
    pub limits: (u32, u32),
    waiting: AtomicUsize,
}

/// Why a request got no connection slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The line of waiting requests is full (503 `UO`).
    PendingOverflow,
    /// No slot came free within the wait allowed.
    TimedOut,
}

impl ConnectionSlots {
    /// Slots for `max_connections` connections and a line of `max_pending` requests.
    pub fn new(max_connections: u32, max_pending: u32) -> Self {
        ConnectionSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections as usize)),
            limits: (max_connections, max_pending),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A slot at once, or `None` when all are in use.
    pub fn try_take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// Waits in line for a slot for at most `wait` (forever when zero).
    pub async fn wait_for(
        &self,
        wait: Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, SlotRefusal> {
        let max_pending = self.limits.1 as usize;
        let joined = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max_pending).then_some(n + 1)
            });
        if joined.is_err() {
            return Err(SlotRefusal::PendingOverflow);
        }
        // Leaves the line however the wait ends, also when the request is dropped while
        // waiting (its client went away): the wait is cancel-safe.
        let _in_line = InLine(&self.waiting);
        let acquire = Arc::clone(&self.slots).acquire_owned();
        if wait.is_zero() {
            acquire.await.map_err(|_| SlotRefusal::TimedOut)
        } else {
            match tokio::time::timeout(wait, acquire).await {
                Ok(Ok(permit)) => Ok(permit),
                _ => Err(SlotRefusal::TimedOut),
            }
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A place in a connection-slot line, given back when dropped.
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
