//! The v4 `auth` short form in xDS: Envoy's `jwt_authn` filter (one provider per
//! `auth.jwt_providers` entry, its payload kept under the provider's name for RBAC; one
//! requirement per route that names one, selected by the route's per-filter config) and
//! Envoy's RBAC filter (`auth.rbac` for every route, a route's own in `RBACPerRoute`). A
//! remote JWKS is fetched through a cluster of its own, `jwks|PROVIDER`) and Envoy's
//! `ext_authz` filter (`auth.ext_authz`, after RBAC; a route may turn it off or give it
//! context).

use super::{load_assignment, pack_any, pb_duration, ServiceConfig};
use crate::config::{
    cidr_parts, is_path_template, jwks_uri_parts, route_name, ClaimConfig, Config, EndpointConfig,
    JwtProviderConfig, JwtRequirementConfig, PermissionConfig, PrincipalConfig, RbacConfig,
    RouteConfig, RouteExtAuthzConfig, RouteRbacConfig, UpstreamTlsConfig, ALLOW_MISSING,
    ALLOW_MISSING_OR_FAILED,
};
use crate::resources::names;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    data_source, grpc_service, http_uri, ApiVersion, CidrRange, DataSource, GrpcService, HttpUri,
    TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac, Permission, Policy, Principal, Rbac as Rules,
};
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    ext_authz, ext_authz_per_route, AuthorizationResponse, CheckSettings, ExtAuthz,
    ExtAuthzPerRoute, HttpService,
};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider, jwt_requirement, per_route_config, JwksAsyncFetch, JwtAuthentication,
    JwtClaimToHeader, JwtHeader, JwtProvider, JwtRequirement, JwtRequirementAndList,
    JwtRequirementOrList, PerRouteConfig, ProviderWithAudiences, RemoteJwks,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{
    Rbac as RbacFilter, RbacPerRoute,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::ListStringMatcher;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    list_matcher, metadata_matcher, path_matcher, string_matcher, value_matcher, ListMatcher,
    MetadataMatcher, PathMatcher, StringMatcher, ValueMatcher,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Any, Empty, UInt32Value};
use std::time::Duration;

/// Name of the cluster a provider's remote JWKS is fetched through.
pub fn jwks_cluster_name(provider: &str) -> String {
    format!("jwks|{provider}")
}

/// The auth HTTP filters of the gateway's connection manager, in the order they run
/// (`nip.tenant` among them, after `jwt_authn`: RBAC may ask for a tenant).
pub(super) fn http_filters(config: &Config) -> Vec<HttpFilter> {
    let mut filters = Vec::new();
    let filter = |name: &str, any: Any| HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any)),
        ..Default::default()
    };
    if !config.auth.jwt_providers.is_empty() {
        filters.push(filter(
            names::JWT_AUTHN,
            pack_any(jwt_authentication(config)),
        ));
    }
    filters.extend(super::tenants::tenant_identity_filter(config));
    let route_rbac = config
        .routes
        .iter()
        .any(|r| r.auth.as_ref().is_some_and(|a| a.rbac.is_some()));
    if config.auth.rbac.is_some() || route_rbac {
        let listener = config.auth.rbac.as_ref();
        let providers = provider_names(config);
        filters.push(filter(
            names::RBAC,
            pack_any(RbacFilter {
                rules: listener.map(|r| rules(r, &providers)),
                shadow_rules: listener
                    .and_then(|r| r.shadow.as_deref())
                    .map(|r| rules(r, &providers)),
                ..Default::default()
            }),
        ));
    }
    if let Some(authz) = &config.auth.ext_authz {
        filters.push(filter(names::EXT_AUTHZ, pack_any(ext_authz(authz))));
    }
    filters
}

