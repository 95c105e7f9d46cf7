//! Cluster policies decoded from xDS: load balancing, outlier detection, circuit breakers,
//! adaptive concurrency, upstream protocol and health checking. Each decoder reads one part
//! of an Envoy `Cluster` and answers the proxy's own type, or an error naming the field.

use super::{decode, duration, names};
use crate::upstream::breakers::{CircuitBreakers, RetryBudget};
use crate::upstream::cluster::HealthCheckSpec;
use crate::upstream::concurrency::GradientConfig;
use crate::upstream::ewma::EwmaConfig;
use crate::upstream::lb::{LbPolicy, RingSize};
use crate::upstream::outlier::{
    FailurePercentageDetector, LatencyDetector, OutlierConfig, SuccessRateDetector,
};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster as XdsCluster};
use envoy_types::pb::envoy::config::core::v3::health_check;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options, HttpProtocolOptions,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use prost::Message;
use std::time::Duration;

/// The policy from `load_balancing_policy`: the first entry NIP knows wins, as in Envoy
/// and gRPC. `None` when the field is absent.
pub(super) fn load_balancing_policy(xds: &XdsCluster) -> Result<Option<LbPolicy>, String> {
    let Some(list) = &xds.load_balancing_policy else {
        return Ok(None);
    };
    for policy in &list.policies {
        let Some(extension) = &policy.typed_extension_config else {
            continue;
        };
        match extension.name.as_str() {
            names::PEAK_EWMA_POLICY => {
                let parameters = extension
                    .typed_config
                    .as_ref()
                    .map(|any| {
                        envoy_types::pb::google::protobuf::Struct::decode(any.value.as_slice())
                            .map_err(|e| format!("{}: {e}", names::PEAK_EWMA_POLICY))
                    })
                    .transpose()?
                    .unwrap_or_default();
                let seconds = |key: &str, default: Duration| -> Result<Duration, String> {
                    match parameters.fields.get(key).and_then(|v| v.kind.as_ref()) {
                        None => Ok(default),
                        Some(envoy_types::pb::google::protobuf::value::Kind::NumberValue(n))
                            if n.is_finite() && *n > 0.0 && *n < 86_400.0 =>
                        {
                            Ok(Duration::from_secs_f64(*n))
                        }
                        Some(_) => Err(format!(
                            "{}: {key} must be a number of seconds between 0 and 86400",
                            names::PEAK_EWMA_POLICY
                        )),
                    }
                };
                let defaults = EwmaConfig::default();
                return Ok(Some(LbPolicy::Latency(EwmaConfig {
                    decay: seconds("decay_seconds", defaults.decay)?,
                    default_rtt: seconds("default_rtt_seconds", defaults.default_rtt)?,
                })));
            }
            names::LEAST_REQUEST_POLICY => return Ok(Some(LbPolicy::LeastRequest)),
            "envoy.load_balancing_policies.round_robin" => return Ok(Some(LbPolicy::RoundRobin)),
            "envoy.load_balancing_policies.random" => return Ok(Some(LbPolicy::Random)),
            names::RING_HASH_POLICY => return Ok(Some(LbPolicy::RingHash)),
            _ => continue,
        }
    }
    Err("load_balancing_policy: none of its policies is supported (peak EWMA, least_request, round_robin, random, ring_hash)".to_string())
}

