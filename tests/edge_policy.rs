//! Edge policy end to end: JWTs from an independent issuer (PyJWT, tests/interop/
//! jwt_issuer.py) verified with keys fetched from its JWKS (rotated mid-test, then the
//! issuer gone), bad tokens of every kind refused, claims passed upstream, and RBAC
//! policies (allow, deny, shadow) over paths, methods and verified claims.

use crate::common::*;
use std::collections::HashMap;

fn config(issuer: &JwtIssuer, backend: &Backend, listener_rbac: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{backend}"] }}
auth:
  jwt_providers:
    idp:
      issuer: {issuer}
      audiences: [api]
      jwks_uri: {issuer}/jwks.json
      cache_duration: 1s
      forward_payload_header: x-jwt-payload
      claim_to_headers: {{ x-user: sub, x-org: org.id }}
{listener_rbac}
routes:
  - name: public
    match: {{ path_prefix: /public }}
    service: web
  - name: admin
    match: {{ path_prefix: /admin }}
    service: web
    auth:
      jwt: idp
      rbac:
        action: allow
        policies:
          admins:
            permissions: [{{ path: "/admin/{{section}}/**" }}]
            principals: [{{ claim: {{ name: roles, value: admin }} }}]
        shadow:
          action: allow
          policies:
            alice-only:
              permissions: [{{ any: true }}]
              principals: [{{ claim: {{ name: sub, value: alice }} }}]
  - name: api
    match: {{ path_prefix: /api }}
    service: web
    auth: {{ jwt: idp }}
"#,
        issuer = issuer.url,
        backend = backend.address,
    )
}

fn last_headers(backend: &Backend) -> HashMap<String, String> {
    backend.control.last_headers.lock().unwrap().clone()
}

