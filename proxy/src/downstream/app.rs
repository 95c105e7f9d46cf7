//! [`FrontDoor`]: the HTTP path of a connection, in front of the proxy.
//!
//! The listener's dispatcher hands every connection an HTTP filter chain took (after TLS)
//! to [`FrontDoor::serve`] with its connection manager's limits, which
//! 1. takes a slot from the listener's [`Admission`] (closing the connection when full),
//! 2. wraps it in a [`GuardedStream`] with those limits,
//! 3. tells HTTP/2 from HTTP/1 (ALPN, or the h2c preface read under the idle clock — pingora's
//!    own peek waits for 24 bytes, which a short HTTP/1 request never sends),
//! 4. runs HTTP/2 connections through pingora's own HTTP/2 path, and HTTP/1 connections
//!    through the keep-alive loop below: one pingora session per request, pipelining on
//!    (RFC 9112 §9.3.2: answers in order; pingora reads the next request only after the
//!    current one is answered, so TCP flow control bounds what a client can queue),
//!    `max_requests_per_connection`, `max_connection_duration`, the phase marks.

use super::admission::Admission;
use super::limits::DownstreamLimits;
use super::stats::CloseReason;
use super::stream::GuardedStream;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;
use std::sync::Arc;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How an HTTP/1.1 CONNECT request line starts.
const CONNECT_PREFIX: &[u8] = b"CONNECT ";

/// Opens the tunnels of HTTP/1.1 CONNECT requests (RFC 9110 §9.3.6) for a connection
/// whose connection manager takes them: the front door reads the request head, asks for
/// the upstream, answers 200 and relays the bytes both ways.
#[async_trait::async_trait]
pub trait ConnectTunnels: Send + Sync {
    /// The upstream connection for a CONNECT to `authority` (`host:port`), or the status
    /// to refuse it with.
    async fn open(&self, authority: &str) -> Result<tokio::net::TcpStream, u16>;
}

/// Flips an HTTP/2 connection's shutdown watch when the server shuts down or the
/// connection is `max` old; then holds it (a dropped sender would read as a change).
async fn end_at_max_duration(
    tx: tokio::sync::watch::Sender<bool>,
    mut server: ShutdownWatch,
    max: std::time::Duration,
    stats: super::stats::DownstreamStats,
) {
    tokio::select! {
        _ = server.changed() => {}
        () = tokio::time::sleep(max) => stats.closed(CloseReason::MaxConnectionDuration),
    }
    let _ = tx.send(true);
    std::future::pending::<()>().await;
}

/// The HTTP path of the proxy's connections: admission and clocks, then the proxy.
pub struct FrontDoor<SV> {
    proxy: Arc<HttpProxy<SV>>,
    admission: Arc<Admission>,
    release_memory: Option<fn()>,
    /// How long open connections get to finish at shutdown (see [`FrontDoor::cleanup`]).
    drain: std::time::Duration,
}

