//! The admin port: readiness, liveness, metrics, config dump and cluster state.
//!
//! It runs on the control runtime, a single thread apart from pingora's workers, so a
//! scrape or a config dump never competes with requests for a worker.
//!
//! | path | answers |
//! |---|---|
//! | `/ready` | 200 once a config is loaded, 503 while draining |
//! | `/healthz` | 200 while the process runs |
//! | `/metrics` | Prometheus text |
//! | `/config_dump` | the xDS resources being served, as proto3 JSON, with version and node |
//! | `/clusters` | every endpoint with locality, weight, health, load and latency estimate |
//! | `/plugins` | each plugin's declaration, module digest, health and process |
//! | `/plugins/logs?plugin=&after=&limit=` | the latest lines wasm plugins logged |
//! | `/tap?route=&status=&limit=&seconds=` | finished requests as they happen, one JSON line each (bounded) |

use crate::compile::Snapshot;
use crate::telemetry::metrics::{Metrics, StateGauges};
use arc_swap::ArcSwap;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use nip_xds::json::to_json;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Process status the admin port reports beside the snapshot.
#[derive(Debug, Default)]
pub struct ProxyStatus {
    draining: AtomicBool,
    last_reload_error: Mutex<Option<String>>,
}

impl ProxyStatus {
    /// Marks the proxy as shutting down: `/ready` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Records the outcome of the latest reload (`None` when it worked).
    pub fn set_reload_error(&self, error: Option<String>) {
        *self
            .last_reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// Why the latest reload was refused, if it was.
    pub fn reload_error(&self) -> Option<String> {
        self.last_reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The live snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// Draining and reload status.
    pub status: Arc<ProxyStatus>,
    /// Plugin engine (plugin-defined metrics).
    pub plugins: Arc<crate::plugins::PluginLoader>,
    /// The plugin processes the proxy keeps running.
    pub processes: crate::supervisor::ProcessStatuses,
}

/// The admin routes.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/ready", get(ready))
        .route("/healthz", get(|| async { "OK\n" }))
        .route("/metrics", get(metrics))
        .route("/config_dump", get(config_dump))
        .route("/clusters", get(clusters))
        .route("/plugins", get(plugins))
        .route("/plugins/logs", get(plugin_logs))
        .route("/tap", get(tap))
        .with_state(state)
}

/// Serves the admin routes on an already bound listener until the runtime stops.
pub async fn serve(listener: std::net::TcpListener, state: AdminState) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(state)).await
}

async fn ready(State(state): State<AdminState>) -> Response {
    if state.status.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n").into_response()
    } else {
        (StatusCode::OK, "LIVE\n").into_response()
    }
}

