//! Three regions behind userspace WAN links (2 ms, 30 ms and 90 ms round trips) and a
//! proxy in the first one with `lb: latency`: where traffic goes in steady state, how fast
//! it moves when the local region slows down, and that it comes back when it recovers.

use crate::common::wan::WanLink;
use crate::common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Region {
    backend: Backend,
    link: WanLink,
}

async fn region(name: &str, rtt_ms: u64) -> Region {
    let backend = Backend::start(name).await;
    let link = WanLink::start(backend.address, Duration::from_millis(rtt_ms)).await;
    Region { backend, link }
}

/// Clients sending requests back to back until stopped; counts failures.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (url, stop, failures) = (url.to_string(), stop.clone(), failures.clone());
                tokio::spawn(async move {
                    let client = client();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {}
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            failures,
            tasks,
        }
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.failures.load(Ordering::Relaxed)
    }
}

/// Requests each region's backend got during `window`.
async fn counts_during(regions: &[Region], window: Duration) -> Vec<usize> {
    let before: Vec<usize> = regions.iter().map(|r| r.backend.requests()).collect();
    tokio::time::sleep(window).await;
    regions
        .iter()
        .zip(before)
        .map(|(r, b)| r.backend.requests() - b)
        .collect()
}

fn share(counts: &[usize], i: usize) -> f64 {
    counts[i] as f64 / counts.iter().sum::<usize>().max(1) as f64
}

/// The three regions and a proxy in r1 balancing `web` over them with `lb: latency`;
/// `service` adds to the service's flow map, `routes` are the route list's items (YAML;
/// empty: one route to `web`).
async fn three_regions(service: &str, routes: &str) -> ([Region; 3], Proxy) {
    three_regions_with("", service, routes).await
}

