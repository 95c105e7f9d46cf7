//! Pure decisions about failed tries and requests: which errors the route's retry policy
//! covers, and the status, response flag and body a final error is answered with (Envoy's
//! meanings: 503 `UF`, 504 `UT`, 502 `UR`, …).

use super::flags::ResponseFlag;
use crate::route::RetryPolicy;
use pingora::{ErrorSource, ErrorType};

/// How the proxy answers a request whose proxying failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The status (0: the client is gone, nothing is answered).
    pub status: u16,
    /// Envoy's response flag.
    pub flag: Option<ResponseFlag>,
    /// The text body.
    pub body: &'static str,
}

/// The answer to a final error of type `etype` from `source`; `flag` is what the phases
/// already decided (a pick that found no healthy endpoint says `UH`).
pub fn classify(etype: &ErrorType, source: &ErrorSource, flag: Option<ResponseFlag>) -> Failure {
    let (status, flag, body) = match (etype, source) {
        (ErrorType::HTTPStatus(code), _) => {
            let body = match flag {
                Some(ResponseFlag::NoHealthyUpstream) => "no healthy upstream\n",
                Some(ResponseFlag::UpstreamTimeout) => "upstream request timeout\n",
                _ => "request failed\n",
            };
            (*code, flag, body)
        }
        (t, ErrorSource::Upstream) if is_connect_error(t) => (
            503,
            Some(ResponseFlag::UpstreamConnectFailure),
            "upstream connect error\n",
        ),
        (ErrorType::ReadTimedout | ErrorType::WriteTimedout, ErrorSource::Upstream) => (
            504,
            Some(ResponseFlag::UpstreamTimeout),
            "upstream request timeout\n",
        ),
        (_, ErrorSource::Upstream) => (
            502,
            Some(ResponseFlag::UpstreamReset),
            "upstream reset before response\n",
        ),
        (
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
            ErrorSource::Downstream,
        ) => (0, Some(ResponseFlag::DownstreamClosed), ""),
        (_, ErrorSource::Downstream) => (400, None, "bad request\n"),
        _ => (500, None, "internal error\n"),
    };
    Failure { status, flag, body }
}

/// Whether a try that ended in `etype` without an answer is one the route retries:
/// `reset` covers a connection that closed or broke, `timeout` (Envoy's
/// `5xx`/`gateway-error` include it) a try that timed out.
pub fn retry_policy_covers(policy: &RetryPolicy, etype: &ErrorType) -> bool {
    let is_reset = matches!(
        etype,
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::H2Error
            | ErrorType::H1Error
    );
    let is_timeout = matches!(etype, ErrorType::ReadTimedout);
    (policy.retries_reset() && is_reset) || (policy.retries_timeout() && is_timeout)
}

/// Whether a failed connect failed in its TLS handshake (a certificate that does not
/// verify, a client certificate refused).
pub fn is_tls_error(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::HandshakeError
            | ErrorType::InvalidCert
    )
}

/// Whether `etype` means the connection was never made (503 `UF`, retried under
/// `connect-failure`).
pub fn is_connect_error(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectProxyFailure
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::HandshakeError
            | ErrorType::InvalidCert
            | ErrorType::SocketError
            | ErrorType::BindError
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_errors_map_to_envoys_statuses_and_flags() {
        let upstream = ErrorSource::Upstream;
        let case = |etype: ErrorType, source: &ErrorSource| {
            let f = classify(&etype, source, None);
            (f.status, f.flag.map(ResponseFlag::as_str))
        };
        assert_eq!(
            case(ErrorType::ConnectRefused, &upstream),
            (503, Some("UF"))
        );
        assert_eq!(case(ErrorType::ReadTimedout, &upstream), (504, Some("UT")));
        assert_eq!(
            case(ErrorType::ConnectionClosed, &upstream),
            (502, Some("UR"))
        );
        assert_eq!(
            case(ErrorType::ConnectionClosed, &ErrorSource::Downstream),
            (0, Some("DC"))
        );
        assert_eq!(
            case(ErrorType::InvalidHTTPHeader, &ErrorSource::Downstream),
            (400, None)
        );
        assert_eq!(
            case(ErrorType::InternalError, &ErrorSource::Internal),
            (500, None)
        );
        let no_healthy = classify(
            &ErrorType::HTTPStatus(503),
            &ErrorSource::Internal,
            Some(ResponseFlag::NoHealthyUpstream),
        );
        assert_eq!(
            (no_healthy.status, no_healthy.body),
            (503, "no healthy upstream\n")
        );
    }

    #[test]
    fn the_retry_policy_decides_which_unanswered_tries_are_retried() {
        let reset = RetryPolicy::parse("reset", 2).unwrap();
        assert!(retry_policy_covers(&reset, &ErrorType::ConnectionClosed));
        assert!(!retry_policy_covers(&reset, &ErrorType::ReadTimedout));
        let gateway = RetryPolicy::parse("gateway-error", 2).unwrap();
        assert!(retry_policy_covers(&gateway, &ErrorType::ReadTimedout));
        let connect_only = RetryPolicy::parse("connect-failure", 2).unwrap();
        assert!(!retry_policy_covers(
            &connect_only,
            &ErrorType::ConnectionClosed
        ));
        assert!(!retry_policy_covers(
            &connect_only,
            &ErrorType::ReadTimedout
        ));
    }
}
