//! The xDS resources a proxy runs on, grouped as one consistent set with one version.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

/// Type URL of `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.route.v3.RouteConfiguration` (RDS).
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS).
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Name of the one listener a NIP config produces.
pub const GATEWAY_LISTENER: &str = "api_gateway";
/// Name of the route configuration the gateway listener uses (over RDS).
pub const GATEWAY_ROUTES: &str = "api_gateway_routes";

/// Filter and extension names NIP writes and reads, spelled as Envoy spells them.
pub mod names {
    /// The HTTP connection manager network filter.
    pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
    /// The terminal router HTTP filter.
    pub const ROUTER: &str = "envoy.filters.http.router";
    /// The local rate limit HTTP filter (its buckets are per route).
    pub const LOCAL_RATE_LIMIT: &str = "envoy.filters.http.local_ratelimit";
    /// The JWT authentication HTTP filter (also the metadata namespace of the verified
    /// payloads RBAC matches claims in).
    pub const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";
    /// The RBAC HTTP filter.
    pub const RBAC: &str = "envoy.filters.http.rbac";
    /// The global rate limit HTTP filter (asks a rate limit service).
    pub const RATE_LIMIT: &str = "envoy.filters.http.ratelimit";
    /// The external authorization HTTP filter.
    pub const EXT_AUTHZ: &str = "envoy.filters.http.ext_authz";
    /// Downstream/upstream TLS transport socket.
    pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
    /// The plaintext transport socket (a `transport_socket_matches` entry for endpoints
    /// reached without TLS).
    pub const RAW_BUFFER_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
    /// `envoy.transport_socket_match` field a control plane sets on an endpoint that is a
    /// NIP proxy of the mesh: its SPIFFE ID (the cluster's matching entry does mesh mutual
    /// TLS expecting exactly that identity).
    pub const MESH_IDENTITY_MATCH_FIELD: &str = "nip.mesh_identity";
    /// Endpoint `filter_metadata` key Envoy matches `transport_socket_matches` against.
    pub const TRANSPORT_SOCKET_MATCH_METADATA: &str = "envoy.transport_socket_match";
    /// Access log to standard output.
    pub const STDOUT_ACCESS_LOG: &str = "envoy.access_loggers.stdout";
    /// Access log to a file.
    pub const FILE_ACCESS_LOG: &str = "envoy.access_loggers.file";
    /// Prefix of the HTTP filter name of each plugin (`nip.plugin.NAME`).
    pub const PLUGIN_FILTER_PREFIX: &str = "nip.plugin.";
    /// The wasm runtime NIP names in `VmConfig.runtime`.
    pub const WASM_RUNTIME: &str = "envoy.wasm.runtime.wasmtime";

    /// `HttpUri.cluster` of a remote plugin module: the proxy downloads it itself.
    pub const PLUGIN_FETCH_CLUSTER: &str = "nip.plugin_fetch";
    /// Listener `filter_metadata` key of client limits Envoy keeps elsewhere (its overload
    /// manager): `max_active_downstream_connections`, and `trust_priority_header`.
    pub const DOWNSTREAM_METADATA: &str = "nip.downstream";
    /// Listener `filter_metadata` key of tracing choices Envoy has no field for:
    /// `parent_based` (a client's `traceparent` decides sampling) and `errors` (failed
    /// requests are exported even when not sampled).
    pub const TRACING_METADATA: &str = "nip.tracing";
    /// Listener `filter_metadata` key holding each plugin filter's resource limits.
    pub const PLUGIN_LIMITS_METADATA: &str = "nip.plugin_limits";
    /// Listener metadata naming the role of the proxies that serve it (`role`: `edge` or
    /// `sidecar`; absent: every proxy), and node metadata naming a proxy's role.
    pub const ROLE_METADATA: &str = "nip.role";
    /// Listener `filter_metadata` key for signed plugins: `trusted_keys` (base64 ed25519
    /// public keys; when present, every plugin module must be signed by one of them) and
    /// `signatures` (base64 signature per plugin filter name).
    pub const PLUGIN_SIGNING_METADATA: &str = "nip.plugin_signing";

    /// The HTTP filter name of a plugin.
    pub fn plugin_filter(plugin: &str) -> String {
        format!("{PLUGIN_FILTER_PREFIX}{plugin}")
    }

    /// `load_balancing_policy` extension of `lb: latency` (peak EWMA with two choices);
    /// its `typed_config` is a `google.protobuf.Struct` with `decay_seconds` and
    /// `default_rtt_seconds`. Clients that do not know it use the next policy in the list.
    pub const PEAK_EWMA_POLICY: &str = "nip.load_balancing_policies.peak_ewma";
    /// Envoy's ring-hash policy extension (`RingHash` config).
    pub const RING_HASH_POLICY: &str = "envoy.load_balancing_policies.ring_hash";
    /// Envoy's least-request policy extension (the fallback after peak EWMA).
    pub const LEAST_REQUEST_POLICY: &str = "envoy.load_balancing_policies.least_request";

