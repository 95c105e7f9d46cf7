//! End-to-end tests of the data plane: a real `nip proxy` process in front of real HTTP
//! backends on 127.0.0.1, driven by a real HTTP client.

use crate::common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn get(client: &reqwest::Client, url: &str) -> reqwest::Response {
    client
        .get(url)
        .send()
        .await
        .expect("request reaches the proxy")
}

/// The retries example with its catalog service on `first` and `second`, with or without
/// the catalog route's retries.
fn catalog(first: std::net::SocketAddr, second: std::net::SocketAddr, retries: bool) -> String {
    let yaml = example(
        "retries",
        &[
            ("127.0.0.1:8084", first),
            ("127.0.0.1:8085", second),
            ("127.0.0.1:8081", dead_address()),
            ("127.0.0.1:8082", dead_address()),
            ("127.0.0.1:8083", dead_address()),
        ],
    );
    let with = "    retries: { on: [connect-failure, 5xx], max: 2 }\n";
    assert!(yaml.contains(with));
    if retries {
        yaml
    } else {
        yaml.replace(with, "")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_on_connect_failure_hide_a_dead_endpoint() {
    let _turn = crate::common::module_turn(module_path!());
    let live = Backend::start("live").await;
    let dead = dead_address();
    let proxy = Proxy::start(&catalog(dead, live.address, true)).await;
    let client = client();
    for i in 0..200 {
        let response = get(&client, &proxy.url(&format!("/catalog/{i}"))).await;
        assert_eq!(response.status(), 200, "request {i}");
    }
    assert_eq!(live.requests(), 200);
    let metrics = proxy.metrics().await;
    for counter in [
        "nip_upstream_rq_retry_total",
        "nip_upstream_cx_connect_fail_total",
    ] {
        assert!(sample(&metrics, counter, &[("cluster", "catalog")]) >= 50.0);
    }

    // Without retries the same dead endpoint shows up as 503 UF: the retry is what saved us.
    let proxy = Proxy::start(&catalog(dead, live.address, false)).await;
    let mut unavailable = 0;
    for i in 0..20 {
        let response = get(&client, &proxy.url(&format!("/catalog/{i}"))).await;
        if response.status() == 503 {
            assert_eq!(response.headers()["x-nip-response-flags"], "UF");
            unavailable += 1;
        }
    }
    assert_eq!(
        unavailable, 10,
        "round robin sends every other request to the dead endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_on_5xx_go_to_another_endpoint() {
    let _turn = crate::common::module_turn(module_path!());
    let broken = Backend::start("broken").await;
    broken.set_status(503);
    let good = Backend::start("good").await;
    let proxy = Proxy::start(&catalog(broken.address, good.address, true)).await;
    let client = client();
    for i in 0..40 {
        let response = get(&client, &proxy.url(&format!("/catalog/{i}"))).await;
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(response.headers()["x-backend"], "good");
    }
    // Round robin alternates, so after the first request every request meets `broken` first.
    assert!(broken.requests() >= 39, "the broken endpoint was tried");
    assert_eq!(good.last_header("x-nip-retry-count").as_deref(), Some("1"));
    let metrics = proxy.metrics().await;
    assert!(
        sample(
            &metrics,
            "nip_upstream_rq_retry_total",
            &[("cluster", "catalog")]
        ) >= 39.0
    );
    assert_eq!(
        sample(
            &metrics,
            "nip_requests_total",
            &[("route", "catalog"), ("status_class", "5xx")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_checks_take_a_failing_endpoint_out_and_bring_it_back() {
    let _turn = crate::common::module_turn(module_path!());
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  svc:
    endpoints: ["{}", "{}"]
    health_check: {{ path: /healthz, interval: 100ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 2 }}
routes:
  - service: svc
"#,
        a.address, b.address
    ))
    .await;
    let client = client();
    let healthy = |proxy: &Proxy, address: std::net::SocketAddr| {
        let url = proxy.admin_url("/clusters");
        let client = client.clone();
        async move {
            let json: serde_json::Value =
                client.get(url).send().await.unwrap().json().await.unwrap();
            json["clusters"][0]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["address"] == address.to_string())
                .map(|e| e["healthy"].as_bool().unwrap())
                .unwrap()
        }
    };
    b.set_healthy(false);
    eventually("b is marked unhealthy", || async {
        !healthy(&proxy, b.address).await
    })
    .await;
    let before = b.requests();
    for _ in 0..30 {
        assert_eq!(get(&client, &proxy.url("/")).await.status(), 200);
    }
    assert_eq!(b.requests(), before, "an unhealthy endpoint got traffic");
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "nip_endpoint_healthy",
            &[("endpoint", &b.address.to_string())]
        ),
        0.0
    );
    assert!(
        sample(
            &metrics,
            "nip_health_checks_total",
            &[("result", "failure")]
        ) >= 2.0
    );

    // Nothing healthy: 503 with the UH flag.
    a.set_healthy(false);
    eventually("a is marked unhealthy", || async {
        !healthy(&proxy, a.address).await
    })
    .await;
    let response = get(&client, &proxy.url("/")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-nip-response-flags"], "UH");

    a.set_healthy(true);
    b.set_healthy(true);
    eventually("b is back", || async { healthy(&proxy, b.address).await }).await;
    eventually("a is back", || async { healthy(&proxy, a.address).await }).await;
    let before = b.requests();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.status(), 200);
    }
    assert!(
        b.requests() > before,
        "a recovered endpoint takes traffic again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_and_http1_share_a_port_and_upstream_http2_works() {
    let _turn = crate::common::module_turn(module_path!());
    let h1 = Backend::start("h1").await;
    let h2 = Backend::start("h2").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  h1: {{ endpoints: ["{}"] }}
  h2: {{ endpoints: ["{}"], protocol: http2 }}
routes:
  - match: {{ path_prefix: /grpc }}
    service: h2
  - service: h1
"#,
        h1.address, h2.address
    ))
    .await;
    let h2c_client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = get(&h2c_client, &proxy.url("/")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let response = get(&client(), &proxy.url("/")).await;
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.status(), 200);
    // Upstream HTTP/2 (h2c prior knowledge) where the service says so.
    let response = get(&client(), &proxy.url("/grpc/x")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(*h2.control.last_version.lock().unwrap(), "HTTP/2.0");
    assert_eq!(*h1.control.last_version.lock().unwrap(), "HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_offers_http2_by_alpn_and_http1_too() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("tls-backend").await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway:
  address: "127.0.0.1:{{port}}"
  tls: {{ enabled: true, cert_file: "{}", key_file: "{}" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - service: web
"#,
        cert_path.display(),
        key_path.display(),
        backend.address
    ))
    .await;
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let url = format!("https://localhost:{}/secure", proxy.port);
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(root.clone())
        .build()
        .unwrap();
    let response = get(&h2, &url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN picked h2"
    );
    assert_eq!(
        backend.last_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    let h1 = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(root)
        .http1_only()
        .build()
        .unwrap();
    let response = get(&h1, &url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_id_forwarding_headers_and_traceparent() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("echo").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - service: web
"#,
        backend.address
    ))
    .await;
    let client = client();
    let response = get(&client, &proxy.url("/a")).await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 36);
    assert_eq!(backend.last_header("x-request-id"), Some(generated));
    assert_eq!(
        backend.last_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        backend.last_header("x-forwarded-proto").as_deref(),
        Some("http")
    );

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = client
        .get(proxy.url("/b"))
        .header("x-request-id", "given-id")
        .header("x-forwarded-for", "203.0.113.7")
        .header("traceparent", traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "given-id");
    assert_eq!(
        backend.last_header("x-request-id").as_deref(),
        Some("given-id")
    );
    assert_eq!(
        backend.last_header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(
        backend.last_header("traceparent").as_deref(),
        Some(traceparent)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_have_envoy_statuses_and_flags() {
    let _turn = crate::common::module_turn(module_path!());
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_secs(3));
    let reset = resetting_backend().await;
    let dead = dead_address();
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  empty: {{}}
  slow: {{ endpoints: ["{}"] }}
  reset: {{ endpoints: ["{reset}"] }}
  dead: {{ endpoints: ["{dead}"] }}
routes:
  - {{ name: empty, match: {{ path_prefix: /empty }}, service: empty }}
  - {{ name: slow, match: {{ path_prefix: /slow }}, service: slow, timeout: 300ms }}
  - {{ name: reset, match: {{ path_prefix: /reset }}, service: reset }}
  - {{ name: dead, match: {{ path_prefix: /dead }}, service: dead }}
"#,
        slow.address
    ))
    .await;
    let client = client();
    for (path, status, flag) in [
        ("/nothing-here", 404, "NR"),
        ("/empty", 503, "UH"),
        ("/slow", 504, "UT"),
        ("/reset", 502, "UR"),
        ("/dead", 503, "UF"),
    ] {
        let started = std::time::Instant::now();
        let response = get(&client, &proxy.url(path)).await;
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(response.headers()["x-nip-response-flags"], flag, "{path}");
        assert!(response.headers().contains_key("x-request-id"), "{path}");
        if path == "/slow" {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "timeout honoured"
            );
        }
    }
    for flag in ["NR", "UH", "UT", "UR", "UF"] {
        proxy
            .wait_for_sample("nip_response_flags_total", &[("flag", flag)], 1.0)
            .await;
    }
    proxy
        .wait_for_sample(
            "nip_requests_total",
            &[("route", ""), ("status_class", "4xx")],
            1.0,
        )
        .await;
    proxy
        .wait_for_sample(
            "nip_requests_total",
            &[("route", "slow"), ("status_class", "5xx")],
            1.0,
        )
        .await;
}

