//! Rules a parsed config must follow before it is translated. Each rule reports the field
//! path it is about; all problems are collected so a user fixes them in one go.

use super::{
    path_text_problem, redirect_path_problem, substitution_problem, ByteSize, Config, FieldError,
    HeaderMatchConfig, HumanDuration, LbPolicy, PluginLimitsConfig, PluginSource, RouteConfig,
    ServiceConfig,
};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

/// Retry conditions a route may name (Envoy's `retry_on` spelling).
pub const RETRY_CONDITIONS: &[&str] = &[
    "connect-failure",
    "5xx",
    "gateway-error",
    "reset",
    "retriable-status-codes",
];

/// The most retries a route may ask for; more only multiplies load on a failing upstream.
pub const MAX_RETRIES: u32 = 10;

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Client limits of the listener: the ranges Envoy accepts.
fn validate_client_limits(config: &Config, errors: &mut Errors) {
    let gateway = &config.api_gateway;
    if let Some(kb) = gateway.max_request_headers_kb {
        if kb == 0 || kb > super::MAX_REQUEST_HEADERS_KB_CEILING {
            errors.add(
                "api_gateway.max_request_headers_kb",
                format!(
                    "{kb} is outside 1–{}",
                    super::MAX_REQUEST_HEADERS_KB_CEILING
                ),
            );
        }
    }
    if gateway.max_headers_count == Some(0) {
        errors.add("api_gateway.max_headers_count", "must be at least 1");
    }
    if let Some(n) = gateway.max_active_downstream_connections {
        if n == 0 || n > 1_000_000_000 {
            errors.add(
                "api_gateway.max_active_downstream_connections",
                format!("{n} is outside 1–1000000000"),
            );
        }
    }
}

