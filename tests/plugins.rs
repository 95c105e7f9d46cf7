//! Plugins through a real proxy: the Rust-SDK example plugin on some routes, misbehaving
//! plugins under both fail policies, and a broken plugin at start and at reload.

use crate::common::*;
use std::time::{Duration, Instant};

/// Starts a proxy that must refuse `config` (exit 2, not a crash); returns what it said.
fn refused_at_start(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.yaml");
    std::fs::write(
        &path,
        config
            .replace("{port}", &free_port().to_string())
            .replace("{admin}", &free_port().to_string()),
    )
    .unwrap();
    let output = run_nip(&["proxy", "--config"], Some(&path));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    stderr
}

fn config(backend: &Backend, plugins: &str, routes: &str) -> String {
    config_with_services(backend, "", plugins, routes)
}

/// Like [`config`], with more services (YAML lines under `services:`) beside `web`.
fn config_with_services(backend: &Backend, services: &str, plugins: &str, routes: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{}"] }}
{services}
plugins:
{plugins}
routes:
{routes}
"#,
        backend.address
    )
}

/// A plugin in WAT whose request-headers callback traps.
const TRAPPING_PLUGIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_sdk_plugin_edits_requests_and_responses_on_its_routes_only() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let plugin = example_plugin("add_header");
    let proxy = Proxy::start(&config(
        &backend,
        &format!("  tagger: {{ source: {{ file: \"{}\" }}, config: \"x-team=blue\" }}", plugin.display()),
        "  - { name: tagged, match: { path_prefix: /tagged }, service: web, plugins: [tagger] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    for _ in 0..5 {
        let response = client.get(proxy.url("/tagged/x?y=1")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-team"], "blue");
        assert_eq!(backend.last_header("x-team").as_deref(), Some("blue"));
        assert_eq!(
            backend.last_header("x-seen-path").as_deref(),
            Some("/tagged/x?y=1")
        );
    }
    let response = client.get(proxy.url("/plain")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("x-team"));
    assert_eq!(backend.last_header("x-team"), None);

    let before = backend.requests();
    let response = client
        .get(proxy.url("/tagged"))
        .header("x-deny", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-denied-by"], "add-header");
    assert_eq!(response.text().await.unwrap(), "denied\n");
    assert_eq!(
        backend.requests(),
        before,
        "a local reply never reaches the backend"
    );
    assert!(
        proxy.log().contains("configured x-team=blue"),
        "plugin logs reach the proxy log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_plugin_follows_its_fail_policy_and_others_keep_working() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let trap = dir.path().join("trap.wat");
    std::fs::write(&trap, TRAPPING_PLUGIN).unwrap();
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  strict: {{ source: {{ file: \"{0}\" }}, fail: closed }}\n  lenient: {{ source: {{ file: \"{0}\" }}, fail: open }}",
            trap.display()
        ),
        "  - { name: strict, match: { path_prefix: /strict }, service: web, plugins: [strict] }\n  - { name: lenient, match: { path_prefix: /lenient }, service: web, plugins: [lenient] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    for _ in 0..3 {
        let response = client.get(proxy.url("/strict")).send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-nip-response-flags"], "PF");
        assert_eq!(
            client
                .get(proxy.url("/lenient"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            client
                .get(proxy.url("/plain"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    proxy
        .wait_for_sample("nip_plugin_failures_total", &[("plugin", "strict")], 3.0)
        .await;
    proxy
        .wait_for_sample("nip_response_flags_total", &[("flag", "PF")], 3.0)
        .await;
    // A crash loop backs off: many more failing requests than instance restarts.
    for _ in 0..100 {
        assert_eq!(
            client
                .get(proxy.url("/lenient"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let metrics = proxy.metrics().await;
    let failures = sample(
        &metrics,
        "nip_plugin_failures_total",
        &[("plugin", "lenient")],
    );
    let starts = sample(
        &metrics,
        "nip_plugin_instance_starts_total",
        &[("plugin", "lenient")],
    );
    assert!(failures >= 100.0, "{failures}");
    assert!(
        starts < 40.0,
        "{starts} restarts for {failures} failures: no back-off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_plugin_is_refused_at_start_and_at_reload() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    let bad = config(
        &backend,
        &format!(
            "  broken: {{ source: {{ file: \"{}\" }} }}",
            garbage.display()
        ),
        "  - { service: web, plugins: [broken] }",
    );
    let stderr = refused_at_start(&bad);
    assert!(stderr.contains("plugin broken: cannot compile"), "{stderr}");

    // At reload, the canary refuses it and the running config keeps serving.
    let plugin = example_plugin("add_header");
    let good = config(
        &backend,
        &format!(
            "  tagger: {{ source: {{ file: \"{}\" }}, config: \"x-a=1\" }}",
            plugin.display()
        ),
        "  - { service: web, plugins: [tagger] }",
    );
    let proxy = Proxy::start(&good).await;
    let version = proxy.version().await;
    // A config the plugin itself rejects (no '=') fails the canary's on_configure.
    proxy.rewrite_config(&good.replace("config: \"x-a=1\"", "config: \"nonsense\""));
    proxy.signal("HUP");
    eventually("the refused reload is counted", || async {
        sample(
            &proxy.metrics().await,
            "nip_config_reload_failures_total",
            &[],
        ) >= 1.0
    })
    .await;
    let dump = proxy.admin_json("/config_dump").await;
    assert_eq!(dump["version_info"], version.as_str());
    assert!(dump["last_reload_error"]
        .as_str()
        .unwrap()
        .contains("on_configure returned false"));
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-a"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_data_spans_worker_threads_and_plugin_metrics_reach_the_admin_port() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let plugin = example_plugin("counter");
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  counter: {{ source: {{ file: \"{}\" }} }}",
            plugin.display()
        ),
        "  - { service: web, plugins: [counter] }",
    ))
    .await;
    // Separate clients → separate connections, spread over the proxy's two worker threads.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut counts = Vec::new();
            for _ in 0..25 {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                counts.push(
                    response.headers()["x-request-count"]
                        .to_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap(),
                );
            }
            counts
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=100).collect::<Vec<u64>>(),
        "every request got its own number: no lost update across threads"
    );
    proxy
        .wait_for_sample(
            "nip_plugin_metric",
            &[("plugin", "counter"), ("name", "requests")],
            100.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_module_file_is_canaried_and_swapped_in_under_load() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("plugin.wasm");
    std::fs::copy(example_plugin("add_header"), &module).unwrap();
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  live: {{ source: {{ file: \"{}\" }}, config: \"x-version=1\" }}",
            module.display()
        ),
        "  - { service: web, plugins: [live] }",
    ))
    .await;
    let load = SteadyLoad::start(&proxy.url("/"), 4);
    // A garbage module is refused by the canary: version 1 keeps answering.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::fs::write(&module, b"\0asm garbage").unwrap();
    eventually("the broken module is refused", || async {
        sample(
            &proxy.metrics().await,
            "nip_config_reload_failures_total",
            &[],
        ) >= 1.0
    })
    .await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-version"], "1");
    // A different, valid module replaces it for new requests.
    let staged = dir.path().join("staged.wasm");
    std::fs::copy(example_plugin("counter"), &staged).unwrap();
    std::fs::rename(&staged, &module).unwrap();
    eventually("the counter module answers", || async {
        client()
            .get(proxy.url("/"))
            .send()
            .await
            .is_ok_and(|r| r.headers().contains_key("x-request-count"))
    })
    .await;
    let (sent, failures) = load.stop().await;
    assert!(sent > 100, "the load was real ({sent} requests)");
    assert_eq!(failures, 0, "requests failed during the module swaps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_plugins_see_whole_bodies_rewrite_responses_and_are_bounded() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("hello-web").await;
    let plugin = example_plugin("body_rewrite");
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  rewrite: {{ source: {{ file: \"{}\" }}, config: \"from=hello;to=goodbye;deny=forbidden\" }}",
            plugin.display()
        ),
        "  - { name: rewritten, match: { path_prefix: /rw }, service: web, plugins: [rewrite] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    // The response body is buffered, rewritten and re-framed (content-length was removed).
    let response = client.get(proxy.url("/rw")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-body-rewritten"], "yes");
    assert_eq!(response.text().await.unwrap(), "goodbye-web\n");
    let plain = client.get(proxy.url("/plain")).send().await.unwrap();
    assert_eq!(plain.text().await.unwrap(), "hello-web\n");

    // A request body arriving in many chunks reaches the backend whole and unchanged.
    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(7_000).map(|c| Ok(c.to_vec())).collect();
    let response = client
        .post(proxy.url("/rw/upload"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.last_body(), body);

    // The plugin holds the body until its end, then decides on all of it.
    let response = client
        .post(proxy.url("/rw/upload"))
        .body(format!(
            "{}forbidden{}",
            "x".repeat(50_000),
            "y".repeat(50_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-denied-by"], "body-rewrite");
    assert_eq!(response.text().await.unwrap(), "body refused\n");
    // The upstream request had started (headers go out first), but no byte of the held
    // body reached it.
    assert!(
        !String::from_utf8_lossy(&backend.last_body()).contains("forbidden"),
        "the refused body reached the upstream"
    );

    // A plugin may hold at most 1 MiB: a bigger body is refused with 413.
    let response = client
        .post(proxy.url("/rw/upload"))
        .body(vec![b'z'; (1 << 20) + 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    // The proxy keeps serving.
    let response = client.get(proxy.url("/rw")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "goodbye-web\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_auth_plugin_holds_each_request_for_its_http_call() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let auth = Backend::start("auth").await;
    auth.accept_token("s3cret");
    let plugin = example_plugin("auth");
    let proxy = Proxy::start(&config_with_services(
        &backend,
        &format!(
            "  auth: {{ endpoints: [\"{}\"] }}\n  auth-down: {{ endpoints: [\"{}\"] }}",
            auth.address,
            dead_address()
        ),
        &format!(
            "  authz: {{ source: {{ file: \"{0}\" }}, config: \"cluster=auth;path=/check\" }}\n  authz-down: {{ source: {{ file: \"{0}\" }}, config: \"cluster=auth-down;timeout_ms=500\" }}",
            plugin.display()
        ),
        "  - { name: down, match: { path_prefix: /down }, service: web, plugins: [authz-down] }\n  - { name: api, service: web, plugins: [authz] }",
    ))
    .await;
    let client = client();
    for _ in 0..3 {
        let response = client
            .get(proxy.url("/api"))
            .header("authorization", "Bearer s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "web\n");
        assert_eq!(
            backend.last_header("x-auth-user").as_deref(),
            Some("user-of-s3cret")
        );
    }
    assert_eq!(auth.requests(), 3, "one callout per request");
    assert_eq!(
        auth.last_header("authorization").as_deref(),
        Some("Bearer s3cret")
    );

    let served = backend.requests();
    let response = client
        .get(proxy.url("/api"))
        .header("authorization", "Bearer wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-auth-status"], "401");
    assert_eq!(response.text().await.unwrap(), "bad token\n");
    assert_eq!(
        backend.requests(),
        served,
        "a refused request never reaches the upstream"
    );

    // An auth service nobody answers for: the failed callout is delivered, the plugin refuses.
    let response = client
        .get(proxy.url("/down"))
        .header("authorization", "Bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-auth-status"], "none");
    assert_eq!(backend.requests(), served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticks_and_queues_run_between_requests() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let plugin = example_plugin("ticker");
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  ticker: {{ source: {{ file: \"{}\" }}, config: \"period_ms=20\" }}",
            plugin.display()
        ),
        "  - { service: web, plugins: [ticker] }",
    ))
    .await;
    let ticks = |response: &reqwest::Response| -> u64 {
        response.headers()["x-ticks"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let client = client();
    // The first request starts the worker's instance, and with it the timer.
    let first = client.get(proxy.url("/")).send().await.unwrap();
    let start = ticks(&first);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let later = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(later.status(), 200);
    let counted = ticks(&later);
    // 500 ms at 20 ms per tick: ~25 ticks per running instance, queued and counted
    // in the background with no request in between.
    assert!(
        counted >= start + 10,
        "ticks did not advance without traffic: {start} → {counted}"
    );
    assert_eq!(
        backend
            .last_header("x-ticks")
            .map(|v| v.parse::<u64>().unwrap() >= start + 10),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_from_a_url_runs_only_when_its_sha256_matches() {
    let _turn = crate::common::module_turn(module_path!());
    use sha2::Digest;
    let backend = Backend::start("web").await;
    let wasm = std::fs::read(example_plugin("add_header")).unwrap();
    let digest: String = sha2::Sha256::digest(&wasm)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (registry, downloads) = serve_bytes(wasm).await;
    let with_hash = |hash: &str| {
        config(
            &backend,
            &format!(
                "  tagger: {{ source: {{ url: \"http://{registry}/add_header.wasm\", sha256: \"{hash}\" }}, config: \"x-from=url\" }}"
            ),
            "  - { service: web, plugins: [tagger] }",
        )
    };
    // A different digest: the download is refused and the proxy does not start.
    let stderr = refused_at_start(&with_hash(&"0".repeat(64)));
    assert!(
        stderr.contains(&format!(
            "has sha256 {digest}, but the config pins {}",
            "0".repeat(64)
        )),
        "{stderr}"
    );
    // The right digest: downloaded, verified, running.
    let proxy = Proxy::start(&with_hash(&digest)).await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-from"], "url");
    assert!(downloads.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// A plugin that declares 40 pages (2.5 MiB) of memory.
const BIG_MEMORY_PLUGIN: &str = r#"(module
  (memory (export "memory") 40)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configured_limits_bound_memory_and_buffered_bodies() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("hello").await;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wat");
    std::fs::write(&big, BIG_MEMORY_PLUGIN).unwrap();
    let with_memory = |memory: &str| {
        config(
            &backend,
            &format!(
                "  big: {{ source: {{ file: \"{}\" }}, limits: {{ memory: {memory} }} }}",
                big.display()
            ),
            "  - { service: web, plugins: [big] }",
        )
    };
    let stderr = refused_at_start(&with_memory("2Mi"));
    assert!(stderr.contains("plugin big: cannot start"), "{stderr}");
    let proxy = Proxy::start(&with_memory("4Mi")).await;
    assert_eq!(
        client().get(proxy.url("/")).send().await.unwrap().status(),
        200,
        "the same plugin fits in 4Mi"
    );
    drop(proxy);

    let plugin = example_plugin("body_rewrite");
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  rewrite: {{ source: {{ file: \"{}\" }}, limits: {{ body: 1Ki }} }}",
            plugin.display()
        ),
        "  - { service: web, plugins: [rewrite] }",
    ))
    .await;
    let client = client();
    let response = client
        .post(proxy.url("/"))
        .body(vec![b'a'; 900])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "goodbye\n");
    let response = client
        .post(proxy.url("/"))
        .body(vec![b'a'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
}

/// A plugin whose request-headers callback never returns.
const SPINNING_PLUGIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (loop $l (br $l)) i32.const 0))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_loop_is_cut_at_its_cpu_limit_and_others_keep_being_served() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let spin = dir.path().join("spin.wat");
    std::fs::write(&spin, SPINNING_PLUGIN).unwrap();
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  spin-closed: {{ source: {{ file: \"{0}\" }}, limits: {{ cpu: 20ms }} }}\n  spin-open: {{ source: {{ file: \"{0}\" }}, fail: open, limits: {{ cpu: 20ms }} }}",
            spin.display()
        ),
        "  - { name: closed, match: { path_prefix: /closed }, service: web, plugins: [spin-closed] }\n  - { name: open, match: { path_prefix: /open }, service: web, plugins: [spin-open] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    for (path, status) in [("/closed", 503), ("/open", 200), ("/plain", 200)] {
        let started = std::time::Instant::now();
        let response = client.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{path} took {:?}: the loop was not cut",
            started.elapsed()
        );
    }
    // Meanwhile other requests on the same proxy go on being served.
    let plain = (0..20).map(|_| client.get(proxy.url("/plain")).send());
    for response in futures_util::future::join_all(plain).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert!(
        proxy.log().contains("CPU deadline exceeded"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_written_in_c_and_assemblyscript_run_like_rust_ones() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let c = c_plugin();
    let assemblyscript = assemblyscript_plugin();
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  c-deny: {{ source: {{ file: \"{}\" }}, config: \"x-forbidden\" }}\n  as-tag: {{ source: {{ file: \"{}\" }}, config: \"x-written-in=assemblyscript\" }}",
            c.display(),
            assemblyscript.display()
        ),
        "  - { name: c, match: { path_prefix: /c }, service: web, plugins: [c-deny] }\n  - { name: as, match: { path_prefix: /as }, service: web, plugins: [as-tag] }",
    ))
    .await;
    let client = client();
    // C: a header edit both ways, and a local reply built by hand in the ABI's wire format.
    let response = client.get(proxy.url("/c")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-plugin-language"], "c");
    assert_eq!(
        backend.last_header("x-c-plugin").as_deref(),
        Some("x-forbidden")
    );
    let served = backend.requests();
    let response = client
        .get(proxy.url("/c"))
        .header("x-forbidden", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-blocked-by"], "c-deny");
    assert_eq!(response.text().await.unwrap(), "blocked by a C plugin\n");
    assert_eq!(backend.requests(), served);
    // AssemblyScript (ABI 0.2.0 SDK): headers both ways, its config read in on_configure.
    let response = client.get(proxy.url("/as")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-plugin-language"], "assemblyscript");
    assert_eq!(
        backend.last_header("x-written-in").as_deref(),
        Some("assemblyscript")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_edit_response_trailers() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let grpc = trailer_backend("text/plain").await;
    let plugin = example_plugin("add_header");
    let proxy = Proxy::start(&config_with_services(
        &backend,
        &format!("  grpc: {{ endpoints: [\"{grpc}\"], protocol: http2 }}"),
        &format!(
            "  tagger: {{ source: {{ file: \"{}\" }}, config: \"x-team=blue\" }}",
            plugin.display()
        ),
        "  - { service: grpc, plugins: [tagger] }",
    ))
    .await;
    let answer = H2Client::connect(proxy.port)
        .await
        .call("GET", "/svc/Method", &[], b"")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-team"], "blue");
    assert_eq!(answer.trailers["grpc-status"], "0");
    assert_eq!(
        answer.trailers["x-team-trailer"], "blue",
        "the plugin's trailer edit"
    );
    assert_eq!(answer.body, "with trailers\n");
}

/// A plugin that resets every request stream in its request-headers callback.
const RESETTING_PLUGIN: &str = r#"(module
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $close (i32.const 0)))
    i32.const 1))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_reset_closes_the_request_without_an_answer() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let reset = dir.path().join("reset.wat");
    std::fs::write(&reset, RESETTING_PLUGIN).unwrap();
    let proxy = Proxy::start(&config(
        &backend,
        &format!("  reset: {{ source: {{ file: \"{}\" }} }}", reset.display()),
        "  - { name: reset, match: { path_prefix: /reset }, service: web, plugins: [reset] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    let outcome = client.get(proxy.url("/reset")).send().await;
    assert!(
        outcome.is_err(),
        "a reset stream has no answer, got {:?}",
        outcome.map(|r| r.status())
    );
    assert_eq!(
        backend.requests(),
        0,
        "a reset request never reaches the upstream"
    );
    let response = client.get(proxy.url("/plain")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        sample(
            &proxy.metrics().await,
            "nip_plugin_failures_total",
            &[("plugin", "reset")]
        ),
        0.0,
        "a reset is the plugin's decision, not a failure"
    );
}

/// A plugin that grows its memory until the host refuses, then traps.
const GREEDY_PLUGIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (block $refused (loop $grow
      (br_if $refused (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
      (br $grow)))
    unreachable))"#;

/// A plugin that imports a host function no proxy-wasm host has.
const ALIEN_IMPORT_PLUGIN: &str = r#"(module
  (import "env" "proxy_teleport" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unbounded_allocation_stops_at_the_ceiling_and_unknown_imports_are_load_errors() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let greedy = dir.path().join("greedy.wat");
    std::fs::write(&greedy, GREEDY_PLUGIN).unwrap();
    let proxy = Proxy::start(&config(
        &backend,
        &format!(
            "  greedy: {{ source: {{ file: \"{}\" }}, limits: {{ memory: 8Mi }} }}",
            greedy.display()
        ),
        "  - { name: greedy, match: { path_prefix: /greedy }, service: web, plugins: [greedy] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    for _ in 0..5 {
        let response = client.get(proxy.url("/greedy")).send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-nip-response-flags"], "PF");
        assert_eq!(
            client
                .get(proxy.url("/plain"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    proxy
        .wait_for_sample("nip_plugin_failures_total", &[("plugin", "greedy")], 5.0)
        .await;
    // Each instance stopped at 8 MiB: the proxy's memory stays far below 5 × unbounded.
    let rss_kb = proxy.rss_kb();
    assert!(rss_kb < 200 * 1024, "proxy RSS {rss_kb} kB");

    let alien = dir.path().join("alien.wat");
    std::fs::write(&alien, ALIEN_IMPORT_PLUGIN).unwrap();
    let stderr = refused_at_start(&config(
        &backend,
        &format!("  alien: {{ source: {{ file: \"{}\" }} }}", alien.display()),
        "  - { service: web, plugins: [alien] }",
    ));
    assert!(stderr.contains("proxy_teleport"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_noop_plugin_changes_nothing() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let plugin = example_plugin("noop");
    let proxy = Proxy::start(&config(
        &backend,
        &format!("  noop: {{ source: {{ file: \"{}\" }} }}", plugin.display()),
        "  - { name: noop, match: { path_prefix: /noop }, service: web, plugins: [noop] }\n  - { name: plain, service: web }",
    ))
    .await;
    let client = client();
    let seen = |response: reqwest::Response| async move {
        let mut headers: Vec<String> = response
            .headers()
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "x-request-id" | "date"))
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        headers.sort();
        (response.status(), headers, response.text().await.unwrap())
    };
    let with_plugin = seen(client.get(proxy.url("/noop")).send().await.unwrap()).await;
    let upstream_with: Vec<_> = {
        let mut h: Vec<_> = backend
            .control
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .collect();
        h.retain(|(k, _)| k != "x-request-id");
        h.sort();
        h
    };
    let without = seen(client.get(proxy.url("/plain")).send().await.unwrap()).await;
    let upstream_without: Vec<_> = {
        let mut h: Vec<_> = backend
            .control
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .collect();
        h.retain(|(k, _)| k != "x-request-id");
        h.sort();
        h
    };
    assert_eq!(with_plugin, without);
    assert_eq!(upstream_with, upstream_without);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_in_the_header_phase_does_not_undo_a_later_body_pause() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let auth = Backend::start("auth").await;
    auth.accept_token("s3cret");
    let proxy = Proxy::start(&config_with_services(
        &backend,
        &format!("  auth: {{ endpoints: [\"{}\"] }}", auth.address),
        &format!(
            "  authz: {{ source: {{ file: \"{}\" }} }}\n  rewrite: {{ source: {{ file: \"{}\" }} }}",
            example_plugin("auth").display(),
            example_plugin("body_rewrite").display()
        ),
        "  - { service: web, plugins: [authz, rewrite] }",
    ))
    .await;
    // authz resumes the request after its callout; rewrite then holds the body to its end.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"harmless start, ".to_vec()),
        Ok("x".repeat(70_000).into_bytes()),
        Ok(b" and then forbidden".to_vec()),
    ];
    let response = client()
        .post(proxy.url("/upload"))
        .header("authorization", "Bearer s3cret")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(
        !String::from_utf8_lossy(&backend.last_body()).contains("harmless"),
        "held chunks reached the upstream"
    );
}

/// A plugin registry that accepts connections and never answers.
async fn stalled_registry() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_plugin_download_does_not_hold_the_admin_port_or_sigterm() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let mut proxy = Proxy::start(&config(&backend, "", "  - { service: web }")).await;
    let registry = stalled_registry().await;
    let stalled = config(
        &backend,
        &format!(
            "  slow: {{ source: {{ url: \"http://{registry}/slow.wasm\", sha256: \"{}\" }} }}",
            "0".repeat(64)
        ),
        "  - { service: web, plugins: [slow] }",
    );
    proxy.rewrite_config(&stalled);
    proxy.signal("HUP");
    // The download hangs (for up to its 30 s timeout); meanwhile the admin port answers at
    // once and requests are served by the config in force.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = client();
    for path in ["/ready", "/metrics", "/clusters"] {
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(2),
            client.get(proxy.admin_url(path)).send(),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} stalled behind the download"))
        .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(started.elapsed() < Duration::from_secs(1), "{path}");
    }
    let response = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // SIGTERM still drains and exits promptly.
    let started = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", proxy.log());
    assert!(started.elapsed() < Duration::from_secs(5));
}
