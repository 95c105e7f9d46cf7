//! Where a provider finds a token in a request, and the token's parts before anything is
//! trusted: its header (`alg`, `kid`) and payload (claims), decoded but not yet verified.

use super::JwtError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use std::str::FromStr;

/// One place a token may be (Envoy's `from_headers`, `from_params`, `from_cookies`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header, the token after `prefix` (compared ignoring ASCII case, as HTTP
    /// authentication schemes are).
    Header {
        /// Lower-case header name.
        name: HeaderName,
        /// What precedes the token (`Bearer `), possibly empty.
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl TokenLocation {
    /// Envoy's default when a provider names no location: `Authorization: Bearer <token>`
    /// and the `access_token` query parameter.
    pub fn defaults() -> Vec<TokenLocation> {
        vec![
            TokenLocation::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".to_string(),
            },
            TokenLocation::Param("access_token".to_string()),
        ]
    }

    /// The token at this location, if the request carries one.
    pub fn find<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
        match self {
            TokenLocation::Header { name, prefix } => headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|value| {
                    let value = value.trim();
                    let head = value.get(..prefix.len())?;
                    head.eq_ignore_ascii_case(prefix)
                        .then(|| value[prefix.len()..].trim())
                        .filter(|t| !t.is_empty())
                }),
            TokenLocation::Param(param) => query?.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key == param && !value.is_empty()).then_some(value)
            }),
            TokenLocation::Cookie(cookie) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    (key == cookie && !value.is_empty()).then_some(value.trim_matches('"'))
                }),
        }
    }
}

/// A token taken apart: what it claims, not yet verified.
#[derive(Debug, Clone)]
pub struct ParsedJwt<'a> {
    /// The whole token.
    pub raw: &'a str,
    /// Its signing algorithm (`alg`); `none` and unknown ones never parse.
    pub alg: Algorithm,
    /// Its key id (`kid`), if any.
    pub kid: Option<String>,
    /// The payload segment as sent (base64url), for `forward_payload_header`.
    pub payload_segment: &'a str,
    /// The payload's claims.
    pub claims: std::sync::Arc<Map<String, Value>>,
}

impl<'a> ParsedJwt<'a> {
    /// Splits and decodes `raw` (compact serialization: header.payload.signature).
    pub fn parse(raw: &'a str) -> Result<ParsedJwt<'a>, JwtError> {
        let mut parts = raw.split('.');
        let (Some(header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::BadFormat);
        };
        let header: Map<String, Value> = decode_json(header).ok_or(JwtError::HeaderBadJson)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(JwtError::UnsupportedAlgorithm)?;
        // `none` is not an Algorithm: an unsigned token never gets further.
        let alg = Algorithm::from_str(alg).map_err(|_| JwtError::UnsupportedAlgorithm)?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .map(str::to_string);
        let claims: Map<String, Value> = decode_json(payload).ok_or(JwtError::PayloadBadJson)?;
        Ok(ParsedJwt {
            raw,
            alg,
            kid,
            payload_segment: payload,
            claims: std::sync::Arc::new(claims),
        })
    }

    /// A token already verified, with its claims (from the cache): only the payload segment
    /// is located.
    pub fn verified(
        raw: &'a str,
        claims: std::sync::Arc<Map<String, Value>>,
    ) -> Result<ParsedJwt<'a>, JwtError> {
        let payload = raw.split('.').nth(1).ok_or(JwtError::BadFormat)?;
        Ok(ParsedJwt {
            raw,
            // Verified already: the algorithm is not looked at again.
            alg: Algorithm::RS256,
            kid: None,
            payload_segment: payload,
            claims,
        })
    }

    /// A string claim.
    pub fn string_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A time claim (`exp`, `nbf`, `iat`) in seconds since the epoch; `Err` when present
    /// but not a number.
    pub fn time_claim(&self, name: &str) -> Result<Option<u64>, JwtError> {
        match self.claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(JwtError::PayloadBadJson),
            Some(_) => Err(JwtError::PayloadBadJson),
        }
    }

    /// The audiences (`aud`: a string or a list of them).
    pub fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(segment: &str) -> Option<T> {
    // Some issuers pad their segments; the padding carries nothing.
    let bytes = URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A claim's value at `path` (nested objects), as a header value: strings as they are,
/// numbers and booleans printed, lists of those joined with `,`; objects have none.
pub fn claim_header_value(claims: &Map<String, Value>, path: &[String]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut value = claims.get(first)?;
    for key in rest {
        value = value.get(key)?;
    }
    fn scalar(value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    match value {
        Value::Array(items) => {
            let items: Option<Vec<String>> = items.iter().map(scalar).collect();
            items.map(|items| items.join(","))
        }
        other => scalar(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn tokens_are_found_in_headers_params_and_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "bearer abc.def.ghi".parse().unwrap());
        headers.insert("cookie", "a=1; session=tok.en.x; b=2".parse().unwrap());
        let defaults = TokenLocation::defaults();
        assert_eq!(defaults[0].find(&headers, None), Some("abc.def.ghi"));
        assert_eq!(
            defaults[1].find(&headers, Some("x=1&access_token=q.w.e")),
            Some("q.w.e")
        );
        assert_eq!(defaults[1].find(&headers, Some("access_token=")), None);
        let cookie = TokenLocation::Cookie("session".into());
        assert_eq!(cookie.find(&headers, None), Some("tok.en.x"));
        let basic = TokenLocation::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Basic ".into(),
        };
        assert_eq!(basic.find(&headers, None), None);
    }

    #[test]
    fn unsigned_and_malformed_tokens_do_not_parse() {
        let payload = segment(r#"{"sub":"a"}"#);
        let none = format!("{}.{payload}.", segment(r#"{"alg":"none"}"#));
        assert_eq!(
            ParsedJwt::parse(&none).unwrap_err(),
            JwtError::UnsupportedAlgorithm
        );
        assert_eq!(ParsedJwt::parse("a.b").unwrap_err(), JwtError::BadFormat);
        assert_eq!(
            ParsedJwt::parse("a.b.c.d").unwrap_err(),
            JwtError::BadFormat
        );
        let bad_payload = format!("{}.!!.sig", segment(r#"{"alg":"RS256"}"#));
        assert_eq!(
            ParsedJwt::parse(&bad_payload).unwrap_err(),
            JwtError::PayloadBadJson
        );
        let good = format!("{}.{payload}.sig", segment(r#"{"alg":"ES256","kid":"k"}"#));
        let parsed = ParsedJwt::parse(&good).unwrap();
        assert_eq!(parsed.alg, Algorithm::ES256);
        assert_eq!(parsed.kid.as_deref(), Some("k"));
        assert_eq!(parsed.string_claim("sub"), Some("a"));
    }

    #[test]
    fn claims_become_header_values() {
        let claims: Map<String, Value> = serde_json::from_str(
            r#"{"sub":"a","n":3,"ok":true,"roles":["x","y"],"org":{"id":"o1"},"obj":{}}"#,
        )
        .unwrap();
        let v = |p: &[&str]| {
            claim_header_value(
                &claims,
                &p.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(v(&["sub"]).as_deref(), Some("a"));
        assert_eq!(v(&["n"]).as_deref(), Some("3"));
        assert_eq!(v(&["ok"]).as_deref(), Some("true"));
        assert_eq!(v(&["roles"]).as_deref(), Some("x,y"));
        assert_eq!(v(&["org", "id"]).as_deref(), Some("o1"));
        assert_eq!(v(&["obj"]), None);
        assert_eq!(v(&["missing"]), None);
    }
}
