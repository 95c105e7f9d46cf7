//! One upstream endpoint as the request path sees it ([`Endpoint`]) and its state that
//! outlives config reloads ([`EndpointState`]: health, requests in flight, latency,
//! outlier streaks); [`ActiveRequest`] times one try against it.

use crate::upstream::ewma::{EwmaConfig, PeakEwma};
use crate::upstream::outlier::OutlierState;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// The endpoint's host name (EDS `Endpoint.hostname`, or the name its address was
    /// given by), for `auto_host_rewrite`.
    pub hostname: Option<Arc<str>>,
    /// Tries sent to this endpoint's locality (`nip_upstream_locality_picks_total`).
    pub locality_picks: prometheus_client::metrics::counter::Counter,
    /// How it is reached over TLS (`None`: plaintext): its cluster's `transport_socket`,
    /// or the `transport_socket_matches` entry its metadata matches.
    pub tls: Option<Arc<crate::upstream::tls::EndpointTls>>,
}
