//! Route selection: host → virtual host → first matching route → target cluster.
//!
//! Semantics follow Envoy: the most specific virtual host wins (exact domain, then the
//! longest `*.suffix`, then `*`), then routes are tried in order. Paths are matched without
//! the query string; a regex must match the whole path. A route may also rewrite what it
//! forwards and edit headers ([`edits`]), or answer by itself ([`actions`]).

pub mod actions;
pub mod edits;

use crate::matchers::RouteMatch;
use crate::policy::RoutePolicy;
use crate::telemetry::metrics::{RequestCounters, RouteStats};
use crate::upstream::cluster::Cluster;
pub use actions::{HostRewrite, LocalAction, PathRewrite, Redirect, RedirectPath};
pub use edits::{AppendAction, HeaderAdd, HeaderEdits, ValueTemplate, Vars};
use http::{HeaderMap, HeaderName, Method};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Which retries a route allows, and how long it waits before each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub max_retries: u32,
    /// Retry when connecting fails.
    pub on_connect_failure: bool,
    /// Retry on any 5xx response (and resets).
    pub on_5xx: bool,
    /// Retry on 502, 503, 504 (and resets).
    pub on_gateway_error: bool,
    /// Retry when the upstream resets before answering.
    pub on_reset: bool,
    /// Longest wait for one try's answer (a timed-out try is retried on `5xx` or
    /// `gateway-error`).
    pub per_try_timeout: Option<Duration>,
    /// Retry on a status in [`RetryPolicy::retriable_status_codes`] (Envoy's
    /// `retriable-status-codes`).
    pub on_retriable_status_codes: bool,
    /// The statuses `retriable-status-codes` retries.
    pub retriable_status_codes: Vec<u16>,
    /// The wait before each retry ([`BackOff`]; Envoy's defaults unless configured).
    pub back_off: BackOff,
}

/// Envoy's retry back-off: exponential with full jitter. Before retry `n` (1, 2, …) the
/// wait is uniform in `[0, min(base × 2^(n-1), max))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackOff {
    /// `retry_back_off.base_interval` (Envoy's default 25 ms).
    pub base: Duration,
    /// `retry_back_off.max_interval` (default 10 × base).
    pub max: Duration,
}

impl Default for BackOff {
    fn default() -> Self {
        BackOff {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

impl BackOff {
    /// The ceiling of the wait before retry `retry` (1-based): base doubled each time,
    /// capped at `max`, as Envoy's `JitteredExponentialBackOffStrategy`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The wait before retry `retry`, drawn with `random` (a uniform `u64`).
    pub fn wait(&self, retry: u32, random: u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_micros()).unwrap_or(u64::MAX);
        if ceiling == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(random % ceiling)
    }
}

impl RetryPolicy {
    /// Parses Envoy's comma-separated `retry_on`; unknown conditions are returned as errors.
    pub fn parse(retry_on: &str, max_retries: u32) -> Result<Self, String> {
        let mut policy = RetryPolicy {
            max_retries,
            ..Default::default()
        };
        for condition in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match condition {
                "connect-failure" => policy.on_connect_failure = true,
                "5xx" => policy.on_5xx = true,
                "gateway-error" => policy.on_gateway_error = true,
                "reset" => policy.on_reset = true,
                "retriable-status-codes" => policy.on_retriable_status_codes = true,
                other => return Err(format!("retry condition {other:?} is not supported")),
            }
        }
        Ok(policy)
    }

    /// Whether an upstream response status is worth another try.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && (500..600).contains(&status))
            || (self.on_gateway_error && matches!(status, 502..=504))
            || (self.on_retriable_status_codes && self.retriable_status_codes.contains(&status))
    }

    /// Whether a failed connection attempt is worth another try.
    pub fn retries_connect_failure(&self) -> bool {
        self.on_connect_failure || self.on_5xx || self.on_gateway_error
    }

    /// Whether an upstream reset before the response is worth another try.
    pub fn retries_reset(&self) -> bool {
        self.on_reset || self.on_5xx || self.on_gateway_error
    }

    /// Whether a try that timed out before its answer is worth another (Envoy counts it
    /// as a 504).
    pub fn retries_timeout(&self) -> bool {
        self.on_5xx || self.on_gateway_error
    }
}