/// The sidecar short form's rules.
fn validate_sidecar(config: &Config, errors: &mut Errors) {
    let Some(sidecar) = &config.sidecar else {
        for (name, service) in &config.services {
            if !service.addresses.is_empty() {
                errors.add(
                    format!("services.{name}.addresses"),
                    "only a sidecar takes connections to a service's addresses (`sidecar:` is not set)",
                );
            }
        }
        return;
    };
    for (field, port) in [
        ("outbound_port", sidecar.outbound_port),
        ("inbound_port", sidecar.inbound_port),
    ] {
        if port == 0 {
            errors.add(format!("sidecar.{field}"), "must be a port (1–65535)");
        }
        if parse_listen_address(&config.admin.address).is_ok_and(|a| a.port() == port) {
            errors.add(
                format!("sidecar.{field}"),
                format!("port {port} is already used by admin.address"),
            );
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for (name, service) in &config.services {
        for address in &service.addresses {
            if let Some(other) = seen.insert(address.clone(), name.clone()) {
                errors.add(
                    format!("services.{name}.addresses"),
                    format!("{address} is also services.{other}'s"),
                );
            }
        }
    }
    if let Ok(gateway) = parse_listen_address(&config.api_gateway.address) {
        for (field, port) in [
            ("outbound_port", sidecar.outbound_port),
            ("inbound_port", sidecar.inbound_port),
        ] {
            if gateway.port() == port {
                errors.add(
                    format!("sidecar.{field}"),
                    format!("port {port} is api_gateway.address's (the edge proxies' listener)"),
                );
            }
        }
    }
    if sidecar.outbound_port == sidecar.inbound_port {
        errors.add(
            "sidecar.inbound_port",
            "must differ from sidecar.outbound_port",
        );
    }
    let timeout = sidecar.protocol_detection_timeout.0;
    if timeout.is_zero() || timeout > std::time::Duration::from_secs(60) {
        errors.add(
            "sidecar.protocol_detection_timeout",
            "must be more than 0s and at most 60s",
        );
    }
    if config.api_gateway.tls.enabled || config.api_gateway.tls.mesh {
        errors.add(
            "api_gateway.tls",
            "a sidecar terminates no TLS of its own (an application's TLS passes through it by SNI; `sidecar.mesh` takes mesh mutual TLS)",
        );
    }
    if config
        .services
        .contains_key(crate::resources::SIDECAR_PASSTHROUGH)
    {
        errors.add(
            format!("services.{}", crate::resources::SIDECAR_PASSTHROUGH),
            "is the sidecar's own cluster for traffic going where it was going",
        );
    }
}

/// Checks every rule and returns all violations (empty when the config is good).
pub fn validate(config: &Config) -> Vec<FieldError> {
    let mut errors = Errors(Vec::new());
    for (path, message) in super::auth_problems(config) {
        errors.add(path, message);
    }
    if let Some(service) = &config.rate_limit_service {
        if let Err(e) = parse_endpoint_address(&service.address) {
            errors.add("rate_limit_service.address", e);
        }
        if service.timeout.is_some_and(|t| t.0.is_zero()) {
            errors.add("rate_limit_service.timeout", "must be more than 0");
        }
    }
    if let Some(tracing) = &config.tracing {
        if let Err(e) = parse_endpoint_address(&tracing.address) {
            errors.add("tracing.address", e);
        }
        if tracing
            .random_sampling
            .is_some_and(|p| !(0.0..=100.0).contains(&p))
        {
            errors.add("tracing.random_sampling", "must be a percentage, 0–100");
        }
        if tracing.timeout.is_some_and(|t| t.0.is_zero()) {
            errors.add("tracing.timeout", "must be more than 0");
        }
        match (&tracing.path, tracing.protocol) {
            (Some(_), crate::config::TracingProtocol::Grpc) => errors.add(
                "tracing.path",
                "is for protocol: http (OTLP/gRPC has no path)",
            ),
            (Some(path), _)
                if !path.starts_with('/') || http::Uri::try_from(path.as_str()).is_err() =>
            {
                errors.add("tracing.path", "must be a path starting with /")
            }
            _ => {}
        }
    }
    if let Err(e) = parse_listen_address(&config.api_gateway.address) {
        errors.add("api_gateway.address", e);
    }
    if let Err(e) = parse_listen_address(&config.admin.address) {
        errors.add("admin.address", e);
    }
    if let (Ok(a), Ok(b)) = (
        parse_listen_address(&config.api_gateway.address),
        parse_listen_address(&config.admin.address),
    ) {
        if a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || a.ip().is_unspecified()) {
            errors.add(
                "admin.address",
                format!("port {} is already used by api_gateway.address", a.port()),
            );
        }
    }
    validate_tls(config, &mut errors);
    validate_client_limits(config, &mut errors);
    validate_sidecar(config, &mut errors);
    if let Some(id) = &config.node.id {
        if id.trim().is_empty() {
            errors.add("node.id", "must not be empty");
        }
    }
    let log = &config.api_gateway.access_log;
    if log.enabled && log.path.trim().is_empty() {
        errors.add(
            "api_gateway.access_log.path",
            "must be `stdout` or a file path",
        );
    }
    for (name, service) in &config.services {
        validate_service(name, service, &mut errors);
    }
    let mut route_names = HashSet::new();
    for (index, route) in config.routes.iter().enumerate() {
        let path = format!("routes[{index}]");
        if let Some(name) = &route.name {
            if !valid_name(name) {
                errors.add(
                    format!("{path}.name"),
                    format!("{name:?} may only hold letters, digits, '-', '_' and '.'"),
                );
            }
        }
        let name = route_name(route, index);
        if !route_names.insert(name.clone()) {
            errors.add(
                format!("{path}.name"),
                format!("route name {name:?} is used twice"),
            );
        }
        validate_route(&path, route, config, &mut errors);
    }
    for (name, plugin) in &config.plugins {
        if let Some(source) = &plugin.source {
            validate_plugin_source(&format!("plugins.{name}.source"), source, &mut errors);
        }
        validate_plugin_limits(
            &format!("plugins.{name}.limits"),
            &plugin.limits,
            &mut errors,
        );
        let path = format!("plugins.{name}");
        match (plugin.isolation.as_str(), &plugin.process) {
            ("wasm", None) => {}
            ("wasm", Some(_)) => errors.add(
                format!("{path}.process"),
                "is for isolation: process (a WebAssembly plugin has a source)",
            ),
            ("process", None) => errors.add(
                format!("{path}.process"),
                "isolation: process needs process.service (where the plugin's process serves ext_proc)",
            ),
            ("process", Some(process)) => {
                for (field, set) in [
                    ("source", plugin.source.is_some()),
                    ("vm_config", plugin.vm_config.is_some()),
                    ("limits", plugin.limits.memory.is_some() || plugin.limits.cpu.is_some()),
                ] {
                    if set {
                        errors.add(
                            format!("{path}.{field}"),
                            "is for isolation: wasm (a process plugin runs outside the proxy)",
                        );
                    }
                }
                if !config.services.contains_key(&process.service) {
                    errors.add(
                        format!("{path}.process.service"),
                        format!("{:?} is not among services", process.service),
                    );
                }
                if let Some(program) = process.command.first() {
                    if program.trim().is_empty() {
                        errors.add(format!("{path}.process.command[0]"), "must name a program");
                    }
                    let local_port = config.services.get(&process.service).and_then(|s| {
                        s.endpoints.first().and_then(|e| {
                            let address = parse_endpoint_address(&e.address).ok()?;
                            let local = address.0 == "localhost"
                                || address.0.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
                            local.then_some(address.1)
                        })
                    });
                    if config.services.contains_key(&process.service) && local_port.is_none() {
                        errors.add(
                            format!("{path}.process.command"),
                            format!(
                                "the proxy starts the command on its own machine: service {:?} needs an endpoint on 127.0.0.1 or localhost",
                                process.service
                            ),
                        );
                    }
                }
                for (field, set) in [
                    ("env", !process.env.is_empty()),
                    ("working_dir", process.working_dir.is_some()),
                    ("user", process.user.is_some()),
                    (
                        "limits",
                        process.limits.memory.is_some()
                            || process.limits.cpu.is_some()
                            || process.limits.open_files.is_some(),
                    ),
                ] {
                    if set && process.command.is_empty() {
                        errors.add(
                            format!("{path}.process.{field}"),
                            "applies to a command the proxy starts (process.command)",
                        );
                    }
                }
                if process.limits.cpu.is_some_and(|c| !(c > 0.0 && c <= 1024.0)) {
                    errors.add(
                        format!("{path}.process.limits.cpu"),
                        "must be a number of cores above 0",
                    );
                }
                if process.stream_bodies
                    && process
                        .body_mode
                        .is_some_and(|m| m != crate::config::ProcessBodyMode::None)
                {
                    errors.add(
                        format!("{path}.process.body_mode"),
                        "contradicts stream_bodies: true (which is body_mode: none)",
                    );
                }
                if process.trailers && !process.responses {
                    errors.add(
                        format!("{path}.process.trailers"),
                        "response trailers need responses: true",
                    );
                }
                if !process.requests && !process.responses {
                    errors.add(
                        format!("{path}.process"),
                        "requests and responses are both off: the plugin would see nothing",
                    );
                }
            }
            (other, _) => errors.add(
                format!("{path}.isolation"),
                format!("{other:?} is not supported: `wasm` (in the proxy) or `process` (ext_proc)"),
            ),
        }
    }
    if let Some(control_plane) = &config.control_plane {
        for (field, value) in [
            ("ca_file", &control_plane.ca_file),
            ("join_token_file", &control_plane.join_token_file),
            ("identity_dir", &control_plane.identity_dir),
            ("last_good", &control_plane.last_good),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errors.add(format!("control_plane.{field}"), "must name a path");
            }
        }
        if control_plane.ca_file.is_none() {
            for (field, set) in [
                ("join_token_file", control_plane.join_token_file.is_some()),
                ("identity_dir", control_plane.identity_dir.is_some()),
            ] {
                if set {
                    errors.add(
                        format!("control_plane.{field}"),
                        "needs control_plane.ca_file (identities go with mutual TLS)",
                    );
                }
            }
        }
        if parse_endpoint_address(&control_plane.address).is_err() {
            errors.add(
                "control_plane.address",
                format!(
                    "{:?} is not host:port (e.g. \"127.0.0.1:18000\")",
                    control_plane.address
                ),
            );
        }
    }
    if let Some(tenant) = &config.tenant {
        if tenant.id.trim().is_empty() {
            errors.add("tenant.id", "must not be empty");
        }
        validate_tenant("tenant", tenant, &mut errors);
    }
    for (id, tenant) in &config.tenants {
        if !valid_name(id) {
            errors.add(
                format!("tenants.{id}"),
                "a tenant id may only hold letters, digits, '-', '_' and '.'",
            );
        }
        validate_tenant(&format!("tenants.{id}"), tenant, &mut errors);
    }
    for (path, message) in super::tenant_problems(config) {
        errors.add(path, message);
    }
    errors.0
}

/// The name a route is known by in metrics and logs.
pub fn route_name(route: &RouteConfig, index: usize) -> String {
    route
        .name
        .clone()
        .unwrap_or_else(|| format!("route-{index}"))
}

