//! Request traces checked by an independent OTLP receiver (grpcio and the published OTLP
//! protos, tests/interop/otlp_receiver.py): parentage, attributes, retries, sampling, and
//! both transports.

use crate::common::*;
use std::time::Duration;

/// A span as the receiver printed it.
type Span = serde_json::Value;

/// The receiver, and the spans it got so far.
struct Receiver {
    process: Background,
    grpc_port: u16,
    http_port: u16,
}

impl Receiver {
    async fn start() -> Receiver {
        let (grpc_port, http_port) = (free_port(), free_port());
        let script = script("otlp_receiver.py");
        let process = Background::python(&[
            script.to_str().unwrap(),
            &grpc_port.to_string(),
            &http_port.to_string(),
        ]);
        process.wait_for("listening").await;
        Receiver {
            process,
            grpc_port,
            http_port,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.process
            .output()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The spans of `trace_id`, once `count` of them arrived.
    async fn trace(&self, trace_id: &str, count: usize) -> Vec<Span> {
        eventually(&format!("{count} spans of trace {trace_id}"), || async {
            self.spans()
                .iter()
                .filter(|s| s["trace_id"] == trace_id)
                .count()
                >= count
        })
        .await;
        self.spans()
            .into_iter()
            .filter(|s| s["trace_id"] == trace_id)
            .collect()
    }
}

/// SpanKind in OTLP: SERVER 2, CLIENT 3.
const SERVER: i64 = 2;
const CLIENT: i64 = 3;

/// examples/tracing.yaml against the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_otlp_collector_with_parentage_attributes_and_retries() {
    let _turn = crate::common::module_turn(module_path!());
    let receiver = Receiver::start().await;
    let web = Backend::start("web").await;
    let (flaky, _) = fails_once_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let collector: std::net::SocketAddr = ([127, 0, 0, 1], receiver.grpc_port).into();
    let yaml = example(
        "tracing",
        &[
            ("127.0.0.1:4317", collector),
            ("127.0.0.1:8081", web.address),
            ("127.0.0.1:8082", flaky),
        ],
    )
    .replace("/tmp/nip-access.log", &log.display().to_string());
    let proxy = Proxy::start(&yaml).await;
    let http = client();

    // A client's trace is continued: the proxy's span is its child, the upstream's parent
    // is the proxy's client span.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let response = http
        .get(proxy.url("/orders?page=2"))
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .header("user-agent", "trace-test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = receiver.trace(client_trace, 2).await;
    let server = spans
        .iter()
        .find(|s| s["kind"] == SERVER)
        .expect("a server span");
    let client = spans
        .iter()
        .find(|s| s["kind"] == CLIENT)
        .expect("a client span");
    assert_eq!(server["parent_span_id"], client_span);
    assert_eq!(client["parent_span_id"], server["span_id"]);
    assert_eq!(server["service"], "edge");
    assert_eq!(server["via"], "grpc");
    assert_eq!(server["name"], "GET front");
    let attributes = &server["attributes"];
    assert_eq!(attributes["http.request.method"], "GET");
    assert_eq!(attributes["url.path"], "/orders");
    assert_eq!(attributes["http.route"], "front");
    assert_eq!(attributes["http.response.status_code"], 200);
    assert_eq!(attributes["user_agent.original"], "trace-test");
    assert_eq!(attributes["network.protocol.version"], "1.1");
    assert_eq!(
        client["attributes"]["server.port"],
        web.address.port() as i64
    );
    let told = web
        .last_header("traceparent")
        .expect("the upstream is told");
    assert_eq!(
        told,
        format!(
            "00-{client_trace}-{}-01",
            client["span_id"].as_str().unwrap()
        )
    );

    // A retried request: one client span per try, the retry counted, the first one's 503.
    let response = http
        .put(proxy.url("/retry"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace_id = eventually_log_trace_id(&log, "/retry").await;
    let spans = receiver.trace(&trace_id, 3).await;
    let server = spans.iter().find(|s| s["kind"] == SERVER).unwrap();
    assert_eq!(server["parent_span_id"], "", "a trace the proxy started");
    let mut tries: Vec<&Span> = spans.iter().filter(|s| s["kind"] == CLIENT).collect();
    tries.sort_by_key(|s| {
        s["attributes"]["http.request.resend_count"]
            .as_i64()
            .unwrap_or(0)
    });
    assert_eq!(tries.len(), 2);
    assert_eq!(tries[0]["attributes"]["http.response.status_code"], 503);
    assert_eq!(tries[0]["status"], 2, "an error status");
    assert_eq!(tries[1]["attributes"]["http.request.resend_count"], 1);
    assert_eq!(tries[1]["attributes"]["http.response.status_code"], 200);
    for attempt in &tries {
        assert_eq!(attempt["parent_span_id"], server["span_id"]);
    }
    let metrics = proxy.metrics().await;
    assert!(
        sample(
            &metrics,
            "nip_trace_spans_total",
            &[("outcome", "exported")]
        ) >= 5.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "nip_trace_spans_total", &[("outcome", "dropped")]),
        0.0
    );
}

/// The trace id the access log wrote for the request to `path`.
async fn eventually_log_trace_id(log: &std::path::Path, path: &str) -> String {
    let find = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["path"] == path)
            .and_then(|l| l["trace_id"].as_str().map(str::to_string))
            .filter(|t| t.len() == 32)
    };
    eventually(
        &format!("a trace id for {path} in the access log"),
        || async { find().is_some() },
    )
    .await;
    find().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_stay_home_unless_they_fail_or_their_parent_was_sampled() {
    let _turn = crate::common::module_turn(module_path!());
    let receiver = Receiver::start().await;
    let web = Backend::start("web").await;
    let broken = Backend::start("broken").await;
    broken.set_status(503);
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
tracing:
  address: "127.0.0.1:{http}"
  protocol: http
  random_sampling: 0
  trace_errors: true
services:
  web: {{ endpoints: ["{web}"] }}
  broken: {{ endpoints: ["{broken}"] }}
routes:
  - {{ name: broken, match: {{ path_prefix: /broken }}, service: broken }}
  - {{ name: front, service: web }}
"#,
        http = receiver.http_port,
        web = web.address,
        broken = broken.address,
    ))
    .await;
    let http = client();
    for _ in 0..5 {
        assert_eq!(
            http.get(proxy.url("/fine")).send().await.unwrap().status(),
            200
        );
    }
    // Unsampled, the upstream still learns the trace (flag 00) so its own spans can join.
    let told = web.last_header("traceparent").expect("told");
    assert!(told.ends_with("-00"), "{told}");

