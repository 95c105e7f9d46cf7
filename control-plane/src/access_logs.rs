//! Access records proxies stream here (Envoy's gRPC access log service, on the xDS port,
//! bound to each proxy's certificate like ADS), for whoever follows them: `GET /v1/logs`
//! (`nip logs --follow`) and the dashboard's per-route figures.
//!
//! ```text
//! proxy ──StreamAccessLogs──▶ AccessLogReceiver ──▶ AccessLogHub ─┬▶ recent (ring of RECENT)
//!                                                                ├▶ followers (broadcast,
//!                                                                │   bounded: a slow one
//!                                                                │   loses lines, told how many)
//!                                                                └▶ per-route window (60 s)
//! ```
//!
//! Nothing here waits on a follower: with nobody listening, lines only fill the ring.

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines kept for a reader who was not following.
pub const RECENT: usize = 1000;
/// Lines a follower may fall behind by before it loses some.
const FOLLOWER_BUFFER: usize = 4096;
/// The window of the per-route figures.
pub const ROUTE_WINDOW: Duration = Duration::from_secs(60);
/// Requests kept per route in the window at most: past it the oldest go (the rate is over
/// the span the kept ones cover, so it stays right; the percentiles are of the newest).
const MAX_ROUTE_SAMPLES: usize = 50_000;
/// Routes with figures at most: a proxy streaming ever-new route names cannot grow the
/// window without bound (records of further routes still reach followers).
const MAX_ROUTES: usize = 10_000;

/// One access record as followers see it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamedLine {
    /// The proxy it came from (its certificate's node).
    pub node: String,
    /// When the request started (RFC 3339).
    pub start_time: String,
    /// Method.
    pub method: String,
    /// Host / `:authority`.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// Status (0: none sent).
    pub status: u32,
    /// Milliseconds from start to the end of the response.
    pub duration_ms: f64,
    /// The route that took it.
    pub route: String,
    /// Upstream cluster.
    pub cluster: String,
    /// Upstream endpoint.
    pub upstream_host: String,
    /// Request id.
    pub request_id: String,
}

impl StreamedLine {
    fn of(node: &str, entry: &HttpAccessLogEntry) -> StreamedLine {
        let common = entry.common_properties.clone().unwrap_or_default();
        let request = entry.request.clone().unwrap_or_default();
        let response = entry.response.clone().unwrap_or_default();
        let start_time = common
            .start_time
            .and_then(|t| {
                let since =
                    Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
                Some(humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + since).to_string())
            })
            .unwrap_or_default();
        let duration_ms = common.duration.map_or(0.0, |d| {
            d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1_000_000.0
        });
        let upstream_host = common
            .upstream_remote_address
            .and_then(|a| match a.address? {
                envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) => {
                    let port = match s.port_specifier? {
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p) => p,
                        _ => return None,
                    };
                    Some(format!("{}:{port}", s.address))
                }
                _ => None,
            })
            .unwrap_or_default();
        let method = envoy_types::pb::envoy::config::core::v3::RequestMethod::try_from(
            request.request_method,
        )
        .map(|m| m.as_str_name().to_string())
        .unwrap_or_default();
        StreamedLine {
            node: node.to_string(),
            start_time,
            method,
            authority: request.authority,
            path: request.path,
            status: response.response_code.map_or(0, |c| c.value),
            duration_ms,
            route: common.route_name,
            cluster: common.upstream_cluster,
            upstream_host,
            request_id: request.request_id,
        }
    }
}

/// A route's figures over the last [`ROUTE_WINDOW`], from the streamed records.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteFigures {
    /// The route.
    pub route: String,
    /// Requests per second.
    pub requests_per_second: f64,
    /// Share of answers with a 5xx status (0–1).
    pub error_rate: f64,
    /// Median duration (ms).
    pub p50_ms: f64,
    /// 99th percentile duration (ms).
    pub p99_ms: f64,
    /// Requests in the window.
    pub requests: usize,
}

/// One request in a route's window: when it was received, its status, its duration (ms).
type Sample = (Instant, u32, f64);

/// Where streamed records go.
#[derive(Debug)]
pub struct AccessLogHub {
    followers: tokio::sync::broadcast::Sender<Arc<StreamedLine>>,
    recent: Mutex<VecDeque<Arc<StreamedLine>>>,
    /// Per route, oldest first.
    window: Mutex<BTreeMap<String, VecDeque<Sample>>>,
}

impl Default for AccessLogHub {
    fn default() -> Self {
        AccessLogHub {
            followers: tokio::sync::broadcast::channel(FOLLOWER_BUFFER).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            window: Mutex::default(),
        }
    }
}

