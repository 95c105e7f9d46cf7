//! [`GuardedStream`]: a client connection as pingora reads it, with the clocks and limits
//! pingora does not keep.
//!
//! Pingora reads request heads with a per-read timeout and none at all between keep-alive
//! requests, so a client that never sends, or sends a byte at a time, holds its connection
//! for ever. The front door wraps every accepted stream in a `GuardedStream`, which knows
//! which part of a connection's life it is in ([`Phase`]) and enforces:
//!
//! * `Idle` (no request yet, or between requests): `idle_timeout`, `max_connection_duration`
//!   and the listener's idle drain under connection pressure end it quietly (EOF to pingora).
//! * `Head` (from a request's first byte to its blank line, watched by
//!   [`HeadScanner`]): `request_headers_timeout` (408), `max_request_headers_kb` (431), an
//!   HTTP/0.9 or foreign request line (400). The answer is written straight to the socket
//!   and the connection closed with a lingering close, so the client reads it.
//! * `Active` (the gateway has the head): the gateway sets pingora's body read timeout
//!   (`stream_idle_timeout`).
//! * In every phase, a write the client does not take for `stream_idle_timeout` (it stopped
//!   reading a response) ends the connection. The clock starts when a write first finds the
//!   socket full, so writes that never wait cost no timer (pingora's own write timeout
//!   wraps every response write in one).
//! * `H2`: frame floods ([`H2FloodGuard`]) end the connection with GOAWAY.
//!
//! The gateway marks a request's head as taken ([`GuardedStream::mark_active`], also for
//! pipelined requests pingora parses from bytes it already holds); the front door marks the
//! connection idle between requests ([`GuardedStream::mark_idle`]). Both reach the stream
//! through pingora's `IO::as_any`, so the phase is an atomic.

use super::admission::ConnectionSlot;
use super::h2_flood::{H2Flood, H2FloodGuard};
use super::head::{HeadProgress, HeadScanner};
use super::limits::DownstreamLimits;
use super::stats::{CloseReason, DownstreamStats};
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// No request in progress.
    Idle = 0,
    /// A request head is arriving.
    Head = 1,
    /// The gateway has the request.
    Active = 2,
    /// An HTTP/2 connection (its streams have their own clocks).
    H2 = 3,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Idle,
            1 => Phase::Head,
            2 => Phase::Active,
            _ => Phase::H2,
        }
    }
}

/// A deadline that never comes (a year).
const FAR: Duration = Duration::from_secs(86_400 * 365);

/// How long a refused connection keeps reading (and discarding) after its answer, so the
/// client's unread request does not turn the close into a reset that loses the answer.
const LINGER: Duration = Duration::from_millis(500);
/// At most this much is discarded while lingering.
const LINGER_BYTES: usize = 256 * 1024;

/// Why the guard ended a connection, and the bytes it answers with.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    reason: CloseReason,
    answer: &'static [u8],
}

const ANSWER_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 28\r\nconnection: close\r\n\r\nrequest headers took too long";
const ANSWER_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\ncontent-length: 31\r\nconnection: close\r\n\r\nrequest header fields too large";
const ANSWER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 39\r\nconnection: close\r\n\r\nbad request: HTTP/1.0 or HTTP/1.1 only\n";

