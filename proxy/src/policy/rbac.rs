//! Role-based access control, as Envoy's RBAC HTTP filter: named policies, each a set of
//! permissions (what is asked: path, path template, method and other headers, destination
//! port and address) and principals (who asks: the client certificate's identity,
//! the source address, headers, verified JWT claims), either list matching when any entry
//! does. An `ALLOW` policy set lets only matching requests through, `DENY` stops matching
//! ones, `LOG` only records; shadow rules are evaluated and counted without effect, to
//! try a policy on live traffic before enforcing it.

use super::jwt::VerifiedPayload;
use crate::matchers::{Cidr, HeaderMatch, StringMatch};
use crate::telemetry::metrics::RbacCounters;
use http::{HeaderMap, Method};
use nip_filters::host::PeerCertificate;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};

/// The metadata namespace of verified JWT payloads (Envoy's jwt_authn filter name).
pub const JWT_METADATA: &str = nip_xds::resources::names::JWT_AUTHN;
/// The namespace of the request's tenant (`id`), written by `nip.tenant` (see
/// [`super::tenant`]).
pub const TENANT_METADATA: &str = nip_xds::resources::names::TENANT_METADATA;

/// What a policy set does with the requests its policies match (Envoy's `RBAC.Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Only matching requests pass.
    Allow,
    /// Matching requests are refused.
    Deny,
    /// Everything passes; matches are recorded.
    Log,
}

/// A test of a metadata value (Envoy's `ValueMatcher`).
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// A string that matches.
    String(StringMatch),
    /// A boolean equal to this.
    Bool(bool),
    /// A number in `[start, end)`.
    Range(f64, f64),
    /// A number equal to this.
    Number(f64),
    /// Present (any value) or absent.
    Present(bool),
    /// A list one of whose items matches.
    ListOneOf(Box<ValueMatch>),
    /// `null`.
    Null,
}

impl ValueMatch {
    fn matches(&self, value: Option<&Value>) -> bool {
        match (self, value) {
            (ValueMatch::Present(present), v) => v.is_some() == *present,
            (_, None) => false,
            (ValueMatch::String(m), Some(Value::String(s))) => m.matches(s),
            (ValueMatch::Bool(b), Some(Value::Bool(v))) => b == v,
            (ValueMatch::Number(n), Some(Value::Number(v))) => v.as_f64() == Some(*n),
            (ValueMatch::Range(lo, hi), Some(Value::Number(v))) => {
                v.as_f64().is_some_and(|v| *lo <= v && v < *hi)
            }
            (ValueMatch::ListOneOf(item), Some(Value::Array(list))) => {
                list.iter().any(|v| item.matches(Some(v)))
            }
            (ValueMatch::Null, Some(Value::Null)) => true,
            _ => false,
        }
    }
}

/// A test of the request's metadata (Envoy's `MetadataMatcher`): verified JWT payloads
/// under [`JWT_METADATA`], `path[0]` the provider's `payload_in_metadata`, the rest the
/// claim's path; the request's tenant under [`TENANT_METADATA`], path `id`.
#[derive(Debug, Clone)]
pub struct MetadataMatch {
    /// `filter`.
    pub filter: String,
    /// `path`.
    pub path: Vec<String>,
    /// `value`.
    pub value: ValueMatch,
    /// `invert`.
    pub invert: bool,
}

impl MetadataMatch {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let found = if self.filter == JWT_METADATA {
            self.path.split_first().and_then(|(key, rest)| {
                let payload = facts.jwt.iter().rev().find(|p| &*p.key == key)?;
                let (first, rest) = rest.split_first()?;
                let mut value = payload.claims.get(first)?;
                for key in rest {
                    value = value.get(key)?;
                }
                Some(value)
            })
        } else if self.filter == TENANT_METADATA {
            let id = match self.path.as_slice() {
                [key] if key == "id" => facts.tenant,
                _ => None,
            };
            let matched = match (&self.value, id) {
                (ValueMatch::Present(present), id) => id.is_some() == *present,
                (ValueMatch::String(m), Some(id)) => m.matches(id),
                _ => false,
            };
            return matched != self.invert;
        } else {
            None
        };
        self.value.matches(found) != self.invert
    }
}