/// Checks every line of a Prometheus text exposition.
fn assert_prometheus_text(text: &str) {
    let sample_line = regex::Regex::new(
        r#"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? [-+]?([0-9.]+([eE][-+]?[0-9]+)?|NaN|\+Inf|-Inf)$"#,
    )
    .unwrap();
    let mut types = 0;
    for line in text.lines() {
        if line.is_empty() || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let kind = rest.split_whitespace().nth(1).unwrap();
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "info",
                    "unknown",
                    "summary"
                ]
                .contains(&kind),
                "{line}"
            );
            types += 1;
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(
            sample_line.is_match(line),
            "not a Prometheus sample: {line:?}"
        );
    }
    assert!(types >= 10, "expected the metric families to be declared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_as_prometheus_text_and_count_what_was_sent() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("m").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  svc: {{ endpoints: ["{}"] }}
routes:
  - {{ name: ok, match: {{ path_prefix: /ok }}, service: svc }}
  - {{ name: teapot, match: {{ path_prefix: /teapot }}, service: svc }}
"#,
        backend.address
    ))
    .await;
    let client = client();
    for _ in 0..37 {
        assert_eq!(get(&client, &proxy.url("/ok")).await.status(), 200);
    }
    backend.set_status(418);
    for _ in 0..5 {
        assert_eq!(get(&client, &proxy.url("/teapot")).await.status(), 418);
    }
    proxy
        .wait_for_sample(
            "nip_requests_total",
            &[("route", "teapot"), ("status_class", "4xx")],
            5.0,
        )
        .await;
    let text = proxy.metrics().await;
    assert_prometheus_text(&text);
    let count = |route, class| {
        sample(
            &text,
            "nip_requests_total",
            &[
                ("route", route),
                ("cluster", "svc"),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(count("ok", "2xx"), 37.0);
    assert_eq!(count("teapot", "4xx"), 5.0);
    assert_eq!(count("ok", "5xx"), 0.0);
    assert_eq!(
        sample(
            &text,
            "nip_request_duration_seconds_count",
            &[("route", "ok")]
        ),
        37.0
    );
    assert!(sample(&text, "nip_upstream_cx_total", &[("cluster", "svc")]) >= 1.0);
    // The pooled keep-alive connection to the backend is still open.
    assert!(sample(&text, "nip_upstream_cx_active", &[("cluster", "svc")]) >= 1.0);
    assert_eq!(sample(&text, "nip_config_reloads_total", &[]), 1.0);
    assert_eq!(sample(&text, "nip_config_reload_failures_total", &[]), 0.0);
    let version = proxy.version().await;
    assert_eq!(
        sample(&text, "nip_config_info", &[("version", &version)]),
        1.0
    );
    assert_eq!(
        sample(&text, "nip_endpoint_healthy", &[("cluster", "svc")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_config_at_start_exits_2_naming_the_field() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "services:\n  a: { endpoints: [\"127.0.0.1:1\"] }\nroutes:\n  - service: a\n  - service: a\n  - match: { path_regex: \"([a-z\" }\n    service: a\n",
    )
    .unwrap();
    for args in [&["proxy", "--config"][..], &["validate", "-f"][..]] {
        let output = run_nip(args, Some(&path));
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("routes[2].match.path_regex: invalid regex"),
            "{args:?}: {stderr}"
        );
    }
    std::fs::write(&path, "api_gateway:\n  adress: \":8080\"\n").unwrap();
    let output = run_nip(&["proxy", "--config"], Some(&path));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("api_gateway.adress: unknown field"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_reload_keeps_the_old_config_serving() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let good = format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - service: web
"#,
        backend.address
    );
    let proxy = Proxy::start(&good).await;
    let version = proxy.version().await;
    proxy.rewrite_config(&good.replace("service: web", "service: nowhere"));
    proxy.signal("HUP");
    eventually("the reload failure is counted", || async {
        sample(
            &proxy.metrics().await,
            "nip_config_reload_failures_total",
            &[],
        ) >= 1.0
    })
    .await;
    let dump = proxy.admin_json("/config_dump").await;
    assert_eq!(dump["version_info"], version.as_str());
    let error = dump["last_reload_error"].as_str().unwrap();
    assert!(
        error.contains("routes[0].service: no service named \"nowhere\""),
        "{error}"
    );
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.status(), 200);
    }
    assert!(proxy.log().contains("config reload refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_drops_no_request() {
    let _turn = crate::common::module_turn(module_path!());
    let blue = Backend::start("blue").await;
    let green = Backend::start("green").await;
    let config = |service: &str| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  blue: {{ endpoints: ["{}"] }}
  green: {{ endpoints: ["{}"] }}
routes:
  - name: main
    service: {service}
"#,
            blue.address, green.address
        )
    };
    let proxy = Proxy::start(&config("blue")).await;
    let load = SteadyLoad::start(&proxy.url("/"), 8);
    let mut version = proxy.version().await;
    // Three swaps: by file watch, by SIGHUP, and back by file watch.
    for (i, service) in ["green", "blue", "green"].iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.rewrite_config(&config(service));
        if i == 1 {
            proxy.signal("HUP");
        }
        version = proxy.wait_version_change(&version).await;
    }
    let green_before = green.requests();
    eventually("traffic moved to green", || async {
        green.requests() > green_before + 20
    })
    .await;
    let (sent, failures) = load.stop().await;
    assert!(sent > 200, "the load was real");
    assert_eq!(failures, 0, "requests failed during reloads");
    assert!(blue.requests() > 0 && green.requests() > 0);
    let metrics = proxy.metrics().await;
    assert_eq!(sample(&metrics, "nip_config_reloads_total", &[]), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("slow").await;
    backend.set_delay(Duration::from_millis(1500));
    let mut proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - service: web
"#,
        backend.address
    ))
    .await;
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    eventually("the request reached the backend", || async {
        backend.requests() == 1
    })
    .await;
    proxy.signal("TERM");
    let status = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(status, 200);
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(10)));
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .is_err(),
        "the listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_takes_over_the_listening_socket_and_no_request_fails() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let mut old = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - service: web
