use super::*;
use crate::config::Config;
use crate::resources::{GATEWAY_ROUTES, SIDECAR_INBOUND, SIDECAR_OUTBOUND, SIDECAR_PASSTHROUGH};

const PLAN_EXAMPLE: &str = r#"
api_gateway:
  address: ":8080"
  tls:
    enabled: false
services:
  message_router:
    replicas: 3
    resources:
      cpu: "500m"
      memory: "512Mi"
plugins:
  my-plugin:
    version: "2.0.0"
    enabled: true
    isolation: "wasm"
"#;

#[test]
fn plan_example_translates_to_one_listener_route_config_and_cluster() {
    let config = Config::from_yaml(PLAN_EXAMPLE).expect("plan example loads");
    let t = translate(&config);
    // The gateway, and one api listener per service for proxyless gRPC clients.
    assert_eq!(t.resources.listeners.len(), 2);
    assert_eq!(t.resources.listeners[0].name, GATEWAY_LISTENER);
    assert!(t.resources.listeners[0].api_listener.is_none());
    assert_eq!(t.resources.listeners[1].name, "message_router");
    assert_eq!(t.resources.routes.len(), 1);
    assert_eq!(t.resources.routes[0].name, GATEWAY_ROUTES);
    assert_eq!(t.resources.clusters.len(), 1);
    assert_eq!(t.resources.clusters[0].name, "message_router");
    assert_eq!(t.resources.endpoints[0].cluster_name, "message_router");
    assert!(t.resources.endpoints[0].endpoints.is_empty());
    assert_eq!(t.resources.version.len(), 16);
    assert_eq!(t.not_applied.len(), 1);
    assert!(t.not_applied[0].starts_with("plugins.my-plugin: has no `source`"));
}

#[test]
fn version_is_stable_and_changes_with_content() {
    let a = translate(&Config::from_yaml(PLAN_EXAMPLE).unwrap());
    let b = translate(&Config::from_yaml(PLAN_EXAMPLE).unwrap());
    assert_eq!(a.resources.version, b.resources.version);
    let changed = PLAN_EXAMPLE.replace(":8080", ":8081");
    let c = translate(&Config::from_yaml(&changed).unwrap());
    assert_ne!(a.resources.version, c.resources.version);
}

#[test]
fn hostless_routes_join_every_virtual_host_in_order() {
    let yaml = r#"
services:
  a: { endpoints: ["127.0.0.1:1"] }
  b: { endpoints: ["127.0.0.1:2"] }
routes:
  - name: first
    match: { path_prefix: /x }
    service: a
  - name: api-only
    match: { host: api.example.com }
    service: b
  - name: last
    service: a
"#;
    let t = translate(&Config::from_yaml(yaml).unwrap());
    let rc = &t.resources.routes[0];
    let names = |domain: &str| -> Vec<String> {
        rc.virtual_hosts
            .iter()
            .find(|v| v.domains == vec![domain.to_string()])
            .unwrap()
            .routes
            .iter()
            .map(|r| r.name.clone())
            .collect()
    };
    assert_eq!(names("*"), vec!["first", "last"]);
    assert_eq!(names("api.example.com"), vec!["first", "api-only", "last"]);
}

#[test]
fn endpoints_are_grouped_by_locality_with_weights() {
    let yaml = r#"
services:
  svc:
    endpoints:
      - { address: "10.0.0.1:80", region: eu, zone: a, weight: 3 }
      - { address: "10.0.0.2:80", region: eu, zone: a }
      - { address: "10.0.0.3:80", region: us }
"#;
    let t = translate(&Config::from_yaml(yaml).unwrap());
    let cla = &t.resources.endpoints[0];
    assert_eq!(cla.endpoints.len(), 2);
    assert_eq!(cla.endpoints[0].locality.as_ref().unwrap().region, "eu");
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    assert_eq!(
        cla.endpoints[0].lb_endpoints[0]
            .load_balancing_weight
            .as_ref()
            .unwrap()
            .value,
        3
    );
    assert_eq!(cla.endpoints[1].locality.as_ref().unwrap().region, "us");
}

