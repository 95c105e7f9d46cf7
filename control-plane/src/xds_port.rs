//! The xDS port: where proxies get their certificates and their config, over TLS.
//!
//! ```text
//! TLS (the control plane's certificate, from its own CA; client certificates optional)
//!  ├─ POST /v1/certificates  {node_id, region, csr}
//!  │     join token (Authorization: Bearer) admitting that node, or a client certificate
//!  │     naming that node (a renewal) ──▶ CA signs spiffe://TD/node/NODE_ID ──▶ chain + bundle
//!  ├─ access logs (gRPC, Envoy's AccessLogService): the same, records of that node only
//!  └─ ADS (gRPC)  needs a client certificate naming a node; the stream speaks only as it
//! ```
//!
//! A proxy without a certificate can do one thing here: present a join token and a CSR.
//! Without an identity (`--plaintext`) the port serves ADS in plaintext to anyone; that is
//! for development and is logged as such.

use crate::auth::{AuthError, Authenticator};
use crate::ca::{CertificateAuthority, MIN_LIFETIME};
use crate::store::Store;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Json;
use nip_xds::identity::{CertificateFacts, SpiffeId};
use nip_xds::server::AdsServer;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// How long the control plane's own serving certificate lives (a restart makes a new one).
pub const SERVER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// The largest certificate request body accepted.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What the certificate endpoint needs.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// Signs.
    pub ca: Arc<CertificateAuthority>,
    /// Checks join tokens.
    pub auth: Authenticator,
    /// Records who got which certificate.
    pub store: Store,
}

/// `POST /v1/certificates`: the JSON a proxy sends.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRequest {
    node_id: String,
    #[serde(default)]
    region: String,
    csr: String,
    /// Shorter than the CA's workload lifetime if asked (never longer).
    #[serde(default)]
    lifetime_seconds: Option<u64>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The node a connection's client certificate names in `trust_domain`, if any.
fn certified_node(request: &Request, trust_domain: &str) -> Option<String> {
    let certificates = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let facts = CertificateFacts::from_der(certificates.first()?).ok()?;
    let id = facts.spiffe_id()?;
    (id.trust_domain == trust_domain)
        .then(|| id.node_id().map(str::to_string))
        .flatten()
}

