//! The compiled, immutable routing snapshot and the compiler that builds it from xDS
//! resources.
//!
//! Every config version — from a file or a control plane — arrives as a [`ResourceSet`].
//!
//! ```text
//! prepare (plugins loaded, host names resolved: the only I/O)
//!   ──▶ Compiler::compile (pure) ──▶ Snapshot ──▶ the caller activates it (ArcSwap::store)
//! check = prepare_check (plugins decoded only, placeholder addresses) ──▶ the same compile
//! ```
//!
//! [`Compiler::compile`] checks each resource, decodes the typed extensions NIP supports,
//! resolves names into `Arc`s (routes point straight at clusters, clusters at endpoint
//! state) and returns a [`Snapshot`]. Any unsupported or broken field is an error naming the
//! resource, so the caller can keep the previous snapshot (and, over xDS, NACK). Because
//! [`check`] runs the same compile, the control plane refuses at apply what a proxy of this
//! version would refuse for reasons in the config itself.

use crate::downstream::limits::DownstreamLimits;
use crate::plugins::{LoadedPlugin, PluginLoader, ResourceLimits};
use crate::route::{
    AppendAction, HashPolicy, HashSource, HeaderAdd, HeaderEdits, HeaderMatch, HeaderValueMatch,
    HostRewrite, LocalAction, PathMatch, PathRewrite, Redirect, RedirectPath, RetryPolicy, Route,
    RouteEdits, RouteMatch, Router, RouterBuilder, Target, ValueTemplate, VirtualHost,
};
use crate::telemetry::access_log::{AccessLogger, LogFormat, LogSink};
use crate::telemetry::metrics::{Metrics, RequestCounters};
use crate::upstream::cluster::{AdaptiveConcurrency, Cluster};
use crate::upstream::endpoint::{Endpoint, Locality};
use crate::upstream::registry::EndpointRegistry;
use cluster_policies::{
    adaptive_concurrency, circuit_breakers, health_check_spec, legacy_lb_policy,
    load_balancing_policy, outlier_config, ring_size, upstream_http2,
};
use envoy_types::pb::envoy::config::accesslog::v3::{access_log, AccessLog};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster as XdsCluster};
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::config::core::v3::{
    address, data_source, socket_address, substitution_format_string, transport_socket, Address,
    DataSource, SocketAddress, SubstitutionFormatString,
};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, route, route_action, route_match, DirectResponseAction, HeaderMatcher,
    RedirectAction, RouteAction, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log, FileAccessLog,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    stdout_access_log, StdoutAccessLog,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use http::HeaderName;
use nip_xds::resources::names;
use nip_xds::ResourceSet;
use prost::{Message, Name};
use regex::Regex;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Envoy's default connect timeout, used when a cluster gives none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default route timeout, used when a route gives none.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// A resource the compiler refused, and why. Over xDS this becomes a NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {message}")]
pub struct CompileError {
    /// Resource kind (`Listener`, `RouteConfiguration`, `Cluster`, `ClusterLoadAssignment`).
    pub kind: &'static str,
    /// Resource name.
    pub name: String,
    /// What is wrong, naming the field.
    pub message: String,
}

fn err(kind: &'static str, name: &str, message: impl Into<String>) -> CompileError {
    CompileError {
        kind,
        name: name.to_string(),
        message: message.into(),
    }
}

/// TLS certificate files of the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert_file: String,
    /// PEM private key.
    pub key_file: String,
}

/// What the listening socket looks like. Pingora binds it once at start; a reload that
/// changes it is logged and takes effect at the next restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Address to bind.
    pub address: SocketAddr,
    /// TLS termination, with HTTP/2 offered through ALPN.
    pub tls: Option<TlsFiles>,
    /// Accept h2c (prior knowledge) next to HTTP/1.1 on plaintext.
    pub h2c: bool,
}

/// Everything a request needs, compiled from one config version.
#[derive(Debug)]
pub struct Snapshot {
    /// Config version.
    pub version: String,
    /// The resources this was compiled from (`/config_dump`).
    pub resources: ResourceSet,
    /// Node identity and admin address.
    pub bootstrap: Bootstrap,
    /// The listener.
    pub listener: ListenerSpec,
    /// Client timeouts and limits of the listener (taken by each new connection).
    pub downstream: DownstreamLimits,
    /// Route selection.
    pub router: Router,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Access log, when enabled.
    pub access_log: Option<Arc<AccessLogger>>,
    /// Counters for requests no route matched.
    pub unrouted: RequestCounters,
    /// Plugins of the listener by filter name.
    pub plugins: BTreeMap<String, Arc<LoadedPlugin>>,
}

impl Snapshot {
    /// The admin address from the bootstrap.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.bootstrap
            .admin
            .as_ref()
            .and_then(|a| a.address.as_ref())
            .and_then(|a| resolve_now(a).ok())
    }
}

/// Builds snapshots; owns nothing but references to the state snapshots share.
pub struct Compiler<'a> {
    /// Endpoint state shared across snapshots.
    pub registry: &'a EndpointRegistry,
    /// Metric families.
    pub metrics: &'a Metrics,
    /// The access logger of the previous snapshot, reused when unchanged.
    pub previous_access_log: Option<Arc<AccessLogger>>,
    /// The plugins and host addresses gathered beforehand ([`prepare`], [`prepare_check`]).
    pub prepared: &'a Prepared,
}

