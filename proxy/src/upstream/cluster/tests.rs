use super::*;
use crate::upstream::breakers::{RetryBudget, SlotRefusal};
use crate::upstream::endpoint::{ActiveRequest, Locality, FAILURE_LATENCY};
use crate::upstream::ewma::EwmaConfig;
use crate::upstream::lb::MAX_SCHEDULE_LEN;
use crate::upstream::registry::EndpointRegistry;

/// The round-robin schedule of a `round_robin` cluster.
fn schedule(c: &Cluster) -> &[u32] {
    match c.balancer() {
        Balancer::RoundRobin(policy) => policy.schedule(),
        other => panic!("not round robin: {other:?}"),
    }
}

/// The ring of a `ring_hash` cluster.
fn ring(c: &Cluster) -> &RingHash {
    match c.balancer() {
        Balancer::RingHash(ring) => ring,
        other => panic!("not ring hash: {other:?}"),
    }
}

/// An endpoint on 127.0.0.1:`port` with Envoy's defaults: weight 1, priority 0, no
/// locality.
fn endpoint(registry: &EndpointRegistry, port: usize) -> Endpoint {
    let address = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
    Endpoint {
        address,
        locality: Locality::default(),
        weight: 1,
        priority: 0,
        locality_weight: 1,
        state: registry.state("c", address),
        hostname: None,
        locality_picks: Default::default(),
        tls: None,
    }
}

fn cluster(lb: LbPolicy, weights: &[u32]) -> Cluster {
    let registry = EndpointRegistry::default();
    let endpoints = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Endpoint {
            weight: *w,
            ..endpoint(&registry, 1000 + i)
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
            tokio::time::timeout(Duration::from_millis(5), slots.wait_for(Duration::ZERO)).await;
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
    let c = cluster(LbPolicy::RingHash, &[1, 1, 1]).with_ring(RingSize::default());
    // scale = ⌈⅓ × 1024⌉ / ⅓ = 1026: 342 points each.
    assert_eq!(ring(&c).points().len(), 1026);
    let c = cluster(LbPolicy::RingHash, &[1, 2]).with_ring(RingSize::default());
    let points = ring(&c).points();
    let of = |i: u32| points.iter().filter(|(_, e)| *e == i).count();
    assert_eq!((of(0), of(1)), (342, 684));
    // Points are xxHash64("address_n").
    let first = crate::upstream::hash::hash64(b"127.0.0.1:1000_0");
    assert!(points.contains(&(first, 0)));
    let last = crate::upstream::hash::hash64(b"127.0.0.1:1001_683");
    assert!(points.contains(&(last, 1)));
    // A key goes to the first point at or after its hash, wrapping around.
    let key = crate::upstream::hash::hash64(b"user-42");
    let expected = points
        .iter()
        .find(|(point, _)| *point >= key)
        .unwrap_or(&points[0])
        .1;
    let picked = ring(&c).walk(&c.endpoints, key, &|_| true).unwrap();
    assert_eq!(picked.address, c.endpoints[expected as usize].address);
}

#[test]
fn full_eds_weights_keep_their_ratio() {
    let c = cluster(LbPolicy::RoundRobin, &[1000, 1]);
    let heavy = schedule(&c).iter().filter(|i| **i == 0).count();
    assert_eq!(
        (heavy, schedule(&c).len()),
        (1000, 1001),
        "1000:1 stays 1000:1"
    );
    let c = cluster(LbPolicy::RoundRobin, &[3000, 1000]);
    assert_eq!(schedule(&c).len(), 4, "divided by the common divisor");
    let c = cluster(LbPolicy::RoundRobin, &[u32::MAX, 1, 2_000_000_000]);
    assert!(schedule(&c).len() <= MAX_SCHEDULE_LEN as usize + 3);
    let count = |i: u32| schedule(&c).iter().filter(|x| **x == i).count() as f64;
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
        let hash = crate::upstream::hash::hash64(format!("user-{key}").as_bytes());
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
    let hash = crate::upstream::hash::hash64(b"user-7");
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
    assert_eq!(schedule(&c), [0, 0, 1, 0]);
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
        .map(|(i, region)| Endpoint {
            locality: Locality {
                region: region.to_string(),
                ..Locality::default()
            },
            ..endpoint(&registry, 2000 + i)
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
async fn latency_keeps_to_the_local_region_moves_when_it_slows_and_comes_back_without_flapping() {
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
        .map(|i| Endpoint {
            priority: u32::from(i >= 10),
            ..endpoint(&registry, 3000 + i)
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
        .map(|(i, (zone, weight))| Endpoint {
            locality: Locality {
                region: "r".into(),
                zone: zone.to_string(),
                ..Locality::default()
            },
            locality_weight: *weight,
            ..endpoint(&registry, 4000 + i)
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
