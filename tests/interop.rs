//! Interoperability with xDS peers that share no code with NIP (Python `grpcio` and
//! `xds-protos`, installed by `./dev test` into a virtualenv named by `NIP_TEST_PYTHON`):
//! a proxyless gRPC client resolving `xds:///NAME` through `nip control-plane`, and a NIP
//! proxy driven by an independent xDS server; and an OIDC issuer signing with PyJWT whose
//! tokens the control plane takes. Scripts are in `tests/interop/`.

use crate::common::*;
use std::path::Path;
use std::process::{Command, Stdio};

async fn echo_server(name: &str) -> (Background, u16) {
    let port = free_port();
    let server = Background::python(&[
        script("echo_server.py").to_str().unwrap(),
        &port.to_string(),
        name,
    ]);
    server.wait_for("listening").await;
    (server, port)
}

fn apply(api: &str, token_file: &std::path::Path, yaml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let output = Command::new(nip_bin())
        .args(["apply", "-f"])
        .arg(file.path())
        .args(["--control-plane", api])
        .arg("--token-file")
        .arg(token_file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_resolves_xds_targets_through_the_control_plane() {
    let _turn = crate::common::module_turn(module_path!());
    let (_one, one_port) = echo_server("one").await;
    let (_two, two_port) = echo_server("two").await;
    let dir = tempfile::tempdir().unwrap();
    let (xds_port, api_port) = (free_port(), free_port());
    let control_plane = Background::start(
        Command::new(nip_bin())
            .arg("control-plane")
            .args([
                "--store",
                &format!("sqlite://{}/nip.db", dir.path().display()),
            ])
            .args(["--xds-address", &format!("127.0.0.1:{xds_port}")])
            .args(["--api-address", &format!("127.0.0.1:{api_port}")])
            .arg("--admin-token-file")
            .arg(dir.path().join("admin-token"))
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            // grpc-python's xDS client speaks plaintext here (its TLS needs certificate
            // provider plugins this test does not set up).
            .arg("--plaintext")
            .stdin(Stdio::null()),
    );
    control_plane.wait_for("serving ADS").await;
    let api = format!("http://127.0.0.1:{api_port}");
    let services = |port: u16| {
        format!("services:\n  echo: {{ endpoints: [\"127.0.0.1:{port}\"], protocol: http2 }}\n")
    };
    apply(&api, &dir.path().join("admin-token"), &services(one_port));

    let client = |expect: &str| {
        Background::python(&[
            script("grpc_xds_client.py").to_str().unwrap(),
            &format!("127.0.0.1:{xds_port}"),
            "echo",
            "grpc-client-1",
            "eu",
            expect,
            "20",
        ])
    };
    let mut first = client("one: hello");
    assert_eq!(first.exit_code().await, Some(0), "{}", first.output());

    // A live client follows a push: its calls move to the other server.
    let mut following = client("two: hello");
    following.wait_for("one: hello").await;
    apply(&api, &dir.path().join("admin-token"), &services(two_port));
    assert_eq!(
        following.exit_code().await,
        Some(0),
        "{}",
        following.output()
    );

    // The client is a proxy like any other on the control plane: ACKed, no NACK. Each
    // client process had its own stream, listed apart; the later one ran version 2.
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let proxies: serde_json::Value = crate::common::client()
        .get(format!("{api}/v1/proxies"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let streams: Vec<&serde_json::Value> = proxies
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["node_id"] == "grpc-client-1")
        .collect();
    assert!(streams.len() >= 2, "one row per stream: {proxies}");
    let grpc = streams
        .into_iter()
        .max_by_key(|p| p["stream_id"].as_u64())
        .unwrap_or_else(|| panic!("the gRPC client is listed: {proxies}"));
    assert_eq!(grpc["region"], "eu");
    assert!(grpc["last_nack"].is_null(), "{grpc}");
    assert_eq!(grpc["config_version"], "2", "{grpc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nip_proxy_runs_on_an_independent_xds_server() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("a").await;
    let backend2 = Backend::start("b").await;
    let plugin = example_plugin("add_header");
    let (xds_port, listen_port) = (free_port(), free_port());
    let server = Background::python(&[
        script("xds_server.py").to_str().unwrap(),
        &xds_port.to_string(),
        &listen_port.to_string(),
        &backend.address.port().to_string(),
        &backend2.address.port().to_string(),
        plugin.to_str().unwrap(),
    ]);
    server.wait_for("listening").await;
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: py-driven, region: eu }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{xds_port}\" }}\n"
        ),
        listen_port,
    );
    proxy.wait_ready().await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "a");
    for type_name in [
        "Cluster",
        "ClusterLoadAssignment",
        "Listener",
        "RouteConfiguration",
    ] {
        server.wait_for(&format!("v3.{type_name} 1\n")).await;
    }
    // Version 2 adds a route to a new cluster, and a cluster type NIP does not run: the
    // good part is applied, and the response that completed the set is NACKed naming the
    // bad cluster.
    server.wait_for("NACK ").await;
    let nack = server
        .output()
        .lines()
        .find(|l| l.starts_with("NACK"))
        .unwrap_or_default()
        .to_string();
    assert!(
        nack.contains("Cluster \"logical\": type LOGICAL_DNS is not supported"),
        "{nack}"
    );
    assert!(
        nack.contains("Cluster \"buffered\": per_connection_buffer_limit_bytes: NIP does not implement this field"),
        "{nack}"
    );
    eventually("the new route and cluster serve", || async {
        client()
            .get(proxy.url("/v2/x"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200 && r.headers()["x-backend"] == "b")
    })
    .await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-backend"], "a");
    // A Wasm filter that is not `disabled` runs on every route, as in Envoy (its listener
    // may come a push after the routes).
    eventually("the stamp filter runs on the catch-all route", || async {
        client()
            .get(proxy.url("/"))
            .send()
            .await
            .is_ok_and(|r| r.headers().get("x-stamp").is_some_and(|v| v == "on"))
    })
    .await;
    // Version 2's gateway fields, written by a control plane that is not NIP.
    let response = client()
        .get(proxy.url("/v2/x?q=1"))
        .header("x-drop", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(backend2.last_target(), "/internal/x?q=1", "prefix_rewrite");
    assert_eq!(
        backend2.last_header("host").as_deref(),
        Some("backend2.local")
    );
    assert_eq!(backend2.last_header("x-route").as_deref(), Some("HTTP/1.1"));
    // Route, then virtual host, then route configuration: the last overwrites.
    assert_eq!(backend2.last_header("x-level").as_deref(), Some("config"));
    assert_eq!(backend2.last_header("x-drop"), None);
    assert_eq!(
        response.headers()["x-upstream"],
        backend2.address.to_string().as_str()
    );
    assert!(!response.headers().contains_key("x-internal"));
    assert_eq!(response.headers()["x-stamp"], "on");
    backend2.set_status(409);
    let before = backend2.requests();
    let response = client()
        .get(proxy.url("/v2/conflict"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(
        backend2.requests() - before,
        2,
        "one retry of a retriable status"
    );
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let moved = no_redirects.get(proxy.url("/moved")).send().await.unwrap();
    assert_eq!(moved.status(), 307);
    assert_eq!(moved.headers()["location"], "https://127.0.0.1/here");
    let ping = client().get(proxy.url("/ping")).send().await.unwrap();
    assert_eq!(ping.status(), 202);
    assert_eq!(ping.text().await.unwrap(), "pong");
}

/// A TLS server (`openssl s_server -www`) whose certificate names `passthrough.test`,
/// signed by a CA made here; its port and the CA's PEM.
async fn passthrough_tls_server(dir: &Path) -> (Background, u16, Vec<u8>) {
    ca_and_server_certificate(dir, "passthrough.test");
    let port = free_port();
    let server = Background::start(Command::new("openssl").args([
        "s_server",
        "-accept",
        &format!("127.0.0.1:{port}"),
        "-cert",
        dir.join("server.pem").to_str().unwrap(),
        "-key",
        dir.join("server.key").to_str().unwrap(),
        "-www",
        "-quiet",
    ]));
    eventually("openssl s_server listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    (server, port, std::fs::read(dir.join("ca.pem")).unwrap())
}

/// A server-first TCP service: greets with `hello\n`, echoes what it reads, and when the
/// client has sent everything (EOF) says `bye\n` and closes.
async fn greeting_echo_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                socket.write_all(b"hello\n").await?;
                let mut buf = [0u8; 1024];
                loop {
                    let n = socket.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    socket.write_all(&buf[..n]).await?;
                }
                socket.write_all(b"bye\n").await?;
                socket.shutdown().await
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_style_outbound_listener_sends_http_tls_and_tcp_each_its_way() {
    let _turn = crate::common::module_turn(module_path!());
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("a").await;
    let (_tls_server, tls_port, ca) = passthrough_tls_server(dir.path()).await;
    let echo = greeting_echo_server().await;
    let (xds_port, listen_port, inbound_port) = (free_port(), free_port(), free_port());
    let server = Background::python(&[
        script("sidecar_xds_server.py").to_str().unwrap(),
        &xds_port.to_string(),
        &listen_port.to_string(),
        &backend.address.port().to_string(),
        &tls_port.to_string(),
        &echo.port().to_string(),
        &inbound_port.to_string(),
    ]);
    server.wait_for("listening").await;
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: sidecar-1, region: eu }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{xds_port}\" }}\n"
        ),
        listen_port,
    );
    proxy.wait_ready().await;

    // HTTP (the http_inspector saw a request line): the connection manager's route.
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "a");

    // The inbound listener's own connection manager answers itself, over HTTP/1.1 and
    // over h2c (the streams of an HTTP/2 connection find their manager too).
    let inbound = format!("http://127.0.0.1:{inbound_port}/");
    let response = client().get(&inbound).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "inbound");
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let response = h2c.get(&inbound).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.text().await.unwrap(), "inbound");
    }
    let response = h2c.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.headers()["x-backend"], "a");

    // TLS for passthrough.test: relayed untouched, so the client verifies the backend's
    // own certificate (the proxy has none for that name).
    let proxy_address: std::net::SocketAddr = ([127, 0, 0, 1], listen_port).into();
    let tls_client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("passthrough.test", proxy_address)
        .build()
        .unwrap();
    let response = tls_client
        .get(format!("https://passthrough.test:{listen_port}/"))
        .send()
        .await
        .expect("TLS through the proxy to the backend's certificate");
    assert_eq!(response.status(), 200);

    // Opaque TCP (redis's first bytes): the default chain; bytes both ways, and the
    // client's half-close reaches the server, whose last words still come back.
    let mut tcp = tokio::net::TcpStream::connect(proxy_address).await.unwrap();
    let ping = b"*1\r\n$4\r\nPING\r\n";
    tcp.write_all(ping).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut received),
    )
    .await
    .expect("the relay ends when both sides are done")
    .unwrap();
    let expected = [&b"hello\n"[..], ping, b"bye\n"].concat();
    assert_eq!(received, expected);
    let opaque = [("stat_prefix", "opaque")];
    proxy
        .wait_for_sample(
            "nip_tcp_downstream_cx_rx_bytes_total",
            &opaque,
            ping.len() as f64,
        )
        .await;
    proxy
        .wait_for_sample(
            "nip_tcp_downstream_cx_tx_bytes_total",
            &opaque,
            expected.len() as f64,
        )
        .await;
    proxy
        .wait_for_sample("nip_tcp_downstream_cx_active", &opaque, 0.0)
        .await;

    // A server-first protocol: the client says nothing, the inspectors give up after
    // listener_filters_timeout (1 s) and continue, the server's greeting arrives; after
    // idle_timeout (2 s) of silence the connection is closed.
    let started = std::time::Instant::now();
    let mut quiet = tokio::net::TcpStream::connect(proxy_address).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        quiet.read_to_end(&mut greeting),
    )
    .await
    .expect("closed at the idle timeout")
    .unwrap();
    assert_eq!(greeting, b"hello\n");
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_secs(3), "{took:?}");
    proxy
        .wait_for_sample("nip_tcp_idle_timeout_total", &opaque, 1.0)
        .await;
    proxy
        .wait_for_sample(
            "nip_tcp_downstream_cx_total",
            &[("stat_prefix", "passthrough")],
            1.0,
        )
        .await;

    // Version 2 adds a listener filter NIP does not run: NACKed by name, version 1 serves on.
    server.wait_for("NACK ").await;
    let nack = server
        .output()
        .lines()
        .find(|l| l.starts_with("NACK"))
        .unwrap_or_default()
        .to_string();
    assert!(
        nack.contains("Listener \"virtualOutbound\": listener_filters[2] \"envoy.filters.listener.proxy_protocol\": not supported"),
        "{nack}"
    );
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_of_an_oidc_issuer_signed_by_pyjwt_are_api_credentials_with_their_roles() {
    let _turn = crate::common::module_turn(module_path!());
    let port = free_port();
    let issuer = Background::python(&[
        script("oidc_issuer.py").to_str().unwrap(),
        &port.to_string(),
    ]);
    issuer.wait_for("listening").await;
    let issuer_url = format!("http://127.0.0.1:{port}");
    let control_plane = crate::common::control_plane::ControlPlane::start_with(
        None,
        None,
        &["--oidc-issuer", &issuer_url, "--oidc-audience", "nip"],
    );
    control_plane.wait_ready().await;
    let mint = |query: &str| {
        let url = format!("{issuer_url}/token?{query}");
        async move {
            crate::common::client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let call = |jwt: String, method: &str, path: &str| {
        let client = control_plane.client_with(&jwt);
        let url = control_plane.api(path);
        let post = method == "POST";
        async move {
            let request = if post {
                client
                    .post(url)
                    .header("content-type", "application/yaml")
                    .body("services:\n  web: { endpoints: [\"127.0.0.1:9000\"] }\nroutes:\n  - { service: web }\n")
            } else {
                client.get(url)
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    // The role in the claims decides, as with NIP tokens; the author is the subject.
    let viewer = mint("sub=vera&role=viewer").await;
    let operator = mint("sub=otto&role=operator").await;
    assert_eq!(call(viewer.clone(), "GET", "/v1/proxies").await.0, 200);
    let (status, body) = call(viewer, "POST", "/v1/config").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("oidc:vera is a viewer"), "{body}");
    let (status, body) = call(operator, "POST", "/v1/config").await;
    assert_eq!(status, 201, "{body}");
    let current = control_plane.get_json("/v1/config").await;
    assert_eq!(current["author"], "oidc:otto");

    // What does not verify is 401 with the reason; a verified caller without a role is 403.
    for (query, status, why) in [
        ("role=admin&sign=other", 401, "InvalidSignature"),
        ("role=admin&aud=someone-else", 401, "InvalidAudience"),
        ("role=admin&iss=http://evil.example", 401, "InvalidIssuer"),
        ("role=admin&ttl=-120", 401, "ExpiredSignature"),
        ("role=admin&kid=k9", 401, "no key"),
        ("role=root", 403, "not viewer, operator or admin"),
        ("sub=nobody", 403, "no nip_role claim"),
        ("role=admin&tenants=", 403, "empty tenant list"),
    ] {
        let (got, body) = call(mint(query).await, "GET", "/v1/proxies").await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(why), "{query}: {body}");
    }
    // Tenants in the claims limit as a token's do.
    let acme = mint("sub=ann&role=operator&tenants=acme").await;
    let (status, body) = call(acme, "GET", "/v1/config").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("tenants acme only"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_sds_client_gets_the_trust_bundle_over_mutual_tls() {
    let _turn = crate::common::module_turn(module_path!());
    let control_plane = crate::common::control_plane::ControlPlane::start(None);
    control_plane.wait_ready().await;
    let applied = control_plane.apply(
        "api_gateway: { address: \"127.0.0.1:8080\" }\nservices:\n  web: { endpoints: [\"127.0.0.1:9\"] }\nroutes:\n  - { service: web }\n",
        &[],
    );
    assert!(
        applied.status.success(),
        "{}",
        crate::common::control_plane::stderr(&applied)
    );
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = control_plane
        .member_certificate("sds-client", dir.path())
        .await;
    let mut client = Background::python(&[
        script("sds_client.py").to_str().unwrap(),
        &format!("127.0.0.1:{}", control_plane.xds_port),
        control_plane.bundle_file().to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        "sds-client",
        "ROOTCA",
    ]);
    assert_eq!(client.exit_code().await, Some(0), "{}", client.output());
    let output = client.output();
    // FetchSecrets, StreamSecrets and ADS agree: the bundle with its one root; a stream
    // claiming another node than its certificate names is refused, and SDS asked for
    // another type says so.
    for line in [
        "fetch ROOTCA 1",
        "stream ROOTCA 1",
        "ads ROOTCA 1",
        "denied PERMISSION_DENIED",
        "wrong-type INVALID_ARGUMENT",
    ] {
        assert!(output.contains(line), "{line:?} in {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_policy_filters_from_an_independent_xds_server_are_enforced() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("a").await;
    let (xds_port, listen_port) = (free_port(), free_port());
    let server = Background::python(&[
        script("policy_xds_server.py").to_str().unwrap(),
        &xds_port.to_string(),
        &listen_port.to_string(),
        &backend.address.port().to_string(),
    ]);
    server.wait_for("listening").await;
    let token = server
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("TOKEN "))
        .expect("the server printed a token")
        .to_string();
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: py-policy }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{xds_port}\" }}\n"
        ),
        listen_port,
    );
    proxy.wait_ready().await;
    for type_name in [
        "Cluster",
        "ClusterLoadAssignment",
        "Listener",
        "RouteConfiguration",
    ] {
        server.wait_for(&format!("v3.{type_name} 1\n")).await;
    }
    assert!(!server.output().contains("NACK"), "{}", server.output());
    // jwt_authn, per route: 401 without the token, the claim upstream with it.
    let response = client().get(proxy.url("/jwt/x")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = client()
        .get(proxy.url("/jwt/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        backend
            .control
            .last_headers
            .lock()
            .unwrap()
            .get("x-user")
            .cloned(),
        Some("xds-user".to_string())
    );
    // RBAC: DELETE denied everywhere; GET passes.
    let delete = client().delete(proxy.url("/open")).send().await.unwrap();
    assert_eq!(delete.status(), 403);
    assert_eq!(
        client()
            .get(proxy.url("/open"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // local_ratelimit, per route: 3 a minute on /jwt (one used above).
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client()
            .get(proxy.url("/jwt/x"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
}
