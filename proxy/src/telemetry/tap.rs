//! The live request tap: each finished request's access record, for whoever watches right
//! now (the admin page's `/tap`, `nip debug`, the stream of records to the control plane).
//! A broadcast over a bounded ring: sending never waits, a watcher that falls behind loses
//! the oldest records (and is told how many), and with nobody watching the request path
//! pays one atomic load.

use super::access_log::{json_line, LogEntry};
use std::sync::Arc;
use std::time::SystemTime;

/// Records a watcher may fall behind by before it loses some.
const TAP_BUFFER: usize = 1024;

/// One finished request, owned: what [`LogEntry`] borrows from the request.
#[derive(Debug, Clone)]
pub struct TapRecord {
    /// When the request started.
    pub start: SystemTime,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: String,
    /// The status sent (0: none).
    pub status: u16,
    /// Envoy's response flags (`-` when none).
    pub flags: String,
    /// Request body bytes received.
    pub bytes_received: usize,
    /// Response body bytes sent.
    pub bytes_sent: usize,
    /// From the request's start to its end.
    pub duration: std::time::Duration,
    /// `x-forwarded-for` as sent upstream.
    pub forwarded_for: String,
    /// User agent.
    pub user_agent: String,
    /// Request id.
    pub request_id: String,
    /// Host / `:authority`.
    pub authority: String,
    /// The route that took it (empty: none).
    pub route: String,
    /// Upstream cluster.
    pub cluster: String,
    /// Upstream endpoint.
    pub upstream_host: String,
    /// The client certificate's URI SAN.
    pub peer_uri_san: String,
    /// The tenant.
    pub tenant: String,
    /// The trace id.
    pub trace_id: String,
}

impl TapRecord {
    fn of(e: &LogEntry<'_>) -> TapRecord {
        TapRecord {
            start: e.start,
            method: e.method.to_string(),
            path: e.path.to_string(),
            protocol: e.protocol.to_string(),
            status: e.status,
            flags: e.flags.to_string(),
            bytes_received: e.bytes_received,
            bytes_sent: e.bytes_sent,
            duration: e.duration,
            forwarded_for: e.forwarded_for.to_string(),
            user_agent: e.user_agent.to_string(),
            request_id: e.request_id.to_string(),
            authority: e.authority.to_string(),
            route: e.route.to_string(),
            cluster: e.cluster.to_string(),
            upstream_host: e.upstream_host.to_string(),
            peer_uri_san: e.peer_uri_san.to_string(),
            tenant: e.tenant.to_string(),
            trace_id: e.trace_id.to_string(),
        }
    }

    /// The record as a JSON access log line (newline-terminated).
    pub fn json(&self) -> String {
        json_line(&LogEntry {
            start: self.start,
            method: &self.method,
            path: &self.path,
            protocol: &self.protocol,
            status: self.status,
            flags: &self.flags,
            bytes_received: self.bytes_received,
            bytes_sent: self.bytes_sent,
            duration: self.duration,
            forwarded_for: &self.forwarded_for,
            user_agent: &self.user_agent,
            request_id: &self.request_id,
            authority: &self.authority,
            route: &self.route,
            cluster: &self.cluster,
            upstream_host: &self.upstream_host,
            peer_uri_san: &self.peer_uri_san,
            tenant: &self.tenant,
            trace_id: &self.trace_id,
        })
    }
}

/// The tap: one per proxy.
#[derive(Debug)]
pub struct Tap {
    sender: tokio::sync::broadcast::Sender<Arc<TapRecord>>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            sender: tokio::sync::broadcast::channel(TAP_BUFFER).0,
        }
    }
}

impl Tap {
    /// Whether anyone watches (the request path asks before building a record).
    pub fn watching(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Shows a finished request to the watchers.
    pub fn show(&self, entry: &LogEntry<'_>) {
        // No watcher left since `watching`: nothing to do.
        let _ = self.sender.send(Arc::new(TapRecord::of(entry)));
    }

    /// A new watcher: the records of requests that finish from now on.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<Arc<TapRecord>> {
        self.sender.subscribe()
    }
}
