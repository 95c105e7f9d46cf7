//! Outlier detection: endpoints that keep failing, or fail or answer slower than the rest,
//! are ejected for a while.
//!
//! Two kinds of detectors, as in Envoy:
//! - **consecutive** (on every try): a 5xx answer, a connection failure, a reset or a
//!   timeout counts as a failure (a gateway failure too when it is 502/503/504 or locally
//!   originated), anything else resets the streaks; a streak at its threshold ejects.
//! - **per interval** (the [`OutlierSweeper`] on the control runtime, every `interval`):
//!   each endpoint's tries, failures and answer times of the interval are taken and
//!   compared across the cluster ([`interval_outliers`]): *success rate* (Envoy's: below
//!   mean − factor × stdev of the endpoints with enough requests), *failure percentage*
//!   (Envoy's: at or above a fixed threshold) and NIP's *latency* detector (mean answer time
//!   above factor × the cluster's median). Each needs a minimum of endpoints with a minimum
//!   of requests, so a quiet cluster ejects nothing.
//!
//! An ejected endpoint is out for `base_ejection_time × times ejected` (capped at
//! `max_ejection_time`), unless that would eject more than `max_ejection_percent` of the
//! cluster (one endpoint may always be ejected, as in Envoy). The multiplier goes down by
//! one for every `interval` the endpoint stays in. All state is atomic: nothing on the
//! request path locks.
//!
//! Time comes from `tokio::time::Instant`, so tests run on a paused clock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Envoy's outlier-detection settings that NIP applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject (0 = off).
    pub consecutive_5xx: u32,
    /// Gateway failures (502/503/504, connect failures, resets, timeouts) in a row that
    /// eject (0 = off).
    pub consecutive_gateway_failure: u32,
    /// How often an ejected-and-returned endpoint earns one step of its multiplier back.
    pub interval: Duration,
    /// Ejection time of a first ejection; later ones multiply it.
    pub base_ejection_time: Duration,
    /// Longest ejection.
    pub max_ejection_time: Duration,
    /// Most of the cluster that may be ejected at once, in percent.
    pub max_ejection_percent: u32,
    /// Envoy's success-rate detector (on by default, as in Envoy).
    pub success_rate: Option<SuccessRateDetector>,
    /// Envoy's failure-percentage detector (off by default, as in Envoy).
    pub failure_percentage: Option<FailurePercentageDetector>,
    /// NIP's latency detector (off unless configured).
    pub latency: Option<LatencyDetector>,
}

impl Default for OutlierConfig {
    /// Envoy's defaults.
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate: Some(SuccessRateDetector::default()),
            failure_percentage: None,
            latency: None,
        }
    }
}

impl OutlierConfig {
    /// Whether a detector needs the periodic sweep.
    pub fn has_interval_detectors(&self) -> bool {
        self.success_rate.is_some() || self.failure_percentage.is_some() || self.latency.is_some()
    }
}

/// Ejects endpoints whose success rate in an interval is below mean − factor × stdev of
/// the cluster's (Envoy's `success_rate_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuccessRateDetector {
    /// Endpoints with enough requests needed to judge at all (default 5).
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged (default 100).
    pub request_volume: u32,
    /// The factor, in thousandths (default 1900 = 1.9).
    pub stdev_factor_milli: u32,
    /// Percent chance that a finding is enforced (default 100).
    pub enforcing_percent: u32,
}

impl Default for SuccessRateDetector {
    /// Envoy's defaults.
    fn default() -> Self {
        SuccessRateDetector {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor_milli: 1900,
            enforcing_percent: 100,
        }
    }
}

/// Ejects endpoints whose failures in an interval reach a percentage (Envoy's
/// `failure_percentage_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePercentageDetector {
    /// Failure percentage that ejects (default 85).
    pub threshold_percent: u32,
    /// Endpoints with enough requests needed to judge at all (default 5).
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged (default 50).
    pub request_volume: u32,
    /// Percent chance that a finding is enforced.
    pub enforcing_percent: u32,
}

impl Default for FailurePercentageDetector {
    /// Envoy's defaults, enforced.
    fn default() -> Self {
        FailurePercentageDetector {
            threshold_percent: 85,
            minimum_hosts: 5,
            request_volume: 50,
            enforcing_percent: 100,
        }
    }
}

