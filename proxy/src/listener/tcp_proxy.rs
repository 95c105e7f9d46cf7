//! Envoy's `envoy.filters.network.tcp_proxy`: a connection relayed byte for byte to an
//! endpoint of a cluster (or, for an `ORIGINAL_DST` cluster, to where the client was going
//! before a redirect), both directions at once, with half-close carried across (a client
//! that shuts its sending side down still gets the rest of the answer), an idle timeout,
//! an optional maximum duration, and byte and connection counters by `stat_prefix`.

use crate::telemetry::access_log::{AccessLogger, LogEntry};
use crate::telemetry::metrics::TcpStats;
use crate::upstream::cluster::Cluster;
use pingora::protocols::Stream;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Envoy's default `idle_timeout` for `tcp_proxy`: one hour.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A compiled `tcp_proxy` filter.
#[derive(Debug)]
pub struct TcpProxy {
    /// `stat_prefix`: the label of its counters.
    pub stat_prefix: String,
    /// Where connections go.
    pub cluster: Arc<Cluster>,
    /// Close after this long with no byte either way (`None`: never; `idle_timeout: 0s`).
    pub idle_timeout: Option<Duration>,
    /// Endpoints tried before the client's connection is closed (`max_connect_attempts`).
    pub max_connect_attempts: u32,
    /// Close connections this old (`max_downstream_connection_duration`).
    pub max_downstream_connection_duration: Option<Duration>,
    /// Counters.
    pub stats: TcpStats,
    /// One line per connection when its filter has an `access_log`.
    pub access_log: Option<Arc<AccessLogger>>,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEnd {
    /// No upstream could be reached.
    NoUpstream,
    /// Both sides closed, or one failed.
    Closed,
    /// `idle_timeout`.
    Idle,
    /// `max_downstream_connection_duration`.
    MaxDuration,
}

impl TcpEnd {
    /// Envoy's response flag for the access log: `UF` no upstream, `SI` idle timeout,
    /// `DT` maximum duration, `-` closed by a side.
    pub fn flag(self) -> &'static str {
        match self {
            TcpEnd::NoUpstream => "UF",
            TcpEnd::Closed => "-",
            TcpEnd::Idle => "SI",
            TcpEnd::MaxDuration => "DT",
        }
    }
}

/// Keeps the active-connection gauge right however the relay ends.
struct ActiveGuard<'a>(&'a TcpStats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.cx_active.dec();
    }
}

impl TcpProxy {
    /// Relays `downstream` (accepted on `local`, going to `destination`) until both sides
    /// are done, a timeout ends it, or no upstream can be reached.
    pub async fn serve(
        &self,
        downstream: Stream,
        destination: SocketAddr,
        local: SocketAddr,
    ) -> TcpEnd {
        let start = std::time::SystemTime::now();
        let activity = Arc::new(Activity::default());
        let (end, upstream) = self
            .relay(downstream, destination, local, Arc::clone(&activity))
            .await;
        if let Some(log) = &self.access_log {
            let upstream = upstream.map(|a| a.to_string()).unwrap_or_default();
            log.log(&LogEntry {
                start,
                method: "-",
                path: "-",
                protocol: "TCP",
                status: 0,
                flags: end.flag(),
                bytes_received: usize::try_from(activity.rx.load(Ordering::Relaxed))
                    .unwrap_or(usize::MAX),
                bytes_sent: usize::try_from(activity.tx.load(Ordering::Relaxed))
                    .unwrap_or(usize::MAX),
                duration: start.elapsed().unwrap_or_default(),
                // No request headers on a TCP connection: Envoy logs `-` for them.
                forwarded_for: "",
                user_agent: "",
                request_id: "",
                authority: "",
                route: &self.stat_prefix,
                cluster: &self.cluster.name,
                upstream_host: &upstream,
                peer_uri_san: "",
                tenant: "",
                trace_id: "",
            });
        }
        end
    }

