//! Upstream clusters: their endpoints, each endpoint's live state, and endpoint selection.
//!
//! A [`Cluster`] is immutable and belongs to one compiled snapshot. The state that must
//! outlive a config reload — health, requests in flight — lives in [`EndpointState`], which
//! the [`EndpointRegistry`] hands to every snapshot that has the same endpoint, so a reload
//! neither forgets that an endpoint is down nor loses count of its in-flight requests.

use crate::concurrency::{ConcurrencyController, GradientConfig};
use crate::ewma::{EwmaConfig, PeakEwma};
use crate::metrics::ClusterStats;
use crate::outlier::{
    interval_outliers, Detector, IntervalStats, OutlierConfig, OutlierState, TryOutcome,
};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Where an endpoint runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// Region name.
    pub region: String,
    /// Zone name.
    pub zone: String,
    /// Sub-zone name (a rack, a cell).
    pub sub_zone: String,
}

/// State of one endpoint that survives config reloads.
#[derive(Debug)]
pub struct EndpointState {
    healthy: AtomicBool,
    active_requests: AtomicUsize,
    /// Requests sent to this endpoint (each try counts).
    pub requests_total: AtomicU64,
    /// Connections opened to this endpoint.
    pub connections_total: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures_total: AtomicU64,
    /// Response-time estimate (peak EWMA), kept for every policy, used by `latency`.
    pub latency: PeakEwma,
    /// Failure streaks and ejection (outlier detection).
    pub outlier: OutlierState,
    /// Tries sent and still waiting for their response head.
    awaiting_head: AtomicUsize,
    /// Roughly when the oldest try still waiting started, in µs since `base` (see
    /// [`EndpointState::silence`]).
    pending_since_us: AtomicU64,
    base: tokio::time::Instant,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            healthy: AtomicBool::new(true),
            active_requests: AtomicUsize::new(0),
            requests_total: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
            latency: PeakEwma::default(),
            outlier: OutlierState::default(),
            awaiting_head: AtomicUsize::new(0),
            pending_since_us: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
        }
    }
}

impl EndpointState {
    /// Whether active health checking currently lets traffic through.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Set by the health checker.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Requests in flight to this endpoint right now.
    pub fn active_requests(&self) -> usize {
        self.active_requests.load(Ordering::Relaxed)
    }

    fn micros_since_base(&self, at: tokio::time::Instant) -> u64 {
        // +1 so that 0 can mean "nothing pending".
        u64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX) + 1
    }

    /// How long the endpoint has kept a try waiting without answering anything: the age of
    /// its oldest waiting try, approximately (each answer moves the mark to the start of the
    /// try it answered, so the mark only ages while nothing comes back). Silence is
    /// slowness: a black-holed endpoint's prediction grows by the millisecond instead of
    /// staying at its last good estimate until a timeout fires.
    pub fn silence(&self, now: tokio::time::Instant) -> Duration {
        if self.awaiting_head.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        match self.pending_since_us.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_micros(self.micros_since_base(now).saturating_sub(since)),
        }
    }

    /// The predicted response time: the peak-EWMA estimate, or the current silence when
    /// that is longer.
    pub fn predicted(&self, config: &EwmaConfig, now: tokio::time::Instant) -> Duration {
        self.latency.estimate(config).max(self.silence(now))
    }

    /// The prediction that region choice compares: the smoothed average, or the current
    /// silence beyond [`SILENCE_GRACE`] when that is longer (a stall of the proxy itself
    /// must not move a cluster to another region; a black hole still does, within the
    /// grace plus the margin).
    pub fn region_predicted(&self, config: &EwmaConfig, now: tokio::time::Instant) -> Duration {
        self.latency
            .smoothed(config)
            .max(self.silence(now).saturating_sub(SILENCE_GRACE))
    }

    /// What one more request would cost: prediction × (requests in flight + 1).
    pub fn cost(&self, config: &EwmaConfig, now: tokio::time::Instant) -> f64 {
        self.predicted(config, now).as_nanos() as f64 * (self.active_requests() as f64 + 1.0)
    }

    fn try_started(&self, at: tokio::time::Instant) {
        if self.awaiting_head.fetch_add(1, Ordering::Relaxed) == 0 {
            self.pending_since_us
                .store(self.micros_since_base(at), Ordering::Relaxed);
        }
    }

    /// A try that started at `started` got its outcome (or was dropped without one).
    fn try_settled(&self, started: tokio::time::Instant) {
        let left = self
            .awaiting_head
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        if left == 0 {
            self.pending_since_us.store(0, Ordering::Relaxed);
        } else {
            self.pending_since_us
                .fetch_max(self.micros_since_base(started), Ordering::Relaxed);
        }
    }

    /// Whether a try to this endpoint is waiting for its answer.
    pub fn awaiting_answer(&self) -> bool {
        self.awaiting_head.load(Ordering::Relaxed) > 0
    }
}

/// Silence shorter than this does not count in region choice (see
/// [`EndpointState::region_predicted`]).
pub const SILENCE_GRACE: Duration = Duration::from_millis(100);

/// What a failed try counts as in an endpoint's latency estimate: a connection refused
/// in a microsecond must not make a dead endpoint look like the fastest one.
pub const FAILURE_LATENCY: Duration = Duration::from_secs(1);

/// Counts a request in flight to an endpoint for as long as it lives, and times it.
#[derive(Debug)]
pub struct ActiveRequest {
    state: Arc<EndpointState>,
    started: tokio::time::Instant,
    /// Whether this try's latency was recorded (once: its head, or its failure).
    timed: bool,
}

impl ActiveRequest {
    /// Starts counting.
    pub fn start(state: &Arc<EndpointState>) -> Self {
        let started = tokio::time::Instant::now();
        state.active_requests.fetch_add(1, Ordering::Relaxed);
        state.requests_total.fetch_add(1, Ordering::Relaxed);
        state.try_started(started);
        ActiveRequest {
            state: Arc::clone(state),
            started,
            timed: false,
        }
    }

