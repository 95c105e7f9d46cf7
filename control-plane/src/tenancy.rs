//! A tenant's part of a multi-tenant config: the routes and services it owns
//! (`tenant: T`), which a token limited to the tenant reads and replaces without seeing
//! or touching anything else — other tenants' parts, shared routes, the tenants' blocks
//! (the platform's policy over them) and every other key stay the operator's.
//!
//! ```text
//! GET /v1/tenants/T/config  ─▶ { services: T's, routes: T's }
//! PUT /v1/tenants/T/config  ─▶ merged into the current document (T's routes where its
//!   first route was, else last; T's services replaced) ─▶ validated and applied as a new
//!   version like any change
//! ```
//!
//! The merge works on the YAML's structure, so a merged document is stored re-serialized
//! (its comments are not kept).

use serde_yaml::{Mapping, Value};

/// Why a tenant's part could not be read or merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenancyError {
    /// The current config has no such tenant (or is not multi-tenant).
    #[error("{0}")]
    NoTenant(String),
    /// The submitted part is not the tenant's to give.
    #[error("{0}")]
    Invalid(String),
}

fn parse(yaml: &str, what: &str) -> Result<Mapping, TenancyError> {
    match serde_yaml::from_str::<Value>(yaml) {
        Ok(Value::Mapping(m)) => Ok(m),
        Ok(Value::Null) => Ok(Mapping::new()),
        Ok(_) => Err(TenancyError::Invalid(format!(
            "{what} is not a YAML mapping"
        ))),
        Err(e) => Err(TenancyError::Invalid(format!("{what}: {e}"))),
    }
}

fn owner(item: &Value) -> Option<&str> {
    item.get("tenant").and_then(Value::as_str)
}

fn has_tenant(doc: &Mapping, tenant: &str) -> bool {
    doc.get("tenants")
        .and_then(Value::as_mapping)
        .is_some_and(|t| t.contains_key(tenant))
}

