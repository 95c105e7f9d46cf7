//! The shape of a v4 config document. Field names are what users type; defaults are what an
//! Envoy or Kong user would expect when a field is left out.

use super::HumanDuration;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;

/// A whole v4 config document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this proxy is: reported to the control plane and used for locality decisions.
    #[serde(default)]
    pub node: NodeConfig,
    /// The admin port (health, metrics, config dump).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The listener that takes client traffic.
    #[serde(default)]
    pub api_gateway: GatewayConfig,
    /// Upstream services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// Routes, tried in order within the most specific matching host.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Plugins by name. A plugin written with nothing under it (`name:`, or `name: null`
    /// as a YAML writer puts it) is one with every setting left at its default.
    #[serde(default, deserialize_with = "plugins_allowing_empty")]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// A tenant block from the v4 plan: the whole config is this tenant's.
    #[serde(default)]
    pub tenant: Option<TenantConfig>,
    /// Several tenants' blocks, by id: routes and services say whose they are
    /// (`routes[].tenant`, `services.X.tenant`).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// How a request on a route no tenant owns names its tenant: a header (set by a
    /// trusted layer in front, e.g. the authorization service), a verified JWT claim, or
    /// the client certificate (each tenant's `principals`). Its tenant's quota, metrics
    /// and RBAC principals (`tenant:`) apply to it, and its priority unless a header
    /// named it.
    #[serde(default)]
    pub tenant_key: Option<TenantKeyConfig>,
    /// Authentication (JWT providers) and authorization (RBAC) at the edge.
    #[serde(default)]
    pub auth: super::AuthConfig,
    /// Where routes' `rate_limit` with `scope: global` are counted.
    #[serde(default)]
    pub rate_limit_service: Option<RateLimitServiceConfig>,
    /// Request traces: OpenTelemetry spans exported over OTLP.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Where a proxy gets listeners, routes and clusters over ADS; when set, the file's own
    /// `api_gateway`, `services`, `routes` and `plugins` are not served by this proxy.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    /// Run as a transparent sidecar (`nip iptables setup` sends the pod's traffic here)
    /// instead of binding `api_gateway.address`.
    #[serde(default)]
    pub sidecar: Option<SidecarConfig>,
}

/// The sidecar short form: the listeners an Envoy sidecar gets, on the ports the
/// interception rules redirect to. Outbound, a connection's first bytes tell HTTP (routed by
/// `routes`, with `api_gateway`'s client limits, plugins and access log; a request no route
/// takes goes on to where it was going) from anything else (passed to its original
/// destination untouched, TLS included). Inbound, HTTP is counted and logged on its way to
/// the application, and everything else passes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Where outbound connections are redirected (istio-iptables' 15001).
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// Where inbound connections are redirected (15006).
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// How long to wait for a client's first bytes to tell HTTP, TLS and other protocols
    /// apart (Istio's `protocolDetectionTimeout`); a protocol whose server speaks first
    /// passes as TCP after it.
    #[serde(default = "default_protocol_detection_timeout")]
    pub protocol_detection_timeout: HumanDuration,
    /// Take mesh mutual TLS from meshed peers on the inbound side (the workload
    /// certificate; clients of the mesh's trust bundle only, their identity seen), and let
    /// the control plane send this fleet's requests to meshed peers over it. Plaintext
    /// still comes in from peers outside the mesh (Istio's permissive mode).
    #[serde(default)]
    pub mesh: bool,
    /// Take IPv6 connections too (`nip iptables setup --ipv6` redirects them): the
    /// listeners also bind `[::]` on their ports.
    #[serde(default)]
    pub ipv6: bool,
}

/// The outbound redirect port.
pub const DEFAULT_SIDECAR_OUTBOUND_PORT: u16 = 15001;
/// The inbound redirect port.
pub const DEFAULT_SIDECAR_INBOUND_PORT: u16 = 15006;

fn default_outbound_port() -> u16 {
    DEFAULT_SIDECAR_OUTBOUND_PORT
}

fn default_inbound_port() -> u16 {
    DEFAULT_SIDECAR_INBOUND_PORT
}

fn default_protocol_detection_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(100))
}

/// Node identity, as in Envoy's bootstrap `node`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique id of this proxy; defaults to `nip-<hostname>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Cluster name this node belongs to (Envoy's `node.cluster`).
    #[serde(default = "default_node_cluster")]
    pub cluster: String,
    /// Region this proxy runs in.
    #[serde(default)]
    pub region: Option<String>,
    /// Zone within the region.
    #[serde(default)]
    pub zone: Option<String>,
    /// What this proxy is in the fleet (default: `sidecar` when this config has
    /// `sidecar:`, else `edge`). A control plane's config with `sidecar:` holds the
    /// listeners of both roles; each proxy serves those of its own.
    #[serde(default)]
    pub role: Option<NodeRole>,
}

/// A proxy's role: which of a config's listeners it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// An edge gateway: the `api_gateway` listener.
    Edge,
    /// A pod's sidecar: the `sidecar:` listeners.
    Sidecar,
}

impl NodeRole {
    /// Its name in listener and node metadata (`nip.role`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Edge => "edge",
            NodeRole::Sidecar => "sidecar",
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: None,
            cluster: default_node_cluster(),
            region: None,
            zone: None,
            role: None,
        }
    }
}

fn default_node_cluster() -> String {
    "nip".to_string()
}

/// Where the admin server listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` or `:port`; defaults to `127.0.0.1:9901` like Envoy's examples.
    #[serde(default = "default_admin_address")]
    pub address: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin_address(),
        }
    }
}

fn default_admin_address() -> String {
    "127.0.0.1:9901".to_string()
}

