//! Compiling the `Listener`: its address and TLS, the connection manager (codec, filters in
//! order, route source), the plugins' resource limits and the access log.

use super::*;
use crate::listener::chains::{ChainMatch, SourceType};
use crate::listener::tcp_proxy::TcpProxy;
use crate::listener::{ChainAction, FilterChain, HttpManager, Listeners, ServedListener};
use crate::matchers::Cidr;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{
    listener_filter, FilterChain as XdsFilterChain, FilterChainMatch as XdsFilterChainMatch,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy as XdsTcpProxy;
use nip_xds::translate::{ENVOY_DEFAULT_TEXT_FORMAT, JSON_ACCESS_LOG_FIELDS};

/// Where the listener's TLS material comes from: files, or SDS secrets (read by the
/// control thread and, for secrets, by `prepare`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `(certificate chain, private key)` PEM files, chosen by SNI; the first is the default.
    pub certificates: Vec<(String, String)>,
    /// Serve the proxy's workload certificate (SDS secret `default`), renewed in place.
    pub workload_certificate: bool,
    /// The roots client certificates must chain to (`validation_context.trusted_ca`, or an
    /// SDS validation context such as the mesh's `ROOTCA`).
    pub client_roots: Option<super::secrets::TrustRef>,
    /// Refuse clients without a verified certificate (`require_client_certificate`).
    pub require_client_certificate: bool,
}

/// The HTTP side of a proxy's listeners that the process sets up once: TLS (every filter
/// chain that terminates it uses the same context: certificates, client roots) and h2c.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpListening {
    /// The TLS of the chains that terminate it, with HTTP/2 offered through ALPN.
    pub tls: Option<TlsFiles>,
    /// Some connection manager accepts h2c (prior knowledge) next to HTTP/1.1.
    pub h2c: bool,
}

/// The connection managers of the served listeners, found without compiling clusters
/// (plugins and TLS roots are prepared from them).
pub(super) struct HttpSide<'r> {
    /// Each distinct connection manager with the listener it was first met in (whose
    /// metadata carries its plugins' limits and signatures), in the order met.
    pub managers: Vec<(&'r Listener, HttpConnectionManager)>,
    /// TLS and h2c.
    pub listening: HttpListening,
}

impl HttpSide<'_> {
    /// The index in `managers` of `hcm`.
    pub fn index_of(&self, hcm: &HttpConnectionManager) -> Option<usize> {
        self.managers.iter().position(|(_, m)| m == hcm)
    }
}

/// The listeners NIP serves (listeners with `api_listener` are for proxyless gRPC
/// clients, not for a proxy).
pub(super) fn served_listeners<'r>(
    resources: &'r ResourceSet,
    role: Option<&str>,
) -> Result<Vec<&'r Listener>, CompileError> {
    // A listener naming a role (`nip.role`) is served by proxies of that role only.
    let served: Vec<&Listener> = resources
        .listeners
        .iter()
        .filter(|l| l.api_listener.is_none())
        .filter(|l| {
            role.is_none() || nip_xds::resources::listener_role(l).is_none_or(|r| Some(r) == role)
        })
        .collect();
    if served.is_empty() {
        return Err(err(
            "Listener",
            "",
            match role {
                Some(role) => {
                    format!("there is no listener to serve for a proxy whose role is {role}")
                }
                None => "there is no listener to serve".to_string(),
            },
        ));
    }
    for (i, listener) in served.iter().enumerate() {
        if served[..i].iter().any(|l| l.name == listener.name) {
            return Err(err("Listener", &listener.name, "name is used twice"));
        }
    }
    Ok(served)
}

/// A listener's filter chains with the path each is named by in errors, the default
/// chain last.
fn chains_of(listener: &Listener) -> impl Iterator<Item = (String, &XdsFilterChain)> {
    listener
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c))
        .chain(
            listener
                .default_filter_chain
                .iter()
                .map(|c| ("default_filter_chain".to_string(), c)),
        )
}