#[test]
fn plugin_limits_ride_in_listener_metadata_and_urls_become_remote_code() {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use envoy_types::pb::google::protobuf::value::Kind;
    use prost::Message;
    let hash = "b".repeat(64);
    let yaml = format!(
        "plugins:\n  auth:\n    source: {{ url: \"http://127.0.0.1/auth.wasm\", sha256: \"{hash}\" }}\n    limits: {{ memory: 8Mi, body: 2Ki }}\nservices:\n  web: {{ endpoints: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ service: web, plugins: [auth] }}\n"
    );
    let config = Config::from_yaml(&yaml).expect("loads");
    let listener = &translate(&config).resources.listeners[0];
    let limits = &listener
        .metadata
        .as_ref()
        .expect("limits metadata")
        .filter_metadata[names::PLUGIN_LIMITS_METADATA]
        .fields["nip.plugin.auth"];
    let Some(Kind::StructValue(limits)) = &limits.kind else {
        panic!("limits are a struct: {limits:?}");
    };
    let number = |key: &str| match limits.fields[key].kind {
        Some(Kind::NumberValue(n)) => n,
        ref other => panic!("{key}: {other:?}"),
    };
    assert_eq!(number("memory_bytes"), (8 << 20) as f64);
    assert_eq!(number("body_bytes"), 2048.0);
    assert_eq!(number("cpu_ms"), 100.0, "defaults are written out");

    let Some(filter::ConfigType::TypedConfig(any)) =
        &listener.filter_chains[0].filters[0].config_type
    else {
        panic!("hcm is typed");
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    let Some(http_filter::ConfigType::TypedConfig(wasm)) = &hcm.http_filters[0].config_type else {
        panic!("wasm filter is typed");
    };
    let wasm = Wasm::decode(wasm.value.as_slice()).unwrap();
    let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap().vm else {
        panic!("vm config");
    };
    let Some(async_data_source::Specifier::Remote(remote)) = vm.code.unwrap().specifier else {
        panic!("remote code");
    };
    assert_eq!(remote.sha256, hash);
    assert_eq!(remote.http_uri.unwrap().uri, "http://127.0.0.1/auth.wasm");
}

#[test]
fn every_service_gets_the_listener_a_proxyless_grpc_client_resolves() {
    use envoy_types::pb::envoy::config::route::v3::{route, route_action, route_match};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager, HttpConnectionManager,
    };
    use prost::Message;
    let config =
        Config::from_yaml("services:\n  echo: { endpoints: [\"127.0.0.1:9000\"] }\n").unwrap();
    let t = translate(&config);
    let listener = t
        .resources
        .listeners
        .iter()
        .find(|l| l.name == "echo")
        .expect("a listener named after the service");
    let any = listener
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
        .expect("api_listener");
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    // gRPC needs a non-empty filter list ending with the router.
    assert_eq!(hcm.http_filters.last().unwrap().name, names::ROUTER);
    let Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)) = hcm.route_specifier
    else {
        panic!("an inline route configuration");
    };
    let host = &routes.virtual_hosts[0];
    assert_eq!(host.domains, ["*"]);
    let route = &host.routes[0];
    assert_eq!(
        route.r#match.as_ref().unwrap().path_specifier,
        Some(route_match::PathSpecifier::Prefix(String::new()))
    );
    let Some(route::Action::Route(action)) = &route.action else {
        panic!("a route action");
    };
    assert_eq!(
        action.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster("echo".into()))
    );
    // Its cluster is EDS over ADS, as gRPC requires.
    let cluster = &t.resources.clusters[0];
    assert_eq!(
        cluster.eds_cluster_config.as_ref().unwrap().eds_config,
        Some(crate::resources::ads_config_source())
    );
}

#[test]
fn a_resource_set_survives_a_file_round_trip_and_garbage_is_an_error() {
    let config = Config::from_yaml(PLAN_EXAMPLE).unwrap();
    let resources = translate(&config).resources;
    let bytes = resources.to_file_bytes();
    assert_eq!(ResourceSet::from_file_bytes(&bytes).unwrap(), resources);
    assert!(ResourceSet::from_file_bytes(b"garbage").is_err());
    assert!(ResourceSet::from_file_bytes(&bytes[..bytes.len() / 2]).is_err());
    assert!(
        ResourceSet::from_file_bytes(&[]).is_err(),
        "an empty file has no listener"
    );
}

