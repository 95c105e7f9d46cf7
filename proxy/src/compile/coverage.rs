//! No silent drops: every field a received xDS resource sets must be one NIP implements.
//!
//! A control plane that is not NIP may set any of Envoy's hundreds of fields; a proxy that
//! ignored the ones it does not implement would run something other than what was asked.
//! Each encoded resource is walked field by field with the static schema `nip-xds`
//! generates from the `.proto` files in `envoy-types` ([`nip_xds::schema`]): a set field of a message type in [`IMPLEMENTED`] that
//! is not in its list is refused by its path (`virtual_hosts[0].routes[2].route.cors`),
//! which the compiler turns into a NACK. Types not in the table (durations, structs,
//! matchers whose every form the compiler decodes or refuses itself) are taken whole;
//! `Any` fields are opened when their type is known. `Metadata` is taken whole on purpose:
//! as in Envoy it is data for whoever reads its namespace, and a namespace nobody reads
//! changes nothing.

use prost::{Message, Name};

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
            "use_original_dst",
            "bind_to_port",
            "additional_addresses",
            "listener_filters",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "default_filter_chain",
            // Informational in Envoy too (stats and tracing); Istio sets it.
            "traffic_direction",
        ],
    ),
    (
        "envoy.config.listener.v3.FilterChain",
        &["filters", "transport_socket", "name", "filter_chain_match"],
    ),
    (
        "envoy.config.listener.v3.FilterChainMatch",
        &[
            "destination_port",
            "prefix_ranges",
            "direct_source_prefix_ranges",
            "source_type",
            "source_prefix_ranges",
            "source_ports",
            "server_names",
            "transport_protocol",
            "application_protocols",
        ],
    ),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    ("envoy.config.listener.v3.AdditionalAddress", &["address"]),
    (
        "envoy.config.listener.v3.ListenerFilter",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        &[],
    ),
    (
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        &[],
    ),
    (
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
        &[],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        &[
            "stat_prefix",
            "cluster",
            "idle_timeout",
            "max_connect_attempts",
            "max_downstream_connection_duration",
            "access_log",
        ],
    ),
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
            "upgrade_configs",
            "tracing",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing",
        &[
            "client_sampling",
            "random_sampling",
            "overall_sampling",
            "verbose",
            "max_path_tag_length",
            "custom_tags",
            "provider",
            "spawn_upstream_span",
        ],
    ),
    ("envoy.config.trace.v3.Tracing.Http", &["name", "typed_config"]),
    (
        "envoy.config.trace.v3.OpenTelemetryConfig",
        &[
            "grpc_service",
            "http_service",
            "service_name",
            "resource_detectors",
            "sampler",
            "exporter",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &["upgrade_type", "enabled"],
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
    (
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        &[
            "stat_prefix",
            "token_bucket",
            "status",
            "enable_x_ratelimit_headers",
            "descriptors",
        ],
    ),
    (
        "envoy.type.v3.TokenBucket",
        &["max_tokens", "tokens_per_fill", "fill_interval"],
    ),
    ("envoy.type.v3.HttpStatus", &["code"]),
    (
        "envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor",
        &["entries", "token_bucket", "shadow_mode"],
    ),
    ("envoy.config.route.v3.RateLimit", &["actions"]),
    (
        "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        &[
            "domain",
            "stage",
            "request_type",
            "timeout",
            "failure_mode_deny",
            "rate_limit_service",
            "enable_x_ratelimit_headers",
        ],
    ),
    (
        "envoy.config.ratelimit.v3.RateLimitServiceConfig",
        &["grpc_service", "transport_api_version"],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        &[
            "providers",
            "rules",
            "requirement_map",
            "bypass_cors_preflight",
            "stat_prefix",
        ],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider",
        &[
            "issuer",
            "audiences",
            "subjects",
            "require_expiration",
            "max_lifetime",
            "remote_jwks",
            "local_jwks",
            "forward",
            "from_headers",
            "from_params",
            "from_cookies",
            "forward_payload_header",
            "pad_forward_payload_header",
            "payload_in_metadata",
            "clock_skew_seconds",
            "claim_to_headers",
            "jwt_cache_config",
        ],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtCacheConfig",
        &["jwt_cache_size"],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks",
        &["http_uri", "cache_duration", "async_fetch"],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwksAsyncFetch",
        // NIP always fetches ahead of requests (fast_listener is how it always behaves).
        &["fast_listener", "failed_refetch_duration"],
    ),
    ("envoy.config.core.v3.HttpUri", &["uri", "cluster", "timeout"]),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader",
        &["header_name", "claim_name", "claim_path"],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.RequirementRule",
        &["match", "requires", "requirement_name"],
    ),
    (
        "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
        &["disabled", "requirement_name"],
    ),
    (
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        &[
            "rules",
            "rules_stat_prefix",
            "shadow_rules",
            "shadow_rules_stat_prefix",
        ],
    ),
    ("envoy.extensions.filters.http.rbac.v3.RBACPerRoute", &["rbac"]),
    ("envoy.config.rbac.v3.RBAC", &["action", "policies"]),
    (
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        &[
            "grpc_service",
            "http_service",
            "failure_mode_allow",
            "failure_mode_allow_header_add",
            "status_on_error",
            "include_peer_certificate",
            "allowed_headers",
            "stat_prefix",
            "transport_api_version",
        ],
    ),
    (
        "envoy.extensions.filters.http.ext_authz.v3.HttpService",
        &[
            "server_uri",
            "path_prefix",
            "authorization_request",
            "authorization_response",
        ],
    ),
    (
        "envoy.extensions.filters.http.ext_authz.v3.AuthorizationRequest",
        &["allowed_headers", "headers_to_add"],
    ),
    (
        "envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse",
        &[
            "allowed_upstream_headers",
            "allowed_upstream_headers_to_append",
            "allowed_client_headers",
            "allowed_client_headers_on_success",
        ],
    ),
    (
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        &["disabled", "check_settings"],
    ),
    (
        "envoy.extensions.filters.http.ext_authz.v3.CheckSettings",
        &["context_extensions", "disable_request_body_buffering"],
    ),
    (
        "envoy.config.core.v3.GrpcService",
        // initial_metadata: ext_proc sends it; ext_authz, the rate limit service and the
        // tracing collector refuse it themselves.
        &["envoy_grpc", "timeout", "initial_metadata"],
    ),
    (
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &["cluster_name", "authority"],
    ),
    ("envoy.config.rbac.v3.Policy", &["permissions", "principals"]),
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
        "envoy.config.core.v3.SubstitutionFormatString",
        &["text_format", "json_format", "text_format_source"],
    ),
    // Which source a consumer accepts (a file for certificates and modules, inline text for
    // bodies and formats) is the consumer's to check.
    (
        "envoy.config.core.v3.DataSource",
        &[
            "filename",
            "inline_bytes",
            "inline_string",
            "environment_variable",
        ],
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
        &["common_tls_context", "require_client_certificate"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            "tls_certificates",
            "alpn_protocols",
            "validation_context",
            "tls_certificate_sds_secret_configs",
            "validation_context_sds_secret_config",
            "combined_validation_context",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        &["name", "sds_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &["default_validation_context", "validation_context_sds_secret_config"],
    ),
    // Secrets (SDS).
    (
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        &["name", "tls_certificate", "validation_context"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &["trusted_ca", "match_typed_subject_alt_names"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        &["san_type", "matcher"],
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
        &[
            "prefix",
            "path",
            "safe_regex",
            "connect_matcher",
            "headers",
            "case_sensitive",
        ],
    ),
    (
        "envoy.config.route.v3.HeaderMatcher",
        &["name", "present_match", "string_match", "invert_match"],
    ),
    (
        "envoy.type.matcher.v3.StringMatcher",
        &[
            "exact",
            "prefix",
            "suffix",
            "contains",
            "safe_regex",
            "ignore_case",
        ],
    ),
    // `google_re2` only names the engine (RE2 semantics, which NIP's regexes follow).
    (
        "envoy.type.matcher.v3.RegexMatcher",
        &["regex", "google_re2"],
    ),
    (
        "envoy.config.core.v3.Locality",
        &["region", "zone", "sub_zone"],
    ),
    // NIP follows one control plane over ADS: any other config source is refused.
    (
        "envoy.config.core.v3.ConfigSource",
        &["ads", "resource_api_version"],
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
            "upgrade_configs",
            "rate_limits",
        ],
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        &["upgrade_type", "enabled", "connect_config"],
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig",
        &[],
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
            "transport_socket",
            "transport_socket_matches",
        ],
    ),
    (
        "envoy.config.cluster.v3.Cluster.TransportSocketMatch",
        &["name", "match", "transport_socket"],
    ),
    (
        "envoy.config.core.v3.TransportSocket",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &["common_tls_context", "sni"],
    ),
    // The upstream protocol (`typed_extension_protocol_options`): HTTP/1 or HTTP/2 chosen
    // explicitly, with no protocol settings of either.
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &["explicit_http_config"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    ("envoy.config.core.v3.Http1ProtocolOptions", &[]),
    ("envoy.config.core.v3.Http2ProtocolOptions", &[]),
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
            "metadata",
        ],
    ),
    (
        "envoy.config.endpoint.v3.LbEndpoint",
        &["endpoint", "load_balancing_weight", "metadata"],
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

/// The path of the first field `message` sets that NIP does not implement, if any. The
/// encoded message is walked field by field with [`nip_xds::schema`] (no descriptor pool
/// is decoded, so checking a config costs no resident memory).
pub fn first_unimplemented<M: Message + Name>(message: &M) -> Option<String> {
    let bytes = message.encode_to_vec();
    walk(&M::full_name(), &bytes, &mut String::new())
}

/// One field of an encoded message: its number, and its bytes when length-delimited.
struct WireField<'a> {
    number: i32,
    payload: Option<&'a [u8]>,
}

/// The fields of an encoded message in order; `None` for bytes that are not protobuf.
fn wire_fields(mut bytes: &[u8]) -> Option<Vec<WireField<'_>>> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let (number, wire_type) = decode_key(&mut bytes).ok()?;
        let payload = match wire_type {
            WireType::Varint => {
                decode_varint(&mut bytes).ok()?;
                None
            }
            WireType::SixtyFourBit => {
                bytes = bytes.get(8..)?;
                None
            }
            WireType::ThirtyTwoBit => {
                bytes = bytes.get(4..)?;
                None
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut bytes).ok()?).ok()?;
                let (payload, rest) = (bytes.get(..len)?, bytes.get(len..)?);
                bytes = rest;
                Some(payload)
            }
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        fields.push(WireField {
            number: i32::try_from(number).ok()?,
            payload,
        });
    }
    Some(fields)
}

