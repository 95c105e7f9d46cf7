//! Translation of a validated v4 [`Config`] into Envoy xDS v3 resources.
//!
//! The mapping follows Envoy's own model so that what we produce is what an Envoy user would
//! write by hand:
//!
//! | v4 config | xDS resource |
//! |---|---|
//! | `api_gateway` | `Listener` `api_gateway` + `HttpConnectionManager` (RDS over ADS, access log, TLS transport socket) |
//! | `routes` | `RouteConfiguration` `api_gateway_routes`: one `VirtualHost` per host pattern |
//! | `services.NAME` | `Cluster` NAME (`type: EDS`, lb policy, connect timeout, health check, HTTP/2 options) |
//! | `services.NAME.endpoints` | `ClusterLoadAssignment` NAME, one locality per (region, zone, sub-zone, priority) |
//! | `node`, `admin` | the bootstrap (`node`, `admin.address`) |
//!
//! Routes without a host go into every virtual host, in their place in the list, so that the
//! flat route list keeps "first match wins" within the most specific host.

use crate::config::{
    parse_endpoint_address, parse_listen_address, plugin_config_bytes, route_name, AccessLogFormat,
    Config, FailPolicy, HeaderAddConfig, HeaderMatchConfig, LbPolicy, NodeRole,
    PluginConfig as PluginYaml, RedirectConfig, RegexRewriteConfig, RouteConfig, ServiceConfig,
    UpstreamProtocol, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HEADERS_COUNT,
    DEFAULT_MAX_REQUEST_HEADERS_KB, DEFAULT_PLUGIN_BODY, DEFAULT_PLUGIN_CPU, DEFAULT_PLUGIN_MEMORY,
    DEFAULT_REQUEST_HEADERS_TIMEOUT, DEFAULT_STREAM_IDLE_TIMEOUT,
};
use crate::resources::{names, ResourceSet, CONNECT_UPGRADE, GATEWAY_LISTENER, GATEWAY_ROUTES};
use envoy_types::pb::envoy::config::accesslog::v3::{access_log, AccessLog};
use envoy_types::pb::envoy::config::bootstrap::v3::{
    bootstrap::DynamicResources, Admin, Bootstrap,
};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster, LoadBalancingPolicy};
use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as CoreHttpProtocolOptions;
use envoy_types::pb::envoy::config::core::v3::{
    address, data_source, health_check, socket_address, substitution_format_string,
    transport_socket, Address, ApiVersion, DataSource, HealthCheck, Http2ProtocolOptions, Locality,
    Node, SocketAddress, SubstitutionFormatString, TransportSocket,
};
use envoy_types::pb::envoy::config::core::v3::{
    api_config_source, grpc_service, header_value_option, ApiConfigSource, GrpcService,
    HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, http_uri, AsyncDataSource, HttpUri, Metadata, RemoteDataSource,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, ApiListener, Filter, FilterChain, Listener,
};
use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, redirect_action as redirect, retry_policy, route, route_action, route_match,
    weighted_cluster, DirectResponseAction, HeaderMatcher, RateLimit, RedirectAction, RetryPolicy,
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    stdout_access_log, StdoutAccessLog,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor, LocalRateLimitDescriptor,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
    TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options, HttpProtocolOptions,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher, RegexMatchAndSubstitute, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::Int64Range;
use envoy_types::pb::envoy::r#type::v3::TokenBucket;
use envoy_types::pb::google::protobuf::{
    self as pbuf, value::Kind, BoolValue, Duration as PbDuration, Struct, UInt32Value, Value,
};
use envoy_types::util::pack_any;
use std::collections::BTreeMap;
use std::time::Duration;

/// Envoy's default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default route timeout.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Envoy's default access log text format.
pub const ENVOY_DEFAULT_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Fields of the JSON access log line, keyed by output name.
pub const JSON_ACCESS_LOG_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration_ms", "%DURATION%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("route_name", "%ROUTE_NAME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("downstream_peer_uri_san", "%DOWNSTREAM_PEER_URI_SAN%"),
];

/// The translation of one config: the bootstrap and the resources.
#[derive(Debug, Clone)]
pub struct Translation {
    /// Node identity and admin address.
    pub bootstrap: Bootstrap,
    /// Listener, routes, clusters and endpoints.
    pub resources: ResourceSet,
    /// Parts of the config that loaded but do not act yet, each with its field path.
    pub not_applied: Vec<String>,
    /// Where a proxy following a control plane keeps its last accepted set (a proxy-local
    /// setting: Envoy's bootstrap has no field for it).
    pub last_good_file: Option<std::path::PathBuf>,
    /// How a proxy following a control plane proves who it is (mutual TLS and joining);
    /// `None`: plaintext. Proxy-local like `last_good_file`.
    pub control_plane_identity: Option<ControlPlaneIdentity>,
    /// Whether a proxy following a control plane streams its access records there
    /// (`control_plane.stream_access_logs`); proxy-local like `last_good_file`.
    pub stream_access_logs: bool,
    /// Process plugins the proxy starts and keeps running (`process.command`);
    /// proxy-local like `last_good_file`: xDS carries how to reach a processor, not how
    /// to run one.
    pub processes: Vec<PluginProcess>,
}

/// A plugin process a proxy runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginProcess {
    /// The plugin's name.
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// More environment (`NIP_PLUGIN_PORT` and `NIP_PLUGIN_NAME` are added).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: Option<std::path::PathBuf>,
    /// The user to run as.
    pub user: Option<String>,
    /// The port it serves on (its service's endpoint).
    pub port: u16,
    /// Memory ceiling in bytes.
    pub memory: Option<u64>,
    /// CPU in cores.
    pub cpu: Option<f64>,
    /// Open files.
    pub open_files: Option<u64>,
}

/// The plugin processes `config` asks a proxy to run.
fn plugin_processes(config: &Config) -> Vec<PluginProcess> {
    config
        .plugins
        .iter()
        .filter(|(_, p)| p.enabled)
        .filter_map(|(name, plugin)| {
            let process = plugin.process.as_ref().filter(|p| !p.command.is_empty())?;
            let endpoint = config.services.get(&process.service)?.endpoints.first()?;
            let (_, port) = crate::config::parse_endpoint_address(&endpoint.address).ok()?;
            Some(PluginProcess {
                name: name.clone(),
                command: process.command.clone(),
                env: process.env.clone(),
                working_dir: process.working_dir.as_ref().map(std::path::PathBuf::from),
                user: process.user.clone(),
                port,
                memory: process.limits.memory.map(|m| m.0),
                cpu: process.limits.cpu,
                open_files: process.limits.open_files,
            })
        })
        .collect()
}

/// A proxy's settings for mutual TLS with its control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneIdentity {
    /// The trust bundle the control plane's certificate must chain to.
    pub ca_file: std::path::PathBuf,
    /// The join token's file (else `$NIP_JOIN_TOKEN`).
    pub join_token_file: Option<std::path::PathBuf>,
    /// Where the key and certificate are kept between restarts.
    pub identity_dir: Option<std::path::PathBuf>,
}

/// Translates a validated config into xDS resources.
pub fn translate(config: &Config) -> Translation {
    let mut resources = ResourceSet {
        version: String::new(),
        listeners: match &config.sidecar {
            None => vec![gateway_listener(config)],
            // Both roles' listeners: edge gateways and sidecars of one fleet follow one
            // control plane, each serving its own.
            Some(sidecar_config) => {
                let mut gateway = gateway_listener(config);
                gateway.metadata = Some(crate::resources::with_role(
                    gateway.metadata.take(),
                    NodeRole::Edge.as_str(),
                ));
                std::iter::once(gateway)
                    .chain(sidecar::listeners(config, sidecar_config))
                    .collect()
            }
        }
        .into_iter()
        .chain(config.services.keys().map(|name| grpc_api_listener(name)))
        .collect(),
        routes: vec![route_configuration(config)],
        clusters: config
            .services
            .iter()
            .map(|(name, service)| cluster(name, service))
            .chain(
                config
                    .sidecar
                    .as_ref()
                    .map(|_| sidecar::passthrough_cluster()),
            )
            .chain(sidecar::tcp_clusters(config))
            .chain(auth::clusters(config))
            .chain(rate_limit_service(config).map(|s| cluster(RATE_LIMIT_CLUSTER, &s)))
            .chain(tracing_collector(config).map(|s| cluster(TRACING_CLUSTER, &s)))
            .collect(),
        endpoints: config
            .services
            .iter()
            .filter(|(_, service)| !service.original_destination)
            .map(|(name, service)| load_assignment(name, service))
            .chain(sidecar::tcp_assignments(config))
            .chain(auth::assignments(config))
            .chain(rate_limit_service(config).map(|s| load_assignment(RATE_LIMIT_CLUSTER, &s)))
            .chain(tracing_collector(config).map(|s| load_assignment(TRACING_CLUSTER, &s)))
            .collect(),
        // The control plane adds the mesh's trust bundle; a file config has no secrets.
        secrets: Vec::new(),
    };
    resources.version = resources.content_version();
    Translation {
        bootstrap: bootstrap(config),
        resources,
        not_applied: not_applied(config),
        last_good_file: config
            .control_plane
            .as_ref()
            .and_then(|c| c.last_good.as_ref())
            .map(std::path::PathBuf::from),
        stream_access_logs: config
            .control_plane
            .as_ref()
            .is_some_and(|c| c.stream_access_logs),
        control_plane_identity: config.control_plane.as_ref().and_then(|c| {
            let ca_file = std::path::PathBuf::from(c.ca_file.as_ref()?);
            let identity_dir = c
                .identity_dir
                .as_ref()
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    let last_good = std::path::Path::new(c.last_good.as_ref()?);
                    Some(last_good.parent()?.join("identity"))
                });
            Some(ControlPlaneIdentity {
                ca_file,
                join_token_file: c.join_token_file.as_ref().map(std::path::PathBuf::from),
                identity_dir,
            })
        }),
        processes: plugin_processes(config),
    }
}