/// Envoy's `OutlierDetection` as NIP applies it: the consecutive-5xx and
/// consecutive-gateway-failure detectors, ejection times and the ejection ceiling. Envoy's
/// defaults fill what is not set; an `enforcing_*` of 0 switches a detector off.
pub(super) fn outlier_config(
    xds: &envoy_types::pb::envoy::config::cluster::v3::OutlierDetection,
    cluster: &XdsCluster,
) -> Result<OutlierConfig, String> {
    let defaults = OutlierConfig::default();
    let number = |v: &Option<UInt32Value>, default: u32| v.as_ref().map_or(default, |v| v.value);
    let time = |d: &Option<PbDuration>, field: &str, default: Duration| match d {
        None => Ok(default),
        Some(d) => duration(d)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("outlier_detection.{field} must be more than 0")),
    };
    let enforced = |v: &Option<UInt32Value>, default: u32| number(v, default) > 0;
    let percent = |v: &Option<UInt32Value>, field: &str, default: u32| match number(v, default) {
        p if p <= 100 => Ok(p),
        p => Err(format!("outlier_detection.{field}: {p} is more than 100")),
    };
    let max_ejection_percent = number(&xds.max_ejection_percent, defaults.max_ejection_percent);
    if max_ejection_percent > 100 {
        return Err(format!(
            "outlier_detection.max_ejection_percent: {max_ejection_percent} is more than 100"
        ));
    }
    Ok(OutlierConfig {
        consecutive_5xx: if enforced(&xds.enforcing_consecutive_5xx, 100) {
            number(&xds.consecutive_5xx, defaults.consecutive_5xx)
        } else {
            0
        },
        consecutive_gateway_failure: if enforced(&xds.enforcing_consecutive_gateway_failure, 0) {
            number(&xds.consecutive_gateway_failure, 5)
        } else {
            0
        },
        interval: time(&xds.interval, "interval", defaults.interval)?,
        base_ejection_time: time(
            &xds.base_ejection_time,
            "base_ejection_time",
            defaults.base_ejection_time,
        )?,
        max_ejection_time: time(
            &xds.max_ejection_time,
            "max_ejection_time",
            defaults.max_ejection_time,
        )?,
        max_ejection_percent,
        success_rate: if enforced(&xds.enforcing_success_rate, 100) {
            let envoy = SuccessRateDetector::default();
            Some(SuccessRateDetector {
                minimum_hosts: number(&xds.success_rate_minimum_hosts, envoy.minimum_hosts),
                request_volume: number(&xds.success_rate_request_volume, envoy.request_volume),
                stdev_factor_milli: number(
                    &xds.success_rate_stdev_factor,
                    envoy.stdev_factor_milli,
                ),
                enforcing_percent: percent(
                    &xds.enforcing_success_rate,
                    "enforcing_success_rate",
                    100,
                )?,
            })
        } else {
            None
        },
        failure_percentage: if enforced(&xds.enforcing_failure_percentage, 0) {
            let envoy = FailurePercentageDetector::default();
            Some(FailurePercentageDetector {
                threshold_percent: percent(
                    &xds.failure_percentage_threshold,
                    "failure_percentage_threshold",
                    envoy.threshold_percent,
                )?,
                minimum_hosts: number(&xds.failure_percentage_minimum_hosts, envoy.minimum_hosts),
                request_volume: number(
                    &xds.failure_percentage_request_volume,
                    envoy.request_volume,
                ),
                enforcing_percent: percent(
                    &xds.enforcing_failure_percentage,
                    "enforcing_failure_percentage",
                    0,
                )?,
            })
        } else {
            None
        },
        latency: latency_detector(cluster)?,
    })
}

/// NIP's latency outlier detector from the cluster's `filter_metadata["nip.outlier_latency"]`
/// (`factor`, `minimum_hosts`, `request_volume`; Envoy's `OutlierDetection` has no field
/// for it).
fn latency_detector(cluster: &XdsCluster) -> Result<Option<LatencyDetector>, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(fields) = cluster
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::OUTLIER_LATENCY_METADATA))
    else {
        return Ok(None);
    };
    let defaults = LatencyDetector::default();
    let number = |key: &str, min: f64, max: f64| -> Result<Option<f64>, String> {
        match fields.fields.get(key).and_then(|v| v.kind.as_ref()) {
            None => Ok(None),
            Some(Kind::NumberValue(n)) if (min..=max).contains(n) => Ok(Some(*n)),
            Some(_) => Err(format!(
                "{}.{key} must be a number between {min} and {max}",
                names::OUTLIER_LATENCY_METADATA
            )),
        }
    };
    Ok(Some(LatencyDetector {
        factor_milli: number("factor", 1.0, 1000.0)?
            .map_or(defaults.factor_milli, |f| (f * 1000.0) as u32),
        minimum_hosts: number("minimum_hosts", 1.0, 1e6)?
            .map_or(defaults.minimum_hosts, |n| n as u32),
        request_volume: number("request_volume", 1.0, 1e9)?
            .map_or(defaults.request_volume, |n| n as u32),
    }))
}

