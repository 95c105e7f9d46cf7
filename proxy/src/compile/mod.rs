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
//! One file per resource type: `listeners.rs` (Listener, connection manager, plugin limits,
//! access log, TLS), `routes.rs` (RouteConfiguration), `clusters.rs` and
//! `cluster_policies.rs` (Cluster, ClusterLoadAssignment), `downstream.rs` (client limits);
//! `coverage.rs` refuses fields NIP does not implement, `prepare.rs` gathers plugins and
//! addresses.
//!
//! [`Compiler::compile`] checks each resource, decodes the typed extensions NIP supports,
//! resolves names into `Arc`s (routes point straight at clusters, clusters at endpoint
//! state) and returns a [`Snapshot`]. Any unsupported or broken field is an error naming the
//! resource, so the caller can keep the previous snapshot (and, over xDS, NACK). Because
//! [`check`] runs the same compile, the control plane refuses at apply what a proxy of this
//! version would refuse for reasons in the config itself.

use crate::downstream::limits::DownstreamLimits;
use crate::listener::HttpManager;
use crate::matchers::{Cidr, HeaderMatch, HeaderValueMatch, PathMatch, RouteMatch, StringMatch};
use crate::plugins::{LoadedPlugin, PluginLoader, ResourceLimits};
use crate::route::{
    AppendAction, HashPolicy, HashSource, HeaderAdd, HeaderEdits, HostRewrite, LocalAction,
    PathRewrite, Redirect, RedirectPath, RetryPolicy, Route, RouteEdits, Router, RouterBuilder,
    Target, Tenant, ValueTemplate, VirtualHost,
};
use crate::telemetry::access_log::{AccessLogger, LogFormat, LogSink};
use crate::telemetry::metrics::Metrics;
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
    SocketAddress, SubstitutionFormatString,
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
use policy::ManagerPolicy;
use prost::{Message, Name};
use regex::Regex;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

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

/// Everything a request needs, compiled from one config version.
#[derive(Debug)]
pub struct Snapshot {
    /// Config version.
    pub version: String,
    /// The resources this was compiled from (`/config_dump`).
    pub resources: ResourceSet,
    /// Node identity and admin address.
    pub bootstrap: Bootstrap,
    /// The listeners: addresses, listener filters, filter chains.
    pub listeners: Arc<crate::listener::Listeners>,
    /// The HTTP side of the listeners: TLS and h2c.
    pub http: HttpListening,
    /// The listeners' connection managers (at least one: an empty one when no chain
    /// speaks HTTP), each with its routes, client limits and access log.
    pub http_managers: Vec<Arc<HttpManager>>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Plugins of the listener by filter name.
    pub plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// The roots the listener verifies client certificates with, read from a file or an
    /// SDS secret (`None` in a check, or without client verification).
    pub listener_client_roots: Option<crate::downstream::tls::ClientRoots>,
}

impl Snapshot {
    /// The access loggers in use (a reload reuses those it still needs).
    pub fn access_loggers(&self) -> Vec<Arc<AccessLogger>> {
        self.http_managers
            .iter()
            .filter_map(|m| m.access_log.clone())
            .collect()
    }

    /// Every remote JWKS the connection managers' jwt_authn filters use (the control
    /// thread keeps them fetched).
    pub fn remote_jwks(&self) -> Vec<Arc<crate::policy::jwt::keys::RemoteJwks>> {
        let mut remotes: Vec<Arc<crate::policy::jwt::keys::RemoteJwks>> = Vec::new();
        for manager in &self.http_managers {
            for filter in &manager.policy {
                if let crate::policy::PolicyFilter::Jwt(authn) = filter {
                    for remote in &authn.remotes {
                        if !remotes.iter().any(|r| Arc::ptr_eq(r, remote)) {
                            remotes.push(Arc::clone(remote));
                        }
                    }
                }
            }
        }
        remotes
    }

    /// The first connection manager: what a request on a connection no chain bound
    /// uses, and whose limits the process starts pingora's HTTP/2 with.
    pub fn primary_http(&self) -> &Arc<HttpManager> {
        // Compile always leaves one.
        &self.http_managers[0]
    }

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
    /// The access loggers of the previous snapshot, reused when unchanged.
    pub previous_access_logs: Vec<Arc<AccessLogger>>,
    /// The proxy's workload identity: the SDS secret `default` (none in a check, or
    /// without a control plane's CA).
    pub identity: Option<&'a Arc<crate::identity::WorkloadIdentity>>,
}

