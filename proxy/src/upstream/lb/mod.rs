//! Balancing policies: how a cluster picks one endpoint among those a request may use.
//!
//! The cluster decides *which* endpoints are usable for a try (health, ejection, the ones
//! already tried, priority level, locality, a pinned region); a policy only picks among
//! them. Each policy is one file implementing [`Balance`]; [`Balancer`] holds a cluster's
//! policy with its state (a schedule, a ring, region tracking), built once per compiled
//! cluster, and dispatches without a virtual call.

mod latency;
mod least_request;
mod random;
mod ring_hash;
mod round_robin;

pub use latency::{Latency, EXPLORE_EVERY, EXPLORE_INTERVAL, REGION_MARGIN};
pub use least_request::LeastRequest;
pub use random::Random;
pub use ring_hash::{RingHash, RingSize};
pub use round_robin::{RoundRobin, MAX_SCHEDULE_LEN};

use crate::upstream::endpoint::Endpoint;
use crate::upstream::ewma::EwmaConfig;

/// How a cluster picks an endpoint for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Weighted round robin over healthy endpoints.
    RoundRobin,
    /// Two random healthy endpoints; the one with fewer requests in flight wins.
    LeastRequest,
    /// Weighted random over healthy endpoints.
    Random,
    /// Peak-EWMA latency × (in flight + 1), the cheaper of two random healthy endpoints.
    Latency(EwmaConfig),
    /// Consistent hashing on a ring (Envoy's `RING_HASH`): a request's hash (from its
    /// route's hash policy) goes to the first usable endpoint clockwise from it.
    RingHash,
}

impl LbPolicy {
    /// The name used in config, metrics and `/clusters`.
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::LeastRequest => "least_request",
            LbPolicy::Random => "random",
            LbPolicy::Latency(_) => "latency",
            LbPolicy::RingHash => "ring_hash",
        }
    }

    /// How latency estimates decay for this cluster (the defaults unless `latency`).
    pub fn ewma(self) -> EwmaConfig {
        match self {
            LbPolicy::Latency(config) => config,
            _ => EwmaConfig::default(),
        }
    }
}

/// What every balancing policy does.
pub trait Balance {
    /// One of `endpoints` that `usable` allows, or `None` when it allows none. `hash` is
    /// the request's key from its route's hash policy, for policies that use one.
    fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        hash: Option<u64>,
    ) -> Option<&'a Endpoint>;
}

/// A cluster's policy with its state, built for the cluster's endpoints.
#[derive(Debug)]
pub enum Balancer {
    /// `round_robin`.
    RoundRobin(RoundRobin),
    /// `least_request`.
    LeastRequest(LeastRequest),
    /// `random`.
    Random(Random),
    /// `latency`.
    Latency(Latency),
    /// `ring_hash`.
    RingHash(RingHash),
}

impl Balancer {
    /// The balancer of `policy` over `endpoints` (a ring starts with Envoy's default size).
    pub fn new(policy: LbPolicy, endpoints: &[Endpoint]) -> Self {
        match policy {
            LbPolicy::RoundRobin => Balancer::RoundRobin(RoundRobin::new(endpoints)),
            LbPolicy::LeastRequest => Balancer::LeastRequest(LeastRequest),
            LbPolicy::Random => Balancer::Random(Random),
            LbPolicy::Latency(config) => Balancer::Latency(Latency::new(config, endpoints)),
            LbPolicy::RingHash => Balancer::RingHash(RingHash::new(endpoints, RingSize::default())),
        }
    }

    /// See [`Balance::pick`].
    pub fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        usable: &impl Fn(&Endpoint) -> bool,
        hash: Option<u64>,
    ) -> Option<&'a Endpoint> {
        if endpoints.is_empty() {
            return None;
        }
        match self {
            Balancer::RoundRobin(policy) => policy.pick(endpoints, usable, hash),
            Balancer::LeastRequest(policy) => policy.pick(endpoints, usable, hash),
            Balancer::Random(policy) => policy.pick(endpoints, usable, hash),
            Balancer::Latency(policy) => policy.pick(endpoints, usable, hash),
            Balancer::RingHash(policy) => policy.pick(endpoints, usable, hash),
        }
    }
}

/// A usable endpoint drawn at random by weight.
fn weighted_random<'a>(
    endpoints: &'a [Endpoint],
    usable: &impl Fn(&Endpoint) -> bool,
) -> Option<&'a Endpoint> {
    let total: u64 = endpoints
        .iter()
        .filter(|e| usable(e))
        .map(|e| u64::from(e.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(..total);
    for endpoint in endpoints.iter().filter(|e| usable(e)) {
        let w = u64::from(endpoint.weight);
        if ticket < w {
            return Some(endpoint);
        }
        ticket -= w;
    }
    None
}

/// Two different usable endpoints drawn by weight (the same one twice when it is the only
/// one): power of two choices.
fn two_choices<'a>(
    endpoints: &'a [Endpoint],
    usable: &impl Fn(&Endpoint) -> bool,
) -> Option<(&'a Endpoint, &'a Endpoint)> {
    let a = weighted_random(endpoints, usable)?;
    let b = weighted_random(endpoints, &|e: &Endpoint| {
        usable(e) && e.address != a.address
    })
    .unwrap_or(a);
    Some((a, b))
}
