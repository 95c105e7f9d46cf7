//! Overload: a backend with a fixed capacity, offered three times what it can serve, behind
//! a proxy with adaptive concurrency. High-priority requests must keep succeeding; low
//! priority is shed with 503 and flag `OM`; the proxy's memory stays bounded.

use crate::common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Outcomes of one priority class.
#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    ok: AtomicUsize,
    shed: AtomicUsize,
    other: AtomicUsize,
}

/// Sends `rate` requests per second with `x-nip-priority: priority` for `duration`, open
/// loop (a request is sent on schedule whether or not earlier ones were answered), each
/// given 2 s.
async fn offer(
    url: String,
    priority: &'static str,
    rate: u32,
    duration: Duration,
    tally: Arc<Tally>,
) {
    offer_with(
        url,
        vec![("x-nip-priority", priority.to_string())],
        rate,
        duration,
        tally,
    )
    .await
}

/// [`offer`] with these headers on every request.
async fn offer_with(
    url: String,
    headers: Vec<(&'static str, String)>,
    rate: u32,
    duration: Duration,
    tally: Arc<Tally>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (duration.as_secs_f64() * f64::from(rate)) as usize;
    let mut requests = Vec::with_capacity(total);
    for _ in 0..total {
        ticker.tick().await;
        let (client, url, tally) = (client.clone(), url.clone(), Arc::clone(&tally));
        let headers = headers.clone();
        requests.push(tokio::spawn(async move {
            tally.sent.fetch_add(1, Ordering::Relaxed);
            let mut request = client.get(&url);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            match request.send().await {
                Ok(r) if r.status() == 200 => tally.ok.fetch_add(1, Ordering::Relaxed),
                Ok(r)
                    if r.status() == 503
                        && r.headers()
                            .get("x-nip-response-flags")
                            .is_some_and(|f| f == "OM") =>
                {
                    tally.shed.fetch_add(1, Ordering::Relaxed)
                }
                _ => tally.other.fetch_add(1, Ordering::Relaxed),
            };
        }));
    }
    for request in requests {
        let _ = request.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_three_times_capacity_high_priority_succeeds_and_low_priority_is_shed() {
    let _turn = crate::common::module_turn(module_path!());
    // 4 workers × 25 ms: the backend serves 160 requests per second.
    let backend = Backend::start("web").await;
    backend.set_workers(4);
    backend.set_delay(Duration::from_millis(25));
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
services:
  web:
    endpoints: ["{}"]
    adaptive_concurrency: {{}}
routes:
  - service: web
"#,
        backend.address
    ))
    .await;
    let url = proxy.url("/");

    // Light traffic first: the controller measures the latency without load.
    let warm = Arc::new(Tally::default());
    offer(
        url.clone(),
        "normal",
        60,
        Duration::from_secs(2),
        Arc::clone(&warm),
    )
    .await;
    let clusters = proxy.admin_json("/clusters").await;
    let adaptive = &clusters["clusters"][0]["adaptive_concurrency"];
    assert!(
        adaptive["min_rtt_ms"].as_f64().is_some_and(|ms| ms >= 20.0),
        "min RTT measured: {adaptive}"
    );
    let rss_before = proxy.rss_kb();

    // 480 requests per second: 3 × capacity. 10 % of it is high priority (half of what
    // the backend can serve), the rest low.
    let (high, low) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let duration = Duration::from_secs(10);
    tokio::join!(
        offer(url.clone(), "high", 48, duration, Arc::clone(&high)),
        offer(url.clone(), "low", 432, duration, Arc::clone(&low)),
    );
    let count = |t: &Tally| {
        (
            t.sent.load(Ordering::Relaxed),
            t.ok.load(Ordering::Relaxed),
            t.shed.load(Ordering::Relaxed),
            t.other.load(Ordering::Relaxed),
        )
    };
    let (high_sent, high_ok, _, _) = count(&high);
    let (low_sent, low_ok, low_shed, low_other) = count(&low);
    eprintln!(
        "high {:?} low {:?} /clusters {}",
        count(&high),
        count(&low),
        proxy.admin_json("/clusters").await["clusters"][0]["adaptive_concurrency"]
    );
    assert!(
        high_ok as f64 >= 0.99 * high_sent as f64,
        "high priority: {high_ok} of {high_sent} succeeded"
    );
    assert!(
        low_shed as f64 >= 0.3 * low_sent as f64,
        "low priority is shed: {low_shed} of {low_sent}"
    );
    assert!(low_ok > 0, "low priority gets what capacity is left");
    assert!(
        low_other as f64 <= 0.01 * low_sent as f64,
        "low priority is either served or shed with 503 OM, not timed out: {low_other} of {low_sent}"
    );
    // The proxy held no queue: its memory did not grow with the backlog.
    let rss_after = proxy.rss_kb();
    assert!(
        rss_after < rss_before + 48 * 1024,
        "proxy RSS grew from {rss_before} kB to {rss_after} kB"
    );

    // Metrics: shed requests by priority, and the limit.
    let metrics = proxy.metrics().await;
    let shed = |priority: &str| {
        sample(
            &metrics,
            "nip_upstream_rq_shed_total",
            &[("cluster", "web"), ("priority", priority)],
        )
    };
    assert_eq!(shed("low") as usize, low_shed);
    assert!(shed("high") <= 0.01 * high_sent as f64);
    assert!(
        sample(
            &metrics,
            "nip_upstream_concurrency_limit",
            &[("cluster", "web")]
        ) >= 3.0
    );
    assert!(sample(&metrics, "nip_response_flags_total", &[("flag", "OM")]) >= low_shed as f64);
}

#[tokio::test]
async fn a_priority_that_is_not_low_normal_or_high_is_refused_with_400() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - service: web
"#,
        backend.address
    ))
    .await;
    let response = client()
        .get(proxy.url("/"))
        .header("x-nip-priority", "urgent")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("x-nip-priority"));
    assert_eq!(backend.requests(), 0);
    let response = client()
        .get(proxy.url("/"))
        .header("x-nip-priority", "HIGH")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_priority_comes_from_a_verified_claim_and_clients_cannot_promote_themselves() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let backend = Backend::start("web").await;
    backend.set_workers(4);
    backend.set_delay(Duration::from_millis(25));
    // The listener trusts x-nip-priority, but the provider writes it from the claim, so a
    // client's own copy never counts.
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
auth:
  jwt_providers:
    idp: {{ issuer: {issuer}, jwks_uri: {issuer}/jwks.json, claim_to_headers: {{ x-nip-priority: tier }} }}
