//! Delta (incremental) ADS: `DeltaAggregatedResources` over the same cache and views.
//!
//! Per type the stream keeps what the client subscribed to (wildcard for Listener and
//! Cluster when the first request names nothing, or `*`) and what it has: resource name →
//! version, seeded from `initial_resource_versions` when a client reconnects. A response
//! carries only resources whose version the client lacks, plus `removed_resources` for
//! those it has that are gone (or that it asked for and that do not exist). The server keeps
//! nothing across streams. ACK and NACK are told apart by `error_detail`, as in state of the
//! world; a request whose nonce is not the last one sent still changes subscriptions but
//! acknowledges nothing.

use super::{CacheState, ProxyRegistry, StreamProtocol, PUSH_ORDER};
use crate::resources::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// The version given to the empty assignment sent for a cluster without endpoints.
const EMPTY_ASSIGNMENT_VERSION: &str = "empty";

/// What one delta stream knows of one type.
#[derive(Debug, Default)]
struct DeltaType {
    /// Everything of the type (except resources served by name only).
    wildcard: bool,
    /// Names subscribed explicitly.
    names: BTreeSet<String>,
    /// What the client has: name → version.
    known: HashMap<String, String>,
    /// The nonce of the last response, and the type version it carried.
    nonce: String,
    sent_version: String,
}

/// One delta ADS stream's state.
pub(super) struct DeltaStream {
    stream_id: Option<u64>,
    node_id: Option<String>,
    region: String,
    types: HashMap<String, DeltaType>,
    next_nonce: u64,
    registry: Arc<ProxyRegistry>,
}

impl DeltaStream {
    pub(super) fn new(registry: Arc<ProxyRegistry>) -> DeltaStream {
        DeltaStream {
            stream_id: None,
            node_id: None,
            region: String::new(),
            types: HashMap::new(),
            next_nonce: 0,
            registry,
        }
    }

    /// The response bringing the client's view of `type_url` up to `cache`, if anything
    /// differs (or `always`, for the first answer of a type). Without `removals`, resources
    /// that left the cache stay with the client for now (make before break: they go after
    /// the listeners and routes that used them have been replaced).
    fn response(
        &mut self,
        type_url: &str,
        cache: &CacheState,
        always: bool,
        removals: bool,
        missing_are_removed: &BTreeSet<String>,
    ) -> Option<DeltaDiscoveryResponse> {
        let state = self.types.get_mut(type_url)?;
        let empty = super::TypeResources::default();
        let of_type = cache.types.get(type_url).unwrap_or(&empty);
        let wanted = |name: &str| {
            state.names.contains(name) || (state.wildcard && !of_type.named_only.contains(name))
        };
        let mut resources = Vec::new();
        for (name, (version, any)) in &of_type.resources {
            if wanted(name) && state.known.get(name) != Some(version) {
                state.known.insert(name.clone(), version.clone());
                resources.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        // Gone: no longer wanted, or no longer in the cache (except the empty assignment
        // standing in for a cluster that has no endpoints yet).
        let placeholder = |name: &str| {
            type_url == ENDPOINT_TYPE
                && state.known.get(name).map(String::as_str) == Some(EMPTY_ASSIGNMENT_VERSION)
        };
        let mut removed: Vec<String> = state
            .known
            .keys()
            .filter(|name| {
                !wanted(name)
                    || (removals && !(of_type.resources.contains_key(*name) || placeholder(name)))
            })
            .cloned()
            .collect();
        for name in &removed {
            state.known.remove(name);
        }
        for name in &state.names {
            if of_type.resources.contains_key(name) || state.known.contains_key(name) {
                continue;
            }
            if type_url == ENDPOINT_TYPE {
                // Never leave a cluster warming: an empty assignment until endpoints exist.
                state
                    .known
                    .insert(name.clone(), EMPTY_ASSIGNMENT_VERSION.to_string());
                resources.push(Resource {
                    name: name.clone(),
                    version: EMPTY_ASSIGNMENT_VERSION.to_string(),
                    resource: Some(Any {
                        type_url: ClusterLoadAssignment::type_url(),
                        value: ClusterLoadAssignment {
                            cluster_name: name.clone(),
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    }),
                    ..Default::default()
                });
            } else if missing_are_removed.contains(name) {
                // Asked for and absent: tell the client it does not exist.
                removed.push(name.clone());
            }
        }
        if resources.is_empty() && removed.is_empty() && !always {
            return None;
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        state.nonce = nonce.clone();
        state.sent_version = of_type.version.clone();
        removed.sort();
        Some(DeltaDiscoveryResponse {
            system_version_info: of_type.version.clone(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

impl StreamProtocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn region(&self) -> &str {
        &self.region
    }

    fn identify(&mut self, request: &DeltaDiscoveryRequest) {
        let (stream, node_id, region) = self.registry.connect(request.node.as_ref());
        (self.stream_id, self.node_id, self.region) = (Some(stream), Some(node_id), region);
    }

    fn claimed_node_id(request: &DeltaDiscoveryRequest) -> &str {
        request.node.as_ref().map_or("", |n| n.id.as_str())
    }

    fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    fn stream_id(&self) -> Option<u64> {
        self.stream_id
    }

    fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        cache: &CacheState,
    ) -> Option<DeltaDiscoveryResponse> {
        let type_url = request.type_url.clone();
        let stream_id = self.stream_id.unwrap_or_default();
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            state.wildcard = request.resource_names_subscribe.is_empty()
                && (type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE);
            state.known = request
                .initial_resource_versions
                .clone()
                .into_iter()
                .collect();
        }
        let current = !request.response_nonce.is_empty() && request.response_nonce == state.nonce;
        if current {
            self.registry.record_reply(
                stream_id,
                &type_url,
                &request.response_nonce,
                request.error_detail.as_ref(),
                &state.sent_version,
            );
        }
        let mut newly_named = BTreeSet::new();
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else if state.names.insert(name.clone()) {
                newly_named.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name);
            }
        }
        let changed = !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty();
        if first || changed || (current && request.error_detail.is_none()) {
            return self.response(&type_url, cache, first, true, &newly_named);
        }
        None
    }

    /// Changes in push order, removals last: clusters and endpoints that left the cache
    /// are removed only after the listeners and routes that used them were replaced.
    fn on_cache_change(&mut self, cache: &CacheState) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        let none = BTreeSet::new();
        for type_url in PUSH_ORDER {
            if self.types.contains_key(type_url) {
                out.extend(self.response(type_url, cache, false, false, &none));
            }
        }
        for type_url in PUSH_ORDER {
            if self.types.contains_key(type_url) {
                out.extend(self.response(type_url, cache, false, true, &none));
            }
        }
        out
    }
}
