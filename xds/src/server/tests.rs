use super::*;
use crate::test_support::{eventually, resources, serve_ads};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use std::time::Duration;

const ONE_SERVICE: &str =
    "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\nroutes:\n  - { service: web }\n";
const TWO_SERVICES: &str = "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\n  api: { endpoints: [\"127.0.0.1:8002\"] }\nroutes:\n  - { service: web }\n";

/// A real ADS server on an OS-chosen port, and a client stream to it.
async fn serve(
    cache: Arc<SnapshotCache>,
    registry: Arc<ProxyRegistry>,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let address = serve_ads(cache, registry).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "proxy-eu-1".into(),
            locality: Some(Locality {
                region: "eu-west".into(),
                zone: "a".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

async fn next(responses: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("a response in time")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test]
async fn ads_serves_acks_nacks_and_pushes_changes_in_order() {
    let cache = Arc::new(SnapshotCache::default());
    cache.set(&resources(ONE_SERVICE));
    let registry = Arc::new(ProxyRegistry::default());
    let (tx, mut responses) = serve(Arc::clone(&cache), Arc::clone(&registry)).await;

    // CDS: the full set, a version and a fresh nonce.
    tx.send(request(CLUSTER_TYPE, &[], "", "")).await.unwrap();
    let cds = next(&mut responses).await;
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert_eq!(cds.resources.len(), 1);
    let cluster = Cluster::decode(cds.resources[0].value.as_slice()).unwrap();
    assert_eq!(cluster.name, "web");
    assert!(!cds.nonce.is_empty() && !cds.version_info.is_empty());
    tx.send(request(CLUSTER_TYPE, &[], &cds.version_info, &cds.nonce))
        .await
        .unwrap();

    // EDS by name, including one the cache does not have: answered with an empty assignment.
    tx.send(request(ENDPOINT_TYPE, &["web", "not-yet"], "", ""))
        .await
        .unwrap();
    let eds = next(&mut responses).await;
    assert_eq!(eds.type_url, ENDPOINT_TYPE);
    let assignments: Vec<ClusterLoadAssignment> = eds
        .resources
        .iter()
        .map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).unwrap())
        .collect();
    assert_eq!(assignments.len(), 2);
    assert!(assignments
        .iter()
        .any(|a| a.cluster_name == "not-yet" && a.endpoints.is_empty()));
    assert_ne!(eds.nonce, cds.nonce, "every response has a fresh nonce");

    // A NACK is recorded with its reason and does not make the server resend.
    tx.send(DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "cluster web: bad lb policy".into(),
            ..Default::default()
        }),
        ..request(ENDPOINT_TYPE, &["web", "not-yet"], "", &eds.nonce)
    })
    .await
    .unwrap();
    eventually("the NACK is recorded", || {
        registry
            .list()
            .first()
            .and_then(|p| p.last_nack.clone())
            .is_some()
    })
    .await;
    let proxy = registry.list().remove(0);
    assert_eq!(proxy.node_id, "proxy-eu-1");
    assert_eq!(proxy.region, "eu-west");
    assert!(proxy.connected);
    assert_eq!(proxy.acked.get(CLUSTER_TYPE), Some(&cds.version_info));
    let nack = proxy.last_nack.unwrap();
    assert_eq!(nack.type_url, ENDPOINT_TYPE);
    assert_eq!(nack.reason, "cluster web: bad lb policy");

    // A stale nonce is ignored: nothing comes back for it.
    tx.send(request(CLUSTER_TYPE, &[], "", "no-such-nonce"))
        .await
        .unwrap();

    // A change is pushed: CDS first, then EDS, and nothing for types not subscribed.
    cache.set(&resources(TWO_SERVICES));
    let first = next(&mut responses).await;
    let second = next(&mut responses).await;
    assert_eq!(first.type_url, CLUSTER_TYPE, "clusters before endpoints");
    assert_eq!(first.resources.len(), 2);
    assert_ne!(first.version_info, cds.version_info);
    assert_eq!(second.type_url, ENDPOINT_TYPE);

    // The stream closing marks the proxy disconnected.
    drop(tx);
    drop(responses);
    eventually("the proxy shows as disconnected", || {
        registry.list().first().is_some_and(|p| !p.connected)
    })
    .await;
}

