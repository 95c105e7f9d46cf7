//! The xDS client side: an ADS (state of the world) client that keeps a proxy's
//! [`ResourceSet`] in step with a control plane.
//!
//! ```text
//! control plane ──DiscoveryResponse──▶ AdsClient ──candidate ResourceSet──▶ ResourceSink::apply
//!               ◀── ACK (new version) / NACK (last good version + error_detail) ──┘
//! ```
//!
//! The client subscribes to every Cluster and Listener, then to the ClusterLoadAssignments
//! its clusters need, the RouteConfigurations its listeners name and the Secrets (SDS) both
//! name (but the workload certificate, which the proxy resolves itself). A response replaces the
//! resources of its type (all of them for Listener/Cluster, the named ones for Route/
//! Endpoint); once every listener has its routes and every cluster its endpoints, the whole
//! set goes to the sink — the same compiler the file config goes through. The sink's
//! verdict is the ACK or the NACK (with its reason as `error_detail`); a NACKed response
//! changes nothing, so the proxy keeps serving its last good set. A broken stream is retried
//! with exponential back-off and jitter (10 ms → 15 s), resubscribing with the versions it
//! holds.

use crate::resources::{
    ResourceSet, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE,
};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// First wait before reconnecting.
const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
/// Longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Where the resources go: the proxy compiles and swaps them, or says why it cannot.
pub trait ResourceSink: Send {
    /// Takes a complete set; an error is the NACK's `error_detail`.
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String>;
}

/// The resources received so far, by type and name, and the version ACKed per type.
#[derive(Debug, Default, Clone)]
struct Received {
    listeners: BTreeMap<String, Listener>,
    routes: BTreeMap<String, RouteConfiguration>,
    clusters: BTreeMap<String, Cluster>,
    endpoints: BTreeMap<String, ClusterLoadAssignment>,
    secrets: BTreeMap<String, Secret>,
    versions: BTreeMap<String, String>,
}

impl Received {
    /// Route configuration names the listeners use over RDS.
    fn route_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for listener in self.listeners.values() {
            for chain in &listener.filter_chains {
                for f in &chain.filters {
                    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                        continue;
                    };
                    let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else {
                        continue;
                    };
                    if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) =
                        hcm.route_specifier
                    {
                        names.insert(rds.route_config_name);
                    }
                }
            }
        }
        names
    }

    /// Clusters whose endpoints come over EDS.
    fn endpoint_names(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter(|c| {
                matches!(
                    c.cluster_discovery_type,
                    Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32
                )
            })
            .map(|c| c.name.clone())
            .collect()
    }

    /// Secrets the listeners and clusters name, to ask the server for.
    fn secret_names(&self) -> BTreeSet<String> {
        crate::secrets::to_fetch(self.listeners.values(), self.clusters.values())
    }

    /// Replaces the resources of `response`'s type; a resource that does not decode is an
    /// error naming it.
    fn absorb(&mut self, response: &DiscoveryResponse) -> Result<(), String> {
        fn decode_all<M: Message + Default>(
            response: &DiscoveryResponse,
            name: impl Fn(&M) -> String,
        ) -> Result<BTreeMap<String, M>, String> {
            let mut out = BTreeMap::new();
            for (i, any) in response.resources.iter().enumerate() {
                let message = M::decode(any.value.as_slice())
                    .map_err(|e| format!("resources[{i}] ({}): {e}", any.type_url))?;
                out.insert(name(&message), message);
            }
            Ok(out)
        }
        match response.type_url.as_str() {
            LISTENER_TYPE => self.listeners = decode_all(response, |l: &Listener| l.name.clone())?,
            CLUSTER_TYPE => self.clusters = decode_all(response, |c: &Cluster| c.name.clone())?,
            ROUTE_TYPE => self
                .routes
                .extend(decode_all(response, |r: &RouteConfiguration| {
                    r.name.clone()
                })?),
            ENDPOINT_TYPE => self
                .endpoints
                .extend(decode_all(response, |e: &ClusterLoadAssignment| {
                    e.cluster_name.clone()
                })?),
            SECRET_TYPE => self
                .secrets
                .extend(decode_all(response, |s: &Secret| s.name.clone())?),
            other => return Err(format!("unexpected type {other:?}")),
        }
        Ok(())
    }

    /// The set to apply, once every listener has its routes and every cluster its
    /// endpoints; stale routes and assignments (of removed parents) are left out.
    fn complete_set(&self) -> Option<ResourceSet> {
        let route_names = self.route_names();
        let endpoint_names = self.endpoint_names();
        let secret_names = self.secret_names();
        if !route_names.iter().all(|n| self.routes.contains_key(n))
            || !endpoint_names
                .iter()
                .all(|n| self.endpoints.contains_key(n))
            || !secret_names.iter().all(|n| self.secrets.contains_key(n))
        {
            return None;
        }
        let mut set = ResourceSet {
            listeners: self.listeners.values().cloned().collect(),
            routes: route_names
                .iter()
                .filter_map(|n| self.routes.get(n).cloned())
                .collect(),
            clusters: self.clusters.values().cloned().collect(),
            endpoints: endpoint_names
                .iter()
                .filter_map(|n| self.endpoints.get(n).cloned())
                .collect(),
            secrets: secret_names
                .iter()
                .filter_map(|n| self.secrets.get(n).cloned())
                .collect(),
            version: String::new(),
        };
        set.version = set.content_version();
        Some(set)
    }
}