/// Ejects endpoints whose mean answer time in an interval is above factor × the median of
/// the cluster's endpoints (NIP's; Envoy has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyDetector {
    /// The factor, in thousandths (default 3000 = 3×).
    pub factor_milli: u32,
    /// Endpoints with enough answers needed to judge at all (default 3).
    pub minimum_hosts: u32,
    /// Answers in the interval an endpoint needs to be judged (default 50).
    pub request_volume: u32,
}

impl Default for LatencyDetector {
    fn default() -> Self {
        LatencyDetector {
            factor_milli: 3000,
            minimum_hosts: 3,
            request_volume: 50,
        }
    }
}

/// Which detector ejected an endpoint (the `detector` label of
/// `nip_outlier_ejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    /// Failures in a row.
    Consecutive5xx,
    /// Gateway failures in a row.
    ConsecutiveGatewayFailure,
    /// Success rate far below the cluster's.
    SuccessRate,
    /// Failure percentage over the threshold.
    FailurePercentage,
    /// Answers far slower than the cluster's median.
    Latency,
}

impl Detector {
    /// Every detector, in label order.
    pub const ALL: [Detector; 5] = [
        Detector::Consecutive5xx,
        Detector::ConsecutiveGatewayFailure,
        Detector::SuccessRate,
        Detector::FailurePercentage,
        Detector::Latency,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        crate::telemetry::metrics::DETECTOR_LABELS[self.index()]
    }

    /// Position in [`Detector::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One endpoint's tries in an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntervalStats {
    /// Tries that ended (answered or not).
    pub requests: u32,
    /// Of those, failures (5xx or no answer).
    pub failures: u32,
    /// Tries that got a response head.
    pub answered: u32,
    /// Their summed time to the head.
    pub answer_time: Duration,
}

/// The endpoints (by index in `stats`) the per-interval detectors find outlying, each with
/// the first detector that found it.
pub fn interval_outliers(
    stats: &[IntervalStats],
    config: &OutlierConfig,
) -> Vec<(usize, Detector)> {
    let mut found: Vec<(usize, Detector)> = Vec::new();
    let mut add = |i: usize, detector: Detector| {
        if !found.iter().any(|(j, _)| *j == i) {
            found.push((i, detector));
        }
    };
    let success_rate = |s: &IntervalStats| {
        100.0 * f64::from(s.requests - s.failures.min(s.requests)) / f64::from(s.requests.max(1))
    };
    if let Some(detector) = config.success_rate {
        let judged: Vec<usize> = (0..stats.len())
            .filter(|&i| stats[i].requests >= detector.request_volume.max(1))
            .collect();
        if judged.len() >= detector.minimum_hosts.max(1) as usize {
            let rates: Vec<f64> = judged.iter().map(|&i| success_rate(&stats[i])).collect();
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            let variance =
                rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
            let threshold =
                mean - f64::from(detector.stdev_factor_milli) / 1000.0 * variance.sqrt();
            for (&i, rate) in judged.iter().zip(&rates) {
                if *rate < threshold {
                    add(i, Detector::SuccessRate);
                }
            }
        }
    }
    if let Some(detector) = config.failure_percentage {
        let judged: Vec<usize> = (0..stats.len())
            .filter(|&i| stats[i].requests >= detector.request_volume.max(1))
            .collect();
        if judged.len() >= detector.minimum_hosts.max(1) as usize {
            for i in judged {
                if 100.0 - success_rate(&stats[i]) >= f64::from(detector.threshold_percent) {
                    add(i, Detector::FailurePercentage);
                }
            }
        }
    }
    if let Some(detector) = config.latency {
        let judged: Vec<(usize, f64)> = (0..stats.len())
            .filter(|&i| stats[i].answered >= detector.request_volume.max(1))
            .map(|i| {
                let mean = stats[i].answer_time.as_secs_f64() / f64::from(stats[i].answered);
                (i, mean)
            })
            .collect();
        if judged.len() >= detector.minimum_hosts.max(1) as usize {
            let mut means: Vec<f64> = judged.iter().map(|(_, m)| *m).collect();
            means.sort_by(f64::total_cmp);
            // The lower median: with two endpoints, the faster one is the yardstick.
            let median = means[(means.len() - 1) / 2];
            let limit = median * f64::from(detector.factor_milli) / 1000.0;
            for (i, mean) in judged {
                if mean > limit {
                    add(i, Detector::Latency);
                }
            }
        }
    }
    found
}