/// A route's hash policy (Envoy's `RouteAction.hash_policy`): header, cookie (without
/// generating one), source IP and query parameter sources.
fn hash_policy(
    action: &envoy_types::pb::envoy::config::route::v3::RouteAction,
) -> Result<Vec<HashPolicy>, String> {
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
    action
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, policy)| {
            let field = format!("route.hash_policy[{i}]");
            let source = match &policy.policy_specifier {
                Some(PolicySpecifier::Header(h)) => {
                    if h.regex_rewrite.is_some() {
                        return Err(format!("{field}.header.regex_rewrite is not supported"));
                    }
                    HashSource::Header(HeaderName::from_bytes(h.header_name.as_bytes()).map_err(
                        |_| {
                            format!(
                                "{field}.header.header_name: {:?} is not a header name",
                                h.header_name
                            )
                        },
                    )?)
                }
                Some(PolicySpecifier::Cookie(c)) => {
                    if c.ttl.is_some() {
                        return Err(format!(
                            "{field}.cookie.ttl: generating cookies is not supported"
                        ));
                    }
                    HashSource::Cookie(c.name.clone())
                }
                Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => {
                    HashSource::SourceIp
                }
                Some(PolicySpecifier::QueryParameter(q)) => {
                    HashSource::QueryParameter(q.name.clone())
                }
                Some(PolicySpecifier::ConnectionProperties(_)) => {
                    return Err(format!(
                        "{field}.connection_properties: source_ip must be true"
                    ))
                }
                Some(PolicySpecifier::FilterState(_)) => {
                    return Err(format!("{field}.filter_state is not supported"))
                }
                None => return Err(format!("{field}: no policy")),
            };
            Ok(HashPolicy {
                source,
                terminal: policy.terminal,
            })
        })
        .collect()
}

/// A route's retry policy (Envoy's `RetryPolicy`); errors name the field under
/// `retry_policy`.
fn retry_policy(
    policy: &envoy_types::pb::envoy::config::route::v3::RetryPolicy,
) -> Result<RetryPolicy, String> {
    let positive = |d: &PbDuration, field: &str| {
        duration(d)
            .filter(|d| !d.is_zero())
            .ok_or(format!("{field} must be more than 0"))
    };
    let mut retry = RetryPolicy::parse(
        &policy.retry_on,
        policy.num_retries.as_ref().map_or(1, |n| n.value),
    )
    .map_err(|e| format!("retry_on: {e}"))?;
    retry.per_try_timeout = policy
        .per_try_timeout
        .as_ref()
        .map(|d| positive(d, "per_try_timeout"))
        .transpose()?;
    retry.retriable_status_codes = policy
        .retriable_status_codes
        .iter()
        .map(|&code| {
            u16::try_from(code)
                .ok()
                .filter(|c| (100..600).contains(c))
                .ok_or(format!(
                    "retriable_status_codes: {code} is not an HTTP status"
                ))
        })
        .collect::<Result<_, _>>()?;
    if let Some(back_off) = &policy.retry_back_off {
        let base = match &back_off.base_interval {
            Some(d) => positive(d, "retry_back_off.base_interval")?,
            None => return Err("retry_back_off.base_interval is required".into()),
        };
        let max = match &back_off.max_interval {
            Some(d) => positive(d, "retry_back_off.max_interval")?,
            None => base.saturating_mul(10),
        };
        if max < base {
            return Err("retry_back_off.max_interval must be at least base_interval".into());
        }
        retry.back_off = crate::route::BackOff { base, max };
    }
    Ok(retry)
}

/// A route's data locality from its metadata (`nip.locality` → `region`).
fn route_locality(
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
) -> Result<Option<Arc<str>>, String> {
    let Some(fields) = xds
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::LOCALITY_METADATA))
    else {
        return Ok(None);
    };
    match fields.fields.get("region").and_then(|v| v.kind.as_ref()) {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(region))
            if !region.is_empty() =>
        {
            Ok(Some(region.as_str().into()))
        }
        _ => Err(format!(
            "metadata {}: needs a non-empty string `region`",
            names::LOCALITY_METADATA
        )),
    }
}

/// Plugins of a listener by HTTP filter name (`None` in a check: decoded, not loaded).
type PluginFilters = BTreeMap<String, Option<Arc<LoadedPlugin>>>;

