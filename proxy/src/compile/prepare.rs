//! What compiling takes from outside the resources, gathered before it: the listener's
//! plugins (read or downloaded, compiled by wasmtime, canaried) and the addresses of host
//! names (DNS). This is the only step of a config change that reaches the disk, the network
//! or wasmtime, so [`super::Compiler::compile`] itself is pure and runs the same way in a
//! proxy and in a check ([`super::check`]: the control plane's apply, `nip validate`).

use super::cluster_policies::UpstreamTlsSpec;
use super::secrets::{Material, SecretSource};
use super::{err, http_side, plugin_limits, served_listeners, CompileError};
use crate::identity::WorkloadIdentity;
use crate::plugins::{LoadedPlugin, PluginLoader, PluginSpec};
use crate::upstream::tls::{ClientCertificate, Roots, UpstreamTlsSettings};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::core::v3::{address, Address};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use nip_filters::host::NodeInfo;
use nip_xds::ResourceSet;
use prost::Name;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// The plugins of the served listener by HTTP filter name, and the addresses of the host
/// names its resources use.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Each Wasm filter's plugin by HTTP filter name.
    pub(super) plugins: BTreeMap<String, PreparedPlugin>,
    /// `(host, port)` → address, for every socket address that is not an IP.
    pub(super) hosts: HashMap<(String, u16), SocketAddr>,
    /// Each TLS cluster's certificates and keys, read (a proxy; none in a check: the
    /// files are on the proxies).
    pub(super) upstream_tls: HashMap<String, Arc<crate::upstream::tls::UpstreamTls>>,
    /// The TLS of each cluster's `transport_socket_matches` entry, by (cluster, index).
    pub(super) upstream_tls_matches:
        HashMap<(String, usize), Arc<crate::upstream::tls::UpstreamTls>>,
    /// The roots the listener verifies clients with, read (a proxy).
    pub(super) listener_client_roots: Option<crate::downstream::tls::ClientRoots>,
}

impl Prepared {
    /// The address of `host:port`: an IP as written, a host name as prepared.
    pub(super) fn address(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        self.hosts
            .get(&(host.to_string(), port))
            .copied()
            .ok_or_else(|| format!("{host:?} was not resolved"))
    }
}

/// One Wasm filter of the listener.
#[derive(Debug, Clone)]
pub(super) struct PreparedPlugin {
    /// Loaded in a proxy; `None` in a check (decoded only).
    pub plugin: Option<Arc<LoadedPlugin>>,
    /// Runs on every route that does not switch it off (Envoy: a filter not `disabled`);
    /// otherwise only where a route's `typed_per_filter_config` switches it on.
    pub on_by_default: bool,
    /// Its place among the listener's HTTP filters (the order filters run in).
    pub order: usize,
}

/// How host names are handled while preparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hosts {
    /// Resolved (a proxy).
    Resolve,
    /// Given distinct placeholder addresses from 240.0.0.0/4 (a check: the host names are
    /// the proxies' to resolve).
    Placeholder,
}

/// Loads the plugins, resolves the host names `resources` use and reads their TLS
/// material (files, SDS secrets, the workload `identity`), for a proxy.
pub fn prepare(
    bootstrap: &Bootstrap,
    resources: &ResourceSet,
    loader: &PluginLoader,
    identity: Option<&Arc<WorkloadIdentity>>,
) -> Result<Prepared, CompileError> {
    gather(bootstrap, resources, Some(loader), Hosts::Resolve, identity)
}

/// Decodes the plugins and names the host names `resources` use without loading or
/// resolving anything: what a check compiles with.
pub fn prepare_check(
    bootstrap: &Bootstrap,
    resources: &ResourceSet,
) -> Result<Prepared, CompileError> {
    gather(bootstrap, resources, None, Hosts::Placeholder, None)
}