/// The TLS settings of a connection to the server, asked for at each connect: a renewed
/// client certificate is used from the next connection on (an open stream keeps the
/// session it authenticated).
pub type TlsSettings =
    Arc<dyn Fn() -> Result<tonic::transport::ClientTlsConfig, String> + Send + Sync>;

/// A channel to a control plane at `server` (`http://host:port`): over TLS with `tls`'s
/// settings at this connect (the trust bundle, and a client certificate for mutual TLS),
/// else plaintext. The error holds every cause.
pub async fn connect_channel(
    server: &str,
    tls: Option<&TlsSettings>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::Endpoint;
    let endpoint = match tls {
        None => Endpoint::from_shared(server.to_string()).map_err(|e| e.to_string())?,
        Some(tls) => {
            let https = match server.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => server.to_string(),
            };
            Endpoint::from_shared(https)
                .map_err(|e| e.to_string())?
                .tls_config(tls()?)
                .map_err(|e| format!("TLS settings: {e}"))?
        }
    };
    endpoint.connect().await.map_err(|e| {
        use std::error::Error;
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(inner) = source {
            text.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        text
    })
}

/// Keeps a [`ResourceSink`] in step with an ADS server.
pub struct AdsClient<S: ResourceSink> {
    server: String,
    node: Node,
    sink: S,
    received: Received,
    tls: Option<TlsSettings>,
}

impl<S: ResourceSink> AdsClient<S> {
    /// A client of `server` (`http://host:port`) announcing itself as `node`.
    pub fn new(server: impl Into<String>, node: Node, sink: S) -> Self {
        AdsClient {
            server: server.into(),
            node,
            sink,
            received: Received::default(),
            tls: None,
        }
    }

    /// Speaks to the server over TLS (`https://`), with the settings `tls` gives at each
    /// connect (the trust bundle, and a client certificate for mutual TLS).
    pub fn with_tls(mut self, tls: TlsSettings) -> Self {
        self.tls = Some(tls);
        self
    }

    async fn connect(&self) -> Result<tonic::transport::Channel, String> {
        connect_channel(&self.server, self.tls.as_ref()).await
    }