impl Compiler<'_> {
    /// Compiles a resource set into a snapshot.
    pub fn compile(
        &self,
        bootstrap: &Bootstrap,
        resources: &ResourceSet,
    ) -> Result<Snapshot, CompileError> {
        self.metrics.begin_generation();
        let mut clusters = BTreeMap::new();
        for xds in &resources.clusters {
            if clusters.contains_key(&xds.name) {
                return Err(err("Cluster", &xds.name, "name is used twice"));
            }
            let local_region = bootstrap
                .node
                .as_ref()
                .and_then(|n| n.locality.as_ref())
                .map_or("", |l| l.region.as_str());
            let cluster = self
                .cluster(xds, &resources.endpoints)?
                .with_local_region(local_region);
            clusters.insert(xds.name.clone(), Arc::new(cluster));
        }
        let listener = served_listener(resources)?;
        let (listener_spec, hcm) = listener_spec(listener, self.prepared)?;
        let downstream = downstream::downstream_limits(listener, &hcm)
            .map_err(|m| err("Listener", &listener.name, m))?;
        let route_config = match &hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => resources
                .routes
                .iter()
                .find(|r| r.name == rds.route_config_name)
                .ok_or_else(|| {
                    err(
                        "Listener",
                        &listener.name,
                        format!(
                            "rds.route_config_name {:?} is not among the route configurations",
                            rds.route_config_name
                        ),
                    )
                })?,
            Some(http_connection_manager::RouteSpecifier::RouteConfig(inline)) => inline,
            _ => {
                return Err(err(
                    "Listener",
                    &listener.name,
                    "http_connection_manager needs rds or route_config",
                ))
            }
        };
        let plugins = &self.prepared.plugins;
        let router = self.router(route_config, &clusters, plugins)?;
        let access_log = self.access_log(&listener.name, &hcm.access_log)?;
        let plugins = plugins
            .iter()
            .filter_map(|(name, plugin)| Some((name.clone(), Arc::clone(plugin.as_ref()?))))
            .collect();
        let unrouted = self.metrics.request_counters("", "");
        self.metrics.commit_generation();
        Ok(Snapshot {
            version: resources.version.clone(),
            resources: resources.clone(),
            bootstrap: bootstrap.clone(),
            listener: listener_spec,
            downstream,
            router,
            clusters,
            access_log,
            unrouted,
            plugins,
        })
    }

    fn cluster(
        &self,
        xds: &XdsCluster,
        assignments: &[ClusterLoadAssignment],
    ) -> Result<Cluster, CompileError> {
        let name = xds.name.as_str();
        let fail = |m: String| err("Cluster", name, m);
        let discovery = match &xds.cluster_discovery_type {
            Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(*t)
                .map_err(|_| fail(format!("type {t} is unknown")))?,
            Some(cluster::ClusterDiscoveryType::ClusterType(_)) => {
                return Err(fail(
                    "cluster_type (custom cluster) is not supported".into(),
                ))
            }
            None => cluster::DiscoveryType::Static,
        };
        let assignment = match discovery {
            cluster::DiscoveryType::Eds => {
                let service_name = xds
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.as_str())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(name);
                assignments.iter().find(|a| a.cluster_name == service_name)
            }
            cluster::DiscoveryType::Static | cluster::DiscoveryType::StrictDns => {
                xds.load_assignment.as_ref()
            }
            other => {
                return Err(fail(format!(
                    "type {} is not supported (use EDS, STATIC or STRICT_DNS)",
                    other.as_str_name()
                )))
            }
        };
        let lb = match load_balancing_policy(xds).map_err(fail)? {
            Some(policy) => policy,
            None => legacy_lb_policy(xds).map_err(fail)?,
        };
        let connect_timeout = match &xds.connect_timeout {
            Some(d) => duration(d).ok_or_else(|| fail("connect_timeout is negative".into()))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        if connect_timeout.is_zero() {
            return Err(fail("connect_timeout must be more than 0".into()));
        }
        let health_check = match xds.health_checks.as_slice() {
            [] => None,
            [hc] => Some(health_check_spec(hc).map_err(fail)?),
            _ => {
                return Err(fail(
                    "only one health check per cluster is supported".into(),
                ))
            }
        };
        let http2 = upstream_http2(xds).map_err(fail)?;
        let endpoints = match assignment {
            Some(cla) => self.endpoints(name, cla)?,
            None => Vec::new(),
        };
        let outlier = xds
            .outlier_detection
            .as_ref()
            .map(|od| outlier_config(od, xds))
            .transpose()
            .map_err(fail)?;
        let breakers = circuit_breakers(xds).map_err(fail)?;
        let adaptive = adaptive_concurrency(xds)
            .map_err(fail)?
            .map(|(config, status)| AdaptiveConcurrency {
                controller: self.registry.concurrency_controller(name, config),
                status,
            });
        Ok(Cluster::new(
            name.into(),
            lb,
            http2,
            connect_timeout,
            endpoints,
            health_check,
            self.metrics.cluster_stats(name),
        )
        .with_outlier_detection(outlier)
        .with_circuit_breakers(breakers)
        // HTTP/2 carries many requests per connection; max_requests limits those.
        .with_connection_slots((!http2).then(|| {
            self.registry.connection_slots(
                name,
                breakers.max_connections,
                breakers.max_pending_requests,
            )
        }))
        .with_adaptive_concurrency(adaptive)
        .with_ring(ring_size(xds).map_err(fail)?)
        .with_locality_weights(matches!(
            xds.common_lb_config
                .as_ref()
                .and_then(|c| c.locality_config_specifier.as_ref()),
            Some(cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        )))
    }

    fn endpoints(
        &self,
        cluster: &str,
        cla: &ClusterLoadAssignment,
    ) -> Result<Vec<Endpoint>, CompileError> {
        let mut endpoints = Vec::new();
        for (li, locality_endpoints) in cla.endpoints.iter().enumerate() {
            let locality = locality_endpoints
                .locality
                .as_ref()
                .map(|l| Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    sub_zone: l.sub_zone.clone(),
                })
                .unwrap_or_default();
            for (ei, lb_endpoint) in locality_endpoints.lb_endpoints.iter().enumerate() {
                let field = format!("endpoints[{li}].lb_endpoints[{ei}]");
                let fail = |m: String| {
                    err(
                        "ClusterLoadAssignment",
                        &cla.cluster_name,
                        format!("{field}: {m}"),
                    )
                };
                let (address, hostname) = match &lb_endpoint.host_identifier {
                    Some(lb_endpoint::HostIdentifier::Endpoint(e)) => (
                        e.address
                            .as_ref()
                            .ok_or_else(|| fail("endpoint.address is missing".into()))?,
                        e.hostname.as_str(),
                    ),
                    _ => return Err(fail("only endpoint addresses are supported".into())),
                };
                let hostname = match (hostname, &address.address) {
                    ("", Some(address::Address::SocketAddress(sa)))
                        if sa.address.parse::<std::net::IpAddr>().is_err() =>
                    {
                        Some(sa.address.as_str().into())
                    }
                    ("", _) => None,
                    (name, _) => Some(name.into()),
                };
                let address = socket_addr(address, self.prepared).map_err(fail)?;
                if endpoints.iter().any(|e: &Endpoint| e.address == address) {
                    return Err(fail(format!("{address} is listed twice")));
                }
                let weight = lb_endpoint
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value);
                if weight == 0 {
                    return Err(fail("load_balancing_weight must be at least 1".into()));
                }
                endpoints.push(Endpoint {
                    address,
                    locality: locality.clone(),
                    weight,
                    priority: locality_endpoints.priority,
                    locality_weight: locality_endpoints
                        .load_balancing_weight
                        .as_ref()
                        .map_or(1, |w| w.value.max(1)),
                    state: self.registry.state(cluster, address),
                    hostname,
                    locality_picks: self.metrics.locality_picks(
                        cluster,
                        &locality.region,
                        &locality.zone,
                        &locality.sub_zone,
                    ),
                });
            }
        }
        Ok(endpoints)
    }

    /// Loads every plugin filter of the listener (compile + canary).
    fn router(
        &self,
        config: &RouteConfiguration,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        plugins: &PluginFilters,
    ) -> Result<Router, CompileError> {
        let name = config.name.as_str();
        let fail = |field: String| {
            move |m: String| err("RouteConfiguration", name, format!("{field}: {m}"))
        };
        let config_edits = (
            header_edits(
                &config.request_headers_to_add,
                &config.request_headers_to_remove,
            )
            .map_err(fail("request_headers_to_add".into()))?,
            header_edits(
                &config.response_headers_to_add,
                &config.response_headers_to_remove,
            )
            .map_err(fail("response_headers_to_add".into()))?,
        );
        let body_limit = match config.max_direct_response_body_size_bytes.as_ref() {
            Some(limit) => usize::try_from(limit.value).unwrap_or(usize::MAX),
            None => DEFAULT_DIRECT_RESPONSE_BODY_LIMIT,
        };
        let mut builder = RouterBuilder::default();
        // Routes shared by several virtual hosts (hostless routes) compile once per name.
        let mut compiled: BTreeMap<Vec<u8>, Arc<Route>> = BTreeMap::new();
        for (vi, vhost) in config.virtual_hosts.iter().enumerate() {
            let vhost_field = format!("virtual_hosts[{vi}]");
            let outer = (
                header_edits(
                    &vhost.request_headers_to_add,
                    &vhost.request_headers_to_remove,
                )
                .map_err(fail(format!("{vhost_field}.request_headers_to_add")))?
                .then(&config_edits.0),
                header_edits(
                    &vhost.response_headers_to_add,
                    &vhost.response_headers_to_remove,
                )
                .map_err(fail(format!("{vhost_field}.response_headers_to_add")))?
                .then(&config_edits.1),
            );
            // A route shared by virtual hosts compiles once per set of outer header edits.
            let vhost_headers = envoy_types::pb::envoy::config::route::v3::VirtualHost {
                request_headers_to_add: vhost.request_headers_to_add.clone(),
                request_headers_to_remove: vhost.request_headers_to_remove.clone(),
                response_headers_to_add: vhost.response_headers_to_add.clone(),
                response_headers_to_remove: vhost.response_headers_to_remove.clone(),
                ..Default::default()
            }
            .encode_to_vec();
            let mut routes = Vec::with_capacity(vhost.routes.len());
            for (ri, xds_route) in vhost.routes.iter().enumerate() {
                let mut key = xds_route.encode_to_vec();
                key.extend_from_slice(&vhost_headers);
                if let Some(route) = compiled.get(&key) {
                    routes.push(Arc::clone(route));
                    continue;
                }
                let field = format!("virtual_hosts[{vi}].routes[{ri}]");
                let route = self
                    .route(xds_route, clusters, plugins, &outer, body_limit)
                    .map_err(|m| err("RouteConfiguration", name, format!("{field}: {m}")))?;
                let route = Arc::new(route);
                compiled.insert(key, Arc::clone(&route));
                routes.push(route);
            }
            builder
                .add(
                    &vhost.domains,
                    VirtualHost {
                        name: vhost.name.clone(),
                        routes,
                    },
                )
                .map_err(|m| {
                    err(
                        "RouteConfiguration",
                        name,
                        format!("virtual_hosts[{vi}].domains: {m}"),
                    )
                })?;
        }
        Ok(builder.build())
    }

    fn route(
        &self,
        xds: &envoy_types::pb::envoy::config::route::v3::Route,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        plugins: &PluginFilters,
        outer: &(HeaderEdits, HeaderEdits),
        body_limit: usize,
    ) -> Result<Route, String> {
        let route_name: Arc<str> = xds.name.as_str().into();
        let matcher = xds.r#match.as_ref().ok_or("match is missing")?;
        let path = match &matcher.path_specifier {
            Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
            Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
            Some(route_match::PathSpecifier::SafeRegex(r)) => PathMatch::Regex(
                full_match_regex(&r.regex).map_err(|e| format!("match.safe_regex: {e}"))?,
            ),
            Some(_) => return Err("match: only prefix, path and safe_regex are supported".into()),
            None => return Err("match needs a path specifier".into()),
        };
        if matcher.case_sensitive.as_ref().is_some_and(|c| !c.value) {
            return Err("match.case_sensitive=false is not supported".into());
        }
        let headers = matcher
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| header_match(h).map_err(|e| format!("match.headers[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let request_headers =
            header_edits(&xds.request_headers_to_add, &xds.request_headers_to_remove)
                .map_err(|e| format!("request_headers_to_add: {e}"))?
                .then(&outer.0);
        let response_headers = header_edits(
            &xds.response_headers_to_add,
            &xds.response_headers_to_remove,
        )
        .map_err(|e| format!("response_headers_to_add: {e}"))?
        .then(&outer.1);
        let action = match &xds.action {
            Some(route::Action::Route(action)) => action,
            Some(route::Action::Redirect(redirect)) => {
                let local =
                    redirect_action(redirect, &path).map_err(|e| format!("redirect.{e}"))?;
                return Ok(self.local_route(
                    route_name,
                    RouteMatch { path, headers },
                    local,
                    response_headers,
                ));
            }
            Some(route::Action::DirectResponse(direct)) => {
                let local = direct_response(direct, body_limit)
                    .map_err(|e| format!("direct_response.{e}"))?;
                return Ok(self.local_route(
                    route_name,
                    RouteMatch { path, headers },
                    local,
                    response_headers,
                ));
            }
            _ => {
                return Err("only route, redirect and direct_response actions are supported".into())
            }
        };
        let edits = RouteEdits {
            request_headers,
            response_headers,
            path: path_rewrite(action, &path)?,
            host: match &action.host_rewrite_specifier {
                None => None,
                Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(host)) => {
                    <http::uri::Authority as std::str::FromStr>::from_str(host).map_err(|_| {
                        format!("route.host_rewrite_literal: {host:?} is not a host")
                    })?;
                    Some(HostRewrite::Literal(host.clone()))
                }
                Some(route_action::HostRewriteSpecifier::AutoHostRewrite(on)) => {
                    on.value.then_some(HostRewrite::Auto)
                }
                Some(_) => {
                    return Err(
                        "route: only host_rewrite_literal and auto_host_rewrite are supported"
                            .into(),
                    )
                }
            },
        };
        let target = |cluster_name: &str, weight: u32| Target {
            cluster_name: cluster_name.into(),
            cluster: clusters.get(cluster_name).cloned(),
            weight,
            counters: self.metrics.request_counters(&route_name, cluster_name),
        };
        let targets = match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(name)) => vec![target(name, 1)],
            Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) => {
                if weighted.clusters.is_empty() {
                    return Err("route.weighted_clusters is empty".into());
                }
                weighted
                    .clusters
                    .iter()
                    .map(|c| target(&c.name, c.weight.as_ref().map_or(0, |w| w.value)))
                    .collect()
            }
            _ => return Err("route needs cluster or weighted_clusters".into()),
        };
        let timeout = match &action.timeout {
            Some(d) => duration(d).ok_or("route.timeout is negative")?,
            None => DEFAULT_ROUTE_TIMEOUT,
        };
        let retry = match &action.retry_policy {
            Some(policy) => retry_policy(policy).map_err(|e| format!("route.retry_policy.{e}"))?,
            None => RetryPolicy::default(),
        };
        let idle_timeout = action
            .idle_timeout
            .as_ref()
            .map(|d| duration(d).ok_or("route.idle_timeout is negative"))
            .transpose()?
            .filter(|d| !d.is_zero());
        Ok(Route::new(
            Arc::clone(&route_name),
            RouteMatch { path, headers },
            targets,
            timeout,
            retry,
            self.metrics.route_stats(&route_name),
            route_plugins(xds, plugins)?,
        )
        .with_idle_timeout(idle_timeout)
        .with_edits(edits)
        .with_locality(route_locality(xds)?)
        .with_hash_policy(hash_policy(action)?))
    }

    fn access_log(
        &self,
        listener: &str,
        logs: &[AccessLog],
    ) -> Result<Option<Arc<AccessLogger>>, CompileError> {
        let fail = |m: String| err("Listener", listener, format!("access_log: {m}"));
        let Some(log) = logs.first() else {
            return Ok(None);
        };
        if logs.len() > 1 {
            return Err(fail("only one access log is supported".into()));
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
            return Err(fail("typed_config is missing".into()));
        };
        let (sink, format) = if any.type_url == StdoutAccessLog::type_url() {
            let stdout: StdoutAccessLog = decode(any).map_err(fail)?;
            let format = match stdout.access_log_format {
                Some(stdout_access_log::AccessLogFormat::LogFormat(f)) => log_format(&f),
                None => LogFormat::Text,
            };
            (LogSink::Stdout, format)
        } else if any.type_url == FileAccessLog::type_url() {
            let file: FileAccessLog = decode(any).map_err(fail)?;
            let format = match file.access_log_format {
                Some(file_access_log::AccessLogFormat::LogFormat(f)) => log_format(&f),
                Some(_) => return Err(fail("only log_format is supported".into())),
                None => LogFormat::Text,
            };
            let sink = if file.path == "/dev/stdout" {
                LogSink::Stdout
            } else {
                LogSink::File(file.path)
            };
            (sink, format)
        } else {
            return Err(fail(format!("{} is not supported", any.type_url)));
        };
        if let Some(previous) = &self.previous_access_log {
            if previous.is(format, &sink) {
                return Ok(Some(Arc::clone(previous)));
            }
        }
        let logger = AccessLogger::start(
            format,
            sink.clone(),
            self.metrics.access_log_dropped.clone(),
        )
        .map_err(|e| fail(format!("cannot open {sink:?}: {e}")))?;
        Ok(Some(Arc::new(logger)))
    }
}