"#,
        backend.address
    ))
    .await;
    let load = SteadyLoad::start(&old.url("/"), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The new process waits for the old one's sockets on the upgrade socket.
    let new = old.taking_over();
    let socket = std::env::temp_dir().join(format!("nip-upgrade-{}.sock", old.admin_port));
    eventually("the new proxy waits for the sockets", || async {
        socket.exists()
            && new
                .log()
                .contains("waiting for the running proxy's sockets")
    })
    .await;
    old.signal("QUIT");
    // The new one gets the sockets and the admin port; the old one finishes and exits.
    new.wait_ready().await;
    let exit = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(40)));
    assert!(
        exit.success(),
        "the old proxy exits cleanly: {exit:?}\n{}",
        old.log()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first_failure = Arc::clone(&load.first_failure);
    let (sent, failed) = load.stop().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {sent} requests failed across the upgrade, first: {:?}",
        first_failure.lock().unwrap()
    );
    assert!(sent > 100, "{sent} requests");
    let response = client().get(new.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        new.log().contains("nip proxy starting"),
        "the new process serves: {}",
        new.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_the_listener_keeps_the_bound_port_serving_until_restart() {
    let _turn = crate::common::module_turn(module_path!());
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let config = |backend: &Backend, port: &str| {
        format!(
            "admin: {{ address: \"127.0.0.1:{{admin}}\" }}\napi_gateway: {{ address: \"127.0.0.1:{port}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\nroutes:\n  - service: web\n",
            backend.address
        )
    };
    let proxy = Proxy::start(&config(&a, "{port}")).await;
    let version = proxy.version().await;
    // The new config names another port (and another backend): the bound socket keeps
    // serving, with the new routes, and the log says the move waits for a restart.
    proxy.rewrite_config(&config(&b, &free_port().to_string()));
    proxy.wait_version_change(&version).await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "b");
    assert!(
        proxy
            .log()
            .contains("listener addresses or TLS settings changed"),
        "{}",
        proxy.log()
    );
}