/// Blocks the v4 format defines whose runtime has not landed yet. They are validated and
/// kept, never silently dropped: the proxy logs these and `nip validate` prints them.
fn not_applied(config: &Config) -> Vec<String> {
    let mut notes: Vec<String> = config
        .plugins
        .iter()
        .filter(|(_, p)| p.source.is_none() && p.process.is_none())
        .map(|(name, _)| format!("plugins.{name}: has no `source`, so no route can run it"))
        .collect();
    if config.tenant.is_some() || !config.tenants.is_empty() {
        notes.push(
            "tenants: message_rate, plugins, data.isolated, encryption, data.locality and data.retention (the access log file is rotated daily and older files deleted) are enforced"
                .to_string(),
        );
    }
    if let Some(control_plane) = &config.control_plane {
        if !(config.services.is_empty() && config.routes.is_empty() && config.plugins.is_empty()) {
            notes.push(format!(
                "control_plane: a proxy on this file serves what {} sends; this file's services, routes and plugins are not served",
                control_plane.address
            ));
        }
    }
    notes
}

fn bootstrap(config: &Config) -> Bootstrap {
    let node = &config.node;
    let id = node.id.clone().unwrap_or_else(default_node_id);
    let role = node.role.unwrap_or(if config.sidecar.is_some() {
        NodeRole::Sidecar
    } else {
        NodeRole::Edge
    });
    Bootstrap {
        node: Some(Node {
            id,
            cluster: node.cluster.clone(),
            locality: Some(Locality {
                region: node.region.clone().unwrap_or_default(),
                zone: node.zone.clone().unwrap_or_default(),
                sub_zone: String::new(),
            }),
            user_agent_name: "nip".to_string(),
            metadata: Some(pbuf::Struct {
                fields: [(
                    names::ROLE_METADATA.to_string(),
                    pbuf::Value {
                        kind: Some(pbuf::value::Kind::StringValue(role.as_str().to_string())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }),
        admin: Some(Admin {
            address: parse_listen_address(&config.admin.address)
                .ok()
                .map(socket_address_of),
            ..Default::default()
        }),
        dynamic_resources: config.control_plane.as_ref().map(ads_bootstrap),
        ..Default::default()
    }
}

/// Envoy's bootstrap for a proxy that takes everything over ADS from `control_plane`.
fn ads_bootstrap(control_plane: &crate::config::ControlPlaneConfig) -> DynamicResources {
    DynamicResources {
        ads_config: Some(ApiConfigSource {
            api_type: api_config_source::ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            grpc_services: vec![GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::GoogleGrpc(
                    grpc_service::GoogleGrpc {
                        target_uri: control_plane.address.clone(),
                        stat_prefix: "nip_control_plane".to_string(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }),
        lds_config: Some(crate::resources::ads_config_source()),
        cds_config: Some(crate::resources::ads_config_source()),
        ..Default::default()
    }
}

/// The ADS target a bootstrap points at, if the proxy follows a control plane.
pub fn ads_target(bootstrap: &Bootstrap) -> Option<String> {
    let ads = bootstrap.dynamic_resources.as_ref()?.ads_config.as_ref()?;
    ads.grpc_services
        .iter()
        .find_map(|service| match service.target_specifier.as_ref()? {
            grpc_service::TargetSpecifier::GoogleGrpc(google) => Some(google.target_uri.clone()),
            grpc_service::TargetSpecifier::EnvoyGrpc(_) => None,
        })
}

/// `nip-<hostname>`, the node id when the config gives none.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        "nip".to_string()
    } else {
        format!("nip-{host}")
    }
}

fn socket_address_of(addr: std::net::SocketAddr) -> Address {
    socket_address(&addr.ip().to_string(), addr.port())
}

fn socket_address(host: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn gateway_listener(config: &Config) -> Listener {
    let gateway = &config.api_gateway;
    let hcm = gateway_connection_manager(config);
    let transport_socket = if gateway.tls.mesh {
        Some(crate::mesh::downstream_tls())
    } else {
        gateway_tls(gateway)
    };
    Listener {
        name: GATEWAY_LISTENER.to_string(),
        address: parse_listen_address(&gateway.address)
            .ok()
            .map(socket_address_of),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: names::HTTP_CONNECTION_MANAGER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            transport_socket,
            ..Default::default()
        }],
        metadata: listener_metadata(config),
        ..Default::default()
    }
}

/// The connection manager of `api_gateway`: its routes (RDS), plugins, client limits and
/// access log.
fn gateway_connection_manager(config: &Config) -> HttpConnectionManager {
    let gateway = &config.api_gateway;
    let mut access_log = Vec::new();
    if gateway.access_log.enabled {
        access_log.push(access_log_entry(config));
    }
    HttpConnectionManager {
        stat_prefix: GATEWAY_LISTENER.to_string(),
        codec_type: if gateway.h2c || gateway.tls.enabled || gateway.tls.mesh {
            http_connection_manager::CodecType::Auto as i32
        } else {
            http_connection_manager::CodecType::Http1 as i32
        },
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(crate::resources::ads_config_source()),
            route_config_name: GATEWAY_ROUTES.to_string(),
        })),
        http_filters: auth::http_filters(config)
            .into_iter()
            .chain(
                config
                    .routes
                    .iter()
                    .any(|r| r.rate_limit.is_some())
                    .then(|| HttpFilter {
                        name: names::LOCAL_RATE_LIMIT.to_string(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                            LocalRateLimit {
                                stat_prefix: "local_rate_limit".to_string(),
                                ..Default::default()
                            },
                        ))),
                        ..Default::default()
                    }),
            )
            .chain(tenants::tenant_rate_limit_filter(config))
            .chain(
                config
                    .rate_limit_service
                    .as_ref()
                    .map(global_rate_limit_filter),
            )
            .chain(plugin_filters(config))
            .chain(std::iter::once(router_filter()))
            .collect(),
        access_log,
        upgrade_configs: if config.routes.iter().any(|r| r.matcher.connect) {
            vec![http_connection_manager::UpgradeConfig {
                upgrade_type: CONNECT_UPGRADE.to_string(),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        generate_request_id: Some(pbuf::BoolValue { value: true }),
        tracing: connection_manager_tracing(config),
        request_headers_timeout: Some(pb_duration(
            gateway
                .request_headers_timeout
                .map_or(DEFAULT_REQUEST_HEADERS_TIMEOUT, |d| d.0),
        )),
        stream_idle_timeout: Some(pb_duration(
            gateway
                .stream_idle_timeout
                .map_or(DEFAULT_STREAM_IDLE_TIMEOUT, |d| d.0),
        )),
        max_request_headers_kb: Some(UInt32Value {
            value: gateway
                .max_request_headers_kb
                .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS_KB),
        }),
        common_http_protocol_options: Some(CoreHttpProtocolOptions {
            idle_timeout: Some(pb_duration(
                gateway.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            )),
            max_connection_duration: gateway.max_connection_duration.map(|d| pb_duration(d.0)),
            max_headers_count: Some(UInt32Value {
                value: gateway
                    .max_headers_count
                    .unwrap_or(DEFAULT_MAX_HEADERS_COUNT),
            }),
            max_requests_per_connection: gateway
                .max_requests_per_connection
                .map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where a plugin's module comes from: a local file, a remote URL pinned by sha256, or
/// (sha256 alone) a control plane's module store ([`crate::stored_modules`]).
fn plugin_code(source: &crate::config::PluginSource) -> Option<AsyncDataSource> {
    let specifier = match (&source.file, &source.url) {
        (Some(file), _) => async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(file.clone())),
            ..Default::default()
        }),
        (None, Some(url)) => async_data_source::Specifier::Remote(RemoteDataSource {
            http_uri: Some(HttpUri {
                uri: url.clone(),
                timeout: Some(pb_duration(PLUGIN_FETCH_TIMEOUT)),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                    names::PLUGIN_FETCH_CLUSTER.to_string(),
                )),
            }),
            sha256: source
                .sha256
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            retry_policy: None,
        }),
        (None, None) => {
            let sha256 = source.sha256.as_ref()?.to_ascii_lowercase();
            async_data_source::Specifier::Remote(RemoteDataSource {
                http_uri: Some(HttpUri {
                    uri: crate::stored_modules::stored_module_uri(&sha256),
                    timeout: Some(pb_duration(PLUGIN_FETCH_TIMEOUT)),
                    http_upstream_type: None,
                }),
                sha256,
                retry_policy: None,
            })
        }
    };
    Some(AsyncDataSource {
        specifier: Some(specifier),
    })
}

/// The listener's metadata: plugin limits and the client limits Envoy keeps outside the
/// listener (`nip.downstream`).
fn listener_metadata(config: &Config) -> Option<Metadata> {
    let mut metadata = plugin_limits_metadata(config).unwrap_or_default();
    let signatures: std::collections::HashMap<String, Value> = config
        .plugins
        .iter()
        .filter_map(|(name, plugin)| {
            let signature = plugin.source.as_ref()?.signature.as_ref()?;
            Some((
                names::plugin_filter(name),
                Value {
                    kind: Some(Kind::StringValue(signature.trim().to_string())),
                },
            ))
        })
        .collect();
    if !signatures.is_empty() {
        let signing = Struct {
            fields: [(
                "signatures".to_string(),
                Value {
                    kind: Some(Kind::StructValue(Struct { fields: signatures })),
                },
            )]
            .into_iter()
            .collect(),
        };
        metadata
            .filter_metadata
            .insert(names::PLUGIN_SIGNING_METADATA.to_string(), signing);
    }
    let gateway = &config.api_gateway;
    let mut fields = std::collections::HashMap::new();
    if let Some(n) = gateway.max_active_downstream_connections {
        fields.insert(
            "max_active_downstream_connections".to_string(),
            Value {
                kind: Some(Kind::NumberValue(n as f64)),
            },
        );
    }
    if gateway.trust_priority_header {
        fields.insert(
            "trust_priority_header".to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        );
    }
    if !fields.is_empty() {
        metadata
            .filter_metadata
            .insert(names::DOWNSTREAM_METADATA.to_string(), Struct { fields });
    }
    if let Some(tracing) = &config.tracing {
        let flag = |on: bool| Value {
            kind: Some(Kind::BoolValue(on)),
        };
        metadata.filter_metadata.insert(
            names::TRACING_METADATA.to_string(),
            Struct {
                fields: [
                    ("parent_based".to_string(), flag(tracing.parent_based)),
                    ("errors".to_string(), flag(tracing.trace_errors)),
                ]
                .into(),
            },
        );
    }
    // The tenants' access log retention: a log shared by several tenants keeps lines as
    // long as the strictest of them allows.
    let retention = config
        .tenant
        .iter()
        .chain(config.tenants.values())
        .filter_map(|t| t.data.as_ref()?.retention.as_deref())
        .filter_map(|r| humantime::parse_duration(r).ok())
        .min();
    if let Some(retention) = retention {
        metadata.filter_metadata.insert(
            names::ACCESS_LOG_METADATA.to_string(),
            Struct {
                fields: [(
                    "retention_seconds".to_string(),
                    Value {
                        kind: Some(Kind::NumberValue(retention.as_secs() as f64)),
                    },
                )]
                .into(),
            },
        );
    }
    (!metadata.filter_metadata.is_empty()).then_some(metadata)
}

/// Makes every proxy served `resources` refuse a plugin module not signed by one of
/// `trusted_keys` (base64 ed25519 public keys): what a control plane adds for a tenant
/// whose admin requires signed plugins (the config's author cannot take it out).
pub fn require_signed_plugins(resources: &mut ResourceSet, trusted_keys: &[String]) {
    let keys = Value {
        kind: Some(Kind::ListValue(pbuf::ListValue {
            values: trusted_keys
                .iter()
                .map(|k| Value {
                    kind: Some(Kind::StringValue(k.clone())),
                })
                .collect(),
        })),
    };
    for listener in resources
        .listeners
        .iter_mut()
        .filter(|l| l.api_listener.is_none())
    {
        let metadata = listener.metadata.get_or_insert_with(Default::default);
        metadata
            .filter_metadata
            .entry(names::PLUGIN_SIGNING_METADATA.to_string())
            .or_default()
            .fields
            .insert("trusted_keys".to_string(), keys.clone());
    }
    resources.version = resources.content_version();
}

/// How long the proxy may take to download a plugin module.
const PLUGIN_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Plugin resource ceilings, which Envoy's Wasm filter has no field for: listener metadata
/// `nip.plugin_limits`, one struct per plugin filter name with `memory_bytes`, `cpu_ms` and
/// `body_bytes` (defaults filled in, so the proxy reads explicit values).
fn plugin_limits_metadata(config: &Config) -> Option<Metadata> {
    let number = |n: f64| pbuf::Value {
        kind: Some(pbuf::value::Kind::NumberValue(n)),
    };
    let limits = |plugin: &PluginYaml| {
        let memory = plugin.limits.memory.map_or(DEFAULT_PLUGIN_MEMORY, |m| m.0);
        let cpu = plugin.limits.cpu.map_or(DEFAULT_PLUGIN_CPU, |c| c.0);
        let body = plugin.limits.body.map_or(DEFAULT_PLUGIN_BODY, |b| b.0);
        pbuf::Value {
            kind: Some(pbuf::value::Kind::StructValue(pbuf::Struct {
                fields: [
                    ("memory_bytes".to_string(), number(memory as f64)),
                    ("cpu_ms".to_string(), number(cpu.as_millis() as f64)),
                    ("body_bytes".to_string(), number(body as f64)),
                ]
                .into_iter()
                .collect(),
            })),
        }
    };
    let fields: std::collections::HashMap<String, pbuf::Value> = config
        .plugins
        .iter()
        .filter(|(_, p)| p.enabled && p.source.is_some())
        .map(|(name, plugin)| (names::plugin_filter(name), limits(plugin)))
        .collect();
    if fields.is_empty() {
        return None;
    }
    Some(Metadata {
        filter_metadata: [(
            names::PLUGIN_LIMITS_METADATA.to_string(),
            pbuf::Struct { fields },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    })
}

/// One `envoy.extensions.filters.http.wasm.v3.Wasm` filter per runnable plugin, disabled by
/// default: routes switch on the plugins they list (`typed_per_filter_config`).
fn plugin_filters(config: &Config) -> impl Iterator<Item = HttpFilter> + '_ {
    config
        .plugins
        .iter()
        .filter(|(_, p)| p.enabled)
        .filter_map(|(name, plugin)| {
            if let Some(process) = &plugin.process {
                return Some(process_plugin_filter(name, plugin, process));
            }
            let source = plugin.source.as_ref()?;
            let string_any = |bytes: Vec<u8>| {
                pack_any(pbuf::StringValue {
                    value: String::from_utf8_lossy(&bytes).into_owned(),
                })
            };
            let wasm = Wasm {
                config: Some(PluginConfig {
                    name: name.clone(),
                    root_id: String::new(),
                    configuration: Some(string_any(plugin_config_bytes(&plugin.config))),
                    failure_policy: match plugin.fail {
                        FailPolicy::Open => FailurePolicy::FailOpen,
                        FailPolicy::Closed => FailurePolicy::FailClosed,
                    } as i32,
                    vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                        vm_id: name.clone(),
                        runtime: names::WASM_RUNTIME.to_string(),
                        code: Some(plugin_code(source)?),
                        configuration: Some(string_any(plugin_config_bytes(&plugin.vm_config))),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
            };
            Some(HttpFilter {
                name: names::plugin_filter(name),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(wasm))),
                disabled: true,
                ..Default::default()
            })
        })
}

/// The properties a process plugin gets with each request (Envoy's `request_attributes`,
/// under `envoy.filters.http.ext_proc` in `ProcessingRequest.attributes`): what the
/// message needs that headers do not carry.
pub const PROCESS_PLUGIN_ATTRIBUTES: &[&str] = &[
    "request.id",
    "request.time",
    "source.address",
    "route_name",
    "listener_name",
    "nip.tenant",
    "nip.principal",
    "nip.priority",
];

/// gRPC metadata naming the plugin on each stream to its process.
pub const PROCESS_PLUGIN_NAME_METADATA: &str = "x-nip-plugin";
/// gRPC metadata carrying the plugin's `config` (JSON) on each stream: a new config
/// reaches the process with the next request, without a restart.
pub const PROCESS_PLUGIN_CONFIG_METADATA: &str = "x-nip-plugin-config";

/// A process plugin as Envoy's `ext_proc` filter, off until a route lists it.
fn process_plugin_filter(
    name: &str,
    plugin: &crate::config::PluginConfig,
    process: &crate::config::ProcessPluginConfig,
) -> HttpFilter {
    use envoy_types::pb::envoy::config::core::v3::{grpc_service, GrpcService, HeaderValue};
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
        processing_mode::{BodySendMode, HeaderSendMode},
        ExternalProcessor, ProcessingMode,
    };
    let header = |on: bool| {
        let mode = if on {
            HeaderSendMode::Send
        } else {
            HeaderSendMode::Skip
        };
        mode as i32
    };
    let body = |on: bool| {
        let mode = match process.bodies() {
            _ if !on => BodySendMode::None,
            crate::config::ProcessBodyMode::Buffered => BodySendMode::Buffered,
            crate::config::ProcessBodyMode::Streamed => BodySendMode::Streamed,
            crate::config::ProcessBodyMode::None => BodySendMode::None,
        };
        mode as i32
    };
    let timeout = process.timeout.map_or(Duration::from_millis(200), |t| t.0);
    let config = String::from_utf8_lossy(&plugin_config_bytes(&plugin.config)).into_owned();
    let processor = ExternalProcessor {
        grpc_service: Some(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: process.service.clone(),
                    authority: process.service.clone(),
                    ..Default::default()
                },
            )),
            timeout: Some(pb_duration(timeout)),
            initial_metadata: [
                (PROCESS_PLUGIN_NAME_METADATA, name.to_string()),
                (PROCESS_PLUGIN_CONFIG_METADATA, config),
            ]
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(key, value)| HeaderValue {
                key: key.to_string(),
                value,
                ..Default::default()
            })
            .collect(),
            ..Default::default()
        }),
        failure_mode_allow: matches!(plugin.fail, FailPolicy::Open),
        processing_mode: Some(ProcessingMode {
            request_header_mode: header(process.requests),
            response_header_mode: header(process.responses),
            request_body_mode: body(process.requests),
            response_body_mode: body(process.responses),
            request_trailer_mode: HeaderSendMode::Skip as i32,
            response_trailer_mode: header(process.trailers),
        }),
        request_attributes: PROCESS_PLUGIN_ATTRIBUTES
            .iter()
            .map(|a| a.to_string())
            .collect(),
        message_timeout: Some(pb_duration(timeout)),
        stat_prefix: name.to_string(),
        ..Default::default()
    };
    HttpFilter {
        name: names::plugin_filter(name),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(processor))),
        disabled: true,
        ..Default::default()
    }
}