/// The client-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// `host:port` or `:port` (all interfaces).
    #[serde(default = "default_gateway_address")]
    pub address: String,
    /// TLS termination.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Accept HTTP/2 with prior knowledge (h2c) next to HTTP/1.1 on a plaintext port.
    #[serde(default = "default_true")]
    pub h2c: bool,
    /// One line per request, off by default.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// From a request's first byte to the end of its head (408 after); `0s` disables.
    /// Envoy's HCM field; NIP's default is 10 s where Envoy has none.
    #[serde(default)]
    pub request_headers_timeout: Option<HumanDuration>,
    /// A connection with no request in progress closes after this (default 60 s; Envoy's
    /// `common_http_protocol_options.idle_timeout`); `0s` disables.
    #[serde(default)]
    pub idle_timeout: Option<HumanDuration>,
    /// A request whose body makes no progress for this long ends (default 5 min, Envoy's).
    #[serde(default)]
    pub stream_idle_timeout: Option<HumanDuration>,
    /// Connections close (after their current request) once this old; off by default.
    #[serde(default)]
    pub max_connection_duration: Option<HumanDuration>,
    /// Requests served on one connection before it closes; unlimited by default.
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    /// Size limit of a request head in KiB, 1–8192 (431 beyond; default 60, Envoy's).
    #[serde(default)]
    pub max_request_headers_kb: Option<u32>,
    /// Header fields a request may carry (431 beyond; default 100, Envoy's).
    #[serde(default)]
    pub max_headers_count: Option<u32>,
    /// Client connections open at once; new ones beyond are closed at accept. Default:
    /// 80 % of the process's descriptor limit.
    #[serde(default)]
    pub max_active_downstream_connections: Option<u64>,
    /// Take `x-nip-priority` from this listener's clients (off: it is removed, so a
    /// stranger cannot raise its own priority).
    #[serde(default)]
    pub trust_priority_header: bool,
}

/// NIP's `request_headers_timeout` when none is set (HAProxy's `timeout http-request`).
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// NIP's `idle_timeout` when none is set.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Envoy's default `stream_idle_timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Envoy's default `max_request_headers_kb`.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
/// Envoy's ceiling of `max_request_headers_kb`.
pub const MAX_REQUEST_HEADERS_KB_CEILING: u32 = 8192;
/// Envoy's default `max_headers_count`.
pub const DEFAULT_MAX_HEADERS_COUNT: u32 = 100;

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            address: default_gateway_address(),
            tls: TlsConfig::default(),
            h2c: true,
            access_log: AccessLogConfig::default(),
            request_headers_timeout: None,
            idle_timeout: None,
            stream_idle_timeout: None,
            max_connection_duration: None,
            max_requests_per_connection: None,
            max_request_headers_kb: None,
            max_headers_count: None,
            max_active_downstream_connections: None,
            trust_priority_header: false,
        }
    }
}

fn default_gateway_address() -> String {
    ":8080".to_string()
}

fn default_true() -> bool {
    true
}

/// Downstream TLS. HTTP/2 is offered through ALPN whenever TLS is on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Terminate TLS on the listener.
    #[serde(default)]
    pub enabled: bool,
    /// PEM certificate chain file.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// PEM private key file.
    #[serde(default)]
    pub key_file: Option<String>,
    /// More certificates for other names: each handshake gets the one whose DNS SANs name
    /// the client's SNI (exactly, then by `*.` wildcard), else `cert_file`'s. Certificate
    /// files are watched: a replaced file serves from the next handshake on.
    #[serde(default)]
    pub certificates: Vec<CertificateFiles>,
    /// PEM roots client certificates must chain to (Envoy's
    /// `validation_context.trusted_ca`): clients may present one, and a presented one must
    /// verify.
    #[serde(default)]
    pub client_ca_file: Option<String>,
    /// Refuse clients without a verified certificate at the handshake (mutual TLS).
    #[serde(default)]
    pub require_client_certificate: bool,
    /// Mesh mutual TLS: serve this proxy's workload certificate (SDS secret `default`)
    /// and require clients with a certificate from the mesh's CA (SDS secret `ROOTCA`,
    /// pushed again when the CA rotates). Needs a control plane; replaces the certificate
    /// and client CA files.
    #[serde(default)]
    pub mesh: bool,
}

/// A certificate chain and its key (PEM files).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain file.
    pub cert_file: String,
    /// PEM private key file.
    pub key_file: String,
}

/// Access log settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write one line per request.
    #[serde(default)]
    pub enabled: bool,
    /// `json` (one object per line) or `text` (Envoy's default format).
    #[serde(default)]
    pub format: AccessLogFormat,
    /// `stdout` or a file path.
    #[serde(default = "default_access_log_path")]
    pub path: String,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            format: AccessLogFormat::default(),
            path: default_access_log_path(),
        }
    }
}

fn default_access_log_path() -> String {
    "stdout".to_string()
}

/// How access log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Envoy's default text format.
    Text,
}

/// TLS to a service's endpoints: their certificate must chain to `ca_file` (else the
/// system's roots) and name `sni` (else the endpoint's host name or IP); `cert_file` and
/// `key_file` give the proxy's own certificate for mutual TLS.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The name sent as SNI and verified in the endpoint's certificate.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM roots the endpoint's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM client certificate chain (mutual TLS).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// PEM client key (mutual TLS).
    #[serde(default)]
    pub key_file: Option<String>,
    /// Mesh mutual TLS: present this proxy's workload certificate (SDS secret `default`)
    /// and trust the mesh's CA (SDS secret `ROOTCA`); the endpoint must carry a SPIFFE ID
    /// (`match_typed_subject_alt_names` narrows it). Replaces `ca_file`, `cert_file` and
    /// `key_file`.
    #[serde(default)]
    pub mesh: bool,
    /// Names the endpoint's certificate must carry, one of them at least (Envoy's
    /// `match_typed_subject_alt_names`): when given, `sni` is sent but not checked.
    #[serde(default)]
    pub match_typed_subject_alt_names: Vec<SubjectAltNameMatcherConfig>,
}

/// One accepted name of an endpoint's certificate.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectAltNameMatcherConfig {
    /// `URI` (a SPIFFE ID is one) or `DNS`.
    pub san_type: SanTypeConfig,
    /// How the name is compared.
    pub matcher: StringMatcherConfig,
}

