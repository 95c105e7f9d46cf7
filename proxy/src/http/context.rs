//! What a request carries through the phases ([`RequestCtx`]), and the retry bookkeeping
//! on it: the route's budget and the cluster's `max_retries` breaker.

use super::flags::ResponseFlag;
use crate::compile::Snapshot;
use crate::plugins::chain::{RequestPlugins, Verdict};
use crate::route::{Route, Tenant};
use crate::upstream::cluster::Cluster;
use crate::upstream::concurrency::{ConcurrencyPermit, Priority};
use crate::upstream::endpoint::ActiveRequest;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Per-request state, created by `new_ctx` and dropped after `logging`.
pub struct RequestCtx {
    pub(super) start: Instant,
    pub(super) start_wall: SystemTime,
    pub(super) snapshot: Option<Arc<Snapshot>>,
    /// The connection manager the request is under (its routes, limits, access log).
    pub(super) manager: Option<Arc<crate::listener::HttpManager>>,
    pub(super) route: Option<Arc<Route>>,
    pub(super) target: usize,
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) tried: Vec<SocketAddr>,
    pub(super) retries: u32,
    pub(super) flag: Option<ResponseFlag>,
    /// Status of a response the proxy generated itself.
    pub(super) local_status: u16,
    pub(super) request_id: String,
    pub(super) active_endpoint: Option<ActiveRequest>,
    pub(super) active_cluster: Option<GaugeGuard>,
    /// Held from a request's first retry: counts it against the `max_retries` breaker.
    pub(super) retry_slot: Option<GaugeGuard>,
    /// The request's priority class (`x-nip-priority`), for load shedding.
    pub(super) priority: Priority,
    /// Admission by the cluster's adaptive concurrency, held until the request ends (boxed:
    /// opt-in state must not grow every request's context).
    pub(super) concurrency: Option<Box<ConcurrencyPermit>>,
    /// A connection slot of the cluster (`max_connections`), held until the request ends.
    pub(super) connection_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The route's plugins as this request runs through them.
    /// (Boxed, like `rare`: the context lives inside pingora's per-request future,
    /// which is moved whole, so requests without plugins must not pay for its size.)
    pub(super) plugins: Option<Box<RequestPlugins>>,
    /// State few requests have, behind one pointer (see `size_tests`).
    pub(super) rare: Option<Box<RareState>>,
    pub(super) _downstream: GaugeGuard,
}

/// Per-request state few requests need.
#[derive(Default)]
pub struct RareState {
    /// How a plugin ended the request from a body phase (answered in `fail_to_proxy`).
    pub(super) plugin_stop: Option<Verdict>,
    /// Headers an authorization service asked to add to the response.
    pub(super) response_headers_to_add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The tenant `nip.tenant` identified, on a route no tenant owns.
    pub(super) tenant: Option<Arc<Tenant>>,
    /// `iss/sub` of the first token `jwt_authn` verified (what plugins see as the
    /// principal).
    pub(super) jwt_principal: Option<Arc<str>>,
    /// The request body as plugins left it, read before the head went upstream (sent in
    /// place of what pingora read).
    pub(super) request_body: Option<bytes::Bytes>,
    /// The route's `ext_proc` streams that still have response phases to run.
    pub(super) processors: Option<Box<super::ext_proc::Processors>>,
    /// The request's trace, when its connection manager traces it.
    pub(super) trace: Option<crate::telemetry::trace::RequestTrace>,
}

/// Increments a gauge for as long as it lives.
pub(super) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(super) fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RequestCtx {
    /// The rare state, made on first use.
    pub(super) fn rare(&mut self) -> &mut RareState {
        self.rare.get_or_insert_with(Box::default)
    }

    /// The request's trace, if it has one.
    pub(super) fn trace(&mut self) -> Option<&mut crate::telemetry::trace::RequestTrace> {
        self.rare.as_mut()?.trace.as_mut()
    }

    /// When a phase worth a span event began: `None` (no clock read) for requests that are
    /// not traced.
    pub(super) fn trace_clock(&self) -> Option<(std::time::SystemTime, Instant)> {
        self.rare
            .as_ref()?
            .trace
            .as_ref()
            .map(|_| (std::time::SystemTime::now(), Instant::now()))
    }

    /// Records the time a phase's filters took as an event of the request's span.
    pub(super) fn trace_event(
        &mut self,
        name: &'static str,
        clock: Option<(std::time::SystemTime, Instant)>,
    ) {
        if let (Some((at, started)), Some(trace)) = (clock, self.trace()) {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            trace.event(name, at, micros);
        }
    }

    /// Records how a plugin ended the request.
    pub(super) fn stop_by_plugin(&mut self, verdict: Verdict) {
        self.rare().plugin_stop = Some(verdict);
    }

    /// The request's tenant: its route's owner, else the one `nip.tenant` identified.
    pub(super) fn tenant(&self) -> Option<&Tenant> {
        self.route
            .as_ref()
            .and_then(|r| r.tenant.as_ref())
            .or_else(|| self.rare.as_ref()?.tenant.as_deref())
    }

    /// How a plugin ended the request, if one did (taken).
    pub(super) fn take_plugin_stop(&mut self) -> Option<Verdict> {
        self.rare.as_mut()?.plugin_stop.take()
    }

    /// When the route's budget (its `timeout`: tries, back-off and body) runs out; computed
    /// from the route rather than stored, so every request's context stays small.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let timeout = self.route.as_ref()?.timeout;
        if timeout.is_zero() {
            return None;
        }
        self.start.checked_add(timeout)
    }

    /// Takes another try if the route's budget and the cluster's `max_retries` circuit
    /// breaker allow it (a request already retrying holds its breaker slot), counting it;
    /// call it only once the route's policy wants the retry, so overflows count real ones.
    pub(super) fn try_retry(&mut self) -> bool {
        let budget = self
            .route
            .as_ref()
            .is_some_and(|r| self.retries < r.retry.max_retries);
        if !budget {
            return false;
        }
        if let Some(cluster) = &self.cluster {
            if self.retry_slot.is_none() {
                let allowed = cluster
                    .breakers
                    .retries_allowed(cluster.stats.rq_active.get());
                if cluster.stats.rq_retry_active.get() >= allowed {
                    cluster.stats.rq_retry_overflow.inc();
                    return false;
                }
                self.retry_slot = Some(GaugeGuard::new(&cluster.stats.rq_retry_active));
            }
            cluster.stats.rq_retry.inc();
        }
        self.retries += 1;
        true
    }
}

#[cfg(test)]
mod size_tests {
    /// The per-request context lives inside pingora's per-request future, which pingora
    /// moves (memcpy) as a whole: 320 bytes of inline plugin state once cost every request
    /// ~12k instructions (13 %), plugins or not. Keep big, rare state behind a `Box`.
    #[test]
    fn the_request_context_stays_small() {
        let size = std::mem::size_of::<super::RequestCtx>();
        assert!(size <= 256, "RequestCtx grew to {size} bytes");
    }
}
