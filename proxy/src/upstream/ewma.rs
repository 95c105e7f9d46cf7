//! Peak-EWMA latency estimates: what `lb: latency` balances on.
//!
//! The Finagle / Linkerd design: each endpoint keeps an exponentially weighted moving
//! average of its response times that jumps straight up to a slower observation (a peak is
//! believed at once) and decays toward faster ones with time constant `decay` (~10 s), so
//! an endpoint that slows down loses traffic immediately and wins it back gradually. An
//! endpoint never measured starts at `default_rtt`. The cost of sending one more request
//! is `estimate × (in flight + 1)`; power-of-two-choices picks the cheaper of two random
//! endpoints, which avoids the herd that "always the fastest" would cause.
//!
//! Alongside, a *smoothed* average with a short time constant ([`SMOOTHING`], no peaks)
//! serves the choice between regions: moving a whole cluster's traffic to another region
//! must follow a sustained slowdown within a second, not a single slow answer, which the
//! peak estimate would hold against the region for its whole decay.
//!
//! Time comes from `tokio::time::Instant`, so tests run on a paused clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How the estimates behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EwmaConfig {
    /// Time constant of the decay toward newer, faster observations.
    pub decay: Duration,
    /// The estimate of an endpoint never measured.
    pub default_rtt: Duration,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        EwmaConfig {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// One endpoint's estimate, shared by every worker thread without a lock: the estimate
/// in nanoseconds (0 = never measured) and when it was last updated, as nanoseconds since
/// the estimator was made. Two updates racing may lose one observation; an estimate needs
/// no more precision than that.
#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: AtomicU64,
    /// The smoothed average (0 = never measured).
    smooth_ns: AtomicU64,
    stamp_ns: AtomicU64,
    base: Instant,
}

/// Time constant of the smoothed average: a slowdown that lasts shows within about a
/// second; one slow answer among many fast ones barely moves it.
pub const SMOOTHING: Duration = Duration::from_millis(500);

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma {
            estimate_ns: AtomicU64::new(0),
            smooth_ns: AtomicU64::new(0),
            stamp_ns: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl PeakEwma {
    /// Folds in one response time measured at `now`.
    pub fn observe(&self, rtt: Duration, now: Instant, config: &EwmaConfig) {
        let rtt = nanos(rtt).max(1);
        let stamp = nanos(now.saturating_duration_since(self.base));
        let elapsed =
            Duration::from_nanos(stamp.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)));
        let estimate = self.estimate_ns.load(Ordering::Relaxed);
        let next = if estimate == 0 || rtt > estimate {
            rtt
        } else {
            let weight = decay_weight(elapsed, config.decay);
            (estimate as f64 * weight + rtt as f64 * (1.0 - weight)) as u64
        };
        let smooth = self.smooth_ns.load(Ordering::Relaxed);
        let next_smooth = if smooth == 0 {
            rtt
        } else {
            let weight = decay_weight(elapsed, SMOOTHING);
            (smooth as f64 * weight + rtt as f64 * (1.0 - weight)) as u64
        };
        self.estimate_ns.store(next.max(1), Ordering::Relaxed);
        self.smooth_ns.store(next_smooth.max(1), Ordering::Relaxed);
        self.stamp_ns.store(stamp, Ordering::Relaxed);
    }

    /// The current estimate (the default for an endpoint never measured).
    pub fn estimate(&self, config: &EwmaConfig) -> Duration {
        match self.estimate_ns.load(Ordering::Relaxed) {
            0 => config.default_rtt,
            estimate => Duration::from_nanos(estimate),
        }
    }

    /// The smoothed average (the default for an endpoint never measured): what region
    /// choice compares.
    pub fn smoothed(&self, config: &EwmaConfig) -> Duration {
        match self.smooth_ns.load(Ordering::Relaxed) {
            0 => config.default_rtt,
            smooth => Duration::from_nanos(smooth),
        }
    }

    /// How long ago the estimate was last updated (`None`: never measured).
    pub fn age(&self, now: Instant) -> Option<Duration> {
        if self.estimate_ns.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let stamp = Duration::from_nanos(self.stamp_ns.load(Ordering::Relaxed));
        Some(
            now.saturating_duration_since(self.base)
                .saturating_sub(stamp),
        )
    }

    /// What one more request would cost: the estimate times (requests in flight + 1).
    pub fn cost(&self, in_flight: usize, config: &EwmaConfig) -> f64 {
        self.estimate(config).as_nanos() as f64 * (in_flight as f64 + 1.0)
    }
}

