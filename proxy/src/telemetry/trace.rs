//! Request tracing: W3C trace context in, OpenTelemetry spans out.
//!
//! ```text
//! request head ─▶ RequestTrace::start (continue the client's traceparent or start one;
//!                 sample: its flag, else the ratio)
//! each upstream try ─▶ a client span; the upstream gets traceparent naming it
//! log phase ─▶ RequestTrace::finish ─▶ spans (server + one client span per try, plugin
//!              time as events) ─▶ the exporter's bounded queue (otlp.rs)
//! ```
//!
//! Spans are built once, when the request ends, from what the request recorded (ids and
//! times): a request that is not exported costs a sampling decision and, when errors are
//! always traced, a few ids. Nothing here blocks.

use super::otlp::SpanExport;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::SystemTime;

/// A W3C `traceparent`: whose trace, which span, sampled or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The parent span.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

impl TraceParent {
    /// Reads a `traceparent` header (version `00`, or a later version's first four
    /// fields, as the spec says); `None` when it is not valid (all-zero ids included).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let version_ok = version
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        let trace_id: [u8; 16] = hex(trace)?;
        let span_id: [u8; 8] = hex(span)?;
        let flags: [u8; 1] = hex(flags)?;
        if !version_ok || trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The header value (`00-TRACE-SPAN-FLAGS`).
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }
}

/// Lower-case hex of exactly `N` bytes.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        for chunk in id.chunks_mut(8) {
            let random = fastrand::u64(..).to_le_bytes();
            chunk.copy_from_slice(&random[..chunk.len()]);
        }
        if id != [0; N] {
            return id;
        }
    }
}

/// How a connection manager traces (Envoy's `HttpConnectionManager.tracing` with the
/// OpenTelemetry provider).
#[derive(Debug)]
pub struct Tracing {
    /// The share of requests that start a sampled trace (`random_sampling`, capped by
    /// `overall_sampling`), 0–1.
    pub sampling: f64,
    /// A client's `traceparent` decides for its request (its `sampled` flag).
    pub parent_based: bool,
    /// Requests that end in a 5xx or fail are exported even when not sampled.
    pub errors: bool,
    /// A client span per upstream try (`spawn_upstream_span`); without it the upstream is
    /// told the server span.
    pub upstream_spans: bool,
    /// The longest `url.path` recorded (`max_path_tag_length`).
    pub max_path_length: usize,
    /// Where spans go.
    pub export: SpanExport,
}

impl Tracing {
    /// The request's trace, if this request has one: a client's `traceparent` is
    /// continued; a trace that can be neither sampled nor exported as an error is not
    /// started (the client's header goes upstream as it came).
    pub fn start(&self, traceparent: Option<&[u8]>, start: SystemTime) -> Option<RequestTrace> {
        let parent = traceparent.and_then(TraceParent::parse);
        let sampled = match parent {
            Some(parent) if self.parent_based => parent.sampled,
            _ => self.sampling >= 1.0 || (self.sampling > 0.0 && fastrand::f64() < self.sampling),
        };
        if !sampled && !self.errors {
            return None;
        }
        Some(RequestTrace {
            trace_id: parent.map_or_else(random_id, |p| p.trace_id),
            span_id: random_id(),
            parent: parent.map(|p| p.span_id),
            sampled,
            start,
            tries: Vec::new(),
            events: Vec::new(),
        })
    }
}

/// One request's trace, from its head to its log line.
#[derive(Debug)]
pub struct RequestTrace {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The server span (this proxy's part of the request).
    pub span_id: [u8; 8],
    /// The client's span, when it sent a `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// Exported whatever the outcome.
    pub sampled: bool,
    start: SystemTime,
    tries: Vec<UpstreamTry>,
    events: Vec<(Cow<'static, str>, SystemTime, u64)>,
}

/// One try at the upstream.
#[derive(Debug)]
struct UpstreamTry {
    span_id: [u8; 8],
    start: SystemTime,
    end: Option<SystemTime>,
    peer: Option<SocketAddr>,
    status: Option<u16>,
    error: Option<String>,
}

/// What the request was, for the server span's attributes.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// Method.
    pub method: &'a str,
    /// Path (query left out).
    pub path: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// `:authority` / Host.
    pub authority: &'a str,
    /// `1.1` or `2`.
    pub protocol_version: &'static str,
    /// The client.
    pub client: Option<SocketAddr>,
    /// User agent.
    pub user_agent: &'a str,
    /// The route (its name).
    pub route: &'a str,
    /// The cluster.
    pub cluster: &'a str,
    /// The answer's status (0: none sent).
    pub status: u16,
    /// Envoy's response flag, when the request did not go as planned.
    pub flag: Option<&'a str>,
    /// The request id.
    pub request_id: &'a str,
}

impl RequestTrace {
    /// The trace id, hex (the access log's `trace_id`).
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// A new try at the upstream (with upstream spans: a client span of its own).
    pub fn begin_try(&mut self, peer: Option<SocketAddr>, upstream_spans: bool) {
        self.end_try(None, Some("superseded by another try"));
        if upstream_spans {
            self.tries.push(UpstreamTry {
                span_id: random_id(),
                start: SystemTime::now(),
                end: None,
                peer,
                status: None,
                error: None,
            });
        }
    }