fn ext_authz(config: &crate::config::ExtAuthzConfig) -> ExtAuthz {
    let timeout = pb_duration(config.timeout.map_or(Duration::from_millis(200), |t| t.0));
    let names = |list: &[String]| {
        (!list.is_empty()).then(|| ListStringMatcher {
            patterns: list
                .iter()
                .map(|h| exact(&h.to_ascii_lowercase()))
                .collect(),
        })
    };
    let services = if config.protocol.as_deref() == Some("grpc") {
        ext_authz::Services::GrpcService(GrpcService {
            timeout: Some(timeout),
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: config.service.clone(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
    } else {
        ext_authz::Services::HttpService(HttpService {
            server_uri: Some(HttpUri {
                uri: format!("http://{}", config.service),
                timeout: Some(timeout),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                    config.service.clone(),
                )),
            }),
            path_prefix: config.path_prefix.clone().unwrap_or_default(),
            authorization_response: Some(AuthorizationResponse {
                allowed_upstream_headers: names(&config.upstream_headers),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    ExtAuthz {
        services: Some(services),
        failure_mode_allow: config.failure_mode_allow,
        status_on_error: config.status_on_error.map(|code| HttpStatus {
            code: i32::from(code),
        }),
        allowed_headers: names(&config.allowed_headers),
        transport_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// A route's per-filter configs for the auth filters.
pub(super) fn route_configs(
    config: &Config,
    route: &RouteConfig,
    index: usize,
) -> Vec<(String, Any)> {
    let Some(auth) = &route.auth else {
        return Vec::new();
    };
    let mut configs = Vec::new();
    if auth.jwt.is_some() {
        configs.push((
            names::JWT_AUTHN.to_string(),
            pack_any(PerRouteConfig {
                requirement_specifier: Some(
                    per_route_config::RequirementSpecifier::RequirementName(route_name(
                        route, index,
                    )),
                ),
            }),
        ));
    }
    match &auth.ext_authz {
        Some(RouteExtAuthzConfig::Enabled(false)) => configs.push((
            names::EXT_AUTHZ.to_string(),
            pack_any(ExtAuthzPerRoute {
                r#override: Some(ext_authz_per_route::Override::Disabled(true)),
            }),
        )),
        Some(RouteExtAuthzConfig::Context { context }) => configs.push((
            names::EXT_AUTHZ.to_string(),
            pack_any(ExtAuthzPerRoute {
                r#override: Some(ext_authz_per_route::Override::CheckSettings(
                    CheckSettings {
                        context_extensions: context.clone().into_iter().collect(),
                        ..Default::default()
                    },
                )),
            }),
        )),
        _ => {}
    }
    match &auth.rbac {
        None => {}
        Some(RouteRbacConfig::Off(_)) => configs.push((
            names::RBAC.to_string(),
            pack_any(RbacPerRoute { rbac: None }),
        )),
        Some(RouteRbacConfig::Rules(own)) => configs.push((
            names::RBAC.to_string(),
            pack_any(RbacPerRoute {
                rbac: Some(RbacFilter {
                    rules: Some(rules(own, &provider_names(config))),
                    shadow_rules: own
                        .shadow
                        .as_deref()
                        .map(|r| rules(r, &provider_names(config))),
                    ..Default::default()
                }),
            }),
        )),
    }
    configs
}

/// The clusters remote JWKS are fetched through.
pub(super) fn clusters(config: &Config) -> Vec<Cluster> {
    jwks_services(config)
        .map(|(name, service)| super::cluster(&name, &service))
        .collect()
}

/// Their endpoints.
pub(super) fn assignments(config: &Config) -> Vec<ClusterLoadAssignment> {
    jwks_services(config)
        .map(|(name, service)| load_assignment(&name, &service))
        .collect()
}

/// A service for each provider's JWKS host (TLS with the system's roots for https).
fn jwks_services(config: &Config) -> impl Iterator<Item = (String, ServiceConfig)> + '_ {
    config
        .auth
        .jwt_providers
        .iter()
        .filter_map(|(name, provider)| {
            let (https, host, port, _) = jwks_uri_parts(provider.jwks_uri.as_deref()?).ok()?;
            let address = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let service = ServiceConfig {
                endpoints: vec![EndpointConfig {
                    address,
                    region: None,
                    zone: None,
                    sub_zone: None,
                    weight: 1,
                    priority: 0,
                }],
                tls: https.then(|| UpstreamTlsConfig {
                    sni: Some(host),
                    ..Default::default()
                }),
                ..Default::default()
            };
            Some((jwks_cluster_name(name), service))
        })
}

/// The providers' names (a claim without `provider` may come from any of them).
fn provider_names(config: &Config) -> Vec<String> {
    config.auth.jwt_providers.keys().cloned().collect()
}

fn jwt_authentication(config: &Config) -> JwtAuthentication {
    JwtAuthentication {
        providers: config
            .auth
            .jwt_providers
            .iter()
            .map(|(name, p)| (name.clone(), jwt_provider(name, p)))
            .collect(),
        requirement_map: config
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, route)| {
                let jwt = route.auth.as_ref()?.jwt.as_ref()?;
                Some((route_name(route, i), requirement(jwt)))
            })
            .collect(),
        ..Default::default()
    }
}

fn jwt_provider(name: &str, p: &JwtProviderConfig) -> JwtProvider {
    let source = match (&p.jwks_uri, &p.jwks) {
        (Some(uri), _) => jwt_provider::JwksSourceSpecifier::RemoteJwks(RemoteJwks {
            http_uri: Some(HttpUri {
                uri: uri.clone(),
                timeout: Some(pb_duration(
                    p.fetch_timeout.map_or(Duration::from_secs(1), |d| d.0),
                )),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(jwks_cluster_name(
                    name,
                ))),
            }),
            cache_duration: p.cache_duration.map(|d| pb_duration(d.0)),
            async_fetch: Some(JwksAsyncFetch {
                fast_listener: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
        (None, jwks) => jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(
                jwks.clone().unwrap_or_default(),
            )),
            ..Default::default()
        }),
    };
    JwtProvider {
        issuer: p.issuer.clone().unwrap_or_default(),
        audiences: p.audiences.clone(),
        require_expiration: p.require_expiration,
        max_lifetime: p.max_lifetime.map(|d| pb_duration(d.0)),
        forward: p.forward,
        from_headers: p
            .from_headers
            .iter()
            .map(|h| JwtHeader {
                name: h.name.to_ascii_lowercase(),
                value_prefix: h.prefix.clone(),
            })
            .collect(),
        from_params: p.from_params.clone(),
        from_cookies: p.from_cookies.clone(),
        forward_payload_header: p.forward_payload_header.clone().unwrap_or_default(),
        payload_in_metadata: name.to_string(),
        claim_to_headers: p
            .claim_to_headers
            .iter()
            .map(|(header, claim)| JwtClaimToHeader {
                header_name: header.to_ascii_lowercase(),
                claim_name: claim.clone(),
                ..Default::default()
            })
            .collect(),
        clock_skew_seconds: p
            .clock_skew
            .map_or(0, |d| u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX)),
        jwks_source_specifier: Some(source),
        // Clients send the same token again and again: remember verified ones.
        jwt_cache_config: Some(
            envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtCacheConfig {
                jwt_cache_size: 100,
                ..Default::default()
            },
        ),
        ..Default::default()
    }
}

fn requirement(r: &JwtRequirementConfig) -> JwtRequirement {
    use jwt_requirement::RequiresType;
    let requires = match r {
        JwtRequirementConfig::Name(name) if name == ALLOW_MISSING => {
            RequiresType::AllowMissing(Empty {})
        }
        JwtRequirementConfig::Name(name) if name == ALLOW_MISSING_OR_FAILED => {
            RequiresType::AllowMissingOrFailed(Empty {})
        }
        JwtRequirementConfig::Name(name) => RequiresType::ProviderName(name.clone()),
        JwtRequirementConfig::Rule(rule) => {
            if let Some(any) = &rule.any {
                RequiresType::RequiresAny(JwtRequirementOrList {
                    requirements: any.iter().map(requirement).collect(),
                })
            } else if let Some(all) = &rule.all {
                RequiresType::RequiresAll(JwtRequirementAndList {
                    requirements: all.iter().map(requirement).collect(),
                })
            } else {
                let provider = rule.provider.clone().unwrap_or_default();
                match &rule.audiences {
                    None => RequiresType::ProviderName(provider),
                    Some(audiences) => RequiresType::ProviderAndAudiences(ProviderWithAudiences {
                        provider_name: provider,
                        audiences: audiences.clone(),
                    }),
                }
            }
        }
    };
    JwtRequirement {
        requires_type: Some(requires),
    }
}

fn rules(config: &RbacConfig, providers: &[String]) -> Rules {
    let action = match config.action.as_deref() {
        Some("deny") => rbac::Action::Deny,
        Some("log") => rbac::Action::Log,
        _ => rbac::Action::Allow,
    };
    Rules {
        action: action as i32,
        policies: config
            .policies
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    Policy {
                        permissions: p.permissions.iter().map(permission).collect(),
                        principals: p
                            .principals
                            .iter()
                            .map(|x| principal(x, providers))
                            .collect(),
                        ..Default::default()
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_string())),
        ignore_case: false,
    }
}

fn prefix(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Prefix(value.to_string())),
        ignore_case: false,
    }
}

