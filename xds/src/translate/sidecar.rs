//! The `sidecar:` short form in xDS: the two listeners an Envoy sidecar gets from Istio, on
//! the ports `nip iptables setup` redirects to.
//!
//! ```text
//! sidecar_outbound :15001  use_original_dst, tls_inspector + http_inspector
//!   ├─ plaintext http/1.x, h2c ─▶ api_gateway's connection manager (routes; "*" ends in passthrough)
//!   └─ anything else (TLS too) ─▶ tcp_proxy ─▶ sidecar_passthrough (ORIGINAL_DST)
//! sidecar_inbound  :15006  use_original_dst, tls_inspector + http_inspector
//!   ├─ (mesh) TLS for mesh.nip.internal ─▶ mesh mutual TLS, then as plaintext HTTP
//!   ├─ plaintext http/1.x, h2c ─▶ its own connection manager ─▶ sidecar_passthrough (the app)
//!   └─ anything else ─▶ tcp_proxy ─▶ sidecar_passthrough
//! ```

use super::{
    gateway_connection_manager, listener_metadata, load_assignment, pack_any, pb_duration,
    router_filter, socket_address, ServiceConfig,
};
use crate::config::{Config, SidecarConfig};
use crate::resources::{
    names, tcp_cluster_name, SIDECAR_INBOUND, SIDECAR_OUTBOUND, SIDECAR_PASSTHROUGH,
};
use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, AdditionalAddress, Filter, FilterChain, FilterChainMatch, Listener,
    ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::pb::google::protobuf::UInt32Value;

/// The application protocols the HTTP inspector reports.
const HTTP_PROTOCOLS: [&str; 3] = ["http/1.0", "http/1.1", "h2c"];

/// The outbound and inbound listeners.
pub(super) fn listeners(config: &Config, sidecar: &SidecarConfig) -> Vec<Listener> {
    let outbound_http = gateway_connection_manager(config);
    let mut inbound_http = outbound_http.clone();
    inbound_http.stat_prefix = SIDECAR_INBOUND.to_string();
    // Inbound HTTP is counted and logged on its way to the application; routes and plugins
    // are the outbound side's.
    inbound_http.http_filters = vec![router_filter()];
    inbound_http.route_specifier = Some(http_connection_manager::RouteSpecifier::RouteConfig(
        RouteConfiguration {
            name: SIDECAR_INBOUND.to_string(),
            virtual_hosts: vec![VirtualHost {
                name: "application".to_string(),
                domains: vec!["*".to_string()],
                routes: vec![passthrough_route()],
                ..Default::default()
            }],
            ..Default::default()
        },
    ));
    let mut outbound = Listener {
        metadata: Some(crate::resources::with_role(
            listener_metadata(config),
            crate::config::NodeRole::Sidecar.as_str(),
        )),
        ..intercepting(
            SIDECAR_OUTBOUND,
            sidecar.outbound_port,
            sidecar,
            TrafficDirection::Outbound,
            pack_any(outbound_http.clone()),
            &tcp_access_log(config),
        )
    };
    // Connections to a service's own addresses, or to one of its endpoints, go to the
    // service, whatever their Host (balanced, retried, over mesh mutual TLS to meshed
    // endpoints).
    let mut ports = std::collections::BTreeSet::new();
    for (name, address) in service_destinations(config) {
        ports.insert(address.port());
        outbound.filter_chains.extend(service_chains(
            name,
            address,
            &outbound_http,
            &tcp_access_log(config),
        ));
    }
    // Other destinations on those ports: a chain naming the port outranks every chain that
    // does not, and matching never backtracks, so each port needs its own HTTP chain (what
    // is not HTTP goes on to the default chain, through).
    if let Some(http) = outbound.filter_chains.first().cloned() {
        for port in ports {
            let mut on_port = http.clone();
            on_port.name = format!("http :{port}");
            if let Some(matching) = on_port.filter_chain_match.as_mut() {
                matching.destination_port = Some(UInt32Value {
                    value: u32::from(port),
                });
            }
            outbound.filter_chains.push(on_port);
        }
    }
    vec![outbound, {
        let inbound_http = pack_any(inbound_http);
        let mut inbound = intercepting(
            SIDECAR_INBOUND,
            sidecar.inbound_port,
            sidecar,
            TrafficDirection::Inbound,
            inbound_http.clone(),
            &tcp_access_log(config),
        );
        inbound.metadata = Some(crate::resources::with_role(
            None,
            crate::config::NodeRole::Sidecar.as_str(),
        ));
        if sidecar.mesh {
            // Mesh mutual TLS from a meshed peer, told apart from an application's own
            // TLS by its server name; then the same way in as plaintext HTTP.
            inbound.filter_chains.insert(
                0,
                FilterChain {
                    name: "mesh".to_string(),
                    filter_chain_match: Some(FilterChainMatch {
                        transport_protocol: "tls".to_string(),
                        server_names: vec![crate::mesh::MESH_SNI.to_string()],
                        ..Default::default()
                    }),
                    filters: vec![Filter {
                        name: names::HTTP_CONNECTION_MANAGER.to_string(),
                        config_type: Some(filter::ConfigType::TypedConfig(inbound_http)),
                    }],
                    transport_socket: Some(crate::mesh::downstream_tls()),
                    ..Default::default()
                },
            );
        }
        inbound
    }]
}