    /// The `traceparent` the current try carries: its client span, or the server span
    /// without upstream spans.
    pub fn traceparent(&self) -> String {
        let span_id = match self.tries.last() {
            Some(current) if current.end.is_none() => current.span_id,
            _ => self.span_id,
        };
        TraceParent {
            trace_id: self.trace_id,
            span_id,
            sampled: self.sampled,
        }
        .header()
    }

    /// Ends the current try with the upstream's status or why it failed (a no-op once
    /// it ended).
    pub fn end_try(&mut self, status: Option<u16>, error: Option<&str>) {
        if let Some(current) = self.tries.last_mut().filter(|t| t.end.is_none()) {
            current.end = Some(SystemTime::now());
            current.status = status;
            current.error = error.map(str::to_string);
        }
    }

    /// Records time spent in a phase's filters (a span event with its duration).
    pub fn event(&mut self, name: &'static str, start: SystemTime, micros: u64) {
        if self.events.len() < 32 {
            self.events.push((Cow::Borrowed(name), start, micros));
        }
    }

    /// Ends the trace: its spans go to the exporter when it was sampled, or when it is an
    /// error and `tracing` exports errors.
    pub fn finish(mut self, tracing: &Tracing, facts: &RequestFacts<'_>) {
        let failed = facts.status >= 500 || facts.status == 0 || facts.flag.is_some();
        if !(self.sampled || (tracing.errors && failed)) {
            return;
        }
        let end = SystemTime::now();
        self.end_try(None, None);
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let trace_id = TraceId::from_bytes(self.trace_id);
        let context = |span: [u8; 8]| {
            SpanContext::new(
                trace_id,
                SpanId::from_bytes(span),
                flags,
                false,
                TraceState::default(),
            )
        };
        let scope = InstrumentationScope::builder("nip").build();
        let path: &str = match facts.path.char_indices().nth(tracing.max_path_length) {
            Some((cut, _)) => &facts.path[..cut],
            None => facts.path,
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", facts.method.to_string()),
            KeyValue::new("url.path", path.to_string()),
            KeyValue::new("url.scheme", facts.scheme.to_string()),
            KeyValue::new("server.address", facts.authority.to_string()),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", facts.protocol_version),
            KeyValue::new("user_agent.original", facts.user_agent.to_string()),
            KeyValue::new("http.route", facts.route.to_string()),
            KeyValue::new("nip.request_id", facts.request_id.to_string()),
            KeyValue::new("nip.upstream_cluster", facts.cluster.to_string()),
        ];
        if facts.status > 0 {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(facts.status),
            ));
        }
        if let Some(client) = facts.client {
            attributes.push(KeyValue::new("client.address", client.ip().to_string()));
            attributes.push(KeyValue::new("client.port", i64::from(client.port())));
        }
        if let Some(flag) = facts.flag {
            attributes.push(KeyValue::new("nip.response_flags", flag.to_string()));
        }
        if failed {
            attributes.push(KeyValue::new(
                "error.type",
                facts
                    .flag
                    .map_or_else(|| facts.status.to_string(), str::to_string),
            ));
        }
        let status = if failed {
            Status::error(facts.flag.unwrap_or("5xx").to_string())
        } else {
            Status::Unset
        };
        let mut events = SpanEvents::default();
        events.events = std::mem::take(&mut self.events)
            .into_iter()
            .map(|(name, at, micros)| {
                opentelemetry::trace::Event::new(
                    name,
                    at,
                    vec![KeyValue::new("duration_us", micros as i64)],
                    0,
                )
            })
            .collect();
        let server = SpanData {
            span_context: context(self.span_id),
            parent_span_id: self.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: self.parent.is_some(),
            span_kind: SpanKind::Server,
            name: Cow::Owned(format!("{} {}", facts.method, route_or_path(facts))),
            start_time: self.start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status,
            instrumentation_scope: scope.clone(),
        };
        tracing.export.push(server);
        for (resend, attempt) in self.tries.iter().enumerate() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", facts.method.to_string()),
                KeyValue::new("nip.upstream_cluster", facts.cluster.to_string()),
            ];
            if resend > 0 {
                attributes.push(KeyValue::new("http.request.resend_count", resend as i64));
            }
            if let Some(peer) = attempt.peer {
                attributes.push(KeyValue::new("server.address", peer.ip().to_string()));
                attributes.push(KeyValue::new("server.port", i64::from(peer.port())));
            }
            if let Some(code) = attempt.status {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
            }
            let failed = attempt.error.is_some() || attempt.status.is_some_and(|s| s >= 500);
            if let Some(error) = &attempt.error {
                attributes.push(KeyValue::new("error.type", error.clone()));
            }
            tracing.export.push(SpanData {
                span_context: context(attempt.span_id),
                parent_span_id: SpanId::from_bytes(self.span_id),
                parent_span_is_remote: false,
                span_kind: SpanKind::Client,
                name: Cow::Owned(facts.method.to_string()),
                start_time: attempt.start,
                end_time: attempt.end.unwrap_or(end),
                attributes,
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: if failed {
                    Status::error(attempt.error.clone().unwrap_or_else(|| "5xx".into()))
                } else {
                    Status::Unset
                },
                instrumentation_scope: scope.clone(),
            });
        }
    }
}

