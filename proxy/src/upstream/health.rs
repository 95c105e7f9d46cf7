//! Active HTTP health checking, on the control runtime (never on a worker thread).
//!
//! One task per (cluster, endpoint, check spec) probes `GET path` on a fresh connection
//! every interval, through hyper's client in the cluster's protocol (HTTP/1.1, or h2c for
//! an HTTP/2 cluster, so an h2c-only backend can pass). After `unhealthy_threshold` failures in a row the endpoint stops taking
//! traffic; after `healthy_threshold` successes it comes back. The probes are also the
//! active latency probes of `lb: latency`: a passing probe's time from request to status
//! line feeds the endpoint's peak-EWMA estimate when no request has measured it for two
//! intervals — how a remote region that gets no traffic keeps a current prediction. [`HealthChecker::reconcile`]
//! runs after every snapshot swap: it starts tasks for new endpoints, stops the ones whose
//! endpoint or check disappeared, and puts endpoints whose check was removed back in service.

use crate::telemetry::metrics::Metrics;
use crate::upstream::cluster::HealthCheckSpec;
use crate::upstream::endpoint::EndpointState;
use crate::upstream::ewma::EwmaConfig;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Cluster, endpoint, check, the cluster's latency settings, and whether it speaks HTTP/2.
type CheckKey = (String, SocketAddr, HealthCheckSpec, EwmaConfig, bool);

/// Owns the probe tasks. Must be used from within the control runtime.
#[derive(Default)]
pub struct HealthChecker {
    tasks: HashMap<CheckKey, JoinHandle<()>>,
}

impl HealthChecker {
    /// Makes the running probes match the clusters in force.
    pub fn reconcile(&mut self, clusters: &super::Clusters, metrics: &Arc<Metrics>) {
        let mut wanted: HashMap<CheckKey, Arc<EndpointState>> = HashMap::new();
        for cluster in clusters.values() {
            for endpoint in &cluster.endpoints {
                match &cluster.health_check {
                    Some(spec) => {
                        wanted.insert(
                            (
                                cluster.name.to_string(),
                                endpoint.address,
                                spec.clone(),
                                cluster.lb.ewma(),
                                cluster.http2,
                            ),
                            Arc::clone(&endpoint.state),
                        );
                    }
                    // No check (any more): nothing can vouch against it, so it serves.
                    None => endpoint.state.set_healthy(true),
                }
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.contains_key(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, state) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let (cluster, address, spec, ewma, http2) = key.clone();
            let metrics = Arc::clone(metrics);
            let target = Target {
                cluster,
                address,
                http2,
            };
            let task = tokio::spawn(probe_loop(target, spec, ewma, state, metrics));
            self.tasks.insert(key, task);
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// What a probe task checks.
struct Target {
    cluster: String,
    address: SocketAddr,
    http2: bool,
}

async fn probe_loop(
    target: Target,
    spec: HealthCheckSpec,
    ewma: EwmaConfig,
    state: Arc<EndpointState>,
    metrics: Arc<Metrics>,
) {
    let Target {
        cluster,
        address,
        http2,
    } = target;
    let mut failures = 0u32;
    let mut successes = 0u32;
    // Spread the first probes of many endpoints over the interval.
    let first_delay = spec.interval.mul_f64(fastrand::f64() * 0.1);
    tokio::time::sleep(first_delay).await;
    loop {
        let result = probe(address, &spec, http2).await;
        metrics.health_check(&cluster, result.is_ok());
        match result {
            Ok(answer_time) => {
                let now = tokio::time::Instant::now();
                let stale = state
                    .latency
                    .age(now)
                    .is_none_or(|age| age >= spec.interval * 2);
                if stale {
                    state.latency.observe(answer_time, now, &ewma);
                }
                failures = 0;
                successes = successes.saturating_add(1);
                if !state.is_healthy() && successes >= spec.healthy_threshold {
                    state.set_healthy(true);
                    tracing::info!(%cluster, endpoint = %address, "health check passed: endpoint back in service");
                }
            }
            Err(reason) => {
                successes = 0;
                failures = failures.saturating_add(1);
                if state.is_healthy() && failures >= spec.unhealthy_threshold {
                    state.set_healthy(false);
                    tracing::warn!(%cluster, endpoint = %address, %reason, "health check failed: endpoint taken out of service");
                }
            }
        }
        tokio::time::sleep(spec.interval).await;
    }
}

/// One probe: `GET path` on a new connection, in the cluster's protocol; the status
/// decides. A pass returns the time from sending the request to its response head (one
/// round trip, without the connection set-up a pooled request does not pay).
async fn probe(
    address: SocketAddr,
    spec: &HealthCheckSpec,
    http2: bool,
) -> Result<Duration, String> {
    let attempt = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let host = if spec.host.is_empty() {
            address.to_string()
        } else {
            spec.host.clone()
        };
        let build = |uri: String| {
            http::Request::get(uri)
                .header(http::header::HOST, host.as_str())
                .header(http::header::USER_AGENT, "nip-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("request: {e}"))
        };
        let (response, answer_time, connection) = if http2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            let connection = tokio::spawn(connection);
            let request = build(format!("http://{host}{}", spec.path))?;
            let sent = tokio::time::Instant::now();
            let response = sender.send_request(request).await;
            (response, sent.elapsed(), connection)
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let connection = tokio::spawn(connection);
            let request = build(spec.path.clone())?;
            let sent = tokio::time::Instant::now();
            let response = sender.send_request(request).await;
            (response, sent.elapsed(), connection)
        };
        connection.abort();
        let status = response
            .map_err(|e| format!("request: {e}"))?
            .status()
            .as_u16();
        if spec.accepts(status) {
            Ok(answer_time)
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn spec(path: &str) -> HealthCheckSpec {
        HealthCheckSpec {
            path: path.into(),
            host: String::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            expected_statuses: vec![],
        }
    }

    #[tokio::test]
    async fn an_h2c_only_backend_passes_an_http2_clusters_probe() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        log.lock().unwrap().push(req.uri().to_string());
                        async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                Empty::<Bytes>::new(),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let spec = spec("/health%20z?full=1");
        assert!(probe(address, &spec, true).await.is_ok());
        assert!(
            probe(address, &spec, false).await.is_err(),
            "HTTP/1.1 cannot pass an h2c-only backend"
        );
        assert!(seen.lock().unwrap()[0].ends_with("/health%20z?full=1"));
    }

    #[tokio::test]
    async fn probe_accepts_expected_status_and_rejects_others() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let spec = spec("/healthz");
        assert!(probe(address, &spec, false).await.is_ok());
        assert_eq!(
            probe(address, &spec, false).await,
            Err("status 503".to_string())
        );
    }
}