    /// The endpoint's state.
    pub fn state(&self) -> &EndpointState {
        &self.state
    }

    /// The response head arrived: its delay feeds the endpoint's latency estimate.
    pub fn answered(&mut self, ewma: &EwmaConfig) {
        self.time(ewma, false);
    }

    /// The try failed before its head arrived (connect failure, reset, timeout): it counts
    /// as at least [`FAILURE_LATENCY`]. Returns whether this was the try's first outcome.
    pub fn failed(&mut self, ewma: &EwmaConfig) -> bool {
        self.time(ewma, true)
    }

    fn time(&mut self, ewma: &EwmaConfig, failed: bool) -> bool {
        if self.timed {
            return false;
        }
        self.timed = true;
        self.state.try_settled(self.started);
        let now = tokio::time::Instant::now();
        let elapsed = now.saturating_duration_since(self.started);
        let observed = if failed {
            elapsed.max(FAILURE_LATENCY)
        } else {
            self.state.outlier.observe_answer(elapsed);
            elapsed
        };
        self.state.latency.observe(observed, now, ewma);
        true
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.state.active_requests.fetch_sub(1, Ordering::Relaxed);
        if !self.timed {
            self.state.try_settled(self.started);
        }
    }
}

/// One upstream endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// Region and zone.
    pub locality: Locality,
    /// Relative share of traffic.
    pub weight: u32,
    /// Priority level (0 is preferred).
    pub priority: u32,
    /// Weight of the endpoint's locality (locality-weighted balancing).
    pub locality_weight: u32,
    /// Live state shared across snapshots.
    pub state: Arc<EndpointState>,
    /// Tries sent to this endpoint's locality (`nip_upstream_locality_picks_total`).
    pub locality_picks: prometheus_client::metrics::counter::Counter,
}

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
    /// Weighted round-robin schedule: endpoint indexes, each repeated by weight, interleaved.
    schedule: Vec<u32>,
    cursor: AtomicUsize,
    /// Endpoints grouped by region, for `latency` across regions.
    regions: Regions,
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
    /// `ring_hash`: points (hash, endpoint index), sorted by hash.
    ring: Vec<(u64, u32)>,
    /// Connection slots of an HTTP/1 cluster (`max_connections`, `max_pending_requests`).
    pub connection_slots: Option<Arc<ConnectionSlots>>,
}

/// Ring sizes of `ring_hash` (Envoy's `RingHashLbConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSize {
    /// Fewest points.
    pub minimum: u64,
    /// Most points.
    pub maximum: u64,
}

