//! Plugin SDK v2: plugins written as message handlers, driven through a real proxy. Every
//! SDK's build of the common example (`filters/examples/sdk-*`) passes the same cases.

use crate::common::*;
use std::path::Path;

const ORDER: &str = r#"{"id": 7, "card": "4111 1111 1111 1111", "payer": {"name": "Ada", "card": "5500 0000 0000 0004"}, "items": [{"sku": "a", "card": "gift"}]}"#;

/// The example's cases: a low-priority request refused here, a caller looked up in an
/// HTTP service (answer used, unknown caller 403, failing service 502), metadata stamped
/// upstream, JSON fields redacted in responses, request bodies seen and forwarded.
/// A build of the common example.
enum Guard {
    /// A wasm module, and the SDK that made it.
    Wasm(std::path::PathBuf, &'static str),
    /// A process plugin: its command and environment.
    Process(Vec<String>, Vec<(&'static str, String)>),
}

impl Guard {
    /// The common example on the Python SDK.
    fn python() -> Guard {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("filters/examples/python-guard/guard.py");
        let sdk = root.join("filters/sdk/python");
        Guard::Process(
            vec![python(), script.display().to_string()],
            vec![("PYTHONPATH", sdk.display().to_string())],
        )
    }

    /// The common example on the Go SDK.
    fn go() -> Guard {
        Guard::Process(
            vec![go_plugin("go-guard").display().to_string()],
            Vec::new(),
        )
    }
}

/// Starts a process plugin's command on a port of its own (its last argument) and waits
/// until it listens.
async fn start_plugin_process(
    command: &[String],
    env: &[(&'static str, String)],
) -> (Background, u16) {
    let port = free_port();
    let started = Background::start(
        std::process::Command::new(&command[0])
            .args(&command[1..])
            .arg(port.to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
    );
    started.wait_for("listening").await;
    (started, port)
}

async fn the_common_example_behaves(guard: Guard) {
    let issuer = JwtIssuer::start().await;
    let app = Pages::start(&[
        ("/orders/7", 200, "application/json", ORDER),
        ("/orders", 201, "application/json", r#"{"created": true}"#),
        ("/plain", 200, "text/plain", "card: not json, left alone"),
    ])
    .await;
    let users = Pages::start(&[
        (
            "/users/alice",
            200,
            "application/json",
            r#"{"tier": "gold"}"#,
        ),
        ("/users/carol", 500, "text/plain", "database down"),
    ])
    .await;
    let mut process = None;
    let (plugin, plugin_service) = match &guard {
        Guard::Wasm(path, _) => (
            format!(
                "source: {{ file: \"{}\" }}, config: {{ redact: [card], lookup_cluster: users }}",
                path.display()
            ),
            String::new(),
        ),
        Guard::Process(command, env) => {
            let (started, port) = start_plugin_process(command, env).await;
            process = Some(started);
            (
                format!(
                    "isolation: process, process: {{ service: guard-process, responses: true, timeout: 2s }}, config: {{ redact: [card], lookup_url: \"http://{}\" }}",
                    users.address
                ),
                format!(
                    "  guard-process: {{ endpoints: [\"127.0.0.1:{port}\"], protocol: http2 }}\n"
                ),
            )
        }
    };
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
auth:
  jwt_providers:
    idp: {{ issuer: {issuer}, jwks_uri: {issuer}/jwks.json }}
tenants:
  acme: {{}}
services:
  app: {{ endpoints: ["{app}"] }}
  users: {{ endpoints: ["{users}"] }}
{plugin_service}plugins:
  guard: {{ {plugin} }}
routes:
  - {{ match: {{ path_prefix: /acme }}, service: app, plugins: [guard], tenant: acme }}
  - {{ service: app, plugins: [guard], auth: {{ jwt: allow_missing }} }}
"#,
        issuer = issuer.url,
        app = app.address,
        users = users.address,
    ))
    .await;
    let http = client();

    // A known caller: looked up, stamped, its answer redacted.
    let response = http
        .get(proxy.url("/orders/7"))
        .header("x-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "proxy log:\n{}", proxy.log());
    let order: serde_json::Value = response.json().await.unwrap();
    assert_eq!(order["card"], "[redacted]");
    assert_eq!(order["payer"]["card"], "[redacted]");
    assert_eq!(order["payer"]["name"], "Ada");
    assert_eq!(order["items"][0]["card"], "[redacted]");
    let seen = app.last();
    assert_eq!(
        seen.headers.get("x-user-tier").map(String::as_str),
        Some("gold")
    );
    assert_eq!(
        seen.headers
            .get("x-nip-meta-checked-by")
            .map(String::as_str),
        Some("sdk-guard")
    );

    // A request body is in the message and goes upstream whole, with the head's edits.
    let body = r#"{"sku": "a", "quantity": 2}"#;
    let response = http
        .post(proxy.url("/orders"))
        .header("x-user", "alice")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let seen = app.last();
    assert_eq!(String::from_utf8_lossy(&seen.body), body);
    assert_eq!(
        seen.headers.get("x-user-tier").map(String::as_str),
        Some("gold")
    );

    // Not JSON: the body passes as it was.
    let response = http.get(proxy.url("/plain")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "card: not json, left alone");

    // Low priority: refused here with the plugin's JSON.
    let before = app.hits();
    let response = http
        .get(proxy.url("/orders/7"))
        .header("x-nip-priority", "low")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        error["error"],
        "low priority requests are not served on this route"
    );
    // Unknown caller: 403; the lookup service failing: 502.
    for (user, status) in [("bob", 403), ("carol", 502)] {
        let response = http
            .get(proxy.url("/orders/7"))
            .header("x-user", user)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{user}");
    }
    assert_eq!(app.hits(), before, "refused requests never reached the app");

    // The message names the tenant and the authenticated principal.
    let response = http.get(proxy.url("/acme/x")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let seen = app.last();
    assert_eq!(
        seen.headers.get("x-nip-meta-tenant").map(String::as_str),
        Some("acme")
    );
    assert!(!seen.headers.contains_key("x-nip-meta-principal"));
    let token = issuer.token("sub=ada").await;
    let response = http
        .get(proxy.url("/plain"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.last();
    assert_eq!(
        seen.headers.get("x-nip-meta-principal").cloned(),
        Some(format!("{}/ada", issuer.url))
    );
    assert!(!seen.headers.contains_key("x-nip-meta-tenant"));

    let Guard::Wasm(_, sdk) = guard else {
        drop(process);
        return;
    };
    // The host shows what the plugin declared and how it feels.
    eventually("the plugin's health is reported", || async {
        let plugins = proxy.admin_json("/plugins").await;
        plugins["plugins"][0]["health"]["healthy"] == true
    })
    .await;
    let plugins = proxy.admin_json("/plugins").await;
    assert_eq!(plugins["host_api"], "2.0");
    let guard = &plugins["plugins"][0];
    assert_eq!(guard["name"], "guard");
    assert_eq!(guard["declared"]["name"], "sdk-guard");
    assert_eq!(guard["declared"]["version"], "1.0.0");
    assert_eq!(guard["declared"]["api"], "2.0");
    assert_eq!(guard["declared"]["sdk"], sdk);
    proxy
        .wait_for_sample("nip_plugin_healthy", &[("plugin", "guard")], 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_example_behaves() {
    let _turn = crate::common::module_turn(module_path!());
    the_common_example_behaves(Guard::Wasm(example_plugin("sdk_guard"), "rust")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_sdk_example_behaves() {
    let _turn = crate::common::module_turn(module_path!());
    let wasm = assemblyscript_example("as-guard", "as_guard.wasm");
    the_common_example_behaves(Guard::Wasm(wasm, "assemblyscript")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_example_behaves() {
    let _turn = crate::common::module_turn(module_path!());
    the_common_example_behaves(Guard::python()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_sdk_example_behaves() {
    let _turn = crate::common::module_turn(module_path!());
    the_common_example_behaves(Guard::go()).await;
}

/// The Python and Go SDKs under `body_mode: streamed` and `trailers: true`: a message is
/// whole, so the handler runs on heads alone (no redaction) while chunks and gRPC trailers
/// are answered unchanged — every answer the one the proxy asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_process_plugins_take_heads_alone_when_bodies_stream() {
    let _turn = crate::common::module_turn(module_path!());
    let users = Pages::start(&[(
        "/users/alice",
        200,
        "application/json",
        r#"{"tier": "gold"}"#,
    )])
    .await;
    let app = Pages::start(&[("/orders/7", 200, "application/json", ORDER)]).await;
    let grpc = trailer_backend("application/grpc").await;
    for (language, guard) in [("python", Guard::python()), ("go", Guard::go())] {
        let Guard::Process(command, env) = guard else {
            unreachable!("process plugins")
        };
        let (started, port) = start_plugin_process(&command, &env).await;
        let proxy = Proxy::start(&format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}", trust_priority_header: true }}
services:
  app: {{ endpoints: ["{app}"] }}
  grpc: {{ endpoints: ["{grpc}"], protocol: http2 }}
  guard-process: {{ endpoints: ["127.0.0.1:{port}"], protocol: http2 }}
plugins:
  guard:
    isolation: process
    process: {{ service: guard-process, responses: true, body_mode: streamed, trailers: true, timeout: 2s }}
    config: {{ redact: [card], lookup_url: "http://{users}" }}
routes:
  - {{ match: {{ path_prefix: /grpc }}, service: grpc, plugins: [guard] }}
  - {{ service: app, plugins: [guard] }}
"#,
            app = app.address,
            users = users.address,
        ))
        .await;
        let http = client();
        let response = http
            .get(proxy.url("/orders/7"))
            .header("x-user", "alice")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{language}");
        let order: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            order["card"], "4111 1111 1111 1111",
            "{language}: not redacted"
        );
        assert_eq!(
            app.last().headers.get("x-user-tier").map(String::as_str),
            Some("gold"),
            "{language}: the head's handler ran"
        );
        let response = http
            .get(proxy.url("/orders/7"))
            .header("x-nip-priority", "low")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "{language}");

        let answer = H2Client::connect(proxy.port)
            .await
            .call(
                "POST",
                "/grpc/S/M",
                &[("content-type", "application/grpc"), ("x-user", "alice")],
                b"ask",
            )
            .await;
        assert_eq!(answer.status, 200, "{language}");
        assert_eq!(answer.trailers["grpc-status"], "0", "{language}");
        assert_eq!(answer.body, "with trailers\n", "{language}");
        let metrics = proxy.metrics().await;
        let count = |decision| {
            sample(
                &metrics,
                "nip_ext_proc_messages_total",
                &[("filter", "nip.plugin.guard"), ("decision", decision)],
            )
        };
        assert_eq!(count("failed"), 0.0, "{language}: {metrics}");
        // /orders/7: 2 heads and the body's chunks; /grpc: 2 heads, a request chunk, a
        // response chunk, trailers.
        assert!(count("ok") >= 7.0, "{language}: {metrics}");
        drop(started);
    }
}

/// A plugin that waits for whole response bodies (the Rust SDK's guard) on responses
/// whose bodies trailers follow: a gRPC body flows past it with its trailers; any other
/// body it held goes out when unexpected trailers come (pingora cannot send those after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_holding_plugin_never_loses_a_body_trailers_follow() {
    let _turn = crate::common::module_turn(module_path!());
    let grpc = trailer_backend("application/grpc").await;
    let plain = trailer_backend("application/json").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  grpc: {{ endpoints: ["{grpc}"], protocol: http2 }}
  plain: {{ endpoints: ["{plain}"], protocol: http2 }}
plugins:
  guard: {{ source: {{ file: "{guard}" }}, config: {{ redact: [card] }} }}
routes:
  - {{ match: {{ path_prefix: /plain }}, service: plain, plugins: [guard] }}
  - {{ service: grpc, plugins: [guard] }}
"#,
        guard = example_plugin("sdk_guard").display(),
    ))
    .await;
    let mut h2 = H2Client::connect(proxy.port).await;
    let answer = h2.grpc("/pkg.Service/Method").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.trailers["grpc-status"], "0");
    assert_eq!(answer.body, "with trailers\n");

    let answer = h2.grpc("/plain/x").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "with trailers\n", "the held body goes out");
}

/// A process plugin: Envoy's ext_proc against an independent processor (grpcio and the
/// published protos, tests/interop/ext_proc_server.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_plugin_sees_and_changes_requests_and_responses_over_ext_proc() {
    let _turn = crate::common::module_turn(module_path!());
    let port = free_port();
    let script = script("ext_proc_server.py");
    let mut processor = Background::python(&[script.to_str().unwrap(), &port.to_string()]);
    processor.wait_for("listening").await;
    let app = Pages::start(&[
        ("/new/x", 200, "text/plain", "the secret is out"),
        ("/echo", 200, "text/plain", "echoed"),
        ("/lenient/x", 200, "text/plain", "no secret here"),
    ])
    .await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
tenants:
  acme: {{}}
services:
  app: {{ endpoints: ["{app}"] }}
  processor: {{ endpoints: ["127.0.0.1:{port}"], protocol: http2 }}
plugins:
  shout:
    isolation: process
    process: {{ service: processor, responses: true, timeout: 500ms }}
    config: {{ mood: loud }}
  lenient:
    isolation: process
    process: {{ service: processor, timeout: 300ms }}
    fail: open
routes:
  - {{ match: {{ path_prefix: /lenient }}, service: app, plugins: [lenient] }}
  - {{ service: app, plugins: [shout], tenant: acme }}
"#,
        app = app.address,
    ))
    .await;
    let http = client();

    // The head: seen, attributed, rewritten; the response head and body changed.
    let response = http.get(proxy.url("/old/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ext-proc-response"], "seen");
    assert_eq!(response.text().await.unwrap(), "the ****** is out");
    let seen = app.last();
    assert_eq!(seen.path, "/new/x");
    let header = |name: &str| seen.headers.get(name).cloned().unwrap_or_default();
    assert_eq!(header("x-ext-proc"), "seen");
    assert_eq!(header("x-ext-tenant"), "acme");
    assert_eq!(header("x-ext-request-id"), header("x-request-id"));
    assert_eq!(header("x-ext-config"), r#"{"mood":"loud"}"#);

    // The request body, whole, before the head goes.
    let response = http
        .post(proxy.url("/echo"))
        .body("hello, processor")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.last();
    assert_eq!(String::from_utf8_lossy(&seen.body), "HELLO, PROCESSOR");
    assert_eq!(
        seen.headers.get("x-ext-body-length").map(String::as_str),
        Some("16")
    );

    // An immediate response: the upstream never sees the request.
    let before = app.hits();
    let response = http
        .get(proxy.url("/x"))
        .header("x-ext-deny", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-denied-by"], "ext-proc");
    assert_eq!(response.text().await.unwrap(), "denied by processor");
    assert_eq!(app.hits(), before);

    // Too slow: 500 when failing closed, on without it when failing open.
    let response = http
        .get(proxy.url("/x"))
        .header("x-ext-slow", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(app.hits(), before);
    let response = http
        .get(proxy.url("/lenient/x"))
        .header("x-ext-slow", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!app.last().headers.contains_key("x-ext-proc"));

    // The processor gone: the same two answers.
    processor.kill();
    let status = |path: &'static str| {
        let http = http.clone();
        let url = proxy.url(path);
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/x").await, 500);
    assert_eq!(status("/lenient/x").await, 200);
    let metrics = proxy.metrics().await;
    assert!(
        sample(
            &metrics,
            "nip_ext_proc_messages_total",
            &[("filter", "nip.plugin.shout"), ("decision", "ok")]
        ) >= 6.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "nip_ext_proc_messages_total",
            &[("filter", "nip.plugin.shout"), ("decision", "immediate")]
        ) == 1.0,
        "{metrics}"
    );
}

/// Envoy's other ext_proc modes against the independent processor: bodies chunk by chunk
/// (`STREAMED`, past the bound a whole body has) and response trailers (`SEND`); a gRPC
/// body a processor wants whole reaches the client with its trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_plugins_stream_bodies_and_see_trailers() {
    let _turn = crate::common::module_turn(module_path!());
    let port = free_port();
    let script = script("ext_proc_server.py");
    let processor = Background::python(&[script.to_str().unwrap(), &port.to_string()]);
    processor.wait_for("listening").await;
    // Larger than any whole body the proxy holds (64 KiB before a request head goes).
    let big: String = "abcdefghijklmnopqrstuvwxyz\n".repeat(12_000);
    let app = Pages::start(&[
        ("/big", 200, "text/plain", big.as_str()),
        ("/upload", 200, "text/plain", "stored"),
        ("/slow-body", 200, "text/plain", "the secret"),
        ("/lenient/slow-body", 200, "text/plain", "the secret"),
    ])
    .await;
    let grpc = trailer_backend("application/grpc").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  app: {{ endpoints: ["{app}"] }}
  grpc: {{ endpoints: ["{grpc}"], protocol: http2 }}
  processor: {{ endpoints: ["127.0.0.1:{port}"], protocol: http2 }}
plugins:
  flow:
    isolation: process
    process: {{ service: processor, responses: true, body_mode: streamed, trailers: true, timeout: 2s }}
  whole:
    isolation: process
    process: {{ service: processor, responses: true, timeout: 2s }}
  strict:
    isolation: process
    process: {{ service: processor, responses: true, timeout: 300ms }}
  lenient:
    isolation: process
    process: {{ service: processor, responses: true, timeout: 300ms }}
    fail: open
routes:
  - {{ match: {{ path_prefix: /slow-body }}, service: app, plugins: [strict] }}
  - {{ match: {{ path_prefix: /lenient/slow-body }}, service: app, plugins: [lenient] }}
  - {{ match: {{ path_prefix: /grpc-whole }}, service: grpc, plugins: [whole] }}
  - {{ match: {{ path_prefix: /grpc }}, service: grpc, plugins: [flow] }}
  - {{ service: app, plugins: [flow] }}
"#,
        app = app.address,
    ))
    .await;
    let http = client();

    // A request body chunk by chunk: each upper-cased, the whole reframed.
    let response = http
        .post(proxy.url("/upload"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "STORED",
        "the response, streamed too"
    );
    let seen = app.last();
    assert_eq!(
        seen.headers.get("x-ext-proc").map(String::as_str),
        Some("seen")
    );
    assert!(
        !seen.headers.contains_key("content-length"),
        "a streamed body goes chunked: {:?}",
        seen.headers
    );
    assert_eq!(seen.body.len(), big.len());
    assert!(
        seen.body == big.to_uppercase().as_bytes(),
        "every chunk upper-cased"
    );

    // A response body chunk by chunk.
    let response = http.get(proxy.url("/big")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ext-proc-response"], "seen");
    let body = response.text().await.unwrap();
    assert_eq!(body.len(), big.len());
    assert!(body == big.to_uppercase(), "every chunk upper-cased");

    // No answer about a response body whose head has gone: failing closed, the response
    // is cut (its body never reaches the client unprocessed); failing open, it goes on.
    let outcome = async { http.get(proxy.url("/slow-body")).send().await?.text().await }.await;
    assert!(
        outcome.is_err(),
        "the response is cut, not sent unprocessed: {outcome:?}"
    );
    let response = http
        .get(proxy.url("/lenient/slow-body"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "the secret");

    // gRPC over HTTP/2: trailers go to the processor and come back changed.
    let mut h2 = H2Client::connect(proxy.port).await;
    let answer = h2.grpc("/grpc/pkg.Service/Method").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.trailers["grpc-status"], "0");
    assert_eq!(answer.trailers["x-ext-trailer"], "seen");
    // One body message, which could not say the body ended (the trailers did).
    assert_eq!(answer.trailers["x-ext-body-messages"], "1/0");
    assert_eq!(answer.body, "WITH TRAILERS\n");

    // A processor that wants a gRPC body whole gets it with the trailers; the client gets
    // the body and the trailers as the upstream sent them.
    let answer = h2.grpc("/grpc-whole/pkg.Service/Method").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-ext-proc-response"], "seen");
    assert_eq!(answer.trailers["grpc-status"], "0");
    assert!(
        !answer.trailers.contains_key("x-ext-trailer"),
        "trailers are not sent to it"
    );
    assert_eq!(answer.body, "with trailers\n");
    let metrics = proxy.metrics().await;
    let whole_ok = sample(
        &metrics,
        "nip_ext_proc_messages_total",
        &[("filter", "nip.plugin.whole"), ("decision", "ok")],
    );
    // Request head, response head, and the body with the trailers.
    assert_eq!(whole_ok, 3.0, "{metrics}");
}

/// A retried request's body, streamed through a processor the first time, goes again as
/// the processor made it — the processor is not asked twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_resends_what_a_streaming_processor_made_of_the_body() {
    let _turn = crate::common::module_turn(module_path!());
    let port = free_port();
    let script = script("ext_proc_server.py");
    let processor = Background::python(&[script.to_str().unwrap(), &port.to_string()]);
    processor.wait_for("listening").await;
    let (backend, bodies) = fails_once_backend().await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  app: {{ endpoints: ["{backend}"] }}
  processor: {{ endpoints: ["127.0.0.1:{port}"], protocol: http2 }}
plugins:
  flow:
    isolation: process
    process: {{ service: processor, body_mode: streamed, timeout: 2s }}
routes:
  - {{ service: app, plugins: [flow], retries: {{ on: [5xx], max: 2 }} }}
"#
    ))
    .await;
    let body = "a body to send twice\n".repeat(200);
    let response = client()
        .put(proxy.url("/store"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "one retry");
    for got in &bodies {
        assert!(
            *got == body.to_uppercase().as_bytes(),
            "each try got the processed body"
        );
    }
}

/// The proxy starts process plugins itself: their user, their limits, a version check,
/// restarts with back-off, and nothing left behind when it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_runs_process_plugins_and_restarts_them_with_back_off() {
    let _turn = crate::common::module_turn(module_path!());
    let app = Pages::start(&[("/x", 200, "application/json", r#"{"card": "4111"}"#)]).await;
    let (guard_port, future_port, sleeper_port, go_port) =
        (free_port(), free_port(), free_port(), free_port());
    let go_guard = go_plugin("go-guard");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sdk = root.join("filters/sdk/python");
    let guard = root.join("filters/examples/python-guard/guard.py");
    // Built with a future API: its declaration says 3.0.
    let future = r#"import json, sys, time
if "--describe" in sys.argv:
    print(json.dumps({"api": "3.0", "sdk": "python", "name": "future", "version": "9.0.0"}))
else:
    time.sleep(600)"#;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  app: {{ endpoints: ["{app}"] }}
  guard-process: {{ endpoints: ["127.0.0.1:{guard_port}"], protocol: http2 }}
  future-process: {{ endpoints: ["127.0.0.1:{future_port}"], protocol: http2 }}
  sleeper-process: {{ endpoints: ["127.0.0.1:{sleeper_port}"], protocol: http2 }}
  go-process: {{ endpoints: ["127.0.0.1:{go_port}"], protocol: http2 }}
plugins:
  guard:
    isolation: process
    process:
      service: guard-process
      responses: true
      timeout: 2s
      command: ["{python}", "{guard}"]
      env: {{ PYTHONPATH: "{sdk}" }}
      limits: {{ memory: 4Gi, open_files: 256 }}
    config: {{ redact: [card] }}
  future:
    isolation: process
    process: {{ service: future-process, command: ["{python}", "-c", {future:?}] }}
  sleeper:
    isolation: process
    process: {{ service: sleeper-process, command: ["/bin/sleep", "600"], user: nobody }}
  goguard:
    isolation: process
    process: {{ service: go-process, command: ["{go_guard}"] }}
routes:
  - {{ service: app, plugins: [guard] }}
"#,
        app = app.address,
        python = python(),
        guard = guard.display(),
        sdk = sdk.display(),
        go_guard = go_guard.display(),
    ))
    .await;
    let redacted = || async {
        let response = client().get(proxy.url("/x")).send().await.unwrap();
        response.status() == 200 && response.text().await.unwrap().contains("[redacted]")
    };
    eventually("the supervised plugin serves", redacted).await;
    let processes = || async { proxy.admin_json("/plugins").await["processes"].clone() };
    let now = processes().await;
    let guard_status = &now["guard"];
    assert_eq!(guard_status["state"], "running");
    assert_eq!(guard_status["declared"]["sdk"], "python");
    assert_eq!(guard_status["declared"]["name"], "sdk-guard");
    assert_eq!(guard_status["limits"], "rlimit");
    let pid = guard_status["pid"].as_u64().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().rev().nth(1).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    // "Max address space  4294967296  4294967296  bytes": the soft limit is two from the end.
    assert!(
        limits.contains("Max address space") && limits.contains("4294967296"),
        "{limits}"
    );
    assert_eq!(limit("Max open files"), "256", "{limits}");
    // Another API major: refused, never started.
    assert_eq!(now["future"]["state"], "refused");
    let reason = now["future"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("future 9.0.0")
            && reason.contains("API 3.0")
            && reason.contains("runs API 2.0"),
        "{reason}"
    );
    // Its own user.
    let sleeper = now["sleeper"]["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65534"),
        "{uid}"
    );

    // SDK processes are asked how they are; the plain program is not.
    eventually("the SDK processes report their health", || async {
        let now = processes().await;
        now["guard"]["health"]["healthy"] == true
            && now["goguard"]["health"]["healthy"] == true
            && now["goguard"]["declared"]["sdk"] == "go"
    })
    .await;
    eventually("the Python plugin reports its own figures", || async {
        processes().await["guard"]["resource_usage"]["messages"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    })
    .await;
    assert!(processes().await["sleeper"]["health"].is_null());
    proxy
        .wait_for_sample("nip_plugin_healthy", &[("plugin", "goguard")], 1.0)
        .await;
    // Killed: started again, and serving again.
    unsafe_kill(pid);
    eventually("the plugin process is started again", || async {
        let now = processes().await;
        now["guard"]["state"] == "running" && now["guard"]["pid"].as_u64() != Some(pid)
    })
    .await;
    eventually("the restarted plugin serves", redacted).await;
    proxy
        .wait_for_sample(
            "nip_plugin_process_restarts_total",
            &[("plugin", "guard")],
            1.0,
        )
        .await;
    let pids: Vec<u64> = ["guard", "sleeper"]
        .iter()
        .filter_map(|name| processes_pid(&now, name))
        .collect();
    let restarted = processes().await["guard"]["pid"].as_u64().unwrap();
    drop(proxy);
    for pid in pids.into_iter().chain([restarted]) {
        eventually("the proxy's plugin processes end with it", || async move {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|s| s.contains("State:\tZ"))
        })
        .await;
    }
}

fn processes_pid(statuses: &serde_json::Value, name: &str) -> Option<u64> {
    statuses[name]["pid"].as_u64()
}

fn unsafe_kill(pid: u64) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A Rust SDK handler awaits a timer like an HTTP call: the request is held meanwhile,
/// and sleeping requests do not hold each other up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_sdk_handler_sleeps_holding_its_request() {
    let _turn = crate::common::module_turn(module_path!());
    let app = Pages::start(&[("/x", 200, "text/plain", "ok")]).await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  app: {{ endpoints: ["{app}"] }}
plugins:
  guard: {{ source: {{ file: "{plugin}" }} }}
routes:
  - {{ service: app, plugins: [guard] }}
"#,
        app = app.address,
        plugin = example_plugin("sdk_guard").display(),
    ))
    .await;
    let get = |delay: Option<&'static str>| {
        let mut request = client().get(proxy.url("/x"));
        if let Some(ms) = delay {
            request = request.header("x-delay-ms", ms);
        }
        async move {
            let started = std::time::Instant::now();
            let status = request.send().await.unwrap().status().as_u16();
            (status, started.elapsed())
        }
    };
    let (status, quick) = get(None).await;
    assert_eq!(status, 200);
    let (status, slow) = get(Some("400")).await;
    assert_eq!(status, 200);
    assert!(
        slow >= std::time::Duration::from_millis(400),
        "held {slow:?}"
    );
    assert!(
        quick < std::time::Duration::from_millis(300),
        "unheld {quick:?}"
    );
    assert_eq!(app.hits(), 2, "the held request went on to the upstream");
    // Five at once: held side by side, not one after another.
    let started = std::time::Instant::now();
    let all = futures_join5(
        get(Some("400")),
        get(Some("400")),
        get(Some("400")),
        get(Some("400")),
        get(Some("400")),
    )
    .await;
    assert!(all.iter().all(|(status, _)| *status == 200));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "five sleeping requests took {:?}",
        started.elapsed()
    );
}

async fn futures_join5<F: std::future::Future>(a: F, b: F, c: F, d: F, e: F) -> Vec<F::Output> {
    let (a, b, c, d, e) = tokio::join!(a, b, c, d, e);
    vec![a, b, c, d, e]
}
