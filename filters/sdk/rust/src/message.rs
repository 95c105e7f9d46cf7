//! The v4 message a plugin handles, and what it may answer.
//!
//! One HTTP request (or response) is one [`Message`]. How it is made, field by field, is
//! written in `filters/sdk/MESSAGE.md`, the definition every NIP SDK follows:
//!
//! | field | from |
//! |---|---|
//! | `id` | the request id (`x-request-id`, made by the proxy if absent) |
//! | `type` | `request` or `response` |
//! | `timestamp` | when the request arrived (RFC 3339, UTC) |
//! | `correlation_id` | the W3C trace id of `traceparent`, else the request id |
//! | `source` | listener, route and client address |
//! | `data` | the body: JSON when the content type says JSON, else bytes |
//! | `metadata.priority` | the priority class the proxy settled on (`x-nip-priority`) |
//! | `metadata.retry_count` | `x-nip-retry-count` (0 without it) |
//! | `metadata.fields` | `x-nip-meta-NAME` headers |
//! | `headers` | the other headers (lower-case names; repeated ones joined by `,`) |
//! | `tenant`, `principal` | whose request, and who it was authenticated as |
//!
//! A returned message changes what it changed: headers, body, `method`/`path` of a request,
//! `status` of a response, `metadata.priority` and `metadata.fields` (as their headers).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Prefix of the headers that carry `metadata.fields`.
pub const META_HEADER_PREFIX: &str = "x-nip-meta-";
/// The priority class header.
pub const PRIORITY_HEADER: &str = "x-nip-priority";
/// The retry counter header.
pub const RETRY_COUNT_HEADER: &str = "x-nip-retry-count";

/// Whether a message is a request or a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// A request on its way to the upstream.
    Request,
    /// A response on its way to the client.
    Response,
}

/// Where a message came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The listener (connection manager) that took the request.
    pub listener: String,
    /// The route that matched it.
    pub route: String,
    /// The client's address (`ip:port`).
    pub address: String,
}

/// A message's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Data {
    /// No body.
    #[default]
    Empty,
    /// A JSON body (the content type said JSON and it parsed).
    Json(Value),
    /// Any other body.
    Bytes(Vec<u8>),
}

impl Data {
    /// The body as a JSON value, if it is one.
    pub fn as_json(&self) -> Option<&Value> {
        match self {
            Data::Json(value) => Some(value),
            _ => None,
        }
    }

    /// The body as a mutable JSON value, if it is one.
    pub fn as_json_mut(&mut self) -> Option<&mut Value> {
        match self {
            Data::Json(value) => Some(value),
            _ => None,
        }
    }

    /// The body's bytes as they go on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Data::Empty => Vec::new(),
            Data::Json(value) => serde_json::to_vec(value).unwrap_or_default(),
            Data::Bytes(bytes) => bytes.clone(),
        }
    }

    /// Reads a body: JSON when `content_type` says so and it parses, else bytes.
    pub fn from_body(content_type: Option<&str>, body: Vec<u8>) -> Data {
        if body.is_empty() {
            return Data::Empty;
        }
        let json = content_type.is_some_and(|t| {
            let essence = t
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json")
        });
        if json {
            if let Ok(value) = serde_json::from_slice(&body) {
                return Data::Json(value);
            }
        }
        Data::Bytes(body)
    }
}

/// What the proxy knows about a message beyond its headers and body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Priority class: `low`, `normal` or `high`.
    pub priority: String,
    /// How many times the sender retried this message.
    pub retry_count: u32,
    /// Free-form fields, carried as `x-nip-meta-NAME` headers.
    pub fields: BTreeMap<String, String>,
}

/// One request or response, as the plugin sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The request id.
    pub id: String,
    /// Request or response.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// When the request arrived (RFC 3339, UTC).
    pub timestamp: String,
    /// The trace id, else the request id.
    pub correlation_id: String,
    /// Listener, route and client.
    pub source: Source,
    /// The body.
    pub data: Data,
    /// Priority, retry count and free-form fields.
    pub metadata: Metadata,
    /// Headers, without pseudo-headers and the metadata's own.
    pub headers: BTreeMap<String, String>,
    /// The tenant the proxy's policy named, if any.
    pub tenant: Option<String>,
    /// Who the request was authenticated as: a verified token's `iss/sub`, else the client
    /// certificate's identity.
    pub principal: Option<String>,
    /// Request method (requests).
    pub method: Option<String>,
    /// Request path with query (requests).
    pub path: Option<String>,
    /// Response status (responses).
    pub status: Option<u16>,
}

impl Message {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Sets a header (the name is lower-cased).
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.insert(name.to_ascii_lowercase(), value.into());
    }

    /// Removes a header.
    pub fn remove_header(&mut self, name: &str) {
        self.headers.remove(&name.to_ascii_lowercase());
    }

    /// Sets a metadata field.
    pub fn stamp(&mut self, field: &str, value: impl Into<String>) {
        self.metadata
            .fields
            .insert(field.to_ascii_lowercase(), value.into());
    }
}

/// A reply the plugin sends instead of letting the message go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A plain-text reply.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.into().into_bytes(),
        }
    }

    /// A JSON reply.
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }
}

/// What a handler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Let the message go on, as changed.
    Continue(Message),
    /// Answer the client instead.
    Reply(Reply),
}

impl From<Message> for Outcome {
    fn from(message: Message) -> Outcome {
        Outcome::Continue(message)
    }
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Outcome {
        Outcome::Reply(reply)
    }
}

/// A handler's failure: the client gets `status` (500 unless set) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The status the client gets.
    pub status: u16,
    /// What went wrong (logged, and the reply's body).
    pub message: String,
}

impl Error {
    /// A failure answered with 500.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            status: 500,
            message: message.into(),
        }
    }

    /// A failure answered with `status`.
    pub fn with_status(status: u16, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for Error {}

/// The trace id of a W3C `traceparent` (`00-TRACEID-SPANID-FLAGS`), if valid.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(trace, 32) && hex(span, 16) && trace != "00000000000000000000000000000000")
        .then_some(trace)
}

/// RFC 3339 text (UTC, milliseconds) of a time in nanoseconds since the Unix epoch.
pub fn rfc3339(unix_nanos: u64) -> String {
    let secs = unix_nanos / 1_000_000_000;
    let millis = (unix_nanos / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        (rest / 60) % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_only_when_the_content_type_says_so() {
        let json = br#"{"card": "4111"}"#.to_vec();
        assert!(matches!(
            Data::from_body(Some("application/json; charset=utf-8"), json.clone()),
            Data::Json(_)
        ));
        assert!(matches!(
            Data::from_body(Some("application/problem+json"), json.clone()),
            Data::Json(_)
        ));
        assert!(matches!(
            Data::from_body(Some("text/plain"), json.clone()),
            Data::Bytes(_)
        ));
        assert!(matches!(
            Data::from_body(Some("application/json"), b"{not json".to_vec()),
            Data::Bytes(_)
        ));
        assert_eq!(Data::from_body(None, Vec::new()), Data::Empty);
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_780_000_000_123_000_000),
            "2026-05-28T20:26:40.123Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }
}