/// A client connection with its clocks; see the module documentation.
pub struct GuardedStream {
    inner: Stream,
    phase: AtomicU8,
    /// The phase `due` was computed for.
    armed: Option<Phase>,
    /// When the current phase's clock runs out, and what that means. Computing it costs no
    /// timer operation: the timer is only touched when a read has to wait.
    due: Option<Instant>,
    due_reason: CloseReason,
    /// The timer, and the instant it is set to (it may be set earlier than `due`: it then
    /// fires, finds time left, and is set again; so a busy keep-alive connection resets
    /// its timer once per idle timeout, not once per request).
    deadline: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    head: HeadScanner,
    /// Only a connection's first head is checked for its version: later ones may start
    /// in bytes pingora already holds (pipelining).
    first_head: bool,
    h2: Option<H2FloodGuard>,
    /// Bytes read ahead (sniffing for the h2c preface), handed out before new reads.
    replay: BytesMut,
    head_started: Option<Instant>,
    established: Instant,
    limits: DownstreamLimits,
    drain: Option<Pin<Box<OwnedNotified>>>,
    drain_source: Option<Arc<super::admission::Admission>>,
    refusal: Option<Refusal>,
    /// Since when writes have found the socket full (none while they make progress).
    write_stalled_since: Option<Instant>,
    /// The write-stall timer, made the first time a write waits.
    write_timer: Option<Pin<Box<Sleep>>>,
    stats: DownstreamStats,
    _slot: Option<ConnectionSlot>,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl GuardedStream {
    /// Wraps an accepted connection.
    pub fn new(
        inner: Stream,
        limits: DownstreamLimits,
        stats: DownstreamStats,
        slot: Option<ConnectionSlot>,
        admission: Option<Arc<super::admission::Admission>>,
    ) -> Self {
        let now = Instant::now();
        GuardedStream {
            inner,
            phase: AtomicU8::new(Phase::Idle as u8),
            armed: None,
            due: None,
            due_reason: CloseReason::IdleTimeout,
            deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timer_at: None,
            head: HeadScanner::new(limits.max_head_bytes()),
            first_head: true,
            h2: None,
            replay: BytesMut::new(),
            head_started: None,
            established: now,
            limits,
            drain: None,
            drain_source: admission,
            refusal: None,
            write_stalled_since: None,
            write_timer: None,
            stats,
            _slot: slot,
        }
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// The gateway has a request's head: its clock stops.
    pub fn mark_active(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Head as u8,
            Phase::Active as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let _ = self.phase.compare_exchange(
            Phase::Idle as u8,
            Phase::Active as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// A request ended and the connection waits for the next.
    pub fn mark_idle(&mut self) {
        self.phase.store(Phase::Idle as u8, Ordering::Release);
        self.first_head = false;
        self.head_started = None;
    }

    /// Whether the connection is older than `max_connection_duration`.
    pub fn past_max_duration(&self) -> bool {
        self.limits
            .max_connection_duration
            .is_some_and(|max| self.established.elapsed() >= max)
    }

    /// The limits this connection was accepted under.
    pub fn limits(&self) -> &DownstreamLimits {
        &self.limits
    }

    /// Counts the connection's end for `reason` (the front door's own closes).
    pub fn count_close(&self, reason: CloseReason) {
        self.stats.closed(reason);
    }

    /// Reads until the bytes so far are, or cannot be, `preface` (the HTTP/2 preface, a
    /// CONNECT request line's start); they are handed out again by the next reads. `None`
    /// when the client sent nothing in time or left.
    pub async fn sniff_prefix(&mut self, preface: &[u8]) -> Option<bool> {
        let (deadline, idle_reason) = self
            .idle_deadline(self.established)
            .unwrap_or((self.established + FAR, CloseReason::IdleTimeout));
        // Until its first byte the connection is idle: it gives way under pressure too.
        let mut drain = self
            .drain_source
            .as_ref()
            .map(|admission| Box::pin(admission.idle_drain()));
        loop {
            let seen = &self.replay[..self.replay.len().min(preface.len())];
            if !preface.starts_with(seen) {
                return Some(false);
            }
            if seen.len() == preface.len() {
                return Some(true);
            }
            let deadline = match self.head_started {
                Some(started) => self
                    .limits
                    .request_headers_timeout
                    .map_or(deadline, |t| started + t),
                None => deadline,
            };
            let idle = self.replay.is_empty();
            let read =
                tokio::time::timeout_at(deadline.into(), self.inner.read_buf(&mut self.replay));
            let drained = async {
                match drain.as_mut() {
                    Some(notified) if idle => notified.as_mut().await,
                    _ => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                read = read => read,
                () = drained => {
                    self.stats.closed(CloseReason::OverloadDrain);
                    return None;
                }
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {
                    self.head_started.get_or_insert_with(Instant::now);
                }
                Err(_) => {
                    let reason = if self.head_started.is_some() {
                        CloseReason::RequestHeadersTimeout
                    } else {
                        idle_reason
                    };
                    self.stats.closed(reason);
                    return None;
                }
            }
        }
    }

    /// Switches the connection to HTTP/2 (flood guard on, no head clocks).
    pub fn into_h2(mut self) -> Self {
        self.phase.store(Phase::H2 as u8, Ordering::Release);
        self.h2 = Some(H2FloodGuard::new(Instant::now()));
        self
    }

    /// The clock of `phase`, computed when the connection enters it.
    fn arm(&mut self, phase: Phase) {
        self.armed = Some(phase);
        let now = Instant::now();
        let clock = match phase {
            Phase::Idle => self.idle_deadline(now),
            Phase::Head => {
                let started = *self.head_started.get_or_insert(now);
                self.limits
                    .request_headers_timeout
                    .map(|t| (started + t, CloseReason::RequestHeadersTimeout))
            }
            Phase::Active | Phase::H2 => None,
        };
        self.due = clock.map(|(at, _)| at);
        if let Some((_, reason)) = clock {
            self.due_reason = reason;
        }
    }

    /// Whether the current phase's clock ran out; otherwise the timer is set to wake the
    /// reader by then.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let Some(due) = self.due else {
            return Poll::Pending;
        };
        loop {
            if Instant::now() >= due {
                return Poll::Ready(self.due_reason);
            }
            if self.timer_at.is_none_or(|at| at > due) {
                self.deadline.as_mut().reset(due.into());
                self.timer_at = Some(due);
            }
            match self.deadline.as_mut().poll(cx) {
                // Set for an earlier phase's clock: set it again.
                Poll::Ready(()) => self.timer_at = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Whether the listener wants idle connections to give way now. The notification is
    /// kept across requests (no allocation per request) and only acted on while the
    /// listener is still near its limit.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(admission) = self.drain_source.as_ref() else {
            return Poll::Pending;
        };
        for _ in 0..2 {
            let drain = self
                .drain
                .get_or_insert_with(|| Box::pin(admission.idle_drain()));
            if drain.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.drain = None;
            if admission.under_pressure(self.limits.connection_limit()) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// The outcome of a write (or flush) to the client, with the write-stall clock applied:
    /// progress stops the clock, waiting starts it, and waiting past `stream_idle_timeout`
    /// ends the connection.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.write_stalled_since = None;
            return result;
        }
        let Some(limit) = self.limits.stream_idle_timeout else {
            return Poll::Pending;
        };
        let due = *self.write_stalled_since.get_or_insert_with(Instant::now) + limit;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
        if timer.deadline() != due.into() {
            timer.as_mut().reset(due.into());
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let reason = CloseReason::StreamIdleTimeout;
                self.stats.closed(reason);
                self.refusal = Some(Refusal {
                    reason,
                    answer: &[],
                });
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client read nothing for stream_idle_timeout",
                )))
            }
        }
    }