fn walk(type_name: &str, bytes: &[u8], path: &mut String) -> Option<String> {
    if type_name == "google.protobuf.Any" {
        return walk_any(bytes, path);
    }
    let schema = nip_xds::schema::message(type_name)?;
    let allowed = implemented(type_name);
    let mut seen: Vec<(i32, usize)> = Vec::new();
    for field in wire_fields(bytes)? {
        let len = path.len();
        let Some(known) = schema.field(field.number) else {
            // A field this version of the protos does not even know: refused by number.
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&format!("#{}", field.number));
            return Some(std::mem::take(path));
        };
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(known.name);
        if allowed.is_some_and(|fields| !fields.contains(&known.name)) {
            return Some(std::mem::take(path));
        }
        if known.repeated {
            let index = match seen.iter_mut().find(|(n, _)| *n == field.number) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    seen.push((field.number, 1));
                    0
                }
            };
            if !nip_xds::schema::message(known.message).is_some_and(|m| m.map_entry) {
                path.push_str(&format!("[{index}]"));
            }
        }
        if let (Some(payload), false) = (field.payload, known.message.is_empty()) {
            let found = match nip_xds::schema::message(known.message) {
                Some(entry) if entry.map_entry => walk_map_entry(entry, payload, path),
                _ => walk(known.message, payload, path),
            };
            if found.is_some() {
                return found;
            }
        }
        path.truncate(len);
    }
    None
}