/// The default-priority thresholds of `circuit_breakers` (Envoy's defaults otherwise).
/// NIP enforces all of `max_requests`, `max_retries`, `retry_budget`, `max_connections`
/// and `max_pending_requests` (the last two on HTTP/1 clusters: connections in use).
pub(super) fn circuit_breakers(xds: &XdsCluster) -> Result<CircuitBreakers, String> {
    let defaults = CircuitBreakers::default();
    let thresholds = xds.circuit_breakers.as_ref().and_then(|b| {
        b.thresholds.iter().find(|t| {
            t.priority == envoy_types::pb::envoy::config::core::v3::RoutingPriority::Default as i32
        })
    });
    let Some(t) = thresholds else {
        return Ok(defaults);
    };
    let retry_budget = match &t.retry_budget {
        None => None,
        Some(budget) => {
            let envoy = RetryBudget::default();
            let percent = budget
                .budget_percent
                .as_ref()
                .map_or(envoy.percent, |p| p.value);
            if !(0.0..=100.0).contains(&percent) {
                return Err(format!(
                    "circuit_breakers.thresholds[DEFAULT].retry_budget.budget_percent: {percent} is not between 0 and 100"
                ));
            }
            Some(RetryBudget {
                percent,
                min_retry_concurrency: budget
                    .min_retry_concurrency
                    .as_ref()
                    .map_or(envoy.min_retry_concurrency, |v| v.value),
            })
        }
    };
    Ok(CircuitBreakers {
        max_requests: t
            .max_requests
            .as_ref()
            .map_or(defaults.max_requests, |v| v.value),
        max_retries: t
            .max_retries
            .as_ref()
            .map_or(defaults.max_retries, |v| v.value),
        retry_budget,
        max_connections: t
            .max_connections
            .as_ref()
            .map_or(defaults.max_connections, |v| v.value),
        max_pending_requests: t
            .max_pending_requests
            .as_ref()
            .map_or(defaults.max_pending_requests, |v| v.value),
    })
}

/// The policy from the `lb_policy` enum.
pub(super) fn legacy_lb_policy(xds: &XdsCluster) -> Result<LbPolicy, String> {
    match cluster::LbPolicy::try_from(xds.lb_policy) {
        Ok(cluster::LbPolicy::RoundRobin) => Ok(LbPolicy::RoundRobin),
        Ok(cluster::LbPolicy::LeastRequest) => Ok(LbPolicy::LeastRequest),
        Ok(cluster::LbPolicy::Random) => Ok(LbPolicy::Random),
        Ok(cluster::LbPolicy::RingHash) => Ok(LbPolicy::RingHash),
        Ok(other) => Err(format!(
            "lb_policy {} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH)",
            other.as_str_name()
        )),
        Err(_) => Err(format!("lb_policy {} is unknown", xds.lb_policy)),
    }
}

pub(super) fn upstream_http2(xds: &XdsCluster) -> Result<bool, String> {
    #[allow(deprecated)]
    let mut http2 = xds.http2_protocol_options.is_some();
    if let Some(other) = xds
        .typed_extension_protocol_options
        .keys()
        .find(|key| *key != names::HTTP_PROTOCOL_OPTIONS)
    {
        return Err(format!(
            "typed_extension_protocol_options[{other:?}]: only {} is supported",
            names::HTTP_PROTOCOL_OPTIONS
        ));
    }
    if let Some(any) = xds
        .typed_extension_protocol_options
        .get(names::HTTP_PROTOCOL_OPTIONS)
    {
        let options: HttpProtocolOptions = decode(any)?;
        if let Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
            options.upstream_protocol_options
        {
            http2 = matches!(
                explicit.protocol_config,
                Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_))
            );
        }
    }
    Ok(http2)
}