/// The clusters of [`tcp_cluster_name`]: one per service a sidecar sends destinations to.
pub(super) fn tcp_clusters(config: &Config) -> Vec<Cluster> {
    with_destinations(config)
        .map(|(name, service)| super::cluster(&tcp_cluster_name(name), service))
        .collect()
}

/// Their endpoints.
pub(super) fn tcp_assignments(config: &Config) -> Vec<ClusterLoadAssignment> {
    with_destinations(config)
        .map(|(name, service)| load_assignment(&tcp_cluster_name(name), service))
        .collect()
}

/// The services some destination of [`service_destinations`] goes to.
fn with_destinations(config: &Config) -> impl Iterator<Item = (&String, &ServiceConfig)> {
    let names: std::collections::BTreeSet<&String> =
        service_destinations(config).map(|(name, _)| name).collect();
    config
        .services
        .iter()
        .filter(move |(name, _)| names.contains(name))
}

/// In sidecar mode, each destination a service owns: its addresses (ClusterIPs) first,
/// then its endpoints given by IP; an address two services claim is the first one's.
fn service_destinations(config: &Config) -> impl Iterator<Item = (&String, std::net::SocketAddr)> {
    let services = config
        .services
        .iter()
        .filter(move |(_, s)| config.sidecar.is_some() && !s.original_destination);
    let addresses = services.clone().flat_map(|(name, s)| {
        s.addresses
            .iter()
            .filter_map(move |a| Some((name, a.parse::<std::net::SocketAddr>().ok()?)))
    });
    let endpoints = services.flat_map(|(name, s)| {
        s.endpoints
            .iter()
            .filter_map(move |e| Some((name, e.address.parse::<std::net::SocketAddr>().ok()?)))
    });
    let mut taken = std::collections::BTreeSet::new();
    addresses
        .chain(endpoints)
        .filter(move |(_, address)| taken.insert(*address))
}

