//! Prometheus metrics of the proxy.
//!
//! The families live in one [`Metrics`] for the life of the process. The request path never
//! looks a label set up: when a snapshot is compiled, each route and cluster gets its metric
//! handles ([`RouteStats`], [`ClusterStats`]) resolved once, and a request only bumps atomics.
//! Gauges that mirror live state (endpoint health, config version) are refreshed when
//! `/metrics` is scraped, on the admin runtime.

pub use crate::downstream::stats::{CloseReason, DownstreamStats};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Latency buckets in seconds, from 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram updated with atomics only: workers never contend on a lock
/// (prometheus-client's own histogram takes a write lock per observation).
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(Arc<LatencyCells>);

#[derive(Debug, Default)]
struct LatencyCells {
    /// Per-bucket (not cumulative) counts; the last cell is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.0.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(&self.0.buckets)
            .map(|(bound, cell)| (bound, cell.load(Ordering::Relaxed)))
            .collect();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let count = self.0.count.load(Ordering::Relaxed);
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    cluster: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    stat_prefix: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectorLabels {
    cluster: String,
    detector: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    cluster: String,
    priority: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlagLabels {
    flag: &'static str,
}

/// An RBAC filter's counters (Envoy's `rbac.allowed`, `.denied`, `.shadow_allowed`,
/// `.shadow_denied`).
#[derive(Debug, Clone, Default)]
pub struct RbacCounters {
    /// Requests the rules let through.
    pub allowed: Counter,
    /// Requests the rules refused.
    pub denied: Counter,
    /// Requests the shadow rules would have let through.
    pub shadow_allowed: Counter,
    /// Requests the shadow rules would have refused.
    pub shadow_denied: Counter,
}

/// A jwt_authn filter's counters.
#[derive(Debug, Clone, Default)]
pub struct JwtAuthnCounters {
    /// Requests whose tokens met the requirement.
    pub allowed: Counter,
    /// Requests refused (401/403).
    pub denied: Counter,
}

/// An ext_authz filter's counters.
#[derive(Debug, Clone, Default)]
pub struct ExtAuthzCounters {
    /// Allowed by the service.
    pub ok: Counter,
    /// Denied by the service.
    pub denied: Counter,
    /// The service could not be asked.
    pub error: Counter,
    /// ... and the request passed (`failure_mode_allow`).
    pub failure_mode_allowed: Counter,
}

/// A ratelimit filter's counters.
#[derive(Debug, Clone, Default)]
pub struct GlobalRateLimitCounters {
    /// Under every limit.
    pub ok: Counter,
    /// Over a limit (429).
    pub over_limit: Counter,
    /// The rate limit service could not answer.
    pub error: Counter,
}

/// The counter of one decision of one policy filter.
fn decision_counter(
    family: &Family<PolicyLabels, Counter>,
    filter: &str,
    decision: &'static str,
) -> Counter {
    family
        .get_or_create(&PolicyLabels {
            filter: filter.to_string(),
            decision,
        })
        .clone()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    /// The filter's `stat_prefix` (else its name).
    filter: String,
    /// What it decided.
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// What became of it.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwksLabels {
    uri: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    /// The client certificate's URI SAN (a workload's SPIFFE ID).
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LocalityLabels {
    cluster: String,
    region: String,
    zone: String,
    sub_zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    cluster: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthCheckLabels {
    cluster: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// Outlier detectors in label order (`upstream::outlier::Detector` is indexed the same way).
pub const DETECTOR_LABELS: [&str; 5] = [
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "success_rate",
    "failure_percentage",
    "latency",
];

/// Request priority classes, lowest first (`upstream::concurrency::Priority` is indexed the
/// same way; the names are also the `x-nip-priority` values).
pub const PRIORITY_LABELS: [&str; 3] = ["low", "normal", "high"];

/// Status classes in label order; index = status / 100 - 1.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Request counters of one (route, cluster) pair, one per status class.
#[derive(Clone, Debug, Default)]
pub struct RequestCounters([Counter; 5]);

impl RequestCounters {
    /// Counts a response with this status.
    pub fn count(&self, status: u16) {
        let index = usize::from(status / 100).clamp(1, 5) - 1;
        self.0[index].inc();
    }
}

/// Metric handles of one route.
#[derive(Clone, Debug)]
pub struct RouteStats {
    /// Request duration histogram.
    pub duration: LatencyHistogram,
}

/// Metric handles of one `tcp_proxy` filter (by its `stat_prefix`), resolved at compile
/// time.
#[derive(Clone, Debug, Default)]
pub struct TcpStats {
    /// Connections the filter took.
    pub cx_total: Counter,
    /// Connections it carries now.
    pub cx_active: Gauge,
    /// Bytes from the client.
    pub rx_bytes: Counter,
    /// Bytes to the client.
    pub tx_bytes: Counter,
    /// Connections closed for silence in both directions (`idle_timeout`).
    pub idle_timeout: Counter,
    /// Connections closed at `max_downstream_connection_duration`.
    pub max_duration_reached: Counter,
    /// Connections closed because no upstream could be reached (no healthy endpoint, no
    /// original destination, or every connect attempt failed).
    pub no_upstream: Counter,
}

/// Metric handles of one listener, resolved at compile time.
#[derive(Clone, Debug, Default)]
pub struct ListenerStats {
    /// Connections no filter chain matched (closed; Envoy's `no_filter_chain_match`).
    pub no_filter_chain_match: Counter,
    /// Connections closed because the listener filters saw too little in time
    /// (`listener_filters_timeout`; Envoy's `downstream_pre_cx_timeout`).
    pub inspection_timeout: Counter,
}

/// Metric handles of one cluster, resolved at compile time.
#[derive(Clone, Debug, Default)]
pub struct ClusterStats {
    /// Connections opened.
    pub cx_total: Counter,
    /// Failed connection attempts.
    pub cx_connect_fail: Counter,
    /// Connection attempts whose TLS handshake failed (an endpoint whose certificate did
    /// not verify or name the expected identity, or that refused ours).
    pub cx_tls_fail: Counter,
    /// Upstream requests in flight.
    pub rq_active: Gauge,
    /// Retries sent.
    pub rq_retry: Counter,
    /// Endpoints ejected by outlier detection, by detector ([`DETECTOR_LABELS`]).
    pub outlier_ejections: [Counter; DETECTOR_LABELS.len()],
    /// Retries in flight (for the `max_retries` circuit breaker).
    pub rq_retry_active: Gauge,
    /// Requests refused by the `max_requests` circuit breaker.
    pub rq_overflow: Counter,
    /// Retries not made because of the `max_retries` circuit breaker.
    pub rq_retry_overflow: Counter,
    /// Requests shed by adaptive concurrency, by priority (low, normal, high).
    pub rq_shed: [Counter; PRIORITY_LABELS.len()],
    /// Requests that found every connection slot in use (`max_connections`) and waited.
    pub cx_overflow: Counter,
    /// Requests refused because the line waiting for a connection was full.
    pub rq_pending_overflow: Counter,
    /// Requests waiting for a connection now.
    pub rq_pending_active: Gauge,
}

impl ClusterStats {
    /// Handles that belong to no registry, for unit tests.
    pub fn detached() -> Self {
        ClusterStats::default()
    }
}

/// All metric families of a proxy process, and its live request tap (what the proxy shows
/// of its traffic, held where the request path and the admin page both reach).
#[derive(Debug)]
pub struct Metrics {
    /// Finished requests, for whoever watches (admin `/tap`).
    pub tap: super::tap::Tap,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tenant_requests: Family<TenantLabels, Counter>,
    request_duration: Family<RouteLabels, LatencyHistogram>,
    response_flags: Family<FlagLabels, Counter>,
    jwt_authn: Family<PolicyLabels, Counter>,
    ext_authz: Family<PolicyLabels, Counter>,
    ext_proc: Family<PolicyLabels, Counter>,
    trace_spans: Family<OutcomeLabels, Counter>,
    global_rate_limit: Family<PolicyLabels, Counter>,
    rbac: Family<PolicyLabels, Counter>,
    jwks_fetches: Family<JwksLabels, Counter>,
    downstream_peer_requests: Family<PeerLabels, Counter>,
    upstream_cx_total: Family<ClusterLabels, Counter>,
    tcp_cx_total: Family<TcpLabels, Counter>,
    tcp_cx_active: Family<TcpLabels, Gauge>,
    tcp_rx_bytes: Family<TcpLabels, Counter>,
    tcp_tx_bytes: Family<TcpLabels, Counter>,
    tcp_idle_timeout: Family<TcpLabels, Counter>,
    tcp_max_duration_reached: Family<TcpLabels, Counter>,
    tcp_no_upstream: Family<TcpLabels, Counter>,
    listener_no_filter_chain_match: Family<ListenerLabels, Counter>,
    listener_inspection_timeout: Family<ListenerLabels, Counter>,
    upstream_cx_active: Family<ClusterLabels, Gauge>,
    upstream_cx_connect_fail: Family<ClusterLabels, Counter>,
    upstream_cx_tls_fail: Family<ClusterLabels, Counter>,
    upstream_rq_active: Family<ClusterLabels, Gauge>,
    upstream_rq_retry: Family<ClusterLabels, Counter>,
    outlier_ejections: Family<DetectorLabels, Counter>,
    upstream_rq_retry_active: Family<ClusterLabels, Gauge>,
    upstream_rq_overflow: Family<ClusterLabels, Counter>,
    upstream_rq_retry_overflow: Family<ClusterLabels, Counter>,
    upstream_rq_shed: Family<ShedLabels, Counter>,
    upstream_cx_overflow: Family<ClusterLabels, Counter>,
    upstream_rq_pending_overflow: Family<ClusterLabels, Counter>,
    upstream_rq_pending_active: Family<ClusterLabels, Gauge>,
    concurrency_limit: Family<ClusterLabels, Gauge>,
    locality_picks: Family<LocalityLabels, Counter>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    endpoint_rq_active: Family<EndpointLabels, Gauge>,
    health_checks: Family<HealthCheckLabels, Counter>,
    config_info: Family<VersionLabels, Gauge>,
    plugin_failures: Family<PluginLabels, Counter>,
    plugin_instance_starts: Family<PluginLabels, Counter>,
    plugin_healthy: Family<PluginLabels, Gauge>,
    plugin_process_restarts: Family<PluginLabels, Counter>,
    /// Successful config swaps (the first load included).
    pub config_reloads: Counter,
    /// Config changes that were refused; the old config kept serving.
    pub config_reload_failures: Counter,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Downstream requests in flight.
    pub downstream_rq_active: Gauge,
    /// Client connections of the listener.
    pub downstream: DownstreamStats,
    /// Which labelled series the config being compiled and the config in force use.
    series: std::sync::Mutex<Generations>,
}

/// Label sets of series that belong to config objects (routes, clusters, localities).
#[derive(Debug, Default)]
struct SeriesIndex {
    routes: HashSet<String>,
    tcp_prefixes: HashSet<String>,
    listeners: HashSet<String>,
    pairs: HashSet<(String, String)>,
    clusters: HashSet<String>,
    localities: HashSet<LocalityLabels>,
}

/// The series the compile in progress resolved, and those of the config in force: a
/// series only the latter has belongs to a removed route, cluster or locality.
#[derive(Debug, Default)]
struct Generations {
    pending: SeriesIndex,
    committed: SeriesIndex,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nip");
        let closed: Family<CloseLabels, Counter> = Family::default();
        let downstream = DownstreamStats {
            cx_closed: CloseReason::ALL.map(|reason| {
                closed
                    .get_or_create(&CloseLabels {
                        reason: reason.as_str(),
                    })
                    .clone()
            }),
            ..DownstreamStats::default()
        };
        let m = Metrics {
            tap: super::tap::Tap::default(),
            requests: Family::default(),
            tenant_requests: Family::default(),
            request_duration: Family::default(),
            response_flags: Family::default(),
            jwt_authn: Family::default(),
            ext_authz: Family::default(),
            ext_proc: Family::default(),
            trace_spans: Family::default(),
            global_rate_limit: Family::default(),
            rbac: Family::default(),
            jwks_fetches: Family::default(),
            downstream_peer_requests: Family::default(),
            upstream_cx_total: Family::default(),
            tcp_cx_total: Family::default(),
            tcp_cx_active: Family::default(),
            tcp_rx_bytes: Family::default(),
            tcp_tx_bytes: Family::default(),
            tcp_idle_timeout: Family::default(),
            tcp_max_duration_reached: Family::default(),
            tcp_no_upstream: Family::default(),
            listener_no_filter_chain_match: Family::default(),
            listener_inspection_timeout: Family::default(),
            upstream_cx_active: Family::default(),
            upstream_cx_connect_fail: Family::default(),
            upstream_cx_tls_fail: Family::default(),
            upstream_rq_active: Family::default(),
            upstream_rq_retry: Family::default(),
            outlier_ejections: Family::default(),
            upstream_rq_retry_active: Family::default(),
            upstream_rq_overflow: Family::default(),
            upstream_rq_retry_overflow: Family::default(),
            upstream_rq_shed: Family::default(),
            upstream_cx_overflow: Family::default(),
            upstream_rq_pending_overflow: Family::default(),
            upstream_rq_pending_active: Family::default(),
            concurrency_limit: Family::default(),
            locality_picks: Family::default(),
            endpoint_healthy: Family::default(),
            endpoint_rq_active: Family::default(),
            health_checks: Family::default(),
            config_info: Family::default(),
            plugin_failures: Family::default(),
            plugin_instance_starts: Family::default(),
            plugin_healthy: Family::default(),
            plugin_process_restarts: Family::default(),
            config_reloads: Counter::default(),
            config_reload_failures: Counter::default(),
            access_log_dropped: Counter::default(),
            downstream_rq_active: Gauge::default(),
            downstream,
            series: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "downstream_cx",
            "Client connections accepted",
            m.downstream.cx_total.clone(),
        );
        registry.register(
            "downstream_cx_active",
            "Client connections open now",
            m.downstream.cx_active.clone(),
        );
        registry.register(
            "downstream_cx_closed",
            "Client connections the proxy closed or refused, by reason",
            closed,
        );
        registry.register(
            "requests",
            "Downstream requests by route, cluster and response status class",
            m.requests.clone(),
        );
        registry.register(
            "tenant_requests",
            "Downstream requests of each tenant's routes, by response status class",
            m.tenant_requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request start to the end of the response, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "downstream_peer_requests",
            "Requests on mutual TLS connections, by the client certificate's URI SAN (Istio's source_principal)",
            m.downstream_peer_requests.clone(),
        );
        registry.register(
            "response_flags",
            "Responses the proxy generated or shaped, by Envoy response flag (NR, UH, UF, UT, UR, NC, URX)",
            m.response_flags.clone(),
        );
        registry.register(
            "jwt_authn_requests",
            "Requests a jwt_authn filter checked, by filter and decision (allowed, denied)",
            m.jwt_authn.clone(),
        );
        registry.register(
            "ext_authz_requests",
            "Requests an ext_authz filter checked, by filter and decision (ok, denied, error, failure_mode_allowed)",
            m.ext_authz.clone(),
        );
        registry.register(
            "ext_proc_messages",
            "Messages an ext_proc filter exchanged with its processor, by filter and outcome (ok, failed, immediate)",
            m.ext_proc.clone(),
        );
        registry.register(
            "trace_spans",
            "Spans of request traces, by outcome (exported, dropped: the export queue was full, failed: the collector refused or was unreachable)",
            m.trace_spans.clone(),
        );
        registry.register(
            "ratelimit_requests",
            "Requests a ratelimit filter asked its rate limit service about, by filter and decision (ok, over_limit, error)",
            m.global_rate_limit.clone(),
        );
        registry.register(
            "rbac_requests",
            "Requests an RBAC filter checked, by filter and decision (allowed, denied, shadow_allowed, shadow_denied)",
            m.rbac.clone(),
        );
        registry.register(
            "jwks_fetches",
            "Remote JWKS fetches, by URI and result (success, failed)",
            m.jwks_fetches.clone(),
        );
        registry.register(
            "tcp_downstream_cx",
            "Connections taken by a tcp_proxy filter, by its stat_prefix",
            m.tcp_cx_total.clone(),
        );
        registry.register(
            "tcp_downstream_cx_active",
            "Connections a tcp_proxy filter carries now",
            m.tcp_cx_active.clone(),
        );
        registry.register(
            "tcp_downstream_cx_rx_bytes",
            "Bytes a tcp_proxy filter received from clients",
            m.tcp_rx_bytes.clone(),
        );
        registry.register(
            "tcp_downstream_cx_tx_bytes",
            "Bytes a tcp_proxy filter sent to clients",
            m.tcp_tx_bytes.clone(),
        );
        registry.register(
            "tcp_idle_timeout",
            "tcp_proxy connections closed after idle_timeout with no byte either way",
            m.tcp_idle_timeout.clone(),
        );
        registry.register(
            "tcp_max_downstream_connection_duration",
            "tcp_proxy connections closed at max_downstream_connection_duration",
            m.tcp_max_duration_reached.clone(),
        );
        registry.register(
            "tcp_no_upstream",
            "tcp_proxy connections closed because no upstream could be reached",
            m.tcp_no_upstream.clone(),
        );
        registry.register(
            "listener_no_filter_chain_match",
            "Connections closed because none of the listener's filter chains matched",
            m.listener_no_filter_chain_match.clone(),
        );
        registry.register(
            "listener_filters_timeout",
            "Connections closed because the listener filters (TLS/HTTP inspection) saw too little within listener_filters_timeout",
            m.listener_inspection_timeout.clone(),
        );
        registry.register(
            "upstream_cx",
            "Upstream connections opened",
            m.upstream_cx_total.clone(),
        );
        registry.register(
            "upstream_cx_active",
            "Upstream connections open now (established TCP connections to the cluster's endpoints)",
            m.upstream_cx_active.clone(),
        );
        registry.register(
            "upstream_cx_connect_fail",
            "Upstream connection attempts that failed",
            m.upstream_cx_connect_fail.clone(),
        );
        registry.register(
            "upstream_cx_tls_fail",
            "Upstream connection attempts whose TLS handshake failed (the endpoint's certificate did not verify or name the expected identity)",
            m.upstream_cx_tls_fail.clone(),
        );
        registry.register(
            "upstream_rq_active",
            "Upstream requests in flight",
            m.upstream_rq_active.clone(),
        );
        registry.register(
            "upstream_rq_retry",
            "Upstream retries",
            m.upstream_rq_retry.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by detector",
            m.outlier_ejections.clone(),
        );
        registry.register(
            "upstream_rq_retry_active",
            "Upstream retries in flight",
            m.upstream_rq_retry_active.clone(),
        );
        registry.register(
            "upstream_rq_overflow",
            "Requests refused by the max_requests circuit breaker (flag UO)",
            m.upstream_rq_overflow.clone(),
        );
        registry.register(
            "upstream_rq_retry_overflow",
            "Retries not made because of the max_retries circuit breaker",
            m.upstream_rq_retry_overflow.clone(),
        );
        registry.register(
            "upstream_rq_shed",
            "Requests shed by adaptive concurrency (flag OM), by priority: low first",
            m.upstream_rq_shed.clone(),
        );
        registry.register(
            "upstream_cx_overflow",
            "Requests that found max_connections in use and waited for a connection",
            m.upstream_cx_overflow.clone(),
        );
        registry.register(
            "upstream_rq_pending_overflow",
            "Requests refused because max_pending_requests were already waiting (flag UO)",
            m.upstream_rq_pending_overflow.clone(),
        );
        registry.register(
            "upstream_rq_pending_active",
            "Requests waiting for an upstream connection now",
            m.upstream_rq_pending_active.clone(),
        );
        registry.register(
            "upstream_concurrency_limit",
            "The adaptive concurrency limit of a cluster now (what high priority may use)",
            m.concurrency_limit.clone(),
        );
        registry.register(
            "upstream_locality_picks",
            "Tries sent to each locality of a cluster (where the balancer chose to go)",
            m.locality_picks.clone(),
        );
        registry.register(
            "endpoint_healthy",
            "1 when the endpoint takes traffic, 0 when health checks took it out",
            m.endpoint_healthy.clone(),
        );
        registry.register(
            "endpoint_rq_active",
            "Requests in flight per endpoint",
            m.endpoint_rq_active.clone(),
        );
        registry.register(
            "health_checks",
            "Active health check probes by result",
            m.health_checks.clone(),
        );
        registry.register(
            "config_info",
            "The config version being served (value 1)",
            m.config_info.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin callbacks or starts that trapped, ran out of memory or time; the instance was replaced",
            m.plugin_failures.clone(),
        );
        registry.register(
            "plugin_process_restarts",
            "Starts of a process plugin's process after its first (it exited; started again after a back-off)",
            m.plugin_process_restarts.clone(),
        );
        registry.register(
            "plugin_healthy",
            "What an SDK plugin's last health check said: 1 healthy, 0 not",
            m.plugin_healthy.clone(),
        );
        registry.register(
            "plugin_instance_starts",
            "Plugin instances started on worker threads (a crash loop shows here, slowed by back-off)",
            m.plugin_instance_starts.clone(),
        );
        registry.register(
            "config_reloads",
            "Config versions swapped in",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_reload_failures",
            "Config changes refused (the previous config kept serving)",
            m.config_reload_failures.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "downstream_rq_active",
            "Downstream requests in flight",
            m.downstream_rq_active.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Handles for one route.
    pub fn route_stats(&self, route: &str) -> RouteStats {
        self.generations().pending.routes.insert(route.to_string());
        RouteStats {
            duration: self
                .request_duration
                .get_or_create(&RouteLabels {
                    route: route.to_string(),
                })
                .clone(),
        }
    }

    /// Request counters of a tenant's routes.
    pub fn tenant_counters(&self, tenant: &str) -> RequestCounters {
        RequestCounters(STATUS_CLASSES.map(|status_class| {
            self.tenant_requests
                .get_or_create(&TenantLabels {
                    tenant: tenant.to_string(),
                    status_class,
                })
                .clone()
        }))
    }

    /// Request counters for a (route, cluster) pair; empty names for requests with none.
    pub fn request_counters(&self, route: &str, cluster: &str) -> RequestCounters {
        self.generations()
            .pending
            .pairs
            .insert((route.to_string(), cluster.to_string()));
        RequestCounters(STATUS_CLASSES.map(|status_class| {
            self.requests
                .get_or_create(&RequestLabels {
                    route: route.to_string(),
                    cluster: cluster.to_string(),
                    status_class,
                })
                .clone()
        }))
    }

    /// The counter of tries a cluster sends to one locality (resolved at compile time,
    /// so the request path only increments).
    pub fn locality_picks(
        &self,
        cluster: &str,
        region: &str,
        zone: &str,
        sub_zone: &str,
    ) -> Counter {
        let labels = LocalityLabels {
            cluster: cluster.to_string(),
            region: region.to_string(),
            zone: zone.to_string(),
            sub_zone: sub_zone.to_string(),
        };
        let counter = self.locality_picks.get_or_create(&labels).clone();
        self.generations().pending.localities.insert(labels);
        counter
    }

    fn generations(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A compile starts: the series it resolves from now on are its own.
    pub fn begin_generation(&self) {
        self.generations().pending = SeriesIndex::default();
    }

    /// A compiled config is taking over: series of routes, clusters and localities it no
    /// longer has are removed, so `/metrics` stays bounded under config churn and never
    /// exports what is gone.
    pub fn commit_generation(&self) {
        let mut generations = self.generations();
        let pending = std::mem::take(&mut generations.pending);
        let stale = std::mem::replace(&mut generations.committed, pending);
        let live = &generations.committed;
        for route in stale.routes.difference(&live.routes) {
            self.request_duration.remove(&RouteLabels {
                route: route.clone(),
            });
        }
        for (route, cluster) in stale.pairs.difference(&live.pairs) {
            for status_class in STATUS_CLASSES {
                self.requests.remove(&RequestLabels {
                    route: route.clone(),
                    cluster: cluster.clone(),
                    status_class,
                });
            }
        }
        for labels in stale.localities.difference(&live.localities) {
            self.locality_picks.remove(labels);
        }
        for cluster in stale.clusters.difference(&live.clusters) {
            self.remove_cluster_series(cluster);
        }
        for prefix in stale.tcp_prefixes.difference(&live.tcp_prefixes) {
            let labels = TcpLabels {
                stat_prefix: prefix.clone(),
            };
            for family in [
                &self.tcp_cx_total,
                &self.tcp_rx_bytes,
                &self.tcp_tx_bytes,
                &self.tcp_idle_timeout,
                &self.tcp_max_duration_reached,
                &self.tcp_no_upstream,
            ] {
                family.remove(&labels);
            }
            self.tcp_cx_active.remove(&labels);
        }
        for listener in stale.listeners.difference(&live.listeners) {
            let labels = ListenerLabels {
                listener: listener.clone(),
            };
            self.listener_no_filter_chain_match.remove(&labels);
            self.listener_inspection_timeout.remove(&labels);
        }
    }

    fn remove_cluster_series(&self, cluster: &str) {
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        for family in [
            &self.upstream_cx_total,
            &self.upstream_cx_connect_fail,
            &self.upstream_cx_tls_fail,
            &self.upstream_rq_retry,
            &self.upstream_rq_overflow,
            &self.upstream_rq_retry_overflow,
            &self.upstream_cx_overflow,
            &self.upstream_rq_pending_overflow,
        ] {
            family.remove(&labels);
        }
        for family in [
            &self.upstream_rq_active,
            &self.upstream_rq_retry_active,
            &self.upstream_rq_pending_active,
        ] {
            family.remove(&labels);
        }
        for detector in DETECTOR_LABELS {
            self.outlier_ejections.remove(&DetectorLabels {
                cluster: cluster.to_string(),
                detector,
            });
        }
        for priority in PRIORITY_LABELS {
            self.upstream_rq_shed.remove(&ShedLabels {
                cluster: cluster.to_string(),
                priority,
            });
        }
        for result in ["success", "failure"] {
            self.health_checks.remove(&HealthCheckLabels {
                cluster: cluster.to_string(),
                result,
            });
        }
    }

    /// Handles for one cluster.
    pub fn cluster_stats(&self, cluster: &str) -> ClusterStats {
        self.generations()
            .pending
            .clusters
            .insert(cluster.to_string());
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        ClusterStats {
            cx_total: self.upstream_cx_total.get_or_create(&labels).clone(),
            cx_connect_fail: self.upstream_cx_connect_fail.get_or_create(&labels).clone(),
            cx_tls_fail: self.upstream_cx_tls_fail.get_or_create(&labels).clone(),
            rq_active: self.upstream_rq_active.get_or_create(&labels).clone(),
            rq_retry: self.upstream_rq_retry.get_or_create(&labels).clone(),
            outlier_ejections: DETECTOR_LABELS.map(|detector| {
                self.outlier_ejections
                    .get_or_create(&DetectorLabels {
                        cluster: cluster.to_string(),
                        detector,
                    })
                    .clone()
            }),
            rq_retry_active: self.upstream_rq_retry_active.get_or_create(&labels).clone(),
            rq_overflow: self.upstream_rq_overflow.get_or_create(&labels).clone(),
            rq_retry_overflow: self
                .upstream_rq_retry_overflow
                .get_or_create(&labels)
                .clone(),
            cx_overflow: self.upstream_cx_overflow.get_or_create(&labels).clone(),
            rq_pending_overflow: self
                .upstream_rq_pending_overflow
                .get_or_create(&labels)
                .clone(),
            rq_pending_active: self
                .upstream_rq_pending_active
                .get_or_create(&labels)
                .clone(),
            rq_shed: PRIORITY_LABELS.map(|priority| {
                self.upstream_rq_shed
                    .get_or_create(&ShedLabels {
                        cluster: cluster.to_string(),
                        priority,
                    })
                    .clone()
            }),
        }
    }

    /// Handles for one `tcp_proxy` filter's `stat_prefix` (filters sharing a prefix share
    /// its series, as in Envoy).
    pub fn tcp_stats(&self, stat_prefix: &str) -> TcpStats {
        self.generations()
            .pending
            .tcp_prefixes
            .insert(stat_prefix.to_string());
        let labels = TcpLabels {
            stat_prefix: stat_prefix.to_string(),
        };
        TcpStats {
            cx_total: self.tcp_cx_total.get_or_create(&labels).clone(),
            cx_active: self.tcp_cx_active.get_or_create(&labels).clone(),
            rx_bytes: self.tcp_rx_bytes.get_or_create(&labels).clone(),
            tx_bytes: self.tcp_tx_bytes.get_or_create(&labels).clone(),
            idle_timeout: self.tcp_idle_timeout.get_or_create(&labels).clone(),
            max_duration_reached: self.tcp_max_duration_reached.get_or_create(&labels).clone(),
            no_upstream: self.tcp_no_upstream.get_or_create(&labels).clone(),
        }
    }

    /// Handles for one listener.
    pub fn listener_stats(&self, listener: &str) -> ListenerStats {
        self.generations()
            .pending
            .listeners
            .insert(listener.to_string());
        let labels = ListenerLabels {
            listener: listener.to_string(),
        };
        ListenerStats {
            no_filter_chain_match: self
                .listener_no_filter_chain_match
                .get_or_create(&labels)
                .clone(),
            inspection_timeout: self
                .listener_inspection_timeout
                .get_or_create(&labels)
                .clone(),
        }
    }

    /// The counter of one response flag.
    pub fn response_flag(&self, flag: &'static str) -> Counter {
        self.response_flags
            .get_or_create(&FlagLabels { flag })
            .clone()
    }

    /// The counters of a jwt_authn filter, resolved when a snapshot is compiled.
    pub fn jwt_authn(&self, filter: &str) -> JwtAuthnCounters {
        let counter = |decision| decision_counter(&self.jwt_authn, filter, decision);
        JwtAuthnCounters {
            allowed: counter("allowed"),
            denied: counter("denied"),
        }
    }

    /// The counters of an ext_authz filter.
    pub fn ext_authz(&self, filter: &str) -> ExtAuthzCounters {
        let counter = |decision| decision_counter(&self.ext_authz, filter, decision);
        ExtAuthzCounters {
            ok: counter("ok"),
            denied: counter("denied"),
            error: counter("error"),
            failure_mode_allowed: counter("failure_mode_allowed"),
        }
    }

    /// The counters of an ext_proc filter.
    pub fn ext_proc(&self, filter: &str) -> crate::ext_proc::ExtProcCounters {
        let counter = |outcome| decision_counter(&self.ext_proc, filter, outcome);
        crate::ext_proc::ExtProcCounters {
            ok: counter("ok"),
            failed: counter("failed"),
            immediate: counter("immediate"),
        }
    }

    /// The counters of trace export (shared by every collector's queue).
    pub fn trace_spans(&self) -> crate::telemetry::otlp::SpanCounters {
        let counter = |outcome| {
            self.trace_spans
                .get_or_create(&OutcomeLabels { outcome })
                .clone()
        };
        crate::telemetry::otlp::SpanCounters {
            exported: counter("exported"),
            dropped: counter("dropped"),
            failed: counter("failed"),
        }
    }

    /// The counters of a ratelimit filter (asking a rate limit service).
    pub fn global_rate_limit(&self, filter: &str) -> GlobalRateLimitCounters {
        let counter = |decision| decision_counter(&self.global_rate_limit, filter, decision);
        GlobalRateLimitCounters {
            ok: counter("ok"),
            over_limit: counter("over_limit"),
            error: counter("error"),
        }
    }

    /// The counters of an RBAC filter.
    pub fn rbac(&self, filter: &str) -> crate::telemetry::metrics::RbacCounters {
        let counter = |decision| decision_counter(&self.rbac, filter, decision);
        RbacCounters {
            allowed: counter("allowed"),
            denied: counter("denied"),
            shadow_allowed: counter("shadow_allowed"),
            shadow_denied: counter("shadow_denied"),
        }
    }

    /// The counter of fetches of the JWKS at `uri` that succeeded (`ok`) or failed.
    pub fn jwks_fetch(&self, uri: &str, ok: bool) -> Counter {
        self.jwks_fetches
            .get_or_create(&JwksLabels {
                uri: uri.to_string(),
                result: if ok { "success" } else { "failed" },
            })
            .clone()
    }

    /// The request counter of clients that proved `peer` (their certificate's URI SAN).
    pub fn peer_requests(&self, peer: &str) -> Counter {
        self.downstream_peer_requests
            .get_or_create(&PeerLabels {
                peer: peer.to_string(),
            })
            .clone()
    }

    /// Counts one health check probe.
    pub fn health_check(&self, cluster: &str, passed: bool) {
        self.health_checks
            .get_or_create(&HealthCheckLabels {
                cluster: cluster.to_string(),
                result: if passed { "success" } else { "failure" },
            })
            .inc();
    }

    /// Counts one plugin failure (a cold path: the label lookup is fine here).
    pub fn plugin_failure(&self, plugin: &str) {
        self.plugin_failures
            .get_or_create(&PluginLabels {
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// The restart counter of a process plugin's process.
    pub fn plugin_process_restarts(&self, plugin: &str) -> Counter {
        self.plugin_process_restarts
            .get_or_create(&PluginLabels {
                plugin: plugin.to_string(),
            })
            .clone()
    }

    /// Records an SDK plugin's health check.
    pub fn plugin_health(&self, plugin: &str, healthy: bool) {
        self.plugin_healthy
            .get_or_create(&PluginLabels {
                plugin: plugin.to_string(),
            })
            .set(i64::from(healthy));
    }

    /// Counts one plugin instance start on a worker thread.
    pub fn plugin_instance_start(&self, plugin: &str) {
        self.plugin_instance_starts
            .get_or_create(&PluginLabels {
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// Renders the Prometheus text format, after `refresh` has set the gauges that show
    /// state (endpoint health, connections, the config version) from the config in force.
    pub fn render(&self, refresh: impl FnOnce(&StateGauges<'_>)) -> String {
        self.endpoint_healthy.clear();
        self.endpoint_rq_active.clear();
        self.upstream_cx_active.clear();
        self.config_info.clear();
        self.concurrency_limit.clear();
        refresh(&StateGauges { metrics: self });
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("rendering metrics failed: {e}");
        }
        out
    }
}

/// The gauges that show state rather than count events, set right before each scrape (see
/// [`Metrics::render`]): whoever holds the config in force walks it and sets them here.
#[derive(Debug)]
pub struct StateGauges<'a> {
    metrics: &'a Metrics,
}

impl StateGauges<'_> {
    /// `nip_upstream_concurrency_limit` of a cluster with adaptive concurrency.
    pub fn concurrency_limit(&self, cluster: &str, limit: u32) {
        self.metrics
            .concurrency_limit
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .set(i64::from(limit));
    }

    /// `nip_upstream_cx_active`: connections open to a cluster's endpoints.
    pub fn upstream_connections(&self, cluster: &str, open: usize) {
        self.metrics
            .upstream_cx_active
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// `nip_config_info{version}`.
    pub fn config_version(&self, version: &str) {
        self.metrics
            .config_info
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
    }

    /// `nip_endpoint_healthy` and `nip_endpoint_rq_active` of one endpoint.
    pub fn endpoint(&self, cluster: &str, endpoint: &str, healthy: bool, active_requests: usize) {
        let labels = EndpointLabels {
            cluster: cluster.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.metrics
            .endpoint_healthy
            .get_or_create(&labels)
            .set(i64::from(healthy));
        self.metrics
            .endpoint_rq_active
            .get_or_create(&labels)
            .set(i64::try_from(active_requests).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_removed_config_go_with_it() {
        let metrics = Metrics::new();
        metrics.begin_generation();
        metrics.route_stats("old-route");
        metrics.request_counters("old-route", "old").count(200);
        metrics.cluster_stats("old").rq_retry.inc();
        metrics.cluster_stats("kept").rq_retry.inc();
        metrics.commit_generation();
        let text = metrics.render(|_| {});
        assert!(text.contains("route=\"old-route\""), "{text}");
        assert!(text.contains("cluster=\"old\""), "{text}");
        metrics.begin_generation();
        metrics.cluster_stats("kept");
        metrics.commit_generation();
        let text = metrics.render(|_| {});
        assert!(!text.contains("old"), "{text}");
        assert!(
            text.contains("nip_upstream_rq_retry_total{cluster=\"kept\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn latency_histogram_renders_cumulative_buckets() {
        let metrics = Metrics::new();
        let stats = metrics.route_stats("r");
        stats.duration.observe(Duration::from_micros(300));
        stats.duration.observe(Duration::from_millis(3));
        stats.duration.observe(Duration::from_secs(60));
        let text = metrics.render(|_| {});
        for (line, present) in [
            ("nip_request_duration_seconds_count{route=\"r\"} 3", true),
            (
                "nip_request_duration_seconds_bucket{le=\"0.0005\",route=\"r\"} 1",
                true,
            ),
            (
                "nip_request_duration_seconds_bucket{le=\"0.005\",route=\"r\"} 2",
                true,
            ),
            (
                "nip_request_duration_seconds_bucket{le=\"10.0\",route=\"r\"} 2",
                true,
            ),
            (
                "nip_request_duration_seconds_bucket{le=\"+Inf\",route=\"r\"} 3",
                true,
            ),
        ] {
            assert_eq!(text.contains(line), present, "{line}\n{text}");
        }
        assert!(
            text.contains("nip_request_duration_seconds_sum{route=\"r\"} 60.0033"),
            "{text}"
        );
    }
}