/// A cluster a route sends to, with its per-(route, cluster) request counters.
#[derive(Debug)]
pub struct Target {
    /// The cluster name as the route gives it.
    pub cluster_name: Arc<str>,
    /// The cluster, `None` when the route names one that does not exist (503 NC).
    pub cluster: Option<Arc<Cluster>>,
    /// Relative weight in a split.
    pub weight: u32,
    /// Requests counted by status class.
    pub counters: RequestCounters,
}

pub use crate::policy::tenant::Tenant;

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// Route name (metrics, logs).
    pub name: Arc<str>,
    /// The conditions.
    pub matcher: RouteMatch,
    /// One target, or several for a weighted split.
    pub targets: Vec<Target>,
    total_weight: u64,
    /// The request's whole budget upstream, retries and back-off included (Envoy's route
    /// `timeout`); zero means none.
    pub timeout: Duration,
    /// The longest wait for each read from the upstream — the response head, then each
    /// body chunk (Envoy's route `idle_timeout`); `None`: only the budget bounds it.
    pub idle_timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Metric handles.
    pub stats: RouteStats,
    /// Plugins this route runs, in order.
    pub plugins: Vec<Arc<crate::plugins::LoadedPlugin>>,
    /// Its process plugins (`ext_proc` filters), in the order they run: after `plugins`
    /// on the request, before them on the response.
    pub processors: Vec<Arc<crate::ext_proc::ExtProc>>,
    /// Data locality: the only region whose endpoints may serve this route.
    pub locality: Option<Arc<str>>,
    /// Where a request's key for `ring_hash` clusters comes from (Envoy's `hash_policy`).
    pub hash_policy: Vec<HashPolicy>,
    /// What changes in forwarded requests and their responses.
    pub edits: RouteEdits,
    /// Set when the route answers by itself (redirect, direct response) instead.
    pub local: Option<LocalAction>,
    /// Its settings for the policy filters (JWT requirement, RBAC override, rate limit).
    pub policy: RoutePolicy,
    /// The tenant whose route this is (route metadata `nip.tenant`).
    pub tenant: Option<Tenant>,
}

/// What a route changes in the requests it forwards and their responses.
#[derive(Debug, Clone, Default)]
pub struct RouteEdits {
    /// Header edits of the forwarded request (route, then virtual host, then route
    /// configuration).
    pub request_headers: HeaderEdits,
    /// Header edits of the response (the same order).
    pub response_headers: HeaderEdits,
    /// The forwarded path.
    pub path: Option<PathRewrite>,
    /// The forwarded `Host`.
    pub host: Option<HostRewrite>,
}

/// One source of a request's hash key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    /// A request header's value (all values of a repeated header, in order).
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
    /// A query parameter's (raw) value.
    QueryParameter(String),
}

/// One entry of a route's hash policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    /// Where the key comes from.
    pub source: HashSource,
    /// When this entry produced a key, the later ones are not consulted.
    pub terminal: bool,
}

impl HashSource {
    /// The key this source finds in a request, if any.
    fn key<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
        client: Option<std::net::IpAddr>,
    ) -> Option<u64> {
        use crate::upstream::hash::{combine, hash64};
        match self {
            HashSource::Header(name) => headers
                .get_all(name)
                .iter()
                .fold(None, |h, v| Some(combine(h, hash64(v.as_bytes())))),
            HashSource::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash64(v.as_bytes())),
            HashSource::SourceIp => client.map(|ip| {
                // The address's text, written on the stack (no allocation per request).
                use std::io::Write as _;
                let mut text = [0u8; 45];
                let mut cursor = std::io::Cursor::new(&mut text[..]);
                let _ = write!(cursor, "{ip}");
                let len = usize::try_from(cursor.position()).unwrap_or(0);
                hash64(&text[..len])
            }),
            HashSource::QueryParameter(name) => query?
                .split('&')
                .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash64(v.as_bytes())),
        }
    }
}

impl Route {
    /// Builds a route; `targets` must not be empty.
    pub fn new(
        name: Arc<str>,
        matcher: RouteMatch,
        targets: Vec<Target>,
        timeout: Duration,
        retry: RetryPolicy,
        stats: RouteStats,
        plugins: Vec<Arc<crate::plugins::LoadedPlugin>>,
    ) -> Self {
        let total_weight = targets.iter().map(|t| u64::from(t.weight)).sum();
        Route {
            name,
            matcher,
            targets,
            total_weight,
            timeout,
            idle_timeout: None,
            retry,
            stats,
            plugins,
            processors: Vec::new(),
            locality: None,
            hash_policy: Vec::new(),
            edits: RouteEdits::default(),
            local: None,
            policy: RoutePolicy::default(),
            tenant: None,
        }
    }