#[test]
fn versions_are_per_type_and_per_resource() {
    let cache = SnapshotCache::default();
    cache.set(&resources(ONE_SERVICE));
    let before = cache.current();
    cache.set(&resources(TWO_SERVICES));
    let after = cache.current();
    let version = |state: &CacheState, t: &str| state.types[t].version.clone();
    assert_ne!(
        version(&before, CLUSTER_TYPE),
        version(&after, CLUSTER_TYPE)
    );
    assert_eq!(
        version(&before, LISTENER_TYPE),
        version(&after, LISTENER_TYPE),
        "an unchanged type keeps its version: its clients download nothing"
    );
    assert_eq!(
        before.types[CLUSTER_TYPE].resources["web"].0, after.types[CLUSTER_TYPE].resources["web"].0,
        "an unchanged resource keeps its version"
    );
}

#[tokio::test]
async fn a_region_override_is_served_to_that_region_only() {
    let cache = Arc::new(SnapshotCache::default());
    cache.set(&resources(ONE_SERVICE));
    let registry = Arc::new(ProxyRegistry::default());
    let address = serve_ads(Arc::clone(&cache), Arc::clone(&registry)).await;
    let connect = |node: &'static str, region: &'static str| async move {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut first = request(CLUSTER_TYPE, &[], "", "");
        first.node = Some(Node {
            id: node.into(),
            locality: Some(Locality {
                region: region.into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        tx.send(first).await.unwrap();
        (tx, responses)
    };
    let cluster_names = |response: &DiscoveryResponse| -> Vec<String> {
        response
            .resources
            .iter()
            .map(|a| Cluster::decode(a.value.as_slice()).unwrap().name)
            .collect()
    };
    let (eu_tx, mut eu) = connect("eu-1", "eu").await;
    let (us_tx, mut us) = connect("us-1", "us").await;
    let eu_first = next(&mut eu).await;
    let us_first = next(&mut us).await;
    assert_eq!(cluster_names(&eu_first), ["web"]);
    assert_eq!(cluster_names(&us_first), ["web"]);
    for (tx, response) in [(&eu_tx, &eu_first), (&us_tx, &us_first)] {
        tx.send(request(
            CLUSTER_TYPE,
            &[],
            &response.version_info,
            &response.nonce,
        ))
        .await
        .unwrap();
    }

    // A canary: eu gets two services, us keeps one and hears nothing.
    let canary = Arc::new(CacheState::new("2", &resources(TWO_SERVICES)));
    cache.set_views(Views {
        default: cache.current(),
        by_region: [("eu".to_string(), Arc::clone(&canary))].into(),
    });
    let eu_push = next(&mut eu).await;
    let mut names = cluster_names(&eu_push);
    names.sort();
    assert_eq!(names, ["api", "web"]);
    eu_tx
        .send(request(
            CLUSTER_TYPE,
            &[],
            &eu_push.version_info,
            &eu_push.nonce,
        ))
        .await
        .unwrap();
    let acked_clusters = |state: &CacheState, acked: &BTreeMap<String, String>| {
        acked.get(CLUSTER_TYPE) == Some(&state.types[CLUSTER_TYPE].version)
    };
    eventually("eu ACKs the canary", || {
        registry
            .list()
            .iter()
            .any(|p| p.node_id == "eu-1" && acked_clusters(&canary, &p.acked))
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), us.message())
            .await
            .is_err(),
        "a region without an override gets no push"
    );
    let us_status = registry
        .list()
        .into_iter()
        .find(|p| p.node_id == "us-1")
        .unwrap();
    assert!(!acked_clusters(&canary, &us_status.acked));
    assert!(acked_clusters(&cache.current(), &us_status.acked));
    // A client that subscribed to clusters only has not ACKed the whole state.
    assert!(!canary.is_acked_by(&us_status.acked));

    // Promotion: everyone gets the canary's state; eu, already there, hears nothing.
    cache.set_views(Views {
        default: canary,
        by_region: BTreeMap::new(),
    });
    assert_eq!(cluster_names(&next(&mut us).await).len(), 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), eu.message())
            .await
            .is_err(),
        "eu already runs the promoted state"
    );
}