/// A TCP server that echoes what it reads.
async fn echo_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_tunnels_to_its_routes_service_and_other_requests_route_as_before() {
    let _turn = crate::common::module_turn(module_path!());
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("web").await;
    let echo = echo_server().await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  db: {{ endpoints: ["{echo}"] }}
  web: {{ endpoints: ["{}"] }}
routes:
  - {{ name: tunnel, match: {{ connect: true, host: db.internal }}, service: db }}
  - {{ service: web }}
"#,
        backend.address
    ))
    .await;
    let exchange = |request: &'static str| {
        let port = proxy.port;
        async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = vec![0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
                .await
                .expect("an answer")
                .unwrap();
            answer.truncate(n);
            (stream, String::from_utf8_lossy(&answer).to_string())
        }
    };
    // A CONNECT to the route's host: 200, then the bytes go to the service and back.
    let (mut tunnel, answer) =
        exchange("CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n").await;
    assert_eq!(answer, "HTTP/1.1 200 Connection Established\r\n\r\n");
    tunnel.write_all(b"through the tunnel").await.unwrap();
    let mut echoed = [0u8; 18];
    tunnel.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"through the tunnel");
    // A host no CONNECT route names: 404 and closed.
    let (_, answer) =
        exchange("CONNECT elsewhere.internal:22 HTTP/1.1\r\nHost: elsewhere.internal:22\r\n\r\n")
            .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // Other requests route as before, and a CONNECT may follow one on the same connection.
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-backend"], "web");
    let (mut keep_alive, answer) = exchange("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    keep_alive
        .write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal\r\n\r\nearly bytes")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("early bytes") {
        let n = tokio::time::timeout(Duration::from_secs(5), keep_alive.read(&mut buf))
            .await
            .expect("the tunnel answers")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200 Connection Established"));
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "nip_requests_total",
            &[("route", "tunnel"), ("status_class", "2xx")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_where_no_route_takes_it() {
    let _turn = crate::common::module_turn(module_path!());
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&format!(
        "admin: {{ address: \"127.0.0.1:{{admin}}\" }}\napi_gateway: {{ address: \"127.0.0.1:{{port}}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\nroutes:\n  - service: web\n",
        backend.address
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    stream
        .write_all(b"CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(backend.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_local_rate_limit_answers_429_past_its_bucket_and_refills() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let config = |other: &str| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - {{ name: limited, match: {{ path_prefix: /limited }}, service: web, rate_limit: {{ requests: 5, per: 10s }} }}
  - {{ name: {other}, service: web }}
"#,
            backend.address
        )
    };
    let proxy = Proxy::start(&config("free")).await;
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..8 {
        let response = client().get(proxy.url("/limited")).send().await.unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            refused.get_or_insert(response);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let refused = refused.unwrap();
    assert_eq!(refused.headers()["x-ratelimit-limit"], "5");
    assert_eq!(refused.headers()["x-ratelimit-remaining"], "0");
    let retry = |response: &reqwest::Response| -> u64 {
        response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        (1..=2).contains(&retry(&refused)),
        "retry-after {}: a token each 2 s",
        retry(&refused)
    );
    assert_eq!(refused.text().await.unwrap(), "local_rate_limited");
    // Another route is not limited by this one's bucket.
    for _ in 0..10 {
        let response = client().get(proxy.url("/free")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    proxy
        .wait_for_sample("nip_response_flags_total", &[("flag", "RL")], 3.0)
        .await;
    // A reload that keeps the route's limit keeps its count.
    let version = proxy.version().await;
    proxy.rewrite_config(&config("renamed"));
    proxy.wait_version_change(&version).await;
    let response = client().get(proxy.url("/limited")).send().await.unwrap();
    assert_eq!(response.status(), 429, "the bucket survived the reload");
    // A token comes back at the fill rate (5 per 10 s: one each 2 s).
    tokio::time::sleep(Duration::from_secs(retry(&response)) + Duration::from_millis(100)).await;
    let response = client().get(proxy.url("/limited")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_log_writes_one_json_line_per_request() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway:
  address: "127.0.0.1:{{port}}"
  access_log: {{ enabled: true, format: json, path: "{{dir}}/access.log" }}
services:
  web: {{ endpoints: ["{}"] }}
routes:
  - name: main
    match: {{ path_prefix: /app }}
    service: web
"#,
        backend.address
    ))
    .await;
    let client = client();
    assert_eq!(get(&client, &proxy.url("/app/1?q=2")).await.status(), 200);
    assert_eq!(get(&client, &proxy.url("/other")).await.status(), 404);
    let path = proxy.dir.path().join("access.log");
    let mut lines = Vec::new();
    eventually("two access log lines", || {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        let done = lines.len() >= 2;
        async move { done }
    })
    .await;
    assert_eq!(lines.len(), 2);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["path"], "/app/1?q=2");
    assert_eq!(first["response_code"], 200);
    assert_eq!(first["route_name"], "main");
    assert_eq!(first["upstream_cluster"], "web");
    assert_eq!(first["upstream_host"], backend.address.to_string());
    assert_eq!(first["request_id"].as_str().unwrap().len(), 36);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["response_code"], 404);
    assert_eq!(second["response_flags"], "NR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_latency_sends_traffic_where_it_is_answered_fastest_and_follows_a_slowdown() {
    let _turn = crate::common::module_turn(module_path!());
    let fast = Backend::start("fast").await;
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_millis(40));
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}", "{}"], lb: latency }}
routes:
  - service: web
"#,
        fast.address, slow.address
    ))
    .await;
    let client = client();
    let url = proxy.url("/");
    let share = |fast_before: usize, slow_before: usize| {
        let fast_now = fast.requests() - fast_before;
        let slow_now = slow.requests() - slow_before;
        fast_now as f64 / (fast_now + slow_now) as f64
    };
    for _ in 0..100 {
        assert_eq!(get(&client, &url).await.status(), 200);
    }
    assert!(share(0, 0) >= 0.9, "fast share {:.2}", share(0, 0));

    // The fast one slows down: traffic follows at once (a peak is believed immediately).
    // (200 ms against 40: the gap holds even when other tests load the machine.)
    fast.set_delay(Duration::from_millis(200));
    let (fast_before, slow_before) = (fast.requests(), slow.requests());
    for _ in 0..50 {
        assert_eq!(get(&client, &url).await.status(), 200);
    }
    assert!(
        share(fast_before, slow_before) <= 0.1,
        "fast share after its slowdown {:.2}",
        share(fast_before, slow_before)
    );

    // /clusters shows why: each endpoint's latency estimate.
    let clusters = proxy.admin_json("/clusters").await;
    let endpoints = clusters["clusters"][0]["endpoints"].as_array().unwrap();
    assert_eq!(clusters["clusters"][0]["lb_policy"], "latency");
    let estimate = |address: std::net::SocketAddr| {
        endpoints
            .iter()
            .find(|e| e["address"] == address.to_string())
            .unwrap()["latency_ewma_ms"]
            .as_f64()
            .unwrap()
    };
    assert!(estimate(fast.address) >= 200.0, "{endpoints:?}");
    assert!(
        (40.0..200.0).contains(&estimate(slow.address)),
        "{endpoints:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_an_endpoint_that_keeps_failing() {
    let _turn = crate::common::module_turn(module_path!());
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.set_status(500);
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web:
    endpoints: ["{}", "{}"]
    outlier_detection: {{ consecutive_5xx: 3, base_ejection_time: 30s }}
routes:
  - service: web
"#,
        good.address, bad.address
    ))
    .await;
    let client = client();
    let url = proxy.url("/");
    let mut failed = 0;
    for _ in 0..40 {
        if get(&client, &url).await.status() != 200 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 3,
        "three failures in a row eject it; nothing fails after"
    );
    assert_eq!(bad.requests(), 3);
    let clusters = proxy.admin_json("/clusters").await;
    let bad_endpoint = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == bad.address.to_string())
        .unwrap()
        .clone();
    assert_eq!(bad_endpoint["ejected"], true, "{bad_endpoint}");
    assert!(bad_endpoint["ejected_for_ms"].as_u64().unwrap() > 20_000);
    assert_eq!(clusters["clusters"][0]["healthy_endpoints"], 1);
    proxy
        .wait_for_sample("nip_outlier_ejections_total", &[("cluster", "web")], 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_max_requests_circuit_breaker_answers_503_uo_beyond_its_limit() {
    let _turn = crate::common::module_turn(module_path!());
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_millis(500));
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"], circuit_breakers: {{ max_requests: 2 }} }}
routes:
  - service: web
"#,
        slow.address
    ))
    .await;
    let client = client();
    let url = proxy.url("/");
    let answers = futures_util::future::join_all((0..6).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.get(&url).send().await.unwrap();
            let flag = r
                .headers()
                .get("x-nip-response-flags")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), flag)
        }
    }))
    .await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let overflow = answers
        .iter()
        .filter(|(s, f)| *s == 503 && f.as_deref() == Some("UO"))
        .count();
    assert_eq!((ok, overflow), (2, 4), "{answers:?}");
    proxy
        .wait_for_sample("nip_upstream_rq_overflow_total", &[("cluster", "web")], 4.0)
        .await;
    // Once those two are done, the breaker closes again.
    assert_eq!(get(&client, &url).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_max_retries_circuit_breaker_stops_retries() {
    let _turn = crate::common::module_turn(module_path!());
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.set_status(500);
    let config = |max_retries: u32| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}", "{}"], circuit_breakers: {{ max_retries: {max_retries} }} }}
routes:
  - service: web
    retries: {{ on: [5xx], max: 2 }}
"#,
            good.address, bad.address
        )
    };
    // With room for retries, every request that lands on the bad endpoint is retried.
    let proxy = Proxy::start(&config(3)).await;
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &proxy.url("/")).await.status(), 200);
    }
    drop(proxy);
    // With none, they are not: the 500 goes back and the overflow is counted.
    let proxy = Proxy::start(&config(0)).await;
    let mut failed = 0;
    for _ in 0..10 {
        if get(&client, &proxy.url("/")).await.status() == 500 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 5,
        "round robin sends every other request to the bad one"
    );
    proxy
        .wait_for_sample(
            "nip_upstream_rq_retry_overflow_total",
            &[("cluster", "web")],
            5.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_limits_retries_in_flight_to_a_share_of_the_requests() {
    let _turn = crate::common::module_turn(module_path!());
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.set_status(500);
    // Both answer after 300 ms, so every retry is in flight at the same time.
    good.set_delay(Duration::from_millis(300));
    bad.set_delay(Duration::from_millis(300));
    let config = |percent: u32| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web:
    endpoints: ["{}", "{}"]
    circuit_breakers: {{ max_retries: 0, retry_budget: {{ percent: {percent}, min_retry_concurrency: 1 }} }}
routes:
  - service: web
    retries: {{ on: [5xx], max: 1 }}
"#,
            good.address, bad.address
        )
    };
    // 20 requests at once: 10 land on the bad endpoint and want a retry together.
    async fn failures(proxy: &Proxy) -> usize {
        let client = client();
        let url = proxy.url("/");
        let answers = futures_util::future::join_all((0..20).map(|_| get(&client, &url))).await;
        answers.iter().filter(|r| r.status() == 500).count()
    }
    // A budget of 100 % of the requests in flight retries all of them (the budget
    // replaces max_retries: 0).
    let proxy = Proxy::start(&config(100)).await;
    assert_eq!(failures(&proxy).await, 0);
    drop(proxy);
    // 20 %: at most 4 of the 20 in flight may be retries; the rest answer 500.
    let proxy = Proxy::start(&config(20)).await;
    let failed = failures(&proxy).await;
    assert!((5..=9).contains(&failed), "{failed} of 10 were not retried");
    proxy
        .wait_for_sample(
            "nip_upstream_rq_retry_overflow_total",
            &[("cluster", "web")],
            failed as f64,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn success_rate_and_latency_outliers_are_ejected_each_interval() {
    let _turn = crate::common::module_turn(module_path!());
    // Six endpoints: four fine, one answering 500 to everything, one 150 ms slow.
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d", "failing", "slow"] {
        backends.push(Backend::start(name).await);
    }
    backends[4].set_status(500);
    backends[5].set_delay(Duration::from_millis(150));
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.address))
        .collect();
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web:
    endpoints: [{}]
    outlier_detection:
      consecutive_5xx: 0            # only the interval detectors here
      interval: 1s
      max_ejection_percent: 50
      success_rate_minimum_hosts: 5
      success_rate_request_volume: 10
      latency_factor: 10
      latency_request_volume: 5
