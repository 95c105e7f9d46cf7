//! The latest lines plugins logged (`proxy_log`), kept in a bounded ring beside the
//! process's log, so an operator can read a plugin's own words without the proxy's log
//! file (the admin page's `/plugins/logs`, `nip debug`). Lines past [`KEPT_LINES`] push
//! out the oldest; each is cut at [`MAX_LINE_BYTES`].

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// Lines kept, across plugins.
pub const KEPT_LINES: usize = 1000;
/// The longest line kept.
pub const MAX_LINE_BYTES: usize = 1024;

/// One line a plugin logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginLogLine {
    /// Grows by one per line: a reader asks for the lines after the last it saw.
    pub seq: u64,
    /// When it was logged.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// The plugin's name.
    pub plugin: String,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// What it said.
    pub message: String,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*time).to_string())
}

#[derive(Default)]
struct Ring {
    next_seq: u64,
    lines: VecDeque<PluginLogLine>,
}

fn ring() -> &'static Mutex<Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(Mutex::default)
}

/// Keeps a line a plugin logged.
pub fn record(plugin: &str, level: &'static str, message: &str) {
    let mut end = message.len().min(MAX_LINE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut ring = ring().lock().unwrap_or_else(|p| p.into_inner());
    let seq = ring.next_seq;
    ring.next_seq += 1;
    if ring.lines.len() == KEPT_LINES {
        ring.lines.pop_front();
    }
    ring.lines.push_back(PluginLogLine {
        seq,
        time: SystemTime::now(),
        plugin: plugin.to_string(),
        level,
        message: message[..end].to_string(),
    });
}

/// The kept lines after `after` (all with `None`), of `plugin` if given, the newest
/// `limit` of them, oldest first.
pub fn recent(plugin: Option<&str>, after: Option<u64>, limit: usize) -> Vec<PluginLogLine> {
    let ring = ring().lock().unwrap_or_else(|p| p.into_inner());
    let mut lines: Vec<PluginLogLine> = ring
        .lines
        .iter()
        .rev()
        .filter(|l| after.is_none_or(|a| l.seq > a))
        .filter(|l| plugin.is_none_or(|p| l.plugin == p))
        .take(limit)
        .cloned()
        .collect();
    lines.reverse();
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines_cut_to_size() {
        let name = "logs-test-plugin";
        for i in 0..(KEPT_LINES + 5) {
            record(name, "info", &format!("line {i}"));
        }
        record(name, "warn", &"é".repeat(MAX_LINE_BYTES));
        let lines = recent(Some(name), None, 3);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].message, format!("line {}", KEPT_LINES + 3));
        assert_eq!(lines[2].level, "warn");
        assert!(lines[2].message.len() <= MAX_LINE_BYTES);
        let after = recent(Some(name), Some(lines[1].seq), 10);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].seq, lines[2].seq);
    }
}
