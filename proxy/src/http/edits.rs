//! Applying a route's edits to pingora's headers: header additions and removals (in both
//! directions), the forwarded path and `Host`, and the answers of routes that answer by
//! themselves.

use super::context::RequestCtx;
use crate::route::{AppendAction, HeaderEdits, HostRewrite, PathRewrite, Vars};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;

/// A pingora header map (request or response) the edits are applied to.
pub(super) trait EditableHeaders {
    fn map(&self) -> &HeaderMap;
    fn remove(&mut self, name: &HeaderName);
    fn append(&mut self, name: HeaderName, value: HeaderValue);
    fn insert(&mut self, name: HeaderName, value: HeaderValue);
}

macro_rules! editable {
    ($header:ty) => {
        impl EditableHeaders for $header {
            fn map(&self) -> &HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn append(&mut self, name: HeaderName, value: HeaderValue) {
                // A header name and value that parsed cannot fail to append.
                let _ = self.append_header(name, value);
            }
            fn insert(&mut self, name: HeaderName, value: HeaderValue) {
                let _ = self.insert_header(name, value);
            }
        }
    };
}

editable!(RequestHeader);
editable!(ResponseHeader);

/// Applies `edits`: removals, then additions in order.
pub(super) fn apply(edits: &HeaderEdits, target: &mut impl EditableHeaders, vars: &Vars<'_>) {
    for name in &edits.remove {
        target.remove(name);
    }
    for add in &edits.add {
        let Some(value) = add.value_for(vars) else {
            continue;
        };
        let present = target.map().contains_key(&add.name);
        match add.action {
            AppendAction::Append => target.append(add.name.clone(), value),
            AppendAction::AddIfAbsent if !present => target.append(add.name.clone(), value),
            AppendAction::Overwrite => target.insert(add.name.clone(), value),
            AppendAction::OverwriteIfExists if present => target.insert(add.name.clone(), value),
            AppendAction::AddIfAbsent | AppendAction::OverwriteIfExists => {}
        }
    }
}

/// The variables of the request under `session`, for values that use them.
pub(super) fn with_vars<T>(
    session: &Session,
    ctx: &RequestCtx,
    apply: impl FnOnce(&Vars<'_>) -> T,
) -> T {
    let request = session.req_header();
    let lookup = |name: &HeaderName| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let vars = Vars {
        downstream_remote: session.client_addr().and_then(|a| a.as_inet()).copied(),
        downstream_local: session.server_addr().and_then(|a| a.as_inet()).copied(),
        upstream_host: ctx.endpoint,
        start_time: Some(ctx.start_wall),
        protocol: if session.as_ref().is_http2() {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        request_header: Some(&lookup),
    };
    apply(&vars)
}

/// Rewrites the forwarded request's path (the query is kept).
pub(super) fn rewrite_path(
    rewrite: &PathRewrite,
    request: &mut RequestHeader,
) -> Result<(), InvalidRewrite> {
    let path = rewrite.apply(request.uri.path());
    let target = match request.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = request.uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| InvalidRewrite(target))?);
    let uri = http::Uri::from_parts(parts).map_err(|e| InvalidRewrite(e.to_string()))?;
    request.set_uri(uri);
    Ok(())
}

/// A rewritten path that is no request target. The compiler refuses replacements with
/// characters a path cannot hold, so only a regex that captures across the path's
/// structure could produce one; the request is answered 500 rather than forwarded
/// unchanged to a path the route did not mean.
#[derive(Debug)]
pub(super) struct InvalidRewrite(pub String);

/// Rewrites the forwarded `Host`: to a literal, or to the endpoint's host name.
pub(super) fn rewrite_host(
    rewrite: &HostRewrite,
    endpoint_hostname: Option<&str>,
    request: &mut RequestHeader,
) {
    let host = match rewrite {
        HostRewrite::Literal(host) => host.as_str(),
        HostRewrite::Auto => match endpoint_hostname {
            Some(host) => host,
            None => return,
        },
    };
    let Ok(value) = HeaderValue::from_str(host) else {
        return;
    };
    let _ = request.insert_header(http::header::HOST, value);
    // An absolute request target (HTTP/2 clients send one) carries the host too.
    if request.uri.authority().is_some() {
        let mut parts = request.uri.clone().into_parts();
        if let Ok(authority) = host.parse() {
            parts.authority = Some(authority);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                request.set_uri(uri);
            }
        }
    }
}
