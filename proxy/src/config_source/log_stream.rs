//! The proxy's access records to its control plane (`control_plane.stream_access_logs`),
//! over Envoy's gRPC access log service (`StreamAccessLogs`, `HTTPAccessLogEntry`) and the
//! same channel settings as ADS (mutual TLS with the workload certificate).
//!
//! ```text
//! request ends ──▶ Tap (bounded ring; only while this stream is connected)
//!              ──▶ batches of ≤ BATCH entries, or what came in FLUSH ──▶ StreamAccessLogs
//! ```
//!
//! The stream watches the tap only while it is connected, so a proxy whose control plane
//! is away pays nothing per request; records the stream could not keep up with are lost
//! and counted in `nip_access_log_dropped_total`. It reconnects with back-off.

use crate::telemetry::metrics::Metrics;
use crate::telemetry::tap::TapRecord;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, Node, RequestMethod, SocketAddress,
};
use envoy_types::pb::envoy::data::accesslog::v3::http_access_log_entry::HttpVersion;
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
    ResponseFlags,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use nip_xds::client::TlsSettings;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::broadcast::error::RecvError;

/// Entries sent in one message at most.
const BATCH: usize = 100;
/// How long an entry may wait for others to share its message.
const FLUSH: Duration = Duration::from_millis(200);
/// The log name the control plane sees.
const LOG_NAME: &str = "nip";
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Streams forever (on the xDS thread's runtime).
pub async fn stream_access_logs(
    server: String,
    node: Node,
    tls: Option<TlsSettings>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match stream_once(&server, &node, tls.as_ref(), &metrics).await {
            Ok(()) => backoff = INITIAL_BACKOFF,
            Err(e) => tracing::debug!(%server, "access log stream: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One stream, until it breaks. `Ok` when it carried something (the next try starts from
/// the shortest back-off).
async fn stream_once(
    server: &str,
    node: &Node,
    tls: Option<&TlsSettings>,
    metrics: &Metrics,
) -> Result<(), String> {
    let channel = nip_xds::client::connect_channel(server, tls).await?;
    let (messages, outgoing) = tokio::sync::mpsc::channel::<StreamAccessLogsMessage>(4);
    let mut client = AccessLogServiceClient::new(channel);
    let call = tokio::spawn(async move {
        client
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
    });
    // Watched from here on: requests that end now are streamed.
    let mut tap = metrics.tap.watch();
    let mut identifier = Some(Identifier {
        node: Some(node.clone()),
        log_name: LOG_NAME.to_string(),
    });
    let mut sent_any = false;
    loop {
        let mut batch = Vec::new();
        let first = match tap.recv().await {
            Ok(record) => record,
            Err(RecvError::Lagged(lost)) => {
                metrics.access_log_dropped.inc_by(lost);
                continue;
            }
            Err(RecvError::Closed) => return Ok(()),
        };
        batch.push(entry(&first));
        let flush_at = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(flush_at, tap.recv()).await {
                Ok(Ok(record)) => batch.push(entry(&record)),
                Ok(Err(RecvError::Lagged(lost))) => {
                    metrics.access_log_dropped.inc_by(lost);
                }
                Ok(Err(RecvError::Closed)) | Err(_) => break,
            }
        }
        let message = StreamAccessLogsMessage {
            identifier: identifier.take(),
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: batch,
            })),
        };
        if messages.send(message).await.is_err() || call.is_finished() {
            let ended = call.await.map_err(|e| e.to_string())?;
            return match ended {
                Ok(_) if sent_any => Ok(()),
                Ok(_) => Err("the control plane closed the stream".into()),
                Err(status) => Err(format!("{}: {}", status.code(), status.message())),
            };
        }
        sent_any = true;
    }
}

/// A record as Envoy's HTTP access log entry.
fn entry(record: &TapRecord) -> HttpAccessLogEntry {
    let timestamp = |time: SystemTime| {
        let since = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        envoy_types::pb::google::protobuf::Timestamp {
            seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        }
    };
    let duration = record.duration;
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            start_time: Some(timestamp(record.start)),
            duration: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
            }),
            upstream_cluster: record.cluster.clone(),
            upstream_remote_address: socket(&record.upstream_host),
            route_name: record.route.clone(),
            response_flags: flags(&record.flags),
            stream_id: record.request_id.clone(),
            ..Default::default()
        }),
        protocol_version: match record.protocol.as_str() {
            "HTTP/2" => HttpVersion::Http2,
            _ => HttpVersion::Http11,
        } as i32,
        request: Some(HttpRequestProperties {
            request_method: RequestMethod::from_str_name(&record.method).map_or(0, |m| m as i32),
            authority: record.authority.clone(),
            path: record.path.clone(),
            user_agent: record.user_agent.clone(),
            forwarded_for: record.forwarded_for.clone(),
            request_id: record.request_id.clone(),
            request_body_bytes: record.bytes_received as u64,
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: (record.status > 0).then_some(
                envoy_types::pb::google::protobuf::UInt32Value {
                    value: u32::from(record.status),
                },
            ),
            response_body_bytes: record.bytes_sent as u64,
            ..Default::default()
        }),
    }
}

/// `host:port` as an address (none when it is not one).
fn socket(text: &str) -> Option<Address> {
    let address: std::net::SocketAddr = text.parse().ok()?;
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: address.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                address.port(),
            ))),
            ..Default::default()
        })),
    })
}

/// NIP's response flag as Envoy's flag fields (`None` when there is none).
fn flags(flag: &str) -> Option<ResponseFlags> {
    let mut flags = ResponseFlags::default();
    match flag {
        "NR" => flags.no_route_found = true,
        "UH" => flags.no_healthy_upstream = true,
        "UF" => flags.upstream_connection_failure = true,
        "UT" => flags.upstream_request_timeout = true,
        "UR" => flags.upstream_remote_reset = true,
        "NC" => flags.no_cluster_found = true,
        "URX" => flags.upstream_retry_limit_exceeded = true,
        "UO" => flags.upstream_overflow = true,
        "OM" => flags.overload_manager = true,
        "RL" => flags.rate_limited = true,
        "RLSE" => flags.rate_limit_service_error = true,
        "DT" => flags.duration_timeout = true,
        "SI" => flags.stream_idle_timeout = true,
        "UAEX" | "RBAC" => {
            flags.unauthorized_details = Some(
                envoy_types::pb::envoy::data::accesslog::v3::response_flags::Unauthorized {
                    // EXTERNAL_SERVICE for ext_authz; RBAC has no reason of its own.
                    reason: i32::from(flag == "UAEX"),
                },
            )
        }
        _ => return None,
    }
    Some(flags)
}