    /// Sets the route's process plugins.
    pub fn with_processors(mut self, processors: Vec<Arc<crate::ext_proc::ExtProc>>) -> Self {
        self.processors = processors;
        self
    }

    /// Sets what the route changes in forwarded requests and responses.
    pub fn with_edits(mut self, edits: RouteEdits) -> Self {
        self.edits = edits;
        self
    }

    /// Makes the route answer by itself.
    pub fn with_local_action(mut self, local: Option<LocalAction>) -> Self {
        self.local = local;
        self
    }

    /// Marks the route as a tenant's.
    pub fn with_tenant(mut self, tenant: Option<Tenant>) -> Self {
        self.tenant = tenant;
        self
    }

    /// Sets the route's policy settings.
    pub fn with_policy(mut self, policy: RoutePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Bounds each read from the upstream (Envoy's route `idle_timeout`).
    pub fn with_idle_timeout(mut self, idle_timeout: Option<Duration>) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Sets where `ring_hash` keys come from.
    pub fn with_hash_policy(mut self, hash_policy: Vec<HashPolicy>) -> Self {
        self.hash_policy = hash_policy;
        self
    }

    /// The request's hash for `ring_hash` clusters: every entry of the hash policy that
    /// finds its key, combined as Envoy does, up to the first terminal one that did.
    /// `None` when nothing was found (the cluster then picks at random).
    pub fn request_hash(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Option<u64> {
        let mut hash = None;
        for policy in &self.hash_policy {
            if let Some(key) = policy.source.key(headers, query, client) {
                hash = Some(crate::upstream::hash::combine(hash, key));
                if policy.terminal {
                    break;
                }
            }
        }
        hash
    }

    /// Pins the route to the endpoints of one region.
    pub fn with_locality(mut self, region: Option<Arc<str>>) -> Self {
        self.locality = region;
        self
    }

    fn matches(&self, path: &str, method: &Method, headers: &HeaderMap) -> bool {
        self.matcher.matches(path, method, headers)
    }

    /// Picks the index of the target for one request (weighted for splits).
    pub fn pick_target(&self) -> Option<usize> {
        if self.targets.len() <= 1 || self.total_weight == 0 {
            return (!self.targets.is_empty()).then_some(0);
        }
        let mut ticket = fastrand::u64(..self.total_weight);
        for (index, target) in self.targets.iter().enumerate() {
            let w = u64::from(target.weight);
            if ticket < w {
                return Some(index);
            }
            ticket -= w;
        }
        Some(self.targets.len() - 1)
    }
}

/// The routes of one host pattern.
#[derive(Debug, Default)]
pub struct VirtualHost {
    /// Name (for `/config_dump` readers and logs).
    pub name: String,
    /// Routes in order.
    pub routes: Vec<Arc<Route>>,
}

/// Host and route selection for a whole route configuration.
#[derive(Debug, Default)]
pub struct Router {
    virtual_hosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `(".example.com", index)`, longest suffix first.
    suffixes: Vec<(String, usize)>,
    /// `"*"`.
    fallback: Option<usize>,
}

/// Adds a virtual host's domains to a router under construction.
#[derive(Debug, Default)]
pub struct RouterBuilder {
    router: Router,
}

impl RouterBuilder {
    /// Adds a virtual host that answers for `domains`; a domain already taken is an error.
    pub fn add(&mut self, domains: &[String], host: VirtualHost) -> Result<(), String> {
        let index = self.router.virtual_hosts.len();
        for domain in domains {
            let domain = domain.to_ascii_lowercase();
            let duplicate = if domain == "*" {
                self.router.fallback.replace(index).is_some()
            } else if let Some(suffix) = domain.strip_prefix('*') {
                if self.router.suffixes.iter().any(|(s, _)| s == suffix) {
                    true
                } else {
                    self.router.suffixes.push((suffix.to_string(), index));
                    false
                }
            } else {
                self.router.exact.insert(domain.clone(), index).is_some()
            };
            if duplicate {
                return Err(format!("domain {domain:?} is used by two virtual hosts"));
            }
        }
        self.router.virtual_hosts.push(host);
        Ok(())
    }

    /// Finishes the router.
    pub fn build(mut self) -> Router {
        self.router
            .suffixes
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        self.router
    }
}

impl Router {
    /// Finds the route for a request. `host` may carry a port.
    pub fn route(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<&Arc<Route>> {
        let vhost = self.virtual_host(host)?;
        vhost
            .routes
            .iter()
            .find(|r| r.matches(path, method, headers))
    }

    fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let index = self.host_index(host).or(self.fallback)?;
        self.virtual_hosts.get(index)
    }

    fn host_index(&self, host: &str) -> Option<usize> {
        if self.exact.is_empty() && self.suffixes.is_empty() {
            return None;
        }
        let host = host.to_ascii_lowercase();
        if let Some(i) = self.exact.get(&host) {
            return Some(*i);
        }
        let bare = strip_port(&host);
        if let Some(i) = self.exact.get(bare) {
            return Some(*i);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| bare.ends_with(suffix.as_str()) && bare.len() > suffix.len())
            .map(|(_, i)| *i)
    }

    /// Virtual hosts, for the admin page.
    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.virtual_hosts
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matchers::{HeaderMatch, HeaderValueMatch, PathMatch};
    use crate::telemetry::metrics::Metrics;
    use regex::Regex;

    fn route(name: &str, path: PathMatch, headers: Vec<HeaderMatch>) -> Arc<Route> {
        let metrics = Metrics::new();
        Arc::new(Route::new(
            name.into(),
            RouteMatch { path, headers },
            vec![Target {
                cluster_name: "c".into(),
                cluster: None,
                weight: 1,
                counters: RequestCounters::default(),
            }],
            Duration::ZERO,
            RetryPolicy::default(),
            metrics.route_stats(name),
            Vec::new(),
        ))
    }

    fn router() -> Router {
        let mut b = RouterBuilder::default();
        let canary = HeaderMatch {
            name: HeaderName::from_static("x-canary"),
            is_method: false,
            value: HeaderValueMatch::Exact("1".into()),
            invert: false,
        };
        let post = HeaderMatch {
            name: HeaderName::from_static("x-method"),
            is_method: true,
            value: HeaderValueMatch::Regex(Regex::new("^(POST)$").unwrap()),
            invert: false,
        };
        b.add(
            &["*".into()],
            VirtualHost {
                name: "default".into(),
                routes: vec![
                    route("canary", PathMatch::Prefix("/".into()), vec![canary]),
                    route("post", PathMatch::Prefix("/".into()), vec![post]),
                    route(
                        "regex",
                        PathMatch::Regex(Regex::new("^(?:/v[0-9]+/.*)$").unwrap()),
                        vec![],
                    ),
                    route("exact", PathMatch::Exact("/e".into()), vec![]),
                ],
            },
        )
        .unwrap();
        b.add(
            &["*.example.com".into()],
            VirtualHost {
                name: "wild".into(),
                routes: vec![route("wild", PathMatch::Prefix("/".into()), vec![])],
            },
        )
        .unwrap();
        b.add(
            &["api.example.com".into()],
            VirtualHost {
                name: "api".into(),
                routes: vec![route("api", PathMatch::Prefix("/".into()), vec![])],
            },
        )
        .unwrap();
        b.build()
    }

    fn pick(
        r: &Router,
        host: &str,
        path: &str,
        method: Method,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        r.route(host, path, &method, &map)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn hosts_pick_the_most_specific_virtual_host() {
        let r = router();
        assert_eq!(
            pick(&r, "api.example.com:8080", "/", Method::GET, &[]).as_deref(),
            Some("api")
        );
        assert_eq!(
            pick(&r, "www.Example.com", "/", Method::GET, &[]).as_deref(),
            Some("wild")
        );
        assert_eq!(
            pick(&r, "example.com", "/e", Method::GET, &[]).as_deref(),
            Some("exact")
        );
    }

    #[test]
    fn routes_match_in_order_on_headers_method_and_path() {
        let r = router();
        assert_eq!(
            pick(&r, "x", "/e", Method::GET, &[("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            pick(&r, "x", "/e", Method::POST, &[]).as_deref(),
            Some("post")
        );
        assert_eq!(
            pick(&r, "x", "/v2/items", Method::GET, &[]).as_deref(),
            Some("regex")
        );
        assert_eq!(pick(&r, "x", "/v2", Method::GET, &[]), None);
        assert_eq!(
            pick(&r, "x", "/e", Method::GET, &[]).as_deref(),
            Some("exact")
        );
        assert_eq!(pick(&r, "x", "/e/x", Method::GET, &[]), None);
    }

    #[test]
    fn retry_policy_conditions() {
        let p = RetryPolicy::parse("gateway-error", 2).unwrap();
        assert!(p.retries_status(503) && !p.retries_status(500));
        assert!(p.retries_connect_failure() && p.retries_reset());
        let p = RetryPolicy::parse("connect-failure", 1).unwrap();
        assert!(!p.retries_status(503) && !p.retries_reset());
        assert!(RetryPolicy::parse("sometimes", 1).is_err());
        let mut codes = RetryPolicy::parse("retriable-status-codes", 1).unwrap();
        assert!(!codes.retries_status(409), "no codes listed yet");
        codes.retriable_status_codes = vec![409];
        assert!(codes.retries_status(409) && !codes.retries_status(503));
    }

    #[test]
    fn duplicate_domains_are_refused() {
        let mut b = RouterBuilder::default();
        b.add(&["a.com".into()], VirtualHost::default()).unwrap();
        assert!(b.add(&["A.com".into()], VirtualHost::default()).is_err());
    }

    #[test]
    fn request_hashes_come_from_each_source_and_combine_up_to_a_terminal_one() {
        use crate::upstream::hash::{combine, hash64};
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert("cookie", "theme=dark; session=s-42".parse().unwrap());
        let client: Option<std::net::IpAddr> = "10.1.2.3".parse().ok();
        let query = Some("a=1&user=bob&b");
        let policy = |source: HashSource, terminal: bool| HashPolicy { source, terminal };
        let base = route("r", PathMatch::Prefix("/".into()), vec![]);
        let with = |policies: Vec<HashPolicy>| {
            Route::new(
                base.name.clone(),
                RouteMatch {
                    path: PathMatch::Prefix("/".into()),
                    headers: vec![],
                },
                vec![],
                Duration::ZERO,
                RetryPolicy::default(),
                base.stats.clone(),
                Vec::new(),
            )
            .with_hash_policy(policies)
        };
        let header = policy(HashSource::Header(HeaderName::from_static("x-user")), false);
        assert_eq!(
            with(vec![header.clone()]).request_hash(&headers, query, client),
            Some(combine(None, hash64(b"alice")))
        );
        let cookie = policy(HashSource::Cookie("session".into()), false);
        assert_eq!(
            with(vec![cookie]).request_hash(&headers, query, client),
            Some(hash64(b"s-42"))
        );
        let query_parameter = policy(HashSource::QueryParameter("user".into()), false);
        assert_eq!(
            with(vec![query_parameter.clone()]).request_hash(&headers, query, client),
            Some(hash64(b"bob"))
        );
        assert_eq!(
            with(vec![policy(HashSource::SourceIp, false)]).request_hash(&headers, query, client),
            Some(hash64(b"10.1.2.3"))
        );
        // Absent sources add nothing; present ones combine, a terminal one ends it.
        let missing = policy(HashSource::Header(HeaderName::from_static("x-none")), false);
        assert_eq!(
            with(vec![
                missing.clone(),
                header.clone(),
                query_parameter.clone()
            ])
            .request_hash(&headers, query, client),
            Some(combine(Some(hash64(b"alice")), hash64(b"bob")))
        );
        let terminal = policy(HashSource::Header(HeaderName::from_static("x-user")), true);
        assert_eq!(
            with(vec![terminal, query_parameter]).request_hash(&headers, query, client),
            Some(hash64(b"alice"))
        );
        assert_eq!(
            with(vec![missing]).request_hash(&headers, query, client),
            None
        );
    }

    #[test]
    fn back_off_doubles_from_the_base_up_to_the_max_with_full_jitter() {
        let ms = Duration::from_millis;
        let envoy = BackOff::default();
        assert_eq!((envoy.base, envoy.max), (ms(25), ms(250)));
        let ceilings: Vec<Duration> = (1..=6).map(|n| envoy.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [ms(25), ms(50), ms(100), ms(200), ms(250), ms(250)]
        );
        assert_eq!(envoy.ceiling(u32::MAX), ms(250), "no overflow");
        // Full jitter: anywhere from zero up to (not including) the ceiling.
        let mut rng = fastrand::Rng::with_seed(7);
        let waits: Vec<Duration> = (0..2000).map(|_| envoy.wait(3, rng.u64(..))).collect();
        assert!(waits.iter().all(|w| *w < ms(100)));
        assert!(waits.iter().any(|w| *w < ms(10)) && waits.iter().any(|w| *w > ms(90)));
        let zero = BackOff {
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(zero.wait(1, 12345), Duration::ZERO);
    }
}