fn access_log_entry(config: &Config) -> AccessLog {
    let log = &config.api_gateway.access_log;
    let format = match log.format {
        AccessLogFormat::Json => substitution_format_string::Format::JsonFormat(Struct {
            fields: JSON_ACCESS_LOG_FIELDS
                .iter()
                .map(|(key, command)| {
                    (
                        (*key).to_string(),
                        Value {
                            kind: Some(Kind::StringValue((*command).to_string())),
                        },
                    )
                })
                .collect(),
        }),
        AccessLogFormat::Text => substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(
                ENVOY_DEFAULT_TEXT_FORMAT.to_string(),
            )),
            ..Default::default()
        }),
    };
    let format = SubstitutionFormatString {
        format: Some(format),
        ..Default::default()
    };
    if log.path == "stdout" {
        AccessLog {
            name: names::STDOUT_ACCESS_LOG.to_string(),
            config_type: Some(access_log::ConfigType::TypedConfig(pack_any(
                StdoutAccessLog {
                    access_log_format: Some(stdout_access_log::AccessLogFormat::LogFormat(format)),
                },
            ))),
            ..Default::default()
        }
    } else {
        AccessLog {
            name: names::FILE_ACCESS_LOG.to_string(),
            config_type: Some(access_log::ConfigType::TypedConfig(pack_any(FileAccessLog {
                path: log.path.clone(),
                access_log_format: Some(
                    envoy_types::pb::envoy::extensions::access_loggers::file::v3::file_access_log::AccessLogFormat::LogFormat(format),
                ),
            }))),
            ..Default::default()
        }
    }
}

