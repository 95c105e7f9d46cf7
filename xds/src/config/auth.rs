//! The v4 `auth` block and routes' `auth`: JWT providers (Envoy's `jwt_authn`) and RBAC
//! policies (Envoy's RBAC filter), in a short form the translator turns into those filters.
//!
//! ```yaml
//! auth:
//!   jwt_providers:
//!     idp:
//!       issuer: https://idp.example.com
//!       audiences: [api]
//!       jwks_uri: https://idp.example.com/.well-known/jwks.json
//!       claim_to_headers: { x-user: sub }
//!   rbac:                       # every route, unless a route sets its own
//!     action: deny
//!     policies:
//!       no-outsiders: { permissions: [{ any: true }], principals: [{ not: { source_ip: 10.0.0.0/8 } }] }
//! routes:
//!   - match: { path_prefix: /admin }
//!     service: admin
//!     auth:
//!       jwt: idp                # or { any: [a, b] }, { all: [...] }, allow_missing, …
//!       rbac:
//!         action: allow
//!         policies:
//!           admins: { permissions: [{ path: "/admin/**" }], principals: [{ claim: { name: roles, value: admin } }] }
//! ```

use super::{HeaderMatchConfig, HumanDuration};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The config's `auth` block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// JWT providers by name (Envoy's `JwtProvider`s).
    #[serde(default)]
    pub jwt_providers: BTreeMap<String, JwtProviderConfig>,
    /// RBAC for every route that does not set its own.
    #[serde(default)]
    pub rbac: Option<RbacConfig>,
    /// An external authorization service asked about every request (Envoy's `ext_authz`).
    #[serde(default)]
    pub ext_authz: Option<ExtAuthzConfig>,
}

/// The external authorization service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzConfig {
    /// The service (in `services`) that decides.
    pub service: String,
    /// `http` (the request's method and path, 200 allows) or `grpc` (Envoy's
    /// `envoy.service.auth.v3.Authorization`; the service needs `protocol: http2`).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Put before the request's path in HTTP checks.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// How long a check may take (default 200ms).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Let requests through when the service cannot be asked (default: refuse them).
    #[serde(default)]
    pub failure_mode_allow: bool,
    /// The status of requests refused because the service could not be asked (403).
    #[serde(default)]
    pub status_on_error: Option<u16>,
    /// Client headers the checks carry besides Host, Method, Path, Content-Length and
    /// Authorization (gRPC checks carry all when empty).
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Headers of an allowing answer copied to the request going upstream (HTTP).
    #[serde(default)]
    pub upstream_headers: Vec<String>,
}

/// A JWT issuer whose tokens the proxy verifies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    /// Tokens' `iss` must equal this (unset: any issuer).
    #[serde(default)]
    pub issuer: Option<String>,
    /// One of a token's `aud` must be among these (empty: any).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the issuer publishes its keys (http or https); fetched ahead of requests,
    /// again every `cache_duration`; while the issuer is down the last keys stay in use.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The keys inline, as a JWKS JSON document (instead of `jwks_uri`).
    #[serde(default)]
    pub jwks: Option<String>,
    /// How long fetched keys are used (default 10m).
    #[serde(default)]
    pub cache_duration: Option<HumanDuration>,
    /// How long one fetch may take (default 1s).
    #[serde(default)]
    pub fetch_timeout: Option<HumanDuration>,
    /// Where tokens are: headers (`{ name, prefix }`), query parameters, cookies (default:
    /// `Authorization: Bearer …` and `access_token`).
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderConfig>,
    /// Query parameters holding tokens.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies holding tokens.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Keep the token in the forwarded request (default: removed).
    #[serde(default)]
    pub forward: bool,
    /// Send the verified payload (base64url) upstream in this header.
    #[serde(default)]
    pub forward_payload_header: Option<String>,
    /// Headers set from claims (header → claim; `a.b` for nested claims).
    #[serde(default)]
    pub claim_to_headers: BTreeMap<String, String>,
    /// Allowed clock difference for `exp` and `nbf` (default 60s).
    #[serde(default)]
    pub clock_skew: Option<HumanDuration>,
    /// Refuse tokens without `exp`.
    #[serde(default)]
    pub require_expiration: bool,
    /// Refuse tokens that live longer than this.
    #[serde(default)]
    pub max_lifetime: Option<HumanDuration>,
}

