//! The live request tap: each finished request's access record, for whoever watches right
//! now (the admin page's `/tap`, `nip debug`). A broadcast over a bounded ring: sending
//! never waits, a watcher that falls behind loses the oldest records (and is told how
//! many), and with nobody watching the request path pays one atomic load.

use super::access_log::{json_line, LogEntry};
use std::sync::Arc;

/// Records a watcher may fall behind by before it loses some.
const TAP_BUFFER: usize = 1024;

/// One finished request, as the tap shows it.
#[derive(Debug, Clone)]
pub struct TapRecord {
    /// The route that took it (empty: none).
    pub route: Arc<str>,
    /// The status sent (0: none).
    pub status: u16,
    /// The record as a JSON access log line (newline-terminated).
    pub json: Arc<str>,
}

/// The tap: one per proxy.
#[derive(Debug)]
pub struct Tap {
    sender: tokio::sync::broadcast::Sender<TapRecord>,
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
        let record = TapRecord {
            route: entry.route.into(),
            status: entry.status,
            json: json_line(entry).into(),
        };
        // No watcher left since `watching`: nothing to do.
        let _ = self.sender.send(record);
    }

    /// A new watcher: the records of requests that finish from now on.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<TapRecord> {
        self.sender.subscribe()
    }
}