    /// Route `metadata.filter_metadata` key of a route's data locality (`{region: "…"}`):
    /// Envoy has no field for pinning a route to a region.
    pub const LOCALITY_METADATA: &str = "nip.locality";
    /// Listener metadata: how long its access log files are kept (`retention_seconds`;
    /// a file log is rotated daily and older rotated files deleted).
    pub const ACCESS_LOG_METADATA: &str = "nip.access_log";
    /// Route metadata naming the tenant whose route it is (`{ id, priority? }`): its
    /// requests are counted in `nip_tenant_requests_total` and get the tenant's priority.
    /// Also the namespace of a request's tenant as dynamic metadata (`id`), which rate
    /// limit actions and RBAC principals read.
    pub const TENANT_METADATA: &str = "nip.tenant";
    /// NIP's HTTP filter naming the tenant of requests on routes no tenant owns; its
    /// `typed_config` is a `google.protobuf.Struct`: exactly one of `header` (a header
    /// name), `claim` (`org`, `org.id`: a claim of a token verified by an earlier
    /// `jwt_authn`) or `certificate: true` (the client certificate's principal), and
    /// `tenants: { ID: { priority?, principals?: [pattern] } }` (a pattern ending in `*`
    /// matches a prefix). Writes dynamic metadata under [`TENANT_METADATA`].
    pub const TENANT_FILTER: &str = "nip.tenant";

    /// Cluster `metadata.typed_filter_metadata` key of a service's adaptive concurrency
    /// (Envoy's `AdaptiveConcurrency` filter config, applied per cluster).
    pub const ADAPTIVE_CONCURRENCY_METADATA: &str = "nip.adaptive_concurrency";

    /// Cluster `metadata.filter_metadata` key of NIP's latency outlier detector
    /// (`{factor, minimum_hosts, request_volume}`): Envoy's `OutlierDetection` has none.
    pub const OUTLIER_LATENCY_METADATA: &str = "nip.outlier_latency";

    /// Upstream HTTP protocol options key in `typed_extension_protocol_options`.
    pub const HTTP_PROTOCOL_OPTIONS: &str =
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
}

/// "Over ADS": the config source of every resource NIP names (RDS, EDS, SDS, and LDS/CDS
/// in the bootstrap).
pub fn ads_config_source() -> envoy_types::pb::envoy::config::core::v3::ConfigSource {
    use envoy_types::pb::envoy::config::core::v3::{
        config_source, AggregatedConfigSource, ApiVersion, ConfigSource,
    };
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// One consistent set of xDS resources: what a proxy needs to serve traffic.
///
/// A file config is translated into one of these; later a control plane sends the same
/// resources over ADS. The proxy compiles a `ResourceSet` and nothing else.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    /// A version string that changes whenever any resource changes.
    pub version: String,
    /// LDS resources.
    pub listeners: Vec<Listener>,
    /// RDS resources.
    pub routes: Vec<RouteConfiguration>,
    /// CDS resources.
    pub clusters: Vec<Cluster>,
    /// EDS resources.
    pub endpoints: Vec<ClusterLoadAssignment>,
    /// SDS resources: the secrets listeners and clusters name ([`crate::secrets`]).
    pub secrets: Vec<Secret>,
}

impl ResourceSet {
    /// Computes a content version: equal resources give equal versions across runs.
    pub fn content_version(&self) -> String {
        let mut hash = Fnv64::default();
        for l in &self.listeners {
            hash.write(&l.encode_to_vec());
        }
        for r in &self.routes {
            hash.write(&r.encode_to_vec());
        }
        for c in &self.clusters {
            hash.write(&c.encode_to_vec());
        }
        for e in &self.endpoints {
            hash.write(&e.encode_to_vec());
        }
        for s in &self.secrets {
            hash.write(&s.encode_to_vec());
        }
        format!("{:016x}", hash.0)
    }
}

