//! No silent drops: every field a received xDS resource sets must be one NIP implements.
//!
//! A control plane that is not NIP may set any of Envoy's hundreds of fields; a proxy that
//! ignored the ones it does not implement would run something other than what was asked.
//! Each resource is walked by reflection (the descriptors `nip-xds` compiles from the
//! `.proto` files in `envoy-types`): a set field of a message type in [`IMPLEMENTED`] that
//! is not in its list is refused by its path (`virtual_hosts[0].routes[2].route.cors`),
//! which the compiler turns into a NACK. Types not in the table (durations, structs,
//! matchers whose every form the compiler decodes or refuses itself) are taken whole;
//! `Any` fields are opened when their type is known.

use prost::{Message, Name};
use prost_reflect::{DynamicMessage, MapKey, ReflectMessage, Value};

/// The fields NIP implements, by message type (Envoy's full names).
pub const IMPLEMENTED: &[(&str, &[&str])] = &[
    // Listener side.
    (
        "envoy.config.listener.v3.Listener",
        &[
            "name",
            "address",
            "filter_chains",
            "metadata",
            "stat_prefix",
        ],
    ),
    (
        "envoy.config.listener.v3.FilterChain",
        &["filters", "transport_socket", "name"],
    ),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &[
            "codec_type",
            "stat_prefix",
            "rds",
            "route_config",
            "http_filters",
            "access_log",
            "common_http_protocol_options",
            "request_headers_timeout",
            "stream_idle_timeout",
            "max_request_headers_kb",
            "generate_request_id",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &["config_source", "route_config_name"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &["name", "typed_config", "disabled"],
    ),
    (
        "envoy.config.core.v3.HttpProtocolOptions",
        &[
            "idle_timeout",
            "max_connection_duration",
            "max_headers_count",
            "max_requests_per_connection",
            "max_stream_duration",
            "headers_with_underscores_action",
        ],
    ),
    ("envoy.extensions.filters.http.router.v3.Router", &[]),
    ("envoy.extensions.filters.http.wasm.v3.Wasm", &["config"]),
    (
        "envoy.extensions.wasm.v3.PluginConfig",
        &[
            "name",
            "root_id",
            "vm_config",
            "configuration",
            "fail_open",
            "failure_policy",
        ],
    ),
    (
        "envoy.extensions.wasm.v3.VmConfig",
        &["vm_id", "runtime", "code", "configuration"],
    ),
    (
        "envoy.config.accesslog.v3.AccessLog",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        &["path", "log_format"],
    ),
    (
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        &["log_format"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &["common_tls_context"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &["tls_certificates", "alpn_protocols"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &["certificate_chain", "private_key"],
    ),
    // Routes.
    (
        "envoy.config.route.v3.RouteConfiguration",
        &[
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "max_direct_response_body_size_bytes",
        ],
    ),
    (
        "envoy.config.route.v3.VirtualHost",
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.route.v3.Route",
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "metadata",
            "typed_per_filter_config",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.route.v3.RouteMatch",
        &["prefix", "path", "safe_regex", "headers", "case_sensitive"],
    ),
    (
        "envoy.config.route.v3.RouteAction",
        &[
            "cluster",
            "weighted_clusters",
            "timeout",
            "idle_timeout",
            "retry_policy",
            "hash_policy",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "auto_host_rewrite",
        ],
    ),
    ("envoy.config.route.v3.WeightedCluster", &["clusters"]),
    (
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        &["name", "weight"],
    ),
    (
        "envoy.config.route.v3.RetryPolicy",
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retriable_status_codes",
            "retry_back_off",
        ],
    ),
    (
        "envoy.config.route.v3.RetryPolicy.RetryBackOff",
        &["base_interval", "max_interval"],
    ),
    (
        "envoy.config.route.v3.RedirectAction",
        &[
            "https_redirect",
            "scheme_redirect",
            "host_redirect",
            "port_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
            "response_code",
            "strip_query",
        ],
    ),
    (
        "envoy.config.route.v3.DirectResponseAction",
        &["status", "body"],
    ),
    (
        "envoy.config.route.v3.FilterConfig",
        &["config", "is_optional", "disabled"],
    ),
    (
        "envoy.config.core.v3.HeaderValueOption",
        &["header", "append", "append_action", "keep_empty_value"],
    ),
    (
        "envoy.config.core.v3.HeaderValue",
        &["key", "value", "raw_value"],
    ),
    // Clusters and endpoints.
    (
        "envoy.config.cluster.v3.Cluster",
        &[
            "name",
            "type",
            "eds_cluster_config",
            "connect_timeout",
            "lb_policy",
            "load_balancing_policy",
            "load_assignment",
            "health_checks",
            "circuit_breakers",
            "outlier_detection",
            "typed_extension_protocol_options",
            "http2_protocol_options",
            "ring_hash_lb_config",
            "common_lb_config",
            "metadata",
        ],
    ),
    (
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
        &["eds_config", "service_name"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.CommonLbConfig",
        &["locality_weighted_lb_config"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig",
        &["minimum_ring_size", "maximum_ring_size", "hash_function"],
    ),
    ("envoy.config.cluster.v3.CircuitBreakers", &["thresholds"]),
    (
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
        &[
            "priority",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
            "retry_budget",
        ],
    ),
    (
        "envoy.config.cluster.v3.OutlierDetection",
        &[
            "consecutive_5xx",
            "consecutive_gateway_failure",
            "interval",
            "base_ejection_time",
            "max_ejection_percent",
            "max_ejection_time",
            "enforcing_consecutive_5xx",
            "enforcing_consecutive_gateway_failure",
            "enforcing_success_rate",
            "success_rate_minimum_hosts",
            "success_rate_request_volume",
            "success_rate_stdev_factor",
            "failure_percentage_threshold",
            "enforcing_failure_percentage",
            "failure_percentage_minimum_hosts",
            "failure_percentage_request_volume",
        ],
    ),
    (
        "envoy.config.core.v3.HealthCheck",
        &[
            "timeout",
            "interval",
            "unhealthy_threshold",
            "healthy_threshold",
            "http_health_check",
        ],
    ),
    (
        "envoy.config.core.v3.HealthCheck.HttpHealthCheck",
        &["host", "path", "expected_statuses"],
    ),
    (
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &["cluster_name", "endpoints"],
    ),
    (
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &[
            "locality",
            "lb_endpoints",
            "load_balancing_weight",
            "priority",
        ],
    ),
    (
        "envoy.config.endpoint.v3.LbEndpoint",
        &["endpoint", "load_balancing_weight"],
    ),
    (
        "envoy.config.endpoint.v3.Endpoint",
        &["address", "hostname"],
    ),
    ("envoy.config.core.v3.Address", &["socket_address"]),
    (
        "envoy.config.core.v3.SocketAddress",
        &["address", "port_value", "protocol"],
    ),
];

fn implemented(full_name: &str) -> Option<&'static [&'static str]> {
    IMPLEMENTED
        .iter()
        .find(|(name, _)| *name == full_name)
        .map(|(_, fields)| *fields)
}

/// The path of the first field `message` sets that NIP does not implement, if any (`None`
/// also when the descriptors are missing, which `xds_descriptors_are_compiled_in` keeps
/// from happening unnoticed).
pub fn first_unimplemented<M: Message + Name>(message: &M) -> Option<String> {
    let pool = nip_xds::json::descriptor_pool()?;
    let descriptor = pool.get_message_by_name(&M::full_name())?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).ok()?;
    let mut path = String::new();
    walk(&dynamic, &mut path)
}

fn walk(message: &DynamicMessage, path: &mut String) -> Option<String> {
    let descriptor = message.descriptor();
    let allowed = implemented(descriptor.full_name());
    if descriptor.full_name() == "google.protobuf.Any" {
        return walk_any(message, path);
    }
    for (field, value) in message.fields() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field.name());
        if allowed.is_some_and(|fields| !fields.contains(&field.name())) {
            return Some(std::mem::take(path));
        }
        if let Some(found) = walk_value(value, path) {
            return Some(found);
        }
        path.truncate(len);
    }
    None
}

fn walk_value(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::Message(inner) => walk(inner, path),
        Value::List(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = walk_value(item, path);
            path.truncate(len);
            found
        }),
        Value::Map(entries) => entries.iter().find_map(|(key, item)| {
            let len = path.len();
            match key {
                MapKey::String(key) => path.push_str(&format!("[{key:?}]")),
                other => path.push_str(&format!("[{other:?}]")),
            }
            let found = walk_value(item, path);
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// An `Any` is opened when its type is known (the typed configs of listeners, filters and
/// clusters); an unknown type is for the compiler to refuse.
fn walk_any(any: &DynamicMessage, path: &mut String) -> Option<String> {
    let type_url = any.get_field_by_name("type_url")?;
    let bytes = any.get_field_by_name("value")?;
    let (Value::String(type_url), Value::Bytes(bytes)) = (type_url.as_ref(), bytes.as_ref()) else {
        return None;
    };
    let name = type_url.rsplit('/').next()?;
    let descriptor = nip_xds::json::descriptor_pool()?.get_message_by_name(name)?;
    let inner = DynamicMessage::decode(descriptor, bytes.as_ref()).ok()?;
    walk(&inner, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::{
        route, CorsPolicy, Route, RouteAction, RouteConfiguration, VirtualHost,
    };

    #[test]
    fn xds_descriptors_are_compiled_in() {
        let pool = nip_xds::json::descriptor_pool().expect("descriptors");
        for (name, fields) in IMPLEMENTED {
            let message = pool
                .get_message_by_name(name)
                .unwrap_or_else(|| panic!("{name} is not among the descriptors"));
            for field in *fields {
                assert!(
                    message.get_field_by_name(field).is_some(),
                    "{name} has no field {field}"
                );
            }
        }
    }

    #[test]
    fn a_set_field_nip_does_not_implement_is_named_by_its_path() {
        #[allow(deprecated)]
        let routes = RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    action: Some(route::Action::Route(RouteAction {
                        cors: Some(CorsPolicy::default()),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            first_unimplemented(&routes).as_deref(),
            Some("virtual_hosts[0].routes[0].route.cors")
        );
        let mut fine = routes.clone();
        fine.virtual_hosts[0].routes[0].action = Some(route::Action::Route(RouteAction {
            prefix_rewrite: "/x".into(),
            ..Default::default()
        }));
        assert_eq!(first_unimplemented(&fine), None);
    }
}