/// The server span's name: method and route (low cardinality), else the path.
fn route_or_path<'a>(facts: &RequestFacts<'a>) -> &'a str {
    if facts.route.is_empty() {
        facts.path
    } else {
        facts.route
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::otlp::SpanQueue;
    use std::sync::Arc;

    #[test]
    fn traceparents_are_read_as_the_w3c_spec_says() {
        let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(good).unwrap();
        assert!(parent.sampled);
        assert_eq!(to_hex(&parent.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.header(), std::str::from_utf8(good).unwrap());
        // A later version may append fields; version 00 may not.
        assert!(TraceParent::parse(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
        )
        .is_some_and(|p| !p.sampled));
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"[..],
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"garbage",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tries_get_spans_of_their_own_and_the_upstream_is_told_them() {
        let queue = Arc::new(SpanQueue::for_tests(16));
        let tracing = Tracing {
            sampling: 1.0,
            parent_based: true,
            errors: false,
            upstream_spans: true,
            max_path_length: 4,
            export: SpanExport::into_queue(Arc::clone(&queue)),
        };
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut trace = tracing.start(Some(parent), SystemTime::now()).unwrap();
        assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        trace.begin_try(None, true);
        let first = trace.traceparent();
        trace.end_try(Some(503), None);
        trace.begin_try(None, true);
        let second = trace.traceparent();
        assert_ne!(first, second);
        let told = TraceParent::parse(second.as_bytes()).unwrap();
        assert_eq!(told.trace_id, trace.trace_id);
        let facts = RequestFacts {
            method: "GET",
            path: "/abcdef",
            scheme: "http",
            authority: "a",
            protocol_version: "1.1",
            client: None,
            user_agent: "",
            route: "",
            cluster: "web",
            status: 200,
            flag: None,
            request_id: "r",
        };
        let server_span = trace.span_id;
        trace.finish(&tracing, &facts);
        let spans = queue.drain_for_tests();
        assert_eq!(spans.len(), 3);
        assert_eq!(spans[0].span_kind, SpanKind::Server);
        assert_eq!(
            spans[0].parent_span_id,
            SpanId::from_bytes([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(spans[0]
            .attributes
            .contains(&KeyValue::new("url.path", "/abc")));
        for client in &spans[1..] {
            assert_eq!(client.span_kind, SpanKind::Client);
            assert_eq!(client.parent_span_id, SpanId::from_bytes(server_span));
        }
        assert_eq!(
            spans[2].span_context.span_id(),
            SpanId::from_bytes(told.span_id)
        );
        assert!(spans[2]
            .attributes
            .contains(&KeyValue::new("http.request.resend_count", 1)));
    }

    #[test]
    fn unsampled_requests_are_exported_only_as_errors_when_asked() {
        let queue = Arc::new(SpanQueue::for_tests(16));
        let mut tracing = Tracing {
            sampling: 0.0,
            parent_based: true,
            errors: false,
            upstream_spans: true,
            max_path_length: 256,
            export: SpanExport::into_queue(Arc::clone(&queue)),
        };
        assert!(tracing.start(None, SystemTime::now()).is_none());
        // A sampled parent decides (parent-based); an unsampled one too.
        let sampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(tracing.start(Some(sampled), SystemTime::now()).is_some());
        tracing.errors = true;
        let facts = |status| RequestFacts {
            method: "GET",
            path: "/",
            scheme: "http",
            authority: "a",
            protocol_version: "1.1",
            client: None,
            user_agent: "",
            route: "r",
            cluster: "c",
            status,
            flag: None,
            request_id: "r",
        };
        let trace = tracing.start(None, SystemTime::now()).unwrap();
        assert!(!trace.sampled);
        trace.finish(&tracing, &facts(200));
        assert!(queue.drain_for_tests().is_empty());
        let trace = tracing.start(None, SystemTime::now()).unwrap();
        trace.finish(&tracing, &facts(503));
        let spans = queue.drain_for_tests();
        assert_eq!(spans.len(), 1);
        assert!(!spans[0].span_context.is_sampled());
        assert_eq!(spans[0].name, "GET r");
    }
}