services:
  web:
    endpoints: ["{backend}"]
    adaptive_concurrency: {{}}
routes:
  - {{ service: web, auth: {{ jwt: idp }} }}
"#,
        issuer = issuer.url,
        backend = backend.address,
    ))
    .await;
    let url = proxy.url("/");
    let gold = issuer.token("sub=gold&tier=high").await;
    let free = issuer.token("sub=free&tier=low").await;
    let bearer = |token: &str| ("authorization", format!("Bearer {token}"));
    let warm = Arc::new(Tally::default());
    offer_with(
        url.clone(),
        vec![bearer(&gold)],
        60,
        Duration::from_secs(2),
        warm,
    )
    .await;
    let (high, low) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let duration = Duration::from_secs(8);
    tokio::join!(
        offer_with(
            url.clone(),
            vec![bearer(&gold)],
            48,
            duration,
            Arc::clone(&high)
        ),
        offer_with(
            url.clone(),
            vec![bearer(&free), ("x-nip-priority", "high".to_string())],
            432,
            duration,
            Arc::clone(&low)
        ),
    );
    let (high_sent, high_ok) = (
        high.sent.load(Ordering::Relaxed),
        high.ok.load(Ordering::Relaxed),
    );
    let (low_sent, low_shed) = (
        low.sent.load(Ordering::Relaxed),
        low.shed.load(Ordering::Relaxed),
    );
    assert!(
        high_ok as f64 >= 0.99 * high_sent as f64,
        "the high tier: {high_ok} of {high_sent} succeeded"
    );
    assert!(
        low_shed as f64 >= 0.3 * low_sent as f64,
        "the low tier is shed despite its own x-nip-priority: high: {low_shed} of {low_sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_priority_is_the_proxys_to_set() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    backend.set_workers(4);
    backend.set_delay(Duration::from_millis(25));
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
tenants:
  gold: {{ priority: high }}
  free: {{ priority: low }}
services:
  web:
    endpoints: ["{}"]
    adaptive_concurrency: {{}}
routes:
  - {{ match: {{ path_prefix: /gold }}, service: web, tenant: gold }}
  - {{ match: {{ path_prefix: /free }}, service: web, tenant: free }}
"#,
        backend.address
    ))
    .await;
    let warm = Arc::new(Tally::default());
    offer(
        proxy.url("/gold"),
        "normal",
        60,
        Duration::from_secs(2),
        warm,
    )
    .await;
    let (gold, free) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let duration = Duration::from_secs(8);
    // The free tenant's clients claim high priority; the gold tenant's ask for low.
    tokio::join!(
        offer(proxy.url("/gold"), "low", 48, duration, Arc::clone(&gold)),
        offer(proxy.url("/free"), "high", 432, duration, Arc::clone(&free)),
    );
    let (gold_sent, gold_ok) = (
        gold.sent.load(Ordering::Relaxed),
        gold.ok.load(Ordering::Relaxed),
    );
    let (free_sent, free_shed) = (
        free.sent.load(Ordering::Relaxed),
        free.shed.load(Ordering::Relaxed),
    );
    assert!(
        gold_ok as f64 >= 0.99 * gold_sent as f64,
        "the gold tenant: {gold_ok} of {gold_sent} succeeded"
    );
    assert!(
        free_shed as f64 >= 0.3 * free_sent as f64,
        "the free tenant is shed: {free_shed} of {free_sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_named_by_a_verified_claim_gets_its_priority_on_a_shared_route() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let backend = Backend::start("web").await;
    backend.set_workers(4);
    backend.set_delay(Duration::from_millis(25));
    // One route for everyone; the token's org claim names the tenant, whose priority the
    // proxy sets whatever the client sends.
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
auth:
  jwt_providers:
    idp: {{ issuer: {issuer}, jwks_uri: {issuer}/jwks.json }}
tenants:
  gold: {{ priority: high }}
  free: {{ priority: low }}
tenant_key: {{ claim: org.id }}
services:
  web:
    endpoints: ["{backend}"]
    adaptive_concurrency: {{}}
routes:
  - {{ service: web, auth: {{ jwt: idp }} }}
"#,
        issuer = issuer.url,
        backend = backend.address,
    ))
    .await;
    let url = proxy.url("/");
    let gold = issuer.token("sub=g&org=gold").await;
    let free = issuer.token("sub=f&org=free").await;
    let bearer = |token: &str| ("authorization", format!("Bearer {token}"));
    let warm = Arc::new(Tally::default());
    offer_with(
        url.clone(),
        vec![bearer(&gold)],
        60,
        Duration::from_secs(2),
        Arc::clone(&warm),
    )
    .await;
    let (high, low) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let duration = Duration::from_secs(8);
    tokio::join!(
        offer_with(
            url.clone(),
            vec![bearer(&gold), ("x-nip-priority", "low".to_string())],
            48,
            duration,
            Arc::clone(&high)
        ),
        offer_with(
            url.clone(),
            vec![bearer(&free), ("x-nip-priority", "high".to_string())],
            432,
            duration,
            Arc::clone(&low)
        ),
    );
    let (gold_sent, gold_ok) = (
        high.sent.load(Ordering::Relaxed),
        high.ok.load(Ordering::Relaxed),
    );
    let (free_sent, free_shed) = (
        low.sent.load(Ordering::Relaxed),
        low.shed.load(Ordering::Relaxed),
    );
    assert!(
        gold_ok as f64 >= 0.99 * gold_sent as f64,
        "the gold tenant: {gold_ok} of {gold_sent} succeeded"
    );
    assert!(
        free_shed as f64 >= 0.3 * free_sent as f64,
        "the free tenant is shed despite its own x-nip-priority: high: {free_shed} of {free_sent}"
    );
    proxy
        .wait_for_sample(
            "nip_tenant_requests_total",
            &[("tenant", "gold"), ("status_class", "2xx")],
            (gold_ok + warm.ok.load(Ordering::Relaxed)) as f64,
        )
        .await;
}