fn route_configuration(config: &Config) -> RouteConfiguration {
    // One virtual host per distinct host pattern; "*" always exists so hostless routes and
    // unknown hosts have a home.
    let mut hosts: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    hosts.insert("*".to_string(), Vec::new());
    for route in &config.routes {
        if let Some(host) = &route.matcher.host {
            hosts.entry(host.clone()).or_default();
        }
    }
    for (index, route) in config.routes.iter().enumerate() {
        let xds_route = xds_route(config, route, index, config.data_locality(route));
        match route.matcher.host.as_deref() {
            None | Some("*") => {
                for routes in hosts.values_mut() {
                    routes.push(xds_route.clone());
                }
            }
            Some(host) => {
                if let Some(routes) = hosts.get_mut(host) {
                    routes.push(xds_route);
                }
            }
        }
    }
    if config.sidecar.is_some() {
        // A request no route takes goes on to where it was going.
        if let Some(routes) = hosts.get_mut("*") {
            routes.push(sidecar::passthrough_route());
        }
    }
    RouteConfiguration {
        name: GATEWAY_ROUTES.to_string(),
        virtual_hosts: hosts
            .into_iter()
            .map(|(host, routes)| VirtualHost {
                name: if host == "*" {
                    "default".to_string()
                } else {
                    host.clone()
                },
                domains: vec![host],
                routes,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// One route; `tenant_locality` is where the tenant's data must stay (a route without its
/// own `locality` is pinned there).
fn xds_route(
    config: &Config,
    route: &RouteConfig,
    index: usize,
    tenant_locality: Option<&str>,
) -> Route {
    let m = &route.matcher;
    let path_specifier = if m.connect {
        route_match::PathSpecifier::ConnectMatcher(route_match::ConnectMatcher {})
    } else if let Some(path) = &m.path {
        route_match::PathSpecifier::Path(path.clone())
    } else if let Some(regex) = &m.path_regex {
        route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: regex.clone(),
            ..Default::default()
        })
    } else {
        route_match::PathSpecifier::Prefix(m.path_prefix.clone().unwrap_or_else(|| "/".into()))
    };
    let mut headers: Vec<HeaderMatcher> = m.headers.iter().map(header_matcher).collect();
    if !m.methods.is_empty() {
        headers.push(HeaderMatcher {
            name: ":method".to_string(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        regex: format!("^({})$", m.methods.join("|")),
                        ..Default::default()
                    })),
                    ignore_case: false,
                },
            )),
            ..Default::default()
        });
    }
    let cluster_specifier = match &route.service {
        Some(service) => route_action::ClusterSpecifier::Cluster(service.clone()),
        None => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: route
                .split
                .iter()
                .map(|leg| weighted_cluster::ClusterWeight {
                    name: leg.service.clone(),
                    weight: Some(UInt32Value { value: leg.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let retry_policy = route.retries.as_ref().map(|r| RetryPolicy {
        retry_on: r.on.join(","),
        num_retries: Some(UInt32Value { value: r.max }),
        per_try_timeout: r.per_try_timeout.map(|d| pb_duration(d.into())),
        retriable_status_codes: r
            .retriable_status_codes
            .iter()
            .map(|&c| u32::from(c))
            .collect(),
        retry_back_off: r.back_off.as_ref().map(|b| retry_policy::RetryBackOff {
            base_interval: Some(pb_duration(b.base_interval.into())),
            max_interval: b.max_interval.map(|d| pb_duration(d.into())),
        }),
        ..Default::default()
    });
    // Each listed plugin is switched on for this route; its position in the list is the
    // per-route config, so the proxy runs them in the route's order.
    let mut typed_per_filter_config: std::collections::HashMap<String, pbuf::Any> = route
        .plugins
        .iter()
        .enumerate()
        .map(|(position, plugin)| {
            (
                names::plugin_filter(plugin),
                pack_any(FilterConfig {
                    config: Some(pack_any(UInt32Value {
                        value: u32::try_from(position).unwrap_or(u32::MAX),
                    })),
                    is_optional: false,
                    disabled: false,
                }),
            )
        })
        .collect();
    typed_per_filter_config.extend(auth::route_configs(config, route, index));
    if let Some(limit) = route.rate_limit.as_ref().filter(|l| !l.is_global()) {
        typed_per_filter_config.insert(
            names::LOCAL_RATE_LIMIT.to_string(),
            pack_any(LocalRateLimit {
                stat_prefix: route_name(route, index),
                token_bucket: Some(TokenBucket {
                    max_tokens: limit.burst.unwrap_or(limit.requests),
                    tokens_per_fill: Some(UInt32Value {
                        value: limit.requests,
                    }),
                    fill_interval: Some(pb_duration(limit.per.0)),
                }),
                // Per key: a bucket per value of the client's key (an empty value is
                // Envoy's wildcard); requests without the key share the default bucket.
                descriptors: limit
                    .key
                    .iter()
                    .map(|key| LocalRateLimitDescriptor {
                        entries: vec![rate_limit_descriptor::Entry {
                            key: rate_limit_key_name(key).to_string(),
                            value: String::new(),
                        }],
                        token_bucket: Some(TokenBucket {
                            max_tokens: limit.burst.unwrap_or(limit.requests),
                            tokens_per_fill: Some(UInt32Value {
                                value: limit.requests,
                            }),
                            fill_interval: Some(pb_duration(limit.per.0)),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                // DRAFT_VERSION_03: the x-ratelimit-* headers.
                enable_x_ratelimit_headers: 1,
                ..Default::default()
            }),
        );
    }
    let locality = route.locality.as_deref().or(tenant_locality);
    let one_field = |key: &str, value: &str| Struct {
        fields: [(
            key.to_string(),
            Value {
                kind: Some(Kind::StringValue(value.to_string())),
            },
        )]
        .into(),
    };
    let filter_metadata: std::collections::HashMap<String, Struct> = locality
        .map(|region| {
            (
                names::LOCALITY_METADATA.to_string(),
                one_field("region", region),
            )
        })
        .into_iter()
        .chain(
            crate::config::route_tenant(config, route).map(|(id, tenant)| {
                let mut fields = one_field("id", id);
                if let Some(priority) = &tenant.priority {
                    fields.fields.insert(
                        "priority".to_string(),
                        Value {
                            kind: Some(Kind::StringValue(priority.clone())),
                        },
                    );
                }
                (names::TENANT_METADATA.to_string(), fields)
            }),
        )
        .collect();
    let metadata = (!filter_metadata.is_empty()).then(|| Metadata {
        filter_metadata,
        ..Default::default()
    });
    let action = if let Some(redirect) = &route.redirect {
        route::Action::Redirect(redirect_action(redirect))
    } else if let Some(direct) = &route.direct_response {
        route::Action::DirectResponse(DirectResponseAction {
            status: u32::from(direct.status),
            body: direct.body.as_ref().map(|body| DataSource {
                specifier: Some(data_source::Specifier::InlineString(body.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
    } else {
        route::Action::Route(RouteAction {
            cluster_specifier: Some(cluster_specifier),
            prefix_rewrite: route.prefix_rewrite.clone().unwrap_or_default(),
            regex_rewrite: route.regex_rewrite.as_ref().map(regex_rewrite),
            host_rewrite_specifier: match (&route.host_rewrite, route.auto_host_rewrite) {
                (Some(host), _) => Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
                    host.clone(),
                )),
                (None, true) => Some(route_action::HostRewriteSpecifier::AutoHostRewrite(
                    BoolValue { value: true },
                )),
                (None, false) => None,
            },
            timeout: Some(pb_duration(
                route
                    .timeout
                    .map(Into::into)
                    .unwrap_or(DEFAULT_ROUTE_TIMEOUT),
            )),
            retry_policy,
            idle_timeout: route.idle_timeout.map(|d| pb_duration(d.into())),
            hash_policy: route.hash_policy.iter().map(hash_policy).collect(),
            // A CONNECT route terminates the tunnel here and relays its bytes as TCP.
            upgrade_configs: if m.connect {
                vec![route_action::UpgradeConfig {
                    upgrade_type: CONNECT_UPGRADE.to_string(),
                    connect_config: Some(route_action::upgrade_config::ConnectConfig::default()),
                    ..Default::default()
                }]
            } else {
                Vec::new()
            },
            rate_limits: rate_limit_actions(config, route, index)
                .into_iter()
                .chain(tenants::tenant_rate_limit_actions(config, route))
                .collect(),
            ..Default::default()
        })
    };
    Route {
        name: route_name(route, index),
        metadata,
        typed_per_filter_config,
        r#match: Some(RouteMatch {
            path_specifier: Some(path_specifier),
            headers,
            ..Default::default()
        }),
        action: Some(action),
        request_headers_to_add: route
            .request_headers_to_add
            .iter()
            .map(header_option)
            .collect(),
        request_headers_to_remove: route.request_headers_to_remove.clone(),
        response_headers_to_add: route
            .response_headers_to_add
            .iter()
            .map(header_option)
            .collect(),
        response_headers_to_remove: route.response_headers_to_remove.clone(),
        ..Default::default()
    }
}

/// A v4 regex rewrite as Envoy's `RegexMatchAndSubstitute`.
fn regex_rewrite(rewrite: &RegexRewriteConfig) -> RegexMatchAndSubstitute {
    RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher {
            regex: rewrite.pattern.clone(),
            ..Default::default()
        }),
        substitution: rewrite.substitution.clone(),
    }
}

/// A v4 header to add as Envoy's `HeaderValueOption` (validation checked the action).
fn header_option(add: &HeaderAddConfig) -> HeaderValueOption {
    use header_value_option::HeaderAppendAction;
    let append_action = match add.append_action.as_deref() {
        Some("add_if_absent") => HeaderAppendAction::AddIfAbsent,
        Some("overwrite_if_exists_or_add") => HeaderAppendAction::OverwriteIfExistsOrAdd,
        Some("overwrite_if_exists") => HeaderAppendAction::OverwriteIfExists,
        _ => HeaderAppendAction::AppendIfExistsOrAdd,
    };
    HeaderValueOption {
        header: Some(HeaderValue {
            key: add.name.clone(),
            value: add.value.clone(),
            ..Default::default()
        }),
        append_action: append_action as i32,
        keep_empty_value: add.keep_empty_value,
        ..Default::default()
    }
}

/// A v4 redirect as Envoy's `RedirectAction`.
fn redirect_action(redirect: &RedirectConfig) -> RedirectAction {
    use redirect::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let scheme = if redirect.https_redirect {
        Some(SchemeRewriteSpecifier::HttpsRedirect(true))
    } else {
        redirect
            .scheme_redirect
            .clone()
            .map(SchemeRewriteSpecifier::SchemeRedirect)
    };
    let path = if let Some(path) = &redirect.path_redirect {
        Some(PathRewriteSpecifier::PathRedirect(path.clone()))
    } else if let Some(prefix) = &redirect.prefix_rewrite {
        Some(PathRewriteSpecifier::PrefixRewrite(prefix.clone()))
    } else {
        redirect
            .regex_rewrite
            .as_ref()
            .map(|r| PathRewriteSpecifier::RegexRewrite(regex_rewrite(r)))
    };
    let code = match redirect.response_code {
        Some(302) => RedirectResponseCode::Found,
        Some(303) => RedirectResponseCode::SeeOther,
        Some(307) => RedirectResponseCode::TemporaryRedirect,
        Some(308) => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    RedirectAction {
        host_redirect: redirect.host_redirect.clone().unwrap_or_default(),
        port_redirect: redirect.port_redirect.map_or(0, u32::from),
        response_code: code as i32,
        strip_query: redirect.strip_query,
        scheme_rewrite_specifier: scheme,
        path_rewrite_specifier: path,
    }
}

/// One v4 hash policy entry as Envoy's (validation made sure exactly one source is set).
fn hash_policy(
    config: &crate::config::HashPolicyConfig,
) -> envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy {
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
    };
    let policy_specifier = if let Some(header) = &config.header {
        PolicySpecifier::Header(Header {
            header_name: header.clone(),
            regex_rewrite: None,
        })
    } else if let Some(cookie) = &config.cookie {
        PolicySpecifier::Cookie(Cookie {
            name: cookie.clone(),
            ..Default::default()
        })
    } else if let Some(name) = &config.query_parameter {
        PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
    } else {
        PolicySpecifier::ConnectionProperties(ConnectionProperties {
            source_ip: config.source_ip,
        })
    };
    envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy {
        terminal: config.terminal,
        policy_specifier: Some(policy_specifier),
    }
}

fn header_matcher(header: &HeaderMatchConfig) -> HeaderMatcher {
    let string_match = |pattern| {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(pattern),
                ignore_case: false,
            },
        ))
    };
    let specifier = if let Some(exact) = &header.exact {
        string_match(string_matcher::MatchPattern::Exact(exact.clone()))
    } else if let Some(prefix) = &header.prefix {
        string_match(string_matcher::MatchPattern::Prefix(prefix.clone()))
    } else if let Some(regex) = &header.regex {
        string_match(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: regex.clone(),
            ..Default::default()
        }))
    } else {
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true))
    };
    HeaderMatcher {
        name: header.name.to_ascii_lowercase(),
        header_match_specifier: specifier,
        // `present: false` means "must be absent": Envoy's present_match with invert_match.
        invert_match: header.present == Some(false),
        ..Default::default()
    }
}

/// The first descriptor entry of a global limit: the route, whose limit the rate limit
/// service applies.
pub const RATE_LIMIT_ROUTE_KEY: &str = "route";
/// The domain of NIP's global limits at the rate limit service.
pub const RATE_LIMIT_DOMAIN: &str = "nip";
/// The cluster of the rate limit service.
pub const RATE_LIMIT_CLUSTER: &str = "rate_limit_service";

/// The descriptor entry key of a rate limit's client key.
fn rate_limit_key_name(key: &crate::config::RateLimitKeyConfig) -> &'static str {
    if key.source_ip {
        "remote_address"
    } else {
        "client"
    }
}

