//! The xDS server side: a snapshot cache and Envoy's Aggregated Discovery Service
//! (state of the world and delta) on tonic.
//!
//! ```text
//! ResourceSet ──SnapshotCache::set──▶ per-type, per-resource versions ──watch──▶ every stream
//! client ──DiscoveryRequest──▶ AdsServer stream task ──DiscoveryResponse (fresh nonce)──▶ client
//!                                   └─ ACK / NACK (error_detail) ──▶ ProxyRegistry
//! ```
//!
//! Each stream keeps, per type URL, what the client subscribed to, the version, nonce and
//! resources last sent. A request whose nonce is not the last one sent is stale and ignored (SotW
//! rule); a request carrying `error_detail` is a NACK and is recorded with its reason; other
//! requests with a nonce ACK the version they carry. When the cache changes, subscribed types
//! are pushed in make-before-break order: CDS, EDS, LDS, RDS. An EDS request for a cluster the
//! cache does not have yet is answered with an empty assignment, so clusters never stay
//! warming. Removal is last: a cluster that leaves the cache is sent once more (with its
//! endpoints) until the listeners and routes have been pushed, then removed. Listener and Cluster responses carry every resource (a missing one is deleted);
//! RouteConfiguration, ClusterLoadAssignment and Secret (SDS) carry the names asked for;
//! secrets are pushed first, before the clusters and listeners that name them.
//!
//! Delta (incremental) xDS is served too (`delta.rs`): the same cache and views, sending
//! only the resources whose version the client does not have, and `removed_resources`.

