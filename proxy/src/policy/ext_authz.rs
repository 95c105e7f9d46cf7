//! External authorization, as Envoy's `ext_authz` filter: each request is described to an
//! authorization service, which allows it (possibly adding headers to the request going
//! upstream and to the response) or denies it (with the status, headers and body the
//! client gets). The service is reached through a cluster, like every upstream:
//!
//! ```text
//! request ─▶ HTTP service: same method, path_prefix + path, allowed headers (+ Host,
//!              Method, Path, Content-Length, Authorization), empty body
//!              200 ⇒ allow (allowed_upstream_headers copied to the request)
//!              else ⇒ deny with its status, headers (allowed_client_headers) and body
//!          ─▶ gRPC service: envoy.service.auth.v3.Authorization/Check (CheckRequest with
//!              source, destination, request attributes and the route's context
//!              extensions) ⇒ OkHttpResponse / DeniedHttpResponse
//! no answer within `timeout` (connect error, bad answer) ⇒ `status_on_error` (403), or
//!   allowed when `failure_mode_allow` (`x-envoy-auth-failure-mode-allowed: true` added
//!   with `failure_mode_allow_header_add`)
//! ```

use crate::matchers::StringMatch;
use crate::plugins::callout::CalloutClient;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, check_response, AttributeContext, CheckRequest, CheckResponse,
};
use http::{HeaderName, HeaderValue};
use nip_filters::host::{Callout, PeerCertificate};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Headers the HTTP service always gets (Envoy: Host, Method, Path, Content-Length and
/// Authorization are always included).
const ALWAYS_SENT: &[&str] = &["host", "content-length", "authorization"];

/// How an authorization service is spoken to.
#[derive(Debug)]
pub enum AuthzService {
    /// A plain HTTP service (`http_service`).
    Http {
        /// Its cluster (`server_uri.cluster`).
        cluster: String,
        /// `:authority` of the checks (`server_uri.uri`'s host).
        authority: String,
        /// Put before the request's path (`path_prefix`).
        path_prefix: String,
        /// Client headers sent besides the ones always sent
        /// (`authorization_request.allowed_headers`).
        allowed_headers: Vec<StringMatch>,
        /// Headers added to every check (`authorization_request.headers_to_add`).
        headers_to_add: Vec<(HeaderName, HeaderValue)>,
        /// Answer headers that replace the request's (`allowed_upstream_headers`).
        upstream_headers: Vec<StringMatch>,
        /// Answer headers appended to the request's (`allowed_upstream_headers_to_append`).
        upstream_headers_to_append: Vec<StringMatch>,
        /// Answer headers a denied client gets (`allowed_client_headers`; empty: all).
        client_headers: Vec<StringMatch>,
        /// Answer headers an allowed client gets in its response
        /// (`allowed_client_headers_on_success`).
        client_headers_on_success: Vec<StringMatch>,
    },
    /// Envoy's gRPC `Authorization` service (`grpc_service.envoy_grpc`).
    Grpc {
        /// Its cluster.
        cluster: String,
        /// `:authority` of the calls (`envoy_grpc.authority`, else the cluster name).
        authority: String,
    },
}

/// One `ext_authz` filter.
#[derive(Debug)]
pub struct ExtAuthz {
    /// Its name in `http_filters` (metrics).
    pub name: Arc<str>,
    /// The service.
    pub service: AuthzService,
    /// How long a check may take (the service's `timeout`, default 200 ms).
    pub timeout: Duration,
    /// Allow requests when the service cannot be asked.
    pub failure_mode_allow: bool,
    /// Mark requests allowed that way.
    pub failure_mode_allow_header_add: bool,
    /// The status of requests refused because the service could not be asked.
    pub status_on_error: u16,
    /// Send the client certificate (PEM is not kept; its subject and names are) to a
    /// gRPC service (`include_peer_certificate`).
    pub include_peer_certificate: bool,
    /// Client headers a gRPC check carries (`allowed_headers`; empty: all).
    pub allowed_headers: Vec<StringMatch>,
    /// Its counters.
    pub stats: crate::telemetry::metrics::ExtAuthzCounters,
}

/// What a check needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct CheckFacts<'a> {
    /// The request's head.
    pub request: &'a pingora::http::RequestHeader,
    /// Its `x-request-id`.
    pub request_id: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// The client's address.
    pub source: Option<SocketAddr>,
    /// The address it connected to.
    pub destination: Option<SocketAddr>,
    /// Its verified certificate.
    pub peer: Option<&'a PeerCertificate>,
    /// The route's `context_extensions`.
    pub context_extensions: &'a HashMap<String, String>,
}

