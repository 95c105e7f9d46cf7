//! Mesh mutual TLS between NIP proxies: the transport sockets that use a proxy's workload
//! certificate and the mesh's trust bundle (by SDS name), and the control plane's pass that
//! makes every cluster reach the endpoints that are mesh proxies over mutual TLS, expecting
//! each one's own SPIFFE ID, with no per-service config.
//!
//! ```text
//! members (certified nodes and the address each connects from) ─┐
//! ResourceSet: gateway listener is mesh (serves SDS "default") ──┴─ reach_members_over_mtls
//!   └▶ endpoint (member address, gateway port): metadata envoy.transport_socket_match
//!        {nip.mesh_identity: spiffe://TD/node/N}
//!   └▶ its cluster (no TLS of its own): transport_socket_matches entry for that identity,
//!        mesh mutual TLS with the URI SAN exactly that identity
//! ```

use crate::identity::SpiffeId;
use crate::resources::names;
use crate::secrets::{TRUST_BUNDLE, WORKLOAD_CERTIFICATE};
use crate::ResourceSet;
use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{
    address, transport_socket, Metadata, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher, CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
    SdsSecretConfig, SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{value, BoolValue, Struct, Value};
use prost::{Message, Name};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// An SDS reference over ADS.
fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(crate::resources::ads_config_source()),
    }
}

fn tls_socket<M: Message + Name>(context: M) -> TransportSocket {
    TransportSocket {
        name: names::TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(
            envoy_types::pb::google::protobuf::Any {
                type_url: M::type_url(),
                value: context.encode_to_vec(),
            },
        )),
    }
}

/// A URI SAN matcher.
fn uri(pattern: string_matcher::MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(pattern),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Mesh mutual TLS on a listener: the workload certificate, clients verified against the
/// mesh's trust bundle.
pub fn downstream_tls() -> TransportSocket {
    tls_socket(DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_CERTIFICATE)],
            alpn_protocols: vec!["h2".to_string(), "http/1.1".to_string()],
            validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                sds(TRUST_BUNDLE),
            )),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    })
}

/// Mesh mutual TLS to endpoints: the workload certificate, the mesh's trust bundle, and
/// the endpoint's names checked by `matchers` (none: any SPIFFE ID, since the mesh's CA
/// issues IDs of its own trust domain only).
pub fn upstream_tls(sni: Option<String>, matchers: Vec<SubjectAltNameMatcher>) -> TransportSocket {
    let matchers = if matchers.is_empty() {
        vec![uri(string_matcher::MatchPattern::Prefix(
            "spiffe://".into(),
        ))]
    } else {
        matchers
    };
    tls_socket(UpstreamTlsContext {
        sni: sni.unwrap_or_default(),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_CERTIFICATE)],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: matchers,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(TRUST_BUNDLE)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The server name a sidecar sends when it reaches a meshed peer: the peer's inbound
/// listener tells mesh mutual TLS from an application's own TLS by it (Istio tells them
/// apart by ALPN; an SNI match comes first in Envoy's order and needs no ALPN of its own).
pub const MESH_SNI: &str = "mesh.nip.internal";

/// Where mesh proxies take mesh mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshPorts {
    /// At their gateway listener's port.
    Gateway(u16),
    /// At any port of their address: sidecars whose inbound listener takes every
    /// redirected connection, and mesh TLS by [`MESH_SNI`].
    Sidecar,
}

/// Where mesh proxies take mesh mutual TLS, when the resources make them take it at all:
/// a sidecar inbound listener or a gateway listener that serves the workload certificate.
pub fn mesh_ports(resources: &ResourceSet) -> Option<MeshPorts> {
    let serves_workload_certificate = |name: &str| {
        resources.listeners.iter().any(|l| {
            l.name == name && crate::secrets::referenced([l], []).contains(WORKLOAD_CERTIFICATE)
        })
    };
    if serves_workload_certificate(crate::resources::SIDECAR_INBOUND) {
        return Some(MeshPorts::Sidecar);
    }
    mesh_listener_port(resources).map(MeshPorts::Gateway)
}