/// How often a worker thread whose connections closed gives memory back.
const RELEASE_MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// Whether this worker thread runs its memory-release task.
    static RELEASING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Releases after the last close: memory freed on other threads (a connection's task
/// finished elsewhere, buffers dropped by another worker) reaches this thread's heap only
/// when this thread next collects, which may be after the tick that saw the close.
const RELEASES_AFTER_CLOSE: u32 = 3;

/// Once per worker thread: every [`RELEASE_MEMORY_EVERY`], if connections closed on this
/// thread in the last [`RELEASES_AFTER_CLOSE`] ticks, hand what the allocator keeps back to
/// the OS.
fn release_memory_on_this_thread(release: fn()) {
    if RELEASING.with(|r| r.replace(true)) {
        return;
    }
    tokio::spawn(async move {
        let mut pending = 0;
        loop {
            tokio::time::sleep(RELEASE_MEMORY_EVERY).await;
            if super::stream::take_closed_on_this_thread() > 0 {
                pending = RELEASES_AFTER_CLOSE;
            }
            if pending > 0 {
                pending -= 1;
                release();
            }
        }
    });
}

impl<SV> FrontDoor<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    /// A front door for `proxy`, admitting connections through `admission`.
    pub fn new(proxy: HttpProxy<SV>, admission: Arc<Admission>) -> Self {
        FrontDoor {
            proxy: Arc::new(proxy),
            admission,
            drain: std::time::Duration::ZERO,
            release_memory: None,
        }
    }

    /// A slot for a connection that does not go through the front door's HTTP path (a
    /// `tcp_proxy` chain) under the same `max_active_downstream_connections`; `None` when
    /// the listener is full (the connection is then closed, and counted).
    pub fn admit_other(
        &self,
        limits: &DownstreamLimits,
    ) -> Option<super::admission::ConnectionSlot> {
        self.admission.try_admit(limits.connection_limit())
    }

    /// Open connections get up to `drain` at shutdown (see [`FrontDoor::cleanup`]).
    pub fn draining_for(mut self, drain: std::time::Duration) -> Self {
        self.drain = drain;
        self
    }

    /// With a way to give freed memory back to the OS (see `ProxyOptions`).
    pub fn releasing_memory(mut self, release: Option<fn()>) -> Self {
        self.release_memory = release;
        self
    }

    /// When the next request on `stream` is a CONNECT, serves it as a tunnel and returns
    /// `None` (the connection is done); otherwise hands the stream back (`Some`), its bytes
    /// to be read again by pingora.
    async fn maybe_tunnel(
        &self,
        mut stream: GuardedStream,
        tunnels: &dyn ConnectTunnels,
    ) -> Option<GuardedStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if !stream.sniff_prefix(CONNECT_PREFIX).await? {
            return Some(stream);
        }
        // The head, through the stream's head clock and size limit.
        let mut head = Vec::with_capacity(512);
        let end = loop {
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        };
        let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
        let line = String::from_utf8_lossy(&head[..line_end]).to_string();
        let mut parts = line.split(' ');
        let (Some("CONNECT"), Some(authority), Some("HTTP/1.1" | "HTTP/1.0"), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            let refusal =
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            if stream.write_all(refusal).await.is_ok() {
                let _ = stream.flush().await;
            }
            return None;
        };
        match tunnels.open(authority).await {
            Ok(mut upstream) => {
                // (The stream buffers writes: the client waits for this answer.)
                let answered = stream
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await;
                if answered.is_err() || stream.flush().await.is_err() {
                    return None;
                }
                // Bytes the client sent right after its head go first.
                if upstream.write_all(&head[end..]).await.is_err() {
                    return None;
                }
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            }
            Err(status) => {
                let answer = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    http::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("Error")
                );
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    let _ = stream.flush().await;
                }
            }
        }
        None
    }

    async fn serve_http1(
        &self,
        stream: GuardedStream,
        shutdown: &ShutdownWatch,
        tunnels: Option<&dyn ConnectTunnels>,
    ) {
        let stream = match tunnels {
            Some(tunnels) => match self.maybe_tunnel(stream, tunnels).await {
                Some(stream) => stream,
                None => return,
            },
            None => stream,
        };
        let limits = stream.limits().clone();
        let mut session = ServerSession::new_http1(Box::new(stream));
        // The guarded stream keeps the idle clock; pingora's read would add its own.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
        // Pingora counts reuses after the first request.
        session.set_keepalive_reuses_remaining(
            limits
                .max_requests_per_connection
                .map(|n| n.saturating_sub(1)),
        );
        session.set_pipelining_enabled(true);
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let Ok(mut guarded) = stream.into_any().downcast::<GuardedStream>() else {
                return;
            };
            if guarded.past_max_duration() {
                guarded.count_close(CloseReason::MaxConnectionDuration);
                return;
            }
            guarded.mark_idle();
            let guarded = match tunnels {
                Some(tunnels) => match self.maybe_tunnel(*guarded, tunnels).await {
                    Some(stream) => Box::new(stream),
                    None => return,
                },
                None => guarded,
            };
            let mut session = ServerSession::new_http1(guarded);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            result = self.proxy.process_new_http(session, shutdown).await;
        }
    }
}

impl<SV> FrontDoor<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    /// Serves the HTTP connection `stream` under `limits` until it ends; `h2c`: a
    /// plaintext client may speak HTTP/2 with prior knowledge; `tunnels`: HTTP/1.1 CONNECT
    /// requests are tunnelled (else pingora answers them 405).
    pub async fn serve(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        limits: DownstreamLimits,
        h2c: bool,
        tunnels: Option<Arc<dyn ConnectTunnels>>,
    ) -> Option<Stream> {
        if let Some(release) = self.release_memory {
            release_memory_on_this_thread(release);
        }
        let slot = self.admission.try_admit(limits.connection_limit())?;
        let tls = stream.get_ssl_digest().is_some();
        let alpn_h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let stats = self.admission.stats().clone();
        let mut guarded = GuardedStream::new(
            stream,
            limits,
            stats,
            Some(slot),
            Some(Arc::clone(&self.admission)),
        );
        let h2 = if alpn_h2 {
            true
        } else if !tls && h2c {
            guarded.sniff_prefix(H2_PREFACE).await?
        } else {
            false
        };
        if h2 {
            let max_duration = guarded.limits().max_connection_duration;
            let guarded = Box::new(guarded.into_h2());
            return match max_duration {
                None => ServerApp::process_new(&self.proxy, guarded, shutdown).await,
                Some(max) => {
                    // Pingora ends an HTTP/2 connection gracefully (GOAWAY, streams finish)
                    // when its shutdown watch changes: this connection's watch changes at
                    // the server's shutdown or when the connection reaches its age.
                    let (tx, watch) = tokio::sync::watch::channel(*shutdown.borrow());
                    let relay = tokio::spawn(end_at_max_duration(
                        tx,
                        shutdown.clone(),
                        max,
                        self.admission.stats().clone(),
                    ));
                    let result = ServerApp::process_new(&self.proxy, guarded, &watch).await;
                    relay.abort();
                    result
                }
            };
        }
        self.serve_http1(guarded, shutdown, tunnels.as_deref())
            .await;
        None
    }

    /// Pingora's cleanup of the proxy at shutdown, once the connections are gone or the
    /// drain is over. Pingora's cleanup aborts the reads of idle keep-alive connections, so
    /// a client that sends its next request on one at that moment loses it; until then
    /// such a request is answered (with `Connection: close`), so a client in use moves on
    /// without a failure (an upgrade hands the sockets over, then shuts down).
    pub async fn cleanup(&self) {
        let deadline = tokio::time::Instant::now() + self.drain;
        while self.admission.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        ServerApp::cleanup(&*self.proxy).await;
    }
}
