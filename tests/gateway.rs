//! The gateway basics a route offers, each through its example in `examples/` against
//! real backends: retries under Envoy's route budget, per-try and idle timeouts, back-off
//! and retriable statuses.

use crate::common::*;
use std::time::{Duration, Instant};

/// `examples/retries.yaml` on a proxy, with its three services as test backends.
async fn retries_example() -> (Proxy, [Backend; 3]) {
    let orders = Backend::start("orders").await;
    let payments = Backend::start("payments").await;
    let feed = Backend::start("feed").await;
    let proxy = Proxy::start(&example(
        "retries",
        &[
            ("127.0.0.1:8081", orders.address),
            ("127.0.0.1:8082", payments.address),
            ("127.0.0.1:8083", feed.address),
        ],
    ))
    .await;
    (proxy, [orders, payments, feed])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_is_the_whole_budget_of_a_request_and_its_retries() {
    let _turn = crate::common::module_turn(module_path!());
    let (proxy, [orders, _payments, _feed]) = retries_example().await;
    // 5 retries of 300 ms tries would take 1.8 s: the 1 s budget ends it first.
    orders.set_delay(Duration::from_secs(5));
    let started = Instant::now();
    let response = client().get(proxy.url("/orders/1")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-nip-response-flags"], "UT");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    let tries = orders.requests();
    assert!(
        (3..=4).contains(&tries),
        "{tries} tries of 300 ms fit in 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_statuses_are_retried_after_a_jittered_back_off() {
    let _turn = crate::common::module_turn(module_path!());
    let (proxy, [_orders, payments, _feed]) = retries_example().await;
    payments.set_status(409);
    let started = Instant::now();
    let response = client().get(proxy.url("/payments/1")).send().await.unwrap();
    let took = started.elapsed();
    // Five retries, then the last answer goes to the client as it is.
    assert_eq!(response.status(), 409);
    assert_eq!(payments.requests(), 6);
    // The waits are uniform below 50, 100, 200, 400 and 500 ms: all five under 25 ms
    // together is a 1-in-20,000 draw; without back-off the retries take a few ms.
    assert!(took >= Duration::from_millis(25), "answered after {took:?}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    // Another status is not retried.
    payments.set_status(500);
    let response = client().get(proxy.url("/payments/2")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(payments.requests(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_bounds_each_read_of_a_route_without_a_budget() {
    let _turn = crate::common::module_turn(module_path!());
    let (proxy, [_orders, _payments, feed]) = retries_example().await;
    feed.set_delay(Duration::from_millis(300));
    let response = client().get(proxy.url("/feed")).send().await.unwrap();
    assert_eq!(response.status(), 200, "300 ms is within the idle timeout");
    feed.set_delay(Duration::from_secs(3));
    let started = Instant::now();
    let response = client().get(proxy.url("/feed")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_rewrite_paths_and_hosts_and_edit_headers_both_ways() {
    let _turn = crate::common::module_turn(module_path!());
    let users = Backend::start("users").await;
    let catalog = Backend::start("catalog").await;
    let proxy = Proxy::start(&example(
        "rewrites",
        &[
            ("127.0.0.1:8081", users.address),
            ("127.0.0.1:8082", catalog.address),
        ],
    ))
    .await;
    let response = client()
        .get(proxy.url("/api/users/42?full=1"))
        .header("x-debug", "1")
        .header("x-env", "staging")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(users.last_target(), "/v2/users/42?full=1");
    assert_eq!(users.last_header("host").as_deref(), Some("users.internal"));
    assert_eq!(
        users.last_header("x-client-ip").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        users.last_header("x-env").as_deref(),
        Some("prod"),
        "overwritten"
    );
    assert_eq!(users.last_header("x-debug"), None, "removed");
    assert_eq!(
        response.headers()["x-served-by"],
        users.address.to_string().as_str()
    );
    assert!(!response.headers().contains_key("x-internal"), "removed");
    // HTTP/2 clients send the host in :authority; the rewrite reaches the backend too.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(proxy.url("/api/users/7")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(users.last_target(), "/v2/users/7");
    assert_eq!(users.last_header("host").as_deref(), Some("users.internal"));

    let response = client()
        .get(proxy.url("/shop/books/17?page=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(catalog.last_target(), "/catalog/books/item/17?page=2");
    assert!(
        response.headers().contains_key("x-internal"),
        "only the users route hides it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_direct_responses_are_answered_without_an_upstream() {
    let _turn = crate::common::module_turn(module_path!());
    let web = Backend::start("web").await;
    let proxy = Proxy::start(&example("redirects", &[("127.0.0.1:8081", web.address)])).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let health = no_redirects
        .get(proxy.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["cache-control"], "no-store");
    assert_eq!(health.headers()["content-type"], "text/plain");
    assert_eq!(health.text().await.unwrap(), "ok\n");

    let moved = no_redirects
        .get(proxy.url("/old/docs/a?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 308);
    assert_eq!(
        moved.headers()["location"],
        format!("http://127.0.0.1:{}/new/docs/a?x=1", proxy.port).as_str()
    );

    let admin = no_redirects
        .get(proxy.url("/admin/users?token=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 301);
    assert_eq!(
        admin.headers()["location"],
        "https://admin.example.com/admin/users"
    );
    // An HTTP/1.0 request without Host: a path-only Location (no empty host), and a
    // redirect that must write a host of its own still answers with its own host.
    for (request, location) in [
        (
            "GET /old/a?x=1 HTTP/1.0\r\n\r\n",
            "location: /new/a?x=1\r\n",
        ),
        (
            "GET /admin HTTP/1.0\r\n\r\n",
            "location: https://admin.example.com/admin\r\n",
        ),
    ] {
        let answer = raw_exchange(proxy.port, request).await;
        assert!(answer.contains(location), "{request:?}: {answer}");
    }
    assert_eq!(web.requests(), 0, "nothing went upstream");
    let forwarded = no_redirects.get(proxy.url("/page")).send().await.unwrap();
    assert_eq!(forwarded.status(), 200);
    assert_eq!(web.requests(), 1);
}

/// Sends `request` as written and reads the answer until the proxy closes (HTTP/1.0).
async fn raw_exchange(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the proxy closes after an HTTP/1.0 answer")
        .unwrap();
    String::from_utf8_lossy(&answer).to_lowercase()
}

#[test]
fn route_edits_are_validated_by_field_path() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"
services:
  web: { endpoints: ["127.0.0.1:8081"] }
routes:
  - match: { path_regex: "/x.*" }
    service: web
    prefix_rewrite: /y
    request_headers_to_add: [{ name: x-a, value: "%HOSTNAME%" }, { name: host, value: a }]
  - match: { path_prefix: /r }
    redirect: { response_code: 305, path_redirect: nope }
    retries: { max: 1 }
  - match: { path_prefix: /d }
    direct_response: { status: 99 }
  - match: { path_prefix: /q }
    service: web
    prefix_rewrite: "/new?x=1"
  - match: { path_prefix: /s }
    service: web
    regex_rewrite: { pattern: "^/s/(.*)", substitution: "/t/\\1 x" }
"#,
    )
    .unwrap();
    let output = run_nip(&["validate", "--file", &file.to_string_lossy()], None);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "routes[0].prefix_rewrite: needs `match.path_prefix` or `match.path`",
        "routes[0].request_headers_to_add[0].value: %HOSTNAME% is not a supported variable",
        "routes[0].request_headers_to_add[1].name: Host is changed with host_rewrite",
        "routes[1].redirect.response_code: 305 is not",
        "routes[1].redirect.path_redirect: must start with '/'",
        "routes[1].retries: applies to forwarded requests",
        "routes[2].direct_response.status: 99 is not 200–599",
        "routes[3].prefix_rewrite: '?' cannot appear in a path",
        "routes[4].regex_rewrite.substitution: ' ' cannot appear in a path",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_plugins_run_before_it_answers_by_itself() {
    let _turn = crate::common::module_turn(module_path!());
    let plugin = c_plugin();
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
plugins:
  deny: {{ source: {{ file: "{}" }}, config: "x-forbidden" }}
routes:
  - match: {{ path: /status }}
    direct_response: {{ status: 200, body: "up" }}
    plugins: [deny]
"#,
        plugin.display()
    ))
    .await;
    let allowed = client().get(proxy.url("/status")).send().await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.text().await.unwrap(), "up");
    let denied = client()
        .get(proxy.url("/status"))
        .header("x-forbidden", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        denied.status(),
        403,
        "the plugin answers before the route does"
    );
    assert_eq!(denied.headers()["x-blocked-by"], "c-deny");
}
