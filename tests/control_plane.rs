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
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("routes[0].service"), "{stderr}");
}