/// The port of the gateway listener when it is a mesh listener (it serves the workload
/// certificate): the port every mesh proxy takes mesh mutual TLS on.
pub fn mesh_listener_port(resources: &ResourceSet) -> Option<u16> {
    let listener = resources
        .listeners
        .iter()
        .find(|l| l.name == crate::resources::GATEWAY_LISTENER)?;
    if !crate::secrets::referenced([listener], []).contains(WORKLOAD_CERTIFICATE) {
        return None;
    }
    match listener.address.as_ref()?.address.as_ref()? {
        address::Address::SocketAddress(sa) => match sa.port_specifier {
            Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    port,
                ),
            ) => u16::try_from(port).ok(),
            _ => None,
        },
        _ => None,
    }
}

fn string_value(text: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(text.to_string())),
    }
}

/// Makes every cluster with no TLS of its own reach its endpoints that are mesh proxies
/// (a member's address at the mesh listener's port; any port of it for sidecars, with
/// [`MESH_SNI`]) over mesh mutual TLS expecting that member's SPIFFE ID. `members`: node
/// id → the address it connects from. Nothing changes when no listener is a mesh one.
pub fn reach_members_over_mtls(
    resources: &mut ResourceSet,
    trust_domain: &str,
    members: &BTreeMap<String, IpAddr>,
) {
    let Some(ports) = mesh_ports(resources) else {
        return;
    };
    let by_address: BTreeMap<IpAddr, String> = members
        .iter()
        .filter_map(|(node, ip)| {
            let id = SpiffeId::node(trust_domain, node).ok()?;
            Some((*ip, id.to_string()))
        })
        .collect();
    // A sidecar's tcp_proxy clusters stay plaintext (see translate::tcp_cluster_name).
    let eligible: std::collections::BTreeSet<String> = resources
        .clusters
        .iter()
        .filter(|c| c.transport_socket.is_none() && c.transport_socket_matches.is_empty())
        .filter(|c| !crate::resources::is_tcp_cluster(&c.name))
        .map(|c| c.name.clone())
        .collect();
    let mut identities: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for assignment in &mut resources.endpoints {
        if !eligible.contains(&assignment.cluster_name) {
            continue;
        }
        for lb in assignment
            .endpoints
            .iter_mut()
            .flat_map(|l| l.lb_endpoints.iter_mut())
        {
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                endpoint.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let at_mesh_port = match ports {
                MeshPorts::Sidecar => true,
                MeshPorts::Gateway(port) => matches!(
                    sa.port_specifier,
                    Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p))
                        if u16::try_from(p) == Ok(port)
                ),
            };
            let Some(identity) = sa
                .address
                .parse::<IpAddr>()
                .ok()
                .filter(|_| at_mesh_port)
                .and_then(|ip| by_address.get(&ip))
            else {
                continue;
            };
            let metadata = lb.metadata.get_or_insert_with(Metadata::default);
            metadata.filter_metadata.insert(
                names::TRANSPORT_SOCKET_MATCH_METADATA.to_string(),
                Struct {
                    fields: [(
                        names::MESH_IDENTITY_MATCH_FIELD.to_string(),
                        string_value(identity),
                    )]
                    .into(),
                },
            );
            let of_cluster = identities
                .entry(assignment.cluster_name.clone())
                .or_default();
            if !of_cluster.contains(identity) {
                of_cluster.push(identity.clone());
            }
        }
    }
    for cluster in &mut resources.clusters {
        let Some(identities) = identities.get(&cluster.name) else {
            continue;
        };
        for identity in identities {
            cluster.transport_socket_matches.push(TransportSocketMatch {
                name: format!("nip-mesh {identity}"),
                r#match: Some(Struct {
                    fields: [(
                        names::MESH_IDENTITY_MATCH_FIELD.to_string(),
                        string_value(identity),
                    )]
                    .into(),
                }),
                transport_socket: Some(upstream_tls(
                    (ports == MeshPorts::Sidecar).then(|| MESH_SNI.to_string()),
                    vec![uri(string_matcher::MatchPattern::Exact(identity.clone()))],
                )),
            });
        }
    }
    resources.version = resources.content_version();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::resources;

    const MESH: &str = "api_gateway: { address: \"0.0.0.0:8443\", tls: { mesh: true } }\nservices:\n  a: { endpoints: [\"10.0.0.1:8443\", \"10.0.0.2:8443\", \"10.0.0.1:9000\"] }\n  b: { endpoints: [\"10.0.0.1:8443\"], tls: { sni: b.example } }\nroutes:\n  - { service: a }\n  - { match: { path_prefix: /b }, service: b }\n";

    fn identity_of(set: &ResourceSet, cluster: &str, endpoint: usize) -> Option<String> {
        let assignment = set.endpoints.iter().find(|e| e.cluster_name == cluster)?;
        let lb = assignment
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .nth(endpoint)?;
        let labels = lb
            .metadata
            .as_ref()?
            .filter_metadata
            .get(names::TRANSPORT_SOCKET_MATCH_METADATA)?;
        match labels
            .fields
            .get(names::MESH_IDENTITY_MATCH_FIELD)?
            .kind
            .as_ref()?
        {
            value::Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn endpoints_at_a_members_address_and_the_mesh_port_are_reached_as_that_member() {
        let mut set = resources(MESH);
        let members = [("n1".to_string(), "10.0.0.1".parse().unwrap())].into();
        let before = set.version.clone();
        reach_members_over_mtls(&mut set, "td.example", &members);
        assert_ne!(set.version, before, "a new version for the change");
        assert_eq!(
            identity_of(&set, "a", 0).as_deref(),
            Some("spiffe://td.example/node/n1")
        );
        assert_eq!(identity_of(&set, "a", 1), None, "not a member");
        assert_eq!(identity_of(&set, "a", 2), None, "not the mesh port");
        let a = set.clusters.iter().find(|c| c.name == "a").unwrap();
        assert_eq!(a.transport_socket_matches.len(), 1);
        let entry = &a.transport_socket_matches[0];
        let socket = entry.transport_socket.as_ref().unwrap();
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            panic!("typed config");
        };
        let context = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        let common = context.common_tls_context.unwrap();
        assert_eq!(
            common.tls_certificate_sds_secret_configs[0].name,
            WORKLOAD_CERTIFICATE
        );
        let Some(ValidationContextType::CombinedValidationContext(combined)) =
            common.validation_context_type
        else {
            panic!("combined validation context");
        };
        assert_eq!(
            combined.validation_context_sds_secret_config.unwrap().name,
            TRUST_BUNDLE
        );
        let matcher = &combined
            .default_validation_context
            .unwrap()
            .match_typed_subject_alt_names[0];
        assert_eq!(
            matcher.matcher.as_ref().unwrap().match_pattern,
            Some(string_matcher::MatchPattern::Exact(
                "spiffe://td.example/node/n1".into()
            ))
        );
        // A service with TLS of its own keeps it.
        let b = set.clusters.iter().find(|c| c.name == "b").unwrap();
        assert!(b.transport_socket_matches.is_empty());
        assert_eq!(identity_of(&set, "b", 0), None);
    }

    #[test]
    fn sidecars_are_reached_as_members_at_any_port_with_the_mesh_server_name() {
        let mut set = resources(
            "sidecar: { mesh: true }\nservices:\n  a: { endpoints: [\"10.0.0.1:8080\", \"10.0.0.1:6379\", \"10.0.0.2:8080\"], addresses: [\"10.96.0.1:80\"] }\nroutes:\n  - { service: a }\n",
        );
        assert_eq!(mesh_ports(&set), Some(MeshPorts::Sidecar));
        let members = [("n1".to_string(), "10.0.0.1".parse().unwrap())].into();
        reach_members_over_mtls(&mut set, "td.example", &members);
        let n1 = Some("spiffe://td.example/node/n1");
        assert_eq!(identity_of(&set, "a", 0).as_deref(), n1);
        assert_eq!(identity_of(&set, "a", 1).as_deref(), n1);
        assert_eq!(identity_of(&set, "a", 2), None, "not a member");
        // The plaintext cluster the sidecar's tcp_proxy uses for a's address stays so.
        let tcp = crate::resources::tcp_cluster_name("a");
        assert_eq!(identity_of(&set, &tcp, 0), None);
        let a = set.clusters.iter().find(|c| c.name == "a").unwrap();
        let socket = a.transport_socket_matches[0]
            .transport_socket
            .as_ref()
            .unwrap();
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            panic!("typed config");
        };
        let context = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        assert_eq!(context.sni, MESH_SNI);
    }

    #[test]
    fn without_a_mesh_listener_nothing_changes() {
        let plain = MESH.replace(", tls: { mesh: true }", "");
        let mut set = resources(&plain);
        let untouched = set.clone();
        let members = [("n1".to_string(), "10.0.0.1".parse().unwrap())].into();
        reach_members_over_mtls(&mut set, "td.example", &members);
        assert_eq!(set, untouched);
        assert_eq!(mesh_listener_port(&resources(MESH)), Some(8443));
    }
}
