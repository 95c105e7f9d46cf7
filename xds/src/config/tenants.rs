//! Tenants: who owns which routes and services, and what each tenant's block means.
//!
//! A config may hold one tenant's block (`tenant:`, the v4 plan's form: every route and
//! service is that tenant's) or several (`tenants: { ID: block }`, with `routes[].tenant`
//! and `services.X.tenant` saying whose each is; a route or service with no `tenant` is
//! the operator's, shared). What the blocks mean, checked here at validation (so a
//! control plane's apply refuses it by field path):
//!
//! * `plugins.whitelist` / `allow_custom`: a tenant's routes may run only plugins named
//!   `namespace:name` whose namespace the whitelist allows (`acme:*`, `official:*`, or the
//!   exact `acme:audit`); a plugin without a namespace is custom, allowed only with
//!   `allow_custom: true`.
//! * `data.isolated`: a tenant's routes send only to the tenant's own services.
//! * `data.encryption`: every service a tenant's routes send to is reached over TLS.
//!
//! `resource_quota.message_rate` becomes a rate limit on all of the tenant's requests
//! together (the translator's `nip.tenant_ratelimit` filter): those of its routes, and
//! on routes no tenant owns, those whose `tenant_key` (a header, a verified claim, or a
//! client certificate matching the tenant's `principals`) names it; `data.locality` pins
//! its routes to a region.

use super::{Config, RouteConfig, TenantConfig};

/// The tenant owning `route` (its `tenant`, else the config's single tenant), with its
/// block.
pub fn route_tenant<'c>(
    config: &'c Config,
    route: &RouteConfig,
) -> Option<(&'c str, &'c TenantConfig)> {
    match &route.tenant {
        Some(id) => config
            .tenants
            .get_key_value(id)
            .map(|(id, t)| (id.as_str(), t)),
        None => config.tenant.as_ref().map(|t| (t.id.as_str(), t)),
    }
}

/// The tenant owning service `name`, if any.
fn service_tenant<'c>(config: &'c Config, name: &str) -> Option<&'c str> {
    let service = config.services.get(name)?;
    match &service.tenant {
        Some(id) => Some(id.as_str()),
        None => config.tenant.as_ref().map(|t| t.id.as_str()),
    }
}

/// Whether a whitelist entry (`acme:*`, `acme:audit`) allows plugin `name`.
fn whitelisted(entry: &str, name: &str) -> bool {
    let (Some((ns, plugin)), Some((want_ns, want))) = (name.split_once(':'), entry.split_once(':'))
    else {
        return false;
    };
    ns == want_ns && (want == "*" || want == plugin)
}

