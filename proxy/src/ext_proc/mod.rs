//! Envoy's external processing filter (`ext_proc`): a route's process plugins, each a
//! gRPC `ExternalProcessor` service in a process of its own (what NIP's Python and Go
//! SDKs serve). One bidirectional stream per request and processor:
//!
//! ```text
//! request head ─▶ request_headers ─▶ answer: header mutations | immediate response
//! request body ─▶ request_body    ─▶ answer: body and header mutations  (whole, or per chunk)
//! response head ─▶ response_headers ─▶ answer: header mutations | immediate response
//! response body ─▶ response_body  ─▶ answer: body mutation           (whole, or per chunk)
//! response trailers ─▶ response_trailers ─▶ answer: trailer mutations
//! ```
//!
//! [`ExtProc`] is one compiled filter (`compile` makes it from `ExternalProcessor`);
//! [`client`] runs the streams on a runtime of their own, so that the response body —
//! which pingora filters synchronously — can wait for its answer without stalling the
//! streams themselves. `http/ext_proc.rs` drives a request through a route's processors.

pub mod client;

use envoy_types::pb::envoy::service::ext_proc::v3::{CommonResponse, HeaderMutation};
use http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use std::time::Duration;

/// Which parts of a request the processor gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessingMode {
    /// `request_header_mode: SEND`.
    pub request_headers: bool,
    /// `response_header_mode: SEND`.
    pub response_headers: bool,
    /// `request_body_mode`.
    pub request_body: BodyMode,
    /// `response_body_mode`.
    pub response_body: BodyMode,
    /// `response_trailer_mode: SEND`.
    pub response_trailers: bool,
}

/// How a processor gets a body (Envoy's `BodySendMode`, the modes NIP runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// `NONE`: the body goes past the processor.
    None,
    /// `BUFFERED`: the whole body in one message (bounded by `max_body_bytes`).
    Buffered,
    /// `STREAMED`: each chunk as it arrives, answered before it goes on.
    Streamed,
}

impl BodyMode {
    /// Whether the processor gets the body at all.
    pub fn sends(self) -> bool {
        self != BodyMode::None
    }
}

/// Counters of one processor.
#[derive(Debug, Clone, Default)]
pub struct ExtProcCounters {
    /// Messages answered.
    pub ok: Counter,
    /// Messages that got no usable answer (stream failed, timeout, a bad answer).
    pub failed: Counter,
    /// Requests the processor answered itself (`immediate_response`).
    pub immediate: Counter,
}

/// One `ext_proc` filter, compiled.
#[derive(Debug)]
pub struct ExtProc {
    /// Its `http_filters` name.
    pub name: String,
    /// The cluster serving `ExternalProcessor`.
    pub cluster: String,
    /// `:authority` of the gRPC stream.
    pub authority: String,
    /// gRPC metadata sent on each stream (`grpc_service.initial_metadata`).
    pub initial_metadata: Vec<(String, String)>,
    /// How long each answer may take (`message_timeout`).
    pub timeout: Duration,
    /// Go on without the processor when it cannot answer (else 500).
    pub failure_mode_allow: bool,
    /// What it gets.
    pub mode: ProcessingMode,
    /// Properties sent with the request head (`request_attributes`).
    pub attributes: Vec<String>,
    /// Which headers it may change (`mutation_rules`).
    pub rules: MutationRules,
    /// The most body bytes buffered for it.
    pub max_body_bytes: usize,
    /// Its counters.
    pub stats: ExtProcCounters,
}

/// What a processor's answer to one message asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Headers to set (or add, with `append`).
    pub set: Vec<(HeaderName, HeaderValue, bool)>,
    /// Headers to remove.
    pub remove: Vec<HeaderName>,
    /// A new `:path` (request head).
    pub path: Option<String>,
    /// A new `:status` (response head).
    pub status: Option<u16>,
    /// The new body, if it replaces the body (empty: cleared).
    pub body: Option<bytes::Bytes>,
}

/// Which headers a processor may change (Envoy's `HeaderMutationRules`; the defaults:
/// not the routing headers `host`, `:authority`, `:scheme`, `:method`, not `x-envoy-*`,
/// no pseudo-headers but `:path` and `:status`).
#[derive(Debug, Clone, Default)]
pub struct MutationRules {
    /// `allow_all_routing`.
    pub allow_all_routing: bool,
    /// `allow_envoy`.
    pub allow_envoy: bool,
    /// `disallow_system`: no pseudo-header, no `host`.
    pub disallow_system: bool,
    /// `disallow_all`.
    pub disallow_all: bool,
    /// `allow_expression` (whole-name match).
    pub allow_expression: Option<regex::Regex>,
    /// `disallow_expression` (whole-name match).
    pub disallow_expression: Option<regex::Regex>,
    /// `disallow_is_error`: a disallowed change fails the message instead of being
    /// left out.
    pub disallow_is_error: bool,
}

impl MutationRules {
    /// Whether a processor may change header `name` (lower case), in Envoy's order.
    pub fn allows(&self, name: &str) -> bool {
        if self.disallow_all {
            return false;
        }
        if self
            .disallow_expression
            .as_ref()
            .is_some_and(|r| r.is_match(name))
        {
            return false;
        }
        if self
            .allow_expression
            .as_ref()
            .is_some_and(|r| r.is_match(name))
        {
            return true;
        }
        let routing = matches!(name, "host" | ":authority" | ":scheme" | ":method");
        if name.starts_with(':') || name == "host" {
            if self.disallow_system {
                return false;
            }
            if routing {
                return self.allow_all_routing;
            }
            return name == ":path" || name == ":status";
        }
        if name.starts_with("x-envoy") {
            return self.allow_envoy;
        }
        true
    }
}

