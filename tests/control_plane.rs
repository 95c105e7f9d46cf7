//! `nip control-plane` as a process: stores versions (SQLite here; the store tests also run
//! on PostgreSQL), serves them over ADS, takes changes from `nip apply`, the REST API and a
//! followed file, refuses bad ones, rolls back, runs canaries, survives restarts. Checked
//! with real proxies and with the xDS client library a proxy uses.

use crate::common::control_plane::*;
use crate::common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_its_file_and_follows_good_changes_only() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("desired.yaml");
    std::fs::write(&config, services(&["web"])).unwrap();
    let control_plane = ControlPlane::start(Some(&config));
    let sink = ads_client(&control_plane, "test-proxy", "").await;
    eventually("the first config arrives", || {
        let sink = sink.clone();
        async move { sink.last() == ["web"] }
    })
    .await;

    std::fs::write(&config, services(&["web", "api"])).unwrap();
    eventually("the change arrives", || {
        let sink = sink.clone();
        async move { sink.last() == ["api", "web"] }
    })
    .await;

    // A broken file is refused with its field path; proxies keep the last good config.
    std::fs::write(&config, "routes:\n  - { service: nowhere }\n").unwrap();
    eventually("the refusal is logged", || async {
        let text = control_plane.log();
        text.contains("config change refused") && text.contains("routes[0].service")
    })
    .await;
    assert_eq!(sink.last(), ["api", "web"]);

    // And it goes on following the file.
    std::fs::write(&config, services(&["web", "api", "admin"])).unwrap();
    eventually("the next good change arrives", || {
        let sink = sink.clone();
        async move { sink.last() == ["admin", "api", "web"] }
    })
    .await;

    // Each good change of the file is a version by file:PATH; the refusal is an event.
    let history = control_plane.nip(&["history"]);
    let table = stdout(&history);
    assert!(history.status.success(), "{}", stderr(&history));
    assert_eq!(
        table.lines().count(),
        4,
        "a header and three versions:\n{table}"
    );
    assert!(table.contains("file:"), "{table}");
    let events = control_plane.get_json("/v1/events").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "refused"
                && e["detail"].as_str().unwrap().contains("routes[0].service")),
        "{events}"
    );
}