/// Problems of tenant ownership and of what the tenants' blocks require, as (path,
/// message).
pub fn tenant_problems(config: &Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if config.tenant.is_some() && !config.tenants.is_empty() {
        problems.push((
            "tenants".to_string(),
            "a config holds one tenant's block (tenant) or several (tenants), not both".to_string(),
        ));
    }
    if let Some(key) = &config.tenant_key {
        if config.tenants.is_empty() {
            problems.push((
                "tenant_key".to_string(),
                "names a tenant of `tenants`, which has none".to_string(),
            ));
        }
        match (&key.header, &key.claim, key.certificate) {
            (Some(header), None, false) => {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    problems.push((
                        "tenant_key.header".to_string(),
                        format!("{header:?} is not a header name"),
                    ));
                }
            }
            (None, Some(claim), false) => {
                if claim.is_empty() || claim.split('.').any(str::is_empty) {
                    problems.push((
                        "tenant_key.claim".to_string(),
                        format!("{claim:?} is not a claim name"),
                    ));
                }
                if config.auth.jwt_providers.is_empty() {
                    problems.push((
                        "tenant_key.claim".to_string(),
                        "auth.jwt_providers has no provider to verify claims".to_string(),
                    ));
                }
            }
            (None, None, true) => {
                let tls = &config.api_gateway.tls;
                if tls.client_ca_file.is_none() && !tls.mesh {
                    problems.push((
                        "tenant_key.certificate".to_string(),
                        "needs client certificates: set api_gateway.tls.client_ca_file or api_gateway.tls.mesh".to_string(),
                    ));
                }
                if config.tenants.values().all(|t| t.principals.is_empty()) {
                    problems.push((
                        "tenant_key.certificate".to_string(),
                        "no tenant has principals to match a certificate against".to_string(),
                    ));
                }
            }
            _ => problems.push((
                "tenant_key".to_string(),
                "set exactly one of header, claim, certificate: true".to_string(),
            )),
        }
    }
    let certificate_key = config.tenant_key.as_ref().is_some_and(|k| k.certificate);
    let blocks = config
        .tenant
        .iter()
        .map(|t| ("tenant".to_string(), t))
        .chain(
            config
                .tenants
                .iter()
                .map(|(id, t)| (format!("tenants.{id}"), t)),
        );
    for (path, tenant) in blocks {
        if !tenant.principals.is_empty() && !certificate_key {
            problems.push((
                format!("{path}.principals"),
                "are read only with tenant_key: { certificate: true }".to_string(),
            ));
        }
        for (i, principal) in tenant.principals.iter().enumerate() {
            if principal.is_empty() || principal == "*" {
                problems.push((
                    format!("{path}.principals[{i}]"),
                    format!("{principal:?} would match every certificate"),
                ));
            }
        }
    }
    for (id, tenant) in &config.tenants {
        if !tenant.id.is_empty() && tenant.id != *id {
            problems.push((
                format!("tenants.{id}.id"),
                format!("{:?} differs from the key {id:?}", tenant.id),
            ));
        }
    }
    for (name, service) in &config.services {
        if let Some(id) = &service.tenant {
            if !config.tenants.contains_key(id) {
                problems.push((
                    format!("services.{name}.tenant"),
                    format!("{id:?} is not among tenants"),
                ));
            }
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(id) = &route.tenant {
            if !config.tenants.contains_key(id) {
                problems.push((
                    format!("{path}.tenant"),
                    format!("{id:?} is not among tenants"),
                ));
                continue;
            }
        }
        let Some((id, tenant)) = route_tenant(config, route) else {
            continue;
        };
        if let Some(plugins) = &tenant.plugins {
            for (j, plugin) in route.plugins.iter().enumerate() {
                let custom = !plugin.contains(':');
                let allowed = if custom {
                    plugins.allow_custom
                } else {
                    plugins
                        .whitelist
                        .iter()
                        .any(|entry| whitelisted(entry, plugin))
                        || (plugins.whitelist.is_empty() && plugins.allow_custom)
                };
                if !allowed {
                    problems.push((
                        format!("{path}.plugins[{j}]"),
                        if custom {
                            format!(
                                "{plugin:?} is a custom plugin (no namespace:), and tenant {id} does not allow_custom"
                            )
                        } else {
                            format!(
                                "{plugin:?} is not in tenant {id}'s plugins.whitelist ({})",
                                plugins.whitelist.join(", ")
                            )
                        },
                    ));
                }
            }
        }
        let data = tenant.data.as_ref();
        let services = route
            .service
            .iter()
            .map(|s| ("service".to_string(), s))
            .chain(
                route
                    .split
                    .iter()
                    .enumerate()
                    .map(|(k, s)| (format!("split[{k}].service"), &s.service)),
            );
        for (field, service) in services {
            if data.is_some_and(|d| d.isolated) {
                let owner = service_tenant(config, service);
                if owner != Some(id) {
                    problems.push((
                        format!("{path}.{field}"),
                        format!(
                            "tenant {id}'s data is isolated: service {service:?} belongs to {}",
                            owner.map_or("no tenant".to_string(), |o| format!("tenant {o}"))
                        ),
                    ));
                }
            }
            if data.is_some_and(|d| d.encryption)
                && config
                    .services
                    .get(service)
                    .is_some_and(|s| s.tls.is_none())
            {
                problems.push((
                    format!("{path}.{field}"),
                    format!("tenant {id} requires encryption: service {service:?} has no tls"),
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitelist_entries_allow_a_namespace_or_one_plugin() {
        assert!(whitelisted("acme:*", "acme:audit"));
        assert!(whitelisted("acme:audit", "acme:audit"));
        assert!(!whitelisted("acme:audit", "acme:other"));
        assert!(!whitelisted("official:*", "acme:audit"));
        assert!(!whitelisted("acme:*", "audit"));
    }
}