/// The resource limits of plugin filter `filter` from the listener's `nip.plugin_limits`
/// metadata; defaults for a plugin (or a field) it does not mention.
fn plugin_limits(listener: &Listener, filter: &str) -> Result<ResourceLimits, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut limits = ResourceLimits::default();
    let Some(entry) = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::PLUGIN_LIMITS_METADATA))
        .and_then(|s| s.fields.get(filter))
    else {
        return Ok(limits);
    };
    let Some(Kind::StructValue(fields)) = &entry.kind else {
        return Err(format!("{filter:?} must be a struct"));
    };
    for (key, value) in &fields.fields {
        let Some(Kind::NumberValue(n)) = value.kind else {
            return Err(format!("{filter:?}.{key} must be a number"));
        };
        if !(n.is_finite() && n >= 0.0 && n <= u32::MAX as f64 * 4.0) {
            return Err(format!("{filter:?}.{key} = {n} is out of range"));
        }
        match key.as_str() {
            "memory_bytes" if n >= 65536.0 => limits.instance.memory_bytes = n as usize,
            "cpu_ms" if n >= 1.0 => {
                limits.instance.callback_deadline = Duration::from_millis(n as u64)
            }
            "body_bytes" => limits.max_body_bytes = n as usize,
            "memory_bytes" | "cpu_ms" => {
                return Err(format!("{filter:?}.{key} = {n} is too small"))
            }
            other => return Err(format!("{filter:?}: unknown limit {other:?}")),
        }
    }
    Ok(limits)
}

