//! What a route does besides picking a cluster: rewrite the forwarded path and host
//! (Envoy's `prefix_rewrite`, `regex_rewrite`, `host_rewrite_literal`, `auto_host_rewrite`),
//! or answer by itself (`redirect`, `direct_response`). Pure functions over the request's
//! path and host; the request phases apply them.

use bytes::Bytes;
use regex::Regex;

/// How the forwarded path changes.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// The matched prefix (or exact path) becomes this (`prefix_rewrite`).
    Prefix {
        /// What the route matched.
        matched: String,
        /// What replaces it.
        replacement: String,
    },
    /// Every match of `pattern` in the path is substituted (`regex_rewrite`; `\1` groups).
    Regex {
        /// The pattern.
        pattern: Regex,
        /// The substitution, in the `regex` crate's syntax (`${1}`).
        substitution: String,
    },
}

impl PathRewrite {
    /// The rewritten `path` (the query is kept apart by the caller).
    pub fn apply(&self, path: &str) -> String {
        match self {
            PathRewrite::Prefix {
                matched,
                replacement,
            } => match path.strip_prefix(matched.as_str()) {
                Some(rest) => format!("{replacement}{rest}"),
                None => path.to_string(),
            },
            PathRewrite::Regex {
                pattern,
                substitution,
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
        }
    }
}

/// Envoy's `\N` group references in a substitution, in the `regex` crate's `${N}`; a
/// literal `$` is escaped.
pub fn envoy_substitution(substitution: &str) -> String {
    let mut out = String::with_capacity(substitution.len());
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '\\' if chars.peek() == Some(&'\\') => {
                chars.next();
                out.push('\\');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// How the forwarded `Host` changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRewrite {
    /// To this (`host_rewrite_literal`).
    Literal(String),
    /// To the chosen endpoint's host name (`auto_host_rewrite`; unchanged for an endpoint
    /// given by IP without a `hostname`).
    Auto,
}

/// A redirect (Envoy's `RedirectAction`).
#[derive(Debug, Clone)]
pub struct Redirect {
    /// `https_redirect` / `scheme_redirect`.
    pub scheme: Option<String>,
    /// `host_redirect`.
    pub host: Option<String>,
    /// `port_redirect` (0: keep).
    pub port: u16,
    /// `path_redirect` (the whole path, may carry a query) or a rewrite of the path.
    pub path: Option<RedirectPath>,
    /// The status: 301 (default), 302, 303, 307, 308.
    pub status: u16,
    /// `strip_query`.
    pub strip_query: bool,
}

/// The path of a redirect.
#[derive(Debug, Clone)]
pub enum RedirectPath {
    /// `path_redirect`.
    Replace(String),
    /// `prefix_rewrite` / `regex_rewrite`.
    Rewrite(PathRewrite),
}

/// What a redirect is computed from.
#[derive(Debug, Clone, Copy)]
pub struct RequestTarget<'a> {
    /// `http` or `https`, as the client connected.
    pub scheme: &'a str,
    /// The request's host, with its port if it had one.
    pub authority: &'a str,
    /// The path.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
}

impl Redirect {
    /// The `Location` of the redirect for `request`: absolute, or only the path and query
    /// when the request named no host (HTTP/1.0) and the redirect changes neither host,
    /// scheme nor port. `None` when it would need a host that neither gives.
    pub fn location(&self, request: RequestTarget<'_>) -> Option<String> {
        let scheme = self.scheme.as_deref().unwrap_or(request.scheme);
        let (request_host, request_port) = split_authority(request.authority);
        let host = self.host.as_deref().unwrap_or(request_host);
        let relative = host.is_empty();
        if relative && (self.port != 0 || scheme != request.scheme) {
            return None;
        }
        // A port is kept only when it is not the scheme's default (and Envoy drops the old
        // port on a scheme change).
        let port = if self.port != 0 {
            Some(self.port)
        } else if self.scheme.is_some() && self.scheme.as_deref() != Some(request.scheme) {
            None
        } else {
            request_port
        };
        let port = port.filter(|p| !matches!((scheme, *p), ("http", 80) | ("https", 443)));
        let (path, mut query) = match &self.path {
            Some(RedirectPath::Replace(path)) => match path.split_once('?') {
                Some((path, query)) => (path.to_string(), Some(query.to_string())),
                None => (path.clone(), request.query.map(str::to_string)),
            },
            Some(RedirectPath::Rewrite(rewrite)) => (
                rewrite.apply(request.path),
                request.query.map(str::to_string),
            ),
            None => (request.path.to_string(), request.query.map(str::to_string)),
        };
        if self.strip_query {
            query = None;
        }
        let mut location = String::new();
        if !relative {
            location = format!("{scheme}://{host}");
            if let Some(port) = port {
                location.push_str(&format!(":{port}"));
            }
        }
        location.push_str(&path);
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            location.push('?');
            location.push_str(&query);
        }
        Some(location)
    }
}

