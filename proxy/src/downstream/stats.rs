//! Counters of the listener's client connections: how many, and why the proxy closed
//! each one it closed. Resolved once; the metric registry registers them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Why the proxy closed a client connection (or refused it), the `reason` label of
/// `nip_downstream_cx_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Refused at accept: the listener holds `max_active_downstream_connections`.
    Overflow,
    /// Idle between requests for `idle_timeout`.
    IdleTimeout,
    /// Idle while the listener was near its connection limit.
    OverloadDrain,
    /// A request head took longer than `request_headers_timeout` (408).
    RequestHeadersTimeout,
    /// A request head grew past `max_request_headers_kb` (431).
    HeadersTooLarge,
    /// The request line was not HTTP/1.0 or HTTP/1.1 (400).
    NotHttp1,
    /// A request head failed the framing checks (400, 431 or 501).
    BadFraming,
    /// Open for `max_connection_duration`.
    MaxConnectionDuration,
    /// An HTTP/2 client flooded control or empty frames (GOAWAY `ENHANCE_YOUR_CALM`).
    H2Flood,
    /// The client read nothing of a response for `stream_idle_timeout`.
    StreamIdleTimeout,
}

impl CloseReason {
    /// Every reason, in label order.
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Overflow,
        CloseReason::IdleTimeout,
        CloseReason::OverloadDrain,
        CloseReason::RequestHeadersTimeout,
        CloseReason::HeadersTooLarge,
        CloseReason::NotHttp1,
        CloseReason::BadFraming,
        CloseReason::MaxConnectionDuration,
        CloseReason::H2Flood,
        CloseReason::StreamIdleTimeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Overflow => "overflow",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::OverloadDrain => "overload_drain",
            CloseReason::RequestHeadersTimeout => "request_headers_timeout",
            CloseReason::HeadersTooLarge => "headers_too_large",
            CloseReason::NotHttp1 => "not_http1",
            CloseReason::BadFraming => "bad_framing",
            CloseReason::MaxConnectionDuration => "max_connection_duration",
            CloseReason::H2Flood => "h2_flood",
            CloseReason::StreamIdleTimeout => "stream_idle_timeout",
        }
    }
}

/// Client connection counters of the listener, resolved once.
#[derive(Clone, Debug, Default)]
pub struct DownstreamStats {
    /// Connections accepted.
    pub cx_total: Counter,
    /// Connections open now.
    pub cx_active: Gauge,
    /// Connections closed or refused by the proxy, by [`CloseReason`].
    pub cx_closed: [Counter; CloseReason::ALL.len()],
}

impl DownstreamStats {
    /// Counts one connection closed for `reason`.
    pub fn closed(&self, reason: CloseReason) {
        self.cx_closed[reason as usize].inc();
    }

    /// How many connections were closed for `reason`.
    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.cx_closed[reason as usize].get()
    }
}