/// The route's `rate_limits`: the actions that make a descriptor of its rate limit's
/// client key (a claim: one entry per provider whose verified payload may hold it).
fn rate_limit_actions(config: &Config, route: &RouteConfig, index: usize) -> Vec<RateLimit> {
    use envoy_types::pb::envoy::config::route::v3::rate_limit::{action, Action};
    let Some(limit) = &route.rate_limit else {
        return Vec::new();
    };
    // A global limit's descriptors start with the route (the service's key to its limit).
    let route_entry = limit.is_global().then(|| Action {
        action_specifier: Some(action::ActionSpecifier::GenericKey(action::GenericKey {
            descriptor_key: RATE_LIMIT_ROUTE_KEY.to_string(),
            descriptor_value: route_name(route, index),
            ..Default::default()
        })),
    });
    let one = |specifier: Option<action::ActionSpecifier>| RateLimit {
        actions: route_entry
            .iter()
            .cloned()
            .chain(specifier.map(|s| Action {
                action_specifier: Some(s),
            }))
            .collect(),
        ..Default::default()
    };
    let Some(key) = &limit.key else {
        return route_entry
            .is_some()
            .then(|| one(None))
            .into_iter()
            .collect();
    };
    if let Some(header) = &key.header {
        return vec![one(Some(action::ActionSpecifier::RequestHeaders(
            action::RequestHeaders {
                header_name: header.to_ascii_lowercase(),
                descriptor_key: rate_limit_key_name(key).to_string(),
                ..Default::default()
            },
        )))];
    }
    if key.source_ip {
        return vec![one(Some(action::ActionSpecifier::RemoteAddress(
            action::RemoteAddress {},
        )))];
    }
    let Some(claim) = &key.claim else {
        return Vec::new();
    };
    claim_actions(config, rate_limit_key_name(key), claim)
        .map(|action| one(Some(action)))
        .collect()
}