impl Mutations {
    /// Reads a `CommonResponse`; changes to headers `rules` do not allow are left out
    /// (Envoy's default) or, with `disallow_is_error`, fail the message (naming the
    /// header); invalid names or values are left out.
    pub fn of(
        response: Option<&CommonResponse>,
        rules: &MutationRules,
    ) -> Result<Mutations, String> {
        let mut out = Mutations::default();
        let Some(response) = response else {
            return Ok(out);
        };
        if let Some(headers) = &response.header_mutation {
            out.add_headers(headers, rules)?;
        }
        use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
        match response
            .body_mutation
            .as_ref()
            .and_then(|m| m.mutation.as_ref())
        {
            Some(Mutation::Body(body)) => out.body = Some(bytes::Bytes::from(body.clone())),
            Some(Mutation::ClearBody(true)) => out.body = Some(bytes::Bytes::new()),
            _ => {}
        }
        Ok(out)
    }

    /// Adds a `HeaderMutation` under `rules`.
    pub fn add_headers(
        &mut self,
        headers: &HeaderMutation,
        rules: &MutationRules,
    ) -> Result<(), String> {
        let refused = |key: &str| {
            if rules.disallow_is_error {
                Err(format!("the processor may not change {key:?}"))
            } else {
                Ok(())
            }
        };
        use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
        for option in &headers.set_headers {
            let Some(header) = &option.header else {
                continue;
            };
            let key = header.key.to_ascii_lowercase();
            if !rules.allows(&key) {
                refused(&key)?;
                continue;
            }
            let raw = if header.raw_value.is_empty() {
                header.value.as_bytes()
            } else {
                header.raw_value.as_slice()
            };
            match key.as_str() {
                ":path" => {
                    let path = String::from_utf8_lossy(raw);
                    if path.starts_with('/') && http::uri::PathAndQuery::try_from(&*path).is_ok() {
                        self.path = Some(path.into_owned());
                    }
                    continue;
                }
                ":status" => {
                    self.status = std::str::from_utf8(raw)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .filter(|s| (200..600).contains(s));
                    continue;
                }
                _ => {}
            }
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(key.as_bytes()),
                HeaderValue::from_bytes(raw),
            ) else {
                continue;
            };
            #[allow(deprecated)] // `append`: the older field, still honoured
            let append = option.append.as_ref().is_some_and(|a| a.value)
                || option.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32;
            self.set.push((name, value, append));
        }
        for key in &headers.remove_headers {
            let key = key.to_ascii_lowercase();
            if !rules.allows(&key) || key.starts_with(':') {
                refused(&key)?;
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(key.as_bytes()) {
                self.remove.push(name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue as XdsValue, HeaderValueOption};
    use envoy_types::pb::envoy::service::ext_proc::v3::{body_mutation, BodyMutation};

    fn set(key: &str, value: &str) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(XdsValue {
                key: key.into(),
                raw_value: value.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn routing_headers_are_not_for_processors_to_change() {
        let response = CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![
                    set("X-Tier", "gold"),
                    set(":path", "/v2"),
                    set("host", "evil.example"),
                    set(":authority", "evil.example"),
                    set(":method", "DELETE"),
                    set("bad name", "x"),
                ],
                remove_headers: vec!["x-drop".into(), "Host".into(), ":path".into()],
            }),
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(b"new".to_vec())),
            }),
            ..Default::default()
        };
        let m = Mutations::of(Some(&response), &MutationRules::default()).unwrap();
        let names: Vec<&str> = m.set.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["x-tier"]);
        assert_eq!(m.path.as_deref(), Some("/v2"));
        assert_eq!(m.remove, [HeaderName::from_static("x-drop")]);
        assert_eq!(m.body.as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn mutation_rules_follow_envoys_order() {
        let default = MutationRules::default();
        assert!(default.allows("x-tier") && default.allows(":path"));
        assert!(!default.allows("host") && !default.allows(":method"));
        assert!(!default.allows("x-envoy-retry-on"));
        let routing = MutationRules {
            allow_all_routing: true,
            allow_envoy: true,
            ..Default::default()
        };
        assert!(routing.allows("host") && routing.allows(":method") && routing.allows("x-envoy-a"));
        let system = MutationRules {
            disallow_system: true,
            allow_all_routing: true,
            ..Default::default()
        };
        assert!(!system.allows(":path") && !system.allows("host") && system.allows("x-a"));
        let expressions = MutationRules {
            allow_expression: Some(regex::Regex::new("^(?:host)$").unwrap()),
            disallow_expression: Some(regex::Regex::new("^(?:x-secret-.*)$").unwrap()),
            ..Default::default()
        };
        assert!(expressions.allows("host") && !expressions.allows("x-secret-key"));
        let none = MutationRules {
            disallow_all: true,
            allow_expression: Some(regex::Regex::new("^(?:.*)$").unwrap()),
            ..Default::default()
        };
        assert!(!none.allows("x-a"));
        // A refused change fails the message when the rules say so.
        let strict = MutationRules {
            disallow_is_error: true,
            ..Default::default()
        };
        let response = CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![set("host", "evil.example")],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(Mutations::of(Some(&response), &strict)
            .unwrap_err()
            .contains("\"host\""));
        assert!(Mutations::of(Some(&response), &default)
            .unwrap()
            .set
            .is_empty());
    }
}
