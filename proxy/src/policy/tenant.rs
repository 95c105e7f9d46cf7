//! Tenants: whose request this is. A route a tenant owns (route metadata `nip.tenant`)
//! makes every request on it that tenant's — identification by host and path. On a route
//! no tenant owns, NIP's `nip.tenant` HTTP filter ([`TenantIdentity`]) names the tenant
//! from the request: a header, a verified JWT claim, or the client certificate's
//! principal matched against each tenant's `principals`.
//!
//! The request's tenant is then its *dynamic metadata* `nip.tenant` → `id`, read by the
//! filters after it: a rate limit action (`metadata`, the tenant's `message_rate` bucket),
//! an RBAC principal (`metadata` matcher), and by metrics and the access log. A tenant's
//! `priority` replaces the client's `x-nip-priority` when the identification is verified
//! (route ownership, a verified claim, a certificate): a header anyone can write names a
//! tenant for quotas and accounting, never for a better place in the queue.

use super::jwt::VerifiedPayload;
use crate::matchers::StringMatch;
use crate::telemetry::metrics::RequestCounters;
use crate::upstream::concurrency::Priority;
use http::{HeaderMap, HeaderName};
use nip_filters::host::PeerCertificate;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// A tenant, as routes and the identification filter know it.
#[derive(Debug)]
pub struct Tenant {
    /// Its id.
    pub id: Arc<str>,
    /// The priority its requests get (`None`: theirs).
    pub priority: Option<Priority>,
    /// Its request counters (`nip_tenant_requests_total{tenant}`).
    pub counters: RequestCounters,
}

/// Where the `nip.tenant` filter reads a request's tenant.
#[derive(Debug)]
pub enum TenantKey {
    /// A header holding the tenant id (for a header a trusted hop sets).
    Header(HeaderName),
    /// A claim (its path: `org`, `org.id`) of a token a `jwt_authn` filter before this
    /// one verified.
    Claim(Vec<String>),
    /// The client certificate's principal (URI SAN, else DNS SAN, else subject), matched
    /// against each tenant's `principals` in turn.
    Certificate,
}

/// NIP's `nip.tenant` HTTP filter: names the tenant of requests on routes no tenant owns.
#[derive(Debug)]
pub struct TenantIdentity {
    /// Where the id is.
    pub key: TenantKey,
    /// The tenants a header or claim may name, by id.
    pub tenants: HashMap<Arc<str>, Arc<Tenant>>,
    /// For [`TenantKey::Certificate`]: principal patterns and whose they are, in order.
    pub principals: Vec<(StringMatch, Arc<Tenant>)>,
}

/// What identification looks at.
#[derive(Debug, Clone, Copy)]
pub struct IdentityFacts<'a> {
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Payloads verified by the `jwt_authn` filters before this one.
    pub jwt: &'a [VerifiedPayload],
    /// The client's verified certificate.
    pub peer: Option<&'a PeerCertificate>,
}

/// A request's tenant, and whether the request could have made it up.
#[derive(Debug)]
pub struct Identified<'a> {
    /// The tenant.
    pub tenant: &'a Arc<Tenant>,
    /// Named by a verified token or certificate (not a header anyone can write).
    pub verified: bool,
}