/// A header that carries tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeaderConfig {
    /// The header.
    pub name: String,
    /// What precedes the token (`Bearer `).
    #[serde(default)]
    pub prefix: String,
}

/// A route's `auth`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthConfig {
    /// The JWTs the route requires.
    #[serde(default)]
    pub jwt: Option<JwtRequirementConfig>,
    /// The route's RBAC in place of `auth.rbac` (`off`: none on this route).
    #[serde(default)]
    pub rbac: Option<RouteRbacConfig>,
    /// `false`: no external authorization on this route; a map: context sent with each
    /// check (`{ context: { tier: gold } }`).
    #[serde(default)]
    pub ext_authz: Option<RouteExtAuthzConfig>,
}

/// A route's external authorization setting.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RouteExtAuthzConfig {
    /// `false` turns it off (`true` changes nothing).
    Enabled(bool),
    /// Checks carry this context (Envoy's `context_extensions`).
    Context {
        /// Key/value pairs.
        context: BTreeMap<String, String>,
    },
}

/// What tokens a route requires (Envoy's `JwtRequirement`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum JwtRequirementConfig {
    /// A provider's name, or `allow_missing` / `allow_missing_or_failed`.
    Name(String),
    /// A combination.
    Rule(Box<JwtRuleConfig>),
}

/// A combination of requirements.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRuleConfig {
    /// One provider, with `audiences` in place of its own.
    #[serde(default)]
    pub provider: Option<String>,
    /// Audiences for `provider`.
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    /// Any of these passes.
    #[serde(default)]
    pub any: Option<Vec<JwtRequirementConfig>>,
    /// All of these pass.
    #[serde(default)]
    pub all: Option<Vec<JwtRequirementConfig>>,
}

/// `allow_missing`: no token passes, a bad one fails.
pub const ALLOW_MISSING: &str = "allow_missing";
/// `allow_missing_or_failed`: everything passes; good tokens still count.
pub const ALLOW_MISSING_OR_FAILED: &str = "allow_missing_or_failed";

/// A route's RBAC: its own policies, or `off`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RouteRbacConfig {
    /// `off`.
    Off(String),
    /// Policies in place of `auth.rbac`.
    Rules(Box<RbacConfig>),
}

/// An RBAC policy set, with optional shadow rules tried on live traffic without effect.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbacConfig {
    /// `allow` (only matching requests pass), `deny` (matching ones are refused) or `log`.
    #[serde(default)]
    pub action: Option<String>,
    /// Policies by name.
    #[serde(default)]
    pub policies: BTreeMap<String, RbacPolicyConfig>,
    /// Rules evaluated and counted (`nip_rbac_requests_total{decision="shadow_…"}`) only.
    #[serde(default)]
    pub shadow: Option<Box<RbacConfig>>,
}

/// One policy: requests matching one permission from one principal.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbacPolicyConfig {
    /// What is asked (one must match).
    pub permissions: Vec<PermissionConfig>,
    /// Who asks (one must match).
    pub principals: Vec<PrincipalConfig>,
}

/// A permission; its fields must all hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionConfig {
    /// Everything.
    #[serde(default)]
    pub any: bool,
    /// The path: exact, or a template (`/users/{id}/**`, `*` one segment, `**` the rest).
    #[serde(default)]
    pub path: Option<String>,
    /// The path starts with this.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// One of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// A header.
    #[serde(default)]
    pub header: Option<HeaderMatchConfig>,
    /// The port the client connected to.
    #[serde(default)]
    pub port: Option<u16>,
    /// Not this.
    #[serde(default)]
    pub not: Option<Box<PermissionConfig>>,
}

/// A principal; its fields must all hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Everyone.
    #[serde(default)]
    pub any: bool,
    /// Any client with a verified certificate.
    #[serde(default)]
    pub authenticated: bool,
    /// A client whose certificate names this (URI SAN, else DNS SAN, else subject; a
    /// trailing `*` matches a prefix): `spiffe://nip.local/ns/shop/sa/web`.
    #[serde(default)]
    pub principal: Option<String>,
    /// The client's address is in this range (`10.0.0.0/8`).
    #[serde(default)]
    pub source_ip: Option<String>,
    /// A header.
    #[serde(default)]
    pub header: Option<HeaderMatchConfig>,
    /// A verified JWT claim.
    #[serde(default)]
    pub claim: Option<ClaimConfig>,
    /// A request of this tenant: on one of its routes, or named by `tenant_key`.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Not this.
    #[serde(default)]
    pub not: Option<Box<PrincipalConfig>>,
}