pub(super) fn health_check_spec(
    hc: &envoy_types::pb::envoy::config::core::v3::HealthCheck,
) -> Result<HealthCheckSpec, String> {
    let Some(health_check::HealthChecker::HttpHealthCheck(http)) = &hc.health_checker else {
        return Err("health_checks[0]: only http_health_check is supported".into());
    };
    let interval = hc
        .interval
        .as_ref()
        .and_then(duration)
        .filter(|d| !d.is_zero())
        .ok_or("health_checks[0].interval must be more than 0")?;
    let timeout = hc
        .timeout
        .as_ref()
        .and_then(duration)
        .filter(|d| !d.is_zero())
        .ok_or("health_checks[0].timeout must be more than 0")?;
    if !http.path.starts_with('/') {
        return Err("health_checks[0].http_health_check.path must start with '/'".into());
    }
    if http.path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(format!(
            "health_checks[0].http_health_check.path {:?} is not a valid request path",
            http.path
        ));
    }
    if !http.host.is_empty() && http.host.parse::<http::uri::Authority>().is_err() {
        return Err(format!(
            "health_checks[0].http_health_check.host {:?} is not a valid host",
            http.host
        ));
    }
    let expected_statuses = http
        .expected_statuses
        .iter()
        .map(|r| {
            let start = u16::try_from(r.start).map_err(|_| "expected_statuses out of range")?;
            let end = u16::try_from(r.end).map_err(|_| "expected_statuses out of range")?;
            Ok((start, end))
        })
        .collect::<Result<Vec<_>, &str>>()?;
    Ok(HealthCheckSpec {
        path: http.path.clone(),
        host: http.host.clone(),
        interval,
        timeout,
        unhealthy_threshold: hc
            .unhealthy_threshold
            .as_ref()
            .map_or(1, |v| v.value)
            .max(1),
        healthy_threshold: hc.healthy_threshold.as_ref().map_or(1, |v| v.value).max(1),
        expected_statuses,
    })
}

/// A cluster's adaptive concurrency (Envoy's `AdaptiveConcurrency` with a gradient
/// controller, in `metadata.typed_filter_metadata["nip.adaptive_concurrency"]`) and the
/// status of a shed request. Envoy's defaults fill what is not set.
pub(super) fn adaptive_concurrency(
    xds: &XdsCluster,
) -> Result<Option<(GradientConfig, u16)>, String> {
    use envoy_types::pb::envoy::extensions::filters::http::adaptive_concurrency::v3::{
        adaptive_concurrency::ConcurrencyControllerConfig, AdaptiveConcurrency,
    };
    let Some(any) = xds.metadata.as_ref().and_then(|m| {
        m.typed_filter_metadata
            .get(names::ADAPTIVE_CONCURRENCY_METADATA)
    }) else {
        return Ok(None);
    };
    let field = |name: &str| format!("{}.{name}", names::ADAPTIVE_CONCURRENCY_METADATA);
    let config: AdaptiveConcurrency = decode(any)?;
    if config.enabled.is_some() {
        return Err(format!(
            "{}: runtime flags are not supported (remove the block to switch it off)",
            field("enabled")
        ));
    }
    let status = match &config.concurrency_limit_exceeded_status {
        None => 503,
        Some(s) => u16::try_from(s.code)
            .ok()
            .filter(|c| (400..=599).contains(c))
            .ok_or_else(|| {
                format!(
                    "{}: {} is not a 4xx or 5xx status",
                    field("concurrency_limit_exceeded_status"),
                    s.code
                )
            })?,
    };
    let Some(ConcurrencyControllerConfig::GradientControllerConfig(gradient)) =
        config.concurrency_controller_config
    else {
        return Err(format!(
            "{}: needs a gradient_controller_config",
            field("concurrency_controller_config")
        ));
    };
    let defaults = GradientConfig::default();
    let percent = |p: &Option<envoy_types::pb::envoy::r#type::v3::Percent>,
                   name: &str,
                   default: f64,
                   max: f64|
     -> Result<f64, String> {
        match p {
            None => Ok(default),
            Some(p) if (0.0..=max).contains(&p.value) => Ok(p.value),
            Some(p) => Err(format!(
                "{}: {} is not between 0 and {max}",
                field(name),
                p.value
            )),
        }
    };
    let time = |d: &Option<PbDuration>, name: &str| -> Result<Option<Duration>, String> {
        d.as_ref()
            .map(|d| {
                duration(d)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("{} must be more than 0", field(name)))
            })
            .transpose()
    };
    let count = |v: &Option<UInt32Value>, name: &str, default: u32| match v {
        None => Ok(default),
        Some(v) if v.value > 0 => Ok(v.value),
        Some(_) => Err(format!("{} must be at least 1", field(name))),
    };
    let limits = gradient.concurrency_limit_params.unwrap_or_default();
    let min_rtt = gradient.min_rtt_calc_params.unwrap_or_default();
    let result = GradientConfig {
        percentile: percent(
            &gradient.sample_aggregate_percentile,
            "sample_aggregate_percentile",
            defaults.percentile,
            100.0,
        )?,
        update_interval: time(
            &limits.concurrency_update_interval,
            "concurrency_update_interval",
        )?
        .unwrap_or(defaults.update_interval),
        max_limit: count(
            &limits.max_concurrency_limit,
            "max_concurrency_limit",
            defaults.max_limit,
        )?,
        min_limit: count(
            &limits.min_concurrency_limit,
            "min_concurrency_limit",
            defaults.min_limit,
        )?,
        min_rtt_interval: time(&min_rtt.interval, "min_rtt_calc_params.interval")?
            .unwrap_or(defaults.min_rtt_interval),
        min_rtt_requests: count(
            &min_rtt.request_count,
            "min_rtt_calc_params.request_count",
            defaults.min_rtt_requests,
        )?,
        min_rtt_jitter_percent: percent(
            &min_rtt.jitter,
            "min_rtt_calc_params.jitter",
            defaults.min_rtt_jitter_percent,
            100.0,
        )?,
        min_concurrency: count(
            &min_rtt.min_concurrency,
            "min_rtt_calc_params.min_concurrency",
            defaults.min_concurrency,
        )?,
        buffer_percent: percent(
            &min_rtt.buffer,
            "min_rtt_calc_params.buffer",
            defaults.buffer_percent,
            1000.0,
        )?,
        fixed_min_rtt: time(&min_rtt.fixed_value, "min_rtt_calc_params.fixed_value")?,
    };
    if result.min_limit > result.max_limit {
        return Err(format!(
            "{}: {} is more than max_concurrency_limit {}",
            field("min_concurrency_limit"),
            result.min_limit,
            result.max_limit
        ));
    }
    Ok(Some((result, status)))
}

