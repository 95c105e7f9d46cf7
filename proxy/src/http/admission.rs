//! Admission of a routed request to its cluster, in Envoy's order: the `max_requests`
//! circuit breaker (503 `UO`), adaptive concurrency by priority (shed: 503 `OM` unless
//! configured), then for HTTP/1 clusters a connection slot (`max_connections`), waited for
//! in a bounded line (`max_pending_requests`: 503 `UO`) up to the route's timeout (504).
//! What it takes is held on the request's context until the request ends.

use super::context::{GaugeGuard, RequestCtx};
use super::flags::ResponseFlag;
use crate::upstream::breakers::SlotRefusal;
use crate::upstream::cluster::Cluster;
use std::time::Duration;

/// Why a request was not admitted, and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The status.
    pub status: u16,
    /// Envoy's response flag.
    pub flag: ResponseFlag,
    /// The text body.
    pub body: &'static str,
}

/// Admits the request to `cluster` or says why not; a connection slot is waited for up to
/// `wait` (the route's timeout).
pub async fn admit(cluster: &Cluster, ctx: &mut RequestCtx, wait: Duration) -> Result<(), Refusal> {
    if cluster.stats.rq_active.get() >= i64::from(cluster.breakers.max_requests) {
        cluster.stats.rq_overflow.inc();
        return Err(Refusal {
            status: 503,
            flag: ResponseFlag::UpstreamOverflow,
            body: "upstream overflow (circuit breaker)\n",
        });
    }
    if let Some(adaptive) = &cluster.adaptive_concurrency {
        match adaptive.controller.try_acquire(ctx.priority) {
            Some(permit) => ctx.concurrency = Some(Box::new(permit)),
            None => {
                cluster.stats.rq_shed[ctx.priority.index()].inc();
                return Err(Refusal {
                    status: adaptive.status,
                    flag: ResponseFlag::Overload,
                    body: "overloaded: shed by adaptive concurrency (lower priority goes first)\n",
                });
            }
        }
    }
    let Some(slots) = &cluster.connection_slots else {
        return Ok(());
    };
    if let Some(slot) = slots.try_take() {
        ctx.connection_slot = Some(slot);
        return Ok(());
    }
    cluster.stats.cx_overflow.inc();
    let waiting = GaugeGuard::new(&cluster.stats.rq_pending_active);
    // Boxed: the wait is the slow path; every request's future must not carry its size.
    let slot = Box::pin(slots.wait_for(wait)).await;
    drop(waiting);
    match slot {
        Ok(slot) => {
            ctx.connection_slot = Some(slot);
            Ok(())
        }
        Err(SlotRefusal::PendingOverflow) => {
            cluster.stats.rq_pending_overflow.inc();
            Err(Refusal {
                status: 503,
                flag: ResponseFlag::UpstreamOverflow,
                body: "upstream overflow (too many requests waiting for a connection)\n",
            })
        }
        Err(SlotRefusal::TimedOut) => Err(Refusal {
            status: 504,
            flag: ResponseFlag::UpstreamTimeout,
            body: "no upstream connection came free in time\n",
        }),
    }
}
