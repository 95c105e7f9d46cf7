//! Edge policy: who may call and how often. These are the HTTP filters a connection
//! manager runs on a request after its route is chosen and before the route's plugins and
//! its upstream, in the order its `http_filters` list them (Envoy's order):
//!
//! ```text
//! request ─▶ jwt (authentication: tokens verified, payloads kept, claims to headers)
//!         ─▶ tenant (whose request: the route's owner, else a header, claim or certificate)
//!         ─▶ rbac (authorization: principals × permissions; ALLOW/DENY/LOG; shadow rules)
//!         ─▶ ext_authz (authorization by an external service over HTTP or gRPC)
//!         ─▶ local_ratelimit (the route's token buckets, per client key or not)
//!         ─▶ ratelimit (limits shared by the fleet, counted by a rate limit service)
//!         ─▶ plugins ─▶ router
//! ```
//!
//! Each filter is compiled from its Envoy config by `compile` into the types here — pure
//! data and checks, no I/O on the request path. The one piece that talks to the network,
//! fetching remote JWKS, runs off the request path on the proxy's control thread
//! ([`jwt::fetch::JwksFetcher`]); requests read the keys it last stored. `http/policy.rs`
//! runs the filters and writes their refusals.

pub mod ext_authz;
pub mod global_ratelimit;
pub mod grpc;
pub mod jwt;
pub mod ratelimit;
pub mod rbac;
pub mod tenant;

use std::sync::Arc;

/// One policy filter of a connection manager, in its `http_filters` position.
#[derive(Debug, Clone)]
pub enum PolicyFilter {
    /// Envoy's `jwt_authn`.
    Jwt(Arc<jwt::JwtAuthn>),
    /// Envoy's `rbac` (its listener-wide rules; a route may override them).
    Rbac(Arc<rbac::RbacFilter>),
    /// Envoy's `ext_authz`.
    ExtAuthz(Arc<ext_authz::ExtAuthz>),
    /// Envoy's `local_ratelimit`.
    LocalRateLimit {
        /// Its name in `http_filters` (routes' per-filter configs name it).
        name: Arc<str>,
        /// Its own buckets, shared by the routes without a per-route config for it.
        shared: Option<Arc<ratelimit::RouteRateLimit>>,
    },
    /// Envoy's `ratelimit`: limits counted by a rate limit service for every proxy.
    GlobalRateLimit(Arc<global_ratelimit::GlobalRateLimit>),
    /// NIP's `nip.tenant`: names the tenant of requests on routes no tenant owns.
    Tenant(Arc<tenant::TenantIdentity>),
}

/// A route's settings for the policy filters (Envoy's `typed_per_filter_config` for them).
#[derive(Debug, Clone, Default)]
pub struct RoutePolicy {
    /// The route's JWT requirement (per-route config of `jwt_authn`).
    pub jwt: jwt::RouteRequirement,
    /// The route's RBAC rules in place of the listener's (`RBACPerRoute`); `Some(None)`:
    /// RBAC is off on this route.
    pub rbac: Option<Option<Arc<rbac::RbacFilter>>>,
    /// The route's `rate_limits` entries: the descriptors its requests make for the local
    /// and global rate limit filters.
    pub rate_limit_rules: Arc<Vec<Vec<ratelimit::DescriptorAction>>>,
    /// The route's own local rate limits, by `local_ratelimit` filter name (`None`: that
    /// filter is off on this route).
    pub rate_limits: Vec<(Arc<str>, Option<Arc<ratelimit::RouteRateLimit>>)>,
    /// The route's `ext_authz` settings (`ExtAuthzPerRoute`).
    pub ext_authz: ExtAuthzRoute,
}

/// A route's `ext_authz` settings.
#[derive(Debug, Clone, Default)]
pub struct ExtAuthzRoute {
    /// `disabled: true`: no check on this route.
    pub disabled: bool,
    /// `check_settings.context_extensions`, sent with each check.
    pub context_extensions: Arc<std::collections::HashMap<String, String>>,
}