/// The service's decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go on.
    Allow {
        /// Set on the request going upstream (replacing).
        set: Vec<(HeaderName, HeaderValue)>,
        /// Appended to the request going upstream.
        append: Vec<(HeaderName, HeaderValue)>,
        /// Removed from the request going upstream.
        remove: Vec<HeaderName>,
        /// Added to the response the client gets.
        response: Vec<(HeaderName, HeaderValue)>,
    },
    /// Answer the client with this.
    Deny {
        /// Status.
        status: u16,
        /// Headers.
        headers: Vec<(HeaderName, HeaderValue)>,
        /// Body.
        body: bytes::Bytes,
    },
}

/// Why the service could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CheckError(pub String);

fn any_match(matchers: &[StringMatch], name: &str) -> bool {
    matchers.iter().any(|m| m.matches(name))
}

impl ExtAuthz {
    /// Asks the service about one request.
    pub async fn check(
        &self,
        client: &CalloutClient,
        facts: &CheckFacts<'_>,
    ) -> Result<Decision, CheckError> {
        match &self.service {
            AuthzService::Http { .. } => self.check_http(client, facts).await,
            AuthzService::Grpc { .. } => self.check_grpc(client, facts).await,
        }
    }

    async fn check_http(
        &self,
        client: &CalloutClient,
        facts: &CheckFacts<'_>,
    ) -> Result<Decision, CheckError> {
        let AuthzService::Http {
            cluster,
            authority,
            path_prefix,
            allowed_headers,
            headers_to_add,
            upstream_headers,
            upstream_headers_to_append,
            client_headers,
            client_headers_on_success,
        } = &self.service
        else {
            return Err(CheckError("not an HTTP service".into()));
        };
        let request = facts.request;
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = vec![
            (":method".to_string(), request.method.as_str().to_string()),
            (":path".to_string(), format!("{path_prefix}{path}")),
            (":authority".to_string(), authority.clone()),
        ];
        for (name, value) in &request.headers {
            let name = name.as_str();
            if ALWAYS_SENT.contains(&name) || any_match(allowed_headers, name) {
                if let Ok(value) = value.to_str() {
                    // The original host travels as x-forwarded-host: the check's own
                    // :authority is the service's.
                    let name = if name == "host" {
                        "x-forwarded-host"
                    } else {
                        name
                    };
                    headers.push((name.to_string(), value.to_string()));
                }
            }
        }
        for (name, value) in headers_to_add {
            if let Ok(value) = value.to_str() {
                headers.push((name.as_str().to_string(), value.to_string()));
            }
        }
        let answer = client
            .call(&callout(cluster, headers, Vec::new(), self.timeout))
            .await;
        let Some(status) = answer
            .headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok())
        else {
            return Err(CheckError(format!(
                "the authorization service (cluster {cluster:?}) did not answer"
            )));
        };
        let answered = answer
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            });
        if status == 200 {
            let (mut set, mut append, mut response) = (Vec::new(), Vec::new(), Vec::new());
            for (name, value) in answered {
                if any_match(upstream_headers, name.as_str()) {
                    set.push((name.clone(), value.clone()));
                }
                if any_match(upstream_headers_to_append, name.as_str()) {
                    append.push((name.clone(), value.clone()));
                }
                if any_match(client_headers_on_success, name.as_str()) {
                    response.push((name, value));
                }
            }
            return Ok(Decision::Allow {
                set,
                append,
                remove: Vec::new(),
                response,
            });
        }
        // Hop-by-hop and framing headers are the proxy's to write.
        const OWN: &[&str] = &["content-length", "transfer-encoding", "connection", "host"];
        let headers = answered
            .filter(|(name, _)| !OWN.contains(&name.as_str()))
            .filter(|(name, _)| {
                client_headers.is_empty()
                    || any_match(client_headers, name.as_str())
                    || matches!(name.as_str(), "www-authenticate" | "location")
            })
            .collect();
        Ok(Decision::Deny {
            status,
            headers,
            body: answer.body.into(),
        })
    }

    async fn check_grpc(
        &self,
        client: &CalloutClient,
        facts: &CheckFacts<'_>,
    ) -> Result<Decision, CheckError> {
        let AuthzService::Grpc { cluster, authority } = &self.service else {
            return Err(CheckError("not a gRPC service".into()));
        };
        let response: CheckResponse = super::grpc::unary(
            client,
            cluster,
            authority,
            "/envoy.service.auth.v3.Authorization/Check",
            &self.check_request(facts),
            self.timeout,
        )
        .await
        .map_err(|e| CheckError(format!("the authorization service: {e}")))?;
        Ok(decision(response))
    }

    fn check_request(&self, facts: &CheckFacts<'_>) -> CheckRequest {
        let request = facts.request;
        let mut headers = HashMap::new();
        for (name, value) in &request.headers {
            if !self.allowed_headers.is_empty() && !any_match(&self.allowed_headers, name.as_str())
            {
                continue;
            }
            if let Ok(value) = value.to_str() {
                headers
                    .entry(name.as_str().to_string())
                    .and_modify(|v: &mut String| {
                        v.push(',');
                        v.push_str(value);
                    })
                    .or_insert_with(|| value.to_string());
            }
        }
        let host = request
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                request
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        headers.insert(":authority".into(), host.clone());
        headers.insert(":method".into(), request.method.as_str().into());
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        headers.insert(":path".into(), path.into());
        let peer = |address: Option<SocketAddr>, principal: String, certificate: String| {
            attribute_context::Peer {
                address: address.map(|a| envoy_types::pb::envoy::config::core::v3::Address {
                    address: Some(
                        envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                            envoy_types::pb::envoy::config::core::v3::SocketAddress {
                                address: a.ip().to_string(),
                                port_specifier: Some(
                                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                                        u32::from(a.port()),
                                    ),
                                ),
                                ..Default::default()
                            },
                        ),
                    ),
                }),
                principal,
                certificate,
                ..Default::default()
            }
        };
        let principal = facts
            .peer
            .map(|p| {
                p.uris
                    .first()
                    .or(p.dns_names.first())
                    .cloned()
                    .unwrap_or_else(|| p.subject.clone())
            })
            .unwrap_or_default();
        let certificate = if self.include_peer_certificate {
            facts.peer.map(|p| p.subject.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(facts.source, principal, certificate)),
                destination: Some(peer(facts.destination, String::new(), String::new())),
                request: Some(attribute_context::Request {
                    time: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| envoy_types::pb::google::protobuf::Timestamp {
                            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                        }),
                    http: Some(attribute_context::HttpRequest {
                        id: facts.request_id.to_string(),
                        method: request.method.as_str().to_string(),
                        headers,
                        path: path.to_string(),
                        host,
                        scheme: facts.scheme.to_string(),
                        query: request.uri.query().unwrap_or("").to_string(),
                        protocol: facts.protocol.to_string(),
                        ..Default::default()
                    }),
                }),
                context_extensions: facts.context_extensions.clone(),
                ..Default::default()
            }),
        }
    }
}