/// The plugins a route switches on (`typed_per_filter_config` with `disabled: false`), in
/// the order their per-route config (`UInt32Value` position) gives.
fn route_plugins(
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
    plugins: &PluginFilters,
) -> Result<Vec<Arc<LoadedPlugin>>, String> {
    let mut enabled = Vec::new();
    for (filter, any) in &xds.typed_per_filter_config {
        let Some(plugin) = plugins.get(filter) else {
            return Err(format!(
                "typed_per_filter_config names {filter:?}, which is not a plugin filter of the listener"
            ));
        };
        if any.type_url != FilterConfig::type_url() {
            return Err(format!(
                "typed_per_filter_config[{filter:?}] must be a {}",
                FilterConfig::type_url()
            ));
        }
        let config: FilterConfig = decode(any)?;
        if config.disabled {
            continue;
        }
        let position = match &config.config {
            Some(inner) if inner.type_url == UInt32Value::type_url() => {
                decode::<UInt32Value>(inner)?.value
            }
            _ => u32::MAX,
        };
        if let Some(plugin) = plugin {
            enabled.push((position, filter.clone(), Arc::clone(plugin)));
        }
    }
    enabled.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(enabled.into_iter().map(|(_, _, p)| p).collect())
}

fn log_format(format: &SubstitutionFormatString) -> LogFormat {
    match format.format {
        Some(substitution_format_string::Format::JsonFormat(_)) => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// The one listener NIP serves (listeners with `api_listener` are for proxyless gRPC
/// clients, not for a proxy).
fn served_listener(resources: &ResourceSet) -> Result<&Listener, CompileError> {
    let served: Vec<&Listener> = resources
        .listeners
        .iter()
        .filter(|l| l.api_listener.is_none())
        .collect();
    match served.as_slice() {
        [listener] => Ok(listener),
        _ => Err(err(
            "Listener",
            "",
            format!("NIP serves exactly one listener, got {}", served.len()),
        )),
    }
}

/// What a proxy does with each config change: [`prepare`] (load plugins, resolve host
/// names), [`Compiler::compile`], then tell plugins which clusters their callouts may reach
/// (only for a set that compiled: a refused set changes nothing).
pub struct Builder<'a> {
    /// Endpoint state shared across snapshots.
    pub registry: &'a EndpointRegistry,
    /// Metric families.
    pub metrics: &'a Metrics,
    /// The access logger of the previous snapshot, reused when unchanged.
    pub previous_access_log: Option<Arc<AccessLogger>>,
    /// Loads (reads or downloads, compiles, canaries) plugins.
    pub plugins: &'a PluginLoader,
}

impl Builder<'_> {
    /// Prepares and compiles `resources` into a snapshot ready to serve.
    pub fn build(
        &self,
        bootstrap: &Bootstrap,
        resources: &ResourceSet,
    ) -> Result<Snapshot, CompileError> {
        let prepared = prepare(bootstrap, resources, self.plugins)?;
        let snapshot = Compiler {
            registry: self.registry,
            metrics: self.metrics,
            previous_access_log: self.previous_access_log.clone(),
            prepared: &prepared,
        }
        .compile(bootstrap, resources)?;
        self.plugins
            .set_upstreams(snapshot.clusters.keys().cloned());
        Ok(snapshot)
    }
}

