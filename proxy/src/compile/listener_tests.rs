//! Listeners as an Envoy sidecar gets them: several listeners, listener filters, filter
//! chains chosen by `filter_chain_match`, `tcp_proxy` next to the connection manager.

use super::*;
use crate::listener::ChainAction;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{
    filter_chain_match::ConnectionSourceType, listener_filter, Filter, FilterChain,
    FilterChainMatch, ListenerFilter,
};
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::ClusterSpecifier, TcpProxy,
};
use envoy_types::pb::google::protobuf::BoolValue;
use nip_xds::config::Config;
use nip_xds::translate::{translate, Translation};

const BASE: &str = r#"
services:
  web:
    endpoints: ["127.0.0.1:8081"]
  passthrough:
    original_destination: true
routes:
  - name: all
    service: web
"#;

fn packed<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn tcp_chain(cluster: &str, matches: Option<FilterChainMatch>) -> FilterChain {
    let tcp = TcpProxy {
        stat_prefix: format!("to_{cluster}"),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    FilterChain {
        filter_chain_match: matches,
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(packed(&tcp))),
        }],
        ..Default::default()
    }
}

fn inspector<M: Message + Name>(name: &str, config: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(packed(config))),
        ..Default::default()
    }
}

fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// The translated gateway listener turned into a sidecar's: an outbound listener that
/// takes redirected connections, inspects them, sends HTTP to the connection manager and
/// everything else to the original destination; and a port-8080 listener it hands
/// connections for that port to, which relays them to `web`.
fn sidecar() -> Translation {
    let mut t = translate(&Config::from_yaml(BASE).expect("valid yaml"));
    let outbound = &mut t.resources.listeners[0];
    outbound.name = "outbound".into();
    outbound.address = Some(socket("127.0.0.1", 15001));
    outbound.use_original_dst = Some(BoolValue { value: true });
    outbound.listener_filters = vec![
        inspector(
            "envoy.filters.listener.tls_inspector",
            &TlsInspector::default(),
        ),
        inspector(
            "envoy.filters.listener.http_inspector",
            &HttpInspector::default(),
        ),
    ];
    outbound.filter_chains[0].filter_chain_match = Some(FilterChainMatch {
        application_protocols: vec!["http/1.1".into(), "h2c".into()],
        ..Default::default()
    });
    outbound.default_filter_chain = Some(tcp_chain("passthrough", None));
    let port_8080 = Listener {
        name: "0.0.0.0_8080".into(),
        address: Some(socket("0.0.0.0", 8080)),
        bind_to_port: Some(BoolValue { value: false }),
        filter_chains: vec![tcp_chain(
            "web",
            Some(FilterChainMatch {
                prefix_ranges: vec![CidrRange {
                    address_prefix: "10.96.0.0".into(),
                    prefix_len: Some(UInt32Value { value: 12 }),
                }],
                source_type: ConnectionSourceType::External.into(),
                ..Default::default()
            }),
        )],
        ..Default::default()
    };
    t.resources.listeners.push(port_8080);
    t
}

/// The port-8080 listener of [`sidecar`].
fn port_8080(t: &mut Translation) -> &mut Listener {
    t.resources
        .listeners
        .iter_mut()
        .find(|l| l.name == "0.0.0.0_8080")
        .expect("the port-8080 listener")
}

fn compile(t: &Translation) -> Result<Snapshot, CompileError> {
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    Compiler {
        registry: &registry,
        metrics: &metrics,
        previous_access_logs: Vec::new(),
        identity: None,
    }
    .compile(
        &prepare_check(&t.bootstrap, &t.resources).expect("prepared"),
        &t.bootstrap,
        &t.resources,
    )
}

fn refusal(t: &Translation) -> String {
    compile(t).expect_err("must be refused").to_string()
}