/// A path template (Envoy's `uri_template` matcher): `/` separated segments, each a
/// literal, `*` or `{name}` (one segment), or, last, `**` or `{name=**}` (the rest, any
/// number of segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<TemplateSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateSegment {
    Literal(String),
    One,
    Rest,
}

impl PathTemplate {
    /// Parses `template` (it must start with `/`).
    pub fn parse(template: &str) -> Result<PathTemplate, String> {
        let Some(rest) = template.strip_prefix('/') else {
            return Err(format!("path template {template:?} must start with /"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "*" => TemplateSegment::One,
                "**" => TemplateSegment::Rest,
                p if p.starts_with('{') && p.ends_with('}') => {
                    let inner = &p[1..p.len() - 1];
                    match inner.split_once('=') {
                        None => TemplateSegment::One,
                        Some((_, "*")) => TemplateSegment::One,
                        Some((_, "**")) => TemplateSegment::Rest,
                        Some(_) => {
                            return Err(format!(
                                "path template {template:?}: a variable matches * or ** only"
                            ))
                        }
                    }
                }
                p if p.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "path template {template:?}: segment {p:?} mixes a literal with a wildcard"
                    ))
                }
                p => TemplateSegment::Literal(p.to_string()),
            };
            if segment == TemplateSegment::Rest && i + 1 != parts.len() {
                return Err(format!("path template {template:?}: ** must be last"));
            }
            segments.push(segment);
        }
        Ok(PathTemplate { segments })
    }

    /// Whether `path` (no query) fits.
    pub fn matches(&self, path: &str) -> bool {
        let Some(path) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = path.split('/');
        for segment in &self.segments {
            match segment {
                TemplateSegment::Rest => return true,
                TemplateSegment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                TemplateSegment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// What is asked (Envoy's `Permission`).
#[derive(Debug, Clone)]
pub enum Permission {
    /// Everything.
    Any,
    /// All of these.
    And(Vec<Permission>),
    /// One of these.
    Or(Vec<Permission>),
    /// Not this.
    Not(Box<Permission>),
    /// A header (`:method`, `:authority`/`host` and `:path` included).
    Header(HeaderMatch),
    /// The path without its query (`url_path`).
    UrlPath(StringMatch),
    /// The path fits a template (`uri_template`).
    PathTemplate(PathTemplate),
    /// The address the client connected to (`destination_ip`).
    DestinationIp(Cidr),
    /// The port it connected to.
    DestinationPort(u16),
    /// A port in `[start, end)`.
    DestinationPortRange(u16, u16),
    /// Metadata.
    Metadata(MetadataMatch),
}

/// Who asks (Envoy's `Principal`).
#[derive(Debug, Clone)]
pub enum Principal {
    /// Everyone.
    Any,
    /// All of these.
    And(Vec<Principal>),
    /// One of these.
    Or(Vec<Principal>),
    /// Not this.
    Not(Box<Principal>),
    /// A client with a verified certificate, whose URI SANs, else DNS SANs, else subject
    /// match (`None`: any verified client).
    Authenticated(Option<StringMatch>),
    /// The connection's source address (`direct_remote_ip`; `remote_ip` too: NIP does
    /// not take client addresses from `x-forwarded-for`).
    SourceIp(Cidr),
    /// A header.
    Header(HeaderMatch),
    /// The path (`url_path`).
    UrlPath(StringMatch),
    /// Metadata (verified JWT claims).
    Metadata(MetadataMatch),
}

/// Everything a policy may look at, for one request.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The client's address.
    pub source: Option<IpAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
    /// The client's verified certificate.
    pub peer: Option<&'a PeerCertificate>,
    /// Verified JWT payloads.
    pub jwt: &'a [VerifiedPayload],
    /// The request's tenant id (dynamic metadata `nip.tenant` → `id`).
    pub tenant: Option<&'a str>,
}

impl Permission {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(f)),
            Permission::Or(any) => any.iter().any(|p| p.matches(f)),
            Permission::Not(p) => !p.matches(f),
            Permission::Header(h) => h.matches(f.method, f.headers),
            Permission::UrlPath(m) => m.matches(f.path),
            Permission::PathTemplate(t) => t.matches(f.path),
            Permission::DestinationIp(c) => f.destination.is_some_and(|d| c.contains(d.ip())),
            Permission::DestinationPort(p) => f.destination.is_some_and(|d| d.port() == *p),
            Permission::DestinationPortRange(lo, hi) => f
                .destination
                .is_some_and(|d| (*lo..*hi).contains(&d.port())),
            Permission::Metadata(m) => m.matches(f),
        }
    }
}

