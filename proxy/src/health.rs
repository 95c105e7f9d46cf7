//! Active HTTP health checking, on the control runtime (never on a worker thread).
//!
//! One task per (cluster, endpoint, check spec) probes `GET path` on a fresh connection
//! every interval. After `unhealthy_threshold` failures in a row the endpoint stops taking
//! traffic; after `healthy_threshold` successes it comes back. The probes are also the
//! active latency probes of `lb: latency`: a passing probe's time from request to status
//! line feeds the endpoint's peak-EWMA estimate when no request has measured it for two
//! intervals — how a remote region that gets no traffic keeps a current prediction. [`HealthChecker::reconcile`]
//! runs after every snapshot swap: it starts tasks for new endpoints, stops the ones whose
//! endpoint or check disappeared, and puts endpoints whose check was removed back in service.

use crate::cluster::{EndpointState, HealthCheckSpec};
use crate::ewma::EwmaConfig;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

type CheckKey = (String, SocketAddr, HealthCheckSpec, EwmaConfig);

/// Owns the probe tasks. Must be used from within the control runtime.
#[derive(Default)]
pub struct HealthChecker {
    tasks: HashMap<CheckKey, JoinHandle<()>>,
}

impl HealthChecker {
    /// Makes the running probes match `snapshot`.
    pub fn reconcile(&mut self, snapshot: &Snapshot, metrics: &Arc<Metrics>) {
        let mut wanted: HashMap<CheckKey, Arc<EndpointState>> = HashMap::new();
        for cluster in snapshot.clusters.values() {
            for endpoint in &cluster.endpoints {
                match &cluster.health_check {
                    Some(spec) => {
                        wanted.insert(
                            (
                                cluster.name.to_string(),
                                endpoint.address,
                                spec.clone(),
                                cluster.lb.ewma(),
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
            let (cluster, address, spec, ewma) = key.clone();
            let metrics = Arc::clone(metrics);
            let task = tokio::spawn(probe_loop(cluster, address, spec, ewma, state, metrics));
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

async fn probe_loop(
    cluster: String,
    address: SocketAddr,
    spec: HealthCheckSpec,
    ewma: EwmaConfig,
    state: Arc<EndpointState>,
    metrics: Arc<Metrics>,
) {
    let mut failures = 0u32;
    let mut successes = 0u32;
    // Spread the first probes of many endpoints over the interval.
    let first_delay = spec.interval.mul_f64(fastrand::f64() * 0.1);
    tokio::time::sleep(first_delay).await;
    loop {
        let result = probe(address, &spec).await;
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

/// One probe: `GET path` on a new connection; the status line decides. A pass returns the
/// time from sending the request to reading the status line (one round trip, without the
/// connection set-up a pooled request does not pay).
async fn probe(address: SocketAddr, spec: &HealthCheckSpec) -> Result<Duration, String> {
    let attempt = async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let host = if spec.host.is_empty() {
            address.to_string()
        } else {
            spec.host.clone()
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nip-health-check\r\nConnection: close\r\n\r\n",
            spec.path
        );
        let sent = tokio::time::Instant::now();
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let answer_time = sent.elapsed();
        let status = parse_status_line(&head).ok_or("no HTTP status line in the answer")?;
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

fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0\r\n"), None);
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
        let spec = HealthCheckSpec {
            path: "/healthz".into(),
            host: String::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            expected_statuses: vec![],
        };
        assert!(probe(address, &spec).await.is_ok());
        assert_eq!(probe(address, &spec).await, Err("status 503".to_string()));
    }
}