/// The kinds of subject alternative names NIP matches.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SanTypeConfig {
    /// A URI name.
    #[serde(rename = "URI")]
    Uri,
    /// A DNS name.
    #[serde(rename = "DNS")]
    Dns,
}

/// A string comparison (Envoy's `StringMatcher`): exactly one field is set.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StringMatcherConfig {
    /// Equal to.
    #[serde(default)]
    pub exact: Option<String>,
    /// Starts with.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Ends with.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Contains.
    #[serde(default)]
    pub contains: Option<String>,
    /// The whole string matches this regex.
    #[serde(default)]
    pub regex: Option<String>,
}

/// An upstream service: a set of endpoints and how to use them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Deployment hint for `deploy/` (ignored by the proxy).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Deployment hint for `deploy/` (ignored by the proxy).
    #[serde(default)]
    pub resources: Option<ResourceHints>,
    /// Static endpoints: `"ip:port"` or a map with address, region, zone and weight.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// No endpoints of its own: each request goes where the client's connection was going
    /// before iptables redirected it to the proxy (Envoy's `ORIGINAL_DST` cluster, the
    /// sidecar's pass-through).
    #[serde(default)]
    pub original_destination: bool,
    /// The addresses clients reach the service by (`ip:port`: a Kubernetes ClusterIP and
    /// port, Istio's ServiceEntry addresses). A sidecar sends connections redirected from
    /// one of them to the service itself: HTTP with its routes' retries and balancing (and
    /// mesh mutual TLS to meshed endpoints), anything else balanced as TCP.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// TLS to the endpoints (Envoy's `UpstreamTlsContext`).
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// The tenant (in `tenants`) whose service this is (an isolated tenant's routes reach
    /// only its own).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Load-balancing policy (default: `latency` when the endpoints span several regions,
    /// `round_robin` otherwise; see [`ServiceConfig::lb_policy`]).
    #[serde(default)]
    pub lb: Option<LbPolicy>,
    /// Tuning of `lb: latency`.
    #[serde(default)]
    pub latency: Option<LatencyConfig>,
    /// Ring size of `lb: ring_hash`.
    #[serde(default)]
    pub ring_hash: Option<RingHashConfig>,
    /// Eject endpoints that keep failing (Envoy's outlier detection).
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// Limits on what the proxy sends to the service at once.
    #[serde(default)]
    pub circuit_breakers: Option<CircuitBreakersConfig>,
    /// A concurrency limit that follows the service's latency (Envoy's gradient
    /// controller); requests over it are shed by priority, low first.
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConcurrencyConfig>,
    /// Locality-weighted balancing: each locality (`region` or `region/zone`) gets this
    /// share of traffic (scaled down as its endpoints lose health), then endpoints share it.
    #[serde(default)]
    pub locality_weights: BTreeMap<String, u32>,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time allowed to open a TCP connection to an endpoint (default 5 s, as in Envoy).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// Active HTTP health checking.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
}

impl ServiceConfig {
    /// The policy in effect: the configured one, else `latency` for a service deployed in
    /// several regions (traffic should go where it is answered fastest) unless it weighs its
    /// localities itself, and `round_robin` otherwise.
    pub fn lb_policy(&self) -> LbPolicy {
        self.lb.unwrap_or_else(|| {
            if !self.locality_weights.is_empty() {
                return LbPolicy::RoundRobin;
            }
            let mut regions = self.endpoints.iter().map(|e| e.region.as_deref());
            let first = regions.next().flatten();
            if regions.any(|r| r != first) {
                LbPolicy::Latency
            } else {
                LbPolicy::RoundRobin
            }
        })
    }
}

/// CPU and memory hints used by the Kubernetes manifests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceHints {
    /// Kubernetes CPU quantity, e.g. `"500m"`.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Kubernetes memory quantity, e.g. `"512Mi"`.
    #[serde(default)]
    pub memory: Option<String>,
}

/// One upstream endpoint, written `"ip:port"` or as a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `ip:port` or `hostname:port`.
    pub address: String,
    /// Region of the endpoint.
    pub region: Option<String>,
    /// Zone of the endpoint.
    pub zone: Option<String>,
    /// Sub-zone of the endpoint (a rack, a cell).
    pub sub_zone: Option<String>,
    /// Relative share of traffic (default 1).
    pub weight: u32,
    /// Priority level (0 is preferred; higher levels take traffic as lower ones lose health,
    /// with Envoy's 1.4 overprovisioning factor).
    pub priority: u32,
}

/// The map form of an endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFields {
    /// `ip:port` or `hostname:port`.
    pub address: String,
    /// Region of the endpoint.
    #[serde(default)]
    pub region: Option<String>,
    /// Zone of the endpoint.
    #[serde(default)]
    pub zone: Option<String>,
    /// Sub-zone of the endpoint.
    #[serde(default)]
    pub sub_zone: Option<String>,
    /// Relative share of traffic (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Priority level (default 0, the preferred one).
    #[serde(default)]
    pub priority: u32,
}

fn default_weight() -> u32 {
    1
}

/// Accepts both `- "127.0.0.1:9000"` and `- {address: …, region: …}`.
impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EndpointVisitor)
    }
}

struct EndpointVisitor;
impl<'de> Visitor<'de> for EndpointVisitor {
    type Value = EndpointConfig;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"host:port\" or a map with `address`")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointConfig, E> {
        Ok(EndpointConfig {
            address: v.to_string(),
            region: None,
            zone: None,
            sub_zone: None,
            weight: default_weight(),
            priority: 0,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<EndpointConfig, A::Error> {
        let fields = EndpointFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(EndpointConfig {
            address: fields.address,
            region: fields.region,
            zone: fields.zone,
            sub_zone: fields.sub_zone,
            weight: fields.weight,
            priority: fields.priority,
        })
    }
}

/// How a service picks an endpoint for each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two random choices, fewer active requests wins.
    LeastRequest,
    /// Weighted random.
    Random,
    /// Peak-EWMA latency × (in flight + 1), power of two random choices: traffic goes where
    /// it will be answered fastest.
    Latency,
    /// Consistent hashing: requests with the same key (from the route's `hash_policy`) go
    /// to the same endpoint while it is usable; a change of endpoints moves few keys.
    RingHash,
}

/// Ring size of `lb: ring_hash` (Envoy's `RingHashLbConfig`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingHashConfig {
    /// Fewest points on the ring (default 1024).
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
    /// Most points on the ring (default 8M).
    #[serde(default)]
    pub maximum_ring_size: Option<u64>,
}

