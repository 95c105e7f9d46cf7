//! Compiling a connection manager's policy filters — `jwt_authn`, RBAC, `local_ratelimit`
//! — and each route's settings for them (`typed_per_filter_config` under the filter's
//! name). Everything a filter refers to is resolved here: providers named by
//! requirements, requirement names of routes, the cluster a remote JWKS is fetched
//! through; a reference that does not resolve is a NACK naming it.

use super::*;
use crate::policy::jwt::keys::{shared_remote, KeySet, RemoteSource};
use crate::policy::jwt::token::TokenLocation;
use crate::policy::jwt::{JwtAuthn, Provider, ProviderKeys, Requirement, RouteRequirement};
use crate::policy::rbac::{
    Action, MetadataMatch, PathTemplate, Permission, Policy, Principal, RbacFilter, Rules,
    ValueMatch,
};
use crate::policy::{PolicyFilter, RoutePolicy};
use envoy_types::pb::envoy::config::core::v3::{data_source, CidrRange, DataSource};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, Permission as XdsPermission, Principal as XdsPrincipal, Rbac as XdsRules,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    ext_authz_per_route, ExtAuthz as ExtAuthzConfig, ExtAuthzPerRoute,
};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider, jwt_requirement, per_route_config, requirement_rule, JwtAuthentication,
    JwtProvider, JwtRequirement, PerRouteConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3::RateLimit as GlobalRateLimitConfig;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{
    Rbac as XdsRbacFilter, RbacPerRoute,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    list_matcher, value_matcher, MetadataMatcher, StringMatcher, ValueMatcher,
};
use http::HeaderValue;
use std::collections::HashMap;

/// Envoy's default JWKS cache duration.
const DEFAULT_JWKS_CACHE: Duration = Duration::from_secs(600);
/// Envoy's default wait before a failed JWKS fetch is tried again.
const DEFAULT_JWKS_REFETCH: Duration = Duration::from_secs(1);
/// Envoy's default JWKS fetch timeout.
const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(1);

/// The policy filters of one connection manager, by their `http_filters` name, and its
/// `ext_proc` processors (which routes switch on like plugins).
#[derive(Debug, Default)]
pub(super) struct ManagerPolicy {
    /// In `http_filters` order.
    pub filters: Vec<PolicyFilter>,
    names: HashMap<String, usize>,
    /// The `ext_proc` filters.
    pub processors: super::ext_proc::ManagerProcessors,
}

impl ManagerPolicy {
    /// Whether `name` is one of the manager's policy filters (its per-route config is
    /// theirs, not a plugin's).
    pub fn has(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn filter(&self, name: &str) -> Option<&PolicyFilter> {
        self.names.get(name).and_then(|i| self.filters.get(*i))
    }
}

/// The typed config of an HTTP filter.
fn typed_config(
    http: &envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter,
) -> Option<&Any> {
    match &http.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    }
}

impl Compiler<'_> {
    /// The policy filters of `hcm`, compiled.
    pub(super) fn manager_policy(
        &self,
        hcm: &HttpConnectionManager,
        clusters: &BTreeMap<String, Arc<Cluster>>,
    ) -> Result<ManagerPolicy, String> {
        let mut policy = ManagerPolicy::default();
        for (i, http) in hcm.http_filters.iter().enumerate() {
            let Some(any) = typed_config(http) else {
                continue;
            };
            let field = |m: String| format!("http_filters[{i}] {:?}: {m}", http.name);
            let filter = if any.type_url == JwtAuthentication::type_url() {
                let config: JwtAuthentication = decode(any).map_err(field)?;
                let mut authn = jwt_authn(&http.name, &config, clusters).map_err(field)?;
                authn.stats = self.metrics.jwt_authn(&http.name);
                if http.disabled {
                    // Off unless a route's per-route config names a requirement.
                    authn.rules.clear();
                }
                PolicyFilter::Jwt(Arc::new(authn))
            } else if any.type_url == XdsRbacFilter::type_url() {
                let config: XdsRbacFilter = decode(any).map_err(field)?;
                let stat = if config.rules_stat_prefix.is_empty() {
                    http.name.clone()
                } else {
                    config.rules_stat_prefix.clone()
                };
                let mut rbac = self.rbac_filter(&config, &stat).map_err(field)?;
                if http.disabled {
                    rbac.rules = None;
                    rbac.shadow = None;
                }
                PolicyFilter::Rbac(Arc::new(rbac))
            } else if any.type_url == ExtAuthzConfig::type_url() {
                let config: ExtAuthzConfig = decode(any).map_err(field)?;
                let mut authz = ext_authz(&http.name, &config, clusters).map_err(field)?;
                authz.stats = self.metrics.ext_authz(&http.name);
                PolicyFilter::ExtAuthz(Arc::new(authz))
            } else if any.type_url == LocalRateLimit::type_url() {
                // The filter's own token_bucket and descriptors are shared by every route
                // of the manager without a per-route config for it (Envoy's semantics).
                let scope = format!("{}/{}", hcm.stat_prefix, http.name);
                PolicyFilter::LocalRateLimit {
                    name: http.name.as_str().into(),
                    shared: local_rate_limit(&scope, any).map_err(field)?,
                }
            } else if any.type_url == GlobalRateLimitConfig::type_url() {
                let config: GlobalRateLimitConfig = decode(any).map_err(field)?;
                let mut limiter =
                    global_rate_limit(&http.name, &config, clusters).map_err(field)?;
                limiter.stats = self.metrics.global_rate_limit(&http.name);
                PolicyFilter::GlobalRateLimit(Arc::new(limiter))
            } else if http.name == names::TENANT_FILTER
                && any.type_url == envoy_types::pb::google::protobuf::Struct::type_url()
            {
                PolicyFilter::Tenant(Arc::new(self.tenant_identity(any).map_err(field)?))
            } else {
                continue;
            };
            policy.names.insert(http.name.clone(), policy.filters.len());
            policy.filters.push(filter);
        }
        policy.processors = self.manager_processors(hcm, clusters)?;
        Ok(policy)
    }

    fn rbac_filter(&self, config: &XdsRbacFilter, stat: &str) -> Result<RbacFilter, String> {
        if config.matcher.is_some() || config.shadow_matcher.is_some() {
            return Err("matcher and shadow_matcher are not supported; use rules".into());
        }
        Ok(RbacFilter {
            rules: config
                .rules
                .as_ref()
                .map(rules)
                .transpose()
                .map_err(|e| format!("rules.{e}"))?,
            shadow: config
                .shadow_rules
                .as_ref()
                .map(rules)
                .transpose()
                .map_err(|e| format!("shadow_rules.{e}"))?,
            stats: self.metrics.rbac(stat),
        })
    }
}

