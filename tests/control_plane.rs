//! `nip control-plane` as a process: stores versions (SQLite here; the store tests also run
//! on PostgreSQL), serves them over ADS, takes changes from `nip apply`, the REST API and a
//! followed file, refuses bad ones, rolls back, runs canaries, survives restarts. Checked
//! with real proxies and with the xDS client library a proxy uses.

mod common;

use common::*;
use nip_xds::client::{AdsClient, ResourceSink};
use nip_xds::envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use nip_xds::ResourceSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records the cluster names of every set it is given.
#[derive(Clone, Default)]
struct Clusters(Arc<Mutex<Vec<Vec<String>>>>);

impl ResourceSink for Clusters {
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        let names = resources.clusters.iter().map(|c| c.name.clone()).collect();
        self.0.lock().unwrap().push(names);
        Ok(())
    }
}

impl Clusters {
    fn last(&self) -> Vec<String> {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }
}

/// A `nip control-plane` process with its own store, ports and log; killed when dropped.
struct ControlPlane {
    child: Option<Child>,
    store: String,
    config: Option<std::path::PathBuf>,
    xds_port: u16,
    api_port: u16,
    log: std::path::PathBuf,
    admin_token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts one on a fresh SQLite store, following `config` if given.
    fn start(config: Option<&std::path::Path>) -> ControlPlane {
        ControlPlane::start_on(None, config)
    }

