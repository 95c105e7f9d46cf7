use super::*;
use crate::config::Config;
use crate::server::{AdsServer, ProxyRegistry, SnapshotCache};
use crate::translate::translate;
use std::sync::{Arc, Mutex};

fn resources(yaml: &str) -> ResourceSet {
    translate(&Config::from_yaml(yaml).expect("config loads")).resources
}

/// Records what it applied; refuses any set with a cluster named `reject-me`.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<ResourceSet>>>);

impl ResourceSink for Recorder {
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        if resources.clusters.iter().any(|c| c.name == "reject-me") {
            return Err("Cluster reject-me: refused by the test sink".into());
        }
        self.0.lock().unwrap().push(resources.clone());
        Ok(())
    }
}

impl Recorder {
    fn last_clusters(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .last()
            .map(|s| s.clusters.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default()
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_client_follows_the_server_acks_good_sets_and_nacks_bad_ones() {
    let cache = Arc::new(SnapshotCache::default());
    let registry = Arc::new(ProxyRegistry::default());
    cache.set(&resources(
        "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\nroutes:\n  - { service: web }\n",
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdsServer::new(Arc::clone(&cache), Arc::clone(&registry)).into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let sink = Recorder::default();
    let node = Node {
        id: "proxy-1".into(),
        ..Default::default()
    };
    tokio::spawn(AdsClient::new(format!("http://{address}"), node, sink.clone()).run());

    // The first complete set: listener, its routes, the cluster and its endpoints.
    eventually("the first set is applied", || {
        sink.last_clusters() == ["web"]
    })
    .await;
    {
        let applied = sink.0.lock().unwrap();
        let first = applied.last().unwrap();
        assert_eq!(first.listeners.len(), 1);
        assert_eq!(first.routes.len(), 1);
        assert_eq!(first.endpoints.len(), 1);
    }
    eventually("every type is ACKed", || {
        registry
            .list()
            .first()
            .is_some_and(|p| p.acked.len() == 4 && p.last_nack.is_none())
    })
    .await;

    // A change reaches the sink.
    cache.set(&resources(
        "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\n  api: { endpoints: [\"127.0.0.1:8002\"] }\nroutes:\n  - { service: web }\n",
    ));
    eventually("the change is applied", || {
        sink.last_clusters() == ["api", "web"]
    })
    .await;

    // A set the sink refuses is NACKed with its reason; the last good set stays.
    cache.set(&resources(
        "services:\n  reject-me: { endpoints: [\"127.0.0.1:8003\"] }\nroutes:\n  - { service: reject-me }\n",
    ));
    eventually("the NACK reaches the server", || {
        registry
            .list()
            .first()
            .and_then(|p| p.last_nack.clone())
            .is_some_and(|n| n.reason.contains("refused by the test sink"))
    })
    .await;
    assert_eq!(
        sink.last_clusters(),
        ["api", "web"],
        "the last good set is kept"
    );
}
