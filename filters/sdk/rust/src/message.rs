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
//! A returned message changes what it changed: headers, body, the path of a request, the
//! status of a response, the priority and the metadata fields (as their headers). The
//! parts are read from the proxy when the handler first asks for them ([`Message`]).

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

/// Where a message's parts come from: the host (a request or response in flight), or
/// values given up front ([`Message::detached`], for tests and tools).
pub(crate) trait Parts {
    fn headers(&self) -> Vec<(String, String)>;
    fn request_headers(&self) -> Vec<(String, String)>;
    fn body(&self) -> Vec<u8>;
    fn property(&self, path: &[&str]) -> Option<String>;
    fn arrived_nanos(&self) -> u64;
}

/// The parts of a message read from its headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Head {
    pub headers: BTreeMap<String, String>,
    pub fields: BTreeMap<String, String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub status: Option<u16>,
}

/// The parts of a message the host knows about the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Facts {
    pub id: String,
    pub timestamp: String,
    pub correlation_id: String,
    pub source: Source,
    pub tenant: Option<String>,
    pub principal: Option<String>,
    pub priority: String,
    pub retry_count: u32,
}

/// One request or response, as the plugin sees it (`MESSAGE.md` says how each part is
/// made). Parts are read from the proxy when first asked for, so a handler pays only for
/// what it looks at; what it changes is written back when it returns the message.
pub struct Message {
    kind: MessageType,
    source: Box<dyn Parts>,
    head: std::cell::OnceCell<Head>,
    facts: std::cell::OnceCell<Facts>,
    data: std::cell::OnceCell<Data>,
    /// The head as read, kept once the handler changes it.
    pub(crate) original_head: Option<Head>,
    pub(crate) original_priority: Option<String>,
    pub(crate) data_changed: bool,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A source of fixed parts ([`Message::detached`]).
struct Detached {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Parts for Detached {
    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
    fn request_headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
    fn body(&self) -> Vec<u8> {
        self.body.clone()
    }
    fn property(&self, _path: &[&str]) -> Option<String> {
        None
    }
    fn arrived_nanos(&self) -> u64 {
        0
    }
}

impl Message {
    pub(crate) fn new(kind: MessageType, source: Box<dyn Parts>) -> Message {
        Message {
            kind,
            source,
            head: std::cell::OnceCell::new(),
            facts: std::cell::OnceCell::new(),
            data: std::cell::OnceCell::new(),
            original_head: None,
            original_priority: None,
            data_changed: false,
        }
    }

    /// A message of given headers (pseudo-headers included) and body, outside any proxy:
    /// for testing a handler.
    pub fn detached(kind: MessageType, headers: &[(&str, &str)], body: &[u8]) -> Message {
        Message::new(
            kind,
            Box::new(Detached {
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
                    .collect(),
                body: body.to_vec(),
            }),
        )
    }

    /// Request or response.
    pub fn kind(&self) -> MessageType {
        self.kind
    }

    fn head(&self) -> &Head {
        self.head.get_or_init(|| read_head(self.source.headers()))
    }

    fn head_mut(&mut self) -> &mut Head {
        self.head();
        if self.original_head.is_none() {
            self.original_head = self.head.get().cloned();
        }
        self.head.get_mut().expect("read above")
    }

    fn facts(&self) -> &Facts {
        self.facts.get_or_init(|| read_facts(&*self.source))
    }

    /// The request id.
    pub fn id(&self) -> &str {
        &self.facts().id
    }

    /// When the request arrived (RFC 3339, UTC).
    pub fn timestamp(&self) -> &str {
        &self.facts().timestamp
    }

    /// The trace id, else the request id.
    pub fn correlation_id(&self) -> &str {
        &self.facts().correlation_id
    }

    /// Listener, route and client.
    pub fn source(&self) -> &Source {
        &self.facts().source
    }

    /// The tenant the proxy's policy named, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.facts().tenant.as_deref()
    }

    /// Who the request was authenticated as: a verified token's `iss/sub`, else the
    /// client certificate's identity.
    pub fn principal(&self) -> Option<&str> {
        self.facts().principal.as_deref()
    }

    /// The priority class (`low`, `normal`, `high`).
    pub fn priority(&self) -> &str {
        &self.facts().priority
    }

    /// Changes the priority class the upstream sees (`x-nip-priority`).
    pub fn set_priority(&mut self, priority: &str) {
        self.facts();
        if let Some(facts) = self.facts.get_mut() {
            if self.original_priority.is_none() {
                self.original_priority = Some(facts.priority.clone());
            }
            facts.priority = priority.to_string();
        }
    }

    /// How many times the sender retried this message.
    pub fn retry_count(&self) -> u32 {
        self.facts().retry_count
    }

    /// The headers (lower-case names; without pseudo-headers and the metadata's own).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.head().headers
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head()
            .headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Sets a header (the name is lower-cased).
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.head_mut()
            .headers
            .insert(name.to_ascii_lowercase(), value.into());
    }

    /// Removes a header.
    pub fn remove_header(&mut self, name: &str) {
        self.head_mut().headers.remove(&name.to_ascii_lowercase());
    }

    /// The metadata fields (`x-nip-meta-NAME` headers).
    pub fn fields(&self) -> &BTreeMap<String, String> {
        &self.head().fields
    }