impl AccessLogHub {
    /// Takes one record in.
    pub fn publish(&self, line: StreamedLine) {
        let line = Arc::new(line);
        let now = Instant::now();
        {
            let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if window.contains_key(&line.route) || window.len() < MAX_ROUTES {
                let route = window.entry(line.route.clone()).or_default();
                route.push_back((now, line.status, line.duration_ms));
                while route.len() > MAX_ROUTE_SAMPLES
                    || route
                        .front()
                        .is_some_and(|(t, _, _)| now.duration_since(*t) > ROUTE_WINDOW)
                {
                    route.pop_front();
                }
            }
        }
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&line));
        }
        // No follower: nothing to do.
        let _ = self.followers.send(line);
    }

    /// The kept lines, oldest first.
    pub fn recent(&self) -> Vec<Arc<StreamedLine>> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A follower: the lines that come from now on.
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<Arc<StreamedLine>> {
        self.followers.subscribe()
    }

    /// Each route's figures over the last minute (routes with requests in it).
    pub fn routes(&self) -> Vec<RouteFigures> {
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        window.retain(|_, records| {
            while records
                .front()
                .is_some_and(|(t, _, _)| now.duration_since(*t) > ROUTE_WINDOW)
            {
                records.pop_front();
            }
            !records.is_empty()
        });
        window
            .iter()
            .map(|(route, records)| {
                let mut durations: Vec<f64> = records.iter().map(|(_, _, d)| *d).collect();
                durations.sort_by(f64::total_cmp);
                let quantile = |q: f64| {
                    let index = ((durations.len() as f64 - 1.0) * q).round() as usize;
                    durations.get(index).copied().unwrap_or(0.0)
                };
                let errors = records
                    .iter()
                    .filter(|(_, s, _)| (500..600).contains(s))
                    .count();
                // Over the window, or since the first record when that is shorter.
                let span = records
                    .front()
                    .map_or(ROUTE_WINDOW, |(t, _, _)| now.duration_since(*t))
                    .clamp(Duration::from_secs(1), ROUTE_WINDOW);
                RouteFigures {
                    route: route.clone(),
                    requests_per_second: records.len() as f64 / span.as_secs_f64(),
                    error_rate: errors as f64 / records.len() as f64,
                    p50_ms: quantile(0.5),
                    p99_ms: quantile(0.99),
                    requests: records.len(),
                }
            })
            .collect()
    }
}

/// The gRPC service proxies stream to.
#[derive(Debug, Clone)]
pub struct AccessLogReceiver {
    hub: Arc<AccessLogHub>,
    /// With a CA: each stream speaks only for the node its client certificate names.
    trust_domain: Option<String>,
}

impl AccessLogReceiver {
    /// A receiver into `hub`; with `trust_domain`, streams need a client certificate.
    pub fn new(hub: Arc<AccessLogHub>, trust_domain: Option<String>) -> Self {
        AccessLogReceiver { hub, trust_domain }
    }

    /// The tonic service.
    pub fn into_service(self) -> AccessLogServiceServer<AccessLogReceiver> {
        AccessLogServiceServer::new(self).max_decoding_message_size(4 << 20)
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogReceiver {
    async fn stream_access_logs(
        &self,
        request: tonic::Request<tonic::Streaming<StreamAccessLogsMessage>>,
    ) -> Result<tonic::Response<StreamAccessLogsResponse>, tonic::Status> {
        let certified = match &self.trust_domain {
            Some(domain) => Some(nip_xds::identity::certified_node(
                &request,
                domain,
                "the access log service",
            )?),
            None => None,
        };
        let mut stream = request.into_inner();
        let mut node: Option<String> = None;
        while let Some(message) = stream.message().await? {
            if let Some(identifier) = message.identifier {
                let claimed = identifier.node.map(|n| n.id).unwrap_or_default();
                if certified.as_ref().is_some_and(|c| *c != claimed) {
                    return Err(tonic::Status::permission_denied(format!(
                        "the stream's certificate is node {:?}, not {claimed:?}",
                        certified.unwrap_or_default()
                    )));
                }
                node = Some(claimed);
            }
            let Some(node) = &node else {
                return Err(tonic::Status::invalid_argument(
                    "the first message must carry the identifier (node)",
                ));
            };
            if let Some(LogEntries::HttpLogs(entries)) = message.log_entries {
                for entry in &entries.log_entry {
                    self.hub.publish(StreamedLine::of(node, entry));
                }
            }
        }
        Ok(tonic::Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(route: &str, status: u32, duration_ms: f64) -> StreamedLine {
        StreamedLine {
            node: "edge-1".into(),
            start_time: String::new(),
            method: "GET".into(),
            authority: String::new(),
            path: "/".into(),
            status,
            duration_ms,
            route: route.into(),
            cluster: String::new(),
            upstream_host: String::new(),
            request_id: String::new(),
        }
    }

    #[test]
    fn route_figures_come_from_the_window_and_the_ring_keeps_the_newest() {
        let hub = AccessLogHub::default();
        for i in 0..100 {
            hub.publish(line("shop", if i < 5 { 503 } else { 200 }, f64::from(i)));
        }
        hub.publish(line("rest", 200, 1.0));
        let figures = hub.routes();
        let shop = figures.iter().find(|f| f.route == "shop").unwrap();
        assert_eq!(shop.requests, 100);
        assert!((shop.error_rate - 0.05).abs() < 1e-9);
        assert_eq!(shop.p50_ms, 50.0);
        assert_eq!(shop.p99_ms, 98.0);
        assert_eq!(figures.len(), 2);
        for _ in 0..RECENT {
            hub.publish(line("rest", 200, 1.0));
        }
        let recent = hub.recent();
        assert_eq!(recent.len(), RECENT);
        assert!(recent.iter().all(|l| l.route == "rest"));
    }

    #[test]
    fn the_window_is_bounded_in_samples_and_in_routes() {
        let hub = AccessLogHub::default();
        for _ in 0..MAX_ROUTE_SAMPLES + 10 {
            hub.publish(line("busy", 200, 1.0));
        }
        for i in 0..MAX_ROUTES + 5 {
            hub.publish(line(&format!("route-{i}"), 200, 1.0));
        }
        let figures = hub.routes();
        assert_eq!(figures.len(), MAX_ROUTES);
        let busy = figures.iter().find(|f| f.route == "busy").unwrap();
        assert_eq!(busy.requests, MAX_ROUTE_SAMPLES);
    }
}
