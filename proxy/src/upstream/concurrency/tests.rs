//! The gradient controller against a simulated backend, on a paused clock.

use super::*;

/// A backend of `servers` workers that each take `service` per request: a request admitted
/// with `n` in flight is answered after `service × max(1, n / servers)` (processor sharing).
struct SimulatedBackend {
    servers: u32,
    service: Duration,
    /// When each admitted request is answered, its class, when it was sent, its permit.
    pending: Vec<(Instant, usize, Instant, ConcurrencyPermit)>,
}

/// What happened to one priority class over a run.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    offered: u64,
    admitted: u64,
    latency_total: Duration,
    answered: u64,
}

impl Outcome {
    fn admitted_share(&self) -> f64 {
        self.admitted as f64 / self.offered.max(1) as f64
    }
    fn mean_latency(&self) -> Duration {
        self.latency_total / u32::try_from(self.answered.max(1)).unwrap()
    }
}

impl SimulatedBackend {
    fn new(servers: u32, service: Duration) -> Self {
        SimulatedBackend {
            servers,
            service,
            pending: Vec::new(),
        }
    }

    /// Runs `duration` of 1 ms ticks with `rates` requests per ms for each class (low,
    /// normal, high); returns what happened to each class.
    async fn run(
        &mut self,
        controller: &Arc<ConcurrencyController>,
        rates: [f64; 3],
        duration: Duration,
    ) -> [Outcome; 3] {
        let mut outcomes = [Outcome::default(); 3];
        let mut owed = [0.0f64; 3];
        for _ in 0..duration.as_millis() {
            for (class, priority) in Priority::ALL.into_iter().enumerate() {
                owed[class] += rates[class];
                while owed[class] >= 1.0 {
                    owed[class] -= 1.0;
                    outcomes[class].offered += 1;
                    if let Some(permit) = controller.try_acquire(priority) {
                        outcomes[class].admitted += 1;
                        let n = controller.status().in_flight;
                        let stretch = f64::from(n) / f64::from(self.servers);
                        let latency = self.service.mul_f64(stretch.max(1.0));
                        let now = Instant::now();
                        self.pending.push((now + latency, class, now, permit));
                    }
                }
            }
            tokio::time::advance(Duration::from_millis(1)).await;
            let now = Instant::now();
            let mut i = 0;
            while i < self.pending.len() {
                if self.pending[i].0 <= now {
                    let (_, class, sent, mut permit) = self.pending.swap_remove(i);
                    permit.answered();
                    outcomes[class].answered += 1;
                    outcomes[class].latency_total += now - sent;
                } else {
                    i += 1;
                }
            }
        }
        outcomes
    }
}

#[test]
fn histogram_percentiles_are_within_its_resolution() {
    let histogram = Histogram::new();
    for ms in 1..=100u64 {
        histogram.record(Duration::from_millis(ms));
    }
    let p50 = histogram.drain(50.0).unwrap();
    assert!(
        (Duration::from_millis(47)..=Duration::from_millis(53)).contains(&p50),
        "{p50:?}"
    );
    assert_eq!(histogram.drain(50.0), None, "drained");
    histogram.record(Duration::from_micros(3));
    assert_eq!(histogram.drain(99.0), Some(Duration::from_micros(3)));
    histogram.record(Duration::from_secs(100_000));
    assert!(histogram.drain(50.0).unwrap() > Duration::from_secs(3600));
}

#[test]
fn the_gradient_step_is_envoys() {
    let config = GradientConfig::default();
    let ms = Duration::from_millis;
    // Latency at the min RTT: gradient 1.25, then √ headroom.
    let limit = gradient_step(&config, 100, ms(10), ms(10));
    assert_eq!(limit, (125.0 + 125f64.sqrt()) as u32);
    // Twice slower than the buffered min RTT: the gradient is floored at 0.5.
    assert_eq!(
        gradient_step(&config, 100, ms(10), ms(100)),
        (50.0 + 50f64.sqrt()) as u32
    );
    // Bounds.
    assert_eq!(gradient_step(&config, 1, ms(10), ms(1000)), 3);
    assert_eq!(gradient_step(&config, 900, ms(10), ms(1)), 1000);
}