/// Parses a listen address: `:8080` (all interfaces), `127.0.0.1:8080`, `[::1]:8080`,
/// `localhost:8080`.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?} has no valid port (expected like \":8080\")"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?} has no valid port"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not an address of the form \"ip:port\" or \":port\""))
}

/// Splits an endpoint address into host and port, checking both.
pub fn parse_endpoint_address(text: &str) -> Result<(String, u16), String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} needs a port (\"host:port\")"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?} has no valid port"))?;
    if port == 0 {
        return Err(format!("{text:?}: port 0 cannot be connected to"));
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_host && host.parse::<IpAddr>().is_err() {
        return Err(format!("{host:?} is not a valid IP address or host name"));
    }
    Ok((host.to_string(), port))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn validate_tls(config: &Config, errors: &mut Errors) {
    let tls = &config.api_gateway.tls;
    if tls.mesh {
        for (field, set) in [
            ("cert_file", tls.cert_file.is_some()),
            ("key_file", tls.key_file.is_some()),
            ("certificates", !tls.certificates.is_empty()),
            ("client_ca_file", tls.client_ca_file.is_some()),
        ] {
            if set {
                errors.add(
                    format!("api_gateway.tls.{field}"),
                    "mesh: true serves the proxy's workload certificate and verifies clients with the mesh's CA instead",
                );
            }
        }
        return;
    }
    if !tls.enabled {
        for (field, set) in [
            ("client_ca_file", tls.client_ca_file.is_some()),
            ("require_client_certificate", tls.require_client_certificate),
        ] {
            if set {
                errors.add(
                    format!("api_gateway.tls.{field}"),
                    "needs tls.enabled: client certificates are part of TLS",
                );
            }
        }
        return;
    }
    for (field, value) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
        let path = format!("api_gateway.tls.{field}");
        match value {
            None => errors.add(path, "is required when tls.enabled is true"),
            Some(file) if !std::path::Path::new(file).is_file() => {
                errors.add(path, format!("file {file:?} does not exist"))
            }
            Some(_) => {}
        }
    }
    for (i, pair) in tls.certificates.iter().enumerate() {
        for (field, file) in [("cert_file", &pair.cert_file), ("key_file", &pair.key_file)] {
            if !std::path::Path::new(file).is_file() {
                errors.add(
                    format!("api_gateway.tls.certificates[{i}].{field}"),
                    format!("file {file:?} does not exist"),
                );
            }
        }
    }
    match &tls.client_ca_file {
        Some(file) if !std::path::Path::new(file).is_file() => errors.add(
            "api_gateway.tls.client_ca_file",
            format!("file {file:?} does not exist"),
        ),
        None if tls.require_client_certificate => errors.add(
            "api_gateway.tls.require_client_certificate",
            "needs client_ca_file: the roots client certificates must chain to",
        ),
        _ => {}
    }
}

/// A CONNECT route matches on its host only.
fn validate_connect_route(path: &str, route: &RouteConfig, errors: &mut Errors) {
    let m = &route.matcher;
    if !m.connect {
        return;
    }
    for (field, set) in [
        ("path", m.path.is_some()),
        ("path_prefix", m.path_prefix.is_some()),
        ("path_regex", m.path_regex.is_some()),
        ("methods", !m.methods.is_empty()),
    ] {
        if set {
            errors.add(
                format!("{path}.match.{field}"),
                "a CONNECT request has no path and one method: a connect route matches its host only",
            );
        }
    }
}