/// Runs the proxy's compiler over `resources` without loading plugins, resolving host
/// names or touching any state a proxy serves with: what the control plane's apply and
/// `nip validate` refuse is exactly what a proxy of this version would refuse for reasons
/// in the config itself (a plugin module or a host name a proxy cannot reach is the
/// proxy's to find).
pub fn check(bootstrap: &Bootstrap, resources: &ResourceSet) -> Result<(), CompileError> {
    let prepared = prepare_check(bootstrap, resources)?;
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    Compiler {
        registry: &registry,
        metrics: &metrics,
        previous_access_log: None,
        prepared: &prepared,
    }
    .compile(bootstrap, resources)
    .map(drop)
}

fn listener_spec(
    listener: &Listener,
    prepared: &Prepared,
) -> Result<(ListenerSpec, HttpConnectionManager), CompileError> {
    let name = listener.name.as_str();
    let fail = |m: String| err("Listener", name, m);
    let address = listener
        .address
        .as_ref()
        .ok_or_else(|| fail("address is missing".into()))?;
    let address = socket_addr(address, prepared).map_err(|e| fail(format!("address: {e}")))?;
    let [chain] = listener.filter_chains.as_slice() else {
        return Err(fail("exactly one filter chain is supported".into()));
    };
    let [network_filter] = chain.filters.as_slice() else {
        return Err(fail(
            "the filter chain must hold exactly the http_connection_manager".into(),
        ));
    };
    let Some(filter::ConfigType::TypedConfig(any)) = &network_filter.config_type else {
        return Err(fail(
            "filter_chains[0].filters[0].typed_config is missing".into(),
        ));
    };
    if any.type_url != HttpConnectionManager::type_url() {
        return Err(fail(format!(
            "filter {} is not supported; only {}",
            any.type_url,
            names::HTTP_CONNECTION_MANAGER
        )));
    }
    let hcm: HttpConnectionManager = decode(any).map_err(&fail)?;
    for (i, http) in hcm.http_filters.iter().enumerate() {
        let last = i + 1 == hcm.http_filters.len();
        let type_url = match &http.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
            _ => "",
        };
        let is_router = http.name == names::ROUTER || type_url.ends_with(".router.v3.Router");
        if last != is_router {
            return Err(fail(format!(
                "http_filters[{i}] {:?}: the router must be the last filter, and only there",
                http.name
            )));
        }
        if !is_router && type_url != Wasm::type_url() {
            return Err(fail(format!(
                "http_filters[{i}] {:?}: {type_url:?} is not supported (NIP runs {} plugins and the router)",
                http.name,
                Wasm::type_url()
            )));
        }
    }
    let codec = http_connection_manager::CodecType::try_from(hcm.codec_type)
        .unwrap_or(http_connection_manager::CodecType::Auto);
    let tls = match &chain.transport_socket {
        None => None,
        Some(socket) => {
            let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
                return Err(fail("transport_socket.typed_config is missing".into()));
            };
            if any.type_url != DownstreamTlsContext::type_url() {
                return Err(fail(format!(
                    "transport socket {} is not supported",
                    any.type_url
                )));
            }
            let tls: DownstreamTlsContext = decode(any).map_err(&fail)?;
            let cert = tls
                .common_tls_context
                .as_ref()
                .and_then(|c| c.tls_certificates.first())
                .ok_or_else(|| fail("tls: common_tls_context.tls_certificates is empty".into()))?;
            let file = |source: &Option<DataSource>, field: &str| match source
                .as_ref()
                .and_then(|s| s.specifier.as_ref())
            {
                Some(data_source::Specifier::Filename(f)) => Ok(f.clone()),
                _ => Err(fail(format!("tls: {field} must be a filename"))),
            };
            Some(TlsFiles {
                cert_file: file(&cert.certificate_chain, "certificate_chain")?,
                key_file: file(&cert.private_key, "private_key")?,
            })
        }
    };
    let spec = ListenerSpec {
        address,
        h2c: tls.is_none() && codec != http_connection_manager::CodecType::Http1,
        tls,
    };
    Ok((spec, hcm))
}

fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch, String> {
    let is_method = h.name == ":method";
    let name = if is_method {
        HeaderName::from_static("x-nip-method")
    } else {
        HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("name {:?} is not a valid header name", h.name))?
    };
    let value = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(present)) => {
            if !present {
                // present_match: false means "absent"; express it as inverted presence.
                return Ok(HeaderMatch {
                    name,
                    is_method,
                    value: HeaderValueMatch::Present,
                    invert: !h.invert_match,
                });
            }
            HeaderValueMatch::Present
        }
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => {
            if sm.ignore_case {
                return Err("string_match.ignore_case is not supported".into());
            }
            match &sm.match_pattern {
                Some(string_matcher::MatchPattern::Exact(v)) => HeaderValueMatch::Exact(v.clone()),
                Some(string_matcher::MatchPattern::Prefix(v)) => {
                    HeaderValueMatch::Prefix(v.clone())
                }
                Some(string_matcher::MatchPattern::Suffix(v)) => HeaderValueMatch::Regex(
                    full_match_regex(&format!(".*{}", regex::escape(v)))
                        .map_err(|e| e.to_string())?,
                ),
                Some(string_matcher::MatchPattern::Contains(v)) => HeaderValueMatch::Regex(
                    full_match_regex(&format!(".*{}.*", regex::escape(v)))
                        .map_err(|e| e.to_string())?,
                ),
                Some(string_matcher::MatchPattern::SafeRegex(r)) => HeaderValueMatch::Regex(
                    full_match_regex(&r.regex).map_err(|e| format!("safe_regex: {e}"))?,
                ),
                _ => return Err("string_match pattern is not supported".into()),
            }
        }
        None => HeaderValueMatch::Present,
        Some(_) => {
            return Err("only string_match and present_match are supported".into());
        }
    };
    Ok(HeaderMatch {
        name,
        is_method,
        value,
        invert: h.invert_match,
    })
}

/// Envoy regexes must match the whole input.
/// Envoy's default `max_direct_response_body_size_bytes`.
const DEFAULT_DIRECT_RESPONSE_BODY_LIMIT: usize = 4096;

impl Compiler<'_> {
    /// A route that answers by itself.
    fn local_route(
        &self,
        name: Arc<str>,
        matcher: RouteMatch,
        local: LocalAction,
        response_headers: HeaderEdits,
    ) -> Route {
        Route::new(
            Arc::clone(&name),
            matcher,
            Vec::new(),
            Duration::ZERO,
            RetryPolicy::default(),
            self.metrics.route_stats(&name),
            Vec::new(),
        )
        .with_edits(RouteEdits {
            response_headers,
            ..RouteEdits::default()
        })
        .with_local_action(Some(local))
    }
}