/// How a try ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// An answer with this status.
    Status(u16),
    /// No answer: connection failure, reset or timeout (locally originated).
    NoAnswer,
}

impl TryOutcome {
    fn is_failure(self) -> bool {
        match self {
            TryOutcome::Status(status) => status >= 500,
            TryOutcome::NoAnswer => true,
        }
    }

    fn is_gateway_failure(self) -> bool {
        match self {
            TryOutcome::Status(status) => matches!(status, 502..=504),
            TryOutcome::NoAnswer => true,
        }
    }
}

/// One endpoint's streaks and ejection, shared by every worker thread.
#[derive(Debug)]
pub struct OutlierState {
    failures: AtomicU32,
    gateway_failures: AtomicU32,
    /// Until when it is ejected, in ms since `base` (0 = not ejected).
    ejected_until_ms: AtomicU64,
    /// The ejection-time multiplier.
    times_ejected: AtomicU32,
    /// When the multiplier last went down (ms since `base`).
    last_relief_ms: AtomicU64,
    /// Ejections so far (for `/clusters` and metrics).
    pub ejections_total: AtomicU64,
    /// This interval's tries, failures, answers and answer time (µs), for the sweep.
    interval_requests: AtomicU32,
    interval_failures: AtomicU32,
    interval_answered: AtomicU32,
    interval_answer_us: AtomicU64,
    base: Instant,
}