    /// When a connection idle since `since` is closed, and why: the idle timeout or the
    /// connection's age, whichever comes first.
    fn idle_deadline(&self, since: Instant) -> Option<(Instant, CloseReason)> {
        let idle = self
            .limits
            .idle_timeout
            .map(|t| (since + t, CloseReason::IdleTimeout));
        let max = self
            .limits
            .max_connection_duration
            .map(|t| (self.established + t, CloseReason::MaxConnectionDuration));
        match (idle, max) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Looks at bytes on their way to pingora.
    fn inspect(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        match self.phase() {
            Phase::Idle => {
                self.phase.store(Phase::Head as u8, Ordering::Release);
                self.head = HeadScanner::new(self.limits.max_head_bytes());
                self.head_started.get_or_insert_with(Instant::now);
                self.arm(Phase::Head);
                self.scan_head(bytes)
            }
            Phase::Head => self.scan_head(bytes),
            Phase::Active => Ok(()),
            Phase::H2 => match self.h2.as_mut().map(|g| g.feed(bytes, Instant::now())) {
                Some(Err(H2Flood::ControlFrames | H2Flood::EmptyFrames)) => Err(Refusal {
                    reason: CloseReason::H2Flood,
                    answer: &[],
                }),
                _ => Ok(()),
            },
        }
    }

    fn scan_head(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        match self.head.feed(bytes) {
            HeadProgress::Incomplete => Ok(()),
            HeadProgress::Complete { .. } => {
                self.mark_active();
                Ok(())
            }
            HeadProgress::TooLarge => Err(Refusal {
                reason: CloseReason::HeadersTooLarge,
                answer: ANSWER_431,
            }),
            HeadProgress::NotHttp1 if self.first_head => Err(Refusal {
                reason: CloseReason::NotHttp1,
                answer: ANSWER_400,
            }),
            HeadProgress::NotHttp1 => Ok(()),
        }
    }

    /// Ends the connection: the answer goes out if the socket takes it now (it is small
    /// and nothing else is being written), the read fails, the lingering close follows in
    /// `shutdown`.
    fn refuse(&mut self, cx: &mut Context<'_>, refusal: Refusal) -> Poll<io::Result<()>> {
        self.stats.closed(refusal.reason);
        let goaway;
        let answer = match (&self.h2, refusal.reason) {
            (Some(guard), CloseReason::H2Flood) => {
                goaway = guard.goaway();
                &goaway[..]
            }
            _ => refusal.answer,
        };
        if !answer.is_empty() {
            let mut inner = Pin::new(&mut self.inner);
            if let Poll::Ready(Ok(_)) = inner.as_mut().poll_write(cx, answer) {
                let _ = inner.poll_flush(cx);
            }
        }
        self.refusal = Some(refusal);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("client connection closed: {}", refusal.reason.as_str()),
        )))
    }
}