/// A claim of a verified token: equal to `value`, or a list holding it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimConfig {
    /// The claim (`a.b` for nested claims).
    pub name: String,
    /// The value.
    pub value: String,
    /// Only tokens of this provider (default: any provider's).
    #[serde(default)]
    pub provider: Option<String>,
}

/// Problems of the `auth` block and of routes' `auth`, as (path, message).
pub fn auth_problems(config: &super::Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut add = |path: String, message: String| problems.push((path, message));
    let providers = &config.auth.jwt_providers;
    for (name, provider) in providers {
        let path = format!("auth.jwt_providers.{name}");
        if name == ALLOW_MISSING || name == ALLOW_MISSING_OR_FAILED || name.is_empty() {
            add(path.clone(), format!("{name:?} cannot name a provider"));
        }
        match (&provider.jwks_uri, &provider.jwks) {
            (Some(_), Some(_)) | (None, None) => {
                add(path.clone(), "set exactly one of jwks_uri and jwks".into())
            }
            (Some(uri), None) => {
                if let Err(e) = jwks_uri_parts(uri) {
                    add(format!("{path}.jwks_uri"), e);
                }
            }
            (None, Some(jwks)) => {
                let keys = serde_json::from_str::<serde_json::Value>(jwks)
                    .ok()
                    .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len));
                if keys.is_none_or(|n| n == 0) {
                    add(
                        format!("{path}.jwks"),
                        "must be a JWKS JSON document with a non-empty \"keys\" list".into(),
                    );
                }
            }
        }
        let headers = provider
            .from_headers
            .iter()
            .map(|h| h.name.as_str())
            .chain(provider.forward_payload_header.as_deref())
            .chain(provider.claim_to_headers.keys().map(String::as_str));
        for header in headers {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                add(path.clone(), format!("{header:?} is not a header name"));
            }
        }
        for (header, claim) in &provider.claim_to_headers {
            if claim.is_empty() || claim.split('.').any(str::is_empty) {
                add(
                    format!("{path}.claim_to_headers.{header}"),
                    format!("{claim:?} is not a claim name"),
                );
            }
        }
    }
    if let Some(rbac) = &config.auth.rbac {
        rbac_problems("auth.rbac", rbac, config, &mut add);
    }
    if let Some(authz) = &config.auth.ext_authz {
        let path = "auth.ext_authz";
        match config.services.get(&authz.service) {
            None => add(
                format!("{path}.service"),
                format!("{:?} is not among services", authz.service),
            ),
            Some(service) => {
                if authz.protocol.as_deref() == Some("grpc")
                    && service.protocol != super::UpstreamProtocol::Http2
                {
                    add(
                        format!("{path}.protocol"),
                        format!("grpc needs services.{}.protocol: http2", authz.service),
                    );
                }
            }
        }
        if !matches!(authz.protocol.as_deref(), None | Some("http" | "grpc")) {
            add(format!("{path}.protocol"), "must be http or grpc".into());
        }
        if authz.timeout.is_some_and(|t| t.0.is_zero()) {
            add(format!("{path}.timeout"), "must be more than 0".into());
        }
        if authz
            .status_on_error
            .is_some_and(|s| !(200..600).contains(&s))
        {
            add(
                format!("{path}.status_on_error"),
                "must be a status (200-599)".into(),
            );
        }
        if authz
            .path_prefix
            .as_deref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            add(format!("{path}.path_prefix"), "must start with /".into());
        }
        for (field, list) in [
            ("allowed_headers", &authz.allowed_headers),
            ("upstream_headers", &authz.upstream_headers),
        ] {
            for (i, header) in list.iter().enumerate() {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    add(
                        format!("{path}.{field}[{i}]"),
                        format!("{header:?} is not a header name"),
                    );
                }
            }
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        let Some(auth) = &route.auth else { continue };
        let path = format!("routes[{i}].auth");
        if let Some(jwt) = &auth.jwt {
            requirement_problems(&format!("{path}.jwt"), jwt, config, true, &mut add);
        }
        if auth.ext_authz.is_some() && config.auth.ext_authz.is_none() {
            add(
                format!("{path}.ext_authz"),
                "auth.ext_authz names no authorization service".into(),
            );
        }
        match &auth.rbac {
            Some(RouteRbacConfig::Off(word)) if word != "off" => add(
                format!("{path}.rbac"),
                format!("{word:?}: write off, or policies"),
            ),
            Some(RouteRbacConfig::Rules(rbac)) => {
                rbac_problems(&format!("{path}.rbac"), rbac, config, &mut add)
            }
            _ => {}
        }
    }
    problems
}

