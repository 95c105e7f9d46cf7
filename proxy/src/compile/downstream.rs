//! Client limits of the listener, decoded from its `HttpConnectionManager` with Envoy's
//! fields and meanings (`0s` disables a timeout) and from its `nip.downstream` metadata.

use crate::downstream::limits::{DownstreamLimits, MAX_REQUEST_HEADERS_KB_CEILING};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use nip_xds::resources::names;
use std::time::Duration;

/// The listener's client limits; absent fields take NIP's defaults
/// ([`DownstreamLimits::default`]).
pub(super) fn downstream_limits(
    listener: &Listener,
    hcm: &HttpConnectionManager,
) -> Result<DownstreamLimits, String> {
    let mut limits = DownstreamLimits::default();
    if let Some(t) = &hcm.request_headers_timeout {
        limits.request_headers_timeout = timeout(t, "request_headers_timeout")?;
    }
    if let Some(t) = &hcm.stream_idle_timeout {
        limits.stream_idle_timeout = timeout(t, "stream_idle_timeout")?;
    }
    if let Some(kb) = &hcm.max_request_headers_kb {
        if kb.value == 0 || kb.value > MAX_REQUEST_HEADERS_KB_CEILING {
            return Err(format!(
                "max_request_headers_kb: {} is outside 1–{MAX_REQUEST_HEADERS_KB_CEILING}",
                kb.value
            ));
        }
        limits.max_request_headers_kb = kb.value;
    }
    if let Some(options) = &hcm.common_http_protocol_options {
        if let Some(t) = &options.idle_timeout {
            limits.idle_timeout = timeout(t, "common_http_protocol_options.idle_timeout")?;
        }
        if let Some(t) = &options.max_connection_duration {
            limits.max_connection_duration =
                timeout(t, "common_http_protocol_options.max_connection_duration")?;
        }
        if let Some(count) = &options.max_headers_count {
            if count.value == 0 {
                return Err(
                    "common_http_protocol_options.max_headers_count must be at least 1".into(),
                );
            }
            limits.max_headers_count = count.value;
        }
        if let Some(n) = &options.max_requests_per_connection {
            limits.max_requests_per_connection = (n.value > 0).then_some(n.value);
        }
        if options.max_stream_duration.is_some() {
            return Err("common_http_protocol_options.max_stream_duration is not supported (use the route timeout)".into());
        }
        if options.headers_with_underscores_action != 0 {
            return Err(
                "common_http_protocol_options.headers_with_underscores_action is not supported"
                    .into(),
            );
        }
    }
    let metadata = listener
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(names::DOWNSTREAM_METADATA));
    if let Some(fields) = metadata {
        for (key, value) in &fields.fields {
            let field = format!(
                "metadata.filter_metadata[{:?}].{key}",
                names::DOWNSTREAM_METADATA
            );
            match (key.as_str(), &value.kind) {
                ("max_active_downstream_connections", Some(Kind::NumberValue(n))) => {
                    if !(n.is_finite() && *n >= 1.0 && *n <= 1e9) || n.fract() != 0.0 {
                        return Err(format!("{field}: {n} is not a whole number in 1–10⁹"));
                    }
                    limits.max_active_downstream_connections = Some(*n as u64);
                }
                ("trust_priority_header", Some(Kind::BoolValue(b))) => {
                    limits.trust_priority_header = *b;
                }
                ("max_active_downstream_connections", _) => {
                    return Err(format!("{field} must be a number"))
                }
                ("trust_priority_header", _) => return Err(format!("{field} must be a bool")),
                (other, _) => {
                    return Err(format!(
                        "metadata.filter_metadata[{:?}]: unknown key {other:?}",
                        names::DOWNSTREAM_METADATA
                    ))
                }
            }
        }
    }
    Ok(limits)
}

/// A timeout: `0s` disables it, as in Envoy; negative values are refused.
fn timeout(d: &PbDuration, field: &str) -> Result<Option<Duration>, String> {
    let secs = u64::try_from(d.seconds).map_err(|_| format!("{field} is negative"))?;
    let nanos = u32::try_from(d.nanos).map_err(|_| format!("{field} is negative"))?;
    let d = Duration::new(secs, nanos);
    Ok((!d.is_zero()).then_some(d))
}