/// How much of the old estimate survives `elapsed`: e^(−elapsed / decay).
fn decay_weight(elapsed: Duration, decay: Duration) -> f64 {
    if decay.is_zero() {
        return 0.0;
    }
    (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn peaks_are_believed_at_once_and_recoveries_decay_in() {
        let config = EwmaConfig::default();
        let ewma = PeakEwma::default();
        assert_eq!(
            ewma.estimate(&config),
            ms(30),
            "never measured: the default"
        );
        ewma.observe(ms(2), Instant::now(), &config);
        assert_eq!(ewma.estimate(&config), ms(2));
        // A slow answer: the estimate jumps to it.
        ewma.observe(ms(60), Instant::now(), &config);
        assert_eq!(ewma.estimate(&config), ms(60));
        // Fast answers again: after one time constant ~63 % of the way back.
        tokio::time::advance(config.decay).await;
        ewma.observe(ms(2), Instant::now(), &config);
        let estimate = ewma.estimate(&config).as_secs_f64() * 1000.0;
        let expected = 60.0 * (-1f64).exp() + 2.0 * (1.0 - (-1f64).exp());
        assert!(
            (estimate - expected).abs() < 0.01,
            "{estimate} vs {expected}"
        );
        // Observations close together barely move it.
        ewma.observe(ms(2), Instant::now(), &config);
        assert!((ewma.estimate(&config).as_secs_f64() * 1000.0 - expected).abs() < 0.01);
        // Long after, it has converged on the new latency.
        for _ in 0..10 {
            tokio::time::advance(config.decay).await;
            ewma.observe(ms(2), Instant::now(), &config);
        }
        assert!(ewma.estimate(&config) < ms(3));
    }

    #[test]
    fn cost_grows_with_requests_in_flight() {
        let config = EwmaConfig::default();
        let ewma = PeakEwma::default();
        ewma.observe(ms(10), Instant::now(), &config);
        assert_eq!(ewma.cost(0, &config), ms(10).as_nanos() as f64);
        assert_eq!(ewma.cost(3, &config), ms(40).as_nanos() as f64);
    }

    #[tokio::test(start_paused = true)]
    async fn the_smoothed_average_ignores_a_spike_and_follows_a_lasting_slowdown() {
        let config = EwmaConfig::default();
        let ewma = PeakEwma::default();
        ewma.observe(ms(2), Instant::now(), &config);
        // A fast stream of answers with one slow one in it.
        for i in 0..100 {
            tokio::time::advance(ms(1)).await;
            let rtt = if i == 50 { ms(60) } else { ms(2) };
            ewma.observe(rtt, Instant::now(), &config);
        }
        assert!(
            ewma.smoothed(&config) < ms(3),
            "{:?}",
            ewma.smoothed(&config)
        );
        assert!(
            ewma.estimate(&config) > ms(50),
            "the peak estimate holds it"
        );
        // A slowdown that lasts: within a second the smoothed average is most of the way.
        for _ in 0..100 {
            tokio::time::advance(ms(10)).await;
            ewma.observe(ms(60), Instant::now(), &config);
        }
        assert!(
            ewma.smoothed(&config) > ms(50),
            "{:?}",
            ewma.smoothed(&config)
        );
    }
}