routes:
  - service: web
"#,
        endpoints.join(", ")
    ))
    .await;
    let load = SteadyLoad::start(&proxy.url("/"), 4);
    proxy
        .wait_for_sample(
            "nip_outlier_ejections_total",
            &[("cluster", "web"), ("detector", "success_rate")],
            1.0,
        )
        .await;
    proxy
        .wait_for_sample(
            "nip_outlier_ejections_total",
            &[("cluster", "web"), ("detector", "latency")],
            1.0,
        )
        .await;
    let _ = load.stop().await;
    let clusters = proxy.admin_json("/clusters").await;
    let ejected: Vec<String> = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ejected"] == true)
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    let mut expected = vec![
        backends[4].address.to_string(),
        backends[5].address.to_string(),
    ];
    expected.sort();
    let mut ejected_sorted = ejected.clone();
    ejected_sorted.sort();
    assert_eq!(
        ejected_sorted, expected,
        "only the failing and the slow one"
    );
    // While they are out, every request is answered by the four good ones.
    let client = client();
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy.url("/")).await.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_sends_each_user_to_one_backend_and_moves_only_a_lost_backends_users() {
    let _turn = crate::common::module_turn(module_path!());
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(Backend::start(name).await);
    }
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.address))
        .collect();
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web:
    endpoints: [{}]
    lb: ring_hash
    health_check: {{ path: /healthz, interval: 100ms, timeout: 1s, unhealthy_threshold: 1 }}
