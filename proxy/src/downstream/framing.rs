//! Strict HTTP/1.1 request framing (RFC 9112 §6, §3.2): the checks a request head must pass
//! before anything of it is forwarded, so a lenient backend can never read the message
//! differently than NIP does (request smuggling, desynchronised pooled connections).
//!
//! Pure functions over a parsed head: the gateway calls [`check_request_head`] first thing
//! for every HTTP/1 request and answers the refusal with its status, then closes the
//! connection (the body's length is unknown, so nothing after it can be trusted).

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Version};

/// Why a request head is refused, with the status that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// `Content-Length` is not one run of digits (a list, a sign, a leading zero, spaces,
    /// more than 19 digits) or appears more than once.
    BadContentLength,
    /// `Transfer-Encoding` repeats `chunked`, puts a coding after it, or appears twice.
    BadTransferEncoding,
    /// A transfer coding other than `chunked` (RFC 9112 §6.1: 501).
    UnknownTransferCoding,
    /// HTTP/1.1 without exactly one `Host`, or an HTTP/1.0 request with several.
    BadHost,
    /// More header fields than `max_headers_count` (431).
    TooManyHeaders,
    /// A version other than HTTP/1.0 or HTTP/1.1 on an HTTP/1 connection.
    BadVersion,
}

impl FramingError {
    /// The status the client gets.
    pub fn status(self) -> u16 {
        match self {
            FramingError::UnknownTransferCoding => 501,
            FramingError::TooManyHeaders => 431,
            _ => 400,
        }
    }

    /// The body of the answer: one line naming what was wrong.
    pub fn message(self) -> &'static str {
        match self {
            FramingError::BadContentLength => {
                "bad request: Content-Length must be a single decimal number\n"
            }
            FramingError::BadTransferEncoding => {
                "bad request: Transfer-Encoding must be exactly \"chunked\"\n"
            }
            FramingError::UnknownTransferCoding => {
                "not implemented: only the chunked transfer coding is supported\n"
            }
            FramingError::BadHost => "bad request: HTTP/1.1 needs exactly one Host header\n",
            FramingError::TooManyHeaders => "request header fields too many\n",
            FramingError::BadVersion => "bad request: HTTP/1.0 or HTTP/1.1 only\n",
        }
    }
}

/// Checks an HTTP/1 request head. Pingora has already removed `Content-Length` when
/// `Transfer-Encoding` came with it (and will close the connection after the response), so
/// both are never forwarded together.
pub fn check_request_head(
    version: Version,
    headers: &HeaderMap,
    max_headers_count: usize,
) -> Result<(), FramingError> {
    if version != Version::HTTP_11 && version != Version::HTTP_10 {
        return Err(FramingError::BadVersion);
    }
    if headers.len() > max_headers_count {
        return Err(FramingError::TooManyHeaders);
    }
    // One pass over the fields (a head has a handful; three hashed lookups cost more).
    let (mut length, mut coding, mut hosts) = (None, None, 0usize);
    for (name, value) in headers {
        if name == CONTENT_LENGTH {
            if length.replace(value).is_some() {
                return Err(FramingError::BadContentLength);
            }
        } else if name == TRANSFER_ENCODING {
            if coding.replace(value).is_some() {
                return Err(FramingError::BadTransferEncoding);
            }
        } else if name == HOST {
            hosts += 1;
        }
    }
    if length.is_some_and(|value| parse_content_length(value.as_bytes()).is_none()) {
        return Err(FramingError::BadContentLength);
    }
    if let Some(value) = coding {
        check_transfer_encoding(value.as_bytes())?;
    }
    if hosts > 1 || (version == Version::HTTP_11 && hosts == 0) {
        return Err(FramingError::BadHost);
    }
    Ok(())
}

/// `1*DIGIT` without a leading zero (but `0` itself), at most 19 digits so it fits a u64.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if value.len() > 1 && value[0] == b'0' {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The one coding NIP forwards is a lone `chunked` (any case, optional whitespace).
fn check_transfer_encoding(value: &[u8]) -> Result<(), FramingError> {
    let mut codings = value
        .split(|b| *b == b',')
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    let mut saw_chunked = false;
    let mut unknown = false;
    let mut count = 0;
    for coding in codings.by_ref() {
        count += 1;
        if coding.eq_ignore_ascii_case(b"chunked") {
            if saw_chunked {
                return Err(FramingError::BadTransferEncoding);
            }
            saw_chunked = true;
        } else {
            unknown = true;
        }
    }
    if unknown {
        return Err(FramingError::UnknownTransferCoding);
    }
    if count != 1 {
        return Err(FramingError::BadTransferEncoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn check(pairs: &[(&str, &str)]) -> Result<(), FramingError> {
        check_request_head(Version::HTTP_11, &head(pairs), 100)
    }

    #[test]
    fn content_length_is_one_run_of_digits() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"34"), Some(34));
        assert_eq!(
            parse_content_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"035",
            b"00",
            b"34,34",
            b"5, 5",
            b"+5",
            b"-1",
            b" 5",
            b"5 ",
            b"0x10",
            b"18446744073709551616",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_content_length(bad), None, "{:?}", bad.escape_ascii());
        }
    }

    #[test]
    fn lists_and_repeats_of_content_length_are_refused() {
        assert_eq!(check(&[("host", "a"), ("content-length", "5")]), Ok(()));
        for value in ["34,34", "5,5", "035", "-0", "1e3"] {
            assert_eq!(
                check(&[("host", "a"), ("content-length", value)]),
                Err(FramingError::BadContentLength),
                "{value}"
            );
        }
        assert_eq!(
            check(&[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5")
            ]),
            Err(FramingError::BadContentLength)
        );
    }

    #[test]
    fn only_a_single_chunked_coding_passes() {
        assert_eq!(
            check(&[("host", "a"), ("transfer-encoding", "chunked")]),
            Ok(())
        );
        assert_eq!(
            check(&[("host", "a"), ("transfer-encoding", " Chunked ")]),
            Ok(())
        );
        assert_eq!(
            check(&[("host", "a"), ("transfer-encoding", "chunked, chunked")]),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            check(&[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            check(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]),
            Err(FramingError::UnknownTransferCoding)
        );
        assert_eq!(
            check(&[("host", "a"), ("transfer-encoding", "identity")]),
            Err(FramingError::UnknownTransferCoding)
        );
        assert_eq!(
            check(&[("host", "a"), ("transfer-encoding", ",")]),
            Err(FramingError::BadTransferEncoding)
        );
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(check(&[]), Err(FramingError::BadHost));
        assert_eq!(
            check(&[("host", "a"), ("host", "b")]),
            Err(FramingError::BadHost)
        );
        assert_eq!(
            check_request_head(Version::HTTP_10, &head(&[]), 100),
            Ok(())
        );
        assert_eq!(
            check_request_head(Version::HTTP_09, &head(&[("host", "a")]), 100),
            Err(FramingError::BadVersion)
        );
    }

    #[test]
    fn header_count_is_bounded() {
        let many: Vec<(String, String)> = (0..5)
            .map(|i| (format!("x-h{i}"), "v".to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = std::iter::once(("host", "a"))
            .chain(many.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            .collect();
        assert_eq!(
            check_request_head(Version::HTTP_11, &head(&pairs), 5),
            Err(FramingError::TooManyHeaders)
        );
        assert_eq!(
            check_request_head(Version::HTTP_11, &head(&pairs), 6),
            Ok(())
        );
        assert_eq!(FramingError::TooManyHeaders.status(), 431);
    }
}