/// Sets the gauges that show the state of the config in force.
fn state_gauges(snapshot: &Snapshot, gauges: &StateGauges<'_>) {
    let open = crate::telemetry::sockets::established_by_remote();
    for cluster in snapshot.clusters.values() {
        if let Some(adaptive) = &cluster.adaptive_concurrency {
            gauges.concurrency_limit(&cluster.name, adaptive.controller.status().limit);
        }
        let connections = cluster
            .endpoints
            .iter()
            .filter_map(|e| open.get(&e.address))
            .sum();
        gauges.upstream_connections(&cluster.name, connections);
        for endpoint in &cluster.endpoints {
            gauges.endpoint(
                &cluster.name,
                &endpoint.address.to_string(),
                endpoint.state.is_healthy(),
                endpoint.state.active_requests(),
            );
        }
    }
    gauges.config_version(&snapshot.version);
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let snapshot = state.snapshot.load();
    let mut body = state
        .metrics
        .render(|gauges| state_gauges(&snapshot, gauges));
    let plugin_metrics = state.plugins.metrics_text();
    if !plugin_metrics.is_empty() {
        // OpenMetrics ends with "# EOF": plugin families go before it.
        let end = body.rfind("# EOF").unwrap_or(body.len());
        body.insert_str(end, &plugin_metrics);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn config_dump(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.snapshot.load();
    let r = &snapshot.resources;
    let list = |items: Vec<Value>| Value::Array(items);
    Json(json!({
        "version_info": snapshot.version,
        "last_reload_error": state.status.reload_error(),
        "bootstrap": to_json(&snapshot.bootstrap),
        "listeners": list(r.listeners.iter().map(to_json).collect()),
        "route_configs": list(r.routes.iter().map(to_json).collect()),
        "clusters": list(r.clusters.iter().map(to_json).collect()),
        "endpoints": list(r.endpoints.iter().map(to_json).collect()),
    }))
}

/// The plugins of the running config: for SDK plugins, what they declared and their last
/// health and resource-usage reports.
async fn plugins(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.snapshot.load();
    let plugins: Vec<Value> = snapshot
        .plugins
        .iter()
        .map(|(filter, plugin)| {
            let status = plugin
                .status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|p| p.into_inner().clone());
            json!({
                "name": &*plugin.name,
                "filter": filter,
                "fail_open": plugin.fail_open,
                "max_body_bytes": plugin.max_body_bytes,
                "declared": plugin.declaration,
                "module_sha256": &*plugin.module_sha256,
                "health": status.health,
                "resource_usage": status.usage,
                "checked": status.checked.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            })
        })
        .collect();
    let processes = state
        .processes
        .lock()
        .map(|p| p.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    Json(json!({
        "host_api": nip_filters::sdk::host_api(),
        "plugins": plugins,
        "processes": processes,
    }))
}

/// Which plugin log lines `/plugins/logs` returns.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginLogsQuery {
    /// Only this plugin's.
    plugin: Option<String>,
    /// Only lines after this sequence number (what a follower saw last).
    after: Option<u64>,
    /// The newest this many (default 100).
    limit: Option<usize>,
}

/// The latest lines wasm plugins logged, oldest first.
async fn plugin_logs(
    query: Result<axum::extract::Query<PluginLogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match query {
        Ok(axum::extract::Query(q)) => Json(nip_filters::logs::recent(
            q.plugin.as_deref(),
            q.after,
            q.limit.unwrap_or(100).min(nip_filters::logs::KEPT_LINES),
        ))
        .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// What `/tap` shows and for how long.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TapQuery {
    /// Only this route's requests.
    route: Option<String>,
    /// Only these statuses: `503`, or a class such as `5xx`.
    status: Option<String>,
    /// Stop after this many records (default 100, at most 10,000).
    limit: Option<usize>,
    /// Stop after this long (default 60, at most 600).
    seconds: Option<u64>,
}

/// Which statuses a `status` filter takes: a code (`503`) or a class (`5xx`). The admin
/// tap and the control plane's log search read filters the same way.
pub fn status_filter(text: &str) -> Option<std::ops::RangeInclusive<u16>> {
    if let Some(class) = text.strip_suffix("xx").and_then(|c| c.parse::<u16>().ok()) {
        return (1..=5)
            .contains(&class)
            .then(|| class * 100..=class * 100 + 99);
    }
    let code = text
        .parse::<u16>()
        .ok()
        .filter(|c| (100..=599).contains(c))?;
    Some(code..=code)
}

/// Streams the requests that finish from now on (NDJSON, the JSON access log's fields),
/// filtered, until `limit` records or `seconds` passed or the watcher leaves. A watcher
/// too slow to keep up gets `{"tap_lost": N}` where records were lost.
async fn tap(
    State(state): State<AdminState>,
    query: Result<axum::extract::Query<TapQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let axum::extract::Query(query) = match query {
        Ok(query) => query,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let statuses = match query.status.as_deref().map(status_filter) {
        None => 0..=u16::MAX,
        Some(Some(range)) => range,
        Some(None) => {
            return (
                StatusCode::BAD_REQUEST,
                "status: give a code (503) or a class (5xx)\n",
            )
                .into_response()
        }
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let seconds = query.seconds.unwrap_or(60).clamp(1, 600);
    let mut watcher = state.metrics.tap.watch();
    let (lines, body) = tokio::sync::mpsc::channel::<Result<String, std::convert::Infallible>>(16);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
        let mut shown = 0;
        while shown < limit {
            let next = tokio::select! {
                _ = lines.closed() => break,
                next = tokio::time::timeout_at(deadline, watcher.recv()) => next,
            };
            let line = match next {
                Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(lost))) => {
                    format!("{{\"tap_lost\":{lost}}}\n")
                }
                Ok(Ok(record)) => {
                    let wanted = statuses.contains(&record.status)
                        && query.route.as_deref().is_none_or(|r| r == record.route);
                    if !wanted {
                        continue;
                    }
                    shown += 1;
                    record.json()
                }
            };
            if lines.send(Ok(line)).await.is_err() {
                break;
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body)),
    )
        .into_response()
}

async fn clusters(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.snapshot.load();
    let open = crate::telemetry::sockets::established_by_remote();
    let clusters: Vec<Value> = snapshot
        .clusters
        .values()
        .map(|c| {
            let now = tokio::time::Instant::now();
            let endpoints: Vec<Value> = c
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "address": e.address.to_string(),
                        "region": e.locality.region,
                        "zone": e.locality.zone,
                        "sub_zone": e.locality.sub_zone,
                        "weight": e.weight,
                        "healthy": e.state.is_healthy(),
                        "active_requests": e.state.active_requests(),
                        "latency_ewma_ms": e.state.latency.estimate(&c.lb.ewma()).as_secs_f64() * 1000.0,
                        "predicted_ms": e.state.predicted(&c.lb.ewma(), now).as_secs_f64() * 1000.0,
                        "silent_for_ms": e.state.silence(now).as_secs_f64() * 1000.0,
                        "ejected": c.outlier.is_some() && e.state.outlier.is_ejected(now),
                        "ejected_for_ms": e.state.outlier.ejected_for(now).as_millis() as u64,
                        "ejections_total": e.state.outlier.ejections_total.load(Ordering::Relaxed),
                        "requests_total": e.state.requests_total.load(Ordering::Relaxed),
                        "connections_active": open.get(&e.address).copied().unwrap_or(0),
                        "connections_total": e.state.connections_total.load(Ordering::Relaxed),
                        "connect_failures_total": e.state.connect_failures_total.load(Ordering::Relaxed),
                    })
                })
                .collect();
            let regions: Vec<Value> = c
                .region_predictions()
                .into_iter()
                .map(|(region, predicted)| {
                    json!({
                        "region": region,
                        "predicted_ms": predicted.map(|d| d.as_secs_f64() * 1000.0),
                    })
                })
                .collect();
            let adaptive = c.adaptive_concurrency.as_ref().map(|a| {
                let status = a.controller.status();
                let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
                json!({
                    "limit": status.limit,
                    "in_flight": status.in_flight,
                    "min_rtt_ms": ms(status.min_rtt),
                    "sample_rtt_ms": ms(status.sample_rtt),
                    "measuring_min_rtt": status.measuring_min_rtt,
                    "shed_total": crate::upstream::concurrency::Priority::ALL
                        .iter()
                        .map(|p| (p.as_str(), c.stats.rq_shed[p.index()].get()))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                })
            });
            json!({
                "name": c.name.as_ref(),
                "lb_policy": c.lb.as_str(),
                "adaptive_concurrency": adaptive,
                "rq_active": c.stats.rq_active.get(),
                "current_region": c.current_region(),
                "regions": regions,
                "http2": c.http2,
                "health_checked": c.health_check.is_some(),
                "healthy_endpoints": c.healthy_count(),
                "endpoints": endpoints,
            })
        })
        .collect();
    Json(json!({ "version_info": snapshot.version, "clusters": clusters }))
}

#[cfg(test)]
mod tests {
    use super::status_filter;

    #[test]
    fn status_filters_take_a_code_or_a_class() {
        assert_eq!(status_filter("5xx"), Some(500..=599));
        assert_eq!(status_filter("404"), Some(404..=404));
        for bad in ["6xx", "0xx", "99", "600", "abc", ""] {
            assert_eq!(status_filter(bad), None, "{bad}");
        }
    }
}