/// One `metadata` action per JWT provider, for `claim` (`a.b` nested) of its verified
/// payload (kept under the provider's name) as the descriptor entry `descriptor_key`.
pub(super) fn claim_actions<'c>(
    config: &'c Config,
    descriptor_key: &'c str,
    claim: &'c str,
) -> impl Iterator<
    Item = envoy_types::pb::envoy::config::route::v3::rate_limit::action::ActionSpecifier,
> + 'c {
    use envoy_types::pb::envoy::config::route::v3::rate_limit::action;
    use envoy_types::pb::envoy::r#type::metadata::v3::{metadata_key, MetadataKey};
    config.auth.jwt_providers.keys().map(move |provider| {
        let path = std::iter::once(provider.as_str())
            .chain(claim.split('.'))
            .map(|k| metadata_key::PathSegment {
                segment: Some(metadata_key::path_segment::Segment::Key(k.to_string())),
            })
            .collect();
        action::ActionSpecifier::Metadata(action::MetaData {
            descriptor_key: descriptor_key.to_string(),
            metadata_key: Some(MetadataKey {
                key: names::JWT_AUTHN.to_string(),
                path,
            }),
            ..Default::default()
        })
    })
}

/// Envoy's `ratelimit` filter asking the rate limit service about global limits.
fn global_rate_limit_filter(service: &crate::config::RateLimitServiceConfig) -> HttpFilter {
    use envoy_types::pb::envoy::config::core::v3::{grpc_service, ApiVersion, GrpcService};
    use envoy_types::pb::envoy::config::ratelimit::v3::RateLimitServiceConfig;
    use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3::RateLimit as RateLimitFilter;
    HttpFilter {
        name: names::RATE_LIMIT.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            RateLimitFilter {
                domain: RATE_LIMIT_DOMAIN.to_string(),
                timeout: Some(pb_duration(
                    service.timeout.map_or(Duration::from_millis(100), |t| t.0),
                )),
                failure_mode_deny: service.failure_mode_deny,
                rate_limit_service: Some(RateLimitServiceConfig {
                    grpc_service: Some(GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: RATE_LIMIT_CLUSTER.to_string(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }),
                    transport_api_version: ApiVersion::V3 as i32,
                }),
                // DRAFT_VERSION_03: the x-ratelimit-* headers.
                enable_x_ratelimit_headers: 1,
                ..Default::default()
            },
        ))),
        ..Default::default()
    }
}

/// A service of one endpoint at `address` (what a `host:port` setting stands for).
fn single_endpoint_service(address: &str, protocol: UpstreamProtocol) -> ServiceConfig {
    ServiceConfig {
        endpoints: vec![crate::config::EndpointConfig {
            address: address.to_string(),
            region: None,
            zone: None,
            sub_zone: None,
            weight: 1,
            priority: 0,
        }],
        protocol,
        ..Default::default()
    }
}

/// The rate limit service as a service of its own (gRPC: HTTP/2).
fn rate_limit_service(config: &Config) -> Option<ServiceConfig> {
    let service = config.rate_limit_service.as_ref()?;
    Some(single_endpoint_service(
        &service.address,
        UpstreamProtocol::Http2,
    ))
}

/// The cluster of the tracing collector.
pub const TRACING_CLUSTER: &str = "tracing_collector";

/// The tracing collector as a service of its own (OTLP/gRPC: HTTP/2).
fn tracing_collector(config: &Config) -> Option<ServiceConfig> {
    let tracing = config.tracing.as_ref()?;
    let protocol = match tracing.protocol {
        crate::config::TracingProtocol::Grpc => UpstreamProtocol::Http2,
        crate::config::TracingProtocol::Http => UpstreamProtocol::Http1,
    };
    Some(single_endpoint_service(&tracing.address, protocol))
}

/// The connection manager's `tracing`: the OpenTelemetry provider sending to the
/// collector's cluster.
fn connection_manager_tracing(config: &Config) -> Option<http_connection_manager::Tracing> {
    use envoy_types::pb::envoy::config::core::v3::{grpc_service, GrpcService, HttpService};
    use envoy_types::pb::envoy::config::trace::v3::{tracing, OpenTelemetryConfig};
    let settings = config.tracing.as_ref()?;
    let timeout = settings.timeout.map_or(Duration::from_secs(10), |t| t.0);
    let mut otel = OpenTelemetryConfig {
        service_name: settings
            .service_name
            .clone()
            .unwrap_or_else(|| "nip".to_string()),
        ..Default::default()
    };
    match settings.protocol {
        crate::config::TracingProtocol::Grpc => {
            otel.grpc_service = Some(GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                    grpc_service::EnvoyGrpc {
                        cluster_name: TRACING_CLUSTER.to_string(),
                        ..Default::default()
                    },
                )),
                timeout: Some(pb_duration(timeout)),
                ..Default::default()
            })
        }
        crate::config::TracingProtocol::Http => {
            otel.http_service = Some(HttpService {
                http_uri: Some(HttpUri {
                    uri: format!(
                        "http://{}{}",
                        settings.address,
                        settings.path.as_deref().unwrap_or("/v1/traces")
                    ),
                    timeout: Some(pb_duration(timeout)),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                        TRACING_CLUSTER.to_string(),
                    )),
                }),
                ..Default::default()
            })
        }
    }
    Some(http_connection_manager::Tracing {
        random_sampling: settings
            .random_sampling
            .map(|value| envoy_types::pb::envoy::r#type::v3::Percent { value }),
        provider: Some(tracing::Http {
            name: "envoy.tracers.opentelemetry".to_string(),
            config_type: Some(tracing::http::ConfigType::TypedConfig(pack_any(otel))),
        }),
        spawn_upstream_span: Some(BoolValue {
            value: settings.spawn_upstream_span,
        }),
        max_path_tag_length: settings
            .max_path_tag_length
            .map(|value| UInt32Value { value }),
        ..Default::default()
    })
}