#[tokio::test(start_paused = true)]
async fn first_the_min_rtt_is_measured_at_min_concurrency() {
    let controller = Arc::new(ConcurrencyController::new(GradientConfig::default()));
    let status = controller.status();
    assert!(status.measuring_min_rtt);
    assert_eq!(status.limit, 3);
    assert_eq!(status.min_rtt, None);
    let mut backend = SimulatedBackend::new(10, Duration::from_millis(10));
    // Light load: 0.2 requests per ms, well under the backend's 1 per ms.
    backend
        .run(&controller, [0.0, 0.2, 0.0], Duration::from_secs(2))
        .await;
    let status = controller.status();
    assert!(!status.measuring_min_rtt, "{status:?}");
    let min_rtt = status.min_rtt.expect("measured");
    assert!(
        (Duration::from_millis(9)..=Duration::from_millis(11)).contains(&min_rtt),
        "{min_rtt:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn under_three_times_overload_low_priority_is_shed_and_high_priority_is_not() {
    let controller = Arc::new(ConcurrencyController::new(GradientConfig::default()));
    // 10 workers × 10 ms: capacity 1 request per ms.
    let mut backend = SimulatedBackend::new(10, Duration::from_millis(10));
    backend
        .run(&controller, [0.0, 0.3, 0.0], Duration::from_secs(2))
        .await;
    assert!(controller.status().min_rtt.is_some());

    // 3 requests per ms: 2.7 low, 0.3 high, for 20 s.
    let [low, _, high] = backend
        .run(&controller, [2.7, 0.0, 0.3], Duration::from_secs(20))
        .await;
    assert!(
        high.admitted_share() >= 0.99,
        "high priority admitted {:.4}",
        high.admitted_share()
    );
    assert!(
        low.admitted_share() < 0.5,
        "low priority admitted {:.4}: it must be shed",
        low.admitted_share()
    );
    assert!(
        low.admitted > 0,
        "low priority still gets what capacity is left"
    );
    let status = controller.status();
    assert!(
        (10..=60).contains(&status.limit),
        "the limit follows the backend's capacity: {status:?}"
    );
    // What is admitted is served without a growing queue.
    assert!(
        high.mean_latency() <= Duration::from_millis(25),
        "high priority is answered near the min RTT: {:?}",
        high.mean_latency()
    );
    let sample = status.sample_rtt.expect("windows measured");
    assert!(
        sample <= Duration::from_millis(25),
        "latency stays near the min RTT: {status:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_limit_does_not_drift_up_and_a_slower_backend_is_remeasured() {
    let controller = Arc::new(ConcurrencyController::new(GradientConfig::default()));
    let mut backend = SimulatedBackend::new(10, Duration::from_millis(10));
    backend
        .run(&controller, [0.0, 0.2, 0.0], Duration::from_secs(5))
        .await;
    let idle = controller.status();
    assert!(
        idle.limit <= 20,
        "2 requests in flight need no limit of hundreds: {idle:?}"
    );

    // The backend becomes four times slower: latency looks like overload against the old
    // min RTT, the limit falls to min_concurrency, and after five windows there the min
    // RTT is measured again.
    backend.service = Duration::from_millis(40);
    backend
        .run(&controller, [0.0, 0.2, 0.0], Duration::from_secs(10))
        .await;
    let status = controller.status();
    let min_rtt = status.min_rtt.unwrap();
    assert!(
        min_rtt >= Duration::from_millis(35),
        "the new min RTT is the slower backend's: {status:?}"
    );
    assert!(!status.measuring_min_rtt, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn the_min_rtt_is_measured_again_every_interval_and_high_priority_keeps_its_reserve() {
    let config = GradientConfig {
        min_rtt_jitter_percent: 0.0,
        ..GradientConfig::default()
    };
    let controller = Arc::new(ConcurrencyController::new(config));
    let mut backend = SimulatedBackend::new(10, Duration::from_millis(10));
    // Normal traffic at 60 % of capacity, high at 10 %, across the 60 s mark.
    let [_, _, high] = backend
        .run(&controller, [0.0, 0.6, 0.1], Duration::from_secs(59))
        .await;
    assert!(high.admitted_share() >= 0.99, "{high:?}");
    let before = controller.status();
    assert!(!before.measuring_min_rtt);
    assert!(before.limit > 10, "{before:?}");
    // The window opens after 60 s (at the next update) and pins the limit.
    let mut waited = Duration::ZERO;
    while !controller.status().measuring_min_rtt {
        assert!(
            waited < Duration::from_secs(2),
            "no min RTT window after 61 s"
        );
        backend
            .run(&controller, [0.0, 0.6, 0.1], Duration::from_millis(5))
            .await;
        waited += Duration::from_millis(5);
    }
    assert_eq!(controller.status().limit, 3);
    // High priority was admitted within its reserve while the window ran.
    let [_, normal, high] = backend
        .run(&controller, [0.0, 0.6, 0.1], Duration::from_secs(5))
        .await;
    assert!(high.admitted_share() >= 0.99, "{high:?}");
    assert!(normal.admitted_share() < 1.0, "normal waits out the window");
    let after = controller.status();
    assert!(!after.measuring_min_rtt, "{after:?}");
    assert!(after.limit > 10, "the limit from before is back: {after:?}");
}

#[test]
fn priorities_parse_in_any_case_and_nothing_else() {
    assert_eq!(Priority::parse(b"LOW"), Some(Priority::Low));
    assert_eq!(Priority::parse(b"normal"), Some(Priority::Normal));
    assert_eq!(Priority::parse(b"High"), Some(Priority::High));
    assert_eq!(Priority::parse(b"urgent"), None);
    assert_eq!(Priority::parse(b""), None);
}

#[tokio::test(start_paused = true)]
async fn a_fixed_min_rtt_is_never_measured_and_the_limit_keeps_adapting() {
    let config = GradientConfig {
        fixed_min_rtt: Some(Duration::from_millis(10)),
        ..GradientConfig::default()
    };
    let controller = Arc::new(ConcurrencyController::new(config));
    assert!(!controller.status().measuring_min_rtt);
    let mut backend = SimulatedBackend::new(10, Duration::from_millis(10));
    // Past several min RTT intervals: never a window, and the limit still follows load.
    let [_, normal, _] = backend
        .run(&controller, [0.0, 0.8, 0.0], Duration::from_secs(200))
        .await;
    assert!(!controller.status().measuring_min_rtt);
    assert!(normal.admitted_share() > 0.99, "{normal:?}");
    backend.service = Duration::from_millis(40);
    backend
        .run(&controller, [0.0, 0.8, 0.0], Duration::from_secs(5))
        .await;
    let status = controller.status();
    assert!(
        status.limit < 20,
        "a slower backend pulls the limit down: {status:?}"
    );
}