/// [`three_regions`] with `top` (YAML) added at the top level of the proxy's config.
async fn three_regions_with(top: &str, service: &str, routes: &str) -> ([Region; 3], Proxy) {
    let routes = if routes.is_empty() {
        "  - service: web\n"
    } else {
        routes
    };
    let regions = [
        region("r1", 2).await,
        region("r2", 30).await,
        region("r3", 90).await,
    ];
    let endpoints: Vec<String> = regions
        .iter()
        .zip(["r1", "r2", "r3"])
        .map(|(r, name)| format!("{{ address: \"{}\", region: {name} }}", r.link.address))
        .collect();
    let proxy = Proxy::start(&format!(
        r#"
{top}
node: {{ id: edge-r1, region: r1 }}
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: [{}], lb: latency{service} }}
routes:
{routes}"#,
        endpoints.join(", ")
    ))
    .await;
    (regions, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traffic_follows_the_fastest_region_and_comes_home_when_it_recovers() {
    let _turn = crate::common::module_turn(module_path!());
    let (regions, proxy) = three_regions("", "").await;
    let load = Load::start(&proxy.url("/"), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Steady state: the local region is the fastest and gets ≥ 95 %.
    let steady = counts_during(&regions, Duration::from_secs(2)).await;
    assert!(share(&steady, 0) >= 0.95, "steady state {steady:?}");
    // /metrics says where the balancer sent tries, per locality.
    let metrics = proxy.metrics().await;
    let picks = |region: &str| {
        sample(
            &metrics,
            "nip_upstream_locality_picks_total",
            &[("cluster", "web"), ("region", region)],
        )
    };
    assert!(
        picks("r1") > 10.0 * (picks("r2") + picks("r3")),
        "r1 {} r2 {} r3 {}",
        picks("r1"),
        picks("r2"),
        picks("r3")
    );

    // The local region slows from 2 ms to 60 ms: traffic moves to r2 within 2 s.
    regions[0].link.set_rtt(Duration::from_millis(60));
    let slowed = Instant::now();
    let moved = loop {
        let window = counts_during(&regions, Duration::from_millis(200)).await;
        if share(&window, 1) >= 0.9 {
            break slowed.elapsed();
        }
        assert!(
            slowed.elapsed() < Duration::from_secs(5),
            "still {window:?}"
        );
    };
    assert!(moved <= Duration::from_secs(2), "moved after {moved:?}");
    let clusters = proxy.admin_json("/clusters").await;
    assert_eq!(
        clusters["clusters"][0]["current_region"], "r2",
        "{clusters}"
    );

    // It recovers: traffic comes back within 30 s and stays (no flapping).
    regions[0].link.set_rtt(Duration::from_millis(2));
    let recovered = Instant::now();
    loop {
        let window = counts_during(&regions, Duration::from_millis(500)).await;
        if share(&window, 0) >= 0.9 {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(30),
            "not back after 30 s: {window:?}"
        );
    }
    for _ in 0..4 {
        let window = counts_during(&regions, Duration::from_millis(500)).await;
        assert!(share(&window, 0) >= 0.9, "flapped: {window:?}");
    }
    assert_eq!(load.stop().await, 0, "no request failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_black_holed_region_under_load_costs_no_request_with_per_try_timeouts_and_retries() {
    let _turn = crate::common::module_turn(module_path!());
    // Every client may be retrying at once when the region goes dark: the max_retries
    // circuit breaker (Envoy's default is 3) must leave room for them.
    let (regions, proxy) = three_regions(
        ", circuit_breakers: { max_retries: 16 }",
        "  - service: web\n    retries: { on: [5xx], max: 2, per_try_timeout: 300ms }\n",
    )
    .await;
    let load = Load::start(&proxy.url("/"), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady = counts_during(&regions, Duration::from_secs(1)).await;
    assert!(share(&steady, 0) >= 0.9, "steady state {steady:?}");

    // The local region stops answering (connections open, nothing comes back).
    regions[0].link.black_hole(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = counts_during(&regions, Duration::from_secs(2)).await;
    assert!(share(&after, 1) >= 0.9, "traffic moved to r2: {after:?}");
    assert_eq!(load.stop().await, 0, "every hung try was retried elsewhere");
    let metrics = proxy.metrics().await;
    assert!(
        sample(
            &metrics,
            "nip_upstream_rq_retry_total",
            &[("cluster", "web")]
        ) >= 1.0,
        "retries were used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_pinned_to_a_region_never_leaves_it_and_answers_503_when_it_is_down() {
    let _turn = crate::common::module_turn(module_path!());
    let (regions, proxy) = three_regions(
        ", health_check: { path: /healthz, interval: 200ms, timeout: 1s, unhealthy_threshold: 1 }",
        "  - match: { path_prefix: /eu-data }\n    service: web\n    locality: r2\n  - service: web\n",
    )
    .await;
    let client = client();
    for _ in 0..30 {
        let r = client.get(proxy.url("/eu-data/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-backend"], "r2");
    }
    assert_eq!(
        regions[0].backend.requests(),
        0,
        "the fast local region is not used"
    );
    assert_eq!(regions[2].backend.requests(), 0);

    // Its region goes down: 503 with a flag, never another region.
    regions[1].backend.set_healthy(false);
    eventually("the pinned route answers 503 UH", || async {
        let r = client.get(proxy.url("/eu-data/x")).send().await.unwrap();
        r.status() == 503 && r.headers()["x-nip-response-flags"] == "UH"
    })
    .await;
    for _ in 0..10 {
        let r = client.get(proxy.url("/eu-data/x")).send().await.unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(regions[0].backend.requests(), 0);
    assert_eq!(regions[2].backend.requests(), 0);
    // Other routes keep being served.
    assert_eq!(
        client.get(proxy.url("/")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_pinned_to_a_region_never_leaves_it_and_answers_503_when_it_is_down() {
    let _turn = crate::common::module_turn(module_path!());
    let (regions, proxy) = three_regions_with(
        "tenant: { id: acme, data: { locality: r3 } }",
        ", health_check: { path: /healthz, interval: 200ms, timeout: 1s, unhealthy_threshold: 1 }",
        "",
    )
    .await;
    // Under load, every request of the tenant is answered in r3 — the slowest region,
    // while r1 is local and fastest.
    let load = Load::start(&proxy.url("/"), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(load.stop().await, 0);
    assert!(regions[2].backend.requests() > 5);
    assert_eq!(regions[0].backend.requests(), 0);
    assert_eq!(regions[1].backend.requests(), 0);

    // r3 goes down: 503 UH, and still nothing anywhere else.
    regions[2].backend.set_healthy(false);
    let client = client();
    eventually("the tenant's requests answer 503 UH", || async {
        let r = client.get(proxy.url("/")).send().await.unwrap();
        r.status() == 503 && r.headers()["x-nip-response-flags"] == "UH"
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            client.get(proxy.url("/")).send().await.unwrap().status(),
            503
        );
    }
    assert_eq!(regions[0].backend.requests(), 0);
    assert_eq!(regions[1].backend.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_retries_a_black_holed_region_costs_only_the_tries_it_swallowed() {
    let _turn = crate::common::module_turn(module_path!());
    let (regions, proxy) = three_regions("", "  - service: web\n    timeout: 2s\n").await;
    let clients = 4;
    let load = Load::start(&proxy.url("/"), clients);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady = counts_during(&regions, Duration::from_secs(1)).await;
    assert!(share(&steady, 0) >= 0.9, "steady state {steady:?}");

    // The local region stops answering: each client's try in r1 hangs until its 2 s
    // timeout. A new request 0.3 s later, before any of them failed, goes to r2 — the
    // silence of the hanging tries is the signal, not their timeouts.
    regions[0].link.black_hole(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let r = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "r2");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Once the swallowed tries have timed out, the clients go on in r2.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = counts_during(&regions, Duration::from_secs(1)).await;
    assert!(share(&after, 1) >= 0.9, "traffic is in r2: {after:?}");
    let served: usize = regions.iter().map(|r| r.backend.requests()).sum();
    let failures = load.stop().await;
    // What failed is what was in flight in r1 when it went dark, and at most one
    // exploring try at a time after that.
    assert!(
        failures <= clients + 3,
        "{failures} failed of about {served} (only the swallowed tries may fail)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_probes_keep_idle_regions_predictions_current() {
    let _turn = crate::common::module_turn(module_path!());
    let (regions, proxy) = three_regions(
        ", health_check: { path: /healthz, interval: 200ms, timeout: 2s }",
        "",
    )
    .await;
    let predicted = |clusters: &serde_json::Value, region: &str| {
        clusters["clusters"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["region"] == region)
            .unwrap()["latency_ewma_ms"]
            .as_f64()
            .unwrap()
    };
    // No request at all: the probes alone measure each region's round trip (not the
    // 30 ms an endpoint never measured is assumed to take). A loaded machine can slow a
    // probe for a while (a CI run once missed 15 s), so this waits up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clusters = proxy.admin_json("/clusters").await;
        let (r1, r3) = (predicted(&clusters, "r1"), predicted(&clusters, "r3"));
        if r1 < 20.0 && (80.0..200.0).contains(&r3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "probes did not measure r1 ({r1} ms) and r3 ({r3} ms) within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        regions.iter().map(|r| r.backend.requests()).sum::<usize>(),
        0
    );
    // An idle region slows down: its prediction follows, still without traffic.
    regions[1].link.set_rtt(Duration::from_millis(150));
    eventually("r2's prediction follows its slowdown", || async {
        predicted(&proxy.admin_json("/clusters").await, "r2") >= 140.0
    })
    .await;
}