/// The router filter, last in every filter chain.
fn router_filter() -> HttpFilter {
    HttpFilter {
        name: names::ROUTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

/// What a proxyless gRPC client resolves `xds:///NAME` to: a Listener named after the
/// service, whose `api_listener` holds a connection manager with an inline route sending
/// every call to the service's cluster (gRPC's xDS resolver, A27). Served only to clients
/// that ask for it by name, never in a wildcard listener subscription.
fn grpc_api_listener(service: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: service.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: service.to_string(),
                virtual_hosts: vec![VirtualHost {
                    name: service.to_string(),
                    domains: vec!["*".to_string()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                service.to_string(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: service.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm)),
        }),
        ..Default::default()
    }
}

/// `lb: latency` as a load-balancing policy list: NIP's peak EWMA first, Envoy's
/// least-request for clients that do not know it.
fn peak_ewma_policy(latency: crate::config::LatencyConfig) -> LoadBalancingPolicy {
    use envoy_types::pb::envoy::config::cluster::v3::load_balancing_policy::Policy;
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
    let seconds = |d: Option<crate::config::HumanDuration>, default: Duration| Value {
        kind: Some(Kind::NumberValue(
            d.map_or(default, Into::into).as_secs_f64(),
        )),
    };
    let parameters = Struct {
        fields: [
            (
                "decay_seconds".to_string(),
                seconds(latency.decay, DEFAULT_LATENCY_DECAY),
            ),
            (
                "default_rtt_seconds".to_string(),
                seconds(latency.default_rtt, DEFAULT_LATENCY_RTT),
            ),
        ]
        .into(),
    };
    LoadBalancingPolicy {
        policies: vec![
            Policy {
                typed_extension_config: Some(TypedExtensionConfig {
                    name: names::PEAK_EWMA_POLICY.to_string(),
                    typed_config: Some(pack_any(parameters)),
                }),
            },
            Policy {
                typed_extension_config: Some(TypedExtensionConfig {
                    name: names::LEAST_REQUEST_POLICY.to_string(),
                    typed_config: Some(pack_any(LeastRequest::default())),
                }),
            },
        ],
    }
}

/// The v4 outlier detection as Envoy's message (unset fields stay unset: Envoy defaults).
fn outlier_detection(
    config: crate::config::OutlierDetectionConfig,
) -> envoy_types::pb::envoy::config::cluster::v3::OutlierDetection {
    let number = |n: Option<u32>| n.map(|value| UInt32Value { value });
    let time = |d: Option<crate::config::HumanDuration>| d.map(|d| pb_duration(d.into()));
    envoy_types::pb::envoy::config::cluster::v3::OutlierDetection {
        consecutive_5xx: number(config.consecutive_5xx),
        consecutive_gateway_failure: number(config.consecutive_gateway_errors),
        enforcing_consecutive_gateway_failure: config
            .consecutive_gateway_errors
            .map(|_| UInt32Value { value: 100 }),
        interval: time(config.interval),
        base_ejection_time: time(config.base_ejection_time),
        max_ejection_time: time(config.max_ejection_time),
        max_ejection_percent: number(config.max_ejection_percent),
        success_rate_minimum_hosts: number(config.success_rate_minimum_hosts),
        success_rate_request_volume: number(config.success_rate_request_volume),
        success_rate_stdev_factor: config.success_rate_stdev_factor.map(|f| UInt32Value {
            value: (f * 1000.0).round() as u32,
        }),
        enforcing_success_rate: number(config.enforcing_success_rate),
        failure_percentage_threshold: number(config.failure_percentage_threshold),
        enforcing_failure_percentage: config
            .failure_percentage_threshold
            .map(|_| UInt32Value { value: 100 }),
        failure_percentage_minimum_hosts: number(config.failure_percentage_minimum_hosts),
        failure_percentage_request_volume: number(config.failure_percentage_request_volume),
        ..Default::default()
    }
}

/// What a cluster carries in metadata: adaptive concurrency (typed) and the latency
/// outlier detector.
fn cluster_metadata(service: &ServiceConfig) -> Option<Metadata> {
    let typed_filter_metadata: std::collections::HashMap<_, _> = service
        .adaptive_concurrency
        .map(|config| {
            (
                names::ADAPTIVE_CONCURRENCY_METADATA.to_string(),
                pack_any(adaptive_concurrency(config)),
            )
        })
        .into_iter()
        .collect();
    let filter_metadata: std::collections::HashMap<_, _> = service
        .outlier_detection
        .as_ref()
        .and_then(outlier_latency_metadata)
        .map(|fields| (names::OUTLIER_LATENCY_METADATA.to_string(), fields))
        .into_iter()
        .collect();
    let any = !typed_filter_metadata.is_empty() || !filter_metadata.is_empty();
    any.then_some(Metadata {
        typed_filter_metadata,
        filter_metadata,
    })
}

/// NIP's latency outlier detector as cluster metadata (Envoy has no field for it).
fn outlier_latency_metadata(config: &crate::config::OutlierDetectionConfig) -> Option<Struct> {
    let factor = config.latency_factor?;
    let number = |n: f64| Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let mut fields = BTreeMap::new();
    fields.insert("factor".to_string(), number(factor));
    if let Some(hosts) = config.latency_minimum_hosts {
        fields.insert("minimum_hosts".to_string(), number(f64::from(hosts)));
    }
    if let Some(volume) = config.latency_request_volume {
        fields.insert("request_volume".to_string(), number(f64::from(volume)));
    }
    Some(Struct {
        fields: fields.into_iter().collect(),
    })
}

/// The v4 adaptive concurrency as Envoy's filter config (unset fields stay unset: Envoy
/// defaults). It travels in the cluster's `typed_filter_metadata`: Envoy configures the
/// filter per listener, NIP per service, and clients that do not know the key ignore it.
fn adaptive_concurrency(
    config: crate::config::AdaptiveConcurrencyConfig,
) -> envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::AdaptiveConcurrency
{
    use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::{
        adaptive_concurrency::ConcurrencyControllerConfig, gradient_controller_config,
        AdaptiveConcurrency, GradientControllerConfig,
    };
    use envoy_types::pb::envoy::r#type::v3::{HttpStatus, Percent};
    let number = |n: Option<u32>| n.map(|value| UInt32Value { value });
    let time = |d: Option<crate::config::HumanDuration>| d.map(|d| pb_duration(d.into()));
    let percent = |p: Option<f64>| p.map(|value| Percent { value });
    AdaptiveConcurrency {
        concurrency_limit_exceeded_status: config.status.map(|code| HttpStatus {
            code: i32::from(code),
        }),
        concurrency_controller_config: Some(ConcurrencyControllerConfig::GradientControllerConfig(
            GradientControllerConfig {
                sample_aggregate_percentile: percent(config.percentile),
                concurrency_limit_params: Some(
                    gradient_controller_config::ConcurrencyLimitCalculationParams {
                        max_concurrency_limit: number(config.max_limit),
                        concurrency_update_interval: time(config.update_interval),
                        min_concurrency_limit: number(config.min_limit),
                    },
                ),
                min_rtt_calc_params: Some(
                    gradient_controller_config::MinimumRttCalculationParams {
                        interval: time(config.min_rtt_interval),
                        fixed_value: time(config.min_rtt),
                        request_count: number(config.min_rtt_requests),
                        jitter: percent(config.min_rtt_jitter),
                        min_concurrency: number(config.min_concurrency),
                        buffer: percent(config.buffer),
                    },
                ),
            },
        )),
        ..Default::default()
    }
}

/// Decay of `lb: latency` estimates when not configured (Finagle's and Linkerd's 10 s).
const DEFAULT_LATENCY_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint not measured yet (Linkerd's 30 ms).
const DEFAULT_LATENCY_RTT: Duration = Duration::from_millis(30);

fn cluster(name: &str, service: &ServiceConfig) -> Cluster {
    let mut cluster = balanced_cluster(name, service);
    if service.original_destination {
        // Each request's destination is the one its connection had: nothing to discover
        // or balance.
        cluster.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        ));
        cluster.eds_cluster_config = None;
        cluster.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
        cluster.lb_config = None;
        cluster.load_balancing_policy = None;
    }
    cluster
}