fn validate_service(name: &str, service: &ServiceConfig, errors: &mut Errors) {
    let path = format!("services.{name}");
    for (i, address) in service.addresses.iter().enumerate() {
        if address.parse::<std::net::SocketAddr>().is_err() {
            errors.add(
                format!("{path}.addresses[{i}]"),
                format!("{address:?} is not an ip:port"),
            );
        }
    }
    if !service.addresses.is_empty() && service.original_destination {
        errors.add(
            format!("{path}.addresses"),
            "original_destination: each request goes where its connection was going",
        );
    }
    if service.original_destination {
        for (field, set) in [
            ("endpoints", !service.endpoints.is_empty()),
            ("tls", service.tls.is_some()),
            ("health_check", service.health_check.is_some()),
            ("lb", service.lb.is_some()),
        ] {
            if set {
                errors.add(
                    format!("{path}.{field}"),
                    "original_destination: each request goes where its connection was going",
                );
            }
        }
    }
    if let Some(tls) = &service.tls {
        for (field, value) in [
            ("ca_file", &tls.ca_file),
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
        ] {
            if let Some(file) = value {
                if !std::path::Path::new(file).is_file() {
                    errors.add(
                        format!("{path}.tls.{field}"),
                        format!("file {file:?} does not exist"),
                    );
                }
            }
        }
        if tls.mesh {
            for (field, set) in [
                ("ca_file", tls.ca_file.is_some()),
                ("cert_file", tls.cert_file.is_some()),
                ("key_file", tls.key_file.is_some()),
            ] {
                if set {
                    errors.add(
                        format!("{path}.tls.{field}"),
                        "mesh: true uses the proxy's workload certificate and the mesh's CA instead",
                    );
                }
            }
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            errors.add(
                format!("{path}.tls"),
                "cert_file and key_file go together (the proxy's client certificate)",
            );
        }
        for (i, san) in tls.match_typed_subject_alt_names.iter().enumerate() {
            let field = format!("{path}.tls.match_typed_subject_alt_names[{i}].matcher");
            let m = &san.matcher;
            let set = [&m.exact, &m.prefix, &m.suffix, &m.contains, &m.regex]
                .iter()
                .filter(|v| v.is_some())
                .count();
            if set != 1 {
                errors.add(
                    field,
                    "set exactly one of exact, prefix, suffix, contains, regex",
                );
            } else if let Some(Err(e)) = m.regex.as_ref().map(|r| regex::Regex::new(r)) {
                errors.add(format!("{field}.regex"), e.to_string());
            }
        }
        if let Some(sni) = &tls.sni {
            if sni.is_empty() || sni.parse::<http::uri::Authority>().is_err() || sni.contains(':') {
                errors.add(
                    format!("{path}.tls.sni"),
                    format!("{sni:?} is not a host name"),
                );
            }
        }
        if service.health_check.is_some() {
            errors.add(
                format!("{path}.health_check"),
                "health checks of a TLS service are not supported yet (outlier detection is)",
            );
        }
    }
    if !valid_name(name) {
        errors.add(
            path.clone(),
            "a service name may only hold letters, digits, '-', '_' and '.'",
        );
    }
    let mut seen = HashSet::new();
    for (i, endpoint) in service.endpoints.iter().enumerate() {
        let ep_path = format!("{path}.endpoints[{i}]");
        if let Err(e) = parse_endpoint_address(&endpoint.address) {
            errors.add(format!("{ep_path}.address"), e);
        }
        if !seen.insert(endpoint.address.clone()) {
            errors.add(
                format!("{ep_path}.address"),
                format!("{} is listed twice", endpoint.address),
            );
        }
        if endpoint.weight == 0 || endpoint.weight > 128 {
            errors.add(format!("{ep_path}.weight"), "must be between 1 and 128");
        }
    }
    for (locality, weight) in &service.locality_weights {
        let path = format!("{path}.locality_weights.{locality}");
        let known = service.endpoints.iter().any(|e| {
            let region = e.region.as_deref().unwrap_or("");
            let zone = e.zone.as_deref().unwrap_or("");
            let sub_zone = e.sub_zone.as_deref().unwrap_or("");
            *locality == region
                || *locality == format!("{region}/{zone}")
                || *locality == format!("{region}/{zone}/{sub_zone}")
        });
        if !known {
            errors.add(
                path.clone(),
                "no endpoint of the service is in this locality (write region, region/zone or region/zone/sub_zone)",
            );
        }
        if *weight == 0 || *weight > 128 {
            errors.add(path, "must be between 1 and 128");
        }
    }
    // Priorities must run 0, 1, 2… without gaps (Envoy and gRPC refuse gaps).
    let priorities: std::collections::BTreeSet<u32> =
        service.endpoints.iter().map(|e| e.priority).collect();
    if let Some((i, endpoint)) = service
        .endpoints
        .iter()
        .enumerate()
        .find(|(_, e)| e.priority > 0 && !priorities.contains(&(e.priority - 1)))
    {
        errors.add(
            format!("{path}.endpoints[{i}].priority"),
            format!(
                "priority {} has no priority {} before it (priorities start at 0, without gaps)",
                endpoint.priority,
                endpoint.priority - 1
            ),
        );
    }
    if let Some(outlier) = &service.outlier_detection {
        for (field, value) in [
            ("max_ejection_percent", outlier.max_ejection_percent),
            ("enforcing_success_rate", outlier.enforcing_success_rate),
            (
                "failure_percentage_threshold",
                outlier.failure_percentage_threshold,
            ),
        ] {
            if let Some(percent) = value.filter(|p| *p > 100) {
                errors.add(
                    format!("{path}.outlier_detection.{field}"),
                    format!("{percent} is more than 100"),
                );
            }
        }
        if let Some(factor) = outlier
            .latency_factor
            .filter(|f| !(1.0..=1000.0).contains(f))
        {
            errors.add(
                format!("{path}.outlier_detection.latency_factor"),
                format!("{factor} is not between 1 and 1000"),
            );
        }
        if let Some(factor) = outlier
            .success_rate_stdev_factor
            .filter(|f| !(0.0..=100.0).contains(f))
        {
            errors.add(
                format!("{path}.outlier_detection.success_rate_stdev_factor"),
                format!("{factor} is not between 0 and 100"),
            );
        }
    }
    if let Some(percent) = service
        .circuit_breakers
        .and_then(|b| b.retry_budget)
        .and_then(|b| b.percent)
        .filter(|p| !(0.0..=100.0).contains(p))
    {
        errors.add(
            format!("{path}.circuit_breakers.retry_budget.percent"),
            format!("{percent} is not between 0 and 100"),
        );
    }
    if let Some(ring) = &service.ring_hash {
        let min = ring.minimum_ring_size.unwrap_or(1024);
        let max = ring.maximum_ring_size.unwrap_or(8 * 1024 * 1024);
        if min == 0 || max > 8 * 1024 * 1024 || min > max {
            errors.add(
                format!("{path}.ring_hash"),
                format!("ring sizes must satisfy 1 ≤ minimum ({min}) ≤ maximum ({max}) ≤ 8388608"),
            );
        }
        if service.lb_policy() != LbPolicy::RingHash {
            errors.add(
                format!("{path}.ring_hash"),
                "only applies with lb: ring_hash",
            );
        }
    }
    if let Some(adaptive) = &service.adaptive_concurrency {
        validate_adaptive_concurrency(&format!("{path}.adaptive_concurrency"), adaptive, errors);
    }
    if let Some(timeout) = service.connect_timeout {
        if timeout.0.is_zero() {
            errors.add(format!("{path}.connect_timeout"), "must be more than 0");
        }
    }
    if let Some(hc) = &service.health_check {
        let hc_path = format!("{path}.health_check");
        if !hc.path.starts_with('/') {
            errors.add(format!("{hc_path}.path"), "must start with '/'");
        }
        if hc.interval.0.is_zero() {
            errors.add(format!("{hc_path}.interval"), "must be more than 0");
        }
        if hc.timeout.0.is_zero() {
            errors.add(format!("{hc_path}.timeout"), "must be more than 0");
        }
        if hc.unhealthy_threshold == 0 {
            errors.add(
                format!("{hc_path}.unhealthy_threshold"),
                "must be at least 1",
            );
        }
        if hc.healthy_threshold == 0 {
            errors.add(format!("{hc_path}.healthy_threshold"), "must be at least 1");
        }
        for (i, status) in hc.expected_statuses.iter().enumerate() {
            if !(100..=599).contains(status) {
                errors.add(
                    format!("{hc_path}.expected_statuses[{i}]"),
                    format!("{status} is not an HTTP status"),
                );
            }
        }
    }
}

fn validate_adaptive_concurrency(
    path: &str,
    config: &crate::config::AdaptiveConcurrencyConfig,
    errors: &mut Errors,
) {
    let mut percent = |field: &str, value: Option<f64>, low: f64, high: f64| {
        if let Some(v) = value.filter(|v| !(low..=high).contains(v) || v.is_nan()) {
            errors.add(
                format!("{path}.{field}"),
                format!("{v} is not between {low} and {high}"),
            );
        }
    };
    percent("percentile", config.percentile, 0.0, 100.0);
    percent("min_rtt_jitter", config.min_rtt_jitter, 0.0, 100.0);
    percent("buffer", config.buffer, 0.0, 1000.0);
    for (field, value) in [
        ("update_interval", config.update_interval),
        ("min_rtt_interval", config.min_rtt_interval),
        ("min_rtt", config.min_rtt),
    ] {
        if value.is_some_and(|d| d.0.is_zero()) {
            errors.add(format!("{path}.{field}"), "must be more than 0");
        }
    }
    for (field, value) in [
        ("max_limit", config.max_limit),
        ("min_limit", config.min_limit),
        ("min_rtt_requests", config.min_rtt_requests),
        ("min_concurrency", config.min_concurrency),
    ] {
        if value == Some(0) {
            errors.add(format!("{path}.{field}"), "must be at least 1");
        }
    }
    if let (Some(min), Some(max)) = (config.min_limit, config.max_limit) {
        if min > max {
            errors.add(
                format!("{path}.min_limit"),
                format!("{min} is more than max_limit {max}"),
            );
        }
    }
    if let Some(status) = config.status.filter(|s| !(400..=599).contains(s)) {
        errors.add(
            format!("{path}.status"),
            format!("{status} is not a 4xx or 5xx status"),
        );
    }
}

