use super::*;
use crate::server::{ProxyRegistry, SnapshotCache};
use crate::test_support::{eventually, resources, serve_ads};
use std::sync::{Arc, Mutex};

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

#[tokio::test]
async fn the_client_follows_the_server_acks_good_sets_and_nacks_bad_ones() {
    let cache = Arc::new(SnapshotCache::default());
    let registry = Arc::new(ProxyRegistry::default());
    cache.set(&resources(
        "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\nroutes:\n  - { service: web }\n",
    ));
    let address = serve_ads(Arc::clone(&cache), Arc::clone(&registry)).await;
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