fn gather(
    bootstrap: &Bootstrap,
    resources: &ResourceSet,
    loader: Option<&PluginLoader>,
    hosts: Hosts,
    identity: Option<&Arc<WorkloadIdentity>>,
) -> Result<Prepared, CompileError> {
    let mut prepared = Prepared::default();
    let source = SecretSource {
        secrets: &resources.secrets,
        identity,
    };
    let mut add_host = |address: &Address, fail: &dyn Fn(String) -> CompileError| {
        let Some(address::Address::SocketAddress(sa)) = &address.address else {
            return Ok(());
        };
        let Some(port) = super::port_of(sa).ok() else {
            return Ok(());
        };
        if sa.address.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        let key = (sa.address.clone(), port);
        if prepared.hosts.contains_key(&key) {
            return Ok(());
        }
        let resolved = match hosts {
            Hosts::Resolve => resolve(&sa.address, port).map_err(fail)?,
            Hosts::Placeholder => {
                let n = u32::try_from(prepared.hosts.len()).unwrap_or(u32::MAX);
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(0xF000_0000 | (n & 0x0FFF_FFFF))),
                    port,
                )
            }
        };
        prepared.hosts.insert(key, resolved);
        Ok::<(), CompileError>(())
    };
    let assignments = resources
        .clusters
        .iter()
        .filter_map(|c| c.load_assignment.as_ref())
        .chain(&resources.endpoints);
    for cla in assignments {
        for_each_endpoint_address(cla, |field, address| {
            add_host(address, &|m| {
                err(
                    "ClusterLoadAssignment",
                    &cla.cluster_name,
                    format!("{field}: {m}"),
                )
            })
        })?;
    }
    // TLS clusters: their files, read once here (a proxy only).
    if hosts == Hosts::Resolve {
        for xds in &resources.clusters {
            let fail = |m: String| err("Cluster", &xds.name, m);
            for (i, entry) in super::cluster_policies::transport_socket_matches(xds)
                .map_err(fail)?
                .into_iter()
                .enumerate()
            {
                if let Some(spec) = entry.spec {
                    let tls = upstream_tls(spec, &source)
                        .and_then(crate::upstream::tls::UpstreamTls::load)
                        .map_err(|e| fail(format!("transport_socket_matches[{i}]: {e}")))?;
                    prepared
                        .upstream_tls_matches
                        .insert((xds.name.clone(), i), Arc::new(tls));
                }
            }
            let Some(spec) = super::cluster_policies::upstream_tls_spec(xds).map_err(fail)? else {
                continue;
            };
            let tls = upstream_tls(spec, &source)
                .and_then(crate::upstream::tls::UpstreamTls::load)
                .map_err(|e| fail(format!("transport_socket: {e}")))?;
            prepared
                .upstream_tls
                .insert(xds.name.clone(), Arc::new(tls));
        }
    }
    // The listeners: their addresses, and the plugins of their connection manager.
    let role = nip_xds::resources::node_role(bootstrap);
    let Ok(served) = served_listeners(resources, role) else {
        // The compiler names what is wrong with the listeners.
        return Ok(prepared);
    };
    for listener in served {
        if let Some(address) = &listener.address {
            add_host(address, &|m| {
                err("Listener", &listener.name, format!("address: {m}"))
            })?;
        }
    }
    let Ok(side) = http_side(resources, role) else {
        return Ok(prepared);
    };
    if hosts == Hosts::Resolve {
        if let Some(trust) = side
            .listening
            .tls
            .as_ref()
            .and_then(|t| t.client_roots.as_ref())
        {
            let fail = |e: String| err("Listener", "", format!("tls: {e}"));
            let (origin, pem) = source.trust(trust).map_err(fail)?;
            let roots = crate::downstream::tls::ClientRoots { origin, pem };
            // Checked here, so roots that cannot verify anything are refused (NACKed), not
            // found out when the listener is given them.
            crate::downstream::tls::ClientVerifier::new(&roots, true).map_err(fail)?;
            prepared.listener_client_roots = Some(roots);
        }
    }
    let node = bootstrap.node.as_ref();
    let locality = node.and_then(|n| n.locality.as_ref());
    let node = NodeInfo {
        id: node.map(|n| n.id.clone()).unwrap_or_default(),
        region: locality.map(|l| l.region.clone()).unwrap_or_default(),
        zone: locality.map(|l| l.zone.clone()).unwrap_or_default(),
    };
    // Plugins are known by their filter's name across connection managers: one name, one
    // filter.
    let mut seen: HashMap<&str, (&str, &HttpFilter, usize)> = HashMap::new();
    for (listener, hcm) in &side.managers {
        for (i, filter) in hcm.http_filters.iter().enumerate() {
            let Some(http_filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                continue;
            };
            if any.type_url != Wasm::type_url() {
                continue;
            }
            let fail = |e: String| {
                err(
                    "Listener",
                    &listener.name,
                    format!("http_filters[{i}] {:?}: {e}", filter.name),
                )
            };
            if let Some((first_listener, first, order)) = seen.get(filter.name.as_str()) {
                if *first != filter || *order != i {
                    return Err(fail(format!(
                        "a filter of this name is configured differently (or elsewhere in the chain) in another connection manager of listener {first_listener:?}; plugins are known by filter name"
                    )));
                }
                continue;
            }
            seen.insert(&filter.name, (&listener.name, filter, i));
            let limits = plugin_limits(listener, &filter.name).map_err(|e| {
                err(
                    "Listener",
                    &listener.name,
                    format!(
                        "metadata {}: {e}",
                        nip_xds::resources::names::PLUGIN_LIMITS_METADATA
                    ),
                )
            })?;
            let signing =
                super::listeners::plugin_signature(listener, &filter.name).map_err(|e| {
                    err(
                        "Listener",
                        &listener.name,
                        format!(
                            "metadata {}: {e}",
                            nip_xds::resources::names::PLUGIN_SIGNING_METADATA
                        ),
                    )
                })?;
            let mut spec = PluginSpec::decode(any).map_err(fail)?;
            if let Some(check) = signing {
                spec = spec.require_signature(check);
            }
            let plugin = match loader {
                Some(loader) => Some(Arc::new(loader.load(&spec, &node, limits).map_err(fail)?)),
                None => None,
            };
            prepared.plugins.insert(
                filter.name.clone(),
                PreparedPlugin {
                    plugin,
                    on_by_default: !filter.disabled,
                    order: i,
                },
            );
        }
    }
    Ok(prepared)
}

