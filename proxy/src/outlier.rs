//! Outlier detection: endpoints that keep failing are ejected for a while (Envoy's
//! consecutive-5xx and consecutive-gateway-failure detectors).
//!
//! Every try's outcome is recorded on its endpoint: a 5xx answer, a connection failure, a
//! reset or a timeout counts as a failure (a gateway failure too when it is 502/503/504 or
//! locally originated), anything else resets the streaks. When a streak reaches its
//! threshold the endpoint is ejected for `base_ejection_time × times ejected` (capped at
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
        }
    }
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

    /// Records a try's outcome; returns whether this outcome crossed a threshold (the
    /// caller decides whether the cluster may eject one more endpoint).
    pub fn record(&self, outcome: TryOutcome, now: Instant, config: &OutlierConfig) -> bool {
        if !outcome.is_failure() {
            // Successes are the common case: write the shared streaks only when they ran.
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            if self.gateway_failures.load(Ordering::Relaxed) != 0 {
                self.gateway_failures.store(0, Ordering::Relaxed);
            }
            self.relieve(now, config);
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let gateway = if outcome.is_gateway_failure() {
            self.gateway_failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.gateway_failures.store(0, Ordering::Relaxed);
            0
        };
        !self.is_ejected(now)
            && ((config.consecutive_5xx > 0 && failures >= config.consecutive_5xx)
                || (config.consecutive_gateway_failure > 0
                    && gateway >= config.consecutive_gateway_failure))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_eject_and_ejections_grow_then_relax() {
        let config = OutlierConfig::default();
        let state = OutlierState::default();
        for _ in 0..4 {
            assert!(!state.record(TryOutcome::Status(500), Instant::now(), &config));
        }
        // A success breaks the streak.
        state.record(TryOutcome::Status(200), Instant::now(), &config);
        for _ in 0..4 {
            assert!(!state.record(TryOutcome::NoAnswer, Instant::now(), &config));
        }
        assert!(state.record(TryOutcome::Status(503), Instant::now(), &config));
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
        assert!(!state.record(TryOutcome::Status(502), now, &config));
        assert!(
            !state.record(TryOutcome::Status(500), now, &config),
            "500 is not a gateway failure"
        );
        assert!(!state.record(TryOutcome::Status(504), now, &config));
        assert!(!state.record(TryOutcome::NoAnswer, now, &config));
        assert!(state.record(TryOutcome::Status(503), now, &config));
    }
}
