//! Converting request and response heads to and from the header maps plugins see.

use nip_filters::abi::Pairs;
use nip_filters::host::Headers;
use pingora::http::{RequestHeader, ResponseHeader};

/// The request head as plugins see it, converted only if a plugin looks: pseudo-headers
/// first (`:method`, `:path`, `:authority`, `:scheme`), names in lower case. Taking it copies
/// the header map (its values are shared, not copied), not every name and value.
pub fn request_headers(request: &RequestHeader, scheme: &'static str) -> Headers {
    let method = request.method.clone();
    let uri = request.uri.clone();
    let headers = request.headers.clone();
    let len = headers.len() + 4 - usize::from(headers.contains_key(http::header::HOST));
    Headers::lazy(len, move || request_pairs(&method, &uri, &headers, scheme))
}

fn request_pairs(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    scheme: &str,
) -> Pairs {
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut pairs = Vec::with_capacity(headers.len() + 4);
    pairs.push((":method".to_string(), method.as_str().to_string()));
    pairs.push((
        ":path".to_string(),
        uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
    ));
    pairs.push((":authority".to_string(), authority));
    pairs.push((":scheme".to_string(), scheme.to_string()));
    // `Host` is `:authority` already.
    push_pairs(&mut pairs, headers, Some(&http::header::HOST));
    pairs
}

/// Appends every (name, value) of `headers` but `skip` to `pairs`.
fn push_pairs(pairs: &mut Pairs, headers: &http::HeaderMap, skip: Option<&http::HeaderName>) {
    for (name, value) in headers {
        if Some(name) == skip {
            continue;
        }
        pairs.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
}

/// Writes a plugin's edited request head back; bad names or values are skipped and logged.
pub fn apply_request_pairs(request: &mut RequestHeader, pairs: &Pairs) {
    let names: Vec<http::HeaderName> = request.headers.keys().cloned().collect();
    for name in names {
        request.remove_header(&name);
    }
    for (name, value) in pairs {
        let result = match name.as_str() {
            ":method" => http::Method::from_bytes(value.as_bytes())
                .map(|m| request.set_method(m))
                .map_err(|e| e.to_string()),
            ":path" => value
                .parse::<http::Uri>()
                .map(|uri| request.set_uri(uri))
                .map_err(|e| e.to_string()),
            ":authority" => request
                .insert_header(http::header::HOST, value.as_str())
                .map_err(|e| e.to_string()),
            ":scheme" => Ok(()),
            _ => request
                .append_header(name.clone(), value.as_str())
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!("plugin set an invalid request header {name:?}: {e}");
        }
    }
}

/// The response head as plugins see it (`:status` first), converted only if a plugin looks.
pub fn response_headers(response: &ResponseHeader) -> Headers {
    let status = response.status;
    let headers = response.headers.clone();
    Headers::lazy(headers.len() + 1, move || {
        let mut pairs = Vec::with_capacity(headers.len() + 1);
        pairs.push((":status".to_string(), status.as_u16().to_string()));
        push_pairs(&mut pairs, &headers, None);
        pairs
    })
}

/// Writes a plugin's edited response head back.
pub fn apply_response_pairs(response: &mut ResponseHeader, pairs: &Pairs) {
    let names: Vec<http::HeaderName> = response.headers.keys().cloned().collect();
    for name in names {
        response.remove_header(&name);
    }
    for (name, value) in pairs {
        let result = if name == ":status" {
            value
                .parse::<u16>()
                .map_err(|e| e.to_string())
                .and_then(|s| response.set_status(s).map_err(|e| e.to_string()))
        } else {
            response
                .append_header(name.clone(), value.as_str())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(e) = result {
            tracing::warn!("plugin set an invalid response header {name:?}: {e}");
        }
    }
}

/// A plain header map (trailers) as pairs.
pub fn header_pairs(headers: &http::HeaderMap) -> Pairs {
    let mut pairs = Vec::with_capacity(headers.len());
    push_pairs(&mut pairs, headers, None);
    pairs
}

/// Replaces a plain header map (trailers) with a plugin's pairs; bad ones are skipped and
/// logged.
pub fn apply_header_pairs(headers: &mut http::HeaderMap, pairs: &Pairs) {
    headers.clear();
    for (name, value) in pairs {
        match (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::warn!("plugin set an invalid trailer {name:?}"),
        }
    }
}

/// Frames a response whose body a filter may still change: its `content-length` goes, and
/// HTTP/1.1 gets chunked encoding (HTTP/2 ends the body with the stream). For filters
/// that hold a response body while pingora sends the head first.
pub fn unframe_for_new_body(response: &mut ResponseHeader, http2: bool) {
    if !response.headers.contains_key(http::header::CONTENT_LENGTH) {
        return;
    }
    response.remove_header(&http::header::CONTENT_LENGTH);
    if !http2 {
        let _ = response.insert_header(http::header::TRANSFER_ENCODING, "chunked");
    }
}

/// Whether a response's body will be followed by trailers (gRPC's, which carry its
/// status). Pingora never marks such a body's last chunk as the end, and can put out no
/// body with the trailers: filters must not hold a body that trailers follow.
pub fn trailers_follow(response: &ResponseHeader) -> bool {
    response
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Makes a request's `content-length` (when it has one) say `len`: its body was replaced
/// before the head went upstream.
pub fn fit_content_length(request: &mut RequestHeader, len: usize) {
    if request.headers.contains_key(http::header::CONTENT_LENGTH) {
        let _ = request.insert_header(http::header::CONTENT_LENGTH, len);
    }
}