#[test]
fn a_sidecar_set_of_listeners_compiles_into_bound_and_handed_off_listeners() {
    let snapshot = compile(&sidecar()).expect("compiles");
    let listeners = &snapshot.listeners;
    let bound: Vec<_> = listeners.bound().map(|l| &*l.name).collect();
    assert_eq!(bound, ["outbound"]);
    let outbound = listeners
        .bound_at("127.0.0.1:15001".parse().unwrap())
        .unwrap();
    assert!(outbound.use_original_dst && outbound.inspect_tls && outbound.inspect_http);
    assert_eq!(
        outbound.inspection_timeout,
        Some(crate::listener::DEFAULT_INSPECTION_TIMEOUT)
    );
    assert!(matches!(
        outbound.chains[0].action,
        ChainAction::Http { tls: false, .. }
    ));
    let Some(ChainAction::Tcp(passthrough)) = outbound.default_chain.as_ref().map(|c| &c.action)
    else {
        panic!("the default chain is a tcp_proxy");
    };
    assert!(passthrough.cluster.original_destination);
    assert_eq!(passthrough.stat_prefix, "to_passthrough");
    assert_eq!(
        passthrough.idle_timeout,
        Some(crate::listener::tcp_proxy::DEFAULT_IDLE_TIMEOUT)
    );
    // A connection redirected from 10.96.0.10:8080 is the port-8080 listener's.
    let handed = listeners
        .for_original_destination("10.96.0.10:8080".parse().unwrap())
        .expect("handed off");
    assert_eq!(&*handed.name, "0.0.0.0_8080");
    assert!(listeners
        .for_original_destination("10.96.0.10:9090".parse().unwrap())
        .is_none());
    let Some(ChainAction::Tcp(web)) = handed.chains.first().map(|c| &c.action) else {
        panic!("a tcp_proxy chain");
    };
    assert_eq!(&*web.cluster.name, "web");
    // The HTTP side is the one connection manager, plaintext, h2c allowed.
    assert!(snapshot.http.tls.is_none() && snapshot.http.h2c);
}

