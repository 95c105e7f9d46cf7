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
//! This module knows sockets and HTTP framing, never routes, clusters or snapshots: it
//! imports nothing else of the crate (the server wires [`app::FrontDoor`] to the gateway
//! and to the snapshot's limits).

pub mod admission;
pub mod app;
pub mod framing;
pub mod h2_flood;
pub mod head;
pub mod limits;
pub mod stats;
pub mod stream;
pub mod tls;

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

/// What the gateway takes from the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts {
    /// The listener trusts its clients' `x-nip-priority`.
    pub trust_priority_header: bool,
}

/// The first thing the gateway does with a request head: stop the head clock, set the
/// body clocks (`stream_idle_timeout`), and check the framing. A refused head must be
/// answered with the error's status on a connection that then closes. `current` are the
/// limits in force, for HTTP/2 streams (whose connection pingora does not show).
pub fn on_request_head(
    session: &mut Session,
    current: &DownstreamLimits,
) -> Result<ConnectionFacts, FramingError> {
    let guarded = guarded_stream(session);
    if let Some(stream) = guarded {
        stream.mark_active();
    }
    let limits = guarded.map_or(current, GuardedStream::limits);
    let max_headers = usize::try_from(limits.max_headers_count).unwrap_or(usize::MAX);
    let stream_idle = limits.stream_idle_timeout;
    let facts = ConnectionFacts {
        trust_priority_header: limits.trust_priority_header,
    };
    session.set_read_timeout(stream_idle);
    if session.downstream_session.is_http2() {
        // An HTTP/1 client's stalled reads are the guarded stream's write clock; an HTTP/2
        // stream waits on flow control, which only pingora sees.
        session.set_write_timeout(stream_idle);
    }
    let request = session.req_header();
    if session.downstream_session.is_http2() {
        return if request.headers.len() > max_headers {
            Err(FramingError::TooManyHeaders)
        } else {
            Ok(facts)
        };
    }
    framing::check_request_head(request.version, &request.headers, max_headers).map(|()| facts)
}

/// Whether the connection under `session` has lived past `max_connection_duration` (its
/// current response then says `Connection: close`).
pub fn past_max_connection_duration(session: &Session) -> bool {
    guarded_stream(session).is_some_and(GuardedStream::past_max_duration)
}