    /// Starts one on `store` (a fresh SQLite store when `None`).
    fn start_on(store: Option<&str>, config: Option<&std::path::Path>) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let mut control_plane = ControlPlane {
            child: None,
            store: store.map_or_else(
                || format!("sqlite://{}/store/nip.db", dir.path().display()),
                str::to_string,
            ),
            config: config.map(|c| c.to_path_buf()),
            xds_port: free_port(),
            api_port: free_port(),
            log: dir.path().join("control-plane.log"),
            admin_token_file: dir.path().join("admin-token"),
            _dir: dir,
        };
        control_plane.spawn();
        control_plane
    }

    fn command(&self) -> Command {
        let mut command = Command::new(nip_bin());
        command
            .args(["control-plane", "--store", &self.store])
            .args(["--xds-address", &format!("127.0.0.1:{}", self.xds_port)])
            .args(["--api-address", &format!("127.0.0.1:{}", self.api_port)])
            .arg("--admin-token-file")
            .arg(&self.admin_token_file);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            self.command()
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// Kills it hard (no goodbye to its streams).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn xds_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds_port)
    }

    fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }

    /// Runs a `nip` CLI verb against this control plane.
    fn nip(&self, args: &[&str]) -> std::process::Output {
        Command::new(nip_bin())
            .args(args)
            .args(["--control-plane", &self.api("")])
            .env("NIP_TOKEN_FILE", &self.admin_token_file)
            .output()
            .unwrap()
    }

    /// `nip apply -f` of `yaml` (written to a file first); the CLI's output.
    fn apply(&self, yaml: &str, extra: &[&str]) -> std::process::Output {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), yaml).unwrap();
        let path = file.path().display().to_string();
        let mut args = vec!["apply", "-f", path.as_str()];
        args.extend_from_slice(extra);
        self.nip(&args)
    }

    /// The admin token its first start made (or was given).
    fn admin_token(&self) -> String {
        std::fs::read_to_string(&self.admin_token_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// An HTTP client that sends `token` as its bearer token.
    fn client_with(token: &str) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .default_headers(headers)
            .build()
            .unwrap()
    }

    /// An HTTP client with the admin token.
    fn http(&self) -> reqwest::Client {
        ControlPlane::client_with(&self.admin_token())
    }

    /// `GET` of an API path with the admin token, as JSON.
    async fn get_json(&self, path: &str) -> serde_json::Value {
        self.http()
            .get(self.api(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_ready(&self) {
        eventually("the control plane answers", || async {
            client().get(self.api("/v1/proxies")).send().await.is_ok()
        })
        .await;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A library ADS client (the one proxies use) as node `id` in `region`, recording what
/// it is sent.
fn ads_client(control_plane: &ControlPlane, id: &str, region: &str) -> Clusters {
    let sink = Clusters::default();
    let node = Node {
        id: id.into(),
        locality: Some(Locality {
            region: region.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    tokio::spawn(AdsClient::new(control_plane.xds_url(), node, sink.clone()).run());
    sink
}

fn services(names: &[&str]) -> String {
    let mut yaml = String::from("services:\n");
    for (i, name) in names.iter().enumerate() {
        yaml.push_str(&format!(
            "  {name}: {{ endpoints: [\"127.0.0.1:{}\"] }}\n",
            9000 + i
        ));
    }
    yaml.push_str(&format!("routes:\n  - {{ service: {} }}\n", names[0]));
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_its_file_and_follows_good_changes_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("desired.yaml");
    std::fs::write(&config, services(&["web"])).unwrap();
    let control_plane = ControlPlane::start(Some(&config));
    let sink = ads_client(&control_plane, "test-proxy", "");
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
    let xds_port = control_plane.xds_port;

    // The proxy's own file is only its bootstrap: node, admin port, control plane.
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: edge-eu-1, region: eu-west }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{xds_port}\" }}\n"
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

/// A gateway on `port` with one service `web` at `backend`, plus `extra` YAML.
fn gateway(port: u16, backend: &Backend, extra: &str) -> String {
    format!(
        "api_gateway: {{ address: \"127.0.0.1:{port}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\n{extra}routes:\n  - {{ service: web }}\n",
        backend.address
    )
}

/// [`gateway`] whose route runs plugin `broken`: a module (written into `dir`) the control
/// plane accepts as a file but no proxy can compile.
fn with_broken_plugin(port: u16, backend: &Backend, dir: &std::path::Path) -> String {
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not a module").unwrap();
    gateway(
        port,
        backend,
        &format!(
            "plugins:\n  broken: {{ source: {{ file: \"{}\" }} }}\n",
            garbage.display()
        ),
    )
    .replace(
        "- { service: web }",
        "- { service: web, plugins: [broken] }",
    )
}

/// Backends `a` and `b`, a gateway port, and a control plane already serving that gateway
/// with its route to `a` (version 1).
async fn serving_a() -> (Backend, Backend, u16, ControlPlane) {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let port = free_port();
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let applied = control_plane.apply(&gateway(port, &a, ""), &[]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    (a, b, port, control_plane)
}

/// A proxy whose own file only says who it is and where its control plane is.
async fn proxy_of(control_plane: &ControlPlane, id: &str, region: &str, port: u16) -> Proxy {
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: {id}, region: {region} }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{}\" }}\n",
            control_plane.xds_port
        ),
        port,
    );
    proxy.wait_ready().await;
    proxy
}

/// Waits until the proxy's answers come from `backend`.
async fn wait_routes_to(proxy: &Proxy, backend: &str) {
    eventually(&format!("the proxy routes to {backend}"), || async {
        client()
            .get(proxy.url("/"))
            .send()
            .await
            .is_ok_and(|r| r.headers().get("x-backend").is_some_and(|v| v == backend))
    })
    .await;
}

/// The backend that answers the proxy's `/` (which must be a 200).
async fn backend_of(proxy: &Proxy) -> String {
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-backend"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_goes_to_one_region_first_and_rolls_back_by_itself_on_a_nack() {
    let (a, b, port, control_plane) = serving_a().await;
    // eu: a real proxy; us: the xDS client library proxies use (one listener port here).
    let eu = proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    let us = ads_client(&control_plane, "edge-us-1", "us");
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
    assert_eq!(backend_of(&eu).await, "a", "eu kept its config");
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
    control_plane.spawn();
    control_plane.wait_ready().await;
    // The restarted control plane serves what its store holds; the proxy reconnects.
    eventually("the proxy reconnects and runs version 1", || async {
        let table = stdout(&control_plane.nip(&["get", "proxies"]));
        table
            .lines()
            .any(|l| l.starts_with("edge-eu-1") && l.contains(" true ") && l.contains(" 1 "))
    })
    .await;
    assert!(control_plane
        .apply(&gateway(port, &b, ""), &[])
        .status
        .success());
    wait_routes_to(&proxy, "b").await;
    let (sent, failures) = load.stop().await;
    assert!(sent > 50, "the load was real ({sent} requests)");
    assert_eq!(
        failures, 0,
        "requests failed while the control plane was away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_explains_bad_input_and_documents_every_route() {
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
            let url =
                control_plane.api(&path.replace("{version}", "1").replace("{name}", "nobody"));
            let response = match method.as_str() {
                "get" => http.get(url).send().await.unwrap(),
                "delete" => http.delete(url).send().await.unwrap(),
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
    let token_file = std::env::temp_dir()
        .join(format!("nip-demo-{}", child.id()))
        .join("admin-token");
    let _demo = Demo(child);
    eventually(
        "the demo's API refuses a caller without its token",
        || async {
            client()
                .get(format!("http://127.0.0.1:{api}/v1/proxies"))
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
            let proxies: serde_json::Value = match ControlPlane::client_with(token.trim())
                .get(format!("http://127.0.0.1:{api}/v1/proxies"))
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
    let bootstrap = format!(
        "node: {{ id: edge-eu-1, region: eu }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\ncontrol_plane: {{ address: \"127.0.0.1:{}\", last_good: \"{}\" }}\n",
        control_plane.xds_port,
        last_good.display()
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
    control_plane.spawn();
    control_plane.wait_ready().await;
    assert!(control_plane
        .apply(&gateway(port, &b, ""), &[])
        .status
        .success());
    wait_routes_to(&proxy, "b").await;

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
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let port = free_port();
    let store = postgres_database();
    let first = ControlPlane::start_on(Some(&store), None);
    first.wait_ready().await;
    // The second replica is given the first one's admin token file, as replicas are given
    // one secret; it makes no token of its own.
    let mut second = ControlPlane::start_on(Some(&store), None);
    second.kill();
    std::fs::copy(&first.admin_token_file, &second.admin_token_file).unwrap();
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
    let clusters = ads_client(&control_plane, "after-deep", "eu");
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

/// `nip token create` as `caller` (a token file); the new token, printed once on stdout.
fn create_token(control_plane: &ControlPlane, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let output = control_plane.nip(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    let token = stdout(&output).trim().to_string();
    assert!(token.starts_with("nip_"), "{token}");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_token_whose_role_allows_it_and_the_audit_trail_names_it() {
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let viewer = create_token(&control_plane, &["viewer-1", "--role", "viewer"]);
    let operator = create_token(
        &control_plane,
        &["ci", "--role", "operator", "--ttl", "30d"],
    );
    let admin = control_plane.admin_token();

    // The matrix: every documented route and method, for no token, a made-up token and each
    // role. Below its role a route answers 403, above it anything but 401/403.
    let document = control_plane.get_json("/v1/openapi.json").await;
    let paths = document["paths"].as_object().expect("paths");
    let made_up = format!("nip_{}_{}", "0".repeat(12), "1".repeat(64));
    let callers: [(&str, Option<&str>); 5] = [
        ("nobody", None),
        ("made-up", Some(&made_up)),
        ("viewer", Some(&viewer)),
        ("operator", Some(&operator)),
        ("admin", Some(&admin)),
    ];
    let rank = |role: &str| {
        ["viewer", "operator", "admin"]
            .iter()
            .position(|r| *r == role)
    };
    let mut checked = 0;
    for (path, methods) in paths {
        for (method, operation) in methods.as_object().unwrap() {
            let url =
                control_plane.api(&path.replace("{version}", "1").replace("{name}", "nobody"));
            let needed = operation["x-nip-role"].as_str();
            for (who, token) in &callers {
                let http = token.map_or_else(client, ControlPlane::client_with);
                let request = match method.as_str() {
                    "get" => http.get(&url),
                    "delete" => http.delete(&url),
                    _ => http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body("{}"),
                };
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let challenge = response.headers().contains_key("www-authenticate");
                let body = response.text().await.unwrap();
                let expected = match (needed, token, rank(who)) {
                    (None, _, _) => "served",
                    (Some(_), None, _) | (Some(_), Some(_), None) => "401",
                    (Some(role), Some(_), Some(mine)) if Some(mine) < rank(role) => "403",
                    _ => "served",
                };
                match expected {
                    "401" => assert!(
                        status == 401 && challenge,
                        "{who} {method} {path}: {status} {body}"
                    ),
                    "403" => assert!(
                        status == 403 && body.contains(needed.unwrap_or_default()),
                        "{who} {method} {path}: {status} {body}"
                    ),
                    _ => assert!(
                        status != 401 && status != 403,
                        "{who} {method} {path}: {status} {body}"
                    ),
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 55, "{checked} calls");

    // The operator's change is recorded under its token's name, whatever header it sends.
    let applied = ControlPlane::client_with(&operator)
        .post(control_plane.api("/v1/config"))
        .header("content-type", "application/yaml")
        .header("x-nip-actor", "mallory")
        .body(services(&["web"]))
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201);
    let events = control_plane.get_json("/v1/events").await;
    let actors: Vec<(&str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(actors[0], ("apply", "token:ci"), "{events}");
    assert!(
        actors
            .iter()
            .any(|(action, actor)| *action == "token_created"
                && actor.starts_with("token:bootstrap-admin-")),
        "{events}"
    );

    // Revoked and expired tokens stop working at once; the answer says which.
    let short = create_token(
        &control_plane,
        &["short", "--role", "viewer", "--ttl", "1s"],
    );
    assert!(control_plane
        .nip(&["token", "revoke", "viewer-1"])
        .status
        .success());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (token, reason) in [(&viewer, "revoked"), (&short, "expired")] {
        let refused = ControlPlane::client_with(token)
            .get(control_plane.api("/v1/config"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        assert!(refused.text().await.unwrap().contains(reason));
    }
    let listed = stdout(&control_plane.nip(&["token", "list"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("viewer-1") && l.contains("revoked"))
            && listed
                .lines()
                .any(|l| l.starts_with("short") && l.contains("expired")),
        "{listed}"
    );
    let denied = control_plane.nip(&["token", "create", "x", "--role", "admin"]);
    assert!(
        denied.status.success(),
        "the admin may: {}",
        stderr(&denied)
    );
    let as_operator = Command::new(nip_bin())
        .args(["token", "list", "--control-plane", &control_plane.api("")])
        .env("NIP_TOKEN", &operator)
        .output()
        .unwrap();
    assert_eq!(as_operator.status.code(), Some(1));
    assert!(
        stderr(&as_operator).contains("needs admin"),
        "{}",
        stderr(&as_operator)
    );

    // Secrets are never stored or logged: neither the database nor the log holds one.
    let secrets: Vec<&str> = [&viewer, &operator, &admin, &short]
        .iter()
        .map(|t| t.rsplit('_').next().unwrap())
        .collect();
    let db_dir = control_plane.store.trim_start_matches("sqlite://");
    let db_dir = std::path::Path::new(db_dir).parent().unwrap();
    for entry in std::fs::read_dir(db_dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in &secrets {
            assert!(!text.contains(secret), "a secret in the store");
        }
    }
    let log = control_plane.log();
    for secret in &secrets {
        assert!(!log.contains(secret), "a secret in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limited_to_a_tenant_acts_on_that_tenants_config_only() {
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let acme = create_token(
        &control_plane,
        &["acme-ci", "--role", "operator", "--tenant", "acme"],
    );
    let tenant = |id: &str| format!("tenant: {{ id: {id} }}\n{}", services(&["web"]));
    let apply = |token: String, yaml: String| {
        let url = control_plane.api("/v1/config");
        async move {
            ControlPlane::client_with(&token)
                .post(url)
                .header("content-type", "application/yaml")
                .body(yaml)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(apply(acme.clone(), tenant("acme")).await.status(), 201);
    let other = apply(acme.clone(), tenant("globex")).await;
    assert_eq!(other.status(), 403);
    assert!(other
        .text()
        .await
        .unwrap()
        .contains("the new config belongs to tenant globex"));
    // Once another tenant's config is current, the acme token may not read or replace it.
    assert_eq!(
        apply(control_plane.admin_token(), tenant("globex"))
            .await
            .status(),
        201
    );
    let read = ControlPlane::client_with(&acme)
        .get(control_plane.api("/v1/config"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 403);
    assert_eq!(apply(acme.clone(), tenant("acme")).await.status(), 403);
    // And it hands out no token beyond its tenants (it is no admin anyway).
    let escalate = ControlPlane::client_with(&acme)
        .post(control_plane.api("/v1/tokens"))
        .json(&serde_json::json!({ "name": "all", "role": "viewer" }))
        .send()
        .await
        .unwrap();
    assert_eq!(escalate.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_cannot_black_out_the_fleet_or_send_proxies_to_a_url_of_its_choice() {
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let http = control_plane.http();
    let post = |yaml: String, query: &str| {
        http.post(control_plane.api(&format!("/v1/config{query}")))
            .header("content-type", "application/yaml")
            .body(yaml)
            .send()
    };
    assert_eq!(post(services(&["web"]), "").await.unwrap().status(), 201);
    // An empty body, or a service in use left with no endpoints: 422 naming why.
    for (yaml, path) in [
        (String::new(), "routes"),
        (
            "services:\n  web: { endpoints: [] }\nroutes:\n  - { service: web }\n".to_string(),
            "services.web.endpoints",
        ),
    ] {
        let refused = post(yaml.clone(), "").await.unwrap();
        assert_eq!(refused.status(), 422);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["errors"][0]["path"], path, "{body}");
        assert!(body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("--allow-empty"));
        // Meant: the explicit flag lets it through (API and CLI alike).
        if path == "routes" {
            assert_eq!(post(yaml, "?allow_empty=true").await.unwrap().status(), 201);
        } else {
            let cli = control_plane.apply(&yaml, &[]);
            assert_eq!(cli.status.code(), Some(2), "{}", stderr(&cli));
            assert!(stderr(&cli).contains("services.web.endpoints"));
            assert!(control_plane
                .apply(&yaml, &["--allow-empty"])
                .status
                .success());
        }
    }
    // A plugin URL on a host this control plane was not told to allow: refused before any
    // proxy could be told to fetch it.
    let fetch = format!(
        "plugins:\n  p: {{ source: {{ url: \"http://169.254.169.254/latest/meta-data\", sha256: \"{}\" }} }}\n{}",
        "0".repeat(64),
        services(&["web"])
    );
    let refused = post(fetch, "").await.unwrap();
    assert_eq!(refused.status(), 422);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["path"], "plugins.p.source.url", "{body}");
    let events = control_plane.get_json("/v1/events").await;
    assert_eq!(events[0]["action"], "refused", "{events}");
}
