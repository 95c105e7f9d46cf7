//! Header edits of a route (Envoy's `request_headers_to_add/remove` and
//! `response_headers_to_add/remove`, merged from the route, its virtual host and its route
//! configuration), with the `%…%` variables users reach for most.
//!
//! Pure data and rendering: the request phases apply the edits to pingora's header maps.

use http::header::{HeaderName, HeaderValue};
use std::fmt::Write as _;

/// A request header's value by name.
pub type HeaderLookup<'a> = dyn Fn(&HeaderName) -> Option<String> + 'a;

/// What a value's `%…%` variables are filled from, for one request.
#[derive(Clone, Copy, Default)]
pub struct Vars<'a> {
    /// The client's address (`ip:port`).
    pub downstream_remote: Option<std::net::SocketAddr>,
    /// The proxy's address the client connected to.
    pub downstream_local: Option<std::net::SocketAddr>,
    /// The upstream endpoint of the current try.
    pub upstream_host: Option<std::net::SocketAddr>,
    /// When the request started.
    pub start_time: Option<std::time::SystemTime>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// Looks a request header up (for `%REQ(name)%`).
    pub request_header: Option<&'a HeaderLookup<'a>>,
}

impl std::fmt::Debug for Vars<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vars")
            .field("downstream_remote", &self.downstream_remote)
            .field("upstream_host", &self.upstream_host)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// One piece of a header value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    UpstreamHost,
    StartTime,
    Protocol,
    Request(HeaderName),
}

/// A header value with Envoy's `%VARIABLE%` substitutions (`%%` is a literal `%`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueTemplate {
    pieces: Vec<Piece>,
}

impl ValueTemplate {
    /// Parses a value; an unknown or unclosed variable is an error naming it.
    pub fn parse(text: &str) -> Result<ValueTemplate, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            if let Some(tail) = after.strip_prefix('%') {
                literal.push('%');
                rest = tail;
                continue;
            }
            let end = after
                .find('%')
                .ok_or_else(|| format!("unclosed variable in {text:?}"))?;
            let name = &after[..end];
            let piece = match name {
                "DOWNSTREAM_REMOTE_ADDRESS" => Piece::DownstreamRemoteAddress,
                "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
                    Piece::DownstreamRemoteAddressWithoutPort
                }
                "DOWNSTREAM_LOCAL_ADDRESS" => Piece::DownstreamLocalAddress,
                "UPSTREAM_HOST" => Piece::UpstreamHost,
                "START_TIME" => Piece::StartTime,
                "PROTOCOL" => Piece::Protocol,
                _ => match name.strip_prefix("REQ(").and_then(|n| n.strip_suffix(')')) {
                    Some(header) => Piece::Request(
                        HeaderName::from_bytes(header.as_bytes())
                            .map_err(|_| format!("%{name}%: {header:?} is not a header name"))?,
                    ),
                    None => {
                        return Err(format!(
                            "%{name}% is not a supported variable (supported: {})",
                            nip_xds::config::HEADER_VARIABLES.join(", ")
                        ))
                    }
                },
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(piece);
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(ValueTemplate { pieces })
    }

    /// Whether the value uses no variable (it can be built once).
    pub fn literal(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// The value for one request (a variable without a value renders empty, as Envoy's
    /// `-` would be wrong in a header).
    pub fn render(&self, vars: &Vars<'_>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::DownstreamRemoteAddress => {
                    if let Some(a) = vars.downstream_remote {
                        let _ = write!(out, "{a}");
                    }
                }
                Piece::DownstreamRemoteAddressWithoutPort => {
                    if let Some(a) = vars.downstream_remote {
                        let _ = write!(out, "{}", a.ip());
                    }
                }
                Piece::DownstreamLocalAddress => {
                    if let Some(a) = vars.downstream_local {
                        let _ = write!(out, "{a}");
                    }
                }
                Piece::UpstreamHost => {
                    if let Some(a) = vars.upstream_host {
                        let _ = write!(out, "{a}");
                    }
                }
                Piece::StartTime => {
                    if let Some(t) = vars.start_time {
                        out.push_str(&httpdate::fmt_http_date(t));
                    }
                }
                Piece::Protocol => out.push_str(vars.protocol),
                Piece::Request(name) => {
                    if let Some(value) = vars.request_header.and_then(|lookup| lookup(name)) {
                        out.push_str(&value);
                    }
                }
            }
        }
        out
    }
}

/// How an added header meets one already there (Envoy's `HeaderValueOption.append_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// Another value next to any existing (`APPEND_IF_EXISTS_OR_ADD`, Envoy's default).
    Append,
    /// Only when the header is absent (`ADD_IF_ABSENT`).
    AddIfAbsent,
    /// Replaces any existing values (`OVERWRITE_IF_EXISTS_OR_ADD`).
    Overwrite,
    /// Replaces existing values, adds nothing when absent (`OVERWRITE_IF_EXISTS`).
    OverwriteIfExists,
}

/// One header to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderAdd {
    /// The header.
    pub name: HeaderName,
    /// Its value.
    pub value: ValueTemplate,
    /// How it meets existing values.
    pub action: AppendAction,
    /// Add it even when the value renders empty (`keep_empty_value`).
    pub keep_empty_value: bool,
}

impl HeaderAdd {
    /// The rendered value, or `None` when it is empty and empty values are not kept or it is
    /// not a valid header value.
    pub fn value_for(&self, vars: &Vars<'_>) -> Option<HeaderValue> {
        let text = self.value.render(vars);
        if text.is_empty() && !self.keep_empty_value {
            return None;
        }
        HeaderValue::from_str(&text).ok()
    }
}

/// The header edits of one direction: removals first, then additions in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Headers removed.
    pub remove: Vec<HeaderName>,
    /// Headers added.
    pub add: Vec<HeaderAdd>,
}

impl HeaderEdits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// These edits followed by `outer`'s (a route's, then its virtual host's, then its route
    /// configuration's, as Envoy applies them).
    pub fn then(mut self, outer: &HeaderEdits) -> HeaderEdits {
        self.remove.extend(outer.remove.iter().cloned());
        self.add.extend(outer.add.iter().cloned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_render_envoys_variables() {
        let t = ValueTemplate::parse("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% via %UPSTREAM_HOST% (%PROTOCOL%) 100%% %REQ(x-request-id)%").unwrap();
        let lookup = |name: &HeaderName| (name == "x-request-id").then(|| "abc".to_string());
        let vars = Vars {
            downstream_remote: Some("10.0.0.1:5555".parse().unwrap()),
            upstream_host: Some("127.0.0.1:8081".parse().unwrap()),
            protocol: "HTTP/1.1",
            request_header: Some(&lookup),
            ..Vars::default()
        };
        assert_eq!(
            t.render(&vars),
            "10.0.0.1 via 127.0.0.1:8081 (HTTP/1.1) 100% abc"
        );
        assert_eq!(
            ValueTemplate::parse("plain").unwrap().literal(),
            Some("plain")
        );
        let time = ValueTemplate::parse("%START_TIME%").unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        let rendered = time.render(&Vars {
            start_time: Some(at),
            ..Vars::default()
        });
        assert_eq!(rendered, "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn unknown_and_unclosed_variables_are_refused_by_name() {
        assert!(ValueTemplate::parse("%HOSTNAME%")
            .unwrap_err()
            .contains("%HOSTNAME% is not a supported variable"));
        assert!(ValueTemplate::parse("50% off")
            .unwrap_err()
            .contains("unclosed"));
        assert!(ValueTemplate::parse("%REQ(bad header)%").is_err());
    }
}