impl Default for RingSize {
    /// Envoy's defaults.
    fn default() -> Self {
        RingSize {
            minimum: 1024,
            maximum: 8 * 1024 * 1024,
        }
    }
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

/// Endpoints by region and which region `lb: latency` sends traffic to now.
///
/// The predicted latency of a region is the lowest [`EndpointState::region_predicted`] among
/// its usable endpoints — the smoothed average, or a silence past its grace (load is
/// weighed inside the region, by the two choices; weighing it here too would send traffic
/// back and forth between regions as requests come and go). Traffic stays in the proxy's
/// own region until that is
/// slower than the best region by more than [`REGION_MARGIN`] (or has nothing usable),
/// then goes to the best; it comes back once the local prediction is within half the margin
/// of where traffic is (hysteresis: no flapping between close regions). Other regions are
/// explored so that their predictions stay current — that is how a recovered region is
/// noticed: each at most once per [`EXPLORE_INTERVAL`], and only on one pick in
/// [`EXPLORE_EVERY`], so exploring costs a bounded share of traffic at any rate (p99 stays
/// the local region's), and never while a try explored there is still unanswered.
#[derive(Debug)]
struct Regions {
    /// Region names and the indexes of their endpoints.
    groups: Vec<(String, Vec<usize>)>,
    /// The group of the proxy's own region.
    local: Option<usize>,
    /// The group traffic goes to now.
    current: AtomicUsize,
    /// Counts picks, to spread exploration.
    picks: AtomicU64,
    /// When each group was last explored, in ms since `base` (0: never).
    explored_at_ms: Vec<AtomicU64>,
    base: tokio::time::Instant,
}

/// How much slower (relative) the current region may be than the best before traffic moves.
pub const REGION_MARGIN: f64 = 0.5;

/// At most one pick in this many explores another region.
pub const EXPLORE_EVERY: u64 = 50;

/// A region is explored at most this often.
pub const EXPLORE_INTERVAL: Duration = Duration::from_secs(1);

impl Cluster {
    /// Builds a cluster and its round-robin schedule.
    pub fn new(
        name: Arc<str>,
        lb: LbPolicy,
        http2: bool,
        connect_timeout: Duration,
        endpoints: Vec<Endpoint>,
        health_check: Option<HealthCheckSpec>,
        stats: ClusterStats,
    ) -> Self {
        let schedule = interleaved_schedule(&endpoints);
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
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, endpoint) in endpoints.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|(r, _)| *r == endpoint.locality.region)
            {
                Some((_, members)) => members.push(i),
                None => groups.push((endpoint.locality.region.clone(), vec![i])),
            }
        }
        Cluster {
            name,
            lb,
            http2,
            connect_timeout,
            endpoints,
            health_check,
            stats,
            schedule,
            cursor: AtomicUsize::new(fastrand::usize(..1 << 16)),
            regions: Regions {
                explored_at_ms: groups.iter().map(|_| AtomicU64::new(0)).collect(),
                groups,
                local: None,
                current: AtomicUsize::new(0),
                picks: AtomicU64::new(0),
                base: tokio::time::Instant::now(),
            },
            outlier: None,
            breakers: CircuitBreakers::default(),
            priorities,
            localities: Vec::new(),
            adaptive_concurrency: None,
            ring: Vec::new(),
            connection_slots: None,
        }
    }

    /// Limits connections in use and requests waiting for one (for HTTP/1 clusters: the
    /// compiler gives HTTP/2 clusters none, their connections carry many requests).
    pub fn with_connection_slots(mut self, slots: Option<Arc<ConnectionSlots>>) -> Self {
        self.connection_slots = slots;
        self
    }

    /// Builds the hash ring of `ring_hash` exactly as Envoy does (`RingHashLoadBalancer`):
    /// scale = min(⌈min normalized weight × minimum⌉ / min normalized weight, maximum);
    /// endpoints take points in order from running sums of scale × normalized weight; a
    /// point is xxHash64 of `"address_n"`. So every proxy, and Envoy, builds the same ring
    /// for the same endpoints. (Envoy rebuilds its ring without unhealthy hosts; NIP keeps
    /// the ring and walks past them clockwise.)
    pub fn with_ring(mut self, size: RingSize) -> Self {
        self.ring.clear();
        if self.lb != LbPolicy::RingHash || self.endpoints.is_empty() {
            return self;
        }
        let total: f64 = self
            .endpoints
            .iter()
            .map(|e| f64::from(e.weight.max(1)))
            .sum();
        let normalized: Vec<f64> = self
            .endpoints
            .iter()
            .map(|e| f64::from(e.weight.max(1)) / total)
            .collect();
        let min_normalized = normalized.iter().copied().fold(f64::INFINITY, f64::min);
        let scale = ((min_normalized * size.minimum as f64).ceil() / min_normalized)
            .min(size.maximum.max(1) as f64);
        self.ring.reserve(scale.ceil() as usize);
        let (mut current, mut target) = (0.0f64, 0.0f64);
        let mut key = String::new();
        for (index, (endpoint, weight)) in self.endpoints.iter().zip(&normalized).enumerate() {
            target += scale * weight;
            let mut n = 0u64;
            while current < target {
                key.clear();
                let _ = write!(key, "{}_{n}", endpoint.address);
                self.ring.push((
                    crate::hash::hash64(key.as_bytes()),
                    u32::try_from(index).unwrap_or(u32::MAX),
                ));
                n += 1;
                current += 1.0;
            }
        }
        self.ring.sort_unstable();
        self
    }

    /// The first usable endpoint clockwise from `hash` on the ring.
    fn ring_pick(&self, hash: u64, usable: &impl Fn(&Endpoint) -> bool) -> Option<&Endpoint> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|(point, _)| *point < hash);
        let mut seen_last = u32::MAX;
        for step in 0..self.ring.len() {
            let (_, index) = self.ring[(start + step) % self.ring.len()];
            if index == seen_last {
                continue;
            }
            seen_last = index;
            let endpoint = self.endpoints.get(index as usize)?;
            if usable(endpoint) {
                return Some(endpoint);
            }
        }
        None
    }

    /// Limits requests in flight by a gradient controller (see [`crate::concurrency`]).
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

    /// Ejects endpoints that keep failing (see [`crate::outlier`]).
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
    /// [`crate::outlier::interval_outliers`]) and ejects what they find, each finding
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

    /// Tells the cluster which region the proxy runs in: `latency` prefers it.
    pub fn with_local_region(mut self, region: &str) -> Self {
        self.regions.local = self.regions.groups.iter().position(|(r, _)| r == region);
        if let Some(local) = self.regions.local {
            self.regions.current.store(local, Ordering::Relaxed);
        }
        self
    }

    /// The region `latency` sends traffic to now, if the cluster spans several.
    pub fn current_region(&self) -> Option<&str> {
        if self.regions.groups.len() < 2 {
            return None;
        }
        let current = self.regions.current.load(Ordering::Relaxed);
        self.regions.groups.get(current).map(|(r, _)| r.as_str())
    }

    /// Predicted latency of each region (lowest estimate among its usable endpoints),
    /// `None` when nothing there is usable.
    pub fn region_predictions(&self) -> Vec<(&str, Option<Duration>)> {
        let config = self.lb.ewma();
        let now = tokio::time::Instant::now();
        self.regions
            .groups
            .iter()
            .enumerate()
            .map(|(g, (region, _))| {
                let cost =
                    self.region_cost(g, &|e: &Endpoint| self.in_service(e, now), &config, now);
                (
                    region.as_str(),
                    cost.map(|ns| Duration::from_nanos(ns as u64)),
                )
            })
            .collect()
    }

    fn region_cost(
        &self,
        group: usize,
        usable: &impl Fn(&Endpoint) -> bool,
        config: &EwmaConfig,
        now: tokio::time::Instant,
    ) -> Option<f64> {
        self.regions.groups[group]
            .1
            .iter()
            .map(|&i| &self.endpoints[i])
            .filter(|e| usable(e))
            .map(|e| e.state.region_predicted(config, now).as_nanos() as f64)
            .min_by(|a, b| a.total_cmp(b))
    }

    /// The region traffic should go to now (see [`Regions`]), remembered for the next pick.
    fn choose_region(
        &self,
        usable: &impl Fn(&Endpoint) -> bool,
        config: &EwmaConfig,
        now: tokio::time::Instant,
    ) -> Option<usize> {
        // No allocation: a region count is small, each cost a pass over its endpoints.
        let best = (0..self.regions.groups.len())
            .filter_map(|g| self.region_cost(g, usable, config, now).map(|c| (g, c)))
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        let current = self.regions.current.load(Ordering::Relaxed);
        let here = (current < self.regions.groups.len())
            .then(|| self.region_cost(current, usable, config, now))
            .flatten();
        let local = self
            .regions
            .local
            .and_then(|l| self.region_cost(l, usable, config, now).map(|c| (l, c)));
        let next = match (local, here) {
            // Nothing usable where traffic goes: the best region.
            (_, None) => best.0,
            (Some((l, local_cost)), Some(_)) if current == l => {
                if local_cost > best.1 * (1.0 + REGION_MARGIN) {
                    best.0
                } else {
                    l
                }
            }
            (Some((l, local_cost)), Some(here))
                if local_cost <= here * (1.0 + REGION_MARGIN / 2.0) =>
            {
                l
            }
            (_, Some(here)) if best.1 * (1.0 + REGION_MARGIN) < here => best.0,
            _ => current,
        };
        if next != current {
            self.regions.current.store(next, Ordering::Relaxed);
        }
        Some(next)
    }

    /// Another region due for exploration (see [`Regions`]), claimed for this pick: not
    /// explored for [`EXPLORE_INTERVAL`], something usable, no explored try unanswered.
    fn region_to_explore(
        &self,
        chosen: usize,
        usable: &impl Fn(&Endpoint) -> bool,
        config: &EwmaConfig,
        now: tokio::time::Instant,
    ) -> Option<usize> {
        let now_ms = u64::try_from(now.saturating_duration_since(self.regions.base).as_millis())
            .unwrap_or(u64::MAX)
            + 1;
        let interval_ms = u64::try_from(EXPLORE_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        (0..self.regions.groups.len()).find(|&g| {
            let last = self.regions.explored_at_ms[g].load(Ordering::Relaxed);
            g != chosen
                && (last == 0 || now_ms >= last.saturating_add(interval_ms))
                && !self.regions.groups[g]
                    .1
                    .iter()
                    .any(|&i| self.endpoints[i].state.awaiting_answer())
                && self.region_cost(g, usable, config, now).is_some()
                && self.regions.explored_at_ms[g]
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        })
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
        if self.endpoints.is_empty() {
            return None;
        }
        match self.lb {
            LbPolicy::RingHash => match hash {
                Some(hash) => self.ring_pick(hash, &usable),
                None => self.weighted_random(&usable),
            },
            LbPolicy::RoundRobin => {
                let len = self.schedule.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|i| &self.endpoints[self.schedule[(start + i) % len] as usize])
                    .find(|e| usable(e))
            }
            LbPolicy::Random => self.weighted_random(&usable),
            LbPolicy::LeastRequest => {
                let (a, b) = self.two_choices(&usable)?;
                if b.state.active_requests() < a.state.active_requests() {
                    Some(b)
                } else {
                    Some(a)
                }
            }
            LbPolicy::Latency(config) => {
                // One clock read per pick: region costs, exploration and the two choices.
                let now = tokio::time::Instant::now();
                if self.regions.groups.len() < 2 {
                    return self.cheaper_of_two(&usable, &config, now);
                }
                let chosen = self.choose_region(&usable, &config, now)?;
                let picks = self.regions.picks.fetch_add(1, Ordering::Relaxed);
                let group = if picks % EXPLORE_EVERY == 0 {
                    self.region_to_explore(chosen, &usable, &config, now)
                        .unwrap_or(chosen)
                } else {
                    chosen
                };
                let region = self.regions.groups[group].0.as_str();
                self.cheaper_of_two(
                    &|e: &Endpoint| usable(e) && e.locality.region == region,
                    &config,
                    now,
                )
            }
        }
    }

    /// Power of two choices by predicted cost (peak EWMA or silence, × in flight + 1).
    fn cheaper_of_two(
        &self,
        usable: &impl Fn(&Endpoint) -> bool,
        config: &EwmaConfig,
        now: tokio::time::Instant,
    ) -> Option<&Endpoint> {
        let (a, b) = self.two_choices(usable)?;
        Some(if b.state.cost(config, now) < a.state.cost(config, now) {
            b
        } else {
            a
        })
    }

    /// Two different usable endpoints drawn by weight (the same one twice when it is the
    /// only one): power of two choices.
    fn two_choices(&self, usable: &impl Fn(&Endpoint) -> bool) -> Option<(&Endpoint, &Endpoint)> {
        let a = self.weighted_random(usable)?;
        let b = self
            .weighted_random(&|e: &Endpoint| usable(e) && e.address != a.address)
            .unwrap_or(a);
        Some((a, b))
    }

    fn weighted_random(&self, usable: &impl Fn(&Endpoint) -> bool) -> Option<&Endpoint> {
        let total: u64 = self
            .endpoints
            .iter()
            .filter(|e| usable(e))
            .map(|e| u64::from(e.weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = fastrand::u64(..total);
        for endpoint in self.endpoints.iter().filter(|e| usable(e)) {
            let w = u64::from(endpoint.weight);
            if ticket < w {
                return Some(endpoint);
            }
            ticket -= w;
        }
        None
    }
}

/// The longest round-robin schedule built: weights whose sum (after dividing by their
/// greatest common divisor) is larger are scaled down to it, keeping ratios to within
/// 1/16384 of the total.
const MAX_SCHEDULE_LEN: u64 = 16 * 1024;

/// The weights the schedule is built from: full EDS weights (1–2³²−1), divided by their
/// greatest common divisor, scaled down only when their sum passes [`MAX_SCHEDULE_LEN`].
fn schedule_weights(endpoints: &[Endpoint]) -> Vec<u64> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let weights: Vec<u64> = endpoints
        .iter()
        .map(|e| u64::from(e.weight.max(1)))
        .collect();
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let total: u64 = weights.iter().sum();
    if total <= MAX_SCHEDULE_LEN {
        return weights;
    }
    weights
        .iter()
        .map(|w| {
            let scaled = u128::from(*w) * u128::from(MAX_SCHEDULE_LEN) / u128::from(total);
            u64::try_from(scaled).unwrap_or(MAX_SCHEDULE_LEN).max(1)
        })
        .collect()
}