#[test]
fn a_service_across_regions_balances_by_latency_unless_told_otherwise() {
    let yaml = r#"
services:
  global:
    endpoints: [{ address: "10.0.0.1:80", region: eu }, { address: "10.0.0.2:80", region: us }]
  local:
    endpoints: [{ address: "10.0.0.3:80", region: eu }, { address: "10.0.0.4:80", region: eu }]
  chosen:
    endpoints: [{ address: "10.0.0.5:80", region: eu }, { address: "10.0.0.6:80", region: us }]
    lb: round_robin
  weighted:
    endpoints: [{ address: "10.0.0.7:80", region: eu }, { address: "10.0.0.8:80", region: us }]
    locality_weights: { eu: 1, us: 2 }
"#;
    let t = translate(&Config::from_yaml(yaml).unwrap());
    let policy = |name: &str| {
        let cluster = t
            .resources
            .clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap();
        let ewma = cluster.load_balancing_policy.as_ref().is_some_and(|p| {
            p.policies[0]
                .typed_extension_config
                .as_ref()
                .is_some_and(|e| e.name == names::PEAK_EWMA_POLICY)
        });
        (ewma, cluster.lb_policy)
    };
    assert_eq!(
        policy("global"),
        (true, cluster::LbPolicy::LeastRequest as i32)
    );
    assert_eq!(
        policy("local"),
        (false, cluster::LbPolicy::RoundRobin as i32)
    );
    assert_eq!(
        policy("chosen"),
        (false, cluster::LbPolicy::RoundRobin as i32)
    );
    assert_eq!(
        policy("weighted"),
        (false, cluster::LbPolicy::RoundRobin as i32),
        "locality weights choose localities themselves"
    );
}

#[test]
fn sub_zones_are_localities_of_their_own_and_take_the_most_specific_weight() {
    let yaml = r#"
services:
  svc:
    endpoints:
      - { address: "10.0.0.1:80", region: eu, zone: a, sub_zone: rack1 }
      - { address: "10.0.0.2:80", region: eu, zone: a, sub_zone: rack2 }
    locality_weights: { eu/a: 2, eu/a/rack1: 5 }
"#;
    let t = translate(&Config::from_yaml(yaml).unwrap());
    let cla = &t.resources.endpoints[0];
    let weights: Vec<(String, u32)> = cla
        .endpoints
        .iter()
        .map(|l| {
            (
                l.locality.as_ref().unwrap().sub_zone.clone(),
                l.load_balancing_weight.as_ref().unwrap().value,
            )
        })
        .collect();
    assert_eq!(
        weights,
        vec![("rack1".to_string(), 5), ("rack2".to_string(), 2)]
    );
}

#[test]
fn the_sidecar_short_form_becomes_an_outbound_and_an_inbound_listener_like_istios() {
    let config = Config::from_yaml(
        "sidecar: { protocol_detection_timeout: 250ms }\nservices:\n  web: { endpoints: [\"10.0.0.2:8080\"] }\nroutes:\n  - { match: { host: web.local }, service: web }\n",
    )
    .expect("valid");
    let t = translate(&config);
    let listener = |name: &str| {
        t.resources
            .listeners
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    // The edge role's gateway is there too, for the fleet's edge proxies; this config's
    // own proxy is a sidecar.
    let gateway = listener(GATEWAY_LISTENER);
    assert_eq!(crate::resources::listener_role(gateway), Some("edge"));
    assert_eq!(crate::resources::node_role(&t.bootstrap), Some("sidecar"));
    for (name, port) in [(SIDECAR_OUTBOUND, 15001), (SIDECAR_INBOUND, 15006)] {
        let l = listener(name);
        assert_eq!(
            l.address,
            Some(socket_address("0.0.0.0", port)),
            "{name} listens where the redirect sends"
        );
        assert_eq!(l.use_original_dst, Some(pbuf::BoolValue { value: true }));
        assert_eq!(crate::resources::listener_role(l), Some("sidecar"));
        assert_eq!(l.listener_filters.len(), 2);
        assert_eq!(
            l.listener_filters_timeout,
            Some(pb_duration(Duration::from_millis(250)))
        );
        assert!(l.continue_on_listener_filters_timeout);
        let http = l.filter_chains[0].filter_chain_match.as_ref().unwrap();
        assert_eq!(http.application_protocols, ["http/1.0", "http/1.1", "h2c"]);
        assert_eq!(http.transport_protocol, "raw_buffer");
        assert!(l.default_filter_chain.is_some());
    }
    let passthrough = t
        .resources
        .clusters
        .iter()
        .find(|c| c.name == SIDECAR_PASSTHROUGH)
        .expect("the passthrough cluster");
    assert_eq!(
        passthrough.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32
        ))
    );
    // Unknown hosts go on to where they were going; known ones follow their routes.
    let routes = &t.resources.routes[0];
    let catch_all = routes
        .virtual_hosts
        .iter()
        .find(|v| v.domains == ["*"])
        .unwrap();
    assert_eq!(
        catch_all.routes.last().map(|r| r.name.as_str()),
        Some(SIDECAR_PASSTHROUGH)
    );
    let web = routes
        .virtual_hosts
        .iter()
        .find(|v| v.domains == ["web.local"])
        .unwrap();
    assert!(web.routes.iter().all(|r| r.name != SIDECAR_PASSTHROUGH));
}