/// `(https?, host, port, path)` of a JWKS URI.
pub fn jwks_uri_parts(uri: &str) -> Result<(bool, String, u16, String), String> {
    let parsed: http::Uri = uri.parse().map_err(|_| format!("{uri:?} is not a URI"))?;
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{uri:?}: the scheme must be http or https")),
    };
    let host = parsed
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{uri:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = parsed
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    Ok((https, host, port, path))
}

fn requirement_problems(
    path: &str,
    requirement: &JwtRequirementConfig,
    config: &super::Config,
    top: bool,
    add: &mut impl FnMut(String, String),
) {
    let providers = &config.auth.jwt_providers;
    let known = |name: &str| providers.contains_key(name);
    match requirement {
        JwtRequirementConfig::Name(name) => {
            if (name == ALLOW_MISSING || name == ALLOW_MISSING_OR_FAILED) && !top {
                add(
                    path.to_string(),
                    format!("{name} stands alone, not inside any/all"),
                );
            } else if name != ALLOW_MISSING && name != ALLOW_MISSING_OR_FAILED && !known(name) {
                add(
                    path.to_string(),
                    format!("{name:?} is not among auth.jwt_providers"),
                );
            }
            if (name == ALLOW_MISSING || name == ALLOW_MISSING_OR_FAILED) && providers.is_empty() {
                add(
                    path.to_string(),
                    "auth.jwt_providers has no provider".into(),
                );
            }
        }
        JwtRequirementConfig::Rule(rule) => {
            let set = [
                rule.provider.is_some(),
                rule.any.is_some(),
                rule.all.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            if set != 1 {
                add(
                    path.to_string(),
                    "set exactly one of provider, any, all".into(),
                );
            }
            if rule.audiences.is_some() && rule.provider.is_none() {
                add(format!("{path}.audiences"), "goes with provider".into());
            }
            if let Some(name) = &rule.provider {
                if !known(name) {
                    add(
                        format!("{path}.provider"),
                        format!("{name:?} is not among auth.jwt_providers"),
                    );
                }
            }
            for (field, list) in [("any", &rule.any), ("all", &rule.all)] {
                let Some(list) = list else { continue };
                if list.is_empty() {
                    add(format!("{path}.{field}"), "must not be empty".into());
                }
                for (i, inner) in list.iter().enumerate() {
                    requirement_problems(
                        &format!("{path}.{field}[{i}]"),
                        inner,
                        config,
                        false,
                        add,
                    );
                }
            }
        }
    }
}

fn rbac_problems(
    path: &str,
    rbac: &RbacConfig,
    config: &super::Config,
    add: &mut impl FnMut(String, String),
) {
    if !matches!(
        rbac.action.as_deref(),
        None | Some("allow" | "deny" | "log")
    ) {
        add(
            format!("{path}.action"),
            "must be allow, deny or log".into(),
        );
    }
    for (name, policy) in &rbac.policies {
        let path = format!("{path}.policies.{name}");
        if policy.permissions.is_empty() {
            add(format!("{path}.permissions"), "must have an entry".into());
        }
        if policy.principals.is_empty() {
            add(format!("{path}.principals"), "must have an entry".into());
        }
        for (i, p) in policy.permissions.iter().enumerate() {
            permission_problems(&format!("{path}.permissions[{i}]"), p, add);
        }
        for (i, p) in policy.principals.iter().enumerate() {
            principal_problems(&format!("{path}.principals[{i}]"), p, config, add);
        }
    }
    if let Some(shadow) = &rbac.shadow {
        if shadow.shadow.is_some() {
            add(
                format!("{path}.shadow.shadow"),
                "shadow rules have no shadow".into(),
            );
        }
        rbac_problems(&format!("{path}.shadow"), shadow, config, add);
    }
}

fn permission_problems(path: &str, p: &PermissionConfig, add: &mut impl FnMut(String, String)) {
    let set = p.any as usize
        + p.path.is_some() as usize
        + p.path_prefix.is_some() as usize
        + !p.methods.is_empty() as usize
        + p.header.is_some() as usize
        + p.port.is_some() as usize
        + p.not.is_some() as usize;
    if set == 0 {
        add(
            path.to_string(),
            "set any, path, path_prefix, methods, header, port or not".into(),
        );
    }
    if let Some(template) = &p.path {
        if let Err(e) = path_template_problem(template) {
            add(format!("{path}.path"), e);
        }
    }
    if let Some(prefix) = &p.path_prefix {
        if !prefix.starts_with('/') {
            add(format!("{path}.path_prefix"), "must start with /".into());
        }
    }
    for (i, method) in p.methods.iter().enumerate() {
        if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            add(
                format!("{path}.methods[{i}]"),
                format!("{method:?} is not a method"),
            );
        }
    }
    if p.port == Some(0) {
        add(format!("{path}.port"), "0 is not a port".into());
    }
    if let Some(not) = &p.not {
        permission_problems(&format!("{path}.not"), not, add);
    }
}