/// A pinned route (its own `locality` or the tenant's `data.locality`) must stay where the
/// tenant's data may go, and each of its services needs an endpoint there: otherwise every
/// request would be answered 503.
fn validate_route_locality(path: &str, route: &RouteConfig, config: &Config, errors: &mut Errors) {
    let tenant = config.data_locality(route);
    if let (Some(own), Some(tenant)) = (route.locality.as_deref(), tenant) {
        if own != tenant {
            errors.add(
                format!("{path}.locality"),
                format!("the tenant's data must stay in {tenant:?} (tenant.data.locality)"),
            );
            return;
        }
    }
    let Some(region) = route.locality.as_deref().or(tenant) else {
        return;
    };
    let services = route
        .service
        .iter()
        .chain(route.split.iter().map(|leg| &leg.service));
    for name in services {
        let Some(service) = config.services.get(name) else {
            continue;
        };
        let present = service
            .endpoints
            .iter()
            .any(|e| e.region.as_deref() == Some(region));
        if !service.endpoints.is_empty() && !present {
            let field = if route.locality.is_some() {
                format!("{path}.locality")
            } else {
                "tenant.data.locality".to_string()
            };
            errors.add(
                field,
                format!(
                    "{path} goes to service {name:?}, which has no endpoint in region {region:?}"
                ),
            );
        }
    }
}

fn validate_route(path: &str, route: &RouteConfig, config: &Config, errors: &mut Errors) {
    validate_connect_route(path, route, errors);
    if let Some(limit) = &route.rate_limit {
        if limit.requests == 0 {
            errors.add(format!("{path}.rate_limit.requests"), "must be at least 1");
        }
        if limit.per.0 < std::time::Duration::from_millis(1) {
            errors.add(format!("{path}.rate_limit.per"), "must be at least 1ms");
        }
        if limit.burst == Some(0) {
            errors.add(format!("{path}.rate_limit.burst"), "must be at least 1");
        }
        if !matches!(limit.scope.as_deref(), None | Some("local" | "global")) {
            errors.add(
                format!("{path}.rate_limit.scope"),
                "must be local or global",
            );
        }
        if limit.is_global() && config.rate_limit_service.is_none() {
            errors.add(
                format!("{path}.rate_limit.scope"),
                "global limits are counted by rate_limit_service, which is not set",
            );
        }
        if let Some(key) = &limit.key {
            let set = key.header.is_some() as usize
                + key.source_ip as usize
                + key.claim.is_some() as usize;
            if set != 1 {
                errors.add(
                    format!("{path}.rate_limit.key"),
                    "set exactly one of header, source_ip, claim",
                );
            }
            if key.header.as_deref().is_some_and(http_header_name_invalid) {
                errors.add(
                    format!("{path}.rate_limit.key.header"),
                    "is not a valid header name",
                );
            }
            if let Some(claim) = &key.claim {
                if claim.is_empty() || claim.split('.').any(str::is_empty) {
                    errors.add(
                        format!("{path}.rate_limit.key.claim"),
                        "is not a claim name",
                    );
                }
                if config.auth.jwt_providers.is_empty() {
                    errors.add(
                        format!("{path}.rate_limit.key.claim"),
                        "auth.jwt_providers has no provider to verify claims",
                    );
                }
            }
        }
    }
    let m = &route.matcher;
    let specifiers = [&m.path, &m.path_prefix, &m.path_regex]
        .iter()
        .filter(|s| s.is_some())
        .count();
    if specifiers > 1 {
        errors.add(
            format!("{path}.match"),
            "use only one of path, path_prefix and path_regex",
        );
    }
    for (field, value) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(p) = value {
            if !p.starts_with('/') {
                errors.add(format!("{path}.match.{field}"), "must start with '/'");
            }
        }
    }
    if let Some(re) = &m.path_regex {
        if let Err(e) = regex::Regex::new(re) {
            errors.add(
                format!("{path}.match.path_regex"),
                format!("invalid regex: {}", one_line(&e.to_string())),
            );
        }
    }
    if let Some(host) = &m.host {
        if let Err(e) = check_host_pattern(host) {
            errors.add(format!("{path}.match.host"), e);
        }
    }
    for (i, header) in m.headers.iter().enumerate() {
        validate_header(&format!("{path}.match.headers[{i}]"), header, errors);
    }
    for (i, method) in m.methods.iter().enumerate() {
        if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
            errors.add(
                format!("{path}.match.methods[{i}]"),
                format!("{method:?} is not an HTTP method (write it in capitals, like GET)"),
            );
        }
    }
    validate_route_edits(path, route, errors);
    let answers_itself = route.redirect.is_some() || route.direct_response.is_some();
    match (&route.service, route.split.is_empty()) {
        _ if answers_itself => {
            if route.service.is_some() || !route.split.is_empty() {
                errors.add(
                    path.to_string(),
                    "a route with `redirect` or `direct_response` answers by itself: no `service` or `split`",
                );
            }
        }
        (Some(_), false) => errors.add(
            path.to_string(),
            "set either `service` or `split`, not both",
        ),
        (None, true) => errors.add(
            path.to_string(),
            "needs a destination: `service: NAME`, `split: [...]`, `redirect` or `direct_response`",
        ),
        (Some(service), true) => {
            if !config.services.contains_key(service) {
                errors.add(
                    format!("{path}.service"),
                    format!("no service named {service:?} in `services`"),
                );
            }
        }
        (None, false) => {
            let mut total = 0u64;
            for (i, leg) in route.split.iter().enumerate() {
                total += u64::from(leg.weight);
                if !config.services.contains_key(&leg.service) {
                    errors.add(
                        format!("{path}.split[{i}].service"),
                        format!("no service named {:?} in `services`", leg.service),
                    );
                }
            }
            if total == 0 {
                errors.add(
                    format!("{path}.split"),
                    "weights must add up to more than 0",
                );
            }
        }
    }
    // `timeout: 0s` is Envoy's "no budget" (streams); `idle_timeout` then bounds each read.
    validate_route_locality(path, route, config, errors);
    for (i, policy) in route.hash_policy.iter().enumerate() {
        let field = format!("{path}.hash_policy[{i}]");
        let sources = [
            policy.header.is_some(),
            policy.cookie.is_some(),
            policy.source_ip,
            policy.query_parameter.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if sources != 1 {
            errors.add(
                field.clone(),
                "set exactly one of header, cookie, source_ip: true, query_parameter",
            );
        }
        if let Some(header) = &policy.header {
            if http_header_name_invalid(header) {
                errors.add(
                    format!("{field}.header"),
                    format!("{header:?} is not a valid header name"),
                );
            }
        }
        for (name, value) in [
            ("cookie", &policy.cookie),
            ("query_parameter", &policy.query_parameter),
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                errors.add(format!("{field}.{name}"), "must not be empty");
            }
        }
    }
    let mut seen_plugins = HashSet::new();
    for (i, name) in route.plugins.iter().enumerate() {
        let field = format!("{path}.plugins[{i}]");
        match config.plugins.get(name) {
            None => errors.add(field, format!("no plugin named {name:?} in `plugins`")),
            Some(p) if p.source.is_none() && p.process.is_none() => errors.add(
                field,
                format!("plugin {name:?} has no `source`, so it cannot run"),
            ),
            Some(p) if !p.enabled => errors.add(
                field,
                format!("plugin {name:?} is disabled (enabled: false)"),
            ),
            Some(_) => {}
        }
        if !seen_plugins.insert(name) {
            errors.add(
                format!("{path}.plugins[{i}]"),
                format!("{name:?} is listed twice"),
            );
        }
    }
    if let Some(retries) = &route.retries {
        for (i, on) in retries.on.iter().enumerate() {
            if !RETRY_CONDITIONS.contains(&on.as_str()) {
                errors.add(
                    format!("{path}.retries.on[{i}]"),
                    format!("{on:?} is not one of {}", RETRY_CONDITIONS.join(", ")),
                );
            }
        }
        if retries.max > MAX_RETRIES {
            errors.add(
                format!("{path}.retries.max"),
                format!("at most {MAX_RETRIES}"),
            );
        }
        let by_codes = retries.on.iter().any(|on| on == "retriable-status-codes");
        if by_codes && retries.retriable_status_codes.is_empty() {
            errors.add(
                format!("{path}.retries.retriable_status_codes"),
                "`retriable-status-codes` needs at least one status here",
            );
        }
        if !by_codes && !retries.retriable_status_codes.is_empty() {
            errors.add(
                format!("{path}.retries.on"),
                "retriable_status_codes are retried only with `retriable-status-codes` in `on`",
            );
        }
        for (i, code) in retries.retriable_status_codes.iter().enumerate() {
            if !(100..600).contains(code) {
                errors.add(
                    format!("{path}.retries.retriable_status_codes[{i}]"),
                    format!("{code} is not an HTTP status"),
                );
            }
        }
        if let Some(back_off) = &retries.back_off {
            let base = back_off.base_interval.0;
            if base.is_zero() {
                errors.add(
                    format!("{path}.retries.back_off.base_interval"),
                    "must be more than 0",
                );
            }
            if back_off.max_interval.is_some_and(|max| max.0 < base) {
                errors.add(
                    format!("{path}.retries.back_off.max_interval"),
                    "must be at least base_interval",
                );
            }
        }
    }
    if route.idle_timeout.is_some_and(|t| t.0.is_zero()) {
        errors.add(
            format!("{path}.idle_timeout"),
            "must be more than 0 (leave it out for none)",
        );
    }
}