/// Calls `visit` with each endpoint address of `cla` and its field path.
fn for_each_endpoint_address(
    cla: &ClusterLoadAssignment,
    mut visit: impl FnMut(&str, &Address) -> Result<(), CompileError>,
) -> Result<(), CompileError> {
    for (li, locality) in cla.endpoints.iter().enumerate() {
        for (ei, lb_endpoint) in locality.lb_endpoints.iter().enumerate() {
            if let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) =
                &lb_endpoint.host_identifier
            {
                if let Some(address) = &endpoint.address {
                    visit(&format!("endpoints[{li}].lb_endpoints[{ei}]"), address)?;
                }
            }
        }
    }
    Ok(())
}

/// Resolves a host name once, here, off the request path.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

/// A cluster's TLS spec with its material found and read.
fn upstream_tls(
    spec: UpstreamTlsSpec,
    source: &SecretSource<'_>,
) -> Result<UpstreamTlsSettings, String> {
    let roots = match &spec.trust {
        None => Roots::System,
        Some(trust) => {
            let (origin, pem) = source.trust(trust)?;
            Roots::Pem { origin, pem }
        }
    };
    let client = match &spec.client {
        None => None,
        Some(reference) => Some(match source.certificate(reference)? {
            Material::Certificate { origin, chain, key } => {
                ClientCertificate::Pem { origin, chain, key }
            }
            Material::Workload(identity) => ClientCertificate::Workload(identity),
        }),
    };
    Ok(UpstreamTlsSettings {
        sni: spec.sni,
        roots,
        san_matchers: spec.san_matchers,
        client,
    })
}
