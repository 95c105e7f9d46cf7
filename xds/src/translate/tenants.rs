//! Tenants in xDS. A tenant's own routes carry route metadata `nip.tenant` (see the
//! route translation); here: NIP's `nip.tenant` HTTP filter, which names the tenant of a
//! request on a shared route from the config's `tenant_key` (a header, a verified claim,
//! or the client certificate matched against each tenant's `principals`), and the
//! tenants' `message_rate` quotas as a second `local_ratelimit` filter with one bucket
//! per tenant, which a route's `rate_limits` reach through a descriptor naming the
//! request's tenant.

use super::{pack_any, pb_duration};
use crate::config::{Config, RouteConfig};
use crate::resources::names;
use envoy_types::pb::envoy::config::route::v3::RateLimit;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor, LocalRateLimitDescriptor,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::r#type::v3::TokenBucket;
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, UInt32Value, Value};
use std::time::Duration;

/// The descriptor key naming the tenant of a request.
pub const TENANT_DESCRIPTOR_KEY: &str = "tenant";
/// The local rate limit filter holding the tenants' `message_rate` buckets.
pub const TENANT_RATE_LIMIT_FILTER: &str = "nip.tenant_ratelimit";

fn text(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_string())),
    }
}

/// The `nip.tenant` filter, when the config has a `tenant_key` (it runs after
/// `jwt_authn`, whose verified claims it may read, and before RBAC and the rate limits,
/// which read the tenant it names).
pub(super) fn tenant_identity_filter(config: &Config) -> Option<HttpFilter> {
    let key = config.tenant_key.as_ref()?;
    let mut fields = std::collections::BTreeMap::new();
    if let Some(header) = &key.header {
        fields.insert("header".to_string(), text(&header.to_ascii_lowercase()));
    }
    if let Some(claim) = &key.claim {
        fields.insert("claim".to_string(), text(claim));
    }
    if key.certificate {
        fields.insert(
            "certificate".to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        );
    }
    let tenants = config
        .tenants
        .iter()
        .map(|(id, tenant)| {
            let mut settings = std::collections::BTreeMap::new();
            if let Some(priority) = &tenant.priority {
                settings.insert("priority".to_string(), text(priority));
            }
            if !tenant.principals.is_empty() {
                settings.insert(
                    "principals".to_string(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: tenant.principals.iter().map(|p| text(p)).collect(),
                        })),
                    },
                );
            }
            let settings = Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: settings.into_iter().collect(),
                })),
            };
            (id.clone(), settings)
        })
        .collect();
    fields.insert(
        "tenants".to_string(),
        Value {
            kind: Some(Kind::StructValue(Struct { fields: tenants })),
        },
    );
    Some(HttpFilter {
        name: names::TENANT_FILTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Struct {
            fields: fields.into_iter().collect(),
        }))),
        ..Default::default()
    })
}

/// A tenant's `resource_quota.message_rate` as a token bucket: `N/sec|min|hour` refilled
/// over its unit, bursts of one unit's worth.
fn message_rate_bucket(rate: &str) -> Option<TokenBucket> {
    let (count, seconds) = crate::config::rate_parts(rate).ok()?;
    let tokens = count.round().clamp(1.0, f64::from(u32::MAX)) as u32;
    Some(TokenBucket {
        max_tokens: tokens,
        tokens_per_fill: Some(UInt32Value { value: tokens }),
        fill_interval: Some(pb_duration(Duration::from_secs(seconds))),
    })
}

/// The tenants with a `message_rate`, by id.
fn tenant_rates(config: &Config) -> Vec<(String, TokenBucket)> {
    config
        .tenant
        .iter()
        .map(|t| (t.id.clone(), t))
        .chain(config.tenants.iter().map(|(id, t)| (id.clone(), t)))
        .filter_map(|(id, t)| {
            let rate = t.resource_quota.as_ref()?.message_rate.as_deref()?;
            Some((id, message_rate_bucket(rate)?))
        })
        .collect()
}

/// A second `local_ratelimit` filter whose own descriptors hold one bucket per tenant
/// (`tenant=ID`), shared by all the tenant's routes.
pub(super) fn tenant_rate_limit_filter(config: &Config) -> Option<HttpFilter> {
    let rates = tenant_rates(config);
    if rates.is_empty() {
        return None;
    }
    Some(HttpFilter {
        name: TENANT_RATE_LIMIT_FILTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            LocalRateLimit {
                stat_prefix: "tenant_rate_limit".to_string(),
                descriptors: rates
                    .into_iter()
                    .map(|(id, bucket)| LocalRateLimitDescriptor {
                        entries: vec![rate_limit_descriptor::Entry {
                            key: TENANT_DESCRIPTOR_KEY.to_string(),
                            value: id,
                        }],
                        token_bucket: Some(bucket),
                        ..Default::default()
                    })
                    .collect(),
                // DRAFT_VERSION_03: the x-ratelimit-* headers.
                enable_x_ratelimit_headers: 1,
                ..Default::default()
            },
        ))),
        ..Default::default()
    })
}

/// The `rate_limits` entry naming a request's tenant: on a route a tenant owns, its id
/// when it has a message rate (a `generic_key`); on a route no tenant owns, when
/// `tenant_key` is set, the tenant `nip.tenant` identified (`metadata` of
/// `nip.tenant` → `id`; a request without one makes no descriptor).
pub(super) fn tenant_rate_limit_actions(config: &Config, route: &RouteConfig) -> Vec<RateLimit> {
    use envoy_types::pb::envoy::config::route::v3::rate_limit::{action, Action};
    use envoy_types::pb::envoy::r#type::metadata::v3::{metadata_key, MetadataKey};

    let entry = |specifier| RateLimit {
        actions: vec![Action {
            action_specifier: Some(specifier),
        }],
        ..Default::default()
    };
    if let Some((id, tenant)) = crate::config::route_tenant(config, route) {
        if tenant
            .resource_quota
            .as_ref()
            .and_then(|q| q.message_rate.as_ref())
            .is_none()
        {
            return Vec::new();
        }
        return vec![entry(action::ActionSpecifier::GenericKey(
            action::GenericKey {
                descriptor_key: TENANT_DESCRIPTOR_KEY.to_string(),
                descriptor_value: id.to_string(),
                ..Default::default()
            },
        ))];
    }
    if config.tenant_key.is_none() || tenant_rates(config).is_empty() {
        return Vec::new();
    }
    vec![entry(action::ActionSpecifier::Metadata(action::MetaData {
        descriptor_key: TENANT_DESCRIPTOR_KEY.to_string(),
        metadata_key: Some(MetadataKey {
            key: names::TENANT_METADATA.to_string(),
            path: vec![metadata_key::PathSegment {
                segment: Some(metadata_key::path_segment::Segment::Key("id".to_string())),
            }],
        }),
        source: action::meta_data::Source::Dynamic as i32,
        ..Default::default()
    }))]
}