/// Values of `append_action` (Envoy's `HeaderAppendAction`, in lower case).
pub const APPEND_ACTIONS: &[&str] = &[
    "append_if_exists_or_add",
    "add_if_absent",
    "overwrite_if_exists_or_add",
    "overwrite_if_exists",
];

/// The `%VARIABLE%`s a header value may use (`REQ(name)` takes a header name).
pub const HEADER_VARIABLES: &[&str] = &[
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_HOST",
    "START_TIME",
    "PROTOCOL",
    "REQ(header-name)",
];

/// The variables of a header value that are not supported, or why the value is malformed.
fn header_value_problem(value: &str) -> Option<String> {
    let mut rest = value;
    while let Some(start) = rest.find('%') {
        let after = &rest[start + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            rest = tail;
            continue;
        }
        let Some(end) = after.find('%') else {
            return Some("a `%` opens a variable that is not closed (write `%%` for `%`)".into());
        };
        let name = &after[..end];
        let known = HEADER_VARIABLES[..HEADER_VARIABLES.len() - 1].contains(&name)
            || name
                .strip_prefix("REQ(")
                .and_then(|n| n.strip_suffix(')'))
                .is_some_and(|n| !http_header_name_invalid(n));
        if !known {
            return Some(format!(
                "%{name}% is not a supported variable (supported: {})",
                HEADER_VARIABLES.join(", ")
            ));
        }
        rest = &after[end + 1..];
    }
    None
}

