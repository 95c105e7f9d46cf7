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
    open_stream(serve_ads(cache, registry).await).await
}

/// A state-of-the-world ADS stream to `address`.
async fn open_stream(
    address: std::net::SocketAddr,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
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
        version(&before, ROUTE_TYPE),
        version(&after, ROUTE_TYPE),
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
        let (tx, responses) = open_stream(address).await;
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
    assert!(!canary.is_acked_by(&us_status.acked));
    assert!(cache.current().is_acked_by(&us_status.acked));
    assert!(
        !cache.current().is_acked_by(&BTreeMap::new()),
        "nothing ACKed yet"
    );

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

#[tokio::test]
async fn grpc_api_listeners_go_only_to_clients_that_name_them() {
    let cache = Arc::new(SnapshotCache::default());
    cache.set(&resources(TWO_SERVICES));
    let registry = Arc::new(ProxyRegistry::default());
    let (tx, mut responses) = serve(Arc::clone(&cache), Arc::clone(&registry)).await;
    let listener_names = |response: &DiscoveryResponse| -> Vec<(String, bool)> {
        response
            .resources
            .iter()
            .map(|a| {
                let l = envoy_types::pb::envoy::config::listener::v3::Listener::decode(
                    a.value.as_slice(),
                )
                .unwrap();
                (l.name, l.api_listener.is_some())
            })
            .collect()
    };
    // A proxy's wildcard subscription: the gateway listener only.
    tx.send(request(LISTENER_TYPE, &[], "", "")).await.unwrap();
    let wildcard = next(&mut responses).await;
    assert_eq!(
        listener_names(&wildcard),
        [(crate::resources::GATEWAY_LISTENER.to_string(), false)]
    );
    // A gRPC client resolving xds:///api: exactly that api listener.
    tx.send(request(
        LISTENER_TYPE,
        &["api"],
        &wildcard.version_info,
        &wildcard.nonce,
    ))
    .await
    .unwrap();
    let named = next(&mut responses).await;
    assert_eq!(listener_names(&named), [("api".to_string(), true)]);
}

mod delta_protocol {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    };

    struct DeltaClient {
        tx: mpsc::Sender<DeltaDiscoveryRequest>,
        responses: tonic::Streaming<DeltaDiscoveryResponse>,
    }

    impl DeltaClient {
        async fn connect(address: std::net::SocketAddr) -> DeltaClient {
            let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
                .await
                .unwrap();
            let (tx, rx) = mpsc::channel(16);
            let responses = client
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            DeltaClient { tx, responses }
        }

        async fn send(&self, request: DeltaDiscoveryRequest) {
            self.tx.send(request).await.unwrap();
        }

        async fn next(&mut self) -> DeltaDiscoveryResponse {
            tokio::time::timeout(Duration::from_secs(5), self.responses.message())
                .await
                .expect("a response in time")
                .expect("stream ok")
                .expect("stream open")
        }

        async fn nothing_more(&mut self) {
            assert!(
                tokio::time::timeout(Duration::from_millis(200), self.responses.message())
                    .await
                    .is_err(),
                "no further response"
            );
        }
    }

    fn delta(type_url: &str, subscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(Node {
                id: "delta-1".into(),
                locality: Some(Locality {
                    region: "eu".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> Vec<String> {
        response.resources.iter().map(|r| r.name.clone()).collect()
    }

    #[tokio::test]
    async fn delta_sends_only_what_changed_and_what_was_removed() {
        let cache = Arc::new(SnapshotCache::default());
        cache.set(&resources(ONE_SERVICE));
        let registry = Arc::new(ProxyRegistry::default());
        let address = serve_ads(Arc::clone(&cache), Arc::clone(&registry)).await;
        let mut client = DeltaClient::connect(address).await;

        // Wildcard clusters: everything, each resource with its own version.
        client.send(delta(CLUSTER_TYPE, &[], "")).await;
        let cds = client.next().await;
        assert_eq!(names(&cds), ["web"]);
        assert!(!cds.resources[0].version.is_empty());
        client.send(delta(CLUSTER_TYPE, &[], &cds.nonce)).await;

        // Endpoints by name: a missing one is answered with an empty assignment.
        client
            .send(delta(ENDPOINT_TYPE, &["web", "not-yet"], ""))
            .await;
        let mut eds = names(&client.next().await);
        eds.sort();
        assert_eq!(eds, ["not-yet", "web"]);

        // Wildcard listeners: the gateway only; gRPC api listeners go to those naming them.
        client.send(delta(LISTENER_TYPE, &[], "")).await;
        let lds = client.next().await;
        assert_eq!(names(&lds), [crate::resources::GATEWAY_LISTENER]);
        client
            .send(delta(LISTENER_TYPE, &["web"], &lds.nonce))
            .await;
        assert_eq!(names(&client.next().await), ["web"]);
        eventually("the CDS ACK is recorded", || {
            registry.list().first().is_some_and(|p| {
                p.region == "eu" && p.acked.get(CLUSTER_TYPE) == Some(&cds.system_version_info)
            })
        })
        .await;

        // A new service: only the new cluster (and the api listener subscribed by name).
        cache.set(&resources(TWO_SERVICES));
        let pushed = client.next().await;
        assert_eq!(pushed.type_url, CLUSTER_TYPE, "clusters first");
        assert_eq!(names(&pushed), ["api"], "web is unchanged and not resent");
        client.nothing_more().await;

        // It goes away again: removed, nothing resent.
        cache.set(&resources(ONE_SERVICE));
        let removal = client.next().await;
        assert!(removal.resources.is_empty());
        assert_eq!(removal.removed_resources, ["api"]);

        // A NACK is recorded with its reason.
        client
            .send(DeltaDiscoveryRequest {
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: "cluster api: cannot remove".into(),
                    ..Default::default()
                }),
                ..delta(CLUSTER_TYPE, &[], &removal.nonce)
            })
            .await;
        eventually("the NACK is recorded", || {
            registry
                .list()
                .first()
                .and_then(|p| p.last_nack.clone())
                .is_some_and(|n| n.reason == "cluster api: cannot remove")
        })
        .await;

        // A reconnecting client that says what it has gets nothing it already has.
        let mut again = DeltaClient::connect(address).await;
        let web_version = cds.resources[0].version.clone();
        again
            .send(DeltaDiscoveryRequest {
                initial_resource_versions: [("web".to_string(), web_version)].into(),
                ..delta(CLUSTER_TYPE, &[], "")
            })
            .await;
        let resumed = again.next().await;
        assert!(resumed.resources.is_empty() && resumed.removed_resources.is_empty());
        // One that has a cluster since deleted is told to remove it.
        let mut stale = DeltaClient::connect(address).await;
        stale
            .send(DeltaDiscoveryRequest {
                initial_resource_versions: [("gone".to_string(), "1".to_string())].into(),
                ..delta(CLUSTER_TYPE, &[], "")
            })
            .await;
        let cleaned = stale.next().await;
        assert_eq!(names(&cleaned), ["web"]);
        assert_eq!(cleaned.removed_resources, ["gone"]);
    }

    #[tokio::test]
    async fn delta_removes_clusters_and_endpoints_after_the_routes() {
        const BEFORE: &str = "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\n  api: { endpoints: [\"127.0.0.1:8002\"] }\nroutes:\n  - { service: web }\n";
        const AFTER: &str =
            "services:\n  api: { endpoints: [\"127.0.0.1:8002\"] }\nroutes:\n  - { service: api }\n";
        let cache = Arc::new(SnapshotCache::default());
        cache.set(&resources(BEFORE));
        let address = serve_ads(Arc::clone(&cache), Arc::new(ProxyRegistry::default())).await;
        let mut client = DeltaClient::connect(address).await;
        for (type_url, names) in [
            (CLUSTER_TYPE, vec![]),
            (ENDPOINT_TYPE, vec!["api", "web"]),
            (ROUTE_TYPE, vec![crate::resources::GATEWAY_ROUTES]),
        ] {
            client.send(delta(type_url, &names, "")).await;
            let response = client.next().await;
            client.send(delta(type_url, &[], &response.nonce)).await;
        }
        cache.set(&resources(AFTER));
        let order: Vec<(String, Vec<String>)> = [
            client.next().await,
            client.next().await,
            client.next().await,
        ]
        .into_iter()
        .map(|r| (r.type_url, r.removed_resources))
        .collect();
        assert_eq!(
            order,
            [
                (ROUTE_TYPE.to_string(), vec![]),
                (CLUSTER_TYPE.to_string(), vec!["web".to_string()]),
                (ENDPOINT_TYPE.to_string(), vec!["web".to_string()]),
            ]
        );
    }
}

#[tokio::test]
async fn a_removed_cluster_goes_only_after_the_routes_that_used_it() {
    const BEFORE: &str = "services:\n  web: { endpoints: [\"127.0.0.1:8001\"] }\n  api: { endpoints: [\"127.0.0.1:8002\"] }\nroutes:\n  - { service: web }\n";
    const AFTER: &str =
        "services:\n  api: { endpoints: [\"127.0.0.1:8002\"] }\nroutes:\n  - { service: api }\n";
    let cache = Arc::new(SnapshotCache::default());
    cache.set(&resources(BEFORE));
    let registry = Arc::new(ProxyRegistry::default());
    let (tx, mut responses) = serve(Arc::clone(&cache), Arc::clone(&registry)).await;
    let cluster_names = |r: &DiscoveryResponse| -> Vec<String> {
        r.resources
            .iter()
            .map(|a| Cluster::decode(a.value.as_slice()).unwrap().name)
            .collect()
    };
    let mut last = HashMap::new();
    for (type_url, names) in [
        (CLUSTER_TYPE, vec![]),
        (ENDPOINT_TYPE, vec!["api", "web"]),
        (ROUTE_TYPE, vec![crate::resources::GATEWAY_ROUTES]),
    ] {
        tx.send(request(type_url, &names, "", "")).await.unwrap();
        let response = next(&mut responses).await;
        tx.send(request(
            type_url,
            &names,
            &response.version_info,
            &response.nonce,
        ))
        .await
        .unwrap();
        last.insert(type_url, response);
    }

    cache.set(&resources(AFTER));
    let transitional = next(&mut responses).await;
    assert_eq!(transitional.type_url, CLUSTER_TYPE);
    assert_eq!(
        cluster_names(&transitional),
        ["api", "web"],
        "web is kept for now"
    );
    let endpoints = next(&mut responses).await;
    assert_eq!(endpoints.type_url, ENDPOINT_TYPE);
    let web = endpoints
        .resources
        .iter()
        .map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).unwrap())
        .find(|a| a.cluster_name == "web")
        .expect("web's endpoints are still sent");
    assert!(!web.endpoints.is_empty(), "with the endpoints it had");
    let routes = next(&mut responses).await;
    assert_eq!(routes.type_url, ROUTE_TYPE);
    let removal = next(&mut responses).await;
    assert_eq!(removal.type_url, CLUSTER_TYPE, "clusters are removed last");
    assert_eq!(cluster_names(&removal), ["api"]);
    assert_eq!(
        removal.version_info,
        cache.current().types[CLUSTER_TYPE].version
    );
}
