//! A connection manager's `tracing` (Envoy's, with the OpenTelemetry provider): sampling,
//! upstream spans, and the collector (`grpc_service` or `http_service`, each naming a
//! cluster whose first endpoint gets the spans). NIP's own choices — whether a client's
//! `traceparent` decides sampling, whether failed requests are always exported — come
//! from the listener's `nip.tracing` metadata. What NIP does not do is refused by field.

use super::*;
use crate::telemetry::otlp::{Collector, SpanExport};
use crate::telemetry::trace::Tracing;
use envoy_types::pb::envoy::config::trace::v3::{tracing::http::ConfigType, OpenTelemetryConfig};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as XdsTracing;
use envoy_types::pb::google::protobuf::value::Kind;

/// Envoy's default `max_path_tag_length`.
const DEFAULT_MAX_PATH_LENGTH: usize = 256;
/// How long one export may take when the service names no timeout.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The service name spans carry when the config names none.
const DEFAULT_SERVICE_NAME: &str = "nip";

impl Compiler<'_> {
    /// The connection manager's tracing, if it traces.
    pub(super) fn tracing(
        &self,
        listener: &Listener,
        tracing: Option<&XdsTracing>,
        clusters: &BTreeMap<String, Arc<Cluster>>,
    ) -> Result<Option<Arc<Tracing>>, String> {
        let Some(tracing) = tracing else {
            return Ok(None);
        };
        let field = |m: String| format!("http_connection_manager.tracing.{m}");
        if tracing.client_sampling.is_some() {
            return Err(field(
                "client_sampling is not supported (NIP does not read x-client-trace-id)".into(),
            ));
        }
        if !tracing.custom_tags.is_empty() {
            return Err(field("custom_tags is not supported".into()));
        }
        let percent = |p: &Option<envoy_types::pb::envoy::r#type::v3::Percent>, name: &str| {
            let value = p.as_ref().map_or(100.0, |p| p.value);
            if !(0.0..=100.0).contains(&value) || value.is_nan() {
                return Err(field(format!("{name}: {value} is not a percentage")));
            }
            Ok(value / 100.0)
        };
        let sampling = percent(&tracing.random_sampling, "random_sampling")?
            .min(percent(&tracing.overall_sampling, "overall_sampling")?);
        let provider = tracing
            .provider
            .as_ref()
            .ok_or_else(|| field("provider is missing (NIP exports spans over OTLP)".into()))?;
        let Some(ConfigType::TypedConfig(any)) = &provider.config_type else {
            return Err(field("provider.typed_config is missing".into()));
        };
        if any.type_url != OpenTelemetryConfig::type_url() {
            return Err(field(format!(
                "provider {:?} ({}) is not supported: envoy.tracers.opentelemetry",
                provider.name, any.type_url
            )));
        }
        let otel: OpenTelemetryConfig = decode(any).map_err(|e| field(format!("provider: {e}")))?;
        let collector =
            collector(&otel, clusters).map_err(|e| field(format!("provider.typed_config.{e}")))?;
        let (parent_based, errors) = choices(listener)?;
        let service_name = if otel.service_name.is_empty() {
            DEFAULT_SERVICE_NAME.to_string()
        } else {
            otel.service_name.clone()
        };
        Ok(Some(Arc::new(Tracing {
            sampling,
            parent_based,
            errors,
            upstream_spans: tracing
                .spawn_upstream_span
                .as_ref()
                .is_some_and(|b| b.value),
            max_path_length: tracing
                .max_path_tag_length
                .as_ref()
                .map_or(DEFAULT_MAX_PATH_LENGTH, |n| n.value as usize),
            export: SpanExport::new(collector, service_name, self.metrics.trace_spans()),
        })))
    }
}