/// Rewrites, header edits, redirects and direct responses of a route.
fn validate_route_edits(path: &str, route: &RouteConfig, errors: &mut Errors) {
    let answers_itself = route.redirect.is_some() || route.direct_response.is_some();
    if route.redirect.is_some() && route.direct_response.is_some() {
        errors.add(
            path.to_string(),
            "set either `redirect` or `direct_response`, not both",
        );
    }
    if answers_itself {
        let forwarding = [
            ("retries", route.retries.is_some()),
            ("hash_policy", !route.hash_policy.is_empty()),
            ("prefix_rewrite", route.prefix_rewrite.is_some()),
            ("regex_rewrite", route.regex_rewrite.is_some()),
            ("host_rewrite", route.host_rewrite.is_some()),
            ("auto_host_rewrite", route.auto_host_rewrite),
            (
                "request_headers_to_add",
                !route.request_headers_to_add.is_empty(),
            ),
            (
                "request_headers_to_remove",
                !route.request_headers_to_remove.is_empty(),
            ),
        ];
        for (field, set) in forwarding {
            if set {
                errors.add(
                    format!("{path}.{field}"),
                    "applies to forwarded requests; this route answers by itself",
                );
            }
        }
    }
    if route.prefix_rewrite.is_some() && route.regex_rewrite.is_some() {
        errors.add(
            format!("{path}.regex_rewrite"),
            "set either prefix_rewrite or regex_rewrite, not both",
        );
    }
    let prefix_matched = route.matcher.path.is_some() || route.matcher.path_prefix.is_some();
    if route.prefix_rewrite.is_some() && !prefix_matched {
        errors.add(
            format!("{path}.prefix_rewrite"),
            "needs `match.path_prefix` or `match.path` (the part it swaps)",
        );
    }
    if let Some(problem) = route.prefix_rewrite.as_deref().and_then(path_text_problem) {
        errors.add(format!("{path}.prefix_rewrite"), problem);
    }
    if let Some(rewrite) = &route.regex_rewrite {
        validate_regex_rewrite(&format!("{path}.regex_rewrite"), rewrite, errors);
    }
    if route.host_rewrite.is_some() && route.auto_host_rewrite {
        errors.add(
            format!("{path}.host_rewrite"),
            "set either host_rewrite or auto_host_rewrite, not both",
        );
    }
    if let Some(host) = &route.host_rewrite {
        if host.parse::<http::uri::Authority>().is_err() || host.is_empty() {
            errors.add(
                format!("{path}.host_rewrite"),
                format!("{host:?} is not a host"),
            );
        }
    }
    for (field, adds) in [
        ("request_headers_to_add", &route.request_headers_to_add),
        ("response_headers_to_add", &route.response_headers_to_add),
    ] {
        for (i, add) in adds.iter().enumerate() {
            let at = format!("{path}.{field}[{i}]");
            check_editable_header(&format!("{at}.name"), &add.name, errors);
            if let Some(problem) = header_value_problem(&add.value) {
                errors.add(format!("{at}.value"), problem);
            } else if add.value.contains(['\r', '\n', '\0']) {
                errors.add(
                    format!("{at}.value"),
                    "a header value cannot hold CR, LF or NUL",
                );
            }
            if let Some(action) = &add.append_action {
                if !APPEND_ACTIONS.contains(&action.as_str()) {
                    errors.add(
                        format!("{at}.append_action"),
                        format!("{action:?} is not one of {}", APPEND_ACTIONS.join(", ")),
                    );
                }
            }
        }
    }
    for (field, names) in [
        (
            "request_headers_to_remove",
            &route.request_headers_to_remove,
        ),
        (
            "response_headers_to_remove",
            &route.response_headers_to_remove,
        ),
    ] {
        for (i, name) in names.iter().enumerate() {
            check_editable_header(&format!("{path}.{field}[{i}]"), name, errors);
        }
    }
    if let Some(redirect) = &route.redirect {
        let at = format!("{path}.redirect");
        if redirect.https_redirect && redirect.scheme_redirect.is_some() {
            errors.add(
                format!("{at}.scheme_redirect"),
                "set either https_redirect or scheme_redirect",
            );
        }
        if let Some(scheme) = &redirect.scheme_redirect {
            if scheme != "http" && scheme != "https" {
                errors.add(
                    format!("{at}.scheme_redirect"),
                    format!("{scheme:?} is not http or https"),
                );
            }
        }
        if let Some(host) = &redirect.host_redirect {
            if host.is_empty() || host.parse::<http::uri::Authority>().is_err() {
                errors.add(
                    format!("{at}.host_redirect"),
                    format!("{host:?} is not a host"),
                );
            }
        }
        if redirect.port_redirect == Some(0) {
            errors.add(format!("{at}.port_redirect"), "must be a port (1–65535)");
        }
        let paths = [
            redirect.path_redirect.is_some(),
            redirect.prefix_rewrite.is_some(),
            redirect.regex_rewrite.is_some(),
        ];
        if paths.iter().filter(|p| **p).count() > 1 {
            errors.add(
                at.clone(),
                "set at most one of path_redirect, prefix_rewrite and regex_rewrite",
            );
        }
        if let Some(problem) = redirect
            .path_redirect
            .as_deref()
            .and_then(redirect_path_problem)
        {
            errors.add(format!("{at}.path_redirect"), problem);
        }
        if redirect.prefix_rewrite.is_some() && !prefix_matched {
            errors.add(
                format!("{at}.prefix_rewrite"),
                "needs `match.path_prefix` or `match.path` (the part it swaps)",
            );
        }
        if let Some(problem) = redirect
            .prefix_rewrite
            .as_deref()
            .and_then(path_text_problem)
        {
            errors.add(format!("{at}.prefix_rewrite"), problem);
        }
        if let Some(rewrite) = &redirect.regex_rewrite {
            validate_regex_rewrite(&format!("{at}.regex_rewrite"), rewrite, errors);
        }
        if let Some(code) = redirect.response_code {
            if ![301, 302, 303, 307, 308].contains(&code) {
                errors.add(
                    format!("{at}.response_code"),
                    format!("{code} is not 301, 302, 303, 307 or 308"),
                );
            }
        }
    }
    if let Some(direct) = &route.direct_response {
        let at = format!("{path}.direct_response");
        if !(200..600).contains(&direct.status) {
            errors.add(
                format!("{at}.status"),
                format!("{} is not 200–599", direct.status),
            );
        }
        if direct
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_DIRECT_RESPONSE_BODY)
        {
            errors.add(
                format!("{at}.body"),
                format!("at most {MAX_DIRECT_RESPONSE_BODY} bytes (Envoy's limit)"),
            );
        }
    }
}

/// Envoy's default `max_direct_response_body_size_bytes`.
pub const MAX_DIRECT_RESPONSE_BODY: usize = 4096;

fn validate_regex_rewrite(path: &str, rewrite: &super::RegexRewriteConfig, errors: &mut Errors) {
    if let Err(e) = regex::Regex::new(&rewrite.pattern) {
        errors.add(
            format!("{path}.pattern"),
            format!("invalid regex: {}", one_line(&e.to_string())),
        );
    }
    if let Some(problem) = substitution_problem(&rewrite.substitution) {
        errors.add(format!("{path}.substitution"), problem);
    }
}

/// A header a route may add or remove: a valid name, not a pseudo-header and not `Host`
/// (the host rewrites change that).
fn check_editable_header(path: &str, name: &str, errors: &mut Errors) {
    if http_header_name_invalid(name) {
        errors.add(
            path.to_string(),
            format!("{name:?} is not a valid header name"),
        );
    } else if name.eq_ignore_ascii_case("host") {
        errors.add(
            path.to_string(),
            "Host is changed with host_rewrite or auto_host_rewrite",
        );
    }
}