fn url_path(matcher: StringMatcher) -> PathMatcher {
    PathMatcher {
        rule: Some(path_matcher::Rule::Path(matcher)),
    }
}

fn cidr(range: &str) -> CidrRange {
    let (ip, len) = cidr_parts(range).unwrap_or((std::net::Ipv4Addr::UNSPECIFIED.into(), 32));
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn permission(p: &PermissionConfig) -> Permission {
    use permission::Rule;
    let mut all = Vec::new();
    if p.any {
        all.push(Rule::Any(true));
    }
    if let Some(path) = &p.path {
        all.push(if is_path_template(path) {
            Rule::UriTemplate(TypedExtensionConfig {
                name: "envoy.path.match.uri_template.uri_template_matcher".to_string(),
                typed_config: Some(pack_any(UriTemplateMatchConfig {
                    path_template: path.clone(),
                })),
            })
        } else {
            Rule::UrlPath(url_path(exact(path)))
        });
    }
    if let Some(path_prefix) = &p.path_prefix {
        all.push(Rule::UrlPath(url_path(prefix(path_prefix))));
    }
    if !p.methods.is_empty() {
        let methods = p
            .methods
            .iter()
            .map(|m| Permission {
                rule: Some(Rule::Header(HeaderMatcher {
                    name: ":method".to_string(),
                    header_match_specifier: Some(
                        envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier::StringMatch(exact(&m.to_ascii_uppercase())),
                    ),
                    ..Default::default()
                })),
            })
            .collect();
        all.push(Rule::OrRules(permission::Set { rules: methods }));
    }
    if let Some(header) = &p.header {
        all.push(Rule::Header(super::header_matcher(header)));
    }
    if let Some(port) = p.port {
        all.push(Rule::DestinationPort(u32::from(port)));
    }
    if let Some(not) = &p.not {
        all.push(Rule::NotRule(Box::new(permission(not))));
    }
    let rule = if all.len() == 1 {
        all.remove(0)
    } else {
        Rule::AndRules(permission::Set {
            rules: all
                .into_iter()
                .map(|rule| Permission { rule: Some(rule) })
                .collect(),
        })
    };
    Permission { rule: Some(rule) }
}

fn principal(p: &PrincipalConfig, providers: &[String]) -> Principal {
    use principal::Identifier;
    let mut all = Vec::new();
    if p.any {
        all.push(Identifier::Any(true));
    }
    if p.authenticated {
        all.push(Identifier::Authenticated(principal::Authenticated {
            principal_name: None,
        }));
    }
    if let Some(name) = &p.principal {
        let matcher = match name.strip_suffix('*') {
            Some(start) => prefix(start),
            None => exact(name),
        };
        all.push(Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(matcher),
        }));
    }
    if let Some(range) = &p.source_ip {
        all.push(Identifier::DirectRemoteIp(cidr(range)));
    }
    if let Some(header) = &p.header {
        all.push(Identifier::Header(super::header_matcher(header)));
    }
    if let Some(claim) = &p.claim {
        all.push(claim_identifier(claim, providers));
    }
    if let Some(tenant) = &p.tenant {
        all.push(tenant_identifier(tenant));
    }
    if let Some(not) = &p.not {
        all.push(Identifier::NotId(Box::new(principal(not, providers))));
    }
    let identifier = if all.len() == 1 {
        all.remove(0)
    } else {
        Identifier::AndIds(principal::Set {
            ids: all
                .into_iter()
                .map(|id| Principal {
                    identifier: Some(id),
                })
                .collect(),
        })
    };
    Principal {
        identifier: Some(identifier),
    }
}