thread_local! {
    /// Connections closed on this thread since the memory-release task last looked.
    static CLOSED_ON_THIS_THREAD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many connections closed on this thread since the last call.
pub fn take_closed_on_this_thread() -> u64 {
    CLOSED_ON_THIS_THREAD.with(|c| c.replace(0))
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        CLOSED_ON_THIS_THREAD.with(|c| c.set(c.get() + 1));
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(refusal) = this.refusal {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                refusal.reason.as_str(),
            )));
        }
        let phase = this.phase();
        if this.armed != Some(phase) {
            this.arm(phase);
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            let chunk = this.replay.split_to(n);
            buf.put_slice(&chunk);
            return match this.inspect(&chunk) {
                Ok(()) => Poll::Ready(Ok(())),
                Err(refusal) => this.refuse(cx, refusal),
            };
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = &buf.filled()[before..];
                if filled.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let result = this.inspect(filled);
                match result {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(refusal) => this.refuse(cx, refusal),
                }
            }
            Poll::Pending => {
                if let Poll::Ready(reason) = this.poll_due(cx) {
                    return match phase {
                        Phase::Head => this.refuse(
                            cx,
                            Refusal {
                                reason,
                                answer: ANSWER_408,
                            },
                        ),
                        _ => {
                            // Quietly, as for a client that closed between requests.
                            this.stats.closed(reason);
                            this.refusal = Some(Refusal {
                                reason,
                                answer: &[],
                            });
                            Poll::Ready(Ok(()))
                        }
                    };
                }
                if phase == Phase::Idle && this.poll_drain(cx).is_ready() {
                    this.stats.closed(CloseReason::OverloadDrain);
                    this.refusal = Some(Refusal {
                        reason: CloseReason::OverloadDrain,
                        answer: &[],
                    });
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, result)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        let refused = self.refusal.is_some_and(|r| !r.answer.is_empty());
        let _ = AsyncWriteExt::shutdown(&mut self.inner).await;
        if refused {
            // Lingering close: the answer is sent, the rest of the request is read and
            // dropped for a moment so the close does not reset the connection under it.
            let mut sink = [0u8; 8192];
            let mut drained = 0;
            let linger = async {
                while drained < LINGER_BYTES {
                    match self.inner.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => drained += n,
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, linger).await;
        }
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    /// Only bytes already read ahead (the h2c preface the front door sniffed) can be
    /// peeked: pingora's own peek waits for a whole preface, which a short HTTP/1 request
    /// never sends.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.replay.len() >= buf.len() {
            buf.copy_from_slice(&self.replay.chunk()[..buf.len()]);
            return Ok(true);
        }
        Ok(false)
    }
}