fn validate_header(path: &str, header: &HeaderMatchConfig, errors: &mut Errors) {
    if http_header_name_invalid(&header.name) {
        errors.add(
            format!("{path}.name"),
            format!("{:?} is not a valid header name", header.name),
        );
    }
    let set = [
        header.exact.is_some(),
        header.prefix.is_some(),
        header.regex.is_some(),
        header.present.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        errors.add(
            path.to_string(),
            "set exactly one of exact, prefix, regex, present",
        );
    }
    if let Some(re) = &header.regex {
        if let Err(e) = regex::Regex::new(re) {
            errors.add(
                format!("{path}.regex"),
                format!("invalid regex: {}", one_line(&e.to_string())),
            );
        }
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks a host pattern: `*`, `*.suffix`, or an exact host (optionally with a port).
pub fn check_host_pattern(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if rest.is_empty() || rest.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard may only be a leading \"*.\" or the whole host \"*\""
        ));
    }
    if !rest
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'))
    {
        return Err(format!("{host:?} is not a valid host name"));
    }
    Ok(())
}

fn validate_tenant(path: &str, tenant: &super::TenantConfig, errors: &mut Errors) {
    if !matches!(
        tenant.priority.as_deref(),
        None | Some("low" | "normal" | "high")
    ) {
        errors.add(format!("{path}.priority"), "must be low, normal or high");
    }
    if let Some(rate) = tenant
        .resource_quota
        .as_ref()
        .and_then(|q| q.message_rate.as_ref())
    {
        if let Err(e) = parse_rate(rate) {
            errors.add(format!("{path}.resource_quota.message_rate"), e);
        }
    }
    if let Some(plugins) = &tenant.plugins {
        for (i, entry) in plugins.whitelist.iter().enumerate() {
            let ok = entry
                .split_once(':')
                .is_some_and(|(ns, name)| valid_name(ns) && (name == "*" || valid_name(name)));
            if !ok {
                errors.add(
                    format!("{path}.plugins.whitelist[{i}]"),
                    format!("{entry:?} is not of the form \"namespace:name\" or \"namespace:*\""),
                );
            }
        }
    }
    if let Some(retention) = tenant.data.as_ref().and_then(|d| d.retention.as_ref()) {
        if humantime::parse_duration(retention).is_err() {
            errors.add(
                format!("{path}.data.retention"),
                format!("{retention:?} is not a duration like \"90d\""),
            );
        }
    }
}

/// Parses a rate like `10000/sec`, `600/min` or `50/hour` into requests per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    rate_parts(text).map(|(count, seconds)| count / seconds as f64)
}

/// A rate like `600/min` as written: (600, 60 seconds).
pub fn rate_parts(text: &str) -> Result<(f64, u64), String> {
    let (count, unit) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a rate like \"10000/sec\""))?;
    let count: f64 = count
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {count:?} is not a number"))?;
    let seconds = match unit.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        other => return Err(format!("{text:?}: unit {other:?} is not sec, min or hour")),
    };
    if count <= 0.0 {
        return Err(format!("{text:?}: the rate must be more than 0"));
    }
    Ok((count, seconds))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Largest linear memory a wasm32 instance can have.
const MAX_PLUGIN_MEMORY: u64 = 4 << 30;

fn validate_plugin_source(path: &str, source: &PluginSource, errors: &mut Errors) {
    match (&source.file, &source.url) {
        (Some(file), None) => {
            if !std::path::Path::new(file).is_file() {
                errors.add(
                    format!("{path}.file"),
                    format!("file {file:?} does not exist"),
                );
            }
            if source.sha256.is_some() {
                errors.add(
                    format!("{path}.sha256"),
                    "only a `url` source is pinned by sha256",
                );
            }
        }
        (None, Some(url)) => {
            let host = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))
                .map(|rest| rest.split('/').next().unwrap_or(""));
            if host.is_none_or(str::is_empty) || url.contains(char::is_whitespace) {
                errors.add(
                    format!("{path}.url"),
                    format!("{url:?} is not an http:// or https:// URL"),
                );
            }
            match &source.sha256 {
                None => errors.add(
                    format!("{path}.sha256"),
                    "a `url` source needs the module's sha256, so a changed download is refused",
                ),
                Some(hash) if !is_sha256_hex(hash) => errors.add(
                    format!("{path}.sha256"),
                    format!("{hash:?} is not 64 hex digits"),
                ),
                Some(_) => {}
            }
        }
        (Some(_), Some(_)) => errors.add(path, "give either `file` or `url`, not both"),
        (None, None) => match &source.sha256 {
            // A module in the control plane's store (uploaded by `nip deploy`).
            Some(hash) if is_sha256_hex(hash) => {}
            Some(hash) => errors.add(
                format!("{path}.sha256"),
                format!("{hash:?} is not 64 hex digits"),
            ),
            None => errors.add(
                path,
                "give `file`, `url` (with `sha256`), or `sha256` alone for a module uploaded to the control plane (nip deploy)",
            ),
        },
    }
    if let Some(signature) = &source.signature {
        if decode_base64(signature).is_none_or(|bytes| bytes.len() != ED25519_SIGNATURE_BYTES) {
            errors.add(
                format!("{path}.signature"),
                "must be the base64 of an ed25519 signature (64 bytes)",
            );
        }
    }
}

/// The length of an ed25519 signature.
pub const ED25519_SIGNATURE_BYTES: usize = 64;
/// The length of an ed25519 public key.
pub const ED25519_KEY_BYTES: usize = 32;

/// Standard base64 (padding optional), `None` if it is not.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.trim()))
        .ok()
}

/// Whether `text` is a hex SHA-256 digest.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn validate_plugin_limits(path: &str, limits: &PluginLimitsConfig, errors: &mut Errors) {
    if let Some(ByteSize(memory)) = limits.memory {
        if !(1 << 20..=MAX_PLUGIN_MEMORY).contains(&memory) {
            errors.add(
                format!("{path}.memory"),
                format!("{memory} bytes is outside 1Mi..4Gi"),
            );
        }
    }
    if let Some(HumanDuration(cpu)) = limits.cpu {
        if cpu < std::time::Duration::from_millis(1) || cpu > std::time::Duration::from_secs(10) {
            errors.add(
                format!("{path}.cpu"),
                format!("{cpu:?} is outside 1ms..10s"),
            );
        }
    }
    if let Some(ByteSize(body)) = limits.body {
        if body > 64 << 20 {
            errors.add(
                format!("{path}.body"),
                format!("{body} bytes is more than 64Mi"),
            );
        }
    }
}