    async fn relay(
        &self,
        mut downstream: Stream,
        destination: SocketAddr,
        local: SocketAddr,
        activity: Arc<Activity>,
    ) -> (TcpEnd, Option<SocketAddr>) {
        self.stats.cx_total.inc();
        self.stats.cx_active.inc();
        let _active = ActiveGuard(&self.stats);
        let Some(upstream) = self.connect(destination, local).await else {
            self.stats.no_upstream.inc();
            return (TcpEnd::NoUpstream, None);
        };
        let upstream_address = upstream.peer_addr().ok();
        let started = Instant::now();
        let mut upstream = Counted {
            inner: upstream,
            activity: Arc::clone(&activity),
            stats: self.stats.clone(),
            started,
        };
        let relay = tokio::io::copy_bidirectional(&mut downstream, &mut upstream);
        let idle = watch_idle(&activity, started, self.idle_timeout);
        let max_duration = async {
            match self.max_downstream_connection_duration {
                Some(max) => tokio::time::sleep(max).await,
                None => std::future::pending().await,
            }
        };
        let end = tokio::select! {
            _ = relay => TcpEnd::Closed,
            () = idle => {
                self.stats.idle_timeout.inc();
                TcpEnd::Idle
            }
            () = max_duration => {
                self.stats.max_duration_reached.inc();
                TcpEnd::MaxDuration
            }
        };
        (end, upstream_address)
    }

    /// A connection to an endpoint: the original destination for an `ORIGINAL_DST`
    /// cluster (never the proxy's own address: that would loop), else the cluster's
    /// balancer's picks, up to `max_connect_attempts`, each under `connect_timeout`.
    async fn connect(&self, destination: SocketAddr, local: SocketAddr) -> Option<TcpStream> {
        let cluster = &self.cluster;
        if cluster.original_destination {
            if destination == local {
                tracing::debug!(cluster = %cluster.name, "tcp_proxy: no original destination (the connection was not redirected here)");
                return None;
            }
            return self.connect_to(destination).await;
        }
        let mut tried = Vec::new();
        for _ in 0..self.max_connect_attempts.max(1) {
            let endpoint = cluster.pick(&tried)?;
            if tried.contains(&endpoint.address) {
                return None;
            }
            if let Some(stream) = self.connect_to(endpoint.address).await {
                return Some(stream);
            }
            tried.push(endpoint.address);
        }
        None
    }

    async fn connect_to(&self, address: SocketAddr) -> Option<TcpStream> {
        let cluster = &self.cluster;
        cluster.stats.cx_total.inc();
        match tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Some(stream)
            }
            Ok(Err(e)) => {
                cluster.stats.cx_connect_fail.inc();
                tracing::debug!(cluster = %cluster.name, %address, "tcp_proxy: connect failed: {e}");
                None
            }
            Err(_) => {
                cluster.stats.cx_connect_fail.inc();
                tracing::debug!(cluster = %cluster.name, %address, "tcp_proxy: connect timed out");
                None
            }
        }
    }
}

/// When a byte last moved either way (ms since the relay started), and how many went each
/// way on this connection.
#[derive(Debug, Default)]
struct Activity {
    last_ms: AtomicU64,
    /// Bytes from the client.
    rx: AtomicU64,
    /// Bytes to the client.
    tx: AtomicU64,
}

impl Activity {
    fn touch(&self, started: Instant) {
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// Resolves once `idle` has passed with no byte either way; never without a timeout.
async fn watch_idle(activity: &Activity, started: Instant, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let last = started + Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// The upstream socket, counting bytes each way (read from it: to the client; written to
/// it: from the client) and stamping activity.
struct Counted {
    inner: TcpStream,
    activity: Arc<Activity>,
    stats: TcpStats,
    started: Instant,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.stats.tx_bytes.inc_by(read as u64);
            this.activity.tx.fetch_add(read as u64, Ordering::Relaxed);
            this.activity.touch(this.started);
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &result {
            if *written > 0 {
                this.stats.rx_bytes.inc_by(*written as u64);
                this.activity
                    .rx
                    .fetch_add(*written as u64, Ordering::Relaxed);
                this.activity.touch(this.started);
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
