//! Adaptive concurrency (Envoy's gradient controller) and priority-based load shedding.
//!
//! A cluster with `adaptive_concurrency` gets one [`ConcurrencyController`]. Every request
//! to the cluster asks it for a [`ConcurrencyPermit`] before an endpoint is picked; the
//! permit counts the request in flight and, when the response head arrives, records how
//! long the request took. The controller turns those timings into a concurrency limit:
//!
//! ```text
//!  min RTT window (every 60 s ± jitter): limit pinned to min_concurrency, the p50 of the
//!    next 50 requests that started inside the window is the min RTT (latency unloaded)
//!  every 100 ms otherwise: sample RTT = p50 of the window's requests
//!    gradient  = clamp((min RTT × (1 + buffer)) / sample RTT, 0.5, 2.0)
//!    limit     = gradient × limit;  limit += √limit (headroom for bursts)
//!    clamped to [min_limit, max_limit]
//! ```
//!
//! As in Envoy, five windows in a row at `min_limit` start a new min RTT window. Two
//! changes: the limit only grows while it binds (something was shed, or the window's peak
//! in-flight reached half the limit), so an idle cluster does not drift to `max_limit` and
//! then admit a whole burst; and a request's [`Priority`] decides how much of the limit it
//! may use — `low` half, `normal` 80 %, `high` all of it — so under overload low priority is
//! shed first and high priority keeps a reserve. During a min RTT window `high` keeps that
//! reserve (a fifth of the limit before the window) on top of `min_concurrency`: measuring
//! never sheds high priority.
//!
//! Nothing here blocks a request: timings go into an atomic histogram, and the periodic
//! update runs on the first request after it is due, under a `try_lock` the others skip.
//! Time comes from `tokio::time::Instant`, so tests run on a paused clock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A request's priority class for load shedding (the v4 envelope's `metadata.priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Shed first: may use half of a concurrency limit.
    Low,
    /// The default: may use 80 % of a concurrency limit.
    Normal,
    /// Shed last: may use all of a concurrency limit.
    High,
}

impl Priority {
    /// The request header that carries the class.
    pub const HEADER: &'static str = "x-nip-priority";

    /// All classes, lowest first.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// Reads a header value: `low`, `normal` or `high` (any case).
    pub fn parse(value: &[u8]) -> Option<Priority> {
        if value.eq_ignore_ascii_case(b"low") {
            Some(Priority::Low)
        } else if value.eq_ignore_ascii_case(b"normal") {
            Some(Priority::Normal)
        } else if value.eq_ignore_ascii_case(b"high") {
            Some(Priority::High)
        } else {
            None
        }
    }

    /// The name used in headers, metrics and `/clusters`.
    pub fn as_str(self) -> &'static str {
        crate::telemetry::metrics::PRIORITY_LABELS[self.index()]
    }

    /// Position in [`Priority::ALL`] (for per-class counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The share of a concurrency limit this class may fill.
    fn share(self) -> f64 {
        match self {
            Priority::Low => 0.5,
            Priority::Normal => 0.8,
            Priority::High => 1.0,
        }
    }
}

/// Settings of the gradient controller (Envoy's `GradientControllerConfig`, with its
/// defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientConfig {
    /// Percentile of the window's latencies that stands for it (default 50).
    pub percentile: f64,
    /// How often the limit is recomputed (default 100 ms).
    pub update_interval: Duration,
    /// Highest limit (default 1000).
    pub max_limit: u32,
    /// Lowest limit (default 3).
    pub min_limit: u32,
    /// How often the min RTT is measured again (default 60 s).
    pub min_rtt_interval: Duration,
    /// Requests a min RTT measurement takes (default 50).
    pub min_rtt_requests: u32,
    /// Random extra delay of the next min RTT window, in percent of its interval (default 10).
    pub min_rtt_jitter_percent: f64,
    /// Limit while the min RTT is measured (default 3).
    pub min_concurrency: u32,
    /// How much slower than the min RTT a window may be before the limit shrinks, in
    /// percent (default 25).
    pub buffer_percent: f64,
    /// A known min RTT: never measure it (no windows pinned to `min_concurrency`).
    pub fixed_min_rtt: Option<Duration>,
}