/// A filter chain's one network filter, decoded.
enum NetworkFilter {
    Http(Box<HttpConnectionManager>),
    Tcp(Box<XdsTcpProxy>),
}

fn network_filter(chain: &XdsFilterChain) -> Result<NetworkFilter, String> {
    let [network_filter] = chain.filters.as_slice() else {
        return Err(format!(
            "a filter chain holds exactly one network filter ({} or {}), got {}",
            names::HTTP_CONNECTION_MANAGER,
            TCP_PROXY,
            chain.filters.len()
        ));
    };
    let Some(filter::ConfigType::TypedConfig(any)) = &network_filter.config_type else {
        return Err(format!(
            "filters[0] {:?}: typed_config is missing",
            network_filter.name
        ));
    };
    if any.type_url == HttpConnectionManager::type_url() {
        return Ok(NetworkFilter::Http(Box::new(decode(any)?)));
    }
    if any.type_url == XdsTcpProxy::type_url() {
        return Ok(NetworkFilter::Tcp(Box::new(decode(any)?)));
    }
    Err(format!(
        "filters[0]: {} is not supported; only {} and {}",
        any.type_url,
        HttpConnectionManager::type_url(),
        XdsTcpProxy::type_url()
    ))
}

/// Envoy's name of the TCP proxy network filter.
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";

