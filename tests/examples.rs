//! Every feature example in `examples/` loads and does what its comments say (the gateway
//! basics have their own tests in tests/gateway.rs; the self-healing and multi-region
//! benches and tests build on the same configs).

use crate::common::*;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn every_example_is_a_valid_config() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut yaml = std::fs::read_to_string(&path).unwrap();
        if name == "plugins" {
            yaml = with_built_plugin(&yaml);
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), yaml).unwrap();
        let output = run_nip(
            &["validate", "--file", &file.path().to_string_lossy()],
            None,
        );
        assert!(
            output.status.success(),
            "{name}.yaml: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} examples");
}

fn with_built_plugin(yaml: &str) -> String {
    yaml.replace(
        "filters/examples/target/wasm32-wasip1/release/add_header.wasm",
        &example_plugin("add_header").to_string_lossy(),
    )
}

async fn backend_of(response: reqwest::Response) -> String {
    response.headers()["x-backend"]
        .to_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_picks_the_most_specific_host_then_the_first_matching_route() {
    let _turn = crate::common::module_turn(module_path!());
    let api = Backend::start("api").await;
    let admin = Backend::start("admin").await;
    let web = Backend::start("web").await;
    let proxy = Proxy::start(&example(
        "routing",
        &[
            ("127.0.0.1:8081", api.address),
            ("127.0.0.1:8082", admin.address),
            ("127.0.0.1:8083", web.address),
        ],
    ))
    .await;
    let http = client();
    use reqwest::Method;
    // (method, host, path, x-admin-token?, the backend that answers, why)
    let cases = [
        (
            Method::POST,
            "api.example.com",
            "/v1/orders",
            false,
            "api",
            "a write",
        ),
        (
            Method::PUT,
            "api.example.com",
            "/v1/x",
            false,
            "api",
            "a write",
        ),
        (
            Method::GET,
            "api.example.com",
            "/v1/orders",
            false,
            "web",
            "GET is no write",
        ),
        (
            Method::POST,
            "api.example.com",
            "/v2/orders",
            false,
            "web",
            "not under /v1/",
        ),
        (
            Method::GET,
            "shop.test",
            "/anything",
            true,
            "admin",
            "the header",
        ),
        (
            Method::GET,
            "shop.test",
            "/admin",
            false,
            "admin",
            "exactly /admin",
        ),
        (
            Method::GET,
            "shop.test",
            "/admin/x",
            false,
            "web",
            "not exactly /admin",
        ),
        (
            Method::GET,
            "eu.example.com",
            "/v3/items",
            false,
            "api",
            "versioned",
        ),
        (
            Method::GET,
            "eu.example.com",
            "/x/v3/items",
            false,
            "web",
            "the whole path",
        ),
        (
            Method::GET,
            "example.org",
            "/v3/items",
            false,
            "web",
            "another domain",
        ),
        (
            Method::GET,
            "example.com",
            "/v3/items",
            false,
            "web",
            "* needs a subdomain",
        ),
    ];
    for (method, host, path, admin_token, expected, why) in cases {
        let mut request = http
            .request(method.clone(), proxy.url(path))
            .header("host", host);
        if admin_token {
            request = request.header("x-admin-token", "t");
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{method} {host}{path}");
        assert_eq!(
            backend_of(response).await,
            expected,
            "{method} {host}{path}: {why}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_its_share_and_testers_always_reach_it() {
    let _turn = crate::common::module_turn(module_path!());
    let v1 = Backend::start("shop-v1").await;
    let v2 = Backend::start("shop-v2").await;
    let proxy = Proxy::start(&example(
        "canary",
        &[
            ("127.0.0.1:8081", v1.address),
            ("127.0.0.1:8082", v2.address),
        ],
    ))
    .await;
    // 2,000 requests from 20 clients at once.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let url = proxy.url("/cart");
        clients.push(tokio::spawn(async move {
            let http = client();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..100 {
                let response = http.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                *counts.entry(backend_of(response).await).or_default() += 1;
            }
            counts
        }));
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for each in clients {
        for (backend, n) in each.await.unwrap() {
            *counts.entry(backend).or_default() += n;
        }
    }
    assert_eq!(counts.values().sum::<usize>(), 2000);
    let canary_share = counts.get("shop-v2").copied().unwrap_or(0) as f64 / 2000.0;
    assert!(
        (canary_share - 0.10).abs() <= 0.04,
        "canary share {canary_share:.3} is not 0.10 ± 0.04: {counts:?}"
    );
    proxy
        .wait_for_sample(
            "nip_requests_total",
            &[("route", "shop"), ("cluster", "shop-v2")],
            v2.requests() as f64,
        )
        .await;
    // Testers reach the canary every time; another value of the header is no tester.
    let mut reached: HashMap<&str, HashMap<String, usize>> = HashMap::new();
    for value in ["1", "0"] {
        for _ in 0..20 {
            let response = client()
                .get(proxy.url("/cart"))
                .header("x-canary", value)
                .send()
                .await
                .unwrap();
            let backend = backend_of(response).await;
            *reached
                .entry(value)
                .or_default()
                .entry(backend)
                .or_default() += 1;
        }
    }
    assert_eq!(reached["1"].get("shop-v2"), Some(&20), "{reached:?}");
    assert!(
        reached["0"].contains_key("shop-v1"),
        "x-canary: 0 takes the split: {reached:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_data_stays_in_its_region_even_when_that_means_503() {
    let _turn = crate::common::module_turn(module_path!());
    let eu = Backend::start("eu").await;
    let us = Backend::start("us").await;
    let proxy = Proxy::start(&example(
        "locality",
        &[
            ("127.0.0.1:8081", eu.address),
            ("127.0.0.1:8082", us.address),
        ],
    ))
    .await;
    for _ in 0..10 {
        let response = client().get(proxy.url("/eu-data/1")).send().await.unwrap();
        assert_eq!(backend_of(response).await, "eu");
    }
    eu.set_healthy(false);
    eventually("the eu endpoint is marked down", || async {
        client()
            .get(proxy.url("/eu-data/1"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let pinned = client().get(proxy.url("/eu-data/1")).send().await.unwrap();
    assert_eq!(pinned.status(), 503);
    assert_eq!(pinned.headers()["x-nip-response-flags"], "UH");
    let free = client().get(proxy.url("/profile")).send().await.unwrap();
    assert_eq!(
        backend_of(free).await,
        "us",
        "unpinned routes leave the region"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_runs_a_concurrency_limit_and_takes_priorities_from_trusted_clients() {
    let _turn = crate::common::module_turn(module_path!());
    let search = Backend::start("search").await;
    let proxy = Proxy::start(&example("shedding", &[("127.0.0.1:8081", search.address)])).await;
    let response = client()
        .get(proxy.url("/q"))
        .header("x-nip-priority", "high")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        search.last_header("x-nip-priority").as_deref(),
        Some("high")
    );
    let bad = client()
        .get(proxy.url("/q"))
        .header("x-nip-priority", "urgent")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let limit = sample(
        &proxy.metrics().await,
        "nip_upstream_concurrency_limit",
        &[("cluster", "search")],
    );
    assert!((2.0..=20.0).contains(&limit), "limit {limit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_keeps_traffic_in_the_proxys_region_while_it_is_fast() {
    let _turn = crate::common::module_turn(module_path!());
    let r1 = Backend::start("r1").await;
    let r2 = Backend::start("r2").await;
    let r3 = Backend::start("r3").await;
    r2.set_delay(Duration::from_millis(30));
    r3.set_delay(Duration::from_millis(60));
    let proxy = Proxy::start(&example(
        "multi-region",
        &[
            ("127.0.0.1:8081", r1.address),
            ("127.0.0.1:8082", r2.address),
            ("127.0.0.1:8083", r3.address),
        ],
    ))
    .await;
    let mut local = 0;
    for _ in 0..100 {
        let response = client().get(proxy.url("/me")).send().await.unwrap();
        if backend_of(response).await == "r1" {
            local += 1;
        }
    }
    assert!(local >= 90, "{local} of 100 stayed in r1");
    // r1 stops answering well: traffic moves.
    r1.set_status(503);
    eventually("traffic leaves r1", || async {
        let response = client().get(proxy.url("/me")).send().await.unwrap();
        response.status() == 200 && backend_of(response).await != "r1"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_runs_on_the_routes_that_name_it() {
    let _turn = crate::common::module_turn(module_path!());
    let web = Backend::start("web").await;
    let yaml = with_built_plugin(&example("plugins", &[("127.0.0.1:8081", web.address)]));
    let proxy = Proxy::start(&yaml).await;
    let stamped = client().get(proxy.url("/stamped/a")).send().await.unwrap();
    assert_eq!(stamped.headers()["x-stamped"], "yes");
    let plain = client().get(proxy.url("/plain")).send().await.unwrap();
    assert!(!plain.headers().contains_key("x-stamped"));
}

/// GET `path` on `proxy` with an optional bearer token: its status.
async fn status_of(proxy: &Proxy, path: &str, token: Option<&str>) -> u16 {
    let mut request = client().get(proxy.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_verifies_tokens_passes_claims_and_applies_its_policies() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let api = Backend::start("api").await;
    let issuer_address: std::net::SocketAddr =
        issuer.url.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(&example(
        "auth",
        &[
            ("127.0.0.1:8081", api.address),
            ("127.0.0.1:9000", issuer_address),
        ],
    ))
    .await;
    assert_eq!(status_of(&proxy, "/public/x", None).await, 200);
    assert_eq!(status_of(&proxy, "/orders/1", None).await, 401);
    let alice = issuer.token("sub=alice").await;
    assert_eq!(status_of(&proxy, "/orders/1", Some(&alice)).await, 200);
    assert_eq!(
        api.control
            .last_headers
            .lock()
            .unwrap()
            .get("x-user")
            .cloned(),
        Some("alice".to_string())
    );
    let billing = issuer.token("aud=billing").await;
    assert_eq!(status_of(&proxy, "/orders/1", Some(&billing)).await, 403);
    let admin = issuer.token("roles=admin").await;
    assert_eq!(status_of(&proxy, "/admin/users/1", Some(&admin)).await, 200);
    assert_eq!(status_of(&proxy, "/admin/users/1", Some(&alice)).await, 403);
    // The listener-wide policy: DELETE from outside 10.0.0.0/8 (the test is on 127.0.0.1).
    let delete = client()
        .delete(proxy.url("/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_asks_the_authorization_service_about_each_request() {
    let _turn = crate::common::module_turn(module_path!());
    let api = Backend::start("api").await;
    let authz = Backend::start("authz").await;
    authz.accept_token("letmein");
    let proxy = Proxy::start(&example(
        "ext-authz",
        &[
            ("127.0.0.1:8081", api.address),
            ("127.0.0.1:8090", authz.address),
        ],
    ))
    .await;
    let denied = client().get(proxy.url("/orders")).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.text().await.unwrap(), "bad token\n");
    assert_eq!(status_of(&proxy, "/orders", Some("letmein")).await, 200);
    assert_eq!(
        api.control
            .last_headers
            .lock()
            .unwrap()
            .get("x-user")
            .cloned(),
        Some("user-of-letmein".to_string())
    );
    // The health route asks nobody.
    let asked = authz.requests();
    assert_eq!(status_of(&proxy, "/healthz", None).await, 200);
    assert_eq!(authz.requests(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_per_proxy_per_key_and_for_the_fleet() {
    let _turn = crate::common::module_turn(module_path!());
    let api = Backend::start("api").await;
    let (redis_port, service_port) = (free_port(), free_port());
    let redis = redis_server(redis_port);
    redis.wait_for("Ready to accept connections").await;
    let service: std::net::SocketAddr = ([127, 0, 0, 1], service_port).into();
    let yaml = example(
        "rate-limits",
        &[("127.0.0.1:8081", api.address), ("127.0.0.1:8089", service)],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rate-limits.yaml");
    std::fs::write(&file, yaml.replace("{admin}", "1").replace("{port}", "2")).unwrap();
    let limits = rate_limit_service(&file, redis_port, service_port);
    limits.wait_for("global limits").await;
    let proxy = Proxy::start(&yaml).await;
    // How many of `n` requests passed, and the most a bucket of `size` refilled at `rate`
    // per second could have let through meanwhile.
    let burst = |path: &'static str, n: usize, key: Option<&'static str>| {
        let proxy = &proxy;
        async move {
            let started = std::time::Instant::now();
            let mut passed = 0;
            for _ in 0..n {
                let mut request = client().get(proxy.url(path));
                if let Some(key) = key {
                    request = request.header("x-api-key", key);
                }
                passed += usize::from(request.send().await.unwrap().status() == 200);
            }
            (passed, started.elapsed().as_secs_f64())
        }
    };
    let most = |size: f64, rate: f64, elapsed: f64| (size + rate * elapsed).floor() as usize + 1;
    // Bursts of 10, then 5 per second.
    let (search, took) = burst("/search", 30, None).await;
    assert!(
        (10..=most(10.0, 5.0, took)).contains(&search),
        "{search} of 30 passed /search in {took:.2} s"
    );
    // 100 a minute for each key, bursts of 100.
    let (partner, took) = burst("/partner", 130, Some("k1")).await;
    assert!(
        (100..=most(100.0, 100.0 / 60.0, took)).contains(&partner),
        "{partner} of 130 passed /partner in {took:.2} s"
    );
    assert_eq!(burst("/partner", 5, Some("k2")).await.0, 5, "another key");
    // 20 a second for the fleet, bursts of 10, counted by the rate limit service.
    let (checkout, took) = burst("/checkout", 120, None).await;
    assert!(
        (10..=most(10.0, 20.0, took).min(119)).contains(&checkout),
        "{checkout} of 120 passed /checkout in {took:.2} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_have_their_own_message_rate() {
    let _turn = crate::common::module_turn(module_path!());
    let acme = Backend::start("acme").await;
    let globex = Backend::start("globex").await;
    let status = Backend::start("status").await;
    let proxy = Proxy::start(&example(
        "tenants",
        &[
            ("127.0.0.1:8081", acme.address),
            ("127.0.0.1:8082", globex.address),
            ("127.0.0.1:8083", status.address),
        ],
    ))
    .await;
    let started = std::time::Instant::now();
    let mut passed = 0;
    for _ in 0..40 {
        passed += usize::from(status_of(&proxy, "/acme/x", None).await == 200);
    }
    // 10 a second, bursts of 10.
    let most = 10 + (10.0 * started.elapsed().as_secs_f64()).floor() as usize + 1;
    assert!((10..=most).contains(&passed), "acme: {passed} of 40 passed");
    for _ in 0..40 {
        assert_eq!(status_of(&proxy, "/globex/x", None).await, 200);
    }
    // On the shared route, x-tenant says whose quota a request takes from: acme's is
    // spent (the bucket refills at 10 a second: a burst of 20 outruns it).
    let shared = |tenant: Option<&'static str>| {
        let mut request = client().get(proxy.url("/status"));
        if let Some(tenant) = tenant {
            request = request.header("x-tenant", tenant);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut acme_statuses = Vec::new();
    for _ in 0..20 {
        acme_statuses.push(shared(Some("acme")).await);
    }
    assert!(
        acme_statuses.contains(&429),
        "acme on /status: {acme_statuses:?}"
    );
    for tenant in [Some("globex"), None] {
        assert_eq!(shared(tenant).await, 200, "{tenant:?} on /status");
    }
}