/// One source of a request's key for `ring_hash` (Envoy's `hash_policy`); set one of
/// `header`, `cookie`, `source_ip`, `query_parameter`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashPolicyConfig {
    /// A request header's value.
    #[serde(default)]
    pub header: Option<String>,
    /// A cookie's value.
    #[serde(default)]
    pub cookie: Option<String>,
    /// The client's IP address.
    #[serde(default)]
    pub source_ip: bool,
    /// A query parameter's value.
    #[serde(default)]
    pub query_parameter: Option<String>,
    /// When this entry finds a key, later entries are not consulted.
    #[serde(default)]
    pub terminal: bool,
}

/// Tuning of `lb: latency`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyConfig {
    /// Time constant of the latency average's decay toward faster answers (default 10s).
    #[serde(default)]
    pub decay: Option<HumanDuration>,
    /// Latency assumed for an endpoint not measured yet (default 30ms).
    #[serde(default)]
    pub default_rtt: Option<HumanDuration>,
}

/// Outlier detection of a service; unset fields take Envoy's defaults.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Failures (5xx, connect failures, resets, timeouts) in a row that eject (default 5).
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    /// Gateway failures (502/503/504 and the same local failures) in a row that eject
    /// (off unless set).
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often an ejected-and-returned endpoint earns one step back (default 10s).
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// First ejection's length; the nth is n times longer (default 30s).
    #[serde(default)]
    pub base_ejection_time: Option<HumanDuration>,
    /// Longest ejection (default 300s).
    #[serde(default)]
    pub max_ejection_time: Option<HumanDuration>,
    /// Most of the service ejected at once, in percent (default 10; one endpoint may
    /// always be ejected).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    /// Success-rate detector: endpoints needed to judge (default 5).
    #[serde(default)]
    pub success_rate_minimum_hosts: Option<u32>,
    /// Success-rate detector: requests per interval an endpoint needs (default 100).
    #[serde(default)]
    pub success_rate_request_volume: Option<u32>,
    /// Success-rate detector: eject below mean − this × stdev (default 1.9).
    #[serde(default)]
    pub success_rate_stdev_factor: Option<f64>,
    /// Success-rate detector: percent of findings enforced (default 100; 0 switches it off).
    #[serde(default)]
    pub enforcing_success_rate: Option<u32>,
    /// Failure-percentage detector: eject at this failure percentage (off unless set).
    #[serde(default)]
    pub failure_percentage_threshold: Option<u32>,
    /// Failure-percentage detector: endpoints needed to judge (default 5).
    #[serde(default)]
    pub failure_percentage_minimum_hosts: Option<u32>,
    /// Failure-percentage detector: requests per interval an endpoint needs (default 50).
    #[serde(default)]
    pub failure_percentage_request_volume: Option<u32>,
    /// Latency detector: eject an endpoint whose mean answer time is above this × the
    /// median endpoint's (off unless set; e.g. 3).
    #[serde(default)]
    pub latency_factor: Option<f64>,
    /// Latency detector: endpoints needed to judge (default 3).
    #[serde(default)]
    pub latency_minimum_hosts: Option<u32>,
    /// Latency detector: answers per interval an endpoint needs (default 50).
    #[serde(default)]
    pub latency_request_volume: Option<u32>,
}

/// Circuit breakers of a service (Envoy's defaults: 1024 requests, 3 retries).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakersConfig {
    /// Requests in flight to the service; more are answered 503 with flag `UO`.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Retries in flight to the service; more are not made.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Retries in flight as a share of requests in flight (replaces `max_retries`).
    #[serde(default)]
    pub retry_budget: Option<RetryBudgetConfig>,
    /// Connections in use to the service (HTTP/1: one per request in flight); more
    /// requests wait for one (default 1024).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection; more are answered 503 `UO` (default 1024).
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
}

/// Envoy's retry budget; unset fields take Envoy's defaults (20 %, 3).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries in flight may be this percent of the requests in flight (default 20).
    #[serde(default)]
    pub percent: Option<f64>,
    /// Retries always allowed in flight (default 3).
    #[serde(default)]
    pub min_retry_concurrency: Option<u32>,
}

/// Adaptive concurrency of a service (Envoy's gradient controller); unset fields take
/// Envoy's defaults. `{}` switches it on with all defaults.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrencyConfig {
    /// Percentile of a window's latencies compared with the min RTT (default 50).
    #[serde(default)]
    pub percentile: Option<f64>,
    /// How often the limit is recomputed (default 100ms).
    #[serde(default)]
    pub update_interval: Option<HumanDuration>,
    /// Highest limit (default 1000).
    #[serde(default)]
    pub max_limit: Option<u32>,
    /// Lowest limit (default 3).
    #[serde(default)]
    pub min_limit: Option<u32>,
    /// How often the latency without load (min RTT) is measured again (default 60s).
    #[serde(default)]
    pub min_rtt_interval: Option<HumanDuration>,
    /// Requests one min RTT measurement takes (default 50).
    #[serde(default)]
    pub min_rtt_requests: Option<u32>,
    /// Random delay added to `min_rtt_interval`, in percent of it (default 10).
    #[serde(default)]
    pub min_rtt_jitter: Option<f64>,
    /// Limit while the min RTT is measured (default 3).
    #[serde(default)]
    pub min_concurrency: Option<u32>,
    /// How much slower than the min RTT a window may be before the limit shrinks, in
    /// percent (default 25).
    #[serde(default)]
    pub buffer: Option<f64>,
    /// A known min RTT: it is then never measured.
    #[serde(default)]
    pub min_rtt: Option<HumanDuration>,
    /// Status of a shed request (default 503).
    #[serde(default)]
    pub status: Option<u16>,
}