/// The connection managers and TLS of the served listeners (see [`HttpSide`]).
pub(super) fn http_side<'r>(
    resources: &'r ResourceSet,
    role: Option<&str>,
) -> Result<HttpSide<'r>, CompileError> {
    let mut managers: Vec<(&Listener, HttpConnectionManager)> = Vec::new();
    let mut tls: Option<(String, TlsFiles)> = None;
    for listener in served_listeners(resources, role)? {
        let name = listener.name.as_str();
        for (path, chain) in chains_of(listener) {
            let fail = |m: String| err("Listener", name, format!("{path}: {m}"));
            let NetworkFilter::Http(hcm) = network_filter(chain).map_err(fail)? else {
                continue;
            };
            if !managers.iter().any(|(_, m)| *m == *hcm) {
                check_connection_manager(&hcm).map_err(fail)?;
                managers.push((listener, *hcm));
            }
            if let Some(chain_tls) = chain_tls(chain).map_err(fail)? {
                match &tls {
                    None => tls = Some((format!("listener {name:?} {path}"), chain_tls)),
                    Some((first, first_tls)) if *first_tls != chain_tls => {
                        return Err(fail(format!(
                            "its TLS context differs from the one of {first}: NIP terminates TLS with one context (certificates, client roots) per proxy"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
    }
    let h2c = managers.iter().any(|(_, hcm)| {
        http_connection_manager::CodecType::try_from(hcm.codec_type)
            .unwrap_or(http_connection_manager::CodecType::Auto)
            != http_connection_manager::CodecType::Http1
    });
    Ok(HttpSide {
        managers,
        listening: HttpListening {
            tls: tls.map(|(_, t)| t),
            h2c,
        },
    })
}

/// What NIP's HTTP path refuses in a connection manager.
fn check_connection_manager(hcm: &HttpConnectionManager) -> Result<(), String> {
    if hcm.generate_request_id.as_ref().is_some_and(|g| !g.value) {
        return Err(
            "http_connection_manager.generate_request_id: false is not supported (NIP keeps or makes x-request-id on every request)".into(),
        );
    }
    for (i, http) in hcm.http_filters.iter().enumerate() {
        let last = i + 1 == hcm.http_filters.len();
        let type_url = match &http.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
            _ => "",
        };
        let is_router = http.name == names::ROUTER || type_url.ends_with(".router.v3.Router");
        if last != is_router {
            return Err(format!(
                "http_filters[{i}] {:?}: the router must be the last filter, and only there",
                http.name
            ));
        }
        let policy = [
            envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication::type_url(),
            envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac::type_url(),
            envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::ExtAuthz::type_url(),
            LocalRateLimit::type_url(),
            envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3::RateLimit::type_url(),
            envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ExternalProcessor::type_url(),
        ];
        let tenant = http.name == names::TENANT_FILTER
            && type_url == envoy_types::pb::google::protobuf::Struct::type_url();
        if tenant || policy.iter().any(|p| p == type_url) {
            continue;
        }
        if !is_router && type_url != Wasm::type_url() {
            return Err(format!(
                "http_filters[{i}] {:?}: {type_url:?} is not supported (NIP runs jwt_authn, rbac, ext_authz, local_ratelimit, ratelimit, ext_proc, {} with a Struct config, {} plugins and the router)",
                http.name,
                names::TENANT_FILTER,
                Wasm::type_url()
            ));
        }
    }
    Ok(())
}

/// The TLS a filter chain terminates (`None`: plaintext).
fn chain_tls(chain: &XdsFilterChain) -> Result<Option<TlsFiles>, String> {
    let Some(socket) = &chain.transport_socket else {
        return Ok(None);
    };
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Err("transport_socket.typed_config is missing".into());
    };
    if any.type_url != DownstreamTlsContext::type_url() {
        return Err(format!(
            "transport socket {} is not supported",
            any.type_url
        ));
    }
    let tls: DownstreamTlsContext = decode(any)?;
    let refs = super::secrets::tls_context(&tls.common_tls_context.unwrap_or_default())
        .map_err(|e| format!("tls: {e}"))?;
    if refs.certificates.is_empty() {
        return Err("tls: common_tls_context has no certificate (tls_certificates or tls_certificate_sds_secret_configs)".into());
    }
    if !refs.san_matchers.is_empty() {
        return Err("tls: validation_context.match_typed_subject_alt_names is not supported on a listener (plugins see the client's names)".into());
    }
    let mut certificates = Vec::new();
    let mut workload_certificate = false;
    for certificate in refs.certificates {
        match certificate {
                    super::secrets::CertificateRef::Files { chain, key } => {
                        certificates.push((chain, key))
                    }
                    super::secrets::CertificateRef::Secret(name)
                        if name == nip_xds::secrets::WORKLOAD_CERTIFICATE
                            && !workload_certificate =>
                    {
                        workload_certificate = true
                    }
                    super::secrets::CertificateRef::Secret(name) => {
                        return Err(format!(
                            "tls: secret {name:?}: a listener serves certificate files or the workload certificate (\"{}\"), once",
                            nip_xds::secrets::WORKLOAD_CERTIFICATE
                        ))
                    }
                }
    }
    if workload_certificate && !certificates.is_empty() {
        return Err(
            "tls: the workload certificate and certificate files cannot be mixed on one listener"
                .into(),
        );
    }
    let require_client_certificate = tls.require_client_certificate.is_some_and(|r| r.value);
    if require_client_certificate && refs.trust.is_none() {
        return Err("tls: require_client_certificate needs a validation context (trusted_ca or an SDS secret)".into());
    }
    Ok(Some(TlsFiles {
        certificates,
        workload_certificate,
        client_roots: refs.trust,
        require_client_certificate,
    }))
}

/// The connection managers as compiled, for the listeners' HTTP chains.
pub(super) struct HttpManagers<'s, 'r> {
    /// Where they came from.
    pub side: &'s HttpSide<'r>,
    /// Each of `side.managers`, compiled, in the same order.
    pub compiled: &'s [Arc<HttpManager>],
    /// The limits of a listener without an HTTP chain.
    pub fallback_limits: DownstreamLimits,
}

impl Compiler<'_> {
    /// The served listeners, compiled: addresses, listener filters, filter chains with
    /// their matches, `tcp_proxy` filters pointed at their clusters.
    pub(super) fn listeners(
        &self,
        resources: &ResourceSet,
        prepared: &Prepared,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        http: &HttpManagers<'_, '_>,
        role: Option<&str>,
    ) -> Result<Listeners, CompileError> {
        let mut all = Vec::new();
        for listener in served_listeners(resources, role)? {
            all.push(self.listener(listener, prepared, clusters, http)?);
        }
        if all.iter().all(|l| !l.bind_to_port) {
            return Err(err(
                "Listener",
                "",
                "every listener has bind_to_port: false, so none takes connections",
            ));
        }
        for (i, listener) in all.iter().enumerate() {
            if let Some(other) = all[..i]
                .iter()
                .find(|o| o.bind_to_port == listener.bind_to_port && o.address == listener.address)
            {
                return Err(err(
                    "Listener",
                    &listener.name,
                    format!(
                        "address {} is also listener {:?}'s",
                        listener.address, other.name
                    ),
                ));
            }
        }
        Ok(Listeners { all })
    }

    fn listener(
        &self,
        listener: &Listener,
        prepared: &Prepared,
        clusters: &BTreeMap<String, Arc<Cluster>>,
        http: &HttpManagers<'_, '_>,
    ) -> Result<ServedListener, CompileError> {
        let name = listener.name.as_str();
        let fail = |m: String| err("Listener", name, m);
        let address = listener
            .address
            .as_ref()
            .ok_or_else(|| fail("address is missing".into()))?;
        let address = socket_addr(address, prepared).map_err(|e| fail(format!("address: {e}")))?;
        let mut additional_addresses = Vec::new();
        for (i, additional) in listener.additional_addresses.iter().enumerate() {
            let at = |m: String| fail(format!("additional_addresses[{i}].address: {m}"));
            let resolved = additional
                .address
                .as_ref()
                .ok_or_else(|| at("missing".into()))
                .and_then(|a| socket_addr(a, prepared).map_err(at))?;
            if resolved == address || additional_addresses.contains(&resolved) {
                return Err(at(format!("{resolved} is already the listener's")));
            }
            additional_addresses.push(resolved);
        }
        let mut use_original_dst = listener.use_original_dst.as_ref().is_some_and(|b| b.value);
        let (mut inspect_tls, mut inspect_http) = (false, false);
        for (i, filter) in listener.listener_filters.iter().enumerate() {
            let type_url = match &filter.config_type {
                Some(listener_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
                _ => "",
            };
            let is =
                |name: &str, type_url_of: String| filter.name == name || type_url == type_url_of;
            if is(
                "envoy.filters.listener.tls_inspector",
                TlsInspector::type_url(),
            ) {
                inspect_tls = true;
            } else if is(
                "envoy.filters.listener.http_inspector",
                HttpInspector::type_url(),
            ) {
                inspect_http = true;
            } else if is(
                "envoy.filters.listener.original_dst",
                OriginalDst::type_url(),
            ) {
                use_original_dst = true;
            } else {
                return Err(fail(format!(
                    "listener_filters[{i}] {:?}: not supported (NIP runs tls_inspector, http_inspector and original_dst)",
                    filter.name
                )));
            }
        }
        let inspection_timeout = match &listener.listener_filters_timeout {
            None => Some(crate::listener::DEFAULT_INSPECTION_TIMEOUT),
            Some(t) => {
                let t = duration(t)
                    .ok_or_else(|| fail("listener_filters_timeout: not a valid duration".into()))?;
                (!t.is_zero()).then_some(t)
            }
        };
        let mut chains = Vec::new();
        let mut default_chain = None;
        for (path, chain) in chains_of(listener) {
            let fail = |m: String| err("Listener", name, format!("{path}: {m}"));
            let is_default = path == "default_filter_chain";
            if is_default && chain.filter_chain_match.is_some() {
                return Err(fail("the default filter chain takes what no chain matches; it has no filter_chain_match".into()));
            }
            let matches = match &chain.filter_chain_match {
                Some(m) => chain_match(m).map_err(|e| fail(format!("filter_chain_match: {e}")))?,
                None => ChainMatch::default(),
            };
            let action = match network_filter(chain).map_err(fail)? {
                NetworkFilter::Http(hcm) => {
                    let manager = http
                        .side
                        .index_of(&hcm)
                        .and_then(|i| http.compiled.get(i))
                        .ok_or_else(|| fail("its connection manager was not compiled".into()))?;
                    ChainAction::Http {
                        tls: chain.transport_socket.is_some(),
                        manager: Arc::clone(manager),
                    }
                }
                NetworkFilter::Tcp(tcp) => {
                    if chain.transport_socket.is_some() {
                        return Err(fail("a tcp_proxy chain passes bytes through; it cannot terminate TLS (transport_socket)".into()));
                    }
                    ChainAction::Tcp(self.tcp_proxy(name, &tcp, clusters).map_err(fail)?)
                }
            };
            let compiled = FilterChain {
                name: chain.name.clone(),
                matches,
                action,
            };
            if is_default {
                default_chain = Some(compiled);
                continue;
            }
            if let Some(same) = chains
                .iter()
                .position(|c: &FilterChain| c.matches == compiled.matches)
            {
                return Err(fail(format!(
                    "its filter_chain_match is the same as filter_chains[{same}]'s (a connection could not tell them apart)"
                )));
            }
            chains.push(compiled);
        }
        if chains.is_empty() && default_chain.is_none() {
            return Err(fail("has no filter chain".into()));
        }
        // Connections a tcp_proxy takes count against the limits of the listener's HTTP
        // side (its first connection manager's, else the proxy's first).
        let limits = chains
            .iter()
            .chain(default_chain.as_ref())
            .find_map(|c| c.http_manager())
            .map_or_else(|| http.fallback_limits.clone(), |m| m.downstream.clone());
        Ok(ServedListener {
            name: Arc::from(name),
            address,
            additional_addresses,
            bind_to_port: listener.bind_to_port.as_ref().is_none_or(|b| b.value),
            use_original_dst,
            inspect_tls,
            inspect_http,
            inspection_timeout,
            continue_on_inspection_timeout: listener.continue_on_listener_filters_timeout,
            chains,
            default_chain,
            limits,
            stats: self.metrics.listener_stats(name),
        })
    }

    fn tcp_proxy(
        &self,
        listener: &str,
        tcp: &XdsTcpProxy,
        clusters: &BTreeMap<String, Arc<Cluster>>,
    ) -> Result<TcpProxy, String> {
        use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
        if tcp.stat_prefix.is_empty() {
            return Err("tcp_proxy.stat_prefix is required".into());
        }
        let cluster = match &tcp.cluster_specifier {
            Some(ClusterSpecifier::Cluster(name)) => clusters
                .get(name)
                .ok_or_else(|| format!("tcp_proxy.cluster {name:?} is not among the clusters"))?,
            Some(ClusterSpecifier::WeightedClusters(_)) => {
                return Err(
                    "tcp_proxy.weighted_clusters is not supported yet; name one cluster".into(),
                )
            }
            None => return Err("tcp_proxy needs a cluster".into()),
        };
        if cluster.endpoints.iter().any(|e| e.tls.is_some()) {
            return Err(format!(
                "tcp_proxy.cluster {:?} reaches its endpoints over TLS, which tcp_proxy does not originate yet",
                cluster.name
            ));
        }
        let idle_timeout = match &tcp.idle_timeout {
            None => Some(crate::listener::tcp_proxy::DEFAULT_IDLE_TIMEOUT),
            Some(t) => {
                let t = duration(t).ok_or("tcp_proxy.idle_timeout: not a valid duration")?;
                (!t.is_zero()).then_some(t)
            }
        };
        let max_connect_attempts = match &tcp.max_connect_attempts {
            None => 1,
            Some(n) if n.value >= 1 && n.value <= 10 => n.value,
            Some(n) => {
                return Err(format!(
                    "tcp_proxy.max_connect_attempts: {} is outside 1–10",
                    n.value
                ))
            }
        };
        let max_downstream_connection_duration = match &tcp.max_downstream_connection_duration {
            None => None,
            Some(t) => {
                let t = duration(t)
                    .ok_or("tcp_proxy.max_downstream_connection_duration: not a valid duration")?;
                (!t.is_zero()).then_some(t)
            }
        };
        Ok(TcpProxy {
            stat_prefix: tcp.stat_prefix.clone(),
            cluster: Arc::clone(cluster),
            idle_timeout,
            max_connect_attempts,
            max_downstream_connection_duration,
            stats: self.metrics.tcp_stats(&tcp.stat_prefix),
            access_log: self
                .access_log(listener, &tcp.access_log, None)
                .map_err(|e| format!("tcp_proxy.{}", e.message))?,
        })
    }
}

/// A `filter_chain_match`, checked.
fn chain_match(m: &XdsFilterChainMatch) -> Result<ChainMatch, String> {
    use envoy_types::pb::envoy::config::listener::v3::filter_chain_match::ConnectionSourceType;
    let cidrs = |ranges: &[CidrRange], field: &str| -> Result<Vec<Cidr>, String> {
        ranges
            .iter()
            .map(|r| {
                let ip: std::net::IpAddr = r
                    .address_prefix
                    .parse()
                    .map_err(|_| format!("{field}: {:?} is not an IP address", r.address_prefix))?;
                let len = r
                    .prefix_len
                    .as_ref()
                    .map_or(if ip.is_ipv4() { 32 } else { 128 }, |l| l.value);
                Cidr::new(ip, len).map_err(|e| format!("{field}: {e}"))
            })
            .collect()
    };
    let destination_port = match &m.destination_port {
        None => None,
        Some(p) => Some(
            u16::try_from(p.value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("destination_port: {} is not a port", p.value))?,
        ),
    };
    let source_ports = m
        .source_ports
        .iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("source_ports: {p} is not a port"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut server_names = Vec::new();
    for name in &m.server_names {
        let lower = name.to_ascii_lowercase();
        let bare = lower.strip_prefix("*.").unwrap_or(&lower);
        if bare.is_empty() || bare.contains('*') || bare.contains(['/', ' ', ':']) {
            return Err(format!(
                "server_names: {name:?} is not a host name or a \"*.\" wildcard"
            ));
        }
        server_names.push(lower);
    }
    let transport_protocol = match m.transport_protocol.as_str() {
        "" => None,
        "tls" | "raw_buffer" => Some(m.transport_protocol.clone()),
        other => {
            return Err(format!(
                "transport_protocol: {other:?} is not one NIP detects (tls, raw_buffer)"
            ))
        }
    };
    let source_type = match ConnectionSourceType::try_from(m.source_type) {
        Ok(ConnectionSourceType::Any) => SourceType::Any,
        Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
        Ok(ConnectionSourceType::External) => SourceType::External,
        Err(_) => {
            return Err(format!(
                "source_type: {} is not a source type",
                m.source_type
            ))
        }
    };
    Ok(ChainMatch {
        destination_port,
        prefix_ranges: cidrs(&m.prefix_ranges, "prefix_ranges")?,
        server_names,
        transport_protocol,
        application_protocols: m.application_protocols.clone(),
        direct_source_prefix_ranges: cidrs(
            &m.direct_source_prefix_ranges,
            "direct_source_prefix_ranges",
        )?,
        source_type,
        source_prefix_ranges: cidrs(&m.source_prefix_ranges, "source_prefix_ranges")?,
        source_ports,
    }
    .normalized())
}

/// The signature a plugin filter's module must carry, when the listener says modules must
/// be signed (`nip.plugin_signing.trusted_keys`, added by a control plane for a tenant
/// whose admin requires it).
pub(super) fn plugin_signature(
    listener: &Listener,
    filter: &str,
) -> Result<Option<crate::plugins::SignatureCheck>, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(signing) = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::PLUGIN_SIGNING_METADATA))
    else {
        return Ok(None);
    };
    let keys = match signing
        .fields
        .get("trusted_keys")
        .and_then(|v| v.kind.as_ref())
    {
        None => return Ok(None),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(key)) => nip_xds::config::decode_base64(key)
                    .filter(|k| k.len() == nip_xds::config::ED25519_KEY_BYTES)
                    .ok_or_else(|| {
                        format!("trusted_keys: {key:?} is not a base64 ed25519 public key")
                    }),
                _ => Err("trusted_keys: must be strings".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("trusted_keys: must be a list".into()),
    };
    if keys.is_empty() {
        return Ok(None);
    }
    let signature = signing
        .fields
        .get("signatures")
        .and_then(|v| match &v.kind {
            Some(Kind::StructValue(s)) => s.fields.get(filter),
            _ => None,
        })
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .ok_or_else(|| {
            format!("{filter:?}: the tenant requires signed plugins and this one has no signature")
        })?;
    let signature = nip_xds::config::decode_base64(signature)
        .filter(|s| s.len() == nip_xds::config::ED25519_SIGNATURE_BYTES)
        .ok_or_else(|| format!("{filter:?}: the signature is not base64 of 64 bytes"))?;
    Ok(Some(crate::plugins::SignatureCheck {
        trusted_keys: keys,
        signature,
    }))
}

/// The resource limits of plugin filter `filter` from the listener's `nip.plugin_limits`
/// metadata; defaults for a plugin (or a field) it does not mention.
pub(super) fn plugin_limits(listener: &Listener, filter: &str) -> Result<ResourceLimits, String> {
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

/// The line format of an access log. NIP writes two formats: Envoy's default text line and
/// its JSON line ([`JSON_ACCESS_LOG_FIELDS`]); a `log_format` asking for anything else (other
/// command strings, other JSON keys) is refused rather than written in a format the user
/// did not ask for.
#[allow(deprecated)] // `text_format`: deprecated in Envoy, still sent by older servers.
pub(super) fn log_format(format: &SubstitutionFormatString) -> Result<LogFormat, String> {
    use substitution_format_string::Format;
    let default_text = |text: &str| {
        text.trim_end_matches('\n') == ENVOY_DEFAULT_TEXT_FORMAT.trim_end_matches('\n')
    };
    match &format.format {
        None => Ok(LogFormat::Text),
        Some(Format::TextFormat(text)) if default_text(text) => Ok(LogFormat::Text),
        Some(Format::TextFormatSource(source)) if matches!(&source.specifier, Some(data_source::Specifier::InlineString(text)) if default_text(text)) => {
            Ok(LogFormat::Text)
        }
        Some(Format::JsonFormat(fields)) => {
            let ours = fields.fields.len() == JSON_ACCESS_LOG_FIELDS.len()
                && JSON_ACCESS_LOG_FIELDS.iter().all(|(key, command)| {
                    matches!(
                        fields.fields.get(*key).and_then(|v| v.kind.as_ref()),
                        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(c)) if c == command
                    )
                });
            if ours {
                Ok(LogFormat::Json)
            } else {
                Err(
                    "log_format.json_format: NIP writes its own JSON fields only (those `nip` \
                     translates an `access_log: { format: json }` to); custom fields are not \
                     supported"
                        .into(),
                )
            }
        }
        Some(_) => Err(
            "log_format: NIP writes Envoy's default text format only; custom \
                        command strings are not supported"
                .into(),
        ),
    }
}

impl Compiler<'_> {
    pub(super) fn access_log(
        &self,
        listener: &str,
        logs: &[AccessLog],
        retention: Option<Duration>,
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
                Some(stdout_access_log::AccessLogFormat::LogFormat(f)) => {
                    log_format(&f).map_err(fail)?
                }
                None => LogFormat::Text,
            };
            (LogSink::Stdout, format)
        } else if any.type_url == FileAccessLog::type_url() {
            let file: FileAccessLog = decode(any).map_err(fail)?;
            let format = match file.access_log_format {
                Some(file_access_log::AccessLogFormat::LogFormat(f)) => {
                    log_format(&f).map_err(fail)?
                }
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
        if let Some(previous) = self
            .previous_access_logs
            .iter()
            .find(|p| p.is(format, &sink, retention))
        {
            return Ok(Some(Arc::clone(previous)));
        }
        let logger = AccessLogger::start(
            format,
            sink.clone(),
            retention,
            self.metrics.access_log_dropped.clone(),
        )
        .map_err(|e| fail(format!("cannot open {sink:?}: {e}")))?;
        Ok(Some(Arc::new(logger)))
    }
}