    /// Runs forever: connects, follows the stream, and reconnects with back-off.
    pub async fn run(mut self) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            match self.follow_stream().await {
                Ok(()) => backoff = INITIAL_BACKOFF,
                Err(e) => tracing::warn!(server = %self.server, "xDS stream: {e}"),
            }
            let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn request(&self, type_url: &str, names: Vec<String>, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_string(),
            resource_names: names,
            version_info: self
                .received
                .versions
                .get(type_url)
                .cloned()
                .unwrap_or_default(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    }

    /// One stream, until it ends. Returns `Ok` when at least one response was handled (so
    /// the next reconnect starts from the shortest back-off).
    async fn follow_stream(&mut self) -> Result<(), String> {
        let channel = self.connect().await.map_err(|e| format!("connect: {e}"))?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let send = |request: DiscoveryRequest| {
            let tx = tx.clone();
            async move {
                tx.send(request)
                    .await
                    .map_err(|_| "stream closed".to_string())
            }
        };
        // The first requests go out with the stream: some servers (grpc-python among them)
        // send no response headers before they have a response to send.
        send(self.request(CLUSTER_TYPE, Vec::new(), "")).await?;
        send(self.request(LISTENER_TYPE, Vec::new(), "")).await?;
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("open: {e}"))?
            .into_inner();
        let mut subscribed = Subscribed::default();
        let mut handled_any = false;
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) if handled_any => return Ok(()),
                Ok(None) => return Err("the server closed the stream".into()),
                Err(e) if handled_any => {
                    tracing::warn!("xDS stream ended: {e}");
                    return Ok(());
                }
                Err(e) => return Err(format!("stream: {e}")),
            };
            handled_any = true;
            let type_url = response.type_url.clone();
            let mut candidate = self.received.clone();
            let verdict = candidate.absorb(&response).and_then(|()| {
                match candidate.complete_set() {
                    Some(set) => self.sink.apply(&set),
                    None => Ok(()), // warming: wait for the rest before applying
                }
            });
            let reply = match verdict {
                Ok(()) => {
                    self.received = candidate;
                    self.received
                        .versions
                        .insert(type_url.clone(), response.version_info.clone());
                    self.request(&type_url, subscribed.names(&type_url), &response.nonce)
                }
                Err(reason) => {
                    tracing::warn!(%type_url, version = %response.version_info, "xDS NACK: {reason}");
                    DiscoveryRequest {
                        error_detail: Some(RpcStatus {
                            code: 3, // INVALID_ARGUMENT
                            message: reason,
                            ..Default::default()
                        }),
                        ..self.request(&type_url, subscribed.names(&type_url), &response.nonce)
                    }
                }
            };
            send(reply).await?;
            // Follow what the accepted listeners and clusters need.
            for (type_url, names) in [
                (SECRET_TYPE, self.received.secret_names()),
                (ROUTE_TYPE, self.received.route_names()),
                (ENDPOINT_TYPE, self.received.endpoint_names()),
            ] {
                if subscribed.replace(type_url, &names) {
                    send(self.request(type_url, names.into_iter().collect(), "")).await?;
                }
            }
        }
    }
}

/// The names subscribed to, per named type (Listener and Cluster are wildcards).
#[derive(Debug, Default)]
struct Subscribed {
    routes: BTreeSet<String>,
    endpoints: BTreeSet<String>,
    secrets: BTreeSet<String>,
}

impl Subscribed {
    fn of(&mut self, type_url: &str) -> Option<&mut BTreeSet<String>> {
        match type_url {
            ROUTE_TYPE => Some(&mut self.routes),
            ENDPOINT_TYPE => Some(&mut self.endpoints),
            SECRET_TYPE => Some(&mut self.secrets),
            _ => None,
        }
    }

    /// The names a request of `type_url` carries: none (wildcard) for Listener and Cluster.
    fn names(&mut self, type_url: &str) -> Vec<String> {
        self.of(type_url)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Takes `names` for `type_url`; whether they differ from what was subscribed (a
    /// secret subscription starts only once something names a secret).
    fn replace(&mut self, type_url: &str, names: &BTreeSet<String>) -> bool {
        let Some(current) = self.of(type_url) else {
            return false;
        };
        if current == names {
            return false;
        }
        *current = names.clone();
        true
    }
}

#[cfg(test)]
mod tests;