/// `host[:port]` (or `[v6]:port`) into its host and port.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(end) = authority.rfind(']') {
        let port = authority[end + 1..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok());
        return (&authority[..=end], port);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

/// A route that answers by itself.
#[derive(Debug, Clone)]
pub enum LocalAction {
    /// A redirect.
    Redirect(Redirect),
    /// A fixed answer (`direct_response`).
    DirectResponse {
        /// The status.
        status: u16,
        /// The body (empty: none).
        body: Bytes,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(
        scheme: &'a str,
        authority: &'a str,
        path: &'a str,
        query: Option<&'a str>,
    ) -> RequestTarget<'a> {
        RequestTarget {
            scheme,
            authority,
            path,
            query,
        }
    }

    #[test]
    fn rewrites_swap_the_matched_prefix_or_substitute_the_regex() {
        let prefix = PathRewrite::Prefix {
            matched: "/api/".into(),
            replacement: "/v2/".into(),
        };
        assert_eq!(prefix.apply("/api/users"), "/v2/users");
        let regex = PathRewrite::Regex {
            pattern: Regex::new("^/service/([^/]+)(/.*)$").unwrap(),
            substitution: envoy_substitution("\\2/instance/\\1"),
        };
        assert_eq!(regex.apply("/service/foo/v1/api"), "/v1/api/instance/foo");
        assert_eq!(envoy_substitution("$1\\\\x"), "$$1\\x");
    }

    #[test]
    fn redirects_build_their_location_as_envoy_does() {
        let https = Redirect {
            scheme: Some("https".into()),
            host: None,
            port: 0,
            path: None,
            status: 301,
            strip_query: false,
        };
        assert_eq!(
            https
                .location(target("http", "shop.example:80", "/cart", Some("a=1")))
                .as_deref(),
            Some("https://shop.example/cart?a=1")
        );
        let moved = Redirect {
            scheme: None,
            host: Some("new.example".into()),
            port: 8443,
            path: Some(RedirectPath::Replace("/landing?from=old".into())),
            status: 308,
            strip_query: false,
        };
        assert_eq!(
            moved
                .location(target("https", "old.example", "/x", Some("q=2")))
                .as_deref(),
            Some("https://new.example:8443/landing?from=old")
        );
        let stripped = Redirect {
            scheme: None,
            host: None,
            port: 0,
            path: Some(RedirectPath::Rewrite(PathRewrite::Prefix {
                matched: "/old/".into(),
                replacement: "/new/".into(),
            })),
            status: 302,
            strip_query: true,
        };
        assert_eq!(
            stripped
                .location(target("http", "a.example:8080", "/old/page", Some("z=1")))
                .as_deref(),
            Some("http://a.example:8080/new/page")
        );
        // HTTP/1.0 without a Host: a path-only Location when nothing else changes, none
        // when the redirect needs a host to write (a scheme or port change).
        assert_eq!(
            stripped
                .location(target("http", "", "/old/page", None))
                .as_deref(),
            Some("/new/page")
        );
        assert_eq!(https.location(target("http", "", "/cart", None)), None);
        assert_eq!(
            moved.location(target("https", "", "/x", None)).as_deref(),
            Some("https://new.example:8443/landing?from=old")
        );
    }
}
