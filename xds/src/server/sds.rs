//! Envoy's Secret Discovery Service on the same cache as ADS, for clients whose config
//! names an SDS `api_config_source` instead of ADS: the same streams (state of the world
//! and delta), carrying secrets only, and the unary `FetchSecrets`.

use super::{AdsServer, ResponseStream};
use crate::resources::SECRET_TYPE;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio_stream::StreamExt;

/// [`AdsServer`]'s streams restricted to secrets.
#[derive(Debug, Clone)]
pub struct SdsServer(AdsServer);

impl AdsServer {
    /// The Secret Discovery Service over the same cache, registry and identity rules.
    pub fn sds_service(&self) -> SecretDiscoveryServiceServer<SdsServer> {
        SecretDiscoveryServiceServer::new(SdsServer(self.clone()))
    }
}

/// A request's type must be a secret's (an empty type means one, on this service).
fn only_secrets(type_url: &mut String) -> Result<(), tonic::Status> {
    if type_url.is_empty() {
        *type_url = SECRET_TYPE.to_string();
    }
    if type_url != SECRET_TYPE {
        return Err(tonic::Status::invalid_argument(format!(
            "the Secret Discovery Service serves {SECRET_TYPE}, not {type_url}"
        )));
    }
    Ok(())
}

/// `requests` with each one's type checked ([`only_secrets`]) through `type_url`.
fn secrets_only<R: Send + 'static>(
    requests: tonic::Streaming<R>,
    type_url: fn(&mut R) -> &mut String,
) -> impl tokio_stream::Stream<Item = Result<R, tonic::Status>> + Send + Unpin + 'static {
    requests.map(move |request| {
        let mut request = request?;
        only_secrets(type_url(&mut request))?;
        Ok(request)
    })
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsServer {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        let (certified, peer) = self.0.client_of(&request)?;
        let requests = secrets_only(request.into_inner(), |r| &mut r.type_url);
        Ok(tonic::Response::new(self.0.sotw(requests, certified, peer)))
    }

    async fn delta_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        let (certified, peer) = self.0.client_of(&request)?;
        let requests = secrets_only(request.into_inner(), |r| &mut r.type_url);
        Ok(tonic::Response::new(
            self.0.delta(requests, certified, peer),
        ))
    }

    /// The named secrets of the client's view, once (nothing is registered or pushed).
    async fn fetch_secrets(
        &self,
        request: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        let ads = &self.0;
        let certified = ads.certified_node(&request)?;
        let mut request = request.into_inner();
        only_secrets(&mut request.type_url)?;
        let node = request.node.clone().unwrap_or_default();
        if let Some(certified) = certified {
            if node.id != certified {
                return Err(tonic::Status::permission_denied(format!(
                    "node id {:?} is not the node its certificate names ({certified:?})",
                    node.id
                )));
            }
        }
        let region = node.locality.map(|l| l.region).unwrap_or_default();
        let views = ads.cache.views();
        let state = views.for_region(&region);
        let of_type = state.types.get(SECRET_TYPE);
        let resources = request
            .resource_names
            .iter()
            .filter_map(|name| of_type?.resources.get(name))
            .map(|(_, any)| any.clone())
            .collect();
        Ok(tonic::Response::new(DiscoveryResponse {
            version_info: of_type.map(|t| t.version.clone()).unwrap_or_default(),
            resources,
            type_url: SECRET_TYPE.to_string(),
            ..Default::default()
        }))
    }
}