impl Default for OutlierState {
    fn default() -> Self {
        OutlierState {
            failures: AtomicU32::new(0),
            gateway_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            last_relief_ms: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            interval_requests: AtomicU32::new(0),
            interval_failures: AtomicU32::new(0),
            interval_answered: AtomicU32::new(0),
            interval_answer_us: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl OutlierState {
    fn now_ms(&self, now: Instant) -> u64 {
        // +1 so that "0" can mean "never".
        millis(now.saturating_duration_since(self.base)) + 1
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > self.now_ms(now)
    }

    /// How much longer it stays ejected.
    pub fn ejected_for(&self, now: Instant) -> Duration {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(self.now_ms(now)))
    }

    /// Counts a response head that came after `elapsed`, for the latency detector.
    pub fn observe_answer(&self, elapsed: Duration) {
        self.interval_answered.fetch_add(1, Ordering::Relaxed);
        self.interval_answer_us.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Takes this interval's counts and starts the next interval.
    pub fn take_interval(&self) -> IntervalStats {
        IntervalStats {
            requests: self.interval_requests.swap(0, Ordering::Relaxed),
            failures: self.interval_failures.swap(0, Ordering::Relaxed),
            answered: self.interval_answered.swap(0, Ordering::Relaxed),
            answer_time: Duration::from_micros(self.interval_answer_us.swap(0, Ordering::Relaxed)),
        }
    }

    /// Records a try's outcome; returns the consecutive detector whose threshold this
    /// outcome crossed (the caller decides whether the cluster may eject one more endpoint).
    pub fn record(
        &self,
        outcome: TryOutcome,
        now: Instant,
        config: &OutlierConfig,
    ) -> Option<Detector> {
        self.interval_requests.fetch_add(1, Ordering::Relaxed);
        if outcome.is_failure() {
            self.interval_failures.fetch_add(1, Ordering::Relaxed);
        }
        if !outcome.is_failure() {
            // Successes are the common case: write the shared streaks only when they ran.
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            if self.gateway_failures.load(Ordering::Relaxed) != 0 {
                self.gateway_failures.store(0, Ordering::Relaxed);
            }
            self.relieve(now, config);
            return None;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let gateway = if outcome.is_gateway_failure() {
            self.gateway_failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.gateway_failures.store(0, Ordering::Relaxed);
            0
        };
        if self.is_ejected(now) {
            None
        } else if config.consecutive_5xx > 0 && failures >= config.consecutive_5xx {
            Some(Detector::Consecutive5xx)
        } else if config.consecutive_gateway_failure > 0
            && gateway >= config.consecutive_gateway_failure
        {
            Some(Detector::ConsecutiveGatewayFailure)
        } else {
            None
        }
    }

    /// Ejects the endpoint from `now` for base × multiplier (capped).
    pub fn eject(&self, now: Instant, config: &OutlierConfig) {
        let times = self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = config
            .base_ejection_time
            .saturating_mul(times)
            .min(config.max_ejection_time.max(config.base_ejection_time));
        let now_ms = self.now_ms(now);
        self.ejected_until_ms
            .store(now_ms + millis(duration), Ordering::Relaxed);
        self.last_relief_ms
            .store(now_ms + millis(duration), Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.gateway_failures.store(0, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// One step of the multiplier back per `interval` spent in service.
    fn relieve(&self, now: Instant, config: &OutlierConfig) {
        if self.times_ejected.load(Ordering::Relaxed) == 0 || config.interval.is_zero() {
            return;
        }
        let now_ms = self.now_ms(now);
        let last = self.last_relief_ms.load(Ordering::Relaxed);
        if now_ms >= last + millis(config.interval)
            && self
                .last_relief_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self
                .times_ejected
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1));
        }
    }
}

/// Runs the per-interval detectors of every cluster of the current snapshot, each on its
/// own `interval`; lives on the control runtime and remembers when each cluster (by name)
/// was last swept, across snapshots.
#[derive(Debug, Default)]
pub struct OutlierSweeper {
    last: std::collections::HashMap<String, Instant>,
}

impl OutlierSweeper {
    /// How often [`OutlierSweeper::sweep`] should be called.
    pub const TICK: Duration = Duration::from_millis(100);

    /// Sweeps the clusters whose interval has passed.
    pub fn sweep(&mut self, clusters: &super::Clusters, now: Instant) {
        for (name, cluster) in clusters {
            let Some(config) = cluster.outlier.filter(|c| c.has_interval_detectors()) else {
                continue;
            };
            let last = self.last.entry(name.clone()).or_insert(now);
            if now.saturating_duration_since(*last) >= config.interval {
                *last = now;
                cluster.sweep_outliers(now);
            }
        }
        self.last.retain(|name, _| clusters.contains_key(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_eject_and_ejections_grow_then_relax() {
        let config = OutlierConfig::default();
        let state = OutlierState::default();
        for _ in 0..4 {
            assert_eq!(
                state.record(TryOutcome::Status(500), Instant::now(), &config),
                None
            );
        }
        // A success breaks the streak.
        state.record(TryOutcome::Status(200), Instant::now(), &config);
        for _ in 0..4 {
            assert_eq!(
                state.record(TryOutcome::NoAnswer, Instant::now(), &config),
                None
            );
        }
        assert_eq!(
            state.record(TryOutcome::Status(503), Instant::now(), &config),
            Some(Detector::Consecutive5xx)
        );
        state.eject(Instant::now(), &config);
        assert!(state.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(state.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!state.is_ejected(Instant::now()), "back after 30 s");

        // Ejected again at once: twice as long.
        state.eject(Instant::now(), &config);
        assert_eq!(state.ejected_for(Instant::now()), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        // Healthy for two intervals: the multiplier goes back down twice.
        for _ in 0..2 {
            tokio::time::advance(config.interval).await;
            state.record(TryOutcome::Status(200), Instant::now(), &config);
        }
        state.eject(Instant::now(), &config);
        assert_eq!(state.ejected_for(Instant::now()), Duration::from_secs(30));
        assert_eq!(state.ejections_total.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_is_capped() {
        let config = OutlierConfig::default();
        let state = OutlierState::default();
        for _ in 0..20 {
            state.eject(Instant::now(), &config);
        }
        assert_eq!(state.ejected_for(Instant::now()), config.max_ejection_time);
    }

    #[test]
    fn gateway_failures_have_their_own_streak() {
        let config = OutlierConfig {
            consecutive_5xx: 0,
            consecutive_gateway_failure: 3,
            ..OutlierConfig::default()
        };
        let state = OutlierState::default();
        let now = Instant::now();
        assert_eq!(state.record(TryOutcome::Status(502), now, &config), None);
        assert_eq!(
            state.record(TryOutcome::Status(500), now, &config),
            None,
            "500 is not a gateway failure"
        );
        assert_eq!(state.record(TryOutcome::Status(504), now, &config), None);
        assert_eq!(state.record(TryOutcome::NoAnswer, now, &config), None);
        assert_eq!(
            state.record(TryOutcome::Status(503), now, &config),
            Some(Detector::ConsecutiveGatewayFailure)
        );
    }
}

#[cfg(test)]
mod interval_tests {
    use super::*;

    fn stats(requests: u32, failures: u32, mean_ms: u64) -> IntervalStats {
        IntervalStats {
            requests,
            failures,
            answered: requests,
            answer_time: Duration::from_millis(mean_ms) * requests,
        }
    }

    #[test]
    fn success_rate_ejects_what_is_far_below_the_cluster_mean() {
        let config = OutlierConfig::default();
        // Five endpoints with 100 requests: one at 60 % success, four at 99–100 %.
        let mut all = vec![stats(100, 0, 10), stats(100, 1, 10), stats(100, 0, 10)];
        all.push(stats(100, 1, 10));
        all.push(stats(100, 40, 10));
        assert_eq!(
            interval_outliers(&all, &config),
            vec![(4, Detector::SuccessRate)]
        );
        // Too few requests on one of them: four endpoints are fewer than the five needed.
        all[0] = stats(99, 0, 10);
        assert_eq!(interval_outliers(&all, &config), vec![]);
        // All equally bad: nothing stands out.
        let uniform = vec![stats(100, 30, 10); 6];
        assert_eq!(interval_outliers(&uniform, &config), vec![]);
    }

    #[test]
    fn failure_percentage_ejects_at_its_threshold_even_when_all_fail() {
        let config = OutlierConfig {
            success_rate: None,
            failure_percentage: Some(FailurePercentageDetector {
                minimum_hosts: 2,
                ..FailurePercentageDetector::default()
            }),
            ..OutlierConfig::default()
        };
        let all = vec![stats(50, 50, 10), stats(50, 43, 10), stats(50, 42, 10)];
        assert_eq!(
            interval_outliers(&all, &config),
            vec![
                (0, Detector::FailurePercentage),
                (1, Detector::FailurePercentage)
            ],
            "43/50 = 86 % ≥ 85 %, 42/50 = 84 % is not"
        );
    }

    #[test]
    fn latency_ejects_what_is_slower_than_factor_times_the_median() {
        let config = OutlierConfig {
            success_rate: None,
            latency: Some(LatencyDetector::default()),
            ..OutlierConfig::default()
        };
        let all = vec![
            stats(60, 0, 10),
            stats(60, 0, 12),
            stats(60, 0, 31),
            stats(60, 0, 29),
        ];
        // Lower median 12 ms × 3 = 36 ms: nothing is slower.
        assert_eq!(interval_outliers(&all, &config), vec![]);
        let mut slow = all.clone();
        slow[3] = stats(60, 0, 80);
        assert_eq!(
            interval_outliers(&slow, &config),
            vec![(3, Detector::Latency)]
        );
        // Too few answers to judge it.
        slow[3] = stats(49, 0, 80);
        assert_eq!(interval_outliers(&slow, &config), vec![]);
    }

    #[test]
    fn interval_counts_are_taken_once() {
        let config = OutlierConfig::default();
        let state = OutlierState::default();
        let now = Instant::now();
        state.record(TryOutcome::Status(200), now, &config);
        state.record(TryOutcome::Status(500), now, &config);
        state.record(TryOutcome::NoAnswer, now, &config);
        state.observe_answer(Duration::from_millis(4));
        state.observe_answer(Duration::from_millis(6));
        assert_eq!(
            state.take_interval(),
            IntervalStats {
                requests: 3,
                failures: 2,
                answered: 2,
                answer_time: Duration::from_millis(10),
            }
        );
        assert_eq!(state.take_interval(), IntervalStats::default());
    }
}