impl ResourceSet {
    /// The set as bytes for a file: one length-delimited `DiscoveryResponse` per type, in
    /// push order, so any xDS tooling can read it.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        fn response<M: Message + Name>(items: &[M], version: &str) -> DiscoveryResponse {
            DiscoveryResponse {
                version_info: version.to_string(),
                type_url: M::type_url(),
                resources: items
                    .iter()
                    .map(|m| Any {
                        type_url: M::type_url(),
                        value: m.encode_to_vec(),
                    })
                    .collect(),
                ..Default::default()
            }
        }
        let mut out = Vec::new();
        for message in [
            response(&self.secrets, &self.version),
            response(&self.clusters, &self.version),
            response(&self.endpoints, &self.version),
            response(&self.listeners, &self.version),
            response(&self.routes, &self.version),
        ] {
            out.extend(message.encode_length_delimited_to_vec());
        }
        out
    }

    /// Reads what [`ResourceSet::to_file_bytes`] wrote; an error says what is wrong.
    pub fn from_file_bytes(mut bytes: &[u8]) -> Result<ResourceSet, String> {
        fn decode_all<M: Message + Default + Name>(
            response: &DiscoveryResponse,
        ) -> Result<Vec<M>, String> {
            response
                .resources
                .iter()
                .enumerate()
                .map(|(i, any)| {
                    if any.type_url != M::type_url() {
                        return Err(format!(
                            "resources[{i}]: type {} in a {} list",
                            any.type_url,
                            M::type_url()
                        ));
                    }
                    M::decode(any.value.as_slice()).map_err(|e| format!("resources[{i}]: {e}"))
                })
                .collect()
        }
        let mut set = ResourceSet::default();
        while !bytes.is_empty() {
            let response = DiscoveryResponse::decode_length_delimited(&mut bytes)
                .map_err(|e| format!("not a saved resource set: {e}"))?;
            set.version = response.version_info.clone();
            match response.type_url.as_str() {
                SECRET_TYPE => set.secrets = decode_all(&response)?,
                CLUSTER_TYPE => set.clusters = decode_all(&response)?,
                ENDPOINT_TYPE => set.endpoints = decode_all(&response)?,
                LISTENER_TYPE => set.listeners = decode_all(&response)?,
                ROUTE_TYPE => set.routes = decode_all(&response)?,
                other => return Err(format!("unexpected type {other:?}")),
            }
        }
        if set.listeners.is_empty() {
            return Err("no listener in the saved set".to_string());
        }
        Ok(set)
    }
}

/// FNV-1a, 64 bit: a stable, dependency-free content hash for versions.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate resources so that moving bytes between two of them changes the hash.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// The sidecar's cluster of where each connection was going before it was redirected.
pub const SIDECAR_PASSTHROUGH: &str = "sidecar_passthrough";
/// The sidecar's outbound listener.
pub const SIDECAR_OUTBOUND: &str = "sidecar_outbound";
/// The sidecar's inbound listener.
pub const SIDECAR_INBOUND: &str = "sidecar_inbound";
/// Envoy's upgrade type of CONNECT tunnels.
pub const CONNECT_UPGRADE: &str = "CONNECT";

/// The name of the plaintext cluster `tcp_proxy` chains reach service `name` by: mesh
/// mutual TLS is for its HTTP (the `tcp_proxy` filter does not originate TLS), so the
/// control plane leaves this one plaintext.
pub fn tcp_cluster_name(name: &str) -> String {
    format!("tcp|{name}")
}

/// Whether `cluster` is one of [`tcp_cluster_name`]'s.
pub fn is_tcp_cluster(cluster: &str) -> bool {
    cluster.starts_with("tcp|")
}

/// The role a listener is for (its `nip.role` metadata), if it names one.
pub fn listener_role(
    listener: &envoy_types::pb::envoy::config::listener::v3::Listener,
) -> Option<&str> {
    role_in(listener.metadata.as_ref()?)
}

/// The role a proxy declares in its bootstrap node's metadata, if any.
pub fn node_role(
    bootstrap: &envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap,
) -> Option<&str> {
    let metadata = bootstrap.node.as_ref()?.metadata.as_ref()?;
    match metadata.fields.get(names::ROLE_METADATA)?.kind.as_ref()? {
        envoy_types::pb::google::protobuf::value::Kind::StringValue(role) => Some(role),
        _ => None,
    }
}

fn role_in(metadata: &envoy_types::pb::envoy::config::core::v3::Metadata) -> Option<&str> {
    let fields = &metadata.filter_metadata.get(names::ROLE_METADATA)?.fields;
    match fields.get("role")?.kind.as_ref()? {
        envoy_types::pb::google::protobuf::value::Kind::StringValue(role) => Some(role),
        _ => None,
    }
}

/// Listener metadata naming `role` (merged into `metadata` when given).
pub fn with_role(
    metadata: Option<envoy_types::pb::envoy::config::core::v3::Metadata>,
    role: &str,
) -> envoy_types::pb::envoy::config::core::v3::Metadata {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let mut metadata = metadata.unwrap_or_default();
    metadata.filter_metadata.insert(
        names::ROLE_METADATA.to_string(),
        Struct {
            fields: [(
                "role".to_string(),
                Value {
                    kind: Some(Kind::StringValue(role.to_string())),
                },
            )]
            .into(),
        },
    );
    metadata
}