/// A map entry: `name["key"]`, then its value.
fn walk_map_entry(
    entry: &'static nip_xds::schema::MessageSchema,
    bytes: &[u8],
    path: &mut String,
) -> Option<String> {
    let fields = wire_fields(bytes)?;
    let key = fields
        .iter()
        .find(|f| f.number == 1)
        .and_then(|f| f.payload)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    path.push_str(&format!("[{key:?}]"));
    let value_type = entry.field(2)?.message;
    let value = fields.iter().find(|f| f.number == 2)?.payload?;
    if value_type.is_empty() {
        return None;
    }
    walk(value_type, value, path)
}

/// An `Any` is opened when its type is known (the typed configs of listeners, filters and
/// clusters); an unknown type is for the compiler to refuse.
fn walk_any(bytes: &[u8], path: &mut String) -> Option<String> {
    let fields = wire_fields(bytes)?;
    let type_url = fields.iter().find(|f| f.number == 1)?.payload?;
    let value = fields
        .iter()
        .find(|f| f.number == 2)
        .and_then(|f| f.payload)
        .unwrap_or_default();
    let type_url = std::str::from_utf8(type_url).ok()?;
    let name = type_url.rsplit('/').next()?;
    nip_xds::schema::message(name)?;
    walk(name, value, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::{
        route, CorsPolicy, HeaderMatcher, Route, RouteAction, RouteConfiguration, RouteMatch,
        VirtualHost,
    };

    #[test]
    fn every_implemented_field_is_a_field_of_its_message() {
        for (name, fields) in IMPLEMENTED {
            let message = nip_xds::schema::message(name)
                .unwrap_or_else(|| panic!("{name} is not in the schema"));
            for field in *fields {
                assert!(
                    message.fields.iter().any(|f| f.name == *field),
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
        // Inside a match too: a header matcher's option NIP would otherwise ignore.
        let mut treat_missing = fine.clone();
        treat_missing.virtual_hosts[0].routes[0].r#match = Some(RouteMatch {
            headers: vec![HeaderMatcher {
                name: "x-a".into(),
                treat_missing_header_as_empty: true,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(
            first_unimplemented(&treat_missing).as_deref(),
            Some("virtual_hosts[0].routes[0].match.headers[0].treat_missing_header_as_empty")
        );
    }

    #[test]
    fn formats_data_sources_and_upstream_protocol_settings_are_walked_field_by_field() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::config::core::v3::{
            data_source, DataSource, Http2ProtocolOptions, SubstitutionFormatString,
        };
        use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
            stdout_access_log, StdoutAccessLog,
        };
        use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
            http_protocol_options, HttpProtocolOptions,
        };
        use envoy_types::pb::google::protobuf::{Any, UInt32Value};
        let log = |format: SubstitutionFormatString| StdoutAccessLog {
            access_log_format: Some(stdout_access_log::AccessLogFormat::LogFormat(format)),
        };
        let text = SubstitutionFormatString {
            format: Some(
                envoy_types::pb::envoy::config::core::v3::substitution_format_string::Format::TextFormatSource(
                    DataSource {
                        specifier: Some(data_source::Specifier::InlineString("x".into())),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        };
        assert_eq!(first_unimplemented(&log(text.clone())), None);
        let omit = SubstitutionFormatString {
            omit_empty_values: true,
            ..text.clone()
        };
        assert_eq!(
            first_unimplemented(&log(omit)).as_deref(),
            Some("log_format.omit_empty_values")
        );

        let cluster = |config: http_protocol_options::explicit_http_config::ProtocolConfig| {
            let options = HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(config),
                        },
                    ),
                ),
                ..Default::default()
            };
            Cluster {
                name: "c".into(),
                typed_extension_protocol_options: [(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                    Any {
                        type_url: format!(
                            "type.googleapis.com/{}",
                            HttpProtocolOptions::full_name()
                        ),
                        value: options.encode_to_vec(),
                    },
                )]
                .into(),
                ..Default::default()
            }
        };
        use http_protocol_options::explicit_http_config::ProtocolConfig;
        assert_eq!(
            first_unimplemented(&cluster(ProtocolConfig::Http2ProtocolOptions(
                Http2ProtocolOptions::default()
            ))),
            None
        );
        assert_eq!(
            first_unimplemented(&cluster(ProtocolConfig::Http2ProtocolOptions(
                Http2ProtocolOptions {
                    max_concurrent_streams: Some(UInt32Value { value: 10 }),
                    ..Default::default()
                }
            )))
            .as_deref(),
            Some(
                "typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"]\
                 .explicit_http_config.http2_protocol_options.max_concurrent_streams"
            )
        );
    }
}