    // A failed request is exported though not sampled.
    let response = http.get(proxy.url("/broken/x")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let failed_trace = broken.last_header("traceparent").unwrap()[3..35].to_string();
    let spans = receiver.trace(&failed_trace, 2).await;
    let server = spans.iter().find(|s| s["kind"] == SERVER).unwrap();
    assert_eq!(server["via"], "http");
    assert_eq!(server["status"], 2);
    assert_eq!(server["attributes"]["http.response.status_code"], 503);
    assert_eq!(server["service"], "nip");

    // A client's sampled trace is followed (parent-based), whatever the ratio.
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    let response = http
        .get(proxy.url("/fine"))
        .header("traceparent", format!("00-{sampled}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    receiver.trace(sampled, 2).await;
    // The five unsampled successes never arrived.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let traces: std::collections::BTreeSet<String> = receiver
        .spans()
        .iter()
        .map(|s| s["trace_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        traces,
        [failed_trace, sampled.to_string()].into_iter().collect(),
        "only the failed and the client-sampled requests"
    );
}

/// `nip metrics` sums the fleet's routes over each proxy's admin port, or exports every
/// proxy's samples with an instance label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nip_metrics_summarises_the_fleet_by_route() {
    let _turn = crate::common::module_turn(module_path!());
    let web = Backend::start("web").await;
    let broken = Backend::start("broken").await;
    broken.set_status(503);
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
  broken: {{ endpoints: ["{}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /orders }}, service: broken }}
  - {{ name: front, service: web }}
"#,
        web.address, broken.address
    );
    let (a, b) = (Proxy::start(&config).await, Proxy::start(&config).await);
    let http = client();
    for proxy in [&a, &b] {
        for _ in 0..3 {
            http.get(proxy.url("/")).send().await.unwrap();
        }
        http.get(proxy.url("/orders/1")).send().await.unwrap();
    }
    let admins = format!("127.0.0.1:{},127.0.0.1:{}", a.admin_port, b.admin_port);
    let output = run_nip(&["metrics", "--admin", &admins], None);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{said}");
    assert!(said.starts_with("2 proxies"), "{said}");
    let row = |route: &str| {
        said.lines()
            .find(|l| l.starts_with(route))
            .unwrap_or_else(|| panic!("no {route} row in {said}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("front")[1..3], ["6".to_string(), "0.0%".to_string()]);
    assert_eq!(row("orders")[1..3], ["2".to_string(), "100.0%".to_string()]);
    assert_ne!(row("front")[3], "-", "a p50 from the histogram");

    let output = run_nip(
        &["metrics", "--export", "prometheus", "--admin", &admins],
        None,
    );
    let exported = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for proxy in [&a, &b] {
        assert!(
            exported.contains(&format!(
                "nip_requests_total{{instance=\"127.0.0.1:{}\",route=\"orders\"",
                proxy.admin_port
            )),
            "{exported}"
        );
    }
    let output = run_nip(&["metrics", "--admin", "127.0.0.1:9"], None);
    assert!(!output.status.success(), "an unreachable proxy is an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nip_logs_follows_the_fleets_access_records_through_the_control_plane() {
    let _turn = crate::common::module_turn(module_path!());
    use crate::common::control_plane::*;
    let (a, _b, port, control_plane) = serving_a().await;
    let routes = gateway(port, &a, "").replace(
        "routes:\n  - { service: web }\n",
        "routes:\n  - { name: shop, match: { path_prefix: /shop }, service: web }\n  - { name: rest, service: web }\n",
    );
    let applied = control_plane.apply(&routes, &[]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    let proxy = streaming_proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    let http = client();
    eventually("the proxy serves the named routes", || async {
        http.get(proxy.url("/shop/0"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    // Nobody follows: requests are served as ever (the records only fill the ring).
    for i in 0..50 {
        let answer = http
            .get(proxy.url(&format!("/other/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }

    // A follower of one route sees that route's requests, named by proxy, as they come.
    let follower = Background::start(
        std::process::Command::new(nip_bin())
            .args(["logs", "--follow", "--route", "shop", "--limit", "0"])
            .args(["--control-plane", &control_plane.api("")])
            .env("NIP_TOKEN_FILE", &control_plane.admin_token_file)
            .env("NIP_CA_FILE", control_plane.bundle_file()),
    );
    // The follower is connected once a record sent after it started reaches it.
    eventually("the follower sees the route's requests", || async {
        let _ = http.get(proxy.url("/shop/ping")).send().await;
        follower.output().contains("/shop/ping")
    })
    .await;
    for i in 1..=3 {
        let answer = http
            .get(proxy.url(&format!("/shop/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let _ = http.get(proxy.url("/other/x")).send().await.unwrap();
    }
    follower.wait_for("/shop/3").await;
    let seen = follower.output();
    for line in seen.lines().filter(|l| l.contains("/shop/")) {
        assert!(
            line.contains("edge-eu-1") && line.contains(" 200 GET ") && line.contains("route=shop"),
            "{line}"
        );
    }
    assert!(
        !seen.contains("/other/"),
        "only the route followed:\n{seen}"
    );

    // Without --follow: the newest kept records, filtered, as JSON.
    let kept = control_plane.nip(&["logs", "--limit", "5", "--json", "--route", "rest"]);
    assert!(kept.status.success(), "{}", stderr(&kept));
    let lines: Vec<serde_json::Value> = stdout(&kept)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{}", stdout(&kept));
    assert!(lines
        .iter()
        .all(|l| l["route"] == "rest" && l["node"] == "edge-eu-1"));
    let bad = control_plane.nip(&["logs", "--status", "7xx"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("status: \"7xx\""), "{}", stderr(&bad));

    // The same records give the dashboard its per-route figures.
    let traffic = control_plane.get_json("/v1/traffic").await;
    let shop = traffic["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "shop")
        .unwrap_or_else(|| panic!("{traffic}"));
    assert!(shop["requests"].as_u64().unwrap() >= 4, "{shop}");
    assert_eq!(shop["error_rate"], 0.0);
    // nip metrics without --admin reads them from the control plane.
    let table = control_plane.nip(&["metrics"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let line = stdout(&table)
        .lines()
        .find(|l| l.starts_with("shop "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", stdout(&table)));
    assert!(line.contains("0.0%"), "{line}");
    let exported = control_plane.nip(&["metrics", "--export", "prometheus"]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    assert!(
        stdout(&exported).contains("nip_fleet_route_requests_per_second{route=\"shop\"} "),
        "{}",
        stdout(&exported)
    );
}