impl TenantIdentity {
    /// The tenant the request names, if it names a known one.
    pub fn identify(&self, facts: &IdentityFacts<'_>) -> Option<Identified<'_>> {
        match &self.key {
            TenantKey::Header(name) => {
                let id = facts.headers.get(name)?.to_str().ok()?;
                Some(Identified {
                    tenant: self.tenants.get(id)?,
                    verified: false,
                })
            }
            TenantKey::Claim(path) => {
                let id = facts.jwt.iter().rev().find_map(|p| string_claim(p, path))?;
                Some(Identified {
                    tenant: self.tenants.get(id)?,
                    verified: true,
                })
            }
            TenantKey::Certificate => {
                let peer = facts.peer?;
                let (_, tenant) = self
                    .principals
                    .iter()
                    .find(|(pattern, _)| principal_matches(peer, pattern))?;
                Some(Identified {
                    tenant,
                    verified: true,
                })
            }
        }
    }
}

/// A string claim at `path` of a verified payload.
fn string_claim<'p>(payload: &'p VerifiedPayload, path: &[String]) -> Option<&'p str> {
    let (first, rest) = path.split_first()?;
    let mut value = payload.claims.get(first)?;
    for key in rest {
        value = value.get(key)?;
    }
    match value {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// Whether a verified client certificate's principal matches: its URI SANs, else its DNS
/// SANs, else its subject (Envoy's `authenticated.principal_name`).
pub fn principal_matches(peer: &PeerCertificate, pattern: &StringMatch) -> bool {
    if !peer.uris.is_empty() {
        peer.uris.iter().any(|u| pattern.matches(u))
    } else if !peer.dns_names.is_empty() {
        peer.dns_names.iter().any(|d| pattern.matches(d))
    } else {
        pattern.matches(&peer.subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> Arc<Tenant> {
        Arc::new(Tenant {
            id: id.into(),
            priority: None,
            counters: RequestCounters::default(),
        })
    }

    fn identity(key: TenantKey) -> TenantIdentity {
        let (acme, globex) = (tenant("acme"), tenant("globex"));
        TenantIdentity {
            key,
            tenants: [
                ("acme".into(), acme.clone()),
                ("globex".into(), globex.clone()),
            ]
            .into(),
            principals: vec![
                (
                    StringMatch::Prefix("spiffe://nip.local/ns/acme/".into()),
                    acme,
                ),
                (StringMatch::Exact("globex.example".into()), globex),
            ],
        }
    }

    fn peer(uris: &[&str], dns: &[&str]) -> PeerCertificate {
        PeerCertificate {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_header_names_a_known_tenant_unverified() {
        let identity = identity(TenantKey::Header(HeaderName::from_static("x-tenant")));
        fn facts(headers: &HeaderMap) -> IdentityFacts<'_> {
            IdentityFacts {
                headers,
                jwt: &[],
                peer: None,
            }
        }
        let mut headers = HeaderMap::new();
        assert!(identity.identify(&facts(&headers)).is_none());
        headers.insert("x-tenant", "nobody".parse().unwrap());
        assert!(identity.identify(&facts(&headers)).is_none());
        headers.insert("x-tenant", "globex".parse().unwrap());
        let found = identity.identify(&facts(&headers)).unwrap();
        assert_eq!(&*found.tenant.id, "globex");
        assert!(!found.verified);
    }

    #[test]
    fn a_claim_names_the_tenant_of_the_last_verified_token() {
        let identity = identity(TenantKey::Claim(vec!["org".into(), "id".into()]));
        let payload = |org: Value| VerifiedPayload {
            key: "p".into(),
            claims: Arc::new(
                serde_json::json!({ "org": org })
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        };
        let headers = HeaderMap::new();
        let jwt = [
            payload(serde_json::json!({ "id": "globex" })),
            payload(serde_json::json!({ "id": "acme" })),
        ];
        let found = identity
            .identify(&IdentityFacts {
                headers: &headers,
                jwt: &jwt,
                peer: None,
            })
            .unwrap();
        assert_eq!(&*found.tenant.id, "acme");
        assert!(found.verified);
        let numeric = [payload(serde_json::json!({ "id": 7 }))];
        assert!(identity
            .identify(&IdentityFacts {
                headers: &headers,
                jwt: &numeric,
                peer: None,
            })
            .is_none());
    }

    #[test]
    fn a_certificate_names_the_first_tenant_whose_principals_match() {
        let identity = identity(TenantKey::Certificate);
        let headers = HeaderMap::new();
        let find = |peer: Option<&PeerCertificate>| {
            identity
                .identify(&IdentityFacts {
                    headers: &headers,
                    jwt: &[],
                    peer,
                })
                .map(|i| i.tenant.id.to_string())
        };
        assert_eq!(find(None), None);
        let acme = peer(&["spiffe://nip.local/ns/acme/sa/web"], &["globex.example"]);
        assert_eq!(find(Some(&acme)).as_deref(), Some("acme"));
        // DNS SANs count only without URI SANs.
        let globex = peer(&[], &["globex.example"]);
        assert_eq!(find(Some(&globex)).as_deref(), Some("globex"));
        let stranger = peer(&["spiffe://nip.local/ns/other/sa/web"], &["globex.example"]);
        assert_eq!(find(Some(&stranger)), None);
    }
}