/// A route's settings for its manager's policy filters.
pub(super) fn route_policy(
    compiler: &Compiler<'_>,
    xds: &envoy_types::pb::envoy::config::route::v3::Route,
    manager: &ManagerPolicy,
) -> Result<RoutePolicy, String> {
    let mut policy = RoutePolicy {
        rate_limit_rules: Arc::new(match &xds.action {
            Some(route::Action::Route(action)) => action
                .rate_limits
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    rate_limit_actions(r).map_err(|e| format!("route.rate_limits[{i}].{e}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        }),
        ..RoutePolicy::default()
    };
    for (name, any) in &xds.typed_per_filter_config {
        let Some(filter) = manager.filter(name) else {
            continue;
        };
        let field = |m: String| format!("typed_per_filter_config[{name:?}]: {m}");
        // A `FilterConfig` wrapper may switch the filter off here, or carry its config.
        let inner = if any.type_url == FilterConfig::type_url() {
            let wrapped: FilterConfig = decode(any).map_err(field)?;
            match (wrapped.disabled, wrapped.config) {
                (true, _) | (false, None) => None,
                (false, Some(inner)) => Some(inner),
            }
        } else {
            Some(any.clone())
        };
        match filter {
            PolicyFilter::Jwt(authn) => {
                policy.jwt = match inner {
                    None => RouteRequirement::Disabled,
                    Some(any) => {
                        let config: PerRouteConfig = decode(&any).map_err(field)?;
                        match config.requirement_specifier {
                            Some(per_route_config::RequirementSpecifier::Disabled(true)) => {
                                RouteRequirement::Disabled
                            }
                            Some(per_route_config::RequirementSpecifier::RequirementName(n)) => {
                                let requirement = authn.requirement_map.get(&n).ok_or_else(|| {
                                    field(format!(
                                        "requirement_name {n:?} is not in the filter's requirement_map"
                                    ))
                                })?;
                                RouteRequirement::Named(Arc::clone(requirement))
                            }
                            _ => RouteRequirement::Rules,
                        }
                    }
                }
            }
            PolicyFilter::Rbac(_) => {
                policy.rbac = Some(match inner {
                    None => None,
                    Some(any) => {
                        let config: RbacPerRoute = decode(&any).map_err(field)?;
                        match config.rbac {
                            // Envoy: an RBACPerRoute without rbac turns RBAC off here.
                            None => None,
                            Some(rbac) => {
                                let stat = format!("{}.{name}", xds.name);
                                Some(Arc::new(compiler.rbac_filter(&rbac, &stat).map_err(field)?))
                            }
                        }
                    }
                });
            }
            PolicyFilter::ExtAuthz(_) => {
                policy.ext_authz = match inner {
                    None => crate::policy::ExtAuthzRoute {
                        disabled: true,
                        ..Default::default()
                    },
                    Some(any) => {
                        let config: ExtAuthzPerRoute = decode(&any).map_err(field)?;
                        match config.r#override {
                            Some(ext_authz_per_route::Override::Disabled(disabled)) => {
                                crate::policy::ExtAuthzRoute {
                                    disabled,
                                    ..Default::default()
                                }
                            }
                            Some(ext_authz_per_route::Override::CheckSettings(settings)) => {
                                if settings.with_request_body.is_some()
                                    || settings.service_override.is_some()
                                {
                                    return Err(field(
                                        "check_settings: only context_extensions and disable_request_body_buffering are supported".into(),
                                    ));
                                }
                                crate::policy::ExtAuthzRoute {
                                    disabled: false,
                                    context_extensions: Arc::new(
                                        settings.context_extensions.into_iter().collect(),
                                    ),
                                }
                            }
                            None => crate::policy::ExtAuthzRoute::default(),
                        }
                    }
                };
            }
            PolicyFilter::Tenant(_) => {
                return Err(field(format!(
                    "per-route config of {} is not supported; a route's own tenant is its metadata {}",
                    names::TENANT_FILTER,
                    names::TENANT_METADATA
                )));
            }
            PolicyFilter::GlobalRateLimit(_) => {
                return Err(field(
                    "per-route config of the ratelimit filter is not supported; the route's rate_limits make its descriptors".into(),
                ));
            }
            PolicyFilter::LocalRateLimit { .. } => {
                let limit = match inner {
                    None => None,
                    Some(any) => local_rate_limit(&xds.name, &any).map_err(field)?,
                };
                policy.rate_limits.push((name.as_str().into(), limit));
            }
        }
    }
    Ok(policy)
}

/// The size of a `TokenBucket`: (max_tokens, tokens_per_fill, fill_interval).
fn token_bucket(
    bucket: &envoy_types::pb::envoy::r#type::v3::TokenBucket,
) -> Result<(u32, u32, Duration), String> {
    if bucket.max_tokens == 0 {
        return Err("max_tokens must be at least 1".into());
    }
    let tokens_per_fill = bucket.tokens_per_fill.as_ref().map_or(1, |t| t.value);
    if tokens_per_fill == 0 {
        return Err("tokens_per_fill must be at least 1".into());
    }
    let fill_interval = bucket
        .fill_interval
        .as_ref()
        .and_then(super::duration)
        .filter(|d| *d >= Duration::from_millis(1))
        .ok_or("fill_interval must be at least 1ms")?;
    Ok((bucket.max_tokens, tokens_per_fill, fill_interval))
}

/// How many values of a per-value descriptor may owe tokens at once before requests of
/// new values pass unlimited (Envoy bounds its dynamic descriptors too).
const ACTIVE_VALUES: usize = 4096;

/// Local rate limits (Envoy's `LocalRateLimit`, a route's per-route config or the
/// filter's own, shared by its routes; the route's `rate_limits` actions make the
/// descriptors they match). `scope` names whose buckets these are (a route, or the
/// connection manager and filter), so a reload keeps them.
fn local_rate_limit(
    scope: &str,
    any: &Any,
) -> Result<Option<Arc<crate::policy::ratelimit::RouteRateLimit>>, String> {
    use crate::policy::ratelimit::{
        shared, BucketKey, DescriptorBucket, DescriptorLimit, KeyedRateLimit,
        LocalRateLimit as Bucket, RouteRateLimit,
    };
    let config: LocalRateLimit = decode(any)?;
    if config.token_bucket.is_none() && config.descriptors.is_empty() {
        return Ok(None);
    }
    let key = |descriptor: String, (max_tokens, tokens_per_fill, fill_interval)| BucketKey {
        route: scope.to_string(),
        descriptor,
        max_tokens,
        tokens_per_fill,
        fill_interval,
    };
    let default = match &config.token_bucket {
        None => None,
        Some(bucket) => {
            let size = token_bucket(bucket).map_err(|e| format!("token_bucket.{e}"))?;
            Some(shared(key(String::new(), size), || {
                Bucket::new(size.0, size.1, size.2)
            }))
        }
    };
    let mut descriptors = Vec::new();
    for (i, descriptor) in config.descriptors.iter().enumerate() {
        let field = |m: String| format!("descriptors[{i}].{m}");
        if descriptor.shadow_mode {
            return Err(field("shadow_mode is not supported".into()));
        }
        let bucket = descriptor
            .token_bucket
            .as_ref()
            .ok_or_else(|| field("token_bucket is missing".into()))?;
        let size = token_bucket(bucket).map_err(|e| field(format!("token_bucket.{e}")))?;
        if descriptor.entries.is_empty() {
            return Err(field("entries must not be empty".into()));
        }
        let entries: Vec<(String, Option<String>)> = descriptor
            .entries
            .iter()
            .map(|e| {
                (
                    e.key.clone(),
                    (!e.value.is_empty()).then(|| e.value.clone()),
                )
            })
            .collect();
        let name = entries
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("*")))
            .collect::<Vec<_>>()
            .join(",");
        let bucket = if entries.iter().any(|(_, v)| v.is_none()) {
            DescriptorBucket::PerValue(shared(key(name, size), || {
                KeyedRateLimit::new(size.0, size.1, size.2, ACTIVE_VALUES)
            }))
        } else {
            DescriptorBucket::Shared(shared(key(name, size), || {
                Bucket::new(size.0, size.1, size.2)
            }))
        };
        descriptors.push(DescriptorLimit { entries, bucket });
    }
    let status = match config.status.as_ref().map(|s| s.code) {
        None | Some(0) => 429,
        Some(code) => u16::try_from(code)
            .ok()
            .filter(|c| (400..600).contains(c))
            .ok_or_else(|| format!("status {code} is not an error status"))?,
    };
    Ok(Some(Arc::new(RouteRateLimit {
        default,
        descriptors,
        status,
        // Envoy's DRAFT_VERSION_03 (1) sends the x-ratelimit-* headers.
        headers: config.enable_x_ratelimit_headers == 1,
    })))
}

/// The actions of one `RateLimit` entry.
fn rate_limit_actions(
    rate_limit: &envoy_types::pb::envoy::config::route::v3::RateLimit,
) -> Result<Vec<crate::policy::ratelimit::DescriptorAction>, String> {
    use crate::policy::ratelimit::DescriptorAction;
    use envoy_types::pb::envoy::config::route::v3::rate_limit::action::ActionSpecifier;
    if rate_limit.stage.is_some()
        || !rate_limit.disable_key.is_empty()
        || rate_limit.limit.is_some()
    {
        return Err("only actions are supported".into());
    }
    let mut actions = Vec::new();
    for (i, action) in rate_limit.actions.iter().enumerate() {
        let field = |m: &str| format!("actions[{i}].{m}");
        actions.push(match &action.action_specifier {
            Some(ActionSpecifier::RequestHeaders(h)) => DescriptorAction::RequestHeader {
                header: header_name(&h.header_name, &field("request_headers.header_name"))?,
                key: h.descriptor_key.clone(),
                skip_if_absent: h.skip_if_absent,
            },
            Some(ActionSpecifier::RemoteAddress(_)) => DescriptorAction::RemoteAddress,
            Some(ActionSpecifier::GenericKey(g)) => DescriptorAction::GenericKey {
                key: if g.descriptor_key.is_empty() {
                    "generic_key".into()
                } else {
                    g.descriptor_key.clone()
                },
                value: g.descriptor_value.clone(),
            },
            Some(ActionSpecifier::Metadata(m)) => {
                let metadata_key = m
                    .metadata_key
                    .as_ref()
                    .ok_or_else(|| field("metadata.metadata_key is missing"))?;
                let namespace = metadata_key.key.as_str();
                if m.source != 0
                    || (namespace != crate::policy::rbac::JWT_METADATA
                        && namespace != crate::policy::rbac::TENANT_METADATA)
                {
                    return Err(field(&format!(
                        "metadata: only dynamic metadata of {} (verified JWT claims) and {} (the request's tenant) is supported",
                        crate::policy::rbac::JWT_METADATA,
                        crate::policy::rbac::TENANT_METADATA,
                    )));
                }
                use envoy_types::pb::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
                let path = metadata_key
                    .path
                    .iter()
                    .map(|s| match &s.segment {
                        Some(Segment::Key(k)) => Ok(k.clone()),
                        _ => Err(field("metadata.metadata_key.path: segments are keys")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if namespace == crate::policy::rbac::TENANT_METADATA {
                    if path != ["id"] || !m.default_value.is_empty() {
                        return Err(field(&format!(
                            "metadata: {namespace} has one key, id, and no default_value"
                        )));
                    }
                    DescriptorAction::Tenant {
                        key: m.descriptor_key.clone(),
                    }
                } else if path.len() < 2 {
                    return Err(field("metadata.metadata_key.path: the provider's payload_in_metadata, then the claim"));
                } else {
                    DescriptorAction::JwtClaim {
                        key: m.descriptor_key.clone(),
                        path,
                        default: (!m.default_value.is_empty()).then(|| m.default_value.clone()),
                    }
                }
            }
            _ => {
                return Err(field(
                    "only request_headers, remote_address, generic_key and metadata (jwt_authn, nip.tenant) are supported",
                ))
            }
        });
    }
    Ok(actions)
}

/// A `JwtAuthentication`.
fn jwt_authn(
    name: &str,
    config: &JwtAuthentication,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Result<JwtAuthn, String> {
    if config.filter_state_rules.is_some() {
        return Err("filter_state_rules is not supported".into());
    }
    let mut providers = HashMap::new();
    let mut written_headers = Vec::new();
    let mut remotes = Vec::new();
    for (provider_name, xds) in &config.providers {
        let provider = jwt_provider(provider_name, xds, clusters)
            .map_err(|e| format!("providers[{provider_name:?}].{e}"))?;
        written_headers.extend(provider.forward_payload_header.iter().cloned());
        written_headers.extend(provider.claim_to_headers.iter().map(|(h, _)| h.clone()));
        if let ProviderKeys::Remote(remote) = &provider.keys {
            if !remotes.iter().any(|r| Arc::ptr_eq(r, remote)) {
                remotes.push(Arc::clone(remote));
            }
        }
        providers.insert(provider_name.clone(), Arc::new(provider));
    }
    let mut requirement_map = HashMap::new();
    for (key, requirement) in &config.requirement_map {
        let compiled = jwt_requirement(requirement, &providers)
            .map_err(|e| format!("requirement_map[{key:?}].{e}"))?;
        requirement_map.insert(key.clone(), Arc::new(compiled));
    }
    let mut rules = Vec::with_capacity(config.rules.len());
    for (i, rule) in config.rules.iter().enumerate() {
        let matcher = rule
            .r#match
            .as_ref()
            .ok_or_else(|| format!("rules[{i}].match is missing"))?;
        let matcher = routes::route_match(matcher).map_err(|e| format!("rules[{i}].{e}"))?;
        let requirement = match &rule.requirement_type {
            None => None,
            Some(requirement_rule::RequirementType::Requires(r)) => Some(Arc::new(
                jwt_requirement(r, &providers).map_err(|e| format!("rules[{i}].requires.{e}"))?,
            )),
            Some(requirement_rule::RequirementType::RequirementName(n)) => {
                Some(Arc::clone(requirement_map.get(n).ok_or_else(|| {
                    format!("rules[{i}].requirement_name {n:?} is not in requirement_map")
                })?))
            }
        };
        rules.push((matcher, requirement));
    }
    written_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    written_headers.dedup();
    Ok(JwtAuthn {
        name: name.into(),
        providers,
        rules,
        requirement_map,
        bypass_cors_preflight: config.bypass_cors_preflight,
        written_headers,
        remotes,
        // Set by the caller, which holds the metrics.
        stats: Default::default(),
    })
}

fn header_name(name: &str, field: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{field}: {name:?} is not a header name"))
}

/// A `JwtProvider`.
fn jwt_provider(
    name: &str,
    xds: &JwtProvider,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Result<Provider, String> {
    let keys = match &xds.jwks_source_specifier {
        None => return Err("remote_jwks or local_jwks is needed".into()),
        Some(jwt_provider::JwksSourceSpecifier::LocalJwks(source)) => {
            let document = inline_data(source).map_err(|e| format!("local_jwks: {e}"))?;
            ProviderKeys::Local(Arc::new(
                KeySet::parse(&document).map_err(|e| format!("local_jwks: {e}"))?,
            ))
        }
        Some(jwt_provider::JwksSourceSpecifier::RemoteJwks(remote)) => {
            if remote.retry_policy.is_some() {
                return Err("remote_jwks.retry_policy is not supported (a failed fetch is tried again after async_fetch.failed_refetch_duration)".into());
            }
            let http_uri = remote
                .http_uri
                .as_ref()
                .ok_or("remote_jwks.http_uri is missing")?;
            let cluster = match &http_uri.http_upstream_type {
                Some(
                    envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                        c,
                    ),
                ) => c.clone(),
                None => return Err("remote_jwks.http_uri.cluster is missing".into()),
            };
            if !clusters.contains_key(&cluster) {
                return Err(format!(
                    "remote_jwks.http_uri.cluster {cluster:?} is not among the clusters"
                ));
            }
            let uri: http::Uri = http_uri
                .uri
                .parse()
                .map_err(|_| format!("remote_jwks.http_uri.uri {:?} is not a URI", http_uri.uri))?;
            let authority = uri
                .authority()
                .ok_or_else(|| format!("remote_jwks.http_uri.uri {:?} has no host", http_uri.uri))?
                .to_string();
            let path = uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string());
            let duration = |d: Option<&PbDuration>, default| {
                d.and_then(super::duration)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(default)
            };
            ProviderKeys::Remote(shared_remote(RemoteSource {
                cluster,
                uri: http_uri.uri.clone(),
                authority,
                path,
                timeout: duration(http_uri.timeout.as_ref(), DEFAULT_JWKS_TIMEOUT),
                cache_duration: duration(remote.cache_duration.as_ref(), DEFAULT_JWKS_CACHE),
                failed_refetch: duration(
                    remote
                        .async_fetch
                        .as_ref()
                        .and_then(|a| a.failed_refetch_duration.as_ref()),
                    DEFAULT_JWKS_REFETCH,
                ),
            }))
        }
    };
    let mut locations = Vec::new();
    for (i, h) in xds.from_headers.iter().enumerate() {
        locations.push(TokenLocation::Header {
            name: header_name(&h.name, &format!("from_headers[{i}].name"))?,
            prefix: h.value_prefix.clone(),
        });
    }
    locations.extend(xds.from_params.iter().cloned().map(TokenLocation::Param));
    locations.extend(xds.from_cookies.iter().cloned().map(TokenLocation::Cookie));
    if locations.is_empty() {
        locations = TokenLocation::defaults();
    }
    let forward_payload_header = match xds.forward_payload_header.as_str() {
        "" => None,
        h => Some(header_name(h, "forward_payload_header")?),
    };
    let mut claim_to_headers = Vec::new();
    for (i, c) in xds.claim_to_headers.iter().enumerate() {
        let header = header_name(
            &c.header_name,
            &format!("claim_to_headers[{i}].header_name"),
        )?;
        let path: Vec<String> = if !c.claim_path.is_empty() {
            c.claim_path.iter().map(|s| s.key.clone()).collect()
        } else {
            c.claim_name.split('.').map(str::to_string).collect()
        };
        if path.iter().any(String::is_empty) {
            return Err(format!("claim_to_headers[{i}]: the claim name is empty"));
        }
        claim_to_headers.push((header, path));
    }
    let subjects = xds
        .subjects
        .as_ref()
        .map(string_match)
        .transpose()
        .map_err(|e| format!("subjects: {e}"))?;
    Ok(Provider {
        name: name.into(),
        id: crate::policy::jwt::cache::next_id(),
        cache_size: match &xds.jwt_cache_config {
            None => 0,
            Some(c) if c.jwt_cache_size == 0 => crate::policy::jwt::cache::DEFAULT_SIZE,
            Some(c) => usize::try_from(c.jwt_cache_size)
                .unwrap_or(usize::MAX)
                .min(100_000),
        },
        issuer: xds.issuer.clone(),
        audiences: xds.audiences.clone(),
        subjects,
        require_expiration: xds.require_expiration,
        max_lifetime: xds.max_lifetime.as_ref().and_then(super::duration),
        forward: xds.forward,
        locations,
        forward_payload_header,
        pad_forward_payload_header: xds.pad_forward_payload_header,
        payload_in_metadata: (!xds.payload_in_metadata.is_empty())
            .then(|| xds.payload_in_metadata.as_str().into()),
        claim_to_headers,
        clock_skew: if xds.clock_skew_seconds == 0 {
            60
        } else {
            u64::from(xds.clock_skew_seconds)
        },
        keys,
    })
}

/// An inline `DataSource` (files are not read by the compiler).
fn inline_data(source: &DataSource) -> Result<String, String> {
    match &source.specifier {
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(data_source::Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| "inline_bytes is not UTF-8".to_string())
        }
        Some(_) => {
            Err("only inline_string and inline_bytes are supported (or use remote_jwks)".into())
        }
        None => Err("empty".into()),
    }
}

/// A `JwtRequirement`.
fn jwt_requirement(
    xds: &JwtRequirement,
    providers: &HashMap<String, Arc<Provider>>,
) -> Result<Requirement, String> {
    let provider = |name: &str| {
        providers
            .get(name)
            .cloned()
            .ok_or_else(|| format!("provider {name:?} is not among the providers"))
    };
    let list = |items: &[JwtRequirement], field: &str| {
        items
            .iter()
            .enumerate()
            .map(|(i, r)| {
                jwt_requirement(r, providers).map_err(|e| format!("{field}.requirements[{i}].{e}"))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &xds.requires_type {
        Some(jwt_requirement::RequiresType::ProviderName(name)) => Requirement::Provider {
            provider: provider(name).map_err(|e| format!("provider_name: {e}"))?,
            audiences: None,
        },
        Some(jwt_requirement::RequiresType::ProviderAndAudiences(p)) => Requirement::Provider {
            provider: provider(&p.provider_name)
                .map_err(|e| format!("provider_and_audiences: {e}"))?,
            audiences: Some(p.audiences.clone()),
        },
        Some(jwt_requirement::RequiresType::RequiresAny(any)) => {
            Requirement::Any(list(&any.requirements, "requires_any")?)
        }
        Some(jwt_requirement::RequiresType::RequiresAll(all)) => {
            Requirement::All(list(&all.requirements, "requires_all")?)
        }
        Some(jwt_requirement::RequiresType::AllowMissingOrFailed(_)) => {
            Requirement::AllowMissingOrFailed
        }
        Some(jwt_requirement::RequiresType::AllowMissing(_)) => Requirement::AllowMissing,
        Some(jwt_requirement::RequiresType::ExtractOnlyWithoutValidation(_)) => {
            return Err(
                "extract_only_without_validation is not supported: NIP never passes on claims it did not verify".into(),
            )
        }
        None => return Err("a requirement type is needed".into()),
    })
}

/// A `StringMatcher` (case-sensitive).
pub(super) fn string_match(m: &StringMatcher) -> Result<StringMatch, String> {
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    if m.ignore_case {
        return Err("ignore_case is not supported".into());
    }
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(MatchPattern::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(MatchPattern::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(MatchPattern::Contains(v)) => StringMatch::Contains(v.clone()),
        Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(
            routes::full_match_regex(&r.regex).map_err(|e| format!("safe_regex: {e}"))?,
        ),
        _ => return Err("a pattern is needed".into()),
    })
}

/// An RBAC policy set.
fn rules(xds: &XdsRules) -> Result<Rules, String> {
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as XdsAction;
    if xds.audit_logging_options.is_some() {
        return Err("audit_logging_options is not supported".into());
    }
    let action = match XdsAction::try_from(xds.action) {
        Ok(XdsAction::Allow) => Action::Allow,
        Ok(XdsAction::Deny) => Action::Deny,
        Ok(XdsAction::Log) => Action::Log,
        Err(_) => return Err(format!("action {} is unknown", xds.action)),
    };
    let mut names: Vec<&String> = xds.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let xds_policy = &xds.policies[name];
        let field = |m: String| format!("policies[{name:?}].{m}");
        if xds_policy.condition.is_some() || xds_policy.checked_condition.is_some() {
            return Err(field("condition (CEL) is not supported".into()));
        }
        if xds_policy.permissions.is_empty() || xds_policy.principals.is_empty() {
            return Err(field(
                "permissions and principals must each have an entry".into(),
            ));
        }
        let permissions = xds_policy
            .permissions
            .iter()
            .enumerate()
            .map(|(i, p)| rbac_permission(p).map_err(|e| field(format!("permissions[{i}].{e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let principals = xds_policy
            .principals
            .iter()
            .enumerate()
            .map(|(i, p)| rbac_principal(p).map_err(|e| field(format!("principals[{i}].{e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        policies.push(Policy {
            name: name.clone(),
            permissions,
            principals,
        });
    }
    Ok(Rules { action, policies })
}

fn cidr(range: &CidrRange) -> Result<Cidr, String> {
    let ip: std::net::IpAddr = range
        .address_prefix
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", range.address_prefix))?;
    let len = range
        .prefix_len
        .as_ref()
        .map_or(if ip.is_ipv4() { 32 } else { 128 }, |l| l.value);
    Cidr::new(ip, len)
}

/// A header matcher of a policy: `:authority` is the `host` header; `:path` is refused
/// (url_path matches the path).
fn rbac_header(
    h: &envoy_types::pb::envoy::config::route::v3::HeaderMatcher,
) -> Result<HeaderMatch, String> {
    let mut h = h.clone();
    match h.name.as_str() {
        ":authority" => h.name = "host".into(),
        ":path" => return Err("header :path: use url_path or uri_template".into()),
        _ => {}
    }
    routes::header_match(&h).map_err(|e| format!("header: {e}"))
}

fn path_matcher(
    p: &envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher,
) -> Result<StringMatch, String> {
    use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule;
    match &p.rule {
        Some(Rule::Path(m)) => string_match(m).map_err(|e| format!("url_path.path: {e}")),
        None => Err("url_path.path is missing".into()),
    }
}

// `metadata` is deprecated for `sourced_metadata` in Envoy and still accepted there.
#[allow(deprecated)]
fn rbac_permission(xds: &XdsPermission) -> Result<Permission, String> {
    use permission::Rule;
    let set = |rules: &[XdsPermission], field: &str| {
        rules
            .iter()
            .enumerate()
            .map(|(i, p)| rbac_permission(p).map_err(|e| format!("{field}.rules[{i}].{e}")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &xds.rule {
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::AndRules(s)) => Permission::And(set(&s.rules, "and_rules")?),
        Some(Rule::OrRules(s)) => Permission::Or(set(&s.rules, "or_rules")?),
        Some(Rule::NotRule(p)) => {
            Permission::Not(Box::new(rbac_permission(p).map_err(|e| format!("not_rule.{e}"))?))
        }
        Some(Rule::Header(h)) => Permission::Header(rbac_header(h)?),
        Some(Rule::UrlPath(p)) => Permission::UrlPath(path_matcher(p)?),
        Some(Rule::DestinationIp(c)) => {
            Permission::DestinationIp(cidr(c).map_err(|e| format!("destination_ip: {e}"))?)
        }
        Some(Rule::DestinationPort(p)) => Permission::DestinationPort(
            u16::try_from(*p).map_err(|_| format!("destination_port: {p} is not a port"))?,
        ),
        Some(Rule::DestinationPortRange(r)) => {
            let port = |v: i32| u16::try_from(v).map_err(|_| format!("destination_port_range: {v} is not a port"));
            Permission::DestinationPortRange(port(r.start)?, port(r.end)?)
        }
        Some(Rule::Metadata(m)) => Permission::Metadata(metadata_match(m)?),
        Some(Rule::UriTemplate(ext)) => {
            let config = ext
                .typed_config
                .as_ref()
                .filter(|a| a.type_url == UriTemplateMatchConfig::type_url())
                .ok_or("uri_template: a UriTemplateMatchConfig is needed")?;
            let config: UriTemplateMatchConfig = decode(config)?;
            Permission::PathTemplate(
                PathTemplate::parse(&config.path_template).map_err(|e| format!("uri_template: {e}"))?,
            )
        }
        Some(Rule::Any(false)) | None => return Err("a rule is needed".into()),
        Some(_) => {
            return Err("only any, and_rules, or_rules, not_rule, header, url_path, uri_template, destination_ip, destination_port, destination_port_range and metadata are supported".into())
        }
    })
}

// `metadata` and `source_ip` are deprecated in Envoy and still accepted there.
#[allow(deprecated)]
fn rbac_principal(xds: &XdsPrincipal) -> Result<Principal, String> {
    use principal::Identifier;
    let set = |ids: &[XdsPrincipal], field: &str| {
        ids.iter()
            .enumerate()
            .map(|(i, p)| rbac_principal(p).map_err(|e| format!("{field}.ids[{i}].{e}")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &xds.identifier {
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::AndIds(s)) => Principal::And(set(&s.ids, "and_ids")?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(&s.ids, "or_ids")?),
        Some(Identifier::NotId(p)) => {
            Principal::Not(Box::new(rbac_principal(p).map_err(|e| format!("not_id.{e}"))?))
        }
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(string_match)
                .transpose()
                .map_err(|e| format!("authenticated.principal_name: {e}"))?,
        ),
        Some(Identifier::DirectRemoteIp(c)) | Some(Identifier::RemoteIp(c)) | Some(Identifier::SourceIp(c)) => {
            Principal::SourceIp(cidr(c).map_err(|e| format!("remote_ip: {e}"))?)
        }
        Some(Identifier::Header(h)) => Principal::Header(rbac_header(h)?),
        Some(Identifier::UrlPath(p)) => Principal::UrlPath(path_matcher(p)?),
        Some(Identifier::Metadata(m)) => Principal::Metadata(metadata_match(m)?),
        Some(Identifier::Any(false)) | None => return Err("an identifier is needed".into()),
        Some(_) => {
            return Err("only any, and_ids, or_ids, not_id, authenticated, direct_remote_ip, remote_ip, source_ip, header, url_path and metadata are supported".into())
        }
    })
}

fn metadata_match(m: &MetadataMatcher) -> Result<MetadataMatch, String> {
    use envoy_types::pb::envoy::r#type::matcher::v3::metadata_matcher::path_segment::Segment;
    let path = m
        .path
        .iter()
        .map(|s| match &s.segment {
            Some(Segment::Key(k)) => Ok(k.clone()),
            None => Err("metadata.path: a segment has no key".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let value = m.value.as_ref().ok_or("metadata.value is missing")?;
    if m.filter == crate::policy::rbac::TENANT_METADATA {
        use value_matcher::MatchPattern;
        if path != ["id"]
            || !matches!(
                value.match_pattern,
                Some(MatchPattern::StringMatch(_) | MatchPattern::PresentMatch(_))
            )
        {
            return Err(format!(
                "metadata: {} holds the tenant's id (path [id]); match it with string_match or present_match",
                m.filter
            ));
        }
    } else if m.filter != crate::policy::rbac::JWT_METADATA {
        return Err(format!(
            "metadata.filter {:?}: NIP's requests carry the metadata of {} (verified JWT payloads) and {} (their tenant) only",
            m.filter,
            crate::policy::rbac::JWT_METADATA,
            crate::policy::rbac::TENANT_METADATA
        ));
    } else if path.len() < 2 {
        return Err("metadata.path: the provider's payload_in_metadata, then the claim".into());
    }
    Ok(MetadataMatch {
        filter: m.filter.clone(),
        path,
        value: value_match(value).map_err(|e| format!("metadata.value.{e}"))?,
        invert: m.invert,
    })
}

fn value_match(v: &ValueMatcher) -> Result<ValueMatch, String> {
    use envoy_types::pb::envoy::r#type::matcher::v3::double_matcher;
    Ok(match &v.match_pattern {
        Some(value_matcher::MatchPattern::NullMatch(_)) => ValueMatch::Null,
        Some(value_matcher::MatchPattern::StringMatch(s)) => {
            ValueMatch::String(string_match(s).map_err(|e| format!("string_match: {e}"))?)
        }
        Some(value_matcher::MatchPattern::BoolMatch(b)) => ValueMatch::Bool(*b),
        Some(value_matcher::MatchPattern::PresentMatch(p)) => ValueMatch::Present(*p),
        Some(value_matcher::MatchPattern::DoubleMatch(d)) => match &d.match_pattern {
            Some(double_matcher::MatchPattern::Exact(x)) => ValueMatch::Number(*x),
            Some(double_matcher::MatchPattern::Range(r)) => ValueMatch::Range(r.start, r.end),
            None => return Err("double_match needs a pattern".into()),
        },
        Some(value_matcher::MatchPattern::ListMatch(l)) => match &l.match_pattern {
            Some(list_matcher::MatchPattern::OneOf(item)) => ValueMatch::ListOneOf(Box::new(
                value_match(item).map_err(|e| format!("list_match.one_of.{e}"))?,
            )),
            None => return Err("list_match needs one_of".into()),
        },
        Some(value_matcher::MatchPattern::OrMatch(_)) | None => {
            return Err("a null, double, string, bool, present or list match is needed".into())
        }
    })
}

/// An `ExtAuthz` filter.
fn ext_authz(
    name: &str,
    config: &ExtAuthzConfig,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Result<crate::policy::ext_authz::ExtAuthz, String> {
    use crate::policy::ext_authz::{AuthzService, ExtAuthz};
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::ext_authz::Services;
    if config.with_request_body.is_some() {
        return Err("with_request_body is not supported: checks carry the request head".into());
    }
    let known = |cluster: &str, field: &str| {
        if clusters.contains_key(cluster) {
            Ok(cluster.to_string())
        } else {
            Err(format!("{field} {cluster:?} is not among the clusters"))
        }
    };
    let matchers = |list: Option<
        &envoy_types::pb::envoy::r#type::matcher::v3::ListStringMatcher,
    >,
                    field: &str| {
        list.map_or(Ok(Vec::new()), |l| {
            l.patterns
                .iter()
                .enumerate()
                .map(|(i, p)| string_match(p).map_err(|e| format!("{field}.patterns[{i}]: {e}")))
                .collect::<Result<Vec<_>, _>>()
        })
    };
    let default_timeout = Duration::from_millis(200);
    let (service, timeout) = match &config.services {
        Some(Services::HttpService(http)) => {
            let uri = http
                .server_uri
                .as_ref()
                .ok_or("http_service.server_uri is missing")?;
            let cluster = match &uri.http_upstream_type {
                Some(
                    envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                        c,
                    ),
                ) => known(c, "http_service.server_uri.cluster")?,
                None => return Err("http_service.server_uri.cluster is missing".into()),
            };
            let parsed: http::Uri = uri
                .uri
                .parse()
                .map_err(|_| format!("http_service.server_uri.uri {:?} is not a URI", uri.uri))?;
            let authority = parsed
                .authority()
                .map_or(cluster.clone(), |a| a.to_string());
            if !http.path_override.is_empty() || http.retry_policy.is_some() {
                return Err(
                    "http_service: path_override and retry_policy are not supported".into(),
                );
            }
            let request = http.authorization_request.as_ref();
            let response = http.authorization_response.as_ref();
            if response.is_some_and(|r| r.dynamic_metadata_from_headers.is_some()) {
                return Err("http_service.authorization_response.dynamic_metadata_from_headers is not supported".into());
            }
            let mut headers_to_add = Vec::new();
            for (i, h) in request
                .map_or(&[][..], |r| &r.headers_to_add[..])
                .iter()
                .enumerate()
            {
                let name = header_name(
                    &h.key,
                    &format!("http_service.authorization_request.headers_to_add[{i}].key"),
                )?;
                let value = HeaderValue::from_str(&h.value).map_err(|_| {
                    format!("http_service.authorization_request.headers_to_add[{i}].value is not a header value")
                })?;
                headers_to_add.push((name, value));
            }
            let service = AuthzService::Http {
                cluster,
                authority,
                path_prefix: http.path_prefix.clone(),
                // The filter's allowed_headers, else the deprecated place Envoy still reads.
                allowed_headers: match &config.allowed_headers {
                    Some(list) => matchers(Some(list), "allowed_headers")?,
                    #[allow(deprecated)]
                    None => matchers(
                        request.and_then(|r| r.allowed_headers.as_ref()),
                        "http_service.authorization_request.allowed_headers",
                    )?,
                },
                headers_to_add,
                upstream_headers: matchers(
                    response.and_then(|r| r.allowed_upstream_headers.as_ref()),
                    "http_service.authorization_response.allowed_upstream_headers",
                )?,
                upstream_headers_to_append: matchers(
                    response.and_then(|r| r.allowed_upstream_headers_to_append.as_ref()),
                    "http_service.authorization_response.allowed_upstream_headers_to_append",
                )?,
                client_headers: matchers(
                    response.and_then(|r| r.allowed_client_headers.as_ref()),
                    "http_service.authorization_response.allowed_client_headers",
                )?,
                client_headers_on_success: matchers(
                    response.and_then(|r| r.allowed_client_headers_on_success.as_ref()),
                    "http_service.authorization_response.allowed_client_headers_on_success",
                )?,
            };
            let timeout = uri
                .timeout
                .as_ref()
                .and_then(super::duration)
                .unwrap_or(default_timeout);
            (service, timeout)
        }
        Some(Services::GrpcService(grpc)) => {
            let target = match &grpc.target_specifier {
                Some(TargetSpecifier::EnvoyGrpc(e)) => e,
                _ => return Err("grpc_service: only envoy_grpc (a cluster) is supported".into()),
            };
            if !grpc.initial_metadata.is_empty() || grpc.retry_policy.is_some() {
                return Err(
                    "grpc_service: initial_metadata and retry_policy are not supported".into(),
                );
            }
            let cluster = known(&target.cluster_name, "grpc_service.envoy_grpc.cluster_name")?;
            if clusters.get(&cluster).is_some_and(|c| !c.http2) {
                return Err(format!(
                    "grpc_service.envoy_grpc.cluster_name {cluster:?}: the cluster must speak HTTP/2 (gRPC)"
                ));
            }
            let authority = super::grpc_authority(target);
            let timeout = grpc
                .timeout
                .as_ref()
                .and_then(super::duration)
                .unwrap_or(default_timeout);
            (AuthzService::Grpc { cluster, authority }, timeout)
        }
        None => return Err("http_service or grpc_service is needed".into()),
    };
    let status_on_error = match config.status_on_error.as_ref().map(|s| s.code) {
        None | Some(0) => 403,
        Some(code) => u16::try_from(code)
            .ok()
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| format!("status_on_error {code} is not a status"))?,
    };
    Ok(ExtAuthz {
        name: name.into(),
        service,
        timeout,
        failure_mode_allow: config.failure_mode_allow,
        failure_mode_allow_header_add: config.failure_mode_allow_header_add,
        status_on_error,
        include_peer_certificate: config.include_peer_certificate,
        allowed_headers: matchers(config.allowed_headers.as_ref(), "allowed_headers")?,
        // Set by the caller, which holds the metrics.
        stats: Default::default(),
    })
}

/// A `ratelimit` filter.
fn global_rate_limit(
    name: &str,
    config: &GlobalRateLimitConfig,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Result<crate::policy::global_ratelimit::GlobalRateLimit, String> {
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    if config.stage != 0 || !config.request_type.is_empty() && config.request_type != "both" {
        return Err("stage and request_type are not supported".into());
    }
    if config.domain.is_empty() {
        return Err("domain is needed".into());
    }
    let grpc = config
        .rate_limit_service
        .as_ref()
        .and_then(|s| s.grpc_service.as_ref())
        .ok_or("rate_limit_service.grpc_service is needed")?;
    if !grpc.initial_metadata.is_empty() {
        return Err("rate_limit_service.grpc_service.initial_metadata is not supported".into());
    }
    let Some(TargetSpecifier::EnvoyGrpc(target)) = &grpc.target_specifier else {
        return Err(
            "rate_limit_service.grpc_service: only envoy_grpc (a cluster) is supported".into(),
        );
    };
    let cluster = clusters.get(&target.cluster_name).ok_or_else(|| {
        format!(
            "rate_limit_service.grpc_service.envoy_grpc.cluster_name {:?} is not among the clusters",
            target.cluster_name
        )
    })?;
    if !cluster.http2 {
        return Err(format!(
            "rate_limit_service.grpc_service.envoy_grpc.cluster_name {:?}: the cluster must speak HTTP/2 (gRPC)",
            target.cluster_name
        ));
    }
    Ok(crate::policy::global_ratelimit::GlobalRateLimit {
        name: name.into(),
        domain: config.domain.clone(),
        cluster: target.cluster_name.clone(),
        authority: super::grpc_authority(target),
        timeout: config
            .timeout
            .as_ref()
            .and_then(super::duration)
            .unwrap_or(Duration::from_millis(20)),
        failure_mode_deny: config.failure_mode_deny,
        headers: config.enable_x_ratelimit_headers == 1,
        // Set by the caller, which holds the metrics.
        stats: Default::default(),
    })
}