/// The protocol spoken to a service's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), needed for gRPC backends.
    Http2,
}

/// Active HTTP health checking of each endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path to GET.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Host header to send (default: the endpoint address).
    #[serde(default)]
    pub host: Option<String>,
    /// Time between checks.
    #[serde(default = "default_health_interval")]
    pub interval: HumanDuration,
    /// Time allowed for one check.
    #[serde(default = "default_health_timeout")]
    pub timeout: HumanDuration,
    /// Failed checks in a row before an endpoint is marked unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row before an unhealthy endpoint is used again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Statuses counted as healthy (default 200–299).
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
}

fn default_health_path() -> String {
    "/healthz".to_string()
}
fn default_health_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(5))
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(1))
}
fn default_unhealthy_threshold() -> u32 {
    2
}
fn default_healthy_threshold() -> u32 {
    1
}

/// One route: a match and where matching requests go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs (default `route-<index>`).
    #[serde(default)]
    pub name: Option<String>,
    /// What requests this route takes (default: all).
    #[serde(default, rename = "match")]
    pub matcher: RouteMatchConfig,
    /// The service to send to (or use `split`).
    #[serde(default)]
    pub service: Option<String>,
    /// A weighted split across services (canary).
    #[serde(default)]
    pub split: Vec<SplitConfig>,
    /// The request's whole budget upstream, as Envoy's route `timeout`: every try, the
    /// back-off between them and the response body must fit in it (default 15 s; `0s`: no
    /// budget, for long streams — bound them with `idle_timeout`). Past it: 504, flag `UT`.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// The longest wait for each read from the upstream — the response head, then each
    /// body chunk (Envoy's route `idle_timeout`; default: only `timeout` bounds it).
    #[serde(default)]
    pub idle_timeout: Option<HumanDuration>,
    /// Retries.
    #[serde(default)]
    pub retries: Option<RetryConfig>,
    /// Plugins this route runs, in this order.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// At most `requests` per `per` on each proxy (bursts up to `burst`, default
    /// `requests`); beyond, 429 with `retry-after` and `x-ratelimit-*` (Envoy's
    /// `local_ratelimit` per route).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// The tokens the route requires and who may use it (`auth.jwt`, `auth.rbac`).
    #[serde(default)]
    pub auth: Option<super::RouteAuthConfig>,
    /// The tenant (in `tenants`) whose route this is: its block's quota, plugin policy
    /// and data rules apply.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Data locality: only endpoints in this region ever serve the route; when none is
    /// usable the answer is 503 (flag `UH`) rather than another region.
    #[serde(default)]
    pub locality: Option<String>,
    /// Where the key of `lb: ring_hash` services comes from; entries that find a key are
    /// combined (Envoy's `hash_policy`).
    #[serde(default)]
    pub hash_policy: Vec<HashPolicyConfig>,
    /// Forward with the matched `path_prefix` (or `path`) swapped for this (Envoy's
    /// `prefix_rewrite`).
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Forward with the path rewritten by a regex (Envoy's `regex_rewrite`; `\1` groups).
    #[serde(default)]
    pub regex_rewrite: Option<RegexRewriteConfig>,
    /// Forward with this `Host` (Envoy's `host_rewrite_literal`).
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Forward with the endpoint's host name as `Host` (Envoy's `auto_host_rewrite`).
    #[serde(default)]
    pub auto_host_rewrite: bool,
    /// Headers added to the forwarded request (values may use `%VARIABLE%`s).
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderAddConfig>,
    /// Headers removed from the forwarded request.
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to the response.
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderAddConfig>,
    /// Headers removed from the response.
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    /// Answer with a redirect instead of forwarding (Envoy's `redirect`).
    #[serde(default)]
    pub redirect: Option<RedirectConfig>,
    /// Answer with a fixed response instead of forwarding (Envoy's `direct_response`).
    #[serde(default)]
    pub direct_response: Option<DirectResponseConfig>,
}

/// Envoy's `RegexMatchAndSubstitute`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteConfig {
    /// What to match in the path (every match is substituted).
    pub pattern: String,
    /// What replaces each match; `\1`… are the pattern's groups.
    pub substitution: String,
}

/// A header to add (Envoy's `HeaderValueOption`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderAddConfig {
    /// The header.
    pub name: String,
    /// Its value: text with `%DOWNSTREAM_REMOTE_ADDRESS%`,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`, `%DOWNSTREAM_LOCAL_ADDRESS%`,
    /// `%UPSTREAM_HOST%`, `%START_TIME%`, `%PROTOCOL%` or `%REQ(header)%` (`%%` for `%`).
    pub value: String,
    /// `append_if_exists_or_add` (default), `add_if_absent`, `overwrite_if_exists_or_add`
    /// or `overwrite_if_exists` (Envoy's `append_action`).
    #[serde(default)]
    pub append_action: Option<String>,
    /// Add it even when its value is empty.
    #[serde(default)]
    pub keep_empty_value: bool,
}

/// Envoy's `RedirectAction`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// To `https`.
    #[serde(default)]
    pub https_redirect: bool,
    /// To this scheme (`http` or `https`).
    #[serde(default)]
    pub scheme_redirect: Option<String>,
    /// To this host.
    #[serde(default)]
    pub host_redirect: Option<String>,
    /// To this port.
    #[serde(default)]
    pub port_redirect: Option<u16>,
    /// To this path (may carry a query).
    #[serde(default)]
    pub path_redirect: Option<String>,
    /// To the path with the matched prefix swapped for this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// To the path rewritten by a regex.
    #[serde(default)]
    pub regex_rewrite: Option<RegexRewriteConfig>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default)]
    pub response_code: Option<u16>,
    /// Drop the query.
    #[serde(default)]
    pub strip_query: bool,
}

