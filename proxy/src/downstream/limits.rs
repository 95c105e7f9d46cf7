//! The limits a listener puts on its clients, compiled from the listener's
//! `HttpConnectionManager` (Envoy's fields and names) and its `nip.downstream` metadata.

use std::time::Duration;

pub use nip_xds::config::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HEADERS_COUNT, DEFAULT_MAX_REQUEST_HEADERS_KB,
    DEFAULT_REQUEST_HEADERS_TIMEOUT, DEFAULT_STREAM_IDLE_TIMEOUT, MAX_REQUEST_HEADERS_KB_CEILING,
};
/// Share of the descriptor limit downstream connections may take by default; the rest is
/// for upstream connections, files and the admin port.
pub const DEFAULT_CONNECTION_SHARE: f64 = 0.8;

/// Client-side timeouts and limits of one listener. `None` disables a limit (Envoy: `0s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamLimits {
    /// From a request's first byte to the end of its head (408 after).
    pub request_headers_timeout: Option<Duration>,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Option<Duration>,
    /// A request whose body (or the answer's delivery) makes no progress for this long ends.
    pub stream_idle_timeout: Option<Duration>,
    /// A connection is closed (after its current request) once it is this old.
    pub max_connection_duration: Option<Duration>,
    /// Requests served on one connection before it is closed.
    pub max_requests_per_connection: Option<u32>,
    /// Size of a request head (request line and fields) in KiB (431 beyond).
    pub max_request_headers_kb: u32,
    /// Header fields in a request (431 beyond).
    pub max_headers_count: u32,
    /// Connections open at once on this listener; `None`: a share of the descriptor limit.
    pub max_active_downstream_connections: Option<u64>,
    /// Trust `x-nip-priority` from clients of this listener (else it is removed).
    pub trust_priority_header: bool,
}

impl Default for DownstreamLimits {
    fn default() -> Self {
        DownstreamLimits {
            request_headers_timeout: Some(DEFAULT_REQUEST_HEADERS_TIMEOUT),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            stream_idle_timeout: Some(DEFAULT_STREAM_IDLE_TIMEOUT),
            max_connection_duration: None,
            max_requests_per_connection: None,
            max_request_headers_kb: DEFAULT_MAX_REQUEST_HEADERS_KB,
            max_headers_count: DEFAULT_MAX_HEADERS_COUNT,
            max_active_downstream_connections: None,
            trust_priority_header: false,
        }
    }
}

impl DownstreamLimits {
    /// The head size limit in bytes.
    pub fn max_head_bytes(&self) -> usize {
        usize::try_from(self.max_request_headers_kb)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024)
    }

    /// The connection limit in force: the configured one, or a share of the process's
    /// descriptor limit.
    pub fn connection_limit(&self) -> u64 {
        self.max_active_downstream_connections
            .unwrap_or_else(default_connection_limit)
    }
}

/// [`DEFAULT_CONNECTION_SHARE`] of `RLIMIT_NOFILE` (read once).
pub fn default_connection_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let nofile = descriptor_limit().unwrap_or(1024);
        ((nofile as f64) * DEFAULT_CONNECTION_SHARE).max(16.0) as u64
    })
}

/// The soft `RLIMIT_NOFILE`, from `/proc/self/limits`.
pub fn descriptor_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(1 << 20);
    }
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_bounded() {
        let limits = DownstreamLimits::default();
        assert_eq!(limits.max_head_bytes(), 60 * 1024);
        assert!(limits.connection_limit() >= 16);
        assert!(descriptor_limit().is_some());
    }
}
