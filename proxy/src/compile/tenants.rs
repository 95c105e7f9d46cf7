//! Compiling NIP's `nip.tenant` HTTP filter (see `names::TENANT_FILTER` for its config):
//! where requests on routes no tenant owns name their tenant, and each tenant's priority
//! and certificate principals. A tenant's counters are the ones its own routes count in,
//! so `nip_tenant_requests_total{tenant}` holds all of its requests.

use super::*;
use crate::matchers::StringMatch;
use crate::policy::tenant::{Tenant, TenantIdentity, TenantKey};
use crate::upstream::concurrency::Priority;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use std::collections::HashMap;

impl Compiler<'_> {
    /// The `nip.tenant` filter from its `Struct` config.
    pub(super) fn tenant_identity(&self, any: &Any) -> Result<TenantIdentity, String> {
        let config: Struct = decode(any)?;
        for key in config.fields.keys() {
            if !matches!(key.as_str(), "header" | "claim" | "certificate" | "tenants") {
                return Err(format!(
                    "{key:?} is not a field (header, claim, certificate, tenants)"
                ));
            }
        }
        let text = |name: &str| match config.fields.get(name).map(|v| &v.kind) {
            None => Ok(None),
            Some(Some(Kind::StringValue(s))) if !s.is_empty() => Ok(Some(s.as_str())),
            Some(_) => Err(format!("{name} must be a non-empty string")),
        };
        let certificate = match config.fields.get("certificate").map(|v| &v.kind) {
            None | Some(Some(Kind::BoolValue(false))) => false,
            Some(Some(Kind::BoolValue(true))) => true,
            Some(_) => return Err("certificate must be a boolean".into()),
        };
        let key = match (text("header")?, text("claim")?, certificate) {
            (Some(header), None, false) => TenantKey::Header(
                HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| format!("header {header:?} is not a header name"))?,
            ),
            (None, Some(claim), false) => {
                let path: Vec<String> = claim.split('.').map(str::to_string).collect();
                if path.iter().any(String::is_empty) {
                    return Err(format!("claim {claim:?} is not a claim path"));
                }
                TenantKey::Claim(path)
            }
            (None, None, true) => TenantKey::Certificate,
            _ => return Err("set exactly one of header, claim, certificate: true".into()),
        };
        let tenants = match config.fields.get("tenants").map(|v| &v.kind) {
            Some(Some(Kind::StructValue(tenants))) if !tenants.fields.is_empty() => tenants,
            _ => return Err("tenants must map at least one tenant id to its settings".into()),
        };
        let mut identity = TenantIdentity {
            key,
            tenants: HashMap::new(),
            principals: Vec::new(),
        };
        // In id order: the first tenant whose principals match a certificate is its.
        let mut ids: Vec<&String> = tenants.fields.keys().collect();
        ids.sort();
        for id in ids {
            let field = |m: String| format!("tenants.{id}.{m}");
            let settings = match tenants.fields.get(id).map(|v| &v.kind) {
                Some(Some(Kind::StructValue(s))) => s,
                _ => return Err(format!("tenants.{id} must be a struct")),
            };
            if id.is_empty() {
                return Err("tenants: an id is empty".into());
            }
            let tenant = Arc::new(Tenant {
                id: id.as_str().into(),
                priority: priority(settings).map_err(field)?,
                counters: self.metrics.tenant_counters(id),
            });
            for (i, pattern) in principals(settings).map_err(field)?.into_iter().enumerate() {
                if pattern.is_empty() || pattern == "*" {
                    return Err(field(format!(
                        "principals[{i}] {pattern:?} would match every certificate"
                    )));
                }
                let matcher = match pattern.strip_suffix('*') {
                    Some(start) => StringMatch::Prefix(start.to_string()),
                    None => StringMatch::Exact(pattern.to_string()),
                };
                identity.principals.push((matcher, Arc::clone(&tenant)));
            }
            identity.tenants.insert(Arc::clone(&tenant.id), tenant);
        }
        if matches!(identity.key, TenantKey::Certificate) && identity.principals.is_empty() {
            return Err("certificate: true needs principals on at least one tenant".into());
        }
        Ok(identity)
    }
}

/// A tenant's `priority` (`low`, `normal`, `high`), if set.
fn priority(settings: &Struct) -> Result<Option<Priority>, String> {
    match settings.fields.get("priority").map(|v| &v.kind) {
        None => Ok(None),
        Some(Some(Kind::StringValue(p))) => Priority::parse(p.as_bytes())
            .map(Some)
            .ok_or_else(|| format!("priority {p:?} is not low, normal or high")),
        Some(_) => Err("priority must be a string".into()),
    }
}

/// A tenant's `principals` patterns.
fn principals(settings: &Struct) -> Result<Vec<&str>, String> {
    for key in settings.fields.keys() {
        if !matches!(key.as_str(), "priority" | "principals") {
            return Err(format!("{key:?} is not a field (priority, principals)"));
        }
    }
    match settings.fields.get("principals").map(|v| &v.kind) {
        None => Ok(Vec::new()),
        Some(Some(Kind::ListValue(list))) => list
            .values
            .iter()
            .enumerate()
            .map(|(i, v): (usize, &Value)| match &v.kind {
                Some(Kind::StringValue(s)) => Ok(s.as_str()),
                _ => Err(format!("principals[{i}] must be a string")),
            })
            .collect(),
        Some(_) => Err("principals must be a list of strings".into()),
    }
}