/// Envoy's `DirectResponseAction`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseConfig {
    /// The status (200–599).
    pub status: u16,
    /// The body (at most 4 KiB, Envoy's limit).
    #[serde(default)]
    pub body: Option<String>,
}

/// The conditions a request must meet for a route. All given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchConfig {
    /// `api.example.com`, `*.example.com`, or `*` (default).
    #[serde(default)]
    pub host: Option<String>,
    /// The exact path.
    #[serde(default)]
    pub path: Option<String>,
    /// A path prefix.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// A regex the whole path must match.
    #[serde(default)]
    pub path_regex: Option<String>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HeaderMatchConfig>,
    /// Allowed methods (any when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Match HTTP/1.1 CONNECT requests (for `host`, their authority) and tunnel them:
    /// the proxy answers 200 and relays the connection's bytes to the service as TCP
    /// (Envoy's `connect_matcher` with a terminating `connect_config`). Other routes never
    /// match CONNECT.
    #[serde(default)]
    pub connect: bool,
}

/// One header condition. Exactly one of `exact`, `prefix`, `regex`, `present` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    /// Header name (case-insensitive).
    pub name: String,
    /// The value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The whole value matches this regex.
    #[serde(default)]
    pub regex: Option<String>,
    /// The header is (true) or is not (false) present.
    #[serde(default)]
    pub present: Option<bool>,
}

/// One leg of a weighted split.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Service name.
    pub service: String,
    /// Relative weight.
    pub weight: u32,
}

/// Retry policy of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Conditions: `connect-failure`, `5xx`, `gateway-error`, `reset`,
    /// `retriable-status-codes` (the statuses in `retriable_status_codes`).
    #[serde(default = "default_retry_on")]
    pub on: Vec<String>,
    /// The statuses `retriable-status-codes` retries (Envoy's `retriable_status_codes`).
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    /// The wait before each retry: exponential from `base_interval` with full jitter, at
    /// most `max_interval` (Envoy's `retry_back_off`; default 25 ms and 10 × base).
    #[serde(default)]
    pub back_off: Option<BackOffConfig>,
    /// Retries after the first try (default 1, as in Envoy).
    #[serde(default = "default_retry_max")]
    pub max: u32,
    /// Longest wait for each try's answer; a try that times out is retried when `on` has
    /// `5xx` or `gateway-error` (Envoy's `per_try_timeout`).
    #[serde(default)]
    pub per_try_timeout: Option<HumanDuration>,
}

/// Envoy's `retry_back_off`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackOffConfig {
    /// The first retry waits up to this (more than 0).
    pub base_interval: HumanDuration,
    /// No retry waits more (default 10 × `base_interval`; at least `base_interval`).
    #[serde(default)]
    pub max_interval: Option<HumanDuration>,
}

fn default_retry_on() -> Vec<String> {
    vec!["connect-failure".to_string()]
}
fn default_retry_max() -> u32 {
    1
}

/// Reads `plugins`, taking a plugin that is null (written with nothing under it) as one
/// with every setting at its default: YAML spells "nothing" both as an empty value and
/// as `null`, and serde takes only the first for a struct.
fn plugins_allowing_empty<'de, D>(
    deserializer: D,
) -> Result<BTreeMap<String, PluginConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let plugins: BTreeMap<String, Option<PluginConfig>> = Deserialize::deserialize(deserializer)?;
    plugins
        .into_iter()
        .map(|(name, plugin)| {
            let plugin = match plugin {
                Some(plugin) => plugin,
                None => PluginConfig::deserialize(
                    serde::de::value::MapDeserializer::<_, D::Error>::new(std::iter::empty::<(
                        &str,
                        &str,
                    )>()),
                )?,
            };
            Ok((name, plugin))
        })
        .collect()
}

/// The control plane a proxy follows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `host:port` of its ADS (gRPC) endpoint.
    pub address: String,
    /// A file where the proxy keeps the last set it accepted, so that a restart while the
    /// control plane is unreachable still serves (after a short wait for the control plane).
    #[serde(default)]
    pub last_good: Option<String>,
    /// The control plane's trust bundle (PEM): turns on mutual TLS to it, and joining.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// A join token (or `$NIP_JOIN_TOKEN`) that gets the proxy its first certificate.
    #[serde(default)]
    pub join_token_file: Option<String>,
    /// Where the proxy keeps its key and certificate between restarts (files 0600);
    /// default: `identity/` next to `last_good`, else kept in memory only.
    #[serde(default)]
    pub identity_dir: Option<String>,
    /// Stream this proxy's access records to the control plane (Envoy's gRPC access log
    /// service, over the same mutual TLS), where `nip logs --follow` and the dashboard read
    /// them. From a bounded buffer: a request never waits for it, and what the stream
    /// cannot take is dropped and counted.
    #[serde(default)]
    pub stream_access_logs: bool,
}

/// A plugin: a proxy-wasm module and its configuration. Routes name the plugins they run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Plugin version (informational).
    #[serde(default)]
    pub version: Option<String>,
    /// Whether routes may run it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Isolation mechanism: `wasm` (a proxy-wasm module in the proxy) or `process` (a
    /// process of its own the proxy calls over Envoy's external processing protocol).
    #[serde(default = "default_isolation")]
    pub isolation: String,
    /// Where the module comes from (`isolation: wasm`).
    #[serde(default)]
    pub source: Option<PluginSource>,
    /// How the proxy reaches the plugin's process (`isolation: process`).
    #[serde(default)]
    pub process: Option<ProcessPluginConfig>,
    /// Handed to the plugin's `on_configure`: a string as is, anything else as JSON.
    #[serde(default)]
    pub config: Option<serde_yaml::Value>,
    /// Handed to the plugin's `on_vm_start`, like `config`.
    #[serde(default)]
    pub vm_config: Option<serde_yaml::Value>,
    /// What a request does when the plugin fails: `closed` (503, default) or `open` (go on).
    #[serde(default)]
    pub fail: FailPolicy,
    /// Resource ceilings of each instance; defaults apply to what is left out.
    #[serde(default)]
    pub limits: PluginLimitsConfig,
}