#[test]
fn an_invalid_file_at_start_is_a_config_error() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, "routes:\n  - { service: nowhere }\n").unwrap();
    let output = Command::new(nip_bin())
        .args(["control-plane", "--config"])
        .arg(&config)
        .args([
            "--store",
            &format!("sqlite://{}/nip.db", dir.path().display()),
        ])
        .args(["--xds-address", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-address", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("routes[0].service"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_follow_the_control_plane_under_load_and_nack_what_they_cannot_run() {
    let _turn = crate::common::module_turn(module_path!());
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let listen_port = free_port();
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let applied = control_plane.apply(&gateway(listen_port, &a, ""), &["-m", "first"]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(
        stdout(&applied).contains("version 1 applied"),
        "{}",
        stdout(&applied)
    );

    // The proxy's own file is only its bootstrap: node, admin port, control plane (with the
    // trust bundle and a join token: it joins, then speaks mutual TLS).
    let join_dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: edge-eu-1, region: eu-west }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\n{}",
            control_plane.control_plane_block("edge-eu-1", join_dir.path())
        ),
        listen_port,
    );
    proxy.wait_ready().await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-backend"], "a");

    // Steady load while the control plane moves the route to another backend.
    let load = SteadyLoad::start(&proxy.url("/"), 4);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let applied = control_plane.apply(&gateway(listen_port, &b, ""), &[]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    wait_routes_to(&proxy, "b").await;
    let (sent, failures) = load.stop().await;
    assert!(sent > 50, "the load was real ({sent} requests)");
    assert_eq!(failures, 0, "requests failed during the push");

    // A plugin module the control plane can see but the proxy cannot compile: the proxy
    // NACKs with the compiler's reason and keeps serving its last good config.
    let applied = control_plane.apply(&with_broken_plugin(listen_port, &b, dir.path()), &[]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    eventually("the proxy NACKs the set", || async {
        let log = proxy.log();
        log.contains("xDS NACK") && log.contains("plugin broken: cannot compile")
    })
    .await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "b");

    // The NACK is visible on the control plane: `nip get proxies`.
    let output = control_plane.nip(&["get", "proxies"]);
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("edge-eu-1"))
        .unwrap_or_else(|| panic!("the proxy is listed:\n{table}"));
    assert!(line.contains("eu-west") && line.contains("true"), "{line}");
    // The listener (plugin does not compile) and then the routes naming it are refused;
    // the last NACK names the broken plugin either way.
    assert!(line.contains("broken"), "{line}");
    assert!(
        line.contains("updating"),
        "it does not run version 3: {line}"
    );

    // Roll back to version 1: the proxy routes to a again, and runs that config.
    let rolled = control_plane.nip(&["rollback", "1", "-m", "back to a"]);
    assert!(rolled.status.success(), "{}", stderr(&rolled));
    assert!(
        stdout(&rolled).contains("version 4 restores version 1"),
        "{}",
        stdout(&rolled)
    );
    wait_routes_to(&proxy, "a").await;
    eventually("the proxy reports version 4", || async {
        let table = stdout(&control_plane.nip(&["get", "proxies"]));
        table
            .lines()
            .any(|l| l.starts_with("edge-eu-1") && l.contains(" 4 ") && l.ends_with(" -"))
    })
    .await;
    let history = stdout(&control_plane.nip(&["history"]));
    assert!(history.contains("rollback to 1"), "{history}");
    assert!(
        history.contains("token:bootstrap-admin-"),
        "the authenticated caller is recorded:\n{history}"
    );
    let diff = stdout(&control_plane.nip(&["history", "4"]));
    assert!(diff.contains("back to a") && diff.contains("+"), "{diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_goes_to_one_region_first_and_rolls_back_by_itself_on_a_nack() {
    let _turn = crate::common::module_turn(module_path!());
    let (a, b, port, control_plane) = serving_a().await;
    // eu: a real proxy; us: the xDS client library proxies use (one listener port here).
    let eu = proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    let us = ads_client(&control_plane, "edge-us-1", "us").await;
    eventually("us gets version 1", || {
        let us = us.clone();
        async move { us.last() == ["web"] }
    })
    .await;
    let us_sets = us.0.lock().unwrap().len();

    // A change the eu proxy cannot run (its plugin does not compile there).
    let dir = tempfile::tempdir().unwrap();
    let broken = with_broken_plugin(port, &b, dir.path());
    let refused = control_plane.apply(&broken, &["--canary", "eu", "--canary-timeout", "20s"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("canary rolled back")
            && message.contains("edge-eu-1")
            && message.contains("broken"),
        "{message}"
    );
    // eu may have run the canary's endpoints for a moment (xDS applies each type as it
    // comes, as Envoy does, before the listener it could not run was refused): after the
    // rollback it is on its config again.
    wait_routes_to(&eu, "a").await;
    assert_eq!(
        us.0.lock().unwrap().len(),
        us_sets,
        "us never saw the canary"
    );
    let history = stdout(&control_plane.nip(&["history"]));
    assert!(history.contains("aborted (eu)"), "{history}");
    let events = control_plane.get_json("/v1/events").await;
    let aborted = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "canary_aborted")
        .unwrap_or_else(|| panic!("an abort event: {events}"));
    assert_eq!(aborted["actor"], "control-plane");
    assert_eq!(aborted["version"], 2);

    // A good change: eu first, then — every eu proxy ACKed — everyone.
    let good = gateway(port, &b, "").replace(
        "services:\n",
        &format!("services:\n  api: {{ endpoints: [\"{}\"] }}\n", a.address),
    );
    let promoted = control_plane.apply(&good, &["--canary", "eu"]);
    assert!(promoted.status.success(), "{}", stderr(&promoted));
    assert!(
        stdout(&promoted).contains("canary ACKed by 1 (edge-eu-1), promoted"),
        "{}",
        stdout(&promoted)
    );
    assert_eq!(backend_of(&eu).await, "b");
    eventually("us gets the promoted version", || {
        let us = us.clone();
        async move { us.last() == ["api", "web"] }
    })
    .await;

    // A region without proxies proves nothing: rolled back.
    let nobody = control_plane.apply(
        &gateway(port, &a, ""),
        &["--canary", "mars", "--canary-timeout", "300ms"],
    );
    assert_eq!(nobody.status.code(), Some(1));
    assert!(
        stderr(&nobody).contains("no proxy of region \"mars\" is connected"),
        "{}",
        stderr(&nobody)
    );
    assert_eq!(backend_of(&eu).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_keep_serving_while_the_control_plane_restarts_and_converge_after() {
    let _turn = crate::common::module_turn(module_path!());
    let (_a, b, port, mut control_plane) = serving_a().await;
    let proxy = proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    assert_eq!(backend_of(&proxy).await, "a");

    let load = SteadyLoad::start(&proxy.url("/"), 4);
    control_plane.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        backend_of(&proxy).await,
        "a",
        "serving on without a control plane"
    );
    control_plane.respawn().await;
    // The restarted control plane serves what its store holds; the proxy reconnects.
    eventually("the proxy reconnects and runs version 1", || async {
        let table = stdout(&control_plane.nip(&["get", "proxies"]));
        table
            .lines()
            .any(|l| l.starts_with("edge-eu-1") && l.contains(" true ") && l.contains(" 1 "))
    })
    .await;
    control_plane.route_to(&proxy, port, &b).await;
    let (sent, failures) = load.stop().await;
    assert!(sent > 50, "the load was real ({sent} requests)");
    assert_eq!(
        failures, 0,
        "requests failed while the control plane was away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_explains_bad_input_and_documents_every_route() {
    let _turn = crate::common::module_turn(module_path!());
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let http = control_plane.http();
    let post_json = |path: &str, body: serde_json::Value| {
        http.post(control_plane.api(path))
            .header("x-nip-actor", "someone-else")
            .json(&body)
            .send()
    };

    // Invalid config: 422 with every field path; the CLI exits 2 with the same paths.
    let invalid = post_json(
        "/v1/config",
        serde_json::json!({ "yaml": "routes:\n  - { service: nowhere }\n" }),
    )
    .await
    .unwrap();
    assert_eq!(invalid.status(), 422);
    let body: serde_json::Value = invalid.json().await.unwrap();
    assert_eq!(body["errors"][0]["path"], "routes[0].service", "{body}");
    let cli = control_plane.apply("routes:\n  - { service: nowhere }\n", &[]);
    assert_eq!(cli.status.code(), Some(2));
    assert!(
        stderr(&cli).contains("routes[0].service"),
        "{}",
        stderr(&cli)
    );
    // One compile path: a document the v4 rules accept but the proxy's compiler refuses is
    // refused at apply (422 naming the service and the compiler's reason), by the CLI and
    // by `nip validate` alike — never stored for every proxy to NACK.
    let uncompilable = "services:\n  web:\n    endpoints: [\"127.0.0.1:9\"]\n    health_check: { path: \"/h z\", interval: 1s }\nroutes:\n  - { service: web }\n";
    let refused = post_json("/v1/config", serde_json::json!({ "yaml": uncompilable }))
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["path"], "services.web", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("compiler") && message.contains("http_health_check.path"),
        "{body}"
    );
    let cli = control_plane.apply(uncompilable, &[]);
    assert_eq!(cli.status.code(), Some(2), "{}", stdout(&cli));
    assert!(stderr(&cli).contains("services.web"), "{}", stderr(&cli));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), uncompilable).unwrap();
    let validated = run_nip(
        &["validate", "--file", &file.path().to_string_lossy()],
        None,
    );
    assert_eq!(validated.status.code(), Some(2), "{}", stdout(&validated));
    assert!(
        stderr(&validated).contains("http_health_check.path"),
        "{}",
        stderr(&validated)
    );
    let history = stdout(&control_plane.nip(&["history"]));
    assert!(
        !history.contains("version 1"),
        "nothing was stored:\n{history}"
    );
    let unreadable = post_json("/v1/config", serde_json::json!({ "yml": "" }))
        .await
        .unwrap();
    assert_eq!(unreadable.status(), 400);
    let bad_canary = post_json(
        "/v1/config",
        serde_json::json!({ "yaml": services(&["web"]), "canary": { "region": "eu", "timeout_seconds": -1 } }),
    )
    .await
    .unwrap();
    assert_eq!(bad_canary.status(), 400);

    // Raw YAML works too (curl --data-binary @file), and the same document twice is a no-op.
    let yaml_post = || {
        http.post(control_plane.api("/v1/config?message=first"))
            .header("content-type", "application/yaml")
            .body(services(&["web"]))
            .send()
    };
    assert_eq!(yaml_post().await.unwrap().status(), 201);
    let again: serde_json::Value = yaml_post().await.unwrap().json().await.unwrap();
    assert_eq!(again["result"], "unchanged");
    let current = control_plane.get_json("/v1/config").await;
    assert_eq!(current["version"], 1);
    assert_eq!(current["message"], "first");
    let author = current["author"].as_str().unwrap_or_default();
    assert!(
        author.starts_with("token:bootstrap-admin-"),
        "the authenticated identity, never a header: {author}"
    );

    let valid = post_json(
        "/v1/validate",
        serde_json::json!({ "yaml": services(&["x"]) }),
    )
    .await
    .unwrap();
    assert_eq!(valid.status(), 200);
    for (path, status) in [
        ("/v1/history/99", 404),
        ("/v1/history/abc", 400),
        ("/v1/history?limit=0", 400),
        ("/v1/events?limit=many", 400),
    ] {
        let response = http.get(control_plane.api(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
    }
    let missing = post_json("/v1/rollback/99", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Every path and method the OpenAPI document lists is served.
    let document = control_plane.get_json("/v1/openapi.json").await;
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.len() >= 8, "{paths:?}");
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            let url = control_plane.api(
                &path
                    .replace("{version}", "1")
                    .replace("{name}", "nobody")
                    .replace("{tenant}", "acme"),
            );
            let response = match method.as_str() {
                "get" => http.get(url).send().await.unwrap(),
                "delete" => http.delete(url).send().await.unwrap(),
                "put" => http
                    .put(url)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .unwrap(),
                "post" => http
                    .post(url)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .unwrap(),
                other => panic!("{path}: unexpected method {other}"),
            };
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert!(
                status != 405 && !(status == 404 && body.is_empty()),
                "{method} {path} is documented but not served ({status})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_is_a_control_plane_feeding_a_proxy_with_a_plugin() {
    let _turn = crate::common::module_turn(module_path!());
    let plugin = example_plugin("add_header");
    let [port, admin, xds, api] = [free_port(), free_port(), free_port(), free_port()];
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(nip_bin())
        .arg("demo")
        .args([
            "--port",
            &port.to_string(),
            "--admin-port",
            &admin.to_string(),
        ])
        .args([
            "--xds-port",
            &xds.to_string(),
            "--api-port",
            &api.to_string(),
        ])
        .arg("--plugin")
        .arg(&plugin)
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    struct Demo(Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let demo_dir = std::env::temp_dir().join(format!("nip-demo-{}", child.id()));
    let token_file = demo_dir.join("admin-token");
    let bundle = demo_dir.join("ca/trust-bundle.pem");
    let mut child = child;
    let stdout = child.stdout.take().unwrap();
    let _demo = Demo(child);
    // What the demo tells the user to try, up to its last line.
    let hints = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut hints = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("Stop with Ctrl-C");
            hints.push(line);
            if done {
                break;
            }
        }
        hints
    })
    .await
    .unwrap();
    eventually(
        "the demo's API refuses a caller without its token",
        || async {
            let Some(anonymous) = api_client(&bundle, None) else {
                return false;
            };
            anonymous
                .get(format!("https://127.0.0.1:{api}/v1/proxies"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 401)
        },
    )
    .await;
    eventually("the demo proxy answers through the plugin", || async {
        client()
            .get(format!("http://127.0.0.1:{port}/hello"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200 && r.headers().contains_key("x-demo-plugin"))
    })
    .await;
    eventually(
        "the control plane lists the demo proxy running version 1",
        || async {
            let Ok(token) = std::fs::read_to_string(&token_file) else {
                return false;
            };
            let Some(admin) = api_client(&bundle, Some(token.trim())) else {
                return false;
            };
            let proxies: serde_json::Value = match admin
                .get(format!("https://127.0.0.1:{api}/v1/proxies"))
                .send()
                .await
            {
                Ok(response) => response.json().await.unwrap_or_default(),
                Err(_) => return false,
            };
            proxies[0]["node_id"] == "demo-proxy" && proxies[0]["config_version"] == "1"
        },
    )
    .await;
    // The hints run as printed: the CLI named by its path (no nip on the PATH needed),
    // with the token and CA the printed export names.
    let exports = hints
        .iter()
        .find_map(|l| l.trim().strip_prefix("export "))
        .expect("an export hint");
    let get_proxies = hints
        .iter()
        .find(|l| l.contains(" get proxies"))
        .expect("a get proxies hint");
    let script = format!(
        "export {}\n{}",
        exports.split('#').next().unwrap(),
        get_proxies.split('#').next().unwrap()
    );
    let output = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && said.contains("demo-proxy"),
        "{script}\n{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        get_proxies.trim().starts_with(nip_bin()),
        "the hint names the binary: {get_proxies}"
    );
    // The demo proxy streams its access records: the printed logs hint shows them (its
    // --follow swapped for a bounded read here).
    let logs = hints
        .iter()
        .find(|l| l.contains(" logs --follow"))
        .expect("a logs hint");
    let _ = client()
        .get(format!("http://127.0.0.1:{port}/from-the-demo-test"))
        .send()
        .await
        .unwrap();
    let script = format!(
        "export {}\n{}",
        exports.split('#').next().unwrap(),
        logs.split('#')
            .next()
            .unwrap()
            .replace("--follow", "--limit 50")
    );
    eventually("the demo's requests reach nip logs", || async {
        let output = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        String::from_utf8_lossy(&output.stdout).contains("demo-proxy")
            && String::from_utf8_lossy(&output.stdout).contains("/from-the-demo-test")
    })
    .await;
    assert!(
        hints
            .iter()
            .any(|l| l.contains(&format!("https://localhost:{api}/dashboard"))),
        "a dashboard hint"
    );
    // What the demo promises: a 504 after the route's 2 s timeout — the budget of the
    // request and its retry together, not 2 s per try.
    let started = std::time::Instant::now();
    let slow = client()
        .get(format!("http://127.0.0.1:{port}/delay/3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2900),
        "answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_its_control_plane_is_down_serves_its_last_good_config() {
    let _turn = crate::common::module_turn(module_path!());
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let port = free_port();
    let saved = tempfile::tempdir().unwrap();
    let last_good = saved.path().join("state/last-good.xds");
    let mut control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    assert!(control_plane
        .apply(&gateway(port, &a, ""), &[])
        .status
        .success());
    // The certificate is kept next to the saved set (state/identity), so the restarted
    // proxy needs no join token to come back.
    let bootstrap = format!(
        "node: {{ id: edge-eu-1, region: eu }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{}\", last_good: \"{}\", ca_file: \"{}\", join_token_file: \"{}\" }}\n",
        control_plane.xds_port,
        last_good.display(),
        control_plane.bundle_file().display(),
        control_plane.join_token_file("edge-eu-1", saved.path()).display(),
    );
    let proxy = Proxy::spawn_on(&bootstrap, port);
    proxy.wait_ready().await;
    assert_eq!(backend_of(&proxy).await, "a");
    assert!(last_good.exists(), "the accepted set is saved");

    // Both go down; the proxy comes back first and serves what it saved.
    control_plane.kill();
    drop(proxy);
    let proxy = Proxy::spawn_on(&bootstrap, port);
    proxy.wait_ready().await;
    assert_eq!(backend_of(&proxy).await, "a");
    assert!(
        proxy.log().contains("serving the last good config"),
        "{}",
        proxy.log()
    );

    // The control plane returns with a change: the proxy follows it.
    control_plane.respawn().await;
    control_plane.route_to(&proxy, port, &b).await;

    // A saved file that is not a resource set is ignored with a warning (no crash).
    std::fs::write(&last_good, b"garbage").unwrap();
    control_plane.kill();
    drop(proxy);
    let broken = Proxy::spawn_on(&bootstrap, port);
    eventually("the unusable saved set is reported", || async {
        broken.log().contains("saved config not usable")
    })
    .await;
    assert!(
        std::path::Path::new(&format!("/proc/{}", broken.pid())).exists(),
        "still running, waiting for its control plane"
    );
}

/// A fresh database on the test PostgreSQL server (`./dev test` starts one).
fn postgres_database() -> String {
    let server = std::env::var("NIP_TEST_POSTGRES_URL").expect(
        "NIP_TEST_POSTGRES_URL is not set: run the tests with ./dev test, which starts PostgreSQL",
    );
    let name = format!("nip_replicas_{}_{}", std::process::id(), free_port());
    let created = Command::new("psql")
        .arg(&server)
        .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql (PostgreSQL's client) runs");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_postgresql_serve_each_others_changes() {
    let _turn = crate::common::module_turn(module_path!());
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let port = free_port();
    let store = postgres_database();
    let first = ControlPlane::start_on(Some(&store), None);
    first.wait_ready().await;
    // The second replica is given the first one's admin token file and CA, as replicas
    // are given one secret and one CA; it makes neither of its own.
    let mut second = ControlPlane::start_on(Some(&store), None);
    second.kill();
    std::fs::copy(&first.admin_token_file, &second.admin_token_file).unwrap();
    let _ = std::fs::remove_dir_all(second.ca_dir());
    let status = Command::new("cp")
        .arg("-a")
        .arg(first.ca_dir())
        .arg(second.ca_dir())
        .status()
        .unwrap();
    assert!(status.success());
    second.spawn();
    second.wait_ready().await;
    assert!(first.apply(&gateway(port, &a, ""), &[]).status.success());
    // The proxy talks to the second replica; changes are applied through the first.
    let proxy = proxy_of(&second, "edge-eu-1", "eu", port).await;
    assert_eq!(backend_of(&proxy).await, "a");
    assert!(first
        .apply(&gateway(port, &b, ""), &["-m", "via the first"])
        .status
        .success());
    wait_routes_to(&proxy, "b").await;
    let history = stdout(&second.nip(&["history"]));
    assert!(history.contains("via the first"), "{history}");
    eventually(
        "the second replica sees the proxy run version 2",
        || async {
            let table = stdout(&second.nip(&["get", "proxies"]));
            table
                .lines()
                .any(|l| l.starts_with("edge-eu-1") && l.contains(" 2 "))
        },
    )
    .await;
    // A rollback through the second replica reaches the proxy too.
    assert!(second.nip(&["rollback", "1"]).status.success());
    wait_routes_to(&proxy, "a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renaming_a_service_under_load_drops_no_request() {
    let _turn = crate::common::module_turn(module_path!());
    let (a, b, port, control_plane) = serving_a().await;
    let proxy = proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    let load = SteadyLoad::start(&proxy.url("/"), 4);
    for (round, (backend, name)) in [(&b, "b"), (&a, "a"), (&b, "b"), (&a, "a"), (&b, "b")]
        .into_iter()
        .enumerate()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The route moves to a service of a new name; the old one disappears in the same change.
        let renamed = gateway(port, backend, "").replace("web", &format!("web{round}"));
        assert!(control_plane.apply(&renamed, &[]).status.success());
        wait_routes_to(&proxy, name).await;
        // The route moves to a service that already exists, and the old one goes.
        let both = renamed.replace(
            "services:\n",
            &format!(
                "services:\n  next{round}: {{ endpoints: [\"{}\"] }}\n",
                backend.address
            ),
        );
        assert!(control_plane.apply(&both, &[]).status.success());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let moved = both
            .replace(
                &format!("  web{round}: {{ endpoints: [\"{}\"] }}\n", backend.address),
                "",
            )
            .replace(
                &format!("service: web{round}"),
                &format!("service: next{round}"),
            );
        assert!(control_plane.apply(&moved, &[]).status.success(), "{moved}");
    }
    let (sent, failures) = load.stop().await;
    assert!(sent > 50, "the load was real ({sent} requests)");
    assert_eq!(failures, 0, "requests failed while services were renamed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_bodies_are_refused_at_once_and_stall_nothing() {
    let _turn = crate::common::module_turn(module_path!());
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let http = control_plane.http();
    let applied = http
        .post(control_plane.api("/v1/config"))
        .header("content-type", "application/yaml")
        .body(services(&["web"]))
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201);
    // 80 KB nested 40,000 deep, twice at once (libyaml alone spent seconds on each).
    let deep = format!("services: {}", "[".repeat(80_000));
    let started = Instant::now();
    let post = || {
        http.post(control_plane.api("/v1/validate"))
            .header("content-type", "application/yaml")
            .body(deep.clone())
            .send()
    };
    let (a, b) = tokio::join!(post(), post());
    for response in [a.unwrap(), b.unwrap()] {
        assert_eq!(response.status(), 422);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body.to_string().contains("nesting deeper than 64 levels"),
            "{body}"
        );
    }
    // A new xDS client is served meanwhile, and the API answers.
    let clusters = ads_client(&control_plane, "after-deep", "eu").await;
    eventually("a new xDS client gets the clusters", || async {
        clusters.last() == ["web"]
    })
    .await;
    let proxies = http
        .get(control_plane.api("/v1/proxies"))
        .send()
        .await
        .unwrap();
    assert_eq!(proxies.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
}