/// Signs a proxy's CSR for the node its join token or its current certificate admits.
async fn issue(State(issuer): State<Issuer>, request: Request) -> Response {
    let trust_domain = issuer.ca.trust_domain().to_string();
    let renewing_as = certified_node(&request, &trust_domain);
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match axum::body::to_bytes(request.into_body(), MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
    };
    let asked: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(asked) => asked,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    let identity = match SpiffeId::node(&trust_domain, &asked.node_id) {
        Ok(identity) => identity,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("node_id: {e}")),
    };
    // Who asks: the node its certificate names (a renewal), or a join token's holder.
    let actor = if renewing_as.as_deref() == Some(asked.node_id.as_str()) {
        identity.to_string()
    } else {
        match issuer
            .auth
            .authenticate_join(authorization.as_deref())
            .await
        {
            Ok(grant) if grant.scope.admits(&asked.node_id, &asked.region) => {
                format!("join:{}", grant.name)
            }
            Ok(grant) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "join token {:?} is for {}, not node {:?} in region {:?}",
                        grant.name,
                        grant.scope.as_stored(),
                        asked.node_id,
                        asked.region
                    ),
                )
            }
            Err(AuthError::Store(e)) => {
                tracing::error!("certificates: cannot check a join token: {e}");
                return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot check the token");
            }
            Err(e) => {
                let why = match (&renewing_as, e) {
                    (Some(other), _) => format!(
                        "the client certificate names node {other:?}, not {:?}",
                        asked.node_id
                    ),
                    (None, AuthError::Missing) => {
                        "a join token (Authorization: Bearer) or a client certificate naming \
                         the node is required"
                            .to_string()
                    }
                    (None, e) => e.to_string(),
                };
                return refuse(StatusCode::UNAUTHORIZED, why);
            }
        }
    };
    let lifetime = asked
        .lifetime_seconds
        .map(Duration::from_secs)
        .map(|asked| asked.clamp(MIN_LIFETIME, issuer.ca.workload_lifetime()));
    let issued = match issuer.ca.sign_csr(&asked.csr, &identity, lifetime) {
        Ok(issued) => issued,
        Err(e @ crate::ca::CaError::BadCsr(_)) => {
            return refuse(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => {
            tracing::error!("certificates: {e}");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    let not_after_ms = issued
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let detail = format!("{identity} until {not_after_ms} ms");
    if let Err(e) = issuer
        .store
        .record(&actor, "certificate_issued", None, &detail)
        .await
    {
        tracing::error!("certificates: cannot record the issue: {e}");
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot record the issue");
    }
    tracing::info!(identity = %identity, by = %actor, "certificate issued");
    Json(json!({
        "spiffe_id": identity.to_string(),
        "certificate_chain": issued.chain_pem,
        "trust_bundle": issuer.ca.trust_bundle_pem(),
        "not_after_unix_ms": not_after_ms,
    }))
    .into_response()
}

/// The control plane's own certificate (PEM chain and key), made by its CA at start.
#[derive(Debug, Clone)]
pub struct ServingCertificate {
    /// The leaf and its intermediates.
    pub chain_pem: String,
    /// Its private key (made in this process).
    pub key_pem: String,
}

impl ServingCertificate {
    /// A certificate from `ca` naming the `server_names` (DNS names or IPs) and the bind IP
    /// of each address in `binds`.
    pub fn make(
        ca: &CertificateAuthority,
        server_names: &[String],
        binds: &[SocketAddr],
    ) -> Result<ServingCertificate, crate::ca::CaError> {
        let mut ips: Vec<std::net::IpAddr> =
            server_names.iter().filter_map(|n| n.parse().ok()).collect();
        for bind in binds {
            if !bind.ip().is_unspecified() && !ips.contains(&bind.ip()) {
                ips.push(bind.ip());
            }
        }
        let dns: Vec<String> = server_names
            .iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_err())
            .cloned()
            .collect();
        let (issued, key_pem) = ca.issue_server(&dns, &ips, SERVER_CERTIFICATE_LIFETIME)?;
        Ok(ServingCertificate {
            chain_pem: issued.chain_pem,
            key_pem,
        })
    }
}

/// Serves the xDS port until the process ends: with `issuer`, TLS, the certificate
/// endpoint, and ADS and SDS bound to client identities; without, plaintext ADS and SDS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    address: SocketAddr,
    ads: AdsServer,
    issuer: Option<(Issuer, ServingCertificate)>,
    access_logs: Arc<crate::access_logs::AccessLogHub>,
) -> Result<(), String> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let Some((issuer, serving)) = issuer else {
        tracing::warn!(%address, "xDS in plaintext (--plaintext): anyone who reaches this port gets every proxy's config");
        return tonic::transport::Server::builder()
            .add_service(ads.sds_service())
            .add_service(ads.into_service())
            .add_service(
                crate::access_logs::AccessLogReceiver::new(access_logs, None).into_service(),
            )
            .serve_with_incoming(incoming)
            .await
            .map_err(|e| e.to_string());
    };
    let ca = Arc::clone(&issuer.ca);
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &serving.chain_pem,
            &serving.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(
            ca.trust_bundle_pem(),
        ))
        .client_auth_optional(true);
    let certificates = axum::Router::new()
        .route("/v1/certificates", post(issue))
        .with_state(issuer);
    let ads = ads.require_node_identity(ca.trust_domain());
    let receiver = crate::access_logs::AccessLogReceiver::new(
        access_logs,
        Some(ca.trust_domain().to_string()),
    );
    let routes = tonic::service::Routes::from(certificates)
        .add_service(ads.sds_service())
        .add_service(ads.into_service())
        .add_service(receiver.into_service());
    tracing::info!(%address, trust_domain = ca.trust_domain(), "xDS over mutual TLS; certificates at POST /v1/certificates");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        // The certificate endpoint is plain HTTPS (HTTP/1.1 clients); gRPC stays HTTP/2.
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| e.to_string())
}