/// The request's tenant (dynamic metadata `nip.tenant` → `id`) is `tenant`.
#[allow(deprecated)] // `metadata`: deprecated for `sourced_metadata` in Envoy, still read.
fn tenant_identifier(tenant: &str) -> principal::Identifier {
    principal::Identifier::Metadata(MetadataMatcher {
        filter: names::TENANT_METADATA.to_string(),
        path: vec![metadata_matcher::PathSegment {
            segment: Some(metadata_matcher::path_segment::Segment::Key(
                "id".to_string(),
            )),
        }],
        value: Some(ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::StringMatch(exact(tenant))),
        }),
        invert: false,
    })
}

/// A claim equal to the value, or a list claim holding it, in the payload of the named
/// provider (or of any of `providers`).
#[allow(deprecated)] // `metadata`: deprecated for `sourced_metadata` in Envoy, still read.
fn claim_identifier(claim: &ClaimConfig, providers: &[String]) -> principal::Identifier {
    use principal::Identifier;
    let providers = match &claim.provider {
        Some(p) => std::slice::from_ref(p),
        None => providers,
    };
    let string = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::StringMatch(exact(
            &claim.value,
        ))),
    };
    let list = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(
            ListMatcher {
                match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(string.clone()))),
            },
        ))),
    };
    let mut ids = Vec::new();
    for provider in providers {
        let path: Vec<metadata_matcher::PathSegment> = std::iter::once(provider.clone())
            .chain(claim.name.split('.').map(str::to_string))
            .map(|key| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(key)),
            })
            .collect();
        for value in [&string, &list] {
            ids.push(Principal {
                identifier: Some(Identifier::Metadata(MetadataMatcher {
                    filter: names::JWT_AUTHN.to_string(),
                    path: path.clone(),
                    value: Some(value.clone()),
                    invert: false,
                })),
            });
        }
    }
    Identifier::OrIds(principal::Set { ids })
}
