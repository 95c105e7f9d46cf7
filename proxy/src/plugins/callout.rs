//! `proxy_http_call`: the HTTP client plugins reach named clusters with.
//!
//! A callout goes to a healthy endpoint of the named cluster of the config *in force*,
//! over pingora's connector (pooled keep-alive connections, h2c when the cluster speaks it,
//! TLS when the endpoint's transport has it),
//! under the timeout the plugin gave. Any failure — no such cluster, no healthy endpoint,
//! connect error, timeout, an oversized answer — is delivered to the plugin as an answer
//! with no headers, which is how Envoy reports a failed callout.

use crate::upstream::cluster::Cluster;
use bytes::Bytes;
use nip_filters::host::{Callout, CalloutResponse};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use std::sync::Arc;
use std::time::Duration;

/// The longest a callout may take when the plugin passed no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Callout answers larger than this are refused (delivered as a failed call).
const MAX_RESPONSE_BODY: usize = 4 << 20;
/// Pooled callout connections idle longer than this are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds a cluster of the config in force by name (the config layer above hands it in, so
/// plugins need not know how config is held).
pub type ClusterLookup = Arc<dyn Fn(&str) -> Option<Arc<Cluster>> + Send + Sync>;

/// Performs plugins' HTTP callouts.
pub struct CalloutClient {
    clusters: ClusterLookup,
    connector: Connector,
}

impl std::fmt::Debug for CalloutClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CalloutClient")
    }
}

impl CalloutClient {
    /// A client resolving cluster names through `clusters` at call time.
    pub fn new(clusters: ClusterLookup) -> Self {
        CalloutClient {
            clusters,
            connector: Connector::new(None),
        }
    }

    /// Performs `callout`; a failure is an answer without headers.
    pub async fn call(&self, callout: &Callout) -> CalloutResponse {
        let timeout = if callout.timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            callout.timeout
        };
        if callout.upstream == nip_filters::sdk::TIMER_UPSTREAM {
            // An SDK's timer: no call, an empty answer once the timeout has passed.
            tokio::time::sleep(timeout).await;
            return CalloutResponse::default();
        }
        match tokio::time::timeout(timeout, self.try_call(callout)).await {
            Ok(Ok(response)) => response,
            Ok(Err(reason)) => {
                tracing::debug!(upstream = %callout.upstream, "plugin callout failed: {reason}");
                CalloutResponse::default()
            }
            Err(_) => {
                tracing::debug!(upstream = %callout.upstream, "plugin callout timed out after {timeout:?}");
                CalloutResponse::default()
            }
        }
    }

    async fn try_call(&self, callout: &Callout) -> Result<CalloutResponse, String> {
        let (peer, request) = {
            let cluster = (self.clusters)(&callout.upstream)
                .ok_or_else(|| format!("no cluster {:?}", callout.upstream))?;
            let endpoint = cluster
                .pick(&[])
                .ok_or_else(|| format!("no healthy endpoint in {:?}", callout.upstream))?;
            // Over the endpoint's transport (TLS when the cluster has it), like a request.
            let mut peer = crate::upstream::peer::for_try(endpoint, &cluster, None);
            peer.options.idle_timeout = Some(IDLE_TIMEOUT);
            (peer, request_head(callout)?)
        };
        let (mut session, _reused) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        session
            .write_request_header(Box::new(request))
            .await
            .map_err(|e| format!("write: {e}"))?;
        if !callout.body.is_empty() {
            session
                .write_request_body(Bytes::from(callout.body.clone()), true)
                .await
                .map_err(|e| format!("write body: {e}"))?;
        }
        session
            .finish_request_body()
            .await
            .map_err(|e| format!("finish: {e}"))?;
        session
            .read_response_header()
            .await
            .map_err(|e| format!("read: {e}"))?;
        let mut headers = Vec::new();
        if let Some(head) = session.response_header() {
            headers.reserve(head.headers.len() + 1);
            headers.push((":status".to_string(), head.status.as_u16().to_string()));
            for (name, value) in &head.headers {
                headers.push((
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ));
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = session
            .read_response_body()
            .await
            .map_err(|e| format!("read body: {e}"))?
        {
            if body.len() + chunk.len() > MAX_RESPONSE_BODY {
                return Err(format!("answer larger than {MAX_RESPONSE_BODY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        if session.response_done() {
            self.connector
                .release_http_session(session, &peer, Some(IDLE_TIMEOUT))
                .await;
        }
        Ok(CalloutResponse {
            headers,
            body,
            trailers: Vec::new(),
        })
    }
}

/// The request head of a callout: pseudo-headers become method, path and `Host`.
fn request_head(callout: &Callout) -> Result<RequestHeader, String> {
    let pseudo = |name: &str| {
        callout
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let mut request = RequestHeader::build(pseudo(":method"), pseudo(":path").as_bytes(), None)
        .map_err(|e| format!("bad :method or :path: {e}"))?;
    request
        .insert_header(http::header::HOST, pseudo(":authority"))
        .map_err(|e| format!("bad :authority: {e}"))?;
    for (name, value) in &callout.headers {
        if name.starts_with(':') || name == "host" || name == "content-length" {
            continue;
        }
        request
            .append_header(name.clone(), value.as_str())
            .map_err(|e| format!("bad header {name:?}: {e}"))?;
    }
    request
        .insert_header(http::header::CONTENT_LENGTH, callout.body.len())
        .map_err(|e| format!("content-length: {e}"))?;
    Ok(request)
}