async fn call(proxy: &Proxy, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = client().get(proxy.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_of_an_independent_issuer_are_verified_and_bad_ones_refused() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&config(&issuer, &backend, "")).await;

    // No token where one is required: 401 with Envoy's challenge; none needed: 200.
    let response = client().get(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        format!("Bearer realm=\"http://127.0.0.1:{}/api/x\"", proxy.port)
    );
    assert_eq!(response.text().await.unwrap(), "Jwt is missing");
    assert_eq!(call(&proxy, "/public", None).await.0, 200);

    // Every algorithm of the JWKS; the claims reach the upstream, the token does not.
    for alg in ["RS256", "PS256", "ES256", "EdDSA"] {
        let token = issuer.token(&format!("alg={alg}&org=o-7")).await;
        let (status, body) = call(&proxy, "/api/x", Some(&token)).await;
        assert_eq!(status, 200, "{alg}: {body}");
        let headers = last_headers(&backend);
        assert_eq!(
            headers.get("x-user").map(String::as_str),
            Some("alice"),
            "{alg}"
        );
        assert_eq!(
            headers.get("x-org").map(String::as_str),
            Some("o-7"),
            "{alg}"
        );
        assert_eq!(
            headers.get("x-jwt-payload").map(String::as_str),
            token.split('.').nth(1),
            "{alg}"
        );
        assert!(
            !headers.contains_key("authorization"),
            "{alg}: the token is not forwarded"
        );
    }
    // The query parameter Envoy reads by default.
    let token = issuer.token("alg=ES256").await;
    assert_eq!(
        call(&proxy, &format!("/api/q?access_token={token}"), None)
            .await
            .0,
        200
    );
    // A client cannot write the headers the proxy writes from verified claims.
    let response = client()
        .get(proxy.url("/public"))
        .header("x-user", "mallory")
        .header("x-jwt-payload", "e30")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = last_headers(&backend);
    assert!(!headers.contains_key("x-user") && !headers.contains_key("x-jwt-payload"));

    let refused = [
        ("ttl=-120", 401, "Jwt is expired"),
        ("nbf=600", 401, "Jwt not yet valid"),
        ("aud=billing", 403, "Audiences in Jwt are not allowed"),
        (
            "iss=http://evil.example",
            401,
            "Jwt issuer is not configured",
        ),
        ("sign=other", 401, "Jwt verification fails"),
        ("sign=other&alg=EdDSA", 401, "Jwt verification fails"),
        ("sign=none", 401, "Jwt header [alg] field is not supported"),
        (
            "sign=hs256-public",
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
    ];
    for (query, expected_status, expected_body) in refused {
        let token = issuer.token(query).await;
        let response = client()
            .get(proxy.url("/api/x"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected_status, "{query}");
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            challenge.ends_with("error=\"invalid_token\""),
            "{query}: {challenge}"
        );
        assert_eq!(response.text().await.unwrap(), expected_body, "{query}");
    }
    let (status, body) = call(&proxy, "/api/x", Some("not-a-jwt")).await;
    assert_eq!(
        (status, body.as_str()),
        (
            401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
        )
    );
    // Valid tokens of the good algorithms were counted as allowed, the rest as denied.
    let metrics = proxy.metrics().await;
    let denied = sample(
        &metrics,
        "nip_jwt_authn_requests_total",
        &[("decision", "denied")],
    );
    assert_eq!(denied, 10.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_is_fetched_again_and_kept_while_the_issuer_is_down() {
    let _turn = crate::common::module_turn(module_path!());
    let mut issuer = JwtIssuer::start().await;
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&config(&issuer, &backend, "")).await;
    let old = issuer.token("alg=ES256").await;
    assert_eq!(call(&proxy, "/api/x", Some(&old)).await.0, 200);

    // New keys with new kids replace the old ones at the issuer mid-test.
    assert_eq!(issuer.get("/rotate").await, "rotated");
    let new = issuer.token("alg=ES256").await;
    eventually("a token of the new key is accepted", || async {
        call(&proxy, "/api/x", Some(&new)).await.0 == 200
    })
    .await;
    let (status, body) = call(&proxy, "/api/x", Some(&old)).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "Jwks doesn't have key to match kid or alg from Jwt"),
        "the old key is gone from the JWKS"
    );

    // The issuer goes away: fetches fail, the last keys stay in use.
    let failed_before = sample(
        &proxy.metrics().await,
        "nip_jwks_fetches_total",
        &[("result", "failed")],
    );
    issuer.process.kill();
    eventually("JWKS fetches fail", || async {
        sample(
            &proxy.metrics().await,
            "nip_jwks_fetches_total",
            &[("result", "failed")],
        ) >= failed_before + 2.0
    })
    .await;
    assert_eq!(call(&proxy, "/api/x", Some(&new)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_denies_and_shadows_by_path_method_and_claims() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let backend = Backend::start("web").await;
    // Every route but /admin (which has its own rules): no DELETE from anyone outside
    // 10.0.0.0/8 — the test client is on 127.0.0.1.
    let listener_rbac = r#"  rbac:
    action: deny
    policies:
      no-remote-deletes:
        permissions: [{ methods: [DELETE] }]
        principals: [{ not: { source_ip: 10.0.0.0/8 } }]"#;
    let proxy = Proxy::start(&config(&issuer, &backend, listener_rbac)).await;
    let admin = issuer.token("roles=dev,admin").await;
    let developer = issuer.token("roles=dev").await;
    let bob_admin = issuer.token("sub=bob&roles=admin").await;

    // ALLOW: the admins policy — a path template and a list claim.
    assert_eq!(call(&proxy, "/admin/users/42", Some(&admin)).await.0, 200);
    let response = client()
        .get(proxy.url("/admin/users/42"))
        .bearer_auth(&developer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-nip-response-flags"], "RBAC");
    assert_eq!(response.text().await.unwrap(), "RBAC: access denied");
    assert_eq!(
        call(&proxy, "/admin", Some(&admin)).await.0,
        403,
        "/admin is outside /admin/{{section}}/**"
    );
    // Authentication comes first: no token is 401, not 403.
    assert_eq!(call(&proxy, "/admin/users/1", None).await.0, 401);

    // DENY at the listener: DELETE from outside 10/8 refused, GET passes; the admin
    // route's own rules replace the listener's.
    let delete = client()
        .delete(proxy.url("/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 403);
    assert_eq!(call(&proxy, "/public/x", None).await.0, 200);
    let delete_admin = client()
        .delete(proxy.url("/admin/users/42"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(delete_admin.status(), 200);

    // Shadow rules count what they would decide and refuse nothing.
    assert_eq!(
        call(&proxy, "/admin/users/7", Some(&bob_admin)).await.0,
        200
    );
    let metrics = proxy.metrics().await;
    let rbac = |filter: &str, decision: &str| {
        sample(
            &metrics,
            "nip_rbac_requests_total",
            &[("filter", filter), ("decision", decision)],
        )
    };
    let route_filter = "admin.envoy.filters.http.rbac";
    assert_eq!(rbac(route_filter, "allowed"), 3.0, "{metrics}");
    assert_eq!(rbac(route_filter, "denied"), 2.0, "{metrics}");
    assert_eq!(rbac(route_filter, "shadow_allowed"), 4.0, "{metrics}");
    assert_eq!(rbac(route_filter, "shadow_denied"), 1.0, "{metrics}");
    let listener_filter = "envoy.filters.http.rbac";
    assert_eq!(rbac(listener_filter, "denied"), 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "nip_response_flags_total", &[("flag", "RBAC")]),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_mistakes_are_refused_by_field_path() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nip.yaml");
    std::fs::write(
        &file,
        r#"
services:
  web: { endpoints: ["127.0.0.1:9"] }
auth:
  jwt_providers:
    idp: { jwks_uri: "ftp://idp/keys" }
routes:
  - service: web
    auth:
      jwt: { any: [idp, nobody] }
      rbac:
        action: permit
        policies:
          p: { permissions: [{ path: "/a/**/b" }], principals: [{ source_ip: "10.0.0.0/33" }] }
"#,
    )
    .unwrap();
    let output = run_nip(&["validate", "--file"], Some(&file));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "auth.jwt_providers.idp.jwks_uri",
        "routes[0].auth.jwt.any[1]",
        "\"nobody\" is not among auth.jwt_providers",
        "routes[0].auth.rbac.action",
        "routes[0].auth.rbac.policies.p.permissions[0].path",
        "routes[0].auth.rbac.policies.p.principals[0].source_ip",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in:\n{stderr}");
    }
}

/// The independent authorization service (tests/interop/authz_server.py).
struct Authorizer {
    process: Background,
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
}

impl Authorizer {
    async fn start() -> Authorizer {
        let (http, grpc) = (free_port(), free_port());
        let process = Background::python(&[
            script("authz_server.py").to_str().unwrap(),
            &http.to_string(),
            &grpc.to_string(),
        ]);
        process.wait_for("listening").await;
        Authorizer {
            process,
            http: ([127, 0, 0, 1], http).into(),
            grpc: ([127, 0, 0, 1], grpc).into(),
        }
    }
}

fn authz_config(backend: &Backend, authorizer: &Authorizer, ext_authz: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{backend}"] }}
  authz-http: {{ endpoints: ["{http}"] }}
  authz-grpc: {{ endpoints: ["{grpc}"], protocol: http2 }}
auth:
  ext_authz: {ext_authz}
routes:
  - {{ name: open, match: {{ path_prefix: /open }}, service: web, auth: {{ ext_authz: false }} }}
  - {{ name: gold, match: {{ path_prefix: /gold }}, service: web, auth: {{ ext_authz: {{ context: {{ tier: gold }} }} }} }}
  - {{ name: rest, service: web }}
"#,
        backend = backend.address,
        http = authorizer.http,
        grpc = authorizer.grpc,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_authorization_service_allows_denies_and_its_absence_is_an_error() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let mut authorizer = Authorizer::start().await;
    let proxy = Proxy::start(&authz_config(
        &backend,
        &authorizer,
        "{ service: authz-http, timeout: 500ms, status_on_error: 503, upstream_headers: [x-auth-user] }",
    ))
    .await;
    // Allowed: the service's x-auth-user reaches the upstream, its other headers do not.
    let response = client()
        .get(proxy.url("/orders"))
        .bearer_auth("letmein")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = last_headers(&backend);
    assert_eq!(
        headers.get("x-auth-user").map(String::as_str),
        Some("alice")
    );
    assert!(!headers.contains_key("x-ignored"));
    // Denied: the service's status, headers and body, flag UAEX; nothing upstream.
    let served = backend.requests();
    let response = client().get(proxy.url("/orders")).send().await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-authz-reason"], "no-token");
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(response.headers()["x-nip-response-flags"], "UAEX");
    assert_eq!(response.text().await.unwrap(), "denied by authz");
    assert_eq!(backend.requests(), served);
    // A route that turns it off.
    assert_eq!(call(&proxy, "/open/x", None).await.0, 200);
    // Too slow: status_on_error.
    let (status, _) = call(&proxy, "/slow/x", Some("letmein")).await;
    assert_eq!(status, 503);
    // Gone: status_on_error too.
    authorizer.process.kill();
    assert_eq!(call(&proxy, "/orders", Some("letmein")).await.0, 503);
    let metrics = proxy.metrics().await;
    let count = |decision| {
        sample(
            &metrics,
            "nip_ext_authz_requests_total",
            &[("decision", decision)],
        )
    };
    assert_eq!(
        (count("ok"), count("denied"), count("error")),
        (1.0, 1.0, 2.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_authorization_service_decides_with_the_routes_context() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let mut authorizer = Authorizer::start().await;
    let proxy = Proxy::start(&authz_config(
        &backend,
        &authorizer,
        "{ service: authz-grpc, protocol: grpc, timeout: 1s }",
    ))
    .await;
    let response = client()
        .get(proxy.url("/gold/x"))
        .bearer_auth("letmein")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-authz"], "grpc");
    let headers = last_headers(&backend);
    assert_eq!(
        headers.get("x-auth-user").map(String::as_str),
        Some("alice")
    );
    assert_eq!(
        headers.get("x-context-tier").map(String::as_str),
        Some("gold")
    );
    let response = client().get(proxy.url("/gold/x")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.text().await.unwrap(), "grpc says no");
    assert_eq!(authorizer_checks(&authorizer).await, (0, 2));

    // failure_mode_allow: with the service gone, requests pass.
    authorizer.process.kill();
    let lenient = Proxy::start(&authz_config(
        &backend,
        &authorizer,
        "{ service: authz-grpc, protocol: grpc, failure_mode_allow: true }",
    ))
    .await;
    assert_eq!(call(&lenient, "/gold/x", None).await.0, 200);
    assert_eq!(call(&proxy, "/gold/x", Some("letmein")).await.0, 403);
}

async fn authorizer_checks(authorizer: &Authorizer) -> (u64, u64) {
    let text = client()
        .get(format!("http://{}/checks", authorizer.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut parts = text.split(' ').map(|n| n.parse().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_count_per_api_key_per_verified_subject_and_per_address() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  web: {{ endpoints: ["{backend}"] }}
auth:
  jwt_providers:
    idp: {{ issuer: {issuer}, jwks_uri: {issuer}/jwks.json }}
routes:
  - name: by-key
    match: {{ path_prefix: /keyed }}
    service: web
    rate_limit: {{ requests: 2, per: 60s, key: {{ header: x-api-key }} }}
  - name: by-subject
    match: {{ path_prefix: /users }}
    service: web
    auth: {{ jwt: idp }}
    rate_limit: {{ requests: 2, per: 60s, key: {{ claim: sub }} }}
  - name: by-address
    match: {{ path_prefix: /addressed }}
    service: web
    rate_limit: {{ requests: 3, per: 60s, key: {{ source_ip: true }} }}
"#,
        backend = backend.address,
        issuer = issuer.url,
    ))
    .await;
    let keyed = |key: Option<&'static str>| {
        let mut request = client().get(proxy.url("/keyed"));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut statuses = Vec::new();
    for key in [
        Some("a"),
        Some("a"),
        Some("a"),
        Some("b"),
        Some("b"),
        None,
        None,
        None,
    ] {
        statuses.push(keyed(key).await);
    }
    assert_eq!(statuses, [200, 200, 429, 200, 200, 200, 200, 429]);

    let alice = issuer.token("sub=alice").await;
    let bob = issuer.token("sub=bob").await;
    let mut statuses = Vec::new();
    for token in [&alice, &alice, &alice, &bob, &bob] {
        statuses.push(call(&proxy, "/users/me", Some(token)).await.0);
    }
    assert_eq!(statuses, [200, 200, 429, 200, 200]);

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(call(&proxy, "/addressed", None).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let response = client().get(proxy.url("/addressed")).send().await.unwrap();
    assert_eq!(response.headers()["x-ratelimit-limit"], "3");
    assert_eq!(response.headers()["x-nip-response-flags"], "RL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_hold_a_global_limit_together_through_redis() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let (redis_port, service_a, service_b) = (free_port(), free_port(), free_port());
    let mut redis = redis_server(redis_port);
    redis.wait_for("Ready to accept connections").await;
    let config = |service: u16, failure_mode_deny: bool| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
rate_limit_service: {{ address: "127.0.0.1:{service}", failure_mode_deny: {failure_mode_deny}, timeout: 500ms }}
services:
  web: {{ endpoints: ["{backend}"] }}
routes:
  - name: shared
    match: {{ path_prefix: /shared }}
    service: web
    rate_limit: {{ requests: 100, per: 1s, burst: 5, scope: global }}
  - {{ name: free, service: web }}
"#,
            backend = backend.address,
        )
    };
    // Each proxy asks its own rate limit service; both services count in the one Redis.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("limits.yaml");
    std::fs::write(
        &file,
        config(service_a, false)
            .replace("{admin}", "1")
            .replace("{port}", "2"),
    )
    .unwrap();
    let rls_a = rate_limit_service(&file, redis_port, service_a);
    let rls_b = rate_limit_service(&file, redis_port, service_b);
    rls_a.wait_for("global limits").await;
    rls_b.wait_for("global limits").await;
    let proxy_a = Proxy::start(&config(service_a, false)).await;
    let proxy_b = Proxy::start(&config(service_b, true)).await;

    // Load through both proxies for 10 s; together they may pass 100/s (+ a burst of 5).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let url = if worker % 2 == 0 {
            proxy_a.url("/shared")
        } else {
            proxy_b.url("/shared")
        };
        workers.push(tokio::spawn(async move {
            let client = client();
            let (mut passed, mut limited, mut other) = (0u64, 0u64, 0u64);
            while std::time::Instant::now() < deadline {
                match client.get(&url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => passed += 1,
                    Ok(429) => limited += 1,
                    _ => other += 1,
                }
            }
            (passed, limited, other)
        }));
    }
    let (mut passed, mut limited, mut other) = (0, 0, 0);
    for worker in workers {
        let (p, l, o) = worker.await.unwrap();
        passed += p;
        limited += l;
        other += o;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 100.0 * elapsed + 5.0;
    let error = (passed as f64 - expected).abs() / expected;
    assert!(
        error <= 0.05,
        "{passed} passed in {elapsed:.2} s ({limited} limited, {other} other): expected {expected:.0} ± 5 %"
    );
    assert!(
        limited > passed,
        "the load was over the limit: {limited} limited"
    );
    assert_eq!(other, 0);
    // A limited answer says which limit.
    let response = client().get(proxy_a.url("/shared")).send().await.unwrap();
    if response.status() == 429 {
        assert_eq!(response.headers()["x-ratelimit-limit"], "100");
        assert_eq!(response.headers()["x-envoy-ratelimited"], "true");
        assert_eq!(response.headers()["x-nip-response-flags"], "RL");
    }
    // Routes without a global limit are not limited.
    assert_eq!(call(&proxy_a, "/other", None).await.0, 200);

    // Redis gone: the services cannot count; proxy A lets requests through (the default),
    // proxy B (failure_mode_deny) refuses them.
    redis.kill();
    assert_eq!(call(&proxy_a, "/shared", None).await.0, 200);
    let response = client().get(proxy_b.url("/shared")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(response.headers()["x-nip-response-flags"], "RLSE");
    let metrics = proxy_b.metrics().await;
    assert!(
        sample(
            &metrics,
            "nip_ratelimit_requests_total",
            &[("decision", "error")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_message_rate_gets_429_while_another_is_unaffected() {
    let _turn = crate::common::module_turn(module_path!());
    let acme = Backend::start("acme").await;
    let globex = Backend::start("globex").await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
tenants:
  acme: {{ resource_quota: {{ message_rate: "5/min" }}, data: {{ isolated: true }} }}
  globex: {{ resource_quota: {{ message_rate: "1000/sec" }} }}
services:
  acme-api: {{ endpoints: ["{acme}"], tenant: acme }}
  globex-api: {{ endpoints: ["{globex}"], tenant: globex }}
routes:
  - {{ name: acme-orders, match: {{ path_prefix: /acme/orders }}, service: acme-api, tenant: acme }}
  - {{ name: acme-users, match: {{ path_prefix: /acme/users }}, service: acme-api, tenant: acme,
      rate_limit: {{ requests: 100, per: 1s }} }}
  - {{ name: globex, match: {{ path_prefix: /globex }}, service: globex-api, tenant: globex }}
"#,
        acme = acme.address,
        globex = globex.address,
    ))
    .await;
    // One quota for all of acme's routes, its own route limits or not.
    let mut statuses = Vec::new();
    for path in [
        "/acme/orders",
        "/acme/users",
        "/acme/orders",
        "/acme/users",
        "/acme/orders",
        "/acme/users",
        "/acme/orders",
    ] {
        statuses.push(call(&proxy, path, None).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    let limited = client()
        .get(proxy.url("/acme/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.headers()["x-ratelimit-limit"], "5");
    assert_eq!(limited.headers()["x-nip-response-flags"], "RL");
    // Globex is not limited by acme's quota.
    for _ in 0..30 {
        assert_eq!(call(&proxy, "/globex/x", None).await.0, 200);
    }
    // Each tenant's requests are counted under its name.
    proxy
        .wait_for_sample(
            "nip_tenant_requests_total",
            &[("tenant", "globex"), ("status_class", "2xx")],
            30.0,
        )
        .await;
    let metrics = proxy.metrics().await;
    let acme = |class: &str| {
        sample(
            &metrics,
            "nip_tenant_requests_total",
            &[("tenant", "acme"), ("status_class", class)],
        )
    };
    assert_eq!((acme("2xx"), acme("4xx")), (5.0, 3.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_isolation_encryption_and_plugin_whitelist_are_checked_by_field_path() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    std::fs::write(
        &file,
        r#"
tenants:
  acme:
    plugins: { whitelist: ["acme:*"], allow_custom: false }
    data: { isolated: true, encryption: true }
  globex: { principals: ["*"] }
tenant_key: { header: x-tenant, claim: org }
auth:
  rbac:
    policies:
      tenants: { permissions: [{ any: true }], principals: [{ tenant: initech }] }
plugins:
  "acme:audit": { source: { file: /plugins/audit.wasm } }
  "official:cors": { source: { file: /plugins/cors.wasm } }
  homemade: { source: { file: /plugins/homemade.wasm } }
services:
  acme-api: { endpoints: ["127.0.0.1:9001"], tenant: acme, tls: { sni: api.acme } }
  acme-plain: { endpoints: ["127.0.0.1:9002"], tenant: acme }
  globex-api: { endpoints: ["127.0.0.1:9003"], tenant: globex }
routes:
  - { match: { path_prefix: /a }, service: acme-api, tenant: acme, plugins: ["acme:audit", "official:cors", homemade] }
  - { match: { path_prefix: /b }, service: globex-api, tenant: acme }
  - { match: { path_prefix: /c }, service: acme-plain, tenant: acme }
  - { match: { path_prefix: /d }, service: globex-api, tenant: initech }
"#,
    )
    .unwrap();
    let output = run_nip(&["validate", "--file"], Some(&file));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "routes[0].plugins[1]: \"official:cors\" is not in tenant acme's plugins.whitelist",
        "routes[0].plugins[2]: \"homemade\" is a custom plugin",
        "routes[1].service: tenant acme's data is isolated: service \"globex-api\" belongs to tenant globex",
        "routes[1].service: tenant acme requires encryption: service \"globex-api\" has no tls",
        "routes[2].service: tenant acme requires encryption: service \"acme-plain\" has no tls",
        "routes[3].tenant: \"initech\" is not among tenants",
        "tenant_key: set exactly one of header, claim, certificate: true",
        "tenants.globex.principals: are read only with tenant_key: { certificate: true }",
        "tenants.globex.principals[0]: \"*\" would match every certificate",
        "auth.rbac.policies.tenants.principals[0].tenant: \"initech\" is not among tenants",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in:\n{stderr}");
    }
    assert!(
        !stderr.contains("routes[0].plugins[0]"),
        "acme:audit is whitelisted:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_route_the_tenant_key_names_whose_quota_counts() {
    let _turn = crate::common::module_turn(module_path!());
    let issuer = JwtIssuer::start().await;
    let backend = Backend::start("shared").await;
    let config = |tenant_key: &str| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
auth:
  jwt_providers:
    idp: {{ issuer: {issuer}, jwks_uri: {issuer}/jwks.json }}
tenants:
  acme: {{ resource_quota: {{ message_rate: "3/min" }} }}
  globex: {{ resource_quota: {{ message_rate: "1000/sec" }} }}
tenant_key: {tenant_key}
services:
  api: {{ endpoints: ["{backend}"] }}
routes:
  - {{ name: shared, service: api, auth: {{ jwt: allow_missing }} }}
"#,
            issuer = issuer.url,
            backend = backend.address,
        )
    };
    // By header (as a trusted layer in front sets it).
    let proxy = Proxy::start(&config("{ header: x-tenant-id }")).await;
    let as_tenant = |tenant: Option<&'static str>| {
        let mut request = client().get(proxy.url("/x"));
        if let Some(tenant) = tenant {
            request = request.header("x-tenant-id", tenant);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut statuses = Vec::new();
    for tenant in [Some("acme"); 4] {
        statuses.push(as_tenant(tenant).await);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    for _ in 0..10 {
        assert_eq!(as_tenant(Some("globex")).await, 200);
        assert_eq!(as_tenant(None).await, 200, "no tenant: no tenant quota");
    }
    drop(proxy);
    // By a verified claim: the token's org names the tenant.
    let proxy = Proxy::start(&config("{ claim: org.id }")).await;
    let acme = issuer.token("org=acme").await;
    let globex = issuer.token("org=globex").await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(call(&proxy, "/x", Some(&acme)).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    for _ in 0..10 {
        assert_eq!(call(&proxy, "/x", Some(&globex)).await.0, 200);
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate per (name, URI SAN),
/// as PEM files in `dir`: `ca.pem`, `server.pem`, `server.key`, `NAME.pem` (certificate
/// and key, as a client presents them).
fn mtls_pki(dir: &std::path::Path, clients: &[(&str, &str)]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "NIP tenants CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut server = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    server.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gateway");
    let server = server.signed_by(&server_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    for (name, uri) in clients {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::Ia5String::try_from(uri.to_string()).unwrap(),
        )];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *name);
        let certificate = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(
            dir.join(format!("{name}.pem")),
            format!("{}{}", certificate.pem(), key.serialize_pem()),
        )
        .unwrap();
    }
}

/// An HTTPS client trusting `dir`'s CA, presenting `dir/NAME.pem` when a name is given.
fn tls_client(dir: &std::path::Path, identity: Option<&str>) -> reqwest::Client {
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(std::time::Duration::from_secs(20));
    if let Some(name) = identity {
        let pem = std::fs::read(dir.join(format!("{name}.pem"))).unwrap();
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_its_tenant_for_quota_rbac_metrics_and_logs() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("shared").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mtls_pki(
        d,
        &[
            ("acme", "spiffe://nip.local/ns/acme/sa/web"),
            ("globex", "spiffe://nip.local/ns/globex/sa/api"),
            ("stranger", "spiffe://nip.local/ns/other/sa/web"),
        ],
    );
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway:
  address: "127.0.0.1:{{port}}"
  tls: {{ enabled: true, cert_file: "{d}/server.pem", key_file: "{d}/server.key", client_ca_file: "{d}/ca.pem" }}
  access_log: {{ enabled: true, path: "{d}/access.log", format: json }}
auth:
  rbac:
    policies:
      tenants-only: {{ permissions: [{{ any: true }}], principals: [{{ tenant: acme }}, {{ tenant: globex }}] }}
tenants:
  acme: {{ principals: ["spiffe://nip.local/ns/acme/*"], resource_quota: {{ message_rate: "3/min" }} }}
  globex: {{ principals: ["spiffe://nip.local/ns/globex/*"], resource_quota: {{ message_rate: "1000/sec" }} }}
tenant_key: {{ certificate: true }}
services:
  api: {{ endpoints: ["{backend}"] }}
routes:
  - {{ name: shared, service: api }}
"#,
        d = d.display(),
        backend = backend.address,
    ))
    .await;
    let url = format!("https://127.0.0.1:{}/x", proxy.port);
    let get = |client: reqwest::Client| {
        let url = url.clone();
        async move {
            let response = client.get(&url).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    // The certificate's principal names the tenant, whose quota counts its requests.
    let acme = tls_client(d, Some("acme"));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(acme.clone()).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let globex = tls_client(d, Some("globex"));
    for _ in 0..10 {
        assert_eq!(get(globex.clone()).await.0, 200);
    }
    // RBAC lets in the two tenants only: a certificate of no tenant, or none, is refused.
    for client in [tls_client(d, Some("stranger")), tls_client(d, None)] {
        assert_eq!(get(client).await, (403, "RBAC: access denied".to_string()));
    }
    // Metrics and the access log name the tenant.
    proxy
        .wait_for_sample(
            "nip_tenant_requests_total",
            &[("tenant", "globex"), ("status_class", "2xx")],
            10.0,
        )
        .await;
    let metrics = proxy.metrics().await;
    let acme_class = |class: &str| {
        sample(
            &metrics,
            "nip_tenant_requests_total",
            &[("tenant", "acme"), ("status_class", class)],
        )
    };
    assert_eq!(
        (acme_class("2xx"), acme_class("4xx")),
        (3.0, 1.0),
        "{metrics}"
    );
    eventually("the access log names each request's tenant", || async {
        let log = std::fs::read_to_string(d.join("access.log")).unwrap_or_default();
        log.matches("\"tenant\":\"acme\"").count() == 4
            && log.matches("\"tenant\":\"globex\"").count() == 10
            && log.matches("\"tenant\":\"\"").count() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_retention_deletes_its_access_logs_past_it() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    // The UTC date some days ago, as the date command prints it.
    let date = |ago: u32| {
        let output = std::process::Command::new("date")
            .args(["-u", "-d", &format!("{ago} days ago"), "+%F"])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let old = dir.path().join(format!("access.log.{}", date(40)));
    let recent = dir.path().join(format!("access.log.{}", date(3)));
    std::fs::write(&old, "old\n").unwrap();
    std::fs::write(&recent, "recent\n").unwrap();
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway:
  address: "127.0.0.1:{{port}}"
  access_log: {{ enabled: true, format: json, path: "{log}" }}
tenants:
  acme: {{ data: {{ retention: 30d }} }}
services:
  web: {{ endpoints: ["{backend}"], tenant: acme }}
routes:
  - {{ service: web, tenant: acme }}
"#,
        log = log.display(),
        backend = backend.address,
    ))
    .await;
    assert_eq!(call(&proxy, "/x", None).await.0, 200);
    eventually("the request is logged under its tenant", || async {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("\"/x\"") && l.contains("\"tenant\":\"acme\""))
    })
    .await;
    assert!(
        !old.exists(),
        "a file older than the tenant's 30 days is deleted"
    );
    assert!(recent.exists(), "a file within them stays");
}