impl Principal {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(f)),
            Principal::Or(any) => any.iter().any(|p| p.matches(f)),
            Principal::Not(p) => !p.matches(f),
            Principal::Authenticated(name) => match (f.peer, name) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(peer), Some(m)) => super::tenant::principal_matches(peer, m),
            },
            Principal::SourceIp(c) => f.source.is_some_and(|s| c.contains(s)),
            Principal::Header(h) => h.matches(f.method, f.headers),
            Principal::UrlPath(m) => m.matches(f.path),
            Principal::Metadata(m) => m.matches(f),
        }
    }
}

/// One named policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name.
    pub name: String,
    /// What it covers (one must match).
    pub permissions: Vec<Permission>,
    /// Whom it covers (one must match).
    pub principals: Vec<Principal>,
}

/// A policy set (Envoy's `RBAC`).
#[derive(Debug, Clone)]
pub struct Rules {
    /// What matching means.
    pub action: Action,
    /// The policies, in name order (the first match is the one reported).
    pub policies: Vec<Policy>,
}

impl Rules {
    /// Whether the request passes, and the policy that matched.
    pub fn evaluate(&self, facts: &Facts<'_>) -> (bool, Option<&str>) {
        let matched = self
            .policies
            .iter()
            .find(|p| {
                p.permissions.iter().any(|x| x.matches(facts))
                    && p.principals.iter().any(|x| x.matches(facts))
            })
            .map(|p| p.name.as_str());
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        (allowed, matched)
    }
}

/// One RBAC filter (or a route's rules in its place).
#[derive(Debug)]
pub struct RbacFilter {
    /// The enforced rules (`None`: nothing enforced).
    pub rules: Option<Rules>,
    /// The shadow rules.
    pub shadow: Option<Rules>,
    /// Its counters.
    pub stats: RbacCounters,
}

/// A refused request: the policy that refused it (for a DENY set), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The matched DENY policy's name.
    pub policy: Option<String>,
}

