//! Access logging: one line per request, written off the request path.
//!
//! Worker threads format a line and hand it to a bounded channel; a dedicated thread writes
//! it. When the writer cannot keep up, lines are dropped and counted
//! (`nip_access_log_dropped_total`) rather than slowing requests down.

use prometheus_client::metrics::counter::Counter;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::SystemTime;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Envoy's default text format.
    Text,
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSink {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(String),
}

/// What one request contributes to its log line.
#[derive(Debug)]
pub struct LogEntry<'a> {
    /// When the request started.
    pub start: SystemTime,
    /// Method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// Response status (0 when none was sent).
    pub status: u16,
    /// Envoy response flags (`-` when none).
    pub flags: &'a str,
    /// Request body bytes received.
    pub bytes_received: usize,
    /// Response body bytes sent.
    pub bytes_sent: usize,
    /// From the request's start to its end (logged in milliseconds).
    pub duration: std::time::Duration,
    /// x-forwarded-for as sent upstream.
    pub forwarded_for: &'a str,
    /// User agent.
    pub user_agent: &'a str,
    /// Request id.
    pub request_id: &'a str,
    /// Host / :authority.
    pub authority: &'a str,
    /// Route name.
    pub route: &'a str,
    /// Upstream cluster.
    pub cluster: &'a str,
    /// Upstream endpoint.
    pub upstream_host: &'a str,
    /// The client certificate's first URI SAN, on a mutual TLS connection
    /// (`%DOWNSTREAM_PEER_URI_SAN%`; JSON format only).
    pub peer_uri_san: &'a str,
    /// The tenant whose route took the request (JSON format only; empty: none).
    pub tenant: &'a str,
    /// The request's trace id, when it was traced (JSON format only; empty: none).
    pub trace_id: &'a str,
}

/// A running access log writer.
#[derive(Debug)]
pub struct AccessLogger {
    format: LogFormat,
    sink: LogSink,
    retention: Option<std::time::Duration>,
    sender: SyncSender<String>,
    dropped: Counter,
}

/// The date (`YYYY-MM-DD`, UTC) of `time`.
fn date_of(time: SystemTime) -> String {
    rfc3339(time)[..10].to_string()
}

/// A log file kept for a retention period: at the first write of a new day (UTC) the file
/// is renamed `PATH.YYYY-MM-DD` (the day it holds) and a new one begun, and rotated files
/// older than the retention are deleted (at start too).
struct RotatingFile {
    path: std::path::PathBuf,
    retention: std::time::Duration,
    /// The day the open file holds.
    day: String,
    file: std::fs::File,
}

impl RotatingFile {
    fn open(
        path: &str,
        retention: std::time::Duration,
        now: SystemTime,
    ) -> std::io::Result<RotatingFile> {
        let path = std::path::PathBuf::from(path);
        let file = append(&path)?;
        // A file left by an earlier run holds the day it was last written.
        let day = file
            .metadata()
            .and_then(|m| m.modified())
            .map_or_else(|_| date_of(now), date_of);
        let mut rotating = RotatingFile {
            path,
            retention,
            day,
            file,
        };
        rotating.roll(now)?;
        rotating.prune(now)?;
        Ok(rotating)
    }

    /// Rotates when `now` is another day than the file's; a rotation deletes expired
    /// files (a directory scan once a day, not per write).
    fn roll(&mut self, now: SystemTime) -> std::io::Result<()> {
        let today = date_of(now);
        if today != self.day {
            let rotated = self.rotated_name(&self.day);
            self.file.flush()?;
            std::fs::rename(&self.path, &rotated)?;
            self.file = append(&self.path)?;
            self.day = today;
            self.prune(now)?;
        }
        Ok(())
    }

    /// Deletes rotated files (`PATH.YYYY-MM-DD`) older than the retention.
    fn prune(&self, now: SystemTime) -> std::io::Result<()> {
        let oldest = date_of(
            now.checked_sub(self.retention)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return Ok(());
        };
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        let prefix = format!("{}.", name.to_string_lossy());
        for entry in std::fs::read_dir(dir)?.flatten() {
            let entry_name = entry.file_name().to_string_lossy().to_string();
            let Some(date) = entry_name.strip_prefix(&prefix) else {
                continue;
            };
            // Only files this writer names (PATH.YYYY-MM-DD); dates compare as text.
            let is_date = date.len() == 10
                && date.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                });
            if is_date && date < oldest.as_str() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn rotated_name(&self, day: &str) -> std::path::PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{day}"));
        std::path::PathBuf::from(name)
    }
}

