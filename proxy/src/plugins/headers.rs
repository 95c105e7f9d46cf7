//! Converting request and response heads to and from the header maps plugins see.

use nip_filters::abi::Pairs;
use pingora::http::{RequestHeader, ResponseHeader};

/// The request head as plugins see it: pseudo-headers first, names in lower case.
pub fn request_pairs(request: &RequestHeader, scheme: &str) -> Pairs {
    let authority = request
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut pairs = Vec::with_capacity(request.headers.len() + 4);
    pairs.push((":method".to_string(), request.method.as_str().to_string()));
    pairs.push((
        ":path".to_string(),
        request
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
    ));
    pairs.push((":authority".to_string(), authority));
    pairs.push((":scheme".to_string(), scheme.to_string()));
    for (name, value) in &request.headers {
        if name == http::header::HOST {
            continue;
        }
        pairs.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
    pairs
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

/// The response head as plugins see it.
pub fn response_pairs(response: &ResponseHeader) -> Pairs {
    let mut pairs = Vec::with_capacity(response.headers.len() + 1);
    pairs.push((":status".to_string(), response.status.as_u16().to_string()));
    for (name, value) in &response.headers {
        pairs.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
    pairs
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