/// Where the OpenTelemetry provider sends spans.
fn collector(
    otel: &OpenTelemetryConfig,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Result<Collector, String> {
    use envoy_types::pb::envoy::config::core::v3::{grpc_service::TargetSpecifier, http_uri};
    for (name, set) in [
        ("resource_detectors", !otel.resource_detectors.is_empty()),
        ("sampler", otel.sampler.is_some()),
        ("exporter", otel.exporter.is_some()),
    ] {
        if set {
            return Err(format!("{name} is not supported"));
        }
    }
    // The exporter dials the collector itself, in plaintext: a cluster that would speak
    // TLS to it is refused rather than sent spans unencrypted.
    let address = |cluster: &str, field: &str| {
        let endpoint = clusters
            .get(cluster)
            .and_then(|c| c.endpoints.first())
            .ok_or_else(|| format!("{field} {cluster:?} is not a cluster with an endpoint"))?;
        if endpoint.tls.is_some() {
            return Err(format!(
                "{field} {cluster:?}: the cluster uses TLS; NIP exports spans in plaintext (to a collector or agent beside it)"
            ));
        }
        Ok(endpoint.address)
    };
    match (&otel.grpc_service, &otel.http_service) {
        (Some(grpc), None) => {
            if !grpc.initial_metadata.is_empty() {
                return Err("grpc_service.initial_metadata is not supported".into());
            }
            let Some(TargetSpecifier::EnvoyGrpc(target)) = &grpc.target_specifier else {
                return Err("grpc_service: only envoy_grpc (a cluster) is supported".into());
            };
            Ok(Collector::Grpc {
                address: address(&target.cluster_name, "grpc_service.envoy_grpc.cluster_name")?,
                authority: super::grpc_authority(target),
                timeout: grpc
                    .timeout
                    .as_ref()
                    .and_then(duration)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(DEFAULT_EXPORT_TIMEOUT),
            })
        }
        (None, Some(http)) => {
            if !http.request_headers_to_add.is_empty() {
                return Err("http_service.request_headers_to_add is not supported".into());
            }
            let uri = http
                .http_uri
                .as_ref()
                .ok_or("http_service.http_uri is missing")?;
            let Some(http_uri::HttpUpstreamType::Cluster(cluster)) = &uri.http_upstream_type else {
                return Err("http_service.http_uri.cluster is missing".into());
            };
            let parsed: http::Uri = uri
                .uri
                .parse()
                .map_err(|e| format!("http_service.http_uri.uri {:?}: {e}", uri.uri))?;
            if parsed.scheme_str() != Some("http") || parsed.authority().is_none() {
                return Err(format!(
                    "http_service.http_uri.uri {:?}: an http:// URL is needed (OTLP/HTTP without TLS; use grpc_service for a TLS collector)",
                    uri.uri
                ));
            }
            Ok(Collector::Http {
                address: address(cluster, "http_service.http_uri.cluster")?,
                url: uri.uri.clone(),
                timeout: uri
                    .timeout
                    .as_ref()
                    .and_then(duration)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(DEFAULT_EXPORT_TIMEOUT),
            })
        }
        (Some(_), Some(_)) => Err("grpc_service and http_service are both set".into()),
        (None, None) => Err("grpc_service or http_service is needed".into()),
    }
}

/// `parent_based` (default true) and `errors` (default false) from the listener's
/// `nip.tracing` metadata.
fn choices(listener: &Listener) -> Result<(bool, bool), String> {
    let (mut parent_based, mut errors) = (true, false);
    let metadata = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::TRACING_METADATA));
    for (key, value) in metadata.map(|m| m.fields.iter()).into_iter().flatten() {
        let field = format!(
            "metadata.filter_metadata[{:?}].{key}",
            names::TRACING_METADATA
        );
        let Some(Kind::BoolValue(on)) = value.kind else {
            return Err(format!("{field} must be a bool"));
        };
        match key.as_str() {
            "parent_based" => parent_based = on,
            "errors" => errors = on,
            other => {
                return Err(format!(
                    "metadata.filter_metadata[{:?}]: unknown key {other:?}",
                    names::TRACING_METADATA
                ))
            }
        }
    }
    Ok((parent_based, errors))
}