/// Spreads each endpoint's weight evenly over the schedule (smooth weighted round robin,
/// precomputed), so weights 3:1 give `a a b a`, not `a a a b` bursts.
fn interleaved_schedule(endpoints: &[Endpoint]) -> Vec<u32> {
    let weights = schedule_weights(endpoints);
    let total: i64 = weights.iter().map(|w| i64::try_from(*w).unwrap_or(0)).sum();
    let mut current = vec![0i64; endpoints.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::try_from(*w).unwrap_or(0);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(u32::try_from(best).unwrap_or(0));
    }
    schedule
}

/// Hands out [`EndpointState`] per (cluster, address) and each cluster's adaptive
/// concurrency controller, so that what they learned survives reloads.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    states: Mutex<HashMap<(String, SocketAddr), Arc<EndpointState>>>,
    /// Each cluster's adaptive concurrency controller, with the settings it was made for.
    controllers: Mutex<HashMap<String, Arc<ConcurrencyController>>>,
    /// Each HTTP/1 cluster's connection slots, with the limits they were made for.
    slots: Mutex<HashMap<String, Arc<ConnectionSlots>>>,
}

impl EndpointRegistry {
    /// The state for an endpoint, created healthy on first sight.
    pub fn state(&self, cluster: &str, address: SocketAddr) -> Arc<EndpointState> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(states.entry((cluster.to_string(), address)).or_default())
    }

    /// The adaptive concurrency controller of a cluster: the one it had while its settings
    /// stay the same (a reload keeps the limit it learned), a new one otherwise.
    pub fn concurrency_controller(
        &self,
        cluster: &str,
        config: GradientConfig,
    ) -> Arc<ConcurrencyController> {
        let mut controllers = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        match controllers.get(cluster) {
            Some(existing) if *existing.config() == config => Arc::clone(existing),
            _ => {
                let controller = Arc::new(ConcurrencyController::new(config));
                controllers.insert(cluster.to_string(), Arc::clone(&controller));
                controller
            }
        }
    }

    /// The connection slots of a cluster: the ones it had while its limits stay the same
    /// (requests holding or waiting for a slot keep counting), new ones otherwise.
    pub fn connection_slots(
        &self,
        cluster: &str,
        max_connections: u32,
        max_pending: u32,
    ) -> Arc<ConnectionSlots> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(cluster) {
            Some(existing) if existing.limits == (max_connections, max_pending) => {
                Arc::clone(existing)
            }
            _ => {
                let fresh = Arc::new(ConnectionSlots::new(max_connections, max_pending));
                slots.insert(cluster.to_string(), Arc::clone(&fresh));
                fresh
            }
        }
    }

    /// Forgets endpoints and controllers no live snapshot refers to any more.
    pub fn prune(&self) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|_, state| Arc::strong_count(state) > 1);
        drop(states);
        let mut controllers = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        controllers.retain(|_, controller| Arc::strong_count(controller) > 1);
        drop(controllers);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slots| Arc::strong_count(slots) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(lb: LbPolicy, weights: &[u32]) -> Cluster {
        let registry = EndpointRegistry::default();
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let address: SocketAddr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Endpoint {
                    address,
                    locality: Locality::default(),
                    weight: *w,
                    priority: 0,
                    locality_weight: 1,
                    state: registry.state("c", address),
                    locality_picks: Default::default(),
                }
            })
            .collect();
        Cluster::new(
            "c".into(),
            lb,
            false,
            Duration::from_secs(1),
            endpoints,
            None,
            ClusterStats::detached(),
        )
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_for_a_slot_leaves_the_line() {
        let slots = ConnectionSlots::new(1, 2);
        let _held = slots.try_take().expect("one slot");
        for _ in 0..5 {
            // The client goes away while the request waits.
            let waited =
                tokio::time::timeout(Duration::from_millis(5), slots.wait_for(Duration::ZERO))
                    .await;
            assert!(waited.is_err());
            assert_eq!(slots.waiting(), 0);
        }
        let refused = slots.wait_for(Duration::from_millis(5)).await;
        assert_eq!(
            refused.err(),
            Some(SlotRefusal::TimedOut),
            "the line is not full"
        );
    }

    #[test]
    fn the_ring_is_built_as_envoy_builds_it() {
        let ring = cluster(LbPolicy::RingHash, &[1, 1, 1]).with_ring(RingSize::default());
        // scale = ⌈⅓ × 1024⌉ / ⅓ = 1026: 342 points each.
        assert_eq!(ring.ring.len(), 1026);
        let ring = cluster(LbPolicy::RingHash, &[1, 2]).with_ring(RingSize::default());
        let of = |i: u32| ring.ring.iter().filter(|(_, e)| *e == i).count();
        assert_eq!((of(0), of(1)), (342, 684));
        // Points are xxHash64("address_n").
        let first = crate::hash::hash64(b"127.0.0.1:1000_0");
        assert!(ring.ring.contains(&(first, 0)));
        let last = crate::hash::hash64(b"127.0.0.1:1001_683");
        assert!(ring.ring.contains(&(last, 1)));
        // A key goes to the first point at or after its hash, wrapping around.
        let key = crate::hash::hash64(b"user-42");
        let expected = ring
            .ring
            .iter()
            .find(|(point, _)| *point >= key)
            .unwrap_or(&ring.ring[0])
            .1;
        let picked = ring.ring_pick(key, &|_| true).unwrap();
        assert_eq!(picked.address, ring.endpoints[expected as usize].address);
    }

    #[test]
    fn full_eds_weights_keep_their_ratio() {
        let c = cluster(LbPolicy::RoundRobin, &[1000, 1]);
        let heavy = c.schedule.iter().filter(|i| **i == 0).count();
        assert_eq!(
            (heavy, c.schedule.len()),
            (1000, 1001),
            "1000:1 stays 1000:1"
        );
        let c = cluster(LbPolicy::RoundRobin, &[3000, 1000]);
        assert_eq!(c.schedule.len(), 4, "divided by the common divisor");
        let c = cluster(LbPolicy::RoundRobin, &[u32::MAX, 1, 2_000_000_000]);
        assert!(c.schedule.len() <= MAX_SCHEDULE_LEN as usize + 3);
        let count = |i: u32| c.schedule.iter().filter(|x| **x == i).count() as f64;
        let ratio = count(0) / count(2);
        assert!((ratio - f64::from(u32::MAX) / 2e9).abs() < 0.01, "{ratio}");
        assert_eq!(count(1), 1.0, "the lightest endpoint keeps a place");
    }

    #[test]
    fn a_retry_budget_grows_with_traffic_above_its_floor() {
        let fixed = CircuitBreakers::default();
        assert_eq!(
            fixed.retries_allowed(1_000),
            3,
            "max_retries ignores traffic"
        );
        let budget = CircuitBreakers {
            retry_budget: Some(RetryBudget::default()),
            ..CircuitBreakers::default()
        };
        assert_eq!(budget.retries_allowed(0), 3, "the floor");
        assert_eq!(budget.retries_allowed(10), 3);
        assert_eq!(budget.retries_allowed(100), 20, "20 % of 100 in flight");
        let no_floor = CircuitBreakers {
            retry_budget: Some(RetryBudget {
                percent: 50.0,
                min_retry_concurrency: 0,
            }),
            ..CircuitBreakers::default()
        };
        assert_eq!(no_floor.retries_allowed(1), 0);
        assert_eq!(no_floor.retries_allowed(9), 4);
    }

    #[test]
    fn ring_hash_keeps_keys_on_their_endpoint_and_moves_only_a_lost_endpoints_keys() {
        let c = cluster(LbPolicy::RingHash, &[1, 1, 1, 1, 3]).with_ring(RingSize::default());
        let owner = |c: &Cluster, key: u32| {
            let hash = crate::hash::hash64(format!("user-{key}").as_bytes());
            c.pick_in(&[], None, Some(hash)).unwrap().address
        };
        let before: Vec<SocketAddr> = (0..2000).map(|k| owner(&c, k)).collect();
        assert_eq!(
            before,
            (0..2000).map(|k| owner(&c, k)).collect::<Vec<_>>(),
            "the same key, the same endpoint"
        );
        // Weight 3 holds about three times the keys of a weight-1 endpoint.
        let held = |i: usize| {
            before
                .iter()
                .filter(|a| **a == c.endpoints[i].address)
                .count()
        };
        assert!(
            held(4) > 2 * held(0) && held(4) < 4 * held(0),
            "{} vs {}",
            held(4),
            held(0)
        );
        // Endpoint 1 goes down: only its keys move.
        c.endpoints[1].state.set_healthy(false);
        let lost = c.endpoints[1].address;
        for (key, old) in before.iter().enumerate() {
            let new = owner(&c, key as u32);
            if *old == lost {
                assert_ne!(new, lost);
            } else {
                assert_eq!(new, *old, "key {key} moved although its endpoint is up");
            }
        }
        // A retry skips the endpoint already tried, to the next one on the ring.
        let hash = crate::hash::hash64(b"user-7");
        let first = c.pick_in(&[], None, Some(hash)).unwrap().address;
        let second = c.pick_in(&[first], None, Some(hash)).unwrap().address;
        assert_ne!(first, second);
        // Without a key: any usable endpoint.
        assert!(c.pick(&[]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn connection_slots_queue_up_to_max_pending_then_refuse() {
        let slots = Arc::new(ConnectionSlots::new(1, 1));
        let held = slots.try_take().expect("one slot");
        assert!(slots.try_take().is_none(), "all in use");
        // One request may wait; it gets the slot when the holder ends.
        let waiter = {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { slots.wait_for(Duration::from_secs(5)).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(slots.waiting(), 1);
        // A second one finds the line full.
        assert_eq!(
            slots.wait_for(Duration::from_secs(5)).await.err(),
            Some(SlotRefusal::PendingOverflow)
        );
        drop(held);
        assert!(waiter.await.unwrap(), "the waiting request got the slot");
        assert_eq!(slots.waiting(), 0);
        // A wait that outlasts its limit ends in a timeout.
        let _held = slots.try_take().expect("free again");
        assert_eq!(
            slots.wait_for(Duration::from_millis(100)).await.err(),
            Some(SlotRefusal::TimedOut)
        );
    }

    fn shares(c: &Cluster, n: usize) -> Vec<usize> {
        let mut counts = vec![0; c.endpoints.len()];
        for _ in 0..n {
            let e = c.pick(&[]).unwrap();
            let i = c
                .endpoints
                .iter()
                .position(|x| x.address == e.address)
                .unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let c = cluster(LbPolicy::RoundRobin, &[3, 1]);
        assert_eq!(shares(&c, 400), vec![300, 100]);
        assert_eq!(c.schedule, vec![0, 0, 1, 0]);
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_and_none_when_all_down() {
        let c = cluster(LbPolicy::RoundRobin, &[1, 1]);
        c.endpoints[0].state.set_healthy(false);
        assert_eq!(shares(&c, 10), vec![0, 10]);
        c.endpoints[1].state.set_healthy(false);
        assert!(c.pick(&[]).is_none());
    }

    #[test]
    fn tried_endpoints_are_avoided_unless_nothing_else_is_healthy() {
        let c = cluster(LbPolicy::Random, &[1, 1]);
        let first = c.endpoints[0].address;
        for _ in 0..50 {
            assert_ne!(c.pick(&[first]).unwrap().address, first);
        }
        c.endpoints[1].state.set_healthy(false);
        assert_eq!(c.pick(&[first]).unwrap().address, first);
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let c = cluster(LbPolicy::LeastRequest, &[1, 1]);
        let _busy: Vec<_> = (0..5)
            .map(|_| ActiveRequest::start(&c.endpoints[0].state))
            .collect();
        let counts = shares(&c, 1000);
        // The two choices are different endpoints: the busy one never wins.
        assert_eq!(counts, vec![0, 1000]);
    }

    #[test]
    fn latency_prefers_the_fastest_of_two_choices_weighed_by_load() {
        let config = EwmaConfig::default();
        let c = cluster(LbPolicy::Latency(config), &[1, 1, 1]);
        let now = tokio::time::Instant::now();
        for (endpoint, ms) in c.endpoints.iter().zip([2, 30, 90]) {
            endpoint
                .state
                .latency
                .observe(Duration::from_millis(ms), now, &config);
        }
        // The fastest wins every pair it is in (2 of 3), the slowest none.
        let counts = shares(&c, 3000);
        assert!(counts[0] > 1800 && counts[2] == 0, "{counts:?}");
        // Load counts: 20 requests in flight make the fast one cost 42 ms, more than 30.
        let _busy: Vec<_> = (0..20)
            .map(|_| ActiveRequest::start(&c.endpoints[0].state))
            .collect();
        let counts = shares(&c, 3000);
        assert!(counts[1] > 1800, "{counts:?}");
    }

    /// A `latency` cluster with one endpoint per region, the proxy in `r1`.
    fn three_regions() -> Cluster {
        let registry = EndpointRegistry::default();
        let endpoints = ["r1", "r2", "r3"]
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let address: SocketAddr = format!("127.0.0.1:{}", 2000 + i).parse().unwrap();
                Endpoint {
                    address,
                    locality: Locality {
                        region: region.to_string(),
                        ..Locality::default()
                    },
                    weight: 1,
                    priority: 0,
                    locality_weight: 1,
                    state: registry.state("c", address),
                    locality_picks: Default::default(),
                }
            })
            .collect();
        Cluster::new(
            "c".into(),
            LbPolicy::Latency(EwmaConfig::default()),
            false,
            Duration::from_secs(1),
            endpoints,
            None,
            ClusterStats::detached(),
        )
        .with_local_region("r1")
    }

    fn observe(c: &Cluster, latencies_ms: [u64; 3]) {
        let now = tokio::time::Instant::now();
        for (endpoint, ms) in c.endpoints.iter().zip(latencies_ms) {
            endpoint
                .state
                .latency
                .observe(Duration::from_millis(ms), now, &c.lb.ewma());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn latency_keeps_to_the_local_region_moves_when_it_slows_and_comes_back_without_flapping()
    {
        let c = three_regions();
        observe(&c, [2, 30, 90]);
        let counts = shares(&c, 5000);
        assert!(counts[0] >= 4750, "≥ 95 % local: {counts:?}");
        assert!(
            counts[1] > 0 && counts[2] > 0,
            "the others are explored: {counts:?}"
        );
        assert_eq!(c.current_region(), Some("r1"));

        // One slow answer among fast ones does not move a whole cluster's traffic.
        observe(&c, [60, 30, 90]);
        tokio::time::advance(Duration::from_millis(10)).await;
        observe(&c, [2, 30, 90]);
        shares(&c, 100);
        assert_eq!(c.current_region(), Some("r1"), "a single spike");

        // The local region slows to 60 ms and stays slow: traffic moves to the best other
        // region within a second.
        let mut moved_after = None;
        for step in 1..=40 {
            tokio::time::advance(Duration::from_millis(50)).await;
            observe(&c, [60, 30, 90]);
            shares(&c, 10);
            if c.current_region() == Some("r2") {
                moved_after = Some(Duration::from_millis(50) * step);
                break;
            }
        }
        let moved_after = moved_after.expect("traffic moves within 2 s");
        assert!(moved_after <= Duration::from_secs(1), "{moved_after:?}");
        let counts = shares(&c, 5000);
        assert!(counts[1] >= 4750, "moved to r2: {counts:?}");

        // While the local region stays slow, traffic stays away.
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            observe(&c, [60, 30, 90]);
            shares(&c, 100);
            assert_eq!(c.current_region(), Some("r2"));
        }
        // It recovers to 2 ms; explorations see it and traffic comes back, and stays.
        let mut back_after = None;
        for second in 1..=30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            observe(&c, [2, 30, 90]);
            shares(&c, 100);
            match (back_after, c.current_region()) {
                (None, Some("r1")) => back_after = Some(second),
                (Some(_), region) => assert_eq!(region, Some("r1"), "flapped at {second} s"),
                _ => {}
            }
        }
        assert!(back_after.is_some(), "traffic returns within 30 s");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_slowness_a_black_holed_region_is_left_before_any_timeout() {
        let c = three_regions();
        observe(&c, [2, 30, 90]);
        let local = &c.endpoints[0].state;
        // Answers keep coming: no silence.
        let mut answered = ActiveRequest::start(local);
        tokio::time::advance(Duration::from_millis(2)).await;
        answered.answered(&c.lb.ewma());
        drop(answered);
        assert_eq!(local.silence(tokio::time::Instant::now()), Duration::ZERO);

        // The region goes dark: tries hang, nothing comes back, no failure is seen yet.
        let hanging: Vec<ActiveRequest> = (0..4).map(|_| ActiveRequest::start(local)).collect();
        tokio::time::advance(Duration::from_millis(100)).await;
        shares(&c, 10);
        assert_eq!(
            c.current_region(),
            Some("r1"),
            "100 ms: still local (a stall of the proxy itself looks like this)"
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        // 150 ms of silence > the 100 ms grace + 1.5 × r2's 30 ms: traffic moves, long
        // before a timeout.
        assert!(local.silence(tokio::time::Instant::now()) >= Duration::from_millis(150));
        shares(&c, 10);
        assert_eq!(c.current_region(), Some("r2"));
        // Exploration does not pile more tries onto the silent region.
        let counts = shares(&c, 1000);
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[2] > 0, "r3 is still explored: {counts:?}");
        // The hanging tries end (dropped without an answer): the silence is over.
        drop(hanging);
        assert_eq!(local.silence(tokio::time::Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn close_regions_do_not_flap() {
        let c = three_regions();
        observe(&c, [40, 30, 90]);
        // 40 vs 30: within the margin, so the local region keeps the traffic.
        shares(&c, 1000);
        assert_eq!(c.current_region(), Some("r1"));
        // Once away (the local one slowed for a while), 40 is not close enough to come back.
        for _ in 0..40 {
            tokio::time::advance(Duration::from_millis(50)).await;
            observe(&c, [60, 30, 90]);
            shares(&c, 10);
        }
        assert_eq!(c.current_region(), Some("r2"));
        for _ in 0..120 {
            tokio::time::advance(Duration::from_secs(1)).await;
            observe(&c, [40, 30, 90]);
            shares(&c, 10);
            assert_eq!(c.current_region(), Some("r2"));
        }
    }

    #[test]
    fn a_region_with_nothing_healthy_is_left_and_none_when_all_are_down() {
        let c = three_regions();
        observe(&c, [2, 30, 90]);
        c.endpoints[0].state.set_healthy(false);
        let counts = shares(&c, 1000);
        assert_eq!(counts[0], 0);
        assert!(counts[1] >= 950, "{counts:?}");
        for e in &c.endpoints {
            e.state.set_healthy(false);
        }
        assert!(c.pick(&[]).is_none());
    }

    /// Ten endpoints at priority 0 and ten at priority 1.
    fn two_priorities() -> Cluster {
        let registry = EndpointRegistry::default();
        let endpoints = (0..20)
            .map(|i| {
                let address: SocketAddr = format!("127.0.0.1:{}", 3000 + i).parse().unwrap();
                Endpoint {
                    address,
                    locality: Locality::default(),
                    weight: 1,
                    priority: u32::from(i >= 10),
                    locality_weight: 1,
                    state: registry.state("c", address),
                    locality_picks: Default::default(),
                }
            })
            .collect();
        Cluster::new(
            "c".into(),
            LbPolicy::RoundRobin,
            false,
            Duration::from_secs(1),
            endpoints,
            None,
            ClusterStats::detached(),
        )
    }

    /// Share of `n` picks that went to priority 1.
    fn spill(c: &Cluster, n: usize) -> f64 {
        let to_p1 = (0..n)
            .filter(|_| c.pick(&[]).is_some_and(|e| e.priority == 1))
            .count();
        to_p1 as f64 / n as f64
    }

    #[test]
    fn priorities_spill_over_by_envoys_overprovisioning_rule() {
        let c = two_priorities();
        assert_eq!(
            spill(&c, 2000),
            0.0,
            "a healthy priority 0 takes everything"
        );
        // 8 of 10 healthy: 1.4 × 80 % ≥ 100 %, still everything.
        for e in &c.endpoints[..2] {
            e.state.set_healthy(false);
        }
        assert_eq!(spill(&c, 2000), 0.0);
        // 5 of 10: health 70, so 30 % spills to priority 1.
        for e in &c.endpoints[2..5] {
            e.state.set_healthy(false);
        }
        let share = spill(&c, 4000);
        assert!((share - 0.30).abs() < 0.04, "{share}");
        // None left: all of it.
        for e in &c.endpoints[..10] {
            e.state.set_healthy(false);
        }
        assert_eq!(spill(&c, 500), 1.0);
    }

    #[test]
    fn locality_weights_share_traffic_scaled_by_availability() {
        let registry = EndpointRegistry::default();
        let endpoints = [("a", 3), ("b", 1), ("b", 1)]
            .iter()
            .enumerate()
            .map(|(i, (zone, weight))| {
                let address: SocketAddr = format!("127.0.0.1:{}", 4000 + i).parse().unwrap();
                Endpoint {
                    address,
                    locality: Locality {
                        region: "r".into(),
                        zone: zone.to_string(),
                        ..Locality::default()
                    },
                    weight: 1,
                    priority: 0,
                    locality_weight: *weight,
                    state: registry.state("c", address),
                    locality_picks: Default::default(),
                }
            })
            .collect();
        let c = Cluster::new(
            "c".into(),
            LbPolicy::RoundRobin,
            false,
            Duration::from_secs(1),
            endpoints,
            None,
            ClusterStats::detached(),
        )
        .with_locality_weights(true);
        let counts = shares(&c, 8000);
        let a = counts[0] as f64 / 8000.0;
        assert!((a - 0.75).abs() < 0.03, "zone a weight 3 of 4: {counts:?}");
        // Half of zone b is down: its availability is 1.4 × 50 % = 70 %: a gets 300 / 370.
        c.endpoints[1].state.set_healthy(false);
        let counts = shares(&c, 8000);
        let a = counts[0] as f64 / 8000.0;
        assert!((a - 300.0 / 370.0).abs() < 0.03, "{counts:?}");
        assert_eq!(counts[1], 0);
    }

    #[test]
    fn a_try_is_timed_once_and_failures_count_as_slow() {
        let config = EwmaConfig::default();
        let c = cluster(LbPolicy::Latency(config), &[1]);
        let state = &c.endpoints[0].state;
        let mut try_one = ActiveRequest::start(state);
        try_one.failed(&config);
        assert!(state.latency.estimate(&config) >= FAILURE_LATENCY);
        try_one.answered(&config);
        assert!(
            state.latency.estimate(&config) >= FAILURE_LATENCY,
            "only the first outcome of a try counts"
        );
        assert_eq!(state.active_requests(), 1);
        drop(try_one);
        assert_eq!(state.active_requests(), 0);
    }

    #[test]
    fn registry_keeps_state_across_snapshots_and_prunes_the_unused() {
        let registry = EndpointRegistry::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = registry.state("c", addr);
        a.set_healthy(false);
        assert!(!registry.state("c", addr).is_healthy());
        drop(a);
        registry.prune();
        assert!(registry.state("c", addr).is_healthy());
    }
}