impl Compiler<'_> {
    /// Compiles one connection manager (first met in `listener`): routes, client limits,
    /// access log.
    fn http_manager(
        &self,
        listener: &Listener,
        hcm: &HttpConnectionManager,
        resources: &ResourceSet,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        prepared: &Prepared,
    ) -> Result<HttpManager, CompileError> {
        let fail = |m: String| err("Listener", &listener.name, m);
        let downstream = downstream::downstream_limits(listener, hcm).map_err(fail)?;
        let route_config = match &hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => resources
                .routes
                .iter()
                .find(|r| r.name == rds.route_config_name)
                .ok_or_else(|| {
                    fail(format!(
                        "rds.route_config_name {:?} is not among the route configurations",
                        rds.route_config_name
                    ))
                })?,
            Some(http_connection_manager::RouteSpecifier::RouteConfig(inline)) => inline,
            _ => {
                return Err(fail(
                    "http_connection_manager needs rds or route_config".into(),
                ))
            }
        };
        let policy = self.manager_policy(hcm, clusters).map_err(fail)?;
        let router = self.router(route_config, clusters, &prepared.plugins, &policy)?;
        let retention = access_log_retention(listener).map_err(fail)?;
        let access_log = self.access_log(&listener.name, &hcm.access_log, retention)?;
        let tracing = self
            .tracing(listener, hcm.tracing.as_ref(), clusters)
            .map_err(fail)?;
        let codec = http_connection_manager::CodecType::try_from(hcm.codec_type)
            .unwrap_or(http_connection_manager::CodecType::Auto);
        let mut allow_connect = false;
        for (i, upgrade) in hcm.upgrade_configs.iter().enumerate() {
            let enabled = upgrade.enabled.as_ref().is_none_or(|e| e.value);
            if upgrade
                .upgrade_type
                .eq_ignore_ascii_case(nip_xds::resources::CONNECT_UPGRADE)
            {
                allow_connect |= enabled;
            } else if !upgrade.upgrade_type.eq_ignore_ascii_case("websocket") {
                return Err(fail(format!(
                    "http_connection_manager.upgrade_configs[{i}]: upgrade type {:?} is not supported (CONNECT, websocket)",
                    upgrade.upgrade_type
                )));
            }
        }
        Ok(HttpManager {
            stat_prefix: hcm.stat_prefix.clone(),
            downstream,
            router,
            access_log,
            unrouted: self.metrics.request_counters("", ""),
            h2c: codec != http_connection_manager::CodecType::Http1,
            allow_connect,
            policy: policy.filters,
            tracing,
        })
    }

    /// Prepares (loads plugins, resolves host names) and compiles `resources` into a
    /// snapshot ready to serve; the plugins' callable upstreams follow the new clusters.
    pub fn build(
        &self,
        plugins: &PluginLoader,
        bootstrap: &Bootstrap,
        resources: &ResourceSet,
    ) -> Result<Snapshot, CompileError> {
        let prepared = prepare(bootstrap, resources, plugins, self.identity)?;
        let snapshot = self.compile(&prepared, bootstrap, resources)?;
        plugins.set_upstreams(snapshot.clusters.keys().cloned());
        Ok(snapshot)
    }

    /// Compiles a resource set into a snapshot, with the plugins and host addresses
    /// gathered beforehand ([`prepare`], [`prepare_check`]): pure, no I/O.
    pub fn compile(
        &self,
        prepared: &Prepared,
        bootstrap: &Bootstrap,
        resources: &ResourceSet,
    ) -> Result<Snapshot, CompileError> {
        refuse_unimplemented_fields(resources)?;
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
                .cluster(xds, &resources.endpoints, prepared)?
                .with_local_region(local_region);
            clusters.insert(xds.name.clone(), Arc::new(cluster));
        }
        // The listeners of this proxy's role (all of them in a check).
        let role = nip_xds::resources::node_role(bootstrap);
        let side = http_side(resources, role)?;
        let mut managers = Vec::new();
        for (listener, hcm) in &side.managers {
            let manager = self.http_manager(listener, hcm, resources, &clusters, prepared)?;
            managers.push(Arc::new(manager));
        }
        let fallback_limits = managers
            .first()
            .map_or_else(DownstreamLimits::default, |m| m.downstream.clone());
        let listeners = self.listeners(
            resources,
            prepared,
            &clusters,
            &HttpManagers {
                side: &side,
                compiled: &managers,
                fallback_limits,
            },
            role,
        )?;
        if managers.is_empty() {
            // No chain speaks HTTP; the proxy's HTTP path still needs limits to start with.
            managers.push(Arc::new(HttpManager {
                stat_prefix: String::new(),
                downstream: DownstreamLimits::default(),
                router: RouterBuilder::default().build(),
                access_log: None,
                unrouted: self.metrics.request_counters("", ""),
                h2c: false,
                allow_connect: false,
                policy: Vec::new(),
                tracing: None,
            }));
        }
        let plugins = &prepared.plugins;
        let plugins = plugins
            .iter()
            .filter_map(|(name, p)| Some((name.clone(), Arc::clone(p.plugin.as_ref()?))))
            .collect();
        self.metrics.commit_generation();
        Ok(Snapshot {
            version: resources.version.clone(),
            resources: resources.clone(),
            bootstrap: bootstrap.clone(),
            listeners: Arc::new(listeners),
            http: side.listening,
            http_managers: managers,
            clusters,
            plugins,
            listener_client_roots: prepared.listener_client_roots.clone(),
        })
    }
}

