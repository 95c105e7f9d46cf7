//! # The front door: client connections before and between their requests
//!
//! Pingora accepts a connection (and finishes TLS), then hands it to [`app::FrontDoor`]:
//!
//! ```text
//! accept ─▶ admission (max_active_downstream_connections; idle drain at 90 %)
//!        ─▶ stream::GuardedStream (idle / head clocks, head size, HTTP/0.9, h2 floods)
//!        ─▶ HTTP/2: pingora's h2 path │ HTTP/1: keep-alive loop with pipelining
//!        ─▶ gateway::request_filter: framing::check_request_head (CL, TE, Host, 431)
//! ```
//!
//! [`limits::DownstreamLimits`] come from the snapshot in force when a connection is
//! accepted (compiled from the listener's `HttpConnectionManager`), so a reload changes them
//! for new connections. Everything here is per connection and lock-free; what it closes is
//! counted in `nip_downstream_cx_closed_total{reason}`.
//!
//! This module knows sockets and HTTP framing, never routes or clusters.

pub mod admission;
pub mod app;
pub mod framing;
pub mod h2_flood;
pub mod head;
pub mod limits;
pub mod stream;

use framing::FramingError;
use limits::DownstreamLimits;
use pingora::proxy::Session;
use stream::GuardedStream;

/// The guarded stream under an HTTP/1 session (`None` for HTTP/2 streams).
pub fn guarded_stream(session: &Session) -> Option<&GuardedStream> {
    session
        .downstream_session
        .stream()
        .and_then(|stream| stream.as_ref().as_any().downcast_ref::<GuardedStream>())
}

/// The first thing the gateway does with a request head: stop the head clock, set the
/// body clocks (`stream_idle_timeout`), and check the framing. A refused head must be
/// answered with the error's status on a connection that then closes.
pub fn on_request_head(
    session: &mut Session,
    current: &DownstreamLimits,
) -> Result<(), FramingError> {
    let (max_headers, stream_idle) = match guarded_stream(session) {
        Some(stream) => {
            stream.mark_active();
            let limits = stream.limits();
            (limits.max_headers_count, limits.stream_idle_timeout)
        }
        None => (current.max_headers_count, current.stream_idle_timeout),
    };
    session.set_read_timeout(stream_idle);
    session.set_write_timeout(stream_idle);
    let max_headers = usize::try_from(max_headers).unwrap_or(usize::MAX);
    let request = session.req_header();
    if session.downstream_session.is_http2() {
        return if request.headers.len() > max_headers {
            Err(FramingError::TooManyHeaders)
        } else {
            Ok(())
        };
    }
    framing::check_request_head(request.version, &request.headers, max_headers)
}

/// Whether the connection under `session` has lived past `max_connection_duration` (its
/// current response then says `Connection: close`).
pub fn past_max_connection_duration(session: &Session) -> bool {
    guarded_stream(session).is_some_and(GuardedStream::past_max_duration)
}