impl RbacFilter {
    /// Evaluates the shadow rules (counted) and then the rules.
    pub fn check(&self, facts: &Facts<'_>) -> Result<(), Denied> {
        if let Some(shadow) = &self.shadow {
            let (allowed, policy) = shadow.evaluate(facts);
            if allowed {
                self.stats.shadow_allowed.inc();
            } else {
                self.stats.shadow_denied.inc();
                tracing::debug!(policy = ?policy, "RBAC shadow rules would deny this request");
            }
        }
        let Some(rules) = &self.rules else {
            return Ok(());
        };
        let (allowed, policy) = rules.evaluate(facts);
        if allowed {
            self.stats.allowed.inc();
            Ok(())
        } else {
            self.stats.denied.inc();
            Err(Denied {
                policy: policy.map(str::to_string),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matchers::HeaderValueMatch;
    use std::sync::Arc;

    fn facts<'a>(headers: &'a HeaderMap, path: &'a str, jwt: &'a [VerifiedPayload]) -> Facts<'a> {
        Facts {
            method: &Method::GET,
            path,
            headers,
            source: Some("10.1.2.3".parse().unwrap()),
            destination: Some("127.0.0.1:8080".parse().unwrap()),
            peer: None,
            jwt,
            tenant: None,
        }
    }

    #[test]
    fn the_tenant_metadata_matches_the_requests_tenant() {
        let headers = HeaderMap::new();
        let matcher = |value| MetadataMatch {
            filter: TENANT_METADATA.to_string(),
            path: vec!["id".into()],
            value,
            invert: false,
        };
        let acme = matcher(ValueMatch::String(StringMatch::Exact("acme".into())));
        let anyone = matcher(ValueMatch::Present(true));
        let with = |tenant| Facts {
            tenant,
            ..facts(&headers, "/", &[])
        };
        assert!(acme.matches(&with(Some("acme"))));
        assert!(!acme.matches(&with(Some("globex"))));
        assert!(!acme.matches(&with(None)));
        assert!(anyone.matches(&with(Some("globex"))));
        assert!(!anyone.matches(&with(None)));
        let not_acme = MetadataMatch {
            invert: true,
            ..acme.clone()
        };
        assert!(not_acme.matches(&with(None)));
    }

    #[test]
    fn path_templates_match_segments() {
        let t = PathTemplate::parse("/users/{id}/orders/**").unwrap();
        assert!(t.matches("/users/7/orders/1/items"));
        assert!(t.matches("/users/7/orders/"));
        assert!(!t.matches("/users//orders/1"));
        assert!(!t.matches("/users/7/carts/1"));
        let one = PathTemplate::parse("/files/*").unwrap();
        assert!(one.matches("/files/a"));
        assert!(!one.matches("/files/a/b"));
        assert!(PathTemplate::parse("/a/**/b").is_err());
        assert!(PathTemplate::parse("/a/x*").is_err());
        assert!(PathTemplate::parse("a").is_err());
    }

    #[test]
    fn cidrs_contain_their_addresses() {
        let net = Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap();
        assert!(net.contains("10.200.1.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let all = Cidr::new("0.0.0.0".parse().unwrap(), 0).unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn allow_deny_and_log_sets_decide_by_their_policies() {
        let admins = Policy {
            name: "admins".into(),
            permissions: vec![Permission::PathTemplate(
                PathTemplate::parse("/admin/**").unwrap(),
            )],
            principals: vec![Principal::Metadata(MetadataMatch {
                filter: JWT_METADATA.into(),
                path: vec!["idp".into(), "roles".into()],
                value: ValueMatch::ListOneOf(Box::new(ValueMatch::String(StringMatch::Exact(
                    "admin".into(),
                )))),
                invert: false,
            })],
        };
        let allow = Rules {
            action: Action::Allow,
            policies: vec![admins.clone()],
        };
        let headers = HeaderMap::new();
        let admin = [VerifiedPayload {
            key: Arc::from("idp"),
            claims: Arc::new(serde_json::from_str(r#"{"roles":["dev","admin"]}"#).unwrap()),
        }];
        let dev = [VerifiedPayload {
            key: Arc::from("idp"),
            claims: Arc::new(serde_json::from_str(r#"{"roles":["dev"]}"#).unwrap()),
        }];
        assert_eq!(
            allow.evaluate(&facts(&headers, "/admin/x", &admin)),
            (true, Some("admins"))
        );
        assert_eq!(
            allow.evaluate(&facts(&headers, "/admin/x", &dev)),
            (false, None)
        );
        assert_eq!(
            allow.evaluate(&facts(&headers, "/admin/x", &[])),
            (false, None)
        );
        let deny = Rules {
            action: Action::Deny,
            policies: vec![Policy {
                name: "no-outsiders".into(),
                permissions: vec![Permission::Any],
                principals: vec![Principal::Not(Box::new(Principal::SourceIp(
                    Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap(),
                )))],
            }],
        };
        assert_eq!(deny.evaluate(&facts(&headers, "/", &[])), (true, None));
        let mut outside = facts(&headers, "/", &[]);
        outside.source = Some("192.0.2.1".parse().unwrap());
        assert_eq!(deny.evaluate(&outside), (false, Some("no-outsiders")));
        let log = Rules {
            action: Action::Log,
            policies: deny.policies.clone(),
        };
        assert_eq!(log.evaluate(&outside), (true, Some("no-outsiders")));
    }

    #[test]
    fn shadow_rules_count_without_refusing() {
        let mut headers = HeaderMap::new();
        headers.insert("x-team", "blue".parse().unwrap());
        let team_red = Rules {
            action: Action::Allow,
            policies: vec![Policy {
                name: "red".into(),
                permissions: vec![Permission::Any],
                principals: vec![Principal::Header(HeaderMatch {
                    name: http::HeaderName::from_static("x-team"),
                    is_method: false,
                    value: HeaderValueMatch::Exact("red".into()),
                    invert: false,
                })],
            }],
        };
        let filter = RbacFilter {
            rules: None,
            shadow: Some(team_red.clone()),
            stats: RbacCounters::default(),
        };
        assert_eq!(filter.check(&facts(&headers, "/", &[])), Ok(()));
        assert_eq!(filter.stats.shadow_denied.get(), 1);
        let enforced = RbacFilter {
            rules: Some(team_red),
            shadow: None,
            stats: RbacCounters::default(),
        };
        assert!(enforced.check(&facts(&headers, "/", &[])).is_err());
        assert_eq!(enforced.stats.denied.get(), 1);
    }
}