/// A gRPC `CheckResponse` as a decision.
fn decision(response: CheckResponse) -> Decision {
    let options = |list: Vec<HeaderValueOption>| {
        let (mut set, mut append) = (Vec::new(), Vec::new());
        for option in list {
            let Some(header) = option.header else {
                continue;
            };
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.key.to_ascii_lowercase().as_bytes()),
                HeaderValue::from_str(&header.value),
            ) else {
                continue;
            };
            // APPEND_IF_EXISTS_OR_ADD (0) is Envoy's default, and `append: true` asks it
            // too; the other actions replace.
            #[allow(deprecated)]
            let appends = option.append.map_or(option.append_action == 0, |a| a.value);
            if appends {
                append.push((name, value));
            } else {
                set.push((name, value));
            }
        }
        (set, append)
    };
    let ok = response.status.as_ref().is_none_or(|s| s.code == 0);
    match (ok, response.http_response) {
        (true, Some(check_response::HttpResponse::OkResponse(ok))) => {
            let (set, append) = options(ok.headers);
            let (response_set, response_append) = options(ok.response_headers_to_add);
            Decision::Allow {
                set,
                append,
                remove: ok
                    .headers_to_remove
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                    .collect(),
                response: response_set.into_iter().chain(response_append).collect(),
            }
        }
        (true, _) => Decision::Allow {
            set: Vec::new(),
            append: Vec::new(),
            remove: Vec::new(),
            response: Vec::new(),
        },
        (false, http_response) => {
            let denied = match http_response {
                Some(check_response::HttpResponse::DeniedResponse(d)) => d,
                _ => Default::default(),
            };
            let status = denied
                .status
                .as_ref()
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| (200..600).contains(c))
                .unwrap_or(403);
            let (set, append) = options(denied.headers);
            Decision::Deny {
                status,
                headers: set.into_iter().chain(append).collect(),
                body: denied.body.into(),
            }
        }
    }
}