routes:
  - service: web
    hash_policy: [{{ header: x-user }}]
"#,
        endpoints.join(", ")
    ))
    .await;
    let client = client();
    let backend_of = |user: usize| {
        let (client, url) = (client.clone(), proxy.url("/"));
        async move {
            let r = client
                .get(url)
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-backend"].to_str().unwrap().to_string()
        }
    };
    let mut owners = Vec::new();
    for user in 0..40 {
        let owner = backend_of(user).await;
        for _ in 0..3 {
            assert_eq!(backend_of(user).await, owner, "user-{user} moved");
        }
        owners.push(owner);
    }
    for name in ["a", "b", "c"] {
        assert!(
            owners.iter().any(|o| o == name),
            "40 users spread over all three: {owners:?}"
        );
    }
    // b goes down: its users move, everyone else stays.
    backends[1].set_healthy(false);
    eventually("b is out", || async {
        let clusters = proxy.admin_json("/clusters").await;
        clusters["clusters"][0]["healthy_endpoints"] == 2
    })
    .await;
    for (user, old) in owners.iter().enumerate() {
        let now = backend_of(user).await;
        if old == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(&now, old, "user-{user} moved although {old} is up");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_makes_requests_wait_and_max_pending_requests_refuses_the_rest() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    backend.set_delay(Duration::from_millis(400));
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"], circuit_breakers: {{ max_connections: 2, max_pending_requests: 2 }} }}
routes:
  - service: web
"#,
        backend.address
    ))
    .await;
    let client = client();
    let url = proxy.url("/");
    let started = Instant::now();
    // Six at once: two get connections, two wait for them, two find the line full.
    let answers = futures_util::future::join_all((0..6).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = get(&client, &url).await;
            let flag = r
                .headers()
                .get("x-nip-response-flags")
                .map(|f| f.to_str().unwrap().to_string());
            (r.status().as_u16(), flag, started.elapsed())
        }
    }))
    .await;
    let served: Vec<Duration> = answers
        .iter()
        .filter(|(s, _, _)| *s == 200)
        .map(|(_, _, t)| *t)
        .collect();
    let refused = answers
        .iter()
        .filter(|(s, f, _)| *s == 503 && f.as_deref() == Some("UO"))
        .count();
    assert_eq!((served.len(), refused), (4, 2), "{answers:?}");
    // Never more than two at the backend at once: the last two waited a whole turn.
    assert!(
        served
            .iter()
            .filter(|t| **t >= Duration::from_millis(780))
            .count()
            >= 2,
        "{served:?}"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "nip_upstream_rq_pending_overflow_total",
            &[("cluster", "web")]
        ),
        2.0
    );
    assert!(
        sample(
            &metrics,
            "nip_upstream_cx_overflow_total",
            &[("cluster", "web")]
        ) >= 4.0
    );
}