/// The outbound chains of one of a service's addresses: plaintext HTTP to a connection
/// manager routing to the service, other plaintext and TLS balanced over its endpoints as
/// TCP. (All three name the transport protocol: without it a plaintext connection that is
/// not HTTP would stop at the HTTP chain, as Envoy's matching never backtracks.)
fn service_chains(
    name: &str,
    address: std::net::SocketAddr,
    template: &HttpConnectionManager,
    access_log: &[AccessLog],
) -> Vec<FilterChain> {
    let matching = |transport: &str, http: bool| FilterChainMatch {
        destination_port: Some(UInt32Value {
            value: u32::from(address.port()),
        }),
        prefix_ranges: vec![CidrRange {
            address_prefix: address.ip().to_string(),
            prefix_len: Some(UInt32Value {
                value: if address.is_ipv4() { 32 } else { 128 },
            }),
        }],
        transport_protocol: transport.to_string(),
        application_protocols: if http {
            HTTP_PROTOCOLS.iter().map(|p| p.to_string()).collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let mut http = template.clone();
    http.stat_prefix = format!("outbound_{name}");
    http.route_specifier = Some(http_connection_manager::RouteSpecifier::RouteConfig(
        RouteConfiguration {
            name: format!("outbound_{name}"),
            virtual_hosts: vec![VirtualHost {
                name: name.to_string(),
                domains: vec!["*".to_string()],
                routes: vec![Route {
                    name: name.to_string(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            name.to_string(),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    ));
    let tcp = |transport: &str| FilterChain {
        name: format!("{name} {address} {transport}"),
        filter_chain_match: Some(matching(transport, false)),
        filters: vec![tcp_proxy_filter(
            &format!("outbound_{name}_tcp"),
            &tcp_cluster_name(name),
            access_log,
        )],
        ..Default::default()
    };
    vec![
        FilterChain {
            name: format!("{name} {address} http"),
            filter_chain_match: Some(matching("raw_buffer", true)),
            filters: vec![Filter {
                name: names::HTTP_CONNECTION_MANAGER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(http))),
            }],
            ..Default::default()
        },
        tcp("raw_buffer"),
        tcp("tls"),
    ]
}

fn tcp_proxy_filter(stat_prefix: &str, cluster: &str, access_log: &[AccessLog]) -> Filter {
    Filter {
        name: "envoy.filters.network.tcp_proxy".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
            access_log: access_log.to_vec(),
            ..Default::default()
        }))),
    }
}

/// The access log of `api_gateway` for the sidecar's TCP connections too (one line each).
fn tcp_access_log(config: &Config) -> Vec<AccessLog> {
    if config.api_gateway.access_log.enabled {
        vec![super::access_log_entry(config)]
    } else {
        Vec::new()
    }
}

/// A listener for redirected connections: HTTP to `http` (a packed connection manager),
/// everything else passed through.
fn intercepting(
    name: &str,
    port: u16,
    sidecar: &SidecarConfig,
    direction: TrafficDirection,
    http: envoy_types::pb::google::protobuf::Any,
    access_log: &[AccessLog],
) -> Listener {
    let inspector = |name: &str, config| ListenerFilter {
        name: name.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket_address("0.0.0.0", port)),
        additional_addresses: if sidecar.ipv6 {
            vec![AdditionalAddress {
                address: Some(socket_address("::", port)),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        use_original_dst: Some(BoolValue { value: true }),
        listener_filters: vec![
            inspector(
                "envoy.filters.listener.tls_inspector",
                pack_any(TlsInspector::default()),
            ),
            inspector(
                "envoy.filters.listener.http_inspector",
                pack_any(HttpInspector::default()),
            ),
        ],
        listener_filters_timeout: Some(pb_duration(sidecar.protocol_detection_timeout.0)),
        continue_on_listener_filters_timeout: true,
        traffic_direction: direction as i32,
        filter_chains: vec![FilterChain {
            name: "http".to_string(),
            // Plaintext only: a TLS client offers "http/1.1" by ALPN too, and its bytes
            // pass through.
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: "raw_buffer".to_string(),
                application_protocols: HTTP_PROTOCOLS.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            }),
            filters: vec![Filter {
                name: names::HTTP_CONNECTION_MANAGER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(http)),
            }],
            ..Default::default()
        }],
        default_filter_chain: Some(FilterChain {
            name: "passthrough".to_string(),
            filters: vec![tcp_proxy_filter(
                &format!("{name}_passthrough"),
                SIDECAR_PASSTHROUGH,
                access_log,
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `sidecar_passthrough`: an `ORIGINAL_DST` cluster.
pub(super) fn passthrough_cluster() -> Cluster {
    super::cluster(
        SIDECAR_PASSTHROUGH,
        &ServiceConfig {
            original_destination: true,
            ..Default::default()
        },
    )
}

/// A route of everything to `sidecar_passthrough`.
pub(super) fn passthrough_route() -> Route {
    Route {
        name: SIDECAR_PASSTHROUGH.to_string(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                SIDECAR_PASSTHROUGH.to_string(),
            )),
            ..Default::default()
        })),
        ..Default::default()
    }
}
