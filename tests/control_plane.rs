//! `nip control-plane` as a process: serves a config file over ADS, follows its changes,
//! refuses bad ones while serving the last good config. Checked with the xDS client library
//! a proxy uses.

mod common;

use common::*;
use nip_xds::client::{AdsClient, ResourceSink};
use nip_xds::envoy_types::pb::envoy::config::core::v3::Node;
use nip_xds::ResourceSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

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

/// Kills the process when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let port = free_port();
    let log = dir.path().join("control-plane.log");
    let child = Command::new(nip_bin())
        .args(["control-plane", "--config"])
        .arg(&config)
        .args(["--xds-address", &format!("127.0.0.1:{port}")])
        .args(["--api-address", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _control_plane = Running(child);

    let sink = Clusters::default();
    let node = Node {
        id: "test-proxy".into(),
        ..Default::default()
    };
    tokio::spawn(AdsClient::new(format!("http://127.0.0.1:{port}"), node, sink.clone()).run());
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
    eventually("the refusal is logged", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log).is_ok_and(|text| {
                text.contains("config change refused") && text.contains("routes[0].service")
            })
        }
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
}

#[test]
fn an_invalid_file_at_start_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, "routes:\n  - { service: nowhere }\n").unwrap();
    let output = Command::new(nip_bin())
        .args(["control-plane", "--config"])
        .arg(&config)
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
    let desired = |backend: &Backend, extra: &str| {
        format!(
            "api_gateway: {{ address: \"127.0.0.1:{listen_port}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\n{extra}routes:\n  - {{ service: web }}\n",
            backend.address
        )
    };
    let config = dir.path().join("desired.yaml");
    std::fs::write(&config, desired(&a, "")).unwrap();
    let xds_port = free_port();
    let api_port = free_port();
    let child = Command::new(nip_bin())
        .args(["control-plane", "--config"])
        .arg(&config)
        .args(["--xds-address", &format!("127.0.0.1:{xds_port}")])
        .args(["--api-address", &format!("127.0.0.1:{api_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _control_plane = Running(child);

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
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::fs::write(&config, desired(&b, "")).unwrap();
    eventually("the proxy routes the new way", || async {
        client()
            .get(proxy.url("/"))
            .send()
            .await
            .is_ok_and(|r| r.headers()["x-backend"] == "b")
    })
    .await;
    let (sent, failures) = load.stop().await;
    assert!(sent > 50, "the load was real ({sent} requests)");
    assert_eq!(failures, 0, "requests failed during the push");

    // A plugin module the control plane can see but the proxy cannot compile: the proxy
    // NACKs with the compiler's reason and keeps serving its last good config.
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not a module").unwrap();
    std::fs::write(
        &config,
        desired(
            &b,
            &format!(
                "plugins:\n  broken: {{ source: {{ file: \"{}\" }} }}\n",
                garbage.display()
            ),
        )
        .replace(
            "- { service: web }",
            "- { service: web, plugins: [broken] }",
        ),
    )
    .unwrap();
    eventually("the proxy NACKs the set", || async {
        let log = proxy.log();
        log.contains("xDS NACK") && log.contains("plugin broken: cannot compile")
    })
    .await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "b");

    // The NACK is visible on the control plane: `nip get proxies`.
    let output = Command::new(nip_bin())
        .args(["get", "proxies", "--control-plane"])
        .arg(format!("http://127.0.0.1:{api_port}"))
        .output()
        .unwrap();
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
}