/// A backend that switches every connection to an echo protocol after `101 Switching
/// Protocols` (a WebSocket server's handshake, then its bytes), recording each head.
async fn upgrading_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = std::sync::Arc::clone(&seen);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut echo = b"echo:".to_vec();
                            echo.extend_from_slice(&buf[..n]);
                            if stream.write_all(&echo).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (address, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_passes_through_and_carries_bytes_both_ways() {
    let _turn = crate::common::module_turn(module_path!());
    use tokio::io::AsyncWriteExt;
    let (backend, heads) = upgrading_backend().await;
    let proxy = Proxy::start(&format!(
        "admin: {{ address: \"127.0.0.1:{{admin}}\" }}\napi_gateway: {{ address: \"127.0.0.1:{{port}}\" }}\nservices:\n  ws: {{ endpoints: [\"{backend}\"] }}\nroutes:\n  - {{ service: ws }}\n"
    ))
    .await;
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    client
        .write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = read_within(&mut client, &mut buf).await;
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    // The backend saw the upgrade asked for, with the key.
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(
        head.contains("upgrade: websocket") && head.contains("sec-websocket-key"),
        "{head}"
    );
    // After the switch, bytes go both ways on the same connection.
    for message in ["hello", "again"] {
        client.write_all(message.as_bytes()).await.unwrap();
        let n = read_within(&mut client, &mut buf).await;
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            format!("echo:{message}")
        );
    }
}

/// One read of `stream` into `buf`, within 3 s.
async fn read_within(stream: &mut tokio::net::TcpStream, buf: &mut [u8]) -> usize {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(3), stream.read(buf))
        .await
        .expect("an answer")
        .unwrap()
}