/// Ring sizes of a `ring_hash` cluster: from its typed `load_balancing_policy` (`RingHash`)
/// or the legacy `ring_hash_lb_config`; Envoy's defaults otherwise.
pub(super) fn ring_size(xds: &XdsCluster) -> Result<RingSize, String> {
    use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
    use envoy_types::pb::google::protobuf::UInt64Value;
    let typed = xds
        .load_balancing_policy
        .iter()
        .flat_map(|list| &list.policies)
        .filter_map(|p| p.typed_extension_config.as_ref())
        .find(|e| e.name == names::RING_HASH_POLICY);
    let (minimum, maximum, field): (Option<UInt64Value>, Option<UInt64Value>, &str) =
        match (typed, &xds.lb_config) {
            (Some(extension), _) => {
                let ring: RingHash = match &extension.typed_config {
                    Some(any) => decode(any)?,
                    None => RingHash::default(),
                };
                (
                    ring.minimum_ring_size,
                    ring.maximum_ring_size,
                    names::RING_HASH_POLICY,
                )
            }
            (None, Some(cluster::LbConfig::RingHashLbConfig(ring))) => (
                ring.minimum_ring_size,
                ring.maximum_ring_size,
                "ring_hash_lb_config",
            ),
            (None, _) => (None, None, ""),
        };
    let defaults = RingSize::default();
    let size = RingSize {
        minimum: minimum.map_or(defaults.minimum, |v| v.value),
        maximum: maximum.map_or(defaults.maximum, |v| v.value),
    };
    if size.minimum == 0 || size.minimum > size.maximum || size.maximum > defaults.maximum {
        return Err(format!(
            "{field}: ring sizes must satisfy 1 ≤ minimum ({}) ≤ maximum ({}) ≤ {}",
            size.minimum, size.maximum, defaults.maximum
        ));
    }
    Ok(size)
}

/// A cluster's TLS (`transport_socket` with an `UpstreamTlsContext`) as the resource says
/// it: names and files, found and read by `prepare`.
#[derive(Debug, Clone)]
pub(super) struct UpstreamTlsSpec {
    /// `sni` (`None` when empty).
    pub sni: Option<String>,
    /// The roots (`None`: the system's).
    pub trust: Option<super::secrets::TrustRef>,
    /// `match_typed_subject_alt_names`, checked.
    pub san_matchers: Vec<crate::upstream::tls::SanMatcher>,
    /// The client certificate, for mutual TLS.
    pub client: Option<super::secrets::CertificateRef>,
}

pub(super) fn upstream_tls_spec(xds: &XdsCluster) -> Result<Option<UpstreamTlsSpec>, String> {
    if !xds.health_checks.is_empty()
        && (xds.transport_socket.is_some() || !xds.transport_socket_matches.is_empty())
    {
        return Err("health checks of a TLS cluster are not supported yet".into());
    }
    match &xds.transport_socket {
        None => Ok(None),
        Some(socket) => transport_socket_spec(socket),
    }
}