impl Default for GradientConfig {
    fn default() -> Self {
        GradientConfig {
            percentile: 50.0,
            update_interval: Duration::from_millis(100),
            max_limit: 1000,
            min_limit: 3,
            min_rtt_interval: Duration::from_secs(60),
            min_rtt_requests: 50,
            min_rtt_jitter_percent: 10.0,
            min_concurrency: 3,
            buffer_percent: 25.0,
            fixed_min_rtt: None,
        }
    }
}

/// Windows in a row at `min_limit` that start a new min RTT measurement (Envoy's 5).
const WINDOWS_AT_MIN_BEFORE_REMEASURE: u32 = 5;

/// Latencies of one window, in log-linear buckets of microseconds (16 per power of two:
/// about 6 % resolution), each an atomic so that recording never locks.
#[derive(Debug)]
struct Histogram {
    buckets: Box<[AtomicU32]>,
    count: AtomicU32,
}

/// 16 linear buckets below 16 µs, then 16 per power of two up to 2^32 µs (71 minutes).
const SUB_BUCKETS: u64 = 16;
const BUCKETS: usize = 16 + 16 * 28;

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            count: AtomicU32::new(0),
        }
    }

    fn index(micros: u64) -> usize {
        if micros < SUB_BUCKETS {
            return micros as usize;
        }
        let msb = u64::from(63 - micros.leading_zeros());
        let sub = (micros >> (msb - 4)) & (SUB_BUCKETS - 1);
        (SUB_BUCKETS + (msb - 4) * SUB_BUCKETS + sub).min(BUCKETS as u64 - 1) as usize
    }

    /// The middle of a bucket, in microseconds.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < SUB_BUCKETS {
            return index;
        }
        let msb = (index - SUB_BUCKETS) / SUB_BUCKETS + 4;
        let sub = (index - SUB_BUCKETS) % SUB_BUCKETS;
        let width = 1u64 << (msb - 4);
        (SUB_BUCKETS + sub) * width + width / 2
    }

    fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    /// Empties the histogram; returns the `percentile` of what it held, if anything.
    fn drain(&self, percentile: f64) -> Option<Duration> {
        let mut counts = [0u32; BUCKETS];
        let mut total = 0u64;
        for (slot, bucket) in counts.iter_mut().zip(self.buckets.iter()) {
            *slot = bucket.swap(0, Ordering::Relaxed);
            total += u64::from(*slot);
        }
        self.count.store(0, Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        // The smallest value with at least `percentile` % of the samples at or below it.
        let rank = ((percentile / 100.0 * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (index, count) in counts.iter().enumerate() {
            seen += u64::from(*count);
            if seen >= rank {
                return Some(Duration::from_micros(Self::value(index)));
            }
        }
        None
    }
}

/// What the controller knows, for `/clusters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencyStatus {
    /// The limit now (for `high`; the other classes get their share of it).
    pub limit: u32,
    /// Requests in flight.
    pub in_flight: u32,
    /// The latency measured unloaded, once known.
    pub min_rtt: Option<Duration>,
    /// The last window's latency.
    pub sample_rtt: Option<Duration>,
    /// Whether a min RTT window runs now.
    pub measuring_min_rtt: bool,
}

/// State only the periodic update touches.
#[derive(Debug)]
struct UpdateState {
    min_rtt: Option<Duration>,
    next_min_rtt_window: Instant,
    windows_at_min: u32,
    /// The limit before a min RTT window, restored after it.
    limit_before_window: u32,
}

/// One cluster's gradient controller; shared by every worker thread and kept across config
/// reloads while its settings do not change.
#[derive(Debug)]
pub struct ConcurrencyController {
    config: GradientConfig,
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// Highest in-flight count of this window.
    peak_in_flight: AtomicU32,
    /// Whether something was shed this window.
    shed_this_window: AtomicBool,
    /// Whether a min RTT window runs.
    measuring: AtomicBool,
    /// Extra room for `high` during a min RTT window.
    high_reserve: AtomicU32,
    /// Changes when a min RTT window starts or ends: timings of requests that started in
    /// another phase are not used.
    epoch: AtomicU32,
    /// Next periodic update, in µs since `base`.
    next_update_us: AtomicU64,
    /// Last sample RTT and min RTT in µs (0: none), for status.
    sample_rtt_us: AtomicU64,
    min_rtt_us: AtomicU64,
    histogram: Histogram,
    update: Mutex<UpdateState>,
    base: Instant,
}

impl ConcurrencyController {
    /// A controller that starts by measuring the min RTT (unless it is fixed).
    pub fn new(config: GradientConfig) -> Self {
        let now = Instant::now();
        let min_concurrency = config.min_concurrency.max(1);
        let controller = ConcurrencyController {
            config,
            limit: AtomicU32::new(min_concurrency),
            in_flight: AtomicU32::new(0),
            peak_in_flight: AtomicU32::new(0),
            shed_this_window: AtomicBool::new(false),
            measuring: AtomicBool::new(config.fixed_min_rtt.is_none()),
            high_reserve: AtomicU32::new(0),
            epoch: AtomicU32::new(0),
            next_update_us: AtomicU64::new(micros(config.update_interval)),
            sample_rtt_us: AtomicU64::new(0),
            min_rtt_us: AtomicU64::new(config.fixed_min_rtt.map_or(0, micros)),
            histogram: Histogram::new(),
            update: Mutex::new(UpdateState {
                min_rtt: config.fixed_min_rtt,
                next_min_rtt_window: now,
                windows_at_min: 0,
                limit_before_window: min_concurrency,
            }),
            base: now,
        };
        if let Ok(mut state) = controller.update.lock() {
            state.next_min_rtt_window = now + controller.min_rtt_interval_with_jitter();
        }
        controller
    }

    /// The settings it runs with.
    pub fn config(&self) -> &GradientConfig {
        &self.config
    }

    /// Admits a request of `priority` when the requests in flight leave room for it;
    /// `None` means shed it.
    pub fn try_acquire(self: &Arc<Self>, priority: Priority) -> Option<ConcurrencyPermit> {
        let now = Instant::now();
        self.update_if_due(now);
        let allowed = self.allowed(priority);
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < allowed).then_some(n + 1)
            });
        match admitted {
            Ok(before) => {
                self.peak_in_flight.fetch_max(before + 1, Ordering::Relaxed);
                Some(ConcurrencyPermit {
                    controller: Arc::clone(self),
                    started: now,
                    epoch: self.epoch.load(Ordering::Relaxed),
                    recorded: false,
                })
            }
            Err(_) => {
                if !self.shed_this_window.load(Ordering::Relaxed) {
                    self.shed_this_window.store(true, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// How many requests may be in flight when one of `priority` arrives.
    fn allowed(&self, priority: Priority) -> u32 {
        let limit = self.limit.load(Ordering::Relaxed);
        let share = (f64::from(limit) * priority.share()) as u32;
        let mut allowed = share.max(1);
        if priority == Priority::High && self.measuring.load(Ordering::Relaxed) {
            allowed = limit + self.high_reserve.load(Ordering::Relaxed);
        }
        allowed
    }

    /// What it knows now.
    pub fn status(&self) -> ConcurrencyStatus {
        let us = |v: &AtomicU64| match v.load(Ordering::Relaxed) {
            0 => None,
            v => Some(Duration::from_micros(v)),
        };
        ConcurrencyStatus {
            limit: self.limit.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            min_rtt: us(&self.min_rtt_us),
            sample_rtt: us(&self.sample_rtt_us),
            measuring_min_rtt: self.measuring.load(Ordering::Relaxed),
        }
    }

    fn now_us(&self, now: Instant) -> u64 {
        micros(now.saturating_duration_since(self.base))
    }

    fn min_rtt_interval_with_jitter(&self) -> Duration {
        let jitter_ms = (millis(self.config.min_rtt_interval) as f64
            * self.config.min_rtt_jitter_percent.clamp(0.0, 100.0)
            / 100.0) as u64;
        self.config.min_rtt_interval + Duration::from_millis(fastrand::u64(..=jitter_ms))
    }

    /// A request's timing arrived.
    fn record(&self, latency: Duration, epoch: u32) {
        if epoch != self.epoch.load(Ordering::Relaxed) {
            return;
        }
        self.histogram.record(latency);
        if self.measuring.load(Ordering::Relaxed)
            && self.histogram.count() >= self.config.min_rtt_requests.max(1)
        {
            self.update_if_due(Instant::now());
        }
    }

    /// Runs the periodic update when it is due (or a min RTT window has its samples), on
    /// the one thread that gets the lock.
    fn update_if_due(&self, now: Instant) {
        let measuring = self.measuring.load(Ordering::Relaxed);
        let window_full = measuring && self.histogram.count() >= self.config.min_rtt_requests;
        if !window_full && self.now_us(now) < self.next_update_us.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut state) = self.update.try_lock() else {
            return;
        };
        self.next_update_us.store(
            self.now_us(now) + micros(self.config.update_interval),
            Ordering::Relaxed,
        );
        if measuring {
            if self.histogram.count() >= self.config.min_rtt_requests.max(1) {
                self.end_min_rtt_window(&mut state, now);
            }
            return;
        }
        if self.config.fixed_min_rtt.is_none()
            && state.min_rtt.is_some()
            && now >= state.next_min_rtt_window
        {
            self.start_min_rtt_window(&mut state);
            return;
        }
        self.update_limit(&mut state);
    }

    fn start_min_rtt_window(&self, state: &mut UpdateState) {
        if self.config.fixed_min_rtt.is_some() {
            return;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        state.limit_before_window = limit;
        state.windows_at_min = 0;
        self.high_reserve.store(
            (f64::from(limit) * (1.0 - Priority::Normal.share())) as u32,
            Ordering::Relaxed,
        );
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.histogram.drain(self.config.percentile);
        self.limit
            .store(self.config.min_concurrency.max(1), Ordering::Relaxed);
        self.measuring.store(true, Ordering::Relaxed);
    }

    fn end_min_rtt_window(&self, state: &mut UpdateState, now: Instant) {
        if let Some(min_rtt) = self.histogram.drain(self.config.percentile) {
            state.min_rtt = Some(min_rtt);
            self.min_rtt_us
                .store(micros(min_rtt).max(1), Ordering::Relaxed);
        }
        state.next_min_rtt_window = now + self.min_rtt_interval_with_jitter();
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.limit
            .store(state.limit_before_window, Ordering::Relaxed);
        self.high_reserve.store(0, Ordering::Relaxed);
        self.peak_in_flight.store(0, Ordering::Relaxed);
        self.shed_this_window.store(false, Ordering::Relaxed);
        self.measuring.store(false, Ordering::Relaxed);
    }

    /// One gradient step from the window's latencies.
    fn update_limit(&self, state: &mut UpdateState) {
        let peak = self.peak_in_flight.swap(0, Ordering::Relaxed);
        let shed = self.shed_this_window.swap(false, Ordering::Relaxed);
        let (Some(min_rtt), Some(sample)) =
            (state.min_rtt, self.histogram.drain(self.config.percentile))
        else {
            return;
        };
        self.sample_rtt_us
            .store(micros(sample).max(1), Ordering::Relaxed);
        let limit = self.limit.load(Ordering::Relaxed);
        let next = gradient_step(&self.config, limit, min_rtt, sample);
        // Grow only a limit that binds: an idle cluster must not drift up to max_limit.
        let binds = shed || peak.saturating_mul(2) >= limit;
        let next = if next > limit && !binds { limit } else { next };
        self.limit.store(next, Ordering::Relaxed);
        if next <= self.config.min_limit.max(1) {
            state.windows_at_min += 1;
            if state.windows_at_min >= WINDOWS_AT_MIN_BEFORE_REMEASURE {
                self.start_min_rtt_window(state);
            }
        } else {
            state.windows_at_min = 0;
        }
    }
}

/// Envoy's gradient step: the limit scaled by how the window's latency compares to the
/// buffered min RTT, plus √limit of headroom, within [min_limit, max_limit].
fn gradient_step(config: &GradientConfig, limit: u32, min_rtt: Duration, sample: Duration) -> u32 {
    let buffered = min_rtt.as_secs_f64() * (1.0 + config.buffer_percent.max(0.0) / 100.0);
    let sample = sample.as_secs_f64().max(1e-6);
    let gradient = (buffered / sample).clamp(0.5, 2.0);
    let scaled = f64::from(limit) * gradient;
    let next = scaled + scaled.sqrt();
    let max = config.max_limit.max(1);
    (next as u32).clamp(config.min_limit.clamp(1, max), max)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A request admitted by a [`ConcurrencyController`]: counted in flight until dropped.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    controller: Arc<ConcurrencyController>,
    started: Instant,
    epoch: u32,
    recorded: bool,
}

impl ConcurrencyPermit {
    /// The response head arrived (or the request timed out): its delay is a latency sample
    /// (once per request).
    pub fn answered(&mut self) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let latency = Instant::now().saturating_duration_since(self.started);
        self.controller.record(latency, self.epoch);
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.controller.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