fn callout(
    cluster: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Duration,
) -> Callout {
    Callout {
        token: 0,
        context: 0,
        upstream: cluster.to_string(),
        headers,
        body,
        trailers: Vec::new(),
        timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue as XdsHeader;
    use envoy_types::pb::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
    use envoy_types::pb::google::rpc::Status;

    fn option(key: &str, value: &str, append_action: i32) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(XdsHeader {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
            append_action,
            ..Default::default()
        }
    }

    #[test]
    fn grpc_answers_become_decisions() {
        let ok = decision(CheckResponse {
            status: Some(Status::default()),
            http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![option("x-user", "alice", 2), option("x-tag", "a", 0)],
                headers_to_remove: vec!["Authorization".into()],
                response_headers_to_add: vec![option("x-checked", "yes", 2)],
                ..Default::default()
            })),
            ..Default::default()
        });
        let h = |n: &'static str, v: &'static str| {
            (HeaderName::from_static(n), HeaderValue::from_static(v))
        };
        assert_eq!(
            ok,
            Decision::Allow {
                set: vec![h("x-user", "alice")],
                append: vec![h("x-tag", "a")],
                remove: vec![http::header::AUTHORIZATION],
                response: vec![h("x-checked", "yes")],
            }
        );
        let denied = decision(CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            http_response: Some(check_response::HttpResponse::DeniedResponse(
                DeniedHttpResponse {
                    status: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 401 }),
                    headers: vec![option("www-authenticate", "Basic", 2)],
                    body: "who are you".into(),
                },
            )),
            ..Default::default()
        });
        assert_eq!(
            denied,
            Decision::Deny {
                status: 401,
                headers: vec![h("www-authenticate", "Basic")],
                body: bytes::Bytes::from_static(b"who are you"),
            }
        );
        let bare_denial = decision(CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(matches!(bare_denial, Decision::Deny { status: 403, .. }));
    }
}