    /// Sets a metadata field.
    pub fn stamp(&mut self, field: &str, value: impl Into<String>) {
        self.head_mut()
            .fields
            .insert(field.to_ascii_lowercase(), value.into());
    }

    /// Request method (requests).
    pub fn method(&self) -> Option<&str> {
        self.head().method.as_deref()
    }

    /// Request path with query (requests).
    pub fn path(&self) -> Option<&str> {
        self.head().path.as_deref()
    }

    /// Changes a request's path.
    pub fn set_path(&mut self, path: &str) {
        if self.kind == MessageType::Request {
            self.head_mut().path = Some(path.to_string());
        }
    }

    /// Response status (responses).
    pub fn status(&self) -> Option<u16> {
        self.head().status
    }

    /// Changes a response's status (applied when the handler runs on the head).
    pub fn set_status(&mut self, status: u16) {
        if self.kind == MessageType::Response {
            self.head_mut().status = Some(status);
        }
    }

    /// The body: JSON when the content type says JSON, else bytes.
    pub fn data(&self) -> &Data {
        self.data.get_or_init(|| {
            Data::from_body(
                self.head().headers.get("content-type").map(String::as_str),
                self.source.body(),
            )
        })
    }

    /// The body, to change it.
    pub fn data_mut(&mut self) -> &mut Data {
        self.data();
        self.data_changed = true;
        self.data.get_mut().expect("read above")
    }

    /// Replaces the body.
    pub fn set_data(&mut self, data: Data) {
        self.data_changed = true;
        let _ = self.data.take();
        let _ = self.data.set(data);
    }

    /// What the handler changed: the head (if it changed it) as read and as now.
    pub(crate) fn head_change(&self) -> Option<(&Head, &Head)> {
        Some((self.original_head.as_ref()?, self.head.get()?))
    }

    /// The new priority, if the handler changed it.
    pub(crate) fn priority_change(&self) -> Option<&str> {
        let original = self.original_priority.as_deref()?;
        let now = &self.facts.get()?.priority;
        (now != original).then_some(now.as_str())
    }

    /// The new body, if the handler changed it.
    pub(crate) fn data_change(&self) -> Option<&Data> {
        self.data_changed.then(|| self.data.get()).flatten()
    }
}

/// Splits headers into the message's head.
fn read_head(pairs: Vec<(String, String)>) -> Head {
    let mut head = Head::default();
    for (name, value) in pairs {
        if let Some(pseudo) = name.strip_prefix(':') {
            match pseudo {
                "method" => head.method = Some(value),
                "path" => head.path = Some(value),
                "status" => head.status = value.parse().ok(),
                _ => {}
            }
        } else if let Some(field) = name.strip_prefix(META_HEADER_PREFIX) {
            head.fields.insert(field.to_string(), value);
        } else {
            head.headers
                .entry(name)
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert(value);
        }
    }
    head
}

/// Reads what the host knows about the request.
fn read_facts(source: &dyn Parts) -> Facts {
    let request = source.request_headers();
    let request_header = |name: &str| {
        request
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let id = source
        .property(&["request", "id"])
        .or_else(|| request_header("x-request-id"))
        .unwrap_or_default();
    Facts {
        correlation_id: request_header("traceparent")
            .as_deref()
            .and_then(trace_id)
            .map(str::to_string)
            .unwrap_or_else(|| id.clone()),
        id,
        timestamp: rfc3339(source.arrived_nanos()),
        source: Source {
            listener: source.property(&["listener_name"]).unwrap_or_default(),
            route: source.property(&["route_name"]).unwrap_or_default(),
            address: source.property(&["source", "address"]).unwrap_or_default(),
        },
        tenant: source.property(&["nip", "tenant"]),
        principal: source.property(&["nip", "principal"]),
        priority: source
            .property(&["nip", "priority"])
            .or_else(|| request_header(PRIORITY_HEADER))
            .unwrap_or_else(|| "normal".into()),
        retry_count: request_header(RETRY_COUNT_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
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
#[derive(Debug)]
// Moved once per message: boxing the large variant would cost an allocation instead.
#[allow(clippy::large_enum_variant)]
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
    fn a_message_reads_its_head_and_tracks_what_changes() {
        let mut message = Message::detached(
            MessageType::Request,
            &[
                (":method", "POST"),
                (":path", "/orders"),
                ("content-type", "application/json"),
                ("x-nip-meta-origin", "web"),
                ("accept", "a"),
                ("accept", "b"),
            ],
            br#"{"card": "4111"}"#,
        );
        assert_eq!(message.method(), Some("POST"));
        assert_eq!(message.header("ACCEPT"), Some("a,b"));
        assert_eq!(
            message.fields().get("origin").map(String::as_str),
            Some("web")
        );
        assert!(message.head_change().is_none(), "reading changes nothing");
        assert!(message.data().as_json().is_some());
        assert!(message.data_change().is_none());
        message.stamp("checked", "yes");
        message.set_path("/v2/orders");
        let (before, after) = message.head_change().unwrap();
        assert_eq!(before.path.as_deref(), Some("/orders"));
        assert_eq!(after.path.as_deref(), Some("/v2/orders"));
        assert_eq!(after.fields.get("checked").map(String::as_str), Some("yes"));
        message.data_mut();
        assert!(message.data_change().is_some());
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