/// A plugin in a process of its own, serving Envoy's `ExternalProcessor` gRPC service
/// (what NIP's Python and Go SDKs run); `fail` says what a request does when it cannot be
/// asked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessPluginConfig {
    /// The service (in `services`) the process listens on, gRPC over HTTP/2.
    pub service: String,
    /// How long the proxy waits for each answer (Envoy's `message_timeout`, default
    /// 200ms).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Send requests (head, and body unless `stream_bodies`).
    #[serde(default = "default_true")]
    pub requests: bool,
    /// Send responses too.
    #[serde(default)]
    pub responses: bool,
    /// Send heads only; bodies stream past the plugin unchanged (`body_mode: none`).
    #[serde(default)]
    pub stream_bodies: bool,
    /// How the plugin gets the bodies of what it sees (Envoy's `BodySendMode`):
    /// `buffered` (whole, bounded; the default), `streamed` (each chunk as it arrives,
    /// answered before it goes on: for large bodies a plugin changes) or `none`.
    #[serde(default)]
    pub body_mode: Option<ProcessBodyMode>,
    /// Send response trailers too (Envoy's `response_trailer_mode: SEND`; gRPC's status).
    #[serde(default)]
    pub trailers: bool,
    /// The command a proxy starts and keeps running for this plugin (`["python3",
    /// "guard.py"]`); without it the process is someone else's to run. It gets its port
    /// (the service's endpoint's) in `NIP_PLUGIN_PORT`.
    #[serde(default)]
    pub command: Vec<String>,
    /// More environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory of the command.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The user the command runs as (a name from /etc/passwd, or `UID[:GID]`); the proxy
    /// must be able to switch to it (root).
    #[serde(default)]
    pub user: Option<String>,
    /// What the command may use.
    #[serde(default)]
    pub limits: ProcessLimitsConfig,
}

/// How a process plugin gets bodies (Envoy's `BodySendMode` of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessBodyMode {
    /// The whole body in one message.
    #[serde(alias = "BUFFERED")]
    Buffered,
    /// Each chunk in a message of its own.
    #[serde(alias = "STREAMED")]
    Streamed,
    /// No body.
    #[serde(alias = "NONE")]
    None,
}

impl ProcessPluginConfig {
    /// The body mode in effect (`stream_bodies` is `none`).
    pub fn bodies(&self) -> ProcessBodyMode {
        match (self.body_mode, self.stream_bodies) {
            (Some(mode), _) => mode,
            (None, true) => ProcessBodyMode::None,
            (None, false) => ProcessBodyMode::Buffered,
        }
    }
}

/// Resource ceilings of a plugin's process: a cgroup (v2) where the kernel lets the proxy
/// make one, rlimits otherwise (memory as address space, no CPU share).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessLimitsConfig {
    /// Memory (`"256Mi"`).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// CPU, in cores (`0.5`); a cgroup only.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Open files.
    #[serde(default)]
    pub open_files: Option<u64>,
}

/// Where a plugin's module is: a local file, or a URL pinned by its SHA-256.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSource {
    /// A `.wasm` file on the proxy's machine.
    #[serde(default)]
    pub file: Option<String>,
    /// An `http://` or `https://` URL the proxy downloads the module from.
    #[serde(default)]
    pub url: Option<String>,
    /// Hex SHA-256 of the module; required with `url` (a download that differs is
    /// refused). Alone, it names a module uploaded to the control plane serving this config
    /// (`nip deploy`, `PUT /v1/modules`), which sends the bytes with the config.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Base64 ed25519 signature over the module's bytes: checked by proxies against the
    /// keys an admin set for the config's tenant (`PUT /v1/tenants/T/plugin-signing`).
    #[serde(default)]
    pub signature: Option<String>,
}

/// Resource ceilings of one plugin instance, as written in YAML.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimitsConfig {
    /// Linear memory ceiling (`"64Mi"`, default 64 MiB).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// CPU time one callback may take (`"100ms"`, the default).
    #[serde(default)]
    pub cpu: Option<HumanDuration>,
    /// Body bytes the plugin may hold while it pauses a request or response (`"1Mi"`, the
    /// default); past it a request gets 413 and a response 500.
    #[serde(default)]
    pub body: Option<ByteSize>,
}

/// Default linear memory ceiling of a plugin instance.
pub const DEFAULT_PLUGIN_MEMORY: u64 = 64 << 20;
/// Default CPU deadline of one plugin callback.
pub const DEFAULT_PLUGIN_CPU: std::time::Duration = std::time::Duration::from_millis(100);
/// Default body bytes a plugin may hold.
pub const DEFAULT_PLUGIN_BODY: u64 = 1 << 20;

/// A byte quantity written like Kubernetes does (`"512Mi"`, `"1Gi"`, `"64k"`, `"1000"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"64Mi"`, `"1Gi"`, `"10M"`, `"512KiB"` or plain bytes.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {text:?} (write it like \"64Mi\" or \"1Gi\")"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "k" | "K" | "KB" => 1_000,
            "M" | "MB" => 1_000_000,
            "G" | "GB" => 1_000_000_000,
            "Ki" | "KiB" => 1 << 10,
            "Mi" | "MiB" => 1 << 20,
            "Gi" | "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {text:?} (use Ki, Mi, Gi, k, M or G)"
                ))
            }
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// What a request does when a plugin fails (trap, deadline, memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// Answer 503 with response flag `PF`.
    #[default]
    Closed,
    /// Skip the plugin and go on.
    Open,
}

/// Renders a plugin's `config`/`vm_config` as the bytes the plugin receives.
pub fn plugin_config_bytes(value: &Option<serde_yaml::Value>) -> Vec<u8> {
    match value {
        None | Some(serde_yaml::Value::Null) => Vec::new(),
        Some(serde_yaml::Value::String(text)) => text.clone().into_bytes(),
        Some(other) => serde_json::to_vec(other).unwrap_or_default(),
    }
}