fn principal_problems(
    path: &str,
    p: &PrincipalConfig,
    config: &super::Config,
    add: &mut impl FnMut(String, String),
) {
    let set = p.any as usize
        + p.authenticated as usize
        + p.principal.is_some() as usize
        + p.source_ip.is_some() as usize
        + p.header.is_some() as usize
        + p.claim.is_some() as usize
        + p.tenant.is_some() as usize
        + p.not.is_some() as usize;
    if set == 0 {
        add(
            path.to_string(),
            "set any, authenticated, principal, source_ip, header, claim, tenant or not".into(),
        );
    }
    if let Some(tenant) = &p.tenant {
        let single = config.tenant.as_ref().is_some_and(|t| t.id == *tenant);
        if !single && !config.tenants.contains_key(tenant) {
            add(
                format!("{path}.tenant"),
                format!("{tenant:?} is not among tenants"),
            );
        }
    }
    if let Some(range) = &p.source_ip {
        if cidr_parts(range).is_none() {
            add(
                format!("{path}.source_ip"),
                format!("{range:?} is not an address range (10.0.0.0/8)"),
            );
        }
    }
    if let Some(claim) = &p.claim {
        if claim.name.is_empty() || claim.name.split('.').any(str::is_empty) {
            add(
                format!("{path}.claim.name"),
                format!("{:?} is not a claim name", claim.name),
            );
        }
        match &claim.provider {
            Some(provider) if !config.auth.jwt_providers.contains_key(provider) => add(
                format!("{path}.claim.provider"),
                format!("{provider:?} is not among auth.jwt_providers"),
            ),
            None if config.auth.jwt_providers.is_empty() => add(
                format!("{path}.claim"),
                "auth.jwt_providers has no provider to verify claims".into(),
            ),
            _ => {}
        }
    }
    if let Some(not) = &p.not {
        principal_problems(&format!("{path}.not"), not, config, add);
    }
}

/// `(address, prefix length)` of `10.0.0.0/8` (a bare address: the whole length).
pub fn cidr_parts(range: &str) -> Option<(std::net::IpAddr, u32)> {
    let (address, len) = match range.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().ok()?)),
        None => (range, None),
    };
    let ip: std::net::IpAddr = address.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((ip, len))
}

/// Whether `path` is a template (it has `*` or `{`) rather than an exact path.
pub fn is_path_template(path: &str) -> bool {
    path.contains(['*', '{'])
}

fn path_template_problem(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("must start with /".into());
    }
    if !is_path_template(path) {
        return Ok(());
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let wild = match *segment {
            "*" | "**" => true,
            s if s.starts_with('{') && s.ends_with('}') => {
                let inner = &s[1..s.len() - 1];
                match inner.split_once('=') {
                    None => !inner.is_empty(),
                    Some((name, "*" | "**")) => !name.is_empty(),
                    _ => false,
                }
                .then_some(true)
                .ok_or_else(|| format!("{s:?} is not {{name}}, {{name=*}} or {{name=**}}"))?
            }
            s if s.contains(['*', '{', '}']) => {
                return Err(format!("segment {s:?} mixes a literal with a wildcard"))
            }
            _ => false,
        };
        let rest = *segment == "**" || segment.ends_with("=**}");
        if wild && rest && i + 1 != segments.len() {
            return Err("** must be the last segment".into());
        }
    }
    Ok(())
}