#[test]
fn each_chain_gets_its_own_connection_manager_and_equal_ones_are_shared() {
    let mut t = sidecar();
    // An inbound listener whose connection manager routes everything to a direct answer,
    // and a second chain on the outbound listener with the outbound manager again.
    let outbound_chain = t.resources.listeners[0].filter_chains[0].clone();
    let mut again = outbound_chain.clone();
    again.filter_chain_match = Some(FilterChainMatch {
        destination_port: Some(UInt32Value { value: 9090 }),
        ..Default::default()
    });
    t.resources.listeners[0].filter_chains.push(again);
    let mut inbound_chain = outbound_chain;
    inbound_chain.filter_chain_match = None;
    let Some(filter::ConfigType::TypedConfig(any)) = &mut inbound_chain.filters[0].config_type
    else {
        panic!("typed config");
    };
    let mut hcm: HttpConnectionManager = decode(any).unwrap();
    hcm.stat_prefix = "inbound".into();
    hcm.route_specifier = Some(http_connection_manager::RouteSpecifier::RouteConfig(
        RouteConfiguration {
            name: "inbound".into(),
            virtual_hosts: vec![envoy_types::pb::envoy::config::route::v3::VirtualHost {
                name: "local".into(),
                domains: vec!["*".into()],
                routes: vec![envoy_types::pb::envoy::config::route::v3::Route {
                    r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::DirectResponse(DirectResponseAction {
                        status: 204,
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    ));
    *any = packed(&hcm);
    t.resources.listeners.push(Listener {
        name: "inbound".into(),
        address: Some(socket("127.0.0.1", 15006)),
        filter_chains: vec![inbound_chain],
        ..Default::default()
    });
    let snapshot = compile(&t).expect("compiles");
    assert_eq!(snapshot.http_managers.len(), 2);
    let manager = |listener: &str, chain: usize| {
        let listener = snapshot.listeners.by_name(listener).unwrap();
        Arc::clone(listener.chains[chain].http_manager().unwrap())
    };
    assert!(Arc::ptr_eq(
        &manager("outbound", 0),
        &manager("outbound", 1)
    ));
    let inbound = manager("inbound", 0);
    assert_eq!(inbound.stat_prefix, "inbound");
    let headers = http::HeaderMap::new();
    let route = inbound
        .router
        .route("any.host", "/x", &http::Method::GET, &headers)
        .expect("the inbound route");
    assert!(route.targets.is_empty(), "a direct response, not a cluster");
    let outbound = manager("outbound", 0);
    let route = outbound
        .router
        .route("any.host", "/x", &http::Method::GET, &headers)
        .expect("the outbound route");
    assert_eq!(
        route.targets[0]
            .cluster
            .as_ref()
            .map(|c| c.name.to_string()),
        Some("web".to_string())
    );
}

#[test]
fn chains_no_connection_could_tell_apart_are_refused() {
    let mut t = sidecar();
    let mut same = port_8080(&mut t).filter_chains[0].clone();
    // The same ranges in another order.
    if let Some(m) = &mut same.filter_chain_match {
        m.prefix_ranges.push(m.prefix_ranges[0].clone());
    }
    port_8080(&mut t).filter_chains.push(same);
    let e = refusal(&t);
    assert!(
        e.contains("filter_chains[1]: its filter_chain_match is the same as filter_chains[0]'s"),
        "{e}"
    );
}

#[test]
fn what_nip_cannot_do_in_a_listener_is_refused_by_name() {
    let mut t = sidecar();
    t.resources.listeners[0]
        .listener_filters
        .push(ListenerFilter {
            name: "envoy.filters.listener.proxy_protocol".into(),
            ..Default::default()
        });
    let e = refusal(&t);
    assert!(
        e.contains("listener_filters[2] \"envoy.filters.listener.proxy_protocol\": not supported"),
        "{e}"
    );

    let mut t = sidecar();
    port_8080(&mut t).filter_chains[0] = tcp_chain("nowhere", None);
    let e = refusal(&t);
    assert!(
        e.contains("tcp_proxy.cluster \"nowhere\" is not among the clusters"),
        "{e}"
    );

    let mut t = sidecar();
    if let Some(m) = &mut t.resources.listeners[0].filter_chains[0].filter_chain_match {
        m.address_suffix = "x".into();
    }
    let e = refusal(&t);
    assert!(
        e.contains(
            "filter_chains[0].filter_chain_match.address_suffix: NIP does not implement this field"
        ),
        "{e}"
    );

    let mut t = sidecar();
    if let Some(m) = &mut t.resources.listeners[0].filter_chains[0].filter_chain_match {
        m.transport_protocol = "quic".into();
    }
    let e = refusal(&t);
    assert!(
        e.contains("transport_protocol: \"quic\" is not one NIP detects"),
        "{e}"
    );

    let mut t = sidecar();
    t.resources.listeners[0].default_filter_chain = None;
    t.resources.listeners[0].filter_chains.clear();
    let e = refusal(&t);
    assert!(e.contains("has no filter chain"), "{e}");

    let mut t = sidecar();
    t.resources.listeners[0].bind_to_port = Some(BoolValue { value: false });
    let e = refusal(&t);
    assert!(e.contains("none takes connections"), "{e}");
}

#[test]
fn listener_filters_timeout_zero_waits_as_long_as_the_client_takes() {
    let mut t = sidecar();
    t.resources.listeners[0].listener_filters_timeout = Some(PbDuration {
        seconds: 0,
        nanos: 0,
    });
    t.resources.listeners[0].continue_on_listener_filters_timeout = true;
    let snapshot = compile(&t).expect("compiles");
    let outbound = &snapshot.listeners.all[0];
    assert_eq!(outbound.inspection_timeout, None);
    assert!(outbound.continue_on_inspection_timeout);
}

#[test]
fn the_sidecar_short_form_compiles_into_two_intercepting_listeners() {
    let t = translate(
        &Config::from_yaml(
            "sidecar: {}\nservices:\n  web: { endpoints: [\"10.0.0.2:8080\"] }\nroutes:\n  - { match: { host: web.local }, service: web }\n",
        )
        .expect("valid"),
    );
    let snapshot = compile(&t).expect("compiles");
    let mut bound: Vec<_> = snapshot.listeners.bound().map(|l| l.address).collect();
    bound.sort();
    assert_eq!(
        bound,
        [
            "0.0.0.0:15001".parse().unwrap(),
            "0.0.0.0:15006".parse().unwrap()
        ]
    );
    assert_eq!(
        snapshot.http_managers.len(),
        3,
        "outbound by routes, inbound, and web's by its endpoint's address"
    );
    for listener in snapshot.listeners.bound() {
        assert!(listener.use_original_dst && listener.inspect_tls && listener.inspect_http);
        assert!(listener.continue_on_inspection_timeout);
        let Some(ChainAction::Tcp(passthrough)) =
            listener.default_chain.as_ref().map(|c| &c.action)
        else {
            panic!("passthrough");
        };
        assert!(passthrough.cluster.original_destination);
    }
}

#[test]
fn a_mesh_sidecar_takes_mesh_tls_by_its_server_name_with_the_workload_certificate() {
    let t = translate(&Config::from_yaml("sidecar: { mesh: true }\n").expect("valid"));
    // The control plane's check: the workload certificate is the proxy's to have.
    crate::compile::check(&t.bootstrap, &t.resources).expect("checks");
    let snapshot = compile(&t).expect("compiles");
    let tls = snapshot.http.tls.as_ref().expect("the mesh chain's TLS");
    assert!(tls.workload_certificate && tls.require_client_certificate);
    let inbound = snapshot
        .listeners
        .by_name(nip_xds::resources::SIDECAR_INBOUND)
        .unwrap();
    let mesh = &inbound.chains[0];
    assert_eq!(mesh.matches.server_names, [nip_xds::mesh::MESH_SNI]);
    assert!(matches!(mesh.action, ChainAction::Http { tls: true, .. }));
    // The mesh chain and the plaintext chain share the inbound connection manager.
    assert!(Arc::ptr_eq(
        mesh.http_manager().unwrap(),
        inbound.chains[1].http_manager().unwrap()
    ));
}

#[test]
fn a_services_addresses_become_outbound_chains_to_the_service() {
    let t = translate(
        &Config::from_yaml(
            "sidecar: {}\nservices:\n  web: { endpoints: [\"10.0.0.2:8080\"], addresses: [\"10.96.0.10:80\"] }\n  db: { endpoints: [\"10.0.0.3:5432\"], addresses: [\"10.96.0.11:5432\"] }\n",
        )
        .expect("valid"),
    );
    let snapshot = compile(&t).expect("compiles");
    let outbound = snapshot
        .listeners
        .by_name(nip_xds::resources::SIDECAR_OUTBOUND)
        .unwrap();
    let facts = |destination: &str, detected: &crate::listener::inspect::Detected| {
        let destination: std::net::SocketAddr = destination.parse().unwrap();
        let (_, chain) = outbound
            .choose(&crate::listener::chains::ConnectionFacts {
                destination,
                source: "10.0.0.9:4000".parse().unwrap(),
                detected,
            })
            .expect("a chain");
        match &chain.action {
            ChainAction::Http { manager, .. } => format!("http {}", manager.stat_prefix),
            ChainAction::Tcp(tcp) => format!("tcp {}", tcp.cluster.name),
        }
    };
    let http = crate::listener::inspect::Detected {
        application_protocols: vec!["http/1.1".into()],
        ..Default::default()
    };
    let opaque = crate::listener::inspect::Detected::default();
    let tls = crate::listener::inspect::Detected {
        tls: true,
        ..Default::default()
    };
    assert_eq!(facts("10.96.0.10:80", &http), "http outbound_web");
    assert_eq!(facts("10.96.0.10:80", &opaque), "tcp tcp|web");
    assert_eq!(facts("10.96.0.10:80", &tls), "tcp tcp|web");
    assert_eq!(facts("10.96.0.11:5432", &opaque), "tcp tcp|db");
    // Elsewhere: the config's routes for HTTP, the original destination for the rest.
    assert_eq!(
        facts("10.1.2.3:80", &http),
        format!("http {}", nip_xds::resources::GATEWAY_LISTENER)
    );
    assert_eq!(facts("10.1.2.3:80", &opaque), "tcp sidecar_passthrough");
}

#[test]
fn each_role_serves_its_listeners_and_a_check_compiles_them_all() {
    let yaml = "sidecar: {}\nservices:\n  web: { endpoints: [\"10.0.0.2:8080\"] }\nroutes:\n  - { service: web }\n";
    let mut t = translate(&Config::from_yaml(yaml).expect("valid"));
    let bound = |t: &Translation| {
        let snapshot = compile(t).expect("compiles");
        let mut names: Vec<String> = snapshot
            .listeners
            .bound()
            .map(|l| l.name.to_string())
            .collect();
        names.sort();
        names
    };
    // This config's own proxy is a sidecar.
    assert_eq!(
        bound(&t),
        [
            nip_xds::resources::SIDECAR_INBOUND,
            nip_xds::resources::SIDECAR_OUTBOUND
        ]
    );
    // An edge proxy following the same control plane serves the gateway only.
    let edge = translate(&Config::from_yaml("node: { role: edge }\n").expect("valid"));
    t.bootstrap = edge.bootstrap;
    assert_eq!(bound(&t), [nip_xds::resources::GATEWAY_LISTENER]);
    crate::compile::check(&t.bootstrap, &t.resources).expect("every role's listeners check");
}