fn default_isolation() -> String {
    "wasm".to_string()
}

impl Config {
    /// The region `route`'s tenant's traffic must stay in (its `data.locality`), if any.
    pub fn data_locality(&self, route: &RouteConfig) -> Option<&str> {
        super::route_tenant(self, route)
            .and_then(|(_, t)| t.data.as_ref())
            .and_then(|d| d.locality.as_deref())
            .filter(|l| !l.is_empty())
    }
}

/// A tenant as written in the v4 plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id (in `tenants`, the key; `id` may repeat it).
    #[serde(default)]
    pub id: String,
    /// Namespace the tenant's objects live in.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Quotas.
    #[serde(default)]
    pub resource_quota: Option<TenantQuota>,
    /// Plugin policy.
    #[serde(default)]
    pub plugins: Option<TenantPlugins>,
    /// Data policy.
    #[serde(default)]
    pub data: Option<TenantData>,
    /// The load-shedding class of the tenant's requests (`low`, `normal`, `high`): set
    /// by the proxy, whatever the client sends (a verified claim may still set it).
    #[serde(default)]
    pub priority: Option<String>,
    /// Client certificates that are this tenant's, for `tenant_key: { certificate: true
    /// }`: principals (URI SAN, else DNS SAN, else subject; a trailing `*` matches a
    /// prefix), e.g. `spiffe://nip.local/ns/acme/*`.
    #[serde(default)]
    pub principals: Vec<String>,
}

/// Where a request's tenant id is (exactly one).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyConfig {
    /// A request header holding the tenant id.
    #[serde(default)]
    pub header: Option<String>,
    /// A verified JWT claim holding the tenant id (`org`, `org.id`).
    #[serde(default)]
    pub claim: Option<String>,
    /// The client certificate: the first tenant (by id) one of whose `principals` it
    /// matches.
    #[serde(default)]
    pub certificate: bool,
}

/// Tenant quotas; `message_rate` is `N/sec`, `N/min` or `N/hour`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    /// Kubernetes CPU quantity.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Kubernetes memory quantity.
    #[serde(default)]
    pub memory: Option<String>,
    /// Request rate limit.
    #[serde(default)]
    pub message_rate: Option<String>,
}

/// Which plugins a tenant's routes may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPlugins {
    /// Run the tenant's plugins in their own instances.
    #[serde(default)]
    pub isolated: bool,
    /// Allow plugins outside the whitelist.
    #[serde(default)]
    pub allow_custom: bool,
    /// Allowed plugin references (`official:*`, `acme:*`).
    #[serde(default)]
    pub whitelist: Vec<String>,
}

/// Where a tenant's data may go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantData {
    /// Keep the tenant's routes on its own services.
    #[serde(default)]
    pub isolated: bool,
    /// How long access logs are kept (`90d`).
    #[serde(default)]
    pub retention: Option<String>,
    /// Require TLS upstream.
    #[serde(default)]
    pub encryption: bool,
    /// Region the tenant's traffic must stay in.
    #[serde(default)]
    pub locality: Option<String>,
}

/// A route's local rate limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The period (`1s`, `1m`).
    pub per: HumanDuration,
    /// The most requests let through at once (default `requests`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Count per client rather than for the route: each value of this key has its own
    /// limit (requests without it share one).
    #[serde(default)]
    pub key: Option<RateLimitKeyConfig>,
    /// `local` (default): each proxy counts for itself. `global`: the proxies count
    /// together through `rate_limit_service` (Redis behind it).
    #[serde(default)]
    pub scope: Option<String>,
}

impl RateLimitConfig {
    /// Whether the proxies count together (`scope: global`).
    pub fn is_global(&self) -> bool {
        self.scope.as_deref() == Some("global")
    }
}

/// Where global rate limits are counted: a rate limit service (Envoy's
/// `RateLimitService` gRPC API; `nip ratelimit` is one, counting in Redis).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitServiceConfig {
    /// Its address, `host:port`.
    pub address: String,
    /// Refuse requests (500) when it cannot answer (default: let them through).
    #[serde(default)]
    pub failure_mode_deny: bool,
    /// How long one question may take (default 100ms).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
}

/// Request tracing (Envoy's connection manager `tracing` with the OpenTelemetry
/// provider): a server span per request and a client span per upstream try, W3C
/// `traceparent` continued or started, spans batched to an OTLP collector off the request
/// path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector, `host:port` (4317 for gRPC, 4318 for HTTP by convention).
    pub address: String,
    /// `grpc` (OTLP/gRPC, the default) or `http` (OTLP/HTTP, protobuf).
    #[serde(default)]
    pub protocol: TracingProtocol,
    /// The path OTLP/HTTP posts to (default `/v1/traces`).
    #[serde(default)]
    pub path: Option<String>,
    /// The share of requests traced, in percent (Envoy's `random_sampling`; default 100).
    #[serde(default)]
    pub random_sampling: Option<f64>,
    /// A client's `traceparent` decides whether its request is sampled (default on).
    #[serde(default = "default_true")]
    pub parent_based: bool,
    /// Requests answered 5xx, or that failed, are exported even when not sampled.
    #[serde(default)]
    pub trace_errors: bool,
    /// `service.name` of the spans (default `nip`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// A client span per upstream try (Envoy's `spawn_upstream_span`; default on).
    #[serde(default = "default_true")]
    pub spawn_upstream_span: bool,
    /// The longest `url.path` recorded (Envoy's `max_path_tag_length`, default 256).
    #[serde(default)]
    pub max_path_tag_length: Option<u32>,
    /// How long one export may take (default 10s).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
}

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TracingProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

/// Whose requests a rate limit counts together.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitKeyConfig {
    /// A request header's value (an API key, a tenant header).
    #[serde(default)]
    pub header: Option<String>,
    /// The client's address.
    #[serde(default)]
    pub source_ip: bool,
    /// A verified JWT claim (`sub`, `org.id`), from any of `auth.jwt_providers`.
    #[serde(default)]
    pub claim: Option<String>,
}