/// Header edits from Envoy's `*_headers_to_add` and `*_headers_to_remove` of one level.
fn header_edits(add: &[HeaderValueOption], remove: &[String]) -> Result<HeaderEdits, String> {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    let name_of = |name: &str, field: &str| {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{field}: {name:?} is not a header name"))?;
        if name.starts_with(':') || header == http::header::HOST {
            return Err(format!(
                "{field}: {name:?} cannot be edited (use the route's host rewrite)"
            ));
        }
        Ok(header)
    };
    let mut edits = HeaderEdits::default();
    for (i, option) in add.iter().enumerate() {
        let field = format!("[{i}]");
        let header = option
            .header
            .as_ref()
            .ok_or(format!("{field}.header is missing"))?;
        let name = name_of(&header.key, &format!("{field}.header.key"))?;
        let text = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8(header.raw_value.clone())
                .map_err(|_| format!("{field}.header.raw_value is not UTF-8"))?
        };
        let value =
            ValueTemplate::parse(&text).map_err(|e| format!("{field}.header.value: {e}"))?;
        if let Some(literal) = value.literal() {
            http::HeaderValue::from_str(literal)
                .map_err(|_| format!("{field}.header.value: {literal:?} is not a header value"))?;
        }
        #[allow(deprecated)]
        let action = match (
            option.append.as_ref(),
            HeaderAppendAction::try_from(option.append_action),
        ) {
            (Some(append), _) if option.append_action == 0 => {
                if append.value {
                    AppendAction::Append
                } else {
                    AppendAction::Overwrite
                }
            }
            (Some(_), _) => {
                return Err(format!(
                    "{field}: append and append_action cannot both be set"
                ))
            }
            (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => AppendAction::Append,
            (None, Ok(HeaderAppendAction::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => AppendAction::Overwrite,
            (None, Ok(HeaderAppendAction::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => {
                return Err(format!(
                    "{field}.append_action {} is unknown",
                    option.append_action
                ))
            }
        };
        edits.add.push(HeaderAdd {
            name,
            value,
            action,
            keep_empty_value: option.keep_empty_value,
        });
    }
    for (i, name) in remove.iter().enumerate() {
        edits.remove.push(name_of(name, &format!("(remove)[{i}]"))?);
    }
    Ok(edits)
}

/// The forwarded path's rewrite (`prefix_rewrite` or `regex_rewrite`).
fn path_rewrite(action: &RouteAction, path: &PathMatch) -> Result<Option<PathRewrite>, String> {
    match (action.prefix_rewrite.is_empty(), &action.regex_rewrite) {
        (true, None) => Ok(None),
        (false, Some(_)) => {
            Err("route: prefix_rewrite and regex_rewrite exclude each other".into())
        }
        (false, None) => prefix_rewrite(&action.prefix_rewrite, path)
            .map(Some)
            .map_err(|e| format!("route.prefix_rewrite: {e}")),
        (true, Some(rewrite)) => regex_rewrite(rewrite)
            .map(Some)
            .map_err(|e| format!("route.regex_rewrite: {e}")),
    }
}

fn prefix_rewrite(replacement: &str, path: &PathMatch) -> Result<PathRewrite, String> {
    let matched = match path {
        PathMatch::Prefix(prefix) | PathMatch::Exact(prefix) => prefix.clone(),
        PathMatch::Regex(_) => return Err("needs a prefix or path match, not a regex".into()),
    };
    Ok(PathRewrite::Prefix {
        matched,
        replacement: replacement.to_string(),
    })
}

fn regex_rewrite(
    rewrite: &envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute,
) -> Result<PathRewrite, String> {
    let pattern = rewrite.pattern.as_ref().ok_or("pattern is missing")?;
    let regex = Regex::new(&pattern.regex).map_err(|e| {
        format!(
            "pattern.regex: {}",
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })?;
    Ok(PathRewrite::Regex {
        pattern: regex,
        substitution: crate::route::actions::envoy_substitution(&rewrite.substitution),
    })
}

/// A `RedirectAction`; errors name the field under `redirect`.
fn redirect_action(redirect: &RedirectAction, path: &PathMatch) -> Result<LocalAction, String> {
    use envoy_types::pb::envoy::config::route::v3::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
    };
    let scheme = match &redirect.scheme_rewrite_specifier {
        None => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(https)) => https.then(|| "https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(scheme)) => match scheme.as_str() {
            "http" | "https" => Some(scheme.clone()),
            other => return Err(format!("scheme_redirect: {other:?} is not http or https")),
        },
    };
    if !redirect.host_redirect.is_empty() {
        <http::uri::Authority as std::str::FromStr>::from_str(&redirect.host_redirect)
            .map_err(|_| format!("host_redirect: {:?} is not a host", redirect.host_redirect))?;
    }
    let port = u16::try_from(redirect.port_redirect)
        .map_err(|_| format!("port_redirect: {} is not a port", redirect.port_redirect))?;
    let path = match &redirect.path_rewrite_specifier {
        None => None,
        Some(PathRewriteSpecifier::PathRedirect(to)) => {
            if !to.starts_with('/') {
                return Err(format!("path_redirect: {to:?} must start with /"));
            }
            Some(RedirectPath::Replace(to.clone()))
        }
        Some(PathRewriteSpecifier::PrefixRewrite(to)) => Some(RedirectPath::Rewrite(
            prefix_rewrite(to, path).map_err(|e| format!("prefix_rewrite: {e}"))?,
        )),
        Some(PathRewriteSpecifier::RegexRewrite(rewrite)) => Some(RedirectPath::Rewrite(
            regex_rewrite(rewrite).map_err(|e| format!("regex_rewrite: {e}"))?,
        )),
        Some(PathRewriteSpecifier::PathRewrite(_)) => {
            return Err("path_rewrite (a path template) is not supported".into())
        }
    };
    let status = match RedirectResponseCode::try_from(redirect.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => 301,
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => {
            return Err(format!(
                "response_code {} is unknown",
                redirect.response_code
            ))
        }
    };
    Ok(LocalAction::Redirect(Redirect {
        scheme,
        host: (!redirect.host_redirect.is_empty()).then(|| redirect.host_redirect.clone()),
        port,
        path,
        status,
        strip_query: redirect.strip_query,
    }))
}

/// A `DirectResponseAction` (inline bodies, at most `limit` bytes).
fn direct_response(direct: &DirectResponseAction, limit: usize) -> Result<LocalAction, String> {
    let status = u16::try_from(direct.status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .ok_or(format!("status: {} must be 200–599", direct.status))?;
    if direct.body_format.is_some() {
        return Err("body_format is not supported".into());
    }
    let body = match direct.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => Vec::new(),
        Some(data_source::Specifier::InlineString(text)) => text.clone().into_bytes(),
        Some(data_source::Specifier::InlineBytes(bytes)) => bytes.clone(),
        Some(_) => return Err("body: only inline_string and inline_bytes are supported".into()),
    };
    if body.len() > limit {
        return Err(format!(
            "body: {} bytes is more than max_direct_response_body_size_bytes ({limit})",
            body.len()
        ));
    }
    Ok(LocalAction::DirectResponse {
        status,
        body: bytes::Bytes::from(body),
    })
}

fn full_match_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        format!(
            "invalid regex: {}",
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

fn duration(d: &PbDuration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

fn decode<M: Message + Default + Name>(any: &Any) -> Result<M, String> {
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", any.type_url))
}

/// The port of an xDS socket address.
fn port_of(sa: &SocketAddress) -> Result<u16, String> {
    match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} is out of range"))
        }
        _ => Err("socket_address.port_value is missing".into()),
    }
}

/// An xDS socket address: an IP as written, a host name as [`prepare`] resolved it.
fn socket_addr(address: &Address, prepared: &Prepared) -> Result<SocketAddr, String> {
    let Some(address::Address::SocketAddress(sa)) = &address.address else {
        return Err("only socket_address is supported".into());
    };
    prepared.address(&sa.address, port_of(sa)?)
}

/// An xDS socket address resolved now (the admin address, at start-up).
fn resolve_now(address: &Address) -> Result<SocketAddr, String> {
    let Some(address::Address::SocketAddress(sa)) = &address.address else {
        return Err("only socket_address is supported".into());
    };
    let port = port_of(sa)?;
    if let Ok(ip) = sa.address.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (sa.address.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {:?}: {e}", sa.address))?
        .next()
        .ok_or_else(|| format!("{:?} resolves to no address", sa.address))
}

mod cluster_policies;
mod downstream;
mod prepare;

pub use prepare::{prepare, prepare_check, Prepared};

#[cfg(test)]
mod tests;
