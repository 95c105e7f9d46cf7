//! Secrets (Envoy's SDS): TLS material that listeners and clusters name instead of
//! carrying it, so a rotation is a push of one small resource and no listener or cluster
//! changes.
//!
//! ```text
//! Listener / Cluster ──tls_certificate_sds_secret_configs, validation_context_sds_secret_config──▶ names
//! names ──▶ WORKLOAD_CERTIFICATE ("default"): the proxy's own workload certificate, resolved by the
//!                                 proxy itself (its key never leaves it; Istio's agent does the same)
//!       ──▶ every other name: a `Secret` resource from the control plane (TRUST_BUNDLE "ROOTCA":
//!                             the mesh's trust bundle, pushed again when the CA rotates)
//! ```

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, secret, CertificateValidationContext,
    CommonTlsContext, DownstreamTlsContext, Secret, UpstreamTlsContext,
};
use prost::{Message, Name};
use std::collections::BTreeSet;

/// The SDS name of a proxy's own workload certificate (Istio's name), which the proxy
/// resolves from its workload identity instead of asking the control plane.
pub const WORKLOAD_CERTIFICATE: &str = "default";
/// The SDS name of the mesh's trust bundle (Istio's name), served by the control plane.
pub const TRUST_BUNDLE: &str = "ROOTCA";

/// Whether a NIP proxy resolves `name` itself rather than asking for it over SDS.
pub fn is_resolved_locally(name: &str) -> bool {
    name == WORKLOAD_CERTIFICATE
}

/// The SDS names a common TLS context refers to: certificates, then the validation context.
pub fn names_in(common: &CommonTlsContext) -> Vec<String> {
    let mut names: Vec<String> = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|c| c.name.clone())
        .collect();
    match &common.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            names.push(sds.name.clone())
        }
        Some(ValidationContextType::CombinedValidationContext(combined)) => {
            if let Some(sds) = &combined.validation_context_sds_secret_config {
                names.push(sds.name.clone());
            }
        }
        _ => {}
    }
    names
}

/// The common TLS context of a transport socket, if it is a TLS one that decodes.
fn common_of(socket: &TransportSocket) -> Option<CommonTlsContext> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return None;
    };
    if any.type_url == DownstreamTlsContext::type_url() {
        DownstreamTlsContext::decode(any.value.as_slice())
            .ok()?
            .common_tls_context
    } else if any.type_url == UpstreamTlsContext::type_url() {
        UpstreamTlsContext::decode(any.value.as_slice())
            .ok()?
            .common_tls_context
    } else {
        None
    }
}

/// Every SDS name the listeners' filter chains and the clusters' transport sockets (and
/// transport socket matches) refer to.
pub fn referenced<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    clusters: impl IntoIterator<Item = &'a Cluster>,
) -> BTreeSet<String> {
    let sockets = listeners
        .into_iter()
        .flat_map(|l| l.filter_chains.iter().chain(&l.default_filter_chain))
        .filter_map(|chain| chain.transport_socket.as_ref())
        .chain(clusters.into_iter().flat_map(|c| {
            c.transport_socket.iter().chain(
                c.transport_socket_matches
                    .iter()
                    .filter_map(|m| m.transport_socket.as_ref()),
            )
        }));
    sockets
        .filter_map(common_of)
        .flat_map(|common| names_in(&common))
        .collect()
}

/// The names a NIP proxy asks the control plane for: the referenced ones it does not
/// resolve itself.
pub fn to_fetch<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    clusters: impl IntoIterator<Item = &'a Cluster>,
) -> BTreeSet<String> {
    referenced(listeners, clusters)
        .into_iter()
        .filter(|name| !is_resolved_locally(name))
        .collect()
}

/// The mesh's trust bundle as the `ROOTCA` secret: a validation context whose trusted CAs
/// are the PEM roots inline.
pub fn trust_bundle(pem: &str) -> Secret {
    Secret {
        name: TRUST_BUNDLE.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(pem.to_string())),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
    }
}