/// A service's cluster of its own endpoints (EDS), balanced by its policy.
fn balanced_cluster(name: &str, service: &ServiceConfig) -> Cluster {
    let lb = service.lb_policy();
    let lb_policy = match lb {
        LbPolicy::RoundRobin => cluster::LbPolicy::RoundRobin,
        LbPolicy::LeastRequest | LbPolicy::Latency => cluster::LbPolicy::LeastRequest,
        LbPolicy::Random => cluster::LbPolicy::Random,
        LbPolicy::RingHash => cluster::LbPolicy::RingHash,
    };
    let lb_config = (lb == LbPolicy::RingHash).then(|| {
        let ring = service.ring_hash.unwrap_or_default();
        cluster::LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
            minimum_ring_size: ring
                .minimum_ring_size
                .map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
            maximum_ring_size: ring
                .maximum_ring_size
                .map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
            hash_function: 0,
        })
    });
    let load_balancing_policy =
        (lb == LbPolicy::Latency).then(|| peak_ewma_policy(service.latency.unwrap_or_default()));
    let mut typed_extension_protocol_options = std::collections::HashMap::new();
    if service.protocol == UpstreamProtocol::Http2 {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                Http2ProtocolOptions::default(),
                            ),
                        ),
                    },
                ),
            ),
            ..Default::default()
        };
        typed_extension_protocol_options
            .insert(names::HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(options));
    }
    let health_checks = service
        .health_check
        .iter()
        .map(|hc| HealthCheck {
            timeout: Some(pb_duration(hc.timeout.into())),
            interval: Some(pb_duration(hc.interval.into())),
            unhealthy_threshold: Some(UInt32Value {
                value: hc.unhealthy_threshold,
            }),
            healthy_threshold: Some(UInt32Value {
                value: hc.healthy_threshold,
            }),
            health_checker: Some(health_check::HealthChecker::HttpHealthCheck(
                health_check::HttpHealthCheck {
                    path: hc.path.clone(),
                    host: hc.host.clone().unwrap_or_default(),
                    expected_statuses: hc
                        .expected_statuses
                        .iter()
                        .map(|s| Int64Range {
                            start: i64::from(*s),
                            end: i64::from(*s) + 1,
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .collect();
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(crate::resources::ads_config_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(pb_duration(
            service
                .connect_timeout
                .map(Into::into)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        )),
        lb_policy: lb_policy as i32,
        lb_config,
        load_balancing_policy,
        outlier_detection: service.outlier_detection.map(outlier_detection),
        common_lb_config: (!service.locality_weights.is_empty()).then(|| cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    cluster::common_lb_config::LocalityWeightedLbConfig::default(),
                ),
            ),
            ..Default::default()
        }),
        circuit_breakers: service.circuit_breakers.map(|b| {
            use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers, CircuitBreakers};
            CircuitBreakers {
                thresholds: vec![circuit_breakers::Thresholds {
                    max_requests: b.max_requests.map(|value| UInt32Value { value }),
                    max_retries: b.max_retries.map(|value| UInt32Value { value }),
                    max_connections: b.max_connections.map(|value| UInt32Value { value }),
                    max_pending_requests: b.max_pending_requests.map(|value| UInt32Value { value }),
                    retry_budget: b.retry_budget.map(|budget| {
                        circuit_breakers::thresholds::RetryBudget {
                            budget_percent: budget
                                .percent
                                .map(|value| envoy_types::pb::envoy::r#type::v3::Percent { value }),
                            min_retry_concurrency: budget
                                .min_retry_concurrency
                                .map(|value| UInt32Value { value }),
                            ..Default::default()
                        }
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }
        }),
        health_checks,
        typed_extension_protocol_options,
        metadata: cluster_metadata(service),
        transport_socket: service.tls.as_ref().map(upstream_tls),
        ..Default::default()
    }
}

/// The listener's TLS from certificate files (`api_gateway.tls` without `mesh`).
fn gateway_tls(gateway: &crate::config::GatewayConfig) -> Option<TransportSocket> {
    gateway.tls.enabled.then(|| {
        let file = |path: &Option<String>| DataSource {
            specifier: Some(data_source::Specifier::Filename(
                path.clone().unwrap_or_default(),
            )),
            ..Default::default()
        };
        let validation = gateway.tls.client_ca_file.as_ref().map(|ca| {
            common_tls_context::ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(file(&Some(ca.clone()))),
                    ..Default::default()
                },
            )
        });
        let tls = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: std::iter::once(TlsCertificate {
                    certificate_chain: Some(file(&gateway.tls.cert_file)),
                    private_key: Some(file(&gateway.tls.key_file)),
                    ..Default::default()
                })
                .chain(gateway.tls.certificates.iter().map(|pair| TlsCertificate {
                    certificate_chain: Some(file(&Some(pair.cert_file.clone()))),
                    private_key: Some(file(&Some(pair.key_file.clone()))),
                    ..Default::default()
                }))
                .collect(),
                alpn_protocols: vec!["h2".to_string(), "http/1.1".to_string()],
                validation_context_type: validation,
                ..Default::default()
            }),
            require_client_certificate: gateway
                .tls
                .require_client_certificate
                .then_some(BoolValue { value: true }),
            ..Default::default()
        };
        TransportSocket {
            name: names::TLS_TRANSPORT_SOCKET.to_string(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
        }
    })
}

/// `tls` of a service as Envoy's `UpstreamTlsContext`.
fn upstream_tls(tls: &crate::config::UpstreamTlsConfig) -> TransportSocket {
    let file = |path: &String| DataSource {
        specifier: Some(data_source::Specifier::Filename(path.clone())),
        ..Default::default()
    };
    if tls.mesh {
        return mesh_upstream_tls(tls);
    }
    let context = UpstreamTlsContext {
        sni: tls.sni.clone().unwrap_or_default(),
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: tls
                .cert_file
                .iter()
                .zip(&tls.key_file)
                .map(|(cert, key)| TlsCertificate {
                    certificate_chain: Some(file(cert)),
                    private_key: Some(file(key)),
                    ..Default::default()
                })
                .collect(),
            validation_context_type: (tls.ca_file.is_some()
                || !tls.match_typed_subject_alt_names.is_empty())
            .then(|| {
                common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: tls.ca_file.as_ref().map(file),
                        match_typed_subject_alt_names: tls
                            .match_typed_subject_alt_names
                            .iter()
                            .map(subject_alt_name_matcher)
                            .collect(),
                        ..Default::default()
                    },
                )
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: names::TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

/// Mesh mutual TLS to a service ([`crate::mesh::upstream_tls`]), narrowed to the
/// configured names, if any.
fn mesh_upstream_tls(tls: &crate::config::UpstreamTlsConfig) -> TransportSocket {
    let matchers = tls
        .match_typed_subject_alt_names
        .iter()
        .map(subject_alt_name_matcher)
        .collect();
    crate::mesh::upstream_tls(tls.sni.clone(), matchers)
}

/// One `match_typed_subject_alt_names` entry as Envoy's `SubjectAltNameMatcher`.
fn subject_alt_name_matcher(
    san: &crate::config::SubjectAltNameMatcherConfig,
) -> envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        string_matcher::MatchPattern, RegexMatcher, StringMatcher,
    };
    let m = &san.matcher;
    let pattern = if let Some(v) = &m.exact {
        MatchPattern::Exact(v.clone())
    } else if let Some(v) = &m.prefix {
        MatchPattern::Prefix(v.clone())
    } else if let Some(v) = &m.suffix {
        MatchPattern::Suffix(v.clone())
    } else if let Some(v) = &m.contains {
        MatchPattern::Contains(v.clone())
    } else {
        MatchPattern::SafeRegex(RegexMatcher {
            regex: m.regex.clone().unwrap_or_default(),
            ..Default::default()
        })
    };
    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher {
        san_type: match san.san_type {
            crate::config::SanTypeConfig::Uri => SanType::Uri,
            crate::config::SanTypeConfig::Dns => SanType::Dns,
        } as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(pattern),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The configured weight of a locality (`region/zone/sub_zone` first, then `region/zone`,
/// then `region`), 1 otherwise.
fn locality_weight(service: &ServiceConfig, locality: &Locality) -> u32 {
    service
        .locality_weights
        .get(&format!(
            "{}/{}/{}",
            locality.region, locality.zone, locality.sub_zone
        ))
        .or_else(|| {
            service
                .locality_weights
                .get(&format!("{}/{}", locality.region, locality.zone))
        })
        .or_else(|| service.locality_weights.get(&locality.region))
        .copied()
        .unwrap_or(1)
}

fn load_assignment(name: &str, service: &ServiceConfig) -> ClusterLoadAssignment {
    // Group endpoints by locality and priority, keeping the order in which they first appear.
    let mut localities: Vec<((Locality, u32), Vec<LbEndpoint>)> = Vec::new();
    for endpoint in &service.endpoints {
        let locality = Locality {
            region: endpoint.region.clone().unwrap_or_default(),
            zone: endpoint.zone.clone().unwrap_or_default(),
            sub_zone: endpoint.sub_zone.clone().unwrap_or_default(),
        };
        let (host, port) = parse_endpoint_address(&endpoint.address)
            .unwrap_or_else(|_| (endpoint.address.clone(), 0));
        let lb_endpoint = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(&host, port)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value {
                value: endpoint.weight,
            }),
            ..Default::default()
        };
        let key = (locality, endpoint.priority);
        match localities.iter_mut().find(|(k, _)| *k == key) {
            Some((_, endpoints)) => endpoints.push(lb_endpoint),
            None => localities.push((key, vec![lb_endpoint])),
        }
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: localities
            .into_iter()
            .map(|((locality, priority), lb_endpoints)| LocalityLbEndpoints {
                load_balancing_weight: Some(UInt32Value {
                    value: locality_weight(service, &locality),
                }),
                locality: Some(locality),
                lb_endpoints,
                priority,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

mod auth;
mod sidecar;
mod tenants;
pub use tenants::{TENANT_DESCRIPTOR_KEY, TENANT_RATE_LIMIT_FILTER};

#[cfg(test)]
mod tests;