use crate::resources::{
    ResourceSet, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// The order types are pushed in when the cache changes (make before break): secrets
/// before the clusters and listeners that name them.
pub const PUSH_ORDER: [&str; 5] = [
    SECRET_TYPE,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
];

/// The resources of one type, each with its own content version.
#[derive(Debug, Clone, Default)]
pub struct TypeResources {
    /// A version of the whole type: changes when any of its resources does.
    pub version: String,
    /// Resources by name: (resource version, packed resource).
    pub resources: BTreeMap<String, (String, Any)>,
    /// Resources sent only to clients that ask for them by name: listeners with an
    /// `api_listener` (for proxyless gRPC clients), which a proxy's wildcard subscription
    /// must not get.
    pub named_only: BTreeSet<String>,
}

/// What the cache holds at one moment, for one view.
#[derive(Debug, Clone, Default)]
pub struct CacheState {
    /// What the control plane calls this state (its config version), for status pages.
    pub label: String,
    /// Resources by type URL.
    pub types: HashMap<&'static str, TypeResources>,
}

impl CacheState {
    /// The state holding `resources`, called `label`.
    pub fn new(label: &str, resources: &ResourceSet) -> CacheState {
        let mut types = HashMap::new();
        let mut listeners = type_resources(
            resources
                .listeners
                .iter()
                .map(|r| (r.name.clone(), pack(r))),
        );
        listeners.named_only = resources
            .listeners
            .iter()
            .filter(|l| l.api_listener.is_some())
            .map(|l| l.name.clone())
            .collect();
        types.insert(LISTENER_TYPE, listeners);
        types.insert(
            ROUTE_TYPE,
            type_resources(resources.routes.iter().map(|r| (r.name.clone(), pack(r)))),
        );
        types.insert(
            CLUSTER_TYPE,
            type_resources(resources.clusters.iter().map(|r| (r.name.clone(), pack(r)))),
        );
        types.insert(
            ENDPOINT_TYPE,
            type_resources(
                resources
                    .endpoints
                    .iter()
                    .map(|r| (r.cluster_name.clone(), pack(r))),
            ),
        );
        types.insert(
            SECRET_TYPE,
            type_resources(resources.secrets.iter().map(|r| (r.name.clone(), pack(r)))),
        );
        CacheState {
            label: label.to_string(),
            types,
        }
    }

    /// Whether a client that ACKed `acked` (version by type URL) runs this state: it ACKed
    /// something, and every type it ACKed is at this state's version. Types a client never
    /// subscribed to (a gRPC client takes no RDS here) do not count.
    pub fn is_acked_by(&self, acked: &BTreeMap<String, String>) -> bool {
        !acked.is_empty()
            && acked.iter().all(|(type_url, version)| {
                self.types
                    .get(type_url.as_str())
                    .is_none_or(|of_type| of_type.version == *version)
            })
    }
}

/// Which state each client is served: one for everybody, and overrides by region (a
/// canary rollout serves its region a newer state than the rest).
#[derive(Debug, Clone, Default)]
pub struct Views {
    /// What clients get unless their region has an override.
    pub default: Arc<CacheState>,
    /// Overrides by `node.locality.region`.
    pub by_region: BTreeMap<String, Arc<CacheState>>,
}

impl Views {
    /// The state a client in `region` is served.
    pub fn for_region(&self, region: &str) -> &Arc<CacheState> {
        self.by_region.get(region).unwrap_or(&self.default)
    }
}

/// The resources every connected client is served, swapped whole.
#[derive(Debug)]
pub struct SnapshotCache {
    views: watch::Sender<Arc<Views>>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        SnapshotCache {
            views: watch::Sender::new(Arc::new(Views::default())),
        }
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn pack<M: Message + Name>(message: &M) -> (String, Any) {
    let value = message.encode_to_vec();
    let version = format!("{:016x}", fnv(&value));
    (
        version,
        Any {
            type_url: M::type_url(),
            value,
        },
    )
}

fn type_resources(entries: impl Iterator<Item = (String, (String, Any))>) -> TypeResources {
    let resources: BTreeMap<String, (String, Any)> = entries.collect();
    let mut combined = Vec::new();
    for (name, (version, _)) in &resources {
        combined.extend_from_slice(name.as_bytes());
        combined.push(0);
        combined.extend_from_slice(version.as_bytes());
        combined.push(0);
    }
    TypeResources {
        version: format!("{:016x}", fnv(&combined)),
        resources,
        named_only: BTreeSet::new(),
    }
}

impl SnapshotCache {
    /// Serves `resources` to every client from now on (no overrides); clients whose view
    /// changed get pushes.
    pub fn set(&self, resources: &ResourceSet) {
        self.set_views(Views {
            default: Arc::new(CacheState::new(&resources.version, resources)),
            by_region: BTreeMap::new(),
        });
    }

    /// Serves `views` from now on; clients whose view changed get pushes.
    pub fn set_views(&self, views: Views) {
        self.views.send_replace(Arc::new(views));
    }

    /// The state served to clients without an override.
    pub fn current(&self) -> Arc<CacheState> {
        self.views.borrow().default.clone()
    }

    /// Every view served now.
    pub fn views(&self) -> Arc<Views> {
        self.views.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Views>> {
        self.views.subscribe()
    }
}

/// A NACK a proxy sent: which type, which version it refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// Type URL of the refused response.
    pub type_url: String,
    /// The nonce of the refused response.
    pub nonce: String,
    /// The client's explanation (`error_detail.message`).
    pub reason: String,
    /// When it arrived.
    pub at: SystemTime,
}

/// What the control plane knows about one proxy's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    /// The stream, unique for the life of the control plane: two streams of one node id
    /// (a restart overlapping the old process, a misconfigured pair) are two rows.
    pub stream_id: u64,
    /// `node.id`.
    pub node_id: String,
    /// `node.locality.region`.
    pub region: String,
    /// `node.locality.zone`.
    pub zone: String,
    /// Whether the stream is open.
    pub connected: bool,
    /// When the stream closed (rows are forgotten [`DISCONNECTED_RETENTION`] later).
    pub disconnected_at: Option<SystemTime>,
    /// Version ACKed per type URL.
    pub acked: BTreeMap<String, String>,
    /// The last NACK, if any (cleared by a later ACK of the same type).
    pub last_nack: Option<Nack>,
    /// The address the stream comes from.
    pub address: Option<std::net::IpAddr>,
    /// Whether the stream's node is the one its client certificate names (a mesh member).
    pub certified: bool,
}

/// How long a closed stream's row stays listed (so `nip get proxies` shows a proxy that
/// just went away), before it is forgotten.
pub const DISCONNECTED_RETENTION: Duration = Duration::from_secs(600);

/// Every open stream, and streams closed within the retention time, by stream id.
#[derive(Debug)]
pub struct ProxyRegistry {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    next_stream: std::sync::atomic::AtomicU64,
    retention: Duration,
    /// The mesh's members (certified node → address), watched by the control plane.
    members: watch::Sender<BTreeMap<String, std::net::IpAddr>>,
}

impl Default for ProxyRegistry {
    fn default() -> Self {
        ProxyRegistry::with_retention(DISCONNECTED_RETENTION)
    }
}

impl ProxyRegistry {
    /// A registry that forgets closed streams after `retention`.
    pub fn with_retention(retention: Duration) -> Self {
        ProxyRegistry {
            proxies: Mutex::new(BTreeMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            retention,
            members: watch::channel(BTreeMap::new()).0,
        }
    }

    /// The mesh's members: each certified node ever seen, with the address its latest
    /// stream came from (a node that left keeps its address until it comes back).
    pub fn mesh_members(&self) -> BTreeMap<String, std::net::IpAddr> {
        self.members.borrow().clone()
    }

    /// Changes whenever [`ProxyRegistry::mesh_members`] changes.
    pub fn watch_members(&self) -> watch::Receiver<BTreeMap<String, std::net::IpAddr>> {
        self.members.subscribe()
    }

    /// Records where a stream comes from and whether its node is certified; a certified
    /// node at a new address changes the mesh's members.
    fn set_peer(&self, stream: u64, address: Option<std::net::IpAddr>, certified: bool) {
        let mut node = None;
        self.update(stream, |status| {
            status.address = address;
            status.certified = certified;
            node = Some(status.node_id.clone());
        });
        if let (true, Some(node), Some(address)) = (certified, node, address) {
            self.members
                .send_if_modified(|members| members.insert(node, address) != Some(address));
        }
    }

    /// A copy of every stream's status (closed streams past the retention are dropped).
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut proxies = self.lock();
        self.forget_old(&mut proxies);
        proxies.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget_old(&self, proxies: &mut BTreeMap<u64, ProxyStatus>) {
        let now = SystemTime::now();
        proxies.retain(|_, p| {
            p.disconnected_at
                .is_none_or(|at| now.duration_since(at).unwrap_or_default() < self.retention)
        });
    }

    /// Records a client's answer to a response: a NACK (with `error_detail`) becomes its
    /// last NACK; an ACK records `version` for the type and clears a NACK of that type.
    fn record_reply(
        &self,
        stream: u64,
        type_url: &str,
        nonce: &str,
        error: Option<&envoy_types::pb::google::rpc::Status>,
        version: &str,
    ) {
        match error {
            Some(error) => {
                let nack = Nack {
                    type_url: type_url.to_string(),
                    nonce: nonce.to_string(),
                    reason: error.message.clone(),
                    at: SystemTime::now(),
                };
                self.update(stream, |status| status.last_nack = Some(nack));
            }
            None => self.update(stream, |status| {
                if status
                    .last_nack
                    .as_ref()
                    .is_some_and(|n| n.type_url == type_url)
                {
                    status.last_nack = None;
                }
                status
                    .acked
                    .insert(type_url.to_string(), version.to_string());
            }),
        }
    }

    /// Records a new stream from the node of its first request; returns the stream id,
    /// the node id and the region (which picks the stream's view).
    fn connect(
        &self,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    ) -> (u64, String, String) {
        let node = node.cloned().unwrap_or_default();
        let locality = node.locality.unwrap_or_default();
        let region = locality.region.clone();
        let stream = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut proxies = self.lock();
        self.forget_old(&mut proxies);
        proxies.insert(
            stream,
            ProxyStatus {
                stream_id: stream,
                node_id: node.id.clone(),
                region: locality.region,
                zone: locality.zone,
                connected: true,
                disconnected_at: None,
                acked: BTreeMap::new(),
                last_nack: None,
                address: None,
                certified: false,
            },
        );
        (stream, node.id, region)
    }

    /// The stream closed.
    fn disconnect(&self, stream: u64) {
        self.update(stream, |status| {
            status.connected = false;
            status.disconnected_at = Some(SystemTime::now());
        });
    }

    fn update(&self, stream: u64, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.lock().get_mut(&stream) {
            change(status);
        }
    }
}

/// What one stream sent of one type.
#[derive(Debug, Default)]
struct Subscription {
    /// Names asked for; empty means everything (wildcard) for Listener and Cluster.
    names: BTreeSet<String>,
    /// Version last sent, and its nonce.
    sent_version: Option<String>,
    nonce: String,
    /// The resources of the last response, by name: a cluster being removed is kept from
    /// here (with its endpoints) until the routes that used it have been replaced.
    sent: BTreeMap<String, Any>,
}

/// Envoy's Aggregated Discovery Service over a [`SnapshotCache`].
#[derive(Debug, Clone)]
pub struct AdsServer {
    cache: Arc<SnapshotCache>,
    registry: Arc<ProxyRegistry>,
    /// When set, every stream must come with a client certificate of this trust domain
    /// naming a node, and may only speak as that node.
    trust_domain: Option<String>,
}

impl AdsServer {
    /// A server for `cache`, recording clients in `registry`.
    pub fn new(cache: Arc<SnapshotCache>, registry: Arc<ProxyRegistry>) -> Self {
        AdsServer {
            cache,
            registry,
            trust_domain: None,
        }
    }

    /// Requires each stream's client certificate (mutual TLS, served by the caller) to name
    /// a node of `trust_domain` (`spiffe://TRUST_DOMAIN/node/ID`), and binds the stream to
    /// that node: a request claiming another `node.id` ends it with `PERMISSION_DENIED`.
    pub fn require_node_identity(mut self, trust_domain: &str) -> Self {
        self.trust_domain = Some(trust_domain.to_string());
        self
    }

    /// The node the stream's client certificate names, when identities are required.
    fn certified_node<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<Option<String>, tonic::Status> {
        match &self.trust_domain {
            None => Ok(None),
            Some(trust_domain) => {
                crate::identity::certified_node(request, trust_domain, "ADS").map(Some)
            }
        }
    }

    /// The tonic service, with a message limit big enough for large configs.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// One ADS stream's state.
struct StreamState {
    /// The registry's id of this stream, once its node is known.
    stream_id: Option<u64>,
    node_id: Option<String>,
    /// `node.locality.region`: picks the stream's view.
    region: String,
    subscriptions: HashMap<String, Subscription>,
    next_nonce: u64,
    registry: Arc<ProxyRegistry>,
}

impl StreamState {
    /// Handles one request; returns the response to send, if any.
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        cache: &CacheState,
    ) -> Option<DiscoveryResponse> {
        let stream_id = self.stream_id.unwrap_or_default();
        let type_url = request.type_url.clone();
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        if !request.response_nonce.is_empty()
            && subscription.sent_version.is_some()
            && request.response_nonce != subscription.nonce
        {
            return None; // stale: answers an older response than the last one sent
        }
        if !request.response_nonce.is_empty() {
            self.registry.record_reply(
                stream_id,
                &type_url,
                &request.response_nonce,
                request.error_detail.as_ref(),
                &request.version_info,
            );
        }
        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        let names_changed = names != subscription.names;
        subscription.names = names;
        let current = cache
            .types
            .get(type_url.as_str())
            .map(|t| t.version.clone());
        let fresh = subscription.sent_version.is_none();
        if fresh
            || names_changed
            || (current != subscription.sent_version && request.error_detail.is_none())
        {
            return self.response(&type_url, cache);
        }
        None
    }

    /// The response for `type_url` from `cache`, recorded as sent.
    fn response(&mut self, type_url: &str, cache: &CacheState) -> Option<DiscoveryResponse> {
        self.response_keeping(type_url, cache, &BTreeMap::new())
    }

    /// The response for `type_url` from `cache` plus `retiring` (resources on their way
    /// out, kept one more step), recorded as sent.
    fn response_keeping(
        &mut self,
        type_url: &str,
        cache: &CacheState,
        retiring: &BTreeMap<String, Any>,
    ) -> Option<DiscoveryResponse> {
        let subscription = self.subscriptions.get_mut(type_url)?;
        let empty = TypeResources::default();
        let of_type = cache.types.get(type_url).unwrap_or(&empty);
        let wildcard = subscription.names.is_empty()
            && (type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE);
        let mut sent: BTreeMap<String, Any> = BTreeMap::new();
        if wildcard || type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE {
            // Listener and Cluster responses are the full set (names narrow it when given).
            for (name, (_, any)) in &of_type.resources {
                let listed = if wildcard {
                    !of_type.named_only.contains(name)
                } else {
                    subscription.names.contains(name)
                };
                if listed {
                    sent.insert(name.clone(), any.clone());
                }
            }
        } else {
            for name in &subscription.names {
                let any = match of_type.resources.get(name) {
                    Some((_, any)) => any.clone(),
                    // A retiring cluster keeps the endpoints it had; a cluster not warmed
                    // yet gets an empty assignment, so it never stays warming.
                    None if type_url == ENDPOINT_TYPE => match subscription.sent.get(name) {
                        Some(previous) => previous.clone(),
                        None => Any {
                            type_url: ClusterLoadAssignment::type_url(),
                            value: ClusterLoadAssignment {
                                cluster_name: name.clone(),
                                ..Default::default()
                            }
                            .encode_to_vec(),
                        },
                    },
                    None => continue,
                };
                sent.insert(name.clone(), any);
            }
        }
        for (name, any) in retiring {
            sent.entry(name.clone()).or_insert_with(|| any.clone());
        }
        let version = if retiring.is_empty() {
            of_type.version.clone()
        } else {
            format!("{}+retiring", of_type.version)
        };
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        subscription.nonce = nonce.clone();
        subscription.sent_version = Some(version.clone());
        let resources = sent.values().cloned().collect();
        // Only clusters (retiring ones) and endpoints (kept for them) are read back; other
        // types keep nothing per stream.
        if type_url == CLUSTER_TYPE || type_url == ENDPOINT_TYPE {
            subscription.sent = sent;
        }
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Responses for every subscribed type whose version changed, in push order, make
    /// before break: clusters that disappear are first sent once more next to the new ones
    /// (keeping their endpoints), listeners and routes follow, and a last cluster response
    /// removes them — so no route ever points at a cluster the proxy no longer has.
    fn on_cache_change(&mut self, cache: &CacheState) -> Vec<DiscoveryResponse> {
        let changed = |subscription: &Subscription, type_url: &str| {
            let current = cache.types.get(type_url).map(|t| t.version.clone());
            subscription.sent_version.is_some() && subscription.sent_version != current
        };
        let retiring: BTreeMap<String, Any> = match self.subscriptions.get(CLUSTER_TYPE) {
            Some(clusters) if changed(clusters, CLUSTER_TYPE) => {
                let now = cache.types.get(CLUSTER_TYPE);
                clusters
                    .sent
                    .iter()
                    .filter(|(name, _)| now.is_none_or(|t| !t.resources.contains_key(*name)))
                    .map(|(name, any)| (name.clone(), any.clone()))
                    .collect()
            }
            _ => BTreeMap::new(),
        };
        let mut out = Vec::new();
        for type_url in PUSH_ORDER {
            let Some(subscription) = self.subscriptions.get(type_url) else {
                continue;
            };
            if !changed(subscription, type_url) {
                continue;
            }
            if type_url == CLUSTER_TYPE {
                out.extend(self.response_keeping(type_url, cache, &retiring));
            } else {
                out.extend(self.response(type_url, cache));
            }
        }
        if !retiring.is_empty() {
            out.extend(self.response(CLUSTER_TYPE, cache));
        }
        out
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

/// What the state-of-the-world and the delta stream have in common: they learn their
/// client from its first request, answer requests, and push when the cache changes.
trait StreamProtocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// The client's region, once known (picks its view).
    fn region(&self) -> &str;
    /// Learns who the client is from its first request.
    fn identify(&mut self, request: &Self::Request);
    /// The `node.id` a request claims.
    fn claimed_node_id(request: &Self::Request) -> &str;
    /// Handles one request against the client's view.
    fn on_request(&mut self, request: Self::Request, cache: &CacheState) -> Option<Self::Response>;
    /// Pushes what changed in the client's view.
    fn on_cache_change(&mut self, cache: &CacheState) -> Vec<Self::Response>;
    /// The client's node id, once known.
    fn node_id(&self) -> Option<&str>;
    /// The registry's id of the stream, once its node is known.
    fn stream_id(&self) -> Option<u64>;
}

/// Runs one stream until the client goes away, then marks it disconnected.
/// `certified_node`, when set, is the only node id the client may claim.
fn drive<P: StreamProtocol>(
    mut requests: impl Stream<Item = Result<P::Request, tonic::Status>> + Send + Unpin + 'static,
    mut changes: watch::Receiver<Arc<Views>>,
    mut state: P,
    registry: Arc<ProxyRegistry>,
    certified_node: Option<String>,
    peer: Option<std::net::IpAddr>,
) -> ResponseStream<P::Response>
where
    P::Request: prost::Message + Default,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                next = requests.next() => {
                    let request = match next {
                        Some(Ok(request)) => request,
                        // A refused request (the SDS service takes secrets only) tells the
                        // client why; a closed or broken stream just ends.
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                        None => break,
                    };
                    if let Some(certified) = &certified_node {
                        // Only the first request must name the node; later ones may leave it out.
                        let claimed = P::claimed_node_id(&request);
                        let first = state.node_id().is_none();
                        if claimed != certified && (first || !claimed.is_empty()) {
                            tracing::warn!(claimed, certified = %certified, "ADS client claimed another node's id");
                            let _ = tx
                                .send(Err(tonic::Status::permission_denied(format!(
                                    "node id {claimed:?} is not the node its certificate names ({certified:?})"
                                ))))
                                .await;
                            break;
                        }
                    }
                    if state.node_id().is_none() {
                        state.identify(&request);
                        if let Some(stream) = state.stream_id() {
                            registry.set_peer(stream, peer, certified_node.is_some());
                        }
                    }
                    let views = changes.borrow_and_update().clone();
                    let response = state.on_request(request, views.for_region(state.region()));
                    if let Some(response) = response {
                        if tx.send(Ok(response)).await.is_err() {
                            break;
                        }
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let views = changes.borrow_and_update().clone();
                    for response in state.on_cache_change(views.for_region(state.region())) {
                        if tx.send(Ok(response)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        if let Some(stream) = state.stream_id() {
            registry.disconnect(stream);
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

impl StreamProtocol for StreamState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn region(&self) -> &str {
        &self.region
    }

    fn identify(&mut self, request: &DiscoveryRequest) {
        let (stream, node_id, region) = self.registry.connect(request.node.as_ref());
        (self.stream_id, self.node_id, self.region) = (Some(stream), Some(node_id), region);
    }

    fn claimed_node_id(request: &DiscoveryRequest) -> &str {
        request.node.as_ref().map_or("", |n| n.id.as_str())
    }

    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        cache: &CacheState,
    ) -> Option<DiscoveryResponse> {
        StreamState::on_request(self, request, cache)
    }

    fn on_cache_change(&mut self, cache: &CacheState) -> Vec<DiscoveryResponse> {
        StreamState::on_cache_change(self, cache)
    }

    fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    fn stream_id(&self) -> Option<u64> {
        self.stream_id
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (certified, peer) = self.client_of(&request)?;
        Ok(tonic::Response::new(self.sotw(
            request.into_inner(),
            certified,
            peer,
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (certified, peer) = self.client_of(&request)?;
        Ok(tonic::Response::new(self.delta(
            request.into_inner(),
            certified,
            peer,
        )))
    }
}

impl AdsServer {
    /// Who a stream's client is: the node its certificate names (when identities are
    /// required) and the address it comes from.
    fn client_of<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<(Option<String>, Option<std::net::IpAddr>), tonic::Status> {
        Ok((
            self.certified_node(request)?,
            request.remote_addr().map(|a| a.ip()),
        ))
    }

    /// A state-of-the-world stream over `requests`.
    fn sotw(
        &self,
        requests: impl Stream<Item = Result<DiscoveryRequest, tonic::Status>> + Send + Unpin + 'static,
        certified: Option<String>,
        peer: Option<std::net::IpAddr>,
    ) -> ResponseStream<DiscoveryResponse> {
        let state = StreamState {
            stream_id: None,
            node_id: None,
            region: String::new(),
            subscriptions: HashMap::new(),
            next_nonce: 0,
            registry: Arc::clone(&self.registry),
        };
        drive(
            requests,
            self.cache.subscribe(),
            state,
            Arc::clone(&self.registry),
            certified,
            peer,
        )
    }

    /// A delta (incremental) stream over `requests`.
    fn delta(
        &self,
        requests: impl Stream<Item = Result<DeltaDiscoveryRequest, tonic::Status>>
            + Send
            + Unpin
            + 'static,
        certified: Option<String>,
        peer: Option<std::net::IpAddr>,
    ) -> ResponseStream<DeltaDiscoveryResponse> {
        let state = delta::DeltaStream::new(Arc::clone(&self.registry));
        drive(
            requests,
            self.cache.subscribe(),
            state,
            Arc::clone(&self.registry),
            certified,
            peer,
        )
    }
}

mod delta;
mod sds;
pub use sds::SdsServer;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod registry_tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Locality, Node};

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            locality: Some(Locality {
                region: "eu".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn two_streams_of_one_node_are_two_rows_and_closed_ones_are_forgotten() {
        let registry = ProxyRegistry::with_retention(Duration::from_millis(50));
        let (first, ..) = registry.connect(Some(&node("p")));
        let (second, ..) = registry.connect(Some(&node("p")));
        registry.record_reply(second, "t", "n", None, "v2");
        registry.disconnect(first);
        let rows = registry.list();
        assert_eq!(rows.len(), 2);
        let live = rows.iter().find(|r| r.stream_id == second).unwrap();
        assert!(
            live.connected,
            "the first stream ending does not mark the second"
        );
        assert_eq!(live.acked.get("t").map(String::as_str), Some("v2"));
        std::thread::sleep(Duration::from_millis(80));
        let rows = registry.list();
        assert_eq!(
            rows.len(),
            1,
            "closed streams are forgotten after the retention"
        );
        assert_eq!(rows[0].stream_id, second);
        registry.disconnect(second);
        std::thread::sleep(Duration::from_millis(80));
        assert!(registry.list().is_empty());
    }
}