/// One of a cluster's `transport_socket_matches`: endpoints whose metadata under
/// `envoy.transport_socket_match` has every field of `criteria` use `spec` (`None`: a raw
/// buffer, plaintext).
#[derive(Debug, Clone)]
pub(super) struct SocketMatch {
    /// The entry's `match`.
    pub criteria: envoy_types::pb::google::protobuf::Struct,
    /// Its transport socket.
    pub spec: Option<UpstreamTlsSpec>,
}

/// A cluster's `transport_socket_matches`, in order (the first match wins, as in Envoy).
pub(super) fn transport_socket_matches(xds: &XdsCluster) -> Result<Vec<SocketMatch>, String> {
    xds.transport_socket_matches
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let spec = match &entry.transport_socket {
                None => None,
                Some(socket) => transport_socket_spec(socket)
                    .map_err(|e| format!("transport_socket_matches[{i}] {:?}: {e}", entry.name))?,
            };
            Ok(SocketMatch {
                criteria: entry.r#match.clone().unwrap_or_default(),
                spec,
            })
        })
        .collect()
}

/// What a transport socket is: TLS (its spec), or a raw buffer (`None`).
fn transport_socket_spec(
    socket: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
) -> Result<Option<UpstreamTlsSpec>, String> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
    if socket.name == names::RAW_BUFFER_TRANSPORT_SOCKET {
        return Ok(None);
    }
    if socket.name != names::TLS_TRANSPORT_SOCKET {
        return Err(format!(
            "transport_socket {:?}: only {} and {} are supported",
            socket.name,
            names::TLS_TRANSPORT_SOCKET,
            names::RAW_BUFFER_TRANSPORT_SOCKET
        ));
    }
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Err("transport_socket: typed_config is missing".into());
    };
    let context: UpstreamTlsContext = decode(any).map_err(|e| format!("transport_socket: {e}"))?;
    let common = context.common_tls_context.unwrap_or_default();
    let refs =
        super::secrets::tls_context(&common).map_err(|e| format!("transport_socket: {e}"))?;
    let client = match refs.certificates.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        _ => return Err("transport_socket: one client certificate at most".into()),
    };
    let san_matchers = refs
        .san_matchers
        .iter()
        .enumerate()
        .map(|(i, m)| {
            san_matcher(m)
                .map_err(|e| format!("transport_socket: match_typed_subject_alt_names[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if !context.sni.is_empty() {
        rustls::pki_types::ServerName::try_from(context.sni.as_str())
            .map_err(|e| format!("transport_socket: sni {:?}: {e}", context.sni))?;
    }
    Ok(Some(UpstreamTlsSpec {
        sni: (!context.sni.is_empty()).then_some(context.sni),
        trust: refs.trust,
        san_matchers,
        client,
    }))
}

/// One `SubjectAltNameMatcher`: DNS or URI names, by any `StringMatcher` but ignore-case.
fn san_matcher(
    matcher: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher,
) -> Result<crate::upstream::tls::SanMatcher, String> {
    use crate::matchers::StringMatch;
    use crate::upstream::tls::{SanMatcher, SanType};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType as XdsSanType;
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    let san_type = match XdsSanType::try_from(matcher.san_type) {
        Ok(XdsSanType::Dns) => SanType::Dns,
        Ok(XdsSanType::Uri) => SanType::Uri,
        Ok(other) => {
            return Err(format!(
                "san_type {}: NIP matches DNS and URI names",
                other.as_str_name()
            ))
        }
        Err(_) => return Err(format!("san_type {} is unknown", matcher.san_type)),
    };
    let Some(string) = &matcher.matcher else {
        return Err("matcher is missing".into());
    };
    if string.ignore_case {
        return Err("matcher.ignore_case is not supported".into());
    }
    let matcher = match &string.match_pattern {
        Some(MatchPattern::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(MatchPattern::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(MatchPattern::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(MatchPattern::Contains(v)) => StringMatch::Contains(v.clone()),
        Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(
            regex::Regex::new(&format!("^(?:{})$", r.regex))
                .map_err(|e| format!("matcher.safe_regex: {e}"))?,
        ),
        _ => return Err("matcher: a pattern is needed".into()),
    };
    Ok(SanMatcher { san_type, matcher })
}