impl Write for RotatingFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.roll(SystemTime::now())?;
        self.file.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl AccessLogger {
    /// Opens the sink and starts the writer thread. With a `retention`, a file sink is
    /// rotated daily and rotated files older than it are deleted (a tenant's
    /// `data.retention`).
    pub fn start(
        format: LogFormat,
        sink: LogSink,
        retention: Option<std::time::Duration>,
        dropped: Counter,
    ) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match (&sink, retention) {
            (LogSink::Stdout, _) => Box::new(std::io::stdout()),
            (LogSink::File(path), None) => Box::new(append(std::path::Path::new(path))?),
            (LogSink::File(path), Some(retention)) => {
                Box::new(RotatingFile::open(path, retention, SystemTime::now())?)
            }
        };
        let (sender, receiver) = sync_channel::<String>(QUEUE_LINES);
        std::thread::Builder::new()
            .name("nip-access-log".into())
            .spawn(move || {
                while let Ok(line) = receiver.recv() {
                    let mut ok = out.write_all(line.as_bytes()).is_ok();
                    // Drain what queued up meanwhile before flushing once.
                    while let Ok(line) = receiver.try_recv() {
                        ok &= out.write_all(line.as_bytes()).is_ok();
                    }
                    ok &= out.flush().is_ok();
                    if !ok {
                        eprintln!("nip: access log write failed");
                    }
                }
            })?;
        Ok(AccessLogger {
            format,
            sink,
            retention,
            sender,
            dropped,
        })
    }

    /// Whether this logger already writes `format` to `sink` with `retention` (reused
    /// across reloads).
    pub fn is(
        &self,
        format: LogFormat,
        sink: &LogSink,
        retention: Option<std::time::Duration>,
    ) -> bool {
        self.format == format && &self.sink == sink && self.retention == retention
    }

    /// Formats and queues one line.
    pub fn log(&self, entry: &LogEntry<'_>) {
        let line = match self.format {
            LogFormat::Json => json_line(entry),
            LogFormat::Text => text_line(entry),
        };
        match self.sender.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

/// The JSON format's line (newline-terminated); the tap shows requests the same way.
pub(crate) fn json_line(e: &LogEntry<'_>) -> String {
    let value = serde_json::json!({
        "start_time": rfc3339(e.start),
        "method": e.method,
        "path": e.path,
        "protocol": e.protocol,
        "response_code": e.status,
        "response_flags": e.flags,
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "duration_ms": e.duration.as_millis(),
        "x_forwarded_for": e.forwarded_for,
        "user_agent": e.user_agent,
        "request_id": e.request_id,
        "authority": e.authority,
        "route_name": e.route,
        "upstream_cluster": e.cluster,
        "upstream_host": e.upstream_host,
        "downstream_peer_uri_san": e.peer_uri_san,
        "tenant": e.tenant,
        "trace_id": e.trace_id,
    });
    let mut line = value.to_string();
    line.push('\n');
    line
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn text_line(e: &LogEntry<'_>) -> String {
    let mut line = String::with_capacity(256);
    let _ = writeln!(
        line,
        "[{}] \"{} {} {}\" {} {} {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"",
        rfc3339(e.start),
        e.method,
        e.path,
        e.protocol,
        e.status,
        e.flags,
        e.bytes_received,
        e.bytes_sent,
        e.duration.as_millis(),
        dash(e.forwarded_for),
        dash(e.user_agent),
        dash(e.request_id),
        dash(e.authority),
        dash(e.upstream_host),
    );
    line
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_kept_log_rotates_daily_and_forgets_files_past_its_retention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let day = std::time::Duration::from_secs(86_400);
        let now = SystemTime::UNIX_EPOCH + day * 20_000; // 2024-10-04
        let old = dir
            .path()
            .join(format!("access.log.{}", date_of(now - day * 40)));
        let recent = dir
            .path()
            .join(format!("access.log.{}", date_of(now - day * 2)));
        let unrelated = dir.path().join("access.log.bak");
        for file in [&old, &recent, &unrelated] {
            std::fs::write(file, "x").unwrap();
        }
        let mut log = RotatingFile::open(path.to_str().unwrap(), day * 30, now).unwrap();
        assert!(!old.exists(), "older than 30 days: deleted");
        assert!(recent.exists() && unrelated.exists());
        log.day = date_of(now);
        log.file.write_all(b"today\n").unwrap();
        log.roll(now + day).unwrap();
        log.file.write_all(b"tomorrow\n").unwrap();
        let rotated = dir.path().join(format!("access.log.{}", date_of(now)));
        assert_eq!(std::fs::read_to_string(rotated).unwrap(), "today\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "tomorrow\n");
    }

    use super::*;
    use std::time::Duration;

    fn entry() -> LogEntry<'static> {
        LogEntry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
            method: "GET",
            path: "/a?b=1",
            protocol: "HTTP/1.1",
            status: 503,
            flags: "UH",
            bytes_received: 0,
            bytes_sent: 19,
            duration: std::time::Duration::from_millis(3),
            forwarded_for: "127.0.0.1",
            user_agent: "curl/8",
            request_id: "abc",
            authority: "example.com",
            route: "r",
            cluster: "c",
            upstream_host: "",
            peer_uri_san: "",
            tenant: "",
            trace_id: "",
        }
    }

    #[test]
    fn json_lines_are_one_object_per_line() {
        let line = json_line(&entry());
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UH");
        assert_eq!(v["start_time"], "2025-11-24T16:00:00.123Z");
    }

    #[test]
    fn text_lines_follow_envoys_default_layout() {
        let line = text_line(&entry());
        assert!(
            line.starts_with(
                "[2025-11-24T16:00:00.123Z] \"GET /a?b=1 HTTP/1.1\" 503 UH 0 19 3 - \"127.0.0.1\""
            ),
            "{line}"
        );
        assert!(line.trim_end().ends_with("\"example.com\" \"-\""), "{line}");
    }
}