/// The routes and services of `tenant` in `doc`, as a YAML document.
pub fn fragment_of(doc: &str, tenant: &str) -> Result<String, TenancyError> {
    let doc = parse(doc, "the current config")?;
    if !has_tenant(&doc, tenant) {
        return Err(TenancyError::NoTenant(format!(
            "the current config has no tenant {tenant:?} under tenants"
        )));
    }
    let services: Mapping = doc
        .get("services")
        .and_then(Value::as_mapping)
        .map(|s| {
            s.iter()
                .filter(|(_, v)| owner(v) == Some(tenant))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let routes: Vec<Value> = doc
        .get("routes")
        .and_then(Value::as_sequence)
        .map(|r| {
            r.iter()
                .filter(|v| owner(v) == Some(tenant))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut fragment = Mapping::new();
    fragment.insert("services".into(), Value::Mapping(services));
    fragment.insert("routes".into(), Value::Sequence(routes));
    serde_yaml::to_string(&Value::Mapping(fragment))
        .map_err(|e| TenancyError::Invalid(e.to_string()))
}

/// `doc` with `tenant`'s routes and services replaced by those of `fragment`. Every route
/// and service of the fragment is the tenant's (`tenant: T`, added when absent); a service
/// name another owner uses is refused.
pub fn merge_fragment(doc: &str, tenant: &str, fragment: &str) -> Result<String, TenancyError> {
    let mut doc = parse(doc, "the current config")?;
    if !has_tenant(&doc, tenant) {
        return Err(TenancyError::NoTenant(format!(
            "the current config has no tenant {tenant:?} under tenants"
        )));
    }
    let fragment = parse(fragment, "the tenant's part")?;
    for key in fragment.keys() {
        let key = key.as_str().unwrap_or("?");
        if key != "services" && key != "routes" {
            return Err(TenancyError::Invalid(format!(
                "{key}: a tenant's part holds services and routes only"
            )));
        }
    }
    let claim = |path: String, item: &Value| -> Result<Value, TenancyError> {
        let mut item = item.clone();
        let Some(map) = item.as_mapping_mut() else {
            return Err(TenancyError::Invalid(format!("{path} is not a mapping")));
        };
        match map.get("tenant").map(|t| t.as_str()) {
            None => {
                map.insert("tenant".into(), tenant.into());
            }
            Some(Some(t)) if t == tenant => {}
            Some(other) => {
                return Err(TenancyError::Invalid(format!(
                    "{path}.tenant: {} is not {tenant:?}",
                    other.map_or("not a string".to_string(), |o| format!("{o:?}"))
                )))
            }
        }
        Ok(item)
    };
    // Services: the others', then the tenant's.
    let mut services: Mapping = doc
        .get("services")
        .and_then(Value::as_mapping)
        .map(|s| {
            s.iter()
                .filter(|(_, v)| owner(v) != Some(tenant))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    if let Some(own) = fragment.get("services") {
        let own = own
            .as_mapping()
            .ok_or_else(|| TenancyError::Invalid("services is not a mapping".into()))?;
        for (name, service) in own {
            let label = name.as_str().unwrap_or("?");
            if services.contains_key(name) {
                return Err(TenancyError::Invalid(format!(
                    "services.{label}: the name belongs to another owner"
                )));
            }
            services.insert(name.clone(), claim(format!("services.{label}"), service)?);
        }
    }
    // Routes: the tenant's new ones where its first route was, else last.
    let old: Vec<Value> = doc
        .get("routes")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let at = old.iter().position(|r| owner(r) == Some(tenant));
    let mut routes: Vec<Value> = old
        .iter()
        .filter(|r| owner(r) != Some(tenant))
        .cloned()
        .collect();
    let own_routes = match fragment.get("routes") {
        None => Vec::new(),
        Some(r) => r
            .as_sequence()
            .ok_or_else(|| TenancyError::Invalid("routes is not a list".into()))?
            .iter()
            .enumerate()
            .map(|(i, route)| claim(format!("routes[{i}]"), route))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let insert_at = at
        .map(|i| old[..i].iter().filter(|r| owner(r) != Some(tenant)).count())
        .unwrap_or(routes.len());
    routes.splice(insert_at..insert_at, own_routes);
    doc.insert("services".into(), Value::Mapping(services));
    doc.insert("routes".into(), Value::Sequence(routes));
    serde_yaml::to_string(&Value::Mapping(doc)).map_err(|e| TenancyError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
tenants: { acme: {}, globex: {} }
services:
  acme-api: { endpoints: ["127.0.0.1:1"], tenant: acme }
  globex-api: { endpoints: ["127.0.0.1:2"], tenant: globex }
  shared: { endpoints: ["127.0.0.1:3"] }
routes:
  - { name: g1, service: globex-api, tenant: globex }
  - { name: a1, service: acme-api, tenant: acme }
  - { name: a2, service: acme-api, tenant: acme }
  - { name: catch-all, service: shared }
"#;

    fn names(doc: &str) -> Vec<String> {
        let doc: Value = serde_yaml::from_str(doc).unwrap();
        doc["routes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_tenant_sees_and_replaces_only_its_part_in_place() {
        let part = fragment_of(DOC, "acme").unwrap();
        assert_eq!(names(&part), ["a1", "a2"]);
        assert!(!part.contains("globex") && !part.contains("shared"));
        let merged = merge_fragment(
            DOC,
            "acme",
            "services: { acme-api: { endpoints: [\"127.0.0.1:9\"] } }\nroutes: [ { name: a3, service: acme-api } ]\n",
        )
        .unwrap();
        assert_eq!(names(&merged), ["g1", "a3", "catch-all"]);
        let merged: Value = serde_yaml::from_str(&merged).unwrap();
        assert_eq!(merged["services"]["acme-api"]["tenant"], "acme");
        assert_eq!(merged["services"]["globex-api"]["tenant"], "globex");
        assert_eq!(merged["routes"][1]["tenant"], "acme");
    }

    #[test]
    fn another_owners_names_and_keys_are_refused() {
        let refuse = |fragment: &str| merge_fragment(DOC, "acme", fragment).unwrap_err();
        assert!(matches!(
            refuse("routes: [ { service: globex-api, tenant: globex } ]"),
            TenancyError::Invalid(m) if m.contains("routes[0].tenant")
        ));
        assert!(matches!(
            refuse("services: { shared: { endpoints: [\"127.0.0.1:4\"] } }"),
            TenancyError::Invalid(m) if m.contains("services.shared")
        ));
        assert!(matches!(
            refuse("tenants: { acme: { priority: high } }"),
            TenancyError::Invalid(m) if m.contains("services and routes only")
        ));
        assert!(matches!(
            merge_fragment(DOC, "initech", "routes: []").unwrap_err(),
            TenancyError::NoTenant(_)
        ));
    }
}