/// No silent drops: a set field NIP does not implement is refused by its path
/// ([`coverage`]), in the resource that sets it.
fn refuse_unimplemented_fields(resources: &ResourceSet) -> Result<(), CompileError> {
    let refuse = |kind, name: &str, path: String| {
        err(
            kind,
            name,
            format!("{path}: NIP does not implement this field (it is refused, not ignored)"),
        )
    };
    for listener in resources
        .listeners
        .iter()
        .filter(|l| l.api_listener.is_none())
    {
        if let Some(path) = coverage::first_unimplemented(listener) {
            return Err(refuse("Listener", &listener.name, path));
        }
    }
    for routes in &resources.routes {
        if let Some(path) = coverage::first_unimplemented(routes) {
            return Err(refuse("RouteConfiguration", &routes.name, path));
        }
    }
    for cluster in &resources.clusters {
        if let Some(path) = coverage::first_unimplemented(cluster) {
            return Err(refuse("Cluster", &cluster.name, path));
        }
    }
    for assignment in &resources.endpoints {
        if let Some(path) = coverage::first_unimplemented(assignment) {
            return Err(refuse(
                "ClusterLoadAssignment",
                &assignment.cluster_name,
                path,
            ));
        }
    }
    for secret in &resources.secrets {
        if let Some(path) = coverage::first_unimplemented(secret) {
            return Err(refuse("Secret", &secret.name, path));
        }
    }
    Ok(())
}

/// Runs the proxy's compiler over `resources` without loading plugins, resolving host
/// names or touching any state a proxy serves with: what the control plane's apply and
/// `nip validate` refuse is exactly what a proxy of this version would refuse for reasons
/// in the config itself (a plugin module or a host name a proxy cannot reach is the
/// proxy's to find).
pub fn check(bootstrap: &Bootstrap, resources: &ResourceSet) -> Result<(), CompileError> {
    // Every role's listeners: a control plane's proxies of each role take their own.
    let mut bootstrap = bootstrap.clone();
    if let Some(node) = bootstrap.node.as_mut() {
        node.metadata = None;
    }
    let bootstrap = &bootstrap;
    let prepared = prepare_check(bootstrap, resources)?;
    let registry = EndpointRegistry::default();
    let metrics = Metrics::new();
    Compiler {
        registry: &registry,
        metrics: &metrics,
        previous_access_logs: Vec::new(),
        identity: None,
    }
    .compile(&prepared, bootstrap, resources)
    .map(drop)
}

/// How long the listener's access log files are kept (metadata `nip.access_log`).
fn access_log_retention(listener: &Listener) -> Result<Option<Duration>, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(fields) = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::ACCESS_LOG_METADATA))
    else {
        return Ok(None);
    };
    match fields
        .fields
        .get("retention_seconds")
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::NumberValue(seconds)) if *seconds >= 1.0 => {
            Ok(Some(Duration::from_secs(*seconds as u64)))
        }
        _ => Err(format!(
            "metadata {}: retention_seconds must be a number of seconds, at least 1",
            names::ACCESS_LOG_METADATA
        )),
    }
}

/// The `:authority` of calls to an `envoy_grpc` service: its `authority`, else the
/// cluster's name (Envoy's default).
fn grpc_authority(
    target: &envoy_types::pb::envoy::config::core::v3::grpc_service::EnvoyGrpc,
) -> String {
    if target.authority.is_empty() {
        target.cluster_name.clone()
    } else {
        target.authority.clone()
    }
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
mod clusters;
pub mod coverage;
mod downstream;
mod ext_proc;
mod listeners;
mod policy;
mod prepare;
mod routes;
mod secrets;
mod tenants;
mod tracing;

use listeners::*;
pub use listeners::{HttpListening, TlsFiles};
pub use prepare::{prepare, prepare_check, Prepared};
pub use secrets::{CertificateRef, TrustRef};

#[cfg(test)]
mod listener_tests;
#[cfg(test)]
mod tests;
