//! Upstream clusters as the request path sees them: a [`Cluster`] is immutable and belongs
//! to one compiled snapshot. It decides which of its endpoints a try may use — in service
//! (healthy, not ejected), not tried yet, at the priority level and in the locality chosen
//! by Envoy's rules, in a pinned region — and hands those to its balancing policy
//! ([`crate::upstream::lb`]) to pick one. The state that must outlive a reload lives in
//! [`EndpointState`], handed to every snapshot by the
//! [`EndpointRegistry`](crate::upstream::registry::EndpointRegistry).

use crate::telemetry::metrics::ClusterStats;
use crate::upstream::breakers::{CircuitBreakers, ConnectionSlots};
use crate::upstream::concurrency::ConcurrencyController;
use crate::upstream::endpoint::{Endpoint, EndpointState};
use crate::upstream::lb::{Balancer, LbPolicy, RingHash, RingSize};
use crate::upstream::outlier::{
    interval_outliers, Detector, IntervalStats, OutlierConfig, TryOutcome,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Active health checking of a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheckSpec {
    /// Path to GET.
    pub path: String,
    /// Host header (empty: the endpoint address).
    pub host: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time allowed for one check.
    pub timeout: Duration,
    /// Failures in a row before an endpoint is taken out.
    pub unhealthy_threshold: u32,
    /// Successes in a row before it is put back.
    pub healthy_threshold: u32,
    /// Accepted statuses as half-open ranges; empty means 200–299.
    pub expected_statuses: Vec<(u16, u16)>,
}

impl HealthCheckSpec {
    /// Whether a probe's status counts as healthy.
    pub fn accepts(&self, status: u16) -> bool {
        if self.expected_statuses.is_empty() {
            (200..300).contains(&status)
        } else {
            self.expected_statuses
                .iter()
                .any(|(start, end)| (*start..*end).contains(&status))
        }
    }
}

/// An upstream service as the request path sees it.
#[derive(Debug)]
pub struct Cluster {
    /// Cluster (service) name.
    pub name: Arc<str>,
    /// Selection policy.
    pub lb: LbPolicy,
    /// Speak HTTP/2 (h2c) to endpoints.
    pub http2: bool,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Endpoints in EDS order.
    pub endpoints: Vec<Endpoint>,
    /// Active health checking, if any.
    pub health_check: Option<HealthCheckSpec>,
    /// Metric handles resolved at compile time.
    pub stats: ClusterStats,
    /// The balancing policy with its state.
    balancer: Balancer,
    /// Outlier detection, if configured.
    pub outlier: Option<OutlierConfig>,
    /// Circuit breakers.
    pub breakers: CircuitBreakers,
    /// Endpoint indexes by priority level (0 first), when there is more than one level.
    priorities: Vec<Vec<usize>>,
    /// Locality-weighted balancing: endpoint indexes by locality, when switched on.
    localities: Vec<Vec<usize>>,
    /// Adaptive concurrency, if configured.
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Connection slots of an HTTP/1 cluster (`max_connections`, `max_pending_requests`).
    pub connection_slots: Option<Arc<ConnectionSlots>>,
    /// Envoy's `ORIGINAL_DST` cluster: no endpoints of its own; each request goes where the
    /// client's connection was going before a redirect (`SO_ORIGINAL_DST`).
    pub original_destination: bool,
}

/// A cluster's adaptive concurrency: the controller (kept across reloads) and the status
/// a shed request is answered with.
#[derive(Debug)]
pub struct AdaptiveConcurrency {
    /// The gradient controller.
    pub controller: Arc<ConcurrencyController>,
    /// Status of a shed request (503 unless configured).
    pub status: u16,
}

/// Envoy's overprovisioning factor: a priority level at 1/1.4 ≈ 71 % healthy still takes
/// all of its traffic.
pub const OVERPROVISIONING: u64 = 140;

impl Cluster {
    /// Builds a cluster and its balancer.
    pub fn new(
        name: Arc<str>,
        lb: LbPolicy,
        http2: bool,
        connect_timeout: Duration,
        endpoints: Vec<Endpoint>,
        health_check: Option<HealthCheckSpec>,
        stats: ClusterStats,
    ) -> Self {
        let levels = endpoints
            .iter()
            .map(|e| e.priority)
            .max()
            .map_or(0, |m| m as usize + 1);
        let priorities: Vec<Vec<usize>> = if levels > 1 {
            (0..levels)
                .map(|level| {
                    (0..endpoints.len())
                        .filter(|&i| endpoints[i].priority as usize == level)
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        Cluster {
            name,
            lb,
            http2,
            connect_timeout,
            balancer: Balancer::new(lb, &endpoints),
            endpoints,
            health_check,
            stats,
            outlier: None,
            breakers: CircuitBreakers::default(),
            priorities,
            localities: Vec::new(),
            adaptive_concurrency: None,
            connection_slots: None,
            original_destination: false,
        }
    }

    /// Limits connections in use and requests waiting for one (for HTTP/1 clusters: the
    /// compiler gives HTTP/2 clusters none, their connections carry many requests).
    pub fn with_connection_slots(mut self, slots: Option<Arc<ConnectionSlots>>) -> Self {
        self.connection_slots = slots;
        self
    }
    /// Sizes the ring of a `ring_hash` cluster (Envoy's `RingHashLbConfig`); see
    /// [`RingHash::new`].
    pub fn with_ring(mut self, size: RingSize) -> Self {
        if let Balancer::RingHash(ring) = &mut self.balancer {
            if ring.size() != size {
                *ring = RingHash::new(&self.endpoints, size);
            }
        }
        self
    }

    /// Limits requests in flight by a gradient controller (see [`crate::upstream::concurrency`]).
    pub fn with_adaptive_concurrency(mut self, adaptive: Option<AdaptiveConcurrency>) -> Self {
        self.adaptive_concurrency = adaptive;
        self
    }

    /// Switches on locality-weighted balancing (Envoy's `locality_weighted_lb_config`): a
    /// locality is chosen by its weight scaled by its availability, then an endpoint in it.
    pub fn with_locality_weights(mut self, on: bool) -> Self {
        self.localities.clear();
        if on {
            for (i, endpoint) in self.endpoints.iter().enumerate() {
                let same = |members: &&mut Vec<usize>| {
                    let first = &self.endpoints[members[0]];
                    first.locality == endpoint.locality && first.priority == endpoint.priority
                };
                match self.localities.iter_mut().find(same) {
                    Some(members) => members.push(i),
                    None => self.localities.push(vec![i]),
                }
            }
        }
        self
    }

    /// The locality group this request goes to: weight × min(1, 1.4 × usable share), among
    /// groups with a usable endpoint. `None` when locality weighting is off.
    fn locality_choice(&self, usable: &impl Fn(&Endpoint) -> bool) -> Option<usize> {
        // `latency` chooses regions by measured latency instead.
        if self.localities.is_empty() || matches!(self.lb, LbPolicy::Latency(_)) {
            return None;
        }
        let weight = |g: usize| {
            let members = &self.localities[g];
            u64::from(self.endpoints[members[0]].locality_weight)
                * self.availability(members, usable)
        };
        let total: u64 = (0..self.localities.len()).map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = fastrand::u64(..total);
        for group in 0..self.localities.len() {
            let w = weight(group);
            if ticket < w {
                return Some(group);
            }
            ticket -= w;
        }
        None
    }

    /// Envoy's availability of a group of endpoints, in percent: min(100, 1.4 × the share
    /// that is usable).
    fn availability(&self, members: &[usize], usable: &impl Fn(&Endpoint) -> bool) -> u64 {
        let up = members
            .iter()
            .filter(|&&i| usable(&self.endpoints[i]))
            .count() as u64;
        (OVERPROVISIONING * up / members.len().max(1) as u64).min(100)
    }

    /// Sets the circuit breakers.
    pub fn with_circuit_breakers(mut self, breakers: CircuitBreakers) -> Self {
        self.breakers = breakers;
        self
    }

    /// Ejects endpoints that keep failing (see [`crate::upstream::outlier`]).
    pub fn with_outlier_detection(mut self, config: Option<OutlierConfig>) -> Self {
        self.outlier = config;
        self
    }

    /// Records how a try to an endpoint of this cluster ended; ejects it when it crossed a
    /// threshold and the cluster may lose one more endpoint.
    pub fn record_outcome(&self, state: &EndpointState, outcome: TryOutcome) {
        let Some(config) = &self.outlier else {
            return;
        };
        let now = tokio::time::Instant::now();
        if let Some(detector) = state.outlier.record(outcome, now, config) {
            self.try_eject(state, now, config, detector);
        }
    }

    /// Runs the per-interval detectors over the interval that ends now (see
    /// [`crate::upstream::outlier::interval_outliers`]) and ejects what they find, each finding
    /// enforced with its detector's probability.
    pub fn sweep_outliers(&self, now: tokio::time::Instant) {
        let Some(config) = &self.outlier else {
            return;
        };
        let stats: Vec<IntervalStats> = self
            .endpoints
            .iter()
            .map(|e| e.state.outlier.take_interval())
            .collect();
        for (i, detector) in interval_outliers(&stats, config) {
            let enforcing = match detector {
                Detector::SuccessRate => config.success_rate.map_or(0, |d| d.enforcing_percent),
                Detector::FailurePercentage => {
                    config.failure_percentage.map_or(0, |d| d.enforcing_percent)
                }
                _ => 100,
            };
            if fastrand::u32(..100) < enforcing {
                self.try_eject(&self.endpoints[i].state, now, config, detector);
            }
        }
    }

    /// Ejects an endpoint unless it is out already or the cluster may not lose one more.
    fn try_eject(
        &self,
        state: &EndpointState,
        now: tokio::time::Instant,
        config: &OutlierConfig,
        detector: Detector,
    ) {
        if state.outlier.is_ejected(now) {
            return;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.state.outlier.is_ejected(now))
            .count();
        let allowed = (self.endpoints.len() * config.max_ejection_percent as usize / 100).max(1);
        if ejected < allowed {
            state.outlier.eject(now, config);
            self.stats.outlier_ejections[detector.index()].inc();
        }
    }

    /// The priority level this request goes to, by Envoy's rule: a level's health is
    /// min(100, 1.4 × its usable share); levels take load in order up to their health, the
    /// rest spills to the next; when all together are under 100 the loads are scaled up.
    /// `None` with a single level or nothing usable.
    fn priority_level(&self, usable: &impl Fn(&Endpoint) -> bool) -> Option<u32> {
        if self.priorities.len() < 2 {
            return None;
        }
        // No allocation: levels take min(health, what is left of 100) in order; when all
        // together are under 100, each takes its health of that smaller whole.
        let health = |level: usize| self.availability(&self.priorities[level], usable);
        let total: u64 = (0..self.priorities.len()).map(health).sum();
        if total == 0 {
            return None;
        }
        let mut remaining = total.min(100);
        let mut ticket = fastrand::u64(..remaining);
        for level in 0..self.priorities.len() {
            let load = health(level).min(remaining);
            if ticket < load {
                return u32::try_from(level).ok();
            }
            ticket -= load;
            remaining -= load;
        }
        None
    }

    /// Whether an endpoint takes traffic: healthy and not ejected.
    fn in_service(&self, endpoint: &Endpoint, now: tokio::time::Instant) -> bool {
        endpoint.state.is_healthy()
            && (self.outlier.is_none() || !endpoint.state.outlier.is_ejected(now))
    }

    /// Sends each request where its connection was going (an `ORIGINAL_DST` cluster).
    pub fn with_original_destination(mut self, original: bool) -> Self {
        self.original_destination = original;
        self
    }

    /// Tells the cluster which region the proxy runs in: `latency` prefers it.
    pub fn with_local_region(mut self, region: &str) -> Self {
        if let Balancer::Latency(latency) = &mut self.balancer {
            latency.set_local_region(region);
        }
        self
    }

    /// The region `latency` sends traffic to now, if the cluster spans several.
    pub fn current_region(&self) -> Option<&str> {
        match &self.balancer {
            Balancer::Latency(latency) => latency.current_region(),
            _ => None,
        }
    }

    /// Predicted latency of each region under `latency` (lowest estimate among its
    /// endpoints in service), `None` when nothing there is; empty under other policies.
    pub fn region_predictions(&self) -> Vec<(&str, Option<Duration>)> {
        let now = tokio::time::Instant::now();
        match &self.balancer {
            Balancer::Latency(latency) => {
                latency.region_predictions(&self.endpoints, &|e: &Endpoint| self.in_service(e, now))
            }
            _ => Vec::new(),
        }
    }

    /// The balancer, for tests and `/clusters`.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Number of endpoints currently taking traffic (healthy, not ejected).
    pub fn healthy_count(&self) -> usize {
        let now = tokio::time::Instant::now();
        self.endpoints
            .iter()
            .filter(|e| self.in_service(e, now))
            .count()
    }

    /// Picks a healthy endpoint, avoiding `tried` (endpoints that already failed this
    /// request) when another healthy one exists. `None` means no endpoint is healthy.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<&Endpoint> {
        self.pick_in(tried, None, None)
    }

    /// [`Cluster::pick`] among the endpoints of `region` only, when given (data locality:
    /// `None` back rather than another region); `hash` is the request's key for
    /// `ring_hash` (without one, it picks at random).
    pub fn pick_in(
        &self,
        tried: &[SocketAddr],
        region: Option<&str>,
        hash: Option<u64>,
    ) -> Option<&Endpoint> {
        let now = tokio::time::Instant::now();
        let allowed = |e: &Endpoint| {
            self.in_service(e, now) && region.is_none_or(|r| *e.locality.region == *r)
        };
        let usable = |e: &Endpoint| allowed(e) && !tried.contains(&e.address);
        let level = self.priority_level(&allowed);
        let at_level = |e: &Endpoint| usable(e) && level.is_none_or(|l| e.priority == l);
        if let Some(group) = self.locality_choice(&at_level) {
            let members = &self.localities[group];
            let in_locality = |e: &Endpoint| {
                at_level(e)
                    && members
                        .iter()
                        .any(|&i| self.endpoints[i].address == e.address)
            };
            if let Some(endpoint) = self.pick_where(in_locality, hash) {
                return Some(endpoint);
            }
        }
        if level.is_some() {
            if let Some(endpoint) = self.pick_where(at_level, hash) {
                return Some(endpoint);
            }
        }
        self.pick_where(usable, hash).or_else(|| {
            if tried.is_empty() {
                None
            } else {
                self.pick_where(allowed, hash)
            }
        })
    }
    fn pick_where(
        &self,
        usable: impl Fn(&Endpoint) -> bool,
        hash: Option<u64>,
    ) -> Option<&Endpoint> {
        self.balancer.pick(&self.endpoints, &usable, hash)
    }
}

#[cfg(test)]
mod tests;
